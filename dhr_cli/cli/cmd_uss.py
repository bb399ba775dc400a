"""`dhr uss fit`: a USS head fitted with STEGO's recipe on a frozen backbone's features, no labels."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dhr_cli.cli.app import HELP_MARKUP, extra
from dhr_cli.cli.options import (
    MaxPixels,
    DataRoot,
    Device,
    Overwrite,
    PackedHeadBackbone,
    Quiet,
    Resume,
    SkipMissingImages,
    Split,
    TrustCheckpoint,
    app,
    out,
    user_errors,
)
from dhr_cli.config import MAX_PIXELS, MAX_SIDE, UssFitConfig

_D = UssFitConfig()
uss_app = typer.Typer(help="USS feature sources fitted on your own images.", no_args_is_help=True, rich_markup_mode=HELP_MARKUP)
app.add_typer(uss_app, name="uss")


@uss_app.command("fit", help=(
    "Fit a STEGO head (linear + non-linear 1x1, to --dim channels) on a frozen backbone's features of a "
    "split's images, without labels: STEGO's correlation loss on self, k-nearest-neighbour and random image "
    "pairs. Backbones: lite0 (weights ship with " + extra("lite0") + "), dino, dino_vits8/16, dino_vitb8/16, dinov2_vitb14 "
    "(--backbone-weights). Use the result as `--uss fitted --uss-weights OUT` (or --uss stego)."))
@user_errors
def fit_cmd(
    data: DataRoot,
    out_path: Annotated[Path, typer.Option("--out", help="Head file to write (.pt); OUT.partial holds the resume state.")],
    split: Split = None,
    skip_missing_images: SkipMissingImages = False,
    backbone: Annotated[str, typer.Option("--backbone", help="Frozen backbone: lite0, dino, dino_vits8, ..., dinov2_vitb14.")] = "lite0",
    backbone_weights: PackedHeadBackbone = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Adam steps.")] = _D.steps,
    dim: Annotated[int, typer.Option("--dim", min=1, help="Channels of the code (STEGO: 70).")] = _D.dim,
    neighbours: Annotated[int, typer.Option("--neighbours", min=1, help="kNN positives per image (STEGO: 7).")] = _D.neighbours,
    batch_size: Annotated[int, typer.Option("--batch-size", min=2, help="Images per step (STEGO: 16).")] = _D.batch_size,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate (STEGO: 5e-4).")] = _D.lr,
    side: Annotated[Optional[int], typer.Option("--side", min=16, max=MAX_SIDE, help="Longer image side at scale 1.0 (default: the backbone's, as dhr cams).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = _D.seed,
    trust_checkpoint: TrustCheckpoint = False,
    device: Device = _D.device,
    overwrite: Overwrite = False,
    resume: Resume = False,
    max_pixels: MaxPixels = MAX_PIXELS,  # applied by the option's callback
    quiet: Quiet = False,
) -> None:
    from dhr_cli.errors import InputError
    from dhr_cli.io.datasets import open_dataset
    from dhr_cli.io.runtime import resolve_device
    from dhr_cli.pipeline.uss_fit import check_backbone_weights, check_output, run_uss_fit

    check_output(out_path, overwrite, resume, {"--data": data, "--backbone-weights": backbone_weights})
    check_backbone_weights(backbone, backbone_weights)
    try:
        cfg = UssFitConfig(steps=steps, dim=dim, neighbours=neighbours, batch_size=batch_size, lr=lr, side=side,
                           seed=seed, device=device)
    except ValueError as e:
        raise InputError(str(e)) from None
    ds = open_dataset(data, split)
    s = run_uss_fit(ds, backbone, out_path, cfg, backbone_weights=backbone_weights, device=resolve_device(device),
                    overwrite=overwrite, resume=resume, trust=trust_checkpoint, quiet=quiet)
    last = s["history"][-1] if s["history"] else None
    out.print(f"USS head {out_path}: {backbone} -> {dim} channels, {s['steps']} steps on {s['images']} images"
              + (f", final loss {last[0]:+.4f}" if last else "")
              + f"; use --uss fitted --uss-weights {out_path}", markup=False, soft_wrap=True)
