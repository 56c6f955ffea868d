// Shared helpers for the persona_kernels C++ extension.
//
// Every translation unit registers its own operators into the `persona_kernels_C` library with
// TORCH_LIBRARY_FRAGMENT, so kernels can be added without touching a central binding file.
// Python wraps them (persona_kernels/kernels/cpu.py, cuda.py) behind one dispatch.
#pragma once

#include <torch/extension.h>

#include <cstddef>
#include <cstdint>
#include <utility>

#define PK_CHECK_ARG(cond, name, ...) TORCH_CHECK(cond, "persona_kernels: argument '", name, "': ", __VA_ARGS__)

namespace persona_kernels {

// Number of int32 words per row of a packed mask with `k` input features.
inline int64_t packed_words(int64_t k) { return (k + 31) / 32; }

// A row stride (in elements of `elem` bytes) for K-element rows that is not a multiple of 2 KiB: such strides put
// column k of every row in one or two sets of a 32 KiB 8-way L1 cache, so rows read together evict each other.
inline int64_t unaliased_stride(int64_t K, int64_t elem) { return (K * elem) % 2048 == 0 ? K + 64 / elem : K; }

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

// `bytes` bytes of 64-byte aligned memory owned by the calling thread, one buffer per slot, reused by the
// thread's later calls (a forward's kernel calls then allocate no scratch). module.cpp.
enum class ScratchSlot {
  GatedPanel = 0,
  WelfordChunks = 1,
  BatchPartials = 2,
  MergeNorms = 3,
  GatedBlock = 4,
  GemmPack = 5,
  Count = 6
};
void* thread_scratch(ScratchSlot slot, size_t bytes);

// linear_fp32_cpu.cpp. The weight and bias checks of a linear (weight [N, K] and an optional bias [N] on the
// CPU, x's dtype), with messages naming the argument. fp32 y = x W^T + b with a GEMM of our own (AVX-512):
// whether it applies to these arguments (fp32, >= 32 rows, AVX-512 not capped, PERSONA_KERNELS_CPU_OWN_GEMM
// != 0), the rows of task `task` of `ntasks` (whole 32-row tiles) on the calling thread, and all rows over the
// thread pool. x: row stride ldx; w: contiguous [N, K]; y: contiguous [M, N]; bias: nullptr or N floats.
void check_linear_args(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);
struct LinearFp32Args {
  const float* x;
  int64_t ldx;
  const float* w;
  const float* bias;
  float* y;
  int64_t M, N, K;
};
bool linear_fp32_own_applies(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);
void linear_fp32_task(const LinearFp32Args& a, int64_t task, int64_t ntasks);
void linear_fp32_parallel(const LinearFp32Args& a);
// x, weight, bias contiguous fp32, y [M, N].
LinearFp32Args linear_fp32_args(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                at::Tensor& y);

// welford_cpu.cpp. Per-channel batch partials of a contiguous 2-D CPU x [R, K], written into caller-owned
// buffers: count[K], mean/m2/abs_mean/abs_m2[K] and seq_sumsq[R / seq_len, K] (seq_len > 0); every entry
// is written. `mask`: nullptr or R bools. The arguments must have passed check_linear_with_stats_args.
struct PartialsView {
  int64_t* count;
  float *mean, *m2, *abs_mean, *abs_m2, *seq_sumsq;
};
// `then`: nullptr, or called once per channel range [j0, j1) (together covering [0, K)) as soon as that range's
// partials in `out` are final, possibly from a worker thread of the pass's parallel region: the caller's
// per-channel work (the recorder's merge) then runs in the same parallel region as the pass.
struct ChannelHook {
  void (*fn)(void* ctx, int64_t j0, int64_t j1);
  void* ctx;
};
// `also`: nullptr, or work to run in the pass's parallel region after the statistics: when the pass runs as one
// task per thread of the pool, each task then calls also->fn(also->ctx, task, ntasks) and the function returns
// true; otherwise nothing calls it and the function returns false (the caller then does that work itself).
struct TaskHook {
  void (*fn)(void* ctx, int64_t task, int64_t ntasks);
  void* ctx;
};
bool welford_partials_into(const at::Tensor& x, const bool* mask, int64_t seq_len, const PartialsView& out,
                           const ChannelHook* then = nullptr, const TaskHook* also = nullptr);
// The argument checks of linear_with_stats_cpu (x, weight, bias, row_mask, seq_len), with its messages.
void check_linear_with_stats_args(const at::Tensor& x, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& row_mask,
                                  int64_t seq_len);
// The statistics pass of contiguous x into `out` (with `then`, see welford_partials_into) and y = x W^T + b, for
// arguments that passed check_linear_with_stats_args: with the fp32 GEMM of linear_fp32_cpu.cpp inside the
// pass's parallel region where it applies, else at::linear after the pass.
at::Tensor stats_then_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             const bool* mask, int64_t seq_len, const PartialsView& out, const ChannelHook* then);

// welford_merge_cpu.cpp. linear_with_stats_cpu then the in-place merge into the running state (n, mean, m2,
// nonfinite), in one call: the op linear_stats_merge_cpu_, also bound directly in the Python module
// (module.cpp) for the recorder's eager per-call path, where the dispatcher's boxing showed in profiles.
at::Tensor linear_stats_merge_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias,
                                  const c10::optional<at::Tensor>& row_mask, int64_t seq_len, at::Tensor n,
                                  at::Tensor mean, at::Tensor m2, at::Tensor nonfinite);

}  // namespace persona_kernels
