"""The PSA-style random walk kernel: invariants, oracles, batching, device/dtype, guards."""

from __future__ import annotations

import pytest
import torch

from dhr_cli.config import RandomWalkConfig
from dhr_cli.errors import ShapeError
from dhr_cli.kernels.randomwalk import (
    affinity,
    random_walk,
    random_walk_mask,
    transition,
)


def _two_regions(h=6, w=8, d=4, seed=0, device="cpu", dtype=torch.float32):
    """Features: left half one direction, right half an orthogonal one (plus small noise)."""
    g = torch.Generator().manual_seed(seed)
    f = torch.zeros(d, h, w)
    f[0, :, : w // 2] = 1
    f[1, :, w // 2 :] = 1
    f = f + 0.05 * torch.rand(d, h, w, generator=g)
    return f.to(device=device, dtype=dtype)


def test_defaults_are_mctformer_psa():
    cfg = RandomWalkConfig()
    assert (cfg.beta, cfg.logt, cfg.bg) == (8.0, 6, 0.39)
    with pytest.raises(ValueError):
        RandomWalkConfig(logt=-1)


def test_affinity_hand_computed_two_cells():
    feats = torch.tensor([[1.0, 1.0], [0.0, 1.0]]).view(1, 2, 1, 2)  # f0 = (1, 0), f1 = (1, 1)
    a = affinity(feats, beta=2.0, kind="cosine", radius=0)
    cos = 1 / 2**0.5
    expect = torch.tensor([[1.0, cos**2], [cos**2, 1.0]])
    torch.testing.assert_close(a[0], expect)
    a1 = affinity(feats, beta=2.0, kind="l1", radius=0)  # mean |f0 - f1| = 0.5 -> exp(-0.5) ** 2
    torch.testing.assert_close(a1[0, 0, 1], torch.exp(torch.tensor(-1.0)))
    t = transition(a)[0]
    torch.testing.assert_close(t.sum(0), torch.ones(2))
    assert t[0, 1].item() == pytest.approx(cos**2 / (1 + cos**2))


def test_affinity_radius_symmetry_and_padding():
    feats = torch.rand(2, 3, 5, 6, generator=torch.Generator().manual_seed(1))
    a = affinity(feats, radius=2)
    assert torch.allclose(a, a.transpose(1, 2))
    assert torch.all(torch.diagonal(a, dim1=1, dim2=2) == 1)
    # cells (0, 0) and (0, 2) are 2 apart: not connected with radius 2 (strict), connected with 3
    assert a[0, 0, 2] == 0 and affinity(feats, radius=3)[0, 0, 2] > 0
    valid = torch.ones(2, 5, 6, dtype=torch.bool)
    valid[1, :, 4:] = False
    ap = affinity(feats, radius=0, valid=valid)
    pad = torch.nonzero(~valid[1].flatten()).flatten()
    off = ap[1, pad][:, [i for i in range(30) if i not in pad.tolist()]]
    assert torch.all(off == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_walk_is_column_stochastic_and_spreads_within_region(device, dtype):
    feats = _two_regions(device=device, dtype=dtype)
    h, w = feats.shape[1:]
    cam = torch.zeros(2, h, w, device=device, dtype=dtype)
    cam[0, 2, 1] = 1.0  # a single peak of class A in the left region
    cam[1, 3, 6] = 1.0  # class B in the right region
    out = random_walk(cam[None], feats[None], beta=8, logt=6, bg=0.1, radius=3)
    assert out.shape == (1, 3, h, w) and out.dtype == dtype and out.device == feats.device
    torch.testing.assert_close(out[0, 0], torch.full_like(out[0, 0], 0.1))  # bg constant stays constant
    left, right = out[0, 1, :, : w // 2], out[0, 1, :, w // 2 :]
    assert left.min() > 10 * right.max()
    assert out[0, 2, :, w // 2 :].min() > 10 * out[0, 2, :, : w // 2].max()
    # the peak spread: many cells of the left region now carry class A
    assert (left > 0.5 * left.max()).sum() >= 4


def test_square_equals_iterate_and_batch_equals_loop():
    g = torch.Generator().manual_seed(3)
    feats = torch.rand(3, 5, 6, 7, generator=g, dtype=torch.float64)
    cams = torch.rand(3, 2, 6, 7, generator=g, dtype=torch.float64)
    sq = random_walk(cams, feats, logt=4, power="square", radius=3)
    it = random_walk(cams, feats, logt=4, power="iterate", radius=3)
    torch.testing.assert_close(sq, it)
    loop = torch.cat([random_walk(cams[i : i + 1], feats[i : i + 1], logt=4, radius=3) for i in range(3)])
    torch.testing.assert_close(random_walk(cams, feats, logt=4, radius=3), loop)


def test_logt_zero_is_one_step_and_logt_one_two_steps():
    g = torch.Generator().manual_seed(4)
    feats = torch.rand(1, 4, 3, 5, generator=g, dtype=torch.float64)
    cams = 2 * torch.rand(1, 2, 3, 5, generator=g, dtype=torch.float64)
    x = (cams / cams.flatten(2).amax(2)[:, :, None, None]).flatten(2)[0]  # (2, 15)
    t = transition(affinity(feats, radius=5))[0]
    torch.testing.assert_close(random_walk(cams, feats, logt=0)[0, 1:].flatten(1), x @ t)
    torch.testing.assert_close(random_walk(cams, feats, logt=1)[0, 1:].flatten(1), x @ t @ t)


def test_padded_classes_and_cells_do_not_leak():
    feats = _two_regions()[None].repeat(2, 1, 1, 1)
    cams = torch.rand(2, 2, 6, 8, generator=torch.Generator().manual_seed(5))
    mask = torch.tensor([[True, True], [True, False]])
    valid = torch.ones(2, 6, 8, dtype=torch.bool)
    valid[1, :, 6:] = False
    out = random_walk(cams, feats, class_mask=mask, valid=valid, radius=0)
    assert torch.all(out[1, 2] == 0)
    torch.testing.assert_close(out[0], random_walk(cams[:1], feats[:1], radius=0)[0])
    # the valid part of item 1 equals the walk on the cropped grid
    crop = random_walk(cams[1:, :1, :, :6], feats[1:, :, :, :6], radius=0)
    torch.testing.assert_close(out[1, :2, :, :6], crop[0])


def test_random_walk_mask_maps_channels_to_labels(device):
    feats = _two_regions(h=6, w=8, device=device)
    cams = torch.zeros(2, 3, 4, device=device)
    cams[0, 1, 0] = 1  # class 15 on the left
    cams[1, 1, 3] = 1  # class 8 on the right
    mask = random_walk_mask(cams, feats, [15, 8], (12, 16), bg=0.05, radius=4)
    assert mask.shape == (12, 16) and mask.dtype == torch.long and mask.device == feats.device
    assert set(mask.unique().tolist()) <= {0, 8, 15}
    assert (mask[:, :6] == 15).float().mean() > 0.8 and (mask[:, 10:] == 8).float().mean() > 0.8
    # high background: everything is background
    assert torch.all(random_walk_mask(cams, feats, [15, 8], (12, 16), bg=2.0) == 0)
    # no labels: all background
    assert torch.all(random_walk_mask(cams[:0], feats, [], (5, 5)) == 0)
    # grid cap: a 40 x 60 feature grid with max_side 16 still works and gives the image size
    big = torch.nn.functional.interpolate(feats[None], size=(40, 60))[0]
    assert random_walk_mask(cams, big, [15, 8], (20, 30), max_side=16).shape == (20, 30)


def test_guards():
    with pytest.raises(ShapeError, match="expected cams"):
        random_walk(torch.rand(2, 3, 4), torch.rand(2, 3, 4, 5))
    with pytest.raises(ShapeError, match="matching cams"):
        random_walk(torch.rand(1, 2, 4, 5), torch.rand(1, 3, 4, 6))
    with pytest.raises(ShapeError, match="class_mask"):
        random_walk(torch.rand(1, 2, 4, 5), torch.rand(1, 3, 4, 5), class_mask=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ShapeError, match="labels"):
        random_walk_mask(torch.rand(2, 4, 5), torch.rand(3, 4, 5), [1], (8, 10))
    with pytest.raises(ValueError, match="kind"):
        affinity(torch.rand(1, 2, 3, 3), kind="dot")
    with pytest.raises(ValueError, match="power"):
        random_walk(torch.rand(1, 2, 4, 5), torch.rand(1, 3, 4, 5), power="fast")
