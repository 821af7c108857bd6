// CUDA registration of the attention ops: the device-independent op code (csrc/attention.cpp) with the CUDA
// launchers on the current stream. Compiled only in CUDA builds.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../attention.h"
#include "attention.h"
#include "binding_utils.h"

namespace kdfast {
namespace {

std::tuple<std::vector<at::Tensor>, at::Tensor, std::vector<at::Tensor>> fwd(at::TensorList features, double p,
                                                                              c10::string_view pool, bool normalize) {
  const c10::cuda::CUDAGuard guard(features[0].device());
  auto [rows, maps, norms, argmax] = attention_forward_op(features.vec(), p, std::string(pool), normalize, 0,
                                                          on_stream(cuda::attention_forward, "attention"));
  return {maps, norms, argmax};
}

std::vector<at::Tensor> bwd(at::TensorList grad_maps, at::TensorList features, at::TensorList maps,
                            const at::Tensor& norms, at::TensorList argmax, double p, c10::string_view pool,
                            bool normalize, const c10::List<bool>& needs_grad) {
  const c10::cuda::CUDAGuard guard(features[0].device());
  return attention_backward_op(grad_maps, std::nullopt, features.vec(), maps, norms, argmax, p, std::string(pool),
                               normalize, 0, needs_grad.vec(), on_stream(cuda::attention_backward, "attention"));
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, std::vector<at::Tensor>> transfer_fwd(
    at::TensorList student, at::TensorList teacher, double p, c10::string_view pool) {
  const c10::cuda::CUDAGuard guard(student[0].device());
  return attention_forward_op(concat(student, teacher), p, std::string(pool), true,
                              int64_t(student.size()), on_stream(cuda::attention_forward, "attention"));
}

std::vector<at::Tensor> transfer_bwd(const at::Tensor& grad_rows, at::TensorList student, at::TensorList teacher,
                                     at::TensorList maps, const at::Tensor& norms, at::TensorList argmax, double p,
                                     c10::string_view pool, const c10::List<bool>& needs_grad) {
  const c10::cuda::CUDAGuard guard(student[0].device());
  return attention_backward_op({}, grad_rows, concat(student, teacher), maps, norms, argmax, p,
                               std::string(pool), true, int64_t(student.size()), needs_grad.vec(),
                               on_stream(cuda::attention_backward, "attention"));
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("attention_fwd", &fwd);
  m.impl("attention_bwd", &bwd);
  m.impl("attention_transfer_fwd", &transfer_fwd);
  m.impl("attention_transfer_bwd", &transfer_bwd);
}

}  // namespace kdfast
