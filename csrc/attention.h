// Device-independent part of the attention ops: checks the feature maps, allocates the outputs, fills one
// AttentionProblem covering every feature map of the call and hands it to a device's launcher (the CPU kernels or
// the CUDA binding). `pairs` = 0: plain maps (attention_fwd / attention_bwd); pairs > 0: attention transfer over
// features = the pairs students followed by the pairs teachers (attention_transfer_fwd / _bwd).
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/attention.h"

namespace kdfast {

using AttentionLauncher = std::function<void(const AttentionProblem&)>;

// rows: (pairs, batch) per-sample losses (empty without pairs); maps: one (batch, positions) map per feature
// (float32, float64 for a call with a float64 feature); norms: (features, batch) norms before normalisation;
// argmax: one int32 (batch, positions) per feature for max pooling, else empty.
std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, std::vector<at::Tensor>> attention_forward_op(
    const std::vector<at::Tensor>& features, double p, const std::string& pool, bool normalize, int64_t pairs,
    const AttentionLauncher& launch);

// One gradient per feature (empty where needs_grad is false). The upstream gradient is grad_maps (one per
// feature) without pairs, grad_rows with pairs.
std::vector<at::Tensor> attention_backward_op(at::TensorList grad_maps, const std::optional<at::Tensor>& grad_rows,
                                              const std::vector<at::Tensor>& features, at::TensorList maps,
                                              const at::Tensor& norms, at::TensorList argmax, double p,
                                              const std::string& pool, bool normalize, int64_t pairs,
                                              const std::vector<bool>& needs_grad, const AttentionLauncher& launch);

// student + teacher: the features of a transfer problem (used by the CPU and CUDA registrations).
std::vector<at::Tensor> concat(at::TensorList a, at::TensorList b);

}  // namespace kdfast
