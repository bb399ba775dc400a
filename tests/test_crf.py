"""Mean-field dense CRF kernel (dhr_cli.kernels.crf.dense_crf): invariants, padding, behaviour."""

from __future__ import annotations

import pytest
import torch

from dhr_cli.config import CRFConfig
from dhr_cli.errors import ShapeError
from dhr_cli.kernels.crf import dense_crf

CFG = CRFConfig(max_side=24)


def _inputs(b=2, n_lab=3, h=20, w=28, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(b, 3, h, w, generator=g) * 255
    probs = torch.softmax(3 * torch.randn(b, n_lab, h, w, generator=g), 1)
    return img.to(device), probs.to(device)


def test_sums_to_one_and_padded_channels_zero(device):
    img, probs = _inputs(device=device)
    cv = torch.tensor([[True, True, True], [True, True, False]], device=device)
    probs[1, 2] = 0.4
    out = dense_crf(img, probs, CFG, channel_valid=cv)
    assert out.shape == probs.shape
    assert torch.all(out[1, 2] == 0)
    assert torch.allclose(out.sum(1), torch.ones_like(out[:, 0]), atol=1e-5)
    assert torch.all(out >= 0)


def test_padded_batch_equals_loop(device):
    sizes = [(20, 28, 3), (16, 36, 2), (30, 18, 3)]
    imgs, probs = [], []
    for k, (h, w, n_lab) in enumerate(sizes):
        i, p = _inputs(1, n_lab, h, w, seed=k, device=device)
        imgs.append(i[0])
        probs.append(p[0])
    hm, wm, lm = (max(s[d] for s in sizes) for d in range(3))
    img = torch.zeros(3, 3, hm, wm, device=device)
    pr = torch.zeros(3, lm, hm, wm, device=device)
    cv = torch.zeros(3, lm, dtype=torch.bool, device=device)
    pv = torch.zeros(3, hm, wm, dtype=torch.bool, device=device)
    for k, (h, w, n_lab) in enumerate(sizes):
        img[k, :, :h, :w] = imgs[k]
        pr[k, :n_lab, :h, :w] = probs[k]
        cv[k, :n_lab] = True
        pv[k, :h, :w] = True
    pr[:, 0][~pv] = 1.0
    out = dense_crf(img, pr, CFG, channel_valid=cv, pixel_valid=pv)
    for k, (h, w, n_lab) in enumerate(sizes):
        single = dense_crf(imgs[k][None], probs[k][None], CFG)[0]
        torch.testing.assert_close(out[k, :n_lab, :h, :w], single, atol=1e-5, rtol=1e-4)
        assert torch.all(out[k, n_lab:] == 0)
        # padded pixels keep their input
        torch.testing.assert_close(out[k, :, h:, :], pr[k, :, h:, :])
        torch.testing.assert_close(out[k, :, :, w:], pr[k, :, :, w:])


def test_padded_pixels_do_not_influence_valid_ones(device):
    img, probs = _inputs(1, 3, 24, 24, device=device)
    pv = torch.ones(1, 24, 24, dtype=torch.bool, device=device)
    pv[0, 5:12, 6:14] = False  # a hole inside the image
    a = dense_crf(img, probs, CFG, pixel_valid=pv)
    img2, probs2 = img.clone(), probs.clone()
    img2[0, :, 5:12, 6:14] = 0.0
    probs2[0, :, 5:12, 6:14] = torch.tensor([0.0, 0.0, 1.0], device=device)[:, None, None]
    b = dense_crf(img2, probs2, CFG, pixel_valid=pv)
    torch.testing.assert_close(a[0][:, pv[0]], b[0][:, pv[0]], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b[0][:, ~pv[0]], probs2[0][:, ~pv[0]])


def test_zero_iterations_returns_renormalised_input(device):
    img, probs = _inputs(device=device)
    scaled = probs * 3.0
    out = dense_crf(img, scaled, CRFConfig(n_iter=0, max_side=24))
    torch.testing.assert_close(out, probs, atol=2e-5, rtol=1e-4)


def test_noisy_pixel_in_uniform_region_flips(device):
    h = w = 32
    img = torch.zeros(1, 3, h, w, device=device)
    img[0, :, :, : w // 2] = torch.tensor([200.0, 30.0, 30.0], device=device)[:, None, None]
    img[0, :, :, w // 2:] = torch.tensor([30.0, 30.0, 200.0], device=device)[:, None, None]
    probs = torch.zeros(1, 2, h, w, device=device)
    probs[0, 0, :, : w // 2], probs[0, 1, :, : w // 2] = 0.8, 0.2
    probs[0, 0, :, w // 2:], probs[0, 1, :, w // 2:] = 0.2, 0.8
    probs[0, :, 10, 5] = torch.tensor([0.35, 0.65], device=device)  # noise in the left region
    out = dense_crf(img, probs, CRFConfig(max_side=32))
    assert probs[0, :, 10, 5].argmax() == 1
    assert out[0, :, 10, 5].argmax() == 0
    # without the CRF it would not: the same call with n_iter=0 keeps the noise
    assert dense_crf(img, probs, CRFConfig(n_iter=0))[0, :, 10, 5].argmax() == 1


def test_colour_edge_keeps_labels_apart(device):
    h, w = 24, 32
    img = torch.zeros(1, 3, h, w, device=device)
    img[0, :, :, 16:] = 255.0  # black | white
    probs = torch.zeros(1, 2, h, w, device=device)
    probs[0, 0, :, :16], probs[0, 1, :, :16] = 0.9, 0.1
    probs[0, 0, :, 16:], probs[0, 1, :, 16:] = 0.1, 0.9
    out = dense_crf(img, probs, CRFConfig(max_side=32))
    labels = out[0].argmax(0)
    assert torch.all(labels[:, :16] == 0) and torch.all(labels[:, 16:] == 1)
    # the CRF makes each side more confident, not less
    assert out[0, 0, :, :16].min() > 0.9 and out[0, 1, :, 16:].min() > 0.9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_device_follow_input(device, dtype):
    img, probs = _inputs(1, 3, 16, 20, device=device)
    out = dense_crf(img.to(dtype), probs.to(dtype), CFG)
    assert out.dtype == dtype and out.device == probs.device


def test_single_label_returns_ones(device):
    img, _ = _inputs(1, 1, 16, 20, device=device)
    probs = torch.rand(1, 1, 16, 20, device=device)
    pv = torch.ones(1, 16, 20, dtype=torch.bool, device=device)
    pv[0, :, 15:] = False
    out = dense_crf(img, probs, CFG, pixel_valid=pv)
    assert torch.all(out[0, 0][pv[0]] == 1)
    torch.testing.assert_close(out[0, 0][~pv[0]], probs[0, 0][~pv[0]])


def test_downsampled_close_to_full_resolution(device):
    # blocky image, smooth probabilities with mild pixel noise: what a CAM-based map looks like
    img, _ = _inputs(1, 3, 36, 36, seed=3, device=device)
    img = torch.nn.functional.interpolate(img[:, :, ::6, ::6], size=(36, 36), mode="nearest")
    g = torch.Generator().manual_seed(4)
    smooth = torch.nn.functional.interpolate(3 * torch.randn(1, 3, 6, 6, generator=g), size=(36, 36), mode="bilinear")
    probs = torch.softmax(smooth + 0.3 * torch.randn(1, 3, 36, 36, generator=g), 1).to(device)
    full = dense_crf(img, probs, CRFConfig(max_side=64))
    low = dense_crf(img, probs, CRFConfig(max_side=18))
    assert (full.argmax(1) == low.argmax(1)).float().mean() > 0.8


def test_bad_shapes_raise(device):
    img, probs = _inputs(device=device)
    with pytest.raises(ShapeError):
        dense_crf(img[0], probs, CFG)
    with pytest.raises(ShapeError):
        dense_crf(img[:, :2], probs, CFG)
    with pytest.raises(ShapeError):
        dense_crf(img, probs[:, :, :10], CFG)
    with pytest.raises(ShapeError):
        dense_crf(img, probs, CFG, channel_valid=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ShapeError):
        dense_crf(img, probs, CFG, pixel_valid=torch.ones(2, 20, dtype=torch.bool))
