//! What one call computes, laid out for the kernels: the reduction order, the
//! activations gathered into it, and how the columns are split into tasks.
//!
//! The reduction order: weight rows grouped by group (ascending), and within a
//! group in stored order (the position in the packed bit stream). For plain
//! weights and for weights after gptq_shuffle this is simply the stored order,
//! so the kernels read packed words front to back; for act-order weights that
//! were not shuffled (a g_idx per row) rows of one group are scattered, and the
//! order visits them group by group. It depends only on the weights, never on
//! M or on threads.

use super::CpuGemm;
use super::lanes::WIDTH;
use crate::quant::tc_position_of_row;
use half::f16;
use half::slice::HalfFloatSliceExt;

/// A group's rows: reduction steps start..end.
#[derive(Clone, Copy, Debug)]
pub struct Segment {
    pub group: usize,
    pub start: usize,
    pub end: usize,
}

/// Columns per tile-kernel task: four 16-lane panels.
pub const TILE_COLS: usize = 64;

pub struct Ctx<'a> {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub bits: u32,
    pub zero_offset: i32,
    pub zero_words: usize,
    pub qweight: &'a [i32],
    pub qzeros: &'a [i32],
    pub scales: &'a [f16],
    /// Stored position of each reduction step; None: step i is position i.
    pub order: Option<Vec<u32>>,
    pub segments: Vec<Segment>,
    /// [m][k] activations as f32, in reduction order (perm applied).
    pub xs: Vec<f32>,
    /// The direct kernel's copy of xs: step i scaled by 2^-(bits * (i % (32 / bits))),
    /// the power of two its in-place fields carry (empty when the tile kernel serves).
    pub xs_direct: Vec<f32>,
    /// [m][segments] sum of each row's xs over each segment, added in reduction order.
    pub sx: Vec<f32>,
    pub out: *mut f16,
}

// Tasks write disjoint column ranges of `out`; everything else is read-only.
unsafe impl Sync for Ctx<'_> {}

/// Row of the weight matrix stored at bit-stream position `p`.
fn row_of_position(p: usize, tc_order: bool) -> usize {
    if !tc_order {
        return p;
    }
    const ROWS: [u8; 32] = {
        let mut rows = [0u8; 32];
        let mut r = 0;
        while r < 32 {
            rows[tc_position_of_row(r)] = r as u8;
            r += 1;
        }
        rows
    };
    p / 32 * 32 + ROWS[p % 32] as usize
}

/// (order, segments): stored positions sorted stably by group.
fn reduction_order(groups_of: &[usize], groups: usize) -> (Option<Vec<u32>>, Vec<Segment>) {
    let k = groups_of.len();
    if groups_of.windows(2).all(|w| w[0] <= w[1]) {
        let mut segments = Vec::new();
        let mut start = 0;
        for i in 1..=k {
            if i == k || groups_of[i] != groups_of[start] {
                segments.push(Segment { group: groups_of[start], start, end: i });
                start = i;
            }
        }
        return (None, segments);
    }
    let mut counts = vec![0usize; groups + 1];
    for &g in groups_of {
        counts[g + 1] += 1;
    }
    for g in 0..groups {
        counts[g + 1] += counts[g];
    }
    let mut segments = Vec::new();
    for g in 0..groups {
        if counts[g + 1] > counts[g] {
            segments.push(Segment { group: g, start: counts[g], end: counts[g + 1] });
        }
    }
    let mut order = vec![0u32; k];
    for (p, &g) in groups_of.iter().enumerate() {
        order[counts[g]] = p as u32;
        counts[g] += 1;
    }
    (Some(order), segments)
}

impl<'a> Ctx<'a> {
    pub fn new(p: &CpuGemm<'a>, out: *mut f16) -> Ctx<'a> {
        let s = &p.shape;
        let group_size = s.group_size().max(1);
        let rows: Vec<usize> = (0..s.k).map(|pos| row_of_position(pos, p.tc_order)).collect();
        let groups_of: Vec<usize> =
            rows.iter().map(|&r| p.g_idx.map_or(r / group_size, |g_idx| g_idx[r] as usize)).collect();
        let (order, segments) = reduction_order(&groups_of, s.groups.max(groups_of.iter().max().map_or(0, |g| g + 1)));
        // Activation column met by reduction step i (None: column i).
        let columns: Option<Vec<u32>> = (order.is_some() || p.perm.is_some() || p.tc_order).then(|| {
            (0..s.k)
                .map(|i| {
                    let row = rows[order.as_ref().map_or(i, |o| o[i] as usize)];
                    p.perm.map_or(row, |perm| perm[row] as usize) as u32
                })
                .collect()
        });
        let mut xs = vec![0f32; s.m * s.k];
        let mut sx = vec![0f32; s.m * segments.len()];
        // Widened in bulk (half's vectorized F16C path), then gathered: per-element to_f32 was a tenth of a small call.
        let mut wide = vec![0f32; s.k];
        for m in 0..s.m {
            p.a[m * s.lda..m * s.lda + s.k].convert_to_f32_slice(&mut wide);
            let x_row = &mut xs[m * s.k..(m + 1) * s.k];
            match &columns {
                None => x_row.copy_from_slice(&wide),
                Some(columns) => x_row.iter_mut().zip(columns).for_each(|(x, &c)| *x = wide[c as usize]),
            }
            for (j, seg) in segments.iter().enumerate() {
                sx[m * segments.len() + j] = x_row[seg.start..seg.end].iter().fold(0f32, |sum, x| sum + x);
            }
        }
        let mut ctx = Ctx {
            m: s.m,
            k: s.k,
            n: s.n,
            bits: s.bits,
            zero_offset: s.zero_offset,
            zero_words: s.zero_words(),
            qweight: p.qweight,
            qzeros: p.qzeros,
            scales: p.scales,
            order,
            segments,
            xs,
            xs_direct: Vec::new(),
            sx,
            out,
        };
        if ctx.direct_fits() {
            let per_word = 32 / s.bits as usize;
            let scales: Vec<f32> = (0..per_word).map(|j| (-((j * s.bits as usize) as f32)).exp2()).collect();
            ctx.xs_direct = ctx.xs.iter().enumerate().map(|(i, x)| x * scales[i % s.k % per_word]).collect();
        }
        ctx
    }

    /// Stored position of reduction step i.
    #[inline(always)]
    pub fn position(&self, i: usize) -> usize {
        self.order.as_ref().map_or(i, |o| o[i] as usize)
    }

    /// Whether the direct few-row kernel can read this call's weights: stored
    /// order, whole words per group, and a field width that never straddles words.
    fn direct_fits(&self) -> bool {
        let per_word = 32 / self.bits as usize;
        self.m <= super::kernels::DIRECT_MAX_ROWS
            && self.order.is_none()
            && matches!(self.bits, 2 | 4 | 8)
            && self.segments.iter().all(|s| s.start % per_word == 0 && s.end % per_word == 0)
    }

    pub fn tasks(&self) -> Tasks {
        // Direct blocks cover the whole 16-column panels; a ragged tail goes to the tile kernel.
        let covered = if self.direct_fits() { self.n / WIDTH * WIDTH } else { 0 };
        // Aim for 4 tasks per thread; which block serves a column never changes its arithmetic.
        // Whole 128-column steps, so one row's 8-panel register blocks fill every block.
        let per_task = covered.div_ceil(4 * super::pool::thread_count()).div_ceil(128) * 128;
        let direct_cols = per_task.clamp(super::kernels::DIRECT_MIN_COLS, super::kernels::DIRECT_COLS);
        let direct = covered.div_ceil(direct_cols);
        Tasks { direct, direct_cols, tile_start: covered, tile: (self.n - covered).div_ceil(TILE_COLS) }
    }
}

/// Task t < direct: direct-kernel block t of direct_cols columns (the last one
/// ends at tile_start); then tile blocks of TILE_COLS columns from tile_start
/// (the last one may be narrower).
pub struct Tasks {
    pub direct: usize,
    pub direct_cols: usize,
    pub tile_start: usize,
    pub tile: usize,
}

impl Tasks {
    pub fn count(&self) -> usize {
        self.direct + self.tile
    }
}
