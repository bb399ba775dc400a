"""The CLI shell: help texts, `python -m dhr_cli`, `dhr info`, one-line errors with exit 1."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from dhr_cli.cli import app
from tests.helpers import make_flat, write_plain_store

runner = CliRunner()
COMMANDS = ["cams", "seed", "propagate", "refine", "train", "eval", "export", "info", "demo"]


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help(name):
    result = runner.invoke(app, [name, "--help"])
    assert result.exit_code == 0 and len(result.output.strip()) > 40


@pytest.mark.parametrize("columns", [80, 130])
def test_help_shows_every_option_name_whole_at_any_terminal_width(columns):
    """Rich's option table cut long names ("--backbone-wei…") below ~120 columns: every option of
    every command must be readable in full in its --help, in a narrow and a wide terminal."""
    import os

    import typer

    root = typer.main.get_command(app)
    commands = []

    def walk(cmd, path):
        if hasattr(cmd, "commands"):  # a group (typer vendors its own click)
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])
        else:
            commands.append((path, cmd))

    walk(root, [])
    script = ("import sys\nfrom dhr_cli.cli import main\nfor path in sys.argv[1:]:\n"
              "    sys.argv = ['dhr', *path.split(), '--help']\n    print('=== ' + path, flush=True)\n"
              "    try:\n        main()\n    except SystemExit:\n        pass\n")
    proc = subprocess.run([sys.executable, "-c", script, *(" ".join(p) for p, _ in commands)], capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": str(columns)}, timeout=120)
    pages = dict(part.split("\n", 1) for part in proc.stdout.split("=== ")[1:])
    assert len(pages) == len(commands) > 10
    for path, cmd in commands:
        page = pages[" ".join(path)]
        assert "…" not in page, f"dhr {' '.join(path)} --help cuts text at {columns} columns"
        assert "\\[" not in page, f"dhr {' '.join(path)} --help shows a markup escape at {columns} columns"
        for param in cmd.params:
            for opt in [*param.opts, *param.secondary_opts]:
                if opt.startswith("--"):
                    assert opt in page, f"dhr {' '.join(path)} --help at {columns} columns does not show {opt}"


def test_python_dash_m():
    proc = subprocess.run([sys.executable, "-m", "dhr_cli", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "propagate" in proc.stdout


def test_info_on_a_store_written_by_another_program(tmp_path):
    path = write_plain_store(
        tmp_path / "seeds.h5", "seeds", ["background", "cat"], {"x1": ("mask", np.zeros((5, 6), np.uint8), {})}
    )
    result = runner.invoke(app, ["info", str(path), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["kind"] == "seeds" and summary["items"] == 1 and summary["classes"] == ["background", "cat"]
    assert summary["grid_sizes"] == {"5x6": 1}


def test_info_on_a_dataset(tmp_path):
    root = make_flat(tmp_path / "d")
    result = runner.invoke(app, ["info", str(root)])
    assert result.exit_code == 0 and "flat" in result.output and "cat" in result.output


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: p / "missing.h5", "no such file"),
        (lambda p: _write(p / "x.h5", "hello"), "not an HDF5 file"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "matches no dataset layout"),
        (lambda p: write_plain_store(p / "v2.h5", "masks", ["bg"], {}, version=2), "newer than this dhr reads"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(tmp_path, setup, message):
    path = setup(tmp_path)
    result = runner.invoke(app, ["info", str(path)])
    assert result.exit_code == 1
    assert message in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and str(path) in lines[0]
    assert "Traceback" not in result.output


def test_seed_and_propagate_bars_count_images_not_batches(tmp_path, monkeypatch):
    """A bar of `seed 2/2` for 12 images told a user nothing: both commands count images."""
    from dhr_cli import PropagateConfig, SeedConfig, open_store, run_propagate, run_seed
    from dhr_cli.io import progress
    from dhr_cli.pipeline import propagate as propagate_mod
    from dhr_cli.pipeline import seed as seed_mod
    from dhr_cli.testing.synthetic import make_dataset

    bars = []
    real_bar = progress.progress_bar

    def keep(quiet=False):
        bars.append(real_bar(quiet))
        return bars[-1]

    monkeypatch.setattr(progress, "progress_bar", keep)
    root = make_dataset(tmp_path / "data", n_images=7, seed=2)
    for mod in (seed_mod, propagate_mod):
        assert mod.track is progress.track
    run_seed(SeedConfig(use_crf=False, batch_size=3), root / "cams.h5", root, tmp_path / "s.h5", quiet=False)
    run_propagate(PropagateConfig(use_crf=False, batch_size=3), seeds=tmp_path / "s.h5", data=root,
                  uss=root / "uss.h5", wss=[root / "wss.h5"], out=tmp_path / "m.h5", quiet=False)
    with open_store(tmp_path / "m.h5") as masks:
        n = len(masks.ids)
    assert n >= 5
    assert [(b.tasks[0].completed, b.tasks[0].total) for b in bars] == [(n, n), (n, n)]


def test_a_logged_warning_is_one_warning_line_without_the_module_name(tmp_path):
    import h5py

    from dhr_cli.testing.synthetic import make_dataset

    from dhr_cli import SeedConfig, run_seed

    root = make_dataset(tmp_path / "data", n_images=6, seed=4)
    seeds = tmp_path / "s.h5"
    run_seed(SeedConfig(use_crf=False), root / "cams.h5", root, seeds, quiet=True)
    with h5py.File(seeds, "r+") as f:
        del f["items"][sorted(f["items"])[0]]
    r = subprocess.run([sys.executable, "-m", "dhr_cli", "eval", "--pred", str(seeds), "--data", str(root), "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "no prediction" in ln]
    assert len(lines) == 1 and lines[0].startswith(f"Warning: {seeds}: no prediction for 1 "), r.stderr
    assert "dhr_cli." not in r.stderr
