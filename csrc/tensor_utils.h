// Small helpers shared by the op files: Tensor dtypes to the kernels' torch-free DType.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/dtype.h"

namespace kdfast {

inline DType kernel_dtype(const at::Tensor& x, const char* what) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default: TORCH_CHECK_TYPE(false, "kdfast: ", what, " must be float32, float64, float16 or bfloat16, got ",
                              x.scalar_type());
  }
}

}  // namespace kdfast
