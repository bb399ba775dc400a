"""Malformed COCO instances files: each is refused in one line naming the json and the entry (never a
traceback, a pycocotools segfault or OOM, or a silently wrong score), by `dhr eval` and by the GT cache
build alike; file names in sub-folders of the split folder are read (docs/datasets.md)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from click.testing import CliRunner
from typer.main import get_command

pytest.importorskip("pycocotools")

from dhr_cli.cli import app  # noqa: E402
from dhr_cli.io.store import create_store  # noqa: E402

H, W = 40, 60
JSON = "annotations/instances_train2014.json"
CLASSES = ["background", "person", "car", "dog"]
IDS = [f"COCO_train2014_{i:012d}" for i in (1, 2, 3)]
NAN, INF = float("nan"), float("inf")
CROWD = {"counts": [0, 400, 2000], "size": [H, W]}  # uncompressed RLE: 400 pixels, the first 10 columns


def _doc() -> dict:
    return {
        "images": [{"id": i, "file_name": f"{IDS[i - 1]}.jpg", "height": H, "width": W} for i in (1, 2, 3)],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [[5, 5, 25, 5, 25, 30, 5, 30]]},
            {"id": 2, "image_id": 1, "category_id": 18, "iscrowd": 0, "segmentation": [[30, 10, 55, 10, 55, 35, 30, 35]]},
            {"id": 3, "image_id": 2, "category_id": 3, "iscrowd": 0, "segmentation": [[0, 0, 59, 0, 59, 20, 0, 20]]},
            {"id": 4, "image_id": 2, "category_id": 1, "iscrowd": 1, "segmentation": copy.deepcopy(CROWD)},
            {"id": 5, "image_id": 3, "category_id": 18, "iscrowd": 0, "segmentation": [[10, 10, 50, 10, 50, 30, 10, 30]]},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}],
    }


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A valid root (3 images of 60x40) and a masks store of its ids, copied by each test."""
    root = tmp_path_factory.mktemp("coco_ok") / "coco"
    (root / "train2014").mkdir(parents=True)
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    for item in IDS:
        Image.fromarray(rng.integers(0, 255, (H, W, 3), np.uint8)).save(root / "train2014" / f"{item}.jpg")
    (root / JSON).write_text(json.dumps(_doc()))
    with create_store(root.parent / "pred.h5", "masks", CLASSES, provenance={}) as w:
        for item in IDS:
            w.write(item, {"mask": np.zeros((H, W), np.uint8)})
    return root


def _root(base: Path, tmp_path: Path, mutate) -> Path:
    root = tmp_path / "coco"
    shutil.copytree(base, root)
    doc = _doc()
    mutate(doc, root)
    (root / JSON).write_text(json.dumps(doc))  # NaN / Infinity written as Python's json does (and reads)
    return root


_CLI = get_command(app)  # built once (typer's CliRunner rebuilds it on every invoke: half the time here)


def _run(*args) -> tuple[int, str]:
    r = CliRunner().invoke(_CLI, [str(a) for a in args])
    text = (r.stderr if hasattr(r, "stderr") else r.output) if r.exit_code else r.output
    return r.exit_code, text


def _one_line_error(code: int, text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), text[-1500:]  # no traceback
    return lines[0]


@pytest.fixture
def no_pycocotools_masks(monkeypatch):
    """What must be refused before pycocotools sees it fails the test here instead of crashing it."""
    from pycocotools import mask

    def reached(*a, **k):
        raise AssertionError("pycocotools was given a malformed segmentation")

    for name in ("frPyObjects", "decode", "merge"):
        monkeypatch.setattr(mask, name, reached)


def _check_refused(base, tmp_path, mutate, expect: str) -> None:
    """`dhr eval` and `dhr info --build-cache` both give the one line `<json>: <expect>...`."""
    root = _root(base, tmp_path, mutate)
    js = root / JSON
    for args in (("eval", "--pred", base.parent / "pred.h5", "--data", root, "--quiet"),
                 ("info", root, "--build-cache", "--quiet")):
        line = _one_line_error(*_run(*args))
        assert line.startswith(f"Error: {js}: {expect}"), (args[0], line)
    assert not (root / "annotations" / "instances_train2014.gt.h5").exists()


def _set(where: str, key: str, value):
    """A mutation: doc[where][0][key] = value (or the key removed when value is ...)."""
    def mutate(doc, root):
        entry = doc[where][0] if where != "rle" else doc["annotations"][3]["segmentation"]
        if value is ...:
            del entry[key]
        else:
            entry[key] = value
    return mutate


def _poly(*coords):
    def mutate(doc, root):
        doc["annotations"][0]["segmentation"] = [list(coords)]
    return mutate


# -- 1. polygons pycocotools would segfault or run out of memory on ---------------------------
@pytest.mark.parametrize("mutate, expect", [
    (_poly(5, 5, 25, 5, 25, 30, NAN, 30), "annotation 1 has a polygon coordinate NaN; coordinates must be finite"),
    (_poly(5, 5, 25, 5, 25, 30, INF, 30), "annotation 1 has a polygon coordinate Infinity"),
    (_poly(5, -INF, 25, 5, 25, 30, 5, 30), "annotation 1 has a polygon coordinate -Infinity"),
    (_poly(5, 5, 1e8, 5, 1e8, 30, 5, 30), "annotation 1 has a polygon coordinate 100000000.0; coordinates must be "
                                          "finite and within 10 image sizes of its 60x40 image"),
    (_poly(5, 5, 1e12, 5, 1e12, 1e12, 5, 1e12), "annotation 1 has a polygon coordinate 1000000000000.0"),
    (_poly(5, 5, -10**400, 5, 25, 30, 5.5, 30), "annotation 1 has a polygon coordinate -1000"),
    (_poly(True, 5, 25, 5, 25, 30, 5, 30), "annotation 1 has a polygon that is not a list of numbers"),
], ids=["nan", "inf", "-inf", "1e8", "1e12", "huge-int", "bool"])
def test_bad_polygon_coordinates_are_refused_before_pycocotools(base, tmp_path, no_pycocotools_masks, mutate, expect):
    _check_refused(base, tmp_path, mutate, expect)


# -- 2. malformed entries ---------------------------------------------------------------------
def _images_as(value):
    def mutate(doc, root):
        doc["images"] = value if value != "dict" else {"a": doc["images"][0]}
    return mutate


def _append(where: str, value):
    def mutate(doc, root):
        doc[where] += value if isinstance(value, list) else [value]
    return mutate


@pytest.mark.parametrize("mutate, expect", [
    (_set("images", "file_name", ...), "image 1 has no file_name"),
    (_set("images", "height", ...), "image 1 (COCO_train2014_000000000001.jpg) has no height; expected a positive integer"),
    (_set("images", "height", None), "image 1 (COCO_train2014_000000000001.jpg) has height null"),
    (_set("images", "height", "40"), 'image 1 (COCO_train2014_000000000001.jpg) has height "40"'),
    (_set("images", "height", 40.7), "image 1 (COCO_train2014_000000000001.jpg) has height 40.7"),
    (_set("images", "width", 0), "image 1 (COCO_train2014_000000000001.jpg) has width 0"),
    (_set("images", "id", ...), "images[0] has no id"),
    (_set("images", "id", "1"), 'images[0] has id "1"; expected an integer'),
    (_images_as("dict"), "'images' is a dict; expected a list"),
    (_images_as(None), "'images' is null; expected a list"),
    (_append("images", 5), "images[3] is 5; expected an object"),
    (_set("categories", "name", ...), "category 1 has no name"),
    (_set("categories", "name", 7), "category 1 has name 7; expected a non-empty string"),
    (_set("categories", "id", "1"), 'categories[0] has id "1"; expected an integer'),
    (_append("categories", {"id": 1, "name": "bicycle"}), "category id 1 appears more than once"),
    (_set("annotations", "category_id", ...), "annotation 1 has no category_id"),
    (_set("annotations", "image_id", ...), "annotation 1 has no image_id"),
    (_set("annotations", "id", ...), "annotations[0] has no id"),
    (_set("annotations", "iscrowd", "0"), 'annotation 1 has iscrowd "0"; expected 0 or 1'),
    (_append("annotations", "x"), 'annotations[5] is "x"; expected an object'),
    (_set("rle", "size", 40), "annotation 4 has an RLE size 40; expected [height, width]"),
    (_set("rle", "size", "40x60"), 'annotation 4 has an RLE size "40x60"'),
    (_set("rle", "counts", "garbage!!"), "annotation 4 has RLE counts that are not a compressed RLE string"),
    (_set("rle", "counts", 5), "annotation 4 has RLE counts of type int"),
    (_set("rle", "counts", [-5, 100]), "annotation 4 has RLE counts with a negative run (-5)"),
    (_set("rle", "counts", ["a", "b"]), "annotation 4 has RLE counts that are not a list of integers"),
    (_set("rle", "counts", [0, 400.5, 1999.5]), "annotation 4 has RLE counts that are not a list of integers"),
    (_set("rle", "counts", [0, 2 * H * W]), "annotation 4 has RLE counts covering 4800 pixels, but its image has 40x60 = 2400"),
    (_set("rle", "counts", [0, 400]), "annotation 4 has RLE counts covering 400 pixels"),
    (_set("rle", "counts", "0`0"), "annotation 4 has compressed RLE counts covering"),
    (_set("images", "height", 2**40), "image 1 (COCO_train2014_000000000001.jpg) has height 1099511627776"),
    (_set("images", "file_name", "\ud800.jpg"), "image 1 has file_name '\\ud800.jpg', which is not valid Unicode"),
    (_append("categories", [{"id": 100 + k, "name": f"class{k}"} for k in range(252)]),
     "255 categories; at most 254 fit the uint8 masks"),
    (lambda doc, root: doc.update(categories=[], annotations=[]), "'categories' is empty"),
], ids=["no-file_name", "no-height", "height-null", "height-str", "height-float", "width-0", "no-image-id",
        "image-id-str", "images-dict", "images-null", "image-not-object", "category-no-name", "category-name-int",
        "category-id-str", "category-id-twice", "no-category_id", "no-image_id", "no-annotation-id", "iscrowd-str",
        "annotation-not-object", "rle-size-int", "rle-size-str", "rle-counts-garbage", "rle-counts-int",
        "rle-counts-negative", "rle-counts-strings", "rle-counts-floats", "rle-counts-too-long", "rle-counts-too-short",
        "rle-string-too-short", "height-2**40", "file_name-surrogate", "255-categories", "no-categories"])
def test_malformed_entries_give_one_line(base, tmp_path, no_pycocotools_masks, mutate, expect):
    _check_refused(base, tmp_path, mutate, expect)


# -- 3. two images of one item id -------------------------------------------------------------
def _same_stem(doc, root):
    Image.open(root / "train2014" / f"{IDS[1]}.jpg").save(root / "train2014" / f"{IDS[1]}.png")
    doc["images"].append({"id": 99, "file_name": f"{IDS[1]}.png", "height": H, "width": W})
    doc["annotations"].append({"id": 99, "image_id": 99, "category_id": 18, "iscrowd": 0,
                               "segmentation": [[0, 0, 59, 0, 59, 39, 0, 39]]})


def _same_stem_in_subfolder(doc, root):
    (root / "train2014" / "sub").mkdir()
    shutil.copy(root / "train2014" / f"{IDS[0]}.jpg", root / "train2014" / "sub" / f"{IDS[0]}.jpg")
    doc["images"].append({"id": 97, "file_name": f"sub/{IDS[0]}.jpg", "height": H, "width": W})
    doc["annotations"].append({"id": 97, "image_id": 97, "category_id": 3, "iscrowd": 0,
                               "segmentation": [[0, 0, 59, 0, 59, 39, 0, 39]]})


def _same_file_name(doc, root):
    doc["images"].append({"id": 98, "file_name": f"{IDS[0]}.jpg", "height": H, "width": W})
    doc["annotations"].append({"id": 98, "image_id": 98, "category_id": 3, "iscrowd": 0,
                               "segmentation": [[0, 0, 59, 0, 59, 39, 0, 39]]})


def _same_image_id(doc, root):
    doc["images"].append({"id": 1, "file_name": f"{IDS[1]}.jpg", "height": H, "width": W})


@pytest.mark.parametrize("mutate, expect", [
    (_same_stem, f"images 2 ({IDS[1]}.jpg) and 99 ({IDS[1]}.png) would both be image id '{IDS[1]}'"),
    (_same_stem_in_subfolder, f"images 1 ({IDS[0]}.jpg) and 97 (sub/{IDS[0]}.jpg) would both be image id '{IDS[0]}'"),
    (_same_file_name, f"file_name '{IDS[0]}.jpg' is listed twice (image 98 and an earlier one)"),
    (_same_image_id, "image id 1 appears more than once"),
], ids=["jpg-and-png", "sub-folder", "file_name-twice", "image-id-twice"])
def test_images_of_one_id_are_refused(base, tmp_path, mutate, expect):
    _check_refused(base, tmp_path, mutate, expect)


# -- 4. file names with a sub-folder; names outside the split folder --------------------------
def test_file_names_in_sub_folders_are_read(base, tmp_path):
    """sub/<name>.jpg is item <name> (item ids hold no '/'); scored and cached like the others.
    Polygons a little outside their image (as real annotations have), or long, stay accepted."""
    def mutate(doc, root):
        (root / "train2014" / "sub" / "deeper").mkdir(parents=True)
        for i, where in ((0, "sub"), (2, "sub/deeper")):
            shutil.move(root / "train2014" / f"{IDS[i]}.jpg", root / "train2014" / where / f"{IDS[i]}.jpg")
            doc["images"][i]["file_name"] = f"{where}/{IDS[i]}.jpg"
        doc["annotations"][4]["segmentation"] = [[-0.5, -1, 60.5, -1, 60.5, 41, -0.5, 41]]
        # a long polygon near the far corner: its norm is above the margin, its coordinates within it
        doc["annotations"][0]["segmentation"].append([v for k in range(400) for v in (59 - k % 2, 39 - k % 3)])

    root = _root(base, tmp_path, mutate)
    code, text = _run("eval", "--pred", base.parent / "pred.h5", "--data", root, "--json", tmp_path / "r.json", "--quiet")
    assert code == 0, text
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["images"] == 3  # all three images read (none reported missing)
    code, text = _run("info", root, "--build-cache", "--quiet")
    assert code == 0 and "3 of 3 images rasterised" in text, text
    from dhr_cli.io.datasets import open_dataset

    ds = open_dataset(root)
    assert ds.ids == IDS and ds.index_source == "GT cache"
    assert ds.image_path(IDS[2]) == root / "train2014" / "sub" / "deeper" / f"{IDS[2]}.jpg"
    assert (ds.gt(IDS[2]) == 3).all() and ds.cache_state == "valid"  # the dog (label 3) covers its whole image


@pytest.mark.parametrize("name", ["/abs/COCO_train2014_000000000001.jpg", "../COCO_train2014_000000000001.jpg",
                                  "sub/./COCO_train2014_000000000001.jpg"])
def test_file_names_outside_the_split_folder_are_refused(base, tmp_path, name):
    _check_refused(base, tmp_path, _set("images", "file_name", name),
                   f"image 1 has file_name {name!r}; expected a path inside the split's image folder")
