"""Resource limits (issue 13): an image above --max-pixels is refused from its header, before anything is
decoded, with one line naming the file and its size (never PIL's DecompressionBombError / Warning); --scales
outside [0.1, 4] or more than 8 of them is a usage error."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dhr_cli.cli import app
from dhr_cli.io.datasets import open_dataset
from dhr_cli.testing.synthetic import make_dataset
from tests.helpers import png_header

_runner = CliRunner()


@pytest.fixture(autouse=True)
def _default_limit():
    """--max-pixels sets a process-wide limit: back to the default after each test."""
    from dhr_cli.config import MAX_PIXELS
    from dhr_cli.io.datasets import set_max_pixels

    yield
    set_max_pixels(MAX_PIXELS)


def _invoke(args):
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL's warning must never surface
        return _runner.invoke(app, [str(a) for a in args])


def _one_line(r) -> str:
    assert isinstance(r.exception, SystemExit), r.exception  # no traceback
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1, r.output
    return lines[0]


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    """The synthetic set with every input store made from the real images, then one image replaced by a
    PNG whose header says 20000x20000 (400 megapixels): `bomb` is that image's path."""
    from dhr_cli.config import TrainConfig
    from dhr_cli.io.provenance import make_provenance
    from dhr_cli.io.store import create_store
    from dhr_cli.models import sam
    from dhr_cli.pipeline.train import run_train
    from dhr_cli.testing.sam import tiny_sam, tiny_sam_type

    sam.SAM_TYPES.setdefault("vit_tiny", tiny_sam_type())
    tmp = tmp_path_factory.mktemp("limits")
    root = make_dataset(tmp / "data", n_images=4, seed=3)
    ds = open_dataset(root)
    r = _runner.invoke(app, ["seed", "--cams", str(root / "cams.h5"), "--data", str(root), "--out",
                             str(tmp / "seeds.h5"), "--no-crf", "-q"])
    assert r.exit_code == 0, r.output
    with create_store(tmp / "masks.h5", "masks", ds.classes, provenance=make_provenance("test")) as w:
        for i in ds.ids:
            w.write(i, {"mask": ds.gt(i)})
    torch.save(tiny_sam(seed=1).state_dict(), tmp / "sam.pth")
    cfg = TrainConfig(backbone="resnet18", decoder_channels=16, crop_size=64, scale_range=(64, 96), batch_size=2,
                      epochs=1, num_workers=0, dhr=False, val_split=None)
    run_train(cfg, root, root / "masks", tmp / "run", quiet=True, max_steps=1)
    (tmp / "npy").mkdir()
    for i in ds.ids:
        h, w = ds.image_size(i)
        keys = np.asarray(ds.labels(i)) - 1
        np.save(tmp / "npy" / f"{i}.npy", {"keys": keys, "attn_highres": np.ones((len(keys), h, w), np.float16)})
    victim = ds.image_path(ds.ids[0])
    png_header(victim, 20000, 20000)
    return victim


def _cases(root: Path, tmp: Path, out: Path) -> dict:
    d, s = root, root.parent
    return {
        "cams": ["cams", "--data", d, "--uss", "lite0", "--scales", "1", "--out", out],
        "seed --crf": ["seed", "--cams", d / "cams.h5", "--data", d, "--out", out, "--crf"],
        "seed --no-crf": ["seed", "--cams", d / "cams.h5", "--data", d, "--out", out, "--no-crf"],
        "propagate --crf": ["propagate", "--seeds", s / "seeds.h5", "--data", d, "--uss", d / "uss.h5", "--wss",
                            d / "wss.h5", "--out", out, "--crf"],
        "predict": ["predict", "--model", s / "run", "--data", d, "--out", out, "--scales", "1"],
        "refine": ["refine", "--masks", s / "masks.h5", "--data", d, "--sam", "vit_tiny", "--sam-weights",
                   s / "sam.pth", "--out", out],
        "eval": ["eval", "--pred", s / "masks.h5", "--data", d, "--json", out],
        "train": ["train", "--data", d, "--masks", d / "masks", "--out", out, "--no-dhr", "--backbone", "resnet18",
                  "--epochs", "1", "--batch-size", "2"],
        "uss fit": ["uss", "fit", "--data", d, "--out", out, "--steps", "1", "--batch-size", "2",
                    "--neighbours", "1"],
        "import": ["import", "clip-es", s / "npy", "--data", d, "--out", out],
    }


@pytest.mark.parametrize("command", list(_cases(Path("d"), Path("t"), Path("o"))))
def test_image_above_max_pixels_is_one_line_before_decoding(bomb, tmp_path, command):
    out = tmp_path / "out.h5"
    args = _cases(bomb.parent.parent, tmp_path, out)[command]
    r = _invoke(args + ["--device", "cpu", "-q"] if command not in ("eval", "import") else args + ["-q"])
    assert r.exit_code == 1, r.output
    line = _one_line(r)
    assert str(bomb) in line and "20000x20000" in line and "--max-pixels" in line, line
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir()), list(tmp_path.iterdir())


def test_max_pixels_option_sets_the_limit(bomb, tmp_path):
    """--max-pixels is the limit: below a normal image's size, that image is refused; 0 = no limit (the
    20000x20000 header then reaches the decoder, which finds no pixel data: still one line)."""
    root = make_dataset(tmp_path / "small", n_images=2, seed=4)
    ds = open_dataset(root)
    h, w = ds.image_size(ds.ids[0])
    args = ["seed", "--cams", root / "cams.h5", "--data", root, "--out", tmp_path / "o.h5", "--crf", "-q"]
    r = _invoke(args + ["--max-pixels", h * w - 1])
    assert r.exit_code == 1 and f"{w}x{h}" in _one_line(r), r.output
    assert _invoke(args + ["--max-pixels", h * w]).exit_code == 0
    (tmp_path / "o.h5").unlink()
    root = bomb.parent.parent
    args = ["seed", "--cams", root / "cams.h5", "--data", root, "--out", tmp_path / "o.h5", "--crf", "-q"]
    r = _invoke(args + ["--max-pixels", 0])
    assert r.exit_code == 1, r.output
    line = _one_line(r)
    assert str(bomb) in line and "cannot decode" in line, line
    assert not (tmp_path / "o.h5").exists()


def test_no_pil_warning_below_the_limit(tmp_path):
    """10000x10000 (100 MP) is within the default limit but above PIL's own (89 MP): PIL's warning must not
    appear; the header-only file then fails to decode, with one line."""
    root = make_dataset(tmp_path / "d", n_images=2, seed=1, stores=False)
    ds = open_dataset(root)
    victim = ds.image_path(ds.ids[0])
    png_header(victim, 10000, 10000)
    r = _invoke(["cams", "--data", root, "--uss", "lite0", "--scales", "1", "--out", tmp_path / "o.h5",
                 "--device", "cpu", "-q"])
    assert r.exit_code == 1, r.output
    line = _one_line(r)
    assert str(victim) in line and "cannot decode" in line and "Decompression" not in r.output, line
    assert not (tmp_path / "o.h5").exists()


@pytest.mark.parametrize("scales", ["100", "0", "-1", "4.5", ",".join(["1"] * 9), "1,nan", "inf", "0.01", "1.0,,0.5", "1.0,"])
@pytest.mark.parametrize("command", ["cams", "predict"])
def test_scales_out_of_range_is_a_usage_error(tmp_path, command, scales):
    root = make_flat_dataset(tmp_path)
    out = tmp_path / "o.h5"
    args = (["cams", "--data", root, "--uss", "lite0", "--out", out] if command == "cams"
            else ["predict", "--model", tmp_path, "--data", root, "--out", out])
    r = _invoke(args + ["--scales", scales, "-q"])
    assert r.exit_code == 2, r.output
    assert "--scales" in r.output and "[0.1, 4]" in r.output, r.output
    assert not out.exists()


def test_scales_in_range_are_accepted():
    from dhr_cli.cli.options import parse_scales

    assert parse_scales("4,0.25," + ",".join(["1"] * 6)) == (4.0, 0.25) + (1.0,) * 6


def make_flat_dataset(tmp_path: Path) -> Path:
    from tests.helpers import make_flat

    return make_flat(tmp_path / "flat")


def test_library_configs_bound_scales_too():
    from dhr_cli.config import CamsConfig, PredictConfig

    for cfg in (CamsConfig, PredictConfig):
        with pytest.raises(ValueError, match="scales"):
            cfg(scales=(100.0,))
