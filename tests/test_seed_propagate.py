"""Batched kernels and the seed/propagate commands agree with the per-image oracle of docs/method.md."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dhr_cli.cli import app
from dhr_cli.config import PropagateConfig, SeedConfig
from dhr_cli.io.store import create_store, open_store
from dhr_cli.kernels.propagate import PropagateItem, propagate_items, step3_needed
from dhr_cli.kernels.seed import seed_masks
from dhr_cli.testing import oracle
from dhr_cli.testing.synthetic import make_dataset

runner = CliRunner()


def _scene(rng, h, w, labels, unsure=0.05):
    """A seed mask with rectangles of each label on background, some unsure pixels."""
    seed = np.zeros((h, w), np.int64)
    for k, c in enumerate(labels):
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        seed[y : y + rng.integers(h // 6, h // 2), x : x + rng.integers(w // 6, w // 2)] = c
    seed[rng.random((h, w)) < unsure] = 255
    return seed


def _features(rng, seed, grid, dim, groups, noise):
    """Features whose class embeddings follow `groups` (same group -> nearly the same embedding)."""
    emb = {c: rng.normal(0, 1, dim) for c in set(groups.values())}
    dense = np.zeros((dim, *seed.shape))
    for c in np.unique(seed):
        key = groups.get(int(c), "bg")
        if key not in emb:
            emb[key] = rng.normal(0, 1, dim)
        dense[:, seed == c] = (emb[key] + 0.1 * rng.normal(0, 1, dim))[:, None]
    t = torch.from_numpy(dense).float()[None]
    pooled = torch.nn.functional.adaptive_avg_pool2d(t, grid)[0].numpy()
    return pooled + noise * rng.normal(0, 1, pooled.shape)


CASES = [
    # (size, labels, USS grid, shared USS group?)
    ((40, 52), [7], (5, 7), False),  # one class
    ((48, 64), [2, 5, 9, 11], (6, 8), False),  # many classes
    ((45, 61), [3, 4], (7, 9), True),  # two classes share a USS group: Step 3 runs
    ((37, 53), [1, 2, 3], (11, 13), True),  # odd grid sizes, overlapping adaptive bins
]


def _case(seed_value, size, labels, grid, shared):
    rng = np.random.default_rng(seed_value)
    seed = _scene(rng, *size, labels)
    groups = {c: ("g" if shared else f"c{c}") for c in labels}
    uss = _features(rng, seed, grid, 12, groups, 0.3).astype(np.float32)
    wss = [_features(rng, seed, (grid[0] - 1, grid[1] + 2), 9, {c: f"w{c}" for c in labels}, 0.5).astype(np.float32)]
    return seed, uss, wss


@pytest.mark.parametrize("marginals", ["uniform", "seeded"])
def test_batched_propagation_equals_the_oracle(marginals):
    cfg = PropagateConfig(use_crf=False, marginals=marginals, recover_missing=False)
    items, expected = [], []
    for k, (size, labels, grid, shared) in enumerate(CASES):
        seed, uss, wss = _case(k, size, labels, grid, shared)
        items.append(PropagateItem(seed=torch.from_numpy(seed), uss=torch.from_numpy(uss),
                                   wss=[torch.from_numpy(w) for w in wss], labels=labels))
        expected.append(oracle.propagate(seed, uss, wss, labels, marginals=marginals, recover=False))
    got = propagate_items(items, cfg)  # one padded batch of four different problems
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        np.testing.assert_array_equal(g.numpy(), e)


def test_step3_changes_the_result_when_classes_share_a_group():
    size, labels, grid, _ = CASES[2]
    seed, uss, wss = _case(2, size, labels, grid, True)
    item = PropagateItem(seed=torch.from_numpy(seed), uss=torch.from_numpy(uss), wss=[torch.from_numpy(w) for w in wss],
                         labels=labels)
    with_step3 = propagate_items([item], PropagateConfig(use_crf=False, tau=0.8))[0]
    without = propagate_items([item], PropagateConfig(use_crf=False, tau=1.0))[0]
    assert not torch.equal(with_step3, without)
    # --no-step3: Step 2 alone, the WSS maps never read; the same as an item without WSS maps
    no_step3 = propagate_items([item], PropagateConfig(use_crf=False, step3=False))[0]
    bare = PropagateItem(seed=item.seed, uss=item.uss, wss=[], labels=labels)
    assert torch.equal(no_step3, propagate_items([bare], PropagateConfig(use_crf=False))[0])
    assert torch.equal(no_step3, without)
    lazy = PropagateItem(seed=item.seed, uss=item.uss, labels=labels, wss=lambda: pytest.fail("WSS read"))
    assert torch.equal(propagate_items([lazy], PropagateConfig(use_crf=False, step3=False))[0], no_step3)


@pytest.mark.parametrize("marginals", ["uniform", "seeded"])
def test_background_in_a_step3_group_only_when_asked(marginals):
    """Background shares class 4's USS embedding, classes 3 and 5 share another: by default Step 3
    separates 3 from 5 and leaves background alone; --step3-background lets it join 4's group (the
    authors). Each equals the oracle with the same rule, and the two differ."""
    rng = np.random.default_rng(11)
    seed = _scene(rng, 48, 60, [3, 4, 5])
    groups = {0: "g", 4: "g", 3: "h", 5: "h"}
    uss = _features(rng, seed, (8, 10), 12, groups, 0.3).astype(np.float32)
    wss = [_features(rng, seed, (6, 7), 9, {c: f"w{c}" for c in (0, 3, 4, 5)}, 0.5).astype(np.float32)]
    out = {}
    for together in (False, True):
        item = PropagateItem(seed=torch.from_numpy(seed), uss=torch.from_numpy(uss),
                             wss=[torch.from_numpy(w) for w in wss], labels=[3, 4, 5])
        cfg = PropagateConfig(use_crf=False, marginals=marginals, recover_missing=False, step3_background=together)
        out[together] = propagate_items([item], cfg)[0].numpy()
        expected = oracle.propagate(seed, uss, wss, [3, 4, 5], marginals=marginals, recover=False,
                                    background_in_groups=together)
        np.testing.assert_array_equal(out[together], expected)
        assert step3_needed(item, cfg)  # 3 and 5 share a group either way
    assert not np.array_equal(out[False], out[True])
    # background alone and no other shared group: Step 3 does not run (its WSS maps are not read)
    lone = {0: "g", 4: "g", 3: "h", 5: "k"}
    uss2 = _features(rng, seed, (8, 10), 12, lone, 0.3).astype(np.float32)
    item = PropagateItem(seed=torch.from_numpy(seed), uss=torch.from_numpy(uss2), labels=[3, 4, 5],
                         wss=lambda: pytest.fail("WSS read"))
    assert not step3_needed(item, PropagateConfig(use_crf=False))
    propagate_items([item], PropagateConfig(use_crf=False))
    assert step3_needed(item, PropagateConfig(use_crf=False, step3_background=True))


def test_recovery_of_a_class_that_wins_no_cell():
    rng = np.random.default_rng(5)
    seed = np.zeros((40, 40), np.int64)
    seed[20:36, 16:36] = 3
    # Class 6 is in the image (its features and CAM say so) but the seed missed it.
    truth = seed.copy()
    truth[0:10, 0:10] = 6
    uss = _features(rng, truth, (5, 5), 8, {3: "a", 6: "b"}, 0.1).astype(np.float32)
    cams = np.zeros((2, 10, 10), np.float32)
    cams[0, 0:2, 0:2] = 1.0
    cams[1, 5:9, 4:9] = 1.0
    item = PropagateItem(seed=torch.from_numpy(seed), uss=torch.from_numpy(uss), wss=[], labels=[3, 6],
                         cams=torch.from_numpy(cams), cam_labels=[6, 3])
    on = propagate_items([item], PropagateConfig(use_crf=False))[0]
    off = propagate_items([item], PropagateConfig(use_crf=False, recover_missing=False))[0]
    assert (on == 6).any() and not (off == 6).any()
    assert (on[:8, :8] == 6).float().mean() > 0.9
    expected = oracle.propagate(seed, uss, [], [3, 6], marginals="seeded", cams=cams, cam_labels=[6, 3])
    np.testing.assert_array_equal(on.numpy(), expected)


@pytest.mark.parametrize("ot", [True, False])
def test_seeds_equal_the_oracle(ot):
    rng = np.random.default_rng(1)
    cams = [rng.random((k, h, w)).astype(np.float32) for k, h, w in [(1, 6, 8), (3, 7, 9), (2, 5, 5)]]
    labels = [[4], [1, 2, 7], [3, 5]]
    sizes = [(24, 32), (28, 37), (19, 21)]
    cfg = SeedConfig(use_crf=False, ot=ot)
    got = seed_masks([torch.from_numpy(c) for c in cams], labels, sizes, cfg)
    for g, c, lab, size in zip(got, cams, labels, sizes):
        np.testing.assert_array_equal(g.numpy(), oracle.seed(c, lab, size, cfg.bg_power, cfg.confidence, ot=ot))
    # The OT step matters on these CAMs, so the two settings are told apart.
    other = seed_masks([torch.from_numpy(c) for c in cams], labels, sizes, SeedConfig(use_crf=False, ot=not ot))
    assert any((a != b).any() for a, b in zip(got, other))


def _otsu_reference(values: np.ndarray, bins: int) -> float:
    """Otsu written out: every split between bins, the between-class variance of the two pixel sets."""
    idx = np.minimum((values * bins).astype(int), bins - 1)
    centres = (np.arange(bins) + 0.5) / bins
    best, best_t = -1.0, None
    for k in range(bins):
        lo, hi = centres[idx[idx <= k]], centres[idx[idx > k]]
        if len(lo) == 0 or len(hi) == 0:
            continue
        w0, w1 = len(lo) / len(idx), len(hi) / len(idx)
        var = w0 * w1 * (lo.mean() - hi.mean()) ** 2
        if var > best + 1e-15:
            best, best_t = var, centres[k]
    return best_t


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_otsu_threshold_equals_the_written_out_criterion(seed):
    from dhr_cli.kernels.seed import otsu_threshold

    rng = np.random.default_rng(seed)
    # two modes of different weight and spread, as max-CAM values on background and objects
    values = np.concatenate([rng.beta(2, 9, 3000 + 1000 * seed), rng.beta(8, 2, 700)])
    assert float(otsu_threshold(torch.from_numpy(values), bins=64)) == pytest.approx(_otsu_reference(values, 64))


def test_otsu_bg_rule_ties_background_and_class_at_the_threshold():
    from dhr_cli.kernels.seed import otsu_threshold, seed_probabilities

    rng = np.random.default_rng(3)
    cams = torch.from_numpy(np.stack([rng.beta(2, 6, (30, 40)), rng.beta(2, 6, (30, 40))]).astype(np.float32))
    cams[0, 5:15, 5:20] = 0.9
    t = float(otsu_threshold(cams.amax(0)))
    p = seed_probabilities(cams, bg_power=1.0, bg_rule="otsu")
    top = cams.amax(0)
    bg_wins = p[0] > p[1:].amax(0)
    # background wins exactly below the tie (up to one bin's rounding at the threshold itself)
    assert bool(bg_wins[top < t - 1e-3].all()) and not bool(bg_wins[top > t + 1e-3].any())
    fixed = seed_probabilities(cams, bg_power=1.0)  # the power rule: tie at 0.5, whatever the image
    assert bool((fixed[0] > fixed[1:].amax(0))[top < 0.5 - 1e-3].all())
    assert 0.1 <= t <= 0.9 and abs(t - 0.5) > 0.02  # this image's tie is not the fixed rule's


def test_seeds_overwrite_initial_masks_only_where_a_class_wins():
    cams = torch.zeros(1, 4, 4)
    cams[0, :2] = 1.0
    base = torch.full((8, 8), 9, dtype=torch.long)
    mask = seed_masks([cams], [[2]], [(8, 8)], SeedConfig(use_crf=False), base=[base])[0]
    assert (mask[:2] == 2).all() and (mask[-2:] == 9).all()


# ---- the commands, end to end, on stores ----------------------------------------------------
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("synth") / "data", n_images=8, seed=3)


def _cli(args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_commands_match_the_oracle_with_float16_stores(synth, tmp_path):
    _cli(["seed", "--cams", synth / "cams.h5", "--data", synth, "--out", tmp_path / "s.h5", "--no-crf", "-q"])
    _cli(["propagate", "--seeds", tmp_path / "s.h5", "--data", synth, "--uss", synth / "uss.h5", "--wss", synth / "wss.h5",
          "--out", tmp_path / "m.h5", "--no-crf", "--ot-marginals", "uniform", "--no-recover", "--batch-size", "3", "-q"])
    with open_store(tmp_path / "m.h5") as masks, open_store(tmp_path / "s.h5") as seeds, \
         open_store(synth / "uss.h5") as uss, open_store(synth / "wss.h5") as wss, open_store(synth / "cams.h5") as cams:  # fmt: skip
        assert masks.ids == uss.ids and uss.read(uss.ids[0]).arrays["features"].dtype == np.float16
        for item_id in masks.ids:
            labels = cams.read(item_id).labels.tolist()
            expected = oracle.propagate(seeds.read(item_id).mask, uss.read(item_id).features,
                                        [wss.read(item_id).features], labels, recover=False)
            np.testing.assert_array_equal(masks.read(item_id).mask, expected)
            assert masks.read(item_id).mask.max() < 255


def test_seed_command_without_ot_matches_the_oracle_and_records_it(synth, tmp_path):
    _cli(["seed", "--cams", synth / "cams.h5", "--data", synth, "--out", tmp_path / "s.h5", "--no-crf", "--no-ot", "-q"])
    _cli(["seed", "--cams", synth / "cams.h5", "--data", synth, "--out", tmp_path / "ot.h5", "--no-crf", "-q"])
    cfg = SeedConfig()
    with open_store(tmp_path / "s.h5") as seeds, open_store(tmp_path / "ot.h5") as with_ot, \
         open_store(synth / "cams.h5") as cams:  # fmt: skip
        assert seeds.provenance["options"]["ot"] is False and with_ot.provenance["options"]["ot"] is True
        differ = 0
        for item_id in seeds.ids:
            item = cams.read(item_id)
            mask = seeds.read(item_id).mask
            expected = oracle.seed(item.cams, item.labels.tolist(), mask.shape, cfg.bg_power, cfg.confidence, ot=False)
            np.testing.assert_array_equal(mask, expected)
            differ += int((mask != with_ot.read(item_id).mask).any())
        assert differ > 0


def test_seed_from_a_folder_of_png_masks_prints_nothing_but_its_summary(synth, tmp_path):
    """--init-masks DIR: PIL's read-only buffers made torch print its 'NumPy array is not writable' warning."""
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        r = runner.invoke(app, [str(a) for a in ["seed", "--cams", synth / "cams.h5", "--data", synth, "--init-masks",
                                                 synth / "masks", "--out", tmp_path / "s.h5", "--no-crf", "-q"]])
    assert r.exit_code == 0 and "Warning" not in r.output, r.output
    assert not [w for w in seen if "writable" in str(w.message)], [str(w.message) for w in seen]


def test_cams_on_a_tiny_scale_are_named_in_a_warning(synth, tmp_path, caplog, monkeypatch):
    """Another program's CAMs scaled by 1e-6 fall below the floor Step 1 divides by: all-background
    seeds, which used to come without a word."""
    from dhr_cli.pipeline import seed as seed_pipeline
    from tests.helpers import write_plain_store

    monkeypatch.setattr(seed_pipeline, "_faint_warned", False)
    with open_store(synth / "cams.h5") as cams:
        items = {i: ("cams", cams.read(i).cams * 1e-6, {"labels": cams.read(i).labels.tolist(),
                                                         "image_size": list(cams.read(i).image_size)})
                 for i in cams.ids}
        classes = cams.classes
    faint = write_plain_store(tmp_path / "faint.h5", "cams", classes, items)
    with caplog.at_level("WARNING"):
        _cli(["seed", "--cams", faint, "--data", synth, "--out", tmp_path / "s.h5", "--no-crf", "-q"])
    said = [r.getMessage() for r in caplog.records if "below the 1e-05 that Step 1 divides by" in r.getMessage()]
    assert len(said) == 1 and "faint.h5" in said[0], [r.getMessage() for r in caplog.records]
    caplog.clear()
    monkeypatch.setattr(seed_pipeline, "_faint_warned", False)
    with caplog.at_level("WARNING"):  # CAMs on their usual scale: nothing said
        _cli(["seed", "--cams", synth / "cams.h5", "--data", synth, "--out", tmp_path / "t.h5", "--no-crf", "-q"])
    assert not [r for r in caplog.records if "divides by" in r.getMessage()]


def test_propagate_missing_ids_fail_or_skip(synth, tmp_path):
    with open_store(synth / "uss.h5") as uss, create_store(tmp_path / "u.h5", "features", uss.classes, provenance={}) as w:
        for item_id in uss.ids[:-2]:
            item = uss.read(item_id)
            w.write(item_id, item.arrays, item.attrs)
    _cli(["seed", "--cams", synth / "cams.h5", "--data", synth, "--out", tmp_path / "s.h5", "--no-crf", "-q"])
    args = ["propagate", "--seeds", tmp_path / "s.h5", "--data", synth, "--uss", tmp_path / "u.h5", "--wss", synth / "wss.h5",
            "--no-crf", "-q"]
    result = runner.invoke(app, [str(a) for a in args + ["--out", tmp_path / "m.h5"]])
    assert result.exit_code == 1 and "2 of 8 images" in result.output and "--missing skip" in result.output
    assert not (tmp_path / "m.h5").exists() and not (tmp_path / "m.h5.partial").exists()
    _cli(args + ["--out", tmp_path / "m.h5", "--missing", "skip"])
    with open_store(tmp_path / "m.h5") as s:
        assert len(s) == 6


def test_bad_inputs(synth, tmp_path):
    _cli(["seed", "--cams", synth / "cams.h5", "--data", synth, "--out", tmp_path / "s.h5", "--no-crf", "-q"])
    # Mismatched class lists between stores.
    with open_store(synth / "uss.h5") as uss, create_store(tmp_path / "u.h5", "features", ["background", "x"], provenance={}) as w:
        item = uss.read(uss.ids[0])
        w.write(uss.ids[0], item.arrays, item.attrs)
    result = runner.invoke(app, [str(a) for a in ["propagate", "--seeds", tmp_path / "s.h5", "--data", synth, "--uss",
                                                  tmp_path / "u.h5", "--wss", synth / "wss.h5", "--out", tmp_path / "m.h5", "--no-crf"]])
    assert result.exit_code == 1 and "differ from the dataset's" in result.output
    # Non-finite features.
    with open_store(synth / "uss.h5") as uss, create_store(tmp_path / "nan.h5", "features", uss.classes, provenance={}) as w:
        for item_id in uss.ids:
            item = uss.read(item_id)
            w.write(item_id, item.arrays, item.attrs)
    import h5py

    with h5py.File(tmp_path / "nan.h5", "a") as f:
        first = sorted(f["items"])[0]
        data = f[f"items/{first}/features"][()]
        data[0, 0, 0] = np.nan
        del f[f"items/{first}/features"]
        f[f"items/{first}"].create_dataset("features", data=data).attrs["image_size"] = [120, 160]
    result = runner.invoke(app, [str(a) for a in ["propagate", "--seeds", tmp_path / "s.h5", "--data", synth, "--uss",
                                                  tmp_path / "nan.h5", "--wss", synth / "wss.h5", "--out", tmp_path / "m.h5", "--no-crf"]])
    assert result.exit_code == 1 and "NaN" in result.output and first in result.output
    assert not (tmp_path / "m.h5").exists()
    # CAM labels that are not among the image's labels.
    with open_store(synth / "cams.h5") as cams, create_store(tmp_path / "c.h5", "cams", cams.classes, provenance={}) as w:
        for item_id in cams.ids:
            item = cams.read(item_id)
            free = [c for c in range(1, len(cams.classes)) if c not in item.labels]
            attrs = {"cams": {**item.attrs["cams"], "labels": free[:1] + list(item.labels)[1:]}}  # one label not the image's
            w.write(item_id, item.arrays, attrs)
    result = runner.invoke(app, [str(a) for a in ["seed", "--cams", tmp_path / "c.h5", "--data", synth, "--out", tmp_path / "s2.h5", "--no-crf"]])
    assert result.exit_code == 1 and "not among the image's labels" in result.output


def test_mixed_batch_with_and_without_step3_equals_the_oracle():
    """Step 3 runs only for the images of the batch that need it (a shared group and WSS maps)."""
    cfg = PropagateConfig(use_crf=False, marginals="uniform", recover_missing=False)
    items, expected = [], []
    for k, (size, labels, grid, shared) in enumerate(CASES):
        seed, uss, wss = _case(20 + k, size, labels, grid, shared)
        if k == 3:
            wss = []  # a shared USS group but no WSS map: Step 3 is skipped for this image only
        items.append(PropagateItem(seed=torch.from_numpy(seed), uss=torch.from_numpy(uss),
                                   wss=[torch.from_numpy(w) for w in wss], labels=labels))
        expected.append(oracle.propagate(seed, uss, wss, labels, marginals="uniform", recover=False))
    for g, e in zip(propagate_items(items, cfg), expected):
        np.testing.assert_array_equal(g.numpy(), e)


def test_no_step3_needs_no_wss(synth, tmp_path):
    _cli(["seed", "--cams", synth / "cams.h5", "--data", synth, "--out", tmp_path / "s.h5", "--no-crf", "-q"])
    base = ["propagate", "--seeds", tmp_path / "s.h5", "--data", synth, "--uss", synth / "uss.h5", "--no-crf", "-q"]
    result = runner.invoke(app, [str(a) for a in base + ["--out", tmp_path / "m.h5"]])
    assert result.exit_code == 1 and "--wss is required" in result.output and "--no-step3" in result.output
    _cli(base + ["--no-step3", "--out", tmp_path / "a.h5"])
    _cli(base + ["--no-step3", "--wss", synth / "wss.h5", "--out", tmp_path / "b.h5"])  # given, not read
    _cli(base + ["--tau", "1.0", "--wss", synth / "wss.h5", "--out", tmp_path / "c.h5"])  # no group forms at tau 1
    with open_store(tmp_path / "a.h5") as a, open_store(tmp_path / "b.h5") as b, open_store(tmp_path / "c.h5") as c:
        assert a.ids == b.ids == c.ids
        for i in a.ids:
            assert (a.read(i).mask == b.read(i).mask).all() and (a.read(i).mask == c.read(i).mask).all()


def test_feature_sources_paths_and_names(synth, tmp_path):
    _cli(["seed", "--cams", synth / "cams.h5", "--data", synth, "--out", tmp_path / "s.h5", "--no-crf", "-q"])
    base = ["propagate", "--seeds", tmp_path / "s.h5", "--data", synth, "--wss", synth / "wss.h5", "--no-crf", "-q",
            "--out", tmp_path / "m.h5"]
    result = runner.invoke(app, [str(a) for a in base + ["--uss", "stego"]])  # a network without its weights
    assert result.exit_code == 1 and "stego" in result.output and "needs its weights file" in result.output
    result = runner.invoke(app, [str(a) for a in base + ["--uss", tmp_path / "absent.h5"]])
    assert result.exit_code == 1 and "absent.h5: no such store" in result.output
    result = runner.invoke(app, [str(a) for a in base + ["--uss", tmp_path]])
    assert result.exit_code == 1 and "not a features store" in result.output
    assert not (tmp_path / "m.h5").exists()


def test_wss_loaders_are_called_only_where_step3_runs():
    cfg = PropagateConfig(use_crf=False, marginals="uniform", recover_missing=False)
    eager, lazy, calls = [], [], []
    for k in (0, 2):  # CASES[0]: one class (no Step 3); CASES[2]: two classes in one USS group
        size, labels, grid, shared = CASES[k]
        seed, uss, wss = _case(k, size, labels, grid, shared)
        maps = [torch.from_numpy(w) for w in wss]
        eager.append(PropagateItem(seed=torch.from_numpy(seed), uss=torch.from_numpy(uss), wss=maps, labels=labels))
        lazy.append(PropagateItem(seed=torch.from_numpy(seed), uss=torch.from_numpy(uss), labels=labels,
                                  wss=lambda k=k, maps=maps: calls.append(k) or maps))
    for a, b in zip(propagate_items(eager, cfg), propagate_items(lazy, cfg)):
        assert torch.equal(a, b)
    assert calls == [2]
    # What a loader process asks before reading the WSS maps: the same decision, image by image.
    assert [step3_needed(it, cfg) for it in eager] == [False, True]


@pytest.mark.parametrize("foresee", [True, False])
def test_propagate_loader_processes_equal_in_process_loading(synth, tmp_path, monkeypatch, foresee):
    """Stores read in DataLoader workers (own HDF5 handles) or in this process: the same masks.

    When the loader does not foresee Step 3 for an image, the WSS maps are read here instead.
    (The GPU's arrangement, kernels in this process, run here on the CPU.)
    """
    import dhr_cli.pipeline.propagate as prop
    from dhr_cli.pipeline.propagate import run_propagate

    monkeypatch.setattr(prop, "_batches_in_workers", lambda device: False)
    _cli(["seed", "--cams", synth / "cams.h5", "--data", synth, "--out", tmp_path / "s.h5", "--no-crf", "-q"])
    if not foresee:
        monkeypatch.setattr(prop, "step3_needed", lambda *a, **k: False)
    cfg = PropagateConfig(use_crf=False, batch_size=2, device="cpu")
    kw = dict(seeds=tmp_path / "s.h5", data=synth, uss=synth / "uss.h5", wss=[synth / "wss.h5"], cams=synth / "cams.h5",
              quiet=True)
    late_reads = []  # WSS reads by the kernels' process (the loader did not foresee Step 3)
    read_wss = prop._read_wss
    monkeypatch.setattr(prop, "_read_wss", lambda *a: late_reads.append(a[1]) or read_wss(*a))
    for workers in (0, 2):
        monkeypatch.setattr(prop, "store_reading_workers", lambda n=workers: n)
        assert run_propagate(cfg, out=tmp_path / f"m{workers}.h5", **kw)["written"] == 8
    assert (late_reads == []) == foresee
    with open_store(tmp_path / "m0.h5") as a, open_store(tmp_path / "m2.h5") as b:
        assert a.ids == b.ids and len(a.ids) == 8
        for item_id in a.ids:
            np.testing.assert_array_equal(a.read(item_id).mask, b.read(item_id).mask)


def test_batches_in_worker_processes_equal_batches_in_this_process(synth, tmp_path, monkeypatch):
    """The CPU's arrangement: whole batches (reads, kernels, CRF) in DataLoader workers or in this
    process, the seeds and the masks are the same, the GPU's arrangement (kernels here) too."""
    import dhr_cli.io.loading as loading
    import dhr_cli.pipeline.propagate as prop
    from dhr_cli.pipeline.propagate import run_propagate
    from dhr_cli.pipeline.seed import run_seed

    for workers in (0, 2):
        monkeypatch.setattr(loading, "batch_workers", lambda n=workers: n)
        run_seed(SeedConfig(batch_size=3, device="cpu"), synth / "cams.h5", synth, tmp_path / f"s{workers}.h5",
                 quiet=True)
    with open_store(tmp_path / "s0.h5") as a, open_store(tmp_path / "s2.h5") as b:
        assert a.ids == b.ids and len(a.ids) == 8
        for item_id in a.ids:
            np.testing.assert_array_equal(a.read(item_id).mask, b.read(item_id).mask)
    cfg = PropagateConfig(batch_size=3, device="cpu")  # CRF on: it runs in the workers too
    kw = dict(seeds=tmp_path / "s0.h5", data=synth, uss=synth / "uss.h5", wss=[synth / "wss.h5"], cams=synth / "cams.h5",
              quiet=True)
    for workers in (0, 2):
        monkeypatch.setattr(loading, "batch_workers", lambda n=workers: n)
        assert run_propagate(cfg, out=tmp_path / f"m{workers}.h5", **kw)["written"] == 8
    monkeypatch.setattr(prop, "_batches_in_workers", lambda device: False)
    run_propagate(cfg, out=tmp_path / "m_here.h5", **kw)
    with open_store(tmp_path / "m0.h5") as a, open_store(tmp_path / "m2.h5") as b, \
            open_store(tmp_path / "m_here.h5") as c:
        assert a.ids == b.ids == c.ids and len(a.ids) == 8
        for item_id in a.ids:
            np.testing.assert_array_equal(a.read(item_id).mask, b.read(item_id).mask)
            np.testing.assert_array_equal(a.read(item_id).mask, c.read(item_id).mask)


def test_step3_on_a_small_grid_inside_a_batch_of_larger_grids():
    """Only a small-grid image needs Step 3: its WSS cells are padded to the batch's largest grid."""
    cfg = PropagateConfig(use_crf=False, marginals="uniform", recover_missing=False)
    small = _case(0, (40, 48), [3, 4], (5, 6), True)
    big = _case(0, (50, 60), [7], (12, 14), False)
    items, expected = [], []
    for seed, uss, wss, labels in [(*small, [3, 4]), (*big, [7])]:
        items.append(PropagateItem(seed=torch.from_numpy(seed), uss=torch.from_numpy(uss),
                                   wss=[torch.from_numpy(w) for w in wss], labels=labels))
        expected.append(oracle.propagate(seed, uss, wss, labels, marginals="uniform", recover=False))
    with_wss = oracle.propagate(small[0], small[1], small[2], [3, 4], marginals="uniform", recover=False)
    assert not np.array_equal(with_wss, oracle.propagate(small[0], small[1], [], [3, 4], marginals="uniform",
                                                         recover=False))  # Step 3 really runs here
    for g, e in zip(propagate_items(items, cfg), expected):
        np.testing.assert_array_equal(g.numpy(), e)


def test_pot_solver_records_and_honours_its_iteration_cap(synth, tmp_path):
    """--ot-solver pot: the cap and tolerance given reach POT and are what provenance records."""
    base = ["seed", "--cams", synth / "cams.h5", "--data", synth, "--no-crf", "-q", "--ot-solver", "pot"]
    _cli(base + ["--out", tmp_path / "conv.h5"])
    with pytest.warns(UserWarning, match="did not converge"):
        _cli(base + ["--out", tmp_path / "capped.h5", "--sinkhorn-max-iter", "1", "--sinkhorn-tol", "1e-12"])
    with open_store(tmp_path / "conv.h5") as conv, open_store(tmp_path / "capped.h5") as capped:
        assert conv.provenance["options"]["sinkhorn"] == {"eps": 0.1, "max_iter": 1000, "tol": 1e-9, "solver": "pot"}
        assert capped.provenance["options"]["sinkhorn"]["max_iter"] == 1
        assert any(not np.array_equal(conv.read(i).mask, capped.read(i).mask) for i in conv.ids)


@pytest.mark.parametrize("option,value", [("--ot-solver", "sinkhorn"), ("--method", "crf"), ("--ot-marginals", "x"),
                                          ("--missing", "ignore")])
def test_choices_are_usage_errors_listed_in_help(synth, tmp_path, option, value):
    args = ["propagate", "--seeds", tmp_path / "s.h5", "--data", synth, "--uss", synth / "uss.h5",
            "--out", tmp_path / "m.h5", option, value]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2 and "is not one of" in result.output
    help_text = runner.invoke(app, ["propagate", "--help"], terminal_width=200).output
    assert re.search(rf"{option}\s+<\w+(\|\w+)+>", help_text)  # --help lists the choices
