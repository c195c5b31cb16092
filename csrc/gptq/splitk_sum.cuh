// Exact split-K sums: the order in which K blocks arrive cannot change a bit.
//
// Each K block of the split-K exllama kernel rounds its fp32 share of an
// output element to fp16, as vLLM 0.3.3 does. Every finite fp16 value is an
// integer multiple of 2^-24 (the smallest subnormal) below 2^16 in magnitude:
// as a count of 2^-24 units it fits in 40 bits. The blocks add those integers
// into an int64 workspace, where addition is exact and so independent of
// order; one small kernel then rounds each total to fp16, once (round to
// nearest even), where vLLM's fp16 atomics round at every add.
//
// The units are taken 3 bits finer (2^-27) so that a finite term always has
// its three low bits clear. Those bits carry what an integer cannot: a share
// that is NaN or +-inf (fp16 overflow) ORs a flag in instead of adding. Adding
// multiples of 8 never carries into or out of the low bits, so flags and
// terms commute like the adds themselves. The total then comes out as IEEE
// addition of the shares would have it: NaN if any share is NaN or both
// infinities occur, else the infinity that occurred.
//
// Range: a term is below 2^(16+27) = 2^43 in magnitude, so 2^20 blocks
// (K = 2^27 rows) cannot overflow the int64; the grid's z limit (65535 blocks)
// is reached long before.
//
// The conversions are plain integer code for host and device, so the host
// checks them against numpy (tests/test_splitk_sum.py): every fp16 share,
// every rounding boundary between neighbouring fp16 values, the flags.
#pragma once
#include <stdint.h>

#include "../compat/vendor.h"

namespace o4g {

constexpr int kSplitKFlagBits = 3;                  // 2^-27 units: the low 3 bits are flags
constexpr unsigned long long kSplitKNaN = 1;        // some share was NaN
constexpr unsigned long long kSplitKPosInf = 2;     // some share was +inf
constexpr unsigned long long kSplitKNegInf = 4;     // some share was -inf
constexpr int64_t kSplitKMaxBlocks = int64_t{1} << 20;

__host__ __device__ inline int leading_zeros64(unsigned long long x)
{
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
    return __clzll(static_cast<long long>(x));
#else
    return __builtin_clzll(x);
#endif
}

// What one fp16 share (its bits) contributes to a workspace element: returns
// true and an integer to add (two's complement) for a finite share, false and
// a flag to OR in for NaN or an infinity.
__host__ __device__ inline bool splitk_term(uint16_t half_bits, unsigned long long &term)
{
    const uint32_t exponent = (half_bits >> 10) & 0x1fu;
    const uint32_t mantissa = half_bits & 0x3ffu;
    const bool negative = (half_bits & 0x8000u) != 0;
    if (exponent == 0x1fu) {
        term = mantissa != 0 ? kSplitKNaN : (negative ? kSplitKNegInf : kSplitKPosInf);
        return false;
    }
    // Subnormal: mantissa * 2^-24. Normal: (1024 + mantissa) * 2^(exponent - 25),
    // i.e. (1024 + mantissa) << (exponent - 1) units of 2^-24.
    const unsigned long long units =
        exponent == 0 ? mantissa : static_cast<unsigned long long>(mantissa | 0x400u) << (exponent - 1);
    const unsigned long long fixed = units << kSplitKFlagBits;
    term = negative ? 0ull - fixed : fixed;
    return true;
}

// The fp16 bits of a workspace element's total: flags first, then the exact
// sum (in 2^-27 units, two's complement) rounded once to nearest even.
__host__ __device__ inline uint16_t splitk_total(unsigned long long sum)
{
    const unsigned long long flags = sum & ((1ull << kSplitKFlagBits) - 1);
    if ((flags & kSplitKNaN) != 0 || (flags & (kSplitKPosInf | kSplitKNegInf)) == (kSplitKPosInf | kSplitKNegInf))
        return 0x7e00;  // quiet NaN
    if (flags != 0) return (flags & kSplitKPosInf) != 0 ? 0x7c00 : 0xfc00;
    const bool negative = (sum >> 63) != 0;
    const uint16_t sign = negative ? 0x8000 : 0;
    const unsigned long long magnitude = negative ? 0ull - sum : sum;
    if (magnitude == 0) return 0;  // +0, as fp16 additions starting from +0 give
    // The value magnitude * 2^-27 lies in [2^(top - 27), 2^(top - 26)).
    const int top = 63 - leading_zeros64(magnitude);
    if (top >= 27 + 16) return sign | 0x7c00;  // at least 2^16: beyond fp16 after any rounding
    // Keep 11 significant bits, or for subnormal results the 2^-24 grid (exact:
    // a finite total is a multiple of 2^-24). A carry out of the 11 bits lands
    // in the exponent field, which is what rounding up to the next binade (or
    // to infinity from 65504 + 16) means.
    const int shift = top - 10 > kSplitKFlagBits ? top - 10 : kSplitKFlagBits;
    const unsigned long long kept = magnitude >> shift;
    const unsigned long long rest = magnitude & ((1ull << shift) - 1);
    const unsigned long long halfway = 1ull << (shift - 1);
    const unsigned long long rounded = kept + ((rest > halfway || (rest == halfway && (kept & 1))) ? 1 : 0);
    return static_cast<uint16_t>(sign | ((static_cast<unsigned long long>(shift - kSplitKFlagBits) << 10) + rounded));
}

// Adds one K block's fp32 share, rounded to fp16 as vLLM does, into its workspace element.
__device__ __forceinline__ void splitk_add(unsigned long long *sum, float share)
{
    unsigned long long term;
    if (splitk_term(__half_as_ushort(__float2half_rn(share)), term))
        atomicAdd(sum, term);
    else
        atomicOr(sum, term);
}

constexpr int kSplitKFinalizeThreads = 256;

// out[i] = the rounded total of sums[i]. A template only so that every
// translation unit including this header may instantiate it.
template <int Unused = 0>
__global__ void __launch_bounds__(kSplitKFinalizeThreads)
    splitk_finalize_kernel(const unsigned long long *sums, __half *out, int64_t count)
{
    const int64_t i = static_cast<int64_t>(blockIdx.x) * kSplitKFinalizeThreads + threadIdx.x;
    if (i < count) out[i] = __ushort_as_half(splitk_total(sums[i]));
}

inline cudaError_t launch_splitk_finalize(const unsigned long long *sums, __half *out, int64_t count,
                                          cudaStream_t stream)
{
    const int64_t blocks = (count + kSplitKFinalizeThreads - 1) / kSplitKFinalizeThreads;
    splitk_finalize_kernel<><<<static_cast<unsigned>(blocks), kSplitKFinalizeThreads, 0, stream>>>(sums, out, count);
    return cudaGetLastError();
}

}  // namespace o4g
