//! Layer skipping: a draft that runs only some of the verifier's decoder sublayers (the
//! attention or MLP half of a layer), as self-speculative methods do (Draft & Verify, SWIFT,
//! LayerSkip without its training). A skipped half leaves the residual stream as it is, so
//! the model keeps its structure and its KV cache layout.

use super::backend::{Backend, Buf, CpuBuffers, CpuPass};
use super::profile::Timer;
use super::Llama;
use crate::error::{Error, Result};

/// Half of a decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Sublayer {
    /// Layer i's attention half (its norm, q/k/v/o and the residual add).
    Attention(usize),
    /// Layer i's MLP half.
    Mlp(usize),
}

impl Sublayer {
    /// Index into a model's per-sublayer flags: 2i for attention, 2i + 1 for the MLP.
    fn slot(self) -> usize {
        match self {
            Sublayer::Attention(i) => 2 * i,
            Sublayer::Mlp(i) => 2 * i + 1,
        }
    }
    fn layer(self) -> usize {
        match self {
            Sublayer::Attention(i) | Sublayer::Mlp(i) => i,
        }
    }
}

impl std::fmt::Display for Sublayer {
    /// `a3` (layer 3's attention), `m3` (its MLP).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sublayer::Attention(i) => write!(f, "a{i}"),
            Sublayer::Mlp(i) => write!(f, "m{i}"),
        }
    }
}

impl std::str::FromStr for Sublayer {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::Invalid(format!("'{s}' is not a sublayer (a<layer> or m<layer>)"));
        let (kind, n) = s.split_at_checked(1).ok_or_else(bad)?;
        let i: usize = n.parse().map_err(|_| bad())?;
        match kind {
            "a" => Ok(Sublayer::Attention(i)),
            "m" => Ok(Sublayer::Mlp(i)),
            _ => Err(bad()),
        }
    }
}

impl Llama {
    /// Whether the forward pass leaves out this sublayer.
    pub(super) fn skips(&self, s: Sublayer) -> bool {
        self.skip.get(s.slot()).copied().unwrap_or(false)
    }

    /// Runs only the sublayers not in `skipped` from now on (empty: the whole model).
    pub fn set_skipped(&mut self, skipped: &[Sublayer]) -> Result<()> {
        let n = self.layers.len();
        if let Some(bad) = skipped.iter().find(|s| s.layer() >= n) {
            return Err(Error::Invalid(format!(
                "cannot skip {bad}: the model has {n} layers"
            )));
        }
        self.skip = vec![false; 2 * n];
        for s in skipped {
            self.skip[s.slot()] = true;
        }
        // A captured GPU pass holds the old set of sublayers.
        if let Some(r) = &self.resident {
            r.forget_graphs();
        }
        Ok(())
    }

    /// The sublayers the forward pass leaves out, in order.
    pub fn skipped(&self) -> Vec<Sublayer> {
        (0..self.layers.len())
            .flat_map(|i| [Sublayer::Attention(i), Sublayer::Mlp(i)])
            .filter(|&s| self.skips(s))
            .collect()
    }

    /// How much each sublayer changes the residual stream over `tokens` (a fresh sequence):
    /// 1 − the mean cosine similarity of its input and output rows (ShortGPT's "block
    /// influence", per half layer). The least influential are the first candidates to skip.
    /// Runs the whole model (whatever is skipped), on the CPU.
    pub fn sublayer_influence(&self, tokens: &[u32]) -> Result<Vec<(Sublayer, f64)>> {
        if self.runs_on_gpu() {
            return Err(Error::Invalid(
                "sublayer influence reads activations on the CPU; run without --gpu".into(),
            ));
        }
        if tokens.is_empty() {
            return Err(Error::Invalid("no tokens to measure sublayers on".into()));
        }
        let mut cache = self.new_cache_with_limit(tokens.len())?;
        let rows = tokens.len();
        let mut buffers = CpuBuffers::default();
        let mut b = CpuPass::new(self, &mut buffers, rows);
        b.reserve(&mut cache, rows)?;
        let positions: Vec<usize> = (0..rows).collect();
        b.begin(tokens, &positions)?;
        let mut timer = Timer::new(None);
        let mut out = Vec::with_capacity(2 * self.layers.len());
        let h = self.config.hidden_size;
        for li in 0..self.layers.len() {
            let before = b.host(Buf::X)?.to_vec();
            self.attention_half(
                &mut b,
                li,
                &mut [(tokens, &mut cache)],
                None,
                None,
                &mut timer,
            )?;
            let mid = b.host(Buf::X)?.to_vec();
            out.push((Sublayer::Attention(li), 1.0 - mean_cosine(&before, &mid, h)));
            self.mlp_half(&mut b, li, None, &mut timer)?;
            out.push((
                Sublayer::Mlp(li),
                1.0 - mean_cosine(&mid, b.host(Buf::X)?, h),
            ));
        }
        Ok(out)
    }
}

/// Mean over rows of width `h` of cos(a_row, b_row).
fn mean_cosine(a: &[f32], b: &[f32], h: usize) -> f64 {
    let rows = a.len() / h;
    let sum: f64 = a
        .chunks_exact(h)
        .zip(b.chunks_exact(h))
        .map(|(x, y)| {
            let (mut xy, mut xx, mut yy) = (0f64, 0f64, 0f64);
            for (&p, &q) in x.iter().zip(y) {
                xy += p as f64 * q as f64;
                xx += p as f64 * p as f64;
                yy += q as f64 * q as f64;
            }
            xy / (xx.sqrt() * yy.sqrt()).max(1e-30)
        })
        .sum();
    sum / rows.max(1) as f64
}
