"""`dhr info`: summarise a store or a dataset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from dhr_cli.cli.options import GtCache, Quiet, SkipMissingImages, Split, app, out, user_errors


@app.command("info", help="Summarise a store (kind, classes, items, shapes, provenance), a dataset folder or a "
                          "dhr train run folder (options, weights, the epoch reached).")
@user_errors
def info_cmd(
    path: Annotated[Path, typer.Argument(help="A store (.h5), a dataset folder or a dhr train run folder.")],
    split: Split = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Read every item of a store and check its checksums; "
                                         "one line per bad item, exit status 1 if any.")] = False,
    build_cache: Annotated[bool, typer.Option("--build-cache", help=(
        "COCO official files: rasterise the split's instance GT once into a masks store next to the json "
        "(or at --gt-cache) that dhr eval then reads instead of rasterising; resumes when interrupted, "
        "rebuilds when the json changed."))] = False,
    gt_cache: GtCache = None,
    skip_missing_images: SkipMissingImages = False,
    quiet: Quiet = False,
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
        unchecked: list[str] = []
        bad = verify_store(path, unchecked)
        for line in bad:
            print(line, file=sys.stderr)
        if bad:
            raise typer.Exit(1)
        if unchecked:  # another program's store: what has no checksum was read, but damage to it cannot show
            out.print(f"{path}: {n} items read and valid; {len(unchecked)} of them (e.g. {unchecked[0]!r}) carry no "
                      "checksum (written without fletcher32), so damage to their data cannot be detected",
                      markup=False, highlight=False, soft_wrap=True)
            return
        out.print(f"{path}: {n} items, all checksums verified")
        return
    if build_cache:
        from dhr_cli.io.coco import build_gt_cache
        from dhr_cli.io.datasets import open_dataset

        if not path.is_dir():
            raise InputError(f"{path}: --build-cache takes a COCO dataset folder, not a store")
        ds = open_dataset(path, split)
        r = build_gt_cache(ds, gt_cache, quiet=quiet)
        skipped = getattr(ds, "skipped_missing", 0)
        out.print(f"GT cache {r['path']}: {r['state']}, {r['written']} of {r['items']} images rasterised"
                  + (f"; {skipped} images missing from the folder skipped" if skipped else ""), markup=False, soft_wrap=True)
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
