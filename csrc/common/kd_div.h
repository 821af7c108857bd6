// Torch-free description of the fused temperature-softmax divergence problem, and the per-element math
// shared by the CPU and CUDA kernels. Host-device inline; no torch header may be included here.
#pragma once

#include <cmath>
#include <cstdint>

#include "dtype.h"

namespace kdfast {

enum class Divergence : int { KL = 0, ReverseKL = 1, JSD = 2 };

// Per-row statistics saved by the forward for the backward: planes of `rows` values, only those the
// configuration needs (kd_stat_planes): each side's maximum and log-sum, the divergence's row statistics (one for
// kl and reverse_kl, two for jsd), then the student's log-sum at T = 1 when there is a target.
// A row's log-softmax is (x - max) / T - log_sum: the maximum (an input value, exact) and the log-sum are kept
// apart, as ATen's log_softmax does, so that the log-probabilities of logits far from 0 (|x / T| of 1e4 and more)
// lose nothing to the rounding of one logsumexp number.
enum KdStat : int {
  kMaxStudent = 0,     // max(s)
  kMaxTeacher = 1,     // max(t)
  kLogSumStudent = 2,  // log sum exp((s - max(s)) / T)
  kLogSumTeacher = 3,  // log sum exp((t - max(t)) / T)
  kAux0 = 4,           // kl, reverse_kl: the divergence itself; jsd: KL(p_t || m)
  kAux1 = 5,           // jsd only: KL(p_s || m)
};

KDFAST_ISA_BEGIN

KDFAST_HD inline int kd_stat_planes(Divergence d, bool target) {
  return 5 + (d == Divergence::JSD ? 1 : 0) + (target ? 1 : 0);
}

// The plane of log sum exp(s - max(s)), the cross-entropy's log-sum at T = 1 (only with a target).
KDFAST_HD inline int kd_lse1_plane(Divergence d) { return d == Divergence::JSD ? 6 : 5; }

KDFAST_ISA_END

// The logits are read as (outer, classes, inner), element (o, c, i) at (o * classes + c) * inner + i:
// inner == 1 for a softmax over the last dim, inner = H*W for dim=1 of a contiguous (B, C, H, W) tensor.
// Row r = o * inner + i. Outputs and statistics are indexed by row.
struct KdProblem {
  const void* student;
  const void* teacher;
  DType student_dtype;
  DType teacher_dtype;
  int64_t outer, classes, inner;
  double temperature;
  Divergence divergence;
  double beta;             // jsd only
  const int64_t* target;   // optional, one class index per row (kd_loss)
  int64_t ignore_index;
  // Rows a reduction leaves out get no divergence gradient: those where row_mask (optional, one bool per row) is
  // false and, with skip_ignored, those whose target is ignore_index (kd_loss's KD term).
  const bool* row_mask;
  bool skip_ignored;
  bool acc_double;         // accumulate (and store rows/stats) in double instead of float: with a float64 input,
                           // and above kKdPreciseT for every input dtype (the inputs are read as they are)
  void* stats;             // kd_stat_planes() * rows accumulators, written by forward, read by backward
  // Forward with the rows' softmax statistics given in stats (kMaxStudent .. kLogSumTeacher: those of the whole
  // vocabulary when these logits are one rank's shard of it, kdfast.distributed): their pass is skipped and jsd's
  // partial sums over these classes are written with them (kAux0, kAux1 and div, not clamped at 0). jsd only.
  bool stats_given;

  // forward outputs (rows each, accumulator type)
  void* div;               // the unscaled divergence per row
  void* ce;                // cross-entropy per row at T = 1 (with a target), 0 on ignored rows

  // backward inputs and outputs
  const void* grad_div;    // rows, accumulator type, element r at grad_div[r * grad_div_stride]
  const void* grad_ce;     // the same for cross-entropy, or null
  int64_t grad_div_stride; // 1, or 0 for one value broadcast to every row (the gradient of a sum or mean)
  int64_t grad_ce_stride;
  void* grad_student;      // null when not wanted; dtype of the student
  void* grad_teacher;      // null when not wanted; dtype of the teacher

  KDFAST_HD int64_t rows() const { return outer * inner; }
};

// Above this temperature the kernels accumulate in double for every input dtype: the divergence falls as 1/T^2
// while float32 rounds the row statistics at about 1e-7 absolute, which the T^2 scale then magnifies (T = 1e4
// gave 11.92 for an exact 0.947). Only row-sized statistics are double: no input is copied.
constexpr double kKdPreciseT = 16.0;

KDFAST_ISA_BEGIN

// Whether a row counts in the reduction (see row_mask and skip_ignored).
KDFAST_HD inline bool kd_row_counted(const KdProblem& p, int64_t row) {
  if (p.row_mask && !p.row_mask[row]) return false;
  return !(p.skip_ignored && p.target && p.target[row] == p.ignore_index);
}

// The upstream gradient of a row's divergence: 0 on a row the reduction leaves out.
template <class S>
KDFAST_HD inline S kd_grad_div_of(const KdProblem& p, int64_t row) {
  return kd_row_counted(p, row) ? static_cast<const S*>(p.grad_div)[row * p.grad_div_stride] : S(0);
}

// Scalar and vector math used by the templates below. Specialised for float and double here, and for
// at::vec::Vectorized in csrc/cpu.
template <class V> struct VMath;

#define KDFAST_SCALAR_VMATH(T, EXP, LOG)                                                      \
  template <> struct VMath<T> {                                                               \
    KDFAST_HD static T exp(T x) { return EXP(x); }                                            \
    KDFAST_HD static T log(T x) { return LOG(x); }                                            \
    /* p * x, but 0 where p == 0 so that 0 * inf terms vanish; NaN still propagates */        \
    KDFAST_HD static T mul_nonzero(T p, T x) { return p == T(0) ? T(0) : p * x; }             \
    KDFAST_HD static T pick_equal(T a, T b, T x, T y) { return a == b ? x : y; }               \
    KDFAST_HD static T pick_positive(T c, T x, T y) { return c > T(0) ? x : y; }              \
    KDFAST_HD static T abs(T x) { return x < T(0) ? -x : x; }                                 \
  };
// float exp and log: the hardware approximations in device code (kd_div and topk_kd; the extension is built without
// --use_fast_math, and docs/gpu-check.md "Floating-point flags" gives their error bounds), libm's on the host.
#ifdef __CUDA_ARCH__
KDFAST_SCALAR_VMATH(float, __expf, __logf)
#else
KDFAST_SCALAR_VMATH(float, expf, logf)
#endif
KDFAST_SCALAR_VMATH(double, ::exp, ::log)
#undef KDFAST_SCALAR_VMATH

// log m, m = beta p_t + (1 - beta) p_s, formed in log space from the log-probabilities: the larger weighted side
// plus log(w_hi + w_lo exp(-|lpt - lps|)), whose argument lies in [min(beta, 1 - beta), 1], so that a mixture of
// subnormal or underflowing probabilities keeps its logarithm (the linear sum gave log 0 = -inf there, and inf or
// NaN terms). Exactly log p where both are equal (rounding the mixture would leave a residue of about 1e-7 per row
// of identical distributions). Both -inf (no term there): -inf.
template <class V, class S>
KDFAST_HD inline V jsd_log_mixture(S beta, V lps, V lpt) {
  using M = VMath<V>;
  const V d = lpt - lps;
  const V hi = M::pick_positive(d, lpt, lps);
  const V w_hi = M::pick_positive(d, V(beta), V(S(1) - beta)), w_lo = M::pick_positive(d, V(S(1) - beta), V(beta));
  return M::pick_equal(lps, lpt, lps, hi + M::log(w_hi + w_lo * M::exp(-M::abs(d))));
}

// Gradient of one row's divergence with respect to s/T (da) and t/T (db), for one element (or one vector of
// elements), from a = (s - max(s)) / T and b = (t - max(t)) / T. ls_*: the rows' log-sums (KdStat); aux0/aux1: the
// row statistics of KdStat.
template <class V, class S>
KDFAST_HD inline void divergence_grad(Divergence d, S beta, V a, V b, S ls_s, S ls_t, S aux0, S aux1,
                                      V& da, V& db) {
  using M = VMath<V>;
  const V lps = a - V(ls_s), lpt = b - V(ls_t);
  const V ps = M::exp(lps), pt = M::exp(lpt);
  if (d == Divergence::KL) {
    da = ps - pt;
    db = M::mul_nonzero(pt, lpt - lps - V(aux0));
  } else if (d == Divergence::ReverseKL) {
    da = M::mul_nonzero(ps, lps - lpt - V(aux0));
    db = pt - ps;
  } else {
    const V lm = jsd_log_mixture<V, S>(beta, lps, lpt);
    da = V(S(1) - beta) * M::mul_nonzero(ps, lps - lm - V(aux1));
    db = V(beta) * M::mul_nonzero(pt, lpt - lm - V(aux0));
  }
}

// The two Jensen-Shannon partial sums of one element: KL(p_t || m) and KL(p_s || m) contributions, from a and b
// relative to the rows' maxima (as divergence_grad).
template <class V, class S>
KDFAST_HD inline void jsd_terms(S beta, V a, V b, S ls_s, S ls_t, V& kl_t, V& kl_s) {
  using M = VMath<V>;
  const V lps = a - V(ls_s), lpt = b - V(ls_t);
  const V ps = M::exp(lps), pt = M::exp(lpt);
  const V lm = jsd_log_mixture<V, S>(beta, lps, lpt);
  kl_t = M::mul_nonzero(pt, lpt - lm);
  kl_s = M::mul_nonzero(ps, lps - lm);
}

// Online softmax state of one stream of raw logits x: running max m (of x, not x / T) and sum z of
// exp((x - m) / T).
template <class S> struct OnlineSum {
  S m, z;
};

// Merge two partial states (of disjoint element sets) into one. An empty state has m = -inf, z = 0.
template <class S>
KDFAST_HD inline OnlineSum<S> merge(OnlineSum<S> x, OnlineSum<S> y, S inv_T) {
  using M = VMath<S>;
  if (x.m != x.m || y.m != y.m) return {NAN, NAN};  // NaN seen: keep it
  const S m = x.m > y.m ? x.m : y.m;
  if (m == -INFINITY) return {m, x.z + y.z};  // both empty (or all -inf)
  return {m, x.z * M::exp((x.m - m) * inv_T) + y.z * M::exp((y.m - m) * inv_T)};
}

// The reference point of a row's exponents: its maximum, or 0 where it has seen only -inf (so that exp gives 0,
// not NaN).
template <class S>
KDFAST_HD inline S kd_ref_point(S m) { return m == S(-INFINITY) ? S(0) : m; }

// A row's forward accumulators: online sums of the student s and the teacher t; the weighted sum w of kl
// (sum exp(b) (b - a), b = (t - ref_t) / T, a = (s - ref_s) / T, ref the running maxima) or of reverse_kl (sum
// exp(a) (a - b)). w is kept against both sides' running maxima, so that the logits' distance from 0 never enters
// it: a sum over the raw t - s cancels against (max_t - max_s) / T where the two sides sit at different offsets
// (student logits around 1.2e5 against a teacher around 0 lost 3 digits in float32). z1 = sum exp(s - m_s) gives
// the log-sum of s at T = 1 for cross-entropy; sy = s[target].
template <class S> struct KdRowState {
  OnlineSum<S> s, t;
  S w, z1, sy;
};

// w of a part moved from its reference points to new ones (o: old, n: new; x the side whose probabilities weigh
// the terms, y the other): every term gains ((o_x - n_x) - (o_y - n_y)) / T and its weight the factor
// f_x = exp((o_x - n_x) / T). z_x: the part's sum of exp against o_x. An underflowed factor drops the part's terms,
// an infinite w included (a class of y at -inf whose own probability underflows: 0 * inf would make the row NaN).
template <class V>
KDFAST_HD inline V kd_w_moved(V w, V z_x, V f_x, V o_x, V n_x, V o_y, V n_y, V inv_T) {
  using M = VMath<V>;
  return M::mul_nonzero(f_x, w + M::mul_nonzero(z_x, ((o_x - n_x) - (o_y - n_y)) * inv_T));
}

// Merge the accumulators of two disjoint parts of one row (lanes on CPU, threads on CUDA). w_on_teacher: kl's w
// (weighted by the teacher); reverse_kl's otherwise (jsd has none: w = 0 stays 0). z1 is relative to m_s at T = 1.
template <class S>
KDFAST_HD inline KdRowState<S> merge(const KdRowState<S>& x, const KdRowState<S>& y, S inv_T, bool w_on_teacher) {
  using M = VMath<S>;
  KdRowState<S> r;
  r.s = merge(x.s, y.s, inv_T);
  r.t = merge(x.t, y.t, inv_T);
  const S rs = kd_ref_point(r.s.m), rt = kd_ref_point(r.t.m);
  const auto moved = [&](const KdRowState<S>& q) {
    const OnlineSum<S>& qx = w_on_teacher ? q.t : q.s;
    const S ox = kd_ref_point(qx.m), nx = w_on_teacher ? rt : rs;
    const S oy = kd_ref_point(w_on_teacher ? q.s.m : q.t.m), ny = w_on_teacher ? rs : rt;
    return kd_w_moved(q.w, qx.z, M::exp((qx.m - nx) * inv_T), ox, nx, oy, ny, inv_T);
  };
  r.w = r.s.m != r.s.m || r.t.m != r.t.m ? S(NAN) : moved(x) + moved(y);
  r.z1 = x.z1 * M::exp(x.s.m - rs) + y.z1 * M::exp(y.s.m - rs);
  r.sy = x.sy + y.sy;
  return r;
}

// A divergence is never negative: a negative value is rounding (of two nearly equal distributions), shown as 0.
// NaN stays NaN.
template <class S>
KDFAST_HD inline S kd_nonnegative(S x) { return x < S(0) ? S(0) : x; }

// Finish a row of the forward from its accumulators: write the statistics and the row outputs, and
// return nothing else. jsd needs a second pass (jsd_terms) and fills kAux0/kAux1/div afterwards.
template <class S>
KDFAST_HD inline void kd_finish_row(const KdProblem& p, int64_t row, const KdRowState<S>& st) {
  const int64_t rows = p.rows();
  S* stats = static_cast<S*>(p.stats);
  const S ls_s = VMath<S>::log(st.s.z), ls_t = VMath<S>::log(st.t.z);
  stats[kMaxStudent * rows + row] = st.s.m;
  stats[kMaxTeacher * rows + row] = st.t.m;
  stats[kLogSumStudent * rows + row] = ls_s;
  stats[kLogSumTeacher * rows + row] = ls_t;
  if (p.divergence != Divergence::JSD) {
    // KL(p || q) = E_p[a - b] - log z_p + log z_q with a, b the rows against their maxima (KdRowState::w): each
    // part is exactly 0 for one class and for identical rows, where the form with the logsumexps leaves a rounding
    // residue (-4.8e-7 per row for one float32 class).
    const bool kl = p.divergence == Divergence::KL;
    const S div = st.w / (kl ? st.t.z : st.s.z) + ((kl ? ls_s : ls_t) - (kl ? ls_t : ls_s));
    stats[kAux0 * rows + row] = div;
    static_cast<S*>(p.div)[row] = kd_nonnegative(div);
  }
  if (p.target) {
    const S ls1 = p.temperature == 1.0 ? ls_s : VMath<S>::log(st.z1);
    stats[kd_lse1_plane(p.divergence) * rows + row] = ls1;
    const int64_t y = p.target[row];
    // An out-of-range class (checked on the host where that costs no synchronisation) gives NaN.
    static_cast<S*>(p.ce)[row] =
        y == p.ignore_index ? S(0) : (y >= 0 && y < p.classes ? (st.s.m - st.sy) + ls1 : S(NAN));
  }
}

// Store the jsd of a row from its two partial sums.
template <class S>
KDFAST_HD inline void jsd_finish_row(const KdProblem& p, int64_t row, S kl_t, S kl_s) {
  const int64_t rows = p.rows();
  S* stats = static_cast<S*>(p.stats);
  stats[kAux0 * rows + row] = kl_t;
  stats[kAux1 * rows + row] = kl_s;
  const S div = S(p.beta) * kl_t + (S(1) - S(p.beta)) * kl_s;
  static_cast<S*>(p.div)[row] = p.stats_given ? div : kd_nonnegative(div);
}

KDFAST_ISA_END
}  // namespace kdfast
