// CUDA kernels of the fused temperature-softmax divergences (kd_fwd / kd_bwd). Torch-free: CI compiles this
// file with the whole extension for the default architectures on a machine without a GPU.
//
// Same algorithm as the CPU kernels (csrc/cpu/kd_div_kernel.h), with the work split by layout and class count:
//   rows   (inner == 1): a group of GROUP threads per row, GROUP = 32 (a warp) for small C or the whole block
//          for large C; each thread walks chunks of VEC consecutive classes (16-byte loads where aligned) with
//          an online softmax (chunk max, one rescale per chunk); the group merges its threads' states in a fixed
//          order (shuffle butterfly, then shared memory), so results are deterministic and need no atomics.
//   pixels (inner > 1):  a thread per row (o, i), reading class c at stride `inner`; neighbouring threads read
//          neighbouring addresses, so loads coalesce without a transposing copy.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/kd_div.h"
#include "kd_div.h"
#include "convert.cuh"
#include "launch.cuh"

namespace kdfast::cuda {
namespace {

constexpr int kThreads = 256;

// VEC elements seen as whole 16-byte words, for vector loads and stores.
template <class T, int VEC> union Words {
  static constexpr int kWords = VEC * sizeof(T) / 16 > 0 ? VEC * sizeof(T) / 16 : 1;
  uint4 w[kWords];
  T v[VEC];
};

// Loads VEC elements at p[0], p[stride], ...: one or more 16-byte loads when `vector` (stride 1, aligned).
template <int VEC, class T, class A>
__device__ __forceinline__ void load_chunk(const T* p, int64_t stride, int n, bool vector, A (&out)[VEC], A pad) {
  if (vector) {
    if constexpr ((VEC * sizeof(T)) % 16 == 0) {
      Words<T, VEC> u;
#pragma unroll
      for (int k = 0; k < Words<T, VEC>::kWords; ++k) u.w[k] = __ldg(reinterpret_cast<const uint4*>(p) + k);
#pragma unroll
      for (int j = 0; j < VEC; ++j) out[j] = to_acc<A>(u.v[j]);
      return;
    }
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = j < n ? to_acc<A>(p[j * stride]) : pad;
}

template <int VEC, class T, class A>
__device__ __forceinline__ void store_chunk(T* p, int64_t stride, int n, bool vector, const A (&in)[VEC]) {
  if (vector) {
    if constexpr ((VEC * sizeof(T)) % 16 == 0) {
      Words<T, VEC> u;
#pragma unroll
      for (int j = 0; j < VEC; ++j) u.v[j] = from_acc<T>(in[j]);
#pragma unroll
      for (int k = 0; k < Words<T, VEC>::kWords; ++k) reinterpret_cast<uint4*>(p)[k] = u.w[k];
      return;
    }
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j)
    if (j < n) p[j * stride] = from_acc<T>(in[j]);
}

// max that keeps NaN (fmax would drop it).
template <class A> __device__ __forceinline__ A nan_max(A x, A y) { return (x != x || x > y) ? x : y; }

template <class A> struct Consts {
  Divergence div;
  A inv_T, beta;
  bool target, ce_rescale;
};

template <class A> Consts<A> consts_of(const KdProblem& p) {
  return {p.divergence, A(1) / A(p.temperature), A(p.beta), p.target != nullptr,
          p.target != nullptr && p.temperature != 1.0};
}


// One chunk of raw logits (s, t) of classes c0 .. c0 + n folded into a thread's online state. Maxima are of the raw
// logits: every exponent is (x - max) / T (see csrc/cpu/kd_div_kernel.h).
template <int VEC, class A>
__device__ __forceinline__ void fwd_chunk(const Consts<A>& k, const A (&s)[VEC], const A (&t)[VEC], int64_t c0, int n,
                                          int64_t y, KdRowState<A>& st) {
  A a[VEC], b[VEC];
  A bms = -INFINITY, bmt = -INFINITY;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    a[j] = j < n ? s[j] : A(-INFINITY);
    b[j] = j < n ? t[j] : A(-INFINITY);
    bms = nan_max(bms, a[j]);
    bmt = nan_max(bmt, b[j]);
  }
  const A nms = nan_max(st.s.m, bms), nmt = nan_max(st.t.m, bmt);
  const A rs = kd_ref_point(nms), rt = kd_ref_point(nmt);
  const A fs = VMath<A>::exp((st.s.m - rs) * k.inv_T), ft = VMath<A>::exp((st.t.m - rt) * k.inv_T);
  // w follows the maxima (KdRowState in common/kd_div.h).
  const A os = kd_ref_point(st.s.m), ot = kd_ref_point(st.t.m);
  if (k.div == Divergence::KL) st.w = kd_w_moved(st.w, st.t.z, ft, ot, rt, os, rs, k.inv_T);
  else if (k.div == Divergence::ReverseKL) st.w = kd_w_moved(st.w, st.s.z, fs, os, rs, ot, rt, k.inv_T);
  st.s.z *= fs;
  st.t.z *= ft;
  if (k.ce_rescale) st.z1 *= VMath<A>::exp(st.s.m - rs);
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const A da = (a[j] - rs) * k.inv_T, db = (b[j] - rt) * k.inv_T;
    const A es = VMath<A>::exp(da), et = VMath<A>::exp(db);
    st.s.z += es;
    st.t.z += et;
    if (k.div == Divergence::KL) st.w += VMath<A>::mul_nonzero(et, db - da);
    else if (k.div == Divergence::ReverseKL) st.w += VMath<A>::mul_nonzero(es, da - db);
    if (k.target && j < n) {
      if (k.ce_rescale) st.z1 += VMath<A>::exp(a[j] - rs);
      if (c0 + j == y) st.sy += s[j];
    }
  }
  st.s.m = nms;
  st.t.m = nmt;
}

template <class A> __device__ __forceinline__ A shfl_xor(A v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
template <class A> __device__ __forceinline__ A shfl0(A v, int width) { return __shfl_sync(0xffffffffu, v, 0, width); }

template <class A> __device__ __forceinline__ KdRowState<A> shfl_xor(const KdRowState<A>& x, int mask) {
  return {{shfl_xor(x.s.m, mask), shfl_xor(x.s.z, mask)}, {shfl_xor(x.t.m, mask), shfl_xor(x.t.z, mask)},
          shfl_xor(x.w, mask), shfl_xor(x.z1, mask), shfl_xor(x.sy, mask)};
}
template <class A> __device__ __forceinline__ KdRowState<A> shfl0(const KdRowState<A>& x, int width) {
  return {{shfl0(x.s.m, width), shfl0(x.s.z, width)}, {shfl0(x.t.m, width), shfl0(x.t.z, width)},
          shfl0(x.w, width), shfl0(x.z1, width), shfl0(x.sy, width)};
}

// Deterministic all-reduce of a value over a group of GROUP threads (a warp's lanes, or the whole block): a
// butterfly inside each warp, lane 0's result broadcast, then the warps' results combined in a fixed order.
// Every thread of the group returns the same value. `smem` holds kThreads / 32 slots.
template <int GROUP, class V, class Combine>
__device__ __forceinline__ V group_reduce(V v, Combine combine, V* smem) {
  constexpr int kWidth = GROUP < 32 ? GROUP : 32;
#pragma unroll
  for (int off = kWidth / 2; off > 0; off /= 2) v = combine(v, shfl_xor(v, off));
  v = shfl0(v, kWidth);
  if constexpr (GROUP > 32) {
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) smem[warp] = v;
    __syncthreads();
    v = smem[0];
    for (int w = 1; w < GROUP / 32; ++w) v = combine(v, smem[w]);
    __syncthreads();  // smem is reused by the next reduction
  }
  return v;
}

// ---- row mode ----

// A row's softmax statistics for jsd's pass: reference points (maxima) and log-sums, from the row's own state or,
// with KdProblem::stats_given, from stats.
template <class A> struct SoftmaxStats {
  A ms, mt, ls_s, ls_t;
};

template <class A>
__device__ __forceinline__ SoftmaxStats<A> softmax_stats(const KdProblem& p, const KdRowState<A>& st, int64_t row) {
  if (!p.stats_given) return {kd_ref_point(st.s.m), kd_ref_point(st.t.m), VMath<A>::log(st.s.z), VMath<A>::log(st.t.z)};
  const A* g = static_cast<const A*>(p.stats);
  const int64_t R = p.rows();
  return {kd_ref_point(g[kMaxStudent * R + row]), kd_ref_point(g[kMaxTeacher * R + row]), g[kLogSumStudent * R + row],
          g[kLogSumTeacher * R + row]};
}

template <class TS, class TT, class A, int GROUP, int VEC>
__global__ void __launch_bounds__(kThreads) kd_fwd_rows(KdProblem p, Consts<A> k, bool vector) {
  __shared__ KdRowState<A> smem_state[kThreads / 32];
  __shared__ A smem_sum[kThreads / 32];
  const TS* s = static_cast<const TS*>(p.student);
  const TT* t = static_cast<const TT*>(p.teacher);
  const int64_t C = p.classes, rows = p.outer;
  constexpr int kRowsPerBlock = kThreads / GROUP;
  const int lane = threadIdx.x % GROUP;
  // Every thread of a block runs the same number of iterations (the group's __syncthreads needs it).
  for (int64_t base = int64_t(blockIdx.x) * kRowsPerBlock; base < rows; base += int64_t(gridDim.x) * kRowsPerBlock) {
    const int64_t row = base + threadIdx.x / GROUP;
    const bool live = row < rows;
    const int64_t y = live && k.target ? p.target[row] : -1;
    KdRowState<A> st{{A(-INFINITY), A(0)}, {A(-INFINITY), A(0)}, A(0), A(0), A(0)};
    // Calls f(c0, n, s, t) on this thread's chunks of the row.
    auto for_chunks = [&](auto&& f) {
      if (!live) return;
      for (int64_t c0 = int64_t(lane) * VEC; c0 < C; c0 += int64_t(GROUP) * VEC) {
        const int n = int(C - c0 < VEC ? C - c0 : VEC);
        A sv[VEC], tv[VEC];
        load_chunk<VEC>(s + row * C + c0, 1, n, vector && n == VEC, sv, A(0));
        load_chunk<VEC>(t + row * C + c0, 1, n, vector && n == VEC, tv, A(0));
        f(c0, n, sv, tv);
      }
    };
    if (!p.stats_given) {  // uniform over the launch: every thread reaches group_reduce's barriers or none
      for_chunks([&](int64_t c0, int n, const A(&sv)[VEC], const A(&tv)[VEC]) {
        fwd_chunk<VEC>(k, sv, tv, c0, n, y, st);
      });
      st = group_reduce<GROUP>(st, [&](const KdRowState<A>& x, const KdRowState<A>& z) { return merge(x, z, k.inv_T, k.div == Divergence::KL); },
                               smem_state);
      if (live && lane == 0) kd_finish_row(p, row, st);
    }
    if (k.div != Divergence::JSD) continue;
    const SoftmaxStats<A> r = live ? softmax_stats(p, st, row) : SoftmaxStats<A>{A(0), A(0), A(0), A(0)};
    const A ms = r.ms, mt = r.mt, ls_s = r.ls_s, ls_t = r.ls_t;
    A kl_t = 0, kl_s = 0;
    for_chunks([&](int64_t, int n, const A(&sv)[VEC], const A(&tv)[VEC]) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        if (j >= n) break;
        A dt, ds;
        jsd_terms<A, A>(k.beta, (sv[j] - ms) * k.inv_T, (tv[j] - mt) * k.inv_T, ls_s, ls_t, dt, ds);
        kl_t += dt;
        kl_s += ds;
      }
    });
    auto add = [](A x, A z) { return x + z; };
    kl_t = group_reduce<GROUP>(kl_t, add, smem_sum);
    kl_s = group_reduce<GROUP>(kl_s, add, smem_sum);
    if (live && lane == 0) jsd_finish_row<A>(p, row, kl_t, kl_s);
  }
}

// The statistics and upstream gradients of one row: reference points (maxima) and log-sums of both sides, the
// divergence's row statistics, the cross-entropy's log-sum at T = 1 (KdStat).
template <class A> struct RowGrad {
  A ms, mt, ls_s, ls_t, aux0, aux1, ls1, g, gce;
  int64_t y;
};

template <class A> __device__ __forceinline__ RowGrad<A> row_grad(const KdProblem& p, const Consts<A>& k, int64_t row) {
  const A* st = static_cast<const A*>(p.stats);
  const int64_t R = p.rows();
  RowGrad<A> r;
  r.ms = kd_ref_point(st[kMaxStudent * R + row]);
  r.mt = kd_ref_point(st[kMaxTeacher * R + row]);
  r.ls_s = st[kLogSumStudent * R + row];
  r.ls_t = st[kLogSumTeacher * R + row];
  r.aux0 = st[kAux0 * R + row];
  r.aux1 = k.div == Divergence::JSD ? st[kAux1 * R + row] : A(0);
  r.g = kd_grad_div_of<A>(p, row) * k.inv_T;
  r.y = k.target ? p.target[row] : -1;
  // An ignored row's cross-entropy is the constant 0: no gradient flows through it.
  r.gce = k.target && p.grad_ce && r.y != p.ignore_index ? static_cast<const A*>(p.grad_ce)[row * p.grad_ce_stride] : A(0);
  r.ls1 = k.target ? st[kd_lse1_plane(k.div) * R + row] : A(0);
  return r;
}

template <int VEC, class A>
__device__ __forceinline__ void bwd_chunk(const Consts<A>& k, const RowGrad<A>& r, const A (&s)[VEC],
                                          const A (&t)[VEC], int64_t c0, A (&gs)[VEC], A (&gt)[VEC]) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    A da, db;
    divergence_grad<A, A>(k.div, k.beta, (s[j] - r.ms) * k.inv_T, (t[j] - r.mt) * k.inv_T, r.ls_s, r.ls_t, r.aux0,
                          r.aux1, da, db);
    A g = VMath<A>::mul_nonzero(r.g, da);
    if (k.target)
      g += VMath<A>::mul_nonzero(r.gce, VMath<A>::exp((s[j] - r.ms) - r.ls1) - (c0 + j == r.y ? A(1) : A(0)));
    gs[j] = g;
    gt[j] = VMath<A>::mul_nonzero(r.g, db);
  }
}

template <class TS, class TT, class A, int GROUP, int VEC>
__global__ void __launch_bounds__(kThreads) kd_bwd_rows(KdProblem p, Consts<A> k, bool vector) {
  const TS* s = static_cast<const TS*>(p.student);
  const TT* t = static_cast<const TT*>(p.teacher);
  TS* gs = static_cast<TS*>(p.grad_student);
  TT* gt = static_cast<TT*>(p.grad_teacher);
  const int64_t C = p.classes, rows = p.outer;
  constexpr int kRowsPerBlock = kThreads / GROUP;
  const int lane = threadIdx.x % GROUP;
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / GROUP; row < rows;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    const RowGrad<A> r = row_grad(p, k, row);
    for (int64_t c0 = int64_t(lane) * VEC; c0 < C; c0 += int64_t(GROUP) * VEC) {
      const int n = int(C - c0 < VEC ? C - c0 : VEC);
      const bool vec = vector && n == VEC;
      A sv[VEC], tv[VEC], os[VEC], ot[VEC];
      load_chunk<VEC>(s + row * C + c0, 1, n, vec, sv, A(0));
      load_chunk<VEC>(t + row * C + c0, 1, n, vec, tv, A(0));
      bwd_chunk<VEC>(k, r, sv, tv, c0, os, ot);
      if (gs) store_chunk<VEC>(gs + row * C + c0, 1, n, vec, os);
      if (gt) store_chunk<VEC>(gt + row * C + c0, 1, n, vec, ot);
    }
  }
}

// ---- pixel mode: a thread per row, classes at stride inner ----

constexpr int kPixelChunk = 4;

template <class TS, class TT, class A>
__global__ void __launch_bounds__(kThreads) kd_fwd_pixels(KdProblem p, Consts<A> k) {
  const TS* s = static_cast<const TS*>(p.student);
  const TT* t = static_cast<const TT*>(p.teacher);
  const int64_t C = p.classes, I = p.inner, rows = p.rows();
  for (int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; row < rows; row += int64_t(gridDim.x) * blockDim.x) {
    const int64_t o = row / I, i = row % I, base = o * C * I + i;
    const int64_t y = k.target ? p.target[row] : -1;
    KdRowState<A> st{{A(-INFINITY), A(0)}, {A(-INFINITY), A(0)}, A(0), A(0), A(0)};
    for (int64_t c0 = 0; c0 < C && !p.stats_given; c0 += kPixelChunk) {
      const int n = int(C - c0 < kPixelChunk ? C - c0 : kPixelChunk);
      A sv[kPixelChunk], tv[kPixelChunk];
      load_chunk<kPixelChunk>(s + base + c0 * I, I, n, false, sv, A(0));
      load_chunk<kPixelChunk>(t + base + c0 * I, I, n, false, tv, A(0));
      fwd_chunk<kPixelChunk>(k, sv, tv, c0, n, y, st);
    }
    if (!p.stats_given) kd_finish_row(p, row, st);
    if (k.div != Divergence::JSD) continue;
    const SoftmaxStats<A> r = softmax_stats(p, st, row);
    const A ms = r.ms, mt = r.mt, ls_s = r.ls_s, ls_t = r.ls_t;
    A kl_t = 0, kl_s = 0;
    for (int64_t c = 0; c < C; ++c) {
      A dt, ds;
      jsd_terms<A, A>(k.beta, (to_acc<A>(s[base + c * I]) - ms) * k.inv_T, (to_acc<A>(t[base + c * I]) - mt) * k.inv_T,
                      ls_s, ls_t, dt, ds);
      kl_t += dt;
      kl_s += ds;
    }
    jsd_finish_row<A>(p, row, kl_t, kl_s);
  }
}

template <class TS, class TT, class A>
__global__ void __launch_bounds__(kThreads) kd_bwd_pixels(KdProblem p, Consts<A> k) {
  const TS* s = static_cast<const TS*>(p.student);
  const TT* t = static_cast<const TT*>(p.teacher);
  TS* gs = static_cast<TS*>(p.grad_student);
  TT* gt = static_cast<TT*>(p.grad_teacher);
  const int64_t C = p.classes, I = p.inner, rows = p.rows();
  for (int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; row < rows; row += int64_t(gridDim.x) * blockDim.x) {
    const int64_t o = row / I, i = row % I, base = o * C * I + i;
    const RowGrad<A> r = row_grad(p, k, row);
    for (int64_t c0 = 0; c0 < C; c0 += kPixelChunk) {
      const int n = int(C - c0 < kPixelChunk ? C - c0 : kPixelChunk);
      A sv[kPixelChunk], tv[kPixelChunk], os[kPixelChunk], ot[kPixelChunk];
      load_chunk<kPixelChunk>(s + base + c0 * I, I, n, false, sv, A(0));
      load_chunk<kPixelChunk>(t + base + c0 * I, I, n, false, tv, A(0));
      bwd_chunk<kPixelChunk>(k, r, sv, tv, c0, os, ot);
      if (gs) store_chunk<kPixelChunk>(gs + base + c0 * I, I, n, false, os);
      if (gt) store_chunk<kPixelChunk>(gt + base + c0 * I, I, n, false, ot);
    }
  }
}

// ---- launch ----

template <class T> constexpr int vec_of() { return 16 / int(sizeof(T)); }

int grid_for(int64_t units, int per_block) {
  const int64_t blocks = (units + per_block - 1) / per_block;
  const int64_t limit = grid_limit(65535LL * 32);
  return int(blocks < limit ? (blocks > 0 ? blocks : 1) : limit);
}

template <class TS, class TT, class A, int GROUP, int VEC>
void launch_rows(const KdProblem& p, const Consts<A>& k, bool vector, bool backward, cudaStream_t stream) {
  const int grid = grid_for(p.outer, kThreads / GROUP);
  if (backward) cuda::launch<kd_bwd_rows<TS, TT, A, GROUP, VEC>>(grid, kThreads, 0, stream, p, k, vector);
  else cuda::launch<kd_fwd_rows<TS, TT, A, GROUP, VEC>>(grid, kThreads, 0, stream, p, k, vector);
}

template <class TS, class TT, class A>
void launch(const KdProblem& p, bool backward, cudaStream_t stream) {
  const Consts<A> k = consts_of<A>(p);
  if (p.inner > 1) {
    const int grid = grid_for(p.rows(), kThreads);
    if (backward) cuda::launch<kd_bwd_pixels<TS, TT, A>>(grid, kThreads, 0, stream, p, k);
    else cuda::launch<kd_fwd_pixels<TS, TT, A>>(grid, kThreads, 0, stream, p, k);
    return;
  }
  // Chunks of VEC classes make 16-byte loads of the narrower type (and whole 16-byte words of the wider one).
  constexpr int VEC = vec_of<TS>() > vec_of<TT>() ? vec_of<TS>() : vec_of<TT>();
  auto aligned = [](const void* ptr) { return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  const bool vector = p.classes % VEC == 0 && aligned(p.student) && aligned(p.teacher) &&
                      aligned(p.grad_student) && aligned(p.grad_teacher);
  // A block per row above 2048 classes, a warp per row down to 16 * VEC classes, and below that several rows per
  // warp (GROUP lanes each), so that short rows do not leave most of a warp idle.
  const int64_t C = p.classes;
  if (C > 2048) launch_rows<TS, TT, A, kThreads, VEC>(p, k, vector, backward, stream);
  else if (C > 16 * VEC) launch_rows<TS, TT, A, 32, VEC>(p, k, vector, backward, stream);
  else if (C > 8 * VEC) launch_rows<TS, TT, A, 16, VEC>(p, k, vector, backward, stream);
  else if (C > 4 * VEC) launch_rows<TS, TT, A, 8, VEC>(p, k, vector, backward, stream);
  else launch_rows<TS, TT, A, 4, VEC>(p, k, vector, backward, stream);
}

// Every pair of input dtypes is read as it is; the accumulator is double with acc_double (a float64 input, or a
// temperature above kKdPreciseT), float otherwise. A float64 input with a float accumulator is invalid.
template <class TS, class A>
cudaError_t launch_teacher(const KdProblem& p, bool backward, cudaStream_t stream) {
  switch (p.teacher_dtype) {
    case DType::Float64:
      if constexpr (sizeof(A) != sizeof(double)) return cudaErrorInvalidValue;
      else launch<TS, double, A>(p, backward, stream);
      break;
    case DType::Float32: launch<TS, float, A>(p, backward, stream); break;
    case DType::Float16: launch<TS, __half, A>(p, backward, stream); break;
    case DType::BFloat16: launch<TS, __nv_bfloat16, A>(p, backward, stream); break;
  }
  return cudaGetLastError();
}

template <class A>
cudaError_t launch_student(const KdProblem& p, bool backward, cudaStream_t stream) {
  switch (p.student_dtype) {
    case DType::Float64:
      if constexpr (sizeof(A) != sizeof(double)) return cudaErrorInvalidValue;
      else return launch_teacher<double, A>(p, backward, stream);
    case DType::Float32: return launch_teacher<float, A>(p, backward, stream);
    case DType::Float16: return launch_teacher<__half, A>(p, backward, stream);
    case DType::BFloat16: return launch_teacher<__nv_bfloat16, A>(p, backward, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t run(const KdProblem& p, bool backward, cudaStream_t stream) {
  if (p.rows() == 0) return cudaSuccess;
  return p.acc_double ? launch_student<double>(p, backward, stream) : launch_student<float>(p, backward, stream);
}

}  // namespace

cudaError_t kd_forward(const KdProblem& p, cudaStream_t stream) { return run(p, false, stream); }
cudaError_t kd_backward(const KdProblem& p, cudaStream_t stream) { return run(p, true, stream); }

}  // namespace kdfast::cuda
