"""A USS head fitted by `dhr uss fit` on a frozen backbone (lite0, DINO, DINOv2): its file and its source.

The head is STEGO's projection (models/stego.ClusterProjection: cluster1 = linear 1x1,
cluster2 = 1x1, ReLU, 1x1, summed) on the backbone's features as `dhr cams` computes them.
File (torch.save, plain containers, loads with weights_only=True):

    {"format": "dhr.uss_head", "version": 1, "backbone": "lite0" | "dino..." ,
     "backbone_weights": str | None, "feature_dim": int, "dim": int,
     "cluster1": {"0.weight", "0.bias"}, "cluster2": {"0.*", "2.*"}, "config": {...}, "steps": int}

`--uss fitted --uss-weights FILE` (or `--uss stego --uss-weights FILE`) loads it; the DINO file
recorded at fit time is used unless --backbone-weights names another.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dhr_cli.errors import CheckpointError
from dhr_cli.models.base import FeatureSource
from dhr_cli.models.checkpoints import load_strict, read_checkpoint
from dhr_cli.models.stego import ClusterProjection

HEAD_FORMAT = "dhr.uss_head"
BACKBONES = ("lite0", "dino", "dino_vits8", "dino_vits16", "dino_vitb8", "dino_vitb16", "dinov2_vitb14")


def backbone_source(name: str, weights=None, device="cpu", trust: bool = False) -> FeatureSource:
    """The frozen USS backbone `name` (one of BACKBONES); DINO ones need their weights file."""
    from dhr_cli.models import canonical, resolve_source

    key = canonical(name)
    if key not in BACKBONES:
        raise CheckpointError(f"backbone {name!r} cannot carry a fitted USS head; choose one of {', '.join(BACKBONES)}")
    if key != "lite0" and weights is None:
        raise CheckpointError(f"backbone {name!r} needs its weights file (--backbone-weights); dhr never downloads")
    return resolve_source(key, weights, device, kind="uss", trust=trust)


def pack_head(proj: ClusterProjection, backbone: str, backbone_weights, config: dict, steps: int) -> dict:
    sd = {k: v.detach().cpu().clone() for k, v in proj.state_dict().items()}
    return {"format": HEAD_FORMAT, "version": 1, "backbone": backbone,
            "backbone_weights": str(Path(backbone_weights).resolve()) if backbone_weights else None,
            "feature_dim": int(proj.cluster1[0].in_channels), "dim": int(proj.cluster1[0].out_channels),
            "cluster1": {k[len("cluster1."):]: v for k, v in sd.items() if k.startswith("cluster1.")},
            "cluster2": {k[len("cluster2."):]: v for k, v in sd.items() if k.startswith("cluster2.")},
            "config": config, "steps": int(steps)}


def is_fitted_head(obj) -> bool:
    return isinstance(obj, dict) and obj.get("format") == HEAD_FORMAT


class FittedUssSource(FeatureSource):
    """Codes (B, dim, h, w) of a fitted head on a frozen backbone's features (USS)."""

    def __init__(self, backbone: FeatureSource, proj: ClusterProjection):
        super().__init__()
        self.name, self.kind = "fitted", "uss"
        self.backbone, self.net = backbone, proj
        self.stride, self.multiple, self.base_side = backbone.stride, backbone.multiple, backbone.base_side
        self.feature_dims = (proj.cluster1[0].out_channels,)

    def backbone_features(self, images: torch.Tensor) -> torch.Tensor:
        from dhr_cli.models.extract import _concat

        return _concat(self.backbone.extract(images)["features"], getattr(self.backbone, "layer_norm", False)).float()

    def extract(self, images: torch.Tensor) -> dict:
        return {"features": [self.net(self.backbone_features(images))], "cams": None}

    @classmethod
    def from_checkpoint(cls, path, backbone_weights=None, trust: bool = False, obj=None) -> "FittedUssSource":
        obj = read_checkpoint(path, trust) if obj is None else obj
        if not is_fitted_head(obj):
            raise CheckpointError(f"{path}: not a USS head written by `dhr uss fit`")
        weights = backbone_weights or obj.get("backbone_weights")
        if obj["backbone"] != "lite0" and weights and not Path(weights).exists():
            raise CheckpointError(f"{path}: its backbone weights {weights} are not there; pass --backbone-weights")
        backbone = backbone_source(obj["backbone"], weights, trust=trust)
        if backbone.feature_dim != obj["feature_dim"]:
            raise CheckpointError(f"{path}: the head expects {obj['feature_dim']}-d features but backbone "
                                  f"{obj['backbone']} gives {backbone.feature_dim}-d ones; wrong --backbone-weights?")
        proj = ClusterProjection(obj["feature_dim"], obj["dim"])
        sd = {f"cluster1.{k}": v for k, v in obj["cluster1"].items()}
        sd.update({f"cluster2.{k}": v for k, v in obj["cluster2"].items()})
        load_strict(proj, sd, path)
        return cls(backbone, proj).eval()
