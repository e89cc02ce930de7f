//! Integer-quantized Hugging Face checkpoints, read as GGML blocks: compressed-tensors
//! (`pack-quantized`, `int-quantized`; what llm-compressor writes and vLLM serves), GPTQ
//! (AutoGPTQ / GPTQModel layout: `qweight`, `qzeros`, `scales`, `g_idx`) and AWQ (GEMM packing).
//!
//! Every such layer is first unpacked into one neutral form ([`IntLinear`]: unsigned levels,
//! a scale and an integer zero per row and group, the group of every column), so the three
//! formats differ only in how their bits are laid out. From there a layer becomes the GGML
//! type whose grid it is, bit for bit, where one exists:
//!
//! | source                                    | GGML  | exact?                                |
//! |-------------------------------------------|-------|---------------------------------------|
//! | 4-bit, zero at 8 (symmetric), groups ⊇ 32  | Q4_0  | yes (scale is the block's `d`)        |
//! | 4-bit, other zeros, groups ⊇ 32            | Q4_1 where every offset `−z·s` is an f16, else Q8_0 | yes (Q8_0: levels `q − z` in [−16, 15], `d = s`) |
//! | 8-bit, zero at 128 (symmetric), groups ⊇ 32| Q8_0  | yes                                   |
//! | anything else (act-order groups that cut a 32-block, 2/3/5–7 bits, 8-bit asymmetric, scales f16 cannot hold) | F32 | yes: dequantized |
//!
//! "groups ⊇ 32" means every aligned run of 32 columns shares one group, which holds for any
//! group size that is a multiple of 32, for per-channel scales, and for act-order checkpoints
//! whose `g_idx` happens to keep runs together. The layout knowledge here is read from the
//! formats' own packers (compressed-tensors `pack_to_int32`, AutoGPTQ `QuantLinear.pack`,
//! AutoAWQ `WQLinear_GEMM`); the bit twiddling is written by hand because no Rust crate reads
//! these formats.

use crate::error::{format_err, tensor_err, Error, Result};
use crate::weights::WeightDType;
use candle_core::quantized::GgmlDType;
use half::{bf16, f16};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Which library's layout a checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackedFormat {
    CompressedTensors,
    Gptq,
    Awq,
}

impl PackedFormat {
    pub fn name(self) -> &'static str {
        match self {
            PackedFormat::CompressedTensors => "compressed-tensors",
            PackedFormat::Gptq => "gptq",
            PackedFormat::Awq => "awq",
        }
    }
}

/// How one layer's weights were quantized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntScheme {
    pub bits: u32,
    /// Columns per scale; `None`: one scale per row (channel strategy).
    pub group_size: Option<usize>,
    pub symmetric: bool,
    /// Columns are grouped in activation order (`g_idx` present and meaningful).
    pub act_order: bool,
}

impl IntScheme {
    pub fn describe(&self) -> String {
        format!(
            "int{} {} {}{}",
            self.bits,
            if self.symmetric {
                "symmetric"
            } else {
                "asymmetric"
            },
            match self.group_size {
                Some(g) => format!("group {g}"),
                None => "per channel".into(),
            },
            if self.act_order { ", act-order" } else { "" }
        )
    }
}

/// A compressed-tensors config group: which modules it covers and how.
#[derive(Debug, Clone)]
struct CtGroup {
    name: String,
    targets: Vec<String>,
    scheme: IntScheme,
    /// pack-quantized, int-quantized (naive-quantized is the same layout).
    format: String,
}

/// The `quantization_config` of a config.json, checked.
#[derive(Debug, Clone)]
pub struct QuantConfig {
    pub format: PackedFormat,
    ct_groups: Vec<CtGroup>,
    ct_ignore: Vec<String>,
    /// GPTQ/AWQ: one scheme for every quantized layer.
    scheme: Option<IntScheme>,
    /// GPTQ: zeros stored minus one (`checkpoint_format` "gptq", AutoGPTQ's v1 layout).
    gptq_zero_minus_one: bool,
    /// Notes for the user (activation quantization ignored, ...).
    pub notes: Vec<String>,
}

fn field<'a>(path: &Path, obj: &'a Value, key: &str) -> Result<&'a Value> {
    obj.get(key)
        .ok_or_else(|| format_err(path, format!("quantization_config: missing field '{key}'")))
}

fn as_usize(path: &Path, v: &Value, key: &str) -> Result<i64> {
    v.as_i64().ok_or_else(|| {
        format_err(
            path,
            format!("quantization_config: field '{key}' is not an integer"),
        )
    })
}

fn as_bool(path: &Path, v: &Value, key: &str) -> Result<bool> {
    v.as_bool().ok_or_else(|| {
        format_err(
            path,
            format!("quantization_config: field '{key}' is not true/false"),
        )
    })
}

fn unsupported(path: &Path, msg: impl Into<String>) -> Error {
    Error::Unsupported {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn check_bits(path: &Path, bits: i64, key: &str, allowed: &[i64]) -> Result<u32> {
    if allowed.contains(&bits) {
        Ok(bits as u32)
    } else {
        Err(unsupported(
            path,
            format!(
                "quantization_config: {key} = {bits} is not supported (supported: {allowed:?})"
            ),
        ))
    }
}

fn group_from(path: &Path, g: i64, key: &str) -> Result<Option<usize>> {
    match g {
        -1 => Ok(None),
        g if g > 0 && g <= 1 << 20 => Ok(Some(g as usize)),
        g => Err(format_err(
            path,
            format!("quantization_config: {key} = {g} is neither a positive group size nor -1 (per channel)"),
        )),
    }
}

impl QuantConfig {
    /// Reads `quantization_config` from a config.json's JSON; `None` when it has none.
    pub fn from_config_json(path: &Path, config: &Value) -> Result<Option<Self>> {
        let Some(q) = config.get("quantization_config") else {
            return Ok(None);
        };
        if !q.is_object() {
            return Err(format_err(path, "quantization_config is not an object"));
        }
        let method = field(path, q, "quant_method")?
            .as_str()
            .ok_or_else(|| format_err(path, "quantization_config: quant_method is not a string"))?;
        match method {
            "compressed-tensors" => Self::compressed_tensors(path, q).map(Some),
            "gptq" => Self::gptq(path, q).map(Some),
            "awq" => Self::awq(path, q).map(Some),
            other => Err(unsupported(
                path,
                format!(
                    "quantization_config: quant_method '{}' is not supported (supported: compressed-tensors, gptq, awq)",
                    crate::error::clean(other, 40)
                ),
            )),
        }
    }

    fn compressed_tensors(path: &Path, q: &Value) -> Result<Self> {
        let top_format = q.get("format").and_then(Value::as_str).unwrap_or("");
        let mut notes = Vec::new();
        if let Some(s) = q.get("sparsity_config").and_then(Value::as_object) {
            if !s.is_empty() {
                return Err(unsupported(
                    path,
                    "quantization_config: sparsity_config (sparse compression) is not supported",
                ));
            }
        }
        if let Some(t) = q.get("transform_config").and_then(Value::as_object) {
            if !t.is_empty() {
                return Err(unsupported(
                    path,
                    "quantization_config: transform_config (rotations) is not supported",
                ));
            }
        }
        let groups = field(path, q, "config_groups")?
            .as_object()
            .ok_or_else(|| {
                format_err(path, "quantization_config: config_groups is not an object")
            })?;
        let mut ct_groups = Vec::new();
        for (name, g) in groups {
            let gname = crate::error::clean(name, 40);
            let ctx = |k: &str| format!("config_groups.{gname}.{k}");
            let targets: Vec<String> = field(path, g, "targets")?
                .as_array()
                .ok_or_else(|| {
                    format_err(
                        path,
                        format!("quantization_config: {} is not a list", ctx("targets")),
                    )
                })?
                .iter()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect();
            let w = field(path, g, "weights")?;
            if w.is_null() {
                continue;
            }
            if let Some(a) = g.get("input_activations").filter(|a| !a.is_null()) {
                let ty = a.get("type").and_then(Value::as_str).unwrap_or("?");
                notes.push(format!(
                    "{gname}: the checkpoint also quantizes activations ({ty}, {} bits); tandem runs its weights with its own activations",
                    a.get("num_bits").and_then(Value::as_i64).unwrap_or(0)
                ));
            }
            let ty = field(path, w, "type")?.as_str().unwrap_or("?");
            if ty != "int" {
                return Err(unsupported(
                    path,
                    format!(
                        "quantization_config: {} = '{}' is not supported (supported: int)",
                        ctx("weights.type"),
                        crate::error::clean(ty, 20)
                    ),
                ));
            }
            let bits = check_bits(
                path,
                as_usize(path, field(path, w, "num_bits")?, "num_bits")?,
                &ctx("weights.num_bits"),
                &[2, 3, 4, 5, 6, 7, 8],
            )?;
            let symmetric = as_bool(path, field(path, w, "symmetric")?, "symmetric")?;
            if w.get("dynamic").and_then(Value::as_bool) == Some(true) {
                return Err(unsupported(
                    path,
                    format!("quantization_config: {} = true (weights quantized at run time) is not supported", ctx("weights.dynamic")),
                ));
            }
            let strategy = field(path, w, "strategy")?.as_str().unwrap_or("?");
            let group_size = match strategy {
                "group" => {
                    let g = as_usize(path, field(path, w, "group_size")?, "group_size")?;
                    match group_from(path, g, &ctx("weights.group_size"))? {
                        Some(g) => Some(g),
                        None => {
                            return Err(format_err(
                                path,
                                format!("quantization_config: {} is -1 with strategy 'group'", ctx("weights.group_size")),
                            ))
                        }
                    }
                }
                "channel" => None,
                // One scale for the whole tensor: every row carries the same scale.
                "tensor" => None,
                other => {
                    return Err(unsupported(
                        path,
                        format!(
                            "quantization_config: {} = '{}' is not supported (supported: group, channel, tensor)",
                            ctx("weights.strategy"),
                            crate::error::clean(other, 20)
                        ),
                    ))
                }
            };
            let act_order = matches!(
                w.get("actorder").and_then(Value::as_str),
                Some("group") | Some("dynamic") | Some("true")
            );
            let format = g
                .get("format")
                .and_then(Value::as_str)
                .unwrap_or(top_format)
                .to_string();
            match format.as_str() {
                "pack-quantized" | "int-quantized" | "naive-quantized" => {}
                other => {
                    return Err(unsupported(
                        path,
                        format!(
                            "quantization_config: format '{}' is not supported (supported: pack-quantized, int-quantized)",
                            crate::error::clean(other, 30)
                        ),
                    ))
                }
            }
            ct_groups.push(CtGroup {
                name: gname,
                targets,
                scheme: IntScheme {
                    bits,
                    group_size,
                    symmetric,
                    act_order,
                },
                format,
            });
        }
        if ct_groups.is_empty() {
            return Err(format_err(
                path,
                "quantization_config: no config group quantizes weights",
            ));
        }
        let ct_ignore = q
            .get("ignore")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        Ok(QuantConfig {
            format: PackedFormat::CompressedTensors,
            ct_groups,
            ct_ignore,
            scheme: None,
            gptq_zero_minus_one: false,
            notes,
        })
    }

    fn gptq(path: &Path, q: &Value) -> Result<Self> {
        let bits = check_bits(
            path,
            as_usize(path, field(path, q, "bits")?, "bits")?,
            "bits",
            &[2, 4, 8],
        )?;
        let group_size = group_from(
            path,
            as_usize(path, field(path, q, "group_size")?, "group_size")?,
            "group_size",
        )?;
        let symmetric = match q.get("sym") {
            Some(v) => as_bool(path, v, "sym")?,
            None => true,
        };
        let act_order = match q.get("desc_act") {
            Some(v) if !v.is_null() => as_bool(path, v, "desc_act")?,
            _ => false,
        };
        let ckpt = q
            .get("checkpoint_format")
            .and_then(Value::as_str)
            .unwrap_or("gptq");
        let gptq_zero_minus_one = match ckpt {
            "gptq" => true,
            "gptq_v2" => false,
            other => {
                return Err(unsupported(
                    path,
                    format!(
                        "quantization_config: checkpoint_format '{}' is not supported (supported: gptq, gptq_v2)",
                        crate::error::clean(other, 30)
                    ),
                ))
            }
        };
        Ok(QuantConfig {
            format: PackedFormat::Gptq,
            ct_groups: Vec::new(),
            ct_ignore: Vec::new(),
            scheme: Some(IntScheme {
                bits,
                group_size,
                symmetric,
                act_order,
            }),
            gptq_zero_minus_one,
            notes: Vec::new(),
        })
    }

    fn awq(path: &Path, q: &Value) -> Result<Self> {
        let bits = q
            .get("bits")
            .or_else(|| q.get("w_bit"))
            .ok_or_else(|| format_err(path, "quantization_config: missing field 'bits'"))?;
        let bits = check_bits(path, as_usize(path, bits, "bits")?, "bits", &[4])?;
        let g = q
            .get("group_size")
            .or_else(|| q.get("q_group_size"))
            .ok_or_else(|| format_err(path, "quantization_config: missing field 'group_size'"))?;
        let group_size = group_from(path, as_usize(path, g, "group_size")?, "group_size")?;
        let version = q
            .get("version")
            .and_then(Value::as_str)
            .unwrap_or("gemm")
            .to_ascii_lowercase();
        if version != "gemm" {
            return Err(unsupported(
                path,
                format!(
                    "quantization_config: AWQ version '{}' is not supported (supported: gemm)",
                    crate::error::clean(&version, 20)
                ),
            ));
        }
        let zero_point = match q.get("zero_point") {
            Some(v) => as_bool(path, v, "zero_point")?,
            None => true,
        };
        Ok(QuantConfig {
            format: PackedFormat::Awq,
            ct_groups: Vec::new(),
            ct_ignore: Vec::new(),
            scheme: Some(IntScheme {
                bits,
                group_size,
                symmetric: !zero_point,
                act_order: false,
            }),
            gptq_zero_minus_one: false,
            notes: Vec::new(),
        })
    }

    /// The compressed-tensors group that covers `module` (first match), or an error.
    fn ct_group_for(&self, path: &Path, module: &str) -> Result<&CtGroup> {
        let matches = |t: &str| -> bool {
            if t == "Linear" {
                return true;
            }
            if let Some(re) = t.strip_prefix("re:") {
                return regex::Regex::new(re).is_ok_and(|r| r.is_match(module));
            }
            module == t || module.ends_with(&format!(".{t}"))
        };
        self.ct_groups
            .iter()
            .find(|g| g.targets.iter().any(|t| matches(t)))
            .ok_or_else(|| {
                tensor_err(
                    path,
                    module,
                    "is stored quantized but no quantization_config group targets it",
                )
            })
    }

    /// A one-line description: format and each group's scheme.
    pub fn describe(&self) -> String {
        match self.format {
            PackedFormat::CompressedTensors => {
                let groups: Vec<String> = self
                    .ct_groups
                    .iter()
                    .map(|g| format!("{}: {} ({})", g.name, g.scheme.describe(), g.format))
                    .collect();
                format!("compressed-tensors, {}", groups.join("; "))
            }
            f => format!(
                "{}, {}",
                f.name(),
                self.scheme
                    .as_ref()
                    .map(IntScheme::describe)
                    .unwrap_or_default()
            ),
        }
    }

    /// Modules the config says stay unquantized (compressed-tensors `ignore`).
    pub fn ignored(&self) -> &[String] {
        &self.ct_ignore
    }
}

/// Element type of a stored tensor as the packed readers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDType {
    F32,
    F16,
    BF16,
    I8,
    I32,
    I64,
}

impl StoredDType {
    pub fn size(self) -> usize {
        match self {
            StoredDType::I8 => 1,
            StoredDType::F16 | StoredDType::BF16 => 2,
            StoredDType::F32 | StoredDType::I32 => 4,
            StoredDType::I64 => 8,
        }
    }
}

/// One stored tensor handed to the importer.
pub struct Stored<'a> {
    pub dtype: StoredDType,
    pub shape: &'a [usize],
    pub data: &'a [u8],
    pub path: &'a Path,
}

/// How exactly an imported layer keeps its source values.
#[derive(Debug, Clone, PartialEq)]
pub enum Exactness {
    /// Every weight is the source's value.
    Exact,
    /// No GGML type holds the grid: dequantized to F32 (exact values, no longer packed).
    Dequantized { reason: String },
}

/// One quantized layer as tandem holds it.
pub struct ImportedTensor {
    /// Hugging Face weight name (`...mlp.down_proj.weight`).
    pub name: String,
    pub dtype: WeightDType,
    /// [out, in].
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
    pub exactness: Exactness,
    pub scheme: IntScheme,
    /// The stored tensors it was made from (consumed).
    pub parts: Vec<String>,
    /// The file holding its packed weights.
    pub file: PathBuf,
}

/// What an import read: the format and, per layer, how it is held.
#[derive(Debug, Clone)]
pub struct ImportSummary {
    pub config: QuantConfig,
    /// (weight name, type held, exactness, scheme).
    pub tensors: Vec<(String, WeightDType, Exactness, IntScheme)>,
}

impl ImportSummary {
    /// How `name` was imported, if it was a packed layer.
    pub fn exactness_of(&self, name: &str) -> Option<&Exactness> {
        self.tensors
            .iter()
            .find(|t| t.0 == name)
            .map(|(_, _, e, _)| e)
    }

    /// Counts per (held type, exactness kind), for `info`.
    pub fn counts(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for (_, d, e, _) in &self.tensors {
            let k = match e {
                Exactness::Exact => format!("{} (exact)", d.name()),
                Exactness::Dequantized { reason } => {
                    format!("{} (dequantized: {reason})", d.name())
                }
            };
            *m.entry(k).or_insert(0) += 1;
        }
        m
    }
}

/// One layer unpacked: `w[r][c] = (q[r][c] − zero[r][g]) · scale[r][g]`, `g = group_of_col[c]`,
/// levels unsigned in [0, 2^bits), zeros in [0, 2^bits] (GPTQ's v1 layout can mean 2^bits).
#[derive(Debug, Clone)]
pub struct IntLinear {
    pub rows: usize,
    pub cols: usize,
    pub bits: u32,
    pub groups: usize,
    /// [rows × cols].
    pub q: Vec<u8>,
    /// [rows × groups].
    pub scale: Vec<f32>,
    /// [rows × groups].
    pub zero: Vec<u8>,
    /// [cols].
    pub group_of_col: Vec<u32>,
}

impl IntLinear {
    /// The value of one weight.
    pub fn value(&self, r: usize, c: usize) -> f32 {
        let g = r * self.groups + self.group_of_col[c] as usize;
        (f32::from(self.q[r * self.cols + c]) - f32::from(self.zero[g])) * self.scale[g]
    }

    /// Every weight, row-major, in f32 (exact: small integers times a stored scale).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            for c in 0..self.cols {
                out.push(self.value(r, c));
            }
        }
        out
    }

    /// Whether every aligned run of 32 columns shares one group.
    fn blocks_share_groups(&self) -> bool {
        self.cols.is_multiple_of(32)
            && self
                .group_of_col
                .chunks_exact(32)
                .all(|b| b.iter().all(|&g| g == b[0]))
    }

    /// The layer as GGML blocks where its grid is one (see the module table), else F32.
    pub fn to_ggml(&self) -> (WeightDType, Vec<u8>, Exactness) {
        let dense = |reason: String| {
            let bytes = self
                .dequantize()
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect();
            (WeightDType::F32, bytes, Exactness::Dequantized { reason })
        };
        if !self.blocks_share_groups() {
            return dense(if self.cols.is_multiple_of(32) {
                "groups (act-order) do not keep 32-column blocks together".into()
            } else {
                format!("{} columns are not a multiple of 32", self.cols)
            });
        }
        let f16_exact = self
            .scale
            .iter()
            .all(|&s| f16::from_f32(s).to_f32() == s && s.is_finite());
        if !f16_exact {
            return dense("scales are not representable in f16".into());
        }
        let mid = 1u8 << (self.bits - 1);
        let symmetric = self.zero.iter().all(|&z| z == mid);
        let blocks = self.cols / 32;
        match (self.bits, symmetric) {
            (4, true) => {
                let mut out = Vec::with_capacity(self.rows * blocks * 18);
                for r in 0..self.rows {
                    for b in 0..blocks {
                        let g = r * self.groups + self.group_of_col[b * 32] as usize;
                        out.extend(f16::from_f32(self.scale[g]).to_le_bytes());
                        let q = &self.q[r * self.cols + b * 32..][..32];
                        // GGML's Q4_0: byte j holds element j (low nibble) and j+16 (high).
                        for j in 0..16 {
                            out.push(q[j] | (q[j + 16] << 4));
                        }
                    }
                }
                (WeightDType::Quant(GgmlDType::Q4_0), out, Exactness::Exact)
            }
            (4, false) => {
                let mut out = Vec::with_capacity(self.rows * blocks * 20);
                let mut max_err = 0f32;
                for r in 0..self.rows {
                    for b in 0..blocks {
                        let g = r * self.groups + self.group_of_col[b * 32] as usize;
                        let s = self.scale[g];
                        let m = -f32::from(self.zero[g]) * s;
                        let m16 = f16::from_f32(m);
                        max_err = max_err.max((m16.to_f32() - m).abs());
                        out.extend(f16::from_f32(s).to_le_bytes());
                        out.extend(m16.to_le_bytes());
                        let q = &self.q[r * self.cols + b * 32..][..32];
                        for j in 0..16 {
                            out.push(q[j] | (q[j + 16] << 4));
                        }
                    }
                }
                if max_err == 0.0 {
                    return (WeightDType::Quant(GgmlDType::Q4_1), out, Exactness::Exact);
                }
                // Q4_1's offset is an f16 and some −z·s are not: (q − z)·s is a symmetric
                // grid with integer levels in [−16, 15] (a zero of 16 from GPTQ's v1 layout),
                // which a Q8_0 block with d = s holds exactly, at 8.5 bits a weight.
                let mut out = Vec::with_capacity(self.rows * blocks * 34);
                for r in 0..self.rows {
                    for b in 0..blocks {
                        let g = r * self.groups + self.group_of_col[b * 32] as usize;
                        out.extend(f16::from_f32(self.scale[g]).to_le_bytes());
                        let q = &self.q[r * self.cols + b * 32..][..32];
                        let z = i16::from(self.zero[g]);
                        out.extend(q.iter().map(|&v| (i16::from(v) - z) as i8 as u8));
                    }
                }
                (WeightDType::Quant(GgmlDType::Q8_0), out, Exactness::Exact)
            }
            (8, true) => {
                let mut out = Vec::with_capacity(self.rows * blocks * 34);
                for r in 0..self.rows {
                    for b in 0..blocks {
                        let g = r * self.groups + self.group_of_col[b * 32] as usize;
                        out.extend(f16::from_f32(self.scale[g]).to_le_bytes());
                        let q = &self.q[r * self.cols + b * 32..][..32];
                        out.extend(q.iter().map(|&v| v.wrapping_sub(128)));
                    }
                }
                (WeightDType::Quant(GgmlDType::Q8_0), out, Exactness::Exact)
            }
            (8, false) => dense("8-bit asymmetric has no GGML type".into()),
            (b, _) => dense(format!("{b}-bit has no GGML type")),
        }
    }
}

/// Reads the tensors of a checkpoint through a lookup, consumes every packed layer and returns
/// the layers in tandem's form plus the names of the stored tensors they used.
pub fn import<'a>(
    cfg: &QuantConfig,
    names: &[String],
    lookup: &dyn Fn(&str) -> Option<Stored<'a>>,
    main_path: &Path,
) -> Result<Vec<ImportedTensor>> {
    let mut out = Vec::new();
    for name in names {
        let module = match cfg.format {
            PackedFormat::CompressedTensors => name.strip_suffix(".weight_packed").or_else(|| {
                name.strip_suffix(".weight")
                    .filter(|_| lookup(name).is_some_and(|t| t.dtype == StoredDType::I8))
            }),
            PackedFormat::Gptq | PackedFormat::Awq => name.strip_suffix(".qweight"),
        };
        let Some(module) = module else { continue };
        let need = |suffix: &str| -> Result<(String, Stored<'a>)> {
            let n = format!("{module}.{suffix}");
            let t = lookup(&n).ok_or_else(|| {
                tensor_err(main_path, &n, "missing: the quantized layer needs it")
            })?;
            Ok((n, t))
        };
        let opt = |suffix: &str| -> Option<(String, Stored<'a>)> {
            let n = format!("{module}.{suffix}");
            lookup(&n).map(|t| (n, t))
        };
        let (lin, scheme, parts, file) = match cfg.format {
            PackedFormat::CompressedTensors => {
                let group = cfg.ct_group_for(main_path, module)?;
                let scheme = group.scheme.clone();
                let (sn, scale) = need("weight_scale")?;
                let zp = opt("weight_zero_point");
                let gidx = opt("weight_g_idx");
                let mut parts = vec![sn.clone()];
                let (wn, w) = if name.ends_with(".weight_packed") {
                    need("weight_packed")?
                } else {
                    need("weight")?
                };
                parts.push(wn.clone());
                let file = w.path.to_path_buf();
                let shape = if name.ends_with(".weight_packed") {
                    let (shn, sh) = need("weight_shape")?;
                    parts.push(shn.clone());
                    read_shape(&shn, &sh)?
                } else {
                    if w.shape.len() != 2 {
                        return Err(tensor_err(
                            w.path,
                            &wn,
                            format!("shape {:?} is not 2-D", w.shape),
                        ));
                    }
                    [w.shape[0], w.shape[1]]
                };
                if let Some((n, _)) = &zp {
                    parts.push(n.clone());
                }
                if let Some((n, _)) = &gidx {
                    parts.push(n.clone());
                }
                let lin = ct_layer(
                    &scheme,
                    shape,
                    (&wn, &w),
                    (&sn, &scale),
                    zp.as_ref().map(|(n, t)| (n.as_str(), t)),
                    gidx.as_ref().map(|(n, t)| (n.as_str(), t)),
                    name.ends_with(".weight_packed"),
                )?;
                (lin, scheme, parts, file)
            }
            PackedFormat::Gptq | PackedFormat::Awq => {
                let scheme = cfg
                    .scheme
                    .clone()
                    .ok_or_else(|| format_err(main_path, "no scheme"))?;
                let (qn, qw) = need("qweight")?;
                let (zn, qz) = need("qzeros")?;
                let (sn, sc) = need("scales")?;
                let mut parts = vec![qn.clone(), zn.clone(), sn.clone()];
                let file = qw.path.to_path_buf();
                let lin = if cfg.format == PackedFormat::Gptq {
                    let g = opt("g_idx");
                    if let Some((n, _)) = &g {
                        parts.push(n.clone());
                    }
                    gptq_layer(
                        &scheme,
                        (&qn, &qw),
                        (&zn, &qz),
                        (&sn, &sc),
                        g.as_ref().map(|(n, t)| (n.as_str(), t)),
                        cfg.gptq_zero_minus_one,
                    )?
                } else {
                    awq_layer(&scheme, (&qn, &qw), (&zn, &qz), (&sn, &sc))?
                };
                (lin, scheme, parts, file)
            }
        };
        let (dtype, bytes, exactness) = lin.to_ggml();
        out.push(ImportedTensor {
            name: format!("{module}.weight"),
            dtype,
            shape: vec![lin.rows, lin.cols],
            bytes,
            exactness,
            scheme,
            parts,
            file,
        });
    }
    if out.is_empty() {
        return Err(format_err(
            main_path,
            format!(
                "config.json declares {} quantization but no tensor is stored quantized",
                cfg.format.name()
            ),
        ));
    }
    Ok(out)
}

/// Little-endian words of an I32 tensor, checked to hold `n` of them.
fn words(name: &str, t: &Stored, n: usize) -> Result<Vec<u32>> {
    if t.dtype != StoredDType::I32 {
        return Err(tensor_err(
            t.path,
            name,
            format!("dtype {:?}, expected I32 (packed integers)", t.dtype),
        ));
    }
    if t.data.len() != n.saturating_mul(4) {
        return Err(tensor_err(
            t.path,
            name,
            format!(
                "shape {:?} does not hold the {n} packed words the layer needs",
                t.shape
            ),
        ));
    }
    Ok(t.data
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// A float tensor (scales) as f32, checked to hold `n` values.
fn floats(name: &str, t: &Stored, n: usize) -> Result<Vec<f32>> {
    let size = t.dtype.size();
    if t.data.len() != n.saturating_mul(size) {
        return Err(tensor_err(
            t.path,
            name,
            format!(
                "shape {:?} does not hold the {n} values the layer needs",
                t.shape
            ),
        ));
    }
    let v: Vec<f32> = match t.dtype {
        StoredDType::F32 => t
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        StoredDType::F16 => t
            .data
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        StoredDType::BF16 => t
            .data
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        d => {
            return Err(tensor_err(
                t.path,
                name,
                format!("dtype {d:?}, expected a float type"),
            ))
        }
    };
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(tensor_err(t.path, name, format!("value {i} is not finite")));
    }
    Ok(v)
}

/// Integers of an I8/I32/I64 tensor, checked to hold `n`.
fn ints(name: &str, t: &Stored, n: usize) -> Result<Vec<i64>> {
    let size = t.dtype.size();
    if t.data.len() != n.saturating_mul(size) {
        return Err(tensor_err(
            t.path,
            name,
            format!(
                "shape {:?} does not hold the {n} values the layer needs",
                t.shape
            ),
        ));
    }
    Ok(match t.dtype {
        StoredDType::I8 => t.data.iter().map(|&b| i64::from(b as i8)).collect(),
        StoredDType::I32 => t
            .data
            .chunks_exact(4)
            .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        StoredDType::I64 => t
            .data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect(),
        d => {
            return Err(tensor_err(
                t.path,
                name,
                format!("dtype {d:?}, expected an integer type"),
            ))
        }
    })
}

fn read_shape(name: &str, t: &Stored) -> Result<[usize; 2]> {
    let v = ints(name, t, 2)?;
    let ok = |x: i64| usize::try_from(x).ok().filter(|&x| x > 0 && x <= 1 << 24);
    match (ok(v[0]), ok(v[1])) {
        (Some(r), Some(c)) => Ok([r, c]),
        _ => Err(tensor_err(
            t.path,
            name,
            format!("{v:?} is not a plausible [out, in] shape"),
        )),
    }
}

/// Element i of a row packed densely at bit i·bits (compressed-tensors' `pack_to_int32`).
fn dense_level(row: &[u32], i: usize, bits: u32) -> u8 {
    let p = i * bits as usize;
    let (w, off) = (p / 32, (p % 32) as u32);
    let mut v = u64::from(row[w]) >> off;
    if off + bits > 32 {
        v |= u64::from(row.get(w + 1).copied().unwrap_or(0)) << (32 - off);
    }
    (v & ((1u64 << bits) - 1)) as u8
}

/// Columns per group and the group of each column, from a scheme (no act-order).
fn groups_for(
    path: &Path,
    name: &str,
    scheme: &IntScheme,
    cols: usize,
) -> Result<(usize, Vec<u32>)> {
    match scheme.group_size {
        None => Ok((1, vec![0; cols])),
        Some(g) => {
            if !cols.is_multiple_of(g) {
                return Err(tensor_err(
                    path,
                    name,
                    format!("{cols} columns are not a multiple of group_size {g}"),
                ));
            }
            Ok((cols / g, (0..cols).map(|c| (c / g) as u32).collect()))
        }
    }
}

/// Reads a `g_idx` tensor: the group of each column, each below `groups`.
fn read_g_idx(name: &str, t: &Stored, cols: usize, groups: usize) -> Result<Vec<u32>> {
    let v = ints(name, t, cols)?;
    v.iter()
        .enumerate()
        .map(|(c, &g)| {
            u32::try_from(g)
                .ok()
                .filter(|&g| (g as usize) < groups)
                .ok_or_else(|| {
                    tensor_err(
                        t.path,
                        name,
                        format!("column {c} names group {g}, outside 0..{groups}"),
                    )
                })
        })
        .collect()
}

fn check_scale_shape(name: &str, t: &Stored, want: &[usize]) -> Result<()> {
    let numel: usize = t.shape.iter().product();
    let want_n: usize = want.iter().product();
    if numel != want_n {
        return Err(tensor_err(
            t.path,
            name,
            format!(
                "shape {:?} does not match the layer (expected {want:?})",
                t.shape
            ),
        ));
    }
    Ok(())
}

/// Signed `bits`-bit integers (compressed-tensors' levels and zero points) → unsigned levels
/// (+2^(bits−1)), refusing any outside the range.
fn unsigned_levels(
    t: &Stored,
    name: &str,
    what: &str,
    signed: &[i64],
    bits: u32,
) -> Result<Vec<u8>> {
    let mid = 1i64 << (bits - 1);
    signed
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            if x < -mid || x >= mid {
                Err(tensor_err(
                    t.path,
                    name,
                    format!("{what} {i} = {x} is outside the {bits}-bit range"),
                ))
            } else {
                Ok((x + mid) as u8)
            }
        })
        .collect()
}

/// Unsigned levels of `rows` rows of `cols` → compressed-tensors' dense packing, as
/// little-endian bytes: level i of a row at bit i·bits (`pack_to_int32`; the inverse of
/// [`dense_level`]). The exporter writes with it.
pub fn pack_levels(levels: &[u8], rows: usize, cols: usize, bits: usize) -> Vec<u8> {
    let per_row = (cols * bits).div_ceil(32);
    let mut out = Vec::with_capacity(rows * per_row * 4);
    for row in levels.chunks_exact(cols).take(rows) {
        let mut words = vec![0u32; per_row];
        for (i, &v) in row.iter().enumerate() {
            let p = i * bits;
            words[p / 32] |= u32::from(v) << (p % 32);
            if p % 32 + bits > 32 {
                words[p / 32 + 1] |= u32::from(v) >> (32 - p % 32);
            }
        }
        out.extend(words.iter().flat_map(|w| w.to_le_bytes()));
    }
    out
}

/// A compressed-tensors layer (pack-quantized or int-quantized).
fn ct_layer(
    scheme: &IntScheme,
    [rows, cols]: [usize; 2],
    (wn, w): (&str, &Stored),
    (sn, scale): (&str, &Stored),
    zp: Option<(&str, &Stored)>,
    gidx: Option<(&str, &Stored)>,
    packed: bool,
) -> Result<IntLinear> {
    let bits = scheme.bits;
    let mid = 1i64 << (bits - 1);
    // The levels, unsigned, row-major.
    let q: Vec<u8> = if packed {
        let per_row = (cols * bits as usize).div_ceil(32);
        let n = rows
            .checked_mul(per_row)
            .ok_or_else(|| tensor_err(w.path, wn, "shape overflows"))?;
        if w.shape != [rows, per_row] {
            return Err(tensor_err(
                w.path,
                wn,
                format!(
                    "shape {:?} does not hold [{rows}, {cols}] weights at {bits} bits (expected [{rows}, {per_row}])",
                    w.shape
                ),
            ));
        }
        let ws = words(wn, w, n)?;
        let mut q = Vec::with_capacity(rows * cols);
        for row in ws.chunks_exact(per_row) {
            q.extend((0..cols).map(|i| dense_level(row, i, bits)));
        }
        q
    } else {
        if w.shape != [rows, cols] {
            return Err(tensor_err(
                w.path,
                wn,
                format!("shape {:?} is not [{rows}, {cols}]", w.shape),
            ));
        }
        let v = ints(wn, w, rows * cols)?;
        unsigned_levels(w, wn, "element", &v, bits)?
    };
    let (groups, mut group_of_col) = match scheme.group_size {
        Some(g) if scheme.act_order || gidx.is_some() => {
            // Groups in activation order: the number of groups is still cols / g.
            let groups = cols.div_ceil(g);
            (groups, Vec::new())
        }
        _ => groups_for(w.path, wn, scheme, cols)?,
    };
    if let Some((gn, g)) = gidx {
        group_of_col = read_g_idx(gn, g, cols, groups)?;
    } else if group_of_col.is_empty() {
        return Err(tensor_err(
            w.path,
            wn,
            "act-order layer without weight_g_idx",
        ));
    }
    // Scales: [rows, groups]; a tensor strategy stores one.
    let scales = if scale.shape.iter().product::<usize>() == 1 && groups == 1 {
        vec![floats(sn, scale, 1)?[0]; rows]
    } else {
        check_scale_shape(sn, scale, &[rows, groups])?;
        floats(sn, scale, rows * groups)?
    };
    let zero: Vec<u8> = match (scheme.symmetric, zp) {
        (true, _) => vec![mid as u8; rows * groups],
        (false, None) => {
            return Err(tensor_err(
                scale.path,
                sn,
                "asymmetric scheme but no weight_zero_point",
            ))
        }
        (false, Some((zn, z))) => {
            let signed: Vec<i64> = if z.dtype == StoredDType::I32 && packed {
                // Packed along the output dimension: [ceil(rows·bits/32), groups].
                let per_col = (rows * bits as usize).div_ceil(32);
                if z.shape != [per_col, groups] {
                    return Err(tensor_err(
                        z.path,
                        zn,
                        format!(
                            "shape {:?} is not the packed [{per_col}, {groups}]",
                            z.shape
                        ),
                    ));
                }
                let ws = words(zn, z, per_col * groups)?;
                // Column g of the packed matrix holds the zeros of group g for every row.
                let mut out = vec![0i64; rows * groups];
                let mut col = vec![0u32; per_col];
                for g in 0..groups {
                    for (k, c) in col.iter_mut().enumerate() {
                        *c = ws[k * groups + g];
                    }
                    for r in 0..rows {
                        out[r * groups + g] = i64::from(dense_level(&col, r, bits)) - mid;
                    }
                }
                out
            } else if z.shape.iter().product::<usize>() == 1 && groups == 1 {
                vec![ints(zn, z, 1)?[0]; rows]
            } else {
                check_scale_shape(zn, z, &[rows, groups])?;
                ints(zn, z, rows * groups)?
            };
            unsigned_levels(z, zn, "zero point", &signed, bits)?
        }
    };
    Ok(IntLinear {
        rows,
        cols,
        bits,
        groups,
        q,
        scale: scales,
        zero,
        group_of_col,
    })
}

/// The two dimensions of a GPTQ/AWQ `qweight`, once it and its scales are known to be 2-D.
fn matrix_dims((qn, qw): (&str, &Stored), sc: &Stored) -> Result<[usize; 2]> {
    match (qw.shape, sc.shape.len()) {
        (&[a, b], 2) => Ok([a, b]),
        _ => Err(tensor_err(
            qw.path,
            qn,
            format!("shape {:?} (scales {:?}) is not 2-D", qw.shape, sc.shape),
        )),
    }
}

/// The parts GPTQ and AWQ layers share, checked against each other before anything is
/// sized by them: the packed weight words (`qweight`, `n` words), the packed zeros
/// (`qzeros` [groups, `zpacked`]), and the scales [groups, `rows`], the group count agreeing
/// with the scheme's group size over `cols` columns.
fn packed_parts(
    scheme: &IntScheme,
    (qn, qw, n): (&str, &Stored, usize),
    (zn, qz, zpacked): (&str, &Stored, usize),
    (sn, sc): (&str, &Stored),
    rows: usize,
    cols: usize,
) -> Result<PackedParts> {
    let groups = sc.shape[0];
    if sc.shape[1] != rows {
        return Err(tensor_err(
            sc.path,
            sn,
            format!(
                "shape {:?} does not match qweight {:?} ({rows} outputs)",
                sc.shape, qw.shape
            ),
        ));
    }
    let want = scheme.group_size.map_or(1, |g| cols.div_ceil(g));
    if groups != want {
        return Err(tensor_err(
            sc.path,
            sn,
            format!(
                "{groups} groups, but {cols} columns at {} make {want}",
                scheme
                    .group_size
                    .map_or("one scale per channel".to_string(), |g| format!(
                        "group_size {g}"
                    ))
            ),
        ));
    }
    if qz.shape != [groups, zpacked] {
        return Err(tensor_err(
            qz.path,
            zn,
            format!("shape {:?} is not [{groups}, {zpacked}]", qz.shape),
        ));
    }
    Ok(PackedParts {
        weights: words(qn, qw, n)?,
        zeros: words(zn, qz, groups * zpacked)?,
        scales: floats(sn, sc, groups * rows)?,
        groups,
    })
}

/// What [`packed_parts`] read: packed weight and zero words, scales [groups, rows].
struct PackedParts {
    weights: Vec<u32>,
    zeros: Vec<u32>,
    scales: Vec<f32>,
    groups: usize,
}

/// A GPTQ (AutoGPTQ / GPTQModel) layer: `qweight` [in·bits/32, out] packed along the input,
/// `qzeros` [groups, out·bits/32] packed along the output, `scales` [groups, out], `g_idx` [in].
fn gptq_layer(
    scheme: &IntScheme,
    (qn, qw): (&str, &Stored),
    (zn, qz): (&str, &Stored),
    (sn, sc): (&str, &Stored),
    g_idx: Option<(&str, &Stored)>,
    zero_minus_one: bool,
) -> Result<IntLinear> {
    let bits = scheme.bits as usize;
    let per = 32 / bits;
    let [packed_in, rows] = matrix_dims((qn, qw), sc)?;
    let cols = packed_in * per;
    let zpacked = rows.div_ceil(per);
    let PackedParts {
        weights: ws,
        zeros: zs,
        scales: scales_t,
        groups,
    } = packed_parts(
        scheme,
        (qn, qw, packed_in * rows),
        (zn, qz, zpacked),
        (sn, sc),
        rows,
        cols,
    )?;
    let mask = (1u32 << bits) - 1;
    let mut q = vec![0u8; rows * cols];
    for pi in 0..packed_in {
        for r in 0..rows {
            let w = ws[pi * rows + r];
            for j in 0..per {
                q[r * cols + pi * per + j] = ((w >> (j * bits)) & mask) as u8;
            }
        }
    }
    let mut scale = vec![0f32; rows * groups];
    let mut zero = vec![0u8; rows * groups];
    for g in 0..groups {
        for r in 0..rows {
            scale[r * groups + g] = scales_t[g * rows + r];
            let z = (zs[g * zpacked + r / per] >> ((r % per) * bits)) & mask;
            // AutoGPTQ's v1 layout stores zero − 1 and its kernels add the 1 back, so a
            // stored 15 is a zero of 16 there; tandem computes what those kernels compute.
            let z = if zero_minus_one { z + 1 } else { z };
            zero[r * groups + g] = z as u8;
        }
    }
    let group_of_col = match g_idx {
        Some((gn, g)) => read_g_idx(gn, g, cols, groups)?,
        None => match scheme.group_size {
            Some(gs) => (0..cols).map(|c| (c / gs) as u32).collect(),
            None => vec![0; cols],
        },
    };
    Ok(IntLinear {
        rows,
        cols,
        bits: scheme.bits,
        groups,
        q,
        scale,
        zero,
        group_of_col,
    })
}

/// AutoAWQ's GEMM order of the eight 4-bit outputs inside a packed word: nibble i holds
/// output `AWQ_ORDER[i]` of its eight.
const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// An AWQ GEMM layer: `qweight` [in, out/8], `qzeros` [groups, out/8] (both packed along the
/// output in AWQ's order), `scales` [groups, out].
fn awq_layer(
    scheme: &IntScheme,
    (qn, qw): (&str, &Stored),
    (zn, qz): (&str, &Stored),
    (sn, sc): (&str, &Stored),
) -> Result<IntLinear> {
    let [cols, packed_out] = matrix_dims((qn, qw), sc)?;
    let rows = packed_out * 8;
    let gs = scheme.group_size.unwrap_or(cols);
    let PackedParts {
        weights: ws,
        zeros: zs,
        scales: scales_t,
        groups,
    } = packed_parts(
        scheme,
        (qn, qw, cols * packed_out),
        (zn, qz, packed_out),
        (sn, sc),
        rows,
        cols,
    )?;
    let mut q = vec![0u8; rows * cols];
    for c in 0..cols {
        for k in 0..packed_out {
            let w = ws[c * packed_out + k];
            for (i, &o) in AWQ_ORDER.iter().enumerate() {
                q[(k * 8 + o) * cols + c] = ((w >> (4 * i)) & 15) as u8;
            }
        }
    }
    let mut scale = vec![0f32; rows * groups];
    let mut zero = vec![8u8; rows * groups];
    for g in 0..groups {
        for k in 0..packed_out {
            let w = zs[g * packed_out + k];
            for (i, &o) in AWQ_ORDER.iter().enumerate() {
                let r = k * 8 + o;
                scale[r * groups + g] = scales_t[g * rows + r];
                if !scheme.symmetric {
                    zero[r * groups + g] = ((w >> (4 * i)) & 15) as u8;
                }
            }
        }
    }
    Ok(IntLinear {
        rows,
        cols,
        bits: 4,
        groups,
        q,
        scale,
        zero,
        group_of_col: (0..cols).map(|c| (c / gs) as u32).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_packing_round_trips_at_every_width() {
        for bits in 2..=8u32 {
            let levels: Vec<u8> = (0..100)
                .map(|i| ((i * 7 + 3) % (1 << bits)) as u8)
                .collect();
            let packed: Vec<u32> = pack_levels(&levels, 1, levels.len(), bits as usize)
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            // Widths that do not divide 32 split a level across two words.
            let back: Vec<u8> = (0..levels.len())
                .map(|i| dense_level(&packed, i, bits))
                .collect();
            assert_eq!(back, levels, "bits {bits}");
        }
    }

    fn linear(bits: u32, rows: usize, cols: usize, groups: usize, sym: bool) -> IntLinear {
        let gs = cols / groups;
        IntLinear {
            rows,
            cols,
            bits,
            groups,
            q: (0..rows * cols)
                .map(|i| ((i * 5 + 1) % (1 << bits)) as u8)
                .collect(),
            // f16-exact scales, as every real checkpoint's f16 scales are.
            scale: (0..rows * groups)
                .map(|i| f16::from_f32(0.01 * (1 + i % 7) as f32).to_f32())
                .collect(),
            zero: (0..rows * groups)
                .map(|i| {
                    if sym {
                        1 << (bits - 1)
                    } else {
                        (i % (1 << bits)) as u8
                    }
                })
                .collect(),
            group_of_col: (0..cols).map(|c| (c / gs) as u32).collect(),
        }
    }

    fn ggml_values(dtype: WeightDType, bytes: &[u8], rows: usize, cols: usize) -> Vec<f32> {
        let WeightDType::Quant(t) = dtype else {
            panic!("not quantized")
        };
        candle_core::quantized::ggml_file::qtensor_from_ggml(
            t,
            bytes,
            vec![rows, cols],
            &candle_core::Device::Cpu,
        )
        .unwrap()
        .dequantize(&candle_core::Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
    }

    #[test]
    fn symmetric_4_and_8_bit_become_q4_0_and_q8_0_exactly() {
        for (bits, want) in [(4, GgmlDType::Q4_0), (8, GgmlDType::Q8_0)] {
            for groups in [1, 2, 4] {
                let l = linear(bits, 3, 128, groups, true);
                let (d, bytes, e) = l.to_ggml();
                assert_eq!(d, WeightDType::Quant(want));
                assert_eq!(e, Exactness::Exact);
                assert!(
                    ggml_values(d, &bytes, 3, 128) == l.dequantize(),
                    "{bits} bits, {groups} groups"
                );
            }
        }
    }

    #[test]
    fn asymmetric_4_bit_is_held_exactly() {
        // Offsets −z·s that are not f16 values: Q8_0 with the levels q − z.
        let l = linear(4, 3, 64, 2, false);
        let (d, bytes, e) = l.to_ggml();
        assert_eq!(
            (d, e),
            (WeightDType::Quant(GgmlDType::Q8_0), Exactness::Exact)
        );
        assert!(ggml_values(d, &bytes, 3, 64) == l.dequantize());
        // Offsets that are: Q4_1, exactly.
        let mut l = l;
        l.scale.iter_mut().for_each(|s| *s = 0.0625);
        let (d, bytes, e) = l.to_ggml();
        assert_eq!(
            (d, e),
            (WeightDType::Quant(GgmlDType::Q4_1), Exactness::Exact)
        );
        assert!(ggml_values(d, &bytes, 3, 64) == l.dequantize());
    }

    #[test]
    fn groups_that_cut_a_block_fall_back_to_exact_f32() {
        let mut l = linear(4, 2, 64, 2, true);
        l.group_of_col.swap(3, 40); // act-order: a column of block 0 in group 1
        let (d, bytes, e) = l.to_ggml();
        assert_eq!(d, WeightDType::F32);
        assert!(matches!(e, Exactness::Dequantized { .. }));
        let vals: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(vals, l.dequantize());
        assert_eq!(vals[3], (f32::from(l.q[3]) - 8.0) * l.scale[1]);
    }

    #[test]
    fn gptq_and_awq_layouts_unpack_to_the_same_layer() {
        // One layer, 16 outputs × 64 inputs, group 32, asymmetric.
        let l = linear(4, 16, 64, 2, false);
        let (rows, cols, groups) = (l.rows, l.cols, l.groups);
        let p = Path::new("m");
        let to_bytes = |w: &[u32]| -> Vec<u8> { w.iter().flat_map(|x| x.to_le_bytes()).collect() };
        let f16_bytes = |v: &[f32]| -> Vec<u8> {
            v.iter()
                .flat_map(|x| f16::from_f32(*x).to_le_bytes())
                .collect()
        };
        // Scales stored [groups, out].
        let mut st = vec![0f32; groups * rows];
        for g in 0..groups {
            for r in 0..rows {
                st[g * rows + r] = l.scale[r * groups + g];
            }
        }
        let scales = f16_bytes(&st);
        // GPTQ v1: qweight [in/8, out], zeros minus one packed along out.
        let mut qw = vec![0u32; cols / 8 * rows];
        for c in 0..cols {
            for r in 0..rows {
                qw[(c / 8) * rows + r] |= u32::from(l.q[r * cols + c]) << (4 * (c % 8));
            }
        }
        // v1 stores zero − 1 (a zero of 0 would wrap): keep zeros ≥ 1 for the test.
        let mut l = l;
        for z in l.zero.iter_mut() {
            *z = (*z).max(1);
        }
        let mut qz = vec![0u32; groups * rows / 8];
        for g in 0..groups {
            for r in 0..rows {
                let z = u32::from(l.zero[r * groups + g]) - 1;
                qz[g * rows / 8 + r / 8] |= z << (4 * (r % 8));
            }
        }
        let scheme = IntScheme {
            bits: 4,
            group_size: Some(32),
            symmetric: false,
            act_order: false,
        };
        let (qwb, qzb) = (to_bytes(&qw), to_bytes(&qz));
        let s_qw = Stored {
            dtype: StoredDType::I32,
            shape: &[cols / 8, rows],
            data: &qwb,
            path: p,
        };
        let s_qz = Stored {
            dtype: StoredDType::I32,
            shape: &[groups, rows / 8],
            data: &qzb,
            path: p,
        };
        let s_sc = Stored {
            dtype: StoredDType::F16,
            shape: &[groups, rows],
            data: &scales,
            path: p,
        };
        let g = gptq_layer(
            &scheme,
            ("qw", &s_qw),
            ("qz", &s_qz),
            ("sc", &s_sc),
            None,
            true,
        )
        .unwrap();
        assert!(g.dequantize() == l.dequantize(), "GPTQ layout");
        // AWQ: qweight [in, out/8] in AWQ order.
        let mut aw = vec![0u32; cols * rows / 8];
        for c in 0..cols {
            for k in 0..rows / 8 {
                for (i, &o) in AWQ_ORDER.iter().enumerate() {
                    aw[c * rows / 8 + k] |= u32::from(l.q[(k * 8 + o) * cols + c]) << (4 * i);
                }
            }
        }
        let mut az = vec![0u32; groups * rows / 8];
        for gi in 0..groups {
            for k in 0..rows / 8 {
                for (i, &o) in AWQ_ORDER.iter().enumerate() {
                    az[gi * rows / 8 + k] |=
                        u32::from(l.zero[(k * 8 + o) * groups + gi]) << (4 * i);
                }
            }
        }
        let (awb, azb) = (to_bytes(&aw), to_bytes(&az));
        let s_aw = Stored {
            dtype: StoredDType::I32,
            shape: &[cols, rows / 8],
            data: &awb,
            path: p,
        };
        let s_az = Stored {
            dtype: StoredDType::I32,
            shape: &[groups, rows / 8],
            data: &azb,
            path: p,
        };
        let a = awq_layer(&scheme, ("qw", &s_aw), ("qz", &s_az), ("sc", &s_sc)).unwrap();
        assert!(a.dequantize() == l.dequantize(), "AWQ layout");
    }

    #[test]
    fn g_idx_out_of_range_and_short_tensors_are_errors_naming_the_tensor() {
        let p = Path::new("m.safetensors");
        let g = [0i32, 1, 2, 9];
        let gb: Vec<u8> = g.iter().flat_map(|x| x.to_le_bytes()).collect();
        let t = Stored {
            dtype: StoredDType::I32,
            shape: &[4],
            data: &gb,
            path: p,
        };
        let e = read_g_idx("x.g_idx", &t, 4, 3).unwrap_err().to_string();
        assert!(
            e.contains("x.g_idx") && e.contains("column 3 names group 9"),
            "{e}"
        );
        let e = words("x.qweight", &t, 5).unwrap_err().to_string();
        assert!(e.contains("x.qweight") && e.contains("packed words"), "{e}");
    }

    #[test]
    fn config_errors_name_the_field() {
        let p = Path::new("config.json");
        let cfg = |q: &str| -> Value {
            serde_json::from_str(&format!("{{\"quantization_config\": {q}}}")).unwrap()
        };
        let e = QuantConfig::from_config_json(
            p,
            &cfg(r#"{"quant_method": "gptq", "bits": 3, "group_size": 128}"#),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("bits = 3 is not supported"), "{e}");
        let e = QuantConfig::from_config_json(p, &cfg(r#"{"quant_method": "gptq", "bits": 4}"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing field 'group_size'"), "{e}");
        let e = QuantConfig::from_config_json(p, &cfg(r#"{"quant_method": "bitsandbytes"}"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("'bitsandbytes' is not supported"), "{e}");
        let ct = r#"{"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "float", "symmetric": true, "strategy": "group", "group_size": 32}}}}"#;
        let e = QuantConfig::from_config_json(p, &cfg(ct))
            .unwrap_err()
            .to_string();
        assert!(e.contains("config_groups.g.weights.type = 'float'"), "{e}");
        assert!(QuantConfig::from_config_json(p, &serde_json::json!({}))
            .unwrap()
            .is_none());
    }
}
