"""`dhr seed` (placeholder until its capability is built)."""

from __future__ import annotations

from dhr_cli.cli.options import app, user_errors
from dhr_cli.errors import NotBuiltError


@app.command("seed", help="Not built yet in this version.")
@user_errors
def seed_cmd() -> None:
    raise NotBuiltError("'dhr seed' is not built yet in this version")
