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
/// speculation is off it still probes every `probe_every` steps, so it can notice when drafts
/// start to pay again.
///
/// The model ignores what it cannot see: a (k+1)-token verification costs more than a plain
/// step, and a draft model must first read the prompt. So when it reads the clock, the
/// controller also keeps the measured throughput (tokens per second, smoothed) of plain steps
/// and of speculative steps, and speculates only while the measured speculative rate beats
/// the plain one; failed probes back off (16, 32, 64 steps), so a drafter that never pays
/// costs little more than plain decoding.
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
    /// Smoothed tokens/s of plain steps and of speculative steps (clock mode only).
    plain_rate: Option<f64>,
    spec_rate: Option<f64>,
    /// The k the model wants while measured throughput keeps speculation off.
    wanted: usize,
    steps: usize,
    /// The next speculative step is the first after plain ones: a model drafter catches up
    /// on the tokens it missed (the whole prompt, the first time), so its rate is not counted.
    catching_up: bool,
    /// Speculation is on only to probe whether it pays again.
    probing: bool,
}

/// Extra verifier cost per drafted token, as a share of a plain step, assumed when the
/// controller does not read the clock (measured: a 5-token pass costs 1.46 plain steps at F16).
const VERIFY_GROWTH: f64 = 0.1;
/// Below this draft cost (an n-gram lookup) the model's choice stands: single steps of such a
/// drafter win or lose by whole verifier passes, too noisy a rate to judge it by, and a draft
/// that costs nothing can only lose the verifier's growth with k.
const GUARD_MIN_COST: f64 = 0.05;
/// Most steps between probes while speculation is off.
const MAX_PROBE_EVERY: usize = 64;
/// A plain step every this many speculative ones keeps the plain rate current.
const PLAIN_REFRESH: usize = 32;

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
            plain_rate: None,
            spec_rate: None,
            wanted: max_k.min(4),
            steps: 0,
            catching_up: true,
            probing: false,
        }
    }

    fn ema(old: Option<f64>, x: f64) -> Option<f64> {
        Some(old.map_or(x, |o| 0.7 * o + 0.3 * x))
    }

    /// A controller that takes the draft cost per token (relative to a verifier pass) as
    /// given, e.g. the draft's weight bytes over the verifier's, and never reads the clock.
    pub fn with_fixed_cost(max_k: usize, cost: f64) -> Self {
        let mut c = AdaptiveK {
            cost,
            fixed_cost: Some(cost),
            ..Self::new(max_k)
        };
        // Start from what the prior acceptance says: a costly draft model then begins off
        // (and is probed), instead of reading the whole prompt before it is judged.
        c.k = c.choose();
        c.wanted = c.k.max(1);
        if c.k == 0 {
            c.probe_every = 32;
        }
        c
    }

    /// Expected tokens per unit of verifier time for draft length k.
    pub fn expected_speedup(alpha: f64, cost: f64, k: usize) -> f64 {
        let a = alpha.clamp(0.0, 0.999);
        (1.0 - a.powi(k as i32 + 1)) / ((1.0 - a) * (k as f64 * cost + 1.0))
    }

    fn choose(&self) -> usize {
        // Without the clock the model is all there is, and it does not see that verifying
        // k + 1 tokens costs more than a plain step (~0.1 pass per extra token at F16 on the
        // CPU, BENCHMARKS.md): charge that, and ask for a clear gain before drafting at all.
        let (cost, first_margin) = match self.fixed_cost {
            Some(c) => (c + VERIFY_GROWTH, 1.10),
            None => (self.cost, 1.02),
        };
        let mut best = (1.0, 0);
        for k in 1..=self.max_k {
            let s = Self::expected_speedup(self.alpha, cost, k);
            let margin = if best.1 == 0 { first_margin } else { 1.02 };
            if s > best.0 * margin {
                best = (s, k);
            }
        }
        best.1
    }
}

impl Controller for AdaptiveK {
    fn next_k(&mut self) -> usize {
        self.steps += 1;
        if self.fixed_cost.is_none() {
            // Measure plain decoding first, and now and then while speculating.
            let refresh = self.k > 0
                && self.cost >= GUARD_MIN_COST
                && self.steps.is_multiple_of(PLAIN_REFRESH);
            if self.plain_rate.is_none() || refresh {
                return 0;
            }
        }
        if self.k == 0 {
            self.steps_off += 1;
            if self.steps_off >= self.probe_every {
                self.steps_off = 0;
                self.catching_up = true;
                self.probing = true;
                self.k = self.wanted.max(1); // probe for two steps: catch-up, then a measure
                return self.k;
            }
        }
        self.k
    }

    fn observe(&mut self, s: &StepReport) {
        let clock = self.fixed_cost.is_none();
        let secs = s.draft_secs + s.verify_secs;
        let catch_up = s.drafted > 0 && std::mem::take(&mut self.catching_up);
        if clock && secs > 0.0 && !catch_up {
            let rate = (s.accepted + 1) as f64 / secs;
            if s.drafted == 0 {
                self.plain_rate = Self::ema(self.plain_rate, rate);
            } else {
                self.spec_rate = Self::ema(self.spec_rate, rate);
            }
        }
        if s.drafted == 0 {
            return; // a plain step says nothing about the drafts
        }
        // Per-token acceptance estimated from accepted/drafted, smoothed.
        let a = s.accepted as f64 / s.drafted as f64;
        self.alpha = 0.8 * self.alpha + 0.2 * a;
        if clock && s.verify_secs > 0.0 && !catch_up {
            let c = s.draft_secs / s.drafted as f64 / s.verify_secs;
            self.cost = 0.8 * self.cost + 0.2 * c;
        }
        self.wanted = self.choose();
        if catch_up && self.wanted > 0 {
            self.k = self.wanted; // judge on the next step
            return;
        }
        let losing = match (self.spec_rate, self.plain_rate) {
            (Some(sp), Some(pl)) => clock && self.cost >= GUARD_MIN_COST && sp < pl,
            _ => false,
        };
        self.k = if losing { 0 } else { self.wanted };
        if self.k == 0 && std::mem::take(&mut self.probing) && self.cost >= GUARD_MIN_COST {
            // A failed probe of a costly drafter: wait longer before the next one (probing
            // an n-gram lookup costs one slightly longer verification, so it keeps at 16).
            self.probe_every = (self.probe_every * 2).min(MAX_PROBE_EVERY);
        } else if self.k > 0 {
            self.probing = false;
            self.probe_every = 16;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drafts the model likes (high acceptance, cheap by its estimate) but that lose on the
    /// clock are switched off by the measured throughput, and probes back off.
    #[test]
    fn measured_throughput_overrides_the_model() {
        let mut c = AdaptiveK::new(8);
        let mut spec_steps = 0;
        for _ in 0..400 {
            let k = c.next_k();
            // Plain step: 10 ms per token. Speculative: every draft accepted, but each step
            // costs 10 ms per drafted token on top of a 12 ms verification (always a loss).
            let report = if k == 0 {
                StepReport {
                    drafted: 0,
                    accepted: 0,
                    draft_secs: 0.0,
                    verify_secs: 0.010,
                }
            } else {
                spec_steps += 1;
                StepReport {
                    drafted: k,
                    accepted: k,
                    draft_secs: 0.010 * k as f64,
                    verify_secs: 0.012,
                }
            };
            c.observe(&report);
        }
        assert_eq!(c.k, 0);
        assert!(spec_steps < 30, "{spec_steps} speculative steps of 400");
        assert_eq!(c.probe_every, MAX_PROBE_EVERY);
    }

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
