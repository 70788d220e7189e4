// The autograd of lspt::step_fwd / lspt::step_bwd (csrc/autograd.cpp), registered per device by
// csrc/bindings.cpp; the same formula as the Python registration in lspt_kernels/ops.py.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/SymInt.h>

#include <cstdint>
#include <tuple>

namespace lspt {

using StepOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using GroupedOutputs = std::tuple<at::Tensor, at::Tensor>;

StepOutputs step_fwd_autograd(const at::Tensor& tokens, const at::Tensor& cell, const at::Tensor& gate_bias,
                              const at::Tensor& weight_hh, c10::SymInt num_prefix_tokens, bool save_gates,
                              c10::string_view backend);

StepOutputs step_bwd_autograd(const at::Tensor& grad_hidden, const at::Tensor& grad_cell, const at::Tensor& xhat,
                              const at::Tensor& cell, const at::Tensor& gate_bias, const at::Tensor& weight_hh,
                              const at::Tensor& gates, c10::SymInt num_prefix_tokens, c10::SymInt num_tokens,
                              c10::string_view backend);

// The grouped step is inference-only: an input that requires grad under grad mode is refused (the
// message of lspt_kernels/ops.py, GROUPED_INFERENCE_ONLY); otherwise the device's kernel, below autograd.
GroupedOutputs grouped_step_autograd(const at::Tensor& tokens, const at::Tensor& cell, const at::Tensor& gate_bias,
                                     const at::Tensor& weight_hh, const at::Tensor& offsets,
                                     c10::SymInt num_prefix_tokens, c10::string_view backend);

}  // namespace lspt
