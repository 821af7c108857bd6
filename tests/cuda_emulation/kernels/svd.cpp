// csrc/cuda/svd.cu compiled as host C++ for the CUDA emulation.
#include "../../../csrc/cuda/svd.cu"
