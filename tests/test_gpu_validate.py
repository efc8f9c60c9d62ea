"""benchmarks/gpu_validate.sh: the runner (timeouts, budget, missing tools, failures, summary.md)
with stand-in steps, and one whole ``--device cpu --quick --tiny`` run of the real steps."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gpu_validate", ROOT / "benchmarks/gpu_validate.py")
gv = importlib.util.module_from_spec(_spec)
sys.modules["gpu_validate"] = gv  # dataclasses look their module up
_spec.loader.exec_module(gv)

ROW = re.compile(
    r"^\| (\S+) \| (passed|FAILED|skipped|n/a|pending|running) \| ([0-9.]+|—) \| (.*) \|$"
)


def rows(summary: str) -> dict[str, tuple[str, str, str]]:
    """{step: (result, seconds, details)} from summary.md's table."""
    out = {}
    for line in summary.splitlines():
        m = ROW.match(line)
        if m:
            out[m[1]] = (m[2], m[3], m[4])
    return out


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def runner(tmp_path: Path, budget: float = 60.0, device: str = "cpu", **kw) -> gv.Runner:
    info = {"modules": {"numpy": True, "hypothesis": False}, "tools": {"nvcc": {"path": None}}}
    return gv.Runner(tmp_path, budget, jobs=4, header=["# test"], info=info, device=device, **kw)


def test_results_timeouts_and_missing_requirements(tmp_path):
    steps = [
        gv.Step("good", [py("print('all 3 checks passed')")], timeout=60),
        gv.Step("bad", [py("print('FAIL: diff'); raise SystemExit(3)")], timeout=60),
        gv.Step("two", [py("print('first')"), py("import sys; sys.exit(2)"),
                        py("print('never')")], timeout=60),
        gv.Step("hang", [py("import time; print('waiting', flush=True); time.sleep(60)")],
                timeout=1.5),
        gv.Step("nohypo", [py("pass")], timeout=60, needs=("numpy", "hypothesis")),
        gv.Step("notool", [py("pass")], timeout=60, needs=("tool:nvcc",)),
        gv.Step("gpu", [py("pass")], timeout=60, cuda_only=True),
        gv.Step("timed", [py("print('bench table')")], timeout=60, phase="bench"),
    ]
    r = runner(tmp_path)
    t0 = time.monotonic()
    assert r.run(steps) is False
    assert time.monotonic() - t0 < 30  # the hanging step was ended at its timeout
    got = rows((tmp_path / "summary.md").read_text())
    assert list(got) == [s.name for s in steps]
    assert got["good"][:1] == ("passed",) and got["good"][2] == "all 3 checks passed"
    assert got["bad"][0] == "FAILED" and got["bad"][2] == "exit 3: FAIL: diff"
    assert got["two"][0] == "FAILED" and got["two"][2] == "exit 2: first"  # stops at the failure
    assert "\nnever\n" not in (tmp_path / "two.log").read_text()  # only in the $ line
    assert got["hang"][0] == "FAILED" and got["hang"][2] == "timeout after 2 s; waiting"
    assert 1.4 < float(got["hang"][1]) < 25
    assert got["nohypo"] == ("skipped", "—", "missing hypothesis")
    assert got["notool"] == ("skipped", "—", "missing nvcc")
    assert got["gpu"] == ("n/a", "—", "CUDA only")
    assert got["timed"][0] == "passed"
    for name in ("good", "bad", "two", "hang", "timed"):
        log = (tmp_path / f"{name}.log").read_text()
        assert log.startswith(f"# {name}: timeout") and "$ " in log
    assert not list(tmp_path.glob(".*.sh"))  # helper scripts removed


def test_only_passed_and_not_applicable_steps_make_success(tmp_path):
    steps = [gv.Step("a", [py("pass")], timeout=30), gv.Step("g", [], timeout=30, cuda_only=True)]
    assert runner(tmp_path).run(steps) is True
    got = rows((tmp_path / "summary.md").read_text())
    assert got["a"][0] == "passed" and got["a"][2] == "(no output)"
    assert got["g"] == ("n/a", "—", "CUDA only")


def test_budget_skips_steps_and_keeps_the_bench_share(tmp_path):
    # 35 s budget: the bench keeps 20 s, so a check may run 35 - 20 - elapsed s at most, and one
    # that cannot get MIN_START_S (20 s) is skipped for time.
    steps = [
        gv.Step("check", [py("pass")], timeout=300),
        gv.Step("bench", [py("print('table')")], timeout=300, phase="bench"),
    ]
    r = runner(tmp_path, budget=35.0, bench_reserve_s=20.0)
    assert r.run(steps) is False
    got = rows((tmp_path / "summary.md").read_text())
    assert got["check"] == ("skipped", "—", "time (budget spent)")
    assert got["bench"][0] == "passed"
    steps = [gv.Step("late", [py("pass")], timeout=300)]
    assert runner(tmp_path, budget=5.0).run(steps) is False
    assert rows((tmp_path / "summary.md").read_text())["late"][0] == "skipped"


def test_a_failed_build_skips_what_depends_on_it(tmp_path):
    steps = [
        gv.Step("build", [py("print('error: nvcc failed'); raise SystemExit(1)")], timeout=30,
                phase="setup"),
        gv.Step("edge", [py("pass")], timeout=30),
        gv.Step("bench", [py("pass")], timeout=30, phase="bench"),
    ]
    assert runner(tmp_path).run(steps) is False
    got = rows((tmp_path / "summary.md").read_text())
    assert got["build"][0] == "FAILED" and "error: nvcc failed" in got["build"][2]
    assert got["edge"] == got["bench"] == ("skipped", "—", "build step did not pass")


def test_no_torch_or_no_gpu_skips_every_step(tmp_path):
    r = runner(tmp_path, device="cuda")
    r.fatal = "no CUDA device visible"
    assert r.run([gv.Step("build", [py("pass")], 30, phase="setup"),
                  gv.Step("edge", [py("pass")], 30)]) is False
    got = rows((tmp_path / "summary.md").read_text())
    assert got == {n: ("skipped", "—", "no CUDA device visible") for n in ("build", "edge")}


def test_interrupt_ends_running_steps_and_records_them(tmp_path):
    r = runner(tmp_path)
    step = gv.Step("slow", [py("import time; time.sleep(60)")], timeout=120)
    r.add([step])
    r.start(step, 0.0)
    proc = r.running["slow"].proc
    r.interrupt()
    assert proc.poll() is not None and not r.running
    assert rows((tmp_path / "summary.md").read_text())["slow"][0] == "FAILED"


def test_quick_plan_on_cuda_builds_for_the_visible_arch_with_all_cores(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.delenv("MAX_JOBS", raising=False)
    info = {"cpu_count": 16, "capability": "9.0", "extra_cuda_include": "/x/nvidia/cu13/include",
            "tools": {"compute-sanitizer": {"path": "/usr/local/cuda/bin/compute-sanitizer"},
                      "ninja": {"path": "/usr/bin/ninja"}}}
    args = gv.parse_args(["--quick", "--out", str(tmp_path)])
    steps = {s.name: s for s in gv.plan(args, info)}
    assert list(steps) == ["build", "edge", "huge", "tests-ops", "tests-autograd", "dist",
                           "memcheck", "racecheck", "synccheck", "bench"]
    build = steps["build"]
    assert build.env["TORCH_CUDA_ARCH_LIST"] == "9.0" and build.env["MAX_JOBS"] == "16"
    assert build.env["LSA_BUILD_CUDA"] == "1" and build.env["CPATH"].endswith("cu13/include")
    assert build.cmds[0][1:] == ["setup.py", "build_ext", "--inplace"]
    assert steps["huge"].cmds[0][-2:] == ["--only", "huge"]
    assert steps["tests-ops"].env["LSA_TEST_DEVICE"] == "cuda"
    assert "--nproc_per_node=1" in steps["dist"].cmds[0]
    assert steps["dist"].cmds[0][-2:] == ["--device", "cuda"]
    for tool in ("memcheck", "racecheck", "synccheck"):
        cmd = steps[tool].cmds[0]
        assert cmd[0] == "/usr/local/cuda/bin/compute-sanitizer"
        assert cmd[cmd.index("--tool") + 1] == tool
        assert steps[tool].env["PYTORCH_NO_CUDA_MEMORY_CACHING"] == "1"
    assert steps["memcheck"].cmds[0][-1] == "shapes,multi,repro,autograd"  # no graph capture
    assert "--report-api-errors" in steps["memcheck"].cmds[0]
    assert steps["bench"].cmds[0][-4:] == ["--reps", "10", "--trials", "3"]
    assert steps["bench"].phase == "bench" and args.budget == 420


def test_whole_quick_run_on_cpu_writes_the_summary(tmp_path):
    """The real steps with the smallest inputs (build left out: the suite's build is used)."""
    env = dict(os.environ, PY=sys.executable, OUT=str(tmp_path / "out"))
    env.pop("LSA_TEST_DEVICE", None)
    res = subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu_validate.sh"), "--device", "cpu", "--quick", "--tiny",
         "--skip", "build"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    summary = (tmp_path / "out/summary.md").read_text()
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert summary in res.stdout  # also printed, for the device tool's output tail
    lines = summary.splitlines()
    assert lines[0] == "# lsa_ext GPU validation (quick mode, --device cpu)"
    assert any(ln.startswith("- device: **CPU**") for ln in lines)
    assert any(re.match(r"- software: torch \d+\.\d+", ln) for ln in lines)
    got = rows(summary)
    assert list(got) == ["env", "edge", "huge", "tests-ops", "tests-autograd", "dist", "memcheck",
                         "racecheck", "synccheck", "bench"]
    for name, (result, seconds, details) in got.items():
        if name in ("huge", "memcheck", "racecheck", "synccheck"):
            assert (result, seconds, details) == ("n/a", "—", "CUDA only")
        else:
            assert result == "passed" and float(seconds) > 0, (name, details)
            assert (tmp_path / f"out/{name}.log").stat().st_size > 0
    assert "checks passed on cpu" in got["edge"][2]
    assert re.search(r"\b1 passed\b", got["tests-ops"][2])
    assert got["dist"][2] == "gloo; dist check passed"
    bench = summary.split("## Benchmark", 1)[1]
    assert "| case | shape | dtype | layout | pass | fused µs | GB/s | % copy BW |" in bench
    assert len(re.findall(r"^\| (large|B=1|many small|multi) \|", bench, re.M)) == 14
