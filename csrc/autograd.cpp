// The autograd kernel of the step op, as torchvision's csrc/ops/autograd: a torch::autograd::Function
// whose forward dispatches below autograd to the device's kernel (whichever backend the op's
// `backend` argument names) and whose backward calls lspt::step_bwd. No Python runs per step.
//
// What backward keeps: Xhat_SP (the forward's `xhat` output), the incoming cell, weight_hh, and
// either the activated gates (a backend that saves them) or the gate-bias rows to recompute them.
// Unused outputs (xhat, gates, a cell that feeds nothing) get no zero-filled gradients.
#include "autograd.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>

#include <string>

namespace lspt {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The message of the Python registration (lspt_kernels/ops.py, NO_DOUBLE_BACKWARD).
constexpr const char* kNoDoubleBackward =
    "lspt_step: the fused backends have no double backward (a gradient of a gradient, e.g. "
    "torch.autograd.grad(..., create_graph=True) then backward again: gradient penalties, Hessians); "
    "use the eager step for that: lspt_step(..., backend='eager'), or LSPTEncoder(..., backend='eager')";

// The message of the Python registration (lspt_kernels/ops.py, GROUPED_INFERENCE_ONLY).
constexpr const char* kGroupedInferenceOnly =
    "grouped_step: the grouped (multi-task) step is inference-only and has no backward: run it under "
    "torch.no_grad() or torch.inference_mode(), or detach its inputs; to train a task, train it alone "
    "with LSPTEncoder";

const auto& grouped_step_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lspt::grouped_step", "")
                             .typed<GroupedOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                   const at::Tensor&, const at::Tensor&, c10::SymInt,
                                                   c10::string_view)>();
  return op;
}

const auto& step_fwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lspt::step_fwd", "")
                             .typed<StepOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, c10::SymInt, bool, c10::string_view)>();
  return op;
}

const auto& step_bwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lspt::step_bwd", "")
                             .typed<StepOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, c10::SymInt, c10::SymInt, c10::string_view)>();
  return op;
}

class StepFunction : public torch::autograd::Function<StepFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& tokens, const at::Tensor& cell,
                               const at::Tensor& gate_bias, const at::Tensor& weight_hh, const c10::SymInt& k,
                               bool save_gates, const std::string& backend) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [hidden, new_cell, xhat, gates] =
        step_fwd_op().call(tokens, cell, gate_bias, weight_hh, k, save_gates, backend);
    const bool saved_gates = gates.dim() == 3;   // else an empty (0,) tensor
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable({xhat, gates});
    ctx->save_for_backward({xhat, cell, saved_gates ? at::Tensor() : gate_bias, weight_hh, gates});
    ctx->saved_data["k"] = k;
    ctx->saved_data["backend"] = backend;
    ctx->saved_data["num_tokens"] = tokens.sym_size(1);
    ctx->saved_data["tokens_dtype"] = static_cast<int64_t>(tokens.scalar_type());
    ctx->saved_data["gate_bias_sizes"] = gate_bias.sym_sizes();
    return {hidden, new_cell, xhat, gates};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& xhat = saved[0];
    const at::Tensor& cell = saved[1];
    const at::Tensor& weight_hh = saved[3];
    const at::Tensor& gates = saved[4];
    at::Tensor gate_bias = saved[2];
    if (!gate_bias.defined()) {  // not read when the gates were saved: a stride-0 stand-in of its shape
      const auto sizes = ctx->saved_data["gate_bias_sizes"].toSymIntVector();
      gate_bias = weight_hh.as_strided_symint(sizes, std::vector<c10::SymInt>(sizes.size(), 0));
    }
    at::Tensor grad_hidden = grads[0];
    if (!grad_hidden.defined()) {
      const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["tokens_dtype"].toInt());
      grad_hidden = at::zeros_like(xhat, xhat.options().dtype(dtype));
    } else if (!grad_hidden.is_contiguous()) {  // the slot of the next block's input gradient: a view
      grad_hidden = grad_hidden.contiguous();
    }
    at::Tensor grad_cell = grads[1];
    if (!grad_cell.defined()) {  // the last step's cell feeds nothing
      grad_cell = at::zeros_like(cell);
    } else if (!grad_cell.is_contiguous()) {
      grad_cell = grad_cell.contiguous();
    }
    auto [g_tokens, g_cell, g_bias, g_weight] =
        step_bwd_op().call(grad_hidden, grad_cell, xhat, cell, gate_bias, weight_hh, gates,
                           ctx->saved_data["k"].toSymInt(), ctx->saved_data["num_tokens"].toSymInt(),
                           ctx->saved_data["backend"].toStringRef());
    return {g_tokens, g_cell, g_bias, g_weight, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The fused backward is not differentiable: a create_graph=True backward records this node, whose
// own backward raises the clear error (a graph that is never differentiated again still works).
class StepBackwardFunction : public torch::autograd::Function<StepBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_hidden, const at::Tensor& grad_cell,
                               const at::Tensor& xhat, const at::Tensor& cell, const at::Tensor& gate_bias,
                               const at::Tensor& weight_hh, const at::Tensor& gates, const c10::SymInt& k,
                               const c10::SymInt& num_tokens, const std::string& backend) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [a, b, c, d] = step_bwd_op().call(grad_hidden, grad_cell, xhat, cell, gate_bias, weight_hh, gates, k,
                                           num_tokens, backend);
    return {a, b, c, d};
  }

  static variable_list backward(AutogradContext*, variable_list) { TORCH_CHECK(false, kNoDoubleBackward); }
};

StepOutputs as_outputs(const variable_list& out) { return {out[0], out[1], out[2], out[3]}; }

}  // namespace

StepOutputs step_fwd_autograd(const at::Tensor& tokens, const at::Tensor& cell, const at::Tensor& gate_bias,
                              const at::Tensor& weight_hh, c10::SymInt num_prefix_tokens, bool save_gates,
                              c10::string_view backend) {
  const bool needs_grad = at::GradMode::is_enabled() && (tokens.requires_grad() || cell.requires_grad() ||
                                                         gate_bias.requires_grad() || weight_hh.requires_grad());
  if (!needs_grad) {  // inference: no node, nothing saved
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return step_fwd_op().call(tokens, cell, gate_bias, weight_hh, num_prefix_tokens, save_gates, backend);
  }
  return as_outputs(StepFunction::apply(tokens, cell, gate_bias, weight_hh, num_prefix_tokens, save_gates,
                                        std::string(backend)));
}

StepOutputs step_bwd_autograd(const at::Tensor& grad_hidden, const at::Tensor& grad_cell, const at::Tensor& xhat,
                              const at::Tensor& cell, const at::Tensor& gate_bias, const at::Tensor& weight_hh,
                              const at::Tensor& gates, c10::SymInt num_prefix_tokens, c10::SymInt num_tokens,
                              c10::string_view backend) {
  if (!at::GradMode::is_enabled()) {  // a plain backward: no node to record
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return step_bwd_op().call(grad_hidden, grad_cell, xhat, cell, gate_bias, weight_hh, gates, num_prefix_tokens,
                              num_tokens, backend);
  }
  return as_outputs(StepBackwardFunction::apply(grad_hidden, grad_cell, xhat, cell, gate_bias, weight_hh, gates,
                                                num_prefix_tokens, num_tokens, std::string(backend)));
}

GroupedOutputs grouped_step_autograd(const at::Tensor& tokens, const at::Tensor& cell, const at::Tensor& gate_bias,
                                     const at::Tensor& weight_hh, const at::Tensor& offsets,
                                     c10::SymInt num_prefix_tokens, c10::string_view backend) {
  const bool needs_grad = at::GradMode::is_enabled() && (tokens.requires_grad() || cell.requires_grad() ||
                                                         gate_bias.requires_grad() || weight_hh.requires_grad());
  TORCH_CHECK(!needs_grad, kGroupedInferenceOnly);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return grouped_step_op().call(tokens, cell, gate_bias, weight_hh, offsets, num_prefix_tokens, backend);
}

}  // namespace lspt
