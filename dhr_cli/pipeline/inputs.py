"""What the per-item commands share: opening and cross-checking their inputs, choosing items.

Every check here turns a mismatch between the user's files into one sentence that names the
files (class lists that differ, ids missing from a store, a dataset without background).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from dhr_cli.errors import InputError, StoreError
from dhr_cli.io.datasets import Dataset, class_mismatch
from dhr_cli.io.store import Store, open_store

logger = logging.getLogger(__name__)

Missing = Literal["fail", "skip"]


def check_classes(store, dataset: Dataset) -> None:
    """A store's class list (anything with .path and .classes) must be the dataset's (case, spaces and
    punctuation aside)."""
    diff = class_mismatch(store.classes, dataset.classes, "the store", "the dataset")
    if diff:
        raise StoreError(f"{store.path}: its {len(store.classes)} classes differ from the dataset's "
                         f"{len(dataset.classes)} at {dataset.root}: {diff}")


def require_background(dataset: Dataset) -> int:
    """DHR needs a background class; it is label value 0."""
    if not dataset.has_background:
        raise InputError(f"{dataset.root}: class 0 is {dataset.classes[0]!r}; DHR needs 'background' as label value 0")
    return 0


def open_checked(path: Path, expect, dataset: Dataset, role: str) -> Store:
    store = open_store(path, expect=expect)
    try:
        check_classes(store, dataset)
    except StoreError:
        store.close()
        raise
    logger.info("%s: %s (%d items)", role, path, len(store))
    return store


def select_ids(dataset: Dataset, stores: dict[str, Store], missing: Missing) -> list[str]:
    """The split's ids present in every store; ids missing from one fail, or are skipped and listed."""
    ids = list(dataset.ids)
    for role, store in stores.items():
        absent = [i for i in ids if i not in store]
        if absent:
            msg = f"{store.path}: {len(absent)} of {len(ids)} images of the split are missing from the {role} store, e.g. {absent[:3]}"
            if missing == "fail":
                raise StoreError(msg + "; pass --missing skip to leave them out")
            logger.warning("%s; skipped", msg)
            ids = [i for i in ids if i in store]
    if not ids:
        raise InputError(f"{dataset.root}: no image of split {dataset.split or '(all)'} is in every input store")
    return ids


def image_tensor(dataset: Dataset, item_id: str) -> np.ndarray:
    """(3, H, W) uint8 image, for decoding in loader workers."""
    return np.array(dataset.image(item_id).transpose(2, 0, 1), order="C")  # a writable copy, even of a 1x1 image


def image_and_labels(dataset: Dataset, with_image: bool, item_id: str):
    """Loader work for one item: (id, image (3,H,W) or None, labels, (H, W))."""
    labels = dataset.labels(item_id)
    if with_image:
        image = image_tensor(dataset, item_id)
        return item_id, image, labels, tuple(image.shape[1:])
    return item_id, None, labels, dataset.image_size(item_id)


def to_tensor(x: np.ndarray | None, device: torch.device) -> torch.Tensor | None:
    if x is None:
        return None
    x = np.ascontiguousarray(x)
    if not x.flags.writeable:  # a PIL image's buffer (PNG masks): torch warns on read-only memory
        x = x.copy()
    return torch.from_numpy(x).to(device)


def check_cam_labels(path: Path, item_id: str, cam_labels: list[int], labels: list[int]) -> None:
    """One CAM per image-level label, no more, no fewer: a class without a map would get no seed."""
    extra = sorted(set(cam_labels) - set(labels))
    if extra:
        raise StoreError(f"{path}: item {item_id!r} has CAMs for label values {extra} that are not among the image's labels {labels}")
    lacking = sorted(set(labels) - set(cam_labels))
    if lacking:
        raise StoreError(f"{path}: item {item_id!r} has no CAM for the image's label values {lacking} "
                         f"(it holds {sorted(cam_labels)}); a cams store needs one map per image label")


def check_labels(dataset: Dataset, item_id: str, labels: list[int]) -> None:
    if not labels:
        raise InputError(f"{dataset.root}: image {item_id} has an empty image-level label set; "
                         "give it labels or leave it out of the split")
