// The extern "C" launchers of opt4gptq.h: argument reshaping, the kernel
// instance table, device selection and error text. No allocation, no sync
// (except o4g_stream_synchronize, which exists to do exactly that).
#include <cstdio>
#include <string>

#include "dequantize.cuh"
#include "gemm_exllama.cuh"
#include "gemm_mma.cuh"
#include "gemm_skinny.cuh"
#include "gemm_tiled.cuh"
#include "gemm_wgmma.cuh"
#include "permute.cuh"

namespace {

thread_local std::string last_error;

int fail(int status, const std::string &what)
{
    last_error = what;
    return status;
}

int check(cudaError_t error, const char *where)
{
    if (error == cudaSuccess) return O4G_OK;
    return fail(O4G_ERR_RUNTIME, std::string(where) + ": " + cudaGetErrorString(error));
}

// Launches go to the device that owns the pointers, whatever the calling
// thread had selected; the caller's selection is restored afterwards.
class DeviceScope {
public:
    explicit DeviceScope(int device)
    {
        status_ = cudaGetDevice(&previous_);
        if (status_ == cudaSuccess && previous_ != device) {
            status_ = cudaSetDevice(device);
            switched_ = status_ == cudaSuccess;
        }
    }
    ~DeviceScope()
    {
        if (switched_) (void)cudaSetDevice(previous_);
    }
    cudaError_t status() const { return status_; }

private:
    int previous_ = 0;
    bool switched_ = false;
    cudaError_t status_;
};

o4g::GemmParams to_params(const o4g_gemm_args &args)
{
    o4g::GemmParams p;
    p.a = static_cast<const __half *>(args.a);
    p.qweight = reinterpret_cast<const uint32_t *>(args.qweight);
    p.qzeros = reinterpret_cast<const uint32_t *>(args.qzeros);
    p.scales = static_cast<const __half *>(args.scales);
    p.g_idx = args.g_idx;
    p.perm = args.perm;
    p.out = static_cast<__half *>(args.out);
    p.workspace = static_cast<__half *>(args.workspace);
    p.m = args.m;
    p.k = args.k;
    p.n = args.n;
    p.lda = args.lda;
    p.groups = static_cast<int32_t>(args.groups);
    p.group_size = static_cast<int32_t>(args.k / args.groups);
    p.zero_words = static_cast<int32_t>(args.n * args.bits / 32);
    p.zero_offset = args.zero_offset;
    p.tc_order = args.bits == 4 && args.pack_order == O4G_ORDER_TENSOR_CORE;
    return p;
}

template <int BITS>
cudaError_t launch_skinny_rows(const o4g::GemmParams &p, cudaStream_t stream)
{
    // M_TILE = m for up to 8 rows (no idle accumulators), then chunks of 8.
    switch (p.m) {
    case 1: return o4g::launch_skinny<BITS, 1>(p, stream);
    case 2: return o4g::launch_skinny<BITS, 2>(p, stream);
    case 3: return o4g::launch_skinny<BITS, 3>(p, stream);
    case 4: return o4g::launch_skinny<BITS, 4>(p, stream);
    case 5: return o4g::launch_skinny<BITS, 5>(p, stream);
    case 6: return o4g::launch_skinny<BITS, 6>(p, stream);
    case 7: return o4g::launch_skinny<BITS, 7>(p, stream);
    default: return o4g::launch_skinny<BITS, o4g::kSkinnyMaxRows>(p, stream);
    }
}

template <int BITS>
int launch_gemm(const o4g::GemmParams &p, int path, int variant, int tile, int splits, cudaStream_t stream)
{
    switch (path) {
    case O4G_PATH_EXLLAMA: {
        if (p.g_idx != nullptr || p.group_size % 32 != 0)
            return fail(O4G_ERR_ARGS, "the exllama path needs contiguous groups of a multiple of 32 rows");
        if ((variant & O4G_SMB) == 0) {
            if (p.workspace == nullptr)
                return fail(O4G_ERR_ARGS, "the split-K exllama variants need an fp16 [ceil(k / 128), m, n] workspace");
            if (reinterpret_cast<uintptr_t>(p.workspace) % 8 != 0)
                return fail(O4G_ERR_ARGS, "the split-K workspace must be 8-byte aligned");
            if ((p.k + o4g::kExSplitRows - 1) / o4g::kExSplitRows > o4g::kExMaxSplitBlocks)
                return fail(O4G_ERR_ARGS, "the split-K exllama variants serve at most 65535 blocks of 128 rows of K");
        }
        const cudaError_t error = o4g::launch_exllama<BITS>(p, variant, stream);
        if (error == cudaErrorInvalidValue) return fail(O4G_ERR_UNSUPPORTED, "no kernel for variant flags " + std::to_string(variant));
        return check(error, "gemm_exllama launch");
    }
    case O4G_PATH_MMA: {
#if O4G_HAVE_MMA
        if (BITS != 4 || p.g_idx != nullptr || p.group_size % 32 != 0 || p.n % o4g::kMmaColumns != 0)
            return fail(O4G_ERR_ARGS, "the mma path needs 4-bit weights, contiguous groups of a multiple of 32 rows "
                                      "and n a multiple of 32");
        const cudaError_t error = o4g::launch_mma(p, tile, splits, stream);
        if (error == cudaErrorInvalidValue)
            return fail(O4G_ERR_ARGS, "no mma kernel for block shape " + std::to_string(tile) + " split " +
                                          std::to_string(splits) + " with these operands");
        return check(error, "gemm_mma launch");
#else
        return fail(O4G_ERR_UNSUPPORTED, "the mma path exists in CUDA builds only");
#endif
    }
    case O4G_PATH_WGMMA: {
#if O4G_HAVE_WGMMA
        if (BITS != 4 || !p.tc_order || p.g_idx != nullptr || p.perm != nullptr || p.group_size % 32 != 0 ||
            p.n % 128 != 0 || p.k % 128 != 0)
            return fail(O4G_ERR_ARGS, "the wgmma path needs 4-bit weights in the tensor-core pack order, no g_idx or "
                                      "permutation, groups of a multiple of 32 rows, n and k multiples of 128");
        if (splits < 1 || splits > 8) return fail(O4G_ERR_ARGS, "the wgmma path splits K over 1 to 8 cluster blocks");
        return check(o4g::launch_wgmma(p, tile, splits, stream), "gemm_wgmma launch");
#else
        return fail(O4G_ERR_UNSUPPORTED, "the wgmma path exists in CUDA builds only");
#endif
    }
    case O4G_PATH_SKINNY: return check(launch_skinny_rows<BITS>(p, stream), "gemm_skinny launch");
    case O4G_PATH_TILED: return check(o4g::launch_tiled<BITS>(p, stream), "gemm_tiled launch");
    default: return fail(O4G_ERR_UNSUPPORTED, "unknown kernel path " + std::to_string(path));
    }
}

// What the kernels assume of every problem; Rust checked it already, this is the last line.
int check_sizes(const o4g_gemm_args &args)
{
    // Groups derived from rows (no g_idx) must tile K exactly; an explicit g_idx may name any group.
    if (args.k % 32 != 0 || args.groups <= 0 || (args.g_idx == nullptr && args.k % args.groups != 0))
        return fail(O4G_ERR_ARGS, "k must be a multiple of 32, and of the group count when g_idx is absent");
    return O4G_OK;
}

}  // namespace

extern "C" int o4g_gemm(const o4g_gemm_args *args, void *stream_handle)
{
    if (!args) return fail(O4G_ERR_ARGS, "null arguments");
    if (args->m == 0 || args->n == 0) return O4G_OK;
    if (const int status = check_sizes(*args); status != O4G_OK) return status;
    DeviceScope scope(args->device);
    if (scope.status() != cudaSuccess) return check(scope.status(), "select device");

    const o4g::GemmParams p = to_params(*args);
    const cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
    switch (args->bits) {
    case 2: return launch_gemm<2>(p, args->path, args->variant, args->tile, args->splits, stream);
    case 3: return launch_gemm<3>(p, args->path, args->variant, args->tile, args->splits, stream);
    case 4: return launch_gemm<4>(p, args->path, args->variant, args->tile, args->splits, stream);
    case 8: return launch_gemm<8>(p, args->path, args->variant, args->tile, args->splits, stream);
    default: return fail(O4G_ERR_UNSUPPORTED, "bits must be 2, 3, 4 or 8");
    }
}

extern "C" int o4g_dequantize(const o4g_gemm_args *args, void *weights, void *stream_handle)
{
    if (!args) return fail(O4G_ERR_ARGS, "null arguments");
    if (args->k == 0 || args->n == 0) return O4G_OK;
    if (const int status = check_sizes(*args); status != O4G_OK) return status;
    DeviceScope scope(args->device);
    if (scope.status() != cudaSuccess) return check(scope.status(), "select device");
    const o4g::GemmParams p = to_params(*args);
    auto *w = static_cast<__half *>(weights);
    const cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
    switch (args->bits) {
    case 2: return check(o4g::launch_dequantize<2>(p, w, stream), "dequantize launch");
    case 3: return check(o4g::launch_dequantize<3>(p, w, stream), "dequantize launch");
    case 4: return check(o4g::launch_dequantize<4>(p, w, stream), "dequantize launch");
    case 8: return check(o4g::launch_dequantize<8>(p, w, stream), "dequantize launch");
    default: return fail(O4G_ERR_UNSUPPORTED, "bits must be 2, 3, 4 or 8");
    }
}

extern "C" int o4g_permute_rows(const int32_t *src, int32_t *dst, const int32_t *perm, int64_t k, int64_t n,
                                int32_t bits, int32_t pack_order, int32_t device, void *stream_handle)
{
    if (k == 0 || n == 0) return O4G_OK;
    if (k % 32 != 0) return fail(O4G_ERR_ARGS, "k must be a multiple of 32");
    DeviceScope scope(device);
    if (scope.status() != cudaSuccess) return check(scope.status(), "select device");

    const auto *s = reinterpret_cast<const uint32_t *>(src);
    auto *d = reinterpret_cast<uint32_t *>(dst);
    const cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
    const bool tc = pack_order == O4G_ORDER_TENSOR_CORE;
    switch (bits) {
    case 2: return check(o4g::launch_permute_rows<2>(s, d, perm, k, n, tc, stream), "permute_rows launch");
    case 3: return check(o4g::launch_permute_rows<3>(s, d, perm, k, n, tc, stream), "permute_rows launch");
    case 4: return check(o4g::launch_permute_rows<4>(s, d, perm, k, n, tc, stream), "permute_rows launch");
    case 8: return check(o4g::launch_permute_rows<8>(s, d, perm, k, n, tc, stream), "permute_rows launch");
    default: return fail(O4G_ERR_UNSUPPORTED, "bits must be 2, 3, 4 or 8");
    }
}

extern "C" int o4g_stream_synchronize(int32_t device, void *stream_handle)
{
    DeviceScope scope(device);
    if (scope.status() != cudaSuccess) return check(scope.status(), "select device");
    return check(cudaStreamSynchronize(static_cast<cudaStream_t>(stream_handle)), "stream synchronize");
}

extern "C" int o4g_device_count(int32_t *count)
{
    int value = 0;
    const cudaError_t error = cudaGetDeviceCount(&value);
    // "No device" is an answer, not a failure: a GPU build on a GPU-less host.
    if (error != cudaSuccess) {
        (void)cudaGetLastError();  // clear the sticky "no device" error
        value = 0;
    }
    *count = value;
    return O4G_OK;
}

#if O4G_HAVE_WGMMA
// The occupancy query runs on the current device: switch to `device` for it.
static int wgmma_cluster_slots(int32_t device, o4g_device_caps *caps)
{
    int current = 0;
    if (const int status = check(cudaGetDevice(&current), "current device"); status != O4G_OK) return status;
    if (const int status = check(cudaSetDevice(device), "set device"); status != O4G_OK) return status;
    int status = O4G_OK;
    for (int tile = 0; tile < O4G_WGMMA_TILES && status == O4G_OK; ++tile)
        for (int splits = 1; splits <= O4G_WGMMA_MAX_SPLITS && status == O4G_OK; ++splits) {
            int clusters = 0;
            status = check(o4g::wgmma_cluster_slots(device, tile, splits, &clusters), "wgmma cluster occupancy");
            caps->wgmma_cluster_slots[tile][splits - 1] = clusters;
        }
    (void)cudaSetDevice(current);
    return status;
}
#endif

extern "C" int o4g_get_device_caps(int32_t device, o4g_device_caps *caps)
{
    if (!caps) return fail(O4G_ERR_ARGS, "null caps");
    cudaDeviceProp prop;
    if (const int status = check(cudaGetDeviceProperties(&prop, device), "device properties"); status != O4G_OK)
        return status;
    caps->major = prop.major;
    caps->minor = prop.minor;
    caps->sms = prop.multiProcessorCount;
    for (auto &row : caps->wgmma_cluster_slots)
        for (int32_t &slots : row) slots = 0;
#if O4G_HAVE_WGMMA
    if (prop.major == 9 && prop.minor == 0) return wgmma_cluster_slots(device, caps);
#endif
    return O4G_OK;
}

extern "C" int o4g_device_name(int32_t device, char *buf, int32_t len)
{
    cudaDeviceProp prop;
    const int status = check(cudaGetDeviceProperties(&prop, device), "device properties");
    if (status != O4G_OK) return status;
    std::snprintf(buf, static_cast<size_t>(len), "%s", prop.name);
    return O4G_OK;
}

extern "C" const char *o4g_platform(void) { return O4G_PLATFORM; }

extern "C" const char *o4g_last_error(void) { return last_error.c_str(); }
