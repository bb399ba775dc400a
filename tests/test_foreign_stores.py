"""Stores written by other programs (plain h5py, docs/contracts.md): every legal variant reads as dhr's
own stores do, and every broken one is one `Error:` line that names the file and what is wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from dhr_cli.errors import StoreError
from dhr_cli.io.store import open_store
from tests.helpers import write_plain_store

CLASSES = ["background", "cat", "dog"]
CAMS = np.random.default_rng(0).random((2, 3, 4)).astype(np.float32)


def _cams_store(path: Path, cams=CAMS, attrs=None, **kw) -> Path:
    attrs = {"labels": [1, 2], "image_size": [12, 16]} if attrs is None else attrs
    return write_plain_store(path, "cams", CLASSES, {"a": ("cams", cams, attrs)}, **kw)


def _masks_store(path: Path, n: int = 2, libver=None) -> Path:
    mask = np.zeros((6, 8), np.uint8)
    mask[2:4, 2:5] = 1
    mask[0] = 255
    with h5py.File(path, "w", libver=libver) as f:
        f.attrs.update({"dhr_format": "dhr.store", "dhr_version": 1, "kind": "masks", "classes": json.dumps(CLASSES),
                        "ignore_index": 255})
        for i in range(n):
            f.create_dataset(f"items/m{i}/mask", data=mask)
    return path


def _read_all(path: Path):
    with open_store(path) as s:
        out = {}
        for i in s.ids:
            item = s.read(i)
            out[i] = item.mask if s.kind in ("masks", "seeds") else item.cams if s.kind == "cams" else item.features
            if s.kind in ("masks", "seeds"):
                s.read_mask(i)
            else:
                item.image_size
        return out


# ---- legal variants -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [">f4", ">f2", ">f8", "<f8", "<f2"])
def test_maps_in_any_float_byte_order_read_as_native_float32(tmp_path, dtype):
    """A big-endian float32 (MATLAB, Java or a network-order writer) is a float32: it is read, not refused."""
    stored = CAMS.astype(dtype)
    path = _cams_store(tmp_path / "c.h5", stored)
    with open_store(path) as s:
        cams = s.read("a").cams
    assert cams.dtype == np.float32 and cams.dtype.isnative
    np.testing.assert_array_equal(cams, stored.astype(np.float32))


def test_merge_stores_float64_maps_of_other_programs_as_float32(tmp_path):
    """Every command reads float64 maps; merge refused them (its writer takes float16/32 only)."""
    from dhr_cli.io.distributed import merge_stores

    stored = CAMS.astype(np.float64) / 3
    parts = [_cams_store(tmp_path / "a.h5", stored), tmp_path / "b.h5"]
    write_plain_store(parts[1], "cams", CLASSES, {"b": ("cams", CAMS, {"labels": [1, 2], "image_size": [12, 16]})})
    assert merge_stores(parts, tmp_path / "m.h5") == 2
    with open_store(tmp_path / "m.h5") as s:
        cams = s.read("a").cams
    assert cams.dtype == np.float32
    np.testing.assert_array_equal(cams, stored.astype(np.float32))


def test_root_attributes_as_matlab_and_c_writers_store_them(tmp_path):
    """Scalars as one-element arrays, strings as fixed-length (null-padded) or one-element string arrays,
    the class list as an HDF5 array of strings."""
    path = _cams_store(tmp_path / "c.h5", attrs={"labels": np.array([1, 2], ">i4"),
                                                 "image_size": np.array([[12], [16]], np.float64)})
    with h5py.File(path, "a") as f:
        f.attrs["dhr_version"] = np.array([1], np.int32)
        f.attrs["ignore_index"] = np.array([255.0])
        f.attrs["kind"] = np.array(["cams"], dtype=h5py.string_dtype())
        f.attrs.create("dhr_format", b"dhr.store", dtype=h5py.string_dtype("ascii", 16))
        f.attrs["classes"] = np.array(CLASSES, dtype=h5py.string_dtype())
    with open_store(path, expect="cams") as s:
        assert s.kind == "cams" and s.classes == CLASSES
        item = s.read("a")
        assert item.labels.tolist() == [1, 2] and item.image_size == (12, 16)


@pytest.mark.parametrize("size", [[12, 16], [[12, 16]], [[12], [16]], np.array([12.0, 16.0])])
def test_image_size_as_a_row_or_column_vector(tmp_path, size):
    with open_store(_cams_store(tmp_path / "c.h5", attrs={"labels": [1, 2], "image_size": size})) as s:
        assert s.read("a").image_size == (12, 16)


@pytest.mark.parametrize("labels", ["[1, 2]", b"[1, 2]", np.array(["[1, 2]"], dtype=h5py.string_dtype())])
def test_cam_labels_as_a_json_string_read_as_the_list(tmp_path, labels):
    """Some writers store every attribute as JSON text, as the root's classes list is stored."""
    with open_store(_cams_store(tmp_path / "c.h5", attrs={"labels": labels, "image_size": [12, 16]})) as s:
        assert s.read("a").labels.tolist() == [1, 2]


# ---- broken stores: one StoreError naming the file ----------------------------------------------
@pytest.mark.parametrize("labels, message", [
    ("[1, true]", "got the string '[1, true]'"),
    ("cat", "got the string 'cat'"),
    ('{"a": 1}', "got the string"),
])
def test_cam_labels_as_a_string_that_is_no_list_of_numbers(tmp_path, labels, message):
    with open_store(_cams_store(tmp_path / "c.h5", attrs={"labels": labels, "image_size": [12, 16]})) as s:
        with pytest.raises(StoreError, match="c.h5: item 'a'.*labels must be a 1-D array of integers") as e:
            s.read("a").labels
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("classes, named", [(["background", "cat", "cat"], "'cat'"),
                                            (["background", "cat", "dog", "background"], "'background'"),
                                            (["background", "Potted plant", "pottedplant"], "'Potted plant', 'pottedplant'")])
def test_a_class_named_twice_is_refused_on_open(tmp_path, classes, named):
    """Commands match classes by name (merge, eval against a dataset; io.datasets.class_key): a list naming
    one twice is ambiguous."""
    path = _cams_store(tmp_path / "c.h5")
    with h5py.File(path, "a") as f:
        f.attrs["classes"] = json.dumps(classes)
    with pytest.raises(StoreError, match=rf"c.h5: attribute classes names one class more than once \({named}\)"):
        open_store(path)


def test_no_store_naming_one_class_twice_is_written(tmp_path):
    from dhr_cli.io.store import create_store

    with pytest.raises(StoreError, match=r"o.h5: classes \['Cat', 'cat'\] name one class more than once"):
        create_store(tmp_path / "o.h5", "masks", ["background", "cat", "Cat"], provenance={})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("ignore_index", "abc", "ignore_index is 'abc'"),
        ("ignore_index", 255.5, "ignore_index is 255.5"),
        ("dhr_version", 1.5, "dhr_version is missing or not an integer (1.5)"),
        ("dhr_version", np.array([1, 2]), "dhr_version is missing or not an integer ([1, 2])"),
    ],
)
def test_root_numbers_that_are_not_whole_numbers(tmp_path, name, value, message):
    path = _cams_store(tmp_path / "c.h5")
    with h5py.File(path, "a") as f:
        f.attrs[name] = value
    with pytest.raises(StoreError) as e:
        open_store(path)
    assert message in str(e.value) and str(path) in str(e.value)


def _item_is_a_dataset(f):
    del f["items/m1"]
    f["items"].create_dataset("m1", data=np.zeros((6, 8), np.uint8))


def _dangling_soft_link(f):
    del f["items/m1"]
    f["items/m1"] = h5py.SoftLink("/nowhere")


def _broken_external_link(f):
    del f["items/m1"]
    f["items/m1"] = h5py.ExternalLink("absent.h5", "/items/m1")


def _null_dataspace(f):
    del f["items/m1/mask"]
    f["items/m1"].create_dataset("mask", data=h5py.Empty("u1"))


def _dangling_mask(f):
    del f["items/m1/mask"]
    f["items/m1/mask"] = h5py.SoftLink("/nowhere")


@pytest.mark.parametrize(
    "damage, message",
    [
        (_item_is_a_dataset, "items/m1 is a dataset, expected a group"),
        (_dangling_soft_link, "item 'm1' cannot be opened (a dangling soft link to /nowhere)"),
        (_broken_external_link, "item 'm1' cannot be opened (an external link to absent.h5:/items/m1"),
        (_null_dataspace, "item 'm1': mask holds no data"),
        (_dangling_mask, "item 'm1': mask is a link to nothing"),
    ],
)
def test_item_structure_problems_are_store_errors(tmp_path, damage, message):
    path = _masks_store(tmp_path / "m.h5")
    with h5py.File(path, "a") as f:
        damage(f)
    with open_store(path) as s:
        s.read("m0")
        for read in (s.read, s.read_mask):
            with pytest.raises(StoreError) as e:
                read("m1")
            assert message in str(e.value) and str(path) in str(e.value)


def test_a_corrupted_chunk_is_a_store_error_naming_the_item(tmp_path):
    path = tmp_path / "m.h5"
    with h5py.File(path, "w") as f:
        f.attrs.update({"dhr_format": "dhr.store", "dhr_version": 1, "kind": "masks", "classes": json.dumps(CLASSES)})
        ds = f.create_dataset("items/m1/mask", data=np.ones((40, 40), np.uint8), chunks=(40, 40), fletcher32=True)
        offset = ds.id.get_chunk_info(0).byte_offset
    data = bytearray(path.read_bytes())
    data[offset + 5] ^= 0xFF
    path.write_bytes(bytes(data))
    with open_store(path) as s:
        for read in (s.read, s.read_mask):
            with pytest.raises(StoreError, match="item 'm1': mask cannot be read .* damaged or truncated") as e:
                read("m1")
            assert str(path) in str(e.value)


def test_a_filter_this_hdf5_lacks_is_named(tmp_path):
    """A dataset compressed with a plugin filter (Blosc is id 32001) that this HDF5 build does not have."""
    path = _cams_store(tmp_path / "c.h5")
    with h5py.File(path, "a") as f:
        del f["items/a/cams"]
        ds = f["items/a"].create_dataset("cams", shape=CAMS.shape, dtype=CAMS.dtype, chunks=CAMS.shape,
                                         compression=32001, allow_unknown_filter=True)
        ds.id.write_direct_chunk((0, 0, 0), b"\0" * 16)
        ds.attrs.update({"labels": [1, 2], "image_size": [12, 16]})
    if h5py.h5z.filter_avail(32001):
        pytest.skip("this HDF5 has the Blosc filter")
    with open_store(path) as s, pytest.raises(StoreError, match="compressed with HDF5 filter 32001") as e:
        s.read("a")
    assert str(path) in str(e.value) and "'a'" in str(e.value)


def test_image_size_is_required_on_every_map(tmp_path):
    """The contract lists image_size on cams and features datasets: every reader refuses an item
    without it (before, `dhr info` refused a features store that `dhr propagate` took)."""
    path = _cams_store(tmp_path / "c.h5", attrs={"labels": [1, 2]})
    with open_store(path) as s, pytest.raises(StoreError, match="'a': cams has no image_size attribute"):
        s.read("a")
    feats = write_plain_store(tmp_path / "f.h5", "features", CLASSES,
                              {"a": ("features", CAMS, {})})
    with open_store(feats) as s, pytest.raises(StoreError, match="'a': features has no image_size attribute"):
        s.read("a")


def test_an_empty_mask_or_map_is_refused_by_readers_and_never_written(tmp_path):
    """A (0, 0) mask from another program made `dhr export` fail inside PIL; an importer could write
    (0, h, w) CAMs that dhr's readers then refused. Every reader and the writer apply one rule."""
    from dhr_cli.io.store import create_store

    path = tmp_path / "m.h5"
    with h5py.File(path, "w") as f:
        f.attrs.update({"dhr_format": "dhr.store", "dhr_version": 1, "kind": "masks", "classes": json.dumps(CLASSES)})
        f.create_dataset("items/a/mask", data=np.zeros((0, 0), np.uint8))
    with open_store(path) as s:
        for read in (lambda: s.read("a").mask, lambda: s.read_mask("a")):
            with pytest.raises(StoreError, match=r"'a': mask has dtype uint8 shape \(0, 0\).*H and W >= 1"):
                read()
    r = _dhr("export", str(path), "--out", str(tmp_path / "png"))
    _one_error_line(r, path, "shape (0, 0)")
    assert not (tmp_path / "png").exists()
    with create_store(tmp_path / "w.h5", "masks", CLASSES, provenance={}) as w:
        with pytest.raises(StoreError, match="H and W >= 1"):
            w.write("a", {"mask": np.zeros((0, 5), np.uint8)})
    with create_store(tmp_path / "c.h5", "cams", CLASSES, provenance={}) as w:
        with pytest.raises(StoreError, match="none of them 0"):
            w.write("a", {"cams": np.zeros((0, 3, 4), np.float32)}, {"cams": {"labels": [], "image_size": [6, 8]}})


# ---- files that do not open ------------------------------------------------------------------------
def test_empty_non_hdf5_and_truncated_files_say_which(tmp_path):
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    text = tmp_path / "text.h5"
    text.write_text("id,mask\n" * 20)
    truncated = _masks_store(tmp_path / "t.h5", n=20)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    for path, message in ((empty, "is empty (0 bytes)"), (text, "not an HDF5 file"),
                          (truncated, "damaged or truncated HDF5 file")):
        with pytest.raises(StoreError) as e:
            open_store(path)
        assert str(e.value).startswith(f"{path}: {message}"), str(e.value)


_HOLD = """
import h5py, os, sys, time
f = h5py.File(sys.argv[1], "a", libver="latest")
f.attrs["touched"] = 1
f.flush()
print("open", flush=True)
if sys.argv[2] == "crash":
    os._exit(0)
time.sleep(30)
"""


def _hold(path: Path, how: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(path), how], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "open"
    return proc


@pytest.mark.skipif(os.environ.get("HDF5_USE_FILE_LOCKING", "").upper() == "FALSE", reason="HDF5 file locking is off")
def test_a_store_another_process_is_writing_is_named_as_such(tmp_path):
    path = _masks_store(tmp_path / "m.h5")
    proc = _hold(path, "hold")
    try:
        with pytest.raises(StoreError, match="is open for writing in another process"):
            open_store(path)
    finally:
        proc.kill()
        proc.wait()
    with open_store(path) as s:  # the writer is gone: it reads again
        assert len(s) == 2


def test_a_store_its_writer_did_not_close_points_to_h5clear(tmp_path):
    """A writer that opened the file in HDF5 1.10+ format and died: the file-consistency flag stays set."""
    path = _masks_store(tmp_path / "m.h5", libver="latest")
    _hold(path, "crash").wait()
    with pytest.raises(StoreError, match=r"still open for writing .*h5clear -s"):
        open_store(path)


# ---- the command line -----------------------------------------------------------------------------
def _dhr(*args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "dhr_cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def _one_error_line(r: subprocess.CompletedProcess, path: Path, message: str) -> None:
    assert r.returncode == 1, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and str(path) in lines[0], r.stderr
    assert message in lines[0], lines[0]


def _rewrite(src: Path, dst: Path, ds_kw: dict, dtype=None) -> Path:
    """A copy of a dhr store as another program would write it: its own filters, big-endian floats,
    one-element-array and fixed-length attributes, items in reverse order, an unrelated group."""
    with h5py.File(src, "r") as a, h5py.File(dst, "w", libver="latest", track_order=True) as b:
        b.attrs["dhr_format"] = np.bytes_(b"dhr.store")
        b.attrs["dhr_version"] = np.array([1], np.int64)
        b.attrs["kind"] = np.array([a.attrs["kind"]], dtype=h5py.string_dtype())
        b.attrs["classes"] = json.dumps(json.loads(a.attrs["classes"]), indent=2)
        b.create_group("thumbnails").create_dataset("x", data=[1, 2, 3])
        items = b.create_group("items", track_order=True)
        for item_id in sorted(a["items"], reverse=True):
            for name, ds in a["items"][item_id].items():
                x = ds[()]
                if x.dtype.kind == "f" and dtype is not None:
                    x = x.astype(dtype)
                out = items.require_group(item_id).create_dataset(name, data=x, **ds_kw)
                for k, v in ds.attrs.items():
                    out.attrs[k] = np.asarray(v).astype(">i4").reshape(-1, 1) if k == "image_size" else v
    return dst


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from dhr_cli.testing.synthetic import SceneSpec, make_dataset

    root = make_dataset(tmp_path_factory.mktemp("foreign") / "data", n_images=3, seed=3,
                        spec=SceneSpec(height=40, width=56), val_fraction=0.0)
    return root


def test_seed_and_propagate_read_foreign_stores_as_their_own(synth, tmp_path):
    """Big-endian lzf / shuffle+gzip maps, MATLAB-style attributes: the same seeds and masks as from
    dhr's own stores (before: 'cams has dtype >f4, expected float16 or float32')."""
    from dhr_cli import PropagateConfig, SeedConfig, run_propagate, run_seed

    cams = _rewrite(synth / "cams.h5", tmp_path / "cams.h5", {"compression": "lzf"}, ">f4")
    uss = _rewrite(synth / "uss.h5", tmp_path / "uss.h5", {"compression": "gzip", "shuffle": True}, ">f2")
    wss = _rewrite(synth / "wss.h5", tmp_path / "wss.h5", {"chunks": (1, 2, 3)}, ">f4")
    r = _dhr("seed", "--cams", cams, "--data", synth, "--out", tmp_path / "s.h5", "--no-crf", "-q")
    assert r.returncode == 0, r.stderr
    run_seed(SeedConfig(use_crf=False), synth / "cams.h5", synth, tmp_path / "ref_s.h5", quiet=True)
    seeds = _rewrite(tmp_path / "s.h5", tmp_path / "s2.h5", {"compression": "gzip", "compression_opts": 9})
    r = _dhr("propagate", "--seeds", seeds, "--data", synth, "--uss", uss, "--wss", wss, "--out", tmp_path / "m.h5",
             "--no-crf", "-q")
    assert r.returncode == 0, r.stderr
    run_propagate(PropagateConfig(use_crf=False), seeds=tmp_path / "ref_s.h5", data=synth, uss=synth / "uss.h5",
                  wss=[synth / "wss.h5"], out=tmp_path / "ref_m.h5", quiet=True)
    for got, ref in (("s.h5", "ref_s.h5"), ("m.h5", "ref_m.h5")):
        a, b = _read_all(tmp_path / got), _read_all(tmp_path / ref)
        assert a.keys() == b.keys() and len(a) == 3
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_commands_name_a_broken_item_in_one_line(synth, tmp_path):
    """A dangling link or a dataset where an item group belongs: one line, exit 1, in the commands that
    read stores in loader workers (seed) and in this process (info, export, eval, merge); before, a
    Python traceback (AttributeError, KeyError)."""
    cams = _rewrite(synth / "cams.h5", tmp_path / "cams.h5", {})
    with h5py.File(cams, "a") as f:
        first = sorted(f["items"])[0]
        del f[f"items/{first}"]
        f[f"items/{first}"] = h5py.SoftLink("/nowhere")
    r = _dhr("seed", "--cams", cams, "--data", synth, "--out", tmp_path / "s.h5", "--no-crf", "-q")
    _one_error_line(r, cams, f"item {first!r} cannot be opened")
    masks = _masks_store(tmp_path / "m.h5")
    with h5py.File(masks, "a") as f:
        _item_is_a_dataset(f)
    for args in (["info", masks], ["export", masks, "--out", tmp_path / "x", "-q"],
                 ["merge", masks, "--out", tmp_path / "mg.h5"]):
        _one_error_line(_dhr(*args), masks, "items/m1 is a dataset, expected a group")


@pytest.mark.skipif(os.environ.get("HDF5_USE_FILE_LOCKING", "").upper() == "FALSE", reason="HDF5 file locking is off")
def test_a_store_open_for_writing_elsewhere_is_one_line(tmp_path):
    masks = _masks_store(tmp_path / "m.h5")
    proc = _hold(masks, "hold")
    try:
        _one_error_line(_dhr("info", masks), masks, "is open for writing in another process")
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("kind, name, array, message", [
    ("features", "features", np.full((4, 2, 3), np.nan, np.float32), "features holds NaN or infinite values"),
    ("features", "features", np.ones((2, 3), np.float32), "features has shape (2, 3), expected (channels, h, w)"),
    ("cams", "cams", -np.ones((2, 2, 3), np.float32), "cams holds negative values"),
])
def test_info_checks_the_items_it_samples_as_the_commands_do(tmp_path, kind, name, array, message):
    """`dhr info` said nothing about a features store with NaN maps that `dhr propagate` then refused."""
    from typer.testing import CliRunner

    from dhr_cli.cli import app

    path = write_plain_store(tmp_path / "x.h5", kind, CLASSES, {"a": (name, array, {"labels": [1, 2], "image_size": [4, 6]})})
    r = CliRunner().invoke(app, ["info", str(path)])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith(f"Error: {path}: item 'a': {message}"), r.output
