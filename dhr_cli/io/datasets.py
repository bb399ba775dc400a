"""Dataset readers for the layouts of docs/contracts.md, detected from what is inside ROOT.

    flat   ROOT/classes.txt, images/<id>.jpg|png, [masks/<id>.png], [labels.json], [splits/<S>.txt]
    voc    PASCAL VOC 2012: JPEGImages/, SegmentationClass(Aug)/, ImageSets/Segmentation/<S>.txt, Annotations/*.xml
    dhr    DHR / MARS: ROOT/<S>/image/*.jpg, ROOT/<S>/mask/*.png, ROOT/<S>/xml/*.xml
    coco, coco-png, ade20k            dhr_cli/io/coco.py
    pascal-context, coco-stuff        dhr_cli/io/scenes.py

Every reader yields the same thing: ids, RGB images, image-level labels (foreground label
values) and, when present, ground-truth masks as class indices (255 = ignore).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import xml.etree.ElementTree as ET
from collections import Counter
from contextvars import ContextVar
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dhr_cli.config import IGNORE_INDEX, MAX_PIXELS
from dhr_cli.errors import DatasetError, InputError

logger = logging.getLogger(__name__)

# ---- the pixel limit (--max-pixels): the one place it is set -----------------------------------
# Every image and mask dhr decodes is opened by `_open_checked` below, which refuses one above the
# limit from its header (PIL reads only the header at open; nothing is decoded yet). PIL's own
# decompression-bomb check does the same job with a fixed limit, a warning below twice the limit and
# a traceback above it; it is switched off so that one limit, the user's, applies, with one message.
Image.MAX_IMAGE_PIXELS = None
_max_pixels = MAX_PIXELS


def set_max_pixels(limit: int) -> None:
    """The limit of this process (inherited by forked loader workers); 0 = no limit."""
    global _max_pixels
    if limit < 0:
        raise InputError(f"--max-pixels {limit}: expected a pixel count >= 0 (0 = no limit)")
    _max_pixels = int(limit)
    Image.MAX_IMAGE_PIXELS = None  # whatever else set it: ours is the one check


def max_pixels() -> int:
    return _max_pixels


def _open_checked(path: Path, what: str) -> Image.Image:
    """PIL image of `path`, header read only; DatasetError if it is above the pixel limit."""
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO (or a device) named <id>.png blocked the read forever
        raise DatasetError(f"{path}: the {what} is not a regular file")
    im = Image.open(path)
    w, h = im.size
    if _max_pixels and w * h > _max_pixels:
        im.close()
        raise DatasetError(f"{path}: {what} is {w}x{h} = {w * h:,} pixels, above the limit of {_max_pixels:,}; "
                           "pass --max-pixels N to raise it (0 = no limit)")
    return im


VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class Dataset:
    """Images, image-level labels and optional ground truth of one split of one layout."""

    layout = "?"

    def __init__(self, root: Path, split: str | None, classes: list[str], ids: list[str]):
        self.root = root
        self.split = split
        self.classes = classes
        self.ids = ids
        self._index = {c: i for i, c in enumerate(classes)}
        # label names (labels.json, XML) match the class list by class_key, as everywhere else
        self._key_index = {class_key(c): i for i, c in enumerate(classes)}
        self._id_set = set(ids)
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise DatasetError(f"{root}: duplicate image ids {dup} in split {split!r}")
        if not ids:
            raise DatasetError(f"{root}: split {split or '(all)'} holds no images")

    # -- to be provided by each layout
    def image_path(self, item_id: str) -> Path: ...
    def gt_path(self, item_id: str) -> Path | None: ...
    def _named_labels(self, item_id: str) -> list[str] | None:
        """Image-level label names from annotations, or None to derive them from the GT mask."""
        return None

    # -- shared behaviour
    @property
    def has_background(self) -> bool:
        return self.classes[0].lower() in ("background", "_background_", "bg")

    @property
    def has_gt(self) -> bool:
        return any(self.gt_path(i) is not None for i in self.ids[:50])

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._id_set

    def image(self, item_id: str) -> np.ndarray:
        """(H, W, 3) uint8 RGB."""
        path = self.image_path(item_id)
        try:
            with _open_checked(path, "image") as im:
                if im.mode in ("I", "I;16", "I;16L", "I;16B"):  # 16-bit grayscale: PIL's convert clips at 255
                    gray = (np.asarray(im).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)
                    return np.repeat(gray[..., None], 3, axis=2)
                return np.asarray(im.convert("RGB"))
        except FileNotFoundError:
            raise DatasetError(f"{path}: image not found") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            cut = ": the file is truncated" if "truncated" in str(e) else ""  # PIL: "image file is truncated (...)"
            raise DatasetError(f"{path}: cannot decode image{cut} ({e.__class__.__name__})") from None

    def image_size(self, item_id: str) -> tuple[int, int]:
        """(H, W) read from the file header only."""
        path = self.image_path(item_id)
        try:
            with _open_checked(path, "image") as im:
                w, h = im.size
        except FileNotFoundError:
            raise DatasetError(f"{path}: image not found") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise DatasetError(f"{path}: cannot decode image ({e.__class__.__name__})") from None
        return h, w

    def gt(self, item_id: str) -> np.ndarray | None:
        """(H, W) uint8 class indices, 255 = ignore; None when the image has no ground truth."""
        path = self.gt_path(item_id)
        if path is None:
            return None
        mask = read_index_png(path)
        _check_same_size(path, mask, "mask", self.image_size(item_id), self.image_path(item_id))
        counts = np.bincount(mask.ravel(), minlength=256)
        counts[: len(self.classes)] = 0
        counts[IGNORE_INDEX] = 0
        bad = np.flatnonzero(counts)
        if bad.size:
            raise DatasetError(f"{path}: label values {bad.tolist()[:5]} are outside the {len(self.classes)} classes")
        return mask

    def labels(self, item_id: str) -> list[int]:
        """Sorted foreground label values present in the image (background never included)."""
        names = self._named_labels(item_id)
        if names is not None:
            values = set()
            for name in names:
                value = self._index.get(name, self._key_index.get(class_key(name)))
                if value is None:
                    raise DatasetError(f"{self._labels_source(item_id)}: label {name!r} of {item_id} is not in the class list")
                values.add(value)
        else:
            mask = self.gt(item_id)
            if mask is None:
                raise DatasetError(f"{self.root}: image {item_id} has neither image-level labels nor a mask")
            values = set(np.unique(mask).tolist()) - {IGNORE_INDEX}
        if self.has_background:
            values.discard(0)
        return sorted(values)

    def _labels_source(self, item_id: str) -> Path:
        return self.root

    def describe(self) -> str:
        return f"{self.layout} layout at {self.root}, split {self.split or '(all)'}: {len(self)} images, {len(self.classes)} classes"

    def fingerprint(self, ids: list[str] | None = None) -> str:
        """A digest of what a command reads of these ids (all by default): the ids in order, and the
        size and modification time of each one's image, label source and GT file. A --resume
        compares it (docs/contracts.md), so items computed from an earlier split, image or label file
        are never published beside new ones. Files shared by many ids (labels.json, a COCO json) are
        read once; costs one stat per file, no decoding."""
        digest = hashlib.sha1()
        last: list[tuple[Path | None, bytes]] = [(None, b"")] * 3  # shared files repeat from id to id
        for item_id in self.ids if ids is None else ids:
            digest.update(item_id.encode("utf-8", "surrogateescape") + b"\0")
            for slot, path in enumerate((self.image_path(item_id), self._labels_source(item_id), self.gt_path(item_id))):
                if path is not None and path != last[slot][0]:
                    last[slot] = (path, _stat_id(path))
                digest.update((last[slot][1] if path is not None else b"") + b"\0")
        return digest.hexdigest()[:20]


def _stat_id(path: Path) -> bytes:
    """Size and mtime of a file; a folder (a layout's labels come from its masks) or a missing file: a fixed mark."""
    try:
        st = os.stat(path)
    except OSError:
        return b"-"
    return b"dir" if stat.S_ISDIR(st.st_mode) else f"{st.st_size}:{st.st_mtime_ns}".encode()


def read_index_png(path: Path) -> np.ndarray:
    """(H, W) uint8 labels from a palette, grayscale or 16-bit PNG, or an RGB PNG in VOC colours.

    The one mask reader: dataset ground truth, `dhr train --masks`, `dhr eval --pred DIR`, imports.
    """
    from dhr_cli.io.palette import palette_array

    try:
        with _open_checked(path, "mask") as im:
            im.load()
            mode = im.mode
            if mode == "RGBA":
                im = im.convert("RGB")
                mode = "RGB"
            arr = np.asarray(im)
    except FileNotFoundError:
        raise DatasetError(f"{path}: mask not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DatasetError(f"{path}: cannot decode mask ({e.__class__.__name__})") from None
    if mode == "RGB":
        code = (arr[..., 0].astype(np.int32) << 16) | (arr[..., 1].astype(np.int32) << 8) | arr[..., 2]
        pal = palette_array().astype(np.int32)
        pal_code = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
        lut = {int(c): i for i, c in reversed(list(enumerate(pal_code)))}  # first index wins
        colours, inverse = np.unique(code, return_inverse=True)
        unknown = [int(c) for c in colours if int(c) not in lut]
        if unknown:
            rgb = ((unknown[0] >> 16) & 255, (unknown[0] >> 8) & 255, unknown[0] & 255)
            raise DatasetError(f"{path}: RGB mask holds colour {rgb}, which is not a VOC palette colour; save masks as palette or grayscale PNGs")
        return np.array([lut[int(c)] for c in colours], np.uint8)[inverse.reshape(code.shape)]
    if arr.ndim != 2:
        raise DatasetError(f"{path}: mask has shape {arr.shape}, expected a single channel")
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise DatasetError(f"{path}: mask values outside 0..255")
        arr = arr.astype(np.uint8)
    return arr


def class_key(name: str) -> str:
    """The one rule for matching class names across stores, datasets and GT: lower case, letters and digits."""
    return "".join(ch for ch in name.lower() if ch.isalnum())


def class_mismatch(ours: list[str], theirs: list[str], here: str, there: str, key=class_key) -> str | None:
    """Where two class lists first differ (by `key`), both names in full whatever their position:
    "class 5 is 'train' in the store but 'bus' in the dataset"; None when they match."""
    shorter = min(len(ours), len(theirs))
    i = next((i for i in range(max(len(ours), len(theirs))) if i >= shorter or key(ours[i]) != key(theirs[i])), None)
    return None if i is None else f"class {i} is {_named(ours, i, here)} but {_named(theirs, i, there)}"


def _named(names: list[str], i: int, where: str) -> str:
    return f"{names[i]!r} in {where}" if i < len(names) else f"absent from {where} (it has {len(names)} classes)"


def names_twice(names: list[str]) -> list[str]:
    """The names of a class list that class_key makes one (sorted): such a list is ambiguous wherever
    classes are matched by name."""
    keys = [class_key(str(n)) for n in names]
    count = Counter(keys)
    return sorted({str(n) for n, k in zip(names, keys) if count[k] > 1})


def _read_text(path: Path) -> str:
    """A layout's list file as text: a file that is not UTF-8 is named (open_dataset's catch-all cannot
    name it: a UnicodeDecodeError carries no file name)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not UTF-8 text") from None


def read_classes_file(path: Path) -> list[str]:
    """A classes.txt (one name a line, the index is the label value; flat, VOC and DHR layouts): one
    line on what is wrong with it, the same for every layout."""
    classes = [c.strip() for c in _read_text(path).splitlines() if c.strip()]
    if not classes:
        raise DatasetError(f"{path}: no class names")
    twice = names_twice(classes)
    if twice:
        raise DatasetError(f"{path}: class names {twice} name one class more than once")
    if len(classes) > 255:
        raise DatasetError(f"{path}: {len(classes)} classes; at most 255 fit uint8 masks with 255 = ignore")
    return classes


def _read_list(path: Path, known: set[str] | frozenset = frozenset()) -> list[str]:
    """The ids of a split file: a line's first word (VOC's `ImageSets/Main` lines are "id  1"), or the
    whole line when that is a known id (a flat dataset's image named "my photo.jpg") or when neither is
    (so that an error quotes the line as written)."""
    lines = [line.strip() for line in _read_text(path).splitlines()]
    return [line.split()[0] if line not in known and line.split()[0] in known else line
            for line in lines if line and not line.startswith("#")]


def _image_by_id(images: dict[str, Path], where: Path, item_id: str) -> Path:
    """The image of `item_id` in an index of the folder `where` (`_images_by_stem`); one line if absent."""
    if item_id not in images:
        raise DatasetError(f"{where}: no image for id {item_id!r}")
    return images[item_id]


def _existing(*candidates: Path) -> Path | None:
    """The first of the candidate ground-truth files that exists, or None."""
    return next((p for p in candidates if p.exists()), None)


def _exif_orientation(path: Path | None) -> int:
    """The EXIF orientation tag (1..8) of an image file, read from its header; 1 when absent or unreadable."""
    if path is None:
        return 1
    try:
        with Image.open(path) as im:
            return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - only a hint for an error message
        return 1


def _check_same_size(path: Path, array: np.ndarray, what: str, size: tuple[int, int], image: Path | None = None) -> None:
    """A ground-truth map of another size than its image (H, W) is refused in one line; when the image's
    EXIF orientation turns it by 90 degrees and the map has the turned size, the line says so (images
    are read as stored, without EXIF rotation, as PIL and the WSSS codebases read them)."""
    if array.shape != tuple(size):
        raise DatasetError(f"{path}: {what} is {array.shape[1]}x{array.shape[0]} but its image is {size[1]}x{size[0]}"
                           + _exif_hint(image, tuple(array.shape), tuple(size), what))


def _exif_hint(image: Path | None, other: tuple[int, int], size: tuple[int, int], what: str) -> str:
    """The end of a size-mismatch line when `other` (H, W) is the image's size (H, W) turned by the image's
    EXIF orientation tag; else ''."""
    orientation = _exif_orientation(image) if tuple(other) == tuple(size)[::-1] else 1
    if orientation < 5:
        return ""
    return (f" as stored; {image.name} has EXIF orientation {orientation}, which shows it turned to "
            f"{size[0]}x{size[1]}, but dhr reads images as stored: give the {what} the stored "
            "orientation, or rotate the image and drop its EXIF orientation tag")


def _images_by_stem(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for entry in os.scandir(folder):
        p = Path(entry.path)
        if p.suffix.lower() in IMAGE_SUFFIXES and entry.is_file():
            if p.stem in found:
                raise DatasetError(f"{folder}: duplicate image id {p.stem!r} ({found[p.stem].name} and {p.name})")
            found[p.stem] = p
    return found


def _xml_labels(path: Path) -> list[str]:
    try:
        tree = ET.parse(path)
    except ET.ParseError as e:
        raise DatasetError(f"{path}: not valid XML ({e})") from None
    return [(o.findtext("name") or "").strip() for o in tree.getroot().iter("object")]


def _select_split(root: Path, ids: list[str], split: str | None, lists: dict[str, Path], available: list[str]) -> list[str]:
    if split is None:
        return ids
    if split not in lists:
        raise DatasetError(f"{root}: no split {split!r}; available: {', '.join(sorted(lists)) or 'none'}")
    known = set(available)
    wanted = _read_list(lists[split], known)
    missing = [i for i in wanted if i not in known]
    if missing:
        raise DatasetError(f"{lists[split]}: {len(missing)} ids have no image, e.g. {missing[:3]}")
    return wanted


# ---- flat -----------------------------------------------------------------------------------
class FlatDataset(Dataset):
    layout = "flat"

    def __init__(self, root: Path, split: str | None):
        classes = read_classes_file(root / "classes.txt")
        self._images = _images_by_stem(root / "images")
        self._masks_dir = root / "masks"
        lists = {p.stem: p for p in sorted((root / "splits").glob("*.txt"))} if (root / "splits").is_dir() else {}
        ids = _select_split(root, sorted(self._images), split, lists, list(self._images))
        self._labels_file = root / "labels.json"
        self._label_names: dict[str, list[str]] | None = None
        if self._labels_file.exists():
            try:
                data = json.loads(self._labels_file.read_text(encoding="utf-8-sig"))
            except json.JSONDecodeError as e:
                raise DatasetError(f"{self._labels_file}: not valid JSON ({e.msg}, line {e.lineno})") from None
            if not isinstance(data, dict) or not all(
                isinstance(v, list) and all(isinstance(n, str) for n in v) for v in data.values()
            ):
                raise DatasetError(f'{self._labels_file}: expected {{"<id>": ["class", ...], ...}}')
            index = {class_key(c) for c in classes}
            for item_id, names in data.items():
                for name in names:
                    if class_key(name) not in index:
                        raise DatasetError(f"{self._labels_file}: label {name!r} of {item_id} is not in classes.txt")
            self._label_names = data
        super().__init__(root, split, classes, ids)

    def image_path(self, item_id: str) -> Path:
        return _image_by_id(self._images, self.root / "images", item_id)

    def gt_path(self, item_id: str) -> Path | None:
        return _existing(self._masks_dir / f"{item_id}.png")

    def _named_labels(self, item_id: str) -> list[str] | None:
        if self._label_names is None:
            return None
        if item_id not in self._label_names:
            if self.gt_path(item_id) is not None:
                return None
            raise DatasetError(f"{self._labels_file}: no labels for image {item_id}")
        return self._label_names[item_id]

    def _labels_source(self, item_id: str) -> Path:
        return self._labels_file


# ---- PASCAL VOC 2012 ------------------------------------------------------------------------
class VOCDataset(Dataset):
    layout = "voc"

    def __init__(self, root: Path, split: str | None):
        classes_file = root / "classes.txt"
        classes = read_classes_file(classes_file) if classes_file.exists() else VOC_CLASSES
        self._images = _images_by_stem(root / "JPEGImages")
        self._gt_dirs = [d for d in (root / "SegmentationClass", root / "SegmentationClassAug") if d.is_dir()]
        self._xml_dir = root / "Annotations"
        lists: dict[str, Path] = {}
        for sub in ("Main", "SegmentationAug", "Segmentation"):  # later ones win
            folder = root / "ImageSets" / sub
            if folder.is_dir():
                lists.update({p.stem: p for p in folder.glob("*.txt") if "_" not in p.stem or p.stem.endswith("_aug")})
        if split is None and "train" in lists:
            split = "train"
            logger.info("VOC layout without --split: using ImageSets/Segmentation/train.txt")
        ids = _select_split(root, sorted(self._images), split, lists, list(self._images))
        super().__init__(root, split, classes, ids)

    def image_path(self, item_id: str) -> Path:
        return _image_by_id(self._images, self.root / "JPEGImages", item_id)

    def gt_path(self, item_id: str) -> Path | None:
        return _existing(*(d / f"{item_id}.png" for d in self._gt_dirs))

    def _named_labels(self, item_id: str) -> list[str] | None:
        p = self._xml_dir / f"{item_id}.xml"
        return _xml_labels(p) if p.exists() else None

    def _labels_source(self, item_id: str) -> Path:
        return self._xml_dir / f"{item_id}.xml"


# ---- DHR / MARS -----------------------------------------------------------------------------
class DHRDataset(Dataset):
    layout = "dhr"

    def __init__(self, root: Path, split: str | None):
        splits = sorted(p.parent.name for p in root.glob("*/image") if p.is_dir())
        if split is None:
            if len(splits) != 1:
                raise DatasetError(f"{root}: DHR layout with splits {', '.join(splits)}; choose one with --split")
            split = splits[0]
        if split not in splits:
            raise DatasetError(f"{root}: no split {split!r}; available: {', '.join(splits)}")
        classes_file = root / "classes.txt"
        classes = read_classes_file(classes_file) if classes_file.exists() else VOC_CLASSES
        base = root / split
        self._images = _images_by_stem(base / "image")
        self._mask_dir = base / "mask"
        self._xml_dir = base / "xml"
        super().__init__(root, split, classes, sorted(self._images))

    def image_path(self, item_id: str) -> Path:
        return _image_by_id(self._images, self.root / str(self.split) / "image", item_id)

    def gt_path(self, item_id: str) -> Path | None:
        return _existing(self._mask_dir / f"{item_id}.png")

    def _named_labels(self, item_id: str) -> list[str] | None:
        p = self._xml_dir / f"{item_id}.xml"
        return _xml_labels(p) if p.exists() else None

    def _labels_source(self, item_id: str) -> Path:
        return self._xml_dir / f"{item_id}.xml"


def detect_layout(root: Path) -> tuple[str, Path]:
    """(layout, resolved root) or DatasetError saying why nothing fits."""
    from dhr_cli.io import coco, scenes

    found = coco.detect(root) + scenes.detect(root)
    if (root / "classes.txt").is_file() and (root / "images").is_dir():
        found.insert(0, ("flat", root))
    if len(found) > 1:
        raise DatasetError(f"{root}: mixed dataset layouts ({', '.join(n for n, _ in found)}); keep one per folder")
    if found:
        return found[0]
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            return "voc", candidate
    if any(p.is_dir() for p in root.glob("*/image")):
        return "dhr", root
    raise DatasetError(
        f"{root}: matches no dataset layout (flat needs classes.txt and images/; "
        "PASCAL VOC needs JPEGImages/; DHR/MARS needs <split>/image/; COCO needs annotations/instances_<split>.json, "
        "coco_seg_anno/ or SegmentationClass/<split>/; ADE20K needs images/training|validation and annotations/; "
        "Pascal Context needs JPEGImages/ and SegmentationClassContext/ (or trainval/) PNGs; "
        "COCO-Stuff needs stuffthingmaps_trainval2017/)"
    )


# What the layouts read (detect_layout): files and folders an output must never replace.
# Stores, reports and runs written next to them (ROOT/cams.h5, ROOT/pseudo/) are not among them.
DATASET_PARTS = frozenset({
    "classes.txt", "labels.json", "images", "masks", "splits",  # flat
    "JPEGImages", "SegmentationClass", "SegmentationClassAug", "Annotations", "ImageSets",  # VOC, Context
    "SegmentationClassContext", "trainval", "image", "mask", "xml",  # Pascal Context, DHR/MARS
    "annotations", "train2014", "val2014", "coco_seg_anno", "stuffthingmaps_trainval2017",  # COCO family
    "cls_labels_onehot.npy",
})
_STORE_SUFFIXES = (".h5", ".hdf5", ".partial", ".lock")


def dataset_part(path: str | os.PathLike) -> Path | None:
    """The dataset root when an existing `path` is a file or folder some layout under it reads
    (classes.txt, images/, JPEGImages/..., the COCO json), or the root itself; else None.
    HDF5 outputs (e.g. the COCO GT cache in annotations/) are never parts."""
    path = Path(os.path.abspath(path))
    if not os.path.lexists(path):
        return None
    if path.is_dir():
        try:
            return detect_layout(path)[1]
        except DatasetError:
            pass
    elif path.name.endswith(_STORE_SUFFIXES):
        return None
    for root in list(path.parents)[:4]:
        try:
            _, resolved = detect_layout(root)
        except (DatasetError, OSError):
            continue
        try:
            rel = path.relative_to(os.path.abspath(resolved))
        except ValueError:
            continue
        if any(part in DATASET_PARTS for part in rel.parts):
            return Path(resolved)
    return None


# Reader options a CLI command sets once from its own options (--skip-missing-images, --gt-cache;
# dhr_cli/cli/options.py) for every open_dataset() of that command; explicit arguments win.
DATASET_OPTIONS: ContextVar[dict] = ContextVar("dhr_dataset_options", default={})


def open_dataset(root: str | os.PathLike, split: str | None = None, *, missing_images: str | None = None,
                 gt_cache: str | os.PathLike | None = None) -> Dataset:
    """Open a dataset folder of any supported layout (auto-detected).

    COCO official files only: `missing_images` "fail" (default) or "skip" for images the json lists
    but the folder lacks; `gt_cache` a GT cache store other than the default next to the json
    (dhr_cli.io.coco.build_gt_cache)."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{root}: no such folder")
    if not root.is_dir():
        raise DatasetError(f"{root}: is a file, expected a dataset folder")
    layout, resolved = detect_layout(root)
    from dhr_cli.io import coco, scenes

    cls = {"flat": FlatDataset, "voc": VOCDataset, "dhr": DHRDataset, **coco.READERS, **scenes.READERS}[layout]
    opts = DATASET_OPTIONS.get()
    extra = {}
    if layout != "coco" and (gt_cache is not None or opts.get("gt_cache") is not None):
        raise DatasetError(f"{resolved}: --gt-cache is for COCO official annotation files; this folder has the "
                           f"{layout} layout")
    if layout == "coco":
        extra = {"missing": missing_images or opts.get("missing_images") or "fail",
                 "gt_cache": gt_cache if gt_cache is not None else opts.get("gt_cache")}
    try:
        ds = cls(resolved, split, **extra)
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{getattr(e, 'filename', None) or resolved}: cannot be read ({e.__class__.__name__})") from None
    logger.info("found %s", ds.describe())
    return ds
