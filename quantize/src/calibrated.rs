//! Calibrated quantization: methods that look at what the model computes on calibration text,
//! not only at the weights. Layers are quantized in order, each with the inputs that the
//! already-quantized layers before it produce (as GPTQModel does): the calibration text is
//! embedded once, then for every decoder layer the hidden states of all chunks go through that
//! one layer — once per group of projections sharing an input (q/k/v, o, gate/up, down) to
//! collect that group's statistics, whose weights are then quantized and put in place in the
//! model — and once more to produce the next layer's inputs. One group's Hessian is in memory
//! at a time.
//!
//! The result is the GGML bytes of every calibrated tensor (and any rescaled dense tensors),
//! which [`crate::write_gguf`] writes in place of rounding the source.

use crate::awq;
use crate::encode;
use crate::error::{tensor_err, Error, Result};
use crate::gptq::{self, GptqOptions};
use crate::grid;
use crate::imatrix::ImportanceMatrix;
use crate::plan::{Plan, PlannedTensor};
use crate::self_calibration::{self, SelfCalibration};
use crate::types::QuantType;
use candle_core::Tensor;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;
use tandem_model::gguf_names::{hf_to_gguf, permute_qk_rows, Permute};
use tandem_model::weights::{RawTensor, WeightDType};
use tandem_model::{ActivationObserver, Checkpoint};

/// How weights become levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Round to nearest with the type's own encoder (llama-quantize's bytes).
    Rtn,
    /// GPTQ: error feedback through the inverse Hessian of calibration inputs.
    Gptq,
    /// Activation-aware scaling of MLP input channels, then rounding.
    Awq,
    /// Activation-aware scaling, then GPTQ.
    AwqGptq,
}

impl Method {
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "rtn" => Ok(Method::Rtn),
            "gptq" => Ok(Method::Gptq),
            "awq" => Ok(Method::Awq),
            "awq+gptq" | "gptq+awq" => Ok(Method::AwqGptq),
            _ => Err(Error::Plan(format!(
                "unknown method '{s}' (known: rtn, gptq, awq, awq+gptq)"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Method::Rtn => "rtn",
            Method::Gptq => "gptq",
            Method::Awq => "awq",
            Method::AwqGptq => "awq+gptq",
        }
    }

    pub fn uses_gptq(self) -> bool {
        matches!(self, Method::Gptq | Method::AwqGptq)
    }

    pub fn uses_awq(self) -> bool {
        matches!(self, Method::Awq | Method::AwqGptq)
    }

    /// Whether the method needs calibration text.
    pub fn is_calibrated(self) -> bool {
        self != Method::Rtn
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What to calibrate on, and how.
#[derive(Debug, Clone)]
pub struct CalibratedOptions {
    pub method: Method,
    /// Calibration text (never the evaluation text).
    pub text: String,
    /// Where the text came from, recorded in the file.
    pub text_name: String,
    /// Tokens per chunk.
    pub ctx: usize,
    /// Use at most this many chunks.
    pub chunks: Option<usize>,
    pub gptq: GptqOptions,
    /// Threads of the layer-by-layer passes (`None`: the process-wide pool).
    pub threads: Option<usize>,
    /// The model's own answers to the bundled requests, calibrated on after the text's chunks
    /// (`None`: the text only).
    pub self_calibration: Option<SelfCalibration>,
}

impl CalibratedOptions {
    pub fn new(method: Method) -> Self {
        CalibratedOptions {
            method,
            text: crate::DEFAULT_CALIBRATION_TEXT.to_string(),
            text_name: crate::DEFAULT_CALIBRATION_NAME.into(),
            ctx: 512,
            chunks: None,
            gptq: GptqOptions::default(),
            threads: None,
            self_calibration: None,
        }
    }
}

/// Seconds spent in each phase.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    /// Running the layers over the calibration text (each group's inputs).
    pub statistics: f64,
    /// Accumulating each group's Hessian 2XᵀX.
    pub hessians: f64,
    /// Dampening and the Cholesky factorizations.
    pub factorization: f64,
    /// Choosing scales and levels.
    pub quantization: f64,
    /// Activation-aware scale search.
    pub scale_search: f64,
    /// Generating the model's own calibration answers (`--calib-self`).
    pub self_generation: f64,
}

/// The GGML bytes of the calibrated tensors, kept in an unnamed temporary file as each is
/// made rather than in memory, so a run's memory does not grow with the model (a 3B model's
/// MLP at q4_0 is 1.2 GB). The file has no name (`O_TMPFILE` where the OS has it): it is gone
/// when the process ends, however it ends. Written by hand because no crate here keeps a
/// name → byte range map over a temporary file.
#[derive(Debug, Default)]
pub struct CalibratedTensors {
    file: Option<std::fs::File>,
    /// Name → (offset, length) in `file`.
    index: BTreeMap<String, (u64, usize)>,
    end: u64,
}

impl CalibratedTensors {
    fn spill_err(e: std::io::Error) -> Error {
        Error::Io {
            path: std::env::temp_dir(),
            msg: format!("cannot keep calibrated tensors in a temporary file: {e}"),
        }
    }

    /// Adds one tensor's bytes (rows in the source's stored order).
    pub fn insert(&mut self, name: String, bytes: &[u8]) -> Result<()> {
        use std::io::{Seek, SeekFrom, Write};
        let mut file: &std::fs::File = match &mut self.file {
            Some(f) => f,
            None => self
                .file
                .insert(tempfile::tempfile().map_err(Self::spill_err)?),
        };
        file.seek(SeekFrom::Start(self.end))
            .and_then(|_| file.write_all(bytes))
            .map_err(Self::spill_err)?;
        self.index.insert(name, (self.end, bytes.len()));
        self.end += bytes.len() as u64;
        Ok(())
    }

    /// A tensor's bytes, read back, if it was calibrated.
    pub fn get(&self, name: &str) -> Result<Option<Vec<u8>>> {
        use std::io::{Read, Seek, SeekFrom};
        let (Some(&(at, len)), Some(mut file)) = (self.index.get(name), self.file.as_ref()) else {
            return Ok(None);
        };
        let mut out = vec![0u8; len];
        file.seek(SeekFrom::Start(at))
            .and_then(|_| file.read_exact(&mut out))
            .map_err(Self::spill_err)?;
        Ok(Some(out))
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }
}

/// The outcome: bytes to write in place of rounding, and what was done.
#[derive(Debug, Default)]
pub struct Calibrated {
    /// Source tensor name → GGML bytes of its planned type, rows in the source's stored order.
    pub tensors: CalibratedTensors,
    /// Source tensor name → replacement f32 values (a norm or a projection that activation-
    /// aware scaling changed), written in the tensor's planned type.
    pub dense: BTreeMap<String, Vec<f32>>,
    /// GGUF key/value pairs recording the method, its parameters and the calibration text.
    pub metadata: crate::metadata::Metadata,
    pub timings: Timings,
    pub chunks: usize,
    pub tokens: usize,
}

/// Progress: (layer done, layers, what is happening).
pub type LayerProgress<'a> = dyn Fn(usize, usize, &str) + 'a;

/// The projections of one layer in the order they are quantized, grouped by shared input.
const GROUPS: [&[&str]; 4] = [
    &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    &["self_attn.o_proj"],
    &["mlp.gate_proj", "mlp.up_proj"],
    &["mlp.down_proj"],
];

/// Keeps the input rows shown for one weight (the o projection's, which only exists inside
/// the attention computation).
struct InputCapture {
    want: String,
    rows: Mutex<Vec<f32>>,
}

impl ActivationObserver for InputCapture {
    fn observe(&self, weights: &[String], x: &Tensor) -> tandem_model::Result<()> {
        if weights.first() == Some(&self.want) {
            let v: Vec<f32> = x.flatten_all()?.to_vec1()?;
            self.rows
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(&v);
        }
        Ok(())
    }
}

/// Calibration chunks: the text tokenized once (BOS where the vocabulary adds one), cut into
/// `ctx`-token pieces, each starting with BOS, as `tandem calibrate` and llama-imatrix do.
pub fn calibration_chunks(
    ck: &Checkpoint,
    text: &str,
    ctx: usize,
    chunks: Option<usize>,
) -> Result<Vec<Vec<u32>>> {
    let tokens = ck.tokenizer.encode(text, ck.tokenizer.add_bos)?;
    let ctx = ctx.min(ck.config.context_length());
    if ctx < 16 {
        return Err(Error::Plan(format!(
            "calibration chunks of {ctx} tokens are too short"
        )));
    }
    let available = tokens.len() / ctx;
    if available == 0 {
        return Err(Error::Plan(format!(
            "the calibration text has {} tokens, fewer than one chunk of {ctx} (give a longer --calib-text or a smaller --calib-ctx)",
            tokens.len()
        )));
    }
    Ok(cut_chunks(&tokens, ctx, chunks, chunk_bos(ck)))
}

/// The token every calibration chunk starts with: BOS where the vocabulary adds one.
pub(crate) fn chunk_bos(ck: &Checkpoint) -> Option<u32> {
    ck.tokenizer.bos_id.filter(|_| ck.tokenizer.add_bos)
}

/// Cuts a token stream into `ctx`-token chunks, each starting with `bos` when given (as
/// llama-imatrix does), dropping the incomplete tail; at most `limit` chunks. The importance
/// matrix (`calibrate`), the calibrated methods' text and the self-generated answers all go
/// through it.
pub fn cut_chunks(
    tokens: &[u32],
    ctx: usize,
    limit: Option<usize>,
    bos: Option<u32>,
) -> Vec<Vec<u32>> {
    tokens
        .chunks_exact(ctx)
        .take(limit.unwrap_or(usize::MAX))
        .map(|c| {
            let mut chunk = c.to_vec();
            if let Some(b) = bos {
                chunk[0] = b;
            }
            chunk
        })
        .collect()
}

/// Runs the calibrated method over every decoder-layer tensor the plan quantizes to a block
/// type. Tensors outside the decoder layers (embeddings, output head) are left to rounding.
pub fn calibrate_plan(
    ck: &Checkpoint,
    plan: &Plan,
    opts: &CalibratedOptions,
    imatrix: Option<&ImportanceMatrix>,
    progress: &LayerProgress<'_>,
) -> Result<Calibrated> {
    let mut out = Calibrated::default();
    if !opts.method.is_calibrated() {
        return Ok(out);
    }
    let mut chunks = calibration_chunks(ck, &opts.text, opts.ctx, opts.chunks)?;
    // On the CPU (layer-by-layer passes read every activation), 8-bit activations as the
    // quantized file will mostly be run with; one decoder layer in memory at a time.
    let load = tandem_model::LoadOptions::default().with_threads(opts.threads);
    let mut generated = Vec::new();
    if let Some(sc) = &opts.self_calibration {
        let t0 = Instant::now();
        generated = self_calibration::generate(ck, sc, &load, &|done, target| {
            progress(
                0,
                ck.config.num_hidden_layers,
                &format!("generating its own calibration answers, {done} of {target} tokens"),
            )
        })?;
        if let Some(path) = &sc.save_text {
            // The answers as text, to read what the layers were fitted to or to calibrate
            // on again with --calib-text (how data/smollm2-answers-calibration.txt was made).
            let text = ck.tokenizer.decode(&generated)?;
            crate::output::write_atomically(path, sc.save_force, |w| {
                use std::io::Write;
                w.write_all(text.as_bytes()).map_err(|e| Error::Io {
                    path: path.clone(),
                    msg: e.to_string(),
                })
            })?;
        }
        let ctx = opts.ctx.min(ck.config.context_length());
        let own = cut_chunks(&generated, ctx, None, chunk_bos(ck));
        if own.is_empty() {
            return Err(Error::Plan(format!(
                "self-calibration produced {} tokens, fewer than one chunk of {ctx}",
                generated.len()
            )));
        }
        chunks.extend(own);
        out.timings.self_generation = t0.elapsed().as_secs_f64();
    }
    out.chunks = chunks.len();
    out.tokens = chunks.iter().map(Vec::len).sum();
    out.metadata = provenance(opts, out.chunks, &generated);
    let model = tandem_model::Llama::load_deferred(ck.config.clone(), &ck.store, &load)?;
    let planned: BTreeMap<&str, &PlannedTensor> = plan
        .tensors
        .iter()
        .map(|t| (t.source_name.as_str(), t))
        .collect();
    let mut run = Run {
        ck,
        opts,
        load,
        imatrix,
        model,
        planned,
        overrides: BTreeMap::new(),
        out,
        progress,
    };
    run.all_layers(&chunks)?;
    run.progress(ck.config.num_hidden_layers, "");
    Ok(run.out)
}

/// The state of one calibrated run.
struct Run<'a> {
    ck: &'a Checkpoint,
    opts: &'a CalibratedOptions,
    load: tandem_model::LoadOptions,
    imatrix: Option<&'a ImportanceMatrix>,
    /// The model as quantized so far: each group's weights replaced as soon as they are done.
    model: tandem_model::Llama,
    planned: BTreeMap<&'a str, &'a PlannedTensor>,
    /// Weights rescaled before quantization (activation-aware scaling of down_proj's inputs
    /// folded into up_proj's rows), used instead of the source's.
    overrides: BTreeMap<String, Vec<f32>>,
    out: Calibrated,
    progress: &'a LayerProgress<'a>,
}

impl Run<'_> {
    fn progress(&self, li: usize, what: &str) {
        (self.progress)(li, self.ck.config.num_hidden_layers, what)
    }

    fn timed<T>(
        &mut self,
        phase: fn(&mut Timings) -> &mut f64,
        f: impl FnOnce(&mut Self) -> Result<T>,
    ) -> Result<T> {
        let t = Instant::now();
        let r = f(self);
        *phase(&mut self.out.timings) += t.elapsed().as_secs_f64();
        r
    }

    /// `f` over every chunk's rows, timed as layer passes.
    fn per_chunk(
        &mut self,
        rows: &[Vec<f32>],
        f: impl Fn(&tandem_model::Llama, &[f32]) -> tandem_model::Result<Vec<f32>>,
    ) -> Result<Vec<Vec<f32>>> {
        self.timed(
            |t| &mut t.statistics,
            |r| {
                rows.iter()
                    .map(|x| f(&r.model, x).map_err(Error::from))
                    .collect()
            },
        )
    }

    /// Layer by layer. Each layer costs one pass of attention and one of the MLP over the
    /// calibration rows (two of attention when it is quantized too): each group's inputs are
    /// computed from the layer's pieces with the groups before already quantized.
    fn all_layers(&mut self, chunks: &[Vec<u32>]) -> Result<()> {
        let mut hidden: Vec<Vec<f32>> = self.timed(
            |t| &mut t.statistics,
            |r| {
                chunks
                    .iter()
                    .map(|c| r.model.embed_sequence(c).map_err(Error::from))
                    .collect()
            },
        )?;
        for li in 0..self.ck.config.num_hidden_layers {
            self.progress(li, "");
            self.model.load_layer(&self.ck.store, li, &self.load)?;
            // q/k/v read the attention norm's output: no layer run needed.
            if self.has_targets(li, GROUPS[0]) {
                let xs = self.per_chunk(&hidden, |m, x| m.attention_input(li, x))?;
                self.quantize_group(li, GROUPS[0], &xs)?;
            }
            // o reads the attention's output, with q/k/v as quantized.
            if self.has_targets(li, GROUPS[1]) {
                let want = format!("model.layers.{li}.{}.weight", GROUPS[1][0]);
                let xs = self.per_chunk(&hidden, |m, x| {
                    let capture = InputCapture {
                        want: want.clone(),
                        rows: Mutex::new(Vec::new()),
                    };
                    m.run_attention(li, &mut x.to_vec(), Some(&capture))?;
                    Ok(capture.rows.into_inner().unwrap_or_else(|p| p.into_inner()))
                })?;
                self.quantize_group(li, GROUPS[1], &xs)?;
            }
            self.progress(li, "attention");
            self.timed(
                |t| &mut t.statistics,
                |r| {
                    hidden
                        .iter_mut()
                        .try_for_each(|x| r.model.run_attention(li, x, None).map_err(Error::from))
                },
            )?;
            // gate/up read the MLP norm's output; down reads silu(gate)·up as quantized.
            let mlp_in = self.per_chunk(&hidden, |m, x| m.mlp_input(li, x))?;
            let down_awq = self.opts.method.uses_awq()
                && self.targets(li, GROUPS[3]).len() == 1
                && self.targets(li, &["mlp.up_proj"]).len() == 1;
            if down_awq {
                self.scale_down_inputs(li, &mlp_in)?;
            }
            if self.has_targets(li, GROUPS[2]) {
                self.quantize_group(li, GROUPS[2], &mlp_in)?;
            }
            self.progress(li, "MLP");
            // Activation-aware scaling may have changed the MLP norm: recompute its output.
            let mlp_in = if self.opts.method.uses_awq() && self.has_targets(li, GROUPS[2]) {
                self.per_chunk(&hidden, |m, x| m.mlp_input(li, x))?
            } else {
                mlp_in
            };
            let acts = self.per_chunk(&mlp_in, |m, n| m.mlp_activation(li, n))?;
            drop(mlp_in);
            if self.has_targets(li, GROUPS[3]) {
                self.quantize_group(li, GROUPS[3], &acts)?;
            }
            self.timed(
                |t| &mut t.statistics,
                |r| {
                    hidden
                        .iter_mut()
                        .zip(&acts)
                        .try_for_each(|(x, a)| r.model.mlp_down_add(li, a, x).map_err(Error::from))
                },
            )?;
            self.model.release_layer(li);
            release_layer_source(self.ck, li);
        }
        Ok(())
    }

    /// Activation-aware scaling of down_proj's input channels: s searched on the activations
    /// of the full-precision MLP, down's columns multiplied by s and up's rows divided by it
    /// (silu(g)·(u/s) = (silu(g)·u)/s), so the product is unchanged before rounding. Both are
    /// quantized later from these rescaled weights.
    fn scale_down_inputs(&mut self, li: usize, mlp_in: &[Vec<f32>]) -> Result<()> {
        self.progress(li, "down: activation-aware scales");
        let t = Instant::now();
        let acts: Vec<f32> = mlp_in
            .iter()
            .map(|n| self.model.mlp_activation(li, n).map_err(Error::from))
            .collect::<Result<Vec<_>>>()?
            .concat();
        let down = format!("model.layers.{li}.mlp.down_proj.weight");
        let up = format!("model.layers.{li}.mlp.up_proj.weight");
        let mut wd = self.source_weights(&down)?;
        let mut wu = self.source_weights(&up)?;
        let inter = self.ck.config.intermediate_size;
        let q = self.targets(li, GROUPS[3])[0].2;
        let s = awq::search_scales(&acts, inter, &[(q, wd.as_slice())])?;
        for row in wd.chunks_exact_mut(inter) {
            for (v, si) in row.iter_mut().zip(&s) {
                *v *= si;
            }
        }
        let h = self.ck.config.hidden_size;
        for (row, si) in wu.chunks_exact_mut(h).zip(&s) {
            for v in row.iter_mut() {
                *v /= si;
            }
        }
        self.overrides.insert(down, wd);
        self.overrides.insert(up, wu);
        self.out.timings.scale_search += t.elapsed().as_secs_f64();
        Ok(())
    }

    /// A tensor's weights as f32: rescaled ones if any, else decoded from the source.
    fn source_weights(&mut self, name: &str) -> Result<Vec<f32>> {
        if let Some(w) = self.overrides.remove(name) {
            return Ok(w);
        }
        let raw = self.ck.store.get(name)?;
        let file = self.ck.store.path_of(name).to_path_buf();
        let cols = raw.shape.last().copied().unwrap_or(1).max(1);
        let rows = raw.elem_count() / cols;
        encode::to_f32(&file, &raw, raw.data, (0, rows), false)
    }

    /// The tensors of `group` in layer `li` planned as a block type: (name, plan entry, type).
    fn targets(&self, li: usize, group: &[&str]) -> Vec<(String, &PlannedTensor, QuantType)> {
        group
            .iter()
            .filter_map(|m| {
                let name = format!("model.layers.{li}.{m}.weight");
                let t = *self.planned.get(name.as_str())?;
                let q = t.target.filter(|q| grid::has_grid(*q))?;
                Some((name, t, q))
            })
            .collect()
    }

    fn has_targets(&self, li: usize, group: &[&str]) -> bool {
        !self.targets(li, group).is_empty()
    }

    /// Statistics of a group's shared input rows `xs` (one entry per chunk), then each of its
    /// tensors quantized and put in place in the model.
    fn quantize_group(&mut self, li: usize, group: &[&str], xs: &[Vec<f32>]) -> Result<()> {
        let label = group
            .iter()
            .map(|m| m.rsplit('.').next().unwrap_or(m))
            .collect::<Vec<_>>()
            .join("/");
        let targets: Vec<(String, PlannedTensor, QuantType)> = self
            .targets(li, group)
            .into_iter()
            .map(|(n, t, q)| (n, t.clone(), q))
            .collect();
        // Callers check `has_targets`; a group with none has nothing to do.
        let Some((first, _, _)) = targets.first() else {
            return Ok(());
        };
        let cols = self.ck.store.get(first)?.shape.last().copied().unwrap_or(0);
        self.progress(li, &format!("{label}: statistics"));
        let (mut h, n) = self.timed(|t| &mut t.hessians, |_| {
            let mut sum = gptq::HessianSum::new(cols);
            for x in xs {
                if x.len() % cols.max(1) != 0 {
                    return Err(Error::Plan(format!("layer {li} {label}: input rows do not match {cols} columns (internal error)")));
                }
                sum.add(x);
            }
            let n = sum.rows;
            Ok((sum.finish(), n))
        })?;
        if n == 0 {
            return Err(Error::Plan(format!(
                "layer {li}: no calibration input reached {label}"
            )));
        }
        let mut weights: Vec<(String, PlannedTensor, QuantType, Vec<f32>)> = Vec::new();
        for (name, t, q) in targets {
            let w = self.source_weights(&name)?;
            weights.push((name, t, q, w));
        }
        if self.opts.method.uses_awq() && group[0] == "mlp.gate_proj" {
            self.progress(li, &format!("{label}: activation-aware scales"));
            self.fold_awq_scales(li, xs, cols, &mut weights, &mut h)?;
        }
        let order = (self.opts.method.uses_gptq()
            && self.opts.gptq.act_order
            && weights.iter().all(|(_, _, q, _)| gptq::act_order_suits(*q)))
        .then(|| gptq::act_order(&h, cols));
        let factor = if self.opts.method.uses_gptq() {
            self.progress(li, &format!("{label}: factorization"));
            let damp = self.opts.gptq.damp;
            Some(self.timed(
                |t| &mut t.factorization,
                |_| {
                    gptq::inverse_hessian_factor_in_order(&h, cols, order.as_deref(), damp)
                        .map_err(|e| Error::Plan(format!("layer {li} {label}: {e}")))
                },
            )?)
        } else {
            None
        };
        // Importance for choosing block scales: the imatrix when given, else the Hessian's
        // diagonal (the same statistic: each input channel's mean square).
        // (Measured: weighting by GPTQ's own per-column cost 1/[H⁻¹]_ii instead scored worse,
        // mean KLD 0.107 against 0.099 on SmolLM2 q4_0.)
        let diag: Vec<f32> = (0..cols)
            .map(|i| (h[i * cols + i] / (2.0 * n as f64)) as f32)
            .collect();
        let factor = factor
            .as_ref()
            .map(|(u, dead)| (u.as_slice(), dead.as_slice()));
        for (name, t, q, w) in weights {
            self.progress(li, &format!("{}: quantizing", short(&name)));
            self.quantize_tensor(&name, &t, q, w, &diag, factor, order.as_deref())?;
        }
        Ok(())
    }

    /// Activation-aware scaling of a layer's gate/up inputs: searches the per-channel scales
    /// s on the calibration inputs `xs`, folds them into the weights (W' = W·diag(s)) and the
    /// MLP norm (divided by s, kept in the model and written dense), and rescales the Hessian
    /// `h` to match the inputs the folded weights now see.
    fn fold_awq_scales(
        &mut self,
        li: usize,
        xs: &[Vec<f32>],
        cols: usize,
        weights: &mut [(String, PlannedTensor, QuantType, Vec<f32>)],
        h: &mut [f64],
    ) -> Result<()> {
        let t = Instant::now();
        let all: Vec<f32> = xs.concat();
        let pairs: Vec<(QuantType, &[f32])> = weights
            .iter()
            .map(|(_, _, q, w)| (*q, w.as_slice()))
            .collect();
        let s = awq::search_scales(&all, cols, &pairs)?;
        // Fold: W' = W·diag(s) for gate/up; the norm weight divided by s.
        for (_, _, _, w) in weights.iter_mut() {
            for row in w.chunks_exact_mut(cols) {
                for (v, si) in row.iter_mut().zip(&s) {
                    *v *= si;
                }
            }
        }
        let (_, mlp_norm) = self
            .model
            .layer_norms(li)
            .ok_or_else(|| Error::Plan(format!("no layer {li}")))?;
        let norm: Vec<f32> = mlp_norm.iter().zip(&s).map(|(g, si)| g / si).collect();
        self.model.set_mlp_norm(li, norm.clone())?;
        self.out.dense.insert(
            format!("model.layers.{li}.post_attention_layernorm.weight"),
            norm,
        );
        // The inputs are divided by s too: H' = diag(1/s) H diag(1/s).
        for i in 0..cols {
            for j in 0..cols {
                h[i * cols + j] /= (s[i] * s[j]) as f64;
            }
        }
        self.out.timings.scale_search += t.elapsed().as_secs_f64();
        Ok(())
    }

    /// Quantizes one tensor's weights `w` (rows of `diag.len()` columns) to `q`, by GPTQ with
    /// the layer's inverse-Hessian `factor` (and column `order`) where there is one, else by
    /// rounding, weighted by the imatrix or else the Hessian's diagonal `diag`; puts the result
    /// into the model so later layers see it, and keeps its bytes for the writer.
    #[allow(clippy::too_many_arguments)]
    fn quantize_tensor(
        &mut self,
        name: &str,
        t: &PlannedTensor,
        q: QuantType,
        mut w: Vec<f32>,
        diag: &[f32],
        factor: Option<(&[f32], &[bool])>,
        order: Option<&[usize]>,
    ) -> Result<()> {
        let cols = diag.len();
        let ts = Instant::now();
        let gguf = hf_to_gguf(name).unwrap_or_else(|| name.to_string());
        let from_imatrix = match self.imatrix {
            Some(m) if q.uses_importance() => {
                m.weights_for(&gguf, cols, self.ck.store.path_of(name))?
            }
            _ => None,
        };
        let importance: Option<&[f32]> = match (&from_imatrix, q.uses_importance()) {
            (Some(v), _) => Some(v.as_slice()),
            (None, true) => Some(diag),
            (None, false) => None,
        };
        let bytes = match factor {
            Some((u, dead)) => gptq::gptq_quantize_in_order(
                q,
                &mut w,
                cols,
                u,
                dead,
                order,
                importance,
                &self.opts.gptq,
            ),
            None => encode::encode(q, &w, cols, importance),
        }
        .map_err(|e| tensor_err(self.ck.store.path_of(name), name, e.to_string()))?;
        self.out.timings.quantization += ts.elapsed().as_secs_f64();
        // The quantized weights replace the layer's, so later inputs see them.
        let rows = w.len() / cols;
        let model_bytes = if t.permute_heads.is_none() && self.ck.store.is_gguf() && is_qk(name) {
            let heads = heads_of(self.ck, name);
            permute_qk_rows(&bytes, heads, rows, bytes.len() / rows, Permute::GgufToHf)
        } else {
            bytes.clone()
        };
        let raw = RawTensor {
            name: name.to_string(),
            dtype: WeightDType::Quant(q.ggml()),
            shape: vec![rows, cols],
            data: &model_bytes,
        };
        let lin = tandem_model::linear::Linear::from_raw(
            self.ck.store.path_of(name),
            &raw,
            tandem_model::linear::ActivationPrecision::default(),
        )?;
        self.model.replace_linear(name, lin)?;
        self.out.tensors.insert(name.to_string(), &bytes)?;
        Ok(())
    }
}

/// Tells the OS this run is done with layer `li`'s pages of the source file (they are read
/// again, from the file, when the output is written).
fn release_layer_source(ck: &Checkpoint, li: usize) {
    let prefix = format!("model.layers.{li}.");
    for name in ck.store.names() {
        if name.starts_with(&prefix) {
            ck.store.release(&name);
        }
    }
}

fn short(name: &str) -> &str {
    name.strip_prefix("model.layers.")
        .unwrap_or(name)
        .trim_end_matches(".weight")
}

fn is_qk(name: &str) -> bool {
    name.ends_with("self_attn.q_proj.weight") || name.ends_with("self_attn.k_proj.weight")
}

fn heads_of(ck: &Checkpoint, name: &str) -> usize {
    if name.ends_with("q_proj.weight") {
        ck.config.num_attention_heads
    } else {
        ck.config.num_kv_heads()
    }
}

/// GGUF keys recording the method (`tandem.quantize.*`).
fn provenance(
    opts: &CalibratedOptions,
    chunks: usize,
    generated: &[u32],
) -> crate::metadata::Metadata {
    use candle_core::quantized::gguf_file::Value;
    use tandem_model::gguf_keys as keys;
    let mut md = vec![
        (
            keys::TANDEM_QUANTIZE_METHOD.into(),
            Value::String(opts.method.name().into()),
        ),
        (
            keys::TANDEM_CALIBRATION_TEXT.into(),
            Value::String(opts.text_name.clone()),
        ),
        (
            keys::TANDEM_CALIBRATION_SHA256.into(),
            Value::String(crate::sha256_hex(opts.text.as_bytes())),
        ),
        (
            keys::TANDEM_CALIBRATION_CHUNKS.into(),
            Value::U32(chunks as u32),
        ),
        (
            keys::TANDEM_CALIBRATION_CTX.into(),
            Value::U32(opts.ctx as u32),
        ),
    ];
    if opts.self_calibration.is_some() {
        let bytes: Vec<u8> = generated.iter().flat_map(|t| t.to_le_bytes()).collect();
        md.push((
            keys::TANDEM_CALIBRATION_SELF_TOKENS.into(),
            Value::U32(u32::try_from(generated.len()).unwrap_or(u32::MAX)),
        ));
        md.push((
            keys::TANDEM_CALIBRATION_SELF_SHA256.into(),
            Value::String(crate::sha256_hex(&bytes)),
        ));
    }
    if opts.method.uses_gptq() {
        md.push((
            keys::TANDEM_GPTQ_DAMP.into(),
            Value::F32(opts.gptq.damp as f32),
        ));
        md.push((
            keys::TANDEM_GPTQ_BLOCK.into(),
            Value::U32(opts.gptq.lazy_block as u32),
        ));
        md.push((
            keys::TANDEM_GPTQ_ACT_ORDER.into(),
            Value::Bool(opts.gptq.act_order),
        ));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_start_with_bos_and_drop_the_tail() {
        let t: Vec<u32> = (10..30).collect();
        let c = cut_chunks(&t, 8, None, Some(1));
        assert_eq!(
            c,
            vec![
                vec![1, 11, 12, 13, 14, 15, 16, 17],
                vec![1, 19, 20, 21, 22, 23, 24, 25]
            ]
        );
        assert_eq!(
            cut_chunks(&t, 8, Some(1), None),
            vec![(10..18).collect::<Vec<u32>>()]
        );
        assert!(cut_chunks(&t, 32, None, None).is_empty());
    }

    #[test]
    fn calibrated_tensors_come_back_from_the_spill_file_as_written() {
        let mut t = CalibratedTensors::default();
        assert!(t.is_empty() && t.get("a").unwrap().is_none());
        let a: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        t.insert("a".into(), &a).unwrap();
        t.insert("b".into(), &[]).unwrap();
        t.insert("c".into(), &a[..17]).unwrap();
        assert_eq!(t.len(), 3);
        assert!(t.contains_key("b") && !t.contains_key("d"));
        assert_eq!(t.get("c").unwrap().unwrap(), &a[..17]);
        assert_eq!(t.get("a").unwrap().unwrap(), a);
        assert_eq!(t.get("b").unwrap().unwrap(), Vec::<u8>::new());
        assert!(t.get("d").unwrap().is_none());
    }
}
