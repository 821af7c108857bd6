// Torch-free description of the sparse (top-k) teacher divergence, and the per-row teacher-side math shared by the
// CPU and CUDA kernels. Host-device inline; no torch header may be included here. The student-side online
// softmax (OnlineSum, merge, VMath) comes from kd_div.h.
//
// Per row: a = s / T over V classes, lse = logsumexp(a), p = exp(a - lse). The teacher gives k entries
// (idx_j, lp_j), its log-probabilities at T = 1; lp_j = -inf marks padding, which takes no part and whose index is
// never read. With t_j = lp_j / T:
//   renormalize: q = softmax(t) over the valid entries; loss = sum_j q_j (log q_j - (a[idx_j] - lse));
//                d loss / d a = p - sum_j q_j e_{idx_j}. A row without a valid entry has loss 0 and gradient 0.
//   bucket:      one more category, the tail u = log(1 - sum_j exp(lp_j)) with student mass 1 - S,
//                S = sum_j p[idx_j]; q = softmax([t, u / T]); loss = KL(q || [p[idx], 1 - S]) (u and 1 - S
//                within rounding of 0 as topk_eps says);
//                d loss / d a = p - q on the top-k indices, p (1 - q_tail / (1 - S)) elsewhere.
// Both gradients are p * c off the top-k indices and p - (sum of q at that index) on them, c the row's
// "off-top coefficient" (1 for renormalize); the backward recomputes p from the saved lse.
#pragma once

#include <cmath>
#include <cstdint>

#include "dtype.h"
#include "kd_div.h"

namespace kdfast {

enum class TopKTail : int { Renormalize = 0, Bucket = 1 };

// Per-row statistics saved by the forward for the backward: planes of `rows` values.
enum TopKStat : int {
  kTopKLse = 0,    // logsumexp(s / T); +inf on a renormalize row without a valid entry (p = 0: zero gradient)
  kTopKCoef = 1,   // the off-top coefficient c
  kTopKPlanes = 2,
};

// Student logits (rows, classes) contiguous; indices (rows, k) int64 contiguous; logprobs (rows, k) contiguous
// in the accumulator type (the op converts them: they are small).
struct TopKProblem {
  const void* student;
  DType student_dtype;
  const int64_t* indices;
  const void* logprobs;
  int64_t rows, classes, k;
  double temperature;
  TopKTail tail;
  bool acc_double;      // accumulate (and store loss, stats, logprobs) in double instead of float
  void* stats;          // kTopKPlanes * rows accumulators, written by forward, read by backward
  void* loss;           // forward: the unscaled divergence per row (accumulator type)
  const void* grad_loss;   // backward: rows, accumulator type, element r at grad_loss[r * grad_stride]
  int64_t grad_stride;     // 1, or 0 for one value broadcast to every row (the gradient of a sum or mean)
  void* grad_student;      // backward output, dtype of the student
};

KDFAST_ISA_BEGIN

// The accumulator's machine epsilon. Sums of k probabilities carry a rounding error of about k eps: a teacher tail
// 1 - sum exp(lp) at or below (valid + 1) eps is taken as 0 (with k = V the tail is exactly 0, not rounding noise),
// and the student's mass off the top-k, 1 - S, is floored at eps (finite where rounding leaves nothing).
template <class S> KDFAST_HD constexpr S topk_eps();
template <> KDFAST_HD constexpr float topk_eps<float>() { return 1.1920929e-07f; }
template <> KDFAST_HD constexpr double topk_eps<double>() { return 2.220446049250313e-16; }

KDFAST_HD inline bool topk_index_ok(int64_t i, int64_t classes) { return i >= 0 && i < classes; }

// The teacher side of one row: the log-normaliser of its T-scaled categories and its tail log-mass.
template <class S> struct TopKTeacher {
  S lse;      // logsumexp of the categories t_j (and u / T for bucket); -inf when there is none
  S tail;     // u = log(1 - sum exp(lp_j)) at T = 1 (bucket only), -inf when the entries hold all the mass
  int valid;  // number of valid (non-padding) entries
  bool nan;   // a NaN log-probability: the row's loss is NaN
};

// Two passes over the k log-probabilities (max, then sum), valid entries only.
template <class S>
KDFAST_HD inline TopKTeacher<S> topk_teacher(const S* lp, int64_t k, S inv_T, TopKTail tail) {
  using M = VMath<S>;
  TopKTeacher<S> r{S(-INFINITY), S(-INFINITY), 0, false};
  S mx = S(-INFINITY), mass = S(0);
  for (int64_t j = 0; j < k; ++j) {
    const S x = lp[j];
    if (x != x) r.nan = true;
    if (!(x > S(-INFINITY))) continue;
    ++r.valid;
    mass += M::exp(x);
    mx = x * inv_T > mx ? x * inv_T : mx;
  }
  if (tail == TopKTail::Bucket) {
    const S rest = S(1) - mass;
    r.tail = rest > S(r.valid + 1) * topk_eps<S>() ? M::log(rest) : S(-INFINITY);
    mx = r.tail * inv_T > mx ? r.tail * inv_T : mx;
  }
  if (mx == S(-INFINITY)) return r;
  S z = S(0);
  for (int64_t j = 0; j < k; ++j)
    if (lp[j] > S(-INFINITY)) z += M::exp(lp[j] * inv_T - mx);
  if (tail == TopKTail::Bucket) z += M::exp(r.tail * inv_T - mx);
  r.lse = mx + M::log(z);
  return r;
}

// The forward of one row, given the student's logsumexp of s / T and a loader of a[idx_j] (s[idx_j] / T, read
// only for valid entries with an index in range). Writes the row's loss and statistics.
template <class S, class Gather>
KDFAST_HD inline void topk_finish_row(const TopKProblem& p, int64_t row, S lse_a, Gather&& a_at) {
  using M = VMath<S>;
  const S inv_T = S(1) / S(p.temperature);
  const S* lp = static_cast<const S*>(p.logprobs) + row * p.k;
  const int64_t* idx = p.indices + row * p.k;
  const TopKTeacher<S> t = topk_teacher(lp, p.k, inv_T, p.tail);
  S loss = S(0), top_mass = S(0), coef = S(1);
  bool bad = t.nan;
  for (int64_t j = 0; j < p.k; ++j) {
    if (!(lp[j] > S(-INFINITY))) continue;
    if (!topk_index_ok(idx[j], p.classes)) {  // checked on the host where that is free; NaN otherwise
      bad = true;
      continue;
    }
    const S logq = lp[j] * inv_T - t.lse, logp = a_at(idx[j]) - lse_a;
    loss += M::mul_nonzero(M::exp(logq), logq - logp);
    top_mass += M::exp(logp);
  }
  if (p.tail == TopKTail::Bucket) {
    const S logq = t.tail * inv_T - t.lse, q = M::exp(logq);
    const S rest = S(1) - top_mass > topk_eps<S>() ? S(1) - top_mass : topk_eps<S>();  // the student's mass off
                                                                                       // the top-k indices
    loss += M::mul_nonzero(q, logq - M::log(rest));
    coef = q == S(0) ? S(1) : S(1) - q / rest;
  } else if (t.valid == 0) {
    lse_a = S(INFINITY);
  }
  S* stats = static_cast<S*>(p.stats);
  stats[kTopKLse * p.rows + row] = lse_a;
  stats[kTopKCoef * p.rows + row] = coef;
  static_cast<S*>(p.loss)[row] = bad ? S(NAN) : loss;
}

// q_j of one valid entry, for the backward (t from topk_teacher of the same row).
template <class S>
KDFAST_HD inline S topk_q(S lp, S inv_T, const TopKTeacher<S>& t) {
  return VMath<S>::exp(lp * inv_T - t.lse);
}

KDFAST_ISA_END
}  // namespace kdfast
