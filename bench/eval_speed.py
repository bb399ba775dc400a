"""Evaluation speed on the CPU: VOC-size masks (375 x 500, 21 classes).

1. Metrics alone: what `dhr eval` computes per image on masks already in memory (confusion
   matrix, the class-presence histogram for the vanishing rate, the label check), then the
   pooled scores. Target: >= 200 masks/s.
2. End to end: `run_eval` on a flat dataset (GT PNGs) and a masks store (gzip HDF5), so the
   decoding cost is visible next to the metrics.

    python bench/eval_speed.py --out DIR [--n 500] [--n-e2e 100]   ->  DIR/eval_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

H, W, K = 375, 500, 21


def blobs(rng: np.random.Generator, n_objects: int) -> np.ndarray:
    """A VOC-like mask: background, a few rectangles of random classes, 255 borders."""
    m = np.zeros((H, W), np.uint8)
    for _ in range(n_objects):
        c = int(rng.integers(1, K))
        y0, x0 = int(rng.integers(0, H - 60)), int(rng.integers(0, W - 60))
        y1, x1 = y0 + int(rng.integers(40, H - y0 + 1)), x0 + int(rng.integers(40, W - x0 + 1))
        m[y0:y1, x0:x1] = c
        m[y0:y1, [x0, min(x1, W) - 1]] = 255
    return m


def perturb(rng: np.random.Generator, gt: np.ndarray) -> np.ndarray:
    pred = np.where(gt == 255, 0, gt).astype(np.uint8)
    dy, dx = rng.integers(-12, 13, 2)
    pred = np.roll(pred, (int(dy), int(dx)), axis=(0, 1))
    noise = rng.random(gt.shape) < 0.02
    pred[noise] = rng.integers(0, K, int(noise.sum()))
    return pred


def bench_metrics(n: int, seed: int = 0, repeats: int = 3) -> dict:
    from dhr_cli.kernels.metrics import confusion_matrix
    from dhr_cli.pipeline.evaluate import MethodResult

    rng = np.random.default_rng(seed)
    gts = [blobs(rng, int(rng.integers(1, 4))) for _ in range(n)]
    preds = [perturb(rng, g) for g in gts]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        counts, present = [], []
        for g, p in zip(gts, preds):
            hist = np.bincount(p.ravel(), minlength=256)  # label check + presence (as run_eval does)
            assert not hist[K:255].any()
            counts.append(confusion_matrix(g, p, K))
            present.append(hist[:K] > 0)
        fg = np.ones(K, bool)
        fg[0] = False
        m = MethodResult("bench", "-", [str(i) for i in range(K)], fg, [str(i) for i in range(n)], np.stack(counts), np.stack(present))
        miou, rate = m.miou, m.vanishing_rate
        best = min(best, time.perf_counter() - t0)
    return {"masks": n, "seconds": best, "masks_per_s": n / best, "miou": miou, "vanishing_rate": rate, "target_masks_per_s": 200}


def bench_end_to_end(n: int, seed: int = 1) -> dict:
    import h5py

    from dhr_cli.pipeline.evaluate import run_eval

    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        (root / "images").mkdir(parents=True)
        (root / "masks").mkdir()
        (root / "classes.txt").write_text("\n".join(["background"] + [f"c{i}" for i in range(1, K)]) + "\n")
        image = np.full((H, W, 3), 100, np.uint8)
        store = Path(tmp) / "masks.h5"
        with h5py.File(store, "w") as f:
            f.attrs.update({"dhr_format": "dhr.store", "dhr_version": 1, "kind": "masks", "ignore_index": 255, "provenance": "{}"})
            f.attrs["classes"] = json.dumps((root / "classes.txt").read_text().split())
            items = f.create_group("items")
            for i in range(n):
                gt = blobs(rng, int(rng.integers(1, 4)))
                Image.fromarray(image).save(root / "images" / f"{i:06d}.jpg", quality=80)
                Image.fromarray(gt).save(root / "masks" / f"{i:06d}.png")
                items.create_group(f"{i:06d}").create_dataset("mask", data=perturb(rng, gt), compression="gzip", compression_opts=4, chunks=True)
        t0 = time.perf_counter()
        result = run_eval([store], root, quiet=True)
        took = time.perf_counter() - t0
    return {"images": n, "seconds": took, "images_per_s": n / took, "miou": result.methods[0].miou}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=500, help="masks for the metrics-only timing")
    parser.add_argument("--n-e2e", type=int, default=100, help="images for the end-to-end timing")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    metrics = bench_metrics(args.n)
    e2e = bench_end_to_end(args.n_e2e)
    doc = {
        "bench": "eval_speed",
        "mask_size": [H, W],
        "classes": K,
        "metrics_only": metrics,
        "end_to_end": e2e,
        "passes_target": metrics["masks_per_s"] >= metrics["target_masks_per_s"],
        "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()},
    }
    (args.out / "eval_speed.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"metrics only: {metrics['masks_per_s']:.0f} masks/s ({args.n} masks of {W}x{H}, {K} classes; target 200)")
    print(f"end to end (PNG GT + gzip store): {e2e['images_per_s']:.0f} images/s over {args.n_e2e} images")
    return 0 if doc["passes_target"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
