"""Several processes, one output: sharding by rank under torchrun, per-rank stores, and merging.

Under `torchrun --nproc-per-node N -m dhr_cli <command> ...` (torchrun sets RANK, WORLD_SIZE,
LOCAL_RANK) every per-item command takes the items `ids[rank::world]` of the sorted id list,
writes them to its own store `OUT.rank<r>-of-<w>.h5` (atomic, resumable like any store), waits
for the others, and rank 0 merges the shards into OUT. A crashed rank is rerun with --resume and
redoes only its missing items; `dhr merge` does the last step by hand (one store per node, say).
Without torchrun all of this reduces to plain `create_store`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from dhr_cli.errors import StoreError
from dhr_cli.io.datasets import class_mismatch
from dhr_cli.io.outputs import OutputLock, check_output, partial_path
from dhr_cli.io.provenance import option_differences, provenance_differences
from dhr_cli.io.store import StoreWriter, create_store, open_store, validate_item

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_rank() -> Rank:
    """This process's place under torchrun (rank 0 of 1 when run plainly)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not (0 <= rank < world):
        raise StoreError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return Rank(rank, world, local)


def shard(ids: Sequence[str], rank: Rank | None = None) -> list[str]:
    """The items this rank handles: every world-th id of the sorted list, from position rank."""
    rank = rank or current_rank()
    return sorted(ids)[rank.rank :: rank.world]


def device_for_rank(name: str, rank: Rank | None = None) -> str:
    """With several ranks on a CUDA machine, `auto`/`cuda` mean this rank's own GPU."""
    import torch

    rank = rank or current_rank()
    if rank.world > 1 and name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{rank.local_rank % torch.cuda.device_count()}"
    return name


def shard_path(out: Path, rank: Rank) -> Path:
    return out.with_name(f"{out.stem}.rank{rank.rank}-of-{rank.world}{out.suffix}")


def _barrier(rank: Rank) -> None:
    """Wait for every rank (gloo: works with or without GPUs; only used for coordination)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(hours=12))
    try:
        dist.barrier()
    except RuntimeError as e:  # gloo: "Connection closed by peer" when another rank stopped on its own error
        raise StoreError(f"rank {rank.rank} of {rank.world}: another process of this torchrun job stopped (its error "
                         f"is above: {' '.join(str(e).split())[:120]}); fix it and rerun the same command with "
                         "--resume") from None


def interrupted(out: Path, rank: Rank | None = None) -> bool:
    """Whether this rank's store for OUT was left half-written (so a rerun should resume it)."""
    rank = rank or current_rank()
    out = Path(out)
    path = out if rank.world == 1 else shard_path(out, rank)
    return partial_path(path).exists()


@contextlib.contextmanager
def output_store(out: Path, kind: str, classes: list[str], *, provenance: dict, overwrite: bool = False,
                 resume: bool = False, root_attrs: dict | None = None) -> Iterator[StoreWriter]:
    """`create_store` for this rank; under torchrun, rank 0 merges every rank's shard into OUT at the end.

    Resuming under torchrun (same number of processes): each rank resumes its own shard (a
    complete one is kept, a `.partial` one is completed, a missing one is redone), and the items
    of an OUT already merged by an earlier run count as done; they are merged back into OUT.
    """
    rank = current_rank()
    out = Path(out)
    if rank.world == 1:
        with create_store(out, kind, classes, provenance=provenance, overwrite=overwrite, resume=resume,
                          root_attrs=root_attrs) as writer:
            yield writer
        return
    check_output(out, overwrite=overwrite, resume=resume)
    _die_with_launcher()
    # Rank 0 holds OUT.lock for the whole run (shards and merge); each shard has its own lock too.
    lock = OutputLock(out) if rank.is_main else None
    try:
        yield from _sharded(out, kind, classes, rank, provenance, overwrite, resume, root_attrs)
    finally:
        if lock is not None:
            lock.release()


def _die_with_launcher() -> None:
    """Under torchrun each rank runs in its own session, so a SIGKILL of the launcher (or of its
    process group) left the ranks waiting at the next barrier for its 12-hour timeout, rank 0
    holding OUT.lock as a live process: the rank now gets SIGKILL when its launcher dies, like the
    whole job's kill that --resume continues from."""
    if os.environ.get("TORCHELASTIC_RUN_ID") is None:  # not started by torchrun: no launcher to follow
        return
    import dhr_cli
    from dhr_cli.io.loading import kill_me_with_parent

    kill_me_with_parent(dhr_cli._PARENT_AT_START)


def _sharded(out, kind, classes, rank, provenance, overwrite, resume, root_attrs):
    merged_before: set[str] = set()
    if resume and out.exists():
        with open_store(out) as previous:
            if previous.kind != kind or previous.classes != classes:
                raise StoreError(f"{out}: holds {previous.kind!r} with classes {previous.classes}, which does not "
                                 "match this run; use --overwrite")
            # The rule of a single-process --resume over a complete store, as this rank sees it.
            differ = provenance_differences(previous.provenance, {**provenance, "rank": rank.rank,
                                                                  "world_size": rank.world})
            if differ:
                raise StoreError(f"{out}: --resume with options or inputs that differ from the run that wrote it: "
                                 f"{'; '.join(differ)}; rerun with the same options or use --overwrite")
            merged_before = set(previous.ids)
    provenance = {**provenance, "rank": rank.rank, "world_size": rank.world}
    with create_store(shard_path(out, rank), kind, classes, provenance=provenance, overwrite=overwrite,
                      resume=resume, root_attrs=root_attrs) as writer:
        # Items already in OUT are done: `id in writer` holds for them; they stay out of the shard.
        writer.done.update(merged_before - writer.done)
        yield writer
    _barrier(rank)
    if rank.is_main:
        shards = [shard_path(out, Rank(r, rank.world)) for r in range(rank.world)]
        keep = [out] if merged_before else []  # after the shards: an item in both is taken from its shard
        by_rank = {}
        for r, path in enumerate(shards):
            with open_store(path) as s:
                by_rank[str(r)] = s.provenance.get("input_ids") or {}
        merge_stores(shards + keep, out, overwrite=True, skip_duplicates=bool(keep),
                     extra_provenance={"rank_input_ids": by_rank})
        for path in shards:
            path.unlink()
    _barrier(rank)


def merge_stores(inputs: Sequence[Path], out: Path, *, overwrite: bool = False, quiet: bool = True,
                 skip_duplicates: bool = False, extra_provenance: dict | None = None) -> int:
    """Copy every item of stores of one kind and class list into one store; returns the item count.

    An item id in two inputs is an error, unless `skip_duplicates` (then the first input's copy is
    kept). `out` may be one of the inputs when `overwrite` (the merge is written aside, then renamed).
    """
    if not inputs:
        raise StoreError("merge needs at least one input store")
    stores = [open_store(p) for p in inputs]
    try:
        first = stores[0]
        for s in stores[1:]:
            if s.kind != first.kind:
                raise StoreError(f"{s.path}: holds {s.kind!r}, but {first.path} holds {first.kind!r}; cannot merge")
            diff = class_mismatch(s.classes, first.classes, "this store", first.path.name, key=str)  # copied as spelt
            if diff:
                raise StoreError(f"{s.path}: its classes differ from those of {first.path} ({diff}); cannot merge")
            for key in ("source", "source_kind"):  # the network a cams / features store came from
                if s.attrs.get(key) != first.attrs.get(key):
                    raise StoreError(f"{s.path}: {key} {s.attrs.get(key)!r}, but {first.path} has "
                                     f"{first.attrs.get(key)!r}: one network's maps beside another's; cannot merge")
            # The merged provenance is the first input's: items of another command or other options would
            # be published under it (and trusted by a later --resume). Paths and splits differ by node.
            p, q = first.provenance, s.provenance
            names = (s.path.name, first.path.name)
            differ = [f"command: {q.get('command')} ({names[0]}) vs {p.get('command')} ({names[1]})"] \
                if p.get("command") != q.get("command") else []
            differ += option_differences(q.get("options") or {}, p.get("options") or {}, names=names)
            if differ:
                raise StoreError(f"{s.path}: written with other options than {first.path} ({'; '.join(differ)}); "
                                 "cannot merge")
        seen: dict[str, Path] = {}
        plan: list[tuple[object, list[str]]] = []
        for s in stores:
            take = []
            for item_id in s.ids:
                if item_id in seen:
                    if skip_duplicates:
                        continue
                    raise StoreError(f"{s.path}: item {item_id!r} is also in {seen[item_id]}; cannot merge duplicates")
                seen[item_id] = s.path
                take.append(item_id)
            plan.append((s, take))
        root_attrs = {k: v for k, v in first.attrs.items()
                      if k not in ("dhr_format", "dhr_version", "kind", "classes", "ignore_index", "provenance")}
        provenance = {**first.provenance, "merged_from": [str(s.path) for s in stores],
                      "merged_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(extra_provenance or {})}
        provenance.pop("rank", None)
        partial = partial_path(out)
        if partial.exists() and not overwrite:
            raise StoreError(f"{partial}: an interrupted run is there; pass --overwrite to replace it")
        writer = create_store(out, first.kind, first.classes, provenance=provenance, overwrite=overwrite,
                              root_attrs=_jsonable(root_attrs), resumable=False)
        try:
            with writer:
                for s, take in plan:
                    for item_id in take:
                        item = s.read(item_id)
                        # float64 maps of other programs are read as float32 by every command: stored so too
                        arrays = {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in item.arrays.items()}
                        validate_item(s.kind, s.path, item_id, arrays, item.attrs, len(s.classes))  # names the input
                        writer.write(item_id, arrays, item.attrs)
        except BaseException:
            partial.unlink(missing_ok=True)  # a merge is not resumed: nothing half-done stays behind
            raise
        return len(seen)
    finally:
        for s in stores:
            s.close()


def _jsonable(attrs: dict) -> dict:
    """Root attributes back into HDF5-storable values (decoded lists/dicts become JSON or arrays)."""
    result = {}
    for k, v in attrs.items():
        if isinstance(v, dict):
            result[k] = json.dumps(v)
        elif isinstance(v, list):
            result[k] = np.asarray(v)
        elif v is not None:
            result[k] = v
    return result
