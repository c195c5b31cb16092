// Dequantize to a dense fp16 [K, N] matrix for the many-rows path, where a
// vendor GEMM (cuBLAS/hipBLAS through the caller's framework) beats any
// dequantize-on-the-fly kernel of ours. Rows are written in the activations'
// order: row r of a shuffled weight lands at perm[r], so the GEMM needs no
// gather of the activations.
#pragma once
#include "common.cuh"

namespace o4g {

// One thread: one column of one 32-row pack. Consecutive threads take
// consecutive columns, so both the word reads and the half writes coalesce.
template <int BITS>
__global__ void dequantize_kernel(GemmParams p, __half *weights)
{
    const int64_t column = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const int64_t pack = blockIdx.y;
    if (column >= p.n) return;
    uint32_t words[BITS];
#pragma unroll
    for (int j = 0; j < BITS; ++j) words[j] = p.qweight[(pack * BITS + j) * p.n + column];
    int cached_group = -1;
    float scale = 0.0f;
    int zero = 0;
#pragma unroll
    for (int r = 0; r < 32; ++r) {
        const int64_t row = pack * 32 + r;
        const int group = group_of_row(p, row);
        if (group != cached_group) {
            cached_group = group;
            const bool valid = group_is_valid(p, group);
            scale = valid ? __half2float(p.scales[static_cast<int64_t>(group) * p.n + column]) : quiet_nan();
            zero = valid ? zero_point<BITS>(p, group, column) : 0;
        }
        float w = scale * static_cast<float>(static_cast<int>(unpack_from_words<BITS>(words, r)) - zero);
        int64_t destination = row;
        if (p.perm) {
            destination = p.perm[row];
            // A corrupt permutation must not write out of bounds; the row it
            // would have filled stays as the caller allocated it (NaN-poisoned by us).
            if (static_cast<uint64_t>(destination) >= static_cast<uint64_t>(p.k)) continue;
        }
        weights[destination * p.n + column] = __float2half_rn(w);
    }
}

template <int BITS>
cudaError_t launch_dequantize(const GemmParams &p, __half *weights, cudaStream_t stream)
{
    const dim3 block(128);
    const dim3 grid(static_cast<unsigned>((p.n + 127) / 128), static_cast<unsigned>(p.k / 32));
    dequantize_kernel<BITS><<<grid, block, 0, stream>>>(p, weights);
    return cudaGetLastError();
}

}  // namespace o4g
