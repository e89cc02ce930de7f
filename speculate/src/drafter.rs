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
