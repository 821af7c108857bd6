// Device-independent part of the pairwise_affinity_fwd / _bwd ops: checks, the walk over node chunks, and the
// Gram products (at:: BLAS calls on the tensors' device). A device supplies the two chunk kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <tuple>

#include "common/affinity.h"

namespace kdfast {

struct AffinityKernels {
  std::function<void(const AffinityChunk&)> stage;  // fills k and norms of a chunk
  std::function<void(const AffinityChunk&)> grad;   // writes the wanted sides' gradients of a chunk
  int64_t chunk_bytes;                              // size of one float64 staging buffer (K or dK)
  bool parallel_groups;                             // walk sample groups in parallel threads (CPU)
};

// Overrides every device's chunk_bytes (0 restores the defaults): tests reach the multi-chunk walks with small
// inputs through it (kdfast._C.set_affinity_chunk_bytes).
void set_affinity_chunk_bytes(int64_t bytes);

std::tuple<at::Tensor, at::Tensor> pairwise_affinity_fwd(const at::Tensor& student, const at::Tensor& teacher,
                                                         const AffinityKernels& kernels);

std::tuple<at::Tensor, at::Tensor> pairwise_affinity_bwd(const at::Tensor& grad_loss, const at::Tensor& student,
                                                         const at::Tensor& teacher, const at::Tensor& gram,
                                                         bool student_grad, bool teacher_grad,
                                                         const AffinityKernels& kernels);

}  // namespace kdfast
