// csrc/cuda/topk_kd.cu compiled as host C++ for the CUDA emulation.
#include "../../../csrc/cuda/topk_kd.cu"
