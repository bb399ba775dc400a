"""Sharding by rank, per-rank stores merged by rank 0, and `dhr merge`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from typer.testing import CliRunner

from dhr_cli.cli import app
from dhr_cli.errors import StoreError
from tests.helpers import free_port
from dhr_cli.io.distributed import Rank, interrupted, merge_stores, shard, shard_path
from dhr_cli.io.store import create_store, open_store

CLASSES = ["background", "cat", "dog"]


def _masks(path, ids, value=1, classes=CLASSES, options=None):
    with create_store(path, "masks", classes, provenance={"command": "t", "options": options or {}}) as w:
        for i in ids:
            w.write(i, {"mask": np.full((3, 4), value, np.uint8)})
    return path


def test_shards_are_disjoint_and_cover_everything():
    ids = [f"x{i}" for i in range(11)][::-1]
    parts = [shard(ids, Rank(r, 3)) for r in range(3)]
    assert sorted(sum(parts, [])) == sorted(ids)
    assert all(not set(a) & set(b) for a in parts for b in parts if a is not b)
    assert shard(ids, Rank(0, 1)) == sorted(ids)


def test_merge(tmp_path):
    a = _masks(tmp_path / "a.h5", ["1", "3"], 1)
    b = _masks(tmp_path / "b.h5", ["2"], 2)
    assert merge_stores([a, b], tmp_path / "c.h5") == 3
    with open_store(tmp_path / "c.h5") as s:
        assert s.ids == ["1", "2", "3"] and s.read("2").mask.max() == 2
        assert len(s.provenance["merged_from"]) == 2


def test_merge_refuses_duplicates_and_mismatches(tmp_path):
    a = _masks(tmp_path / "a.h5", ["1"])
    b = _masks(tmp_path / "b.h5", ["1"])
    c = _masks(tmp_path / "c.h5", ["2"], classes=["background", "dog"])
    with pytest.raises(StoreError, match="also in"):
        merge_stores([a, b], tmp_path / "o.h5")
    with pytest.raises(StoreError, match="cannot merge"):
        merge_stores([a, c], tmp_path / "o.h5")
    assert not (tmp_path / "o.h5").exists() and not (tmp_path / "o.h5.partial").exists()


def test_merge_refuses_parts_made_with_other_options(tmp_path):
    """Node 1's part of `--method cam` beside node 0's DHR masks merged under node 0's provenance: the
    store said every item was DHR's. Options a --resume may change (workers, device) may differ."""
    a = _masks(tmp_path / "a.h5", ["1"], options={"method": "dhr", "tau": 0.8, "num_workers": 2})
    b = _masks(tmp_path / "b.h5", ["2"], options={"method": "cam", "tau": 0.8, "num_workers": 2})
    c = _masks(tmp_path / "c.h5", ["3"], options={"method": "dhr", "tau": 0.8, "num_workers": 0})
    with pytest.raises(StoreError, match=r"b.h5: written with other options than .*a.h5 \(method: cam \(b.h5\) vs "
                                         r"dhr \(a.h5\)\); cannot merge"):
        merge_stores([a, b], tmp_path / "o.h5")
    assert not (tmp_path / "o.h5").exists() and not (tmp_path / "o.h5.partial").exists()
    assert merge_stores([a, c], tmp_path / "o.h5") == 2


def test_merge_refuses_feature_stores_of_two_networks(tmp_path):
    """STEGO's maps beside DINO's in one store, labelled as STEGO's, used to merge without a word."""
    paths = []
    for name, item in (("stego", "1"), ("dino", "2")):
        path = tmp_path / f"{name}.h5"
        with create_store(path, "features", CLASSES, provenance={}, root_attrs={"source": name, "source_kind": "uss"}) as w:
            w.write(item, {"features": np.ones((4, 2, 3), np.float16)}, {"features": {"image_size": [8, 12]}})
        paths.append(path)
    with pytest.raises(StoreError, match=r"dino.h5: source 'dino', but .*stego.h5 has 'stego'.*cannot merge"):
        merge_stores(paths, tmp_path / "o.h5")
    assert not (tmp_path / "o.h5").exists() and not (tmp_path / "o.h5.partial").exists()
    assert merge_stores(paths[:1], tmp_path / "o.h5") == 1


def test_merge_cli(tmp_path):
    a = _masks(tmp_path / "a.h5", ["1"])
    b = _masks(tmp_path / "b.h5", ["2"])
    result = CliRunner().invoke(app, ["merge", str(a), str(b), "--out", str(tmp_path / "m.h5")])
    assert result.exit_code == 0, result.output
    with open_store(tmp_path / "m.h5") as s:
        assert s.ids == ["1", "2"]


def test_torchrun_two_ranks_write_one_store(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(f"""
        import numpy as np
        from dhr_cli.io.distributed import output_store, shard
        ids = [f"img{{i}}" for i in range(7)]
        with output_store({str(tmp_path / 'out.h5')!r}, "masks", [f"c{{k}}" for k in range(20)], provenance={{}}) as w:
            for i in shard(ids):
                w.write(i, {{"mask": np.full((2, 2), int(i[3:]), np.uint8)}})
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()), str(script)],
                          capture_output=True, text=True, timeout=180, env=env, cwd=os.getcwd())
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open_store(tmp_path / "out.h5") as s:
        assert s.ids == sorted(f"img{i}" for i in range(7))
        assert [int(s.read(i).mask[0, 0]) for i in s.ids] == [int(i[3:]) for i in s.ids]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.py", "out.h5"]  # shards removed


def _torchrun(*args, nproc=2, timeout=300):
    """`torchrun --standalone` (a free port) with one torch thread a process; returns the finished process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                           *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env, cwd=os.getcwd())


_JOB = """
import sys
import numpy as np
from dhr_cli.io.distributed import output_store, shard
out, resume, tau = sys.argv[1], sys.argv[2] == "resume", float(sys.argv[3])
ids = [f"img{i}" for i in range(7)]
provenance = {"command": "job", "options": {"tau": tau}}
with output_store(out, "masks", [f"c{k}" for k in range(20)], provenance=provenance, resume=resume) as w:
    for i in shard(ids):
        if i not in w:
            w.write(i, {"mask": np.full((2, 2), int(i[3:]), np.uint8)})
"""


def test_torchrun_resume_completes_a_merged_store(tmp_path):
    """--resume on an OUT merged by an earlier run (no shards left): only the items it lacks are computed."""
    (tmp_path / "job.py").write_text(_JOB)
    out = tmp_path / "out.h5"
    with create_store(out, "masks", [f"c{k}" for k in range(20)],
                      provenance={"command": "job", "options": {"tau": 0.8}}) as w:
        for i in range(5):  # img5 and img6 missing; 19 marks an item that must not be recomputed
            w.write(f"img{i}", {"mask": np.full((2, 2), 19, np.uint8)})
    # other options: refused as a one-process --resume is (the merged items were made at tau 0.8)
    proc = _torchrun(tmp_path / "job.py", out, "resume", 0.3)
    assert proc.returncode != 0 and "tau: 0.8 (partial) vs 0.3 (this run)" in proc.stderr, proc.stderr[-2000:]
    with open_store(out) as s:
        assert s.ids == [f"img{i}" for i in range(5)]
    proc = _torchrun(tmp_path / "job.py", out, "resume", 0.8)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open_store(out) as s:
        assert s.ids == [f"img{i}" for i in range(7)]
        assert [int(s.read(i).mask[0, 0]) for i in s.ids] == [19] * 5 + [5, 6]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.py", "out.h5"]


def test_interrupted_names_this_ranks_partial(tmp_path):
    out = tmp_path / "o.h5"
    assert not interrupted(out, Rank(1, 2))
    shard_path(out, Rank(1, 2)).with_suffix(".h5.partial").write_bytes(b"")
    assert interrupted(out, Rank(1, 2)) and not interrupted(out, Rank(0, 2)) and not interrupted(out, Rank(0, 1))


def _features_equal(a, b):
    with open_store(a) as x, open_store(b) as y:
        assert x.ids == y.ids and x.kind == y.kind and x.classes == y.classes
        assert x.attrs["source"] == y.attrs["source"] == "lite0"
        for i in x.ids:
            p, q = x.read(i), y.read(i)
            assert sorted(p.arrays) == sorted(q.arrays)
            for name in p.arrays:
                assert p.arrays[name].dtype == q.arrays[name].dtype
                np.testing.assert_array_equal(p.arrays[name], q.arrays[name])
                assert list(p.attrs[name]["image_size"]) == list(q.attrs[name]["image_size"])


@pytest.mark.slow
def test_torchrun_cams_matches_one_process_and_resumes(tmp_path):
    """`torchrun --nproc-per-node 2 -m dhr_cli cams --uss lite0` (gloo, CPU) writes the store one process
    writes, bit for bit (both on one thread); after a crash of rank 1 (its shard half written) and
    without the merged store, --resume computes only the missing items."""
    from dhr_cli.testing.synthetic import make_dataset

    data = make_dataset(tmp_path / "d", n_images=5, stores=False)
    args = ["cams", "--data", data, "--uss", "lite0", "--side", 64, "--scales", "1.0,0.5", "--device", "cpu", "--quiet"]
    one = tmp_path / "one.h5"
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one process in this one (no interpreter start-up), on one thread like each rank
    try:
        r = CliRunner().invoke(app, [*map(str, args), "--out", str(one)])
    finally:
        torch.set_num_threads(threads)
    assert r.exit_code == 0, r.output[-2000:]
    two = tmp_path / "two.h5"
    proc = _torchrun("-m", "dhr_cli", *args, "--out", two)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "one.h5", "two.h5"]  # shards merged, removed
    _features_equal(one, two)
    with open_store(two) as s:
        assert s.provenance["world_size"] == 2 and "rank" not in s.provenance

    # Rank 0 finished its shard, rank 1 wrote one item and died; the merged store was never written.
    with open_store(one) as s:
        ids = s.ids
        source_attrs = {"source": s.attrs["source"], "source_kind": s.attrs["source_kind"]}
        classes = s.classes
        prov = s.provenance  # the same command, options and inputs: --resume accepts the shards
        shape = s.read(ids[0]).features.shape  # (channels after --feature-rank, h, w)
    kept = shard(ids, Rank(0, 2)) + shard(ids, Rank(1, 2))[:1]
    w0 = create_store(shard_path(two, Rank(0, 2)), "features", classes, provenance=prov,
                      root_attrs=source_attrs)
    w1 = create_store(shard_path(two, Rank(1, 2)), "features", classes, provenance=prov,
                      root_attrs=source_attrs)
    for i in kept:  # 7.0 marks an item that must not be recomputed
        (w0 if i in shard(ids, Rank(0, 2)) else w1).write(i, {"features": np.full(shape, 7, np.float16)},
                                                          {"features": {"image_size": [120, 160]}})
    w0.close(complete=True)
    w1.close(complete=False)  # leaves two.rank1-of-2.h5.partial
    two.unlink()
    proc = _torchrun("-m", "dhr_cli", *args, "--out", two, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "0 images written, 3 already there" in proc.stdout and "1 images written, 1 already there" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "one.h5", "two.h5"]
    with open_store(one) as ref, open_store(two) as s:
        assert s.ids == ids
        for i in ids:
            if i in kept:
                assert (s.read(i).features == 7).all()
            else:
                np.testing.assert_array_equal(s.read(i).arrays["features"], ref.read(i).arrays["features"])


@pytest.mark.slow
def test_a_torchrun_store_resumes_in_one_process_and_under_torchrun_with_its_own_options_only(tmp_path):
    """Each rank's dataset fingerprint covers its own ids: one process resuming a torchrun-merged store was
    refused ("input data changed"), while torchrun resuming it with another tau mixed the new masks in."""
    from dhr_cli.testing.synthetic import make_dataset

    data = make_dataset(tmp_path / "d", n_images=6)
    seeds, out = tmp_path / "seeds.h5", tmp_path / "masks.h5"
    assert CliRunner().invoke(app, ["seed", "--cams", str(data / "cams.h5"), "--data", str(data), "--out",
                                    str(seeds), "--no-crf", "-q"]).exit_code == 0
    args = ["propagate", "--seeds", seeds, "--data", data, "--uss", data / "uss.h5", "--wss", data / "wss.h5",
            "--no-crf", "-q", "--out", out]
    proc = _torchrun("-m", "dhr_cli", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open_store(out) as s:
        before = {i: s.read(i).mask.copy() for i in s.ids}
    r = CliRunner().invoke(app, [*map(str, args), "--resume"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, [*map(str, args), "--resume", "--tau", "0.3"])
    assert r.exit_code == 1 and "tau: 0.8 (partial) vs 0.3 (this run)" in r.output, r.output
    proc = _torchrun("-m", "dhr_cli", *args, "--resume", "--tau", "0.3")
    assert proc.returncode != 0 and "tau: 0.8 (partial) vs 0.3 (this run)" in proc.stderr, proc.stderr[-2000:]
    proc = _torchrun("-m", "dhr_cli", *args, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open_store(out) as s:
        assert sorted(s.ids) == sorted(before) and all((s.read(i).mask == m).all() for i, m in before.items())


def test_resume_ids_of_merged_stores_are_compared_per_rank_or_left_out():
    from dhr_cli.io.provenance import provenance_differences

    def prov(data_id, **extra):
        return {"command": "propagate", "options": {"tau": 0.8}, "inputs": {"data": "d"}, "input_paths": {"data": "/d"},
                "input_ids": {"data": f"dataset:{data_id}"}, **extra}

    changed = ["input data: d changed since the partial run (its split's ids, images or label files)"]
    assert provenance_differences(prov("all"), prov("other")) == changed  # one process, both runs
    merged = prov("rank0", world_size=2, merged_from=["a", "b"],
                  rank_input_ids={"0": {"data": "dataset:rank0"}, "1": {"data": "dataset:rank1"}})
    assert provenance_differences(merged, prov("rank1", rank=1, world_size=2)) == []
    assert provenance_differences(merged, prov("edited", rank=1, world_size=2)) == changed
    assert provenance_differences(merged, prov("all")) == []  # one process: no fingerprint of all ids to compare
    assert provenance_differences(prov("node0", merged_from=["p0", "p1"]), prov("all")) == []  # `dhr merge` of parts
    assert provenance_differences(merged, {**prov("all"), "options": {"tau": 0.3}}) == [
        "tau: 0.8 (partial) vs 0.3 (this run)"]
