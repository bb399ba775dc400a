"""`dhr export`: a masks or seeds store to one VOC palette PNG per item (and/or its SAM prompts as JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dhr_cli.cli.options import MinArea, NegativePoints, Overwrite, PositivePoints, Quiet, app, prompt_config, user_errors
from dhr_cli.cli.options import out as stdout
from dhr_cli.config import PromptConfig

_P = PromptConfig()


@app.command(
    "export",
    help="Write every item of a masks (or seeds) store as DIR/<id>.png: a VOC palette PNG whose "
    "pixel values are the label values (255 = ignore kept). --prompts DIR: the Segment Anything prompts of "
    "`dhr refine --mode prompt` (boxes, points) as DIR/<id>.json, to run SAM, SAM 2 or HQ-SAM elsewhere.",
)
@user_errors
def export_cmd(
    store: Annotated[Path, typer.Argument(help="A masks or seeds store (.h5).")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder of the PNGs (created; must be empty unless --overwrite).")] = None,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="Output folder of one JSON of SAM prompts per item.")] = None,
    positive_points: PositivePoints = _P.positive_points,
    negative_points: NegativePoints = _P.negative_points,
    min_area: MinArea = _P.min_area,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    from dhr_cli.errors import InputError
    from dhr_cli.pipeline.export import run_export, run_export_prompts

    if out is None and prompts is None:
        raise InputError("dhr export needs --out DIR (PNGs) or --prompts DIR (SAM prompts as JSON), or both")
    from dhr_cli.pipeline.export import check_export_dir

    if out is not None and prompts is not None and out.resolve() == prompts.resolve():
        raise InputError(f"{out}: named by both --out and --prompts; give each its own folder")
    for folder in (out, prompts):  # both checked before either is written
        if folder is not None:
            check_export_dir(folder, overwrite, store)
    cfg = prompt_config(positive_points, negative_points, min_area)
    if out is not None:
        result = run_export(store, out, overwrite=overwrite, quiet=quiet)
        stdout.print(f"Wrote {result.written} {result.kind} PNGs to {result.out}", markup=False, highlight=False)
    if prompts is not None:
        result = run_export_prompts(store, prompts, cfg, overwrite=overwrite, quiet=quiet)
        stdout.print(f"Wrote the SAM prompts of {result.written} {result.kind} to {result.out}", markup=False, highlight=False)
