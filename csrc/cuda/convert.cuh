// Element conversions between the stored dtypes and the accumulator type, shared by the CUDA kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace kdfast::cuda {

template <class A, class T> __device__ __forceinline__ A to_acc(T x) { return static_cast<A>(x); }
template <> __device__ __forceinline__ float to_acc<float, __half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
// Half-precision inputs with a double accumulator (kd kernels above their precise temperature).
template <> __device__ __forceinline__ double to_acc<double, __half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ double to_acc<double, __nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <class T, class A> __device__ __forceinline__ T from_acc(A x) { return static_cast<T>(x); }
template <> __device__ __forceinline__ __half from_acc<__half, float>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float x) {
  return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_acc<__half, double>(double x) { return __double2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, double>(double x) {
  return __double2bfloat16(x);
}

}  // namespace kdfast::cuda
