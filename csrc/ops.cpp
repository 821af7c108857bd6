// Every kdfast op schema, and the Python module kdfast._C (build facts and CPU instruction-set control).
#include <torch/extension.h>
#include <torch/library.h>

#include "affinity.h"
#include "cpu/dispatch.h"

TORCH_LIBRARY(kdfast, m) {
  // Attention maps of every (batch, channels, positions) feature map of a call in one launch: pooled over the
  // channels as mean/sum/max of |x|^p and, with normalize, L2-normalised over the positions. maps are float32
  // (float64 when a feature is), norms the (features, batch) norms before normalisation, argmax the int32 first
  // arg-max channels for max pooling (empty otherwise). The backward writes each requested feature gradient once.
  m.def("attention_fwd(Tensor[] features, float p, str pool, bool normalize) "
        "-> (Tensor[] maps, Tensor norms, Tensor[] argmax)");
  m.def("attention_bwd(Tensor[] grad_maps, Tensor[] features, Tensor[] maps, Tensor norms, Tensor[] argmax, "
        "float p, str pool, bool normalize, bool[] needs_grad) -> Tensor[]");
  // Attention transfer over layer pairs (student[k], teacher[k]) of equal positions, in one launch each way:
  // rows = the (pairs, batch) per-sample means over positions of (map_s - map_t)^2 of normalised maps; maps, norms
  // and argmax as attention_fwd over student + teacher (saved for the backward). The backward returns the
  // gradients of student + teacher (empty where needs_grad, over the same concatenation, is false).
  m.def("attention_transfer_fwd(Tensor[] student, Tensor[] teacher, float p, str pool) "
        "-> (Tensor rows, Tensor[] maps, Tensor norms, Tensor[] argmax)");
  m.def("attention_transfer_bwd(Tensor grad_rows, Tensor[] student, Tensor[] teacher, Tensor[] maps, Tensor norms, "
        "Tensor[] argmax, float p, str pool, bool[] needs_grad) -> Tensor[]");
  // Pairwise-affinity loss over (B, C, n) node features (student and teacher may differ in C): loss = the (B,)
  // values sum_ij (a^s_ij - a^t_ij)^2 / n^2, gram = the (B, Cs + Ct, Cs + Ct) float64 Gram matrix of the
  // normalised nodes. The backward takes gram's rows of the sides whose gradient is wanted (student rows, then
  // teacher rows). No n x n tensor is formed.
  m.def("pairwise_affinity_fwd(Tensor student, Tensor teacher) -> (Tensor loss, Tensor gram)");
  m.def("pairwise_affinity_bwd(Tensor grad_loss, Tensor student, Tensor teacher, Tensor gram, bool student_grad, "
        "bool teacher_grad) -> (Tensor grad_student, Tensor grad_teacher)");
  // Reduced SVD of each (m, n) matrix of a (batch, m, n) float32/float64 tensor, by one-sided Jacobi:
  // U (batch, m, k), S (batch, k) descending, Vh (batch, k, n), k = min(m, n). Its backward is written with
  // torch ops in kdfast/_ops.py.
  m.def("batched_svd(Tensor a) -> (Tensor U, Tensor S, Tensor Vh)");
}

PYBIND11_MODULE(_C, m) {
  using namespace kdfast::cpu;
  m.def("cpu_capability", [] { return capability_name(capability()); },
        "The CPU instruction set the kernels use now.");
  m.def("best_cpu_capability", [] { return capability_name(best_capability()); },
        "The best CPU instruction set this machine supports.");
  m.def("set_cpu_capability", [](const std::string& name) { set_capability(capability_from_name(name)); },
        "Use the kernels of a lower instruction set (tests reach every path with it).");
  m.def("set_affinity_chunk_bytes", &kdfast::set_affinity_chunk_bytes,
        "Staging size of the pairwise-affinity node chunks on every device; 0 restores the defaults (tests reach "
        "the multi-chunk walks with it).");
#ifdef KDFAST_WITH_CUDA
  m.attr("cuda") = true;
#else
  m.attr("cuda") = false;
#endif
}
