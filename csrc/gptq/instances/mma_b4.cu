// The tensor-core kernels (4-bit only) in their own translation unit: the
// block shapes the Rust plan names by index (src/dispatch.rs, MMA_SHAPES),
// and their launches. Empty on ROCm.
#include "../gemm_mma.cuh"
#include "../gemm_mma_tiled.cuh"

#if O4G_HAVE_MMA

namespace o4g {
namespace {

constexpr int kMaxDevices = 64;

template <typename S>
cudaError_t launch_tiled_shape(const GemmParams &p, int splits, cudaStream_t stream)
{
    static bool shared_opt_in[kMaxDevices];
    int device = 0;
    cudaGetDevice(&device);
    if (device >= 0 && device < kMaxDevices && !shared_opt_in[device]) {
        const cudaError_t error = cudaFuncSetAttribute(gemm_mma_tiled_kernel<S>,
                                                       cudaFuncAttributeMaxDynamicSharedMemorySize, S::kSharedBytes);
        if (error != cudaSuccess) return error;
        shared_opt_in[device] = true;
    }
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(static_cast<unsigned>(splits), static_cast<unsigned>((p.m + S::kRows - 1) / S::kRows),
                          static_cast<unsigned>((p.n + S::kColumns - 1) / S::kColumns));
    config.blockDim = dim3(S::kThreads);
    config.dynamicSmemBytes = S::kSharedBytes;
    config.stream = stream;
    cudaLaunchAttribute cluster[1];
    if (splits > 1) {
        cluster[0].id = cudaLaunchAttributeClusterDimension;
        cluster[0].val.clusterDim.x = static_cast<unsigned>(splits);
        cluster[0].val.clusterDim.y = 1;
        cluster[0].val.clusterDim.z = 1;
        config.attrs = cluster;
        config.numAttrs = 1;
    }
    return cudaLaunchKernelEx(&config, gemm_mma_tiled_kernel<S>, p, splits);
}

}  // namespace

// The block shapes by index: the Rust plan (src/dispatch.rs, MMA_SHAPES and
// mma_plan) chooses one; an index with no instance is an error, not a fallback.
cudaError_t launch_mma(const GemmParams &p, int shape, int splits, cudaStream_t stream)
{
    // Act-order activations, or rows the 16-byte loads cannot read, are gathered
    // through the permutation: the operands' requirement, not a choice.
    const bool gather = p.perm != nullptr || (p.lda % 8) != 0 || (reinterpret_cast<uintptr_t>(p.a) % 16) != 0;
    const bool tiled_readable = !gather && reinterpret_cast<uintptr_t>(p.scales) % 16 == 0 &&
                                reinterpret_cast<uintptr_t>(p.qzeros) % 16 == 0;
    switch (shape) {
    case 0: return launch_mma_tiles<1, 16, 1>(p, gather, stream);
    case 1: return launch_mma_tiles<kMmaTokenTiles, 16, 1>(p, gather, stream);
    case 2: return launch_mma_tiles<1, 16, 2>(p, gather, stream);
    case 3: return launch_mma_tiles<kMmaTokenTiles, 16, 2>(p, gather, stream);
    case 4: return launch_mma_tiles<kMmaTokenTiles, 4, 1>(p, gather, stream);
    case 5: return launch_mma_tiles<kMmaTokenTiles, 8, 1>(p, gather, stream);
    case 6: return launch_mma_tiles<kMmaTokenTiles, 8, 2>(p, gather, stream);
    case 7: return launch_mma_tiles<kMmaTokenTiles, 4, 4>(p, gather, stream);
    case 8: return launch_mma_tiles<kMmaTokenTiles, 8, 4>(p, gather, stream);
    case 9: return launch_mma_tiles<kMmaTokenTiles, 16, 4>(p, gather, stream);
    case 10:
        if (!tiled_readable || p.k % TiledShape::kStageK != 0 || splits < 1 || splits > TiledShape::kMaxSplits)
            return cudaErrorInvalidValue;
        return launch_tiled_shape<TiledShape>(p, splits, stream);
    case 11:
        if (!tiled_readable || p.k % TiledWideShape::kStageK != 0 || splits < 1 || splits > TiledWideShape::kMaxSplits)
            return cudaErrorInvalidValue;
        return launch_tiled_shape<TiledWideShape>(p, splits, stream);
    default: return cudaErrorInvalidValue;
    }
}

}  // namespace o4g
#endif
