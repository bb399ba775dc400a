"""`dhr cams` (placeholder until its capability is built)."""

from __future__ import annotations

from dhr_cli.cli.options import app, user_errors
from dhr_cli.errors import NotBuiltError


@app.command("cams", help="Not built yet in this version.")
@user_errors
def cams_cmd() -> None:
    raise NotBuiltError("'dhr cams' is not built yet in this version")
