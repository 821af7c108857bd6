// CPU kernels of the batched attention maps (attention_fwd / attention_bwd), written once with
// at::vec::Vectorized and compiled once per CPU capability (csrc/cpu/isa/).
//
// A feature map is (batch, channels, positions) with the positions contiguous, so the kernels vectorise along the
// positions and stream every channel row in memory order. Work is cut into units of one sample of one feature
// map and up to kChunk positions, whose accumulators stay in L1; the units of every feature map of the call are
// split among the threads by element count (parallel_units), so that one parallel region covers all layer pairs
// however unequal their sizes. The forward reads each feature once and writes only the maps (and the norms, and
// the arg-max channels for max pooling); the backward reads each feature once and writes its gradient once.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../common/attention.h"
#include "vec_math.h"

namespace kdfast {

template <class T> struct AttnMath<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  static V abs(V x) { return x.abs(); }
  static V pow(V x, V e) { return x.pow(e); }
  // 0 stays 0 and NaN stays NaN (neither compare selects a constant)
  static V sign(V x) {
    const V zero(T(0)), one(T(1));
    return V::blendv(V::blendv(x, -one, x < zero), one, x > zero);
  }
};

namespace cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

// Positions per unit: up to a whole 64 x 64 map, so that a unit reads its sample's channel rows back to back as
// one sequential stream (cut into 4 KiB runs at a channel stride, the same reads took 2.4x longer on imagenet
// shapes: every run restarts the hardware prefetcher); the 16 KiB of accumulators stay in L1/L2.
constexpr int64_t kChunk = 4096;
constexpr int64_t kUnitGrain = 32768;  // elements per thread task, at least

struct AttnUnit {
  int64_t f, b, i0, n;  // feature, sample, first position, positions
};

// The units of the features for which `use(f)` holds, in feature, sample, position order.
template <class Use>
std::vector<AttnUnit> attention_units(const AttentionProblem& p, Use&& use) {
  std::vector<AttnUnit> units;
  for (int64_t f = 0; f < p.count; ++f) {
    if (!use(p.features[f])) continue;
    const int64_t P = p.features[f].positions;
    for (int64_t b = 0; b < p.batch; ++b)
      for (int64_t i0 = 0; i0 < P; i0 += kChunk) units.push_back({f, b, i0, std::min(kChunk, P - i0)});
  }
  return units;
}

// Runs f(u) for every unit, splitting the units among the threads by cost (weight(u) >= 1 elements) rather than
// by count: a thread handles the units whose first element falls in its part of the total.
template <class Weight, class F>
void parallel_units(const std::vector<AttnUnit>& units, Weight&& weight, F&& f) {
  const int64_t n = int64_t(units.size());
  std::vector<int64_t> start(n + 1, 0);
  for (int64_t u = 0; u < n; ++u) start[u + 1] = start[u] + std::max<int64_t>(1, weight(units[u]));
  at::parallel_for(0, start[n], kUnitGrain, [&](int64_t b, int64_t e) {
    for (int64_t u = std::lower_bound(start.begin(), start.end(), b) - start.begin(); u < n && start[u] < e; ++u)
      f(units[u]);
  });
}

// Runs f(k) for the samples k in [0, n), which hold about `work` elements in all, on several threads only when
// that is worth a parallel region (waking the thread pool for a few small maps cost milliseconds on a busy machine).
template <class F>
void parallel_samples(int64_t n, int64_t work, F&& f) {
  const int64_t grain = std::max<int64_t>(1, work > 0 ? n * kUnitGrain / work : n);
  at::parallel_for(0, n, grain, [&](int64_t s, int64_t e) {
    for (int64_t k = s; k < e; ++k) f(k);
  });
}

// Calls f(T{}) with the element type of a feature; float64 features come only with float64 accumulation.
template <class A, class F>
void with_element_type(DType d, F&& f) {
  if constexpr (std::is_same_v<A, double>) {
    TORCH_CHECK(d == DType::Float64, "kdfast: a float64 attention problem holds only float64 features");
    f(double{});
  } else {
    switch (d) {
      case DType::Float32: return f(float{});
      case DType::Float16: return f(c10::Half{});
      case DType::BFloat16: return f(c10::BFloat16{});
      default: TORCH_CHECK(false, "kdfast: float64 feature in a float32 attention problem");
    }
  }
}

template <class A, PowKind K>
struct AttentionKernel {
  using V = Vectorized<A>;
  static constexpr int64_t W = V::size();

  const AttentionProblem& p;
  const A pexp;

  explicit AttentionKernel(const AttentionProblem& prob) : p(prob), pexp(A(prob.p)) {}

  // Row of n elements as accumulator values: the row itself when T is A, else converted into buf.
  template <class T>
  static const A* as_acc(const T* row, int64_t n, A* buf) {
    if constexpr (std::is_same_v<T, A>) {
      return row;
    } else {
      stage(row, buf, n, n, A(0));
      return buf;
    }
  }

  // f(j, m) for the vectors of n positions: m = W lanes except in the last one.
  template <class F>
  static void for_vectors(int64_t n, F&& f) {
    for (int64_t j = 0; j < n; j += W) f(j, int(std::min<int64_t>(W, n - j)));
  }

  // ---- forward ----
  // Pools positions [i0, i0 + n) of one sample over the channels into the (unnormalised) map.
  template <class T>
  void pool_unit(const AttentionFeature& f, const AttnUnit& u) const {
    alignas(64) A acc[kChunk], arg[kChunk], buf[kChunk];
    const int64_t C = f.channels, P = f.positions;
    const T* x = static_cast<const T*>(f.x) + u.b * C * P + u.i0;
    const bool is_max = p.pool == Pool::Max;
    const A* row = as_acc(x, u.n, buf);
    for_vectors(u.n, [&](int64_t j, int m) {
      pow_abs<K>(V::loadu(row + j, m), pexp).store(acc + j, m);
      V(A(0)).store(arg + j, m);
    });
    for (int64_t c = 1; c < C; ++c) {
      row = as_acc(x + c * P, u.n, buf);
      const V cv(static_cast<A>(c));
      for_vectors(u.n, [&](int64_t j, int m) {
        const V v = pow_abs<K>(V::loadu(row + j, m), pexp), a = V::loadu(acc + j, m);
        if (is_max) {
          // strictly greater keeps the first arg-max; a NaN wins once, so the map is NaN where the input is
          const V take = (v > a) | ((v != v) & (a == a));
          V::blendv(a, v, take).store(acc + j, m);
          V::blendv(V::loadu(arg + j, m), cv, take).store(arg + j, m);
        } else {
          (a + v).store(acc + j, m);
        }
      });
    }
    A* map = static_cast<A*>(f.map) + u.b * P + u.i0;
    const A scale = p.pool == Pool::Mean ? A(1) / A(C) : A(1);
    for_vectors(u.n, [&](int64_t j, int m) { (V::loadu(acc + j, m) * V(scale)).store(map + j, m); });
    if (is_max) {
      int32_t* am = f.argmax + u.b * P + u.i0;
      for (int64_t i = 0; i < u.n; ++i) am[i] = static_cast<int32_t>(arg[i]);
    }
  }

  // L2-normalises one sample's map as torch.nn.functional.normalize does, and keeps its norm.
  void normalize_sample(int64_t fi, int64_t b) const {
    const AttentionFeature& f = p.features[fi];
    A* map = static_cast<A*>(f.map) + b * f.positions;
    V ss(A(0));
    for_vectors(f.positions, [&](int64_t j, int m) {
      const V v = V::loadu(map + j, m);
      ss = ss + v * v;
    });
    const A norm = std::sqrt(at::vec::vec_reduce_all<A>(std::plus<V>(), ss));
    static_cast<A*>(p.norms)[fi * p.batch + b] = norm;
    const V denom(std::max(norm, A(kAttentionEps)));
    for_vectors(f.positions, [&](int64_t j, int m) { (V::loadu(map + j, m) / denom).store(map + j, m); });
  }

  void forward() const {
    const auto units = attention_units(p, [](const AttentionFeature&) { return true; });
    parallel_units(units, [&](const AttnUnit& u) { return p.features[u.f].channels * u.n; },
                   [&](const AttnUnit& u) {
                     const AttentionFeature& f = p.features[u.f];
                     with_element_type<A>(f.dtype, [&](auto t) { pool_unit<decltype(t)>(f, u); });
                   });
    if (!p.normalize) return;
    parallel_samples((p.pairs > 0 ? p.pairs : p.count) * p.batch, map_elements(), [&](int64_t k) {
      if (p.pairs > 0) transfer_sample(k / p.batch, k % p.batch);
      else normalize_sample(k / p.batch, k % p.batch);
    });
  }

  int64_t map_elements() const {
    int64_t n = 0;
    for (int64_t f = 0; f < p.count; ++f) n += p.batch * p.features[f].positions;
    return n;
  }

  // Normalises the student's and the teacher's map of one sample of layer pair k and writes its row: the mean over
  // positions of the squared difference.
  void transfer_sample(int64_t k, int64_t b) const {
    normalize_sample(k, b);
    normalize_sample(p.pairs + k, b);
    const int64_t P = p.features[k].positions;
    const A* ys = static_cast<const A*>(p.features[k].map) + b * P;
    const A* yt = static_cast<const A*>(p.features[p.pairs + k].map) + b * P;
    V acc(A(0));
    for_vectors(P, [&](int64_t j, int m) {
      const V d = V::loadu(ys + j, m) - V::loadu(yt + j, m);
      acc = acc + d * d;
    });
    static_cast<A*>(p.rows)[k * p.batch + b] = transfer_row(at::vec::vec_reduce_all<A>(std::plus<V>(), acc), P);
  }

  // ---- backward ----
  // d loss / d map at positions [i0, i0 + n) of sample b of feature fi: its grad_map, or in a transfer problem
  // grad_rows[k, b] times d rows[k, b] / d map = 2 (map - partner's map) / positions (either side), computed
  // into buf.
  const A* upstream(int64_t fi, int64_t b, int64_t i0, int64_t n, A* buf) const {
    const AttentionFeature& f = p.features[fi];
    const int64_t off = b * f.positions + i0;
    if (p.pairs == 0) return static_cast<const A*>(f.grad_map) + off;
    const bool student = fi < p.pairs;
    const int64_t k = student ? fi : fi - p.pairs;
    const A g = static_cast<const A*>(p.grad_rows)[k * p.batch + b] * A(2) / A(f.positions);
    const A* y = static_cast<const A*>(f.map) + off;
    const A* yo = static_cast<const A*>(p.features[student ? fi + p.pairs : k].map) + off;
    for_vectors(n, [&](int64_t j, int m) { (V(g) * (V::loadu(y + j, m) - V::loadu(yo + j, m))).store(buf + j, m); });
    return buf;
  }

  // dot(y, dy) of one sample's normalised map and its upstream gradient.
  A map_dot(int64_t fi, int64_t b) const {
    alignas(64) A buf[kChunk];
    const int64_t P = p.features[fi].positions;
    const A* y = static_cast<const A*>(p.features[fi].map) + b * P;
    V acc(A(0));
    for (int64_t i0 = 0; i0 < P; i0 += kChunk) {
      const int64_t n = std::min(kChunk, P - i0);
      const A* dy = upstream(fi, b, i0, n, buf);
      for_vectors(n, [&](int64_t j, int m) { acc = acc + V::loadu(y + i0 + j, m) * V::loadu(dy + j, m); });
    }
    return at::vec::vec_reduce_all<A>(std::plus<V>(), acc);
  }

  // Gradient of positions [i0, i0 + n) of one sample, for every channel.
  template <class T>
  void grad_unit(int64_t fi, const AttnUnit& u, const std::vector<A>& dots) const {
    const AttentionFeature& f = p.features[fi];
    alignas(64) A coef[kChunk], arg[kChunk], buf[kChunk];
    const int64_t C = f.channels, P = f.positions, off = u.b * P + u.i0;
    const A* y = static_cast<const A*>(f.map) + off;
    const A* dy = upstream(fi, u.b, u.i0, u.n, coef);  // coef is then computed in place
    const A dot = p.normalize ? dots[fi * p.batch + u.b] : A(0);
    const A norm = p.normalize ? static_cast<const A*>(p.norms)[fi * p.batch + u.b] : A(0);
    const A scale = p.pool == Pool::Mean ? pexp / A(C) : pexp;
    for_vectors(u.n, [&](int64_t j, int m) {
      pooled_grad(p.normalize, V::loadu(y + j, m), V::loadu(dy + j, m), dot, norm, scale).store(coef + j, m);
    });
    const bool is_max = p.pool == Pool::Max;
    if (is_max)
      for (int64_t i = 0; i < u.n; ++i) arg[i] = static_cast<A>(f.argmax[off + i]);
    const T* x = static_cast<const T*>(f.x) + u.b * C * P + u.i0;
    T* g = static_cast<T*>(f.grad) + u.b * C * P + u.i0;
    for (int64_t c = 0; c < C; ++c) {
      const A* row = as_acc(x + c * P, u.n, buf);
      A* out = std::is_same_v<T, A> ? reinterpret_cast<A*>(g + c * P) : buf;
      const V cv(static_cast<A>(c)), zero(A(0));
      for_vectors(u.n, [&](int64_t j, int m) {
        V d = V::loadu(coef + j, m) * dpow_abs<K>(V::loadu(row + j, m), pexp);
        if (is_max) d = V::blendv(zero, d, V::loadu(arg + j, m) == cv);
        d.store(out + j, m);
      });
      if constexpr (!std::is_same_v<T, A>) unstage(buf, g + c * P, u.n);
    }
  }

  void backward() const {
    auto wanted = [](const AttentionFeature& f) { return f.grad != nullptr; };
    std::vector<A> dots(p.normalize ? p.count * p.batch : 0);
    if (p.normalize) {
      parallel_samples(p.count * p.batch, map_elements(), [&](int64_t k) {
        if (wanted(p.features[k / p.batch])) dots[k] = map_dot(k / p.batch, k % p.batch);
      });
    }
    const auto units = attention_units(p, wanted);
    parallel_units(units, [&](const AttnUnit& u) { return p.features[u.f].channels * u.n; },
                   [&](const AttnUnit& u) {
                     with_element_type<A>(p.features[u.f].dtype,
                                          [&](auto t) { grad_unit<decltype(t)>(u.f, u, dots); });
                   });
  }
};

// Entry points of this capability, declared in csrc/cpu/dispatch.h.
template <class F>
void dispatch_attention(const AttentionProblem& p, F&& f) {
  auto with_acc = [&](auto a_tag) {
    using A = decltype(a_tag);
    switch (pow_kind(p.p)) {
      case PowKind::One: return f(AttentionKernel<A, PowKind::One>(p));
      case PowKind::Two: return f(AttentionKernel<A, PowKind::Two>(p));
      default: return f(AttentionKernel<A, PowKind::General>(p));
    }
  };
  if (p.acc_double) with_acc(double{});
  else with_acc(float{});
}

void attention_forward(const AttentionProblem& p) {
  dispatch_attention(p, [](const auto& kernel) { kernel.forward(); });
}

void attention_backward(const AttentionProblem& p) {
  dispatch_attention(p, [](const auto& kernel) { kernel.backward(); });
}

}  // namespace cpu::CPU_CAPABILITY
}  // namespace kdfast
