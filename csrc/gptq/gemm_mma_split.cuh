// The tensor-core GEMM with K split across the blocks of a thread-block
// cluster (Hopper), for wide column tiles: the shape that keeps every SM busy
// when a layer has few columns, and lets one block's warps share activations.
//
// Same fragments as gemm_mma.cuh (lane (g, t) loads word row t of a pack for
// 4 columns; the MMA's k slots are relabelled to the lane's own 8 k), with two
// differences:
// - A block is COL_WARPS warps side by side (128 or 256 columns), each over
//   the block's whole K slice, so no warps meet in shared memory; the 4 warps
//   read the same activations, which L1 serves after the first.
// - Zero point *and scale* are applied to the weights in fp16 before the MMA
//   ((q - z) exact, then one rounding by the scale, as every GPTQ kernel
//   does), so one fp32 accumulator runs over the whole slice instead of a
//   per-group accumulator, a running total and a per-group fold: fewer
//   registers for more token tiles.
// K is split over the `splits` blocks of a cluster. Each leaves its partial
// tile in its shared memory; after a cluster barrier every block adds one
// share of the tile over the cluster's blocks in rank order (distributed
// shared memory) and writes it. No workspace, no atomics, the same bits on
// every call. Without clusters (pre-Hopper) splits is 1 and each warp writes
// its own columns.
#pragma once
#include "gemm_mma.cuh"

#if O4G_HAVE_MMA
#include <cooperative_groups.h>

namespace o4g {

constexpr int kMmaMaxSplits = 8;  // the portable cluster size

// One group's zero points and scales for a lane's 4 columns, as the half2
// operands that turn (1024 + q) into (q - z) * s.
struct ScaledGroup {
    uint32_t zero_low[4];   // (1024 + z) twice: nibbles in the low bits
    uint32_t zero_high[4];  // (1024 + 16 z) twice: nibbles in the high bits (16 q)
    uint32_t scale[4];      // (s, s)
    uint32_t scale16[4];    // (s / 16, s / 16), exact: a power-of-two step
};

__device__ __forceinline__ void decode_scaled_group(const GemmParams &p, const GroupMeta &meta, int64_t column,
                                                    ScaledGroup &group)
{
    const uint32_t nibbles = meta.zeros >> (4 * (column % 8));
    const uint32_t scale_bits[4] = {meta.scales.x & 0xFFFFu, meta.scales.x >> 16, meta.scales.y & 0xFFFFu,
                                    meta.scales.y >> 16};
#pragma unroll
    for (int c = 0; c < 4; ++c) {
        const uint32_t z = ((nibbles >> (4 * c)) & 0xFu) + static_cast<uint32_t>(p.zero_offset);  // <= 16
        group.zero_low[c] = (0x6400u + z) * 0x00010001u;
        group.zero_high[c] = (0x6400u + 16u * z) * 0x00010001u;
        group.scale[c] = scale_bits[c] * 0x00010001u;
        const __half s16 = __hmul(__ushort_as_half(static_cast<unsigned short>(scale_bits[c])), __float2half(0.0625f));
        group.scale16[c] = static_cast<uint32_t>(__half_as_ushort(s16)) * 0x00010001u;
    }
}

__device__ __forceinline__ uint32_t scaled_weights(uint32_t magic_pair, uint32_t zero, uint32_t scale)
{
    const __half2 q = __hsub2(*reinterpret_cast<__half2 *>(&magic_pair), *reinterpret_cast<__half2 *>(&zero));
    const __half2 w = __hmul2(q, *reinterpret_cast<__half2 *>(&scale));
    return *reinterpret_cast<const uint32_t *>(&w);
}

// acc[m16][tile] += w . x over one pack's 32 k, w = (q - z) * s in fp16.
template <int TOKEN_TILES>
__device__ __forceinline__ void multiply_scaled(const uint4 &weights, const uint4 (&x)[TOKEN_TILES],
                                                const ScaledGroup &group, float (&acc)[2][TOKEN_TILES][4])
{
    const uint32_t words[4] = {weights.x, weights.y, weights.z, weights.w};
    uint32_t w[4][4];  // [column][j]: half2 (w_j, w_{j+4})
#pragma unroll
    for (int c = 0; c < 4; ++c) {
        const uint32_t shifted = words[c] >> 8;
        w[c][0] = scaled_weights(isa::and_or(words[c], 0x000F000Fu, 0x64006400u), group.zero_low[c], group.scale[c]);
        w[c][1] = scaled_weights(isa::and_or(words[c], 0x00F000F0u, 0x64006400u), group.zero_high[c], group.scale16[c]);
        w[c][2] = scaled_weights(isa::and_or(shifted, 0x000F000Fu, 0x64006400u), group.zero_low[c], group.scale[c]);
        w[c][3] = scaled_weights(isa::and_or(shifted, 0x00F000F0u, 0x64006400u), group.zero_high[c], group.scale16[c]);
    }
#pragma unroll
    for (int tile = 0; tile < TOKEN_TILES; ++tile) {
        const uint32_t x04 = isa::pair_low_halves(x[tile].x, x[tile].z);
        const uint32_t x15 = isa::pair_high_halves(x[tile].x, x[tile].z);
        const uint32_t x26 = isa::pair_low_halves(x[tile].y, x[tile].w);
        const uint32_t x37 = isa::pair_high_halves(x[tile].y, x[tile].w);
#pragma unroll
        for (int m16 = 0; m16 < 2; ++m16) {
            const int c0 = 2 * m16, c1 = 2 * m16 + 1;
            const uint32_t even[4] = {w[c0][0], w[c1][0], w[c0][2], w[c1][2]};
            isa::mma_16x8x16(acc[m16][tile], even, x04, x26);
            const uint32_t odd[4] = {w[c0][1], w[c1][1], w[c0][3], w[c1][3]};
            isa::mma_16x8x16(acc[m16][tile], odd, x15, x37);
        }
    }
}

// The activations of one pack for every token tile: 8 k of row g each.
template <int TOKEN_TILES, bool GATHER>
__device__ __forceinline__ void load_pack_activations(const GemmParams &p, const __half *const (&x)[TOKEN_TILES],
                                                      const bool (&valid)[TOKEN_TILES], int64_t token0, int64_t k0,
                                                      uint4 (&out)[TOKEN_TILES])
{
#pragma unroll
    for (int tile = 0; tile < TOKEN_TILES; ++tile) {
        if (!valid[tile]) out[tile] = make_uint4(0u, 0u, 0u, 0u);
        else if constexpr (GATHER) out[tile] = load_activations<true>(p, token0 + tile * 8, k0);
        else out[tile] = *reinterpret_cast<const uint4 *>(x[tile] + k0);
    }
}

// Grid: x = the cluster's K slices (rank), y = tiles of TOKEN_TILES * 8 rows
// (neighbours in launch order, so the weights come from L2 for all but the
// first), z = column tiles of COL_WARPS * 32.
template <int TOKEN_TILES, int COL_WARPS, bool GATHER>
__global__ void __launch_bounds__(COL_WARPS * 32) gemm_mma_split_kernel(GemmParams p, int splits)
{
    constexpr int kBatch = kMmaBatch;
    constexpr int kTileColumns = COL_WARPS * kMmaColumns;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int g = lane / 4;
    const int t = lane % 4;
    const int rank = blockIdx.x;
    const int64_t m0 = static_cast<int64_t>(blockIdx.y) * TOKEN_TILES * 8;
    const int64_t tile_column = static_cast<int64_t>(blockIdx.z) * kTileColumns;
    const int64_t warp_column = tile_column + warp * kMmaColumns;
    const int64_t column = warp_column + 4 * g;
    const bool active = warp_column < p.n;  // n is a multiple of 32: whole warps in or out
    const int packs = static_cast<int>(p.k / 32);
    const int packs_per_group = p.group_size / 32;
    const int begin = packs * rank / splits;
    const int end = active ? packs * (rank + 1) / splits : begin;

    const uint32_t *weights = p.qweight + (static_cast<int64_t>(begin) * 4 + t) * p.n + (active ? column : 0);
    const int64_t weight_stride = 4 * p.n;
    const __half *x[TOKEN_TILES];
    bool valid[TOKEN_TILES];
#pragma unroll
    for (int tile = 0; tile < TOKEN_TILES; ++tile) {
        const int64_t token = m0 + tile * 8 + g;
        valid[tile] = token < p.m;
        x[tile] = p.a + (valid[tile] ? token : 0) * p.lda;
    }
    int64_t k0 = static_cast<int64_t>(begin) * 32 + 8 * t;

    float acc[2][TOKEN_TILES][4];
#pragma unroll
    for (int m16 = 0; m16 < 2; ++m16)
#pragma unroll
        for (int tile = 0; tile < TOKEN_TILES; ++tile)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[m16][tile][i] = 0.0f;

    uint4 current[kBatch], next[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u)
        if (begin + u < end) current[u] = isa::load_once_16B(weights + u * weight_stride);
    weights += kBatch * weight_stride;

    ScaledGroup group{};
    int group_index = begin / packs_per_group;
    int group_end = (group_index + 1) * packs_per_group;
    GroupMeta ahead{};
    if (begin < end) {
        decode_scaled_group(p, fetch_group(p, group_index, column), column, group);
        if (group_end < end) ahead = fetch_group(p, group_index + 1, column);
    }
    uint4 xs[TOKEN_TILES];
    if (begin < end) load_pack_activations<TOKEN_TILES, GATHER>(p, x, valid, m0 + g, k0, xs);

    for (int base = begin; base < end; base += kBatch) {
#pragma unroll
        for (int u = 0; u < kBatch; ++u)
            if (base + kBatch + u < end) next[u] = isa::load_once_16B(weights + u * weight_stride);
        weights += kBatch * weight_stride;
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
            const int pack = base + u;
            if (pack >= end) break;
            // This pack's activations are in xs; fetch the next pack's before multiplying.
            uint4 xs_next[TOKEN_TILES];
            k0 += 32;
            if (pack + 1 < end) load_pack_activations<TOKEN_TILES, GATHER>(p, x, valid, m0 + g, k0, xs_next);
            if (pack == group_end) {
                ++group_index;
                group_end += packs_per_group;
                decode_scaled_group(p, ahead, column, group);
                if (group_end < end) ahead = fetch_group(p, group_index + 1, column);
            }
            multiply_scaled<TOKEN_TILES>(current[u], xs, group, acc);
#pragma unroll
            for (int tile = 0; tile < TOKEN_TILES; ++tile) xs[tile] = xs_next[tile];
        }
#pragma unroll
        for (int u = 0; u < kBatch; ++u) current[u] = next[u];
    }

    if (splits == 1) {
        // The warp owns its columns outright: accumulators straight to the output.
        if (!active) return;
#pragma unroll
        for (int tile = 0; tile < TOKEN_TILES; ++tile)
#pragma unroll
            for (int m16 = 0; m16 < 2; ++m16)
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    // Accumulators (half, half + 2): token 2t + half, columns 4g + 2 m16 and the next.
                    const int64_t row = m0 + tile * 8 + 2 * t + half;
                    if (row < p.m) {
                        const __half2 pair = __floats2half2_rn(acc[m16][tile][half], acc[m16][tile][half + 2]);
                        *reinterpret_cast<__half2 *>(p.out + row * p.n + column + 2 * m16) = pair;
                    }
                }
        return;
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // This block's partial tile, [token][column], for the cluster to add up.
    __shared__ float partial[TOKEN_TILES * 8][kTileColumns];
#pragma unroll
    for (int tile = 0; tile < TOKEN_TILES; ++tile)
#pragma unroll
        for (int m16 = 0; m16 < 2; ++m16)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int token = tile * 8 + 2 * t + half;
                const int c = warp * kMmaColumns + 4 * g + 2 * m16;
                *reinterpret_cast<float2 *>(&partial[token][c]) = make_float2(acc[m16][tile][half], acc[m16][tile][half + 2]);
            }
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();
    const float *ranks[kMmaMaxSplits];  // indexed by unrolled loops only: stays in registers
#pragma unroll
    for (int r = 0; r < kMmaMaxSplits; ++r) ranks[r] = cluster.map_shared_rank(&partial[0][0], r < splits ? r : 0);
    constexpr int kElements = TOKEN_TILES * 8 * kTileColumns;
    const int share_begin = kElements * rank / splits;
    const int share_end = kElements * (rank + 1) / splits;
    for (int e = share_begin + static_cast<int>(threadIdx.x); e < share_end; e += COL_WARPS * 32) {
        const int64_t row = m0 + e / kTileColumns;
        const int64_t col = tile_column + e % kTileColumns;
        if (row >= p.m || col >= p.n) continue;
        float sum = 0.0f;
#pragma unroll
        for (int r = 0; r < kMmaMaxSplits; ++r)
            if (r < splits) sum += ranks[r][e];  // rank order: the same bits every call
        p.out[row * p.n + col] = __float2half_rn(sum);
    }
    cluster.sync();  // no block leaves while another still reads its shared memory
#else
    __trap();  // the launcher splits only on devices with clusters
#endif
}

// Requirements as launch_mma's. Defined in instances/mma_b4.cu.
cudaError_t launch_mma_split(const GemmParams &p, int splits, int col_warps, cudaStream_t stream);

#ifdef O4G_MMA_INSTANCES
template <int TOKEN_TILES, int COL_WARPS, bool GATHER>
cudaError_t launch_mma_split_kernel(const GemmParams &p, int splits, cudaStream_t stream)
{
    constexpr int kTileColumns = COL_WARPS * kMmaColumns;
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(static_cast<unsigned>(splits),
                          static_cast<unsigned>((p.m + TOKEN_TILES * 8 - 1) / (TOKEN_TILES * 8)),
                          static_cast<unsigned>((p.n + kTileColumns - 1) / kTileColumns));
    config.blockDim = dim3(COL_WARPS * 32);
    config.stream = stream;
    cudaLaunchAttribute cluster[1];
    if (splits > 1) {
        cluster[0].id = cudaLaunchAttributeClusterDimension;
        cluster[0].val.clusterDim.x = static_cast<unsigned>(splits);
        cluster[0].val.clusterDim.y = 1;
        cluster[0].val.clusterDim.z = 1;
        config.attrs = cluster;
        config.numAttrs = 1;
    }
    return cudaLaunchKernelEx(&config, gemm_mma_split_kernel<TOKEN_TILES, COL_WARPS, GATHER>, p, splits);
}

template <int COL_WARPS, bool GATHER>
cudaError_t launch_mma_split_rows(const GemmParams &p, int splits, cudaStream_t stream)
{
    if (p.m <= 8) return launch_mma_split_kernel<1, COL_WARPS, GATHER>(p, splits, stream);
    if (p.m <= 16) return launch_mma_split_kernel<2, COL_WARPS, GATHER>(p, splits, stream);
    return launch_mma_split_kernel<4, COL_WARPS, GATHER>(p, splits, stream);
}

cudaError_t launch_mma_split(const GemmParams &p, int splits, int col_warps, cudaStream_t stream)
{
    const bool gather = p.perm != nullptr || (p.lda % 8) != 0 || (reinterpret_cast<uintptr_t>(p.a) % 16) != 0;
    if (col_warps == 8) {
        return gather ? launch_mma_split_rows<8, true>(p, splits, stream) : launch_mma_split_rows<8, false>(p, splits, stream);
    }
    return gather ? launch_mma_split_rows<4, true>(p, splits, stream) : launch_mma_split_rows<4, false>(p, splits, stream);
}
#endif

}  // namespace o4g
#endif  // O4G_HAVE_MMA
