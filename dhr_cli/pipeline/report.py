"""A static HTML report of an evaluation: tables, a per-class IoU bar chart, image overlays.

    write_report(result, "report/")  ->  report/index.html + report/img/*.png

No server and no JavaScript: open index.html in any browser. The bar chart is inline SVG; the
overlays (image | ground truth | each method's prediction) are PNGs drawn with PIL, shown for
the N images where the first method does worst and, when methods are compared, the N images
where it beats the second method the most.
"""

from __future__ import annotations

import html
import logging
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from dhr_cli.errors import StoreError

logger = logging.getLogger(__name__)

__all__ = ["write_report", "check_report_dir", "bar_chart_svg"]

METHOD_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
THUMB_SIDE = 240  # longer side of the overlay thumbnails, pixels


def check_report_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a file or a non-empty folder (unless overwrite); the parent folder must exist."""
    from dhr_cli.io.outputs import check_output

    return check_output(out, folder=True, overwrite=overwrite, resumable=False)


def _pct(x: float) -> str:
    return "–" if x != x else f"{100 * x:.1f}"


def _signed(x: float) -> str:
    return "–" if x != x else f"{100 * x:+.1f}"


def _esc(x) -> str:
    return html.escape(str(x), quote=True)


def bar_chart_svg(classes: list[str], values: list[np.ndarray], names: list[str]) -> str:
    """Grouped vertical bars of per-class IoU (one colour per method) as an inline <svg>.

    Args:
        classes: K class names; values: one (K,) array per method, in [0, 1] or NaN (no bar).
        names: the methods' names, for the legend.
    """
    k, m = len(classes), len(values)
    bar_w = 10 if m > 1 else 14
    group_w = m * bar_w + 8
    left, top, plot_h, label_h = 40, 30, 200, 90
    width = max(left + k * group_w + 20, left + m * 150)
    height = top + plot_h + label_h
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="per-class IoU">'
    ]
    for tick in range(0, 101, 20):  # grid and y axis
        y = top + plot_h * (1 - tick / 100)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - 10}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{tick}</text>')
    for i, c in enumerate(classes):
        x0 = left + i * group_w + 4
        for j, v in enumerate(values):
            val = float(v[i])
            if val != val:
                continue
            h = plot_h * max(0.0, min(1.0, val))
            parts.append(
                f'<rect class="bar" x="{x0 + j * bar_w}" y="{top + plot_h - h:.1f}" width="{bar_w - 1}" height="{h:.1f}" '
                f'fill="{METHOD_COLOURS[j % len(METHOD_COLOURS)]}"><title>{_esc(names[j])} {_esc(c)}: {_pct(val)}</title></rect>'
            )
        cx = x0 + m * bar_w / 2
        parts.append(
            f'<text x="{cx:.1f}" y="{top + plot_h + 8}" font-size="10" text-anchor="end" '
            f'transform="rotate(-60 {cx:.1f} {top + plot_h + 8})">{_esc(c)}</text>'
        )
    for j, name in enumerate(names):  # legend
        x = left + j * 150
        parts.append(f'<rect x="{x}" y="6" width="12" height="12" fill="{METHOD_COLOURS[j % len(METHOD_COLOURS)]}"/>')
        parts.append(f'<text x="{x + 16}" y="16" font-size="12">{_esc(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _thumb(rgb: np.ndarray) -> Image.Image:
    im = Image.fromarray(rgb)
    scale = THUMB_SIDE / max(im.size)
    if scale < 1:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.LANCZOS)
    elif scale >= 2:  # tiny images: blow up by a whole factor, pixels stay crisp
        f = int(scale)
        im = im.resize((im.width * f, im.height * f), Image.Resampling.NEAREST)
    return im


def _save_png(im: Image.Image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # two writers never share a temp file
    try:
        im.save(tmp, format="PNG")
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise


def _file_stem(item_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", item_id).lstrip(".") or "item"


def _select(result, n: int) -> list[tuple[str, list[str], str]]:
    """Sections of (title, ids, note): worst images of method 0, most improved vs method 1."""
    first = result.methods[0]
    per_image = first.per_image_miou()
    order = [i for i in np.argsort(np.nan_to_num(per_image, nan=2.0), kind="stable") if not np.isnan(per_image[i])]
    sections = [(f"The {min(n, len(order))} images where {first.name} does worst (image mIoU)", [first.ids[i] for i in order[:n]], "")]
    if len(result.methods) > 1:
        diffs = result.differences(0, 1)  # diff = method 1 - method 0; improvement = -diff
        better = sorted((d for d in diffs if d["diff"] < 0), key=lambda d: (d["diff"], d["id"]))[:n]
        note = "" if better else f"{first.name} beats {result.methods[1].name} on no image."
        sections.append((f"The {len(better)} images where {first.name} improves most over {result.methods[1].name}", [d["id"] for d in better], note))
    return sections


def write_report(result, out: str | os.PathLike, *, n_images: int = 8, overwrite: bool = False, quiet: bool = True) -> Path:
    """Write out/index.html (+ out/img/*.png) for an EvalResult; returns the page's path."""
    out = check_report_dir(out, overwrite)
    try:
        return _write_report(result, out, n_images, quiet)
    except OSError as e:  # disk full, ...: the page is written last, so a failed report has none
        where = e.filename or out
        for tmp in out.glob("**/.*.tmp"):
            tmp.unlink(missing_ok=True)
        raise StoreError(f"{where}: could not be written ({e.strerror or e}); the report in {out} is incomplete "
                         "(no index.html), free space and rerun with --overwrite") from None


def _write_report(result, out: Path, n_images: int, quiet: bool) -> Path:
    from dhr_cli.io.datasets import open_dataset
    from dhr_cli.io.palette import overlay
    from dhr_cli.io.progress import track
    from dhr_cli.pipeline.evaluate import open_predictions

    index = out / "index.html"
    index.unlink(missing_ok=True)  # an overwritten report's old page must not show the new run's images
    img_dir = out / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    sections = _select(result, n_images) if n_images > 0 else []
    wanted = sorted({i for _, ids, _ in sections for i in ids})
    miou = [dict(zip(m.ids, m.per_image_miou())) for m in result.methods]
    ds = open_dataset(result.root, result.split)
    sources = [open_predictions(m.source, result.classes) for m in result.methods]
    files: dict[str, list[str]] = {}
    try:
        for item_id in track(wanted, description="report", quiet=quiet):
            image = ds.image(item_id)
            gt = ds.gt(item_id)
            stem = _file_stem(item_id)
            names = [f"{stem}_image.png", f"{stem}_gt.png"]
            _save_png(_thumb(image), img_dir / names[0])
            _save_png(_thumb(overlay(image, gt)), img_dir / names[1])
            for j, src in enumerate(sources):
                pred = src.mask(item_id)
                name = f"{stem}_pred{j}.png"
                if pred is None or pred.shape != gt.shape:
                    names.append("")
                    continue
                _save_png(_thumb(overlay(image, pred)), img_dir / name)
                names.append(name)
            files[item_id] = names
    finally:
        for s in sources:
            s.close()

    page = _html(result, sections, files, miou)
    tmp = out / f".index.html.{os.getpid()}.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, index)
    logger.info("report written to %s", index)
    return index


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px} h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right} th{background:#f2f2f2}
td:first-child,th:first-child,#summary td:nth-child(2){text-align:left}
.pos{color:#0a7d2c}.neg{color:#b00020} .mean td{font-weight:bold}
.grid{display:flex;flex-wrap:wrap;gap:6px;align-items:flex-start;margin:10px 0 18px}
figure{margin:0} figcaption{font-size:12px;text-align:center}
.row{border:1px solid #ddd;padding:6px;margin:8px 0} .row h3{font-size:14px;margin:2px 0 6px}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px;font-size:13px} dt{font-weight:bold}
"""


def _cls(x: float) -> str:
    return "pos" if x > 0 else "neg" if x < 0 else ""


def _html(result, sections, files, miou) -> str:
    methods = result.methods
    p = result.protocol()
    h: list[str] = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>dhr eval: {_esc(' vs '.join(m.name for m in methods))}</title><style>{_CSS}</style></head><body>",
        f"<h1>dhr eval: {_esc(' vs '.join(m.name for m in methods))}</h1>",
        "<h2>Protocol</h2><dl>",
    ]
    proto = [
        ("dataset", f"{p['dataset']} ({p['layout']} layout)"),
        ("split", f"{p['split'] or '(all)'}: {p['split_images']} images"),
        ("images scored", ", ".join(f"{k}: {v}" for k, v in p["images_scored"].items())),
        ("classes averaged", f"{len(p['classes_averaged'])} of {p['classes']} ({p['mean']})"),
        ("background", f"included as a class ({p['background_class']})" if p["background_included"] else "none in this dataset"),
        ("ignored", "GT 255; prediction 255 counts as no class (a false negative)"),
        ("skipped (all methods)", ", ".join(f"{v} {k}" for k, v in p["skipped"].items()) or "none"),
        ("missing predictions", ", ".join(f"{k}: {v} ({p['on_missing']})" for k, v in p["missing_predictions"].items())),
    ]
    for m in methods:
        for reason, ids in m.skipped.items():
            proto.append((f"skipped ({m.name})", f"{len(ids)} {reason}: {', '.join(ids[:10])}"))
    for k, v in proto:
        h.append(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>")
    h.append("</dl>")

    h.append("<h2>Scores (%)</h2><table id='summary'><tr><th>method</th><th>source</th><th>images</th><th>mIoU</th>"
             "<th>mFPR</th><th>mFNR</th><th>pixel acc.</th><th>vanishing</th></tr>")
    for m in methods:
        v, pairs = m.vanishing
        h.append(f"<tr><td>{_esc(m.name)}</td><td>{_esc(m.source)}</td><td>{len(m.ids)}</td><td>{_pct(m.miou)}</td>"
                 f"<td>{_pct(m.mfpr)}</td><td>{_pct(m.mfnr)}</td><td>{_pct(m.pixel_accuracy)}</td>"
                 f"<td>{_pct(m.vanishing_rate)} ({v}/{pairs})</td></tr>")
    h.append("</table>")

    scores = [m.scores for m in methods]
    h.append("<h2>Per-class IoU</h2>")
    h.append(bar_chart_svg(result.classes, [s.iou for s in scores], [m.name for m in methods]))
    h.append("<h2>Per class (%)</h2><table id='per-class'><tr><th>class</th>")
    h += [f"<th>IoU {_esc(m.name)}</th>" for m in methods]
    h += [f"<th>Δ IoU {_esc(m.name)}</th>" for m in methods[1:]]
    h += [f"<th>FPR {_esc(m.name)}</th><th>FNR {_esc(m.name)}</th>" for m in methods]
    h.append("</tr>")
    for i, c in enumerate(result.classes):
        row = [f"<td>{_esc(c)}</td>"] + [f"<td>{_pct(s.iou[i])}</td>" for s in scores]
        row += [f"<td class='{_cls(s.iou[i] - scores[0].iou[i])}'>{_signed(s.iou[i] - scores[0].iou[i])}</td>" for s in scores[1:]]
        row += [f"<td>{_pct(s.fpr[i])}</td><td>{_pct(s.fnr[i])}</td>" for s in scores]
        h.append("<tr>" + "".join(row) + "</tr>")
    row = ["<td>mean</td>"] + [f"<td>{_pct(m.miou)}</td>" for m in methods]
    row += [f"<td>{_signed(m.miou - methods[0].miou)}</td>" for m in methods[1:]]
    row += [f"<td>{_pct(m.mfpr)}</td><td>{_pct(m.mfnr)}</td>" for m in methods]
    h.append("<tr class='mean'>" + "".join(row) + "</tr></table>")

    for title, ids, note in sections:
        h.append(f"<h2>{_esc(title)}</h2>")
        if note:
            h.append(f"<p>{_esc(note)}</p>")
        for item_id in ids:
            names = files.get(item_id)
            if not names:
                continue
            scores_txt = ", ".join(f"{m.name} {_pct(miou[j].get(item_id, float('nan')))}" for j, m in enumerate(methods))
            h.append(f"<div class='row'><h3>{_esc(item_id)}: image mIoU {_esc(scores_txt)}</h3><div class='grid'>")
            captions = ["image", "ground truth"] + [m.name for m in methods]
            for name, cap in zip(names, captions):
                if name:
                    h.append(f"<figure><img src='img/{_esc(name)}' alt='{_esc(item_id)} {_esc(cap)}'>"
                             f"<figcaption>{_esc(cap)}</figcaption></figure>")
                else:
                    h.append(f"<figure><figcaption>{_esc(cap)}: no prediction</figcaption></figure>")
            h.append("</div></div>")
    h.append("</body></html>\n")
    return "\n".join(h)
