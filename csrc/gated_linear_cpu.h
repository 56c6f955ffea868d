// Internal to the CPU gated linear, shared by gated_linear_cpu.cpp (small-M block kernels, the op) and
// gated_linear_gemm_cpu.cpp (large-M paths): ISA target attributes, loading and gating weight vectors, the
// thread-claiming loop, and the entry points of the large-M paths.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#if !defined(__clang__)
// GCC 12 reports false positives on the deliberately undefined registers inside <immintrin.h> casts.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#define PK_X86 1
#define PK_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
#define PK_TARGET_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c,bmi2")))
#define PK_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define PK_X86 0
#endif

#include "common.h"
#include "simd_loads.h"

namespace persona_kernels {
namespace gated_cpu {

using at::BFloat16;
using at::Half;

inline bool cpu_has_avx512bf16() {
#if PK_X86
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

inline bool bit_of(const uint32_t* row_bits, int64_t k) { return (row_bits[k >> 5] >> (k & 31)) & 1u; }

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
#define PK_OPAQUE(v) __asm__("" : "+v"(v))

// Gated 16-lane weight vector w * G (lanes outside `valid` are zero). Pruned lanes are multiplied
// by gamma even when it is 0, exactly like the reference W * G (a zeroing blend is no faster here).
template <typename WT>
PK_TARGET_AVX512 inline __m512 gated16_avx512(const WT* p, __mmask16 keep, __mmask16 valid, __m512 g) {
  __m512 v = load16_avx512<WT>(p, valid);
  PK_OPAQUE(v);
  return _mm512_mask_mul_ps(v, static_cast<__mmask16>(~keep), v, g);
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

// The split order of a 32-column block (see GateMode): lane j holds column 2j (j < 16) or 2(j - 16) + 1.
PK_TARGET_AVX512 inline __m512i split_block(__m512i v) {
  alignas(64) static const uint16_t order[32] = {0,  2,  4,  6,  8,  10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30,
                                                 1,  3,  5,  7,  9,  11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
  return _mm512_permutexvar_epi16(_mm512_load_si512(order), v);
}

#endif  // PK_X86

// Runs body(i0, i1) over [0, n) in pieces claimed from a shared counter by the threads of one
// parallel region of torch's intra-op pool (the threads F.linear and every other op use, so they are
// awake and spinning when a model calls us between its other ops). Claiming dynamically keeps both
// threads busy to the end even when one of them starts late or runs slower. Pieces shrink as the work
// runs out ("guided"): each claim takes 1 / (2 * workers) of what is left, a multiple of `chunk` and at
// least `chunk`, so the threads finish within about one `chunk` of each other. Fixed claims (4 blocks of
// 12 rows in our bf16 GEMM) ran 2-thread cells 3-7 % slower in in-process A/Bs (bf16 and fp32, M = 1-128).
template <typename F>
inline void run_chunks(int64_t n, int64_t chunk, const F& body) {
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

// gated_linear_gemm_cpu.cpp. Large M: panels of gated W rows handed to the GEMM torch uses (fp32, or bf16 where
// the CPU multiplies bf16 natively), and, on CPUs with AVX512_BF16, the bf16 GEMM of our own. x: contiguous
// [M, K]; bits: the packed mask [N, ceil(K/32)]; bias: nullptr or N floats.
torch::Tensor gated_linear_gemm(const torch::Tensor& x, const torch::Tensor& weight, const uint32_t* bits,
                                const c10::optional<torch::Tensor>& bias, float gamma, Isa isa, bool bf16_gemm);
#if PK_X86
torch::Tensor gated_linear_own_bf16(const torch::Tensor& x, const torch::Tensor& weight, const uint32_t* bits,
                                    const float* bias, float gamma);
#endif

}  // namespace gated_cpu
}  // namespace persona_kernels
