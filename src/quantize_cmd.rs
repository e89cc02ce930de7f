//! `tandem quantize` and `tandem calibrate`: flags → policy → library calls → summary.

use crate::args::progress_bar;
use anyhow::{Context, Result};
use std::path::PathBuf;
use tandem_model::Checkpoint;
use tandem_quantize::calibrated::{CalibratedOptions, Method};
use tandem_quantize::job::{self, Format, PolicyChoices, QuantizeJob, QuantizeObserver};
use tandem_quantize::{calibrate::CalibrationOptions, make_plan, ImportanceMatrix, Options};

#[derive(clap::Args)]
pub struct QuantizeArgs {
    /// A Hugging Face folder (16-bit safetensors, or GPTQ / AWQ / compressed-tensors) or a
    /// GGUF file.
    model: PathBuf,
    /// Output: a GGUF file, or a folder with --format compressed-tensors.
    #[arg(long, required_unless_present_any = ["dry_run", "sweep"])]
    out: Option<PathBuf>,
    /// gguf (llama.cpp, tandem) or compressed-tensors (a Hugging Face folder that vLLM,
    /// SGLang and transformers load: q4_0 → int4 and q8_0 → int8, symmetric, group 32;
    /// embeddings and anything kept 16-bit listed in `ignore`).
    #[arg(long, default_value = "gguf", value_parser = ["gguf", "compressed-tensors"])]
    format: String,
    /// Columns per scale in a compressed-tensors export (a multiple of 32; above 32, round
    /// to nearest only).
    #[arg(long, default_value_t = 32)]
    group_size: usize,
    /// Quantize each variant (TYPE, TYPE@all to quantize attention too, +imatrix to use
    /// --imatrix), e.g. q8_0,q4_k,q4_0@all,q4_k+imatrix, reuse finished ones, evaluate all
    /// against this model on --eval-text and write one report to --out-dir.
    #[arg(long, value_delimiter = ',', requires_all = ["eval_text", "out_dir"], conflicts_with = "out")]
    sweep: Vec<String>,
    /// Evaluation text for --sweep (e.g. wiki.test.raw).
    #[arg(long)]
    eval_text: Option<PathBuf>,
    /// Folder for the sweep's variants and report.
    #[arg(long)]
    out_dir: Option<PathBuf>,
    #[command(flatten)]
    eval: crate::eval_cmd::EvalOptions,
    /// Type for the MLP projections (f32, f16, bf16, q8_0, q5_0, q5_1, q4_0, q4_1, q2_k..q6_k). Default q8_0;
    /// for a GPTQ / AWQ / compressed-tensors source, `keep` (its own grid, bit-exact where a GGML type matches).
    #[arg(long)]
    scheme: Option<String>,
    /// Type for q/k/v/o projections (default: keep, the source 16-bit type).
    #[arg(long)]
    attention: Option<String>,
    /// Type for the token embeddings (default q8_0; `keep` allowed).
    #[arg(long)]
    embeddings: Option<String>,
    /// Type for the output head when it is not tied to the embeddings (default q8_0).
    #[arg(long)]
    output: Option<String>,
    /// N=TYPE: the MLP projections of the first N and the last N layers at TYPE (e.g. 2=q8_0:
    /// a 4-bit draft for speculative decoding then agrees with its verifier more often, for 5%
    /// more bytes on SmolLM2). --rule still wins.
    #[arg(long, value_name = "N=TYPE")]
    edge_mlp: Option<String>,
    /// PATTERN=TYPE: tensors whose Hugging Face name matches the regex get TYPE (later rules win).
    #[arg(long = "rule")]
    rules: Vec<String>,
    /// A TOML file with the same choices (flags given on the command line win).
    #[arg(long)]
    recipe: Option<PathBuf>,
    /// Importance matrix (tandem calibrate or llama-imatrix, GGUF or legacy .dat): weights every block type but q8_0, as llama-quantize does.
    #[arg(long)]
    imatrix: Option<PathBuf>,
    #[command(flatten)]
    calib: CalibArgs,
    /// Print the plan and stop.
    #[arg(long)]
    dry_run: bool,
    /// List every tensor in the plan.
    #[arg(short, long)]
    verbose: bool,
    /// Replace the output file if it exists.
    #[arg(long)]
    force: bool,
    /// No progress bar.
    #[arg(short, long)]
    quiet: bool,
    /// Quantize tensors that hold NaN or Inf instead of refusing them.
    #[arg(long)]
    allow_nonfinite: bool,
    /// Use this tokenizer.json instead of the model's own.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

/// How weights are rounded: plain, or calibrated on text.
#[derive(clap::Args, Clone)]
pub struct CalibArgs {
    /// rtn (round to nearest: llama-quantize's bytes), gptq (error feedback through the
    /// calibration Hessian), awq (activation-aware channel scaling) or awq+gptq.
    #[arg(long, default_value = "rtn")]
    method: String,
    /// Calibration text for gptq/awq (default: the bundled opening of Austen's Emma followed
    /// by SmolLM2's answers to the bundled requests, ~32k tokens). Never the evaluation text.
    #[arg(long)]
    calib_text: Option<PathBuf>,
    /// Tokens per calibration chunk.
    #[arg(long, default_value_t = 512)]
    calib_ctx: usize,
    /// Use at most this many calibration chunks (default: all of the text).
    #[arg(long)]
    calib_chunks: Option<usize>,
    /// Also calibrate on this many tokens of the model's own answers to a bundled set of
    /// varied requests (in its chat template; sampled, seeded), generated first by a q8_0 copy
    /// of the whole model held in memory (e.g. 16384; on SmolLM2 q4_0 GPTQ after Emma's
    /// opening alone, wikitext-2 mean KLD 0.083 → 0.071; the default text already holds
    /// SmolLM2's answers, written out once; see BENCHMARKS.md). 0 = the text only.
    #[arg(long, default_value_t = 0)]
    calib_self: usize,
    /// With --calib-self: also write the generated answers' text to this file (to read what
    /// the layers were fitted to, or to reuse it with --calib-text).
    #[arg(long)]
    calib_self_save: Option<PathBuf>,
    /// GPTQ dampening, a fraction of the Hessian's mean diagonal (0.3: on SmolLM2 q4_0, mean
    /// KLD 0.099 at 0.01, 0.089 at 0.1, 0.083 at 0.3 and at 1.0; see BENCHMARKS.md).
    #[arg(long, default_value_t = 0.3)]
    gptq_damp: f64,
    /// GPTQ takes input channels in order of decreasing activation (GPTQModel's desc_act);
    /// each block's scale is still fixed when its first column comes up. On by default (on
    /// SmolLM2 everything-q4_0 mean KLD 0.190 -> 0.146, MLP-only unchanged; same time and
    /// memory); `--act-order=false` takes them in file order. K-quant tensors always take file
    /// order (a 256-column super-block's scales would be fixed before error feedback reached
    /// most of its columns).
    #[arg(long, default_value_t = true, num_args = 0..=1, require_equals = true, default_missing_value = "true", action = clap::ArgAction::Set, value_name = "BOOL")]
    act_order: bool,
}

impl CalibArgs {
    /// The calibration options for `method` (the flag's, unless a sweep variant names one).
    fn options(
        &self,
        method: Option<Method>,
        load: &tandem_model::LoadOptions,
    ) -> Result<CalibratedOptions> {
        // A sweep's rtn variants simply read no text; one method must be a calibrated one.
        let (method, single) = match method {
            Some(m) => (m, false),
            None => (Method::parse(&self.method)?, true),
        };
        let mut o = job::calibration_options(
            method,
            self.calib_text.as_deref(),
            self.calib_ctx,
            self.calib_chunks,
            self.gptq_damp,
        )?;
        o.threads = load.threads;
        o.gptq.act_order = self.act_order;
        if single || method.is_calibrated() {
            job::set_self_calibration(&mut o, self.calib_self)?;
        }
        Ok(o)
    }
}

/// A progress bar and notes on stderr for quantization; `prefix` labels a sweep's variant.
struct Bar {
    bar: indicatif::ProgressBar,
    prefix: String,
}

impl Bar {
    fn new(quiet: bool, prefix: &str) -> Self {
        Bar {
            bar: progress_bar(quiet),
            prefix: prefix.to_string(),
        }
    }
}

impl QuantizeObserver for Bar {
    fn progress(&self, stage: &str, done: u64, total: u64) {
        self.bar.set_length(total);
        self.bar.set_position(done);
        self.bar.set_message(format!("{}{stage}", self.prefix));
    }
    fn done(&self) {
        self.bar.finish_and_clear();
    }
    fn note(&self, line: &str) {
        eprintln!("{line}");
    }
}

impl QuantizeArgs {
    fn choices(&self) -> PolicyChoices {
        PolicyChoices {
            scheme: self.scheme.clone(),
            attention: self.attention.clone(),
            embeddings: self.embeddings.clone(),
            output: self.output.clone(),
            edge_mlp: self.edge_mlp.clone(),
            rules: self.rules.clone(),
            recipe: self.recipe.clone(),
        }
    }
}

pub fn quantize(a: QuantizeArgs, load: &tandem_model::LoadOptions) -> Result<()> {
    let format = Format::parse(&a.format, a.group_size)?;
    if !a.sweep.is_empty() {
        if format != Format::Gguf {
            anyhow::bail!("--sweep writes GGUF variants; drop --format compressed-tensors");
        }
        if a.calib.calib_self_save.is_some() {
            anyhow::bail!(
                "--calib-self-save writes one quantization's answers; drop it with --sweep"
            );
        }
        return sweep(&a, load);
    }
    let mut calib = a.calib.options(None, load)?;
    if let Some(path) = &a.calib.calib_self_save {
        let Some(sc) = calib.self_calibration.as_mut() else {
            anyhow::bail!(
                "--calib-self-save writes what --calib-self generates; add --calib-self N"
            );
        };
        tandem_quantize::output::check_target(path, a.force)?;
        sc.save_text = Some(path.clone());
        sc.save_force = a.force;
    }
    let ck = Checkpoint::open(&a.model, a.tokenizer.as_deref())?;
    let job = QuantizeJob {
        imatrix: a.imatrix.clone(),
        allow_nonfinite: a.allow_nonfinite,
        force: a.force,
        calib,
        ..QuantizeJob::new(a.choices(), format, Method::Rtn)
    };
    let plan = job.plan(&ck)?;
    if a.dry_run {
        print!("{}", plan.summary(a.verbose));
        return Ok(());
    }
    let out = a.out.as_deref().context("--out is required")?;
    let report = job
        .run(&ck, &plan, out, &Bar::new(a.quiet, ""))
        .with_context(|| format!("quantizing {}", a.model.display()))?;
    print!("{}", plan.summary(a.verbose));
    for n in &report.notes {
        eprintln!("note: {n}");
    }
    match report.quantized_layers {
        Some(layers) => println!(
            "wrote {} (compressed-tensors pack-quantized: {layers} layers quantized, {} tensors, {} bytes of weights) in {:.2} s",
            out.display(),
            report.tensors,
            report.bytes_out,
            report.seconds
        ),
        None => println!(
            "wrote {} ({} tensors, {} bytes) in {:.2} s: {:.0} MB/s of source weights{}",
            out.display(),
            report.tensors,
            report.bytes_out,
            report.seconds,
            report.throughput_mb_s.unwrap_or_default(),
            if report.imatrix_tensors > 0 {
                format!(", {} tensors importance-weighted", report.imatrix_tensors)
            } else {
                String::new()
            }
        ),
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct CalibrateArgs {
    /// A Hugging Face folder or a GGUF file.
    model: PathBuf,
    /// Calibration text (default: the bundled opening of Austen's Emma followed by SmolLM2's
    /// answers to the bundled requests). Never evaluation text.
    #[arg(long)]
    text: Option<PathBuf>,
    /// Output importance matrix (llama.cpp's GGUF imatrix format).
    #[arg(long)]
    out: PathBuf,
    /// Tokens per chunk.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Use at most this many chunks.
    #[arg(long)]
    chunks: Option<usize>,
    #[arg(long)]
    force: bool,
    #[arg(short, long)]
    quiet: bool,
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

pub fn calibrate(a: CalibrateArgs, load: &tandem_model::LoadOptions) -> Result<()> {
    tandem_quantize::output::check_target(&a.out, a.force)?;
    let ck = Checkpoint::open(&a.model, a.tokenizer.as_deref())?;
    let (text, dataset) = match &a.text {
        Some(p) => (
            tandem_model::files::read_text_capped(p, tandem_model::files::TEXT_CAP)
                .with_context(|| format!("{}: cannot read", p.display()))?,
            p.display().to_string(),
        ),
        None => (
            tandem_quantize::DEFAULT_CALIBRATION_TEXT.to_string(),
            tandem_quantize::DEFAULT_CALIBRATION_NAME.to_string(),
        ),
    };
    let model = ck.load_model(load)?;
    let bar = progress_bar(a.quiet);
    let start = std::time::Instant::now();
    let progress = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let opts = CalibrationOptions {
        ctx: a.ctx,
        chunks: a.chunks,
        dataset,
    };
    let m = tandem_quantize::calibrate::calibrate(&ck, &model, &text, &opts, &progress)
        .with_context(|| format!("calibrating {}", a.model.display()))?;
    bar.finish_and_clear();
    m.write_gguf(&a.out, a.force)?;
    eprintln!(
        "wrote {} ({} weights, {} chunks of {} tokens) in {:.1} s",
        a.out.display(),
        m.entries.len(),
        m.chunk_count,
        m.chunk_size,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `--sweep`: each variant is quantized into --out-dir (kept when already there), then all are
/// evaluated against the source model in one report.
fn sweep(a: &QuantizeArgs, load: &tandem_model::LoadOptions) -> Result<()> {
    let (Some(dir), Some(text)) = (&a.out_dir, &a.eval_text) else {
        anyhow::bail!("--sweep needs --eval-text and --out-dir");
    };
    if let Some(c) = &a.calib.calib_text {
        let same = match (std::fs::canonicalize(c), std::fs::canonicalize(text)) {
            (Ok(x), Ok(y)) => x == y,
            _ => false,
        };
        if same {
            anyhow::bail!(
                "--calib-text and --eval-text are the same file ({}): calibrating on the evaluation text would flatter every calibrated variant",
                c.display()
            );
        }
    }
    let ck = Checkpoint::open(&a.model, a.tokenizer.as_deref())?;
    let imatrix = match &a.imatrix {
        Some(p) => Some(ImportanceMatrix::read(p)?),
        None => None,
    };
    // Every variant is parsed and planned (metadata only) before anything is created, so a
    // bad one fails without leaving a folder behind.
    let mut variants = Vec::new();
    for item in &a.sweep {
        // TYPE[@all][+imatrix][+gptq][+awq]: the type, then how it is made.
        let mut parts = item.split('+');
        let rest = parts.next().unwrap_or_default();
        let (mut weighted, mut gptq, mut awq) = (false, false, false);
        for p in parts {
            match p {
                "imatrix" => weighted = true,
                "gptq" => gptq = true,
                "awq" => awq = true,
                other => anyhow::bail!(
                    "sweep variant '{item}': unknown '+{other}' (known: +imatrix, +gptq, +awq)"
                ),
            }
        }
        let method = match (awq, gptq) {
            (true, true) => Method::AwqGptq,
            (true, false) => Method::Awq,
            (false, true) => Method::Gptq,
            (false, false) => Method::Rtn,
        };
        let calib = a.calib.options(Some(method), load)?;
        let (ty, all) = match rest.strip_suffix("@all") {
            Some(t) => (t, true),
            None => (rest, false),
        };
        if weighted && imatrix.is_none() {
            anyhow::bail!("sweep variant '{item}' needs --imatrix FILE");
        }
        let attention = if all {
            Some(ty)
        } else {
            a.attention.as_deref()
        };
        let policy = PolicyChoices {
            scheme: Some(ty.to_string()),
            attention: attention.map(str::to_string),
            ..a.choices()
        }
        .policy()
        .with_context(|| format!("sweep variant '{item}'"))?;
        let plan = make_plan(&ck, &policy).with_context(|| format!("sweep variant '{item}'"))?;
        let file = dir.join(format!("{}.gguf", item.replace(['@', '+'], "-")));
        variants.push((item, plan, weighted, calib, file));
    }
    let mut fresh = crate::eval_cmd::create_output_dir(dir)?;
    let mut files = Vec::new();
    for (item, plan, weighted, calib, file) in variants {
        if file.exists() {
            eprintln!("{}: kept from an earlier run", file.display());
        } else {
            let weights = imatrix.as_ref().filter(|_| weighted);
            let bar = Bar::new(a.quiet, &format!("{item}: "));
            let calibrated =
                job::calibrate(&ck, &plan, &calib, weights, &bar, "").with_context(|| {
                    format!("{} calibration of {}", calib.method, ck.path.display())
                })?;
            let progress = |done: u64, total: u64, name: &str| bar.progress(name, done, total);
            let opts = Options {
                imatrix: weights,
                allow_nonfinite: a.allow_nonfinite,
                cancel: None,
                progress: Some(&progress),
                calibrated: Some(&calibrated),
            };
            let r = tandem_quantize::quantize_to_file(&ck, &plan, &opts, &file, false)
                .with_context(|| format!("sweep variant '{item}'"))?;
            bar.done();
            eprintln!(
                "{}: {} bytes in {:.1} s",
                file.display(),
                r.bytes_out,
                r.seconds
            );
        }
        // A finished variant is worth keeping (a later run reuses it): the folder stays.
        if let Some(g) = fresh.take() {
            g.commit(|| ());
        }
        files.push(file);
    }
    crate::eval_cmd::run_eval(&a.model, &files, text, &a.eval, dir, a.quiet, load)
}
