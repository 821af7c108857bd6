// Launchers of the CUDA kd kernels (csrc/cuda/kd_div.cu). Torch-free; the binding fills the KdProblem.
#pragma once

#include <cuda_runtime.h>

#include "../common/kd_div.h"

namespace kdfast::cuda {

cudaError_t kd_forward(const KdProblem& p, cudaStream_t stream);
cudaError_t kd_backward(const KdProblem& p, cudaStream_t stream);

}  // namespace kdfast::cuda
