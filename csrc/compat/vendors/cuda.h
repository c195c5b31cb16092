#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>

#define O4G_PLATFORM "cuda"

#include "../asm/packed_half_ptx.cuh"

// Tensor-core MMA (mma.sync, sm_80+): gemm_mma.cuh is built on this platform only.
#define O4G_HAVE_MMA 1
#include "../asm/mma_ptx.cuh"

// Warpgroup MMA, the tensor copy engine and clusters (sm_90a): gemm_wgmma.cuh.
// Compiled into every CUDA build; its device code exists for sm_90a only.
#define O4G_HAVE_WGMMA 1
#include "../asm/hopper_ptx.cuh"
