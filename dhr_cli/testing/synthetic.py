"""A procedural dataset with the statistics of real photographs, for the demo, tests and benchmarks.

Scenes: a textured background covers most pixels; one large object and one or two small objects
that touch it (the paper's failure case: a minor class swallowed by a major one), of classes in
groups (animals: cat, dog; vehicles: car, bus; person alone), so that the USS features tell the
groups apart but not the classes inside a group, and the WSS features do the opposite.

Written in the flat layout of docs/contracts.md, plus three stores beside it that imitate what real
networks give: `cams.h5` (low-resolution CAMs that peak on a discriminative part, bleed into
touching objects and under-cover small ones), `uss.h5` (group-level features on a stride-8 grid)
and `wss.h5` (class-level but blurrier features on a stride-16 grid). These are simulations, not
network outputs: `dhr cams` produces the real thing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dhr_cli.io.provenance import make_provenance
from dhr_cli.io.store import create_store

CLASSES = ["background", "person", "cat", "dog", "car", "bus"]
GROUPS = {1: 0, 2: 1, 3: 1, 4: 2, 5: 2}  # label -> USS group (person | animals | vehicles)
# Mean colour of each class (RGB); instances vary around it.
_COLOURS = {1: (200, 150, 120), 2: (150, 110, 60), 3: (110, 80, 50), 4: (180, 30, 40), 5: (220, 180, 40)}


@dataclass(frozen=True)
class SceneSpec:
    height: int = 120
    width: int = 160
    cam_stride: int = 16  # ResNet CAMs: small objects cover a cell or two
    uss_stride: int = 8
    wss_stride: int = 16
    uss_dim: int = 32
    wss_dim: int = 48
    classes: tuple[int, ...] | None = None  # the labels objects are drawn from; None: all five (the default scenes)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1] (bilinear upsampling of a coarse random grid)."""
    coarse = torch.from_numpy(rng.random((1, 1, cells, max(2, cells * w // h)), dtype=np.float32))
    return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0, 0].clamp(0, 1).numpy()


def _shape_mask(h: int, w: int, cy: float, cx: float, ry: float, rx: float, kind: int, rng) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind in (4, 5):  # vehicles: rounded boxes
        d = np.maximum(np.abs(yy - cy) / ry, np.abs(xx - cx) / rx)
        return d <= 1.0
    wobble = 1 + 0.12 * np.sin(np.arctan2(yy - cy, xx - cx) * rng.integers(2, 5) + rng.random() * 6)
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= wobble**2


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return x
    r = max(1, int(3 * sigma))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma**2))
    k = (k / k.sum()).view(1, 1, 1, -1)
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]
    t = F.conv2d(F.pad(t, (r, r, 0, 0), mode="replicate"), k)
    t = F.conv2d(F.pad(t, (0, 0, r, r), mode="replicate"), k.transpose(2, 3))
    return t[0, 0].numpy()


def make_scene(rng: np.random.Generator, spec: SceneSpec) -> tuple[np.ndarray, np.ndarray]:
    """(image (H, W, 3) uint8, gt (H, W) uint8) with one large object and small ones touching it."""
    h, w = spec.height, spec.width
    base = rng.integers(60, 200, size=3).astype(np.float32)
    field = _smooth_noise(rng, h, w, 4)[..., None]
    image = base * (0.7 + 0.6 * field) + rng.normal(0, 6, (h, w, 3))
    gt = np.zeros((h, w), np.uint8)
    pool = spec.classes
    big = int(rng.integers(1, 6)) if pool is None else int(rng.choice(pool))
    ry, rx = h * rng.uniform(0.18, 0.3), w * rng.uniform(0.14, 0.24)
    cy, cx = h * rng.uniform(0.4, 0.6), w * rng.uniform(0.3, 0.6)
    objects = [(big, cy, cx, ry, rx)]
    for _ in range(int(rng.integers(1, 3))):
        # A small object touching the large one: often of the same group (cat beside dog).
        same_group = [c for c in GROUPS if GROUPS[c] == GROUPS[big] and c != big and (pool is None or c in pool)]
        if same_group and rng.random() < 0.5:
            cls = int(rng.choice(same_group))
        else:
            cls = int(rng.integers(1, 6)) if pool is None else int(rng.choice(pool))
        sry, srx = ry * rng.uniform(0.25, 0.45), rx * rng.uniform(0.25, 0.45)
        angle = rng.uniform(0, 2 * math.pi)
        sy = np.clip(cy + (ry + sry * 0.6) * math.sin(angle), sry, h - sry)
        sx = np.clip(cx + (rx + srx * 0.6) * math.cos(angle), srx, w - srx)
        objects.append((cls, sy, sx, sry, srx))
    for cls, oy, ox, ory, orx in objects:
        region = _shape_mask(h, w, oy, ox, ory, orx, cls, rng)
        colour = np.array(_COLOURS[cls], np.float32) + rng.normal(0, 12, 3)
        texture = _smooth_noise(rng, h, w, 12)[..., None]
        image[region] = (colour * (0.8 + 0.4 * texture) + rng.normal(0, 5, (h, w, 3)))[region]
        gt[region] = cls
    # Thin ignore band on object borders, as in VOC ground truth.
    edges = np.zeros_like(gt, bool)
    edges[1:, :] |= gt[1:, :] != gt[:-1, :]
    edges[:, 1:] |= gt[:, 1:] != gt[:, :-1]
    gt[edges] = 255
    return np.clip(image, 0, 255).astype(np.uint8), gt


def simulate_cams(gt: np.ndarray, labels: list[int], rng, stride: int) -> np.ndarray:
    """(K, h, w) CAMs: a peak on a part of the object, bleeding into touching objects."""
    h, w = gt.shape
    cams = []
    for c in labels:
        region = (gt == c).astype(np.float32)
        ys, xs = np.nonzero(region)
        py, px = ys[rng.integers(len(ys))], xs[rng.integers(len(xs))]
        yy, xx = np.mgrid[0:h, 0:w]
        size = math.sqrt(region.sum())
        peak = np.exp(-((yy - py) ** 2 + (xx - px) ** 2) / (2 * (0.6 * size) ** 2))
        cam = _blur(region, 0.15 * size) * (0.35 + 0.65 * peak)
        # Bleed into touching objects (what makes a large class swallow a small one).
        others = np.isin(gt, [o for o in labels if o != c]).astype(np.float32)
        cam += 0.85 * _blur(region, 0.5 * size) * others
        cam += 0.08 * _smooth_noise(rng, h, w, 6)
        cams.append(cam)
    x = torch.from_numpy(np.stack(cams).astype(np.float32))[None]
    x = F.avg_pool2d(x, stride, ceil_mode=True)[0]
    x = x / x.flatten(1).amax(1).clamp_min(1e-5)[:, None, None]
    return x.numpy()


def simulate_features(gt: np.ndarray, emb: np.ndarray, rng, stride: int, noise: float, blur: float) -> np.ndarray:
    """(D, h, w) features: an embedding per label value, area-pooled to the grid, plus noise."""
    filled = gt.copy()
    filled[filled == 255] = 0
    dense = emb[filled]  # (H, W, D)
    dense = dense + noise * rng.normal(0, 1, dense.shape).astype(np.float32)
    x = torch.from_numpy(np.ascontiguousarray(dense.transpose(2, 0, 1)))[None]
    h, w = math.ceil(gt.shape[0] / stride), math.ceil(gt.shape[1] / stride)
    x = F.adaptive_avg_pool2d(x, (h, w))[0].numpy()
    return np.stack([_blur(c, blur) for c in x]) if blur > 0 else x


def make_dataset(root: str | Path, n_images: int = 24, seed: int = 0, spec: SceneSpec = SceneSpec(),
                 val_fraction: float = 0.25, stores: bool = True, overwrite: bool = False) -> Path:
    """Write the procedural dataset (flat layout) and, with `stores`, cams/uss/wss stores in ROOT."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    (root / "splits").mkdir(exist_ok=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    rng = np.random.default_rng(seed)
    # Embeddings: USS knows groups (classes of a group nearly identical), WSS knows classes.
    n = len(CLASSES)
    group_emb = rng.normal(0, 1, (4, spec.uss_dim)).astype(np.float32)
    uss_emb = np.stack([group_emb[3]] + [group_emb[GROUPS[c]] + 0.25 * rng.normal(0, 1, spec.uss_dim) for c in range(1, n)])
    wss_emb = rng.normal(0, 1, (n, spec.wss_dim)).astype(np.float32)
    uss_emb = uss_emb.astype(np.float32)
    ids, labels, samples = [], {}, []
    for i in range(n_images):
        image, gt = make_scene(rng, spec)
        item_id = f"synth_{i:04d}"
        Image.fromarray(image).save(root / "images" / f"{item_id}.png")
        Image.fromarray(gt).save(root / "masks" / f"{item_id}.png")
        present = sorted(set(np.unique(gt).tolist()) - {0, 255})
        labels[item_id] = [CLASSES[c] for c in present]
        ids.append(item_id)
        samples.append((item_id, gt, present))
    (root / "labels.json").write_text(json.dumps(labels, indent=1))
    n_val = int(round(n_images * val_fraction))
    (root / "splits" / "train.txt").write_text("\n".join(ids[n_val:]) + "\n")
    (root / "splits" / "val.txt").write_text("\n".join(ids[:n_val]) + "\n")
    if stores:
        _write_stores(root, samples, rng, spec, uss_emb, wss_emb, overwrite)
    return root


def _write_stores(root, samples, rng, spec, uss_emb, wss_emb, overwrite) -> None:
    prov = make_provenance("synthetic", {"spec": spec.__dict__, "note": "simulated CAMs and features"})
    kw = dict(provenance=prov, overwrite=overwrite)
    with create_store(root / "cams.h5", "cams", CLASSES, **kw) as cams, \
         create_store(root / "uss.h5", "features", CLASSES, root_attrs={"source": "synthetic-uss"}, **kw) as uss, \
         create_store(root / "wss.h5", "features", CLASSES, root_attrs={"source": "synthetic-wss"}, **kw) as wss:  # fmt: skip
        for item_id, gt, present in samples:
            size = list(gt.shape)
            c = simulate_cams(gt, present, rng, spec.cam_stride)
            cams.write(item_id, {"cams": c.astype(np.float16)}, {"cams": {"labels": present, "image_size": size}})
            u = simulate_features(gt, uss_emb, rng, spec.uss_stride, noise=0.6, blur=0.0)
            uss.write(item_id, {"features": u.astype(np.float16)}, {"features": {"image_size": size}})
            v = simulate_features(gt, wss_emb, rng, spec.wss_stride, noise=1.0, blur=0.6)
            wss.write(item_id, {"features": v.astype(np.float16)}, {"features": {"image_size": size}})
