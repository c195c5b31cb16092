// 4-bit GPTQ GEMM on Hopper's warpgroup tensor cores (wgmma, sm_90a), one
// kernel family for every number of rows.
//
// It computes out^T = W^T a^T: the weight's N columns are wgmma's M (64 per
// warpgroup), the tokens its N (8 to 256), so a batch of one row still fills
// the instruction's long side. The dequantized weight is the register operand
// A; the activations are operand B, copied by the tensor copy engine (TMA)
// into shared memory in the 128-byte swizzle wgmma reads.
//
// Weights are in the tensor-core pack order gptq_shuffle writes (README,
// "Weight layout"): word row t of a 32-row pack holds rows 2t, 2t+8, 2t+16,
// 2t+24 in nibbles 0-3 and the next rows in nibbles 4-7, so one AND/OR pair
// per nibble pair gives lane t of a quad its A fragment for two k16 steps,
// with no exchange between lanes. Rows g and g+8 of a warp's 16 A rows are
// two neighbouring columns, read with one 8-byte shared load.
//
// Block: two consumer warpgroups (warps 0-7, 64 columns each, the same
// tokens) and one producer warp (warp 8) that only copies: per stage one
// tensor copy of the weights and one of the activations (lane 0), and the
// scale and zero rows of the packs that start a group (16 bytes per lane),
// all completing on the stage's "full" barrier; consumers release a stage on its "empty" barrier once the wgmmas
// that read it have finished. K may be split over the blocks of a cluster:
// each block accumulates its K range in fp32, and the ranges are added in
// rank order through distributed shared memory. No atomics, no workspace:
// the same bits on every call.
#pragma once
#include "common.cuh"

#if O4G_HAVE_WGMMA
#include <cuda.h>

namespace o4g {

// One block shape. TOKENS: wgmma's N (rows of `a` per block); STAGE_K: k per
// pipeline stage (a multiple of 64); STAGES: ring depth; MIN_BLOCKS: blocks
// per SM the register budget must allow.
template <int TOKENS, int STAGE_K, int STAGES, int MIN_BLOCKS>
struct WgmmaShape {
    static_assert(TOKENS % 8 == 0 && TOKENS >= 8 && TOKENS <= 256, "wgmma takes N = 8..256 in steps of 8");
    static_assert(STAGE_K % 64 == 0, "whole 64-k activation boxes per stage");
    static_assert(STAGES >= 3, "a stage's slot is released one stage late (two wgmma groups in flight)");
    static constexpr int kTokens = TOKENS;
    static constexpr int kStageK = STAGE_K;
    static constexpr int kStages = STAGES;
    static constexpr int kMinBlocks = MIN_BLOCKS;

    static constexpr int kConsumerWarpgroups = 2;
    static constexpr int kColumns = 64 * kConsumerWarpgroups;
    static constexpr int kConsumerThreads = 128 * kConsumerWarpgroups;
    // Up to 64 tokens one producer warp follows the consumers. Beyond, the
    // accumulators (kTokens / 2 per thread) need more registers than an even
    // share of the register file: the producer is then a whole warpgroup that
    // gives its registers to the consumers (setmaxnreg), the only way to move
    // registers between warps.
    static constexpr bool kRebalance = TOKENS > 64;
    static constexpr int kProducerThreads = kRebalance ? 128 : 32;
    static constexpr int kThreads = kConsumerThreads + kProducerThreads;
    static constexpr int kProducerRegisters = 40;
    static constexpr int kConsumerRegisters = 232;  // 2 x 128 x 232 + 128 x 40 <= 65536
    static constexpr int kPacks = STAGE_K / 32;
    static constexpr int kSteps = STAGE_K / 16;  // k16 wgmma steps per stage

    // One stage in shared memory; every box starts on a 1024-byte boundary,
    // where the 128-byte swizzle pattern starts.
    static constexpr int kWeightBoxBytes = (STAGE_K / 8) * 128;  // 32 columns x STAGE_K/8 word rows
    static constexpr int kWeightBytes = (kColumns / 32) * kWeightBoxBytes;
    static constexpr int kActivationBoxBytes = TOKENS * 128;      // TOKENS rows x 64 k
    static constexpr int kActivationBytes = (STAGE_K / 64) * kActivationBoxBytes;
    static constexpr int kScaleBytes = kPacks * kColumns * 2;
    static constexpr int kZeroBytes = kPacks * kColumns / 2;
    static constexpr int kStageBytes = (kWeightBytes + kActivationBytes + kScaleBytes + kZeroBytes + 1023) / 1024 * 1024;

    // The epilogue's fp32 [TOKENS][kColumns] tile reuses the ring; rows padded
    // by 8 floats against bank conflicts.
    static constexpr int kPartialStride = kColumns + 8;
    static constexpr int kPartialBytes = TOKENS * kPartialStride * 4;
    static constexpr int kRingBytes = kStages * kStageBytes > kPartialBytes ? kStages * kStageBytes : kPartialBytes;
    static constexpr int kBarrierBytes = 2 * kStages * 8;
    static constexpr int kSharedBytes = 1024 + kRingBytes + kBarrierBytes;  // + alignment slack
    static_assert(kSharedBytes <= 227 * 1024, "more shared memory than a Hopper block may have");

    // Parts switched off (Knockout bits), for timing what is left: only the
    // development probe benchmarks/probes/wgmma_anatomy.cu derives shapes
    // that set any; every shape the library launches keeps all parts.
    static constexpr unsigned kKnockout = 0;
};

// What a probe shape may switch off (results are then wrong by design).
enum Knockout : unsigned {
    kNoMma = 1,              // consumers skip the wgmma instructions
    kNoDequant = 2,          // consumers pass the raw words on as fragments
    kNoScaleCopies = 4,      // the producer copies no scales or zeros; consumers read none
    kNoWeightCopies = 8,     // the producer copies no weights
    kIdleConsumers = 16,     // consumers only wait for each stage and release it
};

// What the host computes per call: the two tensor maps and the split.
struct WgmmaParams {
    const __half *scales;
    const uint32_t *qzeros;
    __half *out;
    int64_t m, n;
    int32_t k;
    int32_t group_size;
    int32_t zero_words;
    int32_t zero_offset;
    int32_t splits;  // blocks of a cluster that share one output tile's K
};

namespace wgmma_detail {

// 16-byte chunk (of 8 in a 128-byte row) where quad g of warp `warp_in_group`
// reads its two columns. Chosen so that the 16 lanes of each half-warp, after
// the copy engine's swizzle (chunk ^ row % 8) over word rows t = 0..3, hit 8
// different chunks: bank-conflict free 8-byte loads.
__device__ __forceinline__ int weight_chunk(int g, int warp_in_group)
{
    // g >> 1 = 0, 1, 2, 3 -> chunks 0, 4, 1, 5 (+ 2 for odd warps).
    return 4 * ((g >> 1) & 1) + (g >> 2) + 2 * (warp_in_group & 1);
}

// (q - z) * s for the two columns of a lane as wgmma A registers, from one
// word per column: returns fragments for the pack's two k16 steps.
struct PackFragments {
    uint32_t step[2][4];
};

__device__ __forceinline__ uint32_t half2_bits(__half2 h) { return *reinterpret_cast<uint32_t *>(&h); }
__device__ __forceinline__ __half2 bits_half2(uint32_t u) { return *reinterpret_cast<__half2 *>(&u); }

// Per column: half2 (1024 + z) to subtract from the low nibbles, -(64 + z)
// to add to the high ones after scaling by 1/16, and the scale twice.
struct ColumnQuant {
    __half2 low_zero;
    __half2 high_zero;
    __half2 scale;
};

__device__ __forceinline__ ColumnQuant column_quant(uint32_t zero, __half scale)
{
    ColumnQuant q;
    q.low_zero = bits_half2((0x6400u + zero) * 0x00010001u);            // 1024 + z, exact
    q.high_zero = __float2half2_rn(-64.0f - static_cast<float>(zero));  // -(64 + z), exact
    q.scale = __half2half2(scale);
    return q;
}

// Nibbles (j, j + 4) as (q - z) * s: low = nibble pair at bits 0-3/16-19,
// high = at bits 4-7/20-23 (read as 16 q, scaled back by 1/16 exactly).
__device__ __forceinline__ uint32_t dequant_low(uint32_t word, const ColumnQuant &q)
{
    const __half2 v = bits_half2(isa::and_or(word, 0x000F000Fu, 0x64006400u));
    return half2_bits(__hmul2(__hsub2(v, q.low_zero), q.scale));
}

__device__ __forceinline__ uint32_t dequant_high(uint32_t word, const ColumnQuant &q)
{
    const __half2 v = bits_half2(isa::and_or(word, 0x00F000F0u, 0x64006400u));
    const __half2 sixteenth = __float2half2_rn(0.0625f);
    return half2_bits(__hmul2(__hfma2(v, sixteenth, q.high_zero), q.scale));
}

// Word `w0` is the lane's column for A row g, `w1` for row g + 8. The even
// nibbles hold the pack's first k16 step, the odd ones its second.
__device__ __forceinline__ PackFragments dequant_pack(uint32_t w0, uint32_t w1, const ColumnQuant &q0,
                                                      const ColumnQuant &q1)
{
    PackFragments f;
    const uint32_t s0 = w0 >> 8, s1 = w1 >> 8;
    // Step 0: rows (2t, 2t+1) in nibbles (0, 4), rows (2t+8, 2t+9) in (2, 6).
    f.step[0][0] = dequant_low(w0, q0);
    f.step[0][1] = dequant_low(w1, q1);
    f.step[0][2] = dequant_low(s0, q0);
    f.step[0][3] = dequant_low(s1, q1);
    // Step 1: rows (16+2t, 17+2t) in nibbles (1, 5), rows (24+2t, 25+2t) in (3, 7).
    f.step[1][0] = dequant_high(w0, q0);
    f.step[1][1] = dequant_high(w1, q1);
    f.step[1][2] = dequant_high(s0, q0);
    f.step[1][3] = dequant_high(s1, q1);
    return f;
}

// Which packs of a stage start a group (bit p for pack p; pack 0 always):
// the others reuse the previous pack's decoded scales and zeros. Exact when
// groups and stages nest (one divides the other); otherwise every pack decodes.
template <int STAGE_K>
__device__ __forceinline__ uint32_t group_starts(int group_size)
{
    constexpr uint32_t kAll = (1u << (STAGE_K / 32)) - 1u;
    if (group_size % STAGE_K == 0) return 1u;
    if (STAGE_K % group_size != 0) return kAll;
    uint32_t mask = 0;
    for (int pack = 0; pack < STAGE_K / 32; ++pack)
        if ((32 * pack) % group_size == 0) mask |= 1u << pack;
    return mask;
}

}  // namespace wgmma_detail

template <typename S>
__global__ void __launch_bounds__(S::kThreads, S::kMinBlocks)
    gemm_wgmma_kernel(const __grid_constant__ CUtensorMap weight_map, const __grid_constant__ CUtensorMap activation_map,
                      WgmmaParams p)
{
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using namespace wgmma_detail;
    extern __shared__ uint8_t shared_raw[];
    // The swizzle pattern is anchored to 1024-byte boundaries.
    const uint32_t raw = isa::shared_address(shared_raw);
    const uint32_t ring = (raw + 1023u) & ~1023u;
    uint8_t *const ring_pointer = shared_raw + (ring - raw);
    const uint32_t full_barriers = ring + S::kRingBytes;
    const uint32_t empty_barriers = full_barriers + 8 * S::kStages;

    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int rank = p.splits > 1 ? static_cast<int>(isa::cluster_rank()) : 0;
    const int64_t n0 = static_cast<int64_t>(blockIdx.z) * S::kColumns;
    const int64_t m0 = static_cast<int64_t>(blockIdx.y) * S::kTokens;
    // This block's K range, in whole stages.
    const int total_stages = p.k / S::kStageK;
    const int first_stage = total_stages * rank / p.splits;
    const int stages = total_stages * (rank + 1) / p.splits - first_stage;

    // Bytes the tensor copies of a stage deliver (the lanes' 16-byte copies
    // are counted as arrivals instead).
    constexpr uint32_t kExpectedBytes = (S::kKnockout & kNoWeightCopies ? 0 : S::kWeightBytes) + S::kActivationBytes;
    if (threadIdx.x == 0) {
        for (int s = 0; s < S::kStages; ++s) {
            isa::barrier_init(full_barriers + 8 * s, 1 + 32);  // lane 0's expect + every producer lane's copies
            isa::barrier_init(empty_barriers + 8 * s, S::kConsumerThreads / 32);
        }
        isa::barrier_init_fence();
    }
    __syncthreads();

    if (warp >= S::kConsumerThreads / 32) {
        // ---- producer: one warp. Lane 0 issues the stage's two tensor copies
        // (weights, activations); the scale and zero rows of the packs that
        // start a group are copied by the lanes themselves, 16 bytes each,
        // and every lane's copies count as one arrival on the stage's full
        // barrier once they land. (A bulk copy per scale or zero row cost
        // ~80 ns of the copy engine's time each, more than the weights:
        // benchmarks/NOTES.md, "anatomy".)
        if constexpr (S::kRebalance) isa::release_registers<S::kProducerRegisters>();
        if (warp == S::kConsumerThreads / 32) {
            const uint32_t copied_packs = group_starts<S::kStageK>(p.group_size);
            for (int s = 0; s < stages; ++s) {
                const int slot = s % S::kStages;
                if (s >= S::kStages) isa::barrier_wait(empty_barriers + 8 * slot, ((s / S::kStages) - 1) & 1);
                const uint32_t full = full_barriers + 8 * slot;
                const uint32_t stage = ring + slot * S::kStageBytes;
                const uint32_t activations = stage + S::kWeightBytes;
                const int k0 = (first_stage + s) * S::kStageK;
                if (lane == 0) {
                    isa::barrier_arrive_expect(full, kExpectedBytes);
                    if constexpr (!(S::kKnockout & kNoWeightCopies))
                        isa::tensor_copy_3d(stage, &weight_map, 0, k0 / 8, static_cast<int32_t>(n0 / 32), full);
                    isa::tensor_copy_3d(activations, &activation_map, 0, static_cast<int32_t>(m0), k0 / 64, full);
                }
                if constexpr (!(S::kKnockout & kNoScaleCopies)) {
                    const uint32_t scales = activations + S::kActivationBytes;
                    const uint32_t zeros = scales + S::kScaleBytes;
                    constexpr int kScaleChunks = S::kColumns * 2 / 16, kZeroChunks = S::kColumns / 2 / 16;
                    static_assert(kScaleChunks + kZeroChunks <= 32, "one 16-byte chunk per lane");
#pragma unroll
                    for (int pack = 0; pack < S::kPacks; ++pack) {
                        if (!(copied_packs & (1u << pack))) continue;
                        const int64_t group = (k0 + 32 * pack) / p.group_size;
                        if (lane < kScaleChunks)
                            isa::copy_async_16B(scales + pack * S::kColumns * 2 + 16 * lane,
                                                p.scales + group * p.n + n0 + 8 * lane);
                        else if (lane < kScaleChunks + kZeroChunks)
                            isa::copy_async_16B(zeros + pack * S::kColumns / 2 + 16 * (lane - kScaleChunks),
                                                p.qzeros + group * p.zero_words + n0 / 8 + 4 * (lane - kScaleChunks));
                    }
                }
                isa::copy_async_arrive(full);
            }
        }
        __syncwarp();
        // The consumers' epilogue reads other blocks' shared memory between these two.
        if (p.splits > 1) {
            isa::cluster_sync();
            isa::cluster_sync();
        }
        return;
    }

    // ---- consumers: dequantize into A fragments, multiply ----
    if constexpr (S::kRebalance) isa::claim_registers<S::kConsumerRegisters>();
    const int group_in_block = warp / 4;  // consumer warpgroup
    const int warp_in_group = warp % 4;
    const int g = lane / 4, t = lane % 4;
    const int chunk = weight_chunk(g, warp_in_group);
    // Columns of A rows g and g + 8 inside the block's kColumns.
    const int column = 64 * group_in_block + 32 * (warp_in_group >> 1) + 4 * chunk + 2 * (g & 1);
    const int weight_box = column / 32;

    float acc[S::kTokens / 2];
#pragma unroll
    for (int i = 0; i < S::kTokens / 2; ++i) acc[i] = 0.0f;
    const uint32_t group_start = group_starts<S::kStageK>(p.group_size);
    ColumnQuant q0{}, q1{};

    // A lane's shared-memory reads of one stage, issued a stage ahead so that
    // their latency hides behind the previous stage's wgmmas.
    struct StageReads {
        uint2 words[S::kPacks];         // the lane's two columns' words of each pack
        uint32_t scales[S::kPacks];     // their two scales, where a group starts
        uint32_t zeros[S::kPacks];      // the qzeros word holding their zero points, likewise
    };
    const auto read_stage = [&](int s, StageReads &r) {
        const int slot = s % S::kStages;
        isa::barrier_wait(full_barriers + 8 * slot, (s / S::kStages) & 1);
        const uint32_t stage = ring + slot * S::kStageBytes;
        const uint32_t scales = stage + S::kWeightBytes + S::kActivationBytes;
        const uint32_t zeros = scales + S::kScaleBytes;
#pragma unroll
        for (int pack = 0; pack < S::kPacks; ++pack) {
            const int row = 4 * pack + t;  // word row inside the stage's weight box
            r.words[pack] = isa::load_shared_8B(stage + weight_box * S::kWeightBoxBytes + row * 128 +
                                                ((chunk ^ (row & 7)) * 16) + (g & 1) * 8);
            if (!(S::kKnockout & kNoScaleCopies) && (group_start & (1u << pack))) {
                r.scales[pack] = isa::load_shared_4B(scales + pack * S::kColumns * 2 + column * 2);
                r.zeros[pack] = isa::load_shared_4B(zeros + pack * S::kColumns / 2 + (column / 8) * 4);
            }
        }
    };

    // The wgmmas read their A registers asynchronously, until a wait retires
    // their group, so consecutive stages dequantize into two register sets in
    // turn: stage s writes set s % 2 while stage s - 1's wgmmas (set 1 - s % 2)
    // still run, and waits only for those (wgmma_wait<1>) after issuing its
    // own and reading stage s + 1's shared memory. Set s % 2 is rewritten at
    // stage s + 2, after stage s's group retired in the wait of stage s + 1.
    // A slot is released once the wgmmas that read its activations retired:
    // stage s - 1's, after stage s's wait.
    StageReads reads{};
    uint32_t a[2][S::kSteps][4];
    const auto run_stage = [&](int s, uint32_t(&fragments)[S::kSteps][4]) {
        const StageReads r = reads;
#pragma unroll
        for (int pack = 0; pack < S::kPacks; ++pack) {
            if (!(S::kKnockout & kNoScaleCopies) && (group_start & (1u << pack))) {
                const uint32_t zero_nibbles = r.zeros[pack] >> (4 * (column % 8));
                const __half2 scale2 = bits_half2(r.scales[pack]);
                q0 = column_quant((zero_nibbles & 0xFu) + p.zero_offset, __low2half(scale2));
                q1 = column_quant(((zero_nibbles >> 4) & 0xFu) + p.zero_offset, __high2half(scale2));
            }
            PackFragments f;
            if constexpr (S::kKnockout & kNoDequant) {
                for (int i = 0; i < 4; ++i) f.step[0][i] = r.words[pack].x >> i, f.step[1][i] = r.words[pack].y >> i;
            } else {
                f = dequant_pack(r.words[pack].x, r.words[pack].y, q0, q1);
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                fragments[2 * pack][i] = f.step[0][i];
                fragments[2 * pack + 1][i] = f.step[1][i];
            }
        }
        const uint32_t activations = ring + (s % S::kStages) * S::kStageBytes + S::kWeightBytes;
        isa::wgmma_fence();
#pragma unroll
        for (int step = 0; step < S::kSteps; ++step) {
            const uint32_t b = activations + (step / 4) * S::kActivationBoxBytes + (step % 4) * 32;
            if constexpr (!(S::kKnockout & kNoMma))
                isa::Wgmma<S::kTokens>::run(acc, fragments[step], isa::swizzled_k_major_descriptor(b));
        }
        isa::wgmma_commit();
        if (s + 1 < stages) read_stage(s + 1, reads);
        isa::wgmma_wait<1>();
        if (s > 0 && lane == 0) isa::barrier_arrive(empty_barriers + 8 * ((s - 1) % S::kStages));
    };
    // Whole pairs in the loop (ptxas serializes every wgmma of a loop whose
    // second stage is conditional); an odd count starts with one stage alone.
    if constexpr (S::kKnockout & kIdleConsumers) {
        for (int s = 0; s < stages; ++s) {
            isa::barrier_wait(full_barriers + 8 * (s % S::kStages), (s / S::kStages) & 1);
            if (lane == 0) isa::barrier_arrive(empty_barriers + 8 * (s % S::kStages));
        }
    } else {
    if (stages > 0) read_stage(0, reads);
    int s = 0;
    if (stages % 2 == 1) run_stage(s++, a[1]);
    for (; s < stages; s += 2) {
        run_stage(s, a[0]);
        run_stage(s + 1, a[1]);
    }
    }
    isa::wgmma_wait<0>();
    __syncwarp();

    // ---- epilogue: add the cluster's K ranges in rank order, round once ----
    // Every consumer is done with the ring before it becomes the partial tile.
    isa::sync_threads<1, S::kConsumerThreads>();
    float *partial = reinterpret_cast<float *>(ring_pointer);
    // Accumulator i of lane (g, t): A row g (i % 4 < 2) or g + 8, token 8 (i / 4) + 2t + i % 2.
#pragma unroll
    for (int j = 0; j < S::kTokens / 8; ++j) {
        const int token = 8 * j + 2 * t;
        *reinterpret_cast<float2 *>(partial + token * S::kPartialStride + column) = make_float2(acc[4 * j], acc[4 * j + 2]);
        *reinterpret_cast<float2 *>(partial + (token + 1) * S::kPartialStride + column) =
            make_float2(acc[4 * j + 1], acc[4 * j + 3]);
    }
    if (p.splits > 1) isa::cluster_sync();
    else isa::sync_threads<1, S::kConsumerThreads>();

    const int chunks = S::kTokens * S::kColumns / 4;
    const int per_rank = (chunks + p.splits - 1) / p.splits;
    const int begin = per_rank * rank;
    const int end = begin + per_rank < chunks ? begin + per_rank : chunks;
    for (int c = begin + static_cast<int>(threadIdx.x); c < end; c += S::kConsumerThreads) {
        const int token = c / (S::kColumns / 4);
        const int out_column = 4 * (c % (S::kColumns / 4));
        if (m0 + token >= p.m) continue;
        const uint32_t address = ring + (token * S::kPartialStride + out_column) * 4;
        float4 sum = p.splits > 1 ? isa::load_cluster_16B(address, 0)
                                  : *reinterpret_cast<const float4 *>(ring_pointer + (address - ring));
        for (int r = 1; r < p.splits; ++r) {
            const float4 part = isa::load_cluster_16B(address, static_cast<uint32_t>(r));
            sum.x += part.x, sum.y += part.y, sum.z += part.z, sum.w += part.w;
        }
        uint2 packed;
        packed.x = half2_bits(__floats2half2_rn(sum.x, sum.y));
        packed.y = half2_bits(__floats2half2_rn(sum.z, sum.w));
        *reinterpret_cast<uint2 *>(p.out + (m0 + token) * p.n + n0 + out_column) = packed;
    }
    // No block may leave while another still reads its shared memory.
    if (p.splits > 1) isa::cluster_sync();
#else
    __trap();  // built for another target: the plan never launches it there
#endif
}

// Requirements, checked by the Rust plan: 4-bit weights in the tensor-core
// pack order, no g_idx, contiguous 16-byte-aligned activations (act-order
// ones gathered first), n a multiple of 128... (see launch_wgmma).
// Defined in instances/wgmma_b4.cu.
cudaError_t launch_wgmma(const GemmParams &p, int tile, int splits, cudaStream_t stream);
// Clusters of block shape `tile`, `splits` blocks each, resident at once on `device`.
cudaError_t wgmma_cluster_slots(int device, int tile, int splits, int *clusters);

}  // namespace o4g
#endif  // O4G_HAVE_WGMMA
