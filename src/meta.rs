//! What the engine knows about an argument before touching its memory:
//! name, device, dtype, shape, strides. Validation works on this alone, so it
//! is unit-tested without Python or a GPU.

use crate::error::{Error, Result};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(i32),
    Rocm(i32),
    /// Any other DLPack device type, kept for the error message.
    Other(u32, i32),
}

impl Device {
    pub fn is_gpu(self) -> bool {
        matches!(self, Device::Cuda(_) | Device::Rocm(_))
    }
    pub fn ordinal(self) -> i32 {
        match self {
            Device::Cpu => 0,
            Device::Cuda(id) | Device::Rocm(id) | Device::Other(_, id) => id,
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(id) => write!(f, "cuda:{id}"),
            Device::Rocm(id) => write!(f, "rocm:{id}"),
            Device::Other(kind, id) => write!(f, "DLPack device type {kind}:{id}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F16,
    I32,
    /// DLPack (code, bits, lanes) of anything else, kept for the error message.
    Other(u8, u8, u16),
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DType::F16 => write!(f, "float16"),
            DType::I32 => write!(f, "int32"),
            DType::Other(code, bits, lanes) => {
                let kind = match code {
                    0 => "int",
                    1 => "uint",
                    2 => "float",
                    4 => "bfloat",
                    6 => "bool",
                    _ => "dtype",
                };
                if *lanes == 1 { write!(f, "{kind}{bits}") } else { write!(f, "{kind}{bits}x{lanes}") }
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    pub name: &'static str,
    pub device: Device,
    pub dtype: DType,
    pub shape: Vec<i64>,
    /// In elements; always filled in (compact strides when the producer gave none).
    pub strides: Vec<i64>,
}

impl TensorMeta {
    pub fn new(name: &'static str, device: Device, dtype: DType, shape: Vec<i64>, strides: Option<Vec<i64>>) -> Self {
        let strides = strides.unwrap_or_else(|| compact_strides(&shape));
        TensorMeta { name, device, dtype, shape, strides }
    }

    pub fn expect_dtype(&self, dtype: DType) -> Result<()> {
        if self.dtype == dtype {
            return Ok(());
        }
        Err(Error::type_(format!("{} must be {dtype}; got {}", self.name, self.dtype)))
    }

    pub fn expect_ndim(&self, ndim: usize, what: &str) -> Result<()> {
        if self.shape.len() == ndim {
            return Ok(());
        }
        Err(Error::value(format!(
            "{} must be {ndim}-D {what}; got shape {:?}",
            self.name, self.shape
        )))
    }

    pub fn dim(&self, axis: usize) -> i64 {
        self.shape[axis]
    }

    /// Row-major with no gaps. Strides of size-1 axes, and of empty tensors, do not matter.
    pub fn is_contiguous(&self) -> bool {
        if self.shape.contains(&0) {
            return true;
        }
        let mut expected = 1i64;
        for (size, stride) in self.shape.iter().zip(&self.strides).rev() {
            if *size != 1 && *stride != expected {
                return false;
            }
            expected *= *size;
        }
        true
    }

    pub fn expect_contiguous(&self) -> Result<()> {
        if self.is_contiguous() {
            return Ok(());
        }
        Err(Error::value(format!(
            "{} must be contiguous (row-major); got shape {:?} with strides {:?} (call .contiguous() / np.ascontiguousarray first)",
            self.name, self.shape, self.strides
        )))
    }

    pub fn expect_shape(&self, expected: &[i64], why: &str) -> Result<()> {
        if self.shape == expected {
            return Ok(());
        }
        Err(Error::value(format!(
            "{} must have shape {expected:?} ({why}); got {:?}",
            self.name, self.shape
        )))
    }
}

pub fn compact_strides(shape: &[i64]) -> Vec<i64> {
    let mut strides = vec![0; shape.len()];
    let mut step = 1i64;
    for axis in (0..shape.len()).rev() {
        strides[axis] = step;
        step *= shape[axis].max(1);
    }
    strides
}

/// Every tensor of one call must live on one device.
pub fn expect_same_device(reference: &TensorMeta, others: &[&TensorMeta]) -> Result<()> {
    for other in others {
        if other.device != reference.device {
            return Err(Error::value(format!(
                "{} is on {} but {} is on {}; all tensors of one call must be on one device",
                other.name, other.device, reference.name, reference.device
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguity_ignores_unit_axes_and_sees_gaps() {
        let compact = TensorMeta::new("x", Device::Cpu, DType::F16, vec![4, 8], None);
        assert!(compact.is_contiguous());
        let padded = TensorMeta::new("x", Device::Cpu, DType::F16, vec![4, 8], Some(vec![16, 1]));
        assert!(!padded.is_contiguous());
        let one_row = TensorMeta::new("x", Device::Cpu, DType::F16, vec![1, 8], Some(vec![999, 1]));
        assert!(one_row.is_contiguous());
        let transposed = TensorMeta::new("x", Device::Cpu, DType::F16, vec![4, 8], Some(vec![1, 4]));
        assert!(!transposed.is_contiguous());
    }

    #[test]
    fn dtype_error_names_argument_and_both_types() {
        let t = TensorMeta::new("b_g_idx", Device::Cpu, DType::Other(0, 64, 1), vec![8], None);
        let message = t.expect_dtype(DType::I32).unwrap_err().to_string();
        assert!(message.contains("b_g_idx") && message.contains("int32") && message.contains("int64"), "{message}");
    }
}
