//! `tandem eval` and `tandem quantize --sweep`: open models, run the evaluator, write reports.

use crate::commands::progress_bar;
use anyhow::{Context, Result};
use candle_core::Device;
use std::path::{Path, PathBuf};
use tandem_eval::report::{ModelResult, Quality, Report, TextInfo, WeightSummary};
use tandem_eval::{cache::ReferenceCache, Chunks};
use tandem_model::pending::Pending;
use tandem_model::Checkpoint;

#[derive(clap::Args)]
pub struct EvalArgs {
    /// The reference (16-bit) model: a Hugging Face folder or a GGUF file.
    #[arg(long)]
    reference: PathBuf,
    /// A candidate model (repeat for several).
    #[arg(long = "model", required = true)]
    models: Vec<PathBuf>,
    /// Evaluation text (e.g. wikitext-2 wiki.test.raw).
    #[arg(long)]
    text: PathBuf,
    #[command(flatten)]
    opts: EvalOptions,
    /// Report folder (report.json, report.md, report.html).
    #[arg(long)]
    out: PathBuf,
    /// Replace an existing report in --out.
    #[arg(long)]
    force: bool,
    /// No progress bars.
    #[arg(short, long)]
    quiet: bool,
}

/// Options shared by `eval` and `quantize --sweep`.
#[derive(clap::Args, Clone)]
pub struct EvalOptions {
    /// Tokens per chunk (only the second half of each is scored, as llama-perplexity does).
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Evaluate at most this many chunks.
    #[arg(long)]
    pub chunks: Option<usize>,
    /// Reference-pass cache file (default: <out>/reference-cache.bin); reused while the
    /// reference, text and chunking are unchanged.
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Tokens for the prefill / decode speed measurement (0 skips it).
    #[arg(long, default_value_t = 128)]
    pub speed_pp: usize,
    #[arg(long, default_value_t = 32)]
    pub speed_tg: usize,
}

pub fn eval(a: EvalArgs) -> Result<()> {
    if a.out.join("report.json").exists() && !a.force {
        anyhow::bail!(
            "{}: already holds a report (pass --force to replace it)",
            a.out.display()
        );
    }
    run_eval(&a.reference, &a.models, &a.text, &a.opts, &a.out, a.quiet)
}

/// Creates the output folder `dir` if it is missing. The guard returned for a folder made
/// here removes it again if the command fails or is interrupted before it commits the guard
/// (once something finished is in it), so a failed run leaves no empty or half-filled folder.
pub fn create_output_dir(dir: &Path) -> Result<Option<Pending>> {
    if dir.exists() {
        return Ok(None);
    }
    let guard = Pending::new(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    Ok(Some(guard.made()))
}

fn name_of(p: &Path) -> String {
    p.file_stem()
        .or_else(|| p.file_name())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// Evaluates every candidate against the reference and writes the report after each one
/// (so an interrupted run keeps what finished).
pub fn run_eval(
    reference: &Path,
    models: &[PathBuf],
    text_path: &Path,
    o: &EvalOptions,
    out: &Path,
    quiet: bool,
) -> Result<()> {
    let text = std::fs::read_to_string(text_path)
        .with_context(|| format!("{}: cannot read", text_path.display()))?;
    let rck = Checkpoint::open(reference, None).context("opening the reference")?;
    // Open every candidate first: a bad file fails before any long work.
    let mut cands = Vec::new();
    for m in models {
        let ck = Checkpoint::open(m, None)?;
        tandem_eval::check_same_tokenizer(&rck, &ck, &text)?;
        cands.push(ck);
    }
    let chunks = Chunks::new(&rck.tokenizer, &text, o.ctx, o.chunks)
        .with_context(|| text_path.display().to_string())?;
    let mut fresh = create_output_dir(out)?;
    let cache_path = o
        .cache
        .clone()
        .unwrap_or_else(|| out.join("reference-cache.bin"));
    let key = tandem_eval::cache::cache_key(&rck, &text, &chunks);
    let rmodel = rck.load_model(&Device::Cpu)?;
    let bar = |what: String| {
        let b = progress_bar(quiet);
        b.set_message(what);
        b
    };
    let mut cache = match ReferenceCache::open(&cache_path, &key, &chunks, rck.config.vocab_size) {
        Some(c) => {
            eprintln!("reference pass: reusing {}", cache_path.display());
            c
        }
        None => {
            let b = bar(format!("reference pass ({})", name_of(reference)));
            let c = ReferenceCache::build(&cache_path, &key, &rmodel, &chunks, &|d, t| {
                b.set_length(t as u64);
                b.set_position(d as u64);
            })?;
            b.finish_and_clear();
            c
        }
    };
    let speed = |m: &tandem_model::Llama| -> Result<Option<tandem_eval::report::Speed>> {
        Ok(if o.speed_pp > 0 && o.speed_tg > 0 {
            Some(tandem_eval::measure_speed(m, o.speed_pp, o.speed_tg)?)
        } else {
            None
        })
    };
    let mut report = Report {
        schema_version: tandem_eval::report::SCHEMA_VERSION,
        tool: format!("tandem {}", env!("CARGO_PKG_VERSION")),
        text: TextInfo {
            path: text_path.display().to_string(),
            ctx: chunks.ctx,
            chunks: chunks.chunks.len(),
            scored_tokens: chunks.chunks.len() * chunks.scored_per_chunk(),
        },
        reference: ModelResult {
            name: name_of(reference),
            path: reference.display().to_string(),
            size: tandem_eval::model_size(&rck),
            ppl: tandem_eval::reference_perplexity(&mut cache)?,
            quality: None,
            speed: speed(&rmodel)?,
            weights: None,
            quantized_with: rck.quantization_record(),
        },
        models: Vec::new(),
    };
    drop(rmodel);
    for (path, ck) in models.iter().zip(&cands) {
        let model = ck.load_model(&Device::Cpu)?;
        let b = bar(name_of(path));
        let (ppl, div) = tandem_eval::evaluate(&model, &mut cache, &chunks, &|d, t| {
            b.set_length(t as u64);
            b.set_position(d as u64);
        })?;
        b.finish_and_clear();
        let errors = tandem_eval::weights::weight_errors(&rck, ck)?;
        report.models.push(ModelResult {
            name: name_of(path),
            path: path.display().to_string(),
            size: tandem_eval::model_size(ck),
            ppl,
            quality: Some(Quality::from_divergence(&div)),
            speed: speed(&model)?,
            weights: Some(WeightSummary::from_errors(&errors)),
            quantized_with: ck.quantization_record(),
        });
        tandem_eval::write_report(out, &report)?;
        if let Some(g) = fresh.take() {
            g.commit(|| ());
        }
        let q = report.models.last().and_then(|m| m.quality.clone());
        if let Some(q) = q {
            eprintln!(
                "{}: PPL {ppl:.4} (x{:.4}), mean KLD {:.5}, top-1 {:.2}%",
                name_of(path),
                q.ppl_ratio,
                q.kl.mean,
                100.0 * q.top1_agreement
            );
        }
    }
    tandem_eval::write_report(out, &report)?;
    if let Some(g) = fresh.take() {
        g.commit(|| ());
    }
    println!(
        "wrote {} (report.json, report.md, report.html)",
        out.display()
    );
    Ok(())
}
