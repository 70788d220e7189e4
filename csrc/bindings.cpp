// The extension's registrations: the kernels of lspt::step_fwd / lspt::step_bwd / lspt::grouped_step
// for this build's device and their autograd, in the dispatcher; the build ID for the loader (pybind11).
//
// Two extensions are built from these sources: `_lspt_cpu` registers the CPU and AutogradCPU keys,
// `_lspt_cuda` (-DLSPT_WITH_CUDA) the CUDA and AutogradCUDA keys, so both can load in one process.
// The op schemas are defined in Python (lspt_kernels/ops.py: the op must exist where no extension can
// be built); the dispatcher checks these kernels' C++ signatures against them at load time.
// A device's kernel routes by the op's `backend` argument: its own C++ kernels, or "triton", whose
// launchers are registered in Python as lspt::triton_step_fwd / triton_step_bwd / triton_grouped_step
// (Triton launches are Python by nature), reached through the dispatcher as well.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "autograd.h"
#ifdef LSPT_WITH_CUDA
#include "cuda/lspt_step_cuda.h"
#else
#include "cpu/lspt_step_cpu.h"
#endif

namespace lspt {
namespace {

// The kernels compute in the dtypes they are given: autocast must not re-cast their ATen GEMMs.
using NoAutocast = c10::impl::ExcludeDispatchKeyGuard;

StepOutputs triton_forward(const at::Tensor& tokens, const at::Tensor& cell, const at::Tensor& gate_bias,
                           const at::Tensor& weight_hh, int64_t k, bool save_gates) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lspt::triton_step_fwd", "")
                             .typed<StepOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, int64_t, bool)>();
  return op.call(tokens, cell, gate_bias, weight_hh, k, save_gates);
}

StepOutputs triton_backward(const at::Tensor& grad_hidden, const at::Tensor& grad_cell, const at::Tensor& xhat,
                            const at::Tensor& cell, const at::Tensor& gate_bias, const at::Tensor& weight_hh,
                            const at::Tensor& gates, int64_t k, int64_t num_tokens) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lspt::triton_step_bwd", "")
                             .typed<StepOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, int64_t, int64_t)>();
  return op.call(grad_hidden, grad_cell, xhat, cell, gate_bias, weight_hh, gates, k, num_tokens);
}

GroupedOutputs triton_grouped(const at::Tensor& tokens, const at::Tensor& cell, const at::Tensor& gate_bias,
                              const at::Tensor& weight_hh, const at::Tensor& offsets, int64_t k) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lspt::triton_grouped_step", "")
                             .typed<GroupedOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                   const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(tokens, cell, gate_bias, weight_hh, offsets, k);
}

// The backend names of lspt_kernels/backends.py (FUSED_BACKENDS); `own` is this build's device's.
[[noreturn]] void refuse(const char* fn, c10::string_view backend, const char* own, const at::Tensor& t) {
  const bool known = backend == "cpu" || backend == "cuda" || backend == "triton";
  TORCH_CHECK_VALUE(known, fn, ": backend must be one of ('cpu', 'triton', 'cuda') (the fused kernels; the "
                    "plain-PyTorch step is lspt_step(..., backend='eager')), got '", backend, "'");
  TORCH_CHECK_VALUE(false, fn, ": backend '", backend, "' needs ", backend == "cpu" ? "CPU" : "CUDA",
                    " tensors, got tensors on ", t.device(), " (this device's kernels: '", own, "', 'triton')");
}

#ifdef LSPT_WITH_CUDA
constexpr const char* kOwn = "cuda";
#define LSPT_FORWARD cuda_forward
#define LSPT_BACKWARD cuda_backward
#define LSPT_GROUPED cuda_grouped_forward
#else
constexpr const char* kOwn = "cpu";
#define LSPT_FORWARD cpu_forward
#define LSPT_BACKWARD cpu_backward
#define LSPT_GROUPED cpu_grouped_forward
#endif

StepOutputs step_fwd(const at::Tensor& tokens, const at::Tensor& cell, const at::Tensor& gate_bias,
                     const at::Tensor& weight_hh, int64_t k, bool save_gates, c10::string_view backend) {
  NoAutocast no_autocast(c10::autocast_dispatch_keyset);
  if (backend == kOwn) return LSPT_FORWARD(tokens, cell, gate_bias, weight_hh, k, save_gates);
  if (backend == "triton") return triton_forward(tokens, cell, gate_bias, weight_hh, k, save_gates);
  refuse("lspt::step_fwd", backend, kOwn, tokens);
}

StepOutputs step_bwd(const at::Tensor& grad_hidden, const at::Tensor& grad_cell, const at::Tensor& xhat,
                     const at::Tensor& cell, const at::Tensor& gate_bias, const at::Tensor& weight_hh,
                     const at::Tensor& gates, int64_t k, int64_t num_tokens, c10::string_view backend) {
  NoAutocast no_autocast(c10::autocast_dispatch_keyset);
  if (backend == kOwn) {
    return LSPT_BACKWARD(grad_hidden, grad_cell, xhat, cell, gate_bias, weight_hh, gates, k, num_tokens);
  }
  if (backend == "triton") {
    return triton_backward(grad_hidden, grad_cell, xhat, cell, gate_bias, weight_hh, gates, k, num_tokens);
  }
  refuse("lspt::step_bwd", backend, kOwn, grad_hidden);
}

GroupedOutputs grouped_step(const at::Tensor& tokens, const at::Tensor& cell, const at::Tensor& gate_bias,
                            const at::Tensor& weight_hh, const at::Tensor& offsets, int64_t k,
                            c10::string_view backend) {
  NoAutocast no_autocast(c10::autocast_dispatch_keyset);
  if (backend == kOwn) return LSPT_GROUPED(tokens, cell, gate_bias, weight_hh, offsets, k);
  if (backend == "triton") return triton_grouped(tokens, cell, gate_bias, weight_hh, offsets, k);
  refuse("lspt::grouped_step", backend, kOwn, tokens);
}

}  // namespace
}  // namespace lspt

#ifdef LSPT_WITH_CUDA
TORCH_LIBRARY_IMPL(lspt, CUDA, m) {
#else
TORCH_LIBRARY_IMPL(lspt, CPU, m) {
#endif
  m.impl("step_fwd", TORCH_FN(lspt::step_fwd));
  m.impl("step_bwd", TORCH_FN(lspt::step_bwd));
  m.impl("grouped_step", TORCH_FN(lspt::grouped_step));
}

#ifdef LSPT_WITH_CUDA
TORCH_LIBRARY_IMPL(lspt, AutogradCUDA, m) {
#else
TORCH_LIBRARY_IMPL(lspt, AutogradCPU, m) {
#endif
  m.impl("step_fwd", TORCH_FN(lspt::step_fwd_autograd));
  m.impl("step_bwd", TORCH_FN(lspt::step_bwd_autograd));
  m.impl("grouped_step", TORCH_FN(lspt::grouped_step_autograd));
}

// The build ID (lspt_kernels/_build.py passes it as -D flags, from setup.py and from the JIT build):
// the loader refuses a prebuilt binary made from other sources or against another torch.
#define LSPT_STR_(x) #x
#define LSPT_STR(x) LSPT_STR_(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused LSPT step kernels, registered as lspt::step_fwd / step_bwd / grouped_step (lspt_kernels/ops.py)";
#ifdef LSPT_SOURCE_HASH
  m.attr("source_hash") = LSPT_STR(LSPT_SOURCE_HASH);
#endif
#ifdef LSPT_TORCH_TAG
  m.attr("torch_tag") = LSPT_STR(LSPT_TORCH_TAG);
#endif
  m.attr("device") = lspt::kOwn;
}
