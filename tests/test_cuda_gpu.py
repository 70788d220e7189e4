"""The GPU backends against the eager step: the CUDA backend (csrc/cuda) at odd shapes, layouts and
dtypes, gradcheck, determinism and its memory checks; both GPU backends ("cuda", "triton") at ViT-B's
width D = 768 with >= 2048 prompt rows (the large-batch GEMM tiles), shared and per-image gate-bias
rows, and under compute-sanitizer at the paper's shape.

Accuracy rule (flash-attention's): against an fp64 oracle, the kernel's error is at most twice the
error of the reference step run in the same precision, plus a small floor. The GPU tests are skipped
without a CUDA device (they are never reported as passed there); the CPU-side checks run everywhere.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lspt_kernels import backends, ops
from lspt_kernels.eager import gate_bias_rows, lspt_step_eager
from lspt_kernels.ops import lspt_step

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ROOT = Path(__file__).resolve().parents[1]

NAMES = ("tokens", "cell", "prompt", "weight_ih", "weight_hh", "bias_ih", "bias_hh")
F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
# (tokens, cell, weights, autocast): the contract's dtype combinations.
DTYPES = {
    "fp32": (F32, F32, F32, False),
    "fp16": (F16, F16, F16, False),
    "bf16": (BF16, BF16, BF16, False),
    "fp16-cell32": (F16, F32, F16, False),
    "bf16-cell32": (BF16, F32, BF16, False),
    "autocast-bf16": (F32, F32, BF16, True),
    "autocast-fp16": (F32, F32, F16, True),
}
FLOOR = {F32: 2e-5, F16: 2e-3, BF16: 1.6e-2, F64: 1e-10}
# (B, Np, N, D, k): odd shapes (D = 40 and 770 are not multiples of 8 or 16 bytes' worth of
# elements for every dtype), k = 0/1/5, and one larger case (several batch chunks, split-K).
SHAPES = [(3, 7, 13, 40, 1), (3, 7, 13, 40, 5), (2, 5, 9, 770, 1), (4, 3, 6, 64, 0),
          (33, 20, 50, 256, 1)]


def _cuda_or_skip():
    why = backends.unavailable_reason("cuda")
    if why is None:
        return
    from torch.utils import cpp_extension
    if cpp_extension.CUDA_HOME is None:
        pytest.skip(f"no CUDA toolkit to build the extension: {why}")
    pytest.fail(f"CUDA backend unavailable on a machine with a GPU and a toolkit: {why}")


def make_inputs(B, Np, N, D, k, layout="contiguous", seed=0, device="cuda"):
    """fp64 leaves; tokens laid out as asked (stride(-1) == 1 always)."""
    g = torch.Generator().manual_seed(seed)
    T = k + Np + N
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    tokens = r(B, T, D)
    vals = dict(tokens=tokens, cell=r(B, Np, D), prompt=0.5 * r(Np, D),
                weight_ih=r(4 * D, D) / D ** 0.5, weight_hh=r(4 * D, D) / D ** 0.5,
                bias_ih=0.1 * r(4 * D), bias_hh=0.1 * r(4 * D))
    return {n: v.to(device) for n, v in vals.items()}, layout


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout with stride(-1) == 1."""
    if layout == "contiguous":
        return t.contiguous()
    B, T, D = t.shape
    if layout == "padded":  # row stride D + 3, storage offset 1: unaligned, scalar path
        buf = torch.zeros(B, T, D + 4, dtype=t.dtype, device=t.device)
        buf[:, :, 1:1 + D] = t
        out = buf[:, :, 1:1 + D]
    elif layout == "transposed":  # (T, B, D) storage: batch stride D, token stride B*D
        out = t.transpose(0, 1).contiguous().transpose(0, 1)
    else:
        raise ValueError(layout)
    assert out.stride(-1) == 1 and torch.equal(out, t)
    return out


def run_step(vals, dtypes, k, backend, layout="contiguous", grads=None):
    """(hidden, new_cell, grads of the 7 inputs) for one backend; grads=(dh, dc) in fp64."""
    t_dt, c_dt, w_dt, autocast = dtypes
    leaves = {}
    for n, v in vals.items():
        dt = t_dt if n == "tokens" else c_dt if n == "cell" else (F32 if autocast else w_dt)
        leaves[n] = v.to(dt).detach().requires_grad_(True)
    args = dict(leaves)
    args["tokens"] = _layout(leaves["tokens"], layout)
    ctx = torch.autocast("cuda", dtype=w_dt) if autocast else contextlib.nullcontext()
    with ctx:
        if backend == "oracle":
            h, c = lspt_step_eager(*(args[n] for n in NAMES), num_prefix_tokens=k)
        else:
            h, c = lspt_step(*(args[n] for n in NAMES), num_prefix_tokens=k, backend=backend)
    dh, dc = grads
    gr = torch.autograd.grad((h, c), [leaves[n] for n in NAMES], (dh.to(h.dtype), dc.to(c.dtype)))
    return [h, c] + list(gr)


def _check(name, kernel, same, oracle, dt):
    kernel, same, oracle = kernel.double(), same.double(), oracle.double()
    assert kernel.shape == oracle.shape, name
    assert torch.isfinite(kernel).all(), f"{name}: non-finite values"
    scale = max(1.0, oracle.abs().max().item())
    err = (kernel - oracle).abs().max().item()
    ref_err = (same - oracle).abs().max().item()
    assert err <= 2 * ref_err + FLOOR[dt] * scale, (
        f"{name}: kernel error {err:.3g} vs the same-precision reference's {ref_err:.3g} "
        f"(allowed {2 * ref_err + FLOOR[dt] * scale:.3g}, scale {scale:.3g})")


@requires_cuda
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-Np{}-N{}-D{}-k{}".format(*s))
@pytest.mark.parametrize("dtypes", list(DTYPES), ids=str)
def test_cuda_matches_reference(shape, dtypes):
    _cuda_or_skip()
    B, Np, N, D, k = shape
    dts = DTYPES[dtypes]
    vals, _ = make_inputs(B, Np, N, D, k)
    g = torch.Generator().manual_seed(1)
    grads = (torch.randn(B, Np, D, generator=g, dtype=F64).cuda(),
             torch.randn(B, Np, D, generator=g, dtype=F64).cuda())
    oracle = run_step(vals, (F64, F64, F64, False), k, "oracle", grads=grads)
    same = run_step(vals, dts, k, "eager", grads=grads)
    kern = run_step(vals, dts, k, "cuda", grads=grads)
    t_dt, c_dt, w_dt, _ = dts
    assert kern[0].dtype == t_dt and kern[1].dtype == c_dt
    out_names = ["hidden", "new_cell"] + [f"grad_{n}" for n in NAMES]
    out_dts = [t_dt, c_dt, t_dt, c_dt] + [w_dt] * 5
    for name, a, b, o, dt in zip(out_names, kern, same, oracle, out_dts):
        _check(name, a, b, o, dt)


@requires_cuda
@pytest.mark.parametrize("layout", ["padded", "transposed"])
@pytest.mark.parametrize("dtypes", ["fp32", "bf16", "autocast-fp16"])
@pytest.mark.parametrize("shape", [(3, 7, 13, 40, 1), (2, 5, 9, 770, 5), (5, 4, 11, 64, 1)],
                         ids=lambda s: "B{}-Np{}-N{}-D{}-k{}".format(*s))
def test_cuda_noncontiguous_tokens(shape, dtypes, layout):
    _cuda_or_skip()
    B, Np, N, D, k = shape
    dts = DTYPES[dtypes]
    vals, _ = make_inputs(B, Np, N, D, k, seed=3)
    grads = (torch.randn(B, Np, D, dtype=F64, device="cuda"),
             torch.randn(B, Np, D, dtype=F64, device="cuda"))
    base = run_step(vals, dts, k, "cuda", grads=grads)
    strided = run_step(vals, dts, k, "cuda", layout=layout, grads=grads)
    oracle = run_step(vals, (F64, F64, F64, False), k, "oracle", grads=grads)
    same = run_step(vals, dts, k, "eager", layout=layout, grads=grads)
    tol = 4 * FLOOR[dts[2]]  # the GEMM precision: xhat may round differently (summation order)
    for i, (a, b) in enumerate(zip(base, strided)):
        torch.testing.assert_close(b.double(), a.double(), atol=tol, rtol=tol,
                                   msg=lambda m: f"output {i}: {m}")
    out_dts = [dts[0], dts[1], dts[0], dts[1]] + [dts[2]] * 5
    for i, (a, s, o, dt) in enumerate(zip(strided, same, oracle, out_dts)):
        _check(f"output {i}", a, s, o, dt)


@requires_cuda
def test_cuda_backward_is_deterministic():
    _cuda_or_skip()
    B, Np, N, D, k = 33, 20, 50, 770, 1  # several batch chunks and grad_prompt splits
    vals, _ = make_inputs(B, Np, N, D, k)
    grads = (torch.randn(B, Np, D, dtype=F64, device="cuda"),
             torch.randn(B, Np, D, dtype=F64, device="cuda"))
    first = run_step(vals, DTYPES["bf16-cell32"], k, "cuda", grads=grads)
    second = run_step(vals, DTYPES["bf16-cell32"], k, "cuda", grads=grads)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@requires_cuda
@pytest.mark.parametrize("shape,layout", [((2, 3, 4, 8, 1), "contiguous"), ((3, 2, 5, 6, 0), "padded"),
                                          ((2, 3, 3, 5, 2), "transposed")])
def test_cuda_gradcheck_fp64(shape, layout):
    _cuda_or_skip()
    B, Np, N, D, k = shape
    vals, _ = make_inputs(B, Np, N, D, k, seed=5)
    inputs = [vals[n].clone().requires_grad_(True) for n in NAMES]

    def fn(*xs):
        xs = list(xs)
        xs[0] = _layout(xs[0], layout)
        return lspt_step(*xs, num_prefix_tokens=k, backend="cuda")

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@requires_cuda
def test_cuda_batch_of_zero():
    _cuda_or_skip()
    vals, _ = make_inputs(0, 3, 4, 8, 1)
    leaves = [vals[n].float().requires_grad_(True) for n in NAMES]
    h, c = lspt_step(*leaves, num_prefix_tokens=1, backend="cuda")
    assert h.shape == (0, 3, 8) and c.shape == (0, 3, 8)
    (h.sum() + c.sum()).backward()
    assert all(x.grad is not None and not x.grad.any() for x in leaves[2:])


@requires_cuda
def test_cuda_kernels_check_their_inputs():
    """A direct op call reaches the C++ kernels without the Python checks: their memory checks
    (csrc/checks.h) raise, naming the argument."""
    _cuda_or_skip()
    vals, _ = make_inputs(2, 3, 4, 8, 1)
    f = {n: v.float() for n, v in vals.items()}
    gb = gate_bias_rows(f["prompt"], f["weight_ih"], f["bias_ih"], f["bias_hh"])
    args = dict(tokens=f["tokens"], cell=f["cell"], gate_bias=gb, weight_hh=f["weight_hh"], k=1)

    def fwd(**over):
        a = dict(args, **over)
        return torch.ops.lspt.step_fwd(a["tokens"], a["cell"], a["gate_bias"], a["weight_hh"], a["k"], False, "cuda")

    hidden, new_cell, xhat, gates = fwd()
    assert hidden.shape == new_cell.shape == xhat.shape == (2, 3, 8) and gates.numel() == 0
    with pytest.raises(RuntimeError, match="cell must be a CUDA tensor|cell is on"):
        fwd(cell=f["cell"].cpu())
    with pytest.raises(RuntimeError, match="cell must have shape"):
        fwd(cell=f["cell"][:, :2].contiguous())
    with pytest.raises(RuntimeError, match="leaves no patch token"):
        fwd(k=5)
    with pytest.raises(RuntimeError, match="share one dtype"):
        fwd(gate_bias=gb.double())
    with pytest.raises(RuntimeError, match="tokens .* must have the weights' dtype"):
        fwd(tokens=f["tokens"].bfloat16(), gate_bias=gb.half(), weight_hh=f["weight_hh"].half())
    with pytest.raises(RuntimeError, match="weight_hh must have shape"):
        fwd(weight_hh=f["weight_hh"][:-1])
    gh = torch.randn_like(hidden)

    def bwd(T=8, xhat=xhat):
        return torch.ops.lspt.step_bwd(gh, torch.zeros_like(new_cell), xhat, f["cell"], gb, f["weight_hh"], gates,
                                       1, T, "cuda")

    assert [tuple(g.shape) for g in bwd()] == [(2, 8, 8), (2, 3, 8), (3, 32), (32, 8)]
    with pytest.raises(RuntimeError, match="leaves no patch token"):
        bwd(T=4)
    with pytest.raises(RuntimeError, match="xhat"):
        bwd(xhat=xhat.double())


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtypes", ["fp32", "bf16", "fp16", "autocast-bf16"])
@pytest.mark.parametrize("per_image", [False, True], ids=["shared-rows", "per-image-rows"])
def test_vit_b_width_with_many_rows(backend, dtypes, per_image):
    """D = 768 and 32 x 64 = 2048 prompt rows: the GEMM tiles a ViT-B/16 at a real batch picks (Triton's
    "half_large" for 16-bit weights), forward and every gradient against the fp64 oracle."""
    if backend == "cuda":
        _cuda_or_skip()
    elif backends.unavailable_reason("triton"):
        pytest.skip(f"triton backend unavailable: {backends.unavailable_reason('triton')}")
    B, Np, N, D, k = 32, 64, 49, 768, 1
    t_dt, c_dt, w_dt, autocast = DTYPES[dtypes]
    vals, _ = make_inputs(B, Np, N, D, k, seed=7)
    mask = (torch.rand(B, Np, D, device="cuda", generator=torch.Generator("cuda").manual_seed(8)) > 0.1) / 0.9
    g = torch.Generator().manual_seed(9)
    grads = (torch.randn(B, Np, D, generator=g, dtype=F64).cuda(), torch.randn(B, Np, D, generator=g, dtype=F64).cuda())
    out = {}
    for name, dts in (("kernel", (t_dt, c_dt, w_dt)), ("same", (t_dt, c_dt, w_dt)), ("oracle", (F64, F64, F64))):
        leaves = [vals[n].to(dt).detach().requires_grad_() for n, dt in
                  zip(NAMES, (dts[0], dts[1]) + (dts[2],) * 5)]
        tokens, cell, prompt, w_ih, w_hh, b_ih, b_hh = leaves
        gb = gate_bias_rows(prompt * mask.to(prompt.dtype) if per_image else prompt, w_ih, b_ih, b_hh)
        h, c = ops.fused_step(tokens, cell, gb, w_hh, k, backend if name == "kernel" else "eager")
        out[name] = [h, c, *torch.autograd.grad((h, c), leaves, (grads[0].to(h.dtype), grads[1].to(c.dtype)))]
    out_names = ["hidden", "new_cell"] + [f"grad_{n}" for n in NAMES]
    out_dts = [t_dt, c_dt, t_dt, c_dt] + [w_dt] * 5
    for name, a, b, o, dt in zip(out_names, out["kernel"], out["same"], out["oracle"], out_dts):
        _check(name, a, b, o, dt)


SANITIZED_STEP = """
import sys, torch
from lspt_kernels.ops import lspt_step
backend = sys.argv[1]
torch.manual_seed(0)
# (B, Np, N, D, k, dtype): the paper's table shape (ViT-B/16 at 224 px, batch 64, Np 10) in bf16; a
# vectorised bf16 case with several batch chunks; a scalar (D = 770) fp32 case; forward and backward.
for B, Np, N, D, k, dt in [(64, 10, 196, 768, 1, torch.bfloat16), (5, 7, 13, 64, 1, torch.bfloat16),
                           (3, 3, 6, 770, 5, torch.float32)]:
    T = k + Np + N
    mk = lambda *s, sc=1.0: (torch.randn(*s, device="cuda") * sc).to(dt).requires_grad_(True)
    xs = [mk(B, T, D), mk(B, Np, D), mk(Np, D), mk(4 * D, D, sc=D ** -0.5), mk(4 * D, D, sc=D ** -0.5),
          mk(4 * D), mk(4 * D)]
    h, c = lspt_step(*xs, num_prefix_tokens=k, backend=backend)
    (h.float().sum() + c.float().square().sum()).backward()
torch.cuda.synchronize()
print("step ok")
"""


def sanitizer_path() -> str | None:
    """compute-sanitizer on PATH or under CUDA_HOME (None when absent)."""
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    found = shutil.which("compute-sanitizer") or str(Path(home) / "bin" / "compute-sanitizer")
    return found if Path(found).is_file() else None


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_step_under_compute_sanitizer(backend, tool, tmp_path):
    if backend == "cuda":
        _cuda_or_skip()
    elif backends.unavailable_reason("triton"):
        pytest.skip(f"triton backend unavailable: {backends.unavailable_reason('triton')}")
    sanitizer = sanitizer_path()
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found")
    script = tmp_path / "step.py"
    script.write_text(SANITIZED_STEP)
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1", LSPT_SELFCHECK="0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sanitizer, f"--tool={tool}", "--error-exitcode=3", sys.executable, str(script), backend],
                          capture_output=True, text=True, timeout=900, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "step ok" in out, out[-8000:]
    assert "ERROR SUMMARY: 0 errors" in out or "RACECHECK SUMMARY: 0 hazards" in out, out[-8000:]


# ------------------------------------------------------------------------------------------------
# CPU-side: run everywhere
# ------------------------------------------------------------------------------------------------
def test_cuda_backend_rejects_cpu_tensors():
    vals, _ = make_inputs(2, 3, 4, 8, 1, device="cpu")
    with pytest.raises(ValueError, match="backend 'cuda' needs CUDA tensors"):
        lspt_step(*(vals[n] for n in NAMES), num_prefix_tokens=1, backend="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU fallback")
def test_cuda_backend_unavailable_without_gpu_says_why():
    why = backends.unavailable_reason("cuda")
    assert why is not None and "CUDA" in why
