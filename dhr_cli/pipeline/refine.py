"""`dhr refine --sam` as a library: masks refined with Segment Anything (docs/sam.md).

    run_refine(RefineConfig(mode="prompt"), masks="masks.h5", data="data/voc", sam="vit_b",
               weights="sam_vit_b_01ec64.pth", out="refined.h5")

Two modes, both one SAM image embedding per image:
- prompt: every connected region of every foreground class of the input mask becomes a box plus
  interior positive points (and other classes' interiors as negatives); SAM's best mask per
  prompt (by its predicted IoU) is accepted where its IoU with the region is >= accept_iou;
  accepted masks overwrite the input, overlaps going to the higher SAM score
  (`kernels.prompts.resolve_prompted`).
- merge: SAM's automatic masks (SamAutomaticMaskGenerator's point grid) are given classes by
  the SAM_WSSS rule (`kernels.prompts.assign_segments`).
Pixels that no accepted or assigned SAM mask covers keep their input label. Resume, torchrun
sharding and the progress bar are those of every per-item command.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dhr_cli.config import RefineConfig
from dhr_cli.errors import StoreError
from dhr_cli.io.datasets import open_dataset
from dhr_cli.io.distributed import current_rank, device_for_rank, output_store, shard
from dhr_cli.io.progress import track
from dhr_cli.io.runtime import resolve_device
from dhr_cli.io.provenance import make_provenance
from dhr_cli.kernels.prompts import (
    assign_segments,
    batched_points,
    mask_prompts,
    region_mask_inputs,
    resolve_prompted,
)
from dhr_cli.models.sam import load_sam, require_segment_anything
from dhr_cli.pipeline.inputs import Missing, open_checked, select_ids

logger = logging.getLogger(__name__)

__all__ = ["RefineResult", "SamRefiner", "run_refine"]


@dataclass
class RefineResult:
    out: Path
    written: int
    skipped: int
    prompts: int  # prompt mode: prompts sent; merge mode: SAM segments generated
    accepted: int  # prompt mode: masks accepted; merge mode: segments given a class


class SamRefiner:
    """One SAM model, ready to refine one image's mask at a time (the image embedded once)."""

    def __init__(self, model, cfg: RefineConfig, background: int | None):
        from segment_anything import SamAutomaticMaskGenerator, SamPredictor

        self.model, self.cfg, self.background = model, cfg, background
        if cfg.mode == "prompt":
            self.predictor = SamPredictor(model)
        else:
            self.generator = SamAutomaticMaskGenerator(
                model, points_per_side=cfg.points_per_side, points_per_batch=cfg.points_per_batch,
                pred_iou_thresh=cfg.pred_iou_thresh, stability_score_thresh=cfg.stability_score_thresh,
                output_mode="binary_mask")

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.no_grad()
    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, int, int]:
        """image (H, W, 3) uint8 RGB, mask (H, W) uint8 -> (refined mask, SAM masks, accepted)."""
        if self.cfg.mode == "prompt":
            return self._prompt(image, mask)
        return self._merge(image, mask)

    def _prompt(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, int, int]:
        cfg, predictor = self.cfg, self.predictor
        prompts = mask_prompts(mask, cfg.prompts, background=self.background)
        if not prompts:
            return mask, 0, 0
        predictor.set_image(image)  # the embedding, once for all prompts of the image
        size, dev = image.shape[:2], self.device
        best_masks, best_scores = [], []
        for start in range(0, len(prompts), cfg.prompt_batch):
            chunk = prompts[start : start + cfg.prompt_batch]
            coords, labels = batched_points(chunk)
            coords_t = predictor.transform.apply_coords_torch(torch.from_numpy(coords).to(dev), size)
            boxes = torch.tensor([p.box for p in chunk], dtype=torch.float32, device=dev)
            boxes = predictor.transform.apply_boxes_torch(boxes, size)
            mask_input = None
            if cfg.mask_input:
                regions = torch.from_numpy(np.stack([p.region for p in chunk])).to(dev)
                mask_input = region_mask_inputs(regions, predictor.input_size, self.model.image_encoder.img_size,
                                                self.model.prompt_encoder.mask_input_size, cfg.mask_logit)
            masks, scores, _ = predictor.predict_torch(coords_t, torch.from_numpy(labels).to(dev), boxes, mask_input,
                                                       multimask_output=True)
            pick = scores.argmax(1)  # SAM's best of its three masks, by its own IoU estimate
            rows = torch.arange(len(chunk), device=dev)
            best_masks.append(masks[rows, pick])
            best_scores.append(scores[rows, pick])
        regions = torch.from_numpy(np.stack([p.region for p in prompts])).to(dev)
        labels = torch.tensor([p.label for p in prompts], device=dev)
        refined, accepted = resolve_prompted(torch.from_numpy(mask).to(dev), labels, regions, torch.cat(best_masks),
                                             torch.cat(best_scores), cfg.accept_iou, shrink=cfg.shrink,
                                             background=self.background)
        return refined.cpu().numpy(), len(prompts), int(accepted.sum())

    def _merge(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, int, int]:
        records = self.generator.generate(image)  # embeds the image once (no crop layers)
        if not records:
            return mask, 0, 0
        segments = torch.from_numpy(np.stack([r["segmentation"] for r in records])).to(self.device)
        refined, assigned = assign_segments(torch.from_numpy(mask).to(self.device), segments, self.cfg.coverage)
        return refined.cpu().numpy(), len(records), int((assigned >= 0).sum())


def _checked_mask(store, item_id: str, image: np.ndarray) -> np.ndarray:
    mask = store.read(item_id).mask
    if mask.shape != image.shape[:2]:
        raise StoreError(f"{store.path}: mask of {item_id} is {mask.shape[1]}x{mask.shape[0]}, "
                         f"its image {image.shape[1]}x{image.shape[0]}")
    return mask  # label values are checked by the store


def run_refine(cfg: RefineConfig, *, masks: str | os.PathLike, data: str | os.PathLike, sam: str,
               weights: str | os.PathLike, out: str | os.PathLike, split: str | None = None,
               missing: Missing = "fail", overwrite: bool = False, resume: bool = False,
               quiet: bool = False) -> RefineResult:
    """Write the refined masks store for every image of the split that the masks store holds.

    Every input is checked (the package, the dataset, the store's classes and ids, the weights
    file and its model type) before OUT is created, so a bad input leaves nothing behind.
    """
    require_segment_anything()
    rank = current_rank()
    dataset = open_dataset(data, split)
    background = 0 if dataset.has_background else None
    store = open_checked(Path(masks), ("masks", "seeds"), dataset, "masks")
    try:
        ids = shard(select_ids(dataset, {"masks": store}, missing), rank)
        device = resolve_device(device_for_rank(cfg.device, rank))
        model = load_sam(sam, weights, device)
        refiner = SamRefiner(model, cfg, background)
        provenance = make_provenance("refine", cfg, {"masks": masks, "data": data, "sam_weights": weights},
                                     dataset=dataset, ids=ids)
        provenance["options"]["sam"] = sam
        written = skipped = n_prompts = n_accepted = 0
        with output_store(Path(out), "masks", dataset.classes, provenance=provenance, overwrite=overwrite,
                          resume=resume) as writer:
            for item_id in track(ids, f"refine ({cfg.mode}, sam {sam})", quiet=quiet or not rank.is_main):
                if item_id in writer:
                    skipped += 1
                    continue
                image = dataset.image(item_id)
                mask = _checked_mask(store, item_id, image)
                refined, n, k = refiner(image, mask)
                attrs = {"image_size": list(mask.shape), "sam_masks": n, "sam_accepted": k}
                writer.write(item_id, {"mask": refined.astype(np.uint8)}, {"mask": attrs})
                written, n_prompts, n_accepted = written + 1, n_prompts + n, n_accepted + k
    finally:
        store.close()
    logger.info("refined %d masks (%d already there); %d of %d SAM masks used", written, skipped, n_accepted, n_prompts)
    return RefineResult(Path(out), written, skipped, n_prompts, n_accepted)
