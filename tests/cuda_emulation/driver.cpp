// The CUDA emulation's standalone driver (no torch): checks the layer itself (barriers, warp operations, shared
// memory, vector loads, its error messages), then runs every kernel of csrc/cuda through its launcher at small
// shapes that take every branch, on exactly sized heap buffers. Built plain, with AddressSanitizer + UBSan and
// with ThreadSanitizer by tests/cuda_emulation/emulation_build.py; a sanitizer report or a failed check fails the
// run. The numbers are checked against the CPU kernels and the reference by tests/test_cuda_emulation.py.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "../../csrc/cuda/affinity.h"
#include "../../csrc/cuda/attention.h"
#include "../../csrc/cuda/kd_div.h"
#include "../../csrc/cuda/launch.cuh"
#include "../../csrc/cuda/svd.h"
#include "../../csrc/cuda/topk_kd.h"

using namespace kdfast;

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    std::fprintf(stderr, "FAILED: %s\n", what.c_str());
    ++failures;
  }
}

// A launcher's status must be success.
void expect_ok(cudaError_t err, const std::string& what) {
  check(err == cudaSuccess, what + ": " + cudaGetErrorString(err) + " " + kdemu::last_message());
}

// A layer self-test's launch must fail with a message that names the kernel and contains `needle`.
void expect_fail(const std::string& what, const std::string& kernel, const std::string& needle) {
  const cudaError_t err = cudaGetLastError();
  const std::string msg = kdemu::last_message();
  check(err != cudaSuccess && msg.find(kernel) != std::string::npos && msg.find(needle) != std::string::npos,
        what + ": expected a failure naming " + kernel + " and '" + needle + "', got '" + msg + "'");
}

// Launches a self-test kernel on one block, which must fail with a message naming it and containing `needle`.
template <auto Kernel> void must_fail(int threads, int* out, const std::string& name, const std::string& needle) {
  kdfast::cuda::launch<Kernel>(dim3(1), dim3(threads), 0, nullptr, out);
  expect_fail(name, name, needle);
}

// An exactly sized heap buffer, so that AddressSanitizer sees any access past its end.
template <class T> struct Buf {
  explicit Buf(size_t n) : n(n), p(static_cast<T*>(std::malloc(n ? n * sizeof(T) : 1))) {}
  ~Buf() { std::free(p); }
  Buf(const Buf&) = delete;
  size_t n;
  T* p;
};

uint64_t rng = 88172645463325252ull;
double uniform() {  // in [-1, 1)
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return double(rng >> 11) / double(1ull << 52) - 1.0;
}
template <class T> T from_double(double v) { return T(v); }
template <> __half from_double<__half>(double v) { return __float2half_rn(float(v)); }
template <> __nv_bfloat16 from_double<__nv_bfloat16>(double v) { return __float2bfloat16_rn(float(v)); }
template <class T> void fill(Buf<T>& b, double scale) {
  for (size_t i = 0; i < b.n; ++i) b.p[i] = from_double<T>(scale * uniform());
}
template <class T> DType dtype_of();
template <> DType dtype_of<float>() { return DType::Float32; }
template <> DType dtype_of<double>() { return DType::Float64; }
template <> DType dtype_of<__half>() { return DType::Float16; }
template <> DType dtype_of<__nv_bfloat16>() { return DType::BFloat16; }

// ---- self-tests of the layer ----

__global__ void barrier_ok(int* out) {
  __shared__ int cells[256];
  __shared__ int count;
  if (threadIdx.x == 0) count = 0;
  cells[threadIdx.x] = int(threadIdx.x);
  __syncthreads();
  atomicAdd(&count, 1);
  out[threadIdx.x] = cells[255 - threadIdx.x];
  __syncthreads();
  if (threadIdx.x == 0) out[256] = count;
}

__global__ void divergent_barrier(int* out) {
  if (threadIdx.x < 64) __syncthreads();
  else __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void barrier_after_exit(int* out) {
  if (threadIdx.x == 3) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void shuffle_values(int* out) {
  const int lane = int(threadIdx.x % 32);
  out[0 * 64 + threadIdx.x] = __shfl_xor_sync(0xffffffffu, lane, 5, 8);  // partner inside the 8-lane segment
  out[1 * 64 + threadIdx.x] = __shfl_down_sync(0xffffffffu, lane, 3, 16);  // own value past the segment's end
  out[2 * 64 + threadIdx.x] = __shfl_sync(0xffffffffu, lane, 33, 16);      // lane 1 of each 16-lane segment
  out[3 * 64 + threadIdx.x] = __shfl_up_sync(0xffffffffu, lane, 2);
  if (lane < 16) out[4 * 64 + threadIdx.x] = __shfl_xor_sync(0x0000ffffu, lane, 1);  // a half-warp mask
  else out[4 * 64 + threadIdx.x] = __shfl_xor_sync(0xffff0000u, lane, 2);
  __syncwarp();
}

__global__ void shuffle_missing_lane(int* out) {
  int v = int(threadIdx.x);
  if (threadIdx.x % 32 != 7) v = __shfl_xor_sync(0xffffffffu, v, 1);
  __syncthreads();
  out[threadIdx.x] = v;
}

__global__ void shuffle_lane_exits(int* out) {
  if (threadIdx.x == 40) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, int(threadIdx.x), 1);
}

__global__ void shuffle_divergent_mask(int* out) {
  const unsigned mask = threadIdx.x % 32 < 4 ? 0x0000000fu : 0xffffffffu;
  out[threadIdx.x] = __shfl_xor_sync(mask, int(threadIdx.x), 1);
}

__global__ void shuffle_reads_outside_mask(int* out) {
  if (threadIdx.x % 32 < 16) out[threadIdx.x] = __shfl_sync(0x0000ffffu, int(threadIdx.x), 20);
}

__global__ void vector_load(const float* p, float* out) {
  const uint4 w = __ldg(reinterpret_cast<const uint4*>(p));
  std::memcpy(out + 4 * threadIdx.x, &w, 16);
}

__global__ void dynamic_shared(int n, int* out) {
  KDFAST_DYNAMIC_SHARED(int, cells);
  for (int i = int(threadIdx.x); i < n; i += int(blockDim.x)) cells[i] = i;
  __syncthreads();
  if (threadIdx.x == 0) out[0] = cells[n - 1];
}

void self_tests() {
  Buf<int> out(320);
  kdfast::cuda::launch<barrier_ok>(dim3(2), dim3(256), 0, nullptr, out.p);
  expect_ok(cudaGetLastError(), "barrier_ok");
  bool ok = out.p[256] == 256;
  for (int t = 0; t < 256; ++t) ok = ok && out.p[t] == 255 - t;
  check(ok, "barrier_ok: shared memory across a barrier and shared atomics");

  must_fail<divergent_barrier>(256, out.p, "divergent_barrier", "divergent __syncthreads");
  must_fail<barrier_after_exit>(64, out.p, "barrier_after_exit", "exited");

  kdfast::cuda::launch<shuffle_values>(dim3(1), dim3(64), 0, nullptr, out.p);
  expect_ok(cudaGetLastError(), "shuffle_values");
  ok = true;
  for (int t = 0; t < 64; ++t) {
    const int lane = t % 32;
    ok = ok && out.p[t] == ((lane ^ 5) & 7) + (lane & ~7);
    ok = ok && out.p[64 + t] == ((lane % 16) + 3 < 16 ? lane + 3 : lane);
    ok = ok && out.p[128 + t] == (lane & ~15) + 1;
    ok = ok && out.p[192 + t] == (lane >= 2 ? lane - 2 : lane);
    ok = ok && out.p[256 + t] == (lane < 16 ? lane ^ 1 : lane ^ 2);
  }
  check(ok, "shuffle_values: widths, segments and masks");

  must_fail<shuffle_missing_lane>(64, out.p, "shuffle_missing_lane", "__shfl_xor_sync");  // the deadlock check
  must_fail<shuffle_lane_exits>(64, out.p, "shuffle_lane_exits", "exited");
  // lanes 0-3 leave the full-mask shuffle that lanes 4-31 wait in: a divergence, or an exit while they wait
  must_fail<shuffle_divergent_mask>(32, out.p, "shuffle_divergent_mask", "__shfl_xor_sync");
  must_fail<shuffle_reads_outside_mask>(32, out.p, "shuffle_reads_outside_mask", "not in mask");

  Buf<float> v(12), vout(4 * 32);
  for (int i = 0; i < 12; ++i) v.p[i] = float(i);
  const float* aligned = reinterpret_cast<uintptr_t>(v.p) % 16 == 0 ? v.p : v.p + 2;
  kdfast::cuda::launch<vector_load>(dim3(1), dim3(1), 0, nullptr, aligned, vout.p);
  expect_ok(cudaGetLastError(), "vector_load aligned");
  check(vout.p[3] == aligned[3], "vector_load: the 16 bytes");
  kdfast::cuda::launch<vector_load>(dim3(1), dim3(1), 0, nullptr, aligned + 1, vout.p);
  expect_fail("a misaligned 16-byte load", "vector_load", "misaligned 16-byte load");

  const int big = 20000;  // 80000 bytes: over the 48 KiB default, within the opt-in limit
  kdfast::cuda::launch<dynamic_shared>(dim3(1), dim3(128), big * sizeof(int), nullptr, big, out.p);
  expect_fail("dynamic shared memory over the default limit", "dynamic_shared", "over its limit of 49152");
  check(cudaFuncSetAttribute(dynamic_shared, cudaFuncAttributeMaxDynamicSharedMemorySize, 300 * 1024) ==
            cudaErrorInvalidValue, "cudaFuncSetAttribute above the device's opt-in limit");
  expect_ok(cudaFuncSetAttribute(dynamic_shared, cudaFuncAttributeMaxDynamicSharedMemorySize, big * 4), "raise");
  kdfast::cuda::launch<dynamic_shared>(dim3(1), dim3(128), big * sizeof(int), nullptr, big, out.p);
  expect_ok(cudaGetLastError(), "dynamic shared memory within the raised limit");
  check(out.p[0] == big - 1, "dynamic shared memory contents");
}

// ---- the kernels ----

template <class TS, class TT>
void run_kd(int64_t outer, int64_t C, int64_t inner, Divergence div, bool target, double T) {
  using A = std::conditional_t<std::is_same<TS, double>::value, double, float>;
  const int64_t R = outer * inner;
  Buf<TS> s(outer * C * inner), gs(outer * C * inner);
  Buf<TT> t(outer * C * inner), gt(outer * C * inner);
  fill(s, 4.0);
  fill(t, 4.0);
  Buf<int64_t> y(R);
  for (int64_t r = 0; r < R; ++r) y.p[r] = r % 5 == 4 ? -100 : (r * 7) % C;
  Buf<bool> mask(R);
  for (int64_t r = 0; r < R; ++r) mask.p[r] = r % 3 != 1;
  Buf<A> stats(kd_stat_planes(div, target) * R), dv(R), ce(R), gd(R), gc(R);
  fill(gd, 1.0);
  fill(gc, 1.0);
  KdProblem p{};
  p.student = s.p;
  p.teacher = t.p;
  p.student_dtype = dtype_of<TS>();
  p.teacher_dtype = dtype_of<TT>();
  p.outer = outer;
  p.classes = C;
  p.inner = inner;
  p.temperature = T;
  p.divergence = div;
  p.beta = 0.3;
  p.target = target ? y.p : nullptr;
  p.ignore_index = -100;
  p.row_mask = target ? mask.p : nullptr;
  p.skip_ignored = target;
  p.acc_double = std::is_same<A, double>::value;
  p.stats = stats.p;
  p.div = dv.p;
  p.ce = target ? ce.p : nullptr;
  const std::string what = "kd C=" + std::to_string(C) + " inner=" + std::to_string(inner) + " div=" +
                           std::to_string(int(div)) + " student=" + std::to_string(int(p.student_dtype)) +
                           " teacher=" + std::to_string(int(p.teacher_dtype));
  expect_ok(kdfast::cuda::kd_forward(p, nullptr), what + " forward");
  bool finite = true;
  for (int64_t r = 0; r < R; ++r) finite = finite && std::isfinite(double(dv.p[r]));
  check(finite, what + ": finite divergences");
  p.grad_div = gd.p;
  p.grad_div_stride = 1;
  p.grad_ce = target ? gc.p : nullptr;
  p.grad_ce_stride = 0;
  p.grad_student = gs.p;
  p.grad_teacher = gt.p;
  expect_ok(kdfast::cuda::kd_backward(p, nullptr), what + " backward");
}

template <class TS> void run_topk(TopKTail tail, Divergence div = Divergence::KL, bool sampled = false) {
  using A = std::conditional_t<std::is_same<TS, double>::value, double, float>;
  const int64_t rows = 3, C = 300, k = 5;
  Buf<TS> s(rows * C), gs(rows * C);
  fill(s, 4.0);
  Buf<int64_t> idx(rows * k);
  Buf<A> lp(rows * k), w(rows * k), stats(kTopKPlanes * rows), loss(rows), g(rows), tail_log(rows);
  const int64_t ids[3][5] = {{3, 299, 17, 0, 150}, {8, 8, 42, -1, 42}, {-1, -1, -1, -1, -1}};  // duplicates, padding
  for (int64_t r = 0; r < rows; ++r) {
    double mass = 0;  // the teacher's tail as the op forms it (csrc/topk_kd.cpp): well above rounding here
    for (int64_t j = 0; j < k; ++j) {
      idx.p[r * k + j] = ids[r][j];
      lp.p[r * k + j] = ids[r][j] < 0 ? A(-INFINITY) : A(-1.0 - 0.5 * double(j));
      w.p[r * k + j] = ids[r][j] < 0 ? A(0) : A(0.2);
      mass += std::exp(double(lp.p[r * k + j]));
    }
    tail_log.p[r] = A(std::log(1 - mass));
  }
  fill(g, 1.0);
  TopKProblem p{};
  p.student = s.p;
  p.student_dtype = dtype_of<TS>();
  p.indices = idx.p;
  p.logprobs = lp.p;
  p.rows = rows;
  p.classes = C;
  p.k = k;
  p.temperature = 1.5;
  p.tail = tail;
  p.divergence = div;
  p.beta = 0.3;
  p.weights = sampled ? w.p : nullptr;
  p.tail_log = tail_log.p;
  p.acc_double = std::is_same<A, double>::value;
  p.stats = stats.p;
  p.loss = loss.p;
  p.grad_loss = g.p;
  p.grad_stride = 1;
  p.grad_student = gs.p;
  const std::string what = "topk dtype=" + std::to_string(int(p.student_dtype)) + " tail=" + std::to_string(int(tail)) +
                           " divergence=" + std::to_string(int(div)) + (sampled ? " sampled" : "");
  expect_ok(kdfast::cuda::topk_kd_forward(p, nullptr), what + " forward");
  expect_ok(kdfast::cuda::topk_kd_backward(p, nullptr), what + " backward");
}

template <class T> void run_attention(Pool pool, double pe, bool normalize, int64_t pairs) {
  using A = std::conditional_t<std::is_same<T, double>::value, double, float>;
  const int64_t batch = 2;
  const int64_t shapes[4][2] = {{3, 5}, {7, 40}, {2, 300}, {5, 9}};  // (channels, positions)
  const int64_t count = pairs > 0 ? 2 * pairs : 3;
  std::vector<std::unique_ptr<Buf<T>>> x, gx;
  std::vector<std::unique_ptr<Buf<A>>> map, gmap;
  std::vector<std::unique_ptr<Buf<int32_t>>> arg;
  std::vector<AttentionFeature> f(count);
  for (int64_t q = 0; q < count; ++q) {
    // a pair's student and teacher share positions; channels differ
    const int64_t C = shapes[q % 4][0] + q, P = shapes[(pairs > 0 ? q % pairs : q) % 4][1];
    x.emplace_back(new Buf<T>(batch * C * P));
    gx.emplace_back(new Buf<T>(batch * C * P));
    map.emplace_back(new Buf<A>(batch * P));
    gmap.emplace_back(new Buf<A>(batch * P));
    arg.emplace_back(new Buf<int32_t>(batch * P));
    fill(*x.back(), 2.0);
    fill(*gmap.back(), 1.0);
    f[q] = {x.back()->p, dtype_of<T>(), C, P, map.back()->p, pool == Pool::Max ? arg.back()->p : nullptr,
            pairs > 0 ? nullptr : gmap.back()->p, q == 1 ? nullptr : gx.back()->p};
  }
  Buf<A> norms(count * batch), rows(pairs * batch), grows(pairs * batch);
  fill(grows, 1.0);
  AttentionProblem p{};
  p.features = f.data();
  p.count = count;
  p.batch = batch;
  p.p = pe;
  p.pool = pool;
  p.normalize = normalize;
  p.acc_double = std::is_same<A, double>::value;
  p.norms = norms.p;
  p.pairs = pairs;
  p.rows = pairs > 0 ? rows.p : nullptr;
  p.grad_rows = pairs > 0 ? grows.p : nullptr;
  const std::string what = "attention dtype=" + std::to_string(int(dtype_of<T>())) + " pool=" +
                           std::to_string(int(pool)) + " p=" + std::to_string(pe) + " pairs=" + std::to_string(pairs);
  expect_ok(kdfast::cuda::attention_forward(p, nullptr), what + " forward");
  expect_ok(kdfast::cuda::attention_backward(p, nullptr), what + " backward");
}

template <class TS, class TT> void run_affinity(bool both_grads) {
  const int64_t B = 3, n = 23, Cs = 5, Ct = 9, b0 = 1, bb = 2, i0 = 4, m = 17;
  Buf<TS> s(B * Cs * n), gs(B * Cs * n);
  Buf<TT> t(B * Ct * n), gt(B * Ct * n);
  fill(s, 1.0);
  fill(t, 1.0);
  for (int64_t c = 0; c < Cs; ++c) s.p[(b0 * Cs + c) * n + i0] = from_double<TS>(0.0);  // a zero node: the clamp
  const int64_t dk_rows = both_grads ? Cs + Ct : Ct;
  Buf<double> k(bb * (Cs + Ct) * m), norms(bb * 2 * m), dk(bb * dk_rows * m);
  for (size_t e = 0; e < dk.n; ++e) dk.p[e] = uniform();
  AffinityChunk p{};
  p.side[0] = {s.p, dtype_of<TS>(), Cs, 0, both_grads ? gs.p : nullptr, 0};
  p.side[1] = {t.p, dtype_of<TT>(), Ct, Cs, gt.p, both_grads ? Cs : 0};
  p.nodes = n;
  p.b0 = b0;
  p.bb = bb;
  p.i0 = i0;
  p.m = m;
  p.k_rows = Cs + Ct;
  p.dk_rows = dk_rows;
  p.eps = 1e-8;
  p.k = k.p;
  p.norms = norms.p;
  p.dk = dk.p;
  const std::string what = "affinity student=" + std::to_string(int(dtype_of<TS>()));
  expect_ok(kdfast::cuda::affinity_stage(p, nullptr), what + " stage");
  expect_ok(kdfast::cuda::affinity_grad(p, nullptr), what + " grad");
}

template <class S> void run_svd(int64_t batch, int64_t m, int64_t n, int special) {
  Buf<S> a(batch * m * n), u(batch * m * std::min(m, n)), sv(batch * std::min(m, n)), vh(batch * std::min(m, n) * n);
  fill(a, 3.0);
  if (special == 1) a.p[1] = S(NAN);                               // a non-finite matrix
  if (special == 2)                                                 // rank 1: null columns to complete
    for (int64_t e = 0; e < m * n; ++e) a.p[e] = S((e / n + 1) * (e % n + 1));
  SvdProblem p{};
  p.a = a.p;
  p.batch = batch;
  p.m = m;
  p.n = n;
  p.a_stride[0] = m * n;
  p.a_stride[1] = n;
  p.a_stride[2] = 1;
  p.dtype = dtype_of<S>();
  p.u = u.p;
  p.s = sv.p;
  p.vh = vh.p;
  const std::string what = "svd " + std::to_string(m) + "x" + std::to_string(n) + " dtype=" +
                           std::to_string(int(p.dtype)) +
                           " shared=" + std::to_string(kdfast::cuda::svd_shared_bytes(p));
  expect_ok(kdfast::cuda::svd_forward(p, nullptr), what);
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";  // fewer shapes (the ThreadSanitizer run)
  self_tests();

  // kd: every group size (several rows per warp: 4, 8, 16 lanes; a warp; a block), vector and scalar loads, the
  // pixel path, every divergence, with and without a target, every dtype pair; a lowered grid limit for the
  // grid-stride loops.
  const int64_t classes[] = {5, 24, 48, 100, 2052};
  for (int i = 0; i < 5; ++i) {
    const Divergence div = Divergence(i % 3);
    const bool target = i % 2 == 0;
    run_kd<float, float>(3, classes[i], 1, div, target, 2.0);
    if (quick && i % 2) continue;
    run_kd<double, double>(3, classes[i], 1, Divergence((i + 1) % 3), !target, 1.0);
    run_kd<__half, __half>(2, classes[i] * 2, 1, Divergence((i + 2) % 3), target, 2.0);
    run_kd<__nv_bfloat16, float>(2, classes[i], 1, div, !target, 1.0);
  }
  run_kd<float, __half>(2, 7, 5, Divergence::JSD, true, 2.0);  // pixels
  run_kd<double, double>(2, 3, 4, Divergence::KL, false, 1.0);
  kdemu::set_grid_cap(1);
  run_kd<float, float>(70, 6, 1, Divergence::JSD, true, 2.0);    // 64 rows a block: two grid-stride steps
  run_kd<float, float>(3, 3000, 1, Divergence::KL, true, 2.0);
  run_kd<float, float>(2, 3, 150, Divergence::ReverseKL, true, 1.0);
  run_topk<float>(TopKTail::Bucket);
  run_svd<float>(3, 4, 3, 0);
  kdemu::set_grid_cap(0);

  run_topk<float>(TopKTail::Renormalize);
  run_topk<double>(TopKTail::Bucket);
  run_topk<__half>(TopKTail::Renormalize);
  run_topk<__nv_bfloat16>(TopKTail::Bucket);
  run_topk<float>(TopKTail::Bucket, Divergence::JSD);
  run_topk<float>(TopKTail::Renormalize, Divergence::ReverseKL);
  run_topk<float>(TopKTail::Renormalize, Divergence::JSD);
  run_topk<float>(TopKTail::Renormalize, Divergence::KL, true);

  run_attention<float>(Pool::Mean, 2.0, true, 0);
  run_attention<__half>(Pool::Max, 1.0, true, 2);
  run_attention<double>(Pool::Sum, 3.0, false, 0);
  if (!quick) {
    run_attention<__nv_bfloat16>(Pool::Mean, 2.5, true, 2);
    run_attention<float>(Pool::Max, 2.0, false, 0);
    run_attention<float>(Pool::Sum, 1.0, true, 9);  // more features than one launch holds: two slices
  }

  run_affinity<float, double>(true);
  run_affinity<__half, __nv_bfloat16>(false);

  run_svd<float>(2, 5, 3, 0);
  run_svd<double>(1, 3, 6, 0);  // wide
  run_svd<float>(1, 7, 7, 1);   // NaN
  run_svd<double>(1, 6, 4, 2);  // rank 1
  if (!quick) {
    run_svd<float>(1, 40, 33, 0);  // more columns than a warp has lanes
  }
  run_svd<double>(1, 8, 800, 0);  // over 48 KiB of shared memory (51 KiB; few columns keep it quick)
  std::printf("cuda emulation driver: %lld launches, %lld blocks: %s\n", (long long)kdemu::runtime().launches.load(),
              (long long)kdemu::runtime().blocks.load(), failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
