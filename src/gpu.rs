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
}

unsafe extern "C" {
    fn o4g_gemm(args: *const GemmArgs, stream: *mut c_void) -> i32;
    fn o4g_dequantize(args: *const GemmArgs, weights: *mut c_void, stream: *mut c_void) -> i32;
    fn o4g_permute_rows(
        src: *const i32,      // int32 [k * bits / 32, n], device memory
        dst: *mut i32,        // same shape, distinct buffer
        perm: *const i32,     // int32 [k]
        k: i64,
        n: i64,
        bits: i32,
        device: i32,
        stream: *mut c_void,  // cudaStream_t / hipStream_t
    ) -> i32;
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

fn gemm_args(shape: &GemmShape, ptrs: &DevicePointers, path: i32, variant: i32, device: i32) -> GemmArgs {
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
        path,
        variant,
        device,
    }
}

pub fn gemm(shape: &GemmShape, ptrs: &DevicePointers, path: i32, variant: i32, device: i32, stream: usize) -> Result<()> {
    let args = gemm_args(shape, ptrs, path, variant, device);
    status(unsafe { o4g_gemm(&args, stream as *mut c_void) }, "gptq_gemm")
}

pub fn dequantize(shape: &GemmShape, ptrs: &DevicePointers, weights: *mut c_void, device: i32, stream: usize) -> Result<()> {
    let args = gemm_args(shape, ptrs, 0, 0, device);
    status(unsafe { o4g_dequantize(&args, weights, stream as *mut c_void) }, "gptq_gemm (dequantize)")
}

#[allow(clippy::too_many_arguments)]
pub fn permute_rows(src: *const i32, dst: *mut i32, perm: *const i32, k: usize, n: usize, bits: u32, device: i32, stream: usize) -> Result<()> {
    let code = unsafe { o4g_permute_rows(src, dst, perm, k as i64, n as i64, bits as i32, device, stream as *mut c_void) };
    status(code, "gptq_shuffle")
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
