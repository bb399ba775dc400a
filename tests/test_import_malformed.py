"""`dhr import`: malformed peer files are refused in one line naming the file, and leave no output behind.

Every importer's arrays pass one gate (pipeline/imports.py `_numbers` / `_maps`): real numbers only, one
shape for every class, (K, h, w) with no empty dimension, finite, within float32; and an imported CAM's
class keys must be the image's labels (the cams store contract, as `dhr seed` checks it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import dhr_cli.cli.cmd_import  # noqa: F401  (registers `dhr import`)
from dhr_cli.cli import app
from dhr_cli.io.store import open_store

CLASSES = ["background", "person", "cat", "dog", "car", "bus"]
LABELS = {"a_0": ["cat", "dog", "car"], "a_1": ["cat", "dog"]}  # keys (0-based foreground ids): [1, 2, 3], [1, 2]
H, W = 6, 8


def _keys(i: str) -> np.ndarray:
    return np.array([CLASSES.index(c) - 1 for c in LABELS[i]], np.int64)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("malformed") / "d"
    (root / "images").mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "labels.json").write_text(json.dumps(LABELS))
    for i in LABELS:
        Image.new("RGB", (W, H)).save(root / "images" / f"{i}.png")
    return root


def _good(fmt: str, i: str) -> dict:
    keys = _keys(i)
    cams = np.random.default_rng(0).random((len(keys), H, W)).astype(np.float32)
    if fmt == "mctformer":
        return {int(k): c for k, c in zip(keys, cams)}
    if fmt == "irn":
        return {"keys": torch.from_numpy(keys), "high_res": torch.from_numpy(cams)}
    return {"keys": keys, "attn_highres": cams.astype(np.float16)}


def _src(tmp_path: Path, fmt: str, first) -> Path:
    """A folder of peer files: `first` for image a_0 (the first one imported), good ones for the rest."""
    src = tmp_path / "src"
    src.mkdir()
    for i in LABELS:
        if i == "a_0":
            first = first(fmt, i) if callable(first) else first
            if fmt == "dhr-pt":
                torch.save(first, src / f"{i}.pt")
            else:
                np.save(src / f"{i}.npy", first, allow_pickle=True)
        elif fmt == "dhr-pt":
            torch.save(torch.rand(8, 3, 4), src / f"{i}.pt")
        else:
            np.save(src / f"{i}.npy", _good(fmt, i), allow_pickle=True)
    return src


def _refused(tmp_path: Path, args: list, out: Path, *needles: str) -> str:
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    for n in needles:
        assert n in lines[0], r.output
    assert "Traceback" not in r.output and "Warning" not in r.output, r.output
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(out.name)]
    assert not leftovers, leftovers
    return lines[0]


def _import(tmp_path, root, fmt, first, *needles) -> str:
    src = _src(tmp_path, fmt, first)
    out = tmp_path / "o.h5"
    return _refused(tmp_path, ["import", fmt, src, "--data", root, "--out", out, "-q"], out,
                    str(src / "a_0."), *needles)


CASES = {
    # 1. text maps: np.asarray(float32) of strings raised ValueError
    "mctformer text maps": ("mctformer", lambda f, i: {int(k): np.array(["a", "b"]) for k in _keys(i)}, "real numbers"),
    # 2. a ragged list of maps: 'inhomogeneous shape'
    "clip-es ragged maps": ("clip-es", lambda f, i: {"keys": [1, 2, 3], "attn_highres": [
        np.ones((H, W)), np.ones((H, W + 1)), np.ones((H, W))]}, "differ in shape"),
    # 4. empty / zero-size maps that the store's readers refuse
    "irn no keys": ("irn", {"keys": np.zeros(0, np.int64), "high_res": np.zeros((0, H, W))}, "no CAMs"),
    "mctformer empty dict": ("mctformer", {}, "no CAMs"),
    "mctformer zero-height maps": ("mctformer", lambda f, i: {int(k): np.zeros((0, W)) for k in _keys(i)}, "empty"),
    "dhr-pt zero-size tensor": ("dhr-pt", torch.zeros(8, 0, 14, dtype=torch.float16), "empty"),
    "irn keys not the image's labels": ("irn", {"keys": np.array([0, 4]), "high_res": np.ones((2, H, W))},
                                        "do not match the labels of image a_0"),
    "clip-es fewer maps than labels": ("clip-es", {"keys": np.array([1, 2]), "attn_highres": np.ones((2, H, W))},
                                       "no map for car"),
    # 5. finite float64 beyond float32: not "NaN or infinite"
    "clip-es float64 beyond float32": ("clip-es", lambda f, i: {"keys": _keys(i), "attn_highres": np.full(
        (3, H, W), 1e300)}, "beyond float32 range"),
    "dhr-pt float64 beyond float32": ("dhr-pt", torch.full((8, 3, 4), 1e300, dtype=torch.float64),
                                      "beyond float32 range"),
    # complex values were cast to real with a warning, the imaginary part dropped
    "mctformer complex maps": ("mctformer", lambda f, i: {int(k): np.ones((H, W), np.complex128) for k in _keys(i)},
                               "complex"),
    "dhr-pt complex features": ("dhr-pt", torch.ones(8, 3, 4, dtype=torch.complex64), "complex"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_peer_file_is_one_line(root, tmp_path, case):
    fmt, first, needle = CASES[case]
    line = _import(tmp_path, root, fmt, first, needle)
    if "float32" in needle:
        assert "NaN" not in line


def test_bfloat16_irn_tensors_import(root, tmp_path):
    """numpy has no bfloat16: such tensors (IRN files hold torch tensors) are read through float32."""
    src = _src(tmp_path, "irn", lambda f, i: {"keys": torch.from_numpy(_keys(i)),
                                              "high_res": torch.full((3, H, W), 0.5, dtype=torch.bfloat16)})
    out = tmp_path / "o.h5"
    r = CliRunner().invoke(app, [str(a) for a in ["import", "irn", src, "--data", root, "--out", out, "-q"]])
    assert r.exit_code == 0, r.output
    with open_store(out, expect="cams") as s:
        item = s.read("a_0")
        assert item.labels.tolist() == [2, 3, 4]
        np.testing.assert_array_equal(item.cams, np.full((3, H, W), 0.5, np.float32))


@pytest.mark.parametrize("vectors, needle", [
    (np.zeros(5).astype(str), "real numbers"),  # UFuncTypeError
    ([None] * 5, "None"),  # TypeError
    (np.full(5, np.nan), "NaN"),  # written as {"a_0": []}
], ids=["text", "none", "nan"])
def test_malformed_label_vectors_are_one_line(root, tmp_path, vectors, needle):
    src = tmp_path / "cls_labels.npy"
    np.save(src, {"a_0": vectors, "a_1": np.array([0, 1, 1, 0, 0], np.float32)}, allow_pickle=True)
    out = tmp_path / "labels.json"
    _refused(tmp_path, ["import", "labels", src, "--data", root, "--out", out], out, str(src), "'a_0'", needle)
