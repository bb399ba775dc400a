"""`dhr export` as a library: a masks or seeds store to one VOC palette PNG per item.

    run_export("masks.h5", "out/")   ->  out/<id>.png, label values kept as palette indices (255 too)
    run_export_prompts("masks.h5", "prompts/")  ->  prompts/<id>.json, the Segment Anything prompts
                                     of `dhr refine --mode prompt` (boxes, points), to run SAM elsewhere

All files are written into a staging folder and moved into DIR only when every item has been
read and written, so a bad item or a full disk leaves DIR as it was, and a reader never sees a
half-written file. A new DIR is staged beside it and appears in one rename, complete. An existing
non-empty DIR is refused unless overwrite=True (files of the same name are then replaced; other
files are left alone); its staging folder is inside it and marked before the files move, so an
export killed while moving them is finished by the next export into DIR, and read by nothing
meanwhile (`interrupted_export`).
"""

from __future__ import annotations

import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dhr_cli.errors import StoreError

logger = logging.getLogger(__name__)

__all__ = ["run_export", "run_export_prompts", "ExportResult"]


@dataclass(frozen=True)
class ExportResult:
    out: Path
    kind: str  # "masks" or "seeds"
    written: int
    classes: list[str]


_STAGE = ".dhr-export-{pid}.tmp"  # the staging folder inside an existing OUT (`_staged`)
_INSIDE = _STAGE.split("{")[0]  # the name before the PID
# In a staging folder inside OUT: `_WRITING` while files are written, renamed `_MOVING` (a rename
# needs no free space) once every file is there and the moves into OUT begin.
_WRITING, _MOVING = ".writing", ".moving"


def _sibling_stage(out: Path, pid: int | str) -> Path:
    """The staging folder of a new OUT, beside it: renamed to OUT when complete."""
    return out.parent / f".{out.name}{_STAGE.format(pid=pid)}"


def _stale_stages(folder: Path, prefix: str):
    """Staging folders `<prefix><PID>.tmp` in `folder` whose export process is gone, with the PID. The
    folder's time tells a PID reused by a later process from the export that made it."""
    from dhr_cli.io.outputs import pid_alive, written_at

    if not folder.is_dir():
        return
    for stage in sorted(folder.iterdir()):
        pid = stage.name[len(prefix): -len(".tmp")]
        if (stage.name.startswith(prefix) and stage.name.endswith(".tmp") and pid.isdigit() and stage.is_dir()
                and not pid_alive(int(pid), since=written_at(stage))):  # a PID reused since: gone too
            yield stage, int(pid)


def interrupted_export(folder: Path) -> str | None:
    """A message if an export into `folder` was killed while moving its files in (the folder then
    holds some files of that export and some from before it), else None."""
    for stage, pid in _stale_stages(Path(folder), _INSIDE):
        if (stage / _MOVING).exists():
            return (f"{folder}: an export into it (PID {pid}) was killed while moving its files, so it holds a mix "
                    f"of that export and what was there before; rerun that `dhr export ... --overwrite` into it to finish it")
    return None


def _finish_moves(stage: Path, out: Path) -> None:
    for f in sorted(stage.iterdir()):
        if f.name not in (_WRITING, _MOVING):
            os.replace(f, out / f.name)


def check_export_dir(out: Path, overwrite: bool, store: Path) -> None:
    """The shared output check of an export folder, after tidying what killed exports left: a staging
    folder whose files had all been written and had begun to move is moved in (that export is
    finished); any other is removed, so it cannot make OUT look non-empty."""
    from dhr_cli.io.outputs import check_output

    for stage, _ in _stale_stages(out.parent, f".{out.name}{_INSIDE}"):
        shutil.rmtree(stage, ignore_errors=True)
    if out.is_dir():
        for stage, pid in _stale_stages(out, _INSIDE):
            if (stage / _MOVING).exists():
                logger.warning("%s: finishing the export of PID %d, killed while moving its files in", out, pid)
                _finish_moves(stage, out)
            shutil.rmtree(stage, ignore_errors=True)
    check_output(out, folder=True, overwrite=overwrite, resumable=False, inputs={"STORE": store})


def _safe_name(store_path: Path, item_id: str, suffix: str = ".png") -> str:
    if not item_id or item_id.startswith(".") or "/" in item_id or "\\" in item_id or os.sep in item_id:
        raise StoreError(f"{store_path}: item id {item_id!r} cannot be used as a file name")
    return f"{item_id}{suffix}"


@contextmanager
def _staged(out: Path):
    """A staging folder whose files land in OUT when the block ends cleanly; it is removed either way
    (all or nothing: a failed export leaves OUT as it was). A new OUT is staged beside it and renamed
    into place; an existing one is staged inside it, marked `_MOVING` before the files move so that a
    kill (or a SIGTERM, which keeps the stage) among the moves is finished later (`check_export_dir`). OUT.lock, beside OUT, keeps a second
    export into the same folder from mixing its files in."""
    from dhr_cli.io.outputs import OutputLock

    lock = OutputLock(out, resumable=False)  # export has no --resume: a rerun redoes it
    fresh = not out.exists()
    stage = _sibling_stage(out, os.getpid()) if fresh else out / _STAGE.format(pid=os.getpid())
    moving = False  # the moves into OUT have begun and not ended: the marked stage must stay
    try:
        try:
            if stage.exists():
                shutil.rmtree(stage)
            stage.mkdir()
            if not fresh:
                (stage / _WRITING).touch()
        except OSError as e:
            raise StoreError(f"{stage}: cannot make the staging folder ({e.strerror}); nothing was exported") from None
        yield stage
        if fresh:
            try:
                os.rename(stage, out)
            except OSError as e:  # OUT appeared meanwhile, made by something else
                raise StoreError(f"{out}: could not be put in place ({e.strerror}): something created it "
                                 f"during the export; nothing was exported") from None
        else:
            os.replace(stage / _WRITING, stage / _MOVING)
            moving = True
            _finish_moves(stage, out)
            moving = False
    finally:
        # Stopped among the moves (SIGTERM, Ctrl-C, an OS error): OUT holds a mix, so the marked stage
        # stays for readers to refuse and for the next export to finish (`check_export_dir`).
        if not moving:
            shutil.rmtree(stage, ignore_errors=True)
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
