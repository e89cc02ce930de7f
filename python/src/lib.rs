//! tandem for Python: the library crates (not the CLI) behind a small API.
//!
//! `Model` (load, generate, chat, score), `quantize`, `evaluate`, `Drafter` (n-gram, a
//! self-draft, a draft model; `propose` / `accept`, what another engine's speculative loop
//! asks of a drafter) and `SpeculativeDecoder` (tandem's own loop). Every computation runs
//! with the interpreter lock released, inside one rayon pool (`set_threads`), so Python
//! threads keep running; errors are `tandem.TandemError` carrying tandem's one-line message.
//! The engine adapters (llama-cpp-python, transformers, vLLM) are Python modules over
//! `Drafter`, in `tandem/`.

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use tandem_model::chat::{ChatTemplate, Message};
use tandem_model::generate::log_prob;
use tandem_model::{Checkpoint, Llama, Logits, Sampler, SamplingParams};
use tandem_speculate::session::{self, DraftSource, Lookup, SpecConfig};
use tandem_speculate::{
    Drafter as _, ModelDrafter, NgramDrafter, OwnedModelVerifier, SpecStats, SuffixDrafter,
};

/// The system allocator with per-thread budgets, so that a model file's chat template renders
/// within a memory limit instead of aborting the interpreter (see
/// `tandem_model::memory_budget`).
#[global_allocator]
static ALLOCATOR: tandem_model::memory_budget::BudgetAllocator =
    tandem_model::memory_budget::BudgetAllocator;

create_exception!(
    _tandem,
    TandemError,
    PyException,
    "A tandem error: its message is tandem's one-line description (file, tensor, what is wrong)."
);

/// Any tandem error as a `TandemError` with its one-line text.
fn err(e: impl std::fmt::Display) -> PyErr {
    TandemError::new_err(e.to_string())
}

static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();

/// The pool every computation runs in (all cores unless `set_threads` came first). As in
/// the CLI, the calling thread's work runs on a worker: n threads on n cores.
fn pool() -> &'static rayon::ThreadPool {
    POOL.get_or_init(|| build_pool(None))
}

fn build_pool(threads: Option<usize>) -> rayon::ThreadPool {
    let n = threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .or_else(|_| rayon::ThreadPoolBuilder::new().num_threads(1).build())
        .expect("a one-thread pool can always be built")
}

/// Runs `f` without the interpreter lock, inside the pool.
fn compute<T: Send, F: FnOnce() -> T + Send>(py: Python<'_>, f: F) -> T {
    py.detach(|| pool().install(f))
}

/// Sets the number of CPU threads tandem computes with. Call it before anything else runs.
#[pyfunction]
fn set_threads(threads: usize) -> PyResult<()> {
    if threads == 0 {
        return Err(err("threads must be at least 1"));
    }
    let most = tandem_kernels::pool::MAX_THREADS;
    if threads > most {
        return Err(err(format!("threads {threads} is more than {most}")));
    }
    let mut set = false;
    POOL.get_or_init(|| {
        set = true;
        build_pool(Some(threads))
    });
    if !set && pool().current_num_threads() != threads {
        return Err(err(format!(
            "tandem already runs with {} threads: call set_threads before loading anything",
            pool().current_num_threads()
        )));
    }
    Ok(())
}

/// The number of CPU threads tandem computes with.
#[pyfunction]
fn threads() -> usize {
    pool().current_num_threads()
}

/// How this module loads a model: on the CPU, with the pool's thread count (so
/// `set_threads` governs the kernels too), activations as `activations` names them.
fn load_options(activations: &str) -> PyResult<tandem_model::LoadOptions> {
    use tandem_model::linear::ActivationPrecision;
    let activations = match activations {
        "int8" => ActivationPrecision::Int8,
        "f32" => ActivationPrecision::F32,
        other => {
            return Err(err(format!(
                "activations '{other}': expected 'int8' or 'f32'"
            )))
        }
    };
    Ok(tandem_model::LoadOptions {
        threads: Some(pool().current_num_threads()),
        activations,
        device: tandem_model::ComputeDevice::Cpu,
        ..Default::default()
    })
}

/// A progress bar on stderr when it is a terminal (or as `show` says).
fn progress_bar(show: Option<bool>) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !show.unwrap_or_else(|| std::io::stderr().is_terminal()) {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {eta} {wide_msg}")
    {
        bar.set_style(style);
    }
    bar
}

/// The sampling parameters, checked.
fn sampling(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> PyResult<SamplingParams> {
    let p = SamplingParams {
        temperature,
        top_k,
        top_p,
        seed,
    };
    Sampler::new(p).map_err(err)?;
    Ok(p)
}

/// A prompt as text or as token ids.
#[derive(FromPyObject)]
enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// Messages as `[{"role": ..., "content": ...}]`, or one user message as a string.
#[derive(FromPyObject)]
enum Messages {
    One(String),
    Many(Vec<HashMap<String, String>>),
}

impl Messages {
    fn into_messages(self, system: Option<&str>) -> PyResult<Vec<Message>> {
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
struct Model {
    ck: Arc<Checkpoint>,
    model: Arc<Llama>,
}

impl Model {
    fn encode(&self, prompt: Prompt, add_bos: Option<bool>) -> PyResult<Vec<u32>> {
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

    fn template(&self, file: Option<&Path>) -> PyResult<ChatTemplate> {
        ChatTemplate::for_checkpoint(&self.ck, file).map_err(err)
    }

    /// Generates from `ids`, plainly or (with a drafter) speculatively; the new token ids.
    #[allow(clippy::too_many_arguments)]
    fn run(
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
    fn continuation_text(&self, last: Option<u32>, ids: &[u32]) -> PyResult<String> {
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

    fn check_drafter(&self, d: Option<&Drafter>) -> PyResult<()> {
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

/// The lookup part of a `Drafter`.
enum LookupKind {
    None,
    Ngram(NgramDrafter),
    /// Its history persists for the drafter's life (across requests).
    Suffix(SuffixDrafter),
}

/// Proposes draft tokens: prompt lookup (`Drafter.ngram()`), suffix lookup over everything
/// the drafter has seen (`Drafter.suffix()`), the verifier quantized in memory
/// (`Drafter.self_draft(path, "q4_0")`), a smaller model (`Drafter.model(path)`), or a lookup
/// first and a model where it finds nothing (`Drafter.hybrid(lookup, model)`).
/// `propose(tokens, k)` returns up to k token ids to follow `tokens` (the whole context);
/// `accept(n)` says how many of the last proposal the verifier kept. A model draft keeps its
/// own KV cache of the context and reuses it from call to call.
#[pyclass(module = "tandem")]
struct Drafter {
    lookup: LookupKind,
    model: Option<Arc<Llama>>,
    /// The model draft `propose` keeps between calls (made on the first call).
    live: Option<Box<ModelDrafter<OwnedModelVerifier>>>,
    last_from_lookup: bool,
    label: String,
    /// Stop drafting below this top probability (model drafts).
    min_confidence: f32,
    proposed: u64,
    accepted: u64,
    /// What the draft-length controller of this drafter's earlier generations learned
    /// (`DraftSource::controller_memory`): the next generation starts from it.
    controller_memory: Option<tandem_speculate::ControllerMemory>,
}

impl Drafter {
    fn new(lookup: LookupKind, model: Option<Arc<Llama>>, label: String) -> Self {
        Drafter {
            lookup,
            model,
            live: None,
            last_from_lookup: false,
            label,
            min_confidence: 0.0,
            proposed: 0,
            accepted: 0,
            controller_memory: None,
        }
    }

    fn vocab(&self) -> Option<usize> {
        self.model.as_ref().map(|m| m.config.vocab_size)
    }

    /// The drafter as a draft source for one of tandem's own runs; its suffix history moves
    /// into the source and comes back through [`Drafter::restore`].
    fn take_source(&mut self) -> DraftSource {
        let lookup = match &mut self.lookup {
            LookupKind::None => Lookup::None,
            LookupKind::Ngram(_) => Lookup::Ngram,
            LookupKind::Suffix(d) => Lookup::Suffix(std::mem::take(d)),
        };
        DraftSource {
            lookup,
            model: self.model.clone(),
            skip_report: None,
            controller_memory: self.controller_memory,
        }
    }

    fn restore(&mut self, source: DraftSource) {
        self.controller_memory = source.controller_memory;
        if let (LookupKind::Suffix(mine), Lookup::Suffix(d)) = (&mut self.lookup, source.lookup) {
            *mine = d;
        }
    }

    /// A drafter over a model, its output head cut to the frequent (low) ids once, here,
    /// while nothing else holds the model (see `draft_shortlist`).
    fn over_model(mut m: Arc<Llama>, label: String) -> Self {
        if let Some(inner) = Arc::get_mut(&mut m) {
            if !inner.runs_on_gpu() {
                let ids = tandem_speculate::draft_shortlist(
                    &[],
                    inner.config.vocab_size,
                    tandem_speculate::DEFAULT_DRAFT_VOCAB,
                );
                // Only a GPU-resident model refuses a shortlist: then the head stays whole.
                let _ = inner.set_output_shortlist(ids.as_deref());
            }
        }
        Drafter::new(LookupKind::None, Some(m), label)
    }

    fn copy_lookup(&self) -> LookupKind {
        match &self.lookup {
            LookupKind::None => LookupKind::None,
            LookupKind::Ngram(d) => LookupKind::Ngram(NgramDrafter {
                max_ngram: d.max_ngram,
            }),
            LookupKind::Suffix(d) => LookupKind::Suffix(SuffixDrafter::new(d.max_ngram)),
        }
    }
}

#[pymethods]
impl Drafter {
    /// Prompt lookup: the tokens that followed the latest earlier occurrence of the
    /// context's last `max_ngram` (down to 1) tokens. No model.
    #[staticmethod]
    #[pyo3(signature = (max_ngram=3))]
    fn ngram(max_ngram: usize) -> PyResult<Self> {
        if max_ngram == 0 {
            return Err(err("max_ngram must be at least 1"));
        }
        Ok(Drafter::new(
            LookupKind::Ngram(NgramDrafter { max_ngram }),
            None,
            format!("ngram(max_ngram={max_ngram})"),
        ))
    }

    /// Suffix lookup: the longest earlier occurrence (up to `max_ngram` tokens) of the
    /// context's tail in this context or in any earlier one this drafter saw (a context
    /// that does not continue the previous one is a new request). No model.
    #[staticmethod]
    #[pyo3(signature = (max_ngram=8))]
    fn suffix(max_ngram: usize) -> PyResult<Self> {
        if max_ngram < 2 {
            return Err(err("max_ngram must be at least 2"));
        }
        Ok(Drafter::new(
            LookupKind::Suffix(SuffixDrafter::new(max_ngram)),
            None,
            format!("suffix(max_ngram={max_ngram})"),
        ))
    }

    /// `lookup` (an n-gram or suffix drafter) first, `model` (a model drafter) where it
    /// finds nothing.
    #[staticmethod]
    fn hybrid(lookup: PyRef<'_, Drafter>, model: PyRef<'_, Drafter>) -> PyResult<Self> {
        if matches!(lookup.lookup, LookupKind::None) || lookup.model.is_some() {
            return Err(err(
                "hybrid: `lookup` must be Drafter.ngram() or Drafter.suffix()",
            ));
        }
        let Some(m) = model.model.clone() else {
            return Err(err(
                "hybrid: `model` must be a model drafter (self_draft or model)",
            ));
        };
        let mut l = lookup.copy_lookup();
        if let LookupKind::Suffix(d) = &mut l {
            d.min_match = session::HYBRID_MIN_MATCH;
        }
        Ok(Drafter {
            min_confidence: model.min_confidence,
            ..Drafter::new(l, Some(m), format!("{} + {}", lookup.label, model.label))
        })
    }

    /// The verifier at `path` quantized in memory to `type` (MLP only, as `tandem quantize`
    /// does by default; `attention=True` quantizes attention too): a draft that shares the
    /// verifier's tokenizer by construction.
    #[staticmethod]
    #[pyo3(signature = (path, r#type="q4_0", attention=false, *, activations="int8"))]
    fn self_draft(
        py: Python<'_>,
        path: PathBuf,
        r#type: &str,
        attention: bool,
        activations: &str,
    ) -> PyResult<Self> {
        let t = tandem_quantize::QuantType::parse(r#type)
            .ok_or_else(|| err(format!("unknown type '{}'", r#type)))?;
        let load = load_options(activations)?;
        let source = compute(py, || {
            let ck = Checkpoint::open(&path, None).map_err(tandem_speculate::Error::from)?;
            DraftSource::self_draft(&ck, t, attention, &load)
        })
        .map_err(err)?;
        let all = if attention { "@all" } else { "" };
        let m = source
            .model
            .ok_or_else(|| err("the self-draft has no model"))?;
        Ok(Drafter::over_model(
            m,
            format!("self:{}{all} of {}", r#type, path.display()),
        ))
    }

    /// A draft model from a file or folder (its vocabulary must be the verifier's; checked
    /// when it drafts for one).
    #[staticmethod]
    #[pyo3(signature = (path, *, activations="int8"))]
    fn model(py: Python<'_>, path: PathBuf, activations: &str) -> PyResult<Self> {
        let load = load_options(activations)?;
        let m = compute(py, || {
            Checkpoint::open(&path, None).and_then(|ck| ck.load_model(&load))
        })
        .map_err(err)?;
        Ok(Drafter::over_model(
            Arc::new(m),
            format!("model {}", path.display()),
        ))
    }

    /// Up to `k` token ids to follow `tokens` (the whole context so far).
    fn propose(&mut self, py: Python<'_>, tokens: Vec<u32>, k: usize) -> PyResult<Vec<u32>> {
        if let Some(v) = self.vocab() {
            if let Some(bad) = tokens.iter().find(|&&t| t as usize >= v) {
                return Err(err(format!(
                    "token id {bad} is outside the draft's vocabulary ({v} tokens)"
                )));
            }
        }
        let looked = match &mut self.lookup {
            LookupKind::None => Vec::new(),
            LookupKind::Ngram(d) => d.propose(&tokens, k).map_err(err)?.tokens,
            LookupKind::Suffix(d) => d.propose(&tokens, k).map_err(err)?.tokens,
        };
        self.last_from_lookup = !looked.is_empty();
        let out = if self.last_from_lookup || self.model.is_none() {
            looked
        } else {
            if self.live.is_none() {
                if let Some(m) = &self.model {
                    let v = OwnedModelVerifier::new(Arc::clone(m), None).map_err(err)?;
                    self.live = Some(Box::new(ModelDrafter::over(
                        v,
                        tandem_speculate::DraftSampling::Greedy,
                    )));
                }
            }
            let min_confidence = self.min_confidence;
            match self.live.as_mut() {
                Some(d) => {
                    d.chain.min_confidence = min_confidence;
                    compute(py, || d.propose(&tokens, k)).map_err(err)?.tokens
                }
                None => Vec::new(),
            }
        };
        self.proposed += out.len() as u64;
        Ok(out)
    }

    /// Tells the drafter how many of its last proposal's tokens were accepted.
    fn accept(&mut self, n: usize) {
        self.accepted += n as u64;
        if self.last_from_lookup {
            match &mut self.lookup {
                LookupKind::Ngram(d) => d.accepted(n),
                LookupKind::Suffix(d) => d.accepted(n),
                LookupKind::None => {}
            }
        } else if let Some(d) = self.live.as_mut() {
            d.accepted(n);
        }
    }

    /// A drafter of the same kind over the same model (no copy of its weights), with a
    /// state of its own: one per sequence when drafting for a batch.
    fn fork(&self) -> Self {
        Drafter {
            min_confidence: self.min_confidence,
            ..Drafter::new(self.copy_lookup(), self.model.clone(), self.label.clone())
        }
    }

    /// Forgets the cached context (the next proposal starts afresh); a suffix drafter
    /// keeps its history.
    fn reset(&mut self) {
        self.live = None;
    }

    /// A model draft stops drafting when its most likely next token has less than this
    /// probability (0: always k tokens).
    #[getter]
    fn get_min_confidence(&self) -> f32 {
        self.min_confidence
    }
    #[setter]
    fn set_min_confidence(&mut self, p: f32) -> PyResult<()> {
        if !(0.0..=1.0).contains(&p) {
            return Err(err(format!("min_confidence {p} is outside 0..=1")));
        }
        self.min_confidence = p;
        Ok(())
    }

    /// Tokens proposed and accepted so far (accepted as told through `accept`).
    #[getter]
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("proposed", self.proposed)?;
        d.set_item("accepted", self.accepted)?;
        Ok(d)
    }

    /// The draft model's vocabulary size (None for a lookup, which has none).
    #[getter]
    fn vocab_size(&self) -> Option<usize> {
        self.vocab()
    }

    fn __repr__(&self) -> String {
        format!("Drafter({})", self.label)
    }
}

/// tandem's speculative loop over a `Model` and a `Drafter`: `generate` returns the text,
/// `stats` the last run's metrics (drafted, accepted, tokens per verifier pass, times).
#[pyclass(module = "tandem")]
struct SpeculativeDecoder {
    model: Py<Model>,
    drafter: Py<Drafter>,
    config: SpecConfig,
    last: Option<SpecStats>,
}

#[pymethods]
impl SpeculativeDecoder {
    /// `draft_max`: most tokens drafted per verifier pass; `adapt`: let that follow what
    /// drafting earns; `draft_p_min`: a model draft stops below this top probability.
    #[new]
    #[pyo3(signature = (model, drafter, draft_max=8, adapt=true, draft_p_min=0.0))]
    fn new(
        model: Py<Model>,
        drafter: Py<Drafter>,
        draft_max: usize,
        adapt: bool,
        draft_p_min: f32,
    ) -> PyResult<Self> {
        tandem_speculate::check_draft_max(draft_max).map_err(err)?;
        if !(0.0..=1.0).contains(&draft_p_min) {
            return Err(err(format!("draft_p_min {draft_p_min} is outside 0..=1")));
        }
        Ok(SpeculativeDecoder {
            model,
            drafter,
            config: SpecConfig {
                draft_max,
                adapt,
                draft_p_min,
                ..SpecConfig::default()
            },
            last: None,
        })
    }

    /// Continues `prompt` speculatively (greedy output identical to `Model.generate`).
    #[pyo3(signature = (prompt, max_tokens=128, temperature=0.0, top_k=0, top_p=1.0, seed=0, add_bos=None))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &mut self,
        py: Python<'_>,
        prompt: Prompt,
        max_tokens: usize,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        seed: u64,
        add_bos: Option<bool>,
    ) -> PyResult<String> {
        let params = sampling(temperature, top_k, top_p, seed)?;
        let model = self.model.bind(py).get();
        let mut drafter = self.drafter.bind(py).borrow_mut();
        model.check_drafter(Some(&drafter))?;
        let ids = model.encode(prompt, add_bos)?;
        let (out, st) = model.run(
            py,
            &ids,
            max_tokens,
            params,
            Some(&mut drafter),
            Some(self.config),
        )?;
        self.last = st;
        model.continuation_text(ids.last().copied(), &out)
    }

    /// The last run's metrics, or None before the first.
    #[getter]
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(st) = &self.last else {
            return Ok(None);
        };
        let d = PyDict::new(py);
        d.set_item("prompt_tokens", st.prompt_tokens)?;
        d.set_item("generated_tokens", st.generated_tokens)?;
        d.set_item("drafted", st.drafted)?;
        d.set_item("accepted", st.accepted)?;
        d.set_item("acceptance_rate", st.acceptance_rate())?;
        d.set_item("verifier_passes", st.verifier_passes)?;
        d.set_item("tokens_per_verifier_pass", st.tokens_per_pass())?;
        d.set_item("draft_s", st.draft_secs)?;
        d.set_item("verify_s", st.verify_secs)?;
        d.set_item("prefill_s", st.prefill_secs)?;
        d.set_item("total_s", st.total_secs)?;
        d.set_item(
            "tok_s",
            st.generated_tokens as f64 / st.total_secs.max(1e-9),
        )?;
        d.set_item("stop", st.stop.name())?;
        Ok(Some(d))
    }
}

/// JSON text as Python objects (dicts, lists, numbers, strings).
fn json_to_py<'py>(py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyAny>> {
    py.import("json")?.call_method1("loads", (text,))
}

/// Progress of a quantization on an indicatif bar (a terminal only, unless `show` says).
struct QuantizeBar(indicatif::ProgressBar);

impl tandem_quantize::job::QuantizeObserver for QuantizeBar {
    fn progress(&self, stage: &str, done: u64, total: u64) {
        self.0.set_length(total);
        self.0.set_position(done);
        self.0.set_message(stage.to_string());
    }
    fn done(&self) {
        self.0.finish_and_clear();
    }
    fn note(&self, line: &str) {
        self.0.suspend(|| eprintln!("{line}"));
    }
}

/// Quantizes `model` into `out` (a GGUF file, or a compressed-tensors folder with
/// `format="compressed-tensors"`), as `tandem quantize` does: attention kept 16-bit unless
/// `attention` says otherwise, the MLP at `scheme`, `method` rtn (llama-quantize's bytes),
/// gptq, awq or awq+gptq (calibrated on `calib_text`, default the bundled Austen, and with
/// `calib_self=N` on N tokens of the model's own answers too); `edge_mlp="2=q8_0"` puts the
/// MLP of the first and last two layers at Q8_0 (a 4-bit draft's choice). Returns what was
/// written.
#[pyfunction]
#[pyo3(signature = (model, out, scheme=None, method="rtn", *, attention=None, embeddings=None, output=None, edge_mlp=None, rules=Vec::new(), recipe=None, format="gguf", group_size=32, imatrix=None, calib_text=None, calib_ctx=512, calib_chunks=None, calib_self=0, gptq_damp=0.3, act_order=true, force=false, allow_nonfinite=false, progress=None))]
#[allow(clippy::too_many_arguments)]
fn quantize<'py>(
    py: Python<'py>,
    model: PathBuf,
    out: PathBuf,
    scheme: Option<String>,
    method: &str,
    attention: Option<String>,
    embeddings: Option<String>,
    output: Option<String>,
    edge_mlp: Option<String>,
    rules: Vec<String>,
    recipe: Option<PathBuf>,
    format: &str,
    group_size: usize,
    imatrix: Option<PathBuf>,
    calib_text: Option<PathBuf>,
    calib_ctx: usize,
    calib_chunks: Option<usize>,
    calib_self: usize,
    gptq_damp: f64,
    act_order: bool,
    force: bool,
    allow_nonfinite: bool,
    progress: Option<bool>,
) -> PyResult<Bound<'py, PyDict>> {
    use tandem_quantize::job::{self, Format, PolicyChoices, QuantizeJob};
    let method = tandem_quantize::calibrated::Method::parse(method).map_err(err)?;
    let job = QuantizeJob {
        imatrix,
        allow_nonfinite,
        force,
        calib: {
            let mut c = job::calibration_options(
                method,
                calib_text.as_deref(),
                calib_ctx,
                calib_chunks,
                gptq_damp,
            )
            .map_err(err)?;
            c.gptq.act_order = act_order;
            job::set_self_calibration(&mut c, calib_self).map_err(err)?;
            c
        },
        ..QuantizeJob::new(
            PolicyChoices {
                scheme,
                attention,
                embeddings,
                output,
                edge_mlp,
                rules,
                recipe,
            },
            Format::parse(format, group_size).map_err(err)?,
            method,
        )
    };
    let bar = QuantizeBar(progress_bar(progress));
    let (report, summary) = compute(py, || {
        let ck = Checkpoint::open(&model, None)?;
        let plan = job.plan(&ck)?;
        let r = job.run(&ck, &plan, &out, &bar)?;
        Ok::<_, tandem_quantize::Error>((r, plan.summary(false)))
    })
    .map_err(err)?;
    let d = PyDict::new(py);
    d.set_item("out", out.display().to_string())?;
    d.set_item("tensors", report.tensors)?;
    d.set_item("bytes", report.bytes_out)?;
    d.set_item("seconds", report.seconds)?;
    d.set_item("notes", report.notes)?;
    d.set_item("quantized_layers", report.quantized_layers)?;
    d.set_item("imatrix_tensors", report.imatrix_tensors)?;
    d.set_item("plan", summary)?;
    Ok(d)
}

/// Progress of an evaluation on indicatif bars (a terminal only, unless `show` says).
struct EvalBars {
    show: Option<bool>,
    bar: std::sync::Mutex<Option<(String, indicatif::ProgressBar)>>,
}

impl tandem_eval::job::EvalObserver for EvalBars {
    fn progress(&self, stage: &str, done: usize, total: usize) {
        let mut slot = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        if slot.as_ref().is_none_or(|(s, _)| s != stage) {
            let b = progress_bar(self.show);
            b.set_message(stage.to_string());
            *slot = Some((stage.to_string(), b));
        }
        if let Some((_, b)) = slot.as_ref() {
            b.set_length(total as u64);
            b.set_position(done as u64);
        }
    }
    fn stage_done(&self, _stage: &str) {
        let mut slot = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, b)) = slot.take() {
            b.finish_and_clear();
        }
    }
}

/// What quantization cost: each model against `reference` on `text` (perplexity, KL
/// divergence, top-1 agreement, per-tensor weight error, size, speed), the report as a dict
/// (also written as report.json / .md / .html into `out` when given).
#[pyfunction]
#[pyo3(signature = (reference, models, text, ctx=512, chunks=None, *, out=None, cache=None, speed_pp=128, speed_tg=32, progress=None))]
#[allow(clippy::too_many_arguments)]
fn evaluate<'py>(
    py: Python<'py>,
    reference: PathBuf,
    models: Vec<PathBuf>,
    text: PathBuf,
    ctx: usize,
    chunks: Option<usize>,
    out: Option<PathBuf>,
    cache: Option<PathBuf>,
    speed_pp: usize,
    speed_tg: usize,
    progress: Option<bool>,
) -> PyResult<Bound<'py, PyAny>> {
    if models.is_empty() {
        return Err(err("models: give at least one model to evaluate"));
    }
    let job = tandem_eval::job::EvalJob {
        ctx,
        chunks,
        out,
        cache,
        speed_pp,
        speed_tg,
        ..tandem_eval::job::EvalJob::new(&reference, &models, &text)
    };
    let bars = EvalBars {
        show: progress,
        bar: Default::default(),
    };
    let report = compute(py, || tandem_eval::job::run(&job, &bars)).map_err(err)?;
    let json = serde_json::to_string(&report).map_err(err)?;
    json_to_py(py, &json)
}

#[pymodule]
fn _tandem(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("TandemError", m.py().get_type::<TandemError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<Model>()?;
    m.add_class::<Drafter>()?;
    m.add_class::<SpeculativeDecoder>()?;
    m.add_function(wrap_pyfunction!(quantize, m)?)?;
    m.add_function(wrap_pyfunction!(evaluate, m)?)?;
    m.add_function(wrap_pyfunction!(set_threads, m)?)?;
    m.add_function(wrap_pyfunction!(threads, m)?)?;
    Ok(())
}
