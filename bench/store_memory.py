"""Store benchmark: peak memory vs item count (streaming) and the choice of HDF5 compression.

1. Peak RSS of writing then reading back N small items, in a fresh process per N
   (1k vs 10k by default): streaming means the two agree within 10 %.
2. Compression settings on VOC-like items (a 375x500 uint8 mask, a 90x27x36 float16 USS
   feature map): file size, write and read time per item. dhr uses the winner in
   `store.dataset_kwargs`.
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

import h5py
import numpy as np


def _child(n: int, path: str) -> None:
    from dhr_cli.io.store import create_store, open_store

    rng = np.random.default_rng(0)
    feats = rng.random((16, 8, 8)).astype(np.float16)
    with create_store(Path(path), "features", ["background", "x"], provenance={}, overwrite=True) as w:
        for i in range(n):
            w.write(f"img{i:06d}", {"features": feats}, {"features": {"image_size": [32, 32]}})
    total = 0.0
    with open_store(path) as s:
        for item_id in s.ids:
            total += float(s.read(item_id).features[0, 0, 0])
    print(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "checksum": total}))


def peak_memory(counts: list[int], tmp: Path) -> dict:
    result = {}
    for n in counts:
        proc = subprocess.run([sys.executable, __file__, "--child", str(n), str(tmp / f"m{n}.h5")],
                              capture_output=True, text=True, check=True)
        result[str(n)] = json.loads(proc.stdout.strip().splitlines()[-1])["maxrss_mb"]
    return result


def compression(tmp: Path, n: int = 200) -> dict:
    rng = np.random.default_rng(0)
    mask = np.zeros((375, 500), np.uint8)
    mask[100:300, 150:400] = 15
    mask[90:110] = 255
    feats = rng.normal(0, 1, (90, 27, 36)).astype(np.float16)
    settings = {
        "none": {},
        "lzf": {"compression": "lzf", "chunks": True},
        "gzip1": {"compression": "gzip", "compression_opts": 1, "chunks": True},
        "gzip4": {"compression": "gzip", "compression_opts": 4, "chunks": True},
        "gzip4+shuffle": {"compression": "gzip", "compression_opts": 4, "shuffle": True, "chunks": True},
        "gzip9": {"compression": "gzip", "compression_opts": 9, "chunks": True},
    }
    out = {}
    for name, kw in settings.items():
        path = tmp / f"c_{name}.h5"
        t0 = time.perf_counter()
        with h5py.File(path, "w") as f:
            for i in range(n):
                g = f.create_group(f"i{i}")
                g.create_dataset("mask", data=mask, **{k: v for k, v in kw.items() if k != "shuffle"})
                g.create_dataset("features", data=feats, **kw)
        t_write = (time.perf_counter() - t0) / n
        t0 = time.perf_counter()
        with h5py.File(path, "r") as f:
            for i in range(n):
                f[f"i{i}/mask"][()]
                f[f"i{i}/features"][()]
        t_read = (time.perf_counter() - t0) / n
        out[name] = {"kb_per_item": round(path.stat().st_size / n / 1024, 1), "write_ms": round(t_write * 1e3, 3),
                     "read_ms": round(t_read * 1e3, 3)}
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(int(sys.argv[2]), sys.argv[3])
        return
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--counts", type=int, nargs="+", default=[1000, 10000])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mem = peak_memory(args.counts, Path(tmp))
        comp = compression(Path(tmp))
    lo, hi = min(mem.values()), max(mem.values())
    result = {"peak_rss_mb": mem, "rss_growth": round(hi / lo - 1, 3), "compression": comp}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "store_memory.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
