"""The extension loader (lspt_kernels/_build.py): build IDs, stale prebuilt binaries, one build per ID.

The fast tests check the build ID and the prebuilt decision with stand-in modules. The last test does
real JIT builds (a minute or two each, on two cores): two copies of the package (lspt_kernels + csrc)
with the same sources and a third with one changed byte, imported alternately in fresh processes with
one TORCH_EXTENSIONS_DIR. Each distinct source builds once, says so in one line, and is never rebuilt.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from lspt_kernels import _build

ROOT = Path(__file__).resolve().parent.parent


def _copy_sources(dst: Path) -> Path:
    shutil.copytree(_build.CSRC, dst / "csrc")
    return dst / "csrc"


def test_source_hash_follows_every_source_and_flag(tmp_path, monkeypatch):
    csrc = _copy_sources(tmp_path)
    base = _build.source_hash("cpu", csrc)
    assert base == _build.source_hash("cpu") and base.startswith("h")
    assert _build.source_hash("cuda", csrc) != base               # other flags and defines
    header = csrc / "cpu" / "lspt_step_cpu.h"
    header.write_text(header.read_text() + "\n// changed\n")     # a header counts, not only .cpp
    assert _build.source_hash("cpu", csrc) != base
    monkeypatch.setattr(_build, "CXX_FLAGS", _build.CXX_FLAGS + ["-DSOMETHING"])
    assert _build.source_hash("cpu", _copy_sources(tmp_path / "again")) != base
    assert _build.source_hash("cpu", tmp_path / "missing") is None


def test_build_id_names_sources_and_torch(monkeypatch):
    first, tag = _build.build_id("cpu"), _build.torch_tag()
    assert first == _build.build_id("cpu") and first != _build.build_id("cuda")
    import torch
    monkeypatch.setattr(torch, "__version__", torch.__version__ + "+other")
    assert _build.torch_tag() != tag
    assert _build.build_id("cpu") != first                        # another torch: another build


@pytest.fixture
def fake_prebuilt(monkeypatch):
    """Install a stand-in `lspt_kernels._lspt_cpu` and capture what the JIT path would be asked."""
    calls = []
    monkeypatch.setattr(_build, "_cache", {})
    monkeypatch.setattr(_build, "_jit", lambda kind, name, why=None: calls.append(why) or "jit-built")

    def install(**attrs):
        module = types.ModuleType("lspt_kernels._lspt_cpu")
        module.__file__ = "/somewhere/_lspt_cpu.so"
        for k, v in attrs.items():
            setattr(module, k, v)
        monkeypatch.setitem(sys.modules, "lspt_kernels._lspt_cpu", module)
        return module
    return install, calls


def test_matching_prebuilt_is_loaded(fake_prebuilt):
    install, calls = fake_prebuilt
    module = install(source_hash=_build.source_hash("cpu"), torch_tag=_build.torch_tag())
    assert _build.load_extension("cpu") is module and calls == []


@pytest.mark.parametrize("attrs, why", [
    (dict(source_hash="h0000000000000000", torch_tag="this"), "built from other sources"),
    (dict(source_hash="these", torch_tag="t0000000000000000"), "built against another torch"),
    (dict(), "records no source hash"),                           # main's prebuilt before build IDs
], ids=["other-sources", "other-torch", "unrecorded"])
def test_stale_prebuilt_is_not_loaded(fake_prebuilt, attrs, why):
    install, calls = fake_prebuilt
    actual = {"this": _build.torch_tag(), "these": _build.source_hash("cpu")}
    install(**{k: actual.get(v, v) for k, v in attrs.items()})
    assert _build.load_extension("cpu") == "jit-built"
    assert len(calls) == 1 and why in calls[0]


def test_wheel_without_sources_trusts_a_prebuilt_for_this_torch_only(fake_prebuilt, monkeypatch, tmp_path):
    install, calls = fake_prebuilt
    monkeypatch.setattr(_build, "CSRC", tmp_path / "no-csrc")
    module = install(source_hash="h0000000000000000", torch_tag=_build.torch_tag())
    assert _build.load_extension("cpu") is module
    monkeypatch.setattr(_build, "_cache", {})
    install(source_hash="h0000000000000000", torch_tag="t0000000000000000")
    assert _build.load_extension("cpu") == "jit-built" and "another torch" in calls[0]


# ------------------------------------------------------------------------------------------------
# Real builds
# ------------------------------------------------------------------------------------------------
# Times the load alone (torch and timm are imported before the clock starts).
LOAD = ("import time; from lspt_kernels import _build; from torch.utils import cpp_extension; "
        "t = time.perf_counter(); m = _build.load_extension('cpu'); print('FILE', m.__file__); "
        "print('HASH', m.source_hash); print('SECONDS', time.perf_counter() - t)")


def _package_copy(dst: Path, change: bool = False) -> Path:
    shutil.copytree(ROOT / "lspt_kernels", dst / "lspt_kernels",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyd"))
    csrc = _copy_sources(dst)
    if change:
        header = csrc / "cpu" / "lspt_step_cpu.h"
        header.write_text(header.read_text() + "\n// a different build\n")
    return dst


def _load_in_subprocess(copy: Path, ext_dir: Path) -> tuple[bool, float, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(copy), TORCH_EXTENSIONS_DIR=str(ext_dir), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", LOAD], env=env, cwd=copy, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.split(" ", 1)[0] in
               ("FILE", "HASH", "SECONDS"))
    built = _build.BUILD_LINE["cpu"] in proc.stderr
    assert proc.stderr.count(_build.BUILD_LINE["cpu"]) <= 1
    return built, float(out["SECONDS"]), out["HASH"], proc.stderr


def test_alternating_copies_do_not_rebuild(tmp_path):
    from torch.utils import cpp_extension
    if shutil.which("ninja") is None and not cpp_extension.is_ninja_available():
        pytest.skip("ninja is not available: no JIT build here")
    ext_dir = tmp_path / "torch_extensions"
    a = _package_copy(tmp_path / "a")
    b = _package_copy(tmp_path / "b")                 # another checkout of the same sources
    c = _package_copy(tmp_path / "c", change=True)    # other sources
    expect = {a: _build.source_hash("cpu", a / "csrc"), c: _build.source_hash("cpu", c / "csrc")}
    expect[b] = expect[a]

    first = {}
    for copy, should_build in ((a, True), (b, False), (c, True)):
        built, seconds, hash_, stderr = _load_in_subprocess(copy, ext_dir)
        assert built == should_build, (copy.name, stderr[-2000:])
        assert hash_ == expect[copy]
        first[copy] = seconds
    for _round in range(2):
        for copy in (a, b, c):
            built, seconds, hash_, stderr = _load_in_subprocess(copy, ext_dir)
            assert not built, (copy.name, stderr[-2000:])
            assert hash_ == expect[copy]
            assert seconds < 10, (copy.name, seconds)   # a load, not a 35-43 s rebuild
    # one directory per build ID, no temporary directory left behind
    dirs = sorted(p.name for p in ext_dir.iterdir() if p.is_dir())
    assert len(dirs) == 2 and all(".tmp-" not in d for d in dirs), dirs


# ------------------------------------------------------------------------------------------------
# The JIT path's atomicity and lock, with a stand-in compiler (no real build)
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_compiler(tmp_path, monkeypatch):
    """cpp_extension.load replaced by one that 'builds' (writes the .so after a pause) and counts;
    loading a finished build is replaced by a stand-in that records the path."""
    from torch.utils import cpp_extension
    calls = {"build": [], "load": []}

    def load(name, sources, build_directory, **kw):
        calls["build"].append(build_directory)
        time.sleep(0.3)                                   # a window for a second process to race in
        if "fail" in calls:
            raise RuntimeError("compiler error")
        Path(build_directory, name + cpp_extension.LIB_EXT).write_bytes(b"\x7fELF fake")
        return types.SimpleNamespace(built_in=build_directory)

    monkeypatch.setattr(cpp_extension, "load", load)
    monkeypatch.setattr(_build, "_load_so", lambda name, path: calls["load"].append(path) or
                        types.SimpleNamespace(loaded_from=path))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    return calls, tmp_path / "ext"


def test_jit_builds_once_into_a_temporary_directory_then_renames(fake_compiler, capfd):
    calls, root = fake_compiler
    module = _build._jit("cpu", "_lspt_cpu")
    name = f"_lspt_cpu_{_build.build_id('cpu')}"
    assert len(calls["build"]) == 1 and Path(calls["build"][0]).name.startswith(name + ".tmp-")
    assert module.built_in == calls["build"][0]
    from torch.utils.cpp_extension import LIB_EXT
    assert (root / name / f"{name}{LIB_EXT}").is_file()
    assert [p.name for p in root.iterdir() if p.is_dir()] == [name]     # no temporary directory left
    assert capfd.readouterr().err.count(_build.BUILD_LINE["cpu"]) == 1
    # a second load: no build, no line, straight from the finished directory
    again = _build._jit("cpu", "_lspt_cpu")
    assert len(calls["build"]) == 1 and again.loaded_from.parent == root / name
    assert _build.BUILD_LINE["cpu"] not in capfd.readouterr().err


def test_concurrent_jit_builds_once(fake_compiler):
    """Two loaders at once (threads hold separate lock handles, like two processes): one builds, the
    other waits for the lock and loads the finished build."""
    import threading
    calls, root = fake_compiler
    results = []
    threads = [threading.Thread(target=lambda: results.append(_build._jit("cpu", "_lspt_cpu"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls["build"]) == 1 and len(calls["load"]) == 1 and len(results) == 2


def test_failed_jit_build_leaves_nothing_behind(fake_compiler):
    calls, root = fake_compiler
    calls["fail"] = True
    with pytest.raises(RuntimeError, match="compiler error"):
        _build._jit("cpu", "_lspt_cpu")
    assert [p for p in root.iterdir() if p.is_dir()] == []


# ------------------------------------------------------------------------------------------------
# CUDA architectures: TORCH_CUDA_ARCH_LIST, else the GPUs present, always PTX of the newest
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, archs", [
    ("8.0;9.0", ["8.0", "9.0+PTX"]),
    ("9.0 8.6+PTX", ["8.6+PTX", "9.0"]),
    ("Ampere;Hopper", ["8.0", "8.6", "9.0+PTX"]),
    ("9.0a", ["9.0a+PTX"]),
])
def test_cuda_arch_list_from_torch_cuda_arch_list(monkeypatch, spec, archs):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", spec)
    assert _build.cuda_arch_list() == archs


def test_cuda_arch_flags_carry_ptx_of_the_newest():
    assert _build.cuda_arch_flags(["8.0", "9.0+PTX"]) == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90"]
    assert _build.cuda_arch_flags(["9.0a+PTX"])[-1] == "-gencode=arch=compute_90,code=compute_90"


def test_cuda_arch_list_refuses_a_bad_entry(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;sm90")
    with pytest.raises(ValueError, match=r"TORCH_CUDA_ARCH_LIST: 'sm90' is not an architecture"):
        _build.cuda_arch_list()


def test_cuda_archs_of_the_gpus_present(monkeypatch):
    """No TORCH_CUDA_ARCH_LIST: the visible GPUs' architectures (one A100 and one newer-than-torch GPU,
    clamped to what this torch builds for), PTX of the newest; without a GPU sm_80 and sm_90."""
    import torch
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _build.cuda_arch_list() == ["8.0", "9.0+PTX"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: [(8, 0), (13, 5)][i])
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_80", "sm_90", "sm_120", "compute_120"])
    assert _build.cuda_arch_list() == ["8.0", "12.0+PTX"]


def test_arch_list_is_part_of_the_build_id(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    first = _build.build_id("cuda")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert _build.build_id("cuda") != first and _build.build_id("cpu") == _build.build_id("cpu")


# ------------------------------------------------------------------------------------------------
# A failed build is remembered by build ID: one reason, no retry in every process
# ------------------------------------------------------------------------------------------------
def _fake_tool(path: Path, log: Path, output: str, status: int) -> Path:
    """A stand-in compiler: answers --version (torch asks), logs every other call, prints `output`
    and exits with `status`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\nif [ "$1" = "--version" ] && [ {status} -ne 0 ]; then echo "fake 1.0"; exit 0; fi\n'
                    f'echo "$@" >> {log}\necho "{output}" {">&2" if status else ""}\nexit {status}\n')
    path.chmod(0o755)
    return path


def test_failed_cpu_build_is_remembered(tmp_path, monkeypatch):
    """A compiler error (a C++ compiler that always fails, real ninja build) is recorded beside the
    build; the next loads, in this process and in a fresh one, fail at once with the same reason
    and never run the compiler again; another compiler is tried."""
    from torch.utils import cpp_extension
    if shutil.which("ninja") is None and not cpp_extension.is_ninja_available():
        pytest.skip("ninja is not available: no JIT build here")
    log = tmp_path / "cxx.log"
    cxx = _fake_tool(tmp_path / "bin" / "fake-c++", log, "fake.cpp:1:1: error: this compiler always fails", 1)
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(_build, "_cache", {})
    with pytest.raises(RuntimeError, match="the cpu extension failed to build"):
        _build.load_extension("cpu")
    calls = log.read_text().count("\n")
    assert calls >= 1
    (marker,) = (tmp_path / "ext").glob("*.failed")
    with pytest.raises(RuntimeError, match=r"failed to build.*remembered from an earlier build"):
        _build.load_extension("cpu")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "python")]))
    proc = subprocess.run([sys.executable, "-c", "from lspt_kernels import backends; "
                           "print('WHY', backends.unavailable_reason('cpu'))"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert "remembered from an earlier build" in proc.stdout and str(marker) in proc.stdout, proc.stderr[-2000:]
    assert log.read_text().count("\n") == calls                    # no second compile, in any process
    other = _fake_tool(tmp_path / "bin" / "other-c++", tmp_path / "other.log", "error: also fails", 1)
    monkeypatch.setenv("CXX", str(other))
    with pytest.raises(RuntimeError, match="the cpu extension failed to build"):
        _build.load_extension("cpu")
    assert (tmp_path / "other.log").exists()                       # a new toolchain is worth a try


@pytest.mark.parametrize("nvcc_output, reason", [
    (None, "no CUDA toolkit: nvcc not found"),
    ("Cuda compilation tools, release 11.8, V11.8.89", "is CUDA 11.8 but torch .* was built with CUDA"),
], ids=["no-nvcc", "other-major-version"])
def test_unusable_cuda_toolkit_is_remembered(tmp_path, monkeypatch, nvcc_output, reason):
    import torch
    from torch.utils import cpp_extension
    if torch.version.cuda is None or torch.version.cuda.startswith("11."):
        pytest.skip("needs a CUDA build of torch whose CUDA major version is not 11")
    home = tmp_path / "cuda"
    log = tmp_path / "nvcc.log"
    if nvcc_output is not None:
        _fake_tool(home / "bin" / "nvcc", log, nvcc_output, 0)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(home))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    monkeypatch.setattr(_build, "_cache", {})
    with pytest.raises(RuntimeError, match=reason):
        _build.load_extension("cuda")
    calls = log.read_text() if log.exists() else ""
    with pytest.raises(RuntimeError, match=f"{reason}.*remembered from an earlier build"):
        _build.load_extension("cuda")
    assert (log.read_text() if log.exists() else "") == calls       # not even nvcc --version again
