"""Choose `dhr seed`'s defaults by measurement (docs/method.md step 1.4), and keep the measurement.

On the procedural set (real-photo statistics: background covers most pixels, small objects touch
large ones, CAMs at stride 16 that bleed across touching objects), sweep the background power
and the unsure threshold of the seeds, run DHR propagation on each, and score the final masks;
the bar to beat is the strongest simple baseline, CAM argmax against a tuned constant
background (with the CRF when the CRF kernel is available). The grid is tuned on one dataset
seed and the chosen setting reported on another, so the numbers are not fitted to what they show.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from pathlib import Path

from dhr_cli.config import PropagateConfig, SeedConfig
from dhr_cli.pipeline.evaluate import run_eval
from dhr_cli.pipeline.propagate import run_propagate
from dhr_cli.pipeline.seed import run_seed
from dhr_cli.testing.synthetic import make_dataset


def _miou(pred: Path, data: Path) -> float:
    return float(run_eval([pred], data, split="train", quiet=True).methods[0].miou)


def dhr_score(data: Path, tmp: Path, bg_power: float, confidence: float, crf: bool) -> float:
    seeds, masks = tmp / "s.h5", tmp / "m.h5"
    run_seed(SeedConfig(bg_power=bg_power, confidence=confidence, use_crf=crf), data / "cams.h5", data, seeds,
             split="train", overwrite=True, quiet=True)
    run_propagate(PropagateConfig(use_crf=crf), seeds=seeds, data=data, uss=data / "uss.h5", wss=[data / "wss.h5"],
                  out=masks, cams=data / "cams.h5", split="train", overwrite=True, quiet=True)
    return _miou(masks, data)


def cam_score(data: Path, tmp: Path, threshold: float, crf: bool) -> float:
    seeds, masks = tmp / "s0.h5", tmp / "c.h5"
    if not seeds.exists():
        run_seed(SeedConfig(use_crf=False), data / "cams.h5", data, seeds, split="train", quiet=True)
    run_propagate(PropagateConfig(method="cam", cam_bg_threshold=threshold, use_crf=crf), seeds=seeds, data=data,
                  uss=data / "uss.h5", wss=[data / "wss.h5"], out=masks, cams=data / "cams.h5", split="train",
                  overwrite=True, quiet=True)
    return _miou(masks, data)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n-images", type=int, default=48)
    args = p.parse_args()
    try:
        import dhr_cli.kernels.crf  # noqa: F401
        crf = True
    except ImportError:
        crf = False
    powers, confidences, thresholds = [1.0, 2.0, 3.0, 4.0, 6.0], [0.4, 0.5, 0.6, 0.7], [0.1, 0.2, 0.3, 0.4, 0.5]
    result: dict = {"crf": crf, "n_images": args.n_images}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        tune = make_dataset(tmp / "tune", n_images=args.n_images, seed=101)
        test = make_dataset(tmp / "test", n_images=args.n_images, seed=202)
        grid = {f"{bp}/{c}": dhr_score(tune, tmp, bp, c, crf) for bp, c in itertools.product(powers, confidences)}
        best = max(grid, key=grid.get)
        cams = {str(t_): cam_score(tune, tmp, t_, crf) for t_ in thresholds}
        best_t = max(cams, key=cams.get)
        bp, conf = map(float, best.split("/"))
        (tmp / "s0.h5").unlink(missing_ok=True)
        result.update({
            "tune_dhr_miou_by_bgpower_confidence": grid,
            "tune_cam_miou_by_threshold": cams,
            "chosen": {"bg_power": bp, "confidence": conf, "cam_bg_threshold": float(best_t)},
            "test_dhr_miou": dhr_score(test, tmp, bp, conf, crf),
            "test_cam_baseline_miou": cam_score(test, tmp, float(best_t), crf),
            "test_dhr_miou_at_current_defaults": dhr_score(test, tmp, SeedConfig().bg_power, SeedConfig().confidence, crf),
        })
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "seed_defaults.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("tune")}, indent=2))


if __name__ == "__main__":
    main()
