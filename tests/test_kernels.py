"""Class-level kernels: majority pooling rules, prototypes, heat-maps, grouping, batching."""

from __future__ import annotations

import numpy as np
import torch

from dhr_cli.config import PropagateConfig
from dhr_cli.kernels.propagate import (
    PropagateItem,
    class_prototypes,
    correlation_groups,
    cosine_heatmap,
    majority_pool,
    propagate_items,
    seeded_marginals,
)
from dhr_cli.testing import oracle


def test_majority_ties_go_to_the_lowest_label_and_255_is_highest():
    m = torch.tensor([[4, 4, 2, 2], [255, 255, 7, 7]])
    assert majority_pool(m[:1], (1, 1)).tolist() == [[2]]  # 4 vs 2 tie -> 2
    assert majority_pool(m[:, :2], (1, 1)).tolist() == [[4]]  # 4 vs 255 tie -> 4
    assert majority_pool(torch.full((3, 3), 255), (1, 1)).tolist() == [[255]]


def test_majority_uses_adaptive_pooling_bins():
    rng = np.random.default_rng(0)
    for h, w, gh, gw in [(37, 53, 11, 13), (20, 20, 7, 3), (9, 40, 9, 40), (5, 7, 11, 13), (375, 500, 27, 36),
                       (480, 480, 60, 60), (16, 24, 4, 6), (8, 8, 8, 8), (40, 6, 1, 1)]:  # + disjoint blocks
        mask = rng.choice([0, 3, 5, 255], size=(h, w))
        expected = oracle.majority_cells(mask, (gh, gw))
        np.testing.assert_array_equal(majority_pool(torch.from_numpy(mask), (gh, gw)).numpy(), expected)
        # the values a loader counted, or a superset of them: the same cells
        for values in ([0, 3, 5, 255], [255, 0, 1, 3, 5, 9]):
            np.testing.assert_array_equal(majority_pool(torch.from_numpy(mask.astype(np.uint8)), (gh, gw), values).numpy(),
                                          expected)


def test_prototype_of_one_class_is_the_plain_mean():
    feats = torch.randn(1, 6, 4, dtype=torch.float64)
    weights = torch.tensor([[1, 1, 0, 0, 1, 0]], dtype=torch.float64)[:, None, :]  # (B, N, G)
    np.testing.assert_allclose(class_prototypes(feats, weights)[0, 0].numpy(), feats[0, [0, 1, 4]].mean(0).numpy())


def test_heatmaps_are_min_max_per_class_and_zero_on_padding():
    feats = torch.randn(2, 10, 5)
    protos = torch.randn(2, 3, 5)
    cell_valid = torch.ones(2, 10, dtype=torch.bool)
    cell_valid[1, 7:] = False
    class_valid = torch.tensor([[True, True, True], [True, True, False]])
    heat = cosine_heatmap(feats, protos, cell_valid, class_valid)  # (B, N, G)
    assert heat.shape == (2, 3, 10) and heat.min() >= 0 and heat.max() <= 1
    assert (heat[1, :, 7:] == 0).all() and (heat[1, 2] == 0).all()
    assert torch.allclose(heat[0].amax(1), torch.ones(3)) and torch.allclose(heat[0].amin(1), torch.zeros(3))
    assert torch.allclose(cosine_heatmap(feats, protos, None, class_valid)[0], heat[0])  # None: no padded cell
    cos = torch.nn.functional.cosine_similarity(feats[1, :7, None, :], protos[1, None, :2, :], dim=-1)  # (7, 2)
    ref = (cos - cos.amin(0)) / (cos.amax(0) - cos.amin(0))
    assert torch.allclose(heat[1, :2, :7].T, ref, atol=1e-5)


def test_correlation_groups_are_upper_triangular_with_tau():
    v = torch.tensor([[[1.0, 0.0], [0.95, 0.31], [0.0, 1.0]]])
    g = correlation_groups(v, torch.ones(1, 3, dtype=torch.bool), tau=0.8)[0]
    assert g.tolist() == [[True, True, False], [False, True, False], [False, False, True]]


def test_seeded_marginals_floor():
    cells = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0, 0, 3]])
    b = seeded_marginals(cells, torch.ones(1, 10, dtype=torch.bool), torch.tensor([[0, 3, 6, -1]]), floor=0.02)
    assert torch.allclose(b, torch.tensor([[0.9, 0.1, 0.02, 0.0]]))


def test_batched_equals_one_by_one_and_follows_device(device):
    rng = np.random.default_rng(0)
    items = []
    for h, w, g in [(30, 40, (4, 5)), (25, 33, (6, 7)), (41, 29, (5, 4))]:
        seed = rng.choice([0, 2, 4, 255], size=(h, w), p=[0.5, 0.2, 0.2, 0.1])
        items.append(PropagateItem(seed=torch.from_numpy(seed).to(device), uss=torch.randn(8, *g, device=device),
                                   wss=[torch.randn(5, g[0] + 1, g[1], device=device)], labels=[2, 4]))
    cfg = PropagateConfig(use_crf=False, tau=-1.0)
    batched = propagate_items(items, cfg)
    for item, out in zip(items, batched):
        assert out.device == item.seed.device and out.shape == item.seed.shape
        assert torch.equal(out, propagate_items([item], cfg)[0])
        assert set(out.unique().tolist()) <= {0, 2, 4}


def test_resize_layouts_give_torch_bilinear_values(device):
    """`resize` picks the fast memory layout per channel count; `resize_cells` returns (cells, C)."""
    import torch.nn.functional as F

    from dhr_cli.kernels.upsample import resize, resize_cells

    g = torch.Generator().manual_seed(0)
    for shape, size in [((256, 24, 32), (27, 36)), ((4, 27, 36), (75, 100)), ((40, 7, 9), (5, 4)), ((3, 6, 6), (6, 6))]:
        x = torch.randn(*shape, generator=g).to(device)
        ref = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
        out = resize(x, size)
        assert out.shape == ref.shape and out.is_contiguous() and out.device == x.device
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        cells = resize_cells(x.half(), size)
        assert cells.shape == (size[0] * size[1], shape[0]) and cells.dtype == torch.float32
        ref16 = F.interpolate(x.half().float()[None], size=size, mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(cells, ref16.flatten(1).T, rtol=1e-6, atol=1e-6)


def test_labels_from_probs_ties_and_values():
    from dhr_cli.kernels.upsample import labels_from_probs

    probs = torch.tensor([[[0.5, 0.2]], [[0.5, 0.7]], [[0.1, 0.7]]])  # (3, 1, 2): ties to the lowest channel
    assert labels_from_probs(probs, torch.tensor([0, 4, 9])).tolist() == [[0, 4]]


def test_upsample_argmax_equals_resize_then_argmax(device):
    from dhr_cli.kernels.upsample import labels_from_probs, resize, upsample_argmax

    g = torch.Generator().manual_seed(1)
    for n in (1, 2, 3, 5):
        maps = torch.rand(n, 6, 7, generator=g, dtype=torch.float64).to(device)
        classes = torch.tensor([0, 3, 8, 9, 12][:n], device=device)
        out = upsample_argmax(maps, (37, 45), classes)
        ref = labels_from_probs(resize(maps.float(), (37, 45)), classes)
        assert out.dtype == torch.int64 and out.device == maps.device and out.shape == (37, 45)
        assert torch.equal(out, ref)
        # docs/method.md's resize in float64 (the oracle's), also when shrinking or keeping the size
        for size in [(37, 45), (4, 5), (6, 7), (1, 1)]:
            expected = classes.cpu().numpy()[np.argmax(oracle.resize_bilinear(maps.cpu().numpy(), size), 0)]
            np.testing.assert_array_equal(upsample_argmax(maps, size, classes).cpu().numpy(), expected)
    tie = torch.stack([torch.ones(3, 3), torch.ones(3, 3)]).double()  # equal maps: channel 0 wins
    assert (upsample_argmax(tie, (5, 5), torch.tensor([4, 7])) == 4).all()


def test_majority_pool_same_for_uint8_and_int64_masks(device):
    rng = np.random.default_rng(3)
    mask = rng.choice([0, 1, 7, 255], size=(45, 61), p=[0.4, 0.3, 0.2, 0.1]).astype(np.uint8)
    as_u8 = majority_pool(torch.from_numpy(mask).to(device), (7, 9))
    as_i64 = majority_pool(torch.from_numpy(mask).long().to(device), (7, 9))
    assert as_u8.dtype == torch.int64 and torch.equal(as_u8, as_i64)


def test_upsample_argmax_batch_equals_one_by_one(device):
    from dhr_cli.kernels.upsample import upsample_argmax, upsample_argmax_batch

    g = torch.Generator().manual_seed(2)
    maps = torch.rand(3, 4, 9, 11, generator=g, dtype=torch.float64).to(device)
    classes = torch.tensor([[0, 2, 5, 7], [0, 1, 3, 9], [1, 2, 3, 4]], device=device)
    out = upsample_argmax_batch(maps, (50, 61), classes)
    for i in range(3):
        assert torch.equal(out[i], upsample_argmax(maps[i], (50, 61), classes[i]))


def test_first_argmax_ties_go_to_the_lowest_index():
    from dhr_cli.kernels.upsample import first_argmax

    x = torch.tensor([[1.0, 0.0, 2.0], [1.0, 3.0, 2.0], [0.5, 3.0, 2.0]])
    assert first_argmax(x).tolist() == [0, 1, 0]
    r = torch.rand(5, 7, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first_argmax(r), r.argmax(0))
    assert torch.equal(first_argmax(r.round()), r.round().max(0).indices)  # many ties: still the first maximum


def test_cells_pooled_by_a_loader_give_the_same_masks():
    """A loader process may pool the seed (Step 2.1) and hand the cells over with the item."""
    from dhr_cli.kernels.propagate import pooled_cells

    rng = np.random.default_rng(4)
    items, given = [], []
    for h, w, g in [(30, 40, (4, 5)), (25, 33, (6, 7))]:
        seed = torch.from_numpy(rng.choice([0, 2, 4, 255], size=(h, w), p=[0.5, 0.2, 0.2, 0.1]).astype(np.uint8))
        uss, wss = torch.randn(8, *g, dtype=torch.float64), [torch.randn(5, g[0] + 1, g[1], dtype=torch.float64)]
        items.append(PropagateItem(seed=seed, uss=uss, wss=wss, labels=[2, 4]))
        given.append(PropagateItem(seed=seed, uss=uss, wss=wss, labels=[2, 4]))
        given[-1].cells = pooled_cells(items[-1])
        assert torch.equal(given[-1].cells, majority_pool(seed, g).flatten())
    cfg = PropagateConfig(use_crf=False, tau=-1.0)
    for a, b in zip(propagate_items(items, cfg), propagate_items(given, cfg)):
        assert torch.equal(a, b)


def test_crf_padded_splits_portrait_and_landscape():
    """Portrait and landscape images are never padded into one square batch; results keep their order."""
    from dhr_cli.kernels.seed import crf_padded

    calls = []

    def fake_crf(img, probs, channel_valid, pixel_valid):
        calls.append(tuple(img.shape[-2:]))
        return probs * 2

    shapes = [(2, 4, 6), (3, 6, 4), (2, 5, 6), (2, 6, 3)]
    probs = [torch.rand(s) for s in shapes]
    images = [torch.rand(3, h, w) for _, h, w in shapes]
    out = crf_padded(fake_crf, images, probs)
    assert sorted(calls) == [(5, 6), (6, 4)]  # landscape group padded to 5x6, portrait to 6x4
    for p, o in zip(probs, out):
        assert o.shape == p.shape and torch.equal(o, p * 2)
