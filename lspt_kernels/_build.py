"""Loads the C++/CUDA extension: the one setup.py prebuilt if present, else a ninja JIT build.

The JIT build goes to torch's extension cache (TORCH_EXTENSIONS_DIR, default
~/.cache/torch_extensions) and is reused until a source changes. Sources live in csrc/ at the
repository root, outside the package (as in flash-attention/xformers): an editable install or a
checkout on sys.path can JIT; a plain wheel relies on the ahead-of-time build
(LSPT_BUILD_CPU=1 / LSPT_BUILD_CUDA=1 pip install .).
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent / "csrc"

# Shared by setup.py (ahead of time) and the JIT build below, so both compile the same thing.
CPU_SOURCES = ["bindings.cpp", "cpu/lspt_step_cpu.cpp"]
CUDA_SOURCES = CPU_SOURCES + ["cuda/lspt_step_cuda.cu"]
# No -std: torch adds the standard its headers need (C++17 up to 2.13, C++20 from 2.14).
# -fopenmp: at::parallel_for in csrc/cpu runs on one thread without it (symbols resolve to torch's libgomp).
CXX_FLAGS = ["-O3"] + (["-fopenmp"] if sys.platform.startswith("linux") else [])
NVCC_FLAGS = ["-O3", "--use_fast_math", "-lineinfo"]
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def cuda_arch_flags(archs: str | None = None) -> list[str]:
    """-gencode flags for LSPT_CUDA_ARCHS (default sm_80 and sm_90), e.g. "9.0" or "8.0;9.0"."""
    archs = archs or os.environ.get("LSPT_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    flags = []
    for arch in archs.replace(",", ";").split(";"):
        num = arch.strip().replace(".", "")
        if num:
            flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    return flags


_cache: dict[str, object] = {}


def load_extension(kind: str):
    """The extension module for kind "cpu" or "cuda"; raises with the reason if it cannot load."""
    if kind in _cache:
        return _cache[kind]
    name = f"_lspt_{kind}"
    try:
        module = importlib.import_module(f"lspt_kernels.{name}")  # built by setup.py
        # Only this checkout's own binary: an editable install's import finder can hand out another
        # checkout's (built from other sources, possibly another op signature).
        if Path(module.__file__).resolve().parent != Path(__file__).resolve().parent:
            raise ImportError(f"{module.__file__} belongs to another checkout")
    except ImportError:
        module = _jit(kind, name)
    _cache[kind] = module
    return module


def _jit(kind: str, name: str):
    from torch.utils import cpp_extension

    sources = CPU_SOURCES if kind == "cpu" else CUDA_SOURCES
    missing = [s for s in sources if not (CSRC / s).is_file()]
    if missing:
        raise RuntimeError(f"cannot JIT-build {name}: sources not found under {CSRC}: {missing} "
                           "(install from a checkout with `pip install -e .`, or prebuild it)")
    kwargs = dict(name=name, sources=[str(CSRC / s) for s in sources],
                  extra_include_paths=[str(CSRC)], extra_cflags=CXX_FLAGS, verbose=False,
                  extra_ldflags=[f for f in CXX_FLAGS if f == "-fopenmp"])
    if kind == "cuda":
        kwargs.update(extra_cflags=CXX_FLAGS + ["-DLSPT_WITH_CUDA"],
                      extra_cuda_cflags=NVCC_FLAGS + ["-DLSPT_WITH_CUDA"] + cuda_arch_flags())
    return cpp_extension.load(**kwargs)
