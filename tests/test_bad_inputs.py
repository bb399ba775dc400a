"""Bad inputs give one-line DatasetErrors naming the file (issue 13)."""
import json

import pytest

from dhr_cli.errors import DatasetError
from dhr_cli.io.datasets import open_dataset
from tests.helpers import make_flat


@pytest.mark.parametrize("bad", [[["cat"]], [1], "cat"])
def test_labels_json_with_non_string_labels_is_one_line(tmp_path, bad):
    root = make_flat(tmp_path / "ds")
    labels = json.loads((root / "labels.json").read_text())
    labels[next(iter(labels))] = bad
    (root / "labels.json").write_text(json.dumps(labels))
    with pytest.raises(DatasetError) as e:
        open_dataset(root)
    assert "labels.json" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("layout", ["voc", "dhr"])
@pytest.mark.parametrize("text, message", [("", "no class names"), ("background\ncat\nCat\n", "more than once"),
                                           (b"\xff\xfe\x00bad", "not UTF-8 text")])
def test_a_voc_or_dhr_classes_txt_is_checked_as_a_flat_one(tmp_path, layout, text, message):
    """VOC and DHR/MARS roots may carry a classes.txt; an empty one was an IndexError, a doubled name passed."""
    from tests.helpers import make_dhr, make_voc

    root = (make_voc if layout == "voc" else make_dhr)(tmp_path / layout)
    target = root / "classes.txt"
    target.write_bytes(text) if isinstance(text, bytes) else target.write_text(text)
    with pytest.raises(DatasetError, match=message) as e:
        open_dataset(root, "train")
    assert str(target) in str(e.value) and "\n" not in str(e.value)


# ---- the commands, end to end: exit 1 (2 for usage errors), one line naming the file, no output --------
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from typer.testing import CliRunner  # noqa: E402

from dhr_cli.cli import app  # noqa: E402
from dhr_cli.testing.synthetic import make_dataset  # noqa: E402

_runner = CliRunner()


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("bad") / "data", n_images=4, seed=5)
    seeds = root.parent / "seeds.h5"
    r = _runner.invoke(app, ["seed", "--cams", str(root / "cams.h5"), "--data", str(root), "--out", str(seeds),
                             "--no-crf", "-q"])
    assert r.exit_code == 0, r.output
    return root


def _corrupt(tmp: Path) -> Path:
    p = tmp / "corrupt.h5"
    p.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00garbage" * 64)
    return p


def _png(tmp: Path) -> Path:
    from PIL import Image

    p = tmp / "model.pt"
    Image.new("RGB", (4, 4)).save(p, format="PNG")
    return p


def _empty_features(d: Path, t: Path) -> Path:
    """A features store whose every item is (32, 0, 0): read in `dhr train`'s DataLoader workers."""
    from dhr_cli.io.datasets import open_dataset
    from tests.helpers import write_plain_store

    ds = open_dataset(d)
    items = {i: ("features", np.zeros((32, 0, 0), np.float16), {"image_size": list(ds.image_size(i))}) for i in ds.ids}
    return write_plain_store(t / "empty_feat.h5", "features", ds.classes, items)


def _ds(d: Path):
    from dhr_cli.io.datasets import open_dataset

    return open_dataset(d)


def _cams_other_classes(d: Path, t: Path) -> Path:
    """A cams store for the same ids whose class list is not the dataset's."""
    from tests.helpers import write_plain_store

    ds = _ds(d)
    items = {i: ("cams", np.ones((1, 4, 4), np.float16), {"labels": [1], "image_size": list(ds.image_size(i))})
             for i in ds.ids}
    return write_plain_store(t / "other_classes.h5", "cams", ["background", "plane", "boat", "kite"], items)


def _init_pngs(d: Path, t: Path, only_first: bool = False, size=None) -> Path:
    from PIL import Image

    folder = t / "init"
    folder.mkdir()
    ds = _ds(d)
    for i in ds.ids[:1] if only_first else ds.ids:
        h, w = size or ds.image_size(i)
        Image.fromarray(np.zeros((h, w), np.uint8)).save(folder / f"{i}.png")
    return folder


def _seeds(d: Path, t: Path, *, small: bool = False, foreign: bool = False) -> Path:
    """A seeds store of 8x8 masks (small) or of a label no image has (foreign)."""
    from tests.helpers import write_plain_store

    ds = _ds(d)
    items = {}
    for i in ds.ids:
        h, w = (8, 8) if small else ds.image_size(i)
        value = next(c for c in range(1, len(ds.classes)) if c not in ds.labels(i)) if foreign else 0
        items[i] = ("mask", np.full((h, w), value, np.uint8), {})
    return write_plain_store(t / "bad_seeds.h5", "seeds", ds.classes, items)


def _npy(d: Path, t: Path, how: str) -> Path:
    """clip-es .npy dicts for every image: NaN maps, more keys than maps, or one file of garbage."""
    src = t / "npy"
    src.mkdir()
    ds = _ds(d)
    for i in ds.ids:
        h, w = ds.image_size(i)
        keys = np.asarray(ds.labels(i)) - 1
        maps = np.ones((len(keys), h, w), np.float16)
        if how == "nan":
            maps[:, 0, 0] = np.nan
        if how == "count":
            keys = np.append(keys, keys[-1])
        np.save(src / f"{i}.npy", {"keys": keys, "attn_highres": maps})
    if how == "garbage":
        (src / f"{ds.ids[0]}.npy").write_bytes(b"\x93NUMPY garbage" * 8)
    return src


def _pt(d: Path, t: Path) -> Path:
    src = t / "pt"
    src.mkdir()
    for i in _ds(d).ids:
        (src / f"{i}.pt").write_bytes(b"PK\x03\x04 not a torch file")
    return src


def _model_other_classes(t: Path) -> Path:
    """A `dhr train` run on a 3-class dataset (background, cat, dog): not the synthetic set's 6 classes."""
    from dhr_cli.config import TrainConfig
    from dhr_cli.pipeline.train import run_train
    from tests.helpers import make_flat

    flat = make_flat(t / "flat")
    cfg = TrainConfig(backbone="resnet18", decoder_channels=8, crop_size=32, scale_range=(32, 40), batch_size=2,
                      epochs=1, num_workers=0, dhr=False, val_split=None)
    run_train(cfg, flat, flat / "masks", t / "run3", quiet=True, max_steps=1)
    return t / "run3"


def _existing(tmp: Path) -> Path:
    p = tmp / "exists.h5"
    p.write_bytes(b"keep me")
    return p


# (command, args builder(data, tmp) -> (args, the file the message must name, the output that must not appear))
_CASES = {
    "seed: missing --cams": lambda d, t: (["seed", "--cams", t / "nope.h5", "--data", d, "--out", t / "o.h5"],
                                          "nope.h5", t / "o.h5"),
    "seed: corrupt --cams": lambda d, t: (["seed", "--cams", _corrupt(t), "--data", d, "--out", t / "o.h5"],
                                          "corrupt.h5", t / "o.h5"),
    "seed: wrong-kind --cams": lambda d, t: (["seed", "--cams", d / "uss.h5", "--data", d, "--out", t / "o.h5"],
                                             "uss.h5", t / "o.h5"),
    "propagate: wrong-kind --uss": lambda d, t: (["propagate", "--seeds", d.parent / "seeds.h5", "--data", d, "--uss",
                                                  d / "cams.h5", "--wss", d / "wss.h5", "--out", t / "o.h5", "--no-crf"],
                                                 "cams.h5", t / "o.h5"),
    "propagate: existing output": lambda d, t: (["propagate", "--seeds", d.parent / "seeds.h5", "--data", d, "--uss",
                                                 d / "uss.h5", "--wss", d / "wss.h5", "--out", _existing(t), "--no-crf"],
                                                "exists.h5", None),
    "export: missing store": lambda d, t: (["export", t / "nope.h5", "--out", t / "png"], "nope.h5", t / "png"),
    "export: corrupt store": lambda d, t: (["export", _corrupt(t), "--out", t / "png"], "corrupt.h5", t / "png"),
    "export: --out is a file": lambda d, t: (["export", d.parent / "seeds.h5", "--out", _existing(t)], "exists.h5", None),
    "merge: kind mismatch": lambda d, t: (["merge", d / "uss.h5", d / "cams.h5", "--out", t / "o.h5"], ".h5", t / "o.h5"),
    "merge: existing output": lambda d, t: (["merge", d / "uss.h5", "--out", _existing(t)], "exists.h5", None),
    "predict: corrupt model.pt": lambda d, t: (["predict", "--model", _png(t), "--data", d, "--out", t / "o.h5"],
                                               "model.pt", t / "o.h5"),
    # output paths checked before the work starts (issue 13: these failed only after the work)
    "eval: --json is a folder": lambda d, t: (["eval", "--pred", d.parent / "seeds.h5", "--data", d, "--json", t],
                                              str(t), None),
    "cams: --save-head in a missing folder": lambda d, t: (["cams", "--data", d, "--wss", "lite0", "--train-head",
                                                            "--save-head", t / "nodir" / "h.pt", "--out", t / "o.h5"],
                                                           "nodir", t / "o.h5"),
    # issue 13's list of bad inputs still untested
    "seed: --cams classes differ from the dataset's": lambda d, t: (
        ["seed", "--cams", _cams_other_classes(d, t), "--data", d, "--out", t / "o.h5", "--no-crf"],
        "other_classes.h5", t / "o.h5"),
    "seed: --init-masks lacks images": lambda d, t: (
        ["seed", "--cams", d / "cams.h5", "--data", d, "--out", t / "o.h5", "--no-crf", "--init-masks",
         _init_pngs(d, t, only_first=True)], "init", t / "o.h5"),
    "seed: --init-masks of another size": lambda d, t: (
        ["seed", "--cams", d / "cams.h5", "--data", d, "--out", t / "o.h5", "--no-crf", "--init-masks",
         _init_pngs(d, t, size=(8, 8))], "init", t / "o.h5"),
    "propagate: seeds of another size than the image": lambda d, t: (
        ["propagate", "--seeds", _seeds(d, t, small=True), "--data", d, "--uss", d / "uss.h5", "--wss", d / "wss.h5",
         "--out", t / "o.h5", "--no-crf"], "bad_seeds.h5", t / "o.h5"),
    "propagate: seed labels outside the image's labels": lambda d, t: (
        ["propagate", "--seeds", _seeds(d, t, foreign=True), "--data", d, "--uss", d / "uss.h5", "--wss",
         d / "wss.h5", "--out", t / "o.h5", "--no-crf"], "bad_seeds.h5", t / "o.h5"),
    "import: NaN CAMs": lambda d, t: (["import", "clip-es", _npy(d, t, "nan"), "--data", d, "--out", t / "o.h5"],
                                      ".npy", t / "o.h5"),
    "import: more keys than CAMs": lambda d, t: (["import", "clip-es", _npy(d, t, "count"), "--data", d, "--out",
                                                  t / "o.h5"], ".npy", t / "o.h5"),
    "import: malformed .npy": lambda d, t: (["import", "clip-es", _npy(d, t, "garbage"), "--data", d, "--out",
                                             t / "o.h5"], ".npy", t / "o.h5"),
    "import: malformed .pt": lambda d, t: (["import", "dhr-pt", _pt(d, t), "--data", d, "--out", t / "o.h5"],
                                           ".pt", t / "o.h5"),
    "import: PNG of another size": lambda d, t: (["import", "png", _init_pngs(d, t, size=(8, 8)), "--data", d,
                                                  "--out", t / "o.h5"], "init", t / "o.h5"),
    "predict: model classes differ from the dataset's": lambda d, t: (
        ["predict", "--model", _model_other_classes(t), "--data", d, "--out", t / "o.h5", "--scales", "1",
         "--no-crf", "--device", "cpu"], "run3", t / "o.h5"),
    "refine: wrong-kind --masks": lambda d, t: (["refine", "--masks", d / "cams.h5", "--data", d, "--sam", "vit_b",
                                                 "--sam-weights", t / "sam.pth", "--out", t / "o.h5"],
                                                "cams.h5", t / "o.h5"),
    "refine: missing --sam-weights": lambda d, t: (["refine", "--masks", d.parent / "seeds.h5", "--data", d, "--sam",
                                                    "vit_b", "--sam-weights", t / "nope.pth", "--out", t / "o.h5"],
                                                   "nope.pth", t / "o.h5"),
    "refine: existing output": lambda d, t: (["refine", "--masks", d.parent / "seeds.h5", "--data", d, "--sam",
                                              "vit_b", "--sam-weights", t / "nope.pth", "--out", _existing(t)],
                                             "exists.h5", None),
    # the one output check (io/outputs.py check_output), run by every command before its work
    "seed: existing output": lambda d, t: (["seed", "--cams", d / "cams.h5", "--data", d, "--out", _existing(t)],
                                           "exists.h5", None),
    "seed: --out in a missing folder": lambda d, t: (["seed", "--cams", d / "cams.h5", "--data", d, "--out",
                                                      t / "nodir" / "o.h5"], "nodir", t / "nodir"),
    "seed: --out is a folder": lambda d, t: (["seed", "--cams", d / "cams.h5", "--data", d, "--out", t], str(t), None),
    "predict: --out is a folder": lambda d, t: (["predict", "--model", t, "--data", d, "--out", t], str(t), None),
    "import: existing output": lambda d, t: (["import", "png", d / "masks", "--data", d, "--out", _existing(t)],
                                             "exists.h5", None),
    "merge: --out in a missing folder": lambda d, t: (["merge", d / "uss.h5", "--out", t / "nodir" / "o.h5"],
                                                      "nodir", t / "nodir"),
    "export: --prompts is a file": lambda d, t: (["export", d.parent / "seeds.h5", "--out", t / "png", "--prompts",
                                                  _existing(t)], "exists.h5", t / "png"),
    "eval: existing --json": lambda d, t: (["eval", "--pred", d.parent / "seeds.h5", "--data", d, "--json",
                                            _existing(t)], "exists.h5", None),
    "eval: --report is a file": lambda d, t: (["eval", "--pred", d.parent / "seeds.h5", "--data", d, "--report",
                                               _existing(t)], "exists.h5", None),
    "train: --out is a file": lambda d, t: (["train", "--data", d, "--masks", d / "masks", "--out", _existing(t),
                                             "--no-dhr"], "exists.h5", None),
    "train: --out in a missing folder": lambda d, t: (["train", "--data", d, "--masks", d / "masks", "--out",
                                                       t / "nodir" / "run", "--no-dhr"], "nodir", t / "nodir"),
    "uss fit: --out in a missing folder": lambda d, t: (["uss", "fit", "--data", d, "--out", t / "nodir" / "h.pt"],
                                                        "nodir", t / "nodir"),
    "uss fit: --out is a folder": lambda d, t: (["uss", "fit", "--data", d, "--out", t], str(t), None),
    # option values that got past the checks (tracebacks, or NaN models and all-background masks without a word)
    "cams: --wss-weights without --wss": lambda d, t: (["cams", "--data", d, "--uss", "lite0", "--wss-weights",
                                                        t / "w.pt", "--out", t / "o.h5"], "--wss-weights", t / "o.h5"),
    "seed: --device meta": lambda d, t: (["seed", "--cams", d / "cams.h5", "--data", d, "--out", t / "o.h5",
                                          "--device", "meta"], "--device meta", t / "o.h5"),
    "propagate: --rw-bg nan": lambda d, t: (["propagate", "--method", "rw", "--rw-bg", "nan", "--seeds",
                                             d.parent / "seeds.h5", "--cams", d / "cams.h5", "--data", d, "--uss",
                                             d / "uss.h5", "--out", t / "o.h5"], "bg", t / "o.h5"),
    "train: --seed -1": lambda d, t: (["train", "--data", d, "--masks", d / "masks", "--out", t / "run", "--no-dhr",
                                       "--seed", "-1"], "seed", t / "run"),
    "uss fit: --lr inf": lambda d, t: (["uss", "fit", "--data", d, "--lr", "inf", "--out", t / "h.pt"], "lr",
                                       t / "h.pt"),
    # a DhrError raised in a DataLoader worker: its own line, not torch's re-wrapped worker traceback
    "train: 0x0 --uss features (in workers)": lambda d, t: (
        ["train", "--data", d, "--masks", d / "masks", "--uss", _empty_features(d, t), "--out", t / "run",
         "--backbone", "resnet18", "--epochs", "1", "--batch-size", "2", "--workers", "2", "--device", "cpu"],
        "empty_feat.h5", None),
}


@pytest.mark.parametrize("case", list(_CASES))
def test_bad_input_is_one_line_naming_the_file(synth, tmp_path, case):
    args, named, output = _CASES[case](synth, tmp_path)
    if args[0] != "merge":
        args = args + ["-q"]  # no progress bar: the error is the only line
    r = _runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 1, r.output
    assert isinstance(r.exception, SystemExit), r.exception  # no traceback
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and named in lines[0], r.output
    assert len(lines[0]) < 400 and "Traceback" not in lines[0], lines[0]
    if output is not None:
        assert not output.exists() and not Path(str(output) + ".partial").exists()
