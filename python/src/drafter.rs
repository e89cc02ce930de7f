//! `Drafter`: the drafters another engine's speculative loop asks for tokens (`propose` /
//! `accept`).

use crate::{compute, err, load_options};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::path::PathBuf;
use std::sync::Arc;
use tandem_model::{Checkpoint, Llama};
use tandem_speculate::session::{self, DraftSource, Lookup};
use tandem_speculate::{
    Drafter as _, ModelDrafter, NgramDrafter, OwnedModelVerifier, SuffixDrafter,
};

/// The lookup part of a `Drafter`.
pub(crate) enum LookupKind {
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
pub(crate) struct Drafter {
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
    pub(crate) fn new(lookup: LookupKind, model: Option<Arc<Llama>>, label: String) -> Self {
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

    pub(crate) fn vocab(&self) -> Option<usize> {
        self.model.as_ref().map(|m| m.config.vocab_size)
    }

    /// The drafter as a draft source for one of tandem's own runs; its suffix history moves
    /// into the source and comes back through [`Drafter::restore`].
    pub(crate) fn take_source(&mut self) -> DraftSource {
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

    pub(crate) fn restore(&mut self, source: DraftSource) {
        self.controller_memory = source.controller_memory;
        if let (LookupKind::Suffix(mine), Lookup::Suffix(d)) = (&mut self.lookup, source.lookup) {
            *mine = d;
        }
    }

    /// A drafter over a model, its output head cut to the frequent (low) ids once, here,
    /// while nothing else holds the model (see `draft_shortlist`).
    pub(crate) fn over_model(mut m: Arc<Llama>, label: String) -> Self {
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

    pub(crate) fn copy_lookup(&self) -> LookupKind {
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
