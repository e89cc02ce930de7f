//! tandem's quantizer: a 16-bit checkpoint (Hugging Face folder or GGUF) → a GGUF file with
//! 8/4-bit MLP weights and full-precision attention, that llama.cpp and tandem both run.
//!
//! The pipeline is read → plan → quantize → write, one tensor at a time: the plan
//! ([`plan::make_plan`]) fixes every tensor's type and offset before any data is read, so the
//! GGUF header is written first and each tensor is then read from the mmap, quantized in
//! parallel, written and released. Peak memory is about two copies of the largest tensor.
//! [`calibrate`] makes the importance matrix that weights the block types; [`calibrated`] runs
//! GPTQ and activation-aware scaling layer by layer.

pub mod awq;
pub mod blocks;
pub mod calibrate;
pub mod calibrated;
pub mod compressed_tensors;
pub mod encode;
pub mod error;
pub mod gguf_writer;
pub mod gptq;
pub mod grid;
pub mod imatrix;
pub mod job;
pub mod metadata;
pub mod output;
pub mod plan;
pub mod self_calibration;
pub mod types;
pub mod weighted;

pub use error::{Error, Result};
pub use imatrix::ImportanceMatrix;
pub use plan::{make_plan, EdgeLayers, Plan, Policy, Recipe, Rule, TensorKind, TypeChoice};
pub use types::QuantType;

use gguf_writer::{GgufLayout, GgufWriter};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tandem_model::gguf_names::{permute_qk_rows, Permute};
use tandem_model::Checkpoint;

/// Progress callback: (source bytes done, source bytes total, current tensor name).
pub type Progress<'a> = dyn Fn(u64, u64, &str) + 'a;

/// How to run a quantization besides the plan.
#[derive(Default)]
pub struct Options<'a> {
    /// Importance weights for the block types (from `tandem calibrate` or llama-imatrix).
    pub imatrix: Option<&'a ImportanceMatrix>,
    /// Quantize tensors holding NaN/Inf instead of refusing them.
    pub allow_nonfinite: bool,
    /// Set from another thread (Ctrl-C) to stop between tensors.
    pub cancel: Option<&'a AtomicBool>,
    /// Called after each tensor: (source bytes done, source bytes total, next tensor name).
    pub progress: Option<&'a Progress<'a>>,
    /// Tensors a calibrated method (GPTQ, activation-aware scaling) already quantized or
    /// rescaled, written instead of rounding the source; its metadata goes into the header.
    pub calibrated: Option<&'a calibrated::Calibrated>,
}

/// What a finished run did.
#[derive(Debug, Clone)]
pub struct Report {
    pub tensors: usize,
    /// Bytes of source tensor data read.
    pub bytes_in: u64,
    /// Bytes of the output file.
    pub bytes_out: u64,
    pub seconds: f64,
    /// Tensors quantized with importance weights from the imatrix.
    pub imatrix_tensors: usize,
    /// Things the user should know (tokenizer notes, tensors missing from the imatrix).
    pub notes: Vec<String>,
}

impl Report {
    /// Source megabytes per second.
    pub fn throughput_mb_s(&self) -> f64 {
        self.bytes_in as f64 / 1e6 / self.seconds.max(1e-9)
    }
}

/// The GGUF header for a plan: llama.cpp metadata, tokenizer and tensor entries.
pub fn layout(
    ck: &Checkpoint,
    plan: &Plan,
    extra: &metadata::Metadata,
) -> Result<(GgufLayout, Vec<String>)> {
    let name = ck
        .path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let mut md = metadata::model_metadata(&ck.config, &name, metadata::file_type(plan.scheme));
    let (tok, notes) = metadata::tokenizer_metadata(ck)?;
    md.extend(tok);
    md.extend(extra.iter().cloned());
    let mut tensors: Vec<(String, Vec<u64>, u32, u64)> = plan
        .tensors
        .iter()
        .map(|t| {
            let id = match t.target {
                Some(q) => q.ggml_id(),
                None => source_ggml_id(t.source_type),
            };
            let dims = t.shape.iter().rev().map(|&d| d as u64).collect();
            (t.gguf_name.clone(), dims, id, t.bytes as u64)
        })
        .collect();
    for (n, f) in &plan.computed {
        tensors.push((n.clone(), vec![f.len() as u64], 0, 4 * f.len() as u64));
    }
    Ok((GgufLayout::new(md, tensors), notes))
}

/// The GGUF type id of a tensor copied unchanged, `u32::MAX` for a type tandem does not write
/// (Q8_1/Q8_K, only reachable from a GGUF source).
fn source_ggml_id(d: tandem_model::weights::WeightDType) -> u32 {
    use candle_core::quantized::GgmlDType;
    use tandem_model::weights::WeightDType::*;
    let t = match d {
        F32 => GgmlDType::F32,
        F16 => GgmlDType::F16,
        BF16 => GgmlDType::BF16,
        Quant(q) => q,
    };
    if types::ALL_TYPES.iter().any(|w| w.ggml() == t) {
        tandem_model::gguf_reader::ggml_type_id(t)
    } else {
        u32::MAX
    }
}

/// Streams the quantized model as GGUF into `out`.
pub fn write_gguf<W: Write>(
    ck: &Checkpoint,
    plan: &Plan,
    opts: &Options,
    out: W,
) -> Result<(W, Report)> {
    let start = Instant::now();
    let path = ck.store.main_path().to_path_buf();
    let no_metadata = Vec::new();
    let extra = opts.calibrated.map_or(&no_metadata, |c| &c.metadata);
    let (layout, notes) = layout(ck, plan, extra)?;
    if let Some(bad) = layout.tensors.iter().find(|t| t.ggml_type == u32::MAX) {
        return Err(error::tensor_err(
            &path,
            &bad.name,
            "stored in a type GGUF output cannot hold; choose a type with --rule",
        ));
    }
    let mut w = GgufWriter::new(out, &layout).map_err(output_err)?;
    let total: u64 = plan
        .tensors
        .iter()
        .map(|t| {
            ck.store
                .get(&t.source_name)
                .map(|r| r.data.len() as u64)
                .unwrap_or(0)
        })
        .sum();
    let mut run = WriteRun {
        opts,
        done: 0,
        total,
        imatrix_tensors: 0,
        notes,
    };
    for t in &plan.tensors {
        run.check_cancel()?;
        run.write_tensor(&mut w, ck, t)?;
        ck.store.release(&t.source_name);
    }
    for (_, f) in &plan.computed {
        let b: Vec<u8> = f.iter().flat_map(|x| x.to_le_bytes()).collect();
        w.write_tensor(&b).map_err(output_err)?;
    }
    if let Some(p) = opts.progress {
        p(total, total, "");
    }
    let out = w.finish().map_err(output_err)?;
    Ok((
        out,
        Report {
            tensors: plan.tensors.len() + plan.computed.len(),
            bytes_in: total,
            bytes_out: layout.file_size(),
            seconds: start.elapsed().as_secs_f64(),
            imatrix_tensors: run.imatrix_tensors,
            notes: run.notes,
        },
    ))
}

/// What [`write_gguf`] carries from one tensor to the next: progress, and what the report
/// says.
struct WriteRun<'o, 'a> {
    opts: &'o Options<'a>,
    /// Source bytes written so far, of `total`.
    done: u64,
    total: u64,
    imatrix_tensors: usize,
    notes: Vec<String>,
}

impl WriteRun<'_, '_> {
    fn check_cancel(&self) -> Result<()> {
        match self.opts.cancel {
            Some(c) if c.load(Ordering::Relaxed) => Err(Error::Interrupted),
            _ => Ok(()),
        }
    }

    /// Writes one planned tensor: what a calibrated method made of it, else its source
    /// rounded to the target type (or copied) block by block.
    fn write_tensor<W: Write>(
        &mut self,
        w: &mut GgufWriter<W>,
        ck: &Checkpoint,
        t: &plan::PlannedTensor,
    ) -> Result<()> {
        let opts = self.opts;
        let file = ck.store.path_of(&t.source_name).to_path_buf();
        let raw = ck.store.get(&t.source_name)?;
        let cols = raw.shape.last().copied().unwrap_or(1).max(1);
        let rows = raw.elem_count() / cols;
        let importance = importance_for(t, opts, cols, &file)?;
        match &importance {
            Importance::Weights(_) => self.imatrix_tensors += 1,
            Importance::Missing => self.notes.push(format!(
                "{}: no imatrix entry, quantized unweighted",
                t.gguf_name
            )),
            Importance::Unused => {}
        }
        if let Some(bytes) = method_bytes(t, opts, &raw, cols)? {
            // Made already, rows in the source's order like `raw.data` (a rescaled norm has
            // no heads to permute).
            match t.permute_heads {
                Some(heads) => {
                    let row_bytes = bytes.len() / rows.max(1);
                    let permuted =
                        permute_qk_rows(&bytes, heads, rows, row_bytes, Permute::HfToGguf);
                    w.write_tensor(&permuted).map_err(output_err)?;
                }
                None => w.write_tensor(&bytes).map_err(output_err)?,
            }
        } else {
            if t.target.is_none() && !opts.allow_nonfinite {
                tandem_model::linear::check_finite(&file, &raw)?;
            }
            self.stream_rows(w, ck, t, &raw, &file, importance.weights())?;
        }
        self.done += raw.data.len() as u64;
        Ok(())
    }

    /// Streams a tensor in blocks of whole rows, rounding each to the target type: memory
    /// stays a few blocks, however large the tensor.
    fn stream_rows<W: Write>(
        &self,
        w: &mut GgufWriter<W>,
        ck: &Checkpoint,
        t: &plan::PlannedTensor,
        raw: &tandem_model::weights::RawTensor,
        file: &Path,
        importance: Option<&[f32]>,
    ) -> Result<()> {
        let cols = raw.shape.last().copied().unwrap_or(1).max(1);
        let rows = raw.elem_count() / cols;
        let row_bytes = raw.data.len() / rows.max(1);
        let permuted;
        let data: &[u8] = match t.permute_heads {
            Some(heads) => {
                permuted = permute_qk_rows(raw.data, heads, rows, row_bytes, Permute::HfToGguf);
                &permuted
            }
            None => raw.data,
        };
        let block_rows = (STREAM_ELEMS / cols).max(1);
        let mut r0 = 0;
        while r0 < rows {
            self.check_cancel()?;
            let r1 = (r0 + block_rows).min(rows);
            let src = &data[r0 * row_bytes..r1 * row_bytes];
            match t.target {
                None => w.write_part(src).map_err(output_err)?,
                Some(q) => {
                    let allow = self.opts.allow_nonfinite;
                    let xs = encode::to_f32(file, raw, src, (r0, r1 - r0), allow)?;
                    let bytes = encode::encode(q, &xs, cols, importance)?;
                    w.write_part(&bytes).map_err(output_err)?;
                }
            }
            if t.permute_heads.is_none() {
                ck.store
                    .release_range(&t.source_name, r0 * row_bytes, r1 * row_bytes);
            }
            if let Some(p) = self.opts.progress {
                p(
                    self.done + (r1 * row_bytes) as u64,
                    self.total,
                    &t.gguf_name,
                );
            }
            r0 = r1;
        }
        w.end_tensor().map_err(output_err)
    }
}

/// Whether a planned tensor is rounded with importance weights.
enum Importance {
    /// Its target type does not use them, or no imatrix was given.
    Unused,
    /// The imatrix has no entry for it: rounded unweighted.
    Missing,
    Weights(Vec<f32>),
}

impl Importance {
    fn weights(&self) -> Option<&[f32]> {
        match self {
            Importance::Weights(w) => Some(w),
            _ => None,
        }
    }
}

/// The imatrix's weights for `t` when its target type uses them; an error naming the tensor
/// when they have another width than its `cols` columns (an imatrix made for another model).
fn importance_for(
    t: &plan::PlannedTensor,
    opts: &Options,
    cols: usize,
    file: &Path,
) -> Result<Importance> {
    let (Some(q), Some(m)) = (t.target, opts.imatrix) else {
        return Ok(Importance::Unused);
    };
    if !q.uses_importance() {
        return Ok(Importance::Unused);
    }
    Ok(match m.weights_for(&t.gguf_name, cols, file)? {
        Some(w) => Importance::Weights(w),
        None => Importance::Missing,
    })
}

/// The type a tensor a calibrated method left dense (AWQ's rescaled norms) is written in: its
/// planned type, else its source's 16-bit type, else f32.
fn dense_type(t: &plan::PlannedTensor, raw: &tandem_model::weights::RawTensor) -> QuantType {
    use tandem_model::weights::WeightDType;
    t.target.unwrap_or(match raw.dtype {
        WeightDType::F16 => QuantType::F16,
        WeightDType::BF16 => QuantType::BF16,
        _ => QuantType::F32,
    })
}

/// One planned tensor's bytes, whole, in its target type (the source bytes when kept) and in
/// the source's row order: what the GGUF writer streams, for writers that take a tensor at a
/// time (compressed-tensors). Uses the calibrated result or the imatrix as the GGUF path does,
/// and refuses an imatrix of another width as it does.
pub fn tensor_bytes(ck: &Checkpoint, t: &plan::PlannedTensor, opts: &Options) -> Result<Vec<u8>> {
    let file = ck.store.path_of(&t.source_name).to_path_buf();
    let raw = ck.store.get(&t.source_name)?;
    let cols = raw.shape.last().copied().unwrap_or(1).max(1);
    let rows = raw.elem_count() / cols;
    if let Some(bytes) = method_bytes(t, opts, &raw, cols)? {
        return Ok(bytes);
    }
    let Some(q) = t.target else {
        if !opts.allow_nonfinite {
            tandem_model::linear::check_finite(&file, &raw)?;
        }
        return Ok(raw.data.to_vec());
    };
    let importance = importance_for(t, opts, cols, &file)?;
    let xs = encode::to_f32(&file, &raw, raw.data, (0, rows), opts.allow_nonfinite)?;
    encode::encode(q, &xs, cols, importance.weights())
}

/// What a calibrated method made of `t`, in the source's row order: the bytes it quantized,
/// or the dense values it rescaled (AWQ's norms) encoded; `None` where it made nothing.
fn method_bytes(
    t: &plan::PlannedTensor,
    opts: &Options,
    raw: &tandem_model::weights::RawTensor,
    cols: usize,
) -> Result<Option<Vec<u8>>> {
    let Some(c) = opts.calibrated else {
        return Ok(None);
    };
    if let Some(bytes) = c.tensors.get(&t.source_name)? {
        return Ok(Some(bytes));
    }
    match c.dense.get(&t.source_name) {
        Some(values) => encode::encode(dense_type(t, raw), values, cols, None).map(Some),
        None => Ok(None),
    }
}

/// Elements per streamed block (16 MiB of f32).
const STREAM_ELEMS: usize = 1 << 22;

/// Stands for the output file in errors raised while writing, until the caller names it.
const OUTPUT: &str = "<output>";

/// An I/O error of the output, named by [`OUTPUT`] until the caller knows the file.
fn output_err(e: std::io::Error) -> Error {
    error::io_err(Path::new(OUTPUT), &e)
}

/// Quantizes into the file `out`, atomically (see [`output::write_atomically`]).
pub fn quantize_to_file(
    ck: &Checkpoint,
    plan: &Plan,
    opts: &Options,
    out: &Path,
    force: bool,
) -> Result<Report> {
    let mut report = None;
    output::write_atomically(out, force, |w| -> Result<()> {
        let (_, r) = write_gguf(ck, plan, opts, w).map_err(|e| name_output(e, out))?;
        report = Some(r);
        Ok(())
    })?;
    report.ok_or_else(|| Error::Plan("no report (internal error)".into()))
}

/// Output I/O errors carry a placeholder path until the caller knows the file.
fn name_output(e: Error, out: &Path) -> Error {
    match e {
        Error::Io { path, msg } if path == Path::new(OUTPUT) => Error::Io {
            path: out.to_path_buf(),
            msg,
        },
        other => other,
    }
}

/// Quantizes into memory: the GGUF bytes (a self-draft for speculative decoding is made so).
pub fn quantize_to_bytes(ck: &Checkpoint, plan: &Plan, opts: &Options) -> Result<Vec<u8>> {
    let no_metadata = Vec::new();
    let extra = opts.calibrated.map_or(&no_metadata, |c| &c.metadata);
    let (layout, _) = layout(ck, plan, extra)?;
    let buf = Vec::with_capacity(layout.file_size() as usize);
    Ok(write_gguf(ck, plan, opts, buf)?.0)
}

/// The checkpoint quantized in memory with the default policy for `scheme` (attention kept
/// 16-bit, MLP at `scheme`, embeddings q8_0), or with attention at `scheme` too when
/// `attention_too`: a self-draft for speculative decoding.
pub fn quantized_copy(
    ck: &Checkpoint,
    scheme: QuantType,
    attention_too: bool,
) -> Result<Checkpoint> {
    quantized_copy_with_edges(ck, scheme, attention_too, 0)
}

/// [`quantized_copy`] with the MLP of the first and last `edge_layers` layers at Q8_0
/// ([`EdgeLayers`]: a 4-bit self-draft agrees with its verifier more for a few more bytes).
pub fn quantized_copy_with_edges(
    ck: &Checkpoint,
    scheme: QuantType,
    attention_too: bool,
    edge_layers: usize,
) -> Result<Checkpoint> {
    let mut policy = Policy::new(scheme);
    if attention_too {
        policy.attention = TypeChoice::To(scheme);
    }
    if edge_layers > 0 {
        policy.edge_mlp = Some(EdgeLayers {
            count: edge_layers,
            choice: TypeChoice::To(QuantType::Q8_0),
        });
    }
    let plan = make_plan(ck, &policy)?;
    let bytes = quantize_to_bytes(ck, &plan, &Options::default())?;
    let all = if attention_too { "@all" } else { "" };
    let edges = match edge_layers {
        0 => String::new(),
        n => format!(",edges={n}"),
    };
    let label =
        std::path::PathBuf::from(format!("{} (self:{scheme}{all}{edges})", ck.path.display()));
    Ok(Checkpoint::from_gguf_bytes(&label, bytes)?)
}

/// Lower-case hex SHA-256 of `bytes` (the calibration text's fingerprint in output files).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The opening of Austen's *Emma* (see data/PROVENANCE.md): the first part of
/// [`DEFAULT_CALIBRATION_TEXT`], and alone the text layer-skipping drafts are chosen on.
/// Calibration text only; never used for evaluation.
pub const CALIBRATION_TEXT: &str = include_str!("../data/austen-emma-calibration.txt");

/// What gptq/awq and `tandem calibrate` calibrate on when no text is given: the opening of
/// *Emma* ([`CALIBRATION_TEXT`]), then SmolLM2-135M-Instruct's own answers to the 48 bundled
/// self-calibration requests (data/smollm2-answers-calibration.txt: the text `--calib-self
/// 16384` generates for that model, written out with `--calib-self-save`; see
/// data/PROVENANCE.md).
///
/// Why both: fiction alone fits the layers to one register of English. On SmolLM2, GPTQ
/// calibrated on *Emma* alone scored wikitext-2 mean KLD 0.0825 (MLP q4_0), 0.0143 (q4_k
/// policy) and 0.146 (everything q4_0); with the answers after it 0.0738, 0.0134 and 0.137.
/// On *Persuasion*, by *Emma*'s author and never tuned on, it goes the other way (0.0376 →
/// 0.0408, 0.0083 → 0.0086, 0.0835 → 0.0967), still far below rounding (BENCHMARKS.md,
/// session 20). Modern expository text of any model's making serves another model as plain
/// calibration text; `--calib-self` generates the model's own.
pub const DEFAULT_CALIBRATION_TEXT: &str = concat!(
    include_str!("../data/austen-emma-calibration.txt"),
    "\n\n",
    include_str!("../data/smollm2-answers-calibration.txt")
);

/// [`DEFAULT_CALIBRATION_TEXT`]'s name in GGUF metadata and reports.
pub const DEFAULT_CALIBRATION_NAME: &str =
    "tandem:austen-emma-calibration.txt+smollm2-answers-calibration.txt";

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that fills up after `room` bytes, like a full disk.
    struct FullDisk {
        room: usize,
    }

    impl Write for FullDisk {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.room == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::StorageFull));
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_full_disk_is_a_clear_error_naming_the_output() {
        let ck = Checkpoint::bundled().unwrap();
        let plan = make_plan(&ck, &Policy::new(QuantType::Q8_0)).unwrap();
        let e = write_gguf(&ck, &plan, &Options::default(), FullDisk { room: 100_000 })
            .err()
            .unwrap();
        let e = name_output(e, Path::new("/data/out.gguf")).to_string();
        assert_eq!(e, "/data/out.gguf: no space left on device");
    }

    #[test]
    fn in_memory_output_equals_the_file_and_loads() {
        let ck = Checkpoint::bundled().unwrap();
        let plan = make_plan(&ck, &Policy::new(QuantType::Q4_0)).unwrap();
        let bytes = quantize_to_bytes(&ck, &plan, &Options::default()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        quantize_to_file(&ck, &plan, &Options::default(), &p, false).unwrap();
        assert!(std::fs::read(&p).unwrap() == bytes);
        assert_eq!(
            layout(&ck, &plan, &Vec::new()).unwrap().0.file_size() as usize,
            bytes.len()
        );
        Checkpoint::open(&p, None).unwrap();
    }

    #[test]
    fn cancel_stops_before_writing() {
        let ck = Checkpoint::bundled().unwrap();
        let plan = make_plan(&ck, &Policy::new(QuantType::Q8_0)).unwrap();
        let stop = AtomicBool::new(true);
        let opts = Options {
            cancel: Some(&stop),
            ..Default::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        assert!(matches!(
            quantize_to_file(&ck, &plan, &opts, &p, false),
            Err(Error::Interrupted)
        ));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
