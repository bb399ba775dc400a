"""`dhr export` as a library: a masks or seeds store to one VOC palette PNG per item.

    run_export("masks.h5", "out/")   ->  out/<id>.png, label values kept as palette indices (255 too)

Each PNG is written under a temporary name in DIR and renamed, so a reader never sees a half
written file. An existing non-empty DIR is refused unless overwrite=True (files of the same
name are then replaced; other files are left alone).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from dhr_cli.errors import InputError, StoreError

logger = logging.getLogger(__name__)

__all__ = ["run_export", "ExportResult"]


@dataclass(frozen=True)
class ExportResult:
    out: Path
    kind: str  # "masks" or "seeds"
    written: int
    classes: list[str]


def _prepare_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if out.is_dir():
        if any(out.iterdir()) and not overwrite:
            raise InputError(f"{out}: folder exists and is not empty; pass --overwrite to write into it")
        return
    if not out.parent.exists():
        raise InputError(f"{out}: parent folder {out.parent} does not exist")
    out.mkdir()


def _safe_name(store_path: Path, item_id: str) -> str:
    if not item_id or item_id.startswith(".") or "/" in item_id or "\\" in item_id or os.sep in item_id:
        raise StoreError(f"{store_path}: item id {item_id!r} cannot be used as a file name")
    return f"{item_id}.png"


def run_export(store: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False, quiet: bool = True) -> ExportResult:
    """Write every item of a masks/seeds store as <out>/<id>.png (VOC palette, 255 kept)."""
    from dhr_cli.io.palette import save_palette_png
    from dhr_cli.io.progress import track
    from dhr_cli.io.store import open_store

    out = Path(out)
    with open_store(store, expect=("masks", "seeds")) as s:
        names = {item_id: _safe_name(s.path, item_id) for item_id in s.ids}
        _prepare_dir(out, overwrite)
        written = 0
        for item_id in track(s.ids, description="export", quiet=quiet):
            mask = s.read(item_id).mask
            final = out / names[item_id]
            tmp = out / f".{names[item_id]}.{os.getpid()}.tmp"
            try:
                save_palette_png(tmp, mask)
                os.replace(tmp, final)
            finally:
                if tmp.exists():
                    tmp.unlink()
            written += 1
        logger.info("exported %d %s to %s", written, s.kind, out)
        return ExportResult(out=out, kind=s.kind, written=written, classes=list(s.classes))
