"""Output safety shared by every command: the up-front check of an output path, atomic text writes,
and OUT.lock (one writer per output, stale locks of dead or reused PIDs taken over)."""

from __future__ import annotations

import os
import re
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from dhr_cli.errors import StoreError


def write_text_atomic(path: Path, text: str) -> None:
    """`text` into `path` through a per-process temporary and one rename (two writers never share a
    temporary); a full disk or `ulimit -f` leaves what was there before, no temporary, and one line."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"{path}: could not be written ({e.strerror or e}); it was left as it was, "
                         "free space and rerun") from None


def check_output_path(path: Path) -> None:
    """OUT must name a regular file (or nothing yet) in an existing folder: never a device, FIFO,
    directory, or a symlink to one of those."""
    path = Path(path)
    if path.is_dir():
        raise StoreError(f"{path}: is a directory, expected an output file name")
    if os.path.lexists(path):
        try:
            st = os.stat(path)
        except OSError:
            raise StoreError(f"{path}: is a dangling symlink, expected an output file name") from None
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(f"{path}: is not a regular file (a device, FIFO or socket); choose an output file name")
    if not path.parent.exists():
        raise StoreError(f"{path}: folder {path.parent} does not exist")


def check_output(path, *, folder: bool = False, overwrite: bool = False, resume: bool = False,
                 resumable: bool = True, inputs: dict[str, Any] | None = None) -> Path:
    """The one up-front check of an output path, called by every command before any work starts, so
    a run never fails at its end for want of a place to write.

    A file (stores, `uss fit`'s head, `eval --json`, `cams --save-head`): a regular file name or nothing
    yet, in an existing folder (`check_output_path`); an existing OUT needs --overwrite (or --resume when
    the command is `resumable`), and so does an interrupted OUT.partial. A folder (`export`,
    `eval --report`, `train --out`): not a file, in an existing folder; a non-empty one needs --overwrite
    (or --resume). Never one of the command's `inputs` ({option: path or paths}), a folder holding one,
    or a part of an input dataset (`check_not_input`): --overwrite would replace them."""
    path = Path(path)
    if overwrite and resume:
        raise StoreError(f"{path}: --overwrite and --resume exclude each other")
    check_not_input(path, inputs or {}, folder=folder)
    hint = "pass --overwrite to replace it" + (" or --resume to complete it" if resumable else "")
    if folder:
        if os.path.lexists(path) and not path.is_dir():
            raise StoreError(f"{path}: is a file, expected a folder")
        if path.is_dir():
            if any(path.iterdir()) and not (overwrite or resume):
                raise StoreError(f"{path}: folder exists and is not empty; {hint}")
        elif not path.parent.is_dir():
            raise StoreError(f"{path}: folder {path.parent} does not exist")
        return path
    check_output_path(path)
    partial = partial_path(path)
    if (path.exists() or (resumable and partial.exists())) and not (overwrite or resume):
        _refuse_if_being_written(path)  # a live writer's partial is not "an interrupted run"
    if path.exists() and not (overwrite or resume):
        raise StoreError(f"{path}: already exists; {hint}")
    if resumable and partial.exists() and not (overwrite or resume):
        raise StoreError(f"{partial}: an interrupted run is there; pass --resume to continue it or --overwrite "
                         "to start again")
    return path


def check_not_input(out: Path, inputs: dict[str, Any], *, folder: bool = False) -> None:
    """Refuse an existing OUT that is an input of the same command, holds one (a folder), or is a
    file or folder that an input dataset reads (its classes.txt, its masks/): --overwrite would
    replace them. A dataset the command does not read may receive outputs (export into a new
    SegmentationClassAug/ is how masks reach another trainer)."""
    from dhr_cli.io.datasets import dataset_part

    if not os.path.lexists(out):
        return
    part_of = None
    for option, value in inputs.items():
        if option == "split":  # a name, not a path
            continue
        for given in value if isinstance(value, (list, tuple)) else [value]:
            if given is None or str(given) == "" or not os.path.lexists(given):
                continue
            given = Path(given)
            if os.path.samefile(out, given):
                raise StoreError(f"{out}: is also the input {option}; write the output to another path")
            if folder and out.is_dir() and Path(os.path.realpath(given)).is_relative_to(os.path.realpath(out)):
                raise StoreError(f"{out}: holds the input {option} ({given}); write the output to another folder")
            if given.is_dir():
                part_of = part_of or dataset_part(out) or False
                if part_of and os.path.samefile(part_of, given):
                    raise StoreError(f"{out}: is read by the dataset {option} {given}; write the output elsewhere")


def check_replaceable(folder: Path, recognised: Callable[[Path], bool], what: str) -> None:
    """--overwrite of a command that removes its whole output folder (`dhr train`, `dhr demo`): only an
    empty folder or one `recognised` as `what` may go, never a file or a user's folder named by mistake."""
    folder = Path(folder)
    if folder.is_symlink():  # rmtree refuses links; removing what one points to would surprise
        raise StoreError(f"{folder}: is a symbolic link; --overwrite removes nothing through a link, "
                         "give the folder itself")
    if os.path.lexists(folder) and not folder.is_dir():
        raise StoreError(f"{folder}: is a file, not a folder; nothing was removed")
    if folder.is_dir() and any(folder.iterdir()) and not recognised(folder):
        raise StoreError(f"{folder}: does not look like {what}, so --overwrite removes nothing; "
                         "choose another folder, or empty it yourself")


def holds_only(folder: Path, names: Iterable[str]) -> bool:
    """Every entry of `folder` is one of `names` or a side file dhr writes beside one: X.partial, X.lock,
    or .X.<pid>.tmp (an atomic write's temporary, which a kill leaves)."""
    names = set(names)
    return all(_written_name(p.name) in names for p in Path(folder).iterdir())


def _written_name(name: str) -> str:
    """The output a side file belongs to: X for X.partial, X.lock, X.partial.lock and .X.<pid>.tmp."""
    temporary = re.fullmatch(r"\.(.+)\.\d+\.tmp", name)
    return temporary.group(1) if temporary else name.removesuffix(".lock").removesuffix(".partial")


def _refuse_if_being_written(out: Path) -> None:
    """The lock's own one-line refusal when OUT.lock names a live process on this host."""
    lock = lock_path(out)
    pid, host = _lock_owner(lock)
    if (pid is not None and pid != os.getpid() and host in ("", socket.gethostname())
            and pid_alive(pid, written_at(lock))):
        raise StoreError(_live_writer(lock, out, pid, host))


def _lock_owner(lock: Path) -> tuple[int | None, str]:
    """(PID, host) a lock file names; (None, '') when it is absent, empty or garbage."""
    try:
        text = lock.read_text().split()
        return int(text[0]), (text[1] if len(text) > 1 else "")
    except (OSError, ValueError, IndexError):
        return None, ""


def _live_writer(lock: Path, out, pid: int, host: str, resumable: bool = True) -> str:
    where = f" on {host}" if host else ""
    rerun = "rerun with --resume" if resumable else "rerun"
    return f"{lock}: {out} is being written by PID {pid}{where} (a live process); wait for it, or stop it and {rerun}"


def pid_alive(pid: int, since: float | None = None) -> bool:
    """Whether process `pid` runs. `since`: when the file naming it (a lock, a staging folder) was last
    written (epoch seconds); a process of that PID that started after it is another one, the PID reused
    since the writer died (a reboot, or the PIDs wrapping around), and does not count."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):  # no /proc (macOS): the answer of kill(0)
        return True
    # A zombie (killed, not yet reaped by its parent) still answers kill(0) but writes nothing more.
    if fields[0] == b"Z":
        return False
    started = _process_start(fields)
    return since is None or started is None or started <= since + _CLOCK_SLACK_S


_CLOCK_SLACK_S = 2.0  # /proc/stat's boot time is whole seconds; file times and the clock can differ a little


def _process_start(stat_fields: list[bytes]) -> float | None:
    """A process's start (epoch seconds) from its /proc/PID/stat fields after the name: field 22 of
    proc(5), clock ticks after boot, plus the boot time of /proc/stat."""
    try:
        with open("/proc/stat", "rb") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith(b"btime "))
        return boot + int(stat_fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, IndexError, ValueError):
        return None


def written_at(path: Path) -> float | None:
    """A file's (or folder's) modification time, None when it is gone: the `since` of `pid_alive`."""
    try:
        return Path(path).stat().st_mtime
    except OSError:
        return None


class OutputLock:
    """OUT.lock, created with O_CREAT|O_EXCL and holding 'PID HOST': one writer per output. A lock
    whose process is gone (same host, PID not alive, or alive but started after the lock was written)
    is stale: it is named and taken over."""

    def __init__(self, out: Path, resumable: bool = True):
        self.path = lock_path(out)
        self.held = False
        self.pid = os.getpid()
        host = socket.gethostname()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid, owner = self._owner()
                if pid is not None and owner and owner != host:
                    # A PID on another host cannot be checked from here: the lock counts as live.
                    raise StoreError(f"{self.path}: {out} is being written by PID {pid} on host {owner}, which this "
                                     f"host ({host}) cannot check, so the lock is treated as live; if that run is "
                                     f"dead, delete {self.path} and rerun{' with --resume' if resumable else ''}"
                                     ) from None
                if pid is not None and pid != os.getpid() and pid_alive(pid, written_at(self.path)):
                    raise StoreError(_live_writer(self.path, out, pid, owner, resumable)) from None
                if pid == os.getpid():  # taken further up by this process (rank 0 around its merge)
                    return
                print(f"note: {self.path}: stale lock of PID {pid} on {owner or '?'} (not running); taking it over",
                      file=sys.stderr)
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                continue
            except OSError as e:
                raise StoreError(f"{self.path}: cannot create the lock file ({e.strerror})") from None
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(f"{os.getpid()} {host}\n")
            except OSError as e:  # disk full: an empty lock would be left behind, looking live or garbage
                try:
                    os.unlink(self.path)
                except OSError:
                    pass
                raise StoreError(f"{self.path}: cannot write the lock file ({e.strerror}); free space and rerun") from None
            self.held = True
            self.pid = os.getpid()
            return
        raise StoreError(f"{self.path}: could not take the lock (another writer keeps racing for it)")

    def _owner(self) -> tuple[int | None, str]:
        pid, host = _lock_owner(self.path)
        if pid is None:  # being written right now, or garbage: an empty, fresh one counts as live
            try:
                if time.time() - self.path.stat().st_mtime < 5:
                    time.sleep(0.2)
                    pid, host = _lock_owner(self.path)
            except OSError:
                pass
        return pid, host

    def release(self) -> None:
        # Only the process that took it (not a forked child) removes it.
        if self.held and os.getpid() == self.pid:
            self.held = False
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def lock_path(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".lock")
