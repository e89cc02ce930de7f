//! Acceptance rules: which drafted tokens to keep, and the token that follows them.

use crate::drafter::Draft;
use tandem_kernels::sampling::{argmax, Sampler};

/// `accepted` drafted tokens are kept; `next` is the verifier's own token after them (the
/// correction on a rejection, or the bonus token when all were accepted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub accepted: usize,
    pub next: u32,
}

pub trait AcceptanceRule {
    /// `logits` holds draft.tokens.len() + 1 verifier rows (row i follows drafted token i-1).
    fn judge(&mut self, draft: &Draft, logits: &[Vec<f32>]) -> Verdict;
}

/// Greedy: keep drafted tokens while they equal the verifier's argmax. The output is token for
/// token the verifier's own greedy decoding.
pub struct Greedy;

impl AcceptanceRule for Greedy {
    fn judge(&mut self, draft: &Draft, logits: &[Vec<f32>]) -> Verdict {
        let mut i = 0;
        while i < draft.tokens.len() && argmax(&logits[i]) == draft.tokens[i] {
            i += 1;
        }
        Verdict {
            accepted: i,
            next: argmax(&logits[i]),
        }
    }
}

/// Speculative rejection sampling (Leviathan et al. 2023; Chen et al. 2023): accept drafted
/// token x with probability min(1, p(x)/q(x)); on rejection draw from norm(max(0, p − q));
/// after a fully accepted draft draw a bonus token from p. The output is distributed exactly
/// as the verifier's own sampling, whatever the draft. p is the verifier's distribution after
/// the sampler's temperature/top-k/top-p; q is the distribution the draft was drawn from.
pub struct RejectionSampling {
    pub sampler: Sampler,
}

impl RejectionSampling {
    /// The rule on explicit distributions (`p` has one row more than `tokens`). `q` of `None`
    /// means each drafted token was proposed deterministically (q one-hot).
    pub fn judge_probs(
        &mut self,
        tokens: &[u32],
        q: Option<&[Vec<f32>]>,
        p: &[Vec<f32>],
    ) -> Verdict {
        for (i, &x) in tokens.iter().enumerate() {
            let px = p[i][x as usize] as f64;
            let qx = q.map(|q| q[i][x as usize] as f64).unwrap_or(1.0);
            let u = self.sampler.uniform();
            if qx > 0.0 && u < (px / qx).min(1.0) {
                continue;
            }
            // Rejected: the residual distribution max(0, p − q), renormalized.
            let residual: Vec<f32> = match q {
                Some(q) => p[i]
                    .iter()
                    .zip(&q[i])
                    .map(|(a, b)| (a - b).max(0.0))
                    .collect(),
                None => {
                    let mut r = p[i].clone();
                    r[x as usize] = 0.0;
                    r
                }
            };
            let next = if residual.iter().any(|&r| r > 0.0) {
                self.sampler.sample_from(&residual)
            } else {
                self.sampler.sample_from(&p[i])
            };
            return Verdict { accepted: i, next };
        }
        let k = tokens.len();
        Verdict {
            accepted: k,
            next: self.sampler.sample_from(&p[k]),
        }
    }
}

impl AcceptanceRule for RejectionSampling {
    fn judge(&mut self, draft: &Draft, logits: &[Vec<f32>]) -> Verdict {
        let p: Vec<Vec<f32>> = logits
            .iter()
            .map(|l| self.sampler.distribution(l))
            .collect();
        self.judge_probs(&draft.tokens, draft.probs.as_deref(), &p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use tandem_kernels::sampling::SamplingParams;

    fn sampler(seed: u64) -> Sampler {
        Sampler::new(SamplingParams {
            temperature: 1.0,
            seed,
            ..Default::default()
        })
        .unwrap()
    }

    fn tv(counts: &[usize], target: &[f32]) -> f64 {
        let n: usize = counts.iter().sum();
        counts
            .iter()
            .zip(target)
            .map(|(c, t)| (*c as f64 / n as f64 - *t as f64).abs())
            .sum::<f64>()
            / 2.0
    }

    /// The first emitted token over many draws must follow p, not q. A wrong rule (accepting
    /// whatever was drafted) must fail the same test.
    #[test]
    fn first_token_follows_the_target_distribution() {
        let p = vec![0.5f32, 0.3, 0.15, 0.05];
        let q = vec![0.1f32, 0.2, 0.3, 0.4];
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut rule = RejectionSampling {
            sampler: sampler(1),
        };
        let n = 200_000;
        let (mut ours, mut wrong) = (vec![0usize; 4], vec![0usize; 4]);
        for _ in 0..n {
            // Draft one token from q.
            let r: f32 = rng.random();
            let mut acc = 0.0;
            let x = q
                .iter()
                .position(|w| {
                    acc += w;
                    r < acc
                })
                .unwrap_or(3) as u32;
            let v = rule.judge_probs(
                &[x],
                Some(std::slice::from_ref(&q)),
                &[p.clone(), p.clone()],
            );
            ours[if v.accepted == 1 {
                x as usize
            } else {
                v.next as usize
            }] += 1;
            wrong[x as usize] += 1; // "accept everything": emits q
        }
        assert!(tv(&ours, &p) < 0.01, "TV {}", tv(&ours, &p));
        assert!(
            tv(&wrong, &p) > 0.1,
            "the wrong rule should be detected: TV {}",
            tv(&wrong, &p)
        );
    }

    /// With a deterministic (n-gram) proposal, the emitted token still follows p.
    #[test]
    fn deterministic_drafts_keep_the_target_distribution() {
        let p = vec![0.2f32, 0.7, 0.1];
        let mut rule = RejectionSampling {
            sampler: sampler(2),
        };
        let mut counts = vec![0usize; 3];
        for _ in 0..100_000 {
            let v = rule.judge_probs(&[2], None, &[p.clone(), p.clone()]);
            counts[if v.accepted == 1 { 2 } else { v.next as usize }] += 1;
        }
        assert!(tv(&counts, &p) < 0.01, "TV {}", tv(&counts, &p));
    }

    #[test]
    fn greedy_keeps_the_agreeing_prefix_and_corrects() {
        let rows = vec![
            vec![0.0, 5.0, 1.0],
            vec![3.0, 0.0, 1.0],
            vec![0.0, 0.0, 9.0],
        ];
        let d = Draft {
            tokens: vec![1, 2],
            probs: None,
        };
        assert_eq!(
            Greedy.judge(&d, &rows),
            Verdict {
                accepted: 1,
                next: 0
            }
        );
        let d = Draft {
            tokens: vec![1, 0],
            probs: None,
        };
        assert_eq!(
            Greedy.judge(&d, &rows),
            Verdict {
                accepted: 2,
                next: 2
            }
        );
    }
}
