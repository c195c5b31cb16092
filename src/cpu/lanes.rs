//! Sixteen f32 lanes (one per output column) and the few operations the
//! kernels need, in two implementations with the same results bit for bit:
//!
//! - `Avx512`: explicit std::arch intrinsics, picked at run time when the CPU
//!   has AVX-512F. Explicit because the M = 1 loop is all about instruction
//!   count, and autovectorized array code gives no guarantee of full-width zmm
//!   registers or of the accumulators staying in registers. Measured on
//!   4096x4096 (2 cores): 0.48 / 3.5 / 21 ms at M = 1 / 16 / 128, against
//!   1.5 / 10.5 / 65 ms for `Portable` compiled for AVX2+FMA (half the width
//!   explains 2x of that 3x).
//! - `Avx2`: the same with two 256-bit halves, for CPUs with AVX2+FMA+F16C
//!   but no AVX-512.
//! - `Portable`: plain arrays for every other CPU (and for the equivalence
//!   tests, compiled for AVX2+FMA and for the baseline target). `f32::mul_add` is a fused multiply-add on
//!   every target (a libm call where the CPU has no FMA), so every
//!   implementation rounds exactly alike.

use half::f16;

pub const WIDTH: usize = 16;

pub trait Lanes: Copy {
    type Words: Copy;
    /// Register-block sizes of the kernels, in 16-lane panels, chosen per
    /// implementation because they must fit its register file: AVX-512 has 32
    /// zmm registers of 16 lanes, AVX2 16 ymm registers of 8 lanes, so one AVX2
    /// panel takes two registers out of half as many. Blocking never changes
    /// the operations on one output element or their order, only how many
    /// elements are in flight, so the results stay bit for bit the same.
    ///
    /// Widest panel block of the direct kernel at M = 1 (8, 4, 2 or 1).
    const DIRECT_ONE_ROW_PANELS: usize;
    /// Panels of the direct kernel's blocks of 2..4 rows (4 or 1).
    const DIRECT_PANELS: usize;
    /// Panels per pass of the tile micro-kernel over its 4-panel tile (4, 2 or 1).
    const MICRO_PANELS: usize;
    unsafe fn splat(x: f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    /// a * b + c with one rounding.
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self;
    /// Rounds to nearest-even fp16 and stores 16 values.
    unsafe fn store_f16(self, p: *mut f16);
    unsafe fn load_words(p: *const i32) -> Self::Words;
    /// (words >> shift) & mask, as exact f32 (mask < 2^24).
    unsafe fn field(w: Self::Words, shift: u32, mask: u32) -> Self;
    /// 16 fp16 values widened to f32 (exact).
    unsafe fn load_f16(p: *const f16) -> Self;
    /// The raw stored zero points of columns col..col + 16 of one packed qzeros
    /// row, as f32; col is a multiple of 16 and bits is 2, 4 or 8.
    unsafe fn zero_points(row: *const i32, col: usize, bits: u32) -> Self;
    /// (words & mask) as exact f32, mask being a field's bits in place: the
    /// field times 2^shift, one instruction fewer than `field` (see kernels).
    unsafe fn field_in_place(w: Self::Words, mask: u32) -> Self;
    /// The field of a value that straddles two words: (lo >> shift | hi << (32 - shift)) & mask, shift > 0.
    unsafe fn field2(lo: Self::Words, hi: Self::Words, shift: u32, mask: u32) -> Self;
}

#[derive(Clone, Copy)]
pub struct Portable([f32; WIDTH]);

impl Lanes for Portable {
    type Words = [u32; WIDTH];
    // As AVX-512: compiled for AVX-512 these arrays are zmm registers, and the
    // equivalence tests need no blocks of their own.
    const DIRECT_ONE_ROW_PANELS: usize = 8;
    const DIRECT_PANELS: usize = 4;
    const MICRO_PANELS: usize = 4;
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        Portable([x; WIDTH])
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Portable(unsafe { p.cast::<[f32; WIDTH]>().read_unaligned() })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        unsafe { p.cast::<[f32; WIDTH]>().write_unaligned(self.0) }
    }
    #[inline(always)]
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
        Portable(std::array::from_fn(|l| a.0[l].mul_add(b.0[l], c.0[l])))
    }
    #[inline(always)]
    unsafe fn store_f16(self, p: *mut f16) {
        for (l, v) in self.0.iter().enumerate() {
            unsafe { p.add(l).write_unaligned(f16::from_f32(*v)) };
        }
    }
    #[inline(always)]
    unsafe fn load_words(p: *const i32) -> Self::Words {
        unsafe { p.cast::<[u32; WIDTH]>().read_unaligned() }
    }
    #[inline(always)]
    unsafe fn field(w: Self::Words, shift: u32, mask: u32) -> Self {
        Portable(std::array::from_fn(|l| ((w[l] >> shift) & mask) as f32))
    }
    #[inline(always)]
    unsafe fn field_in_place(w: Self::Words, mask: u32) -> Self {
        Portable(std::array::from_fn(|l| (w[l] & mask) as f32))
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const f16) -> Self {
        Portable(std::array::from_fn(|l| unsafe { p.add(l).read_unaligned() }.to_f32()))
    }
    #[inline(always)]
    unsafe fn zero_points(row: *const i32, col: usize, bits: u32) -> Self {
        let word = |w: usize| unsafe { row.add(w).read() } as u32;
        Portable(std::array::from_fn(|l| crate::quant::unpack_value(bits, col + l, word) as f32))
    }
    #[inline(always)]
    unsafe fn field2(lo: Self::Words, hi: Self::Words, shift: u32, mask: u32) -> Self {
        Portable(std::array::from_fn(|l| (((lo[l] >> shift) | (hi[l] << (32 - shift))) & mask) as f32))
    }
}

#[cfg(target_arch = "x86_64")]
pub use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Lanes;
    use half::f16;
    use std::arch::x86_64::*;

    #[derive(Clone, Copy)]
    pub struct Avx512(__m512);

    // Every method is only reached from functions compiled with
    // #[target_feature(enable = "avx512f")] after runtime detection.
    impl Lanes for Avx512 {
        type Words = __m512i;
        // 1 row x 8 panels: 8 accumulators + 8 word vectors; 4 x 4: 16 + 4 + 4
        // broadcasts; micro 6 x 4: 24 + 4 (see kernels.rs).
        const DIRECT_ONE_ROW_PANELS: usize = 8;
        const DIRECT_PANELS: usize = 4;
        const MICRO_PANELS: usize = 4;
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            Avx512(unsafe { _mm512_set1_ps(x) })
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Avx512(unsafe { _mm512_loadu_ps(p) })
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm512_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
            Avx512(unsafe { _mm512_fmadd_ps(a.0, b.0, c.0) })
        }
        #[inline(always)]
        unsafe fn store_f16(self, p: *mut f16) {
            // vcvtps2ph with round-to-nearest-even: the same rounding as f16::from_f32.
            unsafe {
                let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(self.0);
                _mm256_storeu_si256(p.cast(), h)
            }
        }
        #[inline(always)]
        unsafe fn load_words(p: *const i32) -> Self::Words {
            unsafe { _mm512_loadu_si512(p.cast()) }
        }
        #[inline(always)]
        unsafe fn field(w: Self::Words, shift: u32, mask: u32) -> Self {
            unsafe {
                let v = _mm512_srl_epi32(w, _mm_cvtsi32_si128(shift as i32));
                Avx512(_mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(mask as i32))))
            }
        }
        #[inline(always)]
        unsafe fn field_in_place(w: Self::Words, mask: u32) -> Self {
            // Unsigned: the top field of a word sets bit 31.
            unsafe { Avx512(_mm512_cvtepu32_ps(_mm512_and_si512(w, _mm512_set1_epi32(mask as i32)))) }
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const f16) -> Self {
            Avx512(unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) })
        }
        #[inline(always)]
        unsafe fn zero_points(row: *const i32, col: usize, bits: u32) -> Self {
            // The 16 values fill bits / 2 words from word col * bits / 32; read only
            // those (the row may end there), route word l * bits / 32 to lane l, shift.
            unsafe {
                let used: __mmask16 = (1u32 << (bits / 2)).wrapping_sub(1) as __mmask16;
                let words = _mm512_maskz_loadu_epi32(used, row.add(col * bits as usize / 32));
                let lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
                let bit = _mm512_mullo_epi32(lane, _mm512_set1_epi32(bits as i32));
                let spread = _mm512_permutexvar_epi32(_mm512_srli_epi32::<5>(bit), words);
                let shifted = _mm512_srlv_epi32(spread, _mm512_and_si512(bit, _mm512_set1_epi32(31)));
                let mask = _mm512_set1_epi32(((1u32 << bits) - 1) as i32);
                Avx512(_mm512_cvtepi32_ps(_mm512_and_si512(shifted, mask)))
            }
        }
        #[inline(always)]
        unsafe fn field2(lo: Self::Words, hi: Self::Words, shift: u32, mask: u32) -> Self {
            unsafe {
                let low = _mm512_srl_epi32(lo, _mm_cvtsi32_si128(shift as i32));
                let high = _mm512_sll_epi32(hi, _mm_cvtsi32_si128(32 - shift as i32));
                let v = _mm512_and_si512(_mm512_or_si512(low, high), _mm512_set1_epi32(mask as i32));
                Avx512(_mm512_cvtepi32_ps(v))
            }
        }
    }

    #[derive(Clone, Copy)]
    pub struct Avx2(__m256, __m256);

    /// Only reached from functions compiled with avx2, fma and f16c enabled, after runtime detection.
    impl Lanes for Avx2 {
        type Words = (__m256i, __m256i);
        // In ymm registers (two per panel), out of 16: 1 row x 2 panels is 4
        // accumulators + 4 word halves; 4 rows x 1 panel: 8 + 2 + 4 broadcasts;
        // micro 6 rows x 1 panel: 12 + 2 + 1 broadcast. The AVX-512 blocks needed
        // 32 to 56 and spilled. At M = 1 each fma comes with a convert on the same
        // two ports, so 4 chains in flight already keep them busy: 2 panels
        // measured as fast as 4 at 4096x4096 (~1.0 ms) and up to 15% faster at
        // 4096x22016 and 13824x5120 (medians of interleaved runs, noisy VM).
        const DIRECT_ONE_ROW_PANELS: usize = 2;
        const DIRECT_PANELS: usize = 1;
        const MICRO_PANELS: usize = 1;
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            unsafe { Avx2(_mm256_set1_ps(x), _mm256_set1_ps(x)) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { Avx2(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe {
                _mm256_storeu_ps(p, self.0);
                _mm256_storeu_ps(p.add(8), self.1);
            }
        }
        #[inline(always)]
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
            unsafe { Avx2(_mm256_fmadd_ps(a.0, b.0, c.0), _mm256_fmadd_ps(a.1, b.1, c.1)) }
        }
        #[inline(always)]
        unsafe fn store_f16(self, p: *mut f16) {
            unsafe {
                const RNE: i32 = _MM_FROUND_TO_NEAREST_INT; // imm8 bits 0..2; exceptions are not raised by F16C either way
                _mm_storeu_si128(p.cast(), _mm256_cvtps_ph::<RNE>(self.0));
                _mm_storeu_si128(p.add(8).cast(), _mm256_cvtps_ph::<RNE>(self.1));
            }
        }
        #[inline(always)]
        unsafe fn load_words(p: *const i32) -> Self::Words {
            unsafe { (_mm256_loadu_si256(p.cast()), _mm256_loadu_si256(p.add(8).cast())) }
        }
        #[inline(always)]
        unsafe fn field(w: Self::Words, shift: u32, mask: u32) -> Self {
            unsafe {
                let (count, mask) = (_mm_cvtsi32_si128(shift as i32), _mm256_set1_epi32(mask as i32));
                let half = |v: __m256i| _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srl_epi32(v, count), mask));
                Avx2(half(w.0), half(w.1))
            }
        }
        #[inline(always)]
        unsafe fn field_in_place(w: Self::Words, mask: u32) -> Self {
            // No unsigned convert before AVX-512, and only the top field of a
            // word (mask reaching bit 31) needs one.
            unsafe {
                if mask >> 31 == 0 {
                    // Every other field: a plain signed convert is exact. (mask is a
                    // constant once the kernels unroll their field loop, so this test
                    // costs nothing there.)
                    let mask = _mm256_set1_epi32(mask as i32);
                    let half = |v: __m256i| _mm256_cvtepi32_ps(_mm256_and_si256(v, mask));
                    return Avx2(half(w.0), half(w.1));
                }
                // The top field: shift it down (nothing above it to mask off),
                // convert, and scale back by 2^shift. The field has at most 8
                // significant bits, so the convert and the power-of-two product are
                // exact: three instructions where masking the low 31 bits and adding
                // bit 31 back took six.
                let shift = mask.trailing_zeros();
                debug_assert_eq!(mask, u32::MAX << shift, "a field's bits in place");
                let (count, scale) = (_mm_cvtsi32_si128(shift as i32), _mm256_set1_ps((1u64 << shift) as f32));
                let half = |v: __m256i| _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srl_epi32(v, count)), scale);
                Avx2(half(w.0), half(w.1))
            }
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const f16) -> Self {
            unsafe { Avx2(_mm256_cvtph_ps(_mm_loadu_si128(p.cast())), _mm256_cvtph_ps(_mm_loadu_si128(p.add(8).cast()))) }
        }
        #[inline(always)]
        unsafe fn zero_points(row: *const i32, col: usize, bits: u32) -> Self {
            // Once per group and panel: the portable unpacking is fast enough.
            unsafe {
                let z = super::Portable::zero_points(row, col, bits);
                Self::load(z.0.as_ptr())
            }
        }
        #[inline(always)]
        unsafe fn field2(lo: Self::Words, hi: Self::Words, shift: u32, mask: u32) -> Self {
            unsafe {
                let (right, left) = (_mm_cvtsi32_si128(shift as i32), _mm_cvtsi32_si128(32 - shift as i32));
                let mask = _mm256_set1_epi32(mask as i32);
                let half = |l: __m256i, h: __m256i| {
                    let v = _mm256_or_si256(_mm256_srl_epi32(l, right), _mm256_sll_epi32(h, left));
                    _mm256_cvtepi32_ps(_mm256_and_si256(v, mask))
                };
                Avx2(half(lo.0, hi.0), half(lo.1, hi.1))
            }
        }
    }
}
