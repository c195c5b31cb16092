//! The two kernels and the instruction-set dispatch.
//!
//! - direct (M <= DIRECT_MAX_ROWS, 2/4/8-bit weights in stored order): each
//!   weight is used by so few rows that a dequantized tile would cost more than
//!   it saves; each field is converted once in registers and fed to the fma
//!   chains of up to 4 rows, several panels at a time so that enough
//!   independent chains hide the fma latency; the group sums live in L1.
//! - tile (more rows, or weights the direct kernel cannot walk): one group chunk
//!   of one 64-column block is unpacked once into a small f32 tile that stays in
//!   L1, then a register-blocked micro-kernel (6 rows x 4 panels on AVX-512; the
//!   block sizes are each Lanes implementation's own) streams it
//!   for every block of rows.
//!
//! Both run the formulation described in cpu/mod.rs, step for step.

// Index loops mirror the register blocks (rows x panels), and `p + P <= panels`
// reads the same for every block width P, 1 included.
#![allow(clippy::needless_range_loop, clippy::int_plus_one)]

use super::lanes::{Lanes, Portable, WIDTH};
use super::plan::{Ctx, TILE_COLS, Tasks};
use crate::quant::unpack_value;
use half::f16;

/// Up to here the direct kernel serves. Measured against the tile kernel (2
/// cores, AVX-512): at 4..16 rows it is faster on 4096x4096 (M=16: 3.5 vs 3.9
/// ms) and 13824x5120 (17.4 vs 21.1 ms), slower on the short 2560x7680 from 12
/// rows (M=16: 5.5 vs 4.3 ms); the even split at 16 rows went to the layer that
/// was furthest behind torch.
pub const DIRECT_MAX_ROWS: usize = 16;

/// Columns of one direct-kernel task at most: 2 KB of each 4-bit word row.
pub const DIRECT_COLS: usize = 512;
/// ... and at least, when narrower blocks are needed to give every thread
/// several tasks (N = 2048 on two threads: 512 columns made 4 tasks, and one
/// late thread left the other idle).
pub const DIRECT_MIN_COLS: usize = 128;

/// Rows per micro-kernel block: 6 rows x 4 panels = 24 accumulators + 4 weight
/// vectors with AVX-512; with AVX2 6 rows x 1 panel (Lanes::MICRO_PANELS).
const MICRO_ROWS: usize = 6;
/// Reduction steps unpacked into the tile at a time: 128 x 64 f32, a 32 KB tile that stays in L1.
const TILE_STEPS: usize = 128;

#[derive(Clone, Copy)]
pub enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Isa {
    /// The widest code path this CPU runs, decided once; `OPT4GPTQ_CPU_ISA=avx2`
    /// or `portable` asks for a narrower one (tests compare them bit for bit).
    pub fn detect() -> Isa {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                let asked = std::env::var("OPT4GPTQ_CPU_ISA").unwrap_or_default();
                if asked != "portable" {
                    if asked != "avx2" && is_x86_feature_detected!("avx512f") {
                        return Isa::Avx512;
                    }
                    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
                        return Isa::Avx2;
                    }
                }
            }
            Isa::Portable
        })
    }

    /// # Safety
    /// ctx and tasks come from one plan; task < tasks.count(); no other task writes the same columns.
    pub unsafe fn run(self, ctx: &Ctx<'_>, tasks: &Tasks, task: usize) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { run_avx512(ctx, tasks, task) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { run_avx2(ctx, tasks, task) },
            Isa::Portable => unsafe { run_task::<Portable>(ctx, tasks, task) },
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn run_avx512(ctx: &Ctx<'_>, tasks: &Tasks, task: usize) {
    unsafe { run_task::<super::lanes::Avx512>(ctx, tasks, task) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run_avx2(ctx: &Ctx<'_>, tasks: &Tasks, task: usize) {
    unsafe { run_task::<super::lanes::Avx2>(ctx, tasks, task) }
}

#[inline(always)]
unsafe fn run_task<L: Lanes>(ctx: &Ctx<'_>, tasks: &Tasks, task: usize) {
    unsafe {
        if task < tasks.direct {
            let col0 = task * tasks.direct_cols;
            let width = tasks.direct_cols.min(tasks.tile_start - col0);
            match ctx.bits {
                2 => direct_wide::<L, 2, 16>(ctx, col0, width),
                4 => direct_wide::<L, 4, 8>(ctx, col0, width),
                8 => direct_wide::<L, 8, 4>(ctx, col0, width),
                bits => unreachable!("direct kernel planned for {bits}-bit weights"),
            }
        } else {
            let col0 = tasks.tile_start + (task - tasks.direct) * TILE_COLS;
            tile_block::<L>(ctx, col0, TILE_COLS.min(ctx.n - col0));
        }
    }
}

/// Word rows of one column block lie n * 4 bytes apart, each in its own 4 KB
/// page, which the hardware prefetchers do not follow, so the kernels prefetch
/// rows ahead themselves. The direct kernel reads 2 KB per row: 3 rows ahead was
/// the best of 1..16 rows and of the T0/T1/T2/NTA hints on 4096x4096,
/// 4096x12288 and 13824x5120 at M = 1 (all within ~15%: the limit is how many
/// lines a core can have in flight, not the distance).
const DIRECT_PREFETCH_ROWS: usize = 3;
/// The tile kernel reads 256 bytes per row.
const TILE_PREFETCH_ROWS: usize = 8;

#[inline(always)]
fn prefetch(p: *const i32) {
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Prefetches `bytes` from `p` (one call per 64-byte line).
#[inline(always)]
fn prefetch_span(p: *const i32, bytes: usize) {
    for line in (0..bytes).step_by(64) {
        prefetch(p.wrapping_byte_add(line));
    }
}

/// The direct kernel: all rows of columns col0..col0 + width (a multiple of 16).
///
/// Why wide blocks with the group sums t in L1 rather than narrow blocks with t
/// in registers only: word rows lie n * 4 bytes apart, so a narrow block
/// touches a new page for every 512 bytes it reads, and at N >= 12288 the M = 1
/// kernel ran at half the speed it had at N = 4096. A block of DIRECT_COLS
/// columns reads 2 KB of each row; within it, register blocks of R rows x P
/// panels (8 panels for one row: 8 independent fma chains hide the fma
/// latency) load t, take one word row, and store t.
#[inline(always)]
unsafe fn direct_wide<L: Lanes, const BITS: u32, const PER_WORD: usize>(ctx: &Ctx<'_>, col0: usize, width: usize) {
    let (m, k, n) = (ctx.m, ctx.k, ctx.n);
    let segments = ctx.segments.len();
    let word_rows = k / PER_WORD;
    let panels = width / WIDTH;
    let mut t = vec![0f32; m * width];
    let mut acc = vec![0f32; m * width];
    unsafe {
        for (si, seg) in ctx.segments.iter().enumerate() {
            t.fill(0.0);
            for word_row in seg.start / PER_WORD..seg.end / PER_WORD {
                let words_at = ctx.qweight.as_ptr().add(word_row * n + col0);
                if word_row + DIRECT_PREFETCH_ROWS < word_rows {
                    prefetch_span(words_at.add(DIRECT_PREFETCH_ROWS * n), width * 4);
                }
                let x_at = ctx.xs_direct.as_ptr().add(word_row * PER_WORD);
                let rows = RowChunks::new(m);
                for (m0, r) in rows {
                    let (x, t_rows) = (x_at.add(m0 * k), t.as_mut_ptr().add(m0 * width));
                    let mut p = 0;
                    // Widest register block first; leftover panels in narrower ones
                    // (for one row, a lone panel is a single latency-bound chain).
                    macro_rules! blocks {
                        ($r:literal, $($p:literal),+) => {{
                            $(
                                while p + $p <= panels {
                                    word_row_block::<L, $r, $p, BITS, PER_WORD>(words_at.add(p * WIDTH), x, k, t_rows.add(p * WIDTH), width);
                                    p += $p;
                                }
                            )+
                        }};
                    }
                    // The widest blocks are L's (see Lanes); const generics cannot take
                    // L's consts on stable Rust, so each size is a literal arm, and the
                    // match on constants leaves only one arm per L.
                    match (m, r, L::DIRECT_ONE_ROW_PANELS, L::DIRECT_PANELS) {
                        (1, _, 8, _) => blocks!(1, 8, 4, 2, 1),
                        (1, _, 4, _) => blocks!(1, 4, 2, 1),
                        (1, _, 2, _) => blocks!(1, 2, 1),
                        (1, _, _, _) => blocks!(1, 1),
                        (_, 4, _, 4) => blocks!(4, 4, 1),
                        (_, 3, _, 4) => blocks!(3, 4, 1),
                        (_, 2, _, 4) => blocks!(2, 4, 1),
                        (_, _, _, 4) => blocks!(1, 4, 1),
                        (_, 4, _, _) => blocks!(4, 1),
                        (_, 3, _, _) => blocks!(3, 1),
                        (_, 2, _, _) => blocks!(2, 1),
                        _ => blocks!(1, 1),
                    }
                }
            }
            for p in 0..panels {
                let (scale, neg_zero) = group_params::<L>(ctx, seg.group, col0 + p * WIDTH);
                for r in 0..m {
                    let at = r * width + p * WIDTH;
                    let sum = close_group(scale, neg_zero, ctx.sx[r * segments + si], L::load(t.as_ptr().add(at)), L::load(acc.as_ptr().add(at)));
                    sum.store(acc.as_mut_ptr().add(at));
                }
            }
        }
        for r in 0..m {
            for p in 0..panels {
                L::load(acc.as_ptr().add(r * width + p * WIDTH)).store_f16(ctx.out.add(r * n + col0 + p * WIDTH));
            }
        }
    }
}

/// Balanced chunks of at most 4 rows (5 rows: 3 + 2, not 4 + 1): (first row, rows).
#[derive(Clone, Copy)]
struct RowChunks {
    next: usize,
    left: usize,
    chunks: usize,
}

impl RowChunks {
    fn new(m: usize) -> RowChunks {
        RowChunks { next: 0, left: m, chunks: m.div_ceil(4) }
    }
}

impl Iterator for RowChunks {
    type Item = (usize, usize);
    fn next(&mut self) -> Option<(usize, usize)> {
        if self.chunks == 0 {
            return None;
        }
        let rows = self.left.div_ceil(self.chunks);
        let item = (self.next, rows);
        self.next += rows;
        self.left -= rows;
        self.chunks -= 1;
        Some(item)
    }
}

/// One word row (PER_WORD reduction steps) for R rows x P panels: t (row
/// stride ldt) += x * field, each field converted once for all R rows.
///
/// Fields stay where they sit in the word ("shift once"): field j is read as
/// q * 2^(BITS * j) by one and + one convert (no shift), and x comes from
/// xs_direct, pre-scaled by 2^-(BITS * j). Both scalings are exact (q has at most
/// 8 significant bits, x stays a normal f32), so the product x * q, and with it
/// the fused multiply-add, is bit for bit the one of the formulation.
#[inline(always)]
unsafe fn word_row_block<L: Lanes, const R: usize, const P: usize, const BITS: u32, const PER_WORD: usize>(
    words_at: *const i32,
    x: *const f32,
    ldx: usize,
    t: *mut f32,
    ldt: usize,
) {
    let mask = (1u32 << BITS) - 1;
    unsafe {
        let words: [L::Words; P] = std::array::from_fn(|p| L::load_words(words_at.add(p * WIDTH)));
        let mut tv: [[L; P]; R] = std::array::from_fn(|r| std::array::from_fn(|p| L::load(t.add(r * ldt + p * WIDTH))));
        for j in 0..PER_WORD {
            let xv: [L; R] = std::array::from_fn(|r| L::splat(*x.add(r * ldx + j)));
            for p in 0..P {
                let q = L::field_in_place(words[p], mask << (j as u32 * BITS));
                for r in 0..R {
                    tv[r][p] = L::fma(xv[r], q, tv[r][p]);
                }
            }
        }
        for r in 0..R {
            for p in 0..P {
                tv[r][p].store(t.add(r * ldt + p * WIDTH));
            }
        }
    }
}

/// (scale, -zero) of 16 columns from col in one group; columns past n get (0, 0).
#[inline(always)]
unsafe fn group_params<L: Lanes>(ctx: &Ctx<'_>, group: usize, col: usize) -> (L, L) {
    unsafe {
        let offset = L::splat(-(ctx.zero_offset as f32));
        let zero_row = ctx.qzeros.as_ptr().add(group * ctx.zero_words);
        if col + WIDTH <= ctx.n && ctx.bits != 3 {
            let scale = L::load_f16(ctx.scales.as_ptr().add(group * ctx.n + col));
            // -(z + offset) = z * -1 + (-offset): exact for these small integers.
            let neg_zero = L::fma(L::zero_points(zero_row, col, ctx.bits), L::splat(-1.0), offset);
            return (scale, neg_zero);
        }
        let mut scale = [0f32; WIDTH];
        let mut neg_zero = [0f32; WIDTH];
        for l in 0..WIDTH.min(ctx.n.saturating_sub(col)) {
            scale[l] = ctx.scales[group * ctx.n + col + l].to_f32();
            let z = unpack_value(ctx.bits, col + l, |w| *zero_row.add(w) as u32) as f32;
            neg_zero[l] = z.mul_add(-1.0, -(ctx.zero_offset as f32));
        }
        (L::load(scale.as_ptr()), L::load(neg_zero.as_ptr()))
    }
}

/// acc = fma(scale, fma(-zero, sum_x, t), acc): a finished group's share.
#[inline(always)]
unsafe fn close_group<L: Lanes>(scale: L, neg_zero: L, sum_x: f32, t: L, acc: L) -> L {
    unsafe { L::fma(scale, L::fma(neg_zero, L::splat(sum_x), t), acc) }
}

/// Unpacks reduction steps start..start + len of columns col0..col0 + width
/// into tile[step][TILE_COLS] as f32 (columns past width: 0).
#[inline(always)]
unsafe fn fill_tile<L: Lanes>(ctx: &Ctx<'_>, start: usize, len: usize, col0: usize, width: usize, tile: &mut [f32]) {
    let bits = ctx.bits as usize;
    let mask = (1u32 << bits) - 1;
    let n = ctx.n;
    unsafe {
        for i in 0..len {
            // Ahead by TILE_PREFETCH_ROWS words' worth of fields, once per word (scattered act-order rows too).
            let ahead = start + i + TILE_PREFETCH_ROWS * 32 / bits;
            if ahead < ctx.k {
                let bit = ctx.position(ahead) * bits;
                if bit % 32 < bits {
                    prefetch_span(ctx.qweight.as_ptr().add(bit / 32 * n + col0), width * 4);
                }
            }
            let bit = ctx.position(start + i) * bits;
            let (word, shift) = (bit / 32, (bit % 32) as u32);
            let straddles = shift as usize + bits > 32;
            let row = ctx.qweight.as_ptr().add(word * n + col0);
            let dst = tile.as_mut_ptr().add(i * TILE_COLS);
            for p in 0..TILE_COLS / WIDTH {
                let first = p * WIDTH;
                if first + WIDTH <= width {
                    let lo = L::load_words(row.add(first));
                    let q = if straddles { L::field2(lo, L::load_words(row.add(n + first)), shift, mask) } else { L::field(lo, shift, mask) };
                    q.store(dst.add(first));
                } else {
                    for c in first..first + WIDTH {
                        *dst.add(c) = if c < width {
                            let lo = *row.add(c) as u32 >> shift;
                            let hi = if straddles { (*row.add(n + c) as u32) << (32 - shift) } else { 0 };
                            ((lo | hi) & mask) as f32
                        } else {
                            0.0
                        };
                    }
                }
            }
        }
    }
}

/// t[r][..] += x[r][i] * tile[i][..] over len steps, R rows, P panels (tile and
/// t rows are TILE_COLS apart).
#[inline(always)]
unsafe fn micro<L: Lanes, const R: usize, const P: usize>(tile: *const f32, len: usize, x: *const f32, ldx: usize, t: *mut f32) {
    unsafe {
        let mut acc: [[L; P]; R] = std::array::from_fn(|r| std::array::from_fn(|p| L::load(t.add(r * TILE_COLS + p * WIDTH))));
        for i in 0..len {
            let w: [L; P] = std::array::from_fn(|p| L::load(tile.add(i * TILE_COLS + p * WIDTH)));
            for r in 0..R {
                let xr = L::splat(*x.add(r * ldx + i));
                for p in 0..P {
                    acc[r][p] = L::fma(xr, w[p], acc[r][p]);
                }
            }
        }
        for r in 0..R {
            for p in 0..P {
                acc[r][p].store(t.add(r * TILE_COLS + p * WIDTH));
            }
        }
    }
}

/// R rows of all TILE_COLS columns, L::MICRO_PANELS panels per pass over the
/// tile (each element's fma chain runs over the steps in order either way).
#[inline(always)]
unsafe fn micro_rows<L: Lanes, const R: usize>(tile: *const f32, len: usize, x: *const f32, ldx: usize, t: *mut f32) {
    const PANELS: usize = TILE_COLS / WIDTH;
    unsafe {
        match L::MICRO_PANELS {
            4 => micro::<L, R, 4>(tile, len, x, ldx, t),
            2 => (0..PANELS).step_by(2).for_each(|p| micro::<L, R, 2>(tile.add(p * WIDTH), len, x, ldx, t.add(p * WIDTH))),
            _ => (0..PANELS).for_each(|p| micro::<L, R, 1>(tile.add(p * WIDTH), len, x, ldx, t.add(p * WIDTH))),
        }
    }
}

/// All m rows of columns col0..col0 + width (width <= TILE_COLS).
#[inline(always)]
unsafe fn tile_block<L: Lanes>(ctx: &Ctx<'_>, col0: usize, width: usize) {
    const P: usize = TILE_COLS / WIDTH;
    let (m, k, n) = (ctx.m, ctx.k, ctx.n);
    let segments = ctx.segments.len();
    let mut tile = vec![0f32; TILE_STEPS * TILE_COLS];
    let mut t = vec![0f32; m * TILE_COLS];
    let mut acc = vec![0f32; m * TILE_COLS];
    unsafe {
        for (si, seg) in ctx.segments.iter().enumerate() {
            t.fill(0.0);
            for start in (seg.start..seg.end).step_by(TILE_STEPS) {
                let len = TILE_STEPS.min(seg.end - start);
                fill_tile::<L>(ctx, start, len, col0, width, &mut tile);
                let mut r0 = 0;
                while r0 < m {
                    let rows = MICRO_ROWS.min(m - r0);
                    let (x, tr) = (ctx.xs.as_ptr().add(r0 * k + start), t.as_mut_ptr().add(r0 * TILE_COLS));
                    match rows {
                        6 => micro_rows::<L, 6>(tile.as_ptr(), len, x, k, tr),
                        5 => micro_rows::<L, 5>(tile.as_ptr(), len, x, k, tr),
                        4 => micro_rows::<L, 4>(tile.as_ptr(), len, x, k, tr),
                        3 => micro_rows::<L, 3>(tile.as_ptr(), len, x, k, tr),
                        2 => micro_rows::<L, 2>(tile.as_ptr(), len, x, k, tr),
                        _ => micro_rows::<L, 1>(tile.as_ptr(), len, x, k, tr),
                    }
                    r0 += rows;
                }
            }
            for p in 0..P {
                let (scale, neg_zero) = group_params::<L>(ctx, seg.group, col0 + p * WIDTH);
                for r in 0..m {
                    let at = r * TILE_COLS + p * WIDTH;
                    let sum = close_group(scale, neg_zero, ctx.sx[r * segments + si], L::load(t.as_ptr().add(at)), L::load(acc.as_ptr().add(at)));
                    sum.store(acc.as_mut_ptr().add(at));
                }
            }
        }
        for r in 0..m {
            let out_row = ctx.out.add(r * n + col0);
            for p in 0..P {
                let first = p * WIDTH;
                if first + WIDTH <= width {
                    L::load(acc.as_ptr().add(r * TILE_COLS + first)).store_f16(out_row.add(first));
                } else {
                    for c in first..width.max(first) {
                        *out_row.add(c) = f16::from_f32(acc[r * TILE_COLS + c]);
                    }
                }
            }
        }
    }
}
