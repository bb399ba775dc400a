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
from itertools import chain, compress, repeat, starmap
from math import hypot
from operator import is_, itemgetter, not_
from pathlib import Path

import numpy as np

from dhr_cli.config import IGNORE_INDEX
from dhr_cli.errors import DatasetError
from dhr_cli.io.datasets import Dataset, _check_same_size, _exif_hint, _existing, _image_by_id, _images_by_stem, names_twice, read_index_png

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

    def __init__(self, root: Path, split: str | None, missing: str = "fail", gt_cache: str | os.PathLike | None = None):
        available = [s for s in COCO_SPLITS if (root / "annotations" / f"instances_{s}.json").is_file()]
        split = _pick_split(root, split, available, "COCO layout")
        self._json = root / "annotations" / f"instances_{split}.json"
        self.root, self.split = root, split  # (Dataset.__init__ sets them again) for messages before it runs
        self._cache_explicit = gt_cache is not None
        self.cache_path = Path(gt_cache) if gt_cache is not None else default_gt_cache(self._json)
        self._cache = None  # opened on the first gt() call, per process (HDF5 handles must not cross a fork)
        self._cache_store = None
        self._cache_pid = None
        self._cache_problem: str | None = None
        self._cache_checked = False  # _cache_problem holds the check of the file there now
        self._stale_warned = False
        self.cache_state = "absent"
        self._coco_obj = None
        # A valid GT cache carries the json's image index (ids, file names, sizes, labels, categories):
        # then the json (hundreds of MB for COCO train) is not read unless an image must be rasterised.
        index = self._cached_index()
        self.index_source = "GT cache" if index is not None else "annotation file"
        if index is None:
            index = self._index_from_json()
        self._cindex = index
        self._label_of = {cid: i + 1 for i, (cid, _) in enumerate(index.categories)}
        classes = ["background"] + [name for _, name in index.categories]
        folder = root / split
        present = {e.name for e in os.scandir(folder)} if folder.is_dir() else set()
        by_id, absent = {}, []
        # Images without a non-crowd object have no image-level label: WSSS leaves them out (COCO
        # train2014: 82,081 of 82,783 images stay, val2014: 40,137 of 40,504); counted, not an error.
        unlabelled = [row for row, labels in enumerate(index.labels) if not len(labels)]
        self.skipped_unlabelled = len(unlabelled)
        skip = set(unlabelled)
        stems = [Path(name).stem for name in index.file_names]  # the item ids
        self._check_unique_ids(index, stems)
        listings = {"": present}  # the file names of each sub-folder of the split folder named in the json
        for row, name in enumerate(index.file_names):
            if row in skip:
                continue
            sub, _, base = name.rpartition("/")
            if sub not in listings:
                listings[sub] = {e.name for e in os.scandir(folder / sub)} if (folder / sub).is_dir() else set()
            (by_id.__setitem__(stems[row], row) if base in listings[sub] else absent.append(name))
        if unlabelled:
            logger.info("%s: %d images without a (non-crowd) object left out", self._json, len(unlabelled))
        self.skipped_missing = len(absent)
        if absent:
            absent.sort()
            msg = f"{self._json}: {len(absent)} of {len(index.file_names)} images are missing from {folder}, first {absent[0]}"
            if missing != "skip":
                raise DatasetError(msg + " (pass --skip-missing-images to leave them out)")
            logger.warning("%s; skipped (--skip-missing-images)", msg)
        self._folder, self._by_id = folder, by_id
        super().__init__(root, split, classes, sorted(by_id))

    # -- the image index: from the GT cache when it is valid, else from the json
    def _cached_index(self) -> "CocoIndex | None":
        if not self.cache_path.is_file():
            return None
        self._cache_problem = gt_cache_problem(self.cache_path, self._json)
        self._cache_checked = True
        if self._cache_problem is not None:
            return None
        return CocoIndex.read(self.cache_path)

    def _check_unique_ids(self, index: "CocoIndex", stems: list[str]) -> None:
        """An image's item id is its file name without folder and extension (store item ids may not hold
        '/'): two images of one id (the same file listed twice, or a.jpg and a.png, or sub/a.jpg and
        a.jpg) would replace each other, so they are refused, as the other layouts refuse duplicate ids.
        Checked on the index from the json and from a GT cache alike."""
        if len(set(stems)) == len(stems):
            return
        first: dict[str, int] = {}
        for row, stem in enumerate(stems):
            other = first.setdefault(stem, row)
            if other != row:
                a, b = int(index.image_ids[other]), int(index.image_ids[row])
                name = index.file_names[row]
                if index.file_names[other] == name:
                    raise DatasetError(f"{self._json}: images {a} and {b} have the same file_name {name!r}; "
                                       "each image needs its own file")
                raise DatasetError(f"{self._json}: images {a} ({index.file_names[other]}) and {b} ({name}) would both be "
                                   f"image id {stem!r} (the file name without folder and extension); duplicate image ids")

    def _index_from_json(self) -> "CocoIndex":
        coco = self._coco  # validated when loaded (check_instances)
        cats = sorted(coco.cats)
        label_of = {cid: i + 1 for i, cid in enumerate(cats)}
        imgs = list(coco.imgs.values())
        labels = [sorted({label_of[a["category_id"]] for a in coco.imgToAnns.get(img["id"], []) if not a.get("iscrowd", 0)})
                  for img in imgs]
        return CocoIndex(
            categories=[(cid, coco.cats[cid]["name"]) for cid in cats],
            image_ids=np.array([img["id"] for img in imgs], np.int64),
            file_names=[img["file_name"] for img in imgs],
            heights=np.array([img["height"] for img in imgs], np.int64),
            widths=np.array([img["width"] for img in imgs], np.int64),
            labels=labels,
        )

    @property
    def _coco(self):
        """The pycocotools index of the json, loaded on first use (rasterising, or no valid cache)."""
        if self._coco_obj is None:
            try:
                from pycocotools.coco import COCO  # noqa: F401
            except ImportError:
                raise DatasetError(f"{self.root}: reading COCO annotations needs pycocotools (pip install 'dhr[coco]')") from None
            self._coco_obj = self._load(self._json)
        return self._coco_obj

    @staticmethod
    def _load(path: Path):
        import contextlib
        import io

        from pycocotools.coco import COCO

        coco = COCO()
        text = path.read_text(encoding="utf-8-sig")
        try:
            coco.dataset = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(coco.dataset, dict) or not {"images", "annotations", "categories"} <= set(coco.dataset):
            raise DatasetError(f"{path}: not a COCO instances file (needs images, annotations, categories)")
        # before pycocotools indexes (or later rasterises) any of it; a file without true / false
        # (COCO's have none) holds no bools, whose search in every polygon is then skipped
        check_instances(path, coco.dataset, exact_types="true" in text or "false" in text)
        del text
        with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
            coco.createIndex()
        return coco

    def image_path(self, item_id: str) -> Path:
        if item_id not in self._by_id:
            raise DatasetError(f"{self._json}: no image {item_id!r}")
        return self._folder / self._cindex.file_names[self._by_id[item_id]]

    def gt_path(self, item_id: str) -> Path | None:
        return self._json

    def _hw(self, item_id: str) -> tuple[int, int]:
        row = self._by_id[item_id]
        return int(self._cindex.heights[row]), int(self._cindex.widths[row])

    def _anns(self, item_id: str) -> list[dict]:
        return self._coco.imgToAnns.get(int(self._cindex.image_ids[self._by_id[item_id]]), [])

    def _named_labels(self, item_id: str) -> list[str] | None:
        return [self.classes[v] for v in self._cindex.labels[self._by_id[item_id]]]

    def _labels_source(self, item_id: str) -> Path:
        return self._json

    def gt(self, item_id: str) -> np.ndarray:
        """The cached mask when a valid GT cache holds it, else rasterise_gt()."""
        cache = self._open_cache()
        if cache is not None and item_id in self._cache_ids:
            mask = cache[f"items/{item_id}/mask"][()]  # straight from HDF5 (checksummed): no Item bookkeeping
            h, w = self._hw(item_id)
            if mask.dtype != np.uint8 or mask.shape != (h, w):
                raise DatasetError(f"{self.cache_path}: cached mask of {item_id} is {mask.shape[1]}x{mask.shape[0]} but "
                                   f"{self._json.name} says {w}x{h}; rebuild it with --build-cache")
            return mask
        return self.rasterise_gt(item_id)

    def open_gt_cache(self) -> str:
        """Open (or check) the GT cache in this process now, warning once if it is stale; loader
        workers forked after this do not repeat the warning. Returns cache_state."""
        self._open_cache()
        return self.cache_state

    def _open_cache(self):
        if self._cache_pid == os.getpid():
            return self._cache
        self._cache_pid = os.getpid()
        self._cache = None
        if not self.cache_path.is_file():
            if self._cache_explicit:
                raise DatasetError(f"{self.cache_path}: no such GT cache; build it with dhr info {self.root} --split "
                                   f"{self.split} --build-cache --gt-cache {self.cache_path}")
            return None
        if not self._cache_checked:  # checked once (at opening when the index came from the cache)
            self._cache_problem = gt_cache_problem(self.cache_path, self._json, self.classes)
            self._cache_checked = True
        if self._cache_problem is None:
            from dhr_cli.io.store import open_store

            self._cache_store = open_store(self.cache_path, expect="masks")  # validates the root attributes
            self._cache = self._cache_store._file
            self._cache_ids = set(self._cache_store.ids)
            self.cache_state = "valid"
        else:
            self.cache_state = "stale"
            self._warn_stale()
        return self._cache

    def _warn_stale(self) -> None:
        """Once per dataset (loader workers inherit the flag), not once per process."""
        if not self._stale_warned:
            self._stale_warned = True
            logger.warning("%s: GT cache not used (%s); rasterising on the fly; rebuild it with "
                           "dhr info %s --split %s --build-cache", self.cache_path, self._cache_problem, self.root, self.split)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"], state["_cache_pid"], state["_cache_store"] = None, None, None
        return state

    def rasterise_gt(self, item_id: str) -> np.ndarray:
        """Crowd regions first (255), then every non-crowd object painted over them with its label."""
        hw = self._hw(item_id)
        size = self.image_size(item_id)  # header only: the json's size must be the file's
        if hw != size:
            image = self.image_path(item_id)
            raise DatasetError(f"{self._json}: {image.name} is {hw[1]}x{hw[0]} in the json but {size[1]}x{size[0]} "
                               "in its file" + _exif_hint(image, hw, size, "annotations"))
        mask = np.zeros(hw, np.uint8)
        anns = self._anns(item_id)
        for ann in sorted(anns, key=lambda a: not a.get("iscrowd", 0)):  # crowd first
            if isinstance(ann["segmentation"], list):  # polygons of under 3 points have no area (and pycocotools
                ann = {**ann, "segmentation": [p for p in ann["segmentation"] if len(p) >= 6]}  # reads 4 as a box)
            m = self._coco.annToMask(ann).astype(bool)
            mask[m] = IGNORE_INDEX if ann.get("iscrowd", 0) else self._label_of[ann["category_id"]]
        return mask

    def describe(self) -> str:
        unlabelled = f"; {self.skipped_unlabelled} images without a labelled object left out" if self.skipped_unlabelled else ""
        return (f"{super().describe()} (COCO official files {self._json.name}, image index from the {self.index_source}"
                f"{unlabelled}; {self.convention})")


# ---- instances json: structure checked once, when it is loaded -------------------------------
_NUMBER = {int, float}  # JSON numbers: exact types, so that true/false (bool, an int subclass) are refused
_ID_RANGE = 2**63  # ids are kept as int64 (the GT cache's image index)
# Polygon coordinates must be finite and within POLY_MARGIN image sizes (max(height, width)) of the
# image. pycocotools' rleFrPoly scales every vertex by 5 into a C int (NaN, inf and values past ~4e8
# overflow it: a segfault) and allocates every upsampled point along the outline, 5 per pixel of each
# edge's longer side (so coordinates of 1e8 ask for gigabytes: the process is killed). Real annotations
# lie within the image give or take a pixel; 10 image sizes on every side is generous for them, keeps
# the C ints far from overflow (for images of up to ~40 million pixels a side) and bounds that memory
# to ~16 bytes x 5 x 21 image sizes per vertex at worst (~1 MB for a 640x480 image).
POLY_MARGIN = 10
MAX_CATEGORIES = 254  # label values 1..K and 255 (crowd) in a uint8 mask: K <= 254


def _is_id(v) -> bool:
    return type(v) is int and -_ID_RANGE <= v < _ID_RANGE


def _entries(path: Path, d: dict, key: str) -> list:
    seq = d[key]
    if not isinstance(seq, list):
        raise DatasetError(f"{path}: {key!r} is {'null' if seq is None else 'a ' + type(seq).__name__}; expected a list")
    if set(map(type, seq)) - {dict}:
        bad = next(k for k, e in enumerate(seq) if type(e) is not dict)
        raise DatasetError(f"{path}: {key}[{bad}] is {json.dumps(seq[bad])[:40]}; expected an object")
    return seq


def _rle_string_counts(s: str) -> list[int] | None:
    """The run lengths of a compressed RLE string, decoded as pycocotools' rleFrString does (6 bits a
    character from '0', 5 of value and a continuation bit; from the third run on, a difference to the
    run two before), or None when it is none: a character outside '0'..'o', a count cut off at the end
    or longer than 6 characters (where rleFrString reads past the string or overflows a C int)."""
    counts: list[int] = []
    x = k = 0
    for ch in s:
        c = ord(ch) - 48
        if not 0 <= c < 64 or k == 6:
            return None
        x |= (c & 0x1F) << (5 * k)
        k += 1
        if not c & 0x20:
            if c & 0x10:
                x -= 1 << (5 * k)  # sign extension
            if len(counts) > 2:
                x += counts[-2]
            counts.append(x)
            x = k = 0
    return None if k else counts


def _rle_problem(seg: dict, h: int, w: int) -> str | None:
    if "counts" not in seg or "size" not in seg:
        return "has an RLE segmentation without 'counts' and 'size'"
    size, counts = seg["size"], seg["counts"]
    if not (type(size) is list and len(size) == 2 and all(type(v) is int for v in size)):
        return f"has an RLE size {json.dumps(size)[:40]}; expected [height, width]"
    if size != [h, w]:
        return f"has an RLE of size {size}, but its image is {[h, w]} (height, width) in the json"
    if type(counts) is str:
        runs = _rle_string_counts(counts)
        if runs is None:
            return "has RLE counts that are not a compressed RLE string"
        kind = "compressed RLE counts"
    elif type(counts) is list:
        if not set(map(type, counts)) <= {int}:
            return "has RLE counts that are not a list of integers"
        runs, kind = counts, "RLE counts"
    else:
        return f"has RLE counts of type {type(counts).__name__}; expected a string or a list of integers"
    if runs and min(runs) < 0:
        return f"has {kind} with a negative run ({min(runs)})"
    if sum(runs) != h * w:  # pycocotools refuses more; fewer leave pixels of the mask unwritten (garbage)
        return f"has {kind} covering {sum(runs)} pixels, but its image has {h}x{w} = {h * w}"
    return None


def _polygons_problem(seg: list, h: int, w: int) -> str | None:
    """Polygons: lists of x, y numbers (those of under 3 points are dropped when rasterising, and at
    least one must remain), finite and within POLY_MARGIN image sizes of the image."""
    size = max(h, w)
    lo, hi = -POLY_MARGIN * size, (POLY_MARGIN + 1) * size
    kept = 0
    for p in seg:
        if type(p) is not list or not set(map(type, p)) <= _NUMBER:
            return "has a polygon that is not a list of numbers"
        if len(p) % 2:
            return "has a polygon with an odd number of coordinates"
        if not p:
            continue
        try:
            total = sum(p)  # NaN or inf anywhere makes it NaN or inf (so do values near 1e308)
        except OverflowError:  # an integer beyond the float range
            total = float("inf")
        if total != total or abs(total) == float("inf") or min(p) < lo or max(p) > hi:
            bad = next((v for v in p if not lo <= v <= hi), p[0])  # NaN fails every comparison
            return (f"has a polygon coordinate {json.dumps(bad)[:24]}; coordinates must be finite and within "
                    f"{POLY_MARGIN} image sizes of its {w}x{h} image")
        kept += len(p) >= 6
    return None if kept else "has an empty segmentation"


def check_instances(path: Path, d: dict, exact_types: bool = True) -> None:
    """Refuse, in one DatasetError line naming the json and the entry, what pycocotools would crash on
    (a traceback or a segfault), run out of memory on, or read wrongly: entries of the wrong type,
    missing or mistyped ids, file names and sizes, duplicate ids, unknown references, and
    segmentations that are not polygons of finite, sane coordinates or RLE of the image's size.

    Column-wise with C-level builtins and numpy (_annotations_pass), entry by entry only to name what
    is wrong: 10-15% of pycocotools' own load (read, json parse, createIndex) on a synthetic json of
    100k annotations, ~6% on one of COCO train's 600k (docs/datasets.md)."""
    cats = _entries(path, d, "categories")
    if not cats:
        raise DatasetError(f"{path}: 'categories' is empty; the classes are listed there")
    images = _entries(path, d, "images")
    anns = _entries(path, d, "annotations")

    cat_ids: set[int] = set()
    for k, c in enumerate(cats):
        if "id" not in c or not _is_id(c["id"]):
            what = f"has id {json.dumps(c['id'])[:40]}" if "id" in c else "has no id"
            raise DatasetError(f"{path}: categories[{k}] {what}; expected an integer")
        if type(c.get("name")) is not str or not c["name"].strip():
            what = f"name {json.dumps(c['name'])[:40]}" if "name" in c else "no name"
            raise DatasetError(f"{path}: category {c['id']} has {what}; expected a non-empty string")
        if c["id"] in cat_ids:
            raise DatasetError(f"{path}: category id {c['id']} appears more than once")
        cat_ids.add(c["id"])
    twice = names_twice([c["name"] for c in cats])
    if twice:
        raise DatasetError(f"{path}: category names {twice} appear more than once; each class needs its own name")
    if len(cats) > MAX_CATEGORIES:
        raise DatasetError(f"{path}: {len(cats)} categories; at most {MAX_CATEGORIES} fit the uint8 masks "
                           "(255 marks crowd regions)")

    size_of: dict[int, tuple[int, int]] = {}
    names: set[str] = set()
    for k, img in enumerate(images):
        if "id" not in img or not _is_id(img["id"]):
            what = f"has id {json.dumps(img['id'])[:40]}" if "id" in img else "has no id"
            raise DatasetError(f"{path}: images[{k}] {what}; expected an integer")
        iid = img["id"]
        if iid in size_of:
            raise DatasetError(f"{path}: image id {iid} appears more than once (images[{k}] and an earlier one)")
        name = img.get("file_name")
        if type(name) is not str or not name:
            what = f"file_name {json.dumps(name)[:40]}" if "file_name" in img else "no file_name"
            raise DatasetError(f"{path}: image {iid} has {what}; expected a file name")
        wrapped = f"/{name}/"  # an empty, '.' or '..' part: "//", "/./", "/../"
        if "//" in wrapped or "/./" in wrapped or "/../" in wrapped or "\x00" in name:
            raise DatasetError(f"{path}: image {iid} has file_name {name!r}; expected a path inside the split's "
                               "image folder (no leading '/', no '.' or '..' parts)")
        try:
            name.encode()
        except UnicodeEncodeError:  # a lone surrogate ("\ud800" in the json): no file has that name
            raise DatasetError(f"{path}: image {iid} has file_name {name!r}, which is not valid Unicode") from None
        if name in names:
            raise DatasetError(f"{path}: file_name {name!r} is listed twice (image {iid} and an earlier one); "
                               "each image needs its own file")
        names.add(name)
        hw = []
        for key in ("height", "width"):
            v = img.get(key)
            if type(v) is not int or not 0 < v < 2**31:  # (int32 in the GT cache's index)
                what = f"{key} {json.dumps(v)[:40]}" if key in img else f"no {key}"
                raise DatasetError(f"{path}: image {iid} ({name}) has {what}; expected a positive integer")
            hw.append(v)
        size_of[iid] = (hw[0], hw[1])

    if not _annotations_pass(anns, cat_ids, size_of, exact_types):
        _annotation_problem(path, anns, cat_ids, size_of)  # the same checks entry by entry: raises, naming it


def _annotations_pass(anns: list[dict], cat_ids: set, size_of: dict, exact_types: bool) -> bool:
    """True when every annotation passes _annotation_problem's checks, made here by columns with
    C-level builtins and numpy (about 3x faster than entry by entry); False at the first doubt (the
    entry-by-entry pass then says which annotation and why).

    A polygon's coordinates cost one math.hypot (a C loop over doubles, as fast as sum()): no
    coordinate exceeds that norm, so a norm within the margin clears them all (and a NaN or inf makes
    it NaN or inf); only polygons of a larger norm (long ones, or far out) are looked at closer."""
    try:  # the columns (a missing key: KeyError)
        aids, cids, iids, segs = (list(map(itemgetter(key), anns)) for key in ("id", "category_id", "image_id", "segmentation"))
    except KeyError:
        return False
    try:
        crowd = list(map(itemgetter("iscrowd"), anns))
    except KeyError:  # optional (0)
        crowd = [a.get("iscrowd", 0) for a in anns]
    if set(map(type, aids)) - {int}:
        return False
    try:
        ordered = np.sort(np.array(aids, np.int64))  # OverflowError: beyond int64
    except OverflowError:
        return False
    if (ordered[1:] == ordered[:-1]).any():  # an id twice
        return False
    if not (set(map(type, cids)) <= {int} and set(cids) <= cat_ids):
        return False
    if not (set(map(type, iids)) <= {int} and set(iids) <= size_of.keys()):
        return False
    if not (set(map(type, crowd)) <= {int, bool} and set(crowd) <= {0, 1}):
        return False
    kinds = list(map(type, segs))
    if not set(kinds) <= {list, dict}:
        return False
    is_poly = list(map(is_, kinds, repeat(list)))
    if not all(is_poly):  # RLE: crowd regions, ~1% of COCO's annotations
        if any(_rle_problem(seg, *size_of[iid]) for seg, iid in compress(zip(segs, iids), map(not_, is_poly))):
            return False
    psegs = list(compress(segs, is_poly))
    if not psegs:
        return True
    if not all(psegs):  # an empty list
        return False
    polys = list(chain.from_iterable(psegs))
    if set(map(type, polys)) != {list}:
        return False
    lens = np.fromiter(map(len, polys), np.int64, len(polys))
    if (lens % 2).any():
        return False
    try:
        norms = np.fromiter(starmap(hypot, polys), np.float64, len(polys))
    except (TypeError, OverflowError):  # not numbers, or an integer beyond the float range
        return False
    if exact_types and not set(map(type, chain.from_iterable(polys))) <= _NUMBER:  # bools (hypot takes them)
        return False
    size = {iid: max(hw) for iid, hw in size_of.items()}
    per_seg = np.fromiter(map(len, psegs), np.int64, len(psegs))
    first = np.concatenate([[0], np.cumsum(per_seg)[:-1]])
    if not (np.add.reduceat(lens >= 6, first) > 0).all():  # an annotation all of whose polygons lack an area
        return False
    seg_size = np.fromiter(map(size.__getitem__, compress(iids, is_poly)), np.int64, len(psegs))
    poly_size = np.repeat(seg_size, per_seg)
    for k in np.flatnonzero(~(norms <= POLY_MARGIN * poly_size)):  # NaN fails the test as well
        p, lo, hi = polys[k], -POLY_MARGIN * int(poly_size[k]), (POLY_MARGIN + 1) * int(poly_size[k])
        if not np.isfinite(norms[k]) or min(p) < lo or max(p) > hi:
            return False
    return True


def _annotation_problem(path: Path, anns: list[dict], cat_ids: set, size_of: dict) -> None:
    ann_ids: set[int] = set()
    for k, a in enumerate(anns):
        aid = a.get("id")
        if not _is_id(aid):
            what = f"has id {json.dumps(aid)[:40]}" if "id" in a else "has no id"
            raise DatasetError(f"{path}: annotations[{k}] {what}; expected an integer")
        if aid in ann_ids:
            raise DatasetError(f"{path}: annotation id {aid} appears more than once")
        ann_ids.add(aid)
        for key in ("image_id", "category_id"):
            if key not in a:
                raise DatasetError(f"{path}: annotation {aid} has no {key}")
        cid, iid = a["category_id"], a["image_id"]
        if type(cid) is not int or cid not in cat_ids:
            raise DatasetError(f"{path}: annotation {aid} has unknown category id {cid!r}")
        hw = size_of.get(iid) if type(iid) is int else None
        if hw is None:
            raise DatasetError(f"{path}: annotation {aid} names image id {iid!r}, which is not among the images")
        crowd = a.get("iscrowd", 0)
        if type(crowd) not in (int, bool) or crowd not in (0, 1):
            raise DatasetError(f"{path}: annotation {aid} has iscrowd {json.dumps(crowd)[:40]}; expected 0 or 1")
        seg = a.get("segmentation")
        if type(seg) is list and seg:
            problem = _polygons_problem(seg, *hw)
        elif type(seg) is dict:
            problem = _rle_problem(seg, *hw)
        elif not seg:
            problem = "has an empty segmentation"
        else:
            problem = f"has a segmentation of type {type(seg).__name__}; expected polygons or RLE"
        if problem:
            raise DatasetError(f"{path}: annotation {aid} {problem}")


# ---- GT cache: COCO instance GT rasterised once ----------------------------------------------
INDEX_GROUP = "coco_index"  # the json's image index inside a GT cache (CocoIndex)


class CocoIndex:
    """What the readers need of an instances json besides the polygons: categories (id, name) in
    ascending id, and per image (json order) its id, file name, size and non-crowd label values."""

    def __init__(self, categories, image_ids, file_names, heights, widths, labels):
        self.categories = [(int(c), str(n)) for c, n in categories]
        self.image_ids, self.file_names = image_ids, list(file_names)
        self.heights, self.widths = heights, widths
        self.labels = labels  # list of sorted label-value lists

    def arrays(self) -> dict[str, np.ndarray]:
        counts = np.array([len(v) for v in self.labels], np.int64)
        return {
            "image_id": np.asarray(self.image_ids, np.int64),
            "file_name": np.array([n.encode() for n in self.file_names], dtype=bytes),
            "height": np.asarray(self.heights, np.int32),
            "width": np.asarray(self.widths, np.int32),
            "label_ptr": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            "label": np.array([v for vs in self.labels for v in vs], np.uint8),
        }

    def write(self, f) -> None:
        """Into an open h5py.File (the GT cache being built), replacing any previous index."""
        from dhr_cli.io.store import dataset_kwargs

        if INDEX_GROUP in f:
            del f[INDEX_GROUP]
        g = f.create_group(INDEX_GROUP)
        for name, a in self.arrays().items():
            g.create_dataset(name, data=a, **dataset_kwargs(a))
        g.attrs["categories"] = json.dumps(self.categories)
        f.flush()

    @classmethod
    def read(cls, path: Path) -> "CocoIndex":
        import h5py

        try:
            with h5py.File(path, "r") as f:
                g = f[INDEX_GROUP]
                a = {name: g[name][()] for name in ("image_id", "file_name", "height", "width", "label_ptr", "label")}
                cats = json.loads(g.attrs["categories"])
        except (OSError, KeyError, ValueError) as e:
            raise DatasetError(f"{path}: GT cache image index unreadable ({e.__class__.__name__}); "
                               "rebuild it with dhr info --build-cache") from None
        ptr, lab = a["label_ptr"], a["label"].tolist()
        labels = [lab[ptr[i]:ptr[i + 1]] for i in range(len(a["image_id"]))]
        return cls(cats, a["image_id"], [n.decode() for n in a["file_name"].tolist()], a["height"], a["width"], labels)


def default_gt_cache(json_path: Path) -> Path:
    """annotations/instances_<split>.json -> annotations/instances_<split>.gt.h5 (next to the json)."""
    return json_path.with_name(json_path.stem + ".gt.h5")


def json_fingerprint(path: Path, with_hash: bool = True) -> dict:
    import hashlib

    st = path.stat()
    fp = {"gt_json_size": int(st.st_size), "gt_json_mtime_ns": int(st.st_mtime_ns)}
    if with_hash:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        fp["gt_json_sha256"] = h.hexdigest()
    return fp


def gt_cache_problem(cache: Path, json_path: Path, classes: list[str] | None = None) -> str | None:
    """None when `cache` is a GT cache of this very annotation file, else why not (one phrase).

    Size and modification time decide; when only the time differs (a copy, a touch) the sha256
    recorded at build time decides. `classes` (the json's, when it was read) must match the
    cache's; a cache without the image index (built by dhr before it) counts as stale."""
    import h5py

    try:
        with h5py.File(cache, "r") as f:
            attrs = {k: f.attrs[k] for k in ("kind", "classes", "gt_json_size", "gt_json_mtime_ns", "gt_json_sha256")
                     if k in f.attrs}
            has_index = INDEX_GROUP in f
    except OSError:
        return "not readable as HDF5"
    if "gt_json_size" not in attrs or "gt_json_sha256" not in attrs:
        return "not a GT cache (no annotation fingerprint)"
    kind = attrs.get("kind")
    kind = kind.decode() if isinstance(kind, bytes) else str(kind)
    stored_classes = attrs.get("classes")
    stored_classes = stored_classes.decode() if isinstance(stored_classes, bytes) else str(stored_classes)
    if kind != "masks" or (classes is not None and json.loads(stored_classes) != list(classes)):
        return "its classes differ from the annotation file's"
    if not has_index:
        return "built by an older dhr, without the image index"
    now = json_fingerprint(json_path, with_hash=False)
    if int(attrs["gt_json_size"]) != now["gt_json_size"]:
        return f"{json_path.name} changed since it was built (size {int(attrs['gt_json_size'])} -> {now['gt_json_size']} bytes)"
    if int(attrs["gt_json_mtime_ns"]) != now["gt_json_mtime_ns"]:
        digest = attrs["gt_json_sha256"]
        digest = digest.decode() if isinstance(digest, bytes) else str(digest)
        if json_fingerprint(json_path)["gt_json_sha256"] != digest:
            return f"{json_path.name} changed since it was built (same size, different content)"
    return None


def build_gt_cache(ds: "COCODataset", cache: str | os.PathLike | None = None, *, quiet: bool = False) -> dict:
    """Rasterise every image's GT of a COCO split once into a masks store (the GT cache).

    Written atomically (CACHE.partial, renamed at the end); an interrupted build resumes; a cache
    that is up to date is left alone, a stale one replaced. Returns {path, written, state}."""
    from dhr_cli.io.progress import track
    from dhr_cli.io.outputs import partial_path
    from dhr_cli.io.provenance import make_provenance
    from dhr_cli.io.store import create_store, open_store

    if not isinstance(ds, COCODataset):
        raise DatasetError(f"{ds.root}: --build-cache is for COCO official annotation files (layout coco); "
                           f"this is the {ds.layout} layout, whose GT is read from PNGs as it is")
    path = Path(cache) if cache is not None else ds.cache_path
    state = "new"
    if path.is_file():
        problem = gt_cache_problem(path, ds._json, ds.classes)
        if problem is None:
            with open_store(path, expect="masks") as s:
                cached = set(s.ids)
            todo = [i for i in ds.ids if i not in cached]
            if not todo:
                return {"path": str(path), "written": 0, "state": "up to date", "items": len(ds)}
            state = "completed"
        else:
            logger.warning("%s: %s; rebuilding it", path, problem)
            state = "rebuilt"
    overwrite = state == "rebuilt"
    partial = partial_path(path)
    if partial.is_file() and not overwrite and gt_cache_problem(partial, ds._json, ds.classes) is not None:
        overwrite = True  # a partial build of another annotation file: start again
    fingerprint = json_fingerprint(ds._json)
    provenance = make_provenance("info --build-cache", {"split": ds.split}, inputs={"annotations": ds._json})
    provenance.pop("input_ids")  # the fingerprint in the root attributes decides what is stale
    written = 0
    with create_store(path, "masks", ds.classes, provenance=provenance, overwrite=overwrite,
                      resume=not overwrite, root_attrs={**fingerprint, "gt_cache_of": ds._json.name}) as w:
        w.write_extra(lambda f: INDEX_GROUP in f or ds._cindex.write(f))  # what eval reads instead of the json
        for item_id in track([i for i in ds.ids if i not in w.done], "rasterise GT", quiet=quiet):
            w.write(item_id, {"mask": ds.rasterise_gt(item_id)})
            written += 1
    ds._cache_pid, ds._cache_checked, ds._stale_warned = None, False, False  # check and reopen on the next gt()
    return {"path": str(path), "written": written, "state": state, "items": len(ds)}


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
        return _image_by_id(self._images, self.root / str(self.split), item_id)

    def gt_path(self, item_id: str) -> Path | None:
        names = [item_id, item_id[-12:]] if self._flat else [item_id]
        return _existing(*(self._gt_dir / f"{name}.png" for name in names))

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
        return _image_by_id(self._images, self.root / "images" / str(self.split), item_id)

    def gt_path(self, item_id: str) -> Path | None:
        return _existing(self._ann_dir / f"{item_id}.png")

    def gt(self, item_id: str) -> np.ndarray | None:
        path = self.gt_path(item_id)
        if path is None:
            return None
        raw = read_index_png(path)
        _check_same_size(path, raw, "annotation", self.image_size(item_id), self.image_path(item_id))
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
