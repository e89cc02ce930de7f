//! Cutting a text into evaluation chunks exactly as llama-perplexity does: tokenize the whole
//! text once (with BOS where the vocabulary adds one), cut non-overlapping chunks of `ctx`
//! tokens, replace each chunk's first token by BOS (where used), and score only the positions
//! from ctx/2 on, whose predictions have at least half a context behind them.

use crate::Result;
use tandem_model::{Error, Tokenizer};

#[derive(Debug, Clone)]
pub struct Chunks {
    /// Each chunk's `ctx` tokens, ready to feed (BOS already in place).
    pub chunks: Vec<Vec<u32>>,
    /// The original tokens of each chunk (what the model must predict).
    pub targets: Vec<Vec<u32>>,
    pub ctx: usize,
    /// First position whose prediction is scored (ctx / 2).
    pub first: usize,
}

impl Chunks {
    /// `max_chunks` limits the work (llama-perplexity's `--chunks`).
    pub fn new(tok: &Tokenizer, text: &str, ctx: usize, max_chunks: Option<usize>) -> Result<Self> {
        if ctx < 4 {
            return Err(Error::Invalid(format!(
                "--ctx {ctx} is too small (at least 4)"
            )));
        }
        let tokens = tok.encode(text, tok.add_bos)?;
        let available = tokens.len() / ctx;
        if available == 0 {
            return Err(Error::Invalid(format!(
                "the text has {} tokens, fewer than one chunk of {ctx}: use a longer text or a smaller --ctx",
                tokens.len()
            )));
        }
        let n = max_chunks.map_or(available, |m| m.clamp(1, available));
        let bos = tok.bos_id.filter(|_| tok.add_bos);
        let mut chunks = Vec::with_capacity(n);
        let mut targets = Vec::with_capacity(n);
        for c in tokens.chunks_exact(ctx).take(n) {
            targets.push(c.to_vec());
            let mut input = c.to_vec();
            if let Some(b) = bos {
                input[0] = b;
            }
            chunks.push(input);
        }
        Ok(Chunks {
            chunks,
            targets,
            ctx,
            first: ctx / 2,
        })
    }

    /// Scored predictions per chunk: positions first..ctx-1 predict tokens first+1..ctx.
    pub fn scored_per_chunk(&self) -> usize {
        self.ctx - 1 - self.first
    }

    /// The tokens predicted in chunk `c`, in scoring order.
    pub fn scored_targets(&self, c: usize) -> &[u32] {
        &self.targets[c][self.first + 1..]
    }
}
