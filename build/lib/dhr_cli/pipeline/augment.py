"""Joint augmentation of an image, its masks and its feature maps (the authors' training recipe).

One random geometry per sample (random resize of the longer side, horizontal flip, random crop
padded to the crop size) is drawn once and applied to everything that belongs to the image:
the RGB image (bilinear), masks (nearest, padding 255) and feature maps on their own grid
(bilinear sampling at the centres of the output cells). docs/method.md decision: the released code
pools USS features of the un-augmented image against the augmented crop; here the feature map
goes through the same resize, flip and crop as the image.

Coordinates: continuous pixel coordinates with pixel i covering [i, i+1). A crop pixel (i, j)
shows the resized (and flipped) image at (i + y0, j + x0); the resized image is the original
scaled by (h'/H, w'/W). A feature map of (h, w) cells covers the whole original image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from dhr_cli.config import IGNORE_INDEX
from dhr_cli.models.base import IMAGENET_MEAN, IMAGENET_STD  # the one definition


@dataclass(frozen=True)
class Geometry:
    """The spatial part of one sample's augmentation."""

    image_size: tuple[int, int]  # (H, W) of the original image
    resized: tuple[int, int]  # (h', w') after the random resize
    flip: bool  # horizontal flip after the resize
    offset: tuple[int, int]  # (y0, x0) of the crop in the resized image; negative = padding before
    crop: tuple[int, int]  # (S_h, S_w) output size


def sample_geometry(rng: np.random.Generator, image_size: tuple[int, int], crop: int,
                    scale_range: tuple[int, int], flip: bool = True) -> Geometry:
    """Random longer side in scale_range, flip with p=0.5, random crop (padded when smaller)."""
    h, w = image_size
    longer = rng.uniform(scale_range[0], scale_range[1])
    s = longer / max(h, w)
    rh, rw = max(1, int(round(h * s))), max(1, int(round(w * s)))
    do_flip = bool(flip and rng.random() < 0.5)
    y0 = int(rng.integers(min(0, rh - crop), max(0, rh - crop) + 1))
    x0 = int(rng.integers(min(0, rw - crop), max(0, rw - crop) + 1))
    return Geometry((h, w), (rh, rw), do_flip, (y0, x0), (crop, crop))


def identity_geometry(image_size: tuple[int, int]) -> Geometry:
    return Geometry(tuple(image_size), tuple(image_size), False, (0, 0), tuple(image_size))


def _place(array: np.ndarray, g: Geometry, fill) -> np.ndarray:
    """Crop (and pad with `fill`) an already resized and flipped (h', w', ...) array to g.crop."""
    sh, sw = g.crop
    rh, rw = g.resized
    out = np.full((sh, sw) + array.shape[2:], fill, dtype=array.dtype)
    y0, x0 = g.offset
    ys, xs = max(0, y0), max(0, x0)  # source window start in the resized array
    ye, xe = min(rh, y0 + sh), min(rw, x0 + sw)
    if ye > ys and xe > xs:
        out[ys - y0:ye - y0, xs - x0:xe - x0] = array[ys:ye, xs:xe]
    return out


def warp_image(image: np.ndarray, g: Geometry) -> np.ndarray:
    """(H, W, 3) uint8 -> (S_h, S_w, 3) uint8, bilinear resize, flip, crop; padding is 0."""
    im = Image.fromarray(image)
    if g.resized != g.image_size:
        im = im.resize((g.resized[1], g.resized[0]), Image.BILINEAR)
    arr = np.asarray(im)
    if g.flip:
        arr = arr[:, ::-1]
    return _place(arr, g, 0)


def warp_mask(mask: np.ndarray, g: Geometry) -> np.ndarray:
    """(H, W) uint8 -> (S_h, S_w) uint8, nearest resize, flip, crop; padding is 255."""
    im = Image.fromarray(mask)
    if g.resized != g.image_size:
        im = im.resize((g.resized[1], g.resized[0]), Image.NEAREST)
    arr = np.asarray(im)
    if g.flip:
        arr = arr[:, ::-1]
    return _place(arr, g, IGNORE_INDEX)


def valid_region(g: Geometry) -> np.ndarray:
    """(S_h, S_w) bool: crop pixels that show the image (not padding)."""
    return _place(np.ones(g.resized, dtype=bool), g, False)


def feature_grid(g: Geometry, grid: tuple[int, int]) -> torch.Tensor:
    """(1, gh, gw, 2) sampling grid (grid_sample convention, align_corners=False) of the cell centres.

    Output cell (a, b) covers crop pixels [a * S_h / gh, (a + 1) * S_h / gh) x [...]; its centre
    is mapped back through crop offset, flip and resize to the original image, then to [-1, 1].
    """
    (H, W), (rh, rw), (y0, x0), (sh, sw) = g.image_size, g.resized, g.offset, g.crop
    gh, gw = grid
    yc = (torch.arange(gh, dtype=torch.float64) + 0.5) * (sh / gh) + y0  # resized coordinates
    xc = (torch.arange(gw, dtype=torch.float64) + 0.5) * (sw / gw) + x0
    if g.flip:
        xc = rw - xc
    yo = yc * (H / rh)
    xo = xc * (W / rw)
    gy = 2 * yo / H - 1
    gx = 2 * xo / W - 1
    yy, xx = torch.meshgrid(gy, gx, indexing="ij")
    return torch.stack([xx, yy], dim=-1)[None].float()


def warp_features(features: torch.Tensor, g: Geometry, grid: tuple[int, int]) -> torch.Tensor:
    """features (D, h, w) covering the original image -> (D, gh, gw) on the crop's cell grid.

    Bilinear sampling at the cell centres; cells outside the image (padding) get 0. With the
    identity geometry and grid == (h, w) the map is returned unchanged (up to float rounding).
    """
    if features.ndim != 3:
        raise ValueError(f"features: expected (D, h, w), got {tuple(features.shape)}")
    sampling = feature_grid(g, grid).to(features.device)
    out = F.grid_sample(features[None].float(), sampling, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[0]


def color_jitter(image: np.ndarray, rng: np.random.Generator, strength: tuple[float, float, float, float]) -> np.ndarray:
    """Random brightness, contrast, saturation, hue (torchvision ColorJitter semantics, own RNG)."""
    b, c, s, h = strength
    if not any(strength):
        return image
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # uint8 (3, H, W)
    ops = []
    if b > 0:
        ops.append((TF.adjust_brightness, rng.uniform(max(0.0, 1 - b), 1 + b)))
    if c > 0:
        ops.append((TF.adjust_contrast, rng.uniform(max(0.0, 1 - c), 1 + c)))
    if s > 0:
        ops.append((TF.adjust_saturation, rng.uniform(max(0.0, 1 - s), 1 + s)))
    if h > 0:
        ops.append((TF.adjust_hue, rng.uniform(-h, h)))
    for i in rng.permutation(len(ops)):
        fn, factor = ops[i]
        x = fn(x, float(factor))
    return x.permute(1, 2, 0).numpy()


def normalize(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32, ImageNet mean/std."""
    x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1).div_(255)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) normalised -> (B, 3, H, W) float in 0..255 (for the CRF)."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((images * std + mean) * 255).clamp_(0, 255)
