"""lspt-kernels: package metadata; builds the C++/CUDA extension ahead of time only when asked.

    pip install -e .                                   # pure Python; kernels JIT-build with ninja on first use
    LSPT_BUILD_CPU=1 pip install --no-build-isolation -e .    # also build the C++ CPU extension now
    LSPT_BUILD_CUDA=1 pip install --no-build-isolation -e .   # also build the CUDA extension now
    TORCH_CUDA_ARCH_LIST="9.0" ...                     # architectures (default: the GPUs present, else 8.0;9.0),
                                                       # always with PTX of the newest

The CUDA extension is also built when LSPT_BUILD_CUDA is unset, torch is importable in the build
environment and a GPU and nvcc are present; LSPT_BUILD_CUDA=0 skips it. Without torch in the build
environment (pip's default isolation) nothing is compiled here and nothing can break the install.
"""
import importlib.util
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _flag(name):
    return os.environ.get(name, "").strip().lower()


def _extensions():
    want_cpu, want_cuda = _flag("LSPT_BUILD_CPU") in ("1", "true"), _flag("LSPT_BUILD_CUDA")
    if not want_cpu and want_cuda in ("", "0", "false") and importlib.util.find_spec("torch") is None:
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        if want_cpu or want_cuda in ("1", "true"):
            sys.exit("LSPT_BUILD_CPU/LSPT_BUILD_CUDA need torch in the build environment: "
                     "pip install torch first, then pip install --no-build-isolation -e .")
        return [], {}
    # The source lists and flags live in the package so the JIT build compiles the same thing.
    spec = importlib.util.spec_from_file_location("_lspt_build", ROOT / "lspt_kernels" / "_build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    rel = lambda files: [os.path.join("csrc", f) for f in files]  # noqa: E731
    exts = []
    # The build ID goes into the binary, so the loader can refuse it once the sources or torch change.
    # The two extensions register different dispatch keys (csrc/bindings.cpp): both may be built.
    if want_cpu:
        flags = build.compile_flags("cpu")
        exts.append(cpp_extension.CppExtension(
            "lspt_kernels._lspt_cpu", rel(build.CPU_SOURCES), include_dirs=[str(ROOT / "csrc")],
            extra_compile_args={"cxx": flags["cxx"] + build.build_defines("cpu")},
            extra_link_args=flags["ld"]))
    auto_cuda = want_cuda == "" and torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
    if want_cuda in ("1", "true") or auto_cuda:
        if cpp_extension.CUDA_HOME is None:
            sys.exit("LSPT_BUILD_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME (e.g. /usr/local/cuda)")
        flags, defines = build.compile_flags("cuda"), build.build_defines("cuda")
        exts.append(cpp_extension.CUDAExtension(
            "lspt_kernels._lspt_cuda", rel(build.CUDA_SOURCES), include_dirs=[str(ROOT / "csrc")],
            extra_compile_args={"cxx": flags["cxx"] + defines, "nvcc": flags["nvcc"] + defines},
            extra_link_args=flags["ld"]))
    return exts, ({"build_ext": cpp_extension.BuildExtension} if exts else {})


ext_modules, cmdclass = _extensions()

setup(
    name="lspt-kernels",
    version="0.1.0",
    description="Long-term Spatial Prompt Tuning for timm ViTs with fused Triton/CUDA/C++ kernels",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lspt_kernels", "lspt_kernels.*"]) + ["lspt_reference"],
    package_dir={"lspt_kernels": "lspt_kernels", "lspt_reference": "python/lspt_reference"},
    install_requires=["torch>=2.4", "timm>=1.0", "triton; platform_system == 'Linux'", "ninja", "pybind11",
                      "safetensors", "numpy", "matplotlib", "torchvision", "tqdm", "Pillow"],
    extras_require={"test": ["pytest", "pytest-benchmark", "hypothesis", "ruff", "submitit"], "sweep": ["submitit"]},
    entry_points={"console_scripts": ["lspt-bench = lspt_kernels.bench.cli:main",
                                      "lspt-train = lspt_kernels.train:main",
                                      "lspt-eval = lspt_kernels.evaluate:main",
                                      "lspt-viz = lspt_kernels.viz:main",
                                      "lspt-sweep = lspt_kernels.sweep.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
