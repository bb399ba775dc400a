"""`dhr info`: what is in a store, a dataset folder or a `dhr train` run folder, as plain data (the CLI renders it)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from dhr_cli.io.datasets import open_dataset
from dhr_cli.io.store import MAIN_DATASET, open_store

_SAMPLE = 200  # items read to summarise shapes and dtypes (a store can hold 100k items)


def describe_store(path: Path) -> dict:
    with open_store(path) as store:
        shapes, dtypes, labels = Counter(), Counter(), Counter()
        main = MAIN_DATASET[store.kind]
        for item_id in store.ids[:_SAMPLE]:
            item = store.read(item_id)
            x = item.arrays[main]
            shapes[tuple(x.shape) if store.kind in ("seeds", "masks") else tuple(x.shape[1:])] += 1
            dtypes[str(x.dtype)] += 1
            if store.kind == "cams":
                _ = item.cams  # the sampled items are checked as the commands check them (finite, >= 0, one per label)
                labels.update(store.classes[v] if 0 <= v < len(store.classes) else str(v) for v in item.labels)
            else:
                if store.kind == "features":
                    _ = item.features  # (D, h, w), finite
                _ = item.image_size  # validates the attribute when present
        return {
            "path": str(path),
            "what": "store",
            "kind": store.kind,
            "version": store.attrs.get("dhr_version"),
            "classes": store.classes,
            "items": len(store),
            "sampled": min(len(store), _SAMPLE),
            "dataset": main,
            "grid_sizes": {"x".join(map(str, k)): v for k, v in shapes.most_common(5)},
            "dtypes": dict(dtypes),
            "labels": dict(labels.most_common()),
            "source": store.attrs.get("source"),
            "provenance": store.provenance,
        }


def describe_dataset(root: Path, split: str | None = None) -> dict:
    ds = open_dataset(root, split)
    counts: Counter = Counter()
    for item_id in ds.ids[:_SAMPLE]:
        counts.update(ds.classes[v] for v in ds.labels(item_id))
    return {
        "path": str(root),
        "what": "dataset",
        "layout": ds.layout,
        "found": ds.describe(),
        "convention": getattr(ds, "convention", "class ids as in the files (255 = ignore)"),
        "split": ds.split,
        "classes": ds.classes,
        "items": len(ds),
        "sampled": min(len(ds), _SAMPLE),
        "has_gt": ds.has_gt,
        "labels": dict(counts.most_common()),
        **_exif_extras(ds),
        **_coco_extras(ds),
    }


def _exif_extras(ds) -> dict:
    """Sampled images whose EXIF orientation tag (2..8) a viewer applies and dhr does not (it reads images
    as stored): a mask drawn on the displayed image is turned or mirrored against them."""
    from dhr_cli.io.datasets import _exif_orientation

    tagged = []
    for item_id in ds.ids[:_SAMPLE]:
        try:
            path = ds.image_path(item_id)
        except Exception:  # noqa: BLE001 - a missing image is reported by the commands that read it
            continue
        if _exif_orientation(path) != 1:
            tagged.append(path.name)
    if not tagged:
        return {}
    return {"exif_orientation": f"{len(tagged)} of {min(len(ds), _SAMPLE)} sampled images (e.g. {tagged[0]}) carry an "
                                "EXIF orientation tag; dhr reads images as stored, without it: masks, COCO sizes and "
                                "outputs follow the stored pixels, not what a photo viewer shows"}


def _coco_extras(ds) -> dict:
    """COCO official files: images skipped as missing, and the state of the GT cache."""
    if ds.layout != "coco":
        return {}
    from dhr_cli.io.coco import gt_cache_problem
    from dhr_cli.io.store import open_store

    extras = {"skipped_missing_images": ds.skipped_missing} if ds.skipped_missing else {}
    path = ds.cache_path
    if not path.is_file():
        state = f"none (build it with dhr info {ds.root} --split {ds.split} --build-cache)"
    else:
        problem = gt_cache_problem(path, ds._json, ds.classes)
        if problem is None:
            with open_store(path, expect="masks") as s:
                cached = set(s.ids)
            covered = sum(i in cached for i in ds.ids)
            state = f"{path}: up to date, {covered} of {len(ds)} images"
        else:
            state = f"{path}: stale ({problem}); not used"
    return {**extras, "gt_cache": state}


def describe(path: Path, split: str | None = None) -> dict:
    """Summary of a store file, a `dhr train` run folder or a dataset folder."""
    from dhr_cli.pipeline.run_folder import describe_run, is_train_run

    path = Path(path)
    if not path.is_dir():
        return describe_store(path)
    return describe_run(path) if is_train_run(path) else describe_dataset(path, split)
