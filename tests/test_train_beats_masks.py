"""`dhr train` + `dhr predict`: the trained network's masks must beat the noisy masks it was trained on (issue 13).

Generated scenes with an exact answer (dhr_cli.testing.synthetic, cars and buses: one large object and small
ones touching it, 64x80 px). The training masks are that answer made wrong the way pseudo-masks are wrong,
independently in every image: each object's outline eroded or dilated by 1-4 px (CAMs too wide or too
narrow) and two blobs of a wrong label (background holes, objects spilling onto the background). A network
cannot fit errors that change from image to image in 60 iterations; it learns what is consistent (the
objects' appearance), so its predictions (`dhr predict` with flips and CRF, at the one scale it was
trained at) land closer to the answer than its training masks. A network that did not train makes masks
far worse than them.

Plain training (--no-dhr): online regeneration needs a network whose CAMs already mean something (the
paper starts from ImageNet weights); from a random init, with nothing downloaded, it has none (tried:
--dhr on these scenes, 60 iterations, predicts masks of mIoU 0.10).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dhr_cli.config import PredictConfig, TrainConfig
from dhr_cli.testing.synthetic import SceneSpec, make_dataset

pytestmark = pytest.mark.slow

SCENES = SceneSpec(height=64, width=80, classes=(4, 5))  # car, bus
# The smallest setup measured to learn reliably: 8 images, 30 epochs of batch 4 (60 iterations), ResNet-18.
# Colour is what tells the classes apart here; colour jitter (a regulariser for long runs on photographs)
# is off, and so is decoder dropout (at 64 channels it slows a 60-step run down).
TRAIN = TrainConfig(backbone="resnet18", decoder_channels=64, dropout=False, crop_size=64, scale_range=(80, 80),
                    color_jitter=(0.0, 0.0, 0.0, 0.0), batch_size=4, epochs=30, lr=0.02, ema_decay=0.9,
                    num_workers=0, val_split=None, dhr=False, log_every=1000, checkpoint_every=0, device="cpu")
# One scale: every scene is 64x80 and training does not resize them (the paper's extra scales 0.5, 1.5, 2.0
# need a network trained over a range of sizes; these would cost iterations this test cannot spend).
PREDICT = PredictConfig(scales=(1.0,), device="cpu")
MARGIN = 0.05  # mIoU points the predictions must gain over their training masks (measured gains: see below)


def _grow(region: np.ndarray, radius: int, dilate: bool) -> np.ndarray:
    t = torch.from_numpy(region.astype(np.float32))[None, None]
    k = 2 * radius + 1
    t = F.max_pool2d(t, k, 1, radius) if dilate else -F.max_pool2d(-t, k, 1, radius)
    return t[0, 0].numpy() > 0.5


def noisy_masks(gt_dir: Path, out_dir: Path, seed: int, max_radius: int = 4, blobs: int = 2) -> Path:
    """Pseudo-masks from the GT PNGs in GT_DIR: per object an erosion or dilation of 1..max_radius px,
    then `blobs` ellipses of a label drawn from background + the image's classes. No ignore pixels."""
    rng = np.random.default_rng(1000 + seed)
    out_dir.mkdir()
    for path in sorted(gt_dir.glob("*.png")):
        gt = np.array(Image.open(path))
        gt[gt == 255] = 0  # the GT's ignore band on outlines
        h, w = gt.shape
        yy, xx = np.mgrid[0:h, 0:w]
        labels = sorted(set(np.unique(gt).tolist()) - {0})
        mask = np.zeros_like(gt)
        for c in sorted(labels, key=lambda c: -(gt == c).sum()):  # small objects drawn over the large one
            mask[_grow(gt == c, int(rng.integers(1, max_radius + 1)), bool(rng.random() < 0.5))] = c
        for _ in range(blobs):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            ry, rx = rng.uniform(0.06, 0.14) * h, rng.uniform(0.06, 0.14) * w
            mask[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = int(rng.choice([0] + labels))
        Image.fromarray(mask).save(out_dir / path.name)
    return out_dir


def train_and_score(root: Path, seed: int, cfg: TrainConfig = TRAIN) -> tuple[float, float]:
    """(mIoU of the trained network's predictions, mIoU of its training masks), both against the GT."""
    from dataclasses import replace

    from dhr_cli.pipeline.evaluate import run_eval
    from dhr_cli.pipeline.predict import run_predict
    from dhr_cli.pipeline.train import run_train

    data = make_dataset(root / "data", n_images=8, seed=seed, spec=SCENES, val_fraction=0.0, stores=False)
    noisy = noisy_masks(data / "masks", root / "noisy", seed)
    run_train(replace(cfg, seed=seed), data, noisy, root / "run", quiet=True)
    run_predict(PREDICT, root / "run", data, root / "pred.h5", quiet=True)
    result = run_eval([root / "pred.h5", noisy], data)
    return result.methods[0].miou, result.methods[1].miou


def test_trained_network_beats_the_masks_it_was_trained_on(tmp_path):
    predicted, trained_on = train_and_score(tmp_path, seed=0)
    # measured, predicted vs trained-on mIoU: seed 0 0.833 vs 0.683 (+0.150), seed 1 0.763 vs 0.674 (+0.088),
    # seed 2 0.833 vs 0.669 (+0.164). A network that does not train fails by far: lr 1e-9 gives 0.000 (one
    # class everywhere), one epoch (2 iterations) 0.450, both against 0.683.
    assert predicted >= trained_on + MARGIN, (predicted, trained_on)
