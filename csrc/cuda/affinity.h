// Launchers of the CUDA pairwise-affinity chunk kernels (csrc/cuda/affinity.cu); torch-free.
#pragma once

#include <cuda_runtime.h>

#include "../common/affinity.h"

namespace kdfast::cuda {

// Each returns the launch status (cudaGetLastError) for the binding to check.
cudaError_t affinity_stage(const AffinityChunk& p, cudaStream_t stream);
cudaError_t affinity_grad(const AffinityChunk& p, cudaStream_t stream);

}  // namespace kdfast::cuda
