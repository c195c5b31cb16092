//! The GPTQ tensor format: which shapes fit together, and how values are packed.
//!
//! Packing (GPTQ "v1"/"v2" checkpoints): along the packed axis, values form a
//! little-endian bit stream of 32-bit words; value i occupies stream bits
//! [i*bits, i*bits + bits). qweight is packed along K (rows), qzeros along N.
//! 32 consecutive values always fill exactly `bits` words, which is why K must
//! be a multiple of 32 (every pack of rows starts on a word boundary).

use crate::error::{Error, Result};
use crate::meta::{DType, TensorMeta, expect_same_device};

pub const SUPPORTED_BITS: [u32; 4] = [2, 3, 4, 8];

pub fn check_bits(bit: i64) -> Result<u32> {
    match u32::try_from(bit) {
        Ok(b) if SUPPORTED_BITS.contains(&b) => Ok(b),
        _ => Err(Error::value(format!("bit must be one of 2, 3, 4, 8; got {bit}"))),
    }
}

/// Value `index` of a bit stream whose word `w` is `word(w)`.
#[inline(always)]
pub fn unpack_value(bits: u32, index: usize, word: impl Fn(usize) -> u32) -> u32 {
    let bit = index * bits as usize;
    let (w, offset) = (bit / 32, (bit % 32) as u32);
    let mut value = word(w) >> offset;
    if offset + bits > 32 {
        value |= word(w + 1) << (32 - offset);
    }
    value & ((1u32 << bits) - 1)
}

/// Writes `value` as stream value `index` into words that start zeroed.
#[inline(always)]
/// The tensor-core pack order of shuffled 4-bit weights (README, "Weight
/// layout"; csrc/gptq/common.cuh): stream position 8t + j of a 32-row pack
/// holds row 16 (j % 2) + 8 ((j / 2) % 2) + 2t + j / 4. Returns the position of `row` (0..32).
pub const fn tc_position_of_row(row: usize) -> usize {
    let j = row / 16 + 2 * ((row / 8) % 2) + 4 * (row % 2);
    8 * ((row % 8) / 2) + j
}

pub fn pack_value(bits: u32, index: usize, value: u32, words: &mut [u32]) {
    let bit = index * bits as usize;
    let (w, offset) = (bit / 32, (bit % 32) as u32);
    words[w] |= value << offset;
    if offset + bits > 32 {
        words[w + 1] |= value >> (32 - offset);
    }
}

/// The checked sizes of one gptq_gemm call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmShape {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub groups: usize,
    pub bits: u32,
    /// Row stride of `a` in elements (>= k; a may be a row-strided view).
    pub lda: usize,
    /// 1 for GPTQ v1 (qzeros store zero - 1), 0 for v2.
    pub zero_offset: i32,
}

impl GemmShape {
    pub fn group_size(&self) -> usize {
        self.k / self.groups
    }
    pub fn zero_words(&self) -> usize {
        self.n * self.bits as usize / 32
    }
}

pub struct GemmMetas<'a> {
    pub a: &'a TensorMeta,
    pub qweight: &'a TensorMeta,
    pub qzeros: &'a TensorMeta,
    pub scales: &'a TensorMeta,
    pub g_idx: Option<&'a TensorMeta>,
    /// The [M, N] output, or for dequantize the [K, N] dense weights (`out_is_weights`).
    pub out: &'a TensorMeta,
    pub out_is_weights: bool,
    /// The kernel derives each row's group as row / (K / groups): no g_idx, or
    /// the exllama path. Then the group count must divide K. With an explicit
    /// g_idx (a row-parallel act-order shard indexes the full layer's groups) it need not.
    pub groups_from_rows: bool,
}

fn to_usize(value: i64) -> usize {
    usize::try_from(value).unwrap_or(0)
}

/// Every shape/dtype/device rule of gptq_gemm, each failure naming its argument.
pub fn check_gemm(t: &GemmMetas<'_>, bit: i64, use_v2_format: bool) -> Result<GemmShape> {
    let bits = check_bits(bit)?;
    t.a.expect_dtype(DType::F16)?;
    t.qweight.expect_dtype(DType::I32)?;
    t.qzeros.expect_dtype(DType::I32)?;
    t.scales.expect_dtype(DType::F16)?;
    t.out.expect_dtype(DType::F16)?;
    if let Some(g_idx) = t.g_idx {
        g_idx.expect_dtype(DType::I32)?;
    }

    t.a.expect_ndim(2, "[M, K] activations")?;
    t.qweight.expect_ndim(2, "[K * bit / 32, N] packed weights")?;
    t.qzeros.expect_ndim(2, "[groups, N * bit / 32] packed zero points")?;
    t.scales.expect_ndim(2, "[groups, N] scales")?;
    let (m, k) = (t.a.dim(0), t.a.dim(1));
    if k <= 0 || k % 32 != 0 {
        return Err(Error::value(format!(
            "a has K={k} columns; K must be a positive multiple of 32 (GPTQ packs 32 rows into `bit` int32 words)"
        )));
    }
    let packed_rows = k * bits as i64 / 32;
    if t.qweight.dim(0) != packed_rows {
        return Err(Error::value(format!(
            "b_q_weight has {} rows but a has K={k} columns; with bit={bits} b_q_weight must have K * bit / 32 = {packed_rows} rows",
            t.qweight.dim(0)
        )));
    }
    let n = t.qweight.dim(1);
    if n <= 0 || (n * bits as i64) % 32 != 0 {
        return Err(Error::value(format!(
            "b_q_weight has N={n} columns; N * bit must be a positive multiple of 32 so the zero points pack into whole int32 words"
        )));
    }
    let groups = t.scales.dim(0);
    if t.scales.dim(1) != n {
        return Err(Error::value(format!(
            "b_gptq_scales has {} columns but b_q_weight has N={n}",
            t.scales.dim(1)
        )));
    }
    if groups <= 0 || (t.groups_from_rows && k % groups != 0) {
        return Err(Error::value(format!(
            "b_gptq_scales has {groups} groups (rows), which does not divide K={k}; the group size K / groups must be whole"
        )));
    }
    t.qzeros.expect_shape(&[groups, n * bits as i64 / 32], "[groups, N * bit / 32], groups from b_gptq_scales")?;
    if let Some(g_idx) = t.g_idx {
        g_idx.expect_shape(&[k], "one entry per input row K")?;
    }
    if t.out_is_weights {
        t.out.expect_shape(&[k, n], "[K, N] dense weights")?;
    } else {
        t.out.expect_shape(&[m, n], "[M, N]")?;
    }

    let mut others = vec![t.qweight, t.qzeros, t.scales, t.out];
    others.extend(t.g_idx);
    expect_same_device(t.a, &others)?;
    for tensor in &others {
        tensor.expect_contiguous()?;
    }
    if t.a.strides[1] != 1 && m > 0 {
        return Err(Error::value(format!(
            "a must have unit stride along K; got strides {:?} (call .contiguous() first)",
            t.a.strides
        )));
    }
    let lda = if m <= 1 { k } else { t.a.strides[0] };
    if lda < k {
        return Err(Error::value(format!("a rows overlap: row stride {lda} < K={k}")));
    }
    Ok(GemmShape {
        m: to_usize(m),
        k: to_usize(k),
        n: to_usize(n),
        groups: to_usize(groups),
        bits,
        lda: to_usize(lda),
        zero_offset: if use_v2_format { 0 } else { 1 },
    })
}

/// The split-K workspace: float16 on a's device, contiguous, with room for one
/// [M, N] slice of shares per K block (any shape; gptq_gemm passes [blocks, M, N]).
pub fn check_workspace(workspace: &TensorMeta, a: &TensorMeta, shape: &GemmShape) -> Result<()> {
    workspace.expect_dtype(DType::F16)?;
    expect_same_device(a, &[workspace])?;
    workspace.expect_contiguous()?;
    let elements: i64 = workspace.shape.iter().product();
    let blocks = crate::dispatch::split_k_blocks(shape.k);
    let needed = blocks * shape.m * shape.n;
    if to_usize(elements) < needed {
        return Err(Error::value(format!(
            "{} has {elements} elements; the split-K shares need a float16 [K blocks, M, N] = [{blocks}, {}, {}] \
             workspace ({needed} elements)",
            workspace.name, shape.m, shape.n
        )));
    }
    Ok(())
}

/// Shapes of gptq_shuffle / permute_rows: returns (k, n).
pub fn check_shuffle(q_weight: &TensorMeta, q_perm: Option<&TensorMeta>, bits: u32) -> Result<(usize, usize)> {
    q_weight.expect_dtype(DType::I32)?;
    q_weight.expect_ndim(2, "[K * bit / 32, N] packed weights")?;
    q_weight.expect_contiguous()?;
    let rows = q_weight.dim(0);
    if (rows * 32) % bits as i64 != 0 || (rows * 32 / bits as i64) % 32 != 0 {
        return Err(Error::value(format!(
            "q_weight has {rows} rows; with bit={bits} that is not a whole number of 32-row packs"
        )));
    }
    let k = rows * 32 / bits as i64;
    if let Some(perm) = q_perm {
        perm.expect_dtype(DType::I32)?;
        perm.expect_shape(&[k], "one entry per input row K = q_weight rows * 32 / bit")?;
        perm.expect_contiguous()?;
        expect_same_device(q_weight, &[perm])?;
    }
    Ok((to_usize(k), to_usize(q_weight.dim(1))))
}

/// `perm` must be a permutation of 0..k (what vLLM passes: argsort(g_idx)).
pub fn check_permutation(name: &str, perm: &[i32]) -> Result<()> {
    let mut seen = vec![false; perm.len()];
    for (position, &value) in perm.iter().enumerate() {
        let index = usize::try_from(value).ok().filter(|&v| v < perm.len());
        match index {
            Some(v) if !seen[v] => seen[v] = true,
            Some(_) => {
                return Err(Error::value(format!(
                    "{name} must be a permutation of 0..{} (argsort of g_idx); value {value} repeats at position {position}",
                    perm.len()
                )));
            }
            None => {
                return Err(Error::value(format!(
                    "{name} must be a permutation of 0..{}; got {value} at position {position}",
                    perm.len()
                )));
            }
        }
    }
    Ok(())
}

/// Every g_idx entry names an existing group.
pub fn check_group_indices(name: &str, g_idx: &[i32], groups: usize) -> Result<()> {
    if let Some((position, value)) = g_idx.iter().enumerate().find(|(_, v)| usize::try_from(**v).map_or(true, |v| v >= groups)) {
        return Err(Error::value(format!(
            "{name}[{position}] = {value} is out of range: there are {groups} groups (rows of b_gptq_scales)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::Device;

    fn meta(name: &'static str, dtype: DType, shape: &[i64]) -> TensorMeta {
        TensorMeta::new(name, Device::Cpu, dtype, shape.to_vec(), None)
    }

    struct Case {
        a: TensorMeta,
        qweight: TensorMeta,
        qzeros: TensorMeta,
        scales: TensorMeta,
        g_idx: Option<TensorMeta>,
        out: TensorMeta,
    }

    impl Case {
        fn new(m: i64, k: i64, n: i64, groups: i64, bits: i64) -> Case {
            Case {
                a: meta("a", DType::F16, &[m, k]),
                qweight: meta("b_q_weight", DType::I32, &[k * bits / 32, n]),
                qzeros: meta("b_gptq_qzeros", DType::I32, &[groups, n * bits / 32]),
                scales: meta("b_gptq_scales", DType::F16, &[groups, n]),
                g_idx: Some(meta("b_g_idx", DType::I32, &[k])),
                out: meta("out", DType::F16, &[m, n]),
            }
        }
        fn check(&self, bits: i64) -> Result<GemmShape> {
            check_gemm(
                &GemmMetas {
                    a: &self.a,
                    qweight: &self.qweight,
                    qzeros: &self.qzeros,
                    scales: &self.scales,
                    g_idx: self.g_idx.as_ref(),
                    out: &self.out,
                    out_is_weights: false,
                    groups_from_rows: true,
                },
                bits,
                false,
            )
        }
    }

    #[test]
    fn accepts_checkpoint_shapes_for_every_bit_width() {
        for bits in [2, 3, 4, 8] {
            let shape = Case::new(5, 4096, 11008, 32, bits).check(bits).unwrap();
            assert_eq!((shape.m, shape.k, shape.n, shape.groups, shape.group_size()), (5, 4096, 11008, 32, 128));
        }
    }

    #[test]
    fn rejects_each_bad_argument_by_name() {
        let mut c = Case::new(2, 256, 64, 2, 4);
        assert!(c.check(5).unwrap_err().to_string().contains("bit"));
        c.scales = meta("b_gptq_scales", DType::F16, &[3, 64]);
        c.qzeros = meta("b_gptq_qzeros", DType::I32, &[3, 8]);
        assert!(c.check(4).unwrap_err().to_string().contains("does not divide K=256"));
        let mut c = Case::new(2, 256, 64, 2, 4);
        c.qweight = meta("b_q_weight", DType::I32, &[31, 64]);
        assert!(c.check(4).unwrap_err().to_string().starts_with("b_q_weight has 31 rows"));
        let mut c = Case::new(2, 256, 64, 2, 4);
        c.g_idx = Some(meta("b_g_idx", DType::I32, &[255]));
        assert!(c.check(4).unwrap_err().to_string().starts_with("b_g_idx"));
        let mut c = Case::new(2, 256, 64, 2, 4);
        c.out.device = Device::Cuda(0);
        assert!(c.check(4).unwrap_err().to_string().contains("out is on cuda:0"));
        let mut c = Case::new(2, 100, 64, 2, 4);
        c.qweight = meta("b_q_weight", DType::I32, &[12, 64]);
        assert!(c.check(4).unwrap_err().to_string().contains("multiple of 32"));
    }

    #[test]
    fn workspace_is_float16_contiguous_on_the_same_device_with_a_slice_per_k_block() {
        let c = Case::new(4, 256, 64, 2, 4);
        let shape = c.check(4).unwrap();
        // K = 256: two blocks of 128 rows, two [4, 64] slices of shares.
        assert!(check_workspace(&meta("workspace", DType::F16, &[2, 4, 64]), &c.a, &shape).is_ok());
        assert!(check_workspace(&meta("workspace", DType::F16, &[600]), &c.a, &shape).is_ok());
        let message = check_workspace(&meta("workspace", DType::Other(0, 64, 1), &[2, 4, 64]), &c.a, &shape).unwrap_err().to_string();
        assert!(message.contains("workspace must be float16; got int64"), "{message}");
        let message = check_workspace(&meta("workspace", DType::F16, &[2, 4, 63]), &c.a, &shape).unwrap_err().to_string();
        assert!(message.starts_with("workspace has 504 elements") && message.contains("[2, 4, 64]"), "{message}");
        let strided = TensorMeta::new("workspace", Device::Cpu, DType::F16, vec![2, 4, 64], Some(vec![512, 128, 1]));
        assert!(check_workspace(&strided, &c.a, &shape).unwrap_err().to_string().contains("contiguous"));
        let mut elsewhere = meta("workspace", DType::F16, &[2, 4, 64]);
        elsewhere.device = Device::Cuda(0);
        assert!(check_workspace(&elsewhere, &c.a, &shape).unwrap_err().to_string().contains("workspace is on cuda:0"));
    }

    #[test]
    fn bit_stream_round_trips_including_straddling_3bit_values() {
        for bits in SUPPORTED_BITS {
            let values: Vec<u32> = (0..32).map(|i| (i * 7 + 3) % (1 << bits)).collect();
            let mut words = vec![0u32; bits as usize];
            for (i, v) in values.iter().enumerate() {
                pack_value(bits, i, *v, &mut words);
            }
            for (i, v) in values.iter().enumerate() {
                assert_eq!(unpack_value(bits, i, |w| words[w]), *v, "bits={bits} index={i}");
            }
        }
        // 3-bit value 10 spans bits 30..33: its top bit lands in word 1, bit 0.
        let mut words = [0u32; 3];
        pack_value(3, 10, 0b111, &mut words);
        assert_eq!(words, [0xC000_0000, 1, 0]);
    }

    #[test]
    fn permutation_and_group_checks() {
        assert!(check_permutation("p", &[2, 0, 1]).is_ok());
        assert!(check_permutation("p", &[2, 2, 1]).unwrap_err().to_string().contains("repeats"));
        assert!(check_permutation("p", &[0, 3, 1]).is_err());
        assert!(check_group_indices("g", &[0, 1, 1], 2).is_ok());
        assert!(check_group_indices("g", &[0, -1], 2).unwrap_err().to_string().contains("g[1] = -1"));
    }

    #[test]
    fn tensor_core_pack_order_is_a_permutation_with_adjacent_rows_in_each_nibble_pair() {
        // Position 8t + j holds row 16 (j % 2) + 8 ((j / 2) % 2) + 2t + j / 4: invert it directly.
        let mut seen = [false; 32];
        for t in 0..4 {
            for j in 0..8 {
                let row = 16 * (j % 2) + 8 * ((j / 2) % 2) + 2 * t + j / 4;
                assert_eq!(tc_position_of_row(row), 8 * t + j);
                seen[row] = true;
            }
            for j in 0..4 {
                let low = (0..32).find(|&r| tc_position_of_row(r) == 8 * t + j).unwrap();
                let high = (0..32).find(|&r| tc_position_of_row(r) == 8 * t + j + 4).unwrap();
                assert_eq!(high, low + 1, "nibbles ({j}, {}) of word {t}", j + 4);
            }
        }
        assert!(seen.iter().all(|&s| s));
    }
}
