"""`dhr export`: a masks or seeds store to one VOC palette PNG per item."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dhr_cli.cli.options import Overwrite, Quiet, app, user_errors
from dhr_cli.cli.options import out as stdout


@app.command(
    "export",
    help="Write every item of a masks (or seeds) store as DIR/<id>.png: a VOC palette PNG whose "
    "pixel values are the label values (255 = ignore kept).",
)
@user_errors
def export_cmd(
    store: Annotated[Path, typer.Argument(help="A masks or seeds store (.h5).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (created; must be empty unless --overwrite).")],
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    from dhr_cli.pipeline.export import run_export

    result = run_export(store, out, overwrite=overwrite, quiet=quiet)
    stdout.print(f"Wrote {result.written} {result.kind} PNGs to {result.out}", markup=False, highlight=False)
