// Every kdfast op schema, and the Python module kdfast._C (build facts and CPU instruction-set control).
#include <torch/extension.h>
#include <torch/library.h>

#include "affinity.h"
#include "common/svd.h"
#include "cpu/dispatch.h"

TORCH_LIBRARY(kdfast, m) {
  // Fused temperature-softmax divergence over (outer, classes, inner) logits, per row (outer, inner):
  // div = the unscaled divergence, ce = cross-entropy at T = 1 against target (empty without a target),
  // stats = the (5, outer, inner) row statistics the backward needs.
  m.def("kd_fwd(Tensor student, Tensor teacher, Tensor? target, float temperature, str divergence, float beta, "
        "int ignore_index) -> (Tensor div, Tensor ce, Tensor stats)");
  m.def("kd_bwd(Tensor grad_div, Tensor? grad_ce, Tensor student, Tensor teacher, Tensor? target, Tensor stats, "
        "float temperature, str divergence, float beta, int ignore_index, bool student_grad, bool teacher_grad) "
        "-> (Tensor grad_student, Tensor grad_teacher)");
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
  m.attr("svd_max_cols") = kdfast::kSvdMaxCols;
#ifdef KDFAST_WITH_CUDA
  m.attr("cuda") = true;
#else
  m.attr("cuda") = false;
#endif
}
