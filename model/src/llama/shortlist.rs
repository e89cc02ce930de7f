//! A cut-down output head for draft models: only a shortlist of tokens gets logits.

use super::Llama;
use crate::error::{Error, Result};
use crate::linear::{ActivationPrecision, Linear};

/// A cut-down output head: the rows of `ids`, and of `extra_ids` (tokens the model has read
/// since: few, so their rows are cut out again whenever one is added).
pub(super) struct Shortlist {
    ids: Vec<u32>,
    head: Linear,
    extra_ids: Vec<u32>,
    extra: Option<Linear>,
    /// Whether each token of the vocabulary is in `ids` or `extra_ids`.
    member: Vec<bool>,
}

impl Shortlist {
    /// Spreads the heads' logits for `rows` normalized rows `hn` over full vocabulary rows of
    /// `logits` (−∞ elsewhere); `short` is scratch space the caller keeps between calls.
    pub(super) fn logits(
        &self,
        hn: &[f32],
        rows: usize,
        short: &mut Vec<f32>,
        logits: &mut [f32],
    ) -> Result<()> {
        let vocab = self.member.len();
        logits.fill(f32::NEG_INFINITY);
        for (ids, head) in [
            (&self.ids, Some(&self.head)),
            (&self.extra_ids, self.extra.as_ref()),
        ] {
            let Some(head) = head else { continue };
            short.resize(rows * ids.len(), 0.0);
            head.forward_into(hn, rows, short)?;
            for (row, v) in logits
                .chunks_exact_mut(vocab)
                .zip(short.chunks_exact(ids.len()))
            {
                for (&id, &x) in ids.iter().zip(v) {
                    row[id as usize] = x;
                }
            }
        }
        Ok(())
    }

    /// The decode cost of the cut-down heads, by the model's per-layer `cost`.
    pub(super) fn cost(&self, cost: impl Fn(&Linear) -> f64) -> f64 {
        cost(&self.head) + self.extra.as_ref().map_or(0.0, cost)
    }

    pub(super) fn set_activations(&mut self, p: ActivationPrecision) -> Result<()> {
        self.head.set_activations(p)?;
        if let Some(e) = &mut self.extra {
            e.set_activations(p)?;
        }
        Ok(())
    }
}

/// Most rows a shortlist holds beyond the list it was cut for before it is cut again.
const MAX_EXTRA_ROWS: usize = 1024;

impl Llama {
    /// Restricts the output head to the tokens `ids` and, from then on, every token this model
    /// reads (`None` restores the full head): every other token's logit is −∞, so neither
    /// argmax nor sampling can pick it. For a draft model: a speculative draft spends ~20% of
    /// its step on SmolLM2's 49k-row head, a token of its context is likely to come again
    /// (names, code identifiers), and a draft that cannot propose a token only loses that
    /// proposal, never the verifier's output. Cuts a CPU copy of the head's rows in the head's
    /// format (Q8_0/Q4_0 tiles stay tiles). Not for a model that runs on the GPU (its head
    /// would then run on the CPU, slower than the whole head there). A shortlist already in
    /// place that lacks only a few of `ids` (up to 1024 rows beyond them) is kept
    /// and extended instead of cut again.
    pub fn set_output_shortlist(&mut self, ids: Option<&[u32]>) -> Result<()> {
        let Some(ids) = ids else {
            *self.shortlist.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
            return Ok(());
        };
        if self.runs_on_gpu() {
            return Err(Error::Invalid(
                "an output shortlist runs on the CPU; this model runs on the GPU".into(),
            ));
        }
        let vocab = self.config.vocab_size;
        let mut member = vec![false; vocab];
        let mut list = Vec::with_capacity(ids.len().next_multiple_of(8));
        for &id in ids {
            let Some(m) = member.get_mut(id as usize) else {
                return Err(Error::Invalid(format!(
                    "token id {id} is outside the vocabulary ({vocab})"
                )));
            };
            if !std::mem::replace(m, true) {
                list.push(id);
            }
        }
        let Some(&last) = list.last() else {
            return Err(Error::Invalid("an empty output shortlist".into()));
        };
        // A head that already holds nearly all of `ids` and not many more stays, with the
        // few missing ones added as extras: each request of a session asks for the same
        // lowest ids plus its prompt's, and cutting SmolLM2's ~16k rows again took 36-39 ms
        // before every request (a 7-token answer takes ~150 ms).
        let keep = match self.shortlist.get_mut().unwrap_or_else(|e| e.into_inner()) {
            Some(s) => {
                let missing = list.iter().filter(|&&t| !s.member[t as usize]).count();
                let held = s.member.iter().filter(|&&m| m).count();
                s.extra_ids.len() + missing <= MAX_EXTRA_ROWS && held <= list.len() + MAX_EXTRA_ROWS
            }
            None => false,
        };
        if keep {
            return self.extend_shortlist(&list);
        }
        // Whole 8-row tiles for Q8_0/Q4_0 heads: the last id repeats (its logit is written
        // twice, with the same value).
        list.resize(list.len().next_multiple_of(8), last);
        let head = self.lm_head.select_rows(&list)?;
        // Every draft step streams it, as it does the layers (`Llama::back_with_huge_pages`).
        if let Some(at) = head.memory() {
            tandem_kernels::huge_pages::back_with_huge_pages(&[at]);
        }
        *self.shortlist.get_mut().unwrap_or_else(|e| e.into_inner()) = Some(Shortlist {
            ids: list,
            head,
            extra_ids: Vec::new(),
            extra: None,
            member,
        });
        Ok(())
    }

    /// Adds `tokens` to the output shortlist, if there is one (the forward pass's input).
    pub(super) fn extend_shortlist(&self, tokens: &[u32]) -> Result<()> {
        let missing = |s: &Shortlist| tokens.iter().any(|&t| !s.member[t as usize]);
        match self.shortlist.read() {
            Ok(g) if g.as_ref().is_none_or(|s| !missing(s)) => return Ok(()),
            _ => {}
        }
        let mut g = self.shortlist.write().unwrap_or_else(|e| e.into_inner());
        let Some(s) = g.as_mut() else { return Ok(()) };
        for &t in tokens {
            if !std::mem::replace(&mut s.member[t as usize], true) {
                s.extra_ids.push(t);
            }
        }
        s.extra = Some(self.lm_head.select_rows(&s.extra_ids)?);
        Ok(())
    }
}
