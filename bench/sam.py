"""Seconds per image of `dhr refine --sam` (vit_b at 1024 px, random weights), split into the
image embedding and the prompt decoding.

The weights are random (no SAM weights file may be downloaded here), so the masks mean nothing
but the arithmetic, and so the time, is that of the real model. The image is a procedural scene
of 1024 x 768 (dhr_cli.testing.synthetic) with its ground truth as the mask to refine.

    python bench/sam.py --out bench_out/sam [--images 1] [--model vit_b] [--device cpu] [--merge]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _timed(fn):
    t0 = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench_out/sam"))
    parser.add_argument("--images", type=int, default=1, help="images timed per mode (the vit_b embedding is ~13 s on 2 CPU cores)")
    parser.add_argument("--model", default="vit_b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--merge", action="store_true", help="also time --mode merge (SamAutomaticMaskGenerator, 32 x 32 points)")
    parser.add_argument("--points-per-side", type=int, default=32)
    args = parser.parse_args()

    from segment_anything import SamPredictor, sam_model_registry

    from dhr_cli.config import RefineConfig
    from dhr_cli.kernels.prompts import mask_prompts
    from dhr_cli.models.sam import load_sam
    from dhr_cli.pipeline.refine import SamRefiner
    from dhr_cli.testing.synthetic import SceneSpec, make_scene

    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    scenes = [make_scene(rng, SceneSpec(height=768, width=1024)) for _ in range(args.images)]
    scenes = [(image, np.where(gt == 255, 0, gt).astype(np.uint8)) for image, gt in scenes]
    figures: dict = {"model": args.model, "device": str(device), "image": "1024x768 (long side = SAM's 1024 input)",
                     "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "weights": "random (speed only)"}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"sam_{args.model}_random.pth"
        torch.manual_seed(0)
        torch.save(sam_model_registry[args.model](checkpoint=None).state_dict(), path)
        figures["weights_file_mb"] = round(path.stat().st_size / 2**20, 1)
        model, figures["load_s"] = _timed(lambda: load_sam(args.model, path, device))
    predictor = SamPredictor(model)
    cfg = RefineConfig(mode="prompt", accept_iou=0.5, device=args.device)
    refiner = SamRefiner(model, cfg, background=0)
    predictor.set_image(scenes[0][0])  # warm-up (first-call allocations)
    embed, decode, prompts_per_image = [], [], []
    for image, mask in scenes:
        _, t_embed = _timed(lambda: refiner.predictor.set_image(image))
        embed.append(t_embed)
        # The same refiner with this image's embedding already set: what remains is prompt
        # geometry, batched decoding at full resolution and the merge.
        set_image, refiner.predictor.set_image = refiner.predictor.set_image, lambda *a: None
        try:
            _, t_decode = _timed(lambda: refiner(image, mask))
        finally:
            refiner.predictor.set_image = set_image
        decode.append(t_decode)
        prompts_per_image.append(len(mask_prompts(mask, cfg.prompts)))
    # Decoding alone, per prompt, for a batch of 32 boxes + 4 points (as --prompt-batch batches them).
    h, w = scenes[0][0].shape[:2]
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(32, 2, generator=gen) * torch.tensor([w / 2, h / 2])
    boxes = torch.cat([xy, xy + torch.tensor([w / 2, h / 2])], 1).to(device)
    points = (xy[:, None] + torch.rand(32, 4, 2, generator=gen) * torch.tensor([w / 2, h / 2])).to(device)
    labels = torch.tensor([1, 1, 1, 0]).repeat(32, 1).to(device)
    tr = refiner.predictor.transform
    run = lambda: refiner.predictor.predict_torch(tr.apply_coords_torch(points, (h, w)), labels,  # noqa: E731
                                                  tr.apply_boxes_torch(boxes, (h, w)), multimask_output=True)
    run()
    _, t_batch = _timed(run)
    figures["prompt"] = {"images": len(scenes), "embedding_s": round(statistics.mean(embed), 2),
                         "prompts_per_image": statistics.mean(prompts_per_image),
                         "decode_and_merge_s": round(statistics.mean(decode), 3),
                         "seconds_per_image": round(statistics.mean(embed) + statistics.mean(decode), 2),
                         "decode_ms_per_prompt_batch32": round(1000 * t_batch / 32, 1)}
    if args.merge:
        merge = SamRefiner(model, RefineConfig(mode="merge", points_per_side=args.points_per_side, device=args.device), 0)
        times = [_timed(lambda: merge(image, mask))[1] for image, mask in scenes]
        figures["merge"] = {"images": len(scenes), "points_per_side": args.points_per_side,
                            "seconds_per_image": round(statistics.mean(times), 2),
                            "beyond_embedding_s": round(statistics.mean(times) - statistics.mean(embed), 2)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sam.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
