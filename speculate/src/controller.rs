//! Controllers choose how many tokens to draft next, and (through [`Controller::gate`])
//! whether a drafter keeps each token it drafts.

use crate::drafter::{DraftEvidence, Gate};

/// What one speculative step cost and achieved.
#[derive(Debug, Clone, Copy)]
pub struct StepReport {
    /// The draft's depth (a chain's length): the tokens one path can accept.
    pub drafted: usize,
    /// The tokens the verifier scored beside the context's last: `drafted`, plus a token
    /// tree's leaves off its main chain. What the pass's price depends on.
    pub verified: usize,
    pub accepted: usize,
    pub draft_secs: f64,
    pub verify_secs: f64,
}

pub trait Controller {
    /// Tokens to draft in the next step (0 = decode plainly).
    fn next_k(&mut self) -> usize;
    fn observe(&mut self, step: &StepReport);
    /// Asked by a gated drafter ([`crate::Drafter::propose_gated`]) after it drafts token `i`
    /// (0-based) of the next step's chain: keep it, and draft another?
    fn gate(&mut self, _i: usize, _evidence: DraftEvidence) -> Gate {
        Gate::Continue
    }
    /// What this controller learned that the next generation of the same session may start
    /// from (see [`ControllerMemory`]); `None` when it learns nothing.
    fn memory(&self) -> Option<ControllerMemory> {
        None
    }
}

/// What an [`AdaptiveK`] measured that outlives one generation: the verifier's plain step, the
/// draft's time per drafted token, how much a verification grows per drafted token, plain
/// decoding's throughput, and the drafts' acceptance. The hardware, the models and the drafter
/// do not change between the prompts of `bench spec` or the turns of a chat, so a session
/// hands this from one run to the next ([`AdaptiveK::resume`]): a run then drafts from its
/// first step, with a k chosen from measured costs, instead of spending its first step on a
/// plain pass and its first drafts on a prior (a short answer of 10–40 tokens was over before
/// the controller had measured anything).
#[derive(Debug, Clone, Copy)]
pub struct ControllerMemory {
    alpha: Decayed,
    plain_step: Decayed,
    draft: Decayed,
    growth: Decayed,
    plain_rate: Decayed,
    gate: GateState,
}

/// Drafted tokens the acceptance carried over from earlier runs counts as: the rate of other
/// prompts (code against prose) is a prior for the next, which its own drafts soon outweigh.
const RESUMED_ALPHA_WEIGHT: f64 = 4.0;

/// Always drafts `k` tokens.
pub struct FixedK(pub usize);

impl Controller for FixedK {
    fn next_k(&mut self) -> usize {
        self.0
    }
    fn observe(&mut self, _: &StepReport) {}
}

/// A sum that forgets: each `add` first multiplies the old total by `DECAY`, so it weighs the
/// last ~1 / (1 − DECAY) steps. Ratios of two such sums (tokens over seconds) are what the
/// controller reads: a mean of per-step ratios let one unlucky step (a rejection at the first
/// position: one token for a whole draft + verify) switch a paying drafter off.
#[derive(Debug, Clone, Copy, Default)]
struct Decayed {
    num: f64,
    den: f64,
    n: usize,
}

const DECAY: f64 = 0.9;

impl Decayed {
    fn add(&mut self, num: f64, den: f64) {
        self.num = self.num * DECAY + num;
        self.den = self.den * DECAY + den;
        self.n += 1;
    }
    fn ratio(&self) -> Option<f64> {
        (self.n > 0 && self.den > 0.0).then(|| self.num / self.den)
    }
}

/// Hits over trials that forget slowly: both halve once the trials pass [`GATE_RATE_CAP`], so
/// an estimate follows a drift over hundreds of drafted tokens, not the last ten.
#[derive(Debug, Clone, Copy)]
struct Rate {
    hits: f64,
    trials: f64,
}

impl Rate {
    fn prior(rate: f64) -> Rate {
        Rate {
            hits: rate * GATE_PRIOR_WEIGHT,
            trials: GATE_PRIOR_WEIGHT,
        }
    }
    fn add(&mut self, hit: bool) {
        if self.trials >= GATE_RATE_CAP {
            self.hits *= 0.5;
            self.trials *= 0.5;
        }
        self.hits += f64::from(u8::from(hit));
        self.trials += 1.0;
    }
    fn rate(&self) -> f64 {
        self.hits / self.trials.max(1e-9)
    }
}

/// Upper edges of the bins of a model token's margin (its logit over the draft's runner-up)
/// whose acceptance the gate learns; one bin above the last edge, and one for lookup tokens.
const MARGIN_EDGES: [f32; 6] = [0.25, 0.5, 1.0, 1.5, 2.0, 3.0];
const LOOKUP_BIN: usize = MARGIN_EDGES.len() + 1;
const GATE_BINS: usize = LOOKUP_BIN + 1;
/// Acceptance assumed per bin before any token of it was judged: SmolLM2's edge GPTQ Q4_0
/// draft against its F16 verifier on two chat prompt sets (2,951 judged tokens at k = 8,
/// greedy; BENCHMARKS.md, session 58), the lookup's from the suffix drafter's share. Sampled
/// with the verifier's noise at temperature 0.7, the same bins by the draw's lead measured
/// 0.54, 0.67, 0.85, 0.92, 0.93, 0.97, 0.99 (2,680 tokens, session 59).
const GATE_PRIOR: [f64; GATE_BINS] = [0.52, 0.72, 0.85, 0.92, 0.96, 0.98, 0.99, 0.45];
/// Judged tokens the prior counts as, per bin.
const GATE_PRIOR_WEIGHT: f64 = 4.0;
const GATE_RATE_CAP: f64 = 400.0;
/// Verifier passes priced one by one by drafted count (0..PASS_TABLE); longer ones, and
/// counts measured fewer than [`PASS_MIN_SEEN`] times, are extrapolated from the longest
/// measured count below them at the measured growth per drafted token.
const PASS_TABLE: usize = 17;
const PASS_MIN_SEEN: usize = 3;
/// A kept token's acceptance after an accepted one, assumed before any was judged.
const GATE_PRIOR_RUN_ON: f64 = 0.8;
/// Speculative throughput, in tokens per plain step, assumed before any was measured.
const GATE_PRIOR_RATE: f64 = 1.3;

/// What the gate learns: each bin's acceptance and each drafted count's verifier pass.
#[derive(Debug, Clone, Copy)]
struct GateState {
    bins: [Rate; GATE_BINS],
    /// Seconds of a verifier pass over passes, by drafted tokens.
    pass: [Decayed; PASS_TABLE],
    /// Acceptance of a kept token after an accepted one (what the gate expects of the tokens
    /// after the one it judges: acceptance comes in runs).
    run_on: Rate,
    /// Whether a drafter has asked the gate (then the controller hands it up to `max_k`).
    asked: bool,
}

impl Default for GateState {
    fn default() -> Self {
        GateState {
            bins: GATE_PRIOR.map(Rate::prior),
            pass: [Decayed::default(); PASS_TABLE],
            run_on: Rate::prior(GATE_PRIOR_RUN_ON),
            asked: false,
        }
    }
}

fn gate_bin(evidence: DraftEvidence) -> usize {
    match evidence {
        DraftEvidence::Lookup => LOOKUP_BIN,
        DraftEvidence::Model { margin } => MARGIN_EDGES
            .iter()
            .position(|&e| margin < e)
            .unwrap_or(MARGIN_EDGES.len()),
    }
}

/// Picks k from the observed per-token acceptance rate α and the cost of one drafted token
/// relative to a plain step c, maximizing Leviathan et al.'s expected speedup
/// (1 − α^(k+1)) / ((1 − α)(k·c + 1)); k = 0 (plain decoding) when nothing beats 1. While
/// speculation is off it still probes every `probe_every` steps, so it can notice when drafts
/// start to pay again.
///
/// With the clock (the default), c is measured, not assumed: the time a plain step takes
/// (every step that verified one token), the draft's time per drafted token, and how much a
/// verification grows per drafted token (a (k+1)-token pass costs more than a plain one on a
/// CPU) -- all as forgetting sums, relative to the plain step. The model still assumes each
/// drafted token is accepted independently, so the controller also keeps the measured
/// throughput (tokens over seconds) of the steps it speculated and of those it did not, and
/// speculates only while speculating is measured to be faster; failed probes back off (16,
/// 32, 64 steps), so a drafter that never pays costs little more than plain decoding.
pub struct AdaptiveK {
    pub max_k: usize,
    /// Accepted over drafted tokens.
    alpha: Decayed,
    /// Drafted tokens judged so far (not decayed).
    judged: usize,
    /// When set, the cost per drafted token is this constant instead of being measured on the
    /// clock: the choices of k then depend only on acceptance, so a seeded sampling run is
    /// reproducible.
    fixed_cost: Option<f64>,
    /// Seconds of a plain (one-token) verifier pass.
    plain_step: Decayed,
    /// Draft seconds over drafted tokens (a draft that stops before proposing anything still
    /// costs its time).
    draft: Decayed,
    /// Verification seconds beyond a plain step, over drafted tokens.
    growth: Decayed,
    /// Tokens over seconds of the steps decoded plainly and of those the controller
    /// speculated on (whatever the drafter then proposed).
    plain_rate: Decayed,
    spec_rate: Decayed,
    steps_off: usize,
    pub probe_every: usize,
    k: usize,
    /// The k asked for by the last `next_k`.
    asked: usize,
    /// The k the model wants while measured throughput keeps speculation off.
    wanted: usize,
    steps: usize,
    /// Speculative steps since speculation was last switched on.
    spec_streak: usize,
    /// The next speculative step is the first after plain ones: a model drafter catches up
    /// on the tokens it missed (the whole prompt, the first time), so its cost is not counted.
    catching_up: bool,
    /// Speculation is on only to probe whether it pays again.
    probing: bool,
    /// Whether a drafter that asks ([`Controller::gate`]) is told to stop where the next
    /// token's verifier row and draft step are expected to cost more than they earn.
    pub gate_drafts: bool,
    gate: GateState,
    /// Each kept token's bin in this step's chain so far (judged when the step is observed;
    /// the chance that all of it is accepted is the product of their rates).
    chain_bins: Vec<usize>,
}

/// Extra verifier cost per drafted token, as a share of a plain step, assumed when the
/// controller does not read the clock (measured: a 5-token pass costs 1.46 plain steps at F16).
const VERIFY_GROWTH: f64 = 0.1;
/// Below this draft cost (an n-gram lookup) the model's choice stands: single steps of such a
/// drafter win or lose by whole verifier passes, too noisy a rate to judge it by, and a draft
/// that costs nothing can only lose the verifier's growth with k.
const GUARD_MIN_COST: f64 = 0.05;
/// The guard switches speculation off only when it measures clearly slower than plain steps:
/// single steps on this CPU vary by ±10%, and a self-draft that gains 15–20% was switched off
/// by noise when any shortfall counted.
const GUARD_MARGIN: f64 = 0.95;
/// Speculative steps measured before the throughput guard may switch speculation off.
const GUARD_MIN_STEPS: usize = 10;
/// Most steps between probes while speculation is off.
const MAX_PROBE_EVERY: usize = 64;
/// A plain step every this many speculative ones keeps the plain rate current.
const PLAIN_REFRESH: usize = 32;
/// Drafted tokens judged (accepted ones and first rejections) before the model may switch
/// speculation off.
const MIN_JUDGED: usize = 10;
/// Fewest tokens drafted once the model finds drafting pays (see [`AdaptiveK::choose_at`]).
/// With SmolLM2's 4-bit draft and suffix lookup on 2 cores, against the independent model's
/// own choice (mostly 2), the same greedy runs cost 2–6% less in plain steps on four prompt
/// sets, and measured 1.44× against 1.39× in five alternated pairs (an Emerald Rapids Xeon). On
/// a Zen 4, whose 4-row F16 passes cost up to 1.46 plain steps, it measured 1.33× against
/// 1.42× at temperature 0, yet 1.29–1.37× against 1.21–1.24× at 0.7 for a controller that
/// measured floored steps against unfloored ones and kept the faster: the two differ by a few
/// percent, less than such a measurement can tell apart (BENCHMARKS.md, session 57).
const MIN_DRAFT_RUN: usize = 3;
/// Acceptance assumed before any draft was judged.
const PRIOR_ALPHA: f64 = 0.6;

impl AdaptiveK {
    pub fn new(max_k: usize) -> Self {
        AdaptiveK {
            max_k,
            // The prior counts as two drafted tokens, so one bad first step does not decide.
            alpha: Decayed {
                num: 2.0 * PRIOR_ALPHA,
                den: 2.0,
                n: 1,
            },
            judged: 0,
            fixed_cost: None,
            plain_step: Decayed::default(),
            draft: Decayed::default(),
            growth: Decayed::default(),
            plain_rate: Decayed::default(),
            spec_rate: Decayed::default(),
            steps_off: 0,
            probe_every: 16,
            k: max_k.min(4),
            asked: 0,
            wanted: max_k.min(4),
            steps: 0,
            spec_streak: 0,
            catching_up: true,
            probing: false,
            gate_drafts: true,
            gate: GateState::default(),
            chain_bins: Vec::new(),
        }
    }

    /// A controller that takes the draft cost per token (relative to a verifier pass) as
    /// given, e.g. the draft's weight bytes over the verifier's, and never reads the clock.
    /// It starts drafting, as the clock-driven one does: until `MIN_JUDGED` drafted tokens
    /// were judged it does not switch off (starting off and probing every 32 steps left a
    /// good self-draft off for half of a 128-token generation).
    pub fn with_fixed_cost(max_k: usize, cost: f64) -> Self {
        AdaptiveK {
            fixed_cost: Some(cost),
            ..Self::new(max_k)
        }
    }

    /// A controller starting from what an earlier run of the session measured (`memory`, from
    /// [`Controller::memory`]), with `fresh`'s settings (`AdaptiveK::new` or
    /// `with_fixed_cost`). Per-run state starts afresh: the throughput guard measures this
    /// run's speculative steps before it may switch drafting off, and `MIN_JUDGED` of this
    /// run's drafts are judged before the acceptance may.
    pub fn resume(fresh: AdaptiveK, memory: &ControllerMemory) -> Self {
        let mut c = fresh;
        if let Some(a) = memory.alpha.ratio() {
            c.alpha = Decayed {
                num: a * RESUMED_ALPHA_WEIGHT,
                den: RESUMED_ALPHA_WEIGHT,
                n: 1,
            };
        }
        c.plain_step = memory.plain_step;
        c.draft = memory.draft;
        c.growth = memory.growth;
        c.plain_rate = memory.plain_rate;
        c.gate = memory.gate;
        c.wanted = c.choose();
        c.k = c.wanted;
        c
    }

    /// Expected tokens per unit of verifier time for draft length k.
    pub fn expected_speedup(alpha: f64, cost: f64, k: usize) -> f64 {
        let a = alpha.clamp(0.0, 0.999);
        (1.0 - a.powi(k as i32 + 1)) / ((1.0 - a) * (k as f64 * cost + 1.0))
    }

    fn alpha(&self) -> f64 {
        self.alpha.ratio().unwrap_or(PRIOR_ALPHA)
    }

    /// Cost of one more drafted token, as a share of a plain step: drafting it plus what it
    /// adds to the verification.
    fn cost(&self) -> f64 {
        if let Some(c) = self.fixed_cost {
            // Without the clock the model is all there is, and it does not see that verifying
            // k + 1 tokens costs more than a plain step: charge what BENCHMARKS.md measured.
            return c + VERIFY_GROWTH;
        }
        let Some(t0) = self.plain_step.ratio() else {
            return 0.1 + VERIFY_GROWTH;
        };
        let d = self.draft.ratio().unwrap_or(0.1 * t0);
        let g = self.growth.ratio().unwrap_or(VERIFY_GROWTH * t0).max(0.0);
        (d + g) / t0.max(1e-9)
    }

    /// The draft's own share of the cost (what the throughput guard ignores when tiny).
    fn draft_cost(&self) -> f64 {
        match (self.fixed_cost, self.plain_step.ratio(), self.draft.ratio()) {
            (Some(c), _, _) => c,
            (None, Some(t0), Some(d)) => d / t0.max(1e-9),
            _ => 0.1,
        }
    }

    fn choose(&self) -> usize {
        let (alpha, cost) = (self.alpha(), self.cost());
        if self.judged < MIN_JUDGED && !self.probing {
            // Too few drafts judged to give up on them (one early rejection would otherwise
            // switch a good drafter off, and probes after a gap see worse drafts).
            return self.choose_at(alpha, cost).max(1);
        }
        self.choose_at(alpha, cost)
    }

    fn choose_at(&self, alpha: f64, cost: f64) -> usize {
        // Ask for a clear gain before drafting at all when the cost is a guess.
        let first_margin = if self.fixed_cost.is_some() {
            1.10
        } else {
            1.02
        };
        let mut best = (1.0, 0);
        for k in 1..=self.max_k {
            let s = Self::expected_speedup(alpha, cost, k);
            let margin = if best.1 == 0 { first_margin } else { 1.02 };
            if s > best.0 * margin {
                best = (s, k);
            }
        }
        if best.1 == 0 {
            return 0;
        }
        // The model takes each drafted token as accepted independently, but acceptance comes
        // in runs (a draft that got the first tokens right tends to get the next ones too), so
        // it undervalues longer drafts: drafting at least `MIN_DRAFT_RUN` whenever drafting
        // pays at all measured faster on every prompt set (BENCHMARKS.md, session 56).
        best.1.max(MIN_DRAFT_RUN.min(self.max_k))
    }
}

impl Controller for AdaptiveK {
    fn next_k(&mut self) -> usize {
        self.steps += 1;
        self.chain_bins.clear();
        self.asked = self.next_k_inner();
        if self.asked > 0 && self.gating() {
            // The gate decides each step's length token by token, up to the limit.
            self.asked = self.max_k;
        }
        self.asked
    }

    fn memory(&self) -> Option<ControllerMemory> {
        Some(ControllerMemory {
            alpha: self.alpha,
            plain_step: self.plain_step,
            draft: self.draft,
            growth: self.growth,
            plain_rate: self.plain_rate,
            gate: self.gate,
        })
    }

    fn gate(&mut self, i: usize, evidence: DraftEvidence) -> Gate {
        if !self.gate_drafts || self.fixed_cost.is_some() {
            return Gate::Continue;
        }
        self.gate.asked = true;
        let (Some(t0), Some(draft)) = (self.plain_step.ratio(), self.draft.ratio()) else {
            return Gate::Continue;
        };
        if i == 0 {
            self.chain_bins.clear();
        }
        let bin = gate_bin(evidence);
        let rates = &self.gate.bins;
        let p: f64 = self
            .chain_bins
            .iter()
            .chain([&bin])
            .map(|&b| rates[b].rate())
            .product();
        let draft_step = match evidence {
            DraftEvidence::Lookup => 0.0,
            DraftEvidence::Model { .. } => draft / t0.max(1e-9),
        };
        let verdict = match self.gate_verdict(i, p, draft_step, t0) {
            // A step's first token is always verified: tokens the gate never lets through
            // are never judged, so a pessimistic bin could never learn otherwise (a C-ABI
            // engine's cheap toy model had every lookup token dropped). Whether to draft at
            // all stays the controller's choice of k.
            Gate::Drop if i == 0 => Gate::Stop,
            verdict => verdict,
        };
        if verdict != Gate::Drop {
            self.chain_bins.push(bin);
        }
        verdict
    }

    fn observe(&mut self, s: &StepReport) {
        let clock = self.fixed_cost.is_none();
        let secs = s.draft_secs + s.verify_secs;
        let catch_up = self.asked > 0 && std::mem::take(&mut self.catching_up);
        if clock && secs > 0.0 {
            // A pass is priced by the rows it scored (a tree's leaves too).
            if s.verified == 0 {
                self.plain_step.add(s.verify_secs, 1.0);
            } else if let Some(pass) = self.gate.pass.get_mut(s.verified) {
                pass.add(s.verify_secs, 1.0);
            }
            if self.asked == 0 {
                self.plain_rate.add((s.accepted + 1) as f64, secs);
            } else if !catch_up {
                self.spec_rate.add((s.accepted + 1) as f64, secs);
                self.spec_streak += 1;
                self.draft.add(s.draft_secs, s.drafted as f64);
                if let Some(t0) = self.plain_step.ratio() {
                    if s.verified > 0 {
                        self.growth.add(s.verify_secs - t0, s.verified as f64);
                    }
                }
            }
        }
        if self.asked == 0 {
            return; // a plain step says nothing about the drafts
        }
        // The gate's bins: the kept tokens up to the first rejection were judged.
        let judged = self.chain_bins.len().min(s.drafted);
        for (j, &bin) in self.chain_bins[..judged].iter().enumerate() {
            self.gate.bins[bin].add(j < s.accepted);
            if j > 0 {
                self.gate.run_on.add(j < s.accepted);
            }
            if j >= s.accepted {
                break;
            }
        }
        self.chain_bins.clear();
        if s.drafted > 0 {
            // Per-token acceptance: tokens after the first rejection were never judged, so
            // the trials are the accepted tokens plus the one rejection, if any (counting all
            // drafted tokens made one early rejection look like k of them).
            let rejected = usize::from(s.accepted < s.drafted);
            self.alpha
                .add(s.accepted as f64, (s.accepted + rejected) as f64);
            self.judged += s.accepted + rejected;
        }
        self.wanted = self.choose();
        if catch_up && self.wanted > 0 {
            self.k = self.wanted; // judge on the next step
            return;
        }
        let guarded = clock && self.draft_cost() >= GUARD_MIN_COST;
        let losing = match (self.spec_rate.ratio(), self.plain_rate.ratio()) {
            (Some(sp), Some(pl)) => {
                guarded && self.spec_streak >= GUARD_MIN_STEPS && sp < pl * GUARD_MARGIN
            }
            _ => false,
        };
        self.k = if losing { 0 } else { self.wanted };
        if self.k == 0 {
            self.spec_streak = 0;
            if std::mem::take(&mut self.probing) && guarded {
                // A failed probe of a costly drafter: wait longer before the next one
                // (probing an n-gram lookup costs one slightly longer verification, so it
                // keeps at 16).
                self.probe_every = (self.probe_every * 2).min(MAX_PROBE_EVERY);
            }
        } else if self.spec_streak >= GUARD_MIN_STEPS || !guarded {
            self.probing = false;
            self.probe_every = 16;
        }
    }
}

impl AdaptiveK {
    /// Whether steps are gated: a drafter asks, and the clock has measured a plain step and
    /// a drafted token.
    fn gating(&self) -> bool {
        self.gate_drafts
            && self.gate.asked
            && self.fixed_cost.is_none()
            && self.plain_step.ratio().is_some()
            && self.draft.ratio().is_some()
    }

    /// A verifier pass after `drafted` tokens, in plain steps (`t0` seconds each): measured
    /// where that count was seen often enough, else the longest measured count below it
    /// plus the measured growth per drafted token. The price of a pass is not linear in its
    /// rows: on a 2-core Zen 4 an F16 pass of 3 rows cost 1.09 plain steps and one of 4 rows
    /// 1.41 (BENCHMARKS.md, session 58), so only a table sees where a row gets dear.
    fn pass_cost(&self, drafted: usize, t0: f64) -> f64 {
        let t0 = t0.max(1e-9);
        let growth = self
            .growth
            .ratio()
            .map_or(VERIFY_GROWTH, |g| g / t0)
            .max(0.0);
        let measured = (1..=drafted.min(PASS_TABLE - 1)).rev().find_map(|d| {
            let p = &self.gate.pass[d];
            (p.n >= PASS_MIN_SEEN)
                .then(|| p.ratio())
                .flatten()
                .map(|secs| (d, secs / t0))
        });
        let (d, cost) = measured.unwrap_or((0, 1.0));
        cost + (drafted - d) as f64 * growth
    }

    /// Keep token `i` of the chain, whose whole chain so far is accepted with chance `p`, and
    /// draft more? Each choice is priced in plain steps at the measured speculative rate
    /// (tokens per plain step): keeping the token and drafting j more earns the expected
    /// accepted tokens (later ones at the measured acceptance after an accepted token) and
    /// costs the larger verifier pass and j draft steps. Drop when no j earns its cost; stop when j = 0 earns the most.
    fn gate_verdict(&self, i: usize, p: f64, draft_step: f64, t0: f64) -> Gate {
        let rate = self
            .spec_rate
            .ratio()
            .map_or(GATE_PRIOR_RATE, |r| r * t0)
            .clamp(1.0, 4.0);
        let later = self.gate.run_on.rate().min(0.95);
        let before = self.pass_cost(i, t0);
        let mut best = (f64::NEG_INFINITY, 0);
        let (mut tokens, mut chance) = (0.0, p);
        for j in 0..self.asked.saturating_sub(i).max(1) {
            tokens += chance;
            chance *= later;
            let cost = self.pass_cost(i + 1 + j, t0) - before + j as f64 * draft_step;
            let value = tokens - rate * cost;
            if value > best.0 {
                best = (value, j);
            }
        }
        match best {
            (v, _) if v <= 0.0 => Gate::Drop,
            (_, 0) => Gate::Stop,
            _ => Gate::Continue,
        }
    }

    fn next_k_inner(&mut self) -> usize {
        if self.fixed_cost.is_none() {
            // Measure plain decoding first, and now and then while speculating.
            let refresh = self.k > 0
                && self.draft_cost() >= GUARD_MIN_COST
                && self.steps.is_multiple_of(PLAIN_REFRESH);
            if self.plain_rate.n == 0 || refresh {
                return 0;
            }
        }
        if self.k == 0 {
            self.steps_off += 1;
            if self.steps_off >= self.probe_every {
                self.steps_off = 0;
                self.catching_up = true;
                self.probing = true;
                self.spec_streak = 0;
                // Probe for a few steps (the catch-up, then enough to measure), drafting
                // enough tokens per step to see the acceptance.
                self.k = self.wanted.max(self.max_k.min(4));
                return self.k;
            }
        }
        self.k
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
                    verified: 0,
                    accepted: 0,
                    draft_secs: 0.0,
                    verify_secs: 0.010,
                }
            } else {
                spec_steps += 1;
                StepReport {
                    drafted: k,
                    verified: k,
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

    /// A resumed controller drafts from its first step, with the k its memory's costs and
    /// acceptance call for, where a fresh one spends its first step measuring a plain pass;
    /// and it still switches a drafter off that stops paying in the new run.
    #[test]
    fn a_resumed_controller_drafts_at_once_and_still_adapts() {
        // Plain step 10 ms; a drafted token costs 2 ms of drafting and 0.5 ms of verification;
        // 80% of drafts accepted in runs of four.
        let step = |k: usize, accepted: usize| StepReport {
            drafted: k,
            verified: k,
            accepted: accepted.min(k),
            draft_secs: 0.002 * k as f64,
            verify_secs: 0.010 + 0.0005 * k as f64,
        };
        let mut first = AdaptiveK::new(8);
        assert_eq!(
            first.next_k(),
            0,
            "a fresh controller measures a plain step first"
        );
        first.observe(&step(0, 0));
        for i in 0..60 {
            let k = first.next_k();
            first.observe(&step(k, if i % 5 == 4 { 0 } else { 4 }));
        }
        let memory = first.memory().expect("AdaptiveK has a memory");
        let mut resumed = AdaptiveK::resume(AdaptiveK::new(8), &memory);
        let k = resumed.next_k();
        assert!(k >= 2, "a resumed controller drafts at once: k = {k}");
        assert_eq!(k, first.choose(), "from its memory's costs and acceptance");
        // Drafts that are never accepted in the new run switch it off.
        for _ in 0..40 {
            let k = resumed.next_k();
            resumed.observe(&step(k, 0));
        }
        assert_eq!(resumed.k, 0, "drafting that stopped paying is switched off");
    }

    /// Where drafting pays at all, at least `MIN_DRAFT_RUN` tokens are drafted (never more
    /// than `max_k`); where it does not, none.
    #[test]
    fn paying_drafts_run_at_least_min_draft_run() {
        let c = AdaptiveK::new(8);
        // 72% accepted, a drafted token at a third of a step: the independent model's best
        // is 2 (1.357 against 1.322 for 3).
        assert!(
            AdaptiveK::expected_speedup(0.72, 0.33, 2) > AdaptiveK::expected_speedup(0.72, 0.33, 3)
        );
        assert_eq!(c.choose_at(0.72, 0.33), MIN_DRAFT_RUN);
        assert_eq!(c.choose_at(0.2, 0.5), 0, "drafts that do not pay");
        assert_eq!(
            AdaptiveK::new(2).choose_at(0.72, 0.33),
            2,
            "capped by max_k"
        );
        assert!(
            c.choose_at(0.95, 0.05) > MIN_DRAFT_RUN,
            "the model's longer choice stands"
        );
    }

    /// A controller that has measured a 10 ms plain step, 2.5 ms per drafted token, and
    /// verifier passes of `pass_ms[d]` after d drafted tokens (each seen five times, the
    /// first `accept` share of each chain accepted), with a drafter that asks the gate.
    fn gated_controller(pass_ms: &[f64], accept: f64) -> AdaptiveK {
        let mut c = AdaptiveK::new(8);
        assert_eq!(c.next_k(), 0, "a plain step first");
        c.observe(&StepReport {
            drafted: 0,
            verified: 0,
            accepted: 0,
            draft_secs: 0.0,
            verify_secs: 0.010,
        });
        for _ in 0..5 {
            for (d, &ms) in pass_ms.iter().enumerate().skip(1) {
                c.next_k();
                for i in 0..d {
                    c.gate(i, DraftEvidence::Model { margin: 9.0 });
                }
                c.observe(&StepReport {
                    drafted: d,
                    verified: d,
                    accepted: (d as f64 * accept).round() as usize,
                    draft_secs: 0.0025 * d as f64,
                    verify_secs: ms / 1000.0,
                });
            }
        }
        assert!(c.gating(), "the drafter asked and the clock measured");
        c
    }

    /// The next speculative step's k, after any plain steps the controller asks for.
    fn next_speculative_k(c: &mut AdaptiveK) -> usize {
        loop {
            match c.next_k() {
                0 => c.observe(&StepReport {
                    drafted: 0,
                    verified: 0,
                    accepted: 0,
                    draft_secs: 0.0,
                    verify_secs: 0.010,
                }),
                k => return k,
            }
        }
    }

    /// The length a gated chain of tokens with these margins runs to.
    fn gated_length(c: &mut AdaptiveK, margins: &[f32]) -> usize {
        assert_eq!(
            next_speculative_k(c),
            c.max_k,
            "a gated step may run to max_k"
        );
        for (i, &margin) in margins.iter().enumerate() {
            match c.gate(i, DraftEvidence::Model { margin }) {
                Gate::Continue => {}
                Gate::Stop => return i + 1,
                Gate::Drop => return i,
            }
        }
        margins.len()
    }

    /// Drafts that are always accepted run long where each row costs little; at 90%
    /// acceptance a chain stops before the row where a pass gets dear (a Zen 4's F16
    /// verifier: 3 rows 1.09 plain steps, 4 rows 1.41) and runs longer where rows stay
    /// cheap.
    #[test]
    fn the_gate_stops_before_a_dear_row_and_runs_on_where_rows_are_cheap() {
        let sure = [9.0; 8];
        let cheap: Vec<f64> = (0..=8).map(|d| 10.0 + 0.65 * d as f64).collect();
        let dear = [10.0, 10.6, 10.9, 14.1, 14.5, 16.5, 18.5, 20.0, 20.7];
        let long = gated_length(&mut gated_controller(&cheap, 1.0), &sure);
        assert!(long >= 5, "cheap rows, every draft accepted: {long}");
        let on_cheap = gated_length(&mut gated_controller(&cheap, 0.9), &sure);
        let on_dear = gated_length(&mut gated_controller(&dear, 0.9), &sure);
        assert_eq!(on_dear, 2, "stops before the 4-row pass");
        assert!(on_cheap > on_dear, "cheap rows: {on_cheap}");
    }

    /// A token the draft is unsure of, after others it was unsure of, is not worth its row:
    /// dropped, and the chain ends.
    #[test]
    fn the_gate_drops_a_chain_that_is_unlikely_to_survive() {
        let cheap: Vec<f64> = (0..=8).map(|d| 10.0 + 0.65 * d as f64).collect();
        let mut c = gated_controller(&cheap, 1.0);
        let n = gated_length(&mut c, &[0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]);
        assert!(n <= 2, "unsure tokens: chain of {n}");
        let n = gated_length(&mut c, &[9.0, 9.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]);
        assert!((2..=4).contains(&n), "sure, then unsure: chain of {n}");
    }

    /// The bins learn what the verifier accepts: unsure tokens that keep being accepted
    /// earn their rows.
    #[test]
    fn the_gate_learns_each_margins_acceptance() {
        let cheap: Vec<f64> = (0..=8).map(|d| 10.0 + 0.65 * d as f64).collect();
        let mut c = gated_controller(&cheap, 1.0);
        let unsure = [0.1; 8];
        let before = gated_length(&mut c, &unsure);
        c.chain_bins.clear();
        for _ in 0..200 {
            let n = gated_length(&mut c, &unsure);
            c.observe(&StepReport {
                drafted: n,
                verified: n,
                accepted: n,
                draft_secs: 0.0025 * n as f64,
                verify_secs: (10.0 + 0.65 * n as f64) / 1000.0,
            });
        }
        let after = gated_length(&mut c, &unsure);
        assert!(c.gate.bins[0].rate() > 0.9, "{:?}", c.gate.bins[0]);
        assert!(after > before, "{before} -> {after}");
    }

    /// Without the clock (a rejection-sampled run's fixed cost) the gate never cuts a chain,
    /// so a seeded run's choices stay reproducible.
    #[test]
    fn the_gate_stays_open_without_the_clock() {
        let mut c = AdaptiveK::with_fixed_cost(8, 0.3);
        for i in 0..8 {
            assert_eq!(
                c.gate(i, DraftEvidence::Model { margin: 0.0 }),
                Gate::Continue
            );
        }
        assert!(!c.gating());
    }

    #[test]
    fn adaptive_k_turns_off_for_bad_drafts_and_grows_for_good_ones() {
        let mut c = AdaptiveK::new(8);
        for _ in 0..30 {
            let k = c.next_k().max(1);
            c.observe(&StepReport {
                drafted: k,
                verified: k,
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
                verified: k,
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
                verified: ka,
                accepted: acc,
                draft_secs: 0.001,
                verify_secs: 0.1,
            });
            b.observe(&StepReport {
                drafted: kb,
                verified: kb,
                accepted: acc,
                draft_secs: 5.0,
                verify_secs: 0.01,
            });
        }
    }
}
