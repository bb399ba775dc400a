"""Input guards for the kernels: shapes written down at the door, errors that say expected vs got."""

from __future__ import annotations

import torch

from dhr_cli.errors import ShapeError


def check_shape(x: torch.Tensor, layout: str, name: str = "input") -> None:
    """Raise ShapeError unless `x` has one dimension per name of `layout` ("B K H W").

    >>> check_shape(torch.zeros(2, 3), "M N")
    >>> check_shape(torch.zeros(2, 3), "B M N")
    Traceback (most recent call last):
    dhr_cli.errors.ShapeError: input: expected (B, M, N), got (2, 3)
    """
    dims = layout.split()
    if not isinstance(x, torch.Tensor) or x.dim() != len(dims):
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ShapeError(f"{name}: expected ({', '.join(dims)}), got {got}")
