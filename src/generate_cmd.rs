//! `tandem generate` and `tandem demo`: plain decoding streamed to stdout (speculative
//! decoding is `spec_cmd`'s), statistics to stderr as text or JSON.

use crate::args::{check_generation_flags, DraftArgs, SamplingArgs};
use crate::output::{GenerationJson, Printer};
use anyhow::Result;
use std::path::PathBuf;
use tandem_model::generate::{generate_scored, GenerationStats};
use tandem_model::{Checkpoint, HeadRows, Sampler, SamplingParams};

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// A Hugging Face folder or a GGUF file.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Prepend BOS even if the tokenizer would not.
    #[arg(long, conflicts_with = "no_bos")]
    pub bos: bool,
    /// Never prepend BOS.
    #[arg(long)]
    pub no_bos: bool,
    /// Use this tokenizer.json instead of the model's own.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Context length limit (default: the model's).
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Print generation statistics as JSON to stderr.
    #[arg(long)]
    pub json: bool,
    /// Wrap the prompt as a user message in the model's chat template (see `tandem chat`).
    #[arg(long)]
    pub chat: bool,
    /// With --chat: a system message before the prompt.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// With --chat: a Jinja chat template to use instead of the model's own.
    #[arg(long, requires = "chat")]
    pub chat_template: Option<PathBuf>,
    /// Add each generated token's id and log-probability under the model to the JSON
    /// statistics (implies --json; plain decoding only).
    #[arg(long, conflicts_with = "draft")]
    pub logprobs: bool,
    /// Decode speculatively: `ngram` (prompt lookup), `suffix` (lookup of the longest earlier
    /// match), `self:<type>` (this model quantized in memory, e.g. self:q4_0; `,skip=auto`
    /// also leaves out the sublayers chosen on calibration text, `,skip=N` the N least
    /// influential, `,skip=a3.m5` those named; `self:keep,skip=…` skips without quantizing), a draft model
    /// (folder or GGUF) that shares the verifier's vocabulary, or a lookup and a model joined
    /// by `+` (`ngram+self:q4_0`: the lookup first, the model where it finds nothing). Output
    /// is exactly the model's own.
    #[arg(long)]
    pub draft: Option<String>,
    #[command(flatten)]
    pub drafting: DraftArgs,
}

pub fn generate(mut a: GenerateArgs, load: &tandem_model::LoadOptions) -> Result<()> {
    check_generation_flags(a.max_tokens, a.ctx, Some(&a.drafting))?;
    let ck = Checkpoint::open(&a.model, a.tokenizer.as_deref())?;
    if a.chat {
        a.prompt = crate::chat_cmd::render_prompt(
            &ck,
            a.chat_template.as_deref(),
            a.system.as_deref(),
            &a.prompt,
        )?;
        // The template prints the special tokens it wants (BOS included).
        a.no_bos = true;
        a.bos = false;
    }
    let params = a.sampling.params();
    let bos = if a.bos {
        true
    } else if a.no_bos {
        false
    } else {
        ck.tokenizer.add_bos
    };
    match &a.draft {
        Some(d) => crate::spec_cmd::generate(&ck, d, &a, params, bos, load),
        None => run(
            &ck,
            load,
            &a.prompt,
            a.max_tokens,
            params,
            bos,
            a.ctx,
            Report::of(a.json, a.logprobs),
        ),
    }
}

pub fn demo(
    max_tokens: usize,
    prompt: &str,
    seed: u64,
    load: &tandem_model::LoadOptions,
) -> Result<()> {
    let ck = Checkpoint::bundled()?;
    let params = SamplingParams {
        temperature: 0.8,
        top_k: 40,
        top_p: 0.95,
        seed,
    };
    eprintln!(
        "tandem demo: {} ({} parameters), temperature 0.8, top-k 40, top-p 0.95, seed {seed}",
        ck.path.display(),
        ck.parameter_count()
    );
    let add_bos = ck.tokenizer.add_bos;
    run(
        &ck,
        load,
        prompt,
        max_tokens,
        params,
        add_bos,
        None,
        Report::Text,
    )
}

/// How a plain generation reports its statistics (stderr).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Report {
    Text,
    Json,
    /// JSON with each token's id and log-probability.
    JsonLogprobs,
}

impl Report {
    fn of(json: bool, logprobs: bool) -> Self {
        match (json, logprobs) {
            (_, true) => Report::JsonLogprobs,
            (true, false) => Report::Json,
            _ => Report::Text,
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run(
    ck: &Checkpoint,
    load: &tandem_model::LoadOptions,
    prompt: &str,
    max_tokens: usize,
    params: SamplingParams,
    bos: bool,
    ctx: Option<usize>,
    report: Report,
) -> Result<()> {
    let model = ck.load_model(load)?;
    let tok = &ck.tokenizer;
    let ids = tok.encode(prompt, bos)?;
    if ids.is_empty() {
        anyhow::bail!("the prompt encodes to no tokens");
    }
    let mut cache = model.new_cache_limited(ctx)?;
    let mut sampler = Sampler::new(params)?;
    let score = report == Report::JsonLogprobs;
    if !score {
        // The screened head's screen is built with the model, not inside time to first token.
        model.prepare_head_for(HeadRows::for_draws(&params))?;
    }
    let mut printer = Printer::start(tok, prompt, ids.last().copied())?;
    let mut logprobs = Vec::new();
    let (tokens, stats) = generate_scored(
        &model,
        &mut cache,
        &ids,
        max_tokens,
        &mut sampler,
        &tok.eos_ids,
        score,
        |id, lp| {
            logprobs.push(lp);
            printer.push(id)
        },
    )?;
    printer.finish()?;
    if score {
        let mut j = GenerationJson::of(&stats);
        j.tokens = Some(tokens);
        j.logprobs = Some(logprobs);
        eprintln!("{}", serde_json::to_string(&j)?);
    } else {
        print_stats(&stats, report == Report::Json);
    }
    Ok(())
}

fn print_stats(s: &GenerationStats, json: bool) {
    let stop = s.stop;
    if json {
        eprintln!(
            "{}",
            serde_json::to_string(&GenerationJson::of(s)).unwrap_or_default()
        );
    } else {
        eprintln!(
            "prompt tokens: {} | time to first token: {:.1} ms | prefill: {:.1} tok/s | decode: {:.1} tok/s ({} tokens, stop: {stop})",
            s.prompt_tokens,
            s.time_to_first_token().as_secs_f64() * 1e3,
            s.prefill_tok_s(),
            s.decode_tok_s(),
            s.generated_tokens,
        );
    }
}
