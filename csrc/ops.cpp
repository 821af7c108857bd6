// The kdfast op library, and the Python module kdfast._C (build facts and CPU instruction-set control).
#include <torch/extension.h>
#include <torch/library.h>

#include "affinity.h"
#include "common/svd.h"
#include "cpu/dispatch.h"

// The library itself; each op's schema stands beside its C++ in csrc/<op>.cpp (TORCH_LIBRARY_FRAGMENT).
TORCH_LIBRARY(kdfast, m) {}

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
