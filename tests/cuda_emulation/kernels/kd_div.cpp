// csrc/cuda/kd_div.cu compiled as host C++ for the CUDA emulation.
#include "../../../csrc/cuda/kd_div.cu"
