"""The machine a benchmark runs on: device, versions, load, and how child processes are started."""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path


def device_name(device: str) -> str:
    import torch
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def command_line(argv: list[str] | None, sub: str = "") -> str:
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    prog = "lspt-bench" if prog.startswith("lspt-bench") else "python -m lspt_kernels.bench"
    return prog + (f" {sub}" if sub else "") + ("" if not argv else " " + shlex.join(argv))


def environment(device: str, argv: list[str] | None, sub: str = "") -> dict:
    import timm
    import torch

    from .. import precision
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return dict(device=device, device_name=device_name(device), torch=torch.__version__,
                triton=triton_version, timm=timm.__version__, python=platform.python_version(),
                platform=platform.platform(), cuda=torch.version.cuda, command=command_line(argv, sub),
                threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
                float32_matmul_precision=precision.float32_matmul_precision(torch.device(device).type),
                time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


# ------------------------------------------------------------------------------------------------
# Machine load: other work on the machine skews timings; say so.
# ------------------------------------------------------------------------------------------------
def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def load_line(load: list[float] | None, when: str) -> str:
    if load is None:
        return f"machine load {when}: unavailable"
    return (f"machine load {when}: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
            f"(1/5/15-min averages, {os.cpu_count()} CPUs)")


def load_warning(start: list[float] | None, end: list[float] | None) -> str | None:
    """A warning when the 1-minute load average moved by more than a quarter of the CPUs (at least
    0.5) during the run: another job started or stopped, and timings taken before and after differ."""
    if not start or not end:
        return None
    threshold = max(0.5, 0.25 * (os.cpu_count() or 1))
    if abs(end[0] - start[0]) > threshold:
        return (f"the machine's load changed during the run ({start[0]:.2f} -> {end[0]:.2f} on {os.cpu_count()} "
                "CPUs): other work shared the machine; the per-round ratios cancel a steady drift, but "
                "treat absolute times with care and rerun in a quiet window")
    return None


# ------------------------------------------------------------------------------------------------
# Child processes import the package this process imported, never code from the current directory
# ------------------------------------------------------------------------------------------------
def package_root() -> str:
    """The directory that holds the lspt_kernels package this process imported."""
    import lspt_kernels
    return str(Path(lspt_kernels.__file__).resolve().parent.parent)


_BOOT = ("import json, sys; sys.path[:] = json.loads(sys.argv[1]); del sys.argv[1]; "
         "from lspt_kernels.bench.cli import main; sys.exit(main(sys.argv[1:]))")


def child_command(args: list[str]) -> list[str]:
    """argv that runs `lspt-bench ARGS` in a fresh interpreter importing this process's package.

    `python -m` would put the working directory first on sys.path, so a folder named lspt_kernels
    there would run instead. `-I` keeps the working directory, PYTHON* variables and the user site
    out; the child's sys.path is then set explicitly: this package's root first, then this
    process's own path without the working directory (so torch, timm, ... resolve as here)."""
    cwd = os.path.realpath(os.getcwd())
    root = package_root()
    path = [root] + [p for p in sys.path
                     if p and os.path.realpath(p) != cwd and os.path.realpath(p) != root]
    return [sys.executable, "-I", "-c", _BOOT, json.dumps(path), *args]
