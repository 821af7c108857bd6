// Shared by the CUDA registrations (csrc/cuda/*_binding.cpp), compiled only in CUDA builds.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/util/Exception.h>

#include <functional>

namespace kdfast {

// The device launcher the op code takes: runs a torch-free kernel launcher on the current stream and turns its
// error into a c10::Error that names the kernel (`what`).
template <class Problem>
std::function<void(const Problem&)> on_stream(cudaError_t (*kernel)(const Problem&, cudaStream_t), const char* what) {
  return [kernel, what](const Problem& p) {
    const cudaError_t err = kernel(p, at::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "kdfast: CUDA ", what, " kernel failed: ", cudaGetErrorString(err));
  };
}

}  // namespace kdfast
