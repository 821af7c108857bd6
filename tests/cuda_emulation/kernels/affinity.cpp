// csrc/cuda/affinity.cu compiled as host C++ for the CUDA emulation.
#include "../../../csrc/cuda/affinity.cu"
