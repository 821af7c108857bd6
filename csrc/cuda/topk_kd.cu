// CUDA kernels of the sparse (top-k or sampled) teacher divergence (topk_kd_fwd / topk_kd_bwd). Torch-free: CI
// compiles this file with the whole extension for the default architectures on a machine without a GPU, and runs it
// on the CPU in the CUDA emulation (docs/cuda-emulation.md). The math is csrc/common/topk_kd.h; the algorithm is the
// CPU kernel's (csrc/cpu/topk_kd_kernel.h), one block per row (grid-stride over rows).
//
// The row's valid top-k classes are marked in a shared bit set (vocabularies up to kMarkClasses; above, a class
// is looked up among the k entries). Forward: each thread folds its strided classes into two online states, the
// marked classes and the others (the student's tail is the second, never 1 minus the top-k mass), and the threads
// share the k entries for the teacher's and the categories' sums; every sum is merged across the block in a fixed
// order (warp butterfly, then the warps in order: no atomics, deterministic). Backward: every thread writes the
// off-top gradient (topk_off_grad) on its unmarked classes and, one thread per entry, each top-k class gets its value; a class repeated among the
// entries (seen while marking) is written by its first entry, with the G of all its entries, in a fixed order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/topk_kd.h"
#include "convert.cuh"
#include "launch.cuh"
#include "topk_kd.h"

namespace kdfast::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxBlocks = 65535;
constexpr int64_t kMarkWords = 8192;  // 32 KiB of shared memory
constexpr int64_t kMarkClasses = kMarkWords * 32;

// x shuffled across the warp, word by word (any trivially copyable struct of 4-byte multiples).
template <class T> __device__ __forceinline__ T shfl_xor(const T& x, int mask) {
  static_assert(sizeof(T) % 4 == 0, "shuffled in 4-byte words");
  T r;
  const unsigned* src = reinterpret_cast<const unsigned*>(&x);
  unsigned* dst = reinterpret_cast<unsigned*>(&r);
#pragma unroll
  for (int i = 0; i < int(sizeof(T) / 4); ++i) dst[i] = __shfl_xor_sync(0xffffffffu, src[i], mask);
  return r;
}

// The block's merge of every thread's x, the same in every thread, in a fixed order.
template <class T, class Merge> __device__ T block_merge(T x, Merge&& merge) {
  __shared__ uint4 raw[(kWarps * sizeof(T) + 15) / 16];  // 16-byte aligned storage for kWarps values of T
  T* smem = reinterpret_cast<T*>(raw);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) x = merge(x, shfl_xor(x, off));
  if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = x;
  __syncthreads();
  x = smem[0];
  for (int w = 1; w < kWarps; ++w) x = merge(x, smem[w]);
  __syncthreads();  // smem is reused by the next call
  return x;
}

// Marks the row's valid top-k classes (when the vocabulary fits the bit set); *repeated says whether a class was
// marked twice. Ends with a barrier.
template <class A>
__device__ void mark_top(const TopKProblem& p, int64_t row, unsigned* marks, int* repeated) {
  if (p.classes > kMarkClasses) {
    if (threadIdx.x == 0) *repeated = 1;  // unknown: the backward takes the path that merges repeats
    __syncthreads();
    return;
  }
  for (int64_t w = threadIdx.x; w < (p.classes + 31) / 32; w += kThreads) marks[w] = 0u;
  if (threadIdx.x == 0) *repeated = 0;
  __syncthreads();
  for (int64_t j = threadIdx.x; j < p.k; j += kThreads) {
    if (!topk_entry_ok<A>(p, row, j)) continue;
    const int64_t c = p.indices[row * p.k + j];
    const unsigned bit = 1u << (c % 32);
    if (atomicOr(&marks[c / 32], bit) & bit) atomicOr(repeated, 1);  // atomic: two repeats may be marked at once
  }
  __syncthreads();
}

template <class A>
__device__ __forceinline__ bool is_top(const TopKProblem& p, int64_t row, int64_t c, const unsigned* marks) {
  if (p.classes <= kMarkClasses) return (marks[c / 32] >> (c % 32)) & 1u;
  for (int64_t j = 0; j < p.k; ++j)
    if (p.indices[row * p.k + j] == c && topk_entry_ok<A>(p, row, j)) return true;
  return false;
}

template <class TS, class A>
__global__ void __launch_bounds__(kThreads) topk_fwd_kernel(TopKProblem p) {
  __shared__ unsigned marks[kMarkWords];
  __shared__ int repeated;
  const TS* s = static_cast<const TS*>(p.student);
  const A inv_T = A(1) / A(p.temperature);
  const auto merge_sum = [inv_T](TopKSum<A> a, TopKSum<A> b) { return topk_sum_merge(a, b, inv_T); };
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const TS* srow = s + row * p.classes;
    const auto logit = [srow](int64_t c) { return to_acc<A>(srow[c]); };
    mark_top<A>(p, row, marks, &repeated);
    TopKSum<A> off = topk_sum_empty<A>(), top = topk_sum_empty<A>();
    for (int64_t c = threadIdx.x; c < p.classes; c += kThreads)
      topk_sum_add(is_top<A>(p, row, c, marks) ? top : off, logit(c), inv_T);
    off = block_merge(off, merge_sum);
    top = block_merge(top, merge_sum);
    TopKEntrySums<A> e = topk_entry_sums_empty<A>();
    for (int64_t j = threadIdx.x; j < p.k; j += kThreads) topk_entry_sums_add(p, e, row, j, inv_T, logit);
    e = block_merge(e, [inv_T](const TopKEntrySums<A>& a, const TopKEntrySums<A>& b) {
      return topk_entry_sums_merge(a, b, inv_T);
    });
    TopKRow<A> r = topk_row(p, row, off, top, e);
    A z = A(0);
    for (int64_t j = threadIdx.x; j < p.k; j += kThreads) z += topk_teacher_term(p, r, row, j);
    z = block_merge(z, [](A a, A b) { return a + b; });
    topk_teacher_lse(p, r, z);
    TopKTerm<A> sums{A(0), A(0)};
    for (int64_t j = threadIdx.x; j < p.k; j += kThreads) {
      if (!topk_entry_ok<A>(p, row, j)) continue;
      const TopKTerm<A> t = topk_entry_term(p, r, row, j, (logit(p.indices[row * p.k + j]) - r.M) * inv_T);
      sums.loss += t.loss;
      sums.G += t.G;
    }
    sums = block_merge(sums, [](TopKTerm<A> a, TopKTerm<A> b) { return TopKTerm<A>{a.loss + b.loss, a.G + b.G}; });
    if (threadIdx.x == 0) topk_finish_row(p, row, r, sums.loss, sums.G);
  }
}

template <class TS, class A>
__global__ void __launch_bounds__(kThreads) topk_bwd_kernel(TopKProblem p) {
  __shared__ unsigned marks[kMarkWords];
  __shared__ int repeated;
  const TS* s = static_cast<const TS*>(p.student);
  TS* gs = static_cast<TS*>(p.grad_student);
  const A* stats = static_cast<const A*>(p.stats);
  const A inv_T = A(1) / A(p.temperature);
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const TS* srow = s + row * p.classes;
    TS* grow = gs + row * p.classes;
    const int64_t* idx = p.indices + row * p.k;
    const A sum_g = stats[kTopKSumG * p.rows + row], coef = stats[kTopKCoef * p.rows + row];
    const A g = static_cast<const A*>(p.grad_loss)[row * p.grad_stride] * inv_T;  // d x / d s = 1 / T
    const TopKRow<A> r = topk_row_of_stats<A>(p, row);
    const auto x_at = [&](int64_t c) { return (to_acc<A>(srow[c]) - r.M) * inv_T; };
    mark_top<A>(p, row, marks, &repeated);
    for (int64_t c = threadIdx.x; c < p.classes; c += kThreads) {
      if (g == A(0)) grow[c] = from_acc<TS>(A(0));  // a masked-out row (also where its logits hold inf or NaN)
      else if (!is_top<A>(p, row, c, marks)) grow[c] = from_acc<TS>(g * topk_off_grad(p, r, x_at(c), coef));
    }
    if (g != A(0)) {
      for (int64_t j = threadIdx.x; j < p.k; j += kThreads) {
        if (!topk_entry_ok<A>(p, row, j)) continue;
        const int64_t c = idx[j];
        const A x = x_at(c);
        A sum_g_class = topk_entry_term(p, r, row, j, x).G;
        int n = 1;
        if (repeated) {  // the first entry of class c writes it, with the G of all its entries
          bool first = true;
          for (int64_t l = 0; l < j && first; ++l) first = !(idx[l] == c && topk_entry_ok<A>(p, row, l));
          if (!first) continue;
          for (int64_t l = j + 1; l < p.k; ++l) {
            if (idx[l] != c || !topk_entry_ok<A>(p, row, l)) continue;
            sum_g_class += topk_entry_term(p, r, row, l, x).G;
            ++n;
          }
        }
        grow[c] = from_acc<TS>(g * topk_top_grad(p, r, x, sum_g_class, n, sum_g));
      }
    }
    __syncthreads();  // the marks are reused by the next row
  }
}

template <class F> cudaError_t dispatch(const TopKProblem& p, F&& launch) {
  switch (p.student_dtype) {
    case DType::Float64: return launch(double{}, double{});
    case DType::Float32: return launch(float{}, float{});
    case DType::Float16: return launch(__half{}, float{});
    case DType::BFloat16: return launch(__nv_bfloat16{}, float{});
  }
  return cudaErrorInvalidValue;
}

int blocks_for(int64_t rows) {
  const int64_t limit = grid_limit(kMaxBlocks);
  return int(rows < limit ? rows : limit);
}

}  // namespace

cudaError_t topk_kd_forward(const TopKProblem& p, cudaStream_t stream) {
  return dispatch(p, [&](auto ts, auto acc) {
    launch<topk_fwd_kernel<decltype(ts), decltype(acc)>>(blocks_for(p.rows), kThreads, 0, stream, p);
    return cudaGetLastError();
  });
}

cudaError_t topk_kd_backward(const TopKProblem& p, cudaStream_t stream) {
  return dispatch(p, [&](auto ts, auto acc) {
    launch<topk_bwd_kernel<decltype(ts), decltype(acc)>>(blocks_for(p.rows), kThreads, 0, stream, p);
    return cudaGetLastError();
  });
}

}  // namespace kdfast::cuda
