//! Controllers choose how many tokens to draft next.

/// What one speculative step cost and achieved.
#[derive(Debug, Clone, Copy)]
pub struct StepReport {
    pub drafted: usize,
    pub accepted: usize,
    pub draft_secs: f64,
    pub verify_secs: f64,
}

pub trait Controller {
    /// Tokens to draft in the next step (0 = decode plainly).
    fn next_k(&mut self) -> usize;
    fn observe(&mut self, step: &StepReport);
}

/// Always drafts `k` tokens.
pub struct FixedK(pub usize);

impl Controller for FixedK {
    fn next_k(&mut self) -> usize {
        self.0
    }
    fn observe(&mut self, _: &StepReport) {}
}

/// Picks k from the observed per-token acceptance rate α and the measured cost of drafting
/// one token relative to a verifier pass c, maximizing Leviathan et al.'s expected speedup
/// (1 − α^(k+1)) / ((1 − α)(k·c + 1)); k = 0 (plain decoding) when nothing beats 1. While
/// speculation is off it still probes with k = 1 every `probe_every` steps, so it can notice
/// when drafts start to pay again.
pub struct AdaptiveK {
    pub max_k: usize,
    alpha: f64,
    cost: f64,
    /// When set, the draft cost is this constant instead of being measured on the clock: the
    /// choices of k then depend only on acceptance, so a seeded sampling run is reproducible.
    fixed_cost: Option<f64>,
    steps_off: usize,
    pub probe_every: usize,
    k: usize,
}

impl AdaptiveK {
    pub fn new(max_k: usize) -> Self {
        AdaptiveK {
            max_k,
            alpha: 0.6,
            cost: 0.1,
            fixed_cost: None,
            steps_off: 0,
            probe_every: 16,
            k: max_k.min(4),
        }
    }

    /// A controller that takes the draft cost per token (relative to a verifier pass) as
    /// given, e.g. the draft's weight bytes over the verifier's, and never reads the clock.
    pub fn with_fixed_cost(max_k: usize, cost: f64) -> Self {
        AdaptiveK {
            cost,
            fixed_cost: Some(cost),
            ..Self::new(max_k)
        }
    }

    /// Expected tokens per unit of verifier time for draft length k.
    pub fn expected_speedup(alpha: f64, cost: f64, k: usize) -> f64 {
        let a = alpha.clamp(0.0, 0.999);
        (1.0 - a.powi(k as i32 + 1)) / ((1.0 - a) * (k as f64 * cost + 1.0))
    }

    fn choose(&self) -> usize {
        let mut best = (1.0, 0);
        for k in 1..=self.max_k {
            let s = Self::expected_speedup(self.alpha, self.cost, k);
            if s > best.0 * 1.02 {
                best = (s, k);
            }
        }
        best.1
    }
}

impl Controller for AdaptiveK {
    fn next_k(&mut self) -> usize {
        if self.k == 0 {
            self.steps_off += 1;
            if self.steps_off >= self.probe_every {
                self.steps_off = 0;
                return 1;
            }
        }
        self.k
    }

    fn observe(&mut self, s: &StepReport) {
        if s.drafted > 0 {
            // Per-token acceptance estimated from accepted/drafted, smoothed.
            let a = s.accepted as f64 / s.drafted as f64;
            self.alpha = 0.8 * self.alpha + 0.2 * a;
            if self.fixed_cost.is_none() && s.verify_secs > 0.0 {
                let c = s.draft_secs / s.drafted as f64 / s.verify_secs;
                self.cost = 0.8 * self.cost + 0.2 * c;
            }
        }
        self.k = self.choose();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adaptive_k_turns_off_for_bad_drafts_and_grows_for_good_ones() {
        let mut c = AdaptiveK::new(8);
        for _ in 0..30 {
            let k = c.next_k().max(1);
            c.observe(&StepReport {
                drafted: k,
                accepted: 0,
                draft_secs: 0.02 * k as f64,
                verify_secs: 0.1,
            });
        }
        assert_eq!(c.k, 0, "bad drafts should switch speculation off");
        let mut c = AdaptiveK::new(8);
        for _ in 0..30 {
            let k = c.next_k();
            c.observe(&StepReport {
                drafted: k,
                accepted: k,
                draft_secs: 0.001 * k as f64,
                verify_secs: 0.1,
            });
        }
        assert!(
            c.k >= 6,
            "cheap, always-right drafts should draft long: k = {}",
            c.k
        );
        // With a fixed cost the clock is ignored: wildly different timings, same choices.
        let (mut a, mut b) = (
            AdaptiveK::with_fixed_cost(8, 0.3),
            AdaptiveK::with_fixed_cost(8, 0.3),
        );
        for i in 0..40 {
            let (ka, kb) = (a.next_k(), b.next_k());
            assert_eq!(ka, kb);
            let acc = ka.min(i % 3);
            a.observe(&StepReport {
                drafted: ka,
                accepted: acc,
                draft_secs: 0.001,
                verify_secs: 0.1,
            });
            b.observe(&StepReport {
                drafted: kb,
                accepted: acc,
                draft_secs: 5.0,
                verify_secs: 0.01,
            });
        }
    }
}
