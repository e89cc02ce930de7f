//! Writing a plan as a compressed-tensors Hugging Face folder (`--format compressed-tensors`):
//! what llm-compressor writes and vLLM, SGLang and transformers load.
//!
//! The quantizer is the same as for GGUF (round-to-nearest, GPTQ, AWQ, the imatrix): each
//! quantized linear layer is first made as GGML blocks, then its blocks are rewritten in
//! compressed-tensors' `pack-quantized` layout without changing a value. The grids are the
//! same: a Q4_0 block is 32 signed 4-bit levels times one f16 scale, which is compressed-tensors'
//! symmetric int4 with group size 32; Q8_0 is its symmetric int8. So a layer here and the same
//! layer in tandem's GGUF hold identical weights.
//!
//! Per quantized layer `X` the folder holds `X.weight_packed` (I32 [out, in·bits/32], level
//! `q + 2^(bits−1)` of element i at bit i·bits of its row), `X.weight_scale` (F16 [out, in/32])
//! and `X.weight_shape` (I64 [2]); everything the policy keeps 16-bit is written as it is and
//! listed in `ignore`. Written by hand (streaming, one tensor in memory at a time): the
//! `safetensors` crate serializes only from views of data already in memory.

use crate::error::{io_err, tensor_err, Error, Result};
use crate::plan::{Plan, PlannedTensor, TensorKind};
use crate::types::QuantType;
use crate::Options;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use tandem_model::weights::WeightDType;
use tandem_model::Checkpoint;

/// compressed-tensors' version whose layout this writes (and `config.json` names).
pub const COMPRESSED_TENSORS_VERSION: &str = "0.19.0";

/// The group size of the GGML blocks the layers are made of; `--group-size` may be any
/// multiple of it (every block of a group then carries the group's scale).
const GROUP: usize = 32;

/// The integer width of a block type in compressed-tensors, if it has one.
fn bits_of(t: QuantType) -> Option<u32> {
    match t {
        QuantType::Q4_0 | QuantType::Q4_1 => Some(4),
        QuantType::Q8_0 => Some(8),
        _ => None,
    }
}

/// Whether a type is written symmetric (Q4_0, Q8_0) or with integer zero points (Q4_1).
fn symmetric(t: QuantType) -> bool {
    t != QuantType::Q4_1
}

/// Asymmetric int4 at group 32 with integer zero points, as compressed-tensors' min-max
/// observer makes it (the range always holds 0, the scale rounded to f16 before the levels
/// are taken): Q4_1's own minimum is a float, which compressed-tensors cannot hold, so q4_1
/// layers are made on this grid instead. Returns (levels, f16 scales, zeros) per row-major
/// [rows, cols] / [rows, cols/32]. tandem reads such a layer back exactly (as Q8_0 blocks of
/// the levels q − z, see `tandem_model::packed`).
pub fn asymmetric_int4(
    xs: &[f32],
    cols: usize,
    group: usize,
) -> (Vec<u8>, Vec<half::f16>, Vec<u8>) {
    let groups = xs.len() / group;
    let mut levels = vec![0u8; xs.len()];
    let mut scales = Vec::with_capacity(groups);
    let mut zeros = Vec::with_capacity(groups);
    debug_assert!(cols.is_multiple_of(group));
    for (g, (x, q)) in xs
        .chunks_exact(group)
        .zip(levels.chunks_exact_mut(group))
        .enumerate()
    {
        let _ = g;
        let lo = x.iter().copied().fold(0f32, f32::min);
        let hi = x.iter().copied().fold(0f32, f32::max);
        let s = half::f16::from_f32(((hi - lo) / 15.0).max(f32::MIN_POSITIVE));
        let sf = s.to_f32().max(f32::MIN_POSITIVE);
        let z = (-lo / sf).round().clamp(0.0, 15.0);
        for (v, o) in x.iter().zip(q.iter_mut()) {
            *o = ((v / sf).round() + z).clamp(0.0, 15.0) as u8;
        }
        scales.push(s);
        zeros.push(z as u8);
    }
    (levels, scales, zeros)
}

/// One tensor of the output file, in write order.
struct Entry {
    name: String,
    dtype: &'static str,
    shape: Vec<usize>,
    bytes: usize,
}

/// What a finished export did.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub tensors: usize,
    pub quantized_layers: usize,
    pub bytes_out: u64,
    pub seconds: f64,
    pub notes: Vec<String>,
}

/// Checks that compressed-tensors can hold every planned type (before anything is read).
pub fn check_plan(ck: &Checkpoint, plan: &Plan) -> Result<()> {
    if ck.store.is_gguf() {
        return Err(Error::Plan(format!(
            "{}: compressed-tensors export reads a Hugging Face folder (16-bit safetensors); convert the GGUF first with `tandem convert`",
            ck.path.display()
        )));
    }
    for t in &plan.tensors {
        let linear = matches!(
            t.kind,
            TensorKind::Attention | TensorKind::Mlp | TensorKind::Output
        ) && t.shape.len() == 2;
        match t.target {
            Some(q) if !q.is_dense() => {
                if !linear {
                    return Err(Error::Plan(format!(
                        "{}: planned as {q}, but compressed-tensors quantizes only linear layers (keep {} 16-bit: --embeddings keep)",
                        t.source_name,
                        t.kind.name()
                    )));
                }
                if bits_of(q).is_none() {
                    return Err(Error::Plan(format!(
                        "{}: {q} has no compressed-tensors layout (supported: q4_0 = int4 symmetric, q4_1 = int4 asymmetric, q8_0 = int8 symmetric; group 32)",
                        t.source_name
                    )));
                }
            }
            _ => {}
        }
        if matches!(t.source_type, WeightDType::Quant(_)) && t.target.is_none() {
            return Err(Error::Plan(format!(
                "{}: stored as {}; choose q4_0 or q8_0 for it",
                t.source_name,
                t.source_type.name()
            )));
        }
    }
    Ok(())
}

fn dtype_name(t: QuantType) -> &'static str {
    match t {
        QuantType::F32 => "F32",
        QuantType::BF16 => "BF16",
        _ => "F16",
    }
}

fn source_dtype(d: WeightDType) -> (&'static str, usize) {
    match d {
        WeightDType::F32 => ("F32", 4),
        WeightDType::BF16 => ("BF16", 2),
        _ => ("F16", 2),
    }
}

/// The output's tensors for one planned tensor.
fn entries_for(t: &PlannedTensor, group: usize) -> Vec<Entry> {
    let module = t.source_name.trim_end_matches(".weight");
    match t.target.and_then(bits_of) {
        Some(bits) => {
            let (rows, cols) = (t.shape[0], t.shape[1]);
            let per_row = (cols * bits as usize).div_ceil(32);
            vec![
                Entry {
                    name: format!("{module}.weight_packed"),
                    dtype: "I32",
                    shape: vec![rows, per_row],
                    bytes: rows * per_row * 4,
                },
                Entry {
                    name: format!("{module}.weight_scale"),
                    dtype: "F16",
                    shape: vec![rows, cols / group],
                    bytes: rows * (cols / group) * 2,
                },
                Entry {
                    name: format!("{module}.weight_shape"),
                    dtype: "I64",
                    shape: vec![2],
                    bytes: 16,
                },
            ]
            .into_iter()
            .chain((!t.target.is_some_and(symmetric)).then(|| {
                // Packed along the output dimension: [ceil(rows·bits/32), groups].
                let packed_rows = (rows * bits as usize).div_ceil(32);
                Entry {
                    name: format!("{module}.weight_zero_point"),
                    dtype: "I32",
                    shape: vec![packed_rows, cols / group],
                    bytes: packed_rows * (cols / group) * 4,
                }
            }))
            .collect()
        }
        None => {
            let elems = t.elems();
            let (dtype, size) = match t.target {
                Some(q) => (dtype_name(q), if q == QuantType::F32 { 4 } else { 2 }),
                None => source_dtype(t.source_type),
            };
            // 1-D tensors (norms, biases) keep the source's 16-bit type rather than the
            // GGUF plan's F32: a Hugging Face folder stores them in the model's dtype.
            let (dtype, size) = if t.shape.len() == 1 && t.target == Some(QuantType::F32) {
                source_dtype(t.source_type)
            } else {
                (dtype, size)
            };
            vec![Entry {
                name: t.source_name.clone(),
                dtype,
                shape: t.shape.clone(),
                bytes: elems * size,
            }]
        }
    }
}

/// Symmetric blocks (Q4_0 / Q8_0) whose scale is shared by every block of a `group`-column
/// group, computed as llama.cpp's row quantizers compute a block's (Q4_0: the value of largest
/// magnitude maps to −8; Q8_0: the largest magnitude to 127), so tandem reads the layer back
/// as ordinary blocks and compressed-tensors sees one scale per group.
pub fn shared_scale_blocks(t: QuantType, xs: &[f32], group: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(xs.len() / GROUP * if t == QuantType::Q4_0 { 18 } else { 34 });
    for g in xs.chunks_exact(group) {
        let (amax, max) = g.iter().fold((0f32, 0f32), |(a, m), &v| {
            if v.abs() > a {
                (v.abs(), v)
            } else {
                (a, m)
            }
        });
        let d = if t == QuantType::Q4_0 {
            max / -8.0
        } else {
            amax / 127.0
        };
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let d16 = half::f16::from_f32(d).to_le_bytes();
        for b in g.chunks_exact(GROUP) {
            out.extend_from_slice(&d16);
            if t == QuantType::Q4_0 {
                let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
                for j in 0..16 {
                    out.push(q(b[j]) | (q(b[j + 16]) << 4));
                }
            } else {
                out.extend(b.iter().map(|&v| (v * id).round() as i8 as u8));
            }
        }
    }
    out
}

/// `--group-size`: a multiple of 32 dividing every quantized layer's columns; groups wider
/// than 32 are made by rounding (a calibrated method's blocks carry their own scales).
fn check_group(plan: &Plan, group: usize, opts: &Options) -> Result<()> {
    if group == 0 || !group.is_multiple_of(GROUP) {
        return Err(Error::Plan(format!(
            "--group-size {group} is not a multiple of {GROUP} (the GGML block the layers are made of)"
        )));
    }
    for t in &plan.tensors {
        if t.target.is_none_or(|q| bits_of(q).is_none()) {
            continue;
        }
        let cols = t.shape.last().copied().unwrap_or(0);
        if !cols.is_multiple_of(group) {
            return Err(Error::Plan(format!(
                "{}: {cols} columns are not a multiple of --group-size {group} (keep the layer 16-bit with --rule or choose a group size that divides it)",
                t.source_name
            )));
        }
        if group > GROUP
            && opts
                .calibrated
                .is_some_and(|c| c.tensors.contains_key(&t.source_name))
        {
            return Err(Error::Plan(format!(
                "{}: calibrated methods choose a scale per 32-column block; --group-size {group} takes --method rtn",
                t.source_name
            )));
        }
    }
    Ok(())
}

use tandem_model::packed::pack_levels as pack_rows;

/// GGML Q4_0 / Q8_0 blocks of a [rows, cols] tensor → (packed words, f16 scale bytes).
pub fn blocks_to_packed(
    t: QuantType,
    blocks: &[u8],
    rows: usize,
    cols: usize,
) -> (Vec<u8>, Vec<u8>) {
    let nb = cols / GROUP;
    let mut scales = Vec::with_capacity(rows * nb * 2);
    let mut levels: Vec<u8> = Vec::with_capacity(cols);
    let bits = bits_of(t).unwrap_or(8) as usize;
    let per_row = (cols * bits).div_ceil(32);
    let mut packed = Vec::with_capacity(rows * per_row * 4);
    let block_bytes = if t == QuantType::Q4_0 { 18 } else { 34 };
    for r in 0..rows {
        levels.clear();
        for b in 0..nb {
            let blk = &blocks[(r * nb + b) * block_bytes..][..block_bytes];
            scales.extend_from_slice(&blk[..2]);
            if t == QuantType::Q4_0 {
                // Byte j holds element j (low nibble) and j + 16 (high); a nibble is the
                // level q + 8, exactly compressed-tensors' stored value.
                levels.extend(blk[2..].iter().map(|&x| x & 15));
                levels.extend(blk[2..].iter().map(|&x| x >> 4));
            } else {
                levels.extend(blk[2..].iter().map(|&x| (x as i8 as i16 + 128) as u8));
            }
        }
        packed.extend(pack_rows(&levels, 1, cols, bits));
    }
    (packed, scales)
}

/// The `quantization_config` for the quantized layers of a plan.
fn quantization_config(plan: &Plan, group: usize) -> Value {
    let mut by_bits: BTreeMap<(u32, bool), Vec<String>> = BTreeMap::new();
    let mut ignore = Vec::new();
    for t in &plan.tensors {
        let linear = matches!(
            t.kind,
            TensorKind::Attention | TensorKind::Mlp | TensorKind::Output
        ) && t.shape.len() == 2;
        if !linear {
            continue;
        }
        let module = t.source_name.trim_end_matches(".weight").to_string();
        match t.target.and_then(|q| bits_of(q).map(|b| (b, symmetric(q)))) {
            Some(k) => by_bits.entry(k).or_default().push(module),
            None => ignore.push(module),
        }
    }
    // A tied output head has no tensor of its own but is a Linear module to the libraries.
    if !plan
        .tensors
        .iter()
        .any(|t| t.source_name == "lm_head.weight")
    {
        ignore.push("lm_head".into());
    }
    let single = by_bits.len() == 1;
    let mut groups = serde_json::Map::new();
    for (i, ((bits, sym), modules)) in by_bits.into_iter().enumerate() {
        let targets = if single {
            json!(["Linear"])
        } else {
            json!(modules)
        };
        groups.insert(
            format!("group_{i}"),
            json!({
                "targets": targets,
                "weights": {
                    "num_bits": bits, "type": "int", "symmetric": sym, "strategy": "group",
                    "group_size": group, "dynamic": false, "actorder": null,
                    "block_structure": null, "observer": "minmax", "observer_kwargs": {},
                    "scale_dtype": null, "zp_dtype": null
                },
                "input_activations": null,
                "output_activations": null,
                "format": "pack-quantized"
            }),
        );
    }
    json!({
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": null,
        "sparsity_config": {},
        "transform_config": {},
        "global_compression_ratio": null,
        "version": COMPRESSED_TENSORS_VERSION
    })
}

/// Files copied beside the weights when the source folder has them.
const COPIED_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
];

/// Writes the plan as a compressed-tensors folder at `out`, atomically (a temporary folder
/// beside it, renamed into place; an existing `out` only with `force`).
pub fn write_folder(
    ck: &Checkpoint,
    plan: &Plan,
    opts: &Options,
    group: usize,
    out: &Path,
    force: bool,
) -> Result<ExportReport> {
    check_plan(ck, plan)?;
    check_group(plan, group, opts)?;
    let start = std::time::Instant::now();
    let mut report = ExportReport {
        tensors: 0,
        quantized_layers: 0,
        bytes_out: 0,
        seconds: 0.0,
        notes: Vec::new(),
    };
    tandem_model::export::write_dir_atomically(out, force, |tmp| -> Result<()> {
        // config.json: the source's, with the quantization config (and the 16-bit type the
        // scales are written in, so a loader keeps them exact).
        let src_cfg = ck.path.join("config.json");
        let text = tandem_model::files::read_text_capped(&src_cfg, tandem_model::files::CONFIG_CAP)
            .map_err(|e| io_err(&src_cfg, &e))?;
        let mut cfg: Value = serde_json::from_str(&text)
            .map_err(|e| Error::Plan(format!("{}: invalid JSON: {e}", src_cfg.display())))?;
        let Some(obj) = cfg.as_object_mut() else {
            return Err(Error::Plan(format!(
                "{}: not a JSON object",
                src_cfg.display()
            )));
        };
        obj.insert(
            "quantization_config".into(),
            quantization_config(plan, group),
        );
        if obj.get("torch_dtype").and_then(Value::as_str) == Some("bfloat16") {
            report.notes.push(
                "config.json says float16 (was bfloat16): the f16 block scales stay exact when a loader casts parameters to the model's dtype".into(),
            );
        }
        obj.insert("torch_dtype".into(), json!("float16"));
        let cfg_path = tmp.join("config.json");
        let text = serde_json::to_string_pretty(&cfg)
            .map_err(|e| Error::Plan(format!("config.json: {e}")))?;
        std::fs::write(&cfg_path, text).map_err(|e| io_err(&cfg_path, &e))?;
        for f in COPIED_FILES {
            let src = ck.path.join(f);
            if src.is_file() {
                std::fs::copy(&src, tmp.join(f)).map_err(|e| io_err(&src, &e))?;
            }
        }
        let st = tmp.join("model.safetensors");
        let (n, q, bytes) = write_safetensors(ck, plan, opts, group, &st)?;
        report.tensors = n;
        report.quantized_layers = q;
        report.bytes_out = bytes;
        Ok(())
    })?;
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// Writes one planned tensor's output tensors, each checked against its header entry.
fn write_parts(w: &mut impl Write, path: &Path, entries: &[Entry], parts: &[&[u8]]) -> Result<()> {
    if entries.len() != parts.len() {
        return Err(Error::Plan(format!(
            "{}: tensor count differs from the header (internal error)",
            path.display()
        )));
    }
    for (e, b) in entries.iter().zip(parts) {
        if e.bytes != b.len() {
            return Err(tensor_err(
                path,
                &e.name,
                "size differs from the header (internal error)",
            ));
        }
        w.write_all(b).map_err(|err| io_err(path, &err))?;
    }
    Ok(())
}

/// Streams the tensors into one safetensors file; returns (tensors, quantized layers, bytes).
fn write_safetensors(
    ck: &Checkpoint,
    plan: &Plan,
    opts: &Options,
    group: usize,
    path: &Path,
) -> Result<(usize, usize, u64)> {
    let planned: Vec<&PlannedTensor> = plan
        .tensors
        .iter()
        .filter(|t| t.source_name.starts_with("model.") || t.source_name == "lm_head.weight")
        .collect();
    let (head, n, data_bytes) = header(&planned, opts, group)?;
    let file = std::fs::File::create(path).map_err(|e| io_err(path, &e))?;
    let mut w = std::io::BufWriter::with_capacity(8 << 20, file);
    let werr = |e: std::io::Error| io_err(path, &e);
    w.write_all(&(head.len() as u64).to_le_bytes())
        .map_err(werr)?;
    w.write_all(&head).map_err(werr)?;
    let total: u64 = planned.iter().map(|t| t.elems() as u64 * 2).sum();
    let mut done = 0u64;
    let mut quantized = 0;
    for t in &planned {
        if opts
            .cancel
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
        {
            return Err(Error::Interrupted);
        }
        if let Some(p) = opts.progress {
            p(done, total, &t.source_name);
        }
        let entries = entries_for(t, group);
        let parts = match t.target.filter(|q| bits_of(*q).is_some()) {
            Some(QuantType::Q4_1) => asymmetric_parts(ck, t, opts, group)?,
            Some(q) => symmetric_parts(ck, t, q, opts, group)?,
            None => {
                let e = entries.first().ok_or_else(|| {
                    Error::Plan(format!(
                        "{}: no header entry (internal error)",
                        t.source_name
                    ))
                })?;
                vec![dense_part(ck, t, opts, e)?]
            }
        };
        quantized += usize::from(t.target.is_some_and(|q| bits_of(q).is_some()));
        let parts: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        write_parts(&mut w, path, &entries, &parts)?;
        ck.store.release(&t.source_name);
        done += t.elems() as u64 * 2;
    }
    if let Some(p) = opts.progress {
        p(total, total, "");
    }
    w.flush().map_err(werr)?;
    let file = w.into_inner().map_err(|e| io_err(path, e.error()))?;
    file.sync_all().map_err(werr)?;
    Ok((n, quantized, 8 + head.len() as u64 + data_bytes as u64))
}

/// The safetensors header (its JSON, padded to 8 bytes) of `planned`'s output tensors, the
/// calibration's metadata as strings under `__metadata__`; with the tensor count and the
/// data's bytes.
fn header(
    planned: &[&PlannedTensor],
    opts: &Options,
    group: usize,
) -> Result<(Vec<u8>, usize, usize)> {
    let mut header = serde_json::Map::new();
    let mut metadata = serde_json::Map::new();
    metadata.insert("format".into(), json!("pt"));
    if let Some(c) = opts.calibrated {
        for (k, v) in &c.metadata {
            use candle_core::quantized::gguf_file::Value as V;
            let text = match v {
                V::String(s) => s.clone(),
                V::U32(x) => x.to_string(),
                V::F32(x) => x.to_string(),
                V::Bool(b) => b.to_string(),
                other => format!("{other:?}"),
            };
            metadata.insert(k.clone(), json!(text));
        }
    }
    header.insert("__metadata__".into(), Value::Object(metadata));
    let mut offset = 0usize;
    let mut n = 0;
    for t in planned {
        for e in entries_for(t, group) {
            header.insert(
                e.name,
                json!({"dtype": e.dtype, "shape": e.shape, "data_offsets": [offset, offset + e.bytes]}),
            );
            offset += e.bytes;
            n += 1;
        }
    }
    let mut head = serde_json::to_vec(&header).map_err(|e| Error::Plan(e.to_string()))?;
    head.resize(head.len().next_multiple_of(8), b' ');
    Ok((head, n, offset))
}

/// The first `rows` rows of source tensor `t` as f32.
fn source_rows(
    ck: &Checkpoint,
    t: &PlannedTensor,
    rows: usize,
    opts: &Options,
) -> Result<Vec<f32>> {
    let raw = ck.store.get(&t.source_name)?;
    let file = ck.store.path_of(&t.source_name).to_path_buf();
    crate::encode::to_f32(&file, &raw, raw.data, (0, rows), opts.allow_nonfinite)
}

/// An asymmetric int4 layer (the plan's Q4_1): packed levels, f16 scales, the shape, and the
/// zero points, one per row and group.
fn asymmetric_parts(
    ck: &Checkpoint,
    t: &PlannedTensor,
    opts: &Options,
    group: usize,
) -> Result<Vec<Vec<u8>>> {
    if opts
        .calibrated
        .is_some_and(|c| c.tensors.contains_key(&t.source_name))
    {
        return Err(Error::Plan(format!(
            "{}: calibrated methods make q4_1 blocks with a float minimum, which compressed-tensors cannot hold; use --method rtn for asymmetric int4, or q4_0",
            t.source_name
        )));
    }
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let xs = source_rows(ck, t, rows, opts)?;
    let (levels, scales, zeros) = asymmetric_int4(&xs, cols, group);
    let packed = pack_rows(&levels, rows, cols, 4);
    let scale_bytes: Vec<u8> = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
    // Zero points: signed (z − 8), packed along the output dimension.
    let groups = cols / group;
    let mut by_col = vec![0u8; rows * groups];
    for r in 0..rows {
        for g in 0..groups {
            by_col[g * rows + r] = zeros[r * groups + g];
        }
    }
    let packed_cols = pack_rows(&by_col, groups, rows, 4);
    let per = (rows * 4).div_ceil(32);
    let mut zp = vec![0u8; per * groups * 4];
    for g in 0..groups {
        for k in 0..per {
            zp[(k * groups + g) * 4..][..4].copy_from_slice(&packed_cols[(g * per + k) * 4..][..4]);
        }
    }
    Ok(vec![packed, scale_bytes, shape_bytes(rows, cols), zp])
}

/// A symmetric layer (Q4_0 / Q8_0 grids): packed levels, one f16 scale per group, the shape.
/// Groups wider than a GGML block share one scale, so those are quantized here.
fn symmetric_parts(
    ck: &Checkpoint,
    t: &PlannedTensor,
    q: QuantType,
    opts: &Options,
    group: usize,
) -> Result<Vec<Vec<u8>>> {
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let bytes = if group > GROUP {
        shared_scale_blocks(q, &source_rows(ck, t, rows, opts)?, group)
    } else {
        crate::tensor_bytes(ck, t, opts)?
    };
    let (packed, scales) = blocks_to_packed(q, &bytes, rows, cols);
    // One scale per group: the blocks of a group share it.
    let per = group / GROUP;
    let scales: Vec<u8> = scales
        .chunks_exact(2)
        .step_by(per)
        .flatten()
        .copied()
        .collect();
    Ok(vec![packed, scales, shape_bytes(rows, cols)])
}

/// A tensor left unquantized, as its header entry `e` says.
fn dense_part(ck: &Checkpoint, t: &PlannedTensor, opts: &Options, e: &Entry) -> Result<Vec<u8>> {
    let bytes = crate::tensor_bytes(ck, t, opts)?;
    if e.bytes == bytes.len() {
        return Ok(bytes);
    }
    // A 1-D tensor the GGUF plan makes F32 goes out in the source's 16-bit type, with what a
    // calibrated method made of it (AWQ folds its scales into the norms).
    let ty = match e.dtype {
        "BF16" => QuantType::BF16,
        "F32" => QuantType::F32,
        _ => QuantType::F16,
    };
    let cols = t.shape.last().copied().unwrap_or(1).max(1);
    match opts.calibrated.and_then(|c| c.dense.get(&t.source_name)) {
        Some(values) => crate::encode::encode(ty, values, cols, None),
        None => {
            let rows = t.elems() / cols;
            crate::encode::encode(ty, &source_rows(ck, t, rows, opts)?, cols, None)
        }
    }
}

/// A `weight_shape` tensor: [rows, cols] as little-endian i64.
fn shape_bytes(rows: usize, cols: usize) -> Vec<u8> {
    [rows as i64, cols as i64]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{make_plan, Policy, TypeChoice};

    #[test]
    fn packed_blocks_hold_the_same_values() {
        let (rows, cols) = (3, 64);
        let xs: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
            .collect();
        for t in [QuantType::Q4_0, QuantType::Q8_0] {
            let blocks = crate::encode::encode(t, &xs, cols, None).unwrap();
            let (packed, scales) = blocks_to_packed(t, &blocks, rows, cols);
            let bits = bits_of(t).unwrap() as usize;
            let words: Vec<u32> = packed
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let per_row = cols * bits / 32;
            let ggml = candle_core::quantized::ggml_file::qtensor_from_ggml(
                t.ggml(),
                &blocks,
                vec![rows, cols],
                &candle_core::Device::Cpu,
            )
            .unwrap()
            .dequantize(&candle_core::Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
            for r in 0..rows {
                for c in 0..cols {
                    let p = c * bits;
                    let level = (words[r * per_row + p / 32] >> (p % 32)) & ((1 << bits) - 1);
                    let q = level as i32 - (1 << (bits - 1));
                    let s = half::f16::from_le_bytes([
                        scales[(r * cols / 32 + c / 32) * 2],
                        scales[(r * cols / 32 + c / 32) * 2 + 1],
                    ]);
                    assert_eq!(q as f32 * s.to_f32(), ggml[r * cols + c], "{t} r{r} c{c}");
                }
            }
        }
    }

    #[test]
    fn k_quants_and_quantized_embeddings_are_refused_before_writing() {
        let ck = Checkpoint::bundled().unwrap();
        let mut policy = Policy::new(QuantType::Q4K);
        policy.embeddings = TypeChoice::Keep;
        let plan = make_plan(&ck, &policy).unwrap();
        let e = check_plan(&ck, &plan).unwrap_err().to_string();
        assert!(e.contains("has no compressed-tensors layout"), "{e}");
        let plan = make_plan(&ck, &Policy::new(QuantType::Q8_0)).unwrap();
        let e = check_plan(&ck, &plan).unwrap_err().to_string();
        assert!(
            e.contains("compressed-tensors quantizes only linear layers"),
            "{e}"
        );
    }
}
