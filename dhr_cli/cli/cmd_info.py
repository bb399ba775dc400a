"""`dhr info` (placeholder until its capability is built)."""

from __future__ import annotations

from dhr_cli.cli.options import app, user_errors
from dhr_cli.errors import NotBuiltError


@app.command("info", help="Not built yet in this version.")
@user_errors
def info_cmd() -> None:
    raise NotBuiltError("'dhr info' is not built yet in this version")
