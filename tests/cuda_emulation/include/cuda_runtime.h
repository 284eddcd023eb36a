// Stand-in for the CUDA toolkit header of this name: the emulation harness
// compiles the CUDA kernels with a host compiler (see cuda_shim.h).
#pragma once
#include "../cuda_shim.h"
