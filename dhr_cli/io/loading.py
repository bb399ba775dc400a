"""Parallel loading: per-item reading and decoding in DataLoader workers while the kernels run.

Only picklable work goes to the workers: decoding PNG/JPEG files through a Dataset, and reading
HDF5 stores by path. A loader that reads stores must open its own handles in each worker
process (HDF5 handles must not cross a fork: `StoreReaders`; one store checked up front and read
that way: `LazyStore`; masks from a store or a PNG folder: `MaskSource`). Items come back in
order, a few batches ahead at most (prefetch), so memory stays bounded whatever the number of items.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from dhr_cli.config import IGNORE_INDEX
from dhr_cli.errors import DatasetError, DhrError, InputError
from dhr_cli.io.datasets import read_index_png
from dhr_cli.io.store import Item, Store, open_store

T = TypeVar("T")


def default_workers() -> int:
    """Image decoding (cams, seed): one process per spare core, at most 4 (decoding is cheaper than
    the kernels, so the kernels keep a core)."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


@contextlib.contextmanager
def kernel_threads(device, workers: int):
    """Torch threads of this process while loader processes run beside it on the CPU.

    An OpenMP thread pool waits for its slowest thread at every parallel operation; with the
    loaders busy on the other cores those waits dominate (measured on 2 cores: several times
    slower than one thread), so the kernels keep to the cores the loaders leave. Every command
    whose loaders decode beside CPU kernels runs its loop inside this (seed: 1.6-3.5x faster
    with the CRF than an unrestricted pool on 2 cores).
    """
    if device.type != "cpu" or workers == 0:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(before, (os.cpu_count() or 1) - workers)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def store_reading_workers() -> int:
    """Store reading (propagate): one process per core, at most 4, none on a single core.

    Reading a VOC-sized item (gzip decompression of seed, USS and, for Step 3, WSS maps) and
    pooling its seed costs about twice the CPU of the kernels (measured on 2 cores: ~9 vs ~4.5
    ms per item), so the loaders get most of the cores; the kernels keep the rest (their torch
    threads are lowered while the loaders run), or run on the GPU.
    """
    cores = os.cpu_count() or 1
    return 0 if cores < 2 else min(4, cores)


def batch_workers() -> int:
    """Processes that each run whole batches on the CPU (seed, propagate: reading, decoding, the
    kernels and the CRF, one torch thread each), the main process only writing: one per core, at
    most 4, none on a single core. One torch thread per process: an OpenMP pool waits for its
    slowest thread at every operation, and on a shared machine that thread is often descheduled
    (measured on 2 cores under load ~5: propagate 51 s with 2 threads in one process, 8-12 s
    with one thread per process). The same count as `store_reading_workers`."""
    return store_reading_workers()


class StoreReaders:
    """Stores opened by path on first use in each process, one per role ("seeds", "uss", ...).

    HDF5 handles must not cross a fork: a DataLoader worker opens its own handles (and keeps them
    until it exits); a pickled copy (spawned workers) carries the paths only. The main process may
    lend the handles it has already opened and validated, used as they are while loading runs there.
    """

    def __init__(self, paths: dict[str, Path]):
        self.paths = {role: Path(p) for role, p in paths.items()}
        self._pid: int | None = None
        self._stores: dict[str, Store] = {}
        self._lent: set[str] = set()

    def lend(self, opened: dict[str, Store]) -> None:
        self._pid, self._stores, self._lent = os.getpid(), dict(opened), set(opened)

    def __getstate__(self) -> dict:
        return {"paths": self.paths, "_pid": None, "_stores": {}, "_lent": set()}

    def store(self, role: str) -> Store:
        if self._pid != os.getpid():
            self._pid, self._stores, self._lent = os.getpid(), {}, set()
        if role not in self._stores:
            self._stores[role] = open_store(self.paths[role])
        return self._stores[role]

    def close(self) -> None:
        """Close the handles this process opened (lent ones stay open: their owner closes them); a
        later read opens them again. A forked copy leaves its parent's handles alone."""
        if self._pid == os.getpid():
            for role, store in self._stores.items():
                if role not in self._lent:
                    store.close()
        self._pid, self._stores, self._lent = None, {}, set()


class LazyStore:
    """One store validated now, in the process that builds it, and read later by path in whichever
    process reads it: the main one, a forked DataLoader worker, a spawned one.

    `open_store(path, expect=expect)` checks it at construction, so a bad or wrong-kind store fails
    before any worker starts; its `kind`, `ids` (a set) and `classes` are kept and the handle closed
    again. Reads go through `StoreReaders`: each process opens its own handle on its first read, and a
    pickled copy carries the path only. `close()` closes the handle of the current process.
    """

    def __init__(self, path: str | os.PathLike, expect: str | tuple[str, ...] | None = None):
        self.path = Path(path)
        with open_store(self.path, expect=expect) as s:
            self.kind, self.ids, self.classes = s.kind, set(s.ids), list(s.classes)
        self._readers = StoreReaders({"store": self.path})

    def __contains__(self, item_id: object) -> bool:
        return item_id in self.ids

    def store(self) -> Store:
        """This process's handle (opened on first use)."""
        return self._readers.store("store")

    def read(self, item_id: str, names: Iterable[str] | None = None) -> Item:
        return self.store().read(item_id, names)

    def read_mask(self, item_id: str) -> np.ndarray:
        return self.store().read_mask(item_id)

    def image_size(self, item_id: str) -> tuple[int, int]:
        return self.store().image_size(item_id)

    def close(self) -> None:
        self._readers.close()


class MaskSource:
    """(H, W) uint8 masks by image id from a masks/seeds store or a folder of <id>.png masks
    (palette, grayscale or RGB in VOC colours: `read_index_png`), safe to read in loader workers.

    The one reader behind `dhr train --masks`, `dhr seed --init-masks` and `dhr eval --pred`: a store
    is read through `LazyStore` (validated here, one handle per process, pickled as its path), a folder
    is listed once here. `kind` is the store's kind or "png"; `ids` a set; `classes` the store's class
    list (None for a folder); `name` the file stem or folder name. A folder without PNG masks is an
    error unless `empty_folder_ok` (the caller then reports the images it lacks). Use as a context
    manager, or call close().
    """

    def __init__(self, path: str | os.PathLike, *, empty_folder_ok: bool = False, n_classes: int | None = None):
        self.path = Path(path)
        self._n_classes = n_classes  # a PNG's values are checked against it (a store checks its own classes)
        self.name = self.path.stem if self.path.is_file() else self.path.name
        self._store: LazyStore | None = None
        self._pngs: dict[str, Path] = {}
        if self.path.is_dir():
            from dhr_cli.pipeline.export import interrupted_export  # the export folder's own marks

            if mixed := interrupted_export(self.path):  # half old masks, half new: never read as one set
                raise InputError(mixed)
            self._pngs = {p.stem: p for p in self.path.iterdir() if p.suffix.lower() == ".png" and p.is_file()}
            if not self._pngs and not empty_folder_ok:
                raise InputError(f"{self.path}: folder holds no .png masks")
            self.kind, self.ids, self.classes = "png", set(self._pngs), None
        else:
            self._store = LazyStore(self.path, ("masks", "seeds"))
            self.kind, self.ids, self.classes = self._store.kind, self._store.ids, self._store.classes

    def __contains__(self, item_id: object) -> bool:
        return item_id in self.ids

    def read(self, item_id: str) -> np.ndarray:
        """The mask of an id in `ids` (StoreError from a damaged store item, DatasetError from a bad PNG)."""
        if self._store is None:
            mask = read_index_png(self._pngs[item_id])
            n = self._n_classes
            if n is not None and mask.size and int(mask.max()) >= n:
                bad = np.unique(mask[(mask >= n) & (mask != IGNORE_INDEX)])
                if len(bad):
                    raise DatasetError(f"{self._pngs[item_id]}: mask holds label values {bad.tolist()[:5]} beyond the "
                                       f"dataset's {n} classes (0..{n - 1}, 255 = ignore)")
            return mask
        return self._store.read_mask(item_id)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    def __enter__(self) -> "MaskSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CarryErrors(TorchDataset):
    """A map-style dataset whose DhrError comes back from a DataLoader worker as a value.

    DataLoader re-raises a worker's exception in the parent as a new one whose message is the worker's
    whole traceback (a 1,400-character line once the CLI joins it); carried back as a `_Failure` and
    re-raised by `raise_carried`, the error reaches the user with its own one-line message."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index):
        try:
            return self.inner[index]
        except DhrError as e:
            return _Failure(e)


class _Failure:
    def __init__(self, error: DhrError):
        self.error = error


class CarryingCollate:
    """collate_fn for a CarryErrors dataset: a batch holding a failure becomes that failure."""

    def __init__(self, collate: Callable[[list], object] | None = None):
        self.collate = collate

    def __call__(self, batch: list):
        for entry in batch:
            if isinstance(entry, _Failure):
                return entry
        if self.collate is None:
            from torch.utils.data import default_collate

            return default_collate(batch)
        return self.collate(batch)


def raise_carried(batches: Iterable) -> Iterator:
    """The batches of a loader over a CarryErrors dataset, re-raising a carried DhrError as itself.

    The loader's workers are shut down here however the iteration ends. A SIGTERM to the process group
    (a job scheduler's stop) kills them with the parent, and torch reports each dead worker as a
    RuntimeError: left to the loader's finaliser, that was a 20-line "Exception ignored" traceback after
    dhr's one line; raised first, it hid the SIGTERM.
    """
    it = iter(batches)
    try:
        for batch in it:
            if isinstance(batch, _Failure):
                raise batch.error
            yield batch
    except RuntimeError as e:
        raise _worker_death(e) from None
    finally:
        try:
            getattr(it, "_shutdown_workers", lambda: None)()
        except RuntimeError:  # a worker found dead while joining: the error in flight says why
            pass


def _worker_death(e: RuntimeError) -> BaseException:
    """What a DataLoader's 'worker (pid N) is killed by signal' means here: the SIGTERM that stops this
    command too, or a worker killed alone (by the out-of-memory killer, most often); any other error as it is."""
    from dhr_cli.errors import WorkerDiedError
    from dhr_cli.io.progress import Terminated, termination_requested

    text = " ".join(str(e).split())
    if "DataLoader worker" not in text or "exited unexpectedly" not in text and "killed by signal" not in text:
        return e
    if termination_requested():
        return Terminated()
    return WorkerDiedError(f"a loader process died ({text.rstrip('. ')}; out of memory?); what was written is kept, "
                           "rerun with --resume (a smaller --batch-size needs less memory)")


def error_carrying_loader(dataset, *, collate_fn: Callable[[list], object] | None = None, **kwargs) -> DataLoader:
    """DataLoader whose workers' DhrErrors reach the parent unchanged (iterate it through `raise_carried`)
    and whose workers die with the parent. Every DataLoader of dhr is made here."""
    if kwargs.get("num_workers"):
        # the parent's PID read here, before the fork: read in the worker it may already be the reaper's
        kwargs.setdefault("worker_init_fn", functools.partial(die_with_parent, parent=os.getpid()))
    return DataLoader(CarryErrors(dataset), collate_fn=CarryingCollate(collate_fn), **kwargs)


class _Items(TorchDataset):
    def __init__(self, ids: Sequence[str], load: Callable[[str], T]):
        self.ids = list(ids)
        self.load = load

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        return self.load(self.ids[index])


def _as_list(batch: list) -> list:
    return batch


def _drop_inherited_partials() -> None:
    """A forked worker inherits the descriptor of the output partial the parent has open, and a copy
    of libhdf5's in-memory state for it. Should that copy ever be flushed (an h5py object freed in the
    worker), stale metadata would be written over the parent's newer items. Closing the descriptor here
    makes any such write fail instead (EBADF), and no worker keeps the file open after its parent."""
    fd_dir = "/proc/self/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return
    for name in fds:
        try:
            if os.readlink(os.path.join(fd_dir, name)).endswith(".partial"):
                os.close(int(name))
        except (OSError, ValueError):
            pass


def die_with_parent(_worker_id: int = 0, parent: int | None = None) -> None:
    """DataLoader worker_init_fn: the worker gets SIGKILL when its parent dies (SIGKILL, OOM kill),
    so no orphan keeps input stores or the output partial open. Linux: prctl(PR_SET_PDEATHSIG);
    elsewhere a watchdog thread polls the parent PID. `parent`: the parent's PID, taken before the
    fork (error_carrying_loader); read here instead, a worker whose parent was killed while it
    started would take the reaper for its parent and live on (seen under torchrun at load ~8)."""
    import threading
    import time

    _drop_inherited_partials()
    parent = os.getppid() if parent is None else parent
    if kill_me_with_parent(parent):
        return

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True, name="dhr-parent-watchdog").start()


def kill_me_with_parent(parent: int) -> bool:
    """Linux: this process gets SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG), and exits at
    once when `parent` (its parent's PID as it started) is gone already. False where unsupported."""
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    return True


def iterate_batches(ids: Sequence[str], load: Callable[[str], T], batch_size: int,
                    workers: int | None = None) -> Iterator[list[T]]:
    """Yield lists of `load(id)` for consecutive ids, `batch_size` at a time, in order.

    `load` must be picklable (a module-level function or a functools.partial over one) when
    workers > 0. A DhrError raised in a worker reaches the caller unchanged.
    """
    workers = default_workers() if workers is None else workers
    if workers == 0 or len(ids) <= batch_size:
        for start in range(0, len(ids), batch_size):
            yield [load(i) for i in ids[start : start + batch_size]]
        return
    loader = error_carrying_loader(_Items(ids, load), batch_size=batch_size, shuffle=False, num_workers=workers,
                                   collate_fn=_as_list, prefetch_factor=2)
    yield from raise_carried(loader)


def batches_in_workers(ids: Sequence[str], batch_size: int, compute: Callable[[list[str]], list[tuple[str, T]]]
                       ) -> Iterator[list[tuple[str, T]]]:
    """`compute(batch of ids)` for consecutive batches of `ids`, in `batch_workers()` processes, in order:
    seed and propagate on the CPU run whole batches (reads, kernels, CRF) there and only write here."""
    chunks = [list(ids[k : k + batch_size]) for k in range(0, len(ids), batch_size)]
    return (r[0] for r in iterate_batches(chunks, compute, 1, workers=batch_workers()))
