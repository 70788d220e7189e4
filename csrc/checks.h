// The memory-safety checks of the step kernels, shared by the CPU and CUDA backends.
//
// lspt_kernels/ops.py validates the op's inputs with errors written for users (check_fused_inputs);
// a direct torch.ops.lspt.* call reaches the kernels without it, so these keep such a call from
// reading out of bounds or reinterpreting memory with the wrong dtype: devices, shapes, strides,
// contiguity and the dtype combinations the kernels are instantiated for. The argument names are
// the op schema's (tokens, cell, gate_bias, weight_hh, xhat, grad_hidden, grad_cell, gates).
#pragma once

#include <array>

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cstdint>

namespace lspt {

struct StepSizes {
  int64_t B, T, D, Np;
  bool per_image_rows;  // gate_bias is (B, Np, 4D), not (Np, 4D)
};

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline bool is_low_precision(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

inline at::ScalarType acc_dtype(at::ScalarType tokens) {
  return tokens == at::kDouble ? at::kDouble : at::kFloat;
}

// Defined, on `device` (its type; for CUDA also its index: one device for all), a float dtype.
inline void check_tensor(const char* fn, const char* name, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK(t.defined(), fn, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.device().type() == device.type(), fn, ": ", name, " must be a ", c10::DeviceTypeName(device.type()),
              " tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == device, fn, ": ", name, " is on ", t.device(), " but the other tensors are on ", device);
  TORCH_CHECK(is_float_dtype(t.scalar_type()), fn, ": ", name, " must be float32/float64/float16/bfloat16, got ",
              t.scalar_type());
}

inline void check_shape(const char* fn, const char* name, const at::Tensor& t, at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, fn, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), fn, ": ", name, " must be contiguous");
}

// gate_bias ((Np, 4D) or (B, Np, 4D)) and weight_hh (4D, D) in one dtype W; `gate_bias_read`: false
// when the kernel does not read it (saved gates), where the autograd passes a stride-0 stand-in.
inline bool check_params(const char* fn, const at::Tensor& gate_bias, const at::Tensor& weight_hh,
                         const at::Device& device, int64_t B, int64_t Np, int64_t D, bool gate_bias_read = true) {
  check_tensor(fn, "gate_bias", gate_bias, device);
  check_tensor(fn, "weight_hh", weight_hh, device);
  check_shape(fn, "weight_hh", weight_hh, {4 * D, D});
  const bool per_image = gate_bias.dim() == 3;
  TORCH_CHECK(gate_bias.sizes() == at::IntArrayRef({Np, 4 * D}) ||
                  gate_bias.sizes() == at::IntArrayRef({B, Np, 4 * D}),
              fn, ": gate_bias must be (Np, 4D) = (", Np, ", ", 4 * D, ") or (B, Np, 4D) = (", B, ", ", Np, ", ",
              4 * D, "), got ", gate_bias.sizes());
  TORCH_CHECK(!gate_bias_read || gate_bias.is_contiguous(), fn, ": gate_bias must be contiguous");
  TORCH_CHECK(gate_bias.scalar_type() == weight_hh.scalar_type(), fn, ": gate_bias (", gate_bias.scalar_type(),
              ") and weight_hh (", weight_hh.scalar_type(), ") must share one dtype");
  return per_image;
}

// The dtype combinations the kernels are instantiated for: the tokens side is W, or fp32 with a
// 16-bit W (autocast); the cell is the tokens' dtype or fp32.
inline void check_activation_dtypes(const char* fn, const char* tok_name, at::ScalarType tok, at::ScalarType cell,
                                    at::ScalarType w) {
  TORCH_CHECK(tok == w || (tok == at::kFloat && is_low_precision(w)), fn, ": ", tok_name, " (", tok,
              ") must have the weights' dtype (", w, "), or be float32 with float16/bfloat16 weights");
  TORCH_CHECK(cell == tok || cell == at::kFloat, fn, ": cell (", cell, ") must be ", tok, " (like ", tok_name,
              ") or float32");
}

inline void check_prefix(const char* fn, int64_t k, int64_t Np, int64_t T) {
  TORCH_CHECK(k >= 0, fn, ": num_prefix_tokens must be >= 0, got ", k);
  TORCH_CHECK(k + Np < T, fn, ": T = ", T, " tokens but num_prefix_tokens + Np = ", k, " + ", Np,
              " leaves no patch token");
}

// tokens (B, T, D) with stride(-1) == 1 and cell (B, Np, D), Np >= 1, both on tokens' device: (B, T, D, Np).
inline std::array<int64_t, 4> check_tokens_and_cell(const char* fn, const at::Tensor& tokens,
                                                   const at::Tensor& cell) {
  TORCH_CHECK(tokens.defined(), fn, ": tokens is an undefined tensor");
  const at::Device device = tokens.device();
  check_tensor(fn, "tokens", tokens, device);
  check_tensor(fn, "cell", cell, device);
  TORCH_CHECK(tokens.dim() == 3, fn, ": tokens must be (B, T, D), got ", tokens.sizes());
  const int64_t B = tokens.size(0), T = tokens.size(1), D = tokens.size(2);
  TORCH_CHECK(tokens.stride(2) == 1 || D <= 1, fn, ": tokens must have stride(-1) == 1, got strides ",
              tokens.strides());
  TORCH_CHECK(cell.dim() == 3 && cell.size(1) >= 1, fn, ": cell must be (B, Np, D) with Np >= 1, got ", cell.sizes());
  const int64_t Np = cell.size(1);
  check_shape(fn, "cell", cell, {B, Np, D});
  return {B, T, D, Np};
}

inline StepSizes check_forward(const char* fn, const at::Tensor& tokens, const at::Tensor& cell,
                               const at::Tensor& gate_bias, const at::Tensor& weight_hh, int64_t k) {
  const auto [B, T, D, Np] = check_tokens_and_cell(fn, tokens, cell);
  const at::Device device = tokens.device();
  const bool per_image = check_params(fn, gate_bias, weight_hh, device, B, Np, D);
  check_prefix(fn, k, Np, T);
  check_activation_dtypes(fn, "tokens", tokens.scalar_type(), cell.scalar_type(), weight_hh.scalar_type());
  return {B, T, D, Np, per_image};
}

inline StepSizes check_backward(const char* fn, const at::Tensor& grad_hidden, const at::Tensor& grad_cell,
                                const at::Tensor& xhat, const at::Tensor& cell, const at::Tensor& gate_bias,
                                const at::Tensor& weight_hh, const at::Tensor& gates, int64_t k, int64_t T) {
  TORCH_CHECK(xhat.defined(), fn, ": xhat is an undefined tensor");
  const at::Device device = xhat.device();
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"grad_hidden", grad_hidden},
                                {"grad_cell", grad_cell}, {"xhat", xhat}, {"cell", cell}}) {
    check_tensor(fn, name, t, device);
  }
  TORCH_CHECK(xhat.dim() == 3 && xhat.size(1) >= 1, fn, ": xhat must be (B, Np, D), got ", xhat.sizes());
  const int64_t B = xhat.size(0), Np = xhat.size(1), D = xhat.size(2);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"grad_hidden", grad_hidden},
                                {"grad_cell", grad_cell}, {"xhat", xhat}, {"cell", cell}}) {
    check_shape(fn, name, t, {B, Np, D});
  }
  const bool saved = gates.defined() && gates.numel() > 0;
  const bool per_image = check_params(fn, gate_bias, weight_hh, device, B, Np, D, /*gate_bias_read=*/!saved);
  check_prefix(fn, k, Np, T);
  const at::ScalarType w = weight_hh.scalar_type();
  TORCH_CHECK(xhat.scalar_type() == w, fn, ": xhat (", xhat.scalar_type(), ") must have the weights' dtype (", w, ")");
  check_activation_dtypes(fn, "grad_hidden", grad_hidden.scalar_type(), cell.scalar_type(), w);
  TORCH_CHECK(grad_cell.scalar_type() == cell.scalar_type(), fn, ": grad_cell (", grad_cell.scalar_type(),
              ") must have the cell's dtype (", cell.scalar_type(), ")");
  if (saved) {
    check_tensor(fn, "gates", gates, device);
    check_shape(fn, "gates", gates, {B, Np, 4 * D});
    TORCH_CHECK(gates.scalar_type() == acc_dtype(grad_hidden.scalar_type()), fn, ": gates (", gates.scalar_type(),
                ") must be ", acc_dtype(grad_hidden.scalar_type()));
  }
  return {B, T, D, Np, per_image};
}

// The grouped op (lspt::grouped_step): tokens (B, T, D) [stride(-1) == 1], cell (B, Np, D), gate_bias
// (B, Np, 4D) and weight_hh (G, 4D, D) contiguous, offsets (G + 1,) int64 contiguous on the same device.
// Offsets' VALUES are not checked here (that needs a device sync): every kernel reads them through
// group_rows, which keeps any value inside the batch.
struct GroupedSizes {
  int64_t B, T, D, Np, G;
};

inline GroupedSizes check_grouped_forward(const char* fn, const at::Tensor& tokens, const at::Tensor& cell,
                                          const at::Tensor& gate_bias, const at::Tensor& weight_hh,
                                          const at::Tensor& offsets, int64_t k) {
  const auto [B, T, D, Np] = check_tokens_and_cell(fn, tokens, cell);
  const at::Device device = tokens.device();
  check_tensor(fn, "gate_bias", gate_bias, device);
  check_tensor(fn, "weight_hh", weight_hh, device);
  TORCH_CHECK(weight_hh.dim() == 3 && weight_hh.size(0) >= 1, fn, ": weight_hh must be (G, 4D, D) with G >= 1, got ",
              weight_hh.sizes());
  const int64_t G = weight_hh.size(0);
  check_shape(fn, "weight_hh", weight_hh, {G, 4 * D, D});
  check_shape(fn, "gate_bias", gate_bias, {B, Np, 4 * D});
  TORCH_CHECK(gate_bias.scalar_type() == weight_hh.scalar_type(), fn, ": gate_bias (", gate_bias.scalar_type(),
              ") and weight_hh (", weight_hh.scalar_type(), ") must share one dtype");
  TORCH_CHECK(offsets.defined(), fn, ": offsets is an undefined tensor");
  TORCH_CHECK(offsets.device() == device, fn, ": offsets is on ", offsets.device(), " but tokens are on ", device);
  TORCH_CHECK(offsets.scalar_type() == at::kLong, fn, ": offsets must be int64, got ", offsets.scalar_type());
  check_shape(fn, "offsets", offsets, {G + 1});
  check_prefix(fn, k, Np, T);
  check_activation_dtypes(fn, "tokens", tokens.scalar_type(), cell.scalar_type(), weight_hh.scalar_type());
  return {B, T, D, Np, G};
}

// Group g's images [lo, hi), clamped to [0, B] whatever offsets hold (host and device code).
C10_HOST_DEVICE inline void group_rows(const int64_t* offsets, int64_t g, int64_t B, int64_t& lo, int64_t& hi) {
  const int64_t a = offsets[g], b = offsets[g + 1];
  lo = a < 0 ? 0 : (a > B ? B : a);
  hi = b < lo ? lo : (b > B ? B : b);
}

}  // namespace lspt
