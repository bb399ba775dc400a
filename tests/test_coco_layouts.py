"""COCO (official json, community PNGs) and ADE20K readers on tiny generated copies of each layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dhr_cli.errors import DatasetError
from dhr_cli.io.coco import class_list
from dhr_cli.io.datasets import open_dataset

pycocotools = pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402

# Sparse official-style category ids (a gap at 12, like the real 80).
CATS = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]


def _write_image(path: Path, h: int, w: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), np.uint8)).save(path)


def make_coco(root: Path, split: str = "train2014", drop_image: bool = False, extra_ann: dict | None = None) -> Path:
    h, w = 40, 60
    images = [{"id": i, "file_name": f"COCO_{split}_{i:012d}.jpg", "height": h, "width": w} for i in (9, 25, 30)]
    rle_obj = np.zeros((h, w), np.uint8, order="F")
    rle_obj[5:20, 30:50] = 1
    rle = mask_utils.encode(np.asfortranarray(rle_obj))
    rle["counts"] = rle["counts"].decode()
    crowd = np.zeros((h, w), np.uint8)
    crowd[25:38, 2:40] = 1
    crowd_rle = mask_utils.encode(np.asfortranarray(crowd))
    crowd_rle["counts"] = crowd_rle["counts"].decode()
    anns = [
        # image 9: a person polygon
        {"id": 1, "image_id": 9, "category_id": 1, "iscrowd": 0, "segmentation": [[5, 5, 25, 5, 25, 30, 5, 30]]},
        # image 25: a car as RLE and a crowd of persons overlapping it
        {"id": 2, "image_id": 25, "category_id": 3, "iscrowd": 0, "segmentation": rle},
        {"id": 3, "image_id": 25, "category_id": 1, "iscrowd": 1, "segmentation": crowd_rle},
        # image 30: a dog polygon over a crowd region (object wins where they overlap)
        {"id": 4, "image_id": 30, "category_id": 18, "iscrowd": 0, "segmentation": [[10, 10, 50, 12, 30, 35]]},
        {"id": 5, "image_id": 30, "category_id": 1, "iscrowd": 1, "segmentation": crowd_rle},
    ]
    if extra_ann:
        anns.append(extra_ann)
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / f"instances_{split}.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": CATS}))
    for img in images[: 2 if drop_image else 3]:
        _write_image(root / split / img["file_name"], h, w)
    return root


def _reference_mask(json_path: Path, image_id: int) -> np.ndarray:
    """Semantic GT built the documented way from pycocotools' own annToMask."""
    coco = COCO(str(json_path))
    label = {cid: i + 1 for i, cid in enumerate(sorted(coco.cats))}
    img = coco.imgs[image_id]
    gt = np.zeros((img["height"], img["width"]), np.uint8)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
    for a in anns:
        if a["iscrowd"]:
            gt[coco.annToMask(a) > 0] = 255
    for a in anns:
        if not a["iscrowd"]:
            gt[coco.annToMask(a) > 0] = label[a["category_id"]]
    return gt


def test_coco_official_masks_and_labels_match_pycocotools(tmp_path):
    root = make_coco(tmp_path / "coco")
    ds = open_dataset(root)
    assert ds.layout == "coco" and ds.split == "train2014"
    assert ds.classes == ["background", "person", "car", "dog"]
    assert ds.ids == [f"COCO_train2014_{i:012d}" for i in (9, 25, 30)]
    js = root / "annotations" / "instances_train2014.json"
    for image_id, item_id in zip((9, 25, 30), ds.ids):
        gt = ds.gt(item_id)
        ref = _reference_mask(js, image_id)
        np.testing.assert_array_equal(gt, ref)
        assert gt.shape == ds.image_size(item_id)
    # image-level labels: non-crowd categories only (the crowd of persons does not make "person")
    assert ds.labels(ds.ids[0]) == [1]
    assert ds.labels(ds.ids[1]) == [2]
    assert ds.labels(ds.ids[2]) == [3]
    assert (ds.gt(ds.ids[1]) == 255).any() and (ds.gt(ds.ids[2]) == 3).any()
    assert "COCO official" in ds.describe()


def test_coco_missing_images_fail_or_skip(tmp_path):
    root = make_coco(tmp_path / "coco", drop_image=True)
    with pytest.raises(DatasetError, match=r"instances_train2014.json: 1 of 3 images are missing"):
        open_dataset(root)
    from dhr_cli.io.coco import COCODataset

    ds = COCODataset(root, None, missing="skip")
    assert len(ds) == 2


@pytest.mark.parametrize("ann, message", [
    ({"id": 9, "image_id": 9, "category_id": 99, "iscrowd": 0, "segmentation": [[1, 1, 5, 1, 5, 5]]}, "unknown category id 99"),
    ({"id": 9, "image_id": 9, "category_id": 1, "iscrowd": 0, "segmentation": []}, "annotation 9 has an empty segmentation"),
])
def test_coco_bad_annotations(tmp_path, ann, message):
    root = make_coco(tmp_path / "coco", extra_ann=ann)
    with pytest.raises(DatasetError, match=f"instances_train2014.json: .*{message}"):
        open_dataset(root)


_SQUARE = [5, 5, 25, 5, 25, 30, 5, 30]


@pytest.mark.parametrize("seg, message", [
    ({"size": [20, 30], "counts": "abc"}, r"annotation 9 has an RLE of size \[20, 30\], but its image is \[40, 60\]"),
    ({"size": [40, 60]}, "annotation 9 has an RLE segmentation without 'counts' and 'size'"),
    ("abc", "annotation 9 has a segmentation of type str"),
    ([[1, 2, 3, 4, 5, 6, 7]], "annotation 9 has a polygon with an odd number of coordinates"),
    ([["a", 2, 3, 4, 5, 6]], "annotation 9 has a polygon that is not a list of numbers"),
    ([[1, 2, 3, 4]], "annotation 9 has an empty segmentation"),
])
def test_coco_malformed_segmentations_name_the_annotation(tmp_path, seg, message):
    """What pycocotools would crash on (or mis-read) is refused in one line when the json is indexed."""
    root = make_coco(tmp_path / "coco", extra_ann={"id": 9, "image_id": 9, "category_id": 1, "iscrowd": 0,
                                                   "segmentation": seg})
    with pytest.raises(DatasetError, match=f"instances_train2014.json: {message}"):
        open_dataset(root)


def test_coco_polygons_under_three_points_are_dropped_not_read_as_boxes(tmp_path):
    """pycocotools reads a first polygon of 4 numbers as a box; such area-less polygons are dropped."""
    ref = open_dataset(make_coco(tmp_path / "a")).gt("COCO_train2014_000000000009")
    root = make_coco(tmp_path / "b", extra_ann={"id": 9, "image_id": 9, "category_id": 1, "iscrowd": 0,
                                                "segmentation": [[1, 2, 3, 4], _SQUARE]})
    np.testing.assert_array_equal(open_dataset(root).gt("COCO_train2014_000000000009"), ref)


def test_coco_duplicate_category_names_and_string_ids(tmp_path):
    root = make_coco(tmp_path / "coco")
    path = root / "annotations" / "instances_train2014.json"
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "categories": doc["categories"] + [{"id": 40, "name": "Dog"}]}))
    with pytest.raises(DatasetError, match=r"category names \['Dog', 'dog'\] appear more than once"):
        open_dataset(root)
    doc["annotations"][0]["category_id"] = "1"
    path.write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match="annotation 1 has unknown category id '1'"):
        open_dataset(root)


def test_coco_images_without_a_labelled_object_are_left_out(tmp_path):
    """WSSS's COCO splits hold the images with an image-level label (82,081 of train2014's 82,783)."""
    root = make_coco(tmp_path / "coco")
    path = root / "annotations" / "instances_train2014.json"
    doc = json.loads(path.read_text())
    doc["images"] += [{"id": 40, "file_name": "COCO_train2014_000000000040.jpg", "height": 40, "width": 60},
                      {"id": 41, "file_name": "COCO_train2014_000000000041.jpg", "height": 40, "width": 60}]
    crowd_only = {**doc["annotations"][2], "id": 50, "image_id": 41}  # a crowd region gives no label
    doc["annotations"].append(crowd_only)
    path.write_text(json.dumps(doc))
    for i in (40, 41):
        _write_image(root / "train2014" / f"COCO_train2014_{i:012d}.jpg", 40, 60)
    ds = open_dataset(root)
    assert ds.ids == [f"COCO_train2014_{i:012d}" for i in (9, 25, 30)]
    assert ds.skipped_unlabelled == 2 and "2 images without a labelled object left out" in ds.describe()


def _make_png_layout(root: Path, toco: bool) -> tuple[Path, dict]:
    split = "train2014"
    masks = {}
    for n in (9, 25):
        item = f"COCO_{split}_{n:012d}"
        _write_image(root / "JPEGImages" / split / f"{item}.jpg", 20, 30)
        m = np.zeros((20, 30), np.uint8)
        m[2:10, 3:12] = 1 if n == 9 else 80
        m[15:, :] = 255
        masks[item] = m
        gt = (root / "SegmentationClass" / split / f"{item}.png") if toco else (root / "coco_seg_anno" / f"{n:012d}.png")
        gt.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(m).save(gt)
    return root, masks


@pytest.mark.parametrize("toco", [False, True])
def test_coco_community_png(tmp_path, toco):
    root, masks = _make_png_layout(tmp_path / "c", toco)
    if toco:  # ToCo's label file: {str id: 80-vector}, here disagreeing on purpose with the masks of image 25
        vec = np.zeros(80, np.float32)
        vec[[0, 4]] = 1
        np.save(root / "cls_labels_onehot.npy", {"COCO_train2014_000000000025": vec}, allow_pickle=True)
    ds = open_dataset(root)
    assert ds.layout == "coco-png" and len(ds.classes) == 81 and ds.classes[80] == "toothbrush"
    for item, m in masks.items():
        np.testing.assert_array_equal(ds.gt(item), m)
    assert ds.labels("COCO_train2014_000000000009") == [1]
    assert ds.labels("COCO_train2014_000000000025") == ([1, 5] if toco else [80])


def test_coco_png_value_above_class_count(tmp_path):
    root, _ = _make_png_layout(tmp_path / "c", toco=False)
    Image.fromarray(np.full((20, 30), 90, np.uint8)).save(root / "coco_seg_anno" / "000000000009.png")
    ds = open_dataset(root)
    with pytest.raises(DatasetError, match=r"000000000009.png: label values \[90\] are outside the 81 classes"):
        ds.gt("COCO_train2014_000000000009")


def _make_ade(root: Path) -> Path:
    base = root / "ADEChallengeData2016"
    for n in (1, 2):
        item = f"ADE_train_{n:08d}"
        _write_image(base / "images" / "training" / f"{item}.jpg", 16, 24)
        raw = np.zeros((16, 24), np.uint8)
        raw[:8] = 1      # wall -> 0
        raw[8:, :12] = 150  # flag -> 149
        (base / "annotations" / "training").mkdir(parents=True, exist_ok=True)
        Image.fromarray(raw).save(base / "annotations" / "training" / f"{item}.png")
    return root


def test_ade20k_shift_and_ignore(tmp_path):
    ds = open_dataset(_make_ade(tmp_path / "ade"))
    assert ds.layout == "ade20k" and len(ds.classes) == 150 and ds.classes[0] == "wall"
    gt = ds.gt("ADE_train_00000001")
    assert (gt[:8] == 0).all() and (gt[8:, :12] == 149).all() and (gt[8:, 12:] == 255).all()
    assert ds.labels("ADE_train_00000001") == [0, 149]  # no background class: 0 is a real class
    assert class_list("ade150")[149] == "flag"


def test_ade20k_wrong_size_and_mixed_layouts(tmp_path):
    root = _make_ade(tmp_path / "ade")
    ann = root / "ADEChallengeData2016" / "annotations" / "training" / "ADE_train_00000002.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(ann)
    with pytest.raises(DatasetError, match=r"ADE_train_00000002.png: annotation is 10x10 but its image is 24x16"):
        open_dataset(root).gt("ADE_train_00000002")
    mixed = make_coco(tmp_path / "mixed")
    (mixed / "coco_seg_anno").mkdir()
    with pytest.raises(DatasetError, match=r"mixed: mixed dataset layouts \(coco, coco-png\)"):
        open_dataset(mixed)


def test_label_vectors_irn_and_toco_keys(tmp_path):
    from dhr_cli.pipeline.imports import read_label_vectors

    v = np.zeros(20, np.float32)
    v[[2, 14]] = 1
    np.save(tmp_path / "cls_labels.npy", {2011003271: v}, allow_pickle=True)
    got = read_label_vectors(tmp_path / "cls_labels.npy", 20)
    assert got["2011_003271"] == [3, 15]
    np.save(tmp_path / "onehot.npy", {"2007_000032": v}, allow_pickle=True)
    assert read_label_vectors(tmp_path / "onehot.npy", 20) == {"2007_000032": [3, 15]}


def test_info_names_layout_and_convention(tmp_path):
    from typer.testing import CliRunner

    from dhr_cli.cli import app

    root = make_coco(tmp_path / "coco")
    r = CliRunner().invoke(app, ["info", str(root), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["layout"] == "coco" and "crowd regions 255" in summary["convention"]
    assert summary["labels"] == {"person": 1, "car": 1, "dog": 1}
    bad = make_coco(tmp_path / "bad", drop_image=True)
    r = CliRunner().invoke(app, ["info", str(bad)])
    assert r.exit_code != 0 and "1 of 3 images are missing" in r.output and "Traceback" not in r.output
