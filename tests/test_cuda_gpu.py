"""The CUDA backend (csrc/cuda) against the reference step: forward and every gradient.

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
import textwrap
from pathlib import Path

import pytest
import torch

from lspt_kernels import ops
from lspt_kernels.ops import lspt_step, step_reference

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
    why = ops.unavailable_reason("cuda")
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
            h, c = step_reference(*(args[n] for n in NAMES), num_prefix_tokens=k)
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
    same = run_step(vals, dts, k, "reference", grads=grads)
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
    same = run_step(vals, dts, k, "reference", layout=layout, grads=grads)
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
    """The C++ entry points re-check the contract (the Python wrapper checks first)."""
    _cuda_or_skip()
    from lspt_kernels import _build
    ext = _build.load_extension("cuda")
    vals, _ = make_inputs(2, 3, 4, 8, 1)
    f = {n: v.float() for n, v in vals.items()}
    args = [f[n] for n in NAMES]

    def fwd(**over):
        a = dict(zip(NAMES, args), k=1)
        a.update(over)
        return ext.cuda_forward(*(a[n] for n in NAMES), a["k"])

    hidden, new_cell, xhat = fwd()
    assert hidden.shape == new_cell.shape == xhat.shape == (2, 3, 8)
    with pytest.raises(RuntimeError, match="cell must be a CUDA tensor"):
        fwd(cell=f["cell"].cpu())
    with pytest.raises(RuntimeError, match="cell must have shape"):
        fwd(cell=f["cell"][:, :2])
    with pytest.raises(RuntimeError, match="leaves no patch token"):
        fwd(k=5)
    with pytest.raises(RuntimeError, match="share one dtype"):
        fwd(bias_hh=f["bias_hh"].double())
    with pytest.raises(RuntimeError, match="unsupported dtype combination"):
        fwd(tokens=f["tokens"].bfloat16(), cell=f["cell"], **{n: f[n].half() for n in NAMES[2:]})
    with pytest.raises(RuntimeError, match="w_hh must have shape"):
        fwd(weight_hh=f["weight_hh"][:-1])
    gh = torch.randn_like(hidden)
    grads = ext.cuda_backward(gh, torch.zeros_like(new_cell), xhat, f["cell"], *args[2:], 1, 8)
    assert [tuple(g.shape) for g in grads] == [(2, 8, 8), (2, 3, 8), (3, 8), (32, 8), (32, 8), (32,), (32,)]
    with pytest.raises(RuntimeError, match="leaves no patch token"):
        ext.cuda_backward(gh, torch.zeros_like(new_cell), xhat, f["cell"], *args[2:], 1, 4)
    with pytest.raises(RuntimeError, match="xhat"):
        ext.cuda_backward(gh, torch.zeros_like(new_cell), xhat.double(), f["cell"], *args[2:], 1, 8)


@requires_cuda
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_cuda_step_under_compute_sanitizer(tool, tmp_path):
    _cuda_or_skip()
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    sanitizer = shutil.which("compute-sanitizer") or str(Path(home) / "bin" / "compute-sanitizer")
    if not Path(sanitizer).is_file():
        pytest.skip("compute-sanitizer not found")
    script = tmp_path / "step.py"
    script.write_text(textwrap.dedent("""
        import torch
        from lspt_kernels.ops import lspt_step
        torch.manual_seed(0)
        # (B, Np, N, D, k, dtype): a vectorised bf16 case with several batch chunks and a scalar
        # (D = 770) fp32 case with split-K, each forward and backward.
        for B, Np, N, D, k, dt in [(5, 7, 13, 64, 1, torch.bfloat16), (3, 3, 6, 770, 5, torch.float32)]:
            T = k + Np + N
            mk = lambda *s: torch.randn(*s, device="cuda", dtype=dt).requires_grad_(True)
            xs = [mk(B, T, D), mk(B, Np, D), mk(Np, D), mk(4 * D, D), mk(4 * D, D), mk(4 * D), mk(4 * D)]
            h, c = lspt_step(*xs, num_prefix_tokens=k, backend="cuda")
            (h.float().sum() + c.float().square().sum()).backward()
        torch.cuda.synchronize()
        print("step ok")
    """))
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sanitizer, f"--tool={tool}", "--error-exitcode=3", sys.executable, str(script)],
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
    why = ops.unavailable_reason("cuda")
    assert why is not None and "CUDA" in why
