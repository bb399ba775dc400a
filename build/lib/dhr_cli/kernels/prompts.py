"""Segment Anything prompts from a label mask, and the two rules that merge SAM's masks back.

Pure array functions (numpy for the geometry, torch for the per-pixel rules); no model, no I/O.
docs/sam.md describes the rules; the conventions follow the `segment-anything` package:

- points are (x, y) = (column, row) pixel indices; point label 1 = positive, 0 = negative,
  -1 = padding (SAM's prompt encoder ignores those);
- boxes are [x0, y0, x1, y1] with inclusive pixel indices (as SAM's `batched_mask_to_box`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from dhr_cli.config import IGNORE_INDEX, PromptConfig

__all__ = [
    "Prompt",
    "assign_segments",
    "batched_points",
    "interior_points",
    "mask_box",
    "mask_prompts",
    "prompt_ious",
    "region_mask_inputs",
    "resolve_prompted",
]


@dataclass
class Prompt:
    """One connected region of one class, as SAM prompts."""

    label: int  # the class (label value) of the region
    region: np.ndarray  # (H, W) bool: the region itself
    box: list[int]  # [x0, y0, x1, y1], inclusive
    points: np.ndarray  # (P, 2) int (x, y)
    point_labels: np.ndarray  # (P,) 1 positive, 0 negative

    @property
    def area(self) -> int:
        return int(self.region.sum())

    def to_json(self, classes: list[str] | None = None) -> dict:
        entry = {"label": self.label, "area": self.area, "box": [int(v) for v in self.box],
                 "points": self.points.astype(int).tolist(), "point_labels": self.point_labels.astype(int).tolist()}
        if classes is not None and 0 <= self.label < len(classes):
            entry = {"class": classes[self.label], **entry}
        return entry


def mask_box(region: np.ndarray) -> list[int]:
    """[x0, y0, x1, y1] (inclusive) of the True pixels of a (H, W) bool array."""
    rows, cols = np.any(region, 1), np.any(region, 0)
    if not rows.any():
        raise ValueError("mask_box: empty region")
    y0, y1 = np.flatnonzero(rows)[[0, -1]]
    x0, x1 = np.flatnonzero(cols)[[0, -1]]
    return [int(x0), int(y0), int(x1), int(y1)]


def _inside_distance(region: np.ndarray) -> np.ndarray:
    """Euclidean distance of each region pixel to the nearest pixel outside it (the image border
    counts as outside: points keep away from the edges too); 0 outside."""
    padded = np.pad(region, 1)
    return ndimage.distance_transform_edt(padded)[1:-1, 1:-1]


def interior_points(region: np.ndarray, k: int) -> np.ndarray:
    """(k', 2) (x, y) of up to k most interior pixels of a (H, W) bool region, k' <= k.

    Greedy distance-transform maxima: the pixel farthest from the region's boundary, then the
    farthest one outside the inscribed disc of every point taken so far. Ties go to the pixel
    nearest the region's centroid (then the first in raster order), so that a symmetric region
    gets its centre first.
    """
    dist = _inside_distance(region)
    if not (dist > 0).any():
        return np.zeros((0, 2), np.int64)
    ys, xs = np.nonzero(region)
    cy, cx = ys.mean(), xs.mean()
    yy, xx = np.indices(region.shape)
    free = dist.copy()
    points = []
    for _ in range(k):
        best = free.max()
        if best <= 0:
            break
        cand = np.argwhere(free >= best - 1e-9)
        pick = cand[np.argmin((cand[:, 0] - cy) ** 2 + (cand[:, 1] - cx) ** 2)]  # argmin: first in raster order on ties
        y, x = int(pick[0]), int(pick[1])
        points.append((x, y))
        radius = dist[y, x]
        free[(yy - y) ** 2 + (xx - x) ** 2 < radius**2] = 0
    return np.asarray(points, np.int64)


def mask_prompts(mask: np.ndarray, cfg: PromptConfig = PromptConfig(), *, background: int | None = 0,
                 ignore: int = IGNORE_INDEX) -> list[Prompt]:
    """The prompts of a (H, W) label mask: one per connected region of each foreground class.

    Each prompt has the region's box, its `cfg.positive_points` most interior pixels as positive
    points and, as negative points, the most interior pixel of each other class present
    (background included; the largest classes first, at most `cfg.negative_points`). Regions
    smaller than `cfg.min_area` get none. Prompts come ordered by class, then region size.
    """
    mask = np.asarray(mask)
    present = [int(c) for c in np.unique(mask) if c != ignore]
    structure = np.ones((3, 3), bool) if cfg.connectivity == 8 else None
    # The most interior pixel of each class: the negatives of the other classes' prompts.
    anchors, sizes = {}, {}
    for c in present:
        pts = interior_points(mask == c, 1)
        if len(pts):
            anchors[c], sizes[c] = pts[0], int((mask == c).sum())
    prompts = []
    for c in present:
        if c == background:
            continue
        components, n = ndimage.label(mask == c, structure=structure)
        regions = [components == i for i in range(1, n + 1)]
        regions = sorted((r for r in regions if r.sum() >= cfg.min_area), key=lambda r: -int(r.sum()))
        others = sorted((d for d in anchors if d != c), key=lambda d: -sizes[d])[: cfg.negative_points]
        negatives = np.asarray([anchors[d] for d in others], np.int64).reshape(-1, 2)
        for region in regions:
            positives = interior_points(region, cfg.positive_points)
            points = np.concatenate([positives, negatives])
            labels = np.concatenate([np.ones(len(positives), np.int64), np.zeros(len(negatives), np.int64)])
            prompts.append(Prompt(label=c, region=region, box=mask_box(region), points=points, point_labels=labels))
    return prompts


def batched_points(prompts: list[Prompt]) -> tuple[np.ndarray, np.ndarray]:
    """(N, P, 2) float coordinates and (N, P) labels, shorter lists padded with label -1."""
    width = max((len(p.points) for p in prompts), default=0)
    coords = np.zeros((len(prompts), width, 2), np.float32)
    labels = np.full((len(prompts), width), -1, np.int64)
    for i, p in enumerate(prompts):
        coords[i, : len(p.points)] = p.points
        labels[i, : len(p.points)] = p.point_labels
    return coords, labels


def region_mask_inputs(regions: torch.Tensor, input_size: tuple[int, int], model_size: int, mask_size: tuple[int, int],
                       logit: float) -> torch.Tensor:
    """(N, H, W) bool regions -> (N, 1, h, w) SAM `mask_input` logits (+logit inside, -logit out).

    The region goes through the image's own transform: resized to `input_size` (the longest side
    scaled to `model_size`), padded bottom-right to a model_size square, then down to SAM's
    low-resolution mask size (256 x 256 for the official models).
    """
    x = F.interpolate(regions[:, None].float(), size=input_size, mode="bilinear", align_corners=False)
    x = F.pad(x, (0, model_size - input_size[1], 0, model_size - input_size[0]))
    x = F.interpolate(x, size=mask_size, mode="area")
    return torch.where(x >= 0.5, logit, -logit)


def prompt_ious(masks: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """(N,) IoU of each SAM mask (N, H, W) bool with the region that prompted it (N, H, W) bool."""
    inter = (masks & regions).flatten(1).sum(1).float()
    union = (masks | regions).flatten(1).sum(1).float()
    return inter / union.clamp_min(1)


def resolve_prompted(mask: torch.Tensor, labels: torch.Tensor, regions: torch.Tensor, masks: torch.Tensor,
                     scores: torch.Tensor, accept_iou: float, *, shrink: bool = False,
                     background: int | None = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt mode's merge: the refined (H, W) mask and the (N,) accepted flags.

    A SAM mask is accepted when its IoU with its prompting region is >= accept_iou. Every pixel
    an accepted mask covers takes the label of the covering mask with the highest SAM score;
    pixels no accepted mask covers keep the input label. With `shrink`, the pixels of a region
    that its own accepted mask leaves out (and no other accepted mask covers) become background.
    """
    accepted = prompt_ious(masks, regions) >= accept_iou
    out = mask.clone()
    if not accepted.any():
        return out, accepted
    if shrink and background is not None:
        dropped = (regions[accepted] & ~masks[accepted]).any(0)
        out[dropped] = background
    covering = masks[accepted]
    best = torch.where(covering, scores[accepted, None, None].float(), float("-inf"))
    top, winner = best.max(0)
    covered = torch.isfinite(top)
    out[covered] = labels[accepted][winner[covered]].to(out.dtype)
    return out, accepted


def assign_segments(mask: torch.Tensor, segments: torch.Tensor, coverage: float = 0.85,
                    ignore: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge mode (the SAM_WSSS rule): the refined (H, W) mask and each segment's class (-1 = none).

    With P_c the pixels of class c in the input mask (ignore pixels belong to none), segment S
    goes to class c when 2|S & P_c| - |S| > 0 (c holds most of S) or |S & P_c| / |P_c| >= coverage
    (S holds most of c); when only the second holds for several classes, the one S overlaps most.
    Segments are painted largest first, so a smaller segment inside a larger one keeps its own
    class; pixels no assigned segment covers keep their input label.
    """
    segments = segments.bool()
    n = segments.shape[0]
    assigned = torch.full((n,), -1, dtype=torch.long, device=mask.device)
    if n == 0:
        return mask.clone(), assigned
    valid = mask != ignore
    classes = torch.unique(mask[valid])
    if classes.numel() == 0:
        return mask.clone(), assigned
    onehot = (mask[valid][:, None] == classes[None]).float()  # (V, C)
    inter = segments[:, valid].float() @ onehot  # (N, C): |S & P_c|
    size = segments.flatten(1).sum(1).float()  # |S|, ignore pixels included
    class_size = onehot.sum(0)  # |P_c|
    majority = 2 * inter - size[:, None] > 0
    covers = inter / class_size[None] >= coverage
    major_pick = majority.float().argmax(1)
    cover_pick = torch.where(covers, inter, -1.0).argmax(1)
    choice = torch.where(majority.any(1), major_pick, torch.where(covers.any(1), cover_pick, -1))
    assigned = torch.where(choice >= 0, classes[choice.clamp_min(0)].long(), -1)
    out = mask.clone()
    for i in torch.argsort(size, descending=True, stable=True).tolist():
        if assigned[i] >= 0:
            out[segments[i]] = assigned[i].to(out.dtype)
    return out, assigned
