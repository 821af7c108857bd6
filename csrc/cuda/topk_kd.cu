// CUDA kernels of the sparse (top-k) teacher divergence (topk_kd_fwd / topk_kd_bwd). Torch-free: CI compiles this
// file with the whole extension for the default architectures on a machine without a GPU. The math is
// csrc/common/topk_kd.h.
//
// One block per row (grid-stride over rows). Forward: each thread folds its strided classes into an online
// softmax state, the block merges the states in a fixed order (warp butterfly, then the warps in order: no
// atomics, deterministic), and thread 0 gathers the k teacher entries and finishes the row. Backward: every
// thread writes p * c for its classes; after a barrier the top-k classes are overwritten with p - (sum of q at
// that class), one thread per distinct class, so each gradient element is rounded once.
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

template <class A> __device__ __forceinline__ OnlineSum<A> shfl_xor(const OnlineSum<A>& x, int mask) {
  return {__shfl_xor_sync(0xffffffffu, x.m, mask), __shfl_xor_sync(0xffffffffu, x.z, mask), A(0)};
}

// Folds one value into a thread's online state (one exp a value); NaN poisons the state.
template <class A> __device__ __forceinline__ void add_one(OnlineSum<A>& st, A x) {
  if (x > st.m) {
    st.z = st.z * VMath<A>::exp(st.m - x) + A(1);
    st.m = x;
  } else if (x > A(-INFINITY)) {
    st.z += VMath<A>::exp(x - st.m);
  } else if (x != x) {
    st.m = st.z = x;
  }
}

// The block's merged state, the same in every thread.
template <class A> __device__ OnlineSum<A> block_merge(OnlineSum<A> st, OnlineSum<A>* smem) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) st = merge(st, shfl_xor(st, off));
  if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = st;
  __syncthreads();
  st = smem[0];
  for (int w = 1; w < kWarps; ++w) st = merge(st, smem[w]);
  __syncthreads();  // smem is reused by the next row
  return st;
}

template <class TS, class A>
__global__ void __launch_bounds__(kThreads) topk_fwd_kernel(TopKProblem p) {
  __shared__ OnlineSum<A> smem[kWarps];
  const TS* s = static_cast<const TS*>(p.student);
  const A inv_T = A(1) / A(p.temperature);
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const TS* srow = s + row * p.classes;
    OnlineSum<A> st{A(-INFINITY), A(0), A(0)};
    for (int64_t c = threadIdx.x; c < p.classes; c += kThreads)
      add_one(st, to_acc<A>(srow[c]) * inv_T);
    st = block_merge(st, smem);
    if (threadIdx.x == 0)
      topk_finish_row<A>(p, row, lse_of(st), [&](int64_t c) { return to_acc<A>(srow[c]) * inv_T; });
  }
}

template <class TS, class A>
__global__ void __launch_bounds__(kThreads) topk_bwd_kernel(TopKProblem p) {
  __shared__ A teacher_lse;
  const TS* s = static_cast<const TS*>(p.student);
  TS* gs = static_cast<TS*>(p.grad_student);
  const A* stats = static_cast<const A*>(p.stats);
  const A inv_T = A(1) / A(p.temperature);
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const TS* srow = s + row * p.classes;
    TS* grow = gs + row * p.classes;
    const A* lp = static_cast<const A*>(p.logprobs) + row * p.k;
    const int64_t* idx = p.indices + row * p.k;
    const A lse = stats[kTopKLse * p.rows + row], coef = stats[kTopKCoef * p.rows + row];
    const A g = static_cast<const A*>(p.grad_loss)[row * p.grad_stride] * inv_T;
    if (threadIdx.x == 0) teacher_lse = topk_teacher(lp, p.k, inv_T, p.tail).lse;
    for (int64_t c = threadIdx.x; c < p.classes; c += kThreads)
      grow[c] = from_acc<TS>(g == A(0) ? A(0) : g * coef * VMath<A>::exp(to_acc<A>(srow[c]) * inv_T - lse));
    __syncthreads();
    if (g != A(0)) {
      TopKTeacher<A> t{teacher_lse, A(0), 0, false};
      for (int64_t j = threadIdx.x; j < p.k; j += kThreads) {
        const int64_t c = idx[j];
        if (!(lp[j] > A(-INFINITY)) || !topk_index_ok(c, p.classes)) continue;
        bool first = true;
        A q = A(0);
        for (int64_t l = 0; l < p.k; ++l) {
          if (!(lp[l] > A(-INFINITY)) || idx[l] != c) continue;
          if (l < j) first = false;
          q += topk_q(lp[l], inv_T, t);
        }
        if (first) grow[c] = from_acc<TS>(g * (VMath<A>::exp(to_acc<A>(srow[c]) * inv_T - lse) - q));
      }
    }
    __syncthreads();  // teacher_lse is reused by the next row
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
