// NVIDIA-only instructions of the tensor-core GEMM (gemm_mma.cuh), sm_80 and
// newer: the warp-wide fp16 MMA with fp32 accumulators, and a 16-byte load
// for data that is read exactly once.
#pragma once
#include <stdint.h>

namespace o4g::isa {

// d += A (16x16 fp16, row-major fragment) * B (16x8 fp16, column-major fragment).
// Not volatile: the result depends only on the operands, so the compiler may
// schedule it among the dequantization arithmetic.
__device__ __forceinline__ void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1)
{
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Quantized weights are streamed once per call: keep them out of L1 so the
// activations, which every block re-reads, stay there.
__device__ __forceinline__ uint4 load_once_16B(const void *address)
{
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(address));
    return v;
}

// (a & b) | c in one LOP3: written by hand because with two immediates the
// compiler emits an AND and an OR.
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c)
{
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// Halves (lo of a, lo of b) or (hi of a, hi of b): one PRMT each.
__device__ __forceinline__ uint32_t pair_low_halves(uint32_t a, uint32_t b) { return __byte_perm(a, b, 0x5410); }
__device__ __forceinline__ uint32_t pair_high_halves(uint32_t a, uint32_t b) { return __byte_perm(a, b, 0x7632); }

// Asynchronous 16-byte copy global -> shared (sm_80+), bypassing L1. Reads
// src_bytes (0 or 16) and zero-fills the rest: 0 turns an out-of-range tile
// edge into zeros without a branch around the copy.
__device__ __forceinline__ void copy_async_16B(void *shared, const void *global, uint32_t src_bytes)
{
    const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(shared));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(address), "l"(global), "r"(src_bytes));
}

__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;"); }

// Wait until at most `pending` committed groups are still in flight.
template <int pending>
__device__ __forceinline__ void copy_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(pending)); }

}  // namespace o4g::isa
