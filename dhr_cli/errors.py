"""Errors a user can act on. The CLI turns every DhrError into one line on stderr and exit 1."""

from __future__ import annotations


class DhrError(Exception):
    """Base class: the message is a sentence that names the object and what is wrong."""


class InputError(DhrError, ValueError):
    """A file, folder or option given by the user is unusable."""


class StoreError(InputError):
    """An HDF5 store is missing, of the wrong kind or version, or holds bad data."""


class DatasetError(InputError):
    """A dataset folder matches no layout, or one of its files is bad."""


class ShapeError(DhrError, ValueError):
    """A tensor has the wrong shape: 'expected (B, K, H, W), got (2, 21, 64)'."""


class CheckpointError(InputError):
    """A checkpoint is missing, unreadable, or its keys do not match the model."""


class WorkerDiedError(DhrError):
    """A loader worker process died under the command (killed by a signal: the out-of-memory killer, a kill)."""


class NotBuiltError(DhrError):
    """A capability that this version does not provide yet."""


class MissingExtraError(DhrError):
    """A capability needs an optional extra that is not installed (`pip install 'dhr[NAME]'`)."""
