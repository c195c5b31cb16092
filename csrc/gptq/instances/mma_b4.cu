// The tensor-core kernels (4-bit only), in their own translation unit. Empty on ROCm.
#define O4G_MMA_INSTANCES
#include "../gemm_mma.cuh"
