// CUDA registration of batched_svd: the device-independent op code (csrc/svd.cpp) with the CUDA launcher on the
// current stream. Compiled only in CUDA builds.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../svd.h"
#include "binding_utils.h"
#include "svd.h"

namespace kdfast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> svd_cuda(const at::Tensor& a) {
  const c10::cuda::CUDAGuard guard(a.device());
  const SvdLauncher launch = on_stream(cuda::svd_forward, "batched_svd");
  return batched_svd(a, [&launch](const SvdProblem& p) {
    const int64_t bytes = cuda::svd_shared_bytes(p);
    int device = 0, limit = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    TORCH_CHECK_VALUE(bytes <= limit, "kdfast: a ", p.m, " x ", p.n, " matrix needs ", bytes,
                      " bytes of shared memory in the CUDA batched_svd kernel; this GPU allows ", limit);
    launch(p);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) { m.impl("batched_svd", &svd_cuda); }

}  // namespace kdfast
