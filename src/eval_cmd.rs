//! `tandem eval` and `tandem quantize --sweep`: open models, run the evaluator, write reports.

use crate::args::progress_bar;
use anyhow::Result;
use std::path::{Path, PathBuf};
use tandem_eval::job::EvalJob;

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

pub fn eval(a: EvalArgs, load: &tandem_model::LoadOptions) -> Result<()> {
    if a.out.join("report.json").exists() && !a.force {
        anyhow::bail!(
            "{}: already holds a report (pass --force to replace it)",
            a.out.display()
        );
    }
    run_eval(
        &a.reference,
        &a.models,
        &a.text,
        &a.opts,
        &a.out,
        a.quiet,
        load,
    )
}

pub use tandem_eval::job::create_output_dir;

/// Progress bars and notes on stderr for an evaluation run.
struct Bars {
    quiet: bool,
    bar: std::cell::RefCell<Option<(String, indicatif::ProgressBar)>>,
}

impl tandem_eval::job::EvalObserver for Bars {
    fn progress(&self, stage: &str, done: usize, total: usize) {
        let mut slot = self.bar.borrow_mut();
        if slot.as_ref().is_none_or(|(s, _)| s != stage) {
            let b = progress_bar(self.quiet);
            b.set_message(stage.to_string());
            *slot = Some((stage.to_string(), b));
        }
        if let Some((_, b)) = slot.as_ref() {
            b.set_length(total as u64);
            b.set_position(done as u64);
        }
    }
    fn stage_done(&self, _stage: &str) {
        if let Some((_, b)) = self.bar.borrow_mut().take() {
            b.finish_and_clear();
        }
    }
    fn note(&self, line: &str) {
        eprintln!("{line}");
    }
    fn model_done(&self, m: &tandem_eval::report::ModelResult) {
        if let Some(q) = &m.quality {
            eprintln!(
                "{}: PPL {:.4} (x{:.4}), mean KLD {:.5}, top-1 {:.2}%",
                m.name,
                m.ppl,
                q.ppl_ratio,
                q.kl.mean,
                100.0 * q.top1_agreement
            );
        }
    }
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
    load: &tandem_model::LoadOptions,
) -> Result<()> {
    let job = EvalJob {
        ctx: o.ctx,
        chunks: o.chunks,
        cache: o.cache.clone(),
        speed_pp: o.speed_pp,
        speed_tg: o.speed_tg,
        out: Some(out.to_path_buf()),
        load: *load,
        ..EvalJob::new(reference, models, text_path)
    };
    let bars = Bars {
        quiet,
        bar: Default::default(),
    };
    tandem_eval::job::run(&job, &bars)?;
    println!(
        "wrote {} (report.json, report.md, report.html)",
        out.display()
    );
    Ok(())
}
