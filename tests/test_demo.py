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
