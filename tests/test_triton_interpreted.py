"""Triton's launch configurations for real ViT widths, run by the interpreter (TRITON_INTERPRET=1).

tests/test_step.py runs the Triton backend at D <= 40 (the "small" GEMM tile and the "narrow" row
tile); a ViT-B picks other entries of triton_kernels.GEMM_CONFIGS / ROW_CONFIGS ("fp32_ieee", "tf32",
"half", "half_large", "wide"). Each case here runs at D = 96 or 112, where the K loop ends in a
partial tile (a K tail) and the row kernels' columns in a partial block, with shared and per-image
gate-bias rows, and compares the forward and every gradient with the eager step. The interpreter
has no bf16 (tested on a GPU: tests/test_cuda_gpu.py) and is exact for fp32 GEMMs, so the "tf32"
entry is compared at fp32 tolerances.
"""
from __future__ import annotations

import pytest
import torch
from test_step import TOL, as_fp64, make_inputs, upstream

from lspt_kernels import backends, ops
from lspt_kernels.eager import gate_bias_rows

# (config the launcher must pick, weight dtype, D, tl.dot precision): K tails of 112 % 32, 96 % 64
CASES = [
    ("fp32_ieee", torch.float32, 112, "ieee"),
    ("fp32_ieee", torch.float32, 96, "ieee"),
    ("tf32", torch.float32, 112, "tf32"),
    ("half", torch.float16, 96, None),
    ("half_large", torch.float16, 96, None),
]


@pytest.fixture(autouse=True)
def interpreted_triton():
    if torch.cuda.is_available() or not backends.triton_interpreted():
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1, no GPU)")
    why = backends.unavailable_reason("triton")
    if why is not None:
        pytest.skip(f"triton backend unavailable: {why}")


@pytest.fixture
def cuda_fp32_precision():
    before = torch.backends.cuda.matmul.fp32_precision
    yield
    torch.backends.cuda.matmul.fp32_precision = before


@pytest.mark.parametrize("per_image", [False, True], ids=["shared-rows", "per-image-rows"])
@pytest.mark.parametrize("config, dtype, width, precision", CASES, ids=[f"{c[0]}-D{c[2]}" for c in CASES])
def test_vit_width_configuration(config, dtype, width, precision, per_image, monkeypatch, cuda_fp32_precision):
    from lspt_kernels import triton_kernels as tk
    if precision is not None:
        torch.backends.cuda.matmul.fp32_precision = precision
    B, n_p, N, k = 2, 3, 5, 1
    if config == "half_large":   # its tile at a width the interpreter can afford (real: D >= 512, 2048 rows)
        monkeypatch.setattr(tk, "gemm_config_name", lambda *args: "half_large")
    assert tk.gemm_config_name(B * n_p, width, dtype, tk.dot_precision(dtype)) == config
    assert tk.row_config_name(width) == "wide"
    shape = (B, n_p, N, width, k)
    inputs = make_inputs(shape, dtype)
    mask = (torch.rand(B, n_p, width, generator=torch.Generator().manual_seed(2)) > 0.3) / 0.7   # prompt dropout
    grads = upstream(shape, dtype, dtype, "cpu")
    out = {}
    for name, leaves in (("triton", inputs), ("eager", inputs), ("fp64", as_fp64(inputs))):
        t, c, p, wi, wh, bi, bh = leaves
        if per_image:
            p = p * mask.to(p.dtype)                                  # (B, Np, D): per-image gate-bias rows
        gb = gate_bias_rows(p, wi, bi, bh)
        h, new_c = ops.fused_step(t, c, gb, wh, k, "eager" if name != "triton" else "triton")
        up = tuple(g.to(h.dtype) for g in grads)
        out[name] = [h, new_c, *torch.autograd.grad((h, new_c), leaves, up)]
    tol = TOL[dtype]
    for i, (got, want, truth) in enumerate(zip(out["triton"], out["eager"], out["fp64"])):
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=lambda m: f"output {i}: {m}")
            continue
        err = (got.double() - truth).abs().max().item()
        ref_err = (want.double() - truth).abs().max().item()
        assert err <= max(tol * truth.abs().max().item(), 2 * ref_err), (i, err, ref_err)
