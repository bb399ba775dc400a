"""`make bench-gpu`: every stage of the pipeline on the GPU and on the CPU, checked against each other.

    python bench/gpu.py --out bench_out/gpu                  # CUDA when present: GPU vs CPU, < 5 min
    python bench/gpu.py --out /tmp/g --device cpu --tiny     # CPU only, tiny inputs (the test suite runs this)

Stages, each run through the library (`run_*`) on the same inputs (a procedural dataset with
simulated CAMs / features, `dhr_cli.testing.synthetic`; networks at random weights, the same
weights on both devices):

  cams-vit      `run_cams` with a DINO ViT-S/16 (USS features, default scales and flips)
  cams-resnet50 `run_cams` with a ResNet-50 CAM network (WSS CAMs + features)
  seed          `run_seed` (Step 1, with the CRF)
  propagate     `run_propagate --no-crf` and with the CRF (Steps 2-3)
  eval          `run_eval` of the propagated masks (CPU code: its figure is the same on both sides)
  train         `run_train`, a few steps of DHR training (ResNet-50 DeepLab, online regeneration),
                AMP on CUDA

Checks (device result against the CPU result; tolerances printed in the table and the JSON):
  cams / features (float32, TF32 off): |a - b| <= atol + rtol |b| elementwise, rtol = 1e-2 and
    atol = 1e-2 * max|b| per item (float16 storage alone rounds at 5e-4 relative);
  the same under AMP (float16 autocast, TF32 on: the speed a user gets): rtol = atol/max = 0.1,
    plus the mean cosine similarity of the feature vectors >= 0.99;
  masks: pixel agreement >= 0.99 (0.98 with the CRF): argmax ties and float summation order flip
    a few pixels; eval: |mIoU difference| <= 0.01; train: the first step's loss within 5 %
    (AMP against float32; dropout off so both sides compute the same function).

img/s per stage: the device run is timed twice and the faster kept (the first pays CUDA start-up
and cuDNN autotuning); the CPU run once. Writes OUT/gpu.json; exit status 1 when a check fails.
With `--device cpu` each stage runs once on the CPU and the checks compare it with itself: the
stages and the checking code are exercised on machines without a GPU (the suite runs
`--device cpu --tiny`), so the bench cannot rot.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# (rtol, atol as a fraction of the reference's max |value|)
TOL_FP32 = (1e-2, 1e-2)
TOL_AMP = (0.1, 0.1)
MIN_COSINE_AMP = 0.99
MIN_AGREE = 0.99
MIN_AGREE_CRF = 0.98
MAX_MIOU_DIFF = 0.01
MAX_LOSS_REL = 0.05


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py: --device cuda but torch sees no CUDA device")
    return torch.device(name)


@contextmanager
def tf32(enabled: bool):
    """TF32 matmuls / convolutions off for the float32 checks (cuDNN turns them on by default)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


# ---- inputs ---------------------------------------------------------------------------------
def make_inputs(work: Path, images: int, height: int, width: int) -> Path:
    from dhr_cli.testing.synthetic import SceneSpec, make_dataset

    return make_dataset(work / "data", n_images=images, seed=0, spec=SceneSpec(height=height, width=width),
                        overwrite=True)


def vit_source():
    from dhr_cli.models.vit import ViTSource, build_vit

    torch.manual_seed(0)
    return ViTSource(build_vit("dino_vits16"), name="dino_vits16").eval()


def resnet_source(classes: list[str], side: int):
    """ResNet-50 CAM network at random weights; BatchNorm statistics set from one random batch
    so that activations stay of unit scale through 50 layers (raw random init overflows float16)."""
    from dhr_cli.models.resnet_cam import ResNetCAM

    torch.manual_seed(0)
    net = ResNetCAM(50, num_classes=len(classes), classes=classes)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: the batch's own statistics
    net.train()
    with torch.no_grad():
        net.extract(torch.randn(2, 3, side, side))
    return net.eval()


# ---- comparisons ----------------------------------------------------------------------------
def _read_all(path: Path) -> dict[str, dict[str, np.ndarray]]:
    from dhr_cli.io.store import open_store

    with open_store(path) as store:
        return {i: {k: np.asarray(v) for k, v in store.read(i).arrays.items()} for i in store}


def compare_float(ref: Path, got: Path, names: tuple[str, ...], tol: tuple[float, float],
                  min_cosine: float | None = None) -> dict:
    a, b = _read_all(ref), _read_all(got)
    if set(a) != set(b):
        return {"ok": False, "value": f"items differ: {len(a)} vs {len(b)}"}
    rtol, afrac = tol
    worst, cosines = 0.0, []
    for item in a:
        for name in names:
            r, g = a[item][name].astype(np.float64), b[item][name].astype(np.float64)
            if r.shape != g.shape:
                return {"ok": False, "value": f"{item} {name}: shape {g.shape} vs {r.shape}"}
            atol = afrac * max(float(np.abs(r).max()), 1e-12)
            excess = np.abs(g - r) / (atol + rtol * np.abs(r))
            worst = max(worst, float(excess.max()))
            if name == "features":
                rr, gg = r.reshape(r.shape[0], -1), g.reshape(g.shape[0], -1)
                cos = (rr * gg).sum(0) / np.maximum(np.linalg.norm(rr, axis=0) * np.linalg.norm(gg, axis=0), 1e-12)
                cosines.append(float(cos.mean()))
    out = {"ok": worst <= 1.0, "value": f"max |err|/(atol+rtol|ref|) = {worst:.3g}",
           "tolerance": f"rtol {rtol:g}, atol {afrac:g}*max|ref|"}
    if min_cosine is not None and cosines:
        cos = min(cosines)
        out["ok"] = out["ok"] and cos >= min_cosine
        out["value"] += f"; cosine {cos:.4f}"
        out["tolerance"] += f"; cosine >= {min_cosine:g}"
    return out


def compare_masks(ref: Path, got: Path, minimum: float) -> dict:
    a, b = _read_all(ref), _read_all(got)
    if set(a) != set(b):
        return {"ok": False, "value": f"items differ: {len(a)} vs {len(b)}"}
    same = total = 0
    for item in a:
        same += int((a[item]["mask"] == b[item]["mask"]).sum())
        total += a[item]["mask"].size
    agree = same / max(total, 1)
    return {"ok": agree >= minimum, "value": f"pixel agreement {agree:.4f}", "tolerance": f">= {minimum:g}"}


# ---- stages ---------------------------------------------------------------------------------
def run_stages(work: Path, data: Path, device: torch.device, tiny: bool) -> list[dict]:
    from dhr_cli.config import CamsConfig, PropagateConfig, SeedConfig, TrainConfig
    from dhr_cli.io.datasets import open_dataset
    from dhr_cli.pipeline.cams import run_cams
    from dhr_cli.pipeline.evaluate import run_eval
    from dhr_cli.pipeline.propagate import run_propagate
    from dhr_cli.pipeline.seed import run_seed
    from dhr_cli.pipeline.train import run_train

    cpu = torch.device("cpu")
    dataset = open_dataset(data)
    n = len(dataset.ids)
    fg = [c for i, c in enumerate(dataset.classes) if not (i == 0 and dataset.has_background)]
    repeats = 2 if device.type == "cuda" else 1
    rows: list[dict] = []

    def out(tag: str, role: str) -> Path:  # role "cpu" (the reference) or "dev"
        return work / f"{tag}-{role}.h5"

    times: dict[str, float] = {}

    def stage(name: str, run, check, images: int = n, reference: str | None = None):
        """run(dev, path) on the CPU (reference) and on `device`; check(ref_path, dev_path).
        `reference`: an earlier stage whose CPU result (and time) this one is checked against."""
        ref, got = out(reference or name, "cpu"), out(name, "dev")
        t_cpu = times[reference] if reference else timed(lambda: run(cpu, ref), cpu, 1)
        times[name] = t_cpu
        if device.type == "cpu":  # CPU only: the stage runs once, the check compares it with itself
            shutil.copyfile(ref, got) if ref.exists() else None
            t_dev = t_cpu
        else:
            t_dev = timed(lambda: run(device, got), device, repeats)
        row = {"stage": name, "images": images, "cpu_img_s": images / t_cpu, "device_img_s": images / t_dev,
               "cpu_s": t_cpu, "device_s": t_dev, **check(ref, got)}
        rows.append(row)
        print(f"  {name}: cpu {t_cpu:.2f} s, {device.type} {t_dev:.2f} s, {'ok' if row['ok'] else 'FAILED'}: "
              f"{row['value']}", flush=True)
        return ref

    # cams: the check runs in float32 with TF32 off; the AMP run (what a user gets) has its own row
    scales = dict(scales=(1.0,), uss_scales=(1.0,), flip=False) if tiny else {}
    cams_fp32 = CamsConfig(amp=False, store_dtype="float32", batch_size=4, **scales)
    vit, resnet = vit_source(), resnet_source(fg, 64 if tiny else 224)

    def cams_run(source, cfg):
        def run(dev, path):
            with tf32(False):
                run_cams(dataset, source, path, cfg, device=dev, overwrite=True, quiet=True)
        return run

    def cams_amp(source, cfg):
        def run(dev, path):
            with tf32(True):
                run_cams(dataset, source, path, cfg, device=dev, overwrite=True, quiet=True)
        return run

    cmp_vit = lambda tol, cos=None: lambda r, g: compare_float(r, g, ("features",), tol, cos)  # noqa: E731
    cmp_res = lambda tol, cos=None: lambda r, g: compare_float(r, g, ("cams", "features"), tol, cos)  # noqa: E731
    stage("cams-vit", cams_run(vit, cams_fp32), cmp_vit(TOL_FP32))
    stage("cams-resnet50", cams_run(resnet, cams_fp32), cmp_res(TOL_FP32))
    if device.type == "cuda":
        cams_16 = replace(cams_fp32, amp=True)
        stage("cams-vit-amp", cams_amp(vit, cams_16), cmp_vit(TOL_AMP, MIN_COSINE_AMP), reference="cams-vit")
        stage("cams-resnet50-amp", cams_amp(resnet, cams_16), cmp_res(TOL_AMP, MIN_COSINE_AMP),
              reference="cams-resnet50")

    # Steps 1-3 on the dataset's simulated stores (meaningful masks), the same inputs on both sides
    seeds_ref = stage("seed", lambda dev, path: run_seed(SeedConfig(device=dev.type), data / "cams.h5", data, path,
                                                         overwrite=True, quiet=True),
                      lambda r, g: compare_masks(r, g, MIN_AGREE_CRF))
    masks = {}
    for crf in (False, True):
        name = "propagate-crf" if crf else "propagate-no-crf"

        def prop(dev, path, crf=crf):
            run_propagate(PropagateConfig(device=dev.type, use_crf=crf), seeds=seeds_ref, data=data,
                          uss=data / "uss.h5", wss=[data / "wss.h5"], cams=data / "cams.h5", out=path,
                          overwrite=True, quiet=True)
        masks[crf] = stage(name, prop, lambda r, g, crf=crf: compare_masks(r, g, MIN_AGREE_CRF if crf else MIN_AGREE))

    # eval: CPU code; the device column scores the device's masks
    dev_masks = out("propagate-crf", "dev")
    scores = {}
    t0 = time.perf_counter()
    scores["cpu"] = run_eval([masks[True]], data).methods[0].miou
    t_eval = time.perf_counter() - t0
    scores["dev"] = run_eval([dev_masks], data).methods[0].miou
    diff = abs(scores["cpu"] - scores["dev"])
    rows.append({"stage": "eval", "images": n, "cpu_img_s": n / t_eval, "device_img_s": None, "cpu_s": t_eval,
                 "device_s": None, "ok": diff <= MAX_MIOU_DIFF,
                 "value": f"mIoU cpu {scores['cpu']:.4f}, {device.type} {scores['dev']:.4f}",
                 "tolerance": f"|diff| <= {MAX_MIOU_DIFF:g}"})

    # train: a few steps; dropout off so that both sides compute the same function
    steps, batch = (2, 2) if tiny else (4, 4)
    batch = min(batch, n)
    train_cfg = TrainConfig(backbone="resnet18" if tiny else "resnet50", crop_size=64 if tiny else 320,
                            scale_range=(64, 96) if tiny else (320, 480), batch_size=batch, epochs=1,
                            dropout=False, num_workers=0, val_split=None, log_every=1, checkpoint_every=0)
    losses = {}
    tname = "train-amp" if device.type == "cuda" else "train"

    def train(dev, path):
        run_dir = path.with_suffix("")
        shutil.rmtree(run_dir, ignore_errors=True)
        run_train(replace(train_cfg, device=dev.type), data, masks[True], run_dir, uss=data / "uss.h5",
                  overwrite=True, quiet=True, max_steps=steps)
        first = json.loads((run_dir / "log.jsonl").read_text().splitlines()[0])
        losses["cpu" if path == out(tname, "cpu") else "dev"] = first["loss"]
        if device.type == "cpu":
            losses["dev"] = first["loss"]

    def loss_check(_r, _g):
        rel = abs(losses["dev"] - losses["cpu"]) / max(abs(losses["cpu"]), 1e-12)
        return {"ok": rel <= MAX_LOSS_REL, "value": f"first loss cpu {losses['cpu']:.4f}, {device.type} "
                f"{losses['dev']:.4f} (rel {rel:.2g})", "tolerance": f"rel <= {MAX_LOSS_REL:g}"}

    stage(tname, train, loss_check, images=steps * batch)
    return rows


def show(rows: list[dict], device: torch.device) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"dhr stages: {device.type} against the CPU (tolerances: OUT/gpu.json, bench/gpu.py)")
    for col in ("stage", "images", "CPU img/s", f"{device.type} img/s", "speed-up", "check", ""):
        table.add_column(col, justify="right" if col == "images" or "img/s" in col or col == "speed-up" else "left")
    for r in rows:
        dev = r["device_img_s"]
        table.add_row(r["stage"], str(r["images"]), f"{r['cpu_img_s']:.2f}", "-" if dev is None else f"{dev:.2f}",
                      "-" if dev is None else f"{dev / r['cpu_img_s']:.1f}x", r["value"],
                      "[green]ok[/]" if r["ok"] else "[red]FAILED[/]")
    Console(width=max(Console().width, 150)).print(table)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench_out/gpu"))
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cuda:N or cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny inputs and networks' shortest settings (CI)")
    ap.add_argument("--images", type=int, default=None, help="dataset size (default 16; 4 with --tiny)")
    args = ap.parse_args(argv)
    device = pick_device(args.device)
    n = args.images or (4 if args.tiny else 16)
    h, w = (48, 64) if args.tiny else (240, 320)
    work = args.out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    data = make_inputs(work, n, h, w)
    print(f"bench/gpu.py: {n} images {w}x{h}, device {device} (torch {torch.__version__}, "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} CPU threads'})",
          flush=True)
    rows = run_stages(work, data, device, args.tiny)
    show(rows, device)
    result = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "images": n, "image_size": [h, w], "tiny": args.tiny, "seconds": time.perf_counter() - t0,
              "stages": rows, "ok": all(r["ok"] for r in rows)}
    (args.out / "gpu.json").write_text(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    print(f"{args.out / 'gpu.json'}: {'all checks pass' if result['ok'] else 'CHECKS FAILED'} "
          f"in {result['seconds']:.0f} s")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
