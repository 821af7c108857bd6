// Torch-free description of the batched small-matrix SVD problem, and the one-sided Jacobi (Hestenes) math
// shared by the CPU and CUDA kernels. Host-device inline; no torch header may be included here.
//
// Both kernels work on the "tall" view T (rows x cols, rows >= cols) of each matrix: T = A when m >= n, and
// T = A^T otherwise. Jacobi rotations of column pairs of T make its columns mutually orthogonal; then
// T V = U_T diag(S) with V the product of the rotations, so T = U_T S V^T. For A = T that is U = U_T, Vh = V^T;
// for A = T^T it is U = V, Vh = U_T^T.
#pragma once

#include <cmath>
#include <cstdint>

#include "dtype.h"

namespace kdfast {

struct SvdProblem {
  const void* a;                     // (batch, m, n) with the strides below (elements)
  int64_t batch, m, n;
  int64_t a_stride[3];
  DType dtype;                       // Float32 or Float64: inputs, outputs and arithmetic share it
  void* u;                           // (batch, m, k) contiguous
  void* s;                           // (batch, k) contiguous
  void* vh;                          // (batch, k, n) contiguous

  KDFAST_HD int64_t k() const { return m < n ? m : n; }
  KDFAST_HD int64_t rows() const { return m >= n ? m : n; }  // of the tall view T
  KDFAST_HD int64_t cols() const { return m >= n ? n : m; }
  // Element (r, c) of T for matrix b.
  KDFAST_HD int64_t t_offset(int64_t b, int64_t r, int64_t c) const {
    return m >= n ? b * a_stride[0] + r * a_stride[1] + c * a_stride[2]
                  : b * a_stride[0] + c * a_stride[1] + r * a_stride[2];
  }
};

// The kernels take matrices of at most this many columns in their tall view (k = min(m, n)): the column order
// is an insertion sort, and a CUDA block holds a matrix in shared memory. kdfast.manifold reads it (through
// kdfast._C.svd_max_cols) to send larger matrices to torch.linalg.svd.
constexpr int64_t kSvdMaxCols = 64;

// Sweeps stop when no pair of columns needed a rotation; this caps them for inputs that never settle
// (NaN, or rounding that keeps re-exciting a pair). Jacobi converges quadratically: 6-12 sweeps are typical.
constexpr int kSvdMaxSweeps = 30;

KDFAST_ISA_BEGIN

template <class S> struct SvdLimits;
template <> struct SvdLimits<float> {
  static constexpr float eps = 1.1920929e-07f;
};
template <> struct SvdLimits<double> {
  static constexpr double eps = 2.220446049250313e-16;
};

// A pair (i, j) of columns with squared norms alpha, beta and inner product gamma is rotated when
// |gamma| > tol * sqrt(alpha * beta): tol relative to the column norms is what gives one-sided Jacobi its high
// relative accuracy. Two tolerances: rotations are made down to kSvdPolishTol, near the rounding of one
// product, which halves the final loss of orthogonality, but a dot product of `rows` terms is only accurate to
// about sqrt(rows) eps, so a matrix is converged (and frozen) after a sweep with no rotation above
// svd_converged_tol; waiting for the polish tolerance would never end. Freezing each matrix on its own
// convergence keeps its result independent of the others processed beside it (in SIMD lanes on CPU).
template <class S>
KDFAST_HD inline S svd_polish_tol() {
  return S(2) * SvdLimits<S>::eps;
}
template <class S>
KDFAST_HD inline S svd_converged_tol(int64_t rows) {
  return SvdLimits<S>::eps * S(rows < 16 ? 4 : 1) * ::sqrt(S(rows));
}

// Elementwise operations the rotation needs, for a scalar here and for at::vec::Vectorized in csrc/cpu.
template <class V> struct SvdOps;
#define KDFAST_SCALAR_SVDOPS(T)                                                                 \
  template <> struct SvdOps<T> {                                                                \
    KDFAST_HD static T abs(T x) { return x < T(0) ? -x : x; }                                   \
    KDFAST_HD static T sqrt(T x) { return ::sqrt(x); }                                          \
    KDFAST_HD static T max(T x, T y) { return x > y ? x : y; }                                  \
    KDFAST_HD static T min(T x, T y) { return x < y ? x : y; }                                  \
    /* |x| with the sign of y (+ for y == 0) */                                                 \
    KDFAST_HD static T sign_of(T x, T y) { return y < T(0) ? -x : x; }                          \
  };
KDFAST_SCALAR_SVDOPS(float)
KDFAST_SCALAR_SVDOPS(double)
#undef KDFAST_SCALAR_SVDOPS

// The rotation that makes columns i and j orthogonal (Rutishauser): cosine c, sine s and t = s / c, with
// which the squared norms update as alpha -= t * gamma, beta += t * gamma. V is a scalar or a vector of
// independent lanes. sqrt(1 + zeta^2) is taken as a hypotenuse, so a huge zeta (a nearly null column against
// a large one) gives t ~ 1 / (2 zeta) instead of overflowing to t = 0.
template <class V>
KDFAST_HD inline void jacobi_rotation(V alpha, V beta, V gamma, V& c, V& s, V& t) {
  using O = SvdOps<V>;
  const V one = V(1);
  const V zeta = (beta - alpha) / (V(2) * gamma);
  const V az = O::abs(zeta);
  const V big = O::max(az, one), small = O::min(az, one) / big;
  t = O::sign_of(one / (az + big * O::sqrt(one + small * small)), zeta);
  c = one / O::sqrt(one + t * t);
  s = c * t;
}

// The CUDA kernel's sweep order: round-robin ("circle") tournament over the columns padded to an even count
// n2. Each of the n2 - 1 rounds pairs every column once, so a round's n2 / 2 rotations are independent and run
// in parallel (one warp each); over a sweep every pair meets exactly once. A pair with the padding column
// (index >= cols) is skipped. (On CPU the row-cyclic order measured faster: it keeps column i in L1.)
KDFAST_HD inline int64_t svd_padded_cols(int64_t cols) { return cols + (cols & 1); }
KDFAST_HD inline void svd_pair(int64_t n2, int64_t round, int64_t k, int64_t& i, int64_t& j) {
  const int64_t a = k == 0 ? n2 - 1 : (round + k) % (n2 - 1);
  const int64_t b = k == 0 ? round : (round - k + (n2 - 1)) % (n2 - 1);
  i = a < b ? a : b;
  j = a < b ? b : a;
}

// Column order by descending squared norm (insertion sort: k <= kSvdMaxCols, stable, deterministic).
template <class S>
KDFAST_HD inline void svd_order(const S* norm2, int64_t cols, int* order) {
  for (int64_t c = 0; c < cols; ++c) {
    int64_t p = c;
    while (p > 0 && norm2[order[p - 1]] < norm2[c]) {
      order[p] = order[p - 1];
      --p;
    }
    order[p] = static_cast<int>(c);
  }
}

// A column whose norm is at most eps^2 times the largest (a null direction, to rounding) carries no direction
// of its own; its U column is rebuilt orthonormal to the others so that U stays orthonormal on rank-deficient
// and zero matrices.
template <class S>
KDFAST_HD inline bool svd_null_column(S norm, S max_norm) {
  return !(norm > max_norm * SvdLimits<S>::eps * SvdLimits<S>::eps) || norm == S(0);
}

// Rebuild column order[p] of the column-major u (rows x cols) as a unit vector orthogonal to the columns
// order[0 .. p-1] (already orthonormal): start from the unit vector e_r on which those columns weigh least
// (its residual is at least (rows - p) / rows > 0), and orthogonalise it twice (Gram-Schmidt, twice is enough).
template <class S>
KDFAST_HD inline void svd_complete_column(S* u, int64_t rows, const int* order, int64_t p) {
  S* out = u + static_cast<int64_t>(order[p]) * rows;
  int64_t best = 0;
  S best_w = S(0);
  for (int64_t r = 0; r < rows; ++r) {
    S w = S(0);
    for (int64_t q = 0; q < p; ++q) {
      const S x = u[static_cast<int64_t>(order[q]) * rows + r];
      w += x * x;
    }
    if (r == 0 || w < best_w) {
      best = r;
      best_w = w;
    }
  }
  for (int64_t r = 0; r < rows; ++r) out[r] = r == best ? S(1) : S(0);
  for (int pass = 0; pass < 2; ++pass) {
    for (int64_t q = 0; q < p; ++q) {
      const S* uq = u + static_cast<int64_t>(order[q]) * rows;
      S dot = S(0);
      for (int64_t r = 0; r < rows; ++r) dot += uq[r] * out[r];
      for (int64_t r = 0; r < rows; ++r) out[r] -= dot * uq[r];
    }
    S n2 = S(0);
    for (int64_t r = 0; r < rows; ++r) n2 += out[r] * out[r];
    const S inv = S(1) / ::sqrt(n2);
    for (int64_t r = 0; r < rows; ++r) out[r] *= inv;
  }
}

KDFAST_ISA_END
}  // namespace kdfast
