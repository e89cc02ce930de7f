//! `quantization_config` of a config.json: which format, and how each layer was quantized.

use super::{IntScheme, PackedFormat};
use crate::error::{format_err, tensor_err, Error, Result};
use serde_json::Value;
use std::path::Path;

/// A compressed-tensors config group: which modules it covers and how.
#[derive(Debug, Clone)]
pub(super) struct CtGroup {
    name: String,
    targets: Vec<String>,
    pub(super) scheme: IntScheme,
    /// pack-quantized, int-quantized (naive-quantized is the same layout).
    format: String,
}

/// The `quantization_config` of a config.json, checked.
#[derive(Debug, Clone)]
pub struct QuantConfig {
    pub format: PackedFormat,
    pub(super) ct_groups: Vec<CtGroup>,
    ct_ignore: Vec<String>,
    /// GPTQ/AWQ: one scheme for every quantized layer.
    pub(super) scheme: Option<IntScheme>,
    /// GPTQ: zeros stored minus one (`checkpoint_format` "gptq", AutoGPTQ's v1 layout).
    pub(super) gptq_zero_minus_one: bool,
    /// Notes for the user (activation quantization ignored, ...).
    pub notes: Vec<String>,
}

fn field<'a>(path: &Path, obj: &'a Value, key: &str) -> Result<&'a Value> {
    obj.get(key)
        .ok_or_else(|| format_err(path, format!("quantization_config: missing field '{key}'")))
}

fn as_int(path: &Path, v: &Value, key: &str) -> Result<i64> {
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

/// Refuses a compressed-tensors config whose `key` (a feature tandem does not run, `what`)
/// is a non-empty object.
fn refuse_nonempty(path: &Path, q: &Value, key: &str, what: &str) -> Result<()> {
    match q.get(key).and_then(Value::as_object) {
        Some(o) if !o.is_empty() => Err(unsupported(
            path,
            format!("quantization_config: {key} ({what}) is not supported"),
        )),
        _ => Ok(()),
    }
}

/// One entry `name` of a compressed-tensors `config_groups`, checked: `None` for a group that
/// leaves weights unquantized. Activation quantization is noted in `notes` and not run.
fn ct_group(
    path: &Path,
    name: &str,
    g: &Value,
    top_format: &str,
    notes: &mut Vec<String>,
) -> Result<Option<CtGroup>> {
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
        return Ok(None);
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
        as_int(path, field(path, w, "num_bits")?, "num_bits")?,
        &ctx("weights.num_bits"),
        &[2, 3, 4, 5, 6, 7, 8],
    )?;
    let symmetric = as_bool(path, field(path, w, "symmetric")?, "symmetric")?;
    if w.get("dynamic").and_then(Value::as_bool) == Some(true) {
        return Err(unsupported(
            path,
            format!(
                "quantization_config: {} = true (weights quantized at run time) is not supported",
                ctx("weights.dynamic")
            ),
        ));
    }
    let group_size = ct_group_size(path, w, &ctx)?;
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
    Ok(Some(CtGroup {
        name: gname,
        targets,
        scheme: IntScheme {
            bits,
            group_size,
            symmetric,
            act_order,
        },
        format,
    }))
}

/// The columns per scale a group's `weights` say through their strategy: `None` for one
/// scale per row (`channel`) or per tensor (`tensor`: every row carries the same scale).
fn ct_group_size(path: &Path, w: &Value, ctx: &dyn Fn(&str) -> String) -> Result<Option<usize>> {
    match field(path, w, "strategy")?.as_str().unwrap_or("?") {
        "group" => {
            let g = as_int(path, field(path, w, "group_size")?, "group_size")?;
            match group_from(path, g, &ctx("weights.group_size"))? {
                Some(g) => Ok(Some(g)),
                None => Err(format_err(
                    path,
                    format!(
                        "quantization_config: {} is -1 with strategy 'group'",
                        ctx("weights.group_size")
                    ),
                )),
            }
        }
        "channel" | "tensor" => Ok(None),
        other => Err(unsupported(
            path,
            format!(
                "quantization_config: {} = '{}' is not supported (supported: group, channel, tensor)",
                ctx("weights.strategy"),
                crate::error::clean(other, 20)
            ),
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
        refuse_nonempty(path, q, "sparsity_config", "sparse compression")?;
        refuse_nonempty(path, q, "transform_config", "rotations")?;
        let groups = field(path, q, "config_groups")?
            .as_object()
            .ok_or_else(|| {
                format_err(path, "quantization_config: config_groups is not an object")
            })?;
        let mut ct_groups = Vec::new();
        for (name, g) in groups {
            if let Some(group) = ct_group(path, name, g, top_format, &mut notes)? {
                ct_groups.push(group);
            }
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
            as_int(path, field(path, q, "bits")?, "bits")?,
            "bits",
            &[2, 4, 8],
        )?;
        let group_size = group_from(
            path,
            as_int(path, field(path, q, "group_size")?, "group_size")?,
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
        let bits = check_bits(path, as_int(path, bits, "bits")?, "bits", &[4])?;
        let g = q
            .get("group_size")
            .or_else(|| q.get("q_group_size"))
            .ok_or_else(|| format_err(path, "quantization_config: missing field 'group_size'"))?;
        let group_size = group_from(path, as_int(path, g, "group_size")?, "group_size")?;
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
    pub(super) fn ct_group_for(&self, path: &Path, module: &str) -> Result<&CtGroup> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
