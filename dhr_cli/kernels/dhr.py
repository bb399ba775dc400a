"""DHR's kernels (METHOD.md steps 1-3), batched over images of different sizes.

Per-image work that depends on each image's own size (resizing, area pooling of the seed mask)
is done image by image with whole-tensor operations; everything on the class level (prototypes,
heat-maps, grouping, OT rebalancing) runs on padded batches with validity masks:

    cell_labels (B, G)      label of each USS grid cell (G = hu * wu, padded), 255 = unsure
    cell_valid  (B, G)      False on padding
    feats       (B, G, D)   USS features per cell
    classes     (B, N)      label value of each heat-map channel, ascending, -1 = padding
    heat        (B, G, N)   heat-maps

Fixed details (METHOD.md): grid cells are adaptive-pooling bins; majority ties go to the lowest
label, 255 counting as the highest; cosine with a 1e-12 guard; min-max with a 1e-5 guard;
argmax ties to the lowest channel; bilinear resizing with align_corners=False.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from dhr_cli.config import IGNORE_INDEX, PropagateConfig, SeedConfig, SinkhornConfig
from dhr_cli.errors import ShapeError
from dhr_cli.kernels.checks import check_shape
from dhr_cli.kernels.sinkhorn import f_ot, minmax_columns

__all__ = [
    "pad_stack", "resize", "resize_cells", "majority_pool", "class_prototypes", "cosine_heatmap", "correlation_groups",
    "seeded_marginals", "rebalance", "normalize_cams", "seed_probabilities", "labels_from_probs", "upsample_argmax",
]  # fmt: skip


# ---- small shared helpers -------------------------------------------------------------------
def pad_stack(tensors: list[torch.Tensor], value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack tensors of shape (*lead, n_i) padded along the last axis; returns (stacked, valid (B, n))."""
    n = max(t.shape[-1] for t in tensors)
    out = tensors[0].new_full((len(tensors), *tensors[0].shape[:-1], n), value)
    valid = torch.zeros(len(tensors), n, dtype=torch.bool, device=tensors[0].device)
    for i, t in enumerate(tensors):
        out[i, ..., : t.shape[-1]] = t
        valid[i, : t.shape[-1]] = True
    return out, valid


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, h, w) -> (C, H, W), bilinear, align_corners=False (a no-op when the size matches)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    # Memory layout picks the CPU kernel: channels-last is ~10x faster for feature maps (many
    # channels), several times slower for a few heat-maps. Values are the same up to rounding.
    fmt = torch.channels_last if x.shape[0] >= 16 else torch.contiguous_format
    x4 = x[None].float().contiguous(memory_format=fmt)
    out = F.interpolate(x4, size=size, mode="bilinear", align_corners=False)[0]
    return out.contiguous().to(x.dtype)


def resize_cells(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(C, h, w) feature map -> (hu * wu, C) float32 cell features on `grid` (bilinear, align_corners=False).

    The same values as `resize(x, grid).flatten(1).T`, without the layout copies: the
    channels-last result already is the (cells, channels) matrix.
    """
    x4 = x[None].float().contiguous(memory_format=torch.channels_last)
    if tuple(x.shape[-2:]) != tuple(grid):
        x4 = F.interpolate(x4, size=grid, mode="bilinear", align_corners=False)
    out = x4[0].permute(1, 2, 0)
    return out.reshape(-1, x.shape[0])


def _bin_areas(size: int, cells: int, device) -> torch.Tensor:
    i = torch.arange(cells, device=device)
    start = (i * size) // cells
    end = ((i + 1) * size + cells - 1) // cells
    return (end - start).to(torch.float32)


# ---- step 2.1: class-level pooling ----------------------------------------------------------
def majority_pool(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Majority label of each adaptive-pooling bin of `mask` (H, W) on a (hu, wu) grid.

    255 counts as a label; ties go to the lowest label value (255 being the highest).

    >>> m = torch.tensor([[1, 1, 2, 2], [1, 255, 2, 2]])
    >>> majority_pool(m, (1, 2)).tolist()
    [[1, 2]]
    """
    check_shape(mask, "H W", "mask")
    flat = mask if mask.dtype == torch.uint8 else mask.long()  # uint8 stores: compare bytes, not int64
    labels = torch.bincount(flat.flatten(), minlength=IGNORE_INDEX + 1).nonzero()[:, 0]  # ascending: 255 last
    onehot = (flat[None] == labels.to(flat.dtype)[:, None, None]).float()
    frac = F.adaptive_avg_pool2d(onehot[None], grid)[0]
    area = _bin_areas(mask.shape[0], grid[0], mask.device)[:, None] * _bin_areas(mask.shape[1], grid[1], mask.device)[None]
    counts = torch.round(frac * area)  # exact integers: ties are exact
    return labels[counts.max(0).indices]  # first maximum: the lowest label (argmax(0) is slow on the CPU)


def class_prototypes(feats: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean feature of each class: (B, G, D) features, (B, G, N) cell weights -> (B, N, D)."""
    check_shape(feats, "B G D", "feats")
    check_shape(weights, "B G N", "weights")
    total = weights.sum(1).clamp_min(1e-12)
    return torch.bmm(weights.transpose(1, 2), feats) / total[..., None]


def cosine_heatmap(feats: torch.Tensor, protos: torch.Tensor, cell_valid: torch.Tensor,
                   class_valid: torch.Tensor) -> torch.Tensor:
    """Cosine of every cell to every prototype, min-max per class over valid cells: (B, G, N)."""
    f = F.normalize(feats, dim=-1, eps=1e-12)
    v = F.normalize(protos, dim=-1, eps=1e-12)
    heat = minmax_columns(torch.bmm(f, v.transpose(1, 2)), cell_valid)
    return heat * class_valid[:, None, :].to(heat.dtype)


def correlation_groups(protos: torch.Tensor, class_valid: torch.Tensor, tau: float) -> torch.Tensor:
    """G[b, i, j] = j >= i and relu(cos(V_i, V_j)) > tau (the triangular grouping): (B, N, N) bool."""
    v = F.normalize(protos, dim=-1, eps=1e-12)
    corr = torch.triu(torch.relu(torch.bmm(v, v.transpose(1, 2))))
    both = class_valid[:, :, None] & class_valid[:, None, :]
    return (corr > tau) & both


def seeded_marginals(cell_labels: torch.Tensor, cell_valid: torch.Tensor, classes: torch.Tensor,
                     floor: float) -> torch.Tensor:
    """b_c proportional to max(share of valid grid cells labelled c, floor): (B, N), 0 on padding."""
    hits = ((cell_labels[:, :, None] == classes[:, None, :]) & cell_valid[:, :, None]).sum(1).float()
    share = hits / cell_valid.sum(1, keepdim=True).clamp_min(1).float()
    return torch.where(classes >= 0, share.clamp_min(floor), torch.zeros_like(share))


def rebalance(heat_us: torch.Tensor, heat_ws: torch.Tensor | None, groups: torch.Tensor, cell_valid: torch.Tensor,
              class_valid: torch.Tensor, sinkhorn: SinkhornConfig, marginals: torch.Tensor | None) -> torch.Tensor:
    """Steps 2.4-2.5: group-wise OT on WSS heat-maps (compounding in order), then global OT.

    Args:
        heat_us, heat_ws: (B, G, N) min-max heat-maps; heat_ws may be None when no group has > 1 class.
        groups: (B, N, N) bool from `correlation_groups`.
        marginals: (B, N) class masses (seeded) or None (uniform, the authors').
    Returns:
        (B, G, N) rebalanced heat-maps, min-max per class.
    """
    heat = heat_us
    sizes = groups.sum(2)  # (B, N)
    for i in range(groups.shape[1]):
        todo = (sizes[:, i] > 1).nonzero()[:, 0]
        if len(todo) == 0 or heat_ws is None:
            continue
        member = groups[todo, i, :]  # (b, N)
        marg = None if marginals is None else marginals[todo]
        factor = f_ot(heat_ws[todo], sinkhorn, pixel_valid=cell_valid[todo], class_valid=member, class_marginal=marg)
        heat = heat.clone()
        heat[todo] = torch.where(member[:, None, :], heat[todo] * factor, heat[todo])
    factor = f_ot(heat, sinkhorn, pixel_valid=cell_valid, class_valid=class_valid, class_marginal=marginals)
    out = minmax_columns(heat * factor, cell_valid)
    return out * class_valid[:, None, :].to(out.dtype)


def labels_from_probs(probs: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Argmax over channels (ties to the lowest), mapped to label values: (L, H, W), (L,) -> (H, W)."""
    # max(0).indices is the first maximum, like argmax(0), and several times faster on the CPU;
    # so is index_select against advanced indexing.
    idx = probs.max(0).indices
    return classes.index_select(0, idx.flatten()).view(idx.shape)


# ---- step 1: seeds --------------------------------------------------------------------------
def normalize_cams(cams: torch.Tensor) -> torch.Tensor:
    """relu, then each map divided by its spatial max (clipped at 1e-5): (K, h, w)."""
    cams = torch.relu(cams)
    return cams / cams.flatten(1).amax(1).clamp_min(1e-5)[:, None, None]


def ot_rebalance_cams(cams: list[torch.Tensor], sinkhorn: SinkhornConfig) -> list[torch.Tensor]:
    """Step 1.2 for a batch of images: A * f_OT(A) for images with more than one class."""
    multi = [i for i, c in enumerate(cams) if c.shape[0] > 1]
    out = list(cams)
    if not multi:
        return out
    flat = [cams[i].flatten(1).T for i in multi]  # (h*w, K)
    # Pad pixels and classes: (b, M, K).
    m = max(f.shape[0] for f in flat)
    k = max(f.shape[1] for f in flat)
    sim = flat[0].new_zeros(len(flat), m, k)
    pv = torch.zeros(len(flat), m, dtype=torch.bool, device=sim.device)
    cv = torch.zeros(len(flat), k, dtype=torch.bool, device=sim.device)
    for j, f in enumerate(flat):
        sim[j, : f.shape[0], : f.shape[1]] = f
        pv[j, : f.shape[0]] = True
        cv[j, : f.shape[1]] = True
    factor = f_ot(sim, sinkhorn, pixel_valid=pv, class_valid=cv)
    for j, i in enumerate(multi):
        kk, h, w = cams[i].shape
        out[i] = cams[i] * factor[j, : h * w, :kk].T.reshape(kk, h, w)
    return out


def seed_probabilities(cams: torch.Tensor, bg_power: float) -> torch.Tensor:
    """[background, classes] probabilities from (K, H, W) CAMs in [0, 1]: (1 + K, H, W).

    Background competes (METHOD.md decision): its score is (1 - max_k A_k) ** bg_power.
    """
    bg = (1 - cams.amax(0, keepdim=True)).clamp_min(0) ** bg_power
    scores = torch.cat([bg, cams], 0)
    return scores / scores.sum(0, keepdim=True).clamp_min(1e-12)


@dataclass
class SeedResult:
    mask: torch.Tensor  # (H, W) uint8, 255 = unsure


def seed_masks(cams: list[torch.Tensor], labels: list[list[int]], sizes: list[tuple[int, int]], cfg: SeedConfig,
               *, images: list[torch.Tensor] | None = None, base: list[torch.Tensor | None] | None = None,
               background: int = 0, crf=None) -> list[torch.Tensor]:
    """Step 1 for a batch: CAMs (K_i, h_i, w_i) with their label values -> seed masks (H_i, W_i) uint8.

    `crf(images (B,3,H,W), probs (B,L,H,W), channel_valid, pixel_valid)` refines the
    probabilities when given (cfg.use_crf); `base` masks M0 are overwritten where a class wins.
    """
    cams = ot_rebalance_cams([normalize_cams(c.float()) for c in cams], cfg.sinkhorn)
    probs = [seed_probabilities(resize(c, size).clamp(0, 1), cfg.bg_power) for c, size in zip(cams, sizes)]
    if crf is not None and images is not None:
        probs = _crf_padded(crf, images, probs)
    masks = []
    for i, p in enumerate(probs):
        values = torch.tensor([background, *labels[i]], device=p.device)
        conf, idx = p.max(0)
        mask = values[idx]
        mask = torch.where(conf < cfg.confidence, torch.full_like(mask, IGNORE_INDEX), mask)
        if base is not None and base[i] is not None:
            won = (idx > 0) & (conf >= cfg.confidence)
            mask = torch.where(won, mask, base[i].to(mask.device).long())
        masks.append(mask.to(torch.uint8))
    return masks


def _crf_padded(crf, images: list[torch.Tensor], probs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run a batched CRF over images of different sizes and channel counts (padded, masked)."""
    b = len(probs)
    hmax = max(p.shape[1] for p in probs)
    wmax = max(p.shape[2] for p in probs)
    lmax = max(p.shape[0] for p in probs)
    dev = probs[0].device
    img = torch.zeros(b, 3, hmax, wmax, device=dev)
    pr = torch.zeros(b, lmax, hmax, wmax, device=dev)
    cv = torch.zeros(b, lmax, dtype=torch.bool, device=dev)
    pixv = torch.zeros(b, hmax, wmax, dtype=torch.bool, device=dev)
    for i, (im, p) in enumerate(zip(images, probs)):
        l, h, w = p.shape
        img[i, :, :h, :w] = im.to(dev).float()
        pr[i, :l, :h, :w] = p
        cv[i, :l] = True
        pixv[i, :h, :w] = True
    pr[:, 0][~pixv] = 1.0  # padded pixels: any valid distribution
    out = crf(img, pr, channel_valid=cv, pixel_valid=pixv)
    return [out[i, : p.shape[0], : p.shape[1], : p.shape[2]] for i, p in enumerate(probs)]


# ---- steps 2 and 3: propagation -------------------------------------------------------------
@dataclass
class PropagateItem:
    """One image's inputs to propagation (tensors on the working device)."""

    seed: torch.Tensor  # (H, W) seed mask, 255 = unsure
    uss: torch.Tensor  # (D, hu, wu)
    # [(D_l, h_l, w_l)], or a loader returning them (at least one map), called only for the
    # images that Step 3 needs: a grouping of several classes is rarer than a WSS read is cheap.
    wss: list[torch.Tensor] | Callable[[], list[torch.Tensor]]
    labels: list[int]  # image-level foreground label values
    cams: torch.Tensor | None = None  # (K, h, w) for recovering classes that win no cell
    cam_labels: list[int] | None = None
    image: torch.Tensor | None = None  # (3, H, W) 0..255, for the CRF


def _wss_maps(item: PropagateItem) -> list[torch.Tensor]:
    """The item's WSS maps, loading them (once) when they were given as a loader."""
    if callable(item.wss):
        item.wss = list(item.wss())
    return item.wss


def _recovery_weights(item: PropagateItem, label: int, grid: tuple[int, int]) -> torch.Tensor | None:
    """Cells at the class's highest CAM response (>= 0.8 of its peak on the USS grid), or None."""
    if item.cams is None or item.cam_labels is None or label not in item.cam_labels:
        return None
    cam = resize(torch.relu(item.cams[item.cam_labels.index(label)].float())[None], grid)[0].flatten()
    if float(cam.max()) <= 0:
        return None
    return (cam >= 0.8 * cam.max()).double()


def propagate_items(items: list[PropagateItem], cfg: PropagateConfig, *, background: int = 0,
                    crf=None) -> list[torch.Tensor]:
    """Steps 2 and 3 of METHOD.md for a batch of images -> masks (H_i, W_i) long, no 255."""
    dev = items[0].uss.device
    grids = [tuple(it.uss.shape[-2:]) for it in items]
    cell_labels_list, classes_list, weights_list = [], [], []
    for it, grid in zip(items, grids):
        cells = majority_pool(it.seed.to(dev), grid).flatten()
        won = sorted(set(torch.unique(cells).tolist()) - {IGNORE_INDEX})
        extra = {}
        if cfg.recover_missing:
            for label in it.labels:
                if label not in won:
                    w = _recovery_weights(it, label, grid)
                    if w is not None:
                        extra[label] = w
        classes = sorted(set(won) | set(extra))
        if not classes:  # nothing to propagate from: everything background
            classes = [background]
        cls_t = torch.tensor(classes, device=dev)
        weights = (cells[:, None] == cls_t[None, :]).double()
        for label, w in extra.items():
            weights[:, classes.index(label)] = w
        cell_labels_list.append(cells)
        classes_list.append(cls_t)
        weights_list.append(weights)
    # Class-level work runs in float64: grids are small, and min-max with its 1e-5 guard
    # amplifies rounding wherever a heat-map is nearly flat.
    feats, cell_valid = _pad_cells([it.uss.double().flatten(1).T for it in items])
    cell_labels, _ = pad_stack(cell_labels_list, IGNORE_INDEX)
    classes, class_valid = pad_stack(classes_list, -1)
    weights = _pad_weights(weights_list, feats.shape[1], classes.shape[1])
    protos = class_prototypes(feats, weights)
    heat_us = cosine_heatmap(feats, protos, cell_valid, class_valid)
    groups = correlation_groups(protos, class_valid, cfg.tau)
    heat_ws = None
    has_wss = [callable(it.wss) or bool(it.wss) for it in items]
    groups = groups & torch.tensor(has_wss, device=dev)[:, None, None]  # no WSS: no Step 3
    need = (groups.sum(2) > 1).any(1).nonzero()[:, 0]
    if len(need):  # Step 3 only for the images with a USS group of several classes
        heat_ws = heat_us.new_zeros(heat_us.shape)
        idx = need.tolist()
        heat_ws[need] = _wss_heatmap([items[i] for i in idx], [grids[i] for i in idx], weights[need],
                                     cell_valid[need], class_valid[need])
    marginals = None
    if cfg.marginals == "seeded":
        marginals = seeded_marginals(cell_labels, cell_valid, classes, cfg.min_marginal)
    heat = rebalance(heat_us, heat_ws, groups, cell_valid, class_valid, cfg.sinkhorn, marginals)
    grid_maps = []
    for i, grid in enumerate(grids):
        n = len(classes_list[i])
        grid_maps.append(heat[i, : grid[0] * grid[1], :n].T.reshape(n, *grid))
    if crf is not None and all(it.image is not None for it in items):
        maps = [resize(m.float(), tuple(it.seed.shape)) for m, it in zip(grid_maps, items)]
        probs = [m / m.sum(0, keepdim=True).clamp_min(1e-12) for m in maps]
        maps = _crf_padded(crf, [it.image for it in items], [p.clamp_min(1e-6) for p in probs])
        return [labels_from_probs(m, classes_list[i]) for i, m in enumerate(maps)]
    return [upsample_argmax(m, tuple(it.seed.shape), c) for m, it, c in zip(grid_maps, items, classes_list)]


def upsample_argmax(maps: torch.Tensor, size: tuple[int, int], classes: torch.Tensor) -> torch.Tensor:
    """Label values of the argmax of bilinearly upsampled maps: (N, h, w), (N,) -> (H, W) int64.

    The same as `labels_from_probs(resize(maps, size), classes)` up to float rounding, cheaper
    for the common cases: one channel is a constant map, and with two channels bilinear
    resizing is linear, so channel 1 wins exactly where the resized difference is > 0 (a tie
    goes to channel 0, the lowest).
    """
    check_shape(maps, "N h w", "maps")
    if maps.shape[0] == 1:
        return classes[:1].view(1, 1).expand(size).clone()
    if maps.shape[0] == 2:
        diff = resize((maps[1] - maps[0])[None].float(), size)[0]
        return torch.where(diff > 0, classes[1], classes[0])
    return labels_from_probs(resize(maps.float(), size), classes)


def _pad_cells(feats: list[torch.Tensor], cells: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[(G_i, D)] -> (B, G, D) and cell_valid (B, G), G = max(G_i, cells)."""
    g = max(max(f.shape[0] for f in feats), cells)
    if all(f.shape == (g, feats[0].shape[1]) for f in feats):  # one grid for the whole batch: no padding
        valid = torch.ones(len(feats), g, dtype=torch.bool, device=feats[0].device)
        return torch.stack(feats), valid
    out = feats[0].new_zeros(len(feats), g, feats[0].shape[1])
    valid = torch.zeros(len(feats), g, dtype=torch.bool, device=feats[0].device)
    for i, f in enumerate(feats):
        out[i, : f.shape[0]] = f
        valid[i, : f.shape[0]] = True
    return out, valid


def _pad_weights(weights: list[torch.Tensor], g: int, n: int) -> torch.Tensor:
    out = weights[0].new_zeros(len(weights), g, n)
    for i, w in enumerate(weights):
        out[i, : w.shape[0], : w.shape[1]] = w
    return out


def _wss_heatmap(items, grids, weights, cell_valid, class_valid) -> torch.Tensor:
    """H_ws: per WSS map, resized to the USS grid, pooled with the same cells; min-max of the mean."""
    maps = [_wss_maps(it) for it in items]
    n_maps = len(maps[0])
    if any(len(m) != n_maps for m in maps):
        raise ShapeError(f"images of one batch have different numbers of WSS maps: {[len(m) for m in maps]}")
    total = None
    for level in range(n_maps):
        feats, _ = _pad_cells([resize_cells(m[level], grid).double() for m, grid in zip(maps, grids)], cell_valid.shape[1])
        heat = cosine_heatmap(feats, class_prototypes(feats, weights), cell_valid, class_valid)
        total = heat if total is None else total + heat
    heat = minmax_columns(total / n_maps, cell_valid)
    return heat * class_valid[:, None, :].to(heat.dtype)
