"""Small builders for test data: datasets in the three layouts, stores written with plain h5py, a live
writer's lock."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from dhr_cli.io.datasets import VOC_CLASSES


def voc_palette() -> list[int]:
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def save_palette_png(path: Path, mask: np.ndarray) -> None:
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette(voc_palette())
    im.save(path)


def scene(h: int = 24, w: int = 32, labels=(15,), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    for k, c in enumerate(labels):
        mask[2 + 3 * k : 10 + 3 * k, 2 + 6 * k : 12 + 6 * k] = c
    mask[0, :] = 255
    return image, mask


def make_flat(root: Path, classes=("background", "cat", "dog"), items=None, labels_json=True, splits=None) -> Path:
    items = items or {"a": (1,), "b": (1, 2), "c": (2,)}
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    labels = {}
    for i, (item_id, present) in enumerate(items.items()):
        image, mask = scene(labels=present, seed=i)
        Image.fromarray(image).save(root / "images" / f"{item_id}.png")
        Image.fromarray(mask).save(root / "masks" / f"{item_id}.png")
        labels[item_id] = [classes[c] for c in present]
    if labels_json:
        (root / "labels.json").write_text(json.dumps(labels))
    for name, ids in (splits or {}).items():
        (root / "splits").mkdir(exist_ok=True)
        (root / "splits" / f"{name}.txt").write_text("\n".join(ids) + "\n")
    return root


def _xml(names) -> str:
    objs = "".join(f"<object><name>{n}</name><difficult>0</difficult></object>" for n in names)
    return f"<annotation><filename>x.jpg</filename>{objs}</annotation>"


def make_voc(root: Path, items=None, aug_only=()) -> Path:
    items = items or {"2007_000032": (1, 15), "2007_000039": (19,), "2008_000001": (8,)}
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "Annotations", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    for i, (item_id, present) in enumerate(items.items()):
        image, mask = scene(labels=present, seed=i)
        Image.fromarray(image).save(root / "JPEGImages" / f"{item_id}.jpg", quality=95)
        folder = "SegmentationClassAug" if item_id in aug_only else "SegmentationClass"
        save_palette_png(root / folder / f"{item_id}.png", mask)
        (root / "Annotations" / f"{item_id}.xml").write_text(_xml(VOC_CLASSES[c] for c in present))
    ids = list(items)
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids[:-1]) + "\n")
    (root / "ImageSets/Segmentation/val.txt").write_text(ids[-1] + "\n")
    return root


def make_dhr(root: Path, split="train", items=None) -> Path:
    items = items or {"2007_000032": (1, 15), "2007_000039": (19,)}
    for sub in ("image", "mask", "xml"):
        (root / split / sub).mkdir(parents=True)
    for i, (item_id, present) in enumerate(items.items()):
        image, mask = scene(labels=present, seed=i)
        Image.fromarray(image).save(root / split / "image" / f"{item_id}.jpg", quality=95)
        save_palette_png(root / split / "mask" / f"{item_id}.png", mask)
        (root / split / "xml" / f"{item_id}.xml").write_text(_xml(VOC_CLASSES[c] for c in present))
    return root


def write_plain_store(path: Path, kind: str, classes, items: dict, version: int = 1) -> Path:
    """A store as another program would write it: plain h5py, only the contract's attributes."""
    with h5py.File(path, "w") as f:
        f.attrs["dhr_format"] = "dhr.store"
        f.attrs["dhr_version"] = version
        f.attrs["kind"] = kind
        f.attrs["classes"] = json.dumps(list(classes))
        f.attrs["ignore_index"] = 255
        f.attrs["provenance"] = json.dumps({"command": "other-tool"})
        g = f.create_group("items")
        for item_id, (name, array, attrs) in items.items():
            ds = g.create_group(item_id).create_dataset(name, data=array)
            for k, v in attrs.items():
                ds.attrs[k] = v
    return path


def free_port() -> int:
    """A TCP port nothing listens on now (bind to port 0 and let the kernel choose)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says WIDTHxHEIGHT (1-bit grey) with almost no pixel data: a few dozen bytes,
    the shape of a decompression bomb. Any decoder that trusts the header allocates width*height."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))
    return path


@contextmanager
def live_writer_lock(out: Path):
    """OUT.lock naming a live process of this host (started before the lock was written, so it is that
    lock's writer): what a second writer of OUT finds while the first runs."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        Path(out).with_name(Path(out).name + ".lock").write_text(f"{holder.pid} {socket.gethostname()}\n")
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()
