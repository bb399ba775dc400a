"""`dhr train` (placeholder until its capability is built)."""

from __future__ import annotations

from dhr_cli.cli.options import app, user_errors
from dhr_cli.errors import NotBuiltError


@app.command("train", help="Not built yet in this version.")
@user_errors
def train_cmd() -> None:
    raise NotBuiltError("'dhr train' is not built yet in this version")
