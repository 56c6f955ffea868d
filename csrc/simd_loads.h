// 8 fp32 lanes loaded from fp32, bf16 or fp16 memory (AVX2 + F16C), shared by the CPU kernels that widen
// their inputs to fp32 (welford_cpu.cpp, the gated linear's AVX2 paths).
#pragma once

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

namespace persona_kernels {

template <typename T>
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8_as_f32(const T* p);

template <>
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8_as_f32<float>(const float* p) {
  return _mm256_loadu_ps(p);
}

template <>
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8_as_f32<at::BFloat16>(const at::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));  // bf16 = the high half of fp32
}

template <>
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8_as_f32<at::Half>(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

}  // namespace persona_kernels
#endif
