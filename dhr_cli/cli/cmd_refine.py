"""`dhr refine --sam`: masks refined with Segment Anything (prompted by the masks, or merged)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Annotated

import typer

from dhr_cli.cli.app import extra
from dhr_cli.cli.options import (
    MaxPixels,
    DataRoot, Device, MinArea, MissingItems, NegativePoints, OutStore, Overwrite, PositivePoints, Quiet, Resume, SkipMissingImages, Split,
    app, out, prompt_config, user_errors,
)
from dhr_cli.config import MAX_PIXELS, PromptConfig, RefineConfig

_R, _P = RefineConfig(), PromptConfig()

@app.command("refine", help=(
    "Refine a masks store with Segment Anything (pip install '" + extra("sam") + "'; weights from your own file). "
    "--mode prompt: each region of each class prompts SAM (box + interior points); SAM's mask replaces it "
    "where their IoU reaches --accept-iou. --mode merge: SAM's automatic masks take the class that holds "
    "most of them, or that they cover (SAM_WSSS rule). Pixels no SAM mask claims keep their label."))
@user_errors
def refine_cmd(
    masks: Annotated[Path, typer.Option("--masks", help="Masks (or seeds) store to refine, e.g. from `dhr propagate`.")],
    data: DataRoot,
    sam: Annotated[str, typer.Option("--sam", help="SAM model type of --sam-weights: vit_b, vit_l or vit_h.")],
    sam_weights: Annotated[Path, typer.Option("--sam-weights", help="The SAM weights file (sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth, sam_vit_h_4b8939.pth).")],
    out_store: OutStore,
    mode: Annotated[Literal["prompt", "merge"], typer.Option("--mode", help="prompt: the masks prompt SAM; merge: SAM's automatic masks merged into the masks.")] = _R.mode,
    split: Split = None,
    skip_missing_images: SkipMissingImages = False,
    accept_iou: Annotated[float, typer.Option("--accept-iou", help="prompt: SAM's mask is accepted where its IoU with the prompting region is at least this.")] = _R.accept_iou,
    positive_points: PositivePoints = _P.positive_points,
    negative_points: NegativePoints = _P.negative_points,
    min_area: MinArea = _P.min_area,
    mask_input: Annotated[bool, typer.Option("--mask-input/--no-mask-input", help="prompt: also give SAM the region as its low-resolution mask_input.")] = _R.mask_input,
    shrink: Annotated[bool, typer.Option("--shrink/--no-shrink", help="prompt: pixels of a region that its accepted SAM mask leaves out become background.")] = _R.shrink,
    prompt_batch: Annotated[int, typer.Option("--prompt-batch", min=1, help="prompt: prompts decoded together.")] = _R.prompt_batch,
    points_per_side: Annotated[int, typer.Option("--points-per-side", min=1, help="merge: SAM's automatic point grid, points per side.")] = _R.points_per_side,
    points_per_batch: Annotated[int, typer.Option("--points-per-batch", min=1, help="merge: grid points decoded together.")] = _R.points_per_batch,
    pred_iou_thresh: Annotated[float, typer.Option("--pred-iou-thresh", help="merge: SAM's own quality estimate a segment needs.")] = _R.pred_iou_thresh,
    stability_thresh: Annotated[float, typer.Option("--stability-thresh", help="merge: SAM's stability score a segment needs.")] = _R.stability_score_thresh,
    coverage: Annotated[float, typer.Option("--coverage", help="merge: a segment also takes a class when it covers this share of the class's pixels.")] = _R.coverage,
    device: Device = _R.device,
    missing: MissingItems = "fail",
    overwrite: Overwrite = False,
    resume: Resume = False,
    max_pixels: MaxPixels = MAX_PIXELS,  # applied by the option's callback
    quiet: Quiet = False,
) -> None:
    from dhr_cli.errors import InputError
    from dhr_cli.pipeline.refine import run_refine
    from dhr_cli.io.outputs import check_output

    check_output(out_store, overwrite=overwrite, resume=resume,  # before any work: the shared output check
                 inputs={"--masks": masks, "--data": data, "--sam-weights": sam_weights})

    try:
        cfg = RefineConfig(
            mode=mode,
            prompts=prompt_config(positive_points, negative_points, min_area), accept_iou=accept_iou,
            mask_input=mask_input, shrink=shrink, prompt_batch=prompt_batch, points_per_side=points_per_side,
            points_per_batch=points_per_batch, pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_thresh, coverage=coverage, device=device)
    except ValueError as e:
        raise InputError(str(e)) from None
    result = run_refine(cfg, masks=masks, data=data, sam=sam, weights=sam_weights, out=out_store, split=split,
                        missing=missing, overwrite=overwrite,
                        resume=resume, quiet=quiet)
    used = "accepted" if cfg.mode == "prompt" else "given a class"
    out.print(f"Wrote {result.written} refined masks to {result.out}"
              + (f" ({result.skipped} already there)" if result.skipped else "")
              + f"; {result.accepted} of {result.prompts} SAM masks {used}", markup=False, highlight=False)
