"""Metric values: hand-computed cases, an independent per-class implementation, invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dhr_cli.errors import ShapeError
from dhr_cli.kernels.metrics import (
    ConfusionMatrix,
    class_scores,
    confusion_matrix,
    fold_joint,
    joint_histogram,
    mean_over_present,
    vanishing_pairs,
)


def reference_scores(target: np.ndarray, pred: np.ndarray, k: int, ignore: int = 255):
    """Independent, torchmetrics-style formula: boolean masks per class, no confusion matrix.

    Valid pixels: GT in [0, k) and != ignore. Per class: TP = |gt==c & pred==c|,
    T = |gt==c|, P = |pred==c| (on valid pixels), U = T + P - TP.
    """
    t = target.astype(np.int64).ravel()
    p = pred.astype(np.int64).ravel()
    valid = (t >= 0) & (t < k) & (t != ignore)
    t, p = t[valid], p[valid]
    iou, fpr, fnr = [], [], []
    for c in range(k):
        tp = float(np.sum((t == c) & (p == c)))
        tt = float(np.sum(t == c))
        pp = float(np.sum(p == c))
        u = tt + pp - tp
        iou.append(tp / u if u else np.nan)
        fpr.append((pp - tp) / u if u else np.nan)
        fnr.append((tt - tp) / u if u else np.nan)
    return np.array(iou), np.array(fpr), np.array(fnr)


def test_hand_computed_2x3_case():
    # GT:   0 1 1      pred: 0 1 0
    #       255 1 0          1 255 0
    # Valid pixels: 5 (the 255 GT pixel is dropped, its prediction 1 is not counted).
    # class 0: GT at (0,0),(1,2); pred 0 at (0,0),(0,2),(1,2) -> TP 2, T 2, P 3, U 3
    # class 1: GT at (0,1),(0,2),(1,1); pred 1 at (0,1) only ((1,1) is 255) -> TP 1, T 3, P 1, U 3
    t = np.array([[0, 1, 1], [255, 1, 0]], np.uint8)
    p = np.array([[0, 1, 0], [1, 255, 0]], np.uint8)
    counts = confusion_matrix(t, p, 2)
    assert counts.tolist() == [[2, 0, 0], [1, 1, 1]]
    s = class_scores(counts)
    np.testing.assert_allclose(s.iou, [2 / 3, 1 / 3])
    np.testing.assert_allclose(s.fpr, [1 / 3, 0.0])
    np.testing.assert_allclose(s.fnr, [0.0, 2 / 3])
    cm = ConfusionMatrix(2)
    cm.update(t, p)
    assert cm.miou == pytest.approx(0.5)
    assert cm.mfpr == pytest.approx(1 / 6)
    assert cm.mfnr == pytest.approx(1 / 3)
    assert cm.pixel_accuracy == pytest.approx(3 / 5)


def test_absent_class_is_nan_and_left_out_of_the_mean():
    t = np.array([[0, 0, 1, 1]], np.uint8)
    p = np.array([[0, 0, 1, 0]], np.uint8)
    s = class_scores(confusion_matrix(t, p, 4))  # classes 2 and 3 appear nowhere
    assert np.isnan(s.iou[2:]).all() and np.isnan(s.fpr[2:]).all() and np.isnan(s.fnr[2:]).all()
    assert s.present.tolist() == [True, True, False, False]
    # class 0: TP 2, U 3 -> 2/3; class 1: TP 1, U 2 -> 1/2
    assert mean_over_present(s.iou) == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_class_only_predicted_counts_in_the_mean():
    t = np.zeros((2, 2), np.uint8)
    p = np.array([[0, 2], [0, 0]], np.uint8)
    s = class_scores(confusion_matrix(t, p, 3))
    assert s.iou[2] == 0.0 and s.fpr[2] == 1.0 and s.fnr[2] == 0.0
    assert np.isnan(s.iou[1])
    assert mean_over_present(s.iou) == pytest.approx((3 / 4 + 0.0) / 2)


def test_ignore_and_out_of_range_gt_are_dropped_and_bad_pred_is_false_negative():
    t = np.array([[255, 7, 1, 1]], np.uint8)  # 7 is outside 2 classes: dropped like 255
    p = np.array([[1, 1, 9, 255]], np.uint8)  # 9 and 255 on labelled pixels: no class
    counts = confusion_matrix(t, p, 2)
    assert counts.tolist() == [[0, 0, 0], [0, 0, 2]]
    s = class_scores(counts)
    assert s.iou[1] == 0.0 and s.fnr[1] == 1.0 and s.pred[1] == 0


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(1, 6),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference_and_sums_to_one(k, h, w, seed):
    rng = np.random.default_rng(seed)
    values = np.r_[np.arange(k + 2), 255]  # in range, out of range, ignore
    t = rng.choice(values, size=(h, w)).astype(np.uint8)
    p = rng.choice(values, size=(h, w)).astype(np.uint8)
    s = class_scores(confusion_matrix(t, p, k))
    iou, fpr, fnr = reference_scores(t, p, k)
    np.testing.assert_allclose(s.iou, iou, equal_nan=True)
    np.testing.assert_allclose(s.fpr, fpr, equal_nan=True)
    np.testing.assert_allclose(s.fnr, fnr, equal_nan=True)
    ok = s.present
    np.testing.assert_allclose((s.iou + s.fpr + s.fnr)[ok], 1.0)
    # int64 path (no uint8 fast path) gives the same counts
    np.testing.assert_array_equal(confusion_matrix(t.astype(np.int64), p.astype(np.int32), k), confusion_matrix(t, p, k))


def test_accumulation_equals_concatenation_and_batch():
    rng = np.random.default_rng(0)
    ts = [rng.integers(0, 5, (6, 7)).astype(np.uint8) for _ in range(4)]
    ps = [rng.integers(0, 5, (6, 7)).astype(np.uint8) for _ in range(4)]
    ts[0][0] = 255
    cm = ConfusionMatrix(4)
    for t, p in zip(ts, ps):
        cm.update(t, p)
    whole = confusion_matrix(np.concatenate(ts), np.concatenate(ps), 4)
    batch = confusion_matrix(np.stack(ts), np.stack(ps), 4)
    np.testing.assert_array_equal(cm.counts, whole)
    np.testing.assert_array_equal(batch, whole)
    # the split-level mIoU is NOT the mean of per-image mIoUs (counts are pooled first)
    iou, _, _ = reference_scores(np.concatenate(ts), np.concatenate(ps), 4)
    assert cm.miou == pytest.approx(np.nanmean(iou))


def test_torch_matches_numpy_and_follows_device(device):
    rng = np.random.default_rng(1)
    t = rng.choice([0, 1, 2, 3, 255], size=(2, 5, 6)).astype(np.uint8)
    p = rng.choice([0, 1, 2, 9, 255], size=(2, 5, 6)).astype(np.uint8)
    out = confusion_matrix(torch.from_numpy(t).to(device), torch.from_numpy(p).to(device), 4)
    assert out.device.type == device.type and out.dtype == torch.int64
    np.testing.assert_array_equal(out.cpu().numpy(), confusion_matrix(t, p, 4))
    cm = ConfusionMatrix(4)
    cm.update(torch.from_numpy(t).to(device), torch.from_numpy(p).to(device))
    np.testing.assert_array_equal(cm.counts, confusion_matrix(t, p, 4))


def test_shape_guards():
    with pytest.raises(ShapeError, match="same shape"):
        confusion_matrix(np.zeros((2, 3), np.uint8), np.zeros((3, 2), np.uint8), 2)
    with pytest.raises(ShapeError, match=r"\(K, K \+ 1\)"):
        class_scores(np.zeros((3, 3), np.int64))


def test_vanishing_pairs():
    # classes: 0 background, 1, 2, 3. GT holds 1 and 2; prediction has 1 but no 2 -> one of two pairs vanished.
    t = np.array([[0, 1, 2, 2]], np.uint8)
    p = np.array([[0, 1, 0, 3]], np.uint8)
    fg = np.array([False, True, True, True])
    assert vanishing_pairs(confusion_matrix(t, p, 4), fg) == (1, 2)
    # background never counts, even when it vanishes
    assert vanishing_pairs(confusion_matrix(np.zeros((1, 2), np.uint8), np.ones((1, 2), np.uint8), 4), fg) == (0, 0)


def _brute_joint(t: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Independent count: one unbuffered increment per pixel."""
    ref = np.zeros((256, 256), np.int64)
    np.add.at(ref, (t.ravel().astype(np.int64), p.ravel().astype(np.int64)), 1)
    return ref


def _blocky(rng, h: int, w: int, values) -> np.ndarray:
    """A mask of a few rectangles (long runs: the run-length path of joint_histogram)."""
    m = np.full((h, w), rng.choice(values), np.uint8)
    for _ in range(rng.integers(1, 6)):
        y, x = rng.integers(0, h), rng.integers(0, w)
        m[y:y + rng.integers(1, h + 1), x:x + rng.integers(1, w + 1)] = rng.choice(values)
    return m


@pytest.mark.parametrize("seed", range(6))
def test_joint_histogram_matches_a_per_pixel_count(seed):
    rng = np.random.default_rng(seed)
    values = np.r_[np.arange(8), 200, 254, 255]
    h, w = int(rng.integers(20, 90)), int(rng.integers(20, 90))
    t = _blocky(rng, h, w, values)
    p = _blocky(rng, h, w, values)
    p[::7, ::5] = rng.choice(values)  # a grid of short runs, as bench/scale.py's predictions
    noise = rng.choice(values, size=(h, w)).astype(np.uint8)  # runs of ~1 pixel: the direct path
    for a, b in ((t, p), (t, noise), (noise, t), (t, t), (t[:, ::3], p[:, ::3]), (np.stack([t, p]), np.stack([p, noise]))):
        got = joint_histogram(a, b)
        assert got.dtype == np.int64 and got.shape == (256, 256)
        np.testing.assert_array_equal(got, _brute_joint(a, b))
        k = int(rng.integers(1, 10))
        np.testing.assert_array_equal(fold_joint(got, k), confusion_matrix(a.astype(np.int64), b.astype(np.int64), k))


def test_joint_histogram_edges():
    one = np.array([[3]], np.uint8)
    assert joint_histogram(one, one)[3, 3] == 1 and joint_histogram(one, one).sum() == 1
    empty = np.zeros((0, 5), np.uint8)
    assert joint_histogram(empty, empty).sum() == 0
    flat = np.full((480, 640), 7, np.uint8)  # one run
    assert joint_histogram(flat, np.zeros_like(flat))[7, 0] == 480 * 640
    with pytest.raises(ShapeError):
        joint_histogram(flat, flat[:10])
    with pytest.raises(ShapeError):
        joint_histogram(flat.astype(np.int32), flat)
