"""STEGO (mhamilton723/STEGO, MIT): DINO features through the cluster projection (docs/peers.md).

Two file layouts load strictly:
- the authors' Lightning checkpoint (`*.ckpt`, ['state_dict']): `net.model.<DINO keys>`,
  `net.cluster1.0.*`, `net.cluster2.0.*`, `net.cluster2.2.*` (probes and decoder are ignored);
- DHR's packed `STEGO_{dataset}.pt` = {'cluster1': {...}, 'cluster2': {...}} plus the DINO
  backbone it was trained on (`backbone_weights`, e.g. dino_vitbase8_pretrain.pth).
The code is cluster1(f) + cluster2(f) on the post-norm patch tokens f: (B, dim, H/p, W/p), dim 70.
"""

from __future__ import annotations

import torch
from torch import nn

from dhr_cli.errors import CheckpointError
from dhr_cli.models.base import FeatureSource
from dhr_cli.models.checkpoints import (
    load_strict,
    read_checkpoint,
    select_prefix,
    strip_prefixes,
    unwrap,
)
from dhr_cli.models.vit import DinoViT, load_vit, vit_from_state


class ClusterProjection(nn.Module):
    """STEGO's projection: cluster1 = Conv1x1(n, dim); cluster2 = Conv1x1(n, n), ReLU, Conv1x1(n, dim)."""

    def __init__(self, n_feats: int, dim: int = 70):
        super().__init__()
        self.cluster1 = nn.Sequential(nn.Conv2d(n_feats, dim, 1))
        self.cluster2 = nn.Sequential(nn.Conv2d(n_feats, n_feats, 1), nn.ReLU(), nn.Conv2d(n_feats, dim, 1))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """(B, n_feats, h, w) -> (B, dim, h, w)."""
        return self.cluster1(f) + self.cluster2(f)


class StegoSource(FeatureSource):
    """STEGO codes (B, dim, H/p, W/p): the projection applied to DINO features (USS)."""

    def __init__(self, vit: DinoViT, proj: ClusterProjection):
        super().__init__()
        self.name, self.kind = "stego", "uss"
        self.vit, self.net = vit, proj
        self.stride = self.multiple = vit.patch_size
        self.feature_dims = (proj.cluster1[0].out_channels,)

    def extract(self, images: torch.Tensor) -> dict:
        """(B, 3, H, W) ImageNet-normalised, sides multiples of p -> {"features": [(B, dim, H/p, W/p)], "cams": None}."""
        return {"features": [self.net(self.vit.patch_features(images))], "cams": None}

    @classmethod
    def from_checkpoint(cls, path, backbone_weights=None, trust: bool = False) -> "FeatureSource":
        """A Lightning .ckpt (net.model.*, net.cluster1/2.*) or DHR's packed {cluster1, cluster2} + backbone."""
        obj = read_checkpoint(path, trust)
        from dhr_cli.models.uss_head import FittedUssSource, is_fitted_head

        if is_fitted_head(obj):  # a head fitted by `dhr uss fit` (STEGO's recipe, any backbone)
            return FittedUssSource.from_checkpoint(path, backbone_weights, trust, obj=obj)
        if isinstance(obj, dict) and "cluster1" in obj and "cluster2" in obj:
            if not all(isinstance(obj[k], dict) for k in ("cluster1", "cluster2")):
                raise CheckpointError(f"{path}: 'cluster1' / 'cluster2' are not state dicts")
            proj_sd = {f"cluster1.{k}": v for k, v in obj["cluster1"].items()}
            proj_sd.update({f"cluster2.{k}": v for k, v in obj["cluster2"].items()})
            if backbone_weights is None:
                raise CheckpointError(f"{path}: a packed STEGO head needs --backbone-weights (the DINO backbone it "
                                      "was trained on, e.g. https://dl.fbaipublicfiles.com/dino/"
                                      "dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth)")
            vit = load_vit(backbone_weights, trust=trust)
        else:
            sd = unwrap(obj, path)
            vit_sd = strip_prefixes(select_prefix(sd, "net.model."))
            proj_sd = {k: v for k, v in select_prefix(sd, "net.").items() if k.startswith("cluster")}
            if not vit_sd or not proj_sd:
                raise CheckpointError(f"{path}: no STEGO keys (net.model.*, net.cluster1.*) found")
            vit = vit_from_state(vit_sd, path)
            load_strict(vit, vit_sd, path)
        w = proj_sd.get("cluster1.0.weight")
        if w is None or w.ndim != 4:
            raise CheckpointError(f"{path}: missing cluster1.0.weight (a 1x1 conv weight)")
        if w.shape[1] != vit.embed_dim:
            raise CheckpointError(f"{path}: the STEGO head expects {w.shape[1]}-d features but the backbone gives "
                                  f"{vit.embed_dim}-d ones; wrong --backbone-weights?")
        proj = ClusterProjection(w.shape[1], w.shape[0])
        load_strict(proj, proj_sd, path)
        return cls(vit, proj)
