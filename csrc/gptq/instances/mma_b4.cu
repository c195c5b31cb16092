// The tensor-core kernels (4-bit only) in their own translation unit, with the
// table that picks one and its block shape per call. Empty on ROCm.
#include "../gemm_mma.cuh"
#include "../gemm_mma_tiled.cuh"

#if O4G_HAVE_MMA
#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace o4g {
namespace {

constexpr int kMaxDevices = 64;

// What the choice needs to know of the current device, read once per device.
struct MmaDevice {
    int sms = 0;
    bool clusters = false;  // thread-block clusters: compute capability 9.0 and newer
};

MmaDevice mma_device()
{
    static MmaDevice cache[kMaxDevices];
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) return MmaDevice{};
    MmaDevice &facts = cache[device];
    if (facts.sms == 0) {  // racing first calls compute the same values
        int major = 0, sms = 0;
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
        facts.clusters = major >= 9;
        facts.sms = sms;
    }
    return facts;
}

// Which kernel, and for the K-slice kernel how many warps per block and how
// many of them side by side on columns (the rest slice K); for the tiled
// kernel over how many cluster blocks K is split (0: the table's choice).
struct MmaShape {
    bool tiled;
    int warps;
    int col_warps;
    int splits;
};

// Whole waves: with `blocks` blocks of one per SM, the share of SM slots busy.
// Compares two block counts' shares exactly: a / ceil(a / sms) >= b / ceil(b / sms).
bool fills_as_well(int64_t a, int64_t b, int sms)
{
    const int64_t waves_a = (a + sms - 1) / sms, waves_b = (b + sms - 1) / sms;
    return a * waves_b >= b * waves_a;
}

// Measured on the H100 (benchmarks/NOTES.md, Llama-2-7B and Qwen1.5-1.8B layers):
// - up to 16 rows: 16 warps per block (M=1: 63 us summed against 67 with 8
//   warps and 81 with 4), on 64 columns (2 column warps x 8 K slices) where
//   half as many blocks fill the GPU's waves as well as 32-column blocks do,
//   else on 32 (16 K slices): 64 columns are 10-20% faster on the layers where
//   both fill alike (4096x22016 M=1 25.1 vs 29.1 us, 2560x13824 12.4 vs 15.4)
//   and slower where they leave SMs idle (4096x12288 16.5 vs 15.6);
// - beyond, N > 4096: 4 warps (M=64: 224 us against 305 with 16 and 267 with 8);
// - beyond, N <= 4096: 16 warps, 2 of them side by side on 64 columns, which
//   read the same activations (L1 serves the second): 15-25% faster at M=32-64
//   on those layers (4096x4096 M=64 19.9 vs 23.7 us), level at M=128; on wider
//   layers the halved block count costs more than the shared reads save.
MmaShape table_shape(const GemmParams &p, bool tiled_possible)
{
    if (p.m <= 16) {
        const int sms = mma_device().sms;
        const bool wide = sms > 0 && fills_as_well((p.n + 63) / 64, p.n / 32, sms);
        return {false, 16, wide ? 2 : 1, 0};
    }
    // The tiled kernel costs the same for any number of rows up to a multiple of
    // 64, where the K-slice kernel's cost grows with the rows; so it is taken
    // where its 64-row tiles are full enough, and at one tile only on wide
    // layers (H100, two packs per stage, benchmarks/NOTES.md):
    // - 58..64 rows (one tile >= 90% full), 12288+ columns: 4096x22016 M=64 75
    //   vs 91 us, 4096x12288 46 vs 53, 2560x13824 34 vs 41; on narrower layers
    //   it loses (2560x7680 26 vs 25, 4096x4096 25 vs 20);
    // - 96..128 rows (two tiles >= 75% full), every layer: Llama-2-7B M=128
    //   297 vs 408 us summed; at 80 rows the K-slice kernel is still ahead;
    // - 129..192 rows (three tiles), every layer: there it races dequantize +
    //   cuBLAS (the K-slice kernel is far behind) and wins on the sum of every
    //   model measured (Llama-2-7B M=192 411 vs 495 us, LLaMA-13B 554 vs 674);
    //   past 192 rows dense is ahead (src/dispatch.rs, MMA_MAX_ROWS).
    const int64_t tiles = (p.m + TiledShape::kRows - 1) / TiledShape::kRows;
    const int64_t tiled_rows = tiles * TiledShape::kRows;
    const bool full_enough = tiles == 1 ? 10 * p.m >= 9 * tiled_rows : tiles == 2 ? 4 * p.m >= 3 * tiled_rows : true;
    const bool wide_enough = tiles > 1 || p.n >= 12288;
    if (tiled_possible && full_enough && wide_enough) return {true, 0, 0, 0};
    if (p.n <= 4096) return {false, 16, 2, 0};
    return {false, 4, 1, 0};
}

// OPT4GPTQ_MMA_TUNING="kernel=slices|tiled,cols=32|64|128,warps=4|8|16,split=N,packs=1"
// overrides the table, for benchmarking kernels and shapes against each other
// (README, "Environment"). Read on every call (a getenv, well under a launch's
// cost) so that tests and benchmarks can switch within one process. Unknown
// shapes fall back to the table's.
MmaShape mma_shape(const GemmParams &p, bool tiled_possible)
{
    MmaShape shape = table_shape(p, tiled_possible);
    const char *text = std::getenv("OPT4GPTQ_MMA_TUNING");
    if (text == nullptr) return shape;
    if (std::strstr(text, "kernel=slices")) shape = {false, p.m <= 16 ? 16 : 4, 1, 0};
    if (std::strstr(text, "kernel=tiled") && tiled_possible) shape.tiled = true;
    if (const char *s = std::strstr(text, "cols=")) shape.col_warps = std::atoi(s + 5) / kMmaColumns;
    if (const char *s = std::strstr(text, "warps=")) shape.warps = std::atoi(s + 6);
    if (const char *s = std::strstr(text, "split=")) shape.splits = std::atoi(s + 6);
    return shape;
}

template <int WARPS, int COL_WARPS>
cudaError_t launch_rows(const GemmParams &p, bool gather, cudaStream_t stream)
{
    if constexpr (WARPS == 16 && COL_WARPS <= 2) {
        if (p.m <= 8) return launch_mma_tiles<1, WARPS, COL_WARPS>(p, gather, stream);  // one token tile is enough
    }
    return launch_mma_tiles<kMmaTokenTiles, WARPS, COL_WARPS>(p, gather, stream);
}

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

// Measured on the H100 (benchmarks/NOTES.md): two packs per K-warp and stage
// are 10-12% faster than one (Llama-2-7B M=128 297 vs 334 us), where K allows
// (a multiple of 128); 6 stages or 4 K-warps per block were no faster (4
// K-warps 15-25% slower). OPT4GPTQ_MMA_TUNING=packs=1 forces the one-pack shape.
cudaError_t launch_mma_tiled(const GemmParams &p, int splits, cudaStream_t stream)
{
    const char *text = std::getenv("OPT4GPTQ_MMA_TUNING");
    const bool one_pack = text != nullptr && std::strstr(text, "packs=1") != nullptr;
    if (!one_pack && p.k % TiledWideShape::kStageK == 0) return launch_tiled_shape<TiledWideShape>(p, splits, stream);
    return launch_tiled_shape<TiledShape>(p, splits, stream);
}

cudaError_t launch_mma(const GemmParams &p, cudaStream_t stream)
{
    const bool gather = p.perm != nullptr || (p.lda % 8) != 0 || (reinterpret_cast<uintptr_t>(p.a) % 16) != 0;
    const bool tiled_possible = !gather && p.k % TiledShape::kStageK == 0 && reinterpret_cast<uintptr_t>(p.scales) % 16 == 0 &&
                                reinterpret_cast<uintptr_t>(p.qzeros) % 16 == 0;
    const MmaShape shape = mma_shape(p, tiled_possible);
    if (shape.tiled) {
        const MmaDevice device = mma_device();
        // Enough blocks for every SM (two fit on each); K over up to 8 cluster blocks.
        const int64_t tiles = (p.n + TiledShape::kColumns - 1) / TiledShape::kColumns * ((p.m + TiledShape::kRows - 1) / TiledShape::kRows);
        int64_t splits = shape.splits > 0 ? shape.splits : (device.sms + tiles - 1) / tiles;
        splits = std::min<int64_t>({splits, int64_t{TiledShape::kMaxSplits}, p.k / TiledShape::kStageK});
        if (!device.clusters || splits < 1) splits = 1;
        return launch_mma_tiled(p, static_cast<int>(splits), stream);
    }
    switch (shape.col_warps * 100 + shape.warps) {
    case 104: return launch_rows<4, 1>(p, gather, stream);
    case 108: return launch_rows<8, 1>(p, gather, stream);
    case 208: return launch_rows<8, 2>(p, gather, stream);
    case 216: return launch_rows<16, 2>(p, gather, stream);
    case 404: return launch_rows<4, 4>(p, gather, stream);
    case 408: return launch_rows<8, 4>(p, gather, stream);
    case 416: return launch_rows<16, 4>(p, gather, stream);
    default: return launch_rows<16, 1>(p, gather, stream);
    }
}

}  // namespace o4g
#endif
