"""`dhr demo` (what `make demo` runs): every step, the headline table and the README block."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from dhr_cli.cli import app


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
    # is known. Measured (8 images, simulated stores, CPU): DHR mIoU 0.881 / 0.845 / 0.928 for dataset seeds
    # 0 / 1 / 2, vanishing rate 0 on all three; CAM (no CRF) 0.735 / 0.725 / 0.722. This run is seed 0 and
    # deterministic on CPU: with Step 1.2's OT removed DHR falls to 0.849, with Step 3's OT removed to 0.854,
    # so the bound 0.865 (0.016 below the measured 0.881) fails on either breakage.
    dhr, cam = summary["methods"]["DHR"], summary["methods"]["CAM"]
    assert dhr["miou"] >= 0.865, dhr
    assert dhr["vanishing_rate"] <= 0.10, dhr
    assert dhr["miou"] >= cam["miou"] + 0.08, (dhr, cam)
    assert (out / "report" / "index.html").exists()
    table = (out / "summary.md").read_text()  # what `make demo` leaves for you, README untouched
    assert "| DHR |" in table and "| CAM + CRF |" in table and "Wall time per step" in table
    text = readme.read_text()
    assert table.strip() in text
    assert "old" not in text and text.startswith("# title") and text.rstrip().endswith("after")
    assert "| DHR |" in text and "| CAM + CRF |" in text and "Wall time per step" in text
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
