// Launchers of the CUDA attention kernels (csrc/cuda/attention.cu). Torch-free; the binding fills the
// AttentionProblem.
#pragma once

#include <cuda_runtime.h>

#include "../common/attention.h"

namespace kdfast::cuda {

cudaError_t attention_forward(const AttentionProblem& p, cudaStream_t stream);
cudaError_t attention_backward(const AttentionProblem& p, cudaStream_t stream);

}  // namespace kdfast::cuda
