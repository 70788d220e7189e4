"""The grouped step (lspt_kernels.ops.grouped_step / torch.ops.lspt.grouped_step): multi-task inference,
rows grouped by task, each group's rows with its own W_hh.

Every CPU-runnable backend ("eager", "cpu", "triton" under the interpreter) is compared with the eager
grouped step (`grouped_step_eager`, one `step_eager` per non-empty group) at odd group sizes, empty
groups first / in the middle / last, one row, one group, K tails (D = 40, 96), odd Np, strided tokens
and mixed dtypes; G = 1 against the single-task op; torch.compile / torch.export / meta tensors; the
clear errors (bad arguments, bad offsets, inputs that require grad); the kernels' clamping of any
offsets; the self-check of the grouped path. The GPU cases at the end are skipped without CUDA.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from test_step import TOL, require

from lspt_kernels import backends, ops, selfcheck
from lspt_kernels.eager import grouped_step_eager

CPU_BACKENDS = ["eager", "cpu", "triton"]
HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def grouped_inputs(sizes, n_p=3, N=5, D=16, k=1, dtype=torch.float32, cell_dtype=None, device="cpu", seed=0):
    """(tokens, cell, gate_bias, weight_hh, offsets) for groups of `sizes` rows; gates of order 1."""
    g = torch.Generator().manual_seed(seed)
    B, G = sum(sizes), len(sizes)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * scale  # noqa: E731
    tokens = r(B, k + n_p + N, D).to(device, dtype)
    cell = r(B, n_p, D).to(device, cell_dtype or dtype)
    gate_bias = r(B, n_p, 4 * D, scale=0.5).to(device, dtype)
    weight_hh = r(G, 4 * D, D, scale=D ** -0.5).to(device, dtype)
    offsets = torch.tensor([0, *sizes], dtype=torch.int64).cumsum(0).to(device)
    return tokens, cell, gate_bias, weight_hh, offsets


def as_fp64(inputs):
    return tuple(t.double() if t.is_floating_point() else t for t in inputs)


def assert_grouped_close(got, inputs, k, dtype):
    """got = (hidden, new_cell) against the eager grouped step: fp32 / fp64 elementwise at TOL; 16-bit:
    max error against the fp64 evaluation within TOL x its magnitude or 2x the eager step's own error."""
    want = grouped_step_eager(*inputs, k)
    truth = grouped_step_eager(*as_fp64(inputs), k)
    for name, g, w, t in zip(("hidden", "new_cell"), got, want, truth):
        assert g.shape == w.shape and g.dtype == w.dtype, f"{name}: {g.shape}/{g.dtype} vs {w.shape}/{w.dtype}"
        if dtype in (torch.float32, torch.float64):
            torch.testing.assert_close(g, w, atol=TOL[dtype], rtol=TOL[dtype], msg=lambda m: f"{name}: {m}")
            continue
        err = (g.double() - t).abs().max().item()
        ref_err = (w.double() - t).abs().max().item()
        bound = max(TOL[dtype] * t.abs().max().item(), 2 * ref_err)
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} (eager at this precision: {ref_err:.3g})"


def run(backend, inputs, k):
    with torch.no_grad():
        return ops.grouped_step(*inputs, k, backend)


# ------------------------------------------------------------------------------------------------
# Parity with the eager grouped step
# ------------------------------------------------------------------------------------------------
# (group sizes, Np, D, k): odd sizes; an empty group first, in the middle, last; one row; one group;
# odd Np with a K tail (D = 40); a ViT-like K tail (D = 96: the "wide" / "fp32_ieee" Triton entries).
CASES = [
    ((1, 3, 5), 3, 16, 1), ((0, 3, 1), 3, 16, 1), ((3, 0, 5), 3, 16, 1), ((1, 5, 0), 3, 16, 1),
    ((1,), 3, 16, 1), ((4,), 3, 16, 0), ((2, 0, 1, 3), 7, 40, 5), ((3, 0, 2), 5, 96, 1),
]
CASE_IDS = ["odd", "empty-first", "empty-middle", "empty-last", "one-row", "one-group-k0", "odd-Np-D40-k5",
            "D96"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("sizes, n_p, D, k", CASES, ids=CASE_IDS)
def test_matches_eager_grouped_step_fp32(backend, sizes, n_p, D, k):
    device = require(backend, torch.float32)
    inputs = grouped_inputs(sizes, n_p=n_p, D=D, k=k, device=device)
    assert_grouped_close(run(backend, inputs, k), inputs, k, torch.float32)


@pytest.mark.parametrize("backend, dtype, cell_dtype", [
    ("eager", torch.float64, None), ("cpu", torch.float64, None), ("triton", torch.float64, None),
    ("triton", torch.float16, None), ("cpu", torch.float16, None), ("cpu", torch.bfloat16, None),
    ("triton", torch.float16, torch.float32), ("cpu", torch.float16, torch.float32),
], ids=["eager-fp64", "cpu-fp64", "triton-fp64", "triton-fp16", "cpu-fp16", "cpu-bf16", "triton-fp16-cell32",
        "cpu-fp16-cell32"])
@pytest.mark.parametrize("D", [40, 96])
def test_matches_eager_grouped_step_other_dtypes(backend, dtype, cell_dtype, D):
    device = require(backend, dtype)
    inputs = grouped_inputs((3, 0, 1, 5), n_p=5, D=D, dtype=dtype, cell_dtype=cell_dtype, device=device)
    got = run(backend, inputs, 1)
    assert got[0].dtype == dtype and got[1].dtype == (cell_dtype or dtype)
    assert_grouped_close(got, inputs, 1, dtype)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_one_group_is_the_single_task_op(backend):
    """G = 1 with offsets [0, B]: the single-task op with per-image gate-bias rows, the same numbers."""
    device = require(backend, torch.float32)
    tokens, cell, gate_bias, weight_hh, offsets = grouped_inputs((5,), n_p=7, D=40, device=device)
    with torch.no_grad():
        got = ops.grouped_step(tokens, cell, gate_bias, weight_hh, offsets, 1, backend)
        want = ops.fused_step(tokens, cell, gate_bias, weight_hh[0], 1, backend, False)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_tokens(backend):
    """tokens with stride(-1) == 1 sliced out of a larger buffer (a block's output view)."""
    device = require(backend, torch.float32)
    tokens, *rest = grouped_inputs((2, 0, 3), n_p=3, D=24, device=device)
    buf = torch.zeros(tokens.shape[0], tokens.shape[1] + 2, tokens.shape[2] + 8, device=device)
    buf[:, 1:-1, 3:-5] = tokens
    strided = buf[:, 1:-1, 3:-5]
    assert not strided.is_contiguous() and strided.stride(-1) == 1
    inputs = (strided, *rest)
    assert_grouped_close(run(backend, inputs, 1), inputs, 1, torch.float32)


def test_cpu_under_autocast():
    """Under autocast: tokens and cell fp32, gate bias and W_hh in the autocast dtype (the contract's rule)."""
    require("cpu", torch.bfloat16)
    tokens, cell, gate_bias, weight_hh, offsets = grouped_inputs((2, 0, 3), D=24)
    inputs = (tokens, cell, gate_bias.bfloat16(), weight_hh.bfloat16(), offsets)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = ops.grouped_step(*inputs, 1, "cpu")
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert_grouped_close(got, inputs, 1, torch.bfloat16)


def test_empty_batch():
    require("cpu")
    inputs = grouped_inputs((0, 0), D=16)
    for backend in ("eager", "cpu"):
        hidden, new_cell = run(backend, inputs, 1)
        assert hidden.shape == (0, 3, 16) and new_cell.shape == (0, 3, 16)


# ------------------------------------------------------------------------------------------------
# Offsets: checked on the host by grouped_step; clamped by every kernel whatever they hold
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [[1, 2, 5], [0, 4, 3], [0, 2, 4], [0, 2, 9], [-1, 2, 5]],
                         ids=["not-from-0", "decreasing", "short-of-B", "past-B", "negative"])
def test_bad_offsets_are_refused(bad):
    tokens, cell, gate_bias, weight_hh, _ = grouped_inputs((2, 3))
    offsets = torch.tensor(bad)
    with pytest.raises(ValueError, match=r"grouped_step: offsets must start at 0, never decrease and end at B=5"):
        ops.grouped_step(tokens, cell, gate_bias, weight_hh, offsets, 1, "eager")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_kernels_clamp_any_offsets(backend):
    """A direct op call (no host check) with offsets outside [0, B]: each group is clamped to the batch,
    so [-7, 2, 99] computes what [0, 2, 5] computes and nothing is read or written out of bounds."""
    device = require(backend, torch.float32)
    tokens, cell, gate_bias, weight_hh, offsets = grouped_inputs((2, 3), device=device)
    with torch.no_grad():
        want = ops.GROUPED_STEP(tokens, cell, gate_bias, weight_hh, offsets, 1, backend)
        got = ops.GROUPED_STEP(tokens, cell, gate_bias, weight_hh, torch.tensor([-7, 2, 99], device=device), 1,
                               backend)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        # A decreasing pair clamps to an empty group: [0, 5, 2] computes what [0, 5, 5] computes.
        got = ops.GROUPED_STEP(tokens, cell, gate_bias, weight_hh, torch.tensor([0, 5, 2], device=device), 1,
                               backend)
        want = ops.GROUPED_STEP(tokens, cell, gate_bias, weight_hh, torch.tensor([0, 5, 5], device=device), 1,
                                backend)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------
# Bad input: each argument named
# ------------------------------------------------------------------------------------------------
def _bad(name):
    tokens, cell, gate_bias, weight_hh, offsets = grouped_inputs((2, 3), D=8)
    args = dict(tokens=tokens, cell=cell, gate_bias=gate_bias, weight_hh=weight_hh, offsets=offsets,
                num_prefix_tokens=1, backend="cpu")
    args.update({
        "tokens-dims": dict(tokens=tokens[0]),
        "tokens-stride": dict(tokens=tokens.transpose(1, 2).contiguous().transpose(1, 2)),
        "cell": dict(cell=cell[:, :, :4]),
        "cell-contiguous": dict(cell=cell.transpose(0, 1).contiguous().transpose(0, 1)),
        "gate_bias-shared": dict(gate_bias=gate_bias[0]),
        "gate_bias-dtype": dict(gate_bias=gate_bias.double()),
        "weight_hh-2d": dict(weight_hh=weight_hh[0]),
        "weight_hh-shape": dict(weight_hh=weight_hh[:, :, :4]),
        "tokens-dtype": dict(tokens=tokens.double()),
        "cell-dtype": dict(cell=cell.half()),
        "offsets-dtype": dict(offsets=offsets.int()),
        "offsets-shape": dict(offsets=offsets[:2]),
        "offsets-device": dict(offsets=offsets.to("meta")),
        "offsets-list": dict(offsets=offsets.tolist()),
        "num_prefix_tokens": dict(num_prefix_tokens=-1),
        "num_prefix_tokens-too-many": dict(num_prefix_tokens=6),
        "backend": dict(backend="fast"),
    }[name])
    return args


@pytest.mark.parametrize("name, exc, match", [
    ("tokens-dims", ValueError, r"grouped_step: tokens must be \(B, T, D\)"),
    ("tokens-stride", ValueError, r"grouped_step: tokens must have stride\(-1\) == 1"),
    ("cell", ValueError, r"grouped_step: cell must be \(B, Np, D\)"),
    ("cell-contiguous", ValueError, r"grouped_step: cell must be contiguous"),
    ("gate_bias-shared", ValueError, r"grouped_step: gate_bias must be \(B, Np, 4D\)"),
    ("gate_bias-dtype", TypeError, r"grouped_step: gate_bias \(torch.float64\) and weight_hh"),
    ("weight_hh-2d", ValueError, r"grouped_step: weight_hh must be \(G, 4D, D\)"),
    ("weight_hh-shape", ValueError, r"grouped_step: weight_hh must be \(G, 4D, D\)"),
    ("tokens-dtype", TypeError, r"grouped_step: tokens \(torch.float64\) and the LSTM weights"),
    ("cell-dtype", TypeError, r"grouped_step: cell must be torch.float32"),
    ("offsets-dtype", TypeError, r"grouped_step: offsets must be int64"),
    ("offsets-shape", ValueError, r"grouped_step: offsets must be \(G \+ 1,\) = \(3,\)"),
    ("offsets-device", ValueError, r"grouped_step: offsets must be on the tokens' device"),
    ("offsets-list", TypeError, r"grouped_step: offsets must be a torch.Tensor"),
    ("num_prefix_tokens", ValueError, r"grouped_step: num_prefix_tokens must be an int >= 0"),
    ("num_prefix_tokens-too-many", ValueError, r"grouped_step: .*leaves no patch token"),
    ("backend", ValueError, r"backend must be one of"),
])
def test_bad_input_names_the_argument(name, exc, match):
    with pytest.raises(exc, match=match):
        ops.grouped_step(**_bad(name))


def test_wrong_device_for_backend():
    inputs = grouped_inputs((2, 3))
    with pytest.raises(ValueError, match=r"backend 'cuda' needs CUDA tensors"):
        run("cuda", inputs, 1)


# ------------------------------------------------------------------------------------------------
# Inference only
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("which", [0, 1, 2, 3], ids=["tokens", "cell", "gate_bias", "weight_hh"])
def test_refuses_inputs_that_require_grad(backend, which):
    device = require(backend, torch.float32)
    inputs = list(grouped_inputs((2, 3), device=device))
    inputs[which].requires_grad_()
    with pytest.raises(RuntimeError, match=r"grouped \(multi-task\) step is inference-only.*LSPTEncoder"):
        ops.grouped_step(*inputs, 1, backend)
    with torch.no_grad():                       # the same call without grad mode runs
        ops.grouped_step(*inputs, 1, backend)
    with torch.inference_mode():
        hidden, _ = ops.grouped_step(*inputs, 1, backend)
    assert not hidden.requires_grad


def test_python_registration_refuses_too(monkeypatch):
    """The Python Autograd registration (devices without a loaded extension: Triton, meta) refuses the
    same way as the C++ one; here on meta tensors, which reach it."""
    inputs = [t.to("meta") for t in grouped_inputs((2, 3))]
    inputs[3].requires_grad_()
    with pytest.raises(RuntimeError, match=r"inference-only"):
        ops.GROUPED_STEP(*inputs, 1, "cpu")


# ------------------------------------------------------------------------------------------------
# Tracing: meta tensors, torch.compile, torch.export, FLOP counting
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_meta_tensors(backend):
    """Shapes and dtypes through the op's fake kernel (the eager step reads offsets' values: not on meta)."""
    tokens, cell, gate_bias, weight_hh, offsets = (t.to("meta") for t in grouped_inputs((2, 0, 3), D=8,
                                                                                        dtype=torch.float16))
    cell = cell.float()
    with torch.no_grad():
        hidden, new_cell = ops.grouped_step(tokens, cell, gate_bias, weight_hh, offsets, 1, backend)
    assert hidden.device.type == "meta" and hidden.shape == (5, 3, 8) and hidden.dtype == torch.float16
    assert new_cell.shape == (5, 3, 8) and new_cell.dtype == torch.float32


class GroupedModule(torch.nn.Module):
    """A tiny module calling the grouped step: the shape of a multi-task encoder's per-block call."""

    def __init__(self, weight_hh, gate_bias, backend):
        super().__init__()
        self.weight_hh = torch.nn.Parameter(weight_hh, requires_grad=False)
        self.gate_bias = torch.nn.Parameter(gate_bias, requires_grad=False)
        self.backend = backend

    def forward(self, tokens, cell, offsets):
        hidden, new_cell = ops.grouped_step(tokens, cell, self.gate_bias, self.weight_hh, offsets, 1, self.backend)
        return hidden * 2, new_cell


def test_torch_compile_fullgraph():
    require("cpu")
    tokens, cell, gate_bias, weight_hh, offsets = grouped_inputs((2, 0, 3))
    module = GroupedModule(weight_hh, gate_bias, "cpu")
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(tokens, cell, offsets)
        want = module(tokens, cell, offsets)
        # other offsets, same shapes: offsets are a graph input, not a constant
        other = torch.tensor([0, 4, 4, 5])
        got2 = compiled(tokens, cell, other)
        want2 = module(tokens, cell, other)
    for g, w in zip(got + got2, want + want2):
        torch.testing.assert_close(g, w, atol=0, rtol=0)
    torch.testing.assert_close(got2[0] / 2, grouped_step_eager(tokens, cell, gate_bias, weight_hh, other, 1)[0],
                               atol=1e-5, rtol=1e-5)


def test_torch_export_with_offsets_as_input():
    require("cpu")
    tokens, cell, gate_bias, weight_hh, offsets = grouped_inputs((2, 0, 3))
    module = GroupedModule(weight_hh, gate_bias, "cpu")
    with torch.no_grad():
        exported = torch.export.export(module, (tokens, cell, offsets))
    ops_in_graph = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert torch.ops.lspt.grouped_step.default in ops_in_graph
    other = torch.tensor([0, 1, 1, 5])
    with torch.no_grad():
        got = exported.module()(tokens, cell, other)
    want = grouped_step_eager(tokens, cell, gate_bias, weight_hh, other, 1)
    torch.testing.assert_close(got[0] / 2, want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)


def test_flop_count():
    from torch.utils.flop_counter import FlopCounterMode
    tokens, cell, gate_bias, weight_hh, offsets = (t.to("meta") for t in grouped_inputs((2, 0, 3), n_p=3, D=8))
    with FlopCounterMode(display=False) as counter:
        ops.GROUPED_STEP(tokens, cell, gate_bias, weight_hh, offsets, 1, "cpu")
    B, n_p, D = cell.shape
    assert counter.get_total_flops() == 8 * B * n_p * D * D


# ------------------------------------------------------------------------------------------------
# The self-check covers the grouped path
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def selfcheck_all(monkeypatch):
    monkeypatch.setenv("LSPT_SELFCHECK", "all")
    selfcheck.reset()
    yield
    selfcheck.reset()


def _resolve(backend, dtype=torch.float32, D=16):
    """Resolution on CPU tensors (Triton: its interpreter, as tests/test_selfcheck.py runs the mechanism)."""
    require(backend, dtype)
    if backend == "triton" and (HAS_CUDA or not backends.triton_interpreted()):
        pytest.skip("the self-check on CPU tensors needs the Triton interpreter (TRITON_INTERPRET=1, no GPU)")
    return ops.resolve_grouped_backend(backend, torch.device("cpu"), dtype, dtype, dtype, D, 1, "contiguous")


@pytest.mark.parametrize("backend, dtype, D", [("cpu", torch.float32, 16), ("cpu", torch.float16, 40),
                                               ("triton", torch.float32, 16), ("triton", torch.float16, 40)])
def test_real_grouped_kernels_pass_their_self_check(selfcheck_all, backend, dtype, D):
    assert _resolve(backend, dtype, D) == backend
    (key, (ok, reason)), = selfcheck._results.items()
    assert key[0] == backend and key[1].grouped and key[1].per_image_rows and ok, reason


def test_wrong_grouped_kernel_falls_back_with_one_warning(selfcheck_all, monkeypatch):
    _resolve("triton")      # skips where Triton cannot run on CPU tensors; loads and checks the real kernel
    selfcheck.reset()
    from lspt_kernels import triton_kernels
    real = triton_kernels.grouped_forward
    calls = []

    def wrong(*args):
        calls.append(1)
        hidden, new_cell = real(*args)
        return hidden + 0.05, new_cell
    monkeypatch.setattr(triton_kernels, "grouped_forward", wrong)
    with pytest.warns(RuntimeWarning, match=r"'triton' step kernels failed their self-check.*grouped step.*"
                                            r"hidden is off.*using the 'eager' step"):
        assert _resolve("triton") == "eager"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _resolve("triton") == "eager"        # recorded: no second check, no second warning
    assert len(calls) == 1
    # The single-task step in the same configuration is its own case: still checked, and passes.
    assert ops.resolve_backend("triton", torch.device("cpu"), torch.float32, torch.float32, torch.float32, 16, 1,
                               True, "contiguous") == "triton"


def test_grouped_step_auto_resolves(selfcheck_all):
    """backend='auto' resolves like lspt_step's (the cpu backend on CPU tensors), through the self-check."""
    require("cpu")
    inputs = grouped_inputs((1, 0, 2))
    assert_grouped_close(run("auto", inputs, 1), inputs, 1, torch.float32)
    assert any(case.grouped for (_, case) in selfcheck._results)


# ------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA): both GPU backends at ViT-B's width, every dtype, many groups
# ------------------------------------------------------------------------------------------------
GPU_DTYPES = {"fp32": (torch.float32, None), "fp16": (torch.float16, None), "bf16": (torch.bfloat16, None),
              "fp16-cell32": (torch.float16, torch.float32)}


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype_name", list(GPU_DTYPES))
@pytest.mark.parametrize("sizes, n_p, D", [((1, 3, 0, 5, 2), 7, 40), ((0, 13, 3, 0), 100, 768),
                                           ((7, 0, 9), 50, 770)], ids=["odd", "vit-b", "D770"])
def test_gpu_matches_eager_grouped_step(backend, dtype_name, sizes, n_p, D):
    require(backend)
    dtype, cell_dtype = GPU_DTYPES[dtype_name]
    inputs = grouped_inputs(sizes, n_p=n_p, N=9, D=D, dtype=dtype, cell_dtype=cell_dtype, device="cuda")
    assert_grouped_close(run(backend, inputs, 1), inputs, 1, dtype)


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_kernels_clamp_any_offsets_and_pass_self_check(backend, selfcheck_all):
    require(backend)
    tokens, cell, gate_bias, weight_hh, offsets = grouped_inputs((2, 3), D=40, device="cuda")
    with torch.no_grad():
        want = ops.GROUPED_STEP(tokens, cell, gate_bias, weight_hh, offsets, 1, backend)
        got = ops.GROUPED_STEP(tokens, cell, gate_bias, weight_hh, torch.tensor([-7, 2, 99], device="cuda"), 1,
                               backend)
    torch.cuda.synchronize()
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert ops.resolve_grouped_backend(backend, tokens.device, torch.float32, torch.float32, torch.float32, 40, 1,
                                       "contiguous") == backend
    assert backends.unavailable_reason(backend) is None


# ------------------------------------------------------------------------------------------------
# Triton: the configurations real widths select (D = 768: fp32 "fp32_ieee" / "tf32", fp16 / bf16
# "half" / "half_large"), run by the interpreter at D = 96 (K tail of 96 % 64) with the same table
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def cuda_fp32_precision():
    before = torch.backends.cuda.matmul.fp32_precision
    yield
    torch.backends.cuda.matmul.fp32_precision = before


@pytest.mark.parametrize("config, dtype, precision", [("fp32_ieee", torch.float32, "ieee"),
                                                      ("tf32", torch.float32, "tf32"),
                                                      ("half", torch.float16, None),
                                                      ("half_large", torch.float16, None)])
def test_triton_vit_width_configurations(config, dtype, precision, monkeypatch, cuda_fp32_precision):
    if HAS_CUDA or not backends.triton_interpreted():
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1, no GPU)")
    require("triton", dtype)
    from lspt_kernels import triton_kernels as tk
    if precision is not None:
        torch.backends.cuda.matmul.fp32_precision = precision
    assert tk.gemm_config_name(2048 if config == "half_large" else 6, 768, dtype, tk.dot_precision(dtype)) == config
    if config == "half_large":   # its 128-row tile at a size the interpreter can afford (real: >= 2048 rows)
        monkeypatch.setattr(tk, "gemm_config_name", lambda *args: "half_large")
    D, sizes, n_p = 96, (2, 0, 1), 5
    assert tk.gemm_config_name(sum(sizes) * n_p, D, dtype, tk.dot_precision(dtype)) == config
    inputs = grouped_inputs(sizes, n_p=n_p, D=D, dtype=dtype)
    # the interpreter's fp32 products are exact whatever the tl.dot precision: fp32 tolerances
    assert_grouped_close(run("triton", inputs, 1), inputs, 1, dtype)
