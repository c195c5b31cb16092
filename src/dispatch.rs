//! Which kernel serves a GEMM: the one table of that choice.
//!
//! - skinny: few rows; our deterministic column-strip kernel. Serves the g_idx
//!   ("alt", use_exllama=False) path and whatever the exllama family cannot.
//! - exllama: vLLM 0.3.3's kernel family for use_exllama=True, with the
//!   Opt4GPTQ switches of the chosen variant (csrc/gptq/gemm_exllama.cuh).
//! - tiled: many rows; weights dequantized per 64x64 tile, fp32 FMAs.
//! - mma: 4-bit exllama-layout weights on the tensor cores (CUDA builds):
//!   the fastest path where it applies, unless a variant is named (a named
//!   variant asks for the paper's exllama family).
//!
//! Row limits follow vLLM 0.3.3 (exllama up to 50 rows, 24 for 8-bit; the alt
//! kernel for few rows). They are provisional until benchmarks/bench_gemm.py
//! measures the crossovers on each GPU.

use crate::error::{Error, Result};
use crate::quant::GemmShape;

/// Mirrors enum o4g_path in csrc/opt4gptq.h.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum KernelPath {
    Skinny = 0,
    Tiled = 1,
    Exllama = 2,
    Mma = 3,
}

impl KernelPath {
    pub const ALL: [KernelPath; 4] = [KernelPath::Skinny, KernelPath::Tiled, KernelPath::Exllama, KernelPath::Mma];

    pub fn name(self) -> &'static str {
        match self {
            KernelPath::Skinny => "skinny",
            KernelPath::Tiled => "tiled",
            KernelPath::Exllama => "exllama",
            KernelPath::Mma => "mma",
        }
    }

    pub fn parse(name: &str) -> Result<KernelPath> {
        KernelPath::ALL
            .into_iter()
            .find(|path| path.name() == name)
            .ok_or_else(|| Error::value(format!("path must be 'skinny', 'tiled', 'exllama' or 'mma'; got {name:?}")))
    }
}

/// The paper's ablation: vLLM 0.3.3's kernel and the three optimizations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Baseline,
    Smb,
    Vml,
    Ila,
    Opt4gptq,
}

impl Variant {
    pub const ALL: [Variant; 5] = [Variant::Baseline, Variant::Smb, Variant::Vml, Variant::Ila, Variant::Opt4gptq];

    pub fn name(self) -> &'static str {
        match self {
            Variant::Baseline => "baseline",
            Variant::Smb => "smb",
            Variant::Vml => "vml",
            Variant::Ila => "ila",
            Variant::Opt4gptq => "opt4gptq",
        }
    }

    /// o4g_variant_flag bits (csrc/opt4gptq.h): 1 SMB, 2 VML, 4 ILA.
    pub fn flags(self) -> i32 {
        match self {
            Variant::Baseline => 0,
            Variant::Smb => 1,
            Variant::Vml => 2,
            Variant::Ila => 4,
            Variant::Opt4gptq => 7,
        }
    }

    /// Without SMB the exllama kernel splits K over blocks (vLLM 0.3.3's scheme);
    /// their shares meet in an fp16 [K blocks, M, N] workspace that the caller
    /// provides (`split_k_blocks`).
    pub fn splits_k(self) -> bool {
        self.flags() & 1 == 0
    }

    pub fn parse(name: &str) -> Result<Variant> {
        let names: Vec<_> = Variant::ALL.iter().map(|v| v.name()).collect();
        Variant::ALL
            .into_iter()
            .find(|variant| variant.name() == name)
            .ok_or_else(|| Error::value(format!("variant must be one of {names:?}; got {name:?}")))
    }
}

/// The variant used when the caller names none: the fastest one measured on
/// the platform. On NVIDIA a call that names no variant runs the tensor-core
/// path wherever it applies (4-bit), so this serves the rest (2/3/8-bit, odd
/// shapes); there `vml` is the fastest on the H100 at every bit width (Llama-2-7B
/// layers, benchmarks/results/h100/variants_bits: 1.00x baseline at M=1,
/// 1.04-1.18x at M=4..16, where opt4gptq is 0.64-1.01x). Every variant is bitwise
/// repeatable; `vml`, being split-K, gets a workspace from the caller
/// (`split_k_workspace`). On ROCm nothing is measured (no AMD GPU was
/// available): opt4gptq, the paper's choice for the DCU.
pub fn default_variant() -> Variant {
    if env!("O4G_BACKEND") == "cuda" { Variant::Vml } else { Variant::Opt4gptq }
}

/// Largest M served by the skinny kernel when the exllama family does not apply.
pub const SKINNY_MAX_ROWS: usize = 16;

/// Largest M served by the exllama family (vLLM 0.3.3: 50, 24 for 8-bit).
pub fn exllama_max_rows(bits: u32) -> usize {
    if bits == 8 { 24 } else { 50 }
}

/// From this many rows on, a torch GPU caller gets dequantize + torch.matmul
/// (cuBLAS / hipBLAS). Measured on the H100 (benchmarks/NOTES.md, Llama-2-7B
/// layers summed): dequantize + GEMM costs ~455 us at any M <= 64, the exllama
/// family (opt4gptq) 398 us at M=16 and 537 us at M=24 (crossover ~19), the
/// skinny kernel 445 us at M=4 and 719 us at M=8 (crossover ~4).
pub const DENSE_MIN_ROWS_EXLLAMA: usize = 20;
pub const DENSE_MIN_ROWS_G_IDX: usize = 5;

/// Largest M the tensor-core kernel serves by default. Measured on the H100
/// (layers summed, benchmarks/NOTES.md): from 129 rows the tiled batch kernel
/// runs three 64-row tiles at the same cost up to 192 rows, where it beats
/// dequantize + GEMM on every model measured (Llama-2-7B 411 against 495 us,
/// LLaMA-13B 554 against 674); with a fourth tile (224-256 rows) dense is ahead
/// (Llama-2-7B M=256 534 against 488 us). Layers the tiled kernel cannot take
/// (K not a multiple of 64, unaligned scales) fall back to the K-slice kernel
/// up to here, which is slower than dense from ~150 rows.
pub const MMA_MAX_ROWS: usize = 192;

/// The tensor-core kernel is compiled into CUDA builds only (mma.sync, sm_80+).
pub fn mma_built() -> bool {
    env!("O4G_BACKEND") == "cuda"
}

/// From how many rows a torch GPU caller gets dequantize + torch.matmul.
/// `mma_possible`: 4-bit exllama-layout weights, no variant named, CUDA build.
pub fn dense_min_rows(bits: u32, use_exllama: bool, variant_named: bool) -> usize {
    if use_exllama && bits == 4 && !variant_named && mma_built() {
        MMA_MAX_ROWS + 1
    } else if use_exllama {
        DENSE_MIN_ROWS_EXLLAMA
    } else {
        DENSE_MIN_ROWS_G_IDX
    }
}

/// What the exllama family needs beyond the shape: no per-row g_idx, whole
/// 32-row packs per group, and 16-byte aligned weights / 4-byte aligned output.
#[derive(Debug, Clone, Copy)]
pub struct Facts {
    pub use_exllama: bool,
    pub has_g_idx: bool,
    pub weights_aligned: bool,
    /// The caller named a variant (variant= or OPT4GPTQ_VARIANT): the exllama family serves it.
    pub variant_named: bool,
}

fn exllama_applies(shape: &GemmShape, facts: &Facts) -> bool {
    facts.use_exllama && !facts.has_g_idx && shape.group_size() % 32 == 0 && facts.weights_aligned
}

fn mma_applies(shape: &GemmShape, facts: &Facts) -> bool {
    mma_built() && exllama_applies(shape, facts) && shape.bits == 4 && shape.n % 32 == 0
}

pub fn choose_path(shape: &GemmShape, facts: &Facts) -> KernelPath {
    if mma_applies(shape, facts) && !facts.variant_named && shape.m <= MMA_MAX_ROWS {
        KernelPath::Mma
    } else if exllama_applies(shape, facts) && shape.m <= exllama_max_rows(shape.bits) {
        KernelPath::Exllama
    } else if shape.m <= SKINNY_MAX_ROWS {
        KernelPath::Skinny
    } else {
        KernelPath::Tiled
    }
}

/// Rows of K per block of the split-K exllama kernel (csrc/gptq/gemm_exllama.cuh).
pub const SPLIT_K_ROWS: usize = 128;

/// How many K blocks the split-K exllama kernel runs, so how many fp16 [M, N]
/// slices of shares its workspace holds.
pub fn split_k_blocks(k: usize) -> usize {
    k.div_ceil(SPLIT_K_ROWS)
}

/// Whether a call may run the split-K exllama kernel, and so needs an fp16
/// [K blocks, M, N] workspace: a split-K variant on the exllama path, forced or
/// within its row limit. Facts only the engine sees (alignment, group size) may
/// still send the call elsewhere; a workspace it did not need is only allocated.
pub fn may_split_k(
    m: usize,
    n: usize,
    bits: u32,
    use_exllama: bool,
    path: Option<KernelPath>,
    variant: Option<Variant>,
) -> bool {
    let mma_first = variant.is_none() && mma_built() && bits == 4 && n % 32 == 0 && m <= MMA_MAX_ROWS;
    let exllama = match path {
        Some(path) => path == KernelPath::Exllama,
        None => m <= exllama_max_rows(bits) && !mma_first,
    };
    let variant = variant.unwrap_or_else(default_variant);
    use_exllama && variant.splits_k() && exllama
}

/// A forced path must still be one that computes the right function.
pub fn check_forced_path(path: KernelPath, shape: &GemmShape, facts: &Facts) -> Result<()> {
    if path == KernelPath::Exllama && !exllama_applies(shape, facts) {
        return Err(Error::value(
            "path='exllama' needs use_exllama=True, group size a multiple of 32 and 16-byte aligned b_q_weight",
        ));
    }
    if path == KernelPath::Mma && !mma_applies(shape, facts) {
        return Err(Error::value(if mma_built() {
            "path='mma' needs bit=4, use_exllama=True, group size a multiple of 32, N a multiple of 32 and \
             16-byte aligned b_q_weight"
        } else {
            "path='mma' exists in CUDA builds only"
        }));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(m: usize, bits: u32, groups: usize) -> GemmShape {
        GemmShape { m, k: 4096, n: 4096, groups, bits, lda: 4096, zero_offset: 1 }
    }

    const EXLLAMA: Facts = Facts { use_exllama: true, has_g_idx: false, weights_aligned: true, variant_named: true };
    const ALT: Facts = Facts { use_exllama: false, has_g_idx: true, weights_aligned: true, variant_named: false };

    #[test]
    fn table_follows_vllm_row_limits() {
        assert_eq!(choose_path(&shape(1, 4, 32), &EXLLAMA), KernelPath::Exllama);
        assert_eq!(choose_path(&shape(50, 4, 32), &EXLLAMA), KernelPath::Exllama);
        assert_eq!(choose_path(&shape(51, 4, 32), &EXLLAMA), KernelPath::Tiled);
        assert_eq!(choose_path(&shape(24, 8, 32), &EXLLAMA), KernelPath::Exllama);
        assert_eq!(choose_path(&shape(25, 8, 32), &EXLLAMA), KernelPath::Tiled);
        assert_eq!(choose_path(&shape(8, 4, 32), &ALT), KernelPath::Skinny);
        assert_eq!(choose_path(&shape(17, 4, 32), &ALT), KernelPath::Tiled);
        // Groups of 16 rows do not fill a pack: the exllama family cannot serve them.
        assert_eq!(choose_path(&shape(4, 4, 256), &EXLLAMA), KernelPath::Skinny);
    }

    #[test]
    fn names_round_trip_and_bad_names_are_refused() {
        for variant in Variant::ALL {
            assert_eq!(Variant::parse(variant.name()).unwrap(), variant);
        }
        assert!(Variant::parse("fast").unwrap_err().to_string().contains("variant must be one of"));
        assert!(check_forced_path(KernelPath::Exllama, &shape(4, 4, 32), &ALT).is_err());
    }

    #[test]
    fn only_split_k_variants_on_the_exllama_path_need_a_workspace() {
        let split: Vec<_> = Variant::ALL.into_iter().filter(|v| v.splits_k()).map(Variant::name).collect();
        assert_eq!(split, ["baseline", "vml", "ila"]);
        assert!(may_split_k(50, 64, 4, true, None, Some(Variant::Vml)));
        assert!(!may_split_k(51, 64, 4, true, None, Some(Variant::Vml)));
        assert!(!may_split_k(25, 64, 8, true, None, Some(Variant::Baseline)));
        assert!(may_split_k(300, 64, 4, true, Some(KernelPath::Exllama), Some(Variant::Ila)));
        assert!(!may_split_k(1, 64, 4, true, Some(KernelPath::Skinny), Some(Variant::Baseline)));
        assert!(!may_split_k(1, 64, 4, false, None, Some(Variant::Baseline)));
        assert!(!may_split_k(1, 64, 4, true, None, Some(Variant::Smb)));
        // No variant named: the platform default, behind the tensor-core path where that applies.
        let cuda = mma_built();
        assert_eq!(default_variant(), if cuda { Variant::Vml } else { Variant::Opt4gptq });
        assert_eq!(may_split_k(8, 64, 8, true, None, None), cuda);
        assert!(!may_split_k(8, 64, 4, true, None, None));
        assert_eq!(may_split_k(8, 48, 4, true, None, None), cuda);
    }

    #[test]
    fn the_tensor_core_path_is_chosen_only_where_it_exists_and_no_variant_is_named() {
        let unnamed = Facts { variant_named: false, ..EXLLAMA };
        let expected = if mma_built() { KernelPath::Mma } else { KernelPath::Exllama };
        assert_eq!(choose_path(&shape(1, 4, 32), &unnamed), expected);
        assert_eq!(choose_path(&shape(1, 4, 32), &EXLLAMA), KernelPath::Exllama);
        // 8-bit weights have no tensor-core kernel.
        assert_eq!(choose_path(&shape(1, 8, 32), &unnamed), KernelPath::Exllama);
        assert_eq!(check_forced_path(KernelPath::Mma, &shape(1, 4, 32), &unnamed).is_ok(), mma_built());
        assert_eq!(dense_min_rows(4, true, false), if mma_built() { MMA_MAX_ROWS + 1 } else { DENSE_MIN_ROWS_EXLLAMA });
    }
}
