"""`dhr eval`: mIoU / mFPR / mFNR (DHR's protocol) of predicted masks against ground truth."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from dhr_cli.cli.options import DataRoot, GtCache, MaxPixels, Overwrite, Quiet, SkipMissingImages, Split, app, out, user_errors
from dhr_cli.config import MAX_PIXELS, EvalConfig

_D = EvalConfig()


@app.command(
    "eval",
    help="Score predicted masks on a split's ground truth: mIoU, mFPR, mFNR (IoU + FPR + FNR = 1 per class), "
    "pixel accuracy and the vanishing rate; GT 255 ignored, background a class. --pred takes a masks/seeds "
    "store or a folder of <id>.png masks; several --pred (or --compare) give a side-by-side table.",
)
@user_errors
def eval_cmd(
    pred: Annotated[list[Path], typer.Option("--pred", help="Masks or seeds store (.h5), or a folder of <id>.png masks. Repeat to compare.")],
    data: DataRoot,
    split: Split = None,
    compare: Annotated[Optional[list[Path]], typer.Option("--compare", help="Another prediction source to compare with (repeatable).")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the report as JSON (docs/contracts.md fields and more).")] = None,
    report: Annotated[Optional[Path], typer.Option("--report", help="Write a static HTML report with overlays into this folder.")] = None,
    names: Annotated[Optional[list[str]], typer.Option("--name", help="Display name of each prediction source, in order.")] = None,
    on_size_mismatch: Annotated[Literal["fail", "skip"], typer.Option("--on-size-mismatch", help="Prediction and GT of different sizes: fail or skip (listed).")] = _D.on_size_mismatch,
    on_missing: Annotated[Literal["skip", "empty"], typer.Option("--on-missing", help="GT image without prediction: skip (counted, listed) or empty (scored as all false negatives).")] = _D.on_missing,
    skip_background_only: Annotated[bool, typer.Option("--skip-background-only/--keep-background-only", help="Drop GT images with no foreground class (DHR's evaluator does).")] = _D.skip_background_only,
    top: Annotated[int, typer.Option("--top", min=0, help="Images listed where methods differ most; worst/most-improved images in the report.")] = _D.report_images,
    gt_cache: GtCache = None,
    skip_missing_images: SkipMissingImages = False,
    overwrite: Overwrite = False,
    max_pixels: MaxPixels = MAX_PIXELS,  # applied by the option's callback
    quiet: Quiet = False,
) -> None:
    from dhr_cli.pipeline.evaluate import run_eval, write_json

    cfg = EvalConfig(
        skip_background_only=skip_background_only,
        on_size_mismatch=on_size_mismatch,  # type: ignore[arg-type]
        on_missing=on_missing,  # type: ignore[arg-type]
        report_images=top,
    )
    from dhr_cli.io.outputs import OutputLock, check_output

    inputs = {"--pred": list(pred) + list(compare or []), "--data": data, "--gt-cache": gt_cache}
    locks = []  # OUT.lock beside each output, from its check to its write: a second eval is refused

    def claim(path, folder: bool) -> None:  # fail before the (long) scoring, not after
        check_output(path, folder=folder, overwrite=overwrite, resumable=False, inputs=inputs)
        locks.append(OutputLock(path, resumable=False))
        check_output(path, folder=folder, overwrite=overwrite, resumable=False, inputs=inputs)  # as it is now, locked

    try:
        if json_path is not None:
            claim(json_path, folder=False)
        if report is not None:
            claim(report, folder=True)
        result = run_eval(list(pred) + list(compare or []), data, split, cfg, names=names, quiet=quiet)
        _print(result, top)
        if json_path is not None:
            write_json(result, json_path, top=max(top, 20))
            out.print(f"JSON report: {json_path}", markup=False, highlight=False)
        if report is not None:
            from dhr_cli.pipeline.report import write_report

            page = write_report(result, report, n_images=top, overwrite=overwrite, quiet=quiet)
            out.print(f"HTML report: {page}", markup=False, highlight=False)
    finally:
        for lock in locks:
            lock.release()


def _pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.1f}"


def _print(result, top: int) -> None:
    from rich.table import Table

    p = result.protocol()
    lines = [
        f"Dataset {p['dataset']} ({p['layout']} layout), split {p['split'] or '(all)'}: {p['split_images']} images.",
        f"Classes averaged: {len(p['classes_averaged'])} of {p['classes']} (those with GT or predicted pixels); "
        + (f"background ({p['background_class']}) included as a class." if p["background_included"] else "no background class."),
        "GT 255 ignored; prediction 255 counts as no class (a false negative).",
    ]
    skipped = {**p["skipped"]}
    if skipped:
        lines.append("Skipped for all methods: " + ", ".join(f"{n} ({r})" for r, n in skipped.items()) + ".")
    for m in result.methods:
        extra = [f"{n} ({r})" for r, n in p["skipped_per_method"][m.name].items()]
        if m.missing:
            how = "scored as empty" if m.empty_scored else "not scored"
            extra.append(f"{len(m.missing)} without prediction, {how}, e.g. {', '.join(m.missing[:3])}")
        if extra:
            lines.append(f"{m.name}: " + "; ".join(extra) + ".")
    if len({tuple(m.ids) for m in result.methods}) > 1:
        lines.append("Note: the methods were scored on different images; per-image differences use the images all scored.")
    for line in lines:
        out.print(line, markup=False, highlight=False)

    summary = Table(title="Scores (%)", title_justify="left")
    for col in ("method", "images", "mIoU", "mFPR", "mFNR", "pixel acc.", "vanishing"):
        summary.add_column(col, justify="left" if col == "method" else "right")
    for m in result.methods:
        v, pairs = m.vanishing
        summary.add_row(m.name, str(len(m.ids)), _pct(m.miou), _pct(m.mfpr), _pct(m.mfnr), _pct(m.pixel_accuracy),
                        f"{_pct(m.vanishing_rate)} ({v}/{pairs})")
    out.print(summary)

    methods = result.methods
    table = Table(title="Per class (%)", title_justify="left")
    table.add_column("class")
    if len(methods) == 1:
        for col in ("IoU", "FPR", "FNR", "GT px", "pred px"):
            table.add_column(col, justify="right")
        s = methods[0].scores
        for i, c in enumerate(result.classes):
            table.add_row(c, _pct(s.iou[i]), _pct(s.fpr[i]), _pct(s.fnr[i]), str(int(s.gt[i])), str(int(s.pred[i])))
    else:
        for m in methods:
            table.add_column(f"IoU {m.name}", justify="right")
        for m in methods[1:]:
            table.add_column(f"Δ {m.name}", justify="right")
        for m in methods:
            table.add_column(f"FPR/FNR {m.name}", justify="right")
        scores = [m.scores for m in methods]
        for i, c in enumerate(result.classes):
            row = [c] + [_pct(s.iou[i]) for s in scores]
            row += [_signed(s.iou[i] - scores[0].iou[i]) for s in scores[1:]]
            row += [f"{_pct(s.fpr[i])}/{_pct(s.fnr[i])}" for s in scores]
            table.add_row(*row)
        row = ["mean"] + [_pct(m.miou) for m in methods] + [_signed(m.miou - methods[0].miou) for m in methods[1:]]
        row += [f"{_pct(m.mfpr)}/{_pct(m.mfnr)}" for m in methods]
        table.add_row(*row, style="bold")
    out.print(table)

    if len(methods) > 1 and top > 0:
        for j in range(1, len(methods)):
            diffs = result.differences(0, j)[:top]
            if not diffs:
                continue
            t = Table(title=f"Images where {methods[j].name} and {methods[0].name} differ most (image mIoU, %)", title_justify="left")
            for col in ("image", methods[0].name, methods[j].name, "Δ"):
                t.add_column(col, justify="left" if col == "image" else "right")
            for d in diffs:
                t.add_row(d["id"], _pct(d["miou_a"]), _pct(d["miou_b"]), _signed(d["diff"]))
            out.print(t)


def _signed(x: float) -> str:
    return "-" if x != x else f"{100 * x:+.1f}"
