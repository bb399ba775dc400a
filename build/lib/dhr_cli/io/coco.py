"""COCO 2014 and ADE20K readers (docs/datasets.md; class-id conventions of the WSSS field).

    coco       official files: ROOT/{train2014,val2014}/*.jpg + ROOT/annotations/instances_<split>.json,
               rasterised through pycocotools (polygons and RLE); label 0 = background, 1..K = the
               categories in ascending id (the official 80 give person = 1 ... toothbrush = 80);
               crowd regions 255; image-level labels = categories of the non-crowd annotations.
    coco-png   the community's converted PNGs, same class ids: ROOT/coco_seg_anno/<12-digit id>.png
               (RIB / MCTformer) or ROOT/SegmentationClass/<split>/<id>.png (ToCo lineage, labels
               optionally from ROOT/cls_labels_onehot.npy); images in ROOT/<split>/ or ROOT/JPEGImages/<split>/.
    ade20k     ADEChallengeData2016/{images,annotations}/{training,validation}: 150 classes, no
               background; file value 0 (unlabelled) -> 255, every other value v -> v - 1.
"""

from __future__ import annotations

import json
import logging
import os
from importlib import resources
from pathlib import Path

import numpy as np

from dhr_cli.config import IGNORE_INDEX
from dhr_cli.errors import DatasetError
from dhr_cli.io.datasets import Dataset, _images_by_stem, read_index_png

logger = logging.getLogger(__name__)

COCO_SPLITS = ("train2014", "val2014")


def class_list(name: str) -> list[str]:
    """A class list shipped in dhr_cli/io/classes/<name>.txt."""
    text = resources.files("dhr_cli.io").joinpath("classes", f"{name}.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def _pick_split(root: Path, split: str | None, available: list[str], what: str) -> str:
    if split is None:
        if len(available) != 1:
            raise DatasetError(f"{root}: {what} with splits {', '.join(available) or 'none'}; choose one with --split")
        return available[0]
    if split not in available:
        raise DatasetError(f"{root}: no split {split!r}; available: {', '.join(available) or 'none'}")
    return split


# ---- COCO 2014, official annotation files ---------------------------------------------------
class COCODataset(Dataset):
    layout = "coco"
    convention = "background 0, the json's categories in ascending id -> 1..K, crowd regions 255"

    def __init__(self, root: Path, split: str | None, missing: str = "fail"):
        try:
            from pycocotools.coco import COCO  # noqa: F401
        except ImportError:
            raise DatasetError(f"{root}: reading COCO annotations needs pycocotools (pip install 'dhr[coco]')") from None
        available = [s for s in COCO_SPLITS if (root / "annotations" / f"instances_{s}.json").is_file()]
        split = _pick_split(root, split, available, "COCO layout")
        self._json = root / "annotations" / f"instances_{split}.json"
        coco = self._load(self._json)
        cats = sorted(coco.cats)
        self._label_of = {cid: i + 1 for i, cid in enumerate(cats)}
        classes = ["background"] + [coco.cats[c]["name"] for c in cats]
        folder = root / split
        present = {e.name for e in os.scandir(folder)} if folder.is_dir() else set()
        by_id, absent = {}, []
        for img in coco.imgs.values():
            name = img["file_name"]
            (by_id.__setitem__(Path(name).stem, img) if name in present else absent.append(name))
        if absent:
            msg = f"{self._json}: {len(absent)} of {len(coco.imgs)} images are missing from {folder}, e.g. {absent[0]}"
            if missing != "skip":
                raise DatasetError(msg + " (skip them with missing='skip')")
            logger.warning("%s; skipped", msg)
        for ann in coco.anns.values():
            if ann["category_id"] not in self._label_of:
                raise DatasetError(f"{self._json}: annotation {ann['id']} has unknown category id {ann['category_id']}")
            seg = ann.get("segmentation")
            if not seg or (isinstance(seg, list) and not any(len(p) >= 6 for p in seg)):
                raise DatasetError(f"{self._json}: annotation {ann['id']} has an empty segmentation")
        self._coco, self._folder, self._by_id = coco, folder, by_id
        super().__init__(root, split, classes, sorted(by_id))

    @staticmethod
    def _load(path: Path):
        import contextlib
        import io

        from pycocotools.coco import COCO

        coco = COCO()
        try:
            coco.dataset = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(coco.dataset, dict) or not {"images", "annotations", "categories"} <= set(coco.dataset):
            raise DatasetError(f"{path}: not a COCO instances file (needs images, annotations, categories)")
        with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
            coco.createIndex()
        return coco

    def image_path(self, item_id: str) -> Path:
        if item_id not in self._by_id:
            raise DatasetError(f"{self._json}: no image {item_id!r}")
        return self._folder / self._by_id[item_id]["file_name"]

    def gt_path(self, item_id: str) -> Path | None:
        return self._json

    def _anns(self, item_id: str) -> list[dict]:
        return self._coco.imgToAnns.get(self._by_id[item_id]["id"], [])

    def _named_labels(self, item_id: str) -> list[str] | None:
        return [self.classes[self._label_of[a["category_id"]]] for a in self._anns(item_id) if not a.get("iscrowd", 0)]

    def _labels_source(self, item_id: str) -> Path:
        return self._json

    def gt(self, item_id: str) -> np.ndarray:
        """Crowd regions first (255), then every non-crowd object painted over them with its label."""
        img = self._by_id[item_id]
        mask = np.zeros((img["height"], img["width"]), np.uint8)
        anns = self._anns(item_id)
        for ann in sorted(anns, key=lambda a: not a.get("iscrowd", 0)):  # crowd first
            m = self._coco.annToMask(ann).astype(bool)
            mask[m] = IGNORE_INDEX if ann.get("iscrowd", 0) else self._label_of[ann["category_id"]]
        return mask

    def describe(self) -> str:
        return f"{super().describe()} (COCO official files {self._json.name}; {self.convention})"


# ---- COCO, the community's converted PNGs ---------------------------------------------------
class COCOPngDataset(Dataset):
    layout = "coco-png"
    convention = "PNG values as written: 0 background, 1..80 the COCO categories in official order, 255 ignore"

    def __init__(self, root: Path, split: str | None):
        classes = ["background"] + class_list("coco80")
        image_roots = [d for d in (root / "JPEGImages", root) if any((d / s).is_dir() for s in COCO_SPLITS)]
        if not image_roots:
            raise DatasetError(f"{root}: COCO PNG layout without images in {'|'.join(COCO_SPLITS)}/ or JPEGImages/<split>/")
        available = [s for s in COCO_SPLITS if (image_roots[0] / s).is_dir()]
        split = _pick_split(root, split, available, "COCO PNG layout")
        self._images = _images_by_stem(image_roots[0] / split)
        toco = root / "SegmentationClass" / split
        self._flat = not toco.is_dir()
        self._gt_dir = root / "coco_seg_anno" if self._flat else toco
        self._onehot = None
        labels_file = root / "cls_labels_onehot.npy"
        if labels_file.is_file():
            from dhr_cli.pipeline.imports import read_label_vectors

            self._onehot = read_label_vectors(labels_file, 80)
            self._labels_file = labels_file
        super().__init__(root, split, classes, sorted(self._images))

    def image_path(self, item_id: str) -> Path:
        if item_id not in self._images:
            raise DatasetError(f"{self.root / str(self.split)}: no image for id {item_id!r}")
        return self._images[item_id]

    def gt_path(self, item_id: str) -> Path | None:
        names = [item_id, item_id[-12:]] if self._flat else [item_id]
        for name in names:
            p = self._gt_dir / f"{name}.png"
            if p.exists():
                return p
        return None

    def _named_labels(self, item_id: str) -> list[str] | None:
        if self._onehot is None:
            return None
        for key in (item_id, item_id[-12:]):
            if key in self._onehot:
                return [self.classes[v] for v in self._onehot[key]]
        return None

    def describe(self) -> str:
        where = "coco_seg_anno/" if self._flat else f"SegmentationClass/{self.split}/"
        return f"{super().describe()} (masks {where}; {self.convention})"


# ---- ADE20K (SceneParsing 150) --------------------------------------------------------------
ADE_SPLITS = ("training", "validation")


class ADE20KDataset(Dataset):
    layout = "ade20k"
    convention = "150 classes, no background; file 0 (unlabelled) -> 255, v -> v - 1"

    def __init__(self, root: Path, split: str | None):
        available = [s for s in ADE_SPLITS if (root / "images" / s).is_dir()]
        split = _pick_split(root, split, available, "ADE20K layout")
        self._images = _images_by_stem(root / "images" / split)
        self._ann_dir = root / "annotations" / split
        super().__init__(root, split, class_list("ade150"), sorted(self._images))

    def image_path(self, item_id: str) -> Path:
        if item_id not in self._images:
            raise DatasetError(f"{self.root / 'images' / str(self.split)}: no image for id {item_id!r}")
        return self._images[item_id]

    def gt_path(self, item_id: str) -> Path | None:
        p = self._ann_dir / f"{item_id}.png"
        return p if p.exists() else None

    def gt(self, item_id: str) -> np.ndarray | None:
        path = self.gt_path(item_id)
        if path is None:
            return None
        raw = read_index_png(path)
        h, w = self.image_size(item_id)
        if raw.shape != (h, w):
            raise DatasetError(f"{path}: annotation is {raw.shape[1]}x{raw.shape[0]} but its image is {w}x{h}")
        top = int(raw.max(initial=0))
        if top > len(self.classes):
            raise DatasetError(f"{path}: value {top} is above the {len(self.classes)} ADE20K classes")
        return np.where(raw == 0, IGNORE_INDEX, raw - 1).astype(np.uint8)

    def describe(self) -> str:
        return f"{super().describe()} ({self.convention})"


def detect(root: Path) -> list[tuple[str, Path]]:
    """Every layout of this module that ROOT matches (the caller refuses mixtures)."""
    found = []
    if (root / "annotations").is_dir() and any((root / "annotations" / f"instances_{s}.json").is_file() for s in COCO_SPLITS):
        found.append(("coco", root))
    if (root / "coco_seg_anno").is_dir() or any((root / "SegmentationClass" / s).is_dir() for s in COCO_SPLITS):
        found.append(("coco-png", root))
    for candidate in (root, root / "ADEChallengeData2016"):
        if (candidate / "images" / "training").is_dir() or (candidate / "images" / "validation").is_dir():
            if (candidate / "annotations").is_dir() and not (candidate / "annotations" / "instances_train2014.json").exists():
                found.append(("ade20k", candidate))
                break
    return found


READERS = {"coco": COCODataset, "coco-png": COCOPngDataset, "ade20k": ADE20KDataset}
