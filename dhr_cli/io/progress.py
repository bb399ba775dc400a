"""Progress bars on stderr (stdout is kept for results)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")
_stderr = Console(stderr=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is so that the writers close as for Ctrl-C."""


# Set by the CLI's SIGTERM handler. The handler also raises Terminated at once, but Python swallows an
# exception raised inside a finaliser or weakref callback ("Exception ignored in ..."), and the run went
# on to its end: every long loop (track) raises it again at its next item.
# "resumable": False once a command with --resume said this run's output is written whole (`import
# labels`), so a stop does not advise that --resume.
_termination = {"requested": False, "resumable": True}


def request_termination() -> None:
    _termination["requested"] = True


def termination_requested() -> bool:
    return _termination["requested"]


def clear_termination() -> None:
    _termination.update(requested=False, resumable=True)


def output_written_whole() -> None:
    _termination["resumable"] = False


def output_resumable() -> bool:
    return _termination["resumable"]


def _stop_if_terminated() -> None:
    if _termination["requested"]:
        raise Terminated()


class _Progress(Progress):
    """A Progress whose bar is erased when the block ends in an error: the error's one line stands alone."""

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            return super().__exit__(exc_type, exc, tb)
        # a terminal erases the live bar (transient); a pipe or log file would get its last frame
        # printed at stop, so nothing is printed there
        self.live.transient = True
        muted, self.console.quiet = self.console.quiet, self.console.quiet or not self.console.is_terminal
        try:
            super().__exit__(exc_type, exc, tb)
        finally:
            self.console.quiet = muted


def progress_bar(quiet: bool = False) -> Progress:
    """A rich Progress on stderr; use as a context manager and add tasks to it."""
    return _Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=_stderr,
        disable=quiet,
        transient=False,
    )


def track(items: Iterable[T], description: str, total: int | None = None, quiet: bool = False,
          count: Callable[[T], int] | None = None) -> Iterator[T]:
    """Iterate with a progress bar (items/s shown) unless quiet. `count(item)` is how many units
    (images) an item holds, e.g. `len` for batches, so the bar counts images, not batches."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if quiet:  # no bar: no per-item bookkeeping either (it cost ~1 ms an item at COCO scale)
        for item in items:
            _stop_if_terminated()
            yield item
        return
    with progress_bar(quiet) as bar:
        task = bar.add_task(description, total=total, rate="")
        for n, item in enumerate(items, 1):
            _stop_if_terminated()
            yield item
            bar.advance(task, 1 if count is None else count(item))
            if n % 16 == 0:  # rich's speed walks its sample window: not on every item
                t = bar.tasks[0]
                if t.speed:
                    bar.update(task, rate=f"{t.speed:.1f}/s")
