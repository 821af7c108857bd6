// CPU kernels of the fused temperature-softmax divergences (kd_fwd / kd_bwd), written once with
// at::vec::Vectorized and compiled once per CPU capability (csrc/cpu/isa/).
//
// Both layouts use the same block code. A block is up to kBlock vectors of W lanes, staged (converted to the
// accumulator type) from the inputs:
//   row mode   (inner == 1): the vectors hold kBlock * W consecutive classes of one row; lanes past the
//               last class hold -inf, which contributes nothing. Lanes are merged at the end of the row.
//   pixel mode (inner > 1):  vector k holds class c0 + k of W neighbouring rows (positions i0 .. i0 + W),
//               read through the class stride `inner`; every lane is its own row, so no transposing copy.
// The forward makes one pass over the inputs with an online softmax (block max, one rescale per block);
// jsd adds a second pass once the row's maxima and log-sums are known. The backward recomputes the probabilities
// from the saved row statistics and writes each gradient once. Maxima are of the raw logits: every exponent is
// (x - max) / T, exact in the subtraction, so that logits far from 0 keep their precision.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <functional>
#include <limits>
#include <type_traits>

#include "vec_math.h"

namespace kdfast::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

constexpr int kBlock = 16;

template <class A> struct KdLanes {
  using V = Vectorized<A>;
  static constexpr int W = V::size();
  V ms = V(-std::numeric_limits<A>::infinity()), zs = V(A(0));
  V mt = V(-std::numeric_limits<A>::infinity()), zt = V(A(0));
  V w = V(A(0)), z1 = V(A(0)), sy = V(A(0));

  KdRowState<A> lane(int l) const {
    alignas(64) A b[7][W];
    ms.store(b[0]); zs.store(b[1]); mt.store(b[2]); zt.store(b[3]); w.store(b[4]); z1.store(b[5]); sy.store(b[6]);
    return {{b[0][l], b[1][l]}, {b[2][l], b[3][l]}, b[4][l], b[5][l], b[6][l]};
  }
};

// Per-row constants of a kernel call.
template <class A> struct KdConsts {
  using V = Vectorized<A>;
  Divergence div;
  A inv_T, beta;
  bool target, ce_rescale;  // ce_rescale: target given and T != 1, so the log-sum of s at T = 1 needs its own sum
  explicit KdConsts(const KdProblem& p)
      : div(p.divergence), inv_T(A(1) / A(p.temperature)), beta(A(p.beta)),
        target(p.target != nullptr), ce_rescale(p.target != nullptr && p.temperature != 1.0) {}
};

// The reference point of a row's exponents: its maximum, or 0 where it has seen only -inf (so that exp gives 0,
// not NaN).
template <class A>
inline Vectorized<A> ref_point(Vectorized<A> m) {
  return Vectorized<A>::blendv(m, Vectorized<A>(A(0)), m == Vectorized<A>(-std::numeric_limits<A>::infinity()));
}

// Forward: fold one staged block (raw logits s, t; class index of every lane `cls`; the lanes' targets `y`)
// into the lanes' online sums.
template <class A>
inline void fwd_block(const KdConsts<A>& k, const A* s, const A* t, const Vectorized<A>* cls,
                      Vectorized<A> y, int nvec, KdLanes<A>& L) {
  using V = Vectorized<A>;
  constexpr int W = V::size();
  using M = VMath<V>;
  const V inv(k.inv_T), ninf(-std::numeric_limits<A>::infinity()), zero(A(0));
  V bms = ninf, bmt = ninf;
  for (int j = 0; j < nvec; ++j) {
    bms = at::vec::maximum(bms, V::loadu(s + j * W));
    bmt = at::vec::maximum(bmt, V::loadu(t + j * W));
  }
  const V nms = at::vec::maximum(L.ms, bms), nmt = at::vec::maximum(L.mt, bmt);
  const V rs = ref_point(nms), rt = ref_point(nmt);
  const V fs = M::exp((L.ms - rs) * inv), ft = M::exp((L.mt - rt) * inv);
  // w follows the maxima (KdRowState in common/kd_div.h).
  if (k.div == Divergence::KL) L.w = kd_w_moved(L.w, L.zt, ft, ref_point(L.mt), rt, ref_point(L.ms), rs, inv);
  else if (k.div == Divergence::ReverseKL) L.w = kd_w_moved(L.w, L.zs, fs, ref_point(L.ms), rs, ref_point(L.mt), rt, inv);
  L.zs = L.zs * fs;
  L.zt = L.zt * ft;
  if (k.ce_rescale) L.z1 = L.z1 * M::exp(L.ms - rs);
  for (int j = 0; j < nvec; ++j) {
    const V sv = V::loadu(s + j * W), tv = V::loadu(t + j * W);
    const V a = (sv - rs) * inv, b = (tv - rt) * inv;
    const V es = M::exp(a), et = M::exp(b);
    L.zs = L.zs + es;
    L.zt = L.zt + et;
    if (k.div == Divergence::KL) L.w = L.w + M::mul_nonzero(et, b - a);
    else if (k.div == Divergence::ReverseKL) L.w = L.w + M::mul_nonzero(es, a - b);
    if (k.target) {
      if (k.ce_rescale) L.z1 = L.z1 + M::exp(sv - rs);
      L.sy = L.sy + V::blendv(zero, sv, cls[j] == y);
    }
  }
  L.ms = nms;
  L.mt = nmt;
}

// The statistics and upstream gradients of the rows behind a block's lanes: reference points (maxima) and
// log-sums of both sides (KdStat), the divergence's row statistics, the cross-entropy's log-sum at T = 1.
template <class A> struct KdLaneStats {
  using V = Vectorized<A>;
  V ms, mt, ls_s, ls_t, aux0, aux1, ls1, g, gce, y;
};

// jsd second pass over one staged block, given the lanes' maxima and log-sums.
template <class A>
inline void jsd_block(const KdConsts<A>& k, const A* s, const A* t, int nvec, const KdLaneStats<A>& r,
                      Vectorized<A>& kl_t, Vectorized<A>& kl_s) {
  using V = Vectorized<A>;
  constexpr int W = V::size();
  const V inv(k.inv_T);
  for (int j = 0; j < nvec; ++j) {
    V dt, ds;
    jsd_terms<V, V>(V(k.beta), (V::loadu(s + j * W) - r.ms) * inv, (V::loadu(t + j * W) - r.mt) * inv, r.ls_s,
                    r.ls_t, dt, ds);
    kl_t = kl_t + dt;
    kl_s = kl_s + ds;
  }
}

// Backward of one block: gradients with respect to the raw logits into gs_out (and gt_out unless null).
template <class A>
inline void bwd_block(const KdConsts<A>& k, const A* s, const A* t, const Vectorized<A>* cls,
                      const KdLaneStats<A>& r, int nvec, A* gs_out, A* gt_out) {
  using V = Vectorized<A>;
  constexpr int W = V::size();
  using M = VMath<V>;
  const V inv(k.inv_T), zero(A(0));
  const V g = r.g * inv;  // d a / d s = 1 / T
  for (int j = 0; j < nvec; ++j) {
    const V sv = V::loadu(s + j * W);
    V da, db;
    divergence_grad<V, V>(k.div, V(k.beta), (sv - r.ms) * inv, (V::loadu(t + j * W) - r.mt) * inv, r.ls_s, r.ls_t,
                          r.aux0, r.aux1, da, db);
    V gs = M::mul_nonzero(g, da);
    if (k.target) {
      const V p1 = M::exp((sv - r.ms) - r.ls1) - V::blendv(zero, V(A(1)), cls[j] == r.y);
      gs = gs + M::mul_nonzero(r.gce, p1);
    }
    gs.store(gs_out + j * W);
    if (gt_out) M::mul_nonzero(g, db).store(gt_out + j * W);
  }
}

template <class TS, class TT, class A>
struct KdKernel {
  using V = Vectorized<A>;
  static constexpr int W = V::size();
  static constexpr int64_t kRowBlock = int64_t(kBlock) * W;

  const KdProblem& p;
  const KdConsts<A> k;
  const TS* s;
  const TT* t;

  explicit KdKernel(const KdProblem& prob)
      : p(prob), k(prob), s(static_cast<const TS*>(prob.student)), t(static_cast<const TT*>(prob.teacher)) {}

  A target_of(int64_t row) const { return p.target ? A(p.target[row]) : A(-1); }

  // ---- row mode (inner == 1) ----
  // Inputs already of the accumulator type are read in place, but for a row's last, partial block.
  static constexpr bool kInPlace = std::is_same_v<TS, A> && std::is_same_v<TT, A>;

  // Calls f(c0, n, nvec, cls, sp, tp) for each block of classes [c0, c0 + n) of one row; sp and tp point to the
  // block's values as A, staged into bs and bt where they need converting or padding.
  template <class F>
  void row_blocks(int64_t row, A* bs, A* bt, F&& f) const {
    const int64_t C = p.classes;
    const TS* srow = s + row * C;
    const TT* trow = t + row * C;
    const A ninf = -std::numeric_limits<A>::infinity();
    V cls[kBlock];
    for (int64_t c0 = 0; c0 < C; c0 += kRowBlock) {
      const int64_t n = std::min(kRowBlock, C - c0);
      const int nvec = int((n + W - 1) / W);
      if (k.target)
        for (int j = 0; j < nvec; ++j) cls[j] = V::arange(A(c0 + int64_t(j) * W), A(1));
      if constexpr (kInPlace) {
        if (n == kRowBlock) {
          f(c0, n, nvec, cls, reinterpret_cast<const A*>(srow + c0), reinterpret_cast<const A*>(trow + c0));
          continue;
        }
      }
      stage(srow + c0, bs, n, int64_t(nvec) * W, ninf);
      stage(trow + c0, bt, n, int64_t(nvec) * W, ninf);
      f(c0, n, nvec, cls, static_cast<const A*>(bs), static_cast<const A*>(bt));
    }
  }

  void forward_row(int64_t row) const {
    alignas(64) A bs[kRowBlock], bt[kRowBlock];
    if (!p.stats_given) {
      KdLanes<A> L;
      const V y(target_of(row));
      row_blocks(row, bs, bt, [&](int64_t, int64_t, int nvec, const V* cls, const A* sp, const A* tp) {
        fwd_block(k, sp, tp, cls, y, nvec, L);
      });
      KdRowState<A> st = L.lane(0);
      for (int l = 1; l < W; ++l) st = merge(st, L.lane(l), k.inv_T, k.div == Divergence::KL);
      kd_finish_row(p, row, st);
    }
    if (k.div == Divergence::JSD) {
      const KdLaneStats<A> r = softmax_stats(row, 1);
      V kl_t(A(0)), kl_s(A(0));
      row_blocks(row, bs, bt, [&](int64_t, int64_t, int nvec, const V*, const A* sp, const A* tp) {
        jsd_block(k, sp, tp, nvec, r, kl_t, kl_s);
      });
      jsd_finish_row<A>(p, row, at::vec::vec_reduce_all<A>(std::plus<V>(), kl_t),
                        at::vec::vec_reduce_all<A>(std::plus<V>(), kl_s));
    }
  }

  void backward_row(int64_t row, TS* gs, TT* gt) const {
    alignas(64) A bs[kRowBlock], bt[kRowBlock];
    const int64_t C = p.classes;
    const KdLaneStats<A> r = lane_stats(row, 1);
    alignas(64) A os[kRowBlock], ot[kRowBlock];
    row_blocks(row, bs, bt, [&](int64_t c0, int64_t n, int nvec, const V* cls, const A* sp, const A* tp) {
      // Full blocks of accumulator-typed gradients are written in place; the rest goes through os/ot.
      A* gs_out = os;
      A* gt_out = gt ? ot : nullptr;
      if constexpr (std::is_same_v<TS, A>) if (n == kRowBlock && gs) gs_out = gs + row * C + c0;
      if constexpr (std::is_same_v<TT, A>) if (n == kRowBlock && gt) gt_out = gt + row * C + c0;
      bwd_block(k, sp, tp, cls, r, nvec, gs_out, gt_out);
      if (gs && gs_out == os) unstage(os, gs + row * C + c0, n);
      if (gt && gt_out == ot) unstage(ot, gt + row * C + c0, n);
    });
  }

  // The softmax statistics of rows [row, row + n) as lanes (n == 1 broadcasts one row to every lane): maxima as
  // reference points (ref_point) and log-sums; the rest 0 (what jsd's second pass of the forward needs).
  KdLaneStats<A> softmax_stats(int64_t row, int n) const {
    const A* st = static_cast<const A*>(p.stats);
    const int64_t R = p.rows();
    auto load = [&](const A* base) { return n == 1 ? V(base[row]) : V::loadu(base + row, n); };
    KdLaneStats<A> r{};
    r.ms = ref_point(load(st + kMaxStudent * R));
    r.mt = ref_point(load(st + kMaxTeacher * R));
    r.ls_s = load(st + kLogSumStudent * R);
    r.ls_t = load(st + kLogSumTeacher * R);
    return r;
  }

  // All statistics and upstream gradients of rows [row, row + n) as lanes, for the backward.
  KdLaneStats<A> lane_stats(int64_t row, int n) const {
    const A* st = static_cast<const A*>(p.stats);
    const A* gd = static_cast<const A*>(p.grad_div);
    const A* gc = static_cast<const A*>(p.grad_ce);
    const int64_t R = p.rows();
    auto load = [&](const A* base) { return n == 1 ? V(base[row]) : V::loadu(base + row, n); };
    KdLaneStats<A> r = softmax_stats(row, n);
    r.aux0 = load(st + kAux0 * R);
    r.aux1 = k.div == Divergence::JSD ? load(st + kAux1 * R) : V(A(0));
    if (p.row_mask || p.skip_ignored) {
      alignas(64) A g[W] = {};
      for (int l = 0; l < n; ++l) g[l] = kd_grad_div_of<A>(p, row + l);
      r.g = n == 1 ? V(g[0]) : V::loadu(g);
    } else {
      r.g = p.grad_div_stride == 0 ? V(gd[0]) : load(gd);
    }
    if (k.target) {
      r.ls1 = load(st + kd_lse1_plane(k.div) * R);
      // An ignored row's cross-entropy is the constant 0: no gradient flows through it.
      alignas(64) A y[W] = {}, g[W] = {};
      for (int l = 0; l < n; ++l) {
        y[l] = target_of(row + l);
        g[l] = gc && p.target[row + l] != p.ignore_index ? gc[(row + l) * p.grad_ce_stride] : A(0);
      }
      r.y = n == 1 ? V(y[0]) : V::loadu(y);
      r.gce = n == 1 ? V(g[0]) : V::loadu(g);
    } else {
      r.ls1 = r.gce = r.y = V(A(0));
    }
    return r;
  }

  // ---- short rows (inner == 1, classes <= kShortRow) ----
  // The row is read whole (converted once into a buffer when it is not of the accumulator type): one pass for
  // the maxima, one for the sums against them, one horizontal reduction per sum. No online rescaling, no staging
  // of a partial block and no merge of W lane states with scalar exp/log, which cost more than a short row itself.
  static constexpr int64_t kShortRow = 1024;

  template <class T>
  const A* row_as_acc(const T* base, int64_t row, A* buf) const {
    const T* src = base + row * p.classes;
    if constexpr (std::is_same_v<T, A>) {
      return src;
    } else {
      at::vec::convert(src, buf, p.classes);
      return buf;
    }
  }

  // Vector c of a short row: lanes past the last class hold -inf, which contributes nothing.
  struct ShortRow {
    int64_t full;
    int tail;
    V pad;
    explicit ShortRow(int64_t C)
        : full(C / W * W), tail(int(C - C / W * W)), pad(V::arange(A(0), A(1)) >= V(A(C - C / W * W))) {}
    V at(const A* x, int64_t c) const {
      if (c < full) return V::loadu(x + c);
      return V::blendv(V::loadu(x + c, tail), V(-std::numeric_limits<A>::infinity()), pad);
    }
  };

  void forward_short(int64_t row) const {
    alignas(64) A bs[kShortRow], bt[kShortRow];
    const ShortRow R(p.classes);
    const A* sp = row_as_acc(s, row, bs);
    const A* tp = row_as_acc(t, row, bt);
    if (!p.stats_given) short_stats(row, R, sp, tp);
    if (k.div != Divergence::JSD) return;
    const KdLaneStats<A> r = softmax_stats(row, 1);
    const V inv(k.inv_T);
    V kl_t(A(0)), kl_s(A(0));
    for (int64_t c = 0; c < p.classes; c += W) {
      V dt, ds;
      jsd_terms<V, V>(V(k.beta), (R.at(sp, c) - r.ms) * inv, (R.at(tp, c) - r.mt) * inv, r.ls_s, r.ls_t, dt, ds);
      kl_t = kl_t + dt;
      kl_s = kl_s + ds;
    }
    auto vsum = [](V x, V y) { return x + y; };
    jsd_finish_row<A>(p, row, at::vec::vec_reduce_all<A>(vsum, kl_t), at::vec::vec_reduce_all<A>(vsum, kl_s));
  }

  // A short row's statistics (and kl's or reverse_kl's divergence), written by kd_finish_row.
  void short_stats(int64_t row, const ShortRow& R, const A* sp, const A* tp) const {
    using M = VMath<V>;
    const int64_t C = p.classes;
    const A ninf = -std::numeric_limits<A>::infinity();
    V vs(ninf), vt(ninf);
    for (int64_t c = 0; c < C; c += W) {
      vs = at::vec::maximum(vs, R.at(sp, c));
      vt = at::vec::maximum(vt, R.at(tp, c));
    }
    auto vmax = [](V x, V y) { return at::vec::maximum(x, y); };
    auto vsum = [](V x, V y) { return x + y; };
    const A ms = at::vec::vec_reduce_all<A>(vmax, vs), mt = at::vec::vec_reduce_all<A>(vmax, vt);
    const V rs(ms == ninf ? A(0) : ms), rt(mt == ninf ? A(0) : mt), inv(k.inv_T);
    V zs(A(0)), zt(A(0)), w(A(0)), z1(A(0));
    for (int64_t c = 0; c < C; c += W) {
      const V sv = R.at(sp, c), tv = R.at(tp, c);
      const V a = (sv - rs) * inv, b = (tv - rt) * inv;
      const V es = M::exp(a), et = M::exp(b);
      zs = zs + es;
      zt = zt + et;
      if (k.div == Divergence::KL) w = w + M::mul_nonzero(et, b - a);
      else if (k.div == Divergence::ReverseKL) w = w + M::mul_nonzero(es, a - b);
      if (k.ce_rescale) z1 = z1 + M::exp(sv - rs);
    }
    KdRowState<A> st{{ms, at::vec::vec_reduce_all<A>(vsum, zs)}, {mt, at::vec::vec_reduce_all<A>(vsum, zt)},
                     at::vec::vec_reduce_all<A>(vsum, w), k.ce_rescale ? at::vec::vec_reduce_all<A>(vsum, z1) : A(0), A(0)};
    if (k.target) {
      const int64_t y = p.target[row];
      if (y >= 0 && y < C) st.sy = sp[y];
    }
    kd_finish_row(p, row, st);
  }

  void backward_short(int64_t row, TS* gs, TT* gt) const {
    alignas(64) A bs[kShortRow], bt[kShortRow], os[kShortRow], ot[kShortRow];
    const int64_t C = p.classes;
    const ShortRow R(C);
    const A* sp = row_as_acc(s, row, bs);
    const A* tp = row_as_acc(t, row, bt);
    const KdLaneStats<A> r = lane_stats(row, 1);
    // Accumulator-typed gradients are written in place, but for the last, partial vector.
    A* gs_out = nullptr;
    A* gt_out = nullptr;
    if (gs) {
      if constexpr (std::is_same_v<TS, A>) gs_out = gs + row * C; else gs_out = os;
    }
    if (gt) {
      if constexpr (std::is_same_v<TT, A>) gt_out = gt + row * C; else gt_out = ot;
    }
    for (int64_t c = 0; c < R.full; c += W) {
      const V cls = V::arange(A(c), A(1));
      bwd_block(k, sp + c, tp + c, &cls, r, 1, gs_out ? gs_out + c : os, gt_out ? gt_out + c : nullptr);
    }
    if (R.tail) {
      alignas(64) A ts[W], tt[W], og[W], oh[W];
      R.at(sp, R.full).store(ts);
      R.at(tp, R.full).store(tt);
      const V cls = V::arange(A(R.full), A(1));
      bwd_block(k, ts, tt, &cls, r, 1, og, gt_out ? oh : nullptr);
      if (gs_out) std::copy(og, og + R.tail, gs_out + R.full);
      if (gt_out) std::copy(oh, oh + R.tail, gt_out + R.full);
    }
    if constexpr (!std::is_same_v<TS, A>) if (gs) unstage(os, gs + row * C, C);
    if constexpr (!std::is_same_v<TT, A>) if (gt) unstage(ot, gt + row * C, C);
  }

  // ---- pixel mode (inner > 1) ----
  // Calls f(c0, nk, cls) for each block of kBlock classes of the W rows at (o, i0 .. i0 + nl).
  template <class F>
  void pixel_blocks(int64_t o, int64_t i0, int nl, A* bs, A* bt, F&& f) const {
    const int64_t C = p.classes, I = p.inner;
    V cls[kBlock];
    for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
      const int nk = int(std::min<int64_t>(kBlock, C - c0));
      for (int j = 0; j < nk; ++j) {
        const int64_t off = (o * C + c0 + j) * I + i0;
        stage(s + off, bs + j * W, nl, W, A(0));
        stage(t + off, bt + j * W, nl, W, A(0));
        cls[j] = V(A(c0 + j));
      }
      f(c0, nk, cls);
    }
  }

  void forward_pixels(int64_t o, int64_t i0, int nl) const {
    alignas(64) A bs[kBlock * W], bt[kBlock * W];
    const int64_t row0 = o * p.inner + i0;
    alignas(64) A yl[W] = {};
    for (int l = 0; l < nl; ++l) yl[l] = target_of(row0 + l);
    const V y = V::loadu(yl);
    KdLanes<A> L;
    if (!p.stats_given) {
      pixel_blocks(o, i0, nl, bs, bt, [&](int64_t, int nk, const V* cls) { fwd_block(k, bs, bt, cls, y, nk, L); });
      for (int l = 0; l < nl; ++l) kd_finish_row(p, row0 + l, L.lane(l));
    }
    if (k.div == Divergence::JSD) {
      const KdLaneStats<A> r = softmax_stats(row0, nl);
      V kl_t(A(0)), kl_s(A(0));
      pixel_blocks(o, i0, nl, bs, bt, [&](int64_t, int nk, const V*) {
        jsd_block(k, bs, bt, nk, r, kl_t, kl_s);
      });
      alignas(64) A kt[W], ks[W];
      kl_t.store(kt);
      kl_s.store(ks);
      for (int l = 0; l < nl; ++l) jsd_finish_row<A>(p, row0 + l, kt[l], ks[l]);
    }
  }

  void backward_pixels(int64_t o, int64_t i0, int nl, TS* gs, TT* gt) const {
    alignas(64) A bs[kBlock * W], bt[kBlock * W], os[kBlock * W], ot[kBlock * W];
    const int64_t C = p.classes, I = p.inner;
    const KdLaneStats<A> r = lane_stats(o * I + i0, nl);
    pixel_blocks(o, i0, nl, bs, bt, [&](int64_t c0, int nk, const V* cls) {
      bwd_block(k, bs, bt, cls, r, nk, os, gt ? ot : nullptr);
      for (int j = 0; j < nk; ++j) {
        const int64_t off = (o * C + c0 + j) * I + i0;
        if (gs) unstage(os + j * W, gs + off, nl);
        if (gt) unstage(ot + j * W, gt + off, nl);
      }
    });
  }

  // ---- drivers ----
  template <class RowF, class PixF>
  void for_all(RowF&& row_f, PixF&& pix_f) const {
    const int64_t C = p.classes, I = p.inner;
    if (I == 1) {
      at::parallel_for(0, p.outer, std::max<int64_t>(1, 32768 / C), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) row_f(r);
      });
    } else {
      const int64_t groups = (I + W - 1) / W;
      at::parallel_for(0, p.outer * groups, std::max<int64_t>(1, 32768 / (C * W)), [&](int64_t b, int64_t e) {
        for (int64_t u = b; u < e; ++u) {
          const int64_t o = u / groups, i0 = (u % groups) * W;
          pix_f(o, i0, int(std::min<int64_t>(W, I - i0)));
        }
      });
    }
  }

  bool short_rows() const { return p.inner == 1 && p.classes <= kShortRow; }

  void forward() const {
    const bool brief = short_rows();
    for_all([&](int64_t r) { brief ? forward_short(r) : forward_row(r); },
            [&](int64_t o, int64_t i0, int nl) { forward_pixels(o, i0, nl); });
  }

  void backward() const {
    TS* gs = static_cast<TS*>(p.grad_student);
    TT* gt = static_cast<TT*>(p.grad_teacher);
    const bool brief = short_rows();
    for_all([&](int64_t r) { brief ? backward_short(r, gs, gt) : backward_row(r, gs, gt); },
            [&](int64_t o, int64_t i0, int nl) { backward_pixels(o, i0, nl, gs, gt); });
  }
};

}  // namespace kdfast::cpu::CPU_CAPABILITY

// Entry points of this capability, declared in csrc/cpu/dispatch.h.
namespace kdfast::cpu::CPU_CAPABILITY {

template <template <class, class, class> class Kernel, class F>
void dispatch_kd_types(const KdProblem& p, F&& f) {
  // Every pair of input dtypes is read as it is; the accumulator is double with acc_double (a float64 input, or a
  // temperature above kKdPreciseT), float otherwise.
  auto with_acc = [&](auto s_tag, auto acc_tag) {
    using TS = decltype(s_tag);
    using A = decltype(acc_tag);
    switch (p.teacher_dtype) {
      case DType::Float64:
        if constexpr (std::is_same_v<A, double>) return f(Kernel<TS, double, A>(p));
        TORCH_CHECK(false, "kdfast: a float64 teacher accumulates in double");
      case DType::Float32: return f(Kernel<TS, float, A>(p));
      case DType::Float16: return f(Kernel<TS, c10::Half, A>(p));
      case DType::BFloat16: return f(Kernel<TS, c10::BFloat16, A>(p));
    }
  };
  auto with_student = [&](auto acc_tag) {
    switch (p.student_dtype) {
      case DType::Float64:
        if constexpr (std::is_same_v<decltype(acc_tag), double>) return with_acc(double{}, acc_tag);
        TORCH_CHECK(false, "kdfast: a float64 student accumulates in double");
      case DType::Float32: return with_acc(float{}, acc_tag);
      case DType::Float16: return with_acc(c10::Half{}, acc_tag);
      case DType::BFloat16: return with_acc(c10::BFloat16{}, acc_tag);
    }
  };
  if (p.acc_double) with_student(double{});
  else with_student(float{});
}

void kd_forward(const KdProblem& p) {
  dispatch_kd_types<KdKernel>(p, [](const auto& kernel) { kernel.forward(); });
}

void kd_backward(const KdProblem& p) {
  dispatch_kd_types<KdKernel>(p, [](const auto& kernel) { kernel.backward(); });
}

}  // namespace kdfast::cpu::CPU_CAPABILITY
