"""`dhr import`: CAMs, features and masks written by other tools, into dhr stores (docs/peers.md).

    irn       {id}.npy: np.save'd dict {'keys': LongTensor (K,) 0-based, 'cam': (K, h/4, w/4), 'high_res': (K, H, W)}
    mctformer {id}.npy: dict {int class 0-based: float32 (H, W)}
    clip-es   {id}.npy: dict {'keys': int (K,) 0-based, 'attn_highres': float16 (K, H, W)}
    dhr-pt    {id}.pt:  float16 tensor (C, h, w) USS features (DHR's produce_uss_features.py) -> features store
    png       {id}.png: label PNG (palette or grayscale) -> masks store

The .npy dicts are pickles (IRN's even hold torch tensors). They are read by a restricted
unpickler that only rebuilds NumPy arrays, dtypes, scalars and torch tensors (their storage through
torch.load(weights_only=True)); any other class in the file is refused, so no code from the file
runs. `trust=True` (CLI --trust-files) falls back to np.load(allow_pickle=True), which can run code:
only for files you produced or trust. Class keys are 0-based foreground ids: the label value is
key + 1 when the dataset's class 0 is background.
"""

from __future__ import annotations

import io
import logging
import pickle
from pathlib import Path

import numpy as np

from dhr_cli.config import IGNORE_INDEX
from dhr_cli.errors import InputError

logger = logging.getLogger(__name__)

FORMATS = {"irn": "cams", "mctformer": "cams", "clip-es": "cams", "dhr-pt": "features", "png": "masks"}
SUFFIX = {"irn": ".npy", "mctformer": ".npy", "clip-es": ".npy", "dhr-pt": ".pt", "png": ".png"}


def _as_np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _torch_storage_from_bytes(b: bytes):
    import torch

    return torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)


def _allowed_globals() -> dict:
    import collections

    allowed = {("collections", "OrderedDict"): collections.OrderedDict, ("numpy", "ndarray"): np.ndarray,
               ("numpy", "dtype"): np.dtype}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = _real_np("_reconstruct")
        allowed[(mod, "scalar")] = _real_np("scalar")
    import torch  # IRN files hold torch tensors (torch ships with dhr)

    allowed[("torch._utils", "_rebuild_tensor_v2")] = torch._utils._rebuild_tensor_v2
    allowed[("torch._utils", "_rebuild_tensor")] = torch._utils._rebuild_tensor
    allowed[("torch.storage", "_load_from_bytes")] = _torch_storage_from_bytes
    return allowed


def _real_np(name: str):
    try:
        from numpy._core import multiarray
    except ImportError:  # NumPy 1.x
        from numpy.core import multiarray
    return getattr(multiarray, name)


class _SafeUnpickler(pickle.Unpickler):
    """Rebuilds only NumPy arrays / scalars / dtypes and torch tensors; refuses every other class."""

    _allowed: dict = {}

    def find_class(self, module: str, name: str):
        obj = self._allowed.get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return obj


def _safe_npy_object(path: Path):
    """The object stored in an object-dtype .npy file, through _SafeUnpickler (numpy's format, read by hand)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            _shape, _fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            _shape, _fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:  # 3.0 (utf-8 header)
            _shape, _fortran, dtype = np.lib.format._read_array_header(f, version)
        if not dtype.hasobject:
            f.seek(0)
            return np.load(f, allow_pickle=False)
        u = _SafeUnpickler(f, encoding="latin1")
        u._allowed = _allowed_globals()
        return u.load()


def _load_npy_dict(path: Path, trust: bool = False) -> dict:
    try:
        obj = np.load(path, allow_pickle=True) if trust else _safe_npy_object(path)
    except pickle.UnpicklingError as e:
        raise InputError(f"{path}: {e}; a file holding other objects can only be read with --trust-files "
                         "(runs code from the file)") from None
    except ModuleNotFoundError as e:
        raise InputError(f"{path}: needs Python module {e.name!r} to be read (IRN files need torch)") from None
    except Exception as e:
        raise InputError(f"{path}: not a readable .npy file ({e.__class__.__name__})") from None
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj.item()
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return obj


def read_cam_file(fmt: str, path: Path, trust: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(keys (K,) int64 0-based foreground ids, cams (K, h, w) float32) from one peer file."""
    d = _load_npy_dict(path, trust)
    if fmt == "irn":
        if "keys" not in d or ("high_res" not in d and "cam" not in d):
            raise InputError(f"{path}: not an IRN CAM file (expected keys 'keys' and 'high_res' or 'cam', found {sorted(map(str, d))[:5]})")
        keys, cams = _as_np(d["keys"]), _as_np(d["high_res"] if "high_res" in d else d["cam"])
    elif fmt == "clip-es":
        if "keys" not in d or "attn_highres" not in d:
            raise InputError(f"{path}: not a CLIP-ES CAM file (expected keys 'keys' and 'attn_highres')")
        keys, cams = _as_np(d["keys"]), _as_np(d["attn_highres"])
    elif fmt == "mctformer":
        if not all(isinstance(k, (int, np.integer)) for k in d):
            raise InputError(f"{path}: not an MCTformer CAM file (expected integer class keys)")
        ks = sorted(int(k) for k in d)
        keys = np.asarray(ks, dtype=np.int64)
        maps = [_as_np(d[k]) for k in ks]
        if len({np.shape(m) for m in maps}) > 1:
            raise InputError(f"{path}: its CAMs differ in shape ({', '.join(str(np.shape(m)) for m in maps)}); "
                             "one size for every class expected")
        cams = np.stack(maps) if ks else np.zeros((0, 1, 1), np.float32)
    else:
        raise InputError(f"unknown CAM format {fmt!r}")
    keys = np.atleast_1d(np.asarray(keys))
    whole = keys.dtype.kind in "iu" or (keys.dtype.kind == "f" and bool(np.all(keys == np.round(keys))))
    if keys.ndim != 1 or not whole:
        raise InputError(f"{path}: class keys must be a 1-D array of integers, got {keys.dtype} {keys.shape}")
    keys = keys.astype(np.int64)
    if len(np.unique(keys)) != len(keys):
        raise InputError(f"{path}: class keys {keys.tolist()} name a class twice")
    cams = np.asarray(cams, dtype=np.float32)
    if cams.ndim == 2:
        cams = cams[None]
    if cams.ndim != 3 or cams.shape[0] != keys.shape[0]:
        raise InputError(f"{path}: {keys.shape[0]} keys but CAM array of shape {cams.shape}")
    if not np.isfinite(cams).all():
        raise InputError(f"{path}: CAMs hold NaN or infinite values")
    return keys, np.maximum(cams, 0)


def run_import(fmt: str, src: str | Path, dataset, out: str | Path, *, provenance: dict | None = None,
               overwrite: bool = False, resume: bool = False, quiet: bool = False, source_name: str | None = None,
               missing: str = "fail", trust: bool = False) -> dict:
    """Convert the peer files in `src` for every image of `dataset` into a store at `out`."""
    from dhr_cli.io.datasets import _check_same_size, read_index_png
    from dhr_cli.io.progress import track
    from dhr_cli.io.store import create_store, make_provenance

    if fmt not in FORMATS:
        raise InputError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    src = Path(src)
    if not src.is_dir():
        raise InputError(f"{src}: not a folder")
    if fmt == "png":
        from dhr_cli.pipeline.export import interrupted_export

        if mixed := interrupted_export(src):
            raise InputError(mixed)
    kind = FORMATS[fmt]
    offset = 1 if dataset.has_background else 0
    n_classes = len(dataset.classes)
    provenance = provenance or make_provenance("import", {"format": fmt}, {"src": src})
    root_attrs = {"source": source_name or fmt} if kind == "features" else None
    written, absent = 0, []
    with create_store(out, kind, dataset.classes, provenance=provenance, overwrite=overwrite, resume=resume,
                      root_attrs=root_attrs) as w:
        for item_id in track([i for i in dataset.ids if i not in w.done], f"import {fmt}", quiet=quiet):
            path = src / f"{item_id}{SUFFIX[fmt]}"
            if not path.exists():
                if missing == "skip":
                    absent.append(item_id)
                    continue
                raise InputError(f"{path}: missing (image {item_id} of the split); pass --missing skip to leave it out")
            size = [int(s) for s in dataset.image_size(item_id)]
            if kind == "cams":
                keys, cams = read_cam_file(fmt, path, trust)
                labels = keys + offset
                bad = labels[(labels < offset) | (labels >= n_classes)]
                if bad.size:
                    raise InputError(f"{path}: class keys {(bad - offset).tolist()[:5]} are outside the dataset's "
                                     f"{n_classes - offset} foreground classes")
                # float16 halves the store; CAMs beyond its range (unnormalised scores) stay float32
                small = not cams.size or float(cams.max()) <= float(np.finfo(np.float16).max)
                w.write(item_id, {"cams": cams.astype(np.float16 if small else np.float32)},
                        {"cams": {"labels": labels, "image_size": size}})
            elif kind == "features":
                import torch

                try:
                    t = torch.load(path, map_location="cpu", weights_only=True)
                except Exception as e:
                    raise InputError(f"{path}: not a readable tensor file ({e.__class__.__name__})") from None
                if not isinstance(t, torch.Tensor) or t.ndim != 3:
                    raise InputError(f"{path}: expected a (C, h, w) tensor, found {getattr(t, 'shape', type(t).__name__)}")
                arr = t.float().numpy()
                if not np.isfinite(arr).all():
                    raise InputError(f"{path}: the features hold NaN or infinite values")
                w.write(item_id, {"features": arr.astype(np.float16 if t.dtype == torch.float16 else np.float32)},
                        {"features": {"image_size": size}})
            else:
                mask = read_index_png(path)
                _check_same_size(path, mask, "mask", tuple(size), dataset.image_path(item_id))
                bad = np.unique(mask[(mask >= n_classes) & (mask != IGNORE_INDEX)])
                if bad.size:
                    raise InputError(f"{path}: label values {bad.tolist()[:5]} are beyond the dataset's {n_classes} "
                                     "classes (255 = ignore)")
                w.write(item_id, {"mask": mask})
            written += 1
    return {"kind": kind, "written": written, "missing": absent}


def _id_forms(key) -> list[str]:
    """Ways a label-file key names an image: ToCo keys are the id string; IRN keys are ints with the
    underscore dropped (2011003271 = 2011_003271); COCO's are the integer image id (12 digits in names)."""
    if isinstance(key, (int, np.integer)):
        s = str(int(key))
        forms = [s, f"{int(key):012d}"]
        if len(s) == 10:
            forms.append(f"{s[:4]}_{s[4:]}")
        return forms
    return [str(key)]


def read_label_vectors(path: Path, num_foreground: int | None = None, trust: bool = False) -> dict[str, list[int]]:
    """IRN cls_labels.npy / ToCo cls_labels_onehot.npy: {id: (K,) 0/1 vector, background excluded}
    -> {id (every form of it): sorted foreground label values, vector index i -> label i + 1}."""
    d = _load_npy_dict(Path(path), trust)
    out: dict[str, list[int]] = {}
    for key, vec in d.items():
        v = np.asarray(_as_np(vec)).reshape(-1)
        if num_foreground is not None and v.size != num_foreground:
            raise InputError(f"{path}: the vector of {key!r} has {v.size} entries, expected {num_foreground} classes")
        values = (np.flatnonzero(v > 0.5) + 1).tolist()
        for form in _id_forms(key):
            out[form] = values
    return out


LABEL_FILE_HELP = ("labels: IRN cls_labels.npy / ToCo cls_labels_onehot.npy ({id: (K,) 0/1 vector over the "
                   "foreground classes}) -> a labels.json of image-level labels ({id: [class names]}), the file "
                   "the flat layout reads as ROOT/labels.json")


def run_import_labels(src: str | Path, dataset, out: str | Path, *, overwrite: bool = False, missing: str = "fail",
                      trust: bool = False) -> dict:
    """An image-level label file of another tool -> labels.json for the images of `dataset`'s split.

    Vector index i is foreground class i: label value i + 1 when the dataset's class 0 is background,
    i otherwise; the vectors must have one entry per foreground class. Keys are matched in every form
    _id_forms() knows (IRN's int ids, COCO's 12-digit numbers). Written atomically (OUT.partial, renamed)."""
    import json
    import os

    from dhr_cli.io.store import check_output_path

    src, out = Path(src), Path(out)
    if not src.is_file():
        raise InputError(f"{src}: no such label file (expected cls_labels.npy or cls_labels_onehot.npy)")
    check_output_path(out)
    if out.exists() and not overwrite:
        raise InputError(f"{out}: already exists; pass --overwrite to replace it")
    offset = 1 if dataset.has_background else 0
    n_fg = len(dataset.classes) - offset
    raw = _load_npy_dict(src, trust)
    sizes = {np.asarray(_as_np(v)).size for v in raw.values()}
    if sizes and sizes != {n_fg}:
        raise InputError(f"{src}: label vectors have {'/'.join(map(str, sorted(sizes)))} entries but {dataset.root} "
                         f"has {n_fg} foreground classes ({dataset.layout} layout)")
    vectors = read_label_vectors(src, n_fg, trust)
    labels, absent = {}, []
    for item_id in dataset.ids:
        values = vectors.get(item_id)
        if values is None and len(item_id) > 12:
            values = vectors.get(item_id[-12:])  # COCO_train2014_000000000009 -> 000000000009
        if values is None:
            absent.append(item_id)
            continue
        labels[item_id] = [dataset.classes[v - 1 + offset] for v in values]
    if not labels:
        key = next(iter(raw), None)
        raise InputError(f"{src}: none of its {len(raw)} keys names an image of split {dataset.split or '(all)'} of "
                         f"{dataset.root} (e.g. key {key!r}, image {dataset.ids[0]!r})")
    if absent and missing != "skip":
        raise InputError(f"{src}: no labels for {len(absent)} of the split's {len(dataset)} images, first "
                         f"{absent[0]}; pass --missing skip to leave them out")
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps(labels, indent=0, sort_keys=True) + "\n")
    os.replace(partial, out)
    return {"written": len(labels), "missing": absent, "keys": len(raw)}
