//! Turning logits into a token: greedy, temperature, top-k, top-p; seeded and reproducible.
//!
//! `Sampler::distribution` exposes the exact distribution a token is drawn from, so
//! speculative rejection sampling can apply the same transform to draft and verifier.

use rand::{Rng, SeedableRng};

/// Sampling parameters out of range (the message names the parameter).
#[derive(Debug, Clone, PartialEq)]
pub struct InvalidParams(pub String);

impl std::fmt::Display for InvalidParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidParams {}

type Result<T> = std::result::Result<T, InvalidParams>;

/// How far `row[chosen]` lies above the largest other value (infinite when there is none,
/// or when `chosen` is outside the row).
pub fn logit_lead(row: &[f32], chosen: u32) -> f32 {
    lead_over_others(row, chosen).0
}

/// The largest value other than `row[chosen]` and where it is (the first of equals); `None`
/// when there is no other value above −∞ (NaN is never one).
pub fn largest_other(row: &[f32], chosen: u32) -> Option<(u32, f32)> {
    let (mut other, mut at) = (f32::NEG_INFINITY, None);
    for (i, &x) in row.iter().enumerate() {
        if i != chosen as usize && x > other {
            (other, at) = (x, Some(i as u32));
        }
    }
    at.map(|i| (i, other))
}

/// [`logit_lead`] and where that largest other value is ([`largest_other`]).
fn lead_over_others(row: &[f32], chosen: u32) -> (f32, Option<u32>) {
    let Some(&v) = row.get(chosen as usize) else {
        return (f32::INFINITY, None);
    };
    match largest_other(row, chosen) {
        Some((i, other)) => (v - other, Some(i)),
        None => (v - f32::NEG_INFINITY, None),
    }
}

/// A draft's token, how sure it is, and the token that came closest to it (see
/// [`argmax_with_lead`], [`Sampler::draw_with_lead`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LeadingDraw {
    pub token: u32,
    /// How far the token's value lies above the runner-up's, in logits (infinite when no
    /// other token could have been drawn).
    pub lead: f32,
    /// The best other token by the same values: the one the verifier most likely takes
    /// instead when it does not take `token` (a token tree's second candidate). `None` when
    /// no other token could have been drawn.
    pub runner_up: Option<u32>,
}

/// [`argmax`], [`logit_lead`] of it and the runner-up's index (the first of equals, never a
/// −∞ one) in one pass over `row`: a greedy draft's token, how sure it is, and its second
/// candidate, every draft step.
pub fn argmax_with_lead(row: &[f32]) -> LeadingDraw {
    let Some(&first) = row.first() else {
        return LeadingDraw {
            token: 0,
            lead: f32::INFINITY,
            runner_up: None,
        };
    };
    let (mut best, mut at) = (first, 0);
    let (mut second, mut second_at) = (f32::NEG_INFINITY, None);
    for (i, &v) in row.iter().enumerate().skip(1) {
        if v > best {
            (second, second_at) = (best, Some(at));
            (best, at) = (v, i);
        } else if v > second {
            (second, second_at) = (v, Some(i));
        }
    }
    LeadingDraw {
        token: at as u32,
        lead: best - second,
        // A token at −∞ (masked, or screened out) is no candidate.
        runner_up: second_at
            .filter(|_| second > f32::NEG_INFINITY)
            .map(|i| i as u32),
    }
}

/// Index of the largest value (the first on ties): greedy decoding's token.
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1.0 = off).
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(InvalidParams(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(InvalidParams(format!(
                "top-p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// The noise of plain temperature sampling's position-keyed draws ([`Sampler::sample_at`]
/// with neither top-k nor top-p): at sequence index `position`, the token that maximizes
/// `(l_i − max l) / T + gumbel(key(position), i)` among those within [`DrawNoise::SPREAD`]
/// of the best. Public so that an output head can tell, from bounds on each logit, which
/// tokens could be a row's draw and compute only theirs (`tandem_model`'s screened head).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DrawNoise {
    pub temperature: f32,
    pub seed: u64,
}

impl DrawNoise {
    /// How far (in units of log-probability) below the best token a token may lie and
    /// still draw noise: the noise is bounded (32-bit uniforms: G in [−3.131, 22.874]), so a
    /// token further below can never win. Rounded up.
    pub const SPREAD: f64 = 26.02;

    /// The most noise any token draws (G ≤ 22.874 from 32-bit uniforms), rounded up: a token
    /// whose value's upper end falls short of a reached value by more cannot be the draw.
    pub const MAX_NOISE: f64 = 22.875;

    /// The draws `params` make, when they are plain temperature sampling; `None` for greedy
    /// and for top-k / top-p (whose draws need every probability).
    pub fn of(params: &SamplingParams) -> Option<Self> {
        (params.temperature > 0.0 && params.top_k == 0 && params.top_p >= 1.0).then_some(
            DrawNoise {
                temperature: params.temperature,
                seed: params.seed,
            },
        )
    }

    /// The key of the draw at sequence index `position`.
    pub fn key(&self, position: usize) -> u64 {
        gumbel_key(self.seed, position)
    }

    /// Token `i`'s noise in the draw keyed `key`.
    pub fn noise(key: u64, i: usize) -> f64 {
        gumbel(key, i)
    }

    /// The gate that tells, from a token's noise bits, whether its noise can reach a level
    /// (its table looked up once, for loops over a vocabulary).
    pub fn gate() -> NoiseGate {
        NoiseGate(gate_table())
    }
}

/// Skips the noise of tokens that cannot reach a level ([`DrawNoise::gate`]).
#[derive(Clone, Copy)]
pub struct NoiseGate(&'static [u64; GATE_LEVELS]);

impl NoiseGate {
    /// Token `i`'s noise under `key` ([`DrawNoise::noise`]) when it may reach `level`;
    /// `None` only when it is below `level − 1e-9`, decided from its hash bits against
    /// [`gate_table`] without the two logarithms (most of a 49k vocabulary needs noise far
    /// above what it draws).
    #[inline]
    pub fn noise_reaching(&self, key: u64, i: usize, level: f64) -> Option<f64> {
        let bits = noise_bits(key, i);
        // The highest gate level at or below `level` (none below the base, or for NaN).
        if level > GATE_BASE {
            // (level − base) / step, as a multiply (the step is a power of two: exact).
            let m = (((level - GATE_BASE) * (1.0 / GATE_STEP)) as usize).min(GATE_LEVELS - 1);
            if bits < self.0[m] {
                return None;
            }
        }
        Some(gumbel_of_bits(bits))
    }
}

pub struct Sampler {
    pub params: SamplingParams,
    rng: rand::rngs::StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        Ok(Sampler {
            params,
            rng: rand::rngs::StdRng::seed_from_u64(params.seed),
        })
    }

    /// The probabilities a token is drawn from: softmax(logits / T), restricted to the top-k
    /// and then to the top-p nucleus, renormalized. Greedy gives a one-hot vector.
    pub fn distribution(&self, logits: &[f32]) -> Vec<f32> {
        let mut probs = vec![0f32; logits.len()];
        if logits.is_empty() {
            return probs;
        }
        if self.params.is_greedy() {
            probs[argmax(logits) as usize] = 1.0;
            return probs;
        }
        let t = self.params.temperature;
        let k = if self.params.top_k == 0 {
            logits.len()
        } else {
            self.params.top_k.min(logits.len())
        };
        if k == logits.len() && self.params.top_p >= 1.0 {
            // Plain temperature: no candidate is cut, so no order is needed. (Sorting the
            // 49k-token vocabulary took milliseconds per call, and speculative sampling calls
            // this for every drafted token and every verified row.)
            // The weights go straight into `probs` (a 49k-entry f64 buffer per call was the
            // only other allocation on this per-drafted-token path).
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut total = 0f64;
            for (p, &l) in probs.iter_mut().zip(logits) {
                let w = (((l - max) / t) as f64).exp();
                total += w;
                *p = w as f32;
            }
            for p in probs.iter_mut() {
                *p = (*p as f64 / total) as f32;
            }
            return probs;
        }
        // Candidate order: by logit, descending; ties by index for determinism.
        // A screened row (`tandem_model::HeadRows::TopK`) is −∞ but for a few hundred
        // tokens: with at least k others, the top k are among them (−∞ sorts last), and
        // selecting among those skips sorting the whole vocabulary's indices.
        let mut idx: Vec<usize> = if k < logits.len() {
            (0..logits.len())
                .filter(|&i| logits[i] != f32::NEG_INFINITY)
                .collect()
        } else {
            Vec::new()
        };
        if idx.len() < k {
            idx = (0..logits.len()).collect();
        }
        let cmp = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
        if k == logits.len() {
            // Top-p alone: the nucleus is usually a few dozen tokens of a 49k vocabulary, so
            // it is found among the best 64, 256, … candidates (selected in linear time, only
            // those sorted) instead of sorting the whole vocabulary (2–3 ms a token on
            // SmolLM2, most of a batched generation step).
            return self.nucleus(logits, &mut idx, cmp, probs);
        }
        if k < idx.len() {
            idx.select_nth_unstable_by(k - 1, cmp);
            idx.truncate(k);
        }
        idx.sort_unstable_by(cmp);
        let max = logits[idx[0]];
        let mut weights: Vec<f64> = idx
            .iter()
            .map(|&i| (((logits[i] - max) / t) as f64).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        if self.params.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = weights.len();
            for (j, w) in weights.iter().enumerate() {
                cum += w / total;
                if cum >= self.params.top_p as f64 {
                    keep = j + 1;
                    break;
                }
            }
            weights.truncate(keep);
        }
        let total: f64 = weights.iter().sum();
        for (j, w) in weights.iter().enumerate() {
            probs[idx[j]] = (w / total) as f32;
        }
        probs
    }

    /// [`Sampler::distribution`] for top-p without top-k: the same candidates in the same
    /// order as sorting everything, found by selecting ever more of the best.
    fn nucleus(
        &self,
        logits: &[f32],
        idx: &mut [usize],
        cmp: impl Fn(&usize, &usize) -> std::cmp::Ordering + Copy,
        mut probs: Vec<f32>,
    ) -> Vec<f32> {
        let n = logits.len();
        let t = self.params.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let weight = |i: usize| (((logits[i] - max) / t) as f64).exp();
        let total: f64 = (0..n).map(weight).sum();
        let mut m = n.min(64);
        loop {
            if m < n {
                idx.select_nth_unstable_by(m - 1, cmp);
            }
            let head = &mut idx[..m];
            head.sort_unstable_by(cmp);
            let mut cum = 0.0;
            let mut keep = None;
            for (j, &i) in head.iter().enumerate() {
                cum += weight(i) / total;
                if cum >= self.params.top_p as f64 {
                    keep = Some(j + 1);
                    break;
                }
            }
            if let Some(keep) = keep.or((m == n).then_some(n)) {
                let kept: f64 = head[..keep].iter().map(|&i| weight(i)).sum();
                for &i in &head[..keep] {
                    probs[i] = (weight(i) / kept) as f32;
                }
                return probs;
            }
            m = (m * 4).min(n);
        }
    }

    /// Draws one token from `logits` under the configured parameters.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let probs = self.distribution(logits);
        self.sample_from(&probs)
    }

    /// Draws an index from a probability vector (need not be exactly normalized).
    pub fn sample_from(&mut self, probs: &[f32]) -> u32 {
        let total: f64 = probs.iter().map(|&p| p as f64).sum();
        let mut r = self.rng.random::<f64>() * total;
        let mut last = 0;
        for (i, &p) in probs.iter().enumerate() {
            if p <= 0.0 {
                continue;
            }
            last = i;
            r -= p as f64;
            if r < 0.0 {
                return i as u32;
            }
        }
        last as u32
    }

    /// Draws the token at sequence index `position` as a pure function of the seed, the
    /// position and `logits`: the Gumbel-max trick, the candidate that maximizes
    /// ln p_i + G_i, where p is [`Sampler::distribution`] and G_i is Gumbel noise hashed from
    /// (seed, position, i). Each position's noise is independent of every other's, so a
    /// sequence drawn this way follows the model's distribution exactly as sequential draws
    /// do. What it adds: a speculative run that shares the noise between draft and verifier
    /// (`tandem_speculate::CoupledSampling`) emits the very tokens plain decoding with this
    /// seed emits, however many tokens were drafted (Daliri et al. 2024, "drafter-invariant
    /// speculative decoding"). Greedy is the argmax.
    pub fn sample_at(&self, logits: &[f32], position: usize) -> u32 {
        if self.params.is_greedy() || logits.is_empty() {
            return argmax(logits);
        }
        let key = gumbel_key(self.params.seed, position);
        // The noise is bounded, so a candidate whose log-probability lies more than the
        // spread below the best one's can never win and needs no noise: usually most of a
        // 49k vocabulary.
        const SPREAD: f64 = DrawNoise::SPREAD;
        let mut best = (f64::NEG_INFINITY, argmax(logits));
        if self.params.top_k == 0 && self.params.top_p >= 1.0 {
            // Plain temperature: ln p_i = (l_i − max) / T − ln Z, and the constant ln Z does
            // not move the argmax, so no softmax over the vocabulary is needed.
            let t = self.params.temperature as f64;
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let m = best.1 as usize;
            if max.is_finite() && logits[m] as f64 == max {
                // The same draw, found faster: start from the best token's value (lp = 0)
                // and skip, by its hash bits alone, every token whose noise cannot bring it
                // up to the best value so far (it could neither win nor tie). Ties go to the
                // lower index, as the loop below gives them.
                let gate = DrawNoise::gate();
                best.0 = gumbel(key, m);
                // Below this a logit is surely more than the spread under the best (a margin
                // for the division's rounding): skipped by one f32 comparison instead of an
                // f64 division (a screened row is −∞ but for a dozen tokens).
                let cut = (max - SPREAD * t - 1e-3 * (1.0 + max.abs())) as f32;
                for (i, &l) in logits.iter().enumerate() {
                    if l < cut {
                        continue;
                    }
                    let lp = (l as f64 - max) / t;
                    if lp >= -SPREAD {
                        if let Some(g) = gate.noise_reaching(key, i, best.0 - lp) {
                            let s = lp + g;
                            if s > best.0 || (s == best.0 && (i as u32) < best.1) {
                                best = (s, i as u32);
                            }
                        }
                    }
                }
                return best.1;
            }
            for (i, &l) in logits.iter().enumerate() {
                let lp = (l as f64 - max) / t;
                if lp >= -SPREAD {
                    let s = lp + gumbel(key, i);
                    if s > best.0 {
                        best = (s, i as u32);
                    }
                }
            }
            return best.1;
        }
        let probs = self.distribution(logits);
        let top = probs.iter().copied().fold(0f32, f32::max) as f64;
        let floor = top * (-SPREAD).exp();
        for (i, &p) in probs.iter().enumerate() {
            let p = p as f64;
            if p > 0.0 && p >= floor {
                let s = p.ln() + gumbel(key, i);
                if s > best.0 {
                    best = (s, i as u32);
                }
            }
        }
        best.1
    }

    /// [`Sampler::sample_at`]'s draw (the same token), its lead and its runner-up: how far
    /// its value (log-probability plus noise) lies above the best other token's, times the
    /// temperature, so in logit units, and which token that is; for greedy,
    /// [`argmax_with_lead`]. How sure a coupled draft is of its token: a verifier whose logits
    /// differ from the draft's by less than the lead draws the same token, and where it does
    /// not, the runner-up of the same noise is its likeliest other draw. The lead is infinite
    /// (and no runner-up) when no other token can be drawn; tokens too far below the best for
    /// any noise to lift them (see [`DrawNoise::SPREAD`]) are left out, as `sample_at` leaves
    /// them out, which can only matter for leads above the spread times the temperature.
    /// Plain temperature only (a draw from `logits` whatever the top-k / top-p, which
    /// coupled drafts never use, since the verifier's noise decides them alike); other
    /// parameters give the raw logit lead and the logits' best other token.
    pub fn draw_with_lead(&self, logits: &[f32], position: usize) -> LeadingDraw {
        if self.params.is_greedy() {
            return argmax_with_lead(logits);
        }
        let plain_temperature = self.params.top_k == 0 && self.params.top_p >= 1.0;
        let m = argmax(logits);
        let max = logits.get(m as usize).copied().unwrap_or(f32::NEG_INFINITY) as f64;
        if !plain_temperature || !max.is_finite() {
            let token = self.sample_at(logits, position);
            let (lead, runner_up) = lead_over_others(logits, token);
            return LeadingDraw {
                token,
                lead,
                runner_up,
            };
        }
        let t = self.params.temperature as f64;
        let key = gumbel_key(self.params.seed, position);
        let gate = DrawNoise::gate();
        // The best two values, each (value, token), found as `sample_at` finds the best: a
        // token whose noise cannot reach the runner-up so far needs no noise (it could be
        // neither).
        let mut best = (gumbel(key, m as usize), m);
        let mut second: (f64, Option<u32>) = (f64::NEG_INFINITY, None);
        let cut = (max - DrawNoise::SPREAD * t - 1e-3 * (1.0 + max.abs())) as f32;
        for (i, &l) in logits.iter().enumerate() {
            if l < cut || i == m as usize {
                continue;
            }
            let lp = (l as f64 - max) / t;
            if lp < -DrawNoise::SPREAD {
                continue;
            }
            if let Some(g) = gate.noise_reaching(key, i, second.0 - lp) {
                let s = lp + g;
                if s > best.0 || (s == best.0 && (i as u32) < best.1) {
                    second = (best.0, Some(best.1));
                    best = (s, i as u32);
                } else if s > second.0 {
                    second = (s, Some(i as u32));
                }
            }
        }
        LeadingDraw {
            token: best.1,
            lead: ((best.0 - second.0) * t) as f32,
            runner_up: second.1,
        }
    }

    /// A uniform draw in [0, 1) from the same seeded stream (for acceptance tests).
    pub fn uniform(&mut self) -> f64 {
        self.rng.random::<f64>()
    }
}

/// splitmix64's finalizer: a bijective mix of 64 bits.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The key of one position's noise under one seed.
fn gumbel_key(seed: u64, position: usize) -> u64 {
    mix64(mix64(seed ^ 0x5851_f42d_4c95_7f2d).wrapping_add(position as u64))
}

/// Standard Gumbel noise for candidate `i` under `key`: −ln(−ln u), u uniform in (0, 1) from
/// 32 hashed bits (a counter-based stream: any position's noise is computed without the ones
/// before it, which a sequential generator cannot do).
fn gumbel(key: u64, i: usize) -> f64 {
    gumbel_of_bits(noise_bits(key, i))
}

/// The 32 hashed bits candidate `i`'s uniform is made from under `key`.
#[inline]
fn noise_bits(key: u64, i: usize) -> u64 {
    mix64(key ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)) >> 32
}

/// −ln(−ln u) for u = (bits + 0.5) / 2³²: non-decreasing in `bits`.
#[inline]
fn gumbel_of_bits(bits: u64) -> f64 {
    let u = (bits as f64 + 0.5) * (1.0 / 4_294_967_296.0);
    -(-u.ln()).ln()
}

/// The gate's levels: `GATE_BASE + m · GATE_STEP` for m below `GATE_LEVELS`, from under the
/// least noise (−3.131) to over the most (22.874).
const GATE_BASE: f64 = -3.25;
const GATE_STEP: f64 = 0.125;
const GATE_LEVELS: usize = 216;

/// Per gate level m, the fewest hash bits whose noise reaches the level less 1e-9 (2³² where
/// none does): a candidate with fewer bits has noise below the level by more than 1e-9.
/// Found by bisection on [`gumbel_of_bits`] itself, so the table agrees with the noise as
/// computed, rounding and all.
fn gate_table() -> &'static [u64; GATE_LEVELS] {
    static TABLE: std::sync::OnceLock<[u64; GATE_LEVELS]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = [0u64; GATE_LEVELS];
        for (m, slot) in table.iter_mut().enumerate() {
            let level = GATE_BASE + m as f64 * GATE_STEP - 1e-9;
            // The least b in [0, 2³²] with gumbel_of_bits(b) ≥ level (2³²: none).
            let (mut lo, mut hi) = (0u64, 1u64 << 32);
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                if gumbel_of_bits(mid) >= level {
                    hi = mid;
                } else {
                    lo = mid + 1;
                }
            }
            *slot = lo;
        }
        table
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(temperature: f32, top_k: usize, top_p: f32) -> Sampler {
        Sampler::new(SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: 7,
        })
        .unwrap()
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = sampler(0.0, 0, 1.0);
        assert_eq!(s.sample(&[0.1, 3.0, 2.0]), 1);
        assert_eq!(s.distribution(&[0.1, 3.0, 2.0]), vec![0.0, 1.0, 0.0]);
    }

    #[test]
    fn temperature_top_k_top_p_shape_the_distribution() {
        let logits = [0.0f32, 1.0, 2.0, 3.0];
        let p = sampler(1.0, 0, 1.0).distribution(&logits);
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        for (a, l) in p.iter().zip(logits) {
            assert!((a - l.exp() / z).abs() < 1e-6);
        }
        let p = sampler(1.0, 2, 1.0).distribution(&logits);
        assert_eq!((p[0], p[1]), (0.0, 0.0));
        assert!((p[2] + p[3] - 1.0).abs() < 1e-6);
        // top-p 0.5: the top token alone has ~0.64 of the mass.
        let p = sampler(1.0, 0, 0.5).distribution(&logits);
        assert_eq!(p, vec![0.0, 0.0, 0.0, 1.0]);
    }

    /// The plain definition of top-p: sort every candidate, keep the shortest head whose
    /// mass reaches p, renormalize.
    fn nucleus_by_full_sort(logits: &[f32], t: f32, p: f32) -> Vec<f32> {
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        let max = logits[idx[0]];
        let w: Vec<f64> = idx
            .iter()
            .map(|&i| (((logits[i] - max) / t) as f64).exp())
            .collect();
        let total: f64 = w.iter().sum();
        let (mut cum, mut keep) = (0.0, w.len());
        for (j, x) in w.iter().enumerate() {
            cum += x / total;
            if cum >= p as f64 {
                keep = j + 1;
                break;
            }
        }
        let kept: f64 = w[..keep].iter().sum();
        let mut probs = vec![0f32; logits.len()];
        for j in 0..keep {
            probs[idx[j]] = (w[j] / kept) as f32;
        }
        probs
    }

    #[test]
    fn top_p_by_selection_matches_sorting_everything() {
        // Vocabulary-sized rows, peaked and flat (a flat one needs most of the vocabulary),
        // with ties.
        let mut state = 12345u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 24) as f32
        };
        for (spread, t, p) in [
            (12.0, 0.8, 0.95),
            (12.0, 1.0, 0.5),
            (0.5, 1.0, 0.9),
            (3.0, 0.7, 0.999),
        ] {
            let logits: Vec<f32> = (0..49152)
                .map(|i| {
                    if i % 97 == 0 {
                        2.0
                    } else {
                        (next() * spread).floor() / 4.0
                    }
                })
                .collect();
            let got = sampler(t, 0, p).distribution(&logits);
            let want = nucleus_by_full_sort(&logits, t, p);
            let kept = |v: &[f32]| v.iter().filter(|&&x| x > 0.0).count();
            assert_eq!(kept(&got), kept(&want), "spread {spread} p {p}");
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-6 * b.max(1e-3), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_follows_probs() {
        let logits = [0.0f32, 1.0, 2.0];
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams {
                temperature: 1.0,
                seed,
                ..Default::default()
            })
            .unwrap();
            (0..20000).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        let a = draw(3);
        assert_eq!(a, draw(3));
        let freq2 = a.iter().filter(|&&x| x == 2).count() as f32 / a.len() as f32;
        let want = 2f32.exp() / (1.0 + 1f32.exp() + 2f32.exp());
        assert!((freq2 - want).abs() < 0.02, "{freq2} vs {want}");
    }

    /// Position-keyed draws follow the distribution (plain temperature and top-p alike), and
    /// are a function of (seed, position, logits) alone.
    #[test]
    fn position_keyed_draws_follow_the_distribution() {
        let logits = [0.0f32, 1.0, 2.0, -1.0, 0.5];
        for (top_k, top_p) in [(0, 1.0), (0, 0.8), (3, 1.0)] {
            let s = sampler(0.8, top_k, top_p);
            let want = s.distribution(&logits);
            let n = 200_000;
            let mut counts = [0usize; 5];
            for pos in 0..n {
                counts[s.sample_at(&logits, pos) as usize] += 1;
            }
            let tv: f64 = counts
                .iter()
                .zip(&want)
                .map(|(&c, &w)| (c as f64 / n as f64 - w as f64).abs())
                .sum::<f64>()
                / 2.0;
            assert!(tv < 0.01, "top_k {top_k} top_p {top_p}: TV {tv}");
            // A rule that ignores the temperature (draws at T = 1) is told apart.
            if top_k == 0 && top_p == 1.0 {
                let hot = sampler(1.0, 0, 1.0).distribution(&logits);
                let off: f64 = hot
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs() as f64)
                    .sum();
                assert!(off / 2.0 > 0.03);
            }
        }
        let s = sampler(0.8, 0, 1.0);
        let again = sampler(0.8, 0, 1.0);
        assert!((0..1000).all(|p| s.sample_at(&logits, p) == again.sample_at(&logits, p)));
        assert_eq!(sampler(0.0, 0, 1.0).sample_at(&logits, 9), 2);
    }

    /// The draw as `sample_at` made it before the gate: noise for every token within the
    /// spread, the first index on ties.
    fn sample_at_every_noise(logits: &[f32], t: f32, seed: u64, position: usize) -> u32 {
        let key = gumbel_key(seed, position);
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut best = (f64::NEG_INFINITY, argmax(logits));
        for (i, &l) in logits.iter().enumerate() {
            let lp = (l as f64 - max) / t as f64;
            if lp >= -DrawNoise::SPREAD {
                let s = lp + gumbel(key, i);
                if s > best.0 {
                    best = (s, i as u32);
                }
            }
        }
        best.1
    }

    #[test]
    fn the_noise_lies_within_its_published_bounds() {
        // The noise is non-decreasing in its bits: the extremes are the first and last.
        let (least, most) = (gumbel_of_bits(0), gumbel_of_bits(u32::MAX as u64));
        assert!(most <= DrawNoise::MAX_NOISE && most > DrawNoise::MAX_NOISE - 2e-3);
        assert!(most - least <= DrawNoise::SPREAD);
    }

    /// `draw_with_lead` draws `sample_at`'s token, and its lead is the gap to the best other
    /// token's value with every token's noise computed, times the temperature.
    #[test]
    fn draws_with_lead_are_the_draws_and_their_gap() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for case in 0..200 {
            let n = 50 + case * 7;
            let spread = if case % 3 == 0 { 1.0 } else { 8.0 };
            let mut logits: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * spread).collect();
            if case % 5 == 0 {
                // A screened row: −∞ but for a few tokens.
                for (i, l) in logits.iter_mut().enumerate() {
                    if i % 9 != 0 {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
            let t = [0.3f32, 0.7, 1.0, 1.5][case % 4];
            let s = sampler(t, 0, 1.0);
            for position in [0usize, 5, 91] {
                let LeadingDraw {
                    token,
                    lead,
                    runner_up,
                } = s.draw_with_lead(&logits, position);
                assert_eq!(token, s.sample_at(&logits, position), "case {case}");
                let key = gumbel_key(7, position);
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let value = |i: usize| (logits[i] as f64 - max) / t as f64 + gumbel(key, i);
                let other = (0..n)
                    .filter(|&i| i != token as usize && logits[i].is_finite())
                    .map(value)
                    .fold(f64::NEG_INFINITY, f64::max);
                let want = (value(token as usize) - other) * t as f64;
                assert!(lead >= 0.0, "case {case}: lead {lead}");
                // Tokens more than the noise's spread below lose to the best whatever
                // their noise, so their gaps may be left uncomputed (as `sample_at` does).
                // Within reach, the runner-up is the token of that best other value.
                if want < DrawNoise::SPREAD * t as f64 - 1.0 {
                    let r = runner_up.expect("a second token within reach");
                    assert_ne!(r, token);
                    assert!(
                        (value(r as usize) - other).abs() < 1e-12,
                        "case {case}: runner-up {r}"
                    );
                    assert!(
                        (lead as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "case {case}: lead {lead} against {want}"
                    );
                }
            }
        }
        let greedy = sampler(0.0, 0, 1.0);
        let draw = |token, lead, runner_up| LeadingDraw {
            token,
            lead,
            runner_up,
        };
        assert_eq!(
            greedy.draw_with_lead(&[0.5, 2.0, 1.25], 4),
            draw(1, 0.75, Some(2))
        );
        assert_eq!(
            greedy.draw_with_lead(&[3.0], 4),
            draw(0, f32::INFINITY, None)
        );
        // Top-k or top-p: the draw, its raw logit lead, and the logits' best other token.
        let row = [0.5f32, 2.0, 1.25, f32::NEG_INFINITY];
        let top_k = sampler(0.7, 2, 1.0);
        let d = top_k.draw_with_lead(&row, 3);
        assert_eq!(d.token, top_k.sample_at(&row, 3));
        let other = if d.token == 1 { 2 } else { 1 };
        assert_eq!(
            d,
            draw(
                d.token,
                row[d.token as usize] - row[other],
                Some(other as u32)
            )
        );
        // Equal logits: the first is the token, the next the runner-up; −∞ is no runner-up.
        assert_eq!(argmax_with_lead(&[1.0, 4.0, 4.0]), draw(1, 0.0, Some(2)));
        assert_eq!(
            argmax_with_lead(&[f32::NEG_INFINITY, 2.0, f32::NEG_INFINITY]),
            draw(1, f32::INFINITY, None)
        );
        assert_eq!(logit_lead(&[1.0, 4.0, 4.0], 2), 0.0);
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for n in [1usize, 2, 3, 17, 300] {
            for _ in 0..20 {
                let mut row: Vec<f32> = (0..n)
                    .map(|_| (rng.random::<f32>() * 4.0).round())
                    .collect();
                if n > 2 {
                    row[1] = f32::NAN;
                }
                let t = argmax(&row);
                let d = argmax_with_lead(&row);
                assert_eq!((d.token, d.lead), (t, logit_lead(&row, t)), "{row:?}");
                if n > 1 {
                    let r = d.runner_up.expect("a finite second value") as usize;
                    assert_ne!(r, t as usize);
                    assert_eq!(row[t as usize] - row[r], d.lead, "{row:?}");
                }
            }
        }
        assert_eq!(argmax_with_lead(&[]), draw(0, f32::INFINITY, None));
    }

    #[test]
    fn gated_draws_are_the_draws_with_every_noise() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let table = gate_table();
        // The table's boundaries: the entry reaches its level, the one before it does not.
        for (m, &b) in table.iter().enumerate() {
            let level = GATE_BASE + m as f64 * GATE_STEP - 1e-9;
            if b < 1 << 32 {
                assert!(gumbel_of_bits(b) >= level);
            }
            if b > 0 {
                assert!(gumbel_of_bits(b - 1) < level);
            }
        }
        for (n, spread, t) in [
            (5000, 3.0f32, 0.7f32),
            (5000, 1.0, 1.0),
            (2000, 8.0, 0.3),
            (300, 0.2, 2.0),
            (49152, 4.0, 0.7),
        ] {
            let mut logits: Vec<f32> = (0..n).map(|_| rng.random_range(-spread..spread)).collect();
            // Ties: some tokens share the largest logit, some share others.
            logits[n / 3] = spread;
            logits[n / 2] = spread;
            logits[7] = logits[9];
            let s = Sampler::new(SamplingParams {
                temperature: t,
                seed: 5,
                ..Default::default()
            })
            .unwrap();
            let positions = if n > 10_000 { 0..40 } else { 0..400 };
            for pos in positions {
                assert_eq!(
                    s.sample_at(&logits, pos),
                    sample_at_every_noise(&logits, t, 5, pos),
                    "n {n}, T {t}, position {pos}"
                );
            }
        }
        // Rows the gate does not take (no finite maximum) still draw as before.
        let odd = [f32::NEG_INFINITY, f32::NAN, f32::NEG_INFINITY];
        let s = sampler(0.7, 0, 1.0);
        assert_eq!(s.sample_at(&odd, 3), sample_at_every_noise(&odd, 0.7, 7, 3));
    }

    #[test]
    fn bad_params_are_rejected() {
        assert!(Sampler::new(SamplingParams {
            temperature: -1.0,
            ..Default::default()
        })
        .is_err());
        assert!(Sampler::new(SamplingParams {
            top_p: 0.0,
            ..Default::default()
        })
        .is_err());
    }
}

/// Why a generation stopped: the one type plain and speculative generation both report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StopReason {
    /// An end-of-sequence (or stop) token was generated; it is not emitted.
    Eos,
    /// The token budget was spent.
    #[default]
    MaxTokens,
    /// The cache is full: the context limit was reached.
    ContextFull,
}

impl StopReason {
    /// The name machine-readable output uses: `eos`, `max-tokens`, `context-full`.
    pub fn name(self) -> &'static str {
        match self {
            StopReason::Eos => "eos",
            StopReason::MaxTokens => "max-tokens",
            StopReason::ContextFull => "context-full",
        }
    }
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
