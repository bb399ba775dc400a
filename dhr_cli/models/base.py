"""The interface every CAM / feature network exposes to `dhr cams`."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from dhr_cli.errors import InputError, ShapeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_images(x: torch.Tensor, multiple: int = 1) -> None:
    """Guard: (B, 3, H, W) float, sides divisible by `multiple`."""
    if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise ShapeError(f"images: expected float (B, 3, H, W), got {x.dtype} {tuple(x.shape)}")
    if multiple > 1 and (x.shape[2] % multiple or x.shape[3] % multiple):
        raise ShapeError(f"images: H and W must be multiples of {multiple}, got {tuple(x.shape[2:])}")


class FeatureSource(nn.Module):
    """A frozen network producing feature maps (USS or WSS) and, for WSS, CAMs.

    Attributes: `name`; `kind` "uss" | "wss"; `stride` (of `features[0]` and the CAMs);
    `feature_dims` (D of each feature map); `multiple` (input sides must be multiples of it);
    `base_side` (the longer image side is resized to this at scale 1.0; None = native size);
    `classes` (names of the CAM channels, WSS only); `layer_norm` (each feature map is
    L2-normalised per cell before the maps are concatenated: set by `configure_features`).

    `extract(images)` takes (B, 3, H, W) ImageNet-normalised float images and returns
    {"features": [(B, D_i, h, w), ...], "cams": (B, C, h, w) or None} (CAMs before relu).
    """

    name: str = "?"
    kind: Literal["uss", "wss"] = "uss"
    stride: int = 16
    feature_dims: tuple[int, ...] = ()
    multiple: int = 1
    base_side: int | None = None
    classes: list[str] | None = None
    layer_norm: bool = False
    # Names `configure_features` accepts (empty: the network offers no choice) and the output
    # strides it can run at (empty: only its own `stride`).
    layer_names: tuple[str, ...] = ()
    strides: tuple[int, ...] = ()
    feature_layers: tuple[str, ...] = ()  # the layers `extract` returns (the network's default ones)

    @property
    def feature_dim(self) -> int:
        """D of the stored features: the feature maps concatenated (on the first map's grid)."""
        return int(sum(self.feature_dims))

    def extract(self, images: torch.Tensor) -> dict:
        raise NotImplementedError

    def configure_features(self, layers=(), stride: int | None = None) -> None:
        """Choose the feature maps `extract` returns (`dhr cams --feature-layers / --feature-stride`).

        layers: names from `layer_names` (empty: back to the network's default maps, unnormalised); named
        layers are each L2-normalised per cell and concatenated on the finest of their grids.
        stride: the network's output stride (one of `strides`). Raises InputError for a network or
        a combination that does not offer it.
        """
        if layers or (stride is not None and stride != self.stride):
            what = "--feature-layers" if layers else f"--feature-stride {stride}"
            raise InputError(f"network {self.name!r} offers no {what} (supported by lite0, resnet and the DINO ViTs)")

    def feature_spec(self) -> dict:
        """What the stored features are (recorded in the store's provenance): layers, strides, normalisation."""
        return {"layers": list(self.feature_layers), "stride": int(self.stride), "layer_norm": bool(self.layer_norm),
                "dims": [int(d) for d in self.feature_dims]}

    def _check_layers(self, layers) -> list[str]:
        """`layers` mapped to canonical names of `layer_names` (a bare number n: `blocks.n`); InputError otherwise."""
        out = []
        for layer in layers:
            name = str(layer).strip()
            name = f"blocks.{name}" if name.isdigit() else name
            if name not in self.layer_names:
                raise InputError(f"--feature-layers {layer!r}: network {self.name!r} has layers "
                                 f"{', '.join(self.layer_names)}")
            if name in out:
                raise InputError(f"--feature-layers: {name} given twice")
            out.append(name)
        return out

    def _check_stride(self, stride: int | None) -> int:
        if stride is None:  # the network's own output stride (its class default)
            return type(self).stride
        if stride not in self.strides:
            raise InputError(f"--feature-stride {stride}: network {self.name!r} runs at output stride "
                             f"{', '.join(map(str, self.strides)) or self.stride} only")
        return int(stride)
