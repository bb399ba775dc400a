"""`dhr eval` as a library: score predicted masks against a dataset's ground truth.

    result = run_eval(["masks.h5"], "data/voc", split="train")
    result.methods[0].miou, result.to_json()

Predictions come from a masks (or seeds) store or from a folder of PNG masks (<id>.png, palette,
grayscale, or RGB in VOC colours), so masks written by other tools are scored by the same code.
The protocol is DHR's (docs/method.md): counts over the whole split, GT 255 ignored, background a
class, means over classes with union > 0; prediction 255 is "no class" (a false negative).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from dhr_cli.config import EVAL_BATCH, EVAL_PARALLEL_FROM, IGNORE_INDEX, EvalConfig
from dhr_cli.errors import DatasetError, InputError
from dhr_cli.io.datasets import class_mismatch
from dhr_cli.io.loading import MaskSource
from dhr_cli.kernels.metrics import class_scores, fold_joint, joint_histogram, mean_over_present

logger = logging.getLogger(__name__)

__all__ = ["run_eval", "EvalResult", "MethodResult", "Predictions", "open_predictions", "write_json"]


# ---- prediction sources ---------------------------------------------------------------------
class Predictions(MaskSource):
    """Predicted masks by image id, from a store or a PNG folder (io.loading.MaskSource), a store's
    classes checked against the dataset's. Use as a context manager."""

    def __init__(self, path: str | os.PathLike, classes: list[str]):
        path = Path(path)
        if not path.exists():
            raise InputError(f"{path}: no such file or folder (expected a masks store or a folder of PNG masks)")
        super().__init__(path)
        if self.classes is not None:
            _check_classes(self.path, self.classes, classes)

    def mask(self, item_id: str) -> np.ndarray | None:
        """(H, W) uint8 predicted labels, or None when this source has no prediction for the id."""
        return self.read(item_id) if item_id in self.ids else None


def open_predictions(path: str | os.PathLike, classes: list[str]) -> Predictions:
    """A masks/seeds store or a folder of <id>.png masks, checked against the dataset classes."""
    return Predictions(path, classes)


def _check_classes(path: Path, store_classes: list[str], classes: list[str]) -> None:
    diff = class_mismatch(store_classes, classes, "the masks", "the dataset")
    if diff and len(store_classes) != len(classes):
        raise InputError(f"{path}: holds {len(store_classes)} classes but the dataset has {len(classes)} ({diff}); "
                         "the masks were made for another class list")
    if diff:
        raise InputError(f"{path}: class names differ from the dataset's: {diff}")


# ---- results --------------------------------------------------------------------------------
def image_stats(counts: np.ndarray) -> np.ndarray:
    """(3, K) int32 tp, gt, pred pixel counts of one image from its (K, K + 1) confusion matrix:
    all that per-image scores need, ~1 KB an image at 81 classes instead of the 53 KB matrix."""
    k = counts.shape[0]
    return np.stack([np.diagonal(counts[:, :k]), counts.sum(axis=1), counts[:, :k].sum(axis=0)]).astype(np.int32)


def _scores_batch(stats: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tp, gt, pred (N, K) from per-image stats (N, 3, K)."""
    return stats[:, 0].astype(np.int64), stats[:, 1].astype(np.int64), stats[:, 2].astype(np.int64)


@dataclass
class MethodResult:
    """The scores of one prediction source over the scored images of a split."""

    name: str
    source: str
    classes: list[str]
    foreground: np.ndarray  # (K,) bool: classes that count for the vanishing rate
    ids: list[str]  # scored images, in split order
    image_stats: np.ndarray  # (N, 3, K) int32 per-image tp, gt, pred pixel counts (image_stats())
    total_counts: np.ndarray  # (K, K + 1) int64 confusion matrix summed over the scored images
    pred_present: np.ndarray  # (N, K) bool: class predicted anywhere in the image's mask
    missing: list[str] = field(default_factory=list)  # GT images with no prediction
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> ids (this source only)
    extra: int = 0  # predictions for ids outside the split (not scored)
    empty_scored: list[str] = field(default_factory=list)  # missing ones scored as "no class" (on_missing=empty)

    @property
    def counts(self) -> np.ndarray:
        """(K, K + 1) int64 confusion matrix of the whole split."""
        return self.total_counts

    @property
    def scores(self):
        return class_scores(self.counts)

    @property
    def miou(self) -> float:
        return mean_over_present(self.scores.iou)

    @property
    def mfpr(self) -> float:
        return mean_over_present(self.scores.fpr)

    @property
    def mfnr(self) -> float:
        return mean_over_present(self.scores.fnr)

    @property
    def pixel_accuracy(self) -> float:
        s = self.scores
        total = s.gt.sum()
        return float(s.tp.sum() / total) if total else float("nan")

    @property
    def vanishing(self) -> tuple[int, int]:
        """(vanished, pairs): (image, GT foreground class) pairs, and those with no predicted pixel."""
        if not self.ids:
            return 0, 0
        _, gt, _ = _scores_batch(self.image_stats)
        in_gt = (gt > 0) & self.foreground[None, :]
        return int((in_gt & ~self.pred_present).sum()), int(in_gt.sum())

    @property
    def vanishing_rate(self) -> float:
        vanished, pairs = self.vanishing
        return vanished / pairs if pairs else 0.0

    def per_image_miou(self) -> np.ndarray:
        """(N,) mIoU of each scored image over its classes with union > 0."""
        if not self.ids:
            return np.zeros(0)
        tp, gt, pred = _scores_batch(self.image_stats)
        union = gt + pred - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
            n = (union > 0).sum(axis=1)
            return np.where(n > 0, np.nansum(iou, axis=1) / np.maximum(n, 1), np.nan)

    def to_json(self) -> dict[str, Any]:
        s = self.scores
        present = s.present
        vanished, pairs = self.vanishing
        return {
            "method": self.name,
            "pred": self.source,
            "miou": _num(self.miou),
            "mfpr": _num(self.mfpr),
            "mfnr": _num(self.mfnr),
            "vanishing_rate": _num(self.vanishing_rate),
            "pixel_accuracy": _num(self.pixel_accuracy),
            "images": len(self.ids),
            "per_class": {
                c: {"iou": _num(s.iou[i]), "fpr": _num(s.fpr[i]), "fnr": _num(s.fnr[i])}
                for i, c in enumerate(self.classes)
                if present[i]
            },
            "classes_absent": [c for i, c in enumerate(self.classes) if not present[i]],
            "pixels": {
                c: {"tp": int(s.tp[i]), "gt": int(s.gt[i]), "pred": int(s.pred[i])} for i, c in enumerate(self.classes)
            },
            "vanishing": {"vanished": vanished, "pairs": pairs},
            "missing_predictions": {"count": len(self.missing), "ids": self.missing, "scored_as_empty": bool(self.empty_scored)},
            "skipped": self.skipped,
            "extra_predictions": self.extra,
        }


@dataclass
class EvalResult:
    """Every method's scores plus the protocol they were computed under."""

    root: str
    layout: str
    split: str | None
    classes: list[str]
    background: int | None  # label value of the background class, None when the dataset has none
    split_images: int
    config: EvalConfig
    dataset_skipped: dict[str, list[str]]  # reason -> ids, for every method (no GT, background only)
    methods: list[MethodResult]

    def protocol(self) -> dict[str, Any]:
        """What was scored and how; printed with the tables and written into the JSON."""
        first = self.methods[0]
        present = first.scores.present
        return {
            "dataset": self.root,
            "layout": self.layout,
            "split": self.split,
            "split_images": self.split_images,
            "images_scored": {m.name: len(m.ids) for m in self.methods},
            "classes": len(self.classes),
            "classes_averaged": [c for i, c in enumerate(self.classes) if present[i]],
            "background_included": self.background is not None,
            "background_class": None if self.background is None else self.classes[self.background],
            "mean": "over classes with union > 0 (GT or prediction)",
            "ignore_index": IGNORE_INDEX,
            "prediction_255": "no class: a false negative of the GT class",
            "skipped": {reason: len(ids) for reason, ids in self.dataset_skipped.items()},
            "skipped_per_method": {m.name: {r: len(v) for r, v in m.skipped.items()} for m in self.methods},
            "missing_predictions": {m.name: len(m.missing) for m in self.methods},
            "on_missing": self.config.on_missing,
            "on_size_mismatch": self.config.on_size_mismatch,
            "skip_background_only": self.config.skip_background_only,
        }

    def differences(self, a: int = 0, b: int = 1) -> list[dict[str, Any]]:
        """Per-image mIoU of methods a and b on the images both scored, largest |b - a| first.

        Rows: {"id", "miou_a", "miou_b", "diff": miou_b - miou_a}.
        """
        ma, mb = self.methods[a], self.methods[b]
        ia = dict(zip(ma.ids, ma.per_image_miou()))
        ib = dict(zip(mb.ids, mb.per_image_miou()))
        rows = [
            {"id": i, "miou_a": float(ia[i]), "miou_b": float(ib[i]), "diff": float(ib[i] - ia[i])}
            for i in ma.ids
            if i in ib and not (np.isnan(ia[i]) or np.isnan(ib[i]))
        ]
        return sorted(rows, key=lambda r: (-abs(r["diff"]), r["id"]))

    def to_json(self, top: int = 20) -> dict[str, Any]:
        """docs/contracts.md report: the first method's scores at the top level, others under 'compare'."""
        doc = self.methods[0].to_json()
        doc["split"] = self.split
        doc["protocol"] = self.protocol()
        doc["dataset_skipped"] = self.dataset_skipped
        doc["config"] = asdict(self.config)
        if len(self.methods) > 1:
            doc["compare"] = [m.to_json() for m in self.methods[1:]]
            # Per image, "diff" = the other method's image mIoU minus the first method's.
            doc["differences"] = {
                m.name: {"a": self.methods[0].name, "b": m.name, "images": self.differences(0, j)[:top]}
                for j, m in enumerate(self.methods)
                if j > 0
            }
        return doc


def _num(x: float) -> float | None:
    x = float(x)
    return None if np.isnan(x) else x


def write_json(result: EvalResult, path: str | os.PathLike, top: int = 20) -> Path:
    """Write the JSON report atomically (temp name, then rename)."""
    from dhr_cli.io.outputs import check_output_path, write_text_atomic

    path = Path(path)
    check_output_path(path)
    write_text_atomic(path, json.dumps(result.to_json(top), indent=2, allow_nan=False) + "\n")
    return path


# ---- the run --------------------------------------------------------------------------------
def _unique_names(sources: list[Predictions], names: list[str] | None) -> list[str]:
    if names:
        if len(names) != len(sources):
            raise InputError(f"{len(names)} method names given for {len(sources)} predictions")
        if len(set(names)) != len(names):
            raise InputError(f"method names must differ, got {names}")
        return list(names)
    out: list[str] = []
    for s in sources:
        name = s.name
        if name in out:
            name = f"{s.path.parent.name}/{s.name}"
        k = 2
        base = name
        while name in out:
            name = f"{base}#{k}"
            k += 1
        out.append(name)
    return out


def run_eval(
    preds: Iterable[str | os.PathLike],
    data: str | os.PathLike,
    split: str | None = None,
    cfg: EvalConfig = EvalConfig(),
    *,
    names: list[str] | None = None,
    quiet: bool = True,
    workers: int | None = None,
) -> EvalResult:
    """Score one or more prediction sources on the ground truth of a dataset split.

    Args:
        preds: masks/seeds stores or folders of <id>.png masks; the first is the main one.
        data: dataset folder (any layout of docs/contracts.md); split: its split name.
        cfg: protocol options (size mismatch, missing predictions, background-only images).
        names: display names of the methods (default: file stems).
        quiet: no progress bar.
        workers: loader processes that read and score (None: io.loading.store_reading_workers() from
            config.EVAL_PARALLEL_FROM images on, none below).

    Raises:
        DatasetError: the split is empty, has no ground truth, or a GT mask is bad.
        InputError / StoreError: a prediction source is unusable, a prediction holds labels
            outside the class list, or sizes differ (with on_size_mismatch="fail").
    """
    from dhr_cli.io.datasets import open_dataset
    from dhr_cli.io.loading import iterate_batches, store_reading_workers
    from dhr_cli.io.progress import track

    preds = [Path(p) for p in preds]
    if not preds:
        raise InputError("no predictions given; pass --pred MASKS.h5 (or a folder of PNG masks)")
    ds = open_dataset(data, split)
    if not ds.has_gt:
        raise DatasetError(f"{ds.root}: split {ds.split or '(all)'} has no ground-truth masks to score against")
    classes = list(ds.classes)
    k = len(classes)
    background = 0 if ds.has_background else None
    foreground = np.ones(k, bool)
    if background is not None:
        foreground[background] = False

    sources: list[Predictions] = []
    try:
        for p in preds:
            sources.append(open_predictions(p, classes))
        method_names = _unique_names(sources, names)
        split_ids = set(ds.ids)
        acc = [
            {"ids": [], "stats": [], "total": np.zeros((k, k + 1), np.int64), "present": [], "missing": [],
             "empty": [], "skipped": defaultdict(list)}
            for _ in sources
        ]
        dataset_skipped: dict[str, list[str]] = defaultdict(list)
        # Reading (HDF5 decompression, PNG decode, rasterisation) and scoring run in DataLoader
        # workers, a batch of images at a time; what comes back per batch is small (split totals of
        # the batch, (3, K) counts and presence per image), so this process only adds it up.
        if hasattr(ds, "open_gt_cache"):  # COCO: a stale cache is reported once, not by every worker
            ds.open_gt_cache()
        score = functools.partial(_score_batch, ds, sources, k, background, cfg)
        batches = [ds.ids[i:i + EVAL_BATCH] for i in range(0, len(ds.ids), EVAL_BATCH)]
        if workers is None:
            workers = store_reading_workers() if len(ds.ids) >= EVAL_PARALLEL_FROM else 0
        for done in track(iterate_batches(batches, score, 1, workers=workers if len(batches) > 1 else 0),
                          description=f"eval ({EVAL_BATCH} images a step)", total=len(batches), quiet=quiet):
            b = done[0]
            for reason, ids in b.dataset_skipped.items():
                dataset_skipped[reason].extend(ids)
            for a, r in zip(acc, b.sources):
                for msg in r.warnings:
                    logger.warning("%s; skipped", msg)
                a["missing"].extend(r.missing)
                a["empty"].extend(r.empty)
                for reason, ids in r.skipped.items():
                    a["skipped"][reason].extend(ids)
                if r.ids:
                    a["ids"].extend(r.ids)
                    a["total"] += r.total
                    a["stats"].append(r.stats)
                    a["present"].append(r.present)
        methods = []
        for src, name, a in zip(sources, method_names, acc):
            n = len(a["ids"])
            methods.append(
                MethodResult(
                    name=name,
                    source=str(src.path),
                    classes=classes,
                    foreground=foreground,
                    ids=a["ids"],
                    image_stats=np.concatenate(a["stats"]) if n else np.zeros((0, 3, k), np.int32),
                    total_counts=a["total"],
                    pred_present=np.concatenate(a["present"]) if n else np.zeros((0, k), bool),
                    missing=a["missing"],
                    skipped=dict(a["skipped"]),
                    extra=len(src.ids - split_ids),
                    empty_scored=a["empty"],
                )
            )
    finally:
        for s in sources:
            s.close()

    for m in methods:
        if m.missing:
            logger.warning("%s: no prediction for %d of the split's GT images (e.g. %s)", m.source, len(m.missing), m.missing[:3])
        if not m.ids:
            reasons = {**{r: len(v) for r, v in dataset_skipped.items()}, **{r: len(v) for r, v in m.skipped.items()}}
            if m.missing and cfg.on_missing == "skip":
                reasons["no prediction"] = len(m.missing)
            why = ", ".join(f"{n} {r}" for r, n in reasons.items()) or "nothing to score"
            raise InputError(f"{m.source}: no image of split {ds.split or '(all)'} of {ds.root} could be scored ({why})")
    return EvalResult(
        root=str(ds.root),
        layout=ds.layout,
        split=ds.split,
        classes=classes,
        background=background,
        split_images=len(ds),
        config=cfg,
        dataset_skipped=dict(dataset_skipped),
        methods=methods,
    )


def _has_foreground(gt: np.ndarray, k: int, background: int) -> bool:
    fg = (gt < k) & (gt != background)
    return bool(fg.any())


@dataclass
class _SourceBatch:
    """What one prediction source scored on one batch of images (built in a loader worker)."""

    ids: list[str] = field(default_factory=list)
    total: np.ndarray | None = None  # (K, K + 1) int64 summed over the batch's scored images
    stats: np.ndarray | None = None  # (n, 3, K) int32
    present: np.ndarray | None = None  # (n, K) bool
    missing: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # logged by the main process


@dataclass
class _Batch:
    dataset_skipped: dict[str, list[str]]
    sources: list[_SourceBatch]


def _score_batch(ds, sources: list[Predictions], k: int, background: int | None, cfg: EvalConfig,
                 ids: list[str]) -> _Batch:
    """Read and score a batch of images for every source: per image one joint (GT, prediction)
    histogram (kernels.metrics.joint_histogram), from which the confusion matrix, the per-image
    (3, K) counts, the predicted classes and the label check all follow."""
    skipped: dict[str, list[str]] = defaultdict(list)
    out = [_SourceBatch() for _ in sources]
    stats: list[list[np.ndarray]] = [[] for _ in sources]
    present: list[list[np.ndarray]] = [[] for _ in sources]
    totals = [np.zeros((k, k + 1), np.int64) for _ in sources]
    for item_id in ids:
        gt = ds.gt(item_id)
        if gt is None:
            skipped["no ground truth"].append(item_id)
            continue
        if cfg.skip_background_only and background is not None and not _has_foreground(gt, k, background):
            skipped["background only (skip_background_only)"].append(item_id)
            continue
        for j, (src, r) in enumerate(zip(sources, out)):
            pred = src.mask(item_id)
            if pred is None:
                r.missing.append(item_id)
                if cfg.on_missing == "skip":
                    continue
                r.empty.append(item_id)
                pred = np.full(gt.shape, IGNORE_INDEX, np.uint8)
            if pred.shape != gt.shape:
                msg = (f"{src.path}: prediction for image {item_id} is {pred.shape[1]}x{pred.shape[0]} "
                       f"but its ground truth is {gt.shape[1]}x{gt.shape[0]}")
                if cfg.on_size_mismatch == "fail":
                    raise InputError(msg + " (pass --on-size-mismatch skip to leave such images out)")
                r.warnings.append(msg)
                r.skipped.setdefault("size mismatch", []).append(item_id)
                continue
            joint = joint_histogram(gt, pred)
            hist = joint.sum(axis=0)  # every pixel's prediction, GT-ignored ones included
            bad = np.flatnonzero(hist[k:IGNORE_INDEX]) + k
            if bad.size:
                raise InputError(
                    f"{src.path}: prediction for image {item_id} holds label values {bad.tolist()[:5]} "
                    f"outside the {k} classes of {ds.root} (0..{k - 1}, 255 = ignore)"
                )
            counts = fold_joint(joint, k)
            totals[j] += counts  # split totals accumulate; per image only (3, K) is kept
            r.ids.append(item_id)
            stats[j].append(image_stats(counts))
            present[j].append(hist[:k] > 0)
    for j, r in enumerate(out):
        if r.ids:
            r.total, r.stats, r.present = totals[j], np.stack(stats[j]), np.stack(present[j])
    return _Batch(dict(skipped), out)
