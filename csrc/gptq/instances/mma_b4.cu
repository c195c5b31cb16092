// The tensor-core kernel (4-bit only) in its own translation unit, with the
// table of block shapes it runs with. Empty on ROCm.
#include "../gemm_mma.cuh"

#if O4G_HAVE_MMA
#include <cstdlib>
#include <cstring>

namespace o4g {
namespace {

// Warps per block and how many of them sit side by side on different
// columns (the rest slice K).
struct MmaShape {
    int warps;
    int col_warps;
};

// Measured on the H100 (benchmarks/NOTES.md, Llama-2-7B and Qwen1.5-1.8B layers):
// - up to 16 rows: 16 K-slice warps on 32 columns (M=1: 63 us summed against
//   67 with 8 warps and 81 with 4);
// - beyond, N > 4096: 4 warps (M=64: 224 us against 305 with 16 and 267 with 8);
// - beyond, N <= 4096: 16 warps, 2 of them side by side on 64 columns, which
//   read the same activations (L1 serves the second): 15-25% faster at M=32-64
//   on those layers (4096x4096 M=64 19.9 vs 23.7 us), level at M=128; on wider
//   layers the halved block count costs more than the shared reads save.
MmaShape table_shape(const GemmParams &p)
{
    if (p.m <= 16) return {16, 1};
    if (p.n <= 4096) return {16, 2};
    return {4, 1};
}

// OPT4GPTQ_MMA_TUNING="cols=32|64|128,warps=4|8|16" overrides the table, for
// benchmarking shapes against each other (README, "Environment"). Read on
// every call (a getenv, well under a launch's cost) so that tests and
// benchmarks can switch within one process. Unknown shapes fall back to the table.
MmaShape mma_shape(const GemmParams &p)
{
    MmaShape shape = table_shape(p);
    const char *text = std::getenv("OPT4GPTQ_MMA_TUNING");
    if (text == nullptr) return shape;
    if (const char *s = std::strstr(text, "cols=")) shape.col_warps = std::atoi(s + 5) / kMmaColumns;
    if (const char *s = std::strstr(text, "warps=")) shape.warps = std::atoi(s + 6);
    return shape;
}

template <int WARPS, int COL_WARPS>
cudaError_t launch_rows(const GemmParams &p, bool gather, cudaStream_t stream)
{
    if constexpr (WARPS == 16 && COL_WARPS == 1) {
        if (p.m <= 8) return launch_mma_tiles<1, WARPS, COL_WARPS>(p, gather, stream);  // one token tile is enough
    }
    return launch_mma_tiles<kMmaTokenTiles, WARPS, COL_WARPS>(p, gather, stream);
}

}  // namespace

cudaError_t launch_mma(const GemmParams &p, cudaStream_t stream)
{
    const bool gather = p.perm != nullptr || (p.lda % 8) != 0 || (reinterpret_cast<uintptr_t>(p.a) % 16) != 0;
    MmaShape shape = mma_shape(p);
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
