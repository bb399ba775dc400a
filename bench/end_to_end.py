"""The default pipeline end to end on VOC-size real photos: `dhr seed` + `dhr propagate` (CRF on).

    python bench/end_to_end.py --out bench_out/end_to_end                 # 200 images 500x375
    python bench/end_to_end.py --out /tmp/e2e --images 40                 # quick

Images are bench/real_data.py's composites of real photographs (500 x 375, VOC's class names;
Debian tuxpaint-stamps-default + opencv-doc + scikit-image photos). The CAMs, USS and WSS maps
are simulated from the ground truth (dhr_cli.testing.synthetic: CAMs that bleed into touching
objects, noisy class embeddings) on the grids real networks give (CAMs stride 16, USS stride 8,
WSS stride 16): the speed of Steps 1-3 does not depend on what the numbers mean, the CRF's does
depend on the photo, which is real here. Both commands run as a user runs them (fresh
processes, start-up included, default settings, `--device auto`: the CPU here).

Reports img/s of each command and of the pipeline (start-up included), the fixed cost of the two
commands (each rerun with nothing left to do) and the rate past it, and the extrapolated time of
VOC train_aug (10,582 images) and COCO train (82,081): the fixed cost once plus each image at the
rate past start-up. Writes OUT/end_to_end.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

VOC_TRAIN_AUG = 10_582
COCO_TRAIN = 82_081


def build(root: Path, images: int, seed: int = 0) -> Path:
    """Real composites plus simulated cams / uss / wss stores beside them."""
    from PIL import Image

    import real_data
    from dhr_cli.io.datasets import open_dataset
    from dhr_cli.io.provenance import make_provenance
    from dhr_cli.io.store import create_store
    from dhr_cli.testing.synthetic import simulate_cams, simulate_features

    data = real_data.build_real_dataset(root, n_images=images, seed=seed, include_voc=False)
    ds = open_dataset(data)
    rng = np.random.default_rng(seed)
    n = len(ds.classes)
    uss_emb = rng.normal(0, 1, (n, 64)).astype(np.float32)
    wss_emb = rng.normal(0, 1, (n, 128)).astype(np.float32)
    prov = make_provenance("bench/end_to_end.py", {"note": "simulated CAMs and features on real photos"})
    with create_store(data / "cams.h5", "cams", ds.classes, provenance=prov, overwrite=True) as cams, \
            create_store(data / "uss.h5", "features", ds.classes, provenance=prov, overwrite=True,
                         root_attrs={"source": "simulated"}) as uss, \
            create_store(data / "wss.h5", "features", ds.classes, provenance=prov, overwrite=True,
                         root_attrs={"source": "simulated"}) as wss:
        for item_id in ds.ids:
            gt = np.asarray(Image.open(data / "masks" / f"{item_id}.png"))
            labels = sorted(set(np.unique(gt).tolist()) - {0, 255})
            size = {"image_size": list(gt.shape)}
            c = simulate_cams(gt, labels, rng, 16)
            cams.write(item_id, {"cams": c.astype(np.float16)}, {"cams": {"labels": labels, **size}})
            uss.write(item_id, {"features": simulate_features(gt, uss_emb, rng, 8, 0.6, 0.0).astype(np.float16)},
                      {"features": size})
            wss.write(item_id, {"features": simulate_features(gt, wss_emb, rng, 16, 1.0, 0.6).astype(np.float16)},
                      {"features": size})
    return data


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench_out/end_to_end"))
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--keep", action="store_true", help="keep the dataset and stores")
    ap.add_argument("--reuse", action="store_true", help="time the commands on OUT/data as an earlier --keep run left it")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "data" if args.reuse else build(args.out / "data", args.images)
    n = len(json.loads((data / "labels.json").read_text()))
    dhr = str(Path(sys.executable).with_name("dhr"))
    seed = [dhr, "seed", "--cams", str(data / "cams.h5"), "--data", str(data), "--out", str(args.out / "seeds.h5"),
            "--quiet", "--overwrite"]
    prop = [dhr, "propagate", "--seeds", str(args.out / "seeds.h5"), "--data", str(data), "--uss", str(data / "uss.h5"),
            "--wss", str(data / "wss.h5"), "--cams", str(data / "cams.h5"), "--out", str(args.out / "masks.h5"),
            "--quiet", "--overwrite"]
    t_seed = wall(seed)
    t_prop = wall(prop)
    t_start = wall([sys.executable, "-c", "import torch, dhr_cli.cli"])  # start-up floor of one command
    # Each command once more with nothing left to do (`--resume` over its own complete output): its
    # start-up and input checks, paid once per run whatever the dataset size.
    fixed = sum(wall([a for a in cmd if a != "--overwrite"] + ["--resume"]) for cmd in (seed, prop))
    total = t_seed + t_prop
    rate = n / total
    per_image = max(total - fixed, 1e-9) / n  # seconds an image past start-up

    def hours(images: int) -> float:
        return (fixed + images * per_image) / 3600

    result = {"images": n, "image_size": [375, 500], "seed_s": t_seed, "propagate_s": t_prop,
              "seed_img_s": n / t_seed, "propagate_img_s": n / t_prop, "pipeline_img_s": rate,
              "startup_s_per_command": t_start, "fixed_s_both_commands": fixed,
              "pipeline_img_s_past_startup": 1 / per_image,
              "voc_train_aug_min": hours(VOC_TRAIN_AUG) * 60, "coco_train_h": hours(COCO_TRAIN)}
    (args.out / "end_to_end.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    if not (args.keep or args.reuse):
        shutil.rmtree(data, ignore_errors=True)
        for f in ("seeds.h5", "masks.h5"):
            (args.out / f).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
