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
// * large M (prefill), bf16 on CPUs with AVX512_BF16: a GEMM of our own. x is packed once per call into
//   32-row tiles of column pairs; each thread gates 12 weight rows at a time into scratch (W read once,
//   the next rows prefetched meanwhile) and multiplies them with every x tile (bf16 dot products, fp32
//   accumulation, 24 accumulators of 16 rows).
// * large M, other dtypes or CPUs: each thread gates its range of W rows panel by panel (about 2 MiB) into
//   its own buffer and hands each panel to the GEMM torch uses (MKL / oneDNN), writing straight into a
//   column slice of y. bf16 runs a bf16 GEMM where the CPU has AVX512_BF16 (gamma * w rounded to bf16).
// gamma = 0 removes the pruned bf16 weights with a zeroing move (exact zeros, as the Triton kernels do; the
// fp32-lane kernels multiply by gamma).
//
// ISA: AVX-512, AVX2 or portable, picked per call by persona_kernels::cpu_isa() (which honours
// PERSONA_KERNELS_CPU_ISA). Functions are compiled for each ISA with GCC target attributes, so the
// file builds without -march. Environment knobs for tests and tuning: PERSONA_KERNELS_CPU_NO_BF16DOT=1
// disables the AVX512_BF16 kernels (small M and our GEMM), PERSONA_KERNELS_GATED_LINEAR_GEMM_M sets the row count
// from which the GEMM path is used, PERSONA_KERNELS_GATED_LINEAR_PANEL the panel rows.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <utility>
#include <atomic>
#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define PK_X86 1
#define PK_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
#define PK_TARGET_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c,bmi2")))
#define PK_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define PK_X86 0
#endif

#include "common.h"
#include "transpose_avx512.h"

namespace persona_kernels {
namespace {

using at::BFloat16;
using at::Half;

// Rows of x at or above which the GEMM path is used. Measured on an AVX-512 AMD EPYC: the fp32 block kernels
// beat MKL's sgemm up to about 192 rows (1 thread); for bf16 with AVX512_BF16 our own GEMM (32-row tiles)
// matches the block kernels at 32 rows and beats them above (1 and 2 threads, 1024x4096 and 4096x4096).
// Overridable with PERSONA_KERNELS_GATED_LINEAR_GEMM_M.
constexpr int64_t kGemmMinRowsF32 = 128;
constexpr int64_t kGemmMinRowsBf16 = 32;
// Panel of gated weights handed to one GEMM call (per thread): about 2 MiB, so it stays in cache.
constexpr int64_t kPanelBytes = int64_t{2} << 20;

int64_t gemm_min_rows(bool bf16_dot) {
  const char* env = std::getenv("PERSONA_KERNELS_GATED_LINEAR_GEMM_M");
  if (env != nullptr && *env != '\0') return std::max<int64_t>(1, std::atoll(env));
  return bf16_dot ? kGemmMinRowsBf16 : kGemmMinRowsF32;
}

int64_t panel_rows(int64_t K, int64_t elem) {
  const char* env = std::getenv("PERSONA_KERNELS_GATED_LINEAR_PANEL");
  if (env != nullptr && *env != '\0') return std::max<int64_t>(1, std::atoll(env));
  return std::max<int64_t>(16, kPanelBytes / (std::max<int64_t>(K, 1) * elem) / 16 * 16);
}

bool cpu_has_avx512bf16() {
#if PK_X86
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

bool bf16_dot_enabled() {
  const char* env = std::getenv("PERSONA_KERNELS_CPU_NO_BF16DOT");
  return cpu_has_avx512bf16() && !(env != nullptr && std::strcmp(env, "1") == 0);
}

inline float bf16_bits_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T>
inline float to_float(T v) {
  return static_cast<float>(v);
}
template <>
inline float to_float<BFloat16>(BFloat16 v) {
  return bf16_bits_to_float(v.x);
}

inline bool bit_of(const uint32_t* row_bits, int64_t k) { return (row_bits[k >> 5] >> (k & 31)) & 1u; }

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
      const float wk = to_float(w[r * ldw + k]);
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
// ---- AVX-512: 16 fp32 lanes per vector, one __mmask16 per half mask word ----
// Lanes outside `lanes` read as zero (only the row tail uses a partial mask).
template <typename WT>
PK_TARGET_AVX512 inline __m512 load16_avx512(const WT* p, __mmask16 lanes);
template <>
PK_TARGET_AVX512 inline __m512 load16_avx512<float>(const float* p, __mmask16 lanes) {
  return lanes == 0xFFFF ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(lanes, p);
}
template <>
PK_TARGET_AVX512 inline __m512 load16_avx512<Half>(const Half* p, __mmask16 lanes) {
  const __m256i h = lanes == 0xFFFF ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                    : _mm256_maskz_loadu_epi16(lanes, p);
  return _mm512_cvtph_ps(h);
}
template <>
PK_TARGET_AVX512 inline __m512 load16_avx512<BFloat16>(const BFloat16* p, __mmask16 lanes) {
  const __m256i h = lanes == 0xFFFF ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                    : _mm256_maskz_loadu_epi16(lanes, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Keeps the compiler from folding a following mask operation into the load: masked loads with
// data-dependent masks are much slower than a plain load plus a register blend on AMD Zen.
#ifndef PK_PF_HINT
#define PK_PF_HINT _MM_HINT_T0
#endif
#define PK_OPAQUE(v) __asm__("" : "+v"(v))

// Gated 16-lane weight vector w * G (lanes outside `valid` are zero). Pruned lanes are multiplied
// by gamma even when it is 0, exactly like the reference W * G (a zeroing blend is no faster here).
template <typename WT>
PK_TARGET_AVX512 inline __m512 gated16_avx512(const WT* p, __mmask16 keep, __mmask16 valid, __m512 g) {
  __m512 v = load16_avx512<WT>(p, valid);
  PK_OPAQUE(v);
  return _mm512_mask_mul_ps(v, static_cast<__mmask16>(~keep), v, g);
}

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

// ---- AVX512_BF16: 32 bf16 lanes per vector, one __mmask32 per mask word; x stays bf16 ----
// Loads 32 bf16 lanes (lanes outside `valid` read as zero).
PK_TARGET_AVX512 inline __m512i load32_bf16(const BFloat16* p, __mmask32 valid) {
  return valid == ~0u ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16(valid, p);
}

PK_TARGET_AVX512BF16 inline __m512i gated32_bf16(const BFloat16* p, __mmask32 keep, __mmask32 valid, __m512 g) {
  // 32 bf16 lanes -> two fp32 halves, pruned lanes times gamma, rounded back to bf16 (exact for
  // gamma 0 and 1; gamma = 0 takes the cheaper zeroing move of gate32_mode instead).
  __m512i v = load32_bf16(p, valid);
  PK_OPAQUE(v);
  __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)), 16));
  __m512 hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)), 16));
  const __mmask32 drop = ~keep;
  lo = _mm512_mask_mul_ps(lo, static_cast<__mmask16>(drop), lo, g);
  hi = _mm512_mask_mul_ps(hi, static_cast<__mmask16>(drop >> 16), hi, g);
  return (__m512i)(_mm512_cvtne2ps_pbh(hi, lo));
}

// Gating of the bf16-dot kernel: Mul scales the pruned lanes by gamma in fp32 (any gamma), Zero clears
// them (gamma = 0, one 16-bit zeroing move), None reads already gated weights. Split scales like Mul but
// leaves each 32-column block in "split" order, the 16 even columns then the 16 odd ones: the even / odd
// bf16 of a dword become fp32 with one shift / one AND (no lane widening), and one conversion packs them
// back. A dot product is the same sum in any column order, so split weights are used with x rows
// permuted the same way (split_rows) and padded to whole blocks. Store additionally writes each gated
// vector to `st`, so later passes over the block can run with None (| SplitLayout for split blocks).
enum GateMode : int { kGateNone = 0, kGateMul = 1, kGateZero = 2, kGateSplit = 3, kGateStore = 4, kSplitLayout = 8 };

constexpr bool split_layout(int mode) { return (mode & 3) == kGateSplit || (mode & kSplitLayout) != 0; }

template <int Mode>
PK_TARGET_AVX512BF16 inline __m512i gate32_mode(const BFloat16* p, uint32_t keep, __mmask32 valid, __m512 g) {
  if constexpr ((Mode & 3) == kGateMul) {
    return gated32_bf16(p, keep, valid, g);
  } else if constexpr ((Mode & 3) == kGateSplit) {
    __m512i v = load32_bf16(p, valid);
    PK_OPAQUE(v);
    __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
    even = _mm512_mask_mul_ps(even, static_cast<__mmask16>(~_pext_u32(keep, 0x55555555u)), even, g);
    odd = _mm512_mask_mul_ps(odd, static_cast<__mmask16>(~_pext_u32(keep, 0xAAAAAAAAu)), odd, g);
    return (__m512i)(_mm512_cvtne2ps_pbh(odd, even));
  } else if constexpr ((Mode & 3) == kGateZero) {
    __m512i v = load32_bf16(p, valid);
    PK_OPAQUE(v);
    return _mm512_maskz_mov_epi16(static_cast<__mmask32>(keep), v);
  } else {
    return load32_bf16(p, valid);
  }
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

// ---- AVX2: 8 fp32 lanes; 8 mask bits expanded to a lane mask with a compare ----
template <typename WT>
PK_TARGET_AVX2 inline __m256 load8_avx2(const WT* p);
template <>
PK_TARGET_AVX2 inline __m256 load8_avx2<float>(const float* p) {
  return _mm256_loadu_ps(p);
}
template <>
PK_TARGET_AVX2 inline __m256 load8_avx2<Half>(const Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
template <>
PK_TARGET_AVX2 inline __m256 load8_avx2<BFloat16>(const BFloat16* p) {
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
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
      const __m256 v = load8_avx2<WT>(w + r * ldw + k);
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
        const float wk = to_float(w[r * ldw + k]);
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

// Runs body(i0, i1) over [0, n) in pieces claimed from a shared counter by the threads of one
// parallel region of torch's intra-op pool (the threads F.linear and every other op use, so they are
// awake and spinning when a model calls us between its other ops). Claiming dynamically keeps both
// threads busy to the end even when one of them starts late or runs slower. Pieces shrink as the work
// runs out ("guided"): each claim takes 1 / (2 * workers) of what is left, a multiple of `chunk` and at
// least `chunk`, so the threads finish within about one `chunk` of each other. Fixed claims (4 blocks of
// 12 rows in our bf16 GEMM) ran 2-thread cells 3-7 % slower in in-process A/Bs (bf16 and fp32, M = 1-128).
template <typename F>
void run_chunks(int64_t n, int64_t chunk, const F& body) {
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), (n + chunk - 1) / chunk);
  if (workers <= 1 || at::in_parallel_region()) {
    body(0, n);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    int64_t i0 = next.load(std::memory_order_relaxed);
    while (i0 < n) {
      const int64_t take = std::max<int64_t>(1, (n - i0) / (chunk * 2 * workers)) * chunk;
      if (!next.compare_exchange_weak(i0, i0 + take, std::memory_order_relaxed)) continue;  // i0 reloaded
      body(i0, std::min(n, i0 + take));
      i0 = next.load(std::memory_order_relaxed);
    }
  });
}

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
// The split order of a 32-column block (see GateMode): lane j holds column 2j (j < 16) or 2(j - 16) + 1.
PK_TARGET_AVX512 inline __m512i split_block(__m512i v) {
  alignas(64) static const uint16_t order[32] = {0,  2,  4,  6,  8,  10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30,
                                                 1,  3,  5,  7,  9,  11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
  return _mm512_permutexvar_epi16(_mm512_load_si512(order), v);
}

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

// ----------------------------------------------------------------------------------------------
// Panel gating for the GEMM path: rows [0, rows) of W (and their bits) -> gated rows in `out`
// (row stride K) as fp32, or as bf16 when the GEMM runs in bf16 (gamma * w then rounds to bf16).
// ----------------------------------------------------------------------------------------------
template <typename WT>
void gate_f32_portable(const WT* w, const uint32_t* bits, int64_t rows, int64_t K, int64_t words, float gamma,
                       float* out) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < K; ++k) {
      const float v = to_float(w[r * K + k]);
      out[r * K + k] = bit_of(bits + r * words, k) ? v : v * gamma;
    }
}

void gate_bf16_portable(const BFloat16* w, const uint32_t* bits, int64_t rows, int64_t K, int64_t words, float gamma,
                        BFloat16* out) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < K; ++k) {
      const BFloat16 v = w[r * K + k];
      out[r * K + k] = bit_of(bits + r * words, k) ? v : BFloat16(to_float(v) * gamma);
    }
}

#if PK_X86
template <typename WT>
PK_TARGET_AVX512 void gate_f32_avx512(const WT* w, const uint32_t* bits, int64_t rows, int64_t K, int64_t words,
                                      float gamma, float* out) {
  const __m512 g = _mm512_set1_ps(gamma);
  for (int64_t r = 0; r < rows; ++r) {
    const WT* wr = w + r * K;
    const uint32_t* br = bits + r * words;
    float* o = out + r * K;
    // Full vectors with plain stores (masked stores are slow on AMD Zen 4), then the masked tail.
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      const __mmask16 keep = static_cast<__mmask16>(br[k >> 5] >> (k & 16));
      _mm512_storeu_ps(o + k, gated16_avx512<WT>(wr + k, keep, static_cast<__mmask16>(0xFFFF), g));
    }
    if (k < K) {
      const __mmask16 valid = static_cast<__mmask16>((1u << (K - k)) - 1u);
      const __mmask16 keep = static_cast<__mmask16>(br[k >> 5] >> (k & 16));
      _mm512_mask_storeu_ps(o + k, valid, gated16_avx512<WT>(wr + k, keep, valid, g));
    }
  }
}

// Gates `rows` weight rows (row stride K) into `out` (row stride ldo >= K). With ldo >= K rounded up to 32 the
// last block is written whole (zeros past K), as our GEMM reads it; Split needs that.
template <int Mode>
PK_TARGET_AVX512BF16 void gate_rows_ld(const BFloat16* w, const uint32_t* bits, int64_t rows, int64_t K, int64_t words,
                                       float gamma, BFloat16* out, int64_t ldo) {
  const __m512 g = _mm512_set1_ps(gamma);
  const bool whole = ldo >= (K + 31) / 32 * 32;
  for (int64_t r = 0; r < rows; ++r) {
    const BFloat16* wr = w + r * K;
    const uint32_t* br = bits + r * words;
    BFloat16* o = out + r * ldo;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) _mm512_storeu_si512(o + k, gate32_mode<Mode>(wr + k, br[k >> 5], ~0u, g));
    if (k < K) {
      const __mmask32 valid = static_cast<__mmask32>((1ull << (K - k)) - 1u);
      const __m512i v = gate32_mode<Mode>(wr + k, br[k >> 5], valid, g);
      if (whole) _mm512_storeu_si512(o + k, v);
      else _mm512_mask_storeu_epi16(o + k, valid, v);
    }
  }
}

template <typename WT>
PK_TARGET_AVX2 void gate_f32_avx2(const WT* w, const uint32_t* bits, int64_t rows, int64_t K, int64_t words,
                                  float gamma, float* out) {
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256 g = _mm256_set1_ps(gamma);
  const __m256 one = _mm256_set1_ps(1.0f);
  const int64_t kv = K & ~int64_t{7};
  for (int64_t r = 0; r < rows; ++r) {
    const WT* wr = w + r * K;
    const uint32_t* br = bits + r * words;
    float* o = out + r * K;
    for (int64_t k = 0; k < kv; k += 8) {
      const int b8 = static_cast<int>((br[k >> 5] >> (k & 31)) & 0xFFu);
      const __m256 keep =
          _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(b8), lane_bit), lane_bit));
      _mm256_storeu_ps(o + k, _mm256_mul_ps(load8_avx2<WT>(wr + k), _mm256_blendv_ps(g, one, keep)));
    }
    for (int64_t k = kv; k < K; ++k) {
      const float v = to_float(wr[k]);
      o[k] = bit_of(br, k) ? v : v * gamma;
    }
  }
}
#endif  // PK_X86

template <typename WT>
void gate_rows_f32(Isa isa, const WT* w, const uint32_t* bits, int64_t rows, int64_t K, int64_t words, float gamma,
                   float* out) {
#if PK_X86
  if (isa == Isa::Avx512) return gate_f32_avx512<WT>(w, bits, rows, K, words, gamma, out);
  if (isa == Isa::Avx2) return gate_f32_avx2<WT>(w, bits, rows, K, words, gamma, out);
#endif
  gate_f32_portable<WT>(w, bits, rows, K, words, gamma, out);
}

void gate_rows_bf16(bool vector, const BFloat16* w, const uint32_t* bits, int64_t rows, int64_t K, int64_t words,
                    float gamma, BFloat16* out) {
#if PK_X86
  if (vector) return gate_rows_ld<kGateMul>(w, bits, rows, K, words, gamma, out, K);
#endif
  gate_bf16_portable(w, bits, rows, K, words, gamma, out);
}

#if PK_X86
// ---- bf16 GEMM of our own (AVX512_BF16): gating fused into the only pass that prepares W ----
// x is packed once per call into tiles of 32 rows in column-pair order; each thread gates 12 weight rows at a
// time into scratch (natural layout) and runs the 32 x 12 tile kernel over every x tile, broadcasting one
// gated (w[n, 2p], w[n, 2p+1]) pair per row against 32 rows' x pairs: 24 accumulators of 16 rows each.
constexpr int kTileM = 32;
constexpr int kTileN = 12;

// x [M, K] (row stride ldx) -> xp: tile t, column pair p (of KB = K rounded up to 32, halved) holds rows
// t*32 .. t*32+31 as dwords (x[m, 2p] | x[m, 2p+1] << 16) at xp[(t * KB + p) * 32 + i], each 32-column block in
// split order when `split` (see GateMode); rows beyond M and columns beyond K are 0. Column pairs [p0, p1), both
// multiples of 16 (threads packing disjoint pair ranges write disjoint cache lines).
PK_TARGET_AVX512 void pack_x_pairs(const BFloat16* x, int64_t ldx, int64_t M, int64_t K, uint32_t* xp, int64_t p0,
                                   int64_t p1, bool split) {
  const int64_t KB = (K + 31) / 32 * 16, T = (M + kTileM - 1) / kTileM;
  for (int64_t t = 0; t < T; ++t) {
    uint32_t* tile = xp + t * KB * kTileM;
    // 16 rows x 16 column pairs (one 32-column block) at a time through a register transpose
    for (int h = 0; h < kTileM; h += 16) {
      const BFloat16* src[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t m = t * kTileM + h + i;
        src[i] = m < M ? x + m * ldx : nullptr;
      }
      for (int64_t p = p0; p < p1; p += 16) {
        const __mmask32 valid = K - 2 * p >= 32 ? ~0u : static_cast<__mmask32>((1ull << (K - 2 * p)) - 1u);
        __m512i r[16];
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) {
          r[i] = src[i] ? _mm512_maskz_loadu_epi16(valid, src[i] + 2 * p) : _mm512_setzero_si512();
          if (split) r[i] = split_block(r[i]);
        }
        transpose16_dwords(r);
#pragma GCC unroll 16
        for (int c = 0; c < 16; ++c) _mm512_storeu_si512(tile + (p + c) * kTileM + h, r[c]);
      }
    }
  }
}

// One tile: rows 32t .. 32t+31 of x against NR gated rows (row stride ldg dwords). Writes
// stage[r * 32 + i] = bf16(sum_p x pair p of row 32t + i . w[r] pair p + bias[r]). Meanwhile prefetches the first
// pf_lines cache lines from pf into L2 (the weight rows the thread gates next), one per column pair.
template <int NR>
PK_TARGET_AVX512BF16 void tile_bf16(const uint32_t* xp, const uint32_t* wg, int64_t ldg, int64_t KP, const float* bias,
                                    uint16_t* stage, const char* pf, int64_t pf_lines) {
  __m512 acc[NR][2];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < KP; ++p) {
    if (p < pf_lines) _mm_prefetch(pf + p * 64, _MM_HINT_T1);
    const __m512i x0 = _mm512_loadu_si512(xp + p * kTileM), x1 = _mm512_loadu_si512(xp + p * kTileM + 16);
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      const __m512i wv = _mm512_set1_epi32(static_cast<int>(wg[r * ldg + p]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], (__m512bh)x0, (__m512bh)wv);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], (__m512bh)x1, (__m512bh)wv);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) {
    const __m512 b = _mm512_set1_ps(bias ? bias[r] : 0.0f);
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_add_ps(acc[r][1], b), _mm512_add_ps(acc[r][0], b));
    _mm512_storeu_si512(stage + r * kTileM, (__m512i)v);
  }
}

using TileFn = void (*)(const uint32_t*, const uint32_t*, int64_t, int64_t, const float*, uint16_t*, const char*,
                        int64_t);
template <int... R>
constexpr std::array<TileFn, sizeof...(R)> tile_table(std::integer_sequence<int, R...>) {
  return {&tile_bf16<R + 1>...};
}

torch::Tensor gated_linear_own_bf16(const torch::Tensor& x, const torch::Tensor& weight, const uint32_t* bits,
                                    const float* bias, float gamma) {
  const int64_t M = x.size(0), N = weight.size(0), K = weight.size(1), words = packed_words(K);
  const int64_t KB = (K + 31) / 32 * 16, T = (M + kTileM - 1) / kTileM;  // column pairs, whole blocks
  const bool split = gamma != 0.0f;  // gamma = 0: zeroing move, natural order; else split order (see GateMode)
  torch::Tensor xp = torch::empty({T * KB * kTileM}, x.options().dtype(torch::kInt32));
  uint32_t* xpp = reinterpret_cast<uint32_t*>(xp.data_ptr<int32_t>());
  const BFloat16* xb = x.data_ptr<BFloat16>();
  run_chunks(KB, std::max<int64_t>(64, KB / (2 * at::get_num_threads())) / 16 * 16,
             [&](int64_t p0, int64_t p1) { pack_x_pairs(xb, x.stride(0), M, K, xpp, p0, p1, split); });
  torch::Tensor y = torch::empty({M, N}, x.options());
  BFloat16* yp = y.data_ptr<BFloat16>();
  const BFloat16* w = weight.data_ptr<BFloat16>();
  const int64_t ldg = unaliased_stride(KB, 4);  // dwords per gated row
  static constexpr auto tiles = tile_table(std::make_integer_sequence<int, kTileN>{});
  const int64_t nblocks = (N + kTileN - 1) / kTileN;
  run_chunks(nblocks, 1, [&](int64_t b0, int64_t b1) {
    uint32_t* wg = static_cast<uint32_t*>(thread_scratch(ScratchSlot::GatedBlock, kTileN * ldg * 4));
    alignas(64) uint16_t stage[kTileN * kTileM];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kTileN;
      const int rows = static_cast<int>(std::min<int64_t>(kTileN, N - n0));
      BFloat16* wgb = reinterpret_cast<BFloat16*>(wg);
      if (split) gate_rows_ld<kGateSplit>(w + n0 * K, bits + n0 * words, rows, K, words, gamma, wgb, 2 * ldg);
      else gate_rows_ld<kGateZero>(w + n0 * K, bits + n0 * words, rows, K, words, gamma, wgb, 2 * ldg);
      for (int64_t t = 0; t < T; ++t) {
        // the first tile prefetches the next block's weight rows (contiguous in W)
        const int64_t next = std::min<int64_t>(kTileN, N - n0 - rows);
        const int64_t lines = t == 0 && b + 1 < b1 && next > 0 ? next * K * 2 / 64 : 0;
        tiles[rows - 1](xpp + t * KB * kTileM, wg, ldg, KB, bias ? bias + n0 : nullptr, stage,
                        reinterpret_cast<const char*>(w + (n0 + rows) * K), lines);
        const int mrows = static_cast<int>(std::min<int64_t>(kTileM, M - t * kTileM));
        for (int i = 0; i < mrows; ++i) {
          uint16_t* yr = reinterpret_cast<uint16_t*>(yp + (t * kTileM + i) * N + n0);
          for (int r = 0; r < rows; ++r) yr[r] = stage[r * kTileM + i];
        }
      }
    }
  });
  return y;
}
#endif  // PK_X86

// Large M: the threads of one parallel region claim panels of W rows one at a time, gate each into
// their own buffer and multiply it with the GEMM torch uses (inside the parallel region MKL / oneDNN
// run single-threaded), writing straight into the panel's column slice of y. One parallel region
// per call keeps the synchronisation cost low on a busy machine.
torch::Tensor gated_linear_gemm(const torch::Tensor& x, const torch::Tensor& weight, const uint32_t* bits,
                                const c10::optional<torch::Tensor>& bias, float gamma, Isa isa, bool bf16_gemm) {
  const int64_t M = x.size(0), N = weight.size(0), K = weight.size(1), words = packed_words(K);
  const auto wtype = weight.scalar_type();
  const auto gtype = bf16_gemm ? torch::kBFloat16 : torch::kFloat;
  const torch::Tensor xg = x.to(gtype);
  torch::Tensor y = torch::empty({M, N}, x.options().dtype(gtype));
  const c10::optional<torch::Tensor> bg = bias.has_value() ? c10::optional<torch::Tensor>(bias->to(gtype)) : bias;
  const int64_t P = std::min<int64_t>(panel_rows(K, bf16_gemm ? 2 : 4), N);
  const int64_t panels = (N + P - 1) / P;
  run_chunks(panels, 1, [&](int64_t p0, int64_t p1) {
    // this thread's gated panel, reused across calls
    void* scratch = thread_scratch(ScratchSlot::GatedPanel, static_cast<size_t>(P * K) * (bf16_gemm ? 2 : 4));
    const torch::Tensor panel =
        torch::from_blob(scratch, {P * K}, torch::TensorOptions().dtype(gtype).device(torch::kCPU));
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * P, np = std::min<int64_t>(P, N - n0);
      const uint32_t* b = bits + n0 * words;
      if (bf16_gemm) {
        gate_rows_bf16(isa == Isa::Avx512, weight.data_ptr<BFloat16>() + n0 * K, b, np, K, words, gamma,
                       panel.data_ptr<BFloat16>());
      } else if (wtype == torch::kFloat) {
        gate_rows_f32(isa, weight.data_ptr<float>() + n0 * K, b, np, K, words, gamma, panel.data_ptr<float>());
      } else if (wtype == torch::kHalf) {
        gate_rows_f32(isa, weight.data_ptr<Half>() + n0 * K, b, np, K, words, gamma, panel.data_ptr<float>());
      } else {
        gate_rows_f32(isa, weight.data_ptr<BFloat16>() + n0 * K, b, np, K, words, gamma, panel.data_ptr<float>());
      }
      const torch::Tensor wp = panel.narrow(0, 0, np * K).view({np, K});
      torch::Tensor yp = y.narrow(1, n0, np);
      if (bg.has_value()) {
        at::addmm_out(yp, bg->narrow(0, n0, np), xg, wp.t());
      } else {
        at::mm_out(yp, xg, wp.t());
      }
    }
  });
  return y.scalar_type() == wtype ? y : y.to(wtype);
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
