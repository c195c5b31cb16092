// Dequantize to a dense fp16 [K, N] matrix for the many-rows path, where a
// vendor GEMM (cuBLAS/hipBLAS through the caller's framework) beats any
// dequantize-on-the-fly kernel of ours. Rows are written in the activations'
// order: row r of a shuffled weight lands at perm[r], so the GEMM needs no
// gather of the activations.
//
// The kernel writes four times the bytes it reads, so the stores set its
// speed: with COLUMNS = 8 each thread writes 16 bytes per row (a warp: 512
// contiguous bytes); COLUMNS = 1 is the fallback for unaligned or narrow N.
#pragma once
#include "common.cuh"

namespace o4g {

template <int COLUMNS>
struct HalfVector {
    __half values[COLUMNS];
};

template <int BITS, int COLUMNS, bool TC_ORDER>
__global__ void dequantize_kernel(GemmParams p, __half *weights)
{
    const int64_t column0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * COLUMNS;
    const int64_t pack = blockIdx.y;
    if (column0 >= p.n) return;

    // BITS words for each of COLUMNS adjacent columns: 16-byte loads when COLUMNS = 8.
    uint32_t words[COLUMNS][BITS];
#pragma unroll
    for (int j = 0; j < BITS; ++j) {
        const uint32_t *row = p.qweight + (pack * BITS + j) * p.n + column0;
        if constexpr (COLUMNS == 8) {
            const uint4 lo = reinterpret_cast<const uint4 *>(row)[0];
            const uint4 hi = reinterpret_cast<const uint4 *>(row)[1];
            words[0][j] = lo.x, words[1][j] = lo.y, words[2][j] = lo.z, words[3][j] = lo.w;
            words[4][j] = hi.x, words[5][j] = hi.y, words[6][j] = hi.z, words[7][j] = hi.w;
        } else {
#pragma unroll
            for (int c = 0; c < COLUMNS; ++c) words[c][j] = row[c];
        }
    }

    int cached_group = -1;
    float scale[COLUMNS];
    int zero[COLUMNS];
#pragma unroll
    for (int r = 0; r < 32; ++r) {
        const int64_t row = pack * 32 + r;
        const int group = group_of_row(p, row);
        if (group != cached_group) {
            cached_group = group;
            const bool valid = group_is_valid(p, group);
#pragma unroll
            for (int c = 0; c < COLUMNS; ++c) {
                scale[c] = valid ? __half2float(p.scales[static_cast<int64_t>(group) * p.n + column0 + c]) : quiet_nan();
                zero[c] = valid ? zero_point<BITS>(p, group, column0 + c) : 0;
            }
        }
        int64_t destination = row;
        if (p.perm) {
            destination = p.perm[row];
            // A corrupt permutation must not write out of bounds: skip the row.
            if (static_cast<uint64_t>(destination) >= static_cast<uint64_t>(p.k)) continue;
        }
        HalfVector<COLUMNS> out;
#pragma unroll
        for (int c = 0; c < COLUMNS; ++c) {
            const int q = static_cast<int>(unpack_from_words<BITS>(words[c], TC_ORDER ? tc_position_of_row(r) : r));
            out.values[c] = __float2half_rn(scale[c] * static_cast<float>(q - zero[c]));
        }
        if constexpr (COLUMNS == 8) {
            *reinterpret_cast<uint4 *>(weights + destination * p.n + column0) = *reinterpret_cast<const uint4 *>(&out);
        } else {
#pragma unroll
            for (int c = 0; c < COLUMNS; ++c) weights[destination * p.n + column0 + c] = out.values[c];
        }
    }
}

template <int BITS>
cudaError_t launch_dequantize(const GemmParams &p, __half *weights, cudaStream_t stream)
{
    const auto aligned = [](const void *ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
    const bool wide = p.n % 8 == 0 && aligned(p.qweight) && aligned(weights);
    const int columns = wide ? 8 : 1;
    const dim3 block(128);
    const int64_t per_block = 128 * columns;
    const dim3 grid(static_cast<unsigned>((p.n + per_block - 1) / per_block), static_cast<unsigned>(p.k / 32));
    const bool tc = BITS == 4 && p.tc_order;
    if (wide && tc) dequantize_kernel<BITS, 8, true><<<grid, block, 0, stream>>>(p, weights);
    else if (wide) dequantize_kernel<BITS, 8, false><<<grid, block, 0, stream>>>(p, weights);
    else if (tc) dequantize_kernel<BITS, 1, true><<<grid, block, 0, stream>>>(p, weights);
    else dequantize_kernel<BITS, 1, false><<<grid, block, 0, stream>>>(p, weights);
    return cudaGetLastError();
}

}  // namespace o4g
