"""bench/tune_real.py: the in-process sweep scores exactly what `dhr seed` + `dhr propagate` write."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import tune_real  # noqa: E402

from dhr_cli.config import CRFConfig, PropagateConfig, SeedConfig  # noqa: E402
from dhr_cli.io.store import open_store  # noqa: E402
from dhr_cli.pipeline.evaluate import run_eval  # noqa: E402
from dhr_cli.pipeline.propagate import run_propagate  # noqa: E402
from dhr_cli.pipeline.seed import run_seed  # noqa: E402
from dhr_cli.testing.synthetic import make_dataset  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("tune") / "data", n_images=5, seed=3)


def test_settings_parse_into_the_configs():
    s = tune_real.parse_setting("crf.max_side=128 seed.bg_power=3 prop.step3=false prop.crf.n_iter=5 cam=1")
    seed, prop, crf = tune_real.configs(s)
    assert seed.crf.max_side == 128 and prop.crf.max_side == 128 and crf is prop.crf
    assert seed.bg_power == 3.0 and prop.step3 is False and prop.crf.n_iter == 5 and seed.crf.n_iter == CRFConfig().n_iter
    assert tune_real.configs(tune_real.parse_setting("seed.bg_power=3"))[1].crf == PropagateConfig().crf
    assert s["cam"]["on"] is True
    seed, prop, _ = tune_real.configs(tune_real.parse_setting("prop.sinkhorn.eps=0.2 seed.sinkhorn.max_iter=50"))
    assert prop.sinkhorn.eps == 0.2 and seed.sinkhorn.eps == SeedConfig().sinkhorn.eps
    assert seed.sinkhorn.max_iter == 50 and prop.sinkhorn.max_iter == PropagateConfig().sinkhorn.max_iter
    assert tune_real.configs(tune_real.parse_setting("defaults"))[:2] == (SeedConfig(), PropagateConfig())
    with pytest.raises(SystemExit):
        tune_real.parse_setting("bogus.tau=1")


@pytest.mark.parametrize("text", ["defaults", "crf.max_side=32 prop.upsample=guided prop.tau=0.5"])
def test_in_process_masks_and_scores_match_the_pipeline(data, tmp_path, text):
    seed_cfg, prop_cfg, _ = tune_real.configs(tune_real.parse_setting(text))
    seed_cfg = SeedConfig(**{**seed_cfg.__dict__, "device": "cpu"})
    prop_cfg = PropagateConfig(**{**prop_cfg.__dict__, "device": "cpu"})
    run_seed(seed_cfg, data / "cams.h5", data, tmp_path / "seeds.h5", quiet=True)
    run_propagate(prop_cfg, seeds=tmp_path / "seeds.h5", data=data, uss=data / "uss.h5", wss=[data / "wss.h5"],
                  out=tmp_path / "masks.h5", cams=data / "cams.h5", quiet=True)
    bench = tune_real.Bench(data, data / "cams.h5", data / "uss.h5", data / "wss.h5")
    masks = bench.dhr(seed_cfg, prop_cfg)
    with open_store(tmp_path / "masks.h5") as st:
        for it, m in zip(bench.items, masks):
            assert np.array_equal(st.read(it["id"]).mask, m.numpy().astype(np.uint8)), it["id"]
    ref = run_eval([str(tmp_path / "masks.h5")], data, None, quiet=True).methods[0]
    got = bench.score(masks)
    assert got["miou"] == pytest.approx(ref.miou) and got["mfpr"] == pytest.approx(ref.mfpr)
    assert got["vanishing"] == pytest.approx(ref.vanishing_rate)


def test_main_writes_a_row_per_setting(data, tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--data", str(data), "--cams", str(data / "cams.h5"), "--uss", str(data / "uss.h5"),
            "--wss", str(data / "wss.h5"), "defaults", "crf.max_side=16 cam=1"]
    assert tune_real.main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "tune.jsonl").read_text().splitlines()]
    assert [(r["setting"], r["method"]) for r in rows] == [("defaults", "dhr"), ("crf.max_side=16 cam=1", "dhr"),
                                                           ("crf.max_side=16 cam=1", "cam_crf_tuned")]
    assert rows[2]["bg"] in tune_real.BG_SWEEP and all(0 <= r["miou"] <= 1 for r in rows)
    assert "| DHR defaults |" in capsys.readouterr().out


def test_several_folders_end_with_each_settings_mean_change(data, tmp_path, capsys):
    """One folder per dataset seed: the last table is each setting's mean DHR mIoU over them, as a change
    from the first setting, with the change in each folder; @FILE reads the settings."""
    for name in ("s1", "s2"):
        (tmp_path / name).mkdir()
        for f in ("cams.h5", "uss.h5", "wss.h5"):
            (tmp_path / name / f).symlink_to(data / f)
        (tmp_path / name / "data").symlink_to(data)
    (tmp_path / "knobs.txt").write_text("# a comment\ndefaults\n\nprop.step3=0\n")
    assert tune_real.main(["@" + str(tmp_path / "knobs.txt"), "--out", str(tmp_path / "s1"), str(tmp_path / "s2")]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "s2" / "tune.jsonl").read_text().splitlines()]
    assert [r["setting"] for r in rows] == ["defaults", "prop.step3=0"]
    table = out[out.index("| setting | mean mIoU over 2 |"):].splitlines()
    change = 100 * (rows[1]["miou"] - rows[0]["miou"])  # both folders hold the same images
    assert table[2] == f"| defaults | {100 * rows[0]['miou']:.1f} | +0.00 | +0.0 +0.0 |"
    assert table[3] == f"| prop.step3=0 | {100 * rows[1]['miou']:.1f} | {change:+.2f} | {change:+.1f} {change:+.1f} |"
