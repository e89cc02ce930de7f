//! The forward pass through its public interface, on the bundled stories260K model: what the
//! load options change (and what they must not), the logit rows a call returns, and what the
//! observer and the profiler see.

use std::cell::RefCell;
use std::path::PathBuf;
use tandem_model::{
    ActivationObserver, Checkpoint, HeadRows, Llama, LoadOptions, Logits, Sampler, SamplingParams,
};

fn stories() -> Checkpoint {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/stories260K");
    Checkpoint::open(&p, None).expect("the bundled model opens")
}

fn prompt(ck: &Checkpoint) -> Vec<u32> {
    ck.tokenizer
        .encode("Once upon a time, there was a little dog", true)
        .expect("encodes")
}

fn all_logits(m: &Llama, toks: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = m.new_cache().expect("cache");
    m.forward(toks, &mut cache, Logits::All)
        .expect("forward")
        .to_vecs()
}

#[test]
fn thread_count_does_not_change_the_logits() {
    let ck = stories();
    let toks = prompt(&ck);
    let one = ck
        .load_model(&LoadOptions::default().with_threads(Some(1)))
        .expect("loads");
    let two = ck
        .load_model(&LoadOptions::default().with_threads(Some(2)))
        .expect("loads");
    assert_eq!(all_logits(&one, &toks), all_logits(&two, &toks));
}

#[test]
fn logit_rows_are_one_per_position_and_last_is_the_last() {
    let ck = stories();
    let m = ck.load_model(&LoadOptions::default()).expect("loads");
    let toks = prompt(&ck);
    let mut cache = m.new_cache().expect("cache");
    let all = m.forward(&toks, &mut cache, Logits::All).expect("forward");
    assert_eq!(all.len(), toks.len());
    assert_eq!(all.vocab(), m.config.vocab_size);
    assert_eq!(all.rows().count(), toks.len());
    let mut cache = m.new_cache().expect("cache");
    let last = m.forward(&toks, &mut cache, Logits::Last).expect("forward");
    assert_eq!(last.len(), 1);
    assert_eq!(last.last(), all.last());
    assert_eq!(cache.len(), toks.len());
}

struct Seen(RefCell<Vec<(String, usize)>>);

impl ActivationObserver for Seen {
    fn observe(&self, weights: &[String], x: &candle_core::Tensor) -> tandem_model::Result<()> {
        let rows = x.dims()[0];
        for w in weights {
            self.0.borrow_mut().push((w.clone(), rows));
        }
        Ok(())
    }
}

#[test]
fn observer_sees_every_linear_input_and_profile_times_every_op() {
    let ck = stories();
    let m = ck.load_model(&LoadOptions::default()).expect("loads");
    let toks = prompt(&ck);
    let seen = Seen(RefCell::new(Vec::new()));
    m.start_profile();
    let mut cache = m.new_cache().expect("cache");
    m.forward_observed(&toks, &mut cache, Logits::Last, Some(&seen))
        .expect("forward");
    let profile = m.take_profile().expect("profiled");
    let seen = seen.0.into_inner();
    // 7 linear layers per decoder layer, and the head (which sees the one row it computes).
    assert_eq!(seen.len(), 7 * m.config.num_hidden_layers + 1);
    assert!(seen[..seen.len() - 1].iter().all(|(_, r)| *r == toks.len()));
    assert_eq!(seen.last(), Some(&("lm_head.weight".to_string(), 1)));
    assert_eq!(profile.calls, 1);
    for op in [
        "embed",
        "norm",
        "q/k/v matmul",
        "rope",
        "attention",
        "down matmul",
    ] {
        assert!(profile.ops.iter().any(|(o, _)| *o == op), "{op} not timed");
    }
}

/// A token tree's rows are bit for bit the logits of decoding each node's path plainly, and
/// after keeping one path the cache continues exactly as if that path had been decoded.
#[test]
fn a_token_tree_scores_every_path_as_plain_decoding_would() {
    let ck = stories();
    let m = ck.load_model(&LoadOptions::default()).expect("loads");
    let toks = prompt(&ck);
    // root 0; 1, 2 under it; 3 under 1; 4 under 2; 5 under 3; 6 a second root.
    let tree: [u32; 7] = [10, 20, 30, 40, 50, 60, 70];
    let parents = [None, Some(0), Some(0), Some(1), Some(2), Some(3), None];
    let paths: [&[usize]; 7] = [
        &[0],
        &[0, 1],
        &[0, 2],
        &[0, 1, 3],
        &[0, 2, 4],
        &[0, 1, 3, 5],
        &[6],
    ];
    let mut cache = m.new_cache().expect("cache");
    m.forward(&toks, &mut cache, Logits::Last).expect("prefill");
    let base = cache.len();
    let rows = m.forward_tree(&tree, &parents, &mut cache).expect("tree");
    assert_eq!(rows.len(), tree.len());
    assert_eq!(cache.len(), base + tree.len());
    for (i, path) in paths.iter().enumerate() {
        let mut plain = m.new_cache().expect("cache");
        m.forward(&toks, &mut plain, Logits::Last).expect("prefill");
        let path_tokens: Vec<u32> = path.iter().map(|&j| tree[j]).collect();
        let want = m
            .forward(&path_tokens, &mut plain, Logits::All)
            .expect("path");
        assert_eq!(rows.row(i), want.last(), "node {i}");
    }
    // Keep the path 0 → 2 → 4, then decode one more token over it.
    m.keep_cache_rows(&mut cache, base, &[0, 2, 4])
        .expect("keeps");
    assert_eq!(cache.len(), base + 3);
    let next = m.forward(&[99], &mut cache, Logits::Last).expect("next");
    let mut plain = m.new_cache().expect("cache");
    m.forward(&toks, &mut plain, Logits::Last).expect("prefill");
    let want = m
        .forward(&[10, 30, 50, 99], &mut plain, Logits::Last)
        .expect("plain");
    assert_eq!(next.last(), want.last());
    // Bad trees and rows are errors, not panics.
    assert!(m
        .forward_tree(&[1, 2], &[None, Some(1)], &mut cache)
        .is_err());
    assert!(m.forward_tree(&[1, 2], &[None], &mut cache).is_err());
    assert!(m.keep_cache_rows(&mut cache, base, &[2, 1]).is_err());
    assert!(m.keep_cache_rows(&mut cache, base, &[0, 40]).is_err());
}

/// A skipped sublayer leaves the residual stream alone: the logits change, the KV cache keeps
/// its layout, and clearing the list gives the whole model's logits back bit for bit.
#[test]
fn skipping_sublayers_changes_the_model_and_clearing_restores_it() {
    use tandem_model::Sublayer;
    let ck = stories();
    let mut m = ck.load_model(&LoadOptions::default()).expect("loads");
    let toks = prompt(&ck);
    let whole = all_logits(&m, &toks);
    let influence = m.sublayer_influence(&toks).expect("influence");
    assert_eq!(influence.len(), 2 * m.config.num_hidden_layers);
    assert!(influence.iter().all(|&(_, i)| (0.0..=2.0).contains(&i)));
    let cost = m.decode_cost();
    m.set_skipped(&[Sublayer::Mlp(1), Sublayer::Attention(2)])
        .expect("skips");
    assert_eq!(m.skipped(), vec![Sublayer::Mlp(1), Sublayer::Attention(2)]);
    assert!(m.decode_cost() < cost, "skipped weights are not read");
    assert_ne!(all_logits(&m, &toks), whole);
    m.set_skipped(&[]).expect("clears");
    assert_eq!(all_logits(&m, &toks), whole);
    assert!(m.set_skipped(&[Sublayer::Mlp(99)]).is_err());
    assert_eq!("m7".parse::<Sublayer>().ok(), Some(Sublayer::Mlp(7)));
    assert!("q7".parse::<Sublayer>().is_err() && "a".parse::<Sublayer>().is_err());
}

/// The greedy head (a Q8_0 screen of the 16-bit head, only the candidates multiplied) gives
/// every row the full head's argmax, and its finite values are the full head's bit for bit:
/// over a prompt, in greedy decoding, and over a token tree.
#[test]
fn greedy_rows_have_the_full_heads_argmax_and_values() {
    let ck = stories();
    let m = ck.load_model(&LoadOptions::default()).expect("loads");
    let toks = ck
        .tokenizer
        .encode(
            "Once upon a time, there was a little dog named Max. He liked to run in the park \
             with his friend, a big red ball. One day",
            true,
        )
        .expect("encodes");
    let check = |full: &tandem_model::LogitRows, greedy: &tandem_model::LogitRows| {
        assert_eq!(full.len(), greedy.len());
        for (f, g) in full.rows().zip(greedy.rows()) {
            assert_eq!(tandem_model::argmax(f), tandem_model::argmax(g));
            let kept = g.iter().filter(|v| v.is_finite()).count();
            assert!(kept >= 1 && kept < f.len(), "{kept} of {} kept", f.len());
            for (a, b) in f.iter().zip(g) {
                assert!(*b == f32::NEG_INFINITY || a.to_bits() == b.to_bits());
            }
        }
    };
    let (mut c1, mut c2) = (m.new_cache().expect("cache"), m.new_cache().expect("cache"));
    let full = m.forward(&toks, &mut c1, Logits::All).expect("forward");
    let greedy = m
        .forward_with(&toks, &mut c2, Logits::All, HeadRows::Argmax)
        .expect("greedy");
    check(&full, &greedy);
    // Thirty greedy steps on each head: the same tokens.
    let mut next = tandem_model::argmax(full.last());
    for _ in 0..30 {
        let f = m.forward(&[next], &mut c1, Logits::Last).expect("forward");
        let g = m
            .forward_with(&[next], &mut c2, Logits::Last, HeadRows::Argmax)
            .expect("greedy");
        check(&f, &g);
        next = tandem_model::argmax(f.last());
    }
    // A tree of two branches after the context.
    let (tree, parents) = ([next, 5, 9, 7], [None, Some(0), Some(0), Some(2)]);
    let base = c1.len();
    let f = m.forward_tree(&tree, &parents, &mut c1).expect("tree");
    let g = m
        .forward_tree_with(&tree, &parents, &mut c2, HeadRows::Argmax)
        .expect("greedy tree");
    check(&f, &g);
    assert_eq!(c1.len(), base + tree.len());
    // Two sequences in one batch.
    let (a, b) = (&toks[..9], &toks[4..]);
    let (mut ca, mut cb) = (m.new_cache().expect("cache"), m.new_cache().expect("cache"));
    let full = m
        .forward_batch(&mut [(a, &mut ca), (b, &mut cb)], Logits::All)
        .expect("batch");
    let (mut ca, mut cb) = (m.new_cache().expect("cache"), m.new_cache().expect("cache"));
    let greedy = m
        .forward_batch_with(
            &mut [(a, &mut ca), (b, &mut cb)],
            Logits::All,
            HeadRows::Argmax,
        )
        .expect("greedy batch");
    for (f, g) in full.iter().zip(&greedy) {
        check(f, g);
    }
    let st = m.greedy_head_stats().expect("the F16 head is screened");
    assert_eq!(st.fallbacks, 0, "{st:?}");
    assert_eq!(
        st.rows as usize,
        toks.len() + 30 + tree.len() + a.len() + b.len()
    );
}

/// Rows for sampled draws (the screen keeps every token that can be a row's position-keyed
/// draw, or be among its top k) give `Sampler::sample_at` the full head's draw at the index
/// after each row's token, at several temperatures, with and without top-k: over a prompt, in sampled decoding, over a token tree (a row's
/// index follows its depth) and in a batch. A head that kept only the argmax's candidates
/// fails this (the draws differ from the argmax at these temperatures).
#[test]
fn draw_rows_give_the_full_heads_draws() {
    use tandem_model::sampling::DrawNoise;
    let ck = stories();
    let m = ck.load_model(&LoadOptions::default()).expect("loads");
    let toks = ck
        .tokenizer
        .encode("Lily found a shiny stone in the garden. She", true)
        .expect("encodes");
    let mut differs_from_argmax = 0;
    for (temperature, seed, top_k, top_p) in [
        (0.7f32, 1u64, 0, 1.0f32),
        (1.0, 2, 0, 1.0),
        (0.3, 3, 0, 1.0),
        (1.5, 4, 0, 1.0),
        (2.5, 5, 0, 1.0),
        (0.8, 6, 40, 0.95),
        (1.2, 7, 10, 1.0),
    ] {
        let params = SamplingParams {
            temperature,
            seed,
            top_k,
            top_p,
        };
        let reads = HeadRows::for_draws(&params);
        if top_k > 0 {
            assert_eq!(reads, HeadRows::TopK(top_k));
        } else {
            assert_eq!(
                reads,
                HeadRows::Draw(DrawNoise::of(&params).expect("plain"))
            );
        }
        let sampler = Sampler::new(params).expect("sampler");
        // Row r of `full`/`draw` decides sequence index `indices[r]`.
        let mut check =
            |full: &tandem_model::LogitRows, draw: &tandem_model::LogitRows, indices: &[usize]| {
                assert_eq!(full.len(), indices.len());
                for ((f, d), &at) in full.rows().zip(draw.rows()).zip(indices) {
                    let want = sampler.sample_at(f, at);
                    assert_eq!(
                        want,
                        sampler.sample_at(d, at),
                        "T {temperature}, index {at}"
                    );
                    differs_from_argmax += usize::from(want != tandem_model::argmax(f));
                    assert_eq!(tandem_model::argmax(f), tandem_model::argmax(d));
                    for (a, b) in f.iter().zip(d) {
                        assert!(*b == f32::NEG_INFINITY || a.to_bits() == b.to_bits());
                    }
                }
            };
        let (mut c1, mut c2) = (m.new_cache().expect("cache"), m.new_cache().expect("cache"));
        let full = m.forward(&toks, &mut c1, Logits::All).expect("forward");
        let draw = m
            .forward_with(&toks, &mut c2, Logits::All, reads)
            .expect("draw rows");
        check(&full, &draw, &(1..=toks.len()).collect::<Vec<_>>());
        let mut next = sampler.sample_at(full.last(), c1.len());
        for _ in 0..20 {
            let f = m.forward(&[next], &mut c1, Logits::Last).expect("forward");
            let d = m
                .forward_with(&[next], &mut c2, Logits::Last, reads)
                .expect("draw rows");
            check(&f, &d, &[c1.len()]);
            next = sampler.sample_at(f.last(), c1.len());
        }
        let (tree, parents) = ([next, 5, 9, 7], [None, Some(0), Some(0), Some(2)]);
        let base = c1.len();
        let f = m.forward_tree(&tree, &parents, &mut c1).expect("tree");
        let d = m
            .forward_tree_with(&tree, &parents, &mut c2, reads)
            .expect("draw tree");
        // Depths 0, 1, 1, 2: each row decides the index after its own token.
        check(&f, &d, &[base + 1, base + 2, base + 2, base + 3]);
        let (a, b) = (&toks[..5], &toks[3..]);
        let (mut ca, mut cb) = (m.new_cache().expect("cache"), m.new_cache().expect("cache"));
        let full = m
            .forward_batch(&mut [(a, &mut ca), (b, &mut cb)], Logits::All)
            .expect("batch");
        let (mut ca, mut cb) = (m.new_cache().expect("cache"), m.new_cache().expect("cache"));
        let draw = m
            .forward_batch_with(&mut [(a, &mut ca), (b, &mut cb)], Logits::All, reads)
            .expect("draw batch");
        check(&full[0], &draw[0], &(1..=a.len()).collect::<Vec<_>>());
        check(&full[1], &draw[1], &(1..=b.len()).collect::<Vec<_>>());
    }
    assert!(differs_from_argmax > 10, "{differs_from_argmax}");
    let st = m.greedy_head_stats().expect("the F16 head is screened");
    assert!(st.fallbacks < st.rows, "{st:?}");
}
