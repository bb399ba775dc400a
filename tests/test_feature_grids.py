"""Finer and multi-layer feature grids (`dhr cams --feature-layers / --feature-stride`, docs/features.md),
and `dhr propagate` working on the finest grid it is given.

Networks are built with random weights on tiny images: the tests check shapes, strides, the
per-layer normalisation and the recorded provenance, not what the features are worth.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dhr_cli.cli import app
from dhr_cli.errors import InputError
from dhr_cli.models.extract import multiscale_extract

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def ceil_div(n: int, s: int) -> int:
    return -(-n // s)


@pytest.fixture(scope="module")
def lite0_backbone():
    from dhr_cli.models.lite0 import build_backbone

    return build_backbone(pretrained=False)


def lite0(backbone, kind="uss", layers=(), stride=None):
    from dhr_cli.models.lite0 import Lite0Source

    src = Lite0Source(kind, classes=["a", "b"] if kind == "wss" else None, backbone=backbone, pretrained=False)
    src.configure_features(layers, stride)
    return src.eval()


def native(src, x):
    """The stored features of one image at its own size (scale 1, no flip)."""
    return multiscale_extract(src, x, None, (), False, feature_scales=(1.0,), base_side=max(x.shape[2:]))[0]["features"]


def grid_of(x, s):
    return (ceil_div(x.shape[2], s), ceil_div(x.shape[3], s))


# lite0: (layers, stride) -> strides of the returned maps ('same' padding: a map is ceil(H / s))
LITE0 = [
    ((), None, [8, 16, 16]),  # the USS default: blocks.2, blocks.4, blocks.5
    ((), 8, [8, 8, 8]),
    ((), 32, [8, 16, 32]),
    (("2", "blocks.4", "blocks.5"), None, [8, 16, 16]),
    (("blocks.1", "blocks.6"), 32, [4, 32]),
    (("blocks.5", "2"), None, [16, 8]),  # the given order is kept; the grid is still the finest
]


@pytest.mark.parametrize("layers,stride,strides", LITE0)
def test_lite0_feature_maps_at_each_stride_and_layer_choice(lite0_backbone, layers, stride, strides):
    from dhr_cli.models.lite0 import STAGE_DIMS

    src = lite0(lite0_backbone, "uss", layers, stride)
    x = torch.randn(1, 3, 72, 40)
    with torch.no_grad():
        maps = src.extract(x)["features"]
    assert [tuple(m.shape[-2:]) for m in maps] == [grid_of(x, s) for s in strides]
    names = [f"blocks.{n}" if n.isdigit() else n for n in layers] or ["blocks.2", "blocks.4", "blocks.5"]
    assert [m.shape[1] for m in maps] == [STAGE_DIMS[int(n[-1])] for n in names] == list(src.feature_dims)
    spec = src.feature_spec()
    assert spec["layers"] == names and spec["stride"] == (stride or 16) and spec["layer_norm"] is True
    # concatenated on the finest grid
    res = native(src, x)
    assert tuple(res.shape) == (sum(src.feature_dims), *grid_of(x, min(strides)))


def test_lite0_wss_cams_follow_the_stride(lite0_backbone):
    x = torch.randn(2, 3, 64, 48)
    for stride in (8, 16, 32):
        src = lite0(lite0_backbone, "wss", ("blocks.2", "blocks.6"), stride)
        with torch.no_grad():
            out = src.extract(x)
        assert tuple(out["cams"].shape) == (2, 2, *grid_of(x, stride))
        assert [tuple(m.shape[1:]) for m in out["features"]] == [(40, *grid_of(x, 8)), (320, *grid_of(x, stride))]


def test_named_layers_are_l2_normalised_each(lite0_backbone):
    """Each named layer's block of the stored features has unit norm per cell (on its own grid), and
    so has each block of the USS default; the WSS network's default map is stored as it is."""
    x = torch.randn(1, 3, 64, 64)
    src = lite0(lite0_backbone, "uss", ("blocks.2", "blocks.4"))
    f = native(src, x)
    fine, coarse = f[:40], f[40:]
    torch.testing.assert_close(fine.norm(dim=0), torch.ones(f.shape[1:]), atol=1e-4, rtol=0)
    assert coarse.norm(dim=0).max() <= 1 + 1e-4  # bilinear mix of unit vectors
    default = native(lite0(lite0_backbone, "uss"), x)
    torch.testing.assert_close(default[:40].norm(dim=0), torch.ones(default.shape[1:]), atol=1e-4, rtol=0)
    plain = lite0(lite0_backbone, "wss")
    g = native(plain, x)
    assert not torch.allclose(g.norm(dim=0), torch.ones(g.shape[1:]), atol=0.1)


RESNET = [
    ((), None, [16, 16], 16),
    ((), 8, [8, 8], 8),
    ((), 32, [16, 32], 32),
    (("layer2", "layer3", "layer4"), None, [8, 16, 16], 16),
    (("layer1", "layer4"), 8, [4, 8], 8),
]


@pytest.fixture(scope="module")
def resnet50():
    from dhr_cli.models.resnet_cam import ResNetCAM

    return ResNetCAM(50, 3).eval()


@pytest.mark.parametrize("layers,stride,strides,cam_stride", RESNET)
def test_resnet50_feature_maps(resnet50, layers, stride, strides, cam_stride):
    net = resnet50  # configured anew each time: the options set, not add to, the maps
    net.configure_features(layers, stride)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out = net.extract(x)
    # torchvision: floor sizes from the stem; 64 x 96 divides evenly
    assert [tuple(m.shape[-2:]) for m in out["features"]] == [(64 // s, 96 // s) for s in strides]
    dims = {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
    assert [m.shape[1] for m in out["features"]] == [dims[n] for n in (layers or ("layer3", "layer4"))]
    assert tuple(out["cams"].shape) == (1, 3, 64 // cam_stride, 96 // cam_stride)
    assert net.feature_spec()["stride"] == cam_stride and net.layer_norm == bool(layers)


@pytest.fixture(scope="module")
def tiny_vit():
    from dhr_cli.models.vit import DinoViT

    torch.manual_seed(0)
    return DinoViT(embed_dim=32, depth=4, num_heads=2, patch_size=8, img_size=32).eval()


def test_vit_last_k_blocks(tiny_vit):
    from dhr_cli.models.vit import ViTSource

    x = torch.randn(1, 3, 40, 24)
    plain = ViTSource(tiny_vit, "dino_vits8")
    src = ViTSource(tiny_vit, "dino_vits8")
    src.configure_features(("last3",))
    assert src.feature_layers == ("blocks.1", "blocks.2", "blocks.3") and src.feature_dims == (32, 32, 32)
    with torch.no_grad():
        maps = src.extract(x)["features"]
        last = plain.extract(x)["features"][0]
        ref = tiny_vit.get_intermediate_layers(x, 3)  # DINO's own: the last n blocks after the final norm
    assert [tuple(m.shape) for m in maps] == [(1, 32, 5, 3)] * 3
    torch.testing.assert_close(maps[-1], last)
    for m, r in zip(maps, ref):
        torch.testing.assert_close(m, r[:, 1:].transpose(1, 2).reshape(1, 32, 5, 3))
    f = native(src, x)
    assert f.shape == (96, 5, 3)
    torch.testing.assert_close(f[32:64].norm(dim=0), torch.ones(5, 3), atol=1e-4, rtol=0)
    src2 = ViTSource(tiny_vit, "dino_vits8")
    src2.configure_features(("blocks.0", "2"))
    assert src2.feature_layers == ("blocks.0", "blocks.2")


def test_unsupported_combinations_are_one_line_input_errors(lite0_backbone, tiny_vit):
    from dhr_cli.models.resnet_cam import ResNetCAM
    from dhr_cli.models.stego import ClusterProjection, StegoSource
    from dhr_cli.models.vit import ViTSource

    vit = ViTSource(tiny_vit, "dino_vits8")
    cases = [
        (lambda: vit.configure_features((), 16), "patch grid"),
        (lambda: vit.configure_features(("last9",)), "4 blocks"),
        (lambda: vit.configure_features(("blocks.7",)), "has layers"),
        (lambda: lite0(lite0_backbone, "uss", ("blocks.7",)), "has layers"),
        (lambda: lite0(lite0_backbone, "uss", ("blocks.4", "4")), "twice"),
        (lambda: lite0(lite0_backbone, "uss", (), 4), "output stride 8, 16, 32 only"),
        (lambda: ResNetCAM(18, 2).configure_features(("layer5",)), "layer1, layer2"),
        (lambda: StegoSource(tiny_vit, ClusterProjection(32, 4)).configure_features(("blocks.0",)), "offers no"),
        (lambda: StegoSource(tiny_vit, ClusterProjection(32, 4)).configure_features((), 16), "offers no"),
    ]
    for make, words in cases:
        with pytest.raises(InputError, match=words) as e:
            make()
        assert "\n" not in str(e.value)
    StegoSource(tiny_vit, ClusterProjection(32, 4)).configure_features((), 8)  # its own stride: nothing to change
    from dhr_cli.models.lite0 import check_feature_options  # what `dhr cams --train-head` checks before fitting

    check_feature_options(("0", "blocks.6"), 8)
    check_feature_options((), None)
    with pytest.raises(InputError, match="stride 12"):
        check_feature_options((), 12)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from dhr_cli.testing.synthetic import make_dataset

    return make_dataset(tmp_path_factory.mktemp("fgrid") / "d", n_images=3, stores=False)


def test_cli_writes_multi_layer_features_and_records_them(data, tmp_path):
    from dhr_cli.io.datasets import open_dataset
    from dhr_cli.io.store import open_store

    out = tmp_path / "uss.h5"
    r = invoke("cams", "--data", data, "--split", "train", "--uss", "lite0", "--feature-layers", "blocks.2,blocks.5",
               "--scales", "1.0", "--no-flip", "--feature-rank", 0, "--device", "cpu", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    ds = open_dataset(data, "train")
    with open_store(out, expect="features") as s:
        prov = s.provenance
        for i in s.ids:
            h, w = ds.image_size(i)
            f = s.read(i).features
            assert f.shape == (40 + 192, *(ceil_div(int(x * 224 / max(h, w)), 8) for x in (h, w)))
            assert s.read(i).image_size == (h, w)
    assert prov["feature_maps"] == {"layers": ["blocks.2", "blocks.5"], "stride": 16, "layer_norm": True,
                                    "dims": [40, 192]}
    assert prov["options"]["feature_layers"] == ["blocks.2", "blocks.5"] and prov["options"]["feature_stride"] is None


def test_cli_bad_feature_options_are_one_line_errors(data, tmp_path):
    out = tmp_path / "x.h5"
    # checked before the head is fitted (a 10**6-step fit would time the test out)
    r = invoke("cams", "--data", data, "--wss", "lite0", "--train-head", "--head-steps", 10**6,
               "--feature-layers", "blocks.9", "--device", "cpu", "--out", out)
    assert r.exit_code == 1 and "blocks.9" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    r = invoke("cams", "--data", data, "--uss", "lite0", "--feature-stride", 4, "--out", out)
    assert r.exit_code == 1 and "8, 16 or 32" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    r = invoke("cams", "--data", data, "--uss", "lite0", "--feature-layers", ",", "--out", out)
    assert r.exit_code == 1 and "at least one layer" in r.output
    assert not out.exists()


# ---- propagation on the finest grid it is given ------------------------------------------------
def _scene(root, size=64, small=(40, 46, 40, 46)):
    """Background, a big class-1 block, a small class-2 square; exact masks and labels."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("background\nbig\nsmall\n")
    gt = np.zeros((size, size), np.uint8)
    gt[8:56, 4:30] = 1
    y0, y1, x0, x1 = small
    gt[y0:y1, x0:x1] = 2
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / "images" / "a.png")
    Image.fromarray(gt).save(root / "masks" / "a.png")
    (root / "labels.json").write_text(json.dumps({"a": ["big", "small"]}))
    return gt


def _features_store(path, gt, grid, classes):
    """One-hot ground truth pooled to `grid` (adaptive average): features that know the classes exactly."""
    from dhr_cli.io.provenance import make_provenance
    from dhr_cli.io.store import create_store

    onehot = torch.nn.functional.one_hot(torch.from_numpy(gt).long(), 3).permute(2, 0, 1).float()[None]
    f = torch.nn.functional.adaptive_avg_pool2d(onehot, grid)[0].numpy() + 0.05
    with create_store(path, "features", classes, provenance=make_provenance("test"), root_attrs={"source": "test"}) as w:
        w.write("a", {"features": f.astype(np.float32)}, {"features": {"image_size": list(gt.shape)}})


def test_propagate_uses_the_finer_uss_grid(tmp_path):
    """A USS store on a finer grid than the WSS store (and the seeds resized to it, Step 2.1) keeps a
    small object that the coarse grid loses: propagation works on the grid of the USS features."""
    from dhr_cli.io.provenance import make_provenance
    from dhr_cli.io.store import create_store, open_store

    root = tmp_path / "d"
    gt = _scene(root)
    classes = ["background", "big", "small"]
    seeds = tmp_path / "seeds.h5"
    with create_store(seeds, "seeds", classes, provenance=make_provenance("test")) as w:
        w.write("a", {"mask": gt})
    _features_store(tmp_path / "wss.h5", gt, (4, 4), classes)
    ious = {}
    for name, grid in (("coarse", (4, 4)), ("fine", (16, 16))):
        uss = tmp_path / f"uss_{name}.h5"
        _features_store(uss, gt, grid, classes)
        out = tmp_path / f"masks_{name}.h5"
        r = invoke("propagate", "--seeds", seeds, "--data", root, "--uss", uss, "--wss", tmp_path / "wss.h5",
                   "--out", out, "--no-crf", "--no-restore-classes", "--no-recover", "--device", "cpu", "--quiet")
        assert r.exit_code == 0, r.output
        with open_store(out, expect="masks") as s:
            mask = s.read("a").mask
        assert mask.shape == gt.shape and 255 not in mask
        ious[name] = ((mask == 2) & (gt == 2)).sum() / max(((mask == 2) | (gt == 2)).sum(), 1)
    # 6 x 6 px: under half of a 16 px cell (wins none), several 4 px cells
    assert ious["coarse"] == 0 and ious["fine"] > 0.5, ious

