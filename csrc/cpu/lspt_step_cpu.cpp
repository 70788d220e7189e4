// Fused LSPT step on the CPU (the kernels behind backend "cpu"; registered by csrc/bindings.cpp).
//
// The batch-independent half of the gates, gate_bias = P W_ih^T + b_ih + b_hh ((Np, 4D), or
// (B, Np, 4D) under per-image prompt dropout), comes in precomputed (the encoder does it for every
// step with one GEMM per forward). Per step:
// Forward:  xhat = prompt rows + patch mean      (pass 1, one sweep over the patch tokens)
//           then per block of whole images:
//             G = xhat W_hh^T                    (ATen GEMM, the only large product)
//             hidden, new_cell = LSTM cell(G + gate_bias)   (pass 2, over the block's rows); with
//             save_gates it also stores the activated gates i, f, g, o (fp32) for backward
// Grouped forward (multi-task inference, no backward): pass 1 for the whole batch (the patch mean
//           is task-independent), then the same blocks per group, each group's rows with its W_hh.
// Backward: with saved gates no GEMM is recomputed (without them: G again, one GEMM); one fused
//           pass producing dgates, dcell_prev and d gate_bias (the batch sum of dgates, or dgates
//           itself for per-image rows), the two GEMMs (dxhat, dW_hh), and one pass writing
//           grad_tokens. Saving the gates (4D fp32 values per row) keeps less than eager autograd
//           (which saves the four activations, tanh(c), the cell and xhat) and removes the
//           recompute GEMM, without which the fused backward measured slower than eager.
//
// The gate math is written as plain loops over contiguous columns with call-free exp/tanh so
// that the compiler vectorises them without architecture flags (-march=native measured within noise:
// the GEMMs, which ATen hands to MKL/oneDNN with their own runtime CPU dispatch, are ~90% of the
// time). ATen's OpenMP parallel_for is header-only: the passes below use every intra-op thread only
// when this file is compiled with -fopenmp, and run on one thread (still correct) without it.
#include "cpu/lspt_step_cpu.h"

#include "checks.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

// The row loops stream up to a dozen arrays; GCC only honours __restrict__ on parameters and gives
// up on runtime alias checks past ten pointers, so tell it the iterations are independent.
#if defined(__clang__)
#define LSPT_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define LSPT_IVDEP _Pragma("GCC ivdep")
#else
#define LSPT_IVDEP
#endif

namespace lspt {
namespace {

using at::ScalarType;
using at::Tensor;

// ------------------------------------------------------------------------------------------------
// Gate math. fp32 uses branch-free approximations (a few ulp) so the loops vectorise; fp64 (used by
// gradcheck) uses libm, where accuracy matters more than speed.
// ------------------------------------------------------------------------------------------------
template <typename A>
struct Math;

// |x| clamped to the float whose bits are `limit_bits`, NaN passed through. Done on the bit
// pattern because GCC will not if-convert a float compare-and-select under its default
// -ftrapping-math, which would leave every gate loop scalar.
inline float clamp_abs(float x, uint32_t limit_bits) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const uint32_t mag = bits & 0x7fffffffu;
  const uint32_t clamped = (mag > limit_bits && mag <= 0x7f800000u) ? limit_bits : mag;
  const uint32_t out = clamped | (bits & 0x80000000u);
  float y;
  std::memcpy(&y, &out, sizeof(y));
  return y;
}

template <>
struct Math<float> {
  // Cephes expf: exp(x) = 2^n * exp(r), |r| <= ln2/2, about 1 ulp. |x| <= 87 keeps 2^n a normal
  // float; sigmoid and tanh are saturated there anyway.
  static inline float exp(float x) {
    x = clamp_abs(x, 0x42ae0000u);  // 87.0f
    // Round to nearest by adding 1.5*2^23: unlike std::round this vectorises on plain SSE2.
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    const uint32_t bits = (static_cast<uint32_t>(static_cast<int32_t>(n)) + 127u) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return y * scale;
  }
  static inline float sigmoid(float x) { return 1.0f / (1.0f + exp(-x)); }
  // Eigen's rational tanh: relative error < 4e-7 everywhere, including near 0 where
  // 1 - 2/(1+exp(2x)) would lose all relative precision; one division, no exp.
  static inline float tanh(float x) {
    const float xc = clamp_abs(x, 0x40fcf84fu);  // 7.90531110763549805f (Eigen's fit range)
    const float x2 = xc * xc;
    float p = -2.76076847742355e-16f;
    p = p * x2 + 2.00018790482477e-13f;
    p = p * x2 + -8.60467152213735e-11f;
    p = p * x2 + 5.12229709037114e-08f;
    p = p * x2 + 1.48572235717979e-05f;
    p = p * x2 + 6.37261928875436e-04f;
    p = p * x2 + 4.89352455891786e-03f;
    p = p * xc;
    float q = 1.19825839466702e-06f;
    q = q * x2 + 1.18534705686654e-04f;
    q = q * x2 + 2.26843463243900e-03f;
    q = q * x2 + 4.89352518554385e-03f;
    return p / q;
  }
};

template <>
struct Math<double> {
  static inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
  static inline double tanh(double x) { return std::tanh(x); }
};

// Means and gate math run in fp32, or fp64 when the tokens are fp64.
template <typename tok_t>
using acc_type = std::conditional_t<std::is_same_v<tok_t, double>, double, float>;

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<w_t>, Tag<tok_t>, Tag<cell_t>) for the dtype combinations the contract allows:
// tokens are W or fp32, the cell is the tokens' dtype or fp32 (checked before dispatching).
template <typename F>
void dispatch_dtypes(ScalarType w, ScalarType tok, ScalarType cell, const F& f) {
  auto with_cell = [&](auto wt, auto tt) {
    using tok_t = typename decltype(tt)::type;
    if (cell == c10::CppTypeToScalarType<tok_t>::value) {
      f(wt, tt, tt);
    } else {
      f(wt, tt, Tag<float>{});
    }
  };
  auto with_tok = [&](auto wt) {
    using w_t = typename decltype(wt)::type;
    if (tok == c10::CppTypeToScalarType<w_t>::value) {
      with_cell(wt, wt);
    } else {
      with_cell(wt, Tag<float>{});
    }
  };
  switch (w) {
    case ScalarType::Float: with_tok(Tag<float>{}); break;
    case ScalarType::Double: with_tok(Tag<double>{}); break;
    case ScalarType::Half: with_tok(Tag<c10::Half>{}); break;
    case ScalarType::BFloat16: with_tok(Tag<c10::BFloat16>{}); break;
    default: TORCH_CHECK(false, "lspt cpu: unsupported weight dtype ", w);
  }
}

// Column chunk for passes whose work items are (outer index, column chunk): enough items to keep
// every thread busy when `outer` is small, whole rows otherwise (longest contiguous runs).
int64_t column_chunk(int64_t D, int64_t outer) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t wanted = (4 * threads + std::max<int64_t>(outer, 1) - 1) / std::max<int64_t>(outer, 1);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(wanted, D / 64));
  int64_t chunk = (D + chunks - 1) / chunks;
  chunk = (chunk + 15) / 16 * 16;  // whole vectors
  return std::max<int64_t>(1, std::min(chunk, D));
}

// Items per thread below which a pass runs serially: an OpenMP fork costs microseconds, so a
// thread should get at least ~32k elements of work.
int64_t grain_for(int64_t work_per_item) {
  constexpr int64_t kMinWork = 32768;
  return std::max<int64_t>(1, kMinWork / std::max<int64_t>(work_per_item, 1));
}

// ------------------------------------------------------------------------------------------------
// Pass 1: xhat[b,p] = tokens[b,k+p] + mean_n tokens[b,k+Np+n]. Items (b, column chunk): the patch
// rows are read once, the mean stays in a chunk-sized buffer.
// ------------------------------------------------------------------------------------------------
template <typename tok_t, typename w_t>
void mean_add_prompts(const tok_t* tokens, int64_t sB, int64_t sT, int64_t B, int64_t Np,
                      int64_t N, int64_t D, int64_t k, w_t* xhat) {
  using acc_t = acc_type<tok_t>;
  const int64_t chunk = column_chunk(D, B);
  const int64_t nchunks = (D + chunk - 1) / chunk;
  at::parallel_for(0, B * nchunks, grain_for((N + Np) * chunk), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> mean_buf(chunk);
    acc_t* __restrict__ mean = mean_buf.data();
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / nchunks, d0 = (item % nchunks) * chunk;
      const int64_t len = std::min(chunk, D - d0);
      const tok_t* base = tokens + b * sB + d0;
      std::fill(mean, mean + len, acc_t(0));
      for (int64_t n = 0; n < N; ++n) {
        const tok_t* __restrict__ row = base + (k + Np + n) * sT;
        LSPT_IVDEP
        for (int64_t j = 0; j < len; ++j) mean[j] += static_cast<acc_t>(row[j]);
      }
      for (int64_t j = 0; j < len; ++j) mean[j] /= static_cast<acc_t>(N);
      for (int64_t p = 0; p < Np; ++p) {
        const tok_t* __restrict__ row = base + (k + p) * sT;
        w_t* __restrict__ out = xhat + (b * Np + p) * D + d0;
        LSPT_IVDEP
        for (int64_t j = 0; j < len; ++j) out[j] = static_cast<w_t>(static_cast<acc_t>(row[j]) + mean[j]);
      }
    }
  });
}

// ------------------------------------------------------------------------------------------------
// Pass 2 (forward): G (rows, 4D) from the GEMM plus the gate bias rows -> hidden, new_cell and, when
// SAVE, the activated gates (rows, 4D) in the accumulation dtype. Row r uses gate-bias row
// r % period: period = Np for (Np, 4D) rows (the block starts at an image boundary), or the block's
// row count for per-image rows (gb then points at the block's first row).
// ------------------------------------------------------------------------------------------------
template <bool SAVE, typename tok_t, typename cell_t, typename w_t>
void cell_update(const w_t* gates, const w_t* gb, int64_t period, const cell_t* cell,
                       tok_t* hidden, cell_t* new_cell, acc_type<tok_t>* act, int64_t rows,
                       int64_t D) {
  using acc_t = acc_type<tok_t>;
  using M = Math<acc_t>;
  at::parallel_for(0, rows, grain_for(8 * D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const w_t* __restrict__ gi = gates + r * 4 * D;
      const w_t* __restrict__ gf = gi + D;
      const w_t* __restrict__ gg = gi + 2 * D;
      const w_t* __restrict__ go = gi + 3 * D;
      const w_t* __restrict__ pi = gb + (r % period) * 4 * D;
      const w_t* __restrict__ pf = pi + D;
      const w_t* __restrict__ pgg = pi + 2 * D;
      const w_t* __restrict__ po = pi + 3 * D;
      const cell_t* __restrict__ c = cell + r * D;
      tok_t* __restrict__ h = hidden + r * D;
      cell_t* __restrict__ nc = new_cell + r * D;
      acc_t* __restrict__ ai = SAVE ? act + r * 4 * D : nullptr;
      LSPT_IVDEP
      for (int64_t j = 0; j < D; ++j) {
        const acc_t i = M::sigmoid(static_cast<acc_t>(gi[j]) + static_cast<acc_t>(pi[j]));
        const acc_t f = M::sigmoid(static_cast<acc_t>(gf[j]) + static_cast<acc_t>(pf[j]));
        const acc_t g = M::tanh(static_cast<acc_t>(gg[j]) + static_cast<acc_t>(pgg[j]));
        const acc_t o = M::sigmoid(static_cast<acc_t>(go[j]) + static_cast<acc_t>(po[j]));
        const acc_t c2 = f * static_cast<acc_t>(c[j]) + i * g;
        nc[j] = static_cast<cell_t>(c2);
        h[j] = static_cast<tok_t>(o * M::tanh(c2));
        if constexpr (SAVE) {
          ai[j] = i;
          ai[D + j] = f;
          ai[2 * D + j] = g;
          ai[3 * D + j] = o;
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------------------------
// Backward pass A: the gates (SAVED: the activated gates from forward; else the recomputed G plus
// the gate bias, read from `pre`, which may be the `dgates` buffer itself: each column's four gates
// are read before its four dgates are stored) -> dgates (rows, 4D) in W, dcell_prev and, when dpg
// is not null, dpg[p] = sum_b dgates[b,p] in the accumulation dtype. Items are (p, column chunk)
// so each thread owns its dpg slice and the batch sum needs no atomics or second pass.
// ------------------------------------------------------------------------------------------------
template <bool SAVED, typename tok_t, typename cell_t, typename w_t>
void cell_update_backward(const w_t* pre, const acc_type<tok_t>* act, const w_t* gb, int64_t period,
                        const cell_t* cell, const tok_t* grad_hidden, const cell_t* grad_cell,
                        cell_t* grad_cell_prev, w_t* dgates, acc_type<tok_t>* dpg, int64_t B,
                        int64_t Np, int64_t D) {
  using acc_t = acc_type<tok_t>;
  using M = Math<acc_t>;
  const int64_t chunk = column_chunk(D, Np);
  const int64_t nchunks = (D + chunk - 1) / chunk;
  at::parallel_for(0, Np * nchunks, grain_for(B * chunk * 12), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sums(4 * chunk);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t p = item / nchunks, d0 = (item % nchunks) * chunk;
      const int64_t len = std::min(chunk, D - d0);
      acc_t* __restrict__ si = sums.data();
      acc_t* __restrict__ sf = si + chunk;
      acc_t* __restrict__ sg = si + 2 * chunk;
      acc_t* __restrict__ so = si + 3 * chunk;
      std::fill(sums.begin(), sums.end(), acc_t(0));
      for (int64_t b = 0; b < B; ++b) {
        const int64_t r = b * Np + p;
        const w_t* gi = pre + r * 4 * D + d0;
        const w_t* __restrict__ pi = gb + (r % period) * 4 * D + d0;
        const acc_t* __restrict__ ai = SAVED ? act + r * 4 * D + d0 : nullptr;
        w_t* di = dgates + r * 4 * D + d0;
        const cell_t* __restrict__ c = cell + r * D + d0;
        const tok_t* __restrict__ dh = grad_hidden + r * D + d0;
        const cell_t* __restrict__ dc2 = grad_cell + r * D + d0;
        cell_t* __restrict__ dcp = grad_cell_prev + r * D + d0;
        LSPT_IVDEP
        for (int64_t j = 0; j < len; ++j) {
          acc_t i, f, g, o;
          if constexpr (SAVED) {
            i = ai[j];
            f = ai[D + j];
            g = ai[2 * D + j];
            o = ai[3 * D + j];
          } else {
            i = M::sigmoid(static_cast<acc_t>(gi[j]) + static_cast<acc_t>(pi[j]));
            f = M::sigmoid(static_cast<acc_t>(gi[D + j]) + static_cast<acc_t>(pi[D + j]));
            g = M::tanh(static_cast<acc_t>(gi[2 * D + j]) + static_cast<acc_t>(pi[2 * D + j]));
            o = M::sigmoid(static_cast<acc_t>(gi[3 * D + j]) + static_cast<acc_t>(pi[3 * D + j]));
          }
          const acc_t cp = static_cast<acc_t>(c[j]);
          const acc_t tc = M::tanh(f * cp + i * g);
          const acc_t dhj = static_cast<acc_t>(dh[j]);
          const acc_t dc = static_cast<acc_t>(dc2[j]) + dhj * o * (acc_t(1) - tc * tc);
          const acc_t dgi = dc * g * i * (acc_t(1) - i);
          const acc_t dgf = dc * cp * f * (acc_t(1) - f);
          const acc_t dgg = dc * i * (acc_t(1) - g * g);
          const acc_t dgo = dhj * tc * o * (acc_t(1) - o);
          dcp[j] = static_cast<cell_t>(dc * f);
          di[j] = static_cast<w_t>(dgi);
          di[D + j] = static_cast<w_t>(dgf);
          di[2 * D + j] = static_cast<w_t>(dgg);
          di[3 * D + j] = static_cast<w_t>(dgo);
          si[j] += dgi;
          sf[j] += dgf;
          sg[j] += dgg;
          so[j] += dgo;
        }
      }
      if (dpg != nullptr) {
        acc_t* out = dpg + p * 4 * D + d0;
        for (int64_t q = 0; q < 4; ++q) std::copy(si + q * chunk, si + q * chunk + len, out + q * D);
      }
    }
  });
}

// ------------------------------------------------------------------------------------------------
// Backward pass B: grad_tokens (B,T,D) = [0 (k rows) | dxhat (Np rows) | sum_p dxhat / N (N rows)].
// Every element is written exactly once (no zero-fill pass over the buffer first).
// ------------------------------------------------------------------------------------------------
template <typename tok_t, typename w_t>
void write_grad_tokens(const w_t* dxhat, tok_t* grad_tokens, int64_t B, int64_t T, int64_t Np,
                       int64_t D, int64_t k) {
  using acc_t = acc_type<tok_t>;
  const int64_t N = T - k - Np;
  const int64_t chunk = column_chunk(D, B);
  const int64_t nchunks = (D + chunk - 1) / chunk;
  at::parallel_for(0, B * nchunks, grain_for(T * chunk), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum_buf(chunk);
    std::vector<tok_t> patch_buf(chunk);
    acc_t* __restrict__ sum = sum_buf.data();
    tok_t* __restrict__ patch = patch_buf.data();
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / nchunks, d0 = (item % nchunks) * chunk;
      const int64_t len = std::min(chunk, D - d0);
      tok_t* base = grad_tokens + b * T * D + d0;
      for (int64_t t = 0; t < k; ++t) std::fill(base + t * D, base + t * D + len, tok_t(0));
      std::fill(sum, sum + len, acc_t(0));
      for (int64_t p = 0; p < Np; ++p) {
        const w_t* __restrict__ in = dxhat + (b * Np + p) * D + d0;
        tok_t* __restrict__ out = base + (k + p) * D;
        LSPT_IVDEP
        for (int64_t j = 0; j < len; ++j) {
          const acc_t v = static_cast<acc_t>(in[j]);
          sum[j] += v;
          out[j] = static_cast<tok_t>(v);
        }
      }
      for (int64_t j = 0; j < len; ++j) patch[j] = static_cast<tok_t>(sum[j] / static_cast<acc_t>(N));
      for (int64_t n = 0; n < N; ++n) std::memcpy(base + (k + Np + n) * D, patch, len * sizeof(tok_t));
    }
  });
}

// `weight` as the right operand of a GEMM. ATen runs bf16/fp16 GEMMs on CPUs without native
// low-precision matrix units through oneDNN only when the right operand is a transposed view (or
// the left one is); with both operands row-major it falls back to a kernel measured ~20x slower
// (0.8 vs 22 GFLOP/s on an AVX2 EPYC). A transposed copy of the weight (4D*D values) costs far less.
// fp32/fp64 run at the same speed in every layout, so they use the weight as it is.
Tensor gemm_right_operand(const Tensor& weight) {
  return is_low_precision(weight.scalar_type()) ? weight.t().contiguous().t() : weight;
}

// Images per forward GEMM block: about kBlockRows rows, big enough that MKL runs each block at
// full-GEMM speed (measured on one thread: 1200-row blocks match one 6400-row GEMM, 300-row
// blocks lose 7%, 100-row blocks 30%).
int64_t images_per_gemm_block(int64_t B, int64_t Np) {
  constexpr int64_t kBlockRows = 1024;
  return std::clamp<int64_t>(kBlockRows / std::max<int64_t>(Np, 1), 1, std::max<int64_t>(B, 1));
}

// What the forward's GEMM + cell-update blocks read and write (the whole batch's tensors).
template <typename tok_t, typename cell_t, typename w_t>
struct StepBuffers {
  Tensor xhat2d;                 // (B*Np, D) in W
  const w_t* gb;                 // gate-bias rows: (Np, 4D), or (B*Np, 4D) when per_image
  bool per_image;
  const cell_t* cell;            // (B*Np, D)
  tok_t* hidden;
  cell_t* new_cell;
  acc_type<tok_t>* act;          // (B*Np, 4D) activated gates, or null (not saved)
  int64_t Np, D, images;         // images: per GEMM block (images_per_gemm_block)
};

// Images [b_begin, b_end) with one weight_hh (4D, D): per block of whole images, the GEMM into the
// block-sized `gates` buffer, then pass 2 while the block is still hot. A fresh B*Np*4D buffer
// (79 MB at B=64, Np=100) would cost more in first-touch page faults than the cell update itself.
template <typename tok_t, typename cell_t, typename w_t>
void gemm_and_cell_update(const StepBuffers<tok_t, cell_t, w_t>& s, const Tensor& weight_hh, Tensor& gates,
                          int64_t b_begin, int64_t b_end) {
  const int64_t Np = s.Np, D = s.D;
  for (int64_t b0 = b_begin; b0 < b_end; b0 += s.images) {
    const int64_t rows = std::min(s.images, b_end - b0) * Np;
    Tensor block = gates.narrow(0, 0, rows);
    at::mm_out(block, s.xhat2d.narrow(0, b0 * Np, rows), weight_hh.t());
    const w_t* gb_block = s.per_image ? s.gb + b0 * Np * 4 * D : s.gb;
    const int64_t period = s.per_image ? rows : Np;
    const int64_t off = b0 * Np * D;
    if (s.act != nullptr) {
      cell_update<true, tok_t, cell_t, w_t>(block.data_ptr<w_t>(), gb_block, period, s.cell + off, s.hidden + off,
                                            s.new_cell + off, s.act + 4 * off, rows, D);
    } else {
      cell_update<false, tok_t, cell_t, w_t>(block.data_ptr<w_t>(), gb_block, period, s.cell + off,
                                             s.hidden + off, s.new_cell + off, nullptr, rows, D);
    }
  }
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> cpu_forward(const Tensor& tokens, const Tensor& cell,
                                                       const Tensor& gate_bias, const Tensor& weight_hh,
                                                       int64_t k, bool save_gates) {
  const StepSizes sz = check_forward("lspt cpu_forward", tokens, cell, gate_bias, weight_hh, k);
  const int64_t B = sz.B, T = sz.T, D = sz.D, Np = sz.Np;
  const bool per_image = sz.per_image_rows;
  TORCH_CHECK(tokens.is_cpu(), "lspt cpu_forward: tokens must be a CPU tensor, got one on ", tokens.device());
  const ScalarType w = weight_hh.scalar_type();
  const ScalarType acc = acc_dtype(tokens.scalar_type());
  const int64_t N = T - k - Np;
  Tensor xhat = at::empty({B, Np, D}, weight_hh.options());
  Tensor hidden = at::empty({B, Np, D}, tokens.options());
  Tensor new_cell = at::empty({B, Np, D}, cell.options());
  Tensor act = save_gates ? at::empty({B, Np, 4 * D}, tokens.options().dtype(acc))
                          : at::empty({0}, tokens.options().dtype(acc));

  dispatch_dtypes(w, tokens.scalar_type(), cell.scalar_type(), [&](auto wt, auto tt, auto ct) {
    using w_t = typename decltype(wt)::type;
    using tok_t = typename decltype(tt)::type;
    using cell_t = typename decltype(ct)::type;
    using acc_t = acc_type<tok_t>;
    mean_add_prompts<tok_t, w_t>(tokens.data_ptr<tok_t>(), tokens.stride(0), tokens.stride(1), B,
                                 Np, N, D, k, xhat.data_ptr<w_t>());
    const int64_t images = images_per_gemm_block(B, Np);
    Tensor gates = at::empty({std::min(B, images) * Np, 4 * D}, weight_hh.options());
    const StepBuffers<tok_t, cell_t, w_t> buf{xhat.view({B * Np, D}), gate_bias.data_ptr<w_t>(), per_image,
                                              cell.data_ptr<cell_t>(), hidden.data_ptr<tok_t>(),
                                              new_cell.data_ptr<cell_t>(),
                                              save_gates ? act.data_ptr<acc_t>() : nullptr, Np, D, images};
    gemm_and_cell_update(buf, weight_hh, gates, 0, B);
  });
  return {hidden, new_cell, xhat, act};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> cpu_backward(
    const Tensor& grad_hidden, const Tensor& grad_cell, const Tensor& xhat_in, const Tensor& cell,
    const Tensor& gate_bias, const Tensor& weight_hh, const Tensor& gates, int64_t k, int64_t num_tokens) {
  const StepSizes sz = check_backward("lspt cpu_backward", grad_hidden, grad_cell, xhat_in, cell, gate_bias,
                                      weight_hh, gates, k, num_tokens);
  const int64_t B = sz.B, T = sz.T, D = sz.D, Np = sz.Np;
  const bool per_image = sz.per_image_rows;
  TORCH_CHECK(xhat_in.is_cpu(), "lspt cpu_backward: xhat must be a CPU tensor, got one on ", xhat_in.device());
  const ScalarType w = weight_hh.scalar_type();
  const ScalarType acc = acc_dtype(grad_hidden.scalar_type());
  const bool saved = gates.numel() > 0;   // else gate_bias is read (the gates are recomputed)
  const Tensor xhat = xhat_in.view({B * Np, D});

  // Without saved gates: G recomputed, and pass A overwrites it with dgates (one buffer, not two).
  Tensor dgates = saved ? at::empty({B * Np, 4 * D}, weight_hh.options()) : at::mm(xhat, weight_hh.t()).contiguous();
  Tensor grad_cell_prev = at::empty({B, Np, D}, cell.options());
  Tensor dpg = per_image ? Tensor() : at::empty({Np, 4 * D}, grad_hidden.options().dtype(acc));
  Tensor grad_tokens = at::empty({B, T, D}, grad_hidden.options());

  dispatch_dtypes(w, grad_hidden.scalar_type(), cell.scalar_type(), [&](auto wt, auto tt, auto ct) {
    using w_t = typename decltype(wt)::type;
    using tok_t = typename decltype(tt)::type;
    using cell_t = typename decltype(ct)::type;
    using acc_t = acc_type<tok_t>;
    const int64_t period = per_image ? B * Np : Np;
    acc_t* dpg_ptr = per_image ? nullptr : dpg.data_ptr<acc_t>();
    // With saved gates the gate bias is not read (the autograd passes a stride-0 stand-in).
    const w_t* gb = static_cast<const w_t*>(gate_bias.data_ptr());
    if (saved) {
      cell_update_backward<true, tok_t, cell_t, w_t>(
          dgates.data_ptr<w_t>(), gates.data_ptr<acc_t>(), gb, period, cell.data_ptr<cell_t>(),
          grad_hidden.data_ptr<tok_t>(), grad_cell.data_ptr<cell_t>(), grad_cell_prev.data_ptr<cell_t>(),
          dgates.data_ptr<w_t>(), dpg_ptr, B, Np, D);
    } else {
      cell_update_backward<false, tok_t, cell_t, w_t>(
          dgates.data_ptr<w_t>(), nullptr, gb, period, cell.data_ptr<cell_t>(), grad_hidden.data_ptr<tok_t>(),
          grad_cell.data_ptr<cell_t>(), grad_cell_prev.data_ptr<cell_t>(), dgates.data_ptr<w_t>(), dpg_ptr, B, Np,
          D);
    }
    const Tensor dxhat = at::mm(dgates, gemm_right_operand(weight_hh)).contiguous();  // (B*Np, D)
    write_grad_tokens<tok_t, w_t>(dxhat.data_ptr<w_t>(), grad_tokens.data_ptr<tok_t>(), B, T, Np, D, k);
  });

  Tensor grad_weight_hh = at::mm(dgates.t(), xhat);  // (4D, D)
  // Per-image rows: their gradient is dgates itself; shared rows: the batch sum (in the acc dtype).
  Tensor grad_gate_bias = per_image ? dgates.view({B, Np, 4 * D}) : dpg.to(w);
  return {grad_tokens, grad_cell_prev, grad_gate_bias, grad_weight_hh};
}

std::tuple<Tensor, Tensor> cpu_grouped_forward(const Tensor& tokens, const Tensor& cell, const Tensor& gate_bias,
                                               const Tensor& weight_hh, const Tensor& offsets, int64_t k) {
  const GroupedSizes sz = check_grouped_forward("lspt cpu_grouped_forward", tokens, cell, gate_bias, weight_hh,
                                                offsets, k);
  const int64_t B = sz.B, T = sz.T, D = sz.D, Np = sz.Np, G = sz.G;
  TORCH_CHECK(tokens.is_cpu(), "lspt cpu_grouped_forward: tokens must be a CPU tensor, got one on ", tokens.device());
  const int64_t N = T - k - Np;
  Tensor xhat = at::empty({B, Np, D}, weight_hh.options());
  Tensor hidden = at::empty({B, Np, D}, tokens.options());
  Tensor new_cell = at::empty({B, Np, D}, cell.options());
  const int64_t* off = offsets.data_ptr<int64_t>();

  dispatch_dtypes(weight_hh.scalar_type(), tokens.scalar_type(), cell.scalar_type(), [&](auto wt, auto tt, auto ct) {
    using w_t = typename decltype(wt)::type;
    using tok_t = typename decltype(tt)::type;
    using cell_t = typename decltype(ct)::type;
    mean_add_prompts<tok_t, w_t>(tokens.data_ptr<tok_t>(), tokens.stride(0), tokens.stride(1), B,
                                 Np, N, D, k, xhat.data_ptr<w_t>());
    const int64_t images = images_per_gemm_block(B, Np);
    Tensor gates = at::empty({std::min(B, images) * Np, 4 * D}, weight_hh.options());
    const StepBuffers<tok_t, cell_t, w_t> buf{xhat.view({B * Np, D}), gate_bias.data_ptr<w_t>(), /*per_image=*/true,
                                              cell.data_ptr<cell_t>(), hidden.data_ptr<tok_t>(),
                                              new_cell.data_ptr<cell_t>(), nullptr, Np, D, images};
    for (int64_t g = 0; g < G; ++g) {
      int64_t lo, hi;
      group_rows(off, g, B, lo, hi);
      if (hi > lo) gemm_and_cell_update(buf, weight_hh[g], gates, lo, hi);
    }
  });
  return {hidden, new_cell};
}

}  // namespace lspt
