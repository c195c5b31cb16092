// Many rows of activations (prefill): arithmetic dominates, so weights are
// dequantized once per 64x64 output tile into shared memory and reused by all
// 64 rows of the tile. Plain fp32 FMAs, portable to every GPU we build for;
// the tensor-core version is a later, measured step.
#pragma once
#include "common.cuh"

namespace o4g {

constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 32;  // one pack: every tile starts on a word boundary
constexpr int kTiledThreads = 256;

template <int BITS>
__global__ void __launch_bounds__(kTiledThreads) gemm_tiled_kernel(GemmParams p)
{
    // +4 floats of padding keeps the column-wise stores off one bank.
    __shared__ float a_tile[kTileK][kTileM + 4];
    __shared__ float w_tile[kTileK][kTileN + 4];

    const int tid = threadIdx.x;
    const int tx = tid % 16;
    const int ty = tid / 16;
    const int64_t m_base = static_cast<int64_t>(blockIdx.y) * kTileM;
    const int64_t n_base = static_cast<int64_t>(blockIdx.x) * kTileN;

    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

    for (int64_t k0 = 0; k0 < p.k; k0 += kTileK) {
        // Stage activations: each thread fetches 8 consecutive k of one row.
        {
            const int r = tid >> 2;
            const int kk0 = (tid & 3) * 8;
            const int64_t m = m_base + r;
#pragma unroll
            for (int i = 0; i < 8; ++i)
            {
                float poison = 0.0f;  // NaN if perm is corrupt
                const int64_t column = activation_column(p, k0 + kk0 + i, poison);
                a_tile[kk0 + i][r] = (m < p.m) ? poison + __half2float(p.a[m * p.lda + column]) : 0.0f;
            }
        }
        // Stage weights: each thread dequantizes 8 consecutive rows of one column.
        {
            const int c = tid & 63;
            const int r0 = (tid >> 6) * 8;
            const int64_t column = n_base + c;
            const uint32_t *column_words = p.qweight + (k0 / 32) * BITS * p.n + column;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                float w = 0.0f;
                if (column < p.n) {
                    const int64_t row = k0 + r0 + i;
                    const int group = group_of_row(p, row);
                    if (group_is_valid(p, group)) {
                        const float scale = __half2float(p.scales[static_cast<int64_t>(group) * p.n + column]);
                        const int q = static_cast<int>(unpack_strided<BITS>(column_words, p.n, packed_position<BITS>(p, r0 + i)));
                        w = scale * static_cast<float>(q - zero_point<BITS>(p, group, column));
                    } else {
                        w = quiet_nan();
                    }
                }
                w_tile[r0 + i][c] = w;
            }
        }
        __syncthreads();

#pragma unroll 8
        for (int kk = 0; kk < kTileK; ++kk) {
            float a_frag[4], w_frag[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) a_frag[i] = a_tile[kk][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; ++j) w_frag[j] = w_tile[kk][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] += a_frag[i] * w_frag[j];
        }
        // The next iteration overwrites both tiles.
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int64_t m = m_base + ty + 16 * i;
        if (m >= p.m) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int64_t column = n_base + tx + 16 * j;
            if (column < p.n) p.out[m * p.n + column] = __float2half_rn(acc[i][j]);
        }
    }
}

template <int BITS>
cudaError_t launch_tiled(const GemmParams &p, cudaStream_t stream)
{
    const dim3 grid(static_cast<unsigned>((p.n + kTileN - 1) / kTileN), static_cast<unsigned>((p.m + kTileM - 1) / kTileM));
    gemm_tiled_kernel<BITS><<<grid, kTiledThreads, 0, stream>>>(p);
    return cudaGetLastError();
}

}  // namespace o4g
