"""COCO GT cache (dhr info --build-cache), --gt-cache, --skip-missing-images, on a tiny generated COCO."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("pycocotools")

from dhr_cli.cli import app  # noqa: E402
from dhr_cli.io.coco import COCODataset  # noqa: E402
from dhr_cli.io.datasets import open_dataset  # noqa: E402
from dhr_cli.io.store import create_store, open_store  # noqa: E402
from tests.test_coco_layouts import _reference_mask, make_coco  # noqa: E402

JSON = "annotations/instances_train2014.json"
CACHE = "annotations/instances_train2014.gt.h5"


def _cli(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.output


def _pred_store(root: Path, path: Path) -> Path:
    """A masks store that disagrees with the GT on a few pixels (so scores are not trivially 1)."""
    js = root / JSON
    with create_store(path, "masks", ["background", "person", "car", "dog"], provenance={}) as w:
        for image_id in (9, 25, 30):
            m = _reference_mask(js, image_id)
            m[::3, ::4] = 1
            w.write(f"COCO_train2014_{image_id:012d}", {"mask": m})
    return path


def _eval_json(root: Path, pred: Path, out: Path, *extra) -> dict:
    code, output = _cli("eval", "--pred", pred, "--data", root, "--json", out, "--quiet", *extra)
    assert code == 0, output
    return json.loads(out.read_text())


def test_build_cache_equals_on_the_fly_and_eval_uses_it(tmp_path, monkeypatch):
    root = make_coco(tmp_path / "coco")
    pred = _pred_store(root, tmp_path / "pred.h5")
    before = _eval_json(root, pred, tmp_path / "a.json")  # no cache: rasterised on the fly
    code, output = _cli("info", root, "--build-cache", "--quiet")
    assert code == 0 and "3 of 3 images rasterised" in output, output
    cache = root / CACHE
    with open_store(cache, expect="masks") as s:
        assert sorted(s.ids) == open_dataset(root).ids
        for image_id in (9, 25, 30):  # the cache holds exactly pycocotools' semantic GT
            np.testing.assert_array_equal(s.read(f"COCO_train2014_{image_id:012d}").mask,
                                          _reference_mask(root / JSON, image_id))
    # eval now reads the cache: rasterising would fail the run
    monkeypatch.setattr(COCODataset, "rasterise_gt", lambda self, i: (_ for _ in ()).throw(AssertionError("rasterised")))
    after = _eval_json(root, pred, tmp_path / "b.json")
    assert after["miou"] == before["miou"] and after["per_class"] == before["per_class"]
    code, output = _cli("info", root, "--json")
    assert "up to date, 3 of 3 images" in json.loads(output)["gt_cache"]
    code, output = _cli("info", root, "--build-cache")
    assert code == 0 and "up to date, 0 of 3 images rasterised" in output


def test_stale_cache_is_noticed(tmp_path, caplog):
    root = make_coco(tmp_path / "coco")
    assert _cli("info", root, "--build-cache", "--quiet")[0] == 0
    js = root / JSON
    data = json.loads(js.read_text())
    st = js.stat()
    # same content, new time (a copy, a touch): the recorded sha256 keeps the cache valid
    os.utime(js, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    ds = open_dataset(root)
    ds.gt(ds.ids[0])
    assert ds.cache_state == "valid"
    # same size, different content: the car of image 25 becomes a person
    data["annotations"][1]["category_id"] = 1
    text = json.dumps(data)
    assert len(text) == st.st_size
    js.write_text(text)
    ds = open_dataset(root)
    with caplog.at_level("WARNING"):
        gt = ds.gt("COCO_train2014_000000000025")
    assert ds.cache_state == "stale"
    np.testing.assert_array_equal(gt, _reference_mask(js, 25))  # the new GT, not the cached one
    assert (gt == 1).any() and not (gt == 2).any()
    lines = [r.getMessage() for r in caplog.records if "GT cache not used" in r.getMessage()]
    assert len(lines) == 1 and "same size, different content" in lines[0] and "\n" not in lines[0]
    code, output = _cli("info", root, "--json")
    assert "stale" in json.loads(output)["gt_cache"]
    # a changed size; --build-cache replaces the stale cache
    js.write_text(text + " ")
    code, output = _cli("info", root, "--build-cache", "--quiet")
    assert code == 0 and "rebuilt, 3 of 3" in output, output
    with open_store(root / CACHE) as s:
        np.testing.assert_array_equal(s.read("COCO_train2014_000000000025").mask, _reference_mask(js, 25))


def test_explicit_cache_path_and_wrong_layout(tmp_path):
    root = make_coco(tmp_path / "coco")
    where = tmp_path / "elsewhere" / "gt.h5"
    where.parent.mkdir()
    assert _cli("info", root, "--build-cache", "--gt-cache", where, "--quiet")[0] == 0
    assert where.is_file() and not (root / CACHE).exists()
    ds = open_dataset(root, gt_cache=where)
    ds.gt(ds.ids[1])
    assert ds.cache_state == "valid"
    code, output = _cli("eval", "--pred", _pred_store(root, tmp_path / "p.h5"), "--data", root, "--gt-cache",
                        tmp_path / "nope.h5", "--quiet")
    assert code != 0 and "nope.h5: no such GT cache" in output and "Traceback" not in output
    flat = tmp_path / "flat"
    (flat / "images").mkdir(parents=True)
    (flat / "classes.txt").write_text("background\nx\n")
    from PIL import Image

    Image.new("RGB", (4, 4)).save(flat / "images" / "a.png")
    Image.new("L", (4, 4)).save(tmp_path / "m.png")
    code, output = _cli("info", flat, "--build-cache")
    assert code != 0 and "--build-cache is for COCO official annotation files" in output


def test_missing_images_cli(tmp_path):
    root = make_coco(tmp_path / "coco", drop_image=True)
    code, output = _cli("info", root)
    assert code != 0 and "1 of 3 images are missing" in output and "first COCO_train2014_000000000030.jpg" in output
    assert "--skip-missing-images" in output and "Traceback" not in output
    code, output = _cli("info", root, "--json", "--skip-missing-images")
    assert code == 0, output
    summary = json.loads(output)
    assert summary["items"] == 2 and summary["skipped_missing_images"] == 1
    # the cache covers what is there; once the image arrives a second build completes it (resume)
    code, output = _cli("info", root, "--build-cache", "--skip-missing-images", "--quiet")
    assert code == 0 and "2 of 2 images rasterised; 1 images missing from the folder skipped" in output, output
    pred = _pred_store(root, tmp_path / "pred.h5")
    code, output = _cli("eval", "--pred", pred, "--data", root, "--quiet")
    assert code != 0 and "1 of 3 images are missing" in output
    code, output = _cli("eval", "--pred", pred, "--data", root, "--quiet", "--skip-missing-images")
    assert code == 0 and "2 images" in output, output
    # the option does not leak into the next command of the same process
    assert _cli("info", root)[0] != 0
    from tests.test_coco_layouts import _write_image

    _write_image(root / "train2014" / "COCO_train2014_000000000030.jpg", 40, 60)
    code, output = _cli("info", root, "--build-cache", "--quiet")
    assert code == 0 and "completed, 1 of 3 images rasterised" in output, output


def test_every_data_command_takes_skip_missing_images():
    import typer.main

    group = typer.main.get_command(app)

    def commands(g, prefix=""):
        for name, cmd in g.commands.items():
            if hasattr(cmd, "commands"):
                yield from commands(cmd, f"{prefix}{name} ")
            else:
                yield f"{prefix}{name}", cmd

    takes_data = {name: {o for p in cmd.params for o in p.opts} for name, cmd in commands(group)}
    takes_data = {n: opts for n, opts in takes_data.items() if "--data" in opts}
    assert {"cams", "seed", "propagate", "eval", "import"} <= set(takes_data)
    assert [n for n, opts in takes_data.items() if "--skip-missing-images" not in opts] == []


def test_eval_with_the_cache_never_reads_the_json(tmp_path, monkeypatch):
    import h5py

    root = make_coco(tmp_path / "coco")
    pred = _pred_store(root, tmp_path / "pred.h5")
    before = _eval_json(root, pred, tmp_path / "a.json")
    from_json = open_dataset(root)
    assert from_json.index_source == "annotation file"
    assert _cli("info", root, "--build-cache", "--quiet")[0] == 0
    real_load = COCODataset._load
    monkeypatch.setattr(COCODataset, "_load", staticmethod(lambda p: (_ for _ in ()).throw(AssertionError("json read"))))
    ds = open_dataset(root)  # ids, classes, labels, file names and sizes all come from the cache's index
    assert ds.index_source == "GT cache"
    assert (ds.ids, ds.classes) == (from_json.ids, from_json.classes)
    for i in ds.ids:
        assert ds.labels(i) == from_json.labels(i) and ds.image_path(i) == from_json.image_path(i)
        np.testing.assert_array_equal(ds.gt(i), from_json.gt(i))
    after = _eval_json(root, pred, tmp_path / "b.json")
    assert {k: after[k] for k in ("miou", "mfpr", "mfnr", "per_class", "pixels", "vanishing")} == \
        {k: before[k] for k in ("miou", "mfpr", "mfnr", "per_class", "pixels", "vanishing")}
    # a changed json makes the cache stale: its index is not used either
    js = root / JSON
    js.write_text(js.read_text() + " ")
    with pytest.raises(AssertionError, match="json read"):
        open_dataset(root)
    monkeypatch.setattr(COCODataset, "_load", staticmethod(real_load))
    assert open_dataset(root).index_source == "annotation file"
    # a cache of the same json built before the index existed: stale, rebuilt by --build-cache
    assert _cli("info", root, "--build-cache", "--quiet")[0] == 0
    with h5py.File(root / CACHE, "a") as f:
        del f["coco_index"]
    ds = open_dataset(root)
    ds.gt(ds.ids[0])
    assert ds.index_source == "annotation file" and ds.cache_state == "stale"
    assert "without the image index" in json.loads(_cli("info", root, "--json")[1])["gt_cache"]
    code, output = _cli("info", root, "--build-cache", "--quiet")
    assert code == 0 and "rebuilt, 3 of 3" in output, output
    assert open_dataset(root).index_source == "GT cache"


def test_a_stale_cache_is_reported_once_with_loader_workers(tmp_path, monkeypatch):
    from dhr_cli.config import EVAL_BATCH
    from dhr_cli.io import coco as coco_mod
    from dhr_cli.pipeline.evaluate import run_eval
    from tests.test_coco_layouts import CATS, _write_image

    root = tmp_path / "coco"
    n = 2 * EVAL_BATCH + 1  # three loader tasks
    images = [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "height": 12, "width": 16} for i in range(n)]
    anns = [{"id": i + 1, "image_id": i, "category_id": 1, "iscrowd": 0, "segmentation": [[2, 2, 10, 2, 10, 9, 2, 9]]}
            for i in range(n)]
    (root / "annotations").mkdir(parents=True)
    js = root / JSON
    js.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATS}))
    for img in images:
        _write_image(root / "train2014" / img["file_name"], 12, 16)
    assert _cli("info", root, "--build-cache", "--quiet")[0] == 0
    with create_store(tmp_path / "pred.h5", "masks", ["background", "person", "car", "dog"], provenance={}) as w:
        for img in images:
            w.write(img["file_name"][:-4], {"mask": np.ones((12, 16), np.uint8)})
    js.write_text(js.read_text() + " ")  # stale now
    said = tmp_path / "warnings.txt"

    def warning(msg, *args):  # appends from whichever process logs (forked workers too)
        with open(said, "a") as f:
            f.write((msg % args).replace("\n", " ") + "\n")

    monkeypatch.setattr(coco_mod.logger, "warning", warning)
    r = run_eval([tmp_path / "pred.h5"], root, workers=2)
    assert len(r.methods[0].ids) == n
    lines = [line for line in said.read_text().splitlines() if "GT cache not used" in line]
    assert len(lines) == 1, lines
