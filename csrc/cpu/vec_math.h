// at::vec::Vectorized specialisation of kdfast::VMath, and staging helpers, for the CPU kernels.
// Included once per CPU capability (see csrc/cpu/isa/), inside that capability's compilation unit.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "../common/kd_div.h"

namespace kdfast {

template <class T> struct VMath<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  // ATen's fast exp (about 20 ulp, well inside float32 loss tolerances), made to pass NaN through (it clamps its
  // argument, which would turn NaN into a finite value) and exact at 0 (x + 1 there, and NaN for NaN): a row's
  // maximum then weighs exactly 1, so that one class and identical rows give an exactly 0 divergence and gradient.
  static V exp(V x) { return V::blendv(x.exp_u20(), x + V(T(1)), (x != x) | (x == V(T(0)))); }
  static V pick_equal(V a, V b, V x, V y) { return V::blendv(y, x, a == b); }
  static V pick_positive(V c, V x, V y) { return V::blendv(y, x, c > V(T(0))); }
  static V abs(V x) { return x.abs(); }
  static V log(V x) { return x.log(); }
  static V mul_nonzero(V p, V x) { return V::blendv(p * x, V(T(0)), p == V(T(0))); }
};

namespace cpu::CPU_CAPABILITY {

// Copy n elements of src into the accumulator-typed dst (converting), then fill dst up to len with pad.
template <class T, class A>
inline void stage(const T* src, A* dst, int64_t n, int64_t len, A pad) {
  at::vec::convert(src, dst, n);
  for (int64_t i = n; i < len; ++i) dst[i] = pad;
}

// Store n accumulator-typed values into dst (converting to dst's type).
template <class A, class T>
inline void unstage(const A* src, T* dst, int64_t n) {
  at::vec::convert(src, dst, n);
}

}  // namespace cpu::CPU_CAPABILITY
}  // namespace kdfast
