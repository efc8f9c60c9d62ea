"""pytest-benchmark suite of the fused relative-error ops (not part of the `tests` run).

Run:
    .venv/bin/python -m pytest benchmarks/bench_ops.py --benchmark-group-by=param:case \
        --benchmark-columns=median,iqr,rounds

Each case of benchmarks/ops_cases.py is one group; its contenders (fused, op, sums+ratio, naive,
compiled, loop, bandwidth) are the benchmarks of that group, on the same data. For the single
table with ratios and targets, use benchmarks/ops_table.py.
"""

from __future__ import annotations

import functools
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ops_cases import all_cases  # noqa: E402


@functools.lru_cache(maxsize=1)
def _cases():
    return {c.name: c for c in all_cases()}


def _params():
    out = []
    for case in _cases().values():
        for contender in case.contenders:
            out.append(pytest.param(case.name, contender, id=f"{case.name}|{contender}"))
    return out


@pytest.mark.parametrize(("case", "contender"), _params())
def test_ops(benchmark, case, contender):
    fn = _cases()[case].contenders[contender]
    fn()  # warm-up (compiles the torch.compile contender)
    benchmark.pedantic(fn, rounds=15, iterations=1, warmup_rounds=2)
