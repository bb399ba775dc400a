"""Options shared by several commands (declared once, as Annotated aliases; choices as Literal
types, so Typer reports a bad value as a usage error and --help lists them), and the helpers that
turn them into configs."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from dhr_cli.cli.app import app, err, out, user_errors  # noqa: F401  (re-exported: the commands import them here)
from dhr_cli.config import MissingPolicy, OTSolver


# ---- options shared by several commands (declared once) -------------------------------------
DataRoot = Annotated[Path, typer.Option("--data", help="Dataset folder: flat, PASCAL VOC 2012, DHR/MARS, COCO 2014, COCO PNGs, ADE20K, Pascal Context or COCO-Stuff layout (auto-detected; dhr info ROOT says which).")]
Split = Annotated[Optional[str], typer.Option("--split", help="Split name (splits/<S>.txt, ImageSets/Segmentation/<S>.txt, or <S>/ folder).")]
OutStore = Annotated[Path, typer.Option("--out", help="Output HDF5 store (written as OUT.partial, renamed when complete).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run: items already in OUT(.partial) are skipped.")]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N, or auto (CUDA when present).")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Images processed together.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
def _apply_max_pixels(value: int) -> int:
    from dhr_cli.io.datasets import set_max_pixels

    set_max_pixels(value)  # applied as the option is parsed: every image this process (and its workers) opens
    return value


MaxPixels = Annotated[int, typer.Option("--max-pixels", min=0, callback=_apply_max_pixels, help=(
    "Refuse an image or mask above this many pixels, from its header, before it is decoded (0 = no limit)."))]
Crf = Annotated[bool, typer.Option("--crf/--no-crf", help="Refine with the dense CRF (the image is read for it).")]


class CrfBackend(str, Enum):
    permutohedral = "permutohedral"
    exact = "exact"


class CrfPreset(str, Enum):
    authors = "authors"


CrfMaxSide = Annotated[Optional[int], typer.Option("--crf-max-side", min=0, help=(
    "CRF resolution: longer side of the grid the mean field runs on (spatial parameters scale with it); "
    "0 = full resolution. Default: the config's."))]
CrfBackendOpt = Annotated[Optional[CrfBackend], typer.Option("--crf-backend", help=(
    "permutohedral: lattice bilateral filter, cost independent of the colours; exact: exact sparse kernel on the grid."))]
CrfPresetOpt = Annotated[Optional[CrfPreset], typer.Option("--crf-preset", help=(
    "authors: pydensecrf's parameters at full resolution, 10 iterations (slow, the paper's setting). "
    "--crf-max-side / --crf-backend given with it still apply."))]


def crf_config(preset: "CrfPreset | None", max_side: int | None, backend: "CrfBackend | None", base=None):
    """The CRFConfig of the shared CRF options (recorded in provenance with the command's config);
    `base` is the command's default CRF (CRFConfig() when None)."""
    from dataclasses import replace

    from dhr_cli.config import CRF_PRESETS, CRFConfig

    cfg = (base or CRFConfig()) if preset is None else CRFConfig(**CRF_PRESETS[preset.value])
    if max_side is not None:
        cfg = replace(cfg, max_side=max_side)
    if backend is not None:
        cfg = replace(cfg, backend=backend.value)
    return cfg


def _dataset_option(key: str):
    """A callback that hands an option's value to every open_dataset() of this command
    (dhr_cli.io.datasets.DATASET_OPTIONS): the readers' options need no plumbing through the pipeline."""

    def set_option(value):
        from dhr_cli.io.datasets import DATASET_OPTIONS

        DATASET_OPTIONS.set({**DATASET_OPTIONS.get(), key: value})
        return value

    return set_option


def _set_missing_images(skip: bool) -> bool:
    _dataset_option("missing_images")("skip" if skip else "fail")
    return skip


SkipMissingImages = Annotated[bool, typer.Option(
    "--skip-missing-images", callback=_set_missing_images,
    help="COCO: leave out the images the annotation json lists but the image folder lacks (their count is "
         "reported); without it such a json is an error naming the first missing file.")]
GtCache = Annotated[Optional[Path], typer.Option(
    "--gt-cache", callback=_dataset_option("gt_cache"), show_default=False,
    help="COCO: the GT cache store (dhr info ROOT --build-cache); by default annotations/instances_<split>.gt.h5, "
         "used whenever present and up to date.")]
MissingItems = Annotated[MissingPolicy, typer.Option("--missing", help="Images of the split missing from an input store: fail, or skip (listed).")]
OTSolverOpt = Annotated[OTSolver, typer.Option("--ot-solver", help="dhr: the authors' Sinkhorn (batched, their stopping rule); pot: POT's converged log-domain solver.")]
SinkhornMaxIter = Annotated[Optional[int], typer.Option("--sinkhorn-max-iter", min=1, show_default=False, help=(
    "Sinkhorn iteration cap [default: 100 with --ot-solver dhr, 1000 with pot (POT's numItermax)]."))]
SinkhornTol = Annotated[Optional[float], typer.Option("--sinkhorn-tol", show_default=False, help=(
    "Sinkhorn stopping tolerance: dhr stops when mean |r - r_prev| < tol (the authors' rule, scale dependent), "
    "pot when the marginal violation < tol (POT's stopThr) [default: 1e-2 with dhr, 1e-9 with pot]."))]
SinkhornEps = Annotated[float, typer.Option("--sinkhorn-eps", help="Entropic regularisation of the OT.")]


def parse_scales(value: str | None) -> tuple[float, ...] | None:
    """--scales "1,0.5,1.5" -> (1.0, 0.5, 1.5) (the one parser of both commands); else a usage error."""
    if value is None:
        return None
    from dhr_cli.config import MAX_SCALE, MAX_SCALES, MIN_SCALE

    try:
        scales = tuple(float(s) for s in value.split(","))  # an empty entry ("1.0,,0.5") is no number either
    except ValueError:
        raise typer.BadParameter(f"{value!r}: expected comma-separated numbers, each in [{MIN_SCALE:g}, "
                                 f"{MAX_SCALE:g}], e.g. 1.0,0.5,1.5") from None

    if not scales or any(not MIN_SCALE <= s <= MAX_SCALE for s in scales) or len(scales) > MAX_SCALES:
        # memory of a pass grows with the square of its scale: --scales 100 would exhaust any machine
        raise typer.BadParameter(f"{value!r}: expected 1 to {MAX_SCALES} scales, each in [{MIN_SCALE:g}, {MAX_SCALE:g}]")
    return scales


def sinkhorn_config(solver: str, max_iter: int | None, tol: float | None, eps: float):
    """The SinkhornConfig of the options; max_iter / tol None: the solver's own defaults."""
    from dhr_cli.config import SinkhornConfig
    from dhr_cli.errors import InputError

    try:
        return SinkhornConfig(eps=eps, max_iter=max_iter, tol=tol, solver=solver)  # type: ignore[arg-type]
    except ValueError as e:
        raise InputError(str(e)) from None


# ---- networks named where a features store is expected (propagate, train) --------------------
TrustCheckpoint = Annotated[bool, typer.Option("--trust-checkpoint", help=(
    "Fully unpickle the weights files you name (torch.load weights_only=False): this runs code from "
    "the file, so only for files you trust. Without it, tensors are read with weights_only=True and "
    "other pickled objects (Lightning / OmegaConf hyper-parameters) are left inert."))]
UssWeights = Annotated[Optional[Path], typer.Option("--uss-weights", help="Weights file of the USS network named by --uss (e.g. a STEGO / CAUSE head file).")]
PackedHeadBackbone = Annotated[Optional[Path], typer.Option("--backbone-weights", help="DINO / DINOv2 backbone of a packed STEGO or CAUSE head file.")]
FeaturesDir = Annotated[Optional[Path], typer.Option("--features-dir", help=(
    "Where the stores of networks named by --uss / --wss are computed and reused "
    "(<name>-<role>-<split>.h5; default: the folder of --out)."))]


def network_store(spec: str, role: str, *, data: Path, split: str | None, weights: Path | None, features_dir: Path,
                  device: str, quiet: bool, **source_kw) -> Path:
    """`spec` if it is a store file; for a network name, its store computed once into features_dir."""
    from dhr_cli.errors import InputError

    if Path(spec).is_file():
        if weights is not None:
            raise InputError(f"--{role} {spec} is a store; --{role}-weights {weights} applies to a network name only")
        return Path(spec)
    if features_dir.exists() and not features_dir.is_dir():
        raise InputError(f"--features-dir {features_dir}: is a file, expected a folder")
    from dhr_cli.io.datasets import open_dataset
    from dhr_cli.io.runtime import resolve_device
    from dhr_cli.pipeline.cams import features_store_for

    def announce(cache: Path) -> None:
        err.print(f"--{role} {spec}: computing its {'CAMs and features' if role == 'wss' else 'features'} "
                  f"into {cache} (reused by later runs)", markup=False, soft_wrap=True)

    return features_store_for(spec, open_dataset(data, split), role=role, weights=weights, cache_dir=features_dir,
                              announce=announce, device=resolve_device(device), quiet=quiet, **source_kw)


# ---- Segment Anything prompts (dhr refine, dhr export --prompts) ---------------------------------
PositivePoints = Annotated[int, typer.Option("--positive-points", min=1, help="Positive points per region: its most interior pixels.")]
NegativePoints = Annotated[int, typer.Option("--negative-points", min=0, help="Negative points per region: the most interior pixel of up to this many other classes (largest first).")]
MinArea = Annotated[int, typer.Option("--min-area", min=1, help="Regions smaller than this many pixels get no prompt.")]


def prompt_config(positive_points: int, negative_points: int, min_area: int):
    from dhr_cli.config import PromptConfig
    from dhr_cli.errors import InputError

    try:
        return PromptConfig(positive_points=positive_points, negative_points=negative_points, min_area=min_area)
    except ValueError as e:
        raise InputError(str(e)) from None
