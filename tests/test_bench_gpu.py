"""`make bench-gpu` in its CPU-only tiny mode (so the GPU bench cannot rot), and its checks failing
when the device's results differ."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import gpu  # noqa: E402

from dhr_cli.io.store import create_store  # noqa: E402

STAGES = {"cams-vit", "cams-resnet50", "seed", "propagate-no-crf", "propagate-crf", "eval", "train"}


def test_tiny_cpu_run_covers_every_stage(tmp_path):
    assert gpu.main(["--device", "cpu", "--tiny", "--images", "3", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["device"] == "cpu" and result["ok"]
    assert {r["stage"] for r in result["stages"]} == STAGES
    for row in result["stages"]:
        assert row["ok"] and row["cpu_img_s"] > 0, row
    assert not (tmp_path / "work").exists()  # its stores are removed


def _store(path: Path, kind: str, arrays: dict) -> Path:
    with create_store(path, kind, ["background", "a"], provenance={"command": "test"}) as w:
        for item, a in arrays.items():
            attrs = {} if kind == "masks" else {"features": {"image_size": [40, 40]}}
            w.write(item, a, attrs)
    return path


def test_mask_check_fails_below_the_agreement(tmp_path):
    rng = np.random.default_rng(0)
    ref = {f"i{k}": {"mask": rng.integers(0, 2, (20, 20)).astype(np.uint8)} for k in range(2)}
    bad = {k: {"mask": v["mask"].copy()} for k, v in ref.items()}
    bad["i0"]["mask"][:4] ^= 1  # 4 rows of 40 flipped: 10 % of the pixels
    a, b = _store(tmp_path / "a.h5", "masks", ref), _store(tmp_path / "b.h5", "masks", bad)
    assert gpu.compare_masks(a, a, gpu.MIN_AGREE)["ok"]
    check = gpu.compare_masks(a, b, gpu.MIN_AGREE)
    assert not check["ok"] and "0.9000" in check["value"]
    assert gpu.compare_masks(a, b, 0.85)["ok"]


def test_float_check_fails_beyond_the_tolerance(tmp_path):
    rng = np.random.default_rng(1)
    f = rng.normal(0, 1, (8, 5, 5)).astype(np.float32)
    a = _store(tmp_path / "a.h5", "features", {"x": {"features": f}})
    near = _store(tmp_path / "n.h5", "features", {"x": {"features": f * (1 + 5e-3)}})
    far = f.copy()
    far[0, 0, 0] += 0.05 * np.abs(f).max()  # one value off by 5 % of the maximum
    b = _store(tmp_path / "b.h5", "features", {"x": {"features": far}})
    assert gpu.compare_float(a, near, ("features",), gpu.TOL_FP32)["ok"]
    assert not gpu.compare_float(a, b, ("features",), gpu.TOL_FP32)["ok"]
    flipped = _store(tmp_path / "c.h5", "features", {"x": {"features": -f}})
    assert not gpu.compare_float(a, flipped, ("features",), (10.0, 10.0), min_cosine=0.99)["ok"]
