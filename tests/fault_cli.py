"""`python -m tests.fault_cli ARGS`: the real `dhr` command line for the kill-and-resume tests, with the
test-only vit_tiny SAM registered and, when DHR_TEST_ITEM_DELAY is set, a pause of that many seconds before
each item is written, so tiny runs last long enough to be killed between items (and the kill is a real
SIGKILL of this process, which may land anywhere). DHR_TEST_FAIL_AT=N: the N-th dataset written fails
inside HDF5 with ENOSPC, as a disk that fills between the free-space check and the write.
DHR_TEST_KILL_AT_EXPORT=N: `dhr export` SIGKILLs itself at its N-th step (a PNG written into the staging
folder, or a rename out of it), so a kill lands inside a chosen window rather than by chance;
DHR_TEST_EXPORT_SIGNAL=TERM sends SIGTERM there instead (the CLI's handler stops the export)."""

import os
import time

from dhr_cli.io import store
from dhr_cli.models import sam
from dhr_cli.testing.sam import tiny_sam_type

sam.SAM_TYPES.setdefault("vit_tiny", tiny_sam_type())
_delay = float(os.environ.get("DHR_TEST_ITEM_DELAY", "0"))
if _delay:
    _write = store.StoreWriter.write

    def _slow_write(self, *args, **kwargs):
        time.sleep(_delay)
        return _write(self, *args, **kwargs)

    store.StoreWriter.write = _slow_write

_fail_at = int(os.environ.get("DHR_TEST_FAIL_AT", "0"))
if _fail_at:
    import errno

    _kwargs, _calls = store.dataset_kwargs, [0]

    def _failing_kwargs(array, name=None):
        _calls[0] += 1
        if _calls[0] == _fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return _kwargs(array, name)

    store.dataset_kwargs = _failing_kwargs

_kill_at = int(os.environ.get("DHR_TEST_KILL_AT_EXPORT", "0"))
if _kill_at:
    import signal

    from dhr_cli.io import palette
    from dhr_cli.pipeline import export

    _steps = [0]

    def _step():
        _steps[0] += 1
        if _steps[0] == _kill_at:
            os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("DHR_TEST_EXPORT_SIGNAL", "KILL")))

    _save, _replace, _rename = palette.save_palette_png, os.replace, os.rename

    def _killing_save(*args, **kwargs):
        _step()
        return _save(*args, **kwargs)

    def _killing(real):
        def move(src, dst, *args, **kwargs):
            if ".dhr-export-" in str(src):
                _step()
            return real(src, dst, *args, **kwargs)
        return move

    palette.save_palette_png = _killing_save
    class _OsWithKillingMoves:  # export.py's `os`: the real one, but its renames out of a stage count as steps
        replace, rename = staticmethod(_killing(_replace)), staticmethod(_killing(_rename))

        def __getattr__(self, name):
            return getattr(os, name)

    export.os = _OsWithKillingMoves()

if __name__ == "__main__":
    from dhr_cli.cli import main

    main()
