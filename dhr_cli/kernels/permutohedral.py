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

Everything is vectorised: lattice keys (plus a group id, one per image of a batch, so images
never share a vertex) are encoded as one int64 in mixed radix; one stable sort of the
n (d + 1) corner codes numbers the vertices and groups the corners by vertex, and the
neighbour of a vertex along a direction is found by `torch.searchsorted` on its shifted code
(the opposite neighbour by inverting that table). The structure is built once per image and
reused by every filtering (`LatticeFilter`): splat, blur and slice are fixed gather-sums
(`F.embedding_bag`), so a filtering allocates only its outputs.
See docs/crf.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["Lattice", "LatticeFilter"]

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
        # the standard deviation 1 in feature units (densecrf's inv_std_dev): one (d, d + 1)
        # matrix, elev_j = sum_{k >= j} c_k f_k - j c_{j-1} f_{j-1}
        inv_std = math.sqrt(2.0 / 3.0) * (d + 1)
        emb = torch.zeros(d, d + 1, dtype=torch.float64)
        for k in range(d):
            c = inv_std / math.sqrt((k + 2) * (k + 1))
            emb[k, : k + 1] = c
            emb[k, k + 1] = -(k + 1) * c
        elev = feats.to(torch.float64) @ emb.to(dev)
        # nearest point of the 0-coloured sub-lattice (multiples of d + 1), densecrf's rounding
        # (to the nearer multiple, ties down), in units of d + 1
        r0 = torch.div(elev, d + 1).sub_(0.5).ceil_()
        total = r0.sum(1).round().long()
        diff = elev.add_(r0, alpha=-(d + 1))  # elev - rem0 (elev is not needed any more)
        # rank of each coordinate of elev - rem0 in decreasing order, ties to the lower index
        # (a stable descending sort of the d + 1 coordinates)
        idx = torch.sort(diff, stable=True, dim=1, descending=True)[1]
        rank = torch.empty_like(idx).scatter_(1, idx, torch.arange(d + 1, device=dev).expand(n, d + 1))
        rank += total[:, None]
        adj = (rank < 0).long() - (rank > d).long()
        rank += (d + 1) * adj
        rem0 = r0.long().add_(adj).mul_(d + 1)
        # barycentric coordinates of the point in its simplex
        bary = torch.zeros(n, d + 2, dtype=torch.float64, device=dev)
        w = diff.div_(d + 1).sub_(adj)  # (elev - rem0) / (d + 1) with the wrapped rem0
        bary.scatter_add_(1, d - rank, w)
        bary.scatter_add_(1, d - rank + 1, w.neg_())
        bary[:, 0] += 1.0 + bary[:, d + 1]
        self.bary = bary[:, : d + 1].to(feats.dtype).contiguous()  # (n, d + 1)
        self.vertex, self.order, self.counts, self.nbr = _index(rem0[:, :d], rank[:, :d], group, d)
        self.m = int(self.counts.numel())
        self.alpha = 1.0 / (1.0 + 2.0 ** (-d))

    def splat_bags(self):
        """(point of each entry, its barycentric weight, bag offsets) of the splat, entries grouped by vertex."""
        if getattr(self, "_splat", None) is None:
            d = self.d
            self._splat = (self.order // (d + 1), self.bary.reshape(-1)[self.order],
                           _exclusive_cumsum(torch.cat([self.counts, self.counts.new_zeros(1)])))
        return self._splat

    def blur_bags(self):
        """Per direction j: (indices, offsets) of the bags [v, v, prev_j(v), next_j(v)] (absent left out)."""
        if getattr(self, "_blur", None) is None:
            m = self.m
            ids = torch.arange(m, device=self.nbr.device)
            self._blur = []
            for j in range(self.d + 1):
                cand = torch.stack([ids, ids, self.nbr[2 * j], self.nbr[2 * j + 1]], 1)
                keep = cand < m
                self._blur.append((cand[keep], _exclusive_cumsum(keep.sum(1))))
        return self._blur

    def filter(self, values: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """One splat / blur / slice of values (n, C) -> (n, C) (for tests and one-off use)."""
        return LatticeFilter(self, weights, columns=values.shape[1])(values)


class LatticeFilter:
    """Splat, blur and slice of one lattice as fixed gather-sums, built once, applied many times.

    Each stage is `F.embedding_bag(mode="sum")`: every output row sums a fixed list ("bag") of
    input rows, weighted (splat, slice: barycentric weights times the per-point `weights`) or
    not (blur). Splat: one bag per vertex, its points; slice: one bag per output row, the d + 1
    vertices of its point (empty for rows without a point); blur along direction j: the bag
    [v, v, prev_j(v), next_j(v)] (absent neighbours left out), i.e. twice densecrf's
    v + (prev + next) / 2, the 2^(d+1) of the d + 1 directions folded into the slice weights.
    For narrow values (`columns` < FUSED_MIN_COLUMNS) the blur is instead two row gathers and
    two in-place adds per direction, faster there. `index` (n,) places point i at row index[i]
    of an output of `size` rows (the CRF's flat (cells, labels) layout).
    """

    def __init__(self, lat: Lattice, weights: torch.Tensor | None = None, out_scale: float = 1.0,
                 index: torch.Tensor | None = None, size: int | None = None, columns: int = 1):
        n, d, m = lat.n, lat.d, lat.m
        dev = lat.bary.device
        wt = None if weights is None else weights.to(lat.bary.dtype)
        b = lat.bary if wt is None else lat.bary * wt[:, None]
        pts = torch.arange(n, device=dev) if index is None else index
        self.size = n if size is None else size
        self.m, self.d, self.nbr = m, d, lat.nbr
        # splat: bag of vertex k = its (point, corner) entries; a last empty bag gives the zero
        # row m that absent neighbours read in the gather blur (index arrays shared by the
        # filters of one lattice)
        sp_pt, sp_bary, self.splat_off = lat.splat_bags()
        self.splat_idx = sp_pt if index is None else pts[sp_pt]
        self.splat_w = sp_bary if wt is None else sp_bary * wt[sp_pt]
        self.fused = columns >= FUSED_MIN_COLUMNS
        scale = lat.alpha * out_scale
        if self.fused:
            self.blur_bags = lat.blur_bags()
            scale *= 2.0 ** (-(d + 1))
        # slice: rows in ascending layout order; a row without a point gets an empty bag
        if index is not None and not bool((pts[1:] > pts[:-1]).all()):
            perm = torch.argsort(pts)
            pts, b = pts[perm], b[perm]
            self.slice_idx = lat.vertex[perm].reshape(-1)
        else:
            self.slice_idx = lat.vertex.reshape(-1)
        self.slice_w = b.reshape(-1) * scale
        per_row = torch.zeros(self.size, dtype=torch.int64, device=dev)
        per_row[pts] = d + 1
        self.slice_off = _exclusive_cumsum(per_row)
        self._tmp: tuple | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(size or n, C) values at the points' rows -> (size, C) filtered values."""
        dt = x.dtype
        v = F.embedding_bag(self.splat_idx, x, self.splat_off, mode="sum", per_sample_weights=self.splat_w.to(dt))
        if self.fused:
            for idx, off in self.blur_bags:
                v = F.embedding_bag(idx, v, off, mode="sum")
        else:
            v = self._gather_blur(v)
        return F.embedding_bag(self.slice_idx, v, self.slice_off, mode="sum", per_sample_weights=self.slice_w.to(dt))

    def _gather_blur(self, v: torch.Tensor) -> torch.Tensor:
        """densecrf's blur of (m + 1, C) vertex values in place (row m stays 0), scratch reused."""
        m, c = self.m, v.shape[1]
        if self._tmp is None or self._tmp[0].shape != (m, c) or self._tmp[0].dtype != v.dtype:
            self._tmp = (v.new_empty(m, c), v.new_empty(m, c))
        tmp, tmp2 = self._tmp
        for j in range(self.d + 1):
            torch.index_select(v, 0, self.nbr[2 * j], out=tmp)
            torch.index_select(v, 0, self.nbr[2 * j + 1], out=tmp2)
            tmp.add_(tmp2)
            v[:m].add_(tmp, alpha=0.5)
        return v


FUSED_MIN_COLUMNS = 8  # from this many value columns on, the embedding_bag blur is the faster one


def _exclusive_cumsum(c: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(c)
    if c.numel() > 1:
        out[1:] = torch.cumsum(c[:-1], 0)
    return out


def _index(rem0: torch.Tensor, rank: torch.Tensor, group: torch.Tensor | None, d: int):
    """Number the vertices of the points' simplices and find their blur neighbours.

    rem0 (n, d), rank (n, d): the first d coordinates of each point's remainder-0 vertex and
    their ranks. Corner r of the simplex is key_r = rem0 + r - (d + 1) [rank > d - r].
    Returns vertex (n, d + 1) ids, order (the n (d + 1) (point, corner) entries grouped by
    vertex, ids ascending), counts (m,) entries per vertex, nbr (2 (d + 1), m) neighbour ids
    along each direction, m where absent.
    """
    n, dev = rem0.shape[0], rem0.device
    r = torch.arange(d + 1, device=dev)
    # digit ranges with room for the corners (-d - 1 .. + d) and the neighbour shifts (+- d)
    lo = rem0.amin(0) - 2 * (d + 1)
    span = rem0.amax(0) - lo + 2 * (d + 1) + 1
    radix = [int(s) for s in span.tolist()] if n else [1] * d
    n_groups = 1 if group is None else int(group.max()) + 1
    if math.prod(radix) * n_groups >= _CODE_LIMIT:
        keys = rem0[:, None, :] + r[None, :, None] - (d + 1) * (rank[:, None, :] > d - r[None, :, None]).long()
        grp = None if group is None else group.repeat_interleave(d + 1)
        inv, order, counts, nbr = _index_rows(keys.reshape(-1, d), grp, d)
        return inv.reshape(n, d + 1), order, counts, nbr
    mult = [1] * d
    for k in range(d - 2, -1, -1):
        mult[k] = mult[k + 1] * radix[k + 1]
    mult_t = torch.tensor(mult, dtype=torch.int64, device=dev)
    down = int(sum(mult))
    code0 = ((rem0 - lo) * mult_t).sum(1)
    if group is not None:
        code0 = code0 + group * (mult[0] * radix[0])
    # code(key_r) = code0 + r sum(mult) - (d + 1) sum_k mult_k [rank_k > d - r]: coordinate k
    # enters from corner d + 1 - rank_k on (a scatter, then a running sum over the corners)
    step = torch.zeros(n, d + 2, dtype=torch.int64, device=dev)
    step.scatter_add_(1, d + 1 - rank, mult_t.expand(n, d))
    step[:, 0] = code0
    for k in range(1, d + 1):  # code of corner k from corner k - 1 (a running sum over few columns)
        step[:, k].mul_(-(d + 1)).add_(step[:, k - 1]).add_(down)
    code = step[:, : d + 1]
    # one sort numbers the vertices (codes ascending) and groups the entries by vertex (splat)
    sorted_code, order = torch.sort(code.reshape(-1), stable=True)
    uniq, inv_sorted, counts = torch.unique_consecutive(sorted_code, return_inverse=True, return_counts=True)
    m = uniq.numel()
    ids = torch.arange(m, device=dev)
    inv = torch.empty_like(order)
    inv[order] = inv_sorted
    nbr = []
    for j in range(d + 1):
        # neighbours: key - 1 everywhere, + d on coordinate j (j = d: only the -1 shift), and
        # the opposite; the second table is the first one inverted (no second search)
        shift = -down + (d + 1) * (mult[j] if j < d else 0)
        c = uniq + shift
        pos = torch.searchsorted(uniq, c).clamp_max(m - 1)
        fwd = torch.where(uniq[pos] == c, pos, m)
        back = torch.full((m + 1,), m, dtype=torch.int64, device=dev).scatter_(0, fwd, ids)[:m]  # row m: a sink
        nbr += [fwd, back]
    return inv.reshape(n, d + 1), order, counts, torch.stack(nbr)


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
    order = torch.argsort(inv, stable=True)
    return inv, order, torch.bincount(inv, minlength=m), nbr
