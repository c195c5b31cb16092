//! Which kernel serves a GEMM: the one table of that choice.
//!
//! - skinny: few rows; our deterministic column-strip kernel. Serves the g_idx
//!   ("alt", use_exllama=False) path and whatever the exllama family cannot.
//! - exllama: vLLM 0.3.3's kernel family for use_exllama=True, with the
//!   Opt4GPTQ switches of the chosen variant (csrc/gptq/gemm_exllama.cuh).
//! - tiled: many rows; weights dequantized per 64x64 tile, fp32 FMAs.
//! - mma: 4-bit exllama-layout weights on the tensor cores (CUDA builds,
//!   mma.sync, sm_80+), unless a variant is named (a named variant asks for
//!   the paper's exllama family).
//! - wgmma: the same weights on Hopper's warpgroup tensor cores (sm_90a), for
//!   every number of rows: where it applies it replaces mma and dense.
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
    Wgmma = 4,
}

impl KernelPath {
    pub const ALL: [KernelPath; 5] =
        [KernelPath::Skinny, KernelPath::Tiled, KernelPath::Exllama, KernelPath::Mma, KernelPath::Wgmma];

    pub fn name(self) -> &'static str {
        match self {
            KernelPath::Skinny => "skinny",
            KernelPath::Tiled => "tiled",
            KernelPath::Exllama => "exllama",
            KernelPath::Mma => "mma",
            KernelPath::Wgmma => "wgmma",
        }
    }

    pub fn parse(name: &str) -> Result<KernelPath> {
        KernelPath::ALL.into_iter().find(|path| path.name() == name).ok_or_else(|| {
            Error::value(format!("path must be 'skinny', 'tiled', 'exllama', 'mma' or 'wgmma'; got {name:?}"))
        })
    }
}

/// What the dispatch needs to know of a GPU, read once per device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceCaps {
    /// The build carries sm_90a code and the device is compute capability 9.0.
    pub wgmma: bool,
    pub sms: usize,
    /// Thread-block clusters (compute capability 9.0 and newer): the tiled
    /// mma kernel may split K over a cluster's blocks.
    pub clusters: bool,
    /// Clusters of wgmma block shape t split s ways resident at once, at
    /// [t][s - 1], as the device reports them (0: not asked, see `cluster_slots`).
    pub wgmma_cluster_slots: [[u16; WGMMA_MAX_SPLITS]; WGMMA_TILES.len()],
}

impl DeviceCaps {
    /// A device known only by its SM count (tests, and devices without wgmma).
    pub const fn with_sms(wgmma: bool, sms: usize) -> DeviceCaps {
        DeviceCaps { wgmma, sms, clusters: wgmma, wgmma_cluster_slots: [[0; WGMMA_MAX_SPLITS]; WGMMA_TILES.len()] }
    }

    /// Clusters of `tile` split `splits` ways that run at once. The device's
    /// answer knows how its GPCs pack clusters (on the H200, 32 clusters of 4
    /// do not fit at once where 42 of 3 do); without it, an even share of the SMs.
    pub fn cluster_slots(&self, tile: usize, splits: usize) -> usize {
        match self.wgmma_cluster_slots[tile][splits - 1] {
            0 => (self.sms * WGMMA_TILES[tile].blocks_per_sm / splits).max(1),
            known => known as usize,
        }
    }
}

/// The Hopper kernel's block shapes, in the order of csrc/gptq/instances/wgmma_b4.cu,
/// with how the plan splits K for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WgmmaTile {
    /// Rows of `a` per block (wgmma's N).
    pub tokens: usize,
    /// k per pipeline stage.
    pub stage_k: usize,
    /// Blocks resident per SM (the kernel's launch bounds).
    pub blocks_per_sm: usize,
}

/// Block shapes: the smallest that holds a call's rows serves it (256 rows
/// per block beyond), one block per SM; the last two are the 16- and 32-row
/// blocks two to an SM (6 stages each), which the plan takes where they
/// finish first (`wgmma_plan`).
pub const WGMMA_TILES: [WgmmaTile; 8] = [
    WgmmaTile { tokens: 8, stage_k: 128, blocks_per_sm: 1 },
    WgmmaTile { tokens: 16, stage_k: 128, blocks_per_sm: 1 },
    WgmmaTile { tokens: 32, stage_k: 128, blocks_per_sm: 1 },
    WgmmaTile { tokens: 64, stage_k: 128, blocks_per_sm: 1 },
    WgmmaTile { tokens: 128, stage_k: 128, blocks_per_sm: 1 },
    WgmmaTile { tokens: 256, stage_k: 64, blocks_per_sm: 1 },
    WgmmaTile { tokens: 16, stage_k: 128, blocks_per_sm: 2 },
    WgmmaTile { tokens: 32, stage_k: 128, blocks_per_sm: 2 },
];

/// Below this many rows the mma.sync decode kernel (gemm_mma.cuh) is faster
/// than the wgmma family on the H200 (Llama-2-7B layers summed: M=1 57 us
/// against 120), so Hopper keeps it there. At 16 rows wgmma wins on the large
/// layers since its two-tensor-copy stages (H200 sweep: 4096x22016 38.6 us
/// against mma's 46.7, 11008x4096 22.0 against 22.4) and loses 0.5 us on
/// 4096x4096 (11.4 against 10.9): benchmarks/NOTES.md, "mma or wgmma at 9-16 rows".
pub const WGMMA_MIN_ROWS: usize = 9;

/// Columns per wgmma block: two consumer warpgroups of 64.
pub const WGMMA_COLUMNS: usize = 128;

/// The most blocks of a cluster that may split K (the portable cluster size).
pub const WGMMA_MAX_SPLITS: usize = 8;

/// Which block shape and K split serve an (m, n, k) problem on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WgmmaPlan {
    pub tile: usize,
    pub splits: usize,
}

/// OPT4GPTQ_WGMMA_TUNING="tile=I,splits=S" (either part may be left out)
/// overrides the plan, for benchmarks and tests that compare block shapes.
/// Read on every call (a getenv is well under a launch's cost). A value the
/// kernels cannot run (a tile index out of range, splits outside 1..8 or more
/// than K's stages) is an error naming the variable.
pub fn tuned_wgmma_plan(plan: WgmmaPlan, k: usize) -> Result<WgmmaPlan> {
    let Ok(text) = std::env::var("OPT4GPTQ_WGMMA_TUNING") else { return Ok(plan) };
    let mut tuned = plan;
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || Error::value(format!("OPT4GPTQ_WGMMA_TUNING: cannot read {part:?} (expected tile=I or splits=S)"));
        let (key, value) = part.split_once('=').ok_or_else(bad)?;
        let value: usize = value.trim().parse().map_err(|_| bad())?;
        match key.trim() {
            "tile" => tuned.tile = value,
            "splits" => tuned.splits = value,
            _ => return Err(bad()),
        }
    }
    let tiles = WGMMA_TILES.len();
    if tuned.tile >= tiles {
        return Err(Error::value(format!("OPT4GPTQ_WGMMA_TUNING: tile must be below {tiles}; got {}", tuned.tile)));
    }
    let stages = k / WGMMA_TILES[tuned.tile].stage_k;
    if !(1..=WGMMA_MAX_SPLITS.min(stages.max(1))).contains(&tuned.splits) {
        return Err(Error::value(format!(
            "OPT4GPTQ_WGMMA_TUNING: splits must be 1..={} for this K; got {}",
            WGMMA_MAX_SPLITS.min(stages.max(1)),
            tuned.splits
        )));
    }
    Ok(tuned)
}

/// The smallest block that holds all rows (256 rows per block beyond), and
/// the K split whose waves finish first (`plan_cost`). Each block keeps at
/// least two stages.
pub fn wgmma_plan(m: usize, n: usize, k: usize, caps: &DeviceCaps) -> WgmmaPlan {
    let tile = WGMMA_TILES.iter().position(|t| t.tokens >= m && t.blocks_per_sm == 1).unwrap_or(5);
    let shape = WGMMA_TILES[tile];
    let blocks = n.div_ceil(WGMMA_COLUMNS) * m.max(1).div_ceil(shape.tokens);
    let stages = k / shape.stage_k;
    let most = WGMMA_MAX_SPLITS.min((stages / 2).max(1));
    let cost = |splits: usize| plan_cost(blocks, stages, splits, caps.cluster_slots(tile, splits), shape.tokens);
    let splits = (2..=most).fold(1, |best, splits| if cost(splits) < cost(best) { splits } else { best });
    // The same rows two blocks to an SM, at the same split, where that ends
    // sooner: an SM then streams its blocks' stages back to back and pays
    // one fill, where one block per SM pays a fill per wave. Measured on the
    // H200 (benchmarks/NOTES.md, "who copies the weights"): 4096x22016 at 16
    // rows, split 2 (344 blocks), 37.7 us against 43.3; where every block has
    // an SM of its own (11008x4096, 96 blocks) a lone SM's pair is slower
    // (29.9 against 26.6), and the model ties there, so one block stays.
    let paired = WGMMA_TILES.iter().position(|t| t.tokens == shape.tokens && t.blocks_per_sm == 2);
    if let Some(paired) = paired {
        let one = cost(splits);
        let two = paired_cost(blocks, stages, splits, caps.sms, shape.tokens);
        if two < one {
            return WgmmaPlan { tile: paired, splits };
        }
    }
    WgmmaPlan { tile, splits }
}

/// Modeled time, in stages, of `blocks` output tiles of `splits` blocks
/// each, two blocks to an SM: the busiest SM runs
/// its blocks' shares of K one after another at the SM's bandwidth (the
/// pair shares it), plus one fill and the cluster's reduction.
pub fn paired_cost(blocks: usize, stages: usize, splits: usize, sms: usize, tokens: usize) -> f64 {
    let per_sm = (blocks * splits).div_ceil(sms.max(1));
    let reduction = (splits - 1) as f64 * tokens as f64 / 64.0;
    per_sm as f64 * stages as f64 / splits as f64 + WGMMA_FILL_STAGES + reduction
}

/// Stages a block spends beyond its share of K: filling the ring and draining it.
const WGMMA_FILL_STAGES: f64 = 3.0;

/// Modeled time of a plan, in stages: the output tiles run in waves of
/// `slots` clusters, each wave as long as one block's share of K plus the
/// fill, plus the cluster's reduction (each further rank adds a partial
/// tile of `tokens` x 128 fp32 through distributed shared memory, about a
/// stage per 64 tokens). It ranks the splits of every layer in the H200
/// sweep as measured (benchmarks/NOTES.md, "whole waves"): 4096 columns at
/// 64 rows (32 tiles): 3 < 6 < 2 < 8 < 4 < 1, where 4 loses because 32
/// clusters of 4 need two waves.
pub fn plan_cost(blocks: usize, stages: usize, splits: usize, slots: usize, tokens: usize) -> f64 {
    let waves = blocks.div_ceil(slots.max(1));
    let reduction = (splits - 1) as f64 * tokens as f64 / 64.0;
    waves as f64 * (stages as f64 / splits as f64 + WGMMA_FILL_STAGES + reduction)
}

/// The mma.sync kernels' block shapes, in the order of the switch in
/// csrc/gptq/instances/mma_b4.cu (o4g_gemm_args.tile on the mma path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmaKernel {
    /// The K-slice kernel (gemm_mma.cuh): `warps` warps per block, `col_warps`
    /// of them side by side on 32-column strips (the others slice K), and
    /// `token_tiles` tiles of 8 rows per block.
    Slices { warps: usize, col_warps: usize, token_tiles: usize },
    /// The tiled batch kernel (gemm_mma_tiled.cuh): 64 x 128 tiles, two
    /// K-warps of `packs` 32-row packs each per stage (64 * packs of K), K
    /// split over cluster blocks.
    Tiled { packs: usize },
}

pub const MMA_SHAPES: [MmaKernel; 12] = [
    MmaKernel::Slices { warps: 16, col_warps: 1, token_tiles: 1 },
    MmaKernel::Slices { warps: 16, col_warps: 1, token_tiles: 2 },
    MmaKernel::Slices { warps: 16, col_warps: 2, token_tiles: 1 },
    MmaKernel::Slices { warps: 16, col_warps: 2, token_tiles: 2 },
    MmaKernel::Slices { warps: 4, col_warps: 1, token_tiles: 2 },
    MmaKernel::Slices { warps: 8, col_warps: 1, token_tiles: 2 },
    MmaKernel::Slices { warps: 8, col_warps: 2, token_tiles: 2 },
    MmaKernel::Slices { warps: 4, col_warps: 4, token_tiles: 2 },
    MmaKernel::Slices { warps: 8, col_warps: 4, token_tiles: 2 },
    MmaKernel::Slices { warps: 16, col_warps: 4, token_tiles: 2 },
    MmaKernel::Tiled { packs: 1 },
    MmaKernel::Tiled { packs: 2 },
];

/// Rows and columns of the tiled kernel's output tile; its largest K split.
const MMA_TILE_ROWS: usize = 64;
const MMA_TILE_COLUMNS: usize = 128;
const MMA_MAX_SPLITS: usize = 8;

/// Which mma.sync kernel and block shape serve a call (index into
/// MMA_SHAPES), and over how many cluster blocks the tiled kernel splits K.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmaPlan {
    pub shape: usize,
    pub splits: usize,
}

/// What the mma plan needs to know besides the shape: whether the tiled
/// kernel can read the operands (16-byte aligned activation rows without a
/// permutation, 16-byte aligned scales and zeros).
#[derive(Debug, Clone, Copy)]
pub struct MmaOperands {
    pub tiled_readable: bool,
}

fn mma_shape_index(kernel: MmaKernel) -> Option<usize> {
    MMA_SHAPES.iter().position(|&shape| shape == kernel)
}

/// Whole waves: with `a` or `b` blocks of one per SM, whether `a` keeps as
/// large a share of the SM slots busy as `b` (a / ceil(a / sms) >= b / ceil(b / sms)).
fn fills_as_well(a: usize, b: usize, sms: usize) -> bool {
    let (waves_a, waves_b) = (a.div_ceil(sms), b.div_ceil(sms));
    a * waves_b >= b * waves_a
}

/// The tiled kernel's shape and split for a call: two packs per K-warp and stage where K
/// allows (H100: 10-12% faster than one, Llama-2-7B M=128 297 vs 334 us), and
/// K split over enough cluster blocks that every SM gets one (at most 8, the
/// portable cluster size, and at most one stage per block).
fn mma_tiled_plan(m: usize, n: usize, k: usize, caps: &DeviceCaps) -> MmaPlan {
    let packs = if k % 128 == 0 { 2 } else { 1 };
    let tiles = n.div_ceil(MMA_TILE_COLUMNS) * m.max(1).div_ceil(MMA_TILE_ROWS);
    let splits = if caps.clusters { caps.sms.div_ceil(tiles).min(MMA_MAX_SPLITS).min(k / (64 * packs)).max(1) } else { 1 };
    MmaPlan { shape: mma_shape_index(MmaKernel::Tiled { packs }).expect("tiled shapes are listed"), splits }
}

/// Measured on the H100 (benchmarks/NOTES.md, Llama-2-7B and Qwen1.5-1.8B layers):
/// - up to 16 rows: 16 warps per block (M=1: 63 us summed against 67 with 8
///   warps and 81 with 4), on 64 columns (2 column warps x 8 K slices) where
///   half as many blocks fill the GPU's waves as well as 32-column blocks do,
///   else on 32 (16 K slices): 64 columns are 10-20% faster where both fill
///   alike (4096x22016 M=1 25.1 vs 29.1 us) and slower where they leave SMs
///   idle (4096x12288 16.5 vs 15.6); one 8-row token tile up to 8 rows;
/// - the tiled kernel where its 64-row tiles are full enough: 58..64 rows on
///   12288+ columns (4096x22016 M=64 75 vs 91 us; on narrower layers it
///   loses), 96..128 rows on every layer (Llama-2-7B M=128 297 vs 408 us),
///   129..192 rows on every layer (three tiles; dense is ahead beyond,
///   MMA_MAX_ROWS);
/// - otherwise, N > 4096: 4 warps (M=64: 224 us against 305 with 16);
///   N <= 4096: 16 warps, 2 side by side on 64 columns sharing their
///   activations through L1 (4096x4096 M=64 19.9 vs 23.7 us).
pub fn mma_plan(m: usize, n: usize, k: usize, caps: &DeviceCaps, operands: MmaOperands) -> MmaPlan {
    let slices = |warps, col_warps| MmaPlan {
        shape: mma_shape_index(MmaKernel::Slices { warps, col_warps, token_tiles: slice_token_tiles(m, warps, col_warps) })
            .expect("table shapes are listed"),
        splits: 1,
    };
    if m <= 16 {
        let wide = fills_as_well(n.div_ceil(64), n / 32, caps.sms.max(1));
        return slices(16, if wide { 2 } else { 1 });
    }
    let tiles = m.div_ceil(MMA_TILE_ROWS);
    let tiled_rows = tiles * MMA_TILE_ROWS;
    let full_enough = match tiles {
        1 => 10 * m >= 9 * tiled_rows,
        2 => 4 * m >= 3 * tiled_rows,
        _ => true,
    };
    let wide_enough = tiles > 1 || n >= 12288;
    if mma_tiled_readable(k, operands) && full_enough && wide_enough {
        mma_tiled_plan(m, n, k, caps)
    } else if n <= 4096 {
        slices(16, 2)
    } else {
        slices(4, 1)
    }
}

/// Token tiles (8 rows each) per K-slice block: one is enough up to 8 rows
/// for the 16-warp shapes on 32 or 64 columns (the decode shapes), else two.
fn slice_token_tiles(m: usize, warps: usize, col_warps: usize) -> usize {
    if warps == 16 && col_warps <= 2 && m <= 8 { 1 } else { 2 }
}

fn mma_tiled_readable(k: usize, operands: MmaOperands) -> bool {
    operands.tiled_readable && k % 64 == 0
}

/// OPT4GPTQ_MMA_TUNING="kernel=slices|tiled,cols=32|64|128,warps=4|8|16,split=1..8,packs=1"
/// (any part may be left out) replaces the table's choice, for measuring
/// kernels against each other. `kernel=tiled` applies where the tiled kernel
/// can read the operands (else the table's K-slice choice stays), `split` is
/// capped by what K allows; a K-slice shape that has no instance is an error.
pub fn tuned_mma_plan(
    plan: MmaPlan,
    m: usize,
    n: usize,
    k: usize,
    caps: &DeviceCaps,
    operands: MmaOperands,
) -> Result<MmaPlan> {
    match std::env::var("OPT4GPTQ_MMA_TUNING") {
        Ok(text) => apply_mma_tuning(&text, plan, m, n, k, caps, operands),
        Err(_) => Ok(plan),
    }
}

fn apply_mma_tuning(
    text: &str,
    plan: MmaPlan,
    m: usize,
    n: usize,
    k: usize,
    caps: &DeviceCaps,
    operands: MmaOperands,
) -> Result<MmaPlan> {
    let bad = |what: String| Error::value(format!("OPT4GPTQ_MMA_TUNING: {what}"));
    let (mut kernel, mut cols, mut warps, mut split, mut one_pack) = (None, None, None, None, false);
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = part.split_once('=').ok_or_else(|| bad(format!("cannot read {part:?}")))?;
        let number = || value.parse::<usize>().map_err(|_| bad(format!("cannot read {part:?}")));
        match key {
            "kernel" if value == "slices" || value == "tiled" => kernel = Some(value == "tiled"),
            "cols" => cols = Some(number()?),
            "warps" => warps = Some(number()?),
            "split" => split = Some(number()?),
            "packs" if value == "1" => one_pack = true,
            _ => return Err(bad(format!("cannot read {part:?} (kernel=slices|tiled, cols=, warps=, split=, packs=1)"))),
        }
    }
    let current = MMA_SHAPES[plan.shape];
    let tiled = match kernel {
        Some(true) => mma_tiled_readable(k, operands),
        Some(false) => false,
        None => matches!(current, MmaKernel::Tiled { .. }),
    };
    if tiled {
        let mut tuned = mma_tiled_plan(m, n, k, caps);
        if one_pack {
            tuned.shape = mma_shape_index(MmaKernel::Tiled { packs: 1 }).expect("listed");
        }
        let MmaKernel::Tiled { packs } = MMA_SHAPES[tuned.shape] else { unreachable!("a tiled shape") };
        if let Some(split) = split {
            if split == 0 {
                return Err(bad("split must be 1 or more".to_string()));
            }
            tuned.splits = if caps.clusters { split.min(MMA_MAX_SPLITS).min(k / (64 * packs)).max(1) } else { 1 };
        }
        return Ok(tuned);
    }
    let (mut w, mut c) = match (kernel, current) {
        (None, MmaKernel::Slices { warps, col_warps, .. }) => (warps, col_warps),
        _ => (if m <= 16 { 16 } else { 4 }, 1),
    };
    if let Some(cols) = cols {
        c = cols / 32;
    }
    if let Some(warps) = warps {
        w = warps;
    }
    let kernel = MmaKernel::Slices { warps: w, col_warps: c, token_tiles: slice_token_tiles(m, w, c) };
    let shape = mma_shape_index(kernel).ok_or_else(|| {
        bad(format!("no K-slice kernel with {} columns and {w} warps (32/64/128 columns with 4/8/16 warps)", 32 * c))
    })?;
    Ok(MmaPlan { shape, splits: 1 })
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
/// 32-row packs per group, and 16-byte aligned weights / 4-byte aligned output;
/// and what the wgmma family needs besides.
#[derive(Debug, Clone, Copy)]
pub struct Facts {
    pub use_exllama: bool,
    pub has_g_idx: bool,
    pub weights_aligned: bool,
    /// The caller named a variant (variant= or OPT4GPTQ_VARIANT): the exllama family serves it.
    pub variant_named: bool,
    /// An act-order permutation the kernel must read the activations through
    /// (torch callers' activations arrive gathered: none).
    pub has_perm: bool,
    /// Contiguous-row activations at 16-byte aligned rows, 16-byte aligned
    /// scales and zeros, 8-byte aligned output: what the copy engine needs.
    pub bulk_aligned: bool,
    /// The device runs the Hopper kernels (None: a CPU array).
    pub caps: Option<DeviceCaps>,
}

fn exllama_applies(shape: &GemmShape, facts: &Facts) -> bool {
    facts.use_exllama && !facts.has_g_idx && shape.group_size() % 32 == 0 && facts.weights_aligned
}

fn mma_applies(shape: &GemmShape, facts: &Facts) -> bool {
    mma_built() && exllama_applies(shape, facts) && shape.bits == 4 && shape.n % 32 == 0
}

fn wgmma_applies(shape: &GemmShape, facts: &Facts) -> bool {
    facts.caps.is_some_and(|caps| caps.wgmma)
        && exllama_applies(shape, facts)
        && shape.bits == 4
        && !facts.has_perm
        && facts.bulk_aligned
        && shape.n % WGMMA_COLUMNS == 0
        && shape.k % 128 == 0
}

/// Whether a call with these operands would take the wgmma path unless a
/// variant is named: Python asks this (through dense_min_rows) to skip the
/// dense path, and gathers act-order activations first so that it applies.
pub fn wgmma_serves(bits: u32, use_exllama: bool, n: usize, k: usize, caps: Option<DeviceCaps>) -> bool {
    caps.is_some_and(|caps| caps.wgmma) && use_exllama && bits == 4 && n % WGMMA_COLUMNS == 0 && k % 128 == 0
}

pub fn choose_path(shape: &GemmShape, facts: &Facts) -> KernelPath {
    if wgmma_applies(shape, facts) && !facts.variant_named && (shape.m >= WGMMA_MIN_ROWS || !mma_applies(shape, facts)) {
        KernelPath::Wgmma
    } else if mma_applies(shape, facts) && !facts.variant_named && shape.m <= MMA_MAX_ROWS {
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
    if path == KernelPath::Wgmma && !wgmma_applies(shape, facts) {
        return Err(Error::value(
            "path='wgmma' needs a Hopper GPU (compute capability 9.0) with a build carrying sm_90a, bit=4, \
             use_exllama=True, group size a multiple of 32, N and K multiples of 128, activations without a \
             permutation in 16-byte aligned rows (torch callers' act-order activations are gathered first), \
             16-byte aligned weights, scales and zeros",
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

    const EXLLAMA: Facts = Facts {
        use_exllama: true,
        has_g_idx: false,
        weights_aligned: true,
        variant_named: true,
        has_perm: false,
        bulk_aligned: true,
        caps: None,
    };
    const ALT: Facts = Facts { use_exllama: false, has_g_idx: true, ..EXLLAMA };
    const HOPPER: DeviceCaps = DeviceCaps::with_sms(true, 132);

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

    #[test]
    fn hopper_takes_every_row_count_where_its_kernel_applies() {
        let hopper = Facts { variant_named: false, caps: Some(HOPPER), ..EXLLAMA };
        for m in [WGMMA_MIN_ROWS, 32, 64, 192, 193, 1024, 4096] {
            assert_eq!(choose_path(&shape(m, 4, 32), &hopper), KernelPath::Wgmma, "m={m}");
        }
        // Below that the mma.sync decode kernel (CUDA builds) is faster.
        let decode = choose_path(&shape(1, 4, 32), &hopper);
        assert_eq!(decode, if mma_built() { KernelPath::Mma } else { KernelPath::Wgmma });
        // A named variant, a permutation the kernel would have to gather, or another GPU: not wgmma.
        assert_ne!(choose_path(&shape(4, 4, 32), &Facts { variant_named: true, ..hopper }), KernelPath::Wgmma);
        assert_ne!(choose_path(&shape(4, 4, 32), &Facts { has_perm: true, ..hopper }), KernelPath::Wgmma);
        let ampere = Facts { caps: Some(DeviceCaps::with_sms(false, 108)), ..hopper };
        assert_ne!(choose_path(&shape(4, 4, 32), &ampere), KernelPath::Wgmma);
        assert!(check_forced_path(KernelPath::Wgmma, &shape(4, 4, 32), &ampere).is_err());
        // 8-bit weights have no wgmma kernel yet.
        assert_ne!(choose_path(&shape(1, 8, 32), &hopper), KernelPath::Wgmma);
    }

    #[test]
    fn wgmma_plan_splits_k_into_the_waves_that_finish_first() {
        let plan = |m, n, k| wgmma_plan(m, n, k, &HOPPER);
        // 4096 columns are 32 column tiles: split K until they fill the GPU.
        assert_eq!(plan(1, 4096, 4096), WgmmaPlan { tile: 0, splits: 4 });
        assert_eq!(plan(64, 4096, 4096), WgmmaPlan { tile: 3, splits: 4 });
        // ... unless the device says 32 clusters of 4 do not fit at once (the H200).
        let mut h200 = HOPPER;
        h200.wgmma_cluster_slots[3][3] = 31;
        assert_eq!(wgmma_plan(64, 4096, 4096, &h200), WgmmaPlan { tile: 3, splits: 3 });
        // 172 tiles (22016 columns) at 128 rows: 3 waves of halves beat 2 of wholes.
        assert_eq!(plan(128, 22016, 4096), WgmmaPlan { tile: 4, splits: 2 });
        // Many tiles: the reduction costs more than the last wave's idle SMs.
        assert_eq!(plan(1024, 4096, 4096), WgmmaPlan { tile: 5, splits: 1 });
        assert_eq!(plan(1024, 22016, 4096), WgmmaPlan { tile: 5, splits: 1 });
        // Row tiles: the smallest block that holds M, 256 rows per block beyond.
        assert_eq!(plan(9, 4096, 4096).tile, 1);
        assert_eq!(plan(100, 4096, 4096).tile, 4);
        // Every block keeps at least two stages of K.
        assert_eq!(plan(1, 128, 256).splits, 1);
        for (index, tile) in WGMMA_TILES.iter().enumerate().filter(|(_, t)| t.blocks_per_sm == 1) {
            assert_eq!(plan(tile.tokens, 4096, 4096).tile, index);
        }
    }

    #[test]
    fn two_blocks_per_sm_where_one_per_sm_leaves_a_ragged_last_wave() {
        let mut h200 = HOPPER;
        h200.wgmma_cluster_slots[1][1] = 66;
        h200.wgmma_cluster_slots[1][2] = 40;  // as the H200 reports: its plan at 16 rows is split 2
        // 4096x22016 at 16 rows: 344 blocks of split 2 take 2.6 waves one to an SM.
        assert_eq!(wgmma_plan(16, 22016, 4096, &h200), WgmmaPlan { tile: 6, splits: 2 });
        assert_eq!(WGMMA_TILES[6], WgmmaTile { tokens: 16, stage_k: 128, blocks_per_sm: 2 });
        // 11008x4096 and 4096x4096: every block has an SM of its own; one block per SM stays.
        assert_eq!(wgmma_plan(16, 4096, 11008, &h200).tile, 1);
        assert_eq!(wgmma_plan(16, 4096, 4096, &h200).tile, 1);
        // 64 rows and more have no paired shape.
        assert_eq!(wgmma_plan(64, 22016, 4096, &h200).tile, 3);
    }

    #[test]
    fn mma_plan_follows_the_h100_measurements() {
        let h100 = DeviceCaps { clusters: true, ..DeviceCaps::with_sms(false, 132) };
        let readable = MmaOperands { tiled_readable: true };
        let plan = |m, n, k| MMA_SHAPES[mma_plan(m, n, k, &h100, readable).shape];
        let slices = |warps, col_warps, token_tiles| MmaKernel::Slices { warps, col_warps, token_tiles };
        // Decode: 16 warps; 64 columns where half as many blocks fill the waves as well.
        assert_eq!(plan(1, 4096, 4096), slices(16, 1, 1));
        assert_eq!(plan(1, 22016, 4096), slices(16, 2, 1));
        assert_eq!(plan(16, 22016, 4096), slices(16, 2, 2));
        // One nearly full 64-row tile on a wide layer, or two or more tiles: the tiled kernel.
        assert_eq!(plan(64, 22016, 4096), MmaKernel::Tiled { packs: 2 });
        assert_eq!(plan(57, 22016, 4096), slices(4, 1, 2));
        assert_eq!(plan(64, 4096, 4096), slices(16, 2, 2));
        assert_eq!(plan(64, 11008, 4096), slices(4, 1, 2));
        assert_eq!(plan(128, 4096, 4096), MmaKernel::Tiled { packs: 2 });
        assert_eq!(plan(128, 4096, 4032), MmaKernel::Tiled { packs: 1 });
        // 32 x 2 tiles: K split 3 ways so that every SM gets a block.
        assert_eq!(mma_plan(128, 4096, 4096, &h100, readable).splits, 3);
        // Without clusters (A100) K is not split; operands the tiled kernel cannot read keep the K-slice kernel.
        assert_eq!(mma_plan(128, 4096, 4096, &DeviceCaps::with_sms(false, 108), readable).splits, 1);
        let gathered = MmaOperands { tiled_readable: false };
        assert_eq!(MMA_SHAPES[mma_plan(128, 4096, 4096, &h100, gathered).shape], slices(16, 2, 2));
    }

    #[test]
    fn mma_tuning_names_a_listed_shape_or_is_refused() {
        let h100 = DeviceCaps { clusters: true, ..DeviceCaps::with_sms(false, 132) };
        let readable = MmaOperands { tiled_readable: true };
        let tune = |text: &str, m, k| {
            let plan = mma_plan(m, 512, k, &h100, readable);
            apply_mma_tuning(text, plan, m, 512, k, &h100, readable).map(|p| (MMA_SHAPES[p.shape], p.splits))
        };
        let slices = |warps, col_warps, token_tiles| MmaKernel::Slices { warps, col_warps, token_tiles };
        assert_eq!(tune("cols=128,warps=4", 5, 1024).unwrap(), (slices(4, 4, 2), 1));
        assert_eq!(tune("cols=64,warps=16", 5, 1024).unwrap(), (slices(16, 2, 1), 1));
        assert_eq!(tune("kernel=slices", 100, 1024).unwrap(), (slices(4, 1, 2), 1));
        assert_eq!(tune("kernel=tiled,split=8", 5, 1024).unwrap(), (MmaKernel::Tiled { packs: 2 }, 8));
        assert_eq!(tune("kernel=tiled,packs=1,split=3", 5, 1024).unwrap(), (MmaKernel::Tiled { packs: 1 }, 3));
        // Splits are capped at one stage per block.
        assert_eq!(tune("kernel=tiled,split=8", 5, 256).unwrap(), (MmaKernel::Tiled { packs: 2 }, 2));
        // The tiled kernel cannot take K = 32: the table's K-slice choice stays.
        assert!(matches!(tune("kernel=tiled", 5, 32).unwrap().0, MmaKernel::Slices { .. }));
        for bad in ["cols=64,warps=4", "kernel=fast", "warps", "split=0,kernel=tiled"] {
            assert!(tune(bad, 5, 1024).unwrap_err().to_string().contains("OPT4GPTQ_MMA_TUNING"), "{bad}");
        }
    }

    #[test]
    fn a_wave_costs_its_longest_block() {
        // 33 blocks on 32 slots take two waves: twice one wave's time.
        assert_eq!(plan_cost(33, 32, 1, 32, 64), 2.0 * plan_cost(32, 32, 1, 32, 64));
        // Splitting shortens the blocks' K share and adds a reduction.
        assert!(plan_cost(32, 32, 2, 32, 64) < plan_cost(32, 32, 1, 32, 64));
        assert!(plan_cost(32, 32, 2, 32, 256) > plan_cost(32, 32, 2, 32, 16));
    }
}
