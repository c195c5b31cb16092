//! The CPU backend: the same function as the GPU kernels, written for clarity.
//! It serves CPU arrays on every build and is the engine-side reference that
//! the Rust tests check the packing rules against.

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

/// Dequantized weights, row-major [k, n], in the order the rows are stored.
fn dequantize(p: &CpuGemm<'_>) -> Vec<f32> {
    let s = &p.shape;
    let (k, n, bits) = (s.k, s.n, s.bits);
    let zero_words = s.zero_words();
    let mut zeros = vec![0i32; s.groups * n];
    for g in 0..s.groups {
        let row = &p.qzeros[g * zero_words..(g + 1) * zero_words];
        for col in 0..n {
            zeros[g * n + col] = unpack_value(bits, col, |w| row[w] as u32) as i32 + s.zero_offset;
        }
    }
    let mut weights = vec![0f32; k * n];
    for r in 0..k {
        let g = p.g_idx.map_or(r / s.group_size(), |g_idx| g_idx[r] as usize);
        let out_row = &mut weights[r * n..(r + 1) * n];
        for (col, w) in out_row.iter_mut().enumerate() {
            let position = if p.tc_order { r / 32 * 32 + tc_position_of_row(r % 32) } else { r };
            let q = unpack_value(bits, position, |word| p.qweight[word * n + col] as u32) as i32;
            *w = p.scales[g * n + col].to_f32() * (q - zeros[g * n + col]) as f32;
        }
    }
    weights
}

/// out[m, cols] for one contiguous column range, accumulated in f32 in row order.
fn gemm_columns(p: &CpuGemm<'_>, weights: &[f32], cols: std::ops::Range<usize>) -> Vec<f32> {
    let s = &p.shape;
    let width = cols.len();
    let mut result = vec![0f32; s.m * width];
    for m in 0..s.m {
        let a_row = &p.a[m * s.lda..m * s.lda + s.k];
        let acc = &mut result[m * width..(m + 1) * width];
        for r in 0..s.k {
            let source = p.perm.map_or(r, |perm| perm[r] as usize);
            let x = a_row[source].to_f32();
            let w_row = &weights[r * s.n + cols.start..r * s.n + cols.end];
            for (a, w) in acc.iter_mut().zip(w_row) {
                *a += x * w;
            }
        }
    }
    result
}

/// out = a[:, perm] @ dequant(weights), rounded once to fp16.
pub fn gemm(p: &CpuGemm<'_>, out: &mut [f16]) {
    let s = &p.shape;
    if s.m == 0 || s.n == 0 {
        return;
    }
    let weights = dequantize(p);
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).min(s.n.div_ceil(64)).max(1);
    let chunk = s.n.div_ceil(threads);
    let ranges: Vec<_> = (0..s.n).step_by(chunk).map(|start| start..(start + chunk).min(s.n)).collect();
    let parts: Vec<Vec<f32>> = std::thread::scope(|scope| {
        let handles: Vec<_> = ranges
            .iter()
            .map(|cols| {
                let weights = &weights;
                scope.spawn(move || gemm_columns(p, weights, cols.clone()))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("CPU gemm worker panicked")).collect()
    });
    for (cols, part) in ranges.iter().zip(&parts) {
        let width = cols.len();
        for m in 0..s.m {
            for (j, value) in part[m * width..(m + 1) * width].iter().enumerate() {
                out[m * s.n + cols.start + j] = f16::from_f32(*value);
            }
        }
    }
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
