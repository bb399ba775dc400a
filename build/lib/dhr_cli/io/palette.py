"""The PASCAL VOC colour palette, palette PNGs and colour overlays for reports.

    voc_palette()                 -> list of 768 ints (256 RGB triplets), VOC's bit-interleaved map;
                                     index 255 is (224, 224, 192), VOC's "void" colour
    palette_array()               -> (256, 3) uint8, the same
    save_palette_png(path, mask)  writes a (H, W) uint8 mask as a palette PNG (indices kept, 255 too)
    colorize(mask)                -> (H, W, 3) uint8 RGB of the mask
    overlay(image, mask, alpha)   -> (H, W, 3) uint8 image blended with the mask colours
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from dhr_cli.errors import InputError

__all__ = ["voc_palette", "palette_array", "save_palette_png", "colorize", "overlay"]


@lru_cache(maxsize=1)
def _palette_tuple() -> tuple[int, ...]:
    pal: list[int] = []
    for i in range(256):
        r = g = b = 0
        c = i
        for bit in range(8):  # VOC: the bits of the index are spread over R, G, B from the top bit down
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        pal += [r, g, b]
    return tuple(pal)


def voc_palette() -> list[int]:
    """The 256-entry VOC palette as a flat [r0, g0, b0, r1, ...] list (768 ints), for `putpalette`.

    >>> voc_palette()[3:6], voc_palette()[255 * 3:]
    ([128, 0, 0], [224, 224, 192])
    """
    return list(_palette_tuple())


def palette_array() -> np.ndarray:
    """(256, 3) uint8: the VOC colour of each label value."""
    return np.array(_palette_tuple(), dtype=np.uint8).reshape(256, 3)


def save_palette_png(path: str | os.PathLike, mask: np.ndarray) -> None:
    """Write mask (H, W) uint8 label values as a VOC palette PNG; values (255 included) are kept as indices.

    The file is written as given (no temp name); callers that need atomicity write to a temp
    path and rename.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise InputError(f"{path}: a mask to save must be (H, W), got shape {mask.shape}")
    if mask.dtype != np.uint8:
        if mask.size and (mask.min() < 0 or mask.max() > 255):
            raise InputError(f"{path}: mask values must be in 0..255 to fit a palette PNG")
        mask = mask.astype(np.uint8)
    h, w = mask.shape
    im = Image.frombytes("P", (w, h), np.ascontiguousarray(mask).tobytes())
    im.putpalette(voc_palette())
    im.save(Path(path), format="PNG")


def colorize(mask: np.ndarray) -> np.ndarray:
    """mask (H, W) uint8 -> (H, W, 3) uint8 RGB in VOC colours."""
    return palette_array()[np.asarray(mask, dtype=np.uint8)]


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Blend image (H, W, 3) uint8 with the colours of mask (H, W); background (0) and 255 stay visible.

    Background pixels keep the image, ignore (255) pixels are drawn in VOC's void colour at the
    same alpha, every other label in its palette colour.
    """
    image = np.asarray(image, dtype=np.uint8)
    mask = np.asarray(mask, dtype=np.uint8)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[:2] != mask.shape:
        raise InputError(f"overlay needs image (H, W, 3) and mask (H, W) of the same size, got {image.shape} and {mask.shape}")
    colour = colorize(mask).astype(np.float32)
    out = image.astype(np.float32)
    paint = (mask != 0)[..., None]
    out = np.where(paint, (1 - alpha) * out + alpha * colour, out)
    return out.round().astype(np.uint8)
