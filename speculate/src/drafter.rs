//! Drafters propose the next tokens cheaply.

use crate::Result;

/// Up to k proposed tokens, with the distribution each was drawn from (needed by rejection
/// sampling; `None` means the proposal was deterministic, i.e. one-hot).
#[derive(Debug, Clone, Default)]
pub struct Draft {
    pub tokens: Vec<u32>,
    pub probs: Option<Vec<Vec<f32>>>,
}

pub trait Drafter {
    /// Proposes up to `k` tokens to follow `context` (the whole sequence so far).
    fn propose(&mut self, context: &[u32], k: usize) -> Result<Draft>;
    /// Tells the drafter how many of its last proposal's tokens the verifier accepted.
    fn accepted(&mut self, _n: usize) {}
    /// The drafter's vocabulary size, when it has one (checked against the verifier's).
    fn vocab_size(&self) -> Option<usize> {
        None
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
        let len = context.len();
        for n in (1..=self.max_ngram.min(len.saturating_sub(1))).rev() {
            let tail = &context[len - n..];
            // Latest match that ends before the tail itself.
            if let Some(start) = (0..len - n).rev().find(|&s| &context[s..s + n] == tail) {
                let from = start + n;
                let tokens: Vec<u32> = context[from..len.min(from + k)].to_vec();
                if !tokens.is_empty() {
                    return Ok(Draft {
                        tokens,
                        probs: None,
                    });
                }
            }
        }
        Ok(Draft::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
