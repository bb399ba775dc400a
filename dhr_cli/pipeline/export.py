"""`dhr export` as a library: a masks or seeds store to one VOC palette PNG per item.

    run_export("masks.h5", "out/")   ->  out/<id>.png, label values kept as palette indices (255 too)
    run_export_prompts("masks.h5", "prompts/")  ->  prompts/<id>.json, the Segment Anything prompts
                                     of `dhr refine --mode prompt` (boxes, points), to run SAM elsewhere

All files are written into a staging folder inside DIR and moved into DIR only when every item
has been read and written, so a bad item or a full disk leaves DIR as it was, and a reader never
sees a half-written file. An existing non-empty DIR is refused unless overwrite=True (files of
the same name are then replaced; other files are left alone).
"""

from __future__ import annotations

import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dhr_cli.errors import InputError, StoreError

logger = logging.getLogger(__name__)

__all__ = ["run_export", "run_export_prompts", "ExportResult"]


@dataclass(frozen=True)
class ExportResult:
    out: Path
    kind: str  # "masks" or "seeds"
    written: int
    classes: list[str]


_STAGE = ".dhr-export-{pid}.tmp"  # the staging folder inside OUT (`_staged`)


def check_export_dir(out: Path, overwrite: bool, store: Path) -> None:
    """The shared output check of an export folder, after removing the staging folders that killed
    exports left behind (their process is gone), which would otherwise make OUT look non-empty."""
    from dhr_cli.io.store import check_output, pid_alive

    if out.is_dir():
        for stale in out.glob(_STAGE.format(pid="*")):
            pid = stale.name[len(".dhr-export-"): -len(".tmp")]
            if stale.is_dir() and pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
    check_output(out, folder=True, overwrite=overwrite, resumable=False, inputs={"STORE": store})


def _safe_name(store_path: Path, item_id: str, suffix: str = ".png") -> str:
    if not item_id or item_id.startswith(".") or "/" in item_id or "\\" in item_id or os.sep in item_id:
        raise StoreError(f"{store_path}: item id {item_id!r} cannot be used as a file name")
    return f"{item_id}{suffix}"


@contextmanager
def _staged(out: Path):
    """A staging folder in OUT; its files are moved into OUT when the block ends cleanly, and the
    folder is removed either way (all or nothing: a failed export leaves OUT as it was). OUT.lock,
    beside OUT, keeps a second export into the same folder from mixing its files in."""
    from dhr_cli.io.store import OutputLock

    lock = OutputLock(out)
    created = not out.exists()
    stage = out / _STAGE.format(pid=os.getpid())
    done = False
    try:
        out.mkdir(exist_ok=True)
        if stage.exists():
            shutil.rmtree(stage)
        stage.mkdir()
        yield stage
        for f in sorted(stage.iterdir()):
            os.replace(f, out / f.name)
        done = True
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if created and not done and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        lock.release()


def _unwritable(out: Path, name: str, error: OSError) -> StoreError:
    """A staged file that could not be written (disk full, ...): the staging folder goes, OUT stays as it was."""
    return StoreError(f"{out / name}: could not be written ({error.strerror or error}); nothing was exported "
                      f"({out} is as it was), free space and rerun")


def run_export(store: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False, quiet: bool = True) -> ExportResult:
    """Write every item of a masks/seeds store as <out>/<id>.png (VOC palette, 255 kept)."""
    from dhr_cli.io.palette import save_palette_png
    from dhr_cli.io.progress import track
    from dhr_cli.io.store import open_store

    out = Path(out)
    with open_store(store, expect=("masks", "seeds")) as s:
        names = {item_id: _safe_name(s.path, item_id) for item_id in s.ids}
        check_export_dir(out, overwrite, s.path)
        written = 0
        with _staged(out) as stage:
            for item_id in track(s.ids, description="export", quiet=quiet):
                try:
                    save_palette_png(stage / names[item_id], s.read(item_id).mask)
                except OSError as e:
                    raise _unwritable(out, names[item_id], e) from None
                written += 1
        logger.info("exported %d %s to %s", written, s.kind, out)
        return ExportResult(out=out, kind=s.kind, written=written, classes=list(s.classes))


PROMPT_CONVENTIONS = {
    "points": "(x, y) = (column, row) pixel indices of the image",
    "point_labels": "1 positive (inside the region), 0 negative (another class's most interior pixel)",
    "box": "[x0, y0, x1, y1], inclusive pixel indices (SAM's XYXY box prompt)",
}


def run_export_prompts(store: str | os.PathLike, out: str | os.PathLike, cfg=None, *, overwrite: bool = False,
                       quiet: bool = True) -> ExportResult:
    """Write <out>/<id>.json per item of a masks/seeds store: the SAM prompts of its regions.

    Each file: {"id", "image_size": [H, W], "classes", "conventions", "prompts": [{"class", "label",
    "area", "box", "points", "point_labels"}, ...]}, the prompts `dhr refine --mode prompt` sends.
    """
    import json

    from dhr_cli.config import PromptConfig
    from dhr_cli.io.progress import track
    from dhr_cli.io.store import open_store
    from dhr_cli.kernels.prompts import mask_prompts

    cfg = cfg or PromptConfig()
    out = Path(out)
    with open_store(store, expect=("masks", "seeds")) as s:
        names = {item_id: _safe_name(s.path, item_id, ".json") for item_id in s.ids}
        background = 0 if s.classes[0].lower() in ("background", "_background_", "bg") else None
        check_export_dir(out, overwrite, s.path)
        written = 0
        with _staged(out) as stage:
            for item_id in track(s.ids, description="export prompts", quiet=quiet):
                mask = s.read(item_id).mask
                prompts = mask_prompts(mask, cfg, background=background)
                doc = {"id": item_id, "image_size": list(mask.shape), "classes": s.classes,
                       "conventions": PROMPT_CONVENTIONS, "prompts": [p.to_json(s.classes) for p in prompts]}
                try:
                    (stage / names[item_id]).write_text(json.dumps(doc, indent=1))
                except OSError as e:
                    raise _unwritable(out, names[item_id], e) from None
                written += 1
        logger.info("exported the prompts of %d %s to %s", written, s.kind, out)
        return ExportResult(out=out, kind=s.kind, written=written, classes=list(s.classes))
