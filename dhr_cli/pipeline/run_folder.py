"""What a `dhr train` run folder holds, told without torch: for `--overwrite` (which removes only
an earlier run) and `dhr info RUN_DIR`."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from dhr_cli.io.outputs import holds_only

# Everything a run writes into its folder (config.json first, checkpoints/ holds last.pt).
RUN_FILES = ("config.json", "checkpoints", "log.jsonl", "epochs.csv", "model.pt")
WEIGHTS = ("model.pt", "checkpoints/last.pt")
_SHOWN = ("backbone", "dhr", "epochs", "batch_size", "lr", "crop_size", "output_stride", "seed")


def run_record(folder: Path) -> dict | None:
    """The run's config.json ({dhr_version, config, inputs, world_size}), or None when absent or of another shape."""
    try:
        saved = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):  # missing, unreadable, not JSON (UnicodeDecodeError is a ValueError)
        return None
    ok = isinstance(saved, dict) and isinstance(saved.get("config"), dict) and isinstance(saved.get("inputs"), dict)
    return saved if ok else None


def is_train_run(folder: Path) -> bool:
    """An earlier run's folder: its config.json, or (a run killed before writing it) a run's files and nothing else."""
    folder = Path(folder)
    if run_record(folder) is not None:
        return True
    checkpoints = folder / "checkpoints"
    return (folder.is_dir() and any(folder.iterdir()) and holds_only(folder, RUN_FILES)
            and (not os.path.lexists(checkpoints) or checkpoints.is_dir() and holds_only(checkpoints, ["last.pt"])))


def describe_run(folder: Path) -> dict:
    """`dhr info RUN_DIR`: the options, the inputs, the weights present and the last epoch logged."""
    saved = run_record(folder) or {}
    cfg = saved.get("config", {})
    weights = [name for name in WEIGHTS if (folder / name).is_file()]
    return {
        "path": str(folder),
        "what": "dhr train run",
        "dhr_version": saved.get("dhr_version", "-"),
        "config": {k: cfg[k] for k in _SHOWN if k in cfg} or "no config.json (stopped before writing it)",
        "inputs": {k: v for k, v in saved.get("inputs", {}).items() if v is not None},
        "weights": ", ".join(weights) or "none yet (stopped before its first checkpoint)",
        "reached": _last_epoch(folder / "epochs.csv", cfg.get("epochs")),
        "files": "config.json (every option), log.jsonl (every logged step), epochs.csv (every epoch); "
                 "dhr predict --model RUN_DIR uses model.pt",
    }


def _last_epoch(path: Path, epochs) -> str:
    """The last row of epochs.csv in words."""
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, ValueError):
        rows = []
    if not rows:
        return "no epoch logged yet"
    last = rows[-1]
    try:
        loss = f"{float(last['loss']):.4f}"
        val = f", validation mIoU {100 * float(last['val_miou']):.1f}" if last.get("val_miou") else ""
    except (KeyError, TypeError, ValueError):  # a row edited by hand: shown as it is
        return "last row of epochs.csv: " + ", ".join(f"{k} {v}" for k, v in last.items())
    return f"epoch {last.get('epoch')} of {epochs or '?'}, step {last.get('step')}, loss {loss}{val}"
