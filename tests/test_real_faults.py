"""Faults injected from outside, as an acceptance checker does (a really full disk, SIGKILL of the
torchrun launcher): each test reproduces one that broke the one-line-error / resume contract."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dhr_cli.cli import app
from dhr_cli.errors import StoreError
from dhr_cli.io import store as store_mod
from dhr_cli.io.store import create_store, open_store
from dhr_cli.testing.synthetic import make_dataset

runner = CliRunner()
CLASSES = ["background", "cat"]
ROOT = Path(__file__).parents[1]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip() and not line.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in text, text[-2000:]
    return lines[0]


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("realfaults") / "data", n_images=6, seed=3)


# ---- a full disk while the lock or the empty partial is written ------------------------------
class _FullFile:
    def __init__(self, fd):
        self.fd = fd

    def __enter__(self):
        return self

    def write(self, _text):
        return 0

    def __exit__(self, *exc):
        os.close(self.fd)
        _enospc()  # the write is flushed at close: that is where a full disk answers


def test_full_disk_while_writing_the_lock_is_one_line_and_leaves_no_empty_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod.os, "fdopen", lambda fd, mode: _FullFile(fd))
    with pytest.raises(StoreError) as e:
        create_store(tmp_path / "m.h5", "masks", CLASSES, provenance={})
    assert "m.h5.lock" in str(e.value) and "No space left" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # was: an empty m.h5.lock left behind


def test_full_disk_while_creating_the_partial_leaves_nothing_and_says_so(tmp_path, monkeypatch):
    # libhdf5's answer when the first flush of a new file meets a full disk.
    def flush(self):
        raise RuntimeError("Unable to synchronously flush file (file write failed: errno = 28, "
                           "error message = 'No space left on device')")

    monkeypatch.setattr(store_mod.h5py.File, "flush", flush)
    with pytest.raises(StoreError) as e:
        create_store(tmp_path / "m.h5", "masks", CLASSES, provenance={})
    assert "m.h5.partial: disk full" in str(e.value) and getattr(e.value, "hdf5_unsound", False)
    # was: an attribute-less m.h5.partial that --resume refused ("holds None with classes []") and a
    # plain rerun refused too; and from the CLI a traceback
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.undo()
    with create_store(tmp_path / "m.h5", "masks", CLASSES, provenance={}) as w:
        w.write("a", {"mask": np.ones((2, 2), np.uint8)})
    with open_store(tmp_path / "m.h5") as s:
        assert s.ids == ["a"]


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.parametrize("free_kib", [0, 8])
def test_really_full_disk_before_the_first_item_is_one_line_from_the_cli(synth, tmp_path, free_kib):
    mnt = tmp_path / "small"
    if not _tmpfs(mnt, "1M"):
        pytest.skip("needs root to mount a tmpfs")
    try:
        st = os.statvfs(mnt)
        (mnt / "filler").write_bytes(b"\1" * (st.f_bavail * st.f_frsize - free_kib * 1024))
        argv = [sys.executable, "-m", "dhr_cli", "seed", "--cams", str(synth / "cams.h5"), "--data", str(synth),
                "--out", str(mnt / "s.h5"), "--no-crf", "-q"]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert r.returncode == 1
        line = one_line(r.stderr)  # was, at 8 KiB: a rich traceback from h5py's flush
        assert str(mnt / "s.h5") in line
        assert sorted(p.name for p in mnt.iterdir()) == ["filler"]
        (mnt / "filler").unlink()
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-1500:]
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# ---- a full disk under eval --json, eval --report, export ------------------------------------
@pytest.fixture(scope="module")
def masks(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("rf_masks") / "masks.h5"
    assert invoke("import", "png", synth / "masks", "--data", synth, "--out", out, "-q").exit_code == 0
    return out


def test_eval_json_on_a_full_disk_names_the_file_and_leaves_no_temp_file(synth, masks, tmp_path, monkeypatch):
    monkeypatch.setattr(Path, "write_text", _enospc)
    r = invoke("eval", "--pred", masks, "--data", synth, "--json", tmp_path / "r.json", "-q")
    assert r.exit_code == 1
    line = one_line(r.stderr)
    assert str(tmp_path / "r.json") in line and "No space left" in line  # was: "Error: No space left on device"
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # was: .r.json.tmp left behind


def test_report_overwritten_on_a_full_disk_leaves_no_page_that_shows_mixed_images(synth, masks, tmp_path,
                                                                                  monkeypatch):
    rep = tmp_path / "rep"
    assert invoke("eval", "--pred", masks, "--data", synth, "--report", rep, "-q").exit_code == 0
    assert (rep / "index.html").exists()
    from PIL import Image

    real, calls = Image.Image.save, {"n": 0}

    def save(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 3:
            _enospc()
        return real(self, *a, **k)

    monkeypatch.setattr(Image.Image, "save", save)
    r = invoke("eval", "--pred", masks, "--data", synth, "--report", rep, "--overwrite", "-q")
    assert r.exit_code == 1
    line = one_line(r.stderr)
    assert str(rep / "img") in line and "incomplete" in line
    # was: the old index.html kept, showing 3 new thumbnails among old ones, as if complete
    assert not (rep / "index.html").exists()
    assert not [p for p in rep.rglob(".*.tmp")]


def test_export_on_a_full_disk_names_the_file(masks, tmp_path, monkeypatch):
    import dhr_cli.io.palette as palette

    monkeypatch.setattr(palette, "save_palette_png", _enospc)
    r = invoke("export", masks, "--out", tmp_path / "png", "-q")
    assert r.exit_code == 1
    assert str(tmp_path / "png") in one_line(r.stderr)  # was: "Error: No space left on device"
    assert not (tmp_path / "png").exists()


def test_a_second_export_into_a_folder_being_exported_to_is_one_line_and_mixes_nothing(masks, tmp_path):
    """Export had no lock: two exports of different stores into one folder at once mixed their PNGs."""
    import socket

    out = tmp_path / "png"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # a live export elsewhere holds png.lock
        (tmp_path / "png.lock").write_text(f"{other.pid} {socket.gethostname()}\n")
        r = invoke("export", masks, "--out", out, "-q")
        assert r.exit_code == 1
        assert f"{tmp_path / 'png.lock'}: {out} is being written by PID {other.pid}" in one_line(r.stderr)
        assert not out.exists()
    finally:
        other.kill()
        other.wait()
    r = invoke("export", masks, "--out", out, "-q")  # its process gone: the lock is stale, taken over
    assert r.exit_code == 0, r.stderr
    assert len(list(out.glob("*.png"))) > 0 and not (tmp_path / "png.lock").exists()


def test_a_write_failing_inside_hdf5_leaves_no_lock_and_resumes(synth, tmp_path):
    """After a failed HDF5 write the command line leaves at once (os._exit: libhdf5 may crash while
    freeing its handles), which skipped the lock's release: a dead run's OUT.lock stayed behind."""
    out = tmp_path / "s.h5"
    argv = [sys.executable, "-m", "tests.fault_cli", "seed", "--cams", str(synth / "cams.h5"), "--data", str(synth),
            "--out", str(out), "--no-crf", "-q"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "DHR_TEST_FAIL_AT": "3"})
    assert r.returncode == 1
    assert "s.h5.partial: disk full while writing item" in one_line(r.stderr)
    assert (tmp_path / "s.h5.partial").exists() and not (tmp_path / "s.h5.lock").exists()
    r = subprocess.run([*argv, "--resume"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0 and "stale lock" not in r.stderr, r.stderr[-1500:]


# ---- SIGKILL of the torchrun launcher ----------------------------------------------------------
_LAUNCHER = """
import os, subprocess, sys, time
env = {**os.environ, "TORCHELASTIC_RUN_ID": "test", "WORLD_SIZE": "2", "RANK": "0"}
code = ("import dhr_cli, time; print('imported', flush=True); " + sys.argv[1] + "; "
        "from dhr_cli.io.distributed import _die_with_launcher; _die_with_launcher(); print('ready', flush=True); "
        "time.sleep(120)")
child = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True, stdout=subprocess.PIPE, text=True)
print(child.pid, flush=True)
for line in child.stdout:
    print(line.strip(), flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux")
@pytest.mark.parametrize("when", ["after", "before"])
def test_a_rank_dies_with_its_torchrun_launcher(when):
    """torchrun starts each rank in its own session: SIGKILL of the launcher (or of its process group)
    left the ranks waiting at a barrier for its 12-hour timeout, rank 0 holding OUT.lock as a live PID,
    so every rerun was refused. `before`: the launcher dies while the rank is still starting up."""
    wait = "time.sleep(1.5)" if when == "before" else "pass"
    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER, wait], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    rank = int(launcher.stdout.readline())
    try:
        assert launcher.stdout.readline().strip() == "imported"
        if when == "after":
            assert launcher.stdout.readline().strip() == "ready"
        launcher.kill()
        launcher.wait()
        deadline = time.time() + 15
        while _alive(rank) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(rank), "the rank outlived its launcher"
    finally:
        if _alive(rank):
            os.kill(rank, signal.SIGKILL)


# ---- a second writer -----------------------------------------------------------------------------
def test_a_live_writers_partial_is_named_as_such_not_as_an_interrupted_run(tmp_path):
    """Two identical commands started together: the second's up-front output check met the first's
    OUT.partial and called it "an interrupted run; pass --resume", while that run was alive."""
    from dhr_cli.io.outputs import check_output

    out = tmp_path / "m.h5"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "m.h5.partial").write_bytes(b"")
        (tmp_path / "m.h5.lock").write_text(f"{other.pid} {os.uname().nodename}\n")
        with pytest.raises(StoreError) as e:
            check_output(out)
        assert f"being written by PID {other.pid}" in str(e.value) and "interrupted" not in str(e.value)
    finally:
        other.kill()
        other.wait()
    with pytest.raises(StoreError) as e:  # once that process is gone it is an interrupted run again
        check_output(out)
    assert "an interrupted run is there" in str(e.value)


def test_merge_on_a_full_disk_does_not_advise_a_resume_it_lacks(tmp_path, monkeypatch):
    from dhr_cli.io.distributed import merge_stores

    parts = []
    for k in range(2):
        parts.append(tmp_path / f"p{k}.h5")
        with create_store(parts[-1], "masks", CLASSES, provenance={}) as w:
            w.write(f"i{k}", {"mask": np.full((4, 4), k, np.uint8)})
    real = os.statvfs

    class Full:
        f_bavail, f_frsize = 0, 4096

    monkeypatch.setattr(os, "statvfs", lambda p: Full() if str(p).endswith(".partial") else real(p))
    with pytest.raises(StoreError) as e:
        merge_stores(parts, tmp_path / "m.h5")
    assert "disk full" in str(e.value) and "--resume" not in str(e.value)  # `dhr merge` has no --resume
    assert not (tmp_path / "m.h5.partial").exists() and not (tmp_path / "m.h5.lock").exists()


def test_a_rank_whose_peer_stopped_says_so_in_one_line_not_a_gloo_traceback(monkeypatch):
    """Rank 0's merge met a full disk and exited; rank 1, at the last barrier, died with gloo's
    RuntimeError 'Connection closed by peer' as a rich traceback (cut off by torchrun's SIGTERM)."""
    import torch.distributed as dist

    from dhr_cli.io.distributed import Rank, _barrier

    def barrier():
        raise RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:1954.")

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", barrier)
    with pytest.raises(StoreError) as e:
        _barrier(Rank(1, 2))
    assert "rank 1 of 2: another process of this torchrun job stopped" in str(e.value) and "--resume" in str(e.value)


# ---- export killed inside its window of renames ---------------------------------------------------
def _killed_export(masks, out, step, *extra, sig="KILL"):
    env = dict(os.environ, DHR_TEST_KILL_AT_EXPORT=str(step), DHR_TEST_EXPORT_SIGNAL=sig)
    r = subprocess.run([sys.executable, "-m", "tests.fault_cli", "export", str(masks), "--out", str(out), "-q", *extra],
                       capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    if sig == "KILL":
        assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    return r


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_a_new_export_folder_killed_at_any_step_is_absent_or_complete(masks, tmp_path):
    """A new DIR is staged beside it and appears in one rename: a kill while writing leaves no DIR
    (it used to leave DIR with a hidden staging folder in it), and the next export cleans up."""
    assert invoke("export", masks, "--out", tmp_path / "ref", "-q").exit_code == 0
    ref = _pngs(tmp_path / "ref")
    out = tmp_path / "png"
    for step in (1, len(ref)):  # the first PNG, the last one (the stage is complete, not yet renamed)
        _killed_export(masks, out, step)
        assert not out.exists()
    r = invoke("export", masks, "--out", out, "-q")
    assert r.exit_code == 0, r.output
    assert _pngs(out) == ref and sorted(p.name for p in tmp_path.iterdir()) == ["png", "ref"]


def test_an_overwrite_killed_among_its_moves_is_refused_by_readers_and_finished_by_the_next_export(
        synth, masks, tmp_path, caplog):
    """Killed after some of its files had replaced the old ones, an export used to leave DIR a silent mix."""
    assert invoke("export", masks, "--out", tmp_path / "ref", "-q").exit_code == 0
    ref = _pngs(tmp_path / "ref")
    out = tmp_path / "png"
    out.mkdir()
    for name in ref:  # an older export's files of the same names
        (out / name).write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    n = len(ref)
    _killed_export(masks, out, n + 1 + 2, "--overwrite")  # n PNGs staged, the marker's rename, 1 file moved in
    moved = [name for name in ref if (out / name).read_bytes() != b"old"]
    assert len(moved) == 1  # the window the test is about: DIR is a mix
    r = invoke("import", "png", out, "--data", synth, "--out", tmp_path / "m.h5")
    assert r.exit_code == 1 and "was killed while moving its files" in one_line(r.output)
    assert not (tmp_path / "m.h5").exists()
    # Every reader of a PNG folder (eval --pred, seed --init-masks, train --masks: MaskSource) refuses it too.
    r = invoke("eval", "--pred", out, "--data", synth, "--json", tmp_path / "r.json")
    assert r.exit_code == 1 and "was killed while moving its files" in one_line(r.output)
    assert not (tmp_path / "r.json").exists()
    r = invoke("seed", "--cams", synth / "cams.h5", "--data", synth, "--init-masks", out, "--no-crf",
               "--out", tmp_path / "s.h5", "-q")
    assert r.exit_code == 1 and "was killed while moving its files" in one_line(r.output)
    r = invoke("export", masks, "--out", out)  # no --overwrite: the killed export is finished, then refused
    assert r.exit_code == 1 and "pass --overwrite" in one_line(r.output)
    assert "finishing the export of PID" in caplog.text
    assert _pngs(out) == ref and (out / "notes.txt").read_text() == "mine"
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    r = invoke("import", "png", out, "--data", synth, "--out", tmp_path / "m.h5")
    assert r.exit_code == 0, r.output


def test_an_overwrite_terminated_among_its_moves_is_refused_by_readers_and_finished_by_the_next_export(
        synth, masks, tmp_path):
    """A SIGTERM (or Ctrl-C) among the moves used to remove the marked staging folder on the way out, with
    the files not yet moved: DIR was left a mix of two exports that every reader took without a word."""
    assert invoke("export", masks, "--out", tmp_path / "ref", "-q").exit_code == 0
    ref = _pngs(tmp_path / "ref")
    out = tmp_path / "png"
    out.mkdir()
    for name in ref:
        (out / name).write_bytes(b"old")
    r = _killed_export(masks, out, len(ref) + 1 + 2, "--overwrite", sig="TERM")  # stopped after 1 file moved in
    assert r.returncode == 143 and "terminated (SIGTERM)" in one_line(r.stderr)
    assert len([name for name in ref if (out / name).read_bytes() != b"old"]) == 1
    r = invoke("import", "png", out, "--data", synth, "--out", tmp_path / "m.h5")
    assert r.exit_code == 1 and "was killed while moving its files" in one_line(r.output)
    r = invoke("export", masks, "--out", out)  # the stopped export is finished first
    assert _pngs(out) == ref and [p.name for p in out.iterdir() if p.name.startswith(".")] == []
