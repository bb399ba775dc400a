"""`dhr info`: summarise a store or a dataset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from dhr_cli.cli.options import Split, app, out, user_errors


@app.command("info", help="Summarise a store (kind, classes, items, shapes, provenance) or a dataset folder.")
@user_errors
def info_cmd(
    path: Annotated[Path, typer.Argument(help="A store (.h5) or a dataset folder.")],
    split: Split = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Read every item of a store and check its checksums; "
                                         "one line per bad item, exit status 1 if any.")] = False,
) -> None:
    from rich.table import Table

    from dhr_cli.errors import InputError
    from dhr_cli.pipeline.info import describe

    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if verify:
        import sys

        from dhr_cli.io.store import open_store, verify_store

        with open_store(path) as store:
            n = len(store)
        bad = verify_store(path)
        for line in bad:
            print(line, file=sys.stderr)
        if bad:
            raise typer.Exit(1)
        out.print(f"{path}: {n} items, all checksums verified")
        return
    summary = describe(path, split)
    if as_json:
        out.print_json(json.dumps(summary, default=str))
        return
    table = Table(title=f"{summary['what']}: {path}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in summary.items():
        if key in ("path", "what"):
            continue
        if key == "provenance":
            value = {k: value.get(k) for k in ("command", "dhr_version", "time", "inputs") if k in value}
        if key == "classes":
            value = f"{len(value)}: " + ", ".join(value)
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items()) or "-"
        table.add_row(key, str(value))
    out.print(table)
