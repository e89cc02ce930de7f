//! Tokenizers: Hugging Face `tokenizer.json`, or one rebuilt from GGUF metadata (byte-level BPE
//! "gpt2" and SentencePiece "llama" vocabularies), plus the BOS policy and a streaming decoder
//! that only emits complete UTF-8.

use crate::error::{format_err, io_err, Result};
use crate::gguf_keys as keys;
use candle_core::quantized::gguf_file::Value;
use serde_json::{json, Value as Json};
use std::collections::HashMap;
use std::path::Path;

pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
    pub bos_id: Option<u32>,
    pub eos_ids: Vec<u32>,
    /// Whether the tokenizer's own configuration prepends BOS.
    pub add_bos: bool,
    /// The tokenizer.json text (written out by `tandem convert`).
    pub json: String,
    /// The model's Jinja chat template, when it ships one (see [`crate::chat`]).
    pub chat_template: Option<String>,
}

impl Tokenizer {
    /// Loads `tokenizer.json`; BOS policy from `tokenizer_config.json` (`add_bos_token`) when
    /// present, else from the post-processor's template.
    pub fn from_hf_files(tokenizer_json: &Path, tokenizer_config: Option<&Path>) -> Result<Self> {
        let json = crate::files::read_text_capped(tokenizer_json, crate::files::TOKENIZER_CAP)
            .map_err(|e| io_err(tokenizer_json, e))?;
        let cfg: Option<Json> = match tokenizer_config {
            Some(p) if p.exists() => {
                let t = crate::files::read_text_capped(p, crate::files::CONFIG_CAP)
                    .map_err(|e| io_err(p, e))?;
                Some(
                    serde_json::from_str(&t)
                        .map_err(|e| format_err(p, format!("invalid JSON: {e}")))?,
                )
            }
            _ => None,
        };
        let mut tok = Self::from_json(tokenizer_json, json, cfg.as_ref())?;
        // transformers ≥ 4.43 may keep the template in its own file beside the config.
        if tok.chat_template.is_none() {
            if let Some(dir) = tokenizer_config.and_then(Path::parent) {
                let f = dir.join("chat_template.jinja");
                if f.is_file() {
                    tok.chat_template = Some(
                        crate::files::read_text_capped(&f, crate::files::CONFIG_CAP)
                            .map_err(|e| io_err(&f, e))?,
                    );
                }
            }
        }
        Ok(tok)
    }

    pub fn from_json(path: &Path, json: String, cfg: Option<&Json>) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(json.as_bytes())
            .map_err(|e| format_err(path, format!("invalid tokenizer: {e}")))?;
        let parsed: Json = serde_json::from_str(&json)
            .map_err(|e| format_err(path, format!("invalid JSON: {e}")))?;
        let token_id = |v: Option<&Json>| -> Option<u32> {
            let content = match v? {
                Json::String(s) => s.clone(),
                Json::Object(o) => o.get("content")?.as_str()?.to_string(),
                _ => return None,
            };
            inner.token_to_id(&content)
        };
        // BOS from the post-processor template, if it has one.
        let template_bos = parsed
            .pointer("/post_processor/single/0/SpecialToken/id")
            .and_then(|v| v.as_str())
            .and_then(|s| inner.token_to_id(s));
        let cfg_bos = cfg.and_then(|c| token_id(c.get("bos_token")));
        let add_bos = match cfg
            .and_then(|c| c.get("add_bos_token"))
            .and_then(|v| v.as_bool())
        {
            Some(b) => b,
            None => template_bos.is_some(),
        };
        let eos_ids = cfg
            .and_then(|c| token_id(c.get("eos_token")))
            .into_iter()
            .collect();
        // The post-processor would add BOS itself; tandem always encodes without special
        // tokens and prepends BOS by policy, so that `--bos/--no-bos` can override it.
        Ok(Tokenizer {
            inner,
            bos_id: cfg_bos.or(template_bos),
            eos_ids,
            add_bos,
            json,
            chat_template: cfg.and_then(crate::chat::template_from_config),
        })
    }

    /// The text of a special token (for a chat template's `bos_token` / `eos_token`).
    pub fn special_text(&self, id: Option<u32>) -> String {
        id.and_then(|i| self.id_to_token(i)).unwrap_or_default()
    }

    /// Rebuilds a tokenizer from a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(path: &Path, md: &HashMap<String, Value>) -> Result<Self> {
        let get_str = |k: &str| md.get(k).and_then(|v| v.to_string().ok()).cloned();
        let get_u32 = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
        let model = get_str(keys::tokenizer::MODEL).ok_or_else(|| {
            format_err(
                path,
                "no tokenizer.ggml.model in metadata; pass --tokenizer tokenizer.json",
            )
        })?;
        let tokens = string_array(path, md, keys::tokenizer::TOKENS)?;
        let types: Vec<i64> = match md.get(keys::tokenizer::TOKEN_TYPE) {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.to_i32().map(|x| x as i64).unwrap_or(1))
                .collect(),
            _ => vec![1; tokens.len()],
        };
        let bos_id = get_u32(keys::tokenizer::BOS_ID);
        let eos_id = get_u32(keys::tokenizer::EOS_ID);
        let add_bos_key = md
            .get(keys::tokenizer::ADD_BOS)
            .and_then(|v| v.to_bool().ok());
        let (json, default_add_bos) = match model.as_str() {
            "gpt2" => {
                let merges = string_array(path, md, keys::tokenizer::MERGES)?;
                let pre = get_str(keys::tokenizer::PRE).unwrap_or_else(|| "default".into());
                (gpt2_json(path, &tokens, &types, &merges, &pre)?, false)
            }
            "llama" => {
                let scores: Vec<f32> = match md.get(keys::tokenizer::SCORES) {
                    Some(Value::Array(a)) => a.iter().map(|v| v.to_f32().unwrap_or(0.0)).collect(),
                    _ => return Err(format_err(path, "SentencePiece vocabulary without tokenizer.ggml.scores")),
                };
                (spm_json(&tokens, &types, &scores), true)
            }
            other => {
                return Err(format_err(
                    path,
                    format!("unsupported tokenizer model '{other}' (supported: gpt2, llama); pass --tokenizer tokenizer.json"),
                ))
            }
        };
        let json = serde_json::to_string(&json).map_err(|e| format_err(path, e.to_string()))?;
        let mut t = Self::from_json(path, json, None)?;
        t.bos_id = bos_id;
        t.eos_ids = eos_id.into_iter().collect();
        t.add_bos = add_bos_key.unwrap_or(default_add_bos);
        t.chat_template = get_str(keys::tokenizer::CHAT_TEMPLATE);
        Ok(t)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encodes text without special tokens, then prepends BOS when `bos` asks for it.
    pub fn encode(&self, text: &str, bos: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| crate::Error::Invalid(format!("tokenization failed: {e}")))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if bos {
            if let Some(b) = self.bos_id {
                ids.push(b);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| crate::Error::Invalid(format!("detokenization failed: {e}")))
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Where two vocabularies first disagree ("token 17 is 'a' here and 'b' there"), or `None`
    /// when every id names the same token in both (sizes alone say little: two tokenizers of
    /// 32000 tokens can number them differently).
    pub fn vocabulary_difference(&self, other: &Tokenizer) -> Option<String> {
        let (n, m) = (self.vocab_size(), other.vocab_size());
        if n != m {
            return Some(format!("{n} tokens here, {m} there"));
        }
        let show = |t: Option<String>| match t {
            Some(t) => format!("'{}'", crate::error::clean(&t, 40)),
            None => "missing".into(),
        };
        (0..n as u32).find_map(|id| {
            let (a, b) = (self.id_to_token(id), other.id_to_token(id));
            (a != b).then(|| format!("token {id} is {} here and {} there", show(a), show(b)))
        })
    }
}

fn string_array(path: &Path, md: &HashMap<String, Value>, key: &str) -> Result<Vec<String>> {
    match md.get(key) {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|_| format_err(path, format!("{key} holds a non-string")))
            })
            .collect(),
        _ => Err(format_err(
            path,
            format!("no {key} in metadata; pass --tokenizer tokenizer.json"),
        )),
    }
}

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_UNKNOWN: i64 = 2;
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

fn added_tokens(tokens: &[String], types: &[i64]) -> Vec<Json> {
    tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter(|(_, (_, t))| matches!(**t, TOKEN_CONTROL | TOKEN_USER_DEFINED | TOKEN_UNKNOWN))
        .map(|(i, (s, t))| {
            json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": *t != TOKEN_USER_DEFINED})
        })
        .collect()
}

/// Pre-tokenizer regexes llama.cpp selects by `tokenizer.ggml.pre`.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn gpt2_json(
    path: &Path,
    tokens: &[String],
    types: &[i64],
    merges: &[String],
    pre: &str,
) -> Result<Json> {
    let vocab: serde_json::Map<String, Json> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let byte_level = |regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": regex});
    let pre_tokenizer = match pre {
        "default" | "gpt-2" | "gpt2" => byte_level(true),
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama-bpe" | "llama3" | "smaug-bpe" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": false},
            byte_level(false)]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_REGEX}, "behavior": "Isolated", "invert": false},
            byte_level(false)]}),
        other => {
            return Err(format_err(
                path,
                format!("unsupported pre-tokenizer '{other}' (supported: default, gpt2, smollm, starcoder, llama-bpe, qwen2); pass --tokenizer tokenizer.json"),
            ))
        }
    };
    Ok(json!({
        "version": "1.0",
        "added_tokens": added_tokens(tokens, types),
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": merges}
    }))
}

/// A SentencePiece BPE vocabulary as a Hugging Face BPE tokenizer. SentencePiece merges the
/// adjacent pair whose result has the highest score; BPE merges by rank. So every way to split
/// a vocabulary piece into two pieces becomes a merge, ranked by the merged piece's score
/// (the same derivation as Hugging Face's SentencePiece converter).
fn spm_json(tokens: &[String], types: &[i64], scores: &[f32]) -> Json {
    let ids: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let normal = |i: usize| types.get(i).copied().unwrap_or(1) == 1;
    let mut merges: Vec<(f32, usize, usize, usize)> = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        if !normal(i) || t.chars().count() < 2 {
            continue;
        }
        for (p, _) in t.char_indices().skip(1) {
            let (a, b) = t.split_at(p);
            if let (Some(&ia), Some(&ib)) = (ids.get(a), ids.get(b)) {
                if normal(ia) && normal(ib) {
                    merges.push((scores.get(i).copied().unwrap_or(0.0), ia, ib, i));
                }
            }
        }
    }
    merges.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    let merges: Vec<Json> = merges
        .iter()
        .map(|m| json!([tokens[m.1], tokens[m.2]]))
        .collect();
    let vocab: serde_json::Map<String, Json> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let unk = types
        .iter()
        .position(|t| *t == TOKEN_UNKNOWN)
        .map(|i| tokens[i].clone());
    json!({
        "version": "1.0",
        "added_tokens": added_tokens(tokens, types),
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u{2581}"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}]},
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                  "ignore_merges": false, "vocab": vocab, "merges": merges}
    })
}

/// Turns a stream of token ids into text pieces that are always complete UTF-8: a piece is
/// emitted only once the bytes decoded so far no longer end in a partial character.
pub struct TextStream<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    prev: usize,
    cur: usize,
}

impl<'a> TextStream<'a> {
    pub fn new(tok: &'a Tokenizer) -> Self {
        TextStream {
            tok,
            ids: Vec::new(),
            prev: 0,
            cur: 0,
        }
    }

    /// Starts after a context token (the prompt's last), so the first generated piece keeps
    /// its leading space where the decoder would strip it at the start of a text.
    pub fn with_context(tok: &'a Tokenizer, last: Option<u32>) -> Self {
        let ids: Vec<u32> = last.into_iter().collect();
        let n = ids.len();
        TextStream {
            tok,
            ids,
            prev: 0,
            cur: n,
        }
    }

    /// Adds a token; returns newly completed text, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        let before = self.tok.decode(&self.ids[self.prev..self.cur])?;
        self.ids.push(id);
        let now = self.tok.decode(&self.ids[self.prev..])?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') {
            let piece = now.get(before.len()..).unwrap_or("").to_string();
            self.prev = self.cur;
            self.cur = self.ids.len();
            Ok(Some(piece))
        } else {
            Ok(None)
        }
    }

    /// Whatever is still held back at the end of generation.
    pub fn finish(&mut self) -> Result<Option<String>> {
        let before = self.tok.decode(&self.ids[self.prev..self.cur])?;
        let now = self.tok.decode(&self.ids[self.prev..])?;
        self.prev = self.ids.len();
        self.cur = self.ids.len();
        Ok(now
            .get(before.len()..)
            .filter(|s| !s.is_empty())
            .map(str::to_string))
    }
}
