"""Two CPU processes (torchrun, gloo) train like one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dhr_cli.cli import app

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="gloo backend not available")

ARGS = ["--split", "train", "--no-dhr", "--backbone", "resnet18", "--decoder-channels", "16", "--crop-size", "64",
        "--scale-min", "64", "--scale-max", "96", "--batch-size", "4", "--epochs", "2", "--lr", "0.01",
        "--freeze-bn", "--no-dropout", "--workers", "0", "--log-every", "1", "--val-split", "none", "--device", "cpu",
        "--seed", "5", "--quiet"]


def _losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "step"]


def test_two_processes_match_one(tmp_path):
    from dhr_cli.testing.synthetic import make_dataset

    data = make_dataset(tmp_path / "data", n_images=10, seed=1, stores=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "100"}
    common = ["--data", str(data), "--masks", str(data / "masks"), *ARGS]
    # The one-process run in this process (a fresh interpreter would only add torch's start-up).
    one = CliRunner().invoke(app, ["train", *common, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "dhr_cli", "train", *common, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 4  # 8 training images, global batch 4 (drop last), 2 epochs
    assert b == pytest.approx(a, rel=2e-3)
    assert a[0] != pytest.approx(a[-1], rel=1e-3)  # the weights did change between steps
    saved = json.loads((tmp_path / "two" / "config.json").read_text())
    assert saved["world_size"] == 2
