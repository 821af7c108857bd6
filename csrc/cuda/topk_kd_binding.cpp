// CUDA registration of topk_kd_fwd / topk_kd_bwd: the device-independent op code (csrc/topk_kd.cpp) with the CUDA
// launchers on the current stream. Compiled only in CUDA builds.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../topk_kd.h"
#include "topk_kd.h"

namespace kdfast {
namespace {

TopKLauncher on_stream(cudaError_t (*kernel)(const TopKProblem&, cudaStream_t)) {
  return [kernel](const TopKProblem& p) {
    const cudaError_t err = kernel(p, at::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "kdfast: CUDA topk kernel failed: ", cudaGetErrorString(err));
  };
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("topk_kd_fwd", [](const at::Tensor& s, const at::Tensor& i, const at::Tensor& lp, double T,
                           c10::string_view tail, c10::string_view div, double beta,
                           const std::optional<at::Tensor>& w) {
    const c10::cuda::CUDAGuard guard(s.device());
    return topk_kd_fwd(s, i, lp, T, std::string(tail), std::string(div), beta, w,
                       on_stream(cuda::topk_kd_forward));
  });
  m.impl("topk_kd_bwd", [](const at::Tensor& g, const at::Tensor& s, const at::Tensor& i, const at::Tensor& lp,
                           const at::Tensor& stats, double T, c10::string_view tail, c10::string_view div,
                           double beta, const std::optional<at::Tensor>& w) {
    const c10::cuda::CUDAGuard guard(s.device());
    return topk_kd_bwd(g, s, i, lp, stats, T, std::string(tail), std::string(div), beta, w,
                       on_stream(cuda::topk_kd_backward));
  });
}

}  // namespace kdfast
