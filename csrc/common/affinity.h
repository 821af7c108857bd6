// Torch-free description of one chunk of the pairwise-affinity problem, shared by the CPU and CUDA kernels.
//
// The loss never builds the n x n affinity graphs. The nodes of a sample, row-normalised and stacked side by side
// (student channels first, then teacher channels), form K (C = Cs + Ct channels x n nodes); its Gram matrix
// G = K K^T (C x C) holds P = S S^T, R = S T^T and Q = T T^T, and sum_ij (a^s_ij - a^t_ij)^2 = |P|^2 - 2|R|^2 + |Q|^2.
// The host code (csrc/affinity.cpp) walks the nodes in chunks: a kernel stages a chunk of K in float64, BLAS
// accumulates G, and in the backward a kernel applies the normalisation's chain rule to dK = M K.
// These kernels are the two memory-bound passes; the products are left to the device's BLAS.
#pragma once

#include <cstdint>

#include "dtype.h"

namespace kdfast {

// One side (student or teacher): features (B, channels, nodes), contiguous, in `dtype`.
struct AffinitySide {
  const void* x;
  DType dtype;
  int64_t channels;
  int64_t k_offset;  // first row of this side in K
  void* grad;        // backward: the gradient (B, channels, nodes) in `dtype`, or null when not wanted
  int64_t dk_offset; // backward: first row of this side in dK
};

// A chunk: samples [b0, b0 + bb), nodes [i0, i0 + m) of each. Staging buffers are float64, indexed by the chunk.
struct AffinityChunk {
  AffinitySide side[2];  // student, teacher
  int64_t nodes;         // n, per sample
  int64_t b0, bb, i0, m;
  int64_t k_rows;        // rows of K (Cs + Ct)
  int64_t dk_rows;       // rows of dK (the sides whose gradient is wanted)
  double eps;            // the norm clamp, 1e-8
  double* k;             // (bb, k_rows, m): the normalised nodes, written by the stage kernel
  double* norms;         // (bb, 2, m): each node's unclamped norm per side, written by the stage kernel
  const double* dk;      // backward: (bb, dk_rows, m), the gradient with respect to K's rows of the wanted sides
};

// Chain rule of k = x / max(|x|, eps) for one node: dx = (dk - k <k, dk>) / |x| where |x| >= eps (the clamp
// passes the gradient through the norm there), dx = dk / eps below it. NaN norms fall in the first case and
// propagate.
KDFAST_ISA_BEGIN
KDFAST_HD inline double inv_clamped_norm(double norm, double eps) { return 1.0 / (norm < eps ? eps : norm); }
KDFAST_HD inline double projected(double norm, double eps) { return norm < eps ? 0.0 : 1.0; }
KDFAST_ISA_END

}  // namespace kdfast
