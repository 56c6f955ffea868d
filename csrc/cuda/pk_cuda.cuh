// Shared device helpers for the persona_kernels CUDA sources (csrc/cuda/*.cu).
//
// Deliberately light: only ATen/c10 headers (no torch/extension.h, no ATen/cuda/CUDAContext.h), so the
// sources compile quickly and against a CPU-only torch's headers (scripts/check_cuda_sources.sh).
// Element types are the CUDA ones (float, __half, __nv_bfloat16); all arithmetic is fp32. The torch
// build defines __CUDA_NO_HALF_CONVERSIONS__ etc., so every conversion below is an explicit intrinsic.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#define PK_CUDA_CHECK_ARG(cond, name, ...) \
  TORCH_CHECK(cond, "persona_kernels: argument '", name, "': ", __VA_ARGS__)

namespace persona_kernels {
namespace cuda {

// ---- element type traits ---------------------------------------------------------------------------------------

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  static constexpr int kVec = 4;  // elements per 16-byte vector
  __device__ __forceinline__ static float to_float(float v) { return v; }
  __device__ __forceinline__ static float from_float(float v) { return v; }
};

template <>
struct Elem<__half> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float to_float(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half from_float(float v) { return __float2half_rn(v); }
};

template <>
struct Elem<__nv_bfloat16> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

// Low / high 16-bit halves of a 32-bit word as fp32 (little endian: element 2i is the low half).
__device__ __forceinline__ float lo_as_float(uint32_t w, const __half*) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
}
__device__ __forceinline__ float hi_as_float(uint32_t w, const __half*) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
}
// bf16 is the upper half of an fp32: widening is a shift, exact.
__device__ __forceinline__ float lo_as_float(uint32_t w, const __nv_bfloat16*) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float hi_as_float(uint32_t w, const __nv_bfloat16*) {
  return __uint_as_float(w & 0xffff0000u);
}

// One 16-byte vector load (read-only path) widened to fp32. `p` must be 16-byte aligned.
__device__ __forceinline__ void load_vec(const float* p, float (&v)[4]) {
  const float4 q = __ldg(reinterpret_cast<const float4*>(p));
  v[0] = q.x;
  v[1] = q.y;
  v[2] = q.z;
  v[3] = q.w;
}

template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&v)[8]) {
  const uint4 q = __ldg(reinterpret_cast<const uint4*>(p));
  const T* tag = nullptr;
  v[0] = lo_as_float(q.x, tag);
  v[1] = hi_as_float(q.x, tag);
  v[2] = lo_as_float(q.y, tag);
  v[3] = hi_as_float(q.y, tag);
  v[4] = lo_as_float(q.z, tag);
  v[5] = hi_as_float(q.z, tag);
  v[6] = lo_as_float(q.w, tag);
  v[7] = hi_as_float(q.w, tag);
}

// Maps an ATen scalar type to the CUDA element type used in the kernels.
template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename T>
inline const typename CudaType<T>::type* cptr(const at::Tensor& t) {
  return reinterpret_cast<const typename CudaType<T>::type*>(t.const_data_ptr<T>());
}
template <typename T>
inline typename CudaType<T>::type* mptr(at::Tensor& t) {
  return reinterpret_cast<typename CudaType<T>::type*>(t.mutable_data_ptr<T>());
}

inline bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Compute capability major of `device` (a cheap attribute query; no host-device synchronisation).
inline int device_cc_major(int device) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major;
}

}  // namespace cuda
}  // namespace persona_kernels
