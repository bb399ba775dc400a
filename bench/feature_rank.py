"""`dhr cams --feature-rank`: what the per-image low-rank WSS features cost and change.

    python bench/feature_rank.py --out bench_out/feature_rank [--photos 8] [--ranks 64 128 256]
        [--data ROOT --cams CAMS.h5 --uss USS.h5 [--seeds SEEDS.h5] [--role wss|uss]]

1. Size: ResNet-50 (random weights: no trained ones ship offline) on real photos resized to
   480 x 640 (COCO's typical size): layer3 + layer4 features (3072 x 30 x 40), stored as `dhr cams`
   stores them (float16, gzip 1, fletcher32), bytes per item for each rank and the time of the
   compression; extrapolated to COCO train (82,081 images).
2. Effect (with --data/--cams/--uss, e.g. the stores `make bench-real` leaves in bench_out/real):
   `dhr propagate` (DHR, defaults) with the cams store's WSS features (or, --role uss, the USS
   features) as they are and at each rank;
   pixel agreement of the masks with the full-feature masks, and mIoU of each.
Writes OUT/results.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

COCO_TRAIN = 82_081


def _photos(n: int) -> list[np.ndarray]:
    import skimage.data
    from PIL import Image

    names = ["astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "immunohistochemistry", "retina", "cat"]
    out = []
    for name in names[:n]:
        img = getattr(skimage.data, name)()
        img = img[..., :3] if img.ndim == 3 else np.stack([img] * 3, -1)
        out.append(np.asarray(Image.fromarray(img).convert("RGB").resize((640, 480))))
    return out


def size_part(out: Path, ranks: list[int], n_photos: int) -> list[dict]:
    from dhr_cli.io.provenance import make_provenance
    from dhr_cli.io.store import open_store
    from dhr_cli.io.distributed import output_store
    from dhr_cli.kernels.features import low_rank_features
    from dhr_cli.models.base import IMAGENET_MEAN, IMAGENET_STD
    from dhr_cli.models.resnet_cam import ResNetCAM

    torch.manual_seed(0)
    net = ResNetCAM(depth=50, num_classes=80).eval()
    feats = []
    with torch.no_grad():
        for img in _photos(n_photos):
            x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255
            x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
            feats.append(torch.cat(net.extract(x)["features"], 1)[0])
    rows = []
    for k in [0, *ranks]:
        path = out / f"size_rank{k}.h5"
        t0 = time.perf_counter()
        arrays = [f if k == 0 else low_rank_features(f, k) for f in feats]
        dt = (time.perf_counter() - t0) / len(feats)
        with output_store(path, "features", ["x"], provenance=make_provenance("bench"), overwrite=True) as w:
            for i, a in enumerate(arrays):
                w.write(f"p{i}", {"features": a.numpy().astype(np.float16)}, {"features": {"image_size": [480, 640]}})
        with open_store(path):
            pass
        per_item = path.stat().st_size / len(feats)
        rows.append({"rank": k, "channels": int(arrays[0].shape[0]), "bytes_per_item": per_item,
                     "coco_train_gb": per_item * COCO_TRAIN / 1e9, "compress_ms": 1000 * dt})
        path.unlink()
    return rows


def _rank_copy(cams: Path, out: Path, k: int) -> None:
    """The cams (or features) store with its features at rank k (CAMs and attributes kept)."""
    from dhr_cli.io.distributed import output_store
    from dhr_cli.io.store import open_store
    from dhr_cli.kernels.features import low_rank_features

    with open_store(cams) as src, \
            output_store(out, src.kind, list(src.classes), provenance=src.provenance, overwrite=True,
                         root_attrs={a: src.attrs[a] for a in ("source", "source_kind") if a in src.attrs}) as w:
        for i in src.ids:
            item = src.read(i)
            f = low_rank_features(torch.from_numpy(item.features.astype(np.float32)), k).numpy()
            arrays = dict(item.arrays, features=f.astype(item.features.dtype))
            w.write(i, arrays, item.attrs)


def effect_part(args, out: Path, ranks: list[int]) -> list[dict]:
    from dhr_cli.config import PropagateConfig, SeedConfig
    from dhr_cli.io.store import open_store
    from dhr_cli.pipeline.evaluate import run_eval
    from dhr_cli.pipeline.propagate import run_propagate
    from dhr_cli.pipeline.seed import run_seed

    seeds = args.seeds
    if seeds is None:
        seeds = out / "seeds.h5"
        run_seed(SeedConfig(), args.cams, args.data, seeds, overwrite=True, quiet=True)
    rows, masks = [], {}
    for k in [0, *ranks]:
        stores = {"wss": args.cams, "uss": args.uss}
        if k:
            stores[args.role] = out / f"{args.role}_rank{k}.h5"
            _rank_copy(args.cams if args.role == "wss" else args.uss, stores[args.role], k)
        pred = out / f"masks_rank{k}.h5"
        t0 = time.perf_counter()
        run_propagate(PropagateConfig(), seeds=seeds, data=args.data, uss=stores["uss"], wss=[stores["wss"]],
                      cams=args.cams, out=pred, overwrite=True, quiet=True)
        dt = time.perf_counter() - t0
        with open_store(pred) as s:
            masks[k] = {i: s.read(i).mask for i in s.ids}
        same = sum(int((masks[k][i] == masks[0][i]).sum()) for i in masks[0])
        total = sum(m.size for m in masks[0].values())
        miou = run_eval([pred], args.data).to_json()["miou"]
        rows.append({"rank": k, "pixel_agreement": same / total, "miou": miou, "propagate_s": dt})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench_out/feature_rank"))
    p.add_argument("--ranks", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--photos", type=int, default=4)
    p.add_argument("--data", type=Path)
    p.add_argument("--cams", type=Path)
    p.add_argument("--uss", type=Path)
    p.add_argument("--seeds", type=Path)
    p.add_argument("--role", choices=("wss", "uss"), default="wss", help="which features go to low rank in part 2")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    res = {"size": size_part(args.out, args.ranks, args.photos)}
    print("| rank | channels | KB / item | COCO train GB | compression ms / item |\n|---:|---:|---:|---:|---:|")
    for r in res["size"]:
        print(f"| {r['rank'] or 'all'} | {r['channels']} | {r['bytes_per_item'] / 1024:.0f} | "
              f"{r['coco_train_gb']:.0f} | {r['compress_ms']:.0f} |")
    if args.data and args.cams and args.uss:
        res["effect"] = effect_part(args, args.out, args.ranks)
        print("\n| rank | pixels equal to full | mIoU | propagate s |\n|---:|---:|---:|---:|")
        for r in res["effect"]:
            print(f"| {r['rank'] or 'all'} | {100 * r['pixel_agreement']:.2f} % | {100 * r['miou']:.1f} | "
                  f"{r['propagate_s']:.1f} |")
    (args.out / "results.json").write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
