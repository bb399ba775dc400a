"""Strict, loud checkpoint loading (STYLE.md practice 11).

`load_state_dict` reads a file with `torch.load(weights_only=True)` (tensors and plain containers
only). Lightning `.ckpt` files pickle OmegaConf objects and need `trust=True`, which unpickles
arbitrary objects: only for files you trust (the CLI flag is `--trust-checkpoint`).
"""

from __future__ import annotations

import logging
import os
import pickle
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from dhr_cli.errors import CheckpointError

logger = logging.getLogger(__name__)

CONTAINER_KEYS = ("state_dict", "teacher", "model")
DEFAULT_PREFIXES = ("module.", "backbone.")


def save_atomic(obj, path: str | os.PathLike) -> None:
    """torch.save to a temporary name beside `path`, then one rename: a kill or a full disk while writing
    leaves the file that was there before (never a truncated checkpoint), and the failure is one line."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports ENOSPC / EFBIG as RuntimeError
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{path}: could not be written ({' '.join(str(e).split())[:160]}); the file there "
                              "before, if any, is as it was: free space and rerun") from None


_PLAIN_BUILTINS = {"list", "dict", "set", "frozenset", "tuple", "int", "float", "str", "bytes", "bool", "complex"}


class _Inert:
    """Stand-in for a pickled class we do not load (Lightning / OmegaConf hyper-parameters).

    Constructing it (pickle NEWOBJ / REDUCE) returns an empty OrderedDict, which the weights-only
    unpickler lets the file fill with items (SETITEMS) and attributes (BUILD): the object's data
    survives as plain containers; nothing from the file runs.
    """

    def __new__(cls, *args, **kwargs):
        return OrderedDict()


def _read_with_inert_globals(path: Path, map_location="cpu"):
    """torch.load(weights_only=True) with every non-allow-listed global replaced by _Inert."""
    import builtins

    names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    allow = []
    for n in names:
        mod, _, attr = n.rpartition(".")
        if mod == "builtins" and attr in _PLAIN_BUILTINS:
            allow.append(getattr(builtins, attr))  # a plain container type, as a value (e.g. defaultdict(list))
        else:
            allow.append((type(attr, (_Inert,), {"__qualname__": n}), n))
    logger.info("%s: reading tensors only; pickled classes left inert: %s", path, ", ".join(names[:6]))
    with torch.serialization.safe_globals(allow):
        return torch.load(path, map_location=map_location, weights_only=True)


def _looks_like_checkpoint(path: Path) -> bool:
    """torch.save writes a zip archive (or, before torch 1.6, a pickle: protocol 2+ starts with 0x80)."""
    import zipfile

    with open(path, "rb") as f:
        head = f.read(1)
    return head == b"\x80" or zipfile.is_zipfile(path)


def read_checkpoint(path: str | Path, trust: bool = False, inert: bool = True, map_location="cpu"):
    """The raw object stored in `path`, its tensors on `map_location` (default the CPU).

    Default: `torch.load(weights_only=True)` (tensors and plain containers only).
    inert=True (default): a file that also pickles other objects (a Lightning .ckpt's OmegaConf
    hyper-parameters) is still read safely: those objects become inert placeholders, tensors load.
    trust=True: full unpickling (`weights_only=False`), which can run code from the file; only for
    files you trust (CLI: --trust-checkpoint).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a checkpoint file")
    if not _looks_like_checkpoint(path):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither torch.save's zip archive nor a pickle)")
    obj = _read(path, trust, inert, map_location)
    bad = _first_non_finite(obj)
    if bad is not None:  # else a NaN loss deep in training, or NaN CAMs, far from the file to blame
        raise CheckpointError(f"{path}: tensor {bad!r} holds NaN or infinite values; the file is damaged or comes "
                              "from a run that diverged")
    return obj


def _first_non_finite(obj, key: str = "") -> str | None:
    """The dotted key of the first floating tensor in `obj` (nested dicts, lists) holding NaN or inf, else None."""
    if isinstance(obj, torch.Tensor):
        return key if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else None
    items = obj.items() if isinstance(obj, Mapping) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        bad = _first_non_finite(v, f"{key}.{k}" if key else str(k))
        if bad is not None:
            return bad
    return None


def _read(path: Path, trust: bool, inert: bool, map_location):
    try:
        return torch.load(path, map_location=map_location, weights_only=not trust)
    except Exception as e:  # UnpicklingError, RuntimeError (zip), EOFError ...
        name = e.__class__.__name__
        # torch.load(weights_only=True) refuses a global with pickle.UnpicklingError; told apart by type
        pickled = isinstance(e, pickle.UnpicklingError)
        if not trust and pickled and inert:
            try:
                return _read_with_inert_globals(path, map_location)
            except Exception as e2:
                logger.info("%s: inert read failed (%s: %s)", path, e2.__class__.__name__, e2)
        if not trust and pickled:
            raise CheckpointError(
                f"{path}: holds pickled Python objects beyond tensors (e.g. a Lightning .ckpt); "
                "pass --trust-checkpoint if you trust this file"
            ) from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({name})") from None


def unwrap(obj, path: str | Path = "checkpoint", containers: Iterable[str] = CONTAINER_KEYS) -> dict:
    """Descend into known container keys ('state_dict', 'teacher', 'model') until a tensor dict."""
    for _ in range(4):
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        inner = next((k for k in containers if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            break
        obj = obj[inner]
    keys = list(obj)[:6] if isinstance(obj, Mapping) else []
    raise CheckpointError(f"{path}: no state dict found (top-level keys {keys})")


def strip_prefixes(sd: dict, prefixes: Iterable[str] = DEFAULT_PREFIXES) -> dict:
    """Remove leading prefixes (repeatedly, by `startswith`): 'module.backbone.x' -> 'x'."""
    prefixes = tuple(prefixes)
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if p and k.startswith(p):
                    k = k[len(p):]
                    changed = True
        out[k] = v
    return out


def select_prefix(sd: dict, prefix: str) -> dict:
    """Keys under `prefix` with the prefix removed (e.g. 'net.model.' of a STEGO checkpoint)."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def load_state_dict(path: str | Path, trust: bool = False, prefixes: Iterable[str] = DEFAULT_PREFIXES,
                    map_location="cpu") -> dict:
    """A flat {name: tensor} dict from a checkpoint file: containers unwrapped, prefixes stripped."""
    return strip_prefixes(unwrap(read_checkpoint(path, trust, map_location=map_location), path), prefixes)


def _few(keys: list[str], n: int = 5) -> str:
    head = ", ".join(keys[:n])
    return f"{len(keys)} ({head}{', ...' if len(keys) > n else ''})"


def load_strict(module: nn.Module, sd: Mapping[str, torch.Tensor], where: str | Path = "checkpoint") -> None:
    """`module.load_state_dict(sd, strict=True)`, with a CheckpointError listing what differs."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        if shape:
            parts.append(f"shape mismatches {_few(shape, 3)}")
        raise CheckpointError(f"{where}: does not match the {module.__class__.__name__} model: " + "; ".join(parts))
    module.load_state_dict(dict(sd), strict=True)
