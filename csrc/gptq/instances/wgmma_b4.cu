// The Hopper warpgroup kernels (4-bit) in their own translation unit: the
// block shapes the Rust plan names by index, and the per-call host work (two
// tensor maps, the cluster launch). Device code exists for sm_90a only; other
// targets compile the kernels empty and the plan never names them there.
#include "../gemm_wgmma.cuh"

#if O4G_HAVE_WGMMA
#include <cudaTypedefs.h>

namespace o4g {
namespace {

constexpr int kMaxDevices = 64;

// The block shapes, indexed by o4g_gemm_args.tile (src/dispatch.rs, WGMMA_TILES
// mirrors this list: tokens, stage k, stages, blocks per SM).
// Ring depth: as many stages as shared memory holds (up to 12). The kernel
// streams its weights through that ring, so the stages in flight bound its
// bandwidth: with 4 stages (2 in flight) the 64-row shape moved weights at
// 0.7 TB/s on the H200 (benchmarks/NOTES.md, "deeper rings").
using Tile8 = WgmmaShape<8, 128, 12, 1>;
using Tile16 = WgmmaShape<16, 128, 12, 1>;
using Tile32 = WgmmaShape<32, 128, 12, 1>;
using Tile64 = WgmmaShape<64, 128, 8, 1>;
using Tile128 = WgmmaShape<128, 128, 5, 1>;
using Tile256 = WgmmaShape<256, 64, 6, 1>;
// Two blocks per SM at 16 and 32 rows, where one per SM would leave a
// ragged last wave (src/dispatch.rs, wgmma_plan). The register cap (112 per
// thread) makes ptxas issue their wgmmas one by one; at these row counts the
// copies, not the tensor cores, set the pace.
using Tile16Paired = WgmmaShape<16, 128, 6, 2>;
using Tile32Paired = WgmmaShape<32, 128, 6, 2>;

// The driver's tensor-map encoder, found once through the runtime (no link
// against libcuda: the wheel carries only the static runtime).
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder()
{
    static PFN_cuTensorMapEncodeTiled_v12000 encoder = [] {
        void *function = nullptr;
        cudaDriverEntryPointQueryResult found{};
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &function, 12000, cudaEnableDefault, &found) !=
                cudaSuccess ||
            found != cudaDriverEntryPointSuccess)
            function = nullptr;
        return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(function);
    }();
    return encoder;
}

// A 3-D tensor of `bytes`-sized elements (dims innermost first, strides in
// bytes of dims 1 and 2) read in boxes of `box`, 128-byte swizzled. Elements
// past the end read as zeros.
cudaError_t encode_3d(CUtensorMap &map, CUtensorMapDataType type, const void *base, const cuuint64_t (&dims)[3],
                      const cuuint64_t (&strides)[2], const cuuint32_t (&box)[3])
{
    const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
    if (encode == nullptr) return cudaErrorNotSupported;
    const cuuint32_t element_strides[3] = {1, 1, 1};
    const CUresult result = encode(&map, type, 3, const_cast<void *>(base), dims, strides, box, element_strides,
                                   CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                   CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    return result == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// The kernel may use more than 48 KB of shared memory: opt in once per device.
template <typename S>
cudaError_t opt_in_shared(int device)
{
    static bool done[kMaxDevices];
    if (device >= 0 && device < kMaxDevices && done[device]) return cudaSuccess;
    const cudaError_t error =
        cudaFuncSetAttribute(gemm_wgmma_kernel<S>, cudaFuncAttributeMaxDynamicSharedMemorySize, S::kSharedBytes);
    if (error == cudaSuccess && device >= 0 && device < kMaxDevices) done[device] = true;
    return error;
}

cudaLaunchAttribute cluster_of(int splits)
{
    cudaLaunchAttribute cluster{};
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = static_cast<unsigned>(splits);
    cluster.val.clusterDim.y = 1;
    cluster.val.clusterDim.z = 1;
    return cluster;
}

template <typename S>
cudaError_t cluster_slots_of(int device, int splits, int *clusters)
{
    if (const cudaError_t error = opt_in_shared<S>(device); error != cudaSuccess) return error;
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(static_cast<unsigned>(splits));
    config.blockDim = dim3(S::kThreads);
    config.dynamicSmemBytes = S::kSharedBytes;
    cudaLaunchAttribute cluster = cluster_of(splits);
    config.attrs = &cluster;
    config.numAttrs = 1;
    return cudaOccupancyMaxActiveClusters(clusters, gemm_wgmma_kernel<S>, &config);
}

template <typename S>
cudaError_t launch_shape(const GemmParams &p, int splits, cudaStream_t stream)
{
    int device = 0;
    if (const cudaError_t error = cudaGetDevice(&device); error != cudaSuccess) return error;
    if (const cudaError_t error = opt_in_shared<S>(device); error != cudaSuccess) return error;

    // One copy per stage and operand: a 3-D view whose outermost dimension
    // steps between the 128-byte-wide boxes the swizzle allows, so the
    // stage's boxes land one after another as separate 2-D boxes would.
    CUtensorMap weight_map, activation_map;
    // qweight as int32 [k / 8, n]: {32 columns, k / 8 word rows, n / 32 column blocks},
    // box {32, stage k / 8, 128 / 32}.
    {
        const cuuint64_t dims[3] = {32, static_cast<cuuint64_t>(p.k / 8), static_cast<cuuint64_t>(p.n / 32)};
        const cuuint64_t strides[2] = {static_cast<cuuint64_t>(p.n * 4), 128};
        const cuuint32_t box[3] = {32, S::kStageK / 8, S::kColumns / 32};
        if (const cudaError_t error = encode_3d(weight_map, CU_TENSOR_MAP_DATA_TYPE_INT32, p.qweight, dims, strides, box);
            error != cudaSuccess)
            return error;
    }
    // a as fp16 [m, k] with row stride lda: {64 k, m rows, k / 64 blocks},
    // box {64, kTokens, stage k / 64}.
    {
        const cuuint64_t dims[3] = {64, static_cast<cuuint64_t>(p.m), static_cast<cuuint64_t>(p.k / 64)};
        const cuuint64_t strides[2] = {static_cast<cuuint64_t>(p.lda * 2), 128};
        const cuuint32_t box[3] = {64, S::kTokens, S::kStageK / 64};
        if (const cudaError_t error = encode_3d(activation_map, CU_TENSOR_MAP_DATA_TYPE_FLOAT16, p.a, dims, strides, box);
            error != cudaSuccess)
            return error;
    }

    WgmmaParams w;
    w.scales = p.scales;
    w.qzeros = p.qzeros;
    w.out = p.out;
    w.m = p.m;
    w.n = p.n;
    w.k = static_cast<int32_t>(p.k);
    w.group_size = p.group_size;
    w.zero_words = p.zero_words;
    w.zero_offset = p.zero_offset;
    w.splits = splits;

    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(static_cast<unsigned>(splits), static_cast<unsigned>((p.m + S::kTokens - 1) / S::kTokens),
                          static_cast<unsigned>(p.n / S::kColumns));
    config.blockDim = dim3(S::kThreads);
    config.dynamicSmemBytes = S::kSharedBytes;
    config.stream = stream;
    cudaLaunchAttribute cluster = cluster_of(splits);
    if (splits > 1) {
        config.attrs = &cluster;
        config.numAttrs = 1;
    }
    return cudaLaunchKernelEx(&config, gemm_wgmma_kernel<S>, weight_map, activation_map, w);
}

}  // namespace

cudaError_t wgmma_cluster_slots(int device, int tile, int splits, int *clusters)
{
    switch (tile) {
    case 0: return cluster_slots_of<Tile8>(device, splits, clusters);
    case 1: return cluster_slots_of<Tile16>(device, splits, clusters);
    case 2: return cluster_slots_of<Tile32>(device, splits, clusters);
    case 3: return cluster_slots_of<Tile64>(device, splits, clusters);
    case 4: return cluster_slots_of<Tile128>(device, splits, clusters);
    case 5: return cluster_slots_of<Tile256>(device, splits, clusters);
    case 6: return cluster_slots_of<Tile16Paired>(device, splits, clusters);
    case 7: return cluster_slots_of<Tile32Paired>(device, splits, clusters);
    default: return cudaErrorInvalidValue;
    }
}

cudaError_t launch_wgmma(const GemmParams &p, int tile, int splits, cudaStream_t stream)
{
    switch (tile) {
    case 0: return launch_shape<Tile8>(p, splits, stream);
    case 1: return launch_shape<Tile16>(p, splits, stream);
    case 2: return launch_shape<Tile32>(p, splits, stream);
    case 3: return launch_shape<Tile64>(p, splits, stream);
    case 4: return launch_shape<Tile128>(p, splits, stream);
    case 5: return launch_shape<Tile256>(p, splits, stream);
    case 6: return launch_shape<Tile16Paired>(p, splits, stream);
    case 7: return launch_shape<Tile32Paired>(p, splits, stream);
    default: return cudaErrorInvalidValue;
    }
}

}  // namespace o4g
#endif
