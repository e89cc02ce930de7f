//! GGUF metadata llama.cpp expects: `general.*`, the architecture's hyperparameter keys, and
//! `tokenizer.ggml.*` rebuilt from a Hugging Face tokenizer.json (or copied from a GGUF source).

use crate::error::{Error, Result};
use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;
use std::collections::HashMap;
use tandem_model::gguf_keys as keys;
use tandem_model::{Checkpoint, Config};

/// llama.cpp token types (`llama_token_type`).
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

/// GGUF key/value pairs, in file order.
pub type Metadata = Vec<(String, Value)>;

/// `general.*` and hyperparameter keys for `config`.
pub fn model_metadata(config: &Config, name: &str, file_type: u32) -> Vec<(String, Value)> {
    let arch = config.architecture().gguf_name();
    let k = |s: &str| keys::arch_key(arch, s);
    let u32v = |x: usize| Value::U32(x as u32);
    let mut md = vec![
        (keys::ARCHITECTURE.into(), Value::String(arch.into())),
        (keys::NAME.into(), Value::String(name.into())),
        (keys::FILE_TYPE.into(), Value::U32(file_type)),
        (keys::QUANTIZATION_VERSION.into(), Value::U32(2)),
        (k(keys::arch::BLOCK_COUNT), u32v(config.num_hidden_layers)),
        (
            k(keys::arch::CONTEXT_LENGTH),
            u32v(config.max_position_embeddings),
        ),
        (k(keys::arch::EMBEDDING_LENGTH), u32v(config.hidden_size)),
        (
            k(keys::arch::FEED_FORWARD_LENGTH),
            u32v(config.intermediate_size),
        ),
        (k(keys::arch::HEAD_COUNT), u32v(config.num_attention_heads)),
        (k(keys::arch::HEAD_COUNT_KV), u32v(config.num_kv_heads())),
        (
            k(keys::arch::ROPE_FREQ_BASE),
            Value::F32(config.rope_theta as f32),
        ),
        (
            k(keys::arch::RMS_EPS),
            Value::F32(config.rms_norm_eps as f32),
        ),
        (k(keys::arch::VOCAB_SIZE), u32v(config.vocab_size)),
        (k(keys::arch::ROPE_DIMENSION_COUNT), u32v(config.head_dim())),
    ];
    if config.head_dim() * config.num_attention_heads != config.hidden_size {
        md.push((k(keys::arch::KEY_LENGTH), u32v(config.head_dim())));
        md.push((k(keys::arch::VALUE_LENGTH), u32v(config.head_dim())));
    }
    if let Some(s) = &config.rope_scaling {
        if s.rope_type == "linear" {
            md.push((
                k(keys::arch::ROPE_SCALING_TYPE),
                Value::String("linear".into()),
            ));
            md.push((
                k(keys::arch::ROPE_SCALING_FACTOR),
                Value::F32(s.factor.unwrap_or(1.0) as f32),
            ));
        }
    }
    md
}

/// llama.cpp's `general.file_type` (`llama_ftype`) for a scheme: the "main" type of the file.
pub fn file_type(scheme: crate::QuantType) -> u32 {
    use crate::QuantType::*;
    match scheme {
        F32 => 0,
        F16 => 1,
        Q4_0 => 2,
        Q4_1 => 3,
        Q8_0 => 7,
        Q5_0 => 8,
        Q5_1 => 9,
        Q2K => 10,
        Q3K => 12,
        Q4K => 15,
        Q5K => 17,
        Q6K => 18,
        BF16 => 32,
    }
}

/// The rope_freqs tensor llama.cpp reads for Llama 3.1-style scaling: per frequency, the
/// factor its inverse frequency is divided by.
pub fn rope_freqs(config: &Config) -> Option<Vec<f32>> {
    let s = config.rope_scaling.as_ref()?;
    if s.rope_type != "llama3" {
        return None;
    }
    let mut plain = config.clone();
    plain.rope_scaling = None;
    plain.rope_freq_factors = None;
    let base = plain.rope_inv_freq();
    let scaled = config.rope_inv_freq();
    Some(base.iter().zip(&scaled).map(|(b, s)| b / s).collect())
}

/// `tokenizer.ggml.*` for a checkpoint: copied from a GGUF source, or built from tokenizer.json.
pub fn tokenizer_metadata(ck: &Checkpoint) -> Result<(Metadata, Vec<String>)> {
    if let Some(md) = ck.store.gguf_metadata() {
        if md.contains_key(keys::tokenizer::MODEL) {
            let mut kv: Vec<(String, Value)> = md
                .iter()
                .filter(|(k, _)| k.starts_with(keys::tokenizer::PREFIX))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            kv.sort_by(|a, b| a.0.cmp(&b.0));
            return Ok((kv, vec![]));
        }
    }
    from_tokenizer_json(ck)
}

/// Builds llama.cpp's vocabulary keys from a Hugging Face tokenizer. Returns notes for the plan
/// (e.g. a pre-tokenizer llama.cpp has no name for).
fn from_tokenizer_json(ck: &Checkpoint) -> Result<(Metadata, Vec<String>)> {
    let tok = &ck.tokenizer;
    let path = ck.path.display().to_string();
    let bad = |msg: String| Error::Plan(format!("{path}: tokenizer: {msg}"));
    let j: Json = serde_json::from_str(&tok.json).map_err(|e| bad(e.to_string()))?;
    let model = j.get("model").ok_or_else(|| bad("no \"model\"".into()))?;
    if model.get("type").and_then(Json::as_str) != Some("BPE") {
        return Err(bad(format!(
            "model type {} is not supported for GGUF export (supported: BPE)",
            model.get("type").unwrap_or(&Json::Null)
        )));
    }
    let n = ck.config.vocab_size;
    let (tokens, special) = vocabulary(&j, model, n, &bad)?;
    let byte_fallback = model.get("byte_fallback").and_then(Json::as_bool) == Some(true);
    let unk = model.get("unk_token").and_then(Json::as_str);
    let mut notes = Vec::new();
    let padded = tokens.iter().filter(|t| t.is_none()).count();
    if padded > 0 {
        notes.push(format!(
            "vocabulary padded with {padded} unused tokens to the model's {n}"
        ));
    }
    let types = token_types(&tokens, &special, unk, byte_fallback);
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]")))
        .collect();
    let merges: Vec<String> = model
        .get("merges")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Json::String(s) => Some(s.clone()),
            Json::Array(p) => Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?)),
            _ => None,
        })
        .collect();
    let mut kv: Vec<(String, Value)> = Vec::new();
    let s = |x: &str| Value::String(x.to_string());
    if byte_fallback {
        kv.push((keys::tokenizer::MODEL.into(), s("llama")));
        kv.push((
            keys::tokenizer::SCORES.into(),
            Value::Array(merge_scores(&tokens, &merges)),
        ));
    } else {
        let pre = pre_tokenizer_name(j.get("pre_tokenizer").unwrap_or(&Json::Null));
        let pre = pre.unwrap_or_else(|| {
            notes.push(
                "pre-tokenizer not recognised; wrote tokenizer.ggml.pre = \"default\" (llama.cpp may split text differently)"
                    .into(),
            );
            "default"
        });
        kv.push((keys::tokenizer::MODEL.into(), s("gpt2")));
        kv.push((keys::tokenizer::PRE.into(), s(pre)));
        kv.push((
            keys::tokenizer::MERGES.into(),
            Value::Array(merges.iter().map(|m| s(m)).collect()),
        ));
    }
    kv.push((
        keys::tokenizer::TOKENS.into(),
        Value::Array(tokens.iter().map(|t| s(t)).collect()),
    ));
    kv.push((
        keys::tokenizer::TOKEN_TYPE.into(),
        Value::Array(types.into_iter().map(Value::I32).collect()),
    ));
    if let Some(b) = tok.bos_id {
        kv.push((keys::tokenizer::BOS_ID.into(), Value::U32(b)));
    }
    if let Some(&e) = tok.eos_ids.first() {
        kv.push((keys::tokenizer::EOS_ID.into(), Value::U32(e)));
    }
    if let Some(u) = unk.and_then(|u| tok.inner.token_to_id(u)) {
        kv.push((keys::tokenizer::UNKNOWN_ID.into(), Value::U32(u)));
    }
    kv.push((keys::tokenizer::ADD_BOS.into(), Value::Bool(tok.add_bos)));
    kv.push((keys::tokenizer::ADD_EOS.into(), Value::Bool(false)));
    // As llama.cpp's convert_hf_to_gguf.py does: llama.cpp's chat tools read it from here.
    if let Some(t) = &tok.chat_template {
        kv.push((
            keys::tokenizer::CHAT_TEMPLATE.into(),
            Value::String(t.clone()),
        ));
    }
    Ok((kv, notes))
}

/// tokenizer.json's added tokens by id: whether each is special.
type AddedTokens = HashMap<usize, bool>;

/// The model's `n` token strings by id (`None` where tokenizer.json has none: padding) from
/// the BPE vocabulary and `added_tokens`, and for each added token whether it is special.
fn vocabulary(
    j: &Json,
    model: &Json,
    n: usize,
    bad: &dyn Fn(String) -> Error,
) -> Result<(Vec<Option<String>>, AddedTokens)> {
    let vocab = model
        .get("vocab")
        .and_then(Json::as_object)
        .ok_or_else(|| bad("no vocab".into()))?;
    let mut tokens: Vec<Option<String>> = vec![None; n];
    let mut put = |id: u64, s: &str| -> Result<()> {
        let slot = tokens
            .get_mut(id as usize)
            .ok_or_else(|| bad(format!("token id {id} is outside the vocabulary ({n})")))?;
        *slot = Some(s.to_string());
        Ok(())
    };
    for (s, id) in vocab {
        put(
            id.as_u64().ok_or_else(|| bad(format!("bad id for {s}")))?,
            s,
        )?;
    }
    let mut special = HashMap::new();
    for a in j
        .get("added_tokens")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
    {
        let (Some(id), Some(content)) = (
            a.get("id").and_then(Json::as_u64),
            a.get("content").and_then(Json::as_str),
        ) else {
            continue;
        };
        put(id, content)?;
        special.insert(
            id as usize,
            a.get("special").and_then(Json::as_bool) == Some(true),
        );
    }
    Ok((tokens, special))
}

/// llama.cpp's token type per id: padding unused, added tokens control (special) or
/// user-defined, `<0xNN>` byte tokens of a byte-fallback vocabulary byte, the unknown token
/// unknown, the rest normal.
fn token_types(
    tokens: &[Option<String>],
    special: &AddedTokens,
    unk: Option<&str>,
    byte_fallback: bool,
) -> Vec<i32> {
    tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let Some(t) = t.as_deref() else {
                return UNUSED;
            };
            match special.get(&i) {
                Some(_) if Some(t) == unk => UNKNOWN,
                Some(true) => CONTROL,
                Some(false) => USER_DEFINED,
                None if byte_fallback && is_byte_token(t) => BYTE,
                None if Some(t) == unk => UNKNOWN,
                None => NORMAL,
            }
        })
        .collect()
}

/// SentencePiece-style scores for a byte-fallback vocabulary: llama.cpp's "llama" tokenizer
/// merges the adjacent pair whose result scores highest, so a token made by merge rank r
/// scores -r; tokens no merge makes score below every merge, in id order.
fn merge_scores(tokens: &[String], merges: &[String]) -> Vec<Value> {
    let ids: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut scores = vec![f32::NAN; tokens.len()];
    for (rank, m) in merges.iter().enumerate() {
        let merged: String = m.split(' ').collect();
        if let Some(&id) = ids.get(merged.as_str()) {
            if scores[id].is_nan() {
                scores[id] = -(rank as f32);
            }
        }
    }
    let floor = -(merges.len() as f32);
    scores
        .into_iter()
        .enumerate()
        .map(|(i, x)| Value::F32(if x.is_nan() { floor - i as f32 } else { x }))
        .collect()
}

fn is_byte_token(t: &str) -> bool {
    t.len() == 6 && t.starts_with("<0x") && t.ends_with('>')
}

/// The name llama.cpp gives a Hugging Face pre-tokenizer (`tokenizer.ggml.pre`), for the
/// layouts tandem's GGUF reader also understands.
fn pre_tokenizer_name(p: &Json) -> Option<&'static str> {
    let ty = p.get("type").and_then(Json::as_str)?;
    match ty {
        "ByteLevel" => Some("gpt-2"),
        "Sequence" => {
            let parts = p.get("pretokenizers")?.as_array()?;
            let types: Vec<&str> = parts
                .iter()
                .filter_map(|x| x.get("type").and_then(Json::as_str))
                .collect();
            match types.as_slice() {
                ["Digits", "ByteLevel"] => Some("smollm"),
                ["Split", "ByteLevel"] => {
                    let re = parts[0].pointer("/pattern/Regex").and_then(Json::as_str)?;
                    if re.contains(r"\p{N}{1,3}") {
                        Some("llama-bpe")
                    } else if re.contains(r"\p{N}|") {
                        Some("qwen2")
                    } else {
                        None
                    }
                }
                _ => None,
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_types_follow_llama_cpp() {
        let tokens: Vec<Option<String>> = ["<unk>", "<s>", "<0x41>", "he", "<tool>"]
            .iter()
            .map(|t| Some(t.to_string()))
            .chain([None])
            .collect();
        let special = HashMap::from([(0, true), (1, true), (4, false)]);
        let types = token_types(&tokens, &special, Some("<unk>"), true);
        assert_eq!(
            types,
            [UNKNOWN, CONTROL, BYTE, NORMAL, USER_DEFINED, UNUSED]
        );
        // Without byte fallback `<0x41>` is an ordinary token.
        assert_eq!(token_types(&tokens, &special, None, false)[2], NORMAL);
    }

    #[test]
    fn merge_scores_rank_merges_and_put_the_rest_below_them() {
        let tokens: Vec<String> = ["a", "b", "ab", "abb", "c"]
            .iter()
            .map(|t| t.to_string())
            .collect();
        let merges = ["a b", "ab b", "a b"].map(String::from);
        let scores: Vec<f32> = merge_scores(&tokens, &merges)
            .into_iter()
            .map(|v| match v {
                Value::F32(x) => x,
                other => panic!("{other:?}"),
            })
            .collect();
        // "ab" from rank 0 (its repeat at rank 2 ignored), "abb" from rank 1; the rest
        // below -3 in id order.
        assert_eq!(scores, [-3.0, -4.0, 0.0, -1.0, -7.0]);
    }
}
