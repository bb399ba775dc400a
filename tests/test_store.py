"""Store round trip, validation on open and on read, atomic writes and resume."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from dhr_cli.errors import StoreError
from dhr_cli.io.provenance import make_provenance
from dhr_cli.io.store import create_store, open_store
from tests.helpers import write_plain_store

CLASSES = ["background", "cat", "dog"]


def _cam_item(k=2, h=4, w=5, dtype=np.float16, seed=0):
    rng = np.random.default_rng(seed)
    return {"cams": rng.random((k, h, w)).astype(dtype)}, {"cams": {"labels": list(range(1, k + 1)), "image_size": [16, 20]}}


def test_round_trip_all_kinds(tmp_path):
    prov = make_provenance("test", {"x": 1}, {"cams": tmp_path / "in.h5"})
    arrays, attrs = _cam_item()
    with create_store(tmp_path / "c.h5", "cams", CLASSES, provenance=prov) as w:
        w.write("b", arrays, attrs)
        w.write("a", *_cam_item(1, seed=1))
    with open_store(tmp_path / "c.h5", expect="cams") as s:
        assert s.kind == "cams" and s.classes == CLASSES and s.ids == ["a", "b"]
        item = s.read("b")
        np.testing.assert_array_equal(item.cams, arrays["cams"].astype(np.float32))
        assert item.cams.dtype == np.float32
        assert item.labels.tolist() == [1, 2] and item.image_size == (16, 20)
        assert s.provenance["options"] == {"x": 1} and s.provenance["command"] == "test"
    mask = np.full((6, 7), 255, np.uint8)
    mask[2:4] = 1
    with create_store(tmp_path / "m.h5", "masks", CLASSES, provenance={}) as w:
        w.write("a", {"mask": mask})
    with open_store(tmp_path / "m.h5", expect=("masks", "seeds")) as s:
        np.testing.assert_array_equal(s.read("a").mask, mask)
        assert s.read("a").image_size == (6, 7)
    feats = np.random.default_rng(0).random((8, 3, 4)).astype(np.float32)
    with create_store(tmp_path / "f.h5", "features", CLASSES, provenance={}, root_attrs={"source": "stego"}) as w:
        w.write("a", {"features": feats}, {"features": {"image_size": [24, 32]}})
    with open_store(tmp_path / "f.h5", expect="features") as s:
        assert s.attrs["source"] == "stego"
        np.testing.assert_array_equal(s.read("a").features, feats)


def test_chunked_gzip(tmp_path):
    with create_store(tmp_path / "c.h5", "cams", CLASSES, provenance={}) as w:
        w.write("a", *_cam_item(2, 32, 32))
    with h5py.File(tmp_path / "c.h5") as f:
        ds = f["items/a/cams"]
        assert ds.compression == "gzip" and ds.chunks is not None


def test_feature_maps_are_checksummed_not_compressed(tmp_path):
    """Feature maps are stored chunked with fletcher32 but without gzip (reading them was propagate's largest cost)."""
    feats = np.random.default_rng(0).random((8, 12, 16)).astype(np.float16)
    with create_store(tmp_path / "f.h5", "features", CLASSES, provenance={}, root_attrs={"source": "stego"}) as w:
        w.write("a", {"features": feats}, {"features": {"image_size": [24, 32]}})
    with h5py.File(tmp_path / "f.h5") as f:
        ds = f["items/a/features"]
        assert ds.compression is None and ds.fletcher32 and ds.chunks is not None
    with open_store(tmp_path / "f.h5", expect="features") as s:
        np.testing.assert_array_equal(s.read("a").arrays["features"], feats)


def test_plain_h5py_store_is_readable(tmp_path):
    cams = np.ones((1, 3, 3), np.float32)
    path = write_plain_store(tmp_path / "x.h5", "cams", CLASSES, {"img1": ("cams", cams, {"labels": [2], "image_size": [9, 9]})})
    with open_store(path, expect="cams") as s:
        assert s.read("img1").labels.tolist() == [2]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda f: f.attrs.__setitem__("kind", "seeds"), "holds 'seeds', expected 'cams'"),
        (lambda f: f.attrs.__setitem__("dhr_version", 2), "newer than this dhr reads"),
        (lambda f: f.attrs.__setitem__("dhr_format", "other"), "not a dhr store"),
        (lambda f: f.attrs.__setitem__("classes", "not json"), "classes must be a JSON list"),
        (lambda f: f.attrs.__setitem__("kind", "logits"), "is not one of"),
    ],
)
def test_bad_root_attributes(tmp_path, mutate, message):
    path = write_plain_store(tmp_path / "x.h5", "cams", CLASSES, {"a": ("cams", np.ones((1, 2, 2), np.float32), {"labels": [1], "image_size": [4, 4]})})
    with h5py.File(path, "a") as f:
        mutate(f)
    with pytest.raises(StoreError, match=message) as e:
        open_store(path, expect="cams")
    assert str(path) in str(e.value)


@pytest.mark.parametrize(
    "cams, attrs, message",
    [
        (np.array([[[np.nan, 1.0]]], np.float32), {"labels": [1], "image_size": [2, 2]}, "NaN"),
        (np.array([[[-1.0, 1.0]]], np.float32), {"labels": [1], "image_size": [2, 2]}, "negative"),
        (np.ones((2, 2, 2), np.float32), {"labels": [1], "image_size": [2, 2]}, "2 maps but 1 labels"),
        (np.ones((1, 2, 2), np.float32), {"image_size": [2, 2]}, "no 'labels'"),
    ],
)
def test_bad_items_fail_on_read_with_the_item_named(tmp_path, cams, attrs, message):
    path = write_plain_store(tmp_path / "x.h5", "cams", CLASSES, {"img7": ("cams", cams, attrs)})
    with open_store(path) as s, pytest.raises(StoreError, match=message) as e:
        s.read("img7").cams
    assert "img7" in str(e.value) and str(path) in str(e.value)


def test_writer_refuses_bad_data_and_existing_output(tmp_path):
    out = tmp_path / "c.h5"
    with create_store(out, "cams", CLASSES, provenance={}) as w:
        with pytest.raises(StoreError, match="NaN"):
            w.write("a", {"cams": np.full((1, 2, 2), np.nan, np.float32)}, {"cams": {"labels": [1], "image_size": [2, 2]}})
        w.write("a", *_cam_item())
        with pytest.raises(StoreError, match="written twice"):
            w.write("a", *_cam_item())
    with pytest.raises(StoreError, match="already exists"):
        create_store(out, "cams", CLASSES, provenance={})
    with create_store(out, "cams", CLASSES, provenance={}, overwrite=True) as w:
        w.write("z", *_cam_item())
    with open_store(out) as s:
        assert s.ids == ["z"]


def test_interrupted_run_leaves_only_partial_and_resumes(tmp_path):
    out = tmp_path / "m.h5"
    mask = np.zeros((4, 4), np.uint8)
    with pytest.raises(KeyboardInterrupt):
        with create_store(out, "masks", CLASSES, provenance={"command": "t"}) as w:
            w.write("a", {"mask": mask})
            w.write("b", {"mask": mask + 1})
            raise KeyboardInterrupt
    assert not out.exists() and (tmp_path / "m.h5.partial").exists()
    # A half-written item (still under its temporary name) must be redone on resume.
    with h5py.File(tmp_path / "m.h5.partial", "a") as f:
        f["items"].create_group(".writing-c").create_dataset("mask", data=np.zeros((1, 1), np.uint8))
    with pytest.raises(StoreError, match="--resume"):
        create_store(out, "masks", CLASSES, provenance={})
    with pytest.raises(StoreError, match="rerun it with --resume"):
        open_store(out)
    written = []
    with create_store(out, "masks", CLASSES, provenance={"command": "t"}, resume=True) as w:
        assert w.done == {"a", "b"}
        for item_id in ["a", "b", "c", "d"]:
            if item_id not in w:
                w.write(item_id, {"mask": mask + 2})
                written.append(item_id)
    assert written == ["c", "d"]
    with open_store(out) as s:
        assert s.ids == ["a", "b", "c", "d"]
        assert s.read("b").mask.max() == 1 and s.read("c").mask.max() == 2
        assert "resumed_at" in s.provenance
    with h5py.File(out) as f:
        assert sorted(f["items"].keys()) == ["a", "b", "c", "d"]


def test_resume_rejects_a_different_run(tmp_path):
    out = tmp_path / "m.h5"
    with create_store(out, "masks", CLASSES, provenance={}) as w:
        w.write("a", {"mask": np.zeros((2, 2), np.uint8)})
    with pytest.raises(StoreError, match="does not match"):
        create_store(out, "masks", ["background", "person"], provenance={}, resume=True)
    assert out.exists() and not (tmp_path / "m.h5.partial").exists()  # the complete store is untouched


def test_provenance_is_json(tmp_path):
    with create_store(tmp_path / "m.h5", "masks", CLASSES, provenance=make_provenance("seed", {"tau": 0.8})) as w:
        w.write("a", {"mask": np.zeros((2, 2), np.uint8)})
    with h5py.File(tmp_path / "m.h5") as f:
        prov = json.loads(f.attrs["provenance"])
    assert prov["options"]["tau"] == 0.8 and prov["dhr_version"]


def test_read_only_named_datasets(tmp_path):
    import numpy as np

    from dhr_cli.io.store import create_store, open_store

    cams = np.ones((1, 4, 4), np.float16)
    feats = np.ones((8, 2, 2), np.float16)
    with create_store(tmp_path / "c.h5", "cams", ["background", "a"], provenance={}) as w:
        w.write("x", {"cams": cams, "features": feats}, {"cams": {"labels": np.array([1]), "image_size": [4, 4]}})
    with open_store(tmp_path / "c.h5") as s:
        assert set(s.read("x").arrays) == {"cams", "features"}
        assert set(s.read("x", names=("cams",)).arrays) == {"cams"}
        assert set(s.read("x", names=("features",)).arrays) == {"cams", "features"}
