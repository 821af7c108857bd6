// The kernels without vector extensions beyond the compiler's defaults.
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "kernels.h"
