"""`dhr import labels`: IRN cls_labels.npy / ToCo cls_labels_onehot.npy -> labels.json the flat layout reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dhr_cli.cli import app
from dhr_cli.io.datasets import open_dataset

CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat"]
IDS = ["2007_000032", "2007_000039", "2011_003271"]


def _cli(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.output


def _flat(root: Path, classes=CLASSES) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    for i in IDS:
        Image.new("RGB", (8, 6)).save(root / "images" / f"{i}.png")
    return root


def _vectors(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in IDS:
        v = np.zeros(n, np.float32)
        v[rng.choice(n, rng.integers(1, n), replace=False)] = 1
        out[i] = v
    return out


@pytest.mark.parametrize("irn", [True, False])
def test_label_file_to_labels_json_read_by_flat(tmp_path, irn):
    root = _flat(tmp_path / "flat")
    vecs = _vectors(4)
    # IRN keys: int with the underscore dropped; ToCo: the id string
    data = {int(i.replace("_", "")): v for i, v in vecs.items()} if irn else dict(vecs)
    src = tmp_path / ("cls_labels.npy" if irn else "cls_labels_onehot.npy")
    np.save(src, data, allow_pickle=True)
    code, output = _cli("import", "labels", src, "--data", root, "--out", root / "labels.json")
    assert code == 0 and "3 images from 3 entries" in output, output
    written = json.loads((root / "labels.json").read_text())
    expected = {i: [CLASSES[j + 1] for j in np.flatnonzero(v)] for i, v in vecs.items()}  # index j -> class j+1
    assert written == expected
    ds = open_dataset(root)  # the flat layout now takes its image-level labels from the file
    for i, v in vecs.items():
        assert ds.labels(i) == (np.flatnonzero(v) + 1).tolist()


def test_no_background_dataset_and_coco_int_keys(tmp_path):
    pytest.importorskip("pycocotools")
    from tests.test_coco_layouts import make_coco

    root = make_coco(tmp_path / "coco")  # classes background, person, car, dog; ids COCO_train2014_<12 digits>
    np.save(tmp_path / "l.npy", {9: np.array([0, 1, 1.0]), 25: np.array([1, 0, 0.0]), 30: np.zeros(3)}, allow_pickle=True)
    code, output = _cli("import", "labels", tmp_path / "l.npy", "--data", root, "--out", tmp_path / "labels.json")
    assert code == 0, output
    assert json.loads((tmp_path / "labels.json").read_text()) == {
        "COCO_train2014_000000000009": ["car", "dog"], "COCO_train2014_000000000025": ["person"],
        "COCO_train2014_000000000030": []}
    # a dataset without background: vector index i is class i
    nobg = _flat(tmp_path / "nobg", ["wall", "floor"])
    np.save(tmp_path / "n.npy", {i: np.array([0, 1.0]) for i in IDS}, allow_pickle=True)
    code, output = _cli("import", "labels", tmp_path / "n.npy", "--data", nobg, "--out", tmp_path / "n.json")
    assert code == 0 and set(map(tuple, json.loads((tmp_path / "n.json").read_text()).values())) == {("floor",)}


def test_bad_label_files(tmp_path):
    root = _flat(tmp_path / "flat")
    out = tmp_path / "labels.json"
    np.save(tmp_path / "k21.npy", _vectors(20), allow_pickle=True)
    code, output = _cli("import", "labels", tmp_path / "k21.npy", "--data", root, "--out", out)
    assert code != 0 and "k21.npy: label vectors have 20 entries but" in output and "has 4 foreground classes" in output
    assert "Traceback" not in output and not out.exists()
    np.save(tmp_path / "other.npy", {"COCO_val2014_000000000042": np.ones(4)}, allow_pickle=True)
    code, output = _cli("import", "labels", tmp_path / "other.npy", "--data", root, "--out", out)
    assert code != 0 and "other.npy: none of its 1 keys names an image" in output and not out.exists()
    part = {k: v for k, v in _vectors(4).items() if k != "2011_003271"}
    np.save(tmp_path / "part.npy", part, allow_pickle=True)
    code, output = _cli("import", "labels", tmp_path / "part.npy", "--data", root, "--out", out)
    assert code != 0 and "no labels for 1 of the split's 3 images, first 2011_003271" in output and not out.exists()
    code, output = _cli("import", "labels", tmp_path / "part.npy", "--data", root, "--out", out, "--missing", "skip")
    assert code == 0 and "left out: 2011_003271" in output and len(json.loads(out.read_text())) == 2
    code, output = _cli("import", "labels", tmp_path / "part.npy", "--data", root, "--out", out)
    assert code != 0 and "already exists; pass --overwrite" in output
    (tmp_path / "evil.npy").write_bytes(b"not a numpy file")
    code, output = _cli("import", "labels", tmp_path / "evil.npy", "--data", root, "--out", out, "--overwrite")
    assert code != 0 and "evil.npy: not a readable .npy file" in output and "Traceback" not in output


def test_labels_json_that_cannot_be_written_is_named_and_leaves_nothing_behind(tmp_path, monkeypatch):
    """A full disk (or `ulimit -f`) used to give "Error: File too large" without the file's name, and to
    leave a half-written OUT.partial that made the next run ask for a --resume that import labels lacks."""
    import errno

    root = _flat(tmp_path / "flat")
    src, out = tmp_path / "cls_labels.npy", tmp_path / "labels.json"
    np.save(src, _vectors(4), allow_pickle=True)
    real_write = Path.write_text

    def cut_off(self, text, *args, **kwargs):
        real_write(self, text[:10], *args, **kwargs)  # the file is cut off, as RLIMIT_FSIZE does
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(Path, "write_text", cut_off)
    code, output = _cli("import", "labels", src, "--data", root, "--out", out)
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith(f"Error: {out}: could not be written (File too large)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cls_labels.npy", "flat"]  # no partial, temp or lock
    monkeypatch.undo()
    code, output = _cli("import", "labels", src, "--data", root, "--out", out)
    assert code == 0 and len(json.loads(out.read_text())) == 3, output


def test_a_second_writer_of_the_same_labels_json_is_refused(tmp_path):
    from tests.helpers import live_writer_lock

    root = _flat(tmp_path / "flat")
    src, out = tmp_path / "cls_labels.npy", tmp_path / "labels.json"
    np.save(src, _vectors(4), allow_pickle=True)
    with live_writer_lock(out):
        code, output = _cli("import", "labels", src, "--data", root, "--out", out)
        assert code == 1 and "is being written by PID" in output and not out.exists(), output
    code, output = _cli("import", "labels", src, "--data", root, "--out", out)  # the stale lock is taken over
    assert code == 0 and out.exists() and not (tmp_path / "labels.json.lock").exists(), output


@pytest.mark.parametrize("value", [-1.0, 2.0, 0.7, 1e30])
def test_label_vectors_of_scores_not_labels_are_refused(tmp_path, value):
    """Vectors of other than 0/1 (scores, logits, -1 for 'absent') were thresholded at 0.5 without a word:
    a file of -1/0 entries gave every image no label at all, one of scores invented labels."""
    root = _flat(tmp_path / "flat")
    out = tmp_path / "labels.json"
    vecs = _vectors(4)
    vecs[IDS[1]][0] = value
    np.save(tmp_path / "scores.npy", vecs, allow_pickle=True)
    code, output = _cli("import", "labels", tmp_path / "scores.npy", "--data", root, "--out", out)
    assert code == 1 and f"scores.npy: the vector of '{IDS[1]}' holds {value:g}; 0/1 entries expected" in output
    assert "Traceback" not in output and not out.exists()


def test_a_stopped_import_labels_does_not_advise_the_resume_it_cannot_use(tmp_path, monkeypatch):
    """`dhr import` has --resume for stores, but a labels.json is written whole: a stop said "rerun with
    --resume to continue", which then refuses a missing OUT."""
    from dhr_cli.io import outputs
    from dhr_cli.io.progress import Terminated

    root = _flat(tmp_path / "flat")
    src, out = tmp_path / "cls_labels.npy", tmp_path / "labels.json"
    np.save(src, _vectors(4), allow_pickle=True)

    def stopped(*args, **kwargs):
        raise Terminated()

    monkeypatch.setattr(outputs, "write_text_atomic", stopped)
    code, output = _cli("import", "labels", src, "--data", root, "--out", out)
    assert code == 143 and "terminated" in output and "--resume" not in output and "rerun it" in output, output
    assert not out.exists()
