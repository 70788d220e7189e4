"""Loads the C++/CUDA extension: the one setup.py prebuilt if it matches, else a ninja JIT build.

Sources live in csrc/ at the repository root, outside the package (as in flash-attention/xformers):
an editable install or a checkout on sys.path can JIT; a plain wheel relies on the ahead-of-time
build (LSPT_BUILD_CPU=1 / LSPT_BUILD_CUDA=1 pip install .).

Which binary is loaded, and why (decisions):
- Every build is named by its BUILD ID: a hash of the sources (every file under csrc/), the compile
  flags, and the torch build it compiles against (version, CUDA version, git commit, C++ ABI) with the
  Python ABI (EXT_SUFFIX) and machine. The ID is compiled into the binary (`source_hash`, `torch_tag`).
- A prebuilt `lspt_kernels._lspt_{kind}` (setup.py) is loaded only when its `torch_tag` is this torch's
  and, where csrc/ is present (a checkout), its `source_hash` is that of these sources: a binary left
  over from other sources, or from another torch, is never loaded silently; it is skipped and the JIT
  build says why. Without csrc/ (a wheel) the prebuilt is all there is: its torch tag still must match.
- The JIT build goes to TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions/...) under
  `_lspt_{kind}_{build id}/`, so two checkouts, two virtual environments or two versions of the sources
  each find their own build and never rebuild each other's (torch's own JIT names a build by its name
  only, and rebuilds it whenever another checkout's source paths or flags differ).
- The build is atomic: under an exclusive lock (`<dir>.lock`), into a temporary directory that is
  renamed into place only when complete; a second process waits for the lock, then loads the result.
  A finished build is loaded straight from its .so, without running ninja again.
- Before building, one line goes to stderr: a JIT build takes a minute or more.
- A failed build is remembered: `<dir>.failed` beside where the build would go records the reason (no
  nvcc, an nvcc of another CUDA major version than torch's, a compiler error) and the toolchain
  (CXX, CUDA_HOME). Every later load of the same build ID (another process, every DDP rank after
  the first) fails at once with that reason instead of compiling again; a changed toolchain, or
  deleting the file, retries. The caller (lspt_kernels/backends.py) names the backend used instead.
- CUDA architectures: TORCH_CUDA_ARCH_LIST if set (as torch's own extensions read it), else the
  GPUs present (else sm_80 and sm_90), always with PTX of the newest, so a newer GPU can JIT the
  kernels and no build pays for binaries nobody here can run. The list is part of the build ID.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent / "csrc"

# Shared by setup.py (ahead of time) and the JIT build below, so both compile the same thing.
# Each extension registers its own device's dispatch keys (csrc/bindings.cpp), so both can load at once.
CPU_SOURCES = ["bindings.cpp", "autograd.cpp", "cpu/lspt_step_cpu.cpp"]
CUDA_SOURCES = ["bindings.cpp", "autograd.cpp", "cuda/lspt_step_cuda.cu"]
# No -std: torch adds the standard its headers need (C++17 up to 2.13, C++20 from 2.14).
# -fopenmp: at::parallel_for in csrc/cpu runs on one thread without it (symbols resolve to torch's libgomp).
CXX_FLAGS = ["-O3"] + (["-fopenmp"] if sys.platform.startswith("linux") else [])
NVCC_FLAGS = ["-O3", "--use_fast_math", "-lineinfo"]
DEFAULT_CUDA_ARCHS = "8.0;9.0"        # without TORCH_CUDA_ARCH_LIST and without a visible GPU
# TORCH_CUDA_ARCH_LIST's architecture names (as torch's cpp_extension reads them).
NAMED_CUDA_ARCHS = {"Volta": "7.0", "Turing": "7.5", "Ampere": "8.0;8.6", "Ada": "8.9", "Hopper": "9.0",
                    "Blackwell": "10.0;12.0"}
SOURCE_SUFFIXES = (".cpp", ".cc", ".h", ".hpp", ".cu", ".cuh")
BUILD_LINE = {"cpu": "lspt_kernels: building the C++ step kernels, once, about a minute",
              "cuda": "lspt_kernels: building the CUDA step kernels, once, a few minutes"}


def cuda_arch_list(spec: str | None = None) -> list[str]:
    """The CUDA architectures to build, e.g. ["8.0", "9.0+PTX"]: `spec`, else TORCH_CUDA_ARCH_LIST
    ("8.0;9.0", "8.6 9.0+PTX", "Ampere;Hopper"), else the visible GPUs' (clamped to what this torch
    supports), else DEFAULT_CUDA_ARCHS; the newest always also as PTX."""
    spec = spec if spec is not None else os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if spec.strip() and spec.strip() != "native":
        archs = _parse_arch_list(spec)
    else:
        archs = _visible_gpu_archs() or _parse_arch_list(DEFAULT_CUDA_ARCHS)
    archs = sorted(set(archs), key=_arch_key)
    if not any(a.endswith("+PTX") for a in archs):
        archs[-1] += "+PTX"
    return archs


def _arch_key(arch: str) -> tuple:
    major, minor = arch.split("+")[0].rstrip("af").split(".")
    return int(major), int(minor), arch


def _parse_arch_list(spec: str) -> list[str]:
    out = []
    for word in spec.replace(";", " ").split():
        ptx = word.endswith("+PTX")
        base = word[:-4] if ptx else word
        expanded = NAMED_CUDA_ARCHS.get(base, base).split(";")
        for arch in expanded:
            parts = arch.rstrip("af").split(".")
            if len(parts) != 2 or not all(p.isdigit() for p in parts):
                raise ValueError(f"TORCH_CUDA_ARCH_LIST: {word!r} is not an architecture: expected entries like "
                                 f"8.0, 9.0a or 8.6+PTX, or one of {sorted(NAMED_CUDA_ARCHS)}, separated by ';'")
            out.append(arch)
        if ptx:
            out[-1] += "+PTX"
    return out


def _visible_gpu_archs() -> list[str]:
    import torch
    if not torch.cuda.is_available():
        return []
    supported = [int(a.split("_")[1]) for a in torch.cuda.get_arch_list() if a.startswith("sm_")
                 and a.split("_")[1].isdigit()]
    newest = max(((sm // 10, sm % 10) for sm in supported), default=(99, 9))
    return sorted({"%d.%d" % min(torch.cuda.get_device_capability(i), newest)
                   for i in range(torch.cuda.device_count())})


def cuda_arch_flags(archs: list[str] | None = None) -> list[str]:
    """nvcc -gencode flags for `archs` (default: cuda_arch_list()): SASS for each, PTX where "+PTX"."""
    flags = []
    for arch in archs if archs is not None else cuda_arch_list():
        base = arch.split("+")[0].replace(".", "")
        flags.append(f"-gencode=arch=compute_{base},code=sm_{base}")
        if arch.endswith("+PTX"):
            ptx = base.rstrip("af")
            flags.append(f"-gencode=arch=compute_{ptx},code=compute_{ptx}")
    return flags


def compile_flags(kind: str) -> dict[str, list[str]]:
    """The compile and link flags of extension `kind` ("cpu" or "cuda"), for setup.py and the JIT."""
    if kind == "cpu":
        return dict(cxx=list(CXX_FLAGS), nvcc=[], ld=[f for f in CXX_FLAGS if f == "-fopenmp"])
    if kind == "cuda":
        return dict(cxx=CXX_FLAGS + ["-DLSPT_WITH_CUDA"],
                    nvcc=NVCC_FLAGS + ["-DLSPT_WITH_CUDA"] + cuda_arch_flags(),
                    ld=[f for f in CXX_FLAGS if f == "-fopenmp"])
    raise ValueError(f"extension kind must be 'cpu' or 'cuda', got {kind!r}")


def source_hash(kind: str, csrc: Path | None = None) -> str | None:
    """Hash of every source file under csrc/ (path and bytes) and of `kind`'s flags; None without csrc/."""
    csrc = Path(csrc or CSRC)
    if not csrc.is_dir():
        return None
    h = hashlib.sha256(f"kind={kind}\n".encode())
    for key, flags in sorted(compile_flags(kind).items()):
        h.update(f"{key}={' '.join(flags)}\n".encode())
    for path in sorted(p for p in csrc.rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES):
        rel = path.relative_to(csrc).as_posix()
        h.update(f"{rel}\0{path.stat().st_size}\0".encode())
        h.update(path.read_bytes())
    return "h" + h.hexdigest()[:16]


def torch_tag() -> str:
    """Hash of what a binary extension is tied to: this torch build, the Python ABI, the machine."""
    import torch
    parts = [torch.__version__, str(torch.version.cuda), str(getattr(torch.version, "git_version", "")),
             str(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", "")), sys.implementation.cache_tag or "",
             str(sysconfig.get_config_var("EXT_SUFFIX")), platform.machine(), sys.platform]
    return "t" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def build_defines(kind: str, csrc: Path | None = None) -> list[str]:
    """-D flags that compile the build ID into the binary (csrc/bindings.cpp exposes them)."""
    return [f"-DLSPT_SOURCE_HASH={source_hash(kind, csrc) or 'unknown'}", f"-DLSPT_TORCH_TAG={torch_tag()}"]


def build_id(kind: str) -> str:
    return hashlib.sha256(f"{source_hash(kind)}/{torch_tag()}".encode()).hexdigest()[:16]


_cache: dict[str, object] = {}


def load_extension(kind: str):
    """The extension module for kind "cpu" or "cuda"; raises with the reason if it cannot load."""
    if kind in _cache:
        return _cache[kind]
    name = f"_lspt_{kind}"
    module, why_not = _prebuilt(kind, name)
    if module is None:
        module = _jit(kind, name, why_not)
    _cache[kind] = module
    return module


def _prebuilt(kind: str, name: str):
    """(module, None) for a prebuilt that matches these sources and this torch; else (None, why)."""
    try:
        module = importlib.import_module(f"lspt_kernels.{name}")  # built by setup.py
    except ImportError:
        return None, None
    where = getattr(module, "__file__", name)
    built_for, built_from = getattr(module, "torch_tag", None), getattr(module, "source_hash", None)
    if built_for is not None and built_for != torch_tag():
        return None, f"the prebuilt {where} was built against another torch"
    expected = source_hash(kind)
    if expected is None:            # a wheel: no sources to compare with, the prebuilt is the build
        return module, None
    if built_from is None:
        return None, f"the prebuilt {where} records no source hash (built by an older setup.py)"
    if built_from != expected:
        return None, f"the prebuilt {where} was built from other sources"
    return module, None


def _load_so(module_name: str, path: Path):
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Lock:
    """An exclusive advisory lock on a file (released when the process exits, even on a crash)."""

    def __init__(self, path: Path):
        self.path, self.file = path, None

    def __enter__(self):
        self.file = open(self.path, "a+")
        try:
            import fcntl
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - Windows: the temp dir + rename still keeps builds whole
            pass
        return self

    def __exit__(self, *exc):
        self.file.close()      # closing releases the flock


def toolchain(kind: str) -> dict:
    """What a build of `kind` compiles with: the C++ compiler (CXX), and nvcc's CUDA_HOME for CUDA."""
    from torch.utils import cpp_extension
    cxx = os.environ.get("CXX", "c++")
    tools = dict(cxx=shutil.which(cxx) or cxx)
    if kind == "cuda":
        tools["cuda_home"] = str(cpp_extension.CUDA_HOME)
    return tools


def cuda_toolkit_problem() -> str | None:
    """Why nvcc cannot build the CUDA extension for this torch (None when it can): no toolkit, or an
    nvcc of another CUDA major version than torch was built with."""
    import torch
    from torch.utils import cpp_extension
    home = cpp_extension.CUDA_HOME
    nvcc = Path(home, "bin", "nvcc") if home else None
    if nvcc is None or not nvcc.is_file():
        return ("no CUDA toolkit: nvcc not found" + (f" under CUDA_HOME={home}" if home else "")
                + " (install one matching torch's CUDA, or set CUDA_HOME)")
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is not a CUDA build"
    try:
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{nvcc} --version failed: {exc}"
    found = re.search(r"release (\d+)\.(\d+)", out)
    if found is None:
        return f"cannot read the CUDA version from {nvcc} --version: {out.strip()[:200]!r}"
    if found.group(1) != torch.version.cuda.split(".")[0]:
        return (f"{nvcc} is CUDA {found.group(1)}.{found.group(2)} but torch {torch.__version__} was built with "
                f"CUDA {torch.version.cuda}: the major versions must match")
    return None


def _remembered_failure(marker: Path, kind: str) -> str | None:
    """The recorded reason of an earlier failed build of this ID with this toolchain, else None."""
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if record.get("toolchain") != toolchain(kind):
        return None                 # another compiler or toolkit now: worth another try
    return (f"{record.get('reason', 'the build failed')} (remembered from an earlier build of these sources "
            f"in {marker}; delete that file to try again)")


def _remember_failure(marker: Path, kind: str, reason: str, log: str = "") -> None:
    tmp = marker.with_name(marker.name + f".{os.getpid()}")
    tmp.write_text(json.dumps(dict(reason=reason, toolchain=toolchain(kind), time=time.time(), log=log[-20000:]),
                              indent=1))
    os.replace(tmp, marker)


def short_build_error(exc: BaseException) -> str:
    """One line of a (compiler-log) exception: its first line and the first line naming an error."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    first = f"{type(exc).__name__}: {lines[0] if lines else ''}"[:200]
    error = next((ln for ln in lines[1:] if "error" in ln.lower() and not ln.startswith("FAILED")), None)
    return first + (f" ... {error[:200]}" if error else "")


def _jit(kind: str, name: str, why_not_prebuilt: str | None = None):
    from torch.utils import cpp_extension

    sources = CPU_SOURCES if kind == "cpu" else CUDA_SOURCES
    missing = [s for s in sources if not (CSRC / s).is_file()]
    if missing:
        raise RuntimeError(f"cannot JIT-build {name}: sources not found under {CSRC}: {missing} "
                           "(install from a checkout with `pip install -e .`, or prebuild it)"
                           + (f"; {why_not_prebuilt}" if why_not_prebuilt else ""))
    jit_name = f"{name}_{build_id(kind)}"
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())
    root.mkdir(parents=True, exist_ok=True)
    final = root / jit_name
    so = final / f"{jit_name}{cpp_extension.LIB_EXT}"
    marker = root / f"{jit_name}.failed"
    if so.is_file():
        return _load_so(jit_name, so)
    failed = _remembered_failure(marker, kind)
    if failed:
        raise RuntimeError(failed)
    with _Lock(root / f"{jit_name}.lock"):
        if so.is_file():                       # another process built it while we waited
            return _load_so(jit_name, so)
        failed = _remembered_failure(marker, kind)
        if failed:                             # ... or failed to: no second try
            raise RuntimeError(failed)
        problem = cuda_toolkit_problem() if kind == "cuda" else None
        if problem:
            _remember_failure(marker, kind, problem)
            raise RuntimeError(problem)
        print(BUILD_LINE[kind] + (f" ({why_not_prebuilt})" if why_not_prebuilt else ""), file=sys.stderr,
              flush=True)
        try:
            module = _build_into(kind, jit_name, sources, root, final)
        except Exception as exc:
            reason = f"the {kind} extension failed to build: {short_build_error(exc)} (full log in {marker})"
            _remember_failure(marker, kind, reason, log=str(exc))
            raise RuntimeError(reason) from exc
        marker.unlink(missing_ok=True)
    return module


def _build_into(kind: str, jit_name: str, sources: list[str], root: Path, final: Path):
    """Compile into a temporary directory, renamed to `final` only when complete."""
    from torch.utils import cpp_extension
    flags = compile_flags(kind)
    defines = build_defines(kind)
    tmp = Path(tempfile.mkdtemp(prefix=f"{jit_name}.tmp-", dir=root))
    try:
        kwargs = dict(name=jit_name, sources=[str(CSRC / s) for s in sources], build_directory=str(tmp),
                      extra_include_paths=[str(CSRC)], extra_cflags=flags["cxx"] + defines,
                      extra_ldflags=flags["ld"], verbose=False)
        if kind == "cuda":
            kwargs.update(extra_cuda_cflags=flags["nvcc"] + defines)
        module = cpp_extension.load(**kwargs)
        if final.exists():                 # a build from before the lock existed: replace it
            shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)              # atomic: a reader sees no build or a whole one
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return module
