"""Outputs never replace inputs, and stores that break the contract in ways the readers used to
let through (label attributes, label values, per-image channel counts) fail in one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from dhr_cli.cli import app
from dhr_cli.io.store import open_store
from dhr_cli.testing.synthetic import make_dataset

_runner = CliRunner()


def invoke(*args):
    return _runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("safety") / "data", n_images=6, seed=3)
    seeds = root.parent / "seeds.h5"
    r = invoke("seed", "--cams", root / "cams.h5", "--data", root, "--out", seeds, "--no-crf", "-q")
    assert r.exit_code == 0, r.output
    masks = root.parent / "masks.h5"
    r = invoke("propagate", "--seeds", seeds, "--data", root, "--uss", root / "uss.h5", "--wss", root / "wss.h5",
               "--out", masks, "--no-crf", "-q")
    assert r.exit_code == 0, r.output
    return root, seeds, masks


def _one_line_error(r, *needles):
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    for n in needles:
        assert n in lines[0], r.output


# ---- an output is never one of the command's inputs -------------------------------------------
def test_out_equal_to_an_input_is_refused_and_the_input_kept(synth, tmp_path):
    root, seeds, masks = synth
    cams = tmp_path / "cams.h5"
    shutil.copy(root / "cams.h5", cams)
    before = cams.read_bytes()
    _one_line_error(invoke("seed", "--cams", cams, "--data", root, "--out", cams, "--no-crf", "-q", "--overwrite"),
                    "is also the input --cams")
    _one_line_error(invoke("seed", "--cams", cams, "--data", root, "--out", cams, "--no-crf", "-q", "--resume"),
                    "is also the input --cams")
    assert cams.read_bytes() == before
    uss = tmp_path / "uss.h5"
    shutil.copy(root / "uss.h5", uss)
    _one_line_error(invoke("propagate", "--seeds", seeds, "--data", root, "--uss", uss, "--wss", root / "wss.h5",
                           "--out", uss, "--no-crf", "-q", "--overwrite"), "is also the input --uss")
    with open_store(uss) as s:
        assert s.kind == "features"
    m = tmp_path / "m.h5"
    shutil.copy(masks, m)
    _one_line_error(invoke("eval", "--pred", m, "--data", root, "--json", m, "--overwrite", "-q"), "is also the input --pred")
    _one_line_error(invoke("merge", m, "--out", m, "--overwrite"), "is also the input")
    with open_store(m) as s:
        assert s.kind == "masks"


def test_library_writer_refuses_an_input_too(synth, tmp_path):
    """run_seed called from Python: the store writer checks the inputs its provenance names."""
    from dhr_cli import SeedConfig, run_seed
    from dhr_cli.errors import StoreError

    root, _, _ = synth
    cams = tmp_path / "cams.h5"
    shutil.copy(root / "cams.h5", cams)
    with pytest.raises(StoreError, match="is also the input cams"):
        run_seed(SeedConfig(use_crf=False), cams, root, cams, overwrite=True, quiet=True)
    with open_store(cams) as s:
        assert s.kind == "cams"


def test_dataset_files_and_folders_holding_inputs_are_refused(synth, tmp_path):
    root, seeds, masks = synth
    data = tmp_path / "data"
    shutil.copytree(root, data)
    classes = (data / "classes.txt").read_text()
    _one_line_error(invoke("eval", "--pred", masks, "--data", data, "--json", data / "classes.txt", "--overwrite", "-q"),
                    "is read by the dataset --data")
    _one_line_error(invoke("eval", "--pred", masks, "--data", data, "--report", data / "masks", "--overwrite", "-q"),
                    "is read by the dataset --data")
    assert (data / "classes.txt").read_text() == classes and len(list((data / "masks").iterdir())) == 6
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(masks, run / "masks.h5")
    _one_line_error(invoke("train", "--data", data, "--masks", run / "masks.h5", "--out", run, "--overwrite",
                           "--no-dhr", "--max-steps", 1, "-q"), "holds the input --masks")
    assert (run / "masks.h5").is_file()
    # a store written next to the data is no part of it
    r = invoke("seed", "--cams", data / "cams.h5", "--data", data, "--out", data / "seeds.h5", "--no-crf", "-q")
    assert r.exit_code == 0, r.output


def test_export_into_another_datasets_folder_is_allowed(synth, tmp_path):
    """Export's job is to fill a trainer's SegmentationClassAug/: no dataset it reads is at risk."""
    _, _, masks = synth
    out = tmp_path / "voc" / "SegmentationClassAug"
    (tmp_path / "voc" / "JPEGImages").mkdir(parents=True)
    out.mkdir()
    assert invoke("export", masks, "--out", out, "-q").exit_code == 0
    assert invoke("export", masks, "--out", out, "-q", "--overwrite").exit_code == 0
    assert len(list(out.glob("*.png"))) == 6


# ---- export and merge: all or nothing, label values checked, the faulty input named -----------
def _masks_with(tmp_path: Path, masks: Path, name: str, change) -> Path:
    out = tmp_path / name
    shutil.copy(masks, out)
    with h5py.File(out, "r+") as f:
        ids = sorted(f["items"])
        item = f["items"][ids[3]]
        change(item)
    return out


def test_export_writes_nothing_when_an_item_is_bad(synth, tmp_path):
    _, _, masks = synth

    def to_float(item):
        data = item["mask"][()].astype(np.float32)
        del item["mask"]
        item.create_dataset("mask", data=data)

    def value_9(item):
        data = item["mask"][()]
        data[0, 0] = 9
        item["mask"][...] = data

    for name, change, needle in (("float.h5", to_float, "expected uint8"), ("val9.h5", value_9, "label values [9] beyond")):
        bad = _masks_with(tmp_path, masks, name, change)
        out = tmp_path / f"out_{name}"
        _one_line_error(invoke("export", bad, "--out", out, "-q"), str(bad), needle)
        assert not out.exists()
        out.mkdir()
        (out / "keep.txt").write_text("x")
        _one_line_error(invoke("export", bad, "--out", out, "-q", "--overwrite"), needle)
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    same = tmp_path / "same"
    _one_line_error(invoke("export", masks, "--out", same, "--prompts", same, "-q"), "both --out and --prompts")
    assert not same.exists()


def test_merge_names_the_bad_input_and_leaves_no_partial(synth, tmp_path):
    _, _, masks = synth

    def value_9(item):
        data = item["mask"][()]
        data[0, 0] = 9
        item["mask"][...] = data

    bad = _masks_with(tmp_path, masks, "val9.h5", value_9)
    out = tmp_path / "merged.h5"
    _one_line_error(invoke("merge", bad, "--out", out), str(bad), "label values [9]")
    assert not out.exists() and not Path(f"{out}.partial").exists()
    assert invoke("merge", masks, "--out", out).exit_code == 0


def _with_classes(masks: Path, out: Path, change) -> Path:
    """A copy of a store whose class list `change` edits in place."""
    import json

    shutil.copy(masks, out)
    with h5py.File(out, "r+") as f:
        classes = json.loads(f.attrs["classes"])
        change(classes)
        f.attrs["classes"] = json.dumps(classes)
    return out


def test_merge_says_which_class_differs(synth, tmp_path):
    _, _, masks = synth
    other = _with_classes(masks, tmp_path / "other.h5", lambda c: c.__setitem__(2, "zebra"))
    _one_line_error(invoke("merge", masks, other, "--out", tmp_path / "o.h5"), "class 2 is", "'zebra'")


def test_class_mismatch_names_the_first_difference_in_full(synth, tmp_path):
    """The message showed the first 4 names of each list: a list differing at class 5 read as two equal lists."""
    from dhr_cli.io.datasets import VOC_CLASSES, class_mismatch

    root, _, _ = synth
    long_name = "double-decker bus of the london transport museum"
    renamed = _with_classes(root / "cams.h5", tmp_path / "renamed.h5", lambda c: c.__setitem__(5, long_name))
    _one_line_error(invoke("seed", "--cams", renamed, "--data", root, "--out", tmp_path / "s.h5", "--no-crf", "-q"),
                    "renamed.h5", f"class 5 is '{long_name}' in the store but 'bus' in the dataset")
    longer = _with_classes(root / "cams.h5", tmp_path / "longer.h5", lambda c: c.append("zebra"))
    _one_line_error(invoke("seed", "--cams", longer, "--data", root, "--out", tmp_path / "s.h5", "--no-crf", "-q"),
                    "class 6 is 'zebra' in the store but absent from the dataset (it has 6 classes)")
    other = [*VOC_CLASSES[:17], "Sheep!", *VOC_CLASSES[18:]]  # class_key's rule: case and punctuation aside
    assert class_mismatch(other, VOC_CLASSES, "a", "b") is None
    assert class_mismatch(other, VOC_CLASSES, "a", "b", key=str) == "class 17 is 'Sheep!' in a but 'sheep' in b"


# ---- cams label attributes -----------------------------------------------------------------
@pytest.mark.parametrize("labels, needle", [
    ("cat,dog", "must be a 1-D array of integers"),
    (np.array([[1, 2]]), "must be a 1-D array of integers"),
    (np.array([2.5, 1.0]), "not whole numbers"),
    ("dup", "names a class twice"),
    ("subset", "has no CAM for the image's label values"),
])
def test_cams_label_attribute_problems_are_one_line(synth, tmp_path, labels, needle):
    root, _, _ = synth
    cams = tmp_path / "cams.h5"
    shutil.copy(root / "cams.h5", cams)
    with h5py.File(cams, "r+") as f:
        for item_id in sorted(f["items"]):
            ds = f["items"][item_id]["cams"]
            have = np.atleast_1d(ds.attrs["labels"])
            if len(have) >= 2:
                break
        if isinstance(labels, str) and labels == "dup":
            labels = np.full(len(have), have[0])
        elif isinstance(labels, str) and labels == "subset":
            data, size = ds[()][:-1], ds.attrs["image_size"]
            del f["items"][item_id]["cams"]
            ds = f["items"][item_id].create_dataset("cams", data=data)
            ds.attrs["image_size"] = size
            labels = have[:-1]
        elif isinstance(labels, np.ndarray) and labels.ndim == 1:
            labels = np.resize(labels, len(have))
        ds.attrs["labels"] = labels
    out = tmp_path / "seeds.h5"
    r = invoke("seed", "--cams", cams, "--data", root, "--out", out, "--no-crf", "-q")
    _one_line_error(r, str(cams), item_id, needle)
    assert not out.exists() and not Path(f"{out}.partial").exists()


# ---- a features store whose channel count differs from image to image -----------------------
def test_per_image_channel_counts_give_the_same_masks_in_any_batch(synth, tmp_path):
    """docs/contracts.md leaves D free per image: zero-padding a batch to its largest D changes no cosine."""
    root, seeds, _ = synth
    uss = tmp_path / "uss.h5"
    shutil.copy(root / "uss.h5", uss)
    with h5py.File(uss, "r+") as f:
        item = f["items"][sorted(f["items"])[1]]
        data, attrs = item["features"][()], dict(item["features"].attrs)
        del item["features"]
        ds = item.create_dataset("features", data=data[: data.shape[0] // 3])
        for k, v in attrs.items():
            ds.attrs[k] = v
    outs = []
    for batch in (1, 4):
        out = tmp_path / f"m{batch}.h5"
        for wss in (root / "wss.h5", uss):  # as USS and (Step 3 forced with tau 0) as WSS
            r = invoke("propagate", "--seeds", seeds, "--data", root, "--uss", uss, "--wss", wss, "--tau", 0,
                       "--out", out, "--no-crf", "-q", "--batch-size", batch, "--overwrite")
            assert r.exit_code == 0, r.output
            with open_store(out) as s:
                outs.append({i: s.read(i).mask.copy() for i in s.ids})
    for a, b in ((outs[0], outs[2]), (outs[1], outs[3])):
        assert a.keys() == b.keys()
        for i in a:
            np.testing.assert_array_equal(a[i], b[i])


# ---- import: the peer file is named, what the store cannot hold is refused or kept exactly ----
def _peer_files(root: Path, src: Path, make) -> Path:
    from dhr_cli.io.datasets import open_dataset

    ds = open_dataset(root)
    src.mkdir()
    for k, i in enumerate(ds.ids):
        h, w = ds.image_size(i)
        keys = np.asarray(ds.labels(i)) - 1
        cams = np.random.default_rng(k).random((len(keys), h, w)).astype(np.float32)
        make(src, i, keys, cams, k)
    return src


def test_import_problems_name_the_peer_file(synth, tmp_path):
    root, _, _ = synth

    def mct_shapes(src, i, keys, cams, k):
        d = {int(c): m for c, m in zip(keys, cams)}
        if len(keys) > 1:
            d[int(keys[0])] = cams[0][:, :-1]
        np.save(src / f"{i}.npy", d)

    def irn_dup(src, i, keys, cams, k):
        np.save(src / f"{i}.npy", {"keys": np.resize(keys[:1], len(keys)), "high_res": cams})

    for fmt, make, needle in (("mctformer", mct_shapes, "its CAMs differ in shape"),
                              ("irn", irn_dup, "name a class twice")):
        src = _peer_files(root, tmp_path / f"src_{make.__name__}", make)
        out = tmp_path / f"{make.__name__}.h5"
        _one_line_error(invoke("import", fmt, src, "--data", root, "--out", out, "-q"), str(src), needle)
        assert not out.exists()


def test_import_keeps_cams_beyond_float16_exactly(synth, tmp_path):
    root, _, _ = synth
    src = _peer_files(root, tmp_path / "src", lambda src, i, keys, cams, k: np.save(
        src / f"{i}.npy", {"keys": keys, "high_res": cams * 1e5}))
    out = tmp_path / "c.h5"
    r = invoke("import", "irn", src, "--data", root, "--out", out, "-q")
    assert r.exit_code == 0 and "Warning" not in r.output, r.output
    with open_store(out) as s:
        item = s.read(s.ids[0])
        ref = np.load(src / f"{s.ids[0]}.npy", allow_pickle=True).item()["high_res"]
        np.testing.assert_array_equal(item.cams, ref)


def test_import_png_values_beyond_the_classes_name_the_png(synth, tmp_path):
    from PIL import Image

    root, _, _ = synth
    src = tmp_path / "png"
    src.mkdir()
    for k, p in enumerate(sorted((root / "masks").glob("*.png"))):
        mask = np.array(Image.open(p))
        if k == 1:
            mask[0, 0] = 9
        Image.fromarray(mask).save(src / p.name)
    _one_line_error(invoke("import", "png", src, "--data", root, "--out", tmp_path / "m.h5", "-q"),
                    "png", "label values [9] are beyond the dataset's")


# ---- train checks its inputs before the run folder exists -------------------------------------
def test_train_refuses_masks_of_another_class_order_before_making_the_run_folder(synth, tmp_path):
    root, _, masks = synth
    other = _with_classes(masks, tmp_path / "swapped.h5", lambda c: c.insert(1, c.pop(2)))
    for args, needle in (((other,), "differ from the dataset's"),
                         ((masks, "--weight-decay", -1), "weight_decay must be >= 0"),
                         ((masks, "--backbone", "resnet7"), "'resnet7' is not one of")):
        run = tmp_path / f"run{len(args)}{needle[:4]}"
        _one_line_error(invoke("train", "--data", root, "--masks", *args, "--out", run, "--no-dhr", "--max-steps", 1, "-q"),
                        needle)
        assert not run.exists()


# ---- options that used to be accepted and ignored --------------------------------------------
def test_options_that_cannot_apply_are_refused(synth, tmp_path):
    root, seeds, masks = synth
    prop = ["propagate", "--seeds", seeds, "--data", root, "--wss", root / "wss.h5", "--out", tmp_path / "m.h5",
            "--no-crf", "-q"]
    _one_line_error(invoke("seed", "--cams", root / "cams.h5", "--data", root, "--out", tmp_path / "s.h5",
                           "--sinkhorn-eps", "inf", "-q"), "eps must be > 0 and finite")
    _one_line_error(invoke(*prop, "--uss", root / "uss.h5", "--uss-weights", tmp_path / "w.pth"),
                    "is a store; --uss-weights")
    (tmp_path / "file").write_text("x")
    _one_line_error(invoke(*prop, "--uss", "lite0", "--features-dir", tmp_path / "file"), "is a file, expected a folder")
    _one_line_error(invoke("eval", "--pred", masks, "--data", root, "--gt-cache", tmp_path / "gt.h5", "-q"),
                    "--gt-cache is for COCO")
    out = tmp_path / "c.h5"
    _one_line_error(invoke("cams", "--data", root, "--wss", "lite0", "--train-head", "--save-head", out, "--out", out, "-q"),
                    "both --save-head and --out")
    assert not out.exists()


def test_warnings_are_one_line(synth, tmp_path):
    """In a real process (pytest records warnings itself): each warning is one `Warning:` line."""
    import subprocess
    import sys

    root, _, _ = synth
    r = subprocess.run([sys.executable, "-m", "dhr_cli", "seed", "--cams", str(root / "cams.h5"), "--data", str(root),
                        "--out", str(tmp_path / "s.h5"), "--no-crf", "-q", "--sinkhorn-max-iter", "1",
                        "--sinkhorn-tol", "1e-12"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith("seeds: ")]
    assert lines and all(line.startswith("Warning: Sinkhorn stopped at the iteration cap") for line in lines), r.stderr


def test_class_list_with_a_byte_order_mark(synth, tmp_path):
    from dhr_cli.io.datasets import open_dataset

    root, _, _ = synth
    data = tmp_path / "data"
    shutil.copytree(root, data)
    text = (data / "classes.txt").read_text()
    (data / "classes.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert open_dataset(data).classes == open_dataset(root).classes


def test_usage_errors_are_one_line_with_exit_2(tmp_path):
    """The installed entry point (main): a bad option value or a missing option is one line, exit 2."""
    import subprocess
    import sys

    for args, needle in ((["seed", "--batch-size", "0", "--cams", "c", "--data", "d", "--out", "o"],
                          "Invalid value for '--batch-size'"),
                         (["seed", "--cams", "c"], "Missing option"),
                         (["sed"], "No such command 'sed'")):
        r = subprocess.run([sys.executable, "-m", "dhr_cli", *args], capture_output=True, text=True)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], r.stderr
    r = subprocess.run([sys.executable, "-m", "dhr_cli", "seed", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--cams" in r.stdout


def test_export_killed_mid_run_leaves_its_folder_exportable(synth, tmp_path):
    """A kill -9 leaves the staging folder (never a half-filled DIR); the next export removes it."""
    import subprocess
    import sys

    _, _, masks = synth
    out = tmp_path / "png"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / f".dhr-export-{int(dead.stdout)}.tmp"
    stale.mkdir()
    (stale / "x.png").write_bytes(b"half")
    r = invoke("export", masks, "--out", out, "-q")
    assert r.exit_code == 0, r.output
    assert not stale.exists() and len(list(out.glob("*.png"))) == 6


@pytest.mark.parametrize("size", [[120], [-120, 160], "120x160", [12.5, 16]])
def test_malformed_image_size_attribute_is_one_line(synth, tmp_path, size):
    root, _, _ = synth
    cams = tmp_path / "cams.h5"
    shutil.copy(root / "cams.h5", cams)
    with h5py.File(cams, "r+") as f:
        item_id = sorted(f["items"])[2]
        f["items"][item_id]["cams"].attrs["image_size"] = size
    _one_line_error(invoke("seed", "--cams", cams, "--data", root, "--out", tmp_path / "s.h5", "--no-crf", "-q"),
                    str(cams), item_id, "expected [H, W] (two positive integers)")


def test_an_error_after_the_progress_bar_started_is_still_one_line(synth, tmp_path):
    """Without -q the bar is drawn; when the run stops on an error, only the error line is left."""
    root, _, _ = synth
    cams = tmp_path / "cams.h5"
    shutil.copy(root / "cams.h5", cams)
    with h5py.File(cams, "r+") as f:
        f["items"][sorted(f["items"])[-1]]["cams"].attrs["image_size"] = [-1, 5]
    _one_line_error(invoke("seed", "--cams", cams, "--data", root, "--out", tmp_path / "s.h5", "--no-crf"),
                    "expected [H, W]")


def test_an_image_or_mask_that_is_a_fifo_is_refused_not_waited_on(tmp_path):
    """A FIFO named <id>.png (or a device) blocked every reader forever: open() waits for a writer."""
    import os
    import threading

    from dhr_cli.errors import DatasetError
    from dhr_cli.io.datasets import open_dataset, read_index_png

    data = make_dataset(tmp_path / "data", n_images=3, seed=2)
    ds = open_dataset(data, "train")
    image = ds.image_path(ds.ids[0])
    image.unlink()
    os.mkfifo(image)
    mask = tmp_path / "mask.png"
    os.mkfifo(mask)
    got = {}

    def read(name, fn):
        try:
            fn()
        except DatasetError as e:
            got[name] = str(e)

    for name, fn in (("image", lambda: ds.image(ds.ids[0])), ("size", lambda: ds.image_size(ds.ids[0])),
                     ("mask", lambda: read_index_png(mask))):
        t = threading.Thread(target=read, args=(name, fn), daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive(), f"{name}: still waiting on the FIFO"
    assert got["image"] == got["size"] == f"{image}: the image is not a regular file"
    assert got["mask"] == f"{mask}: the mask is not a regular file"
