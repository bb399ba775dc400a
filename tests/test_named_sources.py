"""`dhr propagate --uss NAME`: a network named where a store is expected is computed once, then reused."""

from __future__ import annotations

import os

from typer.testing import CliRunner

from dhr_cli.cli import app
from dhr_cli.io.store import open_store
from dhr_cli.testing.synthetic import make_dataset

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_propagate_with_a_named_uss_network(tmp_path):
    data = make_dataset(tmp_path / "d", n_images=4)
    seeds, feats = tmp_path / "seeds.h5", tmp_path / "features"
    common = ["--data", data, "--split", "train", "--device", "cpu", "--quiet"]
    assert invoke("seed", "--cams", data / "cams.h5", "--out", seeds, "--no-crf", *common).exit_code == 0
    masks = tmp_path / "masks.h5"
    args = ["propagate", "--seeds", seeds, "--uss", "lite0", "--wss", data / "wss.h5", "--features-dir", feats,
            "--no-crf", *common]
    r = invoke(*args, "--out", masks)
    assert r.exit_code == 0, r.output
    cached = feats / "lite0-uss-train.h5"
    with open_store(cached, expect="features") as s, open_store(masks, expect="masks") as m:
        assert s.attrs["source"] == "lite0" and s.provenance["network"] == "lite0"
        assert m.ids == s.ids and len(m.ids) > 0
    stamp = os.stat(cached).st_mtime_ns
    r = invoke(*args, "--out", tmp_path / "masks2.h5")  # second run: the store is reused, not recomputed
    assert r.exit_code == 0, r.output
    assert os.stat(cached).st_mtime_ns == stamp and "computing" not in r.output
    with open_store(masks) as a, open_store(tmp_path / "masks2.h5") as b:
        assert all((a.read(i).mask == b.read(i).mask).all() for i in a.ids)

    # the same features folder for another dataset: refused, not silently reused
    other = make_dataset(tmp_path / "other", n_images=4, seed=3)
    r = invoke("propagate", "--seeds", seeds, "--uss", "lite0", "--wss", data / "wss.h5", "--features-dir", feats,
               "--data", other, "--split", "train", "--no-crf", "--quiet", "--out", tmp_path / "masks3.h5")
    assert r.exit_code == 1 and "lite0-uss-train.h5" in r.output and "remove it" in r.output
    assert not (tmp_path / "masks3.h5").exists()


def test_named_network_without_weights_is_a_clear_error(tmp_path):
    data = make_dataset(tmp_path / "d", n_images=2)
    r = invoke("propagate", "--seeds", data / "cams.h5", "--uss", "stego", "--wss", data / "wss.h5", "--data", data,
               "--split", "train", "--out", tmp_path / "m.h5")
    assert r.exit_code == 1 and "needs its weights file" in r.output and "Traceback" not in r.output
    r = invoke("propagate", "--seeds", data / "cams.h5", "--uss", "nosuchnet", "--wss", data / "wss.h5",
               "--data", data, "--split", "train", "--out", tmp_path / "m.h5")
    assert r.exit_code == 1 and "unknown network" in r.output
