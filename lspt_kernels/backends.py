"""The fused step's backends: their names, how each is loaded, and which one a call gets.

    "eager"   plain PyTorch (lspt_kernels/eager.py), every device; "reference" is an accepted alias
    "cpu"     C++ (csrc/cpu), CPU tensors
    "cuda"    CUDA C++ (csrc/cuda), CUDA tensors
    "triton"  Triton (lspt_kernels/triton_kernels.py), CUDA tensors (CPU tensors under the
              interpreter, TRITON_INTERPRET=1: a test tool)
    "auto"    the first of AUTO_ORDER[device type] that loads; "eager" (one warning) if none does

How the dispatcher reaches each one (the ops are `lspt::step_fwd` / `lspt::step_bwd` and the grouped,
inference-only `lspt::grouped_step`, ops.py; the same way for all three):
- cpu / cuda: loading the C++ extension (lspt_kernels/_build.py) registers, for its device's
  dispatch keys, the kernels (which route by the op's `backend` argument) and the autograd
  (AutogradCPU / AutogradCUDA, a torch::autograd::Function): eager mode runs no Python per step.
- triton: Triton launches are Python by nature. The launchers are registered below as the internal
  ops `lspt::triton_step_fwd` / `triton_step_bwd` / `triton_grouped_step`, which the C++ kernels call through the
  dispatcher for backend "triton"; the autograd is C++ there too when the extension of the device is
  loaded (on a machine without nvcc the Python registrations of ops.py serve it).
- Before an extension is loaded, and where none can be built, ops.py's Python registrations serve
  the op: a CompositeExplicitAutograd kernel that loads the named backend and dispatches again, and
  the autograd formula at the Autograd alias key. The extension registers the device-specific keys,
  which take precedence, so no registration is ever overridden and a direct `torch.ops.lspt.*` call
  (or a reloaded torch.export graph) loads its backend by itself.
"""
from __future__ import annotations

import os
import warnings

import torch

from .precision import autocast_off

BACKENDS = ("eager", "cpu", "triton", "cuda")
ALIASES = {"reference": "eager"}
FUSED_BACKENDS = ("cpu", "triton", "cuda")
# What "auto" tries, in order, per device type. A backend belongs here only if it is at least as
# fast as eager there: deleting it from its tuple stops "auto" from picking it.
AUTO_ORDER = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}
# Backends whose forward saves the activated gates for backward (the others recompute them).
SAVES_GATES = ("cpu",)

_loaded: set[str] = set()
_unavailable: dict[str, str] = {}
_warned_auto: set[str] = set()


def canonical(backend: str) -> str:
    """The backend's name ("auto" or one of BACKENDS; the alias mapped), else a ValueError."""
    name = ALIASES.get(backend, backend) if isinstance(backend, str) else backend
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS} (or the alias 'reference' for 'eager'), "
                         f"got {backend!r}")
    return name


def load(name: str) -> bool:
    """Load a fused backend once per process (building the C++ extension on first use); False, with
    the reason kept for `unavailable_reason`, when it cannot run here."""
    if name in _loaded:
        return True
    if name in _unavailable:
        return False
    try:
        if name in ("cpu", "cuda"):
            if name == "cuda" and not torch.cuda.is_available():
                raise RuntimeError("no CUDA device is visible to torch")
            from . import _build
            _build.load_extension(name)
        elif name == "triton":
            from . import triton_kernels  # noqa: F401 - importing it is loading it
        else:
            raise ValueError(f"{name!r} is not a fused backend {FUSED_BACKENDS}")
    except Exception as exc:  # a missing compiler or toolkit must not break the package
        _unavailable[name] = f"{type(exc).__name__}: {exc}"
        return False
    _loaded.add(name)
    return True


def unavailable_reason(name: str) -> str | None:
    """Why a backend cannot run here (None when it can)."""
    name = ALIASES.get(name, name)
    if name == "eager":
        return None
    load(name)
    return _unavailable.get(name)


def device_mismatch(name: str, device: torch.device) -> str | None:
    """Why fused backend `name` cannot take tensors on `device` (None when it can)."""
    if name == "cpu" and device.type != "cpu":
        return f"backend 'cpu' needs CPU tensors, got tensors on {device}"
    if name == "cuda" and device.type != "cuda":
        return f"backend 'cuda' needs CUDA tensors, got tensors on {device}"
    if name == "triton" and device.type != "cuda" and not (device.type == "cpu" and triton_interpreted()):
        return (f"backend 'triton' needs CUDA tensors, got tensors on {device} (set TRITON_INTERPRET=1 to run "
                "Triton on the CPU)")
    return None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve(backend: str, device: torch.device) -> str:
    """The backend a call on `device` runs: "auto" mapped by AUTO_ORDER (loading what it tries), an
    alias to its name; a named fused backend must run there (else ValueError / RuntimeError)."""
    name = canonical(backend)
    if device.type == "meta":   # shapes only: the op's fake kernel, which loads nothing
        return "eager" if name == "auto" else name
    if name == "auto":
        order = AUTO_ORDER.get(device.type, ())
        for candidate in order:
            if load(candidate):
                return candidate
        if order and device.type not in _warned_auto:
            _warned_auto.add(device.type)
            why = "; ".join(f"{n}: {_unavailable.get(n)}" for n in order)
            warnings.warn(f"lspt_kernels: no fused backend for {device.type} tensors ({why}); using the eager "
                          "(pure-PyTorch) step", RuntimeWarning, stacklevel=3)
        return "eager"
    if name == "eager":
        return name
    mismatch = device_mismatch(name, device)
    if mismatch:
        raise ValueError(f"lspt_step: {mismatch}")
    if not load(name):
        raise RuntimeError(f"lspt_step: backend {name!r} is not available here: {_unavailable[name]}")
    return name


# ----------------------------------------------------------------------------------------------
# Triton's entry points in the dispatcher (see the module docstring). Called below autograd with
# validated inputs; the launchers live in triton_kernels.py, imported on the first call.
# ----------------------------------------------------------------------------------------------
_lib = torch.library.Library("lspt", "FRAGMENT")
_lib.define("triton_step_fwd(Tensor tokens, Tensor cell, Tensor gate_bias, Tensor weight_hh, int num_prefix_tokens, "
            "bool save_gates) -> (Tensor, Tensor, Tensor, Tensor)")
_lib.define("triton_step_bwd(Tensor grad_hidden, Tensor grad_cell, Tensor xhat, Tensor cell, Tensor gate_bias, "
            "Tensor weight_hh, Tensor gates, int num_prefix_tokens, int num_tokens) "
            "-> (Tensor, Tensor, Tensor, Tensor)")
_lib.define("triton_grouped_step(Tensor tokens, Tensor cell, Tensor gate_bias, Tensor weight_hh, Tensor offsets, "
            "int num_prefix_tokens) -> (Tensor, Tensor)")


def _triton():
    if not load("triton"):
        raise RuntimeError(f"lspt_step: backend 'triton' is not available here: {_unavailable['triton']}")
    from . import triton_kernels
    return triton_kernels


def triton_forward(tokens, cell, gate_bias, weight_hh, num_prefix_tokens, save_gates):
    """The Triton forward (the op contract's `forward`); loads Triton on the first call."""
    kernels = _triton()
    with autocast_off(tokens.device.type):
        return kernels.forward(tokens, cell, gate_bias, weight_hh, num_prefix_tokens, save_gates)


def triton_backward(grad_hidden, grad_cell, xhat, cell, gate_bias, weight_hh, gates, num_prefix_tokens, num_tokens):
    """The Triton backward (the op contract's `backward`)."""
    kernels = _triton()
    with autocast_off(grad_hidden.device.type):
        return kernels.backward(grad_hidden, grad_cell, xhat, cell, gate_bias, weight_hh, gates,
                                num_prefix_tokens, num_tokens)


def triton_grouped_forward(tokens, cell, gate_bias, weight_hh, offsets, num_prefix_tokens):
    """The Triton grouped step (ops.grouped_step's contract)."""
    kernels = _triton()
    with autocast_off(tokens.device.type):
        return kernels.grouped_forward(tokens, cell, gate_bias, weight_hh, offsets, num_prefix_tokens)


_lib.impl("triton_step_fwd", triton_forward, "CompositeExplicitAutograd")
_lib.impl("triton_grouped_step", triton_grouped_forward, "CompositeExplicitAutograd")
_lib.impl("triton_step_bwd", triton_backward, "CompositeExplicitAutograd")
