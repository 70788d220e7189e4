// Fused LSPT step on the CPU: ATen GEMMs (MKL/oneDNN) around hand-fused, thread-parallel passes.
// The contract (shapes, dtypes, what is saved for backward) is the docstring of lspt_kernels/ops.py;
// csrc/checks.h guards memory.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace lspt {

// (hidden (B,Np,D) tokens.dtype, new_cell (B,Np,D) cell.dtype, xhat (B,Np,D) weight_hh.dtype,
//  activated gates (B,Np,4D) in the accumulation dtype when save_gates, else an empty (0,) tensor)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu_forward(
    const at::Tensor& tokens, const at::Tensor& cell, const at::Tensor& gate_bias,
    const at::Tensor& weight_hh, int64_t k, bool save_gates);

// (grad_tokens (B,T,D) grad_hidden.dtype, grad_cell cell.dtype, grad_gate_bias (gate_bias's shape)
//  and grad_weight_hh in weight_hh.dtype). gates: the forward's saved gates, or empty (then recomputed).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu_backward(
    const at::Tensor& grad_hidden, const at::Tensor& grad_cell, const at::Tensor& xhat,
    const at::Tensor& cell, const at::Tensor& gate_bias, const at::Tensor& weight_hh,
    const at::Tensor& gates, int64_t k, int64_t num_tokens);

// The grouped step (multi-task inference, no backward): rows offsets[g]:offsets[g+1] use weight_hh[g]
// (G, 4D, D), gate_bias is (B, Np, 4D). -> (hidden (B,Np,D) tokens.dtype, new_cell (B,Np,D) cell.dtype)
std::tuple<at::Tensor, at::Tensor> cpu_grouped_forward(
    const at::Tensor& tokens, const at::Tensor& cell, const at::Tensor& gate_bias,
    const at::Tensor& weight_hh, const at::Tensor& offsets, int64_t k);

}  // namespace lspt
