//! Self-generated calibration ("self-calibration"): the model being quantized answers a
//! bundled set of varied requests — in its own chat template when it has one — by sampling,
//! and those tokens become calibration chunks beside (or instead of) a calibration text.
//!
//! Why: GPTQ fits each layer to the activations it sees, so a single narrow text (the bundled
//! opening of *Emma*) fits the layers to 19th-century narrative. The model's own answers cover
//! what it was trained to produce — explanations, lists, code, stories — without anyone
//! choosing an evaluation-like corpus, and they never touch evaluation text. On SmolLM2 with
//! q4_0 MLP weights this took wikitext-2's mean KLD from 0.083 (Emma alone) to 0.071 (Emma and
//! 16k self-generated tokens); see BENCHMARKS.md.
//!
//! The answers are generated in batches (one forward pass runs every open answer's next token,
//! so each weight is read once per step for the whole batch), sampled with a fixed seed per
//! request: the same model and options give the same tokens, which the GGUF records by hash.

use crate::error::{Error, Result};
use tandem_model::chat::{ChatTemplate, Message};
use tandem_model::llama::{KvCache, Logits};
use tandem_model::sampling::{Sampler, SamplingParams};
use tandem_model::{Checkpoint, LoadOptions};

/// The bundled requests, one per line: varied tasks and topics, written for this purpose and
/// not taken from any evaluation set.
pub const SELF_CALIBRATION_PROMPTS: &str = include_str!("../data/self-calibration-prompts.txt");

/// How the model's own calibration text is generated.
#[derive(Debug, Clone, PartialEq)]
pub struct SelfCalibration {
    /// Answer tokens to collect.
    pub tokens: usize,
    /// Most new tokens per answer.
    pub max_answer: usize,
    /// Answers generated side by side in one forward pass.
    pub batch: usize,
    pub temperature: f32,
    pub top_p: f32,
    /// Request i is sampled with seed `seed + i`.
    pub seed: u64,
    /// Also write the answers' text here (`--calib-self-save`), replacing an existing file
    /// only with `save_force`.
    pub save_text: Option<std::path::PathBuf>,
    pub save_force: bool,
}

impl SelfCalibration {
    /// `tokens` tokens with the defaults the measurements in BENCHMARKS.md used.
    pub fn new(tokens: usize) -> Self {
        SelfCalibration {
            tokens,
            max_answer: 512,
            batch: 16,
            temperature: 0.8,
            top_p: 0.95,
            seed: 1,
            save_text: None,
            save_force: false,
        }
    }
}

/// The bundled requests as the model reads them: rendered by its chat template (a user turn
/// and the assistant's opening), or as plain text after BOS for a model without a template.
fn request_tokens(ck: &Checkpoint) -> Result<Vec<Vec<u32>>> {
    let tok = &ck.tokenizer;
    let template = match tok.chat_template {
        Some(_) => Some(ChatTemplate::for_checkpoint(ck, None)?),
        None => None,
    };
    SELF_CALIBRATION_PROMPTS
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|p| {
            Ok(match &template {
                // The rendered template carries its own BOS where the model wants one.
                Some(t) => tok.encode(&t.render(&[Message::new("user", p)], true)?, false)?,
                None => tok.encode(p, tok.add_bos)?,
            })
        })
        .collect()
}

/// One answer being generated.
struct Answer {
    /// The request's tokens, then the answer's.
    tokens: Vec<u32>,
    request_len: usize,
    cache: KvCache,
    sampler: Sampler,
    /// Tokens the next forward pass runs (the whole request first, then the last token).
    pending: Vec<u32>,
}

impl Answer {
    fn answer(&self) -> &[u32] {
        &self.tokens[self.request_len..]
    }
    fn answer_len(&self) -> usize {
        self.tokens.len() - self.request_len
    }
}

/// Generates `opts.tokens` tokens of the model's own answers to the bundled requests (cycling
/// through them, each with its own seed) and returns them as one stream: each answer, then the
/// end-of-sequence token where it ended; the answers still open when enough are collected end
/// there. The requests themselves are left out: rendered in a chat template they repeat the
/// same system prompt dozens of times, which skewed the attention layers' statistics (SmolLM2
/// everything-q4_0 GPTQ: wikitext-2 mean KLD 0.209 with them, 0.182 without, 0.191 on Emma
/// alone; see BENCHMARKS.md). `progress(done, target)` is called after every step.
pub fn generate(
    ck: &Checkpoint,
    opts: &SelfCalibration,
    load: &LoadOptions,
    progress: &dyn Fn(usize, usize),
) -> Result<Vec<u32>> {
    if opts.tokens == 0 {
        return Ok(Vec::new());
    }
    if opts.batch == 0 || opts.max_answer == 0 {
        return Err(Error::Plan(
            "self-calibration needs a batch and an answer length above 0".into(),
        ));
    }
    let requests = request_tokens(ck)?;
    if requests.is_empty() {
        return Err(Error::Plan("no self-calibration requests".into()));
    }
    // The generator is the model rounded to q8_0 (attention too): its int8 kernels run a
    // batch about twice as fast as the 16-bit weights, and its distribution is the 16-bit
    // model's to within a mean KLD of ~0.003 — far below what sampling at 0.8 spreads.
    let generator = crate::quantized_copy(ck, crate::QuantType::Q8_0, true)?;
    let model = generator.load_model(load)?;
    let eos = &ck.tokenizer.eos_ids;
    // The reservation is capped: `opts.tokens` is a caller's number, checked by
    // `job::set_self_calibration` but not by every library caller.
    let mut out: Vec<u32> =
        Vec::with_capacity(opts.tokens.saturating_add(opts.max_answer).min(1 << 20));
    let mut open: Vec<Answer> = Vec::new();
    let mut started = 0usize;
    loop {
        // Answer tokens collected so far, finished answers and open ones.
        let total = out.len() + open.iter().map(Answer::answer_len).sum::<usize>();
        if total >= opts.tokens {
            // Enough: the open answers end where they are.
            for a in open {
                out.extend_from_slice(a.answer());
            }
            break;
        }
        if open.len() < opts.batch {
            let request = &requests[started % requests.len()];
            let limit = (request.len() + opts.max_answer).min(model.config.context_length());
            if request.len() >= limit {
                return Err(Error::Plan(format!(
                    "self-calibration request {} has {} tokens, no room to answer in the model's context of {}",
                    started % requests.len(),
                    request.len(),
                    limit
                )));
            }
            let sampler = Sampler::new(SamplingParams {
                temperature: opts.temperature,
                top_k: 0,
                top_p: opts.top_p,
                seed: opts.seed.wrapping_add(started as u64),
            })
            .map_err(|e| Error::Plan(format!("self-calibration sampling: {e}")))?;
            open.push(Answer {
                tokens: request.clone(),
                request_len: request.len(),
                cache: model.new_cache_with_limit(limit)?,
                sampler,
                pending: request.clone(),
            });
            started += 1;
            continue;
        }
        let rows = {
            let mut seqs: Vec<(&[u32], &mut KvCache)> = open
                .iter_mut()
                .map(|a| (a.pending.as_slice(), &mut a.cache))
                .collect();
            model.forward_batch(&mut seqs, Logits::Last)?
        };
        let mut still_open = Vec::with_capacity(open.len());
        for (mut a, row) in open.into_iter().zip(rows) {
            // Drawn by position, as `generate` draws: each answer is what plain sampling with
            // its seed gives, whatever else shares the batch.
            let next = a.sampler.sample_at(row.last(), a.cache.len());
            a.tokens.push(next);
            let ended = eos.contains(&next)
                || a.answer_len() >= opts.max_answer
                || a.cache.len() + 1 > a.cache.limit();
            if ended {
                out.extend_from_slice(a.answer());
            } else {
                a.pending.clear();
                a.pending.push(next);
                still_open.push(a);
            }
        }
        open = still_open;
        progress(out.len().min(opts.tokens), opts.tokens);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the bundled stories260K (no chat template: requests as text after BOS): the stream
    /// is the answers alone, as many tokens as asked for, reproducible, and each one follows
    /// its request (the first answer is what sampling request 0 alone, with the first seed,
    /// gives).
    #[test]
    fn generates_answers_reproducibly() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/stories260K");
        let ck = Checkpoint::open(&dir, None).unwrap();
        let load = LoadOptions::default().with_threads(Some(2));
        let mut opts = SelfCalibration::new(600);
        opts.max_answer = 40;
        opts.batch = 4;
        let a = generate(&ck, &opts, &load, &|_, _| ()).unwrap();
        assert_eq!(
            a,
            generate(&ck, &opts, &load, &|_, _| ()).unwrap(),
            "not reproducible"
        );
        // Each step adds a token to every open answer, so the stream may pass the target by
        // less than a batch.
        assert!(
            (600..600 + opts.batch).contains(&a.len()),
            "{} tokens",
            a.len()
        );
        // The first answer is request 0's, sampled with the first seed, one at a time.
        let requests = request_tokens(&ck).unwrap();
        let model = crate::quantized_copy(&ck, crate::QuantType::Q8_0, true)
            .unwrap()
            .load_model(&load)
            .unwrap();
        let mut cache = model.new_cache().unwrap();
        let mut sampler = Sampler::new(SamplingParams {
            temperature: opts.temperature,
            top_k: 0,
            top_p: opts.top_p,
            seed: opts.seed,
        })
        .unwrap();
        let (first, _) = tandem_model::generate::generate(
            &model,
            &mut cache,
            &requests[0],
            opts.max_answer,
            &mut sampler,
            &ck.tokenizer.eos_ids,
            |_| Ok(()),
        )
        .unwrap();
        assert!(!first.is_empty());
        assert_eq!(&a[..first.len()], &first[..]);
        // Another seed, another stream.
        opts.seed = 7;
        assert_ne!(a, generate(&ck, &opts, &load, &|_, _| ()).unwrap());
    }

    #[test]
    fn the_bundled_requests_are_varied_and_many() {
        let lines: Vec<&str> = SELF_CALIBRATION_PROMPTS
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert!(lines.len() >= 40, "{} requests", lines.len());
        let distinct: std::collections::BTreeSet<&str> = lines.iter().copied().collect();
        assert_eq!(distinct.len(), lines.len(), "a request is repeated");
    }
}
