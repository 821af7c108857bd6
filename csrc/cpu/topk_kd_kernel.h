// CPU kernels of the sparse (top-k) teacher divergence (topk_kd_fwd / topk_kd_bwd), written once with
// at::vec::Vectorized and compiled once per CPU capability (csrc/cpu/isa/). The math is csrc/common/topk_kd.h.
//
// Forward, per row: one pass over the student logits with an online softmax (block max, one rescale per block of
// kBlock vectors), then the gather of the k entries. Backward, per row: the top-k entries are sorted by class
// (repeats merged) so that one pass over the row writes each gradient element once, in blocks staged in the
// accumulator type: p * c everywhere, p - q on the top-k classes, then one conversion to the student's dtype.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "../common/topk_kd.h"
#include "vec_math.h"

namespace kdfast::cpu::CPU_CAPABILITY {

template <class TS, class A>
struct TopKKernel {
  using V = at::vec::Vectorized<A>;
  using M = VMath<V>;
  static constexpr int W = V::size();
  static constexpr int kBlock = 16;
  static constexpr int64_t kRowBlock = int64_t(kBlock) * W;
  // A row already of the accumulator type is read in place, but for its last, partial block.
  static constexpr bool kInPlace = std::is_same_v<TS, A>;

  const TopKProblem& p;
  const TS* s;
  const A inv_T;

  explicit TopKKernel(const TopKProblem& prob)
      : p(prob), s(static_cast<const TS*>(prob.student)), inv_T(A(1) / A(prob.temperature)) {}

  // Calls f(c0, n, nvec, values) for each block of classes [c0, c0 + n) of one row, the values as A (staged into
  // buf, padded with -inf, where they need converting or padding).
  template <class F>
  void row_blocks(int64_t row, A* buf, F&& f) const {
    const int64_t C = p.classes;
    const TS* srow = s + row * C;
    for (int64_t c0 = 0; c0 < C; c0 += kRowBlock) {
      const int64_t n = std::min(kRowBlock, C - c0);
      const int nvec = int((n + W - 1) / W);
      if constexpr (kInPlace) {
        if (n == kRowBlock) {
          f(c0, n, nvec, reinterpret_cast<const A*>(srow + c0));
          continue;
        }
      }
      stage(srow + c0, buf, n, int64_t(nvec) * W, -std::numeric_limits<A>::infinity());
      f(c0, n, nvec, static_cast<const A*>(buf));
    }
  }

  // logsumexp(s / T) of one row.
  A row_lse(int64_t row, A* buf) const {
    const V inv(inv_T), ninf(-std::numeric_limits<A>::infinity()), zero(A(0));
    V m = ninf, z = zero;
    row_blocks(row, buf, [&](int64_t, int64_t, int nvec, const A* x) {
      V bm = ninf;
      for (int j = 0; j < nvec; ++j) bm = at::vec::maximum(bm, V::loadu(x + j * W) * inv);
      const V nm = at::vec::maximum(m, bm);
      const V ref = V::blendv(nm, zero, nm == ninf);  // a lane that has seen only -inf keeps 0, not NaN
      V acc = z * M::exp(m - ref);
      for (int j = 0; j < nvec; ++j) acc = acc + M::exp(V::loadu(x + j * W) * inv - ref);
      z = acc;
      m = nm;
    });
    alignas(64) A ms[W], zs[W];
    m.store(ms);
    z.store(zs);
    OnlineSum<A> st{ms[0], zs[0], A(0)};
    for (int l = 1; l < W; ++l) st = merge(st, OnlineSum<A>{ms[l], zs[l], A(0)});
    return lse_of(st);
  }

  void forward_row(int64_t row, A* buf) const {
    const TS* srow = s + row * p.classes;
    const A lse = row_lse(row, buf);
    topk_finish_row<A>(p, row, lse, [&](int64_t c) { return A(srow[c]) * inv_T; });
  }

  // The row's top-k classes in order, repeats merged, each with its summed q.
  void sorted_targets(int64_t row, std::vector<std::pair<int64_t, A>>& out) const {
    const A* lp = static_cast<const A*>(p.logprobs) + row * p.k;
    const int64_t* idx = p.indices + row * p.k;
    const TopKTeacher<A> t = topk_teacher(lp, p.k, inv_T, p.tail);
    out.clear();
    for (int64_t j = 0; j < p.k; ++j)
      if (lp[j] > -std::numeric_limits<A>::infinity() && topk_index_ok(idx[j], p.classes))
        out.emplace_back(idx[j], topk_q(lp[j], inv_T, t));
    std::sort(out.begin(), out.end(), [](const auto& x, const auto& y) { return x.first < y.first; });
    size_t w = 0;
    for (size_t r = 0; r < out.size(); ++r) {
      if (w > 0 && out[w - 1].first == out[r].first) out[w - 1].second += out[r].second;
      else out[w++] = out[r];
    }
    out.resize(w);
  }

  void backward_row(int64_t row, A* buf, A* obuf, std::vector<std::pair<int64_t, A>>& targets) const {
    const int64_t C = p.classes;
    const A* stats = static_cast<const A*>(p.stats);
    const A lse = stats[kTopKLse * p.rows + row], coef = stats[kTopKCoef * p.rows + row];
    const A g = static_cast<const A*>(p.grad_loss)[row * p.grad_stride] * inv_T;  // d a / d s = 1 / T
    TS* grow = static_cast<TS*>(p.grad_student) + row * C;
    if (g == A(0)) {  // a masked-out row (also where its logits hold inf or NaN)
      std::fill(grow, grow + C, TS(0));
      return;
    }
    sorted_targets(row, targets);
    size_t next = 0;
    const V gc(g * coef), vl(lse), inv(inv_T);
    row_blocks(row, buf, [&](int64_t c0, int64_t n, int nvec, const A* x) {
      A* out = obuf;
      if constexpr (kInPlace) if (n == kRowBlock) out = reinterpret_cast<A*>(grow + c0);
      for (int j = 0; j < nvec; ++j) (gc * M::exp(V::loadu(x + j * W) * inv - vl)).store(out + j * W);
      for (; next < targets.size() && targets[next].first < c0 + n; ++next) {
        const int64_t c = targets[next].first;
        out[c - c0] = g * (VMath<A>::exp(x[c - c0] * inv_T - lse) - targets[next].second);
      }
      if (out == obuf) unstage(obuf, grow + c0, n);
    });
  }

  template <class F>
  void for_rows(F&& f) const {
    at::parallel_for(0, p.rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, p.classes)),
                     [&](int64_t b, int64_t e) {
                       alignas(64) A buf[kRowBlock];
                       alignas(64) A obuf[kRowBlock];
                       std::vector<std::pair<int64_t, A>> targets;
                       for (int64_t r = b; r < e; ++r) f(r, buf, obuf, targets);
                     });
  }

  void forward() const {
    for_rows([&](int64_t r, A* buf, A*, auto&) { forward_row(r, buf); });
  }

  void backward() const {
    for_rows([&](int64_t r, A* buf, A* obuf, auto& targets) { backward_row(r, buf, obuf, targets); });
  }
};

template <class F>
void dispatch_topk_types(const TopKProblem& p, F&& f) {
  switch (p.student_dtype) {
    case DType::Float64:
      TORCH_CHECK(p.acc_double, "kdfast: float64 logits accumulate in float64");
      return f(TopKKernel<double, double>(p));
    case DType::Float32: return f(TopKKernel<float, float>(p));
    case DType::Float16: return f(TopKKernel<c10::Half, float>(p));
    case DType::BFloat16: return f(TopKKernel<c10::BFloat16, float>(p));
  }
}

// Entry points of this capability, declared in csrc/cpu/dispatch.h.
void topk_kd_forward(const TopKProblem& p) {
  dispatch_topk_types(p, [](const auto& kernel) { kernel.forward(); });
}

void topk_kd_backward(const TopKProblem& p) {
  dispatch_topk_types(p, [](const auto& kernel) { kernel.backward(); });
}

}  // namespace kdfast::cpu::CPU_CAPABILITY
