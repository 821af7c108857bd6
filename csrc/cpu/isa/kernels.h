// Every CPU kernel header, compiled once per instruction set by the files beside this one.
// A new op adds its kernel header here and its entry points to KDFAST_CPU_KERNELS (csrc/cpu/dispatch.h).
#include "../affinity_kernel.h"
#include "../attention_kernel.h"
#include "../kd_div_kernel.h"
#include "../svd_kernel.h"
#include "../topk_kd_kernel.h"
