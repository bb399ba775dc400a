"""`dhr cams` end to end on the procedural dataset with lite0 (ImageNet weights, fitted head)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dhr_cli.cli import app
from dhr_cli.io.datasets import open_dataset
from dhr_cli.io.store import open_store
from dhr_cli.testing.synthetic import make_dataset

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("cams") / "d", n_images=6, stores=False)


def test_wss_lite0_train_head_then_reuse(data, tmp_path):
    out, head = tmp_path / "cams.h5", tmp_path / "head.pt"
    r = invoke("cams", "--data", data, "--split", "train", "--wss", "lite0", "--train-head", "--head-steps", 50,
               "--save-head", head, "--scales", "1.0,0.5", "--device", "cpu", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    ds = open_dataset(data, "train")
    with open_store(out, expect="cams") as s:
        assert s.ids == sorted(ds.ids) and s.classes == ds.classes
        assert s.attrs["source"] == "lite0"
        for i in s.ids:
            item = s.read(i)
            assert item.labels.tolist() == ds.labels(i)  # labelled classes only
            cams = item.cams
            assert item.arrays["cams"].dtype == np.float16
            assert np.allclose(cams.reshape(len(cams), -1).max(1), 1.0, atol=1e-2)  # per-class max normalised
            assert item.image_size == ds.image_size(i)
            h, w = ds.image_size(i)
            # 320 channels stored on at most --feature-rank (128) per-image singular vectors
            cells = cams.shape[1] * cams.shape[2]
            assert item.features.shape[0] == min(320, 128, cells) and item.features.shape[1:] == cams.shape[1:]
            # stride-16 grid of the image resized to a longer side of 224
            assert cams.shape[1:] == tuple(int(np.ceil(int(x * 224 / max(h, w)) / 16)) for x in (h, w))
        first = s.read(s.ids[0]).cams
    # the saved head gives the same CAMs (single scale differs, so compare the head route itself)
    out2 = tmp_path / "cams2.h5"
    r = invoke("cams", "--data", data, "--split", "train", "--wss", "lite0", "--head", head, "--scales", "1.0,0.5",
               "--device", "cpu", "--out", out2, "--quiet")
    assert r.exit_code == 0, r.output
    with open_store(out2) as s:
        np.testing.assert_allclose(s.read(s.ids[0]).cams, first, atol=2e-3)
    # existing output without --overwrite / --resume: one-line error
    r = invoke("cams", "--data", data, "--split", "train", "--wss", "lite0", "--head", head, "--out", out2, "--quiet")
    assert r.exit_code == 1 and "already exists" in r.output


def test_head_last_stage_trains_the_wss_features_and_is_saved(data, tmp_path):
    """--head-last-stage fine-tunes blocks.6: the stored WSS features change, and --save-head keeps them."""
    common = ("--data", data, "--split", "train", "--wss", "lite0", "--scales", "1.0", "--no-flip",
              "--feature-rank", 0, "--device", "cpu", "--quiet")
    frozen, tuned, again, head = (tmp_path / n for n in ("frozen.h5", "tuned.h5", "again.h5", "head.pt"))
    for out, extra in ((frozen, ()), (tuned, ("--head-last-stage", "--save-head", head))):
        r = invoke("cams", *common, "--train-head", "--head-steps", 30, *extra, "--out", out)
        assert r.exit_code == 0, r.output
    r = invoke("cams", *common, "--head", head, "--out", again)
    assert r.exit_code == 0, r.output
    with open_store(frozen) as a, open_store(tuned) as b, open_store(again) as c:
        assert b.provenance["options"]["head_last_stage"] is True and a.provenance["options"]["head_last_stage"] is False
        i = a.ids[0]
        fa, fb, fc = (s.read(i).features.astype(np.float32) for s in (a, b, c))
        assert np.abs(fa - fb).max() > 1e-2  # blocks.6 moved
        np.testing.assert_allclose(fc, fb, atol=2e-3)  # the saved head carries the tuned stage
        np.testing.assert_allclose(c.read(i).cams, b.read(i).cams, atol=2e-3)
    r = invoke("cams", *common, "--head", head, "--head-last-stage", "--out", tmp_path / "x.h5")
    assert r.exit_code == 1 and "--head-last-stage" in r.output and not (tmp_path / "x.h5").exists()


def test_uss_lite0_features_store(data, tmp_path):
    out = tmp_path / "uss.h5"
    r = invoke("cams", "--data", data, "--split", "val", "--uss", "lite0", "--scales", "2.0,1.0", "--device", "auto",
               "--feature-rank", 0, "--out", out, "--quiet")  # every channel kept
    assert r.exit_code == 0, r.output
    ds = open_dataset(data, "val")
    with open_store(out, expect="features") as s:
        assert s.attrs["source"] == "lite0" and len(s) == len(ds)
        f = s.read(s.ids[0]).features
        h, w = ds.image_size(s.ids[0])
        # blocks.2 + blocks.4 + blocks.5 (40 + 112 + 192) on blocks.2's stride-8 grid of scale 2.0
        assert f.shape == (344, *(-(-int(2 * x * 224 / max(h, w)) // 8) for x in (h, w)))
        assert np.isfinite(f).all() and f.std() > 0


def test_option_errors(data, tmp_path):
    r = invoke("cams", "--data", data, "--out", tmp_path / "x.h5")
    assert r.exit_code == 1 and "exactly one" in r.output
    r = invoke("cams", "--data", data, "--wss", "lite0", "--out", tmp_path / "x.h5")
    assert r.exit_code == 1 and "--train-head" in r.output
    r = invoke("cams", "--data", data, "--uss", "dino_vitb8", "--out", tmp_path / "x.h5")
    assert r.exit_code == 1 and "dino_vitbase8_pretrain.pth" in r.output
    r = invoke("cams", "--data", data, "--uss", "lite0", "--scales", "1,x", "--out", tmp_path / "x.h5")
    assert r.exit_code == 2 and "--scales" in r.output  # a usage error, from the one --scales parser
    r = invoke("predict", "--model", tmp_path, "--data", data, "--scales", "1,-0.5", "--out", tmp_path / "x.h5")
    assert r.exit_code == 2 and "--scales" in r.output and "[0.1, 4]" in r.output
    assert not (tmp_path / "x.h5").exists()


def _tiny_vit_state(seed=0):
    import torch

    from dhr_cli.models.vit import DinoViT

    torch.manual_seed(seed)
    return DinoViT(embed_dim=64, depth=1, num_heads=1, patch_size=16, img_size=32).state_dict()


def test_uss_stego_lightning_ckpt_without_trust_flag(data, tmp_path):
    """A STEGO Lightning .ckpt (net.model.* DINO keys, net.cluster1/2, probes, pickled hyper-parameters)
    loads without --trust-checkpoint; features follow DHR's scales (grid of scale 2.0, stride 16)."""
    import argparse

    import torch

    from dhr_cli.models.stego import ClusterProjection

    torch.manual_seed(1)
    sd = {f"net.model.{k}": v for k, v in _tiny_vit_state().items()}
    sd.update({f"net.{k}": v for k, v in ClusterProjection(64, 5).state_dict().items()})
    sd["cluster_probe.clusters"] = torch.zeros(27, 5)
    torch.save({"state_dict": sd, "hyper_parameters": argparse.Namespace(n_classes=27, dim=5),
                "pytorch-lightning_version": "1.4.2"}, tmp_path / "stego.ckpt")
    out = tmp_path / "uss.h5"
    r = invoke("cams", "--data", data, "--split", "val", "--uss", "stego", "--uss-weights", tmp_path / "stego.ckpt",
               "--scales", "2.0,1.0", "--device", "cpu", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    ds = open_dataset(data, "val")
    with open_store(out, expect="features") as s:
        assert s.attrs["source"] == "stego" and s.ids == sorted(ds.ids)
        item = s.read(s.ids[0])
        h, w = ds.image_size(s.ids[0])
        assert item.arrays["features"].dtype == np.float16
        assert item.features.shape == (5, -(-2 * h // 16), -(-2 * w // 16))
        assert item.image_size == (h, w)


def test_wss_mctformer_cams_store(data, tmp_path):
    import torch

    from dhr_cli.models.mctformer import MCTformerV2

    ds = open_dataset(data, "val")
    fg = ds.classes[1:]
    torch.manual_seed(2)
    net = MCTformerV2(len(fg), embed_dim=64, depth=2, num_heads=1, patch_size=16, img_size=32)
    torch.save({"model": net.state_dict(), "epoch": 1}, tmp_path / "mct.pth")
    out = tmp_path / "cams.h5"
    r = invoke("cams", "--data", data, "--split", "val", "--wss", "mctformer", "--wss-weights", tmp_path / "mct.pth",
               "--scales", "1.0,0.5", "--batch-size", 2, "--dtype", "float32", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    with open_store(out, expect="cams") as s:
        for i in s.ids:
            item = s.read(i)
            assert item.labels.tolist() == ds.labels(i) and item.arrays["cams"].dtype == np.float32
            assert item.features.shape[0] == 64 and item.cams.max() <= 1.0 + 1e-6
    # a network trained on other classes is refused with a sentence naming the mismatch
    net2 = MCTformerV2(len(fg) + 1, embed_dim=64, depth=1, num_heads=1, patch_size=16, img_size=32)
    torch.save({"model": net2.state_dict()}, tmp_path / "mct2.pth")
    r = invoke("cams", "--data", data, "--split", "val", "--wss", "mctformer", "--wss-weights", tmp_path / "mct2.pth",
               "--out", tmp_path / "c2.h5", "--quiet")
    assert r.exit_code == 1 and "class tokens" in r.output


def test_resume_skips_written_items(data, tmp_path):
    import torch

    torch.save(_tiny_vit_state(3), tmp_path / "dino.pth")
    out = tmp_path / "f.h5"
    args = ["cams", "--data", data, "--split", "val", "--uss", "dino", "--uss-weights", tmp_path / "dino.pth",
            "--scales", "1.0", "--no-flip", "--out", out, "--quiet"]
    assert invoke(*args).exit_code == 0
    with open_store(out) as s:
        first = {i: s.read(i).features for i in s.ids}
    r = invoke(*args, "--resume")
    assert r.exit_code == 0 and "already there" in r.output
    with open_store(out) as s:
        for i in s.ids:
            np.testing.assert_array_equal(s.read(i).features, first[i])


def test_features_store_for_names_and_paths(data, tmp_path, monkeypatch):
    """`--uss NAME` elsewhere (propagate, train): a store path passes through; a name is computed once."""
    import torch

    from dhr_cli.config import CamsConfig
    from dhr_cli.errors import InputError
    from dhr_cli.pipeline.cams import features_store_for

    ds = open_dataset(data, "val")
    torch.save(_tiny_vit_state(4), tmp_path / "dino.pth")
    cfg = CamsConfig(uss_scales=(1.0,), flip=False)
    cache = tmp_path / "dino-uss.h5"
    p = features_store_for("dino", ds, weights=tmp_path / "dino.pth", cache=cache, cfg=cfg)
    assert p == cache and cache.is_file()
    mtime = cache.stat().st_mtime_ns
    assert features_store_for("dino", ds, weights=tmp_path / "dino.pth", cache=cache, cfg=cfg) == cache
    assert cache.stat().st_mtime_ns == mtime  # reused, not recomputed
    assert features_store_for(cache, ds) == cache
    with pytest.raises(InputError, match="no such store"):
        features_store_for(tmp_path / "nope.h5", ds)


def test_a_store_made_by_dhr_cams_is_what_the_cache_reuses(data, tmp_path):
    """`dhr cams --uss dino` under the cache's name is taken by `--uss dino`, not refused or recomputed."""
    import torch

    from dhr_cli.config import CamsConfig
    from dhr_cli.pipeline.cams import features_store_for

    torch.save(_tiny_vit_state(4), tmp_path / "dino.pth")
    cache = tmp_path / "dino-uss-val.h5"
    r = invoke("cams", "--data", data, "--split", "val", "--uss", "dino", "--uss-weights", tmp_path / "dino.pth",
               "--scales", "1.0", "--no-flip", "--device", "cpu", "--out", cache, "--quiet")
    assert r.exit_code == 0, r.output
    mtime = cache.stat().st_mtime_ns
    ds = open_dataset(data, "val")
    got = features_store_for("dino", ds, weights=tmp_path / "dino.pth", cache_dir=tmp_path,
                             cfg=CamsConfig(uss_scales=(1.0,), flip=False))
    assert got == cache and cache.stat().st_mtime_ns == mtime


def test_images_without_labels_get_no_cams(data, tmp_path):
    import json
    import shutil

    import torch

    from dhr_cli.models.mctformer import MCTformerV2

    root = tmp_path / "d"
    shutil.copytree(data, root)
    labels = json.loads((root / "labels.json").read_text())
    ds = open_dataset(root, "val")
    empty = ds.ids[0]
    labels[empty] = []
    (root / "labels.json").write_text(json.dumps(labels))
    torch.save({"model": MCTformerV2(5, embed_dim=64, depth=1, num_heads=1, patch_size=16, img_size=32).state_dict()},
               tmp_path / "m.pth")
    r = invoke("cams", "--data", root, "--split", "val", "--wss", "mctformer", "--wss-weights", tmp_path / "m.pth",
               "--scales", "1.0", "--out", tmp_path / "c.h5", "--quiet")
    assert r.exit_code == 0, r.output
    assert "1 without labels left out" in r.output
    with open_store(tmp_path / "c.h5") as s:
        assert empty not in s and len(s) == len(ds) - 1


def test_wss_weights_pair_with_the_named_networks_in_order(tmp_path):
    from dhr_cli.errors import InputError
    from dhr_cli.pipeline.cams import pair_weights

    store = tmp_path / "wss.h5"
    store.write_bytes(b"")
    assert pair_weights(["mctformer", str(store), "resnet"], [Path("a.pth"), Path("b.pth")]) == {
        "mctformer": Path("a.pth"), "resnet": Path("b.pth")}
    with pytest.raises(InputError, match="2 --wss-weights for 1 networks"):
        pair_weights([str(store), "resnet"], [Path("a.pth"), Path("b.pth")])


def test_a_stopped_run_with_save_head_resumes_with_the_same_command(data, tmp_path, monkeypatch):
    """--save-head H was written before the store's items; after a stop, the same command with --resume
    was refused ("H: already exists"), and --overwrite excludes --resume."""
    from dhr_cli.io.progress import Terminated
    from dhr_cli.io.store import StoreWriter

    def args(out, head):
        return ("cams", "--data", data, "--split", "train", "--wss", "lite0", "--train-head", "--head-steps", 20,
                "--save-head", head, "--scales", "1.0", "--device", "cpu", "--batch-size", 1, "--out", out, "--quiet")

    clean = tmp_path / "clean.h5"
    assert invoke(*args(clean, tmp_path / "clean.pt")).exit_code == 0
    real_write, calls = StoreWriter.write, [0]

    def write(self, *a, **kw):
        calls[0] += 1
        if calls[0] == 2:  # a SIGTERM after the first item
            raise Terminated()
        real_write(self, *a, **kw)

    monkeypatch.setattr(StoreWriter, "write", write)
    out, head = tmp_path / "c.h5", tmp_path / "head.pt"
    assert invoke(*args(out, head)).exit_code == 143
    assert head.exists() and (tmp_path / "c.h5.partial").exists()
    monkeypatch.setattr(StoreWriter, "write", real_write)
    r = invoke(*args(out, head), "--resume")
    assert r.exit_code == 0, r.output
    import torch

    fitted, again = torch.load(tmp_path / "clean.pt", weights_only=False), torch.load(head, weights_only=False)
    assert again["classes"] == fitted["classes"] and again["head"].keys() == fitted["head"].keys()
    for k, v in fitted["head"].items():  # the same seeded fit, rewritten
        assert torch.equal(again["head"][k], v), k
    with open_store(clean) as a, open_store(out) as b:
        assert a.ids == b.ids
        for i in a.ids:
            np.testing.assert_array_equal(a.read(i).cams, b.read(i).cams)
