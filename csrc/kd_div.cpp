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

// Logits read as (outer, classes, inner) (see KdProblem): s and t are contiguous, each of any kernel-readable dtype
// (read as it is: a float64 tensor paired with a lower-precision one makes the kernel accumulate in double). With
// `moved`, s and t are the logits with the class dim moved last (a channels-last dim=1, read without a transposing
// copy) and gradients are moved back to `dim`.
struct Rows {
  at::Tensor s, t;
  int64_t outer, classes, inner, dim;
  bool moved;
};

Rows contiguous(Rows r) {
  r.s = r.s.contiguous();
  r.t = r.t.contiguous();
  return r;
}

void check_pair(const at::Tensor& student, const at::Tensor& teacher) {
  TORCH_CHECK_VALUE(student.sizes() == teacher.sizes(), "kdfast: student ", student.sizes(), " and teacher ",
                    teacher.sizes(), " logits differ in shape");
  TORCH_CHECK(student.device() == teacher.device(), "kdfast: student on ", student.device(), ", teacher on ",
              teacher.device());
}

// The row ops' (outer, classes, inner) logits.
Rows rows_of_3d(const at::Tensor& student, const at::Tensor& teacher) {
  TORCH_CHECK_VALUE(student.dim() == 3, "kdfast: kd ops take (outer, classes, inner) logits, got ", student.sizes());
  check_pair(student, teacher);
  TORCH_CHECK_VALUE(student.size(1) >= 1, "kdfast: the class dimension is empty");
  return contiguous({student, teacher, student.size(0), student.size(1), student.size(2), 1, false});
}

// Logits of any shape with the classes along dim.
Rows rows_along(const at::Tensor& student, const at::Tensor& teacher, int64_t dim) {
  TORCH_CHECK_VALUE(student.dim() >= 1, "kdfast: logits must have at least one dimension (the classes)");
  check_pair(student, teacher);
  dim = c10::maybe_wrap_dim(dim, student.dim());
  const int64_t classes = student.size(dim);
  TORCH_CHECK_VALUE(classes >= 1, "kdfast: the class dimension is empty");
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < student.dim(); ++d) (d < dim ? outer : inner) *= d == dim ? 1 : student.size(d);
  if (inner > 1 && !student.is_contiguous()) {
    at::Tensor s = student.movedim(dim, -1);
    if (s.is_contiguous()) return contiguous({s, teacher.movedim(dim, -1), outer * inner, classes, 1, dim, true});
  }
  return contiguous({student, teacher, outer, classes, inner, dim, false});
}

// A gradient of the rows' logits in the caller's layout.
at::Tensor to_caller(const at::Tensor& g, const Rows& r) { return r.moved ? g.movedim(-1, r.dim) : g; }

// The dtype of the returned losses and rows: float64 when an input is float64, else float32, whatever the
// temperature (the kernels may accumulate in double, KdProblem::acc_double).
at::ScalarType out_dtype(const Rows& r) {
  return r.s.scalar_type() == at::kDouble || r.t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

KdProblem base_problem(const Rows& r, const std::optional<at::Tensor>& target, double temperature,
                       const std::string& divergence, double beta, int64_t ignore_index) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, "kdfast: temperature must be finite and > 0, got ",
                    temperature);
  KdProblem p{};
  p.student = r.s.data_ptr();
  p.teacher = r.t.data_ptr();
  p.student_dtype = kernel_dtype(r.s, "student");
  p.teacher_dtype = kernel_dtype(r.t, "teacher");
  p.outer = r.outer;
  p.classes = r.classes;
  p.inner = r.inner;
  p.temperature = temperature;
  p.divergence = parse_divergence(divergence);
  TORCH_CHECK_VALUE(p.divergence != Divergence::JSD || (beta > 0 && beta < 1),
                    "kdfast: jsd needs beta strictly inside (0, 1), got ", beta);
  p.beta = beta;
  p.ignore_index = ignore_index;
  p.acc_double = out_dtype(r) == at::kDouble || temperature > kKdPreciseT;
  if (target) {
    TORCH_CHECK_VALUE(target->scalar_type() == at::kLong, "kdfast: target must be int64, got ", target->scalar_type());
    TORCH_CHECK_VALUE(target->numel() == p.rows(), "kdfast: target of shape ", target->sizes(), " for ", p.rows(),
                      " rows");
    TORCH_CHECK(target->device() == r.s.device(), "kdfast: target on ", target->device(), ", logits on ",
                r.s.device());
    // The CPU kernels compare class indices in the accumulator type, exact up to 2^24 in float.
    TORCH_CHECK_VALUE(p.classes <= (int64_t(1) << 24), "kdfast: kd_loss supports at most 2^24 classes");
    p.target = target->data_ptr<int64_t>();
    // Checked here on the CPU, where it costs one read of the targets and no synchronisation, so that it holds in
    // compiled graphs too. On CUDA an out-of-range class gives a NaN loss (never a plausible number).
    if (target->is_cpu()) {
      for (int64_t i = 0; i < p.rows(); ++i) {
        const int64_t y = p.target[i];
        TORCH_CHECK_VALUE(y == ignore_index || (y >= 0 && y < p.classes), "kdfast: target holds class ", y,
                          ", outside [0, ", p.classes, ") and not ignore_index=", ignore_index);
      }
    }
  }
  return p;
}

// Runs the forward launcher. With one class the divergence of a row from its own statistics is exactly 0, and so
// are the divergence's row statistics (kAux0, kAux1), which the backward reads: its gradients are then exactly 0
// too (exp(0) = 1 on both sides), where the kernels would leave a rounding residue if the compiler fused
// s / T - logsumexp into one rounding (nvcc contracts a * b + c). A row holding NaN or inf keeps its NaN, forward
// and backward. Statistics given by the caller (one shard of a vocabulary, kdfast.distributed) are not the row's
// own: nothing is zeroed there.
void launch_forward(const KdProblem& p, at::Tensor& div, at::Tensor& stats, const KdLauncher& launch) {
  launch(p);
  if (p.classes > 1 || p.stats_given) return;
  const int64_t aux = p.divergence == Divergence::JSD ? 2 : 1;
  for (at::Tensor x : {div, stats.narrow(0, kAux0, aux)}) x.masked_fill_(x.isnan().logical_not(), 0);
}

std::optional<at::Tensor> long_target(const std::optional<at::Tensor>& target) {
  if (!target) return std::nullopt;
  return target->to(at::kLong).contiguous();
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
  const Rows r = rows_of_3d(student, teacher);
  const std::optional<at::Tensor> y = long_target(target);
  KdProblem p = base_problem(r, y, temperature, divergence, beta, ignore_index);
  const auto acc = r.s.options().dtype(p.acc_double ? at::kDouble : at::kFloat);
  at::Tensor div = at::empty({p.outer, p.inner}, acc);
  at::Tensor ce = y ? at::empty({p.outer, p.inner}, acc) : at::empty({0}, acc);
  at::Tensor stats = at::empty({kd_stat_planes(p.divergence, y.has_value()), p.outer, p.inner}, acc);
  if (p.rows() > 0) {
    p.div = div.data_ptr();
    p.ce = y ? ce.data_ptr() : nullptr;
    p.stats = stats.data_ptr();
    launch_forward(p, div, stats, launch);
  }
  // The rows come back in the inputs' dtype (row-sized conversions); the statistics stay in the accumulator's.
  return {div.to(out_dtype(r)), ce.to(out_dtype(r)), stats};
}

std::tuple<at::Tensor, at::Tensor> kd_partial_fwd(const at::Tensor& student, const at::Tensor& teacher,
                                                  const at::Tensor& given, double temperature,
                                                  const std::string& divergence, double beta,
                                                  const KdLauncher& launch) {
  const Rows r = rows_of_3d(student, teacher);
  KdProblem p = base_problem(r, std::nullopt, temperature, divergence, beta, -100);
  // kl's and reverse_kl's partial sums follow from kd_fwd's statistics of the shard alone (kdfast/distributed.py).
  TORCH_CHECK_VALUE(p.divergence == Divergence::JSD, "kdfast: kd_partial_fwd computes jsd's partial sums, got '",
                    divergence, "'");
  const auto acc = r.s.options().dtype(p.acc_double ? at::kDouble : at::kFloat);
  // The rows' maxima and log-sums (KdStat planes kMaxStudent .. kLogSumTeacher) of the whole vocabulary.
  TORCH_CHECK_VALUE(given.sizes() == at::IntArrayRef({4, p.outer, p.inner}) && given.scalar_type() == acc.dtype(),
                    "kdfast: statistics of shape ", given.sizes(), " and dtype ", given.scalar_type(),
                    " for logits of ", p.outer, " x ", p.inner, " rows (expected (4, outer, inner) of the accumulator",
                    " dtype)");
  TORCH_CHECK(given.device() == r.s.device(), "kdfast: statistics on ", given.device(), ", logits on ", r.s.device());
  at::Tensor div = at::empty({p.outer, p.inner}, acc);
  at::Tensor stats = at::empty({kd_stat_planes(p.divergence, false), p.outer, p.inner}, acc);
  stats.narrow(0, 0, 4).copy_(given);
  if (p.rows() > 0) {
    p.div = div.data_ptr();
    p.stats = stats.data_ptr();
    p.stats_given = true;
    launch_forward(p, div, stats, launch);
  }
  return {div, stats};
}

std::tuple<at::Tensor, at::Tensor> kd_bwd(const at::Tensor& grad_div, const std::optional<at::Tensor>& grad_ce,
                                          const at::Tensor& student, const at::Tensor& teacher,
                                          const std::optional<at::Tensor>& target, const at::Tensor& stats,
                                          double temperature, const std::string& divergence, double beta,
                                          int64_t ignore_index, bool student_grad, bool teacher_grad,
                                          const KdLauncher& launch) {
  const Rows r = rows_of_3d(student, teacher);
  const std::optional<at::Tensor> y = long_target(target);
  KdProblem p = base_problem(r, y, temperature, divergence, beta, ignore_index);
  const auto acc = p.acc_double ? at::kDouble : at::kFloat;
  const std::array<int64_t, 2> rows{p.outer, p.inner};
  const int64_t planes = kd_stat_planes(p.divergence, y.has_value());
  TORCH_CHECK_VALUE(stats.sizes() == at::IntArrayRef({planes, p.outer, p.inner}) && stats.scalar_type() == acc,
                    "kdfast: stats of shape ", stats.sizes(), " do not belong to these logits");
  const auto [gd, gd_stride] = row_gradient(grad_div, acc, rows);
  const bool use_ce = y && grad_ce && grad_ce->numel() > 0;
  const auto [gc, gc_stride] = use_ce ? row_gradient(*grad_ce, acc, rows) : std::pair<at::Tensor, int64_t>();
  const at::Tensor st = stats.contiguous();
  at::Tensor gs = student_grad ? empty_output(r.s.sizes(), r.s.options()) : at::empty({0}, student.options());
  at::Tensor gt = teacher_grad ? empty_output(r.t.sizes(), r.t.options()) : at::empty({0}, teacher.options());
  if (p.rows() > 0 && (student_grad || teacher_grad)) {
    p.stats = const_cast<void*>(st.data_ptr());
    p.grad_div = gd.data_ptr();
    p.grad_ce = use_ce ? gc.data_ptr() : nullptr;
    p.grad_div_stride = gd_stride;
    p.grad_ce_stride = gc_stride;
    p.grad_student = student_grad ? gs.data_ptr() : nullptr;
    p.grad_teacher = teacher_grad ? gt.data_ptr() : nullptr;
    launch(p);
  }
  return {student_grad ? to_caller(gs, r) : gs, teacher_grad ? to_caller(gt, r) : gt};
}

namespace {

enum class Reduction { Sum, BatchMean };

Reduction parse_reduction(const std::string& r) {
  if (r == "sum") return Reduction::Sum;
  if (r == "batchmean") return Reduction::BatchMean;
  TORCH_CHECK_VALUE(false, "kdfast: the reduced kd ops take reduction 'sum' or 'batchmean', got '", r, "'");
}

// What the sums of the counted rows are divided by (at least 1: no counted row gives 0).
double denominator(Reduction red, double count) {
  if (red == Reduction::Sum) return 1.0;
  return count > 1.0 ? count : 1.0;
}

// A reduced op's problem: the rows of logits along dim, the optional row mask, and kd_loss's target (whose
// ignored rows count in neither term).
struct Reduced {
  Rows r;
  std::optional<at::Tensor> y, mask;
  KdProblem p;
};

Reduced reduced_problem(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& target,
                        const std::optional<at::Tensor>& mask, int64_t dim, double temperature,
                        const std::string& divergence, double beta, int64_t ignore_index) {
  // One row selection at a time keeps the two terms' counted rows the same in the forward and the backward.
  TORCH_CHECK_VALUE(!(target && mask), "kdfast: the reduced kd ops take a target or a mask, not both");
  Reduced d{rows_along(student, teacher, dim), long_target(target), std::nullopt, {}};
  d.p = base_problem(d.r, d.y, temperature, divergence, beta, ignore_index);
  if (mask) {
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, "kdfast: mask must be bool, got ", mask->scalar_type());
    TORCH_CHECK_VALUE(mask->numel() == d.p.rows(), "kdfast: mask of shape ", mask->sizes(), " for ", d.p.rows(),
                      " rows");
    TORCH_CHECK(mask->device() == d.r.s.device(), "kdfast: mask on ", mask->device(), ", logits on ", d.r.s.device());
    d.mask = mask->contiguous();
    d.p.row_mask = d.mask->data_ptr<bool>();
  }
  d.p.skip_ignored = d.y.has_value();
  return d;
}

// Sums of the counted rows' divergence and cross-entropy and their number, read on the host (CPU rows): no ATen
// op per call.
template <class A>
std::array<double, 3> host_sums(const KdProblem& p) {
  const A* div = static_cast<const A*>(p.div);
  const A* ce = static_cast<const A*>(p.ce);
  double sd = 0, sc = 0, n = 0;
  for (int64_t i = 0; i < p.rows(); ++i) {
    if (!kd_row_counted(p, i)) continue;
    sd += double(div[i]);
    if (ce) sc += double(ce[i]);
    n += 1;
  }
  return {sd, sc, n};
}

// The value of a one-element CPU tensor (a loss gradient or a row count), without a dispatcher call.
double host_value(const at::Tensor& x) {
  if (x.scalar_type() == at::kDouble) return *x.const_data_ptr<double>();
  if (x.scalar_type() == at::kFloat) return *x.const_data_ptr<float>();
  return x.item<double>();
}

at::Tensor host_scalar(double v, const at::TensorOptions& acc) {
  at::Tensor x = at::empty({}, acc);
  if (x.scalar_type() == at::kDouble) *x.data_ptr<double>() = v;
  else *x.data_ptr<float>() = float(v);
  return x;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_reduce_fwd(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& target,
    const std::optional<at::Tensor>& mask, int64_t dim, double temperature, const std::string& divergence,
    double beta, int64_t ignore_index, const std::string& reduction, double kd_weight, double ce_weight,
    const KdLauncher& launch) {
  const Reduction red = parse_reduction(reduction);
  Reduced d = reduced_problem(student, teacher, target, mask, dim, temperature, divergence, beta, ignore_index);
  KdProblem& p = d.p;
  const auto acc = d.r.s.options().dtype(p.acc_double ? at::kDouble : at::kFloat);
  const int64_t R = p.rows();
  at::Tensor div = at::empty({R}, acc);
  at::Tensor ce = d.y ? at::empty({R}, acc) : at::Tensor();
  at::Tensor stats = at::empty({kd_stat_planes(p.divergence, d.y.has_value()), R}, acc);
  p.div = div.data_ptr();
  p.ce = d.y ? ce.data_ptr() : nullptr;
  p.stats = stats.data_ptr();
  if (R > 0) launch_forward(p, div, stats, launch);
  const auto out = acc.dtype(out_dtype(d.r));
  if (div.is_cpu()) {
    const auto [sd, sc, n] = p.acc_double ? host_sums<double>(p) : host_sums<float>(p);
    const double loss = (kd_weight * sd + (d.y ? ce_weight * sc : 0.0)) / denominator(red, n);
    return {host_scalar(loss, out), stats, host_scalar(n, out)};
  }
  // Elsewhere the rows are reduced by ATen ops on the device (no synchronisation).
  const at::Tensor keep = d.mask ? *d.mask : (d.y ? d.y->ne(ignore_index) : at::Tensor());
  auto total = [&](const at::Tensor& x) { return keep.defined() ? at::where(keep, x, 0).sum() : x.sum(); };
  at::Tensor count = keep.defined() ? keep.sum().to(acc.dtype()) : at::full({}, double(R), acc);
  at::Tensor loss = total(div) * kd_weight;
  if (d.y) loss = loss + total(ce) * ce_weight;
  if (red != Reduction::Sum) loss = loss / count.clamp_min(1);
  return {loss.to(out.dtype()), stats, count.to(out.dtype())};
}

std::tuple<at::Tensor, at::Tensor> kd_reduce_bwd(
    const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
    const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& mask, const at::Tensor& stats,
    const at::Tensor& count, int64_t dim, double temperature, const std::string& divergence, double beta,
    int64_t ignore_index, const std::string& reduction, double kd_weight, double ce_weight, bool student_grad,
    bool teacher_grad, const KdLauncher& launch) {
  const Reduction red = parse_reduction(reduction);
  Reduced d = reduced_problem(student, teacher, target, mask, dim, temperature, divergence, beta, ignore_index);
  KdProblem& p = d.p;
  const auto acc = d.r.s.options().dtype(p.acc_double ? at::kDouble : at::kFloat);
  TORCH_CHECK_VALUE(stats.sizes() == at::IntArrayRef({kd_stat_planes(p.divergence, d.y.has_value()), p.rows()}) &&
                        stats.scalar_type() == acc.dtype() && stats.is_contiguous(),
                    "kdfast: stats of shape ", stats.sizes(), " do not belong to these logits");
  // Every counted row's divergence and cross-entropy get one gradient each (read with row stride 0): on the CPU
  // from host memory, read and written without an ATen op.
  at::Tensor g;
  std::array<double, 2> gd{};
  std::array<float, 2> gf{};
  const void* g_ptr = nullptr;
  if (grad_loss.is_cpu()) {
    const double scale = host_value(grad_loss) / denominator(red, host_value(count));
    gd = {scale * kd_weight, scale * ce_weight};
    gf = {float(gd[0]), float(gd[1])};
    g_ptr = p.acc_double ? static_cast<const void*>(gd.data()) : static_cast<const void*>(gf.data());
  } else {
    const at::Tensor n = count.to(acc.dtype());
    at::Tensor den = red == Reduction::Sum ? at::ones({}, acc) : n.clamp_min(1);
    g = at::stack({grad_loss.to(acc.dtype()) * kd_weight, grad_loss.to(acc.dtype()) * ce_weight}) / den;
    g_ptr = g.data_ptr();
  }
  at::Tensor gs = student_grad ? empty_output(d.r.s.sizes(), d.r.s.options()) : at::empty({0}, student.options());
  at::Tensor gt = teacher_grad ? empty_output(d.r.t.sizes(), d.r.t.options()) : at::empty({0}, teacher.options());
  if (p.rows() > 0 && (student_grad || teacher_grad)) {
    p.stats = const_cast<void*>(stats.data_ptr());
    const size_t elt = p.acc_double ? sizeof(double) : sizeof(float);
    p.grad_div = g_ptr;
    p.grad_ce = d.y && ce_weight != 0 ? static_cast<const char*>(g_ptr) + elt : nullptr;
    p.grad_div_stride = p.grad_ce_stride = 0;
    p.grad_student = student_grad ? gs.data_ptr() : nullptr;
    p.grad_teacher = teacher_grad ? gt.data_ptr() : nullptr;
    launch(p);
  }
  return {student_grad ? to_caller(gs, d.r) : gs, teacher_grad ? to_caller(gt, d.r) : gt};
}

TORCH_LIBRARY_FRAGMENT(kdfast, m) {
  // Fused temperature-softmax divergence over (outer, classes, inner) logits, per row (outer, inner):
  // div = the unscaled divergence, ce = cross-entropy at T = 1 against target (empty without a target),
  // stats = the (kd_stat_planes, outer, inner) row statistics the backward needs.
  m.def("kd_fwd(Tensor student, Tensor teacher, Tensor? target, float temperature, str divergence, float beta, "
        "int ignore_index) -> (Tensor div, Tensor ce, Tensor stats)");
  // jsd's partial sums over these classes (one rank's shard of the vocabulary) with the rows' logsumexps of the
  // whole vocabulary given, lse = (2, outer, inner) (student, teacher): div = beta * KL(p_t || m) + (1 - beta) *
  // KL(p_s || m) summed over these classes (not clamped at 0), stats = the kd_fwd planes with lse and those sums.
  m.def("kd_partial_fwd(Tensor student, Tensor teacher, Tensor stats, float temperature, str divergence, float beta) "
        "-> (Tensor div, Tensor stats)");
  m.def("kd_bwd(Tensor grad_div, Tensor? grad_ce, Tensor student, Tensor teacher, Tensor? target, Tensor stats, "
        "float temperature, str divergence, float beta, int ignore_index, bool student_grad, bool teacher_grad) "
        "-> (Tensor grad_student, Tensor grad_teacher)");
  // The same divergence and cross-entropy reduced inside the op, for logits of any shape with the classes along
  // dim: loss = (kd_weight * sum of div + ce_weight * sum of ce) over the counted rows (mask true, target not
  // ignore_index), divided by 1 ("sum"), their number ("batchmean") or their number of elements ("mean"), at
  // least 1. count = the number of counted rows, stats = the (kd_stat_planes, rows) row statistics. A scalar
  // gradient comes back in kd_reduce_bwd; the Autograd key is registered in C++ (csrc/kd_div_autograd.cpp).
  m.def("kd_reduce_fwd(Tensor student, Tensor teacher, Tensor? target, Tensor? mask, int dim, float temperature, "
        "str divergence, float beta, int ignore_index, str reduction, float kd_weight, float ce_weight) "
        "-> (Tensor loss, Tensor stats, Tensor count)");
  m.def("kd_reduce_bwd(Tensor grad_loss, Tensor student, Tensor teacher, Tensor? target, Tensor? mask, "
        "Tensor stats, Tensor count, int dim, float temperature, str divergence, float beta, int ignore_index, "
        "str reduction, float kd_weight, float ce_weight, bool student_grad, bool teacher_grad) "
        "-> (Tensor grad_student, Tensor grad_teacher)");
}

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("kd_fwd", [](const at::Tensor& s, const at::Tensor& t, const std::optional<at::Tensor>& y, double T,
                      c10::string_view d, double beta, int64_t ignore) {
    return kd_fwd(s, t, y, T, std::string(d), beta, ignore, cpu::kd_forward);
  });
  m.impl("kd_partial_fwd", [](const at::Tensor& s, const at::Tensor& t, const at::Tensor& lse, double T,
                              c10::string_view d, double beta) {
    return kd_partial_fwd(s, t, lse, T, std::string(d), beta, cpu::kd_forward);
  });
  m.impl("kd_bwd", [](const at::Tensor& gd, const std::optional<at::Tensor>& gc, const at::Tensor& s,
                      const at::Tensor& t, const std::optional<at::Tensor>& y, const at::Tensor& stats, double T,
                      c10::string_view d, double beta, int64_t ignore, bool sg, bool tg) {
    return kd_bwd(gd, gc, s, t, y, stats, T, std::string(d), beta, ignore, sg, tg, cpu::kd_backward);
  });
  m.impl("kd_reduce_fwd", [](const at::Tensor& s, const at::Tensor& t, const std::optional<at::Tensor>& y,
                             const std::optional<at::Tensor>& mask, int64_t dim, double T, c10::string_view d,
                             double beta, int64_t ignore, c10::string_view red, double kw, double cw) {
    return kd_reduce_fwd(s, t, y, mask, dim, T, std::string(d), beta, ignore, std::string(red), kw, cw,
                         cpu::kd_forward);
  });
  m.impl("kd_reduce_bwd", [](const at::Tensor& g, const at::Tensor& s, const at::Tensor& t,
                             const std::optional<at::Tensor>& y, const std::optional<at::Tensor>& mask,
                             const at::Tensor& stats, const at::Tensor& count, int64_t dim, double T,
                             c10::string_view d, double beta, int64_t ignore, c10::string_view red, double kw,
                             double cw, bool sg, bool tg) {
    return kd_reduce_bwd(g, s, t, y, mask, stats, count, dim, T, std::string(d), beta, ignore, std::string(red), kw,
                         cw, sg, tg, cpu::kd_backward);
  });
}

}  // namespace kdfast
