"""Shared fixtures: device selection (CPU always, CUDA when asked and present), fixed rich width."""

from __future__ import annotations

import os

import pytest

# OpenMP threads spin while waiting by default; on 2 cores that starves the other test workers
# and torch ops slow down several-fold.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("COLUMNS", "120")  # stable rich tables in CLI output
os.environ.setdefault("NO_COLOR", "1")


def pytest_addoption(parser):
    parser.addoption("--device", default=os.environ.get("DHR_TEST_DEVICE", "cpu"), help="cpu or cuda")


@pytest.fixture
def device(request):
    import torch

    name = request.config.getoption("--device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip(f"Device {name!r} is not available on this system")
    return torch.device(name)
