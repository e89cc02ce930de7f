//! One forward call serves prefill, decode and k-token verification: feeding a prompt in one
//! chunk, token by token, or in random chunks must give the same logits, and rolling the cache
//! back with `truncate` then re-feeding must equal a fresh run.

use crate::common::*;
use rand::{Rng, SeedableRng};
use std::path::Path;
use tandem_model::{Checkpoint, Error, Logits};

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

fn check_chunking(model: &Path, text: &str) {
    let ck = Checkpoint::open(model, None).unwrap();
    let m = ck
        .load_model(&tandem_model::LoadOptions::default())
        .unwrap();
    let toks = ck.tokenizer.encode(text, true).unwrap();
    let n = toks.len();
    assert!(n > 20, "test text too short");
    let whole = logits_in_chunks(&m, &toks, &[n]);
    let singles = logits_in_chunks(&m, &toks, &vec![1; n]);
    assert!(
        max_diff(&whole, &singles) <= 1e-4,
        "token by token: {}",
        max_diff(&whole, &singles)
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for _ in 0..3 {
        let mut chunks = Vec::new();
        let mut left = n;
        while left > 0 {
            let c = rng.random_range(1..=left.min(9));
            chunks.push(c);
            left -= c;
        }
        let d = max_diff(&whole, &logits_in_chunks(&m, &toks, &chunks));
        assert!(d <= 1e-4, "chunks {chunks:?}: {d}");
    }
    // Roll back and re-feed different tokens, then the original ones.
    let mut cache = m.new_cache().unwrap();
    m.forward(&toks, &mut cache, Logits::All).unwrap();
    for cut in [n / 2, 3, n - 1] {
        cache.truncate(cut);
        assert_eq!(cache.len(), cut);
        let junk: Vec<u32> = toks[..(n - cut).min(4)].to_vec();
        m.forward(&junk, &mut cache, Logits::All).unwrap();
        cache.truncate(cut);
        let l: Vec<Vec<f32>> = m
            .forward(&toks[cut..], &mut cache, Logits::All)
            .unwrap()
            .to_vecs();
        let d = max_diff(&whole[cut..], &l);
        assert!(d <= 1e-4, "after truncate({cut}): {d}");
    }
}

#[test]
fn stories260k_chunking_and_rollback_are_exact() {
    check_chunking(&stories(), "Once upon a time, there was a little girl named Lily. She loved to play outside with her friends in the park.");
}

#[test]
fn smollm2_chunking_and_rollback_are_exact() {
    check_chunking(&smollm2_f16(), "Speculative decoding lets a small draft model propose several tokens that a large verifier model then checks in one forward pass, keeping the longest prefix it agrees with.");
}

#[test]
fn context_overflow_is_an_error_not_a_panic() {
    let ck = Checkpoint::open(&stories(), None).unwrap();
    let m = ck
        .load_model(&tandem_model::LoadOptions::default())
        .unwrap();
    let mut cache = m.new_cache_with_limit(8).unwrap();
    m.forward(&[1, 2, 3, 4, 5, 6], &mut cache, Logits::All)
        .unwrap();
    match m.forward(&[1, 2, 3], &mut cache, Logits::All) {
        Err(Error::ContextFull {
            needed: 9,
            limit: 8,
        }) => {}
        other => panic!("expected ContextFull, got {:?}", other.map(|_| ())),
    }
    assert_eq!(cache.len(), 6, "a refused call leaves the cache as it was");
    // The full model context: 512 positions for stories260K.
    let mut cache = m.new_cache().unwrap();
    let toks = vec![5u32; 512];
    m.forward(&toks, &mut cache, Logits::Last).unwrap();
    assert!(matches!(
        m.forward(&[5], &mut cache, Logits::Last),
        Err(Error::ContextFull { .. })
    ));
    assert!(
        m.forward(&[600], &mut m.new_cache().unwrap(), Logits::Last)
            .is_err(),
        "out-of-vocabulary id"
    );
}

/// A batch of sequences in one forward pass gives each sequence the logits it gets alone.
#[test]
fn batched_forward_equals_one_sequence_at_a_time() {
    for dir in [stories(), smollm2_f16()] {
        let ck = tandem_model::Checkpoint::open(&dir, None).unwrap();
        let m = ck
            .load_model(&tandem_model::LoadOptions::default())
            .unwrap();
        let texts = [
            "Once upon a time, there was",
            "The little dog",
            "Tom and Sue went to the park. They saw a big",
        ];
        let ids: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| ck.tokenizer.encode(t, true).unwrap())
            .collect();
        let mut caches: Vec<tandem_model::KvCache> =
            ids.iter().map(|_| m.new_cache().unwrap()).collect();
        let mut alone: Vec<tandem_model::KvCache> =
            ids.iter().map(|_| m.new_cache().unwrap()).collect();
        // Prefill all three at once (different lengths), then two steps of 1 and 3 tokens.
        let steps: Vec<Vec<Vec<u32>>> = vec![
            ids.clone(),
            vec![vec![5], vec![7, 8, 9], vec![11]],
            vec![vec![13, 14, 15], vec![16], vec![17, 18]],
        ];
        for step in steps {
            let mut batch: Vec<(&[u32], &mut tandem_model::KvCache)> = step
                .iter()
                .map(|t| t.as_slice())
                .zip(caches.iter_mut())
                .collect();
            let got = m
                .forward_batch(&mut batch, tandem_model::Logits::All)
                .unwrap();
            for ((t, cache), g) in step.iter().zip(alone.iter_mut()).zip(&got) {
                let want: Vec<Vec<f32>> = m
                    .forward(t, cache, tandem_model::Logits::All)
                    .unwrap()
                    .to_vecs();
                let g: Vec<Vec<f32>> = g.to_vecs();
                assert_eq!(g, want, "{}: batched logits differ", dir.display());
            }
        }
        assert!(caches.iter().zip(&alone).all(|(a, b)| a.len() == b.len()));
    }
}

/// An output shortlist (a draft model's cut-down head) gives the full head's logits for its
/// tokens (to f32 rounding: candle's F32 matmul blocks by shape) and −∞ for the rest, and takes in every token the model reads afterwards —
/// for the F32 head and for a Q8_0 one repacked into tiles (rows cut out of the tiles).
#[test]
fn output_shortlist_keeps_exact_logits_and_grows_with_the_context() {
    let ck = Checkpoint::open(&stories(), None).unwrap();
    let q8 = tandem_quantize::quantized_copy(&ck, tandem_quantize::QuantType::Q8_0, true).unwrap();
    for mut m in [
        ck.load_model(&tandem_model::LoadOptions::default())
            .unwrap(),
        q8.load_model(&tandem_model::LoadOptions::default())
            .unwrap(),
    ] {
        let vocab = m.config.vocab_size;
        let prompt = ck
            .tokenizer
            .encode("Once upon a time, there was", true)
            .unwrap();
        let full = |m: &tandem_model::Llama, toks: &[u32]| {
            let mut c = m.new_cache().unwrap();
            let l = m.forward(toks, &mut c, Logits::All).unwrap();
            l.to_vecs()
        };
        let want = full(&m, &prompt);
        // 5 ids (padded to a tile inside) that leave out most of the prompt's tokens.
        let list: Vec<u32> = vec![0, 3, 17, 200, prompt[1]];
        m.set_output_shortlist(Some(&list)).unwrap();
        let mut c = m.new_cache().unwrap();
        let got = m.forward(&prompt[..1], &mut c, Logits::All).unwrap();
        let got = got.to_vecs();
        for t in 0..vocab as u32 {
            let keep = list.contains(&t) || t == prompt[0];
            let g = got[0][t as usize];
            if keep {
                assert!(close(g, want[0][t as usize]), "token {t}");
            } else {
                assert_eq!(g, f32::NEG_INFINITY, "token {t} is not in the list");
            }
        }
        // The rest of the prompt goes through the model: all of it is in the list now.
        let got = m.forward(&prompt[1..], &mut c, Logits::Last).unwrap();
        let got = got.last().to_vec();
        let last = want.last().unwrap();
        for &t in &prompt {
            assert!(close(got[t as usize], last[t as usize]), "prompt token {t}");
        }
        assert!(got.iter().filter(|v| v.is_finite()).count() <= list.len() + prompt.len());
        assert!(m.decode_cost() > 0.0);
        // A second request's list: the head in place is kept, the ids it lacks added.
        let list2: Vec<u32> = vec![1, 5, 300, 17];
        m.set_output_shortlist(Some(&list2)).unwrap();
        let mut c = m.new_cache().unwrap();
        let got = m.forward(&prompt[..1], &mut c, Logits::All).unwrap();
        let got = got.to_vecs();
        for t in 0..vocab as u32 {
            let asked = list.contains(&t) || list2.contains(&t) || prompt.contains(&t);
            let g = got[0][t as usize];
            if asked {
                assert!(close(g, want[0][t as usize]), "token {t}");
            } else {
                assert_eq!(g, f32::NEG_INFINITY, "token {t} was never asked for");
            }
        }
        // Bad lists are errors; `None` restores the full head.
        assert!(m.set_output_shortlist(Some(&[])).is_err());
        assert!(m.set_output_shortlist(Some(&[vocab as u32])).is_err());
        m.set_output_shortlist(None).unwrap();
        let mut c = m.new_cache().unwrap();
        let l = m.forward(&prompt, &mut c, Logits::All).unwrap();
        assert_eq!(l.to_vecs(), want);
    }
}

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-5 * (1.0 + b.abs())
}

/// An f16 cache (the default, as llama.cpp's) against an f32 one on SmolLM2 over ~150 tokens
/// of wikitext: the logits move by rounding only, the greedy choice almost never, and the f16
/// cache's chunkings still agree exactly (its stored keys do not depend on the pass shape).
#[test]
fn an_f16_cache_stays_within_rounding_of_the_f32_cache() {
    use tandem_model::{KvCacheType, LoadOptions};
    let ck = Checkpoint::open(&smollm2_f16(), None).unwrap();
    let load = |kv_cache| {
        ck.load_model(&LoadOptions {
            kv_cache,
            ..LoadOptions::default()
        })
        .unwrap()
    };
    let (half, full) = (load(KvCacheType::F16), load(KvCacheType::F32));
    let text = std::fs::read_to_string(shared().join("data/wikitext-2-raw/wiki.test.raw"))
        .unwrap_or_else(|_| "The quick brown fox jumps over the lazy dog. ".repeat(20));
    let toks: Vec<u32> = ck
        .tokenizer
        .encode(&text.chars().take(2000).collect::<String>(), true)
        .unwrap()[..150]
        .to_vec();
    let a = logits_in_chunks(&half, &toks, &[toks.len()]);
    let b = logits_in_chunks(&full, &toks, &[toks.len()]);
    let d = max_diff(&a, &b);
    let argmax = |r: &Vec<f32>| tandem_model::argmax(r);
    let same = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| argmax(x) == argmax(y))
        .count();
    eprintln!("f16 vs f32 cache: max logit difference {d}, greedy agrees at {same} of 150");
    assert!(d > 0.0, "the f16 cache rounded nothing");
    assert!(d < 0.2, "max logit difference {d}"); // 0.026 measured
    assert!(same >= 147, "greedy agrees at {same} of 150");
    let singles = logits_in_chunks(&half, &toks, &vec![1; toks.len()]);
    let d1 = max_diff(&a, &singles);
    assert!(d1 <= 1e-4, "an f16 cache, token by token: {d1}");
}

/// On CPUs with AMX a prompt's rows that return no logits run their F16 matmuls on the tile
/// unit, to rounding of the FMA kernels (`Logits`). A prompt run whole for its last row's
/// logits (`Logits::Last`, plain generation) and run as its start with `Logits::None` and
/// then its last token (speculative decoding) must still give the same logits bit for bit,
/// and so must the next decode step over either cache; both stay within rounding of every
/// row run with its logits (`Logits::All`, which takes the FMA kernels throughout).
#[test]
fn a_prompt_whole_or_as_start_then_last_token_gives_the_same_logits() {
    let ck = Checkpoint::open(&smollm2_f16(), None).unwrap();
    for kv in [
        tandem_model::KvCacheType::F32,
        tandem_model::KvCacheType::F16,
    ] {
        let load = tandem_model::LoadOptions {
            kv_cache: kv,
            ..Default::default()
        };
        prompt_whole_or_split(&ck, &ck.load_model(&load).unwrap(), kv);
    }
}

/// A prompt long enough (140+ tokens) for AMX's matmuls and attention on a prompt's rows.
const LONG_PROMPT: &str =
    "Rewrite the following note as a short, friendly email to the whole team: the \
                build server will be down on Saturday morning for maintenance, so please push \
                your changes before Friday evening and check the status page afterwards. The \
                release branch stays frozen until Monday noon; anything urgent goes through \
                the on-call engineer, who will merge it by hand once the tests have passed on \
                a laptop. Thank everyone for their patience during the move to the new rack. \
                Mention that the coffee machine on the third floor is fixed, that the parking \
                garage closes early on Friday because of the street festival, and that the \
                quarterly planning meeting moves from Tuesday to Wednesday afternoon, in the \
                large room next to the kitchen, with remote dial-in details sent separately.";

fn prompt_whole_or_split(ck: &Checkpoint, m: &tandem_model::Llama, kv: tandem_model::KvCacheType) {
    let text = LONG_PROMPT;
    let toks = ck.tokenizer.encode(text, true).unwrap();
    let n = toks.len();
    assert!(
        n > 130,
        "the prompt must be long enough for AMX's matmuls and attention ({n} tokens)"
    );
    let mut whole = m.new_cache().unwrap();
    let last = m.forward(&toks, &mut whole, Logits::Last).unwrap();
    assert_eq!(last.len(), 1);
    let mut split = m.new_cache().unwrap();
    let none = m.forward(&toks[..n - 1], &mut split, Logits::None).unwrap();
    assert!(none.is_empty(), "Logits::None returns no rows");
    assert_eq!(split.len(), n - 1);
    let then = m.forward(&toks[n - 1..], &mut split, Logits::All).unwrap();
    assert_eq!(
        last.last(),
        then.last(),
        "whole prompt vs start, then last token"
    );
    let next = [toks[3]];
    let a = m.forward(&next, &mut whole, Logits::Last).unwrap();
    let b = m.forward(&next, &mut split, Logits::Last).unwrap();
    assert_eq!(a.last(), b.last(), "the decode step after either");
    let exact = logits_in_chunks(m, &toks, &[n]);
    let d = max_diff(&[last.last().to_vec()], &exact[n - 1..]);
    eprintln!("{kv:?} cache: bulk rows vs every row's logits: {d}");
    // Measured on Emerald Rapids: 1.5e-5 with an f32 cache, f32 rounding over 30 layers. An
    // f16 cache (whose bulk rows' attention runs on AMX too) turns some of those last bits
    // into a rounding step of its own (4.2e-3 measured); it moves logits by up to 0.026
    // against an f32 cache anyway (the test above).
    let bound = match kv {
        tandem_model::KvCacheType::F32 => 2e-4,
        tandem_model::KvCacheType::F16 => 0.05,
    };
    assert!(
        d <= bound,
        "{kv:?} cache: bulk rows vs every row's logits: {d}"
    );
}

/// Prompts prefilled side by side without logits (a batch's prefill, `Logits::None`) leave
/// each cache as the prompt alone leaves it: their last tokens then give the logits plain
/// generation's whole-prompt pass gives, bit for bit (each prompt's rows take the kernels they
/// take alone, long and short prompts mixed).
#[test]
fn a_batch_prefill_without_logits_equals_each_prompt_alone() {
    let ck = Checkpoint::open(&smollm2_f16(), None).unwrap();
    let m = ck
        .load_model(&tandem_model::LoadOptions::default())
        .unwrap();
    let second =
        format!("Summarize this for a new colleague in three bullet points. {LONG_PROMPT}");
    // Two prompts long enough for the bulk kernels and one too short for them (alone, it
    // keeps the FMA kernels: the batch must run it so too).
    let ids: Vec<Vec<u32>> = [LONG_PROMPT, "Name three colours.", second.as_str()]
        .iter()
        .map(|t| ck.tokenizer.encode(t, true).unwrap())
        .collect();
    let mut caches: Vec<tandem_model::KvCache> =
        ids.iter().map(|_| m.new_cache().unwrap()).collect();
    let mut batch: Vec<(&[u32], &mut tandem_model::KvCache)> = ids
        .iter()
        .map(|t| &t[..t.len() - 1])
        .zip(caches.iter_mut())
        .collect();
    let none = m.forward_batch(&mut batch, Logits::None).unwrap();
    assert!(none.iter().all(|l| l.is_empty()));
    for (t, cache) in ids.iter().zip(caches.iter_mut()) {
        let then = m.forward(&t[t.len() - 1..], cache, Logits::All).unwrap();
        let mut alone = m.new_cache().unwrap();
        let whole = m.forward(t, &mut alone, Logits::Last).unwrap();
        assert_eq!(
            then.last(),
            whole.last(),
            "{} tokens: batch prefill, then last token vs the whole prompt",
            t.len()
        );
    }
}
