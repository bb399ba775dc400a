"""HDF5 artifact stores (docs/contracts.md, version 1): one file per artifact, one group per image.

    root attrs: dhr_format="dhr.store", dhr_version=1, kind, classes (JSON), ignore_index=255,
                provenance (JSON), and e.g. source for features stores
    items/<id>/cams      float16|32 (K, h, w) >= 0, attrs labels [K], image_size [H, W]
    items/<id>/features  float16|32 (D, h, w), attrs image_size [H, W]
    items/<id>/mask      uint8 (H, W), 255 = unsure / ignore

Writing is atomic: a writer fills OUT.partial and renames it to OUT when the run completes.
Each finished item is marked in the partial file so that `--resume` skips it and redoes an
item that was cut off half-written.
"""

from __future__ import annotations

import errno
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import h5py
import numpy as np

from dhr_cli.config import IGNORE_INDEX
from dhr_cli.errors import StoreError
from dhr_cli.io.outputs import OutputLock, partial_path, check_not_input, check_output, check_output_path
from dhr_cli.io.provenance import provenance_differences

FORMAT = "dhr.store"
VERSION = 1
KINDS = ("cams", "features", "seeds", "masks")
# The dataset every item of a kind must hold.
MAIN_DATASET = {"cams": "cams", "features": "features", "seeds": "mask", "masks": "mask"}
_TMP_PREFIX = ".writing-"  # an item group's name until all its datasets are written
_UNSURE = "dhr_unsure"  # item attribute set when an I/O error struck while it was written
_ROOM_MARGIN = 256 << 10  # bytes kept free beyond an item's raw size (HDF5 metadata, chunk index)


# ---- reading --------------------------------------------------------------------------------
class Item:
    """One image's data from a store; the typed properties validate on access."""

    def __init__(self, store_path: Path, item_id: str, arrays: dict[str, np.ndarray], attrs: dict[str, dict]):
        self.id = item_id
        self.arrays = arrays
        self.attrs = attrs
        self._where = f"{store_path}: item {item_id!r}"

    def _get(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            raise StoreError(f"{self._where} has no dataset {name!r}")
        return self.arrays[name]

    def _float_map(self, name: str) -> np.ndarray:
        x = self._get(name)
        if x.dtype not in (np.float16, np.float32, np.float64):
            raise StoreError(f"{self._where}: {name} has dtype {x.dtype}, expected float16 or float32 "
                             "(float64 is read too)")
        if x.ndim != 3 or 0 in x.shape:
            raise StoreError(f"{self._where}: {name} has shape {x.shape}, expected (channels, h, w)")
        x = x.astype(np.float32, copy=False)
        if not np.isfinite(x).all():
            raise StoreError(f"{self._where}: {name} holds NaN or infinite values")
        return x

    @property
    def cams(self) -> np.ndarray:
        """(K, h, w) float32, finite and >= 0."""
        x = self._float_map("cams")
        if (x < 0).any():
            raise StoreError(f"{self._where}: cams holds negative values (CAMs must be >= 0; apply relu before storing)")
        if len(self.labels) != x.shape[0]:
            raise StoreError(f"{self._where}: cams has {x.shape[0]} maps but {len(self.labels)} labels")
        return x

    @property
    def labels(self) -> np.ndarray:
        """(K,) int64 label value of each CAM (foreground classes)."""
        raw = self.attrs.get("cams", {}).get("labels")
        if raw is None:
            raise StoreError(f"{self._where}: cams has no 'labels' attribute")
        return cam_labels(raw, self._where)

    @property
    def features(self) -> np.ndarray:
        """(D, h, w) float32, finite."""
        return self._float_map("features")

    @property
    def mask(self) -> np.ndarray:
        """(H, W) uint8, 255 = unsure / ignore."""
        x = self._get("mask")
        if x.ndim != 2 or x.dtype != np.uint8 or 0 in x.shape:
            raise StoreError(f"{self._where}: mask has dtype {x.dtype} shape {x.shape}, expected uint8 (H, W), H and W >= 1")
        return x

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the original image."""
        for name in ("cams", "features", "mask"):
            size = self.attrs.get(name, {}).get("image_size")
            if size is not None:
                return image_size_attr(size, f"{self._where}: {name}")
        if "mask" in self.arrays:
            return tuple(self.arrays["mask"].shape)  # type: ignore[return-value]
        raise StoreError(f"{self._where} has no image_size attribute")


class Store:
    """A store opened for reading (validated root attributes). Use as a context manager."""

    def __init__(self, path: str | os.PathLike, expect: str | tuple[str, ...] | None = None):
        self.path = Path(path)
        if not self.path.exists():
            hint = " (an interrupted run left OUT.partial: rerun it with --resume)" if partial_path(self.path).exists() else ""
            raise StoreError(f"{self.path}: no such file{hint}")
        if self.path.is_dir():
            raise StoreError(f"{self.path}: is a directory, expected an HDF5 store file")
        try:
            self._file = _open_h5(self.path, "r")
        except OSError as e:
            raise StoreError(_open_failure(self.path, e)) from None
        try:
            with _damage_as_error(self.path):
                self._validate_root(expect)
        except BaseException:
            self._file.close()
            raise

    def _validate_root(self, expect: str | tuple[str, ...] | None) -> None:
        a = self._file.attrs
        fmt = _attr_str(_root_attr(a, "dhr_format", self.path))
        if fmt != FORMAT:
            raise StoreError(f"{self.path}: not a dhr store (attribute dhr_format is {fmt!r}, expected {FORMAT!r})")
        version = _attr_int(_root_attr(a, "dhr_version", self.path))
        if version is None:
            raise StoreError(f"{self.path}: attribute dhr_version is missing or not an integer "
                             f"({_shown(_root_attr(a, 'dhr_version', self.path))})")
        if version > VERSION:
            raise StoreError(f"{self.path}: store version {version} is newer than this dhr reads ({VERSION}); upgrade dhr")
        if version < 1:
            raise StoreError(f"{self.path}: store version {version} is not valid")
        self.kind = _attr_str(_root_attr(a, "kind", self.path))
        if self.kind not in KINDS:
            raise StoreError(f"{self.path}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if expect is not None:
            wanted = (expect,) if isinstance(expect, str) else tuple(expect)
            if self.kind not in wanted:
                raise StoreError(f"{self.path} holds {self.kind!r}, expected {' or '.join(map(repr, wanted))}")
        classes = _attr_classes(_root_attr(a, "classes", self.path))
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise StoreError(f"{self.path}: attribute classes must be a JSON list of class names")
        from dhr_cli.io.datasets import names_twice  # the one name-matching rule (datasets imports no store)

        twice = names_twice(classes)
        if twice:  # commands match classes by name: one name would stand for two label values
            raise StoreError(f"{self.path}: attribute classes names one class more than once "
                             f"({', '.join(map(repr, twice[:4]))})")
        self.classes: list[str] = classes
        raw_ignore = _root_attr(a, "ignore_index", self.path)
        ignore = IGNORE_INDEX if raw_ignore is None else _attr_int(raw_ignore)
        if ignore != IGNORE_INDEX:
            raise StoreError(f"{self.path}: ignore_index is {_shown(raw_ignore)}, this dhr supports only {IGNORE_INDEX}")
        self.attrs: dict[str, Any] = {}
        for k in a.keys():
            try:
                self.attrs[k] = _decode_attr(k, a[k])
            except (OSError, TypeError, ValueError):  # a type h5py cannot read (another tool's extra attribute)
                continue
        try:
            items = self._file.get("items")
        except (KeyError, OSError):  # a dangling or external link
            items = None
        if items is None or not isinstance(items, h5py.Group):
            raise StoreError(f"{self.path}: has no 'items' group")
        self._items = items
        self.ids: list[str] = sorted(items.keys())

    @property
    def provenance(self) -> dict:
        p = self.attrs.get("provenance")
        return p if isinstance(p, dict) else {}

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, str) and item_id in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)

    def read(self, item_id: str, names: Iterable[str] | None = None) -> Item:
        """One item; `names` limits which datasets are decompressed (the main one is always read):
        a CAMs store that also holds WSS features costs ~7 MB of unpacking per item otherwise."""
        with _damage_as_error(self.path, item_id):
            return self._read(item_id, names)

    def _read(self, item_id: str, names: Iterable[str] | None) -> Item:
        group = self._group(item_id)
        where = f"{self.path}: item {item_id!r}"
        wanted = None if names is None else {*names, MAIN_DATASET[self.kind]}
        arrays, attrs = {}, {}
        for name in group.keys():
            if wanted is not None and name not in wanted:
                continue
            try:
                ds = group[name]
            except (KeyError, OSError):  # a dangling link beside the item's data: not ours to read
                if name in MAIN_DATASET.values() or name == "features":
                    raise StoreError(f"{where}: {name} is a link to nothing ({_broken_link(group, name)})") from None
                continue
            if isinstance(ds, h5py.Dataset):
                arrays[name] = read_dataset(ds, f"{where}: {name}")
                attrs[name] = _dataset_attrs(ds)
        main = MAIN_DATASET[self.kind]
        if main not in arrays:
            raise StoreError(f"{where} has no {main!r} dataset (kind {self.kind!r})")
        if main == "mask":
            self._check_labels(item_id, arrays[main])
        for name in {main, "features"} & set(arrays) - {"mask"}:
            # The main dataset of a cams / features store carries its image's size (docs/contracts.md; the
            # writer's rule, validate_item), used or not; a cams store's optional features may omit it.
            if "image_size" in attrs[name]:
                image_size_attr(attrs[name]["image_size"], f"{where}: {name}")
            elif name == main:
                raise StoreError(f"{where}: {name} has no image_size attribute ([H, W] of the image)")
        return Item(self.path, item_id, arrays, attrs)

    def image_size(self, item_id: str) -> tuple[int, int]:
        """(H, W) of the image an item was computed for, from its datasets' attributes alone: no map is
        read (a check of every item costs what a header read does)."""
        with _damage_as_error(self.path, item_id):
            group = self._group(item_id)
            attrs = {name: {"image_size": group[name].attrs["image_size"]} for name in ("cams", "features")
                     if isinstance(group.get(name), h5py.Dataset) and "image_size" in group[name].attrs}
            return Item(self.path, item_id, {}, attrs).image_size  # that one attribute alone: 2x faster than all

    def _group(self, item_id: str) -> h5py.Group:
        """items/<id> as a group, else a one-line StoreError (a missing id, a broken link, a dataset)."""
        try:
            group = self._items.get(item_id)
        except (KeyError, OSError) as e:
            group, reason = None, " ".join(str(e).split()).strip("'\"")
        else:
            reason = ""
        if group is None:
            link = _broken_link(self._items, item_id)
            if link or reason:
                raise StoreError(f"{self.path}: item {item_id!r} cannot be opened ({link or reason})")
            raise StoreError(f"{self.path}: no item {item_id!r}")
        if not isinstance(group, h5py.Group):
            raise StoreError(f"{self.path}: items/{item_id} is a dataset, expected a group holding the item's "
                             f"{MAIN_DATASET[self.kind]!r} dataset")
        return group

    def _check_labels(self, item_id: str, mask: np.ndarray) -> None:
        check_mask_labels(f"{self.path}: item {item_id!r}", mask, len(self.classes))

    def read_mask(self, item_id: str) -> np.ndarray:
        """The (H, W) uint8 mask of a masks/seeds item, read straight from its dataset: what
        read(item_id, names=()).mask gives, without the Item bookkeeping (eval reads 82k of them)."""
        main = MAIN_DATASET[self.kind]
        if main != "mask":
            raise StoreError(f"{self.path}: a {self.kind} store holds no masks")
        with _damage_as_error(self.path, item_id):
            return self._read_mask(item_id)

    def _read_mask(self, item_id: str) -> np.ndarray:
        try:
            ds = self._items[f"{item_id}/mask"]
        except (KeyError, OSError, AttributeError):  # the reason, only when it fails (eval reads 82k masks)
            group = self._group(item_id)
            list(group.keys())  # a damaged link table raises here (RuntimeError: one line, _damage_as_error)
            link = _broken_link(group, "mask")
            if link:
                raise StoreError(f"{self.path}: item {item_id!r}: mask is a link to nothing ({link})") from None
            raise StoreError(f"{self.path}: item {item_id!r} has no 'mask' dataset (kind {self.kind!r})") from None
        x = read_dataset(ds, f"{self.path}: item {item_id!r}: mask") if isinstance(ds, h5py.Dataset) else None
        if x is None or x.ndim != 2 or x.dtype != np.uint8 or 0 in x.shape:
            what = f"dtype {x.dtype} shape {x.shape}" if x is not None else "a group"
            raise StoreError(f"{self.path}: item {item_id!r}: mask has {what}, expected uint8 (H, W), H and W >= 1")
        self._check_labels(item_id, x)
        return x

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_store(path: str | os.PathLike, expect: str | tuple[str, ...] | None = None) -> Store:
    """Open a store for reading; `expect` names the kind(s) the caller accepts."""
    return Store(path, expect)


# ---- writing --------------------------------------------------------------------------------
def dataset_kwargs(array: np.ndarray, name: str | None = None) -> dict:
    """Chunked gzip level 1 for every dataset but feature maps (bench/store_memory.py, VOC-like
    mask + fp16 USS features: gzip1 169 KB/item, write 4.4 ms, read 1.5 ms; gzip4 168 KB, 5.4 ms,
    2.0 ms; lzf 187 KB; byte shuffle gained nothing). Gzip is readable by every HDF5 build.

    `features` datasets (USS / WSS maps, the bulk of every store that holds them) are chunked
    without compression: their float16 mantissas are close to noise, and inflating them was the
    largest single cost of `dhr propagate` (a 90x60x60 fp16 map: gzip1 93 % of the raw size,
    read 5.7 ms; uncompressed 103 %, read 0.8 ms; a half-zero ReLU-like 384x60x60 map: gzip1 63 %,
    28 ms; uncompressed 4 ms). Stores written before read as they are.

    Every non-scalar dataset carries HDF5's fletcher32 checksum per chunk: h5py and any other HDF5
    reader verify it transparently, `dhr info --verify` and `--resume` read every item to check it."""
    if array.ndim == 0 or array.size == 0:
        return {}
    if array.size < 64 or (name == "features" and array.dtype.kind == "f"):
        return {"fletcher32": True, "chunks": True}
    # A mask is always read whole: one chunk decodes ~30 % faster than h5py's default tiling of
    # a 480x640 mask (bench/scale.py, eval's GT cache and prediction reads), and is smaller.
    chunks = array.shape if array.ndim == 2 and array.dtype == np.uint8 and array.size <= 16 << 20 else True
    return {"compression": "gzip", "compression_opts": 1, "chunks": chunks, "fletcher32": True}


def cam_labels(raw, where: str) -> np.ndarray:
    """A cams dataset's `labels` attribute as (K,) int64: distinct whole numbers in 0..254, else StoreError.
    A JSON list of numbers stored as a string (as the root's `classes` is) is read as that list."""
    text = _attr_str(raw) if _is_text(raw) and np.size(raw) == 1 else None
    if text is not None:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError:
            raw = None
        if not isinstance(raw, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw):
            raise StoreError(f"{where}: cams attribute labels must be a 1-D array of integers, got the string {_shown(text)}")
    values = np.atleast_1d(np.asarray(raw))
    problem = None
    if values.ndim != 1 or not (values.dtype.kind in "iu" or values.dtype.kind == "f"):
        problem = f"must be a 1-D array of integers, got {values.dtype} {values.shape}"
    elif values.dtype.kind == "f" and not (np.isfinite(values).all() and (values == np.round(values)).all()):
        problem = f"holds values that are not whole numbers ({values.tolist()[:5]})"
    elif len(values) and (values.min() < 0 or values.max() >= IGNORE_INDEX):
        problem = f"holds values outside 0..{IGNORE_INDEX - 1} ({values.tolist()[:5]})"
    elif len(np.unique(values)) != len(values):
        problem = f"names a class twice ({values.tolist()}): one map per class"
    if problem:
        raise StoreError(f"{where}: cams attribute labels {problem}")
    return values.astype(np.int64)


def image_size_attr(raw, where: str) -> tuple[int, int]:
    """An `image_size` attribute as (H, W): two positive whole numbers, else StoreError."""
    size = np.asarray(raw)
    if size.shape in ((1, 2), (2, 1)):  # a row or column vector (MATLAB writes [H W] as 1x2)
        size = size.reshape(2)
    if size.dtype.kind not in "iuf" or size.shape != (2,) or not np.all(size > 0) or not np.all(size == np.round(size)):
        shown = size.tolist() if size.dtype.kind in "iufU" else repr(raw)
        raise StoreError(f"{where} has image_size {shown}, expected [H, W] (two positive integers)")
    return int(size[0]), int(size[1])


def check_mask_labels(where: str, mask: np.ndarray, n_classes: int) -> None:
    """A mask's values are label indices of the store's classes or 255: a value beyond them would
    be exported, merged or trained on as a class that does not exist."""
    if mask.dtype != np.uint8 or mask.size == 0 or int(mask.max()) < n_classes:
        return
    bad = np.unique(mask[(mask >= n_classes) & (mask != IGNORE_INDEX)])
    if len(bad):
        raise StoreError(f"{where}: mask holds label values {bad.tolist()[:5]} beyond the store's {n_classes} "
                         f"classes (0..{n_classes - 1}, 255 = ignore)")


def validate_item(kind: str, path: Path, item_id: str, arrays: dict, attrs: dict, n_classes: int | None = None) -> None:
    main = MAIN_DATASET[kind]
    where = f"{path}: item {item_id!r}"
    if main not in arrays:
        raise StoreError(f"{where}: a {kind} store item needs a {main!r} dataset")
    x = np.asarray(arrays[main])
    if kind in ("seeds", "masks"):
        if x.dtype != np.uint8 or x.ndim != 2 or 0 in x.shape:
            raise StoreError(f"{where}: mask must be uint8 (H, W), H and W >= 1, got {x.dtype} {x.shape}")
        if n_classes is not None:
            check_mask_labels(where, x, n_classes)
    else:
        if x.ndim != 3 or x.dtype not in (np.float16, np.float32) or 0 in x.shape:
            raise StoreError(f"{where}: {main} must be float16/float32 (C, h, w), none of them 0, got {x.dtype} {x.shape}")
        if not np.isfinite(x).all():
            raise StoreError(f"{where}: {main} holds NaN or infinite values")
        if "image_size" not in attrs.get(main, {}):
            raise StoreError(f"{where}: {main} needs an image_size attribute [H, W]")
        image_size_attr(attrs[main]["image_size"], f"{where}: {main}")
    if kind == "cams":
        if (x < 0).any():
            raise StoreError(f"{where}: cams must be >= 0")
        labels = cam_labels(attrs.get("cams", {}).get("labels", []), where)
        if labels.shape[0] != x.shape[0]:
            raise StoreError(f"{where}: {x.shape[0]} CAMs but {labels.shape[0]} labels")


class StoreWriter:
    """Writes a store into OUT.partial; renames it to OUT when the `with` block ends cleanly."""

    def __init__(self, path, kind, classes, *, provenance, overwrite=False, resume=False, root_attrs=None,
                 resumable=True):
        if kind not in KINDS:
            raise StoreError(f"{path}: unknown store kind {kind!r}")
        self.path = Path(path)
        self.kind = kind
        self.classes = list(classes)
        from dhr_cli.io.datasets import names_twice

        twice = names_twice(self.classes)
        if twice:  # never write a store that open_store refuses
            raise StoreError(f"{path}: classes {twice} name one class more than once")
        self.partial = partial_path(self.path)
        # What a failed write advises: a command with --resume keeps its items for it; one without
        # (merge) removes its partial, and its inputs are what a rerun starts from.
        self.rerun = ("the items written so far are kept, free space and rerun with --resume" if resumable else
                      "nothing of it was kept (its inputs are untouched), free space and rerun")
        if overwrite and resume:
            raise StoreError(f"{self.path}: --overwrite and --resume exclude each other")
        check_output_path(self.path)
        # The lock comes before any file is touched and is released on every way out of here.
        self._lock = OutputLock(self.path)
        try:
            self._open(kind, provenance, overwrite, resume, root_attrs)
        except BaseException:
            self._lock.release()
            raise

    def _open(self, kind, provenance, overwrite, resume, root_attrs) -> None:
        check_not_input(self.path, (provenance or {}).get("inputs") or {})  # before --resume moves OUT aside
        if resume:
            if self.path.exists() and not self.partial.exists():
                st = self.path.stat()
                os.replace(self.path, self.partial)  # a complete store: resume fills what is missing
                self._complete_times = (st.st_atime_ns, st.st_mtime_ns)
        else:
            check_output(self.path, overwrite=overwrite)
        if resume and self.partial.exists():
            try:
                self._file = self._open_partial_for_resume(provenance)
            except StoreError:
                if self._complete_times is not None:  # give the user's complete store back untouched
                    self._publish()
                raise
            if self._changed:  # damaged items were dropped: the resume is recorded now
                self._note_change()
        else:
            if self.partial.exists() or self.partial.is_symlink():
                check_output_path(self.partial)
                self.partial.unlink()  # a new file, never a truncation of one a reader still has open
            try:
                self._file = _open_h5(self.partial, "w")
                self._fresh = True
                a = self._file.attrs
                a["dhr_format"] = FORMAT
                a["dhr_version"] = VERSION
                a["kind"] = kind
                a["classes"] = json.dumps(self.classes)
                a["ignore_index"] = IGNORE_INDEX
                a["provenance"] = json.dumps(provenance, default=str)
                for k, v in (root_attrs or {}).items():
                    a[k] = v
                self._file.create_group("items")
                self._file.flush()
            except (OSError, RuntimeError) as e:
                self._failed_create(e)
        self._items = self._file["items"]
        self.done: set[str] = {k for k in self._items.keys() if not k.startswith(_TMP_PREFIX)}

    def _failed_create(self, error: Exception) -> None:
        """Creating the empty partial failed (disk full, ...): it holds no item, so it is removed (a
        --resume of an attribute-less file could only be refused) and the error is one line."""
        self._close_quietly()
        try:
            self.partial.unlink()
        except OSError:
            pass
        raise self._unsound(error, "could not be created",
                            "before the first item; nothing was written, free space and rerun") from None

    def _close_quietly(self) -> None:
        _close_h5_quietly(self._file)

    def _unsound(self, error: Exception, failed: str, tail: str) -> StoreError:
        """The one line for an I/O error inside HDF5: 'disk full', else `failed` and the reason; then `tail`."""
        what = "disk full" if _disk_full(error) else f"{failed} ({' '.join(str(error).split())[:200]})"
        unsound = StoreError(f"{self.partial}: {what} {tail}")
        unsound.hdf5_unsound = True  # the command line exits at once: libhdf5 may crash while tearing down
        return unsound

    def _open_partial_for_resume(self, provenance: dict) -> h5py.File:
        try:
            f = _open_h5(self.partial, "a")
        except OSError as e:
            if "unable to lock file" in str(e):  # HDF5's flock: some process still has the file open
                raise StoreError(f"{self.partial}: still open in another process (HDF5 file lock held); wait for "
                                 "that process to end, then rerun with --resume") from None
            raise StoreError(f"{self.partial}: damaged by the interruption (not readable as HDF5); "
                             "delete it or rerun with --overwrite") from None
        try:
            kind = _attr_str(f.attrs.get("kind"))
            classes = json.loads(_attr_str(f.attrs.get("classes")) or "[]")
            if kind != self.kind or classes != self.classes:
                raise StoreError(f"{self.partial}: holds {kind!r} with classes {classes}, which does not match this run; use --overwrite")
            prov = _decode_attr("provenance", f.attrs.get("provenance", "{}"))
            differ = provenance_differences(prov if isinstance(prov, dict) else {}, provenance)
            if differ:
                raise StoreError(f"{self.partial}: --resume with options or inputs that differ from the partial run: "
                                 f"{'; '.join(differ)}; rerun with the same options or use --overwrite")
            # Drop an item cut off half-written, one an I/O error left unsure, and one whose checksum fails.
            items = f["items"]
            for key in list(items.keys()):
                if key.startswith(_TMP_PREFIX) or _UNSURE in items[key].attrs or _item_problem(items[key]) is not None:
                    del items[key]
                    self._changed = True
        except (KeyError, RuntimeError) as e:  # the structure itself (an HDF5 write that failed midway)
            _close_h5_quietly(f)
            raise StoreError(f"{self.partial}: damaged by the interruption ({' '.join(str(e).split())[:120]}); "
                             "delete it or rerun with --overwrite") from None
        except BaseException:
            _close_h5_quietly(f)
            raise
        if isinstance(prov, dict):
            prov.setdefault("resumed_at", []).append(time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            self._resumed_provenance = json.dumps(prov, default=str)  # recorded with the first change
        return f

    def _publish(self) -> None:
        """The partial file takes the store's name. A complete store that a --resume moved aside and
        left unchanged keeps its times (HDF5's append mode touches the file even when nothing is written)."""
        os.replace(self.partial, self.path)
        if self._complete_times is not None and not self._changed:
            os.utime(self.path, ns=self._complete_times)

    def _note_change(self) -> None:
        if self._resumed_provenance is not None:
            self._file.attrs["provenance"], self._resumed_provenance = self._resumed_provenance, None
        self._changed = True

    def __contains__(self, item_id: object) -> bool:
        return item_id in self.done

    def write_extra(self, fill: Callable[[h5py.File], object]) -> None:
        """Let `fill(file)` write root-level data beside 'items' (a GT cache's image index); readers
        of the store contract ignore it."""
        self._note_change()
        fill(self._file)

    def write(self, item_id: str, arrays: dict[str, np.ndarray], attrs: dict[str, dict] | None = None) -> None:
        attrs = attrs or {}
        if "/" in item_id or not item_id or item_id in (".", "..") or item_id.startswith(_TMP_PREFIX):
            raise StoreError(f"{self.path}: item id {item_id!r} cannot be stored (an id may not contain '/', be '.' "
                             f"or '..', or begin with {_TMP_PREFIX!r}); rename that image")
        if item_id in self.done:
            raise StoreError(f"{self.path}: item {item_id!r} written twice (duplicate id?)")
        validate_item(self.kind, self.path, item_id, arrays, attrs, len(self.classes))
        # Written under a temporary name and renamed when complete: an item cut off half-written
        # never appears under its own name, and --resume deletes the leftover.
        tmp = _TMP_PREFIX + item_id
        # Checked before HDF5 meets ENOSPC: after a failed write libhdf5 can crash the process when
        # its handles are freed, so running out of room is detected while the file is still sound.
        need = sum(np.asarray(a).nbytes for a in arrays.values()) + _ROOM_MARGIN
        room = _room(self.partial)
        if room is not None and room[0] < need:
            self.broken = True
            rerun = self.rerun if room[1] == "disk full" else self.rerun.replace("free space", "raise the limit")
            raise StoreError(f"{self.partial}: {room[1]} ({room[0] // 1024} KiB left, item {item_id!r} needs up to "
                             f"{need // 1024} KiB); {rerun}")
        try:
            self._note_change()
            if tmp in self._items:
                del self._items[tmp]
            group = self._items.create_group(tmp)
            for name, array in arrays.items():
                array = np.ascontiguousarray(array)
                ds = group.create_dataset(name, data=array, **dataset_kwargs(array, name))
                for k, v in attrs.get(name, {}).items():
                    ds.attrs[k] = v
            self._items.move(tmp, item_id)
            self._file.flush()
        except (OSError, RuntimeError, ValueError) as e:
            self._failed(item_id, e)
        self.done.add(item_id)

    def _failed(self, item_id: str, error: Exception) -> None:
        """An I/O error mid-item (disk full, ...): what HDF5 holds in memory is unsure, so the file is
        closed without the rename and the last item and every item written after the last good
        flush are redone by --resume (it drops items that fail their checksum or carry the mark)."""
        self.broken = True
        try:
            for key in (_TMP_PREFIX + item_id, item_id):
                if key in self._items:
                    self._items[key].attrs[_UNSURE] = 1
        except Exception:  # noqa: BLE001 - best effort; the checksums catch the rest
            pass
        self._close_quietly()
        tail = self.rerun if _readable_items(self.partial) else (
            "HDF5 left the partial file unreadable, so its items are lost: free space and rerun with --overwrite")
        raise self._unsound(error, "write failed", f"while writing item {item_id!r}; {tail}") from None

    broken = False
    _fresh = False  # this run created the partial (not a resume)
    # A --resume over a complete store that finds nothing to do gives it back as it was, times
    # included: downstream runs that recorded its size and mtime as an input can still resume.
    _complete_times: tuple[int, int] | None = None
    _resumed_provenance: str | None = None
    _changed = False

    def close(self, complete: bool, failed: bool = False) -> None:
        try:
            if self._file.id.valid:
                try:
                    self._file.close()
                except (OSError, RuntimeError) as e:
                    self.broken = True
                    if complete:
                        raise StoreError(f"{self.partial}: could not be closed ({e}); {self.rerun}") from None
                if complete and not self.broken:
                    self._publish()
            if failed and self._fresh and not self.done and not self.broken and self.partial.exists():
                self.partial.unlink()  # an error before the first item: nothing to resume, leave nothing behind
        finally:
            self._lock.release()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(complete=exc_type is None, failed=exc_type is not None and issubclass(exc_type, Exception))


def create_store(path, kind, classes, *, provenance, overwrite=False, resume=False, root_attrs=None,
                 resumable=True) -> StoreWriter:
    """Start writing a store (see StoreWriter); `with create_store(...) as w: w.write(id, {...}, {...})`.
    resumable=False: the command has no --resume, and its errors do not advise one."""
    return StoreWriter(path, kind, classes, provenance=provenance, overwrite=overwrite, resume=resume,
                       root_attrs=root_attrs, resumable=resumable)


# ---- integrity ------------------------------------------------------------------------------


def _item_problem(group, read: bool = True) -> str | None:
    """None when every dataset of an item group reads back (checksums verified), else what fails;
    read=False: only that every entry opens (no link dangles)."""
    name = "its list of datasets"  # what failed when the group itself cannot be listed
    try:
        for name, ds in group.items():
            if read and isinstance(ds, h5py.Dataset):
                ds[()]
    except (KeyError, OSError, RuntimeError, ValueError) as e:
        return f"{name}: {' '.join(str(e).split())[:160]}"
    return None


def verify_store(path, unchecked: list[str] | None = None) -> list[str]:
    """Read every dataset of every item (HDF5 verifies the fletcher32 checksums) and check each item as
    the readers do (a mask's label values, a cams item's labels, ...); one line per bad item. The ids of
    items with a dataset that carries no checksum (another program's store) are added to `unchecked`."""
    path = Path(path)
    bad = []
    with open_store(path) as store:
        items = store._items
        for key in store.ids:
            if key.startswith(_TMP_PREFIX):
                bad.append(f"{path}: item {key[len(_TMP_PREFIX):]!r} was cut off half-written")
                continue
            try:
                group = items[key]
                unsure = _UNSURE in group.attrs
            except (KeyError, OSError, RuntimeError) as e:
                bad.append(f"{path}: item {key!r} is damaged (cannot be opened: {' '.join(str(e).split())[:160]})")
                continue
            if unsure:
                bad.append(f"{path}: item {key!r} was being written when an I/O error struck")
                continue
            try:  # every dataset read back (checksums verified), and the rules every reader applies
                store.read(key)
                problem, invalid = _item_problem(group, read=False), None  # entries the readers skip
            except StoreError as e:
                problem, invalid = _item_problem(group), str(e)  # a dataset that does not read back, or a bad item
            if problem is not None or invalid is not None:
                bad.append(f"{path}: item {key!r} is damaged ({problem})" if problem is not None else invalid)
                continue
            if unchecked is not None and any(isinstance(ds, h5py.Dataset) and ds.ndim and not ds.fletcher32
                                             for ds in group.values()):
                unchecked.append(key)
    return bad


# ---- helpers --------------------------------------------------------------------------------
def _open_h5(path: Path, mode: str) -> h5py.File:
    """h5py.File with a bounded metadata cache: HDF5's adaptive default grows with the number of
    items touched (measured, bench/store_memory.py: 77 -> 253 MB peak RSS for 1k vs 10k items;
    with a 1 MiB cap the growth is a few MB and reading is no slower)."""
    f = h5py.File(path, mode)
    config = f.id.get_mdc_config()
    config.set_initial_size = True
    config.initial_size = 1 << 18
    config.min_size = 1 << 18
    config.max_size = 1 << 20
    f.id.set_mdc_config(config)
    return f


def _room(path: Path) -> tuple[int, str] | None:
    """(bytes `path` may still grow by, what limits it): the free disk space, or the process's file
    size limit (`ulimit -f`, RLIMIT_FSIZE) less the file's size where that is smaller; None if unknown."""
    try:
        st = os.statvfs(path)
        room = (st.f_bavail * st.f_frsize, "disk full")
    except OSError:
        return None
    try:
        import resource  # POSIX only

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, OSError, ValueError):
        limit = -1
    if limit >= 0 and limit != getattr(resource, "RLIM_INFINITY", -1):
        try:
            left = max(0, limit - os.stat(path).st_size)
        except OSError:
            left = limit
        if left < room[0]:
            room = (left, "file size limit reached (ulimit -f)")
    return room


def _disk_full(error: Exception) -> bool:
    """ENOSPC, as an OSError or as the text of an HDF5 error (h5py raises RuntimeError for some)."""
    return isinstance(error, OSError) and error.errno == errno.ENOSPC or "No space left" in str(error)


def _attr_str(value) -> str | None:
    """A string attribute as str: variable- or fixed-length, UTF-8 or ASCII, a scalar or an array of
    one string (as MATLAB and some C writers store it)."""
    if value is None:
        return None
    if isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "OSU":
        value = value.reshape(())[()]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace").rstrip("\0")
    return str(value)


def _is_text(value) -> bool:
    """A string attribute as h5py returns it: str, bytes, or an array of strings."""
    return isinstance(value, (bytes, str, np.bytes_, np.str_)) or (isinstance(value, np.ndarray) and value.dtype.kind in "OSU")


def _attr_int(value) -> int | None:
    """A whole-number attribute (dhr_version, ignore_index) as int: any integer or whole float type,
    a scalar or an array of one value, or a string of digits; None when it is none of these."""
    if _is_text(value):
        text = _attr_str(value)
        try:
            return int(text.strip()) if text is not None else None
        except ValueError:
            return None
    try:
        x = np.asarray(value)
    except (TypeError, ValueError):
        return None
    if x.size != 1 or x.dtype.kind not in "iuf":
        return None
    v = x.reshape(())[()]
    if x.dtype.kind == "f" and not (np.isfinite(v) and v == round(float(v))):
        return None
    return int(v)


def _attr_classes(value) -> list | None:
    """The classes attribute: a JSON list (docs/contracts.md), or an HDF5 array of strings."""
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.size > 1 and value.dtype.kind in "OSU":
        return [_attr_str(v) for v in value]
    try:
        classes = json.loads(_attr_str(value) or "null")
    except (json.JSONDecodeError, TypeError):
        return None
    return classes


def _shown(value) -> str:
    """An attribute's value for a message: short, one line."""
    if isinstance(value, (bytes, np.bytes_)):
        value = value.decode("utf-8", "replace")
    elif isinstance(value, (np.ndarray, np.generic)):
        value = value.tolist()
    return " ".join(repr(value).split())[:80]


def _root_attr(attrs, name: str, path: Path):
    """A root attribute (None when absent); one that h5py cannot read is a StoreError naming it."""
    try:
        return attrs[name] if name in attrs else None
    except (OSError, TypeError, ValueError) as e:
        raise StoreError(f"{path}: attribute {name} cannot be read ({' '.join(str(e).split())[:120]})") from None


def _readable_items(path: Path) -> bool:
    """Whether a partial file that a failed write left behind can still be opened and its items listed
    (what --resume needs); a write cut off inside HDF5's own metadata can leave it unreadable."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            list(f["items"].keys())
        return True
    except Exception:  # noqa: BLE001 - any failure means --resume could not use it
        return False


def _close_h5_quietly(f: h5py.File) -> None:
    try:
        f.close()
    except Exception:  # noqa: BLE001 - best effort: the file is being abandoned
        pass


@contextmanager
def _damage_as_error(path: Path, item_id: str | None = None):
    """h5py raises RuntimeError (not OSError) where the file's own structure is damaged (a corrupt
    heap, a link table cut short): one line naming the file and the item, never a traceback."""
    try:
        yield
    except RuntimeError as e:
        where = f"{path}: item {item_id!r}" if item_id is not None else f"{path}"
        raise StoreError(f"{where}: the HDF5 file's structure is damaged ({' '.join(str(e).split())[:160]}); "
                         "recompute it, or copy it again from its source") from None


def _broken_link(group: h5py.Group, name: str) -> str:
    """'' when group/name is no link, else what it points to: a soft or external link whose target is
    missing reads as absent in h5py, and a store must not treat it as "no such item"."""
    try:
        link = group.get(name, getlink=True)
    except (KeyError, OSError, RuntimeError):
        return ""
    if isinstance(link, h5py.SoftLink):
        return f"a dangling soft link to {link.path}"
    if isinstance(link, h5py.ExternalLink):
        return f"an external link to {link.filename}:{link.path}, which cannot be opened"
    return ""


def _dataset_attrs(ds: h5py.Dataset) -> dict:
    """A dataset's attributes; one of a type h5py cannot read is left out (the contract's ones are
    checked where they are used)."""
    out = {}
    for k in ds.attrs.keys():
        try:
            out[k] = ds.attrs[k]
        except (OSError, TypeError, ValueError):
            continue
    return out


def read_dataset(ds: h5py.Dataset, where: str) -> np.ndarray:
    """A dataset's whole array, in native byte order (big-endian floats of other tools included), or a
    one-line StoreError: a filter this HDF5 lacks (a plugin such as Blosc, LZ4, Zstd or bitshuffle),
    a failed checksum, a truncated file, an empty (null) dataspace."""
    try:
        x = ds[()]
    except (OSError, RuntimeError, ValueError, TypeError) as e:
        missing = _missing_filter(ds)
        if missing:
            raise StoreError(f"{where} is compressed with HDF5 filter {missing}, which this HDF5 does not have (a "
                             "plugin filter); rewrite the store with gzip or lzf, or install the plugin (pip install "
                             "hdf5plugin and set HDF5_PLUGIN_PATH)") from None
        reason = " ".join(str(e).split())[:160]
        raise StoreError(f"{where} cannot be read ({reason}): the file is damaged or truncated") from None
    if isinstance(x, h5py.Empty):
        raise StoreError(f"{where} holds no data (an empty HDF5 dataspace)")
    if isinstance(x, np.ndarray) and not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))
    return x


def _missing_filter(ds: h5py.Dataset) -> str:
    """'ID (name)' of the first filter of a dataset that this HDF5 lacks, else ''."""
    try:
        plist = ds.id.get_create_plist()
        for i in range(plist.get_nfilters()):
            code, _flags, _values, name = plist.get_filter(i)
            if not h5py.h5z.filter_avail(code):
                label = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
                return f"{code} ({label or 'unknown'})"
    except (OSError, RuntimeError, ValueError):
        pass
    return ""


def _open_failure(path: Path, error: OSError) -> str:
    """Why h5py could not open a store, as one line: another process writing it, a writer that did
    not close it, an empty or non-HDF5 file, or a damaged (truncated) one."""
    text = " ".join(str(error).split())
    if "unable to lock file" in text:
        return (f"{path}: is open for writing in another process (HDF5 file lock held); wait for that process "
                "to finish, then rerun")
    if "already open for write" in text or "consistency flag" in text:
        return (f"{path}: is marked as still open for writing (HDF5 1.10+ file-consistency flag): another program "
                f"is writing it, or did not close it; if none is, clear the mark with `h5clear -s {path}`")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        return f"{path}: cannot be read ({e.strerror or e})"
    if size == 0:
        return f"{path}: is empty (0 bytes), not an HDF5 store"
    if not h5py.is_hdf5(str(path)) and head != b"\x89HDF\r\n\x1a\n":
        return f"{path}: not an HDF5 file"
    return f"{path}: damaged or truncated HDF5 file ({text[:160]})"


def _decode_attr(name: str, value):
    if name in ("classes", "provenance"):
        try:
            return json.loads(_attr_str(value) or "null")
        except json.JSONDecodeError:
            return _attr_str(value)
    if isinstance(value, (bytes, np.bytes_)):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value
