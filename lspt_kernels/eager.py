"""The LSPT step in plain PyTorch: the "eager" backend, differentiated by eager autograd.

It is what every fused backend is compared with (tests, the self-check, the benchmarks' "eager"),
and what runs where no fused backend can (torch.func transforms, double backward, a machine without
a compiler). docs/method.md, "One step, written out":

    Xhat_SP = tokens[:, k:k+Np] + tokens[:, k+Np:].mean(1)                 (CSPC, eq. 5)
    gates   = gate_bias + Xhat_SP W_hh^T,   gate_bias = P[l] W_ih^T + b_ih + b_hh
    C'      = sigmoid(f) * C + sigmoid(i) * tanh(g);   X_P = sigmoid(o) * tanh(C')   (LPC, eq. 7)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gate_bias_rows(prompt: Tensor, weight_ih: Tensor, bias_ih: Tensor, bias_hh: Tensor) -> Tensor:
    """prompt W_ih^T + b_ih + b_hh: the batch-independent half of the gates, (..., Np, 4D) in W."""
    return F.linear(prompt, weight_ih, bias_ih) + bias_hh


def step_eager(tokens: Tensor, cell: Tensor, gate_bias: Tensor, weight_hh: Tensor,
               num_prefix_tokens: int = 1) -> tuple[Tensor, Tensor]:
    """(hidden, new_cell) from the gate-bias rows ((Np, 4D) or (B, Np, 4D)): the op's signature.

    Means and gate math in >= fp32; xhat and the GEMM in the weights' dtype W (as the kernels)."""
    k, n_p = num_prefix_tokens, cell.shape[1]
    w = weight_hh.dtype
    acc = torch.promote_types(tokens.dtype, torch.float32)
    mean = tokens[:, k + n_p:].mean(1, keepdim=True, dtype=acc)                # (B, 1, D)
    xhat = (tokens[:, k:k + n_p].to(acc) + mean).to(w)                        # (B, Np, D)
    gates = (F.linear(xhat, weight_hh) + gate_bias).to(acc)                   # (B, Np, 4D)
    i, f, g, o = gates.chunk(4, dim=-1)
    new_cell = torch.sigmoid(f) * cell.to(acc) + torch.sigmoid(i) * torch.tanh(g)
    hidden = torch.sigmoid(o) * torch.tanh(new_cell)
    return hidden.to(tokens.dtype), new_cell.to(cell.dtype)


def lspt_step_eager(tokens: Tensor, cell: Tensor, prompt: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                    bias_ih: Tensor, bias_hh: Tensor, num_prefix_tokens: int = 1) -> tuple[Tensor, Tensor]:
    """`lspt_kernels.lspt_step`'s function (the prompt and the four nn.LSTMCell tensors) in plain
    PyTorch, without its input checks or autocast handling."""
    return step_eager(tokens, cell, gate_bias_rows(prompt, weight_ih, bias_ih, bias_hh), weight_hh,
                      num_prefix_tokens)


def grouped_step_eager(tokens: Tensor, cell: Tensor, gate_bias: Tensor, weight_hh: Tensor, offsets: Tensor,
                       num_prefix_tokens: int = 1) -> tuple[Tensor, Tensor]:
    """The step of a batch whose rows are grouped by task (multi-task inference): rows
    offsets[g]:offsets[g+1] use weight_hh[g]. weight_hh (G, 4D, D), gate_bias (B, Np, 4D) (each row's
    own task's rows, gathered), offsets (G + 1,) int64 from 0 to B, non-decreasing (a group may be
    empty). One `step_eager` per non-empty group: the reference of the grouped op's kernels."""
    bounds = offsets.tolist()
    hidden, new_cell = [], []
    for g in range(weight_hh.shape[0]):
        lo, hi = bounds[g], bounds[g + 1]
        if hi > lo:
            h, c = step_eager(tokens[lo:hi], cell[lo:hi], gate_bias[lo:hi], weight_hh[g], num_prefix_tokens)
            hidden.append(h)
            new_cell.append(c)
    if not hidden:   # an empty batch
        return tokens.new_empty(cell.shape), torch.empty_like(cell)
    return torch.cat(hidden), torch.cat(new_cell)
