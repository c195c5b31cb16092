//! Compiles csrc/ for the GPU platform named by OPT4GPTQ_GPU (cpu, cuda or rocm).
//!
//! The CPU backend is always built; a GPU build adds the kernels and sets
//! `cfg(o4g_gpu)`. A requested toolchain that cannot be found stops the build
//! with a message that says what to install, instead of silently building a
//! CPU-only wheel the user did not ask for.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const KERNEL_SOURCES: &[&str] = &[
    "csrc/gptq/api.cu",
    "csrc/gptq/instances/exllama_b2.cu",
    "csrc/gptq/instances/exllama_b3.cu",
    "csrc/gptq/instances/exllama_b4.cu",
    "csrc/gptq/instances/exllama_b8.cu",
];
/// NVIDIA-only kernels (mma.sync, wgmma): compiled into CUDA builds, not ROCm
/// ones, where api.cu never references them (O4G_HAVE_MMA / O4G_HAVE_WGMMA are 0).
const CUDA_ONLY_SOURCES: &[&str] = &["csrc/gptq/instances/mma_b4.cu", "csrc/gptq/instances/wgmma_b4.cu"];
const HEADERS: &[&str] = &[
    "csrc/opt4gptq.h",
    "csrc/compat/vendor.h",
    "csrc/compat/vendors/cuda.h",
    "csrc/compat/vendors/hip.h",
    "csrc/compat/asm/packed_half_ptx.cuh",
    "csrc/compat/asm/packed_half_gfx9.cuh",
    "csrc/compat/asm/mma_ptx.cuh",
    "csrc/compat/asm/hopper_ptx.cuh",
    "csrc/compat/asm/wgmma_ptx.cuh",
    "csrc/gptq/gemm_exllama.cuh",
    "csrc/gptq/gemm_mma.cuh",
    "csrc/gptq/gemm_mma_tiled.cuh",
    "csrc/gptq/gemm_wgmma.cuh",
    "csrc/gptq/common.cuh",
    "csrc/gptq/dequantize.cuh",
    "csrc/gptq/gemm_skinny.cuh",
    "csrc/gptq/splitk_sum.cuh",
    "csrc/gptq/gemm_tiled.cuh",
    "csrc/gptq/permute.cuh",
];

fn main() {
    println!("cargo:rustc-check-cfg=cfg(o4g_gpu)");
    for var in [
        "OPT4GPTQ_GPU",
        "OPT4GPTQ_CUDA_ARCHS",
        "OPT4GPTQ_ROCM_ARCHS",
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "HIPCC",
        "ROCM_PATH",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    for file in KERNEL_SOURCES.iter().chain(CUDA_ONLY_SOURCES).chain(HEADERS) {
        println!("cargo:rerun-if-changed={file}");
    }

    let backend = env::var("OPT4GPTQ_GPU").unwrap_or_default().to_lowercase();
    match backend.as_str() {
        "" | "cpu" | "none" => {
            println!("cargo:rustc-env=O4G_BACKEND=cpu");
            println!("cargo:rustc-env=O4G_WGMMA=0");
        }
        "cuda" => build_cuda(),
        "rocm" | "hip" => build_rocm(),
        other => fail(&format!("OPT4GPTQ_GPU={other:?} is not one of: cpu, cuda, rocm")),
    }
}

fn fail(message: &str) -> ! {
    eprintln!("\nopt4gptq build error: {message}\n");
    std::process::exit(1);
}

/// First of: the variable, `$HOME_VAR/bin/NAME` for each home variable, NAME on PATH.
fn find_tool(var: &str, homes: &[&str], name: &str) -> Option<PathBuf> {
    if let Ok(path) = env::var(var) {
        return Some(PathBuf::from(path));
    }
    for home in homes {
        if let Ok(dir) = env::var(home) {
            let candidate = Path::new(&dir).join("bin").join(name);
            if candidate.exists() {
                return Some(candidate);
            }
        }
    }
    let paths = env::var_os("PATH")?;
    env::split_paths(&paths).map(|dir| dir.join(name)).find(|candidate| candidate.exists())
}

fn arch_list(var: &str, default: &str) -> Vec<String> {
    let list = env::var(var).unwrap_or_else(|_| default.to_string());
    let archs: Vec<String> = list
        .split([';', ',', ' '])
        .map(str::trim)
        .filter(|arch| !arch.is_empty())
        .map(String::from)
        .collect();
    if archs.is_empty() {
        fail(&format!("{var} is empty; give at least one architecture"));
    }
    archs
}

fn build_cuda() {
    let nvcc = find_tool("NVCC", &["CUDA_HOME", "CUDA_PATH"], "nvcc").unwrap_or_else(|| {
        fail(
            "OPT4GPTQ_GPU=cuda but nvcc was not found (looked at $NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, PATH).\n\
             Install the CUDA toolkit, or from PyPI: pip install nvidia-cuda-nvcc nvidia-cuda-crt nvidia-nvvm \
             nvidia-cuda-runtime nvidia-cuda-cccl (same version for all), and put its bin/ on PATH.",
        )
    });
    let cuda_home = nvcc.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default();

    // cc wraps host flags for nvcc only when it finds nvcc itself, through NVCC.
    // SAFETY: build scripts are single-threaded.
    unsafe { env::set_var("NVCC", &nvcc) };
    let mut build = cc::Build::new();
    build.cuda(true).cudart("static").flag("-O3").flag("-std=c++17");
    let archs = arch_list("OPT4GPTQ_CUDA_ARCHS", "80;90a");
    // The Hopper kernels (wgmma) have device code only for sm_90a: the dispatch
    // may name them only where the build carries it.
    let wgmma = archs.iter().any(|arch| arch.trim_start_matches("sm_").trim_start_matches("compute_") == "90a");
    println!("cargo:rustc-env=O4G_WGMMA={}", if wgmma { "1" } else { "0" });
    for arch in archs {
        let digits = arch.trim_start_matches("sm_").trim_start_matches("compute_");
        // Plain archs also embed PTX so a newer GPU can JIT them; "a" archs
        // (sm_90a) are not forward compatible, so they get machine code only.
        let code = if digits.ends_with('a') {
            format!("sm_{digits}")
        } else {
            format!("[sm_{digits},compute_{digits}]")
        };
        build.flag(format!("-gencode=arch=compute_{digits},code={code}"));
    }
    for file in KERNEL_SOURCES.iter().chain(CUDA_ONLY_SOURCES) {
        build.file(file);
    }
    build.compile("opt4gptq_kernels");

    for lib in ["lib64", "lib", "lib/x64"] {
        let dir = cuda_home.join(lib);
        if dir.exists() {
            println!("cargo:rustc-link-search=native={}", dir.display());
        }
    }
    for lib in ["dl", "rt", "pthread"] {
        println!("cargo:rustc-link-lib={lib}");
    }
    println!("cargo:rustc-cfg=o4g_gpu");
    println!("cargo:rustc-env=O4G_BACKEND=cuda");
}

fn build_rocm() {
    let hipcc = find_tool("HIPCC", &["ROCM_PATH", "HIP_PATH"], "hipcc").unwrap_or_else(|| {
        fail(
            "OPT4GPTQ_GPU=rocm but hipcc was not found (looked at $HIPCC, $ROCM_PATH/bin, $HIP_PATH/bin, PATH).\n\
             Install ROCm (or HYGON DTK), or on Debian/Ubuntu: apt install hipcc libamdhip64-dev rocm-device-libs.",
        )
    });
    // hipcc picks NVIDIA as its platform when it sees nvcc on PATH: say AMD.
    // SAFETY: build scripts are single-threaded.
    unsafe { env::set_var("HIP_PLATFORM", "amd") };
    println!("cargo:rerun-if-env-changed=HIP_PLATFORM");
    // hipcc prints its version without compiling anything: a broken install fails here, clearly.
    if !Command::new(&hipcc).arg("--version").output().map(|out| out.status.success()).unwrap_or(false) {
        fail(&format!("{} --version failed: the HIP toolchain is not usable", hipcc.display()));
    }

    let mut build = cc::Build::new();
    build.compiler(&hipcc).cpp(true).flag("-x").flag("hip").flag("-O3").flag("-std=c++17").flag("-fPIC");
    for arch in arch_list("OPT4GPTQ_ROCM_ARCHS", "gfx906;gfx90a") {
        build.flag(format!("--offload-arch={arch}"));
    }
    for file in KERNEL_SOURCES {
        build.file(file);
    }
    build.compile("opt4gptq_kernels");
    println!("cargo:rustc-env=O4G_WGMMA=0");

    if let Ok(rocm) = env::var("ROCM_PATH") {
        println!("cargo:rustc-link-search=native={rocm}/lib");
    }
    println!("cargo:rustc-link-lib=dylib=amdhip64");
    println!("cargo:rustc-cfg=o4g_gpu");
    println!("cargo:rustc-env=O4G_BACKEND=rocm");
}
