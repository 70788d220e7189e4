"""Compile-checks the CUDA kernels with nvcc (no GPU needed) and reads ptxas' resource report.

One compile of csrc/cuda/lspt_step_cuda.cu for one architecture (sm_90), `-c` to an object in a
temporary directory, against the installed torch's headers, with the package's own nvcc flags
(lspt_kernels._build.NVCC_FLAGS; the C++ standard is the one this torch requires). ptxas' verbose
report must show every kernel without spills and without a stack frame. Run with `-s` to see the
report (registers, shared memory, spills per kernel).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from lspt_kernels import _build

SOURCE = _build.CSRC / "cuda" / "lspt_step_cuda.cu"
ARCH = "9.0"
KERNELS = ("prologue_kernel", "epilogue_kernel", "bwd_elementwise_kernel", "tail_kernel", "grouped_gates_kernel")


def _find_nvcc() -> Path | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return Path(home) / "bin" / "nvcc"
    found = shutil.which("nvcc")
    return Path(found) if found else None


def _torch_cuda_includes(cuda_home: Path) -> list[str]:
    try:  # torch >= 2.6
        paths = cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # older torch
        paths = cpp_extension.include_paths(cuda=True)
    extra = str(cuda_home / "include")
    return list(paths) + ([extra] if extra not in paths else [])


def _cxx_std() -> str:
    # torch 2.14 made its headers require C++20 (and cpp_extension passes -std=c++20); older torch
    # builds extensions as C++17.
    major, minor = (int(x) for x in re.findall(r"\d+", torch.__version__)[:2])
    return "-std=c++20" if (major, minor) >= (2, 14) else "-std=c++17"


def _nvcc_command(nvcc: Path, obj: Path) -> list[str]:
    common = getattr(cpp_extension, "COMMON_NVCC_FLAGS", [
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
        "--expt-relaxed-constexpr"])
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))
    includes = [str(_build.CSRC)] + _torch_cuda_includes(nvcc.parent.parent)
    includes.append(sysconfig.get_paths()["include"])
    flags = [f for f in _build.NVCC_FLAGS if not f.startswith("-std=")] + [_cxx_std()]
    return ([str(nvcc), "-c", str(SOURCE), "-o", str(obj)] + [f"-I{p}" for p in includes]
            + list(common) + [f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DLSPT_WITH_CUDA",
                              "-DTORCH_EXTENSION_NAME=_lspt_cuda", "-DTORCH_API_INCLUDE_EXTENSION_H",
                              "-Xcompiler", "-fPIC"]
            + flags + _build.cuda_arch_flags([ARCH]) + ["-Xptxas", "-v"])


def _demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout
    lines = out.splitlines()
    return lines if len(lines) == len(names) else names


def parse_ptxas(report: str) -> dict[str, dict[str, int]]:
    """{kernel: {registers, smem, stack, spill_stores, spill_loads}} from `ptxas -v` output."""
    kernels: dict[str, dict[str, int]] = {}
    current = None
    for line in report.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line) or \
            re.search(r"Function properties for (\S+)", line)
        if m:
            current = m.group(1)
            kernels.setdefault(current, {})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            kernels[current].update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            kernels[current]["registers"] = int(m[1])
            s = re.search(r"(\d+) bytes smem", line)
            kernels[current]["smem"] = int(s[1]) if s else 0
    names = list(kernels)
    return {pretty: kernels[raw] for raw, pretty in zip(names, _demangle(names))}


def format_report(kernels: dict[str, dict[str, int]]) -> str:
    rows = []
    for name, k in sorted(kernels.items()):
        short = name.replace("lspt::(anonymous namespace)::", "").replace("c10::", "")
        short = re.sub(r"\(.*\)$", "", short)
        rows.append(f"{k.get('registers', -1):4d} regs {k.get('smem', 0):6d} B smem  "
                    f"stack {k.get('stack', -1)}  spill st/ld {k.get('spill_stores', -1)}/"
                    f"{k.get('spill_loads', -1)}  {short}")
    return "\n".join(rows)


@pytest.fixture(scope="module")
def ptxas_report(tmp_path_factory):
    nvcc = _find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME, or put nvcc on PATH): cannot compile-check the "
                    "CUDA kernels")
    obj = tmp_path_factory.mktemp("lspt_cuda_build") / "lspt_step_cuda.o"
    cmd = _nvcc_command(nvcc, obj)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - t0
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nvcc failed ({seconds:.0f} s):\n{' '.join(cmd)}\n{output[-20000:]}"
    assert obj.is_file()
    kernels = parse_ptxas(output)
    print(f"\nnvcc -c ({seconds:.0f} s, sm_90): {' '.join(cmd)}\n{format_report(kernels)}",
          file=sys.stderr)
    return kernels


def test_cuda_source_compiles_with_every_kernel(ptxas_report):
    for name in KERNELS:
        found = [k for k in ptxas_report if f"{name}<" in k or name in k]
        assert found, f"ptxas reported no {name} instantiation; report: {list(ptxas_report)}"
    # 9 dtype combinations x {vectorised, scalar} for the epilogue and the backward elementwise
    # kernel; the prologue and tail depend on (tokens, weights) dtypes only: 6 x 2 each; the grouped
    # kernel: the 9 dtype combinations.
    assert len(ptxas_report) >= 69, format_report(ptxas_report)
    grouped = [k for k in ptxas_report if "grouped_gates_kernel" in k]
    assert len(grouped) == 9, format_report(ptxas_report)


def test_cuda_kernels_do_not_spill(ptxas_report):
    bad = {name: k for name, k in ptxas_report.items()
           if k.get("spill_stores", 1) or k.get("spill_loads", 1) or k.get("stack", 1)}
    assert not bad, "kernels with register spills or a stack frame:\n" + format_report(bad)
    for name, k in ptxas_report.items():
        assert 0 < k["registers"] <= 255, f"{name}: {k}"
        assert k["smem"] <= 48 * 1024, f"{name}: static shared memory over 48 KiB: {k}"
