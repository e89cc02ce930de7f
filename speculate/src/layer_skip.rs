//! Layer-skipping self-drafts: which of the verifier's sublayers a draft leaves out, chosen
//! on calibration text (never the evaluation text). Fewer sublayers make a cheaper draft
//! step and a draft that agrees with the verifier less often; the choice weighs the two.

use crate::{Error, Result};
use tandem_model::{argmax, Llama, Logits, Sublayer};

/// Which sublayers to skip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipChoice {
    /// The count that maximizes the expected speedup on the calibration text, least
    /// influential sublayers first.
    Auto,
    /// This many sublayers, least influential first.
    Count(usize),
    /// Exactly these.
    List(Vec<Sublayer>),
}

impl SkipChoice {
    /// `auto`, a count (`12`) or a list of sublayers (`a3.m5.m7`: layer 3's attention, layers
    /// 5 and 7's MLP).
    pub fn parse(s: &str) -> Result<Self> {
        if s == "auto" {
            return Ok(SkipChoice::Auto);
        }
        if let Ok(n) = s.parse::<usize>() {
            return Ok(SkipChoice::Count(n));
        }
        s.split('.')
            .map(|p| p.parse::<Sublayer>().map_err(Error::from))
            .collect::<Result<Vec<_>>>()
            .map(SkipChoice::List)
    }
}

/// What the choice measured: per candidate count, the draft's top-1 agreement with the
/// verifier on the calibration text, its step cost relative to the verifier's, and the
/// speedup a chain draft of the best k would give at that agreement and cost.
#[derive(Debug, Clone)]
pub struct SkipReport {
    pub skipped: Vec<Sublayer>,
    /// (sublayers skipped, agreement, relative cost, expected speedup).
    pub candidates: Vec<(usize, f64, f64, f64)>,
}

/// Extra verification cost per drafted token, as a share of a plain step (the controller's
/// assumption without a clock: a 5-token pass costs ~1.5 plain steps at F16).
const VERIFY_GROWTH: f64 = 0.1;

/// Leviathan et al.'s expected speedup of a chain draft at per-token agreement `alpha` and
/// relative draft cost `cost`, at its best k (1 to 8).
pub fn expected_speedup(alpha: f64, cost: f64) -> f64 {
    let a = alpha.clamp(0.0, 0.999);
    (1..=8)
        .map(|k| (1.0 - a.powi(k + 1)) / ((1.0 - a) * (1.0 + k as f64 * (cost + VERIFY_GROWTH))))
        .fold(1.0, f64::max)
}

/// Sets `draft`'s skipped sublayers by `choice`, measuring on `calibration` (token ids; a few
/// hundred suffice). `verifier` gives the reference next tokens.
pub fn choose_skips(
    verifier: &Llama,
    draft: &mut Llama,
    calibration: &[u32],
    choice: &SkipChoice,
) -> Result<SkipReport> {
    if let SkipChoice::List(list) = choice {
        draft.set_skipped(list)?;
        return Ok(SkipReport {
            skipped: list.clone(),
            candidates: Vec::new(),
        });
    }
    if calibration.len() < 16 {
        return Err(Error::Mismatch(format!(
            "choosing skipped layers needs calibration text of at least 16 tokens ({} given)",
            calibration.len()
        )));
    }
    draft.set_skipped(&[])?;
    let mut order = draft.sublayer_influence(calibration)?;
    order.sort_by(|a, b| a.1.total_cmp(&b.1));
    let order: Vec<Sublayer> = order.into_iter().map(|(s, _)| s).collect();
    let want = reference_tokens(verifier, calibration)?;
    let base_cost = verifier.decode_cost().max(1.0);
    let counts: Vec<usize> = match choice {
        SkipChoice::Count(n) => vec![(*n).min(order.len())],
        _ => (0..=order.len() / 2).step_by(2).collect(),
    };
    let mut candidates = Vec::new();
    for &n in &counts {
        draft.set_skipped(&order[..n])?;
        let got = reference_tokens(draft, calibration)?;
        let agree =
            want.iter().zip(&got).filter(|(a, b)| a == b).count() as f64 / want.len() as f64;
        let cost = draft.decode_cost() / base_cost;
        candidates.push((n, agree, cost, expected_speedup(agree, cost)));
    }
    let best = candidates
        .iter()
        .max_by(|a, b| a.3.total_cmp(&b.3))
        .map_or(0, |c| c.0);
    let mut skipped = order[..best].to_vec();
    skipped.sort();
    draft.set_skipped(&skipped)?;
    Ok(SkipReport {
        skipped,
        candidates,
    })
}

/// The model's greedy next token after each prefix of `tokens`.
fn reference_tokens(model: &Llama, tokens: &[u32]) -> Result<Vec<u32>> {
    let mut cache = model.new_cache_with_limit(tokens.len())?;
    let logits = model.forward(tokens, &mut cache, Logits::All)?;
    Ok(logits.rows().map(argmax).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_the_speedup_model_prefers_agreement_and_cheapness() {
        assert_eq!(SkipChoice::parse("auto").unwrap(), SkipChoice::Auto);
        assert_eq!(SkipChoice::parse("12").unwrap(), SkipChoice::Count(12));
        assert_eq!(
            SkipChoice::parse("a3.m5").unwrap(),
            SkipChoice::List(vec![Sublayer::Attention(3), Sublayer::Mlp(5)])
        );
        assert!(SkipChoice::parse("a3,m5").is_err());
        assert!(expected_speedup(0.9, 0.3) > expected_speedup(0.7, 0.3));
        assert!(expected_speedup(0.9, 0.2) > expected_speedup(0.9, 0.5));
        // A draft that never agrees, or costs a whole step, is not worth running.
        assert_eq!(expected_speedup(0.0, 0.1), 1.0);
        assert_eq!(expected_speedup(0.5, 1.0), 1.0);
    }
}
