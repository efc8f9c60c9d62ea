"""Build script for the lsa_ext C++/CUDA extension (torch.utils.cpp_extension).

Environment variables:
    LSA_BUILD_CUDA=0|1   force the CUDA kernels off or on. Unset: built when torch is a CUDA
                         build *and* a CUDA toolkit (nvcc, CUDA_HOME) is found.
    LSA_DEBUG=1          build with -O0 -g (default: -O3).
    TORCH_CUDA_ARCH_LIST GPU architectures of the CUDA kernels (e.g. "9.0" or "8.0;9.0+PTX").
                         Unset: the architectures of the visible GPUs (torch's default); with no
                         GPU visible, the architectures the installed torch was built for that
                         the local nvcc supports, the newest also as PTX (see _default_arch_list).
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("LSA_BUILD_CUDA")
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if flag is None:
        return available
    if flag not in ("0", "1"):
        raise SystemExit(f"LSA_BUILD_CUDA must be 0 or 1, got {flag!r}")
    if flag == "1" and not available:
        raise SystemExit(
            "LSA_BUILD_CUDA=1 but no CUDA build of torch or no CUDA toolkit was found "
            f"(torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r})"
        )
    return flag == "1"


# Used when torch was built without reporting its architectures (or the query fails).
_FALLBACK_ARCHS = ("7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0")


def _nvcc_archs() -> set[str] | None:
    """Architectures ("9.0", ...) the CUDA toolkit's nvcc can compile for; None if unknown."""
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else "nvcc"
    try:
        out = subprocess.run(
            [nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = {f"{int(m) // 10}.{int(m) % 10}" for m in re.findall(r"compute_(\d+)", out)}
    return found or None


def _default_arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST for a build machine without a visible GPU.

    The architectures of the installed torch wheel (e.g. sm_75 ... sm_120 for torch+cu130),
    restricted to what the local nvcc supports; the newest is also embedded as PTX so newer GPUs
    can JIT-compile it.
    """
    try:
        flags = torch._C._cuda_getArchFlags() or ""
    except (AttributeError, RuntimeError):
        flags = ""
    archs = {f"{int(m) // 10}.{int(m) % 10}" for m in re.findall(r"sm_(\d+)", flags)}
    if not archs:
        archs = set(_FALLBACK_ARCHS)
    supported = _nvcc_archs()
    if supported is not None:
        archs &= supported
    if not archs:
        raise SystemExit(
            "no CUDA architecture both torch and nvcc support; set TORCH_CUDA_ARCH_LIST"
        )
    ordered = sorted(archs, key=lambda a: tuple(int(x) for x in a.split(".")))
    ordered[-1] += "+PTX"
    return ";".join(ordered)


def _arch_env() -> str:
    return os.environ.get("TORCH_CUDA_ARCH_LIST", "")


def _openmp_flags() -> list[str]:
    """Compiler/linker flags enabling OpenMP when this torch's ATen parallel backend is OpenMP
    (ATen/Config.h AT_PARALLEL_OPENMP); none otherwise, and none on macOS, whose Apple clang has
    no -fopenmp (the kernels then run on the calling thread)."""
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return []
    if sys.platform == "darwin":
        return []
    return ["/openmp"] if os.name == "nt" else ["-fopenmp"]


def _extension():
    debug = os.environ.get("LSA_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # No -std flag: torch.utils.cpp_extension adds the standard its headers need (C++20 for
    # torch >= 2.13; C++17 would fail with torch 2.14's headers).
    # OpenMP: the kernels' at::parallel_for is inlined from ATen's headers as an OpenMP parallel
    # region, so without the compiler's OpenMP flag it silently runs on one thread. PyTorch's CPU
    # wheels ship their libgomp.so.1; linking -fopenmp records that same soname, so the loaded
    # extension shares PyTorch's OpenMP runtime (and its torch.set_num_threads setting).
    openmp = _openmp_flags()
    extra = {"cxx": list(opt) + openmp}
    define_macros = []
    if _want_cuda():
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
            os.environ["TORCH_CUDA_ARCH_LIST"] = _default_arch_list()
            print(f"lsa_ext: no GPU visible, TORCH_CUDA_ARCH_LIST={_arch_env()!r}")
        extra["nvcc"] = opt + [
            "--expt-relaxed-constexpr",
            "-lineinfo",
            "-Xptxas=-warn-spills,-warn-lmem-usage",
        ]
        define_macros.append(("WITH_CUDA", None))
        return CUDAExtension(
            "lsa_ext._C",
            sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args=extra,
            extra_link_args=openmp,
            define_macros=define_macros,
        )
    return CppExtension(
        "lsa_ext._C",
        sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args=extra,
        extra_link_args=openmp,
        define_macros=define_macros,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
