// CUDA registration of the kd ops (kd_fwd / kd_partial_fwd / kd_bwd, kd_reduce_fwd / kd_reduce_bwd): the device-independent op
// code (csrc/kd_div.cpp) with the CUDA launchers on the current stream. Compiled only in CUDA builds.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../kd_div.h"
#include "binding_utils.h"
#include "kd_div.h"

namespace kdfast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd(const at::Tensor& s, const at::Tensor& t,
                                                   const std::optional<at::Tensor>& y, double T, c10::string_view d,
                                                   double beta, int64_t ignore) {
  const c10::cuda::CUDAGuard guard(s.device());
  return kd_fwd(s, t, y, T, std::string(d), beta, ignore, on_stream(cuda::kd_forward, "kd"));
}

std::tuple<at::Tensor, at::Tensor> partial_fwd(const at::Tensor& s, const at::Tensor& t, const at::Tensor& lse,
                                               double T, c10::string_view d, double beta) {
  const c10::cuda::CUDAGuard guard(s.device());
  return kd_partial_fwd(s, t, lse, T, std::string(d), beta, on_stream(cuda::kd_forward, "kd"));
}

std::tuple<at::Tensor, at::Tensor> bwd(const at::Tensor& gd, const std::optional<at::Tensor>& gc, const at::Tensor& s,
                                       const at::Tensor& t, const std::optional<at::Tensor>& y,
                                       const at::Tensor& stats, double T, c10::string_view d, double beta,
                                       int64_t ignore, bool sg, bool tg) {
  const c10::cuda::CUDAGuard guard(s.device());
  return kd_bwd(gd, gc, s, t, y, stats, T, std::string(d), beta, ignore, sg, tg,
                on_stream(cuda::kd_backward, "kd"));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> reduce_fwd(const at::Tensor& s, const at::Tensor& t,
                                                          const std::optional<at::Tensor>& y,
                                                          const std::optional<at::Tensor>& mask, int64_t dim, double T,
                                                          c10::string_view d, double beta, int64_t ignore,
                                                          c10::string_view red, double kw, double cw) {
  const c10::cuda::CUDAGuard guard(s.device());
  return kd_reduce_fwd(s, t, y, mask, dim, T, std::string(d), beta, ignore, std::string(red), kw, cw,
                       on_stream(cuda::kd_forward, "kd"));
}

std::tuple<at::Tensor, at::Tensor> reduce_bwd(const at::Tensor& g, const at::Tensor& s, const at::Tensor& t,
                                              const std::optional<at::Tensor>& y,
                                              const std::optional<at::Tensor>& mask, const at::Tensor& stats,
                                              const at::Tensor& count, int64_t dim, double T, c10::string_view d,
                                              double beta, int64_t ignore, c10::string_view red, double kw, double cw,
                                              bool sg, bool tg) {
  const c10::cuda::CUDAGuard guard(s.device());
  return kd_reduce_bwd(g, s, t, y, mask, stats, count, dim, T, std::string(d), beta, ignore, std::string(red), kw, cw,
                       sg, tg, on_stream(cuda::kd_backward, "kd"));
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("kd_fwd", &fwd);
  m.impl("kd_partial_fwd", &partial_fwd);
  m.impl("kd_bwd", &bwd);
  m.impl("kd_reduce_fwd", &reduce_fwd);
  m.impl("kd_reduce_bwd", &reduce_bwd);
}

}  // namespace kdfast
