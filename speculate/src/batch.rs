//! Speculative decoding for a batch of sequences: each sequence has its own drafter and
//! controller, and one batched verifier pass scores every sequence's draft at once (each
//! weight is read once for the whole batch). Greedy acceptance: every sequence's output is its
//! own plain greedy decoding.
//!
//! At small batch a verification pass costs about as much as a decode pass, so drafts pay; as
//! the batch grows the matmuls become compute-bound and every drafted row costs real time, so
//! above `max_spec_batch` active sequences the decoder stops drafting (k = 0) and decodes the
//! batch plainly. The threshold is measured with `tandem bench spec --batch` (BENCHMARKS.md).

use crate::acceptance::{AcceptanceRule, Greedy};
use crate::controller::{Controller, StepReport};
use crate::decoder::SpecStats;
use crate::drafter::Drafter;
use crate::{Error, Result};
use std::time::Instant;
use tandem_kernels::sampling::StopReason;

/// Scores several sequences' tokens in one pass; each sequence has its own context.
pub trait BatchVerifier {
    /// `inputs[j] = (sequence, tokens)`: runs each sequence's tokens after its context and
    /// returns, per input, one logit row per token.
    fn verify_batch(&mut self, inputs: &[(usize, &[u32])]) -> Result<Vec<Vec<Vec<f32>>>>;
    fn rollback(&mut self, seq: usize, len: usize);
    fn len(&self, seq: usize) -> usize;
    fn limit(&self) -> usize;
    fn vocab_size(&self) -> usize;
}

pub struct BatchDecoder<'a> {
    /// One drafter and one controller per sequence.
    pub drafters: Vec<&'a mut dyn Drafter>,
    pub controllers: Vec<&'a mut dyn Controller>,
    pub verifier: &'a mut dyn BatchVerifier,
    /// Draft only while at most this many sequences are active (0 = never: plain batched
    /// decoding through the same loop).
    pub max_spec_batch: usize,
}

struct Seq {
    tokens: Vec<u32>,
    out: Vec<u32>,
    last: u32,
    done: bool,
}

impl BatchDecoder<'_> {
    /// Generates up to `max_tokens` after each prompt (greedy); EOS ends a sequence and is not
    /// emitted. Returns each sequence's tokens and the batch's combined statistics.
    pub fn generate(
        &mut self,
        prompts: &[Vec<u32>],
        max_tokens: usize,
        eos: &[u32],
    ) -> Result<(Vec<Vec<u32>>, SpecStats)> {
        let n = prompts.len();
        if self.drafters.len() != n || self.controllers.len() != n {
            return Err(Error::Mismatch(format!(
                "{n} prompts need {n} drafters and controllers ({} and {} given)",
                self.drafters.len(),
                self.controllers.len()
            )));
        }
        let start = Instant::now();
        let mut stats = SpecStats {
            stop: StopReason::MaxTokens,
            ..Default::default()
        };
        let mut seqs = Vec::with_capacity(n);
        let mut heads = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let (&last, head) = p
                .split_last()
                .ok_or_else(|| Error::Mismatch(format!("prompt {i} is empty")))?;
            stats.prompt_tokens += p.len();
            if !head.is_empty() {
                heads.push((i, head));
            }
            seqs.push(Seq {
                tokens: p.clone(),
                out: Vec::new(),
                last,
                done: max_tokens == 0,
            });
        }
        // Every sequence's context holds all its tokens but the last.
        if !heads.is_empty() {
            self.verifier.verify_batch(&heads)?;
        }
        let limit = self.verifier.limit();
        let mut greedy = Greedy;
        loop {
            let active: Vec<usize> = (0..n).filter(|&i| !seqs[i].done).collect();
            if active.is_empty() {
                break;
            }
            let speculate = active.len() <= self.max_spec_batch;
            let t0 = Instant::now();
            let mut drafts = Vec::with_capacity(active.len());
            let mut inputs: Vec<Vec<u32>> = Vec::with_capacity(active.len());
            for &i in &active {
                let s = &seqs[i];
                let base = self.verifier.len(i);
                let k = if speculate {
                    self.controllers[i]
                        .next_k()
                        .min(max_tokens - s.out.len() - 1)
                        .min(limit.saturating_sub(base + 1))
                } else {
                    0
                };
                let mut d = if k > 0 {
                    self.drafters[i].propose(&s.tokens, k)?
                } else {
                    Default::default()
                };
                d.tokens.truncate(k);
                let mut input = vec![s.last];
                input.extend_from_slice(&d.tokens);
                inputs.push(input);
                drafts.push(d);
            }
            let t1 = Instant::now();
            let batch: Vec<(usize, &[u32])> = active
                .iter()
                .zip(&inputs)
                .map(|(&i, t)| (i, t.as_slice()))
                .collect();
            let logits = self.verifier.verify_batch(&batch)?;
            let t2 = Instant::now();
            let (ds, vs) = ((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64());
            stats.draft_secs += ds;
            stats.verify_secs += vs;
            stats.verifier_passes += 1;
            for ((&i, d), l) in active.iter().zip(&drafts).zip(&logits) {
                let base = self.verifier.len(i) - inputs_len(d);
                let verdict = greedy.judge(d, l);
                self.drafters[i].accepted(verdict.accepted);
                self.verifier.rollback(i, base + 1 + verdict.accepted);
                stats.drafted += d.tokens.len();
                stats.accepted += verdict.accepted;
                if speculate {
                    self.controllers[i].observe(&StepReport {
                        drafted: d.tokens.len(),
                        accepted: verdict.accepted,
                        draft_secs: ds / active.len() as f64,
                        verify_secs: vs,
                    });
                }
                let s = &mut seqs[i];
                for &t in d.tokens[..verdict.accepted]
                    .iter()
                    .chain(std::iter::once(&verdict.next))
                {
                    if eos.contains(&t) {
                        s.done = true;
                        break;
                    }
                    s.tokens.push(t);
                    s.out.push(t);
                    s.last = t;
                    if s.out.len() >= max_tokens {
                        s.done = true;
                        break;
                    }
                }
                if !s.done && self.verifier.len(i) + 1 > limit {
                    s.done = true;
                    stats.stop = StopReason::ContextFull;
                }
            }
        }
        stats.generated_tokens = seqs.iter().map(|s| s.out.len()).sum();
        stats.total_secs = start.elapsed().as_secs_f64();
        Ok((seqs.into_iter().map(|s| s.out).collect(), stats))
    }
}

/// Rows a sequence added in this step: its last token plus its draft.
fn inputs_len(d: &crate::drafter::Draft) -> usize {
    d.tokens.len() + 1
}
