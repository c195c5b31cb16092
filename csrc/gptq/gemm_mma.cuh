// 4-bit GPTQ GEMM on the tensor cores, for few to some tens of rows (decode and
// small batches), in the exllama layout (gptq_shuffle'd rows, contiguous groups).
//
// The weights are in the tensor-core pack order gptq_shuffle writes
// (common.cuh): word row t of a 32-row pack holds lane t's A-fragment k pairs
// of both k16 tiles of the pack, rows (2t, 2t+1) and (2t+8, 2t+9) of the first
// in nibbles (0, 4) and (2, 6), rows 16 + those of the second in (1, 5) and
// (3, 7). Lane (g, t) of a warp (g = lane / 4, t = lane % 4) loads 16 bytes of
// qweight: word row t for 4 adjacent columns, which become MMA rows g and g+8
// of two m16 tiles; tokens are the n8 axis. The activations of row g are the
// B fragments as stored: four 4-byte loads at k 2t, 2t+8, 2t+16, 2t+24. So a
// warp covers 32 columns x 32 k per load, every byte read once.
//
// Dequantization: w & 0x000F000F | 0x64006400 is the half2 pair
// (1024 + q_0, 1024 + q_4); subtracting (1024 + zero) is exact, so the MMA
// sees the integers (q - zero) and accumulates (q - zero) . x in fp32 (see
// multiply_share for the other nibbles). The scale multiplies that fp32 sum
// once per group.
//
// Block: WARPS warps on the same 32 columns, each a contiguous slice of K;
// the slices' sums meet in shared memory and are added in warp order. No
// atomics, no pre-zeroed output: the same bits on every call, graph-safe.
#pragma once
#include "common.cuh"

#if O4G_HAVE_MMA
namespace o4g {

constexpr int kMmaWarps = 16;  // K-slice warps per block unless the launcher picks fewer
constexpr int kMmaColumns = 32;  // per block (and per warp)
constexpr int kMmaTokenTiles = 2;  // rows per block: 16 at most; more rows take more blocks

// One lane's share of one 32-row pack: its qweight word row for 4 columns,
// and the activations of the same 8 k for each token tile.
template <int TOKEN_TILES>
struct PackShare {
    uint4 weights;
    uint4 x[TOKEN_TILES];
};

// A lane's B fragments of one pack: the activation pairs at x + {0, 1},
// {8, 9}, {16, 17}, {24, 25} (x at the pack's k 2t).
__device__ __forceinline__ uint4 activation_pairs(const __half *x)
{
    return make_uint4(*reinterpret_cast<const uint32_t *>(x), *reinterpret_cast<const uint32_t *>(x + 8),
                      *reinterpret_cast<const uint32_t *>(x + 16), *reinterpret_cast<const uint32_t *>(x + 24));
}

// The same pairs of row `token` at weight rows k0 + ..., through the act-order
// permutation when there is one (an out-of-range entry reads as NaN).
template <bool GATHER>
__device__ __forceinline__ uint4 load_activations(const GemmParams &p, int64_t token, int64_t k0)
{
    if constexpr (!GATHER) {
        return activation_pairs(p.a + token * p.lda + k0);
    } else {
        __half h[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            float poison = 0.0f;
            const int64_t column = activation_column(p, k0 + 8 * (j / 2) + j % 2, poison);
            h[j] = poison != 0.0f ? __float2half(poison) : p.a[token * p.lda + column];
        }
        uint4 v;
        v.x = isa::pair_low_halves(*reinterpret_cast<uint16_t *>(&h[0]), *reinterpret_cast<uint16_t *>(&h[1]));
        v.y = isa::pair_low_halves(*reinterpret_cast<uint16_t *>(&h[2]), *reinterpret_cast<uint16_t *>(&h[3]));
        v.z = isa::pair_low_halves(*reinterpret_cast<uint16_t *>(&h[4]), *reinterpret_cast<uint16_t *>(&h[5]));
        v.w = isa::pair_low_halves(*reinterpret_cast<uint16_t *>(&h[6]), *reinterpret_cast<uint16_t *>(&h[7]));
        return v;
    }
}

__device__ __forceinline__ uint32_t subtract_half2(uint32_t a, uint32_t b)
{
    const __half2 d = __hsub2(*reinterpret_cast<__half2 *>(&a), *reinterpret_cast<__half2 *>(&b));
    return *reinterpret_cast<const uint32_t *>(&d);
}

// Unpacked zero points of the lane's 4 columns, as half2 pairs to subtract:
// (1024 + z) for nibbles in the low bits, (1024 + 16 z) for nibbles in the high bits.
struct ZeroPairs {
    uint32_t low[4];
    uint32_t high[4];
};

// acc[m16][tile] += (q - z) . x over the pack's first k16 tile and
// acc16[m16][tile] += 16 (q - z) . x over its second. The first tile's
// nibbles (0, 4) and (2, 6) are masked in place (0x000F000F), the second's
// (1, 5) and (3, 7) without a shift (0x00F000F0, i.e. 16 q): one shift per
// word instead of three. The 16x products go to their own accumulators,
// which apply_scales divides by 16 (exact).
template <int TOKEN_TILES>
__device__ __forceinline__ void multiply_share(const PackShare<TOKEN_TILES> &share, const ZeroPairs &zero,
                                               float (&acc)[2][TOKEN_TILES][4], float (&acc16)[2][TOKEN_TILES][4])
{
    const uint32_t words[4] = {share.weights.x, share.weights.y, share.weights.z, share.weights.w};
    uint32_t q[4][4];  // [column][j]: half2 (q_j - z, q_{j+4} - z), times 16 for odd j
#pragma unroll
    for (int c = 0; c < 4; ++c) {
        const uint32_t shifted = words[c] >> 8;
        q[c][0] = subtract_half2(isa::and_or(words[c], 0x000F000Fu, 0x64006400u), zero.low[c]);
        q[c][1] = subtract_half2(isa::and_or(words[c], 0x00F000F0u, 0x64006400u), zero.high[c]);
        q[c][2] = subtract_half2(isa::and_or(shifted, 0x000F000Fu, 0x64006400u), zero.low[c]);
        q[c][3] = subtract_half2(isa::and_or(shifted, 0x00F000F0u, 0x64006400u), zero.high[c]);
    }

#pragma unroll
    for (int tile = 0; tile < TOKEN_TILES; ++tile) {
        // Pairs (x_2t, x_2t+1), (x_2t+8, ..), (x_2t+16, ..), (x_2t+24, ..) of token g: the B fragments.
        const uint4 x = share.x[tile];
#pragma unroll
        for (int m16 = 0; m16 < 2; ++m16) {
            // Rows g and g + 8 of this m16 tile are columns 2*m16 and 2*m16 + 1 of the lane's four.
            const int c0 = 2 * m16, c1 = 2 * m16 + 1;
            const uint32_t first[4] = {q[c0][0], q[c1][0], q[c0][2], q[c1][2]};
            isa::mma_16x8x16(acc[m16][tile], first, x.x, x.y);
            const uint32_t second[4] = {q[c0][1], q[c1][1], q[c0][3], q[c1][3]};
            isa::mma_16x8x16(acc16[m16][tile], second, x.z, x.w);
        }
    }
}

// One group's quantization data for a lane's 4 columns, as loaded: the loads
// are issued a group ahead and only waited for when the group starts.
struct GroupMeta {
    uint2 scales;    // 4 fp16 scales
    uint32_t zeros;  // the qzeros word holding the 4 zero points (8 columns per word)
};

__device__ __forceinline__ GroupMeta fetch_group(const GemmParams &p, int64_t group, int64_t column)
{
    GroupMeta meta;
    meta.scales = *reinterpret_cast<const uint2 *>(p.scales + group * p.n + column);
    meta.zeros = p.qzeros[group * p.zero_words + column / 8];
    return meta;
}

// The zero points of the lane's 4 columns as half2 pairs to subtract.
__device__ __forceinline__ void decode_zero_pairs(const GemmParams &p, const GroupMeta &meta, int64_t column,
                                                  ZeroPairs &zero)
{
    // column is a multiple of 4, so its 4 zeros are one half of the word.
    const uint32_t nibbles = meta.zeros >> (4 * (column % 8));
#pragma unroll
    for (int c = 0; c < 4; ++c) {
        const uint32_t z = ((nibbles >> (4 * c)) & 0xFu) + static_cast<uint32_t>(p.zero_offset);  // <= 16
        zero.low[c] = (0x6400u + z) * 0x00010001u;
        zero.high[c] = (0x6400u + 16u * z) * 0x00010001u;
    }
}

// Scales as fp32, zero points as the half2 pairs multiply_share subtracts.
__device__ __forceinline__ void decode_group(const GemmParams &p, const GroupMeta &meta, int64_t column,
                                             float (&scale)[4], ZeroPairs &zero)
{
    const __half2 s01 = *reinterpret_cast<const __half2 *>(&meta.scales.x);
    const __half2 s23 = *reinterpret_cast<const __half2 *>(&meta.scales.y);
    scale[0] = __low2float(s01);
    scale[1] = __high2float(s01);
    scale[2] = __low2float(s23);
    scale[3] = __high2float(s23);
    decode_zero_pairs(p, meta, column, zero);
}

// total += (acc + acc16 / 16) * scale of the accumulator's row; both reset.
template <int TOKEN_TILES>
__device__ __forceinline__ void apply_scales(float (&acc)[2][TOKEN_TILES][4], float (&acc16)[2][TOKEN_TILES][4],
                                             const float (&scale)[4], float (&total)[2][TOKEN_TILES][4])
{
#pragma unroll
    for (int m16 = 0; m16 < 2; ++m16)
#pragma unroll
        for (int tile = 0; tile < TOKEN_TILES; ++tile)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                // Accumulator i: row g (i < 2) or g + 8, i.e. column 2*m16 or 2*m16 + 1.
                const float sum = fmaf(acc16[m16][tile][i], 0.0625f, acc[m16][tile][i]);
                total[m16][tile][i] = fmaf(sum, scale[2 * m16 + i / 2], total[m16][tile][i]);
                acc[m16][tile][i] = 0.0f;
                acc16[m16][tile][i] = 0.0f;
            }
}

// Packs per lane per batch. Batches are double-buffered in registers, so up
// to two are in flight while one is multiplied. Measured on the H100 at M=1
// (Llama-2-7B layers summed): 2 packs 83 us, 4 packs 92 us, 8 packs 139 us
// (spills); fewer registers beat deeper batches here (benchmarks/NOTES.md).
constexpr int kMmaBatch = 2;

// Where a lane's next pack share comes from. Pointers advance by a fixed
// stride per pack, so the loop does no 64-bit index arithmetic.
template <int TOKEN_TILES, bool GATHER>
struct ShareStream {
    const uint32_t *weights;    // qweight row 4 * pack + t, column 4g
    int64_t weight_stride;      // 4 rows of qweight
    const __half *x[TOKEN_TILES];  // activation row of token g of each tile, at k = 32 * pack + 2t (contiguous case)
    int64_t k0;                 // 32 * pack + 2t (gather case)
    bool valid[TOKEN_TILES];    // the tile's token g exists

    __device__ __forceinline__ void load(const GemmParams &p, PackShare<TOKEN_TILES> &share, int64_t token0)
    {
        share.weights = isa::load_once_16B(weights);
        weights += weight_stride;
#pragma unroll
        for (int tile = 0; tile < TOKEN_TILES; ++tile) {
            if constexpr (GATHER) {
                share.x[tile] = valid[tile] ? load_activations<true>(p, token0 + tile * 8, k0) : make_uint4(0u, 0u, 0u, 0u);
            } else {
                share.x[tile] = valid[tile] ? activation_pairs(x[tile]) : make_uint4(0u, 0u, 0u, 0u);
                x[tile] += 32;
            }
        }
        k0 += 32;
    }
};

// Grid: x = tiles of TOKEN_TILES * 8 rows (neighbours in launch order, so all
// but the first find the weights in L2), y = column tiles of COL_WARPS * 32.
// The block's warps are COL_WARPS side by side (neighbouring warps read the
// same activations at the same time, so L1 serves all but the first) times
// WARPS / COL_WARPS slices of K.
template <int TOKEN_TILES, bool GATHER, int WARPS = kMmaWarps, int COL_WARPS = 1>
__global__ void __launch_bounds__(WARPS * 32) gemm_mma_kernel(GemmParams p)
{
    static_assert(WARPS % COL_WARPS == 0, "whole K slices per column warp");
    constexpr int kBatch = kMmaBatch;
    constexpr int kSlices = WARPS / COL_WARPS;
    constexpr int kTileColumns = COL_WARPS * kMmaColumns;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int g = lane / 4;
    const int t = lane % 4;
    const int slice = warp / COL_WARPS;
    const int64_t tile_column = static_cast<int64_t>(blockIdx.y) * kTileColumns;
    const int64_t strip = tile_column + (warp % COL_WARPS) * kMmaColumns;
    const bool active = strip < p.n;  // n is a multiple of 32: whole warps in or out
    const int64_t column = (active ? strip : 0) + 4 * g;
    const int64_t m0 = static_cast<int64_t>(blockIdx.x) * TOKEN_TILES * 8;
    const int packs = static_cast<int>(p.k / 32);
    const int packs_per_group = p.group_size / 32;
    const int begin = packs * slice / kSlices;
    const int end = active ? packs * (slice + 1) / kSlices : begin;

    ShareStream<TOKEN_TILES, GATHER> stream;
    stream.weights = p.qweight + (static_cast<int64_t>(begin) * 4 + t) * p.n + column;
    stream.weight_stride = 4 * p.n;
    stream.k0 = static_cast<int64_t>(begin) * 32 + 2 * t;
#pragma unroll
    for (int tile = 0; tile < TOKEN_TILES; ++tile) {
        const int64_t token = m0 + tile * 8 + g;
        stream.valid[tile] = token < p.m;
        stream.x[tile] = p.a + (stream.valid[tile] ? token : 0) * p.lda + stream.k0;
    }

    PackShare<TOKEN_TILES> current[kBatch], next[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u)
        if (begin + u < end) stream.load(p, current[u], m0 + g);

    float acc[2][TOKEN_TILES][4];
    float acc16[2][TOKEN_TILES][4];
    float total[2][TOKEN_TILES][4];
#pragma unroll
    for (int m16 = 0; m16 < 2; ++m16)
#pragma unroll
        for (int tile = 0; tile < TOKEN_TILES; ++tile)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[m16][tile][i] = acc16[m16][tile][i] = total[m16][tile][i] = 0.0f;
    float scale[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    ZeroPairs zero{};
    // Group bookkeeping by counting, not dividing: the slice's first group is
    // needed at once, the next one is fetched when a group starts.
    int group = begin / packs_per_group;
    int group_end = (group + 1) * packs_per_group;
    GroupMeta ahead{};
    if (begin < end) {
        decode_group(p, fetch_group(p, group, column), column, scale, zero);
        if (group_end < end) ahead = fetch_group(p, group + 1, column);
    }

    for (int base = begin; base < end; base += kBatch) {
#pragma unroll
        for (int u = 0; u < kBatch; ++u)
            if (base + kBatch + u < end) stream.load(p, next[u], m0 + g);
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
            const int pack = base + u;
            if (pack >= end) break;
            if (pack == group_end) {
                apply_scales<TOKEN_TILES>(acc, acc16, scale, total);
                ++group;
                group_end += packs_per_group;
                decode_group(p, ahead, column, scale, zero);
                if (group_end < end) ahead = fetch_group(p, group + 1, column);
            }
            multiply_share<TOKEN_TILES>(current[u], zero, acc, acc16);
        }
#pragma unroll
        for (int u = 0; u < kBatch; ++u) current[u] = next[u];
    }
    apply_scales<TOKEN_TILES>(acc, acc16, scale, total);

    // Warps meet in shared memory, one token tile at a time; the K slices of
    // each column added in slice order.
    __shared__ float partial[WARPS][8][kMmaColumns + 1];
#pragma unroll
    for (int tile = 0; tile < TOKEN_TILES; ++tile) {
#pragma unroll
        for (int m16 = 0; m16 < 2; ++m16) {
            // Accumulators (0, 1): tokens 2t, 2t+1 of row g; (2, 3): the same of row g + 8.
            partial[warp][2 * t][4 * g + 2 * m16] = total[m16][tile][0];
            partial[warp][2 * t + 1][4 * g + 2 * m16] = total[m16][tile][1];
            partial[warp][2 * t][4 * g + 2 * m16 + 1] = total[m16][tile][2];
            partial[warp][2 * t + 1][4 * g + 2 * m16 + 1] = total[m16][tile][3];
        }
        __syncthreads();
        for (int o = threadIdx.x; o < 8 * kTileColumns; o += WARPS * 32) {
            const int token = o / kTileColumns;
            const int c = o % kTileColumns;
            const int64_t row = m0 + tile * 8 + token;
            if (row < p.m && tile_column + c < p.n) {
                float sum = 0.0f;
#pragma unroll
                for (int s = 0; s < kSlices; ++s) sum += partial[s * COL_WARPS + c / kMmaColumns][token][c % kMmaColumns];
                p.out[row * p.n + tile_column + c] = __float2half_rn(sum);
            }
        }
        __syncthreads();
    }
}

template <int TOKEN_TILES, int WARPS, int COL_WARPS = 1>
cudaError_t launch_mma_tiles(const GemmParams &p, bool gather, cudaStream_t stream)
{
    constexpr int kTileColumns = COL_WARPS * kMmaColumns;
    const dim3 grid(static_cast<unsigned>((p.m + TOKEN_TILES * 8 - 1) / (TOKEN_TILES * 8)),
                    static_cast<unsigned>((p.n + kTileColumns - 1) / kTileColumns));
    if (gather) gemm_mma_kernel<TOKEN_TILES, true, WARPS, COL_WARPS><<<grid, WARPS * 32, 0, stream>>>(p);
    else gemm_mma_kernel<TOKEN_TILES, false, WARPS, COL_WARPS><<<grid, WARPS * 32, 0, stream>>>(p);
    return cudaGetLastError();
}

// Requirements, checked by the Rust dispatch: 4-bit, no g_idx, group size a
// multiple of 32, n a multiple of 32, qweight 16-byte aligned.
// Activations go through the gather path when permuted or not 16-byte aligned.
// `shape` indexes the block shapes of src/dispatch.rs (MMA_SHAPES), `splits`
// the tiled shapes' K split; an unknown shape is cudaErrorInvalidValue.
// Defined in instances/mma_b4.cu (its own translation unit, compiled in parallel).
cudaError_t launch_mma(const GemmParams &p, int shape, int splits, cudaStream_t stream);

}  // namespace o4g
#endif  // O4G_HAVE_MMA
