// Device-side view of one GEMM problem and the bit-level helpers every kernel shares.
#pragma once
#include "../compat/vendor.h"
#include "../opt4gptq.h"

namespace o4g {

// The launch arguments, reshaped for device code: typed pointers, derived sizes.
struct GemmParams {
    const __half *a;
    const uint32_t *qweight;
    const uint32_t *qzeros;
    const __half *scales;
    const int32_t *g_idx;
    const int32_t *perm;
    __half *out;
    __half *workspace;  // fp16 [K blocks, m, n] shares of the split-K exllama kernel, or null
    int64_t m, k, n, lda;
    int32_t groups;
    int32_t group_size;   // rows per group when g_idx is NULL
    int32_t zero_words;   // int32 words per qzeros row
    int32_t zero_offset;  // 1 (v1) or 0 (v2)
    int32_t tc_order;     // 1: 4-bit qweight in the tensor-core pack order (o4g_pack_order)
};

// The tensor-core pack order of shuffled 4-bit weights (opt4gptq.h,
// o4g_pack_order; README, "Weight layout"): stream position 8t + j of a
// 32-row pack (word t, nibble j) holds row 16 (j % 2) + 8 ((j / 2) % 2) + 2t + j / 4.
// So nibbles (j, j + 4) hold two adjacent rows, and word t holds lane t's
// k pairs of a tensor-core A fragment for the pack's two k16 steps.
__host__ __device__ constexpr int tc_row_of_position(int position)
{
    const int t = position / 8, j = position % 8;
    return 16 * (j % 2) + 8 * ((j / 2) % 2) + 2 * t + j / 4;
}

__host__ __device__ constexpr int tc_position_of_row(int row)
{
    const int j = row / 16 + 2 * ((row / 8) % 2) + 4 * (row % 2);
    return 8 * ((row % 8) / 2) + j;
}

__host__ __device__ constexpr bool tc_order_round_trips()
{
    for (int row = 0; row < 32; ++row)
        if (tc_row_of_position(tc_position_of_row(row)) != row) return false;
    return true;
}
static_assert(tc_order_round_trips(), "tc_position_of_row inverts tc_row_of_position");

// Stream position (along K) of row `row` of qweight in the params' pack order.
template <int BITS>
__device__ __forceinline__ int64_t packed_position(const GemmParams &p, int64_t row)
{
    if (BITS == 4 && p.tc_order) return (row & ~int64_t{31}) + tc_position_of_row(static_cast<int>(row & 31));
    return row;
}

template <int BITS>
struct Bits {
    static_assert(BITS == 2 || BITS == 3 || BITS == 4 || BITS == 8, "GPTQ packs 2, 3, 4 or 8 bits");
    static constexpr uint32_t mask = (1u << BITS) - 1u;
    // 32 consecutive values along the packed axis always fill exactly BITS words.
    static constexpr int words_per_pack = BITS;
};

// Value `index` of a little-endian bit stream held in registers. With `index`
// known at compile time (unrolled loops) this folds to one or two shifts; a
// 3-bit value may straddle two words.
template <int BITS>
__device__ __forceinline__ uint32_t unpack_from_words(const uint32_t (&words)[BITS], int index)
{
    const int bit = index * BITS;
    const int word = bit >> 5;
    const int offset = bit & 31;
    uint32_t value = words[word] >> offset;
    if (offset + BITS > 32) value |= words[word + 1] << (32 - offset);
    return value & Bits<BITS>::mask;
}

// Same, reading the words from global memory with a stride between them
// (qweight keeps one column's words `stride` elements apart).
template <int BITS>
__device__ __forceinline__ uint32_t unpack_strided(const uint32_t *words, int64_t stride, int64_t index)
{
    const int64_t bit = index * BITS;
    const int64_t word = bit >> 5;
    const int offset = static_cast<int>(bit & 31);
    uint32_t value = words[word * stride] >> offset;
    if (offset + BITS > 32) value |= words[(word + 1) * stride] << (32 - offset);
    return value & Bits<BITS>::mask;
}

// The integer zero point of (group, column), offset applied (v1 stores zero - 1).
template <int BITS>
__device__ __forceinline__ int zero_point(const GemmParams &p, int group, int64_t column)
{
    return static_cast<int>(unpack_strided<BITS>(p.qzeros + static_cast<int64_t>(group) * p.zero_words, 1, column)) +
           p.zero_offset;
}

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

__device__ __forceinline__ int group_of_row(const GemmParams &p, int64_t row)
{
    return p.g_idx ? p.g_idx[row] : static_cast<int>(row / p.group_size);
}

// A group index outside [0, groups) can only come from a corrupt g_idx that
// nobody validated (a device array we could not read without a sync). Reading
// past scales would be a crash or silent garbage; a NaN weight is loud instead.
__device__ __forceinline__ bool group_is_valid(const GemmParams &p, int group)
{
    return static_cast<unsigned>(group) < static_cast<unsigned>(p.groups);
}

// Activation column that weight row `row` multiplies: the act-order permutation,
// if any. An out-of-range entry (an unvalidated device permutation) turns the
// weight into NaN, for the same reason as above, and reads column 0 instead.
__device__ __forceinline__ int64_t activation_column(const GemmParams &p, int64_t row, float &weight)
{
    const int64_t column = p.perm ? static_cast<int64_t>(p.perm[row]) : row;
    if (static_cast<uint64_t>(column) < static_cast<uint64_t>(p.k)) return column;
    weight = quiet_nan();
    return 0;
}

}  // namespace o4g
