"""COCO-like scale benchmark for `dhr eval`: peak RSS and masks/s at two item counts.

Builds a flat dataset (81 classes, 1-5 present per image, HxW masks as GT PNGs) and a masks
store of the same items (a few pixels perturbed), then runs run_eval in a fresh process per N.
Flat memory means peak RSS barely moves from N1 to N2.

    .venv/bin/python bench/scale.py --n 500 2000 --size 480 640
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
from PIL import Image


def build(root: Path, n: int, h: int, w: int, k: int) -> Path:
    from dhr_cli.io.store import create_store

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("\n".join(["background"] + [f"c{i}" for i in range(1, k)]) + "\n")
    rng = np.random.default_rng(0)
    img = np.zeros((h, w, 3), np.uint8)
    with create_store(root / "pred.h5", "masks", ["background"] + [f"c{i}" for i in range(1, k)], provenance={}) as wr:
        for i in range(n):
            m = np.zeros((h, w), np.uint8)
            for c in rng.choice(np.arange(1, k), rng.integers(1, 6), replace=False):
                y, x = rng.integers(0, h - 100), rng.integers(0, w - 100)
                m[y:y + 100, x:x + 100] = c
            Image.fromarray(img).save(root / "images" / f"{i:012d}.png", compress_level=0)
            Image.fromarray(m).save(root / "masks" / f"{i:012d}.png")
            p = m.copy()
            p[::7, ::5] = 0
            wr.write(f"{i:012d}", {"mask": p})
    return root


def child(root: str) -> None:
    from dhr_cli.pipeline.evaluate import run_eval

    t = time.perf_counter()
    r = run_eval([Path(root) / "pred.h5"], root, quiet=True)
    dt = time.perf_counter() - t
    n = len(r.methods[0].ids)
    print(json.dumps({"images": n, "s": dt, "masks_per_s": n / dt, "miou": r.methods[0].miou,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[500, 2000])
    ap.add_argument("--size", type=int, nargs=2, default=[480, 640])
    ap.add_argument("--classes", type=int, default=81)
    ap.add_argument("--child")
    a = ap.parse_args()
    if a.child:
        return child(a.child)
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.n:
            root = build(Path(tmp) / f"n{n}", n, *a.size, a.classes)
            out = subprocess.run([sys.executable, __file__, "--child", str(root)], capture_output=True, text=True, check=True)
            print(f"N={n} K={a.classes}", out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
