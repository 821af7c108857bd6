// Torch-free description of the fused temperature-softmax divergence problem, and the per-element math
// shared by the CPU and CUDA kernels. Host-device inline; no torch header may be included here.
#pragma once

#include <cmath>
#include <cstdint>

#include "dtype.h"

namespace kdfast {

enum class Divergence : int { KL = 0, ReverseKL = 1, JSD = 2 };

// Per-row statistics saved by the forward for the backward: planes of `rows` values, only those the
// configuration needs (kd_stat_planes): the two logsumexps, the divergence's row statistics (one for kl and
// reverse_kl, two for jsd), then logsumexp(s) when there is a target.
enum KdStat : int {
  kLseStudent = 0,  // logsumexp(s / T)
  kLseTeacher = 1,  // logsumexp(t / T)
  kAux0 = 2,        // kl, reverse_kl: the divergence itself; jsd: KL(p_t || m)
  kAux1 = 3,        // jsd only: KL(p_s || m)
};

KDFAST_ISA_BEGIN

KDFAST_HD inline int kd_stat_planes(Divergence d, bool target) {
  return 3 + (d == Divergence::JSD ? 1 : 0) + (target ? 1 : 0);
}

// The plane of logsumexp(s), for the cross-entropy term (only with a target).
KDFAST_HD inline int kd_lse1_plane(Divergence d) { return d == Divergence::JSD ? 4 : 3; }

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
  bool acc_double;         // accumulate (and store rows/stats) in double instead of float
  void* stats;             // kd_stat_planes() * rows accumulators, written by forward, read by backward
  // Forward with the rows' logsumexps given in stats (kLseStudent, kLseTeacher: those of the whole vocabulary when
  // these logits are one rank's shard of it, kdfast.distributed): their pass is skipped and jsd's partial sums over
  // these classes are written with them (kAux0, kAux1 and div, not clamped at 0). jsd only.
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

// log m, m = beta p_t + (1 - beta) p_s, from the log-probabilities: exactly log p where both are equal (rounding
// the mixture would leave a positive residue of about 1e-7 per row of identical distributions).
template <class V, class S>
KDFAST_HD inline V jsd_log_mixture(S beta, V lps, V lpt, V ps, V pt) {
  using M = VMath<V>;
  return M::pick_equal(lps, lpt, lps, M::log(V(beta) * pt + V(S(1) - beta) * ps));
}

// Gradient of one row's divergence with respect to a = s/T (da) and b = t/T (db), for one element (or one
// vector of elements). lse_*: row logsumexps; aux0/aux1: the row statistics of KdStat.
template <class V, class S>
KDFAST_HD inline void divergence_grad(Divergence d, S beta, V a, V b, S lse_s, S lse_t, S aux0, S aux1,
                                      V& da, V& db) {
  using M = VMath<V>;
  const V lps = a - V(lse_s), lpt = b - V(lse_t);
  const V ps = M::exp(lps), pt = M::exp(lpt);
  if (d == Divergence::KL) {
    da = ps - pt;
    db = M::mul_nonzero(pt, lpt - lps - V(aux0));
  } else if (d == Divergence::ReverseKL) {
    da = M::mul_nonzero(ps, lps - lpt - V(aux0));
    db = pt - ps;
  } else {
    const V lm = jsd_log_mixture<V, S>(beta, lps, lpt, ps, pt);
    da = V(S(1) - beta) * M::mul_nonzero(ps, lps - lm - V(aux1));
    db = V(beta) * M::mul_nonzero(pt, lpt - lm - V(aux0));
  }
}

// The two Jensen-Shannon partial sums of one element: KL(p_t || m) and KL(p_s || m) contributions.
template <class V, class S>
KDFAST_HD inline void jsd_terms(S beta, V a, V b, S lse_s, S lse_t, V& kl_t, V& kl_s) {
  using M = VMath<V>;
  const V lps = a - V(lse_s), lpt = b - V(lse_t);
  const V ps = M::exp(lps), pt = M::exp(lpt);
  const V lm = jsd_log_mixture<V, S>(beta, lps, lpt, ps, pt);
  kl_t = M::mul_nonzero(pt, lpt - lm);
  kl_s = M::mul_nonzero(ps, lps - lm);
}

// Online softmax state of one stream: running max m and sum z of exp(x - m). A second weighted sum w
// (sum of exp(x - m) * y) rides along for the KL terms.
template <class S> struct OnlineSum {
  S m, z, w;
};

// Merge two partial states (of disjoint element sets) into one. An empty state has m = -inf, z = w = 0.
template <class S>
KDFAST_HD inline OnlineSum<S> merge(OnlineSum<S> x, OnlineSum<S> y) {
  if (x.m != x.m || y.m != y.m) return {NAN, NAN, NAN};  // NaN seen: keep it
  const S m = x.m > y.m ? x.m : y.m;
  if (m == -INFINITY) return {m, x.z + y.z, x.w + y.w};  // both empty (or all -inf)
  const S fx = VMath<S>::exp(x.m - m), fy = VMath<S>::exp(y.m - m);
  return {m, x.z * fx + y.z * fy, x.w * fx + y.w * fy};
}

template <class S>
KDFAST_HD inline S lse_of(const OnlineSum<S>& x) { return x.m + VMath<S>::log(x.z); }

// A row's forward accumulators: online sums of a = s/T (student) and b = t/T (teacher). The weighted sum w
// rides on the teacher for kl (sum exp(b - mb) (b - a)) and on the student for reverse_kl
// (sum exp(a - ma) (a - b)). z1 = sum exp(s - T ma) gives logsumexp(s) for cross-entropy; sy = s[target].
template <class S> struct KdRowState {
  OnlineSum<S> s, t;
  S z1, sy;
};

// Merge the accumulators of two disjoint parts of one row (lanes on CPU, threads on CUDA). z1 is relative to
// T * m_s, so it rescales like z_s with exponents multiplied by T.
template <class S>
KDFAST_HD inline KdRowState<S> merge(const KdRowState<S>& x, const KdRowState<S>& y, S T) {
  KdRowState<S> r;
  r.s = merge(x.s, y.s);
  r.t = merge(x.t, y.t);
  const S ref = r.s.m == -INFINITY ? S(0) : r.s.m;
  r.z1 = x.z1 * VMath<S>::exp((x.s.m - ref) * T) + y.z1 * VMath<S>::exp((y.s.m - ref) * T);
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
  const S lse_s = lse_of(st.s), lse_t = lse_of(st.t);
  stats[kLseStudent * rows + row] = lse_s;
  stats[kLseTeacher * rows + row] = lse_t;
  if (p.divergence != Divergence::JSD) {
    // KL(p || q) = E_p[x - y] - (m_x - m_y) - log z_x + log z_y for rows x, y with maxima m and sums z relative to
    // them: each bracket is exactly 0 for one class and for identical rows, where the form with the logsumexps
    // leaves a rounding residue (-4.8e-7 per row for one float32 class).
    const bool kl = p.divergence == Divergence::KL;
    const OnlineSum<S>& x = kl ? st.t : st.s;
    const OnlineSum<S>& y = kl ? st.s : st.t;
    const S div = (x.w / x.z - (x.m - y.m)) + (VMath<S>::log(y.z) - VMath<S>::log(x.z));
    stats[kAux0 * rows + row] = div;
    static_cast<S*>(p.div)[row] = kd_nonnegative(div);
  }
  if (p.target) {
    const S T = S(p.temperature);
    const S lse1 = T == S(1) ? lse_s : T * st.s.m + VMath<S>::log(st.z1);
    stats[kd_lse1_plane(p.divergence) * rows + row] = lse1;
    const int64_t y = p.target[row];
    // An out-of-range class (checked on the host where that costs no synchronisation) gives NaN.
    static_cast<S*>(p.ce)[row] = y == p.ignore_index ? S(0) : (y >= 0 && y < p.classes ? lse1 - st.sy : S(NAN));
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
