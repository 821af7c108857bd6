#include "svd.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/dispatch.h"

namespace kdfast {

std::tuple<at::Tensor, at::Tensor, at::Tensor> batched_svd(const at::Tensor& a, const SvdLauncher& launch) {
  TORCH_CHECK_VALUE(a.dim() == 3, "kdfast: batched_svd takes (batch, m, n) matrices, got ", a.sizes());
  TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble,
                   "kdfast: batched_svd computes in float32 or float64, got ", a.scalar_type());
  const int64_t batch = a.size(0), m = a.size(1), n = a.size(2), k = std::min(m, n);
  TORCH_CHECK_VALUE(k <= kSvdMaxCols, "kdfast: batched_svd takes min(m, n) <= ", kSvdMaxCols, ", got ", k);
  at::Tensor u = at::empty({batch, m, k}, a.options());
  at::Tensor s = at::empty({batch, k}, a.options());
  at::Tensor vh = at::empty({batch, k, n}, a.options());
  if (batch > 0 && k > 0) {
    SvdProblem p{};
    p.a = a.data_ptr();  // read through its strides: a transposed or sliced view needs no copy
    p.batch = batch;
    p.m = m;
    p.n = n;
    for (int d = 0; d < 3; ++d) p.a_stride[d] = a.stride(d);
    p.dtype = a.scalar_type() == at::kDouble ? DType::Float64 : DType::Float32;
    p.u = u.data_ptr();
    p.s = s.data_ptr();
    p.vh = vh.data_ptr();
    launch(p);
  }
  return {u, s, vh};
}

TORCH_LIBRARY_FRAGMENT(kdfast, m) {
  // Reduced SVD of each (m, n) matrix of a (batch, m, n) float32/float64 tensor, min(m, n) <= kSvdMaxCols, by
  // one-sided Jacobi: U (batch, m, k), S (batch, k) descending, Vh (batch, k, n), k = min(m, n). Its backward is
  // written with torch ops in kdfast/manifold.py.
  m.def("batched_svd(Tensor a) -> (Tensor U, Tensor S, Tensor Vh)");
}

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("batched_svd", [](const at::Tensor& a) { return batched_svd(a, cpu::svd_forward); });
}

}  // namespace kdfast
