//! One error type for the engine; each variant maps to the Python exception a
//! caller would expect (bad values -> ValueError, wrong kinds -> TypeError,
//! device/runtime trouble -> RuntimeError).

use pyo3::PyErr;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// An argument has the right kind but a wrong value (shape, range, layout).
    Value(String),
    /// An argument has the wrong kind (dtype, not a tensor).
    Type(String),
    /// The device runtime or the build cannot serve the call.
    Runtime(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn value(message: impl Into<String>) -> Self {
        Error::Value(message.into())
    }
    pub fn type_(message: impl Into<String>) -> Self {
        Error::Type(message.into())
    }
    pub fn runtime(message: impl Into<String>) -> Self {
        Error::Runtime(message.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Value(m) | Error::Type(m) | Error::Runtime(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

impl From<Error> for PyErr {
    fn from(error: Error) -> PyErr {
        match error {
            Error::Value(m) => PyValueError::new_err(m),
            Error::Type(m) => PyTypeError::new_err(m),
            Error::Runtime(m) => PyRuntimeError::new_err(m),
        }
    }
}
