// The only place that knows whether we are compiled by nvcc or hipcc.
// Kernels include this and speak CUDA's names; the HIP header maps them.
#pragma once

#if defined(__HIP_PLATFORM_AMD__) || defined(__HIPCC__)
#include "vendors/hip.h"
#else
#include "vendors/cuda.h"
#endif
