"""`dhr demo` (placeholder until its capability is built)."""

from __future__ import annotations

from dhr_cli.cli.options import app, user_errors
from dhr_cli.errors import NotBuiltError


@app.command("demo", help="Not built yet in this version.")
@user_errors
def demo_cmd() -> None:
    raise NotBuiltError("'dhr demo' is not built yet in this version")
