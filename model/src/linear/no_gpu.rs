//! Stand-in for `gpu.rs` when tandem is built without the `cuda` feature: the same items, and
//! a GPU weight that cannot exist (so the code that would use one compiles away).

use super::LinearWeight;
use crate::error::{Error, Result};

fn not_built() -> Error {
    Error::Invalid("this tandem was built without GPU support (cargo build --features cuda)".into())
}

/// Why no GPU can be used: this build has no GPU support.
pub fn device_name() -> Result<String> {
    Err(not_built())
}

/// No value of this type exists in a build without `cuda`.
#[derive(Debug)]
pub(crate) enum GpuWeight {}

impl GpuWeight {
    pub(crate) fn upload(
        _weight: &LinearWeight,
        _n: usize,
        _k: usize,
        _bias: Option<&[f32]>,
    ) -> Result<Option<Self>> {
        Err(not_built())
    }

    pub(crate) fn bytes(&self) -> usize {
        match *self {}
    }

    pub(crate) fn matmul(&self, _x: &[f32], _m: usize, _out: &mut [f32]) -> Result<()> {
        match *self {}
    }
}
