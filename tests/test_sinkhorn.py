"""f_OT: the batched Sinkhorn against POT, against a per-problem loop, and its invariants.

The kernels take classes first, (B, N, M); the problems here are (pixels, classes) as POT and
the oracle take them, hence the transposes.
"""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch

from dhr_cli.config import SinkhornConfig
from dhr_cli.kernels.sinkhorn import f_ot, minmax_last, sinkhorn, sinkhorn_pot
from dhr_cli.testing import oracle


def _problems(seed=0, shapes=((50, 3), (17, 2), (33, 5), (8, 1))):
    rng = np.random.default_rng(seed)
    return [rng.random(s) for s in shapes]


def _t(p: np.ndarray) -> torch.Tensor:
    """One (pixels, classes) problem as a batch of one, classes first: (1, N, M)."""
    return torch.from_numpy(p.T.copy())[None]


def _pad(problems, dtype=torch.float64):
    """(pixels, classes) problems -> sim (B, N, M), pixel_valid (B, M), class_valid (B, N)."""
    m = max(p.shape[0] for p in problems)
    n = max(p.shape[1] for p in problems)
    sim = torch.zeros(len(problems), n, m, dtype=dtype)
    pv = torch.zeros(len(problems), m, dtype=torch.bool)
    cv = torch.zeros(len(problems), n, dtype=torch.bool)
    for i, p in enumerate(problems):
        sim[i, : p.shape[1], : p.shape[0]] = torch.from_numpy(p.T.copy())
        pv[i, : p.shape[0]] = True
        cv[i, : p.shape[1]] = True
    return sim, pv, cv


def test_converged_plan_equals_pot():
    for p in _problems():
        cost = 1.0 - p
        a, b = np.full(p.shape[0], 1 / p.shape[0]), np.full(p.shape[1], 1 / p.shape[1])
        ref = ot.sinkhorn(a, b, cost, 0.1, numItermax=10000, stopThr=1e-14)
        ours = sinkhorn(_t(p), eps=0.1, max_iter=10000, tol=1e-14).plan[0].numpy().T
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-12)
        pot = sinkhorn_pot(_t(p), eps=0.1).plan[0].numpy().T
        np.testing.assert_allclose(pot, ref, rtol=1e-5, atol=1e-10)


def test_padded_batch_stops_each_problem_on_its_own_rule():
    problems = _problems(1)
    sim, pv, cv = _pad(problems)
    batched = sinkhorn(sim, pixel_valid=pv, class_valid=cv)
    for i, p in enumerate(problems):
        single = sinkhorn(_t(p))
        assert int(batched.n_iter[i]) == int(single.n_iter[0])
        np.testing.assert_allclose(batched.plan[i, : p.shape[1], : p.shape[0]].numpy(), single.plan[0].numpy(), rtol=1e-12)
        assert batched.plan[i, p.shape[1]:].abs().sum() == 0 and batched.plan[i, :, p.shape[0]:].abs().sum() == 0
    assert len(set(batched.n_iter.tolist())) > 1  # the problems really stopped at different iterations


def test_authors_stopping_rule_matches_a_plain_loop():
    rng = np.random.default_rng(2)
    for m in (30, 1000):
        p = rng.random((m, 3))
        expected = oracle.f_ot(p)
        got = f_ot(_t(p))[0].numpy().T
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    # About 1000 pixels stop after two iterations, as docs/method.md says.
    assert int(sinkhorn(_t(rng.random((1000, 3)))).n_iter[0]) == 2


def test_marginals_hold_after_convergence():
    p = _problems(3)[2]
    b = np.array([0.5, 0.2, 0.1, 0.1, 0.1])
    plan = sinkhorn(_t(p), class_marginal=torch.from_numpy(b)[None], max_iter=5000, tol=1e-15).plan[0]
    np.testing.assert_allclose(plan.sum(0).numpy(), 1 / p.shape[0], rtol=1e-6)
    np.testing.assert_allclose(plan.sum(1).numpy(), b, rtol=1e-6)


def test_cosine_costs_do_not_underflow():
    sim = -torch.ones(1, 3, 2000, dtype=torch.float32)  # cost 2: K = e^-20
    sim[0, :, :10] = 1.0
    out = f_ot(sim)
    assert torch.isfinite(out).all() and out.dtype == torch.float32


def test_f_ot_range_padding_and_solver_choice():
    sim, pv, cv = _pad(_problems(4), torch.float32)
    out = f_ot(sim, pixel_valid=pv, class_valid=cv)
    assert out.min() >= 0 and out.max() <= 1 + 1e-6
    assert (out.transpose(1, 2)[~pv] == 0).all() and (out[~cv] == 0).all()
    pot = f_ot(sim, SinkhornConfig(solver="pot"), pixel_valid=pv, class_valid=cv)
    assert pot.shape == out.shape and (pot.transpose(1, 2)[~pv] == 0).all()


def test_f_ot_follows_device_and_dtype(device):
    for dtype in (torch.float32, torch.float64):
        sim = torch.rand(2, 3, 40, dtype=dtype, device=device)
        out = f_ot(sim)
        assert out.device == sim.device and out.dtype == dtype


def test_minmax_guard_and_padding():
    x = torch.ones(1, 2, 5)
    assert torch.equal(minmax_last(x), torch.zeros(1, 2, 5))  # constant rows: no NaN
    y = torch.tensor([[[0.0, 2.0, 1.0, 9.0]]])
    assert minmax_last(y[..., :3])[0, 0].tolist() == [0.0, 1.0, 0.5]
    # the padded entry (9) neither sets the range nor comes out non-zero
    assert minmax_last(y, torch.tensor([[True, True, True, False]]))[0, 0].tolist() == [0.0, 1.0, 0.5, 0.0]


def test_bad_shape():
    from dhr_cli.errors import ShapeError

    with pytest.raises(ShapeError, match=r"expected \(B, N, M\), got \(3, 2\)"):
        sinkhorn(torch.rand(3, 2))


def test_log_domain_updates_equal_the_linear_ones():
    from dhr_cli.kernels.sinkhorn import _scale_linear, _scale_log

    sim, pv, cv = _pad(_problems(5))
    log_k = torch.where(cv[:, :, None] & pv[:, None, :], -(1 - sim) / 0.1, torch.full_like(sim, -torch.inf))
    a = pv.double() / pv.sum(1, keepdim=True)
    b = cv.double() / cv.sum(1, keepdim=True)
    r, c, (n_lin, _, _) = _scale_linear(log_k.exp(), a, b, pv, cv, 100, 1e-2)
    lr, lc, (n_log, _, _) = _scale_log(log_k, a, b, pv, cv, 100, 1e-2)
    assert torch.equal(n_lin, n_log)
    np.testing.assert_allclose(lr.exp().numpy(), r.numpy(), rtol=1e-10)
    np.testing.assert_allclose(lc.exp().numpy(), c.numpy(), rtol=1e-10)


def test_tiny_eps_runs_in_the_log_domain_and_matches_pot():
    p = np.random.default_rng(6).random((20, 3))
    eps = 1e-3  # K = exp(-C / eps) reaches e^-1000: zero in float64
    with pytest.warns(RuntimeWarning, match="sinkhorn-max-iter"):
        sinkhorn(_t(p), eps=eps, max_iter=3, tol=1e-12)  # capped: says which knob to turn
    ours = sinkhorn(_t(p), eps=eps, max_iter=20000, tol=1e-13).plan[0].numpy().T
    assert np.isfinite(ours).all()
    ref = ot.sinkhorn(np.full(20, 1 / 20), np.full(3, 1 / 3), 1 - p, eps, method="sinkhorn_log", numItermax=20000,
                      stopThr=1e-13)
    np.testing.assert_allclose(ours, ref, atol=1e-8)
    np.testing.assert_allclose(ours.sum(0), 1 / 3, rtol=1e-6)


def test_f_ot_equals_the_oracle_with_masks_and_marginals():
    """Padded, masked and with class marginals, each problem's f_OT is the oracle's on it alone."""
    problems = _problems(7)
    sim, pv, cv = _pad(problems)
    marginal = torch.rand(sim.shape[0], sim.shape[1], dtype=torch.float64)
    out = f_ot(sim, pixel_valid=pv, class_valid=cv, class_marginal=marginal)
    for i, p in enumerate(problems):
        b = marginal[i, : p.shape[1]].numpy()
        np.testing.assert_allclose(out[i, : p.shape[1], : p.shape[0]].numpy().T, oracle.f_ot(p, b / b.sum()),
                                   rtol=1e-9, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Sinkhorn did not converge")
def test_pot_solver_honours_max_iter_and_tol():
    """--ot-solver pot passes the iteration cap and tolerance to POT (numItermax, stopThr)."""
    p = _problems(8)[0]
    assert SinkhornConfig(solver="pot").max_iter == 1000 and SinkhornConfig(solver="pot").tol == 1e-9
    assert SinkhornConfig().max_iter == 100 and SinkhornConfig().tol == 1e-2
    capped = sinkhorn_pot(_t(p), max_iter=3, tol=1e-12)
    assert int(capped.n_iter[0]) <= 3
    ref = ot.sinkhorn(np.full(p.shape[0], 1 / p.shape[0]), np.full(p.shape[1], 1 / p.shape[1]), 1 - p, 0.1,
                      method="sinkhorn_log", numItermax=3, stopThr=1e-12)
    np.testing.assert_allclose(capped.plan[0].numpy().T, ref, rtol=1e-10)
    cfg = SinkhornConfig(solver="pot", max_iter=3, tol=1e-12)
    np.testing.assert_allclose(f_ot(_t(p), cfg)[0].numpy().T, oracle.minmax(ref), rtol=1e-9, atol=1e-12)
    converged = f_ot(_t(p), SinkhornConfig(solver="pot"))[0]
    assert not np.allclose(converged.numpy().T, oracle.minmax(ref), atol=1e-3)  # the cap really bit
