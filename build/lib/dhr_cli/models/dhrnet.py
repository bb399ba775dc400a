"""The segmentation network of `dhr train` (DeepLabv3+ with the CAM head) as a WSS source:
CAMs from its CAM head (stride 16), features C4 and C5 (layer3, layer4), as DHR's Step 3 uses them."""

from __future__ import annotations

import torch

from dhr_cli.errors import CheckpointError
from dhr_cli.models.base import FeatureSource, check_images


class DHRNetSource(FeatureSource):
    kind = "wss"
    base_side = None
    multiple = 1

    def __init__(self, net, classes: list[str]):
        super().__init__()
        self.name = "dhr"
        self.net = net
        self.classes = list(classes)
        self.stride = 16
        self.feature_dims = (net.cam_head.in_channels // 2, net.cam_head.in_channels)

    def extract(self, images: torch.Tensor) -> dict:
        """(B, 3, H, W) -> {"features": [C4, C5 (B, c, H/os, W/os)], "cams": (B, K, H/16, W/16)}."""
        check_images(images)
        out = self.net(images, with_features=True, with_logits=False)
        return {"features": [out["C4"], out["C5"]], "cams": out["cams"]}

    @classmethod
    def from_run(cls, path, classes: list[str] | None = None) -> "DHRNetSource":
        from dhr_cli.models.deeplab import load_trained

        net, meta = load_trained(path, "cpu")
        all_classes = list(meta.get("classes") or [])
        k = net.spec.num_cam_classes
        fg = all_classes[len(all_classes) - k:] if len(all_classes) >= k else [f"class{i}" for i in range(k)]
        if classes is not None and list(classes) != fg:
            raise CheckpointError(f"{path}: trained on classes {fg[:4]}..., not this dataset's {list(classes)[:4]}...")
        return cls(net, fg)
