"""The `dhr` command line: a thin Typer layer over the library.

Each command lives in its own module of this package (parse options, build a config, call the
library, map DhrError to a one-line error). Heavy imports (torch, h5py) happen inside the
command functions so that `dhr --help` stays fast.
"""

from __future__ import annotations

# Importing a command module registers its command on `app`; the order is the help order.
from dhr_cli.cli import (  # noqa: E402,F401
    cmd_cams,
    cmd_demo,
    cmd_eval,
    cmd_export,
    cmd_import,
    cmd_info,
    cmd_merge,
    cmd_predict,
    cmd_propagate,
    cmd_refine,
    cmd_seed,
    cmd_train,
    cmd_uss,
)
from dhr_cli.cli.app import app, main


__all__ = ["app", "main"]
