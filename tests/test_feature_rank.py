"""`dhr cams --feature-rank`: features stored on each image's top singular vectors.

The reference is numpy's exact SVD: the stored coordinates must reproduce the rank-k truncation's
inner products between cells (what Steps 2-3 use), exactly when the map has rank <= k.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dhr_cli.cli import app
from dhr_cli.io.store import open_store
from dhr_cli.kernels.features import low_rank_features
from dhr_cli.testing.synthetic import make_dataset


def _gram(f: np.ndarray) -> np.ndarray:
    x = f.reshape(f.shape[0], -1).astype(np.float64)
    return x.T @ x


def _truncated_gram(f: np.ndarray, k: int) -> np.ndarray:
    x = f.reshape(f.shape[0], -1).astype(np.float64)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    xk = (u[:, :k] * s[:k]) @ vt[:k]
    return xk.T @ xk


def test_exact_for_a_low_rank_map():
    g = torch.Generator().manual_seed(0)
    f = (torch.randn(64, 5, generator=g) @ torch.randn(5, 6 * 7, generator=g)).reshape(64, 6, 7)
    out = low_rank_features(f, 8)
    assert out.shape == (8, 6, 7)
    np.testing.assert_allclose(_gram(out.numpy()), _gram(f.numpy()), rtol=1e-4, atol=1e-3)


def test_matches_the_exact_truncated_svd_and_is_deterministic():
    g = torch.Generator().manual_seed(1)
    # a decaying spectrum, as real features have (random ReLU features hold ~99 % of their energy in 64 of 3072)
    basis = torch.linalg.qr(torch.randn(96, 96, generator=g))[0]
    f = (basis * (0.7 ** torch.arange(96.0))) @ torch.randn(96, 9 * 11, generator=g)
    f = f.reshape(96, 9, 11)
    k = 12
    torch.manual_seed(123)
    a = low_rank_features(f, k)
    torch.manual_seed(456)  # the global RNG state must not matter
    b = low_rank_features(f, k)
    assert torch.equal(a, b)
    ref = _truncated_gram(f.numpy(), k)
    scale = np.abs(_gram(f.numpy())).max()
    assert np.abs(_gram(a.numpy()) - ref).max() < 1e-4 * scale
    # and rank k really is a truncation: fewer dimensions lose more
    worse = _gram(low_rank_features(f, k // 2).numpy())
    assert np.abs(worse - _gram(f.numpy())).max() > 10 * np.abs(_gram(a.numpy()) - _gram(f.numpy())).max()


def test_few_channels_are_kept_as_they_are():
    f = torch.randn(6, 4, 5)
    assert low_rank_features(f, 8) is f
    with pytest.raises(ValueError):
        low_rank_features(torch.randn(4, 5), 2)


def test_cams_store_with_feature_rank(tmp_path):
    from dhr_cli.models.mctformer import MCTformerV2

    data = make_dataset(tmp_path / "d", n_images=4, stores=False)
    from dhr_cli.io.datasets import open_dataset

    fg = open_dataset(data, "train").classes[1:]
    torch.manual_seed(2)
    net = MCTformerV2(len(fg), embed_dim=64, depth=2, num_heads=1, patch_size=16, img_size=32)
    torch.save({"model": net.state_dict()}, tmp_path / "mct.pth")
    runner = CliRunner()
    stores = {}
    for k in (0, 16):
        out = tmp_path / f"cams{k}.h5"
        r = runner.invoke(app, [str(a) for a in ("cams", "--data", data, "--split", "train", "--wss", "mctformer",
                                                 "--wss-weights", tmp_path / "mct.pth", "--scales", "1.0",
                                                 "--dtype", "float32", "--feature-rank", k, "--out", out, "--quiet")])
        assert r.exit_code == 0, r.output
        stores[k] = out
    with open_store(stores[0]) as full, open_store(stores[16]) as low:
        assert low.provenance["options"]["feature_rank"] == 16
        for i in full.ids:
            f, lo = full.read(i), low.read(i)
            np.testing.assert_array_equal(f.cams, lo.cams)  # CAMs untouched
            assert lo.features.shape == (16, *f.features.shape[1:])
            ref = _truncated_gram(f.features, 16)
            assert np.abs(_gram(lo.features) - ref).max() < 1e-3 * np.abs(ref).max()
