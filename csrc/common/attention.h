// Torch-free description of a batched attention-map problem (attention transfer, Zagoruyko & Komodakis) and the
// per-element math shared by the CPU and CUDA kernels. One problem holds every feature map of a call, so that one
// launch covers all layer pairs. Host-device inline; no torch header may be included here.
#pragma once

#include <cmath>
#include <cstdint>

#include "dtype.h"

namespace kdfast {

enum class Pool : int { Mean = 0, Sum = 1, Max = 2 };

// |x|^p specialised for the exponents that matter in practice: a general pow per element would dominate the
// cost of a memory-bound kernel (p = 2 is the published default, p = 1 the paper's other channel pooling).
enum class PowKind : int { One = 0, Two = 1, General = 2 };

KDFAST_ISA_BEGIN
inline PowKind pow_kind(double p) { return p == 1.0 ? PowKind::One : (p == 2.0 ? PowKind::Two : PowKind::General); }
KDFAST_ISA_END

// One feature map, read as (batch, channels, positions), element (b, c, i) at (b * channels + c) * positions + i.
struct AttentionFeature {
  const void* x;
  DType dtype;
  int64_t channels, positions;
  // forward output / backward input: the (batch, positions) map in the accumulator type, L2-normalised over the
  // positions when the problem says so.
  void* map;
  // max pooling only: the (batch, positions) first arg-max channel (int32), written by the forward.
  int32_t* argmax;
  // backward: d loss / d map (batch, positions, accumulator type; null in a transfer problem, which derives it
  // from grad_rows), and the gradient (dtype of x, null when unwanted)
  const void* grad_map;
  void* grad;
};

struct AttentionProblem {
  const AttentionFeature* features;
  int64_t count;   // number of feature maps
  int64_t batch;   // shared by every feature map
  double p;
  Pool pool;
  bool normalize;
  bool acc_double;  // every map is float64 and accumulates in float64 (the op promotes a mixed call)
  // (count, batch) accumulator-typed L2 norms of the pooled maps before normalisation: written by the forward,
  // read by the backward (only with normalize).
  void* norms;
  // Attention transfer (pairs > 0, normalize set): features [0, pairs) are the students and [pairs, 2 pairs) the
  // teachers of the layer pairs; the forward also writes rows (pairs, batch), the per-sample mean over positions of
  // (map_s - map_t)^2, and the backward takes grad_rows (pairs, batch) in place of the features' grad_map.
  int64_t pairs;
  void* rows;
  const void* grad_rows;
};

constexpr double kAttentionEps = 1e-12;  // torch.nn.functional.normalize's default eps

KDFAST_ISA_BEGIN

// A transfer row: the mean over a pair's positions of the squared differences, 0 for a pair without positions
// (an H = 0 or W = 0 map), as every loss gives 0 on empty input.
template <class A>
KDFAST_HD inline A transfer_row(A squared_sum, int64_t positions) {
  return positions > 0 ? squared_sum / A(positions) : A(0);
}

// abs, pow and sign of a scalar or (in csrc/cpu) of an at::vec::Vectorized; specialised per type.
template <class V> struct AttnMath;

#define KDFAST_SCALAR_ATTN_MATH(T, POW)                                                   \
  template <> struct AttnMath<T> {                                                        \
    KDFAST_HD static T abs(T x) { return x < T(0) ? -x : x; }                            \
    KDFAST_HD static T pow(T x, T e) { return POW(x, e); }                                \
    /* 0 stays 0 and NaN stays NaN */                                                   \
    KDFAST_HD static T sign(T x) { return x > T(0) ? T(1) : (x < T(0) ? T(-1) : x); }     \
  };
KDFAST_SCALAR_ATTN_MATH(float, powf)
KDFAST_SCALAR_ATTN_MATH(double, ::pow)
#undef KDFAST_SCALAR_ATTN_MATH

// |x|^p and d|x|^p/dx without the factor p (which the backward folds into its per-position coefficient), the
// latter 0 at x = 0 for every p (for p < 1 it has no finite value there; the reference takes 0 too).
template <PowKind K, class V, class S>
KDFAST_HD inline V pow_abs(V x, S p) {
  using M = AttnMath<V>;
  if constexpr (K == PowKind::Two) return x * x;
  else if constexpr (K == PowKind::One) return M::abs(x);
  else return M::pow(M::abs(x), V(p));
}

template <PowKind K, class V, class S>
KDFAST_HD inline V dpow_abs(V x, S p) {
  using M = AttnMath<V>;
  if constexpr (K == PowKind::Two) return x;  // d x^2 / dx = 2 x; the 2 is p
  else if constexpr (K == PowKind::One) return M::sign(x);
  else {
    // 0 at x = 0, where |x|^(p - 1) is inf for p < 1 (its sign, 0, times inf would be NaN): the base is 1 there
    const V sign = M::sign(x);
    return M::pow(M::abs(x) + (V(S(1)) - M::abs(sign)), V(p - S(1))) * sign;
  }
}

// d loss / d (pooled map) at one position, from the normalised map y, its upstream gradient dy, the sample's
// dot(y, dy) and norm n (as torch: normalize divides by max(n, eps); the norm gets no gradient below eps),
// times the pooling's factor `scale` (p / channels for mean, p otherwise).
// V is a scalar or a vector of positions; the per-sample values are scalars S.
template <class V, class S>
KDFAST_HD inline V pooled_grad(bool normalize, V y, V dy, S dot, S n, S scale) {
  if (!normalize) return dy * V(scale);
  // written so that a NaN norm takes the normalised branch and keeps its NaN
  if (n < S(kAttentionEps)) return dy / V(S(kAttentionEps)) * V(scale);
  return (dy - y * V(dot)) / V(n) * V(scale);
}

KDFAST_ISA_END
}  // namespace kdfast
