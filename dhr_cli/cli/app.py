"""The Typer app: its root callback (--version, --verbose), the consoles, and the mapping of
DhrError / OSError to a one-line `Error: ...` with exit status 1 (`user_errors`)."""

from __future__ import annotations

import functools
import inspect
import logging
import os
import shutil
import sys
import warnings
from typing import Annotated, Optional

import typer
from rich.console import Console

from dhr_cli import __version__
from dhr_cli.errors import DhrError

# Rich's option table cuts long option names ("--backbone-wei…") below about 120 columns, where
# click's plain layout wraps them instead: narrower terminals get the plain help.
RICH_HELP_MIN_COLUMNS = 120
HELP_MARKUP = "rich" if shutil.get_terminal_size((80, 24)).columns >= RICH_HELP_MIN_COLUMNS else None


def extra(name: str) -> str:
    """`dhr[name]` as help text shows it (rich markup reads an unescaped [name] as a style)."""
    return f"dhr\\[{name}]" if HELP_MARKUP else f"dhr[{name}]"

app = typer.Typer(
    name="dhr",
    help="Dense pseudo segmentation masks from image-level labels (DHR, ECCV 2024).\n\n"
    "Typical run: dhr cams -> dhr seed -> dhr propagate -> dhr eval / dhr export.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode=HELP_MARKUP,
)

# Results go to stdout; messages, progress and errors to stderr.
out = Console()
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dhr {__version__}")
        raise typer.Exit()


class _LogLine(logging.Formatter):
    """A warning is `Warning: ...`, like Python's warnings (the user reads it, not a module name);
    --verbose steps keep the module that logs them."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.capitalize()}: {msg}"
        return f"{record.name}: {msg}" if self.verbose else msg


@app.callback()
def _root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens, step by step.")] = False,
) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(_LogLine(verbose))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])
    datasets = sys.modules.get("dhr_cli.io.datasets")  # not imported yet: nothing to reset (--help stays fast)
    if datasets is not None:
        datasets.DATASET_OPTIONS.set({})  # the reader options of this command only (its option callbacks run next)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Python warnings as one `Warning: ...` line (no source line, no file name): they are for users."""
    return f"Warning: {' '.join(str(message).split())}\n"


def user_errors(fn):
    """Turn DhrError (and OS errors on the user's files) into `Error: ...` and exit status 1."""

    from dhr_cli.io.progress import Terminated, clear_termination, output_resumable

    has_resume = "resume" in inspect.signature(fn).parameters

    def then() -> str:
        """What a stop advises: the commands with --resume keep their items for it; the others (export,
        eval, merge, ...) and outputs written whole (`import labels`) are run again."""
        if not has_resume:
            return "it has no --resume: rerun it"
        if not output_resumable():
            return "nothing was written: rerun it"
        return "what was written is kept, rerun with --resume to continue"

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _terminate_like_interrupt()
        try:
            return fn(*args, **kwargs)
        except DhrError as e:
            if getattr(e, "hdf5_unsound", False):  # a write failed inside HDF5: leave before it frees handles
                print(f"Error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
                os._exit(1)
            _fail(str(e))
        except OSError as e:  # permission denied, disk full, ...: the user's to fix
            _fail(f"{e.filename or ''}: {e.strerror or e}".lstrip(": "))
        except Terminated:
            _fail(f"terminated (SIGTERM); {then()}", code=143)
        except KeyboardInterrupt:
            _fail(f"interrupted; {then()}", code=130)
        finally:
            clear_termination()
            _sigterm_default()  # a SIGTERM while the interpreter exits (torchrun stopping the other ranks) ends it
            # quietly, not as an "Exception ignored in atexit callback" traceback

    return wrapper


def _on_sigterm(signum, frame) -> None:
    from dhr_cli.io.progress import Terminated, request_termination

    request_termination()  # in case this raise lands in a finaliser, which swallows it
    raise Terminated()


def _terminate_like_interrupt() -> None:
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def _sigterm_default() -> None:
    import signal
    import threading

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is _on_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _fail(message: str, code: int = 1) -> None:
    # One line, no markup interpretation (paths may contain brackets).
    print(f"Error: {' '.join(message.split())}", file=sys.stderr)
    raise typer.Exit(code)


def main() -> None:
    """The `dhr` entry point: every command registered, then the app. A usage error (a bad option
    value, a missing option) is one `Error: ...` line and exit 2, like every other user mistake."""
    try:
        from typer._click import exceptions as cx  # recent Typer vendors its own Click
    except ImportError:
        from click import exceptions as cx

    import dhr_cli.cli  # noqa: F401  (importing the package registers the commands)

    warnings.formatwarning = _one_line_warning  # the process is the CLI's: warnings are for its user
    try:
        code = app(standalone_mode=False)
    except cx.NoArgsIsHelpError as e:  # `dhr` or `dhr uss` alone: the help it asks for
        print(e.ctx.get_help() if e.ctx else str(e), file=sys.stderr, flush=True)
        sys.exit(2)
    except cx.UsageError as e:
        where = e.ctx.command_path if e.ctx else "dhr"
        print(f"Error: {' '.join(e.format_message().split())} (see {where} --help)", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except cx.ClickException as e:
        print(f"Error: {' '.join(e.format_message().split())}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except typer.Abort:
        print("Error: aborted", file=sys.stderr, flush=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
