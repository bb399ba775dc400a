"""Step 1 of the method (`dhr seed`): CAM normalisation, OT rebalancing of the CAMs (cfg.ot), background
competition, optional CRF, seed masks with an unsure band (255).

Pure batched tensor functions over images of different sizes; `seed_batch` is the entry point
for equally sized crops that `dhr train` calls every iteration.
"""

from __future__ import annotations

import torch

from dhr_cli.config import IGNORE_INDEX, SeedConfig, SinkhornConfig
from dhr_cli.kernels.crf import crf_function
from dhr_cli.kernels.sinkhorn import f_ot
from dhr_cli.kernels.upsample import resize

__all__ = ["normalize_cams", "ot_rebalance_cams", "seed_probabilities", "seed_masks", "seed_batch", "crf_padded"]

CAM_FLOOR = 1e-5  # a map is divided by max(its peak, CAM_FLOOR) (IRN's cam / (max + 1e-5)): below it, near zero


def normalize_cams(cams: torch.Tensor) -> torch.Tensor:
    """relu, then each map divided by its spatial max (clipped at CAM_FLOOR): (K, h, w)."""
    cams = torch.relu(cams)
    return cams / cams.flatten(1).amax(1).clamp_min(CAM_FLOOR)[:, None, None]


def ot_rebalance_cams(cams: list[torch.Tensor], sinkhorn: SinkhornConfig) -> list[torch.Tensor]:
    """Step 1.2 for a batch of images: A * f_OT(A) for images with more than one class."""
    multi = [i for i, c in enumerate(cams) if c.shape[0] > 1]
    out = list(cams)
    if not multi:
        return out
    flat = [cams[i].flatten(1) for i in multi]  # (K, h*w): classes first
    # Pad classes and pixels: (b, K, M).
    k = max(f.shape[0] for f in flat)
    m = max(f.shape[1] for f in flat)
    sim = flat[0].new_zeros(len(flat), k, m)
    pv = torch.zeros(len(flat), m, dtype=torch.bool, device=sim.device)
    cv = torch.zeros(len(flat), k, dtype=torch.bool, device=sim.device)
    for j, f in enumerate(flat):
        sim[j, : f.shape[0], : f.shape[1]] = f
        pv[j, : f.shape[1]] = True
        cv[j, : f.shape[0]] = True
    factor = f_ot(sim, sinkhorn, pixel_valid=pv, class_valid=cv)
    for j, i in enumerate(multi):
        kk, h, w = cams[i].shape
        out[i] = cams[i] * factor[j, :kk, : h * w].reshape(kk, h, w)
    return out


def otsu_threshold(values: torch.Tensor, bins: int = 64) -> torch.Tensor:
    """Otsu's threshold of values in [0, 1] (the bin centre that maximises the between-class variance)."""
    hist = torch.histc(values.float().flatten(), bins=bins, min=0.0, max=1.0).double()
    p = hist / hist.sum().clamp_min(1)
    centres = (torch.arange(bins, dtype=torch.float64, device=values.device) + 0.5) / bins
    omega = p.cumsum(0)
    mu = (p * centres).cumsum(0)
    between = (mu[-1] * omega - mu) ** 2 / (omega * (1 - omega)).clamp_min(1e-12)
    return centres[between.argmax()]


def seed_probabilities(cams: torch.Tensor, bg_power: float, bg_rule: str = "power") -> torch.Tensor:
    """[background, classes] probabilities from (K, H, W) CAMs in [0, 1]: (1 + K, H, W).

    Background competes (docs/method.md decision): its score is (1 - max_k A_k) ** bg_power.
    bg_rule="otsu": the power is chosen per image so that background and the strongest class
    tie at Otsu's threshold t of max_k A_k (t = (1 - t) ** power, t clamped to [0.1, 0.9]).
    """
    top = cams.amax(0, keepdim=True)
    if bg_rule == "otsu":
        t = otsu_threshold(top).clamp(0.1, 0.9)
        bg_power = float(torch.log(t) / torch.log1p(-t))
    bg = (1 - top).clamp_min(0) ** bg_power
    scores = torch.cat([bg, cams], 0)
    return scores / scores.sum(0, keepdim=True).clamp_min(1e-12)


def seed_masks(cams: list[torch.Tensor], labels: list[list[int]], sizes: list[tuple[int, int]], cfg: SeedConfig,
               *, images: list[torch.Tensor] | None = None, base: list[torch.Tensor | None] | None = None,
               background: int = 0, crf=None) -> list[torch.Tensor]:
    """Step 1 for a batch: CAMs (K_i, h_i, w_i) with their label values -> seed masks (H_i, W_i) uint8.

    `crf(images (B,3,H,W), probs (B,L,H,W), channel_valid, pixel_valid)` refines the
    probabilities when given (cfg.use_crf); `base` masks M0 are overwritten where a class wins.
    """
    cams = [normalize_cams(c.float()) for c in cams]
    if cfg.ot:
        cams = ot_rebalance_cams(cams, cfg.sinkhorn)
    probs = [seed_probabilities(resize(c, size).clamp(0, 1), cfg.bg_power, cfg.bg_rule) for c, size in zip(cams, sizes)]
    if crf is not None and images is not None:
        probs = crf_padded(crf, images, probs)
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


def crf_padded(crf, images: list[torch.Tensor], probs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run a batched CRF over images of different sizes and channel counts (padded, masked).

    Portrait and landscape images go in separate calls: padded together, a batch of 480x640
    and 640x480 images would become 640x640 each (a third more pixels to pad and mask).
    """
    groups: dict[bool, list[int]] = {}
    for i, p in enumerate(probs):
        groups.setdefault(p.shape[1] > p.shape[2], []).append(i)
    out: list[torch.Tensor] = [probs[0]] * len(probs)
    for idx in groups.values():
        for i, res in zip(idx, _crf_padded_group(crf, [images[i] for i in idx], [probs[i] for i in idx])):
            out[i] = res
    return out


def _crf_padded_group(crf, images: list[torch.Tensor], probs: list[torch.Tensor]) -> list[torch.Tensor]:
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



def seed_batch(cams: torch.Tensor, values: torch.Tensor, images: torch.Tensor | None, cfg: SeedConfig, *,
               base: torch.Tensor | None = None, pixel_valid: torch.Tensor | None = None, background: int = 0,
               crf=None) -> torch.Tensor:
    """Online Step 1 for equally sized crops (what `dhr train` calls every iteration).

    Args:
        cams: (B, L, h, w) CAMs >= 0 aligned with `values`.
        values: (B, L) label values, -1 = padding.
        images: (B, 3, H, W) 0..255 (for the CRF) or None.
        base: (B, H, W) initial masks M0 overwritten where a class wins, or None.
        pixel_valid: (B, H, W) bool; outside it the seed is 255.
    Returns:
        (B, H, W) int64 seeds, 255 = unsure.
    """
    if crf is None and cfg.use_crf and images is not None:
        crf = crf_function(cfg.crf)
    size = tuple(images.shape[-2:]) if images is not None else tuple(base.shape[-2:])
    cam_list, labels = [], []
    for b in range(cams.shape[0]):
        keep = values[b] >= 0
        cam_list.append(cams[b][keep])
        labels.append(values[b][keep].tolist())
    masks = seed_masks(cam_list, labels, [size] * len(cam_list), cfg,
                       images=list(images) if images is not None and crf is not None else None,
                       base=list(base) if base is not None else None, background=background, crf=crf)
    out = torch.stack(masks).long()
    if pixel_valid is not None:
        out = torch.where(pixel_valid, out, torch.full_like(out, 255))
    return out
