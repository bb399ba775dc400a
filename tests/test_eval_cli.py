"""`dhr eval` and `dhr export` end to end on tiny flat datasets and plain-h5py stores."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dhr_cli.cli import app
from dhr_cli.io.palette import palette_array, voc_palette

runner = CliRunner()
CLASSES = ["background", "cat", "dog"]


# ---- builders (plain files, no dhr code) ------------------------------------------------------
def gt_masks(seed: int = 0, n: int = 4, h: int = 12, w: int = 16) -> dict[str, np.ndarray]:
    """n GT masks: image 0 has cat, 1 dog, 2 both, 3 background only; a few 255 pixels each."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        m = np.zeros((h, w), np.uint8)
        if i % 4 in (0, 2):
            m[2:7, 2:8] = 1
        if i % 4 in (1, 2):
            m[5:11, 8:15] = 2
        m[rng.integers(0, h, 5), rng.integers(0, w, 5)] = 255
        out[f"img{i}"] = m
    return out


def make_dataset(root: Path, masks: dict[str, np.ndarray], classes=CLASSES, splits=None) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    for item_id, m in masks.items():
        Image.fromarray(np.full((*m.shape, 3), 90, np.uint8)).save(root / "images" / f"{item_id}.png")
        Image.fromarray(m).save(root / "masks" / f"{item_id}.png")  # grayscale index PNG
    for name, ids in (splits or {}).items():
        (root / "splits").mkdir(exist_ok=True)
        (root / "splits" / f"{name}.txt").write_text("\n".join(ids) + "\n")
    return root


def write_store(path: Path, masks: dict[str, np.ndarray], kind: str = "masks", classes=CLASSES) -> Path:
    """Only the contract's attributes, as another program would write them."""
    with h5py.File(path, "w") as f:
        f.attrs["dhr_format"] = "dhr.store"
        f.attrs["dhr_version"] = 1
        f.attrs["kind"] = kind
        f.attrs["classes"] = json.dumps(list(classes))
        f.attrs["ignore_index"] = 255
        f.attrs["provenance"] = json.dumps({"command": "elsewhere"})
        items = f.create_group("items")
        for item_id, m in masks.items():
            items.create_group(item_id).create_dataset("mask", data=m)
    return path


def noisy(masks: dict[str, np.ndarray], seed: int, p: float = 0.2) -> dict[str, np.ndarray]:
    """Predictions: GT with 255 replaced by background and a share p of pixels relabelled at random."""
    rng = np.random.default_rng(seed)
    out = {}
    for item_id, m in masks.items():
        pred = np.where(m == 255, 0, m).astype(np.uint8)
        flip = rng.random(m.shape) < p
        pred[flip] = rng.integers(0, len(CLASSES), flip.sum())
        out[item_id] = pred
    return out


def reference(gts: list[np.ndarray], preds: list[np.ndarray], k: int) -> dict:
    """Independent pooled per-class IoU/FPR/FNR (boolean masks per class)."""
    t = np.concatenate([g.ravel() for g in gts]).astype(np.int64)
    p = np.concatenate([q.ravel() for q in preds]).astype(np.int64)
    valid = t != 255
    t, p = t[valid], p[valid]
    res = {}
    for c in range(k):
        tp, tt, pp = np.sum((t == c) & (p == c)), np.sum(t == c), np.sum(p == c)
        u = tt + pp - tp
        if u:
            res[c] = (tp / u, (pp - tp) / u, (tt - tp) / u)
    return res


@pytest.fixture
def setup(tmp_path):
    gts = gt_masks()
    root = make_dataset(tmp_path / "data", gts, splits={"train": ["img0", "img1", "img2"], "empty": []})
    preds = noisy(gts, seed=1)
    store = write_store(tmp_path / "masks.h5", preds)
    return tmp_path, root, gts, preds, store


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


# ---- eval -------------------------------------------------------------------------------------
def test_eval_json_contract_and_values(setup):
    tmp, root, gts, preds, store = setup
    r = invoke("eval", "--pred", store, "--data", root, "--json", tmp / "r.json", "-q")
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp / "r.json").read_text())
    for key in ("miou", "mfpr", "mfnr", "vanishing_rate"):
        assert isinstance(doc[key], float) and 0 <= doc[key] <= 1
    assert doc["images"] == 4
    ref = reference(list(gts.values()), list(preds.values()), 3)
    assert set(doc["per_class"]) == {CLASSES[c] for c in ref}
    for c, (iou, fpr, fnr) in ref.items():
        got = doc["per_class"][CLASSES[c]]
        assert got["iou"] == pytest.approx(iou) and got["fpr"] == pytest.approx(fpr) and got["fnr"] == pytest.approx(fnr)
        assert got["iou"] + got["fpr"] + got["fnr"] == pytest.approx(1.0)
    assert doc["miou"] == pytest.approx(np.mean([v[0] for v in ref.values()]))
    # protocol stated in the output and the JSON
    assert "split (all): 4 images" in r.output and "background" in r.output and "included" in r.output
    assert doc["protocol"]["background_included"] is True and doc["protocol"]["split_images"] == 4


def test_eval_split_and_vanishing_rate(tmp_path):
    gts = gt_masks()
    root = make_dataset(tmp_path / "data", gts, splits={"train": ["img0", "img1", "img2"]})
    preds = {k: np.where(v == 255, 0, v).astype(np.uint8) for k, v in gts.items()}
    preds["img2"][preds["img2"] == 2] = 0  # the dog of img2 vanishes
    store = write_store(tmp_path / "m.h5", preds)
    r = invoke("eval", "--pred", store, "--data", root, "--split", "train", "--json", tmp_path / "r.json", "-q")
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "r.json").read_text())
    # pairs: img0 cat, img1 dog, img2 cat + dog = 4; vanished: img2 dog
    assert doc["images"] == 3 and doc["vanishing"] == {"vanished": 1, "pairs": 4}
    assert doc["vanishing_rate"] == pytest.approx(0.25)
    assert doc["protocol"]["split"] == "train"


def test_png_folder_scores_like_the_store_and_export_round_trips(setup):
    tmp, root, gts, preds, store = setup
    r = invoke("export", store, "--out", tmp / "pngs", "-q")
    assert r.exit_code == 0, r.output
    r1 = invoke("eval", "--pred", store, "--data", root, "--json", tmp / "a.json", "-q")
    r2 = invoke("eval", "--pred", tmp / "pngs", "--data", root, "--json", tmp / "b.json", "-q")
    assert r1.exit_code == 0 and r2.exit_code == 0, r2.output
    a, b = (json.loads((tmp / n).read_text()) for n in ("a.json", "b.json"))
    for key in ("miou", "mfpr", "mfnr", "vanishing_rate", "per_class", "images"):
        assert a[key] == b[key]


def test_rgb_voc_colour_pngs_are_read_as_labels(setup):
    tmp, root, gts, preds, store = setup
    (tmp / "rgb").mkdir()
    for item_id, m in preds.items():
        Image.fromarray(palette_array()[m]).save(tmp / "rgb" / f"{item_id}.png")
    r1 = invoke("eval", "--pred", store, "--data", root, "--json", tmp / "a.json", "-q")
    r2 = invoke("eval", "--pred", tmp / "rgb", "--data", root, "--json", tmp / "b.json", "-q")
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    assert json.loads((tmp / "a.json").read_text())["miou"] == json.loads((tmp / "b.json").read_text())["miou"]


def test_compare_side_by_side(setup):
    tmp, root, gts, preds, store = setup
    other = write_store(tmp / "other.h5", noisy(gts, seed=2, p=0.5))
    r = invoke("eval", "--pred", store, "--compare", other, "--data", root, "--json", tmp / "r.json", "-q", "--top", 3)
    assert r.exit_code == 0, r.output
    assert "IoU masks" in r.output and "IoU other" in r.output and "Δ other" in r.output and "differ most" in r.output
    doc = json.loads((tmp / "r.json").read_text())
    assert doc["method"] == "masks" and doc["compare"][0]["method"] == "other"
    diffs = doc["differences"]["other"]["images"]
    assert len(diffs) == 4  # the JSON keeps at least 20 (here: every image)
    assert [abs(d["diff"]) for d in diffs] == sorted((abs(d["diff"]) for d in diffs), reverse=True)
    assert all(d["diff"] == pytest.approx(d["miou_b"] - d["miou_a"]) for d in diffs)
    # several --pred is the same as --compare
    r2 = invoke("eval", "--pred", store, "--pred", other, "--data", root, "--json", tmp / "r2.json", "-q")
    assert r2.exit_code == 0, r2.output
    assert json.loads((tmp / "r2.json").read_text())["compare"][0]["miou"] == doc["compare"][0]["miou"]


def test_size_mismatch_fails_or_skips(setup):
    tmp, root, gts, preds, store = setup
    bad = dict(preds)
    bad["img1"] = np.zeros((5, 5), np.uint8)
    path = write_store(tmp / "bad.h5", bad)
    r = invoke("eval", "--pred", path, "--data", root, "-q")
    assert r.exit_code == 1 and "Error:" in r.output and "img1" in r.output and "5x5" in r.output
    r = invoke("eval", "--pred", path, "--data", root, "-q", "--on-size-mismatch", "skip", "--json", tmp / "r.json")
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp / "r.json").read_text())
    assert doc["images"] == 3 and doc["skipped"] == {"size mismatch": ["img1"]}


def test_labels_outside_the_class_list_fail(setup):
    tmp, root, gts, preds, store = setup
    bad = dict(preds)
    bad["img2"] = bad["img2"].copy()
    bad["img2"][0, 0] = 7
    r = invoke("eval", "--pred", write_store(tmp / "bad.h5", bad), "--data", root, "-q")
    assert r.exit_code == 1 and "img2" in r.output and "[7]" in r.output and "beyond the store's 3 classes" in r.output


def test_missing_predictions_are_counted_and_listed(setup):
    tmp, root, gts, preds, store = setup
    part = write_store(tmp / "part.h5", {k: v for k, v in preds.items() if k != "img3"})
    r = invoke("eval", "--pred", part, "--data", root, "--json", tmp / "r.json", "-q")
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp / "r.json").read_text())
    assert doc["images"] == 3 and doc["missing_predictions"]["ids"] == ["img3"]
    assert "1 without prediction" in r.output and "img3" in r.output
    # scored as empty: every labelled pixel of img3 becomes a false negative
    r = invoke("eval", "--pred", part, "--data", root, "--json", tmp / "e.json", "-q", "--on-missing", "empty")
    e = json.loads((tmp / "e.json").read_text())
    assert e["images"] == 4 and e["per_class"]["background"]["fnr"] > doc["per_class"]["background"]["fnr"]


def test_skip_background_only_images(setup):
    tmp, root, gts, preds, store = setup
    r = invoke("eval", "--pred", store, "--data", root, "--json", tmp / "r.json", "-q", "--skip-background-only")
    doc = json.loads((tmp / "r.json").read_text())
    assert doc["images"] == 3 and doc["dataset_skipped"] == {"background only (skip_background_only)": ["img3"]}
    assert "Skipped for all methods: 1" in r.output


@pytest.mark.parametrize(
    "case, expected",
    [
        ("empty_split", "holds no images"),
        ("cams_store", "expected 'masks' or 'seeds'"),
        ("other_classes", "holds 2 classes but the dataset has 3"),
        ("no_overlap", "could be scored"),
        ("not_there", "no such file"),
    ],
)
def test_bad_inputs_give_one_line_errors(setup, case, expected):
    tmp, root, gts, preds, store = setup
    split = []
    if case == "empty_split":
        split = ["--split", "empty"]
    elif case == "cams_store":
        with h5py.File(store, "a") as f:
            f.attrs["kind"] = "cams"
    elif case == "other_classes":
        store = write_store(tmp / "two.h5", preds, classes=["background", "cat"])
    elif case == "no_overlap":
        store = write_store(tmp / "x.h5", {"zzz": preds["img0"]})
    elif case == "not_there":
        store = tmp / "nope.h5"
    r = invoke("eval", "--pred", store, "--data", root, "-q", *split)
    assert r.exit_code == 1, r.output
    assert r.output.count("Error:") == 1 and expected in r.output


# ---- export -----------------------------------------------------------------------------------
def test_export_writes_palette_pngs_with_255_kept(setup):
    tmp, root, gts, preds, store = setup
    masks = {k: v.copy() for k, v in gts.items()}  # GT holds 255 pixels
    path = write_store(tmp / "with255.h5", masks)
    r = invoke("export", path, "--out", tmp / "out")
    assert r.exit_code == 0, r.output
    files = sorted(p.name for p in (tmp / "out").iterdir())
    assert files == [f"{k}.png" for k in sorted(masks)]  # nothing else (no temp files)
    for item_id, m in masks.items():
        with Image.open(tmp / "out" / f"{item_id}.png") as im:
            assert im.mode == "P" and im.getpalette()[:768] == voc_palette()
            np.testing.assert_array_equal(np.asarray(im), m)
    assert (np.asarray(Image.open(tmp / "out" / "img0.png")) == 255).any()


def test_export_seeds_and_refuses_non_empty_folder(setup):
    tmp, root, gts, preds, store = setup
    seeds = write_store(tmp / "seeds.h5", gts, kind="seeds")
    out = tmp / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = invoke("export", seeds, "--out", out)
    assert r.exit_code == 1 and "not empty" in r.output and "--overwrite" in r.output
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    r = invoke("export", seeds, "--out", out, "--overwrite")
    assert r.exit_code == 0 and "4 seeds" in r.output
    assert len(list(out.glob("*.png"))) == 4 and (out / "keep.txt").exists()


def test_export_refuses_cams_store(setup):
    tmp, root, gts, preds, store = setup
    with h5py.File(store, "a") as f:
        f.attrs["kind"] = "cams"
    r = invoke("export", store, "--out", tmp / "o")
    assert r.exit_code == 1 and "expected 'masks' or 'seeds'" in r.output and not (tmp / "o").exists()


# ---- several loader batches, in workers -------------------------------------------------------
def _per_image_reference(gt: np.ndarray, pred: np.ndarray, k: int) -> tuple[float, set[int]]:
    """Image mIoU over classes with union > 0, and the foreground GT classes with no predicted pixel."""
    valid = gt != 255
    ious, vanished = [], set()
    for c in range(k):
        t, p = (gt == c) & valid, (pred == c) & valid
        u = np.sum(t | p)
        if u:
            ious.append(np.sum(t & p) / u)
        if c > 0 and t.any() and not (pred == c).any():
            vanished.add(c)
    return float(np.mean(ious)) if ious else float("nan"), vanished


def test_batches_in_workers_match_one_process_and_references(tmp_path):
    from dhr_cli.config import EVAL_BATCH
    from dhr_cli.pipeline.evaluate import run_eval

    n = 2 * EVAL_BATCH + 7  # three loader tasks, the last one short
    gts = gt_masks(n=n)
    root = make_dataset(tmp_path / "data", gts)
    a, b = noisy(gts, seed=1), noisy(gts, seed=2, p=0.6)
    b["img5"] = np.where(b["img5"] == 1, 0, b["img5"]).astype(np.uint8)  # a vanished cat, if img5 has one
    del b[f"img{EVAL_BATCH + 3}"]  # missing from the second source, in the second task
    sa, sb = write_store(tmp_path / "a.h5", a), write_store(tmp_path / "b.h5", b)
    one = run_eval([sa, sb], root, workers=0)
    two = run_eval([sa, sb], root, workers=2)
    assert json.dumps(one.to_json(top=n)) == json.dumps(two.to_json(top=n))
    ids = sorted(gts)
    for m, preds in zip(two.methods, (a, b)):
        scored = [i for i in ids if i in preds]
        assert m.ids == scored
        ref = reference([gts[i] for i in scored], [preds[i] for i in scored], 3)
        for c, (iou, fpr, fnr) in ref.items():
            assert m.scores.iou[c] == pytest.approx(iou) and m.scores.fpr[c] == pytest.approx(fpr)
        per = [_per_image_reference(gts[i], preds[i], 3) for i in scored]
        np.testing.assert_allclose(m.per_image_miou(), [p[0] for p in per])
        pairs = sum(len(set(np.unique(gts[i]).tolist()) & {1, 2}) for i in scored)
        assert m.vanishing == (sum(len(p[1]) for p in per), pairs)
    assert two.methods[1].missing == [f"img{EVAL_BATCH + 3}"]


def test_errors_from_a_worker_stay_one_line(tmp_path):
    from dhr_cli.config import EVAL_BATCH

    gts = gt_masks(n=2 * EVAL_BATCH + 1)
    root = make_dataset(tmp_path / "data", gts)
    preds = noisy(gts, seed=1)
    bad = f"img{EVAL_BATCH + 5}"
    preds[bad] = preds[bad].copy()
    preds[bad][0, 0] = 9
    from dhr_cli.errors import InputError
    from dhr_cli.pipeline.evaluate import run_eval

    store = write_store(tmp_path / "bad.h5", preds)
    with pytest.raises(InputError) as e:  # raised in a worker, reaches the caller as itself
        run_eval([store], root, workers=2)
    assert bad in str(e.value) and "[9]" in str(e.value) and "\n" not in str(e.value)
    r = invoke("eval", "--pred", store, "--data", root, "-q")
    assert r.exit_code == 1 and bad in r.output and "[9]" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output


def test_a_prediction_that_is_not_a_uint8_mask_fails_in_one_line(setup):
    tmp, root, gts, preds, store = setup
    bad = dict(preds)
    bad["img1"] = bad["img1"].astype(np.uint16)
    r = invoke("eval", "--pred", write_store(tmp / "bad.h5", bad), "--data", root, "-q")
    assert r.exit_code == 1 and "'img1'" in r.output and "expected uint8 (H, W)" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1
    path = write_store(tmp / "nomask.h5", preds)
    with h5py.File(path, "a") as f:
        f["items/img2/other"] = f["items/img2/mask"][()]
        del f["items/img2/mask"]
    r = invoke("eval", "--pred", path, "--data", root, "-q")
    assert r.exit_code == 1 and "'img2' has no 'mask' dataset" in r.output, r.output
