// Device-independent part of the topk_kd_fwd / topk_kd_bwd ops: checks the tensors, allocates the outputs, fills a
// TopKProblem and hands it to a device's launcher (the CPU kernels or the CUDA binding).
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <optional>
#include <string>
#include <tuple>

#include "common/topk_kd.h"

namespace kdfast {

using TopKLauncher = std::function<void(const TopKProblem&)>;

std::tuple<at::Tensor, at::Tensor> topk_kd_fwd(const at::Tensor& student, const at::Tensor& indices,
                                               const at::Tensor& logprobs, double temperature,
                                               const std::string& tail, const std::string& divergence, double beta,
                                               const std::optional<at::Tensor>& weights,
                                               const TopKLauncher& launch);

at::Tensor topk_kd_bwd(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& indices,
                       const at::Tensor& logprobs, const at::Tensor& stats, double temperature,
                       const std::string& tail, const std::string& divergence, double beta,
                       const std::optional<at::Tensor>& weights, const TopKLauncher& launch);

}  // namespace kdfast
