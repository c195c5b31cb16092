/* The one boundary between the Rust engine and the GPU kernels.
 *
 * Everything here is plain C: raw device pointers, sizes, an explicit stream.
 * The launchers never allocate and never synchronize, so a caller may capture
 * them in a CUDA/HIP graph. Rust validates every argument before calling; the
 * status codes below exist for what only the device runtime can report. */
#ifndef OPT4GPTQ_H
#define OPT4GPTQ_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum o4g_status {
    O4G_OK = 0,
    O4G_ERR_ARGS = 1,        /* arguments the launcher cannot serve (Rust should have refused them) */
    O4G_ERR_UNSUPPORTED = 2, /* a (bits, variant) pair with no kernel instance */
    O4G_ERR_RUNTIME = 3      /* the device runtime failed: see o4g_last_error() */
};

/* Which kernel family serves a call. Rust owns the choice (see src/dispatch.rs). */
enum o4g_path {
    O4G_PATH_SKINNY = 0, /* few rows: every block reads a column strip of the weights once */
    O4G_PATH_TILED = 1,  /* many rows: 64x64 output tiles, weights dequantized into shared memory */
    O4G_PATH_EXLLAMA = 2, /* vLLM 0.3.3's kernel family and the Opt4GPTQ switches (gemm_exllama.cuh) */
    O4G_PATH_MMA = 3,     /* 4-bit, exllama layout, tensor cores (gemm_mma.cuh); CUDA builds only */
    O4G_PATH_WGMMA = 4    /* 4-bit, exllama layout, Hopper warpgroup MMA (gemm_wgmma.cuh); sm_90a only */
};

/* How the rows of each 32-row pack of qweight are placed in its words. */
enum o4g_pack_order {
    O4G_ORDER_GPTQ = 0,        /* row r of a pack in stream bits [r * bits, r * bits + bits) */
    O4G_ORDER_TENSOR_CORE = 1  /* 4-bit, after gptq_shuffle: stream position 8t + j holds row
                                  16 (j % 2) + 8 ((j / 2) % 2) + 2t + j / 4 (README, "Weight layout") */
};

/* Opt4GPTQ switches for O4G_PATH_EXLLAMA, as a bitmask. */
enum o4g_variant_flag {
    O4G_SMB = 1, /* shared-memory reduction of K-slices; no global atomics */
    O4G_VML = 2, /* 16-byte activation loads */
    O4G_ILA = 4  /* packed-half FMA/add as inline assembly */
};

typedef struct o4g_gemm_args {
    const void *a;           /* fp16 [m, k], row stride lda elements, unit column stride */
    const int32_t *qweight;  /* int32 [k * bits / 32, n], packed along k */
    const int32_t *qzeros;   /* int32 [groups, n * bits / 32], packed along n */
    const void *scales;      /* fp16 [groups, n] */
    const int32_t *g_idx;    /* int32 [k] group of each row, or NULL: row r is in group r / (k / groups) */
    const int32_t *perm;     /* int32 [k] activation column read for weight row r, or NULL: column r */
    void *out;               /* fp16 [m, n], contiguous; fully overwritten */
    void *workspace;         /* fp16, ceil(k / 128) * m * n contiguous elements, 8-byte aligned, overwritten:
                                where the split-K exllama variants (O4G_PATH_EXLLAMA without O4G_SMB) store
                                each K block's shares; else NULL */
    int64_t m, k, n, groups, lda;
    int32_t bits;            /* 2, 3, 4 or 8 */
    int32_t zero_offset;     /* 1 for GPTQ v1 (stored zero is zero - 1), 0 for v2 */
    int32_t path;            /* enum o4g_path */
    int32_t variant;         /* o4g_variant_flag bits; O4G_PATH_EXLLAMA only. 0 = vLLM 0.3.3 baseline */
    int32_t device;          /* device ordinal the pointers live on */
    int32_t pack_order;      /* enum o4g_pack_order of qweight */
    int32_t tile;            /* O4G_PATH_WGMMA / O4G_PATH_MMA: index of the block shape (src/dispatch.rs,
                                WGMMA_TILES / MMA_SHAPES); the Rust plan chooses it, the C side only maps it */
    int32_t splits;          /* O4G_PATH_WGMMA / O4G_PATH_MMA (tiled shapes): blocks of a cluster that split K (1..8) */
} o4g_gemm_args;

/* The wgmma block shapes (instances/wgmma_b4.cu) and the largest K split. */
#define O4G_WGMMA_TILES 8
#define O4G_WGMMA_MAX_SPLITS 8

/* What the dispatch needs to know of a device, read once. */
typedef struct o4g_device_caps {
    int32_t major, minor;    /* compute capability (ROCm: gcnArch major/minor) */
    int32_t sms;             /* multiprocessors */
    /* Hopper builds on cc 9.0: clusters of the wgmma block shape `tile` split
     * `splits` ways that fit on the device at once (cudaOccupancyMaxActiveClusters,
     * which knows how the GPCs pack them); 0 elsewhere. */
    int32_t wgmma_cluster_slots[O4G_WGMMA_TILES][O4G_WGMMA_MAX_SPLITS];
} o4g_device_caps;

int o4g_get_device_caps(int32_t device, o4g_device_caps *caps);

/* out = a[:, perm] @ dequant(qweight) on `stream` (cudaStream_t / hipStream_t). */
int o4g_gemm(const o4g_gemm_args *args, void *stream);

/* Dense fp16 weights [k, n] for a vendor GEMM: row perm[r] (or r) = dequantized row r.
 * Uses args' qweight, qzeros, scales, g_idx, perm, k, n, groups, bits, zero_offset, device;
 * writes `weights` (contiguous [k, n] fp16) instead of `out`. */
int o4g_dequantize(const o4g_gemm_args *args, void *weights, void *stream);

/* gptq_shuffle's device half: dst row r (unpacked) = src row perm[r] (perm NULL: row r), packed in
 * `pack_order`; src and dst are distinct [k * bits / 32, n] buffers. */
int o4g_permute_rows(const int32_t *src, int32_t *dst, const int32_t *perm, int64_t k, int64_t n,
                     int32_t bits, int32_t pack_order, int32_t device, void *stream);

/* Blocks the host until `stream` drains: only for producers that cannot hand us a stream. */
int o4g_stream_synchronize(int32_t device, void *stream);

int o4g_device_count(int32_t *count);
/* Writes a NUL-terminated name of at most len bytes. */
int o4g_device_name(int32_t device, char *buf, int32_t len);
/* "cuda" or "rocm": what this library was compiled for. */
const char *o4g_platform(void);
/* Text of the last O4G_ERR_RUNTIME on this thread. */
const char *o4g_last_error(void);

#ifdef __cplusplus
}
#endif

#endif
