// CUDA registration of pairwise_affinity_fwd / _bwd: the device-independent host code of csrc/affinity.cpp with
// the CUDA chunk kernels on the current stream (the Gram products run on cuBLAS through at::).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../affinity.h"
#include "affinity.h"
#include "binding_utils.h"

namespace kdfast {
namespace {

// Larger chunks than on the CPU (fewer, larger cuBLAS calls); still a small fraction of the graphs' size.
const AffinityKernels& cuda_kernels() {
  static const AffinityKernels k{on_stream(cuda::affinity_stage, "affinity"),
                                 on_stream(cuda::affinity_grad, "affinity"), int64_t(32) << 20, false};
  return k;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("pairwise_affinity_fwd", [](const at::Tensor& s, const at::Tensor& t) {
    const c10::cuda::CUDAGuard guard(s.device());
    return pairwise_affinity_fwd(s, t, cuda_kernels());
  });
  m.impl("pairwise_affinity_bwd", [](const at::Tensor& g, const at::Tensor& s, const at::Tensor& t,
                                     const at::Tensor& gram, bool sg, bool tg) {
    const c10::cuda::CUDAGuard guard(s.device());
    return pairwise_affinity_bwd(g, s, t, gram, sg, tg, cuda_kernels());
  });
}

}  // namespace kdfast
