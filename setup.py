"""Build script for the lsa_ext C++/CUDA extension (torch.utils.cpp_extension).

Environment variables:
    LSA_BUILD_CUDA=0|1   force the CUDA kernels off or on. Unset: built when torch is a CUDA
                         build *and* a CUDA toolkit (nvcc, CUDA_HOME) is found.
    LSA_DEBUG=1          build with -O0 -g (default: -O3).
"""

from __future__ import annotations

import glob
import os

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


def _extension():
    debug = os.environ.get("LSA_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    extra = {"cxx": opt + ["-std=c++17"]}
    define_macros = []
    if _want_cuda():
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        extra["nvcc"] = opt + ["-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
        define_macros.append(("WITH_CUDA", None))
        return CUDAExtension(
            "lsa_ext._C",
            sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args=extra,
            define_macros=define_macros,
        )
    return CppExtension(
        "lsa_ext._C",
        sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args=extra,
        define_macros=define_macros,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
