"""`dhr demo`: the whole pipeline on the embedded procedural dataset (what `make demo` runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from dhr_cli.cli.options import Device, Overwrite, Quiet, app, err, out, user_errors
from dhr_cli.config import DemoConfig

_D = DemoConfig()

_BEGIN, _END = "<!-- demo:begin -->", "<!-- demo:end -->"


@app.command("demo", help="Run the whole pipeline (dataset, CAMs, features, seed, propagate, eval, report) on an "
                          "embedded procedural dataset: no data or weights needed.")
@user_errors
def demo_cmd(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for everything the demo writes.")] = Path("demo_out"),
    n_images: Annotated[int, typer.Option("--n-images", min=4, help="Images in the procedural dataset (train + val).")] = _D.n_images,
    features: Annotated[Literal["auto", "lite0", "simulated"], typer.Option("--features", help="Where CAMs and features come from (auto: lite0 when installed).")] = _D.features,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the procedural dataset.")] = _D.seed,
    readme: Annotated[Optional[Path], typer.Option("--readme", help=(
        "Also rewrite the demo block of this README with the numbers (`make readme-demo`); the table is always "
        "written to OUT/summary.md."))] = None,
    device: Device = _D.device,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    from rich.table import Table

    from dhr_cli.pipeline.demo import run_demo, summary_markdown

    summary = run_demo(out_dir, DemoConfig(n_images=n_images, seed=seed, features=features, device=device, quiet=quiet),
                       overwrite=overwrite)
    table = Table(title=f"demo: {summary['images']} train images; {summary['features']}", title_justify="left")
    for col in ("method", "mIoU", "mFPR", "mFNR", "vanishing"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for name, m in summary["methods"].items():
        table.add_row(name, *(f"{100 * m[k]:.1f}" if m[k] is not None else "-" for k in ("miou", "mfpr", "mfnr", "vanishing_rate")))
    out.print(table)
    err.print(f"report: {summary['report']}")
    if readme is not None:
        _update_readme(readme, summary_markdown(summary))


def _update_readme(path: Path, table: str) -> None:
    from dhr_cli.errors import InputError

    text = path.read_text()
    if _BEGIN not in text or _END not in text:
        raise InputError(f"{path}: has no {_BEGIN} ... {_END} block to update")
    lines = [_BEGIN, "", table, "", _END]
    head, rest = text.split(_BEGIN, 1)
    tail = rest.split(_END, 1)[1]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(head + "\n".join(lines) + tail)
    tmp.replace(path)
