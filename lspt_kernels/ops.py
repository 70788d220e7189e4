"""The fused LSPT step as one torch.library op.

`lspt_step` is the LSPT step after block l < L (docs/method.md, "One step, written out"):

    Xhat_SP = tokens[:, k:k+Np] + tokens[:, k+Np:].mean(1)           (CSPC, eq. 5)
    hidden, new_cell = LSTMCell(input=prompt, (Xhat_SP, cell))       (LPC, eq. 7)

Its gates split into a batch-independent half and the one large product:

    gates = gate_bias + Xhat_SP W_hh^T,    gate_bias = prompt W_ih^T + b_ih + b_hh   (Np, 4D)

`gate_bias` depends on no image, so the encoder computes it for all L - 1 steps with ONE GEMM per
forward (its backward is one GEMM for dW_ih and one for dP, done by autograd) and the step op only
takes (tokens, cell, gate_bias, W_hh). With per-image prompt dropout the prompts, hence the gate bias
rows, differ per image: the op takes gate_bias as (Np, 4D) or (B, Np, 4D).

Backends
--------
- "eager" (alias "reference"): plain PyTorch ops, differentiated by eager autograd. It is what the
  benchmarks call "eager" and what every other backend is compared with.
- "cpu" (C++, csrc/cpu), "triton" (GPU), "cuda" (CUDA C++, csrc/cuda): one registered op
  `lspt::step_fwd` with a fused forward, and `lspt::step_bwd` with a fused backward. The GPU backends
  recompute the gates from Xhat_SP and the incoming cell (the only activations they save); the cpu
  backend saves the activated gates instead (SAVES_GATES), which skips the recompute GEMM and still
  keeps less than eager autograd saves.

Kernel contract (what every backend's forward/backward receives; the op bodies pass it on as is):

    forward(tokens (B,T,D) [stride(-1) == 1], cell (B,Np,D) contiguous,
            gate_bias (Np,4D) or (B,Np,4D) contiguous W, w_hh (4D,D) contiguous W, k, save_gates)
        -> hidden (B,Np,D) tokens.dtype, new_cell (B,Np,D) cell.dtype, xhat (B,Np,D) W,
           gates: the activated gates (B,Np,4D) in the accumulation dtype when the backend saves
           them (SAVES_GATES) and save_gates is true, else an empty (0,) tensor
    backward(grad_hidden (B,Np,D) tokens.dtype, grad_cell (B,Np,D) cell.dtype, xhat, cell,
             gate_bias, w_hh, gates, k, T)
        -> grad_tokens (B,T,D) grad_hidden.dtype, grad_cell (cell.dtype), grad_gate_bias (gate_bias's
           shape, W), grad_w_hh (W)

dtypes: gate_bias and w_hh share one dtype W (the GEMM precision). Either every tensor is W, or the
cell is fp32 (the cell state is carried in fp32), or additionally tokens are fp32 with W
low-precision (torch.autocast). Means and gate math are always computed in fp32 (fp64 for fp64).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("eager", "cpu", "triton", "cuda")
ALIASES = {"reference": "eager"}          # the old name of "eager", still accepted
FUSED_BACKENDS = ("cpu", "triton", "cuda")
# What "auto" tries, in order, for tensors on a device type; "eager" when none is available. A backend
# belongs here only if it is at least as fast as eager there (issue 9, item 7): to stop "auto" from
# picking one, delete it from its tuple (e.g. AUTO_ORDER["cpu"] = ()).
AUTO_ORDER = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}
# Backends whose forward saves the activated gates for backward instead of recomputing them.
SAVES_GATES = ("cpu",)
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class Kernels(NamedTuple):
    forward: Callable
    backward: Callable


# ----------------------------------------------------------------------------------------------
# Eager: the step written with plain PyTorch ops (eager autograd differentiates it).
# ----------------------------------------------------------------------------------------------
def gate_bias_rows(prompt: Tensor, weight_ih: Tensor, bias_ih: Tensor, bias_hh: Tensor) -> Tensor:
    """prompt W_ih^T + b_ih + b_hh: the batch-independent half of the gates, (..., Np, 4D) in W."""
    return F.linear(prompt, weight_ih, bias_ih) + bias_hh


def step_eager(tokens: Tensor, cell: Tensor, gate_bias: Tensor, weight_hh: Tensor,
               num_prefix_tokens: int = 1) -> tuple[Tensor, Tensor]:
    """The step from its gate bias rows ((Np, 4D) or (B, Np, 4D)), in plain PyTorch."""
    k, n_p = num_prefix_tokens, cell.shape[1]
    w = weight_hh.dtype
    acc = torch.promote_types(tokens.dtype, torch.float32)   # means and gate math in >= fp32
    mean = tokens[:, k + n_p:].mean(1, keepdim=True, dtype=acc)                # (B, 1, D)
    xhat = (tokens[:, k:k + n_p].to(acc) + mean).to(w)                        # (B, Np, D)
    gates = (F.linear(xhat, weight_hh) + gate_bias).to(acc)                   # (B, Np, 4D)
    i, f, g, o = gates.chunk(4, dim=-1)
    new_cell = torch.sigmoid(f) * cell.to(acc) + torch.sigmoid(i) * torch.tanh(g)
    hidden = torch.sigmoid(o) * torch.tanh(new_cell)
    return hidden.to(tokens.dtype), new_cell.to(cell.dtype)


def step_reference(tokens: Tensor, cell: Tensor, prompt: Tensor, weight_ih: Tensor,
                   weight_hh: Tensor, bias_ih: Tensor, bias_hh: Tensor,
                   num_prefix_tokens: int = 1) -> tuple[Tensor, Tensor]:
    """The step (docs/method.md) with plain PyTorch ops, from the prompt and all four LSTM tensors."""
    return step_eager(tokens, cell, gate_bias_rows(prompt, weight_ih, bias_ih, bias_hh), weight_hh,
                      num_prefix_tokens)


# ----------------------------------------------------------------------------------------------
# Backend registry. Each backend module registers (forward, backward) implementing the contract.
# ----------------------------------------------------------------------------------------------
_KERNELS: dict[str, Kernels] = {}
_UNAVAILABLE: dict[str, str] = {}


def _load_backend(name: str) -> Kernels | None:
    """Import a backend lazily (building the C++ extension on first use); None if unavailable."""
    if name in _KERNELS:
        return _KERNELS[name]
    if name in _UNAVAILABLE:
        return None
    try:
        if name == "cpu":
            from . import _build
            ext = _build.load_extension("cpu")
            kernels = Kernels(ext.cpu_forward, ext.cpu_backward)
        elif name == "cuda":
            from . import _build
            if not torch.cuda.is_available():
                raise RuntimeError("no CUDA device is visible to torch")
            ext = _build.load_extension("cuda")
            kernels = Kernels(ext.cuda_forward, ext.cuda_backward)
        elif name == "triton":
            from . import triton_kernels
            kernels = Kernels(triton_kernels.forward, triton_kernels.backward)
        else:
            raise ValueError(name)
    except Exception as exc:  # a missing compiler or toolkit must not break the package
        _UNAVAILABLE[name] = f"{type(exc).__name__}: {exc}"
        return None
    _KERNELS[name] = kernels
    return kernels


def unavailable_reason(name: str) -> str | None:
    """Why a backend cannot run here (None when it can)."""
    name = ALIASES.get(name, name)
    if name == "eager":
        return None
    _load_backend(name)
    return _UNAVAILABLE.get(name)


def _check_op_backend(backend: str, fn: str) -> None:
    if backend not in FUSED_BACKENDS:
        raise ValueError(f"{fn}: backend must be one of {FUSED_BACKENDS} (the fused kernels; the "
                         f"plain-PyTorch step is lspt_step(..., backend='eager')), got {backend!r}")


def _kernels_for_op(backend: str, fn: str) -> Kernels:
    """The op bodies' own loader: a direct torch.ops.lspt.* call, or a graph exported and reloaded in
    a fresh process, runs without lspt_step having loaded the backend first."""
    kernels = _KERNELS.get(backend)
    if kernels is None:
        _check_op_backend(backend, fn)
        kernels = _load_backend(backend)
        if kernels is None:
            raise RuntimeError(f"{fn}: backend {backend!r} is not available here: {_UNAVAILABLE[backend]}")
    return kernels


def autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled for any device type: False where autocast does not exist (meta)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # "unknown device type for autocast" (meta and other non-compute devices)
        return False


def _autocast_off(device_type: str):
    """A context that keeps autocast from re-casting inside a step whose dtypes are already chosen;
    a no-op (and no context cost on the hot path) where autocast is not on."""
    if autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _triton_runs_on(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


_warned_fallback: set = set()


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None,
                    width: int | None = None) -> str:
    """Map "auto" to the fastest backend for `device` (AUTO_ORDER) and an alias to its name; check
    that a named backend can run there. Called once per forward (encoder) or per lspt_step call.
    Given the GEMM dtype (and the width D), a fused GPU backend must also pass its once-per-process
    self-check against the eager step (lspt_kernels/selfcheck.py), else the next backend is used, with
    a warning. Inside torch.func transforms the eager step runs (the op's autograd cannot)."""
    name = _resolve_backend(backend, device)
    if name == "eager" or _under_func_transform():
        return "eager"
    if dtype is not None and device.type != "meta":
        from . import selfcheck
        name = selfcheck.ensure(name, device, dtype, width)
    return name


def _resolve_backend(backend: str, device: torch.device) -> str:
    backend = ALIASES.get(backend, backend) if isinstance(backend, str) else backend
    if device.type == "meta":
        return _resolve_meta(backend)
    if backend == "auto":
        order = AUTO_ORDER.get(device.type, ())
        for name in order:
            if _load_backend(name) is not None:
                return name
        if order and device.type not in _warned_fallback:
            _warned_fallback.add(device.type)
            why = "; ".join(f"{n}: {_UNAVAILABLE.get(n)}" for n in order)
            warnings.warn(f"lspt_kernels: no fused backend for {device.type} tensors ({why}); "
                          "using the eager (pure-PyTorch) step", RuntimeWarning, stacklevel=3)
        return "eager"
    if backend not in BACKENDS:
        raise ValueError(f"lspt_step: backend must be one of {('auto',) + BACKENDS} (or the alias "
                         f"'reference' for 'eager'), got {backend!r}")
    if backend == "eager":
        return backend
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"lspt_step: backend 'cpu' needs CPU tensors, got tensors on {device}")
    if backend in ("cuda", "triton") and not (device.type == "cuda" or
                                             (backend == "triton" and _triton_runs_on(device))):
        raise ValueError(f"lspt_step: backend {backend!r} needs CUDA tensors, got tensors on {device}"
                         + (" (set TRITON_INTERPRET=1 to run Triton on the CPU)" if backend == "triton" else ""))
    if _load_backend(backend) is None:
        raise RuntimeError(f"lspt_step: backend {backend!r} is not available here: {_UNAVAILABLE[backend]}")
    return backend


def _resolve_meta(backend: str) -> str:
    """Meta tensors (shape propagation, e.g. a model built on or moved to 'meta'): a fused backend
    runs the op's fake kernel, which never touches a kernel or loads an extension; "auto" runs the
    eager step, whose plain ops propagate shapes themselves."""
    if backend == "auto":
        return "eager"
    if backend not in BACKENDS:
        raise ValueError(f"lspt_step: backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    return backend


# ----------------------------------------------------------------------------------------------
# Input checks: every backend gets the same clear errors, before any kernel runs. The encoder runs
# `check_fused_inputs` once per forward (every block's tokens have one shape); lspt_step runs
# `check_step_inputs` per call.
# ----------------------------------------------------------------------------------------------
def _check_tensors(named: dict) -> None:
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"lspt_step: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"lspt_step: {name} must be float32/float16/bfloat16/float64, got {t.dtype}")
    devices = {t.device for t in named.values()}
    if len(devices) > 1:
        where = ", ".join(f"{n} on {t.device}" for n, t in named.items())
        raise ValueError(f"lspt_step: all tensors must be on one device, got {where}")


def _check_tokens_and_cell(tokens: Tensor, cell: Tensor, n_p: int, num_prefix_tokens) -> tuple[int, int, int]:
    """The one rule for num_prefix_tokens (every backend): an int >= 0, not a bool."""
    if tokens.dim() != 3:
        raise ValueError(f"lspt_step: tokens must be (B, T, D), got shape {tuple(tokens.shape)}")
    B, T, D = tokens.shape
    if n_p < 1:
        raise ValueError("lspt_step: prompt must hold at least one prompt token (Np >= 1)")
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise ValueError(f"lspt_step: num_prefix_tokens must be an int >= 0 (not a bool), got {num_prefix_tokens!r}")
    if num_prefix_tokens + n_p >= T:
        raise ValueError(f"lspt_step: tokens has T={T} tokens but num_prefix_tokens + Np = "
                         f"{num_prefix_tokens} + {n_p} leaves no patch token (need T > k + Np)")
    if tuple(cell.shape) != (B, n_p, D):
        raise ValueError(f"lspt_step: cell must be (B, Np, D) = {(B, n_p, D)}, got {tuple(cell.shape)}")
    return B, T, D


def _check_activation_dtypes(tokens: Tensor, cell: Tensor, w: torch.dtype, autocast: bool) -> None:
    if not autocast and tokens.dtype != w:
        raise TypeError(f"lspt_step: tokens ({tokens.dtype}) and the LSTM weights ({w}) must share one "
                        "dtype outside torch.autocast")
    if autocast and tokens.dtype not in (w, torch.float32):
        raise TypeError(f"lspt_step: under autocast tokens must be float32 or {w}, got {tokens.dtype}")
    if cell.dtype not in (tokens.dtype, torch.float32):
        raise TypeError(f"lspt_step: cell must be {tokens.dtype} (like tokens) or float32, got {cell.dtype}")


def check_step_inputs(tokens, cell, prompt, weight_ih, weight_hh, bias_ih, bias_hh,
                      num_prefix_tokens, *, autocast: bool = False) -> None:
    named = dict(tokens=tokens, cell=cell, prompt=prompt, weight_ih=weight_ih, weight_hh=weight_hh,
                 bias_ih=bias_ih, bias_hh=bias_hh)
    _check_tensors(named)
    if tokens.dim() == 3 and (prompt.dim() != 2 or prompt.shape[1] != tokens.shape[2]):
        raise ValueError(f"lspt_step: prompt must be (Np, D) with D={tokens.shape[2]} (from tokens), "
                         f"got shape {tuple(prompt.shape)}")
    B, T, D = _check_tokens_and_cell(tokens, cell, prompt.shape[0] if prompt.dim() == 2 else 0,
                                     num_prefix_tokens)
    for name in ("weight_ih", "weight_hh"):
        if tuple(named[name].shape) != (4 * D, D):
            raise ValueError(f"lspt_step: {name} must be (4D, D) = {(4 * D, D)} for D={D} (from tokens),"
                             f" got {tuple(named[name].shape)}")
    for name in ("bias_ih", "bias_hh"):
        if tuple(named[name].shape) != (4 * D,):
            raise ValueError(f"lspt_step: {name} must be (4D,) = {(4 * D,)}, got {tuple(named[name].shape)}")
    w = weight_hh.dtype
    mixed = [n for n in ("prompt", "weight_ih", "bias_ih", "bias_hh") if named[n].dtype != w]
    if mixed:
        raise TypeError(f"lspt_step: prompt, weight_ih, weight_hh, bias_ih and bias_hh must share one "
                        f"dtype; weight_hh is {w} but " + ", ".join(f"{n} is {named[n].dtype}" for n in mixed))
    _check_activation_dtypes(tokens, cell, w, autocast)


def check_fused_inputs(tokens, cell, gate_bias, weight_hh, num_prefix_tokens, *,
                       autocast: bool = False) -> None:
    """The op's inputs as the encoder passes them (gate bias rows instead of prompt and W_ih)."""
    _check_tensors(dict(tokens=tokens, cell=cell, gate_bias=gate_bias, weight_hh=weight_hh))
    n_p = cell.shape[1] if cell.dim() == 3 else 0
    B, T, D = _check_tokens_and_cell(tokens, cell, n_p, num_prefix_tokens)
    if tuple(gate_bias.shape) not in ((n_p, 4 * D), (B, n_p, 4 * D)):
        raise ValueError(f"lspt_step: gate_bias must be (Np, 4D) = {(n_p, 4 * D)} or (B, Np, 4D) = "
                         f"{(B, n_p, 4 * D)}, got {tuple(gate_bias.shape)}")
    if tuple(weight_hh.shape) != (4 * D, D):
        raise ValueError(f"lspt_step: weight_hh must be (4D, D) = {(4 * D, D)}, got {tuple(weight_hh.shape)}")
    if gate_bias.dtype != weight_hh.dtype:
        raise TypeError(f"lspt_step: gate_bias ({gate_bias.dtype}) and weight_hh ({weight_hh.dtype}) "
                        "must share one dtype")
    _check_activation_dtypes(tokens, cell, weight_hh.dtype, autocast)
    # The kernels' layout contract, which the encoder's tensors meet by construction.
    if tokens.stride(-1) != 1 or not (cell.is_contiguous() and gate_bias.is_contiguous()
                                      and weight_hh.is_contiguous()):
        raise ValueError("lspt_step: the fused op needs tokens with stride(-1) == 1 and contiguous "
                         "cell, gate_bias and weight_hh")


def _refuse_interpreted_bf16(backend: str, *tensors: Tensor) -> None:
    """The Triton interpreter (TRITON_INTERPRET=1, Triton on the CPU) has no bfloat16 arithmetic:
    it computes silently wrong results (measured: hidden off by 1.28), so refuse before launching."""
    if backend != "triton" or tensors[0].device.type == "cuda":
        return
    if any(isinstance(t, Tensor) and t.dtype == torch.bfloat16 for t in tensors):
        raise TypeError("lspt_step: backend 'triton' on CPU tensors runs in the Triton interpreter "
                        "(TRITON_INTERPRET=1), which has no bfloat16 arithmetic and would return wrong "
                        "results; use float32/float16 there, backend='cpu' or 'eager' for bfloat16 "
                        "on the CPU, or CUDA tensors")


# ----------------------------------------------------------------------------------------------
# The registered ops. The bodies stay thin: load the kernels (once), keep autocast from re-casting
# inside them, call. Extra per-call checks belong in the kernels (which re-check the contract).
# ----------------------------------------------------------------------------------------------
def _acc_dtype(tokens_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if tokens_dtype == torch.float64 else torch.float32


@torch.library.custom_op("lspt::step_fwd", mutates_args=())
def _step_fwd(tokens: Tensor, cell: Tensor, gate_bias: Tensor, weight_hh: Tensor,
              num_prefix_tokens: int, save_gates: bool,
              backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    kernels = _kernels_for_op(backend, "lspt::step_fwd")
    _refuse_interpreted_bf16(backend, tokens, cell, gate_bias, weight_hh)
    save_gates = save_gates and backend in SAVES_GATES   # the fake impl's rule, one switch
    with _autocast_off(tokens.device.type):
        return kernels.forward(tokens, cell, gate_bias, weight_hh, num_prefix_tokens, save_gates)


@_step_fwd.register_fake
def _step_fwd_fake(tokens, cell, gate_bias, weight_hh, num_prefix_tokens, save_gates, backend):
    _check_op_backend(backend, "lspt::step_fwd")
    B, _, D = tokens.shape
    n_p = cell.shape[1]
    acc = _acc_dtype(tokens.dtype)
    gates = (tokens.new_empty((B, n_p, 4 * D), dtype=acc) if save_gates and backend in SAVES_GATES
             else tokens.new_empty((0,), dtype=acc))
    return (tokens.new_empty((B, n_p, D)), cell.new_empty((B, n_p, D)),
            tokens.new_empty((B, n_p, D), dtype=weight_hh.dtype), gates)


@torch.library.custom_op("lspt::step_bwd", mutates_args=())
def _step_bwd(grad_hidden: Tensor, grad_cell: Tensor, xhat: Tensor, cell: Tensor, gate_bias: Tensor,
              weight_hh: Tensor, gates: Tensor, num_prefix_tokens: int, num_tokens: int,
              backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    kernels = _kernels_for_op(backend, "lspt::step_bwd")
    _refuse_interpreted_bf16(backend, grad_hidden, cell, weight_hh)
    with _autocast_off(grad_hidden.device.type):
        return kernels.backward(grad_hidden, grad_cell, xhat, cell, gate_bias, weight_hh, gates,
                                num_prefix_tokens, num_tokens)


@_step_bwd.register_fake
def _step_bwd_fake(grad_hidden, grad_cell, xhat, cell, gate_bias, weight_hh, gates, num_prefix_tokens,
                   num_tokens, backend):
    _check_op_backend(backend, "lspt::step_bwd")
    B, _, D = grad_hidden.shape
    return (grad_hidden.new_empty((B, num_tokens, D)), torch.empty_like(cell),
            torch.empty_like(gate_bias), torch.empty_like(weight_hh))


def _setup_context(ctx, inputs, output):
    tokens, cell, gate_bias, weight_hh, k, save_gates, backend = inputs
    # New memory: Xhat_SP (and the activated gates on a backend that saves them); the incoming cell
    # is the previous step's output, weight_hh a parameter. The gate bias is kept only to recompute
    # the gates: with saved gates the per-forward GEMM's output can be freed after forward.
    gates = output[3]
    # Unused outputs (xhat, gates, the last step's cell) get no zero-filled gradients: backward
    # fills what it needs, so no (B, Np, 4D) zeros are made per step.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[2], cell, gate_bias if gates.numel() == 0 else None, weight_hh, gates)
    ctx.k, ctx.backend, ctx.num_tokens, ctx.tokens_dtype = k, backend, tokens.shape[1], tokens.dtype
    ctx.gate_bias_shape = tuple(gate_bias.shape)


def _backward(ctx, grad_hidden, grad_cell, _grad_xhat, _grad_gates):
    xhat, cell, gate_bias, weight_hh, gates = ctx.saved_tensors
    if gate_bias is None:   # not read when the gates were saved: a stride-0 stand-in of its shape
        gate_bias = weight_hh.as_strided(ctx.gate_bias_shape, (0,) * len(ctx.gate_bias_shape))
    if grad_hidden is None:
        grad_hidden = xhat.new_zeros(xhat.shape, dtype=ctx.tokens_dtype)
    elif not grad_hidden.is_contiguous():   # the slot of the next block's input gradient: a view
        grad_hidden = grad_hidden.contiguous()
    if grad_cell is None:                   # the last step's cell feeds nothing
        grad_cell = torch.zeros_like(cell)
    elif not grad_cell.is_contiguous():
        grad_cell = grad_cell.contiguous()
    g_tokens, g_cell, g_bias, g_w_hh = _STEP_BWD(grad_hidden, grad_cell, xhat, cell, gate_bias, weight_hh,
                                                 gates, ctx.k, ctx.num_tokens, ctx.backend)
    return g_tokens, g_cell, g_bias, g_w_hh, None, None, None


torch.library.register_autograd("lspt::step_fwd", _backward, setup_context=_setup_context)
_STEP_FWD = torch.ops.lspt.step_fwd.default
_STEP_BWD = torch.ops.lspt.step_bwd.default


def fused_step(tokens: Tensor, cell: Tensor, gate_bias: Tensor, weight_hh: Tensor, num_prefix_tokens: int,
               backend: str, save_gates: bool = True) -> tuple[Tensor, Tensor]:
    """One step from already validated inputs and a resolved backend: the encoder's per-block call.
    gate_bias: (Np, 4D) or (B, Np, 4D) = prompt W_ih^T + b_ih + b_hh (`gate_bias_rows`)."""
    if backend == "eager":
        with _autocast_off(tokens.device.type):
            return step_eager(tokens, cell, gate_bias, weight_hh, num_prefix_tokens)
    hidden, new_cell, _, _ = _STEP_FWD(tokens, cell, gate_bias, weight_hh, num_prefix_tokens, save_gates,
                                       backend)
    return hidden, new_cell


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "lspt_step: the fused backends have no double backward (a gradient of a gradient, e.g. "
        "torch.autograd.grad(..., create_graph=True) then backward again: gradient penalties, Hessians); "
        "use the eager step for that: lspt_step(..., backend='eager'), or "
        "LSPTEncoder(..., backend='eager')")


# The fused backward is not differentiable: differentiating through its outputs raises the clear error
# above (instead of torch's "no autograd formula was registered"); a create_graph=True backward that is
# never differentiated again still works.
torch.library.register_autograd("lspt::step_bwd", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


def _register_flop_formulas() -> None:
    """FlopCounterMode sees the op, not the GEMMs inside it: count them (2 FLOPs per multiply-add).

    The batch-independent P W_ih^T (+ biases) is a plain GEMM outside the op (`gate_bias_rows`), so
    FlopCounterMode counts it itself. Forward: Xhat_SP W_hh^T, 8 B Np D^2. Backward: dXhat and dW_hh
    (8 B Np D^2 each), plus the recomputed gates (8 B Np D^2 again) unless the forward saved them
    (SAVES_GATES: the `gates` input is then (B, Np, 4D), else empty)."""
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.lspt.step_fwd)
    def _fwd_flops(tokens_shape, cell_shape, *args, out_shape=None, **kwargs) -> int:
        B, n_p, D = cell_shape
        return 8 * B * n_p * D * D

    @register_flop_formula(torch.ops.lspt.step_bwd)
    def _bwd_flops(grad_hidden_shape, grad_cell_shape, xhat_shape, cell_shape, gate_bias_shape,
                   weight_hh_shape, gates_shape, *args, out_shape=None, **kwargs) -> int:
        B, n_p, D = xhat_shape
        recompute = 0 if len(gates_shape) == 3 else 1
        return (2 + recompute) * 8 * B * n_p * D * D


_register_flop_formulas()


_warned_func_transform = False


def _under_func_transform() -> bool:
    """Inside torch.func.grad / vmap / jacrev / ...: the registered op's autograd cannot run under
    functorch's transforms, the eager step (the same function, plain ops) can. Warn once."""
    global _warned_func_transform
    if torch.compiler.is_compiling():
        return False
    try:
        active = torch._C._functorch.peek_interpreter_stack() is not None
    except AttributeError:  # pragma: no cover - functorch internals moved
        return False
    if active and not _warned_func_transform:
        _warned_func_transform = True
        warnings.warn("lspt_kernels: torch.func transforms (grad, vmap, jacrev, ...) run the eager LSPT "
                      "step (backend='eager'; same maths), not the fused op", RuntimeWarning, stacklevel=3)
    return active


def lspt_step(tokens: Tensor, cell: Tensor, prompt: Tensor, weight_ih: Tensor, weight_hh: Tensor,
              bias_ih: Tensor, bias_hh: Tensor, *, num_prefix_tokens: int = 1,
              backend: str = "auto") -> tuple[Tensor, Tensor]:
    """One LSPT step: (hidden, new_cell) = LSTMCell(prompt, (prompts_out + patches.mean(1), cell)).

    tokens (B, T, D) is a block's output laid out [prefix (k) | prompts (Np) | patches]; cell is
    (B, Np, D); prompt (Np, D) is P[l]; the weights are in torch.nn.LSTMCell layout (gate order
    i, f, g, o). Under torch.autocast the GEMM runs in the autocast dtype and the cell state and gate
    math in fp32 (the cell is returned in fp32).
    """
    device_type = tokens.device.type if isinstance(tokens, Tensor) else "cpu"
    autocast = isinstance(tokens, Tensor) and autocast_enabled(device_type)
    if autocast:
        w = torch.get_autocast_dtype(device_type)
        prompt, weight_ih, weight_hh, bias_ih, bias_hh = (
            t.to(w) if isinstance(t, Tensor) and t.is_floating_point() else t
            for t in (prompt, weight_ih, weight_hh, bias_ih, bias_hh))
        if isinstance(cell, Tensor) and cell.is_floating_point():
            cell = cell.float()
    check_step_inputs(tokens, cell, prompt, weight_ih, weight_hh, bias_ih, bias_hh, num_prefix_tokens,
                      autocast=autocast)
    backend = resolve_backend(backend, tokens.device, weight_hh.dtype, tokens.shape[-1])
    with _autocast_off(device_type):
        gate_bias = gate_bias_rows(prompt, weight_ih, bias_ih, bias_hh)
    if backend != "eager":
        if tokens.stride(-1) != 1:
            tokens = tokens.contiguous()
        cell, weight_hh = cell.contiguous(), weight_hh.contiguous()
    save = torch.is_grad_enabled()
    return fused_step(tokens, cell, gate_bias, weight_hh, num_prefix_tokens, backend, save)
