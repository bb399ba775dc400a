"""Resizing and upsampled argmax: the grid-to-image steps shared by seeds and propagation.

Fixed details (docs/method.md): bilinear resizing with align_corners=False; argmax ties go to
the lowest channel. `upsample_argmax_batch` computes the argmax of bilinearly upsampled maps
exactly, but only where two neighbouring grid columns disagree.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from dhr_cli.kernels.checks import check_shape

__all__ = ["resize", "resize_cells", "first_argmax", "labels_from_probs", "upsample_argmax", "upsample_argmax_batch",
           "guided_filter", "guided_upsample", "restore_classes",
           "upsample_labels"]


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


def first_argmax(x: torch.Tensor) -> torch.Tensor:
    """Index of the first maximum along dim 0 (ties to the lowest index): (C, ...) -> (...) int64.

    Elementwise passes over the channels: a reduction over a few channels is several times
    slower on the CPU than C - 1 comparisons of whole maps.
    """
    best_val = x[0]
    best = torch.zeros(x.shape[1:], dtype=torch.long, device=x.device)
    for c in range(1, x.shape[0]):
        win = x[c] > best_val
        best_val = torch.where(win, x[c], best_val)
        best.masked_fill_(win, c)
    return best


def labels_from_probs(probs: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Argmax over channels (ties to the lowest), mapped to label values: (L, H, W), (L,) -> (H, W)."""
    # max(0).indices is the first maximum, like argmax(0), and several times faster on the CPU;
    # so is index_select against advanced indexing.
    idx = probs.max(0).indices
    return classes.index_select(0, idx.flatten()).view(idx.shape)


@functools.lru_cache(maxsize=64)
def _bilinear_axis(n_in: int, n_out: int, device: torch.device):
    """Bilinear resizing along one axis, align_corners=False, in float64 as docs/method.md's reference.

    Returns lo, hi (n_out,) source indices, lam (n_out,) weight of hi, and per source index i
    the outputs strictly between i and i + 1 (lo = i, lam > 0): pos (n_in, k) (the last one
    repeated to fill k), lam at pos, and used (n_in,): i has such outputs. An output with
    lam = 0 is source i itself.
    """
    d = torch.arange(n_out, dtype=torch.float64, device=device)
    src = ((d + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
    lo = src.floor().long().clamp_max(n_in - 1)
    hi = (lo + 1).clamp_max(n_in - 1)
    lam = src - lo
    between = (lam > 0) & (hi > lo)
    count = torch.bincount(lo[between], minlength=n_in)
    first = torch.full((n_in,), n_out, dtype=torch.long, device=device).scatter_reduce_(
        0, lo[between], d.long()[between], reduce="amin")
    k = torch.arange(max(int(count.max()), 1), device=device)
    pos = first[:, None] + torch.minimum(k[None, :], (count - 1).clamp_min(0)[:, None])
    pos = pos.clamp_max(n_out - 1)
    return lo, hi, lam, pos, lam.index_select(0, pos.flatten()).view(pos.shape), count > 0


def upsample_argmax(maps: torch.Tensor, size: tuple[int, int], classes: torch.Tensor) -> torch.Tensor:
    """Label values of the argmax of bilinearly upsampled maps: (N, h, w), (N,) -> (H, W) int64.

    The same as `labels_from_probs(resize(maps, size), classes)` up to float rounding (it is
    docs/method.md's resize in the maps' dtype, float64 here, and its argmax), computed without
    resizing every channel to full resolution: see `upsample_argmax_batch`.
    """
    check_shape(maps, "N h w", "maps")
    if maps.shape[0] == 1:
        return classes[:1].view(1, 1).expand(int(size[0]), int(size[1])).clone()
    return upsample_argmax_batch(maps[None], size, classes[None])[0]


def upsample_argmax_batch(maps: torch.Tensor, size: tuple[int, int], classes: torch.Tensor) -> torch.Tensor:
    """`upsample_argmax` for a batch of maps on one grid and one output size: (B, N, h, w), (B, N) -> (B, H, W).

    Bilinear resizing is separable: the maps are resized along y first (N x H x w values, the
    reference's order of operations), then along x. A pixel lying between two grid columns whose
    argmax is the same channel c takes c too: every channel's value there is the same convex
    combination of its two column values, so c stays the first maximum. Only the pixels between
    columns that disagree are computed; they are a small share of the image (~5% on VOC-like
    scenes).
    """
    check_shape(maps, "B N h w", "maps")
    b, n, h, w = maps.shape
    H, W = int(size[0]), int(size[1])
    dev = maps.device
    y0, y1, ly, _, _, _ = _bilinear_axis(h, H, dev)
    x0, _, _, xpos, xlam, xused = _bilinear_axis(w, W, dev)
    ly = ly.to(maps.dtype)[:, None]
    rows = maps.index_select(2, y0) * (1 - ly) + maps.index_select(2, y1) * ly  # (B, N, H, w)
    best = first_argmax(rows.transpose(0, 1))  # (B, H, w)
    right = torch.cat([best[..., 1:], best[..., -1:]], 2)
    lab = torch.gather(classes, 1, best.view(b, H * w)).view(b, H, w)
    out = torch.gather(lab, 2, x0.expand(b, H, W))
    sb, sy, sx = ((best != right) & xused).nonzero(as_tuple=True)  # segments whose two source columns disagree
    if len(sb) == 0:
        return out
    # values of every channel at both ends of each segment: rows[sb, c, sy, sx (+1)]
    src = ((sb * n)[None, :] + torch.arange(n, device=dev)[:, None]) * (H * w) + (sy * w + sx)[None, :]  # (N, S)
    flat = rows.reshape(-1)
    left = flat.index_select(0, src.view(-1)).view(n, -1, 1)
    right = flat.index_select(0, src.view(-1) + 1).view(n, -1, 1)  # sx < w - 1: the last column never disagrees
    lam = xlam.index_select(0, sx).to(maps.dtype)  # (S, k)
    channel = first_argmax(left * (1 - lam) + right * lam)  # (S, k)
    labels = classes.reshape(-1).index_select(0, (sb[:, None] * n + channel).view(-1))
    pos = (sb * (H * W) + sy * W)[:, None] + xpos.index_select(0, sx)
    out.view(-1).index_copy_(0, pos.view(-1), labels)
    return out


def upsample_labels(heat: torch.Tensor, classes: torch.Tensor, counts: list[int], grids: list[tuple[int, int]],
                     sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Step 2.6 without CRF: heat (B, N, G) -> [(H_i, W_i) label masks].

    One call per group of images with the same grid, size and class count (no padded channels to
    carry through the full-resolution work).
    """
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(zip(grids, sizes, counts)):
        groups.setdefault(key, []).append(i)
    out: list[torch.Tensor] = [heat.new_empty(0)] * len(grids)
    for (grid, size, n), idx in groups.items():
        sel = torch.tensor(idx, device=heat.device)
        cls = classes.index_select(0, sel)[:, :n]
        if n == 1:  # one class: a constant mask
            masks = cls[:, :, None].expand(len(idx), *size).clone()
        else:
            maps = heat.index_select(0, sel)[:, :n, : grid[0] * grid[1]].reshape(len(idx), n, *grid)
            masks = upsample_argmax_batch(maps, size, cls)
        for j, i in enumerate(idx):
            out[i] = masks[j]
    return out



def _box_mean(x: torch.Tensor, r: int) -> torch.Tensor:
    """Mean over the (2r+1)^2 window clipped to the image (He et al.'s boxfilter / N): (B, C, H, W)."""
    if r <= 0:
        return x
    # Two 1-D passes: avg_pool with count_include_pad=False divides by the in-image count.
    ky, kx = min(2 * r + 1, 2 * x.shape[-2] - 1), min(2 * r + 1, 2 * x.shape[-1] - 1)
    x = F.avg_pool2d(x, (ky, 1), stride=1, padding=(ky // 2, 0), count_include_pad=False)
    return F.avg_pool2d(x, (1, kx), stride=1, padding=(0, kx // 2), count_include_pad=False)


def guided_filter(guide: torch.Tensor, src: torch.Tensor, radius: int, eps: float) -> torch.Tensor:
    """He et al.'s colour guided filter (ECCV 2010 / TPAMI 2013), batched: q = mean(a)^T I + mean(b).

    Args:
        guide: (B, 3, H, W) guidance image, values in 0..1.
        src: (B, L, H, W) maps to filter (each channel on its own).
        radius: window radius r in pixels (window (2r+1)^2, clipped at the borders).
        eps: regulariser added to the window's colour covariance (in (0..1)^2 units).

    Returns (B, L, H, W) in src's dtype, on src's device. Local linear model per window:
    a = (Sigma + eps U)^-1 cov(I, p), b = mean(p) - a^T mean(I).
    """
    check_shape(guide, "B C H W", "guide")
    check_shape(src, "B L H W", "src")
    b, n, h, w = src.shape
    dt = torch.float64 if src.dtype == torch.float64 else torch.float32
    I, p = guide.to(dt), src.to(dt)
    mean_i = _box_mean(I, radius)  # (B, 3, H, W)
    mean_p = _box_mean(p, radius)  # (B, L, H, W)
    ii = torch.stack([I[:, a] * I[:, c] for a in range(3) for c in range(3)], 1)
    sigma = _box_mean(ii, radius) - (mean_i[:, :, None] * mean_i[:, None, :]).reshape(b, 9, h, w)
    sigma = sigma.reshape(b, 3, 3, h, w).permute(0, 3, 4, 1, 2) + eps * torch.eye(3, dtype=dt, device=src.device)
    ip = _box_mean((I[:, :, None] * p[:, None]).reshape(b, 3 * n, h, w), radius).reshape(b, 3, n, h, w)
    cov = ip - mean_i[:, :, None] * mean_p[:, None]  # (B, 3, L, H, W)
    a = torch.linalg.solve(sigma, cov.permute(0, 3, 4, 1, 2))  # (B, H, W, 3, L)
    a = a.permute(0, 3, 4, 1, 2)  # (B, 3, L, H, W)
    bb = mean_p - (a * mean_i[:, :, None]).sum(1)
    mean_a = _box_mean(a.reshape(b, 3 * n, h, w), radius).reshape(b, 3, n, h, w)
    q = (mean_a * I[:, :, None]).sum(1) + _box_mean(bb, radius)
    return q.to(src.dtype)


def guided_upsample(maps: torch.Tensor, image: torch.Tensor, radius: int, eps: float) -> torch.Tensor:
    """Heat-maps (L, h, w) -> (L, H, W) at the image's size: bilinear, then the colour guided filter
    with the image (3, H, W, 0..255) as guide, so edges of the maps snap to the image's edges.

    Returns non-negative maps (the filter's local linear model may undershoot 0)."""
    check_shape(maps, "L h w", "maps")
    size = tuple(image.shape[-2:])
    up = resize(maps.float(), size)
    return guided_filter(image[None].to(up.device).float() / 255.0, up[None], radius, eps)[0].clamp_min(0)


def restore_classes(mask: torch.Tensor, labels: list[int], references: list[torch.Tensor]) -> torch.Tensor:
    """Put back the labelled classes that a refinement step erased (docs/method.md: labelled classes survive).

    A label in `labels` with no pixel in `mask` takes back its pixels in the first of `references`
    (label masks of the same size, most trusted first, e.g. the argmax before the CRF, then the
    seed) where it has any. Restored regions are written in label order and never overwrite a
    class restored before them. Returns a new (H, W) mask (`mask` itself when nothing is missing).
    """
    if not labels:
        return mask
    # a histogram of the mask's values: about twice as fast on the CPU as scattering True into a table
    present = torch.bincount(mask.flatten().long(), minlength=max(labels) + 1) > 0
    missing = [c for c in sorted(set(labels)) if not bool(present[c])]
    if not missing:
        return mask
    out = mask.clone()
    taken = torch.zeros_like(mask, dtype=torch.bool)
    for c in missing:
        for ref in references:
            region = (ref.to(mask.device) == c) & ~taken
            if bool(region.any()):
                out[region] = c
                taken |= region
                break
    return out
