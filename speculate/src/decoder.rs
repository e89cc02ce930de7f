//! One sequence's speculative decoding: draft → verify → accept → adapt, one step at a time,
//! run by the batch step loop (`batch.rs`) as a batch of one, and the statistics both report.

use crate::acceptance::AcceptanceRule;
use crate::batch::{BatchDecoder, BatchVerifier};
use crate::controller::Controller;
use crate::drafter::Drafter;
use crate::{Error, Result, Verifier};
use tandem_kernels::sampling::StopReason;

/// What a generation did, for metrics and benchmarks.
#[derive(Debug, Clone, Default)]
pub struct SpecStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub drafted: usize,
    pub accepted: usize,
    pub verifier_passes: usize,
    /// (times drafted, times accepted) per draft position.
    pub by_position: Vec<(usize, usize)>,
    pub draft_secs: f64,
    pub verify_secs: f64,
    /// The prompts' prefill (every token but each prompt's last, which the first pass
    /// verifies); part of `total_secs`.
    pub prefill_secs: f64,
    pub total_secs: f64,
    /// Why generation stopped (the type plain generation reports too).
    pub stop: StopReason,
    /// Verifier passes over a token tree (a draft that branched), the tokens they scored,
    /// and how many of them accepted a candidate off the tree's main chain (a token a chain
    /// draft would have lost).
    pub tree_passes: usize,
    pub tree_nodes: usize,
    pub tree_branch_wins: usize,
    /// Verifier passes of one sequence by the tokens drafted into them (index: drafted count,
    /// a tree by its depth): how many, and their seconds. A pass's price is not linear in its
    /// rows, so this is where the verification's time went.
    pub passes_by_drafted: Vec<(usize, f64)>,
}

impl SpecStats {
    pub fn acceptance_rate(&self) -> f64 {
        self.accepted as f64 / self.drafted.max(1) as f64
    }
    /// Tokens produced per verifier pass (1.0 = no gain over plain decoding).
    pub fn tokens_per_pass(&self) -> f64 {
        self.generated_tokens as f64 / self.verifier_passes.max(1) as f64
    }

    /// Counts a token tree's verification: its size, and whether the accepted path left the
    /// main chain.
    pub(crate) fn record_tree(&mut self, draft: &crate::Draft, path: &[usize]) {
        self.tree_passes += 1;
        self.tree_nodes += draft.tokens.len();
        let mut node = None;
        for &j in path {
            if draft.children(node).next() != Some(j) {
                self.tree_branch_wins += 1;
                break;
            }
            node = Some(j);
        }
    }

    /// Counts a verifier pass of one sequence after `drafted` tokens, taking `secs`.
    pub(crate) fn record_pass(&mut self, drafted: usize, secs: f64) {
        if self.passes_by_drafted.len() <= drafted {
            self.passes_by_drafted.resize(drafted + 1, (0, 0.0));
        }
        let slot = &mut self.passes_by_drafted[drafted];
        slot.0 += 1;
        slot.1 += secs;
    }

    /// Counts one sequence's step: `drafted` tokens proposed, the first `accepted` kept.
    pub(crate) fn record(&mut self, drafted: usize, accepted: usize) {
        self.drafted += drafted;
        self.accepted += accepted;
        if self.by_position.len() < drafted {
            self.by_position.resize(drafted, (0, 0));
        }
        for (i, slot) in self.by_position.iter_mut().enumerate().take(drafted) {
            slot.0 += 1;
            if i < accepted {
                slot.1 += 1;
            }
        }
    }
}

pub struct SpeculativeDecoder<'a> {
    pub drafter: &'a mut dyn Drafter,
    pub verifier: &'a mut dyn Verifier,
    pub rule: &'a mut dyn AcceptanceRule,
    pub controller: &'a mut dyn Controller,
}

impl SpeculativeDecoder<'_> {
    /// Generates up to `max_tokens` after `prompt`, calling `on_token` for each token as it
    /// is decided; EOS ends generation and is not emitted. The step loop is the batch one
    /// ([`BatchDecoder`]) with a batch of one: one loop for every rule and batch size.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        eos: &[u32],
        mut on_token: impl FnMut(u32) -> Result<()>,
    ) -> Result<(Vec<u32>, SpecStats)> {
        let mut one = OneSequence(&mut *self.verifier);
        let mut batch = BatchDecoder {
            drafters: vec![&mut *self.drafter],
            rules: vec![&mut *self.rule],
            controllers: vec![&mut *self.controller],
            verifier: &mut one,
            max_spec_batch: usize::MAX,
        };
        let (mut out, stats) =
            batch.generate_streaming(&[prompt.to_vec()], max_tokens, eos, |_, t| on_token(t))?;
        Ok((out.pop().unwrap_or_default(), stats))
    }
}

/// A single sequence's verifier as a batch verifier of one (sequence 0).
struct OneSequence<'a>(&'a mut dyn Verifier);

/// `tokens` of an input, which must name sequence 0.
fn only_sequence<'t>(&(seq, tokens): &(usize, &'t [u32])) -> Result<&'t [u32]> {
    match seq {
        0 => Ok(tokens),
        _ => Err(Error::Mismatch(format!(
            "sequence {seq} of a single-sequence decoder (internal error)"
        ))),
    }
}

impl BatchVerifier for OneSequence<'_> {
    fn verify_batch(&mut self, inputs: &[(usize, &[u32])]) -> Result<Vec<Vec<Vec<f32>>>> {
        inputs
            .iter()
            .map(|input| self.0.verify(only_sequence(input)?))
            .collect()
    }
    fn prefill_batch(&mut self, inputs: &[(usize, &[u32])]) -> Result<()> {
        for input in inputs {
            self.0.fill(only_sequence(input)?)?;
        }
        Ok(())
    }
    fn rollback(&mut self, _seq: usize, len: usize) {
        self.0.rollback(len);
    }
    fn len(&self, _seq: usize) -> usize {
        self.0.len()
    }
    fn limit(&self) -> usize {
        self.0.limit()
    }
    fn vocab_size(&self) -> usize {
        self.0.vocab_size()
    }
    fn scores_trees(&self) -> bool {
        self.0.scores_trees()
    }
    fn verify_tree(
        &mut self,
        _seq: usize,
        tokens: &[u32],
        parents: &[Option<usize>],
    ) -> Result<Vec<Vec<f32>>> {
        self.0.verify_tree(tokens, parents)
    }
    fn keep(&mut self, _seq: usize, base: usize, rows: &[usize]) -> Result<()> {
        self.0.keep(base, rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acceptance::Greedy;
    use crate::controller::{AdaptiveK, Controller, FixedK};
    use crate::drafter::{Draft, HybridDrafter, NgramDrafter};

    const VOCAB: usize = 53;

    /// A verifier without a model: after token t its greedy next token is `next(t)`.
    struct FakeVerifier {
        context: Vec<u32>,
        limit: usize,
        passes: usize,
    }

    fn next(t: u32) -> u32 {
        (t * 7 + 3) % VOCAB as u32
    }

    impl Verifier for FakeVerifier {
        fn verify(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
            if self.context.len() + tokens.len() > self.limit {
                return Err(Error::Mismatch("past the limit".into()));
            }
            self.passes += 1;
            self.context.extend_from_slice(tokens);
            Ok(tokens
                .iter()
                .map(|&t| {
                    let mut row = vec![0f32; VOCAB];
                    row[next(t) as usize] = 5.0;
                    row
                })
                .collect())
        }
        fn rollback(&mut self, len: usize) {
            self.context.truncate(len);
        }
        fn len(&self) -> usize {
            self.context.len()
        }
        fn limit(&self) -> usize {
            self.limit
        }
        fn vocab_size(&self) -> usize {
            VOCAB
        }
    }

    /// Proposes the verifier's own continuation, wrong at every `wrong_every`-th position.
    struct NoisyDrafter {
        wrong_every: usize,
        calls: usize,
    }

    impl Drafter for NoisyDrafter {
        fn propose(&mut self, context: &[u32], k: usize) -> Result<Draft> {
            self.calls += 1;
            let mut t = *context.last().unwrap_or(&0);
            let tokens = (0..k)
                .map(|i| {
                    t = next(t);
                    if self.wrong_every > 0 && (i + self.calls).is_multiple_of(self.wrong_every) {
                        (t + 1) % VOCAB as u32
                    } else {
                        t
                    }
                })
                .collect();
            Ok(Draft::chain(tokens))
        }
    }

    fn plain(prompt: &[u32], max: usize, eos: &[u32], limit: usize) -> Vec<u32> {
        let mut out = Vec::new();
        let mut t = *prompt.last().unwrap();
        // The cache holds every token but the last generated one (as with a model).
        while out.len() < max && prompt.len() + out.len() <= limit {
            t = next(t);
            if eos.contains(&t) {
                break;
            }
            out.push(t);
        }
        out
    }

    fn run(
        d: &mut dyn Drafter,
        prompt: &[u32],
        max: usize,
        eos: &[u32],
        limit: usize,
    ) -> (Vec<u32>, SpecStats) {
        run_with(d, &mut AdaptiveK::new(6), prompt, max, eos, limit)
    }

    fn run_with(
        d: &mut dyn Drafter,
        ctl: &mut dyn Controller,
        prompt: &[u32],
        max: usize,
        eos: &[u32],
        limit: usize,
    ) -> (Vec<u32>, SpecStats) {
        let mut v = FakeVerifier {
            context: Vec::new(),
            limit,
            passes: 0,
        };
        let mut rule = Greedy;
        let mut dec = SpeculativeDecoder {
            drafter: d,
            verifier: &mut v,
            rule: &mut rule,
            controller: ctl,
        };
        let mut streamed = Vec::new();
        let (out, st) = dec
            .generate(prompt, max, eos, |t| {
                streamed.push(t);
                Ok(())
            })
            .unwrap();
        assert_eq!(streamed, out, "on_token sees exactly the output");
        // The prompt's own pass (all but its last token) is not a decoding step.
        assert_eq!(v.passes, st.verifier_passes + usize::from(prompt.len() > 1));
        (out, st)
    }

    /// A run ends with the verifier holding what plain generation's cache would: every
    /// emitted token after an end token (an accepted drafted end token is not kept), and all
    /// but the last after `max_tokens`.
    #[test]
    fn the_verifier_ends_holding_what_plain_generation_holds() {
        let prompt = [1u32, 2, 3];
        let chain: Vec<u32> = std::iter::successors(Some(next(3)), |&t| Some(next(t)))
            .take(8)
            .collect();
        for (eos, max) in [(vec![chain[2]], 20), (vec![], 6), (vec![], 20)] {
            let want = plain(&prompt, max, &eos, 1000);
            let mut v = FakeVerifier {
                context: Vec::new(),
                limit: 1000,
                passes: 0,
            };
            let mut d = NoisyDrafter {
                wrong_every: 0,
                calls: 0,
            };
            let (mut rule, mut ctl) = (Greedy, FixedK(6));
            let mut dec = SpeculativeDecoder {
                drafter: &mut d,
                verifier: &mut v,
                rule: &mut rule,
                controller: &mut ctl,
            };
            let (out, _) = dec.generate(&prompt, max, &eos, |_| Ok(())).unwrap();
            assert_eq!(out, want);
            let ran = prompt.len() + out.len() - usize::from(eos.is_empty());
            assert_eq!(v.context.len(), ran, "eos {eos:?}, max {max}");
        }
    }

    /// A verifier that already holds the start of the prompt (a chat's earlier turns) runs
    /// only the rest of it, decodes as from scratch, and one holding more than the prompt's
    /// head is refused rather than decoded on a context it does not hold.
    #[test]
    fn a_verifier_holding_the_prompts_start_runs_only_the_rest() {
        let prompt = [1, 2, 3, 4, 5, 6];
        let want = plain(&prompt, 20, &[], 1000);
        let mut v = FakeVerifier {
            context: prompt[..4].to_vec(),
            limit: 1000,
            passes: 0,
        };
        let mut d = NoisyDrafter {
            wrong_every: 3,
            calls: 0,
        };
        let (mut rule, mut ctl) = (Greedy, FixedK(4));
        let mut dec = SpeculativeDecoder {
            drafter: &mut d,
            verifier: &mut v,
            rule: &mut rule,
            controller: &mut ctl,
        };
        let (out, st) = dec.generate(&prompt, 20, &[], |_| Ok(())).unwrap();
        assert_eq!(out, want);
        assert_eq!(v.context[..prompt.len()], prompt);
        // One pass for the prompt's fifth token, then the decoding steps.
        assert_eq!(v.passes, st.verifier_passes + 1);

        let mut v = FakeVerifier {
            context: prompt.to_vec(),
            limit: 1000,
            passes: 0,
        };
        let mut dec = SpeculativeDecoder {
            drafter: &mut d,
            verifier: &mut v,
            rule: &mut rule,
            controller: &mut ctl,
        };
        let err = dec.generate(&prompt, 20, &[], |_| Ok(())).unwrap_err();
        assert!(err.to_string().contains("holds 6 tokens"), "{err}");
    }

    #[test]
    fn greedy_output_is_the_verifiers_whatever_the_draft() {
        for wrong_every in [0, 1, 2, 3, 5] {
            for (max, limit) in [(40, 1000), (40, 20), (1, 1000)] {
                let prompt = [1, 2, 3];
                let want = plain(&prompt, max, &[], limit);
                let mut d = NoisyDrafter {
                    wrong_every,
                    calls: 0,
                };
                // Adaptive k (which reads the clock) on odd drafts, a fixed k on even ones.
                let (got, st) = if wrong_every % 2 == 1 {
                    run(&mut d, &prompt, max, &[], limit)
                } else {
                    run_with(&mut d, &mut FixedK(6), &prompt, max, &[], limit)
                };
                assert_eq!(
                    got, want,
                    "wrong_every {wrong_every} max {max} limit {limit}"
                );
                let stop = if limit == 20 {
                    StopReason::ContextFull
                } else {
                    StopReason::MaxTokens
                };
                assert_eq!(st.stop, stop);
                if wrong_every == 0 && max > 1 && limit > 20 {
                    // A perfect draft: several tokens per verifier pass.
                    assert!(st.tokens_per_pass() > 2.0, "{}", st.tokens_per_pass());
                }
            }
        }
    }

    #[test]
    fn eos_ends_generation_and_is_not_emitted() {
        let prompt = [4];
        let free = plain(&prompt, 40, &[], 100);
        // The first token that does not occur earlier in the text, from the third on.
        let at = (2..free.len())
            .find(|&i| !free[..i].contains(&free[i]))
            .expect("a fresh token");
        let eos = [free[at]];
        let want = plain(&prompt, 40, &eos, 100);
        assert_eq!(want.len(), at);
        let mut d = NoisyDrafter {
            wrong_every: 0,
            calls: 0,
        };
        let (got, st) = run_with(&mut d, &mut FixedK(6), &prompt, 40, &eos, 100);
        assert_eq!(got, want);
        assert_eq!(st.stop, StopReason::Eos);
        // This drafter proposes past EOS; the decoder cuts its chains there, so a perfect
        // draft is drafted (and verified) up to EOS and no further.
        assert_eq!(st.accepted, st.drafted);
        assert!(st.drafted <= at + 1, "{} drafted, EOS at {at}", st.drafted);
    }

    #[test]
    fn hybrid_asks_the_model_only_where_lookup_finds_nothing() {
        // The prompt already holds the first tokens of the answer after a 1, and ends in 1:
        // lookup drafts those, the model the rest.
        let mut prompt = vec![1];
        prompt.extend(plain(&[1], 6, &[], 1000));
        prompt.push(1);
        let want = plain(&prompt, 30, &[], 1000);
        let mut lookup = NgramDrafter::default();
        let mut model = NoisyDrafter {
            wrong_every: 4,
            calls: 0,
        };
        let mut h = HybridDrafter::new(&mut lookup, &mut model);
        let (got, _) = run_with(&mut h, &mut FixedK(4), &prompt, 30, &[], 1000);
        assert_eq!(got, want);
        let (from_lookup, from_model) = h.proposals;
        assert!(from_model > 0 && from_lookup > 0, "{:?}", h.proposals);
        // A fixed k and an empty prompt's edge: one token prompts still decode.
        let mut fixed = FixedK(3);
        let mut v = FakeVerifier {
            context: Vec::new(),
            limit: 100,
            passes: 0,
        };
        let mut d = NoisyDrafter {
            wrong_every: 0,
            calls: 0,
        };
        let mut dec = SpeculativeDecoder {
            drafter: &mut d,
            verifier: &mut v,
            rule: &mut Greedy,
            controller: &mut fixed,
        };
        assert_eq!(
            dec.generate(&[9], 7, &[], |_| Ok(())).unwrap().0,
            plain(&[9], 7, &[], 100)
        );
        assert!(
            dec.generate(&[], 7, &[], |_| Ok(())).is_err(),
            "an empty prompt is refused"
        );
    }
}
