//! What commands print: generated text streamed to stdout, and the machine-readable
//! statistics (serde structs, one JSON object per line on stderr or in a file).

use anyhow::Result;
use serde::Serialize;
use std::io::Write;
use tandem_model::generate::GenerationStats;
use tandem_model::TextStream;
use tandem_speculate::SpecStats;

/// Streams a generation to stdout: the prompt, then each complete UTF-8 piece as it is decoded.
pub struct Printer<'t> {
    stream: TextStream<'t>,
    out: std::io::StdoutLock<'static>,
}

impl<'t> Printer<'t> {
    pub fn start(
        tok: &'t tandem_model::Tokenizer,
        prompt: &str,
        last: Option<u32>,
    ) -> Result<Self> {
        let mut out = std::io::stdout().lock();
        write!(out, "{prompt}")?;
        out.flush()?;
        Ok(Printer {
            stream: TextStream::with_context(tok, last),
            out,
        })
    }

    pub fn push(&mut self, id: u32) -> tandem_model::Result<()> {
        if let Some(piece) = self.stream.push(id)? {
            // A closed pipe (e.g. `| head`) ends generation rather than panicking.
            if self
                .out
                .write_all(piece.as_bytes())
                .and_then(|_| self.out.flush())
                .is_err()
            {
                return Err(tandem_model::Error::Invalid("stdout closed".into()));
            }
        }
        Ok(())
    }

    pub fn finish(mut self) -> Result<()> {
        if let Some(rest) = self.stream.finish()? {
            write!(self.out, "{rest}")?;
        }
        writeln!(self.out)?;
        Ok(())
    }
}

/// A plain generation's statistics (`generate --json`, `--logprobs`).
#[derive(Serialize)]
pub struct GenerationJson {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub time_to_first_token_s: f64,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    pub stop: &'static str,
    /// With --logprobs: each generated token's id and log-probability under the model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<f32>>,
}

impl GenerationJson {
    pub fn of(s: &GenerationStats) -> Self {
        GenerationJson {
            prompt_tokens: s.prompt_tokens,
            generated_tokens: s.generated_tokens,
            time_to_first_token_s: s.time_to_first_token().as_secs_f64(),
            prefill_tok_s: s.prefill_tok_s(),
            decode_tok_s: s.decode_tok_s(),
            stop: s.stop.name(),
            tokens: None,
            logprobs: None,
        }
    }
}

/// A speculative generation's metrics (`generate --draft --json`, each `bench spec` prompt).
#[derive(Serialize)]
pub struct SpecJson {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub drafted: usize,
    pub accepted: usize,
    pub acceptance_rate: f64,
    pub tokens_per_verifier_pass: f64,
    pub verifier_passes: usize,
    /// Per draft position: the share of drafts at that position accepted.
    pub acceptance_by_position: Vec<f64>,
    pub draft_s: f64,
    pub verify_s: f64,
    /// The prompt's prefill (all but its last token), part of the generation's time.
    pub prefill_s: f64,
    pub tok_s: f64,
    pub stop: &'static str,
    /// The draft's share of the generation's time.
    pub draft_share: f64,
    /// Token trees: verifier passes over a branching draft, their tokens, and the passes that
    /// accepted a candidate off the main chain.
    pub tree_passes: usize,
    pub tree_nodes: usize,
    pub tree_branch_wins: usize,
    /// Verifier passes by the tokens drafted into them (index): how many, and their mean ms.
    pub passes_by_drafted: Vec<PassesJson>,
    /// `bench spec` at temperature 0: whether the output equals plain greedy decoding's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub same_as_plain: Option<bool>,
    /// `bench spec`: the prompt, and plain decoding's rate on it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plain_tok_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speedup: Option<f64>,
}

/// Verifier passes after one drafted count: how many, and their mean time.
#[derive(Serialize)]
pub struct PassesJson {
    pub passes: usize,
    pub mean_ms: f64,
}

impl PassesJson {
    /// From (passes, seconds) per drafted count.
    pub fn of(by_drafted: &[(usize, f64)]) -> Vec<PassesJson> {
        by_drafted
            .iter()
            .map(|&(passes, secs)| PassesJson {
                passes,
                mean_ms: 1e3 * secs / passes.max(1) as f64,
            })
            .collect()
    }
}

impl SpecJson {
    pub fn of(st: &SpecStats) -> Self {
        SpecJson {
            prompt_tokens: st.prompt_tokens,
            generated_tokens: st.generated_tokens,
            drafted: st.drafted,
            accepted: st.accepted,
            acceptance_rate: st.acceptance_rate(),
            tokens_per_verifier_pass: st.tokens_per_pass(),
            verifier_passes: st.verifier_passes,
            acceptance_by_position: st
                .by_position
                .iter()
                .map(|(d, acc)| *acc as f64 / (*d).max(1) as f64)
                .collect(),
            draft_s: st.draft_secs,
            verify_s: st.verify_secs,
            prefill_s: st.prefill_secs,
            tok_s: st.generated_tokens as f64 / st.total_secs.max(1e-9),
            stop: st.stop.name(),
            draft_share: st.draft_secs / st.total_secs.max(1e-9),
            tree_passes: st.tree_passes,
            tree_nodes: st.tree_nodes,
            tree_branch_wins: st.tree_branch_wins,
            passes_by_drafted: PassesJson::of(&st.passes_by_drafted),
            same_as_plain: None,
            prompt: None,
            plain_tok_s: None,
            speedup: None,
        }
    }
}

/// Writes `doc` as pretty JSON to `path`, atomically.
pub fn write_json(path: &std::path::Path, doc: &impl Serialize) -> Result<()> {
    tandem_model::export::write_file_atomically(path, true, |w| -> Result<()> {
        serde_json::to_writer_pretty(&mut *w, doc)?;
        Ok(())
    })?;
    Ok(())
}
