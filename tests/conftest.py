"""Shared test fixtures: the devices every op test runs on; one intra-op thread."""

from __future__ import annotations

import pytest
import torch

# "cpu" always; "cuda" too on a machine with a GPU, so the same tests cover the CUDA kernels.
devices: list[str] = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=devices)
def device(request: pytest.FixtureRequest) -> str:
    """Each test taking ``device`` runs once per entry of :data:`devices`."""
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (``pytestmark = pytest.mark.usefixtures(
    "one_thread")``): tiny models run fastest so, and fairly on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
