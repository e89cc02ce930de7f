//! Distances between a candidate's and a reference's next-token distributions, per position,
//! and their summaries (llama-perplexity's `--kl-divergence` statistics).

/// Per-position comparison of a candidate against the reference.
#[derive(Debug, Clone, Default)]
pub struct Divergence {
    /// KL(reference || candidate), nats.
    pub kl: Vec<f32>,
    /// Candidate probability of the actual next token minus the reference's.
    pub delta_p: Vec<f32>,
    /// Positions where both models' most likely token is the same.
    pub top1_same: usize,
    pub positions: usize,
    /// Negative log-likelihoods of the actual next token.
    pub nll_reference: f64,
    pub nll_candidate: f64,
}

/// KL(p || q) from log-probabilities, in f64.
pub fn kl_divergence(log_p: &[f32], log_q: &[f32]) -> f64 {
    log_p
        .iter()
        .zip(log_q)
        .map(|(&lp, &lq)| {
            let p = (lp as f64).exp();
            if p > 0.0 {
                p * (lp as f64 - lq as f64)
            } else {
                0.0
            }
        })
        .sum::<f64>()
        .max(0.0)
}

fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

impl Divergence {
    /// Adds one chunk's positions. `reference_target` holds the reference's exact log-prob of
    /// each actual next token when `reference` rows are approximate (the cache's 16-bit rows).
    pub fn add(
        &mut self,
        reference: &[Vec<f32>],
        candidate: &[Vec<f32>],
        targets: &[u32],
        reference_target: Option<&[f32]>,
    ) {
        for (i, ((r, c), &t)) in reference.iter().zip(candidate).zip(targets).enumerate() {
            self.kl.push(kl_divergence(r, c) as f32);
            let t = t as usize;
            let lr = match reference_target {
                Some(exact) => exact[i],
                None => r.get(t).copied().unwrap_or(f32::NEG_INFINITY),
            };
            let lc = c.get(t).copied().unwrap_or(f32::NEG_INFINITY);
            self.delta_p.push(lc.exp() - lr.exp());
            self.nll_reference -= lr as f64;
            self.nll_candidate -= lc as f64;
            if argmax(r) == argmax(c) {
                self.top1_same += 1;
            }
            self.positions += 1;
        }
    }

    pub fn top1_agreement(&self) -> f64 {
        self.top1_same as f64 / self.positions.max(1) as f64
    }

    pub fn ppl_reference(&self) -> f64 {
        (self.nll_reference / self.positions.max(1) as f64).exp()
    }

    pub fn ppl_candidate(&self) -> f64 {
        (self.nll_candidate / self.positions.max(1) as f64).exp()
    }
}

/// Mean and order statistics of a sample.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Summary {
    pub mean: f64,
    pub median: f64,
    pub p1: f64,
    pub p99: f64,
    pub max: f64,
    pub min: f64,
}

impl Summary {
    /// Percentiles by nearest rank on the sorted sample.
    pub fn of(xs: &[f32]) -> Self {
        if xs.is_empty() {
            return Summary::default();
        }
        let mut v: Vec<f64> = xs.iter().map(|&x| x as f64).collect();
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((q * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)];
        Summary {
            mean: v.iter().sum::<f64>() / v.len() as f64,
            median: at(0.5),
            p1: at(0.01),
            p99: at(0.99),
            max: v[v.len() - 1],
            min: v[0],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scoring::log_softmax;

    #[test]
    fn kl_is_zero_for_equal_and_positive_otherwise() {
        let p = log_softmax(&[1.0, 2.0, 3.0]);
        let q = log_softmax(&[1.0, 2.5, 3.0]);
        assert!(kl_divergence(&p, &p).abs() < 1e-12);
        let k = kl_divergence(&p, &q);
        // Direct formula in f64.
        let pe: Vec<f64> = p.iter().map(|&x| (x as f64).exp()).collect();
        let qe: Vec<f64> = q.iter().map(|&x| (x as f64).exp()).collect();
        let want: f64 = pe.iter().zip(&qe).map(|(a, b)| a * (a / b).ln()).sum();
        assert!((k - want).abs() < 1e-6, "{k} vs {want}");
    }

    #[test]
    fn summary_percentiles() {
        let xs: Vec<f32> = (0..101).map(|i| i as f32).collect();
        let s = Summary::of(&xs);
        assert_eq!(
            (s.mean, s.median, s.p1, s.p99, s.max),
            (50.0, 50.0, 1.0, 99.0, 100.0)
        );
    }

    #[test]
    fn divergence_counts_top1_and_delta_p() {
        let r = vec![log_softmax(&[0.0, 3.0]), log_softmax(&[2.0, 0.0])];
        let c = vec![log_softmax(&[0.0, 3.0]), log_softmax(&[0.0, 2.0])];
        let mut d = Divergence::default();
        d.add(&r, &c, &[1, 0], None);
        assert_eq!(d.positions, 2);
        assert_eq!(d.top1_same, 1);
        assert!(d.delta_p[0].abs() < 1e-6 && d.delta_p[1] < 0.0);
    }
}
