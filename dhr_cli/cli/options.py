"""The Typer app, options shared by several commands (declared once), and error mapping."""

from __future__ import annotations

import functools
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from dhr_cli import __version__
from dhr_cli.errors import DhrError

app = typer.Typer(
    name="dhr",
    help="Dense pseudo segmentation masks from image-level labels (DHR, ECCV 2024).\n\n"
    "Typical run: dhr cams -> dhr seed -> dhr propagate -> dhr eval / dhr export.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="rich",
)

# Results go to stdout; messages, progress and errors to stderr.
out = Console()
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dhr {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens, step by step.")] = False,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")


def user_errors(fn):
    """Turn DhrError (and OS errors on the user's files) into `Error: ...` and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DhrError as e:
            _fail(str(e))
        except OSError as e:  # permission denied, disk full, ...: the user's to fix
            _fail(f"{e.filename or ''}: {e.strerror or e}".lstrip(": "))
        except KeyboardInterrupt:
            _fail("interrupted; what was written is kept, rerun with --resume to continue", code=130)

    return wrapper


def _fail(message: str, code: int = 1) -> None:
    # One line, no markup interpretation (paths may contain brackets).
    print(f"Error: {' '.join(message.split())}", file=sys.stderr)
    raise typer.Exit(code)


# ---- options shared by several commands (declared once) -------------------------------------
DataRoot = Annotated[Path, typer.Option("--data", help="Dataset folder: flat, PASCAL VOC 2012 or DHR/MARS layout (auto-detected).")]
Split = Annotated[Optional[str], typer.Option("--split", help="Split name (splits/<S>.txt, ImageSets/Segmentation/<S>.txt, or <S>/ folder).")]
OutStore = Annotated[Path, typer.Option("--out", help="Output HDF5 store (written as OUT.partial, renamed when complete).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run: items already in OUT(.partial) are skipped.")]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N, or auto (CUDA when present).")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Images processed together.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
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


def crf_config(preset: "CrfPreset | None", max_side: int | None, backend: "CrfBackend | None"):
    """The CRFConfig of the shared CRF options (recorded in provenance with the command's config)."""
    from dataclasses import replace

    from dhr_cli.config import CRF_PRESETS, CRFConfig

    cfg = CRFConfig() if preset is None else CRFConfig(**CRF_PRESETS[preset.value])
    if max_side is not None:
        cfg = replace(cfg, max_side=max_side)
    if backend is not None:
        cfg = replace(cfg, backend=backend.value)
    return cfg
MissingItems = Annotated[str, typer.Option("--missing", help="Images of the split missing from an input store: fail, or skip (listed).")]
OTSolverOpt = Annotated[str, typer.Option("--ot-solver", help="dhr: the authors' Sinkhorn (batched, their stopping rule); pot: POT's converged log-domain solver.")]
SinkhornMaxIter = Annotated[int, typer.Option("--sinkhorn-max-iter", min=1, help="Sinkhorn iteration cap.")]
SinkhornTol = Annotated[float, typer.Option("--sinkhorn-tol", help="Sinkhorn stops when mean |r - r_prev| < tol (scale dependent, the authors' rule).")]
SinkhornEps = Annotated[float, typer.Option("--sinkhorn-eps", help="Entropic regularisation of the OT.")]


def sinkhorn_config(solver: str, max_iter: int, tol: float, eps: float):
    from dhr_cli.config import SinkhornConfig
    from dhr_cli.errors import InputError

    if solver not in ("dhr", "pot"):
        raise InputError(f"--ot-solver {solver!r}: expected dhr or pot")
    try:
        return SinkhornConfig(eps=eps, max_iter=max_iter, tol=tol, solver=solver)  # type: ignore[arg-type]
    except ValueError as e:
        raise InputError(str(e)) from None


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> str:
    from dhr_cli.errors import InputError

    if value not in choices:
        raise InputError(f"{option} {value!r}: expected {' or '.join(choices)}")
    return value


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
    if Path(spec).is_file():
        return Path(spec)
    from dhr_cli.io.datasets import open_dataset
    from dhr_cli.io.runtime import resolve_device
    from dhr_cli.pipeline.cams import features_store_for

    def announce(cache: Path) -> None:
        err.print(f"--{role} {spec}: computing its {'CAMs and features' if role == 'wss' else 'features'} "
                  f"into {cache} (reused by later runs)", markup=False, soft_wrap=True)

    return features_store_for(spec, open_dataset(data, split), role=role, weights=weights, cache_dir=features_dir,
                              announce=announce, device=resolve_device(device), quiet=quiet, **source_kw)
