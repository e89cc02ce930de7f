//! tandem for Python: the library crates (not the CLI) behind a small API.
//!
//! `Model` (load, generate, chat, score), `quantize`, `evaluate`, `Drafter` (n-gram, a
//! self-draft, a draft model; `propose` / `accept`, what another engine's speculative loop
//! asks of a drafter) and `SpeculativeDecoder` (tandem's own loop). Every computation runs
//! with the interpreter lock released, inside one rayon pool (`set_threads`), so Python
//! threads keep running; errors are `tandem.TandemError` carrying tandem's one-line message.
//! The engine adapters (llama-cpp-python, transformers, vLLM) are Python modules over
//! `Drafter`, in `tandem/`.
//!
//! Files: `model.rs` (`Model`), `drafter.rs` (`Drafter`), `decoder.rs`
//! (`SpeculativeDecoder`), `jobs.rs` (`quantize`, `evaluate`); this one holds what they share
//! (the error type, the thread pool, load and sampling options) and the module's table.

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use std::sync::OnceLock;
use tandem_model::{Sampler, SamplingParams};

/// The system allocator with per-thread budgets, so that a model file's chat template renders
/// within a memory limit instead of aborting the interpreter (see
/// `tandem_model::memory_budget`).
#[global_allocator]
static ALLOCATOR: tandem_model::memory_budget::BudgetAllocator =
    tandem_model::memory_budget::BudgetAllocator;

create_exception!(
    _tandem,
    TandemError,
    PyException,
    "A tandem error: its message is tandem's one-line description (file, tensor, what is wrong)."
);

/// Any tandem error as a `TandemError` with its one-line text.
fn err(e: impl std::fmt::Display) -> PyErr {
    TandemError::new_err(e.to_string())
}

static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();

/// The pool every computation runs in (all cores unless `set_threads` came first). As in
/// the CLI, the calling thread's work runs on a worker: n threads on n cores.
fn pool() -> &'static rayon::ThreadPool {
    POOL.get_or_init(|| build_pool(None))
}

fn build_pool(threads: Option<usize>) -> rayon::ThreadPool {
    let n = threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .or_else(|_| rayon::ThreadPoolBuilder::new().num_threads(1).build())
        .expect("a one-thread pool can always be built")
}

/// Runs `f` without the interpreter lock, inside the pool.
fn compute<T: Send, F: FnOnce() -> T + Send>(py: Python<'_>, f: F) -> T {
    py.detach(|| pool().install(f))
}

/// Sets the number of CPU threads tandem computes with. Call it before anything else runs.
#[pyfunction]
fn set_threads(threads: usize) -> PyResult<()> {
    if threads == 0 {
        return Err(err("threads must be at least 1"));
    }
    let most = tandem_kernels::pool::MAX_THREADS;
    if threads > most {
        return Err(err(format!("threads {threads} is more than {most}")));
    }
    let mut set = false;
    POOL.get_or_init(|| {
        set = true;
        build_pool(Some(threads))
    });
    if !set && pool().current_num_threads() != threads {
        return Err(err(format!(
            "tandem already runs with {} threads: call set_threads before loading anything",
            pool().current_num_threads()
        )));
    }
    Ok(())
}

/// The number of CPU threads tandem computes with.
#[pyfunction]
fn threads() -> usize {
    pool().current_num_threads()
}

/// How this module loads a model: on the CPU, with the pool's thread count (so
/// `set_threads` governs the kernels too), activations as `activations` names them.
fn load_options(activations: &str) -> PyResult<tandem_model::LoadOptions> {
    use tandem_model::linear::ActivationPrecision;
    let activations = match activations {
        "int8" => ActivationPrecision::Int8,
        "f32" => ActivationPrecision::F32,
        other => {
            return Err(err(format!(
                "activations '{other}': expected 'int8' or 'f32'"
            )))
        }
    };
    Ok(tandem_model::LoadOptions {
        threads: Some(pool().current_num_threads()),
        activations,
        device: tandem_model::ComputeDevice::Cpu,
        ..Default::default()
    })
}

/// A progress bar on stderr when it is a terminal (or as `show` says).
fn progress_bar(show: Option<bool>) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !show.unwrap_or_else(|| std::io::stderr().is_terminal()) {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {eta} {wide_msg}")
    {
        bar.set_style(style);
    }
    bar
}

/// The sampling parameters, checked.
fn sampling(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> PyResult<SamplingParams> {
    let p = SamplingParams {
        temperature,
        top_k,
        top_p,
        seed,
    };
    Sampler::new(p).map_err(err)?;
    Ok(p)
}

mod decoder;
mod drafter;
mod jobs;
mod model;

use decoder::SpeculativeDecoder;
use drafter::Drafter;
use jobs::{evaluate, quantize};
use model::Model;

#[pymodule]
fn _tandem(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("TandemError", m.py().get_type::<TandemError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<Model>()?;
    m.add_class::<Drafter>()?;
    m.add_class::<SpeculativeDecoder>()?;
    m.add_function(wrap_pyfunction!(quantize, m)?)?;
    m.add_function(wrap_pyfunction!(evaluate, m)?)?;
    m.add_function(wrap_pyfunction!(set_threads, m)?)?;
    m.add_function(wrap_pyfunction!(threads, m)?)?;
    Ok(())
}
