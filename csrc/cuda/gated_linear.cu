// CUDA bitmask-gated linear: y = x @ (W * G)^T + b, G = m + gamma * (1 - m), m a bit-packed keep-mask.
//
//   x [M, K], W [N, K] (fp32 / fp16 / bf16, same dtype), packed int32 [N, ceil(K/32)] with bit b of word w
//   in row n = m[n, 32*w + b] (LSB first), bias [N] or None. Accumulation in fp32, output in x's dtype.
//
// Three kernels, picked by the host (override with PERSONA_KERNELS_CUDA_GATED=gemv|simt|wmma|auto):
//   gemv  decode shapes (M <= 16): one warp per output feature n streams W[n, :] once with 16-byte loads,
//         gates it with the mask word, and applies it to all M input rows; warp-shuffle reduction.
//   wmma  fp16/bf16, M > 16, sm_80+: 64x64x32 block tiles in shared memory, the W tile gated while it is
//         staged, tensor-core WMMA 16x16x16 with fp32 accumulators.
//   simt  everything else (fp32, or older GPUs): 64x64x16 shared-memory tiles, 4x4 fp32 outputs per thread.
// The weights are never modified; the gate costs one select (and for pruned weights a multiply) per element.
// The tiled kernels live in gemm_tiles.cuh (shared with the fused linear_with_stats of welford.cu).
//
// Mixed personas (gated_linear_multi_cuda): bank int32 [P, N, ceil(K/32)], index [M] in [-1, P) (-1: base model).
//   gemv  M <= 16: W[n, :] read once, each row gated with its own persona's mask words;
//   tiles M > 16: rows sorted by persona on the device into tiles of <= 64 rows of one persona (no host sync),
//         the tiled kernels gather x rows / scatter y rows through the order and gate W with the tile's persona.
#include <mma.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/TensorOperators.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/minimum.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/tensor.h>
#include <torch/library.h>

#include "gemm_tiles.cuh"

namespace persona_kernels {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------------------------
// gemv: small M. Block = kGemvWarps warps, warp w of block b owns output feature n = b * kGemvWarps + w.
// ---------------------------------------------------------------------------------------------------------------
constexpr int kGemvWarps = 8;
constexpr int kGemvMaxM = 16;

// Warp-sum each row's partial dot product and write out[m, n] = sum + bias[n] (lane m writes row m).
template <typename T, int MAXM>
__device__ __forceinline__ void warp_sum_store(float (&acc)[MAXM], int lane, int m_rows, const T* __restrict__ bias,
                                               T* __restrict__ out, int64_t n_out, int64_t n) {
  static_assert(MAXM <= 32, "one lane per row");
#pragma unroll
  for (int m = 0; m < MAXM; ++m) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], off);
  }
  // After the xor-butterfly every lane holds every total.
  const float b = bias != nullptr ? Elem<T>::to_float(bias[n]) : 0.f;
#pragma unroll
  for (int m = 0; m < MAXM; ++m) {
    if (m < m_rows && lane == m) out[m * n_out + n] = Elem<T>::from_float(acc[m] + b);
  }
}

// The vector path of the gemv kernels: body(k, wv) for each V-element vector of the W row `wrow` that this lane
// owns (vectors lane, lane + 32, ...), wv = W[n, k : k + V] in fp32. K % V == 0 and 16-byte aligned rows (checked
// on the host); V in {4, 8} divides 32, so the V mask bits of one vector never straddle two mask words. Two vectors
// in flight while the accumulators leave room (MAXM <= 4); one otherwise (no spills at 16).
template <typename T, int MAXM, class Body>
__device__ __forceinline__ void for_each_w_vec(const T* wrow, int64_t k_in, int lane, Body&& body) {
  constexpr int V = Elem<T>::kVec;
  const int64_t n_vec = k_in / V;
#pragma unroll(MAXM <= 4 ? 2 : 1)
  for (int64_t v = lane; v < n_vec; v += 32) {
    const int64_t k = v * V;
    float wv[V];
    load_vec(wrow + k, wv);
    body(k, wv);
  }
}

template <typename T, int MAXM, bool VEC>
__global__ void __launch_bounds__(kGemvWarps * 32)
    gated_gemv_kernel(const T* __restrict__ x, const T* __restrict__ w, const uint32_t* __restrict__ mask,
                      const T* __restrict__ bias, T* __restrict__ out, int m_rows, int64_t n_out, int64_t k_in,
                      int64_t k_words, float gamma) {
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kGemvWarps + (threadIdx.x >> 5);
  if (n >= n_out) return;  // whole warp leaves together: no shuffle below sees a missing lane
  const T* wrow = w + n * k_in;
  const uint32_t* mrow = mask + n * k_words;

  float acc[MAXM];
#pragma unroll
  for (int m = 0; m < MAXM; ++m) acc[m] = 0.f;

  if constexpr (VEC) {
    for_each_w_vec<T, MAXM>(wrow, k_in, lane, [&](int64_t k, float(&wv)[Elem<T>::kVec]) {
      constexpr int V = Elem<T>::kVec;
      const uint32_t bits = __ldg(mrow + (k >> 5)) >> (k & 31);
#pragma unroll
      for (int i = 0; i < V; ++i) wv[i] = gate(wv[i], (bits >> i) & 1u, gamma);
#pragma unroll
      for (int m = 0; m < MAXM; ++m) {
        if (m < m_rows) {
          float xv[V];
          load_vec(x + m * k_in + k, xv);
#pragma unroll
          for (int i = 0; i < V; ++i) acc[m] = fmaf(xv[i], wv[i], acc[m]);
        }
      }
    });
  } else {
    // Ragged K or unaligned pointers: one element per lane per step (still coalesced across the warp).
    for (int64_t k = lane; k < k_in; k += 32) {
      const uint32_t bit = (__ldg(mrow + (k >> 5)) >> (k & 31)) & 1u;
      const float wk = gate(Elem<T>::to_float(wrow[k]), bit, gamma);
#pragma unroll
      for (int m = 0; m < MAXM; ++m) {
        if (m < m_rows) acc[m] = fmaf(Elem<T>::to_float(x[m * k_in + k]), wk, acc[m]);
      }
    }
  }

  warp_sum_store<T, MAXM>(acc, lane, m_rows, bias, out, n_out, n);
}

// gemv for mixed personas: like gated_gemv_kernel, but row m gates W with its own persona's mask words
// (persona[m] = -1: base model, W ungated). W[n, :] is still read once for all rows; the mask words of rows
// that share a persona are the same addresses (L1 hits). Personas are clamped to [-1, P) by the host.
template <typename T, int MAXM, bool VEC>
__global__ void __launch_bounds__(kGemvWarps * 32)
    gated_gemv_multi_kernel(const T* __restrict__ x, const T* __restrict__ w, const uint32_t* __restrict__ bank,
                            int64_t bank_stride, const int32_t* __restrict__ persona, const float* __restrict__ gammas,
                            const T* __restrict__ bias, T* __restrict__ out, int m_rows, int64_t n_out, int64_t k_in,
                            int64_t k_words) {
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kGemvWarps + (threadIdx.x >> 5);
  if (n >= n_out) return;  // whole warp leaves together
  const T* wrow = w + n * k_in;
  const uint32_t* mrow[MAXM];  // null: ungated row
  float gam[MAXM];
  float acc[MAXM];
#pragma unroll
  for (int m = 0; m < MAXM; ++m) {
    const int p = m < m_rows ? persona[m] : -1;
    mrow[m] = p >= 0 ? bank + p * bank_stride + n * k_words : nullptr;
    gam[m] = p >= 0 ? gammas[p] : 1.f;
    acc[m] = 0.f;
  }

  if constexpr (VEC) {
    for_each_w_vec<T, MAXM>(wrow, k_in, lane, [&](int64_t k, float(&wv)[Elem<T>::kVec]) {
      constexpr int V = Elem<T>::kVec;
#pragma unroll
      for (int m = 0; m < MAXM; ++m) {
        if (m < m_rows) {
          const uint32_t bits = mrow[m] != nullptr ? __ldg(mrow[m] + (k >> 5)) >> (k & 31) : 0xffffffffu;
          float xv[V];
          load_vec(x + m * k_in + k, xv);
#pragma unroll
          for (int i = 0; i < V; ++i) acc[m] = fmaf(xv[i], gate(wv[i], (bits >> i) & 1u, gam[m]), acc[m]);
        }
      }
    });
  } else {
    for (int64_t k = lane; k < k_in; k += 32) {
      const float wk = Elem<T>::to_float(wrow[k]);
#pragma unroll
      for (int m = 0; m < MAXM; ++m) {
        if (m < m_rows) {
          const uint32_t bit = mrow[m] != nullptr ? (__ldg(mrow[m] + (k >> 5)) >> (k & 31)) & 1u : 1u;
          acc[m] = fmaf(Elem<T>::to_float(x[m * k_in + k]), gate(wk, bit, gam[m]), acc[m]);
        }
      }
    }
  }
  warp_sum_store<T, MAXM>(acc, lane, m_rows, bias, out, n_out, n);
}

// ---------------------------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------------------------

template <typename T, int MAXM>
void launch_gemv_chunk(const T* x, const T* w, const uint32_t* mask, const T* bias, T* out, int m_rows,
                       int64_t n_out, int64_t k_in, int64_t k_words, float gamma, bool vec, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(n_out, kGemvWarps)));
  const dim3 block(kGemvWarps * 32);
  if (vec) {
    gated_gemv_kernel<T, MAXM, true>
        <<<grid, block, 0, stream>>>(x, w, mask, bias, out, m_rows, n_out, k_in, k_words, gamma);
  } else {
    gated_gemv_kernel<T, MAXM, false>
        <<<grid, block, 0, stream>>>(x, w, mask, bias, out, m_rows, n_out, k_in, k_words, gamma);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_gemv(const T* x, const T* w, const uint32_t* mask, const T* bias, T* out, int64_t m_rows, int64_t n_out,
                 int64_t k_in, int64_t k_words, float gamma, bool vec, cudaStream_t stream) {
  // Rows beyond kGemvMaxM (only when forced through PERSONA_KERNELS_CUDA_GATED=gemv) go in chunks.
  for (int64_t r0 = 0; r0 < m_rows; r0 += kGemvMaxM) {
    const int mr = static_cast<int>(std::min<int64_t>(kGemvMaxM, m_rows - r0));
    const T* xc = x + r0 * k_in;
    T* oc = out + r0 * n_out;
    if (mr <= 1) {
      launch_gemv_chunk<T, 1>(xc, w, mask, bias, oc, mr, n_out, k_in, k_words, gamma, vec, stream);
    } else if (mr <= 2) {
      launch_gemv_chunk<T, 2>(xc, w, mask, bias, oc, mr, n_out, k_in, k_words, gamma, vec, stream);
    } else if (mr <= 4) {
      launch_gemv_chunk<T, 4>(xc, w, mask, bias, oc, mr, n_out, k_in, k_words, gamma, vec, stream);
    } else if (mr <= 8) {
      launch_gemv_chunk<T, 8>(xc, w, mask, bias, oc, mr, n_out, k_in, k_words, gamma, vec, stream);
    } else {
      launch_gemv_chunk<T, 16>(xc, w, mask, bias, oc, mr, n_out, k_in, k_words, gamma, vec, stream);
    }
  }
}

template <typename T, int MAXM>
void launch_gemv_multi_chunk(const T* x, const T* w, const uint32_t* bank, int64_t bank_stride, const int32_t* persona,
                             const float* gammas, const T* bias, T* out, int m_rows, int64_t n_out, int64_t k_in,
                             int64_t k_words, bool vec, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(n_out, kGemvWarps)));
  const dim3 block(kGemvWarps * 32);
  if (vec) {
    gated_gemv_multi_kernel<T, MAXM, true><<<grid, block, 0, stream>>>(x, w, bank, bank_stride, persona, gammas, bias,
                                                                        out, m_rows, n_out, k_in, k_words);
  } else {
    gated_gemv_multi_kernel<T, MAXM, false><<<grid, block, 0, stream>>>(x, w, bank, bank_stride, persona, gammas, bias,
                                                                         out, m_rows, n_out, k_in, k_words);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_gemv_multi(const T* x, const T* w, const uint32_t* bank, int64_t bank_stride, const int32_t* persona,
                       const float* gammas, const T* bias, T* out, int64_t m_rows, int64_t n_out, int64_t k_in,
                       int64_t k_words, bool vec, cudaStream_t stream) {
  for (int64_t r0 = 0; r0 < m_rows; r0 += kGemvMaxM) {
    const int mr = static_cast<int>(std::min<int64_t>(kGemvMaxM, m_rows - r0));
    const T* xc = x + r0 * k_in;
    const int32_t* pc = persona + r0;
    T* oc = out + r0 * n_out;
    if (mr <= 1) {
      launch_gemv_multi_chunk<T, 1>(xc, w, bank, bank_stride, pc, gammas, bias, oc, mr, n_out, k_in, k_words, vec, stream);
    } else if (mr <= 4) {
      launch_gemv_multi_chunk<T, 4>(xc, w, bank, bank_stride, pc, gammas, bias, oc, mr, n_out, k_in, k_words, vec, stream);
    } else if (mr <= 8) {
      launch_gemv_multi_chunk<T, 8>(xc, w, bank, bank_stride, pc, gammas, bias, oc, mr, n_out, k_in, k_words, vec, stream);
    } else {
      launch_gemv_multi_chunk<T, 16>(xc, w, bank, bank_stride, pc, gammas, bias, oc, mr, n_out, k_in, k_words, vec,
                                     stream);
    }
  }
}

// Rows sorted by persona (stable) and cut into tiles of at most `bm` rows of one persona each, on the device
// (no host synchronisation): the same table as the Triton backend's tile_table. `idx` int64 [M], values in
// [-1, P). Returns (order int32[M], persona int32[T], start int32[T], end int32[T]) with the fixed upper bound
// T = ceil(M / bm) + P + 1 tiles; surplus tiles have start == end.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> persona_tile_table(const at::Tensor& idx, int64_t P,
                                                                             int64_t bm) {
  const int64_t M = idx.size(0);
  const auto lopt = idx.options();
  const at::Tensor order = std::get<1>(idx.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false));
  const at::Tensor counts = at::zeros({P + 1}, lopt).scatter_add_(0, idx + 1, at::ones_like(idx));
  const at::Tensor seg_end = counts.cumsum(0);
  const at::Tensor seg_start = seg_end - counts;
  const at::Tensor tiles = (counts + (bm - 1)).div(bm, "floor");
  const at::Tensor tiles_end = tiles.cumsum(0);
  const int64_t total = ceil_div(M, bm) + P + 1;
  const at::Tensor t = at::arange(total, lopt);
  const at::Tensor seg = at::searchsorted(tiles_end, t, /*out_int32=*/false, /*right=*/true).clamp_max(P);
  const at::Tensor local = t - (tiles_end.index_select(0, seg) - tiles.index_select(0, seg));
  at::Tensor start = seg_start.index_select(0, seg) + local * bm;
  at::Tensor end = at::minimum(start + bm, seg_end.index_select(0, seg));
  const at::Tensor invalid = t >= tiles_end.narrow(0, P, 1);
  start = start.masked_fill(invalid, 0);
  end = end.masked_fill(invalid, 0);
  return {order.to(at::kInt), (seg - 1).to(at::kInt), start.to(at::kInt), end.to(at::kInt)};
}

template <typename T>
void run_gated_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& packed,
                      const std::optional<at::Tensor>& bias, float gamma, at::Tensor& out, int device) {
  using CT = typename CudaType<T>::type;
  const int64_t m_rows = x.size(0), n_out = weight.size(0), k_in = weight.size(1), k_words = packed.size(1);
  const CT* xp = cptr<T>(x);
  const CT* wp = cptr<T>(weight);
  const uint32_t* mp = reinterpret_cast<const uint32_t*>(packed.const_data_ptr<int32_t>());
  const CT* bp = bias.has_value() && bias->defined() ? cptr<T>(*bias) : nullptr;
  CT* op = mptr<T>(out);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();

  constexpr int V = Elem<CT>::kVec;
  const bool vec = (k_in % V == 0) && aligned16(xp) && aligned16(wp);

  Path path = requested_path();
  if (path == Path::Auto) path = m_rows <= kGemvMaxM ? Path::Gemv : Path::Wmma;
  const bool can_wmma = !std::is_same<CT, float>::value && device_cc_major(device) >= 8;
  if (path == Path::Wmma && !can_wmma) path = Path::Simt;

  if (path == Path::Gemv) {
    launch_gemv<CT>(xp, wp, mp, bp, op, m_rows, n_out, k_in, k_words, gamma, vec, stream);
    return;
  }
  const StridedTiles tiles{m_rows, mp, gamma};
  launch_gemm_tiles<CT>(xp, wp, bp, op, n_out, k_in, k_words, ceil_div(m_rows, kMmaBM), tiles, NoStats{},
                        path == Path::Wmma, vec, stream);
}

// Checks shared by the gated ops: x [M, K] and weight [N, K] on CUDA, same float dtype.
void check_x_weight(const at::Tensor& x, const at::Tensor& weight) {
  PK_CUDA_CHECK_ARG(x.is_cuda(), "x", "expected a CUDA tensor, got device ", x.device());
  PK_CUDA_CHECK_ARG(x.dim() == 2, "x", "expected a 2-D tensor [M, K], got ", x.dim(), " dims");
  PK_CUDA_CHECK_ARG(weight.dim() == 2, "weight", "expected a 2-D tensor [N, K], got ", weight.dim(), " dims");
  const int64_t k_in = weight.size(1);
  PK_CUDA_CHECK_ARG(x.size(1) == k_in, "x", "last dimension ", x.size(1), " does not match weight's K=", k_in);
  const auto dtype = x.scalar_type();
  PK_CUDA_CHECK_ARG(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, "x",
                    "expected dtype float32, float16 or bfloat16, got ", dtype);
  PK_CUDA_CHECK_ARG(weight.scalar_type() == dtype, "weight", "dtype ", weight.scalar_type(),
                    " does not match x's dtype ", dtype);
  PK_CUDA_CHECK_ARG(weight.device() == x.device(), "weight", "expected device ", x.device(), ", got ",
                    weight.device());
}

at::Tensor gated_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& packed,
                             const std::optional<at::Tensor>& bias, double gamma) {
  check_x_weight(x, weight);
  const int64_t m_rows = x.size(0), n_out = weight.size(0), k_in = weight.size(1);
  const auto dtype = x.scalar_type();
  PK_CUDA_CHECK_ARG(packed.scalar_type() == at::kInt, "packed", "expected dtype int32, got ", packed.scalar_type());
  PK_CUDA_CHECK_ARG(packed.dim() == 2 && packed.size(0) == n_out && packed.size(1) == ceil_div(k_in, 32), "packed",
                    "expected shape [", n_out, ", ", ceil_div(k_in, 32), "], got ", packed.sizes());
  PK_CUDA_CHECK_ARG(packed.device() == x.device(), "packed", "expected device ", x.device(), ", got ",
                    packed.device());
  if (bias.has_value() && bias->defined()) {
    PK_CUDA_CHECK_ARG(bias->dim() == 1 && bias->size(0) == n_out, "bias", "expected shape [", n_out, "], got ",
                      bias->sizes());
    PK_CUDA_CHECK_ARG(bias->scalar_type() == dtype, "bias", "dtype ", bias->scalar_type(),
                      " does not match x's dtype ", dtype);
    PK_CUDA_CHECK_ARG(bias->device() == x.device(), "bias", "expected device ", x.device(), ", got ",
                      bias->device());
    PK_CUDA_CHECK_ARG(bias->is_contiguous(), "bias", "expected a contiguous tensor");
  }
  PK_CUDA_CHECK_ARG(x.is_contiguous(), "x", "expected a contiguous tensor");
  PK_CUDA_CHECK_ARG(weight.is_contiguous(), "weight", "expected a contiguous tensor");
  PK_CUDA_CHECK_ARG(packed.is_contiguous(), "packed", "expected a contiguous tensor");
  PK_CUDA_CHECK_ARG(gamma >= 0.0 && gamma <= 1.0, "gamma", "expected a float in [0, 1], got ", gamma);
  PK_CUDA_CHECK_ARG(ceil_div(n_out, 64) <= 65535, "weight", "too many output features (", n_out, ")");

  c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({m_rows, n_out}, x.options());
  if (m_rows == 0 || n_out == 0) return out;
  const int device = x.device().index();
  const float g = static_cast<float>(gamma);
  switch (dtype) {
    case at::kFloat: run_gated_linear<float>(x, weight, packed, bias, g, out, device); break;
    case at::kHalf: run_gated_linear<at::Half>(x, weight, packed, bias, g, out, device); break;
    default: run_gated_linear<at::BFloat16>(x, weight, packed, bias, g, out, device); break;
  }
  return out;
}


template <typename T>
void run_gated_linear_multi(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bank,
                            const at::Tensor& idx, const std::optional<at::Tensor>& bias, const at::Tensor& gammas,
                            at::Tensor& out, int device) {
  using CT = typename CudaType<T>::type;
  const int64_t m_rows = x.size(0), n_out = weight.size(0), k_in = weight.size(1), k_words = bank.size(2);
  const int64_t P = bank.size(0);
  const CT* xp = cptr<T>(x);
  const CT* wp = cptr<T>(weight);
  // P == 0 (every row the base model): no mask is ever read; any valid pointer will do.
  const uint32_t* bp_mask = reinterpret_cast<const uint32_t*>(bank.const_data_ptr<int32_t>());
  const CT* bp = bias.has_value() && bias->defined() ? cptr<T>(*bias) : nullptr;
  CT* op = mptr<T>(out);
  const float* gp = gammas.const_data_ptr<float>();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  constexpr int V = Elem<CT>::kVec;
  const bool vec = (k_in % V == 0) && aligned16(xp) && aligned16(wp);
  const int64_t stride = n_out * k_words;

  Path path = requested_path();
  if (path == Path::Auto) path = m_rows <= kGemvMaxM ? Path::Gemv : Path::Wmma;
  const bool can_wmma = !std::is_same<CT, float>::value && device_cc_major(device) >= 8;
  if (path == Path::Wmma && !can_wmma) path = Path::Simt;
  if (path == Path::Gemv) {
    const at::Tensor persona = idx.to(at::kInt);
    launch_gemv_multi<CT>(xp, wp, bp_mask, stride, persona.const_data_ptr<int32_t>(), gp, bp, op, m_rows, n_out,
                          k_in, k_words, vec, stream);
    return;
  }
  static_assert(kMmaBM == kSimtBM, "one tile table for both tiled kernels");
  const auto table = persona_tile_table(idx, P, kMmaBM);
  const at::Tensor& order = std::get<0>(table);
  const at::Tensor& tp = std::get<1>(table);
  const PersonaTiles tiles{order.const_data_ptr<int32_t>(), tp.const_data_ptr<int32_t>(),
                           std::get<2>(table).const_data_ptr<int32_t>(), std::get<3>(table).const_data_ptr<int32_t>(),
                           bp_mask, stride, gp};
  launch_gemm_tiles<CT>(xp, wp, bp, op, n_out, k_in, k_words, tp.size(0), tiles, NoStats{}, path == Path::Wmma, vec,
                        stream);
}

// Mixed-persona gated linear: y[i] = x[i] @ (W * G_{index[i]})^T + b; index -1 = base model (plain linear).
at::Tensor gated_linear_multi_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bank,
                                   const at::Tensor& index, const std::optional<at::Tensor>& bias,
                                   c10::ArrayRef<double> gamma) {
  check_x_weight(x, weight);
  const int64_t m_rows = x.size(0), n_out = weight.size(0), k_in = weight.size(1);
  const auto dtype = x.scalar_type();
  const int64_t k_words = ceil_div(k_in, 32);
  PK_CUDA_CHECK_ARG(bank.scalar_type() == at::kInt && bank.dim() == 3 && bank.size(1) == n_out &&
                        bank.size(2) == k_words,
                    "bank", "expected int32 [P, ", n_out, ", ", k_words, "], got ", bank.scalar_type(), " ",
                    bank.sizes());
  const int64_t P = bank.size(0);
  PK_CUDA_CHECK_ARG(index.dim() == 1 && index.size(0) == m_rows, "index", "expected shape [", m_rows, "], got ",
                    index.sizes());
  PK_CUDA_CHECK_ARG(index.scalar_type() == at::kInt || index.scalar_type() == at::kLong, "index",
                    "expected an int32 or int64 tensor, got ", index.scalar_type());
  PK_CUDA_CHECK_ARG(static_cast<int64_t>(gamma.size()) == P, "gamma", "expected ", P,
                    " values (one per persona), got ", gamma.size());
  for (const double g : gamma) {
    PK_CUDA_CHECK_ARG(g >= 0.0 && g <= 1.0, "gamma", "expected values in [0, 1], got ", g);
  }
  PK_CUDA_CHECK_ARG(bank.device() == x.device() && index.device() == x.device(), "bank/index", "expected device ",
                    x.device(), ", got ", bank.device(), " / ", index.device());
  if (bias.has_value() && bias->defined()) {
    PK_CUDA_CHECK_ARG(bias->dim() == 1 && bias->size(0) == n_out && bias->scalar_type() == dtype &&
                          bias->device() == x.device() && bias->is_contiguous(),
                      "bias", "expected a contiguous ", dtype, " tensor of shape [", n_out, "] on ", x.device(),
                      ", got ", bias->scalar_type(), " ", bias->sizes(), " on ", bias->device());
  }
  PK_CUDA_CHECK_ARG(x.is_contiguous() && weight.is_contiguous() && bank.is_contiguous(), "x/weight/bank",
                    "expected contiguous tensors");
  PK_CUDA_CHECK_ARG(m_rows < INT32_MAX, "x", "too many rows (", m_rows, ")");

  c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({m_rows, n_out}, x.options());
  if (m_rows == 0 || n_out == 0) return out;
  // Values outside [-1, P) are an error the op layer reports (validate_index); clamped here so that the kernels
  // never read outside the bank.
  const at::Tensor idx = index.to(at::kLong).clamp(-1, P - 1);
  std::vector<float> gvals(gamma.begin(), gamma.end());
  if (gvals.empty()) gvals.push_back(1.f);
  const at::Tensor gammas =
      at::tensor(gvals, at::TensorOptions().dtype(at::kFloat)).to(x.device(), /*non_blocking=*/false);
  const int device = x.device().index();
  switch (dtype) {
    case at::kFloat: run_gated_linear_multi<float>(x, weight, bank, idx, bias, gammas, out, device); break;
    case at::kHalf: run_gated_linear_multi<at::Half>(x, weight, bank, idx, bias, gammas, out, device); break;
    default: run_gated_linear_multi<at::BFloat16>(x, weight, bank, idx, bias, gammas, out, device); break;
  }
  return out;
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(persona_kernels_C, m) {
  m.def("gated_linear_cuda(Tensor x, Tensor weight, Tensor packed, Tensor? bias, float gamma) -> Tensor");
  m.def(
      "gated_linear_multi_cuda(Tensor x, Tensor weight, Tensor bank, Tensor index, Tensor? bias, float[] gamma) -> "
      "Tensor");
}

TORCH_LIBRARY_IMPL(persona_kernels_C, CUDA, m) {
  m.impl("gated_linear_cuda", &gated_linear_cuda);
  m.impl("gated_linear_multi_cuda", &gated_linear_multi_cuda);
}

}  // namespace cuda
}  // namespace persona_kernels
