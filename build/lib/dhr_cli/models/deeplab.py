"""The DHR segmentation network: DeepLabv3+ on a torchvision ResNet, plus a 1x1 CAM head.

    image (B, 3, H, W) -> ResNet (dilated, output stride 8 or 16) -> C2 (stride 4), C4, C5
    logits = DeepLabv3+ decoder(ASPP(C5), C2)       (B, C, H/4, W/4)   C = classes incl. background
    cams   = conv1x1(C5 resized to stride 16)        (B, K, H/16, W/16) K = foreground classes

C4 and C5 are returned too: they are the WSS features of Step 3 of the online regeneration,
and what `dhr cams --wss RUN_DIR` exports. ImageNet initialisation comes from a local
torchvision ResNet state dict (nothing is downloaded); without one the backbone is random.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet

from dhr_cli.errors import CheckpointError, InputError

logger = logging.getLogger(__name__)

BACKBONES = {
    # name: (constructor, C2 channels, C4 channels, C5 channels)
    "resnet18": (resnet.resnet18, 64, 256, 512),
    "resnet34": (resnet.resnet34, 64, 256, 512),
    "resnet50": (resnet.resnet50, 256, 1024, 2048),
    "resnet101": (resnet.resnet101, 256, 1024, 2048),
}


@dataclass(frozen=True)
class NetworkSpec:
    """What is needed to rebuild the network; stored in every checkpoint."""

    backbone: str
    num_classes: int  # segmentation classes, background included when the dataset has one
    num_cam_classes: int  # foreground classes (CAM head)
    output_stride: int = 8
    decoder_channels: int = 256
    low_channels: int = 48
    dropout: bool = True

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise InputError(f"backbone {self.backbone!r} is not one of {', '.join(BACKBONES)}")
        if self.output_stride not in (8, 16):
            raise InputError(f"output stride must be 8 or 16, got {self.output_stride}")
        if self.num_classes < 1 or self.num_cam_classes < 1:
            raise InputError(f"the network needs classes, got {self.num_classes} / {self.num_cam_classes}")


def _conv_block(cin: int, cout: int, k: int, dilation: int = 1, dropout: float = 0.0) -> nn.Sequential:
    pad = 0 if k == 1 else dilation
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False),
                               nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabv3): rates 12/24/36 at stride 8, 6/12/18 at 16."""

    def __init__(self, cin: int, cout: int, output_stride: int, dropout: bool):
        super().__init__()
        rates = (12, 24, 36) if output_stride == 8 else (6, 12, 18)
        self.branches = nn.ModuleList([_conv_block(cin, cout, 1)] + [_conv_block(cin, cout, 3, r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False), nn.ReLU(inplace=True))
        self.project = _conv_block(5 * cout, cout, 1, dropout=0.5 if dropout else 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(x).expand(-1, -1, x.shape[2], x.shape[3])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class DeepLabV3PlusDecoder(nn.Module):
    def __init__(self, c5: int, c2: int, num_classes: int, channels: int, low: int, output_stride: int, dropout: bool):
        super().__init__()
        self.aspp = ASPP(c5, channels, output_stride, dropout)
        self.low = _conv_block(c2, low, 1)
        self.fuse = nn.Sequential(_conv_block(channels + low, channels, 3, dropout=0.5 if dropout else 0.0),
                                  _conv_block(channels, channels, 3, dropout=0.1 if dropout else 0.0))
        self.classifier = nn.Conv2d(channels, num_classes, 1, bias=False)

    def forward(self, c5: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
        x = self.aspp(c5)
        x = F.interpolate(x, size=c2.shape[2:], mode="bilinear", align_corners=False)
        return self.classifier(self.fuse(torch.cat([x, self.low(c2)], dim=1)))


def _dilate_basic_layer(layer: nn.Sequential, dilation: int) -> None:
    """Turn the stride of a BasicBlock layer into dilation (torchvision refuses it for BasicBlock)."""
    for block in layer:
        for conv in (block.conv1, block.conv2):
            conv.stride = (1, 1)
            conv.dilation = (dilation, dilation)
            conv.padding = (dilation, dilation)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


class DHRNet(nn.Module):
    """DeepLabv3+ with the DHR CAM head. `forward(x, with_features=True)` also returns C4, C5."""

    def __init__(self, spec: NetworkSpec):
        super().__init__()
        self.spec = spec
        ctor, c2, _c4, c5 = BACKBONES[spec.backbone]
        if spec.backbone in ("resnet50", "resnet101"):
            dil = [False, True, True] if spec.output_stride == 8 else [False, False, True]
            net = ctor(weights=None, replace_stride_with_dilation=dil)
        else:
            net = ctor(weights=None)
            if spec.output_stride == 8:
                _dilate_basic_layer(net.layer3, 2)
                _dilate_basic_layer(net.layer4, 4)
            else:
                _dilate_basic_layer(net.layer4, 2)
        net.fc = nn.Identity()
        net.avgpool = nn.Identity()
        self.backbone = net
        self.decoder = DeepLabV3PlusDecoder(c5, c2, spec.num_classes, spec.decoder_channels, spec.low_channels,
                                            spec.output_stride, spec.dropout)
        self.cam_head = nn.Conv2d(c5, spec.num_cam_classes, 1, bias=False)

    def new_parameters(self) -> list[nn.Parameter]:
        """Parameters not initialised from ImageNet (decoder and CAM head: 10x learning rate)."""
        return list(self.decoder.parameters()) + list(self.cam_head.parameters())

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, 3, H, W) normalised -> C2 (B, c2, H/4, W/4), C4, C5 (B, c, H/os, W/os)."""
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        c2 = b.layer1(x)
        c4 = b.layer3(b.layer2(c2))
        c5 = b.layer4(c4)
        return c2, c4, c5

    def cam_logits(self, c5: torch.Tensor) -> torch.Tensor:
        """CAM head on C5 at stride 16: (B, K, ceil(h5/2), ceil(w5/2)) at output stride 8."""
        if self.spec.output_stride == 8:
            size = ((c5.shape[2] + 1) // 2, (c5.shape[3] + 1) // 2)
            c5 = F.interpolate(c5, size=size, mode="bilinear", align_corners=False)
        return self.cam_head(c5)

    def forward(self, x: torch.Tensor, with_features: bool = False, with_logits: bool = True) -> dict[str, torch.Tensor]:
        """x (B, 3, H, W) -> {'cams' (B, K, H/16, W/16), 'logits' (B, C, H/4, W/4)[, 'C4', 'C5']}."""
        c2, c4, c5 = self.features(x)
        out = {"cams": self.cam_logits(c5)}
        if with_logits:
            out["logits"] = self.decoder(c5, c2)
        if with_features:
            out["C4"], out["C5"] = c4, c5
        return out


def build_network(spec: NetworkSpec, backbone_weights: str | os.PathLike | None = None) -> DHRNet:
    """The network, with the backbone initialised from a torchvision ResNet state dict when given."""
    net = DHRNet(spec)
    if backbone_weights is not None:
        load_backbone_weights(net, backbone_weights)
    else:
        logger.info("backbone %s initialised randomly (no --backbone-weights)", spec.backbone)
    return net


def _unwrap(state: object) -> dict:
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if key in state and isinstance(state[key], dict):
                return state[key]
        return state
    raise CheckpointError("not a state dict")


def load_backbone_weights(net: DHRNet, path: str | os.PathLike) -> None:
    """Load a torchvision ResNet state dict (e.g. resnet101-63fe2227.pth) into the backbone, strictly."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: backbone weights file not found")
    from dhr_cli.models.checkpoints import read_checkpoint

    obj = read_checkpoint(path, inert=False)  # CheckpointError: missing, not a checkpoint, unreadable
    try:
        state = _unwrap(obj)
    except CheckpointError:
        raise CheckpointError(f"{path}: does not hold a state dict") from None
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    from dhr_cli.models.checkpoints import load_strict

    load_strict(net.backbone, state, f"{path} (torchvision {net.spec.backbone} backbone)")
    logger.info("backbone %s initialised from %s", net.spec.backbone, path)


def load_trained(model: str | os.PathLike, device: torch.device | str = "cpu", use_ema: bool = True) -> tuple[DHRNet, dict]:
    """A network trained by `dhr train`, from RUN_DIR (its final or last checkpoint) or a .pt file.

    Returns (network in eval mode on `device`, checkpoint metadata: spec, classes, config, epoch).
    """
    path = Path(model)
    if path.is_dir():
        for name in ("model.pt", "checkpoints/last.pt"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise CheckpointError(f"{model}: holds no model.pt or checkpoints/last.pt; is it a `dhr train` run folder?")
    if not path.is_file():
        raise CheckpointError(f"{path}: model file not found")
    from dhr_cli.models.checkpoints import read_checkpoint

    ckpt = read_checkpoint(path, inert=False)
    if not isinstance(ckpt, dict) or "spec" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a `dhr train` checkpoint (no 'spec' / 'model' entries)")
    spec = NetworkSpec(**ckpt["spec"])
    net = DHRNet(spec)
    state = ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the network it describes ({str(e).splitlines()[0]})") from None
    net.to(device).eval()
    meta = {k: v for k, v in ckpt.items() if k not in ("model", "ema", "optimizer", "scaler")}
    meta["path"] = str(path)
    return net, meta
