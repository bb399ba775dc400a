"""`dhr train`: DeepLabv3+ with DHR's recursive learning (online regeneration of the pseudo-masks)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dhr_cli.cli.options import (
    MaxPixels,
    DataRoot,
    Device,
    Quiet,
    SkipMissingImages,
    Split,
    TrustCheckpoint,
    UssWeights,
    app,
    network_store,
    out,
    user_errors,
)
from dhr_cli.config import MAX_PIXELS, TrainConfig

_D = TrainConfig()


@app.command(
    "train",
    help="Train DeepLabv3+ (ResNet, output stride 8) with the DHR CAM head, regenerating every pseudo-mask "
    "online at every iteration (Step 1 from the live CAMs over --masks, Step 2 from --uss, Step 3 from C4/C5). "
    "Writes RUN_DIR/config.json, checkpoints every epoch (--resume continues), log.jsonl, epochs.csv and "
    "model.pt. Several GPUs or nodes: torchrun --nproc-per-node N -m dhr_cli train ...",
)
@user_errors
def train_cmd(
    data: DataRoot,
    masks: Annotated[Path, typer.Option("--masks", help="Initial pseudo-masks: a masks/seeds store (.h5) or a folder of <id>.png.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Run folder (config, checkpoints, logs, model.pt).")],
    uss: Annotated[Optional[str], typer.Option("--uss", help=(
        "USS features: a features store (.h5), or a network (stego, cause, dino_vits8, lite0, ...) computed once "
        "with --uss-weights into the folder of --out."))] = None,
    uss_weights: UssWeights = None,
    uss_backbone_weights: Annotated[Optional[Path], typer.Option("--uss-backbone-weights", help="DINO / DINOv2 backbone of a packed STEGO or CAUSE head file.")] = None,
    trust_checkpoint: TrustCheckpoint = False,
    split: Split = None,
    skip_missing_images: SkipMissingImages = False,
    dhr: Annotated[bool, typer.Option("--dhr/--no-dhr", help="Regenerate the pseudo-masks online (DHR), or train plainly on --masks.")] = _D.dhr,
    backbone: Annotated[str, typer.Option("--backbone", help="resnet18, resnet34, resnet50 or resnet101.")] = _D.backbone,
    backbone_weights: Annotated[Optional[Path], typer.Option("--backbone-weights", help="Local torchvision ResNet ImageNet state dict (.pth); random init without it.")] = None,
    output_stride: Annotated[int, typer.Option("--output-stride", help="8 (paper) or 16.")] = _D.output_stride,
    decoder_channels: Annotated[int, typer.Option("--decoder-channels", min=8, help="ASPP / decoder width (paper: 256).")] = _D.decoder_channels,
    crop_size: Annotated[int, typer.Option("--crop-size", min=32, help="Training crop side.")] = _D.crop_size,
    scale_min: Annotated[int, typer.Option("--scale-min", help="Smallest random longer side before the crop.")] = _D.scale_range[0],
    scale_max: Annotated[int, typer.Option("--scale-max", help="Largest random longer side before the crop.")] = _D.scale_range[1],
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Global batch (split over torchrun processes).")] = _D.batch_size,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Epochs.")] = _D.epochs,
    lr: Annotated[float, typer.Option("--lr", help="Backbone learning rate (new layers x --head-lr-mult).")] = _D.lr,
    head_lr_mult: Annotated[float, typer.Option("--head-lr-mult", help="Learning-rate factor of the decoder and CAM head.")] = _D.head_lr_mult,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="SGD weight decay.")] = _D.weight_decay,
    ema: Annotated[float, typer.Option("--ema", help="EMA decay of the saved weights (0 = off).")] = _D.ema_decay,
    tau: Annotated[float, typer.Option("--tau", help="USS prototype cosine above which classes are told apart by C4/C5.")] = _D.propagate.tau,
    step3_background: Annotated[bool, typer.Option("--step3-background/--no-step3-background", help="Let background share a C4/C5 group like any class (the authors); default: foreground classes only.")] = _D.propagate.step3_background,
    ot_marginals: Annotated[str, typer.Option("--ot-marginals", help="uniform (authors) or seeded class marginals.")] = _D.propagate.marginals,
    crf: Annotated[bool, typer.Option("--crf/--no-crf", help="CRF in the online regeneration.")] = _D.propagate.use_crf,
    freeze_bn: Annotated[bool, typer.Option("--freeze-bn", help="BatchNorm layers in eval mode (small batches).")] = _D.freeze_bn,
    dropout: Annotated[bool, typer.Option("--dropout/--no-dropout", help="Decoder dropout.")] = _D.dropout,
    amp: Annotated[bool, typer.Option("--amp/--no-amp", help="Mixed precision on CUDA.")] = _D.amp,
    val_split: Annotated[str, typer.Option("--val-split", help="Split for validation mIoU each epoch: auto (val when it has GT), none, or a name.")] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Random seed (sample order, augmentation, init).")] = _D.seed,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Data-loading processes per training process.")] = _D.num_workers,
    log_every: Annotated[int, typer.Option("--log-every", min=1, help="Iterations between log.jsonl records.")] = _D.log_every,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", min=0, help="Iterations between mid-epoch checkpoints (0: at epoch ends only).")] = _D.checkpoint_every,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help="Stop after this many iterations (smoke runs).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete the run in --out and start again.")] = False,
    device: Device = _D.device,
    max_pixels: MaxPixels = MAX_PIXELS,  # applied by the option's callback
    quiet: Quiet = False,
) -> None:
    from dataclasses import replace

    from dhr_cli.errors import InputError
    from dhr_cli.io.outputs import check_output
    from dhr_cli.pipeline.train import check_overwritable, run_train

    check_output(out_dir, folder=True, overwrite=overwrite, resume=resume,  # before any work: the shared output check
                 inputs={"--data": data, "--masks": masks, "--uss": uss, "--uss-weights": uss_weights,
                         "--uss-backbone-weights": uss_backbone_weights, "--backbone-weights": backbone_weights})
    if overwrite:
        check_overwritable(out_dir)  # before the USS features are computed, not after

    try:
        cfg = TrainConfig(
            backbone=backbone, output_stride=output_stride, decoder_channels=decoder_channels, crop_size=crop_size, scale_range=(scale_min, scale_max),
            batch_size=batch_size, epochs=epochs, lr=lr, head_lr_mult=head_lr_mult, weight_decay=weight_decay,
            ema_decay=ema, dhr=dhr, freeze_bn=freeze_bn, dropout=dropout, amp=amp, seed=seed, num_workers=workers,
            device=device, val_split=None if val_split == "none" else val_split, log_every=log_every,
            checkpoint_every=checkpoint_every,
            propagate=replace(_D.propagate, tau=tau, step3_background=step3_background, marginals=ot_marginals,
                              use_crf=crf),  # type: ignore[arg-type]
            seed_cfg=replace(_D.seed_cfg, use_crf=crf),
        )
    except ValueError as e:
        raise InputError(str(e)) from None
    if uss is not None and cfg.dhr:
        uss = str(network_store(uss, "uss", data=data, split=split, weights=uss_weights, features_dir=out_dir.parent,
                                device=device, quiet=quiet, trust=trust_checkpoint, backbone_weights=uss_backbone_weights))
    result = run_train(cfg, data, masks, out_dir, uss=uss, split=split, backbone_weights=backbone_weights,
                       resume=resume, overwrite=overwrite, quiet=quiet, max_steps=max_steps)
    if result.history:
        last = result.history[-1]
        val = f", validation mIoU {100 * last['val_miou']:.1f}" if last.get("val_miou") is not None else ""
        out.print(f"Trained {result.epochs} epochs ({result.steps} iterations): loss {last['loss']:.4f}{val}.",
                  markup=False, highlight=False)
    out.print(f"Run folder: {result.run_dir} (model.pt, checkpoints/, log.jsonl, epochs.csv)", markup=False, highlight=False)
