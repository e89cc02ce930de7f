//! How to speculate, as one config that builds the run's parts: the acceptance rule, the
//! draft-length controller and a draft model's sampler. Model-free, so the session (tandem's
//! own models), the Python package and the C ABI (an engine's models) all build their runs
//! from it.

use crate::{
    AcceptanceRule, AdaptiveK, Controller, ControllerMemory, CoupledSampling, Drafter, FixedK,
    Greedy, RejectionSampling, Result, SpecStats, SpeculativeDecoder, Verifier,
};
use tandem_kernels::sampling::{Sampler, SamplingParams};

/// Off by default, unlike llama.cpp's 0.75: a quantized copy of the verifier agrees with it
/// even where it is unsure, so the cut-off mostly threw good drafts away (SmolLM2, self:q4_0,
/// 6 prompts: 1.03× plain at 0, 0.95× at 0.4; self:q8_0@all with k = 4: 0.81× at 0.75).
pub const DEFAULT_DRAFT_P_MIN: f32 = 0.0;

/// Token trees are off by default until measured to pay (BENCHMARKS.md).
pub const DEFAULT_TREE_BELOW: f32 = 0.0;

/// How a draft model picks the tokens it proposes ([`SpecConfig::draft_sampler`]).
pub enum DraftSampling {
    /// Its argmax.
    Greedy,
    /// A draw from its distribution on a stream of its own; the distributions drawn from are
    /// kept in the draft for [`RejectionSampling`].
    Independent(Sampler),
    /// Its position-keyed draw with the verifier's seed ([`Sampler::sample_at`]), for
    /// [`CoupledSampling`]: no distribution is kept.
    Coupled(Sampler),
}

impl DraftSampling {
    /// Whether the draft keeps the distributions it drew from (rejection sampling reads them).
    pub fn keeps_probs(&self) -> bool {
        matches!(self, DraftSampling::Independent(_))
    }
}

/// How to speculate.
#[derive(Clone, Copy, Debug)]
pub struct SpecConfig {
    /// Greedy (temperature 0: the output is the verifier's greedy decoding) or sampled
    /// (rejection sampling: the verifier's distribution, reproducible by seed).
    pub params: SamplingParams,
    /// Most tokens drafted per verifier pass.
    pub draft_max: usize,
    /// Let k follow what drafting earns ([`AdaptiveK`]); else always `draft_max`.
    pub adapt: bool,
    /// The verifier's context limit (default: the model's).
    pub ctx: Option<usize>,
    /// A draft model stops drafting below this top probability
    /// ([`crate::DraftChain::min_confidence`]).
    pub draft_p_min: f32,
    /// Give a draft model its own KV cache even when it could draft over the verifier's.
    pub own_draft_cache: bool,
    /// A draft model's output head keeps the tokens below this id and the prompt's (0 = all).
    pub draft_vocab: usize,
    /// In a batch, draft only while at most this many sequences are active (above it the
    /// batch decodes plainly: drafted rows cost real time once the matmuls are compute-bound).
    pub max_spec_batch: usize,
    /// Token trees: a draft model offers its runner-up where its top probability is below
    /// this ([`crate::Branching`]; 0 = chains).
    pub tree_below: f32,
    /// Token trees from a suffix lookup: up to this many distinct continuations at once
    /// ([`crate::SuffixDrafter::paths`]; 1 = the best match only).
    pub lookup_paths: usize,
    /// When sampling: judge drafts by [`CoupledSampling`] (the default: draft and verifier
    /// share position-keyed noise, the output is plain sampling's with the same seed, and k
    /// follows the clock) instead of [`RejectionSampling`] (the draft samples on a stream of
    /// its own; k follows acceptance alone, so a seeded run stays reproducible).
    pub coupled: bool,
    /// Let the adaptive controller stop a model or lookup draft token by token where the next
    /// token is expected to cost more than it earns ([`AdaptiveK::gate_drafts`]); else it
    /// picks one length per step.
    pub gate: bool,
}

impl Default for SpecConfig {
    fn default() -> Self {
        SpecConfig {
            params: SamplingParams::default(),
            draft_max: 8,
            adapt: true,
            ctx: None,
            draft_p_min: DEFAULT_DRAFT_P_MIN,
            own_draft_cache: false,
            draft_vocab: crate::DEFAULT_DRAFT_VOCAB,
            max_spec_batch: usize::MAX,
            tree_below: DEFAULT_TREE_BELOW,
            lookup_paths: 1,
            coupled: true,
            gate: true,
        }
    }
}

/// Most tokens a run may draft per verifier pass. Passes of 9 rows already cost ~1.7 one-row
/// passes on the CPU (BENCHMARKS.md), and the draft-length controller weighs every length up
/// to the limit at each step, so a limit of 10⁹ (a typo, or a hostile caller of the C ABI)
/// made a 5-token run spin for minutes.
pub const MAX_DRAFT_TOKENS: usize = 256;

impl SpecConfig {
    /// The acceptance rule the sampling parameters call for; every run builds it first, so
    /// it also refuses a `draft_max` of 0 or over [`MAX_DRAFT_TOKENS`].
    pub fn rule(&self) -> Result<Box<dyn AcceptanceRule>> {
        check_draft_max(self.draft_max)?;
        Ok(if self.params.is_greedy() {
            Box::new(Greedy)
        } else if self.coupled {
            Box::new(CoupledSampling::new(Sampler::new(self.params)?))
        } else {
            Box::new(RejectionSampling {
                sampler: Sampler::new(self.params)?,
            })
        })
    }

    /// The draft-length controller. Greedy and coupled output never depend on k, so k may
    /// follow the clock. Rejection-sampled output does (the random streams are consumed
    /// differently), so such a seeded run adapts on acceptance alone, with the draft's cost
    /// given as `draft_cost`: a draft step's time over a verifier step's, known without
    /// reading the clock (0 for a lookup).
    pub fn controller(&self, draft_cost: f64) -> Box<dyn Controller> {
        self.controller_resuming(draft_cost, None)
    }

    /// [`SpecConfig::controller`] starting from what an earlier run of the same session
    /// learned ([`AdaptiveK::resume`]), when `memory` holds that.
    pub fn controller_resuming(
        &self,
        draft_cost: f64,
        memory: Option<&ControllerMemory>,
    ) -> Box<dyn Controller> {
        if !self.adapt {
            return Box::new(FixedK(self.draft_max));
        }
        let mut fresh = if self.params.is_greedy() || self.coupled {
            AdaptiveK::new(self.draft_max)
        } else {
            AdaptiveK::with_fixed_cost(self.draft_max, draft_cost)
        };
        fresh.gate_drafts = self.gate;
        Box::new(match memory {
            Some(m) => AdaptiveK::resume(fresh, m),
            None => fresh,
        })
    }

    /// Whether the acceptance rule reads a verifier row only through its position-keyed
    /// draw (`Sampler::sample_at`: the argmax when greedy), as [`Greedy`] and
    /// [`CoupledSampling`] do; [`RejectionSampling`] reads whole distributions. A verifier
    /// may then compute only the logits that decide each draw.
    pub fn rule_reads_draws_only(&self) -> bool {
        self.params.is_greedy() || self.coupled
    }

    /// How a draft model branches into a token tree.
    pub fn branching(&self) -> crate::Branching {
        crate::Branching::below(self.tree_below)
    }

    /// How a draft model picks its proposals: greedily when the run is greedy; with the run's
    /// own seed, drawing as the verifier will at each position, when coupled; else sampled
    /// on a stream of its own (rejection sampling needs independent draws).
    pub fn draft_sampler(&self) -> Result<DraftSampling> {
        if self.params.is_greedy() {
            return Ok(DraftSampling::Greedy);
        }
        Ok(if self.coupled {
            DraftSampling::Coupled(Sampler::new(self.params)?)
        } else {
            DraftSampling::Independent(Sampler::new(SamplingParams {
                seed: self.params.seed ^ 0x9e37_79b9,
                ..self.params
            })?)
        })
    }

    /// How a draft model builds its chains in this run: [`SpecConfig::draft_sampler`]'s
    /// sampling, `draft_p_min`'s stopping rule and [`SpecConfig::branching`]'s trees (the stop
    /// tokens come from the run, through [`crate::Drafter::set_stop_tokens`]).
    pub fn draft_chain(&self) -> Result<crate::DraftChain> {
        Ok(crate::DraftChain {
            min_confidence: self.draft_p_min,
            branching: self.branching(),
            ..self.draft_sampler()?.into()
        })
    }

    /// One generation with these settings over `drafter` and `verifier`: up to `max_tokens`
    /// after `prompt`, `on_token` called for each token as it is decided.
    #[allow(clippy::too_many_arguments)]
    pub fn decode(
        &self,
        drafter: &mut dyn Drafter,
        verifier: &mut dyn Verifier,
        draft_cost: f64,
        prompt: &[u32],
        max_tokens: usize,
        eos: &[u32],
        on_token: impl FnMut(u32) -> Result<()>,
    ) -> Result<(Vec<u32>, SpecStats)> {
        let mut memory = None;
        self.decode_resuming(
            drafter,
            verifier,
            draft_cost,
            &mut memory,
            prompt,
            max_tokens,
            eos,
            on_token,
        )
    }

    /// [`SpecConfig::decode`] as one run of a session: the controller starts from `memory`
    /// (what the session's earlier runs learned, if anything) and leaves what this run
    /// learned there, whether or not the run succeeded.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_resuming(
        &self,
        drafter: &mut dyn Drafter,
        verifier: &mut dyn Verifier,
        draft_cost: f64,
        memory: &mut Option<ControllerMemory>,
        prompt: &[u32],
        max_tokens: usize,
        eos: &[u32],
        on_token: impl FnMut(u32) -> Result<()>,
    ) -> Result<(Vec<u32>, SpecStats)> {
        let mut rule = self.rule()?;
        let mut controller = self.controller_resuming(draft_cost, memory.as_ref());
        let result = SpeculativeDecoder {
            drafter,
            verifier,
            rule: &mut *rule,
            controller: &mut *controller,
        }
        .generate(prompt, max_tokens, eos, on_token);
        if let Some(m) = controller.memory() {
            *memory = Some(m);
        }
        result
    }
}

/// `draft_max` within 1..=[`MAX_DRAFT_TOKENS`].
pub fn check_draft_max(draft_max: usize) -> Result<()> {
    if (1..=MAX_DRAFT_TOKENS).contains(&draft_max) {
        Ok(())
    } else {
        Err(crate::Error::Mismatch(format!(
            "draft_max {draft_max} is outside 1..={MAX_DRAFT_TOKENS} (most tokens drafted per verifier pass)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_refuses_draft_lengths_of_zero_and_past_the_limit() {
        for bad in [0, MAX_DRAFT_TOKENS + 1, 1_000_000_000] {
            let c = SpecConfig {
                draft_max: bad,
                ..SpecConfig::default()
            };
            let e = c.rule().err().expect("accepted").to_string();
            assert!(
                e.contains(&format!("draft_max {bad} is outside 1..=256")),
                "{e}"
            );
        }
        for good in [1, 8, MAX_DRAFT_TOKENS] {
            let c = SpecConfig {
                draft_max: good,
                ..SpecConfig::default()
            };
            assert!(c.rule().is_ok());
        }
    }
}
