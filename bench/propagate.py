"""Propagation benchmark (`dhr propagate`, Steps 2-3): throughput and peak memory on VOC-like inputs.

Inputs have the sizes of PASCAL VOC with the authors' models: 375x500 images, USS features of
90 dimensions on a 27x36 grid (STEGO/CAUSE, ViT-S/8 at 224 scaled), two WSS maps of 256
dimensions (C4 on a 24x32 grid, C5 on a 12x16 grid); scenes with background covering most
pixels, one to four objects of very different sizes, some of whose classes share a USS group
(so Step 3 runs), 255 on object borders. They are simulated, not network outputs: speed does
not depend on what the numbers mean.

1. Throughput (images/s, CPU unless --device says otherwise), measured in one run on the
   same items: the batched kernels (dhr_cli.kernels.propagate.propagate_items, --batch-size images
   at a time) with and without the CRF, the same kernels one image at a time, and the
   per-image reference implementation of docs/method.md (dhr_cli/testing/oracle.py). Target: batched >= 5x
   the per-image path without the CRF. The batched and per-image masks are compared too.
   Timings are the best of --rounds interleaved rounds (a shared machine stalls torch's thread
   pool far more than the single-threaded reference); the batched path is also timed on one
   thread, like the reference.
2. Peak memory and throughput of the whole command (`run_propagate` reading the stores in its
   loader processes, writing the masks store) on 100 vs 1000 items, each in a fresh process
   (peak RSS of that process, VmHWM; the loaders' peak separately): streaming means flat.

    python bench/propagate.py --out bench_out/propagate            # writes propagate.json
    python bench/propagate.py --out /tmp/p --items 16 --mem-items 20 50   # quick
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.oracle, when run from anywhere

H, W = 375, 500
USS = (90, 27, 36)
WSS = [(256, 24, 32), (256, 12, 16)]
N_CLASSES = 21  # VOC: background + 20
GROUPS = {c: c % 7 for c in range(1, N_CLASSES)}  # 20 classes in 7 USS groups (person, animals, vehicles, ...)


# ---- VOC-like inputs ------------------------------------------------------------------------
class Embeddings:
    """Class embeddings: USS knows groups (classes of a group nearly alike), WSS knows classes."""

    def __init__(self, rng: np.random.Generator):
        group = rng.normal(0, 1, (8, USS[0]))
        self.uss = np.stack([group[7]] + [group[GROUPS[c]] + 0.2 * rng.normal(0, 1, USS[0]) for c in range(1, N_CLASSES)])
        self.wss = [rng.normal(0, 1, (N_CLASSES, d)) for d, _, _ in WSS]


def make_item(rng: np.random.Generator, emb: Embeddings) -> dict:
    """One image's inputs: gt (H, W), seed (H, W) uint8, uss, wss (float16), labels."""
    gt = np.zeros((H, W), np.uint8)
    yy, xx = np.mgrid[0:H, 0:W]
    n_obj = int(rng.integers(1, 5))
    classes = rng.choice(np.arange(1, N_CLASSES), size=n_obj, replace=False)
    if n_obj > 1 and rng.random() < 0.5:  # a second object from the first one's USS group
        same = [c for c in range(1, N_CLASSES) if GROUPS[c] == GROUPS[int(classes[0])] and c != classes[0]]
        classes[1] = rng.choice(same)
    cy, cx = rng.uniform(0.3, 0.7) * H, rng.uniform(0.3, 0.7) * W
    for k, c in enumerate(classes):
        scale = 0.3 if k == 0 else rng.uniform(0.05, 0.15)  # one large object, small ones
        ry, rx = scale * H, scale * W * rng.uniform(0.6, 1.2)
        if k > 0:  # small objects touch the large one
            ang = rng.uniform(0, 2 * np.pi)
            oy, ox = cy + 0.3 * H * np.sin(ang), cx + 0.3 * W * np.cos(ang)
        else:
            oy, ox = cy, cx
        gt[((yy - oy) / ry) ** 2 + ((xx - ox) / rx) ** 2 <= 1] = c
    seed = gt.copy()
    edge = np.zeros_like(gt, bool)
    edge[2:] |= gt[2:] != gt[:-2]
    edge[:, 2:] |= gt[:, 2:] != gt[:, :-2]
    seed[edge] = 255
    seed[rng.random((H, W)) < 0.02] = 255
    labels = sorted(int(c) for c in np.unique(gt) if c != 0)

    def grid_features(table: np.ndarray, grid: tuple[int, int], noise: float) -> np.ndarray:
        iy = (np.arange(grid[0]) + 0.5) * H / grid[0]
        ix = (np.arange(grid[1]) + 0.5) * W / grid[1]
        cells = gt[iy.astype(int)[:, None], ix.astype(int)[None, :]]
        f = table[cells] + noise * rng.normal(0, 1, (*grid, table.shape[1]))
        return np.ascontiguousarray(f.transpose(2, 0, 1)).astype(np.float16)

    uss = grid_features(emb.uss, USS[1:], 0.5)
    wss = [grid_features(t, (h, w), 1.0) for t, (_, h, w) in zip(emb.wss, WSS)]
    image = np.full((H, W, 3), 110, np.uint8)
    image[gt > 0] = (40 + 9 * gt[gt > 0, None]).astype(np.uint8)
    return {"gt": gt, "seed": seed, "uss": uss, "wss": wss, "labels": labels, "image": image}


# ---- 1. throughput --------------------------------------------------------------------------
def _to_items(batch: list[dict], device: torch.device, with_image: bool):
    from dhr_cli.kernels.propagate import PropagateItem

    return [PropagateItem(seed=torch.from_numpy(b["seed"]).to(device),
                          uss=torch.from_numpy(b["uss"]).to(device), wss=[torch.from_numpy(w).to(device) for w in b["wss"]],
                          labels=b["labels"],
                          image=torch.from_numpy(b["image"].transpose(2, 0, 1).copy()).to(device) if with_image else None)
            for b in batch]


def _timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def throughput(items: list[dict], batch_size: int, device: torch.device, marginals: str, rounds: int = 3) -> dict:
    from dhr_cli.config import PropagateConfig
    from dhr_cli.kernels.propagate import propagate_items
    from dhr_cli.testing import oracle

    cfg = PropagateConfig(use_crf=False, marginals=marginals, recover_missing=False)
    n = len(items)
    out: dict = {"items": n, "batch_size": batch_size, "device": str(device), "marginals": marginals,
                 "torch_threads": torch.get_num_threads(), "rounds": rounds}
    batched_masks: list[np.ndarray] = []

    def batched():
        batched_masks.clear()
        with torch.no_grad():
            for s in range(0, n, batch_size):
                batched_masks.extend(m.cpu().numpy() for m in propagate_items(_to_items(items[s : s + batch_size], device, False), cfg))

    def one_by_one():
        with torch.no_grad():
            for it in items:
                propagate_items(_to_items([it], device, False), cfg)

    oracle_masks: list[np.ndarray] = []

    def reference():
        oracle_masks.clear()
        for it in items:
            oracle_masks.append(oracle.propagate(it["seed"], it["uss"].astype(np.float32),
                                                 [w.astype(np.float32) for w in it["wss"]], it["labels"],
                                                 marginals=marginals, recover=False))

    # Interleaved rounds, best of each: the machine may be shared, and a busy core stalls
    # torch's thread pool far more than the single-threaded reference.
    batched()  # warm-up (allocator, lazy imports)
    t_batched = t_single = t_oracle = float("inf")
    for _ in range(rounds):
        t_batched = min(t_batched, _timed(batched))
        t_single = min(t_single, _timed(one_by_one))
        t_oracle = min(t_oracle, _timed(reference))
    out["batched_no_crf_img_s"] = n / t_batched
    out["kernels_one_image_at_a_time_img_s"] = n / t_single
    out["per_image_oracle_img_s"] = n / t_oracle
    out["speedup_vs_oracle"] = t_oracle / t_batched
    out["speedup_vs_one_at_a_time"] = t_single / t_batched
    if device.type == "cpu" and torch.get_num_threads() > 1:  # the same on one core, like the reference
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            t_one = min(_timed(batched) for _ in range(rounds))
        finally:
            torch.set_num_threads(threads)
        out["batched_one_thread_img_s"] = n / t_one
        out["speedup_vs_oracle_one_thread"] = t_oracle / t_one
    diff = [float((a != b).mean()) for a, b in zip(batched_masks, oracle_masks)]
    out["pixels_differing_from_oracle"] = float(np.mean(diff))
    out["step3_share"] = _step3_share(items, cfg)
    try:
        from dhr_cli.kernels.crf import crf_function

        crf = crf_function(cfg.crf)
    except Exception as e:  # the CRF kernel is optional at this point
        out["batched_with_crf_img_s"] = None
        out["crf_note"] = f"CRF unavailable: {e}"
        return out
    crf_items = items[: max(batch_size, min(n, 16))]

    def with_crf():
        with torch.no_grad():
            for s in range(0, len(crf_items), batch_size):
                propagate_items(_to_items(crf_items[s : s + batch_size], device, True), cfg, crf=crf)

    with_crf()
    out["batched_with_crf_img_s"] = len(crf_items) / _timed(with_crf, 1)
    return out


def _step3_share(items: list[dict], cfg) -> float:
    """Share of images where some USS group holds more than one class (Step 3 runs)."""
    hits = 0
    for it in items:
        present = [c for c in it["labels"]]
        hits += len({GROUPS[c] for c in present}) < len(present)
    return hits / len(items)


# ---- 2. peak memory of the command ----------------------------------------------------------
def write_dataset(root: Path, n: int, seed: int = 0) -> None:
    """Flat dataset + seeds / USS / WSS stores with n VOC-like items (images are flat colour)."""
    from PIL import Image

    from dhr_cli.io.store import create_store

    classes = ["background"] + [f"class{c:02d}" for c in range(1, N_CLASSES)]
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "splits").mkdir(exist_ok=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    rng = np.random.default_rng(seed)
    emb = Embeddings(rng)
    labels, ids = {}, []
    kw = dict(provenance={"command": "bench/propagate.py"}, overwrite=True)
    with create_store(root / "seeds.h5", "seeds", classes, **kw) as seeds, \
         create_store(root / "uss.h5", "features", classes, root_attrs={"source": "bench"}, **kw) as uss, \
         create_store(root / "wss0.h5", "features", classes, root_attrs={"source": "bench"}, **kw) as wss0, \
         create_store(root / "wss1.h5", "features", classes, root_attrs={"source": "bench"}, **kw) as wss1:  # fmt: skip
        for i in range(n):
            item = make_item(rng, emb)
            item_id = f"img{i:05d}"
            ids.append(item_id)
            Image.fromarray(item["image"]).save(root / "images" / f"{item_id}.png")
            labels[item_id] = [classes[c] for c in item["labels"]]
            attrs = {"features": {"image_size": [H, W]}}
            seeds.write(item_id, {"mask": item["seed"]})
            uss.write(item_id, {"features": item["uss"]}, attrs)
            wss0.write(item_id, {"features": item["wss"][0]}, attrs)
            wss1.write(item_id, {"features": item["wss"][1]}, attrs)
    (root / "labels.json").write_text(json.dumps(labels))
    (root / "splits" / "all.txt").write_text("\n".join(ids) + "\n")


def _child(root: str, n: int, out: str, batch_size: int) -> None:
    from dhr_cli.config import PropagateConfig
    from dhr_cli.pipeline.propagate import run_propagate

    r = Path(root)
    ids = (r / "splits" / "all.txt").read_text().split()[:n]
    (r / "splits" / f"first{n}.txt").write_text("\n".join(ids) + "\n")
    cfg = PropagateConfig(use_crf=False, batch_size=batch_size, device="cpu")
    t0 = time.perf_counter()
    run_propagate(cfg, seeds=r / "seeds.h5", data=r, uss=r / "uss.h5", wss=[r / "wss0.h5", r / "wss1.h5"],
                  out=Path(out), split=f"first{n}", overwrite=True, quiet=True)
    took = time.perf_counter() - t0
    # ru_maxrss survives exec on Linux: a child started from a large parent reports the parent's
    # size. VmHWM (this process's own peak) does not; loader workers are forked from this child,
    # so their peaks count the pages they share with it.
    print(json.dumps({"maxrss_mb": _peak_rss_mb(),
                      "children_maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                      "seconds": took, "img_s": n / took}))


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory(counts: list[int], tmp: Path, batch_size: int) -> dict:
    write_dataset(tmp / "data", max(counts))
    result = {}
    for n in counts:
        proc = subprocess.run([sys.executable, __file__, "--child", str(tmp / "data"), str(n), str(tmp / f"m{n}.h5"),
                               str(batch_size)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"child for {n} items failed:\n{proc.stderr[-3000:]}")
        result[str(n)] = json.loads(proc.stdout.strip().splitlines()[-1])
    lo, hi = result[str(min(counts))], result[str(max(counts))]
    result["growth"] = hi["maxrss_mb"] / lo["maxrss_mb"]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=False, default=Path("bench_out/propagate"))
    parser.add_argument("--items", type=int, default=48, help="items for the throughput comparison")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (best kept)")
    parser.add_argument("--mem-items", type=int, nargs="*", default=[100, 1000], help="item counts of the memory test")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], int(args.child[1]), args.child[2], int(args.child[3]))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    emb = Embeddings(rng)
    items = [make_item(rng, emb) for _ in range(args.items)]
    result = {"inputs": {"image": [H, W], "uss": list(USS), "wss": [list(w) for w in WSS]}}
    for marginals in ("uniform", "seeded"):
        result[f"throughput_{marginals}"] = t = throughput(items, args.batch_size, device, marginals, args.rounds)
        print(f"[{marginals}] batched {t['batched_no_crf_img_s']:.1f} img/s, one at a time "
              f"{t['kernels_one_image_at_a_time_img_s']:.1f}, per-image oracle {t['per_image_oracle_img_s']:.1f} "
              f"(x{t['speedup_vs_oracle']:.1f}); with CRF {t['batched_with_crf_img_s']}; "
              f"{100 * t['pixels_differing_from_oracle']:.4f}% pixels differ from the oracle", flush=True)
    if args.mem_items:
        with tempfile.TemporaryDirectory() as tmp:
            result["peak_memory"] = m = peak_memory(sorted(args.mem_items), Path(tmp), args.batch_size)
        print("whole command (run_propagate, stores in and out, no CRF): "
              + ", ".join(f"{k} items {v['img_s']:.1f} img/s, peak {v['maxrss_mb']:.0f} MB (loaders "
                          f"{v['children_maxrss_mb']:.0f} MB)" for k, v in m.items() if k != "growth")
              + f"; memory growth x{m['growth']:.2f}", flush=True)
    result["target_5x_met"] = result["throughput_uniform"]["speedup_vs_oracle"] >= 5
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "propagate.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'propagate.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
