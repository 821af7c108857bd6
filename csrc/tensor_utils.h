// Small helpers shared by the op files: Tensor dtypes to the kernels' torch-free DType.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

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

// at::empty for a large CPU output that is about to be written once: the first touch of fresh memory costs a
// page fault per 4 KiB page (allocating and filling 128 MiB took 39 ms on the 2-core machine, 7.5 ms with huge
// pages), so its 2 MiB-aligned interior is offered to the kernel's transparent huge pages. Elsewhere (other OS,
// CUDA, small tensors, THP off) it is plain at::empty.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const size_t bytes = out.nbytes();
  if (out.is_cpu() && bytes >= 4 * kHuge) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t begin = (p + kHuge - 1) & ~(kHuge - 1), end = (p + bytes) & ~(kHuge - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advice only
  }
#endif
  return out;
}

}  // namespace kdfast
