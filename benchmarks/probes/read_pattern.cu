// Probe: how fast can an H100 read a [K/8, N] int32 qweight matrix in the
// access patterns a GEMV kernel could use? Loads only (xor-folded so nothing
// is eliminated), no arithmetic, so the numbers are the ceiling of each
// pattern. It tests the hypothesis in benchmarks/NOTES.md that the mma
// kernel's narrow strips (128 contiguous bytes per row) cap its bandwidth.
//
// Pattern <CW, WK, DEPTH> with S splits: a block covers CW * 32 columns
// (CW column-warps side by side, 128 bytes each per row) and one of S slices
// of K; its WK K-warps split that slice further. Lane (g, t) reads 16 bytes:
// word row t of a 4-row pack, columns 4g..4g+3 of its warp's 32, exactly as
// the mma kernel does. DEPTH packs are in flight per lane.
//
// Build and run on the device: nvcc -O3 -std=c++17 -arch=sm_90a read_pattern.cu -o rp && ./rp
#include <cstdio>
#include <cstdint>
#include <vector>
#include <cuda_runtime.h>

#define CHECK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e)); return 1; } } while (0)

__device__ __forceinline__ uint4 load_once(const void *a)
{
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(a));
    return v;
}

template <int CW, int WK, int DEPTH>
__global__ void __launch_bounds__(CW * WK * 32) strip_read(const uint32_t *q, int rows, int n, int splits, uint32_t *sink)
{
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int cw = warp % CW, wk = warp / CW;
    const int packs = rows / 4;
    const int s_begin = packs * blockIdx.y / splits, s_end = packs * (blockIdx.y + 1) / splits;
    const int len = s_end - s_begin;
    const int begin = s_begin + len * wk / WK, end = s_begin + len * (wk + 1) / WK;
    const int64_t column = (int64_t)blockIdx.x * CW * 32 + cw * 32 + 4 * g;
    const uint32_t *p = q + ((int64_t)begin * 4 + t) * n + column;
    const int64_t stride = 4LL * n;
    uint32_t acc = 0;
    int pack = begin;
    for (; pack + DEPTH <= end; pack += DEPTH) {
        uint4 v[DEPTH];
#pragma unroll
        for (int d = 0; d < DEPTH; ++d) v[d] = load_once(p + d * stride);
        p += DEPTH * stride;
#pragma unroll
        for (int d = 0; d < DEPTH; ++d) acc ^= v[d].x ^ v[d].y ^ v[d].z ^ v[d].w;
    }
    for (; pack < end; ++pack, p += stride) {
        uint4 v = load_once(p);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    // End like a kernel: warps meet in shared memory behind a barrier.
    extern __shared__ uint32_t meet[];
    meet[threadIdx.x] = acc;
    __syncthreads();
    if (warp == 0) {
        uint32_t all = 0;
        for (int w = 0; w < CW * WK; ++w) all ^= meet[w * 32 + lane];
        if (all == 0x9e3779b9u) sink[blockIdx.x] = all;  // practically never; keeps the loads
    }
}

__global__ void linear_read(const uint4 *q, int64_t count, uint32_t *sink)
{
    uint32_t acc = 0;
    const int64_t step = (int64_t)gridDim.x * blockDim.x;
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 3 * step < count; i += 4 * step) {
        uint4 a = load_once(q + i), b = load_once(q + i + step), c = load_once(q + i + 2 * step), d = load_once(q + i + 3 * step);
        acc ^= a.x ^ b.y ^ c.z ^ d.w ^ a.w ^ b.x ^ c.y ^ d.z;
    }
    for (; i < count; i += step) { uint4 a = load_once(q + i); acc ^= a.x ^ a.w; }
    if (acc == 0x9e3779b9u) sink[blockIdx.x] = acc;
}

struct Layer { int k, n; };
static const Layer kLlama7b[4] = {{4096, 12288}, {4096, 4096}, {4096, 22016}, {11008, 4096}};
constexpr int kCopies = 6;  // rotated so every launch misses the 50 MB L2

template <typename Launch>
static float time_us(Launch launch, int iters)
{
    cudaEvent_t a, b;
    cudaEventCreate(&a); cudaEventCreate(&b);
    for (int i = 0; i < 12; ++i) launch(i % kCopies);
    cudaEventRecord(a);
    for (int i = 0; i < iters; ++i) launch(i % kCopies);
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    return ms * 1000.0f / iters;
}

// occupancy > 0: shared memory sized so that at most that many blocks fit on an SM.
template <int CW, int WK, int DEPTH>
static void run_pattern(const char *name, uint32_t *const *bufs, uint32_t *sink, int sms, int splits_hint, int occupancy = 0)
{
    const int smem = occupancy > 0 ? (220 * 1024) / occupancy : CW * WK * 32 * 4;
    cudaFuncSetAttribute(strip_read<CW, WK, DEPTH>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    float total = 0, bytes_total = 0;
    printf("%-22s", name);
    for (const Layer &l : kLlama7b) {
        const int rows = l.k / 8, cols = CW * 32;
        const int strips = l.n / cols;
        // splits: a fixed number, or (hint < 0) enough to give every SM a block
        int splits = splits_hint > 0 ? splits_hint : (sms * -splits_hint + strips - 1) / strips;
        if (splits < 1) splits = 1;
        dim3 grid(strips, splits);
        float us = time_us([&](int c) { strip_read<CW, WK, DEPTH><<<grid, CW * WK * 32, smem>>>(bufs[c], rows, l.n, splits, sink); }, 50);
        const float bytes = (float)rows * l.n * 4;
        printf("  %5.1fus %4.0fGB/s (%dx%d)", us, bytes / us / 1e3, strips, splits);
        total += us; bytes_total += bytes;
    }
    printf("  | sum %6.1f us, %4.0f GB/s  occ %d\n", total, bytes_total / total / 1e3, occupancy);
}

int main()
{
    int sms = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
    size_t max_bytes = 0;
    for (const Layer &l : kLlama7b) max_bytes = std::max(max_bytes, (size_t)l.k / 8 * l.n * 4);
    uint32_t *bufs[kCopies], *sink;
    for (auto &b : bufs) { CHECK(cudaMalloc(&b, max_bytes)); CHECK(cudaMemset(b, 0x5a, max_bytes)); }
    CHECK(cudaMalloc(&sink, 1 << 20));

    printf("SMs %d; Llama-2-7B layers (K x N) 4096x12288, 4096x4096, 4096x22016, 11008x4096; floor at 2970 GB/s: 35.1 us\n", sms);
    {
        float total = 0, bytes_total = 0;
        printf("%-22s", "linear (reference)");
        for (const Layer &l : kLlama7b) {
            const int64_t count = (int64_t)l.k / 8 * l.n / 4;
            float us = time_us([&](int c) { linear_read<<<sms * 4, 512>>>(reinterpret_cast<const uint4 *>(bufs[c]), count, sink); }, 50);
            const float bytes = (float)count * 16;
            printf("  %5.1fus %4.0fGB/s", us, bytes / us / 1e3);
            total += us; bytes_total += bytes;
        }
        printf("  | sum %6.1f us, %4.0f GB/s\n", total, bytes_total / total / 1e3);
    }
    // Today's mma kernel: 32 columns, 16 K-warps, 2 packs in flight, no K split, one block per SM.
    run_pattern<1, 16, 2>("c32 w16 d2 s1", bufs, sink, sms, 1, 0);
    run_pattern<1, 16, 2>("c32 w16 d2 s1 (now)", bufs, sink, sms, 1, 1);
    run_pattern<1, 16, 4>("c32 w16 d4 s1", bufs, sink, sms, 1, 1);
    run_pattern<1, 16, 8>("c32 w16 d8 s1", bufs, sink, sms, 1, 1);
    run_pattern<1, 32, 2>("c32 w32 d2 s1", bufs, sink, sms, 1, 1);
    run_pattern<1, 32, 4>("c32 w32 d4 s1", bufs, sink, sms, 1, 1);
    run_pattern<1, 16, 2>("c32 w16 d2 s1", bufs, sink, sms, 1, 2);
    run_pattern<1, 16, 4>("c32 w16 d4 s1", bufs, sink, sms, 1, 2);
    run_pattern<1, 8, 4>("c32 w8 d4 s1", bufs, sink, sms, 1, 2);
    run_pattern<1, 8, 8>("c32 w8 d8 s1", bufs, sink, sms, 1, 2);
    run_pattern<1, 8, 4>("c32 w8 d4 s1", bufs, sink, sms, 1, 4);
    // The cluster-split kernel's shape: 4 column warps, K over blocks, 3-5 blocks per SM.
    run_pattern<4, 1, 2>("c128 w1 d2 s~2/sm", bufs, sink, sms, -2, 5);
    run_pattern<4, 1, 2>("c128 w1 d2 s~4/sm", bufs, sink, sms, -4, 5);
    run_pattern<4, 1, 4>("c128 w1 d4 s~4/sm", bufs, sink, sms, -4, 5);
    run_pattern<4, 1, 8>("c128 w1 d8 s~4/sm", bufs, sink, sms, -4, 3);
    run_pattern<4, 4, 4>("c128 w4 d4 s~2/sm", bufs, sink, sms, -2, 1);
    run_pattern<4, 4, 8>("c128 w4 d8 s~2/sm", bufs, sink, sms, -2, 1);
    run_pattern<8, 2, 8>("c256 w2 d8 s~2/sm", bufs, sink, sms, -2, 1);
    CHECK(cudaDeviceSynchronize());
    return 0;
}
