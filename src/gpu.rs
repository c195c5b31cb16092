//! The Rust side of csrc/opt4gptq.h. Only compiled into GPU builds.

use crate::error::{Error, Result};
use crate::meta::Device;
use crate::quant::GemmShape;
use std::ffi::{CStr, c_char, c_void};

#[repr(C)]
struct GemmArgs {
    a: *const c_void,         // fp16 [m, k], row stride lda
    qweight: *const i32,      // int32 [k * bits / 32, n]
    qzeros: *const i32,       // int32 [groups, n * bits / 32]
    scales: *const c_void,    // fp16 [groups, n]
    g_idx: *const i32,        // int32 [k] or null
    perm: *const i32,         // int32 [k] or null
    out: *mut c_void,         // fp16 [m, n], contiguous
    workspace: *mut c_void,   // fp16 [ceil(k / 128), m, n] (split-K exllama variants) or null
    m: i64,
    k: i64,
    n: i64,
    groups: i64,
    lda: i64,
    bits: i32,
    zero_offset: i32,         // 1: v1, 0: v2
    path: i32,                // o4g_path
    variant: i32,             // o4g_variant_flag bits (exllama path)
    device: i32,              // device ordinal of every pointer above
    pack_order: i32,          // o4g_pack_order of qweight
    tile: i32,                // wgmma / mma path: block shape index (dispatch::WGMMA_TILES / MMA_SHAPES)
    splits: i32,              // wgmma / mma (tiled) path: cluster blocks that split K
}

#[repr(C)]
#[derive(Default)]
struct DeviceCapsC {
    major: i32,
    minor: i32,
    sms: i32,
    wgmma_cluster_slots: [[i32; crate::dispatch::WGMMA_MAX_SPLITS]; crate::dispatch::WGMMA_TILES.len()],
}

unsafe extern "C" {
    fn o4g_gemm(args: *const GemmArgs, stream: *mut c_void) -> i32;
    fn o4g_dequantize(args: *const GemmArgs, weights: *mut c_void, stream: *mut c_void) -> i32;
    fn o4g_permute_rows(
        src: *const i32,      // int32 [k * bits / 32, n], device memory
        dst: *mut i32,        // same shape, distinct buffer
        perm: *const i32,     // int32 [k], or null: rows stay in place
        k: i64,
        n: i64,
        bits: i32,
        pack_order: i32,      // o4g_pack_order to write
        device: i32,
        stream: *mut c_void,  // cudaStream_t / hipStream_t
    ) -> i32;
    fn o4g_get_device_caps(device: i32, caps: *mut DeviceCapsC) -> i32;
    fn o4g_stream_synchronize(device: i32, stream: *mut c_void) -> i32;
    fn o4g_device_count(count: *mut i32) -> i32;
    fn o4g_device_name(device: i32, buf: *mut c_char, len: i32) -> i32;
    fn o4g_platform() -> *const c_char;
    fn o4g_last_error() -> *const c_char;
}

fn status(code: i32, what: &str) -> Result<()> {
    if code == 0 {
        return Ok(());
    }
    let detail = unsafe { CStr::from_ptr(o4g_last_error()) }.to_string_lossy().into_owned();
    Err(Error::runtime(format!("{what} failed on the GPU: {detail}")))
}

pub fn platform() -> &'static str {
    unsafe { CStr::from_ptr(o4g_platform()) }.to_str().unwrap_or("gpu")
}

/// Whether this build's kernels can run on `device`.
pub fn serves(device: Device) -> bool {
    matches!((platform(), device), ("cuda", Device::Cuda(_)) | ("rocm", Device::Rocm(_)))
}

pub struct DevicePointers {
    pub a: *const c_void,
    pub qweight: *const i32,
    pub qzeros: *const i32,
    pub scales: *const c_void,
    pub g_idx: *const i32,
    pub perm: *const i32,
    pub out: *mut c_void,
    /// fp16 split-K shares, one [m, n] slice per K block, or null.
    pub workspace: *mut c_void,
}

/// How one GPU gemm runs: the kernel family and what it needs to know beyond the shape.
pub struct Launch {
    pub path: i32,
    pub variant: i32,
    pub pack_order: i32,
    pub tile: i32,
    pub splits: i32,
}

fn gemm_args(shape: &GemmShape, ptrs: &DevicePointers, launch: &Launch, device: i32) -> GemmArgs {
    GemmArgs {
        a: ptrs.a,
        qweight: ptrs.qweight,
        qzeros: ptrs.qzeros,
        scales: ptrs.scales,
        g_idx: ptrs.g_idx,
        perm: ptrs.perm,
        out: ptrs.out,
        workspace: ptrs.workspace,
        m: shape.m as i64,
        k: shape.k as i64,
        n: shape.n as i64,
        groups: shape.groups as i64,
        lda: shape.lda as i64,
        bits: shape.bits as i32,
        zero_offset: shape.zero_offset,
        path: launch.path,
        variant: launch.variant,
        device,
        pack_order: launch.pack_order,
        tile: launch.tile,
        splits: launch.splits,
    }
}

pub fn gemm(shape: &GemmShape, ptrs: &DevicePointers, launch: &Launch, device: i32, stream: usize) -> Result<()> {
    let args = gemm_args(shape, ptrs, launch, device);
    status(unsafe { o4g_gemm(&args, stream as *mut c_void) }, "gptq_gemm")
}

pub fn dequantize(shape: &GemmShape, ptrs: &DevicePointers, pack_order: i32, weights: *mut c_void, device: i32, stream: usize) -> Result<()> {
    let launch = Launch { path: 0, variant: 0, pack_order, tile: 0, splits: 1 };
    let args = gemm_args(shape, ptrs, &launch, device);
    status(unsafe { o4g_dequantize(&args, weights, stream as *mut c_void) }, "gptq_gemm (dequantize)")
}

#[allow(clippy::too_many_arguments)]
pub fn permute_rows(src: *const i32, dst: *mut i32, perm: *const i32, k: usize, n: usize, bits: u32, pack_order: i32, device: i32, stream: usize) -> Result<()> {
    let code = unsafe {
        o4g_permute_rows(src, dst, perm, k as i64, n as i64, bits as i32, pack_order, device, stream as *mut c_void)
    };
    status(code, "gptq_shuffle")
}

/// Compute capability and multiprocessor count of `device`, read once per device.
pub fn device_caps(device: i32) -> Result<crate::dispatch::DeviceCaps> {
    use std::sync::Mutex;
    static CACHE: Mutex<Vec<(i32, crate::dispatch::DeviceCaps)>> = Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, caps)) = cache.iter().find(|(ordinal, _)| *ordinal == device) {
        return Ok(*caps);
    }
    let mut raw = DeviceCapsC::default();
    status(unsafe { o4g_get_device_caps(device, &mut raw) }, "device query")?;
    // sm_90a device code runs on compute capability 9.0 only.
    let mut caps = crate::dispatch::DeviceCaps::with_sms(
        env!("O4G_WGMMA") == "1" && raw.major == 9 && raw.minor == 0,
        raw.sms.max(1) as usize,
    );
    caps.clusters = raw.major >= 9;
    for (known, reported) in caps.wgmma_cluster_slots.iter_mut().zip(raw.wgmma_cluster_slots) {
        for (slots, clusters) in known.iter_mut().zip(reported) {
            *slots = clusters.clamp(0, u16::MAX as i32) as u16;
        }
    }
    cache.push((device, caps));
    Ok(caps)
}

pub fn stream_synchronize(device: i32, stream: usize) -> Result<()> {
    status(unsafe { o4g_stream_synchronize(device, stream as *mut c_void) }, "stream synchronize")
}

pub fn device_names() -> Vec<String> {
    let mut count = 0i32;
    unsafe { o4g_device_count(&mut count) };
    (0..count)
        .map(|device| {
            let mut buf = [0 as c_char; 256];
            if unsafe { o4g_device_name(device, buf.as_mut_ptr(), buf.len() as i32) } != 0 {
                return format!("device {device}");
            }
            unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned()
        })
        .collect()
}
