"""The package version: the one place it is written (pyproject.toml reads it from here)."""

__version__ = "0.1.0"


def versions() -> dict[str, str]:
    """Versions of lsa_ext, torch (without the local ``+cu…`` tag), numpy and Python, as
    recorded in every report, evaluation and reproduction file."""
    import platform

    import numpy as np
    import torch

    return {
        "lsa_ext": __version__,
        "torch": torch.__version__.split("+")[0],
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
