"""A minimal torch Dataset over dhr's exported masks, for any PyTorch segmentation trainer.

    ds = PseudoMaskDataset("pseudo_voc/JPEGImages", "pseudo_voc/SegmentationClassAug")
    image, mask = ds[0]   # (3, H, W) float32 in [0, 1], (H, W) int64 class indices, 255 = ignore

The masks are the palette PNGs of `dhr export` (examples/masks_for_another_trainer.sh): their pixel
values are the class indices, so they are read as they are, never converted to RGB. Train with
`torch.nn.CrossEntropyLoss(ignore_index=255)`. `transform(image, mask) -> (image, mask)` is the
place for joint crops/flips and normalisation; without one, batching needs images of one size.

    python examples/pseudo_mask_dataset.py IMAGE_DIR MASK_DIR [IDS.txt]   # prints a summary
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class PseudoMaskDataset(torch.utils.data.Dataset):
    """Pairs IMAGE_DIR/<id>.<jpg|png|...> with MASK_DIR/<id>.png, for the ids of `ids_file` (default: every mask)."""

    def __init__(self, image_dir: str | Path, mask_dir: str | Path, ids_file: str | Path | None = None,
                 transform: Callable | None = None):
        self.image_dir, self.mask_dir, self.transform = Path(image_dir), Path(mask_dir), transform
        if ids_file is not None:
            self.ids = [line.strip() for line in Path(ids_file).read_text().splitlines() if line.strip()]
        else:
            self.ids = sorted(p.stem for p in self.mask_dir.glob("*.png"))
        if not self.ids:
            raise FileNotFoundError(f"{self.mask_dir}: no masks (<id>.png)")
        wanted = set(self.ids)
        self.images = {p.stem: p for p in self.image_dir.iterdir()
                       if p.stem in wanted and p.suffix.lower() in IMAGE_SUFFIXES}
        missing = [i for i in self.ids if i not in self.images]
        if missing:
            raise FileNotFoundError(f"{self.image_dir}: no image for {len(missing)} masks, e.g. {missing[:3]}")
        missing = [i for i in self.ids if not (self.mask_dir / f"{i}.png").is_file()]
        if missing:
            raise FileNotFoundError(f"{self.mask_dir}: no mask for {len(missing)} ids, e.g. {missing[:3]}")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        item_id = self.ids[index]
        image = np.asarray(Image.open(self.images[item_id]).convert("RGB"), dtype=np.float32) / 255.0
        with Image.open(self.mask_dir / f"{item_id}.png") as m:
            if m.mode not in ("P", "L"):
                raise ValueError(f"{m.filename}: mode {m.mode}; expected a palette or grayscale index PNG")
            mask = np.asarray(m)  # palette indices = class ids (no RGB conversion)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"{item_id}: mask {mask.shape} and image {image.shape[:2]} differ in size")
        image_t = torch.from_numpy(image).permute(2, 0, 1).contiguous()
        mask_t = torch.from_numpy(mask.astype(np.int64))
        if self.transform is not None:
            image_t, mask_t = self.transform(image_t, mask_t)
        return image_t, mask_t


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__.strip().splitlines()[-1].strip())
    ds = PseudoMaskDataset(*sys.argv[1:])
    image, mask = ds[0]
    values = sorted(set(torch.unique(mask).tolist()))
    print(f"{len(ds)} pairs; first ({ds.ids[0]}): image {tuple(image.shape)}, mask {tuple(mask.shape)}, values {values}")
