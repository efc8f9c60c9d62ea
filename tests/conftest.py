"""Shared test fixtures: the devices every op test runs on; one intra-op thread."""

from __future__ import annotations

import os

import pytest
import torch


def _devices() -> list[str]:
    """``cpu``, plus ``cuda`` on a machine with a GPU; or exactly ``LSA_TEST_DEVICE``.

    ``LSA_TEST_DEVICE=cuda`` (comma-separated list) runs the device-parametrised tests on those
    devices only and requires the compiled kernels there: a missing GPU or a CUDA device served by
    the pure-PyTorch fallback stops the run instead of skipping or silently testing the fallback.
    """
    want = os.environ.get("LSA_TEST_DEVICE", "").strip()
    if not want:
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    names = [d.strip() for d in want.split(",") if d.strip()]
    import lsa_ext

    served = lsa_ext.backend()
    for name in names:
        if name not in ("cpu", "cuda"):
            raise pytest.UsageError(f"LSA_TEST_DEVICE: unknown device {name!r} (cpu, cuda)")
        if name == "cuda" and not torch.cuda.is_available():
            raise pytest.UsageError("LSA_TEST_DEVICE=cuda but no CUDA device is visible")
        if served[name] != f"compiled-{name}":
            raise pytest.UsageError(
                f"LSA_TEST_DEVICE={want}: {name} is served by {served[name]!r}, not the compiled "
                f"kernel ({served.get('load_error', 'build with LSA_BUILD_CUDA=1')})"
            )
    return names


devices: list[str] = _devices()


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
