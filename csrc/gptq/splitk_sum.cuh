// Deterministic split-K: the order in which K blocks finish cannot change a bit.
//
// Each K block of the split-K exllama kernel rounds its fp32 share of an
// output element to fp16, as vLLM 0.3.3 does. vLLM then adds the shares into
// the output with fp16 atomics, in whatever order the blocks arrive, so
// identical calls can differ in the last bit. Here block z stores its shares
// with plain stores into slice z of an fp16 [K blocks, M, N] workspace (every
// slot is written by exactly one block, so nothing needs zeroing), and one
// small kernel adds each element's shares in block order in fp32 and rounds
// the total to fp16 once. Same shares as vLLM, fixed order, fewer roundings;
// no atomics at all. The workspace lives in L2 for the layers of a decoder
// (e.g. 32 blocks x 16 rows x 22016 columns = 22.5 MB).
#pragma once
#include <stdint.h>

#include "../compat/vendor.h"

namespace o4g {

constexpr int kSplitKSumThreads = 256;
constexpr int kSplitKSumElements = 4;  // per thread: one 8-byte load per block slice

// out[i] = fp16(sum over z of shares[z * count + i]), z in order, for 4
// consecutive elements per thread (count is a multiple of 4: N * bits is a
// multiple of 32 for every bit width; the workspace is 8-byte aligned). A
// template only so that every translation unit including this header may
// instantiate it without clashing at device link time.
template <int Unused = 0>
__global__ void __launch_bounds__(kSplitKSumThreads)
    splitk_sum_kernel(const __half *shares, __half *out, int64_t count, int blocks)
{
    const int64_t i = (static_cast<int64_t>(blockIdx.x) * kSplitKSumThreads + threadIdx.x) * kSplitKSumElements;
    if (i >= count) return;
    float sum[kSplitKSumElements] = {0.0f, 0.0f, 0.0f, 0.0f};
    const __half *slice = shares + i;
    for (int z = 0; z < blocks; ++z, slice += count) {
        const uint2 bits = *reinterpret_cast<const uint2 *>(slice);
        const __half2 low = *reinterpret_cast<const __half2 *>(&bits.x);
        const __half2 high = *reinterpret_cast<const __half2 *>(&bits.y);
        sum[0] += __low2float(low);
        sum[1] += __high2float(low);
        sum[2] += __low2float(high);
        sum[3] += __high2float(high);
    }
    // Two 4-byte stores: the output is only known to be 4-byte aligned.
    __half2 *destination = reinterpret_cast<__half2 *>(out + i);
    destination[0] = __floats2half2_rn(sum[0], sum[1]);
    destination[1] = __floats2half2_rn(sum[2], sum[3]);
}

inline cudaError_t launch_splitk_sum(const __half *shares, __half *out, int64_t count, int blocks, cudaStream_t stream)
{
    const int64_t per_block = static_cast<int64_t>(kSplitKSumThreads) * kSplitKSumElements;
    const int64_t grid = (count + per_block - 1) / per_block;
    splitk_sum_kernel<><<<static_cast<unsigned>(grid), kSplitKSumThreads, 0, stream>>>(shares, out, count, blocks);
    return cudaGetLastError();
}

}  // namespace o4g
