"""Mean-field dense CRF kernel (dhr_cli.kernels.crf.dense_crf): invariants, padding, behaviour."""

from __future__ import annotations

import pytest
import torch

from dhr_cli.config import CRFConfig
from dhr_cli.errors import ShapeError
from dhr_cli.kernels.crf import dense_crf

CFG = CRFConfig(max_side=24)
BACKENDS = ["permutohedral", "exact"]


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


# ------------------------------------------------------------------------------------------
# exact reference: brute-force dense mean field, float64, full N x N kernels (pydensecrf's model)

def _reference(img: torch.Tensor, probs: torch.Tensor, cfg: CRFConfig) -> torch.Tensor:
    """img (3, H, W) 0..255, probs (L, H, W) -> (L, H, W); Potts, NORMALIZE_SYMMETRIC, self pairs in."""
    n_lab, h, w = probs.shape
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    pos = torch.stack([xx, yy], -1).reshape(-1, 2)
    col = img.double().reshape(3, -1).T
    d2p = torch.cdist(pos, pos) ** 2
    kg = torch.exp(-d2p / (2 * cfg.gauss_sxy**2))
    kb = torch.exp(-d2p / (2 * cfg.bilateral_sxy**2) - torch.cdist(col, col) ** 2 / (2 * cfg.bilateral_srgb**2))
    kernels = []
    for k, compat in ((kg, cfg.gauss_compat), (kb, cfg.bilateral_compat)):
        dn = k.sum(1).rsqrt()
        kernels.append(compat * dn[:, None] * k * dn[None, :])
    u = -torch.log(probs.double().reshape(n_lab, -1).T.clamp(1e-5, 1.0))
    q = torch.softmax(-u, 1)
    for _ in range(cfg.n_iter):
        q = torch.softmax(-u + sum(k @ q for k in kernels), 1)
    return q.T.reshape(n_lab, h, w)


def _blob_inputs(h=18, w=22, n_lab=3, seed=0):
    """Smooth colour blobs with pixel noise and smoothed noisy label maps (realistic, not one-hot)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.interpolate(torch.rand(1, 3, 3, 4, generator=g) * 255, size=(h, w), mode="bilinear")
    img = (img + 6 * torch.randn(1, 3, h, w, generator=g)).clamp(0, 255).round()
    coarse = torch.nn.functional.interpolate(2.5 * torch.randn(1, n_lab, 3, 4, generator=g), size=(h, w), mode="bilinear")
    probs = torch.softmax(coarse + 0.8 * torch.randn(1, n_lab, h, w, generator=g), 1)
    return img, probs


# tiny images: spatial parameters scaled down so that the bilateral term matters over ~20 px
REF_CFGS = [CRFConfig(max_side=0, bilateral_sxy=6.0, bilateral_srgb=12.0),
            CRFConfig(max_side=0)]  # the authors' parameters


@pytest.mark.parametrize("ci", range(len(REF_CFGS)))
def test_exact_backend_full_resolution_equals_reference(device, ci):
    cfg = CRFConfig(**{**vars(REF_CFGS[ci]), "backend": "exact"})
    img, probs = _blob_inputs(seed=ci)
    ref = _reference(img[0], probs[0], cfg)
    out = dense_crf(img.double().to(device), probs.double().to(device), cfg)[0].cpu()
    # only difference: bilateral entries below KEEP = 1e-4 are dropped (sparse kernel)
    assert (out - ref).abs().max() < 2e-3


@pytest.mark.parametrize("ci", range(len(REF_CFGS)))
def test_permutohedral_full_resolution_close_to_reference(device, ci):
    cfg = REF_CFGS[ci]
    img, probs = _blob_inputs(seed=ci)
    ref = _reference(img[0], probs[0], cfg)
    out = dense_crf(img.to(device), probs.to(device), cfg)[0].double().cpu()
    # the lattice approximates the bilateral Gaussian (as pydensecrf's does): distributions
    # differ by a few percent, labels almost never
    assert (out - ref).abs().mean() < 0.02
    assert (out.argmax(0) == ref.argmax(0)).double().mean() > 0.97


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduced_grid_close_to_reference(device, backend):
    cfg = CRFConfig(max_side=0, bilateral_sxy=6.0, bilateral_srgb=12.0)
    img, probs = _blob_inputs(36, 44, seed=5)
    ref = _reference(img[0], probs[0], cfg)
    low = dense_crf(img.to(device), probs.to(device), CRFConfig(**{**vars(cfg), "max_side": 22, "backend": backend}))
    # a 2x coarser grid loses boundary detail: agreement with the exact field is bounded, not exact
    assert (low[0].double().cpu().argmax(0) == ref.argmax(0)).double().mean() > 0.9


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_batch_equals_loop_both_backends(device, backend):
    cfg = CRFConfig(max_side=0, bilateral_sxy=6.0, bilateral_srgb=12.0, backend=backend)
    items = [_blob_inputs(14, 18, 3, seed=1), _blob_inputs(18, 12, 2, seed=2)]
    img = torch.zeros(2, 3, 18, 18)
    pr = torch.zeros(2, 3, 18, 18)
    cv = torch.zeros(2, 3, dtype=torch.bool)
    pv = torch.zeros(2, 18, 18, dtype=torch.bool)
    for k, (i, p) in enumerate(items):
        h, w = i.shape[2:]
        img[k, :, :h, :w], pr[k, : p.shape[1], :h, :w] = i[0], p[0]
        cv[k, : p.shape[1]], pv[k, :h, :w] = True, True
    pr[:, 0][~pv] = 1.0
    out = dense_crf(img.to(device), pr.to(device), cfg, channel_valid=cv.to(device), pixel_valid=pv.to(device)).cpu()
    for k, (i, p) in enumerate(items):
        h, w = i.shape[2:]
        ref = _reference(i[0], p[0], cfg)
        single = dense_crf(i.to(device), p.to(device), cfg)[0].cpu()
        torch.testing.assert_close(out[k, : p.shape[1], :h, :w], single, atol=1e-5, rtol=1e-4)
        tol = 2e-3 if backend == "exact" else 0.04  # lattice approximation (see above)
        assert (single.double() - ref).abs().mean() < tol


def test_lattice_filter_approximates_gaussian():
    from dhr_cli.kernels.permutohedral import Lattice

    g = torch.Generator().manual_seed(0)
    f = torch.rand(300, 5, generator=g, dtype=torch.float64) * 3
    v = torch.rand(300, 2, generator=g, dtype=torch.float64)
    out = Lattice(f).filter(v)
    ex = torch.exp(-0.5 * torch.cdist(f, f) ** 2) @ v
    ratio = out / ex  # a constant scale (cancelled by the CRF's normalisation) up to the approximation
    assert ratio.std() / ratio.mean() < 0.25
    # groups never share vertices: two copies filtered together equal one filtered alone
    grp = torch.cat([torch.zeros(300, dtype=torch.int64), torch.ones(300, dtype=torch.int64)])
    both = Lattice(torch.cat([f, f]), grp).filter(torch.cat([v, v]))
    torch.testing.assert_close(both[:300], out)
    torch.testing.assert_close(both[300:], out)


def test_lattice_fused_blur_equals_gather_blur():
    # wide values take the embedding_bag blur (bags [v, v, prev, next], scale folded into the
    # slice), narrow ones the gather blur: the same filter, also through weights and a layout
    from dhr_cli.kernels.permutohedral import FUSED_MIN_COLUMNS, Lattice, LatticeFilter

    g = torch.Generator().manual_seed(1)
    f = torch.rand(400, 5, generator=g, dtype=torch.float64) * 3
    v = torch.rand(500, FUSED_MIN_COLUMNS, generator=g, dtype=torch.float64)
    wts = torch.rand(400, generator=g, dtype=torch.float64) + 0.5
    index = torch.randperm(500, generator=g)[:400]
    lat = Lattice(f)
    fused = LatticeFilter(lat, wts, 2.5, index=index, size=500, columns=v.shape[1])
    gather = LatticeFilter(lat, wts, 2.5, index=index, size=500, columns=1)
    assert fused.fused and not gather.fused
    out = fused(v)
    torch.testing.assert_close(out, gather(v))
    # rows without a point get 0; a point's output is its weight times the plain filter of the
    # weighted values placed at its row
    missing = torch.ones(500, dtype=torch.bool)
    missing[index] = False
    assert out[missing].abs().max() == 0
    plain = lat.filter(v[index] * wts[:, None]) * wts[:, None] * 2.5
    torch.testing.assert_close(out[index], plain)


# ------------------------------------------------------------------------------------------
# pydensecrf2 (the authors' pydensecrf, rebuilt) on real photographs, authors' parameters

def _photo_inputs(name: str, n_lab: int, seed: int, size=(200, 150)):
    skimage_data = pytest.importorskip("skimage.data")
    import numpy as np
    from PIL import Image

    a = getattr(skimage_data, name)()
    a = np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]
    a = np.ascontiguousarray(np.array(Image.fromarray(a).resize(size, Image.BILINEAR)))
    img = torch.from_numpy(a).permute(2, 0, 1).float()[None]
    # a noisy label map from colour quantisation, smoothed at 1/8 and softened: a CAM-like unary
    h, w = a.shape[:2]
    g = torch.Generator().manual_seed(seed)
    lab = (img[0].mean(0) / 256 * n_lab).long().clamp_max(n_lab - 1)
    oh = torch.nn.functional.one_hot(lab, n_lab).permute(2, 0, 1)[None].float()
    sm = torch.nn.functional.interpolate(torch.nn.functional.adaptive_avg_pool2d(oh, (h // 8, w // 8)), size=(h, w),
                                         mode="bilinear", align_corners=False)
    probs = torch.softmax(3 * sm + 0.7 * torch.randn(1, n_lab, h, w, generator=g), 1)
    return a, img, probs


def _pydensecrf(a, probs, cfg: CRFConfig):
    dcrf = pytest.importorskip("pydensecrf.densecrf")
    import numpy as np
    from pydensecrf.utils import unary_from_softmax

    p = probs[0].numpy()
    n_lab, h, w = p.shape
    d = dcrf.DenseCRF2D(w, h, n_lab)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(p)))
    d.addPairwiseGaussian(sxy=cfg.gauss_sxy, compat=cfg.gauss_compat)
    d.addPairwiseBilateral(sxy=cfg.bilateral_sxy, srgb=cfg.bilateral_srgb, rgbim=a, compat=cfg.bilateral_compat)
    return torch.from_numpy(np.array(d.inference(cfg.n_iter)).reshape(n_lab, h, w))


@pytest.mark.parametrize("name,n_lab", [("astronaut", 3), ("chelsea", 5), ("coffee", 9)])  # 9: fused blur
def test_matches_pydensecrf2_on_photos(device, name, n_lab):
    cfg = CRFConfig(max_side=0)  # authors' parameters, full resolution, 10 iterations
    a, img, probs = _photo_inputs(name, n_lab, seed=n_lab)
    ref = _pydensecrf(a, probs, cfg)
    out = dense_crf(img.to(device), probs.to(device), cfg)[0].cpu()
    changed = (ref.argmax(0) != probs[0].argmax(0)).float().mean()
    assert changed > 0.02  # the CRF does real work on these inputs
    # same lattice as pydensecrf; only the Gaussian term is exact here (pydensecrf: lattice)
    assert (out.argmax(0) == ref.argmax(0)).float().mean() > 0.995
    assert (out - ref).abs().mean() < 2e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduced_grid_agrees_with_pydensecrf2(device, backend):
    cfg = CRFConfig(max_side=0)
    a, img, probs = _photo_inputs("coffee", 3, seed=1)
    ref = _pydensecrf(a, probs, cfg)
    out = dense_crf(img.to(device), probs.to(device), CRFConfig(max_side=64, backend=backend))[0].cpu()
    # a 64-px grid (3x coarser) smooths boundaries: a bounded, measured loss (bench/crf.py)
    assert (out.argmax(0) == ref.argmax(0)).float().mean() > 0.93


def test_crf_cli_options_build_the_config():
    from typer.testing import CliRunner

    from dhr_cli.cli import app
    from dhr_cli.cli.options import CrfBackend, CrfPreset, crf_config

    cfg = crf_config(CrfPreset.authors, None, None)
    assert (cfg.max_side, cfg.n_iter, cfg.bilateral_sxy, cfg.bilateral_srgb) == (0, 10, 67.0, 3.0)
    assert crf_config(None, 96, CrfBackend.exact) == CRFConfig(max_side=96, backend="exact")
    # each command's own default CRF is the base (propagate's grid is finer than Step 1's); a preset replaces it
    from dhr_cli.config import PROPAGATE_CRF_MAX_SIDE, PropagateConfig, SeedConfig

    prop = PropagateConfig().crf
    assert prop.max_side == PROPAGATE_CRF_MAX_SIDE and SeedConfig().crf == CRFConfig()
    assert (prop.bilateral_srgb, prop.bilateral_compat) == (10.0, 8.0)  # propagate's own colour kernel
    assert crf_config(None, None, None, base=prop) == prop
    assert crf_config(None, 48, None, base=prop) == CRFConfig(max_side=48, bilateral_srgb=10.0, bilateral_compat=8.0)
    assert crf_config(CrfPreset.authors, None, None, base=prop).max_side == 0
    res = CliRunner().invoke(app, ["seed", "--cams", "x.h5", "--data", ".", "--out", "y.h5", "--crf-preset", "bogus"])
    assert res.exit_code == 2 and "Traceback" not in res.output
