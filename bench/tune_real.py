"""Sweep DHR and CAM + CRF options on a `bench/real.py` output, in one process (stores read once).

    python bench/tune_real.py --out bench_out/real_s1 "crf.max_side=64" "crf.max_side=128" ...
    python bench/tune_real.py @bench/knobs.txt --out R/seed1 R/seed11 R/seed12 R/seed13 R/seed14  # settings first

`--out` is a folder that `bench/real.py --out DIR` filled (DIR/data, DIR/cams.h5, DIR/uss.h5).
Each positional argument is one setting: space-separated `key=value` overrides of the defaults,

    seed.KEY=V        SeedConfig (bg_power, confidence, use_crf)
    seed.crf.KEY=V    the CRF of Step 1 (CRFConfig: max_side, n_iter, gauss_sxy, ...)
    seed.sinkhorn.KEY=V  Step 1's OT (SinkhornConfig: eps, max_iter, tol)
    prop.KEY=V        PropagateConfig (tau, step3, marginals, upsample, restore_classes, ...)
    prop.crf.KEY=V    the CRF after Steps 2-3
    prop.sinkhorn.KEY=V  the OT of Steps 2-3
    crf.KEY=V         both CRFs (and the CRF of the CAM + CRF baseline)
    cam=1             also score CAM + CRF (bg swept over bench/real.py's BG_SWEEP) with that CRF

and `defaults` alone is the defaults. Step 1's seeds are computed once per distinct seed setting.
Prints one table row per setting (mIoU, mFPR, mFNR, vanishing, seconds) and appends it as JSON
to OUT/tune.jsonl. With several --out folders (one per dataset seed) it ends with each setting's
mean DHR mIoU over them, as a change from the first setting. Choose settings on one set of dataset
seeds and report on another (bench/real.py --seed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from dhr_cli.config import CRFConfig, PropagateConfig, SeedConfig  # noqa: E402
from dhr_cli.io.datasets import open_dataset  # noqa: E402
from dhr_cli.io.store import open_store  # noqa: E402
from dhr_cli.kernels.crf import crf_function  # noqa: E402
from dhr_cli.kernels.metrics import confusion_matrix, class_scores, mean_over_present  # noqa: E402
from dhr_cli.kernels.propagate import PropagateItem, propagate_items  # noqa: E402
from dhr_cli.kernels.seed import crf_padded, seed_masks  # noqa: E402
from dhr_cli.pipeline.inputs import image_tensor  # noqa: E402

BG_SWEEP = (0.2, 0.3, 0.4, 0.5, 0.6)  # bench/real.py's
BATCH = 8


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_setting(text: str) -> dict[str, dict]:
    """'seed.crf.max_side=128 prop.tau=0.9' -> {'seed': {...}, 'seed.crf': {...}, 'prop': ..., 'prop.crf': ..., 'cam': ...}."""
    out: dict[str, dict] = {"seed": {}, "seed.crf": {}, "seed.sinkhorn": {}, "prop": {}, "prop.crf": {},
                            "prop.sinkhorn": {}, "cam": {}}
    for part in text.split():
        if part == "defaults":
            continue
        key, _, val = part.partition("=")
        if not _:
            raise SystemExit(f"setting {text!r}: {part!r} is not key=value")
        if key == "cam":
            out["cam"]["on"] = bool(_value(val))
            continue
        scope, _, name = key.rpartition(".")
        if scope == "crf":
            out["seed.crf"][name] = out["prop.crf"][name] = _value(val)
        elif scope in out:
            out[scope][name] = _value(val)
        else:
            raise SystemExit(f"setting {text!r}: unknown scope {scope!r} (seed, seed.crf, seed.sinkhorn, prop, prop.crf, prop.sinkhorn, crf)")
    return out


def configs(setting: dict[str, dict]) -> tuple[SeedConfig, PropagateConfig, CRFConfig]:
    seed_crf = dataclasses.replace(SeedConfig().crf, **setting["seed.crf"])  # overrides of each stage's default CRF
    prop_crf = dataclasses.replace(PropagateConfig().crf, **setting["prop.crf"])
    seed_ot = dataclasses.replace(SeedConfig().sinkhorn, **setting["seed.sinkhorn"])
    prop_ot = dataclasses.replace(PropagateConfig().sinkhorn, **setting["prop.sinkhorn"])
    seed = SeedConfig(crf=seed_crf, sinkhorn=seed_ot, **setting["seed"])
    prop = PropagateConfig(crf=prop_crf, sinkhorn=prop_ot, **setting["prop"])
    return seed, prop, prop_crf


class Bench:
    """The inputs of every image of a bench/real.py output, in memory."""

    def __init__(self, data: Path, cams: Path, uss: Path, wss: Path | None = None, split: str | None = None):
        self.ds = open_dataset(data, split)
        self.classes = self.ds.classes
        self.background = self.classes.index("background")
        self.items = []
        with open_store(cams, expect="cams") as cs, open_store(uss) as us, open_store(wss or cams) as ws:
            for i in self.ds.ids:
                cam = cs.read(i)
                self.items.append({
                    "id": i, "labels": self.ds.labels(i), "image": torch.from_numpy(np.ascontiguousarray(image_tensor(self.ds, i))),
                    "cams": torch.from_numpy(cam.cams.astype(np.float32)), "cam_labels": cam.labels.tolist(),
                    "wss": torch.from_numpy(ws.read(i).features.astype(np.float32)),
                    "uss": torch.from_numpy(us.read(i).features.astype(np.float32)),
                    "gt": self.ds.gt(i),
                })
        self._seeds: dict[str, list[torch.Tensor]] = {}

    def batches(self):
        for s in range(0, len(self.items), BATCH):
            yield self.items[s:s + BATCH]

    def seeds(self, cfg: SeedConfig) -> list[torch.Tensor]:
        key = repr(cfg)
        if key not in self._seeds:
            crf = crf_function(cfg.crf) if cfg.use_crf else None
            out = []
            for b in self.batches():
                out += seed_masks([it["cams"] for it in b], [it["cam_labels"] for it in b],
                                  [tuple(it["image"].shape[1:]) for it in b], cfg,
                                  images=[it["image"] for it in b] if crf else None, background=self.background, crf=crf)
            self._seeds[key] = out
        return self._seeds[key]

    def dhr(self, seed_cfg: SeedConfig, cfg: PropagateConfig) -> list[torch.Tensor]:
        seeds = self.seeds(seed_cfg)
        crf = crf_function(cfg.crf) if cfg.use_crf else None
        out, k = [], 0
        for b in self.batches():
            items = [PropagateItem(seed=seeds[k + j].long(), uss=it["uss"], wss=[it["wss"]], labels=it["labels"],
                                   cams=it["cams"], cam_labels=it["cam_labels"], image=it["image"])
                     for j, it in enumerate(b)]
            k += len(b)
            out += propagate_items(items, cfg, background=self.background, crf=crf)
        return out

    def cam_crf(self, crf_cfg: CRFConfig, bg: float) -> list[torch.Tensor]:
        """bench/real.py's CAM + CRF: [constant bg, max-normalised CAMs upsampled], CRF, argmax."""
        import torch.nn.functional as F

        crf = crf_function(crf_cfg)
        out = []
        for b in self.batches():
            probs = []
            for it in b:
                x = it["cams"].clamp_min(0)
                x = x / x.flatten(1).amax(1).clamp_min(1e-5)[:, None, None]
                size = tuple(it["image"].shape[1:])
                up = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
                p = torch.cat([up.new_full((1, *size), bg), up])
                probs.append(p / p.sum(0, keepdim=True))
            probs = crf_padded(crf, [it["image"] for it in b], probs)
            for it, p in zip(b, probs):
                table = torch.tensor([self.background, *it["cam_labels"]])
                out.append(table[p.argmax(0)])
        return out

    def score(self, masks: list[torch.Tensor], ids: set[str] | None = None) -> dict:
        k = len(self.classes)
        counts = np.zeros((k, k + 1), np.int64)
        vanished = pairs = 0
        fg = np.ones(k, bool)
        fg[self.background] = False
        for it, m in zip(self.items, masks):
            if ids is not None and it["id"] not in ids:
                continue
            pred = m.cpu().numpy().astype(np.uint8)
            c = confusion_matrix(it["gt"], pred, k)
            counts += c
            gt_present = (c.sum(1) > 0) & fg
            pred_present = np.zeros(k, bool)
            vals = np.unique(pred)
            pred_present[vals[vals < k]] = True
            pairs += int(gt_present.sum())
            vanished += int((gt_present & ~pred_present).sum())
        s = class_scores(counts)
        return {"miou": mean_over_present(s.iou), "mfpr": mean_over_present(s.fpr), "mfnr": mean_over_present(s.fnr),
                "vanishing": vanished / pairs if pairs else 0.0}


def fmt_row(name: str, r: dict, seconds: float) -> str:
    return (f"| {name} | {100 * r['miou']:.1f} | {100 * r['mfpr']:.1f} | {100 * r['mfnr']:.1f} | "
            f"{100 * r['vanishing']:.1f} | {seconds:.0f} |")


def mean_table(results: dict[str, list[float]]) -> str:
    """DHR mIoU of each setting averaged over the folders (dataset seeds), as a change from the first
    setting, with the per-folder changes: how a default is checked on several seeds at once."""
    names = list(results)
    base = results[names[0]]
    lines = [f"| setting | mean mIoU over {len(base)} | change | change per folder |", "|---|---:|---:|---|"]
    for name in names:
        v = results[name]
        deltas = " ".join(f"{100 * (a - b):+.1f}" for a, b in zip(v, base))
        lines.append(f"| {name} | {100 * np.mean(v):.1f} | {100 * (np.mean(v) - np.mean(base)):+.2f} | {deltas} |")
    return "\n".join(lines)


def sweep(bench: "Bench", settings: list[str], log) -> dict[str, float]:
    """Score every setting on one folder; prints a row each and appends it to `log`. Returns DHR mIoUs."""
    mious = {}
    print("| setting | mIoU | mFPR | mFNR | vanishing | s |\n|---|---:|---:|---:|---:|---:|", flush=True)
    with torch.no_grad():
        for text in settings:
            setting = parse_setting(text)
            seed_cfg, prop_cfg, crf_cfg = configs(setting)
            t = time.perf_counter()
            r = bench.score(bench.dhr(seed_cfg, prop_cfg))
            took = time.perf_counter() - t
            mious[text] = r["miou"]
            print(fmt_row(f"DHR {text}", r, took), flush=True)
            log.write(json.dumps({"setting": text, "method": "dhr", **r, "seconds": took}) + "\n")
            if setting["cam"].get("on"):
                best = None
                t = time.perf_counter()
                for bg in BG_SWEEP:
                    rc = bench.score(bench.cam_crf(crf_cfg, bg))
                    rc["bg"] = bg
                    if best is None or rc["miou"] > best["miou"]:
                        best = rc
                took = time.perf_counter() - t
                print(fmt_row(f"CAM+CRF tuned (bg {best['bg']}) {text}", best, took), flush=True)
                log.write(json.dumps({"setting": text, "method": "cam_crf_tuned", **best, "seconds": took}) + "\n")
            log.flush()
    return mious


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, nargs="+", required=True,
                   help="bench/real.py output folders (data/, cams.h5, uss.h5); several: one per dataset seed, "
                        "then a table of the mean over them")
    p.add_argument("--data", type=Path, default=None, help="dataset (default OUT/data)")
    p.add_argument("--cams", type=Path, default=None, help="cams store with WSS features (default OUT/cams.h5)")
    p.add_argument("--uss", type=Path, default=None, help="USS features store (default OUT/uss.h5)")
    p.add_argument("--wss", type=Path, default=None, help="WSS features store (default OUT/wss.h5 if there, else the cams store)")
    p.add_argument("--split", default=None)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("settings", nargs="+", help="settings: space-separated key=value overrides (or 'defaults'); "
                                               "@FILE reads one setting per line")
    args = p.parse_args(argv)
    if len(args.out) > 1 and (args.data or args.cams or args.uss or args.wss):
        p.error("--data / --cams / --uss / --wss name the stores of one --out folder only")
    settings = [line.strip() for text in args.settings
                for line in (Path(text[1:]).read_text().splitlines() if text.startswith("@") else [text])
                if line.strip() and not line.lstrip().startswith("#")]
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, list[float]] = {text: [] for text in settings}
    for out in args.out:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        wss = args.wss or (out / "wss.h5" if (out / "wss.h5").exists() else None)
        bench = Bench(args.data or out / "data", args.cams or out / "cams.h5", args.uss or out / "uss.h5", wss, args.split)
        print(f"{out}: loaded {len(bench.items)} images in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        if len(args.out) > 1:
            print(f"\n{out}", flush=True)
        with (out / "tune.jsonl").open("a") as log:
            for text, miou in sweep(bench, settings, log).items():
                results[text].append(miou)
    if len(args.out) > 1:
        print("\n" + mean_table(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
