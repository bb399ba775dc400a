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

import json
import os
import sys
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import h5py
import numpy as np

from dhr_cli import __version__
from dhr_cli.config import IGNORE_INDEX
from dhr_cli.errors import StoreError

FORMAT = "dhr.store"
VERSION = 1
KINDS = ("cams", "features", "seeds", "masks")
# The dataset every item of a kind must hold.
MAIN_DATASET = {"cams": "cams", "features": "features", "seeds": "mask", "masks": "mask"}
_TMP_PREFIX = ".writing-"  # an item group's name until all its datasets are written


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
            raise StoreError(f"{self._where}: {name} has dtype {x.dtype}, expected float16 or float32")
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
        return np.atleast_1d(np.asarray(raw)).astype(np.int64)

    @property
    def features(self) -> np.ndarray:
        """(D, h, w) float32, finite."""
        return self._float_map("features")

    @property
    def mask(self) -> np.ndarray:
        """(H, W) uint8, 255 = unsure / ignore."""
        x = self._get("mask")
        if x.ndim != 2 or x.dtype != np.uint8:
            raise StoreError(f"{self._where}: mask has dtype {x.dtype} shape {x.shape}, expected uint8 (H, W)")
        return x

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the original image."""
        for name in ("cams", "features", "mask"):
            size = self.attrs.get(name, {}).get("image_size")
            if size is not None:
                size = np.asarray(size).ravel()
                if size.shape != (2,) or (size <= 0).any():
                    raise StoreError(f"{self._where}: {name} has image_size {size.tolist()}, expected [H, W]")
                return int(size[0]), int(size[1])
        if "mask" in self.arrays:
            return tuple(self.arrays["mask"].shape)  # type: ignore[return-value]
        raise StoreError(f"{self._where} has no image_size attribute")


class Store:
    """A store opened for reading (validated root attributes). Use as a context manager."""

    def __init__(self, path: str | os.PathLike, expect: str | tuple[str, ...] | None = None):
        self.path = Path(path)
        if not self.path.exists():
            hint = " (an interrupted run left OUT.partial: rerun it with --resume)" if _partial(self.path).exists() else ""
            raise StoreError(f"{self.path}: no such file{hint}")
        if self.path.is_dir():
            raise StoreError(f"{self.path}: is a directory, expected an HDF5 store file")
        try:
            self._file = _open_h5(self.path, "r")
        except OSError:
            raise StoreError(f"{self.path}: not an HDF5 file (or damaged)") from None
        try:
            self._validate_root(expect)
        except BaseException:
            self._file.close()
            raise

    def _validate_root(self, expect: str | tuple[str, ...] | None) -> None:
        a = self._file.attrs
        fmt = _attr_str(a.get("dhr_format"))
        if fmt != FORMAT:
            raise StoreError(f"{self.path}: not a dhr store (attribute dhr_format is {fmt!r}, expected {FORMAT!r})")
        try:
            version = int(a.get("dhr_version"))
        except (TypeError, ValueError):
            raise StoreError(f"{self.path}: attribute dhr_version is missing or not an integer") from None
        if version > VERSION:
            raise StoreError(f"{self.path}: store version {version} is newer than this dhr reads ({VERSION}); upgrade dhr")
        if version < 1:
            raise StoreError(f"{self.path}: store version {version} is not valid")
        self.kind = _attr_str(a.get("kind"))
        if self.kind not in KINDS:
            raise StoreError(f"{self.path}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if expect is not None:
            wanted = (expect,) if isinstance(expect, str) else tuple(expect)
            if self.kind not in wanted:
                raise StoreError(f"{self.path} holds {self.kind!r}, expected {' or '.join(map(repr, wanted))}")
        try:
            classes = json.loads(_attr_str(a.get("classes")) or "null")
        except json.JSONDecodeError:
            classes = None
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise StoreError(f"{self.path}: attribute classes must be a JSON list of class names")
        self.classes: list[str] = classes
        ignore = a.get("ignore_index", IGNORE_INDEX)
        if int(ignore) != IGNORE_INDEX:
            raise StoreError(f"{self.path}: ignore_index is {int(ignore)}, this dhr supports only {IGNORE_INDEX}")
        self.attrs: dict[str, Any] = {k: _decode_attr(k, v) for k, v in a.items()}
        items = self._file.get("items")
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
        if item_id not in self._items:
            raise StoreError(f"{self.path}: no item {item_id!r}")
        group = self._items[item_id]
        wanted = None if names is None else {*names, MAIN_DATASET[self.kind]}
        arrays, attrs = {}, {}
        for name, ds in group.items():
            if wanted is not None and name not in wanted:
                continue
            if isinstance(ds, h5py.Dataset):
                arrays[name] = ds[()]
                attrs[name] = {k: v for k, v in ds.attrs.items()}
        main = MAIN_DATASET[self.kind]
        if main not in arrays:
            raise StoreError(f"{self.path}: item {item_id!r} has no {main!r} dataset (kind {self.kind!r})")
        return Item(self.path, item_id, arrays, attrs)

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
def dataset_kwargs(array: np.ndarray) -> dict:
    """Chunked gzip level 1 for every dataset (bench/store_memory.py, VOC-like mask + fp16 USS
    features: gzip1 169 KB/item, write 4.4 ms, read 1.5 ms; gzip4 168 KB, 5.4 ms, 2.0 ms;
    lzf 187 KB; byte shuffle gained nothing). Gzip is readable by every HDF5 build."""
    if array.ndim == 0 or array.size < 64:
        return {}
    return {"compression": "gzip", "compression_opts": 1, "chunks": True}


def _validate_item(kind: str, path: Path, item_id: str, arrays: dict, attrs: dict) -> None:
    main = MAIN_DATASET[kind]
    where = f"{path}: item {item_id!r}"
    if main not in arrays:
        raise StoreError(f"{where}: a {kind} store item needs a {main!r} dataset")
    x = np.asarray(arrays[main])
    if kind in ("seeds", "masks"):
        if x.dtype != np.uint8 or x.ndim != 2:
            raise StoreError(f"{where}: mask must be uint8 (H, W), got {x.dtype} {x.shape}")
    else:
        if x.ndim != 3 or x.dtype not in (np.float16, np.float32):
            raise StoreError(f"{where}: {main} must be float16/float32 (C, h, w), got {x.dtype} {x.shape}")
        if not np.isfinite(x).all():
            raise StoreError(f"{where}: {main} holds NaN or infinite values")
        if "image_size" not in attrs.get(main, {}):
            raise StoreError(f"{where}: {main} needs an image_size attribute [H, W]")
    if kind == "cams":
        if (x < 0).any():
            raise StoreError(f"{where}: cams must be >= 0")
        labels = np.atleast_1d(np.asarray(attrs.get("cams", {}).get("labels", [])))
        if labels.shape[0] != x.shape[0]:
            raise StoreError(f"{where}: {x.shape[0]} CAMs but {labels.shape[0]} labels")


class StoreWriter:
    """Writes a store into OUT.partial; renames it to OUT when the `with` block ends cleanly."""

    def __init__(self, path, kind, classes, *, provenance, overwrite=False, resume=False, root_attrs=None):
        if kind not in KINDS:
            raise StoreError(f"{path}: unknown store kind {kind!r}")
        self.path = Path(path)
        self.kind = kind
        self.classes = list(classes)
        self.partial = _partial(self.path)
        if self.path.is_dir():
            raise StoreError(f"{self.path}: is a directory, expected an output file name")
        if not self.path.parent.exists():
            raise StoreError(f"{self.path}: folder {self.path.parent} does not exist")
        if overwrite and resume:
            raise StoreError(f"{self.path}: --overwrite and --resume exclude each other")
        moved = False
        if resume:
            if self.path.exists() and not self.partial.exists():
                os.replace(self.path, self.partial)  # a complete store: resume fills what is missing
                moved = True
        elif self.path.exists() and not overwrite:
            raise StoreError(f"{self.path}: already exists; pass --overwrite to replace it or --resume to complete it")
        elif self.partial.exists() and not overwrite:
            raise StoreError(f"{self.partial}: an interrupted run is there; pass --resume to continue it or --overwrite to start again")
        if resume and self.partial.exists():
            try:
                self._file = self._open_partial_for_resume()
            except StoreError:
                if moved:  # give the user's complete store back untouched
                    os.replace(self.partial, self.path)
                raise
        else:
            self._file = _open_h5(self.partial, "w")
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
        self._items = self._file["items"]
        self.done: set[str] = {k for k in self._items.keys() if not k.startswith(_TMP_PREFIX)}

    def _open_partial_for_resume(self) -> h5py.File:
        try:
            f = _open_h5(self.partial, "a")
        except OSError:
            raise StoreError(f"{self.partial}: damaged by the interruption; delete it or rerun with --overwrite") from None
        kind = _attr_str(f.attrs.get("kind"))
        classes = json.loads(_attr_str(f.attrs.get("classes")) or "[]")
        if kind != self.kind or classes != self.classes:
            f.close()
            raise StoreError(f"{self.partial}: holds {kind!r} with classes {classes}, which does not match this run; use --overwrite")
        # Drop an item cut off half-written.
        for key in [k for k in f["items"].keys() if k.startswith(_TMP_PREFIX)]:
            del f["items"][key]
        prov = _decode_attr("provenance", f.attrs.get("provenance", "{}"))
        if isinstance(prov, dict):
            prov.setdefault("resumed_at", []).append(time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            f.attrs["provenance"] = json.dumps(prov, default=str)
        return f

    def __contains__(self, item_id: object) -> bool:
        return item_id in self.done

    def write(self, item_id: str, arrays: dict[str, np.ndarray], attrs: dict[str, dict] | None = None) -> None:
        attrs = attrs or {}
        if "/" in item_id or not item_id:
            raise StoreError(f"{self.path}: item id {item_id!r} is not a valid name")
        if item_id in self.done:
            raise StoreError(f"{self.path}: item {item_id!r} written twice (duplicate id?)")
        _validate_item(self.kind, self.path, item_id, arrays, attrs)
        # Written under a temporary name and renamed when complete: an item cut off half-written
        # never appears under its own name, and --resume deletes the leftover.
        tmp = _TMP_PREFIX + item_id
        if tmp in self._items:
            del self._items[tmp]
        group = self._items.create_group(tmp)
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            ds = group.create_dataset(name, data=array, **dataset_kwargs(array))
            for k, v in attrs.get(name, {}).items():
                ds.attrs[k] = v
        self._items.move(tmp, item_id)
        self._file.flush()
        self.done.add(item_id)

    def close(self, complete: bool) -> None:
        if not self._file.id.valid:
            return
        self._file.close()
        if complete:
            os.replace(self.partial, self.path)

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(complete=exc_type is None)


def create_store(path, kind, classes, *, provenance, overwrite=False, resume=False, root_attrs=None) -> StoreWriter:
    """Start writing a store (see StoreWriter); `with create_store(...) as w: w.write(id, {...}, {...})`."""
    return StoreWriter(path, kind, classes, provenance=provenance, overwrite=overwrite, resume=resume, root_attrs=root_attrs)


def make_provenance(command: str, config=None, inputs: dict[str, Any] | None = None) -> dict:
    """What produced a store: command line, options, version, input stores, time."""
    if is_dataclass(config):
        config = asdict(config)
    return {
        "command": command,
        "argv": sys.argv,
        "options": config or {},
        "dhr_version": __version__,
        "inputs": {k: str(v) for k, v in (inputs or {}).items()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


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


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _attr_str(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
        return value.decode() if isinstance(value, bytes) else str(value)
    return str(value)


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
