"""The fused LSPT step: the public `lspt_step`, the op `lspt::step_fwd` / `lspt::step_bwd`, its fake
kernels and autograd, and the backend resolution that hands the op to the self-check.

`lspt_step` is the LSPT step after block l < L (docs/method.md, "One step, written out"):

    Xhat_SP = tokens[:, k:k+Np] + tokens[:, k+Np:].mean(1)           (CSPC, eq. 5)
    hidden, new_cell = LSTMCell(input=prompt, (Xhat_SP, cell))       (LPC, eq. 7)

Its gates split into a batch-independent half and the one large product:

    gates = gate_bias + Xhat_SP W_hh^T,    gate_bias = prompt W_ih^T + b_ih + b_hh   (Np, 4D)

`gate_bias` depends on no image, so the encoder computes it for all L - 1 steps with ONE GEMM per
forward and the op only takes (tokens, cell, gate_bias, W_hh). With per-image prompt dropout the
gate-bias rows differ per image: the op takes gate_bias as (Np, 4D) or (B, Np, 4D).

The op and its kernels
----------------------
The schemas are defined here (the op must exist where no extension can be built: Triton, meta
tensors, torch.export); the kernels and the autograd of the "cpu" and "cuda" backends are registered
in C++ when their extension loads, Triton's through the dispatcher too (lspt_kernels/backends.py
says how). The Python registrations below serve the op until then, and on devices without a C++
registration: a kernel that loads the named backend and dispatches again, and the same autograd
formula as the C++ one (csrc/autograd.cpp). The fake kernels stay in Python (torch.compile / export).

Kernel contract (what every backend's forward/backward receives and returns):

    forward(tokens (B,T,D) [stride(-1) == 1], cell (B,Np,D) contiguous,
            gate_bias (Np,4D) or (B,Np,4D) contiguous W, weight_hh (4D,D) contiguous W, k, save_gates)
        -> hidden (B,Np,D) tokens.dtype, new_cell (B,Np,D) cell.dtype, xhat (B,Np,D) W,
           gates: the activated gates (B,Np,4D) in the accumulation dtype when the backend saves
           them (backends.SAVES_GATES) and save_gates is true, else an empty (0,) tensor
    backward(grad_hidden (B,Np,D) tokens.dtype, grad_cell (B,Np,D) cell.dtype, xhat, cell,
             gate_bias, weight_hh, gates, k, T)
        -> grad_tokens (B,T,D) grad_hidden.dtype, grad_cell (cell.dtype), grad_gate_bias (gate_bias's
           shape, W), grad_weight_hh (W)

Grouped step (multi-task inference), `lspt::grouped_step` / `grouped_step`:

    grouped_step(tokens (B,T,D) [stride(-1) == 1], cell (B,Np,D) contiguous, gate_bias (B,Np,4D)
                 contiguous W (each row's own task's rows, gathered), weight_hh (G,4D,D) contiguous W,
                 offsets (G+1,) int64 on the tokens' device, k, backend)
        -> hidden (B,Np,D) tokens.dtype, new_cell (B,Np,D) cell.dtype

Rows offsets[g]:offsets[g+1] use weight_hh[g], 0 = offsets[0] <= ... <= offsets[G] = B (a group may
be empty): each group's product is one segment of a grouped GEMM (Punica's SGMV). The kernels read
offsets on the device and clamp every segment to [0, B]; `grouped_step` also checks the values on the
host outside torch.compile / export (one sync per call). Inference only: there is no backward, and a
call whose inputs require grad under grad mode raises GROUPED_INFERENCE_ONLY. The dtype rules are the
single-task op's. The reference is `eager.grouped_step_eager`; `resolve_grouped_backend` resolves a
backend with the grouped self-check.

dtypes: gate_bias and weight_hh share one dtype W (the GEMM precision). Either every tensor is W, or
the cell is fp32 (the cell state is carried in fp32), or additionally tokens are fp32 with W
low-precision (torch.autocast). Means and gate math are always computed in fp32 (fp64 for fp64).
lspt_kernels/contract.py is the one validator of this contract (clear errors naming the argument);
the C++/CUDA code re-checks only what guards memory (csrc/checks.h), the fake kernels use torch._check.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from . import backends, selfcheck
from .contract import check_group_offsets, check_grouped_inputs, check_step_inputs
from .eager import gate_bias_rows, grouped_step_eager, step_eager
from .precision import autocast_enabled, autocast_off

_lib = torch.library.Library("lspt", "FRAGMENT")
_lib.define("step_fwd(Tensor tokens, Tensor cell, Tensor gate_bias, Tensor weight_hh, "
            "SymInt num_prefix_tokens, bool save_gates, str backend) -> (Tensor, Tensor, Tensor, Tensor)")
_lib.define("step_bwd(Tensor grad_hidden, Tensor grad_cell, Tensor xhat, Tensor cell, Tensor gate_bias, "
            "Tensor weight_hh, Tensor gates, SymInt num_prefix_tokens, SymInt num_tokens, str backend) "
            "-> (Tensor, Tensor, Tensor, Tensor)")
_lib.define("grouped_step(Tensor tokens, Tensor cell, Tensor gate_bias, Tensor weight_hh, Tensor offsets, "
            "SymInt num_prefix_tokens, str backend) -> (Tensor, Tensor)")
STEP_FWD = torch.ops.lspt.step_fwd.default
STEP_BWD = torch.ops.lspt.step_bwd.default
GROUPED_STEP = torch.ops.lspt.grouped_step.default
GROUPED_INFERENCE_ONLY = (
    "grouped_step: the grouped (multi-task) step is inference-only and has no backward: run it under "
    "torch.no_grad() or torch.inference_mode(), or detach its inputs; to train a task, train it alone "
    "with LSPTEncoder")
NO_DOUBLE_BACKWARD = (
    "lspt_step: the fused backends have no double backward (a gradient of a gradient, e.g. "
    "torch.autograd.grad(..., create_graph=True) then backward again: gradient penalties, Hessians); "
    "use the eager step for that: lspt_step(..., backend='eager'), or LSPTEncoder(..., backend='eager')")


def check_op_backend(backend: str, fn: str) -> None:
    """The op's `backend` argument: a fused backend's name (the op never runs "eager" or "auto")."""
    if backend not in backends.FUSED_BACKENDS:
        raise ValueError(f"{fn}: backend must be one of {backends.FUSED_BACKENDS} (the fused kernels; the "
                         f"plain-PyTorch step is lspt_step(..., backend='eager')), got {backend!r}")


# ----------------------------------------------------------------------------------------------
# Fake kernels (torch.compile, torch.export, meta tensors): shapes and dtypes, and torch._check for
# what a traced graph must not get wrong (they hold symbolic sizes too).
# ----------------------------------------------------------------------------------------------
def _acc_dtype(tokens_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if tokens_dtype == torch.float64 else torch.float32


@torch.library.register_fake("lspt::step_fwd")
def _step_fwd_fake(tokens, cell, gate_bias, weight_hh, num_prefix_tokens, save_gates, backend):
    check_op_backend(backend, "lspt::step_fwd")
    B, T, D = tokens.shape
    n_p = cell.shape[1]
    for ok, what in ((cell.shape[0] == B, "cell must be (B, Np, D)"), (cell.shape[2] == D, "cell must be (B, Np, D)"),
                     (num_prefix_tokens + n_p < T, "tokens leave no patch token (T <= k + Np)"),
                     (weight_hh.shape[0] == 4 * D, "weight_hh must be (4D, D)"),
                     (weight_hh.shape[1] == D, "weight_hh must be (4D, D)"),
                     (gate_bias.shape[-1] == 4 * D, "gate_bias must be (Np, 4D) or (B, Np, 4D)"),
                     (gate_bias.shape[-2] == n_p, "gate_bias must be (Np, 4D) or (B, Np, 4D)")):
        torch._check(ok, lambda what=what: f"lspt::step_fwd: {what}")
    acc = _acc_dtype(tokens.dtype)
    gates = (tokens.new_empty((B, n_p, 4 * D), dtype=acc) if save_gates and backend in backends.SAVES_GATES
             else tokens.new_empty((0,), dtype=acc))
    return (tokens.new_empty((B, n_p, D)), cell.new_empty((B, n_p, D)),
            tokens.new_empty((B, n_p, D), dtype=weight_hh.dtype), gates)


@torch.library.register_fake("lspt::step_bwd")
def _step_bwd_fake(grad_hidden, grad_cell, xhat, cell, gate_bias, weight_hh, gates, num_prefix_tokens,
                   num_tokens, backend):
    check_op_backend(backend, "lspt::step_bwd")
    B, n_p, D = xhat.shape
    torch._check(num_prefix_tokens + n_p < num_tokens, lambda: "lspt::step_bwd: no patch token (T <= k + Np)")
    return (grad_hidden.new_empty((B, num_tokens, D)), torch.empty_like(cell),
            torch.empty_like(gate_bias), torch.empty_like(weight_hh))


@torch.library.register_fake("lspt::grouped_step")
def _grouped_step_fake(tokens, cell, gate_bias, weight_hh, offsets, num_prefix_tokens, backend):
    check_op_backend(backend, "lspt::grouped_step")
    B, T, D = tokens.shape
    n_p = cell.shape[1]
    for ok, what in ((cell.shape[0] == B, "cell must be (B, Np, D)"), (cell.shape[2] == D, "cell must be (B, Np, D)"),
                     (num_prefix_tokens + n_p < T, "tokens leave no patch token (T <= k + Np)"),
                     (weight_hh.shape[1] == 4 * D, "weight_hh must be (G, 4D, D)"),
                     (weight_hh.shape[2] == D, "weight_hh must be (G, 4D, D)"),
                     (offsets.shape[0] == weight_hh.shape[0] + 1, "offsets must be (G + 1,)"),
                     (gate_bias.shape[0] == B, "gate_bias must be (B, Np, 4D)"),
                     (gate_bias.shape[1] == n_p, "gate_bias must be (B, Np, 4D)"),
                     (gate_bias.shape[2] == 4 * D, "gate_bias must be (B, Np, 4D)")):
        torch._check(ok, lambda what=what: f"lspt::grouped_step: {what}")
    return tokens.new_empty((B, n_p, D)), cell.new_empty((B, n_p, D))


# ----------------------------------------------------------------------------------------------
# Python kernels: until the C++ extension of the tensors' device is loaded (or where none builds).
# ----------------------------------------------------------------------------------------------
def _load_for(backend: str, device: torch.device, fn: str) -> None:
    check_op_backend(backend, fn)
    mismatch = backends.device_mismatch(backend, device)
    if mismatch:
        raise ValueError(f"{fn}: {mismatch}")
    if not backends.load(backend):
        raise RuntimeError(f"{fn}: backend {backend!r} is not available here: {backends.unavailable_reason(backend)}")
    if backend != "triton" and not torch._C._dispatch_has_kernel_for_dispatch_key(fn, device.type.upper()):
        raise RuntimeError(f"{fn}: the {backend!r} extension loaded but registered no kernel for {device} tensors")


def _step_fwd_python(tokens, cell, gate_bias, weight_hh, num_prefix_tokens, save_gates, backend):
    _load_for(backend, tokens.device, "lspt::step_fwd")
    if backend == "triton":
        return backends.triton_forward(tokens, cell, gate_bias, weight_hh, num_prefix_tokens, save_gates)
    return STEP_FWD(tokens, cell, gate_bias, weight_hh, num_prefix_tokens, save_gates, backend)   # now C++


def _step_bwd_python(grad_hidden, grad_cell, xhat, cell, gate_bias, weight_hh, gates, num_prefix_tokens,
                     num_tokens, backend):
    _load_for(backend, grad_hidden.device, "lspt::step_bwd")
    if backend == "triton":
        return backends.triton_backward(grad_hidden, grad_cell, xhat, cell, gate_bias, weight_hh, gates,
                                        num_prefix_tokens, num_tokens)
    return STEP_BWD(grad_hidden, grad_cell, xhat, cell, gate_bias, weight_hh, gates, num_prefix_tokens,
                    num_tokens, backend)


def _grouped_step_python(tokens, cell, gate_bias, weight_hh, offsets, num_prefix_tokens, backend):
    _load_for(backend, tokens.device, "lspt::grouped_step")
    if backend == "triton":
        return backends.triton_grouped_forward(tokens, cell, gate_bias, weight_hh, offsets, num_prefix_tokens)
    return GROUPED_STEP(tokens, cell, gate_bias, weight_hh, offsets, num_prefix_tokens, backend)


_lib.impl("step_fwd", _step_fwd_python, "CompositeExplicitAutograd")
_lib.impl("step_bwd", _step_bwd_python, "CompositeExplicitAutograd")
_lib.impl("grouped_step", _grouped_step_python, "CompositeExplicitAutograd")


def _setup_context(ctx, inputs, output):
    tokens, cell, gate_bias, weight_hh, k, save_gates, backend = inputs
    # New memory: Xhat_SP (and the activated gates on a backend that saves them); the incoming cell
    # is the previous step's output, weight_hh a parameter. The gate bias is kept only to recompute
    # the gates. Unused outputs get no zero-filled gradients: backward fills what it needs.
    gates = output[3]
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
    g_tokens, g_cell, g_bias, g_w_hh = STEP_BWD(grad_hidden, grad_cell, xhat, cell, gate_bias, weight_hh,
                                                gates, ctx.k, ctx.num_tokens, ctx.backend)
    return g_tokens, g_cell, g_bias, g_w_hh, None, None, None


def _no_double_backward(ctx, *grads):
    raise RuntimeError(NO_DOUBLE_BACKWARD)


torch.library.register_autograd("lspt::step_fwd", _backward, setup_context=_setup_context)
# The fused backward is not differentiable: differentiating through it raises the clear error above
# (a create_graph=True backward that is never differentiated again still works).
torch.library.register_autograd("lspt::step_bwd", _no_double_backward, setup_context=lambda ctx, inputs, output: None)


def _grouped_step_autograd(keyset, tokens, cell, gate_bias, weight_hh, offsets, num_prefix_tokens, backend):
    """The grouped op has no backward: refuse a call that would need one, before any kernel runs
    (the C++ registration of csrc/autograd.cpp does the same for the devices of a loaded extension)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (tokens, cell, gate_bias, weight_hh)):
        raise RuntimeError(GROUPED_INFERENCE_ONLY)
    with torch._C._AutoDispatchBelowAutograd():
        return GROUPED_STEP.redispatch(keyset & torch._C._after_autograd_keyset, tokens, cell, gate_bias,
                                       weight_hh, offsets, num_prefix_tokens, backend)


_lib.impl("grouped_step", _grouped_step_autograd, "Autograd", with_keyset=True)


def _register_flop_formulas() -> None:
    """FlopCounterMode sees the op, not the GEMMs inside it: count them (2 FLOPs per multiply-add).

    The batch-independent P W_ih^T (+ biases) is a plain GEMM outside the op (`gate_bias_rows`), so
    FlopCounterMode counts it itself. Forward: Xhat_SP W_hh^T, 8 B Np D^2. Backward: dXhat and dW_hh
    (8 B Np D^2 each), plus the recomputed gates (8 B Np D^2 again) unless the forward saved them
    (the `gates` input is then (B, Np, 4D), else empty)."""
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

    @register_flop_formula(torch.ops.lspt.grouped_step)
    def _grouped_flops(tokens_shape, cell_shape, *args, out_shape=None, **kwargs) -> int:
        B, n_p, D = cell_shape      # every row's product with its own group's W_hh
        return 8 * B * n_p * D * D


_register_flop_formulas()


# ----------------------------------------------------------------------------------------------
# Backend resolution (with the self-check) and the calls
# ----------------------------------------------------------------------------------------------
_warned_func_transform = False


def _under_func_transform() -> bool:
    """Inside torch.func.grad / vmap / jacrev / ...: the op's autograd cannot run under functorch's
    transforms, the eager step (the same function, plain ops) can. Warn once."""
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
                      "step (backend='eager'; same maths), not the fused op", RuntimeWarning, stacklevel=4)
    return active


def _resolve(backend: str, device: torch.device, step, *case_args, grouped: bool = False) -> str:
    """The one resolution path of both ops: backends.resolve, the eager step inside torch.func
    transforms, and a fused GPU backend only after `step` passed its self-check in this case."""
    name = backends.resolve(backend, device)
    if name == "eager" or device.type == "meta":    # meta: the op's fake kernel, which loads nothing
        return name
    if _under_func_transform():
        return "eager"
    case = selfcheck.make_case(name, device, *case_args, grouped=grouped)
    return selfcheck.ensure(name, case, step)


@torch.compiler.assume_constant_result
def resolve_backend(backend: str, device: torch.device, tokens_dtype: torch.dtype, cell_dtype: torch.dtype,
                    weight_dtype: torch.dtype, width: int, num_prefix_tokens: int, per_image_rows: bool,
                    layout: str) -> str:
    """The backend a step call gets: `backend` ("auto", a name or an alias) resolved for `device`
    (backends.resolve), the eager step inside torch.func transforms, and a fused GPU backend only after
    it passed its self-check in this configuration (else the next that passes, with one warning).

    Marked assume_constant_result: under torch.compile, Dynamo runs it as plain Python at trace time
    (loading, building and checking happen there, never inside the graph) and keeps the name."""
    return _resolve(backend, device, fused_step, tokens_dtype, cell_dtype, weight_dtype, width, num_prefix_tokens,
                    per_image_rows, layout)


@torch.compiler.assume_constant_result
def resolve_grouped_backend(backend: str, device: torch.device, tokens_dtype: torch.dtype, cell_dtype: torch.dtype,
                            weight_dtype: torch.dtype, width: int, num_prefix_tokens: int, layout: str) -> str:
    """`resolve_backend` for the grouped step (multi-task inference): the same resolution, with the
    self-check of the grouped kernels (several groups, an empty one, odd sizes) in this configuration.
    Cheap after the first call of a configuration: call it at the start of each forward."""
    return _resolve(backend, device, fused_grouped_step, tokens_dtype, cell_dtype, weight_dtype, width,
                    num_prefix_tokens, True, layout, grouped=True)


def fused_step(tokens: Tensor, cell: Tensor, gate_bias: Tensor, weight_hh: Tensor, num_prefix_tokens: int,
               backend: str, save_gates: bool = True) -> tuple[Tensor, Tensor]:
    """One step from validated inputs and a resolved backend: the encoder's per-block call.
    gate_bias: (Np, 4D) or (B, Np, 4D) = prompt W_ih^T + b_ih + b_hh (`eager.gate_bias_rows`)."""
    if backend == "eager":
        with autocast_off(tokens.device.type):
            return step_eager(tokens, cell, gate_bias, weight_hh, num_prefix_tokens)
    hidden, new_cell, _, _ = STEP_FWD(tokens, cell, gate_bias, weight_hh, num_prefix_tokens, save_gates, backend)
    return hidden, new_cell


def lspt_step(tokens: Tensor, cell: Tensor, prompt: Tensor, weight_ih: Tensor, weight_hh: Tensor,
              bias_ih: Tensor, bias_hh: Tensor, *, num_prefix_tokens: int = 1,
              backend: str = "auto") -> tuple[Tensor, Tensor]:
    """One LSPT step: (hidden, new_cell) = LSTMCell(prompt, (prompts_out + patches.mean(1), cell)).

    tokens (B, T, D) is a block's output laid out [prefix (k) | prompts (Np) | patches]; cell is
    (B, Np, D); prompt (Np, D) is P[l]; the weights are in torch.nn.LSTMCell layout (gate order
    i, f, g, o). Under torch.autocast the GEMM runs in the autocast dtype and the cell state and gate
    math in fp32 (the cell is returned in fp32).
    """
    backend = backends.canonical(backend)
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
    with autocast_off(device_type):
        gate_bias = gate_bias_rows(prompt, weight_ih, bias_ih, bias_hh)
    if backend != "eager":
        if tokens.stride(-1) != 1:
            tokens = tokens.contiguous()
        cell, weight_hh = cell.contiguous(), weight_hh.contiguous()
    backend = resolve_backend(backend, tokens.device, tokens.dtype, cell.dtype, weight_hh.dtype, tokens.shape[-1],
                              num_prefix_tokens, False, selfcheck.token_layout(tokens))
    return fused_step(tokens, cell, gate_bias, weight_hh, num_prefix_tokens, backend, torch.is_grad_enabled())


def fused_grouped_step(tokens: Tensor, cell: Tensor, gate_bias: Tensor, weight_hh: Tensor, offsets: Tensor,
                       num_prefix_tokens: int, backend: str) -> tuple[Tensor, Tensor]:
    """The grouped step from validated inputs (check_grouped_inputs, check_group_offsets) and a resolved
    backend: no per-call validation and no device sync (a caller that validated once per forward)."""
    if backend == "eager":
        with autocast_off(tokens.device.type):
            return grouped_step_eager(tokens, cell, gate_bias, weight_hh, offsets, num_prefix_tokens)
    return GROUPED_STEP(tokens, cell, gate_bias, weight_hh, offsets, num_prefix_tokens, backend)


def _tracing(t: Tensor) -> bool:
    """Whether `t`'s values are unreadable here: under torch.compile / torch.export, or a fake or meta tensor."""
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return True
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(t)


def grouped_step(tokens: Tensor, cell: Tensor, gate_bias: Tensor, weight_hh: Tensor, offsets: Tensor,
                 num_prefix_tokens: int, backend: str) -> tuple[Tensor, Tensor]:
    """The step of a batch whose rows are grouped by task (MultiTaskEncoder; inference only): rows
    offsets[g]:offsets[g+1] use weight_hh[g] (G, 4D, D); gate_bias (B, Np, 4D) holds each row's own
    task's rows; offsets (G + 1,) int64 on the tokens' device, 0 = offsets[0] <= ... <= offsets[G] = B.
    Returns (hidden (B, Np, D) tokens.dtype, new_cell (B, Np, D) cell.dtype).

    backend: a resolved name (`resolve_grouped_backend`), or "auto" / an alias, resolved here.
    Validates every argument (contract.check_grouped_inputs) and, outside torch.compile / export,
    the values of offsets, which costs one device sync per call; the kernels clamp every group to
    [0, B] whatever offsets hold. The fused backends refuse inputs that require grad under grad mode
    (GROUPED_INFERENCE_ONLY); the eager one is plain PyTorch and differentiable."""
    device_type = tokens.device.type if isinstance(tokens, Tensor) else "cpu"
    autocast = isinstance(tokens, Tensor) and autocast_enabled(device_type)
    check_grouped_inputs(tokens, cell, gate_bias, weight_hh, offsets, num_prefix_tokens, autocast=autocast)
    if not _tracing(offsets):
        check_group_offsets(offsets, tokens.shape[0])
    name = backends.canonical(backend)
    if name == "auto":
        name = resolve_grouped_backend(name, tokens.device, tokens.dtype, cell.dtype, weight_hh.dtype,
                                       tokens.shape[-1], num_prefix_tokens, selfcheck.token_layout(tokens))
    return fused_grouped_step(tokens, cell, gate_bias, weight_hh, offsets, num_prefix_tokens, name)
