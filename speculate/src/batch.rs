//! The speculative step loop, for a batch of sequences: each sequence has its own drafter,
//! acceptance rule and controller, and one batched verifier pass scores every sequence's draft
//! at once (each weight is read once for the whole batch). With greedy acceptance every
//! sequence's output is its own plain greedy decoding; with a sampling rule, its own sampled
//! output. A single sequence is a batch of one (`SpeculativeDecoder` wraps this loop).
//!
//! At small batch a verification pass costs about as much as a decode pass, so drafts pay; as
//! the batch grows the matmuls become compute-bound and every drafted row costs real time, so
//! above `max_spec_batch` active sequences the decoder stops drafting (k = 0) and decodes the
//! batch plainly. The threshold is measured with `tandem bench spec --batch` (BENCHMARKS.md).

use crate::acceptance::{AcceptanceRule, TreeVerdict};
use crate::controller::{Controller, StepReport};
use crate::decoder::SpecStats;
use crate::drafter::{Draft, Drafter};
use crate::{Error, Result};
use std::time::Instant;
use tandem_kernels::sampling::StopReason;

/// Scores several sequences' tokens in one pass; each sequence has its own context.
pub trait BatchVerifier {
    /// `inputs[j] = (sequence, tokens)`: runs each sequence's tokens after its context and
    /// returns, per input, one logit row per token.
    fn verify_batch(&mut self, inputs: &[(usize, &[u32])]) -> Result<Vec<Vec<Vec<f32>>>>;
    /// Runs each sequence's tokens after its context, like [`BatchVerifier::verify_batch`],
    /// for a caller that reads none of the logits (a prompt's head): a model can skip its
    /// output head there. The default verifies and drops the rows.
    fn prefill_batch(&mut self, inputs: &[(usize, &[u32])]) -> Result<()> {
        self.verify_batch(inputs).map(drop)
    }
    fn rollback(&mut self, seq: usize, len: usize);
    fn len(&self, seq: usize) -> usize;
    fn limit(&self) -> usize;
    fn vocab_size(&self) -> usize;
    /// Whether [`BatchVerifier::verify_tree`] takes trees that branch.
    fn scores_trees(&self) -> bool {
        false
    }
    /// One sequence's token tree in one pass ([`crate::Verifier::verify_tree`]).
    fn verify_tree(
        &mut self,
        seq: usize,
        tokens: &[u32],
        parents: &[Option<usize>],
    ) -> Result<Vec<Vec<f32>>> {
        if crate::is_chain(parents) {
            Ok(self
                .verify_batch(&[(seq, tokens)])?
                .pop()
                .unwrap_or_default())
        } else {
            Err(Error::Mismatch(
                "this verifier scores no token trees".into(),
            ))
        }
    }
    /// [`crate::Verifier::keep`] for sequence `seq`.
    fn keep(&mut self, seq: usize, base: usize, rows: &[usize]) -> Result<()> {
        crate::keep_prefix_only(rows, |n| self.rollback(seq, base + n))
    }
}

pub struct BatchDecoder<'a> {
    /// One drafter, acceptance rule and controller per sequence.
    pub drafters: Vec<&'a mut dyn Drafter>,
    pub rules: Vec<&'a mut dyn AcceptanceRule>,
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
    /// Why the sequence ended, once it has.
    stop: Option<StopReason>,
}

impl Seq {
    /// Takes the decided token `t`: false (and the sequence stops, `t` not emitted) for an
    /// end-of-sequence token; else `t` is emitted, and the sequence stops once it holds
    /// `max_tokens`.
    fn emit(&mut self, t: u32, max_tokens: usize, eos: &[u32]) -> bool {
        if eos.contains(&t) {
            self.stop = Some(StopReason::Eos);
            return false;
        }
        self.tokens.push(t);
        self.out.push(t);
        self.last = t;
        if self.out.len() >= max_tokens {
            self.stop = Some(StopReason::MaxTokens);
        }
        true
    }
}

/// What one step's timing tells [`BatchDecoder::accept`].
struct StepTiming {
    /// Drafting time per sequence.
    draft_secs: f64,
    /// The pass's time.
    verify_secs: f64,
    /// One sequence in the pass: its time prices that draft's length.
    alone: bool,
    /// Whether this step drafted (the controller learns only from those).
    speculate: bool,
}

impl BatchDecoder<'_> {
    /// Generates up to `max_tokens` after each prompt; EOS ends a sequence and is not emitted.
    /// Returns each sequence's tokens and the batch's combined statistics.
    pub fn generate(
        &mut self,
        prompts: &[Vec<u32>],
        max_tokens: usize,
        eos: &[u32],
    ) -> Result<(Vec<Vec<u32>>, SpecStats)> {
        self.generate_streaming(prompts, max_tokens, eos, |_, _| Ok(()))
    }

    /// [`BatchDecoder::generate`], calling `on_token(sequence, token)` for every token as it
    /// is decided. `stats.stop` is the one sequence's reason for a batch of one; for more,
    /// `ContextFull` if any sequence ran out of context, `Eos` if all ended there, else
    /// `MaxTokens`.
    ///
    /// The lifecycle, one method each: [`Self::begin`] (check the parts, prefill every
    /// prompt), then per step [`Self::draft`] (each active sequence's draft),
    /// [`Self::verify`] (one pass for all of them) and [`Self::accept`] (judge, keep the
    /// accepted cache rows, inform drafter and controller) before the verdict's tokens are
    /// emitted; and [`Self::finish`].
    pub fn generate_streaming(
        &mut self,
        prompts: &[Vec<u32>],
        max_tokens: usize,
        eos: &[u32],
        mut on_token: impl FnMut(usize, u32) -> Result<()>,
    ) -> Result<(Vec<Vec<u32>>, SpecStats)> {
        let start = Instant::now();
        let mut stats = SpecStats::default();
        let mut seqs = self.begin(prompts, max_tokens, eos, &mut stats)?;
        let limit = self.verifier.limit();
        loop {
            for (i, s) in seqs.iter_mut().enumerate() {
                if s.stop.is_none() && self.verifier.len(i) + 1 > limit {
                    s.stop = Some(StopReason::ContextFull);
                }
            }
            let active: Vec<usize> = (0..seqs.len())
                .filter(|&i| seqs[i].stop.is_none())
                .collect();
            if active.is_empty() {
                break;
            }
            let speculate = active.len() <= self.max_spec_batch;
            // A token tree is verified in a pass of its own sequence: with one sequence, and a
            // verifier that scores trees; otherwise a drafted tree is cut to its main chain.
            let trees = active.len() == 1 && self.verifier.scores_trees();
            let t0 = Instant::now();
            let mut drafts = Vec::with_capacity(active.len());
            for &i in &active {
                let room = max_tokens - seqs[i].out.len();
                drafts.push(self.draft(i, &seqs[i], speculate, room, eos, trees)?);
            }
            let t1 = Instant::now();
            let logits = self.verify(&active, &seqs, &drafts)?;
            let (draft_secs, verify_secs) = ((t1 - t0).as_secs_f64(), t1.elapsed().as_secs_f64());
            stats.draft_secs += draft_secs;
            stats.verify_secs += verify_secs;
            stats.verifier_passes += 1;
            let timing = StepTiming {
                // Drafting is shared out evenly; the one pass verified every sequence.
                draft_secs: draft_secs / active.len() as f64,
                verify_secs,
                alone: active.len() == 1,
                speculate,
            };
            for ((&i, d), l) in active.iter().zip(&drafts).zip(&logits) {
                let verdict = self.accept(i, d, l, &timing, &mut stats)?;
                let path_tokens = verdict.path.iter().map(|&j| d.tokens[j]);
                let s = &mut seqs[i];
                for t in path_tokens.chain(std::iter::once(verdict.next)) {
                    if !s.emit(t, max_tokens, eos) {
                        break;
                    }
                    on_token(i, t)?;
                    if s.stop.is_some() {
                        break;
                    }
                }
            }
        }
        stats.stop = self.finish(&seqs);
        stats.generated_tokens = seqs.iter().map(|s| s.out.len()).sum();
        stats.total_secs = start.elapsed().as_secs_f64();
        Ok((seqs.into_iter().map(|s| s.out).collect(), stats))
    }

    /// Checks that every sequence has its parts and that drafts and verifier share a
    /// vocabulary, hands the drafters the stop tokens, and prefills every prompt but its last
    /// token (after what the verifier already holds of it).
    fn begin(
        &mut self,
        prompts: &[Vec<u32>],
        max_tokens: usize,
        eos: &[u32],
        stats: &mut SpecStats,
    ) -> Result<Vec<Seq>> {
        let n = prompts.len();
        if self.drafters.len() != n || self.rules.len() != n || self.controllers.len() != n {
            return Err(Error::Mismatch(format!(
                "{n} prompts need {n} drafters, rules and controllers ({}, {} and {} given)",
                self.drafters.len(),
                self.rules.len(),
                self.controllers.len()
            )));
        }
        let vocab = self.verifier.vocab_size();
        for d in &self.drafters {
            if let Some(dv) = d.vocab_size().filter(|&dv| dv != vocab) {
                return Err(Error::Mismatch(format!(
                    "draft and verifier vocabularies differ ({dv} vs {vocab} tokens): they must share a tokenizer"
                )));
            }
        }
        for d in self.drafters.iter_mut() {
            d.set_stop_tokens(eos);
        }
        let mut seqs = Vec::with_capacity(n);
        let mut heads = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let (&last, head) = p
                .split_last()
                .ok_or_else(|| Error::Mismatch(format!("prompt {i} is empty")))?;
            stats.prompt_tokens += p.len();
            // A verifier may already hold the start of the prompt (a chat's earlier turns):
            // only the rest is run. It must be the prompt's own start; the caller keeps that.
            let held = self.verifier.len(i);
            let rest = head.get(held..).ok_or_else(|| {
                Error::Mismatch(format!(
                    "the verifier holds {held} tokens of sequence {i}, more than its prompt's {}",
                    head.len()
                ))
            })?;
            if !rest.is_empty() {
                heads.push((i, rest));
            }
            seqs.push(Seq {
                tokens: p.clone(),
                out: Vec::new(),
                last,
                stop: (max_tokens == 0).then_some(StopReason::MaxTokens),
            });
        }
        // Every sequence's context holds all its tokens but the last. No row of the heads'
        // logits is read: a 300-token prompt's rows cost a 49k-vocabulary head each (and
        // 59 MB of rows) where plain generation computes only the last.
        if !heads.is_empty() {
            let t = Instant::now();
            self.verifier.prefill_batch(&heads)?;
            stats.prefill_secs = t.elapsed().as_secs_f64();
        }
        Ok(seqs)
    }

    /// Sequence `i`'s draft for this step: up to the controller's k tokens (none when not
    /// speculating), within the `room` left before `max_tokens` and the context limit, cut
    /// after a stop token, and to its main chain where trees are not verified this step.
    fn draft(
        &mut self,
        i: usize,
        s: &Seq,
        speculate: bool,
        room: usize,
        eos: &[u32],
        trees: bool,
    ) -> Result<Draft> {
        let base = self.verifier.len(i);
        let limit = self.verifier.limit();
        let k = if speculate {
            self.controllers[i]
                .next_k()
                .min(room - 1)
                .min(limit - base - 1)
        } else {
            0
        };
        let mut d = if k > 0 {
            let controller = &mut *self.controllers[i];
            self.drafters[i].propose_gated(&s.tokens, k, &mut |j, evidence| {
                controller.gate(j, evidence)
            })?
        } else {
            Draft::default()
        };
        d.limit_depth(k);
        d.cut_after_stop(eos);
        // A tree has more tokens than its depth k; all must fit the context.
        d.limit_nodes(limit - base - 1);
        if d.is_tree() && !trees {
            d = d.main_chain();
        }
        Ok(d)
    }

    /// One verifier pass over every active sequence's last token and draft: a batch of
    /// chains, or a single sequence's tree. Returns each sequence's logit rows, row 0 for
    /// its last token.
    fn verify(
        &mut self,
        active: &[usize],
        seqs: &[Seq],
        drafts: &[Draft],
    ) -> Result<Vec<Vec<Vec<f32>>>> {
        let inputs: Vec<Vec<u32>> = active
            .iter()
            .zip(drafts)
            .map(|(&i, d)| {
                std::iter::once(seqs[i].last)
                    .chain(d.tokens.iter().copied())
                    .collect()
            })
            .collect();
        let batch: Vec<(usize, &[u32])> = active
            .iter()
            .zip(&inputs)
            .map(|(&i, t)| (i, t.as_slice()))
            .collect();
        Ok(match (drafts, &batch[..]) {
            ([d], &[(i, input)]) if d.is_tree() => {
                // The context's last token is the root; the draft's tokens hang under it.
                let parents: Vec<Option<usize>> = std::iter::once(None)
                    .chain((0..d.tokens.len()).map(|j| Some(d.parent(j).map_or(0, |p| p + 1))))
                    .collect();
                vec![self.verifier.verify_tree(i, input, &parents)?]
            }
            _ => self.verifier.verify_batch(&batch)?,
        })
    }

    /// Judges sequence `i`'s draft `d` against its rows `logits`, keeps the accepted path's
    /// cache rows (dropping the rest), and tells the drafter, the controller and the
    /// statistics what was accepted. Returns the verdict: the path and the verifier's next
    /// token.
    fn accept(
        &mut self,
        i: usize,
        d: &Draft,
        logits: &[Vec<f32>],
        timing: &StepTiming,
        stats: &mut SpecStats,
    ) -> Result<TreeVerdict> {
        let base = self.verifier.len(i) - (d.tokens.len() + 1);
        // Row 0 follows the context's last token (at `base`): it decides index base + 1.
        self.rules[i].set_position(base + 1);
        let verdict = self.rules[i].judge_tree(d, logits);
        let accepted = verdict.path.len();
        self.drafters[i].accepted(accepted);
        // The root stays; so do the accepted path's rows (draft token j is row j + 1).
        if d.is_tree() {
            let rows: Vec<usize> = std::iter::once(0)
                .chain(verdict.path.iter().map(|&j| j + 1))
                .collect();
            self.verifier.keep(i, base, &rows)?;
            stats.record_tree(d, &verdict.path);
        } else {
            self.verifier.rollback(i, base + 1 + accepted);
        }
        // A tree counts as its depth: the controller's k bounds the longest path.
        let drafted = d.depth();
        stats.record(drafted, accepted);
        if timing.alone {
            stats.record_pass(drafted, timing.verify_secs);
        }
        if timing.speculate {
            self.controllers[i].observe(&StepReport {
                drafted,
                verified: d.tokens.len(),
                accepted,
                draft_secs: timing.draft_secs,
                verify_secs: timing.verify_secs,
            });
        }
        Ok(verdict)
    }

    /// Ends every context as plain generation's would (`tandem_model::generate`): after an
    /// end-of-sequence token every emitted token has been run, otherwise all but the last.
    /// Accepted drafts past that (an end token, or tokens beyond `max_tokens`) go: a chat's
    /// next turn runs them in its prompt, as it would after plain generation, so both compute
    /// those positions the same way (see `tandem_model::Logits`). Returns the batch's stop
    /// reason.
    fn finish(&mut self, seqs: &[Seq]) -> StopReason {
        let stops: Vec<StopReason> = seqs
            .iter()
            .map(|s| s.stop.unwrap_or(StopReason::MaxTokens))
            .collect();
        for (i, (s, stop)) in seqs.iter().zip(&stops).enumerate() {
            let ran = match stop {
                StopReason::Eos => s.tokens.len(),
                _ => s.tokens.len().saturating_sub(1),
            };
            if self.verifier.len(i) > ran {
                self.verifier.rollback(i, ran);
            }
        }
        if stops.contains(&StopReason::ContextFull) {
            StopReason::ContextFull
        } else if !stops.is_empty() && stops.iter().all(|&s| s == StopReason::Eos) {
            StopReason::Eos
        } else {
            StopReason::MaxTokens
        }
    }
}
