"""COCO-like scale benchmark: `dhr eval` masks/s and peak RSS at two item counts, three GT sources,
and peak RSS / time per item of `dhr info`, `dhr export`, `dhr merge` on the same stores.

For each N it builds, in a temporary folder (images are hard links to one small JPEG: eval reads
only their headers, the COCO reader only checks that they exist):

    flat/   classes.txt (background + the 80 COCO names), images/, masks/<id>.png   GT as PNGs
    coco/   annotations/instances_train2014.json (1-5 rectangles per image as polygons, the
            official category ids), train2014/                                     GT rasterised
    pred.h5 a masks store of the same ids (the GT with a pixel grid perturbed)

then runs, each in a fresh process (so peak RSS is the command's own):

    gt_*         the GT source alone (every ds.gt(id), no scoring) for each of the three below
    eval png     run_eval(pred.h5, flat/)                     PNG decode per image
    eval coco    run_eval(pred.h5, coco/), no cache           pycocotools rasterisation per image
    build cache  `dhr info coco/ --build-cache`               (timed once)
    eval cache   run_eval(pred.h5, coco/) with the GT cache   HDF5 read per image
    info / export / merge   `dhr info pred.h5`, `dhr export pred.h5 --out DIR`,
                            `dhr merge pred.h5 one.h5 --out M.h5`
    seed         `dhr seed --no-crf` on stride-16 CAMs of the present classes (only with --what seed;
                 its loader processes' peak is loader_peak_rss_mb); seed-crf the same with the CRF
    propagate    `dhr propagate --no-crf` (Steps 2-3) on those seeds, with stride-16 USS features
                 (90 x 30 x 40, fp16) and WSS features (256 x 30 x 40) simulated from class
                 embeddings plus noise, and the CAMs; propagate-crf the same with the CRF
                 (the images are one black JPEG: the CRF's permutohedral cost does not depend on colours)
    Each seed/propagate figure gives img_per_s and coco_train_h, the time for COCO train's 82,081 images.
    index        (once, not per N) an instances json of COCO train's size (82,783 images, 604,907
                 polygons of 30 points, ~370 MB): time and peak RSS of reading the image index from it
                 (pycocotools) vs from a GT cache's coco_index group, each in a fresh process

Flat memory means peak RSS barely moves from N1 to N2; flat time means s/item barely moves.

    .venv/bin/python bench/scale.py --n 2000 20000 --size 480 640 --out bench_out/scale.json
    .venv/bin/python bench/scale.py --n 2000 20000 --what gt eval-cache info export merge   # ~30 min on 2 cores
    .venv/bin/python bench/scale.py --n 200 1000 --size 120 160      # quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

SPLIT = "train2014"
COCO_TRAIN = 82_081
FEATURE_STAGES = ("propagate", "propagate-crf")


def _names() -> list[str]:
    from dhr_cli.io.coco import class_list

    return class_list("coco80")


def _official_ids() -> list[int]:
    unused = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
    return [i for i in range(1, 91) if i not in unused]


def build(root: Path, n: int, h: int, w: int, cams: bool = False, features: bool = False) -> Path:
    from dhr_cli.io.store import create_store

    names = _names()
    classes = ["background"] + names
    cat_ids = _official_ids()
    flat, coco = root / "flat", root / "coco"
    for d in (flat / "images", flat / "masks", coco / "annotations", coco / SPLIT):
        d.mkdir(parents=True)
    (flat / "classes.txt").write_text("\n".join(classes) + "\n")
    jpeg = root / "one.jpg"
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(jpeg, quality=50)
    rng = np.random.default_rng(0)
    images, anns = [], []
    side = max(8, min(h, w) // 5)
    cam_writer = create_store(root / "cams.h5", "cams", classes, provenance={}) if cams or features else None
    feat_writers = [create_store(root / f"{role}.h5", "features", classes, provenance={}) for role in ("uss", "wss")] \
        if features else []
    uss_table = rng.normal(0, 1, (len(classes), 90)).astype(np.float32)  # class embeddings
    wss_table = rng.normal(0, 1, (len(classes), 256)).astype(np.float32)
    with create_store(root / "pred.h5", "masks", classes, provenance={}) as wr:
        for i in range(n):
            item = f"COCO_{SPLIT}_{i:012d}"
            m = np.zeros((h, w), np.uint8)
            images.append({"id": i, "file_name": f"{item}.jpg", "height": h, "width": w})
            for c in rng.choice(np.arange(1, 81), rng.integers(1, 6), replace=False):
                y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
                m[y:y + side, x:x + side] = c
                anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat_ids[c - 1], "iscrowd": 0,
                             "area": side * side, "bbox": [x, y, side, side],
                             "segmentation": [[x, y, x + side, y, x + side, y + side, x, y + side]]})
            os.link(jpeg, flat / "images" / f"{item}.jpg")
            os.link(jpeg, coco / SPLIT / f"{item}.jpg")
            Image.fromarray(m).save(flat / "masks" / f"{item}.png")
            p = m.copy()
            p[::7, ::5] = 0
            wr.write(item, {"mask": p})
            if cam_writer is not None:  # stride-16 CAMs of the present classes (what `dhr seed` reads)
                present = [c for c in np.unique(m).tolist() if c != 0]
                small = m[8::16, 8::16]
                maps = np.stack([(small == c).astype(np.float16) for c in present])
                cam_writer.write(item, {"cams": maps}, {"cams": {"labels": np.array(present), "image_size": [h, w]}})
            for writer, table, noise in zip(feat_writers, (uss_table, wss_table), (0.5, 1.0)):
                cells = m[8::16, 8::16]
                f = table[cells] + noise * rng.normal(0, 1, (*cells.shape, table.shape[1])).astype(np.float32)
                writer.write(item, {"features": np.ascontiguousarray(f.transpose(2, 0, 1)).astype(np.float16)},
                             {"features": {"image_size": [h, w]}})
    for writer in [cam_writer, *feat_writers]:
        if writer is not None:
            writer.close(complete=True)
    cats = [{"id": cid, "name": name} for cid, name in zip(cat_ids, names)]
    (coco / "annotations" / f"instances_{SPLIT}.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))
    with create_store(root / "one.h5", "masks", classes, provenance={}) as wr:
        wr.write("extra_item", {"mask": np.zeros((h, w), np.uint8)})
    return root


def _peak_mb() -> float:
    """VmHWM: this process's own peak. (ru_maxrss is not: Linux carries the parent's peak across
    fork + exec, which made every child of a 20k-item build report the builder's 140 MB.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_eval(data: str, pred: str) -> None:
    from dhr_cli.pipeline.evaluate import run_eval

    t = time.perf_counter()
    r = run_eval([pred], data, quiet=True)
    dt = time.perf_counter() - t
    n = len(r.methods[0].ids)
    print(json.dumps({"images": n, "s": round(dt, 3), "masks_per_s": round(n / dt, 1),
                      "miou": round(r.methods[0].miou, 4), "peak_rss_mb": round(_peak_mb())}))


def child_gt(data: str) -> None:
    """The GT source alone: every image's ground truth read (PNG decode, rasterisation or cache)."""
    from dhr_cli.io.datasets import open_dataset

    ds = open_dataset(data)
    ds.gt(ds.ids[0])  # opens the cache when there is one
    t = time.perf_counter()
    for item_id in ds.ids:
        ds.gt(item_id)
    dt = time.perf_counter() - t
    print(json.dumps({"images": len(ds), "s": round(dt, 3), "masks_per_s": round(len(ds) / dt, 1),
                      "cache": getattr(ds, "cache_state", None), "peak_rss_mb": round(_peak_mb())}))


def build_big_json(path: Path) -> None:
    rng = np.random.default_rng(0)
    cat_ids = _official_ids()
    n_img, n_ann = 82_783, 604_907
    images = [{"id": i, "file_name": f"COCO_{SPLIT}_{i:012d}.jpg", "height": 480, "width": 640} for i in range(n_img)]
    img_of, cat_of = rng.integers(0, n_img, n_ann), rng.integers(0, 80, n_ann)
    polys = np.round(rng.uniform(0, 480, (n_ann, 60)), 2)
    anns = [{"id": a + 1, "image_id": int(img_of[a]), "category_id": cat_ids[cat_of[a]], "iscrowd": 0, "area": 100.0,
             "bbox": [1.0, 2.0, 3.0, 4.0], "segmentation": [polys[a].tolist()]} for a in range(n_ann)]
    cats = [{"id": cid, "name": name} for cid, name in zip(cat_ids, _names())]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))


def child_index(json_path: str, index_path: str, source: str) -> None:
    """The image index from the json (pycocotools, what a COCO reader did without a cache) or from
    a GT cache's coco_index group (written from the json the first time)."""
    import h5py

    from dhr_cli.io.coco import COCODataset, CocoIndex

    t = time.perf_counter()
    if source == "json":
        ds = COCODataset.__new__(COCODataset)  # only the json reading, no image folder
        ds._coco_obj, ds._json, ds.root = None, Path(json_path), Path(json_path).parent
        index = ds._index_from_json()
        if not Path(index_path).exists():
            with h5py.File(index_path, "w") as f:
                index.write(f)
    else:
        index = CocoIndex.read(Path(index_path))
    dt = time.perf_counter() - t
    print(json.dumps({"images": len(index.file_names), "s": round(dt, 2), "peak_rss_mb": round(_peak_mb())}))


def run_index(tmp: Path) -> dict:
    js, idx = tmp / "instances_big.json", tmp / "index.h5"
    build_big_json(js)
    res = {"json_mb": round(js.stat().st_size / 2**20), "load_before": round(os.getloadavg()[0], 1)}
    res["from_json"] = _child("--child-index", str(js), str(idx), "json")
    res["index_kb"] = round(idx.stat().st_size / 1024)
    res["from_cache"] = _child("--child-index", str(js), str(idx), "cache")
    res["load_after"] = round(os.getloadavg()[0], 1)
    return res


def child_cli(argv: list[str]) -> None:
    from dhr_cli.cli.app import main

    sys.argv = ["dhr", *argv]
    t = time.perf_counter()
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    dt = time.perf_counter() - t
    print(json.dumps({"exit": code, "s": round(dt, 3), "peak_rss_mb": round(_peak_mb()),
                      "loader_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)}))


def _child(*args: str) -> dict:
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_n(tmp: Path, n: int, h: int, w: int, what: list[str]) -> dict:
    t = time.perf_counter()
    seeding = [x for x in what if x.startswith("seed") or x in FEATURE_STAGES]
    root = build(tmp / f"n{n}", n, h, w, cams=bool(seeding), features=any(x in FEATURE_STAGES for x in what))
    res: dict = {"n": n, "build_s": round(time.perf_counter() - t, 1), "load_before": round(os.getloadavg()[0], 1)}
    pred = str(root / "pred.h5")
    flat, coco = str(root / "flat"), str(root / "coco")
    if "gt" in what:
        res["gt_png"] = _child("--child-gt", flat)
        res["gt_coco"] = _child("--child-gt", coco)
    if "eval-png" in what:
        res["eval_png"] = _child("--child-eval", flat, pred)
    if "eval-coco" in what:
        res["eval_coco"] = _child("--child-eval", coco, pred)
    if "gt" in what or "eval-cache" in what:
        res["build_cache"] = _child("--child-cli", "info", coco, "--build-cache", "--quiet")
        cache = root / "coco" / "annotations" / f"instances_{SPLIT}.gt.h5"
        res["build_cache"]["kb_per_item"] = round(cache.stat().st_size / n / 1024, 1)
    if "gt" in what:
        res["gt_cache"] = _child("--child-gt", coco)
    if "eval-cache" in what:
        res["eval_cache"] = _child("--child-eval", coco, pred)
    if "info" in what:
        res["info"] = _child("--child-cli", "info", pred)
    if "export" in what:
        res["export"] = _child("--child-cli", "export", pred, "--out", str(root / "export"), "--quiet")
    if "merge" in what:
        res["merge"] = _child("--child-cli", "merge", pred, str(root / "one.h5"), "--out", str(root / "merged.h5"))
    cams = str(root / "cams.h5")
    if "seed" in what or any(x in FEATURE_STAGES for x in what):  # propagate reads these seeds
        res["seed"] = _child("--child-cli", "seed", "--cams", cams, "--data", flat, "--out",
                             str(root / "seeds.h5"), "--no-crf", "--quiet")
    if "seed-crf" in what:
        res["seed_crf"] = _child("--child-cli", "seed", "--cams", cams, "--data", flat, "--out",
                                 str(root / "seeds_crf.h5"), "--quiet")
    for stage in FEATURE_STAGES:
        if stage in what:
            res[stage.replace("-", "_")] = _child(
                "--child-cli", "propagate", "--seeds", str(root / "seeds.h5"), "--data", flat, "--uss",
                str(root / "uss.h5"), "--wss", str(root / "wss.h5"), "--cams", cams,
                "--out", str(root / f"{stage}.h5"), *(["--no-crf"] if stage == "propagate" else []), "--quiet")
    for key, r in res.items():
        if isinstance(r, dict) and "s" in r:
            r["ms_per_item"] = round(1000 * r["s"] / n, 2)
            if key.startswith(("seed", "propagate")):
                r["img_per_s"] = round(n / r["s"], 2)
                r["coco_train_h"] = round(COCO_TRAIN * r["s"] / n / 3600, 2)
    res["load_after"] = round(os.getloadavg()[0], 1)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[500, 2000])
    ap.add_argument("--size", type=int, nargs=2, default=[480, 640])
    ap.add_argument("--what", nargs="+", default=["gt", "eval-png", "eval-coco", "eval-cache", "info", "export", "merge"],
                    help="gt (the three GT sources alone), eval-png, eval-coco, eval-cache, info, export, merge, "
                         "seed, seed-crf, propagate, propagate-crf, index")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    ap.add_argument("--child-eval", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--child-gt", help=argparse.SUPPRESS)
    ap.add_argument("--child-index", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--child-cli", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child_eval:
        return child_eval(*a.child_eval)
    if a.child_gt:
        return child_gt(a.child_gt)
    if a.child_index:
        return child_index(*a.child_index)
    if a.child_cli is not None:
        return child_cli(a.child_cli)
    results = []
    with tempfile.TemporaryDirectory(prefix="dhr-scale-") as tmp:
        if "index" in a.what:
            r = run_index(Path(tmp))
            results.append({"index": r})
            print(json.dumps({"index": r}), flush=True)
        stages = [w for w in a.what if w != "index"]
        for n in (a.n if stages else []):
            r = run_n(Path(tmp), n, *a.size, stages)
            results.append(r)
            print(json.dumps(r), flush=True)
            import shutil

            shutil.rmtree(Path(tmp) / f"n{n}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"size": a.size, "classes": 81, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
