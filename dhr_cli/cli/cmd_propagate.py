"""`dhr propagate`: Steps 2 and 3, inter- and intra-class rebalancing (or a baseline)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from dhr_cli.cli.options import (
    MaxPixels,
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
    SkipMissingImages,
    Split,
    TrustCheckpoint,
    UssWeights,
    app,
    err,
    network_store,
    sinkhorn_config,
    user_errors,
)
from dhr_cli.config import MAX_PIXELS, Marginals, PropagateConfig, PropagateMethod, RandomWalkConfig, SinkhornConfig

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
    skip_missing_images: SkipMissingImages = False,
    tau: Annotated[float, typer.Option("--tau", help="Prototype cosine above which classes share a USS group (Step 3).")] = _P.tau,
    step3: Annotated[bool, typer.Option("--step3/--no-step3", help="Step 3 (classes alike in USS space told apart with WSS features); --no-step3 needs no --wss.")] = _P.step3,
    step3_background: Annotated[bool, typer.Option("--step3-background/--no-step3-background", help="Let background share a Step-3 group like any class (the authors); default: Step 3 tells foreground classes apart only.")] = _P.step3_background,
    crf: Crf = _P.use_crf,
    crf_preset: CrfPresetOpt = None,
    crf_max_side: CrfMaxSide = None,
    crf_backend: CrfBackendOpt = None,
    ot_marginals: Annotated[Marginals, typer.Option("--ot-marginals", help="seeded: class masses from the seed areas; uniform: the authors' equal shares.")] = _P.marginals,
    recover: Annotated[bool, typer.Option("--recover/--no-recover", help="Recover labelled classes that win no cell from their CAM peak (needs --cams).")] = _P.recover_missing,
    restore_classes: Annotated[bool, typer.Option("--restore-classes/--no-restore-classes", help="A labelled class that held pixels before the CRF / final argmax and none after takes them back.")] = _P.restore_classes,
    upsample: Annotated[Literal["bilinear", "guided"], typer.Option("--upsample", help="Heat-maps to image size: bilinear, or guided (bilinear + colour guided filter with the image).")] = _P.upsample,
    guided_radius: Annotated[int, typer.Option("--guided-radius", help="--upsample guided: window radius in pixels.")] = _P.guided_radius,
    guided_eps: Annotated[float, typer.Option("--guided-eps", help="--upsample guided: regulariser (colours in 0..1).")] = _P.guided_eps,
    method: Annotated[PropagateMethod, typer.Option("--method", help="dhr, or a baseline: cam (CAM argmax vs a constant background) or rw (random walk on USS features).")] = _P.method,
    cam_bg_threshold: Annotated[float, typer.Option("--cam-bg-threshold", help="Background score of --method cam.")] = _P.cam_bg_threshold,
    rw_beta: Annotated[float, typer.Option("--rw-beta", help="Random walk: affinity exponent.")] = _R.beta,
    rw_logt: Annotated[int, typer.Option("--rw-logt", help="Random walk: 2**logt steps.")] = _R.logt,
    rw_bg: Annotated[float, typer.Option("--rw-bg", help="Random walk: background plane.")] = _R.bg,
    ot_solver: OTSolverOpt = _D.solver,
    sinkhorn_max_iter: SinkhornMaxIter = None,
    sinkhorn_tol: SinkhornTol = None,
    sinkhorn_eps: SinkhornEps = _D.eps,
    batch_size: BatchSize = _P.batch_size,
    device: Device = _P.device,
    missing: MissingItems = "fail",
    overwrite: Overwrite = False,
    resume: Resume = False,
    max_pixels: MaxPixels = MAX_PIXELS,  # applied by the option's callback
    quiet: Quiet = False,
) -> None:
    from dhr_cli.errors import InputError
    from dhr_cli.pipeline.cams import pair_weights
    from dhr_cli.pipeline.propagate import run_propagate
    from dhr_cli.io.outputs import check_output

    check_output(out, overwrite=overwrite, resume=resume,  # before any work: the shared output check
                 inputs={"--seeds": seeds, "--data": data, "--uss": uss, "--wss": list(wss or []),
                         "--cams": cams, "--uss-weights": uss_weights, "--wss-weights": list(wss_weights or []),
                         "--backbone-weights": backbone_weights})

    try:
        cfg = PropagateConfig(
            sinkhorn=sinkhorn_config(ot_solver, sinkhorn_max_iter, sinkhorn_tol, sinkhorn_eps), use_crf=crf, crf=crf_config(crf_preset, crf_max_side, crf_backend, base=_P.crf), tau=tau, step3=step3,
            step3_background=step3_background,
            marginals=ot_marginals, recover_missing=recover,
            restore_classes=restore_classes, upsample=upsample,
            guided_radius=guided_radius, guided_eps=guided_eps,
            method=method, cam_bg_threshold=cam_bg_threshold,
            rw=RandomWalkConfig(beta=rw_beta, logt=rw_logt, bg=rw_bg), batch_size=batch_size, device=device)
    except ValueError as e:
        raise InputError(str(e)) from None
    wss, wss_weights = (list(wss or []) if step3 else []), list(wss_weights or [])
    weights_of = pair_weights(wss, wss_weights)
    where = dict(data=data, split=split, features_dir=features_dir or out.parent, device=device, quiet=quiet,
                 trust=trust_checkpoint, backbone_weights=backbone_weights)
    uss = str(network_store(uss, "uss", weights=uss_weights, **where))
    wss = [str(network_store(w, "wss", weights=weights_of.get(w), **where)) for w in wss]
    summary = run_propagate(cfg, seeds=seeds, data=data, uss=uss, wss=wss, out=out, cams=cams, split=split,
                            missing=missing, overwrite=overwrite,
                            resume=resume, quiet=quiet)
    err.print(f"masks: {summary['written']} images written, {summary['items']} in {out}")
