"""`dhr propagate`: Steps 2 and 3, inter- and intra-class rebalancing (or a baseline)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dhr_cli.cli.options import (
    BatchSize,
    Crf,
    CrfBackendOpt,
    CrfMaxSide,
    CrfPresetOpt,
    crf_config,
    DataRoot,
    Device,
    FeaturesDir,
    MissingItems,
    OTSolverOpt,
    OutStore,
    Overwrite,
    PackedHeadBackbone,
    Quiet,
    Resume,
    SinkhornEps,
    SinkhornMaxIter,
    SinkhornTol,
    Split,
    TrustCheckpoint,
    UssWeights,
    app,
    check_choice,
    err,
    network_store,
    sinkhorn_config,
    user_errors,
)
from dhr_cli.config import PropagateConfig, RandomWalkConfig, SinkhornConfig

_P, _D, _R = PropagateConfig(), SinkhornConfig(), RandomWalkConfig()


@app.command("propagate", help="Steps 2-3: class prototypes from USS features under the seed masks, heat-maps "
                               "rebalanced by OT (classes too alike in USS space told apart with WSS features), "
                               "dense masks out. --method cam|rw runs the baselines on the same inputs.")
@user_errors
def propagate_cmd(
    seeds: Annotated[Path, typer.Option("--seeds", help="Seeds store from `dhr seed` (or any masks store).")],
    data: DataRoot,
    uss: Annotated[str, typer.Option("--uss", help=(
        "USS features: a features store, or a network (stego, cause, dino_vits8, dinov2_vitb14, lite0, ...; "
        "see `dhr cams --help`) computed once with --uss-weights."))],
    out: OutStore,
    wss: Annotated[Optional[list[str]], typer.Option("--wss", help=(
        "WSS features: a cams/features store, or a network (mctformer, resnet50, resnet101, dhr, lite0) computed "
        "once with --wss-weights; repeat for several maps."))] = None,
    uss_weights: UssWeights = None,
    wss_weights: Annotated[Optional[list[Path]], typer.Option("--wss-weights", help="Weights file of each WSS network named by --wss, in order.")] = None,
    backbone_weights: PackedHeadBackbone = None,
    trust_checkpoint: TrustCheckpoint = False,
    features_dir: FeaturesDir = None,
    cams: Annotated[Optional[Path], typer.Option("--cams", help="CAMs store: recovers labelled classes that win no grid cell; needed by --method cam|rw.")] = None,
    split: Split = None,
    tau: Annotated[float, typer.Option("--tau", help="Prototype cosine above which classes share a USS group (Step 3).")] = _P.tau,
    step3: Annotated[bool, typer.Option("--step3/--no-step3", help="Step 3 (classes alike in USS space told apart with WSS features); --no-step3 needs no --wss.")] = _P.step3,
    crf: Crf = _P.use_crf,
    crf_preset: CrfPresetOpt = None,
    crf_max_side: CrfMaxSide = None,
    crf_backend: CrfBackendOpt = None,
    ot_marginals: Annotated[str, typer.Option("--ot-marginals", help="seeded: class masses from the seed areas; uniform: the authors' equal shares.")] = _P.marginals,
    recover: Annotated[bool, typer.Option("--recover/--no-recover", help="Recover labelled classes that win no cell from their CAM peak (needs --cams).")] = _P.recover_missing,
    method: Annotated[str, typer.Option("--method", help="dhr, or a baseline: cam (CAM argmax vs a constant background) or rw (random walk on USS features).")] = _P.method,
    cam_bg_threshold: Annotated[float, typer.Option("--cam-bg-threshold", help="Background score of --method cam.")] = _P.cam_bg_threshold,
    rw_beta: Annotated[float, typer.Option("--rw-beta", help="Random walk: affinity exponent.")] = _R.beta,
    rw_logt: Annotated[int, typer.Option("--rw-logt", help="Random walk: 2**logt steps.")] = _R.logt,
    rw_bg: Annotated[float, typer.Option("--rw-bg", help="Random walk: background plane.")] = _R.bg,
    ot_solver: OTSolverOpt = _D.solver,
    sinkhorn_max_iter: SinkhornMaxIter = _D.max_iter,
    sinkhorn_tol: SinkhornTol = _D.tol,
    sinkhorn_eps: SinkhornEps = _D.eps,
    batch_size: BatchSize = _P.batch_size,
    device: Device = _P.device,
    missing: MissingItems = "fail",
    overwrite: Overwrite = False,
    resume: Resume = False,
    quiet: Quiet = False,
) -> None:
    from dhr_cli.errors import InputError
    from dhr_cli.pipeline.propagate import run_propagate

    try:
        cfg = PropagateConfig(
            sinkhorn=sinkhorn_config(ot_solver, sinkhorn_max_iter, sinkhorn_tol, sinkhorn_eps), use_crf=crf, crf=crf_config(crf_preset, crf_max_side, crf_backend), tau=tau, step3=step3,
            marginals=check_choice("--ot-marginals", ot_marginals, ("seeded", "uniform")), recover_missing=recover,
            method=check_choice("--method", method, ("dhr", "cam", "rw")), cam_bg_threshold=cam_bg_threshold,
            rw=RandomWalkConfig(beta=rw_beta, logt=rw_logt, bg=rw_bg), batch_size=batch_size, device=device)
    except ValueError as e:
        raise InputError(str(e)) from None
    wss, wss_weights = (list(wss or []) if step3 else []), list(wss_weights or [])
    named_wss = [w for w in wss if not Path(w).is_file()]
    if len(wss_weights) > len(named_wss):
        raise InputError(f"{len(wss_weights)} --wss-weights for {len(named_wss)} networks named by --wss")
    weights_of = dict(zip(named_wss, wss_weights))
    where = dict(data=data, split=split, features_dir=features_dir or out.parent, device=device, quiet=quiet,
                 trust=trust_checkpoint, backbone_weights=backbone_weights)
    uss = str(network_store(uss, "uss", weights=uss_weights, **where))
    wss = [str(network_store(w, "wss", weights=weights_of.get(w), **where)) for w in wss]
    summary = run_propagate(cfg, seeds=seeds, data=data, uss=uss, wss=wss, out=out, cams=cams, split=split,
                            missing=check_choice("--missing", missing, ("fail", "skip")), overwrite=overwrite,
                            resume=resume, quiet=quiet)
    err.print(f"masks: {summary['written']} images written, {summary['items']} in {out}")
