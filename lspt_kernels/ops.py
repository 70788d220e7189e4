"""The fused LSPT step as one torch.library op.

`lspt_step` is METHOD.md's step after block l < L:

    Xhat_SP = tokens[:, k:k+Np] + tokens[:, k+Np:].mean(1)           (CSPC, eq. 5)
    hidden, new_cell = LSTMCell(input=prompt, (Xhat_SP, cell))       (LPC, eq. 7)

Backends
--------
- "reference": plain PyTorch ops, differentiated by eager autograd. It is what the benchmarks call
  "eager" and what every other backend is compared with.
- "cpu" (C++, csrc/cpu), "triton" (GPU), "cuda" (CUDA C++, csrc/cuda): one registered op
  `lspt::step_fwd` with a fused forward, and `lspt::step_bwd` with a fused backward that recomputes
  the gates from the only tensors it saves (Xhat_SP and the incoming cell).

Kernel contract (what every backend's forward/backward receives, already validated):

    forward(tokens (B,T,D) [stride(-1) == 1], cell (B,Np,D) contiguous, prompt (Np,D),
            w_ih (4D,D), w_hh (4D,D), b_ih (4D,), b_hh (4D,), k)
        -> hidden (B,Np,D) tokens.dtype, new_cell (B,Np,D) cell.dtype, xhat (B,Np,D) w_hh.dtype
    backward(grad_hidden (B,Np,D) tokens.dtype, grad_cell (B,Np,D) cell.dtype, xhat, cell,
             prompt, w_ih, w_hh, b_ih, b_hh, k, T)
        -> grad_tokens (B,T,D) grad_hidden.dtype, grad_cell (cell.dtype), grad_prompt, grad_w_ih,
           grad_w_hh, grad_b_ih, grad_b_hh (w_hh.dtype)

dtypes: prompt, weights and biases share one dtype W (the GEMM precision). Either every tensor is W,
or the cell is fp32 (the cell state is carried in fp32), or additionally tokens are fp32 with W
low-precision (torch.autocast). Means and gate math are always computed in fp32.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("reference", "cpu", "triton", "cuda")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class Kernels(NamedTuple):
    forward: Callable
    backward: Callable


# ----------------------------------------------------------------------------------------------
# Reference: the step written with plain PyTorch ops (eager autograd differentiates it).
# ----------------------------------------------------------------------------------------------
def step_reference(tokens: Tensor, cell: Tensor, prompt: Tensor, weight_ih: Tensor,
                   weight_hh: Tensor, bias_ih: Tensor, bias_hh: Tensor,
                   num_prefix_tokens: int = 1) -> tuple[Tensor, Tensor]:
    k, n_p = num_prefix_tokens, prompt.shape[0]
    w = weight_hh.dtype
    acc = torch.promote_types(tokens.dtype, torch.float32)   # means and gate math in >= fp32
    mean = tokens[:, k + n_p:].mean(1, keepdim=True, dtype=acc)                # (B, 1, D)
    xhat = (tokens[:, k:k + n_p].to(acc) + mean).to(w)                        # (B, Np, D)
    # Batch-independent part once per step, then the one large product.
    gates = F.linear(prompt, weight_ih, bias_ih) + bias_hh                    # (Np, 4D)
    gates = (F.linear(xhat, weight_hh) + gates).to(acc)                       # (B, Np, 4D)
    i, f, g, o = gates.chunk(4, dim=-1)
    new_cell = torch.sigmoid(f) * cell.to(acc) + torch.sigmoid(i) * torch.tanh(g)
    hidden = torch.sigmoid(o) * torch.tanh(new_cell)
    return hidden.to(tokens.dtype), new_cell.to(cell.dtype)


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
    _load_backend(name)
    return _UNAVAILABLE.get(name)


def autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled for any device type: False where autocast does not exist (meta)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # "unknown device type for autocast" (meta and other non-compute devices)
        return False


def _triton_runs_on(device: torch.device) -> bool:
    import os
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


_warned_fallback = False


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None,
                    width: int | None = None) -> str:
    """Map "auto" to the fastest backend for `device`; check that a named one can run there. Given the
    GEMM dtype (and the width D), a fused GPU backend must also pass its once-per-process self-check
    against the eager step (lspt_kernels/selfcheck.py), else the next backend is used, with a warning."""
    name = _resolve_backend(backend, device)
    if dtype is not None and name != "reference" and device.type != "meta":
        from . import selfcheck
        name = selfcheck.ensure(name, device, dtype, width)
    return name


def _resolve_backend(backend: str, device: torch.device) -> str:
    global _warned_fallback
    if device.type == "meta":
        return _resolve_meta(backend)
    if backend == "auto":
        order = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
        for name in order:
            if _load_backend(name) is not None:
                return name
        if not _warned_fallback:
            _warned_fallback = True
            why = "; ".join(f"{n}: {_UNAVAILABLE.get(n)}" for n in order)
            warnings.warn(f"lspt_kernels: no fused backend for {device.type} tensors ({why}); "
                          "using the pure-PyTorch reference step", RuntimeWarning, stacklevel=3)
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"lspt_step: backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if backend == "reference":
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
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"lspt_step: backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    return backend


# ----------------------------------------------------------------------------------------------
# Input checks: every backend gets the same clear errors, before any kernel runs.
# ----------------------------------------------------------------------------------------------
def check_step_inputs(tokens, cell, prompt, weight_ih, weight_hh, bias_ih, bias_hh,
                      num_prefix_tokens, *, autocast: bool = False) -> None:
    named = dict(tokens=tokens, cell=cell, prompt=prompt, weight_ih=weight_ih, weight_hh=weight_hh,
                 bias_ih=bias_ih, bias_hh=bias_hh)
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"lspt_step: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"lspt_step: {name} must be float32/float16/bfloat16/float64, got {t.dtype}")
    devices = {t.device for t in named.values()}
    if len(devices) > 1:
        where = ", ".join(f"{n} on {t.device}" for n, t in named.items())
        raise ValueError(f"lspt_step: all tensors must be on one device, got {where}")
    if tokens.dim() != 3:
        raise ValueError(f"lspt_step: tokens must be (B, T, D), got shape {tuple(tokens.shape)}")
    B, T, D = tokens.shape
    if prompt.dim() != 2 or prompt.shape[1] != D:
        raise ValueError(f"lspt_step: prompt must be (Np, D) with D={D} (from tokens), "
                         f"got shape {tuple(prompt.shape)}")
    n_p = prompt.shape[0]
    if n_p < 1:
        raise ValueError("lspt_step: prompt must hold at least one prompt token (Np >= 1)")
    if not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise ValueError(f"lspt_step: num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}")
    if num_prefix_tokens + n_p >= T:
        raise ValueError(f"lspt_step: tokens has T={T} tokens but num_prefix_tokens + Np = "
                         f"{num_prefix_tokens} + {n_p} leaves no patch token (need T > k + Np)")
    if tuple(cell.shape) != (B, n_p, D):
        raise ValueError(f"lspt_step: cell must be (B, Np, D) = {(B, n_p, D)}, got {tuple(cell.shape)}")
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
    if not autocast and tokens.dtype != w:
        raise TypeError(f"lspt_step: tokens ({tokens.dtype}) and the LSTM weights ({w}) must share one "
                        "dtype outside torch.autocast")
    if cell.dtype not in (tokens.dtype, torch.float32):
        raise TypeError(f"lspt_step: cell must be {tokens.dtype} (like tokens) or float32, got {cell.dtype}")


def _refuse_interpreted_bf16(backend: str, *tensors: Tensor) -> None:
    """The Triton interpreter (TRITON_INTERPRET=1, Triton on the CPU) has no bfloat16 arithmetic:
    it computes silently wrong results (measured: hidden off by 1.28), so refuse before launching."""
    if backend != "triton" or tensors[0].device.type == "cuda":
        return
    if any(isinstance(t, Tensor) and t.dtype == torch.bfloat16 for t in tensors):
        raise TypeError("lspt_step: backend 'triton' on CPU tensors runs in the Triton interpreter "
                        "(TRITON_INTERPRET=1), which has no bfloat16 arithmetic and would return wrong "
                        "results; use float32/float16 there, backend='cpu' or 'reference' for bfloat16 "
                        "on the CPU, or CUDA tensors")


# ----------------------------------------------------------------------------------------------
# The registered ops.
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("lspt::step_fwd", mutates_args=())
def _step_fwd(tokens: Tensor, cell: Tensor, prompt: Tensor, weight_ih: Tensor, weight_hh: Tensor,
              bias_ih: Tensor, bias_hh: Tensor, num_prefix_tokens: int,
              backend: str) -> tuple[Tensor, Tensor, Tensor]:
    _refuse_interpreted_bf16(backend, tokens, cell, weight_hh)
    # Autocast must not re-cast inside the kernels: the wrapper already chose every dtype.
    with torch.autocast(tokens.device.type, enabled=False):
        return _KERNELS[backend].forward(tokens, cell, prompt, weight_ih, weight_hh, bias_ih,
                                         bias_hh, num_prefix_tokens)


@_step_fwd.register_fake
def _step_fwd_fake(tokens, cell, prompt, weight_ih, weight_hh, bias_ih, bias_hh, num_prefix_tokens,
                   backend):
    B, _, D = tokens.shape
    n_p = prompt.shape[0]
    return (tokens.new_empty((B, n_p, D)), cell.new_empty((B, n_p, D)),
            tokens.new_empty((B, n_p, D), dtype=weight_hh.dtype))


@torch.library.custom_op("lspt::step_bwd", mutates_args=())
def _step_bwd(grad_hidden: Tensor, grad_cell: Tensor, xhat: Tensor, cell: Tensor, prompt: Tensor,
              weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor, bias_hh: Tensor,
              num_prefix_tokens: int, num_tokens: int,
              backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _refuse_interpreted_bf16(backend, grad_hidden, cell, weight_hh)
    with torch.autocast(grad_hidden.device.type, enabled=False):
        return _KERNELS[backend].backward(grad_hidden, grad_cell, xhat, cell, prompt, weight_ih,
                                          weight_hh, bias_ih, bias_hh, num_prefix_tokens, num_tokens)


@_step_bwd.register_fake
def _step_bwd_fake(grad_hidden, grad_cell, xhat, cell, prompt, weight_ih, weight_hh, bias_ih, bias_hh,
                   num_prefix_tokens, num_tokens, backend):
    B, _, D = grad_hidden.shape
    return (grad_hidden.new_empty((B, num_tokens, D)), torch.empty_like(cell),
            torch.empty_like(prompt), torch.empty_like(weight_ih), torch.empty_like(weight_hh),
            torch.empty_like(bias_ih), torch.empty_like(bias_hh))


def _setup_context(ctx, inputs, output):
    tokens, cell, prompt, weight_ih, weight_hh, bias_ih, bias_hh, k, backend = inputs
    # Only Xhat_SP and the incoming cell are new memory; prompt and weights are parameters.
    ctx.save_for_backward(output[2], cell, prompt, weight_ih, weight_hh, bias_ih, bias_hh)
    ctx.k, ctx.backend, ctx.num_tokens, ctx.tokens_dtype = k, backend, tokens.shape[1], tokens.dtype


def _backward(ctx, grad_hidden, grad_cell, _grad_xhat):
    xhat, cell, prompt, weight_ih, weight_hh, bias_ih, bias_hh = ctx.saved_tensors
    B, n_p, D = xhat.shape
    if grad_hidden is None:
        grad_hidden = xhat.new_zeros((B, n_p, D), dtype=ctx.tokens_dtype)
    if grad_cell is None:
        grad_cell = torch.zeros_like(cell)
    grads = torch.ops.lspt.step_bwd(grad_hidden.contiguous(), grad_cell.contiguous(), xhat, cell,
                                    prompt, weight_ih, weight_hh, bias_ih, bias_hh, ctx.k,
                                    ctx.num_tokens, ctx.backend)
    return (*grads, None, None)


torch.library.register_autograd("lspt::step_fwd", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "lspt_step: the fused backends have no double backward (a gradient of a gradient, e.g. "
        "torch.autograd.grad(..., create_graph=True) then backward again: gradient penalties, Hessians); "
        "use the eager step for that: lspt_step(..., backend='reference'), or "
        "LSPTEncoder(..., backend='reference')")


# The fused backward is not differentiable: differentiating through its outputs raises the clear error
# above (instead of torch's "no autograd formula was registered"); a create_graph=True backward that is
# never differentiated again still works.
torch.library.register_autograd("lspt::step_bwd", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


def _register_flop_formulas() -> None:
    """FlopCounterMode sees the op, not the GEMMs inside it: count them (2 FLOPs per multiply-add).

    Forward: the batch-independent prompt product P W_ih^T (8 Np D^2) and the one large product
    Xhat_SP W_hh^T (8 B Np D^2), as the eager step's addmm + mm. Backward (every fused backend
    recomputes the gates, csrc/cpu/lspt_step_cpu.cpp cpu_backward and triton_kernels.backward): the two
    forward products again, then dXhat (8 B Np D^2), dW_hh (8 B Np D^2), dP (8 Np D^2), dW_ih (8 Np D^2).
    """
    from torch.utils.flop_counter import register_flop_formula

    def gemm_flops(rows: int, n_p: int, D: int) -> int:   # (rows x D) @ (D x 4D) + (Np x D) @ (D x 4D)
        return 8 * rows * D * D + 8 * n_p * D * D

    @register_flop_formula(torch.ops.lspt.step_fwd)
    def _fwd_flops(tokens_shape, cell_shape, prompt_shape, *args, out_shape=None, **kwargs) -> int:
        B, n_p, D = cell_shape
        return gemm_flops(B * n_p, n_p, D)

    @register_flop_formula(torch.ops.lspt.step_bwd)
    def _bwd_flops(grad_hidden_shape, grad_cell_shape, xhat_shape, *args, out_shape=None, **kwargs) -> int:
        B, n_p, D = xhat_shape
        return 3 * gemm_flops(B * n_p, n_p, D)


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
                      "step (backend='reference'; same maths), not the fused op", RuntimeWarning, stacklevel=3)
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
    if backend != "reference" and _under_func_transform():
        backend = "reference"
    if backend == "reference":
        # (no autocast context where there is no autocast: meta tensors)
        with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
            return step_reference(tokens, cell, prompt, weight_ih, weight_hh, bias_ih, bias_hh,
                                  num_prefix_tokens)
    if tokens.stride(-1) != 1:
        tokens = tokens.contiguous()
    hidden, new_cell, _ = torch.ops.lspt.step_fwd(tokens, cell.contiguous(), prompt.contiguous(),
                                                  weight_ih.contiguous(), weight_hh.contiguous(),
                                                  bias_ih.contiguous(), bias_hh.contiguous(),
                                                  num_prefix_tokens, backend)
    return hidden, new_cell
