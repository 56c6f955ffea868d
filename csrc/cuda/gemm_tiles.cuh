// Tiled GEMM kernels shared by the gated linear ops (gated_linear.cu) and the fused linear_with_stats
// (welford.cu): y[rows] = x[rows] @ (W * G)^T + b with fp32 accumulation.
//
// A block computes one (M tile, 64-column N tile) pair. Which rows of x its M tile holds, and how its W tile
// is gated, come from a tile policy (`Tiles::tile(bm, spec)`):
//   StridedTiles   rows [bx * BM, bx * BM + BM) of x, one mask and gamma for all           (gated_linear)
//   PersonaTiles   a tile table of rows sorted by persona: the tile's rows are order[start..end) and all share
//                  one persona's mask and gamma; persona -1 = base model, W ungated     (gated_linear_multi)
//   (welford.cu)   one statistics segment (<= 64 rows, never across a sequence boundary), W ungated
// A statistics policy (`Stats`) can observe every x tile the block stages in shared memory: the fused
// linear_with_stats computes its per-channel partials there, so x is read from global memory once for both.
//
// Two kernels:
//   simt  64x64x16 shared-memory tiles, 256 threads, 4x4 fp32 outputs per thread (fp32, or pre-sm_80 GPUs);
//   wmma  fp16/bf16 on sm_80+: 64x64x32 tiles, 4 warps in 2x2, each 2x2 WMMA 16x16x16 fragments, fp32 accum.
#pragma once

#include <mma.h>

#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "pk_cuda.cuh"

namespace persona_kernels {
namespace cuda {

// Kernel choice; PERSONA_KERNELS_CUDA_GATED=gemv|simt|wmma|auto forces one (testing, benchmarks).
enum class Path { Auto, Gemv, Simt, Wmma };

inline Path requested_path() {
  const char* env = std::getenv("PERSONA_KERNELS_CUDA_GATED");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0) return Path::Auto;
  if (std::strcmp(env, "gemv") == 0) return Path::Gemv;
  if (std::strcmp(env, "simt") == 0) return Path::Simt;
  if (std::strcmp(env, "wmma") == 0) return Path::Wmma;
  TORCH_CHECK(false, "persona_kernels: PERSONA_KERNELS_CUDA_GATED must be auto, gemv, simt or wmma; got '", env, "'");
  return Path::Auto;
}

// Gate a weight value: kept -> w, pruned -> w * gamma (exactly what fp32 `w * (m + gamma*(1-m))` gives).
__device__ __forceinline__ float gate(float w, uint32_t bit, float gamma) { return bit ? w : w * gamma; }

// What one block's M tile covers. Row r (0 <= r < count) of the tile is x row `row(r)`.
struct TileSpec {
  const int32_t* order;  // sorted row numbers (PersonaTiles), or null: row(r) = first + r
  int64_t first;         // first row (or first sorted position)
  int count;             // rows in this tile, 1..BM
  const uint32_t* mask;  // packed keep-mask rows of this tile's W (row n at mask + n * k_words)
  float gamma;
  bool gated;            // false: every weight kept (base model, plain linear)
  int64_t seq;           // statistics: the sequence of the tile's rows, or -1
  __device__ __forceinline__ int64_t row(int r) const { return order != nullptr ? order[first + r] : first + r; }
  // Mask bits of W[n, k .. k + width) (width <= 32 - k % 32), LSB = k; all ones when ungated.
  __device__ __forceinline__ uint32_t bits(int64_t n, int64_t k, int64_t k_words, uint32_t width_mask) const {
    if (!gated) return width_mask;
    return (__ldg(mask + n * k_words + (k >> 5)) >> (k & 31)) & width_mask;
  }
};

struct StridedTiles {
  int64_t m_rows;
  const uint32_t* mask;
  float gamma;
  __device__ __forceinline__ bool tile(int bm, TileSpec& s) const {
    s.order = nullptr;
    s.first = static_cast<int64_t>(blockIdx.x) * bm;
    const int64_t left = m_rows - s.first;
    s.count = static_cast<int>(left < bm ? left : bm);
    s.mask = mask;
    s.gamma = gamma;
    s.gated = true;
    s.seq = -1;
    return s.count > 0;
  }
};

// Tile t = blockIdx.x covers sorted positions [start[t], end[t]) of one persona (surplus tiles are empty).
struct PersonaTiles {
  const int32_t* order;
  const int32_t* persona;
  const int32_t* start;
  const int32_t* end;
  const uint32_t* bank;  // [P, N, k_words]
  int64_t bank_stride;   // N * k_words
  const float* gammas;   // [P]
  __device__ __forceinline__ bool tile(int bm, TileSpec& s) const {
    const int t = blockIdx.x;
    const int32_t lo = start[t], hi = end[t];
    if (hi <= lo) return false;
    const int32_t p = persona[t];
    s.order = order;
    s.first = lo;
    s.count = hi - lo < bm ? hi - lo : bm;
    s.gated = p >= 0;
    s.mask = s.gated ? bank + p * bank_stride : nullptr;
    s.gamma = s.gated ? gammas[p] : 1.f;
    s.seq = -1;
    return true;
  }
};

// This block's M tile (``tiles.tile``): false when the block has none (block-uniform: the caller returns before
// any barrier); otherwise rows[r] = x row of tile row r (0 past the tile's rows), visible to the whole block.
template <int BM, class Tiles>
__device__ __forceinline__ bool stage_tile_rows(const Tiles& tiles, TileSpec& ts, int64_t* rows) {
  if (!tiles.tile(BM, ts)) return false;
  const int tid = threadIdx.x;
  if (tid < BM) rows[tid] = tid < ts.count ? ts.row(tid) : 0;
  __syncthreads();
  return true;
}

// No statistics: the GEMM only.
struct NoStats {
  static constexpr bool kOn = false;
  template <int BM, int BK, int THREADS, class Get>
  __device__ void consume(const Get&, const TileSpec&, int64_t, int64_t) const {}
};

// ---------------------------------------------------------------------------------------------------------------
// simt: block tile 64 (M) x 64 (N), K step 16, 256 threads, each 4x4 outputs (rows ty + 16 i, columns tx + 16 j).
// Tiles are staged in shared memory as fp32, the W tile already gated.
// ---------------------------------------------------------------------------------------------------------------
constexpr int kSimtBM = 64, kSimtBN = 64, kSimtBK = 16, kSimtThreads = 256;

#ifndef PK_SIMT_MIN_BLOCKS
#define PK_SIMT_MIN_BLOCKS 2
#endif
template <typename T, class Tiles, class Stats>
__global__ void __launch_bounds__(kSimtThreads, PK_SIMT_MIN_BLOCKS)
    gemm_simt_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                     T* __restrict__ out, int64_t n_out, int64_t k_in, int64_t k_words, Tiles tiles, Stats stats) {
  __shared__ float xs[kSimtBK][kSimtBM + 4];
  __shared__ float ws[kSimtBK][kSimtBN + 4];
  __shared__ int64_t rows[kSimtBM];  // x row of each tile row
  TileSpec ts;
  if (!stage_tile_rows<kSimtBM>(tiles, ts, rows)) return;  // block-uniform
  const int tid = threadIdx.x;
  const int tx = tid & 15, ty = tid >> 4;
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
      xs[kk][row] = (row < ts.count && k < k_in) ? Elem<T>::to_float(x[rows[row] * k_in + k]) : 0.f;
      const int64_t n = n0 + row;
      float wv = 0.f;
      if (n < n_out && k < k_in) wv = gate(Elem<T>::to_float(w[n * k_in + k]), ts.bits(n, k, k_words, 1u), ts.gamma);
      ws[kk][row] = wv;
    }
    __syncthreads();
    if constexpr (Stats::kOn) {
      if (blockIdx.y == 0) {
        stats.template consume<kSimtBM, kSimtBK, kSimtThreads>([&](int row, int kk) { return xs[kk][row]; }, ts, k0,
                                                               k_in);
      }
    }
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
      const int r = ty + 16 * i;
      if (r < ts.count) out[rows[r] * n_out + n] = Elem<T>::from_float(acc[i][j] + b);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// wmma (fp16 / bf16, sm_80+): block tile 64 x 64, K step 32, 4 warps in a 2 x 2 grid, each warp 32 x 32 outputs
// = 2 x 2 WMMA 16x16x16 fragments with fp32 accumulators.
//   xs[row][k] = x[row(row), k0 + k]              -> matrix_a, row major, ld = kLds
//   ws[col][k] = W[n0 + col, k0 + k] * G[...]     -> matrix_b (B[k][col]) column major, ld = kLds
// Accumulators go through shared memory (cs) for the bias add, dtype conversion and bounds checks.
// VEC: K % 8 == 0 and 16-byte aligned x / W, so one 16-byte vector moves 8 elements.
// ---------------------------------------------------------------------------------------------------------------
constexpr int kMmaBM = 64, kMmaBN = 64, kMmaBK = 32, kMmaThreads = 128;
constexpr int kLds = kMmaBK + 8;  // 40 halves = 80 bytes per row: a multiple of 16 bytes, fewer bank conflicts
constexpr int kLdc = kMmaBN + 4;  // 68 floats per row

template <typename T, bool VEC, class Tiles, class Stats>
__global__ void __launch_bounds__(kMmaThreads)
    gemm_wmma_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                     T* __restrict__ out, int64_t n_out, int64_t k_in, int64_t k_words, Tiles tiles, Stats stats) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  // WMMA loads/stores need 256-bit aligned pointers: every fragment offset below is a multiple of 32 bytes.
  __shared__ __align__(128) T xs[kMmaBM * kLds];
  __shared__ __align__(128) T ws[kMmaBN * kLds];
  __shared__ __align__(128) float cs[kMmaBM * kLdc];
  __shared__ int64_t rows[kMmaBM];  // x row of each tile row

  TileSpec ts;
  if (!stage_tile_rows<kMmaBM>(tiles, ts, rows)) return;  // block-uniform
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int wm = warp >> 1, wn = warp & 1;
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
      const int row = v >> 2;      // 0..63
      const int kv = (v & 3) * 8;  // 0, 8, 16, 24
      const int64_t k = k0 + kv;
      const bool row_ok = row < ts.count;
      const int64_t m = rows[row];
      const int64_t n = n0 + row;
      T* xdst = xs + row * kLds + kv;
      T* wdst = ws + row * kLds + kv;
      if constexpr (VEC) {
        // K % 8 == 0 here, so k < K implies the whole vector k..k+7 is in bounds.
        uint4 xq = make_uint4(0u, 0u, 0u, 0u);
        if (row_ok && k < k_in) xq = __ldg(reinterpret_cast<const uint4*>(x + m * k_in + k));
        *reinterpret_cast<uint4*>(xdst) = xq;
        if (n < n_out && k < k_in) {
          const uint32_t bits = ts.bits(n, k, k_words, 0xffu);
          if (bits == 0xffu) {
            *reinterpret_cast<uint4*>(wdst) = __ldg(reinterpret_cast<const uint4*>(w + n * k_in + k));
          } else {
            float wv[8];
            load_vec(w + n * k_in + k, wv);
#pragma unroll
            for (int i = 0; i < 8; ++i) wdst[i] = Elem<T>::from_float(gate(wv[i], (bits >> i) & 1u, ts.gamma));
          }
        } else {
          *reinterpret_cast<uint4*>(wdst) = make_uint4(0u, 0u, 0u, 0u);
        }
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int64_t ki = k + i;
          const bool kin = ki < k_in;
          xdst[i] = (row_ok && kin) ? x[m * k_in + ki] : Elem<T>::from_float(0.f);
          float wv = 0.f;
          if (n < n_out && kin) wv = gate(Elem<T>::to_float(w[n * k_in + ki]), ts.bits(n, ki, k_words, 1u), ts.gamma);
          wdst[i] = Elem<T>::from_float(wv);
        }
      }
    }
    __syncthreads();
    if constexpr (Stats::kOn) {
      if (blockIdx.y == 0) {
        stats.template consume<kMmaBM, kMmaBK, kMmaThreads>(
            [&](int row, int kk) { return Elem<T>::to_float(xs[row * kLds + kk]); }, ts, k0, k_in);
      }
    }
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
    const int64_t n = n0 + c;
    if (r < ts.count && n < n_out) {
      const float b = bias != nullptr ? Elem<T>::to_float(bias[n]) : 0.f;
      out[rows[r] * n_out + n] = Elem<T>::from_float(cs[r * kLdc + c] + b);
    }
  }
#else
  __trap();  // never launched: the host only picks this kernel on sm_80+
#endif
}

// Launch the simt kernel (any dtype) or, for fp16/bf16 when `use_wmma`, the WMMA kernel; grid (tiles, N tiles).
// `vec`: K % 8 == 0 and x / W 16-byte aligned (the WMMA kernel's vector staging).
template <typename CT, class Tiles, class Stats>
void launch_gemm_tiles(const CT* x, const CT* w, const CT* bias, CT* out, int64_t n_out, int64_t k_in,
                       int64_t k_words, int64_t num_tiles, const Tiles& tiles, const Stats& stats, bool use_wmma,
                       bool vec, cudaStream_t stream) {
  if (num_tiles == 0 || n_out == 0) return;
  TORCH_CHECK(num_tiles <= 0x7fffffffLL, "persona_kernels: too many row tiles (", num_tiles, ")");
  TORCH_CHECK(ceil_div(n_out, kMmaBN) <= 65535, "persona_kernels: too many output features (", n_out, ")");
  if constexpr (!std::is_same<CT, float>::value) {
    if (use_wmma) {
      const dim3 grid(static_cast<unsigned>(num_tiles), static_cast<unsigned>(ceil_div(n_out, kMmaBN)));
      if (vec) {
        gemm_wmma_kernel<CT, true, Tiles, Stats>
            <<<grid, kMmaThreads, 0, stream>>>(x, w, bias, out, n_out, k_in, k_words, tiles, stats);
      } else {
        gemm_wmma_kernel<CT, false, Tiles, Stats>
            <<<grid, kMmaThreads, 0, stream>>>(x, w, bias, out, n_out, k_in, k_words, tiles, stats);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  const dim3 grid(static_cast<unsigned>(num_tiles), static_cast<unsigned>(ceil_div(n_out, kSimtBN)));
  gemm_simt_kernel<CT, Tiles, Stats><<<grid, kSimtThreads, 0, stream>>>(x, w, bias, out, n_out, k_in, k_words, tiles,
                                                                        stats);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace persona_kernels
