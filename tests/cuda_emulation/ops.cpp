// The CUDA emulation's test-only torch ops: library kdfast_emu (this extension is compiled with
// -Dkdfast=kdfast_emu, so `kdfast` below is that library), the same schemas as kdfast's ops, whose CPU kernels are
// the device-independent op code (csrc/<op>.cpp) with the CUDA launchers of csrc/cuda run by the emulation on CPU
// tensors. The counterpart of csrc/cuda/*_binding.cpp.
#include <torch/library.h>

#include "affinity.h"
#include "attention.h"
#include "kd_div.h"
#include "svd.h"
#include "topk_kd.h"
// after torch: the emulation defines CUDA's names (threadIdx, __shared__, ...) as macros
#include "cuda/affinity.h"
#include "cuda/attention.h"
#include "cuda/kd_div.h"
#include "cuda/svd.h"
#include "cuda/topk_kd.h"

namespace kdfast {
namespace {

// Runs a launcher (on the null stream) and turns a failed launch into an error with the emulation's message.
template <class Problem>
std::function<void(const Problem&)> emulated(cudaError_t (*kernel)(const Problem&, cudaStream_t), const char* what) {
  return [kernel, what](const Problem& p) {
    const cudaError_t err = kernel(p, nullptr);
    TORCH_CHECK(err == cudaSuccess, "kdfast: emulated CUDA ", what, " kernel failed (", cudaGetErrorString(err),
                "): ", kdemu::last_message());
  };
}

const AffinityKernels& affinity_kernels() {
  static const AffinityKernels k{emulated(cuda::affinity_stage, "affinity"), emulated(cuda::affinity_grad, "affinity"),
                                 int64_t(32) << 20, false};
  return k;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kdfast, m) {
  m.def("set_grid_cap(int blocks) -> ()");
  m.def("set_affinity_chunk_bytes(int bytes) -> ()");
  m.def("launches() -> int");
}

TORCH_LIBRARY_IMPL(kdfast, CatchAll, m) {
  // Lowers every launcher's grid limit (0 restores them), so that small inputs run the grid-stride loops.
  m.impl("set_grid_cap", [](int64_t blocks) { kdemu::set_grid_cap(blocks); });
  m.impl("set_affinity_chunk_bytes", [](int64_t bytes) { set_affinity_chunk_bytes(bytes); });
  // Kernel launches so far: a test checks that the emulated kernels ran.
  m.impl("launches", []() -> int64_t { return kdemu::runtime().launches.load(); });
}

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("kd_fwd", [](const at::Tensor& s, const at::Tensor& t, const std::optional<at::Tensor>& y, double T,
                      c10::string_view d, double beta, int64_t ignore) {
    return kd_fwd(s, t, y, T, std::string(d), beta, ignore, emulated(cuda::kd_forward, "kd"));
  });
  m.impl("kd_partial_fwd", [](const at::Tensor& s, const at::Tensor& t, const at::Tensor& lse, double T,
                              c10::string_view d, double beta) {
    return kd_partial_fwd(s, t, lse, T, std::string(d), beta, emulated(cuda::kd_forward, "kd"));
  });
  m.impl("kd_bwd", [](const at::Tensor& gd, const std::optional<at::Tensor>& gc, const at::Tensor& s,
                      const at::Tensor& t, const std::optional<at::Tensor>& y, const at::Tensor& stats, double T,
                      c10::string_view d, double beta, int64_t ignore, bool sg, bool tg) {
    return kd_bwd(gd, gc, s, t, y, stats, T, std::string(d), beta, ignore, sg, tg, emulated(cuda::kd_backward, "kd"));
  });
  m.impl("kd_reduce_fwd", [](const at::Tensor& s, const at::Tensor& t, const std::optional<at::Tensor>& y,
                             const std::optional<at::Tensor>& mask, int64_t dim, double T, c10::string_view d,
                             double beta, int64_t ignore, c10::string_view red, double kw, double cw) {
    return kd_reduce_fwd(s, t, y, mask, dim, T, std::string(d), beta, ignore, std::string(red), kw, cw,
                         emulated(cuda::kd_forward, "kd"));
  });
  m.impl("kd_reduce_bwd", [](const at::Tensor& g, const at::Tensor& s, const at::Tensor& t,
                             const std::optional<at::Tensor>& y, const std::optional<at::Tensor>& mask,
                             const at::Tensor& stats, const at::Tensor& count, int64_t dim, double T,
                             c10::string_view d, double beta, int64_t ignore, c10::string_view red, double kw,
                             double cw, bool sg, bool tg) {
    return kd_reduce_bwd(g, s, t, y, mask, stats, count, dim, T, std::string(d), beta, ignore, std::string(red), kw,
                         cw, sg, tg, emulated(cuda::kd_backward, "kd"));
  });
  m.impl("topk_kd_fwd", [](const at::Tensor& s, const at::Tensor& i, const at::Tensor& lp, double T,
                           c10::string_view tail, c10::string_view div, double beta,
                           const std::optional<at::Tensor>& w) {
    return topk_kd_fwd(s, i, lp, T, std::string(tail), std::string(div), beta, w,
                       emulated(cuda::topk_kd_forward, "topk"));
  });
  m.impl("topk_kd_bwd", [](const at::Tensor& g, const at::Tensor& s, const at::Tensor& i, const at::Tensor& lp,
                           const at::Tensor& stats, double T, c10::string_view tail, c10::string_view div,
                           double beta, const std::optional<at::Tensor>& w) {
    return topk_kd_bwd(g, s, i, lp, stats, T, std::string(tail), std::string(div), beta, w,
                       emulated(cuda::topk_kd_backward, "topk"));
  });
  m.impl("attention_fwd", [](at::TensorList features, double p, c10::string_view pool, bool normalize) {
    auto [rows, maps, norms, argmax] = attention_forward_op(features.vec(), p, std::string(pool), normalize, 0,
                                                            emulated(cuda::attention_forward, "attention"));
    return std::make_tuple(maps, norms, argmax);
  });
  m.impl("attention_bwd", [](at::TensorList grad_maps, at::TensorList features, at::TensorList maps,
                             const at::Tensor& norms, at::TensorList argmax, double p, c10::string_view pool,
                             bool normalize, const c10::List<bool>& needs_grad) {
    return attention_backward_op(grad_maps, std::nullopt, features.vec(), maps, norms, argmax, p, std::string(pool),
                                 normalize, 0, needs_grad.vec(), emulated(cuda::attention_backward, "attention"));
  });
  m.impl("attention_transfer_fwd", [](at::TensorList student, at::TensorList teacher, double p,
                                      c10::string_view pool) {
    return attention_forward_op(concat(student, teacher), p, std::string(pool), true, int64_t(student.size()),
                                emulated(cuda::attention_forward, "attention"));
  });
  m.impl("attention_transfer_bwd", [](const at::Tensor& grad_rows, at::TensorList student, at::TensorList teacher,
                                      at::TensorList maps, const at::Tensor& norms, at::TensorList argmax, double p,
                                      c10::string_view pool, const c10::List<bool>& needs_grad) {
    return attention_backward_op({}, grad_rows, concat(student, teacher), maps, norms, argmax, p, std::string(pool),
                                 true, int64_t(student.size()), needs_grad.vec(),
                                 emulated(cuda::attention_backward, "attention"));
  });
  m.impl("pairwise_affinity_fwd", [](const at::Tensor& s, const at::Tensor& t) {
    return pairwise_affinity_fwd(s, t, affinity_kernels());
  });
  m.impl("pairwise_affinity_bwd", [](const at::Tensor& g, const at::Tensor& s, const at::Tensor& t,
                                     const at::Tensor& gram, bool sg, bool tg) {
    return pairwise_affinity_bwd(g, s, t, gram, sg, tg, affinity_kernels());
  });
  m.impl("batched_svd", [](const at::Tensor& a) {
    const auto launch = emulated(cuda::svd_forward, "batched_svd");
    return batched_svd(a, [&launch](const SvdProblem& p) {
      const int64_t bytes = cuda::svd_shared_bytes(p);
      TORCH_CHECK_VALUE(bytes <= kdemu::kMaxOptinShared, "kdfast: a ", p.m, " x ", p.n, " matrix needs ", bytes,
                        " bytes of shared memory in the CUDA batched_svd kernel; this GPU allows ",
                        kdemu::kMaxOptinShared);
      launch(p);
    });
  });
}

}  // namespace kdfast
