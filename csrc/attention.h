// Device-independent part of the attention_fwd / attention_bwd ops: checks the feature maps, allocates the
// outputs, fills one AttentionProblem covering every feature map of the call and hands it to a device's launcher
// (the CPU kernels or the CUDA binding).
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <string>
#include <tuple>
#include <vector>

#include "common/attention.h"

namespace kdfast {

using AttentionLauncher = std::function<void(const AttentionProblem&)>;

// maps: one (batch, positions) map per feature (float32, float64 for a call with a float64 feature);
// norms: (features, batch) norms before normalisation; argmax: one int32 (batch, positions) per feature for
// max pooling, else empty.
std::tuple<std::vector<at::Tensor>, at::Tensor, std::vector<at::Tensor>> attention_fwd(
    at::TensorList features, double p, const std::string& pool, bool normalize, const AttentionLauncher& launch);

// One gradient per feature (empty where needs_grad is false).
std::vector<at::Tensor> attention_bwd(at::TensorList grad_maps, at::TensorList features, at::TensorList maps,
                                      const at::Tensor& norms, at::TensorList argmax, double p,
                                      const std::string& pool, bool normalize, const std::vector<bool>& needs_grad,
                                      const AttentionLauncher& launch);

}  // namespace kdfast
