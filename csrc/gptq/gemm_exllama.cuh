// The exllama-style kernel family vLLM 0.3.3 runs for use_exllama=True and few
// rows, and the three Opt4GPTQ optimizations as compile-time switches:
//
//   baseline  vLLM 0.3.3's scheme: 128 threads x 4 columns per block, one block
//             per 128 rows of K (split-K over the grid), activations staged in
//             shared memory one half per load, (q - z) * a as half2 FMAs over 8
//             rows, then fp32; every K block rounds its share to fp16. Minus
//             vLLM's zeroing race and its arrival-order fp16 atomics: block z
//             stores its shares into slice z of an fp16 [K blocks, M, N]
//             workspace, and a small kernel adds them in block order and
//             rounds once into the output (splitk_sum.cuh). No atomics;
//             bitwise repeatable, like every variant.
//   SMB       shared-memory buffering, built correctly: a block owns 32 columns
//             and all of K, split over 16 K-slices; the slices' partial sums of
//             the SAME (row, column) meet in shared memory and one thread stores
//             the total. No global atomics, no zeroing, bitwise repeatable.
//   VML       activations staged with 16-byte loads (8 halves) instead of one
//             half per load. Needs contiguous rows: with an act-order
//             permutation the loads are gathers and stay scalar.
//   ILA       the packed-half FMA/add as inline assembly (fma.rn.f16x2 /
//             add.rn.f16x2 on NVIDIA, v_pk_fma_f16 / v_pk_add_f16 on gfx9).
//
// Every bit width (2, 3, 4, 8) runs every variant: weights are read as BITS
// 16-byte words per 32-row pack for 4 adjacent columns. Requirements, checked
// by the Rust dispatch: no g_idx (groups are contiguous), group size a
// multiple of 32, qweight/a/out 16-byte aligned; the split-K variants also an
// fp16 [K blocks, M, N] workspace from the caller.
#pragma once
#include "common.cuh"
#include "splitk_sum.cuh"

namespace o4g {

enum VariantFlag : int { kSMB = 1, kVML = 2, kILA = 4 };

constexpr int kExThreads = 128;
constexpr int kExColumnsPerThread = 4;
constexpr int kExSplitRows = 128;                             // K rows per block without SMB
constexpr int64_t kExMaxSplitBlocks = 65535;                  // the grid's z limit
constexpr int kSmbSlices = 16;                                // K-slices per block with SMB
constexpr int kSmbColumnThreads = kExThreads / kSmbSlices;    // 8 threads x 4 = 32 columns
constexpr int kSmbColumns = kSmbColumnThreads * kExColumnsPerThread;

// Packs each SMB slice takes per staged chunk: as many as 16 KB of staged
// activations allow, so a thread keeps several weight loads between barriers.
template <int M_COUNT>
__host__ __device__ constexpr int smb_packs_per_slice() { return M_COUNT >= 8 ? 2 : (M_COUNT >= 4 ? 4 : 8); }

template <bool ILA>
__device__ __forceinline__ __half2 fma2(__half2 a, __half2 b, __half2 c)
{
    if constexpr (ILA) return isa::packed_fma(a, b, c);
    else return __hfma2(a, b, c);
}

template <bool ILA>
__device__ __forceinline__ __half2 add2(__half2 a, __half2 b)
{
    if constexpr (ILA) return isa::packed_add(a, b);
    else return __hadd2(a, b);
}

// Copies activation rows m0..m0+M_COUNT, columns k0..k0+rows (through the
// permutation) into tile[m * stride + r]. Rows past M are zero.
template <int M_COUNT, bool VML>
__device__ __forceinline__ void stage_activations(const GemmParams &p, int64_t m0, int64_t k0, int rows, __half *tile,
                                                  int stride)
{
    const bool vector_ok = VML && p.perm == nullptr && (p.lda % 8) == 0 &&
                           (reinterpret_cast<uintptr_t>(p.a) % 16) == 0;
    if (vector_ok) {
        const int vectors = rows / 8;
        for (int i = threadIdx.x; i < M_COUNT * vectors; i += blockDim.x) {
            const int m = i / vectors;
            const int v = i - m * vectors;
            uint4 value = make_uint4(0u, 0u, 0u, 0u);
            if (m0 + m < p.m) value = *reinterpret_cast<const uint4 *>(p.a + (m0 + m) * p.lda + k0 + v * 8);
            *reinterpret_cast<uint4 *>(tile + m * stride + v * 8) = value;
        }
        return;
    }
    for (int i = threadIdx.x; i < M_COUNT * rows; i += blockDim.x) {
        const int m = i / rows;
        const int r = i - m * rows;
        __half value = __float2half(0.0f);
        if (m0 + m < p.m) {
            float poison = 0.0f;
            const int64_t column = activation_column(p, k0 + r, poison);
            value = p.a[(m0 + m) * p.lda + column];
            if (poison != 0.0f) value = __float2half(poison);  // NaN: a corrupt permutation
        }
        tile[m * stride + r] = value;
    }
}

// One 32-row pack of K for 4 adjacent columns and M_COUNT activation rows.
// tile points at the pack's first row of activation row 0.
template <int BITS, int M_COUNT, bool ILA>
__device__ __forceinline__ void accumulate_pack(const GemmParams &p, int64_t pack, int64_t n0, const __half *tile,
                                                int stride, float (&acc)[M_COUNT][kExColumnsPerThread])
{
    uint32_t words[kExColumnsPerThread][BITS];
#pragma unroll
    for (int j = 0; j < BITS; ++j) {
        const uint4 w = *reinterpret_cast<const uint4 *>(p.qweight + (pack * BITS + j) * p.n + n0);
        words[0][j] = w.x;
        words[1][j] = w.y;
        words[2][j] = w.z;
        words[3][j] = w.w;
    }
    const int group = static_cast<int>((pack * 32) / p.group_size);
    float scale[kExColumnsPerThread];
    int zero[kExColumnsPerThread];
#pragma unroll
    for (int c = 0; c < kExColumnsPerThread; ++c) {
        scale[c] = __half2float(p.scales[static_cast<int64_t>(group) * p.n + n0 + c]);
        zero[c] = zero_point<BITS>(p, group, n0 + c);
    }
    const __half2 zero2 = __float2half2_rn(0.0f);
    // The 4 half2 of 8 stream positions r8..r8+7 and the activation pair each
    // meets: in GPTQ order rows (r8 + 2i, r8 + 2i + 1); 4-bit weights are
    // shuffled into the tensor-core pack order (common.cuh), where positions
    // (r8 + i, r8 + i + 4) hold two adjacent rows.
    constexpr bool kTensorCoreOrder = BITS == 4;
#pragma unroll
    for (int r8 = 0; r8 < 32; r8 += 8) {
#pragma unroll
        for (int c = 0; c < kExColumnsPerThread; ++c) {
            // (q - z) for 8 rows as 4 half2: exact, |q - z| <= 256.
            __half2 dq[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int lo_position = kTensorCoreOrder ? r8 + i : r8 + 2 * i;
                const int hi_position = kTensorCoreOrder ? r8 + i + 4 : r8 + 2 * i + 1;
                const int lo = static_cast<int>(unpack_from_words<BITS>(words[c], lo_position)) - zero[c];
                const int hi = static_cast<int>(unpack_from_words<BITS>(words[c], hi_position)) - zero[c];
                dq[i] = __halves2half2(__int2half_rn(lo), __int2half_rn(hi));
            }
#pragma unroll
            for (int m = 0; m < M_COUNT; ++m) {
                const __half *x = tile + m * stride;
                const auto pair = [&](int i) {
                    const int row = kTensorCoreOrder ? tc_row_of_position(r8 + i) : r8 + 2 * i;
                    return *reinterpret_cast<const __half2 *>(x + row);
                };
                // Two independent chains, joined by one packed add.
                __half2 even = fma2<ILA>(dq[0], pair(0), zero2);
                __half2 odd = fma2<ILA>(dq[1], pair(1), zero2);
                even = fma2<ILA>(dq[2], pair(2), even);
                odd = fma2<ILA>(dq[3], pair(3), odd);
                const __half2 sum = add2<ILA>(even, odd);
                acc[m][c] = fmaf(__low2float(sum) + __high2float(sum), scale[c], acc[m][c]);
            }
        }
    }
}

template <int BITS, int M_COUNT, bool VML, bool ILA>
__global__ void __launch_bounds__(kExThreads) gemm_exllama_splitk_kernel(GemmParams p)
{
    __shared__ __align__(16) __half tile[M_COUNT][kExSplitRows];
    const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * kExThreads + threadIdx.x) * kExColumnsPerThread;
    const int64_t m0 = static_cast<int64_t>(blockIdx.y) * M_COUNT;
    const int64_t k0 = static_cast<int64_t>(blockIdx.z) * kExSplitRows;
    const int rows = static_cast<int>(min(static_cast<int64_t>(kExSplitRows), p.k - k0));

    stage_activations<M_COUNT, VML>(p, m0, k0, rows, &tile[0][0], kExSplitRows);
    __syncthreads();
    if (n0 >= p.n) return;  // after the only barrier

    float acc[M_COUNT][kExColumnsPerThread];
#pragma unroll
    for (int m = 0; m < M_COUNT; ++m)
#pragma unroll
        for (int c = 0; c < kExColumnsPerThread; ++c) acc[m][c] = 0.0f;
    for (int pack = 0; pack < rows / 32; ++pack)
        accumulate_pack<BITS, M_COUNT, ILA>(p, k0 / 32 + pack, n0, &tile[0][pack * 32], kExSplitRows, acc);

    // Split-K: block z stores its shares, rounded to fp16 as vLLM's atomics
    // would add them, into workspace slice z; splitk_sum.cuh adds the slices.
    __half *slice = p.workspace + static_cast<int64_t>(blockIdx.z) * p.m * p.n;
#pragma unroll
    for (int m = 0; m < M_COUNT; ++m) {
        if (m0 + m >= p.m) continue;
        __half2 *dst = reinterpret_cast<__half2 *>(slice + (m0 + m) * p.n + n0);
        dst[0] = __floats2half2_rn(acc[m][0], acc[m][1]);
        dst[1] = __floats2half2_rn(acc[m][2], acc[m][3]);
    }
}

template <int BITS, int M_COUNT, bool VML, bool ILA>
__global__ void __launch_bounds__(kExThreads) gemm_exllama_smb_kernel(GemmParams p)
{
    constexpr int kPacks = smb_packs_per_slice<M_COUNT>();
    constexpr int kSmbChunkRows = kSmbSlices * kPacks * 32;
    __shared__ __align__(16) __half tile[M_COUNT][kSmbChunkRows];
    __shared__ float partial[kSmbSlices][M_COUNT][kSmbColumns];
    const int column_thread = threadIdx.x % kSmbColumnThreads;
    const int slice = threadIdx.x / kSmbColumnThreads;
    const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kSmbColumns + column_thread * kExColumnsPerThread;
    const int64_t m0 = static_cast<int64_t>(blockIdx.y) * M_COUNT;

    float acc[M_COUNT][kExColumnsPerThread];
#pragma unroll
    for (int m = 0; m < M_COUNT; ++m)
#pragma unroll
        for (int c = 0; c < kExColumnsPerThread; ++c) acc[m][c] = 0.0f;

    for (int64_t k0 = 0; k0 < p.k; k0 += kSmbChunkRows) {
        const int rows = static_cast<int>(min(static_cast<int64_t>(kSmbChunkRows), p.k - k0));
        stage_activations<M_COUNT, VML>(p, m0, k0, rows, &tile[0][0], kSmbChunkRows);
        __syncthreads();
        // Slice s takes packs s, s + 16, ... of the chunk: neighbouring slices read neighbouring rows.
#pragma unroll
        for (int i = 0; i < kPacks; ++i) {
            const int pack = slice + i * kSmbSlices;
            if (n0 < p.n && pack * 32 < rows)
                accumulate_pack<BITS, M_COUNT, ILA>(p, k0 / 32 + pack, n0, &tile[0][pack * 32], kSmbChunkRows, acc);
        }
        __syncthreads();  // the next chunk overwrites the tile
    }

    // Only partial sums of the same (row, column) are combined, in slice order.
#pragma unroll
    for (int m = 0; m < M_COUNT; ++m)
#pragma unroll
        for (int c = 0; c < kExColumnsPerThread; ++c)
            partial[slice][m][column_thread * kExColumnsPerThread + c] = acc[m][c];
    __syncthreads();
    for (int o = threadIdx.x; o < M_COUNT * kSmbColumns; o += kExThreads) {
        const int m = o / kSmbColumns;
        const int column = o - m * kSmbColumns;
        const int64_t n = static_cast<int64_t>(blockIdx.x) * kSmbColumns + column;
        if (m0 + m >= p.m || n >= p.n) continue;
        float sum = 0.0f;
#pragma unroll
        for (int s = 0; s < kSmbSlices; ++s) sum += partial[s][m][column];
        p.out[(m0 + m) * p.n + n] = __float2half_rn(sum);
    }
}

template <int BITS, int M_COUNT, bool SMB, bool VML, bool ILA>
cudaError_t launch_exllama_instance(const GemmParams &p, cudaStream_t stream)
{
    if constexpr (SMB) {
        const dim3 grid(static_cast<unsigned>((p.n + kSmbColumns - 1) / kSmbColumns),
                        static_cast<unsigned>((p.m + M_COUNT - 1) / M_COUNT));
        gemm_exllama_smb_kernel<BITS, M_COUNT, VML, ILA><<<grid, kExThreads, 0, stream>>>(p);
    } else {
        // Every workspace slot is stored by exactly one K block: no zeroing.
        const int64_t columns_per_block = static_cast<int64_t>(kExThreads) * kExColumnsPerThread;
        const int64_t k_blocks = (p.k + kExSplitRows - 1) / kExSplitRows;
        const dim3 grid(static_cast<unsigned>((p.n + columns_per_block - 1) / columns_per_block),
                        static_cast<unsigned>((p.m + M_COUNT - 1) / M_COUNT), static_cast<unsigned>(k_blocks));
        gemm_exllama_splitk_kernel<BITS, M_COUNT, VML, ILA><<<grid, kExThreads, 0, stream>>>(p);
        const cudaError_t launched = cudaGetLastError();
        if (launched != cudaSuccess) return launched;
        return launch_splitk_sum(p.workspace, p.out, p.m * p.n, static_cast<int>(k_blocks), stream);
    }
    return cudaGetLastError();
}

template <int BITS, int M_COUNT>
cudaError_t launch_exllama_rows(const GemmParams &p, int flags, cudaStream_t stream)
{
    switch (flags) {
    case 0: return launch_exllama_instance<BITS, M_COUNT, false, false, false>(p, stream);
    case kSMB: return launch_exllama_instance<BITS, M_COUNT, true, false, false>(p, stream);
    case kVML: return launch_exllama_instance<BITS, M_COUNT, false, true, false>(p, stream);
    case kILA: return launch_exllama_instance<BITS, M_COUNT, false, false, true>(p, stream);
    case kSMB | kVML | kILA: return launch_exllama_instance<BITS, M_COUNT, true, true, true>(p, stream);
    default: return cudaErrorInvalidValue;
    }
}

// The one entry per bit width; each is instantiated in its own translation
// unit (instances/exllama_bN.cu) so the compiler works on them in parallel.
template <int BITS>
cudaError_t launch_exllama(const GemmParams &p, int flags, cudaStream_t stream)
{
    // M_COUNT as vLLM picks m_count: the rows of one block, up to 8.
    if (p.m <= 1) return launch_exllama_rows<BITS, 1>(p, flags, stream);
    if (p.m <= 2) return launch_exllama_rows<BITS, 2>(p, flags, stream);
    if (p.m <= 4) return launch_exllama_rows<BITS, 4>(p, flags, stream);
    return launch_exllama_rows<BITS, 8>(p, flags, stream);
}

extern template cudaError_t launch_exllama<2>(const GemmParams &, int, cudaStream_t);
extern template cudaError_t launch_exllama<3>(const GemmParams &, int, cudaStream_t);
extern template cudaError_t launch_exllama<4>(const GemmParams &, int, cudaStream_t);
extern template cudaError_t launch_exllama<8>(const GemmParams &, int, cudaStream_t);

}  // namespace o4g
