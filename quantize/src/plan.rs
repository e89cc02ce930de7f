//! The plan: which type each tensor is written as, decided before any data is read.
//!
//! Defaults (the policy): attention projections keep their source type (16-bit), MLP
//! projections take the scheme, token embeddings and the output head take q8_0, norms and
//! biases stay F32. `--attention/--embeddings/--output` change a kind's type, `--rule` overrides
//! by regex on the Hugging Face name (later rules win), and a row that does not fill whole
//! blocks falls back to a type that fits, which the plan says.

use crate::error::{Error, Result};
use crate::types::{type_names, QuantType};
use serde::Deserialize;
use std::fmt::Write as _;
use std::path::Path;
use tandem_model::gguf_names::hf_to_gguf;
use tandem_model::weights::WeightDType;
use tandem_model::Checkpoint;

/// A type choice: a concrete type, or `keep` (the source bytes, copied unchanged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeChoice {
    Keep,
    To(QuantType),
}

impl TypeChoice {
    pub fn parse(s: &str) -> Result<Self> {
        if s.trim().eq_ignore_ascii_case("keep") {
            return Ok(TypeChoice::Keep);
        }
        QuantType::parse(s).map(TypeChoice::To).ok_or_else(|| {
            Error::Plan(format!(
                "unknown type '{s}' (known: keep, {})",
                type_names()
            ))
        })
    }
}

/// What a tensor is, for the policy and the summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TensorKind {
    Embeddings,
    Attention,
    Mlp,
    Output,
    Norm,
    Bias,
    Other,
}

impl TensorKind {
    pub fn of(hf_name: &str) -> Self {
        if hf_name == "model.embed_tokens.weight" {
            TensorKind::Embeddings
        } else if hf_name == "lm_head.weight" {
            TensorKind::Output
        } else if hf_name.ends_with(".bias") {
            TensorKind::Bias
        } else if hf_name.contains("norm") {
            TensorKind::Norm
        } else if hf_name.contains(".self_attn.") {
            TensorKind::Attention
        } else if hf_name.contains(".mlp.") {
            TensorKind::Mlp
        } else {
            TensorKind::Other
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TensorKind::Embeddings => "embeddings",
            TensorKind::Attention => "attention",
            TensorKind::Mlp => "mlp",
            TensorKind::Output => "output",
            TensorKind::Norm => "norm",
            TensorKind::Bias => "bias",
            TensorKind::Other => "other",
        }
    }
}

/// The user's choices: a scheme for the MLP and per-kind overrides and rules.
#[derive(Debug, Clone)]
pub struct Policy {
    pub scheme: QuantType,
    /// The MLP projections: `To(scheme)` unless a quantized source keeps its own grid.
    pub mlp: TypeChoice,
    pub attention: TypeChoice,
    pub embeddings: TypeChoice,
    pub output: TypeChoice,
    /// The MLP projections of the first and last few layers at another type (before the
    /// rules, which still win).
    pub edge_mlp: Option<EdgeLayers>,
    /// (regex source, compiled, type), applied in order; later rules win.
    pub rules: Vec<Rule>,
}

/// The MLP projections of the first `count` and the last `count` layers, at `choice`
/// (`--edge-mlp 2=q8_0`). A 4-bit copy that drafts for its own 16-bit verifier agrees with it
/// most where its MLP rounding costs least: on SmolLM2-135M (30 layers), GPTQ Q4_0 with the
/// MLPs of layers 0, 1, 28 and 29 at Q8_0 accepted 79–86% of its drafts against 73–79% for
/// all-Q4_0, for 5% more bytes; the first and last four (8 layers) gained no more
/// (BENCHMARKS.md, session 46). On 2 CPU cores, where a draft step costs its bytes, speed
/// gained about nothing from it; where a step costs launches rather than bytes (a GPU), the
/// acceptance is what counts. llama.cpp's Q4_K_M gives `ffn_down` more bits in the first and
/// last eighths of the layers, for a like reason. By layer count, so one choice fits any depth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeLayers {
    pub count: usize,
    pub choice: TypeChoice,
}

impl EdgeLayers {
    /// Parses `N=TYPE` (`2=q8_0`).
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || {
            Error::Plan(format!(
                "edge MLP layers '{s}' are not N=TYPE (e.g. '2=q8_0')"
            ))
        };
        let (n, ty) = s.split_once('=').ok_or_else(bad)?;
        let count = n.trim().parse::<usize>().map_err(|_| bad())?;
        let choice = TypeChoice::parse(ty.trim())
            .map_err(|e| Error::Plan(format!("edge MLP layers '{s}': {e}")))?;
        Ok(EdgeLayers { count, choice })
    }

    /// Whether layer `layer` of `layers` is an edge layer.
    pub fn covers(&self, layer: usize, layers: usize) -> bool {
        layer < self.count || layer + self.count >= layers
    }
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub pattern: String,
    pub regex: regex::Regex,
    pub choice: TypeChoice,
}

impl Rule {
    /// Parses `PATTERN=TYPE`.
    pub fn parse(s: &str) -> Result<Self> {
        let (pat, ty) = s.rsplit_once('=').ok_or_else(|| {
            Error::Plan(format!(
                "rule '{s}' is not PATTERN=TYPE (e.g. 'mlp\\.down_proj=q6_k')"
            ))
        })?;
        Self::new(pat, ty)
    }

    pub fn new(pattern: &str, ty: &str) -> Result<Self> {
        let regex = regex::Regex::new(pattern)
            .map_err(|e| Error::Plan(format!("rule '{pattern}': invalid regex: {e}")))?;
        let choice = TypeChoice::parse(ty)
            .map_err(|e| Error::Plan(format!("rule '{pattern}={ty}': {e}")))?;
        Ok(Rule {
            pattern: pattern.to_string(),
            regex,
            choice,
        })
    }
}

impl Policy {
    /// The default policy for a scheme.
    pub fn new(scheme: QuantType) -> Self {
        Policy {
            scheme,
            mlp: TypeChoice::To(scheme),
            attention: TypeChoice::Keep,
            embeddings: TypeChoice::To(QuantType::Q8_0),
            output: TypeChoice::To(QuantType::Q8_0),
            edge_mlp: None,
            rules: Vec::new(),
        }
    }
}

/// A TOML recipe: the same choices as the command-line flags.
///
/// ```toml
/// scheme = "q4_k"
/// attention = "keep"        # or a type
/// embeddings = "q8_0"
/// output = "q6_k"
/// [[rules]]
/// pattern = 'mlp\.down_proj'
/// type = "q6_k"
/// ```
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub scheme: Option<String>,
    pub attention: Option<String>,
    pub embeddings: Option<String>,
    pub output: Option<String>,
    /// `N=TYPE`: the MLP of the first and last N layers at TYPE ([`EdgeLayers`]).
    pub edge_mlp: Option<String>,
    #[serde(default)]
    pub rules: Vec<RecipeRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeRule {
    pub pattern: String,
    #[serde(rename = "type")]
    pub ty: String,
}

impl Recipe {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = tandem_model::files::read_text_capped(path, tandem_model::files::CONFIG_CAP)
            .map_err(|e| crate::error::io_err(path, &e))?;
        Self::parse(path, &text)
    }

    /// Parses recipe TOML; `path` names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| {
            Error::Plan(format!(
                "{}: invalid recipe: {}",
                path.display(),
                tandem_model::error::one_line(&e.to_string())
            ))
        })
    }
}

impl Recipe {
    /// The policy the recipe describes (scheme q8_0 when it names none). Every type name and
    /// rule pattern is checked here.
    pub fn to_policy(&self) -> Result<Policy> {
        let scheme_name = self.scheme.as_deref().unwrap_or("q8_0");
        let scheme = match TypeChoice::parse(scheme_name)? {
            TypeChoice::To(t) => t,
            TypeChoice::Keep => {
                return Err(Error::Plan("the scheme must be a type, not 'keep'".into()))
            }
        };
        let mut policy = Policy::new(scheme);
        let field = |name: &str, v: &str| {
            TypeChoice::parse(v).map_err(|e| Error::Plan(format!("{name}: {e}")))
        };
        if let Some(a) = &self.attention {
            policy.attention = field("attention", a)?;
        }
        if let Some(e) = &self.embeddings {
            policy.embeddings = field("embeddings", e)?;
        }
        if let Some(o) = &self.output {
            policy.output = field("output", o)?;
        }
        if let Some(e) = &self.edge_mlp {
            policy.edge_mlp = Some(EdgeLayers::parse(e)?);
        }
        for r in &self.rules {
            policy.rules.push(Rule::new(&r.pattern, &r.ty)?);
        }
        Ok(policy)
    }
}

/// One tensor's line in the plan.
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    /// Name in the source checkpoint (Hugging Face, or the GGUF name where none exists).
    pub source_name: String,
    pub gguf_name: String,
    pub kind: TensorKind,
    /// Hugging Face layout ([out, in] for matrices).
    pub shape: Vec<usize>,
    pub source_type: WeightDType,
    /// None: copy the source bytes unchanged.
    pub target: Option<QuantType>,
    pub bytes: usize,
    /// Reorder q/k rows into llama.cpp's RoPE layout while writing.
    pub permute_heads: Option<usize>,
    /// Why the type differs from what was asked (fallback), if it does.
    pub note: Option<String>,
    /// For a layer of a GPTQ / AWQ / compressed-tensors source: how exactly the output keeps
    /// the source's values, when not bit for bit.
    pub exactness: Option<String>,
}

impl PlannedTensor {
    pub fn elems(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn type_name(&self) -> String {
        match self.target {
            Some(t) => t.name().to_string(),
            None => self.source_type.name().to_lowercase(),
        }
    }

    /// Stored with 16 or more bits per weight.
    pub fn is_full_precision(&self) -> bool {
        match self.target {
            Some(t) => t.is_dense(),
            None => !matches!(self.source_type, WeightDType::Quant(_)),
        }
    }
}

/// Every tensor of the output, in file order.
#[derive(Debug, Clone)]
pub struct Plan {
    pub tensors: Vec<PlannedTensor>,
    /// Source tensors with no place in a GGUF (e.g. `rotary_emb.inv_freq`), left out.
    pub skipped: Vec<String>,
    /// Tensors computed from the config rather than read (llama3 `rope_freqs.weight`), F32.
    pub computed: Vec<(String, Vec<f32>)>,
    pub scheme: QuantType,
}

/// Decides every tensor's type. Errors on a rule that matches no tensor.
pub fn make_plan(ck: &Checkpoint, policy: &Policy) -> Result<Plan> {
    let store = &ck.store;
    let permute = !store.is_gguf() && ck.config.architecture() == tandem_model::Architecture::Llama;
    let mut names = store.names();
    names.sort_by_key(|n| order_key(n));
    let mut rule_hits = vec![0usize; policy.rules.len()];
    let mut tensors = Vec::new();
    let mut skipped = Vec::new();
    for name in names {
        let raw = store.get(&name)?;
        let gguf_name = if store.is_gguf() {
            store.stored_name(&name)
        } else {
            match hf_to_gguf(&name) {
                Some(g) => g,
                None => {
                    skipped.push(name);
                    continue;
                }
            }
        };
        let kind = TensorKind::of(&name);
        let is_matrix = raw.shape.len() == 2;
        let mut choice = if !is_matrix {
            TypeChoice::To(QuantType::F32)
        } else {
            match kind {
                TensorKind::Attention => policy.attention,
                TensorKind::Mlp => match (policy.edge_mlp, layer_of(&name)) {
                    (Some(e), Some(l)) if e.covers(l, ck.config.num_hidden_layers) => e.choice,
                    _ => policy.mlp,
                },
                TensorKind::Embeddings => policy.embeddings,
                TensorKind::Output => policy.output,
                _ => TypeChoice::Keep,
            }
        };
        for (i, r) in policy.rules.iter().enumerate() {
            if r.regex.is_match(&name) {
                rule_hits[i] += 1;
                if is_matrix {
                    choice = r.choice;
                }
            }
        }
        // A 1-D tensor is always F32 (llama.cpp never quantizes norms or biases).
        let cols = raw.shape.last().copied().unwrap_or(1);
        let rows = raw.elem_count() / cols.max(1);
        let (target, note) = match choice {
            TypeChoice::Keep => (None, None),
            TypeChoice::To(t) => {
                let fit = t.fitting(cols);
                let note = (fit != t).then(|| {
                    format!(
                        "{t} needs rows in multiples of {}, row is {cols}: {fit}",
                        t.block_size()
                    )
                });
                (Some(fit), note)
            }
        };
        // Copying the source bytes of a matching type is the same as keeping them.
        let target = match target {
            Some(t) if same_type(t, raw.dtype) => None,
            t => t,
        };
        let bytes = match target {
            Some(t) => t.bytes_for(rows, cols).unwrap_or(0),
            None => raw.data.len(),
        };
        let exactness = ck
            .imported
            .as_ref()
            .and_then(|imp| imp.exactness_of(&name))
            .and_then(|e| source_exactness(e, target));
        let heads = match name.as_str() {
            n if n.ends_with("self_attn.q_proj.weight") => Some(ck.config.num_attention_heads),
            n if n.ends_with("self_attn.k_proj.weight") => Some(ck.config.num_kv_heads()),
            _ => None,
        };
        tensors.push(PlannedTensor {
            source_name: name,
            gguf_name,
            kind,
            shape: raw.shape.clone(),
            source_type: raw.dtype,
            target,
            bytes,
            permute_heads: heads.filter(|_| permute),
            note,
            exactness,
        });
    }
    if let Some(i) = rule_hits.iter().position(|&h| h == 0) {
        return Err(Error::Plan(format!(
            "rule '{}' matches no tensor of {} (names are Hugging Face names, e.g. 'model.layers.0.mlp.down_proj.weight')",
            policy.rules[i].pattern,
            ck.path.display()
        )));
    }
    let computed = match crate::metadata::rope_freqs(&ck.config) {
        Some(f) if !store.contains("rope_freqs.weight") => {
            vec![("rope_freqs.weight".to_string(), f)]
        }
        _ => vec![],
    };
    Ok(Plan {
        tensors,
        skipped,
        computed,
        scheme: policy.scheme,
    })
}

/// What the plan says about a quantized source layer written as `target` (None: kept).
fn source_exactness(
    e: &tandem_model::packed::Exactness,
    target: Option<QuantType>,
) -> Option<String> {
    use tandem_model::packed::Exactness;
    match (e, target) {
        (Exactness::Dequantized { reason }, Some(t)) => Some(format!(
            "no GGML type holds the source grid ({reason}): dequantized and requantized to {t}, not exact"
        )),
        (Exactness::Dequantized { reason }, None) => Some(format!(
            "no GGML type holds the source grid ({reason}): written dequantized as F32, exact"
        )),
        (_, Some(t)) => Some(format!("requantized from the source grid to {t}: not exact")),
        (Exactness::Exact, None) => None,
    }
}

fn same_type(t: QuantType, d: WeightDType) -> bool {
    match d {
        WeightDType::F32 => t == QuantType::F32,
        WeightDType::F16 => t == QuantType::F16,
        WeightDType::BF16 => t == QuantType::BF16,
        WeightDType::Quant(q) => t.ggml() == q,
    }
}

/// A `model.layers.N.…` name's layer index and what follows it.
fn split_layer(name: &str) -> Option<(usize, &str)> {
    let (l, tail) = name.strip_prefix("model.layers.")?.split_once('.')?;
    Some((l.parse().ok()?, tail))
}

/// The layer index of a `model.layers.N.…` name.
fn layer_of(name: &str) -> Option<usize> {
    split_layer(name).map(|(l, _)| l)
}

/// File order: embeddings, then layers in numeric order, final norm, output head, the rest.
fn order_key(name: &str) -> (u8, usize, String) {
    if name == "model.embed_tokens.weight" {
        return (0, 0, String::new());
    }
    if let Some((l, tail)) = split_layer(name) {
        return (1, l, tail.to_string());
    }
    match name {
        "model.norm.weight" => (2, 0, String::new()),
        "lm_head.weight" => (3, 0, String::new()),
        _ => (4, 0, name.to_string()),
    }
}

/// Totals of a plan.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    pub params: usize,
    pub bytes: usize,
    pub full_precision_params: usize,
}

impl Totals {
    pub fn bits_per_weight(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.params.max(1) as f64
    }
    pub fn full_precision_share(&self) -> f64 {
        self.full_precision_params as f64 / self.params.max(1) as f64
    }
}

impl Plan {
    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for (_, f) in &self.computed {
            t.bytes += 4 * f.len();
        }
        for p in &self.tensors {
            t.params += p.elems();
            t.bytes += p.bytes;
            if p.is_full_precision() {
                t.full_precision_params += p.elems();
            }
        }
        t
    }

    /// The plan as text: one line per tensor kind (per tensor when `verbose`), then totals.
    pub fn summary(&self, verbose: bool) -> String {
        let mut s = String::new();
        let mut kinds: Vec<TensorKind> = self.tensors.iter().map(|t| t.kind).collect();
        kinds.sort();
        kinds.dedup();
        let _ = writeln!(
            s,
            "{:<12} {:>7} {:>12} {:>12}  types",
            "kind", "tensors", "params", "bytes"
        );
        for k in kinds {
            let of_kind: Vec<&PlannedTensor> =
                self.tensors.iter().filter(|t| t.kind == k).collect();
            let mut types: Vec<String> = of_kind.iter().map(|t| t.type_name()).collect();
            types.sort();
            let mut counted: Vec<String> = Vec::new();
            let mut i = 0;
            while i < types.len() {
                let j = types[i..].iter().take_while(|t| **t == types[i]).count();
                counted.push(format!("{} x{j}", types[i]));
                i += j;
            }
            let _ = writeln!(
                s,
                "{:<12} {:>7} {:>12} {:>12}  {}",
                k.name(),
                of_kind.len(),
                of_kind.iter().map(|t| t.elems()).sum::<usize>(),
                of_kind.iter().map(|t| t.bytes).sum::<usize>(),
                counted.join(", ")
            );
        }
        if verbose {
            let _ = writeln!(s);
            for t in &self.tensors {
                let _ = writeln!(
                    s,
                    "{:<40} {:<14} {:>6} -> {:<6} {:>12}{}",
                    t.gguf_name,
                    format!("{:?}", t.shape),
                    t.source_type.name().to_lowercase(),
                    t.type_name(),
                    t.bytes,
                    t.note
                        .as_deref()
                        .map(|n| format!("  ({n})"))
                        .unwrap_or_default()
                );
            }
        }
        let fallbacks: Vec<&PlannedTensor> =
            self.tensors.iter().filter(|t| t.note.is_some()).collect();
        if !fallbacks.is_empty() {
            let _ = writeln!(
                s,
                "fallback: {} tensor(s) do not fit the type asked for:",
                fallbacks.len()
            );
            for t in fallbacks.iter().take(if verbose { usize::MAX } else { 4 }) {
                let _ = writeln!(s, "  {}: {}", t.gguf_name, t.note.as_deref().unwrap_or(""));
            }
            if !verbose && fallbacks.len() > 4 {
                let _ = writeln!(s, "  ... ({} more; -v lists all)", fallbacks.len() - 4);
            }
        }
        let inexact: Vec<&PlannedTensor> = self
            .tensors
            .iter()
            .filter(|t| t.exactness.is_some())
            .collect();
        if !inexact.is_empty() {
            let _ = writeln!(
                s,
                "from the quantized source: {} layer(s) not kept bit for bit:",
                inexact.len()
            );
            for t in inexact.iter().take(if verbose { usize::MAX } else { 4 }) {
                let _ = writeln!(
                    s,
                    "  {}: {}",
                    t.gguf_name,
                    t.exactness.as_deref().unwrap_or("")
                );
            }
            if !verbose && inexact.len() > 4 {
                let _ = writeln!(s, "  ... ({} more; -v lists all)", inexact.len() - 4);
            }
        }
        for n in &self.skipped {
            let _ = writeln!(s, "skipped (no GGUF name): {n}");
        }
        let t = self.totals();
        let _ = writeln!(
            s,
            "total: {} tensors, {} params, {} bytes ({:.1} MiB), {:.2} bits/weight, {:.1}% of weights kept at 16+ bits",
            self.tensors.len(),
            t.params,
            t.bytes,
            t.bytes as f64 / (1u64 << 20) as f64,
            t.bits_per_weight(),
            100.0 * t.full_precision_share()
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_from_names() {
        assert_eq!(
            TensorKind::of("model.layers.3.self_attn.q_proj.weight"),
            TensorKind::Attention
        );
        assert_eq!(
            TensorKind::of("model.layers.3.self_attn.q_proj.bias"),
            TensorKind::Bias
        );
        assert_eq!(
            TensorKind::of("model.layers.3.mlp.down_proj.weight"),
            TensorKind::Mlp
        );
        assert_eq!(
            TensorKind::of("model.layers.3.input_layernorm.weight"),
            TensorKind::Norm
        );
        assert_eq!(TensorKind::of("model.norm.weight"), TensorKind::Norm);
        assert_eq!(TensorKind::of("lm_head.weight"), TensorKind::Output);
    }

    #[test]
    fn rules_and_types_parse() {
        let r = Rule::parse(r"mlp\.down_proj=q6_k").unwrap();
        assert_eq!(r.choice, TypeChoice::To(QuantType::Q6K));
        assert_eq!(Rule::parse("x=keep").unwrap().choice, TypeChoice::Keep);
        assert!(Rule::parse("x=q9_9")
            .unwrap_err()
            .to_string()
            .contains("unknown type"));
        assert!(Rule::parse("nope").is_err());
        assert!(Rule::parse("(=q8_0")
            .unwrap_err()
            .to_string()
            .contains("invalid regex"));
    }

    #[test]
    fn recipe_parses_and_rejects_unknown_keys() {
        let r: Recipe = toml::from_str(
            "scheme = \"q4_k\"\nattention = \"q8_0\"\n[[rules]]\npattern = 'mlp\\.down_proj'\ntype = \"q6_k\"\n",
        )
        .unwrap();
        assert_eq!(r.scheme.as_deref(), Some("q4_k"));
        assert_eq!(r.rules.len(), 1);
        assert!(toml::from_str::<Recipe>("schema = \"q4_k\"").is_err());
        let r: Recipe = toml::from_str("scheme = \"q4_0\"\nedge_mlp = \"2=q8_0\"\n").unwrap();
        let e = r.to_policy().unwrap().edge_mlp.unwrap();
        assert_eq!((e.count, e.choice), (2, TypeChoice::To(QuantType::Q8_0)));
    }

    #[test]
    fn edge_layers_parse_and_cover_both_ends() {
        let e = EdgeLayers::parse("2=q8_0").unwrap();
        let covered: Vec<usize> = (0..30).filter(|&l| e.covers(l, 30)).collect();
        assert_eq!(covered, [0, 1, 28, 29]);
        assert!(!EdgeLayers::parse("0=q8_0").unwrap().covers(0, 30));
        // More edge layers than the model has: every layer.
        assert!((0..3).all(|l| EdgeLayers::parse("5=q8_0").unwrap().covers(l, 3)));
        for bad in ["2", "x=q8_0", "2=q9_9", "-1=q8_0"] {
            assert!(EdgeLayers::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(layer_of("model.layers.12.mlp.up_proj.weight"), Some(12));
        assert_eq!(layer_of("model.norm.weight"), None);
    }

    /// stories260K (5 layers; 64-wide gate/up rows fit Q4_0, 172-wide down rows fit no block
    /// type): with one edge layer at Q8_0, layers 0 and 4's gate/up are Q8_0, the others Q4_0,
    /// and a rule still wins over the edge choice.
    #[test]
    fn edge_mlp_layers_take_their_type_and_rules_win() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/stories260K");
        let ck = Checkpoint::open(&dir, None).unwrap();
        let mut policy = Policy::new(QuantType::Q4_0);
        policy.edge_mlp = Some(EdgeLayers::parse("1=q8_0").unwrap());
        policy
            .rules
            .push(Rule::parse(r"layers\.4\.mlp\.up_proj=q4_0").unwrap());
        let plan = make_plan(&ck, &policy).unwrap();
        let ty = |n: &str| {
            let t = plan.tensors.iter().find(|t| t.source_name == n).unwrap();
            t.target
        };
        let q8 = Some(QuantType::Q8_0);
        let q4 = Some(QuantType::Q4_0);
        assert_eq!(ty("model.layers.0.mlp.gate_proj.weight"), q8);
        assert_eq!(ty("model.layers.0.mlp.up_proj.weight"), q8);
        assert_eq!(ty("model.layers.4.mlp.gate_proj.weight"), q8);
        assert_eq!(ty("model.layers.4.mlp.up_proj.weight"), q4);
        for l in 1..4 {
            assert_eq!(ty(&format!("model.layers.{l}.mlp.gate_proj.weight")), q4);
        }
        // Attention keeps its type; the edge choice is the MLP's alone.
        assert_eq!(ty("model.layers.0.self_attn.q_proj.weight"), None);
    }
}
