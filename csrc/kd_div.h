// Device-independent part of the kd ops (the row ops kd_fwd / kd_bwd and the reduced kd_reduce_fwd /
// kd_reduce_bwd): checks the tensors, allocates the outputs, fills a KdProblem and hands it to a device's launcher
// (the CPU kernels or the CUDA binding).
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <optional>
#include <string>
#include <tuple>

#include "common/kd_div.h"

namespace kdfast {

using KdLauncher = std::function<void(const KdProblem&)>;

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_fwd(const at::Tensor& student, const at::Tensor& teacher,
                                                      const std::optional<at::Tensor>& target, double temperature,
                                                      const std::string& divergence, double beta,
                                                      int64_t ignore_index, const KdLauncher& launch);

// jsd's partial sums over these classes with the rows' maxima and log-sums given (given: (4, outer, inner), the
// KdStat planes kMaxStudent .. kLogSumTeacher): div, stats.
std::tuple<at::Tensor, at::Tensor> kd_partial_fwd(const at::Tensor& student, const at::Tensor& teacher,
                                                  const at::Tensor& given, double temperature,
                                                  const std::string& divergence, double beta,
                                                  const KdLauncher& launch);

std::tuple<at::Tensor, at::Tensor> kd_bwd(const at::Tensor& grad_div, const std::optional<at::Tensor>& grad_ce,
                                          const at::Tensor& student, const at::Tensor& teacher,
                                          const std::optional<at::Tensor>& target, const at::Tensor& stats,
                                          double temperature, const std::string& divergence, double beta,
                                          int64_t ignore_index, bool student_grad, bool teacher_grad,
                                          const KdLauncher& launch);

// The reduced ops (schemas in csrc/kd_div.cpp): loss, stats, count; and the logits' gradients.
std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_reduce_fwd(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& target,
    const std::optional<at::Tensor>& mask, int64_t dim, double temperature, const std::string& divergence,
    double beta, int64_t ignore_index, const std::string& reduction, double kd_weight, double ce_weight,
    const KdLauncher& launch);

std::tuple<at::Tensor, at::Tensor> kd_reduce_bwd(
    const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
    const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& mask, const at::Tensor& stats,
    const at::Tensor& count, int64_t dim, double temperature, const std::string& divergence, double beta,
    int64_t ignore_index, const std::string& reduction, double kd_weight, double ce_weight, bool student_grad,
    bool teacher_grad, const KdLauncher& launch);

}  // namespace kdfast
