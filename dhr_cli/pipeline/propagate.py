"""`dhr propagate` as a library: Steps 2 and 3 of docs/method.md over a whole split, in batches.

    run_propagate(PropagateConfig(), seeds="seeds.h5", data="data/voc", uss="uss.h5",
                  wss=["cams.h5"], out="masks.h5", cams="cams.h5")

USS and WSS sources are stores (a features store, or a cams store's `features`). The same
inputs also drive two baselines users can run on their own data: `method="cam"` (CAM argmax
against a constant background score) and `method="rw"` (PSA/AffinityNet random walk).
The kernels are in `dhr_cli.kernels.propagate` (`propagate_batch` is what `dhr train` calls online).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dhr_cli.config import IGNORE_INDEX, PropagateConfig
from dhr_cli.errors import InputError, StoreError
from dhr_cli.io.datasets import open_dataset
from dhr_cli.io.distributed import device_for_rank, output_store, shard
from dhr_cli.io.loading import StoreReaders, batches_in_workers, iterate_batches, kernel_threads, store_reading_workers
from dhr_cli.io.progress import track
from dhr_cli.io.runtime import resolve_device
from dhr_cli.io.provenance import make_provenance
from dhr_cli.io.store import Store
from dhr_cli.kernels.crf import crf_function
from dhr_cli.kernels.propagate import (
    PropagateItem,
    pooled_cells,
    propagate_method,
    step3_needed,
)
from dhr_cli.pipeline.inputs import (
    Missing,
    check_cam_labels,
    check_labels,
    image_and_labels,
    open_checked,
    require_background,
    select_ids,
    to_tensor,
)

logger = logging.getLogger(__name__)


def _source_path(value: str | Path, role: str) -> Path:
    """A USS/WSS source given as a store path (the CLI turns method names into stores first,
    with `dhr_cli.pipeline.cams.features_store_for`)."""
    path = Path(value)
    if path.is_file():
        return path
    if path.exists():
        raise InputError(f"{path}: is a folder, not a features store (--{role})")
    if path.suffix.lower() in (".h5", ".hdf5") or "/" in str(value):
        raise InputError(f"{path}: no such store file (--{role})")
    raise InputError(f"--{role} {value}: not a store file; compute a network's features with "
                     f"`dhr cams --{role} {value} ... --out {role.upper()}.h5` (or `dhr propagate --{role} {value}`)")


def _features(store: Store, item_id: str) -> np.ndarray:
    """(D, h, w) features of an item, float16 or float32 as stored (the kernels convert; float16 is
    exact in float32), checked like the store's `Item.features` (which copies to float32)."""
    item = store.read(item_id, names=("features",))
    if "features" not in item.arrays:
        raise StoreError(f"{store.path}: item {item_id!r} has no 'features' dataset (a {store.kind} store used as "
                         "a feature source needs the network's features)")
    x = item.arrays["features"]
    if x.dtype in (np.float16, np.float32) and x.ndim == 3 and 0 not in x.shape and _all_finite(x):
        return x
    return item.features  # the store's checks and messages


def _all_finite(x: np.ndarray) -> bool:
    if x.dtype == np.float16:  # exponent bits all set: inf or NaN (np.isfinite on float16 is ~10x slower)
        return not ((x.view(np.uint16) & 0x7C00) == 0x7C00).any()
    return bool(np.isfinite(x).all())


def run_propagate(cfg: PropagateConfig, *, seeds: Path, data: Path, uss: str | Path, wss: list[str | Path],
                  out: Path, cams: Path | None = None, split: str | None = None, missing: Missing = "fail",
                  overwrite: bool = False, resume: bool = False, quiet: bool = False) -> dict:
    """Write the masks store; returns a small summary."""
    dataset = open_dataset(data, split)
    background = require_background(dataset)
    if cfg.method in ("cam", "rw") and cams is None:
        raise InputError(f"--method {cfg.method} needs the CAMs: pass --cams CAMS.h5")
    if cfg.method == "dhr" and cfg.step3 and not wss:
        raise InputError("--wss is required: the WSS features of Step 3 (a features store or a cams store with "
                         "features); --no-step3 runs Step 2 alone")
    if not cfg.step3:
        wss = []  # not read
    device = resolve_device(device_for_rank(cfg.device))
    crf = crf_function(cfg.crf) if cfg.use_crf and cfg.method != "rw" else None
    opened: dict[str, Store] = {}
    try:
        opened["seeds"] = open_checked(seeds, ("seeds", "masks"), dataset, "seeds")
        opened["uss"] = open_checked(_source_path(uss, "uss"), ("features", "cams"), dataset, "uss")
        for k, w in enumerate(wss):
            opened[f"wss{k}"] = open_checked(_source_path(w, "wss"), ("features", "cams"), dataset, "wss")
        if cams is not None:
            opened["cams"] = open_checked(cams, "cams", dataset, "cams")
        ids = shard(select_ids(dataset, opened, missing))
        inputs = {"seeds": seeds, "uss": uss, "data": data, "cams": cams or ""} | {f"wss{k}": w for k, w in enumerate(wss)}
        with output_store(out, "masks", dataset.classes, provenance=make_provenance("propagate", cfg, inputs, dataset=dataset, ids=ids),
                          overwrite=overwrite, resume=resume) as writer:
            todo = [i for i in ids if i not in writer]
            reader = StoreReaders({role: store.path for role, store in opened.items()})
            reader.lend(opened)  # used as they are when loading runs in this process
            with_image = crf is not None or (cfg.upsample == "guided" and cfg.method == "dhr")
            load = functools.partial(_load_item, dataset, reader, cfg, with_image, background)
            workers = store_reading_workers()  # io.loading: the measured policy
            if _batches_in_workers(device):
                # On the CPU each DataLoader worker runs whole batches: store reads (gzip), Step
                # 2.1's pooling, the kernels and the CRF, one torch thread each, and hands back
                # the uint8 masks (a fifth of the bytes of the features it read); this process
                # only writes them. The same batches as below, so the same masks.
                compute = functools.partial(_masks_of_batch, load, reader, cfg, background, crf, device)
                for masks in track(batches_in_workers(todo, cfg.batch_size, compute), f"propagate ({cfg.method})",
                                   total=len(todo), quiet=quiet, count=len):
                    for item_id, mask in masks:
                        writer.write(item_id, {"mask": mask})
                return {"written": len(todo), "items": len(ids)}
            # On a GPU: store reads, Step 2.1's pooling and the Step 3 decision run in DataLoader
            # workers, each with its own HDF5 handles; this process runs the kernels and writes.
            batches = iterate_batches(todo, load, cfg.batch_size, workers=workers)
            with kernel_threads(device, workers if len(todo) > cfg.batch_size else 0):
                for batch in track(batches, f"propagate ({cfg.method})", total=len(todo), quiet=quiet, count=len):
                    items = [_to_item(reader, loaded, device) for loaded in batch]
                    with torch.no_grad():
                        masks = propagate_method(items, cfg, background, crf)
                    for loaded, mask in zip(batch, masks):
                        writer.write(loaded.item_id, {"mask": mask.to(torch.uint8).cpu().numpy()})
        return {"written": len(todo), "items": len(ids)}
    finally:
        for store in opened.values():
            store.close()




def _batches_in_workers(device: torch.device) -> bool:
    """Whole batches run in the loader processes on the CPU; with a GPU the kernels stay in this process."""
    return device.type == "cpu"


def _masks_of_batch(load, reader: StoreReaders, cfg: PropagateConfig, background: int, crf, device,
                    ids: list[str]) -> list[tuple[str, np.ndarray]]:
    """One batch from the stores to its (item id, uint8 mask) pairs (what a CPU loader worker runs)."""
    batch = [load(item_id, foresee=False) for item_id in ids]
    items = [_to_item(reader, loaded, device) for loaded in batch]
    with torch.no_grad():
        masks = propagate_method(items, cfg, background, crf)
    return [(loaded.item_id, mask.to(torch.uint8).cpu().numpy()) for loaded, mask in zip(batch, masks)]


def _wss_roles(reader: StoreReaders) -> list[str]:
    return sorted((k for k in reader.paths if k.startswith("wss")), key=lambda k: int(k[3:]))


@dataclass
class _Loaded:
    """One item as a loader process hands it over (numpy arrays: pickled, not shared memory)."""

    item_id: str
    image: np.ndarray | None
    labels: list[int]
    seed: np.ndarray
    uss: np.ndarray
    cams: np.ndarray | None = None
    cam_labels: list[int] | None = None
    cells: np.ndarray | None = None  # Step 2.1's majority label per USS cell
    wss: list[np.ndarray] | None = None  # read where Step 3 runs
    seed_values: list[int] | None = None  # the values the seed holds (counted for the check above)


def _load_item(dataset, reader: StoreReaders, cfg: PropagateConfig, with_image: bool, background: int,
               item_id: str, foresee: bool = True) -> _Loaded:
    """Loader work for one item: the image (for the CRF), labels, seed, USS features, CAMs; for
    DHR, when `foresee` (the kernels run in another process), also the seed's majority pooling
    (Step 2.1) and, where Step 3 runs, the WSS maps. Without it the kernels pool the seed and
    read the WSS maps of the images Step 3 needs themselves (`_to_item`)."""
    item_id, image, labels, size = image_and_labels(dataset, with_image, item_id)
    check_labels(dataset, item_id, labels)
    seed_store = reader.store("seeds")
    seed = seed_store.read(item_id).mask
    if seed.shape != tuple(size):
        raise StoreError(f"{seed_store.path}: seed mask of {item_id} is {seed.shape[1]}x{seed.shape[0]}, "
                         f"its image {size[1]}x{size[0]}")
    allowed = np.zeros(256, bool)
    allowed[[0, IGNORE_INDEX, *labels]] = True  # background, unsure, the image's labels
    values = np.flatnonzero(np.bincount(seed.ravel(), minlength=256)).tolist()
    extra = [v for v in values if not allowed[v]]
    if extra:  # a seed of a class the image does not have would be propagated as if it had it
        raise StoreError(f"{seed_store.path}: seed mask of {item_id} holds label values {extra[:5]} that are not "
                         f"among the image's labels {labels}")
    loaded = _Loaded(item_id, image, labels, seed, _features(reader.store("uss"), item_id), seed_values=values)
    if "cams" in reader.paths:
        cam_item = reader.store("cams").read(item_id, names=("cams",))
        loaded.cams, loaded.cam_labels = cam_item.cams, cam_item.labels.tolist()
        check_cam_labels(reader.paths["cams"], item_id, loaded.cam_labels, labels)
    if foresee and cfg.method == "dhr" and _wss_roles(reader):
        item = PropagateItem(seed=torch.from_numpy(seed), uss=torch.from_numpy(loaded.uss), wss=[], labels=labels,
                             seed_values=values,
                             cams=None if loaded.cams is None else torch.from_numpy(loaded.cams),
                             cam_labels=loaded.cam_labels)
        with torch.no_grad():
            item.cells = pooled_cells(item)
            if step3_needed(item, cfg, background=background):
                loaded.wss = [_features(reader.store(role), item_id) for role in _wss_roles(reader)]
        loaded.cells = item.cells.numpy()
    return loaded


def _to_item(reader: StoreReaders, loaded: _Loaded, device) -> PropagateItem:
    if loaded.wss is not None:
        wss = [to_tensor(w, device) for w in loaded.wss]
    else:  # not foreseen by the loader (or another method): read here if Step 3 runs after all
        wss = functools.partial(_read_wss, reader, loaded.item_id, device)
    return PropagateItem(seed=to_tensor(loaded.seed, device), uss=to_tensor(loaded.uss, device), wss=wss,
                         labels=loaded.labels, cams=to_tensor(loaded.cams, device), cam_labels=loaded.cam_labels,
                         image=to_tensor(loaded.image, device), cells=to_tensor(loaded.cells, device),
                         seed_values=loaded.seed_values)


def _read_wss(reader: StoreReaders, item_id: str, device) -> list[torch.Tensor]:
    return [to_tensor(_features(reader.store(role), item_id), device) for role in _wss_roles(reader)]
