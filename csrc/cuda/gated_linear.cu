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
#include <mma.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <type_traits>

#include <torch/library.h>

#include "pk_cuda.cuh"

namespace persona_kernels {
namespace cuda {
namespace {

// Gate a weight value: kept -> w, pruned -> w * gamma (exactly what fp32 `w * (m + gamma*(1-m))` gives).
__device__ __forceinline__ float gate(float w, uint32_t bit, float gamma) { return bit ? w : w * gamma; }

// ---------------------------------------------------------------------------------------------------------------
// gemv: small M. Block = kGemvWarps warps, warp w of block b owns output feature n = b * kGemvWarps + w.
// ---------------------------------------------------------------------------------------------------------------
constexpr int kGemvWarps = 8;
constexpr int kGemvMaxM = 16;

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
    // K % V == 0 and 16-byte aligned rows (checked on the host). V in {4, 8} divides 32, so the V bits of
    // one vector never straddle two mask words.
    constexpr int V = Elem<T>::kVec;
    const int64_t n_vec = k_in / V;
#pragma unroll 2
    for (int64_t v = lane; v < n_vec; v += 32) {
      const int64_t k = v * V;
      float wv[V];
      load_vec(wrow + k, wv);
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
    }
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

#pragma unroll
  for (int m = 0; m < MAXM; ++m) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], off);
  }
  // After the xor-butterfly every lane holds every total; lane m writes row m (MAXM <= 32).
  const float b = bias != nullptr ? Elem<T>::to_float(bias[n]) : 0.f;
#pragma unroll
  for (int m = 0; m < MAXM; ++m) {
    if (m < m_rows && lane == m) out[m * n_out + n] = Elem<T>::from_float(acc[m] + b);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// simt tiled GEMM: block tile 64 (M) x 64 (N), K step 16, 256 threads, each 4x4 outputs (rows ty + 16 i,
// columns tx + 16 j). Tiles are staged in shared memory as fp32, the W tile already gated.
// ---------------------------------------------------------------------------------------------------------------
constexpr int kSimtBM = 64, kSimtBN = 64, kSimtBK = 16, kSimtThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kSimtThreads)
    gated_gemm_simt_kernel(const T* __restrict__ x, const T* __restrict__ w, const uint32_t* __restrict__ mask,
                           const T* __restrict__ bias, T* __restrict__ out, int64_t m_rows, int64_t n_out,
                           int64_t k_in, int64_t k_words, float gamma) {
  __shared__ float xs[kSimtBK][kSimtBM + 4];
  __shared__ float ws[kSimtBK][kSimtBN + 4];
  const int tid = threadIdx.x;
  const int tx = tid & 15, ty = tid >> 4;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kSimtBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kSimtBN;

  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  for (int64_t k0 = 0; k0 < k_in; k0 += kSimtBK) {
    // 64 x 16 = 1024 elements per tile, 4 per thread; consecutive threads read consecutive k.
#pragma unroll
    for (int r = 0; r < (kSimtBM * kSimtBK) / kSimtThreads; ++r) {
      const int e = tid + r * kSimtThreads;
      const int row = e / kSimtBK, kk = e % kSimtBK;
      const int64_t k = k0 + kk;
      const int64_t m = m0 + row;
      xs[kk][row] = (m < m_rows && k < k_in) ? Elem<T>::to_float(x[m * k_in + k]) : 0.f;
      const int64_t n = n0 + row;
      float wv = 0.f;
      if (n < n_out && k < k_in) {
        const uint32_t bit = (__ldg(mask + n * k_words + (k >> 5)) >> (k & 31)) & 1u;
        wv = gate(Elem<T>::to_float(w[n * k_in + k]), bit, gamma);
      }
      ws[kk][row] = wv;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kSimtBK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = xs[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = ws[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }

#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t n = n0 + tx + 16 * j;
    if (n >= n_out) continue;
    const float b = bias != nullptr ? Elem<T>::to_float(bias[n]) : 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t m = m0 + ty + 16 * i;
      if (m < m_rows) out[m * n_out + n] = Elem<T>::from_float(acc[i][j] + b);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// wmma tiled GEMM (fp16 / bf16, sm_80+): block tile 64 x 64, K step 32, 4 warps in a 2 x 2 grid, each warp
// 32 x 32 outputs = 2 x 2 WMMA 16x16x16 fragments with fp32 accumulators.
//   xs[row][k] = x[m0 + row, k0 + k]             -> matrix_a, row major, ld = kLds
//   ws[col][k] = W[n0 + col, k0 + k] * G[...]     -> matrix_b (B[k][col]) column major, ld = kLds
// Accumulators go through shared memory (cs) for the bias add, dtype conversion and bounds checks.
// ---------------------------------------------------------------------------------------------------------------
constexpr int kMmaBM = 64, kMmaBN = 64, kMmaBK = 32, kMmaThreads = 128;
constexpr int kLds = kMmaBK + 8;  // 40 halves = 80 bytes per row: a multiple of 16 bytes, fewer bank conflicts
constexpr int kLdc = kMmaBN + 4;  // 68 floats per row

template <typename T, bool VEC>
__global__ void __launch_bounds__(kMmaThreads)
    gated_gemm_wmma_kernel(const T* __restrict__ x, const T* __restrict__ w, const uint32_t* __restrict__ mask,
                           const T* __restrict__ bias, T* __restrict__ out, int64_t m_rows, int64_t n_out,
                           int64_t k_in, int64_t k_words, float gamma) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  // WMMA loads/stores need 256-bit aligned pointers: every fragment offset below is a multiple of 32 bytes.
  __shared__ __align__(128) T xs[kMmaBM * kLds];
  __shared__ __align__(128) T ws[kMmaBN * kLds];
  __shared__ __align__(128) float cs[kMmaBM * kLdc];

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int wm = warp >> 1, wn = warp & 1;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kMmaBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kMmaBN;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  for (int64_t k0 = 0; k0 < k_in; k0 += kMmaBK) {
    // Each tile is 64 rows x 32 k = 256 vectors of 8 elements; 128 threads -> 2 vectors each.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int v = tid + r * kMmaThreads;
      const int row = v >> 2;        // 0..63
      const int kv = (v & 3) * 8;    // 0, 8, 16, 24
      const int64_t k = k0 + kv;
      const int64_t m = m0 + row;
      const int64_t n = n0 + row;
      T* xdst = xs + row * kLds + kv;
      T* wdst = ws + row * kLds + kv;
      if constexpr (VEC) {
        // K % 8 == 0 here, so k < K implies the whole vector k..k+7 is in bounds.
        uint4 xq = make_uint4(0u, 0u, 0u, 0u);
        if (m < m_rows && k < k_in) xq = __ldg(reinterpret_cast<const uint4*>(x + m * k_in + k));
        *reinterpret_cast<uint4*>(xdst) = xq;
        if (n < n_out && k < k_in) {
          const uint32_t bits = (__ldg(mask + n * k_words + (k >> 5)) >> (k & 31)) & 0xffu;
          if (bits == 0xffu) {
            *reinterpret_cast<uint4*>(wdst) = __ldg(reinterpret_cast<const uint4*>(w + n * k_in + k));
          } else {
            float wv[8];
            load_vec(w + n * k_in + k, wv);
#pragma unroll
            for (int i = 0; i < 8; ++i) wdst[i] = Elem<T>::from_float(gate(wv[i], (bits >> i) & 1u, gamma));
          }
        } else {
          *reinterpret_cast<uint4*>(wdst) = make_uint4(0u, 0u, 0u, 0u);
        }
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int64_t ki = k + i;
          const bool kin = ki < k_in;
          xdst[i] = (m < m_rows && kin) ? x[m * k_in + ki] : Elem<T>::from_float(0.f);
          float wv = 0.f;
          if (n < n_out && kin) {
            const uint32_t bit = (__ldg(mask + n * k_words + (ki >> 5)) >> (ki & 31)) & 1u;
            wv = gate(Elem<T>::to_float(w[n * k_in + ki]), bit, gamma);
          }
          wdst[i] = Elem<T>::from_float(wv);
        }
      }
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kMmaBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], xs + (wm * 32 + i * 16) * kLds + kk, kLds);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], ws + (wn * 32 + j * 16) * kLds + kk, kLds);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(cs + (wm * 32 + i * 16) * kLdc + wn * 32 + j * 16, acc[i][j], kLdc,
                              wmma::mem_row_major);
  __syncthreads();
  // Consecutive threads write consecutive n: coalesced stores.
  for (int e = tid; e < kMmaBM * kMmaBN; e += kMmaThreads) {
    const int r = e / kMmaBN, c = e % kMmaBN;
    const int64_t m = m0 + r, n = n0 + c;
    if (m < m_rows && n < n_out) {
      const float b = bias != nullptr ? Elem<T>::to_float(bias[n]) : 0.f;
      out[m * n_out + n] = Elem<T>::from_float(cs[r * kLdc + c] + b);
    }
  }
#else
  __trap();  // never launched: the host only picks this kernel on sm_80+
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------------------------
enum class Path { Auto, Gemv, Simt, Wmma };

Path requested_path() {
  const char* env = std::getenv("PERSONA_KERNELS_CUDA_GATED");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0) return Path::Auto;
  if (std::strcmp(env, "gemv") == 0) return Path::Gemv;
  if (std::strcmp(env, "simt") == 0) return Path::Simt;
  if (std::strcmp(env, "wmma") == 0) return Path::Wmma;
  TORCH_CHECK(false, "persona_kernels: PERSONA_KERNELS_CUDA_GATED must be auto, gemv, simt or wmma; got '", env, "'");
  return Path::Auto;
}

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

template <typename T>
void launch_simt(const T* x, const T* w, const uint32_t* mask, const T* bias, T* out, int64_t m_rows, int64_t n_out,
                 int64_t k_in, int64_t k_words, float gamma, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(m_rows, kSimtBM)), static_cast<unsigned>(ceil_div(n_out, kSimtBN)));
  gated_gemm_simt_kernel<T><<<grid, kSimtThreads, 0, stream>>>(x, w, mask, bias, out, m_rows, n_out, k_in, k_words,
                                                               gamma);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_wmma(const T* x, const T* w, const uint32_t* mask, const T* bias, T* out, int64_t m_rows, int64_t n_out,
                 int64_t k_in, int64_t k_words, float gamma, bool vec, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(m_rows, kMmaBM)), static_cast<unsigned>(ceil_div(n_out, kMmaBN)));
  if (vec) {
    gated_gemm_wmma_kernel<T, true>
        <<<grid, kMmaThreads, 0, stream>>>(x, w, mask, bias, out, m_rows, n_out, k_in, k_words, gamma);
  } else {
    gated_gemm_wmma_kernel<T, false>
        <<<grid, kMmaThreads, 0, stream>>>(x, w, mask, bias, out, m_rows, n_out, k_in, k_words, gamma);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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

  switch (path) {
    case Path::Gemv:
      launch_gemv<CT>(xp, wp, mp, bp, op, m_rows, n_out, k_in, k_words, gamma, vec, stream);
      break;
    case Path::Wmma:
      if constexpr (!std::is_same<CT, float>::value) {
        // The 16-byte staging also needs K % 8 == 0 (same V as the gemv for 16-bit types).
        launch_wmma<CT>(xp, wp, mp, bp, op, m_rows, n_out, k_in, k_words, gamma, vec, stream);
      }
      break;
    default:
      launch_simt<CT>(xp, wp, mp, bp, op, m_rows, n_out, k_in, k_words, gamma, stream);
      break;
  }
}

at::Tensor gated_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& packed,
                             const std::optional<at::Tensor>& bias, double gamma) {
  PK_CUDA_CHECK_ARG(x.is_cuda(), "x", "expected a CUDA tensor, got device ", x.device());
  PK_CUDA_CHECK_ARG(x.dim() == 2, "x", "expected a 2-D tensor [M, K], got ", x.dim(), " dims");
  PK_CUDA_CHECK_ARG(weight.dim() == 2, "weight", "expected a 2-D tensor [N, K], got ", weight.dim(), " dims");
  const int64_t m_rows = x.size(0), n_out = weight.size(0), k_in = weight.size(1);
  PK_CUDA_CHECK_ARG(x.size(1) == k_in, "x", "last dimension ", x.size(1), " does not match weight's K=", k_in);
  const auto dtype = x.scalar_type();
  PK_CUDA_CHECK_ARG(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, "x",
                    "expected dtype float32, float16 or bfloat16, got ", dtype);
  PK_CUDA_CHECK_ARG(weight.scalar_type() == dtype, "weight", "dtype ", weight.scalar_type(),
                    " does not match x's dtype ", dtype);
  PK_CUDA_CHECK_ARG(weight.device() == x.device(), "weight", "expected device ", x.device(), ", got ",
                    weight.device());
  PK_CUDA_CHECK_ARG(packed.scalar_type() == at::kInt, "packed", "expected dtype int32, got ", packed.scalar_type());
  PK_CUDA_CHECK_ARG(packed.dim() == 2 && packed.size(0) == n_out && packed.size(1) == (k_in + 31) / 32, "packed",
                    "expected shape [", n_out, ", ", (k_in + 31) / 32, "], got ", packed.sizes());
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(persona_kernels_C, m) {
  m.def("gated_linear_cuda(Tensor x, Tensor weight, Tensor packed, Tensor? bias, float gamma) -> Tensor");
}

TORCH_LIBRARY_IMPL(persona_kernels_C, CUDA, m) { m.impl("gated_linear_cuda", &gated_linear_cuda); }

}  // namespace cuda
}  // namespace persona_kernels
