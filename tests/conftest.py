"""Shared test fixtures: the devices every op test runs on."""

from __future__ import annotations

import pytest
import torch

# "cpu" always; "cuda" too on a machine with a GPU, so the same tests cover the CUDA kernels.
devices: list[str] = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=devices)
def device(request: pytest.FixtureRequest) -> str:
    """Each test taking ``device`` runs once per entry of :data:`devices`."""
    return request.param
