//! One quantization run from the user's choices: the policy (scheme, attention, embeddings,
//! output, rules, recipe), the output format, the rounding method and its calibration, the
//! importance matrix. `tandem quantize` and the Python package's `tandem.quantize` both build
//! a [`QuantizeJob`] and run it; they differ only in how they show progress.

use crate::calibrated::{Calibrated, CalibratedOptions, Method};
use crate::self_calibration::SelfCalibration;
use crate::{
    make_plan, Error, ImportanceMatrix, Options, Plan, Policy, QuantType, Recipe, Result, Rule,
    TypeChoice,
};
use std::path::{Path, PathBuf};
use tandem_model::Checkpoint;

/// The type choices as a user gives them (flags or keyword arguments), over a recipe file.
#[derive(Debug, Clone, Default)]
pub struct PolicyChoices {
    /// The MLP projections' type (`None`: the recipe's, else q8_0; `keep` for an imported
    /// GPTQ/AWQ/compressed-tensors source).
    pub scheme: Option<String>,
    pub attention: Option<String>,
    pub embeddings: Option<String>,
    pub output: Option<String>,
    /// `N=TYPE`: the MLP of the first and last N layers at TYPE.
    pub edge_mlp: Option<String>,
    /// `PATTERN=TYPE`, later ones win.
    pub rules: Vec<String>,
    /// A TOML recipe; the fields above win over its.
    pub recipe: Option<PathBuf>,
}

impl PolicyChoices {
    /// The policy from the recipe (if any) overlaid with the choices.
    pub fn policy(&self) -> Result<Policy> {
        let mut recipe = match &self.recipe {
            Some(p) => Recipe::from_file(p)?,
            None => Recipe::default(),
        };
        for (choice, field) in [
            (&self.scheme, &mut recipe.scheme),
            (&self.attention, &mut recipe.attention),
            (&self.embeddings, &mut recipe.embeddings),
            (&self.output, &mut recipe.output),
            (&self.edge_mlp, &mut recipe.edge_mlp),
        ] {
            if let Some(v) = choice {
                *field = Some(v.clone());
            }
        }
        let mut policy = recipe.to_policy()?;
        for r in &self.rules {
            policy.rules.push(Rule::parse(r)?);
        }
        Ok(policy)
    }
}

/// What the output is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One GGUF file (llama.cpp, tandem).
    Gguf,
    /// A Hugging Face folder in compressed-tensors' pack-quantized form (vLLM, SGLang,
    /// transformers), with this many columns per scale.
    CompressedTensors { group_size: usize },
}

impl Format {
    /// `gguf` or `compressed-tensors` (group 32 unless `group_size` says otherwise).
    pub fn parse(name: &str, group_size: usize) -> Result<Self> {
        match name {
            "gguf" if group_size == 32 => Ok(Format::Gguf),
            "gguf" => Err(Error::Plan(
                "--group-size applies to --format compressed-tensors (GGUF blocks are 32 columns)"
                    .into(),
            )),
            "compressed-tensors" => Ok(Format::CompressedTensors { group_size }),
            other => Err(Error::Plan(format!(
                "unknown output format '{other}' (known: gguf, compressed-tensors)"
            ))),
        }
    }
}

/// One quantization run.
pub struct QuantizeJob {
    pub choices: PolicyChoices,
    pub format: Format,
    pub calib: CalibratedOptions,
    /// Importance matrix file (tandem calibrate or llama-imatrix).
    pub imatrix: Option<PathBuf>,
    pub allow_nonfinite: bool,
    /// Replace an existing output.
    pub force: bool,
}

impl QuantizeJob {
    pub fn new(choices: PolicyChoices, format: Format, method: Method) -> Self {
        QuantizeJob {
            choices,
            format,
            calib: CalibratedOptions::new(method),
            imatrix: None,
            allow_nonfinite: false,
            force: false,
        }
    }

    /// The plan for `ck`: the policy with the format's defaults, a quantized source kept
    /// lossless unless a scheme is chosen, and the format's limits checked (metadata only).
    pub fn plan(&self, ck: &Checkpoint) -> Result<Plan> {
        let compressed = matches!(self.format, Format::CompressedTensors { .. });
        let mut c = self.choices.clone();
        // compressed-tensors quantizes linear layers only: embeddings and a separate head
        // stay 16-bit unless asked otherwise.
        if compressed {
            c.embeddings.get_or_insert_with(|| "keep".into());
            c.output.get_or_insert_with(|| "keep".into());
        }
        let mut policy = c.policy()?;
        if ck.imported.is_some() && c.scheme.is_none() && c.recipe.is_none() {
            // A quantized source converts losslessly by default: every layer keeps its grid
            // (held as the GGML type it maps onto), everything else its type.
            policy.mlp = TypeChoice::Keep;
            if c.embeddings.is_none() {
                policy.embeddings = TypeChoice::Keep;
            }
            if c.output.is_none() {
                policy.output = TypeChoice::Keep;
            }
        }
        let plan = make_plan(ck, &policy)?;
        if let Format::CompressedTensors { group_size } = self.format {
            crate::compressed_tensors::check_plan(ck, &plan)?;
            let method = self.calib.method;
            if method.is_calibrated() && group_size != 32 {
                return Err(Error::Plan(format!(
                    "{method} chooses a scale per 32-column block: --group-size {group_size} takes --method rtn"
                )));
            }
            if method.is_calibrated()
                && plan
                    .tensors
                    .iter()
                    .any(|t| t.target == Some(QuantType::Q4_1))
            {
                return Err(Error::Plan(format!(
                    "{method} makes q4_1 blocks with a float minimum, which compressed-tensors cannot hold: use --method rtn for asymmetric int4, or q4_0 with {method}"
                )));
            }
        }
        Ok(plan)
    }

    /// Quantizes `ck` by `plan` into `out` (atomically; an existing output only with `force`).
    pub fn run(
        &self,
        ck: &Checkpoint,
        plan: &Plan,
        out: &Path,
        obs: &dyn QuantizeObserver,
    ) -> Result<JobReport> {
        crate::output::check_target(out, self.force)?;
        let imatrix = match &self.imatrix {
            Some(p) => Some(ImportanceMatrix::read(p)?),
            None => None,
        };
        if imatrix.is_some()
            && !plan
                .tensors
                .iter()
                .any(|t| t.target.is_some_and(QuantType::uses_importance))
        {
            obs.note("note: an importance matrix was given but no tensor is planned as a type it weights (every block type but q8_0); it changes nothing");
        }
        let calibrated = calibrate(ck, plan, &self.calib, imatrix.as_ref(), obs, "")?;
        let progress = |done: u64, total: u64, name: &str| {
            obs.progress(name, done, total);
        };
        let opts = Options {
            imatrix: imatrix.as_ref(),
            allow_nonfinite: self.allow_nonfinite,
            cancel: None,
            progress: Some(&progress),
            calibrated: Some(&calibrated),
        };
        let report = match self.format {
            Format::CompressedTensors { group_size } => {
                let r = crate::compressed_tensors::write_folder(
                    ck, plan, &opts, group_size, out, self.force,
                )?;
                JobReport {
                    tensors: r.tensors,
                    bytes_out: r.bytes_out,
                    seconds: r.seconds,
                    notes: r.notes,
                    quantized_layers: Some(r.quantized_layers),
                    imatrix_tensors: 0,
                    throughput_mb_s: None,
                }
            }
            Format::Gguf => {
                let r = crate::quantize_to_file(ck, plan, &opts, out, self.force)?;
                JobReport {
                    tensors: r.tensors,
                    bytes_out: r.bytes_out,
                    seconds: r.seconds,
                    quantized_layers: None,
                    imatrix_tensors: r.imatrix_tensors,
                    throughput_mb_s: Some(r.throughput_mb_s()),
                    notes: r.notes,
                }
            }
        };
        obs.done();
        Ok(report)
    }
}

/// What a finished run wrote.
#[derive(Debug, Clone)]
pub struct JobReport {
    pub tensors: usize,
    pub bytes_out: u64,
    pub seconds: f64,
    /// Things the user should know (tokenizer notes, layers held inexactly, ...).
    pub notes: Vec<String>,
    /// compressed-tensors: the layers written as packed integers.
    pub quantized_layers: Option<usize>,
    /// GGUF: tensors quantized with importance weights.
    pub imatrix_tensors: usize,
    /// GGUF: source megabytes per second.
    pub throughput_mb_s: Option<f64>,
}

/// How a run shows what it is doing; every method has a silent default.
pub trait QuantizeObserver {
    /// Quantizing: `done` of `total` (source bytes, or layers while calibrating) at `stage`.
    fn progress(&self, _stage: &str, _done: u64, _total: u64) {}
    /// The progress display can go (a phase ended).
    fn done(&self) {}
    /// A one-line note.
    fn note(&self, _line: &str) {}
}

/// Shows nothing.
pub struct Silent;
impl QuantizeObserver for Silent {}

/// Runs a calibrated method (nothing for rtn), reporting each layer and, at the end, where
/// the time went. `label` prefixes the progress and the note (a sweep's variant).
pub fn calibrate(
    ck: &Checkpoint,
    plan: &Plan,
    opts: &CalibratedOptions,
    imatrix: Option<&ImportanceMatrix>,
    obs: &dyn QuantizeObserver,
    label: &str,
) -> Result<Calibrated> {
    if !opts.method.is_calibrated() {
        return Ok(Calibrated::default());
    }
    let progress = |done: usize, total: usize, what: &str| {
        obs.progress(
            &format!("{label}{} layer {done}: {what}", opts.method),
            done as u64,
            total as u64,
        );
    };
    let c = crate::calibrated::calibrate_plan(ck, plan, opts, imatrix, &progress)?;
    obs.done();
    let t = &c.timings;
    let (own_answers, self_generation) = match opts.self_calibration {
        Some(_) => (
            " and the model's own answers",
            format!("self-generation {:.1} s, ", t.self_generation),
        ),
        None => ("", String::new()),
    };
    obs.note(&format!(
        "{label}{}: {} tensors calibrated on {} chunks ({} tokens of {}{}): {}layer passes {:.1} s, Hessians {:.1} s, scale search {:.1} s, factorization {:.1} s, quantization {:.1} s",
        opts.method,
        c.tensors.len(),
        c.chunks,
        c.tokens,
        opts.text_name,
        own_answers,
        self_generation,
        t.statistics,
        t.hessians,
        t.scale_search,
        t.factorization,
        t.quantization
    ));
    Ok(c)
}

/// Calibration options for `method` with the text from `calib_text` (default: the bundled
/// Austen), checked.
pub fn calibration_options(
    method: Method,
    calib_text: Option<&Path>,
    ctx: usize,
    chunks: Option<usize>,
    gptq_damp: f64,
) -> Result<CalibratedOptions> {
    let mut o = CalibratedOptions::new(method);
    if let Some(p) = calib_text {
        o.text = tandem_model::files::read_text_capped(p, tandem_model::files::TEXT_CAP).map_err(
            |e| Error::Io {
                path: p.to_path_buf(),
                msg: format!("cannot read the calibration text: {e}"),
            },
        )?;
        o.text_name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
    }
    if !(0.0..=1.0).contains(&gptq_damp) {
        return Err(Error::Plan(format!(
            "--gptq-damp {gptq_damp} is outside 0..=1"
        )));
    }
    o.ctx = ctx;
    o.chunks = chunks;
    o.gptq.damp = gptq_damp;
    Ok(o)
}

/// Most self-calibration tokens a run may ask for: SmolLM2-135M holds ~8.6 KB of calibration
/// activations per token (137 MB for 15,872), so this is ~9 GB already, and the q8_0 copy
/// generates them at a few hundred tokens a second. `--calib-self 10¹²` reserved 4 TB for the
/// token ids and aborted.
pub const MAX_SELF_CALIBRATION_TOKENS: usize = 1 << 20;

/// Adds `tokens` of the model's own answers to the calibration (0: the text only). For one
/// method: rounding to nearest reads no calibration, so asking it to self-calibrate is an
/// error, not an option silently ignored. (A sweep mixes methods and sets this on its
/// calibrated variants only.)
pub fn set_self_calibration(o: &mut CalibratedOptions, tokens: usize) -> Result<()> {
    if tokens == 0 {
        return Ok(());
    }
    if tokens > MAX_SELF_CALIBRATION_TOKENS {
        return Err(Error::Plan(format!(
            "self-calibration (--calib-self, calib_self) of {tokens} tokens is more than {MAX_SELF_CALIBRATION_TOKENS}: the generation takes hours and the calibration activations alone GBs"
        )));
    }
    if !o.method.is_calibrated() {
        return Err(Error::Plan(
            "self-calibration (--calib-self, calib_self) calibrates a method on text; choose method gptq, awq or awq+gptq (rounding to nearest reads no text)".into(),
        ));
    }
    o.self_calibration = Some(SelfCalibration::new(tokens));
    Ok(())
}
