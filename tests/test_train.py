"""`dhr train`: joint augmentation, the network, loss going down, exact resume, logs and checkpoints."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from dhr_cli.config import TrainConfig
from dhr_cli.pipeline.augment import (
    Geometry,
    identity_geometry,
    sample_geometry,
    valid_region,
    warp_features,
    warp_image,
    warp_mask,
)

TINY = TrainConfig(backbone="resnet18", decoder_channels=16, crop_size=64, scale_range=(64, 96), batch_size=2,
                   epochs=2, lr=0.01, num_workers=0, log_every=1, val_size=64, dhr=False, seed=3,
                   val_split=None)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from dhr_cli.testing.synthetic import make_dataset

    return make_dataset(tmp_path_factory.mktemp("synth"), n_images=8, seed=0)


# ---- augmentation -------------------------------------------------------------------------------
def test_identity_geometry_keeps_feature_map():
    feats = torch.randn(5, 7, 9)
    g = identity_geometry((56, 72))
    torch.testing.assert_close(warp_features(feats, g, (7, 9)), feats, atol=1e-5, rtol=0)


def test_flip_geometry_flips_feature_map():
    feats = torch.randn(3, 6, 8)
    g = Geometry((48, 64), (48, 64), True, (0, 0), (48, 64))
    torch.testing.assert_close(warp_features(feats, g, (6, 8)), feats.flip(-1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", range(6))
def test_features_follow_the_image(seed):
    """A feature map holding each cell's x (and y) coordinate, warped, matches the warped image's coordinates."""
    rng = np.random.default_rng(seed)
    h, w = 96, 128
    g = sample_geometry(rng, (h, w), crop=80, scale_range=(60, 200), flip=True)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # Image channels hold the coordinates (scaled to fit uint8); features the same at stride 8.
    image = np.stack([xx * 255 / (w - 1), yy * 255 / (h - 1), np.zeros_like(xx)], -1).round().astype(np.uint8)
    fy, fx = np.mgrid[0:h // 8, 0:w // 8].astype(np.float32)
    feats = torch.from_numpy(np.stack([((fx + 0.5) * 8 - 0.5) * 255 / (w - 1), ((fy + 0.5) * 8 - 0.5) * 255 / (h - 1)]))
    cell = 8
    warped_img = warp_image(image, g).astype(np.float32)
    valid = valid_region(g)
    grid = (80 // cell, 80 // cell)
    warped = warp_features(feats, g, grid).numpy()
    # Compare at cells fully inside the image and away from the border (bilinear extrapolation aside).
    for a in range(grid[0]):
        for b in range(grid[1]):
            block = valid[a * cell:(a + 1) * cell, b * cell:(b + 1) * cell]
            if not block.all():
                continue
            img_mean = warped_img[a * cell:(a + 1) * cell, b * cell:(b + 1) * cell, :2].mean((0, 1))
            if (img_mean < 20).any() or (img_mean > 235).any():
                continue
            np.testing.assert_allclose(warped[:, a, b], img_mean, atol=8)


def test_mask_padding_is_ignore_and_matches_valid_region():
    g = Geometry((40, 50), (30, 38), False, (-10, -5), (64, 64))  # smaller than the crop: padded
    mask = np.full((40, 50), 3, np.uint8)
    out = warp_mask(mask, g)
    valid = valid_region(g)
    assert (out[valid] == 3).all() and (out[~valid] == 255).all()
    assert valid.sum() == 30 * 38


# ---- network ------------------------------------------------------------------------------------
@pytest.mark.parametrize("output_stride", [8, 16])
def test_network_shapes(output_stride):
    from dhr_cli.models.deeplab import DHRNet, NetworkSpec

    net = DHRNet(NetworkSpec("resnet18", 6, 5, output_stride=output_stride, decoder_channels=16))
    out = net(torch.randn(2, 3, 64, 96), with_features=True)
    assert out["logits"].shape == (2, 6, 16, 24)
    assert out["cams"].shape == (2, 5, 4, 6)
    assert out["C5"].shape[2:] == (64 // output_stride, 96 // output_stride)


def test_backbone_weights_load_strictly_and_reject_others(tmp_path):
    from torchvision.models import resnet18

    from dhr_cli.errors import CheckpointError
    from dhr_cli.models.deeplab import NetworkSpec, build_network

    ref = resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    net = build_network(NetworkSpec("resnet18", 3, 2, decoder_channels=16), tmp_path / "r18.pth")
    torch.testing.assert_close(net.backbone.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    with pytest.raises(CheckpointError, match="torchvision resnet50 backbone.*missing keys"):
        build_network(NetworkSpec("resnet50", 3, 2, decoder_channels=16), tmp_path / "r18.pth")


# ---- training -----------------------------------------------------------------------------------
def _steps(run_dir):
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "step"]


def test_plain_training_lowers_loss_and_writes_the_run(dataset, tmp_path):
    from dhr_cli.pipeline.train import run_train

    cfg = replace(TINY, epochs=3, val_split="auto")
    result = run_train(cfg, dataset, dataset / "masks", tmp_path / "run", split="train", quiet=True)
    losses = [r["loss"] for r in result.history]
    assert len(losses) == 3 and losses[-1] < losses[0]
    run = tmp_path / "run"
    saved = json.loads((run / "config.json").read_text())
    assert saved["config"]["backbone"] == "resnet18" and saved["inputs"]["split"] == "train"
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "model.pt").is_file()
    assert len((run / "epochs.csv").read_text().splitlines()) == 4
    assert 0 <= result.history[-1]["val_miou"] <= 1  # the synthetic dataset has a val split with GT
    assert len(_steps(run)) == 9


def test_resume_continues_exactly(dataset, tmp_path):
    from dhr_cli.errors import CheckpointError, InputError
    from dhr_cli.pipeline.train import run_train

    straight = run_train(TINY, dataset, dataset / "masks", tmp_path / "a", split="train", quiet=True)
    run_train(TINY, dataset, dataset / "masks", tmp_path / "b", split="train", quiet=True, max_steps=3)  # "killed" after epoch 1
    with pytest.raises(InputError, match="already holds a run"):
        run_train(TINY, dataset, dataset / "masks", tmp_path / "b", split="train", quiet=True)
    with pytest.raises(CheckpointError, match="lr"):
        run_train(replace(TINY, lr=0.1), dataset, dataset / "masks", tmp_path / "b", split="train", quiet=True, resume=True)
    resumed = run_train(TINY, dataset, dataset / "masks", tmp_path / "b", split="train", quiet=True, resume=True)
    assert [r["loss"] for r in resumed.history] == pytest.approx([r["loss"] for r in straight.history], rel=1e-5)
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a["ema"][k], b["ema"][k], atol=1e-5, rtol=1e-4)


def test_resume_after_the_masks_changed_is_refused(dataset, tmp_path):
    """A resumed run repeats the uninterrupted one only on the same masks: a PNG of --masks DIR edited
    between the kill and --resume was trained on without a word (the check compared paths only)."""
    import os
    import shutil

    from dhr_cli.errors import CheckpointError
    from dhr_cli.pipeline.train import run_train

    masks = tmp_path / "masks"
    shutil.copytree(dataset / "masks", masks)
    run_train(TINY, dataset, masks, tmp_path / "r", split="train", quiet=True, max_steps=3)  # "killed" after epoch 1
    png = sorted(masks.iterdir())[0]
    st = png.stat()
    os.utime(png, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(CheckpointError, match=r"--masks \(changed since the run began\)"):
        run_train(TINY, dataset, masks, tmp_path / "r", split="train", quiet=True, resume=True)
    os.utime(png, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert run_train(TINY, dataset, masks, tmp_path / "r", split="train", quiet=True, resume=True).history


def test_bad_inputs_fail_before_the_run_folder_is_made(dataset, tmp_path):
    from dhr_cli.errors import InputError
    from dhr_cli.pipeline.train import run_train

    with pytest.raises(InputError, match="needs USS features"):
        run_train(replace(TINY, dhr=True), dataset, dataset / "masks", tmp_path / "r", split="train")
    with pytest.raises(InputError, match="no such store or folder"):
        run_train(TINY, dataset, tmp_path / "nope", tmp_path / "r", split="train")
    (tmp_path / "few").mkdir()
    with pytest.raises(InputError, match="have no mask"):
        run_train(TINY, dataset, tmp_path / "few", tmp_path / "r", split="train")
    assert not (tmp_path / "r").exists()


def test_online_regeneration_plumbing(dataset, tmp_path, monkeypatch):
    """The regenerator hands the kernels the labelled live CAMs, warped USS maps and C4/C5, and trains on their output."""
    import sys
    import types

    from dhr_cli.io.datasets import open_dataset
    from dhr_cli.pipeline.train import run_train

    ds = open_dataset(dataset, "train")
    label_sets = {tuple(ds.labels(i)) for i in ds.ids}
    calls = []

    def seed_batch(cams, values, images, cfg, *, base, pixel_valid):
        b, s = base.shape[0], base.shape[1]
        assert cams.shape[:2] == values.shape and cams.shape[2:] == (4, 4) and (cams >= 0).all()
        assert images.shape == (b, 3, s, s) and 0 <= images.min() and images.max() <= 255
        for row in values.tolist():
            assert tuple(v for v in row if v >= 0) in label_sets
        assert (base[~pixel_valid] == 255).all()
        return base

    def propagate_batch(seeds, uss, wss, values, images, cfg, *, cams, pixel_valid):
        assert uss.shape[2:] == (4, 4) and uss.shape[1] == 32  # crop 64 / uss_cell 16; synthetic USS dim 32
        assert [w.shape[1] for w in wss] == [256, 512]  # ResNet-18 C4, C5
        calls.append(values.shape[0])
        return torch.where(pixel_valid, torch.zeros_like(seeds), seeds)  # everything background

    monkeypatch.setitem(sys.modules, "dhr_cli.kernels.seed", types.SimpleNamespace(seed_batch=seed_batch))
    monkeypatch.setitem(sys.modules, "dhr_cli.kernels.propagate", types.SimpleNamespace(propagate_batch=propagate_batch))
    cfg = replace(TINY, dhr=True, epochs=2, uss_cell=16)
    result = run_train(cfg, dataset, dataset / "masks", tmp_path / "run", uss=dataset / "uss.h5", split="train", quiet=True)
    assert calls == [2] * 6
    # Trained towards all-background masks: the segmentation loss collapses.
    assert result.history[-1]["loss_seg"] < 0.5 * result.history[0]["loss_seg"]


def _kernels_ready() -> bool:
    try:
        from dhr_cli.kernels.propagate import propagate_batch  # noqa: F401
        from dhr_cli.kernels.seed import seed_batch  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _kernels_ready(), reason="dhr_cli.pipeline.seed / dhr_cli.pipeline.propagate kernels not built yet")
def test_dhr_training_lowers_loss(dataset, tmp_path):
    from dhr_cli.pipeline.train import run_train

    cfg = replace(TINY, dhr=True, epochs=3, seed_cfg=replace(TINY.seed_cfg, use_crf=False),
                  propagate=replace(TINY.propagate, use_crf=False))
    result = run_train(cfg, dataset, dataset / "masks", tmp_path / "run", uss=dataset / "uss.h5", split="train", quiet=True)
    assert result.history[-1]["loss"] < result.history[0]["loss"]


@pytest.mark.skipif(not _kernels_ready(), reason="dhr_cli.pipeline.seed / dhr_cli.pipeline.propagate kernels not built yet")
def test_online_regeneration_equals_offline_seed_and_propagate(dataset, tmp_path):
    """Same network, same image (no augmentation): online masks == `dhr seed` + `dhr propagate` on stores of its outputs."""
    from typer.testing import CliRunner

    from dhr_cli.cli import app
    from dhr_cli.io.datasets import open_dataset
    from dhr_cli.io.store import create_store, open_store
    from dhr_cli.models.deeplab import DHRNet, NetworkSpec
    from dhr_cli.pipeline.augment import normalize
    from dhr_cli.pipeline.train import OnlineRegenerator, TrainSamples

    ds = open_dataset(dataset, "train")
    ids = ds.ids
    cfg = replace(TINY, dhr=True, seed_cfg=replace(TINY.seed_cfg, use_crf=False),
                  propagate=replace(TINY.propagate, use_crf=False, marginals="uniform"))
    torch.manual_seed(0)
    net = DHRNet(NetworkSpec("resnet18", len(ds.classes), len(ds.classes) - 1, decoder_channels=16)).eval()
    x = torch.stack([normalize(ds.image(i)) for i in ids])
    with torch.no_grad():
        out = net(x, with_features=True)
    samples = TrainSamples(ds, ids, None, None, cfg)
    labels = torch.stack([samples.labels_vector(i) for i in ids])
    with open_store(dataset / "uss.h5") as s:
        uss = torch.stack([torch.from_numpy(s.read(i).features) for i in ids])
    regen = OnlineRegenerator(cfg, ds, 1)
    valid = torch.ones(x.shape[0], *x.shape[2:], dtype=torch.bool)
    online = regen(x, out["cams"], labels, None, valid, uss, [out["C4"], out["C5"]])

    prov = {"test": True}
    size = list(x.shape[2:])
    with create_store(tmp_path / "cams.h5", "cams", ds.classes, provenance=prov) as w:
        for b, i in enumerate(ids):
            lab = ds.labels(i)
            w.write(i, {"cams": out["cams"][b, [v - 1 for v in lab]].relu().numpy()}, {"cams": {"labels": lab, "image_size": size}})
    for name in ("C4", "C5"):
        with create_store(tmp_path / f"{name}.h5", "features", ds.classes, provenance=prov, root_attrs={"source": name}) as w:
            for b, i in enumerate(ids):
                w.write(i, {"features": out[name][b].numpy()}, {"features": {"image_size": size}})
    runner = CliRunner()
    r = runner.invoke(app, ["seed", "--cams", str(tmp_path / "cams.h5"), "--data", str(dataset), "--split", "train",
                            "--out", str(tmp_path / "seeds.h5"), "--no-crf"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["propagate", "--seeds", str(tmp_path / "seeds.h5"), "--data", str(dataset), "--split", "train",
                            "--uss", str(dataset / "uss.h5"), "--wss", str(tmp_path / "C4.h5"), "--wss", str(tmp_path / "C5.h5"),
                            "--cams", str(tmp_path / "cams.h5"), "--out", str(tmp_path / "masks.h5"), "--no-crf",
                            "--ot-marginals", "uniform", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    with open_store(tmp_path / "masks.h5") as s:
        for b, i in enumerate(ids):
            offline = torch.from_numpy(s.read(i).mask.astype(np.int64))
            assert (offline != online[b]).float().mean() < 1e-3, i


# ---- interruption and resume from the command line ----------------------------------------------
def _cli_train(dataset, out, *extra):
    return ["train", "--data", str(dataset), "--masks", str(dataset / "masks"), "--out", str(out), "--split", "train",
            "--backbone", "resnet18", "--decoder-channels", "16", "--crop-size", "64", "--scale-min", "64",
            "--scale-max", "96", "--batch-size", "2", "--epochs", "2", "--lr", "0.01", "--workers", "0",
            "--log-every", "1", "--no-dhr", "--seed", "3", "--val-split", "none", "--device", "cpu",
            "--checkpoint-every", "1", "--quiet", *extra]


def test_corrupt_last_checkpoint_is_a_one_line_error(dataset, tmp_path):
    from typer.testing import CliRunner

    from dhr_cli.cli import app
    from dhr_cli.pipeline.train import run_train

    run_train(TINY, dataset, dataset / "masks", tmp_path / "r", split="train", quiet=True, max_steps=1)
    last = tmp_path / "r" / "checkpoints" / "last.pt"
    for garbage in (b"not a checkpoint at all", last.read_bytes()[:200]):  # junk; a truncated zip
        last.write_bytes(garbage)
        res = CliRunner().invoke(app, _cli_train(dataset, tmp_path / "r", "--resume"))
        assert res.exit_code == 1, res.output
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error:") and "last.pt" in lines[0], res.output
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "config.json").write_text("{}")  # killed before its first checkpoint
    res = CliRunner().invoke(app, _cli_train(dataset, tmp_path / "s", "--resume"))
    assert res.exit_code == 1 and "--overwrite" in res.output


def test_bad_training_inputs_found_after_the_run_folder_exists_are_one_line_and_leave_no_folder(dataset, tmp_path):
    """A PNG mask of a label the dataset lacks (IndexError in the loss), USS maps of two widths (torch.stack),
    missing --backbone-weights, and a config.json of another shape on --resume (AttributeError) were
    tracebacks or left a half-made run folder that refused the corrected rerun."""
    import shutil

    from PIL import Image
    from typer.testing import CliRunner

    from dhr_cli.cli import app
    from dhr_cli.io.datasets import open_dataset
    from dhr_cli.io.store import open_store
    from tests.helpers import write_plain_store

    def run(out, *extra, masks=None):
        args = _cli_train(dataset, out, *extra)
        if masks is not None:
            args[args.index("--masks") + 1] = str(masks)
        res = CliRunner().invoke(app, args)
        lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
        assert res.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error:"), res.output[-1500:]
        return lines[0]

    ds = open_dataset(dataset, "train")
    pngs = tmp_path / "pngs"
    shutil.copytree(dataset / "masks", pngs)
    h, w = ds.image_size(ds.ids[0])
    Image.fromarray(np.full((h, w), len(ds.classes), np.uint8)).save(pngs / f"{ds.ids[0]}.png")
    line = run(tmp_path / "a", masks=pngs)
    assert f"{ds.ids[0]}.png: mask holds label values [{len(ds.classes)}]" in line and not (tmp_path / "a").exists()

    with open_store(dataset / "uss.h5") as uss:
        items = {i: ("features", uss.read(i).features[: 2 if i == ds.ids[1] else None],
                     {"image_size": list(uss.read(i).image_size)}) for i in uss.ids}
        classes = uss.classes
    mixed = write_plain_store(tmp_path / "mixed.h5", "features", classes, items)
    args = _cli_train(dataset, tmp_path / "b")
    args[args.index("--no-dhr")] = "--dhr"
    res = CliRunner().invoke(app, args + ["--uss", str(mixed)])
    assert res.exit_code == 1 and "mixed.h5: item" in res.output and "channels" in res.output, res.output[-1500:]
    assert "Traceback" not in res.output and not (tmp_path / "b").exists()

    line = run(tmp_path / "c", "--backbone-weights", str(tmp_path / "nope.pth"))
    assert "nope.pth" in line and not (tmp_path / "c").exists()

    from dhr_cli.pipeline.train import run_train

    run_train(TINY, dataset, dataset / "masks", tmp_path / "d", split="train", quiet=True, max_steps=1)
    for text in ("[1, 2]", '{"config": 5}'):
        (tmp_path / "d" / "config.json").write_text(text)
        assert "config.json: missing or unreadable" in run(tmp_path / "d", "--resume")


def test_sigkill_mid_epoch_then_resume_gives_the_same_weights(dataset, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from typer.testing import CliRunner

    from dhr_cli.cli import app

    straight = CliRunner().invoke(app, _cli_train(dataset, tmp_path / "a"))
    assert straight.exit_code == 0, straight.output
    run = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "dhr_cli", *_cli_train(dataset, run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run / "checkpoints" / "last.pt"
    try:
        deadline = time.time() + 120
        while not last.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["in_epoch"]["batches"] >= 1  # killed inside epoch 1
    resumed = CliRunner().invoke(app, _cli_train(dataset, run, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    b = torch.load(run / "model.pt", weights_only=True)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a["ema"][k], b["ema"][k], atol=1e-5, rtol=1e-4)
    assert [r["step"] for r in _steps(run)] == [r["step"] for r in _steps(tmp_path / "a")]  # no step repeated
    assert (run / "epochs.csv").read_text().count("\n") == 3


def test_ema_and_poly_schedule_match_their_formulas():
    """AveragedModel + warm-up and PolynomialLR give the numbers of the formulas they replaced."""
    from dhr_cli.models.deeplab import NetworkSpec, build_network
    from dhr_cli.pipeline.train import Training

    torch.manual_seed(0)
    model = build_network(NetworkSpec("resnet18", 3, 2, decoder_channels=8))
    cfg = replace(TINY, ema_decay=0.9, poly_power=0.9, lr=0.02, head_lr_mult=10.0)
    tr = Training.build(model, cfg, total_steps=5, amp_scaling=False)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    for t in range(1, 8):  # past total_steps: the lr stays 0
        for base, g in zip((0.02, 0.2), tr.optimizer.param_groups):
            assert g["lr"] == pytest.approx(base * (1 - min(t - 1, 5) / 5) ** 0.9, rel=1e-12, abs=1e-15)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            for b in model.buffers():
                if b.dtype.is_floating_point:
                    b.add_(1.0)
                else:
                    b.add_(1)
        tr.optimizer.step()  # no gradients: a no-op, keeps the scheduler's order check quiet
        tr.after_step()
        d = min(0.9, (1 + t) / (10 + t))
        for k, v in model.state_dict().items():
            ref[k] = ref[k] * d + v * (1 - d) if v.dtype.is_floating_point else v.clone()
    for k, v in tr.ema.module.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=1e-6, atol=1e-6)
    assert tr.state()["ema_updates"] == 7


@pytest.mark.parametrize("flag, expected", [([], False), (["--step3-background"], True)])
def test_train_passes_the_step3_grouping_rule_to_online_regeneration(dataset, tmp_path, monkeypatch, flag, expected):
    from typer.testing import CliRunner

    import dhr_cli.pipeline.train as train_module
    from dhr_cli.cli import app

    seen = {}

    def fake_run_train(cfg, *args, **kwargs):
        seen["cfg"] = cfg
        return {}

    monkeypatch.setattr(train_module, "run_train", fake_run_train)
    CliRunner().invoke(app, _cli_train(dataset, tmp_path / "r", *flag))
    assert seen["cfg"].propagate.step3_background is expected


# ---- the run folder: --overwrite, dhr info, inputs checked up front ------------------------------
def _one_line_error(res) -> str:
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error:"), res.output[-1500:]
    return lines[0]


def test_overwrite_removes_only_an_earlier_run_folder(dataset, tmp_path):
    """--overwrite removed whatever folder --out named (a home folder given by mistake): now only a run's,
    finished or killed before its config.json (nothing but a run's own files), or an empty one."""
    from typer.testing import CliRunner

    from dhr_cli.cli import app
    from dhr_cli.errors import InputError
    from dhr_cli.pipeline.train import run_train

    home = tmp_path / "home"
    (home / "checkpoints").mkdir(parents=True)  # a run's names beside a user's file do not make it a run
    (home / "thesis.tex").write_text("years of work")
    line = _one_line_error(CliRunner().invoke(app, _cli_train(dataset, home, "--overwrite", "--max-steps", "1")))
    assert str(home) in line and "does not look like a dhr train run folder" in line
    with pytest.raises(InputError, match="does not look like a dhr train run folder"):  # the library call too
        run_train(TINY, dataset, dataset / "masks", home, split="train", quiet=True, overwrite=True, max_steps=1)
    assert (home / "thesis.tex").read_text() == "years of work"

    killed = tmp_path / "killed"  # killed before config.json: an empty checkpoints/, a save's temporary
    (killed / "checkpoints").mkdir(parents=True)
    (killed / ".model.pt.4242.tmp").write_bytes(b"cut short")
    for _ in range(2):  # then the finished run it became
        res = CliRunner().invoke(app, _cli_train(dataset, killed, "--overwrite", "--max-steps", "1"))
        assert res.exit_code == 0, res.output
        assert sorted(p.name for p in killed.iterdir()) == ["checkpoints", "config.json", "epochs.csv", "log.jsonl",
                                                            "model.pt"]


def test_info_summarises_a_run_folder(dataset, tmp_path):
    """`dhr info RUN_DIR` said the run folder matched no dataset layout."""
    from typer.testing import CliRunner

    from dhr_cli.cli import app
    from dhr_cli.pipeline.train import run_train

    run_train(TINY, dataset, dataset / "masks", tmp_path / "r", split="train", quiet=True, max_steps=3)  # epoch 1 of 2
    res = CliRunner().invoke(app, ["info", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert "dhr train run" in res.output and "resnet18" in res.output and "epoch 1 of 2, step 3" in res.output
    summary = json.loads(CliRunner().invoke(app, ["info", str(tmp_path / "r"), "--json"]).output)
    assert summary["what"] == "dhr train run" and summary["weights"] == "model.pt, checkpoints/last.pt"
    assert summary["config"]["backbone"] == "resnet18" and summary["inputs"]["split"] == "train"


def test_uss_store_of_other_image_sizes_is_refused_before_the_run_folder(dataset, tmp_path):
    """A features item whose image_size is not its image's size trained without a word."""
    from typer.testing import CliRunner

    from dhr_cli.cli import app
    from dhr_cli.io.datasets import open_dataset
    from dhr_cli.io.store import open_store
    from tests.helpers import write_plain_store

    ids = open_dataset(dataset, "train").ids
    with open_store(dataset / "uss.h5") as uss:
        items = {i: ("features", uss.read(i).features, {"image_size": [7, 9] if i == ids[1] else list(uss.read(i).image_size)})
                 for i in uss.ids}
        classes = uss.classes
    store = write_plain_store(tmp_path / "sized.h5", "features", classes, items)
    args = _cli_train(dataset, tmp_path / "r", "--uss", str(store), "--no-crf", "--max-steps", "1")
    args[args.index("--no-dhr")] = "--dhr"
    line = _one_line_error(CliRunner().invoke(app, args))
    assert "sized.h5" in line and repr(ids[1]) in line and "image_size 9x7 but its image is 160x120" in line
    assert not (tmp_path / "r").exists()


def test_non_finite_weights_are_refused_naming_the_file_and_tensor(dataset, tmp_path):
    """NaN backbone weights ended in "the loss became NaN" deep in training (NaN CAMs in `dhr cams`)."""
    from torchvision.models import resnet18
    from typer.testing import CliRunner

    from dhr_cli.cli import app
    from dhr_cli.errors import CheckpointError
    from dhr_cli.models.checkpoints import load_state_dict

    sd = resnet18(weights=None).state_dict()
    sd["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(sd, tmp_path / "nan.pth")
    sd["layer2.0.conv1.weight"][0, 0, 0, 0] = 0.0
    sd["bn1.running_var"][3] = float("inf")
    torch.save({"state_dict": sd}, tmp_path / "inf.pth")
    line = _one_line_error(CliRunner().invoke(app, _cli_train(dataset, tmp_path / "r", "--backbone-weights",
                                                               str(tmp_path / "nan.pth"))))
    assert "nan.pth: tensor 'layer2.0.conv1.weight' holds NaN or infinite values" in line
    assert not (tmp_path / "r").exists()
    with pytest.raises(CheckpointError, match=r"inf.pth: tensor 'state_dict.bn1.running_var' holds NaN"):
        load_state_dict(tmp_path / "inf.pth")


def test_a_live_writer_of_the_run_folder_is_refused(dataset, tmp_path):
    """No lock was taken: a `--resume` (or `--overwrite`) while the run trained ran beside it, both
    appending to log.jsonl and epochs.csv (steps repeated, interleaved) and overwriting checkpoints."""
    from typer.testing import CliRunner

    from dhr_cli.cli import app
    from tests.helpers import live_writer_lock

    run = tmp_path / "run"
    with live_writer_lock(run) as pid:
        for extra in ((), ("--overwrite",)):
            line = _one_line_error(CliRunner().invoke(app, _cli_train(dataset, run, "--max-steps", "1", *extra)))
            assert "run.lock" in line and f"PID {pid}" in line and "being written" in line, line
            assert not run.exists()


def test_resume_under_a_file_size_limit_keeps_the_log_and_names_it(dataset, tmp_path):
    """--resume rewrote log.jsonl in place (the records after the checkpoint dropped): under `ulimit -f`
    or on a full disk it was cut mid-record for good, and the error named no file."""
    import resource
    import subprocess
    import sys

    run = tmp_path / "run"
    args = [sys.executable, "-m", "dhr_cli", *_cli_train(dataset, run, "--checkpoint-every", "0")]
    assert subprocess.run([*args, "--max-steps", "3"], capture_output=True).returncode == 0
    log = (run / "log.jsonl").read_bytes()
    limit = len(log) - 100  # below the log's size: its rewrite cannot finish

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = subprocess.run([*args, "--resume"], capture_output=True, text=True, preexec_fn=limited)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "log.jsonl" in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert (run / "log.jsonl").read_bytes() == log
    assert subprocess.run([*args, "--resume"], capture_output=True).returncode == 0
    steps = [s["step"] for s in _steps(run)]
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] > 3  # none lost, none twice
