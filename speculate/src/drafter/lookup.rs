//! Drafters that need no model: prompt lookup, and the hybrid of a lookup and a model.

use super::{ungated, Draft, DraftEvidence, DraftGate, Drafter, Gate};
use crate::Result;

/// Prompt lookup: finds the latest earlier occurrence of the context's last n tokens
/// (n = max_ngram down to 1) and proposes the tokens that followed it. No second model.
pub struct NgramDrafter {
    pub max_ngram: usize,
}

impl Default for NgramDrafter {
    fn default() -> Self {
        NgramDrafter { max_ngram: 3 }
    }
}

impl Drafter for NgramDrafter {
    fn propose(&mut self, context: &[u32], k: usize) -> Result<Draft> {
        Ok(Draft {
            tokens: longest_context_match(context, self.max_ngram, k).1,
            probs: None,
            parents: None,
        })
    }
    fn propose_gated(
        &mut self,
        context: &[u32],
        k: usize,
        gate: &mut DraftGate<'_>,
    ) -> Result<Draft> {
        Ok(gate_lookup(self.propose(context, k)?, gate))
    }
}

/// A lookup's proposal (n-gram, suffix) cut where `gate` says: its tokens cost no draft
/// step, only their verifier rows, and a row may cost more than a token is expected to earn.
/// A token tree (several lookup paths) is left whole.
pub(crate) fn gate_lookup(mut d: Draft, gate: &mut DraftGate<'_>) -> Draft {
    if !d.is_tree() {
        let mut keep = d.tokens.len();
        for i in 0..d.tokens.len() {
            match gate(i, DraftEvidence::Lookup) {
                Gate::Continue => {}
                Gate::Stop => {
                    keep = i + 1;
                    break;
                }
                Gate::Drop => {
                    keep = i;
                    break;
                }
            }
        }
        d.limit_depth(keep);
    }
    d
}

/// The longest (up to `max_ngram` tokens) tail of `context` that occurred earlier in it, at
/// its latest earlier occurrence: (its length, up to `k` tokens that followed it); (0, none)
/// when nothing matches. Prompt lookup's search, shared with the suffix drafter.
pub(crate) fn longest_context_match(
    context: &[u32],
    max_ngram: usize,
    k: usize,
) -> (usize, Vec<u32>) {
    let len = context.len();
    for n in (1..=max_ngram.min(len.saturating_sub(1))).rev() {
        let tail = &context[len - n..];
        // Latest match that ends before the tail itself.
        if let Some(start) = (0..len - n).rev().find(|&s| &context[s..s + n] == tail) {
            let from = start + n;
            let tokens = context[from..len.min(from + k)].to_vec();
            if !tokens.is_empty() {
                return (n, tokens);
            }
        }
    }
    (0, Vec::new())
}

/// A lookup drafter (n-gram, suffix) first, a model draft where the lookup finds nothing: a
/// lookup draft costs next to nothing, a model draft a step per token, and where a lookup
/// matches (repeated text, code, lists) it tends to be right for longer.
pub struct HybridDrafter<'a> {
    pub lookup: &'a mut dyn Drafter,
    pub model: &'a mut dyn Drafter,
    /// Whether the last proposal came from the lookup (who is told what was accepted).
    last_from_lookup: bool,
    /// Proposals made by each part: (lookup, model).
    pub proposals: (usize, usize),
}

impl<'a> HybridDrafter<'a> {
    pub fn new(lookup: &'a mut dyn Drafter, model: &'a mut dyn Drafter) -> Self {
        HybridDrafter {
            lookup,
            model,
            last_from_lookup: false,
            proposals: (0, 0),
        }
    }
}

impl Drafter for HybridDrafter<'_> {
    fn propose(&mut self, context: &[u32], k: usize) -> Result<Draft> {
        self.propose_gated(context, k, &mut ungated)
    }
    fn propose_gated(
        &mut self,
        context: &[u32],
        k: usize,
        gate: &mut DraftGate<'_>,
    ) -> Result<Draft> {
        // With nothing of the lookup's worth a row (the gate cut it all), the model drafts.
        let d = self.lookup.propose_gated(context, k, gate)?;
        self.last_from_lookup = !d.tokens.is_empty();
        if self.last_from_lookup {
            self.proposals.0 += 1;
            return Ok(d);
        }
        self.proposals.1 += 1;
        self.model.propose_gated(context, k, gate)
    }
    fn accepted(&mut self, n: usize) {
        if self.last_from_lookup {
            self.lookup.accepted(n);
        } else {
            self.model.accepted(n);
        }
    }
    fn vocab_size(&self) -> Option<usize> {
        self.model.vocab_size()
    }
    fn set_stop_tokens(&mut self, stop: &[u32]) {
        self.lookup.set_stop_tokens(stop);
        self.model.set_stop_tokens(stop);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lookup asks the gate about each of its tokens and cuts the chain where it says (in
    /// a hybrid too); a lookup chain dropped at its first token leaves the step to the model
    /// draft.
    #[test]
    fn a_hybrid_cuts_a_lookup_chain_where_the_gate_says() {
        let (mut lookup, mut model) = (NgramDrafter::default(), Sevens);
        let mut h = HybridDrafter::new(&mut lookup, &mut model);
        let ctx = [1, 2, 3, 4, 5, 9, 2, 3];
        let mut asked = Vec::new();
        let d = h
            .propose_gated(&ctx, 3, &mut |i, e| {
                asked.push((i, e));
                if i == 1 {
                    Gate::Stop
                } else {
                    Gate::Continue
                }
            })
            .unwrap();
        assert_eq!(d.tokens, vec![4, 5]);
        assert_eq!(
            asked,
            vec![(0, DraftEvidence::Lookup), (1, DraftEvidence::Lookup)]
        );
        let d = h
            .propose_gated(&ctx, 3, &mut |i, _| {
                if i == 2 {
                    Gate::Drop
                } else {
                    Gate::Continue
                }
            })
            .unwrap();
        assert_eq!(d.tokens, vec![4, 5], "dropped at the third");
        assert_eq!(h.proposals, (2, 0));
        // Dropped at its first token: the model drafter (here one that never asks) proposes.
        let d = h.propose_gated(&ctx, 3, &mut |_, _| Gate::Drop).unwrap();
        assert_eq!(d.tokens, vec![7, 7, 7]);
        assert_eq!(h.proposals, (2, 1));
    }

    /// Proposes k sevens, never asking a gate.
    struct Sevens;
    impl Drafter for Sevens {
        fn propose(&mut self, _: &[u32], k: usize) -> Result<Draft> {
            Ok(Draft {
                tokens: vec![7; k],
                probs: None,
                parents: None,
            })
        }
    }

    #[test]
    fn ngram_proposes_what_followed_the_latest_match() {
        let mut d = NgramDrafter::default();
        let ctx = [1, 2, 3, 4, 5, 9, 2, 3];
        assert_eq!(d.propose(&ctx, 3).unwrap().tokens, vec![4, 5, 9]);
        assert_eq!(d.propose(&ctx, 1).unwrap().tokens, vec![4]);
        assert!(d.propose(&[1, 2, 3], 4).unwrap().tokens.is_empty());
        // Falls back to shorter n-grams; the proposal may run up to the context's end.
        assert_eq!(d.propose(&[7, 8, 1, 7], 5).unwrap().tokens, vec![8, 1, 7]);
    }
}
