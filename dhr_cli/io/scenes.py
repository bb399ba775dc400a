"""Pascal Context and COCO-Stuff 164k readers (docs/datasets.md; the field's class-id conventions).

    pascal-context  PASCAL VOC 2010 + Pascal Context labels converted to PNGs (the detail-api /
                    trainval_merged.json conversion of mmsegmentation and PyTorch-Encoding):
                    ROOT/JPEGImages/*.jpg and ROOT/SegmentationClassContext/*.png (or ROOT/trainval/*.png),
                    splits ROOT/ImageSets/SegmentationContext/<S>.txt; ROOT may also be the folder
                    above VOC2010 or VOCdevkit. 60 classes: 0 = background, 1..59 the Context 59 in
                    the conversion's order (dhr_cli/io/classes/context59.txt), 255 = ignore; values
                    as written.
    coco-stuff      COCO-Stuff 164k: ROOT/images/{train2017,val2017}/*.jpg (or ROOT/<split>/) and
                    ROOT/stuffthingmaps_trainval2017/<split>/<id>.png holding COCO-Stuff id - 1
                    (0..181; 255 unlabelled). The 11 thing ids COCO never used are dropped and the
                    other 171 mapped to 0..170 in id order (things 0..79, stuff 80..170), the unused
                    ones to 255, as mmsegmentation's conversion does; its converted
                    <id>_labelTrainIds.png (already 0..170) is read as written. No background class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dhr_cli.config import IGNORE_INDEX
from dhr_cli.errors import DatasetError
from dhr_cli.io.coco import _pick_split, class_list
from dhr_cli.io.datasets import Dataset, _check_same_size, _existing, _image_by_id, _images_by_stem, _select_split, read_index_png

CONTEXT_LABEL_DIRS = ("SegmentationClassContext", "trainval")
CONTEXT_SPLIT_DIRS = ("SegmentationContext", "Segmentation")  # the first found wins


def _context_labels_dir(base: Path) -> Path | None:
    for name in CONTEXT_LABEL_DIRS:
        d = base / name
        if d.is_dir() and any(p.suffix.lower() == ".png" for p in _first_entries(d)):
            return d
    return None


def _first_entries(folder: Path, n: int = 64) -> list[Path]:
    import itertools
    import os

    with os.scandir(folder) as it:
        return [Path(e.path) for e in itertools.islice(it, n)]


# ---- Pascal Context (59 classes + background) -----------------------------------------------
class PascalContextDataset(Dataset):
    layout = "pascal-context"
    convention = "PNG values as written: 0 background, 1..59 the Context 59 classes (detail-api order), 255 ignore"

    def __init__(self, root: Path, split: str | None):
        self._label_dir = _context_labels_dir(root)
        if self._label_dir is None:  # detect() only hands over roots that have one
            raise DatasetError(f"{root}: Pascal Context layout without label PNGs in {' or '.join(CONTEXT_LABEL_DIRS)}/")
        self._images = _images_by_stem(root / "JPEGImages")
        labelled = sorted(p.stem for p in self._label_dir.glob("*.png"))
        unmatched = [i for i in labelled if i not in self._images]
        if unmatched:
            raise DatasetError(f"{self._label_dir}: {len(unmatched)} label PNGs have no image in {root / 'JPEGImages'}, "
                               f"e.g. {unmatched[0]}.png")
        lists: dict[str, Path] = {}
        for sub in reversed(CONTEXT_SPLIT_DIRS):  # later ones win: SegmentationContext over VOC's lists
            folder = root / "ImageSets" / sub
            if folder.is_dir():
                lists.update({p.stem: p for p in folder.glob("*.txt")})
        # Without --split: every image that has a label PNG (VOC2010 holds ~21k images, Context labels ~10k).
        ids = _select_split(root, labelled, split, lists, list(self._images))
        super().__init__(root, split, ["background"] + class_list("context59"), ids)

    def image_path(self, item_id: str) -> Path:
        return _image_by_id(self._images, self.root / "JPEGImages", item_id)

    def gt_path(self, item_id: str) -> Path | None:
        return _existing(self._label_dir / f"{item_id}.png")

    def describe(self) -> str:
        return f"{super().describe()} (labels {self._label_dir.name}/; {self.convention})"


# ---- COCO-Stuff 164k ------------------------------------------------------------------------
STUFF_SPLITS = ("train2017", "val2017")
STUFF_MAPS = "stuffthingmaps_trainval2017"
# COCO thing ids 1..90 that no annotation uses; as PNG values (id - 1) they are these.
STUFF_UNUSED_VALUES = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
STUFF_RAW_VALUES = 182


def stuff_lut() -> np.ndarray:
    """(256,) uint8: raw stuffthingmaps value -> contiguous 0..170; unused ids and 255 -> 255."""
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    used = [v for v in range(STUFF_RAW_VALUES) if v not in STUFF_UNUSED_VALUES]
    lut[used] = np.arange(len(used), dtype=np.uint8)
    return lut


class COCOStuffDataset(Dataset):
    layout = "coco-stuff"
    convention = ("COCO-Stuff 164k, 171 classes, no background: raw value v = COCO-Stuff id - 1 (0..181) mapped "
                  "to 0..170 in id order, the 11 unused thing ids and 255 -> 255 (mmseg's *_labelTrainIds.png "
                  "read as written)")

    def __init__(self, root: Path, split: str | None):
        image_root = root / "images" if any((root / "images" / s).is_dir() for s in STUFF_SPLITS) else root
        available = [s for s in STUFF_SPLITS if (image_root / s).is_dir()]
        if not available:
            raise DatasetError(f"{root}: COCO-Stuff layout without images in images/{'|'.join(STUFF_SPLITS)}/")
        split = _pick_split(root, split, available, "COCO-Stuff layout")
        self._images = _images_by_stem(image_root / split)
        self._image_dir = image_root / split
        self._maps = root / STUFF_MAPS / split
        self._lut = stuff_lut()
        super().__init__(root, split, class_list("cocostuff171"), sorted(self._images))

    def image_path(self, item_id: str) -> Path:
        return _image_by_id(self._images, self._image_dir, item_id)

    def gt_path(self, item_id: str) -> Path | None:
        return _existing(self._maps / f"{item_id}.png", self._maps / f"{item_id}_labelTrainIds.png")

    def gt(self, item_id: str) -> np.ndarray | None:
        path = self.gt_path(item_id)
        if path is None:
            return None
        raw = read_index_png(path)
        _check_same_size(path, raw, "label map", self.image_size(item_id), self.image_path(item_id))
        converted = path.name.endswith("_labelTrainIds.png")
        limit = len(self.classes) if converted else STUFF_RAW_VALUES
        hist = np.bincount(raw.ravel(), minlength=256)
        hist[:limit] = 0
        hist[IGNORE_INDEX] = 0
        bad = np.flatnonzero(hist)
        if bad.size:
            raise DatasetError(f"{path}: values {bad.tolist()[:5]} are outside COCO-Stuff's "
                               f"{'0..170' if converted else '0..181'} (255 = unlabelled)")
        return raw if converted else self._lut[raw]

    def describe(self) -> str:
        return f"{super().describe()} ({self.convention})"


def detect(root: Path) -> list[tuple[str, Path]]:
    """Every layout of this module that ROOT matches (the caller refuses mixtures)."""
    found = []
    for candidate in (root, root / "VOC2010", root / "VOCdevkit" / "VOC2010"):
        if (candidate / "JPEGImages").is_dir() and _context_labels_dir(candidate) is not None:
            found.append(("pascal-context", candidate))
            break
    if (root / STUFF_MAPS).is_dir():
        found.append(("coco-stuff", root))
    return found


READERS = {"pascal-context": PascalContextDataset, "coco-stuff": COCOStuffDataset}
