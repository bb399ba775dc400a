"""`dhr predict`: masks from a network trained by `dhr train` (multi-scale, flips, class filter, CRF)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dhr_cli.cli.options import (
    MaxPixels,
    DataRoot,
    Device,
    OutStore,
    Overwrite,
    Quiet,
    Resume,
    SkipMissingImages,
    Split,
    app,
    parse_scales,
    out,
    user_errors,
)
from dhr_cli.config import MAX_PIXELS, PredictConfig

_D = PredictConfig()


@app.command(
    "predict",
    help="Segment a split with a network trained by `dhr train`: softmax averaged over scales 1.0, 0.5, 1.5, 2.0 "
    "and flips, classes kept if their max probability exceeds 0.05, CRF, argmax. Writes a masks store.",
)
@user_errors
def predict_cmd(
    model: Annotated[Path, typer.Option("--model", help="Run folder of `dhr train` (or its model.pt / checkpoints/last.pt).")],
    data: DataRoot,
    out_store: OutStore,
    split: Split = None,
    skip_missing_images: SkipMissingImages = False,
    scales: Annotated[str, typer.Option("--scales", callback=parse_scales, help="Comma-separated test scales.")] = ",".join(str(s) for s in _D.scales),
    flip: Annotated[bool, typer.Option("--flip/--no-flip", help="Average with horizontally flipped copies.")] = _D.flip,
    class_threshold: Annotated[float, typer.Option("--class-threshold", help="Keep a class if its max probability exceeds this.")] = _D.class_threshold,
    restrict_to_labels: Annotated[bool, typer.Option("--restrict-to-labels", help="Keep only the image-level labels (and background).")] = _D.restrict_to_labels,
    crf: Annotated[bool, typer.Option("--crf/--no-crf", help="Dense CRF before the argmax.")] = _D.use_crf,
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="Use the EMA weights when the run has them.")] = _D.use_ema,
    overwrite: Overwrite = False,
    resume: Resume = False,
    device: Device = _D.device,
    max_pixels: MaxPixels = MAX_PIXELS,  # applied by the option's callback
    quiet: Quiet = False,
) -> None:
    from dhr_cli.errors import InputError
    from dhr_cli.pipeline.predict import run_predict
    from dhr_cli.io.outputs import check_output

    check_output(out_store, overwrite=overwrite, resume=resume,  # before any work: the shared output check
                 inputs={"--model": model, "--data": data})

    try:
        cfg = PredictConfig(scales=scales, flip=flip,
                            class_threshold=class_threshold, restrict_to_labels=restrict_to_labels, use_crf=crf,
                            use_ema=ema, device=device)
    except ValueError as e:
        raise InputError(f"{e}") from None
    result = run_predict(cfg, model, data, out_store, split=split, overwrite=overwrite, resume=resume, quiet=quiet)
    out.print(f"Wrote {result.written} masks to {result.out}" + (f" ({result.skipped} already there)" if result.skipped else ""),
              markup=False, highlight=False)
