//! One function per subcommand: open, call the library, print.

use anyhow::{Context, Result};
use candle_core::Device;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use tandem_model::generate::{generate_scored, GenerationStats, StopReason};
use tandem_model::{Checkpoint, Sampler, SamplingParams, TextStream};

/// The worker pool for tandem's kernels, `threads` wide (default: every core). candle's own
/// CPU matmul reads RAYON_NUM_THREADS, so it is sized the same way.
pub fn thread_pool(threads: Option<usize>) -> rayon::ThreadPool {
    let n = threads
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
        .max(1);
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .or_else(|_| rayon::ThreadPoolBuilder::new().num_threads(1).build())
        .expect("a one-thread pool can always be built")
}

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// A Hugging Face folder or a GGUF file.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling threshold (1.0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
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
    /// match), `self:<type>` (this model quantized in memory, e.g. self:q4_0), a draft model
    /// (folder or GGUF) that shares the verifier's vocabulary, or a lookup and a model joined
    /// by `+` (`ngram+self:q4_0`: the lookup first, the model where it finds nothing). Output
    /// is exactly the model's own.
    #[arg(long)]
    pub draft: Option<String>,
    /// Most tokens drafted per verifier pass.
    #[arg(long, default_value_t = 8)]
    pub draft_max: usize,
    /// Always draft --draft-max tokens instead of adapting to acceptance and cost.
    #[arg(long)]
    pub no_adapt: bool,
    /// A draft model stops drafting when its most likely next token has less than this
    /// probability (0 = draft --draft-max tokens whenever speculating).
    #[arg(long, default_value_t = DEFAULT_DRAFT_P_MIN)]
    pub draft_p_min: f32,
    /// Give a draft model its own KV cache (it reads the prompt and every verified token
    /// itself) even when it has the verifier's shape and could draft over the verifier's.
    #[arg(long)]
    pub own_draft_cache: bool,
    /// A draft model computes logits only for the tokens below this id and the prompt's (its
    /// output head is ~20% of a draft step on SmolLM2; a token left out is only never
    /// proposed, the output stays the model's own). 0 = the whole vocabulary.
    #[arg(long, default_value_t = tandem_speculate::DEFAULT_DRAFT_VOCAB)]
    pub draft_vocab: usize,
}

pub use tandem_speculate::session::DEFAULT_DRAFT_P_MIN;

/// The generation flags every command shares, checked before any model is opened.
pub fn check_generation_flags(
    max_tokens: usize,
    ctx: Option<usize>,
    draft_p_min: f32,
) -> Result<()> {
    if max_tokens == 0 {
        anyhow::bail!("--max-tokens must be at least 1");
    }
    if ctx == Some(0) {
        anyhow::bail!("--ctx must be at least 1 position (the prompt and what is generated)");
    }
    // NaN fails the range check too.
    if !(0.0..=1.0).contains(&draft_p_min) {
        anyhow::bail!("--draft-p-min {draft_p_min} is not a probability (0 to 1)");
    }
    Ok(())
}

pub fn generate(mut a: GenerateArgs) -> Result<()> {
    check_generation_flags(a.max_tokens, a.ctx, a.draft_p_min)?;
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
    let params = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
    };
    let bos = if a.bos {
        true
    } else if a.no_bos {
        false
    } else {
        ck.tokenizer.add_bos
    };
    match &a.draft {
        Some(d) => crate::spec_cmd::generate(&ck, d, &a, params, bos),
        None => run(
            &ck,
            &a.prompt,
            a.max_tokens,
            params,
            bos,
            a.ctx,
            Report::of(a.json, a.logprobs),
        ),
    }
}

pub fn demo(max_tokens: usize, prompt: &str, seed: u64) -> Result<()> {
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
    run(&ck, prompt, max_tokens, params, add_bos, None, Report::Text)
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

fn run(
    ck: &Checkpoint,
    prompt: &str,
    max_tokens: usize,
    params: SamplingParams,
    bos: bool,
    ctx: Option<usize>,
    report: Report,
) -> Result<()> {
    let model = ck.load_model(&Device::Cpu)?;
    let tok = &ck.tokenizer;
    let ids = tok.encode(prompt, bos)?;
    if ids.is_empty() {
        anyhow::bail!("the prompt encodes to no tokens");
    }
    let mut cache = match ctx {
        Some(n) => model.new_cache_with_limit(n)?,
        None => model.new_cache()?,
    };
    let mut sampler = Sampler::new(params)?;
    let mut printer = Printer::start(tok, prompt, ids.last().copied())?;
    let score = report == Report::JsonLogprobs;
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
        let mut v = stats_json(&stats);
        v["tokens"] = serde_json::json!(tokens);
        v["logprobs"] = serde_json::json!(logprobs);
        eprintln!("{v}");
    } else {
        print_stats(&stats, report == Report::Json);
    }
    Ok(())
}

/// Streams a generation to stdout: the prompt, then each complete UTF-8 piece as it is decoded.
pub struct Printer<'t> {
    stream: TextStream<'t>,
    out: std::io::StdoutLock<'static>,
}

impl<'t> Printer<'t> {
    pub fn start(
        tok: &'t tandem_model::Tokenizer,
        prompt: &str,
        last: Option<u32>,
    ) -> Result<Self> {
        let mut out = std::io::stdout().lock();
        write!(out, "{prompt}")?;
        out.flush()?;
        Ok(Printer {
            stream: TextStream::with_context(tok, last),
            out,
        })
    }

    pub fn push(&mut self, id: u32) -> tandem_model::Result<()> {
        if let Some(piece) = self.stream.push(id)? {
            // A closed pipe (e.g. `| head`) ends generation rather than panicking.
            if self
                .out
                .write_all(piece.as_bytes())
                .and_then(|_| self.out.flush())
                .is_err()
            {
                return Err(tandem_model::Error::Invalid("stdout closed".into()));
            }
        }
        Ok(())
    }

    pub fn finish(mut self) -> Result<()> {
        if let Some(rest) = self.stream.finish()? {
            write!(self.out, "{rest}")?;
        }
        writeln!(self.out)?;
        Ok(())
    }
}

fn stop_name(s: StopReason) -> &'static str {
    match s {
        StopReason::Eos => "eos",
        StopReason::MaxTokens => "max-tokens",
        StopReason::ContextFull => "context-full",
    }
}

fn stats_json(s: &GenerationStats) -> serde_json::Value {
    serde_json::json!({
        "prompt_tokens": s.prompt_tokens, "generated_tokens": s.generated_tokens,
        "time_to_first_token_s": s.time_to_first_token().as_secs_f64(),
        "prefill_tok_s": s.prefill_tok_s(), "decode_tok_s": s.decode_tok_s(), "stop": stop_name(s.stop),
    })
}

fn print_stats(s: &GenerationStats, json: bool) {
    let stop = stop_name(s.stop);
    if json {
        eprintln!("{}", stats_json(s));
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

pub fn info(path: &Path, tokenizer: Option<&Path>, verbose: bool) -> Result<()> {
    let ck = Checkpoint::open(path, tokenizer)?;
    let c = &ck.config;
    let store = &ck.store;
    let mut by_type: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for n in store.names() {
        let t = store.get(&n)?;
        let e = by_type.entry(t.dtype.name()).or_default();
        e.0 += t.elem_count();
        e.1 += t.data.len();
        if verbose {
            println!(
                "  {:<48} {:<6} {:?}",
                store.stored_name(&n),
                t.dtype.name(),
                t.shape
            );
        }
    }
    let params = ck.parameter_count();
    let bytes = store.data_bytes();
    println!("model:         {}", ck.path.display());
    println!(
        "format:        {}",
        if store.is_gguf() {
            "GGUF"
        } else {
            "safetensors"
        }
    );
    println!("architecture:  {} ({:?})", c.model_type, c.architecture());
    println!("parameters:    {params} ({:.1} M)", params as f64 / 1e6);
    println!(
        "size:          {bytes} bytes ({:.1} MiB, {:.2} bits/weight)",
        bytes as f64 / 1048576.0,
        bytes as f64 * 8.0 / params.max(1) as f64
    );
    println!("layers:        {}", c.num_hidden_layers);
    println!(
        "hidden:        {} (intermediate {})",
        c.hidden_size, c.intermediate_size
    );
    println!(
        "heads:         {} query / {} key-value, head_dim {}",
        c.num_attention_heads,
        c.num_kv_heads(),
        c.head_dim()
    );
    println!("context:       {}", c.context_length());
    println!(
        "vocabulary:    {} (tokenizer: {} tokens, BOS {} , EOS {:?})",
        c.vocab_size,
        ck.tokenizer.vocab_size(),
        match (ck.tokenizer.add_bos, ck.tokenizer.bos_id) {
            (true, Some(b)) => format!("{b} added"),
            (false, Some(b)) => format!("{b} not added"),
            _ => "none".into(),
        },
        ck.tokenizer.eos_ids
    );
    println!(
        "rope:          theta {}{}",
        c.rope_theta,
        c.rope_scaling
            .as_ref()
            .map(|s| format!(", {} scaling x{}", s.rope_type, s.factor.unwrap_or(1.0)))
            .unwrap_or_default()
    );
    println!("tied embeddings: {}", c.tie_word_embeddings);
    if let Some(imp) = &ck.imported {
        println!("quantized as:  {}", imp.config.describe());
        for (held, n) in imp.counts() {
            println!("  {n} layers held as {held}");
        }
        for note in &imp.config.notes {
            println!("  note: {note}");
        }
    }
    let record = ck.quantization_record();
    if !record.is_empty() {
        let parts: Vec<String> = record.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("quantized with: {}", parts.join(", "));
    }
    println!("tensor types:");
    for (t, (elems, b)) in by_type {
        println!("  {t:<6} {elems:>12} weights {b:>12} bytes");
    }
    Ok(())
}

pub fn convert(
    input: &Path,
    out: &Path,
    force: bool,
    tokenizer: Option<&Path>,
    quiet: bool,
) -> Result<()> {
    let ck = Checkpoint::open(input, tokenizer)?;
    if !ck.store.is_gguf() {
        anyhow::bail!(
            "{}: convert reads GGUF files; this is already a Hugging Face folder",
            input.display()
        );
    }
    let bar = progress_bar(quiet);
    let start = std::time::Instant::now();
    let mut cb = |done: u64, total: u64, name: &str| {
        bar.set_length(total);
        bar.set_position(done);
        bar.set_message(name.to_string());
    };
    tandem_model::export::export_hf_f16(&ck, out, force, &mut cb)
        .with_context(|| format!("converting {}", input.display()))?;
    bar.finish_and_clear();
    eprintln!(
        "wrote {} ({} parameters as F16) in {:.1} s",
        out.display(),
        ck.parameter_count(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A byte-progress bar on stderr; hidden when stderr is not a terminal or with --quiet.
pub fn progress_bar(quiet: bool) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if quiet || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} {eta} {wide_msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// `tandem bench --model M` (prefill/decode), or `tandem bench spec ...`.
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct BenchCmd {
    #[command(subcommand)]
    pub sub: Option<BenchSub>,
    #[command(flatten)]
    pub args: BenchArgs,
}

#[derive(clap::Subcommand)]
pub enum BenchSub {
    /// Speculative vs plain decoding over a set of prompts: tok/s, speedup, acceptance.
    Spec(crate::spec_cmd::BenchSpecArgs),
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// A Hugging Face folder or a GGUF file.
    #[arg(long, required = true)]
    model: Option<PathBuf>,
    /// Prompt tokens to prefill (0 = skip).
    #[arg(long, default_value_t = 512)]
    pp: usize,
    /// Tokens to decode one at a time (0 = skip).
    #[arg(long, default_value_t = 128)]
    tg: usize,
    /// Repetitions of each test (after one warm-up run).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Also time verification passes of 1 and of K tokens after a 64-token context
    /// (the speculative-decoding shape), e.g. `--verify 5`.
    #[arg(long)]
    verify: Option<usize>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Instead of the speed table: where the time of a 1-token decode step and of a K-token
    /// verification pass goes, per operation, beside the memory-bandwidth limit.
    #[arg(long, value_name = "K")]
    profile: Option<usize>,
}

/// `--activations` for every command that runs a model.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activations {
    Int8,
    F32,
}

impl From<Activations> for tandem_model::linear::ActivationPrecision {
    fn from(a: Activations) -> Self {
        match a {
            Activations::Int8 => Self::Int8,
            Activations::F32 => Self::F32,
        }
    }
}

/// `tandem bench --profile K`: per-operation time of decode and of a K-token verification
/// pass after a 64-token context, and the bandwidth limit (weight bytes ÷ measured read
/// bandwidth of this machine with the same threads).
fn bench_profile(model: &tandem_model::Llama, k: usize, passes: usize, json: bool) -> Result<()> {
    use tandem_model::bench::time_verify;
    use tandem_model::Logits;
    const CONTEXT: usize = 64;
    let bw = tandem_kernels::membw::read_bandwidth(1 << 30, 5);
    let bytes = model.weight_bytes() as f64;
    let mut tables = Vec::new();
    for kk in [1, k.max(1)] {
        time_verify(model, kk, CONTEXT, 4)?; // warm-up
        let toks: Vec<u32> = (0..(CONTEXT + kk) as u32).map(|i| 100 + 37 * i).collect();
        let mut cache = model.new_cache_with_limit(CONTEXT + kk)?;
        model.forward(&toks[..CONTEXT], &mut cache, Logits::Last)?;
        model.start_profile();
        let t = std::time::Instant::now();
        for _ in 0..passes {
            model.forward(&toks[CONTEXT..], &mut cache, Logits::All)?;
            cache.truncate(CONTEXT);
        }
        let secs = t.elapsed().as_secs_f64();
        let prof = model.take_profile().context("profile was not recorded")?;
        tables.push((kk, secs / passes as f64, prof));
    }
    let limit = bytes / bw;
    if json {
        let t: Vec<_> = tables
            .iter()
            .map(|(kk, per, p)| {
                let ops: Vec<_> = p
                    .ops
                    .iter()
                    .map(|(o, s)| {
                        serde_json::json!({"op": o,
                    "ms_per_pass": 1e3 * s / p.calls.max(1) as f64})
                    })
                    .collect();
                serde_json::json!({"tokens": kk, "ms_per_pass": per * 1e3, "ops": ops})
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"weight_bytes_per_pass": bytes,
            "read_bandwidth_gb_s": bw / 1e9, "bandwidth_limit_ms": limit * 1e3, "passes": t})
        );
        return Ok(());
    }
    println!(
        "weights read per pass: {:.1} MB; measured read bandwidth: {:.1} GB/s ({} threads); \
         bandwidth limit: {:.2} ms per pass ({:.0} tok/s decode)",
        bytes / 1e6,
        bw / 1e9,
        tandem_kernels::pool::global().threads(),
        limit * 1e3,
        1.0 / limit
    );
    let (k1, kn) = (&tables[0], &tables[1]);
    println!("| op | 1 token ms | share | {} tokens ms | share |", kn.0);
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (op, s1) in &k1.2.ops {
        let sn = kn.2.ops.iter().find(|(o, _)| o == op).map_or(0.0, |x| x.1);
        let (a, b) = (s1 / k1.2.calls as f64, sn / kn.2.calls as f64);
        println!(
            "| {op} | {:.3} | {:.1}% | {:.3} | {:.1}% |",
            a * 1e3,
            100.0 * a / k1.1,
            b * 1e3,
            100.0 * b / kn.1
        );
    }
    println!(
        "| total (wall) | {:.3} | {:.0}% of limit | {:.3} | {:.2}x the 1-token pass |",
        k1.1 * 1e3,
        100.0 * limit / k1.1,
        kn.1 * 1e3,
        kn.1 / k1.1
    );
    Ok(())
}

pub fn bench(b: BenchCmd) -> Result<()> {
    let a = match b.sub {
        Some(BenchSub::Spec(s)) => return crate::spec_cmd::bench_spec(s),
        None => b.args,
    };
    use tandem_model::bench::{rate_stats, time_decode, time_prefill, time_verify};
    let model_path = a.model.clone().context("--model is required")?;
    let ck = Checkpoint::open(&model_path, None)?;
    let model = ck.load_model(&Device::Cpu)?;
    if let Some(k) = a.profile {
        return bench_profile(&model, k, 64, a.json);
    }
    let reps = a.reps.max(1);
    let threads = rayon::current_num_threads();
    let mut rows = Vec::new();
    for (test, n) in [("pp", a.pp), ("tg", a.tg)] {
        if n == 0 {
            continue;
        }
        let run = |n| {
            if test == "pp" {
                time_prefill(&model, n)
            } else {
                time_decode(&model, n)
            }
        };
        run(n)?; // warm-up: page in the weights, size the caches
        let secs: Vec<f64> = (0..reps)
            .map(|_| run(n))
            .collect::<tandem_model::Result<_>>()?;
        let (mean, sd) = rate_stats(n, &secs);
        rows.push((format!("{test}{n}"), mean, sd));
    }
    if let Some(k) = a.verify {
        const CONTEXT: usize = 64;
        const PASSES: usize = 32;
        for kk in [1, k.max(1)] {
            time_verify(&model, kk, CONTEXT, 4)?;
            let secs: Vec<f64> = (0..reps)
                .map(|_| time_verify(&model, kk, CONTEXT, PASSES))
                .collect::<tandem_model::Result<_>>()?;
            // Reported as passes per second; the ratio of the two rows is the verify cost.
            let (mean, sd) = rate_stats(PASSES, &secs);
            rows.push((format!("verify{kk}@{CONTEXT} (passes/s)"), mean, sd));
        }
    }
    let size = ck.store.data_bytes();
    if a.json {
        let tests: Vec<_> = rows
            .iter()
            .map(|(t, m, s)| serde_json::json!({"test": t, "tok_s": m, "stddev": s}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"model": model_path, "size_bytes": size, "threads": threads,
            "weight_bytes_per_token": model.weight_bytes(), "results": tests})
        );
    } else {
        println!("| model | size | threads | test | t/s |");
        println!("| --- | ---: | ---: | ---: | ---: |");
        for (t, m, s) in rows {
            println!(
                "| {} | {:.2} MiB | {threads} | {t} | {m:.2} ± {s:.2} |",
                model_path.display(),
                size as f64 / 1048576.0
            );
        }
    }
    Ok(())
}

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
pub fn perplexity(a: PerplexityArgs) -> Result<()> {
    let ck = Checkpoint::open(&a.model, a.tokenizer.as_deref())?;
    let text = std::fs::read_to_string(&a.text)
        .with_context(|| format!("{}: cannot read", a.text.display()))?;
    let chunks = tandem_eval::Chunks::new(&ck.tokenizer, &text, a.ctx, a.chunks)
        .with_context(|| a.text.display().to_string())?;
    let model = ck.load_model(&Device::Cpu)?;
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
