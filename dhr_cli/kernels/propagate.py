"""Steps 2 and 3 of the method (`dhr propagate`), batched over images of different sizes.

Per-image work that depends on each image's own size (majority pooling of the seed mask, the
final upsampling) is done image by image (or per group of equal sizes) with whole-tensor
operations; everything on the class level (prototypes, heat-maps, grouping, OT rebalancing)
runs on padded batches with validity masks, classes first:

    cell_labels (B, G)      label of each USS grid cell (G = hu * wu, padded), 255 = unsure
    cell_valid  (B, G)      False on padding (None inside the kernels when nothing is padded)
    feats       (B, G, D)   USS features per cell (a view of (B, D, G) as the maps are stored)
    classes     (B, N)      label value of each heat-map channel, ascending, -1 = padding
    weights     (B, N, G)   cell weights of each class prototype
    heat        (B, N, G)   heat-maps: reductions over cells run along the contiguous axis

Majority pooling is one histogram of (cell, label) keys. The baselines `cam_baseline` and the
random walk run on the same inputs (`propagate_method`); `propagate_batch` is the entry point
for equally sized crops that `dhr train` calls every iteration.

Fixed details (docs/method.md): grid cells are adaptive-pooling bins; majority ties go to the
lowest label, 255 counting as the highest; cosine with a 1e-12 guard; min-max with a 1e-5
guard; argmax ties to the lowest channel; bilinear resizing with align_corners=False.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from dhr_cli.config import IGNORE_INDEX, PropagateConfig, SinkhornConfig
from dhr_cli.errors import ShapeError
from dhr_cli.kernels.checks import check_shape
from dhr_cli.kernels.crf import crf_function
from dhr_cli.kernels.seed import crf_padded, normalize_cams
from dhr_cli.kernels.sinkhorn import f_ot, minmax_last
from dhr_cli.kernels.upsample import (first_argmax, guided_upsample, labels_from_probs, resize, restore_classes,
                                      upsample_labels)

__all__ = [
    "PropagateItem", "majority_pool", "class_prototypes", "cosine_heatmap", "correlation_groups", "seeded_marginals",
    "rebalance", "pooled_cells", "step3_needed", "propagate_items", "propagate_method", "cam_baseline",
    "propagate_batch",
]  # fmt: skip


@functools.lru_cache(maxsize=32)
def _axis_bins(size: int, cells: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (pixel, bin) pair of the adaptive-pooling bins along one axis (neighbouring bins may overlap).

    Returns pixel, bin and first (the pair is the pixel's first bin), in pixel-major order.
    """
    i = torch.arange(cells, device=device)
    start = (i * size) // cells
    length = ((i + 1) * size + cells - 1) // cells - start
    offset = torch.arange(int(length.sum()), device=device) - torch.repeat_interleave(length.cumsum(0) - length, length)
    pixel = torch.repeat_interleave(start, length) + offset
    bins = torch.repeat_interleave(i, length)
    order = torch.argsort(pixel * cells + bins)
    pixel, bins = pixel[order], bins[order]
    first = torch.ones_like(pixel, dtype=torch.bool)
    first[1:] = pixel[1:] != pixel[:-1]
    return pixel, bins, first


@functools.lru_cache(maxsize=8)
def _pool_keys(h: int, w: int, gh: int, gw: int, stride: int, device: torch.device):
    """Histogram keys cell * stride of the adaptive-pooling bins of an h x w mask.

    Returns key_first (h * w,): the key of each pixel's first cell (row-major, so it lines up with
    the mask itself), and pix_extra, key_extra: the (pixel, cell) pairs of pixels that also lie
    in a second, overlapping bin (a few rows and columns).
    """
    py, by, fy = _axis_bins(h, gh, device)
    px, bx, fx = _axis_bins(w, gw, device)
    pix = (py[:, None] * w + px[None, :]).flatten()
    key = ((by[:, None] * gw + bx[None, :]) * stride).flatten()
    first = (fy[:, None] & fx[None, :]).flatten()
    key_first = torch.empty(h * w, dtype=key.dtype, device=device).index_copy_(0, pix[first], key[first])
    pix_extra, key_extra = pix[~first], key[~first]
    if gh * gw * stride < 2**31:  # int32 keys: half the memory traffic
        key_first, pix_extra, key_extra = key_first.int(), pix_extra.int(), key_extra.int()
    return key_first, pix_extra, key_extra


# ---- step 2.1: class-level pooling ----------------------------------------------------------
def majority_pool(mask: torch.Tensor, grid: tuple[int, int], values: list[int] | None = None) -> torch.Tensor:
    """Majority label of each adaptive-pooling bin of `mask` (H, W) on a (hu, wu) grid: (hu, wu) int64.

    255 counts as a label; ties go to the lowest label value (255 being the highest). `values`:
    the values the mask holds (or a superset), when the caller has counted them already.

    >>> m = torch.tensor([[1, 1, 2, 2], [1, 255, 2, 2]])
    >>> majority_pool(m, (1, 2)).tolist()
    [[1, 2]]
    """
    check_shape(mask, "H W", "mask")
    gh, gw = int(grid[0]), int(grid[1])
    stride = IGNORE_INDEX + 1
    if mask.dtype != torch.uint8:  # uint8 stores are read as they are; other masks as int64
        mask = mask.long()
        if mask.numel():
            stride = max(stride, int(mask.max()) + 1)
    # One histogram of (cell, label) keys over every (pixel, cell) pair: a pixel on the edge of
    # two overlapping bins counts in both, like adaptive_avg_pool2d's bins.
    # The labels present, ascending (255 last), renumbered 0..k-1 first: the histogram then has
    # cells x k bins instead of cells x 256 (a mask holds a few labels; same counts, same order).
    flat = mask.reshape(-1)
    blocks = _exact_blocks(mask.shape, (gh, gw))
    if values and blocks:  # a label absent from the mask never wins a block
        return _majority_blocks(mask, (gh, gw), torch.tensor(sorted(set(values)), device=mask.device))
    labels = torch.bincount(flat, minlength=stride).nonzero()[:, 0]
    k = max(int(labels.numel()), 1)
    if blocks and labels.numel():
        return _majority_blocks(mask, (gh, gw), labels)
    compact = torch.zeros(stride, dtype=torch.long, device=mask.device)
    compact[labels] = torch.arange(labels.numel(), device=mask.device)
    flat = compact.index_select(0, flat.long())
    key_first, pix_extra, key_extra = _pool_keys(mask.shape[0], mask.shape[1], gh, gw, k, mask.device)
    counts = torch.bincount(key_first + flat, minlength=gh * gw * k)
    if len(pix_extra):  # pixels on the overlap of two bins count in the second one too
        extra = key_extra + flat.index_select(0, pix_extra)
        counts.index_add_(0, extra, torch.ones(1, dtype=counts.dtype, device=counts.device).expand(len(extra)))
    best = first_argmax(counts.view(gh * gw, k).T)  # first maximum: the lowest label
    return labels.index_select(0, best).view(gh, gw)


def _exact_blocks(size: tuple[int, int], grid: tuple[int, int]) -> bool:
    """Whether the adaptive-pooling bins are disjoint blocks of equal size (each side a multiple of its cells),
    small enough for `_majority_blocks`' counters (uint8 along a block row, int16 per block)."""
    (h, w), (gh, gw) = size, grid
    return gh > 0 and gw > 0 and h % gh == 0 and w % gw == 0 and 0 < w // gw < 256 and (h // gh) * (w // gw) < 2**15


def _majority_blocks(mask: torch.Tensor, grid: tuple[int, int], labels: torch.Tensor) -> torch.Tensor:
    """`majority_pool` when the bins are disjoint equal blocks: one pass per label present (ascending),
    counting its pixels per block (uint8 sums along each block row, then int16 down the block), the
    first label with the most pixels winning. 3-4x faster on the CPU than the histogram of keys,
    which also handles overlapping bins."""
    (h, w), (gh, gw) = mask.shape, grid
    blocks = mask.view(gh, h // gh, gw, w // gw)
    best_count = best = None
    for j, label in enumerate(labels.tolist()):
        count = (blocks == label).view(torch.uint8).sum(3, dtype=torch.uint8).sum(1, dtype=torch.int16)
        if best is None:
            best_count, best = count, torch.zeros(count.shape, dtype=torch.long, device=mask.device)
        else:
            win = count > best_count
            best_count = torch.where(win, count, best_count)
            best.masked_fill_(win, j)
    return labels.index_select(0, best.flatten()).view(gh, gw)


def correlation_groups(protos: torch.Tensor, class_valid: torch.Tensor, tau: float,
                       alone: torch.Tensor | None = None) -> torch.Tensor:
    """G[b, i, j] = j >= i and relu(cos(V_i, V_j)) > tau (the triangular grouping): (B, N, N) bool.

    `alone` (B, N) bool marks classes kept out of every group but their own (background, unless
    PropagateConfig.step3_background)."""
    v = F.normalize(protos, dim=-1, eps=1e-12)
    corr = torch.triu(torch.relu(torch.bmm(v, v.transpose(1, 2))))
    both = class_valid[:, :, None] & class_valid[:, None, :]
    groups = (corr > tau) & both
    if alone is not None:
        n = groups.shape[1]
        apart = (alone[:, :, None] | alone[:, None, :]) & ~torch.eye(n, dtype=torch.bool, device=groups.device)
        groups = groups & ~apart
    return groups


def step3_groups(setup: "_Classes", cfg: PropagateConfig, background: int) -> torch.Tensor:
    """Step 3's groups of a batch: `correlation_groups` at cfg.tau, background alone unless allowed."""
    alone = None if cfg.step3_background else setup.classes == background
    return correlation_groups(setup.protos, setup.class_valid, cfg.tau, alone)


def seeded_marginals(cell_labels: torch.Tensor, cell_valid: torch.Tensor, classes: torch.Tensor,
                     floor: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """b_c proportional to max(share of valid grid cells labelled c, floor): (B, N), 0 on padding."""
    hits = ((cell_labels[:, :, None] == classes[:, None, :]) & cell_valid[:, :, None]).sum(1).to(dtype)
    share = hits / cell_valid.sum(1, keepdim=True).clamp_min(1).to(dtype)
    return torch.where(classes >= 0, share.clamp_min(floor), torch.zeros_like(share))


def rebalance(heat_us: torch.Tensor, heat_ws: torch.Tensor | None, groups: torch.Tensor,
              cell_valid: torch.Tensor | None, class_valid: torch.Tensor, sinkhorn: SinkhornConfig,
              marginals: torch.Tensor | None) -> torch.Tensor:
    """Steps 2.4-2.5: group-wise OT on WSS heat-maps (compounding in order), then global OT.

    Args:
        heat_us, heat_ws: (B, N, G) min-max heat-maps; heat_ws may be None when no group has > 1 class.
        groups: (B, N, N) bool from `correlation_groups`.
        cell_valid: (B, G) bool, or None when no cell is padding.
        marginals: (B, N) class masses (seeded) or None (uniform, the authors').
    Returns:
        (B, N, G) rebalanced heat-maps, min-max per class.
    """
    heat = heat_us
    if heat_ws is not None:
        # Every group G_i with several classes is one OT problem on H_ws (which Step 3 does not
        # change): all of them in one batched call, then applied in order i, so that
        # overlapping groups compound as in the reference.
        pairs = (groups.sum(2) > 1).nonzero()  # (P, 2): image b, group i; ordered by b, then i
        if len(pairs):
            img, grp = pairs[:, 0], pairs[:, 1]
            member = groups[img, grp]  # (P, N)
            factors = f_ot(heat_ws.index_select(0, img), sinkhorn,
                             pixel_valid=None if cell_valid is None else cell_valid.index_select(0, img),
                             class_valid=member,
                             class_marginal=None if marginals is None else marginals.index_select(0, img))
            by_group: dict[int, list[int]] = {}
            for p, i in enumerate(grp.tolist()):
                by_group.setdefault(i, []).append(p)
            for i in sorted(by_group):
                sel = torch.tensor(by_group[i], device=heat.device)
                rows = img.index_select(0, sel)  # distinct images: one problem per image and group
                part = heat.index_select(0, rows)
                part = torch.where(member.index_select(0, sel)[:, :, None], part * factors.index_select(0, sel), part)
                heat = part if len(sel) == heat.shape[0] else heat.index_copy(0, rows, part)
    factor = f_ot(heat, sinkhorn, pixel_valid=cell_valid, class_valid=class_valid, class_marginal=marginals)
    out = minmax_last(heat * factor, cell_valid)
    return out * class_valid[:, :, None].to(out.dtype)


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
    # (hu * wu,) majority label of each USS grid cell (Step 2.1), when a loader process already
    # pooled the seed (`pooled_cells`); computed from `seed` otherwise.
    cells: torch.Tensor | None = None
    seed_values: list[int] | None = None  # the values `seed` holds (or a superset), when a loader counted them


def _wss_maps(item: PropagateItem) -> list[torch.Tensor]:
    """The item's WSS maps, loading them (once) when they were given as a loader."""
    if callable(item.wss):
        item.wss = list(item.wss())
    return item.wss


def _recovery_weights(item: PropagateItem, label: int, grid: tuple[int, int], peak: float) -> torch.Tensor | None:
    """Cells at the class's highest CAM response (>= peak times its maximum on the USS grid), or None."""
    if item.cams is None or item.cam_labels is None or label not in item.cam_labels:
        return None
    cam = resize(torch.relu(item.cams[item.cam_labels.index(label)].float())[None], grid)[0].flatten()
    if float(cam.max()) <= 0:
        return None
    return (cam >= peak * cam.max()).double()


def pooled_cells(item: PropagateItem) -> torch.Tensor:
    """Step 2.1's majority label of each USS grid cell, (hu * wu,) int64 (the item's `cells` if given)."""
    grid = (int(item.uss.shape[-2]), int(item.uss.shape[-1]))
    if item.cells is not None:
        if item.cells.numel() != grid[0] * grid[1]:
            raise ShapeError(f"cells has {item.cells.numel()} values, the USS grid {grid[0]}x{grid[1]} cells")
        return item.cells.to(item.uss.device, torch.long).view(-1)
    return majority_pool(item.seed.to(item.uss.device), grid, item.seed_values).view(-1)


@dataclass
class _Classes:
    """Step 2.1-2.2's class-level set-up of a batch (classes first: (B, N, G))."""

    grids: list[tuple[int, int]]
    sizes: list[int]  # cells per image
    cell_labels: torch.Tensor  # (B, G), 255 on padding
    cell_valid: torch.Tensor  # (B, G)
    cells_ok: torch.Tensor | None  # cell_valid, or None when no cell is padding
    classes_list: list[list[int]]
    classes: torch.Tensor  # (B, N), -1 on padding
    class_valid: torch.Tensor  # (B, N)
    weights: torch.Tensor  # (B, N, G) float64 cell weights of each class
    feats: torch.Tensor  # (B, G, D) float64 USS features (a view of (B, D, G))
    protos: torch.Tensor  # (B, N, D)


def _class_setup(items: list[PropagateItem], cfg: PropagateConfig, background: int,
                 dtype: torch.dtype = torch.float64) -> _Classes:
    dev = items[0].uss.device
    n_img = len(items)
    grids = [(int(it.uss.shape[-2]), int(it.uss.shape[-1])) for it in items]
    sizes = [g[0] * g[1] for g in grids]
    g_max = max(sizes)
    # Step 2.1 at full resolution, image by image (each its own size); the rest on the grid.
    cell_labels = torch.full((n_img, g_max), IGNORE_INDEX, dtype=torch.long, device=dev)
    for i, it in enumerate(items):
        cell_labels[i, : sizes[i]] = pooled_cells(it)
    if all(g == g_max for g in sizes):
        cell_valid = torch.ones(n_img, g_max, dtype=torch.bool, device=dev)
    else:
        cell_valid = torch.arange(g_max, device=dev)[None, :] < torch.tensor(sizes, device=dev)[:, None]
    # Labels that win a cell, all images at once: one (B, labels) table, one transfer.
    width = max(IGNORE_INDEX + 1, int(cell_labels.max()) + 1)
    wins = torch.zeros(n_img, width, dtype=torch.bool, device=dev).scatter_(1, cell_labels, True)
    wins[:, IGNORE_INDEX] = False
    won: list[list[int]] = [[] for _ in items]
    for i, label in wins.nonzero().tolist():
        won[i].append(label)
    classes_list, extras = [], []
    for i, (it, grid) in enumerate(zip(items, grids)):
        extra = {}
        if cfg.recover_missing:
            for label in it.labels:
                if label not in won[i]:
                    w = _recovery_weights(it, label, grid, cfg.recover_peak)
                    if w is not None:
                        extra[label] = w
        classes = sorted(set(won[i]) | set(extra)) or [background]  # nothing to propagate from: all background
        classes_list.append(classes)
        extras.extend((i, classes.index(label), w) for label, w in extra.items())
    n_cls = max(len(c) for c in classes_list)
    classes = torch.tensor([c + [-1] * (n_cls - len(c)) for c in classes_list], device=dev)
    class_valid = classes >= 0
    # Class-level work runs in float64: grids are small, and min-max with its 1e-5 guard
    # amplifies rounding wherever a heat-map is nearly flat. Classes come first, (B, N, G):
    # reductions over cells then run along the contiguous axis (several times faster on the CPU).
    weights = ((classes[:, :, None] == cell_labels[:, None, :]) & cell_valid[:, None, :]).to(dtype)
    for i, k, w in extras:
        weights[i, k, : sizes[i]] = w
    feats = _stack_cells(pad_channels([it.uss.flatten(1) for it in items]), g_max, dtype)  # (B, G, D) view of (B, D, G)
    return _Classes(grids, sizes, cell_labels, cell_valid, None if all(g == g_max for g in sizes) else cell_valid,
                    classes_list, classes, class_valid, weights, feats, class_prototypes(feats, weights))


def step3_needed(item: PropagateItem, cfg: PropagateConfig, *, background: int = 0) -> bool:
    """Whether Step 3 runs for this image (some USS group holds several classes), given WSS maps.

    What `propagate_items` decides for the image, computed alone: a loader process asks it to
    read the WSS maps only for the images that use them. The class set-up runs in float32 here
    (3x cheaper than float64; the features are float16 as stored): a cosine within rounding of
    tau may decide otherwise than the float64 kernels, which then read the maps themselves.
    """
    if not cfg.step3:
        return False
    setup = _class_setup([item], cfg, background, dtype=torch.float32)
    return bool((step3_groups(setup, cfg, background).sum(2) > 1).any())


def propagate_items(items: list[PropagateItem], cfg: PropagateConfig, *, background: int = 0,
                    crf=None) -> list[torch.Tensor]:
    """Steps 2 and 3 of docs/method.md for a batch of images -> masks (H_i, W_i) long, no 255."""
    dev = items[0].uss.device
    n_img = len(items)
    setup = _class_setup(items, cfg, background)
    grids, sizes, cells_ok = setup.grids, setup.sizes, setup.cells_ok
    classes, class_valid, classes_list = setup.classes, setup.class_valid, setup.classes_list
    weights, protos = setup.weights, setup.protos
    heat_us = cosine_heatmap(setup.feats, protos, cells_ok, class_valid)
    groups = step3_groups(setup, cfg, background)
    heat_ws = None
    has_wss = [cfg.step3 and (callable(it.wss) or bool(it.wss)) for it in items]
    if not all(has_wss):
        groups = groups & torch.tensor(has_wss, device=dev)[:, None, None]  # no WSS: no Step 3
    need = (groups.sum(2) > 1).any(1).nonzero()[:, 0]
    if len(need):  # Step 3 only for the images with a USS group of several classes
        idx = need.tolist()
        part = _wss_heatmap([items[i] for i in idx], [grids[i] for i in idx], weights[need],
                            None if cells_ok is None else cells_ok[need], class_valid[need])
        heat_ws = part if len(idx) == n_img else heat_us.new_zeros(heat_us.shape).index_copy_(0, need, part)
    marginals = None
    if cfg.marginals == "seeded":
        marginals = seeded_marginals(setup.cell_labels, setup.cell_valid, classes, cfg.min_marginal,
                                     dtype=torch.float64)
    heat = rebalance(heat_us, heat_ws, groups, cells_ok, class_valid, cfg.sinkhorn, marginals)  # (B, N, G)
    guided = cfg.upsample == "guided" and all(it.image is not None for it in items)
    if (crf is not None or guided) and all(it.image is not None for it in items):
        grid_maps = [heat[i, : len(c), : sizes[i]].reshape(len(c), *grid)
                     for i, (c, grid) in enumerate(zip(classes_list, grids))]
        class_values = [classes[i, : len(c)] for i, c in enumerate(classes_list)]
        if guided:
            maps = [guided_upsample(m, it.image, cfg.guided_radius, cfg.guided_eps) for m, it in zip(grid_maps, items)]
        else:
            maps = [resize(m.float(), tuple(it.seed.shape)) for m, it in zip(grid_maps, items)]
        probs = [m / m.sum(0, keepdim=True).clamp_min(1e-12) for m in maps]
        before = [labels_from_probs(p, c) for p, c in zip(probs, class_values)]
        if crf is not None:
            maps = crf_padded(crf, [it.image for it in items], [p.clamp_min(1e-6) for p in probs])
            masks = [labels_from_probs(m, c) for m, c in zip(maps, class_values)]
        else:
            masks = before
    else:
        sizes_hw = [tuple(it.seed.shape) for it in items]
        masks = upsample_labels(heat, classes, [len(c) for c in classes_list], grids, sizes_hw)
        before = masks
    if cfg.restore_classes:  # a labelled class that held pixels before the CRF / the argmax keeps them
        masks = [restore_classes(m, [c for c in it.labels if c in cl], [b, it.seed])
                 for m, b, it, cl in zip(masks, before, items, classes_list)]
    return masks


def _to_float64(x: torch.Tensor) -> torch.Tensor:
    # float16 -> float64 has no fast CPU kernel; float16 -> float32 -> float64 is exact and ~5x faster.
    return (x.float() if x.dtype in (torch.float16, torch.bfloat16) else x).to(torch.float64)


def _stack_cells(maps: list[torch.Tensor], cells: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """[(D, G_i)] feature maps -> (B, G, D) float64 (or `dtype`), zero beyond G_i.

    The result is a transposed view of a (B, D, G) tensor: no layout copy of the features.
    """
    if all(m.shape == (maps[0].shape[0], cells) for m in maps):  # one grid for the whole batch: no padding
        stacked = torch.stack(maps)
        return (_to_float64(stacked) if dtype == torch.float64 else stacked.to(dtype)).transpose(1, 2)
    out = torch.zeros(len(maps), maps[0].shape[0], cells, dtype=dtype, device=maps[0].device)
    for i, m in enumerate(maps):
        out[i, :, : m.shape[1]] = m
    return out.transpose(1, 2)


def pad_channels(maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Feature maps (D_i, ...) of one batch zero-padded to the largest D_i. A store's D may differ
    from image to image (docs/contracts.md); zero channels change no inner product and no norm,
    so every cosine, and each image's result, is what it would be alone."""
    d = max(m.shape[0] for m in maps)
    return [m if m.shape[0] == d else torch.cat([m, m.new_zeros((d - m.shape[0], *m.shape[1:]))]) for m in maps]


def class_prototypes(feats: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean feature of each class: (B, G, D) features, (B, N, G) cell weights -> (B, N, D)."""
    check_shape(feats, "B G D", "feats")
    check_shape(weights, "B N G", "weights")
    return torch.bmm(weights, feats) / weights.sum(2).clamp_min(1e-12)[..., None]


def cosine_heatmap(feats: torch.Tensor, protos: torch.Tensor, cell_valid: torch.Tensor | None,
                   class_valid: torch.Tensor) -> torch.Tensor:
    """Cosine of every cell to every prototype, min-max per class over valid cells (None: all valid).

    (B, G, D) features, (B, N, D) prototypes -> (B, N, G), 0 on padded cells and classes.

    One GEMM over the features and no normalised copy of them: cos(f, v) = (f . v/|v|) / |f|
    (both norms guarded at 1e-12), the same value as normalising f first up to float rounding.
    `feats` may be a transposed view of (B, D, G); the norm and the GEMM follow its memory
    layout (a reduction across a strided axis is an order of magnitude slower on the CPU).
    """
    v = F.normalize(protos, dim=-1, eps=1e-12)
    by_dim = feats.transpose(1, 2)  # (B, D, G): the GEMM takes either layout as it is
    if feats.stride(1) == 1 and feats.stride(2) != 1:  # (B, D, G) in memory: reduce over D, vectorised along G
        norm = (by_dim * by_dim).sum(1).sqrt()
    else:
        norm = torch.linalg.vector_norm(feats, dim=2)
    heat = minmax_last(torch.bmm(v, by_dim) / norm.clamp_min(1e-12)[:, None, :], cell_valid)
    return heat * class_valid[:, :, None].to(heat.dtype)


def _resized_cells(maps: list[torch.Tensor], grids: list[tuple[int, int]], cells: int) -> torch.Tensor:
    """WSS maps (D, h_i, w_i) resized to their USS grids: (B, G, D) float64, zero beyond each grid.

    Bilinear (align_corners=False) in float64, channels-last (the kernel for many channels), one
    call for all maps of the same shape.
    """
    d = maps[0].shape[0]
    out = None
    by_shape: dict[tuple, list[int]] = {}
    for i, (m, g) in enumerate(zip(maps, grids)):
        by_shape.setdefault((tuple(m.shape), g), []).append(i)
    for (shape, grid), idx in by_shape.items():
        # channels-last (the fast CPU kernel for many channels): one 2D transpose per map, in
        # float32 (float16 -> float32 is exact; strided float16 and float64 copies are slower)
        hw = shape[1] * shape[2]
        x = torch.stack([maps[i].float().reshape(d, hw).T.contiguous() for i in idx]).to(torch.float64)
        x = x.view(len(idx), shape[1], shape[2], d).permute(0, 3, 1, 2)
        if tuple(shape[1:]) != grid:
            x = F.interpolate(x, size=grid, mode="bilinear", align_corners=False)
        cells_of = x.permute(0, 2, 3, 1).reshape(len(idx), grid[0] * grid[1], d)  # channels-last: no copy
        if len(by_shape) == 1 and grid[0] * grid[1] == cells:
            return cells_of
        if out is None:
            out = torch.zeros(len(maps), cells, d, dtype=torch.float64, device=maps[0].device)
        out[idx, : grid[0] * grid[1]] = cells_of
    return out


def _wss_heatmap(items, grids, weights_t, cell_valid, class_valid) -> torch.Tensor:
    """H_ws (B, N, G): per WSS map, resized to the USS grid, pooled with the same cells; min-max of the mean."""
    maps = [_wss_maps(it) for it in items]
    n_maps = len(maps[0])
    if any(len(m) != n_maps for m in maps):
        raise ShapeError(f"images of one batch have different numbers of WSS maps: {[len(m) for m in maps]}")
    total = None
    for level in range(n_maps):
        level_maps = pad_channels([m[level] for m in maps])
        feats = _resized_cells(level_maps, grids, weights_t.shape[2])
        heat = cosine_heatmap(feats, class_prototypes(feats, weights_t), cell_valid, class_valid)
        total = heat if total is None else total + heat
    heat = minmax_last(total / n_maps, cell_valid)
    return heat * class_valid[:, :, None].to(heat.dtype)



def propagate_method(items: list[PropagateItem], cfg: PropagateConfig, background: int, crf) -> list[torch.Tensor]:
    """The configured method on a batch: DHR (Steps 2-3), or the CAM or random-walk baseline."""
    if cfg.method == "dhr":
        return propagate_items(items, cfg, background=background, crf=crf)
    if cfg.method == "cam":
        return cam_baseline(items, cfg.cam_bg_threshold, background, crf)
    from dhr_cli.kernels.randomwalk import random_walk_mask

    rw = cfg.rw
    return [random_walk_mask(it.cams, it.uss.float(), it.cam_labels, tuple(it.seed.shape), beta=rw.beta, logt=rw.logt,
                             bg=rw.bg, kind=rw.affinity, radius=rw.radius, power=rw.power, max_side=rw.max_side)
            for it in items]


def cam_baseline(items: list[PropagateItem], bg_threshold: float, background: int, crf=None) -> list[torch.Tensor]:
    """CAM argmax against a constant background score (optionally CRF-refined): the plain baseline."""
    probs, values = [], []
    for it in items:
        cams = resize(normalize_cams(it.cams.float()), tuple(it.seed.shape)).clamp(0, 1)
        scores = torch.cat([cams.new_full((1, *cams.shape[1:]), bg_threshold), cams], 0)
        probs.append(scores / scores.sum(0, keepdim=True).clamp_min(1e-12))
        values.append(torch.tensor([background, *it.cam_labels], device=cams.device))
    if crf is not None and all(it.image is not None for it in items):
        probs = crf_padded(crf, [it.image for it in items], probs)
    return [v[p.argmax(0)] for p, v in zip(probs, values)]


def propagate_batch(seeds: torch.Tensor, uss: torch.Tensor, wss: list[torch.Tensor], values: torch.Tensor,
                    images: torch.Tensor | None, cfg: PropagateConfig, *, cams: torch.Tensor | None = None,
                    pixel_valid: torch.Tensor | None = None, background: int = 0, crf=None) -> torch.Tensor:
    """Online propagation for equally sized crops (what `dhr train` calls every iteration).

    Args:
        seeds: (B, H, W) seed masks, 255 = unsure.
        uss: (B, D, hu, wu) USS features on the crop's grid.
        wss: [(B, D_l, h_l, w_l)] WSS feature maps.
        values: (B, L) image-level foreground label values, -1 = padding.
        images: (B, 3, H, W) 0..255 for the CRF, or None.
        cams: (B, L, h, w) CAMs aligned with `values`, for recovering classes that win no cell.
        pixel_valid: (B, H, W) bool; outside it seeds count as unsure and the output is 255.
    Returns:
        (B, H, W) int64 masks.
    """
    if crf is None and cfg.use_crf and images is not None:
        crf = crf_function(cfg.crf)
    if pixel_valid is not None:
        seeds = torch.where(pixel_valid, seeds.long(), torch.full_like(seeds.long(), IGNORE_INDEX))
    items = []
    for b in range(seeds.shape[0]):
        keep = values[b] >= 0
        labels = values[b][keep].tolist()
        items.append(PropagateItem(seed=seeds[b].long(), uss=uss[b], wss=[w[b] for w in wss], labels=labels,
                                   cams=cams[b][keep] if cams is not None else None,
                                   cam_labels=labels if cams is not None else None,
                                   image=images[b] if images is not None else None))
    out = torch.stack(propagate_items(items, cfg, background=background, crf=crf))
    if pixel_valid is not None:
        out = torch.where(pixel_valid, out, torch.full_like(out, IGNORE_INDEX))
    return out
