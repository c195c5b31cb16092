// The tensor-core kernels (4-bit only), in their own translation unit, and
// the choice between them. Empty on ROCm.
#define O4G_MMA_INSTANCES
#include "../gemm_mma.cuh"
#include "../gemm_mma_split.cuh"

#if O4G_HAVE_MMA
#include <cstdlib>
#include <cstring>
#include <algorithm>

namespace o4g {
namespace {

// What the choice needs to know of the current device, read once per device.
struct MmaDevice {
    int sms = 0;
    bool clusters = false;  // thread-block clusters: compute capability 9.0 and newer
};

MmaDevice mma_device()
{
    constexpr int kMaxDevices = 64;
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

// OPT4GPTQ_MMA_TUNING, for benchmarking the kernels against each other
// (README, "Environment"): "kernel=slices|split,split=N,cols=128|256".
struct MmaTuning {
    int kernel = 0;  // 0 the table below, 1 K-slice warps (gemm_mma.cuh), 2 cluster split (gemm_mma_split.cuh)
    int split = 0;   // 0 the table below, else the cluster size
    int col_warps = 4;
};

// Read on every call (a getenv and a few strstr, well under a launch's cost)
// so that tests and benchmarks can switch kernels within one process.
MmaTuning mma_tuning()
{
    MmaTuning t;
    const char *text = std::getenv("OPT4GPTQ_MMA_TUNING");
    if (text == nullptr) return t;
    if (std::strstr(text, "kernel=slices")) t.kernel = 1;
    if (std::strstr(text, "kernel=split")) t.kernel = 2;
    if (const char *s = std::strstr(text, "split=")) t.split = std::atoi(s + 6);
    if (std::strstr(text, "cols=256")) t.col_warps = 8;
    return t;
}

}  // namespace

cudaError_t launch_mma(const GemmParams &p, cudaStream_t stream)
{
    const MmaTuning tuning = mma_tuning();
    const MmaDevice device = mma_device();
    // Measured slower than the K-slice kernel at every M on the H100 (benchmarks/NOTES.md): on request only.
    const bool split_kernel = tuning.kernel == 2;
    if (!split_kernel) return launch_mma_slices(p, stream);

    const int64_t tile_columns = 32LL * tuning.col_warps;
    const int64_t tile_rows = p.m <= 8 ? 8 : p.m <= 16 ? 16 : 32;  // as launch_mma_split_rows
    const int64_t token_tiles = (p.m + tile_rows - 1) / tile_rows;
    const int64_t tiles = (p.n + tile_columns - 1) / tile_columns * token_tiles;
    int64_t splits = tuning.split > 0 ? tuning.split : (2LL * device.sms + tiles - 1) / tiles;
    splits = std::min<int64_t>({splits, int64_t{kMmaMaxSplits}, p.k / 32});
    if (!device.clusters || splits < 1) splits = 1;
    return launch_mma_split(p, static_cast<int>(splits), tuning.col_warps, stream);
}

}  // namespace o4g
#endif
