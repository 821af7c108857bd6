// csrc/cuda/attention.cu compiled as host C++ for the CUDA emulation.
#include "../../../csrc/cuda/attention.cu"
