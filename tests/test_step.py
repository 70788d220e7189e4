"""The fused LSPT step (lspt_kernels.lspt_step / torch.ops.lspt.step_fwd, step_bwd) on every backend.

Each backend is compared with the pure-PyTorch `lspt_step_eager` (the "eager" backend) and with torch.nn.LSTMCell on the
same inputs and upstream gradients: forward (hidden, new_cell) and all seven gradients. A backend
that cannot run here is skipped with the reason from `unavailable_reason`, never reported as passed.
"triton" runs on a GPU, or on the CPU under TRITON_INTERPRET=1 (tests/conftest.py sets it when no
GPU is visible) with tiny shapes and fp32/fp16 only: the interpreter is slow and has no bf16.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lspt_kernels import backends, ops
from lspt_kernels.eager import gate_bias_rows, lspt_step_eager
from lspt_kernels.ops import lspt_step

BACKENDS = ["eager", "cpu", "triton", "cuda"]
FUSED = ["cpu", "triton", "cuda"]
HAS_CUDA = torch.cuda.is_available()
TRITON_INTERPRETED = not HAS_CUDA and os.environ.get("TRITON_INTERPRET") == "1"
NAMES = ["hidden", "new_cell", "grad_tokens", "grad_cell", "grad_prompt", "grad_weight_ih",
         "grad_weight_hh", "grad_bias_ih", "grad_bias_hh"]

# (B, Np, N, D, k): tiny; the deliberately odd shape; the odd shape with 5 prefix tokens (4 register
# tokens + CLS); no prefix token at all; more prompt rows than one GEMM block of the C++ backend
# (1024 rows), so its forward runs image-blocked.
TINY = (2, 3, 5, 16, 1)
ODD = (3, 7, 13, 40, 1)
SHAPES = [TINY, ODD, (3, 7, 13, 40, 5), (2, 4, 6, 24, 0), (3, 600, 5, 8, 1)]
SHAPE_IDS = ["tiny", "odd", "odd-k5", "k0", "multi-block"]

# Per-dtype tolerances (Liger-Kernel's per-dtype rule): fp32 elementwise atol/rtol; low precision relative to the
# largest magnitude, or within 2x of the same-precision reference's own error (flash-attention's rule).
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 2e-2}


def device_for(backend: str) -> str:
    return "cuda" if backend == "cuda" or (backend == "triton" and HAS_CUDA) else "cpu"


def require(backend: str, dtype: torch.dtype | None = None) -> str:
    """Skip unless `backend` can run here (with `dtype`); returns the device to put tensors on."""
    if backend == "cuda" and not HAS_CUDA:
        pytest.skip("cuda backend: no CUDA device is visible to torch")
    if backend == "triton" and not (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("triton backend: needs a GPU or TRITON_INTERPRET=1")
    if backend == "triton" and TRITON_INTERPRETED and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bf16 arithmetic (tested on a GPU)")
    if backend != "eager":
        why = backends.unavailable_reason(backend)
        if why is not None:
            pytest.skip(f"{backend} backend unavailable: {why}")
    return device_for(backend)


def make_inputs(shape, dtype=torch.float32, *, cell_dtype=None, device="cpu", seed=0, scale=1.0):
    """Leaf tensors (tokens, cell, prompt, w_ih, w_hh, b_ih, b_hh), all requiring grad."""
    B, n_p, N, D, k = shape
    g = torch.Generator().manual_seed(seed)
    std = D ** -0.5  # gates of order 1: every nonlinearity away from saturation

    def t(*size, s=1.0, dt=dtype):
        return (torch.randn(*size, generator=g) * s).to(device=device, dtype=dt).requires_grad_()

    return (t(B, k + n_p + N, D, s=scale), t(B, n_p, D, dt=cell_dtype or dtype), t(n_p, D, s=0.5),
            t(4 * D, D, s=std), t(4 * D, D, s=std), t(4 * D, s=std), t(4 * D, s=std))


def upstream(shape, hidden_dtype, cell_dtype, device, seed=1):
    B, n_p, _, D, _ = shape
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, n_p, D, generator=g).to(device, hidden_dtype),
            torch.randn(B, n_p, D, generator=g).to(device, cell_dtype))


def run_step(step, inputs, k, grads):
    """[hidden, new_cell, *the 7 input gradients] for the given upstream gradients."""
    hidden, new_cell = step(*inputs, k)
    return [hidden, new_cell, *torch.autograd.grad((hidden, new_cell), inputs, grads)]


def fused(backend):
    return lambda *a: lspt_step(*a[:-1], num_prefix_tokens=a[-1], backend=backend)


def reference(*a):
    return lspt_step_eager(*a[:-1], num_prefix_tokens=a[-1])


def as_fp64(inputs):
    return tuple(t.detach().double().requires_grad_() for t in inputs)


def assert_step_close(got, want, dtype, *, truth=None):
    """got/want: [hidden, new_cell, *grads]. fp32/fp64: elementwise atol = rtol = TOL. fp16/bf16:
    max error <= TOL * max|truth|, or <= 2x the error of `want` (same precision) against `truth`
    (fp64)."""
    tol = TOL[dtype]
    for i, name in enumerate(NAMES):
        g, w = got[i], want[i]
        assert g.shape == w.shape and g.dtype == w.dtype, f"{name}: {g.shape}/{g.dtype} vs {w.shape}/{w.dtype}"
        if dtype in (torch.float32, torch.float64):
            torch.testing.assert_close(g, w, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")
            continue
        t = truth[i].double()
        err = (g.double() - t).abs().max().item()
        ref_err = (w.double() - t).abs().max().item()
        bound = max(tol * t.abs().max().item(), 2 * ref_err)
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} (same-precision reference: {ref_err:.3g})"


# ------------------------------------------------------------------------------------------------
# Parity with the reference step
# ------------------------------------------------------------------------------------------------
DTYPE_CASES = [  # (dtype of tokens and weights, cell dtype)
    (torch.float32, None), (torch.float64, None), (torch.float16, None), (torch.bfloat16, None),
    (torch.float16, torch.float32), (torch.bfloat16, torch.float32),
]
DTYPE_IDS = ["fp32", "fp64", "fp16", "bf16", "fp16-cell32", "bf16-cell32"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtypes", DTYPE_CASES, ids=DTYPE_IDS)
def test_matches_reference(backend, shape, dtypes):
    dtype, cell_dtype = dtypes
    device = require(backend, dtype)
    if backend == "triton" and TRITON_INTERPRETED and (shape not in (TINY, ODD) or dtype == torch.float64
                                                       or (cell_dtype and shape != TINY)):
        pytest.skip("interpreted Triton: kept to the tiny and odd shapes, fp32/fp16")
    inputs = make_inputs(shape, dtype, cell_dtype=cell_dtype, device=device)
    grads = upstream(shape, dtype, cell_dtype or dtype, device)
    got = run_step(fused(backend), inputs, shape[4], grads)
    want = run_step(reference, inputs, shape[4], grads)
    truth = None
    if dtype in (torch.float16, torch.bfloat16):
        truth = run_step(reference, as_fp64(inputs), shape[4], tuple(g.double() for g in grads))
    assert_step_close(got, want, dtype, truth=truth)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # numpy, interpreted Triton
def test_saturated_gates(backend):
    """Large activations drive every gate into saturation (exp/tanh clamping paths)."""
    device = require(backend)
    inputs = make_inputs(TINY, device=device, scale=40.0)
    grads = upstream(TINY, torch.float32, torch.float32, device)
    got = run_step(fused(backend), inputs, 1, grads)
    want = run_step(reference, inputs, 1, grads)
    for g, w, name in zip(got, want, NAMES):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_stays_in_its_image(backend):
    """A NaN patch token poisons its own image's outputs (as in the reference), not silently
    clamped away, and no other image's."""
    device = require(backend)
    tokens, *rest = (t.detach() for t in make_inputs(ODD, device=device))
    tokens[1, -1, 3] = float("nan")
    hidden, new_cell = lspt_step(tokens, *rest, num_prefix_tokens=ODD[4], backend=backend)
    ref_hidden, ref_cell = lspt_step_eager(tokens, *rest, num_prefix_tokens=ODD[4])
    assert torch.equal(hidden.isnan(), ref_hidden.isnan()) and hidden[1].isnan().all()
    assert torch.equal(new_cell.isnan(), ref_cell.isnan())
    assert torch.isfinite(hidden[[0, 2]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [TINY, ODD, (3, 7, 13, 40, 5)], ids=["tiny", "odd", "odd-k5"])
def test_matches_nn_lstmcell(backend, shape):
    """The step is LSTMCell(input = prompt, (prompt outputs + patch mean, cell)) row-wise."""
    device = require(backend)
    B, n_p, N, D, k = shape
    tokens, cell, prompt, *_ = make_inputs(shape, device=device)
    lstm = torch.nn.LSTMCell(D, D).to(device)
    params = [lstm.weight_ih, lstm.weight_hh, lstm.bias_ih, lstm.bias_hh]
    gh, gc = upstream(shape, torch.float32, torch.float32, device)

    hidden, new_cell = lspt_step(tokens, cell, prompt, *params, num_prefix_tokens=k, backend=backend)
    got = [hidden, new_cell, *torch.autograd.grad((hidden, new_cell), [tokens, cell, prompt, *params], (gh, gc))]

    xhat = tokens[:, k:k + n_p] + tokens[:, k + n_p:].mean(1, keepdim=True)
    h, c = lstm(prompt.expand(B, n_p, D).reshape(B * n_p, D), (xhat.reshape(B * n_p, D), cell.reshape(B * n_p, D)))
    h, c = h.view(B, n_p, D), c.view(B, n_p, D)
    want = [h, c, *torch.autograd.grad((h, c), [tokens, cell, prompt, *params], (gh, gc))]
    for g, w, name in zip(got, want, NAMES):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------------------------
# Layouts
# ------------------------------------------------------------------------------------------------
def _strided_tokens(layout, shape, device):
    """Tokens with the values of make_inputs(shape)[0] in a non-contiguous layout."""
    B, n_p, N, D, k = shape
    T = k + n_p + N
    values = make_inputs(shape, device=device)[0].detach()
    if layout == "slice-T":  # a window of a longer token buffer: stride(1) == D, stride(0) == (T+5)*D
        buf = torch.randn(B, T + 5, D, device=device)
        out = buf[:, 3:3 + T]
    elif layout == "T-major":  # transposed then transposed back: stride(0) == D, stride(1) == B*D
        out = torch.empty(T, B, D, device=device).transpose(0, 1)
    else:  # "stride-D": every other channel, stride(-1) == 2 (the wrapper must make it unit-stride)
        out = torch.empty(B, T, 2 * D, device=device)[..., ::2]
    with torch.no_grad():
        out.copy_(values)
    return out.requires_grad_() if out.is_leaf else out.detach().requires_grad_()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["slice-T", "T-major", "stride-D"])
def test_noncontiguous_tokens_and_cell(backend, layout):
    device = require(backend)
    shape = ODD
    tokens = _strided_tokens(layout, shape, device)
    assert not tokens.is_contiguous() and (tokens.stride(-1) == 1) == (layout != "stride-D")
    _, cell, *params = make_inputs(shape, device=device)
    cell_nc = torch.empty(cell.shape[1], cell.shape[0], cell.shape[2], device=device).transpose(0, 1)
    with torch.no_grad():
        cell_nc.copy_(cell)
    cell_nc.requires_grad_()
    assert not cell_nc.is_contiguous()
    inputs = (tokens, cell_nc, *params)
    grads = upstream(shape, torch.float32, torch.float32, device)
    got = run_step(fused(backend), inputs, shape[4], grads)
    want = run_step(reference, inputs, shape[4], grads)
    assert_step_close(got, want, torch.float32)


@pytest.mark.parametrize("backend", FUSED)
def test_kernel_reads_strided_tokens_in_place(backend):
    """The registered op itself takes tokens with stride(-1) == 1 but any other strides (the
    encoder passes a view of its token buffer): same result as on a contiguous copy."""
    device = require(backend)
    shape = ODD
    tokens = _strided_tokens("slice-T", shape, device).detach()
    _, cell, *params = (t.detach() for t in make_inputs(shape, device=device))
    prompt, w_ih, w_hh, b_ih, b_hh = params
    gb = gate_bias_rows(prompt, w_ih, b_ih, b_hh)
    got = torch.ops.lspt.step_fwd(tokens, cell, gb, w_hh, shape[4], True, backend)
    want = torch.ops.lspt.step_fwd(tokens.contiguous(), cell, gb, w_hh, shape[4], True, backend)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------
# Mixed precision (torch.autocast)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast(backend, amp_dtype):
    """Under autocast the GEMMs run in the autocast dtype and the cell stays fp32 (returned fp32);
    hidden and every gradient keep their input's dtype (fp32)."""
    device = require(backend, amp_dtype)
    if backend == "triton" and TRITON_INTERPRETED and amp_dtype == torch.bfloat16:
        pytest.skip("interpreted Triton has no bf16")
    shape = ODD if not TRITON_INTERPRETED or backend != "triton" else TINY
    inputs = make_inputs(shape, device=device)
    grads = upstream(shape, torch.float32, torch.float32, device)
    with torch.autocast(device, dtype=amp_dtype):
        got = run_step(fused(backend), inputs, shape[4], grads)
        hidden, new_cell = lspt_step(*inputs, num_prefix_tokens=shape[4], backend=backend)
    assert hidden.dtype == torch.float32 and new_cell.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in got)

    # Same casts by hand, through the reference: weights in amp_dtype, tokens and cell fp32.
    def ref_amp(tokens, cell, *rest):
        *params, k = rest
        return lspt_step_eager(tokens, cell, *(p.to(amp_dtype) for p in params), num_prefix_tokens=k)

    want = run_step(ref_amp, inputs, shape[4], grads)
    truth = run_step(reference, as_fp64(inputs), shape[4], tuple(g.double() for g in grads))
    assert_step_close(got, want, amp_dtype, truth=truth)


# ------------------------------------------------------------------------------------------------
# Gradcheck (fp64) and op registration
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_fp64(backend):
    device = require(backend, torch.float64)
    interpreted = backend == "triton" and TRITON_INTERPRETED
    shape = (2, 2, 3, 4, 1)  # B > 1 and Np > 1 so the batch and prompt sums are exercised
    inputs = make_inputs(shape, torch.float64, device=device)

    def f(*a):
        return lspt_step(*a, num_prefix_tokens=shape[4], backend=backend)

    # The interpreter costs ~ms per launch: random-projection gradcheck (a few evaluations).
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=interpreted)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_fp64_per_image_gate_bias(backend):
    """fp64 gradcheck of the step from per-image (B, Np, 4D) gate-bias rows (prompt dropout)."""
    device = require(backend, torch.float64)
    interpreted = backend == "triton" and TRITON_INTERPRETED
    B, n_p, N, D, k = (2, 2, 3, 4, 1)
    g = torch.Generator().manual_seed(0)

    def t(*size, s=1.0):
        return (torch.randn(*size, generator=g, dtype=torch.float64) * s).to(device).requires_grad_()

    inputs = (t(B, k + n_p + N, D), t(B, n_p, D), t(B, n_p, 4 * D, s=0.5), t(4 * D, D, s=0.5))

    def f(tokens, cell, gb, w_hh):
        return ops.fused_step(tokens, cell, gb, w_hh, k, backend)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=interpreted)


def _fwd_args(backend, device, requires_grad=True, per_image=False):
    """(tokens, cell, gate_bias, w_hh, k, save_gates, backend) for torch.ops.lspt.step_fwd."""
    tokens, cell, prompt, w_ih, w_hh, b_ih, b_hh = make_inputs(TINY, device=device)
    if per_image:   # per-image prompt rows (prompt dropout): (B, Np, 4D) gate bias
        prompt = prompt * torch.rand(TINY[0], *prompt.shape, generator=torch.Generator().manual_seed(3)).to(device)
    with torch.no_grad():
        gb = gate_bias_rows(prompt, w_ih, b_ih, b_hh)
    inputs = (tokens, cell, gb.requires_grad_(), w_hh)
    if not requires_grad:
        inputs = tuple(t.detach() for t in inputs)
    return (*inputs, TINY[4], True, backend)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("per_image", [False, True], ids=["shared-rows", "per-image-rows"])
def test_opcheck_step_fwd(backend, per_image):
    device = require(backend)
    torch.library.opcheck(torch.ops.lspt.step_fwd, _fwd_args(backend, device, per_image=per_image))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("per_image", [False, True], ids=["shared-rows", "per-image-rows"])
def test_opcheck_step_bwd(backend, per_image):
    device = require(backend)
    tokens, cell, gb, w_hh, k, save, _ = _fwd_args(backend, device, requires_grad=False, per_image=per_image)
    _, _, xhat, gates = torch.ops.lspt.step_fwd(tokens, cell, gb, w_hh, k, save, backend)
    gh, gc = upstream(TINY, torch.float32, torch.float32, device)
    torch.library.opcheck(torch.ops.lspt.step_bwd,
                          (gh, gc, xhat, cell, gb, w_hh, gates, k, tokens.shape[1], backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [TINY, ODD], ids=["tiny", "odd"])
def test_per_image_gate_bias(backend, shape):
    """Per-image gate bias rows (B, Np, 4D), as prompt dropout makes them: forward and all gradients
    match the eager step on the same rows (the shared (Np, 4D) case is what lspt_step runs)."""
    device = require(backend)
    B, n_p, N, D, k = shape
    tokens, cell, prompt, w_ih, w_hh, b_ih, b_hh = make_inputs(shape, device=device)
    mask = (torch.rand(B, n_p, D, generator=torch.Generator().manual_seed(5)) > 0.3).to(device) / 0.7
    grads = upstream(shape, torch.float32, torch.float32, device)
    params = (tokens, cell, prompt, w_ih, w_hh, b_ih, b_hh)
    out = []
    for name in (backend, "eager"):
        gb = gate_bias_rows(prompt * mask, w_ih, b_ih, b_hh)                  # (B, Np, 4D)
        assert gb.shape == (B, n_p, 4 * D)
        h, c = ops.fused_step(tokens, cell, gb, w_hh, k, name)
        out.append([h, c, *torch.autograd.grad((h, c), params, grads)])
    assert_step_close(out[0], out[1], torch.float32)


# ------------------------------------------------------------------------------------------------
# Memory: what one step keeps alive for backward
# ------------------------------------------------------------------------------------------------
def saved_bytes(step, inputs, k):
    """Bytes of distinct storages saved for backward that the step created (not an input's)."""
    alive = {t.untyped_storage().data_ptr() for t in inputs}
    new = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in alive:
            new[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden, new_cell = step(*inputs, k)
    return sum(new.values()), (hidden, new_cell)


@pytest.mark.parametrize("backend", FUSED)
def test_saves_less_than_eager_for_backward(backend):
    """GPU backends keep only Xhat_SP (they recompute the gates); the cpu backend also keeps the
    activated gates (4D fp32 values per row, backends.SAVES_GATES) and not the gate bias, still less
    than eager autograd."""
    device = require(backend)
    shape = ODD
    B, n_p, _, D, k = shape
    inputs = make_inputs(shape, device=device)
    eager, _ = saved_bytes(reference, inputs, k)
    fused_bytes, _ = saved_bytes(fused(backend), inputs, k)
    # GPU backends: Xhat_SP and the gate bias rows lspt_step computed (to recompute the gates);
    # the cpu backend: Xhat_SP and the activated gates.
    saves_gates = backend in backends.SAVES_GATES
    expected = B * n_p * D * 4 + (B * n_p * 4 * D * 4 if saves_gates else n_p * 4 * D * 4)
    assert fused_bytes == expected, f"{backend} saved {fused_bytes} B, expected {expected} B"
    assert fused_bytes < eager, f"{backend} saved {fused_bytes} B, eager autograd {eager} B"
    with torch.no_grad():   # nothing saved, and no gates written, when no gradient is needed
        *_, gates = torch.ops.lspt.step_fwd(inputs[0], inputs[1], gate_bias_rows(*inputs[2:4], *inputs[5:]),
                                            inputs[4], k, False, backend)
    assert gates.numel() == 0


# ------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument, before any kernel runs
# ------------------------------------------------------------------------------------------------
def _good(device="cpu"):
    return [t.detach() for t in make_inputs(TINY, device=device)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_errors(backend):
    device = require(backend)
    B, n_p, N, D, k = TINY
    tokens, cell, prompt, w_ih, w_hh, b_ih, b_hh = _good(device)

    def call(*a, k=k):
        return lspt_step(*a, num_prefix_tokens=k, backend=backend)

    w8 = torch.randn(4 * 8, 8, device=device)
    with pytest.raises(ValueError, match=r"weight_hh must be \(4D, D\)"):
        call(tokens, cell, prompt, w_ih, w8, b_ih, b_hh)
    with pytest.raises(ValueError, match=r"weight_ih must be \(4D, D\)"):
        call(tokens, cell, prompt, w8, w_hh, b_ih, b_hh)
    with pytest.raises(ValueError, match=r"prompt must be \(Np, D\)"):
        call(tokens, cell, torch.randn(n_p, D + 1, device=device), w_ih, w_hh, b_ih, b_hh)
    with pytest.raises(ValueError, match=r"cell must be \(B, Np, D\)"):
        call(tokens, cell[:, :-1], prompt, w_ih, w_hh, b_ih, b_hh)
    with pytest.raises(ValueError, match=r"num_prefix_tokens \+ Np"):
        call(tokens, cell, prompt, w_ih, w_hh, b_ih, b_hh, k=N + 1)
    with pytest.raises(TypeError, match=r"tokens \(torch.float16\) and the LSTM weights"):
        call(tokens.half(), cell.half(), prompt, w_ih, w_hh, b_ih, b_hh)
    with pytest.raises(TypeError, match=r"bias_hh is torch.float64"):
        call(tokens, cell, prompt, w_ih, w_hh, b_ih, b_hh.double())
    with pytest.raises(ValueError, match=r"one device.*cell on meta"):
        call(tokens, cell.to("meta"), prompt, w_ih, w_hh, b_ih, b_hh)


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be one of .*'nope'"):
        lspt_step(*_good(), backend="nope")


@pytest.mark.parametrize("per_image", [False, True], ids=["shared-rows", "per-image-rows"])
def test_cpu_backward_recomputing_the_gates(per_image):
    """The cpu backend's other backward (a forward that saved no gates, save_gates=False: recompute
    them from Xhat_SP, as the GPU backends do) matches eager too."""
    require("cpu")
    shape = ODD
    B, n_p, N, D, k = shape
    tokens, cell, prompt, w_ih, w_hh, b_ih, b_hh = make_inputs(shape)
    if per_image:
        prompt = prompt * torch.rand(B, n_p, D, generator=torch.Generator().manual_seed(9))
    grads = upstream(shape, torch.float32, torch.float32, "cpu")
    params = (tokens, cell, w_ih, w_hh, b_ih, b_hh)
    out = []
    for name in ("cpu", "eager"):
        gb = gate_bias_rows(prompt, w_ih, b_ih, b_hh)
        h, c = ops.fused_step(tokens, cell, gb, w_hh, k, name, save_gates=False)
        out.append([h, c, *torch.autograd.grad((h, c), params, grads)])
    *_, gates = torch.ops.lspt.step_fwd(tokens.detach(), cell.detach(), gb.detach(), w_hh.detach(), k, False, "cpu")
    assert gates.numel() == 0
    for g, w in zip(*out):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_reference_is_an_alias_of_eager():
    a = lspt_step(*_good(), backend="reference")
    b = lspt_step(*_good(), backend="eager")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert backends.resolve("reference", torch.device("cpu")) == "eager"


def test_op_refuses_unknown_backend():
    """A direct op call names the choices (issue 13, item 10), not a bare KeyError."""
    tokens, cell, gb, w_hh, k, save, _ = _fwd_args("cpu", "cpu", requires_grad=False)
    for name in ("nonsense", "eager", "auto"):
        message = r"lspt::step_fwd: backend must be one of \('cpu', 'triton', 'cuda'\).*" + repr(name)
        with pytest.raises(ValueError, match=message):
            torch.ops.lspt.step_fwd(tokens, cell, gb, w_hh, k, save, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bool_num_prefix_tokens_refused(backend):
    """num_prefix_tokens=True is not 1: one rule (in the one input check) for every backend."""
    device = require(backend)
    with pytest.raises(ValueError, match=r"num_prefix_tokens must be an int >= 0 \(not a bool\), got True"):
        lspt_step(*_good(device), num_prefix_tokens=True, backend=backend)


def test_unavailable_backend(monkeypatch):
    monkeypatch.setattr(backends, "_loaded", set())
    monkeypatch.setitem(backends._unavailable, "cpu", "RuntimeError: no C++ compiler")
    with pytest.raises(RuntimeError, match=r"backend 'cpu' is not available here: RuntimeError: no C\+\+ compiler"):
        lspt_step(*_good(), backend="cpu")
    assert backends.unavailable_reason("cpu") == "RuntimeError: no C++ compiler"


def test_auto_without_a_compiler_runs_eager_with_one_warning(monkeypatch):
    """No fused backend loads (no compiler, or a build that failed before): "auto" runs the eager step
    and says so once, naming the reason."""
    monkeypatch.setattr(backends, "_loaded", set())
    monkeypatch.setattr(backends, "_warned_auto", set())
    monkeypatch.setitem(backends._unavailable, "cpu", "RuntimeError: the cpu extension failed to build: ...")
    inputs = _good()
    with pytest.warns(RuntimeWarning, match=r"no fused backend for cpu tensors \(cpu: RuntimeError: the cpu extension "
                                            r"failed to build.*using the eager"):
        hidden, _ = lspt_step(*inputs, backend="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lspt_step(*inputs, backend="auto")
    assert torch.equal(hidden, lspt_step_eager(*inputs)[0])


def test_gpu_backends_reject_cpu_tensors():
    with pytest.raises(ValueError, match=r"backend 'cuda' needs CUDA tensors"):
        lspt_step(*_good(), backend="cuda")


@pytest.mark.parametrize("backend", FUSED)
def test_kernel_checks(backend):
    """A direct op call reaches the kernels without the Python checks: their own memory checks raise
    (naming the argument) instead of reading out of bounds."""
    device = require(backend)
    B, n_p, N, D, k = TINY
    T = k + n_p + N
    tokens, cell, prompt, w_ih, w_hh, b_ih, b_hh = _good(device)

    def fwd(*a):
        return torch.ops.lspt.step_fwd(*a, backend)

    def bwd(*a):
        return torch.ops.lspt.step_bwd(*a, backend)

    gb = gate_bias_rows(prompt, w_ih, b_ih, b_hh)
    with pytest.raises((RuntimeError, ValueError), match="cell"):
        fwd(tokens, cell[:, :, :-1].contiguous(), gb, w_hh, k, True)
    with pytest.raises((RuntimeError, ValueError), match="weight_hh"):
        fwd(tokens, cell, gb, w_hh[:-1], k, True)
    with pytest.raises((RuntimeError, ValueError), match="gate_bias"):
        fwd(tokens, cell, gb[:-1], w_hh, k, True)
    with pytest.raises((RuntimeError, ValueError), match="patch"):
        fwd(tokens, cell, gb, w_hh, N + 1, True)
    with pytest.raises((RuntimeError, ValueError), match="stride"):
        fwd(tokens.transpose(1, 2).contiguous().transpose(1, 2), cell, gb, w_hh, k, True)
    with pytest.raises((RuntimeError, TypeError), match="tokens"):
        fwd(tokens.double(), cell.double(), gb, w_hh, k, True)
    with pytest.raises((RuntimeError, ValueError), match="cell.*contiguous|contiguous.*cell"):
        fwd(tokens, cell.transpose(0, 1).contiguous().transpose(0, 1), gb, w_hh, k, True)
    hidden, new_cell, xhat, gates = fwd(tokens, cell, gb, w_hh, k, True)
    with pytest.raises((RuntimeError, ValueError), match="patch"):
        bwd(hidden, new_cell, xhat, cell, gb, w_hh, gates, k, k + n_p)
    with pytest.raises((RuntimeError, ValueError), match="grad_cell"):
        bwd(hidden, new_cell[:1], xhat, cell, gb, w_hh, gates, k, T)
    if backend in backends.SAVES_GATES:
        with pytest.raises(RuntimeError, match="gates"):
            bwd(hidden, new_cell, xhat, cell, gb, w_hh, gates[:1], k, T)


# ------------------------------------------------------------------------------------------------
# Property: the C++ backend equals the reference on arbitrary small shapes
# ------------------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 4), n_p=st.integers(1, 6), N=st.integers(1, 9), D=st.integers(1, 48),
       k=st.integers(0, 5), fp64=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_cpu_matches_reference_property(B, n_p, N, D, k, fp64, seed):
    require("cpu")
    dtype = torch.float64 if fp64 else torch.float32
    shape = (B, n_p, N, D, k)
    inputs = make_inputs(shape, dtype, seed=seed)
    grads = upstream(shape, dtype, dtype, "cpu", seed=seed + 1)
    assert_step_close(run_step(fused("cpu"), inputs, k, grads), run_step(reference, inputs, k, grads), dtype)
