// Fused LSPT step on CUDA (the kernels behind backend "cuda"; docs/method.md, "One step, written out";
// registered by csrc/bindings.cpp).
//
// tokens (B, T, D) = [prefix k | prompts Np | patches N]; W = the weights' dtype (GEMM precision);
// A = the accumulation type (float, or double for fp64 tokens).
//
// gate_bias = P[l] @ weight_ih^T + b_ih + b_hh comes in precomputed, (Np, 4D) or, under per-image prompt
// dropout, (B, Np, 4D) in W (the encoder computes it for every step with one GEMM per forward; see
// lspt_kernels/ops.py). GEMM row r uses gate-bias row r % period (period = Np or B*Np).
//
// Forward, three launches on the current stream:
//   1. prologue_kernel: one block per (image b, column tile): one pass over the patch tokens of
//      image b (mean in A) and the prompt rows, writing xhat[b, p] = W(tokens[b, k+p] + mean_n
//      tokens[b, k+Np+n]);
//   2. G = xhat (B·Np, D) @ weight_hh^T (at::mm -> cuBLAS(Lt)), (B·Np, 4D) in W, like the eager step's linear.
//   3. epilogue_kernel: gates = G + gate bias in A, the LSTM cell update, hidden (tokens dtype) and
//      new_cell.
//
// Backward, five launches (plus a ticket memset when the batch-sum is split over blocks; only xhat
// and the incoming cell are saved: the gates are recomputed):
//   1. G = xhat @ weight_hh^T (cuBLAS);
//   2. bwd_elementwise_kernel: recomputes the gates, writes dgates in W over G (in place: they are the
//      input of the two cuBLAS GEMMs below, which run in W, as the eager step's autograd does), the
//      grad of the incoming cell, and for (Np, 4D) gate-bias rows their gradient = batch-sum of the
//      unrounded dgates in A, stored in W (for per-image rows the gradient is dgates itself). The
//      batch-sum is split over grid.y chunks of the batch; the last block of each column tile (atomic
//      ticket) adds the chunks' partial sums in a fixed order, so the result is deterministic
//      (gradcheck checks that backward is reentrant; float atomics would not be);
//   3. dxhat = dgates @ weight_hh (cuBLAS, W);   4. grad_weight_hh = dgates^T @ xhat (cuBLAS, W);
//   5. tail_kernel: grad_tokens (prefix rows 0, prompt rows dxhat, patch rows sum_p dxhat / N).
//
// Vectorised (16-byte where the dtype allows) loads and stores when D and every pointer and stride
// are aligned; the same kernels instantiated with VEC = 1 otherwise.
#include "lspt_step_cuda.h"

#include "checks.h"

// Only c10's CUDA headers (not ATen/cuda/CUDAContext.h, which pulls in the cuBLAS/cuSPARSE/
// cuSOLVER headers that a minimal toolkit lacks): c10::cuda::getCurrentCUDAStream is the function
// that at::cuda::getCurrentCUDAStream names; cuBLAS runs through at::mm.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <type_traits>

namespace lspt {
namespace {

constexpr int kThreads = 256;  // every kernel runs 256-thread blocks

// ------------------------------------------------------------------------------------------------
// Conversions and vector access
// ------------------------------------------------------------------------------------------------
template <typename T>
constexpr bool is_16bit = std::is_same<T, c10::Half>::value || std::is_same<T, c10::BFloat16>::value;

template <typename A, typename T>
__device__ __forceinline__ A load_cast(T x) {
  if constexpr (is_16bit<T>) return static_cast<A>(static_cast<float>(x));
  else return static_cast<A>(x);
}

template <typename T, typename A>
__device__ __forceinline__ T store_cast(A x) {
  if constexpr (is_16bit<T>) return T(static_cast<float>(x));
  else return static_cast<T>(x);
}

// N contiguous elements moved as one access (N * sizeof(T) <= 16 bytes everywhere below).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename A, typename T>
__device__ __forceinline__ void load_vec(const T* p, A (&out)[N]) {
  static_assert(N * sizeof(T) <= 16, "one access is at most 16 bytes");
  const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = load_cast<A>(pk.v[i]);
}

template <int N, typename T, typename A>
__device__ __forceinline__ void store_vec(T* p, const A (&in)[N]) {
  static_assert(N * sizeof(T) <= 16, "one access is at most 16 bytes");
  Pack<T, N> pk;
#pragma unroll
  for (int i = 0; i < N; ++i) pk.v[i] = store_cast<T>(in[i]);
  *reinterpret_cast<Pack<T, N>*>(p) = pk;
}

// Gate nonlinearities in the accumulation type. The build uses --use_fast_math, under which nvcc
// turns tanhf into tanh.approx.f32 (relative error up to 2^-11: too coarse for fp32 parity), so
// tanh is written out: an odd polynomial below 0.6 and 1 - 2/(e^{2|x|} + 1) above (both within
// ~3 ulp of fp64 tanh when evaluated in fp32; e^{2|x|} = inf gives 1). exp is __expf (ex2.approx).
__device__ __forceinline__ float sigmoid_acc(float x) { return 1.f / (1.f + __expf(-x)); }
__device__ __forceinline__ double sigmoid_acc(double x) { return 1.0 / (1.0 + exp(-x)); }
__device__ __forceinline__ float tanh_acc(float x) {
  const float a = fabsf(x);
  float r;
  if (a >= 0.6f) {
    r = 1.f - 2.f / (__expf(2.f * a) + 1.f);
  } else {
    const float s = x * x;
    float q = fmaf(-5.70498872e-3f, s, 2.06390887e-2f);
    q = fmaf(q, s, -5.37397642e-2f);
    q = fmaf(q, s, 1.33314758e-1f);
    q = fmaf(q, s, -3.33332413e-1f);
    r = fmaf(q * s, a, a);
  }
  return copysignf(r, x);
}
__device__ __forceinline__ double tanh_acc(double x) { return tanh(x); }

// ------------------------------------------------------------------------------------------------
// Row-lane reductions
// ------------------------------------------------------------------------------------------------
template <typename A, int VEC>
constexpr size_t red_bytes() { return size_t(kThreads) * VEC * sizeof(A); }

constexpr size_t cmax(size_t x, size_t y) { return x > y ? x : y; }

// Sums red[(nl*DT + dlane)*VEC + v] over the NL row lanes in a fixed order into row 0 (threads of
// row lane 0), then makes row 0 visible to every thread. All threads of the block must call it.
template <typename A, int VEC>
__device__ __forceinline__ void reduce_row_lanes(A* red, const A (&acc)[VEC], int dt_shift) {
  const int tid = threadIdx.x, dlane = tid & ((1 << dt_shift) - 1), nlane = tid >> dt_shift;
  const int nl_count = kThreads >> dt_shift;
#pragma unroll
  for (int v = 0; v < VEC; ++v) red[tid * VEC + v] = acc[v];
  __syncthreads();
  if (nlane == 0) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      A s = A(0);
      for (int nl = 0; nl < nl_count; ++nl) s += red[((nl << dt_shift) + dlane) * VEC + v];
      red[dlane * VEC + v] = s;
    }
  }
  __syncthreads();
}

// ------------------------------------------------------------------------------------------------
// 1. Prologue: xhat blocks
// ------------------------------------------------------------------------------------------------
template <typename T, typename W, typename A>
struct PrologueArgs {
  const T* tokens;
  int64_t tok_sb, tok_st;
  W* xhat;
  int B, Np, N, D, k;
  int dt_shift, n_dtiles;
};

template <typename T, typename W, typename A, int VEC>
__global__ void __launch_bounds__(kThreads)
prologue_kernel(const PrologueArgs<T, W, A> p) {
  __shared__ __align__(16) unsigned char smem[red_bytes<A, VEC>()];
  const int tid = threadIdx.x;
  // xhat block: image b, VEC-wide column lanes [dtile*DT, dtile*DT + DT) x NL row lanes.
  const int x = blockIdx.x;
  const int b = x / p.n_dtiles, dtile = x - b * p.n_dtiles;
  const int DT = 1 << p.dt_shift, NL = kThreads >> p.dt_shift;
  const int dlane = tid & (DT - 1), nlane = tid >> p.dt_shift;
  const int d0 = (dtile * DT + dlane) * VEC;
  const bool active = d0 < p.D;
  const T* img = p.tokens + int64_t(b) * p.tok_sb + d0;

  A acc[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) acc[v] = A(0);
  if (active) {
    const T* patch = img + int64_t(p.k + p.Np) * p.tok_st;
#pragma unroll 4
    for (int n = nlane; n < p.N; n += NL) {
      A t[VEC];
      load_vec<VEC>(patch + int64_t(n) * p.tok_st, t);
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] += t[v];
    }
  }
  A* red = reinterpret_cast<A*>(smem);
  reduce_row_lanes<A, VEC>(red, acc, p.dt_shift);
  if (!active) return;
  A mean[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) mean[v] = red[dlane * VEC + v] / A(p.N);
  const T* prm = img + int64_t(p.k) * p.tok_st;
  W* out = p.xhat + int64_t(b) * p.Np * p.D + d0;
  for (int q = nlane; q < p.Np; q += NL) {
    A t[VEC];
    load_vec<VEC>(prm + int64_t(q) * p.tok_st, t);
#pragma unroll
    for (int v = 0; v < VEC; ++v) t[v] += mean[v];
    store_vec<VEC>(out + int64_t(q) * p.D, t);
  }
}

// ------------------------------------------------------------------------------------------------
// 3. Forward epilogue: gates = G + gate bias, cell update
// ------------------------------------------------------------------------------------------------
// The LSTM cell update of VEC columns (the forward's gate math, shared by the single-task epilogue and
// the grouped kernel): z holds the four pre-activations (i, f, g, o; gate bias added) in A; the
// incoming cell c becomes the new cell, h the hidden.
template <typename A, int VEC>
__device__ __forceinline__ void lstm_cell(const A (&z)[4][VEC], A (&c)[VEC], A (&h)[VEC]) {
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    const A i = sigmoid_acc(z[0][v]), f = sigmoid_acc(z[1][v]);
    const A gg = tanh_acc(z[2][v]), o = sigmoid_acc(z[3][v]);
    c[v] = f * c[v] + i * gg;
    h[v] = o * tanh_acc(c[v]);
  }
}

template <typename T, typename C, typename W, typename A>
struct EpilogueArgs {
  const W* gates;  // (B*Np, 4D)
  const W* gb;     // (period, 4D): gate-bias rows
  const C* cell;   // (B*Np, D)
  T* hidden;
  C* new_cell;
  int period, D, Dv;
  int rows;  // B*Np
};

template <typename T, typename C, typename W, typename A, int VEC>
__global__ void __launch_bounds__(kThreads)
epilogue_kernel(const EpilogueArgs<T, C, W, A> p) {
  const int64_t D4 = 4 * int64_t(p.D);
  // Grid-stride over the (row, column group) items without 64-bit divisions (which would compile
  // to a call): the grid has < 2^31 threads, so the start and the stride split in 32 bits.
  const int stride = int(gridDim.x) * kThreads;
  const int stride_rows = stride / p.Dv, stride_cols = stride - stride_rows * p.Dv;
  const int start = int(blockIdx.x) * kThreads + int(threadIdx.x);
  int r = start / p.Dv, dv = start - r * p.Dv;
  for (; r < p.rows; r += stride_rows, dv += stride_cols) {
    if (dv >= p.Dv) {
      dv -= p.Dv;
      if (++r >= p.rows) break;
    }
    const int64_t row = r;
    const int d0 = dv * VEC;
    const int64_t q = r % p.period;
    const W* g = p.gates + row * D4 + d0;
    const W* gb = p.gb + q * D4 + d0;
    A z[4][VEC], c[VEC];
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      A bias[VEC];
      load_vec<VEC>(g + s * p.D, z[s]);
      load_vec<VEC>(gb + s * p.D, bias);
#pragma unroll
      for (int v = 0; v < VEC; ++v) z[s][v] += bias[v];
    }
    load_vec<VEC>(p.cell + row * p.D + d0, c);
    A h[VEC];
    lstm_cell<A, VEC>(z, c, h);
    store_vec<VEC>(p.new_cell + row * p.D + d0, c);
    store_vec<VEC>(p.hidden + row * p.D + d0, h);
  }
}

// ------------------------------------------------------------------------------------------------
// Grouped forward (multi-task inference; no backward): rows grouped by task, each group's product
// with its own weight_hh[g] as one segment of a grouped GEMM (Punica's SGMV), gate math fused.
// Grid (group * m_tiles + M-tile, N-tile): a block reads its group's images from offsets on the device
// (group_rows clamps them to [0, B], so any offsets stay in bounds) and exits when its M-tile lies past
// the segment's end. A block computes kGM rows x kGN columns of all four gates: 256 threads as
// kGN column lanes x 8 row lanes, kGM / 8 rows each, K in kGK-wide shared-memory tiles, accumulating
// in A. A plain FMA GEMM (not tensor cores): correct everywhere, not tuned.
// ------------------------------------------------------------------------------------------------
constexpr int kGM = 32, kGN = 32, kGK = 16, kGRowLanes = kThreads / kGN, kGRows = kGM / kGRowLanes;

template <typename T, typename C, typename W, typename A>
struct GroupedArgs {
  const W* xhat;     // (B*Np, D)
  const W* weight;   // (G, 4D, D)
  const W* gb;       // (B*Np, 4D): each row's own gate-bias row
  const C* cell;     // (B*Np, D)
  const int64_t* offsets;  // (G + 1,)
  T* hidden;
  C* new_cell;
  int B, Np, D, m_tiles;
};

template <typename T, typename C, typename W, typename A>
__global__ void __launch_bounds__(kThreads)
grouped_gates_kernel(const GroupedArgs<T, C, W, A> p) {
  __shared__ A xs[kGM][kGK + 1];
  __shared__ A ws[4][kGK][kGN + 1];
  const int group = int(blockIdx.x) / p.m_tiles, m_tile = int(blockIdx.x) - group * p.m_tiles;
  int64_t lo, hi;
  group_rows(p.offsets, group, p.B, lo, hi);
  const int row_end = int(hi) * p.Np;
  const int row0 = int(lo) * p.Np + m_tile * kGM;
  if (row0 >= row_end) return;  // the whole block: past its segment (or an empty group)
  const int n0 = int(blockIdx.y) * kGN;
  const int tid = threadIdx.x, tx = tid % kGN, ty = tid / kGN;
  const int64_t D = p.D, D4 = 4 * D;
  const W* w = p.weight + int64_t(group) * D4 * D;

  A acc[4][kGRows];
#pragma unroll
  for (int s = 0; s < 4; ++s)
#pragma unroll
    for (int r = 0; r < kGRows; ++r) acc[s][r] = A(0);

  for (int k0 = 0; k0 < p.D; k0 += kGK) {
    // xhat tile: kGM x kGK (consecutive threads read consecutive k: coalesced)
    for (int e = tid; e < kGM * kGK; e += kThreads) {
      const int r = e / kGK, kk = e - r * kGK;
      const int row = row0 + r, col = k0 + kk;
      xs[r][kk] = (row < row_end && col < p.D) ? load_cast<A>(p.xhat[int64_t(row) * D + col]) : A(0);
    }
    // the four gates' weight tiles: ws[s][kk][n] = weight_hh[g][s*D + n0 + n][k0 + kk]
    for (int e = tid; e < 4 * kGN * kGK; e += kThreads) {
      const int kk = e % kGK, n = (e / kGK) % kGN, s = e / (kGK * kGN);
      const int col = k0 + kk, out = n0 + n;
      ws[s][kk][n] = (out < p.D && col < p.D) ? load_cast<A>(w[(s * D + out) * D + col]) : A(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kGK; ++kk) {
      A b[4];
#pragma unroll
      for (int s = 0; s < 4; ++s) b[s] = ws[s][kk][tx];
#pragma unroll
      for (int r = 0; r < kGRows; ++r) {
        const A a = xs[ty + r * kGRowLanes][kk];
#pragma unroll
        for (int s = 0; s < 4; ++s) acc[s][r] += a * b[s];
      }
    }
    __syncthreads();
  }

  const int n = n0 + tx;
  if (n >= p.D) return;
#pragma unroll
  for (int r = 0; r < kGRows; ++r) {
    const int row = row0 + ty + r * kGRowLanes;
    if (row >= row_end) break;
    A z[4][1], c[1], h[1];
#pragma unroll
    for (int s = 0; s < 4; ++s) z[s][0] = acc[s][r] + load_cast<A>(p.gb[int64_t(row) * D4 + s * D + n]);
    c[0] = load_cast<A>(p.cell[int64_t(row) * D + n]);
    lstm_cell<A, 1>(z, c, h);
    p.new_cell[int64_t(row) * D + n] = store_cast<C>(c[0]);
    p.hidden[int64_t(row) * D + n] = store_cast<T>(h[0]);
  }
}

// ------------------------------------------------------------------------------------------------
// Backward 2: dgates (in place over G), grad of the incoming cell, d gate_bias = sum_b dgates
// ------------------------------------------------------------------------------------------------
template <typename T, typename C, typename W, typename A>
struct BwdElemArgs {
  W* gates;           // in: G = xhat @ weight_hh^T; out: dgates (B*Np, 4D)
  const W* gb;        // gate-bias rows: (Np, 4D), or (B*Np, 4D) when batched
  const C* cell;      // incoming cell (B*Np, D)
  const T* grad_h;    // (B*Np, D)
  const C* grad_c;    // (B*Np, D)
  C* grad_cell_prev;  // (B*Np, D)
  W* dgb;             // (Np, 4D) gradient of shared gate-bias rows; null when batched
  A* partial;         // (nchunks, Np, 4D) when nchunks > 1
  int* tickets;       // one per column tile (grid.x), zeroed before the launch
  int B, Np, D, Dv, chunk_b, nchunks;
  bool batched;
};

template <typename T, typename C, typename W, typename A, int VEC>
__global__ void __launch_bounds__(kThreads)
bwd_elementwise_kernel(const BwdElemArgs<T, C, W, A> p) {
  __shared__ int s_last;
  const int64_t D4 = 4 * int64_t(p.D);
  const int col = blockIdx.x * kThreads + threadIdx.x;  // (prompt q, column group dv)
  const bool active = col < p.Np * p.Dv;
  const int q = active ? col / p.Dv : 0;
  const int d0 = (col - q * p.Dv) * VEC;
  const int b_begin = blockIdx.y * p.chunk_b, b_end = min(p.B, b_begin + p.chunk_b);

  A acc[4][VEC];
#pragma unroll
  for (int s = 0; s < 4; ++s)
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[s][v] = A(0);

  if (active) {
    A bias[4][VEC];
    if (!p.batched) {
#pragma unroll
      for (int s = 0; s < 4; ++s) load_vec<VEC>(p.gb + q * D4 + s * p.D + d0, bias[s]);
    }
    for (int b = b_begin; b < b_end; ++b) {
      const int64_t row = int64_t(b) * p.Np + q;
      if (p.batched) {
#pragma unroll
        for (int s = 0; s < 4; ++s) load_vec<VEC>(p.gb + row * D4 + s * p.D + d0, bias[s]);
      }
      W* g = p.gates + row * D4 + d0;
      A z[4][VEC], c[VEC], dh[VEC], dcn[VEC];
#pragma unroll
      for (int s = 0; s < 4; ++s) load_vec<VEC>(g + s * p.D, z[s]);
      load_vec<VEC>(p.cell + row * p.D + d0, c);
      load_vec<VEC>(p.grad_h + row * p.D + d0, dh);
      load_vec<VEC>(p.grad_c + row * p.D + d0, dcn);
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const A i = sigmoid_acc(z[0][v] + bias[0][v]), f = sigmoid_acc(z[1][v] + bias[1][v]);
        const A gg = tanh_acc(z[2][v] + bias[2][v]), o = sigmoid_acc(z[3][v] + bias[3][v]);
        const A tc = tanh_acc(f * c[v] + i * gg);
        const A dc = dcn[v] + dh[v] * o * (A(1) - tc * tc);
        z[0][v] = dc * gg * i * (A(1) - i);       // d i-gate
        z[1][v] = dc * c[v] * f * (A(1) - f);     // d f-gate
        z[2][v] = dc * i * (A(1) - gg * gg);      // d g-gate
        z[3][v] = dh[v] * tc * o * (A(1) - o);    // d o-gate
        c[v] = dc * f;                            // grad of the incoming cell
      }
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        store_vec<VEC>(g + s * p.D, z[s]);
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[s][v] += z[s][v];
      }
      store_vec<VEC>(p.grad_cell_prev + row * p.D + d0, c);
    }
  }

  if (p.dgb == nullptr) return;  // per-image rows: their gradient is dgates itself
  if (p.nchunks == 1) {
    if (active) {
#pragma unroll
      for (int s = 0; s < 4; ++s) store_vec<VEC>(p.dgb + q * D4 + s * p.D + d0, acc[s]);
    }
    return;
  }
  // Deterministic cross-block batch-sum: partials, then the last block of this column tile adds
  // the nchunks partials in chunk order.
  if (active) {
    A* part = p.partial + (int64_t(blockIdx.y) * p.Np + q) * D4 + d0;
#pragma unroll
    for (int s = 0; s < 4; ++s) store_vec<VEC>(part + s * p.D, acc[s]);
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) s_last = atomicAdd(&p.tickets[blockIdx.x], 1) == p.nchunks - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  if (!active) return;
  const int64_t chunk_stride = int64_t(p.Np) * D4;
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    const A* part = p.partial + q * D4 + s * p.D + d0;
    A sum[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) sum[v] = A(0);
    for (int ch = 0; ch < p.nchunks; ++ch)
#pragma unroll
      for (int v = 0; v < VEC; ++v) sum[v] += __ldcg(part + ch * chunk_stride + v);
    store_vec<VEC>(p.dgb + q * D4 + s * p.D + d0, sum);
  }
}

// ------------------------------------------------------------------------------------------------
// Backward 5: tail (grad_tokens)
// ------------------------------------------------------------------------------------------------
template <typename T, typename W, typename A>
struct TailArgs {
  const W* dxhat;  // (B*Np, D)
  T* grad_tokens;  // (B, T, D) contiguous
  int B, Np, N, D, k, T_total;
  int dt_shift, n_dtiles;
};

template <typename T, typename W, typename A, int VEC>
__global__ void __launch_bounds__(kThreads)
tail_kernel(const TailArgs<T, W, A> p) {
  __shared__ __align__(16) unsigned char smem[red_bytes<A, VEC>()];
  const int tid = threadIdx.x;
  const int bid = blockIdx.x;
  // grad_tokens block: image b, VEC-wide column lanes x row lanes (as the prologue's xhat blocks).
  const int b = bid / p.n_dtiles, dtile = bid - b * p.n_dtiles;
  const int DT = 1 << p.dt_shift, NL = kThreads >> p.dt_shift;
  const int dlane = tid & (DT - 1), nlane = tid >> p.dt_shift;
  const int d0 = (dtile * DT + dlane) * VEC;
  const bool active = d0 < p.D;
  T* img = p.grad_tokens + int64_t(b) * p.T_total * p.D + d0;
  A acc[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) acc[v] = A(0);
  if (active) {
    const W* src = p.dxhat + int64_t(b) * p.Np * p.D + d0;
    for (int q = nlane; q < p.Np; q += NL) {
      A t[VEC];
      load_vec<VEC>(src + int64_t(q) * p.D, t);
      store_vec<VEC>(img + int64_t(p.k + q) * p.D, t);
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] += t[v];
    }
  }
  A* red = reinterpret_cast<A*>(smem);
  reduce_row_lanes<A, VEC>(red, acc, p.dt_shift);
  if (!active) return;
  A val[VEC], zero[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    val[v] = red[dlane * VEC + v] / A(p.N);
    zero[v] = A(0);
  }
  for (int r = nlane; r < p.k; r += NL) store_vec<VEC>(img + int64_t(r) * p.D, zero);
  T* patch = img + int64_t(p.k + p.Np) * p.D;
#pragma unroll 4
  for (int n = nlane; n < p.N; n += NL) store_vec<VEC>(patch + int64_t(n) * p.D, val);
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------
template <typename X>
struct Tag {
  using type = X;
};

// Calls f(Tag<T>, Tag<C>, Tag<W>) for the dtype combinations of the contract (ops.py): every
// tensor W; or the cell fp32; or tokens and cell fp32 with W fp16/bf16 (autocast).
template <typename F>
void dispatch_dtypes(at::ScalarType t, at::ScalarType c, at::ScalarType w, F&& f) {
  using at::ScalarType;
  auto with_w = [&](auto wt) -> bool {
    using Wt = typename decltype(wt)::type;
    if (t == w && c == w) {
      f(Tag<Wt>{}, Tag<Wt>{}, wt);
      return true;
    }
    if constexpr (!std::is_same<Wt, float>::value) {
      if (t == w && c == ScalarType::Float) {
        f(Tag<Wt>{}, Tag<float>{}, wt);
        return true;
      }
    }
    if constexpr (is_16bit<Wt>) {
      if (t == ScalarType::Float && c == ScalarType::Float) {
        f(Tag<float>{}, Tag<float>{}, wt);
        return true;
      }
    }
    return false;
  };
  bool ok = false;
  switch (w) {
    case ScalarType::Float: ok = with_w(Tag<float>{}); break;
    case ScalarType::Double: ok = with_w(Tag<double>{}); break;
    case ScalarType::Half: ok = with_w(Tag<c10::Half>{}); break;
    case ScalarType::BFloat16: ok = with_w(Tag<c10::BFloat16>{}); break;
    default: break;
  }
  TORCH_CHECK(ok, "lspt cuda: unsupported dtype combination: tokens ", t, ", cell ", c, ", weights ", w,
              ". Supported: everything in one dtype (float32/float16/bfloat16/float64); the cell in "
              "float32 with tokens in the weights' dtype; or tokens and cell float32 with float16/"
              "bfloat16 weights (torch.autocast)");
}

// The kernels index rows and columns with 32-bit ints inside an image (64-bit bases per image).
void check_int32_limits(const char* fn, int64_t B, int64_t Np, int64_t T, int64_t D) {
  TORCH_CHECK(D >= 1 && 4 * D <= INT_MAX / 4, fn, ": the width D = ", D, " is out of range");
  TORCH_CHECK(B * Np <= INT_MAX / 2 && T <= INT_MAX / 2, fn, ": problem too large (B * Np = ", B * Np, ", T = ", T,
              ")");
}

bool aligned(const void* ptr, size_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// Multiprocessor count of the current device (the guard has made it current).
int sm_count() {
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return std::max(count, 1);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Column lanes DT (a power of two, 8..32) of the row-reduction blocks (xhat and grad_tokens): as
// wide as the row allows, narrower when that leaves too few blocks to fill the GPU.
int pick_dt_shift(int64_t Dv, int64_t B, int sms) {
  int shift = 5;
  while (shift > 3 && (int64_t(1) << (shift - 1)) >= Dv) --shift;
  while (shift > 3 && B * ceil_div(Dv, int64_t(1) << shift) < 2 * sms) --shift;
  return shift;
}

template <typename T, typename W, typename A>
void launch_prologue(PrologueArgs<T, W, A> p, int vec, int64_t B, int sms, cudaStream_t stream) {
  const auto launch = [&](auto vec_tag) {
    constexpr int V = decltype(vec_tag)::value;
    const int64_t Dv = ceil_div(p.D, V);
    p.dt_shift = pick_dt_shift(Dv, B, sms);
    p.n_dtiles = int(ceil_div(Dv, int64_t(1) << p.dt_shift));
    const int64_t blocks = B * p.n_dtiles;
    TORCH_CHECK(blocks <= INT_MAX, "lspt cuda: problem too large");
    prologue_kernel<T, W, A, V><<<unsigned(blocks), kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  constexpr int kVec = 16 / sizeof(T);
  if (vec == kVec) launch(std::integral_constant<int, kVec>{});
  else launch(std::integral_constant<int, 1>{});
}

// xhat (B, Np, D) of tokens (B, T, D): the prologue, vectorised when D, the pointers and strides allow.
template <typename Tt, typename Wt, typename At>
void write_xhat(const at::Tensor& tokens, at::Tensor& xhat, int64_t Np, int64_t k, int sms, cudaStream_t stream) {
  const int64_t B = tokens.size(0), T = tokens.size(1), D = tokens.size(2);
  PrologueArgs<Tt, Wt, At> pa{};
  pa.B = int(B); pa.Np = int(Np); pa.N = int(T - k - Np); pa.D = int(D); pa.k = int(k);
  pa.tokens = tokens.data_ptr<Tt>();
  pa.tok_sb = tokens.stride(0);
  pa.tok_st = tokens.stride(1);
  pa.xhat = xhat.data_ptr<Wt>();
  constexpr int kVecT = 16 / sizeof(Tt);
  const bool vec_t = D % kVecT == 0 && aligned(pa.tokens, 16) && pa.tok_sb % kVecT == 0 &&
                     pa.tok_st % kVecT == 0 && aligned(pa.xhat, kVecT * sizeof(Wt));
  launch_prologue(pa, vec_t ? kVecT : 1, B, sms, stream);
}

template <typename A>
at::ScalarType acc_type() { return std::is_same<A, double>::value ? at::kDouble : at::kFloat; }

}  // namespace

// ------------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cuda_forward(
    const at::Tensor& tokens, const at::Tensor& cell, const at::Tensor& gate_bias,
    const at::Tensor& weight_hh, int64_t k, bool /*save_gates: this backend recomputes the gates*/) {
  constexpr const char* fn = "lspt cuda_forward";
  const StepSizes sz = check_forward(fn, tokens, cell, gate_bias, weight_hh, k);
  const int64_t B = sz.B, T = sz.T, D = sz.D, Np = sz.Np;
  const bool batched = sz.per_image_rows;
  const at::Device device = tokens.device();
  TORCH_CHECK(device.is_cuda(), fn, ": tokens must be a CUDA tensor, got one on ", device);
  check_int32_limits(fn, B, Np, T, D);

  c10::cuda::CUDAGuard guard(device);
  auto xhat = at::empty({B, Np, D}, weight_hh.options());
  auto hidden = at::empty({B, Np, D}, tokens.options());
  auto new_cell = at::empty({B, Np, D}, cell.options());
  auto no_gates = at::empty({0}, tokens.options().dtype(
      tokens.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  if (B == 0) return {hidden, new_cell, xhat, no_gates};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count();

  dispatch_dtypes(tokens.scalar_type(), cell.scalar_type(), weight_hh.scalar_type(),
                  [&](auto t_tag, auto c_tag, auto w_tag) {
    using Tt = typename decltype(t_tag)::type;
    using Ct = typename decltype(c_tag)::type;
    using Wt = typename decltype(w_tag)::type;
    using At = typename std::conditional<std::is_same<Tt, double>::value, double, float>::type;

    // 1. prologue: xhat
    write_xhat<Tt, Wt, At>(tokens, xhat, Np, k, sms, stream);

    // 2. G = xhat @ weight_hh^T (cuBLAS)
    at::Tensor gates = at::mm(xhat.view({B * Np, D}), weight_hh.t());

    // 3. epilogue
    EpilogueArgs<Tt, Ct, Wt, At> ea{};
    ea.gates = gates.data_ptr<Wt>();
    ea.gb = gate_bias.data_ptr<Wt>();
    ea.cell = cell.data_ptr<Ct>();
    ea.hidden = hidden.data_ptr<Tt>();
    ea.new_cell = new_cell.data_ptr<Ct>();
    ea.period = int(batched ? B * Np : Np); ea.D = int(D);
    constexpr int kVecE = sizeof(At) == 8 ? 2 : 4;
    const bool vec_e = D % kVecE == 0 && aligned(ea.gates, kVecE * sizeof(Wt)) &&
                       aligned(ea.gb, kVecE * sizeof(Wt)) && aligned(ea.cell, kVecE * sizeof(Ct)) &&
                       aligned(ea.hidden, kVecE * sizeof(Tt)) && aligned(ea.new_cell, kVecE * sizeof(Ct));
    const auto launch = [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      ea.Dv = int(D / V);
      ea.rows = int(B * Np);
      const int64_t blocks = std::min<int64_t>(ceil_div(B * Np * ea.Dv, kThreads), int64_t(sms) * 16);
      epilogue_kernel<Tt, Ct, Wt, At, V><<<unsigned(blocks), kThreads, 0, stream>>>(ea);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec_e) launch(std::integral_constant<int, kVecE>{});
    else launch(std::integral_constant<int, 1>{});
  });
  return {hidden, new_cell, xhat, no_gates};
}

// ------------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
cuda_backward(const at::Tensor& grad_hidden, const at::Tensor& grad_cell, const at::Tensor& xhat,
              const at::Tensor& cell, const at::Tensor& gate_bias, const at::Tensor& weight_hh,
              const at::Tensor& gates, int64_t k, int64_t num_tokens) {
  constexpr const char* fn = "lspt cuda_backward";
  const StepSizes sz =
      check_backward(fn, grad_hidden, grad_cell, xhat, cell, gate_bias, weight_hh, gates, k, num_tokens);
  const int64_t B = sz.B, T = sz.T, D = sz.D, Np = sz.Np;
  const bool batched = sz.per_image_rows;
  const at::Device device = xhat.device();
  TORCH_CHECK(device.is_cuda(), fn, ": xhat must be a CUDA tensor, got one on ", device);
  TORCH_CHECK(gates.numel() == 0, fn, ": this backend recomputes the gates; got saved gates");
  check_int32_limits(fn, B, Np, T, D);
  const int64_t N = T - k - Np, D4 = 4 * D;

  c10::cuda::CUDAGuard guard(device);
  auto grad_tokens = at::empty({B, T, D}, grad_hidden.options());
  auto grad_cell_prev = at::empty({B, Np, D}, cell.options());
  if (B == 0) return {grad_tokens, grad_cell_prev, at::zeros_like(gate_bias), at::zeros_like(weight_hh)};
  at::Tensor grad_weight_hh, grad_gate_bias;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count();

  dispatch_dtypes(grad_hidden.scalar_type(), cell.scalar_type(), weight_hh.scalar_type(),
                  [&](auto t_tag, auto c_tag, auto w_tag) {
    using Tt = typename decltype(t_tag)::type;
    using Ct = typename decltype(c_tag)::type;
    using Wt = typename decltype(w_tag)::type;
    using At = typename std::conditional<std::is_same<Tt, double>::value, double, float>::type;
    const at::TensorOptions aopt = grad_hidden.options().dtype(acc_type<At>());
    constexpr int kVecE = sizeof(At) == 8 ? 2 : 4;
    constexpr int kVecT = 16 / sizeof(Tt);
    const bool vec_e = D % kVecE == 0 && aligned(grad_hidden.data_ptr(), kVecE * sizeof(Tt)) &&
                       aligned(grad_cell.data_ptr(), kVecE * sizeof(Ct)) &&
                       aligned(cell.data_ptr(), kVecE * sizeof(Ct)) &&
                       aligned(gate_bias.data_ptr(), kVecE * sizeof(Wt));  // the rest is allocated here
    const int64_t Dv_e = vec_e ? D / kVecE : D;

    // Batch chunks of the elementwise kernel: enough blocks to fill the GPU, but no more chunks
    // than ~2 sqrt(B), so that the last block's sum over chunks stays short. Per-image gate-bias
    // rows need no batch sum.
    const int64_t col_blocks = ceil_div(Np * Dv_e, kThreads);
    const int64_t cap = std::min<int64_t>(B, 2 * int64_t(std::ceil(std::sqrt(double(B)))));
    int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(4 * sms, col_blocks), cap));
    nchunks = std::min<int64_t>(nchunks, 65535);
    const int64_t chunk_b = ceil_div(B, nchunks);
    nchunks = ceil_div(B, chunk_b);
    const bool split_sum = nchunks > 1 && !batched;

    // Tickets of the in-kernel batch-sum start at zero (one memset, only when the sum is split).
    at::Tensor tickets = split_sum ? at::zeros({col_blocks}, grad_hidden.options().dtype(at::kInt))
                                   : at::empty({1}, grad_hidden.options().dtype(at::kInt));
    at::Tensor partial = at::empty({split_sum ? nchunks * Np * D4 : 1}, aopt);

    // 1. recompute G = xhat @ weight_hh^T (cuBLAS)
    const at::Tensor xhat2d = xhat.view({B * Np, D});
    at::Tensor gates = at::mm(xhat2d, weight_hh.t());
    if (!batched) grad_gate_bias = at::empty({Np, D4}, weight_hh.options());

    // 2. dgates (over G), grad of the incoming cell, d gate_bias
    BwdElemArgs<Tt, Ct, Wt, At> ba{};
    ba.gates = gates.data_ptr<Wt>();
    ba.gb = gate_bias.data_ptr<Wt>();
    ba.cell = cell.data_ptr<Ct>();
    ba.grad_h = grad_hidden.data_ptr<Tt>();
    ba.grad_c = grad_cell.data_ptr<Ct>();
    ba.grad_cell_prev = grad_cell_prev.data_ptr<Ct>();
    ba.dgb = batched ? nullptr : grad_gate_bias.data_ptr<Wt>();
    ba.partial = partial.data_ptr<At>();
    ba.tickets = tickets.data_ptr<int>();
    ba.B = int(B); ba.Np = int(Np); ba.D = int(D); ba.Dv = int(Dv_e);
    ba.chunk_b = int(chunk_b); ba.nchunks = int(nchunks);
    ba.batched = batched;
    const dim3 egrid{unsigned(col_blocks), unsigned(nchunks)};
    if (vec_e) bwd_elementwise_kernel<Tt, Ct, Wt, At, kVecE><<<egrid, kThreads, 0, stream>>>(ba);
    else bwd_elementwise_kernel<Tt, Ct, Wt, At, 1><<<egrid, kThreads, 0, stream>>>(ba);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (batched) grad_gate_bias = gates.view({B, Np, D4});

    // 3., 4. dxhat = dgates @ weight_hh, grad_weight_hh = dgates^T @ xhat (cuBLAS)
    at::Tensor dxhat = at::mm(gates, weight_hh);
    grad_weight_hh = at::mm(gates.t(), xhat2d);

    // 5. tail: grad_tokens
    TailArgs<Tt, Wt, At> ta{};
    ta.dxhat = dxhat.data_ptr<Wt>();
    ta.grad_tokens = grad_tokens.data_ptr<Tt>();
    ta.B = int(B); ta.Np = int(Np); ta.N = int(N); ta.D = int(D); ta.k = int(k); ta.T_total = int(T);
    const bool vec_t = D % kVecT == 0 && aligned(ta.dxhat, kVecT * sizeof(Wt)) &&
                       aligned(ta.grad_tokens, 16);
    const auto launch = [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      const int64_t Dv = ceil_div(D, V);
      ta.dt_shift = pick_dt_shift(Dv, B, sms);
      ta.n_dtiles = int(ceil_div(Dv, int64_t(1) << ta.dt_shift));
      const int64_t blocks = B * ta.n_dtiles;
      TORCH_CHECK(blocks <= INT_MAX, "lspt cuda: problem too large");
      tail_kernel<Tt, Wt, At, V><<<unsigned(blocks), kThreads, 0, stream>>>(ta);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec_t) launch(std::integral_constant<int, kVecT>{});
    else launch(std::integral_constant<int, 1>{});
  });
  return {grad_tokens, grad_cell_prev, grad_gate_bias, grad_weight_hh};
}

// ------------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> cuda_grouped_forward(const at::Tensor& tokens, const at::Tensor& cell,
                                                        const at::Tensor& gate_bias, const at::Tensor& weight_hh,
                                                        const at::Tensor& offsets, int64_t k) {
  constexpr const char* fn = "lspt cuda_grouped_forward";
  const GroupedSizes sz = check_grouped_forward(fn, tokens, cell, gate_bias, weight_hh, offsets, k);
  const int64_t B = sz.B, T = sz.T, D = sz.D, Np = sz.Np, G = sz.G;
  const at::Device device = tokens.device();
  TORCH_CHECK(device.is_cuda(), fn, ": tokens must be a CUDA tensor, got one on ", device);
  check_int32_limits(fn, B, Np, T, D);

  c10::cuda::CUDAGuard guard(device);
  auto xhat = at::empty({B, Np, D}, weight_hh.options());
  auto hidden = at::empty({B, Np, D}, tokens.options());
  auto new_cell = at::empty({B, Np, D}, cell.options());
  if (B == 0) return {hidden, new_cell};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count();
  // Every group may hold every row: m_tiles M-tiles per group, most of them exit at once.
  const int64_t m_tiles = ceil_div(B * Np, kGM), n_tiles = ceil_div(D, kGN);
  TORCH_CHECK(G * m_tiles <= INT_MAX && n_tiles <= 65535, fn, ": problem too large (G = ", G, ", B * Np = ",
              B * Np, ", D = ", D, ")");

  dispatch_dtypes(tokens.scalar_type(), cell.scalar_type(), weight_hh.scalar_type(),
                  [&](auto t_tag, auto c_tag, auto w_tag) {
    using Tt = typename decltype(t_tag)::type;
    using Ct = typename decltype(c_tag)::type;
    using Wt = typename decltype(w_tag)::type;
    using At = typename std::conditional<std::is_same<Tt, double>::value, double, float>::type;
    write_xhat<Tt, Wt, At>(tokens, xhat, Np, k, sms, stream);   // task-independent: the whole batch
    GroupedArgs<Tt, Ct, Wt, At> ga{};
    ga.xhat = xhat.data_ptr<Wt>();
    ga.weight = weight_hh.data_ptr<Wt>();
    ga.gb = gate_bias.data_ptr<Wt>();
    ga.cell = cell.data_ptr<Ct>();
    ga.offsets = offsets.data_ptr<int64_t>();
    ga.hidden = hidden.data_ptr<Tt>();
    ga.new_cell = new_cell.data_ptr<Ct>();
    ga.B = int(B); ga.Np = int(Np); ga.D = int(D); ga.m_tiles = int(m_tiles);
    const dim3 grid{unsigned(G * m_tiles), unsigned(n_tiles)};
    grouped_gates_kernel<Tt, Ct, Wt, At><<<grid, kThreads, 0, stream>>>(ga);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {hidden, new_cell};
}

}  // namespace lspt
