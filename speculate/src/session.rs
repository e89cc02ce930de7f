//! A speculative session assembled from a config: where drafts come from, how they are
//! accepted and how k adapts. The CLI (`generate --draft`, `bench spec`, `chat --draft`) and
//! the Python package build their runs here, so the choices (shared or own draft cache, the
//! draft's seed, the controller a seeded run may use) are made in one place.

pub use crate::config::{SpecConfig, DEFAULT_DRAFT_P_MIN};
use crate::layer_skip::{choose_skips, SkipChoice, SkipReport};
use crate::{
    ControllerMemory, Drafter, Error, HybridDrafter, ModelDrafter, ModelVerifier, NgramDrafter,
    Result, SharedCacheDrafter, SpecStats, SuffixDrafter,
};
use std::path::Path;
use std::sync::Arc;
use tandem_model::{Checkpoint, HeadRows, KvCache, Llama, LoadOptions};
use tandem_quantize::{QuantType, TypeChoice};

/// Beside a model draft, a suffix lookup proposes only for a match of at least this many
/// tokens: shorter ones are right less often than the model.
pub const HYBRID_MIN_MATCH: usize = 3;

/// A drafter that needs no model: none, prompt lookup, or suffix lookup over the session.
pub enum Lookup {
    None,
    Ngram,
    /// Persists across the runs that use this source (bench spec's prompts, a chat session).
    Suffix(SuffixDrafter),
}

/// Where drafts come from: a lookup, a model (a file, or the verifier quantized), or a lookup
/// first and the model where it finds nothing. The model is shared so that a caller (the
/// Python package) can keep drafting with it between sessions.
pub struct DraftSource {
    pub lookup: Lookup,
    pub model: Option<Arc<Llama>>,
    /// For a layer-skipping self-draft (`,skip=`): what the choice of sublayers measured.
    pub skip_report: Option<SkipReport>,
    /// What the draft-length controller learned in this source's earlier runs (costs and
    /// acceptance); the next run starts from it, as the suffix lookup starts from their text.
    pub controller_memory: Option<ControllerMemory>,
}

impl DraftSource {
    pub fn ngram() -> Self {
        DraftSource {
            lookup: Lookup::Ngram,
            model: None,
            skip_report: None,
            controller_memory: None,
        }
    }

    pub fn suffix() -> Self {
        DraftSource {
            lookup: Lookup::Suffix(SuffixDrafter::default()),
            model: None,
            skip_report: None,
            controller_memory: None,
        }
    }

    pub fn from_model(model: Arc<Llama>) -> Self {
        DraftSource {
            lookup: Lookup::None,
            model: Some(model),
            skip_report: None,
            controller_memory: None,
        }
    }

    /// `ngram`, `suffix`, `self:<type>` (the verifier quantized in memory with the
    /// quantizer's default policy: attention 16-bit, MLP at `<type>`; `self:<type>@all`
    /// quantizes attention too; `,edges=N` keeps the MLP of the first and last N layers at
    /// Q8_0), a model path, or a lookup and a model joined by `+`
    /// (`suffix+self:q8_0@all`: the lookup first, the model where it finds nothing). A draft
    /// model is loaded with `load` (the verifier's options, as a rule).
    pub fn open(verifier: &Checkpoint, spec: &str, load: &LoadOptions) -> Result<Self> {
        let parts: Vec<&str> = if Path::new(spec).exists() {
            vec![spec]
        } else {
            spec.split('+').collect()
        };
        let mut source = DraftSource {
            lookup: Lookup::None,
            model: None,
            skip_report: None,
            controller_memory: None,
        };
        for part in parts {
            match part {
                "ngram" | "suffix" => {
                    if !matches!(source.lookup, Lookup::None) {
                        return Err(Error::Mismatch(format!(
                            "draft '{spec}': one lookup (ngram or suffix) at most"
                        )));
                    }
                    source.lookup = if part == "ngram" {
                        Lookup::Ngram
                    } else {
                        Lookup::Suffix(SuffixDrafter::default())
                    };
                }
                _ => {
                    if source.model.is_some() {
                        return Err(Error::Mismatch(format!(
                            "draft '{spec}': one draft model at most"
                        )));
                    }
                    let (model, report) = Self::open_model_part(verifier, spec, part, load)?;
                    source.model = Some(model);
                    source.skip_report = report;
                }
            }
        }
        if let (Lookup::Suffix(d), Some(_)) = (&mut source.lookup, &source.model) {
            d.min_match = HYBRID_MIN_MATCH;
        }
        Ok(source)
    }

    fn open_model_part(
        verifier: &Checkpoint,
        spec: &str,
        part: &str,
        load: &LoadOptions,
    ) -> Result<(Arc<Llama>, Option<SkipReport>)> {
        match part.strip_prefix("self:") {
            Some(ty) => {
                // self:<type>[@all][,skip=<auto|count|list>][,edges=<N>], options in any order.
                let mut options = ty.split(',');
                let ty = options.next().unwrap_or_default();
                let (mut skip, mut edges) = (None, 0);
                for option in options {
                    let bad = |e: String| Error::Mismatch(format!("draft '{spec}': {e}"));
                    match option.split_once('=') {
                        Some(("skip", s)) => {
                            skip = Some(SkipChoice::parse(s).map_err(|e| bad(e.to_string()))?)
                        }
                        Some(("edges", n)) => {
                            edges = n
                                .parse::<usize>()
                                .map_err(|_| bad(format!("edges={n}: not a count of layers")))?
                        }
                        _ => {
                            return Err(bad(format!(
                                "unknown option '{option}' (skip=… or edges=N)"
                            )))
                        }
                    }
                }
                let (ty, all) = match ty.strip_suffix("@all") {
                    Some(t) => (t, true),
                    None => (ty, false),
                };
                let mut draft = match TypeChoice::parse(ty)
                    .map_err(|e| Error::Mismatch(format!("draft '{spec}': {e}")))?
                {
                    TypeChoice::To(t) => self_draft_model(verifier, t, all, edges, load)?,
                    TypeChoice::Keep if edges > 0 => {
                        return Err(Error::Mismatch(format!(
                            "draft '{spec}': edges=N needs a type to quantize the other layers to"
                        )))
                    }
                    // The verifier's own weights, with sublayers left out.
                    TypeChoice::Keep if skip.is_some() => verifier.load_model(load)?,
                    TypeChoice::Keep => {
                        return Err(Error::Mismatch(format!(
                            "draft '{spec}' would be the verifier itself (add ,skip=auto to skip layers)"
                        )))
                    }
                };
                let report = match skip {
                    Some(choice) => {
                        let reference = verifier.load_model(load)?;
                        let calibration = calibration_tokens(verifier)?;
                        Some(choose_skips(&reference, &mut draft, &calibration, &choice)?)
                    }
                    None => None,
                };
                Ok((Arc::new(draft), report))
            }
            None => Ok((
                Arc::new(open_draft_model(verifier, Path::new(part), load)?),
                None,
            )),
        }
    }

    /// The verifier quantized to `scheme` in memory (MLP only, or attention too).
    pub fn self_draft(
        verifier: &Checkpoint,
        scheme: QuantType,
        attention_too: bool,
        load: &LoadOptions,
    ) -> Result<Self> {
        Ok(Self::from_model(Arc::new(self_draft_model(
            verifier,
            scheme,
            attention_too,
            0,
            load,
        )?)))
    }

    /// A draft model from a file or folder; its vocabulary must be the verifier's.
    pub fn open_model(verifier: &Checkpoint, path: &Path, load: &LoadOptions) -> Result<Self> {
        Ok(Self::from_model(Arc::new(open_draft_model(
            verifier, path, load,
        )?)))
    }
}

fn self_draft_model(
    verifier: &Checkpoint,
    scheme: QuantType,
    attention_too: bool,
    edge_layers: usize,
    load: &LoadOptions,
) -> Result<Llama> {
    let ck =
        tandem_quantize::quantized_copy_with_edges(verifier, scheme, attention_too, edge_layers)
            .map_err(|e| Error::Mismatch(format!("quantizing the self-draft: {e}")))?;
    Ok(ck.load_model(load)?)
}

/// Tokens a layer-skipping draft is chosen on: the start of the quantizer's bundled
/// calibration text (Austen's Emma; never the evaluation text).
const SKIP_CALIBRATION_TOKENS: usize = 256;

fn calibration_tokens(verifier: &Checkpoint) -> Result<Vec<u32>> {
    let mut ids = verifier.tokenizer.encode(
        tandem_quantize::CALIBRATION_TEXT,
        verifier.tokenizer.add_bos,
    )?;
    ids.truncate(SKIP_CALIBRATION_TOKENS);
    Ok(ids)
}

fn open_draft_model(verifier: &Checkpoint, path: &Path, load: &LoadOptions) -> Result<Llama> {
    let draft = Checkpoint::open(path, None)?;
    if let Some(d) = draft.tokenizer.vocabulary_difference(&verifier.tokenizer) {
        return Err(Error::Mismatch(format!(
            "{}: the draft's vocabulary differs from the verifier's ({}): {d}",
            draft.path.display(),
            verifier.path.display()
        )));
    }
    Ok(draft.load_model(load)?)
}

/// One speculative generation with fresh drafter, verifier, rule and controller.
pub fn run(
    model: &Llama,
    draft: &mut DraftSource,
    s: &SpecConfig,
    prompt: &[u32],
    max_tokens: usize,
    eos: &[u32],
    on_token: impl FnMut(u32) -> Result<()>,
) -> Result<(Vec<u32>, SpecStats)> {
    let mut cache = model.new_cache_limited(s.ctx)?;
    run_over(
        model, &mut cache, draft, s, prompt, max_tokens, eos, on_token,
    )
}

/// [`run`] over a cache that already holds the start of `prompt` (a chat's earlier turns, as
/// `tandem chat --draft` keeps them): only the rest of the prompt is run, and the cache comes
/// back holding what plain generation's would: the prompt and the answer, less the answer's
/// last token unless an end-of-sequence token followed it. Its own limit applies (`s.ctx` is
/// not read). On an error the cache comes back too, holding an unspecified prefix: truncate
/// it before reuse.
#[allow(clippy::too_many_arguments)]
pub fn run_over(
    model: &Llama,
    cache: &mut KvCache,
    draft: &mut DraftSource,
    s: &SpecConfig,
    prompt: &[u32],
    max_tokens: usize,
    eos: &[u32],
    on_token: impl FnMut(u32) -> Result<()>,
) -> Result<(Vec<u32>, SpecStats)> {
    // The verifier owns the cache while it runs (a draft over it shares it); a one-position
    // stand-in holds its place, allocated at its smallest.
    let filled = std::mem::replace(cache, model.new_cache_with_limit(1)?);
    let mut verifier = ModelVerifier::from_cache(model, filled).reads(verifier_reads(s));
    let result = decode_over(&mut verifier, draft, s, prompt, max_tokens, eos, on_token);
    *cache = verifier.into_cache()?;
    result
}

/// What a verifier's rows must hold for `s`'s acceptance rule (see
/// [`SpecConfig::rule_reads_draws_only`]).
pub fn verifier_reads(s: &SpecConfig) -> HeadRows {
    if s.rule_reads_draws_only() {
        HeadRows::for_draws(&s.params)
    } else if s.params.top_k > 0 {
        // Rejection sampling reads whole distributions; with top-k they hold only the k
        // largest logits, which these rows keep exact.
        HeadRows::TopK(s.params.top_k)
    } else {
        HeadRows::All
    }
}

/// The drafters `draft` names, over `verifier`, decoding `prompt`; they are dropped on return,
/// so the verifier's cache is its own again.
fn decode_over(
    verifier: &mut ModelVerifier<'_>,
    draft: &mut DraftSource,
    s: &SpecConfig,
    prompt: &[u32],
    max_tokens: usize,
    eos: &[u32],
    on_token: impl FnMut(u32) -> Result<()>,
) -> Result<(Vec<u32>, SpecStats)> {
    let model = verifier.model;
    // What a kept cache already held (a chat's earlier turns) is in the history already.
    let held = verifier.cache.borrow().len().min(prompt.len());
    shortlist_draft_head(draft, &[prompt], s.draft_vocab)?;
    let DraftSource {
        lookup,
        model: draft_model,
        controller_memory,
        ..
    } = draft;
    let draft_model: Option<&Llama> = draft_model.as_deref();
    let mut ngram = NgramDrafter::default();
    let lookup_drafter: Option<&mut dyn Drafter> = match lookup {
        Lookup::None => None,
        Lookup::Ngram => Some(&mut ngram),
        Lookup::Suffix(d) => {
            d.paths = s.lookup_paths;
            Some(d)
        }
    };
    let (mut own_cache, mut shared_cache);
    let model_drafter: Option<&mut dyn Drafter> = match draft_model {
        None => None,
        Some(m) => {
            let chain = s.draft_chain()?;
            if s.own_draft_cache || !m.shares_cache_shape_with(model) {
                own_cache = ModelDrafter::new(m, chain)?;
                Some(&mut own_cache)
            } else {
                shared_cache = SharedCacheDrafter::new(m, verifier, chain)?;
                Some(&mut shared_cache)
            }
        }
    };
    let mut hybrid;
    let drafter: &mut dyn Drafter = match (lookup_drafter, model_drafter) {
        (Some(l), Some(m)) => {
            hybrid = HybridDrafter::new(l, m);
            &mut hybrid
        }
        (Some(d), None) | (None, Some(d)) => d,
        (None, None) => {
            return Err(Error::Mismatch(
                "no drafter: name a lookup or a model".into(),
            ))
        }
    };
    let cost = match draft_model {
        None => 0.0,
        Some(m) => m.decode_cost() / model.decode_cost().max(1.0),
    };
    let (out, stats) = s.decode_resuming(
        drafter,
        verifier,
        cost,
        controller_memory,
        prompt,
        max_tokens,
        eos,
        on_token,
    )?;
    if let Lookup::Suffix(d) = lookup {
        // The sequence (its last tokens were never a draft's context) joins the session's
        // history for the next run, less the start a kept cache held: an earlier run of the
        // session added that already.
        d.end_sequence(&[&prompt[held..], &out[..]].concat());
    }
    Ok((out, stats))
}

/// Cuts a draft model's output head down to the lowest `top` ids and the prompts' tokens
/// (`draft_shortlist`; the full head with `top` = 0, or on the GPU, where the head stays
/// whole). A model someone else also holds keeps the head it has.
pub fn shortlist_draft_head(draft: &mut DraftSource, prompts: &[&[u32]], top: usize) -> Result<()> {
    let Some(m) = draft.model.as_mut() else {
        return Ok(());
    };
    let Some(m) = Arc::get_mut(m) else {
        return Ok(());
    };
    if m.runs_on_gpu() {
        return Ok(());
    }
    let all: Vec<u32> = prompts.iter().flat_map(|p| p.iter().copied()).collect();
    let ids = crate::draft_shortlist(&all, m.config.vocab_size, top);
    Ok(m.set_output_shortlist(ids.as_deref())?)
}
