//! The CPU backend: every format of gptq_gemm, multithreaded and SIMD, with
//! results that depend on neither the thread count nor M nor where a row sits.
//!
//! One arithmetic formulation serves every path (see `plan` for the order):
//! for each group g (its weight rows in a fixed order) and output element,
//!     t   = fma chain over the group's rows of x * q      (q: the raw integer, exact in f32)
//!     d   = fma(-z, sum_x, t)                             (sum_x: that row's x summed over the group)
//!     acc = fma(scale, d, acc)
//! and one rounding of acc to fp16. The factored form (rather than
//! fma(x, scale * (q - z), acc) per weight) is chosen because it needs one
//! fused multiply-add per weight instead of two, and M = 1 on two cores is
//! limited by instruction count as much as by memory. Each path (the direct
//! few-row kernel, the tile kernel, the portable and the AVX-512 lanes) performs
//! exactly these operations in exactly this order, so they agree bit for bit.

mod kernels;
mod lanes;
mod plan;
mod pool;

pub use pool::thread_count;

use crate::quant::{GemmShape, pack_value, tc_position_of_row, unpack_value};
use half::f16;

/// Borrowed inputs of one CPU gptq_gemm, already validated by quant::check_gemm.
pub struct CpuGemm<'a> {
    pub shape: GemmShape,
    /// [m, k] with row stride shape.lda.
    pub a: &'a [f16],
    pub qweight: &'a [i32],
    pub qzeros: &'a [i32],
    pub scales: &'a [f16],
    /// Group of each weight row; None: row / group_size.
    pub g_idx: Option<&'a [i32]>,
    /// Activation column each weight row meets; None: the row itself.
    pub perm: Option<&'a [i32]>,
    /// 4-bit weights shuffled into the tensor-core pack order (quant::tc_position_of_row).
    pub tc_order: bool,
}

/// out = a[:, perm] @ dequant(weights), accumulated in f32 and rounded once to fp16.
pub fn gemm(p: &CpuGemm<'_>, out: &mut [f16]) {
    let s = &p.shape;
    if s.m == 0 || s.n == 0 {
        return;
    }
    assert!(out.len() >= s.m * s.n, "CPU gemm output too small");
    let ctx = plan::Ctx::new(p, out.as_mut_ptr());
    let isa = kernels::Isa::detect();
    let tasks = ctx.tasks();
    pool::parallel_for(tasks.count(), &|task| unsafe { isa.run(&ctx, &tasks, task) });
}

/// gptq_shuffle on the CPU: dst row r (unpacked) = src row perm[r] (None: row
/// r), for [k * bits / 32, n] packed weights; 4-bit rows packed in the
/// tensor-core pack order.
pub fn permute_rows(src: &[i32], dst: &mut [i32], perm: Option<&[i32]>, k: usize, n: usize, bits: u32) {
    for pack in 0..k / 32 {
        for col in 0..n {
            let mut words = [0u32; 8];
            for r in 0..32 {
                let source = perm.map_or(pack * 32 + r, |perm| perm[pack * 32 + r] as usize);
                let value = unpack_value(bits, source, |w| src[w * n + col] as u32);
                let position = if bits == 4 { tc_position_of_row(r) } else { r };
                pack_value(bits, position, value, &mut words);
            }
            for (j, word) in words.iter().take(bits as usize).enumerate() {
                dst[(pack * bits as usize + j) * n + col] = *word as i32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny deterministic generator: tests need varied data, not a crate.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u32 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (self.0 >> 33) as u32
        }
    }

    fn pack_rows(values: &[u32], k: usize, n: usize, bits: u32) -> Vec<i32> {
        let mut packed = vec![0i32; k * bits as usize / 32 * n];
        for col in 0..n {
            for pack in 0..k / 32 {
                let mut words = [0u32; 8];
                for r in 0..32 {
                    pack_value(bits, r, values[(pack * 32 + r) * n + col], &mut words);
                }
                for j in 0..bits as usize {
                    packed[(pack * bits as usize + j) * n + col] = words[j] as i32;
                }
            }
        }
        packed
    }

    #[test]
    fn gemm_matches_a_float64_dot_product_for_every_bit_width() {
        let (m, k, n, groups) = (3, 64, 32, 2);
        let mut rng = Lcg(7);
        for bits in [2u32, 3, 4, 8] {
            let q: Vec<u32> = (0..k * n).map(|_| rng.next() % (1 << bits)).collect();
            let z: Vec<u32> = (0..groups * n).map(|_| rng.next() % (1 << bits)).collect();
            let scales: Vec<f16> = (0..groups * n).map(|_| f16::from_f32(0.001 + (rng.next() % 100) as f32 * 1e-4)).collect();
            let a: Vec<f16> = (0..m * k).map(|_| f16::from_f32((rng.next() % 200) as f32 / 100.0 - 1.0)).collect();
            let mut qzeros = vec![0i32; groups * n * bits as usize / 32];
            for g in 0..groups {
                let mut words = vec![0u32; n * bits as usize / 32];
                for col in 0..n {
                    pack_value(bits, col, z[g * n + col], &mut words);
                }
                for (j, w) in words.iter().enumerate() {
                    qzeros[g * words.len() + j] = *w as i32;
                }
            }
            let perm: Vec<i32> = (0..k as i32).rev().collect();
            let qweight = pack_rows(&q, k, n, bits);
            let shape = GemmShape { m, k, n, groups, bits, lda: k, zero_offset: 1 };
            let p = CpuGemm {
                shape,
                a: &a,
                qweight: &qweight,
                qzeros: &qzeros,
                scales: &scales,
                g_idx: None,
                perm: Some(&perm),
                tc_order: false,
            };
            let mut out = vec![f16::NAN; m * n];
            gemm(&p, &mut out);
            for mi in 0..m {
                for col in 0..n {
                    let mut expected = 0f64;
                    for r in 0..k {
                        let g = r / (k / groups);
                        let w = scales[g * n + col].to_f64() * (q[r * n + col] as f64 - (z[g * n + col] as f64 + 1.0));
                        expected += a[mi * k + perm[r] as usize].to_f64() * w;
                    }
                    let got = out[mi * n + col].to_f64();
                    assert!((got - expected).abs() <= 1e-3 * expected.abs().max(1e-2), "bits={bits} got {got} expected {expected}");
                }
            }
        }
    }

    #[test]
    fn each_row_alone_equals_its_row_in_a_batch_bit_for_bit() {
        // 20 rows take the tile kernel, one row the direct kernel; 208 columns leave a ragged tile tail.
        let (m, k, n, groups) = (20, 256, 208, 2);
        let mut rng = Lcg(3);
        for (bits, tc_order) in [(4u32, true), (4, false), (2, false), (8, false), (3, false)] {
            let n = if bits == 3 { 224 } else { n };
            let q: Vec<u32> = (0..k * n).map(|_| rng.next() % (1 << bits)).collect();
            let qweight = pack_rows(&q, k, n, bits);
            let qzeros: Vec<i32> = (0..groups * n * bits as usize / 32).map(|_| rng.next() as i32).collect();
            let scales: Vec<f16> = (0..groups * n).map(|_| f16::from_f32(0.002 + (rng.next() % 100) as f32 * 1e-4)).collect();
            let a: Vec<f16> = (0..m * k).map(|_| f16::from_f32((rng.next() % 2000) as f32 / 1000.0 - 1.0)).collect();
            let perm: Vec<i32> = (0..k as i32).map(|r| (r * 37 + 5) % k as i32).collect();
            let problem = |rows: usize, a: &'_ [f16]| -> Vec<f16> {
                let p = CpuGemm {
                    shape: GemmShape { m: rows, k, n, groups, bits, lda: k, zero_offset: 1 },
                    a,
                    qweight: &qweight,
                    qzeros: &qzeros,
                    scales: &scales,
                    g_idx: None,
                    perm: Some(&perm),
                    tc_order,
                };
                let mut out = vec![f16::NAN; rows * n];
                gemm(&p, &mut out);
                out
            };
            let whole = problem(m, &a);
            for row in 0..m {
                let alone = problem(1, &a[row * k..(row + 1) * k]);
                let bits_of = |v: &[f16]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits_of(&alone), bits_of(&whole[row * n..(row + 1) * n]), "bits={bits} row={row}");
            }
        }
    }

    #[test]
    fn permute_rows_moves_whole_rows() {
        let (k, n) = (64, 8);
        let mut rng = Lcg(11);
        for bits in [2u32, 3, 4, 8] {
            let q: Vec<u32> = (0..k * n).map(|_| rng.next() % (1 << bits)).collect();
            let src = pack_rows(&q, k, n, bits);
            let perm: Vec<i32> = (0..k as i32).map(|r| (r * 5 + 3) % k as i32).collect();
            let mut dst = vec![0i32; src.len()];
            permute_rows(&src, &mut dst, Some(&perm), k, n, bits);
            // Row r holds old row perm[r]; 4-bit rows sit where the tensor-core order puts them.
            let mut expected_q = vec![0u32; k * n];
            for r in 0..k {
                let stored = if bits == 4 { r / 32 * 32 + tc_position_of_row(r % 32) } else { r };
                for col in 0..n {
                    expected_q[stored * n + col] = q[perm[r] as usize * n + col];
                }
            }
            assert_eq!(dst, pack_rows(&expected_q, k, n, bits), "bits={bits}");
        }
    }
}
