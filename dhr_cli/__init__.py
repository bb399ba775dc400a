"""dhr: dense pseudo segmentation masks from image-level labels with DHR (ECCV 2024).

The public library API, importable from here without Typer (loaded on first use, so
`import dhr_cli` and `dhr --help` stay fast):

    run_cams, run_seed, run_propagate, run_eval      one function per command (dhr_cli.pipeline)
    open_store, create_store, open_dataset           stores and datasets (dhr_cli.io)
    SeedConfig, PropagateConfig, SinkhornConfig, ... every default (dhr_cli.config)
    f_ot, sinkhorn, seed_masks, propagate_items, PropagateItem, ...   kernels (dhr_cli.kernels)

The command line in `dhr_cli.cli` is a thin layer over it.
"""

from __future__ import annotations

import importlib
import os

__version__ = "0.1.0"
# This process's parent when it started (torchrun's agent for a rank): io/distributed follows it.
_PARENT_AT_START = os.getppid()

_API = {
    "run_cams": "dhr_cli.pipeline.cams", "features_store_for": "dhr_cli.pipeline.cams",
    "run_seed": "dhr_cli.pipeline.seed", "run_propagate": "dhr_cli.pipeline.propagate",
    "run_eval": "dhr_cli.pipeline.evaluate",
    "open_store": "dhr_cli.io.store", "create_store": "dhr_cli.io.store", "open_dataset": "dhr_cli.io.datasets",
    "SinkhornConfig": "dhr_cli.config", "CRFConfig": "dhr_cli.config", "SeedConfig": "dhr_cli.config",
    "PropagateConfig": "dhr_cli.config", "EvalConfig": "dhr_cli.config", "CamsConfig": "dhr_cli.config",
    "TrainConfig": "dhr_cli.config", "IGNORE_INDEX": "dhr_cli.config",
    "f_ot": "dhr_cli.kernels", "sinkhorn": "dhr_cli.kernels", "normalize_cams": "dhr_cli.kernels",
    "seed_masks": "dhr_cli.kernels", "propagate_items": "dhr_cli.kernels", "PropagateItem": "dhr_cli.kernels",
    "majority_pool": "dhr_cli.kernels", "resize": "dhr_cli.kernels",
}  # fmt: skip

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dhr_cli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
