// CUDA kernels of the batched attention maps (attention_fwd / attention_bwd / attention_transfer_*). Torch-free:
// CI compiles this file with the whole extension for the default architectures on a machine without a GPU.
//
// One block per (group, sample), where a group is one feature map (plain maps) or the student and the teacher of
// one layer pair (attention transfer), so that the per-sample norm, loss row and dot products are block
// reductions in a fixed order: deterministic, no atomics, one launch for every feature map of the call (in
// slices of kMaxFeatures). Groups are ordered largest first so that the big blocks start first.
//   forward:  positions are cut into tiles of TP threads; the block's kThreads / TP thread rows split the channels
//             of a tile and their partial sums (or maxima) are combined in shared memory in channel-row order;
//             neighbouring threads read neighbouring positions of one channel, so loads coalesce.
//   backward: every thread walks the (channel, position) elements of the feature map with a block stride and
//             writes each gradient once; the per-position coefficient is recomputed from the small maps.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../common/attention.h"
#include "attention.h"
#include "convert.cuh"
#include "launch.cuh"

namespace kdfast::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxFeatures = 16;  // features per launch: the descriptors travel by value as kernel parameters

// One launch's slice of the problem, by value.
struct Slice {
  AttentionFeature f[kMaxFeatures];
  int64_t global[kMaxFeatures];    // each feature's index in the problem (its row of norms)
  int64_t group_of[kMaxFeatures];  // the groups in grid order (largest first)
  int64_t groups;                  // blocks per sample
  int64_t pairs;                   // layer pairs in this slice (0: plain maps, one feature per group)
  int64_t first_row;               // the problem's index of this slice's first pair (its row of rows)
  int64_t batch;
  double p;
  Pool pool;
  bool normalize;
  void* norms;
  void* rows;
  const void* grad_rows;
};

// Features of group g of a slice: one, or the student and the teacher of a pair. Returns how many.
__device__ __forceinline__ int group_features(const Slice& s, int64_t g, int (&idx)[2]) {
  if (s.pairs == 0) {
    idx[0] = int(g);
    return 1;
  }
  idx[0] = int(g);
  idx[1] = int(s.pairs + g);
  return 2;
}

// Block-wide sum in a fixed order (warp shuffles, then the warps' sums in order); every thread gets the result.
template <class A>
__device__ A block_sum(A v, A* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  A total = A(0);
  for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
  return total;
}

// Pools one sample of one feature map into its (unnormalised) map, normalises it when asked, and returns its
// norm (0 without normalize).
template <class T, class A, PowKind K>
__device__ void pool_sample(const Slice& s, int q, int64_t b, A* part, int* part_arg, A* scratch) {
  const AttentionFeature& f = s.f[q];
  const int64_t C = f.channels, P = f.positions;
  int tp = 32;
  while (tp < kThreads && tp < P) tp *= 2;  // tile width: positions per thread row
  const int rows = kThreads / tp, j = threadIdx.x % tp, r = threadIdx.x / tp;
  const T* x = static_cast<const T*>(f.x) + b * C * P;
  A* map = static_cast<A*>(f.map) + b * P;
  const A pe = A(s.p);
  const bool is_max = s.pool == Pool::Max;
  A ss = A(0);
  for (int64_t i0 = 0; i0 < P; i0 += tp) {
    const int64_t i = i0 + j;
    A acc = is_max ? A(-1) : A(0);  // |x|^p >= 0, so -1 is below every value (and NaN wins below)
    int arg = 0;
    if (i < P) {
#pragma unroll 4
      for (int64_t c = r; c < C; c += rows) {
        const A v = pow_abs<K>(to_acc<A>(x[c * P + i]), pe);
        if (is_max) {
          if (v > acc || (v != v && acc == acc)) {
            acc = v;
            arg = int(c);
          }
        } else {
          acc += v;
        }
      }
    }
    part[threadIdx.x] = acc;
    part_arg[threadIdx.x] = arg;
    __syncthreads();
    if (r == 0 && i < P) {
      // combine the thread rows in order: row q saw channels q, q + rows, ...; on ties the lower channel wins
      for (int q = 1; q < rows && q < C; ++q) {
        const A v = part[q * tp + j];
        const int a = part_arg[q * tp + j];
        if (is_max) {
          if (v > acc || (v != v && acc == acc) || (v == acc && a < arg)) {
            acc = v;
            arg = a;
          }
        } else {
          acc += v;
        }
      }
      if (s.pool == Pool::Mean) acc = acc / A(C);
      map[i] = acc;
      if (is_max) f.argmax[b * P + i] = arg;
      ss += acc * acc;
    }
    __syncthreads();
  }
  if (!s.normalize) return;
  const A norm = sqrt(block_sum(ss, scratch));
  const A denom = norm > A(kAttentionEps) ? norm : A(kAttentionEps);
  // this thread normalises the positions it wrote itself, so no barrier is needed before reading them back
  if (r == 0)
    for (int64_t i = j; i < P; i += tp) map[i] = map[i] / denom;
  if (threadIdx.x == 0) static_cast<A*>(s.norms)[s.global[q] * s.batch + b] = norm;
}

template <class A, class F>
__device__ void with_type(DType d, F&& f) {
  if constexpr (sizeof(A) == sizeof(double)) {
    f(double{});
  } else {
    switch (d) {
      case DType::Float16: return f(__half{});
      case DType::BFloat16: return f(__nv_bfloat16{});
      default: return f(float{});
    }
  }
}

template <class A, PowKind K>
__global__ void __launch_bounds__(kThreads) forward_kernel(const Slice s) {
  __shared__ A part[kThreads];
  __shared__ int part_arg[kThreads];
  __shared__ A scratch[kThreads / 32];
  const int64_t g = s.group_of[blockIdx.x % s.groups], b = blockIdx.x / s.groups;
  int idx[2];
  const int n = group_features(s, g, idx);
  for (int q = 0; q < n; ++q)
    with_type<A>(s.f[idx[q]].dtype, [&](auto t) { pool_sample<decltype(t), A, K>(s, idx[q], b, part, part_arg, scratch); });
  if (s.pairs == 0) return;
  __syncthreads();  // both maps are complete
  const int64_t P = s.f[idx[0]].positions;
  const A* ys = static_cast<const A*>(s.f[idx[0]].map) + b * P;
  const A* yt = static_cast<const A*>(s.f[idx[1]].map) + b * P;
  A acc = A(0);
  for (int64_t i = threadIdx.x; i < P; i += kThreads) {
    const A d = ys[i] - yt[i];
    acc += d * d;
  }
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) static_cast<A*>(s.rows)[(s.first_row + g) * s.batch + b] = transfer_row(acc, P);
}

// d loss / d map of feature q of the group at position i (see csrc/cpu/attention_kernel.h, upstream()).
template <class A>
__device__ __forceinline__ A upstream(const Slice& s, const int (&idx)[2], int q, int64_t g, int64_t b, int64_t i,
                                      A grad_row) {
  const AttentionFeature& f = s.f[idx[q]];
  const int64_t off = b * f.positions + i;
  if (s.pairs == 0) return static_cast<const A*>(f.grad_map)[off];
  const A y = static_cast<const A*>(f.map)[off], yo = static_cast<const A*>(s.f[idx[1 - q]].map)[off];
  return grad_row * A(2) / A(f.positions) * (y - yo);
}

template <class T, class A, PowKind K>
__device__ void grad_sample(const Slice& s, const int (&idx)[2], int q, int64_t g, int64_t b, A grad_row,
                            A* scratch) {
  const AttentionFeature& f = s.f[idx[q]];
  const int64_t C = f.channels, P = f.positions;
  const A* y = static_cast<const A*>(f.map) + b * P;
  A dot = A(0), norm = A(0);
  if (s.normalize) {
    for (int64_t i = threadIdx.x; i < P; i += kThreads) dot += y[i] * upstream(s, idx, q, g, b, i, grad_row);
    dot = block_sum(dot, scratch);
    norm = static_cast<const A*>(s.norms)[s.global[idx[q]] * s.batch + b];
  }
  const A pe = A(s.p), scale = s.pool == Pool::Mean ? pe / A(C) : pe;
  const T* x = static_cast<const T*>(f.x) + b * C * P;
  T* gx = static_cast<T*>(f.grad) + b * C * P;
  const int32_t* am = s.pool == Pool::Max ? f.argmax + b * P : nullptr;
  for (int64_t e = threadIdx.x; e < C * P; e += kThreads) {
    const int64_t c = e / P, i = e - c * P;
    A d = A(0);
    if (!am || am[i] == c) {
      const A coef = pooled_grad(s.normalize, y[i], upstream(s, idx, q, g, b, i, grad_row), dot, norm, scale);
      d = coef * dpow_abs<K>(to_acc<A>(x[e]), pe);
    }
    gx[e] = from_acc<T>(d);
  }
}

template <class A, PowKind K>
__global__ void __launch_bounds__(kThreads) backward_kernel(const Slice s) {
  __shared__ A scratch[kThreads / 32];
  const int64_t g = s.group_of[blockIdx.x % s.groups], b = blockIdx.x / s.groups;
  int idx[2];
  const int n = group_features(s, g, idx);
  const A grad_row = s.pairs > 0 ? static_cast<const A*>(s.grad_rows)[(s.first_row + g) * s.batch + b] : A(0);
  for (int q = 0; q < n; ++q) {
    if (!s.f[idx[q]].grad) continue;
    with_type<A>(s.f[idx[q]].dtype, [&](auto t) { grad_sample<decltype(t), A, K>(s, idx, q, g, b, grad_row, scratch); });
  }
}

template <class A, PowKind K>
struct Forward {
  static void launch(const Slice& s, unsigned blocks, cudaStream_t st) {
    cuda::launch<forward_kernel<A, K>>(blocks, kThreads, 0, st, s);
  }
};
template <class A, PowKind K>
struct Backward {
  static void launch(const Slice& s, unsigned blocks, cudaStream_t st) {
    cuda::launch<backward_kernel<A, K>>(blocks, kThreads, 0, st, s);
  }
};

template <template <class, PowKind> class Kernel, class A>
void launch_typed(const Slice& s, unsigned blocks, PowKind k, cudaStream_t st) {
  switch (k) {
    case PowKind::One: return Kernel<A, PowKind::One>::launch(s, blocks, st);
    case PowKind::Two: return Kernel<A, PowKind::Two>::launch(s, blocks, st);
    default: return Kernel<A, PowKind::General>::launch(s, blocks, st);
  }
}

// Cuts the problem into slices of at most kMaxFeatures features (whole pairs) and launches the kernel on each.
template <template <class, PowKind> class Kernel>
cudaError_t launch(const AttentionProblem& p, cudaStream_t stream) {
  if (p.batch == 0) return cudaSuccess;
  const int64_t per_group = p.pairs > 0 ? 2 : 1;
  const int64_t groups = p.pairs > 0 ? p.pairs : p.count;
  const int64_t slice_groups = kMaxFeatures / per_group;
  for (int64_t g0 = 0; g0 < groups; g0 += slice_groups) {
    Slice s{};
    const int64_t ng = std::min(slice_groups, groups - g0);
    for (int64_t q = 0; q < ng; ++q) {
      s.global[q] = g0 + q;
      if (p.pairs > 0) s.global[ng + q] = p.pairs + g0 + q;
    }
    for (int64_t q = 0; q < ng * per_group; ++q) s.f[q] = p.features[s.global[q]];
    // group order in the grid: most elements first
    auto cost = [&](int64_t q) {
      int64_t c = s.f[q].channels * s.f[q].positions;
      if (p.pairs > 0) c += s.f[ng + q].channels * s.f[ng + q].positions;
      return c;
    };
    for (int64_t q = 0; q < ng; ++q) s.group_of[q] = q;
    std::stable_sort(s.group_of, s.group_of + ng, [&](int64_t a, int64_t b) { return cost(a) > cost(b); });
    s.groups = ng;
    s.pairs = p.pairs > 0 ? ng : 0;
    s.first_row = g0;
    s.batch = p.batch;
    s.p = p.p;
    s.pool = p.pool;
    s.normalize = p.normalize;
    s.norms = p.norms;
    s.rows = p.rows;
    s.grad_rows = p.grad_rows;
    const int64_t blocks = ng * p.batch;
    if (blocks > int64_t(0x7fffffff)) return cudaErrorInvalidConfiguration;
    if (p.acc_double) launch_typed<Kernel, double>(s, unsigned(blocks), pow_kind(p.p), stream);
    else launch_typed<Kernel, float>(s, unsigned(blocks), pow_kind(p.p), stream);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t attention_forward(const AttentionProblem& p, cudaStream_t stream) { return launch<Forward>(p, stream); }
cudaError_t attention_backward(const AttentionProblem& p, cudaStream_t stream) { return launch<Backward>(p, stream); }

}  // namespace kdfast::cuda
