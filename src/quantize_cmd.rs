//! `tandem quantize` and `tandem calibrate`: flags → policy → library calls → summary.

use crate::commands::progress_bar;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use tandem_model::Checkpoint;
use tandem_quantize::calibrated::{Calibrated, CalibratedOptions, Method};
use tandem_quantize::{
    calibrate::CalibrationOptions, make_plan, ImportanceMatrix, Options, Policy, QuantType, Recipe,
    Rule, TypeChoice,
};

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
    /// Calibration text for gptq/awq (default: the bundled opening of Austen's Emma). Never
    /// the evaluation text.
    #[arg(long)]
    calib_text: Option<PathBuf>,
    /// Tokens per calibration chunk.
    #[arg(long, default_value_t = 512)]
    calib_ctx: usize,
    /// Use at most this many calibration chunks (default: all of the text).
    #[arg(long)]
    calib_chunks: Option<usize>,
    /// GPTQ dampening, a fraction of the Hessian's mean diagonal (0.3: on SmolLM2 q4_0, mean
    /// KLD 0.099 at 0.01, 0.089 at 0.1, 0.083 at 0.3 and at 1.0; see BENCHMARKS.md).
    #[arg(long, default_value_t = 0.3)]
    gptq_damp: f64,
}

impl CalibArgs {
    /// The calibration options for `method` (the flag's, unless a sweep variant names one).
    fn options(&self, method: Option<Method>) -> Result<CalibratedOptions> {
        let method = match method {
            Some(m) => m,
            None => Method::parse(&self.method)?,
        };
        let mut o = CalibratedOptions::new(method);
        if let Some(p) = &self.calib_text {
            o.text = std::fs::read_to_string(p)
                .with_context(|| format!("{}: cannot read the calibration text", p.display()))?;
            o.text_name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
        }
        if !(0.0..=1.0).contains(&self.gptq_damp) {
            anyhow::bail!("--gptq-damp {} is outside 0..=1", self.gptq_damp);
        }
        o.ctx = self.calib_ctx;
        o.chunks = self.calib_chunks;
        o.gptq.damp = self.gptq_damp;
        Ok(o)
    }
}

/// Runs a calibrated method (nothing for rtn), with a progress bar per layer.
fn run_calibration(
    ck: &Checkpoint,
    plan: &tandem_quantize::Plan,
    opts: &CalibratedOptions,
    imatrix: Option<&ImportanceMatrix>,
    quiet: bool,
    label: &str,
) -> Result<Calibrated> {
    if !opts.method.is_calibrated() {
        return Ok(Calibrated::default());
    }
    let bar = progress_bar(quiet);
    let progress = |done: usize, total: usize, what: &str| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(format!("{label}{} layer {done}: {what}", opts.method));
    };
    let c = tandem_quantize::calibrated::calibrate_plan(ck, plan, opts, imatrix, &progress)
        .with_context(|| format!("{} calibration of {}", opts.method, ck.path.display()))?;
    bar.finish_and_clear();
    let t = &c.timings;
    eprintln!(
        "{label}{}: {} tensors calibrated on {} chunks ({} tokens of {}): layer passes {:.1} s, Hessians {:.1} s, scale search {:.1} s, factorization {:.1} s, quantization {:.1} s",
        opts.method,
        c.tensors.len(),
        c.chunks,
        c.tokens,
        opts.text_name,
        t.statistics,
        t.hessians,
        t.scale_search,
        t.factorization,
        t.quantization
    );
    Ok(c)
}

/// The policy from a recipe (if any) overlaid with the command-line flags.
pub fn policy_from(
    scheme: Option<&str>,
    attention: Option<&str>,
    embeddings: Option<&str>,
    output: Option<&str>,
    rules: &[String],
    recipe: Option<&Path>,
) -> Result<Policy> {
    // Flags win over the recipe's fields; the library turns the result into a policy.
    let mut recipe = match recipe {
        Some(p) => Recipe::from_file(p)?,
        None => Recipe::default(),
    };
    for (flag, field) in [
        (scheme, &mut recipe.scheme),
        (attention, &mut recipe.attention),
        (embeddings, &mut recipe.embeddings),
        (output, &mut recipe.output),
    ] {
        if let Some(v) = flag {
            *field = Some(v.to_string());
        }
    }
    let mut policy = recipe.to_policy()?;
    for r in rules {
        policy.rules.push(Rule::parse(r)?);
    }
    Ok(policy)
}

pub fn quantize(a: QuantizeArgs) -> Result<()> {
    let compressed = a.format == "compressed-tensors";
    // compressed-tensors quantizes linear layers only: embeddings and a separate head stay
    // 16-bit unless asked otherwise.
    let keep_default = compressed.then_some("keep");
    let mut policy = policy_from(
        a.scheme.as_deref(),
        a.attention.as_deref(),
        a.embeddings.as_deref().or(keep_default),
        a.output.as_deref().or(keep_default),
        &a.rules,
        a.recipe.as_deref(),
    )?;
    if a.group_size != 32 && !compressed {
        anyhow::bail!(
            "--group-size applies to --format compressed-tensors (GGUF blocks are 32 columns)"
        );
    }
    if !a.sweep.is_empty() {
        if compressed {
            anyhow::bail!("--sweep writes GGUF variants; drop --format compressed-tensors");
        }
        return sweep(&a);
    }
    let ck = Checkpoint::open(&a.model, a.tokenizer.as_deref())?;
    if ck.imported.is_some() && a.scheme.is_none() && a.recipe.is_none() {
        // A quantized source converts losslessly by default: every layer keeps its grid
        // (held as the GGML type it maps onto), everything else its type.
        policy.mlp = TypeChoice::Keep;
        if a.embeddings.is_none() {
            policy.embeddings = TypeChoice::Keep;
        }
        if a.output.is_none() {
            policy.output = TypeChoice::Keep;
        }
    }
    let plan = make_plan(&ck, &policy)?;
    if compressed {
        tandem_quantize::compressed_tensors::check_plan(&ck, &plan)?;
        let method = Method::parse(&a.calib.method)?;
        if method.is_calibrated() && a.group_size != 32 {
            anyhow::bail!(
                "{method} chooses a scale per 32-column block: --group-size {} takes --method rtn",
                a.group_size
            );
        }
        if method.is_calibrated()
            && plan
                .tensors
                .iter()
                .any(|t| t.target == Some(QuantType::Q4_1))
        {
            anyhow::bail!(
                "{method} makes q4_1 blocks with a float minimum, which compressed-tensors cannot hold: use --method rtn for asymmetric int4, or q4_0 with {method}"
            );
        }
    }
    if a.dry_run {
        print!("{}", plan.summary(a.verbose));
        return Ok(());
    }
    let out = a.out.as_deref().context("--out is required")?;
    tandem_quantize::output::check_target(out, a.force)?;
    let imatrix = match &a.imatrix {
        Some(p) => Some(ImportanceMatrix::read(p)?),
        None => None,
    };
    if imatrix.is_some()
        && !plan
            .tensors
            .iter()
            .any(|t| t.target.is_some_and(QuantType::uses_importance))
    {
        eprintln!("note: --imatrix given but no tensor is planned as a type it weights (every block type but q8_0); it changes nothing");
    }
    let calib = a.calib.options(None)?;
    let calibrated = run_calibration(&ck, &plan, &calib, imatrix.as_ref(), a.quiet, "")?;
    let bar = progress_bar(a.quiet);
    let progress = |done: u64, total: u64, name: &str| {
        bar.set_length(total);
        bar.set_position(done);
        bar.set_message(name.to_string());
    };
    let opts = Options {
        imatrix: imatrix.as_ref(),
        allow_nonfinite: a.allow_nonfinite,
        cancel: None,
        progress: Some(&progress),
        calibrated: Some(&calibrated),
    };
    // Both formats: the plan and the notes, then what was written.
    let finish = |notes: &[String]| {
        bar.finish_and_clear();
        print!("{}", plan.summary(a.verbose));
        for n in notes {
            eprintln!("note: {n}");
        }
    };
    if compressed {
        let report = tandem_quantize::compressed_tensors::write_folder(
            &ck,
            &plan,
            &opts,
            a.group_size,
            out,
            a.force,
        )
        .with_context(|| format!("quantizing {}", a.model.display()))?;
        finish(&report.notes);
        println!(
            "wrote {} (compressed-tensors pack-quantized: {} layers quantized, {} tensors, {} bytes of weights) in {:.2} s",
            out.display(),
            report.quantized_layers,
            report.tensors,
            report.bytes_out,
            report.seconds
        );
        return Ok(());
    }
    let report = tandem_quantize::quantize_to_file(&ck, &plan, &opts, out, a.force)
        .with_context(|| format!("quantizing {}", a.model.display()))?;
    finish(&report.notes);
    println!(
        "wrote {} ({} tensors, {} bytes) in {:.2} s: {:.0} MB/s of source weights{}",
        out.display(),
        report.tensors,
        report.bytes_out,
        report.seconds,
        report.throughput_mb_s(),
        if report.imatrix_tensors > 0 {
            format!(", {} tensors importance-weighted", report.imatrix_tensors)
        } else {
            String::new()
        }
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct CalibrateArgs {
    /// A Hugging Face folder or a GGUF file.
    model: PathBuf,
    /// Calibration text (default: the bundled opening of Austen's Emma). Never evaluation text.
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

pub fn calibrate(a: CalibrateArgs) -> Result<()> {
    tandem_quantize::output::check_target(&a.out, a.force)?;
    let ck = Checkpoint::open(&a.model, a.tokenizer.as_deref())?;
    let (text, dataset) = match &a.text {
        Some(p) => (
            std::fs::read_to_string(p).with_context(|| format!("{}: cannot read", p.display()))?,
            p.display().to_string(),
        ),
        None => (
            tandem_quantize::CALIBRATION_TEXT.to_string(),
            "tandem:austen-emma-calibration.txt".to_string(),
        ),
    };
    let model = ck.load_model(&candle_core::Device::Cpu)?;
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
fn sweep(a: &QuantizeArgs) -> Result<()> {
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
        let calib = a.calib.options(Some(method))?;
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
        let policy = policy_from(
            Some(ty),
            attention,
            a.embeddings.as_deref(),
            a.output.as_deref(),
            &a.rules,
            a.recipe.as_deref(),
        )
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
            let calibrated =
                run_calibration(&ck, &plan, &calib, weights, a.quiet, &format!("{item}: "))?;
            let bar = progress_bar(a.quiet);
            let progress = |done: u64, total: u64, name: &str| {
                bar.set_length(total);
                bar.set_position(done);
                bar.set_message(format!("{item}: {name}"));
            };
            let opts = Options {
                imatrix: weights,
                allow_nonfinite: a.allow_nonfinite,
                cancel: None,
                progress: Some(&progress),
                calibrated: Some(&calibrated),
            };
            let r = tandem_quantize::quantize_to_file(&ck, &plan, &opts, &file, false)
                .with_context(|| format!("sweep variant '{item}'"))?;
            bar.finish_and_clear();
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
    crate::eval_cmd::run_eval(&a.model, &files, text, &a.eval, dir, a.quiet)
}
