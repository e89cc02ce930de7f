//! An exact output head for decoders that read one token per row: each row's largest logit
//! (greedy decoding), or the token a position-keyed sampled draw picks (plain temperature
//! sampling, `Sampler::sample_at`), without computing every logit.
//!
//! Greedy decoding (and greedy speculative verification) reads nothing of a row of logits but
//! its argmax, yet a 16-bit output head is about a fifth of every decode step of a small model
//! (SmolLM2-135M: 49152 × 576 F16 weights, 57 MB of the 270 MB a step reads). Here a Q8_0
//! copy of the head (34 bytes per 32 weights against 64) scores every token with a rigorous
//! bound on how far that score can be from the 16-bit logit; only the tokens whose upper
//! bound reaches the best lower bound can be the argmax, and only those rows of the 16-bit
//! head are multiplied, by the same kernel as the full head. Every other token's logit is
//! −∞, so argmax (first index on ties) is exactly the full head's: a token left out lies
//! strictly below a candidate. Why by hand: no crate does this; it is a decode-speed matter.
//!
//! The bound, for weight row `e` (16-bit), its Q8_0 copy `ŵ`, activations `h` and their
//! 8-bit rounding `ĥ` (what the int8 kernel multiplies), by Cauchy–Schwarz:
//! `|e·h − ŵ·ĥ| ≤ |e·(h − ĥ)| + |(e − ŵ)·ĥ| ≤ ‖e‖₂·‖h − ĥ‖₂ + ‖e − ŵ‖₂·‖ĥ‖₂`,
//! plus a margin for both kernels' f32 rounding (see [`FP_MARGIN`]). Euclidean norms, not
//! max-times-sum: SmolLM2's embedding rows have a few large dimensions, and max|e|·‖h − ĥ‖₁
//! was ~3× looser (5.4 logits against 1.8 for the first term; 232 candidates per row against
//! 29, and one row in eight over [`MAX_CANDIDATE_SHARE`]). On SmolLM2 the second term is
//! nearly 0 because its 16-bit embedding came from a Q8_0 file (its rows lie on the grid); a
//! head that does not would add about 1 logit (‖e − ŵ‖₂ ≈ 0.02 against ‖ĥ‖₂ ≈ 50), still tens
//! of candidates where the best token leads by a few logits. The unit tests use such a head.
//!
//! A sampled draw is the Gumbel-max trick: the token maximizing `(l_i − max l)/T + G_i`, with
//! bounded noise `G_i` that is a pure function of (seed, position, i). The same bounds then
//! give each token an interval for that value (the shift by the exact maximum is common to
//! all tokens, so any reference will do), and only tokens whose interval reaches the best
//! lower end can be the draw; the argmax's candidates are added so the row's maximum is the
//! exact one. The sampler, run on such a row, draws the very token it draws from the full
//! row (unit-tested against it), at the screen's cost instead of the 16-bit head's.

use crate::error::Result;
use crate::linear::Linear;
use half::f16;
use tandem_kernels::int8_gemm::Int8Rows;
use tandem_kernels::sampling::DrawNoise;
use tandem_kernels::{BlockFormat, Int8Tiles};

/// Relative margin for f32 rounding in the F16 and int8 kernels' sums: a sum of n terms in
/// f32 is within about n·2⁻²⁴ of the exact one relative to the sum of magnitudes (itself at
/// most the product of the two Euclidean norms), and these kernels add at most a few hundred
/// terms per lane before a short reduction; 2⁻¹² covers rows up to ~4000 terms per lane.
const FP_MARGIN: f64 = 1.0 / 4096.0;

/// Bytes of a Q8_0 block (32 weights). A Q4_0 screen (18 bytes) was tried: its rounding
/// error (‖e − ŵ‖₂ ≈ 0.35 on SmolLM2's rows) made every token a candidate.
const Q8_0_BYTES: usize = 34;

/// Above this share of the vocabulary as candidates, the full head is cheaper than screening
/// and rescoring (a row with no clear winner, or activations the bound cannot handle).
const MAX_CANDIDATE_SHARE: usize = 8;

/// What the screen saw: rows run, candidates rescored, rows that fell back to the full head.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GreedyHeadStats {
    pub rows: u64,
    pub candidates: u64,
    pub fallbacks: u64,
}

/// The Q8_0 screen of a 16-bit output head and each row's error bounds.
pub(super) struct GreedyHead {
    screen: Int8Tiles,
    /// Per vocabulary row: ‖e‖₂ of the 16-bit row (rounded up).
    row_norm: Vec<f32>,
    /// Per vocabulary row: ‖e − ŵ‖₂, the screen's rounding (rounded up).
    err_norm: Vec<f32>,
    /// The largest of each (the comparison's rounding margin).
    max_row_norm: f32,
    max_err_norm: f32,
    stats: std::sync::Mutex<GreedyHeadStats>,
}

/// Scratch the screen reuses between calls.
#[derive(Default)]
pub(super) struct GreedyScratch {
    scores: Vec<f32>,
    rounded: Int8Rows,
    picks: Picks,
    gathered: Vec<f16>,
    exact: Vec<f32>,
}

/// The candidates chosen so far (`union`, marked in `member`) and one row's working lists.
#[derive(Default)]
struct Picks {
    near: Vec<u32>,
    union: Vec<u32>,
    member: Vec<bool>,
    /// A sampled row's near tokens' noise.
    noise: Vec<f64>,
    /// A top-k row's scores or lower bounds, to select the k-th from.
    lows: Vec<f32>,
    /// A sampled row's tokens whose value's upper end, with the most noise, reaches the best
    /// value found so far.
    window: Vec<u32>,
}

/// What a row of the screened head must get right: its argmax, or also its position-keyed
/// draw under `DrawNoise` with the given key (one key per row), or its k largest logits (the
/// lower index first on ties), which are all a top-k distribution reads.
#[derive(Clone, Copy)]
pub(super) enum RowReads<'a> {
    Argmax,
    Draw(DrawNoise, &'a [u64]),
    TopK(usize),
}

/// [`RowReads`] for one row.
#[derive(Clone, Copy)]
enum RowRead {
    Argmax,
    Draw(DrawNoise, u64),
    TopK(usize),
}

impl GreedyHead {
    /// Where the Q8_0 screen sits in memory: (address, length).
    pub(super) fn screen_memory(&self) -> (usize, usize) {
        self.screen.memory()
    }

    /// A screen for `head` when it is a 16-bit CPU head without bias that tiles for the int8
    /// kernel (this CPU has one, the shape fits); `None` otherwise (the full head is used).
    pub(super) fn build(head: &Linear) -> Result<Option<Self>> {
        let (n, k) = (head.out_dim, head.in_dim);
        if head.bias.is_some() || !k.is_multiple_of(32) || n == 0 {
            return Ok(None);
        }
        let nb = k / 32;
        let mut bytes = vec![0u8; n * nb * Q8_0_BYTES];
        let mut row_norm = vec![0f32; n];
        let mut err_norm = vec![0f32; n];
        // Rounded on the kernels' threads, a stretch of rows each (SmolLM2's head: ~0.1 s on
        // one core, paid once, on the first greedy call).
        let threads = tandem_kernels::pool::current().threads_now().max(1);
        let per = n.div_ceil(threads);
        let rounded = head.with_cpu_f16(|w| {
            Ok(std::thread::scope(|sc| {
                let jobs: Vec<_> = w
                    .chunks(per * k)
                    .zip(bytes.chunks_mut(per * nb * Q8_0_BYTES))
                    .zip(row_norm.chunks_mut(per).zip(err_norm.chunks_mut(per)))
                    .map(|((w, b), (rn, en))| sc.spawn(move || round_rows(w, k, b, rn, en)))
                    .collect();
                jobs.into_iter().all(|j| j.join().unwrap_or(false))
            }))
        })?;
        if rounded != Some(true) {
            return Ok(None);
        }
        let Some(screen) = Int8Tiles::pack(BlockFormat::Q8_0, &bytes, n, k) else {
            return Ok(None);
        };
        let largest = |v: &[f32]| v.iter().fold(0f32, |a, &x| a.max(x));
        Ok(Some(GreedyHead {
            screen,
            max_row_norm: largest(&row_norm),
            max_err_norm: largest(&err_norm),
            row_norm,
            err_norm,
            stats: Default::default(),
        }))
    }

    pub(super) fn stats(&self) -> GreedyHeadStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fills `logits` ([rows, vocab]) for the normalized head inputs `hn` ([rows, k]): every
    /// token that can be its row's argmax (and, for `RowReads::Draw`, its row's draw) gets
    /// its exact logit from `head` (the full head's value bit for bit), every other one −∞.
    /// Falls back to the full head where screening would not pay or cannot bound
    /// (non-finite activations).
    pub(super) fn logits(
        &self,
        head: &Linear,
        hn: &[f32],
        rows: usize,
        reads: RowReads<'_>,
        s: &mut GreedyScratch,
        logits: &mut [f32],
    ) -> Result<()> {
        let (n, k) = (head.out_dim, head.in_dim);
        let full = |logits: &mut [f32]| head.forward_into(hn, rows, logits);
        let keys_fit = match reads {
            RowReads::Argmax => true,
            RowReads::Draw(_, keys) => keys.len() == rows,
            RowReads::TopK(k) => k > 0,
        };
        if hn.len() != rows * k
            || logits.len() != rows * n
            || !keys_fit
            || hn.iter().any(|v| !v.is_finite())
        {
            self.count(rows, 0, rows);
            return full(logits);
        }
        // Rounded once: the screen multiplies these levels and the bound reads them.
        s.rounded.quantize(hn, k);
        s.scores.resize(rows * n, 0.0);
        self.screen.matmul_rounded(&s.rounded, rows, &mut s.scores);
        s.picks.member.clear();
        s.picks.member.resize(n, false);
        s.picks.union.clear();
        for (i, (h, scores)) in hn.chunks_exact(k).zip(s.scores.chunks_exact(n)).enumerate() {
            let (alpha, beta) = norms(h, &s.rounded, i, k);
            let read = match reads {
                RowReads::Argmax => RowRead::Argmax,
                RowReads::Draw(noise, keys) => RowRead::Draw(noise, keys[i]),
                RowReads::TopK(k) => RowRead::TopK(k),
            };
            self.candidates(scores, alpha, beta, read, &mut s.picks);
            if s.picks.union.len() * MAX_CANDIDATE_SHARE > n {
                self.count(rows, 0, rows);
                return full(logits);
            }
        }
        s.picks.union.sort_unstable();
        let u = s.picks.union.len();
        s.gathered.clear();
        let gathered = head.with_cpu_f16(|w| {
            for &j in &s.picks.union {
                s.gathered.extend_from_slice(&w[j as usize * k..][..k]);
            }
            Ok(())
        })?;
        if gathered.is_none() {
            self.count(rows, 0, rows);
            return full(logits);
        }
        s.exact.resize(rows * u, 0.0);
        tandem_kernels::matmul_f16(hn, &s.gathered, rows, k, u, &mut s.exact);
        logits.fill(f32::NEG_INFINITY);
        for (row, exact) in logits.chunks_exact_mut(n).zip(s.exact.chunks_exact(u)) {
            for (&j, &v) in s.picks.union.iter().zip(exact) {
                row[j as usize] = v;
            }
        }
        self.count(rows, u * rows, 0);
        Ok(())
    }

    /// Adds to `union` (and marks in `member`) the tokens whose upper bound reaches the best
    /// lower bound in one row of screen `scores`, in three steps so that only two simple
    /// passes touch the whole row (a direct scan of the bounds took 50–90 µs a row, a tenth
    /// of the screen's matmul): the largest score `top`; the tokens within two of the largest
    /// bound `max_b` of it, a superset of the candidates (the best lower bound is at least
    /// `top − max_b`, and a candidate's score is at least that minus `max_b`); then the exact
    /// test on those few. All in f32: the bound's factors are widened by 2⁻¹⁸ to cover its
    /// three roundings, and the comparisons by 2⁻¹⁸ of the largest magnitude involved to
    /// cover the additions'.
    ///
    /// `read`: for a sampled draw, the tokens that can be the draw are added too (see
    /// [`GreedyHead::draw_candidates`]); for top-k, those that can be among the k largest
    /// ([`top_k_candidates`]).
    fn candidates(&self, scores: &[f32], alpha: f64, beta: f64, read: RowRead, picks: &mut Picks) {
        let Picks {
            near,
            member,
            union,
            noise,
            lows,
            window: reachable,
        } = picks;
        const LANES: usize = 8;
        let widen = 1.0 + 1.0 / f64::from(1u32 << 18);
        let (a, b) = ((alpha * widen) as f32, (beta * widen) as f32);
        let bound = |j: usize| self.row_norm[j] * a + self.err_norm[j] * b;
        let max_b = self.max_row_norm * a + self.max_err_norm * b;
        let split = scores.len() / LANES * LANES;
        let mut lanes = [f32::NEG_INFINITY; LANES];
        for c in scores[..split].chunks_exact(LANES) {
            for l in 0..LANES {
                lanes[l] = if c[l] > lanes[l] { c[l] } else { lanes[l] };
            }
        }
        let top = scores[split..]
            .iter()
            .chain(&lanes)
            .fold(f32::NEG_INFINITY, |x, &y| x.max(y));
        // Every value the tests below add or compare is at most `mag` in magnitude.
        let mag = top.abs() + 4.0 * max_b;
        let slack = mag / (1u32 << 18) as f32;
        let floor = top - 2.0 * max_b - 2.0 * slack;
        near.clear();
        for (ci, c) in scores[..split].chunks_exact(LANES).enumerate() {
            let mut any = false;
            for &v in c {
                any |= v >= floor;
            }
            if any {
                for (l, &v) in c.iter().enumerate() {
                    if v >= floor {
                        near.push((ci * LANES + l) as u32);
                    }
                }
            }
        }
        near.extend(
            (split..scores.len())
                .filter(|&j| scores[j] >= floor)
                .map(|j| j as u32),
        );
        let best_low = near
            .iter()
            .map(|&j| scores[j as usize] - bound(j as usize))
            .fold(f32::NEG_INFINITY, f32::max);
        let threshold = best_low - slack;
        for &j in near.iter() {
            let j = j as usize;
            if scores[j] + bound(j) >= threshold && !member[j] {
                member[j] = true;
                union.push(j as u32);
            }
        }
        let window = Window {
            top,
            max_b,
            best_low,
            slack,
            a,
            b,
        };
        match read {
            RowRead::Argmax => {}
            RowRead::Draw(params, key) => self.draw_candidates(
                scores, &bound, window, params, key, near, reachable, noise, member, union,
            ),
            RowRead::TopK(k) => {
                top_k_candidates(scores, &bound, window, k, near, lows, member, union)
            }
        }
    }

    /// Adds the tokens that can be a sampled row's draw: the token maximizing
    /// `v_i = (l_i − M)/T + G_i` over those with `(l_i − M)/T ≥ −SPREAD`, where M is the
    /// row's exact largest logit (`Sampler::sample_at`). With `l_i` within `bound(i)` of
    /// score `s_i` and M in [best_low, top + max_b]:
    /// - a token can pass the spread test only if `s_i + bound(i) ≥ best_low − T·SPREAD`,
    ///   so only scores above `top − 2·max_b − T·SPREAD` are looked at (and get noise);
    /// - a token surely passes it if `s_i − bound(i) − (top + max_b) ≥ −T·SPREAD`; the best
    ///   lower end `L` of `v` over those is a value the draw reaches;
    /// - a token can be the draw only if its upper end reaches `L`: so only if it does with
    ///   the most noise any token draws (a test on the bounds alone, in one pass over the row
    ///   that vectorizes: on SmolLM2's chat answers at T = 0.7 it leaves about half of the
    ///   ~40k tokens within the spread), and a token whose own noise cannot lift it there is
    ///   skipped by its hash bits, without the noise's logarithms
    ///   ([`tandem_kernels::sampling::NoiseGate`]).
    ///
    /// The values are taken relative to `top` instead of M (the same shift for every token,
    /// so the same order); margins cover f32 rounding of the bounds (`slack`) and the
    /// sampler's f64 rounding (`EPS`).
    #[allow(clippy::too_many_arguments)]
    fn draw_candidates(
        &self,
        scores: &[f32],
        bound: &impl Fn(usize) -> f32,
        w: Window,
        params: DrawNoise,
        key: u64,
        near: &mut Vec<u32>,
        reachable: &mut Vec<u32>,
        noise: &mut Vec<f64>,
        member: &mut [bool],
        union: &mut Vec<u32>,
    ) {
        const EPS: f64 = 1e-9;
        let t = f64::from(params.temperature);
        let inv_t = 1.0 / t;
        let spread = DrawNoise::SPREAD * t;
        let (top, max_b, slack) = (f64::from(w.top), f64::from(w.max_b), f64::from(w.slack));
        let m_hi = top + max_b + slack;
        let floor = f64::from(w.best_low) - slack - spread - max_b - slack - EPS;
        // A token's value's lower end, when it surely passes the spread test.
        let sure_low = |j: usize, g: f64| {
            let low = f64::from(scores[j]) - f64::from(bound(j)) - slack;
            (low - m_hi >= -spread + EPS).then_some((low - top) * inv_t + g)
        };
        let high = |j: usize| (f64::from(scores[j]) + f64::from(bound(j)) + slack - top) * inv_t;
        // A first `best` from the argmax's near tokens (`near` holds them on entry), then
        // every token in the window whose noise may lift its upper end to `best`: the rest
        // are skipped by their noise's hash bits, without its logarithms.
        let mut best = f64::NEG_INFINITY;
        for &j in near.iter() {
            let j = j as usize;
            if let Some(v) = sure_low(j, DrawNoise::noise(key, j)) {
                best = best.max(v);
            }
        }
        // `high(j) + MAX_NOISE ≥ best − EPS`, as a floor under `s_j + bound(j)` (`best` only
        // grows below, so the first one holds throughout); none while no value is reached.
        let reach_floor = if best.is_finite() {
            top - slack + t * (best - EPS - DrawNoise::MAX_NOISE)
        } else {
            f64::NEG_INFINITY
        };
        // Both rounded down a little (and by the slack for the f32 sum `s_j + bound(j)`), so
        // that the f32 comparisons keep every token the f64 ones do.
        let floor = (floor - 1e-3) as f32;
        let reach_floor = (reach_floor - slack - 1e-3) as f32;
        let (n, (wa, wb)) = (scores.len(), (w.a, w.b));
        let keeps = |v: f32, row_norm: f32, err_norm: f32| {
            (v >= floor) & (v + (row_norm * wa + err_norm * wb) >= reach_floor)
        };
        // Branch-free: every index is written, and the length advances past the kept ones
        // (about half of the window: a branch per token mispredicts). The buffer keeps its
        // length from row to row (grown once, not zeroed per row); `kept` says what is valid.
        if reachable.len() < n {
            reachable.resize(n, 0);
        }
        let mut kept = 0;
        for (j, ((&v, &r), &e)) in scores
            .iter()
            .zip(&self.row_norm[..n])
            .zip(&self.err_norm[..n])
            .enumerate()
        {
            reachable[kept] = j as u32;
            kept += usize::from(keeps(v, r, e));
        }
        near.clear();
        noise.clear();
        let gate = DrawNoise::gate();
        for &j in &reachable[..kept] {
            let j = j as usize;
            if let Some(g) = gate.noise_reaching(key, j, best - high(j) - EPS) {
                near.push(j as u32);
                noise.push(g);
                if let Some(v) = sure_low(j, g) {
                    best = best.max(v);
                }
            }
        }
        let reach = best - EPS;
        for (&j, &g) in near.iter().zip(noise.iter()) {
            let j = j as usize;
            if high(j) + g >= reach && !member[j] {
                member[j] = true;
                union.push(j as u32);
            }
        }
    }

    fn count(&self, rows: usize, candidates: usize, fallbacks: usize) {
        let mut st = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        st.rows += rows as u64;
        st.candidates += candidates as u64;
        st.fallbacks += fallbacks as u64;
    }
}

/// Adds the tokens that can be among a row's `k` largest logits: those whose upper bound
/// reaches the k-th largest lower bound. The k largest scores all have lower bounds of at
/// least `s_k − max_b` (`s_k` the k-th largest score), so that bound is at least it, and a
/// candidate's score is at least `s_k − 2·max_b`: the tokens are looked for in ever wider
/// windows below the top until one holds k scores and reaches that far, and the k-th largest
/// lower bound is taken among them (a token outside has a lower bound below `s_k − max_b`).
/// With ties at the k-th place every tied token is a candidate, so the lower index's is
/// exact too.
#[allow(clippy::too_many_arguments)]
fn top_k_candidates(
    scores: &[f32],
    bound: &impl Fn(usize) -> f32,
    w: Window,
    k: usize,
    near: &mut Vec<u32>,
    lows: &mut Vec<f32>,
    member: &mut [bool],
    union: &mut Vec<u32>,
) {
    let k = k.min(scores.len());
    let mut width = 4.0 * w.max_b + 1.0;
    loop {
        let floor = w.top - width;
        near.clear();
        near.extend(
            (0..scores.len())
                .filter(|&j| scores[j] >= floor)
                .map(|j| j as u32),
        );
        // The tokens this window must hold reach `s_k − 2·max_b`, less the rounding margin.
        let reaches = if near.len() >= k {
            lows.clear();
            lows.extend(near.iter().map(|&j| scores[j as usize]));
            let (_, s_k, _) = lows.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
            let slack = (w.top.abs() + width + 4.0 * w.max_b) / (1u32 << 18) as f32;
            *s_k - 2.0 * w.max_b - 4.0 * slack >= floor
        } else {
            false
        };
        if reaches || !floor.is_finite() || near.len() == scores.len() {
            break;
        }
        width *= 4.0;
    }
    lows.clear();
    lows.extend(near.iter().map(|&j| scores[j as usize] - bound(j as usize)));
    let kk = k.min(lows.len()).max(1);
    let (_, low_k, _) = lows.select_nth_unstable_by(kk - 1, |a, b| b.total_cmp(a));
    // The additions' rounding, as `candidates` allows it, over the wider window's magnitudes.
    let slack = w
        .slack
        .max((w.top.abs() + width + 4.0 * w.max_b) / (1u32 << 18) as f32);
    let threshold = *low_k - slack;
    for &j in near.iter() {
        let j = j as usize;
        if scores[j] + bound(j) >= threshold && !member[j] {
            member[j] = true;
            union.push(j as u32);
        }
    }
}

/// A screened row's summary from [`GreedyHead::candidates`]: its largest score, the largest
/// bound, the best lower bound on a logit, the f32 rounding margin and the bound's factors.
#[derive(Clone, Copy)]
struct Window {
    top: f32,
    max_b: f32,
    best_low: f32,
    slack: f32,
    /// The bound's factors: token j's bound is `row_norm[j]·a + err_norm[j]·b`.
    a: f32,
    b: f32,
}

/// The bound's two factors for activation row `i` (`h`, length k): `alpha` multiplies a
/// token's ‖e‖₂, `beta` its ‖e − ŵ‖₂, each with the f32 margin.
fn norms(h: &[f32], rounded: &Int8Rows, i: usize, k: usize) -> (f64, f64) {
    let (mut h2, mut d2, mut x2) = (0f64, 0f64, 0f64);
    let q = &rounded.quants[i * k..][..k];
    let d = &rounded.scales[i * k / 32..][..k / 32];
    for (b, (hb, qb)) in h.chunks_exact(32).zip(q.chunks_exact(32)).enumerate() {
        let scale = f64::from(d[b]);
        for (&x, &l) in hb.iter().zip(qb) {
            let xr = scale * f64::from(l);
            h2 += xr * xr;
            d2 += (f64::from(x) - xr).powi(2);
            x2 += f64::from(x).powi(2);
        }
    }
    let (h2, d2, x2) = (h2.sqrt(), d2.sqrt(), x2.sqrt());
    // f32 rounding: of the F16 kernel's sum (its terms' magnitudes add up to at most
    // ‖e‖₂·‖h‖₂) and of the int8 kernel's (at most (‖e‖₂ + ‖e − ŵ‖₂)·‖ĥ‖₂).
    let alpha = d2 + FP_MARGIN * (x2 + h2);
    let beta = h2 * (1.0 + FP_MARGIN);
    (alpha * (1.0 + FP_MARGIN), beta)
}

/// Rounds rows `w` (length k) to Q8_0 blocks in `bytes`, with each row's ‖e‖₂ and rounding
/// error ‖e − ŵ‖₂ (both rounded up); false when a weight is not finite (no bound holds: no
/// screen).
fn round_rows(
    w: &[f16],
    k: usize,
    bytes: &mut [u8],
    row_norm: &mut [f32],
    err_norm: &mut [f32],
) -> bool {
    let nb = k / 32;
    let mut vals = [0f32; 32];
    let up = |x: f64| (x * (1.0 + 1e-6)) as f32 + f32::MIN_POSITIVE;
    for (r, row) in w.chunks_exact(k).enumerate() {
        let (mut norm, mut err) = (0f64, 0f64);
        for (b, blk) in row.chunks_exact(32).enumerate() {
            // The slice conversion uses F16C where the CPU has it (per-value `to_f32` does not).
            half::slice::HalfFloatSliceExt::convert_to_f32_slice(blk, &mut vals);
            if vals.iter().any(|v| !v.is_finite()) {
                return false;
            }
            err += round_q8_0(&vals, &mut bytes[(r * nb + b) * Q8_0_BYTES..][..Q8_0_BYTES]);
            norm += vals.iter().map(|&v| f64::from(v * v)).sum::<f64>();
        }
        row_norm[r] = up(norm.sqrt());
        err_norm[r] = up(err.sqrt());
    }
    true
}

/// Rounds 32 weights to one Q8_0 block (`d = max|x|/127` as f16, `q = round(x/d)`) into
/// `out` (34 bytes) and returns Σ(x − d·q)², exactly (in f64). Any rounding would do (the
/// bound measures it); this one is GGML's.
fn round_q8_0(x: &[f32; 32], out: &mut [u8]) -> f64 {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = f16::from_f32(amax / 127.0);
    let df = d.to_f32();
    out[..2].copy_from_slice(&d.to_le_bytes());
    let id = if df > 0.0 { 1.0 / df } else { 0.0 };
    let mut err = 0f64;
    for (o, &v) in out[2..].iter_mut().zip(x) {
        // Halves away from zero by truncating x/d ± 0.5 (`f32::round` is a libm call per
        // weight on baseline x86-64: 240 ms for SmolLM2's head against ~30).
        let r = v * id;
        let q = ((r + 0.5f32.copysign(r)) as i32).clamp(-127, 127);
        *o = (q as i8) as u8;
        let e = f64::from(v) - f64::from(df) * f64::from(q);
        err += e * e;
    }
    err
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn head(n: usize, k: usize, seed: u64) -> Linear {
        let mut x = seed;
        let vals: Vec<f16> = (0..n * k)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                f16::from_f32(((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2)
            })
            .collect();
        let t = Tensor::from_vec(vals, (n, k), &Device::Cpu).unwrap();
        Linear::from_f16_tensor(t)
    }

    fn inputs(rows: usize, k: usize, seed: u64, outlier: f32) -> Vec<f32> {
        let mut x = seed;
        (0..rows * k)
            .map(|i| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let v = ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0;
                if i % 97 == 5 {
                    v * outlier
                } else {
                    v
                }
            })
            .collect()
    }

    /// The screen's rows for `x` ([rows, k]) under `reads`.
    fn screened(g: &GreedyHead, h: &Linear, x: &[f32], rows: usize, reads: RowReads) -> Vec<f32> {
        let mut got = vec![0f32; rows * h.out_dim];
        g.logits(h, x, rows, reads, &mut GreedyScratch::default(), &mut got)
            .unwrap();
        got
    }

    #[test]
    fn argmax_and_candidate_logits_match_the_full_head() {
        let (n, k) = (2048, 96);
        for (seed, rows, outlier, n, k) in [
            (1, 1, 1.0, n, k),
            (2, 4, 30.0, n, k),
            (3, 7, 3.0, n, k),
            (4, 5, 10.0, 4096, 576),
        ] {
            let h = head(n, k, seed);
            let g = GreedyHead::build(&h).unwrap().expect("a screen");
            let x = inputs(rows, k, seed + 10, outlier);
            let mut full = vec![0f32; rows * n];
            h.forward_into(&x, rows, &mut full).unwrap();
            let got = screened(&g, &h, &x, rows, RowReads::Argmax);
            for (a, b) in full.chunks_exact(n).zip(got.chunks_exact(n)) {
                assert_eq!(
                    tandem_kernels::sampling::argmax(a),
                    tandem_kernels::sampling::argmax(b)
                );
                for (fa, gb) in a.iter().zip(b) {
                    assert!(*gb == f32::NEG_INFINITY || fa.to_bits() == gb.to_bits());
                }
            }
            let st = g.stats();
            assert_eq!(st.rows, rows as u64);
            assert_eq!(st.fallbacks, 0, "seed {seed}: {st:?}");
            assert!(st.candidates < (rows * n / MAX_CANDIDATE_SHARE) as u64);
        }
    }

    /// A head of `vals` ([n, k]) with rows 7 and 40 set to the same large values (a tie
    /// for the largest logit at an all-ones input).
    fn with_tied_rows(mut vals: Vec<f16>, k: usize) -> Linear {
        let n = vals.len() / k;
        for j in [7usize, 40] {
            vals[j * k..][..k].fill(f16::from_f32(0.5));
        }
        Linear::from_f16_tensor(Tensor::from_vec(vals, (n, k), &Device::Cpu).unwrap())
    }

    #[test]
    fn ties_resolve_to_the_first_index_as_the_full_head() {
        // Two identical rows: equal logits; argmax must be the lower index.
        let (n, k) = (64, 32);
        let h = with_tied_rows(vec![f16::from_f32(0.0); n * k], k);
        let g = GreedyHead::build(&h).unwrap().expect("a screen");
        let x = vec![1f32; k];
        let got = screened(&g, &h, &x, 1, RowReads::Argmax);
        assert_eq!(tandem_kernels::sampling::argmax(&got), 7);
    }

    /// Weights on the Q8_0 grid (as SmolLM2's embedding, which came from a Q8_0 file): the
    /// screen's own rounding is then nil and only the activations' counts in the bound.
    fn grid_head(n: usize, k: usize, seed: u64, scale: f32) -> Linear {
        let mut x = seed;
        let mut vals = Vec::with_capacity(n * k);
        for _ in 0..n * k / 32 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let d = f16::from_f32(scale * (0.5 + (x >> 44) as f32 / (1u64 << 20) as f32) / 127.0);
            for _ in 0..32 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let q = ((x >> 33) % 255) as i32 - 127;
                vals.push(f16::from_f32(d.to_f32() * q as f32));
            }
        }
        let t = Tensor::from_vec(vals, (n, k), &Device::Cpu).unwrap();
        Linear::from_f16_tensor(t)
    }

    /// A head, its screen, input rows and the full head's logits for them.
    struct Case {
        seed: u64,
        rows: usize,
        n: usize,
        h: Linear,
        g: GreedyHead,
        x: Vec<f32>,
        full: Vec<f32>,
    }

    /// Heads on and off the Q8_0 grid, at two sizes and several logit scales (the first
    /// `count` of them), with inputs seeded `seed + input_offset`.
    fn screened_cases(count: usize, input_offset: u64) -> Vec<Case> {
        [
            (1u64, 3, 4096, 576, 0.3f32, true),
            (2, 4, 2048, 96, 1.0, true),
            (3, 2, 2048, 96, 0.2, false),
            (4, 5, 4096, 576, 0.05, false),
        ]
        .into_iter()
        .take(count)
        .map(|(seed, rows, n, k, scale, on_grid)| {
            let h = if on_grid {
                grid_head(n, k, seed, scale)
            } else {
                head(n, k, seed)
            };
            let g = GreedyHead::build(&h).unwrap().expect("a screen");
            let x = inputs(rows, k, seed + input_offset, 3.0);
            let mut full = vec![0f32; rows * n];
            h.forward_into(&x, rows, &mut full).unwrap();
            Case {
                seed,
                rows,
                n,
                h,
                g,
                x,
                full,
            }
        })
        .collect()
    }

    #[test]
    fn sampled_draws_match_the_full_heads() {
        use tandem_kernels::sampling::{Sampler, SamplingParams};
        let mut screened_rows = 0;
        for Case {
            seed,
            rows,
            n,
            h,
            g,
            x,
            full,
        } in screened_cases(4, 20)
        {
            for temperature in [0.05f32, 0.3, 0.7, 1.0, 1.5] {
                for draw_seed in 0..6u64 {
                    let params = SamplingParams {
                        temperature,
                        seed: draw_seed,
                        ..SamplingParams::default()
                    };
                    let noise = DrawNoise::of(&params).expect("plain temperature");
                    let positions: Vec<usize> = (0..rows).map(|r| 17 + 3 * r).collect();
                    let keys: Vec<u64> = positions.iter().map(|&p| noise.key(p)).collect();
                    let before = g.stats();
                    let got = screened(&g, &h, &x, rows, RowReads::Draw(noise, &keys));
                    let after = g.stats();
                    screened_rows +=
                        (after.rows - before.rows) - (after.fallbacks - before.fallbacks);
                    let sampler = Sampler::new(params).unwrap();
                    for (r, (a, b)) in full.chunks_exact(n).zip(got.chunks_exact(n)).enumerate() {
                        assert_eq!(
                            sampler.sample_at(a, positions[r]),
                            sampler.sample_at(b, positions[r]),
                            "seed {seed}, T {temperature}, draw seed {draw_seed}, row {r}"
                        );
                        assert_eq!(
                            tandem_kernels::sampling::argmax(a),
                            tandem_kernels::sampling::argmax(b)
                        );
                        for (fa, gb) in a.iter().zip(b) {
                            assert!(*gb == f32::NEG_INFINITY || fa.to_bits() == gb.to_bits());
                        }
                    }
                }
            }
            eprintln!("seed {seed}: {:?}", g.stats());
        }
        // The draws were screened, not all handed to the full head.
        assert!(screened_rows > 0);
    }

    #[test]
    fn top_k_rows_give_the_full_heads_distributions() {
        use tandem_kernels::sampling::{Sampler, SamplingParams};
        let mut screened_rows = 0;
        for Case {
            seed,
            rows,
            n,
            h,
            g,
            x,
            full,
        } in screened_cases(3, 30)
        {
            for top_k in [1usize, 2, 5, 40, 50, 200] {
                let before = g.stats();
                let got = screened(&g, &h, &x, rows, RowReads::TopK(top_k));
                let after = g.stats();
                screened_rows += (after.rows - before.rows) - (after.fallbacks - before.fallbacks);
                for (temperature, top_p) in [(0.7f32, 1.0f32), (1.0, 0.9), (0.3, 0.95)] {
                    let params = SamplingParams {
                        temperature,
                        top_k,
                        top_p,
                        seed: 3,
                    };
                    let s = Sampler::new(params).unwrap();
                    for (r, (a, b)) in full.chunks_exact(n).zip(got.chunks_exact(n)).enumerate() {
                        let (pa, pb) = (s.distribution(a), s.distribution(b));
                        assert!(
                            pa.iter().zip(&pb).all(|(x, y)| x.to_bits() == y.to_bits()),
                            "seed {seed}, k {top_k}, T {temperature}, p {top_p}, row {r}"
                        );
                        for pos in 0..20 {
                            assert_eq!(s.sample_at(a, pos), s.sample_at(b, pos));
                        }
                    }
                }
            }
        }
        assert!(screened_rows > 0);
        // A tie at the k-th place (two identical rows): the lower index is kept, as with the
        // full head.
        let (n, k) = (256, 32);
        let vals: Vec<f16> = (0..n * k)
            .map(|i| f16::from_f32(((i * 37 % 101) as f32 / 101.0 - 0.5) * 0.1))
            .collect();
        let h = with_tied_rows(vals, k);
        let g = GreedyHead::build(&h).unwrap().expect("a screen");
        let x = vec![1f32; k];
        let mut full = vec![0f32; n];
        h.forward_into(&x, 1, &mut full).unwrap();
        let got = screened(&g, &h, &x, 1, RowReads::TopK(1));
        let s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 1,
            ..SamplingParams::default()
        })
        .unwrap();
        assert_eq!(s.distribution(&full), s.distribution(&got));
        assert_eq!(s.sample_at(&got, 0), 7);
    }

    #[test]
    fn non_finite_activations_take_the_full_head() {
        let (n, k) = (64, 32);
        let h = head(n, k, 5);
        let g = GreedyHead::build(&h).unwrap().expect("a screen");
        let mut x = inputs(1, k, 6, 1.0);
        x[3] = f32::NAN;
        let mut full = vec![0f32; n];
        h.forward_into(&x, 1, &mut full).unwrap();
        let got = screened(&g, &h, &x, 1, RowReads::Argmax);
        assert!(full
            .iter()
            .zip(&got)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        assert_eq!(g.stats().fallbacks, 1);
    }
}
