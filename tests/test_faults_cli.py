"""Kill-and-resume from the command line for cams, predict (one process and torchrun), import and refine:
SIGKILL once some items are in OUT.partial, then `--resume` in a fresh process must give a store equal to
an uninterrupted run. The commands run through tests/fault_cli.py, which pauses before each item so that
tiny runs can be killed between items."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from dhr_cli.io.datasets import open_dataset
from dhr_cli.testing.synthetic import make_dataset
from tests.helpers import free_port, make_flat
from tests.test_faults import _kill_mid_run, _same_store

pytestmark = pytest.mark.slow
SLOW = {"DHR_TEST_ITEM_DELAY": "0.4"}


def _run(args, torchrun=False):
    head = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
            "-m", "tests.fault_cli"] if torchrun else [sys.executable, "-m", "tests.fault_cli"]
    r = subprocess.run(head + [str(a) for a in args], capture_output=True, text=True, timeout=240,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def _run_here(args):
    """The uninterrupted reference run, in this process (a fresh interpreter only adds torch's start-up) and
    on one thread like the subprocesses, so that its store is bit for bit theirs."""
    from typer.testing import CliRunner

    import tests.fault_cli  # noqa: F401  (registers the vit_tiny SAM)
    from dhr_cli.cli import app

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = CliRunner().invoke(app, [str(a) for a in args])
    finally:
        torch.set_num_threads(threads)
    assert r.exit_code == 0, r.output[-2000:]


def _kill_then_resume(tmp_path, build, n_items, seed, torchrun=False, clean=None):
    """Clean run to clean.h5 (or CLEAN, a store the uninterrupted command wrote); SIGKILLed run to out.h5,
    then --resume; the two stores must be equal."""
    out = tmp_path / "out.h5"
    if clean is None:
        clean = tmp_path / "clean.h5"
        _run(build(clean), torchrun) if torchrun else _run_here(build(clean))
    partial = tmp_path / ("out.rank0-of-2.h5.partial" if torchrun else "out.h5.partial")
    code, err = _kill_mid_run(build(out), partial, n_items, signal.SIGKILL, seed=seed, torchrun=torchrun,
                              module="tests.fault_cli", env=SLOW)
    if not torchrun:
        assert code == -9, err[-1500:]
        assert (tmp_path / "out.h5.lock").exists() and not out.exists()
    r = _run([*build(out), "--resume"], torchrun)
    assert "damaged" not in r.stderr, r.stderr[-1500:]
    if not torchrun:
        assert "stale lock" in r.stderr, r.stderr[-1500:]
    _same_store(clean, out)
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out"))
    assert left == ["out.h5"], left  # no partial, shard or lock left behind


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("fcli") / "d", n_images=6, seed=2, stores=False)


def test_cams_uss_lite0(data, tmp_path):
    n = len(open_dataset(data))
    _kill_then_resume(tmp_path, lambda o: ["cams", "--data", data, "--uss", "lite0", "--scales", "1.0",
                                           "--device", "cpu", "--out", o, "--quiet"], n, seed=4)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    from dhr_cli.config import TrainConfig
    from dhr_cli.pipeline.train import run_train

    run = tmp_path_factory.mktemp("fcli_run") / "run"
    cfg = TrainConfig(backbone="resnet18", decoder_channels=16, crop_size=64, scale_range=(64, 96), batch_size=2,
                      epochs=1, num_workers=0, dhr=False, val_split=None, ema_decay=0.9)
    run_train(cfg, data, data / "masks", run, quiet=True, max_steps=2)
    return run


def _predict(data, run):
    return lambda o: ["predict", "--model", run, "--data", data, "--out", o, "--scales", "1.0", "--no-crf",
                      "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def predicted(data, trained, tmp_path_factory):
    """One uninterrupted `predict` in one process: what the killed and resumed runs, one process or two
    under torchrun, must give (each rank predicts its images exactly as one process does)."""
    clean = tmp_path_factory.mktemp("fcli_pred") / "clean.h5"
    _run_here(_predict(data, trained)(clean))
    return clean


def test_predict(data, trained, predicted, tmp_path):
    _kill_then_resume(tmp_path, _predict(data, trained), len(open_dataset(data)), seed=5, clean=predicted)


def test_predict_under_torchrun(data, trained, predicted, tmp_path):
    _kill_then_resume(tmp_path, _predict(data, trained), len(open_dataset(data)) // 2, seed=6, torchrun=True,
                      clean=predicted)


def test_import(data, tmp_path):
    ds = open_dataset(data)
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in ds.ids:
        h, w = ds.image_size(i)
        keys = np.asarray(ds.labels(i)) - 1
        np.save(src / f"{i}.npy", {"keys": keys, "attn_highres": rng.random((len(keys), h, w)).astype(np.float16)})
    _kill_then_resume(tmp_path, lambda o: ["import", "clip-es", src, "--data", data, "--out", o, "--quiet"],
                      len(ds), seed=7)


def test_refine(tmp_path):
    from dhr_cli.io.provenance import make_provenance
    from dhr_cli.io.store import create_store
    from dhr_cli.testing.sam import tiny_sam

    flat = make_flat(tmp_path / "flat", items={f"i{k}": ((1,), (1, 2), (2,))[k % 3] for k in range(5)})
    ds = open_dataset(flat)
    masks, weights = tmp_path / "masks.h5", tmp_path / "tiny_sam.pth"
    with create_store(masks, "masks", ds.classes, provenance=make_provenance("test")) as w:
        for i in ds.ids:
            w.write(i, {"mask": ds.gt(i)})
    torch.save(tiny_sam(seed=1).state_dict(), weights)
    _kill_then_resume(tmp_path, lambda o: ["refine", "--masks", masks, "--data", flat, "--sam", "vit_tiny",
                                           "--sam-weights", weights, "--accept-iou", "0", "--device", "cpu",
                                           "--out", o, "--quiet"], len(ds), seed=8)
