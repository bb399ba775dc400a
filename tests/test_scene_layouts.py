"""Pascal Context and COCO-Stuff 164k readers on tiny generated copies of each layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dhr_cli.errors import DatasetError
from dhr_cli.io.datasets import open_dataset


def _image(path: Path, h: int, w: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (h, w, 3), np.uint8)).save(path)


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


# ---- Pascal Context -------------------------------------------------------------------------
def _make_context(root: Path, label_dir: str = "SegmentationClassContext") -> tuple[Path, dict]:
    base = root / "VOCdevkit" / "VOC2010"
    masks = {}
    for n, (a, b) in enumerate([(1, 59), (15, 37)]):
        item = f"2008_00000{n}"
        _image(base / "JPEGImages" / f"{item}.jpg", 12, 16)
        m = np.zeros((12, 16), np.uint8)
        m[:6, :8] = a
        m[6:, 8:] = b
        m[0, :] = 255
        masks[item] = m
        _png(base / label_dir / f"{item}.png", m)
    _image(base / "JPEGImages" / "2008_000099.jpg", 12, 16)  # a VOC2010 image without Context labels
    (base / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (base / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000001\n")
    return root, masks


@pytest.mark.parametrize("label_dir", ["SegmentationClassContext", "trainval"])
def test_pascal_context_layout(tmp_path, label_dir):
    root, masks = _make_context(tmp_path / "ctx", label_dir)
    ds = open_dataset(root)
    assert ds.layout == "pascal-context" and ds.root.name == "VOC2010"
    assert len(ds.classes) == 60 and ds.classes[0] == "background"
    # the detail-api order: aeroplane = 1, person = 37, wood = 59
    assert (ds.classes[1], ds.classes[15], ds.classes[37], ds.classes[59]) == ("aeroplane", "cat", "person", "wood")
    assert ds.ids == sorted(masks)  # only images with a label PNG, not every VOC2010 image
    for item, m in masks.items():
        np.testing.assert_array_equal(ds.gt(item), m)
        expected = sorted(set(np.unique(m).tolist()) - {0, 255})  # labels derived from the GT
        assert ds.labels(item) == expected
    assert open_dataset(root, "val").ids == ["2008_000001"]
    assert "background" in ds.describe() and label_dir in ds.describe()


def test_pascal_context_bad_values_and_orphans(tmp_path):
    root, _ = _make_context(tmp_path / "ctx")
    labels = root / "VOCdevkit" / "VOC2010" / "SegmentationClassContext"
    _png(labels / "2008_000000.png", np.full((12, 16), 60, np.uint8))
    with pytest.raises(DatasetError, match=r"2008_000000.png: label values \[60\] are outside the 60 classes"):
        open_dataset(root).gt("2008_000000")
    _png(labels / "2009_000123.png", np.zeros((12, 16), np.uint8))
    with pytest.raises(DatasetError, match=r"SegmentationClassContext: 1 label PNGs have no image .* 2009_000123.png"):
        open_dataset(root)


# ---- COCO-Stuff 164k ------------------------------------------------------------------------
UNUSED_THING_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91}  # COCO ids 1..90 without annotations


def _expected_stuff(raw: np.ndarray) -> np.ndarray:
    """Independent mapping: raw v = id - 1; used ids ranked in ascending order; the rest 255."""
    used_ids = [i for i in range(1, 183) if i not in UNUSED_THING_IDS]
    rank = {i - 1: r for r, i in enumerate(used_ids)}
    return np.vectorize(lambda v: rank.get(int(v), 255), otypes=[np.uint8])(raw)


def _make_stuff(root: Path) -> tuple[Path, dict]:
    raws = {}
    rng = np.random.default_rng(3)
    for n, split in ((139, "val2017"), (285, "val2017"), (9, "train2017")):
        item = f"{n:012d}"
        _image(root / "images" / split / f"{item}.jpg", 10, 14)
        raw = rng.integers(0, 182, (10, 14)).astype(np.uint8)  # every value incl. the unused thing ids
        raw[0, :4] = [0, 11, 90, 181]
        raw[1, :3] = [91, 12, 255]
        raws[item] = raw
        _png(root / "stuffthingmaps_trainval2017" / split / f"{item}.png", raw)
    return root, raws


def test_coco_stuff_mapping(tmp_path):
    root, raws = _make_stuff(tmp_path / "stuff")
    with pytest.raises(DatasetError, match="choose one with --split"):
        open_dataset(root)
    ds = open_dataset(root, "val2017")
    assert ds.layout == "coco-stuff" and ds.ids == ["000000000139", "000000000285"]
    assert len(ds.classes) == 171 and not ds.has_background
    gt = ds.gt("000000000139")
    np.testing.assert_array_equal(gt, _expected_stuff(raws["000000000139"]))
    # anchors by name: value 0 person, 11 (id 12, unused) ignore, 12 (id 13) stop sign, 90 (id 91) ignore,
    # 91 (id 92) banner, 181 (id 182) wood
    assert [ds.classes[v] if v != 255 else None for v in gt[0, :4]] == ["person", None, None, "wood"]
    assert [ds.classes[gt[1, 0]], ds.classes[gt[1, 1]], gt[1, 2]] == ["banner", "stop sign", 255]
    assert ds.labels("000000000285") == sorted(set(np.unique(_expected_stuff(raws["000000000285"])).tolist()) - {255})
    assert "171 classes" in ds.describe()


def test_coco_stuff_label_train_ids_and_bad_values(tmp_path):
    root, _ = _make_stuff(tmp_path / "stuff")
    maps = root / "stuffthingmaps_trainval2017" / "train2017"
    (maps / "000000000009.png").unlink()
    converted = np.full((10, 14), 170, np.uint8)
    converted[0] = 255
    _png(maps / "000000000009_labelTrainIds.png", converted)
    ds = open_dataset(root, "train2017")
    np.testing.assert_array_equal(ds.gt("000000000009"), converted)  # already mapped: read as written
    _png(maps / "000000000009_labelTrainIds.png", np.full((10, 14), 171, np.uint8))
    with pytest.raises(DatasetError, match=r"000000000009_labelTrainIds.png: values \[171\] are outside COCO-Stuff's 0..170"):
        ds.gt("000000000009")
    val = root / "stuffthingmaps_trainval2017" / "val2017" / "000000000139.png"
    _png(val, np.full((10, 14), 200, np.uint8))
    with pytest.raises(DatasetError, match=r"000000000139.png: values \[200\] are outside COCO-Stuff's 0..181"):
        open_dataset(root, "val2017").gt("000000000139")
    _png(val, np.zeros((5, 5), np.uint8))
    with pytest.raises(DatasetError, match=r"000000000139.png: label map is 5x5 but its image is 14x10"):
        open_dataset(root, "val2017").gt("000000000139")


def test_info_names_context_and_stuff(tmp_path):
    from typer.testing import CliRunner

    from dhr_cli.cli import app

    for root, layout, words in ((_make_context(tmp_path / "c")[0], "pascal-context", "0 background, 1..59"),
                                (_make_stuff(tmp_path / "s")[0], "coco-stuff", "the 11 unused thing ids")):
        args = ["info", str(root), "--json"] + (["--split", "val2017"] if layout == "coco-stuff" else [])
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, r.output
        summary = json.loads(r.output)
        assert summary["layout"] == layout and words in summary["convention"]
    mixed = tmp_path / "s"
    (mixed / "coco_seg_anno").mkdir()
    r = CliRunner().invoke(app, ["info", str(mixed)])
    assert r.exit_code != 0 and "mixed dataset layouts (coco-png, coco-stuff)" in r.output
