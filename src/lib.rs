//! opt4gptq's engine. This file only registers the native module `opt4gptq._C`;
//! the work lives in the modules below, and the public API in python/opt4gptq.

pub mod cpu;
pub mod dispatch;
pub mod error;
#[cfg(o4g_gpu)]
pub mod gpu;
pub mod meta;
pub mod ops;
pub mod quant;
pub mod tensor;

use pyo3::prelude::*;

/// Low-level gptq_gemm on DLPack capsules; returns the kernel that ran.
#[pyfunction]
#[pyo3(signature = (a, b_q_weight, b_gptq_qzeros, b_gptq_scales, b_g_idx, out, use_exllama, bit, use_v2_format, path, variant, stream, workspace=None))]
#[allow(clippy::too_many_arguments)]
fn gemm<'py>(
    py: Python<'py>,
    a: Bound<'py, PyAny>,
    b_q_weight: Bound<'py, PyAny>,
    b_gptq_qzeros: Bound<'py, PyAny>,
    b_gptq_scales: Bound<'py, PyAny>,
    b_g_idx: Option<Bound<'py, PyAny>>,
    out: Bound<'py, PyAny>,
    use_exllama: bool,
    bit: i64,
    use_v2_format: bool,
    path: Option<String>,
    variant: Option<String>,
    stream: usize,
    workspace: Option<Bound<'py, PyAny>>,
) -> PyResult<String> {
    let call = ops::GemmCall {
        a,
        qweight: b_q_weight,
        qzeros: b_gptq_qzeros,
        scales: b_gptq_scales,
        g_idx: b_g_idx,
        out,
        use_exllama,
        bit,
        use_v2_format,
        path,
        variant,
        stream,
        workspace,
    };
    Ok(ops::gemm(py, call)?)
}

/// Low-level dequantize to dense fp16 [K, N] weights (rows in activation order).
#[pyfunction]
#[pyo3(signature = (a, b_q_weight, b_gptq_qzeros, b_gptq_scales, b_g_idx, weights, use_exllama, bit, use_v2_format, stream))]
#[allow(clippy::too_many_arguments)]
fn dequantize<'py>(
    a: Bound<'py, PyAny>,
    b_q_weight: Bound<'py, PyAny>,
    b_gptq_qzeros: Bound<'py, PyAny>,
    b_gptq_scales: Bound<'py, PyAny>,
    b_g_idx: Option<Bound<'py, PyAny>>,
    weights: Bound<'py, PyAny>,
    use_exllama: bool,
    bit: i64,
    use_v2_format: bool,
    stream: usize,
) -> PyResult<()> {
    let call = ops::GemmCall {
        a,
        qweight: b_q_weight,
        qzeros: b_gptq_qzeros,
        scales: b_gptq_scales,
        g_idx: b_g_idx,
        out: weights,
        use_exllama,
        bit,
        use_v2_format,
        path: None,
        variant: None,
        stream,
        workspace: None,
    };
    Ok(ops::dequantize(call)?)
}

/// The shape of the fp16 workspace a GPU call needs if it may run the split-K
/// exllama kernel (`gemm(..., workspace=)`): (K blocks, M, N), else None.
/// Unknown names answer None: gemm reports them.
#[pyfunction]
#[pyo3(signature = (m, k, n, bit, use_exllama, path, variant))]
fn split_k_workspace(
    m: usize,
    k: usize,
    n: usize,
    bit: u32,
    use_exllama: bool,
    path: Option<&str>,
    variant: Option<&str>,
) -> Option<(usize, usize, usize)> {
    let path = match path.map(dispatch::KernelPath::parse) {
        None => None,
        Some(Ok(path)) => Some(path),
        Some(Err(_)) => return None,
    };
    let variant = match variant.map(dispatch::Variant::parse) {
        None => None,
        Some(Ok(variant)) => Some(variant),
        Some(Err(_)) => return None,
    };
    dispatch::may_split_k(m, n, bit, use_exllama, path, variant).then(|| (dispatch::split_k_blocks(k), m, n))
}

/// Rows above which a torch GPU caller is served by dequantize + torch.matmul;
/// never where the Hopper kernels serve the call (CUDA device `device`, N x K).
#[pyfunction]
#[pyo3(signature = (bit, use_exllama, variant_named=false, device=None, n=0, k=0))]
fn dense_min_rows(bit: u32, use_exllama: bool, variant_named: bool, device: Option<i32>, n: usize, k: usize) -> PyResult<usize> {
    if !variant_named && let Some(ordinal) = device {
        let caps = ops::gpu_caps(meta::Device::Cuda(ordinal))?;
        if dispatch::wgmma_serves(bit, use_exllama, n, k, caps) {
            return Ok(usize::MAX);
        }
    }
    Ok(dispatch::dense_min_rows(bit, use_exllama, variant_named))
}

/// Low-level row permutation of packed weights (the work of gptq_shuffle).
#[pyfunction]
fn permute_rows(py: Python<'_>, src: Bound<'_, PyAny>, dst: Bound<'_, PyAny>, perm: Option<Bound<'_, PyAny>>, bit: i64, stream: usize) -> PyResult<()> {
    Ok(ops::permute_rows(py, &src, &dst, perm.as_ref(), bit, stream)?)
}

/// The Opt4GPTQ variants, in ablation order.
#[pyfunction]
fn variants() -> Vec<&'static str> {
    dispatch::Variant::ALL.iter().map(|v| v.name()).collect()
}

/// The variant used when neither variant= nor OPT4GPTQ_VARIANT names one.
#[pyfunction]
fn default_variant() -> &'static str {
    dispatch::default_variant().name()
}

/// "cpu", "cuda" or "rocm": what this build was compiled for.
#[pyfunction]
fn backend() -> &'static str {
    env!("O4G_BACKEND")
}

/// Names of the GPUs this build can see (empty for a CPU build or no GPU).
#[pyfunction]
fn devices() -> Vec<String> {
    #[cfg(o4g_gpu)]
    {
        gpu::device_names()
    }
    #[cfg(not(o4g_gpu))]
    {
        Vec::new()
    }
}

/// Blocks until `stream` on `device` has finished (for producers that cannot share a stream).
#[pyfunction]
fn stream_synchronize(device: i32, stream: usize) -> PyResult<()> {
    #[cfg(o4g_gpu)]
    {
        Ok(gpu::stream_synchronize(device, stream)?)
    }
    #[cfg(not(o4g_gpu))]
    {
        let _ = (device, stream);
        Ok(())
    }
}

#[pymodule]
#[pyo3(name = "_C")]
fn native_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("SKINNY_MAX_ROWS", dispatch::SKINNY_MAX_ROWS)?;
    m.add_function(wrap_pyfunction!(gemm, m)?)?;
    m.add_function(wrap_pyfunction!(permute_rows, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(dense_min_rows, m)?)?;
    m.add_function(wrap_pyfunction!(split_k_workspace, m)?)?;
    m.add_function(wrap_pyfunction!(backend, m)?)?;
    m.add_function(wrap_pyfunction!(variants, m)?)?;
    m.add_function(wrap_pyfunction!(default_variant, m)?)?;
    m.add_function(wrap_pyfunction!(devices, m)?)?;
    m.add_function(wrap_pyfunction!(stream_synchronize, m)?)?;
    Ok(())
}
