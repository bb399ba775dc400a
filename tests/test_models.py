"""Networks behind `dhr cams`: strict checkpoint loading, key names and shapes, outputs."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from dhr_cli.errors import CheckpointError, InputError
from dhr_cli.models import resolve_source
from dhr_cli.models.checkpoints import (
    load_state_dict,
    load_strict,
    read_checkpoint,
    strip_prefixes,
)
from dhr_cli.models.stego import ClusterProjection, StegoSource
from dhr_cli.models.vit import ARCHS, DinoViT, build_vit


def tiny_vit(seed=0, **kw) -> DinoViT:
    """Depth 2, D 64 (one head of 64, as DINO's D/64 heads), patch 8, 4x4 grid; DINO key names."""
    torch.manual_seed(seed)
    return DinoViT(embed_dim=64, depth=2, num_heads=1, patch_size=8, img_size=32, **kw).eval()


def test_official_vit_key_shapes():
    """Full-size key/shape lists as docs/peers.md give them (no forward)."""
    for name, (d, depth, _, p, img, ls, mt) in ARCHS.items():
        with torch.device("meta"):
            sd = build_vit(name).state_dict()
        n_tok = 1 + (img // p) ** 2
        assert tuple(sd["pos_embed"].shape) == (1, n_tok, d)
        assert tuple(sd["cls_token"].shape) == (1, 1, d)
        assert tuple(sd["patch_embed.proj.weight"].shape) == (d, 3, p, p)
        assert tuple(sd["blocks.11.attn.qkv.weight"].shape) == (3 * d, d)
        assert tuple(sd["blocks.0.mlp.fc1.weight"].shape) == (4 * d, d)
        assert tuple(sd["blocks.0.mlp.fc2.weight"].shape) == (d, 4 * d)
        assert ("blocks.3.ls1.gamma" in sd) == ls and ("mask_token" in sd) == mt
        assert "norm.weight" in sd and "head.weight" not in sd and f"blocks.{depth}.norm1.weight" not in sd
        if name == "dino_vits8":
            assert tuple(sd["pos_embed"].shape) == (1, 785, 384)
        if name == "dinov2_vitb14":
            assert tuple(sd["pos_embed"].shape) == (1, 1370, 768) and len(sd) == 4 + 1 + 12 * 14 + 2


def test_vit_checkpoint_roundtrip_teacher_prefixes(tmp_path):
    src = tiny_vit(0)
    sd = {f"module.backbone.{k}": v for k, v in src.state_dict().items()}
    torch.save({"teacher": sd, "epoch": 3}, tmp_path / "ck.pth")
    dst = tiny_vit(1)
    load_strict(dst, load_state_dict(tmp_path / "ck.pth"), tmp_path / "ck.pth")
    x = torch.randn(1, 3, 40, 48)
    out = dst.patch_features(x)
    assert out.shape == (1, 64, 5, 6)
    torch.testing.assert_close(out, src.patch_features(x))
    # a changed weight changes the output
    with torch.no_grad():
        dst.blocks[1].mlp.fc2.weight.add_(0.5)
    assert not torch.allclose(dst.patch_features(x), out)


def test_missing_and_renamed_keys_are_listed(tmp_path):
    sd = tiny_vit().state_dict()
    sd["blocks.0.attn.qkv_renamed.weight"] = sd.pop("blocks.0.attn.qkv.weight")
    with pytest.raises(CheckpointError) as e:
        load_strict(tiny_vit(), sd, "x.pth")
    assert "blocks.0.attn.qkv.weight" in str(e.value) and "qkv_renamed" in str(e.value)
    assert "missing keys 1" in str(e.value)


class _Hook:
    """A pickled object whose unpickling would run code (sets a flag) if it were really loaded."""

    ran = False

    def __init__(self):
        self.payload = 1

    def __setstate__(self, state):
        _Hook.ran = True


def test_pickled_objects_are_left_inert_or_need_trust(tmp_path):
    import argparse  # non-tensor objects, like Lightning's OmegaConf hyper-parameters

    _Hook.ran = False
    torch.save({"state_dict": {"a": torch.zeros(1)}, "hyper_parameters": argparse.Namespace(lr=1, cfg=_Hook())},
               tmp_path / "l.ckpt")
    assert list(load_state_dict(tmp_path / "l.ckpt")) == ["a"]
    assert not _Hook.ran  # nothing from the file ran
    with pytest.raises(CheckpointError, match="trust-checkpoint"):
        read_checkpoint(tmp_path / "l.ckpt", inert=False)
    assert list(load_state_dict(tmp_path / "l.ckpt", trust=True)) == ["a"] and _Hook.ran
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        read_checkpoint(tmp_path / "junk.pth")


def test_dino_training_checkpoint_teacher_backbone_only(tmp_path):
    """Full DINO checkpoints: ['teacher'] holds module.backbone.* and the projection head module.head.*."""
    src = tiny_vit(3)
    sd = {f"module.backbone.{k}": v for k, v in src.state_dict().items()}
    sd.update({"module.head.mlp.0.weight": torch.zeros(8, 64), "module.head.last_layer.weight_g": torch.ones(10, 1)})
    torch.save({"teacher": sd, "student": {}, "epoch": 100}, tmp_path / "checkpoint.pth")
    s = resolve_source("dino", tmp_path / "checkpoint.pth")
    x = torch.randn(1, 3, 16, 24)
    torch.testing.assert_close(s.extract(x)["features"][0], src.patch_features(x))
    assert s.kind == "uss" and s.stride == 8 and s.feature_dims == (64,)


def test_dinov2_layerscale_and_generic_name(tmp_path):
    v = tiny_vit(4, layerscale=True, mask_token=True)
    sd = v.state_dict()
    assert tuple(sd["blocks.1.ls2.gamma"].shape) == (64,) and tuple(sd["mask_token"].shape) == (1, 64)
    torch.save(sd, tmp_path / "v2.pth")
    s = resolve_source("dino", tmp_path / "v2.pth")
    x = torch.randn(2, 3, 24, 40)
    ref = s.extract(x)["features"][0]
    assert ref.shape == (2, 64, 3, 5)
    with torch.no_grad():
        s.vit.blocks[0].ls1.gamma.mul_(3.0)
    assert not torch.allclose(s.extract(x)["features"][0], ref)
    # the official name pins the full-size architecture: a tiny file is a clear mismatch
    with pytest.raises(CheckpointError, match="shape mismatches"):
        resolve_source("dinov2", tmp_path / "v2.pth")


def test_strip_prefixes_only_at_start():
    assert list(strip_prefixes({"module.backbone.x.module.y": 0})) == ["x.module.y"]


def test_pos_embed_interpolation():
    v = tiny_vit()
    assert v.interpolate_pos_encoding(4, 4) is v.pos_embed
    for compat in (True, False):
        v.dino_compat_interp = compat
        assert v.interpolate_pos_encoding(3, 7).shape == (1, 1 + 21, 64)
    with pytest.raises(Exception):
        v.patch_features(torch.randn(1, 3, 30, 32))  # not a multiple of the patch


def test_stego_lightning_and_packed(tmp_path):
    vit = tiny_vit(2)
    proj = ClusterProjection(64, 7)
    sd = {f"net.model.{k}": v for k, v in vit.state_dict().items()}
    sd.update({f"net.{k}": v for k, v in proj.state_dict().items()})
    sd.update({"cluster_probe.clusters": torch.zeros(5, 7), "linear_probe.weight": torch.zeros(5, 7, 1, 1)})
    torch.save({"state_dict": sd}, tmp_path / "stego.ckpt")
    s = StegoSource.from_checkpoint(tmp_path / "stego.ckpt").eval()
    x = torch.randn(2, 3, 32, 24)
    f = s.extract(x)["features"][0]
    assert f.shape == (2, 7, 4, 3) and s.feature_dims == (7,)
    torch.testing.assert_close(f, proj(vit.patch_features(x)))
    # DHR's packed file + the backbone
    torch.save({"cluster1": proj.cluster1.state_dict(), "cluster2": proj.cluster2.state_dict()}, tmp_path / "STEGO.pt")
    torch.save(vit.state_dict(), tmp_path / "dino.pth")
    with pytest.raises(CheckpointError, match="backbone"):
        StegoSource.from_checkpoint(tmp_path / "STEGO.pt")
    packed = StegoSource.from_checkpoint(tmp_path / "STEGO.pt", backbone_weights=tmp_path / "dino.pth").eval()
    torch.testing.assert_close(packed.extract(x)["features"][0], f)
    bad = proj.cluster2.state_dict()
    bad["1.weight"] = bad.pop("2.weight")
    torch.save({"cluster1": proj.cluster1.state_dict(), "cluster2": bad}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="cluster2.2.weight"):
        StegoSource.from_checkpoint(tmp_path / "bad.pt", backbone_weights=tmp_path / "dino.pth")


def test_resolve_source_errors(tmp_path):
    with pytest.raises(CheckpointError, match="dl.fbaipublicfiles.com/dino/dino_deitsmall8"):
        resolve_source("dino_vits8")
    with pytest.raises(CheckpointError, match="not found"):
        resolve_source("dinov2_vitb14", tmp_path / "nope.pth")
    with pytest.raises(InputError, match="unknown network"):
        resolve_source("vgg16")
    with pytest.raises(InputError, match="USS"):
        resolve_source("dino_vits8", kind="wss")


def test_resnet_cam_strict_and_irn_names(tmp_path):
    from dhr_cli.models.resnet_cam import ResNetCAM

    torch.manual_seed(0)
    net = ResNetCAM(18, 3).eval()
    irn = {}
    for k, v in net.state_dict().items():
        for a, b in (("conv1.", "stage1.0."), ("bn1.", "stage1.1."), ("layer1.", "stage1.4."), ("layer2.", "stage2.0."),
                     ("layer3.", "stage3.0."), ("layer4.", "stage4.0.")):  # IRN's Sequential wrappers
            if k.startswith(a):
                k = b + k[len(a):]
                break
        irn[k] = v
    torch.save(irn, tmp_path / "cam.pth")
    loaded = ResNetCAM.from_checkpoint("resnet18", tmp_path / "cam.pth").eval()
    x = torch.randn(1, 3, 64, 48)
    out = loaded.extract(x)
    assert out["cams"].shape == (1, 3, 4, 3) and [f.shape[1] for f in out["features"]] == [256, 512]
    torch.testing.assert_close(out["cams"], net.extract(x)["cams"])
    del irn["classifier.weight"]
    torch.save(irn, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="classifier"):
        ResNetCAM.from_checkpoint("resnet18", tmp_path / "bad.pth")
    sd = net.state_dict()
    sd.pop("layer2.0.bn1.running_mean")
    torch.save(sd, tmp_path / "miss.pth")
    with pytest.raises(CheckpointError, match="layer2.0.bn1.running_mean"):
        ResNetCAM.from_checkpoint("resnet18", tmp_path / "miss.pth")


def test_official_resnet50_keys():
    from dhr_cli.models.resnet_cam import ResNetCAM

    sd = ResNetCAM(50, 20).state_dict()
    assert tuple(sd["classifier.weight"].shape) == (20, 2048, 1, 1) and "classifier.bias" not in sd
    assert "layer4.2.conv3.weight" in sd and "fc.weight" not in sd


def test_lite0_imagenet_weights_load_and_shapes():
    from dhr_cli.models.lite0 import Lite0Source

    uss = resolve_source("lite0", kind="uss")
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = uss.extract(x)
    assert [tuple(f.shape) for f in out["features"]] == [(2, 40, 8, 12), (2, 112, 4, 6), (2, 192, 4, 6)]
    assert out["cams"] is None
    # ImageNet weights, not random: the stem BN statistics are the checkpoint's
    assert not torch.allclose(uss.backbone.bn1.running_var, torch.ones_like(uss.backbone.bn1.running_var))
    with pytest.raises(CheckpointError, match="--train-head"):
        resolve_source("lite0", kind="wss", classes=["a", "b", "c"])  # an unfitted head is never handed out
    wss = Lite0Source("wss", classes=["a", "b", "c"], backbone=uss.backbone)
    with torch.no_grad():
        out = wss.extract(x)
    assert out["cams"].shape == (2, 3, 4, 6) and out["features"][0].shape == (2, 320, 4, 6)


def test_lite0_weights_conversion_is_strict():
    from dhr_cli.models.lite0 import convert_state_dict, weights_path

    sd = torch.load(weights_path(), map_location="cpu", weights_only=True)
    sd["_blocks.3._expand_conv_x.weight"] = sd.pop("_blocks.3._expand_conv.weight")
    with pytest.raises(CheckpointError, match="_expand_conv_x"):
        convert_state_dict(sd, [1, 2, 2, 3, 3, 4, 1])


# ---- CAUSE-TR ---------------------------------------------------------------------------------

def _cause_files(tmp_path, dim=64, reduced=9, queries=16, codes=32, seed=5):
    from dhr_cli.models.cause import CauseHead

    torch.manual_seed(seed)
    vit = tiny_vit(seed, layerscale=True, mask_token=True)
    head = CauseHead(dim, reduced, queries, codes)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.2)
    codebook = torch.randn(codes, dim)
    torch.save({"decoder": {f"head_ema.{k}": v for k, v in head.state_dict().items()}, "codebook": codebook},
               tmp_path / "CAUSE_VOC2012.pt")
    torch.save(vit.state_dict(), tmp_path / "dinov2.pth")
    return vit, head, codebook


def test_cause_official_key_shapes():
    from dhr_cli.models.cause import CauseHead

    with torch.device("meta"):
        sd = CauseHead(768, 90, 529, 2048).state_dict()
    assert tuple(sd["query_pos"].shape) == (529, 768)
    assert tuple(sd["tr.self_attn.in_proj_weight"].shape) == (3 * 768, 768)
    assert tuple(sd["tr.multihead_attn.out_proj.weight"].shape) == (768, 768)
    assert tuple(sd["tr.linear1.weight"].shape) == (2048, 768) and tuple(sd["tr.linear2.weight"].shape) == (768, 2048)
    assert tuple(sd["tr.f1.weight"].shape) == (90, 768, 1, 1) and tuple(sd["tr.f2.2.weight"].shape) == (90, 768, 1, 1)
    assert {"tr.norm3.weight", "tr.f2.0.bias"} <= set(sd) and "codebook" not in sd  # codebook is separate
    assert len(sd) == 1 + 4 + 4 + 4 + 6 + 2 + 4


def test_cause_packed_file_loads_and_runs(tmp_path, device):
    vit, head, codebook = _cause_files(tmp_path)
    with pytest.raises(CheckpointError, match="dinov2_vitb14_pretrain.pth"):
        resolve_source("cause", tmp_path / "CAUSE_VOC2012.pt")
    s = resolve_source("cause", tmp_path / "CAUSE_VOC2012.pt", device, backbone_weights=tmp_path / "dinov2.pth")
    assert s.kind == "uss" and s.feature_dims == (9,) and s.feature_dim == 9 and s.stride == 8
    torch.testing.assert_close(s.head.codebook.cpu(), codebook)
    x = torch.randn(2, 3, 24, 40, device=device)
    out = s.extract(x)["features"][0]
    assert out.shape == (2, 9, 3, 5) and torch.isfinite(out).all()
    # the codebook matters (vector quantisation picks the nearest code) and so does every weight
    with torch.no_grad():
        s.head.codebook.copy_(torch.randn_like(codebook))
    changed = s.extract(x)["features"][0]
    assert not torch.allclose(changed, out)
    with torch.no_grad():
        s.head.codebook.copy_(codebook)
        s.head.tr.linear2.bias.add_(1.0)
    assert not torch.allclose(s.extract(x)["features"][0], out)


def test_cause_bad_files_name_what_is_wrong(tmp_path):
    _cause_files(tmp_path)
    obj = torch.load(tmp_path / "CAUSE_VOC2012.pt", weights_only=True)
    obj["decoder"]["head_ema.tr.f2.weird.weight"] = obj["decoder"].pop("head_ema.tr.f2.2.weight")
    torch.save(obj, tmp_path / "renamed.pt")
    with pytest.raises(CheckpointError) as e:
        resolve_source("cause", tmp_path / "renamed.pt", backbone_weights=tmp_path / "dinov2.pth")
    assert "tr.f2.2.weight" in str(e.value) and "tr.f2.weird.weight" in str(e.value)
    torch.save({"decoder": obj["decoder"]}, tmp_path / "nocode.pt")
    with pytest.raises(CheckpointError, match="codebook"):
        resolve_source("cause", tmp_path / "nocode.pt", backbone_weights=tmp_path / "dinov2.pth")
    torch.save(tiny_vit().state_dict() | {"x": torch.zeros(1)}, tmp_path / "bad_backbone.pth")
    _cause_files(tmp_path)
    with pytest.raises(CheckpointError, match="unexpected keys 1"):
        resolve_source("cause", tmp_path / "CAUSE_VOC2012.pt", backbone_weights=tmp_path / "bad_backbone.pth")


# ---- MCTformer-V2 -----------------------------------------------------------------------------

def test_mctformer_official_key_shapes():
    from dhr_cli.models.mctformer import MCTformerV2

    with torch.device("meta"):
        sd = MCTformerV2(20).state_dict()
    assert tuple(sd["cls_token"].shape) == (1, 20, 384) and tuple(sd["pos_embed"].shape) == (1, 20 + 196, 384)
    assert tuple(sd["head.weight"].shape) == (20, 384, 3, 3) and tuple(sd["head.bias"].shape) == (20,)
    assert tuple(sd["blocks.11.attn.qkv.weight"].shape) == (1152, 384) and "norm.weight" in sd
    assert len(sd) == 2 + 2 + 12 * 12 + 2 + 2


def test_mctformer_checkpoint_cams_and_features(tmp_path):
    import argparse

    from dhr_cli.models.mctformer import MCTformerV2

    torch.manual_seed(0)
    net = MCTformerV2(3, embed_dim=64, depth=2, num_heads=1, patch_size=8, img_size=32, layer_index=1).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    # the authors' checkpoint.pth: {'model', 'optimizer', 'epoch', 'args' (an argparse Namespace)}
    torch.save({"model": net.state_dict(), "epoch": 59, "args": argparse.Namespace(model="MCTformerV2")},
               tmp_path / "checkpoint.pth")
    s = resolve_source("mctformer", tmp_path / "checkpoint.pth", classes=["a", "b", "c"])
    s.layer_index = 1
    x = torch.randn(2, 3, 24, 40)
    out = s.extract(x)
    assert out["cams"].shape == (2, 3, 3, 5) and out["features"][0].shape == (2, 64, 3, 5)
    assert (out["cams"] >= 0).all() and s.classes == ["a", "b", "c"]
    torch.testing.assert_close(out["cams"], net.extract(x)["cams"])
    # refinement by patch attention changes the maps; so does a changed head weight
    s.patch_attn_refine = False
    assert not torch.allclose(s.extract(x)["cams"], out["cams"])
    s.patch_attn_refine = True
    with torch.no_grad():
        s.head.bias.add_(1.0)
    assert not torch.allclose(s.extract(x)["cams"], out["cams"])
    with pytest.raises(CheckpointError, match="3 class tokens"):
        resolve_source("mctformer", tmp_path / "checkpoint.pth", classes=["a", "b"])


# ---- registry, ResNet depth, DHR network --------------------------------------------------------

def test_resnet_depth_read_from_weights_and_dhr_network(tmp_path):
    from dataclasses import asdict

    from dhr_cli.models.deeplab import DHRNet, NetworkSpec
    from dhr_cli.models.resnet_cam import ResNetCAM

    torch.save(ResNetCAM(18, 2).state_dict(), tmp_path / "r18.pth")
    s = resolve_source("resnet", tmp_path / "r18.pth", classes=["a", "b"])
    assert s.name == "resnet18" and s.kind == "wss" and s.classes == ["a", "b"]
    with pytest.raises(CheckpointError, match="2 classes"):
        resolve_source("resnet", tmp_path / "r18.pth", classes=["a", "b", "c"])
    spec = NetworkSpec("resnet18", 3, 2, output_stride=16)
    net = DHRNet(spec)
    torch.save({"spec": asdict(spec), "model": net.state_dict(), "classes": ["background", "a", "b"]},
               tmp_path / "model.pt")
    d = resolve_source("dhr", tmp_path / "model.pt", classes=["a", "b"])
    out = d.extract(torch.randn(1, 3, 64, 48))
    assert out["cams"].shape == (1, 2, 4, 3) and [f.shape[1] for f in out["features"]] == [256, 512]


def test_every_source_has_a_weights_hint():
    from dhr_cli.models import SOURCES, canonical

    for name, (kinds, hint) in SOURCES.items():
        assert set(kinds.split("|")) <= {"uss", "wss"}
        if name != "lite0":
            with pytest.raises(CheckpointError, match="never downloads"):
                resolve_source(name)
    assert canonical("DINOv2") == "dinov2_vitb14" and canonical("MCTformer-V2") == "mctformer"


# ---- multi-scale engine -------------------------------------------------------------------------

class _Probe(torch.nn.Module):
    """A fake WSS network: stride 4; features = 4x4 average of the image; CAMs = features[:2] * (1, 2)."""

    name, kind, stride, multiple, base_side, classes = "probe", "wss", 4, 4, None, ["x", "y"]
    feature_dims = (3,)

    def extract(self, images):
        f = torch.nn.functional.avg_pool2d(images, 4)
        return {"features": [f], "cams": f[:, :2] * f.new_tensor([1.0, 2.0]).view(1, 2, 1, 1)}


def test_multiscale_extract_grids_batching_and_normalisation(device):
    from dhr_cli.models.extract import multiscale_extract, scaled_size

    assert scaled_size((375, 500), 2.0, None, 14) == (756, 1008)  # DHR: int(s * side) grown to the patch
    assert scaled_size((375, 500), 0.5, None, 14) == (196, 252)
    assert scaled_size((100, 50), 1.0, 224, 1) == (224, 112)
    torch.manual_seed(0)
    x = torch.rand(3, 3, 20, 28, device=device) + 0.1
    probe = _Probe()
    res = multiscale_extract(probe, x, [[0, 1], [1], []], scales=(1.0, 0.5, 2.0), flip=True,
                             feature_scales=(2.0, 1.0))
    assert res[0]["cams"].shape == (2, 5, 7) and res[1]["cams"].shape == (1, 5, 7) and res[2]["cams"].shape[0] == 0
    assert res[0]["features"].shape == (3, 10, 14)  # the first feature scale's grid (2.0)
    for r in res[:2]:
        assert r["cams"].device == x.device
        torch.testing.assert_close(r["cams"].flatten(1).amax(1).cpu(), torch.ones(len(r["cams"])), atol=1e-4, rtol=0)
    # batched == one image at a time
    for i in range(3):
        one = multiscale_extract(probe, x[i:i + 1], [[[0, 1], [1], []][i]], scales=(1.0, 0.5, 2.0), flip=True,
                                 feature_scales=(2.0, 1.0))[0]
        torch.testing.assert_close(one["features"], res[i]["features"])
        torch.testing.assert_close(one["cams"], res[i]["cams"])
    # flip averaging: a left-right mirrored image gives mirrored maps
    m = multiscale_extract(probe, x.flip(-1), [[0, 1]] * 3, scales=(1.0,), flip=True)
    torch.testing.assert_close(m[0]["cams"], res_single(probe, x)[0]["cams"].flip(-1), atol=1e-5, rtol=1e-5)


def res_single(probe, x):
    from dhr_cli.models.extract import multiscale_extract

    return multiscale_extract(probe, x, [[0, 1]] * len(x), scales=(1.0,), flip=True)


def test_vit_matches_timm_reference_forward():
    """Oracles: timm's own VisionTransformer with the same weights (same key names) gives the same tokens;
    the explicit-size position resampling equals timm's; the compat path is DINO's formula."""
    import math

    from timm.layers import resample_abs_pos_embed
    from timm.models.vision_transformer import VisionTransformer

    from dhr_cli.models.vit import resample_patch_pos

    ours = tiny_vit(6)
    ref = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=1, num_classes=0,
                            qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.patch_tokens(x), ref.forward_features(x)[:, 1:], atol=1e-5, rtol=1e-4)
    pos = torch.randn(1, 16, 64)
    torch.testing.assert_close(resample_patch_pos(pos, 5, 7, dino_compat_interp=False),
                               resample_abs_pos_embed(pos, (5, 7), num_prefix_tokens=0, antialias=False))
    dino = torch.nn.functional.interpolate(pos.reshape(1, 4, 4, 64).permute(0, 3, 1, 2), mode="bicubic",
                                           scale_factor=((5 + 0.1) / math.sqrt(16), (7 + 0.1) / math.sqrt(16)))
    torch.testing.assert_close(resample_patch_pos(pos, 5, 7), dino.permute(0, 2, 3, 1).reshape(1, 35, 64))
    assert not torch.allclose(resample_patch_pos(pos, 5, 7), resample_patch_pos(pos, 5, 7, dino_compat_interp=False))


def test_mctformer_block_matches_timm_block():
    from dhr_cli.models.mctformer import MCTformerV2

    torch.manual_seed(7)
    net = MCTformerV2(2, embed_dim=64, depth=1, num_heads=2, patch_size=8, img_size=32).eval()
    x = torch.randn(2, 18, 64)
    with torch.no_grad():
        y, attn = net._block(net.blocks[0], x)
        torch.testing.assert_close(y, net.blocks[0](x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 18))  # rows of a softmax


def test_stego_official_head_shapes():
    """DHR's STEGO_VOC2012.pt / the .ckpt net.cluster* keys for ViT-B/8 with dim 70."""
    with torch.device("meta"):
        sd = ClusterProjection(768, 70).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        "cluster1.0.weight": (70, 768, 1, 1), "cluster1.0.bias": (70,),
        "cluster2.0.weight": (768, 768, 1, 1), "cluster2.0.bias": (768,),
        "cluster2.2.weight": (70, 768, 1, 1), "cluster2.2.bias": (70,)}
