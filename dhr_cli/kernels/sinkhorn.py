"""The OT operator f_OT of METHOD.md, batched over padded problems.

Each problem b is an M_b x N_b similarity matrix (pixels x classes) padded into (B, M, N) with
boolean masks. Cost C = 1 - S, kernel K = exp(-C / eps), marginals a = 1/M_b per pixel and b
(uniform 1/N_b, or given), Sinkhorn scaling with the authors' stopping rule (mean |r - r_prev| <
tol after both updates, at most max_iter), plan T = diag(r) K diag(c), then each column min-max
normalised over its problem's pixels. Every problem stops on its own rule: finished problems
are frozen while the others go on.

The scaling runs in float64: K spans e^-20..1 for cosine costs and r, c reach 1/(M K); float64
holds both without under- or overflow. `solver="pot"` hands each problem to POT's converged,
log-stabilised `ot.sinkhorn` instead (the exact plan, not the authors' two-iteration one).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from dhr_cli.config import SinkhornConfig
from dhr_cli.kernels.checks import check_shape

MINMAX_EPS = 1e-5


@dataclass(frozen=True)
class SinkhornResult:
    plan: torch.Tensor  # (B, M, N) transport plan, 0 on padding
    n_iter: torch.Tensor  # (B,) iterations each problem ran
    err: torch.Tensor  # (B,) last mean |r - r_prev|


def _masks(sim: torch.Tensor, pixel_valid, class_valid):
    b, m, n = sim.shape
    pv = torch.ones(b, m, dtype=torch.bool, device=sim.device) if pixel_valid is None else pixel_valid.to(sim.device, torch.bool)
    cv = torch.ones(b, n, dtype=torch.bool, device=sim.device) if class_valid is None else class_valid.to(sim.device, torch.bool)
    return pv, cv


def sinkhorn(sim: torch.Tensor, *, pixel_valid: torch.Tensor | None = None, class_valid: torch.Tensor | None = None,
             class_marginal: torch.Tensor | None = None, eps: float = 0.1, max_iter: int = 100,
             tol: float = 1e-2) -> SinkhornResult:
    """Batched Sinkhorn with the authors' stopping rule.

    Args:
        sim: (B, M, N) similarities; cost is 1 - sim.
        pixel_valid: (B, M) bool, False on padded pixels.
        class_valid: (B, N) bool, False on padded classes.
        class_marginal: (B, N) class masses b (renormalised over valid classes); uniform if None.
        eps, max_iter, tol: METHOD.md's 0.1, 100, 1e-2.

    Returns:
        SinkhornResult with the plan on sim's device, in sim's dtype (float32 for half inputs).
    """
    check_shape(sim, "B M N", "sim")
    pv, cv = _masks(sim, pixel_valid, class_valid)
    s = sim.to(torch.float64)
    valid = pv[:, :, None] & cv[:, None, :]
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    log_kernel = torch.where(valid, -(1.0 - s) / eps, torch.full_like(s, -torch.inf))
    n_pix = pv.sum(1, keepdim=True).clamp_min(1).to(s.dtype)
    a = pv.to(s.dtype) / n_pix
    if class_marginal is None:
        b = cv.to(s.dtype) / cv.sum(1, keepdim=True).clamp_min(1).to(s.dtype)
    else:
        b = torch.where(cv, class_marginal.to(s.dtype).clamp_min(0), zero)
        b = b / b.sum(1, keepdim=True).clamp_min(1e-300)
    # float64 holds K = exp(-C/eps) down to e^-700; below that (tiny eps, or costs far above 1)
    # the scalings run in the log domain, with the same updates and the same stopping rule.
    log_domain = bool(valid.any()) and float(log_kernel[valid].min()) < -700.0
    if log_domain:
        r_scale, c_scale, plan = _scale_log(log_kernel, a, b, pv, cv, max_iter, tol)
    else:
        r_scale, c_scale, plan = _scale_linear(log_kernel.exp(), a, b, pv, cv, max_iter, tol)
    n_iter, err, active = plan
    if bool(active.any()):
        warnings.warn(f"Sinkhorn stopped at the iteration cap ({max_iter}) before mean |r - r_prev| < {tol} on "
                      f"{int(active.sum())} of {len(active)} problems; raise --sinkhorn-max-iter or --sinkhorn-tol",
                      RuntimeWarning, stacklevel=2)
    if log_domain:
        plan = torch.where(valid, (r_scale[:, :, None] + log_kernel + c_scale[:, None, :]).exp(), zero)
    else:
        if not torch.isfinite(r_scale).all() or not torch.isfinite(c_scale).all():
            warnings.warn("Sinkhorn produced non-finite scalings; raise --sinkhorn-eps or check the inputs",
                          RuntimeWarning, stacklevel=2)
        plan = r_scale[:, :, None] * log_kernel.exp() * c_scale[:, None, :]
    out_dtype = sim.dtype if sim.dtype in (torch.float32, torch.float64) else torch.float32  # fp16 plans underflow
    return SinkhornResult(plan.to(out_dtype), n_iter, err.to(out_dtype))


def _scale_linear(kernel, a, b, pv, cv, max_iter: int, tol: float):
    """The authors' updates r = a / (K c), c = b / (K^T r); each problem stops on its own rule."""
    zero = kernel.new_zeros(())
    r, c = pv.to(kernel.dtype), cv.to(kernel.dtype)
    n_pix = pv.sum(1).clamp_min(1).to(kernel.dtype)
    active = pv.any(1) & cv.any(1)
    n_iter = torch.zeros(len(active), dtype=torch.long, device=kernel.device)
    err = kernel.new_zeros(len(active))
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        r_prev = r
        kc = torch.bmm(kernel, c[:, :, None])[..., 0]
        r_new = torch.where(pv & (kc > 0), a / kc.clamp_min(1e-300), zero)
        ktr = torch.bmm(kernel.transpose(1, 2), r_new[:, :, None])[..., 0]
        c_new = torch.where(cv & (ktr > 0), b / ktr.clamp_min(1e-300), zero)
        act = active[:, None]
        r = torch.where(act, r_new, r)
        c = torch.where(act, c_new, c)
        e = ((r - r_prev).abs() * pv).sum(1) / n_pix
        err = torch.where(active, e, err)
        n_iter = n_iter + active.long()
        active = active & (e >= tol)
    return r, c, (n_iter, err, active)


def _scale_log(log_kernel, a, b, pv, cv, max_iter: int, tol: float):
    """The same updates on log r, log c (log-sum-exp); the rule still reads mean |r - r_prev|."""
    ninf = log_kernel.new_full((), -torch.inf)
    log_a = torch.where(pv, a.clamp_min(1e-300).log(), ninf)
    log_b = torch.where(cv, b.clamp_min(1e-300).log(), ninf)
    lr = torch.where(pv, log_kernel.new_zeros(()), ninf)
    lc = torch.where(cv, log_kernel.new_zeros(()), ninf)
    n_pix = pv.sum(1).clamp_min(1).to(log_kernel.dtype)
    active = pv.any(1) & cv.any(1)
    n_iter = torch.zeros(len(active), dtype=torch.long, device=log_kernel.device)
    err = log_kernel.new_zeros(len(active))
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        lr_prev = lr
        lr_new = torch.where(pv, log_a - torch.logsumexp(log_kernel + lc[:, None, :], dim=2), ninf)
        lc_new = torch.where(cv, log_b - torch.logsumexp(log_kernel + lr_new[:, :, None], dim=1), ninf)
        act = active[:, None]
        lr = torch.where(act, lr_new, lr)
        lc = torch.where(act, lc_new, lc)
        diff = torch.where(pv, (lr.exp() - lr_prev.exp()).abs(), log_kernel.new_zeros(()))
        e = diff.sum(1) / n_pix
        e = torch.where(torch.isfinite(e), e, torch.full_like(e, torch.inf))  # r beyond float range: go on
        err = torch.where(active, e, err)
        n_iter = n_iter + active.long()
        active = active & (e >= tol)
    return lr, lc, (n_iter, err, active)


def sinkhorn_pot(sim: torch.Tensor, *, pixel_valid=None, class_valid=None, class_marginal=None, eps: float = 0.1,
                 max_iter: int = 1000, tol: float = 1e-9) -> SinkhornResult:
    """POT's log-stabilised Sinkhorn, problem by problem (the converged reference)."""
    import ot

    check_shape(sim, "B M N", "sim")
    pv, cv = _masks(sim, pixel_valid, class_valid)
    plan = torch.zeros_like(sim, dtype=torch.float64)
    n_iter = torch.zeros(sim.shape[0], dtype=torch.long, device=sim.device)
    for i in range(sim.shape[0]):
        pi, ci = pv[i].nonzero()[:, 0], cv[i].nonzero()[:, 0]
        if len(pi) == 0 or len(ci) == 0:
            continue
        cost = 1.0 - sim[i][pi][:, ci].to(torch.float64)
        a = torch.full((len(pi),), 1.0 / len(pi), dtype=torch.float64, device=sim.device)
        if class_marginal is None:
            b = torch.full((len(ci),), 1.0 / len(ci), dtype=torch.float64, device=sim.device)
        else:
            b = class_marginal[i][ci].to(torch.float64)
            b = b / b.sum()
        t, log = ot.sinkhorn(a, b, cost, eps, method="sinkhorn_log", numItermax=max(max_iter, 1000), stopThr=tol, log=True)
        plan[i, pi[:, None], ci[None, :]] = t
        n_iter[i] = int(log.get("niter", 0))
    return SinkhornResult(plan.to(sim.dtype), n_iter, torch.zeros(sim.shape[0], dtype=sim.dtype, device=sim.device))


def minmax_columns(x: torch.Tensor, row_valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, M, N): each column (x - min) / max(max - min, 1e-5) over valid rows; padded rows -> 0."""
    if row_valid is None:
        lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
        return (x - lo) / (hi - lo).clamp_min(MINMAX_EPS)
    rv = row_valid[:, :, None]
    big = torch.finfo(x.dtype).max
    lo = torch.where(rv, x, torch.full_like(x, big)).amin(1, keepdim=True)
    hi = torch.where(rv, x, torch.full_like(x, -big)).amax(1, keepdim=True)
    out = (x - lo) / (hi - lo).clamp_min(MINMAX_EPS)
    return torch.where(rv, out, torch.zeros_like(out))


def f_ot(sim: torch.Tensor, cfg: SinkhornConfig = SinkhornConfig(), *, pixel_valid: torch.Tensor | None = None,
         class_valid: torch.Tensor | None = None, class_marginal: torch.Tensor | None = None) -> torch.Tensor:
    """METHOD.md's f_OT: the Sinkhorn plan of `sim` (B, M, N), min-max normalised per column.

    Padded pixels and classes come out 0.

    >>> x = torch.tensor([[[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]]])
    >>> f_ot(x).shape
    torch.Size([1, 3, 2])
    """
    solve = sinkhorn_pot if cfg.solver == "pot" else sinkhorn
    kwargs = {} if cfg.solver == "pot" else {"max_iter": cfg.max_iter, "tol": cfg.tol}
    result = solve(sim, pixel_valid=pixel_valid, class_valid=class_valid, class_marginal=class_marginal, eps=cfg.eps,
                   **kwargs)
    plan = result.plan if result.plan.dtype in (torch.float32, torch.float64) else result.plan.float()
    out = minmax_columns(plan, pixel_valid)
    if class_valid is not None:
        out = out * class_valid[:, None, :].to(out.dtype)
    return out.to(sim.dtype)
