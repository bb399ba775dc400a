"""`dhr uss fit`: fit a STEGO head on a frozen backbone's features of the user's images (no labels).

`run_uss_fit(dataset, backbone, out, cfg)`:
1. the backbone's features of every image, once (frozen), at cfg.scales and flipped: the views;
2. each image's cfg.neighbours nearest images by cosine of the pooled scale-1 features (STEGO's kNN);
3. Adam on the head (models/stego.ClusterProjection) with STEGO's loss (kernels/correlation.py) on
   self, kNN and random pairs; a resume state OUT.partial every cfg.checkpoint_every steps;
4. OUT written once complete (models/uss_head.py format), OUT.partial removed.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from dhr_cli.config import UssFitConfig
from dhr_cli.errors import CheckpointError, DatasetError, InputError
from dhr_cli.io.outputs import OutputLock, partial_path
from dhr_cli.io.runtime import resolve_device
from dhr_cli.models.checkpoints import save_atomic

logger = logging.getLogger(__name__)


def check_output(out: Path, overwrite: bool, resume: bool, inputs: dict | None = None) -> None:
    """Fail before any work if OUT or an interrupted OUT.partial would be lost (the shared output check;
    a finished head is never resumed: it needs --overwrite)."""
    from dhr_cli.io.outputs import check_output

    check_output(out, overwrite=overwrite, resume=resume, inputs=inputs)
    if out.exists() and not overwrite:
        raise InputError(f"{out}: already exists; pass --overwrite to replace it")


@torch.no_grad()
def cache_views(dataset, backbone, cfg: UssFitConfig, device, quiet: bool = True):
    """Per image, its views' feature maps ((C, h, w) float16 on CPU) and its pooled unit vector (C,)."""
    from dhr_cli.io.progress import track
    from dhr_cli.models.extract import multiscale_extract
    from dhr_cli.pipeline.cams import _to_tensor

    views, pooled = [], []
    for item_id in track(dataset.ids, f"{backbone.name} features", quiet=quiet):
        x = _to_tensor([dataset.image(item_id)], device)
        own = []
        for s in cfg.scales:
            f = multiscale_extract(backbone, x, None, (), False, feature_scales=(s,), base_side=cfg.side)[0]["features"]
            own.append(f.cpu().half())
            if cfg.flip:
                own.append(f.flip(-1).cpu().half())
            if s == cfg.scales[0] or s == 1.0:
                vec = F.normalize(f.float().mean((1, 2)), dim=0).cpu()
        views.append(own)
        pooled.append(vec)
    return views, torch.stack(pooled)


def nearest_neighbours(pooled: torch.Tensor, k: int) -> torch.Tensor:
    """(N, C) unit vectors -> (N, k) indices of the k most cosine-similar OTHER images."""
    sim = pooled @ pooled.T
    sim.fill_diagonal_(-float("inf"))
    return sim.topk(k, dim=1).indices


def _codes(proj, maps: list[torch.Tensor], dropout: float, training: bool):
    """Head codes and loss signals of (C, h, w) maps; same-size maps go through the head together."""
    codes, signals = [None] * len(maps), [None] * len(maps)
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(maps):
        groups.setdefault(tuple(m.shape), []).append(i)
    for idx in groups.values():
        x = torch.stack([maps[i] for i in idx]).float()
        code = proj(F.dropout2d(x, dropout, training))
        signal = F.dropout2d(x, dropout, training)  # STEGO drops features for the loss signal too
        for j, i in enumerate(idx):
            codes[i], signals[i] = code[j], signal[j]
    return codes, signals


def _state_key(dataset, backbone_name: str, backbone_weights, cfg: UssFitConfig) -> dict:
    fit = {k: v for k, v in asdict(cfg).items() if k not in ("device", "checkpoint_every", "steps")}
    return {"data": str(Path(dataset.root).resolve()), "split": dataset.split or "", "ids": len(dataset.ids),
            "backbone": backbone_name, "backbone_weights": str(backbone_weights or ""), "config": fit}


def run_uss_fit(dataset, backbone: str, out: str | Path, cfg: UssFitConfig = UssFitConfig(), *,
                backbone_weights=None, device=None, overwrite: bool = False, resume: bool = False,
                trust: bool = False, quiet: bool = False, stop_after: int | None = None) -> dict:
    """Fit the head; write OUT (see models/uss_head.py). Returns a summary (steps, losses, out).

    stop_after: run at most this many steps in this call, leaving OUT.partial (a time-boxed job, or a
    test of --resume); a later call with resume=True continues where it stopped, bit for bit.
    OUT.lock is held throughout, as by every store writer: a second writer of OUT is refused in one line.
    """
    lock = OutputLock(Path(out))  # taken first: the output check in _fit then sees what no other writer changes
    try:
        return _fit(dataset, backbone, out, cfg, backbone_weights=backbone_weights, device=device,
                    overwrite=overwrite, resume=resume, trust=trust, quiet=quiet, stop_after=stop_after)
    finally:
        lock.release()


def _fit(dataset, backbone: str, out: str | Path, cfg: UssFitConfig, *, backbone_weights, device, overwrite: bool,
         resume: bool, trust: bool, quiet: bool, stop_after: int | None) -> dict:
    from dhr_cli.io.progress import progress_bar
    from dhr_cli.kernels.correlation import stego_loss, super_perm
    from dhr_cli.models import canonical
    from dhr_cli.models.stego import ClusterProjection
    from dhr_cli.models.uss_head import BACKBONES, backbone_source, pack_head

    out = Path(out)
    check_output(out, overwrite, resume, {"--data": dataset.root})
    name = canonical(backbone)
    if name not in BACKBONES:
        raise InputError(f"--backbone {backbone!r}: a fitted head needs one of {', '.join(BACKBONES)}")
    n = len(dataset.ids)
    if n <= cfg.neighbours:
        raise DatasetError(f"{dataset.root}: {n} images, but each needs {cfg.neighbours} neighbours "
                           f"(--neighbours); give more than {cfg.neighbours} images or lower --neighbours")
    device = resolve_device(str(cfg.device if device is None else device))
    key = _state_key(dataset, name, backbone_weights, cfg)
    state = None
    if resume and partial_path(out).exists() and not overwrite:
        from dhr_cli.models.checkpoints import read_checkpoint

        state = read_checkpoint(partial_path(out))
        if not isinstance(state, dict) or state.get("key") != key:
            raise InputError(f"{partial_path(out)}: was started with other data, backbone or settings; "
                             "remove it or pass --overwrite to start over")
    src = backbone_source(name, backbone_weights, device, trust=trust)
    for p in src.parameters():
        p.requires_grad_(False)
    views, pooled = cache_views(dataset, src, cfg, device, quiet)
    knn = nearest_neighbours(pooled, cfg.neighbours)
    dim_in = views[0][0].shape[0]

    torch.manual_seed(cfg.seed)
    proj = ClusterProjection(dim_in, cfg.dim).to(device)
    opt = torch.optim.Adam(proj.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, history = 0, []
    if state is not None:
        proj.load_state_dict(state["head"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        step, history = int(state["step"]), list(state["history"])
        logger.info("%s: resuming at step %d", partial_path(out), step)

    def save_state() -> None:
        save_atomic({"key": key, "head": proj.state_dict(), "optimizer": opt.state_dict(), "step": step,
                      "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "history": history},
                     partial_path(out))

    b = min(cfg.batch_size, n)
    s = cfg.feature_samples
    end = cfg.steps if stop_after is None else min(cfg.steps, step + stop_after)
    out.parent.mkdir(parents=True, exist_ok=True)
    proj.train()
    # A stop (SIGTERM, Ctrl-C) can land anywhere in a step: the state saved then must be that of the last
    # whole step, or the resumed run replays the step with RNGs already advanced (not bit for bit).
    rng_at_step, stepping = (gen.get_state(), torch.get_rng_state()), False
    try:
        with progress_bar(quiet) as bar:
            task = bar.add_task("fitting the USS head", total=cfg.steps, completed=step, rate="")
            while step < end:
                rng_at_step = (gen.get_state(), torch.get_rng_state())
                idx = torch.randperm(n, generator=gen)[:b].tolist()
                pick = torch.randint(0, 1 << 30, (b, 3), generator=gen).tolist()
                pos = [int(knn[i, r[0] % cfg.neighbours]) for i, r in zip(idx, pick)]
                maps = [views[i][r[1] % len(views[i])].to(device) for i, r in zip(idx, pick)]
                maps_pos = [views[j][r[2] % len(views[j])].to(device) for j, r in zip(pos, pick)]
                coords1 = (torch.rand((b, s, s, 2), generator=gen) * 2 - 1).to(device)
                coords2 = (torch.rand((b, s, s, 2), generator=gen) * 2 - 1).to(device)
                negatives = [super_perm(b, gen) for _ in range(cfg.neg_samples)]
                codes, signals = _codes(proj, maps + maps_pos, cfg.dropout, True)
                parts = stego_loss(signals[:b], codes[:b], signals[b:], codes[b:], coords1, coords2, negatives, cfg)
                opt.zero_grad()
                parts["loss"].backward()
                stepping = True  # from here the weights change: the step must finish before a state is saved
                opt.step()
                step += 1
                history.append([round(float(parts[k].detach()), 5) for k in ("loss", "self", "knn", "random")])
                rng_at_step = (gen.get_state(), torch.get_rng_state())  # the state of the step just done
                stepping = False
                bar.update(task, advance=1, rate=f"loss {history[-1][0]:+.4f}")
                if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                    save_state()
    except KeyboardInterrupt:
        if not stepping:  # mid-update: keep the last periodic state instead
            gen.set_state(rng_at_step[0])
            torch.set_rng_state(rng_at_step[1])
            save_state()
        raise
    if step < cfg.steps:
        save_state()
        return {"steps": step, "complete": False, "out": str(partial_path(out)), "history": history}
    head = pack_head(proj.eval(), name, backbone_weights, asdict(cfg), step)
    head["fit"] = {"data": key["data"], "split": key["split"], "images": n,
                   "final_loss": history[-1] if history else None}
    save_atomic(head, out)
    partial_path(out).unlink(missing_ok=True)
    return {"steps": step, "complete": True, "out": str(out), "history": history, "images": n}


def check_backbone_weights(backbone: str, weights) -> None:
    """A one-line error before any work when a DINO backbone has no weights file (or a missing one)."""
    from dhr_cli.models import canonical

    from dhr_cli.models.uss_head import BACKBONES

    name = canonical(backbone)
    if name not in BACKBONES:
        raise InputError(f"--backbone {backbone!r}: a fitted head needs one of {', '.join(BACKBONES)}")
    if name != "lite0" and weights is None:
        raise CheckpointError(f"--backbone {backbone}: needs its weights file (--backbone-weights); dhr never downloads")
    if weights is not None and not Path(weights).exists():
        raise CheckpointError(f"{weights}: backbone weights file not found")
