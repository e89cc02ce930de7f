//! Times one decoding step of a model through each kind of head rows (`HeadRows`): every
//! logit, the argmax, a plain-temperature draw, a top-k distribution; each a one-token step
//! after a fixed context, the cache cut back after each, best and median of many steps.
//!
//!     cargo run --release -p tandem-model --example head_reads -- MODEL [THREADS] [CONTEXT]
//!
//! The context is a chat answer, as decoding sees one: an instruction in the model's chat
//! template (where it has one) continued greedily to CONTEXT tokens, then each round times
//! one step per kind at the answer's next position. (A context of arbitrary token ids gives flat rows whose
//! draws have far more candidates than real text does.)

use std::time::Instant;
use tandem_model::chat::{ChatTemplate, Message};
use tandem_model::{argmax, Checkpoint, HeadRows, LoadOptions, Logits, SamplingParams};

const INSTRUCTION: &str = "Write a short story about a robot who learns to paint.";

fn main() -> tandem_model::Result<()> {
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next() else {
        eprintln!("usage: head_reads MODEL [THREADS] [CONTEXT]");
        std::process::exit(2);
    };
    let threads: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(2);
    let context: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(128);
    tandem_kernels::pool::set_threads(threads);
    let ck = Checkpoint::open(std::path::Path::new(&path), None)?;
    let model = ck.load_model(&LoadOptions::default())?;
    model.prepare_greedy_head()?;
    let text = match ChatTemplate::for_checkpoint(&ck, None) {
        Ok(t) => t.render(&[Message::new("user", INSTRUCTION)], true)?,
        Err(_) => INSTRUCTION.to_string(),
    };
    let mut tokens = ck.tokenizer.encode(&text, ck.tokenizer.add_bos)?;
    let mut cache = model.new_cache()?;
    let mut next = argmax(model.forward(&tokens, &mut cache, Logits::Last)?.last());
    // The answer greedily to `context` tokens, and 60 more to feed the timed steps.
    let steps = 60;
    while tokens.len() < context + steps {
        tokens.push(next);
        next = argmax(
            model
                .forward_with(&[next], &mut cache, Logits::Last, HeadRows::Argmax)?
                .last(),
        );
    }
    let context = context.min(tokens.len() - steps);
    cache.truncate(context);
    let sampled = |top_k| SamplingParams {
        temperature: 0.8,
        top_k,
        top_p: if top_k > 0 { 0.95 } else { 1.0 },
        seed: 1,
    };
    let kinds = [
        ("every logit", HeadRows::All),
        ("argmax", HeadRows::Argmax),
        ("T 0.8 draw", HeadRows::for_draws(&sampled(0))),
        ("top-k 40", HeadRows::for_draws(&sampled(40))),
    ];
    let mut times = vec![Vec::new(); kinds.len()];
    for round in 0..steps {
        let step = tokens[context + round];
        for (i, (_, reads)) in kinds.iter().enumerate() {
            let t0 = Instant::now();
            model.forward_with(&[step], &mut cache, Logits::Last, *reads)?;
            times[i].push(t0.elapsed().as_secs_f64() * 1e3);
            cache.truncate(context + round);
        }
        // On to the answer's next position (untimed).
        model.forward_with(&[step], &mut cache, Logits::Last, HeadRows::Argmax)?;
    }
    for ((name, _), t) in kinds.iter().zip(&mut times) {
        t.sort_by(f64::total_cmp);
        println!(
            "{name:12} best {:.2} ms, median {:.2} ms",
            t[0],
            t[t.len() / 2]
        );
    }
    Ok(())
}
