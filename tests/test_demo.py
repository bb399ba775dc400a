"""`dhr demo` (what `make demo` runs): every step, the headline table and the README block."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dhr_cli.cli import app
from dhr_cli.pipeline.demo import is_demo_output


def test_demo_runs_every_step_and_rewrites_the_readme_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\n<!-- demo:begin -->\nold\n<!-- demo:end -->\n\nafter\n")
    out = tmp_path / "demo"
    r = CliRunner().invoke(app, ["demo", "--out", str(out), "--n-images", "8", "--features", "simulated",
                                 "--device", "cpu", "--readme", str(readme), "--quiet"])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["methods"]) == ["DHR", "CAM + CRF", "CAM"]
    for scores in summary["methods"].values():
        assert all(0 <= scores[k] <= 1 for k in ("miou", "mfpr", "mfnr", "vanishing_rate"))
        assert abs(scores["miou"] + scores["mfpr"] + scores["mfnr"] - 1) < 1e-6  # the authors' identity
    # Value checks of the default pipeline (CRF on, seeded marginals, class recovery) on scenes whose answer
    # is known. Measured (8 images, simulated stores, CPU, 2026-12-02): DHR mIoU 0.902 / 0.884 / 0.948 for
    # dataset seeds 0 / 1 / 2. This run is seed 0 and deterministic on CPU: with Step 1.2's OT removed (or
    # the demo's Lite0-only `seed_ot_lite0` applied to these stores) DHR falls to 0.876, so the bound 0.89
    # fails on that breakage. (Step 3's OT, once also caught here, now raises DHR on these stores to 0.920;
    # the oracle tests of test_seed_propagate.py pin it.)
    assert summary["seed_ot"] is True  # the simulated stores keep Step 1's OT (DemoConfig)
    dhr, cam = summary["methods"]["DHR"], summary["methods"]["CAM"]
    assert dhr["miou"] >= 0.89, dhr
    assert dhr["vanishing_rate"] <= 0.10, dhr
    assert dhr["miou"] >= cam["miou"] + 0.08, (dhr, cam)
    assert (out / "report" / "index.html").exists()
    table = (out / "summary.md").read_text()  # what `make demo` leaves for you, README untouched
    assert "| DHR |" in table and "| CAM + CRF |" in table and "Wall time per step" in table
    text = readme.read_text()
    assert table.strip() in text
    assert "old" not in text and text.startswith("# title") and text.rstrip().endswith("after")
    assert "| DHR |" in text and "| CAM + CRF |" in text and "Wall time per step" in text
    assert is_demo_output(out)  # what `make demo` replaces on its next run
    # a second run refuses to overwrite without --overwrite
    r = CliRunner().invoke(app, ["demo", "--out", str(out), "--features", "simulated", "--quiet"])
    assert r.exit_code == 1 and "already exists" in r.output


def test_make_demo_leaves_tracked_files_alone():
    """`make demo` runs the demo without --readme: refreshing README.md is `make readme-demo`."""
    from pathlib import Path

    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    demo_recipe = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert "dhr demo" in demo_recipe and "--readme" not in demo_recipe
    assert "--readme README.md" in makefile.split("\nreadme-demo:", 1)[1].split("\n\n", 1)[0]


def test_summary_names_the_seed_options_that_differ_from_the_defaults():
    from dhr_cli.pipeline.demo import seed_options, summary_markdown

    assert seed_options("otsu", False) == ["--bg-rule", "otsu", "--no-ot"]  # what bench/uss_fit.py passes

    base = {"images": 3, "features": "f", "timings_s": {"seed": 1.0}, "methods": {}}
    assert "seeds: `dhr seed --bg-rule otsu --no-ot`." in summary_markdown({**base, "seed_bg_rule": "otsu", "seed_ot": False})
    assert "seeds: `dhr seed --bg-rule otsu`." in summary_markdown({**base, "seed_bg_rule": "otsu", "seed_ot": True})
    assert "dhr seed" not in summary_markdown({**base, "seed_bg_rule": "power", "seed_ot": True})


def _one_line_error(r) -> str:
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), r.output
    return lines[0]


def test_overwrite_refuses_a_file_and_a_folder_that_is_no_demo_output(tmp_path):
    """--overwrite removed any folder (a home folder given by mistake), and a file was 'Not a directory'."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    afile = tmp_path / "afile"
    afile.write_text("mine")
    line = _one_line_error(CliRunner().invoke(app, ["demo", "--out", str(home), "--overwrite", "--features", "simulated"]))
    assert str(home) in line and "does not look like a dhr demo output folder" in line
    for extra in (["--overwrite"], []):
        line = _one_line_error(CliRunner().invoke(app, ["demo", "--out", str(afile), "--features", "simulated", *extra]))
        assert f"{afile}: is a file, not a folder; nothing was removed" in line
    link = tmp_path / "link"
    link.symlink_to(home)
    line = _one_line_error(CliRunner().invoke(app, ["demo", "--out", str(link), "--overwrite", "--features", "simulated"]))
    assert f"{link}: is a symbolic link" in line
    assert (home / "notes.txt").read_text() == "mine" and afile.read_text() == "mine"


def _killed_demo(out, *, classes: bool = True):
    """What a demo killed in its first steps leaves: its dataset begun, a store being written."""
    from dhr_cli.testing.synthetic import CLASSES

    for sub in ("images", "masks", "splits"):
        (out / "data" / sub).mkdir(parents=True)
    if classes:
        (out / "data" / "classes.txt").write_text("\n".join(CLASSES) + "\n")
        (out / "data" / "images" / "synth_0000.png").write_bytes(b"png")
        for side in ("seeds.h5.partial", "seeds.h5.lock", ".report.json.4242.tmp"):
            (out / side).write_bytes(b"cut")
    return out


def test_overwrite_replaces_an_interrupted_demo_and_nothing_else(tmp_path, monkeypatch):
    """A demo_out left by a killed `make demo` holds only the demo's files: the next `make demo` replaces it."""
    import dhr_cli.testing.synthetic as synthetic
    from dhr_cli.config import DemoConfig
    from dhr_cli.errors import InputError
    from dhr_cli.pipeline.demo import run_demo

    class Started(Exception):
        pass

    def stop(root, **kw):  # the old folder is gone by the time the new dataset is made
        raise Started(sorted(p.name for p in root.parent.iterdir()))

    monkeypatch.setattr(synthetic, "make_dataset", stop)
    for out in (_killed_demo(tmp_path / "a"), _killed_demo(tmp_path / "b", classes=False)):
        assert is_demo_output(out)
        with pytest.raises(Started) as e:
            run_demo(out, DemoConfig(features="simulated", quiet=True), overwrite=True)
        assert e.value.args[0] == []
    mixed = _killed_demo(tmp_path / "c")
    (mixed / "notes.txt").write_text("mine")  # a user's file beside the demo's
    other = tmp_path / "d"
    (other / "data").mkdir(parents=True)  # a user's dataset of other classes
    (other / "data" / "classes.txt").write_text("background\nzebra\n")
    for out in (mixed, other):
        assert not is_demo_output(out)
        with pytest.raises(InputError, match="does not look like a dhr demo output folder"):
            run_demo(out, DemoConfig(features="simulated", quiet=True), overwrite=True)
    assert (mixed / "notes.txt").exists() and (other / "data" / "classes.txt").exists()


def test_a_second_demo_into_a_running_demos_folder_is_refused(tmp_path):
    """--overwrite removed the folder of a demo still running (its stores' locks named a live PID), and
    the running demo then died on an unrelated-looking error."""
    from tests.helpers import live_writer_lock

    out = _killed_demo(tmp_path / "demo")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with live_writer_lock(out) as pid:
        line = _one_line_error(CliRunner().invoke(app, ["demo", "--out", str(out), "--overwrite", "--features",
                                                        "simulated", "--quiet"]))
        assert "demo.lock" in line and f"PID {pid}" in line and "being written" in line, line
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
