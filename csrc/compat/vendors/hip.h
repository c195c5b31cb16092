// CUDA names for the HIP runtime: the kernels are written once, against CUDA's API.
#pragma once
#include <hip/hip_runtime.h>
#include <hip/hip_fp16.h>

#define O4G_PLATFORM "rocm"

#define cudaStream_t hipStream_t
#define cudaError_t hipError_t
#define cudaSuccess hipSuccess
#define cudaGetLastError hipGetLastError
#define cudaGetErrorString hipGetErrorString
#define cudaGetDevice hipGetDevice
#define cudaSetDevice hipSetDevice
#define cudaGetDeviceCount hipGetDeviceCount
#define cudaGetDeviceProperties hipGetDeviceProperties
#define cudaDeviceProp hipDeviceProp_t
#define cudaStreamSynchronize hipStreamSynchronize
#define cudaMemsetAsync hipMemsetAsync
#define cudaErrorInvalidValue hipErrorInvalidValue

#include "../asm/packed_half_gfx9.cuh"

// No mma.sync on gfx9: the tensor-core GEMM (gemm_mma.cuh) compiles to nothing here
// and the Rust dispatch never picks it on ROCm.
#define O4G_HAVE_MMA 0
#define O4G_HAVE_WGMMA 0
