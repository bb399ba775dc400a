"""`dhr refine --sam` and `dhr export --prompts`: SAM's checkpoint layout, the prompt geometry, the
two merge rules, and whole runs with a tiny SAM built from the package's own classes."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dhr_cli.config import PromptConfig
from dhr_cli.kernels.prompts import (
    assign_segments,
    batched_points,
    interior_points,
    mask_box,
    mask_prompts,
    region_mask_inputs,
    resolve_prompted,
)
from tests.helpers import make_flat, write_plain_store

# No importorskip: segment-anything is in the test extra, so CI runs these tests (a missing
# package fails them loudly instead of skipping).
runner = CliRunner()


def _meta_sam(name: str) -> dict:
    """The package's own model of this type, shapes only (meta tensors: no memory, no init)."""
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        return sam_model_registry[name](checkpoint=None).state_dict()


# ---- the official checkpoint layout ------------------------------------------------------------
def test_vit_b_keys_and_shapes_are_the_official_layout():
    from dhr_cli.models.sam import PARTS, encoder_shape

    sd = _meta_sam("vit_b")
    assert all(k.startswith(PARTS) for k in sd)
    assert "pixel_mean" not in sd and "pixel_std" not in sd  # non-persistent buffers: not in the files
    expected = {  # sam_vit_b_01ec64.pth: width 768, 12 heads of 64, 64x64 grid, windows of 14
        "image_encoder.patch_embed.proj.weight": (768, 3, 16, 16),
        "image_encoder.pos_embed": (1, 64, 64, 768),
        "image_encoder.blocks.0.attn.rel_pos_h": (27, 64),  # windowed block: 2 * 14 - 1
        "image_encoder.blocks.2.attn.rel_pos_h": (127, 64),  # global block: 2 * 64 - 1
        "image_encoder.blocks.11.mlp.lin1.weight": (3072, 768),
        "image_encoder.neck.0.weight": (256, 768, 1, 1),
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": (2, 128),
        "prompt_encoder.mask_downscaling.0.weight": (4, 1, 2, 2),
        "mask_decoder.mask_tokens.weight": (4, 256),
        "mask_decoder.iou_prediction_head.layers.2.weight": (4, 256),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert "image_encoder.blocks.12.norm1.weight" not in sd
    assert encoder_shape(sd) == (768, 12)
    assert encoder_shape(_meta_sam("vit_l")) == (1024, 24)


# ---- the loader ------------------------------------------------------------------------------
@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """The tiny SAM registered as type vit_tiny, and its weights file."""
    from dhr_cli.models import sam as sam_module
    from dhr_cli.testing.sam import tiny_sam, tiny_sam_type

    monkeypatch.setitem(sam_module.SAM_TYPES, "vit_tiny", tiny_sam_type())
    path = tmp_path / "tiny_sam.pth"
    torch.save(tiny_sam(seed=1).state_dict(), path)
    return path


def test_load_sam_reads_the_file_strictly(tiny):
    from dhr_cli.models.sam import load_sam
    from dhr_cli.testing.sam import tiny_sam

    model = load_sam("vit_tiny", tiny, "cpu")
    reference = tiny_sam(seed=1).state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    assert not any(torch.equal(v, tiny_sam(seed=2).state_dict()[k]) for k, v in model.state_dict().items()
                   if k.endswith("proj.weight"))


def _error(fn, *args) -> str:
    from dhr_cli.errors import DhrError

    with pytest.raises(DhrError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_load_sam_bad_files(tiny, tmp_path, monkeypatch):
    from dhr_cli.models.sam import load_sam

    # A vit_l file given as vit_b: found from the encoder's width and depth, not a state-dict dump.
    vit_l = {k: torch.empty(0) for k in _meta_sam("vit_l")}
    vit_l["image_encoder.patch_embed.proj.weight"] = torch.zeros(1024, 3, 16, 16)
    torch.save(vit_l, tmp_path / "sam_vit_l_0b3195.pth")
    msg = _error(load_sam, "vit_b", tmp_path / "sam_vit_l_0b3195.pth")
    assert msg == f"{tmp_path / 'sam_vit_l_0b3195.pth'} holds a vit_l SAM checkpoint, --sam vit_b given"
    assert "holds a vit_tiny SAM checkpoint, --sam vit_b given" in _error(load_sam, "vit_b", tiny)
    from dhr_cli.models import sam as sam_module

    kind = sam_module.SAM_TYPES.pop("vit_tiny")  # an encoder of no known type
    try:
        assert "SAM image encoder of width 16 and depth 2, which is none of vit_b" in _error(load_sam, "vit_b", tiny)
    finally:
        sam_module.SAM_TYPES["vit_tiny"] = kind
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert "not a PyTorch checkpoint" in _error(load_sam, "vit_b", tmp_path / "notes.txt")
    torch.save({"conv.weight": torch.zeros(2)}, tmp_path / "other.pth")
    assert "not a Segment Anything checkpoint" in _error(load_sam, "vit_b", tmp_path / "other.pth")
    sd = torch.load(tiny, weights_only=True)
    sd.pop("mask_decoder.iou_token.weight")
    sd["mask_decoder.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "edited.pth")
    msg = _error(load_sam, "vit_tiny", tmp_path / "edited.pth")
    assert "missing keys 1 (mask_decoder.iou_token.weight)" in msg and "unexpected keys 1 (mask_decoder.extra.weight)" in msg
    assert "sam_vit_h_4b8939.pth" in _error(load_sam, "vit_h", tmp_path / "absent.pth")
    assert "expected vit_b" in _error(load_sam, "vit_x", tiny)
    monkeypatch.setitem(sys.modules, "segment_anything", None)  # the extra not installed
    assert "pip install 'dhr[sam]'" in _error(load_sam, "vit_tiny", tiny)


# ---- prompt geometry -------------------------------------------------------------------------
def test_box_and_interior_points_of_a_rectangle():
    region = np.zeros((30, 40), bool)
    region[10:15, 20:29] = True  # rows 10..14, columns 20..28: centre (x 24, y 12)
    assert mask_box(region) == [20, 10, 28, 14]
    points = interior_points(region, 3)
    # The centre first (distance 3 to the outside), then the farthest pixels outside its
    # inscribed disc, one each side, symmetric about the centre.
    assert points.tolist() == [[24, 12], [21, 12], [27, 12]]


def test_interior_point_is_the_farthest_from_the_outside_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(5):
        region = np.zeros((20, 26), bool)
        for _ in range(3):
            y, x = rng.integers(0, 16), rng.integers(0, 20)
            region[y : y + rng.integers(3, 9), x : x + rng.integers(3, 12)] = True
        outside = np.argwhere(~np.pad(region, 1)) - 1  # the image border counts as outside
        ys, xs = np.nonzero(region)
        dist = np.sqrt(((np.stack([ys, xs], 1)[:, None] - outside[None]) ** 2).sum(-1)).min(1)
        (x, y), = interior_points(region, 1)
        assert region[y, x]
        assert np.isclose(dist[(ys == y) & (xs == x)][0], dist.max())


def test_mask_prompts_regions_points_and_negatives():
    mask = np.zeros((30, 40), np.uint8)
    mask[2:10, 2:12] = 1  # class 1, two regions
    mask[20:28, 25:38] = 1
    mask[12:18, 15:22] = 2  # class 2, one region
    mask[0, 30] = 2  # a 1-pixel region of class 2: below min_area, no prompt
    mask[29, :] = 255  # ignore: never prompted, never a negative
    prompts = mask_prompts(mask, PromptConfig(positive_points=2, negative_points=4, min_area=4))
    assert [(p.label, p.area) for p in prompts] == [(1, 104), (1, 80), (2, 42)]
    assert [p.box for p in prompts] == [[25, 20, 37, 27], [2, 2, 11, 9], [15, 12, 21, 17]]
    for p in prompts:
        pos = p.points[p.point_labels == 1]
        neg = p.points[p.point_labels == 0]
        assert len(pos) == 2 and p.region[pos[:, 1], pos[:, 0]].all()
        # Negatives: the most interior pixel of every other class present (background first: largest).
        assert [int(mask[y, x]) for x, y in neg] == sorted({0, 1, 2} - {p.label}, key=lambda c: -(mask == c).sum())
    coords, labels = batched_points(prompts)
    assert coords.shape == (3, 4, 2) and (labels >= 0).all()
    no_bg = mask_prompts(mask, PromptConfig(min_area=4), background=None)
    assert {p.label for p in no_bg} == {0, 1, 2}  # without a background class every class is prompted


def test_region_mask_inputs_follow_the_image_transform():
    regions = torch.zeros(1, 20, 40, dtype=torch.bool)
    regions[0, :, :20] = True  # left half of a 2:1 image
    # Longest side 40 -> 64: the image occupies 32 x 64 of the padded 64 x 64 square.
    x = region_mask_inputs(regions, (32, 64), 64, (16, 16), 5.0)
    assert x.shape == (1, 1, 16, 16) and set(x.unique().tolist()) == {-5.0, 5.0}
    inside = x[0, 0] > 0
    assert inside[:8, :8].all() and not inside[:8, 8:].any() and not inside[8:].any()


# ---- the two merge rules ----------------------------------------------------------------------
def test_resolve_prompted_accepts_by_iou_and_overlaps_by_score():
    mask = torch.zeros(10, 10, dtype=torch.uint8)
    mask[1:5, 1:5] = 1
    mask[5:9, 5:9] = 2
    regions = torch.stack([mask == 1, mask == 2, mask == 2])
    sam = torch.zeros(3, 10, 10, dtype=torch.bool)
    sam[0, 1:6, 1:6] = True  # IoU 16/25 with region 1, grows it
    sam[1, 4:9, 4:9] = True  # IoU 16/25 with region 2, overlaps mask 0 at (4..5, 4..5)
    sam[2, 0:10, 0:10] = True  # IoU 16/100: rejected
    scores = torch.tensor([0.9, 0.5, 0.99])
    out, accepted = resolve_prompted(mask, torch.tensor([1, 2, 2]), regions, sam, scores, accept_iou=0.6)
    assert accepted.tolist() == [True, True, False]
    expected = mask.clone()
    expected[sam[1]] = 2
    expected[sam[0]] = 1  # the higher score wins where both cover
    assert torch.equal(out, expected)
    out, _ = resolve_prompted(mask, torch.tensor([1, 2, 2]), regions, sam, torch.tensor([0.4, 0.5, 0.0]), 0.6)
    assert out[4, 4] == 2 and out[5, 5] == 2  # now the second mask scores higher
    assert torch.equal(resolve_prompted(mask, torch.tensor([1, 2, 2]), regions, sam, scores, 0.7)[0], mask)
    half = torch.zeros(3, 10, 10, dtype=torch.bool)
    half[0, 1:9, 1:5] = True  # region 1 and 16 more pixels: IoU exactly 0.5, accepted at 0.5
    assert resolve_prompted(mask, torch.tensor([1, 2, 2]), regions, half, scores, 0.5)[1].tolist() == [True, False, False]
    shrunk = torch.zeros(3, 10, 10, dtype=torch.bool)
    shrunk[0, 1:5, 1:4] = True  # IoU 12/16 with region 1: accepted, leaves column 4 out
    out, _ = resolve_prompted(mask, torch.tensor([1, 2, 2]), regions, shrunk, scores, 0.7, shrink=True)
    assert (out[1:5, 4] == 0).all() and (out[1:5, 1:4] == 1).all() and torch.equal(out[5:], mask[5:])
    out, _ = resolve_prompted(mask, torch.tensor([1, 2, 2]), regions, shrunk, scores, 0.7, shrink=False)
    assert torch.equal(out, mask)  # without --shrink a pixel no accepted mask covers keeps its label


def test_assign_segments_sam_wsss_rule():
    mask = torch.zeros(10, 20, dtype=torch.uint8)
    mask[:, 10:] = 1  # class 1: 100 pixels
    mask[0:2, 0:2] = 2  # class 2: 4 pixels
    mask[9, 0] = 255
    s = torch.zeros(5, 10, 20, dtype=torch.bool)
    s[0, 2:, 8:] = True  # 16 bg + 80 class 1: 2*80 - 96 > 0 -> class 1
    s[1, 0:2, 0:4] = True  # 4 class 2 + 4 bg: no majority (8 - 8 = 0), but covers 4/4 of class 2 -> 2
    s[2, 5:10, 0:4] = True  # 19 bg + 1 ignore of 20 -> background (0)
    s[3, 0:2, 9:11] = True  # 2 bg + 2 class 1: 2*2 - 4 = 0, no majority; covers 2% -> none
    s[4, 4:6, 12:14] = True  # inside segment 0, smaller: painted after it, its own class (1)
    out, assigned = assign_segments(mask, s, coverage=0.85)
    assert assigned.tolist() == [1, 2, 0, -1, 1]
    expected = mask.clone()
    expected[s[0]] = 1
    expected[s[1]] = 2
    expected[s[2]] = 0
    assert torch.equal(out, expected)
    assert out[9, 0] == 0  # an ignore pixel claimed by segment 2
    assert out[0, 9] == 0 and out[0, 10] == 1  # segment 3 (no class) leaves its pixels as they were
    both = torch.zeros(1, 10, 20, dtype=torch.bool)
    both[0, 0:3, 0:3] = True  # 5 bg (majority) + all 4 of class 2 (coverage): the majority class wins
    assert assign_segments(mask, both)[1].tolist() == [0]
    mask2 = torch.zeros(10, 10, dtype=torch.uint8)
    mask2[0:5] = 1
    seg = torch.zeros(2, 10, 10, dtype=torch.bool)
    seg[0] = True  # 50/50: no majority for either class, covers 100% of both: the larger overlap (tie: first)
    seg[1, 0:5, 0:5] = True  # smaller, inside: painted last -> class 1 where it is
    out, assigned = assign_segments(mask2, seg)
    assert assigned.tolist() == [0, 1] and (out[0:5, 0:5] == 1).all() and (out[0:5, 5:] == 0).all()
    out, assigned = assign_segments(mask2, seg, coverage=1.0)
    assert assigned.tolist() == [0, 1]


# ---- whole runs --------------------------------------------------------------------------------
@pytest.fixture
def setup(tmp_path, tiny):
    from dhr_cli.io.provenance import make_provenance
    from dhr_cli.io.store import create_store
    from dhr_cli.io.datasets import open_dataset

    data = make_flat(tmp_path / "data")
    dataset = open_dataset(data)
    masks = tmp_path / "masks.h5"
    with create_store(masks, "masks", dataset.classes, provenance=make_provenance("test")) as w:
        for item_id in dataset.ids:
            w.write(item_id, {"mask": dataset.gt(item_id)})
    return data, masks, tiny, dataset


def _refine(data, masks, weights, out, *extra):
    return runner.invoke(__import__("dhr_cli.cli", fromlist=["app"]).app, [
        "refine", "--masks", str(masks), "--data", str(data), "--sam", "vit_tiny", "--sam-weights", str(weights),
        "--out", str(out), "--device", "cpu", "--quiet", *extra])


def _read(path):
    from dhr_cli.io.store import open_store

    with open_store(path, expect="masks") as s:
        return {i: s.read(i).mask for i in s.ids}, s.provenance


@pytest.mark.parametrize("mode,extra", [
    ("prompt", ["--accept-iou", "0", "--mask-input"]),
    ("merge", ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-thresh", "0"]),
])
def test_refine_both_modes(setup, tmp_path, mode, extra):
    data, masks, weights, dataset = setup
    out = tmp_path / f"{mode}.h5"
    res = _refine(data, masks, weights, out, "--mode", mode, *extra)
    assert res.exit_code == 0, res.output
    assert "Wrote 3 refined masks" in res.output
    refined, prov = _read(out)
    inputs, _ = _read(masks)
    assert prov["command"] == "refine" and prov["inputs"]["masks"] == str(masks)
    assert prov["inputs"]["sam_weights"] == str(weights) and prov["options"]["mode"] == mode
    changed = 0
    for item_id, before in inputs.items():
        after = refined[item_id]
        assert after.shape == before.shape and after.dtype == np.uint8
        diff = after != before
        changed += int(diff.sum())
        if mode == "prompt":  # accepted masks paint the prompted (foreground) classes only
            allowed = set(np.unique(before).tolist()) - {0, 255}
        else:  # segments take classes present in the input mask
            allowed = set(np.unique(before).tolist()) - {255}
        assert set(np.unique(after[diff]).tolist()) <= allowed
    assert changed > 0  # SAM's (random) masks were merged in


def test_refine_resumes_after_an_interruption(setup, tmp_path, monkeypatch):
    from dhr_cli.pipeline import refine

    data, masks, weights, _ = setup
    args = ["--accept-iou", "0"]
    assert _refine(data, masks, weights, tmp_path / "full.h5", *args).exit_code == 0
    real, calls = refine.SamRefiner.__call__, []

    def interrupted(self, image, mask):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, image, mask)

    monkeypatch.setattr(refine.SamRefiner, "__call__", interrupted)
    out = tmp_path / "cut.h5"
    res = _refine(data, masks, weights, out, *args)
    assert res.exit_code == 130 and "--resume" in res.output
    assert not out.exists() and (tmp_path / "cut.h5.partial").exists()
    monkeypatch.setattr(refine.SamRefiner, "__call__", real)
    res = _refine(data, masks, weights, out, *args, "--resume")
    assert res.exit_code == 0, res.output
    assert "(1 already there)" in res.output
    full, _ = _read(tmp_path / "full.h5")
    resumed, prov = _read(out)
    assert full.keys() == resumed.keys() and all(np.array_equal(full[i], resumed[i]) for i in full)
    assert prov.get("resumed_at")


def _one_line_error(res, *words):
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
    for word in words:
        assert word in lines[0]


def test_refine_bad_inputs_leave_nothing(setup, tmp_path):
    data, masks, weights, dataset = setup
    out = tmp_path / "out.h5"
    vit_l = {k: torch.empty(0) for k in _meta_sam("vit_l")}
    vit_l["image_encoder.patch_embed.proj.weight"] = torch.zeros(1024, 3, 16, 16)
    torch.save(vit_l, tmp_path / "large.pth")
    res = runner.invoke(__import__("dhr_cli.cli", fromlist=["app"]).app, [
        "refine", "--masks", str(masks), "--data", str(data), "--sam", "vit_b", "--sam-weights",
        str(tmp_path / "large.pth"), "--out", str(out), "--quiet"])
    _one_line_error(res, "holds a vit_l SAM checkpoint, --sam vit_b given")
    (tmp_path / "junk.pth").write_bytes(b"\x00" * 64)
    _one_line_error(_refine(data, masks, tmp_path / "junk.pth", out), "junk.pth", "not a PyTorch checkpoint")
    other = write_plain_store(tmp_path / "other.h5", "masks", ["background", "cat", "dog", "bird"],
                              {i: ("mask", dataset.gt(i), {}) for i in dataset.ids})
    _one_line_error(_refine(data, other, weights, out), "other.h5", "classes")
    partial = write_plain_store(tmp_path / "partial.h5", "masks", dataset.classes,
                                {i: ("mask", dataset.gt(i), {}) for i in dataset.ids[:2]})
    _one_line_error(_refine(data, partial, weights, out), "partial.h5", "missing", "--missing skip")
    assert not out.exists() and not (tmp_path / "out.h5.partial").exists()
    res = _refine(data, partial, weights, out, "--missing", "skip")
    assert res.exit_code == 0 and "Wrote 2 refined masks" in res.output


def test_refine_without_the_extra(setup, tmp_path, monkeypatch):
    data, masks, weights, _ = setup
    monkeypatch.setitem(sys.modules, "segment_anything", None)
    _one_line_error(_refine(data, masks, weights, tmp_path / "o.h5"), "pip install 'dhr[sam]'")
    assert not (tmp_path / "o.h5").exists() and not (tmp_path / "o.h5.partial").exists()


def test_export_prompts_json(setup, tmp_path):
    from dhr_cli.cli import app

    data, masks, _, dataset = setup
    res = runner.invoke(app, ["export", str(masks), "--prompts", str(tmp_path / "prompts"), "--positive-points", "2"])
    assert res.exit_code == 0, res.output
    inputs, _ = _read(masks)
    files = sorted(p.name for p in (tmp_path / "prompts").iterdir())
    assert files == [f"{i}.json" for i in sorted(inputs)]
    doc = json.loads((tmp_path / "prompts" / "b.json").read_text())
    mask = inputs["b"]
    assert doc["id"] == "b" and doc["image_size"] == list(mask.shape) and doc["classes"] == dataset.classes
    assert sorted(p["class"] for p in doc["prompts"]) == ["cat", "dog"]
    for p in doc["prompts"]:
        region = mask == p["label"]
        assert p["box"] == mask_box(region) and p["area"] == int(region.sum())
        pos = [pt for pt, lab in zip(p["points"], p["point_labels"]) if lab == 1]
        assert len(pos) == 2 and all(region[y, x] for x, y in pos)
    res = runner.invoke(app, ["export", str(masks)])
    _one_line_error(res, "--out DIR", "--prompts DIR")


_RANK_SCRIPT = """
import sys
from dhr_cli.config import RefineConfig
from dhr_cli.models import sam
from dhr_cli.pipeline.refine import run_refine
from dhr_cli.testing.sam import tiny_sam_type

sam.SAM_TYPES["vit_tiny"] = tiny_sam_type()
data, masks, weights, out = sys.argv[1:5]
run_refine(RefineConfig(accept_iou=0.0, device="cpu"), masks=masks, data=data, sam="vit_tiny", weights=weights,
           out=out, quiet=True)
"""


def test_refine_under_torchrun_matches_one_process(setup, tmp_path):
    import os
    import subprocess

    if not torch.distributed.is_gloo_available():
        pytest.skip("gloo backend not available")
    data, masks, weights, _ = setup
    assert _refine(data, masks, weights, tmp_path / "one.h5", "--accept-iou", "0").exit_code == 0
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), str(data), str(masks), str(weights), str(tmp_path / "two.h5")],
                         env=env, capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr[-3000:]
    one, _ = _read(tmp_path / "one.h5")
    merged, prov = _read(tmp_path / "two.h5")
    assert one.keys() == merged.keys() and all(np.array_equal(one[i], merged[i]) for i in one)
    assert len(prov["merged_from"]) == 2 and not list(tmp_path.glob("two.rank*"))
