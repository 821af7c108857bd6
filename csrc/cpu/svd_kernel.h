// CPU kernel of the batched small-matrix SVD: one-sided Jacobi (see csrc/common/svd.h), written once with
// at::vec::Vectorized and compiled once per CPU capability (csrc/cpu/isa/).
//
// The SIMD lanes hold W different matrices (W = Vectorized<S>::size()): element (r, c) of the W tall views
// is one vector at X[(c * rows + r) * W]. Every rotation is then W independent rotations computed at once,
// with no horizontal reduction and no scalar square root on the critical path, which is what makes Jacobi
// pay off on small matrices. A lane whose pair is already orthogonal gets the identity rotation, so each
// matrix's result does not depend on its neighbours. Groups of W matrices run in parallel over the batch.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../common/svd.h"

namespace kdfast {

template <class T> struct SvdOps<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  static V abs(V x) { return x.abs(); }
  static V sqrt(V x) { return x.sqrt(); }
  static V max(V x, V y) { return V::blendv(y, x, x > y); }
  static V min(V x, V y) { return V::blendv(y, x, x < y); }
  static V sign_of(V x, V y) { return V::blendv(x, -x, y < V(T(0))); }
};

namespace cpu::CPU_CAPABILITY {

template <class S>
struct SvdGroup {
  using V = at::vec::Vectorized<S>;
  static constexpr int W = V::size();
  const SvdProblem& p;
  const int64_t rows, cols;
  std::vector<S> x, v, d;          // lane-interleaved T (cols x rows), V (cols x cols), squared norms
  std::vector<S> xs, vs, norm2;    // one lane's columns, de-interleaved for the finish
  std::vector<int> order;
  S scale[W];
  bool finite[W];

  explicit SvdGroup(const SvdProblem& prob)
      : p(prob), rows(prob.rows()), cols(prob.cols()), x(rows * cols * W), v(cols * cols * W), d(cols * W),
        xs(rows * cols), vs(cols * cols), norm2(cols), order(cols) {}

  // Lane l <- matrix b (or zeros past the batch), scaled by a power of two that brings its largest entry
  // into [0.5, 1): squared column norms then neither overflow nor underflow, and the scaling is exact.
  void load(int64_t b0) {
    const S* a = static_cast<const S*>(p.a);
    for (int l = 0; l < W; ++l) {
      const int64_t b = b0 + l;
      S amax = S(0);
      finite[l] = true;
      if (b < p.batch) {
        for (int64_t c = 0; c < cols; ++c)
          for (int64_t r = 0; r < rows; ++r) {
            const S e = std::abs(a[p.t_offset(b, r, c)]);
            if (!(e <= std::numeric_limits<S>::max())) finite[l] = false;
            amax = e > amax ? e : amax;
          }
      }
      int e2 = 0;
      if (finite[l] && amax > S(0)) std::frexp(amax, &e2);
      scale[l] = std::ldexp(S(1), -e2);
      for (int64_t c = 0; c < cols; ++c)
        for (int64_t r = 0; r < rows; ++r)
          x[(c * rows + r) * W + l] = b < p.batch && finite[l] ? a[p.t_offset(b, r, c)] * scale[l] : S(0);
      for (int64_t c = 0; c < cols; ++c)
        for (int64_t r = 0; r < cols; ++r) v[(c * cols + r) * W + l] = r == c ? S(1) : S(0);
    }
  }

  static V dot(const S* a, const S* b, int64_t n) {
    V acc0(S(0)), acc1(S(0));
    int64_t r = 0;
    for (; r + 1 < n; r += 2) {
      acc0 = at::vec::fmadd(V::loadu(a + r * W), V::loadu(b + r * W), acc0);
      acc1 = at::vec::fmadd(V::loadu(a + (r + 1) * W), V::loadu(b + (r + 1) * W), acc1);
    }
    if (r < n) acc0 = at::vec::fmadd(V::loadu(a + r * W), V::loadu(b + r * W), acc0);
    return acc0 + acc1;
  }

  static void rotate(S* a, S* b, int64_t n, V c, V s) {
    for (int64_t r = 0; r < n; ++r) {
      const V ai = V::loadu(a + r * W), bj = V::loadu(b + r * W);
      at::vec::fmsub(c, ai, s * bj).store(a + r * W);
      at::vec::fmadd(s, ai, c * bj).store(b + r * W);
    }
  }

  void sweeps() {
    const V polish(svd_polish_tol<S>()), converged(svd_converged_tol<S>(rows)), zero(S(0)), one(S(1));
    const int all = (1 << W) - 1;
    V done = zero;  // all-ones in the lanes whose matrix has converged: they get no further rotation
    for (int sweep = 0; sweep < kSvdMaxSweeps; ++sweep) {
      // Exact squared norms at the start of each sweep stop the drift of the per-rotation updates.
      for (int64_t c = 0; c < cols; ++c) {
        const S* xc = &x[c * rows * W];
        dot(xc, xc, rows).store(&d[c * W]);
      }
      V big = zero;  // lanes that made a rotation above the convergence tolerance in this sweep
      for (int64_t i = 0; i + 1 < cols; ++i) {
        for (int64_t j = i + 1; j < cols; ++j) {
          S* xi = &x[i * rows * W];
          S* xj = &x[j * rows * W];
          const V gamma = dot(xi, xj, rows);
          const V alpha = V::loadu(&d[i * W]), beta = V::loadu(&d[j * W]);
          const V scale = (alpha * beta).sqrt();
          const V need = (gamma.abs() > polish * scale) & (done == zero);
          if (need.zero_mask() == all) continue;
          V c, s, t;
          jacobi_rotation(alpha, beta, gamma, c, s, t);
          c = V::blendv(one, c, need);
          s = V::blendv(zero, s, need);
          t = V::blendv(zero, t, need);
          rotate(xi, xj, rows, c, s);
          rotate(&v[i * cols * W], &v[j * cols * W], cols, c, s);
          at::vec::fmadd(-t, gamma, alpha).store(&d[i * W]);
          at::vec::fmadd(t, gamma, beta).store(&d[j * W]);
          // t == 0 (a rotation lost to rounding) makes no progress, so it does not keep the sweeps going.
          big = big | ((gamma.abs() > converged * scale) & (t != zero) & need);
        }
      }
      done = done | (big == zero);
      if (done.zero_mask() == 0) break;
    }
  }

  // Lane l's singular values in descending order, U and Vh, into matrix b of the outputs.
  void finish(int64_t b, int l) {
    const int64_t m = p.m, n = p.n, k = cols;
    S* U = static_cast<S*>(p.u) + b * m * k;
    S* Sv = static_cast<S*>(p.s) + b * k;
    S* Vh = static_cast<S*>(p.vh) + b * k * n;
    if (!finite[l]) {
      const S nan = std::numeric_limits<S>::quiet_NaN();
      for (int64_t i = 0; i < m * k; ++i) U[i] = nan;
      for (int64_t i = 0; i < k; ++i) Sv[i] = nan;
      for (int64_t i = 0; i < k * n; ++i) Vh[i] = nan;
      return;
    }
    for (int64_t c = 0; c < cols; ++c) {
      S n2 = S(0);
      for (int64_t r = 0; r < rows; ++r) {
        const S e = x[(c * rows + r) * W + l];
        xs[c * rows + r] = e;
        n2 += e * e;
      }
      norm2[c] = n2;
      // Each rotation's c^2 + s^2 is 1 only to rounding, and the drift of V's column norms over the sweeps
      // dominates its loss of orthogonality in float32: renormalising removes it.
      S v2 = S(0);
      for (int64_t r = 0; r < cols; ++r) {
        const S e = v[(c * cols + r) * W + l];
        vs[c * cols + r] = e;
        v2 += e * e;
      }
      const S inv = S(1) / std::sqrt(v2);
      for (int64_t r = 0; r < cols; ++r) vs[c * cols + r] *= inv;
    }
    svd_order(norm2.data(), cols, order.data());
    const S smax = std::sqrt(norm2[order[0]]);
    for (int64_t q = 0; q < cols; ++q) {
      const S sq = std::sqrt(norm2[order[q]]);
      S* col = &xs[static_cast<int64_t>(order[q]) * rows];
      if (svd_null_column(sq, smax)) {
        svd_complete_column(xs.data(), rows, order.data(), q);
      } else {
        for (int64_t r = 0; r < rows; ++r) col[r] /= sq;
      }
      Sv[q] = sq / scale[l];
    }
    // T = U_T S V^T: for m >= n, U = U_T and Vh = V^T; otherwise U = V and Vh = U_T^T.
    const S* ucols = p.m >= p.n ? xs.data() : vs.data();
    const S* vcols = p.m >= p.n ? vs.data() : xs.data();
    for (int64_t r = 0; r < m; ++r)
      for (int64_t q = 0; q < k; ++q) U[r * k + q] = ucols[static_cast<int64_t>(order[q]) * m + r];
    for (int64_t q = 0; q < k; ++q)
      for (int64_t c = 0; c < n; ++c) Vh[q * n + c] = vcols[static_cast<int64_t>(order[q]) * n + c];
  }
};

template <class S>
void svd_run(const SvdProblem& p) {
  constexpr int W = SvdGroup<S>::W;
  const int64_t groups = (p.batch + W - 1) / W;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    SvdGroup<S> grp(p);
    for (int64_t g = g0; g < g1; ++g) {
      grp.load(g * W);
      grp.sweeps();
      for (int l = 0; l < W && g * W + l < p.batch; ++l) grp.finish(g * W + l, l);
    }
  });
}

void svd_forward(const SvdProblem& p) {
  if (p.dtype == DType::Float64)
    svd_run<double>(p);
  else
    svd_run<float>(p);
}

}  // namespace cpu::CPU_CAPABILITY
}  // namespace kdfast
