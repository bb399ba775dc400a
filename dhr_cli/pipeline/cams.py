"""`dhr cams`: CAMs (WSS network) or features (USS network) for every image of a split, into a store.

Library entry points: `run_cams(dataset, source, out, cfg)` (either kind, decided by
`source.kind`), `open_source` (a network by name, lite0 with a fitted head), `cams_provenance`,
and `features_store_for(spec, ...)`, which turns a `--uss` / `--wss` value (a store path, or a network name plus weights) into a store path,
computing the store once when a name is given.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from dhr_cli.config import CamsConfig
from dhr_cli.errors import DatasetError, InputError
from dhr_cli.io.runtime import resolve_device
from dhr_cli.kernels.features import low_rank_features

logger = logging.getLogger(__name__)


def channel_map(dataset, source) -> dict[int, int]:
    """Dataset label value -> CAM channel of the source (matched by class name)."""
    index = {c: i for i, c in enumerate(source.classes or [])}
    return {v: index[name] for v, name in enumerate(dataset.classes) if name in index}


def _batches(ids: list[str], size: int):
    for i in range(0, len(ids), size):
        yield ids[i:i + size]


def _load(dataset, item_id: str) -> tuple[str, np.ndarray]:
    return item_id, dataset.image(item_id)


def _to_tensor(images: list[np.ndarray], device) -> torch.Tensor:
    """Same-size (H, W, 3) uint8 images -> (B, 3, H, W) ImageNet-normalised float on `device`."""
    from dhr_cli.models.base import IMAGENET_MEAN, IMAGENET_STD

    x = torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


def run_cams(dataset, source, out: str | Path, cfg: CamsConfig = CamsConfig(), *, device=None,
             provenance: dict | None = None, overwrite: bool = False, resume: bool = False,
             quiet: bool = False) -> dict:
    """Write a cams store (WSS source) or a features store (USS source) for every image of `dataset`.

    WSS items: `cams` (K, h, w) for the image's labelled classes only (cfg.scales and flips summed,
    relu, each map divided by its max), attrs labels + image_size, and the network's `features`
    (D, h, w) at scale 1.0. USS items: `features` (D, h, w) averaged over cfg.uss_scales and flips;
    the root attribute `source` names the network. Images of the same size are batched
    (cfg.batch_size). Returns a summary dict (items written, skipped, feature grid of the last item).

    Under torchrun (WORLD_SIZE > 1) this process takes its shard of the sorted ids
    (`dhr_cli.io.distributed.shard`), writes them to its own store `OUT.rank<r>-of-<w>.h5`, and rank 0
    merges the shards into `out` once every rank is done; `device` (default cfg.device) "cuda" means this rank's GPU.
    The summary then counts this rank's items.
    """
    from dhr_cli.io.distributed import (
        current_rank,
        device_for_rank,
        output_store,
        shard,
    )
    from dhr_cli.io.progress import progress_bar
    from dhr_cli.io.provenance import make_provenance

    rank = current_rank()
    device = resolve_device(device_for_rank(str(cfg.device if device is None else device), rank))
    dtype = np.float16 if cfg.store_dtype == "float16" else np.float32
    wss = source.kind == "wss"
    kind = "cams" if wss else "features"
    channel = channel_map(dataset, source) if wss else {}
    if wss:
        missing = [dataset.classes[v] for v in range(len(dataset.classes))
                   if v not in channel and not (v == 0 and dataset.has_background)]
        if missing:
            raise DatasetError(f"{dataset.root}: classes {missing[:5]} have no CAM channel in network {source.name!r} "
                               f"(its classes: {(source.classes or [])[:5]}...)")
    provenance = provenance or make_provenance("cams", cfg)
    root_attrs = {"source": source.name, "source_kind": source.kind}
    amp = cfg.amp and device.type == "cuda"
    grid = None
    source = source.to(device).eval()
    ids = list(dataset.ids) if rank.world == 1 else shard(dataset.ids, rank)
    with output_store(Path(out), kind, dataset.classes, provenance=provenance, overwrite=overwrite, resume=resume,
                      root_attrs=root_attrs) as w:
        todo = [i for i in ids if i not in w]
        skipped = len(ids) - len(todo)
        unlabelled = [i for i in todo if not dataset.labels(i)] if wss else []
        if unlabelled:  # no foreground class: nothing to write a CAM for
            logger.warning("%d images have no foreground label and get no CAMs, e.g. %s", len(unlabelled),
                           ", ".join(unlabelled[:3]))
            left_out = set(unlabelled)
            todo = [i for i in todo if i not in left_out]
        with progress_bar(quiet) as bar:
            task = bar.add_task(f"{source.name} {kind}", total=len(todo), rate="")
            for loaded in _prefetched(dataset, list(_batches(todo, cfg.batch_size))):
                grid = _process(loaded, dataset, source, w, cfg, channel, wss, dtype, device, amp) or grid
                bar.advance(task, len(loaded))
                if bar.tasks[0].speed:
                    bar.update(task, rate=f"{bar.tasks[0].speed:.2f} img/s")
    return {"kind": kind, "written": len(todo), "skipped": skipped, "unlabelled": unlabelled, "features_shape": grid,
            "out": str(out)}


def _prefetched(dataset, chunks: list[list[str]]):
    """Yield [(id, image), ...] per chunk; the next chunk is decoded in threads meanwhile."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = [pool.submit(_load, dataset, i) for i in chunks[0]] if chunks else []
        for k in range(len(chunks)):
            loaded = [f.result() for f in pending]
            pending = [pool.submit(_load, dataset, i) for i in chunks[k + 1]] if k + 1 < len(chunks) else []
            yield loaded


def _process(loaded, dataset, source, w, cfg, channel, wss, dtype, device, amp):
    from dhr_cli.models.extract import multiscale_extract

    groups: dict[tuple, list] = {}
    for item_id, image in loaded:
        groups.setdefault(tuple(image.shape), []).append((item_id, image))
    grid = None
    for items in groups.values():
        ids = [i for i, _ in items]
        x = _to_tensor([im for _, im in items], device)
        size = [int(x.shape[2]), int(x.shape[3])]
        if wss:
            labels = [list(dataset.labels(i)) for i in ids]
            res = multiscale_extract(source, x, [[channel[v] for v in ls] for ls in labels], cfg.scales, cfg.flip,
                                     feature_scales=(1.0,), base_side=cfg.side, amp=amp)
        else:
            res = multiscale_extract(source, x, None, (), cfg.flip, feature_scales=cfg.uss_scales,
                                     base_side=cfg.side, amp=amp)
        for k, (item_id, r) in enumerate(zip(ids, res)):
            feats = r["features"]
            if cfg.feature_rank:
                feats = low_rank_features(feats, cfg.feature_rank)
            feats = feats.cpu().numpy().astype(dtype)
            if not np.isfinite(feats).all():
                raise DatasetError(f"{item_id}: {source.name} features overflow {cfg.store_dtype}; use float32 storage")
            if wss:
                arrays = {"cams": r["cams"].cpu().numpy().astype(dtype), "features": feats}
                attrs = {"cams": {"labels": np.asarray(labels[k], dtype=np.int64), "image_size": size},
                         "features": {"image_size": size}}
            else:
                arrays = {"features": feats}
                attrs = {"features": {"image_size": size}}
            w.write(item_id, arrays, attrs)
            grid = tuple(feats.shape)
    return grid


def pair_weights(specs: list[str | Path], weights: list[Path]) -> dict[str, Path]:
    """{network name: weights file}: the weights files go, in order, to the specs that are not store files."""
    named = [str(s) for s in specs if not Path(s).is_file()]
    if len(weights) > len(named):
        raise InputError(f"{len(weights)} --wss-weights for {len(named)} networks named by --wss")
    return dict(zip(named, weights))


def store_inputs(dataset, weights=None, **extra) -> dict:
    """The inputs a CAMs / features store records: what `features_store_for` checks before reusing it."""
    inputs = {"data": Path(dataset.root).resolve(), "split": dataset.split or "",
              "weights": Path(weights).resolve() if weights else ""}
    inputs.update({k: str(v) for k, v in extra.items() if v})
    return inputs


def open_source(name: str, dataset, *, kind: str | None, weights=None, device=None, cfg: CamsConfig = CamsConfig(),
                train_head: bool = False, head_batch_size: int = 16, quiet: bool = True, **source_kw):
    """The network `name` as a feature source for `dataset`.

    train_head (lite0 WSS): its CAM head fitted first on the dataset's image labels (cfg.head_*);
    otherwise `resolve_source` with `weights` and `source_kw` (trust, head, backbone_weights).
    Then its feature maps are chosen by cfg.feature_layers / cfg.feature_stride (InputError where
    the network does not offer them).
    """
    from dhr_cli.models import resolve_source

    device = resolve_device(str(cfg.device if device is None else device))
    if train_head:
        from dhr_cli.models.lite0 import check_feature_options, fit_lite0_head

        check_feature_options(cfg.feature_layers, cfg.feature_stride)  # before the slow fitting
        logger.info("lite0: fitting its CAM head on %d images (%d steps)", len(dataset), cfg.head_steps)
        source = fit_lite0_head(dataset, steps=cfg.head_steps, device=device, lr=cfg.head_lr, side=cfg.head_side,
                                train_last_stage=cfg.head_last_stage, batch_size=head_batch_size, quiet=quiet)
    else:
        classes = [c for i, c in enumerate(dataset.classes) if not (i == 0 and dataset.has_background)]
        source = resolve_source(name, weights, device, kind=kind, classes=classes, **source_kw)
    source.configure_features(cfg.feature_layers, cfg.feature_stride)  # InputError where the network has no choice
    return source


def cams_provenance(name: str, source, dataset, cfg: CamsConfig, weights=None, *, inputs: dict | None = None,
                    **extra) -> dict:
    """The provenance of a store `run_cams` writes: the same for `dhr cams` and the features cache."""
    from dhr_cli.io.provenance import make_provenance

    provenance = make_provenance("cams", cfg, inputs=store_inputs(dataset, weights, **(inputs or {})),
                                 dataset=dataset)
    provenance.update({"network": name, "network_kind": source.kind, "feature_maps": source.feature_spec(), **extra})
    return provenance


def features_store_for(spec: str | Path, dataset, *, role: str = "uss", weights=None, cache: str | Path | None = None,
                       cache_dir: str | Path = ".", announce=None, device=None, cfg: CamsConfig = CamsConfig(),
                       quiet: bool = True, **source_kw) -> Path:
    """A store path for a `--uss` / `--wss` value.

    `spec` an existing file: returned as is. A network name (stego, cause, dino, mctformer, resnet,
    lite0, ...): its store is computed once into `cache` (default: `<name>-<role>-<split>.h5` in
    `cache_dir`) with `weights` and reused on later calls, after checking that it was computed by
    the same network for the same dataset and split; an interrupted computation resumes.
    `announce(cache)` is called before a computation starts. `source_kw` go to `resolve_source`
    (backbone_weights, trust, head).
    """
    from dhr_cli.io.store import open_store
    from dhr_cli.models import canonical

    path = Path(spec)
    if path.is_file():
        return path
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a features store (--{role})")
    if path.suffix in (".h5", ".hdf5") or path.parent != Path("."):
        raise InputError(f"{path}: no such store (--{role})")
    name = canonical(str(spec))
    cache = Path(cache) if cache else Path(cache_dir) / f"{name}-{role}-{dataset.split or 'all'}.h5"
    inputs = store_inputs(dataset, weights)
    if cache.is_file():
        with open_store(cache) as store:
            made, network = store.provenance.get("inputs", {}), store.provenance.get("network")
        wanted = {k: str(v) for k, v in inputs.items()}
        if network != name or any(made.get(k, "") != v for k, v in wanted.items()):
            raise InputError(f"{cache}: holds {network} features of {made.get('data')} split {made.get('split') or '(all)'}"
                             f", not {name} of {wanted['data']} split {wanted['split'] or '(all)'}; remove it or "
                             f"choose another --features-dir")
        logger.info("--%s %s: reusing %s", role, spec, cache)
        return cache
    if announce is not None:
        announce(cache)
    kind = role if role in ("uss", "wss") else None
    train_head = name == "lite0" and kind == "wss" and not source_kw.get("head")
    source = open_source(name, dataset, kind=kind, weights=weights, device=device, cfg=cfg, train_head=train_head,
                         quiet=quiet, **source_kw)
    provenance = cams_provenance(name, source, dataset, cfg, weights)
    cache.parent.mkdir(parents=True, exist_ok=True)
    from dhr_cli.io.distributed import (
        interrupted,  # this rank's own .partial under torchrun
    )

    run_cams(dataset, source, cache, cfg, device=device, provenance=provenance, resume=interrupted(cache), quiet=quiet)
    return cache
