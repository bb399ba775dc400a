"""STEGO's correlation distillation loss (Hamilton et al., ICLR 2022; docs/uss_fit.md).

For two images' feature maps f1, f2 (frozen backbone) and code maps c1, c2 (the head being
trained) sampled at S x S points each:

    F[b, i, j] = cos(f1[b, :, i], f2[b, :, j])      (no gradient; the backbone is frozen)
    F <- F - mean_j F[b, i, :]; then F <- F - mean(F) + mean(F before)   ("pointwise" centring)
    C[b, i, j] = cos(c1[b, :, i], c2[b, :, j])
    loss = mean( -max(C, 0) * (F - shift) )

Codes are pulled together where the backbone's correlation is above `shift` and pushed apart
below it. The total is w_self * L(self, self) + w_knn * L(self, neighbour) + w_neg * L(self, random).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dhr_cli.errors import ShapeError


def _flat_norm(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C), unit length along C."""
    return F.normalize(x.flatten(2), dim=1, eps=1e-10).transpose(1, 2)


def correlation_loss(f1: torch.Tensor, f2: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, shift: float,
                     pointwise: bool = True, zero_clamp: bool = True) -> torch.Tensor:
    """Mean STEGO loss of one pairing. f: (B, C, h, w) features; c: (B, D, h, w) codes; same B, h, w."""
    if f1.ndim != 4 or c1.ndim != 4 or f1.shape[0] != c1.shape[0] or f1.shape[2:] != c1.shape[2:] \
            or f1.shape != f2.shape or c1.shape != c2.shape:
        raise ShapeError(f"correlation_loss: expected matching (B, C, h, w) maps, got {tuple(f1.shape)}, "
                         f"{tuple(f2.shape)}, {tuple(c1.shape)}, {tuple(c2.shape)}")
    with torch.no_grad():
        fd = _flat_norm(f1) @ _flat_norm(f2).transpose(1, 2)  # (B, n, n)
        if pointwise:
            old_mean = fd.mean()
            fd = fd - fd.mean(2, keepdim=True)
            fd = fd - fd.mean() + old_mean
    cd = _flat_norm(c1) @ _flat_norm(c2).transpose(1, 2)
    cd = cd.clamp_min(0.0) if zero_clamp else cd
    return -(cd * (fd - shift)).mean()


def super_perm(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random permutation of range(n) with no fixed point (n >= 2): each image meets another one.

    Images in random order, each sent to the next (one random cycle). STEGO's own `super_perm`
    bumps fixed points by one, which can pair two images with the same partner; this cannot."""
    if n < 2:
        raise ShapeError(f"super_perm needs n >= 2, got {n}")
    order = torch.randperm(n, generator=generator)
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(-1)
    return perm


def sample_points(maps: list[torch.Tensor], coords: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of each (C, h, w) map at its (S, S, 2) coords in [-1, 1] (x, y) -> (B, C, S, S).

    The maps may have different sizes (images of different shapes); border padding, align_corners as STEGO."""
    return torch.cat([F.grid_sample(m[None], coords[b][None].to(m.dtype), mode="bilinear", padding_mode="border",
                                    align_corners=True) for b, m in enumerate(maps)])


def stego_loss(feats: list[torch.Tensor], codes: list[torch.Tensor], feats_pos: list[torch.Tensor],
               codes_pos: list[torch.Tensor], coords1: torch.Tensor, coords2: torch.Tensor,
               negatives: list[torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """STEGO's total loss for a batch.

    feats/codes: per image (C, h, w) / (D, h, w) maps; *_pos: their kNN partners; coords1/2: (B, S, S, 2)
    sample points in the image and in its partner; negatives: permutations of range(B) without fixed points
    (each a random pairing, sampled at coords2). cfg: a UssFitConfig (weights and shifts).
    Returns {"loss", "self", "knn", "random"} (the three parts unweighted).
    """
    f, c = sample_points(feats, coords1), sample_points(codes, coords1)
    fp, cp = sample_points(feats_pos, coords2), sample_points(codes_pos, coords2)
    intra = correlation_loss(f, f, c, c, cfg.pos_intra_shift)
    inter = correlation_loss(f, fp, c, cp, cfg.pos_inter_shift)
    neg = []
    for perm in negatives:
        fn = sample_points([feats[int(j)] for j in perm], coords2)
        cn = sample_points([codes[int(j)] for j in perm], coords2)
        neg.append(correlation_loss(f, fn, c, cn, cfg.neg_inter_shift))
    rand = torch.stack(neg).mean() if neg else intra.new_zeros(())
    total = cfg.pos_intra_weight * intra + cfg.pos_inter_weight * inter + cfg.neg_inter_weight * rand
    return {"loss": total, "self": intra.detach(), "knn": inter.detach(), "random": rand.detach()}
