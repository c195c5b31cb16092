// Where the Hopper wgmma kernel's time goes: the same kernel with parts
// switched off (gemm_wgmma.cuh, Knockout bits), timed on a few layers.
// Development tool, results are wrong by design; built here, run on the device:
//
//   nvcc -O3 -std=c++17 -Icsrc -gencode=arch=compute_90a,code=sm_90a \
//        -cudart static -o .probe/wgmma_anatomy benchmarks/probes/wgmma_anatomy.cu
//   .probe/wgmma_anatomy
//
// Prints one line per (layer, variant): median microseconds of 50 launches,
// weights rotated over buffers larger than L2.
#include "../../csrc/gptq/instances/wgmma_b4.cu"

#include <algorithm>
#include <cstdio>
#include <vector>

namespace o4g {
namespace {

template <int TOKENS, int STAGE_K, int STAGES, int MIN_BLOCKS, unsigned KNOCKOUT>
struct ProbeShape : WgmmaShape<TOKENS, STAGE_K, STAGES, MIN_BLOCKS> {
    static constexpr unsigned kKnockout = KNOCKOUT;
};

#define CHECK(call)                                                                              \
    do {                                                                                         \
        cudaError_t e_ = (call);                                                                 \
        if (e_ != cudaSuccess) {                                                                 \
            std::printf("%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
            std::exit(1);                                                                        \
        }                                                                                        \
    } while (0)

struct Layer {
    int64_t k, n;
    std::vector<uint32_t *> qweight;
    uint32_t *qzeros;
    __half *scales, *a, *out;
};

__global__ void fill(uint32_t *p, size_t words, uint32_t seed)
{
    for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < words; i += gridDim.x * blockDim.x) {
        uint32_t x = static_cast<uint32_t>(i) * 2654435761u ^ seed;
        x ^= x >> 13, x *= 0x5bd1e995u, x ^= x >> 15;
        p[i] = x;
    }
}

__global__ void fill_half(__half *p, size_t count, float scale)
{
    for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < count; i += gridDim.x * blockDim.x)
        p[i] = __float2half(scale * static_cast<float>(static_cast<int>(i * 7919u % 17u) - 8));
}

Layer make_layer(int64_t k, int64_t n, int64_t max_m)
{
    Layer l{k, n, {}, nullptr, nullptr, nullptr, nullptr};
    const size_t weight_words = static_cast<size_t>(k / 8 * n);
    const int copies = static_cast<int>(std::max<size_t>(2, (size_t(256) << 20) / (weight_words * 4) + 1));
    for (int c = 0; c < copies; ++c) {
        uint32_t *w;
        CHECK(cudaMalloc(&w, weight_words * 4));
        fill<<<1024, 256>>>(w, weight_words, 17u * c + 1);
        l.qweight.push_back(w);
    }
    CHECK(cudaMalloc(&l.qzeros, (k / 128) * (n / 8) * 4));
    fill<<<64, 256>>>(l.qzeros, (k / 128) * (n / 8), 99);
    CHECK(cudaMalloc(&l.scales, (k / 128) * n * 2));
    fill_half<<<64, 256>>>(l.scales, (k / 128) * n, 1e-3f);
    CHECK(cudaMalloc(&l.a, max_m * k * 2));
    fill_half<<<256, 256>>>(l.a, max_m * k, 0.1f);
    CHECK(cudaMalloc(&l.out, max_m * n * 2));
    CHECK(cudaDeviceSynchronize());
    return l;
}

GemmParams params_of(const Layer &l, int64_t m, int copy)
{
    GemmParams p{};
    p.a = l.a;
    p.qweight = l.qweight[copy % l.qweight.size()];
    p.qzeros = l.qzeros;
    p.scales = l.scales;
    p.out = l.out;
    p.m = m, p.k = l.k, p.n = l.n, p.lda = l.k;
    p.groups = static_cast<int32_t>(l.k / 128);
    p.group_size = 128;
    p.zero_words = static_cast<int32_t>(l.n / 8);
    p.zero_offset = 1;
    p.tc_order = 1;
    return p;
}

template <typename S>
float median_us(const Layer &l, int64_t m, int splits)
{
    cudaEvent_t start, stop;
    CHECK(cudaEventCreate(&start));
    CHECK(cudaEventCreate(&stop));
    std::vector<float> times;
    for (int rep = 0; rep < 60; ++rep) {
        const GemmParams p = params_of(l, m, rep);
        CHECK(cudaEventRecord(start));
        CHECK(launch_shape<S>(p, splits, nullptr));
        CHECK(cudaEventRecord(stop));
        CHECK(cudaEventSynchronize(stop));
        float ms = 0;
        CHECK(cudaEventElapsedTime(&ms, start, stop));
        if (rep >= 10) times.push_back(1000.0f * ms);
    }
    std::sort(times.begin(), times.end());
    CHECK(cudaEventDestroy(start));
    CHECK(cudaEventDestroy(stop));
    return times[times.size() / 2];
}

template <int TOKENS, int STAGE_K, int STAGES, int MIN_BLOCKS>
void variants(const char *name, const Layer &l, int64_t m, int splits)
{
    std::printf("%5lldx%-5lld M=%4lld %-18s s%d | full %7.1f | noMMA %7.1f | noDeq %7.1f | noScaleCp %7.1f | "
                "noWeightCp %7.1f | idle %7.1f | idle+noW %7.1f\n",
                static_cast<long long>(l.k), static_cast<long long>(l.n), static_cast<long long>(m), name, splits,
                median_us<ProbeShape<TOKENS, STAGE_K, STAGES, MIN_BLOCKS, 0>>(l, m, splits),
                median_us<ProbeShape<TOKENS, STAGE_K, STAGES, MIN_BLOCKS, kNoMma>>(l, m, splits),
                median_us<ProbeShape<TOKENS, STAGE_K, STAGES, MIN_BLOCKS, kNoDequant>>(l, m, splits),
                median_us<ProbeShape<TOKENS, STAGE_K, STAGES, MIN_BLOCKS, kNoScaleCopies>>(l, m, splits),
                median_us<ProbeShape<TOKENS, STAGE_K, STAGES, MIN_BLOCKS, kNoWeightCopies>>(l, m, splits),
                median_us<ProbeShape<TOKENS, STAGE_K, STAGES, MIN_BLOCKS, kIdleConsumers>>(l, m, splits),
                median_us<ProbeShape<TOKENS, STAGE_K, STAGES, MIN_BLOCKS, kIdleConsumers | kNoWeightCopies>>(l, m,
                                                                                                         splits));
    std::fflush(stdout);
}

}  // namespace
}  // namespace o4g

int main()
{
    using namespace o4g;
    int device = 0;
    cudaDeviceProp prop{};
    CHECK(cudaGetDeviceProperties(&prop, device));
    std::printf("%s, %d SMs\n", prop.name, prop.multiProcessorCount);
    const Layer square = make_layer(4096, 4096, 1024);
    const Layer wide = make_layer(4096, 22016, 1024);
    const Layer deep = make_layer(11008, 4096, 1024);
    for (int splits : {1, 3}) {
        variants<16, 128, 12, 1>("t16 k128 x12", square, 16, splits);
        variants<64, 128, 8, 1>("t64 k128 x8", square, 64, splits);
        variants<16, 128, 4, 2>("t16 k128 x4 2/SM", square, 16, splits);
    }
    for (int splits : {1, 2}) {
        variants<16, 128, 12, 1>("t16 k128 x12", wide, 16, splits);
        variants<64, 128, 8, 1>("t64 k128 x8", wide, 64, splits);
        variants<64, 128, 3, 2>("t64 k128 x3 2/SM", wide, 64, splits);
        variants<128, 64, 10, 1>("t128 k64 x10", wide, 128, splits);
    }
    variants<64, 128, 8, 1>("t64 k128 x8", deep, 64, 3);
    variants<16, 128, 12, 1>("t16 k128 x12", deep, 16, 3);
    return 0;
}
