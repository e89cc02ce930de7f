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

/// A token tree's verdict: the accepted path (indices into the draft's tokens, root first)
/// and the verifier's own token after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeVerdict {
    pub path: Vec<usize>,
    pub next: u32,
}

pub trait AcceptanceRule {
    /// The index in the sequence of the token the next judgement's first row decides (the
    /// context's length). Rules whose draws are keyed by position ([`CoupledSampling`]) read
    /// it; the others ignore it.
    fn set_position(&mut self, _position: usize) {}

    /// `logits` holds draft.tokens.len() + 1 verifier rows (row i follows drafted token i-1).
    fn judge(&mut self, draft: &Draft, logits: &[Vec<f32>]) -> Verdict;

    /// A token tree (or a chain): `logits[0]` follows the context, `logits[i + 1]` follows
    /// `draft.tokens[i]`. A rule that knows no trees judges the tree's main chain (its first
    /// candidate at each step), which keeps its own guarantee.
    fn judge_tree(&mut self, draft: &Draft, logits: &[Vec<f32>]) -> TreeVerdict {
        if !draft.is_tree() {
            let v = self.judge(draft, logits);
            return TreeVerdict {
                path: (0..v.accepted).collect(),
                next: v.next,
            };
        }
        let chain = draft.main_chain();
        let mut rows = vec![logits[0].clone()];
        let mut nodes = Vec::new();
        let mut node = None;
        while let Some(c) = draft.children(node).next() {
            rows.push(logits[c + 1].clone());
            nodes.push(c);
            node = Some(c);
        }
        let v = self.judge(&chain, &rows);
        TreeVerdict {
            path: nodes[..v.accepted].to_vec(),
            next: v.next,
        }
    }
}

/// Greedy: keep drafted tokens while they equal the verifier's argmax. The output is token for
/// token the verifier's own greedy decoding.
pub struct Greedy;

impl AcceptanceRule for Greedy {
    fn judge(&mut self, draft: &Draft, logits: &[Vec<f32>]) -> Verdict {
        keep_while_equal(draft, logits, |row, _| argmax(row))
    }

    /// The path is plain greedy decoding's, whichever branch it lies on.
    fn judge_tree(&mut self, draft: &Draft, logits: &[Vec<f32>]) -> TreeVerdict {
        follow_equal_path(draft, logits, |row, _| argmax(row))
    }
}

/// The rules whose every token is the verifier's own for its row (`own(row, depth)`, depth
/// counted from the first row): keep drafted tokens while they equal it; the next token is
/// the verifier's own at the first that does not.
fn keep_while_equal(
    draft: &Draft,
    logits: &[Vec<f32>],
    own: impl Fn(&[f32], usize) -> u32,
) -> Verdict {
    let mut i = 0;
    while i < draft.tokens.len() && own(&logits[i], i) == draft.tokens[i] {
        i += 1;
    }
    Verdict {
        accepted: i,
        next: own(&logits[i], i),
    }
}

/// [`keep_while_equal`] over a tree: from the root, follow the candidate that equals the
/// verifier's own token at that depth, while there is one.
fn follow_equal_path(
    draft: &Draft,
    logits: &[Vec<f32>],
    own: impl Fn(&[f32], usize) -> u32,
) -> TreeVerdict {
    let (mut path, mut node) = (Vec::new(), None);
    loop {
        let row = node.map_or(0, |n| n + 1);
        let want = own(&logits[row], path.len());
        match draft.children(node).find(|&c| draft.tokens[c] == want) {
            Some(c) => {
                path.push(c);
                node = Some(c);
            }
            None => return TreeVerdict { path, next: want },
        }
    }
}

/// Sampling with the noise shared between draft and verifier: every token is the verifier's
/// own position-keyed Gumbel-max draw ([`Sampler::sample_at`]), and a drafted token is kept
/// while it equals that draw. So the rule is [`Greedy`] with the verifier's argmax replaced
/// by its draw at each position: the output is token for token what plain sampling with the
/// same seed emits, whatever was drafted and however long (Daliri et al. 2024). A draft that
/// draws its proposals with the same noise (`ModelDrafter` with the run's own seed) agrees
/// with the verifier wherever the two distributions are close (with probability at least
/// (1 − TV) / (1 + TV) per token). Because the output no longer depends on k, a sampled run
/// may choose k on the clock, as a greedy one does; and trees are judged as greedy ones are.
pub struct CoupledSampling {
    pub sampler: Sampler,
    /// The sequence index the first row decides ([`AcceptanceRule::set_position`]).
    pub position: usize,
}

impl CoupledSampling {
    pub fn new(sampler: Sampler) -> Self {
        CoupledSampling {
            sampler,
            position: 0,
        }
    }

    /// The verifier's own token for row `row` at `depth` tokens past the first row.
    fn draw(&self, row: &[f32], depth: usize) -> u32 {
        self.sampler.sample_at(row, self.position + depth)
    }
}

impl AcceptanceRule for CoupledSampling {
    fn set_position(&mut self, position: usize) {
        self.position = position;
    }

    fn judge(&mut self, draft: &Draft, logits: &[Vec<f32>]) -> Verdict {
        keep_while_equal(draft, logits, |row, depth| self.draw(row, depth))
    }

    /// The verifier's draw at each depth, as [`Greedy`]'s argmax.
    fn judge_tree(&mut self, draft: &Draft, logits: &[Vec<f32>]) -> TreeVerdict {
        follow_equal_path(draft, logits, |row, depth| self.draw(row, depth))
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

impl RejectionSampling {
    /// Multi-candidate rejection sampling over a token tree (SpecInfer, Miao et al. 2024;
    /// EAGLE's tree sampling): at each node the verifier's distribution p, and its candidates
    /// in order; candidate x drawn from q is accepted with probability min(1, p(x)/q(x)) (q
    /// one-hot for a deterministic candidate), and on rejection p becomes norm(max(0, p − q))
    /// for the next candidate. When every candidate is rejected the token is drawn from what
    /// is left of p. Each stage samples exactly the distribution the stage before left, so the
    /// emitted token follows the verifier's p, whatever the candidates (sampled candidates
    /// must be independent draws given the context; deterministic ones may be anything).
    pub fn judge_tree_probs(
        &mut self,
        draft: &Draft,
        mut p_at: impl FnMut(&Sampler, usize) -> Vec<f32>,
    ) -> TreeVerdict {
        let (mut path, mut node) = (Vec::new(), None);
        'walk: loop {
            let mut p = p_at(&self.sampler, node.map_or(0, |n| n + 1));
            for c in draft.children(node) {
                let x = draft.tokens[c] as usize;
                let q = draft.q(c);
                let px = p.get(x).copied().unwrap_or(0.0) as f64;
                let qx = q.map_or(1.0, |q| q.get(x).copied().unwrap_or(0.0) as f64);
                if qx > 0.0 && self.sampler.uniform() < (px / qx).min(1.0) {
                    path.push(c);
                    node = Some(c);
                    continue 'walk;
                }
                let mut residual = p.clone();
                match q {
                    Some(q) => residual
                        .iter_mut()
                        .zip(q)
                        .for_each(|(r, q)| *r = (*r - q).max(0.0)),
                    None => {
                        if let Some(r) = residual.get_mut(x) {
                            *r = 0.0;
                        }
                    }
                }
                let z: f64 = residual.iter().map(|&r| r as f64).sum();
                if z > 0.0 {
                    residual
                        .iter_mut()
                        .for_each(|r| *r = (*r as f64 / z) as f32);
                    p = residual;
                }
            }
            return TreeVerdict {
                path,
                next: self.sampler.sample_from(&p),
            };
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

    fn judge_tree(&mut self, draft: &Draft, logits: &[Vec<f32>]) -> TreeVerdict {
        if !draft.is_tree() {
            let v = self.judge(draft, logits);
            return TreeVerdict {
                path: (0..v.accepted).collect(),
                next: v.next,
            };
        }
        self.judge_tree_probs(draft, |s, row| s.distribution(&logits[row]))
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

    /// Coupled sampling: a draft drawn from q with the verifier's position-keyed noise, judged
    /// over 200k positions, emits tokens that follow p (not q), and exactly the tokens plain
    /// position-keyed sampling from p emits. Accepting the draft as drawn is told apart.
    #[test]
    fn coupled_sampling_emits_the_verifiers_own_draws() {
        let p = [0.5f32, 0.3, 0.15, 0.05];
        let q = [0.1f32, 0.2, 0.3, 0.4];
        let ln = |d: &[f32]| d.iter().map(|x| x.ln()).collect::<Vec<f32>>();
        let (lp, lq) = (ln(&p), ln(&q));
        let mut rule = CoupledSampling::new(sampler(5));
        let draft_sampler = sampler(5);
        let n = 200_000;
        let (mut ours, mut wrong, mut agreed) = (vec![0usize; 4], vec![0usize; 4], 0);
        for pos in 0..n {
            let x = draft_sampler.sample_at(&lq, pos);
            rule.set_position(pos);
            let v = rule.judge(&Draft::chain(vec![x]), &[lp.clone(), lp.clone()]);
            let emitted = if v.accepted == 1 { x } else { v.next };
            assert_eq!(emitted, rule.sampler.sample_at(&lp, pos));
            agreed += v.accepted;
            ours[emitted as usize] += 1;
            wrong[x as usize] += 1;
        }
        assert!(tv(&ours, &p) < 0.01, "TV {}", tv(&ours, &p));
        assert!(
            tv(&wrong, &p) > 0.1,
            "TV of the wrong rule {}",
            tv(&wrong, &p)
        );
        // The shared noise makes the draft agree at least (1 − TV) / (1 + TV) of the time.
        let tv_pq = 0.5 * p.iter().zip(&q).map(|(a, b)| (a - b).abs()).sum::<f32>() as f64;
        let rate = agreed as f64 / n as f64;
        assert!(
            rate > (1.0 - tv_pq) / (1.0 + tv_pq) - 0.01,
            "agreement {rate}"
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
            parents: None,
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
            parents: None,
        };
        assert_eq!(
            Greedy.judge(&d, &rows),
            Verdict {
                accepted: 2,
                next: 2
            }
        );
    }

    fn draw(rng: &mut impl Rng, w: &[f32]) -> usize {
        let r: f32 = rng.random::<f32>() * w.iter().sum::<f32>();
        let mut acc = 0.0;
        w.iter()
            .position(|x| {
                acc += x;
                r < acc
            })
            .unwrap_or(w.len() - 1)
    }

    /// A token tree: at the root a candidate drawn from q and a deterministic second one (q's
    /// likeliest other token), and under the first a candidate drawn from q again. Over 400k
    /// draws the first two emitted tokens must follow the verifier's joint p(x)·p(y|x); the
    /// same walk without the residual update (a plausible mistake) must fail the test.
    #[test]
    fn tree_sampling_keeps_the_target_joint_distribution() {
        let p0 = vec![0.45f32, 0.3, 0.2, 0.05];
        let q0 = vec![0.1f32, 0.2, 0.3, 0.4];
        // The verifier's and the draft's next-token distributions after token x.
        let p_after = [
            vec![0.1f32, 0.6, 0.2, 0.1],
            vec![0.25, 0.25, 0.25, 0.25],
            vec![0.7, 0.1, 0.1, 0.1],
            vec![0.05, 0.05, 0.1, 0.8],
        ];
        let q_after = [
            vec![0.4f32, 0.3, 0.2, 0.1],
            vec![0.1, 0.1, 0.1, 0.7],
            vec![0.25, 0.25, 0.25, 0.25],
            vec![0.6, 0.2, 0.1, 0.1],
        ];
        let target: Vec<f32> = (0..16).map(|c| p0[c / 4] * p_after[c / 4][c % 4]).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(31);
        let mut rule = RejectionSampling {
            sampler: sampler(3),
        };
        let n = 400_000;
        let (mut ours, mut wrong) = (vec![0usize; 16], vec![0usize; 16]);
        for _ in 0..n {
            let a = draw(&mut rng, &q0);
            let b = (0..4)
                .filter(|&t| t != a)
                .max_by(|&x, &y| q0[x].total_cmp(&q0[y]))
                .unwrap();
            let c = draw(&mut rng, &q_after[a]);
            let draft = Draft {
                tokens: vec![a as u32, b as u32, c as u32],
                probs: Some(vec![q0.clone(), Vec::new(), q_after[a].clone()]),
                parents: Some(vec![None, None, Some(0)]),
            };
            let rows = [
                p0.clone(),
                p_after[a].clone(),
                p_after[b].clone(),
                p_after[c].clone(),
            ];
            let v = rule.judge_tree_probs(&draft, |_, r| rows[r].clone());
            let mut emitted: Vec<usize> =
                v.path.iter().map(|&i| draft.tokens[i] as usize).collect();
            emitted.push(v.next as usize);
            if emitted.len() < 2 {
                // The next step would sample after the correction.
                emitted.push(draw(&mut rng, &p_after[emitted[0]]));
            }
            ours[emitted[0] * 4 + emitted[1]] += 1;

            // The wrong walk: p is never reduced after a rejection.
            let mut out = Vec::new();
            let mut node = None;
            'walk: loop {
                let p = &rows[node.map_or(0, |n: usize| n + 1)];
                for ch in draft.children(node) {
                    let x = draft.tokens[ch] as usize;
                    let qx = draft.q(ch).map_or(1.0, |q| q[x]);
                    if rng.random::<f32>() < (p[x] / qx).min(1.0) {
                        out.push(x);
                        node = Some(ch);
                        continue 'walk;
                    }
                }
                out.push(draw(&mut rng, p));
                break;
            }
            if out.len() < 2 {
                out.push(draw(&mut rng, &p_after[out[0]]));
            }
            wrong[out[0] * 4 + out[1]] += 1;
        }
        assert!(tv(&ours, &target) < 0.01, "TV {}", tv(&ours, &target));
        assert!(
            tv(&wrong, &target) > 0.02,
            "the wrong rule should be detected: TV {}",
            tv(&wrong, &target)
        );
    }

    #[test]
    fn greedy_follows_the_branch_the_verifier_takes() {
        // Root candidates 1 and 2; under 2, candidate 0; under 1, candidate 2.
        let draft = Draft {
            tokens: vec![1, 2, 0, 2],
            probs: None,
            parents: Some(vec![None, None, Some(1), Some(0)]),
        };
        let row = |t: usize| {
            let mut r = vec![0f32; 3];
            r[t] = 5.0;
            r
        };
        // The verifier wants 2, then 0, then 1: the second branch, then a correction.
        let logits = vec![row(2), row(0), row(0), row(1), row(0)];
        assert_eq!(
            Greedy.judge_tree(&draft, &logits),
            TreeVerdict {
                path: vec![1, 2],
                next: 1
            }
        );
        // The main chain (1 → 2) alone, judged by a rule without trees, agrees on a chain.
        assert_eq!(draft.main_chain().tokens, vec![1, 2]);
        let mut limited = draft.clone();
        limited.limit_depth(1);
        assert_eq!(limited.tokens, vec![1, 2]);
        assert_eq!(limited.parents, Some(vec![None, None]));
    }
}
