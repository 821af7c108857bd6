// Launchers of the CUDA top-k teacher kernels (csrc/cuda/topk_kd.cu). Torch-free; the binding fills the TopKProblem.
#pragma once

#include <cuda_runtime.h>

#include "../common/topk_kd.h"

namespace kdfast::cuda {

cudaError_t topk_kd_forward(const TopKProblem& p, cudaStream_t stream);
cudaError_t topk_kd_backward(const TopKProblem& p, cudaStream_t stream);

}  // namespace kdfast::cuda
