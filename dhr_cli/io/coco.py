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
        for row, name in enumerate(index.file_names):
            if row in skip:
                continue
            (by_id.__setitem__(Path(name).stem, row) if name in present else absent.append(name))
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

    def _index_from_json(self) -> "CocoIndex":
        coco = self._coco
        cats = sorted(coco.cats)
        label_of = {cid: i + 1 for i, cid in enumerate(cats)}
        names = [coco.cats[cid].get("name") for cid in cats]
        twice = names_twice(names)
        if twice:
            raise DatasetError(f"{self._json}: category names {twice} appear more than once; each class needs its own name")
        for ann in coco.anns.values():
            if ann.get("category_id") not in label_of:
                raise DatasetError(f"{self._json}: annotation {ann.get('id')} has unknown category id {ann.get('category_id')!r}")
            img = coco.imgs.get(ann.get("image_id"))
            if img is None:
                raise DatasetError(f"{self._json}: annotation {ann.get('id')} names image id {ann.get('image_id')!r}, "
                                   "which is not among the images")
            problem = _segmentation_problem(ann.get("segmentation"), (img.get("height"), img.get("width")))
            if problem:
                raise DatasetError(f"{self._json}: annotation {ann['id']} {problem}")
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
        try:
            coco.dataset = json.loads(path.read_text(encoding="utf-8-sig"))
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


def _segmentation_problem(seg, hw) -> str | None:
    """What is wrong with an annotation's segmentation for an image of size hw, or None: polygons
    (lists of x, y coordinates; those of under 3 points are dropped when rasterising, and at least
    one must remain) or RLE ({"counts", "size"} with size = the image's [height, width])."""
    if isinstance(seg, list):
        if not all(isinstance(p, list) and all(isinstance(v, (int, float)) for v in p) for p in seg):
            return "has a polygon that is not a list of numbers"
        if any(len(p) % 2 for p in seg):
            return "has a polygon with an odd number of coordinates"
        if not any(len(p) >= 6 for p in seg):
            return "has an empty segmentation"
        return None
    if isinstance(seg, dict):
        if "counts" not in seg or "size" not in seg:
            return "has an RLE segmentation without 'counts' and 'size'"
        if list(seg["size"]) != list(hw):
            return f"has an RLE of size {list(seg['size'])}, but its image is {list(hw)} (height, width) in the json"
        return None
    return "has an empty segmentation" if not seg else f"has a segmentation of type {type(seg).__name__}; expected polygons or RLE"


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
    from dhr_cli.io.store import _partial, create_store, make_provenance, open_store

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
    partial = _partial(path)
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
