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

Every imported array passes one gate, _numbers / _maps: real numbers only (text, Python objects and
complex values are refused, bfloat16 tensors read through float32), one shape for every class, (K, h, w)
with no empty dimension, finite, within float32 range; each refusal is one line naming the file. An
imported CAM's class keys must be the image's labels, one map each (the cams store contract, the rule
`dhr seed` checks with pipeline.inputs.check_cam_labels), so no store is written that dhr then refuses.
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


F32_MAX = float(np.finfo(np.float32).max)


def _as_np(x) -> np.ndarray:
    """A torch tensor (any dtype) or array-like as a NumPy array, in its own precision where NumPy has it."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        try:
            x = x.numpy()
        except TypeError:  # bfloat16 / float8: no NumPy dtype; float32 holds them exactly
            if not x.is_floating_point():
                raise
            x = x.float().numpy()
    return np.asarray(x)


def _describe(a: np.ndarray) -> str | None:
    """What is wrong with the dtype of `a` for maps of real numbers (None: nothing)."""
    kind = a.dtype.kind
    if kind in "biuf":
        return None
    if kind == "c":
        return "complex values"
    if kind in "US":
        return f"text ({str(a.flat[0])[:40]!r})" if a.size else "text"
    if kind == "O":
        for v in a.flat:
            if v is None:
                return "None"
            if not isinstance(v, (int, float, np.integer, np.floating)):
                return f"a Python {type(v).__name__} ({str(v)[:40]!r})"
        return None  # Python numbers in an object array (made float64 by _numbers)
    return f"{a.dtype} values"


def _numbers(path: Path, x, what: str) -> np.ndarray:
    """The one gate every imported array passes (CAMs, features, label vectors): `x` (a NumPy array, torch
    tensor, number, or list of them) as a NumPy array of real numbers in its own precision. Text, Python
    objects, complex values and lists of maps of different shapes are refused in one line naming `path`;
    `what` names the array in that line ("its CAMs")."""
    listed = isinstance(x, (list, tuple))
    try:
        parts = [_as_np(e) for e in x] if listed else [_as_np(x)]
    except (ValueError, TypeError, RuntimeError) as e:  # a ragged nested list, an unconvertible tensor
        raise InputError(f"{path}: {what}: not an array of numbers ({e.__class__.__name__}: {str(e)[:80]})") from None
    for a in parts:
        if (bad := _describe(a)) is not None:
            raise InputError(f"{path}: {what} must be real numbers, found {bad}")
    if not listed:
        a = parts[0]
    elif len({a.shape for a in parts}) > 1:
        raise InputError(f"{path}: {what} differ in shape ({', '.join(str(a.shape) for a in parts[:8])}); "
                         "one size for every class expected")
    else:
        a = np.stack(parts) if parts else np.zeros((0,), np.float32)
    return a.astype(np.float64) if a.dtype.kind == "O" else a


def _to_float32(path: Path, a: np.ndarray, what: str) -> np.ndarray:
    """`a` (real numbers) as float32, refusing NaN / infinite values and values float32 cannot hold."""
    if a.dtype.kind == "f":
        finite = np.isfinite(a)
        if not finite.all():
            raise InputError(f"{path}: {what} hold NaN or infinite values ({int(a.size - finite.sum())} of {a.size})")
        if a.dtype.itemsize > 4 and a.size:
            peak = float(np.abs(a).max())
            if peak > F32_MAX:
                raise InputError(f"{path}: {what} hold values beyond float32 range (largest magnitude {peak:.3g}, "
                                 f"float32 ends at {F32_MAX:.3g}), which a dhr store cannot hold; rescale them first")
    return a.astype(np.float32)


def _maps(path: Path, x, what: str, n_keys: int | None = None) -> np.ndarray:
    """(K, h, w) float32 maps from a peer file (CAMs: K = n_keys; a bare 2-D array is one map when
    n_keys is 1), checked through _numbers: three dimensions, none of them empty, finite, float32 range."""
    a = _numbers(path, x, what)
    if a.ndim == 2 and n_keys == 1 and not isinstance(x, (list, tuple)):
        a = a[None]
    if n_keys is not None and (a.ndim != 3 or a.shape[0] != n_keys):
        raise InputError(f"{path}: {n_keys} keys but CAM array of shape {a.shape}; expected one 2-D map per class key")
    if a.ndim != 3:
        raise InputError(f"{path}: expected {what} of shape (C, h, w), found shape {a.shape}")
    if 0 in a.shape:
        raise InputError(f"{path}: {what} are empty (shape {a.shape}); every map needs at least one cell")
    return _to_float32(path, a, what)


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
    """(keys (K,) int64 0-based foreground ids, cams (K, h, w) float32 >= 0, K >= 1) from one peer file."""
    d = _load_npy_dict(path, trust)
    if fmt == "irn":
        if "keys" not in d or ("high_res" not in d and "cam" not in d):
            raise InputError(f"{path}: not an IRN CAM file (expected keys 'keys' and 'high_res' or 'cam', found {sorted(map(str, d))[:5]})")
        keys, cams = d["keys"], d["high_res"] if "high_res" in d else d["cam"]
    elif fmt == "clip-es":
        if "keys" not in d or "attn_highres" not in d:
            raise InputError(f"{path}: not a CLIP-ES CAM file (expected keys 'keys' and 'attn_highres')")
        keys, cams = d["keys"], d["attn_highres"]
    elif fmt == "mctformer":
        if not all(isinstance(k, (int, np.integer)) for k in d):
            raise InputError(f"{path}: not an MCTformer CAM file (expected integer class keys)")
        ks = sorted(int(k) for k in d)
        keys, cams = np.asarray(ks, dtype=np.int64), [d[k] for k in ks]
    else:
        raise InputError(f"unknown CAM format {fmt!r}")
    try:
        keys = np.atleast_1d(_as_np(keys))
    except (ValueError, TypeError, RuntimeError):
        raise InputError(f"{path}: class keys must be a 1-D array of integers") from None
    whole = keys.dtype.kind in "iu" or (keys.dtype.kind == "f" and bool(np.all(np.isfinite(keys)))
                                        and bool(np.all(keys == np.round(keys))))
    if keys.ndim != 1 or not whole or (keys.size and max(-float(keys.min()), float(keys.max())) > 2**31):
        raise InputError(f"{path}: class keys must be a 1-D array of integers, got {keys.dtype} {keys.shape}")
    keys = keys.astype(np.int64)
    if not keys.size:
        raise InputError(f"{path}: holds no CAMs (its class keys are empty); one map per label of the image expected")
    if len(np.unique(keys)) != len(keys):
        raise InputError(f"{path}: class keys {keys.tolist()} name a class twice")
    cams = _maps(path, cams, "its CAMs", n_keys=len(keys))
    return keys, np.maximum(cams, 0)


def _check_keys_match_labels(path: Path, dataset, item_id: str, keys: np.ndarray, offset: int) -> None:
    """The cams store contract (docs/contracts.md), as `dhr seed` checks it: one map per image-level label
    of the image, no more, no fewer."""
    from dhr_cli.errors import StoreError
    from dhr_cli.pipeline.inputs import check_cam_labels, check_labels

    labels = keys + offset
    image_labels = dataset.labels(item_id)
    check_labels(dataset, item_id, image_labels)
    try:
        check_cam_labels(path, item_id, labels.tolist(), image_labels)
    except StoreError:
        names = lambda values: ", ".join(dataset.classes[v] for v in values)  # noqa: E731
        extra = sorted(set(labels.tolist()) - set(image_labels))
        lacking = sorted(set(image_labels) - set(labels.tolist()))
        why = "; ".join(([f"maps for {names(extra)}, not labels of the image"] if extra else [])
                        + ([f"no map for {names(lacking)}"] if lacking else []))
        raise InputError(f"{path}: class keys {keys.tolist()} do not match the labels of image {item_id} "
                         f"({names(image_labels)}: keys {[v - offset for v in image_labels]}): {why}; "
                         "a cams store needs one map per image label, no more, no fewer") from None


def run_import(fmt: str, src: str | Path, dataset, out: str | Path, *, provenance: dict | None = None,
               overwrite: bool = False, resume: bool = False, quiet: bool = False, source_name: str | None = None,
               missing: str = "fail", trust: bool = False) -> dict:
    """Convert the peer files in `src` for every image of `dataset` into a store at `out`."""
    from dhr_cli.io.datasets import _check_same_size, read_index_png
    from dhr_cli.io.progress import track
    from dhr_cli.io.provenance import make_provenance
    from dhr_cli.io.store import create_store

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
    provenance = provenance or make_provenance("import", {"format": fmt}, {"src": src, "data": dataset.root},
                                               dataset=dataset, ids=dataset.ids)
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
                _check_keys_match_labels(path, dataset, item_id, keys, offset)
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
                arr = _maps(path, t, "its features")
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


def _label_vectors(path: Path, raw: dict) -> dict:
    """{key: 1-D float64 vector} of a label file's dict, every vector checked by _numbers: real, finite numbers."""
    vectors = {}
    for key, vec in raw.items():
        v = _numbers(path, vec, f"the vector of {key!r}").reshape(-1).astype(np.float64)
        if not np.isfinite(v).all():
            raise InputError(f"{path}: the vector of {key!r} holds NaN or infinite values; 0/1 entries expected")
        other = v[(v != 0) & (v != 1)]
        if other.size:  # scores or logits, not labels: a threshold would invent (or drop) every label
            raise InputError(f"{path}: the vector of {key!r} holds {other[0]:g}; 0/1 entries expected "
                             "(image-level labels, not scores)")
        vectors[key] = v
    return vectors


def _labels_by_form(path: Path, vectors: dict, num_foreground: int | None) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for key, v in vectors.items():
        if num_foreground is not None and v.size != num_foreground:
            raise InputError(f"{path}: the vector of {key!r} has {v.size} entries, expected {num_foreground} classes")
        values = (np.flatnonzero(v > 0.5) + 1).tolist()
        for form in _id_forms(key):
            out[form] = values
    return out


def read_label_vectors(path: Path, num_foreground: int | None = None, trust: bool = False) -> dict[str, list[int]]:
    """IRN cls_labels.npy / ToCo cls_labels_onehot.npy: {id: (K,) 0/1 vector, background excluded}
    -> {id (every form of it): sorted foreground label values, vector index i -> label i + 1}."""
    path = Path(path)
    return _labels_by_form(path, _label_vectors(path, _load_npy_dict(path, trust)), num_foreground)


LABEL_FILE_HELP = ("labels: IRN cls_labels.npy / ToCo cls_labels_onehot.npy ({id: (K,) 0/1 vector over the "
                   "foreground classes}) -> a labels.json of image-level labels ({id: [class names]}), the file "
                   "the flat layout reads as ROOT/labels.json")


def run_import_labels(src: str | Path, dataset, out: str | Path, *, overwrite: bool = False, missing: str = "fail",
                      trust: bool = False) -> dict:
    """An image-level label file of another tool -> labels.json for the images of `dataset`'s split.

    Vector index i is foreground class i: label value i + 1 when the dataset's class 0 is background,
    i otherwise; the vectors must have one entry per foreground class. Keys are matched in every form
    _id_forms() knows (IRN's int ids, COCO's 12-digit numbers). Written atomically (a temporary file,
    renamed), under OUT.lock."""
    import json

    from dhr_cli.io.outputs import OutputLock, check_output_path, write_text_atomic

    src, out = Path(src), Path(out)
    if not src.is_file():
        raise InputError(f"{src}: no such label file (expected cls_labels.npy or cls_labels_onehot.npy)")
    check_output_path(out)
    if out.exists() and not overwrite:
        raise InputError(f"{out}: already exists; pass --overwrite to replace it")
    offset = 1 if dataset.has_background else 0
    n_fg = len(dataset.classes) - offset
    raw = _load_npy_dict(src, trust)
    checked = _label_vectors(src, raw)
    sizes = {v.size for v in checked.values()}
    if sizes and sizes != {n_fg}:
        raise InputError(f"{src}: label vectors have {'/'.join(map(str, sorted(sizes)))} entries but {dataset.root} "
                         f"has {n_fg} foreground classes ({dataset.layout} layout)")
    vectors = _labels_by_form(src, checked, n_fg)
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
    lock = OutputLock(out, resumable=False)  # one writer: a second one is refused, never mixed in
    try:
        if out.exists() and not overwrite:  # made by another writer since the check above
            raise InputError(f"{out}: already exists; pass --overwrite to replace it")
        write_text_atomic(out, json.dumps(labels, indent=0, sort_keys=True) + "\n")
    finally:
        lock.release()
    return {"written": len(labels), "missing": absent, "keys": len(raw)}
