"""Builds the CPU kernels of another revision as a separate op namespace, for before/after runs.

Usage:
    .venv/bin/python benchmarks/build_baseline.py [--rev main] [--ns lsa_ext_base] \
        [--out /tmp/lsa_ext_base]

Extracts ``csrc/`` and ``setup.py`` of ``--rev`` with ``git archive``, renames the operator
namespace (``TORCH_LIBRARY(lsa_ext, ...)`` → ``TORCH_LIBRARY(<ns>, ...)``) and builds that
revision's extension in place with that revision's own ``setup.py`` (its compiler flags, CPU
kernels only). Prints the path of the built library; load it beside the current build with
``benchmarks/baseline.py`` (``torch.ops.<ns>.sq_sums`` etc.), so before and after run in one
process, on the same data, interleaved.
"""

from __future__ import annotations

import argparse
import glob
import io
import os
import re
import subprocess
import sys
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def build(rev: str, ns: str, out: str) -> str:
    """Builds ``rev``'s CPU extension with op namespace ``ns`` under ``out``; returns the .so."""
    os.makedirs(out, exist_ok=True)
    archive = subprocess.run(["git", "-C", REPO, "archive", rev, "csrc", "setup.py"],
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(out, filter="data")
    pattern = re.compile(r"\b(TORCH_LIBRARY(?:_IMPL)?)\(\s*lsa_ext\s*,")
    for path in glob.glob(os.path.join(out, "csrc", "**", "*.*"), recursive=True):
        with open(path) as f:
            text = f.read()
        renamed = pattern.sub(rf"\1({ns},", text)
        if renamed != text:
            with open(path, "w") as f:
                f.write(renamed)
    os.makedirs(os.path.join(out, "lsa_ext"), exist_ok=True)
    env = dict(os.environ, LSA_BUILD_CUDA="0")
    done = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=out,
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"building {rev} failed:\n{done.stdout}\n{done.stderr}")
    (lib,) = glob.glob(os.path.join(out, "lsa_ext", "_C*.so"))
    return lib


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rev", default="main", help="git revision to build (default: main)")
    p.add_argument("--ns", default="lsa_ext_base", help="op namespace of the build")
    p.add_argument("--out", default="/tmp/lsa_ext_base", help="build folder")
    args = p.parse_args()
    print(build(args.rev, args.ns, os.path.abspath(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
