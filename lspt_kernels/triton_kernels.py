"""Triton backend of the fused LSPT step (the contract is in lspt_kernels/ops.py; reached through the
dispatcher as lspt::triton_step_fwd / triton_step_bwd, lspt_kernels/backends.py).

One step, with k prefix tokens, Np prompts and N = T - k - Np patches per image:

    m[b]        = mean_n tokens[b, k+Np+n]                      (fp32; fp64 for fp64 inputs)
    xhat[b, p]  = tokens[b, k+p] + m[b]                         (stored in the weight dtype W)
    gates[b, p] = xhat[b, p] @ w_hh^T + gate_bias[p]  (or gate_bias[b, p] for per-image rows)
    i, f, g, o  = sigmoid, sigmoid, tanh, sigmoid of the four D-wide chunks (nn.LSTMCell order)
    new_cell    = f * cell + i * g;   hidden = o * tanh(new_cell)

gate_bias = P[l] @ w_ih^T + b_ih + b_hh comes in precomputed (the encoder computes it for all steps
with one GEMM per forward; see lspt_kernels/ops.py). Gate-bias row of GEMM row r: r % period, with
period = Np for (Np, 4D) rows and B*Np for (B, Np, 4D) rows.

Launches per step
-----------------
forward (2 launches):
    _xhat_kernel      grid (B, D/BLOCK_D): mean over the N patch rows (fp32 accumulation), then
                      xhat[b, p, :] = tokens[b, k+p, :] + mean for all Np prompts
    _lstm_fwd_kernel  grid (B*Np/BLOCK_M, D/BLOCK_N): four tl.dot accumulators (rows g*D + n of
                      w_hh, g = i, f, g, o) over K = D, then the epilogue adds the gate-bias row in
                      fp32, applies the LSTM gate math in fp32 and writes hidden and new_cell.
                      The gates never touch memory.
grouped forward (ops.grouped_step, multi-task inference: 2 launches, no backward):
    _xhat_kernel      as above, for the whole batch (the patch mean does not depend on the task)
    _grouped_lstm_fwd_kernel  grid (G * M_TILES, D/BLOCK_N), M_TILES = B*Np/BLOCK_M (a group may hold
                      every row): program (g, M-tile, N-tile) reads its group's row range from
                      offsets on the device, clamped to [0, B]; tiles past it do nothing. The same
                      GEMM (_gate_preacts, weight_hh[g]) and epilogue (_lstm_cell_store) as above,
                      with the same configuration table; gate-bias rows are per row (B, Np, 4D).
backward (5 launches; recomputes the gates from xhat and the incoming cell, the only saved
activations):
    _lstm_bwd_kernel  the same tiled GEMM as the forward, then the LSTM backward in fp32; writes
                      dgates (B*Np, 4D) in W and grad_cell
    torch (cuBLAS)    dxhat = dgates @ w_hh;  dW_hh = dgates^T @ xhat
    torch.sum         d gate_bias = sum_b dgates (fp32 accumulation, written in W); for per-image
                      rows d gate_bias is dgates itself (no launch: 4 launches)
    _grad_tokens_kernel  grid (B, D/BLOCK_D, T/BLOCK_T): prefix rows 0, prompt rows dxhat, patch
                      rows (sum_p dxhat[b, p]) / N, in grad_hidden's dtype (the tokens' dtype)

Why dgates is stored in W (not fp32): the eager step's autograd produces the gate gradient in W too
(the gates are computed in W and cast to fp32, whose backward casts the gradient back), so W matches
its rounding; every consumer of dgates is a GEMM that cuBLAS runs on tensor cores only when both
operands share W (an fp32 dgates would need an fp32 copy of w_hh, or fp32 GEMMs); and it halves
the bytes written and read for fp16/bf16. The batch reduction of dgates accumulates in fp32.

Launch parameters are a small fixed table (GEMM_CONFIGS, ROW_CONFIGS) picked by gemm_config_name /
row_config_name from D, the weight dtype, the tl.dot precision and (for one 16-bit entry) B*Np: no
autotuning, so nothing needs a GPU to decide, the choice is reproducible, and every configuration a
launcher can pick is compiled for sm_80 and sm_90 (PTX, cubin, tensor-core instructions, no register
spills) by tests/test_triton_compile.py without a GPU. Every launch passes its block sizes,
num_warps, num_stages (GEMMs) and enable_fp_fusion explicitly.

Index arithmetic is 32-bit inside the tiles (64-bit per-image bases). Where B*Np*4D would reach
2**31 (e.g. batch 8192 at Np 100, D 768) the launchers split the batch into chunks of whole images
that stay below it (INDEX_LIMIT): the GEMM kernels see a smaller batch each, the weight and
shared gate-bias gradients are summed over the chunks. They refuse only what no chunking fixes:
one image with T*tokens.stride(1) >= 2**31 elements, or 4D*D >= 2**31.

Under TRITON_INTERPRET=1 (set before this module is imported) the kernels run on CPU tensors.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .contract import HALF, check_backward_inputs, check_fused_inputs, check_grouped_inputs
from .precision import float32_matmul_precision

# The kernels' 32-bit offsets must stay below this (a module constant so tests can lower it).
INDEX_LIMIT = 2 ** 31


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _tanh(x):
    # tanh through the sigmoid: core Triton has no tanh (libdevice is GPU-only), this is exact to
    # a few ulp of 1 and saturates correctly at +-inf.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _xhat_kernel(tok_ptr, xhat_ptr, stride_tb, stride_tt, k, Np, N, D,
                 ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """xhat[b, p, d] = tokens[b, k+p, d] + mean_n tokens[b, k+Np+n, d]; one program per (b, d-block)."""
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    tok_b = tok_ptr + b * stride_tb
    t = tl.arange(0, BLOCK_T)
    first = k + Np
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=ACC)
    for n0 in range(0, N, BLOCK_T):
        rows = first + n0 + t
        m = ((n0 + t) < N)[:, None] & dmask[None, :]
        x = tl.load(tok_b + rows[:, None] * stride_tt + d[None, :], mask=m, other=0.0)
        acc += x.to(ACC)
    mean = tl.sum(acc, axis=0) / N
    xhat_b = xhat_ptr + b * Np * D
    for p in range(0, Np):
        x = tl.load(tok_b + (k + p) * stride_tt + d, mask=dmask, other=0.0)
        y = x.to(ACC) + mean
        tl.store(xhat_b + p * D + d, y.to(xhat_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _gate_preacts(xhat_ptr, w_ptr, gb_ptr, rm, rn, M, GB_PERIOD, D,
                  ACC: tl.constexpr, PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Pre-activations of the four gates for rows rm (of B*Np) and columns rn (of D), in ACC:
    xhat[rm] @ w_hh[g*D + rn]^T + gate_bias[rm % GB_PERIOD, g*D + rn].
    Rows >= M and columns >= D are clamped (not masked) in the K loop, as in Triton's matmul
    tutorial: they read valid memory, their results are never stored, and only the K tail needs a
    mask (zero padding); that keeps predicates out of the inner loop."""
    rm_c = tl.minimum(rm, M - 1)
    rn_c = tl.minimum(rn, D - 1)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = xhat_ptr + rm_c[:, None] * D + rk[None, :]                  # [BLOCK_M, BLOCK_K]
    # w_hh is (4D, D) row-major: the (kk, n) element of gate g's B tile is w_hh[g*D + n, kk].
    w_ptrs = w_ptr + rn_c[None, :] * D + rk[:, None]                     # [BLOCK_K, BLOCK_N]
    gate_stride = D * D
    acc_i = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    acc_f = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    acc_o = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for k0 in range(0, D, BLOCK_K):
        kmask = rk < D - k0
        a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
        w_i = tl.load(w_ptrs, mask=kmask[:, None], other=0.0)
        w_f = tl.load(w_ptrs + gate_stride, mask=kmask[:, None], other=0.0)
        w_g = tl.load(w_ptrs + 2 * gate_stride, mask=kmask[:, None], other=0.0)
        w_o = tl.load(w_ptrs + 3 * gate_stride, mask=kmask[:, None], other=0.0)
        acc_i = tl.dot(a, w_i, acc_i, input_precision=PREC)
        acc_f = tl.dot(a, w_f, acc_f, input_precision=PREC)
        acc_g = tl.dot(a, w_g, acc_g, input_precision=PREC)
        acc_o = tl.dot(a, w_o, acc_o, input_precision=PREC)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    # The gate-bias row (Np, 4D) or (B*Np, 4D) in W, added in ACC.
    gb_ptrs = gb_ptr + (rm_c % GB_PERIOD)[:, None] * (4 * D) + rn_c[None, :]
    acc_i += tl.load(gb_ptrs).to(ACC)
    acc_f += tl.load(gb_ptrs + D).to(ACC)
    acc_g += tl.load(gb_ptrs + 2 * D).to(ACC)
    acc_o += tl.load(gb_ptrs + 3 * D).to(ACC)
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def _lstm_cell_store(gi, gf, gg, go, cell_ptr, hid_ptr, ncell_ptr, rm, rn, M, D, ACC: tl.constexpr):
    """The forward epilogue of a tile: the LSTM gate math in ACC on the pre-activations, then
    hidden and new_cell for rows rm < M (of the (rows, D) outputs) and columns rn < D."""
    mmask = rm < M
    nmask = rn < D
    i = tl.sigmoid(gi)
    f = tl.sigmoid(gf)
    g = _tanh(gg)
    o = tl.sigmoid(go)
    offs = rm[:, None] * D + rn[None, :]
    mask = mmask[:, None] & nmask[None, :]
    c = tl.load(cell_ptr + offs, mask=mask, other=0.0).to(ACC)
    c_new = f * c + i * g
    h = o * _tanh(c_new)
    tl.store(hid_ptr + offs, h.to(hid_ptr.dtype.element_ty), mask=mask)
    tl.store(ncell_ptr + offs, c_new.to(ncell_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lstm_fwd_kernel(xhat_ptr, w_ptr, gb_ptr, cell_ptr, hid_ptr, ncell_ptr,
                     M, GB_PERIOD, D,
                     ACC: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """hidden, new_cell for a BLOCK_M x BLOCK_N tile of the (B*Np, D) outputs."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    gi, gf, gg, go = _gate_preacts(xhat_ptr, w_ptr, gb_ptr, rm, rn, M, GB_PERIOD, D,
                                   ACC, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    _lstm_cell_store(gi, gf, gg, go, cell_ptr, hid_ptr, ncell_ptr, rm, rn, M, D, ACC)


@triton.jit
def _grouped_lstm_fwd_kernel(xhat_ptr, w_ptr, gb_ptr, cell_ptr, hid_ptr, ncell_ptr, offsets_ptr,
                             B, Np, D, M_TILES,
                             ACC: tl.constexpr, PREC: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The grouped forward (Punica's SGMV shape): program (group * M_TILES + M-tile, N-tile) computes
    a tile of group `group`'s rows offsets[group]*Np:offsets[group+1]*Np with weight_hh[group] and
    per-row gate-bias rows. Segment bounds come from offsets on the device, clamped to [0, B] so no
    value of offsets reaches outside the tensors; a tile past its segment's end does nothing."""
    pid = tl.program_id(0)
    grp = pid // M_TILES
    m_tile = pid - grp * M_TILES
    lo = tl.minimum(tl.maximum(tl.load(offsets_ptr + grp), 0), B)
    hi = tl.minimum(tl.maximum(tl.load(offsets_ptr + grp + 1), lo), B)
    row_end = (hi * Np).to(tl.int32)
    start = (lo * Np).to(tl.int32) + m_tile * BLOCK_M
    if start < row_end:
        rm = start + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        w_grp = w_ptr + grp.to(tl.int64) * (4 * D * D)
        # Rows clamp to row_end - 1 (inside the segment) in the K loop; gate-bias row = GEMM row.
        gi, gf, gg, go = _gate_preacts(xhat_ptr, w_grp, gb_ptr, rm, rn, row_end, B * Np, D,
                                       ACC, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
        _lstm_cell_store(gi, gf, gg, go, cell_ptr, hid_ptr, ncell_ptr, rm, rn, row_end, D, ACC)


@triton.jit
def _lstm_bwd_kernel(xhat_ptr, w_ptr, gb_ptr, cell_ptr, gh_ptr, gc_ptr,
                     dgates_ptr, gcell_ptr, M, GB_PERIOD, D,
                     ACC: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Recompute the gates of a tile and write dgates (B*Np, 4D) and grad_cell (B*Np, D)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    gi, gf, gg, go = _gate_preacts(xhat_ptr, w_ptr, gb_ptr, rm, rn, M, GB_PERIOD, D,
                                   ACC, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    mmask = rm < M
    nmask = rn < D
    i = tl.sigmoid(gi)
    f = tl.sigmoid(gf)
    g = _tanh(gg)
    o = tl.sigmoid(go)
    offs = rm[:, None] * D + rn[None, :]
    mask = mmask[:, None] & nmask[None, :]
    c = tl.load(cell_ptr + offs, mask=mask, other=0.0).to(ACC)
    dh = tl.load(gh_ptr + offs, mask=mask, other=0.0).to(ACC)
    dcn = tl.load(gc_ptr + offs, mask=mask, other=0.0).to(ACC)
    tc = _tanh(f * c + i * g)
    d_o = dh * tc
    dc = dcn + dh * o * (1.0 - tc * tc)
    tl.store(gcell_ptr + offs, (dc * f).to(gcell_ptr.dtype.element_ty), mask=mask)
    dty = dgates_ptr.dtype.element_ty
    goffs = rm[:, None] * (4 * D) + rn[None, :]
    tl.store(dgates_ptr + goffs, (dc * g * i * (1.0 - i)).to(dty), mask=mask)
    tl.store(dgates_ptr + goffs + D, (dc * c * f * (1.0 - f)).to(dty), mask=mask)
    tl.store(dgates_ptr + goffs + 2 * D, (dc * i * (1.0 - g * g)).to(dty), mask=mask)
    tl.store(dgates_ptr + goffs + 3 * D, (d_o * o * (1.0 - o)).to(dty), mask=mask)


@triton.jit
def _grad_tokens_kernel(dx_ptr, out_ptr, k, Np, N, T, D,
                        ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_tokens[b, t, d]: 0 for prefix rows, dxhat[b, t-k, d] for prompt rows and
    sum_p dxhat[b, p, d] / N for patch rows; one program per (b, d-block, t-block)."""
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t0 = tl.program_id(2) * BLOCK_T
    t = t0 + tl.arange(0, BLOCK_T)
    dmask = d < D
    dx_b = dx_ptr + b * Np * D
    s = tl.zeros([BLOCK_D], dtype=ACC)
    if t0 + BLOCK_T > k + Np:  # this block holds patch rows: they need the column sums
        for p in range(0, Np):
            s += tl.load(dx_b + p * D + d, mask=dmask, other=0.0).to(ACC)
    s = s / N
    is_prompt = (t >= k) & (t < k + Np)
    v = tl.load(dx_b + (t - k)[:, None] * D + d[None, :], mask=is_prompt[:, None] & dmask[None, :],
                other=0.0).to(ACC)
    v = tl.where((t >= k + Np)[:, None], s[None, :], v)
    out_b = out_ptr + b * T * D
    tl.store(out_b + t[:, None] * D + d[None, :], v.to(out_ptr.dtype.element_ty),
             mask=(t < T)[:, None] & dmask[None, :])


# ----------------------------------------------------------------------------------------------
# Launch configurations: a fixed table (no autotuning), keyed on D and the weight dtype.
# The memory-bound kernels get num_stages=1: Triton's software pipeliner targets loads feeding
# tl.dot, and their PTX is identical for 1, 2 or 3 stages (checked for sm_90).
# ----------------------------------------------------------------------------------------------
class GemmConfig(NamedTuple):
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int


class RowConfig(NamedTuple):
    BLOCK_T: int
    BLOCK_D: int
    num_warps: int


# The two GEMM kernels (_lstm_fwd_kernel, _lstm_bwd_kernel) compute a BLOCK_M x (4*BLOCK_N) output
# tile (four gate accumulators). Per thread that is 4*BLOCK_M*BLOCK_N / (32*num_warps) fp32
# accumulator registers, on top of the epilogue's loads; shared memory per pipeline stage is
# (BLOCK_M + 4*BLOCK_N) * BLOCK_K * itemsize. The table was chosen from the register/spill report of
# ptxas for sm_80 and sm_90a (tests/test_triton_compile.py compiles every entry without a GPU):
# 64 accumulator registers per thread (128 x 32 x 4 / 256 or 64 x 32 x 4 / 128) compile to
# 180-200 registers and no spills on both targets, while 128 per thread (64 x 64 tiles with 4 warps,
# 128 x 64 with 8) spills on both. Not tuned on hardware (no GPU in the development loop).
GEMM_CONFIGS: dict[str, GemmConfig] = {
    # D <= 64 (tests, tiny models). Such a D is often not a multiple of 16, so the loads cannot be
    # vectorized; BLOCK_K = 16 keeps that build spill-free for every dtype on sm_80 and sm_90a
    # (BLOCK_K = 32 spills a few bytes for fp32).
    "small": GemmConfig(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=2),
    # fp32 with input_precision="ieee" (PyTorch's default fp32 matmul precision), D > 64: the
    # product runs on FMA units, where a 64 x 32 tile already spills on sm_80.
    "fp32_ieee": GemmConfig(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2),
    # fp16/bf16 (tensor cores: mma.sync on sm_80, wgmma on sm_90): 64 x 128 effective tile,
    # 24 KiB of shared memory per stage, 3 stages. 64-row tiles keep a few hundred B*Np rows spread
    # over enough programs.
    "half": GemmConfig(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=3),
    # fp16/bf16 with D >= 512 and B*Np >= 2048 rows: 128-row tiles halve the w_hh traffic per FLOP
    # once there are enough rows to fill the GPU; 32 KiB per stage, 3 stages, 8 warps.
    "half_large": GemmConfig(BLOCK_M=128, BLOCK_N=32, BLOCK_K=64, num_warps=8, num_stages=3),
    # fp32 with input_precision="tf32" (tensor cores): the "half" tile with BLOCK_K = 32 (same bytes).
    "tf32": GemmConfig(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=3),
    # fp64 (gradcheck, validation): small tile, fp64 values take two registers each.
    "fp64": GemmConfig(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=2),
}

# The memory-bound kernels (_xhat_kernel, _grad_tokens_kernel): tiles of BLOCK_T rows x BLOCK_D
# columns; 64 columns are one 128-byte line per row for 16-bit dtypes, and small enough that
# B * D / 64 programs fill the GPU at ViT widths.
ROW_CONFIGS: dict[str, RowConfig] = {
    "narrow": RowConfig(BLOCK_T=32, BLOCK_D=32, num_warps=4),   # D <= 64
    "wide": RowConfig(BLOCK_T=64, BLOCK_D=64, num_warps=4),     # D > 64
}


def dot_precision(w_dtype: torch.dtype) -> str:
    """tl.dot input_precision: "ieee" for fp64, and for fp32 when cuBLAS' fp32 matmul precision is
    full fp32 (PyTorch's default, which is what the eager step's fp32 GEMMs use, and what the
    interpreter computes); "tf32" otherwise (Triton ignores it for fp16/bf16 operands)."""
    if w_dtype == torch.float64:
        return "ieee"
    if w_dtype == torch.float32 and float32_matmul_precision("cuda") == "ieee":
        return "ieee"
    return "tf32"


def gemm_config_name(M: int, D: int, w_dtype: torch.dtype, precision: str) -> str:
    """The GEMM configuration for B*Np = M rows, width D, weights w_dtype and tl.dot precision."""
    if w_dtype == torch.float64:
        return "fp64"
    if D <= 64:
        return "small"
    if w_dtype in HALF:
        return "half_large" if (D >= 512 and M >= 2048) else "half"
    return "tf32" if precision == "tf32" else "fp32_ieee"


def gemm_config_cases(w_dtype: torch.dtype) -> list[tuple[str, str]]:
    """Every (configuration, tl.dot precision) pair the launchers can pick for weights w_dtype."""
    precs = {torch.float64: ("ieee",), torch.float32: ("ieee", "tf32")}.get(w_dtype, ("tf32",))
    return sorted({(gemm_config_name(M, D, w_dtype, p), p)
                   for p in precs for D in (1, 64, 65, 511, 512, 1 << 14) for M in (1, 2047, 2048)})


def row_config_name(D: int) -> str:
    return "narrow" if D <= 64 else "wide"


def _acc(w_dtype: torch.dtype):
    """(tl dtype, torch dtype) of the accumulation: fp64 for fp64 weights, else fp32."""
    return (tl.float64, torch.float64) if w_dtype == torch.float64 else (tl.float32, torch.float32)


# ----------------------------------------------------------------------------------------------
# Validation: the contract (lspt_kernels/contract.py), which a direct op call reaches without the
# Python wrapper, plus what only these kernels need (no launch may index out of bounds)
# ----------------------------------------------------------------------------------------------
def _interpreting() -> bool:
    return not isinstance(_xhat_kernel, triton.runtime.JITFunction)


def _fail(exc, msg):
    raise exc(f"lspt_step (triton backend): {msg}")


def _check_device(*tensors: Tensor) -> None:
    device = tensors[0].device
    if device.type != "cuda" and not (_interpreting() and device.type == "cpu"):
        _fail(ValueError, f"tensors must be CUDA tensors, got {device}"
              + (" (set TRITON_INTERPRET=1 before importing to run on the CPU)" if device.type == "cpu" else ""))
    if _interpreting() and device.type != "cpu":
        _fail(ValueError, f"the kernels were loaded for the Triton interpreter (TRITON_INTERPRET=1) "
                          f"and need CPU tensors, got {device}")
    # The interpreter has no bfloat16 arithmetic: it computes silently wrong results (measured:
    # hidden off by 1.28), so refuse before launching.
    if device.type == "cpu" and any(t.dtype == torch.bfloat16 for t in tensors):
        raise TypeError("lspt_step: backend 'triton' on CPU tensors runs in the Triton interpreter "
                        "(TRITON_INTERPRET=1), which has no bfloat16 arithmetic and would return wrong "
                        "results; use float32/float16 there, backend='cpu' or 'eager' for bfloat16 "
                        "on the CPU, or CUDA tensors")


def _check_token_rows(tokens) -> None:
    T = tokens.shape[1]
    if T * max(tokens.stride(1), 1) >= INDEX_LIMIT:
        _fail(ValueError, f"tokens has T * stride(1) = {T * tokens.stride(1)} elements per image: too "
                          "large for the kernels' 32-bit row offsets")


def _check_forward(tokens, cell, gate_bias, w_hh, k) -> None:
    check_fused_inputs(tokens, cell, gate_bias, w_hh, k, autocast=w_hh.dtype in HALF)
    _check_device(tokens, cell, gate_bias, w_hh)
    _check_token_rows(tokens)


def _check_grouped(tokens, cell, gate_bias, w_hh, offsets, k) -> None:
    check_grouped_inputs(tokens, cell, gate_bias, w_hh, offsets, k, autocast=w_hh.dtype in HALF)
    _check_device(tokens, cell, gate_bias, w_hh)
    _check_token_rows(tokens)


def _check_backward(grad_hidden, grad_cell, xhat, cell, gate_bias, w_hh, k, T) -> None:
    check_backward_inputs(grad_hidden, grad_cell, xhat, cell, gate_bias, w_hh, k, T)
    _check_device(grad_hidden, grad_cell, xhat, cell, gate_bias, w_hh)


class _on_device:
    """Launch on the tensors' CUDA device (Triton launches on the current device)."""

    def __init__(self, t: Tensor):
        self.ctx = torch.cuda.device(t.device) if t.device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _launch_xhat(tokens: Tensor, xhat: Tensor, k: int, n_p: int, acc) -> None:
    B, T, D = tokens.shape
    cfg = ROW_CONFIGS[row_config_name(D)]
    grid = (B, triton.cdiv(D, cfg.BLOCK_D))
    _xhat_kernel[grid](tokens, xhat, tokens.stride(0), tokens.stride(1), k, n_p, T - k - n_p, D,
                       ACC=acc, BLOCK_T=cfg.BLOCK_T, BLOCK_D=cfg.BLOCK_D, num_warps=cfg.num_warps,
                       num_stages=1, enable_fp_fusion=True)


def _gemm_launch_args(M: int, D: int, w_dtype: torch.dtype):
    prec = dot_precision(w_dtype)
    cfg = GEMM_CONFIGS[gemm_config_name(M, D, w_dtype, prec)]
    grid = (triton.cdiv(M, cfg.BLOCK_M), triton.cdiv(D, cfg.BLOCK_N))
    meta = dict(ACC=_acc(w_dtype)[0], PREC=prec, BLOCK_M=cfg.BLOCK_M,
                BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages, enable_fp_fusion=True)
    return grid, meta


def image_chunks(B: int, n_p: int, D: int) -> list[tuple[int, int]]:
    """[b0, b1) ranges of whole images whose B*Np*4D gate offsets stay below INDEX_LIMIT."""
    per_image = n_p * 4 * D
    if per_image > INDEX_LIMIT or 4 * D * D >= INDEX_LIMIT:
        _fail(ValueError, f"Np = {n_p}, D = {D}: one image's Np*4D or the weight's 4D*D reaches the kernels' "
                          "32-bit offsets (use the 'cuda' or 'eager' backend)")
    images = max(1, INDEX_LIMIT // per_image)
    return [(b0, min(B, b0 + images)) for b0 in range(0, B, images)]


def forward(tokens: Tensor, cell: Tensor, gate_bias: Tensor, w_hh: Tensor, k: int,
            save_gates: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> hidden (B,Np,D) tokens.dtype, new_cell (B,Np,D) cell.dtype, xhat (B,Np,D) w_hh.dtype, and an
    empty tensor (this backend recomputes the gates in backward; save_gates is ignored)."""
    _check_forward(tokens, cell, gate_bias, w_hh, k)
    B, T, D = tokens.shape
    n_p = cell.shape[1]
    w = w_hh.dtype
    acc_tl, _ = _acc(w)
    hidden = tokens.new_empty((B, n_p, D))
    new_cell = torch.empty_like(cell, memory_format=torch.contiguous_format)
    xhat = tokens.new_empty((B, n_p, D), dtype=w)
    no_gates = tokens.new_empty((0,), dtype=torch.float64 if tokens.dtype == torch.float64 else torch.float32)
    if B * D == 0:  # empty batch or width: nothing to compute (and no zero-size grid to launch)
        return hidden, new_cell, xhat, no_gates
    per_image = gate_bias.dim() == 3
    with _on_device(tokens):
        _launch_xhat(tokens, xhat, k, n_p, acc_tl)
        for b0, b1 in image_chunks(B, n_p, D):
            M = (b1 - b0) * n_p
            grid, meta = _gemm_launch_args(M, D, w)
            gb = gate_bias[b0:b1] if per_image else gate_bias
            _lstm_fwd_kernel[grid](xhat[b0:b1], w_hh, gb, cell[b0:b1], hidden[b0:b1], new_cell[b0:b1], M,
                                   M if per_image else n_p, D, **meta)
    return hidden, new_cell, xhat, no_gates


def grouped_forward(tokens: Tensor, cell: Tensor, gate_bias: Tensor, w_hh: Tensor, offsets: Tensor,
                    k: int) -> tuple[Tensor, Tensor]:
    """The grouped step (ops.grouped_step's contract): hidden (B,Np,D) tokens.dtype, new_cell (B,Np,D)
    cell.dtype. xhat is task-independent: the single-task pass computes it for the whole batch;
    then one grouped GEMM + gates launch (per chunk of images, see image_chunks), offsets read on
    the device only (no host sync)."""
    _check_grouped(tokens, cell, gate_bias, w_hh, offsets, k)
    B, T, D = tokens.shape
    n_p, G = cell.shape[1], w_hh.shape[0]
    w = w_hh.dtype
    acc_tl, _ = _acc(w)
    hidden = tokens.new_empty((B, n_p, D))
    new_cell = torch.empty_like(cell, memory_format=torch.contiguous_format)
    if B * D == 0:
        return hidden, new_cell
    xhat = tokens.new_empty((B, n_p, D), dtype=w)
    with _on_device(tokens):
        _launch_xhat(tokens, xhat, k, n_p, acc_tl)
        chunks = image_chunks(B, n_p, D)
        for b0, b1 in chunks:
            grid, meta = _gemm_launch_args((b1 - b0) * n_p, D, w)
            # A chunk's own offsets, on the device: each group's rows inside [b0, b1), shifted.
            offs = offsets if len(chunks) == 1 else (offsets - b0).clamp(0, b1 - b0)
            _grouped_lstm_fwd_kernel[(G * grid[0], grid[1])](
                xhat[b0:b1], w_hh, gate_bias[b0:b1], cell[b0:b1], hidden[b0:b1], new_cell[b0:b1], offs,
                b1 - b0, n_p, D, grid[0], **meta)
    return hidden, new_cell


def backward(grad_hidden: Tensor, grad_cell: Tensor, xhat: Tensor, cell: Tensor, gate_bias: Tensor,
             w_hh: Tensor, gates: Tensor, k: int, num_tokens: int):
    """-> grad_tokens (B,T,D) grad_hidden.dtype, grad_cell (cell.dtype), grad_gate_bias (gate_bias's
    shape) and grad_w_hh (w_hh.dtype). `gates` is unused: this backend recomputes them."""
    _check_backward(grad_hidden, grad_cell, xhat, cell, gate_bias, w_hh, k, num_tokens)
    B, n_p, D = xhat.shape
    T = num_tokens
    w = w_hh.dtype
    acc_tl, _ = _acc(w)
    M = B * n_p
    per_image = gate_bias.dim() == 3
    grad_tokens = grad_hidden.new_empty((B, T, D))
    grad_cell_prev = torch.empty_like(cell, memory_format=torch.contiguous_format)
    if M * D == 0:
        grad_tokens.zero_()
        grad_cell_prev.zero_()
        return grad_tokens, grad_cell_prev, torch.zeros_like(gate_bias), torch.zeros_like(w_hh)
    dgates = xhat.new_empty((B, n_p, 4 * D))                                  # in W (see top)
    with _on_device(xhat):
        for b0, b1 in image_chunks(B, n_p, D):
            Mc = (b1 - b0) * n_p
            grid, meta = _gemm_launch_args(Mc, D, w)
            gb = gate_bias[b0:b1] if per_image else gate_bias
            _lstm_bwd_kernel[grid](xhat[b0:b1], w_hh, gb, cell[b0:b1], grad_hidden[b0:b1], grad_cell[b0:b1],
                                   dgates[b0:b1], grad_cell_prev[b0:b1], Mc, Mc if per_image else n_p, D, **meta)
        # Products on cuBLAS (each is a plain GEMM with no epilogue worth fusing; no 32-bit limit).
        dgates2d = dgates.view(M, 4 * D)
        dxhat = torch.mm(dgates2d, w_hh)                                      # (B*Np, D)
        grad_w_hh = torch.mm(dgates2d.t(), xhat.view(M, D))                   # (4D, D)
        # per-image rows: their gradient is dgates itself; shared rows: the batch sum, accumulated
        # in ACC (torch's reduction), written in W
        grad_gate_bias = dgates if per_image else dgates.sum(0)
        cfg = ROW_CONFIGS[row_config_name(D)]
        grid_t = (B, triton.cdiv(D, cfg.BLOCK_D), triton.cdiv(T, cfg.BLOCK_T))
        _grad_tokens_kernel[grid_t](dxhat, grad_tokens, k, n_p, T - k - n_p, T, D, ACC=acc_tl,
                                    BLOCK_T=cfg.BLOCK_T, BLOCK_D=cfg.BLOCK_D,
                                    num_warps=cfg.num_warps, num_stages=1, enable_fp_fusion=True)
    return grad_tokens, grad_cell_prev, grad_gate_bias, grad_w_hh
