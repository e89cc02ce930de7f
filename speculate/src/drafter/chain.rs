//! Model drafters: the pick → gate → branch loop ([`DraftChain`]) and [`ModelDrafter`].

use super::{ungated, Draft, DraftEvidence, DraftGate, Drafter, Gate};
use crate::{DraftSampling, Result, Verifier};
use tandem_kernels::sampling::{argmax, argmax_with_lead, largest_other, logit_lead, LeadingDraw};

/// When a model drafter offers a second candidate beside its first, making its proposal a
/// token tree (EAGLE-2's dynamic trees in their smallest form: the draft's own confidence
/// decides where to branch): where its top probability is below `below`, the runner-up joins
/// as a leaf if it has at least `min_p`. Each leaf costs a verifier row, and pays only when
/// the verifier picks it, so once `warmup` leaves were offered and fewer than `min_win_rate`
/// of them won, the drafter stops branching (the tree is cut back to a chain).
#[derive(Debug, Clone, Default)]
pub struct Branching {
    pub below: f32,
    pub min_p: f32,
    pub warmup: usize,
    pub min_win_rate: f64,
    /// Leaves offered, and taken by the verifier, so far.
    pub offered: usize,
    pub won: usize,
    /// The last proposal, until the next one shows what the verifier took: the context's
    /// length then, the chain, and the leaves as (depth, token).
    pending: Option<PendingLeaves>,
}

/// A proposal's leaves awaiting the verifier's verdict (see [`Branching::settle`]).
#[derive(Debug, Clone)]
struct PendingLeaves {
    /// The context's length when proposed.
    len: usize,
    /// The main chain.
    chain: Vec<u32>,
    /// (depth, token) of each leaf.
    leaves: Vec<(usize, u32)>,
}

impl Branching {
    /// Branching where the draft's top probability is below `below` (0 = never).
    pub fn below(below: f32) -> Self {
        Branching {
            below,
            min_p: 0.05,
            warmup: 24,
            min_win_rate: 0.1,
            offered: 0,
            won: 0,
            pending: None,
        }
    }

    /// Whether leaves are offered at all (after the measured win rate is in).
    pub fn active(&self) -> bool {
        self.below > 0.0
            && (self.offered < self.warmup
                || self.won as f64 >= self.min_win_rate * self.offered as f64)
    }

    /// The runner-up to `chosen` under `probs` (the draft's distribution), when the draft is
    /// unsure enough to offer one.
    pub fn runner_up(&self, probs: &[f32], chosen: u32) -> Option<u32> {
        if !self.active() {
            return None;
        }
        let top = probs.iter().copied().fold(0.0f32, f32::max);
        if top >= self.below {
            return None;
        }
        let (best, p) = largest_other(probs, chosen)?;
        (p >= self.min_p).then_some(best)
    }

    /// The runner-up for a drafter's `pick`: from the distribution its token was sampled
    /// from (the last row of `probs`); for a draw with the verifier's noise, the draw's own
    /// runner-up where its lead is small; else from its logits.
    pub(crate) fn offer(
        &self,
        probs: &Option<Vec<Vec<f32>>>,
        logits: &[f32],
        pick: &Pick,
    ) -> Option<u32> {
        if !self.active() {
            return None;
        }
        let chosen = pick.draw.token;
        match probs.as_ref().and_then(|p| p.last()) {
            Some(q) => self.runner_up(q, chosen),
            None if pick.coupled => self.runner_up_of_draw(&pick.draw),
            None => self.runner_up_of_greedy(logits, &pick.draw),
        }
    }

    /// [`Branching::runner_up`] for a draft that drew its token with the verifier's noise
    /// (coupled sampling): the verifier takes the draft's token unless its own values
    /// (logits plus the same noise) rank another first, and that other is most likely the
    /// token the draft's values ranked second, whatever its probability (the logits' own
    /// runner-up won 24 of 278 trees' leaves at temperature 0.7). The draw is unsure when
    /// its lead is small: the leaf joins where 1 / (1 + e^−lead), the top token's share of
    /// the top two for a greedy lead, is below `below`.
    fn runner_up_of_draw(&self, draw: &LeadingDraw) -> Option<u32> {
        let share = 1.0 / (1.0 + (-draw.lead).exp());
        (share < self.below).then_some(draw.runner_up).flatten()
    }

    /// [`Branching::runner_up`] for a greedy draft (`draw.token` is the logits' argmax and
    /// `draw.runner_up` their runner-up), without building the distribution on every drafted
    /// token: p(chosen) is [`top_probability`], and any other token's p is
    /// exp(l − l_chosen) · p(chosen).
    fn runner_up_of_greedy(&self, logits: &[f32], draw: &LeadingDraw) -> Option<u32> {
        let top = top_probability(logits, draw.token);
        if top >= self.below {
            return None;
        }
        let best = draw.runner_up?;
        let p = (logits[best as usize] - logits[draw.token as usize]).exp() * top;
        (p >= self.min_p).then_some(best)
    }

    /// Counts the leaves of the last proposal the verifier took, now that `context` (the
    /// next proposal's) shows what followed it.
    pub(crate) fn settle(&mut self, context: &[u32]) {
        let Some(PendingLeaves { len, chain, leaves }) = self.pending.take() else {
            return;
        };
        let Some(emitted) = context.get(len..) else {
            return;
        };
        self.offered += leaves.len();
        // A leaf at depth d won when the verifier followed the chain to d and then took it.
        self.won += leaves
            .iter()
            .filter(|&&(d, t)| emitted.get(d) == Some(&t) && chain.get(..d) == emitted.get(..d))
            .count();
    }

    /// The proposal just made from a context of `len` tokens, as a tree.
    pub(crate) fn propose(&mut self, len: usize, chain: Draft, leaves: Vec<(usize, u32)>) -> Draft {
        if leaves.is_empty() {
            return chain;
        }
        let tree = Draft::with_siblings(chain, &leaves);
        let main = tree.main_chain().tokens;
        self.pending = Some(PendingLeaves {
            len,
            chain: main,
            leaves,
        });
        tree
    }
}

/// How many of the lowest token ids a draft model's output head keeps by default
/// ([`draft_shortlist`]).
pub const DEFAULT_DRAFT_VOCAB: usize = 16384;

/// The tokens a draft model computes logits for (`Llama::set_output_shortlist`): the `top`
/// lowest ids and every token of `prompt`; `None` when that is the whole vocabulary.
///
/// Why: SmolLM2's 49k-row output head is ~20% of a Q8_0 draft step, and a draft only needs
/// the tokens the verifier is likely to pick. BPE vocabularies number tokens in merge order,
/// so low ids are the frequent ones: of SmolLM2's greedy continuations of the 18 benchmark
/// prompts, 7% of tokens lie at ids >= 16384, and 1.8% outside ids < 16384 plus the prompt's
/// own (2.9% for 8192, 0.6% for 32768). A token outside the list is never proposed, which
/// costs only that proposal: the verifier still decides every token, so greedy output and the
/// sampled distribution do not change.
pub fn draft_shortlist(prompt: &[u32], vocab_size: usize, top: usize) -> Option<Vec<u32>> {
    if top == 0 || top >= vocab_size {
        return None;
    }
    let mut ids: Vec<u32> = (0..top as u32).collect();
    ids.extend(
        prompt
            .iter()
            .copied()
            .filter(|&t| (t as usize) >= top && (t as usize) < vocab_size),
    );
    ids.sort_unstable();
    ids.dedup();
    Some(ids)
}

/// A model drafter's token as [`pick_draft_token`] picked it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Pick {
    /// The token, its lead, and (greedy or coupled) the runner-up of the same values.
    pub draw: LeadingDraw,
    /// Drawn with the verifier's noise ([`DraftSampling::Coupled`]).
    pub coupled: bool,
}

/// Picks the draft token at sequence index `position` from `logits`: its argmax, its draw on
/// the draft's own stream (that distribution pushed to `probs`), or its position-keyed draw
/// with the verifier's seed, as `sampling` says; `None` when the draft's most likely token has
/// less than `min_confidence` probability (drafting stops there).
fn pick_draft_token(
    sampling: &mut DraftSampling,
    probs: &mut Option<Vec<Vec<f32>>>,
    logits: &[f32],
    min_confidence: f32,
    position: usize,
) -> Option<Pick> {
    match (sampling, probs) {
        (DraftSampling::Independent(s), Some(probs)) => {
            let p = s.distribution(logits);
            if p.iter().copied().fold(0.0f32, f32::max) < min_confidence {
                return None;
            }
            let token = s.sample_from(&p);
            probs.push(p);
            let draw = LeadingDraw {
                token,
                lead: logit_lead(logits, token),
                runner_up: None,
            };
            Some(Pick {
                draw,
                coupled: false,
            })
        }
        (DraftSampling::Coupled(s), _) => {
            let confident =
                min_confidence <= 0.0 || top_probability(logits, argmax(logits)) >= min_confidence;
            // The lead of the draw itself (its value with the noise the verifier will draw
            // too), not of the logits: what decides whether the verifier draws the same.
            confident.then(|| Pick {
                draw: s.draw_with_lead(logits, position),
                coupled: true,
            })
        }
        _ => {
            let draw = argmax_with_lead(logits);
            (min_confidence <= 0.0 || top_probability(logits, draw.token) >= min_confidence)
                .then_some(Pick {
                    draw,
                    coupled: false,
                })
        }
    }
}

/// How a model drafter builds its chain, whatever model runs it: how it picks each token, when
/// it stops, and where it offers a second candidate. [`crate::SpecConfig::draft_chain`] builds
/// one from a run's settings; a bare sampling makes the default chain (`.into()`).
pub struct DraftChain {
    pub sampling: DraftSampling,
    /// Stop drafting when the draft's most likely next token has less than this probability
    /// (0 = always draft k): an unsure draft is usually a rejected one, and each drafted
    /// token costs a draft step and a verification row. The stopping rule reads only the
    /// draft's own distribution, so greedy output and the sampled distribution stay the
    /// verifier's (llama.cpp's `--draft-p-min`).
    pub min_confidence: f32,
    /// Second candidates where the draft is unsure (a token tree); off by default.
    pub branching: Branching,
    /// Tokens that end generation: the chain stops after one ([`Drafter::set_stop_tokens`]).
    pub stop: Vec<u32>,
}

impl From<DraftSampling> for DraftChain {
    fn from(sampling: DraftSampling) -> Self {
        DraftChain {
            sampling,
            min_confidence: 0.0,
            branching: Branching::default(),
            stop: Vec::new(),
        }
    }
}

impl DraftChain {
    /// Up to `k` tokens after `context`: `feed(first)` gives the model's logits for the next
    /// position (`first`: what it has not read of `context` yet, at least its last token),
    /// and `feed(&[t])` those after drafted token t. Each token is picked
    /// ([`pick_draft_token`]), shown to `gate` ([`take_drafted_token`]) and the chain cut
    /// where either says so; the model never reads the chain's last token.
    pub(crate) fn propose(
        &mut self,
        context: &[u32],
        k: usize,
        gate: &mut DraftGate<'_>,
        first: &[u32],
        mut feed: impl FnMut(&[u32]) -> Result<Vec<f32>>,
    ) -> Result<Draft> {
        self.branching.settle(context);
        let mut draft = Draft {
            tokens: Vec::with_capacity(k),
            probs: self.sampling.keeps_probs().then(|| Vec::with_capacity(k)),
            parents: None,
        };
        if k == 0 {
            return Ok(draft);
        }
        let mut logits = feed(first)?;
        let mut leaves = Vec::new();
        for i in 0..k {
            let Some(picked) = pick_draft_token(
                &mut self.sampling,
                &mut draft.probs,
                &logits,
                self.min_confidence,
                context.len() + i,
            ) else {
                break;
            };
            let t = picked.draw.token;
            let more = take_drafted_token(
                gate,
                &self.branching,
                &self.stop,
                &mut draft,
                &mut leaves,
                &logits,
                i,
                picked,
            );
            if !more {
                break;
            }
            if i + 1 < k {
                logits = feed(&[t])?;
            }
        }
        Ok(self.branching.propose(context.len(), draft, leaves))
    }
}

/// A (smaller or quantized) model proposing tokens autoregressively over a context of its own.
/// With a sampler it samples (and reports the distributions it sampled from); without, it
/// proposes its greedy tokens. Any [`Verifier`]-shaped model drafts: tandem's own
/// ([`ModelDrafter::new`]) or an engine's (the C ABI wraps the engine's callbacks as one).
pub struct ModelDrafter<V: Verifier> {
    pub model: V,
    /// The tokens the model's context holds, to find what to keep when the context moves on;
    /// `fed[0]` is `context[offset]`.
    fed: Vec<u32>,
    offset: usize,
    /// Most tokens read when the draft first sees a prompt (the last ones).
    pub first_window: usize,
    /// When the draft has fallen behind by more than this (speculation was off for a while),
    /// it restarts from the last `catch_up_window` tokens instead of reading every one it
    /// missed: reading them all cost ~25% of plain decoding with a self-draft, speculation
    /// on or off (every token went through the draft at prefill speed).
    pub catch_up_window: usize,
    /// How it picks, gates, branches and stops each token.
    pub chain: DraftChain,
}

/// softmax(logits)[top] where `top` is the largest logit: 1 / Σ exp(lᵢ − l_top).
fn top_probability(logits: &[f32], top: u32) -> f32 {
    let m = logits[top as usize];
    1.0 / logits.iter().map(|&l| (l - m).exp()).sum::<f32>()
}

impl<V: Verifier> ModelDrafter<V> {
    pub fn over(model: V, chain: impl Into<DraftChain>) -> Self {
        ModelDrafter {
            model,
            fed: Vec::new(),
            offset: 0,
            first_window: 64,
            catch_up_window: 16,
            chain: chain.into(),
        }
    }
}

/// A model drafter's token `pick`, drafted as token `i` of its chain from `logits`
/// ([`pick_draft_token`]): asks `gate` about it (by its lead over the runner-up) and, unless
/// the gate drops it, adds it to `draft` with any leaf `branching` offers beside it. Whether
/// the chain goes on: not dropped, not stopped, and not one of the `stop` tokens.
#[allow(clippy::too_many_arguments)]
fn take_drafted_token(
    gate: &mut DraftGate<'_>,
    branching: &Branching,
    stop: &[u32],
    draft: &mut Draft,
    leaves: &mut Vec<(usize, u32)>,
    logits: &[f32],
    i: usize,
    pick: Pick,
) -> bool {
    let verdict = gate(
        i,
        DraftEvidence::Model {
            margin: pick.draw.lead,
        },
    );
    if verdict == Gate::Drop {
        if let Some(p) = draft.probs.as_mut() {
            p.truncate(i);
        }
        return false;
    }
    if let Some(s) = branching.offer(&draft.probs, logits, &pick) {
        leaves.push((i, s));
    }
    let t = pick.draw.token;
    draft.tokens.push(t);
    verdict == Gate::Continue && !stop.contains(&t)
}

impl<V: Verifier> Drafter for ModelDrafter<V> {
    fn propose(&mut self, context: &[u32], k: usize) -> Result<Draft> {
        self.propose_gated(context, k, &mut ungated)
    }
    fn propose_gated(
        &mut self,
        context: &[u32],
        k: usize,
        gate: &mut DraftGate<'_>,
    ) -> Result<Draft> {
        // Keep the cached part the context still shares; feed the rest, or restart from a
        // window of the latest tokens when the rest is long.
        let mut keep = match context.get(self.offset..) {
            Some(c) if !c.is_empty() => self
                .fed
                .iter()
                .zip(c)
                .take_while(|(a, b)| a == b)
                .count()
                .min(c.len() - 1),
            _ => 0,
        };
        let window = if keep == 0 {
            // Nothing shared (a new prompt, or the first call): start from the beginning.
            self.offset = 0;
            self.first_window
        } else {
            self.catch_up_window
        };
        let missing = context.len() - self.offset - keep;
        if missing > window.max(1) {
            self.offset = context.len() - window.max(1);
            keep = 0;
        }
        self.fed.truncate(keep);
        self.model.rollback(keep);
        let room = self
            .model
            .limit()
            .saturating_sub(context.len() - self.offset);
        let (model, fed) = (&mut self.model, &mut self.fed);
        self.chain.propose(
            context,
            k.min(room),
            gate,
            &context[self.offset + keep..],
            |tokens| {
                let l = model.forward_last(tokens)?;
                fed.extend_from_slice(tokens);
                Ok(l)
            },
        )
    }

    fn vocab_size(&self) -> Option<usize> {
        Some(self.model.vocab_size())
    }
    fn set_stop_tokens(&mut self, stop: &[u32]) {
        self.chain.stop = stop.to_vec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A coupled draw offers its own runner-up (not the logits') where its lead is small; a
    /// greedy draft offers the logits' runner-up where its top probability is low.
    #[test]
    fn leaves_are_the_runner_up_of_the_values_the_token_won_by() {
        let b = Branching::below(0.8);
        let logits = [2.0, 1.9, 0.0, -1.0];
        let coupled = |token, lead, runner_up| Pick {
            draw: LeadingDraw {
                token,
                lead,
                runner_up,
            },
            coupled: true,
        };
        // The noise made token 2 win over token 3: token 3 is the leaf, whatever the logits.
        assert_eq!(b.offer(&None, &logits, &coupled(2, 0.3, Some(3))), Some(3));
        // ln 4 ≈ 1.39 is where the top token's share of the top two reaches 0.8.
        assert_eq!(b.offer(&None, &logits, &coupled(2, 1.5, Some(3))), None);
        assert_eq!(b.offer(&None, &logits, &coupled(2, 0.3, None)), None);
        let greedy = Pick {
            draw: argmax_with_lead(&logits),
            coupled: false,
        };
        assert_eq!(b.offer(&None, &logits, &greedy), Some(1));
        // Off, nothing is offered.
        assert_eq!(
            Branching::default().offer(&None, &logits, &coupled(2, 0.3, Some(3))),
            None
        );
    }

    #[test]
    fn shortlist_is_the_lowest_ids_and_the_prompt() {
        assert_eq!(
            draft_shortlist(&[9, 2, 7, 40, 7], 50, 4),
            Some(vec![0, 1, 2, 3, 7, 9, 40])
        );
        assert_eq!(draft_shortlist(&[9], 50, 0), None);
        assert_eq!(draft_shortlist(&[9], 50, 50), None);
        // Ids outside the vocabulary are the forward pass's to refuse, not the list's.
        assert_eq!(draft_shortlist(&[60], 50, 2), Some(vec![0, 1]));
    }
}
