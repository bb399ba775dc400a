"""Mask quality kernels: the guided filter (against a brute-force reference), class restoring
after the CRF / final argmax, and scenes with small objects touching large ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dhr_cli.config import CRFConfig, PropagateConfig
from dhr_cli.kernels.crf import crf_function
from dhr_cli.kernels.propagate import PropagateItem, propagate_items
from dhr_cli.kernels.upsample import guided_filter, guided_upsample, restore_classes


def _guided_reference(I: np.ndarray, p: np.ndarray, r: int, eps: float) -> np.ndarray:
    """He et al.'s colour guided filter written per window, float64: I (3, H, W), p (H, W)."""
    _, h, w = I.shape
    a = np.zeros((h, w, 3))
    b = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            ys, xs = slice(max(0, y - r), y + r + 1), slice(max(0, x - r), x + r + 1)
            Iw = I[:, ys, xs].reshape(3, -1)
            pw = p[ys, xs].reshape(-1)
            mu, pm = Iw.mean(1), pw.mean()
            sigma = (Iw @ Iw.T) / Iw.shape[1] - np.outer(mu, mu)
            cov = (Iw * pw).mean(1) - mu * pm
            a[y, x] = np.linalg.solve(sigma + eps * np.eye(3), cov)
            b[y, x] = pm - a[y, x] @ mu
    q = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            ys, xs = slice(max(0, y - r), y + r + 1), slice(max(0, x - r), x + r + 1)
            q[y, x] = a[ys, xs].reshape(-1, 3).mean(0) @ I[:, y, x] + b[ys, xs].mean()
    return q


@pytest.mark.parametrize("r,eps", [(1, 1e-3), (2, 1e-2), (20, 1e-4)])  # 20: windows larger than the image
def test_guided_filter_matches_brute_force(r, eps):
    rng = np.random.default_rng(r)
    I = rng.random((2, 3, 9, 13))
    p = rng.random((2, 2, 9, 13))
    got = guided_filter(torch.from_numpy(I), torch.from_numpy(p), r, eps).numpy()
    for i in range(2):
        for c in range(2):
            np.testing.assert_allclose(got[i, c], _guided_reference(I[i], p[i, c], r, eps), atol=1e-9)


def test_guided_upsample_snaps_to_an_image_edge():
    # a coarse map whose step lies between grid cells; the image has a sharp edge at column 13
    image = torch.zeros(3, 16, 32)
    image[:, :, 13:] = 255
    maps = torch.zeros(2, 4, 8)
    maps[0, :, :4], maps[1, :, 4:] = 1, 1  # step at column 16 after upsampling
    up = guided_upsample(maps, image, radius=4, eps=1e-4)
    assert up.shape == (2, 16, 32) and bool((up >= 0).all())
    bil = torch.nn.functional.interpolate(maps[None], size=(16, 32), mode="bilinear", align_corners=False)[0]
    truth = torch.arange(32)[None].expand(16, 32) >= 13
    acc = lambda m: float(((m[1] > m[0]) == truth).float().mean())  # noqa: E731
    assert acc(up) >= acc(bil) + 1 / 32  # at least one column of the offset corrected


def test_restore_classes_takes_back_erased_labels():
    mask = torch.zeros(6, 6, dtype=torch.long)
    before = mask.clone()
    before[1:3, 1:3] = 7
    seed = torch.full((6, 6), 255)
    seed[4, 4] = 9
    out = restore_classes(mask, [7, 9, 11], [before, seed])
    assert (out[1:3, 1:3] == 7).all() and out[4, 4] == 9
    assert int((out != 0).sum()) == 5  # nothing else changed; 11 held no pixel anywhere
    assert restore_classes(out, [7, 9], [before, seed]) is out  # nothing missing: untouched


def _small_object_scenes(n: int, seed: int):
    """Scenes with a large object and small ones (radius 2..4 px) touching it, colours close to it,
    seeds from a noisy version of the truth, USS features that blur the small objects."""
    rng = np.random.default_rng(seed)
    scenes = []
    h, w = 60, 80
    for _ in range(n):
        gt = np.zeros((h, w), np.int64)
        yy, xx = np.mgrid[0:h, 0:w]
        cy, cx, ry, rx = rng.uniform(25, 35), rng.uniform(30, 50), rng.uniform(12, 18), rng.uniform(15, 22)
        big = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        gt[big] = 1
        labels = [1]
        for cls in (2, 3)[: int(rng.integers(1, 3))]:
            ang = rng.uniform(0, 2 * np.pi)
            rad = rng.uniform(2, 4)
            sy, sx = cy + (ry + rad * 0.5) * np.sin(ang), cx + (rx + rad * 0.5) * np.cos(ang)
            gt[(yy - sy) ** 2 + (xx - sx) ** 2 <= rad**2] = cls
            labels.append(cls)
        colours = np.array([[90, 110, 100], [150, 120, 90], [160, 128, 100], [140, 130, 85]], np.float32)
        image = colours[gt] + rng.normal(0, 8, (h, w, 3))
        emb = rng.normal(0, 1, (4, 16)).astype(np.float32)
        emb[2:] = 0.5 * emb[2:] + 0.5 * emb[1]  # small classes look like the large one
        dense = torch.from_numpy(emb[gt].transpose(2, 0, 1).copy())[None]
        uss = torch.nn.functional.adaptive_avg_pool2d(dense, (8, 10))[0]
        uss = uss + 0.3 * torch.from_numpy(rng.normal(0, 1, uss.shape).astype(np.float32))
        seed_mask = torch.from_numpy(gt.copy())
        seed_mask[torch.from_numpy(rng.random((h, w)) < 0.3)] = 255
        img = torch.from_numpy(np.clip(image, 0, 255).astype(np.float32)).permute(2, 0, 1)
        labels = [c for c in labels if (gt == c).any()]
        scenes.append((PropagateItem(seed=seed_mask, uss=uss, wss=[], labels=labels, image=img), gt))
    return scenes


def _vanishing(masks, scenes) -> float:
    pairs = [(m, c) for m, (it, gt) in zip(masks, scenes) for c in it.labels if (gt == c).any()]
    return sum(not bool((m == c).any()) for m, c in pairs) / len(pairs)


def test_default_pipeline_loses_no_labelled_class_to_the_crf():
    scenes = _small_object_scenes(8, seed=3)
    items = [it for it, _ in scenes]
    crf = crf_function(CRFConfig())
    no_crf = propagate_items(items, PropagateConfig(step3=False, use_crf=False, restore_classes=False))
    default = propagate_items(items, PropagateConfig(step3=False), crf=crf)
    assert _vanishing(default, scenes) <= _vanishing(no_crf, scenes)
    for m, b, it in zip(default, no_crf, items):  # every labelled class that held pixels before the CRF
        for c in it.labels:
            if (b == c).any():
                assert (m == c).any(), f"class {c} erased"


def _erasing_crf(images, probs, channel_valid=None, pixel_valid=None):
    """A stand-in CRF that smooths every class but the first two away (what a CRF does to small objects)."""
    out = probs.clone()
    out[:, 2:] = 0
    return out


@pytest.mark.parametrize("restore", [True, False])
def test_restore_option_puts_back_what_the_crf_erased(restore):
    scenes = _small_object_scenes(8, seed=5)
    items = [it for it, _ in scenes]
    before = propagate_items(items, PropagateConfig(step3=False, use_crf=False, restore_classes=False))
    after = propagate_items(items, PropagateConfig(step3=False, restore_classes=restore), crf=_erasing_crf)
    held = [(a, b, c) for a, b, it in zip(after, before, items) for c in it.labels if c >= 2 and (b == c).any()]
    assert held, "the scenes must hold small classes before the CRF"
    kept = [bool((a == c).any()) for a, b, c in held]
    assert all(kept) if restore else not any(kept)
    if restore:  # restored exactly where they were before the CRF
        for a, b, c in held:
            assert bool(((a == c) == (b == c)).all())
