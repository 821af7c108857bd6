// CUDA kernels of the pairwise-affinity loss (see csrc/common/affinity.h): stage a chunk of normalised nodes in
// float64 and apply the normalisation's chain rule to a chunk's gradient. Torch-free.
//
// A block holds kNodes neighbouring nodes (threadIdx.x: consecutive addresses of a channel row, so loads are
// coalesced) and kGroups channel groups (threadIdx.y strides over the channels), so that a chunk of a few thousand
// nodes still fills the GPU. The per-node sums over channels are reduced in shared memory in a fixed order:
// deterministic, no atomics.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "affinity.h"
#include "launch.cuh"

namespace kdfast::cuda {
namespace {

constexpr int kNodes = 32;
constexpr int kGroups = 8;

__device__ inline double load(const float* p) { return *p; }
__device__ inline double load(const double* p) { return *p; }
__device__ inline double load(const __half* p) { return __half2float(*p); }
__device__ inline double load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ inline void store(float* p, double v) { *p = float(v); }
__device__ inline void store(double* p, double v) { *p = v; }
__device__ inline void store(__half* p, double v) { *p = __float2half_rn(float(v)); }
__device__ inline void store(__nv_bfloat16* p, double v) { *p = __float2bfloat16_rn(float(v)); }

// Sum of each node's kGroups partial sums, in group order; every thread of the node's column gets the result.
__device__ inline double column_sum(double (*part)[kNodes], double v) {
  part[threadIdx.y][threadIdx.x] = v;
  __syncthreads();
  double total = 0.0;
  for (int g = 0; g < kGroups; ++g) total += part[g][threadIdx.x];
  __syncthreads();
  return total;
}

template <class T>
__global__ void stage_kernel(AffinityChunk p, int side) {
  __shared__ double part[kGroups][kNodes];
  const AffinitySide& s = p.side[side];
  const int64_t node = int64_t(blockIdx.x) * kNodes + threadIdx.x;
  const bool live = node < p.bb * p.m;  // dead threads still take part in the reductions
  const int64_t b = live ? node / p.m : 0, j = live ? node % p.m : 0;
  const T* x = static_cast<const T*>(s.x) + (p.b0 + b) * s.channels * p.nodes + p.i0 + j;
  double* k = p.k + (b * p.k_rows + s.k_offset) * p.m + j;
  double sq = 0.0;
  if (live)
    for (int64_t c = threadIdx.y; c < s.channels; c += kGroups) {
      const double v = load(x + c * p.nodes);
      k[c * p.m] = v;
      sq += v * v;
    }
  const double norm = sqrt(column_sum(part, sq));
  if (!live) return;
  if (threadIdx.y == 0) p.norms[(b * 2 + side) * p.m + j] = norm;
  const double inv = inv_clamped_norm(norm, p.eps);
  for (int64_t c = threadIdx.y; c < s.channels; c += kGroups) k[c * p.m] *= inv;
}

template <class T>
__global__ void grad_kernel(AffinityChunk p, int side) {
  __shared__ double part[kGroups][kNodes];
  const AffinitySide& s = p.side[side];
  const int64_t node = int64_t(blockIdx.x) * kNodes + threadIdx.x;
  const bool live = node < p.bb * p.m;
  const int64_t b = live ? node / p.m : 0, j = live ? node % p.m : 0;
  const double* k = p.k + (b * p.k_rows + s.k_offset) * p.m + j;
  const double* dk = p.dk + (b * p.dk_rows + s.dk_offset) * p.m + j;
  T* g = static_cast<T*>(s.grad) + (p.b0 + b) * s.channels * p.nodes + p.i0 + j;
  double dot = 0.0;
  if (live)
    for (int64_t c = threadIdx.y; c < s.channels; c += kGroups) dot += k[c * p.m] * dk[c * p.m];
  dot = column_sum(part, dot);
  if (!live) return;
  const double norm = p.norms[(b * 2 + side) * p.m + j];
  const double inv = inv_clamped_norm(norm, p.eps), pdot = projected(norm, p.eps) * dot;
  for (int64_t c = threadIdx.y; c < s.channels; c += kGroups)
    store(g + c * p.nodes, (dk[c * p.m] - k[c * p.m] * pdot) * inv);
}

template <template <class> class Launch>
void with_dtype(DType d, const AffinityChunk& p, int side, cudaStream_t stream) {
  const dim3 block(kNodes, kGroups);
  const dim3 grid(unsigned((p.bb * p.m + kNodes - 1) / kNodes));
  switch (d) {
    case DType::Float32: return Launch<float>::run(grid, block, stream, p, side);
    case DType::Float64: return Launch<double>::run(grid, block, stream, p, side);
    case DType::Float16: return Launch<__half>::run(grid, block, stream, p, side);
    case DType::BFloat16: return Launch<__nv_bfloat16>::run(grid, block, stream, p, side);
  }
}

template <class T> struct StageLaunch {
  static void run(dim3 g, dim3 b, cudaStream_t st, const AffinityChunk& p, int side) {
    launch<stage_kernel<T>>(g, b, 0, st, p, side);
  }
};
template <class T> struct GradLaunch {
  static void run(dim3 g, dim3 b, cudaStream_t st, const AffinityChunk& p, int side) {
    launch<grad_kernel<T>>(g, b, 0, st, p, side);
  }
};

}  // namespace

cudaError_t affinity_stage(const AffinityChunk& p, cudaStream_t stream) {
  if (p.bb * p.m == 0) return cudaSuccess;
  for (int side = 0; side < 2; ++side) with_dtype<StageLaunch>(p.side[side].dtype, p, side, stream);
  return cudaGetLastError();
}

cudaError_t affinity_grad(const AffinityChunk& p, cudaStream_t stream) {
  if (p.bb * p.m == 0) return cudaSuccess;
  for (int side = 0; side < 2; ++side)
    if (p.side[side].grad) with_dtype<GradLaunch>(p.side[side].dtype, p, side, stream);
  return cudaGetLastError();
}

}  // namespace kdfast::cuda
