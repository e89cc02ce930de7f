//! Times one decoding step of a model through each kind of head rows (`HeadRows`): every
//! logit, the argmax, a plain-temperature draw, a top-k distribution; each a one-token step
//! after a fixed context, the cache cut back after each, best and median of many steps.
//!
//!     cargo run --release -p tandem-model --example head_reads -- MODEL [THREADS] [CONTEXT]

use std::time::Instant;
use tandem_model::{Checkpoint, HeadRows, LoadOptions, Logits, SamplingParams};

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
    let prompt: Vec<u32> = (0..context as u32).map(|i| 100 + (i * 37) % 5000).collect();
    let mut cache = model.new_cache()?;
    model.forward(&prompt, &mut cache, Logits::Last)?;
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
    for round in 0..60 {
        for (i, (_, reads)) in kinds.iter().enumerate() {
            let t0 = Instant::now();
            model.forward_with(&[42 + round], &mut cache, Logits::Last, *reads)?;
            times[i].push(t0.elapsed().as_secs_f64() * 1e3);
            cache.truncate(context);
        }
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
