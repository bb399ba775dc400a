"""A straightforward per-image implementation of docs/method.md steps 1-3, the reference for the kernels.

Written from docs/method.md alone, in float64 numpy with plain loops (cells, classes, groups, Sinkhorn
iterations), sharing no code with dhr_cli.kernels: the batched kernels must agree with it pixel
for pixel (up to float rounding) with the CRF off. Slow on purpose: it is also the "per-image
path" the propagation benchmark compares against.
"""

from __future__ import annotations

import math

import numpy as np

IGNORE = 255


# ---- resizing -------------------------------------------------------------------------------
def _bilinear_axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of bilinear resizing along one axis (align_corners=False)."""
    scale = n_in / n_out
    i0, i1, lam = np.zeros(n_out, int), np.zeros(n_out, int), np.zeros(n_out)
    for d in range(n_out):
        src = max((d + 0.5) * scale - 0.5, 0.0)
        lo = min(int(math.floor(src)), n_in - 1)
        i0[d], i1[d], lam[d] = lo, min(lo + 1, n_in - 1), src - lo
    return i0, i1, lam


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(C, h, w) -> (C, H, W), bilinear with align_corners=False."""
    if x.shape[1:] == tuple(size):
        return x.astype(np.float64)
    y0, y1, ly = _bilinear_axis(x.shape[1], size[0])
    x0, x1, lx = _bilinear_axis(x.shape[2], size[1])
    x = x.astype(np.float64)
    rows = x[:, y0, :] * (1 - ly)[None, :, None] + x[:, y1, :] * ly[None, :, None]
    return rows[:, :, x0] * (1 - lx)[None, None, :] + rows[:, :, x1] * lx[None, None, :]


# ---- f_OT -----------------------------------------------------------------------------------
def minmax(x: np.ndarray) -> np.ndarray:
    """Per column of (M, N): (x - min) / max(max - min, 1e-5)."""
    lo, hi = x.min(0, keepdims=True), x.max(0, keepdims=True)
    return (x - lo) / np.maximum(hi - lo, 1e-5)


def sinkhorn_plan(sim: np.ndarray, b: np.ndarray | None = None, eps: float = 0.1, max_iter: int = 100,
                  tol: float = 1e-2) -> tuple[np.ndarray, int]:
    """The authors' Sinkhorn on one (M, N) problem: (plan, iterations run)."""
    m, n = sim.shape
    kernel = np.exp(-(1.0 - sim.astype(np.float64)) / eps)
    a = np.full(m, 1.0 / m)
    b = np.full(n, 1.0 / n) if b is None else np.asarray(b, np.float64) / np.sum(b)
    r, c = np.ones(m), np.ones(n)
    it = 0
    for it in range(1, max_iter + 1):
        r_prev = r
        r = a / (kernel @ c)
        c = b / (kernel.T @ r)
        if np.mean(np.abs(r - r_prev)) < tol:
            break
    return r[:, None] * kernel * c[None, :], it


def f_ot(sim: np.ndarray, b: np.ndarray | None = None, **kw) -> np.ndarray:
    return minmax(sinkhorn_plan(sim, b, **kw)[0])


# ---- step 2.1: majority pooling -------------------------------------------------------------
def majority_cells(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(hu, wu) majority label of each adaptive-pooling bin; ties to the lowest value, 255 highest."""
    h, w = mask.shape
    out = np.zeros(grid, np.int64)
    for i in range(grid[0]):
        y0, y1 = (i * h) // grid[0], -(-((i + 1) * h) // grid[0])
        for j in range(grid[1]):
            x0, x1 = (j * w) // grid[1], -(-((j + 1) * w) // grid[1])
            counts = np.bincount(mask[y0:y1, x0:x1].ravel().astype(np.int64), minlength=256)
            out[i, j] = int(np.argmax(counts))  # first maximum = lowest label value
    return out


def _cosine_minmax(feats: np.ndarray, protos: np.ndarray) -> np.ndarray:
    """(G, D) cell features, (N, D) prototypes -> (G, N) cosine heat-maps, min-max per class."""
    f = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    v = protos / np.maximum(np.linalg.norm(protos, axis=1, keepdims=True), 1e-12)
    return minmax(f @ v.T)


def _prototypes(feats: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(G, D), (G, N) cell weights -> (N, D) weighted means."""
    protos = np.zeros((weights.shape[1], feats.shape[1]))
    for k in range(weights.shape[1]):
        w = weights[:, k]
        protos[k] = (w[:, None] * feats).sum(0) / max(w.sum(), 1e-12)
    return protos


def propagate_heat(seed: np.ndarray, uss: np.ndarray, wss: list[np.ndarray], labels: list[int], *,
                   cams: np.ndarray | None = None, cam_labels: list[int] | None = None, tau: float = 0.8,
                   background: int = 0, background_in_groups: bool = False, marginals: str = "uniform",
                   min_marginal: float = 0.02, recover: bool = True,
                   eps: float = 0.1, max_iter: int = 100, tol: float = 1e-2) -> tuple[np.ndarray, list[int]]:
    """Steps 2.1-2.6 before the argmax for one image: ((N, H, W) heat-maps, class label values)."""
    d, hu, wu = uss.shape
    cells = majority_cells(seed, (hu, wu)).ravel()
    feats = uss.reshape(d, -1).T.astype(np.float64)
    won = sorted(set(cells.tolist()) - {IGNORE})
    extra: dict[int, np.ndarray] = {}
    if recover and cams is not None:
        for label in labels:
            if label in won or label not in cam_labels:
                continue
            cam = resize_bilinear(np.maximum(cams[cam_labels.index(label)], 0)[None], (hu, wu))[0].ravel()
            if cam.max() > 0:
                extra[label] = (cam >= 0.8 * cam.max()).astype(np.float64)
    classes = sorted(set(won) | set(extra)) or [background]
    weights = np.zeros((feats.shape[0], len(classes)))
    for k, c in enumerate(classes):
        weights[:, k] = extra[c] if c in extra else (cells == c)
    protos = _prototypes(feats, weights)
    heat = _cosine_minmax(feats, protos)
    n = len(classes)
    b = None
    if marginals == "seeded":
        share = np.array([(cells == c).sum() / len(cells) for c in classes])
        b = np.maximum(share, min_marginal)
    v = protos / np.maximum(np.linalg.norm(protos, axis=1, keepdims=True), 1e-12)
    corr = np.maximum(v @ v.T, 0)
    groups = [[j for j in range(i, n) if corr[i, j] > tau] for i in range(n)]
    if not background_in_groups:  # background only in its own group (docs/method.md, Steps 2-3, item 3)
        groups = [[i] if classes[i] == background else [j for j in g if classes[j] != background]
                  for i, g in enumerate(groups)]
    if any(len(g) > 1 for g in groups) and wss:
        total = np.zeros((feats.shape[0], n))
        for w in wss:
            wf = resize_bilinear(w, (hu, wu)).reshape(w.shape[0], -1).T
            total += _cosine_minmax(wf, _prototypes(wf, weights))
        heat_ws = minmax(total / len(wss))
        for g in groups:
            if len(g) > 1:
                factor = f_ot(heat_ws[:, g], None if b is None else b[g], eps=eps, max_iter=max_iter, tol=tol)
                heat[:, g] = heat[:, g] * factor
    heat = minmax(heat * f_ot(heat, b, eps=eps, max_iter=max_iter, tol=tol))
    maps = heat.T.reshape(n, hu, wu)
    return resize_bilinear(maps, seed.shape), classes


def propagate(seed: np.ndarray, uss: np.ndarray, wss: list[np.ndarray], labels: list[int], **kw) -> np.ndarray:
    """Steps 2 and 3 for one image, CRF off: (H, W) int64 mask of label values."""
    heat, classes = propagate_heat(seed, uss, wss, labels, **kw)
    return np.asarray(classes)[np.argmax(heat, axis=0)]


def top2_margin(heat: np.ndarray) -> np.ndarray:
    """(N, H, W) -> (H, W) gap between the best and second-best channel (inf with one channel)."""
    if heat.shape[0] < 2:
        return np.full(heat.shape[1:], np.inf)
    part = np.sort(heat, axis=0)
    return part[-1] - part[-2]


# ---- step 1 (OT part) -----------------------------------------------------------------------
def rebalance_cams(cams: np.ndarray, ot: bool = True) -> np.ndarray:
    """Steps 1.1-1.2: relu, max-normalise, and A * f_OT(A) when there is more than one class (and ot)."""
    a = np.maximum(cams.astype(np.float64), 0)
    a = a / np.maximum(a.reshape(a.shape[0], -1).max(1), 1e-5)[:, None, None]
    if ot and a.shape[0] > 1:
        k, h, w = a.shape
        a = a * f_ot(a.reshape(k, -1).T).T.reshape(k, h, w)
    return a


def seed(cams: np.ndarray, labels: list[int], size: tuple[int, int], bg_power: float, confidence: float,
         background: int = 0, ot: bool = True) -> np.ndarray:
    """Step 1 without CRF and without M0: (H, W) uint8 seed mask, 255 = unsure.

    Background competes with score (1 - max_k A_k) ** bg_power; pixels whose winning share
    (score / sum of scores) is below `confidence` are unsure.
    """
    a = np.clip(resize_bilinear(rebalance_cams(cams, ot), size), 0, 1)
    bg = np.maximum(1 - a.max(0, initial=0), 0) ** bg_power
    scores = np.concatenate([bg[None], a], 0)
    probs = scores / np.maximum(scores.sum(0, keepdims=True), 1e-12)
    idx = np.argmax(probs, axis=0)
    values = np.asarray([background, *labels])
    out = values[idx]
    out[probs.max(0) < confidence] = IGNORE
    return out.astype(np.uint8)
