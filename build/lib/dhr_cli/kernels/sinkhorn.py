"""The OT operator f_OT of docs/method.md, batched over padded problems, classes first.

Each problem b is an N_b x M_b similarity matrix (classes x pixels) padded into (B, N, M) with
boolean masks. Cost C = 1 - S, kernel K = exp(-C / eps), marginals a = 1/M_b per pixel and b
(uniform 1/N_b, or given), Sinkhorn scaling with the authors' stopping rule (mean |r - r_prev| <
tol after both updates, at most max_iter), plan T = diag(c) K diag(r), then each class's row
min-max normalised over its problem's pixels. Every problem stops on its own rule: finished
problems are frozen while the others go on.

Classes come first everywhere (the one layout of the kernels): the long pixel axis is then the
contiguous one, and the reductions over pixels and the matrix-vector products of the scaling
run several times faster on the CPU than across a short trailing class axis.

The scaling runs in float64: K spans e^-20..1 for cosine costs and r, c reach 1/(M K); float64
holds both without under- or overflow. `solver="pot"` hands each problem to POT's log-stabilised
`ot.sinkhorn` instead (converged by default: the exact plan, not the authors' two-iteration one).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from dhr_cli.config import SinkhornConfig
from dhr_cli.kernels.checks import check_shape

MINMAX_EPS = 1e-5
_DHR = SinkhornConfig()  # the defaults of the signatures below (docs/method.md's 0.1, 100, 1e-2)
_POT = SinkhornConfig(solver="pot")


@dataclass(frozen=True)
class SinkhornResult:
    plan: torch.Tensor  # (B, N, M) transport plan, 0 on padding
    n_iter: torch.Tensor  # (B,) iterations each problem ran
    err: torch.Tensor  # (B,) last mean |r - r_prev| (0 from POT)


def _masks(sim: torch.Tensor, pixel_valid, class_valid):
    b, n, m = sim.shape
    dev = sim.device
    pv = torch.ones(b, m, dtype=torch.bool, device=dev) if pixel_valid is None else pixel_valid.to(dev, torch.bool)
    cv = torch.ones(b, n, dtype=torch.bool, device=dev) if class_valid is None else class_valid.to(dev, torch.bool)
    return pv, cv


def sinkhorn(sim: torch.Tensor, *, pixel_valid: torch.Tensor | None = None, class_valid: torch.Tensor | None = None,
             class_marginal: torch.Tensor | None = None, eps: float = _DHR.eps, max_iter: int = _DHR.max_iter,
             tol: float = _DHR.tol) -> SinkhornResult:
    """Batched Sinkhorn with the authors' stopping rule.

    Args:
        sim: (B, N, M) similarities, classes first; cost is 1 - sim.
        pixel_valid: (B, M) bool, False on padded pixels.
        class_valid: (B, N) bool, False on padded classes.
        class_marginal: (B, N) class masses b (renormalised over valid classes); uniform if None.
        eps, max_iter, tol: SinkhornConfig's defaults (docs/method.md).

    Returns:
        SinkhornResult with the (B, N, M) plan on sim's device, in sim's dtype (float32 for half inputs).
    """
    check_shape(sim, "B N M", "sim")
    plan, n_iter, err = _sinkhorn(sim, pixel_valid, class_valid, class_marginal, eps, max_iter, tol, stacklevel=3)
    out_dtype = sim.dtype if sim.dtype in (torch.float32, torch.float64) else torch.float32  # fp16 plans underflow
    return SinkhornResult(plan.to(out_dtype), n_iter, err.to(out_dtype))


def _sinkhorn(sim: torch.Tensor, pixel_valid, class_valid, class_marginal, eps: float, max_iter: int, tol: float,
              stacklevel: int = 2):
    """`sinkhorn`'s work: returns (plan (B, N, M) float64, n_iter, err)."""
    pv, cv = _masks(sim, pixel_valid, class_valid)
    dev = sim.device
    s = sim.to(torch.float64)
    pvf, cvf = pv.to(s.dtype), cv.to(s.dtype)
    valid = cvf[:, :, None] * pvf[:, None, :]  # (B, N, M) 0/1
    log_kernel = (s - 1.0) / eps  # -C/eps; (s - 1) is exactly -(1 - s)
    a = pvf / pv.sum(1, keepdim=True).clamp_min(1).to(s.dtype)
    if class_marginal is None:
        b = cvf / cv.sum(1, keepdim=True).clamp_min(1).to(s.dtype)
    else:
        b = torch.where(cv, class_marginal.to(dev, s.dtype).clamp_min(0), torch.zeros((), dtype=s.dtype, device=dev))
        b = b / b.sum(1, keepdim=True).clamp_min(1e-300)
    # float64 holds K = exp(-C/eps) down to e^-700; below that (tiny eps, or costs far above 1)
    # the scalings run in the log domain, with the same updates and the same stopping rule.
    log_domain = bool(s.numel()) and float(torch.where(valid > 0, log_kernel, 0.0).amin()) < -700.0
    if log_domain:
        log_kernel = log_kernel.masked_fill(valid == 0, -torch.inf)
        r_scale, c_scale, (n_iter, err, active) = _scale_log(log_kernel, a, b, pv, cv, max_iter, tol)
        plan = (c_scale[:, :, None] + log_kernel + r_scale[:, None, :]).exp()
        plan = torch.where(valid > 0, plan, 0.0)
    else:
        kernel = torch.where(valid > 0, log_kernel.exp_(), 0.0)  # 0 on padding, whatever sim holds there
        r_scale, c_scale, (n_iter, err, active) = _scale_linear(kernel, a, b, pv, cv, max_iter, tol)
        if not bool(torch.isfinite(r_scale).all() & torch.isfinite(c_scale).all()):
            warnings.warn("Sinkhorn produced non-finite scalings; raise --sinkhorn-eps or check the inputs",
                          RuntimeWarning, stacklevel=stacklevel)
        plan = kernel.mul_(r_scale[:, None, :]).mul_(c_scale[:, :, None])  # c K r, in place: the kernel is ours
    if bool(active.any()):
        warnings.warn(f"Sinkhorn stopped at the iteration cap ({max_iter}) before mean |r - r_prev| < {tol} on "
                      f"{int(active.sum())} of {len(active)} problems; raise --sinkhorn-max-iter or --sinkhorn-tol",
                      RuntimeWarning, stacklevel=stacklevel)
    return plan, n_iter, err


def _scale_linear(kernel, a, b, pv, cv, max_iter: int, tol: float):
    """The authors' updates r = a / (K^T c), c = b / (K r) on a (B, N, M) kernel, 0 on padding.

    Each problem stops on its own rule. a and b are 0 on padded pixels and classes, so r and c
    stay 0 there without masking.
    """
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
        kc = torch.bmm(c[:, None, :], kernel)[:, 0]  # (B, M): sum_j K_ji c_j
        r_new = torch.where(kc > 0, a / kc.clamp_min(1e-300), zero)
        kr = torch.bmm(kernel, r_new[:, :, None])[..., 0]  # (B, N): sum_i K_ji r_i
        c_new = torch.where(kr > 0, b / kr.clamp_min(1e-300), zero)
        act = active[:, None]
        r = torch.where(act, r_new, r)
        c = torch.where(act, c_new, c)
        e = (r - r_prev).abs().sum(1) / n_pix
        err = torch.where(active, e, err)
        n_iter = n_iter + active.long()
        active = active & (e >= tol)
    return r, c, (n_iter, err, active)


def _scale_log(log_kernel, a, b, pv, cv, max_iter: int, tol: float):
    """The same updates on log r, log c (log-sum-exp), (B, N, M); the rule still reads mean |r - r_prev|."""
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
        lr_new = torch.where(pv, log_a - torch.logsumexp(log_kernel + lc[:, :, None], dim=1), ninf)
        lc_new = torch.where(cv, log_b - torch.logsumexp(log_kernel + lr_new[:, None, :], dim=2), ninf)
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


def sinkhorn_pot(sim: torch.Tensor, *, pixel_valid=None, class_valid=None, class_marginal=None, eps: float = _POT.eps,
                 max_iter: int = _POT.max_iter, tol: float = _POT.tol) -> SinkhornResult:
    """POT's log-stabilised Sinkhorn, problem by problem, on (B, N, M) (the converged reference).

    max_iter and tol go to POT as numItermax and stopThr (POT's rule: the marginal violation).
    """
    import ot

    check_shape(sim, "B N M", "sim")
    pv, cv = _masks(sim, pixel_valid, class_valid)
    plan = torch.zeros_like(sim, dtype=torch.float64)
    n_iter = torch.zeros(sim.shape[0], dtype=torch.long, device=sim.device)
    for i in range(sim.shape[0]):
        pi, ci = pv[i].nonzero()[:, 0], cv[i].nonzero()[:, 0]
        if len(pi) == 0 or len(ci) == 0:
            continue
        cost = 1.0 - sim[i][ci][:, pi].T.to(torch.float64)  # (pixels, classes): POT's a x b
        a = torch.full((len(pi),), 1.0 / len(pi), dtype=torch.float64, device=sim.device)
        if class_marginal is None:
            b = torch.full((len(ci),), 1.0 / len(ci), dtype=torch.float64, device=sim.device)
        else:
            b = class_marginal[i][ci].to(torch.float64)
            b = b / b.sum()
        t, log = ot.sinkhorn(a, b, cost, eps, method="sinkhorn_log", numItermax=max_iter, stopThr=tol, log=True)
        plan[i, ci[:, None], pi[None, :]] = t.T
        n_iter[i] = int(log.get("niter", 0))
    return SinkhornResult(plan.to(sim.dtype), n_iter, torch.zeros(sim.shape[0], dtype=sim.dtype, device=sim.device))


def minmax_last(x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N, M): each row (x - min) / max(max - min, 1e-5) over the valid entries (B, M); padding -> 0."""
    if valid is None:
        lo, hi = x.amin(2, keepdim=True), x.amax(2, keepdim=True)
        return (x - lo) / (hi - lo).clamp_min(MINMAX_EPS)
    pad = ~valid[:, None, :]
    big = torch.finfo(x.dtype).max
    lo = torch.where(pad, big, x).amin(2, keepdim=True)
    hi = torch.where(pad, -big, x).amax(2, keepdim=True)
    out = (x - lo) / (hi - lo).clamp_min(MINMAX_EPS)
    return out.masked_fill_(pad, 0.0)


def f_ot(sim: torch.Tensor, cfg: SinkhornConfig = _DHR, *, pixel_valid: torch.Tensor | None = None,
         class_valid: torch.Tensor | None = None, class_marginal: torch.Tensor | None = None) -> torch.Tensor:
    """docs/method.md's f_OT: the Sinkhorn plan of `sim` (B, N, M), min-max normalised per class.

    Returns (B, N, M) in sim's dtype; padded pixels and classes come out 0.

    >>> x = torch.tensor([[[0.9, 0.2, 0.5], [0.1, 0.8, 0.5]]])
    >>> f_ot(x).shape
    torch.Size([1, 2, 3])
    """
    check_shape(sim, "B N M", "sim")
    if cfg.solver == "pot":
        plan = sinkhorn_pot(sim, pixel_valid=pixel_valid, class_valid=class_valid, class_marginal=class_marginal,
                            eps=cfg.eps, max_iter=cfg.max_iter, tol=cfg.tol).plan
        plan = plan if plan.dtype in (torch.float32, torch.float64) else plan.float()
    else:
        plan = _sinkhorn(sim, pixel_valid, class_valid, class_marginal, cfg.eps, cfg.max_iter, cfg.tol, stacklevel=3)[0]
        if sim.dtype in (torch.float32, torch.float16, torch.bfloat16):
            plan = plan.float()  # the plan in the caller's precision (float32 for half inputs: fp16 plans underflow)
    out = minmax_last(plan, pixel_valid)
    if class_valid is not None:
        out = out * class_valid[:, :, None].to(out.dtype)
    return out.to(sim.dtype)
