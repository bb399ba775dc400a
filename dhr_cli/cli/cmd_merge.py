"""`dhr merge`: several stores of one kind into one (the last step of a sharded run)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dhr_cli.cli.options import OutStore, Overwrite, app, err, user_errors


@app.command("merge", help="Merge stores of one kind and class list (e.g. per-rank or per-node shards) into one store.")
@user_errors
def merge_cmd(
    inputs: Annotated[list[Path], typer.Argument(help="Stores to merge; an item id may appear in only one.")],
    out: OutStore,
    overwrite: Overwrite = False,
) -> None:
    from dhr_cli.io.distributed import merge_stores
    from dhr_cli.io.outputs import check_output

    check_output(out, overwrite=overwrite, resumable=False,  # before any work: the shared output check
                 inputs={"INPUTS": inputs})

    n = merge_stores(inputs, out, overwrite=overwrite)
    err.print(f"merged {len(inputs)} stores, {n} items -> {out}")
