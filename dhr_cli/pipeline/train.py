"""`dhr train`: DeepLabv3+ trained with DHR's recursive learning (docs/method.md, "Recursive learning").

Every iteration, without gradient, the pseudo-mask of every crop in the batch is regenerated
from the live network: Step 1 (OT seeds from the CAM head, pasted over the fixed input masks),
Step 2 (USS prototypes, features warped with the crop's own resize/flip/crop), Step 3 (C4, C5
of the backbone as WSS features), CRF at crop resolution; then CE(seg) + multilabel
soft-margin(CAMs pooled over the valid crop). SGD, 10x lr on new layers, poly schedule, EMA,
AMP on CUDA, DistributedDataParallel under torchrun.

Run folder:
    RUN_DIR/config.json             every option, the inputs, the world size
    RUN_DIR/checkpoints/last.pt     model, EMA, optimizer, scaler, epoch, batch within it, RNG state
                                    (every --checkpoint-every iterations and every epoch; --resume)
    RUN_DIR/model.pt                final weights (EMA and raw) + network spec + classes
    RUN_DIR/log.jsonl               one record per logged step and per epoch
    RUN_DIR/epochs.csv              one row per epoch (loss, lr, validation mIoU)

Determinism: the sample order depends on (seed, epoch), each sample's augmentation on
(seed, epoch, index), dropout on (seed, epoch); so a resumed run repeats the uninterrupted one,
and N processes with a global batch B see the same batches as one process with batch B.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import Sampler

from dhr_cli import __version__
from dhr_cli.config import IGNORE_INDEX, TrainConfig
from dhr_cli.errors import CheckpointError, DatasetError, InputError, StoreError
from dhr_cli.io.datasets import Dataset, open_dataset
from dhr_cli.io.loading import LazyStore, MaskSource, error_carrying_loader, raise_carried
from dhr_cli.io.progress import progress_bar
from dhr_cli.io.outputs import OutputLock, check_replaceable, write_text_atomic
from dhr_cli.io.provenance import input_ids
from dhr_cli.pipeline.inputs import check_classes
from dhr_cli.pipeline.run_folder import is_train_run
from dhr_cli.io.runtime import resolve_device
from dhr_cli.models.checkpoints import save_atomic
from dhr_cli.models.deeplab import DHRNet, NetworkSpec, build_network
from dhr_cli.pipeline.augment import (
    color_jitter,
    denormalize,
    normalize,
    sample_geometry,
    valid_region,
    warp_features,
    warp_image,
    warp_mask,
)

logger = logging.getLogger(__name__)


# ---- inputs -------------------------------------------------------------------------------------
def open_training_masks(path: str | os.PathLike, ids: list[str], dataset: Dataset | None = None) -> MaskSource:
    """The fixed input pseudo-masks M0 (--masks): a masks/seeds store (of the dataset's classes) or a
    folder of <id>.png, holding a mask for every training image."""
    path = Path(path)
    if not (path.is_dir() or path.is_file()):
        raise InputError(f"--masks {path}: no such store or folder")
    masks = MaskSource(path, empty_folder_ok=True,  # an empty folder is reported as the images it lacks
                       n_classes=len(dataset.classes) if dataset is not None else None)
    if dataset is not None and masks.classes is not None:
        check_classes(masks, dataset)  # another class order would train the wrong labels
    missing = [i for i in ids if i not in masks]
    if missing:
        raise InputError(f"--masks {path}: {len(missing)} training images have no mask, e.g. {missing[:3]}")
    return masks


class FeatureSource:
    """Per-image feature maps (D, h, w) covering the whole image: a features (or cams) store."""

    def __init__(self, spec: str | os.PathLike, ids: list[str], option: str = "--uss",
                 sizes: dict[str, tuple[int, int]] | None = None):
        path = Path(spec)
        if not path.is_file():
            raise InputError(f"{option} {spec}: no such store; give a features store, or a network name on the "
                             f"command line (`dhr train --uss stego --uss-weights ...`)")
        self.path = path
        self._store = LazyStore(path, ("features", "cams"))
        missing = [i for i in ids if i not in self._store.ids]
        if missing:
            raise InputError(f"{option} {path}: {len(missing)} training images have no features, e.g. {missing[:3]}")
        for item_id, size in (sizes or {}).items():  # maps of another image would be warped onto this one's crops
            stored = self._store.image_size(item_id)
            if tuple(stored) != tuple(size):
                raise StoreError(f"{option} {path}: item {item_id!r} has image_size {stored[1]}x{stored[0]} but its "
                                 f"image is {size[1]}x{size[0]}; the features were computed for other images")
        self._first = ids[0] if ids else None
        self._channels = self._store.read(ids[0]).features.shape[0] if ids else None  # every item's, checked on read

    def read(self, item_id: str) -> np.ndarray:
        x = self._store.read(item_id).features
        if self._channels is not None and x.shape[0] != self._channels:  # a batch could not be stacked
            raise StoreError(f"{self.path}: item {item_id!r}: features have {x.shape[0]} channels, but item "
                             f"{self._first!r} has {self._channels}; one network's maps for every image expected")
        return x


def cam_index(dataset: Dataset) -> tuple[int, int]:
    """(number of CAM classes, label value of CAM channel 0): background has no CAM."""
    return (len(dataset.classes) - 1, 1) if dataset.has_background else (len(dataset.classes), 0)


class TrainSamples(torch.utils.data.Dataset):
    """Augmented crops with their pseudo-masks, label vectors and warped USS features."""

    def __init__(self, dataset: Dataset, ids: list[str], masks: MaskSource, uss: FeatureSource | None, cfg: TrainConfig):
        self.dataset, self.ids, self.masks, self.uss, self.cfg = dataset, ids, masks, uss, cfg
        self.num_cams, self.cam_offset = cam_index(dataset)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.ids)

    def labels_vector(self, item_id: str) -> torch.Tensor:
        v = torch.zeros(self.num_cams)
        for value in self.dataset.labels(item_id):
            v[value - self.cam_offset] = 1
        return v

    def __getitem__(self, index: int) -> dict:
        cfg, item_id = self.cfg, self.ids[index]
        rng = np.random.default_rng([cfg.seed, self.epoch, index])
        image = self.dataset.image(item_id)
        mask = self.masks.read(item_id)
        if mask.shape != image.shape[:2]:
            raise DatasetError(f"--masks {self.masks.path}: mask of {item_id} is {mask.shape[1]}x{mask.shape[0]} "
                               f"but the image is {image.shape[1]}x{image.shape[0]}")
        g = sample_geometry(rng, image.shape[:2], cfg.crop_size, cfg.scale_range, cfg.flip)
        image = color_jitter(warp_image(image, g), rng, cfg.color_jitter)
        valid = torch.from_numpy(valid_region(g))
        x = normalize(image) * valid  # padding is 0 after normalisation
        out = {"image": x, "mask": torch.from_numpy(warp_mask(mask, g).astype(np.int64)), "valid": valid,
               "labels": self.labels_vector(item_id), "index": index}
        if self.uss is not None:
            grid = (math.ceil(g.crop[0] / cfg.uss_cell), math.ceil(g.crop[1] / cfg.uss_cell))
            out["uss"] = warp_features(torch.from_numpy(self.uss.read(item_id)), g, grid)
        return out


class GlobalBatchSampler(Sampler):
    """Batches of one process: a (seed, epoch) permutation cut into global batches, each split by rank.

    With N processes and global batch B, rank r gets items [r*B/N, (r+1)*B/N) of every global
    batch, so the union over ranks is exactly what one process with batch B sees.
    """

    def __init__(self, n: int, global_batch: int, rank: int = 0, world: int = 1, seed: int = 0):
        if global_batch % world:
            raise InputError(f"--batch-size {global_batch} must be a multiple of the {world} processes")
        if n < global_batch:
            raise InputError(f"--batch-size {global_batch} is larger than the {n} training images")
        self.n, self.global_batch, self.rank, self.world, self.seed = n, global_batch, rank, world, seed
        self.local = global_batch // world
        self.epoch = 0
        self.skip = 0  # batches of this epoch already trained (a mid-epoch resume)

    def __len__(self) -> int:
        return self.n // self.global_batch

    def __iter__(self):
        perm = np.random.default_rng([self.seed, self.epoch, 7]).permutation(self.n)
        for b in range(self.skip, len(self)):
            batch = perm[b * self.global_batch:(b + 1) * self.global_batch]
            yield batch[self.rank * self.local:(self.rank + 1) * self.local].tolist()


# ---- training pieces ----------------------------------------------------------------------------
def warmup_ema_fn(decay: float):
    """AveragedModel multi_avg_fn: EMA with the usual warm-up d_t = min(decay, (1 + t) / (10 + t)), t = 1, 2, ...

    (get_ema_multi_avg_fn has no warm-up.) Integer buffers (BatchNorm's num_batches_tracked) are copied.
    """

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        t = int(num_averaged)  # n_averaged counts the initial copy, so this is the t-th update after it
        d = min(decay, (1 + t) / (10 + t))
        if averaged[0].dtype.is_floating_point:
            torch._foreach_mul_(averaged, d)
            torch._foreach_add_(averaged, current, alpha=1 - d)
        else:
            for a, c in zip(averaged, current):
                a.copy_(c)

    return update


def make_ema(model: nn.Module, decay: float) -> AveragedModel:
    """EMA of parameters and buffers; `.module` is the averaged network (eval mode, no gradients)."""
    ema = AveragedModel(model, multi_avg_fn=warmup_ema_fn(decay), use_buffers=True)
    ema.module.eval()
    for p in ema.module.parameters():
        p.requires_grad_(False)
    ema.update_parameters(model)  # the initial copy (n_averaged = 1); warm-up counts updates after it
    return ema


def poly_lr(base: float, step: int, total: int, power: float) -> float:
    """The poly schedule in closed form (what PolynomialLR computes step by step)."""
    return base * (1 - min(step, total) / max(total, 1)) ** power


@dataclass
class Training:
    """What a run updates each iteration and what last.pt restores: network, EMA, optimizer, schedule, scaler."""

    model: DHRNet
    ema: AveragedModel | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.PolynomialLR
    scaler: torch.amp.GradScaler

    @classmethod
    def build(cls, model: DHRNet, cfg: TrainConfig, total_steps: int, amp_scaling: bool) -> "Training":
        params = [{"params": model.backbone_parameters(), "lr": cfg.lr},
                  {"params": model.new_parameters(), "lr": cfg.lr * cfg.head_lr_mult}]
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=max(total_steps, 1), power=cfg.poly_power)
        return cls(model, make_ema(model, cfg.ema_decay) if cfg.ema_decay > 0 else None, optimizer, scheduler,
                   torch.amp.GradScaler("cuda", enabled=amp_scaling))

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def after_step(self) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.scheduler.step()

    def weights(self) -> dict:
        return {"model": self.model.state_dict(), "ema": self.ema.module.state_dict() if self.ema is not None else None}

    def state(self) -> dict:
        return {**self.weights(), "ema_updates": int(self.ema.n_averaged) - 1 if self.ema is not None else 0,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load(self, ckpt: dict, step: int) -> None:
        self.model.load_state_dict(ckpt["model"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.module.load_state_dict(ckpt["ema"])
            self.ema.n_averaged.fill_(ckpt.get("ema_updates", 0) + 1)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scheduler"):
            self.scheduler.load_state_dict(ckpt["scheduler"])
        else:  # a last.pt from before the scheduler was saved: its lr is one step behind
            self.scheduler.last_epoch = step
            for g, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                g["lr"] = poly_lr(base, step, self.scheduler.total_iters, self.scheduler.power)
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])


def _set_bn_eval(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def pooled_cam_logits(cams: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """cams (B, K, h, w), valid (B, S, S) bool -> (B, K) mean of each CAM over the valid crop area."""
    w = F.adaptive_avg_pool2d(valid[:, None].float(), cams.shape[2:])
    return (cams * w).sum((2, 3)) / w.sum((2, 3)).clamp_min(1e-6)


def seg_loss_sum(logits: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of pixel CE over labelled pixels, their count); logits upsampled to the mask size."""
    up = F.interpolate(logits.float(), size=masks.shape[1:], mode="bilinear", align_corners=False)
    loss = F.cross_entropy(up, masks, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (masks != IGNORE_INDEX).sum()


# ---- the run ------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    run_dir: Path
    epochs: int
    steps: int
    history: list[dict] = field(default_factory=list)  # one record per epoch
    val_miou: float | None = None


def _config_record(cfg: TrainConfig, inputs: dict, world: int, input_ids: dict) -> dict:
    return {"dhr_version": __version__, "config": asdict(cfg), "inputs": inputs, "world_size": world,
            "input_ids": input_ids}


def _input_ids(inputs: dict, dataset: Dataset, ids: list[str]) -> dict:
    """What --resume must find unchanged beyond the paths: the masks (a store, or every PNG of a folder), the
    USS store, and the training images and label files (the dataset's fingerprint over `ids`)."""
    files = {k: inputs[k] for k in ("masks", "uss") if inputs.get(k) is not None}
    return input_ids(files, dataset, ids)


_RESUME_FREE = {"epochs", "device", "num_workers", "log_every", "val_split", "val_size", "checkpoint_every"}


def _check_resume_config(run_dir: Path, cfg: TrainConfig, inputs: dict, input_ids: dict) -> None:
    path = run_dir / "config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        saved = None
    if not (isinstance(saved, dict) and isinstance(saved.get("config", {}), dict)
            and isinstance(saved.get("inputs", {}), dict)):  # valid JSON of another shape is as unreadable
        raise CheckpointError(f"{path}: missing or unreadable; cannot check that --resume continues the same run")
    now = json.loads(json.dumps(asdict(cfg)))
    differ = sorted(k for k in now if k not in _RESUME_FREE and saved.get("config", {}).get(k) != now[k])
    differ += sorted(f"--{k}" for k in inputs if saved.get("inputs", {}).get(k) != inputs[k] and k != "backbone_weights")
    ids_then = saved.get("input_ids") if isinstance(saved.get("input_ids"), dict) else {}  # runs of older versions: none
    differ += sorted(f"{'--' + k if k != 'data' else '--data (its images or label files)'} (changed since the run began)"
                     for k in set(ids_then) & set(input_ids) if ids_then[k] != input_ids[k] and f"--{k}" not in differ)
    if differ:
        raise CheckpointError(f"{run_dir}: --resume with options that differ from the saved run: {', '.join(differ)}")


def run_train(cfg: TrainConfig, data: str | os.PathLike, masks: str | os.PathLike, out: str | os.PathLike, *,
              uss: str | os.PathLike | None = None, split: str | None = None,
              backbone_weights: str | os.PathLike | None = None, resume: bool = False,
              overwrite: bool = False, quiet: bool = False, max_steps: int | None = None) -> TrainResult:
    """Train a DHR network; returns what was done. `max_steps` stops early (tests, smoke runs)."""
    from dhr_cli.io.distributed import current_rank

    place = current_rank()  # the one reading of torchrun's RANK / WORLD_SIZE / LOCAL_RANK
    rank, world, local_rank = place.rank, place.world, place.local_rank
    distributed = world > 1
    device = resolve_device(cfg.device)
    if distributed and device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    run_dir = Path(out)
    fresh = not resume and not (run_dir.is_dir() and any(run_dir.iterdir()))  # this run makes the folder
    # RUN_DIR.lock (beside the folder) for the whole run, on rank 0: a second `dhr train` of the same
    # --out (a --resume or --overwrite while this one runs) is refused in one line, never mixed in.
    lock = OutputLock(run_dir) if rank == 0 else None
    try:
        return _run(cfg, Path(data), Path(masks), run_dir, uss, split, backbone_weights, resume, overwrite,
                    quiet or rank != 0, max_steps, rank, world, device)
    except Exception:
        # A check that fails after the run folder was made (backbone weights, a store's item) leaves no
        # half-made folder to block the corrected rerun; one with a checkpoint is kept for --resume.
        if fresh and rank == 0 and run_dir.is_dir() and not (run_dir / "checkpoints" / "last.pt").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            lock.release()
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def check_overwritable(run_dir: Path) -> None:
    """--overwrite removes the whole run folder: only an earlier run's (or an empty one), never a folder
    given to --out by mistake."""
    check_replaceable(run_dir, is_train_run, "a dhr train run folder (no config.json of a run)")


def _prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool, rank: int) -> Path | None:
    last = run_dir / "checkpoints" / "last.pt"
    if rank == 0:
        if run_dir.exists() and not run_dir.is_dir():
            raise InputError(f"--out {run_dir}: is a file, expected a run folder")
        if resume and overwrite:
            raise InputError(f"--out {run_dir}: --resume and --overwrite exclude each other")
        if run_dir.is_dir() and any(run_dir.iterdir()) and not resume:
            if not overwrite:
                raise InputError(f"--out {run_dir}: already holds a run; pass --resume to continue it or --overwrite to start again")
            check_overwritable(run_dir)
            shutil.rmtree(run_dir)
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    if resume and not last.is_file():
        raise CheckpointError(f"--out {run_dir}: nothing to resume (no checkpoints/last.pt: the run stopped before its "
                              "first checkpoint); pass --overwrite instead of --resume to start it again")
    return last if resume else None


def _run(cfg, data, masks_path, run_dir, uss_spec, split, backbone_weights, resume, overwrite, quiet, max_steps,
         rank, world, device) -> TrainResult:
    distributed = world > 1
    dataset = open_dataset(data, split)
    ids = [i for i in dataset.ids if dataset.labels(i)]
    if len(ids) < len(dataset.ids):
        logger.info("%d images without foreground labels are left out of training", len(dataset.ids) - len(ids))
    if not ids:
        raise DatasetError(f"{data}: no training image has a foreground label")
    # headers only (missing, undecodable, above --max-pixels): fail before the run folder exists
    sizes = {item_id: dataset.image_size(item_id) for item_id in ids}
    if cfg.dhr and uss_spec is None:
        raise InputError("DHR training needs USS features: pass --uss USS.h5 (or --no-dhr to train on --masks only)")
    inputs = {"data": str(data), "split": split, "masks": str(masks_path), "uss": None if uss_spec is None else str(uss_spec),
              "backbone_weights": None if backbone_weights is None else str(backbone_weights)}
    mask_source = open_training_masks(masks_path, ids, dataset)
    uss_source = FeatureSource(uss_spec, ids, sizes=sizes) if cfg.dhr else None
    regen = OnlineRegenerator(cfg, dataset, cam_index(dataset)[1]) if cfg.dhr else None
    val_set = _validation_split(dataset, data, cfg)
    num_cams, cam_offset = cam_index(dataset)
    spec = NetworkSpec(cfg.backbone, len(dataset.classes), num_cams, cfg.output_stride, cfg.decoder_channels,
                       dropout=cfg.dropout)
    last = _prepare_run_dir(run_dir, resume, overwrite, rank)  # after every input check: no empty run folder left
    input_ids = _input_ids(inputs, dataset, ids)
    if resume:
        _check_resume_config(run_dir, cfg, inputs, input_ids)
    if distributed:
        dist.barrier()
    samples = TrainSamples(dataset, ids, mask_source, uss_source, cfg)
    sampler = GlobalBatchSampler(len(samples), cfg.batch_size, rank, world, cfg.seed)
    loader = error_carrying_loader(samples, batch_sampler=sampler, num_workers=cfg.num_workers,
                                   pin_memory=device.type == "cuda", persistent_workers=False)
    torch.manual_seed(cfg.seed)
    model = build_network(spec, backbone_weights if last is None else None).to(device)
    use_amp = cfg.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    total_steps = cfg.epochs * len(sampler)
    tr = Training.build(model, cfg, total_steps, use_amp and amp_dtype == torch.float16)
    ema, optimizer, scaler = tr.ema, tr.optimizer, tr.scaler

    start_epoch, step, history, partial = 0, 0, [], None
    if last is not None:
        start_epoch, step, history, partial = _load_last(last, tr)
        if rank == 0:
            _trim_logs(run_dir, step, history)
        logger.info("resuming %s at epoch %d, batch %d (step %d)", run_dir, start_epoch + 1,
                    partial["batches"] if partial else 0, step)
    elif rank == 0:
        write_text_atomic(run_dir / "config.json", json.dumps(_config_record(cfg, inputs, world, input_ids), indent=1, default=str))

    net: nn.Module = model
    if distributed:
        if device.type == "cuda" and cfg.sync_bn and not cfg.freeze_bn:
            net = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif not cfg.freeze_bn:
            logger.warning("BatchNorm statistics are per process on the CPU (SyncBatchNorm needs CUDA)")
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    log_path = run_dir / "log.jsonl"
    result = TrainResult(run_dir, start_epoch, step, history)

    def checkpoint(epochs_done: int, in_epoch: dict | None) -> None:
        """last.pt: after `epochs_done` whole epochs, plus `in_epoch` (batches, loss sums, RNG) mid-epoch."""
        save_atomic({**_model_record(spec, dataset, cfg, tr, epochs_done, step), **tr.state(),
                      "history": history, "in_epoch": in_epoch},
                     run_dir / "checkpoints" / "last.pt")
    with progress_bar(quiet) as bar:
        for epoch in range(start_epoch, cfg.epochs):
            samples.epoch = sampler.epoch = epoch
            torch.manual_seed(cfg.seed * 100003 + epoch)  # dropout of this epoch (same on every rank)
            net.train()
            if cfg.freeze_bn:
                _set_bn_eval(net)
            sums, n_steps, t_epoch = {"loss": 0.0, "loss_seg": 0.0, "loss_cls": 0.0}, 0, time.perf_counter()
            sampler.skip = 0
            if partial is not None:  # a mid-epoch resume: skip the batches trained, restore the RNG
                sampler.skip = n_steps = partial["batches"]
                sums = dict(partial["sums"])
                t_epoch -= partial["seconds"]
            batches = raise_carried(iter(loader))  # iter() draws the workers' base seed from this epoch's generator
            if partial is not None:
                torch.set_rng_state(partial["rng"])
                if device.type == "cuda" and partial.get("cuda_rng") is not None:
                    torch.cuda.set_rng_state(partial["cuda_rng"], device)
                partial = None
            task = bar.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=len(sampler), completed=n_steps, rate="")
            t_last = time.perf_counter()
            lr = tr.lr
            for batch in batches:
                lr = tr.lr  # this iteration's
                stats = _train_step(net, model, batch, regen, optimizer, scaler, cfg, device, use_amp, amp_dtype, world)
                tr.after_step()
                step += 1
                n_steps += 1
                for k in sums:
                    sums[k] += stats[k]
                now = time.perf_counter()  # throughput includes data loading and the online regeneration
                rate, t_last = cfg.batch_size / max(now - t_last, 1e-9), now
                bar.update(task, advance=1, rate=f"loss {stats['loss']:.4f}  {rate:.1f} img/s")
                if rank == 0 and (step % cfg.log_every == 0 or n_steps == len(sampler)):
                    _append_jsonl(log_path, {"kind": "step", "epoch": epoch + 1, "step": step, **stats,
                                             "lr": lr, "img_per_s": rate})
                stop = max_steps is not None and step >= max_steps
                if rank == 0 and n_steps < len(sampler) and (
                        stop or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
                    checkpoint(epoch, {"batches": n_steps, "sums": dict(sums), "seconds": time.perf_counter() - t_epoch,
                                       "rng": torch.get_rng_state(),
                                       "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None})
                if stop:
                    break
            record = {"kind": "epoch", "epoch": epoch + 1, "step": step,
                      **{k: v / max(n_steps, 1) for k, v in sums.items()},
                      "lr": lr, "seconds": time.perf_counter() - t_epoch}
            if val_set is not None and rank == 0:
                record["val_miou"] = validate(ema.module if ema is not None else model, val_set, cfg, device)
            history.append(record)
            if rank == 0:
                _append_jsonl(log_path, record)
                _append_csv(run_dir / "epochs.csv", record)
                if n_steps == len(sampler):  # a --max-steps stop mid-epoch keeps its mid-epoch checkpoint
                    checkpoint(epoch + 1, None)
            if distributed:
                dist.barrier()
            result.epochs, result.steps = epoch + 1, step
            if max_steps is not None and step >= max_steps:
                break
    if rank == 0:
        save_atomic(_model_record(spec, dataset, cfg, tr, result.epochs, step), run_dir / "model.pt")
    result.history = history
    result.val_miou = history[-1].get("val_miou") if history else None
    return result


def _model_record(spec, dataset, cfg, tr: Training, epochs: int, step: int) -> dict:
    """What model.pt holds (and last.pt, with the optimizer state on top)."""
    return {"spec": asdict(spec), "classes": dataset.classes, "config": asdict(cfg), "epoch": epochs, "step": step,
            **tr.weights(), "dhr_version": __version__}


def _load_last(last: Path, tr: Training) -> tuple[int, int, list, dict | None]:
    """Restore a run from last.pt -> (whole epochs done, step, history, mid-epoch state or None)."""
    from dhr_cli.models.checkpoints import read_checkpoint

    ckpt = read_checkpoint(last, inert=False)  # CheckpointError when missing, corrupt or truncated
    try:
        tr.load(ckpt, ckpt["step"])
        return ckpt["epoch"], ckpt["step"], list(ckpt.get("history", [])), ckpt.get("in_epoch")
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"{last}: not a checkpoint of this run ({e.__class__.__name__}); "
                              "pass --overwrite to start again") from None


def _trim_logs(run_dir: Path, step: int, history: list[dict]) -> None:
    """Drop log records written after the checkpoint being resumed, so the resumed run does not repeat them."""
    log_path = run_dir / "log.jsonl"
    if log_path.is_file():
        keep = []
        for line in log_path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if r.get("step", 0) <= step and (r.get("kind") != "epoch" or r.get("epoch", 0) <= len(history)):
                keep.append(line)
        write_text_atomic(log_path, "".join(line + "\n" for line in keep))  # a failed write keeps the old log
    write_text_atomic(run_dir / "epochs.csv", _csv_text(history, header=True))


def _train_step(net, model, batch, regen, optimizer, scaler, cfg, device, use_amp, amp_dtype, world) -> dict:
    images = batch["image"].to(device, non_blocking=True)
    masks = batch["mask"].to(device, non_blocking=True)
    valid = batch["valid"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
        out = net(images, with_features=regen is not None)
    if regen is not None:
        with torch.no_grad():
            masks = regen(images, out["cams"].detach().float(), labels, masks, valid,
                          batch["uss"].to(device, non_blocking=True), [out["C4"].detach().float(), out["C5"].detach().float()])
    seg_sum, count = seg_loss_sum(out["logits"], masks)
    if world > 1:  # normalise by the global count so DDP's gradient average is the global mean
        count = count.clone().float()
        dist.all_reduce(count)
        count = count / world
    loss_seg = seg_sum / count.float().clamp_min(1)
    loss_cls = F.multilabel_soft_margin_loss(pooled_cam_logits(out["cams"].float(), valid), labels)
    loss = cfg.seg_weight * loss_seg + cfg.cls_weight * loss_cls
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    stats = torch.stack([loss.detach(), loss_seg.detach(), loss_cls.detach()]).float()
    if world > 1:
        dist.all_reduce(stats)
        stats /= world
    if not torch.isfinite(stats).all():
        raise InputError("the loss became NaN or infinite; lower --lr or turn off AMP")
    return dict(zip(("loss", "loss_seg", "loss_cls"), stats.tolist()))


def _append_jsonl(path: Path, record: dict) -> None:
    _append(path, json.dumps(record) + "\n")


_CSV_FIELDS = ["epoch", "step", "loss", "loss_seg", "loss_cls", "lr", "val_miou", "seconds"]


def _append_csv(path: Path, record: dict) -> None:
    _append(path, _csv_text([record], header=not path.exists()))


def _csv_text(records: list[dict], header: bool) -> str:
    rows = io.StringIO(newline="")
    w = csv.DictWriter(rows, fieldnames=_CSV_FIELDS, extrasaction="ignore")
    if header:
        w.writeheader()
    w.writerows(records)
    return rows.getvalue()


def _append(path: Path, text: str) -> None:
    """One record onto a log; a full disk or `ulimit -f` names the file (a cut last line is dropped and
    epochs.csv rebuilt from the checkpoint on --resume)."""
    try:
        with path.open("a", newline="") as f:
            f.write(text)
    except OSError as e:
        raise CheckpointError(f"{path}: could not be written ({e.strerror or e}); free space and rerun with --resume") from None


# ---- validation ---------------------------------------------------------------------------------
def _validation_split(dataset: Dataset, data: Path, cfg: TrainConfig) -> Dataset | None:
    if cfg.val_split is None or cfg.val_split == "none":
        return None
    if cfg.val_split == "auto":
        try:
            val = open_dataset(data, "val")
        except DatasetError:
            return None
        return val if val.has_gt else None
    val = open_dataset(data, cfg.val_split)
    if not val.has_gt:
        raise DatasetError(f"{data}: split {cfg.val_split!r} has no ground truth to validate on")
    return val


@torch.no_grad()
def validate(model: DHRNet, val: Dataset, cfg: TrainConfig, device: torch.device) -> float:
    """Single-scale mIoU of the segmentation head on the validation split (longer side = val_size)."""
    from dhr_cli.kernels.metrics import ConfusionMatrix

    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(len(val.classes))
    for item_id in val.ids:
        gt = val.gt(item_id)
        if gt is None:
            continue
        image = val.image(item_id)
        h, w = image.shape[:2]
        s = cfg.val_size / max(h, w)
        x = normalize(image)[None].to(device)
        x = F.interpolate(x, size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear", align_corners=False)
        logits = model(x)["logits"].float()
        pred = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False).argmax(1)[0]
        cm.update(torch.from_numpy(np.array(gt)).to(device), pred)
    model.train(was_training)
    return float(cm.miou)


# ---- online regeneration (Steps 1-3 on the live network) ----------------------------------------
class OnlineRegenerator:
    """Regenerates the pseudo-masks of a batch of crops from the live CAMs, USS and C4/C5 features.

    The same batched kernels as `dhr seed` and `dhr propagate` (dhr_cli.kernels.seed.seed_batch and
    dhr_cli.kernels.propagate.propagate_batch), run on the crops: pixels outside the valid crop are 255.
    """

    def __init__(self, cfg: TrainConfig, dataset: Dataset, cam_offset: int):
        self.cfg, self.cam_offset = cfg, cam_offset
        self.num_classes = len(dataset.classes)
        self.has_background = dataset.has_background
        from dhr_cli.kernels.propagate import propagate_batch
        from dhr_cli.kernels.seed import seed_batch

        self._seed, self._propagate = seed_batch, propagate_batch

    def label_values(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """labels (B, K) multi-hot -> (channel index (B, L) of the labelled CAMs, label values (B, L), -1 = padding)."""
        present = labels > 0.5
        n = int(present.sum(1).max().item()) if present.numel() else 0
        order = torch.argsort((~present).to(torch.int8), dim=1, stable=True)[:, :max(n, 1)]
        ok = torch.gather(present, 1, order)
        values = torch.where(ok, order + self.cam_offset, torch.full_like(order, -1))
        return order, values

    @torch.no_grad()
    def __call__(self, images, cams, labels, base_masks, valid, uss, wss):
        """Regenerated pseudo-masks (B, S, S) int64, 255 outside the valid crop.

        Args:
            images: (B, 3, S, S) normalised crops.
            cams: (B, K, h, w) raw output of the CAM head (all foreground classes).
            labels: (B, K) multi-hot image labels.
            base_masks: (B, S, S) int64 fixed input masks M0 (255 ignore), or None for seeds alone
                (what `dhr seed` does without M0).
            valid: (B, S, S) bool, crop pixels showing the image.
            uss: (B, D, gh, gw) USS features warped onto the crop.
            wss: list of (B, D_l, h_l, w_l) WSS features (C4, C5).
        """
        rgb = denormalize(images.float())
        order, values = self.label_values(labels)
        sel = torch.gather(cams.float().relu(), 1, order[:, :, None, None].expand(-1, -1, *cams.shape[2:]))
        cell_valid = F.adaptive_max_pool2d(valid[:, None].float(), cams.shape[2:])  # cells touching the crop
        sel = sel * cell_valid * (values >= 0)[:, :, None, None]
        seeds = self._seed(sel, values, rgb, self.cfg.seed_cfg, base=base_masks, pixel_valid=valid)
        seeds = seeds.masked_fill(~valid, IGNORE_INDEX)
        masks = self._propagate(seeds, uss.float(), [w.float() for w in wss], values, rgb, self.cfg.propagate,
                                cams=sel, pixel_valid=valid)
        return masks.long().masked_fill(~valid, IGNORE_INDEX)
