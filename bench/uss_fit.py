"""Does a head fitted by `dhr uss fit` beat the raw backbone features as USS? (the demo's procedural set)

    python bench/uss_fit.py --out bench_out/uss_fit [--fit-seed 1] [--eval-seed 0] [--n-images 48]

The head is fitted on the images of one dataset seed (no labels) and DHR is scored on another
seed's train split, with the same lite0 CAMs, once with raw lite0 USS features and once with the
fitted head's codes; a head fitted on the evaluated images themselves (the product's use: fit on
the images you label, still no labels) is a third row. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def dhr(*args) -> None:
    cmd = [sys.executable, "-m", "dhr_cli", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(HERE.parent))
    if proc.returncode:
        raise SystemExit(f"`dhr {' '.join(map(str, args))}` failed: {proc.stderr[-400:]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench_out/uss_fit"))
    p.add_argument("--fit-seed", type=int, default=1)
    p.add_argument("--eval-seed", type=int, default=0)
    p.add_argument("--n-images", type=int, default=48)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    sys.path.insert(0, str(HERE.parent))
    from dhr_cli.config import DemoConfig
    from dhr_cli.pipeline.demo import seed_options
    from dhr_cli.pipeline.evaluate import run_eval
    from dhr_cli.testing.synthetic import make_dataset

    a.out.mkdir(parents=True, exist_ok=True)
    fit_data, data = a.out / f"data{a.fit_seed}", a.out / f"data{a.eval_seed}"
    for root, seed in ((fit_data, a.fit_seed), (data, a.eval_seed)):
        if not root.exists():
            make_dataset(root, n_images=a.n_images, seed=seed)
    common = ["--device", a.device, "--quiet"]
    steps = ["--steps", a.steps] if a.steps else []
    heads = {"held_out": (a.out / "head_fitset.pt", fit_data), "same_images": (a.out / "head_evalset.pt", data)}
    for head, root in heads.values():
        if not head.exists():
            dhr("uss", "fit", "--data", root, "--split", "train", "--out", head, *steps, *common)
    cams = a.out / "cams.h5"
    if not cams.exists():
        dhr("cams", "--data", data, "--split", "train", "--wss", "lite0", "--train-head", "--out", cams, *common)
    seeds = a.out / "seeds.h5"
    if not seeds.exists():
        dhr("seed", "--cams", cams, "--data", data, "--split", "train", "--out", seeds,
            *seed_options(DemoConfig().seed_bg_rule, DemoConfig().seed_ot_lite0), *common)  # the demo's (Lite0) seeds
    uss = {"lite0 features (raw)": ["--uss", "lite0"],
           "fitted head, other seed's images": ["--uss", "fitted", "--uss-weights", heads["held_out"][0]],
           "fitted head, these images": ["--uss", "fitted", "--uss-weights", heads["same_images"][0]]}
    rows = {}
    for k, (name, spec) in enumerate(uss.items()):
        store, masks = a.out / f"uss{k}.h5", a.out / f"masks{k}.h5"
        if not store.exists():
            dhr("cams", "--data", data, "--split", "train", *spec, "--out", store, *common)
        dhr("propagate", "--seeds", seeds, "--uss", store, "--wss", cams, "--cams", cams, "--data", data,
            "--split", "train", "--out", masks, "--overwrite", *common)
        m = run_eval([str(masks)], data, "train", quiet=True).methods[0]
        rows[name] = {"miou": m.miou, "vanishing_rate": m.to_json().get("vanishing_rate")}
    (a.out / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"| USS of DHR (demo set seed {a.eval_seed}, head fitted on seed {a.fit_seed}) | mIoU | vanishing |\n|---|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {100 * r['miou']:.1f} | {100 * (r['vanishing_rate'] or 0):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
