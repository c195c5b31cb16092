//! Which kernel serves a GEMM of a given shape: the one table of that choice.
//!
//! Skinny (decode) reads each weight word once per 8 activation rows; tiled
//! (prefill) dequantizes a weight tile once per 64 rows. The crossover below
//! is provisional until benchmarks/bench_gemm.py measures it on each GPU.

use crate::quant::GemmShape;

/// Mirrors enum o4g_path in csrc/opt4gptq.h.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum KernelPath {
    Skinny = 0,
    Tiled = 1,
}

impl KernelPath {
    pub fn name(self) -> &'static str {
        match self {
            KernelPath::Skinny => "skinny",
            KernelPath::Tiled => "tiled",
        }
    }

    pub fn parse(name: &str) -> Option<KernelPath> {
        match name {
            "skinny" => Some(KernelPath::Skinny),
            "tiled" => Some(KernelPath::Tiled),
            _ => None,
        }
    }
}

/// Largest M served by the skinny kernel.
pub const SKINNY_MAX_ROWS: usize = 16;

pub fn choose_path(shape: &GemmShape) -> KernelPath {
    if shape.m <= SKINNY_MAX_ROWS { KernelPath::Skinny } else { KernelPath::Tiled }
}
