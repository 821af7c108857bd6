// Kernel launches and grid limits written once for two builds of the same sources: `<<<>>>` under nvcc, and the
// CUDA emulation of the tests (tests/cuda_emulation, docs/cuda-emulation.md) when the .cu files are compiled as
// host C++ with KDFAST_CUDA_EMULATION.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace kdfast::cuda {

#if defined(KDFAST_CUDA_EMULATION)

template <auto Kernel, class... Args>
void launch(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, const Args&... args) {
  ::kdemu::launch<Kernel>(grid, block, smem, stream, args...);
}
// The emulation can lower a launcher's grid limit, so that tests reach grid-stride loops with small inputs.
inline int64_t grid_limit(int64_t blocks) { return ::kdemu::grid_limit(blocks); }
#define KDFAST_DYNAMIC_SHARED(T, name) T* name = ::kdemu::dynamic_shared<T>()

#else

template <auto Kernel, class... Args>
void launch(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, const Args&... args) {
  Kernel<<<grid, block, smem, stream>>>(args...);
}
constexpr int64_t grid_limit(int64_t blocks) { return blocks; }
#define KDFAST_DYNAMIC_SHARED(T, name) extern __shared__ T name[]

#endif

}  // namespace kdfast::cuda
