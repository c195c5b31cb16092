// gptq_shuffle's device half: re-pack qweight so that row r holds old row
// perm[r] (without perm, row r), 4-bit weights in the tensor-core pack order
// (see README, "Weight layout"), so the kernels never need a second
// permutation lookup for the weights.
#pragma once
#include "common.cuh"

namespace o4g {

// One thread builds the BITS output words of one (pack, column): 32 values,
// each fetched from wherever its source row lives.
template <int BITS, bool TC_ORDER>
__global__ void permute_rows_kernel(const uint32_t *src, uint32_t *dst, const int32_t *perm, int64_t k, int64_t n)
{
    const int64_t column = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const int64_t pack = blockIdx.y;
    if (column >= n) return;

    uint32_t words[BITS];
#pragma unroll
    for (int j = 0; j < BITS; ++j) words[j] = 0u;

#pragma unroll
    for (int r = 0; r < 32; ++r) {
        const int64_t row = pack * 32 + r;
        int64_t source = perm ? perm[row] : row;
        // The host validated perm; this only keeps a corrupt one in bounds.
        if (static_cast<uint64_t>(source) >= static_cast<uint64_t>(k)) source = row;
        const uint32_t value = unpack_strided<BITS>(src + column, n, source);
        const int bit = (TC_ORDER ? tc_position_of_row(r) : r) * BITS;
        const int word = bit >> 5;
        const int offset = bit & 31;
        words[word] |= value << offset;
        if (offset + BITS > 32) words[word + 1] |= value >> (32 - offset);
    }
#pragma unroll
    for (int j = 0; j < BITS; ++j) dst[(pack * BITS + j) * n + column] = words[j];
}

template <int BITS>
cudaError_t launch_permute_rows(const uint32_t *src, uint32_t *dst, const int32_t *perm, int64_t k, int64_t n,
                                bool tc_order, cudaStream_t stream)
{
    const dim3 block(128);
    const dim3 grid(static_cast<unsigned>((n + 127) / 128), static_cast<unsigned>(k / 32));
    if (BITS == 4 && tc_order) permute_rows_kernel<BITS, true><<<grid, block, 0, stream>>>(src, dst, perm, k, n);
    else permute_rows_kernel<BITS, false><<<grid, block, 0, stream>>>(src, dst, perm, k, n);
    return cudaGetLastError();
}

}  // namespace o4g
