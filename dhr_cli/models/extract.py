"""Multi-scale, flipped inference of a FeatureSource on a batch of same-size images.

CAMs follow IRN's recipe (`make_cam.py`): relu(CAM) summed over scales and horizontal flips,
each scale resized to the grid of scale 1.0, then each map divided by its max + 1e-5.
USS features follow DHR's `core/uss.inference`: the image at each scale (sides int(s * H), grown
to a multiple of the patch), the flip averaged in, every scale resized to the first scale's grid
and averaged (authors' scales 2.0, 1.0, 1.5, 0.5, so the grid is that of scale 2.0).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from dhr_cli.errors import ShapeError
from dhr_cli.models.base import FeatureSource


def scaled_size(hw: tuple[int, int], scale: float, base_side: int | None, multiple: int) -> tuple[int, int]:
    """Input size at `scale`: int(side * f), grown to a multiple of `multiple` (DHR's rule), where
    f = scale, times base_side / longer side when the source (or the user) fixes a base size."""
    h, w = hw
    f = scale * (base_side / max(h, w) if base_side else 1.0)

    def snap(n: float) -> int:
        n = max(1, int(n))
        return -(-n // multiple) * multiple

    return snap(h * f), snap(w * f)


def with_flipped(x: torch.Tensor, flip: bool = True) -> torch.Tensor:
    """Test-time flip: (B, C, H, W) -> (2B, C, H, W), the horizontal mirrors after the batch."""
    return torch.cat([x, x.flip(-1)]) if flip else x


def fold_flipped(v: torch.Tensor, b: int, flip: bool = True) -> torch.Tensor:
    """Outputs of `with_flipped` input (2B, ...) -> (B, ...): each map plus its mirror flipped back (a sum)."""
    return v[:b] + v[b:].flip(-1) if flip else v


def _concat(maps: list[torch.Tensor], normalize: bool = False) -> torch.Tensor:
    """Feature maps of one pass, concatenated on the finest of their grids (bilinear).

    normalize: each map L2-normalised per cell first (1e-12 guard), so that no layer dominates
    the cosine similarities by its magnitude or its channel count alone.
    """
    size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
    if normalize:
        maps = [F.normalize(m.float(), dim=1, eps=1e-12) for m in maps]
    return torch.cat([m if m.shape[-2:] == size else
                      F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False) for m in maps], 1)


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=tuple(size), mode="bilinear",
                                                                         align_corners=False)


@torch.no_grad()
def multiscale_extract(source: FeatureSource, images: torch.Tensor, channels: list[list[int]] | None = None,
                       scales=(1.0,), flip: bool = True, *, feature_scales=None, base_side: int | None = None,
                       amp: bool = False) -> list[dict]:
    """CAMs and features of a batch of same-size images.

    images: (B, 3, H, W) ImageNet-normalised float. channels: per image, the CAM channels to keep
    (its labelled classes), or None for features only. scales: CAM scales (grid = scale 1.0's, or
    the first scale's). feature_scales: scales averaged for the features (default (1.0,)); grid =
    the first of them. base_side: longer side at scale 1.0 (default the source's; None = native).
    amp: float16 autocast (CUDA).
    Returns per image {"features": (D, h, w) float32, "cams": (K, h', w') float32 in [0, 1] or None}.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ShapeError(f"images: expected (B, 3, H, W), got {tuple(images.shape)}")
    if channels is not None and len(channels) != images.shape[0]:
        raise ShapeError(f"channels: one list per image expected, got {len(channels)} for {images.shape[0]} images")
    b = images.shape[0]
    hw = tuple(images.shape[-2:])
    side = base_side if base_side is not None else source.base_side
    feature_scales = tuple(feature_scales or (1.0,))
    autocast = torch.autocast(images.device.type, dtype=torch.float16) if amp else nullcontext()

    def run(scale: float, want_cams: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = F.interpolate(images, size=scaled_size(hw, scale, side, source.multiple), mode="bilinear",
                          align_corners=False)
        x = with_flipped(x, flip)
        with autocast:
            out = source.extract(x)
        feats = _concat(out["features"], getattr(source, "layer_norm", False)).float()  # duck-typed sources too
        cams = out.get("cams") if want_cams else None
        if cams is not None:
            cams = torch.relu(cams.float())
        if flip:
            feats = fold_flipped(feats, b) / 2
            if cams is not None:
                cams = fold_flipped(cams, b)
        return feats, cams

    want_cams = channels is not None
    if want_cams and source.kind != "wss":
        raise ShapeError(f"{source.name}: a USS source gives no CAMs")
    cam_scales = tuple(scales) if want_cams else ()
    cam_grid_scale = 1.0 if 1.0 in cam_scales else (cam_scales[0] if cam_scales else None)
    feat_maps, cam_maps = [], []
    feat_grid = cam_grid = None
    for s in dict.fromkeys(list(feature_scales) + list(cam_scales)):
        feats, cams = run(s, s in cam_scales)
        if s in feature_scales:
            feat_maps.append(feats)
            feat_grid = feats.shape[-2:] if s == feature_scales[0] else feat_grid
        if cams is not None:
            cam_maps.append(cams)
            cam_grid = cams.shape[-2:] if s == cam_grid_scale else cam_grid
    feats_mean = sum(_resize(f, feat_grid) for f in feat_maps) / len(feat_maps)
    cams_sum = sum(_resize(c, cam_grid) for c in cam_maps) if cam_maps else None
    results = []
    for i in range(b):
        r = {"features": feats_mean[i], "cams": None}
        if want_cams:
            sel = cams_sum[i, list(channels[i])] if len(channels[i]) else cams_sum.new_zeros((0, *cam_grid))
            peak = sel.flatten(1).amax(1).view(-1, 1, 1) if len(channels[i]) else sel.new_zeros((0, 1, 1))
            r["cams"] = sel / (peak + 1e-5)
        results.append(r)
    return results
