"""Dense CRF benchmark: dhr's PyTorch mean field vs pydensecrf2 (the authors' pydensecrf, rebuilt).

Inputs: four photographs shipped with scikit-image (astronaut, coffee, chelsea, rocket)
resized to 500x375 (PASCAL VOC's usual size), with CAM-like probability maps
of 3 and 21 labels: colour-and-position k-means regions (5 of them, each given one label) as
coarse one-hot maps at 1/16 resolution, upsampled bilinearly, plus low-frequency and pixel
noise, softmax. CRF parameters: the authors' (CRFConfig defaults, 10 iterations).

Reported per label count, averaged over the photos:
  - ms/img of pydensecrf2 (single-threaded C++), of dhr batch 1 and batch 4 (best of --rounds,
    interleaved with pydensecrf2 on the same inputs, torch on --threads threads);
  - agreement with pydensecrf2: share of pixels with the same argmax, mean total-variation
    distance of the per-pixel distributions (0.5 * sum_l |p - q|), mean |p - q| over all
    entries, and the share of the pixels
    pydensecrf2 changes (argmax out != argmax in) that dhr changes the same way.
--max-side sweeps CRFConfig.max_side (the first value also gives the batch-4 timing).

    python bench/crf.py --out bench_out/crf                       # writes crf.json
    python bench/crf.py --out /tmp/c --max-side 48 64 96 128      # sweep
Needs scikit-image (photos); pydensecrf2 is optional (pip install pydensecrf2).
"""

from __future__ import annotations

import argparse
import json
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
    best, res = float("inf"), None
    for _ in range(rounds):
        t = time.perf_counter()
        res = fn()
        best = min(best, time.perf_counter() - t)
    return best, res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--labels", type=int, nargs="+", default=[3, 21])
    ap.add_argument("--max-side", type=int, nargs="+", default=[CRFConfig().max_side])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (pydensecrf2 is single-threaded)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    try:
        import pydensecrf.densecrf  # noqa: F401
        have_ref = True
    except ImportError:
        have_ref = False
        print("pydensecrf2 is not installed (pip install pydensecrf2): only dhr timings are reported")
    ph = photos()
    result = {"image_size": [375, 500], "photos": list(PHOTOS), "threads": args.threads, "device": str(dev),
              "pydensecrf2": have_ref, "config": vars(CRFConfig()), "runs": []}
    for n_lab in args.labels:
        items = [(name, img, cam_like(img, n_lab, seed)) for seed, (name, img) in enumerate(ph.items())]
        ims = [torch.from_numpy(img).permute(2, 0, 1).float()[None].to(dev) for _, img, _ in items]
        prs = [torch.from_numpy(p)[None].to(dev) for _, _, p in items]
        ref_ms, refs = [], []
        if have_ref:
            for (_, img, p) in items:
                t, q = timed(lambda: pydensecrf_run(img, p, CRFConfig()), args.rounds)
                ref_ms.append(t * 1000)
                refs.append(q)
        for si, side in enumerate(args.max_side):
            cfg = CRFConfig(max_side=side)
            dense_crf(ims[0], prs[0], cfg)  # warm-up
            ms1, agree, tv, mad, rec = [], [], [], [], []
            for k, (_, _, p) in enumerate(items):
                t, o = timed(lambda: dense_crf(ims[k], prs[k], cfg), args.rounds)
                ms1.append(t * 1000)
                if have_ref:
                    o = o[0].cpu().numpy()
                    q = refs[k]
                    agree.append(float((o.argmax(0) == q.argmax(0)).mean()))
                    tv.append(float(0.5 * np.abs(o - q).sum(0).mean()))
                    mad.append(float(np.abs(o - q).mean()))
                    ch = q.argmax(0) != p.argmax(0)
                    rec.append(float(((o.argmax(0) == q.argmax(0)) & ch).sum() / max(int(ch.sum()), 1)))
            run = {"labels": n_lab, "max_side": side, "dhr_ms_per_img_batch1": float(np.mean(ms1))}
            if si == 0:
                bi = torch.cat([ims[k % len(ims)] for k in range(4)])
                bp = torch.cat([prs[k % len(prs)] for k in range(4)])
                t, _ = timed(lambda: dense_crf(bi, bp, cfg), args.rounds)
                run["dhr_ms_per_img_batch4"] = t * 1000 / 4
            if have_ref:
                run.update(pydensecrf2_ms_per_img=float(np.mean(ref_ms)),
                           speedup_batch1=float(np.mean(ref_ms) / np.mean(ms1)),
                           argmax_agreement=float(np.mean(agree)), argmax_agreement_min=float(np.min(agree)),
                           mean_tv_distance=float(np.mean(tv)), mean_abs_diff=float(np.mean(mad)), changed_pixels_matched=float(np.mean(rec)),
                           pydensecrf2_changed_share=float(np.mean([(q.argmax(0) != p.argmax(0)).mean()
                                                                    for q, (_, _, p) in zip(refs, items)])))
            result["runs"].append(run)
            print(json.dumps(run), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "crf.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'crf.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
