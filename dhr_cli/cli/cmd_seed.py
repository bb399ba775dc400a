"""`dhr seed`: Step 1, OT seed recovery from CAMs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

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
    MissingItems,
    OTSolverOpt,
    OutStore,
    Overwrite,
    Quiet,
    Resume,
    SinkhornEps,
    SinkhornMaxIter,
    SinkhornTol,
    SkipMissingImages,
    Split,
    app,
    err,
    sinkhorn_config,
    user_errors,
)
from dhr_cli.config import MAX_PIXELS, BgRule, SeedConfig, SinkhornConfig

_S, _D = SeedConfig(), SinkhornConfig()


@app.command("seed", help="Step 1: rebalance each image's CAMs with optimal transport so every labelled class gets "
                          "mass, let background compete, and write seed masks (255 = unsure).")
@user_errors
def seed_cmd(
    cams: Annotated[Path, typer.Option("--cams", help="CAMs store (kind cams): one map per labelled class.")],
    data: DataRoot,
    out: OutStore,
    split: Split = None,
    skip_missing_images: SkipMissingImages = False,
    crf: Crf = _S.use_crf,
    crf_preset: CrfPresetOpt = None,
    crf_max_side: CrfMaxSide = None,
    crf_backend: CrfBackendOpt = None,
    init_masks: Annotated[Optional[Path], typer.Option("--init-masks", help="Masks of another WSS method (store or PNG folder): seeds overwrite them where a class wins.")] = None,
    bg_power: Annotated[float, typer.Option("--bg-power", help="Background score is (1 - max CAM) ** bg_power.")] = _S.bg_power,
    bg_rule: Annotated[BgRule, typer.Option("--bg-rule", help="power: the fixed --bg-power; otsu: per image, the power whose background/class tie is Otsu's threshold of the max CAM.")] = _S.bg_rule,
    ot: Annotated[bool, typer.Option("--ot/--no-ot", help="Rebalance the CAMs with optimal transport (Step 1, the paper); --no-ot takes the normalised CAMs as they are.")] = _S.ot,
    confidence: Annotated[float, typer.Option("--confidence", help="Pixels whose winning probability is below this become 255 (unsure).")] = _S.confidence,
    ot_solver: OTSolverOpt = _D.solver,
    sinkhorn_max_iter: SinkhornMaxIter = None,
    sinkhorn_tol: SinkhornTol = None,
    sinkhorn_eps: SinkhornEps = _D.eps,
    batch_size: BatchSize = _S.batch_size,
    device: Device = _S.device,
    missing: MissingItems = "fail",
    overwrite: Overwrite = False,
    resume: Resume = False,
    max_pixels: MaxPixels = MAX_PIXELS,  # applied by the option's callback
    quiet: Quiet = False,
) -> None:
    from dhr_cli.errors import InputError
    from dhr_cli.pipeline.seed import run_seed
    from dhr_cli.io.outputs import check_output

    check_output(out, overwrite=overwrite, resume=resume,  # before any work: the shared output check
                 inputs={"--cams": cams, "--data": data, "--init-masks": init_masks})

    try:
        cfg = SeedConfig(sinkhorn=sinkhorn_config(ot_solver, sinkhorn_max_iter, sinkhorn_tol, sinkhorn_eps),
                         use_crf=crf, crf=crf_config(crf_preset, crf_max_side, crf_backend), bg_power=bg_power, bg_rule=bg_rule, ot=ot, confidence=confidence, batch_size=batch_size, device=device)
    except ValueError as e:
        raise InputError(str(e)) from None
    summary = run_seed(cfg, cams, data, out, split=split, init_masks=init_masks,
                       missing=missing, overwrite=overwrite,
                       resume=resume, quiet=quiet)
    err.print(f"seeds: {summary['written']} images written, {summary['items']} in {out}")
