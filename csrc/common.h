// Shared helpers for the persona_kernels C++ extension.
//
// Every translation unit registers its own operators into the `persona_kernels_C` library with
// TORCH_LIBRARY_FRAGMENT, so kernels can be added without touching a central binding file.
// Python wraps them (persona_kernels/kernels/cpu.py, cuda.py) behind one dispatch.
#pragma once

#include <torch/extension.h>

#include <cstdint>

#define PK_CHECK_ARG(cond, name, ...) TORCH_CHECK(cond, "persona_kernels: argument '", name, "': ", __VA_ARGS__)

namespace persona_kernels {

// Number of int32 words per row of a packed mask with `k` input features.
inline int64_t packed_words(int64_t k) { return (k + 31) / 32; }

// Runtime CPU feature checks (GCC/Clang builtins; false on other compilers/architectures).
inline bool cpu_has_avx2_fma() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

inline bool cpu_has_avx512() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

// PERSONA_KERNELS_CPU_ISA=portable|avx2|avx512 caps the instruction set used (for testing fallbacks).
enum class Isa { Portable = 0, Avx2 = 1, Avx512 = 2 };
Isa cpu_isa();

}  // namespace persona_kernels
