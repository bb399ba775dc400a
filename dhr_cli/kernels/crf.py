"""Mean-field dense CRF (Krähenbühl & Koltun) in PyTorch, batched, on the inputs' device.

Semantics are pydensecrf's `DenseCRF2D` + `unary_from_softmax` + `addPairwiseGaussian(sxy,
compat)` + `addPairwiseBilateral(sxy, srgb, rgb, compat)` + `inference(n_iter)`:

    U      = -log(clip(p, 1e-5, 1))                                      unary
    Q0     = softmax(-U)
    repeat n_iter:  Q = softmax(-U + sum_m w_m * msg_m(Q))               Potts, weights w_m
    msg_m(Q)_i = sum_j k'_m(i, j) Q_j,   k'_ij = k_ij / sqrt(d_i d_j),  d_i = sum_j k_ij
    Gaussian  k = exp(-|p_i - p_j|^2 / (2 sxy^2))
    bilateral k = exp(-|p_i - p_j|^2 / (2 sxy^2) - |I_i - I_j|^2 / (2 srgb^2))

(pydensecrf's Potts compatibility subtracts -w * message, so a label gains w times its
normalised neighbourhood mass: the same as an energy w * [l != l'].)

Instead of the permutohedral lattice, the mean field runs on a reduced grid (longer side at
most `cfg.max_side`; unaries and colours are area averages), where the kernels are computed
exactly. A grid cell stands for the pixels it covers, so the kernel between two cells is the
sum over their pixel pairs: for the bilateral kernel that is (pixels a) x (pixels b) x k(centres),
the common factor cancelling in the normalisation, and a cell's pairs with itself count as
one (its pixels share a colour); for the Gaussian kernel (sxy = 1 px is below a cell) the
pixel sums are computed exactly on the pixel lattice (separable, self pairs removed).
The bilateral kernel is sparse (srgb = 3 on 0..255 colours): cells are sorted along the first
principal axis of their colours, each block of rows only visits the cells whose projection is
within the cut-off, and entries below `KEEP` are dropped. The kernels of a batch form one
block-diagonal sparse matrix, so every iteration is one sparse matmul for the whole batch.
After the last iteration the pairwise term is upsampled (bilinear) and one last step is taken
with the full-resolution unary: out = softmax(-U_full + up(sum_m w_m msg_m)).

Padding: channels with `channel_valid` False are 0 in the output; pixels with `pixel_valid`
False neither send nor receive messages and keep their input. Each image is
cropped to its valid pixels first, so a padded batch gives the same result as a loop.
Memory: an image's grid is made coarser until its candidate pairs fit `MAX_PAIRS`, and the
images of a batch are processed in chunks of at most `MAX_PAIRS` candidate pairs.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from dhr_cli.config import CRFConfig
from dhr_cli.errors import ShapeError
from dhr_cli.kernels.checks import check_shape
from dhr_cli.kernels.permutohedral import Lattice, LatticeFilter

__all__ = ["dense_crf", "crf_function"]

UNARY_CLIP = 1e-5  # pydensecrf's unary_from_softmax(clip=1e-5)
KEEP = 1e-4  # bilateral kernel entries below this are dropped (sparse kernel)
MAX_PAIRS = 2**25  # candidate cell pairs per image (and per chunk of a batch): bounds time and memory
BLOCK_ELEMS = 2**22  # rows x candidate columns evaluated at once while building the kernel
BLOCK_ROWS = 256  # rows per block (a block visits the union of its rows' candidate columns)


def dense_crf(images: torch.Tensor, probs: torch.Tensor, cfg: CRFConfig, *,
              channel_valid: torch.Tensor | None = None,
              pixel_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Refine class probabilities with a mean-field dense CRF.

    Args:
        images: (B, 3, H, W) float RGB in 0..255.
        probs: (B, L, H, W) float probabilities (non-negative scores, renormalised over the
            valid channels).
        cfg: CRFConfig (n_iter, Gaussian sxy/compat, bilateral sxy/srgb/compat, max_side).
        channel_valid: (B, L) bool, False on padded classes (output 0 there).
        pixel_valid: (B, H, W) bool, False on padded pixels (they keep their input).

    Returns:
        (B, L, H, W) probabilities in probs' dtype, on probs' device.
    """
    check_shape(images, "B C H W", "images")
    check_shape(probs, "B L H W", "probs")
    b, n_lab, h, w = probs.shape
    if tuple(images.shape) != (b, 3, h, w):
        raise ShapeError(f"images: expected ({b}, 3, {h}, {w}), got {tuple(images.shape)}")
    if n_lab < 1 or h < 1 or w < 1:
        raise ShapeError(f"probs: expected non-empty (B, L, H, W), got {tuple(probs.shape)}")
    dev = probs.device
    cv = torch.ones(b, n_lab, dtype=torch.bool, device=dev)
    if channel_valid is not None:
        check_shape(channel_valid, "B L", "channel_valid")
        if tuple(channel_valid.shape) != (b, n_lab):
            raise ShapeError(f"channel_valid: expected ({b}, {n_lab}), got {tuple(channel_valid.shape)}")
        cv = channel_valid.to(dev, torch.bool)
    pv = None
    if pixel_valid is not None:
        check_shape(pixel_valid, "B H W", "pixel_valid")
        if tuple(pixel_valid.shape) != (b, h, w):
            raise ShapeError(f"pixel_valid: expected ({b}, {h}, {w}), got {tuple(pixel_valid.shape)}")
        pv = pixel_valid.to(dev, torch.bool)

    work = torch.float64 if probs.dtype == torch.float64 else torch.float32
    all_ch = channel_valid is None or bool(cv.all())
    cmask = cv[:, :, None, None]
    # scores renormalised over the valid channels, then pydensecrf's unary -log(clip(p, 1e-5, 1))
    p = probs.to(work).clamp_min(0)
    if not all_ch:
        p = p.masked_fill(~cmask, 0.0)
    p = p / p.sum(1, keepdim=True).clamp_min(1e-30)
    unary = -torch.log(p.clamp(UNARY_CLIP, 1.0))
    if cfg.n_iter == 0 or pv is not None:  # Q0 = softmax(-U); kept where the CRF does not run
        out = p.clamp(UNARY_CLIP, 1.0)
        out = out if all_ch else out.masked_fill(~cmask, 0.0)
        out = out / out.sum(1, keepdim=True)
        if cfg.n_iter == 0:
            return _keep_padded(out, probs, pv, cmask, all_ch)
    else:
        out = torch.empty_like(p)

    img = images.to(dev, work)
    if cfg.backend == "permutohedral":
        _permutohedral(img, unary, pv, cv, cfg, out)
        return _keep_padded(out, probs, pv, cmask, all_ch)
    items = [_Grid(i, box, img[i, :, box[0]:box[1], box[2]:box[3]], unary[i, :, box[0]:box[1], box[2]:box[3]], valid, cfg)
             for i, box, valid in _crop_boxes(pv, b, h, w)]
    for chunk in _chunks(items, lambda g: g.pairs, MAX_PAIRS):
        _mean_field(chunk, cv, cfg, out)
    return _keep_padded(out, probs, pv, cmask, all_ch)


def _crop_boxes(pv, b: int, h: int, w: int):
    """Per image with a valid pixel: (index, (y0, y1, x0, x1) box of its valid pixels, valid mask in
    the box or None when all of it is valid). Images without a valid pixel keep their input."""
    for i in range(b):
        box = (0, h, 0, w)
        if pv is not None:
            rows, cols = pv[i].any(1), pv[i].any(0)
            if not bool(rows.any()):
                continue
            r, c = torch.nonzero(rows).flatten(), torch.nonzero(cols).flatten()
            box = (int(r[0]), int(r[-1]) + 1, int(c[0]), int(c[-1]) + 1)
        y0, y1, x0, x1 = box
        valid = None if pv is None else pv[i, y0:y1, x0:x1]
        if valid is not None and bool(valid.all()):
            valid = None
        yield i, box, valid


def _chunks(items: list, size, limit: int):
    """Consecutive groups of items whose sizes add up to at most `limit` (an item alone may exceed it)."""
    chunk: list = []
    for item in items:
        if chunk and sum(size(g) for g in chunk) + size(item) > limit:
            yield chunk
            chunk = []
        chunk.append(item)
    if chunk:
        yield chunk


def _keep_padded(out, probs, pv, cmask, all_ch) -> torch.Tensor:
    """Padded pixels get their input back (padded channels zeroed); cast to probs' dtype."""
    if pv is not None:
        keep = probs.to(out.dtype)
        keep = keep if all_ch else keep.masked_fill(~cmask, 0.0)
        out = torch.where(pv[:, None], out, keep)
    return out.to(probs.dtype)


class _Grid:
    """One image on its reduced grid: pooled unary (L, n), cell features, Gaussian stencil."""

    def __init__(self, index, box, img, unary, valid, cfg: CRFConfig):
        self.index, self.box, self.unary_full, self.valid_full = index, box, unary, valid
        h, w = unary.shape[1:]
        dt, dev = unary.dtype, unary.device
        vf = torch.ones(1, h, w, dtype=dt, device=dev) if valid is None else valid[None].to(dt)
        side = max(h, w) if cfg.max_side == 0 else min(cfg.max_side, max(h, w))
        while True:
            scale = side / max(h, w)
            lh, lw = max(1, round(h * scale)), max(1, round(w * scale))
            vl = F.adaptive_avg_pool2d(vf[None], (lh, lw))[0]
            den = vl.clamp_min(1e-12)
            col = F.adaptive_avg_pool2d((img * vf)[None], (lh, lw))[0] / den
            cells = torch.nonzero(vl.flatten() > 0).flatten()
            feats = self._features(col, cells, h, w, lh, lw, cfg)
            proj = feats[:, 2:] @ _principal_axis(feats[:, 2:])
            proj, order = torch.sort(proj)
            lo = torch.searchsorted(proj, proj - _CUT)
            hi = torch.searchsorted(proj, proj + _CUT, right=True)
            pairs = int((hi - lo).sum())
            if pairs <= MAX_PAIRS or side <= 8:
                break
            side = max(8, int(side * math.sqrt(MAX_PAIRS / pairs) * 0.95))
        self.shape, self.n = (lh, lw), lh * lw
        self.vmask = vl > 0  # (1, lh, lw)
        if (lh, lw) == (h, w):
            self.unary = unary.reshape(-1, self.n)
        else:
            self.unary = (F.adaptive_avg_pool2d((unary * vf)[None], (lh, lw))[0] / den).reshape(-1, self.n)
        self.cells = cells[order]  # valid cells, sorted along the colour axis
        self.feats, self.proj, self.pairs = feats[order], proj, pairs
        self.g_taps = _gauss_taps(cfg.gauss_sxy, h / lh, w / lw, dt, dev)
        # bilateral weight of a cell with itself, in units of (pixels a) x (pixels b): all its
        # pixel pairs, self pairs included as pydensecrf does (its pixels share the cell's colour)
        self.self_weight = 1.0

    @staticmethod
    def _features(col, cells, h, w, lh, lw, cfg):
        dt, dev = col.dtype, col.device
        yy = (torch.arange(lh, device=dev, dtype=dt) + 0.5) * (h / lh)
        xx = (torch.arange(lw, device=dev, dtype=dt) + 0.5) * (w / lw)
        pos = torch.stack(torch.meshgrid(yy, xx, indexing="ij")).reshape(2, -1) / cfg.bilateral_sxy
        f = torch.cat([pos, col.reshape(3, -1) / cfg.bilateral_srgb])[:, cells].T
        return (f - f.mean(0, keepdim=True)).contiguous()


_CUT = math.sqrt(-2.0 * math.log(KEEP))  # a colour projection gap beyond this gives k < KEEP


def _principal_axis(c: torch.Tensor) -> torch.Tensor:
    """Unit vector of the largest variance of the rows of c (n, 3); deterministic sign."""
    if c.shape[0] < 2:
        return c.new_tensor([1.0, 0.0, 0.0])
    cov = (c.T @ c).double()
    v = torch.linalg.eigh(cov.cpu())[1][:, -1].to(c)
    return v * torch.sign(v.sum() + 1e-12)


def _bilateral(grids: list[_Grid], compat: float):
    """Block-diagonal, normalised, compat-scaled bilateral kernel of the chunk (sorted-cell space).

    Returns (csr (M, M) without the diagonal, diag (M,) weight of each cell with itself).
    """
    rows, cols, vals, selfw, offs = [], [], [], [], 0
    log_keep = math.log(KEEP)
    for g in grids:
        f, n = g.feats, g.feats.shape[0]
        a = -0.5 * (f * f).sum(1, keepdim=True)
        one = torch.ones_like(a)
        fr = torch.cat([f, a, one], 1)  # fr_i . fc_j = -|f_i - f_j|^2 / 2
        fc = torch.cat([f, one, a], 1)
        lo = torch.searchsorted(g.proj, g.proj - _CUT)
        hi = torch.searchsorted(g.proj, g.proj + _CUT, right=True)
        step = max(1, min(BLOCK_ROWS, BLOCK_ELEMS // max(1, n)))
        starts = list(range(0, n, step))
        bounds = torch.stack([lo[starts], hi[[min(n, s + step) - 1 for s in starts]]], 1).tolist()
        for s, (c0, c1) in zip(starts, bounds):
            e = min(n, s + step)
            logk = fr[s:e] @ fc[c0:c1].T
            if c0 <= s and e <= c1:  # the diagonal lies inside the window: drop it
                logk.diagonal(s - c0).fill_(float("-inf"))
            keep = logk > log_keep
            r, c = torch.nonzero(keep, as_tuple=True)
            rows.append(r + (s + offs))
            cols.append(c + (c0 + offs))
            vals.append(logk.masked_select(keep))
        selfw.append(g.feats.new_full((n,), g.self_weight))
        offs += n
    r, c = torch.cat(rows), torch.cat(cols)
    v = torch.cat(vals).exp_()
    selfw = torch.cat(selfw)
    d = torch.zeros(offs, dtype=v.dtype, device=v.device).index_add_(0, r, v) + selfw
    norm = torch.rsqrt(d + 1e-20)
    v = v * norm[r] * norm[c] * compat
    crow = torch.zeros(offs + 1, dtype=torch.int64, device=v.device)
    crow[1:] = torch.cumsum(torch.bincount(r, minlength=offs), 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        csr = torch.sparse_csr_tensor(crow.to(torch.int32), c.to(torch.int32), v, size=(offs, offs),
                                      check_invariants=False)
    return csr, selfw * norm * norm * compat


def _gauss_taps(sxy: float, step_y: float, step_x: float, dt, device):
    """1-D cell-to-cell Gaussian weights: sums over the pixel pairs of two cells of `step` pixels.

    Returns ((taps_y, step_y), (taps_x, step_x)): taps over cell offsets -r..r, and the cell size.
    """
    out = []
    for step in (step_y, step_x):
        s = max(1, round(step))
        # cell offsets whose closest pixel pair is within 4 sxy (farther ones weigh < exp(-8))
        r = max(1, math.floor((4 * sxy - 1) / s) + 1)
        p = torch.arange(s, dtype=torch.float64)
        taps = []
        for k in range(-r, r + 1):
            dd = (p[:, None] - p[None, :] + k * s) ** 2
            taps.append(torch.exp(-dd / (2 * sxy**2)).sum())
        out.append((torch.stack(taps).to(device, dt), float(s)))
    return out


def _gauss(x: torch.Tensor, taps) -> torch.Tensor:
    """Cell-level Gaussian filter, pixel self pairs included (as pydensecrf): (C, h, w) -> (C, h, w)."""
    (ty, _), (tx, _) = taps
    # separable, as shifted multiply-adds: a few taps on one channel, where conv2d is slow on CPU
    return _filter1d(_filter1d(x, ty.tolist(), 1), tx.tolist(), 2)


def _gauss_rows(x: torch.Tensor, taps) -> torch.Tensor:
    """_gauss on an (h, w, C) tensor (channels last): filters dims 0 and 1."""
    (ty, _), (tx, _) = taps
    return _filter1d(_filter1d(x, ty.tolist(), 0), tx.tolist(), 1)


def _filter1d(x: torch.Tensor, taps: list[float], dim: int) -> torch.Tensor:
    """Zero-padded 1-D correlation of x along dim with symmetric taps (centre in the middle)."""
    r, n = len(taps) // 2, x.shape[dim]
    y = x * taps[r]
    for k in range(1, min(r, n - 1) + 1):
        y.narrow(dim, 0, n - k).add_(x.narrow(dim, k, n - k), alpha=taps[r + k])
        y.narrow(dim, k, n - k).add_(x.narrow(dim, 0, n - k), alpha=taps[r - k])
    return y


def _mean_field(grids: list[_Grid], cv: torch.Tensor, cfg: CRFConfig, out: torch.Tensor) -> None:
    """Run the mean field for a chunk of images and write the results into out (B, L, H, W)."""
    n_lab = out.shape[1]
    dt = grids[0].unary.dtype
    csr, diag = _bilateral(grids, cfg.bilateral_compat)
    offs = [0]
    for g in grids:
        offs.append(offs[-1] + g.n)
    # flat layout (sum n, L): each image's grid cells in raster order; sorted cells for the kernel
    gather = torch.cat([g.cells + o for g, o in zip(grids, offs)])
    unary = torch.cat([g.unary.T for g in grids])
    cmask = torch.cat([cv[g.index].expand(g.n, n_lab) for g in grids])
    vmask = torch.cat([g.vmask.reshape(-1, 1) for g in grids]).to(dt)
    neg = torch.full_like(unary, float("-inf"))
    logits0 = torch.where(cmask, -unary, neg)
    gnorm = torch.cat([(torch.rsqrt(_gauss(g.vmask.to(dt), g.g_taps).clamp_min(0) + 1e-20) * g.vmask).reshape(-1, 1)
                       for g in grids])
    gw = gnorm * cfg.gauss_compat
    diag = diag[:, None]
    q = torch.softmax(logits0, 1)
    pair = torch.zeros_like(q)
    for _ in range(cfg.n_iter):
        qs = q[gather]  # (M, L), sorted cells
        pair = torch.zeros_like(q)
        pair[gather] = torch.addcmul(csr @ qs, diag, qs)
        qg = q * gnorm
        for g, o in zip(grids, offs):
            blk = _gauss(qg[o:o + g.n].T.reshape(n_lab, *g.shape), g.g_taps).reshape(n_lab, -1).T
            pair[o:o + g.n].addcmul_(blk, gw[o:o + g.n])
        q = torch.softmax(logits0 + pair, 1)
    _finish(grids, offs, pair * vmask, cv, out)


def _finish(grids, offs, pair: torch.Tensor, cv: torch.Tensor, out: torch.Tensor) -> None:
    """Last step at full resolution: full unary + upsampled pairwise term (masked bilinear)."""
    n_lab, dt = out.shape[1], pair.dtype
    for g, o in zip(grids, offs):
        y0, y1, x0, x1 = g.box
        h, w = y1 - y0, x1 - x0
        p = pair[o:o + g.n].T.reshape(1, n_lab, *g.shape)
        if g.shape != (h, w):
            p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
            if not bool(g.vmask.all()):
                vm = g.vmask[None].to(dt)
                p = p / F.interpolate(vm, size=(h, w), mode="bilinear", align_corners=False).clamp_min(1e-12)
        logits = p[0].sub_(g.unary_full)
        if not bool(cv[g.index].all()):
            logits = logits.masked_fill(~cv[g.index, :, None, None], float("-inf"))
        res = torch.softmax(logits, 0)
        if g.valid_full is None:
            out[g.index, :, y0:y1, x0:x1] = res
        else:
            region = out[g.index, :, y0:y1, x0:x1]
            out[g.index, :, y0:y1, x0:x1] = torch.where(g.valid_full[None], res, region)


# ---------------------------------------------------------------------------------------------
# permutohedral backend

MAX_CELLS = 2**21  # cells of the images filtered by one lattice (a chunk of the batch): bounds memory


class _Cells:
    """One image on its CRF grid (full resolution or reduced): pooled unary, colours, valid cells."""

    def __init__(self, index, box, img, unary, valid, cfg: CRFConfig):
        self.index, self.box, self.unary_full, self.valid_full = index, box, unary, valid
        h, w = unary.shape[1:]
        dt, dev = unary.dtype, unary.device
        side = max(h, w) if cfg.max_side == 0 else min(cfg.max_side, max(h, w))
        scale = side / max(h, w)
        lh, lw = max(1, round(h * scale)), max(1, round(w * scale))
        if (lh, lw) == (h, w):
            vl = torch.ones(1, h, w, dtype=dt, device=dev) if valid is None else valid[None].to(dt)
            col, self.unary = img, unary.reshape(-1, h * w)
        else:
            vf = torch.ones(1, h, w, dtype=dt, device=dev) if valid is None else valid[None].to(dt)
            vl = F.adaptive_avg_pool2d(vf[None], (lh, lw))[0]
            den = vl.clamp_min(1e-12)
            col = F.adaptive_avg_pool2d((img * vf)[None], (lh, lw))[0] / den
            self.unary = (F.adaptive_avg_pool2d((unary * vf)[None], (lh, lw))[0] / den).reshape(-1, lh * lw)
        self.shape, self.n = (lh, lw), lh * lw
        self.vmask = vl > 0
        self.cells = torch.nonzero(self.vmask.flatten()).flatten()
        # bilateral features of the cell centres in pixel units (x, y, r, g, b) / (sxy, sxy, srgb x 3):
        # on a reduced grid the spatial parameters thus scale with the resolution
        yy = (torch.arange(lh, device=dev, dtype=dt) + 0.5) * (h / lh)
        xx = (torch.arange(lw, device=dev, dtype=dt) + 0.5) * (w / lw)
        pos = torch.stack(torch.meshgrid(xx, yy, indexing="xy")).reshape(2, -1) / cfg.bilateral_sxy
        self.feats = torch.cat([pos, col.reshape(3, -1) / cfg.bilateral_srgb])[:, self.cells].T.contiguous()
        self.g_taps = _gauss_taps(cfg.gauss_sxy, h / lh, w / lw, dt, dev)


def _permutohedral(img, unary, pv, cv, cfg: CRFConfig, out: torch.Tensor) -> None:
    b, _, h, w = unary.shape
    items = [_Cells(i, box, img[i, :, box[0]:box[1], box[2]:box[3]], unary[i, :, box[0]:box[1], box[2]:box[3]], valid, cfg)
             for i, box, valid in _crop_boxes(pv, b, h, w)]
    for chunk in _chunks(items, lambda g: g.n, MAX_CELLS):
        _lattice_mean_field(chunk, cv, cfg, out)


def _lattice_mean_field(grids: list[_Cells], cv: torch.Tensor, cfg: CRFConfig, out: torch.Tensor) -> None:
    """Mean field of a chunk of images: bilateral term on one lattice, Gaussian term exact."""
    n_lab = out.shape[1]
    dt, dev = grids[0].unary.dtype, grids[0].unary.device
    offs = [0]
    for g in grids:
        offs.append(offs[-1] + g.n)
    total = offs[-1]
    # flat layout (sum n, L): each image's grid cells in raster order
    if len(grids) == 1:  # one image: no group ids; every cell a point, the layout is the points'
        pts = None if grids[0].cells.numel() == total else grids[0].cells
        lat = Lattice(grids[0].feats)
    else:
        pts = torch.cat([g.cells + o for g, o in zip(grids, offs)])
        group = torch.cat([torch.full((g.cells.numel(),), k, dtype=torch.int64, device=dev) for k, g in enumerate(grids)])
        lat = Lattice(torch.cat([g.feats for g in grids]), group)
    # symmetric normalisation (pydensecrf's NORMALIZE_SYMMETRIC): k'_ij = k_ij / sqrt(d_i d_j)
    deg = LatticeFilter(lat)(torch.ones(lat.n, 1, dtype=dt, device=dev))
    norm = torch.rsqrt(deg[:, 0].clamp_min(0) + 1e-20)
    bil = LatticeFilter(lat, norm, cfg.bilateral_compat, index=pts, size=total, columns=n_lab)
    del deg, norm, lat

    unary = torch.cat([g.unary.T for g in grids])
    cmask = torch.cat([cv[g.index].expand(g.n, n_lab) for g in grids])
    vmask = torch.cat([g.vmask.reshape(-1, 1) for g in grids]).to(dt)
    logits0 = torch.where(cmask, -unary, torch.full_like(unary, float("-inf")))
    del unary
    gnorm = torch.cat([(torch.rsqrt(_gauss(g.vmask.to(dt), g.g_taps).clamp_min(0) + 1e-20) * g.vmask).reshape(-1, 1)
                       for g in grids])
    gw = gnorm * cfg.gauss_compat
    q = torch.softmax(logits0, 1)
    qg = torch.empty_like(q)
    pair = q
    for _ in range(cfg.n_iter):
        pair = bil(q)
        torch.mul(q, gnorm, out=qg)
        for g, o in zip(grids, offs):
            # Gaussian term on the (h, w, L) view of the rows: no transposes
            blk = _gauss_rows(qg[o:o + g.n].view(*g.shape, n_lab), g.g_taps).view(g.n, n_lab)
            pair[o:o + g.n].addcmul_(blk, gw[o:o + g.n])
        # q = softmax(logits0 + pair), in place
        torch.add(logits0, pair, out=q)
        q.sub_(q.amax(1, keepdim=True)).exp_()
        q.div_(q.sum(1, keepdim=True))
    if cfg.n_iter == 0:
        pair = torch.zeros_like(q)
    _finish(grids, offs, pair.mul_(vmask), cv, out)


def crf_function(cfg: CRFConfig) -> Callable:
    """`dense_crf` bound to a config: crf(images, probs, channel_valid=..., pixel_valid=...)."""
    return functools.partial(dense_crf, cfg=cfg)
