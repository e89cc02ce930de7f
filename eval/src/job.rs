//! One evaluation run, end to end: open the reference and the candidates, score the
//! reference once (cached), then each candidate against it, and assemble the [`Report`]
//! (written after each candidate when an output folder is given, so an interrupted run keeps
//! what finished). The CLI (`tandem eval`, `quantize --sweep`) and the Python package's
//! `tandem.evaluate` both run this; they differ only in how they show progress.

use crate::cache::ReferenceCache;
use crate::report::{ModelResult, Quality, Report, Speed, TextInfo, WeightSummary};
use crate::{Chunks, Result};
use std::path::{Path, PathBuf};
use tandem_model::pending::Pending;
use tandem_model::{Checkpoint, Error, Llama, LoadOptions};

/// What to evaluate and how.
#[derive(Debug, Clone)]
pub struct EvalJob {
    /// The reference (16-bit) model.
    pub reference: PathBuf,
    pub models: Vec<PathBuf>,
    /// Evaluation text (e.g. wikitext-2's wiki.test.raw).
    pub text: PathBuf,
    /// Tokens per chunk (the second half of each is scored, as llama-perplexity does).
    pub ctx: usize,
    /// At most this many chunks.
    pub chunks: Option<usize>,
    /// Reference-pass cache file (default `<out>/reference-cache.bin`, or a temporary file
    /// removed afterwards when there is no `out`).
    pub cache: Option<PathBuf>,
    /// Tokens of the prefill / decode speed measurement (0 skips it).
    pub speed_pp: usize,
    pub speed_tg: usize,
    /// Report folder (report.json, report.md, report.html); none: the report is only returned.
    pub out: Option<PathBuf>,
    /// How every model is loaded (threads, activation precision, device).
    pub load: LoadOptions,
}

impl EvalJob {
    pub fn new(reference: &Path, models: &[PathBuf], text: &Path) -> Self {
        EvalJob {
            reference: reference.to_path_buf(),
            models: models.to_vec(),
            text: text.to_path_buf(),
            ctx: 512,
            chunks: None,
            cache: None,
            speed_pp: 128,
            speed_tg: 32,
            out: None,
            load: LoadOptions::default(),
        }
    }
}

/// How a run reports what it is doing (progress bars, one-line notes); every method has a
/// silent default.
pub trait EvalObserver {
    /// `stage` ("reference pass (NAME)", a candidate's name) reached `done` of `total` chunks.
    fn progress(&self, _stage: &str, _done: usize, _total: usize) {}
    /// A stage finished (its progress display can go).
    fn stage_done(&self, _stage: &str) {}
    /// A one-line note ("reference pass: reusing ...").
    fn note(&self, _line: &str) {}
    /// A candidate finished.
    fn model_done(&self, _result: &ModelResult) {}
}

/// Shows nothing.
pub struct Silent;
impl EvalObserver for Silent {}

/// The file name without its extension (a report's model name).
pub fn name_of(p: &Path) -> String {
    p.file_stem()
        .or_else(|| p.file_name())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// Creates the output folder `dir` if it is missing. The guard returned for a folder made
/// here removes it again if the run fails or is interrupted before it commits the guard
/// (once something finished is in it), so a failed run leaves no empty or half-filled folder.
pub fn create_output_dir(dir: &Path) -> Result<Option<Pending>> {
    if dir.exists() {
        return Ok(None);
    }
    let ((), guard) =
        Pending::create(dir, |p| std::fs::create_dir_all(p)).map_err(|e| Error::Io {
            path: dir.to_path_buf(),
            msg: format!("cannot create: {e}"),
        })?;
    Ok(Some(guard))
}

/// Runs `job` and returns its report.
pub fn run(job: &EvalJob, obs: &dyn EvalObserver) -> Result<Report> {
    let text = tandem_model::files::read_text_capped(&job.text, tandem_model::files::TEXT_CAP)
        .map_err(|e| Error::Io {
            path: job.text.clone(),
            msg: format!("cannot read: {e}"),
        })?;
    let rck = Checkpoint::open(&job.reference, None)?;
    // Open every candidate first: a bad file fails before any long work.
    let mut cands = Vec::new();
    for m in &job.models {
        let ck = Checkpoint::open(m, None)?;
        crate::check_same_tokenizer(&rck, &ck, &text)?;
        cands.push(ck);
    }
    let chunks =
        Chunks::new(&rck.tokenizer, &text, job.ctx, job.chunks).map_err(|e| Error::Format {
            path: job.text.clone(),
            msg: e.to_string(),
        })?;
    let mut fresh = match &job.out {
        Some(out) => create_output_dir(out)?,
        None => None,
    };
    // Without a folder or a named cache, the cache is a temporary file the guard removes.
    let (cache_path, _temporary) = match (&job.cache, &job.out) {
        (Some(c), _) => (c.clone(), None),
        (None, Some(out)) => (out.join("reference-cache.bin"), None),
        (None, None) => {
            let p = std::env::temp_dir().join(format!(
                "tandem-eval-{}-{:x}.cache",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos())
            ));
            (p.clone(), Some(Pending::new(&p)))
        }
    };
    let key = crate::cache::cache_key(&rck, &text, &chunks);
    let rmodel = rck.load_model(&job.load)?;
    let mut cache = match ReferenceCache::open(&cache_path, &key, &chunks, rck.config.vocab_size) {
        Some(c) => {
            obs.note(&format!("reference pass: reusing {}", cache_path.display()));
            c
        }
        None => {
            let stage = format!("reference pass ({})", name_of(&job.reference));
            let c = ReferenceCache::build(&cache_path, &key, &rmodel, &chunks, &|d, t| {
                obs.progress(&stage, d, t)
            })?;
            obs.stage_done(&stage);
            c
        }
    };
    let speed = |m: &Llama| -> Result<Option<Speed>> {
        Ok(if job.speed_pp > 0 && job.speed_tg > 0 {
            Some(crate::measure_speed(m, job.speed_pp, job.speed_tg)?)
        } else {
            None
        })
    };
    let mut report = Report {
        schema_version: crate::report::SCHEMA_VERSION,
        tool: format!("tandem {}", env!("CARGO_PKG_VERSION")),
        text: TextInfo {
            path: job.text.display().to_string(),
            ctx: chunks.ctx,
            chunks: chunks.chunks.len(),
            scored_tokens: chunks.chunks.len() * chunks.scored_per_chunk(),
        },
        reference: ModelResult {
            name: name_of(&job.reference),
            path: job.reference.display().to_string(),
            size: crate::model_size(&rck),
            ppl: crate::reference_perplexity(&mut cache)?,
            quality: None,
            speed: speed(&rmodel)?,
            weights: None,
            quantized_with: rck.quantization_record(),
        },
        models: Vec::new(),
    };
    drop(rmodel);
    for (path, ck) in job.models.iter().zip(&cands) {
        let model = ck.load_model(&job.load)?;
        let stage = name_of(path);
        let (ppl, div) = crate::evaluate(&model, &mut cache, &chunks, &|d, t| {
            obs.progress(&stage, d, t)
        })?;
        obs.stage_done(&stage);
        let errors = crate::weights::weight_errors(&rck, ck)?;
        report.models.push(ModelResult {
            name: stage,
            path: path.display().to_string(),
            size: crate::model_size(ck),
            ppl,
            quality: Some(Quality::from_divergence(&div)),
            speed: speed(&model)?,
            weights: Some(WeightSummary::from_errors(&errors)),
            quantized_with: ck.quantization_record(),
        });
        if let Some(out) = &job.out {
            crate::write_report(out, &report)?;
            if let Some(g) = fresh.take() {
                g.commit(|| ());
            }
        }
        if let Some(m) = report.models.last() {
            obs.model_done(m);
        }
    }
    if let Some(out) = &job.out {
        crate::write_report(out, &report)?;
        if let Some(g) = fresh.take() {
            g.commit(|| ());
        }
    }
    drop(cache);
    Ok(report)
}
