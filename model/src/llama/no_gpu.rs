//! Stand-in for `gpu.rs` when tandem is built without the `cuda` feature: the same items, of
//! types that have no values, so a model is never resident on a GPU and the code that would
//! use one compiles away without a `cfg` at each use.

use super::forward::{LogitRows, Pass};
use super::Llama;
use crate::config::Config;
use crate::error::Result;

/// What a model keeps on the GPU (nothing can be, in this build).
pub(crate) enum Resident {}

/// A cache's keys and values on the GPU (none can be, in this build).
pub(crate) enum GpuKv {}

impl Resident {
    pub(super) fn new(_model: &Llama) -> Result<Self> {
        Err(crate::Error::Invalid(
            "this tandem was built without GPU support (cargo build --features cuda)".into(),
        ))
    }

    pub(super) fn new_kv(&self, _c: &Config, _layers: usize, _capacity: usize) -> Result<GpuKv> {
        match *self {}
    }

    pub(crate) fn use_graphs(&self, _on: bool) {
        match *self {}
    }

    pub(crate) fn graph_passes(&self) -> u64 {
        match *self {}
    }

    pub(crate) fn forget_graphs(&self) {
        match *self {}
    }

    pub(super) fn forward(
        &self,
        _model: &Llama,
        _pass: &mut Pass<'_, '_, '_>,
    ) -> Result<Vec<LogitRows>> {
        match *self {}
    }
}
