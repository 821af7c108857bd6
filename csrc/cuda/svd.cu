// CUDA kernel of the batched small-matrix SVD: one-sided Jacobi (csrc/common/svd.h), one matrix per thread
// block with its tall view T and V in shared memory. The rotations of a round-robin round are disjoint and run
// one per warp; inner products are warp reductions in a fixed order, so results are deterministic. Convergence
// is decided on the device (no host synchronisation).
#include "svd.h"

#include "launch.cuh"

#include <cmath>
#include <cstdint>

namespace kdfast::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <class S>
__device__ S warp_sum(S v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return __shfl_sync(0xffffffffu, v, 0);  // lane 0's sum, the same bits in every lane
}

template <class S>
__device__ S column_dot(const S* a, const S* b, int64_t n, int lane) {
  S acc = S(0);
  for (int64_t r = lane; r < n; r += 32) acc += a[r] * b[r];
  return warp_sum(acc);
}

template <class S>
struct Smem {
  S* x;         // cols x rows, column-major (column c at x + c * rows)
  S* v;         // cols x cols
  S* d;         // cols squared norms
  S* norm2;     // cols
  S* red;       // kWarps, for the block max
  int* order;   // cols
};

template <class S>
__device__ Smem<S> carve(void* base, int64_t rows, int64_t cols) {
  Smem<S> m;
  S* p = static_cast<S*>(base);
  m.x = p;
  m.v = m.x + rows * cols;
  m.d = m.v + cols * cols;
  m.norm2 = m.d + cols;
  m.red = m.norm2 + cols;
  m.order = reinterpret_cast<int*>(m.red + kWarps);
  return m;
}

template <class S>
__global__ void __launch_bounds__(kThreads) svd_kernel(SvdProblem p) {
  KDFAST_DYNAMIC_SHARED(unsigned char, smem_raw);
  __shared__ int flag_nonfinite, flag_big;
  const int64_t rows = p.rows(), cols = p.cols(), n2 = svd_padded_cols(cols), m = p.m, n = p.n, k = cols;
  const Smem<S> sm = carve<S>(smem_raw, rows, cols);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const S* a = static_cast<const S*>(p.a);

  for (int64_t b = blockIdx.x; b < p.batch; b += gridDim.x) {
    // Load, and scale by a power of two that brings the largest entry into [0.5, 1) (exact; no overflow).
    if (tid == 0) flag_nonfinite = 0;
    __syncthreads();
    S amax = S(0);
    for (int64_t e = tid; e < rows * cols; e += kThreads) {
      const int64_t c = e / rows, r = e % rows;
      const S val = a[p.t_offset(b, r, c)];
      sm.x[e] = val;
      const S av = fabs(val);
      if (!isfinite(val)) atomicOr(&flag_nonfinite, 1);
      amax = av > amax ? av : amax;
    }
    for (int o = 16; o > 0; o >>= 1) {
      const S other = __shfl_down_sync(0xffffffffu, amax, o);
      amax = other > amax ? other : amax;
    }
    if (lane == 0) sm.red[warp] = amax;
    __syncthreads();
    S bmax = S(0);
    for (int w = 0; w < kWarps; ++w) bmax = sm.red[w] > bmax ? sm.red[w] : bmax;
    const bool finite = flag_nonfinite == 0;
    int e2 = 0;
    if (finite && bmax > S(0)) frexp(bmax, &e2);
    const S scale = ldexp(S(1), -e2);
    for (int64_t e = tid; e < rows * cols; e += kThreads) sm.x[e] *= scale;
    for (int64_t e = tid; e < cols * cols; e += kThreads) sm.v[e] = e / cols == e % cols ? S(1) : S(0);
    __syncthreads();

    const S polish = svd_polish_tol<S>(), converged = svd_converged_tol<S>(rows);
    for (int sweep = 0; finite && sweep < kSvdMaxSweeps; ++sweep) {
      for (int64_t c = warp; c < cols; c += kWarps) {
        const S nn = column_dot(sm.x + c * rows, sm.x + c * rows, rows, lane);
        if (lane == 0) sm.d[c] = nn;
      }
      if (tid == 0) flag_big = 0;
      __syncthreads();
      for (int64_t round = 0; round + 1 < n2; ++round) {
        for (int64_t q = warp; q < n2 / 2; q += kWarps) {
          int64_t i, j;
          svd_pair(n2, round, q, i, j);
          if (j >= cols) continue;
          S* xi = sm.x + i * rows;
          S* xj = sm.x + j * rows;
          const S gamma = column_dot(xi, xj, rows, lane);
          const S alpha = sm.d[i], beta = sm.d[j];
          const S sc = sqrt(alpha * beta);
          if (!(fabs(gamma) > polish * sc)) continue;  // the same decision in every lane of the warp
          S c, s, t;
          jacobi_rotation(alpha, beta, gamma, c, s, t);
          for (int64_t r = lane; r < rows; r += 32) {
            const S u = xi[r], w = xj[r];
            xi[r] = c * u - s * w;
            xj[r] = s * u + c * w;
          }
          S* vi = sm.v + i * cols;
          S* vj = sm.v + j * cols;
          for (int64_t r = lane; r < cols; r += 32) {
            const S u = vi[r], w = vj[r];
            vi[r] = c * u - s * w;
            vj[r] = s * u + c * w;
          }
          __syncwarp();  // every lane has read d[i] and d[j] (its skip decision) before lane 0 updates them
          if (lane == 0) {
            sm.d[i] = alpha - t * gamma;
            sm.d[j] = beta + t * gamma;
            if (fabs(gamma) > converged * sc && t != S(0)) atomicOr(&flag_big, 1);
          }
          __syncwarp();
        }
        __syncthreads();
      }
      const bool again = flag_big != 0;
      __syncthreads();  // everyone has read flag_big before the next sweep resets it
      if (!again) break;
    }

    // Finish: singular values = column norms, descending; U columns normalised (null ones rebuilt); V columns
    // renormalised (each rotation's c^2 + s^2 is 1 only to rounding).
    S* U = static_cast<S*>(p.u) + b * m * k;
    S* Sv = static_cast<S*>(p.s) + b * k;
    S* Vh = static_cast<S*>(p.vh) + b * k * n;
    if (!finite) {
      const S nan = S(NAN);
      for (int64_t e = tid; e < m * k; e += kThreads) U[e] = nan;
      for (int64_t e = tid; e < k; e += kThreads) Sv[e] = nan;
      for (int64_t e = tid; e < k * n; e += kThreads) Vh[e] = nan;
      __syncthreads();
      continue;
    }
    for (int64_t c = warp; c < cols; c += kWarps) {
      const S nx = column_dot(sm.x + c * rows, sm.x + c * rows, rows, lane);
      const S nv = column_dot(sm.v + c * cols, sm.v + c * cols, cols, lane);
      if (lane == 0) sm.norm2[c] = nx;
      const S inv = S(1) / sqrt(nv);
      for (int64_t r = lane; r < cols; r += 32) sm.v[c * cols + r] *= inv;
    }
    __syncthreads();
    if (tid == 0) svd_order(sm.norm2, cols, sm.order);
    __syncthreads();
    const S smax = sqrt(sm.norm2[sm.order[0]]);
    for (int64_t e = tid; e < rows * cols; e += kThreads) {
      const int64_t c = e / rows;
      const S sq = sqrt(sm.norm2[c]);
      if (!svd_null_column(sq, smax)) sm.x[e] /= sq;
    }
    __syncthreads();
    if (tid == 0) {
      for (int64_t q = 0; q < cols; ++q)
        if (svd_null_column(sqrt(sm.norm2[sm.order[q]]), smax)) svd_complete_column(sm.x, rows, sm.order, q);
    }
    __syncthreads();
    for (int64_t q = tid; q < k; q += kThreads) Sv[q] = sqrt(sm.norm2[sm.order[q]]) / scale;
    // T = U_T S V^T: for m >= n, U = U_T and Vh = V^T; otherwise U = V and Vh = U_T^T.
    const S* ucols = m >= n ? sm.x : sm.v;
    const S* vcols = m >= n ? sm.v : sm.x;
    for (int64_t e = tid; e < m * k; e += kThreads) {
      const int64_t r = e / k, q = e % k;
      U[e] = ucols[static_cast<int64_t>(sm.order[q]) * m + r];
    }
    for (int64_t e = tid; e < k * n; e += kThreads) {
      const int64_t q = e / n, c = e % n;
      Vh[e] = vcols[static_cast<int64_t>(sm.order[q]) * n + c];
    }
    __syncthreads();  // the shared buffers are reused by the next matrix
  }
}

template <class S>
int64_t shared_bytes(const SvdProblem& p) {
  const int64_t rows = p.rows(), cols = p.cols();
  return (rows * cols + cols * cols + 2 * cols + kWarps) * int64_t(sizeof(S)) + cols * int64_t(sizeof(int));
}

template <class S>
cudaError_t launch(const SvdProblem& p, cudaStream_t stream) {
  const int64_t bytes = shared_bytes<S>(p);
  cudaError_t err = cudaFuncSetAttribute(svd_kernel<S>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(bytes));
  if (err != cudaSuccess) return err;
  const int64_t limit = grid_limit(int64_t(1) << 30), blocks = p.batch < limit ? p.batch : limit;
  cuda::launch<svd_kernel<S>>(static_cast<unsigned>(blocks), kThreads, static_cast<size_t>(bytes), stream, p);
  return cudaGetLastError();
}

}  // namespace

int64_t svd_shared_bytes(const SvdProblem& p) {
  return p.dtype == DType::Float64 ? shared_bytes<double>(p) : shared_bytes<float>(p);
}

cudaError_t svd_forward(const SvdProblem& p, cudaStream_t stream) {
  if (p.batch == 0 || p.k() == 0) return cudaSuccess;
  return p.dtype == DType::Float64 ? launch<double>(p, stream) : launch<float>(p, stream);
}

}  // namespace kdfast::cuda
