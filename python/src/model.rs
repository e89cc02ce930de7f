//! `Model`: a loaded checkpoint with its tokenizer and chat template; generate, chat, score.

use crate::drafter::Drafter;
use crate::{compute, err, load_options, sampling};
use pyo3::prelude::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tandem_model::chat::{ChatTemplate, Message};
use tandem_model::generate::log_prob;
use tandem_model::{Checkpoint, Llama, Logits, Sampler, SamplingParams};
use tandem_speculate::session::{self, SpecConfig};
use tandem_speculate::SpecStats;

/// A prompt as text or as token ids.
#[derive(FromPyObject)]
pub(crate) enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// Messages as `[{"role": ..., "content": ...}]`, or one user message as a string.
#[derive(FromPyObject)]
pub(crate) enum Messages {
    One(String),
    Many(Vec<HashMap<String, String>>),
}

impl Messages {
    pub(crate) fn into_messages(self, system: Option<&str>) -> PyResult<Vec<Message>> {
        let mut out = Vec::new();
        if let Some(s) = system {
            out.push(Message::new("system", s));
        }
        match self {
            Messages::One(text) => out.push(Message::new("user", &text)),
            Messages::Many(list) => {
                for (i, m) in list.into_iter().enumerate() {
                    let (Some(role), Some(content)) = (m.get("role"), m.get("content")) else {
                        return Err(err(format!(
                            "message {i}: expected {{\"role\": ..., \"content\": ...}}"
                        )));
                    };
                    out.push(Message::new(role, content));
                }
            }
        }
        Ok(out)
    }
}

/// A loaded model: a Hugging Face folder (16-bit safetensors, or GPTQ / AWQ /
/// compressed-tensors) or a GGUF file, with its tokenizer and chat template.
#[pyclass(frozen, module = "tandem")]
pub(crate) struct Model {
    ck: Arc<Checkpoint>,
    model: Arc<Llama>,
}

impl Model {
    pub(crate) fn encode(&self, prompt: Prompt, add_bos: Option<bool>) -> PyResult<Vec<u32>> {
        match prompt {
            Prompt::Ids(ids) => {
                let vocab = self.ck.config.vocab_size;
                if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                    return Err(err(format!(
                        "token id {bad} is outside the vocabulary ({vocab} tokens)"
                    )));
                }
                Ok(ids)
            }
            Prompt::Text(text) => {
                let tok = &self.ck.tokenizer;
                tok.encode(&text, add_bos.unwrap_or(tok.add_bos))
                    .map_err(err)
            }
        }
    }

    pub(crate) fn template(&self, file: Option<&Path>) -> PyResult<ChatTemplate> {
        ChatTemplate::for_checkpoint(&self.ck, file).map_err(err)
    }

    /// Generates from `ids`, plainly or (with a drafter) speculatively; the new token ids.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run(
        &self,
        py: Python<'_>,
        ids: &[u32],
        max_tokens: usize,
        params: SamplingParams,
        drafter: Option<&mut Drafter>,
        config: Option<SpecConfig>,
    ) -> PyResult<(Vec<u32>, Option<SpecStats>)> {
        let eos = self.ck.tokenizer.eos_ids.clone();
        let model = &self.model;
        match drafter {
            None => compute(py, || {
                let mut cache = model.new_cache()?;
                let mut sampler = Sampler::new(params)?;
                tandem_model::generate::generate(
                    model,
                    &mut cache,
                    ids,
                    max_tokens,
                    &mut sampler,
                    &eos,
                    |_| Ok(()),
                )
                .map(|(out, _)| (out, None))
            })
            .map_err(err),
            Some(d) => {
                let mut source = d.take_source();
                let config = SpecConfig {
                    params,
                    ..config.unwrap_or_default()
                };
                let result = compute(py, || {
                    session::run(model, &mut source, &config, ids, max_tokens, &eos, |_| {
                        Ok(())
                    })
                    .map(|(out, st)| (out, Some(st)))
                });
                d.restore(source);
                result.map_err(err)
            }
        }
    }
}

#[pymethods]
impl Model {
    /// Opens `path` (a Hugging Face folder or a GGUF file); `tokenizer` replaces its
    /// tokenizer.json; `activations` is how they meet Q8_0/Q4_0 weights ("int8", fast, or
    /// "f32", exactly what the dequantized weights compute).
    #[new]
    #[pyo3(signature = (path, tokenizer=None, *, activations="int8"))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        tokenizer: Option<PathBuf>,
        activations: &str,
    ) -> PyResult<Self> {
        let load = load_options(activations)?;
        compute(py, || {
            let ck = Checkpoint::open(&path, tokenizer.as_deref())?;
            let model = ck.load_model(&load)?;
            Ok::<_, tandem_model::Error>(Model {
                ck: Arc::new(ck),
                model: Arc::new(model),
            })
        })
        .map_err(err)
    }

    #[getter]
    fn path(&self) -> String {
        self.ck.path.display().to_string()
    }
    #[getter]
    fn vocab_size(&self) -> usize {
        self.ck.config.vocab_size
    }
    #[getter]
    fn context_length(&self) -> usize {
        self.ck.config.context_length()
    }
    #[getter]
    fn bos_token_id(&self) -> Option<u32> {
        self.ck.tokenizer.bos_id
    }
    #[getter]
    fn eos_token_ids(&self) -> Vec<u32> {
        self.ck.tokenizer.eos_ids.clone()
    }
    /// Whether encoding text prepends BOS by default (the tokenizer's own setting).
    #[getter]
    fn add_bos(&self) -> bool {
        self.ck.tokenizer.add_bos
    }
    /// The model's Jinja chat template, when it ships one.
    #[getter]
    fn chat_template(&self) -> Option<String> {
        self.ck.tokenizer.chat_template.clone()
    }

    /// Token ids of `text` (BOS as the tokenizer configures it, unless `add_bos` says).
    #[pyo3(signature = (text, add_bos=None))]
    fn tokenize(&self, text: String, add_bos: Option<bool>) -> PyResult<Vec<u32>> {
        self.encode(Prompt::Text(text), add_bos)
    }

    /// The text of `ids` (special tokens skipped).
    fn detokenize(&self, ids: Vec<u32>) -> PyResult<String> {
        self.ck.tokenizer.decode(&ids).map_err(err)
    }

    /// Continues `prompt` (text, or token ids) and returns the new text. Greedy at
    /// temperature 0; with `draft` (a `Drafter`), decoded speculatively: the same output
    /// when greedy, the same distribution when sampling.
    #[pyo3(signature = (prompt, max_tokens=128, temperature=0.0, top_k=0, top_p=1.0, seed=0, draft=None, add_bos=None))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        prompt: Prompt,
        max_tokens: usize,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        seed: u64,
        draft: Option<PyRefMut<'_, Drafter>>,
        add_bos: Option<bool>,
    ) -> PyResult<String> {
        // Encoded once here: the text is decoded as the continuation of its last token.
        let ids = self.encode(prompt, add_bos)?;
        let last = ids.last().copied();
        let out = self.generate_tokens(
            py,
            Prompt::Ids(ids),
            max_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            draft,
            add_bos,
        )?;
        self.continuation_text(last, &out)
    }

    /// As `generate`, returning the new token ids.
    #[pyo3(signature = (prompt, max_tokens=128, temperature=0.0, top_k=0, top_p=1.0, seed=0, draft=None, add_bos=None))]
    #[allow(clippy::too_many_arguments)]
    fn generate_tokens(
        &self,
        py: Python<'_>,
        prompt: Prompt,
        max_tokens: usize,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        seed: u64,
        draft: Option<PyRefMut<'_, Drafter>>,
        add_bos: Option<bool>,
    ) -> PyResult<Vec<u32>> {
        let params = sampling(temperature, top_k, top_p, seed)?;
        let ids = self.encode(prompt, add_bos)?;
        let mut draft = draft;
        self.check_drafter(draft.as_deref())?;
        Ok(self
            .run(py, &ids, max_tokens, params, draft.as_deref_mut(), None)?
            .0)
    }

    /// `messages` (a list of `{"role", "content"}` dicts, or one user message) rendered with
    /// the model's chat template (or the Jinja file `template`), answered.
    #[pyo3(signature = (messages, system=None, max_tokens=512, temperature=0.0, top_k=0, top_p=1.0, seed=0, draft=None, template=None))]
    #[allow(clippy::too_many_arguments)]
    fn chat(
        &self,
        py: Python<'_>,
        messages: Messages,
        system: Option<String>,
        max_tokens: usize,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        seed: u64,
        draft: Option<PyRefMut<'_, Drafter>>,
        template: Option<PathBuf>,
    ) -> PyResult<String> {
        let text = self.apply_chat_template(messages, system, true, template)?;
        // The template writes any BOS itself.
        self.generate(
            py,
            Prompt::Text(text),
            max_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            draft,
            Some(false),
        )
    }

    /// The prompt text the chat template makes of `messages` (what `chat` encodes).
    #[pyo3(signature = (messages, system=None, add_generation_prompt=true, template=None))]
    fn apply_chat_template(
        &self,
        messages: Messages,
        system: Option<String>,
        add_generation_prompt: bool,
        template: Option<PathBuf>,
    ) -> PyResult<String> {
        let t = self.template(template.as_deref())?;
        let m = messages.into_messages(system.as_deref())?;
        t.render(&m, add_generation_prompt).map_err(err)
    }

    /// The log-probability of each token of `text` (or token ids) given the ones before it:
    /// one value per token after the first.
    #[pyo3(signature = (text, add_bos=None))]
    fn score(&self, py: Python<'_>, text: Prompt, add_bos: Option<bool>) -> PyResult<Vec<f32>> {
        let ids = self.encode(text, add_bos)?;
        let model = &self.model;
        compute(py, || {
            if ids.len() < 2 {
                return Ok(Vec::new());
            }
            let mut cache = model.new_cache()?;
            let logits = model.forward(&ids[..ids.len() - 1], &mut cache, Logits::All)?;
            Ok::<_, tandem_model::Error>(
                logits
                    .rows()
                    .zip(&ids[1..])
                    .map(|(row, &t)| log_prob(row, t))
                    .collect(),
            )
        })
        .map_err(err)
    }

    /// The logits of the next token after `tokens` (one row of `vocab_size` floats).
    fn next_logits(&self, py: Python<'_>, tokens: Vec<u32>) -> PyResult<Vec<f32>> {
        let ids = self.encode(Prompt::Ids(tokens), None)?;
        if ids.is_empty() {
            return Err(err("no tokens"));
        }
        let model = &self.model;
        compute(py, || {
            let mut cache = model.new_cache()?;
            Ok::<_, tandem_model::Error>(model.forward(&ids, &mut cache, Logits::Last)?.into_last())
        })
        .map_err(err)
    }

    fn __repr__(&self) -> String {
        format!(
            "Model('{}', {} layers, vocabulary {})",
            self.ck.path.display(),
            self.ck.config.num_hidden_layers,
            self.ck.config.vocab_size
        )
    }
}

impl Model {
    /// The text of `ids` as it continues a prompt ending in `last` (a word-initial token
    /// keeps its space, as the CLI prints it).
    pub(crate) fn continuation_text(&self, last: Option<u32>, ids: &[u32]) -> PyResult<String> {
        let mut stream =
            tandem_model::tokenizer::TextStream::with_context(&self.ck.tokenizer, last);
        let mut text = String::new();
        for &id in ids {
            if let Some(piece) = stream.push(id).map_err(err)? {
                text.push_str(&piece);
            }
        }
        if let Some(piece) = stream.finish().map_err(err)? {
            text.push_str(&piece);
        }
        Ok(text)
    }

    pub(crate) fn check_drafter(&self, d: Option<&Drafter>) -> PyResult<()> {
        if let Some(v) = d.and_then(Drafter::vocab) {
            if v != self.ck.config.vocab_size {
                return Err(err(format!(
                    "the drafter's vocabulary ({v} tokens) is not the model's ({}): they must share a tokenizer",
                    self.ck.config.vocab_size
                )));
            }
        }
        Ok(())
    }
}
