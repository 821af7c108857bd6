// The sparse (top-k) teacher divergence ops: schemas, tensor glue and CPU registration. The math is in
// csrc/common/topk_kd.h, the kernels in csrc/cpu/topk_kd_kernel.h and csrc/cuda/topk_kd.cu.
#include "topk_kd.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cfloat>
#include <cmath>

#include "cpu/dispatch.h"
#include "tensor_utils.h"

namespace kdfast {
namespace {

TopKTail parse_tail(const std::string& tail) {
  if (tail == "renormalize") return TopKTail::Renormalize;
  if (tail == "bucket") return TopKTail::Bucket;
  TORCH_CHECK_VALUE(false, "kdfast: tail must be 'renormalize' or 'bucket', got '", tail, "'");
}

Divergence parse_divergence(const std::string& d) {
  if (d == "kl") return Divergence::KL;
  if (d == "reverse_kl") return Divergence::ReverseKL;
  if (d == "jsd") return Divergence::JSD;
  TORCH_CHECK_VALUE(false, "kdfast: divergence must be 'kl', 'reverse_kl' or 'jsd', got '", d, "'");
}

// The problem's inputs as the kernels read them: contiguous student rows in their own dtype (no copy when they
// already are; the accumulator follows the student: float64 for float64 logits, float32 otherwise), int64 indices
// and accumulator-typed log-probs and weights (all (rows, k): small next to the logits), and the bucket's teacher
// tail (rows).
struct TopKInputs {
  at::Tensor student, indices, logprobs, weights, tail_log;
  at::Tensor shift;  // (rows, 1) float64: teacher_shift
  TopKProblem p;
};

// The constant each row of a top-k teacher's log-probabilities is shifted by before they are rounded to the
// accumulator: their largest valid value (an accumulator-typed log-probability above -inf), in float64; 0 where
// that is above 0 or -inf (the kernel then sees the row's invalid value or its padding as given). The teacher's
// categories, softmax(lp / T) and the bucket's tail u / T, do not change with it, but their rounding does: float32
// holds lp = -4 to 4e-7, which a temperature of 5e-6 would make 0.08 of the tempered teacher; (lp - max) / T keeps
// the spread of the row only. A sampled teacher's log-probabilities enter its loss as they are: not shifted.
// kdfast/topk.py (teacher_shift) is the same rule.
at::Tensor teacher_shift(const at::Tensor& lp64, const at::Tensor& valid) {
  if (lp64.size(-1) == 0) return at::zeros({lp64.size(0), 1}, lp64.options());
  const at::Tensor m = at::where(valid, lp64, -INFINITY).amax({-1}, true);
  return at::where(m.isfinite() & (m <= 0), m, 0.0);
}

// The teacher's tail per row, u = log(1 - sum_j exp(lp_j)) over the valid entries (those whose accumulator-typed
// log-probability is above -inf), formed in float64 from the log-probabilities as given (a (rows, k) float64
// temporary, k values a row): in the accumulator a float32 rounding of 1 - sum exp(lp), which cancels when the
// entries hold almost all of the mass, grows by the tempered tail's exp(u / T). The tail is taken as 0 (u = -inf)
// at or below (valid + 1) eps, eps that of the log-probabilities' own precision (float64's for float64, float32's
// otherwise): below it the sum is rounding of the given log-probabilities, not mass; and where the valid entries
// are all V classes (valid indices are distinct): float32 log-probabilities of k = V classes sum to 1 within about
// 1e-8, a tail that no class of the student can hold (an infinite kl). kdfast/reference.py (topk_tail) is the
// same rule.
at::Tensor teacher_tail_log(const at::Tensor& logprobs, const at::Tensor& valid, int64_t classes) {
  const at::Tensor lp = logprobs.to(at::kDouble);
  const at::Tensor rest = 1 - at::where(valid, lp.exp(), 0.0).sum(-1);
  const at::Tensor entries = valid.sum({-1}, false, at::kDouble);
  const double eps = logprobs.scalar_type() == at::kDouble ? DBL_EPSILON : FLT_EPSILON;
  const at::Tensor keep = (rest > (entries + 1) * eps) & (entries < classes);
  return at::where(keep, rest.log(), -INFINITY);
}

TopKInputs prepare(const at::Tensor& student, const at::Tensor& indices, const at::Tensor& logprobs,
                   double temperature, const std::string& tail, const std::string& divergence, double beta,
                   const std::optional<at::Tensor>& weights) {
  TORCH_CHECK_VALUE(student.dim() == 2, "kdfast: topk ops take (rows, classes) logits, got ", student.sizes());
  TORCH_CHECK_VALUE(indices.dim() == 2 && indices.size(0) == student.size(0) && indices.sizes() == logprobs.sizes(),
                    "kdfast: teacher indices ", indices.sizes(), " and log-probs ", logprobs.sizes(),
                    " must both be (rows, k) with the student's ", student.size(0), " rows");
  TORCH_CHECK_VALUE(student.size(1) >= 1, "kdfast: the class dimension is empty");
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt,
                   "kdfast: teacher indices must be int64 or int32, got ", indices.scalar_type());
  TORCH_CHECK(student.device() == indices.device() && student.device() == logprobs.device(), "kdfast: student on ",
              student.device(), ", teacher indices on ", indices.device(), ", log-probs on ", logprobs.device());
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, "kdfast: temperature must be finite and > 0, got ",
                    temperature);
  kernel_dtype(logprobs, "teacher log-probs");
  TopKInputs in;
  TopKProblem& p = in.p;
  p = TopKProblem{};
  p.tail = parse_tail(tail);
  p.divergence = parse_divergence(divergence);
  TORCH_CHECK_VALUE(p.divergence != Divergence::JSD || (beta > 0 && beta < 1),
                    "kdfast: beta must be strictly inside (0, 1), got ", beta);
  p.beta = beta;
  const bool acc_double = student.scalar_type() == at::kDouble;
  const auto acc = acc_double ? at::kDouble : at::kFloat;
  if (weights.has_value()) {
    TORCH_CHECK_VALUE(weights->sizes() == logprobs.sizes() && weights->device() == student.device(),
                      "kdfast: weights ", weights->sizes(), " must be the log-probs' ", logprobs.sizes());
    TORCH_CHECK_VALUE(p.tail == TopKTail::Renormalize && p.divergence == Divergence::KL,
                      "kdfast: a sampled teacher (weights) takes tail 'renormalize' and divergence 'kl'");
    in.weights = weights->to(acc).contiguous();
    p.weights = in.weights.data_ptr();
  }
  in.student = student.contiguous();
  in.indices = indices.to(at::kLong).contiguous();
  if (weights) {
    in.logprobs = logprobs.to(acc).contiguous();
  } else {
    const at::Tensor lp64 = logprobs.to(at::kDouble);
    in.shift = teacher_shift(lp64, logprobs.to(acc) > -INFINITY);
    in.logprobs = (lp64 - in.shift).to(acc).contiguous();
  }
  p.student = in.student.data_ptr();
  p.student_dtype = kernel_dtype(in.student, "student");
  p.indices = in.indices.data_ptr<int64_t>();
  p.logprobs = in.logprobs.data_ptr();
  p.rows = student.size(0);
  p.classes = student.size(1);
  p.k = indices.size(1);
  p.temperature = temperature;
  p.acc_double = acc_double;
  return in;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_kd_fwd(const at::Tensor& student, const at::Tensor& indices,
                                               const at::Tensor& logprobs, double temperature,
                                               const std::string& tail, const std::string& divergence, double beta,
                                               const std::optional<at::Tensor>& weights,
                                               const TopKLauncher& launch) {
  TopKInputs in = prepare(student, indices, logprobs, temperature, tail, divergence, beta, weights);
  const auto acc = in.student.options().dtype(in.p.acc_double ? at::kDouble : at::kFloat);
  if (in.p.tail == TopKTail::Bucket) {
    in.tail_log = (teacher_tail_log(logprobs, in.logprobs > -INFINITY, in.p.classes) - in.shift.squeeze(-1))
                      .to(acc)
                      .contiguous();
    in.p.tail_log = in.tail_log.data_ptr();
  }
  at::Tensor loss = at::empty({in.p.rows}, acc);
  at::Tensor stats = at::empty({kTopKPlanes, in.p.rows}, acc);
  if (in.p.rows > 0) {
    in.p.loss = loss.data_ptr();
    in.p.stats = stats.data_ptr();
    launch(in.p);
  }
  return {loss, stats};
}

at::Tensor topk_kd_bwd(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& indices,
                       const at::Tensor& logprobs, const at::Tensor& stats, double temperature,
                       const std::string& tail, const std::string& divergence, double beta,
                       const std::optional<at::Tensor>& weights, const TopKLauncher& launch) {
  TopKInputs in = prepare(student, indices, logprobs, temperature, tail, divergence, beta, weights);
  const auto acc = in.p.acc_double ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(stats.sizes() == at::IntArrayRef({kTopKPlanes, in.p.rows}) && stats.scalar_type() == acc,
                    "kdfast: stats of shape ", stats.sizes(), " do not belong to these logits");
  // A gradient broadcast to every row (that of a sum or mean) is read in place with stride 0.
  at::Tensor g = grad_loss.to(acc).expand({in.p.rows});
  const bool broadcast = in.p.rows > 0 && g.stride(0) == 0;
  if (!broadcast) g = g.contiguous();
  const at::Tensor st = stats.contiguous();
  at::Tensor gs = empty_output(in.student.sizes(), in.student.options());
  if (in.p.rows > 0) {
    in.p.stats = const_cast<void*>(st.data_ptr());
    in.p.grad_loss = g.data_ptr();
    in.p.grad_stride = broadcast ? 0 : 1;
    in.p.grad_student = gs.data_ptr();
    launch(in.p);
  }
  return gs.to(student.scalar_type());
}

TORCH_LIBRARY_FRAGMENT(kdfast, m) {
  // Divergence from a sparse teacher over (rows, classes) student logits: per row the k teacher entries
  // (indices int64/int32 into classes, log-probabilities at T = 1, -inf = padding) as in csrc/common/topk_kd.h,
  // divergence "kl", "reverse_kl" or "jsd" (beta: jsd's mixture weight). weights (rows, k), when given, make it the
  // sampled teacher: loss = sum_j w_j (logprobs_j - log_softmax(s / T)[idx_j]), logprobs at T, entries with w_j = 0
  // padding (tail "renormalize", divergence "kl" only). loss = the (rows,) unscaled divergence (float64 for
  // float64 logits, else float32); stats = the (7, rows) row statistics the backward reads. The indices must be
  // in range (the Python function checks).
  m.def("topk_kd_fwd(Tensor student, Tensor indices, Tensor logprobs, float temperature, str tail, "
        "str divergence=\"kl\", float beta=0.5, Tensor? weights=None) -> (Tensor loss, Tensor stats)");
  // Gradient of sum(grad_loss * loss) with respect to the student logits, in the student's dtype, from topk_kd_fwd's
  // stats: grad_loss (rows,) or a broadcast scalar; each element written once.
  m.def("topk_kd_bwd(Tensor grad_loss, Tensor student, Tensor indices, Tensor logprobs, Tensor stats, "
        "float temperature, str tail, str divergence=\"kl\", float beta=0.5, Tensor? weights=None) "
        "-> Tensor grad_student");
}

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("topk_kd_fwd", [](const at::Tensor& s, const at::Tensor& i, const at::Tensor& lp, double T,
                           c10::string_view tail, c10::string_view div, double beta,
                           const std::optional<at::Tensor>& w) {
    return topk_kd_fwd(s, i, lp, T, std::string(tail), std::string(div), beta, w, cpu::topk_kd_forward);
  });
  m.impl("topk_kd_bwd", [](const at::Tensor& g, const at::Tensor& s, const at::Tensor& i, const at::Tensor& lp,
                           const at::Tensor& stats, double T, c10::string_view tail, c10::string_view div,
                           double beta, const std::optional<at::Tensor>& w) {
    return topk_kd_bwd(g, s, i, lp, stats, T, std::string(tail), std::string(div), beta, w,
                       cpu::topk_kd_backward);
  });
}

}  // namespace kdfast
