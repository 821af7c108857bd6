// Launcher of the CUDA batched SVD kernel (csrc/cuda/svd.cu). Torch-free; the binding fills the SvdProblem.
#pragma once

#include <cuda_runtime.h>

#include "../common/svd.h"

namespace kdfast::cuda {

// Shared memory one matrix needs (its tall view, V, two norm arrays, the column order); the caller keeps
// it within the device's per-block limit (kdfast/manifold.py falls back to torch.linalg.svd beyond 96 KiB).
int64_t svd_shared_bytes(const SvdProblem& p);
cudaError_t svd_forward(const SvdProblem& p, cudaStream_t stream);

}  // namespace kdfast::cuda
