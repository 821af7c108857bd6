#include "affinity.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>

#include "cpu/dispatch.h"
#include "tensor_utils.h"

namespace kdfast {
namespace {

constexpr double kNormEps = 1e-8;
// G is symmetric: only its block rows' upper parts are multiplied (one GEMM per block row), which saves about
// 40% of the products at C = 640; the lower part is mirrored at the end.
constexpr int64_t kGramBlock = 128;

std::pair<at::Tensor, at::Tensor> prepare_nodes(const at::Tensor& student, const at::Tensor& teacher) {
  TORCH_CHECK_VALUE(student.dim() == 3 && teacher.dim() == 3, "kdfast: pairwise_affinity takes (B, C, n) nodes, got ",
                    student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK_VALUE(student.size(0) == teacher.size(0) && student.size(2) == teacher.size(2),
                    "kdfast: student ", student.sizes(), " and teacher ", teacher.sizes(),
                    " nodes differ in batch or node count");
  TORCH_CHECK_VALUE(student.size(1) >= 1 && teacher.size(1) >= 1 && student.size(2) >= 1,
                    "kdfast: pairwise_affinity needs at least one channel and one node");
  TORCH_CHECK(student.device() == teacher.device(), "kdfast: student on ", student.device(), ", teacher on ",
              teacher.device());
  kernel_dtype(student, "student");
  kernel_dtype(teacher, "teacher");
  return {student.contiguous(), teacher.contiguous()};
}

std::atomic<int64_t> chunk_bytes_override{0};

// How the nodes are walked: bb whole samples at a time when a sample fits the staging buffer, else m nodes of one.
struct ChunkPlan {
  int64_t bb, m;
};

ChunkPlan plan_chunks(int64_t batch, int64_t nodes, int64_t rows, int64_t bytes) {
  const int64_t fit = std::max<int64_t>(1, bytes / (int64_t(sizeof(double)) * rows));
  if (nodes <= fit) return {std::max<int64_t>(1, std::min(batch, fit / nodes)), nodes};
  return {1, fit};
}

AffinityChunk base_chunk(const at::Tensor& s, const at::Tensor& t) {
  AffinityChunk p{};
  p.side[0] = {s.data_ptr(), kernel_dtype(s, "student"), s.size(1), 0, nullptr, 0};
  p.side[1] = {t.data_ptr(), kernel_dtype(t, "teacher"), t.size(1), s.size(1), nullptr, 0};
  p.nodes = s.size(2);
  p.k_rows = s.size(1) + t.size(1);
  p.eps = kNormEps;
  return p;
}

// Walks the chunks of sample groups [g0, g1) with its own staging buffers, calling body(chunk, K, dK) on each
// chunk after staging it; K and dK are views of the buffers.
template <class F>
void walk_groups(AffinityChunk p, const at::Tensor& s, int64_t dk_rows, const ChunkPlan& plan, int64_t g0,
                 int64_t g1, const AffinityKernels& kernels, const F& body) {
  const int64_t batch = s.size(0), nodes = p.nodes;
  const auto f64 = s.options().dtype(at::kDouble);
  at::Tensor kbuf = at::empty({plan.bb * p.k_rows * plan.m}, f64);
  at::Tensor norms = at::empty({plan.bb * 2 * plan.m}, f64);
  at::Tensor dkbuf = dk_rows > 0 ? at::empty({plan.bb * dk_rows * plan.m}, f64) : at::Tensor();
  p.dk_rows = dk_rows;
  for (int64_t b0 = g0 * plan.bb; b0 < std::min(batch, g1 * plan.bb); b0 += plan.bb)
    for (int64_t i0 = 0; i0 < nodes; i0 += plan.m) {
      p.b0 = b0;
      p.bb = std::min(plan.bb, batch - b0);
      p.i0 = i0;
      p.m = std::min(plan.m, nodes - i0);
      at::Tensor k = kbuf.narrow(0, 0, p.bb * p.k_rows * p.m).view({p.bb, p.k_rows, p.m});
      at::Tensor dk = dk_rows > 0 ? dkbuf.narrow(0, 0, p.bb * dk_rows * p.m).view({p.bb, dk_rows, p.m}) : dkbuf;
      p.k = k.data_ptr<double>();
      p.norms = norms.data_ptr<double>();
      p.dk = dk_rows > 0 ? dk.data_ptr<double>() : nullptr;
      kernels.stage(p);
      body(p, k, dk);
    }
}

// Every chunk of the batch. With parallel_groups (the CPU) and two sample groups or more, each thread walks its own
// groups with single-threaded BLAS calls and kernels: one parallel region per op instead of a few per chunk, whose
// start-up dominated medium-sized products on a shared 2-core machine (2-5x slower). Samples are independent, so
// the results do not depend on the split.
template <class F>
void walk_chunks(const AffinityChunk& p, const at::Tensor& s, int64_t dk_rows, const AffinityKernels& kernels,
                 const F& body) {
  const int64_t bytes = chunk_bytes_override.load();
  const ChunkPlan plan = plan_chunks(s.size(0), p.nodes, p.k_rows, bytes > 0 ? bytes : kernels.chunk_bytes);
  const int64_t groups = (s.size(0) + plan.bb - 1) / plan.bb;
  if (kernels.parallel_groups && groups >= 2) {
    // The worker threads take the caller's thread-local state (grad and inference mode, dispatch keys), which
    // at::parallel_for does not carry: without it, chunks would update inference-mode outputs outside that mode.
    const at::ThreadLocalState state;
    at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
      const at::ThreadLocalStateGuard guard(state);
      walk_groups(p, s, dk_rows, plan, g0, g1, kernels, body);
    });
  }
  else
    walk_groups(p, s, dk_rows, plan, 0, groups, kernels, body);
}

}  // namespace

void set_affinity_chunk_bytes(int64_t bytes) {
  TORCH_CHECK_VALUE(bytes >= 0, "kdfast: chunk bytes must be >= 0, got ", bytes);
  chunk_bytes_override.store(bytes);
}

std::tuple<at::Tensor, at::Tensor> pairwise_affinity_fwd(const at::Tensor& student, const at::Tensor& teacher,
                                                         const AffinityKernels& kernels) {
  const at::NoGradGuard no_grad;  // the op's autograd is registered above it (kdfast/_ops.py)
  auto [s, t] = prepare_nodes(student, teacher);
  const int64_t batch = s.size(0), cs = s.size(1), c = cs + t.size(1);
  const double n = double(s.size(2));
  const bool f64 = s.scalar_type() == at::kDouble || t.scalar_type() == at::kDouble;
  at::Tensor gram = at::empty({batch, c, c}, s.options().dtype(at::kDouble));
  at::Tensor loss = at::empty({batch}, gram.options());
  // Everything per sample group happens inside the walk (on the CPU, in the group's thread), so that no small op
  // opens a parallel region of its own.
  walk_chunks(base_chunk(s, t), s, 0, kernels, [&](const AffinityChunk& p, const at::Tensor& k, const at::Tensor&) {
    at::Tensor g = gram.narrow(0, p.b0, p.bb);
    const double beta = p.i0 == 0 ? 0.0 : 1.0;  // the first chunk overwrites the uninitialised Gram matrix
    for (int64_t r0 = 0; r0 < c; r0 += kGramBlock) {
      const int64_t rb = std::min(kGramBlock, c - r0);
      g.narrow(1, r0, rb).narrow(2, r0, c - r0)
          .baddbmm_(k.narrow(1, r0, rb), k.narrow(1, r0, c - r0).transpose(1, 2), beta, 1.0);
    }
    if (p.i0 + p.m < p.nodes) return;
    for (int64_t r0 = kGramBlock; r0 < c; r0 += kGramBlock) {
      const int64_t rb = std::min(kGramBlock, c - r0);
      g.narrow(1, r0, rb).narrow(2, 0, r0).copy_(g.narrow(2, r0, rb).narrow(1, 0, r0).transpose(1, 2));
    }
    // sum_ij (a^s_ij - a^t_ij)^2 = |P|^2 - 2 |R|^2 + |Q|^2, all in float64: the terms are of order n^2 and may
    // nearly cancel, so the Gram products are accumulated in float64 (float32 would lose the loss to rounding).
    const auto sq = [&](int64_t r0, int64_t rn, int64_t c0, int64_t cn) {
      return at::linalg_vector_norm(g.narrow(1, r0, rn).narrow(2, c0, cn), 2, at::IntArrayRef{1, 2}).square();
    };
    const int64_t ct = c - cs;
    loss.narrow(0, p.b0, p.bb).copy_((sq(0, cs, 0, cs) - 2 * sq(0, cs, cs, ct) + sq(cs, ct, cs, ct)) / (n * n));
  });
  return {loss.to(f64 ? at::kDouble : at::kFloat), gram};
}

std::tuple<at::Tensor, at::Tensor> pairwise_affinity_bwd(const at::Tensor& grad_loss, const at::Tensor& student,
                                                         const at::Tensor& teacher, const at::Tensor& gram,
                                                         bool student_grad, bool teacher_grad,
                                                         const AffinityKernels& kernels) {
  const at::NoGradGuard no_grad;  // the op's autograd is registered above it (kdfast/_ops.py)
  auto [s, t] = prepare_nodes(student, teacher);
  const int64_t batch = s.size(0), cs = s.size(1), c = cs + t.size(1);
  const double n = double(s.size(2));
  const int64_t r0 = student_grad ? 0 : cs, rows = (student_grad ? cs : 0) + (teacher_grad ? c - cs : 0);
  TORCH_CHECK_VALUE(gram.sizes() == at::IntArrayRef({batch, rows, c}) && gram.scalar_type() == at::kDouble,
                    "kdfast: gram rows of shape ", gram.sizes(), " do not belong to these nodes and gradients ",
                    "(expected (", batch, ", ", rows, ", ", c, ") float64)");
  at::Tensor gs = student_grad ? empty_output(s.sizes(), s.options()) : at::empty({0}, s.options());
  at::Tensor gt = teacher_grad ? empty_output(t.sizes(), t.options()) : at::empty({0}, t.options());
  if (batch == 0 || !(student_grad || teacher_grad)) return {gs, gt};
  // With J = +1 on student rows and -1 on teacher rows, loss_b = sum_ij J_i J_j G_ij^2 / n^2, so the gradient
  // with respect to the normalised nodes is dK = 4 g_b / n^2 (J G J) K; only the wanted sides' rows are formed.
  const auto f64 = gram.options();
  at::Tensor sign = at::cat({at::ones({cs}, f64), -at::ones({c - cs}, f64)});
  at::Tensor coef = grad_loss.to(at::kDouble).expand({batch}).mul(4.0 / (n * n));
  at::Tensor mat = at::empty({batch, rows, c}, f64);
  AffinityChunk p = base_chunk(s, t);
  p.side[0].grad = student_grad ? gs.data_ptr() : nullptr;
  p.side[1].grad = teacher_grad ? gt.data_ptr() : nullptr;
  p.side[1].dk_offset = student_grad ? cs : 0;
  walk_chunks(p, s, rows, kernels, [&](const AffinityChunk& q, const at::Tensor& k, at::Tensor dk) {
    at::Tensor m = mat.narrow(0, q.b0, q.bb);
    if (q.i0 == 0) {  // the group's rows of 4 g_b / n^2 (J G J), formed in the group's thread
      at::mul_out(m, gram.narrow(0, q.b0, q.bb), coef.narrow(0, q.b0, q.bb).view({q.bb, 1, 1}));
      m.mul_(sign.narrow(0, r0, rows).unsqueeze(1)).mul_(sign.unsqueeze(0));
    }
    at::bmm_out(dk, m, k);
    kernels.grad(q);
  });
  return {gs, gt};
}

TORCH_LIBRARY_FRAGMENT(kdfast, m) {
  // Pairwise-affinity loss over (B, C, n) node features (student and teacher may differ in C): loss = the (B,)
  // values sum_ij (a^s_ij - a^t_ij)^2 / n^2, gram = the (B, Cs + Ct, Cs + Ct) float64 Gram matrix of the
  // normalised nodes. The backward takes gram's rows of the sides whose gradient is wanted (student rows, then
  // teacher rows). No n x n tensor is formed.
  m.def("pairwise_affinity_fwd(Tensor student, Tensor teacher) -> (Tensor loss, Tensor gram)");
  m.def("pairwise_affinity_bwd(Tensor grad_loss, Tensor student, Tensor teacher, Tensor gram, bool student_grad, "
        "bool teacher_grad) -> (Tensor grad_student, Tensor grad_teacher)");
}

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  // 2 MiB chunks per thread: products over a few hundred nodes already run near BLAS peak single-threaded, and the
  // staging stays small beside the gradient itself (measured at n = 8192, C = 640: 1, 2, 4, 8 MiB took about the
  // same time; the step's peak grew by 2.4 MiB per doubling).
  static const AffinityKernels cpu_kernels{cpu::affinity_stage, cpu::affinity_grad, int64_t(2) << 20, true};
  m.impl("pairwise_affinity_fwd", [](const at::Tensor& s, const at::Tensor& t) {
    return pairwise_affinity_fwd(s, t, cpu_kernels);
  });
  m.impl("pairwise_affinity_bwd", [](const at::Tensor& g, const at::Tensor& s, const at::Tensor& t,
                                     const at::Tensor& gram, bool sg, bool tg) {
    return pairwise_affinity_bwd(g, s, t, gram, sg, tg, cpu_kernels);
  });
}

}  // namespace kdfast
