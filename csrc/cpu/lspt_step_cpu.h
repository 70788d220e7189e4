// Fused LSPT step on the CPU: ATen GEMMs (MKL/oneDNN) around hand-fused, thread-parallel passes.
// The contract (shapes, dtypes, what is saved for backward) is the docstring of lspt_kernels/ops.py.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace lspt {

// (hidden (B,Np,D) tokens.dtype, new_cell (B,Np,D) cell.dtype, xhat (B,Np,D) w_hh.dtype)
std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_forward(
    const at::Tensor& tokens, const at::Tensor& cell, const at::Tensor& prompt,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& b_ih,
    const at::Tensor& b_hh, int64_t k);

// (grad_tokens (B,T,D) grad_hidden.dtype, grad_cell cell.dtype, grad_prompt, grad_w_ih,
//  grad_w_hh, grad_b_ih, grad_b_hh in w_hh.dtype)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
cpu_backward(const at::Tensor& grad_hidden, const at::Tensor& grad_cell, const at::Tensor& xhat,
             const at::Tensor& cell, const at::Tensor& prompt, const at::Tensor& w_ih,
             const at::Tensor& w_hh, const at::Tensor& b_ih, const at::Tensor& b_hh, int64_t k,
             int64_t num_tokens);

}  // namespace lspt
