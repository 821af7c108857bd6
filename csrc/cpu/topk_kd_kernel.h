// CPU kernels of the sparse (top-k or sampled) teacher divergence (topk_kd_fwd / topk_kd_bwd), written once with
// at::vec::Vectorized and compiled once per CPU capability (csrc/cpu/isa/). The math is csrc/common/topk_kd.h.
//
// Forward, per row: the valid top-k classes sorted (repeats merged), then one pass over the student logits with an
// online softmax of the classes OFF the top-k (block max, one rescale per block of kBlock vectors; a block that
// holds top-k classes is staged with them set to -inf), and the k entries gathered: the row's log-sum is the off
// and top sums merged, and the student's tail is the off sum itself, never 1 minus the top-k mass. Backward, per
// row: the entries' G summed per class (sorted, repeats merged) so that one pass over the row writes each gradient
// element once, in blocks staged in the accumulator type, then one conversion to the student's dtype.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common/topk_kd.h"
#include "vec_math.h"

namespace kdfast::cpu::CPU_CAPABILITY {

// A top-k class of a row in the backward: the sum of its entries' G and their number.
template <class A> struct TopKTarget {
  int64_t c;
  A sum_g;
  int n;
};

template <class TS, class A>
struct TopKKernel {
  using V = at::vec::Vectorized<A>;
  using M = VMath<V>;
  static constexpr int W = V::size();
  static constexpr int kBlock = 16;
  static constexpr int64_t kRowBlock = int64_t(kBlock) * W;
  // A row already of the accumulator type is read in place, but for its last, partial block and the blocks whose
  // top-k classes the forward masks.
  static constexpr bool kInPlace = std::is_same_v<TS, A>;
  static constexpr A kNegInf = -std::numeric_limits<A>::infinity();

  const TopKProblem& p;
  const TS* s;
  const A inv_T;

  explicit TopKKernel(const TopKProblem& prob)
      : p(prob), s(static_cast<const TS*>(prob.student)), inv_T(A(1) / A(prob.temperature)) {}

  // Calls f(c0, n, nvec, values) for each block of classes [c0, c0 + n) of one row, the values as A (staged into
  // buf, padded with -inf, where they need converting or padding). The sorted classes [mask, mask_end) read -inf.
  template <class F>
  void row_blocks(int64_t row, A* buf, F&& f, const int64_t* mask = nullptr, const int64_t* mask_end = nullptr) const {
    const int64_t C = p.classes;
    const TS* srow = s + row * C;
    for (int64_t c0 = 0; c0 < C; c0 += kRowBlock) {
      const int64_t n = std::min(kRowBlock, C - c0);
      const int nvec = int((n + W - 1) / W);
      const bool masked = mask != mask_end && *mask < c0 + n;
      if constexpr (kInPlace) {
        if (n == kRowBlock && !masked) {
          f(c0, n, nvec, reinterpret_cast<const A*>(srow + c0));
          continue;
        }
      }
      stage(srow + c0, buf, n, int64_t(nvec) * W, kNegInf);
      for (; mask != mask_end && *mask < c0 + n; ++mask) buf[*mask - c0] = kNegInf;
      f(c0, n, nvec, static_cast<const A*>(buf));
    }
  }

  A logit(int64_t row, int64_t c) const { return A(s[row * p.classes + c]); }

  // The online sum of the row's classes off the sorted top-k classes.
  TopKSum<A> off_sum(int64_t row, A* buf, const std::vector<int64_t>& top) const {
    const V inv(inv_T), ninf(kNegInf), zero(A(0));
    V m = ninf, z = zero;
    row_blocks(row, buf, [&](int64_t, int64_t, int nvec, const A* x) {
      V bm = ninf;
      for (int j = 0; j < nvec; ++j) bm = at::vec::maximum(bm, V::loadu(x + j * W));
      const V nm = at::vec::maximum(m, bm);
      const V ref = V::blendv(nm, zero, nm == ninf);  // a lane that has seen only -inf keeps 0, not NaN
      V acc = z * M::exp((m - ref) * inv);
      for (int j = 0; j < nvec; ++j) acc = acc + M::exp((V::loadu(x + j * W) - ref) * inv);
      z = acc;
      m = nm;
    }, top.data(), top.data() + top.size());
    alignas(64) A ms[W], zs[W];
    m.store(ms);
    z.store(zs);
    TopKSum<A> st{ms[0], zs[0]};
    for (int l = 1; l < W; ++l) st = topk_sum_merge(st, TopKSum<A>{ms[l], zs[l]}, inv_T);
    return st;
  }

  void forward_row(int64_t row, A* buf, std::vector<int64_t>& top) const {
    top.clear();
    for (int64_t j = 0; j < p.k; ++j)
      if (topk_entry_ok<A>(p, row, j)) top.push_back(p.indices[row * p.k + j]);
    std::sort(top.begin(), top.end());
    top.erase(std::unique(top.begin(), top.end()), top.end());
    const TopKSum<A> off = off_sum(row, buf, top);
    TopKSum<A> on = topk_sum_empty<A>();
    for (const int64_t c : top) topk_sum_add(on, logit(row, c), inv_T);
    TopKEntrySums<A> e = topk_entry_sums_empty<A>();
    for (int64_t j = 0; j < p.k; ++j)
      topk_entry_sums_add(p, e, row, j, inv_T, [&](int64_t c) { return logit(row, c); });
    TopKRow<A> r = topk_row(p, row, off, on, e);
    A z = A(0);
    for (int64_t j = 0; j < p.k; ++j) z += topk_teacher_term(p, r, row, j);
    topk_teacher_lse(p, r, z);
    A loss = A(0), sum_g = A(0);
    for (int64_t j = 0; j < p.k; ++j) {
      if (!topk_entry_ok<A>(p, row, j)) continue;
      const TopKTerm<A> t = topk_entry_term(p, r, row, j, (logit(row, p.indices[row * p.k + j]) - r.M) * inv_T);
      loss += t.loss;
      sum_g += t.G;
    }
    topk_finish_row(p, row, r, loss, sum_g);
  }

  // The row's top-k classes in order, repeats merged, each with the sum of its entries' G.
  void sorted_targets(int64_t row, const TopKRow<A>& r, std::vector<TopKTarget<A>>& out) const {
    out.clear();
    for (int64_t j = 0; j < p.k; ++j) {
      if (!topk_entry_ok<A>(p, row, j)) continue;
      const int64_t c = p.indices[row * p.k + j];
      out.push_back({c, topk_entry_term(p, r, row, j, (logit(row, c) - r.M) * inv_T).G, 1});
    }
    std::sort(out.begin(), out.end(), [](const auto& x, const auto& y) { return x.c < y.c; });
    size_t w = 0;
    for (size_t i = 0; i < out.size(); ++i) {
      if (w > 0 && out[w - 1].c == out[i].c) {
        out[w - 1].sum_g += out[i].sum_g;
        ++out[w - 1].n;
      } else {
        out[w++] = out[i];
      }
    }
    out.resize(w);
  }

  void backward_row(int64_t row, A* buf, A* obuf, std::vector<TopKTarget<A>>& targets) const {
    const int64_t C = p.classes;
    const A* stats = static_cast<const A*>(p.stats);
    const A sum_g = stats[kTopKSumG * p.rows + row], coef = stats[kTopKCoef * p.rows + row];
    const A g = static_cast<const A*>(p.grad_loss)[row * p.grad_stride] * inv_T;  // d x / d s = 1 / T
    TS* grow = static_cast<TS*>(p.grad_student) + row * C;
    if (g == A(0)) {  // a masked-out row (also where its logits hold inf or NaN)
      std::fill(grow, grow + C, TS(0));
      return;
    }
    const TopKRow<A> r = topk_row_of_stats<A>(p, row);
    sorted_targets(row, r, targets);
    size_t next = 0;
    const V gc(g * coef), vm(r.M), vl(topk_off_ref(p, r)), inv(inv_T);
    row_blocks(row, buf, [&](int64_t c0, int64_t n, int nvec, const A* x) {
      A* out = obuf;
      if constexpr (kInPlace) if (n == kRowBlock) out = reinterpret_cast<A*>(grow + c0);
      if (coef == A(0)) {
        std::fill(out, out + int64_t(nvec) * W, A(0));
      } else {
        for (int j = 0; j < nvec; ++j) (gc * M::exp((V::loadu(x + j * W) - vm) * inv - vl)).store(out + j * W);
      }
      for (; next < targets.size() && targets[next].c < c0 + n; ++next) {
        const TopKTarget<A>& t = targets[next];
        out[t.c - c0] = g * topk_top_grad(p, r, (x[t.c - c0] - r.M) * inv_T, t.sum_g, t.n, sum_g);
      }
      if (out == obuf) unstage(obuf, grow + c0, n);
    });
  }

  void forward() const {
    at::parallel_for(0, p.rows, grain(), [&](int64_t b, int64_t e) {
      alignas(64) A buf[kRowBlock];
      std::vector<int64_t> top;
      for (int64_t r = b; r < e; ++r) forward_row(r, buf, top);
    });
  }

  void backward() const {
    at::parallel_for(0, p.rows, grain(), [&](int64_t b, int64_t e) {
      alignas(64) A buf[kRowBlock];
      alignas(64) A obuf[kRowBlock];
      std::vector<TopKTarget<A>> targets;
      for (int64_t r = b; r < e; ++r) backward_row(r, buf, obuf, targets);
    });
  }

  int64_t grain() const { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, p.classes + p.k)); }
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
