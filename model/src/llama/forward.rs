//! The forward pass: its entry points and the layer loop, written once over a
//! [`Backend`](super::backend::Backend) (the CPU's, or the GPU's when the model is resident
//! there).

use super::backend::{Backend, Buf, CpuBuffers, CpuPass, Norm};
use super::greedy_head::RowReads;
use super::profile::{OpTimes, Timer};
use super::{KvCache, Llama, Sublayer};
use crate::error::{Error, Result};
use candle_core::{DType, Tensor};
use tandem_kernels::sampling::{DrawNoise, SamplingParams};

/// Sees the input of every linear layer during a forward pass (calibration for importance-
/// weighted quantization collects its statistics this way).
pub trait ActivationObserver {
    /// `x` is the [tokens, in] f32 input about to be multiplied by each of `weights` (Hugging
    /// Face names, e.g. `model.layers.0.mlp.down_proj.weight`; q/k/v, and gate/up, share one
    /// input and come in one call).
    fn observe(&self, weights: &[String], x: &Tensor) -> Result<()>;
}

/// Which positions' logits a forward call returns.
///
/// It also decides how the positions that return none are computed. On CPUs with AMX, the
/// F16 linear layers run a prompt's rows that return no logits on the tile unit: 2x faster,
/// to f32 rounding of the FMA kernels rather than bit for bit (`tandem_kernels::
/// matmul_f16_bulk`; their attention over an f16 cache too, `attention_bulk`). Every row
/// whose logits a call returns, and every row of a tree or of a [`Logits::Last`] pass over
/// several sequences, takes the FMA kernels, whose rows agree bit for bit however they are
/// batched; a [`Logits::None`] pass is all such rows, one sequence or several (each row's
/// value is the same either way; a batch that mixes prompts too short for the bulk kernels
/// with longer ones runs as two passes, see [`Llama::forward_batch_with`]). So a prompt's positions are computed the same way whether
/// the prompt is run with [`Logits::Last`] (plain generation) or its start with
/// [`Logits::None`], alone or beside other prompts (a batch's prefill), and its last token in
/// the first verification pass (speculative decoding), and they decode the same tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Every new position (verification, evaluation).
    All,
    /// Only the last new position (prefill before sampling).
    Last,
    /// None: the positions only fill the cache (a prompt's start before a speculative
    /// decoder verifies its last token with the first drafts).
    None,
}

/// What the caller reads of each row of logits a forward call returns (see
/// [`Llama::forward_with`]).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum HeadRows {
    /// Every logit.
    #[default]
    All,
    /// Only each row's argmax (greedy decoding).
    Argmax,
    /// Only each row's position-keyed draw with this noise (`Sampler::sample_at` at the
    /// sequence index after the row's token; plain temperature sampling).
    Draw(DrawNoise),
    /// Only each row's k largest logits (the lower index first on ties): all that a top-k
    /// distribution (`Sampler::distribution`, with or without top-p) reads, so every draw
    /// from it, keyed or not, is the full row's.
    TopK(usize),
}

impl HeadRows {
    /// What a decoder drawing each token with `Sampler::sample_at` under `params` reads:
    /// the argmax when greedy, the draw for plain temperature, the top k with top-k (and any
    /// top-p), every logit for top-p alone (its nucleus is cut by the whole vocabulary's
    /// mass).
    pub fn for_draws(params: &SamplingParams) -> Self {
        if params.is_greedy() {
            HeadRows::Argmax
        } else if params.top_k > 0 {
            HeadRows::TopK(params.top_k)
        } else {
            DrawNoise::of(params).map_or(HeadRows::All, HeadRows::Draw)
        }
    }

    /// Whether rows for these reads come from the screened head (whose screen
    /// [`Llama::prepare_head_for`] builds ahead of time).
    pub fn is_screened(&self) -> bool {
        !matches!(self, HeadRows::All)
    }
}

/// The logits a forward call returns: `rows` rows of `vocab` f32 values, one per position
/// asked for (see [`Logits`]), in order.
#[derive(Debug, Clone, PartialEq)]
pub struct LogitRows {
    data: Vec<f32>,
    vocab: usize,
}

impl LogitRows {
    /// `data` holds whole rows of `vocab` values.
    pub fn new(data: Vec<f32>, vocab: usize) -> Result<Self> {
        if vocab == 0 || !data.len().is_multiple_of(vocab) {
            return Err(Error::Invalid(format!(
                "{} logits are not rows of {vocab}",
                data.len()
            )));
        }
        Ok(LogitRows { data, vocab })
    }
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.data.len() / self.vocab
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    /// Values per row.
    pub fn vocab(&self) -> usize {
        self.vocab
    }
    /// Row `i`. Panics when `i >= len()`, as slice indexing does.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab..][..self.vocab]
    }
    /// The last row (a forward call returns at least one).
    pub fn last(&self) -> &[f32] {
        self.row(self.len() - 1)
    }
    /// The rows in order.
    pub fn rows(&self) -> std::slice::ChunksExact<'_, f32> {
        self.data.chunks_exact(self.vocab)
    }
    /// Every value, row after row.
    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }
    /// The last row, owned (no copy when it is the only one, as a `Logits::Last` call gives).
    pub fn into_last(mut self) -> Vec<f32> {
        let start = self.data.len() - self.vocab;
        self.data.drain(..start);
        self.data
    }
    /// The rows, owned.
    pub fn to_vecs(&self) -> Vec<Vec<f32>> {
        self.rows().map(<[f32]>::to_vec).collect()
    }
}

/// Buffers the forward pass reuses from call to call.
#[derive(Default)]
pub(super) struct Workspace {
    pub(super) cpu: CpuBuffers,
    /// Every sequence's new tokens and their positions, and which rows reach the head.
    tokens: Vec<u32>,
    positions: Vec<usize>,
    picked: Vec<usize>,
    counts: Vec<usize>,
    /// A shortlisted head's logits before they are spread over the vocabulary.
    short: Vec<f32>,
    /// The screened head's scores and candidates, and its rows' draw keys.
    greedy: super::greedy_head::GreedyScratch,
    draw_keys: Vec<u64>,
    pub(super) profile: Option<OpTimes>,
}

/// One forward call's sequences and what it returns, as the layer loop sees them.
pub(crate) struct Pass<'p, 't, 'c> {
    pub(super) seqs: &'p mut [(&'t [u32], &'c mut KvCache)],
    /// Every sequence's new tokens, in order, and their positions.
    pub(super) tokens: &'p [u32],
    pub(super) positions: &'p [usize],
    pub(super) which: Logits,
    pub(super) observer: Option<&'p dyn ActivationObserver>,
    /// A token tree's paths (one sequence; see [`Llama::forward_tree`]); `None`: causal.
    pub(super) tree: Option<&'p [Vec<u32>]>,
    pub(super) profile: Option<&'p mut OpTimes>,
    /// Scratch: rows that reach the head, and how many per sequence.
    pub(super) picked: &'p mut Vec<usize>,
    pub(super) counts: &'p mut Vec<usize>,
    pub(super) short: &'p mut Vec<f32>,
    /// What the caller reads of each row (see [`Llama::forward_with`]), and the screened
    /// head's scratch.
    pub(super) head_rows: HeadRows,
    pub(super) greedy: &'p mut super::greedy_head::GreedyScratch,
    pub(super) draw_keys: &'p mut Vec<u64>,
}

impl Llama {
    /// Runs `tokens` at positions [cache.len(), cache.len() + tokens.len()), appends their keys
    /// and values to `cache`, and returns f32 logits: a row per token for `Logits::All`, the
    /// last token's for `Logits::Last`.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, which: Logits) -> Result<LogitRows> {
        self.forward_observed(tokens, cache, which, None)
    }

    /// [`Llama::forward`], with rows that serve only what `reads` says is read of them.
    /// `HeadRows::Argmax` (greedy decoding): each row holds the exact logit (bit for bit
    /// [`Llama::forward`]'s) of every token that could be the row's largest and −∞ for the
    /// rest, so `argmax` of a row is [`Llama::forward`]'s and nothing else in it is.
    /// `HeadRows::Draw`: also every token that could be the row's draw (`Sampler::sample_at`
    /// at the index after the row's token, with the noise's seed and temperature), so that
    /// draw is [`Llama::forward`]'s. `HeadRows::TopK(k)`: every token that could be among
    /// the row's k largest, so a top-k distribution is [`Llama::forward`]'s. A 16-bit output head on the CPU is then screened by a
    /// Q8_0 copy with error bounds and only the candidates' rows are multiplied (about half
    /// the head's bytes per step; the copy is built on the first call, see
    /// `llama/greedy_head.rs`); other heads compute every logit.
    pub fn forward_with(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        which: Logits,
        reads: HeadRows,
    ) -> Result<LogitRows> {
        self.forward_one(tokens, cache, which, None, None, reads)
    }

    /// [`Llama::forward_tree`], with [`Llama::forward_with`]'s rows for `reads` (a row's
    /// draw is keyed by its depth: the index after its token on its own path).
    pub fn forward_tree_with(
        &self,
        tokens: &[u32],
        parents: &[Option<usize>],
        cache: &mut KvCache,
        reads: HeadRows,
    ) -> Result<LogitRows> {
        let tree = TreeLayout::new(parents, tokens.len())?;
        self.forward_one(tokens, cache, Logits::All, None, Some(tree), reads)
    }

    /// Builds the greedy head's screen now rather than on the first greedy call (so that a
    /// timed run does not pay for it); does nothing for a head it does not apply to.
    pub fn prepare_greedy_head(&self) -> Result<()> {
        self.greedy_head().map(|_| ())
    }

    /// [`Llama::prepare_greedy_head`] when calls with `reads` use the screen (so that time
    /// to first token does not include building it); nothing for `HeadRows::All`.
    pub fn prepare_head_for(&self, reads: HeadRows) -> Result<()> {
        if reads.is_screened() {
            self.prepare_greedy_head()?;
        }
        Ok(())
    }

    /// What the greedy head has done so far (`None`: it does not apply to this model's head,
    /// or no greedy call has built it yet).
    pub fn greedy_head_stats(&self) -> Option<super::GreedyHeadStats> {
        self.greedy_head.get()?.as_ref().map(|g| g.stats())
    }

    fn greedy_head(&self) -> Result<Option<&super::greedy_head::GreedyHead>> {
        if let Some(g) = self.greedy_head.get() {
            return Ok(g.as_ref());
        }
        // TANDEM_FULL_HEAD=1 keeps greedy calls on the full head (A/B timing of the screen).
        let built = if self.resident.is_some() || std::env::var_os("TANDEM_FULL_HEAD").is_some() {
            None
        } else {
            super::greedy_head::GreedyHead::build(&self.lm_head)?
        };
        // Every greedy step streams the screen, as it does the layers
        // (`Llama::back_with_huge_pages`).
        if let Some(g) = &built {
            tandem_kernels::huge_pages::back_with_huge_pages(&[g.screen_memory()]);
        }
        // A concurrent first call may have won the race; either screen is the same.
        Ok(self.greedy_head.get_or_init(|| built).as_ref())
    }

    /// [`Llama::forward`], showing each linear layer's input to `observer`.
    pub fn forward_observed(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        which: Logits,
        observer: Option<&dyn ActivationObserver>,
    ) -> Result<LogitRows> {
        self.forward_one(tokens, cache, which, observer, None, HeadRows::All)
    }

    /// One sequence's pass through [`Llama::forward_inner`].
    fn forward_one(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        which: Logits,
        observer: Option<&dyn ActivationObserver>,
        tree: Option<TreeLayout>,
        reads: HeadRows,
    ) -> Result<LogitRows> {
        self.forward_inner(&mut [(tokens, cache)], which, observer, tree, reads)?
            .pop()
            .ok_or_else(|| Error::Invalid("no output (internal error)".into()))
    }

    /// Several sequences in one pass, each with its own cache: every linear layer runs once
    /// over all their new rows (each weight is read once for the whole batch) and attention
    /// runs per sequence. Returns one [`LogitRows`] per sequence, as [`Llama::forward`] would;
    /// with [`Logits::All`] and [`Logits::None`] the values are the same as running the
    /// sequences one by one, bit for bit. With [`Logits::Last`], on a CPU with AMX, a sequence
    /// alone runs its rows before the last on the tile unit and a batch does not (see
    /// [`Logits`]), so its logits agree to f32 rounding; run the starts with `None` and the
    /// last tokens after them where bits must agree (as the speculative decoders do).
    pub fn forward_batch(
        &self,
        seqs: &mut [(&[u32], &mut KvCache)],
        which: Logits,
    ) -> Result<Vec<LogitRows>> {
        self.forward_batch_with(seqs, which, HeadRows::All)
    }

    /// [`Llama::forward_batch`], with [`Llama::forward_with`]'s rows for `reads`.
    pub fn forward_batch_with(
        &self,
        seqs: &mut [(&[u32], &mut KvCache)],
        which: Logits,
        reads: HeadRows,
    ) -> Result<Vec<LogitRows>> {
        // A `None` batch whose prompts fall on both sides of the bulk kernels' row threshold
        // runs as two passes, long prompts and short, so each prompt's rows take the kernels
        // they take alone (see `Logits`): bit for bit the values of one at a time.
        let long = |t: &[u32]| tandem_kernels::bulk_rows_suffice(t.len());
        let n_long = seqs.iter().filter(|(t, _)| long(t)).count();
        if which != Logits::None || n_long == 0 || n_long == seqs.len() {
            return self.forward_inner(seqs, which, None, None, reads);
        }
        let (mut longs, mut shorts) = (Vec::new(), Vec::new());
        for (t, cache) in seqs.iter_mut() {
            let group = if long(t) { &mut longs } else { &mut shorts };
            group.push((*t, &mut **cache));
        }
        let mut long_out = self
            .forward_inner(&mut longs, which, None, None, reads)?
            .into_iter();
        let mut short_out = self
            .forward_inner(&mut shorts, which, None, None, reads)?
            .into_iter();
        seqs.iter()
            .map(|(t, _)| {
                let next = if long(t) {
                    long_out.next()
                } else {
                    short_out.next()
                };
                next.ok_or_else(|| {
                    Error::Invalid("a batch lost a sequence (internal error)".into())
                })
            })
            .collect()
    }

    /// Runs a token tree after the cache in one pass (speculative verification of several
    /// candidates): `tokens[i]` follows `tokens[parents[i]]`, or the context when the parent
    /// is `None`; parents come before their children. Row i attends to the context and its
    /// own path, at position `cache.len()` + its depth, so its logits are bit for bit those of
    /// decoding its path plainly. All the rows' keys and values are appended to the cache;
    /// [`Llama::keep_cache_rows`] then keeps the accepted path's.
    pub fn forward_tree(
        &self,
        tokens: &[u32],
        parents: &[Option<usize>],
        cache: &mut KvCache,
    ) -> Result<LogitRows> {
        self.forward_tree_with(tokens, parents, cache, HeadRows::All)
    }

    fn forward_inner(
        &self,
        seqs: &mut [(&[u32], &mut KvCache)],
        which: Logits,
        observer: Option<&dyn ActivationObserver>,
        tree: Option<TreeLayout>,
        reads: HeadRows,
    ) -> Result<Vec<LogitRows>> {
        for (tokens, cache) in seqs.iter() {
            let (t, n) = (tokens.len(), cache.len);
            if t == 0 {
                return Err(Error::Invalid("forward called with no tokens".into()));
            }
            if n + t > cache.limit {
                return Err(Error::ContextFull {
                    needed: n + t,
                    limit: cache.limit,
                });
            }
            if let Some(bad) = tokens
                .iter()
                .find(|&&id| id as usize >= self.config.vocab_size)
            {
                return Err(Error::Invalid(format!(
                    "token id {bad} is outside the vocabulary ({})",
                    self.config.vocab_size
                )));
            }
        }
        let mut fresh = Workspace::default();
        let mut held = self.workspace.try_lock();
        let ws = match held.as_mut() {
            Ok(w) => &mut **w,
            Err(_) => &mut fresh,
        };
        ws.tokens.clear();
        ws.positions.clear();
        for (tokens, cache) in seqs.iter() {
            ws.tokens.extend_from_slice(tokens);
            match &tree {
                Some(t) => ws
                    .positions
                    .extend(t.paths.iter().map(|p| cache.len + p.len() - 1)),
                None => ws.positions.extend(cache.len..cache.len + tokens.len()),
            }
        }
        let mut profile = ws.profile.take();
        // The GPU pass (its captured graphs) always ends in the head: it computes the last
        // row's logits for a call that reads none, which drops them.
        let which = match (&self.resident, which) {
            (Some(_), Logits::None) => Logits::Last,
            _ => which,
        };
        let mut pass = Pass {
            seqs,
            tokens: &ws.tokens,
            positions: &ws.positions,
            which,
            observer,
            tree: tree.as_ref().map(|t| t.paths.as_slice()),
            profile: profile.as_mut(),
            picked: &mut ws.picked,
            counts: &mut ws.counts,
            short: &mut ws.short,
            head_rows: reads,
            greedy: &mut ws.greedy,
            draw_keys: &mut ws.draw_keys,
        };
        let mut run = || match &self.resident {
            Some(r) => r.forward(self, &mut pass),
            None => {
                let rows = pass.tokens.len();
                // Rows that return no logits, first in the pass (see `Logits`).
                // A `None` pass of several sequences only when each has the rows to take
                // the bulk kernels alone (`forward_batch_with` splits a batch that mixes).
                let each_long = pass
                    .seqs
                    .iter()
                    .all(|(t, _)| tandem_kernels::bulk_rows_suffice(t.len()));
                let bulk = match (pass.which, pass.seqs.len(), pass.tree) {
                    (Logits::Last, 1, None) => rows - 1,
                    (Logits::None, 1, None) => rows,
                    (Logits::None, _, None) if each_long => rows,
                    _ => 0,
                };
                let mut cpu = CpuPass::new(self, &mut ws.cpu, rows).with_bulk_rows(bulk);
                self.run_pass(&mut cpu, &mut pass)
            }
        };
        let out = match self.pool {
            Some(p) => tandem_kernels::pool::scoped(p, run),
            None => run(),
        };
        if let Some(p) = profile.as_mut() {
            p.calls += 1;
        }
        ws.profile = profile;
        out
    }

    /// The layer loop: embeddings, every decoder layer, the output head, on backend `b`.
    pub(super) fn run_pass(
        &self,
        b: &mut impl Backend,
        pass: &mut Pass<'_, '_, '_>,
    ) -> Result<Vec<LogitRows>> {
        for (tokens, cache) in pass.seqs.iter_mut() {
            let needed = cache.len + tokens.len();
            b.reserve(cache, needed)?;
        }
        let mut timer = Timer::new(pass.profile.as_deref_mut());
        b.begin(pass.tokens, pass.positions)?;
        timer.lap(b, "embed");
        for li in 0..self.layers.len() {
            if !self.skips(Sublayer::Attention(li)) {
                self.attention_half(b, li, pass.seqs, pass.tree, pass.observer, &mut timer)?;
            }
            if !self.skips(Sublayer::Mlp(li)) {
                self.mlp_half(b, li, pass.observer, &mut timer)?;
            }
        }
        // Which rows go through the output head, and how they split per sequence.
        head_rows(pass.seqs, pass.which, pass.picked, pass.counts);
        let picked: &[usize] = pass.picked;
        let vocab = self.config.vocab_size;
        if picked.is_empty() {
            // `Logits::None`: no row goes through the head.
            return split_logits(Vec::new(), pass.counts, vocab);
        }
        let mut logits = vec![0f32; picked.len() * vocab];
        self.extend_shortlist(pass.tokens)?;
        let shortlist = self.shortlist.read().unwrap_or_else(|e| e.into_inner());
        let screened = match pass.head_rows {
            HeadRows::Argmax | HeadRows::Draw(_) | HeadRows::TopK(_)
                if pass.observer.is_none() && shortlist.is_none() =>
            {
                self.greedy_head()?
            }
            _ => None,
        };
        if let Some(g) = screened {
            let hn = b.head_input(picked)?;
            let reads = match pass.head_rows {
                HeadRows::Draw(noise) => {
                    // A row's logits decide the token after its own: its draw's index.
                    pass.draw_keys.clear();
                    pass.draw_keys
                        .extend(picked.iter().map(|&r| noise.key(pass.positions[r] + 1)));
                    RowReads::Draw(noise, pass.draw_keys.as_slice())
                }
                HeadRows::TopK(k) => RowReads::TopK(k),
                _ => RowReads::Argmax,
            };
            g.logits(
                &self.lm_head,
                hn,
                picked.len(),
                reads,
                &mut *pass.greedy,
                &mut logits,
            )?;
        } else if pass.observer.is_none() && shortlist.is_none() {
            b.head(picked, &self.lm_head, &mut logits)?;
        } else {
            let hn = b.head_input(picked)?;
            show_input(pass.observer, None, &["lm_head.weight"], hn, picked.len())?;
            match &*shortlist {
                Some(s) => s.logits(hn, picked.len(), pass.short, &mut logits)?,
                None => self.lm_head.forward_into(hn, picked.len(), &mut logits)?,
            }
        }
        timer.lap(b, "norm + lm_head matmul");
        split_logits(logits, pass.counts, vocab)
    }

    /// A decoder layer's attention half: `X += o(attention(q, k, v))` over RMSNorm(X),
    /// appending to each sequence's cache at layer `li`.
    pub(super) fn attention_half(
        &self,
        b: &mut impl Backend,
        li: usize,
        seqs: &mut [(&[u32], &mut KvCache)],
        tree: Option<&[Vec<u32>]>,
        observer: Option<&dyn ActivationObserver>,
        timer: &mut Timer<'_>,
    ) -> Result<()> {
        let layer = &self.layers[li];
        let (nh, nkv) = (self.config.num_attention_heads, self.config.num_kv_heads());
        b.rms_norm(Norm::Attention(li), Buf::X, Buf::Hn)?;
        timer.lap(b, "norm");
        let qkv = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"];
        show(b, observer, li, &qkv, Buf::Hn, Buf::Hn.width(&self.config))?;
        b.matmul_joined(
            &[&layer.q, &layer.k, &layer.v],
            Buf::Hn,
            &[Buf::Q, Buf::K, Buf::V],
        )?;
        timer.lap(b, "q/k/v matmul");
        b.rope(Buf::Q, nh)?;
        b.rope(Buf::K, nkv)?;
        timer.lap(b, "rope");
        b.attention(li, seqs, tree)?;
        timer.lap(b, "attention");
        show(
            b,
            observer,
            li,
            &["self_attn.o_proj"],
            Buf::Att,
            Buf::Att.width(&self.config),
        )?;
        b.matmul(&layer.o, Buf::Att, Buf::Proj)?;
        timer.lap(b, "o matmul");
        b.add(Buf::X, Buf::Proj)
    }

    /// A decoder layer's MLP half: `X += down(silu(gate·n) ⊙ up·n)`, n = RMSNorm(X).
    pub(super) fn mlp_half(
        &self,
        b: &mut impl Backend,
        li: usize,
        observer: Option<&dyn ActivationObserver>,
        timer: &mut Timer<'_>,
    ) -> Result<()> {
        let layer = &self.layers[li];
        b.rms_norm(Norm::Mlp(li), Buf::X, Buf::Hn)?;
        timer.lap(b, "norm");
        show(
            b,
            observer,
            li,
            &["mlp.gate_proj", "mlp.up_proj"],
            Buf::Hn,
            Buf::Hn.width(&self.config),
        )?;
        b.matmul_joined(&[&layer.gate, &layer.up], Buf::Hn, &[Buf::Gate, Buf::Up])?;
        timer.lap(b, "gate/up matmul");
        b.silu_mul(Buf::Gate, Buf::Up)?;
        timer.lap(b, "silu");
        show(
            b,
            observer,
            li,
            &["mlp.down_proj"],
            Buf::Gate,
            Buf::Gate.width(&self.config),
        )?;
        b.matmul(&layer.down, Buf::Gate, Buf::Proj)?;
        timer.lap(b, "down matmul");
        b.add(Buf::X, Buf::Proj)
    }

    /// Embedding rows of `ids` into `out` as f32.
    pub(super) fn embed_rows(&self, ids: &[u32], out: &mut [f32]) -> Result<()> {
        let h = self.config.hidden_size;
        let (storage, layout) = self.embed.storage_and_layout();
        let off = layout.start_offset();
        match &*storage {
            candle_core::Storage::Cpu(s) if self.embed.dtype() == DType::F16 => {
                let all = s.as_slice::<half::f16>()?;
                for (dst, &id) in out.chunks_exact_mut(h).zip(ids) {
                    let row = &all[off + id as usize * h..][..h];
                    for (d, v) in dst.iter_mut().zip(row) {
                        *d = v.to_f32();
                    }
                }
            }
            candle_core::Storage::Cpu(s) if self.embed.dtype() == DType::F32 => {
                let all = s.as_slice::<f32>()?;
                for (dst, &id) in out.chunks_exact_mut(h).zip(ids) {
                    dst.copy_from_slice(&all[off + id as usize * h..][..h]);
                }
            }
            _ => {
                let idx = Tensor::new(ids, self.embed.device())?;
                let v: Vec<f32> = self
                    .embed
                    .index_select(&idx, 0)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()?;
                out.copy_from_slice(&v);
            }
        }
        Ok(())
    }

    /// RoPE cosines and sines of `positions`, [positions, head_dim / 2] each. Angles are
    /// f32 products position · inverse frequency, as candle computed them.
    pub(super) fn rope_rows(&self, positions: &[usize], cos: &mut [f32], sin: &mut [f32]) {
        let half = self.rope_inv.len();
        for (r, &p) in positions.iter().enumerate() {
            let (c, s) = (&mut cos[r * half..][..half], &mut sin[r * half..][..half]);
            for ((c, s), f) in c.iter_mut().zip(s.iter_mut()).zip(&self.rope_inv) {
                let a = p as f32 * f;
                *c = a.cos();
                *s = a.sin();
            }
        }
    }
}

/// A token tree as the attention kernel reads it: per row, the rows of its path (its
/// ancestors, then itself).
struct TreeLayout {
    paths: Vec<Vec<u32>>,
}

impl TreeLayout {
    fn new(parents: &[Option<usize>], tokens: usize) -> Result<Self> {
        if parents.len() != tokens {
            return Err(Error::Invalid(format!(
                "a token tree of {tokens} tokens given {} parents",
                parents.len()
            )));
        }
        let mut paths: Vec<Vec<u32>> = Vec::with_capacity(tokens);
        for (i, p) in parents.iter().enumerate() {
            let mut path = match *p {
                None => Vec::new(),
                Some(p) if p < i => paths[p].clone(),
                Some(p) => {
                    return Err(Error::Invalid(format!(
                        "token tree node {i} names parent {p}: parents must come first"
                    )))
                }
            };
            path.push(i as u32);
            paths.push(path);
        }
        Ok(TreeLayout { paths })
    }
}

/// Shows buffer `buf` (the input of layer `li`'s `modules`) to the observer, if any.
fn show(
    b: &mut impl Backend,
    observer: Option<&dyn ActivationObserver>,
    li: usize,
    modules: &[&str],
    buf: Buf,
    width: usize,
) -> Result<()> {
    if observer.is_none() {
        return Ok(());
    }
    let x = b.host(buf)?;
    show_input(observer, Some(li), modules, x, x.len() / width)
}

/// Shows one linear input (`rows` rows of `x`) to the observer, if any, under the Hugging
/// Face names of the weights that read it (layer `li`'s `modules`, or top-level names).
fn show_input(
    observer: Option<&dyn ActivationObserver>,
    li: Option<usize>,
    modules: &[&str],
    x: &[f32],
    rows: usize,
) -> Result<()> {
    let Some(o) = observer else { return Ok(()) };
    let names: Vec<String> = modules
        .iter()
        .map(|m| match li {
            Some(li) => format!("model.layers.{li}.{m}.weight"),
            None => m.to_string(),
        })
        .collect();
    let t = Tensor::from_slice(x, (rows, x.len() / rows), &candle_core::Device::Cpu)?;
    o.observe(&names, &t)
}

/// After a forward pass over `seqs`: counts their new tokens into their caches and lists the
/// rows that reach the output head (`picked`, indices into the pass's rows) and how many of
/// them each sequence gets (`counts`).
pub(super) fn head_rows(
    seqs: &mut [(&[u32], &mut KvCache)],
    which: Logits,
    picked: &mut Vec<usize>,
    counts: &mut Vec<usize>,
) {
    picked.clear();
    counts.clear();
    let mut off = 0;
    for (tokens, cache) in seqs.iter_mut() {
        let t = tokens.len();
        cache.len += t;
        match which {
            Logits::All => {
                picked.extend(off..off + t);
                counts.push(t);
            }
            Logits::Last => {
                picked.push(off + t - 1);
                counts.push(1);
            }
            Logits::None => counts.push(0),
        }
        off += t;
    }
}

/// Splits the head's output rows into one [`LogitRows`] per sequence.
fn split_logits(mut logits: Vec<f32>, counts: &[usize], vocab: usize) -> Result<Vec<LogitRows>> {
    let total: usize = counts.iter().sum();
    let mut out = Vec::with_capacity(counts.len());
    let mut start = 0;
    for &n in counts {
        let part = if counts.len() == 1 && n == total {
            std::mem::take(&mut logits)
        } else {
            logits[start * vocab..(start + n) * vocab].to_vec()
        };
        out.push(LogitRows::new(part, vocab)?);
        start += n;
    }
    Ok(out)
}
