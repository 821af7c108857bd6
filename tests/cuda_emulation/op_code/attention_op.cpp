// csrc/attention.cpp, the device-independent op code, for the CUDA emulation's library kdfast_emu.
#include "../no_cpu_registration.h"
#include "../../../csrc/attention.cpp"
