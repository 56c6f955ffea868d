// Bitmask-gated linear on the CPU: y = x @ (W * G)^T + b with G = m + gamma * (1 - m).
//
// m comes bit-packed (int32 [N, ceil(K/32)], bit b of word w in row n = m[n, 32w + b], padding bits
// zero). W is never modified or copied as a whole. Strategies:
//
// * small M (decode): one pass over W and the bits. A block of NR weight rows is gated on the fly
//   (16 mask bits = one __mmask16 of fp32 lanes; _mm512_mask_mul_ps scales the pruned lanes by gamma)
//   and every gated vector is used for MR rows of x held in registers; the next block is prefetched
//   meanwhile. bf16 weights on CPUs with AVX512_BF16 use the bf16 dot product (32 mask bits = one
//   __mmask32 of bf16 lanes, fp32 accumulation; gamma * w is rounded to bf16, exact for gamma 0 / 1);
//   when x takes several passes of MR rows, the first pass also stores each gated block in per-thread
//   scratch and the later passes read it, so every weight vector is gated once. Other dtypes convert
//   to fp32 (F16C for fp16, a 16-bit shift for bf16), x once up front.
// * large M (prefill): gated_linear_gemm_cpu.cpp. bf16 on CPUs with AVX512_BF16 runs a GEMM of our own
//   (x packed once into 32-row tiles, W gated once 12 rows at a time, 32 x 12 bf16 dot-product tiles); other
//   dtypes or CPUs gate W panel by panel (about 2 MiB) and hand each panel to the GEMM torch uses.
// gamma = 0 removes the pruned bf16 weights with a zeroing move (exact zeros, as the Triton kernels do; the
// fp32-lane kernels multiply by gamma).
//
// ISA: AVX-512, AVX2 or portable, picked per call by persona_kernels::cpu_isa() (which honours
// PERSONA_KERNELS_CPU_ISA). Functions are compiled for each ISA with GCC target attributes, so the
// file builds without -march. Environment knobs for tests and tuning: PERSONA_KERNELS_CPU_NO_BF16DOT=1
// disables the AVX512_BF16 kernels (small M and our GEMM), PERSONA_KERNELS_GATED_LINEAR_GEMM_M sets the row count
// from which the GEMM path is used, PERSONA_KERNELS_GATED_LINEAR_PANEL the panel rows.
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "gated_linear_cpu.h"

namespace persona_kernels {
namespace {

using namespace gated_cpu;

// Cache level the bf16-dot block kernels prefetch the next weight block into (the fp32-lane ones use T1).
#ifndef PK_PF_HINT
#define PK_PF_HINT _MM_HINT_T0
#endif

// Rows of x at or above which the GEMM path is used. Measured on an AVX-512 AMD EPYC: the fp32 block kernels
// beat MKL's sgemm up to about 192 rows (1 thread); for bf16 with AVX512_BF16 our own GEMM (32-row tiles)
// matches the block kernels at 32 rows and beats them above (1 and 2 threads, 1024x4096 and 4096x4096).
// Overridable with PERSONA_KERNELS_GATED_LINEAR_GEMM_M.
constexpr int64_t kGemmMinRowsF32 = 128;
constexpr int64_t kGemmMinRowsBf16 = 32;
int64_t gemm_min_rows(bool bf16_dot) {
  const char* env = std::getenv("PERSONA_KERNELS_GATED_LINEAR_GEMM_M");
  if (env != nullptr && *env != '\0') return std::max<int64_t>(1, std::atoll(env));
  return bf16_dot ? kGemmMinRowsBf16 : kGemmMinRowsF32;
}

bool bf16_dot_enabled() {
  const char* env = std::getenv("PERSONA_KERNELS_CPU_NO_BF16DOT");
  return cpu_has_avx512bf16() && !(env != nullptr && std::strcmp(env, "1") == 0);
}

// ----------------------------------------------------------------------------------------------
// Small-M block kernels. Each computes sums[i * NR + r] = sum_k x[i, k] * (W[r, k] * G[r, k]) for
// NR weight rows and MR x rows (x in fp32 with row stride ldx, or bf16 for the dot kernel).
// ----------------------------------------------------------------------------------------------
// `pf` points at the weight rows the next call will read (same layout); the vector kernels prefetch
// them while they compute, so the next block's DRAM traffic overlaps this block's arithmetic.
// Weight rows have row stride ldw. `st` / `lds`: where a storing kernel writes the gated rows (see SmallKernels).
using BlockFn = void (*)(const void* x, int64_t ldx, const void* w, int64_t ldw, int64_t K, const uint32_t* bits,
                         int64_t words, float gamma, float* sums, const void* pf, void* st, int64_t lds);

constexpr int kMaxNR = 4;
constexpr int kMaxMR = 8;

// Portable scalar kernel (any dtype, compiler's own vectorisation only).
template <typename WT, int NR, int MR>
void block_portable(const void* xv, int64_t ldx, const void* wv, int64_t ldw, int64_t K, const uint32_t* bits,
                    int64_t words, float gamma, float* sums, const void* pf, void*, int64_t) {
  const float* x = static_cast<const float*>(xv);
  const WT* w = static_cast<const WT*>(wv);
  float acc[NR][MR] = {};
  for (int64_t k = 0; k < K; ++k) {
    float g[NR];
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      const float wk = static_cast<float>(w[r * ldw + k]);
      g[r] = bit_of(bits + r * words, k) ? wk : wk * gamma;
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const float xk = x[i * ldx + k];
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) acc[r][i] += xk * g[r];
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) sums[i * NR + r] = acc[r][i];
}

#if PK_X86
// Accumulator set of an AVX-512 block kernel: NR weight rows x MR rows of x, one zmm each (shared by
// the fp32-lane and the bf16-dot kernels; inlined into both targets).
template <int NR, int MR>
struct Acc512 {
  __m512 v[NR][MR];
  PK_TARGET_AVX512 inline void zero() {
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r)
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) v[r][i] = _mm512_setzero_ps();
  }
  PK_TARGET_AVX512 inline void store(float* sums) const {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) sums[i * NR + r] = _mm512_reduce_add_ps(v[r][i]);
  }
};

// One 16-lane step at column k of the fp32-lane block kernel (Full: all 16 lanes valid, so the
// masked loads compile away).
template <typename WT, int NR, int MR, bool Full>
PK_TARGET_AVX512 inline void step_avx512(Acc512<NR, MR>& acc, const float* x, int64_t ldx, const WT* w, int64_t ldw,
                                         int64_t K,
                                         const uint32_t* bits, int64_t words, __m512 g, const WT* wp, int64_t k) {
  const __mmask16 valid = Full ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (K - k)) - 1u);
  __m512 wr[NR];
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) {
    const __mmask16 keep = static_cast<__mmask16>(bits[r * words + (k >> 5)] >> (k & 16));
    wr[r] = gated16_avx512<WT>(w + r * ldw + k, keep, valid, g);
    if (Full && (k * sizeof(WT)) % 64 == 0)
      _mm_prefetch(reinterpret_cast<const char*>(wp + r * ldw + k), _MM_HINT_T1);
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    const __m512 xi = load16_avx512<float>(x + i * ldx + k, valid);
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) acc.v[r][i] = _mm512_fmadd_ps(wr[r], xi, acc.v[r][i]);
  }
}

template <typename WT, int NR, int MR>
PK_TARGET_AVX512 void block_avx512(const void* xv, int64_t ldx, const void* wv, int64_t ldw, int64_t K,
                                   const uint32_t* bits, int64_t words, float gamma, float* sums, const void* pf, void*,
                                   int64_t) {
  const float* x = static_cast<const float*>(xv);
  const WT* w = static_cast<const WT*>(wv);
  const WT* wp = static_cast<const WT*>(pf);
  const __m512 g = _mm512_set1_ps(gamma);
  Acc512<NR, MR> acc;
  acc.zero();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) step_avx512<WT, NR, MR, true>(acc, x, ldx, w, ldw, K, bits, words, g, wp, k);
  if (k < K) step_avx512<WT, NR, MR, false>(acc, x, ldx, w, ldw, K, bits, words, g, wp, k);
  acc.store(sums);
}

// One 32-lane step at column k of the bf16-dot block kernel (x in bf16; Full as for step_avx512).
template <int Mode, int NR, int MR, bool Full>
PK_TARGET_AVX512BF16 inline void step_bf16dot(Acc512<NR, MR>& acc, const BFloat16* x, int64_t ldx, const BFloat16* w,
                                              int64_t ldw, int64_t K, const uint32_t* bits, int64_t words, __m512 g,
                                              const BFloat16* wp, BFloat16* st, int64_t lds, int64_t k) {
  // Split layout: x rows and stored blocks are padded to whole 32-column blocks (zeros), read in full.
  constexpr bool split = split_layout(Mode);
  const __mmask32 valid = Full ? ~0u : static_cast<__mmask32>((1ull << (K - k)) - 1u);
  const __mmask32 padded = split ? ~0u : valid;
  __m512i wr[NR];
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) {
    wr[r] = gate32_mode<Mode>(w + r * ldw + k, (Mode & 3) ? bits[r * words + (k >> 5)] : 0u,
                              (Mode & 3) ? valid : padded, g);
    if (Full) _mm_prefetch(reinterpret_cast<const char*>(wp + r * ldw + k), PK_PF_HINT);
    if constexpr ((Mode & kGateStore) != 0) {
      if (Full || split) _mm512_storeu_si512(st + r * lds + k, wr[r]);
      else _mm512_mask_storeu_epi16(st + r * lds + k, valid, wr[r]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    const __m512i xi = load32_bf16(x + i * ldx + k, padded);
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) acc.v[r][i] = _mm512_dpbf16_ps(acc.v[r][i], (__m512bh)(wr[r]), (__m512bh)(xi));
  }
}

template <int Mode, int NR, int MR>
PK_TARGET_AVX512BF16 void block_bf16dot(const void* xv, int64_t ldx, const void* wv, int64_t ldw, int64_t K,
                                        const uint32_t* bits, int64_t words, float gamma, float* sums, const void* pf,
                                        void* stv, int64_t lds) {
  const BFloat16* x = static_cast<const BFloat16*>(xv);
  const BFloat16* w = static_cast<const BFloat16*>(wv);
  const BFloat16* wp = static_cast<const BFloat16*>(pf);
  BFloat16* st = static_cast<BFloat16*>(stv);
  const __m512 g = _mm512_set1_ps(gamma);
  Acc512<NR, MR> acc;
  acc.zero();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) step_bf16dot<Mode, NR, MR, true>(acc, x, ldx, w, ldw, K, bits, words, g, wp, st, lds, k);
  if (k < K) step_bf16dot<Mode, NR, MR, false>(acc, x, ldx, w, ldw, K, bits, words, g, wp, st, lds, k);
  acc.store(sums);
}

template <typename WT, int NR, int MR>
PK_TARGET_AVX2 void block_avx2(const void* xv, int64_t ldx, const void* wv, int64_t ldw, int64_t K,
                               const uint32_t* bits, int64_t words, float gamma, float* sums, const void* pf, void*,
                               int64_t) {
  const float* x = static_cast<const float*>(xv);
  const WT* w = static_cast<const WT*>(wv);
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256 g = _mm256_set1_ps(gamma);
  const __m256 one = _mm256_set1_ps(1.0f);
  __m256 acc[NR][MR];
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) acc[r][i] = _mm256_setzero_ps();
  const int64_t kv = K & ~int64_t{7};
  for (int64_t k = 0; k < kv; k += 8) {
    __m256 wr[NR];
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      const int b8 = static_cast<int>((bits[r * words + (k >> 5)] >> (k & 31)) & 0xFFu);
      const __m256 keep = _mm256_castsi256_ps(
          _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(b8), lane_bit), lane_bit));
      const __m256 v = load8_as_f32<WT>(w + r * ldw + k);
      wr[r] = _mm256_mul_ps(v, _mm256_blendv_ps(g, one, keep));
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256 xi = _mm256_loadu_ps(x + i * ldx + k);
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) acc[r][i] = _mm256_fmadd_ps(wr[r], xi, acc[r][i]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc[r][i]), _mm256_extractf128_ps(acc[r][i], 1));
      const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
      float s = _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
      for (int64_t k = kv; k < K; ++k) {
        const float wk = static_cast<float>(w[r * ldw + k]);
        s += x[i * ldx + k] * (bit_of(bits + r * words, k) ? wk : wk * gamma);
      }
      sums[i * NR + r] = s;
    }
  }
}
#endif  // PK_X86

// Table of block kernels for one (ISA, dtype): main[MR-1] for NR weight rows, single[MR-1] for 1 row.
struct BlockTable {
  int nr = 1;
  int mr_max = 1;
  BlockFn main[kMaxMR] = {};
  BlockFn single[kMaxMR] = {};
};

#define PK_FILL_TABLE(KERNEL, NR_, MRMAX_, ...)                                           \
  do {                                                                                    \
    t.nr = NR_;                                                                           \
    t.mr_max = MRMAX_;                                                                    \
    PK_FILL_ROW(KERNEL, NR_, 1, __VA_ARGS__);                                             \
    if (MRMAX_ >= 2) PK_FILL_ROW(KERNEL, NR_, 2, __VA_ARGS__);                            \
    if (MRMAX_ >= 3) PK_FILL_ROW(KERNEL, NR_, 3, __VA_ARGS__);                            \
    if (MRMAX_ >= 4) PK_FILL_ROW(KERNEL, NR_, 4, __VA_ARGS__);                            \
    if (MRMAX_ >= 5) PK_FILL_ROW(KERNEL, NR_, 5, __VA_ARGS__);                            \
    if (MRMAX_ >= 6) PK_FILL_ROW(KERNEL, NR_, 6, __VA_ARGS__);                            \
    if (MRMAX_ >= 7) PK_FILL_ROW(KERNEL, NR_, 7, __VA_ARGS__);                            \
    if (MRMAX_ >= 8) PK_FILL_ROW(KERNEL, NR_, 8, __VA_ARGS__);                            \
  } while (0)
#define PK_FILL_ROW(KERNEL, NR_, MR_, ...)                                                \
  do {                                                                                    \
    t.main[MR_ - 1] = &KERNEL<__VA_ARGS__ NR_, MR_>;                                      \
    t.single[MR_ - 1] = &KERNEL<__VA_ARGS__ 1, MR_>;                                      \
  } while (0)

template <typename WT>
BlockTable float_table(Isa isa) {
  BlockTable t;
#if PK_X86
  if (isa == Isa::Avx512) {
    PK_FILL_TABLE(block_avx512, 4, 6, WT,);
    return t;
  }
  if (isa == Isa::Avx2) {
    PK_FILL_TABLE(block_avx2, 4, 2, WT,);
    return t;
  }
#endif
  PK_FILL_TABLE(block_portable, 2, 4, WT,);
  return t;
}

#if PK_X86
template <int Mode>
BlockTable bf16dot_table() {
  BlockTable t;
  // 3 weight rows x 8 rows of x: 24 accumulators; M = 16 takes two passes over each weight block.
  PK_FILL_TABLE(block_bf16dot, 3, 8, Mode,);
  return t;
}
#endif

// Block kernels of one small-M strategy: `gate` gates W on the fly for every pass of MR rows of x. For kernels
// with `store` and `plain` (same NR and MR), when x takes several passes the first pass (`store`) also writes
// each gated block to per-thread scratch and the later ones (`plain`) read it: each weight vector is gated
// once instead of once per pass, which halves the work at M = 16 when W is cache-resident.
struct SmallKernels {
  const BlockTable* gate;
  const BlockTable* store = nullptr;
  const BlockTable* plain = nullptr;
  int64_t block = 1;  // stored rows are padded to a multiple of this many columns (32 for the split layout)
};

// Row strides that are a multiple of 2 KiB (see unaliased_stride in common.h): M = 16 on a cache-resident
// 1024x4096 bf16 weight ran 1.3-1.8x of F.linear in some processes and 0.9-1.0x in others, depending on where
// x landed. Such x is copied to rows 64 bytes longer, and gated blocks are stored so.

// x (contiguous [M, K]) itself, or a copy with unaliased row stride when several rows are read at once.
torch::Tensor unaliased_rows(const torch::Tensor& x) {
  const int64_t M = x.size(0), K = x.size(1), ld = unaliased_stride(K, x.element_size());
  if (ld == K || M <= 4) return x;
  torch::Tensor rows = torch::empty({M, ld}, x.options()).narrow(1, 0, K);
  rows.copy_(x);
  return rows;
}

#if PK_X86
// bf16 x (contiguous [M, K]) -> its rows in split order, zero-padded to whole 32-column blocks; [M, stride].
PK_TARGET_AVX512 torch::Tensor split_rows(const torch::Tensor& x) {
  const int64_t M = x.size(0), K = x.size(1), ld = unaliased_stride((K + 31) / 32 * 32, 2);
  torch::Tensor out = torch::empty({M, ld}, x.options());
  const BFloat16* src = x.data_ptr<BFloat16>();
  BFloat16* dst = out.data_ptr<BFloat16>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; k += 32) {
      const __mmask32 valid = K - k >= 32 ? ~0u : static_cast<__mmask32>((1ull << (K - k)) - 1u);
      _mm512_storeu_si512(dst + m * ld + k, split_block(_mm512_maskz_loadu_epi16(valid, src + m * K + k)));
    }
  return out;
}
#endif

// Runs the block kernels over all of y. x: [M, K] rows of the type the tables expect, row stride x.stride(0).
template <typename OT>
void run_small(const SmallKernels& kernels, const torch::Tensor& x, const void* w, size_t w_elem,
               const uint32_t* bits, const float* bias, OT* y, int64_t M, int64_t N, int64_t K, int64_t words,
               float gamma) {
  const BlockTable& t = *kernels.gate;
  const int nr = t.nr;
  const int64_t nblocks = (N + nr - 1) / nr;
  const char* xb = static_cast<const char*>(x.data_ptr());
  const int64_t ldx = x.stride(0), x_row = ldx * static_cast<int64_t>(x.element_size());
  const char* wb = static_cast<const char*>(w);
  const bool once = kernels.store != nullptr && kernels.plain != nullptr && M > t.mr_max;
  const int64_t padded_k = (K + kernels.block - 1) / kernels.block * kernels.block;
  const int64_t lds = unaliased_stride(padded_k, static_cast<int64_t>(w_elem));  // row stride of a stored block
  // Claims of at least about 24 weight rows (run_chunks claims more while much is left). 2 threads, bf16
  // M = 16 on 1024x4096: 3 % faster than at least 64 rows, in five in-process A/Bs.
  const int64_t chunk = std::max<int64_t>(1, 24 / nr);
  run_chunks(nblocks, chunk, [&](int64_t b0, int64_t b1) {
    float sums[kMaxNR * kMaxMR];
    void* st = once ? thread_scratch(ScratchSlot::GatedBlock, static_cast<size_t>(nr * lds) * w_elem) : nullptr;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * nr;
      const int rows = static_cast<int>(std::min<int64_t>(nr, N - n0));
      for (int64_t m0 = 0; m0 < M; m0 += t.mr_max) {
        const int mr = static_cast<int>(std::min<int64_t>(t.mr_max, M - m0));
        const void* xm = xb + m0 * x_row;
        if (rows == nr) {
          const void* wn = wb + std::min<int64_t>(n0 + nr, N - nr) * K * w_elem;  // next block (or this one)
          const void* wcur = wb + n0 * K * w_elem;
          const uint32_t* bcur = bits + n0 * words;
          if (!once) {
            t.main[mr - 1](xm, ldx, wcur, K, K, bcur, words, gamma, sums, wn, nullptr, 0);
          } else if (m0 == 0) {  // gate, use and store the block
            kernels.store->main[mr - 1](xm, ldx, wcur, K, K, bcur, words, gamma, sums, wn, st, lds);
          } else {  // the stored gated block
            kernels.plain->main[mr - 1](xm, ldx, st, lds, K, bcur, words, gamma, sums, st, nullptr, 0);
          }
          for (int i = 0; i < mr; ++i)
            for (int r = 0; r < nr; ++r) {
              const float v = sums[i * nr + r] + (bias ? bias[n0 + r] : 0.0f);
              y[(m0 + i) * N + n0 + r] = static_cast<OT>(v);
            }
        } else {
          for (int r = 0; r < rows; ++r) {
            const int64_t n = n0 + r;
            const char* wr = wb + n * K * w_elem;
            t.single[mr - 1](xm, ldx, wr, K, K, bits + n * words, words, gamma, sums, wr, nullptr, 0);
            for (int i = 0; i < mr; ++i) y[(m0 + i) * N + n] = static_cast<OT>(sums[i] + (bias ? bias[n] : 0.0f));
          }
        }
      }
    }
  });
}

torch::Tensor gated_linear_cpu(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& packed,
                               const c10::optional<torch::Tensor>& bias, double gamma_d) {
  PK_CHECK_ARG(weight.dim() == 2, "weight", "expected a 2-D tensor [N, K], got ", weight.dim(), " dims");
  PK_CHECK_ARG(x.dim() == 2, "x", "expected a 2-D tensor [M, K], got ", x.dim(), " dims");
  const auto dtype = weight.scalar_type();
  PK_CHECK_ARG(dtype == torch::kFloat || dtype == torch::kHalf || dtype == torch::kBFloat16, "weight",
               "expected dtype float32, float16 or bfloat16, got ", dtype);
  PK_CHECK_ARG(x.scalar_type() == dtype, "x", "dtype ", x.scalar_type(), " does not match weight's dtype ", dtype);
  PK_CHECK_ARG(weight.device().is_cpu(), "weight", "expected a CPU tensor, got device ", weight.device());
  PK_CHECK_ARG(x.device().is_cpu(), "x", "expected a CPU tensor, got device ", x.device());
  const int64_t M = x.size(0), N = weight.size(0), K = weight.size(1), words = packed_words(K);
  PK_CHECK_ARG(x.size(1) == K, "x", "last dimension ", x.size(1), " does not match weight's in_features K=", K);
  PK_CHECK_ARG(packed.scalar_type() == torch::kInt32, "packed", "expected dtype torch.int32, got ",
               packed.scalar_type());
  PK_CHECK_ARG(packed.device().is_cpu(), "packed", "expected a CPU tensor, got device ", packed.device());
  PK_CHECK_ARG(packed.dim() == 2 && packed.size(0) == N && packed.size(1) == words, "packed",
               "expected shape [N, ceil(K/32)] = [", N, ", ", words, "], got ", packed.sizes());
  if (bias.has_value()) {
    PK_CHECK_ARG(bias->dim() == 1 && bias->size(0) == N, "bias", "expected shape [N] = [", N, "], got ",
                 bias->sizes());
    PK_CHECK_ARG(bias->scalar_type() == dtype, "bias", "dtype ", bias->scalar_type(), " does not match weight's dtype ",
                 dtype);
    PK_CHECK_ARG(bias->device().is_cpu(), "bias", "expected a CPU tensor, got device ", bias->device());
  }
  PK_CHECK_ARG(gamma_d >= 0.0 && gamma_d <= 1.0, "gamma", "expected a float in [0, 1], got ", gamma_d);
  const float gamma = static_cast<float>(gamma_d);

  at::NoGradGuard no_grad;
  const torch::Tensor xc = x.contiguous(), wc = weight.contiguous(), pc = packed.contiguous();
  if (M == 0 || N == 0 || K == 0) {
    torch::Tensor y = torch::zeros({M, N}, x.options().dtype(torch::kFloat));
    if (bias.has_value() && M > 0) y.add_(bias->to(torch::kFloat));
    return y.to(dtype);
  }
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(pc.data_ptr<int32_t>());
  const Isa isa = cpu_isa();
  const bool bf16_dot = dtype == torch::kBFloat16 && isa == Isa::Avx512 && bf16_dot_enabled();

  torch::Tensor bias_f;
  if (bias.has_value()) bias_f = bias->contiguous().to(torch::kFloat);
  const float* bptr = bias.has_value() ? bias_f.data_ptr<float>() : nullptr;

  if (M >= gemm_min_rows(bf16_dot)) {
#if PK_X86
    if (bf16_dot) return gated_linear_own_bf16(xc, wc, bits, bptr, gamma);  // packs x itself
#endif
    // bf16 GEMM only where the CPU multiplies bf16 natively; elsewhere fp32 is faster.
    const bool bf16_gemm = dtype == torch::kBFloat16 && cpu_has_avx512bf16();
    return gated_linear_gemm(xc, wc, bits, bias, gamma, isa, bf16_gemm);
  }

  torch::Tensor y = torch::empty({M, N}, x.options());

#if PK_X86
  if (bf16_dot) {
    // gamma = 0 clears the pruned lanes (one move), other gammas scale them in fp32 in the split column
    // order (x permuted to match); with several passes of x rows the first pass also stores the gated
    // block and the later ones read it.
    static const BlockTable zero = bf16dot_table<kGateZero>(), zero_store = bf16dot_table<kGateZero | kGateStore>();
    static const BlockTable plain = bf16dot_table<kGateNone>();
    static const BlockTable split = bf16dot_table<kGateSplit>(), split_store = bf16dot_table<kGateSplit | kGateStore>();
    static const BlockTable split_plain = bf16dot_table<kGateNone | kSplitLayout>();
    if (gamma == 0.0f) {
      run_small(SmallKernels{&zero, &zero_store, &plain}, unaliased_rows(xc), wc.data_ptr(), 2, bits, bptr,
                y.data_ptr<BFloat16>(), M, N, K, words, gamma);
    } else {
      run_small(SmallKernels{&split, &split_store, &split_plain, 32}, split_rows(xc), wc.data_ptr(), 2, bits, bptr,
                y.data_ptr<BFloat16>(), M, N, K, words, gamma);
    }
    return y;
  }
#endif
  const torch::Tensor xf = unaliased_rows(xc.to(torch::kFloat));  // converted once (no copy for fp32)
  switch (dtype) {
    case torch::kFloat: {
      const BlockTable table = float_table<float>(isa);
      run_small(SmallKernels{&table}, xf, wc.data_ptr(), 4, bits, bptr, y.data_ptr<float>(), M, N, K, words, gamma);
      break;
    }
    case torch::kHalf: {
      const BlockTable table = float_table<Half>(isa);
      run_small(SmallKernels{&table}, xf, wc.data_ptr(), 2, bits, bptr, y.data_ptr<Half>(), M, N, K, words, gamma);
      break;
    }
    default: {
      const BlockTable table = float_table<BFloat16>(isa);
      run_small(SmallKernels{&table}, xf, wc.data_ptr(), 2, bits, bptr, y.data_ptr<BFloat16>(), M, N, K, words,
                gamma);
    }
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(persona_kernels_C, m) {
  m.def("gated_linear_cpu(Tensor x, Tensor weight, Tensor packed, Tensor? bias, float gamma) -> Tensor",
        &gated_linear_cpu);
}

}  // namespace persona_kernels
