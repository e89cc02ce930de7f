//! The speculative loop: draft → verify → accept → adapt, one step at a time.

use crate::acceptance::AcceptanceRule;
use crate::controller::{Controller, StepReport};
use crate::drafter::Drafter;
use crate::{Error, Result, Verifier};
use std::time::Instant;
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
    pub total_secs: f64,
    /// Why generation stopped (the type plain generation reports too).
    pub stop: StopReason,
}

impl SpecStats {
    pub fn acceptance_rate(&self) -> f64 {
        self.accepted as f64 / self.drafted.max(1) as f64
    }
    /// Tokens produced per verifier pass (1.0 = no gain over plain decoding).
    pub fn tokens_per_pass(&self) -> f64 {
        self.generated_tokens as f64 / self.verifier_passes.max(1) as f64
    }
}

pub struct SpeculativeDecoder<'a> {
    pub drafter: &'a mut dyn Drafter,
    pub verifier: &'a mut dyn Verifier,
    pub rule: &'a mut dyn AcceptanceRule,
    pub controller: &'a mut dyn Controller,
}

impl SpeculativeDecoder<'_> {
    /// Generates up to `max_tokens` after `prompt`; EOS ends generation and is not emitted.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        eos: &[u32],
        mut on_token: impl FnMut(u32) -> Result<()>,
    ) -> Result<(Vec<u32>, SpecStats)> {
        if let Some(dv) = self.drafter.vocab_size() {
            if dv != self.verifier.vocab_size() {
                return Err(Error::Mismatch(format!(
                    "draft and verifier vocabularies differ ({dv} vs {} tokens): they must share a tokenizer",
                    self.verifier.vocab_size()
                )));
            }
        }
        let (&last, head) = prompt
            .split_last()
            .ok_or_else(|| Error::Mismatch("the prompt is empty".into()))?;
        let start = Instant::now();
        let mut stats = SpecStats {
            prompt_tokens: prompt.len(),
            stop: StopReason::MaxTokens,
            ..Default::default()
        };
        let mut seq = prompt.to_vec();
        let mut out = Vec::new();
        // The verifier holds every token but the last, whose logits the next pass computes.
        if !head.is_empty() {
            self.verifier.verify(head)?;
        }
        let mut last = last;
        'outer: while out.len() < max_tokens {
            let base = self.verifier.len();
            if base + 1 > self.verifier.limit() {
                stats.stop = StopReason::ContextFull;
                break;
            }
            // Leave room for the bonus token within max_tokens and the context.
            let k = self
                .controller
                .next_k()
                .min(max_tokens - out.len() - 1)
                .min(self.verifier.limit() - base - 1);
            let t0 = Instant::now();
            let mut draft = if k > 0 {
                self.drafter.propose(&seq, k)?
            } else {
                Default::default()
            };
            draft.tokens.truncate(k);
            if let Some(p) = draft.probs.as_mut() {
                p.truncate(draft.tokens.len());
            }
            let t1 = Instant::now();
            let mut input = Vec::with_capacity(draft.tokens.len() + 1);
            input.push(last);
            input.extend_from_slice(&draft.tokens);
            let logits = self.verifier.verify(&input)?;
            let verdict = self.rule.judge(&draft, &logits);
            let t2 = Instant::now();
            self.drafter.accepted(verdict.accepted);
            self.verifier.rollback(base + 1 + verdict.accepted);
            let n = draft.tokens.len();
            stats.drafted += n;
            stats.accepted += verdict.accepted;
            stats.verifier_passes += 1;
            if stats.by_position.len() < n {
                stats.by_position.resize(n, (0, 0));
            }
            for (i, slot) in stats.by_position.iter_mut().enumerate().take(n) {
                slot.0 += 1;
                if i < verdict.accepted {
                    slot.1 += 1;
                }
            }
            let (ds, vs) = ((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64());
            stats.draft_secs += ds;
            stats.verify_secs += vs;
            self.controller.observe(&StepReport {
                drafted: n,
                accepted: verdict.accepted,
                draft_secs: ds,
                verify_secs: vs,
            });
            for &t in draft.tokens[..verdict.accepted]
                .iter()
                .chain(std::iter::once(&verdict.next))
            {
                if eos.contains(&t) {
                    stats.stop = StopReason::Eos;
                    break 'outer;
                }
                seq.push(t);
                out.push(t);
                on_token(t)?;
                last = t;
            }
        }
        stats.generated_tokens = out.len();
        stats.total_secs = start.elapsed().as_secs_f64();
        Ok((out, stats))
    }
}
