// Device-independent part of the batched_svd op: checks the tensor, allocates the outputs, fills an
// SvdProblem and hands it to a device's launcher (the CPU kernel or the CUDA binding).
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <tuple>

#include "common/svd.h"

namespace kdfast {

using SvdLauncher = std::function<void(const SvdProblem&)>;

std::tuple<at::Tensor, at::Tensor, at::Tensor> batched_svd(const at::Tensor& a, const SvdLauncher& launch);

}  // namespace kdfast
