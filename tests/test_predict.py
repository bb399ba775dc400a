"""`dhr predict`: multi-scale + flip inference, class filter, masks store; the trained net as a source."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from dhr_cli.config import PredictConfig, TrainConfig

HAS_CRF = importlib.util.find_spec("dhr_cli.kernels.crf") is not None


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from dhr_cli.pipeline.train import run_train
    from dhr_cli.testing.synthetic import make_dataset

    root = tmp_path_factory.mktemp("pred")
    data = make_dataset(root / "data", n_images=6, seed=2, stores=False)
    cfg = TrainConfig(backbone="resnet18", decoder_channels=16, crop_size=64, scale_range=(64, 96), batch_size=2,
                      epochs=1, num_workers=0, dhr=False, val_split=None, ema_decay=0.9)
    run_train(cfg, data, data / "masks", root / "run", quiet=True, max_steps=2)
    return data, root / "run"


def test_flip_averaging_is_flip_equivariant(trained):
    from dhr_cli.models.deeplab import load_trained
    from dhr_cli.pipeline.predict import multiscale_outputs

    _, run = trained
    net, meta = load_trained(run)
    assert meta["spec"]["backbone"] == "resnet18" and meta["classes"][0] == "background"
    x = torch.randn(1, 3, 48, 64)
    a = multiscale_outputs(net, x, (1.0, 0.5), flip=True, cams=True, features=True)
    b = multiscale_outputs(net, x.flip(-1), (1.0, 0.5), flip=True, cams=True, features=True)
    torch.testing.assert_close(a["probs"], b["probs"].flip(-1), atol=1e-5, rtol=1e-4)
    assert a["probs"].shape == (1, 6, 48, 64)
    torch.testing.assert_close(a["probs"].sum(1), torch.ones(1, 48, 64))
    assert a["cams"].shape == (1, 5, 3, 4) and a["cams"].amax((2, 3)).max() <= 1 + 1e-6
    assert a["C5"].shape == (1, 512, 3, 4)


def test_class_filter_keeps_background_and_confident_classes():
    from dhr_cli.pipeline.predict import class_filter

    probs = torch.zeros(2, 4, 3, 3)
    probs[:, 0] = 0.9
    probs[0, 2, 0, 0] = 0.5  # confident somewhere: kept
    probs[0, 3] = 0.04  # never above 0.05: dropped
    probs[1, 0] = 0.01
    probs[1, 1] = 0.03  # nothing above the threshold but background (always kept)
    keep = class_filter(probs, 0.05, always=0)
    assert keep.tolist() == [[True, False, True, False], [True, False, False, False]]
    keep = class_filter(probs, 0.05, always=None)
    assert keep[1].tolist() == [False, True, False, False]  # the most probable class, never none
    allowed = torch.tensor([[True, True, False, True], [True, True, True, True]])
    assert not class_filter(probs, 0.05, always=0, allowed=allowed)[0, 2]


def test_run_predict_writes_masks_and_resumes(trained, tmp_path):
    from dhr_cli.io.datasets import open_dataset
    from dhr_cli.io.store import open_store
    from dhr_cli.pipeline.predict import run_predict

    data, run = trained
    cfg = PredictConfig(scales=(1.0, 0.5), use_crf=False, device="cpu")
    result = run_predict(cfg, run, data, tmp_path / "pred.h5", split="val", quiet=True)
    ds = open_dataset(data, "val")
    assert result.written == len(ds)
    with open_store(tmp_path / "pred.h5", expect="masks") as s:
        assert s.ids == sorted(ds.ids)
        for item_id in s.ids:
            mask = s.read(item_id).mask
            assert mask.shape == ds.image_size(item_id)
            assert mask.max() < len(ds.classes)
    again = run_predict(cfg, run, data, tmp_path / "pred.h5", split="val", quiet=True, resume=True)
    assert again.written == 0 and again.skipped == len(ds)


@pytest.mark.skipif(not HAS_CRF, reason="dhr_cli.kernels.crf not built yet")
def test_run_predict_with_crf(trained, tmp_path):
    from dhr_cli.pipeline.predict import run_predict

    data, run = trained
    cfg = PredictConfig(scales=(1.0,), flip=False, device="cpu")
    assert run_predict(cfg, run, data, tmp_path / "crf.h5", split="val", quiet=True).written > 0


def test_cli_predict_and_bad_model(trained, tmp_path):
    from typer.testing import CliRunner

    import dhr_cli.cli.cmd_predict  # noqa: F401  (registers the command)
    from dhr_cli.cli import app

    data, run = trained
    runner = CliRunner()
    res = runner.invoke(app, ["predict", "--model", str(run), "--data", str(data), "--split", "val",
                              "--out", str(tmp_path / "m.h5"), "--scales", "1.0", "--no-crf", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "Wrote 2 masks" in res.output
    res = runner.invoke(app, ["predict", "--model", str(tmp_path), "--data", str(data), "--out", str(tmp_path / "x.h5")])
    assert res.exit_code == 1
    assert "is it a `dhr train` run folder" in res.output


def test_cams_from_a_trained_run_closes_the_loop(trained, tmp_path):
    """`dhr cams --wss RUN_DIR`: the trained network's CAMs (labelled classes) and C4/C5 features."""
    from typer.testing import CliRunner

    from dhr_cli.cli import app
    from dhr_cli.io.datasets import open_dataset
    from dhr_cli.io.store import open_store

    data, run = trained
    out = tmp_path / "cams.h5"
    res = CliRunner().invoke(app, ["cams", "--data", str(data), "--split", "train", "--wss", str(run), "--scales", "1.0",
                                   "--device", "cpu", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    ds = open_dataset(data, "train")
    with open_store(out, expect="cams") as s:
        assert s.attrs["source"] == "dhr" and s.ids == sorted(i for i in ds.ids if ds.labels(i))
        item = s.read(s.ids[0])
        assert item.labels.tolist() == ds.labels(s.ids[0]) and item.cams.shape[0] == len(item.labels)
        assert item.features.shape[0] > 0
