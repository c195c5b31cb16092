// Few rows of activations (decode): the weights dominate the traffic, so every
// weight word is read exactly once per M_TILE rows.
//
// Block = 32 columns x 16 K-slices (512 threads: enough warps per SM to keep
// weight loads in flight). Each K-slice walks every 16th pack of 32 rows for
// its column and keeps M_TILE fp32 partial sums in registers; the slices then
// meet in shared memory and one thread per (row, column) adds them in a
// fixed order and stores the result. No atomics, no pre-zeroed output: the
// result is the same bits on every call and safe to capture in a graph.
#pragma once
#include "common.cuh"

namespace o4g {

constexpr int kSkinnyColumns = 32;
constexpr int kSkinnySlices = 16;
constexpr int kSkinnyMaxRows = 8;  // M_TILE ceiling: one K-slice warp finishes each row

template <int BITS, int M_TILE>
__global__ void __launch_bounds__(kSkinnyColumns * kSkinnySlices) gemm_skinny_kernel(GemmParams p)
{
    static_assert(M_TILE >= 1 && M_TILE <= kSkinnySlices, "one slice reduces one row");
    const int lane = threadIdx.x;
    const int slice = threadIdx.y;
    const int64_t column = static_cast<int64_t>(blockIdx.x) * kSkinnyColumns + lane;
    const int64_t m0 = static_cast<int64_t>(blockIdx.y) * M_TILE;
    const int rows = static_cast<int>(min(static_cast<int64_t>(M_TILE), p.m - m0));
    const bool column_valid = column < p.n;

    float acc[M_TILE];
#pragma unroll
    for (int i = 0; i < M_TILE; ++i) acc[i] = 0.0f;

    if (column_valid) {
        const int64_t packs = p.k / 32;
        int cached_group = -1;
        float scale = 0.0f;
        int zero = 0;
        for (int64_t pack = slice; pack < packs; pack += kSkinnySlices) {
            uint32_t words[BITS];
#pragma unroll
            for (int j = 0; j < BITS; ++j) words[j] = p.qweight[(pack * BITS + j) * p.n + column];

            // Decode the pack once: 32 weights and the activation column each one meets.
            // Without g_idx and with whole packs per group, one division per pack.
            const bool pack_in_one_group = p.g_idx == nullptr && p.group_size % 32 == 0;
            const int pack_group = pack_in_one_group ? static_cast<int>((pack * 32) / p.group_size) : 0;
            float w[32];
            int32_t source[32];  // K < 2^31: 32-bit indices halve the registers
#pragma unroll
            for (int r = 0; r < 32; ++r) {
                const int64_t row = pack * 32 + r;
                const int group = pack_in_one_group ? pack_group : group_of_row(p, row);
                if (group != cached_group) {
                    cached_group = group;
                    const bool valid = group_is_valid(p, group);
                    scale = valid ? __half2float(p.scales[static_cast<int64_t>(group) * p.n + column]) : quiet_nan();
                    zero = valid ? zero_point<BITS>(p, group, column) : 0;
                }
                // scale (11-bit mantissa) times a 9-bit integer is exact in fp32.
                const int q = static_cast<int>(p.tc_order ? unpack_from_words<BITS>(words, tc_position_of_row(r))
                                                          : unpack_from_words<BITS>(words, r));
                w[r] = scale * static_cast<float>(q - zero);
                source[r] = static_cast<int32_t>(activation_column(p, row, w[r]));
            }
#pragma unroll
            for (int i = 0; i < M_TILE; ++i) {
                if (i >= rows) continue;
                const __half *a_row = p.a + (m0 + i) * p.lda;
                float sum = 0.0f;
#pragma unroll
                for (int r = 0; r < 32; ++r) sum += w[r] * __half2float(a_row[source[r]]);
                acc[i] += sum;
            }
        }
    }

    __shared__ float partial[kSkinnySlices][M_TILE][kSkinnyColumns];
#pragma unroll
    for (int i = 0; i < M_TILE; ++i) partial[slice][i][lane] = acc[i];
    __syncthreads();

    if (slice < rows && column_valid) {
        float sum = 0.0f;
#pragma unroll
        for (int s = 0; s < kSkinnySlices; ++s) sum += partial[s][slice][lane];
        p.out[(m0 + slice) * p.n + column] = __float2half_rn(sum);
    }
}

template <int BITS, int M_TILE>
cudaError_t launch_skinny(const GemmParams &p, cudaStream_t stream)
{
    const dim3 block(kSkinnyColumns, kSkinnySlices);
    const dim3 grid(static_cast<unsigned>((p.n + kSkinnyColumns - 1) / kSkinnyColumns),
                    static_cast<unsigned>((p.m + M_TILE - 1) / M_TILE));
    gemm_skinny_kernel<BITS, M_TILE><<<grid, block, 0, stream>>>(p);
    return cudaGetLastError();
}

}  // namespace o4g
