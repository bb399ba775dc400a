"""Dense CRF benchmark: dhr's PyTorch mean field vs pydensecrf2 (the authors' pydensecrf, rebuilt).

Inputs: photographs shipped with scikit-image (astronaut, coffee, chelsea, rocket; --photos
picks how many) resized to 500x375 (PASCAL VOC's usual size), with CAM-like probability maps
of 3 and 21 labels: colour-and-position k-means regions (5 of them, each given one label) as
coarse one-hot maps at 1/16 resolution, upsampled bilinearly, plus low-frequency and pixel
noise, softmax. Worst case: a flat-coloured procedural scene (dhr_cli.testing.synthetic's
layout, each region painted one colour, no noise), where an exact sparse bilateral kernel
becomes nearly dense. CRF parameters: the authors' (10 iterations).

pydensecrf2 always runs at full resolution (single-threaded C++). Each dhr setting
(backend x max_side, 0 = full resolution, i.e. EQUAL resolution and iterations) is timed on
each torch thread count in --threads (best of --rounds) and reports:
  - ms/img and speed-up over pydensecrf2 on the same photo, in wall time and in CPU time of
    this process (`*_cpu*`: steadier on a shared machine; at 1 thread it compares directly with
    single-threaded pydensecrf2, at 2 threads it adds both threads' time: use wall time there);
  - argmax agreement with pydensecrf2, mean |p - q|;
  - flat-scene ms/img and its ratio to the photo time;
  - minor page faults per call (fresh memory the call touches; 4 KiB pages).

    python bench/crf.py --out bench_out/crf                       # writes crf.json
Needs scikit-image (photos); pydensecrf2 is optional (pip install pydensecrf2).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dhr_cli.config import CRFConfig  # noqa: E402
from dhr_cli.kernels.crf import dense_crf  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def photos(h: int = 375, w: int = 500) -> dict[str, np.ndarray]:
    import skimage.data
    from PIL import Image

    out = {}
    for name in PHOTOS:
        a = getattr(skimage.data, name)()
        a = np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]
        out[name] = np.array(Image.fromarray(a).resize((w, h), Image.BILINEAR))
    return out


def regions(img: np.ndarray, k: int, seed: int, iters: int = 15) -> np.ndarray:
    """k-means on (colour, position) of a 1/4 subsample, nearest-upsampled: (H, W) region ids."""
    rng = np.random.default_rng(seed)
    h, w, _ = img.shape
    small = img[::4, ::4].astype(np.float32)
    hh, ww = small.shape[:2]
    yy, xx = np.mgrid[0:hh, 0:ww]
    f = np.concatenate([small.reshape(-1, 3) / 255.0, np.stack([yy, xx], -1).reshape(-1, 2) / max(hh, ww) * 1.5], 1)
    c = f[rng.choice(len(f), k, replace=False)]
    for _ in range(iters):
        a = ((f[:, None] - c[None]) ** 2).sum(-1).argmin(1)
        for j in range(k):
            if (a == j).any():
                c[j] = f[a == j].mean(0)
    a = torch.from_numpy(a.reshape(1, 1, hh, ww).astype(np.float32))
    return F.interpolate(a, (h, w), mode="nearest")[0, 0].long().numpy()


def cam_like(img: np.ndarray, n_labels: int, seed: int) -> np.ndarray:
    """(L, H, W) float32 probabilities that look like a CAM/segmentation network output."""
    h, w, _ = img.shape
    rng = np.random.default_rng(seed)
    n_reg = min(n_labels, 5)
    lab = rng.permutation(n_labels)[:n_reg]
    gt = torch.from_numpy(lab[regions(img, n_reg, seed)])
    oh = F.one_hot(gt, n_labels).permute(2, 0, 1)[None].float()
    coarse = F.adaptive_avg_pool2d(oh, (h // 16, w // 16))
    sm = F.interpolate(coarse, (h, w), mode="bilinear", align_corners=False)[0]
    g = torch.Generator().manual_seed(seed)
    low = F.interpolate(torch.randn(1, n_labels, h // 32, w // 32, generator=g), (h, w), mode="bilinear", align_corners=False)[0]
    logits = 3.0 * sm + 0.8 * low + 0.5 * torch.randn(n_labels, h, w, generator=g)
    return torch.softmax(logits, 0).numpy().astype(np.float32)


def pydensecrf_run(img: np.ndarray, probs: np.ndarray, cfg: CRFConfig) -> np.ndarray:
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    n_lab, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, n_lab)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    d.addPairwiseGaussian(sxy=cfg.gauss_sxy, compat=cfg.gauss_compat)
    d.addPairwiseBilateral(sxy=cfg.bilateral_sxy, srgb=cfg.bilateral_srgb, rgbim=np.ascontiguousarray(img),
                           compat=cfg.bilateral_compat)
    return np.array(d.inference(cfg.n_iter)).reshape(n_lab, h, w)


def timed(fn, rounds: int):
    """(best wall seconds, best CPU seconds of this process, result): CPU time is steadier when other
    jobs share the machine, and at 1 thread it compares with single-threaded pydensecrf2 directly."""
    best, best_cpu, res = float("inf"), float("inf"), None
    for _ in range(rounds):
        t, c = time.perf_counter(), time.process_time()
        res = fn()
        best_cpu = min(best_cpu, time.process_time() - c)
        best = min(best, time.perf_counter() - t)
    return best, best_cpu, res


def flat_scene(h: int = 375, w: int = 500, seed: int = 0) -> np.ndarray:
    """Procedural scene layout with each region painted one flat colour (no texture, no noise)."""
    from dhr_cli.testing.synthetic import SceneSpec, make_scene

    _, gt = make_scene(np.random.default_rng(seed), SceneSpec(height=h, width=w))
    colours = np.array([[90, 120, 160], [200, 60, 50], [60, 170, 70], [220, 200, 60], [120, 70, 180], [40, 40, 40]],
                       np.uint8)
    return colours[np.where(gt == 255, 0, gt) % len(colours)]


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--labels", type=int, nargs="+", default=[3, 21])
    ap.add_argument("--photos", type=int, default=2, help="how many photos (the CPU is shared: keep it short)")
    ap.add_argument("--settings", nargs="+", default=["permutohedral:0", "permutohedral:128", "exact:128",
                                                       "permutohedral:64", "exact:64"],
                    help="backend:max_side pairs (0 = full resolution)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads (pydensecrf2: 1)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    try:
        import pydensecrf.densecrf  # noqa: F401
        have_ref = True
    except ImportError:
        have_ref = False
        print("pydensecrf2 is not installed (pip install pydensecrf2): only dhr timings are reported")
    ph = dict(list(photos().items())[: args.photos])
    flat = flat_scene()
    result = {"image_size": [375, 500], "photos": list(ph), "threads": args.threads, "device": str(dev),
              "pydensecrf2": have_ref, "config": vars(CRFConfig()), "runs": []}
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float()[None].to(dev)  # noqa: E731
    for n_lab in args.labels:
        items = [(name, img, cam_like(img, n_lab, seed)) for seed, (name, img) in enumerate(ph.items())]
        fl_p = torch.from_numpy(cam_like(flat, n_lab, 7))[None].to(dev)
        ref_ms, ref_cpu, refs = [], [], []
        if have_ref:
            for (_, img, p) in items:
                t, c, q = timed(lambda: pydensecrf_run(img, p, CRFConfig()), args.rounds)
                ref_ms.append(t * 1000)
                ref_cpu.append(c * 1000)
                refs.append(q)
            ref_flat_ms = timed(lambda: pydensecrf_run(flat, fl_p[0].cpu().numpy(), CRFConfig()), args.rounds)[0] * 1000
        for setting in args.settings:
            backend, side = setting.split(":")
            cfg = CRFConfig(max_side=int(side), backend=backend)
            for threads in args.threads:
                torch.set_num_threads(threads)
                dense_crf(to_t(items[0][1]), torch.from_numpy(items[0][2])[None].to(dev), cfg)  # warm-up
                ms, cpu, agree, mad, flt = [], [], [], [], []
                for k, (_, img, p) in enumerate(items):
                    im, pr = to_t(img), torch.from_numpy(p)[None].to(dev)
                    f0 = faults()
                    t, c, o = timed(lambda: dense_crf(im, pr, cfg), args.rounds)
                    flt.append((faults() - f0) / args.rounds)
                    ms.append(t * 1000)
                    cpu.append(c * 1000)
                    if have_ref:
                        o = o[0].cpu().numpy()
                        agree.append(float((o.argmax(0) == refs[k].argmax(0)).mean()))
                        mad.append(float(np.abs(o - refs[k]).mean()))
                flat_ms = timed(lambda: dense_crf(to_t(flat), fl_p, cfg), args.rounds)[0] * 1000
                run = {"labels": n_lab, "backend": backend, "max_side": int(side), "threads": threads,
                       "dhr_ms_per_img": float(np.mean(ms)), "dhr_cpu_ms_per_img": float(np.mean(cpu)), "flat_scene_ms": flat_ms,
                       "flat_over_photo": flat_ms / float(np.mean(ms)), "minor_faults_per_call": float(np.mean(flt))}
                if have_ref:
                    run.update(pydensecrf2_ms_per_img=float(np.mean(ref_ms)), pydensecrf2_flat_ms=ref_flat_ms,
                               pydensecrf2_cpu_ms_per_img=float(np.mean(ref_cpu)),
                               speedup=float(np.mean(np.array(ref_ms) / np.array(ms))),
                               speedup_cpu=float(np.mean(np.array(ref_cpu) / np.array(cpu))),
                               argmax_agreement=float(np.mean(agree)), argmax_agreement_min=float(np.min(agree)),
                               mean_abs_diff=float(np.mean(mad)))
                result["runs"].append(run)
                print(json.dumps(run), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "crf.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'crf.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
