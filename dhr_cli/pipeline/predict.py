"""`dhr predict`: masks from a network trained by `dhr train` (the authors' inference).

Per image: softmax of the segmentation head averaged over scales (1.0, 0.5, 1.5, 2.0) and
horizontal flips at image resolution; a class is kept when its highest probability anywhere in
the image exceeds 0.05 (background always); CRF over the kept classes; argmax. Under torchrun
every process takes its share of the images and rank 0 merges the shards.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dhr_cli.config import PredictConfig
from dhr_cli.errors import DatasetError
from dhr_cli.io.datasets import class_mismatch, open_dataset
from dhr_cli.io.progress import track
from dhr_cli.io.runtime import resolve_device
from dhr_cli.models.deeplab import DHRNet, load_trained
from dhr_cli.models.extract import fold_flipped, with_flipped  # the one test-time flip
from dhr_cli.pipeline.augment import normalize

logger = logging.getLogger(__name__)


@dataclass
class PredictResult:
    out: Path
    written: int
    skipped: int


def _scaled(x: torch.Tensor, scale: float) -> torch.Tensor:
    if scale == 1.0:
        return x
    h, w = x.shape[2:]
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def multiscale_outputs(net: DHRNet, image: torch.Tensor, scales=PredictConfig.scales, flip: bool = PredictConfig.flip,
                       probs: bool = True, cams: bool = False, features: bool = False) -> dict[str, torch.Tensor]:
    """image (1, 3, H, W) normalised -> averages over scales and flips, all at the input size.

    Returns a subset of {'probs' (1, C, H, W) mean softmax; 'cams' (1, K, H/16, W/16) relu CAMs summed
    over scales and flips, divided by their per-class max (the authors' CAM recipe); 'C4', 'C5'
    (1, D, H/16, W/16) mean features}. Flipped copies run in the same forward pass.
    """
    h, w = image.shape[2:]
    cam_size = (max(1, -(-h // 16)), max(1, -(-w // 16)))
    acc: dict[str, torch.Tensor] = {}
    n = 0
    for s in scales:
        x = with_flipped(_scaled(image, s), flip)
        out = net(x, with_features=features, with_logits=probs)
        maps = {}
        if probs:
            maps["probs"] = F.interpolate(out["logits"].float(), size=(h, w), mode="bilinear", align_corners=False).softmax(1)
        if cams:
            maps["cams"] = F.interpolate(out["cams"].float(), size=cam_size, mode="bilinear", align_corners=False).relu()
        if features:
            for k in ("C4", "C5"):
                maps[k] = F.interpolate(out[k].float(), size=cam_size, mode="bilinear", align_corners=False)
        for k, v in maps.items():
            v = fold_flipped(v, 1, flip)
            acc[k] = acc[k] + v if k in acc else v
        n += 2 if flip else 1
    result = {}
    if "probs" in acc:
        result["probs"] = acc["probs"] / n
    if "cams" in acc:
        result["cams"] = acc["cams"] / acc["cams"].amax((2, 3), keepdim=True).clamp_min(1e-5)
    for k in ("C4", "C5"):
        if k in acc:
            result[k] = acc[k] / n
    return result


def class_filter(probs: torch.Tensor, threshold: float, always: int | None, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """probs (B, C, H, W) -> (B, C) bool: classes whose max probability exceeds threshold (+ `always`)."""
    keep = probs.flatten(2).amax(2) > threshold
    if allowed is not None:
        keep &= allowed
    if always is not None:
        keep[:, always] = True
    none = ~keep.any(1)
    if none.any():  # never leave an image without a class: keep its most probable one
        keep[none, probs[none].flatten(2).amax(2).argmax(1)] = True
    return keep


def masks_from_probs(images: torch.Tensor, probs: torch.Tensor, keep: torch.Tensor, cfg: PredictConfig) -> torch.Tensor:
    """images (B, 3, H, W) 0..255, probs (B, C, H, W), keep (B, C) bool -> (B, H, W) uint8 class ids."""
    probs = probs * keep[:, :, None, None]
    probs = probs / probs.sum(1, keepdim=True).clamp_min(1e-8)
    if cfg.use_crf:
        from dhr_cli.kernels.crf import dense_crf

        probs = dense_crf(images, probs, cfg.crf, channel_valid=keep)
    probs = probs.masked_fill(~keep[:, :, None, None], -1.0)
    return probs.argmax(1).to(torch.uint8)


def run_predict(cfg: PredictConfig, model: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
                split: str | None = None, overwrite: bool = False, resume: bool = False, quiet: bool = False) -> PredictResult:
    """Write a masks store with the trained network's predictions for every image of the split."""
    from dhr_cli.io.distributed import (
        current_rank,
        device_for_rank,
        output_store,
        shard,
    )
    from dhr_cli.io.provenance import make_provenance

    rank = current_rank()
    device = resolve_device(device_for_rank(cfg.device, rank))
    net, meta = load_trained(model, device, use_ema=cfg.use_ema)
    dataset = open_dataset(data, split)
    diff = class_mismatch(dataset.classes, list(meta["classes"]), "the dataset", "the network", key=str)
    if diff:
        raise DatasetError(f"{data}: its {len(dataset.classes)} classes differ from the {len(meta['classes'])} "
                           f"the network {meta['path']} was trained on: {diff}")
    background = 0 if dataset.has_background else None
    ids = shard(dataset.ids, rank)
    provenance = make_provenance("predict", cfg, {"model": meta["path"], "data": str(data)}, dataset=dataset, ids=ids)
    written = skipped = 0
    with output_store(Path(out), "masks", dataset.classes, provenance=provenance, overwrite=overwrite,
                      resume=resume) as writer:
        for item_id in track(ids, "predict", quiet=quiet or not rank.is_main):
            if item_id in writer:
                skipped += 1
                continue
            image = dataset.image(item_id)
            x = normalize(image)[None].to(device)
            probs = multiscale_outputs(net, x, cfg.scales, cfg.flip)["probs"]
            allowed = None
            if cfg.restrict_to_labels:
                allowed = torch.zeros(1, probs.shape[1], dtype=torch.bool, device=device)
                allowed[0, dataset.labels(item_id)] = True
            keep = class_filter(probs, cfg.class_threshold, background, allowed)
            rgb = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None].to(device)
            mask = masks_from_probs(rgb, probs, keep, cfg)[0].cpu().numpy()
            writer.write(item_id, {"mask": mask}, {"mask": {"image_size": list(mask.shape)}})
            written += 1
    logger.info("predicted %d masks (%d already there) with %s", written, skipped, meta["path"])
    return PredictResult(Path(out), written, skipped)
