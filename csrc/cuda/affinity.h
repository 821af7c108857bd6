// Launchers of the CUDA pairwise-affinity chunk kernels (csrc/cuda/affinity.cu); torch-free.
#pragma once

#include <cuda_runtime.h>

#include "../common/affinity.h"

namespace kdfast::cuda {

void affinity_stage(const AffinityChunk& p, cudaStream_t stream);
void affinity_grad(const AffinityChunk& p, cudaStream_t stream);

}  // namespace kdfast::cuda
