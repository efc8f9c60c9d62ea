"""Validation of the CUDA kernels on a GPU machine: steps, per-step timeouts, one summary.md.

Entry point: ``bash benchmarks/gpu_validate.sh [options]`` (chooses the Python, then runs this
file). Run from the repository root. Nothing is downloaded or installed: the build uses the
installed torch and CUDA toolkit; a missing tool or Python package turns the steps that need it
into ``skipped`` rows naming what is missing.

    bash benchmarks/gpu_validate.sh --quick                    # limits itself to 420 s (7 min)
    bash benchmarks/gpu_validate.sh                            # full (estimated 15 min)
    bash benchmarks/gpu_validate.sh --device cpu --quick       # the steps that apply on CPU
    bash benchmarks/gpu_validate.sh --quick --steps build,edge # some steps

Steps (``--quick``; ``$OUT/<step>.log`` each):

=============== ===========================================================================
env             versions, device, tools, Python packages (``env.json``; ``nvidia-smi``)
build           ``setup.py build_ext --inplace`` with the CUDA kernels for the visible GPU's
                architecture only, ``MAX_JOBS`` = all cores; then ``lsa_ext.backend()`` must
                report the compiled kernel for the device
edge            ``cuda_edge_cases.py``: every check group but ``huge``
huge            ``cuda_edge_cases.py --only huge``: a bfloat16 pair of 2**31 + 4099 elements
tests-ops       ``LSA_TEST_DEVICE=cuda pytest tests/test_ops.py`` (hypothesis, reference)
tests-autograd  ``LSA_TEST_DEVICE=cuda pytest tests/test_ops_autograd.py
                tests/test_ops_errors.py`` (gradcheck, opcheck, torch.compile, errors)
dist            ``torchrun --standalone --nproc_per_node=1 benchmarks/dist_check.py``: an
                analysis through an nccl process group, fused kernel vs float64 reference
memcheck        ``compute-sanitizer --tool memcheck`` over the edge cases (groups shapes,
                multi, repro, autograd; PyTorch's caching allocator off)
racecheck       ``compute-sanitizer --tool racecheck`` over the ``multi,repro`` groups
synccheck       ``compute-sanitizer --tool synccheck`` over the ``multi,repro`` groups
bench           ``bench_cuda.py --reps 10 --trials 3``: the table, alone on the GPU
=============== ===========================================================================

``env`` and ``build`` run first; the checks (edge … synccheck) then run concurrently (``--jobs``;
they only test correctness), and ``bench`` runs last, alone. Every step has a timeout, and the
run an overall budget (``--budget``, 420 s in quick mode): the checks are capped so that
``bench`` keeps 120 s, and a step that cannot get 20 s is ``skipped`` for time. The full mode
runs the whole pytest suite, memcheck also over the op tests, the edge cases with ``--huge``,
and the benchmark with its default repeats, one step at a time. ``--tiny`` (smallest inputs,
bench with the checks) exists to test this script (``tests/test_gpu_validate.py``).

``$OUT/summary.md`` (``OUT`` from the environment or ``--out``; default
``benchmarks/results/gpu``, ``benchmarks/results/cpu`` with ``--device cpu``) is rewritten after
every step: device, torch and CUDA versions, one row per step ``| step |
passed/FAILED/skipped/n/a | seconds | details |``, the exact commands, and the benchmark table
(GB/s as a percentage of the measured device-to-device copy bandwidth). Exit status 0 when every
step passed (or does not apply to the device), else 1.

This file uses the standard library only (it must report a broken torch, not crash on it);
``--probe FILE`` is the env step's child, the only code here that imports torch.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUICK_BUDGET_S = 420.0
FULL_BUDGET_S = 3600.0
MIN_START_S = 20.0  # a step needs at least this much time left to start
PY_MODULES = ("numpy", "pytest", "hypothesis", "setuptools", "ninja", "triton", "tqdm")
SANITIZER_SUBSET = "multi,repro"  # racecheck/synccheck: multi-layer + block-level stage 2
# memcheck runs without the caching allocator: no graph capture (needs it), no sync-debug mode
MEMCHECK_GROUPS = "shapes,multi,repro,autograd"
BENCH_RESERVE_S = 120.0  # quick mode: the checks stop in time for the benchmark


@dataclass
class Step:
    """One validation step: commands run one after another into ``$OUT/<name>.log``."""

    name: str
    cmds: list[list[str]]
    timeout: float
    phase: str = "checks"  # "setup" (serial, first), "checks" (concurrent), "bench" (alone)
    env: dict[str, str] = field(default_factory=dict)
    needs: tuple[str, ...] = ()  # Python modules or tools ("tool:compute-sanitizer")
    cuda_only: bool = False
    note: str = ""  # shown in the details column


@dataclass
class Row:
    step: str
    result: str = "pending"  # pending, running, passed, FAILED, skipped, n/a
    seconds: float | None = None
    details: str = ""


@dataclass
class Running:
    proc: subprocess.Popen
    log: object  # the open log file
    started: float
    timeout: float


# ---------------------------------------------------------------------------------- probe
def probe(path: str) -> int:
    """The env step's child: versions, device, tools, packages -> JSON at ``path``."""
    info: dict = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "modules": {m: importlib.util.find_spec(m) is not None for m in PY_MODULES},
        "tools": {},
    }
    rc = 0
    try:
        import torch
        from torch.utils import cpp_extension

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        info["cuda_home"] = cpp_extension.CUDA_HOME
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["device_count"] = torch.cuda.device_count()
            info["device_name"] = props.name
            info["capability"] = f"{props.major}.{props.minor}"
            info["device_memory_gib"] = round(props.total_memory / 2**30, 1)
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception as exc:  # noqa: BLE001 - reported, not raised: the point of this step
        info["torch_error"] = f"{type(exc).__name__}: {exc}"
        rc = 1
    home = info.get("cuda_home") or os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    if not os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
        # torch guessed CUDA_HOME from an nvcc wrapper outside the toolkit (/usr/local/bin/nvcc)
        for cand in ("/usr/local/cuda", *sorted(map(str, Path("/usr/local").glob("cuda-*")))):
            if os.path.exists(os.path.join(cand, "include", "cuda_runtime.h")):
                home = info["cuda_home_fix"] = cand
                break
    info["extra_cuda_include"] = _extra_cuda_include(home)
    for tool, extra in (
        ("nvcc", [os.path.join(home, "bin", "nvcc")]),
        ("compute-sanitizer", [os.path.join(home, "bin", "compute-sanitizer"),
                               os.path.join(home, "compute-sanitizer", "compute-sanitizer"),
                               "/usr/local/cuda/bin/compute-sanitizer"]),
        ("ninja", []),
        ("nvidia-smi", []),
    ):
        found = shutil.which(tool) or next((p for p in extra if os.access(p, os.X_OK)), None)
        version = None
        if found and tool != "nvidia-smi":
            try:
                out = subprocess.run([found, "--version"], capture_output=True, text=True,
                                     timeout=30).stdout
                lines = [ln for ln in out.splitlines() if ln.strip()]
                version = lines[-1].strip() if lines else None
            except (OSError, subprocess.SubprocessError):
                version = None
        info["tools"][tool] = {"path": found, "version": version}
    smi = info["tools"]["nvidia-smi"]["path"]
    if smi:
        try:
            print(subprocess.run([smi], capture_output=True, text=True, timeout=30).stdout)
        except (OSError, subprocess.SubprocessError) as exc:
            print(f"nvidia-smi: {exc}")
    if "torch" in info:
        try:
            import lsa_ext  # noqa: F401  (before the build: checks the Python dependencies)

            info["lsa_ext_import"] = "ok"
        except Exception as exc:  # noqa: BLE001
            info["lsa_ext_import"] = f"{type(exc).__name__}: {exc}"
            rc = 1
    Path(path).write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    missing = [m for m, ok in info["modules"].items() if not ok]
    print(f"torch {info.get('torch', info.get('torch_error'))}, CUDA {info.get('torch_cuda')}, "
          f"{info.get('device_name', 'no GPU visible')}; lsa_ext import: "
          f"{info.get('lsa_ext_import', 'not tried')}; missing packages: "
          f"{', '.join(missing) or 'none'}")
    return rc


def _extra_cuda_include(home: str) -> str | None:
    """The CUDA library headers torch includes (cuBLAS, cuSPARSE, cuSOLVER) when the toolkit at
    ``home`` lacks them (a toolkit with nvcc and the runtime only): the ``include`` folder of
    the torch wheel's ``nvidia/cu*`` package that has them, else None."""
    wanted = ("cublas_v2.h", "cusparse.h", "cusolverDn.h")
    inc = Path(home) / "include"
    if all((inc / h).exists() for h in wanted):
        return None
    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations or []) if spec else []:
        for cand in sorted(Path(base).glob("cu*/include"), reverse=True):
            if all((cand / h).exists() for h in wanted):
                return str(cand)
    return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# ---------------------------------------------------------------------------------- plan
CHECK_BACKEND = (
    "import sys, lsa_ext; d = sys.argv[1]; b = lsa_ext.backend(); print('backend:', b); "
    "sys.exit(0 if b[d] == 'compiled-' + d else "
    "'lsa_ext.backend()[%r] is %r, not the compiled kernel' % (d, b[d]))"
)


def plan(args: argparse.Namespace, info: dict) -> list[Step]:
    """The steps after ``env`` for ``args`` (device, quick, tiny) on the machine ``info``."""
    py = sys.executable
    dev = args.device
    cuda = dev == "cuda"
    quick, tiny = args.quick, args.tiny
    out = Path(args.out)
    cores = str(info.get("cpu_count") or os.cpu_count() or 1)
    steps: list[Step] = []

    # build: the visible GPU's architecture only, all cores
    env = {"LSA_BUILD_CUDA": "1" if cuda else "0", "MAX_JOBS": os.environ.get("MAX_JOBS", cores)}
    note = f"MAX_JOBS={env['MAX_JOBS']}"
    if cuda:
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or info.get("capability", "")
        if arch:
            env["TORCH_CUDA_ARCH_LIST"] = arch
        note = f"TORCH_CUDA_ARCH_LIST={arch or '(setup.py default)'}, {note}"
        if info.get("cuda_home_fix"):
            env["CUDA_HOME"] = info["cuda_home_fix"]
            note += f"; CUDA_HOME={env['CUDA_HOME']} (torch's guess has no toolkit headers)"
        extra = info.get("extra_cuda_include")
        if extra:  # after any CPATH given: the toolkit's own headers come first (-I)
            env["CPATH"] = os.pathsep.join(p for p in (os.environ.get("CPATH"), extra) if p)
            note += "; CPATH += the torch wheel's CUDA library headers"
    if not (info.get("tools", {}).get("ninja") or {}).get("path"):
        note += "; ninja not found: sources compiled one at a time"
    steps.append(Step(
        "build",
        [[py, "setup.py", "build_ext", "--inplace"], [py, "-c", CHECK_BACKEND, dev]],
        timeout=300 if quick else 900, phase="setup", env=env, needs=("setuptools",), note=note,
    ))

    edge = [py, "benchmarks/cuda_edge_cases.py", "--device", dev]
    if tiny:
        steps.append(Step("edge", [edge + ["--only", "autograd"]], timeout=120))
    elif quick:
        steps.append(Step("edge", [edge], timeout=240))
    else:
        steps.append(Step("edge", [edge + ["--huge"]], timeout=900))
    if quick:
        steps.append(Step("huge", [edge + ["--only", "huge"]], timeout=240, cuda_only=True,
                          note="2**31 + 4099 bfloat16 elements"))

    test_env = {"LSA_TEST_DEVICE": dev}
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if not quick:
        steps.append(Step("tests", [pytest + ["tests"]], timeout=1800, env=test_env,
                          needs=("pytest", "numpy", "hypothesis")))
    else:
        ops_sel = ["-k", "empty_batch"] if tiny else []
        auto_sel = ["-k", "gradcheck_sq_sums"] if tiny else []
        steps.append(Step("tests-ops", [pytest + ["tests/test_ops.py"] + ops_sel], timeout=300,
                          env=test_env, needs=("pytest", "numpy", "hypothesis")))
        steps.append(Step(
            "tests-autograd",
            [pytest + ["tests/test_ops_autograd.py", "tests/test_ops_errors.py"] + auto_sel],
            timeout=300, env=test_env, needs=("pytest", "numpy"),
        ))

    dist = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
            "benchmarks/dist_check.py", "--device", dev]
    steps.append(Step("dist", [dist + (["--samples", "32", "--batch", "16"] if tiny else [])],
                      timeout=180, needs=("numpy",), note="nccl" if cuda else "gloo"))

    cs = str((info.get("tools", {}).get("compute-sanitizer") or {}).get("path")
             or "compute-sanitizer")
    # kernel errors only: API calls torch makes and handles itself are not failures here
    san = [cs, "--error-exitcode", "3", "--print-limit", "20", "--report-api-errors", "no"]
    no_cache = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    mem_cmds = [san + ["--tool", "memcheck", py, "benchmarks/cuda_edge_cases.py",
                       "--only", MEMCHECK_GROUPS]]
    if not quick:
        mem_cmds.append(san + ["--tool", "memcheck"] + pytest + ["-x", "tests/test_ops.py",
                                                                 "tests/test_ops_autograd.py"])
    steps.append(Step(
        "memcheck", mem_cmds, timeout=300 if quick else 1800,
        env=no_cache if quick else no_cache | test_env,
        needs=("tool:compute-sanitizer",) + (() if quick else ("pytest", "hypothesis")),
        cuda_only=True,
    ))
    for tool in ("racecheck", "synccheck"):
        steps.append(Step(
            tool,
            [san + ["--tool", tool, py, "benchmarks/cuda_edge_cases.py", "--only",
                    SANITIZER_SUBSET]],
            timeout=240 if quick else 900, env=no_cache, needs=("tool:compute-sanitizer",),
            cuda_only=True,
        ))

    bench = [py, "benchmarks/bench_cuda.py", "--device", dev, "--json",
             str(out / "bench_cuda.json"), "--markdown", str(out / "bench_cuda.md")]
    if tiny:
        bench += ["--quick", "--no-compile", "--reps", "1", "--trials", "1"]
    elif quick:
        bench += ["--reps", "10", "--trials", "3"] + ([] if cuda else ["--quick", "--no-compile"])
    # --tiny times nothing worth keeping: the bench then runs with the checks
    steps.append(Step("bench", [bench], timeout=240 if quick else 1200,
                      phase="checks" if tiny else "bench"))
    return steps


# ---------------------------------------------------------------------------------- runner
class Runner:
    """Runs steps with timeouts under an overall deadline; rewrites summary.md as it goes."""

    def __init__(self, out: Path, budget_s: float, jobs: int, header: list[str],
                 info: dict | None = None, device: str = "cuda",
                 bench_reserve_s: float = 0.0) -> None:
        self.out = out
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s
        self.jobs = max(1, jobs)
        self.header = header
        self.info = info or {}
        self.device = device
        self.bench_reserve_s = bench_reserve_s
        self.rows: dict[str, Row] = {}
        self.steps: dict[str, Step] = {}
        self.running: dict[str, Running] = {}
        self.footer: list[str] = []
        self.fatal: str | None = None  # why no step can run (no torch, no GPU)

    # -- bookkeeping
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def say(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)

    def add(self, steps: list[Step]) -> None:
        for s in steps:
            self.steps[s.name] = s
            self.rows[s.name] = Row(s.name)

    def finish(self, name: str, result: str, seconds: float | None, details: str) -> None:
        row = self.rows[name]
        row.result, row.seconds, row.details = result, seconds, details
        shown = f" ({seconds:.1f} s)" if seconds is not None else ""
        self.say(f"{name}: {result}{shown} {details}")
        self.write_summary()

    def ok(self) -> bool:
        return all(r.result in ("passed", "n/a") for r in self.rows.values())

    # -- checks before a step starts
    def missing(self, step: Step) -> list[str]:
        if not self.info:
            return []
        gone = []
        for need in step.needs:
            if need.startswith("tool:"):
                tool = need[5:]
                if not (self.info.get("tools", {}).get(tool) or {}).get("path"):
                    gone.append(tool)
            elif not self.info.get("modules", {}).get(need, True):
                gone.append(need)
        return gone

    def blocked(self, step: Step, reserve: float) -> str | None:
        """Why ``step`` cannot start (a skipped row's details), or None."""
        if step.cuda_only and self.device != "cuda":
            return "n/a:CUDA only"
        if self.fatal:
            return f"skipped:{self.fatal}"
        if "build" in self.rows and step.name != "build" and self.rows["build"].result != "passed":
            return "skipped:build step did not pass"
        gone = self.missing(step)
        if gone:
            return f"skipped:missing {', '.join(gone)}"
        if self.deadline - time.monotonic() - reserve < MIN_START_S:
            return "skipped:time (budget spent)"
        return None

    # -- running
    def start(self, step: Step, reserve: float) -> None:
        timeout = min(step.timeout, self.deadline - time.monotonic() - reserve)
        env = dict(os.environ)
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"]
                                         if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        env.update(step.env)
        if step.phase == "checks" and self.jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
            cores = self.info.get("cpu_count") or os.cpu_count() or 1
            env["OMP_NUM_THREADS"] = str(max(1, cores // self.jobs))
        script = self.out / f".{step.name}.sh"
        lines = ["set -e"] + [" ".join(shlex.quote(c) for c in cmd) for cmd in step.cmds]
        script.write_text("\n".join(lines) + "\n")
        log = open(self.out / f"{step.name}.log", "w")  # closed in poll() / interrupt()
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in step.env.items())
        log.write(f"# {step.name}: timeout {timeout:.0f} s{'; ' + exports if exports else ''}\n")
        for cmd in step.cmds:
            log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(["bash", str(script)], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.running[step.name] = Running(proc, log, time.monotonic(), timeout)
        self.rows[step.name].result = "running"
        self.say(f"{step.name}: started (timeout {timeout:.0f} s)")
        self.write_summary()

    def poll(self) -> None:
        for name, run in list(self.running.items()):
            rc = run.proc.poll()
            took = time.monotonic() - run.started
            timeout = run.timeout
            if rc is None and took <= timeout:
                continue
            timed_out = rc is None
            if timed_out:
                _kill(run.proc)
            run.log.close()
            (self.out / f".{name}.sh").unlink(missing_ok=True)
            del self.running[name]
            last = _last_line(self.out / f"{name}.log")
            step = self.steps[name]
            note = f"{step.note}; " if step.note else ""
            if timed_out:
                self.finish(name, "FAILED", took, f"{note}timeout after {timeout:.0f} s; {last}")
            elif rc == 0:
                self.finish(name, "passed", took, f"{note}{last}")
            else:
                self.finish(name, "FAILED", took, f"{note}exit {rc}: {last}")

    def run_serial(self, step: Step, reserve: float = 0.0) -> None:
        why = self.blocked(step, reserve)
        if why:
            result, details = why.split(":", 1)
            self.finish(step.name, result, None, details)
            return
        self.start(step, reserve)
        while self.running:
            time.sleep(0.2)
            self.poll()

    def run_concurrent(self, steps: list[Step], reserve: float = 0.0) -> None:
        queue = list(steps)
        while queue or self.running:
            while queue and len(self.running) < self.jobs:
                step = queue.pop(0)
                why = self.blocked(step, reserve)
                if why:
                    result, details = why.split(":", 1)
                    self.finish(step.name, result, None, details)
                else:
                    self.start(step, reserve)
            time.sleep(0.2)
            self.poll()

    def run(self, steps: list[Step]) -> bool:
        self.add([s for s in steps if s.name not in self.rows])
        bench_planned = any(s.phase == "bench" for s in steps)
        for s in (s for s in steps if s.phase == "setup"):
            self.run_serial(s)
        checks = [s for s in steps if s.phase == "checks"]
        self.run_concurrent(checks, self.bench_reserve_s if bench_planned else 0.0)
        for s in (s for s in steps if s.phase == "bench"):
            self.run_serial(s)
        return self.ok()

    def interrupt(self) -> None:
        for name, run in list(self.running.items()):
            _kill(run.proc)
            run.log.close()
            (self.out / f".{name}.sh").unlink(missing_ok=True)
            del self.running[name]
            self.finish(name, "FAILED", time.monotonic() - run.started, "interrupted")

    # -- summary
    def write_summary(self) -> None:
        lines = list(self.header)
        lines += ["", "| step | result | seconds | details |", "|---|---|---:|---|"]
        for r in self.rows.values():
            secs = "—" if r.seconds is None else f"{r.seconds:.1f}"
            lines.append(f"| {r.step} | {r.result} | {secs} | {_cell(r.details)} |")
        counts = {}
        for r in self.rows.values():
            counts[r.result] = counts.get(r.result, 0) + 1
        lines += ["", f"Elapsed {self.elapsed():.0f} s; "
                  + ", ".join(f"{v} {k}" for k, v in counts.items())
                  + ". Logs: `<step>.log` next to this file."]
        lines += ["", "Commands (run from the repository root):", ""]
        for s in self.steps.values():
            env = " ".join(f"{k}={v}" for k, v in s.env.items())
            for cmd in s.cmds:
                lines.append(f"- {s.name}: `{(env + ' ') if env else ''}{_display(cmd)}`")
        lines += self.footer
        bench_md = self.out / "bench_cuda.md"
        if self.rows.get("bench") and self.rows["bench"].result == "passed" and bench_md.exists():
            cmd = _display(self.steps["bench"].cmds[0])
            lines += ["", "## Benchmark", "", f"`{cmd}`", "", bench_md.read_text().rstrip()]
        _atomic_write(self.out / "summary.md", "\n".join(lines) + "\n")


def _display(cmd: list[str]) -> str:
    """A command as a reader would type it: ``python`` for this interpreter, paths shortened."""
    shown = []
    for c in cmd:
        if c == sys.executable:
            c = "python"
        elif c.startswith(str(ROOT) + os.sep):
            c = os.path.relpath(c, ROOT)
        shown.append(shlex.quote(c))
    return " ".join(shown)


def _cell(text: str) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= 160 else text[:157] + "..."


def _last_line(path: Path) -> str:
    """The log's last informative line (compute-sanitizer and pytest put their verdict last)."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [ln for ln in lines if ln and not ln.startswith("$ ") and not ln.startswith("# ")]
    return lines[-1] if lines else "(no output)"


def _kill(proc: subprocess.Popen) -> None:
    """Ends the step's process group (the step and its children), TERM then KILL."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------- main
def header_lines(args: argparse.Namespace, info: dict, argv: list[str]) -> list[str]:
    mode = "quick" if args.quick else "full"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    tools = info.get("tools", {})
    if args.device == "cuda":
        dev = (f"**{info.get('device_name', 'no CUDA device visible')}** "
               f"(sm_{info.get('capability', '?').replace('.', '')}, "
               f"{info.get('device_memory_gib', '?')} GiB, {info.get('device_count', 0)} visible)")
    else:
        dev = f"**CPU** ({info.get('cpu_model', _cpu_model())})"
    sw = [f"torch {info.get('torch', '?')}", f"CUDA {info.get('torch_cuda')} (torch)"]
    for tool in ("nvcc", "compute-sanitizer"):
        t = tools.get(tool) or {}
        sw.append(f"{tool}: {t.get('version') or 'not found'}")
    if info.get("nccl"):
        sw.append(f"NCCL {info['nccl']}")
    sw.append(f"Python {info.get('python', platform.python_version())}")
    missing = [m for m, ok in info.get("modules", {}).items() if not ok]
    return [
        f"# lsa_ext GPU validation ({mode} mode, --device {args.device})",
        "",
        f"- command: `bash benchmarks/gpu_validate.sh {shlex.join(argv)}`, {now}, "
        f"budget {args.budget:.0f} s, {args.jobs} concurrent checks; git {_git()}",
        f"- device: {dev}; {info.get('cpu_count', os.cpu_count())} CPU cores",
        f"- software: {', '.join(sw)}",
        f"- Python packages missing: {', '.join(missing) if missing else 'none'}",
    ]


def _git() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + (" (modified)" if dirty.strip() else "")) if sha else "unknown"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="gpu_validate.sh", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="the 7-minute selection (see above)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda (default) or cpu: runs the steps that apply (checks this script)")
    p.add_argument("--out", default=os.environ.get("OUT") or None,
                   help="output folder (default: $OUT, else benchmarks/results/gpu, or "
                        "benchmarks/results/cpu with --device cpu)")
    p.add_argument("--steps", default=None, help="comma-separated steps to run (default: all)")
    p.add_argument("--skip", default="", help="comma-separated steps to leave out")
    p.add_argument("--budget", type=float, default=None,
                   help=f"overall seconds (default {QUICK_BUDGET_S:.0f} quick, "
                        f"{FULL_BUDGET_S:.0f} full)")
    p.add_argument("--jobs", type=int, default=None,
                   help="checks run concurrently (default: all in quick mode, 1 in full mode)")
    p.add_argument("--tiny", action="store_true",
                   help="smallest inputs in every step (tests this script quickly)")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.out is None:
        args.out = f"benchmarks/results/{'gpu' if args.device == 'cuda' else 'cpu'}"
    if args.budget is None:
        args.budget = QUICK_BUDGET_S if args.quick else FULL_BUDGET_S
    if args.jobs is None:
        args.jobs = 16 if args.quick else 1
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.probe:
        return probe(args.probe)
    out = Path(args.out)
    if not out.is_absolute():
        out = ROOT / out
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out)
    runner = Runner(out, args.budget, args.jobs, header_lines(args, {}, argv), device=args.device)

    def on_signal(signum, frame):  # the caller's timeout: record what was running
        runner.interrupt()
        sys.exit(1)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    env_step = Step("env", [[sys.executable, str(Path(__file__).resolve()), "--probe",
                             str(out / "env.json")]], timeout=90, phase="setup")
    runner.add([env_step])
    runner.run_serial(env_step)
    try:
        info = json.loads((out / "env.json").read_text())
    except (OSError, ValueError):
        info = {}
    if "torch" not in info:
        runner.fatal = "torch cannot be imported (env.log)"
    elif args.device == "cuda" and not info.get("cuda_available"):
        runner.fatal = "no CUDA device visible (--device cpu runs the CPU steps)"
        runner.rows["env"].result = "FAILED"
        runner.rows["env"].details = runner.fatal
    runner.info = info
    runner.header = header_lines(args, info, argv)
    runner.write_summary()

    steps = plan(args, info)
    names = [s.name for s in steps]
    chosen = names if args.steps is None else [n.strip() for n in args.steps.split(",")]
    skip = {n.strip() for n in args.skip.split(",") if n.strip()}
    unknown = sorted((set(chosen) | skip) - set(names) - {"env"})
    if unknown:
        print(f"unknown step(s) {unknown}; steps: env, {', '.join(names)}", file=sys.stderr)
        return 2
    steps = [s for s in steps if s.name in chosen and s.name not in skip]
    bench = next((s for s in steps if s.phase == "bench"), None)
    runner.bench_reserve_s = min(bench.timeout, BENCH_RESERVE_S) if bench else 0.0
    ok = runner.run(steps)
    print()
    print((out / "summary.md").read_text())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
