// The tensor-core GEMM for batches (tens to a few hundred rows): a tiled
// kernel that reads each weight once per 64 rows and each activation once per
// 128 columns.
//
// gemm_mma.cuh's K-slice kernel re-dequantizes the weights for every 16-row
// tile and re-reads the activations for every 32-64 columns, so from ~32 rows
// on it runs at the speed of L2 (benchmarks/NOTES.md). Here a block owns a
// 128-column x 64-row output tile:
// - Both operands of a stage (128 k where K allows, else 64), and the scales
//   and zero points of its groups, arrive in shared memory by cp.async, three
//   (four) stages in flight, in the layout gptq_shuffle wrote.
// - Warp (cw, kw) owns columns cw*32..+31 and packs kw*P..kw*P+P-1 of every
//   stage (P = 2 or 1). It dequantizes its 16-byte share of each pack once, as
//   gemm_mma.cuh does (lane (g, t): word row t, 4 columns, already the lane's
//   A-fragment k pairs in the tensor-core pack order), with zero point and
//   scale applied in fp16 ((q - z) exact, one rounding by the scale, as every
//   GPTQ kernel does), and multiplies it with all 8 token tiles of the stage:
//   one fp32 accumulator set for all K.
// - The two K-warps meet in shared memory, added in order; when the layer has
//   too few column tiles to fill the GPU, K is also split over the blocks of a
//   thread-block cluster (Hopper) and the blocks' tiles are added in rank order
//   through distributed shared memory. No atomics, no workspace, the same bits
//   on every call.
#pragma once
#include "gemm_mma.cuh"

#if O4G_HAVE_MMA
#include <cooperative_groups.h>

namespace o4g {

// The tiled kernel's shape: STAGES stages in flight, each of K_WARPS x PACKS
// packs (PACKS consecutive ones per K-warp).
template <int STAGES, int K_WARPS, int PACKS>
struct Tiled {
    static constexpr int kColWarps = 4;
    static constexpr int kKWarps = K_WARPS;
    static constexpr int kPacks = PACKS;  // per K-warp and stage
    static constexpr int kStagePacks = kKWarps * kPacks;
    static constexpr int kThreads = kColWarps * kKWarps * 32;
    static constexpr int kMinBlocks = kThreads <= 256 ? 2 : 1;  // per SM, for the register budget
    static constexpr int kTokenTiles = 8;
    static constexpr int kRows = kTokenTiles * 8;             // 64 rows per block
    static constexpr int kColumns = kColWarps * kMmaColumns;  // 128 columns per block
    static constexpr int kStages = STAGES;
    static constexpr int kStageK = 32 * kStagePacks;
    static constexpr int kMaxSplits = 8;                      // the portable cluster size
    // Shared-memory rows are padded against bank conflicts: for the 16-byte
    // weight reads word row t of lane (g, t) lands 32 t bytes over (544 = 4 *
    // 128 + 32), so each 8-lane phase hits 8 distinct 16-byte bank groups; for
    // the 4-byte activation reads row g + 1 lands 16 bytes over row g, so
    // lane (g, t) reads bank 4g + t.
    static constexpr int kWeightRowBytes = kColumns * 4 + 32;
    static constexpr int kWeightBytes = 4 * kStagePacks * kWeightRowBytes;
    static constexpr int kActRowBytes = kStageK * 2 + 16;
    static constexpr int kActBytes = kRows * kActRowBytes;
    // Per pack of the stage: the 128 columns' scales (256 bytes) and zero words (64 bytes) of its group.
    static constexpr int kMetaPackBytes = kColumns * 2 + kColumns / 2;
    static constexpr int kMetaBytes = kStagePacks * kMetaPackBytes;
    static constexpr int kMetaCopies = kMetaBytes / 16;  // one per thread for the first threads
    static constexpr int kStageBytes = kWeightBytes + kActBytes + kMetaBytes;
    static constexpr int kPartialBytes = kKWarps * kRows * kColumns * 4;  // the epilogue reuses the stages
    static constexpr int kSharedBytes = kStages * kStageBytes > kPartialBytes ? kStages * kStageBytes : kPartialBytes;
    static constexpr int kWeightCopies = 4 * kStagePacks * kColumns * 4 / (kThreads * 16);  // per thread and stage
    static constexpr int kActCopies = kRows * kStageK * 2 / (kThreads * 16);
    static_assert(kWeightCopies * kThreads * 16 == 4 * kStagePacks * kColumns * 4, "whole 16-byte weight copies per thread");
    static_assert(kActCopies * kThreads * 16 == kRows * kStageK * 2, "whole 16-byte activation copies per thread");
    static_assert(kMetaCopies <= kThreads, "at most one group-data copy per thread per stage");
};

// One group's zero points and scales for a lane's 4 columns, as the half2
// operands that turn (1024 + q) into (q - z) * s.
struct ScaledGroup {
    ZeroPairs zero;        // as gemm_mma.cuh subtracts them
    uint32_t scale[4];    // (s, s)
    uint32_t scale16[4];  // (s / 16, s / 16), exact: a power-of-two step
};

__device__ __forceinline__ void decode_scaled_group(const GemmParams &p, const GroupMeta &meta, int64_t column,
                                                    ScaledGroup &group)
{
    decode_zero_pairs(p, meta, column, group.zero);
    const uint32_t scale_bits[4] = {meta.scales.x & 0xFFFFu, meta.scales.x >> 16, meta.scales.y & 0xFFFFu,
                                    meta.scales.y >> 16};
#pragma unroll
    for (int c = 0; c < 4; ++c) {
        group.scale[c] = scale_bits[c] * 0x00010001u;
        const __half s16 = __hmul(__ushort_as_half(static_cast<unsigned short>(scale_bits[c])), __float2half(0.0625f));
        group.scale16[c] = static_cast<uint32_t>(__half_as_ushort(s16)) * 0x00010001u;
    }
}

__device__ __forceinline__ uint32_t scaled_weights(uint32_t magic_pair, uint32_t zero, uint32_t scale)
{
    const uint32_t q = subtract_half2(magic_pair, zero);
    const __half2 w = __hmul2(*reinterpret_cast<const __half2 *>(&q), *reinterpret_cast<__half2 *>(&scale));
    return *reinterpret_cast<const uint32_t *>(&w);
}

// Grid: x = the cluster's K slices (rank), y = 64-row tiles, z = 128-column tiles.
template <typename S>
__global__ void __launch_bounds__(S::kThreads, S::kMinBlocks) gemm_mma_tiled_kernel(GemmParams p, int splits)
{
    extern __shared__ __align__(16) unsigned char shared[];
    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int lane = tid % 32;
    const int g = lane / 4;
    const int t = lane % 4;
    const int cw = warp % S::kColWarps;
    const int kw = warp / S::kColWarps;
    const int rank = blockIdx.x;
    const int64_t m0 = static_cast<int64_t>(blockIdx.y) * S::kRows;
    const int64_t tile_column = static_cast<int64_t>(blockIdx.z) * S::kColumns;
    const int64_t warp_column = tile_column + cw * kMmaColumns;
    const bool active = warp_column < p.n;  // n is a multiple of 32: whole warps in or out
    const int64_t column = (active ? warp_column : 0) + 4 * g;
    const int stages = static_cast<int>(p.k / S::kStageK);
    const int stage_begin = static_cast<int>(static_cast<int64_t>(stages) * rank / splits);
    const int stage_end = static_cast<int>(static_cast<int64_t>(stages) * (rank + 1) / splits);

    // Copy duties: word rows tid / 32 + 8 i of the stage for 4 columns, 16-byte
    // pieces of activation rows and, for the first threads, one piece of group
    // data. Outside the matrix: zeros. Stages are issued in order, so every
    // source pointer, the group and the ring slot advance by additions: the
    // loop carries no 64-bit products and no division by the group size.
    constexpr int kWeightRowsPerPass = S::kThreads / 32;
    const int64_t weight_column = tile_column + 4 * (tid % 32);
    const bool weight_inside = weight_column < p.n;
    const int64_t weight_stride = static_cast<int64_t>(4 * S::kStagePacks) * p.n;  // words per stage
    const uint32_t *weight_source = p.qweight + static_cast<int64_t>(tid / 32) * p.n + (weight_inside ? weight_column : 0) +
                                    stage_begin * weight_stride;
    const int64_t weight_pass_stride = static_cast<int64_t>(kWeightRowsPerPass) * p.n;
    const int weight_offset = (tid / 32) * S::kWeightRowBytes + 16 * (tid % 32);
    // Activation copy j is row act_row + j * kActRowsPerPass: one running
    // source pointer for all of them keeps the register count down.
    constexpr int kPiecesPerRow = S::kStageK / 8;
    constexpr int kActRowsPerPass = S::kThreads / kPiecesPerRow;
    const int act_row = tid / kPiecesPerRow;
    const int64_t act_pass_stride = static_cast<int64_t>(kActRowsPerPass) * p.lda;
    const __half *act_source = p.a + (m0 + act_row) * p.lda + 8 * (tid % kPiecesPerRow) +
                               static_cast<int64_t>(stage_begin) * S::kStageK;  // may point past M: not read there
    const int act_offset = S::kWeightBytes + act_row * S::kActRowBytes + 16 * (tid % kPiecesPerRow);
    // Group data: thread tid < S::kMetaCopies copies piece tid % 20 of pack tid / 20's
    // group: 16 pieces of scales (8 columns each), then 4 of zero words (32 columns each).
    constexpr int kPiecesPerPack = S::kMetaPackBytes / 16;
    const int packs_per_group = p.group_size / 32;
    const int meta_pack = tid / kPiecesPerPack;
    const int meta_piece = tid % kPiecesPerPack;
    const bool meta_scales = meta_piece < S::kColumns / 8;
    const int64_t meta_column = tile_column + (meta_scales ? 8 * meta_piece : 32 * (meta_piece - S::kColumns / 8));
    const bool meta_inside = meta_column < p.n;
    const int meta_offset = S::kWeightBytes + S::kActBytes + tid * 16;
    const int64_t meta_group_bytes = meta_scales ? p.n * 2 : static_cast<int64_t>(p.zero_words) * 4;
    const int meta_first_pack = stage_begin * S::kStagePacks + meta_pack;
    int meta_pack_in_group = meta_first_pack % packs_per_group;
    const unsigned char *meta_source =
        (meta_scales ? reinterpret_cast<const unsigned char *>(p.scales + (meta_inside ? meta_column : 0))
                     : reinterpret_cast<const unsigned char *>(p.qzeros + (meta_inside ? meta_column : 0) / 8)) +
        (meta_first_pack / packs_per_group) * meta_group_bytes;
    unsigned char *issue_base = shared;
    auto issue_next = [&]() {
#pragma unroll
        for (int i = 0; i < S::kWeightCopies; ++i)
            isa::copy_async_16B(issue_base + weight_offset + i * kWeightRowsPerPass * S::kWeightRowBytes,
                                weight_source + i * weight_pass_stride, weight_inside ? 16u : 0u);
        weight_source += weight_stride;
#pragma unroll
        for (int j = 0; j < S::kActCopies; ++j) {
            const bool inside = m0 + act_row + j * kActRowsPerPass < p.m;
            isa::copy_async_16B(issue_base + act_offset + j * kActRowsPerPass * S::kActRowBytes,
                                inside ? act_source + j * act_pass_stride : p.a, inside ? 16u : 0u);
        }
        act_source += S::kStageK;
        if (tid < S::kMetaCopies) {
            isa::copy_async_16B(issue_base + meta_offset, meta_source, meta_inside ? 16u : 0u);
            for (meta_pack_in_group += S::kStagePacks; meta_pack_in_group >= packs_per_group; meta_pack_in_group -= packs_per_group)
                meta_source += meta_group_bytes;
        }
        issue_base += S::kStageBytes;
        if (issue_base == shared + S::kStages * S::kStageBytes) issue_base = shared;
    };

#pragma unroll
    for (int i = 0; i < S::kStages - 1; ++i) {
        if (stage_begin + i < stage_end) issue_next();
        isa::copy_async_commit();  // empty groups keep the count uniform
    }

    float acc[2][S::kTokenTiles][4];
#pragma unroll
    for (int m16 = 0; m16 < 2; ++m16)
#pragma unroll
        for (int tile = 0; tile < S::kTokenTiles; ++tile)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[m16][tile][i] = 0.0f;
    ScaledGroup group{};
    // First pack of the group after the decoded one; starting at the first
    // pack's own group start forces the first decode.
    int group_end = (stage_begin * S::kStagePacks + kw * S::kPacks) / packs_per_group * packs_per_group;
    const unsigned char *base = shared;  // the slot of the stage being multiplied

    for (int stage = stage_begin; stage < stage_end; ++stage) {
        isa::copy_async_wait<S::kStages - 2>();
        __syncthreads();  // this stage landed for everyone; the slot refilled below is free
        if (stage + S::kStages - 1 < stage_end) issue_next();
        isa::copy_async_commit();
        const unsigned char *const slot = base;
        base += S::kStageBytes;
        if (base == shared + S::kStages * S::kStageBytes) base = shared;
        if (!active) continue;

#pragma unroll
        for (int i = 0; i < S::kPacks; ++i) {
            const int stage_pack = kw * S::kPacks + i;  // within the stage
            const int pack = stage * S::kStagePacks + stage_pack;
            if (pack >= group_end) {
                const unsigned char *meta = slot + S::kWeightBytes + S::kActBytes + stage_pack * S::kMetaPackBytes;
                GroupMeta loaded;
                loaded.scales = *reinterpret_cast<const uint2 *>(meta + 2 * (cw * kMmaColumns + 4 * g));
                loaded.zeros = *reinterpret_cast<const uint32_t *>(meta + S::kColumns * 2 + 4 * ((cw * kMmaColumns + 4 * g) / 8));
                decode_scaled_group(p, loaded, column, group);
                do group_end += packs_per_group;
                while (group_end <= pack);
            }
            const uint4 weights =
                *reinterpret_cast<const uint4 *>(slot + (4 * stage_pack + t) * S::kWeightRowBytes + cw * 128 + 16 * g);
            const uint32_t words[4] = {weights.x, weights.y, weights.z, weights.w};
            // [column][j]: the lane's A-fragment pairs (q - z) * s: j = 0, 1 rows
            // (2t, 2t+1) and (2t+8, 2t+9) of the pack's first k16 tile (nibbles (0, 4),
            // (2, 6)), j = 2, 3 the same rows of its second (nibbles (1, 5), (3, 7), as 16 q).
            uint32_t w[4][4];
    #pragma unroll
            for (int c = 0; c < 4; ++c) {
                const uint32_t shifted = words[c] >> 8;
                w[c][0] = scaled_weights(isa::and_or(words[c], 0x000F000Fu, 0x64006400u), group.zero.low[c], group.scale[c]);
                w[c][1] = scaled_weights(isa::and_or(shifted, 0x000F000Fu, 0x64006400u), group.zero.low[c], group.scale[c]);
                w[c][2] = scaled_weights(isa::and_or(words[c], 0x00F000F0u, 0x64006400u), group.zero.high[c], group.scale16[c]);
                w[c][3] = scaled_weights(isa::and_or(shifted, 0x00F000F0u, 0x64006400u), group.zero.high[c], group.scale16[c]);
            }
            // Token g's B fragments of each tile: pairs at the pack's k 2t, 2t+8, 2t+16, 2t+24.
            const unsigned char *acts = slot + S::kWeightBytes + g * S::kActRowBytes + stage_pack * 64 + 4 * t;
    #pragma unroll
            for (int tile = 0; tile < S::kTokenTiles; ++tile) {
                const unsigned char *row = acts + tile * 8 * S::kActRowBytes;
                const uint32_t x0 = *reinterpret_cast<const uint32_t *>(row);
                const uint32_t x8 = *reinterpret_cast<const uint32_t *>(row + 16);
                const uint32_t x16 = *reinterpret_cast<const uint32_t *>(row + 32);
                const uint32_t x24 = *reinterpret_cast<const uint32_t *>(row + 48);
    #pragma unroll
                for (int m16 = 0; m16 < 2; ++m16) {
                    const int c0 = 2 * m16, c1 = 2 * m16 + 1;  // rows g and g + 8 of this m16 tile
                    const uint32_t first[4] = {w[c0][0], w[c1][0], w[c0][1], w[c1][1]};
                    isa::mma_16x8x16(acc[m16][tile], first, x0, x8);
                    const uint32_t second[4] = {w[c0][2], w[c1][2], w[c0][3], w[c1][3]};
                    isa::mma_16x8x16(acc[m16][tile], second, x16, x24);
                }
            }
        }
    }
    isa::copy_async_wait<0>();
    __syncthreads();  // the stages are free: the epilogue reuses them

    // [K-warp][row][column] partial tiles; accumulators (half, half + 2) are
    // row 2t + half of the token tile, columns 4g + 2 m16 and the next.
    float *partial = reinterpret_cast<float *>(shared);
#pragma unroll
    for (int tile = 0; tile < S::kTokenTiles; ++tile)
#pragma unroll
        for (int m16 = 0; m16 < 2; ++m16)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int row = tile * 8 + 2 * t + half;
                const int c = cw * kMmaColumns + 4 * g + 2 * m16;
                *reinterpret_cast<float2 *>(&partial[(kw * S::kRows + row) * S::kColumns + c]) =
                    make_float2(acc[m16][tile][half], acc[m16][tile][half + 2]);
            }
    __syncthreads();
    constexpr int kElements = S::kRows * S::kColumns;
    for (int e = tid; e < kElements; e += S::kThreads) {
        float sum = partial[e];
#pragma unroll
        for (int s = 1; s < S::kKWarps; ++s) sum += partial[s * kElements + e];  // K-warp order
        if (splits > 1) {
            partial[e] = sum;  // the block's tile, for the cluster
            continue;
        }
        const int64_t row = m0 + e / S::kColumns;
        const int64_t col = tile_column + e % S::kColumns;
        if (row < p.m && col < p.n) p.out[row * p.n + col] = __float2half_rn(sum);
    }
    if (splits == 1) return;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();
    const float *ranks[S::kMaxSplits];  // indexed by unrolled loops only: stays in registers
#pragma unroll
    for (int r = 0; r < S::kMaxSplits; ++r) ranks[r] = cluster.map_shared_rank(partial, r < splits ? r : 0);
    const int share_begin = kElements * rank / splits;
    const int share_end = kElements * (rank + 1) / splits;
    for (int e = share_begin + tid; e < share_end; e += S::kThreads) {
        const int64_t row = m0 + e / S::kColumns;
        const int64_t col = tile_column + e % S::kColumns;
        if (row >= p.m || col >= p.n) continue;
        float sum = 0.0f;
#pragma unroll
        for (int r = 0; r < S::kMaxSplits; ++r)
            if (r < splits) sum += ranks[r][e];  // rank order: the same bits every call
        p.out[row * p.n + col] = __float2half_rn(sum);
    }
    cluster.sync();  // no block leaves while another still reads its shared memory
#else
    __trap();  // the launcher splits only on devices with clusters
#endif
}

// The shapes built (instances/mma_b4.cu; src/dispatch.rs MMA_SHAPES, Tiled
// packs 1 and 2): two packs per K-warp and stage where K is a multiple of 128
// (half the barriers and copy bookkeeping per MMA), else one. Requirements
// beyond the K-slice kernel's: contiguous 16-byte aligned activations (no
// act-order gather), 16-byte aligned scales and zeros, k a multiple of the
// stage's K; splits 1 unless the device has clusters.
using TiledShape = Tiled<4, 2, 1>;
using TiledWideShape = Tiled<3, 2, 2>;

}  // namespace o4g
#endif  // O4G_HAVE_MMA
