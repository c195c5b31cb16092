// ILA-Opt on NVIDIA: the packed-half multiply-add and add as PTX, so the
// instruction is chosen by us rather than by the __hfma2/__hadd2 intrinsics.
// Both are single SASS HFMA2/HADD2 instructions on sm_53 and newer.
#pragma once
#include <cuda_fp16.h>
#include <stdint.h>

namespace o4g::isa {

__device__ __forceinline__ uint32_t bits_of(__half2 x) { return *reinterpret_cast<uint32_t *>(&x); }
__device__ __forceinline__ __half2 half2_of(uint32_t x) { return *reinterpret_cast<__half2 *>(&x); }

__device__ __forceinline__ __half2 packed_fma(__half2 a, __half2 b, __half2 c)
{
    uint32_t d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(bits_of(a)), "r"(bits_of(b)), "r"(bits_of(c)));
    return half2_of(d);
}

__device__ __forceinline__ __half2 packed_add(__half2 a, __half2 b)
{
    uint32_t d;
    asm("add.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(bits_of(a)), "r"(bits_of(b)));
    return half2_of(d);
}

}  // namespace o4g::isa
