// ILA-Opt on AMD gfx9 (gfx906 = HYGON DCU Z100 / MI50, gfx90a, gfx942): the
// VOP3P packed-half instructions as inline assembly. "v" constraints keep the
// operands in vector registers, which VOP3P requires. Not volatile: the result
// depends only on the inputs, and a volatile asm pins the surrounding LDS reads
// (measured in the gfx906 disassembly: 128-bit ds_read_b128 became 32-bit
// ds_read_b32, with 7x the s_waitcnt).
#pragma once
#include <hip/hip_fp16.h>
#include <stdint.h>

namespace o4g::isa {

__device__ __forceinline__ uint32_t bits_of(__half2 x) { return *reinterpret_cast<uint32_t *>(&x); }
__device__ __forceinline__ __half2 half2_of(uint32_t x) { return *reinterpret_cast<__half2 *>(&x); }

__device__ __forceinline__ __half2 packed_fma(__half2 a, __half2 b, __half2 c)
{
    uint32_t d;
    asm("v_pk_fma_f16 %0, %1, %2, %3" : "=v"(d) : "v"(bits_of(a)), "v"(bits_of(b)), "v"(bits_of(c)));
    return half2_of(d);
}

__device__ __forceinline__ __half2 packed_add(__half2 a, __half2 b)
{
    uint32_t d;
    asm("v_pk_add_f16 %0, %1, %2" : "=v"(d) : "v"(bits_of(a)), "v"(bits_of(b)));
    return half2_of(d);
}

}  // namespace o4g::isa
