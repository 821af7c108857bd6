// Torch-free description of the sparse (top-k, or sampled) teacher divergence, and the per-row math shared by the
// CPU and CUDA kernels. Host-device inline; no torch header may be included here.
//
// Per row: x = (s - M) / T over V classes, M the row's largest logit (kept apart from the log-sum, as ATen's
// log_softmax does: the error of p then does not grow with |s / T|), L = log sum exp(x), p = exp(x - L). The
// teacher gives k entries (idx_j, lp_j), its log-probabilities at T = 1; lp_j = -inf marks padding, which takes no
// part and whose index is never read. The divergence D (kl, reverse_kl or jsd, kd_div's conventions) is taken over
// categories c with teacher probabilities Q and student probabilities P:
//   renormalize: the k entries, Q = softmax(lp / T); P_j = p[idx_j] for kl (the full-vocabulary log-probabilities:
//                DistillKit's "zero"), P_j = p[idx_j] / sum_l p[idx_l] for reverse_kl and jsd. A row without a valid
//                entry has loss 0 and gradient 0.
//   bucket:      one more category, the tail: Q from u = log(1 - sum_j exp(lp_j)), which the op forms per row in
//                float64 from the log-probabilities as given (TopKProblem::tail_log, csrc/topk_kd.cpp: taken as 0
//                within their dtype's rounding, and where the valid entries are all V classes; docs/guarantees.md),
//                P_tail = exp(Loff - L), Loff the log-sum over the classes that are NOT top-k classes: computed
//                from those classes, never as 1 - sum p[idx] (that cancels when the student's mass off the top-k is
//                small, the usual case for a trained student).
//   sampled:     weights w_j >= 0 given per entry (counts / draws) and lp_j the teacher's log-probabilities at T:
//                loss = sum_j w_j (lp_j - log p[idx_j]), kl only; its gradient is renormalize kl's with Q = w.
// With G_c = d D / d log P_c and S_G = sum_c G_c, the gradient with respect to x is, on a top-k class i,
// sum_{j: idx_j = i} G_j - S_G * (p_i, or sum_{j: idx_j = i} P_j for renormalized categories), and on every other
// class p_i (G_tail / P_tail - S_G) = exp(x_i - Loff) coef with coef = G_tail - S_G P_tail (bucket: relative to
// the classes off the top-k, so that no 1 / P_tail is formed: kl's G_tail / P_tail = -Q_tail / P_tail overflows
// where P_tail is tiny), exp(x_i - L) coef with coef = -S_G (renormalize kl, sampled), or 0 (renormalized
// categories: the other classes take no part).
#pragma once

#include <cmath>
#include <cstdint>

#include "dtype.h"
#include "kd_div.h"

namespace kdfast {

enum class TopKTail : int { Renormalize = 0, Bucket = 1 };

// Per-row statistics saved by the forward for the backward: planes of `rows` values.
enum TopKStat : int {
  kTopKMax = 0,      // M, the row's largest student logit
  kTopKLse = 1,      // L = log sum exp((s - M) / T) over the row
  kTopKRef = 2,      // the log-normaliser of P on the top-k classes: L, or log sum_j exp(x[idx_j]) (renormalized)
  kTopKTeacher = 3,  // the teacher's log-normaliser over its categories (unused when sampled)
  kTopKSumG = 4,     // S_G
  kTopKCoef = 5,     // the off-top coefficient (of exp(x - Loff) for the bucket, of exp(x - L) otherwise)
  kTopKOff = 6,      // Loff = log sum exp((s - M) / T) over the classes off the top-k (the teacher gradient's)
  kTopKPlanes = 7,
};

// Student logits (rows, classes) contiguous; indices (rows, k) int64 contiguous; logprobs (and weights) (rows, k)
// contiguous in the accumulator type (the op converts them: they are small).
struct TopKProblem {
  const void* student;
  DType student_dtype;
  const int64_t* indices;
  const void* logprobs;
  const void* weights;  // sampled teacher: the weight of each entry (null: top-k teacher, Q = softmax(lp / T))
  const void* tail_log;  // bucket forward: rows accumulators, the teacher's tail u (-inf: none), formed by the op
  int64_t rows, classes, k;
  double temperature;
  TopKTail tail;
  Divergence divergence;
  double beta;          // jsd only
  bool acc_double;      // accumulate (and store loss, stats, logprobs) in double instead of float
  void* stats;          // kTopKPlanes * rows accumulators, written by forward, read by backward
  void* loss;           // forward: the unscaled divergence per row (accumulator type)
  const void* grad_loss;   // backward: rows, accumulator type, element r at grad_loss[r * grad_stride]
  int64_t grad_stride;     // 1, or 0 for one value broadcast to every row (the gradient of a sum or mean)
  void* grad_student;      // backward output, dtype of the student

  // P over the k entries renormalised (reverse_kl and jsd with tail "renormalize").
  KDFAST_HD bool entries_ref() const {
    return tail == TopKTail::Renormalize && divergence != Divergence::KL;
  }
};

KDFAST_ISA_BEGIN

KDFAST_HD inline bool topk_index_ok(int64_t i, int64_t classes) { return i >= 0 && i < classes; }

// Online log-sum of (s - m) * inv_T with m the largest raw value seen (not scaled: the max stays apart).
template <class S> struct TopKSum {
  S m, z;
};

template <class S> KDFAST_HD inline TopKSum<S> topk_sum_empty() { return {S(-INFINITY), S(0)}; }

template <class S> KDFAST_HD inline void topk_sum_add(TopKSum<S>& st, S s, S inv_T) {
  if (s > st.m) {
    st.z = st.z * VMath<S>::exp((st.m - s) * inv_T) + S(1);
    st.m = s;
  } else if (s > S(-INFINITY)) {
    st.z += VMath<S>::exp((s - st.m) * inv_T);
  } else if (s != s) {
    st.m = st.z = s;
  }
}

template <class S> KDFAST_HD inline TopKSum<S> topk_sum_merge(TopKSum<S> a, TopKSum<S> b, S inv_T) {
  if (a.m != a.m || b.m != b.m) return {S(NAN), S(NAN)};
  const S m = a.m > b.m ? a.m : b.m;
  if (m == S(-INFINITY)) return {m, S(0)};
  return {m, a.z * VMath<S>::exp((a.m - m) * inv_T) + b.z * VMath<S>::exp((b.m - m) * inv_T)};
}

// Per-entry accumulators of a row's first pass over its k entries (merged across lanes or threads in any fixed
// order): the teacher's largest scaled log-probability, the valid entries, flags, and the log-sum of the student's
// x over the valid entries (for renormalized categories).
template <class S> struct TopKEntrySums {
  S tmax;
  int valid;
  bool bad;        // a NaN or positive log-probability, a NaN weight, an index out of range on a valid entry
  TopKSum<S> top;  // of the raw logits s[idx_j], valid entries with repeats
};

template <class S> KDFAST_HD inline TopKEntrySums<S> topk_entry_sums_empty() {
  return {S(-INFINITY), 0, false, topk_sum_empty<S>()};
}

// Whether entry j of a row takes part: a log-probability above -inf (top-k teacher), a positive weight (sampled),
// and (then) an index in range.
template <class S> KDFAST_HD inline bool topk_valid(const TopKProblem& p, int64_t row, int64_t j) {
  const int64_t at = row * p.k + j;
  return p.weights ? static_cast<const S*>(p.weights)[at] > S(0)
                   : static_cast<const S*>(p.logprobs)[at] > S(-INFINITY);
}

template <class S> KDFAST_HD inline bool topk_entry_ok(const TopKProblem& p, int64_t row, int64_t j) {
  return topk_valid<S>(p, row, j) && topk_index_ok(p.indices[row * p.k + j], p.classes);
}

template <class S, class Logit>
KDFAST_HD inline void topk_entry_sums_add(const TopKProblem& p, TopKEntrySums<S>& e, int64_t row, int64_t j,
                                          S inv_T, Logit&& s_at) {
  const S lp = static_cast<const S*>(p.logprobs)[row * p.k + j];
  const S w = p.weights ? static_cast<const S*>(p.weights)[row * p.k + j] : S(1);
  // A NaN weight, a NaN log-probability of a top-k teacher (not padding, then) or a log-probability above 0 on a
  // valid entry (checked on the host where that is free): the row's loss is NaN.
  if (w != w || (!p.weights && lp != lp)) e.bad = true;
  if (!topk_valid<S>(p, row, j)) return;
  if (lp != lp || lp > S(0)) e.bad = true;
  const int64_t c = p.indices[row * p.k + j];
  if (!topk_index_ok(c, p.classes)) {  // checked on the host where that is free; NaN otherwise
    e.bad = true;
    return;
  }
  ++e.valid;
  e.tmax = lp * inv_T > e.tmax ? lp * inv_T : e.tmax;
  topk_sum_add(e.top, S(s_at(c)), inv_T);
}

template <class S>
KDFAST_HD inline TopKEntrySums<S> topk_entry_sums_merge(const TopKEntrySums<S>& a, const TopKEntrySums<S>& b,
                                                        S inv_T) {
  return {a.tmax > b.tmax ? a.tmax : b.tmax, a.valid + b.valid, a.bad || b.bad,
          topk_sum_merge(a.top, b.top, inv_T)};
}

// What a row's categories need, once the student's sums and the first entry pass are known.
template <class S> struct TopKRow {
  S M, L, Loff;  // student: max, log-sum over the row, log-sum over the classes off the top-k (x units)
  S ref;         // log-normaliser of P on the top-k classes (L, or the log-sum over the valid entries)
  S u;           // bucket: the teacher's tail log-mass at T = 1 (-inf when it holds nothing)
  S tmax;        // the teacher's largest scaled category (the reference of its log-sum)
  S tlse;        // the teacher's log-normaliser (set after the second entry pass)
  S inv_T;
  bool bad;
  int valid;
};

// Row `row` from the student's online sums over the classes off the top-k (off) and on them (top, each class
// once), and the first entry pass.
template <class S>
KDFAST_HD inline TopKRow<S> topk_row(const TopKProblem& p, int64_t row, TopKSum<S> off, TopKSum<S> top,
                                     const TopKEntrySums<S>& e) {
  using M = VMath<S>;
  const S inv_T = S(1) / S(p.temperature);
  TopKRow<S> r;
  r.inv_T = inv_T;
  r.bad = e.bad;
  r.valid = e.valid;
  const TopKSum<S> all = topk_sum_merge(off, top, inv_T);
  r.M = all.m;
  r.L = M::log(all.z);
  r.Loff = off.z > S(0) ? M::log(off.z) + (off.m - r.M) * inv_T : (off.z == off.z ? S(-INFINITY) : off.z);
  r.ref = p.entries_ref() ? (e.top.z > S(0) ? M::log(e.top.z) + (e.top.m - r.M) * inv_T : S(-INFINITY)) : r.L;
  r.u = S(-INFINITY);
  r.tmax = e.tmax;
  if (p.tail == TopKTail::Bucket) {
    r.u = static_cast<const S*>(p.tail_log)[row];
    r.tmax = r.u * inv_T > r.tmax ? r.u * inv_T : r.tmax;
  }
  r.tlse = S(-INFINITY);
  return r;
}

// Second entry pass: the teacher's sum of exp(category - tmax) (entry j's share; the tail is added by
// topk_teacher_lse).
template <class S>
KDFAST_HD inline S topk_teacher_term(const TopKProblem& p, const TopKRow<S>& r, int64_t row, int64_t j) {
  const S lp = static_cast<const S*>(p.logprobs)[row * p.k + j];
  return lp > S(-INFINITY) && r.tmax > S(-INFINITY) ? VMath<S>::exp(lp * r.inv_T - r.tmax) : S(0);
}

template <class S> KDFAST_HD inline void topk_teacher_lse(const TopKProblem& p, TopKRow<S>& r, S z) {
  if (p.weights || r.tmax == S(-INFINITY)) return;
  if (p.tail == TopKTail::Bucket && r.u > S(-INFINITY)) z += VMath<S>::exp(r.u * r.inv_T - r.tmax);
  r.tlse = r.tmax + VMath<S>::log(z);
}

// One category's loss term and G = d D / d log P, from log P, log Q (for sampled: the weight and lp_j).
template <class S> struct TopKTerm {
  S loss, G;
};

template <class S>
KDFAST_HD inline TopKTerm<S> topk_term(Divergence d, S beta, S logP, S logQ, S Q) {
  using M = VMath<S>;
  const S P = M::exp(logP);
  if (d == Divergence::KL) return {M::mul_nonzero(Q, logQ - logP), -Q};
  if (d == Divergence::ReverseKL) {
    const S t = M::mul_nonzero(P, logP - logQ);
    return {t, t};
  }
  const S lm = jsd_log_mixture<S, S>(beta, logP, logQ);
  const S gs = (S(1) - beta) * M::mul_nonzero(P, logP - lm);
  return {beta * M::mul_nonzero(Q, logQ - lm) + gs, gs};
}

// Entry j's term (valid entries only; x_c = (s[idx_j] - M) / T).
template <class S>
KDFAST_HD inline TopKTerm<S> topk_entry_term(const TopKProblem& p, const TopKRow<S>& r, int64_t row, int64_t j,
                                            S x_c) {
  const S lp = static_cast<const S*>(p.logprobs)[row * p.k + j];
  if (p.weights) {
    const S w = static_cast<const S*>(p.weights)[row * p.k + j];
    return topk_term<S>(Divergence::KL, S(0), x_c - r.ref, lp, w);
  }
  const S logQ = lp * r.inv_T - r.tlse;
  return topk_term<S>(p.divergence, S(p.beta), x_c - r.ref, logQ, VMath<S>::exp(logQ));
}

// Finish the row from the sums of its entries' terms: adds the tail category, writes the loss and the statistics.
template <class S>
KDFAST_HD inline void topk_finish_row(const TopKProblem& p, int64_t row, const TopKRow<S>& r, S loss, S sum_g) {
  using M = VMath<S>;
  S coef = p.entries_ref() ? S(0) : -sum_g;
  if (p.tail == TopKTail::Bucket) {
    const S logP = r.Loff - r.L, logQ = r.u * r.inv_T - r.tlse;
    const TopKTerm<S> t = topk_term<S>(p.divergence, S(p.beta), logP, logQ, M::exp(logQ));
    loss += t.loss;
    sum_g += t.G;
    // Relative to Loff (see the top of this file); no class is off the top-k with mass where Loff = -inf.
    coef = r.Loff > S(-INFINITY) ? t.G - sum_g * M::exp(logP) : S(0);
  } else if (r.valid == 0) {
    loss = S(0);
  }
  S* stats = static_cast<S*>(p.stats);
  stats[kTopKMax * p.rows + row] = r.M;
  stats[kTopKLse * p.rows + row] = r.L;
  stats[kTopKRef * p.rows + row] = r.ref;
  stats[kTopKTeacher * p.rows + row] = r.tlse;
  stats[kTopKSumG * p.rows + row] = sum_g;
  stats[kTopKCoef * p.rows + row] = coef;
  stats[kTopKOff * p.rows + row] = r.Loff;
  static_cast<S*>(p.loss)[row] = r.bad ? S(NAN) : loss;
}

// The backward's view of a row, from the saved statistics.
template <class S> KDFAST_HD inline TopKRow<S> topk_row_of_stats(const TopKProblem& p, int64_t row) {
  const S* st = static_cast<const S*>(p.stats);
  TopKRow<S> r{};
  r.M = st[kTopKMax * p.rows + row];
  r.L = st[kTopKLse * p.rows + row];
  r.ref = st[kTopKRef * p.rows + row];
  r.tlse = st[kTopKTeacher * p.rows + row];
  r.Loff = st[kTopKOff * p.rows + row];
  r.inv_T = S(1) / S(p.temperature);
  return r;
}

// d D / d x on a top-k class c (x_c its scaled logit) from the sum of G over its entries and their number.
template <class S>
KDFAST_HD inline S topk_top_grad(const TopKProblem& p, const TopKRow<S>& r, S x_c, S sum_g_class, int entries,
                                 S sum_g) {
  const S P = VMath<S>::exp(x_c - r.ref);
  return sum_g_class - sum_g * (p.entries_ref() ? S(entries) : S(1)) * P;
}

// The log-sum that the off-top coefficient is relative to: Loff for the bucket, L otherwise.
template <class S> KDFAST_HD inline S topk_off_ref(const TopKProblem& p, const TopKRow<S>& r) {
  return p.tail == TopKTail::Bucket ? r.Loff : r.L;
}

// d D / d x on a class off the top-k: exp(x - topk_off_ref) coef (exactly 0 where coef is 0: then the exponential
// is not needed, and may be inf against a renormalized reference).
template <class S> KDFAST_HD inline S topk_off_grad(const TopKProblem& p, const TopKRow<S>& r, S x, S coef) {
  return coef == S(0) ? S(0) : coef * VMath<S>::exp(x - topk_off_ref(p, r));
}

KDFAST_ISA_END
}  // namespace kdfast
