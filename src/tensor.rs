//! DLPack capsules in, typed views out. The Python face hands us capsules it
//! made with the right stream (see python/opt4gptq/_frameworks.py); here we
//! read their descriptors and keep the producer's memory alive while we work.

use crate::error::{Error, Result};
use crate::meta::{DType, Device, TensorMeta};
use dlpark::DlpackFlags;
use dlpark::ffi::{DLDataTypeCode, DLDeviceType};
use dlpark::python::{ImportedDlpack, from_dlpack};
use pyo3::prelude::*;

pub struct Imported {
    pub meta: TensorMeta,
    data: *mut u8,
    read_only: bool,
    // Dropping this calls the producer's deleter: it must outlive every use of `data`.
    _owner: ImportedDlpack,
}

fn device_of(kind: DLDeviceType, id: i32) -> Device {
    match kind {
        DLDeviceType::CPU | DLDeviceType::CUDAHOST | DLDeviceType::ROCMHOST => Device::Cpu,
        DLDeviceType::CUDA => Device::Cuda(id),
        DLDeviceType::ROCM => Device::Rocm(id),
        DLDeviceType(other) => Device::Other(other, id),
    }
}

fn dtype_of(code: DLDataTypeCode, bits: u8, lanes: u16) -> DType {
    match (code, bits, lanes) {
        (DLDataTypeCode::FLOAT, 16, 1) => DType::F16,
        (DLDataTypeCode::INT, 32, 1) => DType::I32,
        (DLDataTypeCode(code), bits, lanes) => DType::Other(code, bits, lanes),
    }
}

impl Imported {
    /// Imports a DLPack capsule (or any DLPack producer) given as argument `name`.
    pub fn from_py(name: &'static str, object: &Bound<'_, PyAny>) -> Result<Imported> {
        let owner = from_dlpack(object.as_borrowed(), None, None)
            .map_err(|error| Error::type_(format!("{name} is not a DLPack tensor: {error}")))?;
        let (meta, data) = {
            let view = owner.validate().map_err(|error| Error::value(format!("{name}: invalid DLPack tensor: {error}")))?;
            let dtype = view.dtype();
            let device = view.device();
            let meta = TensorMeta::new(
                name,
                device_of(device.device_type, device.device_id),
                dtype_of(dtype.code, dtype.bits, dtype.lanes),
                view.shape().to_vec(),
                view.strides().map(<[i64]>::to_vec),
            );
            let data = if view.num_elements() == 0 {
                std::ptr::null_mut()
            } else {
                unsafe { view.offset_bytes_ptr() }
                    .map_err(|error| Error::value(format!("{name}: invalid DLPack data pointer: {error}")))?
                    as *mut u8
            };
            (meta, data)
        };
        let read_only = owner.flags().contains(DlpackFlags::READ_ONLY);
        Ok(Imported { meta, data, read_only, _owner: owner })
    }

    pub fn ptr(&self) -> *mut std::ffi::c_void {
        self.data.cast()
    }

    pub fn expect_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::value(format!("{} is read-only; it must be writable", self.meta.name)));
        }
        Ok(())
    }

    /// Elements reachable from the data pointer through shape and strides.
    fn span(&self) -> usize {
        if self.meta.shape.contains(&0) {
            return 0;
        }
        let last: i64 = self.meta.shape.iter().zip(&self.meta.strides).map(|(size, stride)| (size - 1) * stride).sum();
        usize::try_from(last + 1).unwrap_or(0)
    }

    /// # Safety
    /// The tensor is on the CPU and holds `T` (checked by the caller's validation).
    pub unsafe fn host_slice<T>(&self) -> &[T] {
        let len = self.span();
        if len == 0 { &[] } else { unsafe { std::slice::from_raw_parts(self.data as *const T, len) } }
    }

    /// # Safety
    /// As host_slice, and no other live slice aliases this tensor's memory.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn host_slice_mut<T>(&self) -> &mut [T] {
        let len = self.span();
        if len == 0 { &mut [] } else { unsafe { std::slice::from_raw_parts_mut(self.data as *mut T, len) } }
    }
}

/// Imports an optional argument: Python None stays None.
pub fn import_optional(name: &'static str, object: Option<&Bound<'_, PyAny>>) -> Result<Option<Imported>> {
    match object {
        Some(object) if !object.is_none() => Imported::from_py(name, object).map(Some),
        _ => Ok(None),
    }
}
