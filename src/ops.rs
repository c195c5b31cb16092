//! gptq_gemm and the row permutation behind gptq_shuffle: import, validate, dispatch.

use crate::cpu;
use crate::dispatch::{
    DeviceCaps, Facts, KernelPath, MmaOperands, Variant, check_forced_path, choose_path, default_variant, mma_plan,
    tuned_mma_plan, tuned_wgmma_plan, wgmma_plan,
};
use crate::error::{Error, Result};
use crate::meta::Device;
use crate::quant::{
    self, GemmMetas, check_bits, check_gemm, check_group_indices, check_permutation, check_shuffle, check_workspace,
};
use crate::tensor::{Imported, import_optional};
use half::f16;
use pyo3::prelude::*;

/// The Python-level arguments of one gptq_gemm call.
pub struct GemmCall<'py> {
    pub a: Bound<'py, PyAny>,
    pub qweight: Bound<'py, PyAny>,
    pub qzeros: Bound<'py, PyAny>,
    pub scales: Bound<'py, PyAny>,
    pub g_idx: Option<Bound<'py, PyAny>>,
    pub out: Bound<'py, PyAny>,
    pub use_exllama: bool,
    pub bit: i64,
    pub use_v2_format: bool,
    /// Kernel path override ("skinny"/"tiled"/"exllama"); None lets dispatch choose.
    pub path: Option<String>,
    /// Opt4GPTQ variant name; None: the platform default.
    pub variant: Option<String>,
    pub stream: usize,
    /// float16 [K blocks, M, N]: where the split-K exllama variants store their
    /// K blocks' shares (GPU only; see dispatch::may_split_k). None where no call needs it.
    pub workspace: Option<Bound<'py, PyAny>>,
}

fn unsupported_device(name: &str, device: Device) -> Error {
    let backend = env!("O4G_BACKEND");
    let hint = match device {
        Device::Cuda(_) => "reinstall with OPT4GPTQ_GPU=cuda",
        Device::Rocm(_) => "reinstall with OPT4GPTQ_GPU=rocm",
        _ => "use CPU, CUDA or ROCm arrays",
    };
    Error::value(format!("{name} is on {device}, which this opt4gptq build ({backend}) cannot serve; {hint}"))
}

/// o4g_pack_order of a call's qweight: 4-bit weights that went through
/// gptq_shuffle (use_exllama=True) are in the tensor-core pack order.
pub fn pack_order(bits: u32, shuffled: bool) -> i32 {
    i32::from(bits == 4 && shuffled)
}

/// How a GPU launch is parameterized beyond the tensors (mirrors gpu::Launch on GPU builds).
pub struct Launch {
    pub path: i32,
    pub variant: i32,
    pub pack_order: i32,
    pub tile: i32,
    pub splits: i32,
}

/// The device's facts for the dispatch; None for CPU arrays.
#[cfg(o4g_gpu)]
pub fn gpu_caps(device: Device) -> Result<Option<DeviceCaps>> {
    match device {
        Device::Cpu => Ok(None),
        device if crate::gpu::serves(device) => Ok(Some(crate::gpu::device_caps(device.ordinal())?)),
        _ => Ok(None),
    }
}

#[cfg(not(o4g_gpu))]
pub fn gpu_caps(_device: Device) -> Result<Option<DeviceCaps>> {
    Ok(None)
}

/// Runs `work` without the GIL: the CPU backend can take a while on big shapes.
fn without_gil<T: Send>(py: Python<'_>, work: impl FnOnce() -> T + Send) -> T {
    py.detach(work)
}

/// The imported, validated tensors of one call.
struct Operands {
    a: Imported,
    qweight: Imported,
    qzeros: Imported,
    scales: Imported,
    g_idx: Option<Imported>,
    /// `out` [M, N], or for dequantize the dense `weights` [K, N].
    out: Imported,
    shape: quant::GemmShape,
    use_exllama: bool,
}

impl Operands {
    fn import(call: &GemmCall<'_>, out_name: &'static str, out_is_weights: bool) -> Result<Operands> {
        let a = Imported::from_py("a", &call.a)?;
        let qweight = Imported::from_py("b_q_weight", &call.qweight)?;
        let qzeros = Imported::from_py("b_gptq_qzeros", &call.qzeros)?;
        let scales = Imported::from_py("b_gptq_scales", &call.scales)?;
        let g_idx = import_optional("b_g_idx", call.g_idx.as_ref())?;
        let out = Imported::from_py(out_name, &call.out)?;
        out.expect_writable()?;
        let shape = check_gemm(
            &GemmMetas {
                a: &a.meta,
                qweight: &qweight.meta,
                qzeros: &qzeros.meta,
                scales: &scales.meta,
                g_idx: g_idx.as_ref().map(|g| &g.meta),
                out: &out.meta,
                out_is_weights,
                groups_from_rows: g_idx.is_none() || call.use_exllama,
            },
            call.bit,
            call.use_v2_format,
        )?;
        Ok(Operands { a, qweight, qzeros, scales, g_idx, out, shape, use_exllama: call.use_exllama })
    }

    /// (g_idx, permutation): with exllama the index tensor is the act-order
    /// permutation that gptq_shuffle already applied to the weight rows;
    /// otherwise it is the group of each row.
    fn index_roles(&self) -> (Option<&Imported>, Option<&Imported>) {
        if self.use_exllama { (None, self.g_idx.as_ref()) } else { (self.g_idx.as_ref(), None) }
    }
}

/// Returns which kernel ran: "cpu", "skinny", "tiled" or "exllama/<variant>".
pub fn gemm(py: Python<'_>, call: GemmCall<'_>) -> Result<String> {
    let operands = Operands::import(&call, "out", false)?;
    let Operands { a, qweight, qzeros, scales, out, shape, .. } = &operands;
    let shape = *shape;
    // Checked whenever given, like every operand, even where no kernel reads it.
    let workspace = import_optional("workspace", call.workspace.as_ref())?;
    if let Some(workspace) = &workspace {
        workspace.expect_writable()?;
        check_workspace(&workspace.meta, &a.meta, &shape)?;
    }
    let variant = call.variant.as_deref().map_or_else(|| Ok(default_variant()), Variant::parse)?;
    let (groups_of_rows, permutation) = operands.index_roles();
    let aligned = |t: &Imported, bytes: usize| (t.ptr() as usize) % bytes == 0;
    // 16-byte aligned activation rows, scales and zeros: what the tensor-core
    // kernels' 16-byte copies need (wgmma also needs an 8-byte aligned output).
    let copies_aligned = aligned(a, 16) && shape.lda % 8 == 0 && aligned(scales, 16) && aligned(qzeros, 16);
    let facts = Facts {
        use_exllama: call.use_exllama,
        has_g_idx: groups_of_rows.is_some(),
        weights_aligned: aligned(qweight, 16) && aligned(out, 4),
        variant_named: call.variant.is_some(),
        has_perm: permutation.is_some(),
        bulk_aligned: copies_aligned && aligned(out, 8),
        caps: gpu_caps(a.meta.device)?,
    };
    let path = match call.path.as_deref() {
        None => choose_path(&shape, &facts),
        Some(name) => {
            let path = KernelPath::parse(name)?;
            check_forced_path(path, &shape, &facts)?;
            path
        }
    };

    let device = a.meta.device;
    match device {
        Device::Cpu => {
            let (g_idx_values, perm_values) = unsafe {
                (groups_of_rows.map(|t| t.host_slice::<i32>()), permutation.map(|t| t.host_slice::<i32>()))
            };
            if let Some(values) = g_idx_values {
                check_group_indices("b_g_idx", values, shape.groups)?;
            }
            if let Some(values) = perm_values {
                check_permutation("b_g_idx (use_exllama=True: the act-order permutation)", values)?;
            }
            let problem = unsafe {
                cpu::CpuGemm {
                    shape,
                    a: a.host_slice::<f16>(),
                    qweight: qweight.host_slice::<i32>(),
                    qzeros: qzeros.host_slice::<i32>(),
                    scales: scales.host_slice::<f16>(),
                    g_idx: g_idx_values,
                    perm: perm_values,
                    tc_order: pack_order(shape.bits, call.use_exllama) == 1,
                }
            };
            let out_values = unsafe { out.host_slice_mut::<f16>() };
            without_gil(py, || cpu::gemm(&problem, out_values));
        }
        _ => {
            // The block shape and K split of the tensor-core paths (tile, splits).
            let (tile, splits) = match path {
                KernelPath::Wgmma => {
                    let caps = facts.caps.unwrap_or(DeviceCaps::with_sms(true, 1));
                    let plan = tuned_wgmma_plan(wgmma_plan(shape.m, shape.n, shape.k, &caps), shape.k)?;
                    (plan.tile, plan.splits)
                }
                KernelPath::Mma => {
                    let caps = facts.caps.unwrap_or(DeviceCaps::with_sms(false, 1));
                    let operands = MmaOperands {
                        tiled_readable: !facts.has_perm && copies_aligned,
                    };
                    let (m, n, k) = (shape.m, shape.n, shape.k);
                    let plan = tuned_mma_plan(mma_plan(m, n, k, &caps, operands), m, n, k, &caps, operands)?;
                    (plan.shape, plan.splits)
                }
                _ => (0, 1),
            };
            let launch = Launch {
                path: path as i32,
                variant: variant.flags(),
                pack_order: pack_order(shape.bits, call.use_exllama),
                tile: tile as i32,
                splits: splits as i32,
            };
            gpu_gemm(&shape, a, qweight, qzeros, scales, groups_of_rows, permutation, out, workspace.as_ref(), &launch, call.stream)?
        }
    }
    Ok(match (device, path) {
        (Device::Cpu, _) => "cpu".to_string(),
        (_, KernelPath::Exllama) => format!("exllama/{}", variant.name()),
        (_, path) => path.name().to_string(),
    })
}

#[cfg(o4g_gpu)]
#[allow(clippy::too_many_arguments)]
fn gpu_gemm(
    shape: &quant::GemmShape,
    a: &Imported,
    qweight: &Imported,
    qzeros: &Imported,
    scales: &Imported,
    g_idx: Option<&Imported>,
    perm: Option<&Imported>,
    out: &Imported,
    workspace: Option<&Imported>,
    launch: &Launch,
    stream: usize,
) -> Result<()> {
    let device = a.meta.device;
    if !crate::gpu::serves(device) {
        return Err(unsupported_device("a", device));
    }
    let exllama = launch.path == KernelPath::Exllama as i32;
    if exllama && launch.variant & 1 == 0 && workspace.is_none() {
        let name = Variant::ALL.iter().find(|v| v.flags() == launch.variant).map_or("?", |v| v.name());
        return Err(Error::value(format!(
            "variant {name:?} stores its K blocks' shares in a float16 [K blocks, M, N] workspace, and none was given \
             (workspace=None; opt4gptq.gptq_gemm allocates one)"
        )));
    }
    let null = std::ptr::null();
    let ptrs = crate::gpu::DevicePointers {
        a: a.ptr(),
        qweight: qweight.ptr().cast(),
        qzeros: qzeros.ptr().cast(),
        scales: scales.ptr(),
        g_idx: g_idx.map_or(null, |t| t.ptr().cast()),
        perm: perm.map_or(null, |t| t.ptr().cast()),
        out: out.ptr(),
        workspace: workspace.map_or(std::ptr::null_mut(), Imported::ptr),
    };
    let launch = crate::gpu::Launch {
        path: launch.path,
        variant: launch.variant,
        pack_order: launch.pack_order,
        tile: launch.tile,
        splits: launch.splits,
    };
    crate::gpu::gemm(shape, &ptrs, &launch, device.ordinal(), stream)
}

#[cfg(not(o4g_gpu))]
#[allow(clippy::too_many_arguments)]
fn gpu_gemm(
    _shape: &quant::GemmShape,
    a: &Imported,
    _qweight: &Imported,
    _qzeros: &Imported,
    _scales: &Imported,
    _g_idx: Option<&Imported>,
    _perm: Option<&Imported>,
    _out: &Imported,
    _workspace: Option<&Imported>,
    _launch: &Launch,
    _stream: usize,
) -> Result<()> {
    Err(unsupported_device("a", a.meta.device))
}

/// Dense fp16 weights [K, N] in the activations' row order, for a vendor GEMM.
/// `a` is the call's activations: only validated, never read.
pub fn dequantize(call: GemmCall<'_>) -> Result<()> {
    let operands = Operands::import(&call, "weights", true)?;
    let (groups_of_rows, permutation) = operands.index_roles();
    let o = &operands;
    let order = pack_order(o.shape.bits, o.use_exllama);
    gpu_dequantize(&o.shape, &o.qweight, &o.qzeros, &o.scales, groups_of_rows, permutation, order, &o.out, call.stream)
}

#[cfg(o4g_gpu)]
#[allow(clippy::too_many_arguments)]
fn gpu_dequantize(
    shape: &quant::GemmShape,
    qweight: &Imported,
    qzeros: &Imported,
    scales: &Imported,
    g_idx: Option<&Imported>,
    perm: Option<&Imported>,
    pack_order: i32,
    weights: &Imported,
    stream: usize,
) -> Result<()> {
    let device = qweight.meta.device;
    if !crate::gpu::serves(device) {
        return Err(unsupported_device("b_q_weight", device));
    }
    let null = std::ptr::null();
    let ptrs = crate::gpu::DevicePointers {
        a: std::ptr::null(),
        qweight: qweight.ptr().cast(),
        qzeros: qzeros.ptr().cast(),
        scales: scales.ptr(),
        g_idx: g_idx.map_or(null, |t| t.ptr().cast()),
        perm: perm.map_or(null, |t| t.ptr().cast()),
        out: std::ptr::null_mut(),
        workspace: std::ptr::null_mut(),
    };
    crate::gpu::dequantize(shape, &ptrs, pack_order, weights.ptr(), device.ordinal(), stream)
}

#[cfg(not(o4g_gpu))]
#[allow(clippy::too_many_arguments)]
fn gpu_dequantize(
    _shape: &quant::GemmShape,
    qweight: &Imported,
    _qzeros: &Imported,
    _scales: &Imported,
    _g_idx: Option<&Imported>,
    _perm: Option<&Imported>,
    _pack_order: i32,
    _weights: &Imported,
    _stream: usize,
) -> Result<()> {
    Err(unsupported_device("b_q_weight", qweight.meta.device))
}

/// gptq_shuffle's engine half: dst row r = src row perm[r] (perm None: row r),
/// packed in the shuffled layout (4-bit: the tensor-core pack order). src and
/// dst must not overlap.
pub fn permute_rows(
    py: Python<'_>,
    src: &Bound<'_, PyAny>,
    dst: &Bound<'_, PyAny>,
    perm: Option<&Bound<'_, PyAny>>,
    bit: i64,
    stream: usize,
) -> Result<()> {
    let bits = check_bits(bit)?;
    let src = Imported::from_py("q_weight", src)?;
    let dst = Imported::from_py("q_weight (destination)", dst)?;
    let perm = import_optional("q_perm", perm)?;
    dst.expect_writable()?;
    let (k, n) = check_shuffle(&src.meta, perm.as_ref().map(|p| &p.meta), bits)?;
    let (_, _) = check_shuffle(&dst.meta, None, bits)?;
    if dst.meta.shape != src.meta.shape || dst.meta.device != src.meta.device {
        return Err(Error::value("the shuffle destination must match q_weight in shape and device"));
    }
    if src.ptr() == dst.ptr() && k > 0 && n > 0 {
        return Err(Error::value("the shuffle source and destination must be distinct buffers"));
    }
    match src.meta.device {
        Device::Cpu => {
            let perm_values = unsafe { perm.as_ref().map(|p| p.host_slice::<i32>()) };
            if let Some(values) = perm_values {
                check_permutation("q_perm", values)?;
            }
            let (src_values, dst_values) = unsafe { (src.host_slice::<i32>(), dst.host_slice_mut::<i32>()) };
            without_gil(py, || cpu::permute_rows(src_values, dst_values, perm_values, k, n, bits));
            Ok(())
        }
        device => gpu_permute_rows(&src, &dst, perm.as_ref(), k, n, bits, device, stream),
    }
}

#[cfg(o4g_gpu)]
#[allow(clippy::too_many_arguments)]
fn gpu_permute_rows(src: &Imported, dst: &Imported, perm: Option<&Imported>, k: usize, n: usize, bits: u32, device: Device, stream: usize) -> Result<()> {
    if !crate::gpu::serves(device) {
        return Err(unsupported_device("q_weight", device));
    }
    let perm = perm.map_or(std::ptr::null(), |p| p.ptr().cast());
    let order = pack_order(bits, true);
    crate::gpu::permute_rows(src.ptr().cast(), dst.ptr().cast(), perm, k, n, bits, order, device.ordinal(), stream)
}

#[cfg(not(o4g_gpu))]
#[allow(clippy::too_many_arguments)]
fn gpu_permute_rows(_src: &Imported, _dst: &Imported, _perm: Option<&Imported>, _k: usize, _n: usize, _bits: u32, device: Device, _stream: usize) -> Result<()> {
    Err(unsupported_device("q_weight", device))
}
