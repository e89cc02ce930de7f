//! Drafters propose the next tokens cheaply.
//!
//! This file holds what every drafter shares: [`Draft`], the gate's types and the [`Drafter`]
//! trait. `lookup.rs` holds the lookups that need no model (prompt n-grams, and the hybrid
//! that asks a lookup first, then a model); `chain.rs` the model drafters' loop
//! ([`DraftChain`]: pick, gate, branch) and [`ModelDrafter`] over a verifier-shaped model.

mod chain;
mod lookup;

use crate::Result;

/// Proposed tokens: a chain (each follows the one before) or a token tree (several candidates
/// where the drafter is unsure), with the distribution each was drawn from (needed by
/// rejection sampling; `None` means every proposal was deterministic, i.e. one-hot; in a
/// tree, an empty row marks one deterministic node among sampled ones).
#[derive(Debug, Clone, Default)]
pub struct Draft {
    pub tokens: Vec<u32>,
    pub probs: Option<Vec<Vec<f32>>>,
    /// A token tree: `parents[i]` is the proposed token `tokens[i]` follows (an index into
    /// `tokens`, always below i), `None` for a token that follows the context. `None` overall
    /// is a chain.
    pub parents: Option<Vec<Option<usize>>>,
}

impl Draft {
    /// A deterministic chain.
    pub fn chain(tokens: Vec<u32>) -> Self {
        Draft {
            tokens,
            ..Default::default()
        }
    }

    /// Whether the proposal branches (a chain-shaped `parents` is no tree).
    pub fn is_tree(&self) -> bool {
        self.parents.as_ref().is_some_and(|p| {
            p.iter()
                .enumerate()
                .any(|(i, &parent)| parent != i.checked_sub(1))
        })
    }

    /// The token `tokens[i]` follows: an earlier index, or `None` for the context.
    pub fn parent(&self, i: usize) -> Option<usize> {
        match &self.parents {
            Some(p) => p[i],
            None => i.checked_sub(1),
        }
    }

    /// The candidates after `node` (`None`: after the context), in proposal order.
    pub fn children(&self, node: Option<usize>) -> impl Iterator<Item = usize> + '_ {
        let from = node.map_or(0, |n| n + 1);
        (from..self.tokens.len()).filter(move |&i| self.parent(i) == node)
    }

    /// The distribution `tokens[i]` was drawn from; `None` when it was proposed
    /// deterministically.
    pub fn q(&self, i: usize) -> Option<&[f32]> {
        self.probs
            .as_ref()
            .and_then(|p| p.get(i))
            .map(Vec::as_slice)
            .filter(|r| !r.is_empty())
    }

    /// Cuts a chain after its first token in `stop` (generation ends there, so the tokens
    /// after it could never be used); a tree is left as it is.
    pub fn cut_after_stop(&mut self, stop: &[u32]) {
        if self.parents.is_some() {
            return;
        }
        if let Some(i) = self.tokens.iter().position(|t| stop.contains(t)) {
            self.limit_depth(i + 1);
        }
    }

    /// Keeps the tokens at most `k` deep (a path of at most k proposed tokens), renumbered;
    /// a chain is cut to its first k.
    pub fn limit_depth(&mut self, k: usize) {
        let Some(parents) = self.parents.take() else {
            self.tokens.truncate(k);
            if let Some(p) = self.probs.as_mut() {
                p.truncate(self.tokens.len());
            }
            return;
        };
        let mut depth = Vec::with_capacity(parents.len());
        let mut new_index = vec![None; parents.len()];
        let (mut tokens, mut kept_parents) = (Vec::new(), Vec::new());
        let mut probs = self.probs.as_ref().map(|_| Vec::new());
        for (i, &p) in parents.iter().enumerate() {
            let d = p.map_or(1, |p: usize| depth[p] + 1);
            depth.push(d);
            if d > k || p.is_some_and(|p| new_index[p].is_none()) {
                continue;
            }
            new_index[i] = Some(tokens.len());
            tokens.push(self.tokens[i]);
            kept_parents.push(p.and_then(|p| new_index[p]));
            if let (Some(out), Some(all)) = (probs.as_mut(), self.probs.as_mut()) {
                out.push(std::mem::take(&mut all[i]));
            }
        }
        self.tokens = tokens;
        self.probs = probs;
        self.parents = Some(kept_parents);
    }

    /// Proposed tokens on the longest path (a chain's length).
    pub fn depth(&self) -> usize {
        let mut depth: Vec<usize> = Vec::with_capacity(self.tokens.len());
        for i in 0..self.tokens.len() {
            let d = self.parent(i).map_or(1, |p| depth[p] + 1);
            depth.push(d);
        }
        depth.into_iter().max().unwrap_or(0)
    }

    /// A chain with second candidates as leaves: `siblings[j] = (d, t)` offers token t beside
    /// the chain's d-th token (same parent). Siblings are deterministic (an empty probs row).
    pub fn with_siblings(chain: Draft, siblings: &[(usize, u32)]) -> Draft {
        if siblings.is_empty() {
            return chain;
        }
        let mut tree = Draft {
            probs: chain.probs.as_ref().map(|_| Vec::new()),
            parents: Some(Vec::new()),
            ..Default::default()
        };
        let mut prev: Option<usize> = None;
        for (d, &t) in chain.tokens.iter().enumerate() {
            let parent = prev;
            let push = |tree: &mut Draft, t: u32, row: Vec<f32>| {
                tree.tokens.push(t);
                if let Some(p) = tree.parents.as_mut() {
                    p.push(parent);
                }
                if let Some(p) = tree.probs.as_mut() {
                    p.push(row);
                }
            };
            let row = chain
                .probs
                .as_ref()
                .map(|p| p[d].clone())
                .unwrap_or_default();
            push(&mut tree, t, row);
            prev = Some(tree.tokens.len() - 1);
            for &(_, s) in siblings.iter().filter(|&&(sd, s)| sd == d && s != t) {
                push(&mut tree, s, Vec::new());
            }
        }
        tree
    }

    /// Keeps the first `n` proposed tokens (a tree's parents come first, so what is left is
    /// still a tree).
    pub fn limit_nodes(&mut self, n: usize) {
        self.tokens.truncate(n);
        if let Some(p) = self.probs.as_mut() {
            p.truncate(n);
        }
        if let Some(p) = self.parents.as_mut() {
            p.truncate(n);
        }
    }

    /// The first candidate at each step (what a verifier without token trees checks).
    pub fn main_chain(&self) -> Draft {
        let mut chain = Draft::default();
        let mut probs = self.probs.as_ref().map(|_| Vec::new());
        let mut node = None;
        while let Some(c) = self.children(node).next() {
            chain.tokens.push(self.tokens[c]);
            if let (Some(out), Some(all)) = (probs.as_mut(), self.probs.as_ref()) {
                out.push(all[c].clone());
            }
            node = Some(c);
        }
        // A chain's probs rows are all real distributions, or there are none.
        chain.probs = probs.filter(|rows| rows.iter().all(|r| !r.is_empty()));
        chain
    }
}

/// What a drafter knows of a token it has just drafted, for the gate that decides whether
/// to keep it and whether to draft another ([`Drafter::propose_gated`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DraftEvidence {
    /// A model's token, with its lead over the draft's best other token in logits: of the
    /// logit itself when greedy; of the logit plus the draw's noise (times the temperature)
    /// when the draft draws with the verifier's noise (`Sampler::draw_with_lead`); of the
    /// logit when it samples on its own (negative for a token below its argmax).
    Model { margin: f32 },
    /// A lookup's token (suffix, n-gram): it cost no draft step.
    Lookup,
}

/// A gate's answer for a drafted token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Keep it and draft the next.
    Continue,
    /// Keep it and stop drafting.
    Stop,
    /// Leave it out and stop (its verifier row would cost more than it is expected to earn).
    Drop,
}

/// Asked by a gated drafter for each token `i` (0-based in the chain) it drafts.
pub type DraftGate<'g> = dyn FnMut(usize, DraftEvidence) -> Gate + 'g;

/// The gate of an ungated proposal ([`Drafter::propose`] of a drafter that implements
/// [`Drafter::propose_gated`]): every token kept, drafting on to k.
pub(crate) fn ungated(_: usize, _: DraftEvidence) -> Gate {
    Gate::Continue
}

pub trait Drafter {
    /// Proposes up to `k` tokens to follow `context` (the whole sequence so far).
    fn propose(&mut self, context: &[u32], k: usize) -> Result<Draft>;
    /// [`Drafter::propose`], asking `gate` after each drafted token whether to keep it and
    /// whether to go on (the controller's per-token stop rule, see
    /// [`crate::AdaptiveK`]). A drafter that cannot say anything about its tokens proposes
    /// as `propose` does and never asks.
    fn propose_gated(
        &mut self,
        context: &[u32],
        k: usize,
        gate: &mut DraftGate<'_>,
    ) -> Result<Draft> {
        let _ = gate;
        self.propose(context, k)
    }
    /// Tells the drafter how many of its last proposal's tokens the verifier accepted.
    fn accepted(&mut self, _n: usize) {}
    /// The drafter's vocabulary size, when it has one (checked against the verifier's).
    fn vocab_size(&self) -> Option<usize> {
        None
    }
    /// The tokens that end generation (EOS, a chat template's end of turn), told once before
    /// the first proposal. Nothing after one of them can be accepted, so a model drafter stops
    /// its chain there instead of paying draft steps for tokens that are never used (the
    /// decoder also cuts every chain after its first stop token).
    fn set_stop_tokens(&mut self, _stop: &[u32]) {}
}

pub use chain::{draft_shortlist, Branching, DraftChain, ModelDrafter, DEFAULT_DRAFT_VOCAB};
pub(crate) use lookup::{gate_lookup, longest_context_match};
pub use lookup::{HybridDrafter, NgramDrafter};
