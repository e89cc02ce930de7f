//! `tandem perplexity`.

use crate::args::progress_bar;
use anyhow::{Context, Result};
use std::path::PathBuf;
use tandem_model::Checkpoint;

#[derive(clap::Args)]
pub struct PerplexityArgs {
    /// A Hugging Face folder or a GGUF file.
    #[arg(long)]
    model: PathBuf,
    /// Evaluation text (e.g. wikitext-2 wiki.test.raw).
    #[arg(long)]
    text: PathBuf,
    /// Tokens per chunk (only the second half of each chunk is scored, as llama-perplexity does).
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Evaluate at most this many chunks.
    #[arg(long)]
    chunks: Option<usize>,
    #[arg(short, long)]
    quiet: bool,
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

/// Perplexity of a model on a text, computed the way llama-perplexity computes it.
pub fn perplexity(a: PerplexityArgs, load: &tandem_model::LoadOptions) -> Result<()> {
    let ck = Checkpoint::open(&a.model, a.tokenizer.as_deref())?;
    let text = tandem_model::files::read_text_capped(&a.text, tandem_model::files::TEXT_CAP)
        .with_context(|| format!("{}: cannot read", a.text.display()))?;
    let chunks = tandem_eval::Chunks::new(&ck.tokenizer, &text, a.ctx, a.chunks)
        .with_context(|| a.text.display().to_string())?;
    let model = ck.load_model(load)?;
    let bar = progress_bar(a.quiet);
    let start = std::time::Instant::now();
    let ppl = tandem_eval::scoring::perplexity(&model, &chunks, &|d, t| {
        bar.set_length(t as u64);
        bar.set_position(d as u64);
    })?;
    bar.finish_and_clear();
    println!(
        "PPL = {ppl:.4} over {} chunks of {} tokens ({} scored tokens) in {:.1} s",
        chunks.chunks.len(),
        a.ctx,
        chunks.chunks.len() * chunks.scored_per_chunk(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
