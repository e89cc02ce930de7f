//! `quantize` and `evaluate`: the CLI's two offline jobs, with progress bars.

use crate::{compute, err, progress_bar};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::path::PathBuf;
use tandem_model::Checkpoint;

/// JSON text as Python objects (dicts, lists, numbers, strings).
pub(crate) fn json_to_py<'py>(py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyAny>> {
    py.import("json")?.call_method1("loads", (text,))
}

/// Progress of a quantization on an indicatif bar (a terminal only, unless `show` says).
pub(crate) struct QuantizeBar(indicatif::ProgressBar);

impl tandem_quantize::job::QuantizeObserver for QuantizeBar {
    fn progress(&self, stage: &str, done: u64, total: u64) {
        self.0.set_length(total);
        self.0.set_position(done);
        self.0.set_message(stage.to_string());
    }
    fn done(&self) {
        self.0.finish_and_clear();
    }
    fn note(&self, line: &str) {
        self.0.suspend(|| eprintln!("{line}"));
    }
}

/// Quantizes `model` into `out` (a GGUF file, or a compressed-tensors folder with
/// `format="compressed-tensors"`), as `tandem quantize` does: attention kept 16-bit unless
/// `attention` says otherwise, the MLP at `scheme`, `method` rtn (llama-quantize's bytes),
/// gptq, awq or awq+gptq (calibrated on `calib_text`, default the bundled Austen, and with
/// `calib_self=N` on N tokens of the model's own answers too); `edge_mlp="2=q8_0"` puts the
/// MLP of the first and last two layers at Q8_0 (a 4-bit draft's choice). Returns what was
/// written.
#[pyfunction]
#[pyo3(signature = (model, out, scheme=None, method="rtn", *, attention=None, embeddings=None, output=None, edge_mlp=None, rules=Vec::new(), recipe=None, format="gguf", group_size=32, imatrix=None, calib_text=None, calib_ctx=512, calib_chunks=None, calib_self=0, gptq_damp=0.3, act_order=true, force=false, allow_nonfinite=false, progress=None))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn quantize<'py>(
    py: Python<'py>,
    model: PathBuf,
    out: PathBuf,
    scheme: Option<String>,
    method: &str,
    attention: Option<String>,
    embeddings: Option<String>,
    output: Option<String>,
    edge_mlp: Option<String>,
    rules: Vec<String>,
    recipe: Option<PathBuf>,
    format: &str,
    group_size: usize,
    imatrix: Option<PathBuf>,
    calib_text: Option<PathBuf>,
    calib_ctx: usize,
    calib_chunks: Option<usize>,
    calib_self: usize,
    gptq_damp: f64,
    act_order: bool,
    force: bool,
    allow_nonfinite: bool,
    progress: Option<bool>,
) -> PyResult<Bound<'py, PyDict>> {
    use tandem_quantize::job::{self, Format, PolicyChoices, QuantizeJob};
    let method = tandem_quantize::calibrated::Method::parse(method).map_err(err)?;
    let job = QuantizeJob {
        imatrix,
        allow_nonfinite,
        force,
        calib: {
            let mut c = job::calibration_options(
                method,
                calib_text.as_deref(),
                calib_ctx,
                calib_chunks,
                gptq_damp,
            )
            .map_err(err)?;
            c.gptq.act_order = act_order;
            job::set_self_calibration(&mut c, calib_self).map_err(err)?;
            c
        },
        ..QuantizeJob::new(
            PolicyChoices {
                scheme,
                attention,
                embeddings,
                output,
                edge_mlp,
                rules,
                recipe,
            },
            Format::parse(format, group_size).map_err(err)?,
            method,
        )
    };
    let bar = QuantizeBar(progress_bar(progress));
    let (report, summary) = compute(py, || {
        let ck = Checkpoint::open(&model, None)?;
        let plan = job.plan(&ck)?;
        let r = job.run(&ck, &plan, &out, &bar)?;
        Ok::<_, tandem_quantize::Error>((r, plan.summary(false)))
    })
    .map_err(err)?;
    let d = PyDict::new(py);
    d.set_item("out", out.display().to_string())?;
    d.set_item("tensors", report.tensors)?;
    d.set_item("bytes", report.bytes_out)?;
    d.set_item("seconds", report.seconds)?;
    d.set_item("notes", report.notes)?;
    d.set_item("quantized_layers", report.quantized_layers)?;
    d.set_item("imatrix_tensors", report.imatrix_tensors)?;
    d.set_item("plan", summary)?;
    Ok(d)
}

/// Progress of an evaluation on indicatif bars (a terminal only, unless `show` says).
pub(crate) struct EvalBars {
    show: Option<bool>,
    bar: std::sync::Mutex<Option<(String, indicatif::ProgressBar)>>,
}

impl tandem_eval::job::EvalObserver for EvalBars {
    fn progress(&self, stage: &str, done: usize, total: usize) {
        let mut slot = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        if slot.as_ref().is_none_or(|(s, _)| s != stage) {
            let b = progress_bar(self.show);
            b.set_message(stage.to_string());
            *slot = Some((stage.to_string(), b));
        }
        if let Some((_, b)) = slot.as_ref() {
            b.set_length(total as u64);
            b.set_position(done as u64);
        }
    }
    fn stage_done(&self, _stage: &str) {
        let mut slot = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, b)) = slot.take() {
            b.finish_and_clear();
        }
    }
}

/// What quantization cost: each model against `reference` on `text` (perplexity, KL
/// divergence, top-1 agreement, per-tensor weight error, size, speed), the report as a dict
/// (also written as report.json / .md / .html into `out` when given).
#[pyfunction]
#[pyo3(signature = (reference, models, text, ctx=512, chunks=None, *, out=None, cache=None, speed_pp=128, speed_tg=32, progress=None))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn evaluate<'py>(
    py: Python<'py>,
    reference: PathBuf,
    models: Vec<PathBuf>,
    text: PathBuf,
    ctx: usize,
    chunks: Option<usize>,
    out: Option<PathBuf>,
    cache: Option<PathBuf>,
    speed_pp: usize,
    speed_tg: usize,
    progress: Option<bool>,
) -> PyResult<Bound<'py, PyAny>> {
    if models.is_empty() {
        return Err(err("models: give at least one model to evaluate"));
    }
    let job = tandem_eval::job::EvalJob {
        ctx,
        chunks,
        out,
        cache,
        speed_pp,
        speed_tg,
        ..tandem_eval::job::EvalJob::new(&reference, &models, &text)
    };
    let bars = EvalBars {
        show: progress,
        bar: Default::default(),
    };
    let report = compute(py, || tandem_eval::job::run(&job, &bars)).map_err(err)?;
    let json = serde_json::to_string(&report).map_err(err)?;
    json_to_py(py, &json)
}
