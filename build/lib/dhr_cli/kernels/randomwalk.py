"""Random-walk propagation of CAMs in the AffinityNet / PSA manner (baseline for `dhr propagate --method rw`).

As in PSA (Ahn & Kwak, CVPR 2018) and MCTformer's `psa/infer_aff.py`:

    A[i, j]  = a(f_i, f_j) ** beta  for grid cells i, j closer than `radius` (all pairs if radius = 0),
               a = max(cos(f_i, f_j), 0)  (kind "cosine")  or  exp(-mean_d |f_i - f_j|)  (kind "l1", PSA's);
               A[i, i] = 1
    T        = A / column sums of A                          (column-stochastic)
    T'       = T ** (2 ** logt)                               (logt squarings, or 2**logt products with the CAMs)
    scores   = [bg, CAM_1 / max, ..., CAM_K / max] @ T'      (bg a constant plane, 0.39 in MCTformer)
    mask     = labels[argmax(upsample(scores))]

PSA learns the affinity features; here any features can be used (USS features are the natural
choice), hence the cosine default. The constant background plane stays constant under a
column-stochastic T, so the walk only moves the class maps, exactly as in PSA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dhr_cli.config import RandomWalkConfig
from dhr_cli.errors import ShapeError

_RW = RandomWalkConfig()  # the defaults of the signatures below

__all__ = ["affinity", "transition", "random_walk", "random_walk_mask"]


def _check(x: torch.Tensor, ndim: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != ndim:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ShapeError(f"expected {layout}, got {got}")


def _pair_mask(h: int, w: int, radius: int, device) -> torch.Tensor:
    """(N, N) bool: cells closer than radius (Euclidean, strict, as PSA's get_indices_of_pairs)."""
    yy, xx = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    yy, xx = yy.flatten(), xx.flatten()
    d2 = (yy[:, None] - yy[None, :]) ** 2 + (xx[:, None] - xx[None, :]) ** 2
    return d2 < radius * radius


def affinity(feats: torch.Tensor, *, beta: float = _RW.beta, kind: str = _RW.affinity, radius: int = _RW.radius,
             valid: torch.Tensor | None = None) -> torch.Tensor:
    """Pairwise affinities of grid cells, raised to beta.

    Args:
        feats: (B, D, h, w) float features.
        beta: exponent (PSA/MCTformer: 8).
        kind: "cosine" (max(cos, 0)) or "l1" (exp(-mean_d |f_i - f_j|), PSA's).
        radius: only cells closer than this (in grid cells) are connected; 0 connects all pairs.
        valid: (B, h, w) bool, False on padding; padded cells connect to nothing but themselves.

    Returns:
        (B, N, N) affinities in [0, 1], N = h * w, symmetric, 1 on the diagonal.
    """
    _check(feats, 4, "feats (B, D, h, w)")
    B, D, h, w = feats.shape
    x = feats.flatten(2)  # (B, D, N)
    if kind == "cosine":
        xn = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        a = torch.bmm(xn.transpose(1, 2), xn).clamp(0, 1)
        a = a.pow(beta)
    elif kind == "l1":
        d = torch.cdist(x.transpose(1, 2).contiguous(), x.transpose(1, 2).contiguous(), p=1) / D
        a = torch.exp(-beta * d)  # exp(-d) ** beta
    else:
        raise ValueError(f"affinity kind must be 'cosine' or 'l1', got {kind!r}")
    N = h * w
    eye = torch.eye(N, dtype=torch.bool, device=feats.device)
    if radius > 0:
        a = a * _pair_mask(h, w, radius, feats.device).to(a.dtype)
    if valid is not None:
        if valid.shape != (B, h, w):
            raise ShapeError(f"expected valid (B, h, w) = {(B, h, w)}, got {tuple(valid.shape)}")
        v = valid.flatten(1).to(a.dtype)
        a = a * v[:, :, None] * v[:, None, :]
    return torch.where(eye, torch.ones_like(a), a)


def transition(aff: torch.Tensor) -> torch.Tensor:
    """(B, N, N) affinities -> column-stochastic transition matrix T[b, i, j] = A[b, i, j] / sum_i A[b, i, j]."""
    _check(aff, 3, "aff (B, N, N)")
    return aff / aff.sum(dim=1, keepdim=True).clamp_min(1e-12)


def _walk(x: torch.Tensor, trans: torch.Tensor, logt: int, power: str) -> torch.Tensor:
    """x (B, C, N) @ trans ** (2 ** logt)."""
    N, C = trans.shape[-1], x.shape[1]
    if power == "auto":  # same result; pick the cheaper of logt N^3 and 2^logt C N^2 multiply-adds
        power = "iterate" if (2**logt) * C < logt * N else "square"
    if power == "square":
        for _ in range(logt):
            trans = torch.bmm(trans, trans)
        return torch.bmm(x, trans)
    if power == "iterate":
        for _ in range(2**logt):
            x = torch.bmm(x, trans)
        return x
    raise ValueError(f"power must be 'auto', 'square' or 'iterate', got {power!r}")


def random_walk(cams: torch.Tensor, feats: torch.Tensor, *, class_mask: torch.Tensor | None = None,
                valid: torch.Tensor | None = None, beta: float = _RW.beta, logt: int = _RW.logt, bg: float = _RW.bg,
                kind: str = _RW.affinity, radius: int = _RW.radius, power: str = _RW.power) -> torch.Tensor:
    """Propagate CAMs over the feature grid with a random walk (PSA).

    Args:
        cams: (B, K, h, w) CAMs of the labelled classes on the walk grid (>= 0 after relu); each
            map is divided by its maximum (over valid cells) first.
        feats: (B, D, h, w) features on the same grid.
        class_mask: (B, K) bool, False for padded class slots (their maps are zeroed).
        valid: (B, h, w) bool, False on padded cells.
        beta, logt, bg, kind, radius: see the module docstring; power: "auto" | "square" | "iterate".

    Returns:
        (B, 1 + K, h, w) scores: channel 0 the background plane (constant bg), then the walked CAMs.
    """
    _check(cams, 4, "cams (B, K, h, w)")
    _check(feats, 4, "feats (B, D, h, w)")
    B, K, h, w = cams.shape
    if feats.shape[0] != B or feats.shape[2:] != cams.shape[2:]:
        raise ShapeError(f"expected feats (B, D, h, w) = ({B}, D, {h}, {w}) matching cams, got {tuple(feats.shape)}")
    if logt < 0:
        raise ValueError(f"logt must be >= 0, got {logt}")
    x = cams.to(feats.dtype).clamp_min(0)
    if valid is not None:
        if valid.shape != (B, h, w):
            raise ShapeError(f"expected valid (B, h, w) = {(B, h, w)}, got {tuple(valid.shape)}")
        x = x * valid[:, None].to(x.dtype)
    if class_mask is not None:
        if class_mask.shape != (B, K):
            raise ShapeError(f"expected class_mask (B, K) = {(B, K)}, got {tuple(class_mask.shape)}")
        x = x * class_mask[:, :, None, None].to(x.dtype)
    x = x / x.flatten(2).amax(dim=2).clamp_min(1e-5)[:, :, None, None]
    planes = torch.cat([x.new_full((B, 1, h, w), bg), x], dim=1).flatten(2)  # (B, 1+K, N)
    trans = transition(affinity(feats, beta=beta, kind=kind, radius=radius, valid=valid))
    out = _walk(planes, trans, logt, power)
    return out.view(B, 1 + K, h, w)


def random_walk_mask(cams: torch.Tensor, feats: torch.Tensor, labels, image_size: tuple[int, int], *,
                     beta: float = _RW.beta, logt: int = _RW.logt, bg: float = _RW.bg, kind: str = _RW.affinity,
                     radius: int = _RW.radius,
                     power: str = _RW.power, max_side: int = _RW.max_side) -> torch.Tensor:
    """One image: CAMs and features on their own grids -> (H, W) int64 mask of label values (0 = background).

    Args:
        cams: (K, hc, wc) CAMs of the labelled classes, in the order of `labels`.
        feats: (D, hf, wf) features; the walk runs on their grid, shrunk so its longer side is at
            most max_side cells (the walk costs O(N^2) to O(N^3) in N = h * w cells).
        labels: K label values (ints or a (K,) tensor).
        image_size: (H, W) of the output mask.
    """
    _check(cams, 3, "cams (K, h, w)")
    _check(feats, 3, "feats (D, h, w)")
    lab = torch.as_tensor(list(labels) if not isinstance(labels, torch.Tensor) else labels, dtype=torch.long,
                          device=feats.device).flatten()
    if lab.numel() != cams.shape[0]:
        raise ShapeError(f"expected {cams.shape[0]} labels for cams (K, h, w), got {lab.numel()}")
    H, W = int(image_size[0]), int(image_size[1])
    if cams.shape[0] == 0:
        return torch.zeros((H, W), dtype=torch.long, device=feats.device)
    h, w = feats.shape[1:]
    if max(h, w) > max_side:
        s = max_side / max(h, w)
        h, w = max(1, round(h * s)), max(1, round(w * s))
        feats = F.adaptive_avg_pool2d(feats[None].float(), (h, w))[0]
    c = F.interpolate(cams[None].to(feats.dtype), size=(h, w), mode="bilinear", align_corners=False)
    scores = random_walk(c, feats[None].to(c.dtype), beta=beta, logt=logt, bg=bg, kind=kind, radius=radius,
                         power=power)
    up = F.interpolate(scores, size=(H, W), mode="bilinear", align_corners=False)[0]
    table = torch.cat([lab.new_zeros(1), lab])
    return table[up.argmax(0)]
