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
from dhr_cli.distributed import Rank, merge_stores, shard
from dhr_cli.errors import StoreError
from dhr_cli.store import create_store, open_store

CLASSES = ["background", "cat"]


def _masks(path, ids, value=1, classes=CLASSES):
    with create_store(path, "masks", classes, provenance={"command": "t"}) as w:
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
        from dhr_cli.distributed import output_store, shard
        ids = [f"img{{i}}" for i in range(7)]
        with output_store({str(tmp_path / 'out.h5')!r}, "masks", ["background", "cat"], provenance={{}}) as w:
            for i in shard(ids):
                w.write(i, {{"mask": np.full((2, 2), int(i[3:]), np.uint8)}})
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29531", str(script)],
                          capture_output=True, text=True, timeout=180, env=env, cwd=os.getcwd())
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open_store(tmp_path / "out.h5") as s:
        assert s.ids == sorted(f"img{i}" for i in range(7))
        assert [int(s.read(i).mask[0, 0]) for i in s.ids] == [int(i[3:]) for i in s.ids]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.py", "out.h5"]  # shards removed
