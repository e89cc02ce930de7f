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
//!
//! `config` checks a config.json's `quantization_config` ([`QuantConfig`]); `layout` unpacks
//! each format's tensors into an [`IntLinear`]; this file holds that form, its GGML blocks and
//! [`import`], which walks a checkpoint's tensors through both.

use crate::error::{format_err, tensor_err, Result};
use crate::weights::WeightDType;
use candle_core::quantized::GgmlDType;
use half::f16;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod config;
mod layout;

pub use config::QuantConfig;
pub use layout::pack_levels;
use layout::{awq_layer, ct_layer, gptq_layer, read_shape};

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
        let module = Module {
            name: module,
            lookup,
            main_path,
        };
        let layer = match cfg.format {
            PackedFormat::CompressedTensors => {
                compressed_tensors_layer(cfg, &module, name.ends_with(".weight_packed"))?
            }
            PackedFormat::Gptq | PackedFormat::Awq => gptq_or_awq_layer(cfg, &module)?,
        };
        let (dtype, bytes, exactness) = layer.linear.to_ggml();
        out.push(ImportedTensor {
            name: format!("{}.weight", module.name),
            dtype,
            shape: vec![layer.linear.rows, layer.linear.cols],
            bytes,
            exactness,
            scheme: layer.scheme,
            parts: layer.parts,
            file: layer.file,
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

/// A quantized module (`model.layers.0.mlp.down_proj`) whose stored parts are looked up by
/// suffix.
struct Module<'l, 'a> {
    name: &'l str,
    lookup: &'l dyn Fn(&str) -> Option<Stored<'a>>,
    main_path: &'l Path,
}

impl<'a> Module<'_, 'a> {
    /// The part `suffix`, or an error naming it as missing.
    fn need(&self, suffix: &str) -> Result<(String, Stored<'a>)> {
        let n = format!("{}.{suffix}", self.name);
        let t = (self.lookup)(&n).ok_or_else(|| {
            tensor_err(self.main_path, &n, "missing: the quantized layer needs it")
        })?;
        Ok((n, t))
    }

    fn opt(&self, suffix: &str) -> Option<(String, Stored<'a>)> {
        let n = format!("{}.{suffix}", self.name);
        (self.lookup)(&n).map(|t| (n, t))
    }
}

/// One module unpacked: the layer, its scheme, the stored tensors it was made from and the
/// file of its packed weights.
struct UnpackedLayer {
    linear: IntLinear,
    scheme: IntScheme,
    parts: Vec<String>,
    file: PathBuf,
}

/// A compressed-tensors module: packed (`weight_packed` and `weight_shape`) or one int8 per
/// value (`weight`), with scales, zero points and a group index where stored.
fn compressed_tensors_layer(cfg: &QuantConfig, m: &Module, packed: bool) -> Result<UnpackedLayer> {
    let group = cfg.ct_group_for(m.main_path, m.name)?;
    let scheme = group.scheme.clone();
    let (sn, scale) = m.need("weight_scale")?;
    let zp = m.opt("weight_zero_point");
    let gidx = m.opt("weight_g_idx");
    let mut parts = vec![sn.clone()];
    let (wn, w) = m.need(if packed { "weight_packed" } else { "weight" })?;
    parts.push(wn.clone());
    let shape = if packed {
        let (shn, sh) = m.need("weight_shape")?;
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
    parts.extend(zp.iter().chain(&gidx).map(|(n, _)| n.clone()));
    let linear = ct_layer(
        &scheme,
        shape,
        (&wn, &w),
        (&sn, &scale),
        zp.as_ref().map(|(n, t)| (n.as_str(), t)),
        gidx.as_ref().map(|(n, t)| (n.as_str(), t)),
        packed,
    )?;
    Ok(UnpackedLayer {
        linear,
        scheme,
        parts,
        file: w.path.to_path_buf(),
    })
}

/// A GPTQ (with its group index where stored) or AWQ module: `qweight`, `qzeros`, `scales`.
fn gptq_or_awq_layer(cfg: &QuantConfig, m: &Module) -> Result<UnpackedLayer> {
    let scheme = cfg
        .scheme
        .clone()
        .ok_or_else(|| format_err(m.main_path, "no scheme"))?;
    let (qn, qw) = m.need("qweight")?;
    let (zn, qz) = m.need("qzeros")?;
    let (sn, sc) = m.need("scales")?;
    let mut parts = vec![qn.clone(), zn.clone(), sn.clone()];
    let linear = if cfg.format == PackedFormat::Gptq {
        let g = m.opt("g_idx");
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
    Ok(UnpackedLayer {
        linear,
        scheme,
        parts,
        file: qw.path.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::layout::AWQ_ORDER;
    use super::*;

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
}
