"""`dhr import`: peer CAM / feature / mask files round-trip into stores (docs/peers.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import dhr_cli.cli.cmd_import  # noqa: F401  (registers `dhr import` until the lead lists it)
from dhr_cli.cli import app
from dhr_cli.io.datasets import open_dataset
from dhr_cli.io.store import open_store
from dhr_cli.testing.synthetic import make_dataset

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("imp") / "d", n_images=4, stores=False)
    return root, open_dataset(root, "train")


def _cams(ds, i, rng):
    h, w = ds.image_size(i)
    labels = ds.labels(i)
    return np.asarray(labels) - 1, rng.random((len(labels), h, w)).astype(np.float32)


@pytest.mark.parametrize("fmt", ["irn", "mctformer", "clip-es"])
def test_cam_formats_roundtrip(data, tmp_path, fmt):
    root, ds = data
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    expected = {}
    for i in ds.ids:
        keys, cams = _cams(ds, i, rng)
        expected[i] = (keys + 1, cams)
        if fmt == "irn":
            d = {"keys": torch.from_numpy(keys), "cam": torch.from_numpy(cams[:, ::4, ::4].copy()), "high_res": cams}
        elif fmt == "mctformer":
            d = {int(k): c for k, c in zip(keys, cams)}
        else:
            d = {"keys": keys, "attn_highres": cams.astype(np.float16)}
        np.save(src / f"{i}.npy", d)
    out = tmp_path / "c.h5"
    r = invoke("import", fmt, src, "--data", root, "--split", "train", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    with open_store(out, expect="cams") as s:
        assert s.ids == sorted(ds.ids)
        for i in s.ids:
            item = s.read(i)
            assert item.labels.tolist() == expected[i][0].tolist() == ds.labels(i)
            np.testing.assert_allclose(item.cams, expected[i][1], atol=2e-3)
            assert item.image_size == ds.image_size(i)


def test_out_of_range_key_and_missing_file(data, tmp_path):
    root, ds = data
    src = tmp_path / "src"
    src.mkdir()
    h, w = ds.image_size(ds.ids[0])
    np.save(src / f"{ds.ids[0]}.npy", {"keys": np.array([99]), "attn_highres": np.ones((1, h, w), np.float16)})
    r = invoke("import", "clip-es", src, "--data", root, "--split", "train", "--out", tmp_path / "x.h5", "--quiet")
    assert r.exit_code == 1 and "99" in r.output
    keys = np.asarray(ds.labels(ds.ids[0])) - 1  # one map per image label (CLIP-ES keys count foreground from 0)
    np.save(src / f"{ds.ids[0]}.npy", {"keys": keys, "attn_highres": np.ones((len(keys), h, w), np.float16)})
    r = invoke("import", "clip-es", src, "--data", root, "--split", "train", "--out", tmp_path / "y.h5", "--quiet")
    assert r.exit_code == 1 and "missing" in r.output and ds.ids[1] in r.output
    r = invoke("import", "clip-es", src, "--data", root, "--split", "train", "--out", tmp_path / "z.h5", "--quiet",
               "--missing", "skip")
    assert r.exit_code == 0, r.output
    with open_store(tmp_path / "z.h5") as s:
        assert s.ids == [ds.ids[0]]


def test_dhr_pt_features_and_png_masks(data, tmp_path):
    root, ds = data
    src, png = tmp_path / "pt", tmp_path / "png"
    src.mkdir()
    png.mkdir()
    feats = {}
    for k, i in enumerate(ds.ids):
        feats[i] = torch.randn(70, 5, 6, generator=torch.Generator().manual_seed(k)).half()
        torch.save(feats[i], src / f"{i}.pt")
        Image.fromarray(ds.gt(i)).save(png / f"{i}.png")
    r = invoke("import", "dhr-pt", src, "--data", root, "--split", "train", "--source", "stego", "--out", tmp_path / "f.h5", "--quiet")
    assert r.exit_code == 0, r.output
    with open_store(tmp_path / "f.h5", expect="features") as s:
        assert s.attrs["source"] == "stego"
        for i in s.ids:
            np.testing.assert_array_equal(s.read(i).features, feats[i].float().numpy())
    r = invoke("import", "png", png, "--data", root, "--split", "train", "--out", tmp_path / "m.h5", "--quiet")
    assert r.exit_code == 0, r.output
    with open_store(tmp_path / "m.h5", expect="masks") as s:
        for i in s.ids:
            np.testing.assert_array_equal(s.read(i).mask, ds.gt(i))
    r = invoke("import", "bogus", png, "--data", root, "--out", tmp_path / "q.h5")
    assert r.exit_code == 2 and "bogus" in r.output and "irn" in r.output  # a usage error listing the formats
    assert not (tmp_path / "q.h5").exists()


class Evil:
    """Unpickling this would run code (a classic pickle payload)."""

    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_npy_pickles_are_read_without_running_code(data, tmp_path, monkeypatch):
    root, ds = data
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    for i in ds.ids:
        h, w = ds.image_size(i)
        np.save(src / f"{i}.npy", {"keys": np.array([0]), "attn_highres": np.ones((1, h, w), np.float16), "x": Evil()})
    r = invoke("import", "clip-es", src, "--data", root, "--split", "train", "--out", tmp_path / "e.h5", "--quiet")
    assert r.exit_code == 1 and "refusing to load builtins.exec" in r.output and "--trust-files" in r.output
    assert not (tmp_path / "PWNED").exists()


def test_resume_of_an_import_refuses_another_split_or_edited_source_files(tmp_path, monkeypatch):
    """`dhr import` recorded neither the split nor its SRC files: a run over split train stopped midway and
    resumed with --split val published a store of train items beside val ones; PNGs edited in between were
    mixed in as well."""
    import os

    from dhr_cli.io import datasets

    root = make_dataset(tmp_path / "d", n_images=8, stores=False)
    png = tmp_path / "png"
    png.mkdir()
    ds = open_dataset(root)
    for i in ds.ids:
        Image.fromarray(ds.gt(i)).save(png / f"{i}.png")
    out = tmp_path / "m.h5"
    real, calls = datasets.read_index_png, [0]

    def stopping(path):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt  # as a Ctrl-C: the items written so far stay in OUT.partial
        return real(path)

    monkeypatch.setattr(datasets, "read_index_png", stopping)
    r = invoke("import", "png", png, "--data", root, "--split", "train", "--out", out, "-q")
    assert r.exit_code == 130 and (tmp_path / "m.h5.partial").exists() and not out.exists(), r.output
    monkeypatch.setattr(datasets, "read_index_png", real)
    r = invoke("import", "png", png, "--data", root, "--split", "val", "--out", out, "-q", "--resume")
    assert r.exit_code == 1 and "input split: train (partial) vs val (this run)" in r.output and not out.exists()
    train = open_dataset(root, "train").ids
    later = png / f"{train[-1]}.png"  # a file the stopped run had not read yet
    Image.fromarray(np.zeros_like(ds.gt(train[-1]))).save(later)
    os.utime(later, ns=(1, 1))
    r = invoke("import", "png", png, "--data", root, "--split", "train", "--out", out, "-q", "--resume")
    assert r.exit_code == 1 and "input src" in r.output and "changed since the partial run" in r.output, r.output
    assert not out.exists()
