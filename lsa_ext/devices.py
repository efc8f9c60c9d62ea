"""Device names given by users (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"auto"``) → ``torch.device``.

One place checks them, so a typo or a CUDA device on a machine without CUDA is one clear
:class:`~lsa_ext.errors.LsaUserError` wherever a device is accepted (analysis, training,
evaluation, the CLI), not a RuntimeError/AssertionError from deep inside torch.
"""

from __future__ import annotations

import torch

from lsa_ext.errors import LsaUserError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The ``torch.device`` for ``device``.

    Args:
        device: a ``torch.device`` or a name torch accepts (``"cpu"``, ``"cuda"``, ``"cuda:N"``,
            ...); ``"auto"`` or ``None`` pick ``cuda`` when available, else ``cpu``.

    Raises:
        LsaUserError: an unknown device name, CUDA requested where it is not available, or a
            CUDA index beyond the visible devices.
    """
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise LsaUserError(f"device must be a string, index or torch.device, got {device!r}")
    try:
        dev = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, ValueError):
        raise LsaUserError(f"unknown device {str(device)!r}; use cpu, cuda, cuda:N or auto") \
            from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LsaUserError(f"device {str(device)!r} requested but CUDA is not available "
                               "(a CPU-only torch, or no visible GPU); use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise LsaUserError(f"device {str(device)!r} requested but only {count} CUDA "
                               f"device(s) are visible")
    return dev
