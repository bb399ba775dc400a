"""`make bench`: run every benchmark script of this folder and gather their JSON figures.

Each script is standalone (`python bench/<name>.py --out DIR`) and writes DIR/<name>.json;
this driver runs them one after the other (they time things: never in parallel) and prints a
summary. Figures in the README come from here.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

BENCHES = ["propagate", "crf", "eval_speed", "seed_defaults", "store_memory", "scaling", "sam", "authors_path",
           "end_to_end", "feature_rank"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument("--only", nargs="*", default=None, help="run only these benchmarks")
    args = parser.parse_args()
    here = Path(__file__).parent
    summary, failed = {}, []
    for name in args.only or BENCHES:
        script = here / f"{name}.py"
        if not script.exists():
            print(f"[skip] {name}: {script} not present", flush=True)
            continue
        out = args.out / name
        out.mkdir(parents=True, exist_ok=True)
        print(f"[run ] {name}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(script), "--out", str(out)])
        took = time.perf_counter() - t0
        if proc.returncode != 0:
            failed.append(name)
            print(f"[FAIL] {name} (exit {proc.returncode})", flush=True)
            continue
        results = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}
        summary[name] = {"seconds": round(took, 1), "results": results}
        print(f"[done] {name} in {took:.0f} s", flush=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"summary: {args.out / 'summary.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
