#include "kd_div.h"

#include <ATen/ATen.h>

#include <array>
#include <utility>
#include <torch/library.h>

#include "cpu/dispatch.h"
#include "tensor_utils.h"

namespace kdfast {
namespace {

Divergence parse_divergence(const std::string& d) {
  if (d == "kl") return Divergence::KL;
  if (d == "reverse_kl") return Divergence::ReverseKL;
  if (d == "jsd") return Divergence::JSD;
  TORCH_CHECK_VALUE(false, "kdfast: divergence must be 'kl', 'reverse_kl' or 'jsd', got '", d, "'");
}

// The logits as contiguous (outer, classes, inner) tensors of kernel-readable dtypes; a float64 tensor paired
// with a lower-precision one is promoted so that the pair accumulates in float64.
std::pair<at::Tensor, at::Tensor> prepare_logits(const at::Tensor& student, const at::Tensor& teacher) {
  TORCH_CHECK_VALUE(student.dim() == 3, "kdfast: kd ops take (outer, classes, inner) logits, got ", student.sizes());
  TORCH_CHECK_VALUE(student.sizes() == teacher.sizes(), "kdfast: student ", student.sizes(), " and teacher ",
                    teacher.sizes(), " logits differ in shape");
  TORCH_CHECK_VALUE(student.size(1) >= 1, "kdfast: the class dimension is empty");
  TORCH_CHECK(student.device() == teacher.device(), "kdfast: student on ", student.device(), ", teacher on ",
              teacher.device());
  at::Tensor s = student, t = teacher;
  if ((s.scalar_type() == at::kDouble) != (t.scalar_type() == at::kDouble)) {
    s = s.to(at::kDouble);
    t = t.to(at::kDouble);
  }
  return {s.contiguous(), t.contiguous()};
}

KdProblem base_problem(const at::Tensor& s, const at::Tensor& t, const std::optional<at::Tensor>& target,
                       double temperature, const std::string& divergence, double beta, int64_t ignore_index) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, "kdfast: temperature must be finite and > 0, got ",
                    temperature);
  KdProblem p{};
  p.student = s.data_ptr();
  p.teacher = t.data_ptr();
  p.student_dtype = kernel_dtype(s, "student");
  p.teacher_dtype = kernel_dtype(t, "teacher");
  p.outer = s.size(0);
  p.classes = s.size(1);
  p.inner = s.size(2);
  p.temperature = temperature;
  p.divergence = parse_divergence(divergence);
  TORCH_CHECK_VALUE(p.divergence != Divergence::JSD || (beta > 0 && beta < 1),
                    "kdfast: jsd needs beta strictly inside (0, 1), got ", beta);
  p.beta = beta;
  p.ignore_index = ignore_index;
  p.acc_double = s.scalar_type() == at::kDouble;
  if (target) {
    TORCH_CHECK_VALUE(target->scalar_type() == at::kLong, "kdfast: target must be int64, got ", target->scalar_type());
    TORCH_CHECK_VALUE(target->sizes() == at::IntArrayRef({p.outer, p.inner}), "kdfast: target of shape ",
                      target->sizes(), " for rows (", p.outer, ", ", p.inner, ")");
    TORCH_CHECK(target->device() == s.device(), "kdfast: target on ", target->device(), ", logits on ", s.device());
    // The CPU kernels compare class indices in the accumulator type, exact up to 2^24 in float.
    TORCH_CHECK_VALUE(p.classes <= (int64_t(1) << 24), "kdfast: kd_loss supports at most 2^24 classes");
  }
  return p;
}

// An upstream gradient of the (outer, inner) rows and the row stride to read it with: a value broadcast to every
// row (the gradient of a sum or mean of the rows) is read in place with stride 0 instead of being materialised.
std::pair<at::Tensor, int64_t> row_gradient(const at::Tensor& grad, at::ScalarType acc,
                                            const std::array<int64_t, 2>& rows) {
  at::Tensor g = grad.to(acc).expand(rows);
  if (g.stride(0) == 0 && g.stride(1) == 0) return {g, 0};
  return {g.contiguous(), 1};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_fwd(const at::Tensor& student, const at::Tensor& teacher,
                                                      const std::optional<at::Tensor>& target, double temperature,
                                                      const std::string& divergence, double beta,
                                                      int64_t ignore_index, const KdLauncher& launch) {
  auto [s, t] = prepare_logits(student, teacher);
  const std::optional<at::Tensor> y = target ? std::optional<at::Tensor>(target->contiguous()) : std::nullopt;
  KdProblem p = base_problem(s, t, y, temperature, divergence, beta, ignore_index);
  const auto acc = s.options().dtype(p.acc_double ? at::kDouble : at::kFloat);
  at::Tensor div = at::empty({p.outer, p.inner}, acc);
  at::Tensor ce = y ? at::empty({p.outer, p.inner}, acc) : at::empty({0}, acc);
  at::Tensor stats = at::empty({kd_stat_planes(p.divergence, y.has_value()), p.outer, p.inner}, acc);
  if (p.rows() > 0) {
    p.target = y ? y->data_ptr<int64_t>() : nullptr;
    p.div = div.data_ptr();
    p.ce = y ? ce.data_ptr() : nullptr;
    p.stats = stats.data_ptr();
    launch(p);
  }
  return {div, ce, stats};
}

std::tuple<at::Tensor, at::Tensor> kd_bwd(const at::Tensor& grad_div, const std::optional<at::Tensor>& grad_ce,
                                          const at::Tensor& student, const at::Tensor& teacher,
                                          const std::optional<at::Tensor>& target, const at::Tensor& stats,
                                          double temperature, const std::string& divergence, double beta,
                                          int64_t ignore_index, bool student_grad, bool teacher_grad,
                                          const KdLauncher& launch) {
  auto [s, t] = prepare_logits(student, teacher);
  const std::optional<at::Tensor> y = target ? std::optional<at::Tensor>(target->contiguous()) : std::nullopt;
  KdProblem p = base_problem(s, t, y, temperature, divergence, beta, ignore_index);
  const auto acc = p.acc_double ? at::kDouble : at::kFloat;
  const std::array<int64_t, 2> rows{p.outer, p.inner};
  const int64_t planes = kd_stat_planes(p.divergence, y.has_value());
  TORCH_CHECK_VALUE(stats.sizes() == at::IntArrayRef({planes, p.outer, p.inner}) && stats.scalar_type() == acc,
                    "kdfast: stats of shape ", stats.sizes(), " do not belong to these logits");
  const auto [gd, gd_stride] = row_gradient(grad_div, acc, rows);
  const bool use_ce = y && grad_ce && grad_ce->numel() > 0;
  const auto [gc, gc_stride] = use_ce ? row_gradient(*grad_ce, acc, rows) : std::pair<at::Tensor, int64_t>();
  const at::Tensor st = stats.contiguous();
  // Gradients come back in the caller's dtypes, also where a mixed float64 pair was promoted.
  at::Tensor gs = student_grad ? empty_output(s.sizes(), s.options()) : at::empty({0}, student.options());
  at::Tensor gt = teacher_grad ? empty_output(t.sizes(), t.options()) : at::empty({0}, teacher.options());
  if (p.rows() > 0 && (student_grad || teacher_grad)) {
    p.target = y ? y->data_ptr<int64_t>() : nullptr;
    p.stats = const_cast<void*>(st.data_ptr());
    p.grad_div = gd.data_ptr();
    p.grad_ce = use_ce ? gc.data_ptr() : nullptr;
    p.grad_div_stride = gd_stride;
    p.grad_ce_stride = gc_stride;
    p.grad_student = student_grad ? gs.data_ptr() : nullptr;
    p.grad_teacher = teacher_grad ? gt.data_ptr() : nullptr;
    launch(p);
  }
  return {student_grad ? gs.to(student.scalar_type()) : gs, teacher_grad ? gt.to(teacher.scalar_type()) : gt};
}

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("kd_fwd", [](const at::Tensor& s, const at::Tensor& t, const std::optional<at::Tensor>& y, double T,
                      c10::string_view d, double beta, int64_t ignore) {
    return kd_fwd(s, t, y, T, std::string(d), beta, ignore, cpu::kd_forward);
  });
  m.impl("kd_bwd", [](const at::Tensor& gd, const std::optional<at::Tensor>& gc, const at::Tensor& s,
                      const at::Tensor& t, const std::optional<at::Tensor>& y, const at::Tensor& stats, double T,
                      c10::string_view d, double beta, int64_t ignore, bool sg, bool tg) {
    return kd_bwd(gd, gc, s, t, y, stats, T, std::string(d), beta, ignore, sg, tg, cpu::kd_backward);
  });
}

}  // namespace kdfast
