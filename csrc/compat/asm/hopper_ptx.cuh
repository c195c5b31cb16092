// Hopper-only instructions (sm_90 / sm_90a) of the warpgroup GEMM
// (gemm_wgmma.cuh): transaction barriers in shared memory, the tensor copy
// engine (TMA) and plain bulk copies that complete on them, warpgroup MMA
// ordering, and thread-block-cluster barriers and shared-memory addressing.
// Every address here is a 32-bit shared-memory address (cvta'd once).
#pragma once
#include <stdint.h>

#include "wgmma_ptx.cuh"

namespace o4g::isa {

__device__ __forceinline__ uint32_t shared_address(const void *pointer)
{
    return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// ---- transaction barriers (mbarrier) ----

__device__ __forceinline__ void barrier_init(uint32_t barrier, uint32_t arrivals)
{
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(barrier), "r"(arrivals));
}

// Makes the initialized barriers visible to the copy engine and the cluster.
__device__ __forceinline__ void barrier_init_fence()
{
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

// One arrival that also announces `bytes` of copies that will complete on the barrier.
__device__ __forceinline__ void barrier_arrive_expect(uint32_t barrier, uint32_t bytes)
{
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(barrier), "r"(bytes) : "memory");
}

__device__ __forceinline__ void barrier_arrive(uint32_t barrier)
{
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(barrier) : "memory");
}

// Spins until the barrier's phase with this parity has completed.
__device__ __forceinline__ void barrier_wait(uint32_t barrier, uint32_t parity)
{
    asm volatile(
        "{\n"
        ".reg .pred done;\n"
        "wait_again:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra wait_again;\n"
        "}\n" ::"r"(barrier),
        "r"(parity)
        : "memory");
}

// ---- copies that complete on a barrier ----

// A 2-D box of a tensor map (`map`, a __grid_constant__ kernel parameter) at
// element coordinates (x innermost, y) into shared memory.
__device__ __forceinline__ void tensor_copy_2d(uint32_t destination, const void *map, int32_t x, int32_t y,
                                               uint32_t barrier)
{
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];"
        ::"r"(destination), "l"(map), "r"(x), "r"(y), "r"(barrier)
        : "memory");
}

// A 3-D box (x innermost, then y, then z) into shared memory, laid out as
// z slices of y rows of x elements.
__device__ __forceinline__ void tensor_copy_3d(uint32_t destination, const void *map, int32_t x, int32_t y, int32_t z,
                                               uint32_t barrier)
{
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
        "[%5];" ::"r"(destination),
        "l"(map), "r"(x), "r"(y), "r"(z), "r"(barrier)
        : "memory");
}

// 16 bytes by this thread's own asynchronous copy (cached in L2 only).
__device__ __forceinline__ void copy_async_16B(uint32_t destination, const void *source)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(destination), "l"(source) : "memory");
}

// One arrival on the barrier once every asynchronous copy this thread has
// issued so far has landed (counted in the barrier's expected arrivals).
__device__ __forceinline__ void copy_async_arrive(uint32_t barrier)
{
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(barrier) : "memory");
}

// ---- warpgroup MMA ordering ----

// Orders this thread's register writes (A fragments, accumulators) before the
// wgmma instructions that follow.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }

__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }

// Waits until at most `pending` committed wgmma groups are still running.
template <int pending>
__device__ __forceinline__ void wgmma_wait()
{
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(pending) : "memory");
}

// Shared-memory matrix descriptor of a K-major operand in the 128-byte
// swizzle the copy engine writes: rows of 64 fp16 (128 bytes), 8-row atoms
// 1024 bytes apart. `address` may step by 32 bytes (16 k) inside a row.
__device__ __forceinline__ uint64_t swizzled_k_major_descriptor(uint32_t address)
{
    constexpr uint64_t kLeadingBytes = 16;  // unused by swizzled K-major layouts; 1 in units of 16 bytes
    constexpr uint64_t kAtomBytes = 1024;
    constexpr uint64_t kSwizzle128B = 1;
    return static_cast<uint64_t>((address >> 4) & 0x3FFF) | ((kLeadingBytes >> 4) << 16) |
           ((kAtomBytes >> 4) << 32) | (kSwizzle128B << 62);
}

// ---- registers and barriers between warps ----

// Lowers (raises) this warpgroup's register budget: executed by all of it.
template <int registers>
__device__ __forceinline__ void release_registers()
{
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(registers));
}

template <int registers>
__device__ __forceinline__ void claim_registers()
{
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(registers));
}

// Named barrier `id` over `threads` threads (whole warps).
template <int id, int threads>
__device__ __forceinline__ void sync_threads()
{
    asm volatile("bar.sync %0, %1;" ::"n"(id), "n"(threads) : "memory");
}

// ---- clusters ----

__device__ __forceinline__ uint32_t cluster_rank()
{
    uint32_t rank;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
    return rank;
}

// Every thread of every block of the cluster; shared-memory writes before it
// are visible to the whole cluster after it.
__device__ __forceinline__ void cluster_sync()
{
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// 16 bytes of block `rank`'s shared memory at the address this block would use.
__device__ __forceinline__ float4 load_cluster_16B(uint32_t address, uint32_t rank)
{
    uint32_t remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(address), "r"(rank));
    float4 v;
    asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "r"(remote)
                 : "memory");
    return v;
}

// 8 bytes of this block's shared memory.
__device__ __forceinline__ uint2 load_shared_8B(uint32_t address)
{
    uint2 v;
    asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(address));
    return v;
}

__device__ __forceinline__ uint32_t load_shared_4B(uint32_t address)
{
    uint32_t v;
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(address));
    return v;
}

}  // namespace o4g::isa
