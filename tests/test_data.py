"""Dataset readers: the three layouts, auto-detection, labels, ground truth and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from dhr_cli.errors import DatasetError
from dhr_cli.io.datasets import VOC_CLASSES, open_dataset
from tests.helpers import make_dhr, make_flat, make_voc, scene


def test_flat_layout_with_labels_json_and_splits(tmp_path):
    root = make_flat(tmp_path / "d", splits={"train": ["b", "a"], "val": ["c"]})
    ds = open_dataset(root)
    assert ds.layout == "flat" and ds.ids == ["a", "b", "c"] and ds.classes == ["background", "cat", "dog"]
    assert ds.labels("b") == [1, 2] and ds.has_background and ds.has_gt
    image = ds.image("a")
    assert image.shape == (24, 32, 3) and image.dtype == np.uint8
    assert ds.image_size("a") == (24, 32)
    gt = ds.gt("a")
    assert gt.dtype == np.uint8 and set(np.unique(gt)) == {0, 1, 255}
    assert open_dataset(root, "train").ids == ["b", "a"]


def test_flat_labels_come_from_masks_without_labels_json(tmp_path):
    root = make_flat(tmp_path / "d", labels_json=False)
    assert open_dataset(root).labels("b") == [1, 2]


def test_voc_layout_palette_masks_xml_labels_and_aug(tmp_path):
    root = make_voc(tmp_path / "VOC2012", aug_only=("2007_000039",))
    ds = open_dataset(root)
    assert ds.layout == "voc" and ds.split == "train" and ds.classes == VOC_CLASSES
    assert ds.ids == ["2007_000032", "2007_000039"]
    assert ds.labels("2007_000032") == [1, 15]
    gt = ds.gt("2007_000039")  # only in SegmentationClassAug
    assert set(np.unique(gt)) == {0, 19, 255}
    # Palette PNGs are read as indices, not colours.
    assert Image.open(root / "SegmentationClass" / "2007_000032.png").mode == "P"
    assert set(np.unique(ds.gt("2007_000032"))) == {0, 1, 15, 255}
    assert open_dataset(tmp_path, "val").ids == ["2008_000001"]  # found below the given folder too


def test_dhr_layout(tmp_path):
    root = make_dhr(tmp_path / "d")
    ds = open_dataset(root)
    assert ds.layout == "dhr" and ds.split == "train" and ds.labels("2007_000039") == [19]
    assert ds.gt("2007_000032").shape == (24, 32)
    make_dhr(root, split="val", items={"x": (3,)})
    with pytest.raises(DatasetError, match="choose one with --split"):
        open_dataset(root)
    assert open_dataset(root, "val").ids == ["x"]


def test_missing_path_and_unknown_layout(tmp_path):
    with pytest.raises(DatasetError, match="no such folder"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="matches no dataset layout") as e:
        open_dataset(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(e.value)


def test_undecodable_image_names_the_file(tmp_path):
    root = make_flat(tmp_path / "d")
    (root / "images" / "a.png").write_bytes(b"not a png")
    ds = open_dataset(root)
    with pytest.raises(DatasetError, match="cannot decode image") as e:
        ds.image("a")
    assert "a.png" in str(e.value)


def test_mask_size_mismatch(tmp_path):
    root = make_flat(tmp_path / "d")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "masks" / "a.png")
    with pytest.raises(DatasetError, match="mask is 10x10 but its image is 32x24"):
        open_dataset(root).gt("a")


def test_unknown_label_name(tmp_path):
    root = make_flat(tmp_path / "d")
    (root / "labels.json").write_text(json.dumps({"a": ["cat"], "b": ["unicorn"], "c": ["dog"]}))
    with pytest.raises(DatasetError, match="'unicorn' of b is not in classes.txt"):
        open_dataset(root)


def test_unknown_voc_xml_label(tmp_path):
    root = make_voc(tmp_path / "VOC2012")
    (root / "Annotations" / "2007_000032.xml").write_text("<annotation><object><name>unicorn</name></object></annotation>")
    with pytest.raises(DatasetError, match="unicorn"):
        open_dataset(root).labels("2007_000032")


def test_duplicate_ids(tmp_path):
    root = make_flat(tmp_path / "d")
    Image.fromarray(scene()[0]).save(root / "images" / "a.jpg")
    with pytest.raises(DatasetError, match="duplicate image id 'a'"):
        open_dataset(root)
    root2 = make_flat(tmp_path / "d2", splits={"train": ["a", "b", "a"]})
    with pytest.raises(DatasetError, match="duplicate image ids"):
        open_dataset(root2, "train")


def test_unknown_split_and_ids_without_images(tmp_path):
    root = make_flat(tmp_path / "d", splits={"train": ["a", "zzz"]})
    with pytest.raises(DatasetError, match="no split 'test'; available: train"):
        open_dataset(root, "test")
    with pytest.raises(DatasetError, match="1 ids have no image"):
        open_dataset(root, "train")


def test_colour_masks_in_voc_colours_are_read_others_refused(tmp_path):
    """One PNG reader for GT, --masks and eval: VOC colours are labels, other colours an error."""
    root = make_flat(tmp_path / "d")
    rgb = np.zeros((24, 32, 3), np.uint8)
    rgb[:, 16:] = (128, 0, 0)  # VOC colour of label 1
    Image.fromarray(rgb).save(root / "masks" / "a.png")
    expected = np.zeros((24, 32), np.uint8)
    expected[:, 16:] = 1
    np.testing.assert_array_equal(open_dataset(root).gt("a"), expected)
    rgb[0, 0] = (1, 2, 3)
    Image.fromarray(rgb).save(root / "masks" / "a.png")
    with pytest.raises(DatasetError, match=r"colour \(1, 2, 3\), which is not a VOC palette colour"):
        open_dataset(root).gt("a")


def test_label_names_match_the_class_list_by_class_key(tmp_path):
    """docs/contracts.md: class names match by class_key; labels.json's 'Dog ' or 'CAT' is dog or cat,
    a name no class shares a key with is still one line naming the file."""
    root = make_flat(tmp_path / "d", classes=("background", "potted plant", "dog"))
    (root / "labels.json").write_text(json.dumps({"a": ["Potted-Plant"], "b": ["Dog ", "pottedplant"], "c": ["DOG"]}))
    ds = open_dataset(root)
    assert [ds.labels(i) for i in ("a", "b", "c")] == [[1], [1, 2], [2]]
    (root / "labels.json").write_text(json.dumps({"a": ["cat"], "b": ["dog"], "c": ["dog"]}))
    with pytest.raises(DatasetError, match=r"labels\.json: label 'cat' of a is not in classes\.txt"):
        open_dataset(root)


@pytest.mark.parametrize("classes, named", [(("background", "dog", "dog"), r"\['dog'\]"),
                                            (("background", "potted plant", "Potted-Plant"), r"\['Potted-Plant', 'potted plant'\]")])
def test_a_class_list_naming_one_class_twice_is_refused(tmp_path, classes, named):
    """Names match by class_key, so 'potted plant' and 'Potted-Plant' are one class: the list is ambiguous
    (refused here, before a command writes a store that readers would refuse)."""
    root = make_flat(tmp_path / "d", classes=("background", "cat", "dog"))
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    with pytest.raises(DatasetError, match=rf"classes\.txt: class names {named} name one class more than once"):
        open_dataset(root)


def test_split_lines_are_ids_with_spaces_or_voc_main_lines(tmp_path):
    """A flat dataset's image "my photo.png" is listed as its whole line; a VOC ImageSets/Main line
    "b  1" is the id b; a line naming neither is one error naming the split file and quoting the line."""
    root = make_flat(tmp_path / "d", items={"my photo": (1,), "b": (2,), "c": (1, 2)},
                     splits={"train": ["my photo", "b  1", "  c -1"]})
    ds = open_dataset(root, "train")
    assert ds.ids == ["my photo", "b", "c"] and ds.labels("my photo") == [1] and ds.image("my photo").shape[2] == 3
    (root / "splits" / "train.txt").write_text("my pic\nb\n")
    with pytest.raises(DatasetError, match=r"train\.txt: 1 ids have no image, e\.g\. \['my pic'\]"):
        open_dataset(root, "train")
