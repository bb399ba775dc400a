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
