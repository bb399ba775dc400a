"""Permutohedral lattice (Adams, Baek & Davis 2010): fast Gaussian filtering in d dimensions.

A Gaussian filter over n points with d-dimensional features f (already divided by their
standard deviations) is approximated by three linear maps, each O(n d) or O(m d) in the
number m <= n (d + 1) of occupied lattice vertices, whatever the features are:

  splat  each point lies in one simplex of the lattice A*_d; it spreads its value over the
         d + 1 vertices of that simplex with its barycentric weights;
  blur   along each of the d + 1 lattice directions, every vertex becomes
         v + (v_prev + v_next) / 2 (missing neighbours count 0);
  slice  each point reads back the same d + 1 vertices with the same weights.

This is the variant Krähenbühl & Koltun ship with densecrf (and pydensecrf): the same
elevation, rounding, blur and the final scale 1 / (1 + 2^-d), so a CRF built on it matches
pydensecrf up to float rounding. The filter includes each point's contribution to itself.

Everything is vectorised: lattice vertices are found by encoding the integer keys (plus a
group id, one per image of a batch, so images never share a vertex) as one int64 in mixed
radix, `torch.unique` gives the vertex ids, and the neighbour of a vertex along a direction is
found by `torch.searchsorted` on its shifted code. Splat and slice are sparse CSR matrices.
See docs/crf.md.
"""

from __future__ import annotations

import math
import warnings

import torch

__all__ = ["Lattice"]

_CODE_LIMIT = 2**62  # largest mixed-radix code (int64 with room for the neighbour shifts)


class Lattice:
    """The lattice of n points with features (n, d); filter(values (n, C)) -> (n, C).

    `group` (n,) int64 keeps points of different groups (images) apart. `weights` (n,) scales
    each point's splat and slice (the CRF folds its symmetric normalisation in there).
    """

    def __init__(self, feats: torch.Tensor, group: torch.Tensor | None = None):
        n, d = feats.shape
        self.n, self.d = n, d
        dev = feats.device
        # elevation onto the hyperplane sum = 0 of R^(d+1), scaled so that the blur below has
        # the standard deviation 1 in feature units (densecrf's inv_std_dev)
        f = feats.to(torch.float64)
        inv_std = math.sqrt(2.0 / 3.0) * (d + 1)
        scale = torch.tensor([inv_std / math.sqrt((i + 2) * (i + 1)) for i in range(d)], dtype=torch.float64, device=dev)
        cf = f * scale
        suffix = torch.zeros(n, d + 1, dtype=torch.float64, device=dev)
        suffix[:, :d] = cf.flip(1).cumsum(1).flip(1)  # suffix[j] = sum_{k >= j} cf[k]
        elev = suffix.clone()
        elev[:, 1:] -= torch.arange(1, d + 1, dtype=torch.float64, device=dev) * cf
        # nearest point of the 0-coloured sub-lattice (multiples of d + 1), densecrf's rounding
        v = elev / (d + 1)
        up, down = torch.ceil(v) * (d + 1), torch.floor(v) * (d + 1)
        rem0 = torch.where(up - elev < elev - down, up, down)
        total = (rem0.sum(1) / (d + 1)).round().long()
        # rank of each coordinate of elev - rem0 in decreasing order, ties to the lower index
        diff = elev - rem0
        greater = diff[:, None, :] > diff[:, :, None]  # [i, j]: diff_j > diff_i
        ties = (diff[:, None, :] == diff[:, :, None]) & torch.ones(d + 1, d + 1, dtype=torch.bool, device=dev).tril(-1)
        rank = (greater | ties).sum(2) + total[:, None]
        low, high = rank < 0, rank > d
        rank = rank + (d + 1) * low.long() - (d + 1) * high.long()
        rem0 = rem0 + (d + 1) * low.double() - (d + 1) * high.double()
        # barycentric coordinates of the point in its simplex
        bary = torch.zeros(n, d + 2, dtype=torch.float64, device=dev)
        w = (elev - rem0) / (d + 1)
        bary.scatter_add_(1, d - rank, w)
        bary.scatter_add_(1, d - rank + 1, -w)
        bary[:, 0] += 1.0 + bary[:, d + 1]
        self.bary = bary[:, : d + 1].to(feats.dtype)  # (n, d + 1)
        # the d + 1 vertices: key_r = rem0 + r, minus d + 1 where rank > d - r (first d coords)
        r = torch.arange(d + 1, device=dev)
        rem0_i = rem0[:, :d].round().long()
        keys = rem0_i[:, None, :] + r[None, :, None] - (d + 1) * (rank[:, None, :d] > d - r[None, :, None]).long()
        self.vertex, nbr = _index(keys.reshape(-1, d), None if group is None else group.repeat_interleave(d + 1), d)
        self.m = int(nbr.shape[1])
        self.vertex = self.vertex.reshape(n, d + 1)
        self.nbr = nbr  # (2 (d + 1), m) neighbour ids, m where absent (a zero row)
        self.alpha = 1.0 / (1.0 + 2.0 ** (-d))

    def operators(self, weights: torch.Tensor | None = None, out_scale: float = 1.0,
                  index: torch.Tensor | None = None, size: int | None = None):
        """Splat (m, size) and slice (size, m) CSR matrices, per-point weights folded into both.

        `index` (n,) places point i at row/column index[i] of a larger layout of `size` rows
        (rows of other entries stay empty): the CRF filters its flat (cells, labels) array
        directly, cells without a point get 0.
        """
        n, d = self.n, self.d
        b = self.bary if weights is None else self.bary * weights[:, None].to(self.bary.dtype)
        pts = torch.arange(n, device=b.device) if index is None else index
        size = n if size is None else size
        cols = pts.repeat_interleave(d + 1)
        rows = self.vertex.reshape(-1)
        vals = b.reshape(-1)
        if getattr(self, "_splat_order", None) is None:  # the same rows at every call: sorted once
            self._splat_order = torch.argsort(rows, stable=True)
        splat = _csr(rows, cols, vals, (self.m, size), order=self._splat_order)
        # the slice's rows are the points, ascending whenever `index` is (the CRF's raster order)
        ascending = index is None or bool((pts[1:] >= pts[:-1]).all())
        slice_ = _csr(cols, rows, vals * (self.alpha * out_scale), (size, self.m), order=None if not ascending else False)
        return splat, slice_

    def blur(self, v: torch.Tensor, tmp: torch.Tensor, tmp2: torch.Tensor) -> torch.Tensor:
        """Blur (m + 1, C) vertex values in place along the d + 1 directions (row m stays 0).

        tmp, tmp2: (m, C) scratch buffers (reused across calls: no fresh memory per pass).
        """
        m = self.m
        for j in range(self.d + 1):
            torch.index_select(v, 0, self.nbr[2 * j], out=tmp)
            torch.index_select(v, 0, self.nbr[2 * j + 1], out=tmp2)
            tmp.add_(tmp2)
            v[:m].add_(tmp, alpha=0.5)
        return v

    def filter(self, values: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """One splat / blur / slice of values (n, C) -> (n, C) (for tests and one-off use)."""
        splat, slice_ = self.operators(weights)
        v = values.new_zeros(self.m + 1, values.shape[1])
        torch.mm(splat, values, out=v[: self.m])
        self.blur(v, values.new_empty(self.m, values.shape[1]), values.new_empty(self.m, values.shape[1]))
        return slice_ @ v[: self.m]


def _csr(rows, cols, vals, size, order=None):
    """CSR matrix from COO triplets (duplicates kept; matmul sums them).

    order: the stable argsort of `rows` when already known; False when rows are already sorted.
    """
    if order is False:
        r, c, v = rows, cols, vals
    else:
        order = torch.argsort(rows, stable=True) if order is None else order
        r, c, v = rows[order], cols[order], vals[order]
    crow = torch.zeros(size[0] + 1, dtype=torch.int64, device=vals.device)
    crow[1:] = torch.cumsum(torch.bincount(r, minlength=size[0]), 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, c, v, size=size, check_invariants=False)


def _index(keys: torch.Tensor, group: torch.Tensor | None, d: int):
    """Vertex id of each key row (p, d) and the neighbour table (2 (d + 1), m) of the vertices."""
    lo = keys.amin(0) - (d + 1)
    span = keys.amax(0) - lo + (d + 2)  # room for the neighbour shifts of -1 .. + d
    radix = [int(s) for s in span.tolist()]
    n_groups = 1 if group is None else int(group.max()) + 1
    if math.prod(radix) * n_groups < _CODE_LIMIT:
        mult = [1] * d
        for k in range(d - 2, -1, -1):
            mult[k] = mult[k + 1] * radix[k + 1]
        mult_t = torch.tensor(mult, dtype=torch.int64, device=keys.device)
        code = ((keys - lo) * mult_t).sum(1)
        if group is not None:
            code = code + group * (mult[0] * radix[0])
        uniq, inv = torch.unique(code, sorted=True, return_inverse=True)
        m = uniq.numel()
        nbr = []
        down = int(sum(mult))
        for j in range(d + 1):
            # neighbour 1: key - 1 everywhere, + d on coordinate j (j = d: only the -1 shift)
            shift = -down + (d + 1) * (mult[j] if j < d else 0)
            for s in (shift, -shift):
                c = uniq + s
                pos = torch.searchsorted(uniq, c).clamp_max(m - 1)
                nbr.append(torch.where(uniq[pos] == c, pos, torch.full_like(pos, m)))
        return inv, torch.stack(nbr)
    return _index_rows(keys, group, d)


def _index_rows(keys, group, d):
    """Same as _index for keys whose codes would not fit int64: unique over rows (slower)."""
    if group is not None:
        keys = torch.cat([group[:, None], keys], 1)
    p, width = keys.shape
    uniq, inv = torch.unique(keys, dim=0, return_inverse=True)
    m = uniq.shape[0]
    cands = []
    for j in range(d + 1):
        for sign in (1, -1):
            shift = torch.full((width,), -sign, dtype=keys.dtype, device=keys.device)
            if group is not None:
                shift[0] = 0
            if j < d:
                shift[j + (width - d)] += sign * (d + 1)
            cands.append(uniq + shift)
    allk = torch.cat([uniq] + cands)
    u2, inv2 = torch.unique(allk, dim=0, return_inverse=True)
    vid = torch.full((u2.shape[0],), m, dtype=torch.int64, device=keys.device)
    vid[inv2[:m]] = torch.arange(m, device=keys.device)
    nbr = vid[inv2[m:]].reshape(2 * (d + 1), m)
    return inv, nbr
