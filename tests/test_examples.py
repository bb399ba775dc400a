"""examples/: every workflow script runs end to end on tiny generated data (bash, the real `dhr`).

The checkpoints are full-size and keyed as the official files (a ResNet-50 CAM network, DINO ViT-S/8,
DHR's packed STEGO head), with random values; images are 48x64 and networks run at one scale.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dhr_cli.io.datasets import VOC_CLASSES
from dhr_cli.io.store import open_store
from tests.helpers import _xml, save_palette_png, write_plain_store

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="the examples are bash scripts")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
H, W = 48, 64
# id -> foreground label values; train.txt lists all but the last, val.txt the last
ITEMS = {"2007_000032": (1, 15), "2007_000039": (19,), "2008_000001": (8,)}
TRAIN = sorted(list(ITEMS)[:-1])


def _dhr() -> str:
    exe = Path(sys.executable).with_name("dhr")
    return str(exe) if exe.exists() else f"{sys.executable} -m dhr_cli"


def run_example(script: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "DHR": _dhr(), "DEVICE": "cpu", **{k: str(v) for k, v in env.items()}}
    return subprocess.run(["bash", str(EXAMPLES / script)], cwd=cwd, env=full, capture_output=True, text=True,
                          timeout=300)


def check(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r


def gt_mask(item_id: str) -> np.ndarray:
    """Each labelled class a rectangle; a 255 border row (ignore)."""
    mask = np.zeros((H, W), np.uint8)
    for k, c in enumerate(ITEMS[item_id]):
        mask[6 + 10 * k: 30 + 10 * k, 8 + 20 * k: 36 + 20 * k] = c
    mask[0, :] = 255
    return mask


def make_tiny_voc(base: Path) -> Path:
    """base/VOCdevkit/VOC2012 with JPEGImages, SegmentationClass, Annotations, ImageSets/Segmentation."""
    root = base / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for item_id in ITEMS:
        mask = gt_mask(item_id)
        image = (rng.integers(0, 60, (H, W, 3)) + 150 * (mask[..., None] % 255 > 0)).astype(np.uint8)
        Image.fromarray(image).save(root / "JPEGImages" / f"{item_id}.jpg", quality=95)
        save_palette_png(root / "SegmentationClass" / f"{item_id}.png", mask)
        (root / "Annotations" / f"{item_id}.xml").write_text(_xml(VOC_CLASSES[c] for c in ITEMS[item_id]))
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(list(ITEMS)[:-1]) + "\n")
    (root / "ImageSets/Segmentation/val.txt").write_text(list(ITEMS)[-1] + "\n")
    return root


def make_checkpoints(base: Path) -> dict[str, Path]:
    """Full-size, official key names, random values: a ResNet-50 CAM net (torchvision names + classifier.weight,
    20 VOC classes), DINO ViT-S/8 (dino_deitsmall8_300ep_pretrain.pth) and DHR's packed STEGO head."""
    from dhr_cli.models.resnet_cam import ResNetCAM
    from dhr_cli.models.stego import ClusterProjection
    from dhr_cli.models.vit import build_vit

    torch.manual_seed(0)
    res50 = ResNetCAM(50, 20).state_dict()
    assert tuple(res50["classifier.weight"].shape) == (20, 2048, 1, 1) and "layer4.2.conv3.weight" in res50
    paths = {"wss": base / "res50_cam.pth", "dino": base / "dino_deitsmall8_300ep_pretrain.pth",
             "stego": base / "STEGO_VOC2012.pt"}
    torch.save(res50, paths["wss"])
    with torch.device("meta"):  # the official shapes without timm's slow init; values like its trunc_normal(.02)
        shapes = {k: v.shape for k, v in build_vit("dino_vits8").state_dict().items()}
    assert shapes["pos_embed"] == (1, 785, 384) and shapes["blocks.11.attn.qkv.weight"] == (1152, 384)
    vit = {k: torch.ones(v) if k.endswith("norm1.weight") or k.endswith("norm2.weight") or k == "norm.weight"
           else 0.02 * torch.randn(v) for k, v in shapes.items()}
    torch.save(vit, paths["dino"])
    proj = ClusterProjection(384, 70)
    torch.save({"cluster1": proj.cluster1.state_dict(), "cluster2": proj.cluster2.state_dict()}, paths["stego"])
    return paths


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    return make_tiny_voc(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def voc_run(voc, tmp_path_factory) -> Path:
    """examples/voc_with_your_checkpoints.sh on the tiny VOC root, once for the module."""
    work = tmp_path_factory.mktemp("voc_run")
    ck = make_checkpoints(work)
    out = work / "out"
    check(run_example("voc_with_your_checkpoints.sh", work, VOC=voc.parent, OUT=out, WSS_WEIGHTS=ck["wss"],
                      USS="stego", USS_WEIGHTS=ck["stego"], BACKBONE_WEIGHTS=ck["dino"], SIDE=64, SCALES="1.0"))
    return out


def _kind_ids(path: Path) -> tuple[str, list[str]]:
    with open_store(path) as s:
        return s.kind, list(s.ids)


def _png(path: Path) -> tuple[str, np.ndarray]:
    with Image.open(path) as im:
        return im.mode, np.asarray(im)


def _check_eval(path: Path, images: int) -> dict:
    rep = json.loads(path.read_text())
    for k in ("miou", "mfpr", "mfnr", "vanishing_rate"):
        assert 0.0 <= rep[k] <= 1.0, (k, rep[k])
    assert rep["images"] == images and "background" in rep["per_class"]
    return rep


@pytest.mark.slow
def test_voc_with_your_checkpoints(voc_run):
    out = voc_run
    assert _kind_ids(out / "cams.h5") == ("cams", TRAIN)
    assert _kind_ids(out / "uss.h5") == ("features", TRAIN)
    assert _kind_ids(out / "seeds.h5") == ("seeds", TRAIN)
    assert _kind_ids(out / "masks.h5") == ("masks", TRAIN)
    with open_store(out / "cams.h5") as s:
        for i in TRAIN:
            item = s.read(i)
            assert item.labels.tolist() == sorted(ITEMS[i]) and item.image_size == (H, W)
            assert item.features is not None  # the ResNet's features, which propagate uses as WSS
    with open_store(out / "uss.h5") as s:
        assert s.attrs["source"] == "stego" and s.read(TRAIN[0]).features.shape[0] == 70
    _check_eval(out / "eval.json", len(TRAIN))
    assert sorted(p.stem for p in (out / "png").iterdir()) == TRAIN
    for i in TRAIN:
        mode, png = _png(out / "png" / f"{i}.png")
        assert mode == "P" and png.shape == (H, W)
        assert set(np.unique(png).tolist()) <= {0, 255, *ITEMS[i]}


def irn_res50_cam_state_dict() -> dict:
    """What IRN's step/train_cam.py saves (torch.save(model.module.state_dict(), 'sess/res50_cam.pth' + '.pth')):
    net/resnet50_cam.Net registers each backbone module several times (resnet50.*, stage1..4 wrapping
    resnet50's modules in nn.Sequential, backbone = ModuleList of the stages, newly_added = [classifier]),
    and state_dict() lists every tensor under each of those names."""
    import torchvision
    from torch import nn

    class Net(nn.Module):  # IRN's layout; IRN's own resnet50 has torchvision's names and no fc
        def __init__(self):
            super().__init__()
            r = torchvision.models.resnet50(weights=None)
            del r.fc, r.avgpool
            self.resnet50 = r
            self.stage1 = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1)
            self.stage2, self.stage3, self.stage4 = (nn.Sequential(r.layer2), nn.Sequential(r.layer3),
                                                     nn.Sequential(r.layer4))
            self.classifier = nn.Conv2d(2048, 20, 1, bias=False)
            self.backbone = nn.ModuleList([self.stage1, self.stage2, self.stage3, self.stage4])
            self.newly_added = nn.ModuleList([self.classifier])

    return Net().state_dict()


def test_irn_res50_cam_file_as_irn_writes_it(tmp_path):
    from dhr_cli.models import resolve_source

    sd = irn_res50_cam_state_dict()
    assert {"resnet50.layer2.0.conv1.weight", "stage2.0.0.conv1.weight", "backbone.1.0.0.conv1.weight",
            "stage1.4.0.conv1.weight", "classifier.weight", "newly_added.0.weight"} <= set(sd)
    torch.save(sd, tmp_path / "res50_cam.pth.pth")
    src = resolve_source("resnet", tmp_path / "res50_cam.pth.pth")
    assert src.name == "resnet50"
    torch.testing.assert_close(src.layer2[0].conv1.weight, sd["stage2.0.0.conv1.weight"])


def _write_peer_cams(fmt: str, dst: Path) -> dict[str, np.ndarray]:
    """IRN's step/make_cam.py dicts or MCTformer's {class: map}; CAMs peak on each class's rectangle."""
    dst.mkdir()
    rng = np.random.default_rng(1)
    written = {}
    for i in TRAIN:
        gt = gt_mask(i)
        keys = np.asarray(ITEMS[i], np.int64) - 1  # 0-based foreground ids
        cams = np.stack([(gt == k + 1) * 0.8 + 0.2 * rng.random((H, W)) for k in keys]).astype(np.float32)
        cams /= cams.reshape(len(keys), -1).max(1)[:, None, None] + 1e-5
        if fmt == "irn":
            d = {"keys": torch.from_numpy(keys), "cam": torch.from_numpy(cams[:, ::4, ::4].copy()), "high_res": cams}
        else:
            d = {int(k): c for k, c in zip(keys, cams)}
        np.save(dst / f"{i}.npy", d)
        written[i] = cams
    return written


def _write_dhr_pt_features(dst: Path) -> None:
    """DHR's produce_uss_features.py output: <id>.pt, a float16 (C, h, w) tensor (C = 70 for STEGO)."""
    dst.mkdir()
    for n, i in enumerate(TRAIN):
        g = torch.Generator().manual_seed(n)
        base = torch.randn(70, 2, generator=g)
        small = torch.from_numpy(gt_mask(i)[::8, ::8].astype(np.int64) % 255 > 0).long()  # (6, 8) fg/bg
        torch.save((base[:, small] + 0.1 * torch.randn(70, 6, 8, generator=g)).half(), dst / f"{i}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["irn", "mctformer"])
def test_import_peer_cams(fmt, voc, voc_run, tmp_path):
    cams = _write_peer_cams(fmt, tmp_path / "cam")
    _write_dhr_pt_features(tmp_path / "pt")
    out = tmp_path / "out"
    # WSS features: the cams store of the VOC run holds the ResNet's features (a store you already have)
    check(run_example("import_irn_cams.sh", tmp_path, FORMAT=fmt, CAM_DIR=tmp_path / "cam", DATA=voc, OUT=out,
                      USS_PT_DIR=tmp_path / "pt", WSS_FEATURES=voc_run / "cams.h5", CRF=0))  # the VOC run covers the CRF
    with open_store(out / "cams.h5", expect="cams") as s:
        assert s.ids == TRAIN
        for i in TRAIN:
            item = s.read(i)
            assert item.labels.tolist() == list(ITEMS[i]) and item.image_size == (H, W)
            np.testing.assert_allclose(item.cams, cams[i], atol=2e-3)
    with open_store(out / "uss.h5", expect="features") as s:
        assert s.attrs["source"] == "stego" and s.read(TRAIN[0]).features.shape == (70, 6, 8)
    assert _kind_ids(out / "seeds.h5") == ("seeds", TRAIN)
    assert _kind_ids(out / "masks.h5") == ("masks", TRAIN)
    rep = _check_eval(out / "eval.json", len(TRAIN))
    if fmt == "irn":  # CAMs on the objects and fg/bg-separable USS features: the masks find the objects
        assert rep["miou"] > 0.5, rep


def test_import_needs_wss_features(voc, tmp_path):
    r = run_example("import_irn_cams.sh", tmp_path, CAM_DIR=tmp_path, DATA=voc, OUT=tmp_path / "o")
    assert r.returncode == 2 and "WSS_WEIGHTS" in r.stderr and not (tmp_path / "o").exists()


def _load_dataset_module():
    spec = importlib.util.spec_from_file_location("pseudo_mask_dataset", EXAMPLES / "pseudo_mask_dataset.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_masks_for_another_trainer(voc, tmp_path):
    # a masks store whose masks are the ground truth: exact values to find again, 255 included
    ids = list(ITEMS)
    masks = write_plain_store(tmp_path / "masks.h5", "masks", VOC_CLASSES,
                              {i: ("mask", gt_mask(i), {}) for i in ids})
    out = tmp_path / "pseudo_voc"
    r = check(run_example("masks_for_another_trainer.sh", tmp_path, DATA=voc.parent.parent, MASKS=masks, OUT=out,
                          SPLIT="train"))
    assert f"({len(ids)} images)" in r.stdout
    assert (out / "train_aug.txt").read_text().split() == sorted(ids)
    assert (out / "JPEGImages").resolve() == (voc / "JPEGImages").resolve()
    for i in ids:
        mode, png = _png(out / "SegmentationClassAug" / f"{i}.png")
        assert mode == "P" and png.shape == (H, W)
        np.testing.assert_array_equal(png, gt_mask(i))
    rep = _check_eval(out / "pseudo_mask_scores.json", len(TRAIN))
    assert rep["miou"] == pytest.approx(1.0)

    # a second run into the same folder is refused (stale masks would end up in the list) unless OVERWRITE=1
    r = run_example("masks_for_another_trainer.sh", tmp_path, DATA=voc, MASKS=masks, OUT=out)
    assert r.returncode != 0 and "--overwrite" in r.stderr

    mod = _load_dataset_module()
    ds = mod.PseudoMaskDataset(out / "JPEGImages", out / "SegmentationClassAug", out / "train_aug.txt")
    assert len(ds) == len(ids) and ds.ids == sorted(ids)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, shuffle=False)
    images, batch = next(iter(loader))
    assert images.shape == (2, 3, H, W) and images.dtype == torch.float32 and 0 <= images.min() <= images.max() <= 1
    assert batch.shape == (2, H, W) and batch.dtype == torch.int64
    for b, i in enumerate(sorted(ids)[:2]):
        np.testing.assert_array_equal(batch[b].numpy(), gt_mask(i).astype(np.int64))  # class ids, 255 kept
        jpeg = np.asarray(Image.open(voc / "JPEGImages" / f"{i}.jpg").convert("RGB"), np.float32) / 255
        np.testing.assert_allclose(images[b].permute(1, 2, 0).numpy(), jpeg)
    assert torch.nn.functional.cross_entropy(torch.zeros(2, 21, H, W), batch, ignore_index=255).isfinite()
    with pytest.raises(FileNotFoundError, match="no image"):
        mod.PseudoMaskDataset(tmp_path, out / "SegmentationClassAug")
