//! Plugging your own verifier into tandem's speculative decoder.
//!
//!     cargo run --release --example custom_verifier
//!
//! An engine implements `tandem_speculate::Verifier` (run k tokens in one forward pass, roll the
//! context back) and hands it to `SpeculativeDecoder` with any drafter, acceptance rule and
//! controller. Here the "engine" wraps tandem's own forward pass for the bundled stories260K
//! model and counts what the decoder asks of it; a real engine would call its own kernels.

use tandem_model::Checkpoint;
use tandem_speculate::{AdaptiveK, Greedy, NgramDrafter, Result, SpeculativeDecoder, Verifier};

/// Any model with a rollback-able context. This one delegates to tandem's model and records
/// how many forward calls and tokens the speculative loop needed.
struct CountingVerifier<'m> {
    inner: tandem_speculate::ModelVerifier<'m>,
    forward_calls: usize,
    tokens_run: usize,
}

impl Verifier for CountingVerifier<'_> {
    fn verify(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        self.forward_calls += 1;
        self.tokens_run += tokens.len();
        self.inner.verify(tokens)
    }
    fn rollback(&mut self, len: usize) {
        self.inner.rollback(len)
    }
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn limit(&self) -> usize {
        self.inner.limit()
    }
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    print!("{}", run()?);
    Ok(())
}

/// The whole example; returns what it prints (tests/c_abi.rs runs it in-process).
pub fn run() -> std::result::Result<String, Box<dyn std::error::Error>> {
    let ck = Checkpoint::bundled()?;
    let model = ck.load_model(&tandem_model::LoadOptions::default())?;
    let prompt = ck
        .tokenizer
        .encode("Once upon a time, there was a little dog named Max.", true)?;
    let mut verifier = CountingVerifier {
        inner: tandem_speculate::ModelVerifier::new(&model, None)?,
        forward_calls: 0,
        tokens_run: 0,
    };
    let mut decoder = SpeculativeDecoder {
        drafter: &mut NgramDrafter::default(),
        verifier: &mut verifier,
        rule: &mut Greedy,
        controller: &mut AdaptiveK::new(6),
    };
    let (tokens, stats) = decoder.generate(&prompt, 120, &ck.tokenizer.eos_ids, |_| Ok(()))?;
    Ok(format!(
        "{}\n{} tokens in {} verifier passes ({} forward calls, {} tokens run); {} of {} drafts accepted\n",
        ck.tokenizer.decode(&tokens)?,
        tokens.len(),
        stats.verifier_passes,
        verifier.forward_calls,
        verifier.tokens_run,
        stats.accepted,
        stats.drafted
    ))
}
