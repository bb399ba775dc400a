"""`dhr seed` as a library: Step 1 of docs/method.md over a whole split, streamed in batches.

    run_seed(SeedConfig(), "cams.h5", "data/voc", "seeds.h5", split="train")
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import torch

from dhr_cli.config import SeedConfig
from dhr_cli.errors import InputError
from dhr_cli.io.datasets import open_dataset
from dhr_cli.io.distributed import device_for_rank, output_store, shard
from dhr_cli.io.loading import MaskSource, StoreReaders, batches_in_workers, default_workers, iterate_batches, kernel_threads
from dhr_cli.io.progress import track
from dhr_cli.io.runtime import resolve_device
from dhr_cli.io.provenance import make_provenance
from dhr_cli.kernels.crf import crf_function
from dhr_cli.kernels.seed import CAM_FLOOR, seed_masks
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


def _init_mask(base: MaskSource, item_id: str, size: tuple[int, int]) -> np.ndarray:
    """The --init-masks mask of an image, which must have the image's size."""
    mask = base.read(item_id)
    if mask.shape != size:
        raise InputError(f"{base.path}: initial mask of {item_id} is {mask.shape[1]}x{mask.shape[0]}, its image {size[1]}x{size[0]}")
    return mask


def run_seed(cfg: SeedConfig, cams: Path, data: Path, out: Path, *, split: str | None = None,
             init_masks: Path | None = None, missing: Missing = "fail", overwrite: bool = False,
             resume: bool = False, quiet: bool = False) -> dict:
    """Write the seed store; returns a small summary (items written, skipped)."""
    dataset = open_dataset(data, split)
    background = require_background(dataset)
    device = resolve_device(device_for_rank(cfg.device))
    crf = crf_function(cfg.crf) if cfg.use_crf else None
    cam_store = open_checked(cams, "cams", dataset, "cams")
    # initial masks M0 from another WSS method
    base = MaskSource(init_masks, n_classes=len(dataset.classes)) if init_masks is not None else None
    try:
        ids = shard(select_ids(dataset, {"cams": cam_store}, missing))
        if base is not None:
            absent = [i for i in ids if i not in base]
            if absent:
                raise InputError(f"{base.path}: no initial mask for {len(absent)} images, e.g. {absent[:3]}")
        provenance = make_provenance("seed", cfg, {"cams": cams, "data": data, "init_masks": init_masks or ""},
                                     dataset=dataset, ids=ids)
        with output_store(out, "seeds", dataset.classes, provenance=provenance, overwrite=overwrite,
                          resume=resume) as writer:
            todo = [i for i in ids if i not in writer]
            load = functools.partial(image_and_labels, dataset, crf is not None)
            reader = StoreReaders({"cams": cam_store.path})
            reader.lend({"cams": cam_store})  # used as it is when the batches run in this process
            if device.type == "cpu":
                # On the CPU each DataLoader worker runs whole batches (image decoding, CAM reads,
                # the seed kernels and the CRF), one torch thread each, and hands back the masks;
                # this process only writes them. The same batches, so the same masks.
                compute = functools.partial(_seed_chunk, load, dataset, reader, base, cfg, device, background, crf)
                for masks in track(batches_in_workers(todo, cfg.batch_size, compute), "seed", total=len(todo), quiet=quiet,
                                   count=len):
                    for item_id, mask in masks:
                        writer.write(item_id, {"mask": mask})
                return {"written": len(todo), "items": len(ids)}
            workers = default_workers()
            batches = iterate_batches(todo, load, cfg.batch_size, workers=workers)
            with kernel_threads(device, workers if len(todo) > cfg.batch_size else 0):
                for batch in track(batches, "seed", total=len(todo), quiet=quiet, count=len):
                    for item_id, mask in _seed_batch(batch, dataset, reader, base, cfg, device, background, crf):
                        writer.write(item_id, {"mask": mask})
        return {"written": len(todo), "items": len(ids)}
    finally:
        cam_store.close()
        if base is not None:
            base.close()


def _seed_chunk(load, dataset, reader, base, cfg, device, background, crf, ids: list[str]) -> list[tuple[str, np.ndarray]]:
    """One batch from the images and CAMs to its (item id, seed mask) pairs (what a CPU loader worker runs)."""
    return _seed_batch([load(item_id) for item_id in ids], dataset, reader, base, cfg, device, background, crf)


_faint_warned = False


def _warn_if_faint(path, item_id: str, cams: np.ndarray) -> None:
    """Once a process: CAMs of another program on a tiny scale (peak below CAM_FLOOR) read as near zero,
    so their seeds are all background; the run goes on (a real CAM that faint is noise), but says so."""
    global _faint_warned
    peak = float(cams.max()) if cams.size else 0.0
    if not _faint_warned and 0 < peak < CAM_FLOOR:
        _faint_warned = True
        logger.warning("%s: item %r: its CAMs peak at %.3g, below the %.0e that Step 1 divides by: they read as "
                       "near zero (background); rescale the store's CAMs if that is their scale", path, item_id,
                       peak, CAM_FLOOR)


def _seed_batch(batch, dataset, reader: StoreReaders, base, cfg, device, background, crf) -> list[tuple[str, np.ndarray]]:
    cam_store = reader.store("cams")
    cams, labels, sizes, images, bases = [], [], [], [], []
    for item_id, image, image_labels, size in batch:
        item = cam_store.read(item_id, names=("cams",))  # not the WSS features beside them
        _warn_if_faint(cam_store.path, item_id, item.cams)
        cam_labels = item.labels.tolist()
        check_labels(dataset, item_id, image_labels)
        check_cam_labels(cam_store.path, item_id, cam_labels, image_labels)
        cams.append(to_tensor(item.cams, device))
        labels.append(cam_labels)
        sizes.append(size)
        images.append(to_tensor(image, device))
        bases.append(to_tensor(_init_mask(base, item_id, size), device) if base is not None else None)
    with torch.no_grad():
        masks = seed_masks(cams, labels, sizes, cfg, images=images if crf else None, base=bases if base else None,
                           background=background, crf=crf)
    return [(item_id, mask.cpu().numpy()) for (item_id, *_), mask in zip(batch, masks)]
