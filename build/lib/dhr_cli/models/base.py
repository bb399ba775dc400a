"""The interface every CAM / feature network exposes to `dhr cams`."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from dhr_cli.errors import ShapeError

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
    `classes` (names of the CAM channels, WSS only).

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

    @property
    def feature_dim(self) -> int:
        """D of the stored features: the feature maps concatenated (on the first map's grid)."""
        return int(sum(self.feature_dims))

    def extract(self, images: torch.Tensor) -> dict:
        raise NotImplementedError
