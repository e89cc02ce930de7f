//! The forward pass and speculative decoding on the GPU, end to end (feature `cuda`): the
//! device-resident model against the reference implementation and the CPU, verification
//! against decoding (bitwise), and speculative greedy output against plain greedy output.
//! Without a usable GPU every test prints why it is skipped and passes.
#![cfg(feature = "cuda")]

mod common;
use common::*;
use tandem_model::linear::ActivationPrecision;
use tandem_model::{argmax, Checkpoint, ComputeDevice, Llama, LoadOptions, Logits};

/// The bundled model, loaded twice: on the CPU with f32 activations, and on the GPU.
fn cpu_and_gpu(test: &str) -> Option<(Checkpoint, Llama, Llama)> {
    if let Err(e) = tandem_kernels::cuda::gpu() {
        eprintln!("{test}: skipped ({e})");
        return None;
    }
    let ck = Checkpoint::open(&stories(), None).unwrap();
    let cpu = ck
        .load_model(&LoadOptions {
            activations: ActivationPrecision::F32,
            // The GPU's cache is f32.
            kv_cache: tandem_model::KvCacheType::F32,
            ..LoadOptions::default()
        })
        .unwrap();
    let on_gpu = ck
        .load_model(&LoadOptions {
            device: ComputeDevice::Gpu,
            ..LoadOptions::default()
        })
        .unwrap();
    assert!(
        on_gpu.runs_on_gpu(),
        "every layer of stories260K has a GPU kernel"
    );
    Some((ck, cpu, on_gpu))
}

#[test]
fn gpu_forward_matches_reference() {
    let Some((ck, _, g)) = cpu_and_gpu("gpu_forward_matches_reference") else {
        return;
    };
    check_llama_against_reference(&ck, &g, &stories(), 1e-2);
}

#[test]
fn gpu_forward_matches_cpu_and_verification_matches_decoding() {
    let Some((ck, cpu, g)) = cpu_and_gpu("gpu_forward_matches_cpu") else {
        return;
    };
    let toks = ck
        .tokenizer
        .encode(
            "Once upon a time, there was a little girl named Lily who liked",
            true,
        )
        .unwrap();
    let n = toks.len();
    let on_cpu = logits_in_chunks(&cpu, &toks, &[n]);
    let whole = logits_in_chunks(&g, &toks, &[n]);
    let worst = on_cpu
        .iter()
        .flatten()
        .zip(whole.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= 1e-3, "GPU vs CPU logits differ by {worst}");
    // A row's logits do not depend on the rows beside it: decoding one token at a time and
    // verifying five at a time give the same bits.
    let singles = logits_in_chunks(&g, &toks, &vec![1; n]);
    let mut fives = vec![5; n / 5];
    if n % 5 > 0 {
        fives.push(n % 5);
    }
    assert_eq!(
        logits_in_chunks(&g, &toks, &fives),
        singles,
        "chunks of 5 vs one at a time"
    );
    // Rolling back and re-feeding equals a fresh run.
    let mut cache = g.new_cache().unwrap();
    g.forward(&toks, &mut cache, Logits::Last).unwrap();
    cache.truncate(3);
    let again = g.forward(&toks[3..], &mut cache, Logits::All).unwrap();
    assert_eq!(again.to_vecs(), singles[3..].to_vec());
}

/// Passes replayed from CUDA graphs give the bits of passes launched kernel by kernel: decode
/// steps (one graph, replayed with a longer cache each time), verification passes of several
/// row counts, a rollback, other caches (other buffers, the same graphs), and a cache that
/// grows while its graph is replayed.
#[test]
fn gpu_graphs_match_direct_launches() {
    let Some((ck, _, g)) = cpu_and_gpu("gpu_graphs_match_direct_launches") else {
        return;
    };
    let toks = ck
        .tokenizer
        .encode(
            "Once upon a time, there was a little dog who liked to run",
            true,
        )
        .unwrap();
    let chunks = [4, 1, 1, 1, 3, 1, 5, 1, 1, 8, 1];
    let run = |graphs: bool| {
        g.use_gpu_graphs(graphs);
        let (mut rows, mut passes) = (Vec::new(), 0);
        for _ in 0..2 {
            let mut cache = g.new_cache().unwrap();
            let mut at = 0;
            for &c in &chunks {
                let end = (at + c).min(toks.len());
                if at == end {
                    break;
                }
                rows.extend(
                    g.forward(&toks[at..end], &mut cache, Logits::All)
                        .unwrap()
                        .to_vecs(),
                );
                passes += 1;
                at = end;
            }
            cache.truncate(5);
            rows.extend(
                g.forward(&toks[5..8], &mut cache, Logits::Last)
                    .unwrap()
                    .to_vecs(),
            );
            passes += 1;
        }
        // Past the cache's first capacity (256 positions) one token at a time: the cache
        // grows (new buffers) under the same graph.
        let mut cache = g.new_cache().unwrap();
        for i in 0..300 {
            let t = toks[i % toks.len()];
            let last = g.forward(&[t], &mut cache, Logits::Last).unwrap();
            if i % 7 == 0 || i >= 250 {
                rows.extend(last.to_vecs());
            }
            passes += 1;
        }
        (rows, passes)
    };
    let (direct, _) = run(false);
    let before = g.gpu_graph_passes();
    let (graphs, passes) = run(true);
    g.use_gpu_graphs(true);
    // Every pass has at most 8 rows, so each ran from a graph (captured or replayed).
    assert_eq!(
        g.gpu_graph_passes() - before,
        passes,
        "passes that ran from a graph (did capturing fail?)"
    );
    assert_eq!(direct.len(), graphs.len());
    assert!(
        direct == graphs,
        "graph replays differ from direct launches"
    );
}

#[test]
fn gpu_cache_and_cpu_model_do_not_mix() {
    let Some((_, cpu, g)) = cpu_and_gpu("gpu_cache_and_cpu_model_do_not_mix") else {
        return;
    };
    let mut gc = g.new_cache().unwrap();
    let e = cpu.forward(&[1, 2], &mut gc, Logits::Last).unwrap_err();
    assert!(e.to_string().contains("GPU"), "{e}");
    assert!(!cpu.shares_cache_shape_with(&g));
}

#[test]
fn gpu_batch_matches_one_by_one() {
    let Some((ck, _, g)) = cpu_and_gpu("gpu_batch_matches_one_by_one") else {
        return;
    };
    let a = ck
        .tokenizer
        .encode("The cat sat on the mat.", true)
        .unwrap();
    let b = ck.tokenizer.encode("Tom had a red ball", true).unwrap();
    let want: Vec<Vec<Vec<f32>>> = [&a, &b]
        .iter()
        .map(|t| logits_in_chunks(&g, t, &[t.len()]))
        .collect();
    let (mut ca, mut cb) = (g.new_cache().unwrap(), g.new_cache().unwrap());
    let got = g
        .forward_batch(&mut [(&a[..], &mut ca), (&b[..], &mut cb)], Logits::All)
        .unwrap();
    for (w, t) in want.iter().zip(&got) {
        assert_eq!(&t.to_vecs(), w);
    }
}

/// Greedy decoding with GPU verifier and GPU drafts gives the plain GPU greedy text, through
/// the CLI, for a self-draft over the shared cache and for n-gram drafts.
#[test]
fn gpu_speculative_greedy_equals_plain() {
    if let Err(e) = tandem_kernels::cuda::gpu() {
        eprintln!("gpu_speculative_greedy_equals_plain: skipped ({e})");
        return;
    }
    let model = stories();
    let model = model.to_str().unwrap();
    for prompt in ["Once upon a time", "Lily and Ben went to the park. They"] {
        let run = |extra: &[&str]| {
            let mut args = vec![
                "--gpu",
                "generate",
                "--model",
                model,
                "--prompt",
                prompt,
                "--max-tokens",
                "96",
            ];
            args.extend_from_slice(extra);
            let out = tandem(&args);
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let plain = run(&[]);
        for draft in ["self:q8_0", "self:q4_0", "ngram"] {
            for k in ["1", "4", "8"] {
                assert_eq!(
                    run(&["--draft", draft, "--draft-max", k]),
                    plain,
                    "{draft} k={k}: '{prompt}'"
                );
            }
        }
    }
}

/// Greedy continuation on the GPU token by token equals the CPU's (f32 activations).
#[test]
fn gpu_greedy_text_matches_cpu() {
    let Some((ck, cpu, g)) = cpu_and_gpu("gpu_greedy_text_matches_cpu") else {
        return;
    };
    let prompt = ck.tokenizer.encode("Once upon a time", true).unwrap();
    let greedy = |m: &Llama| {
        let mut cache = m.new_cache().unwrap();
        let l = m.forward(&prompt, &mut cache, Logits::Last).unwrap();
        let mut next = argmax(l.last());
        let mut out = vec![next];
        for _ in 0..63 {
            let l = m.forward(&[next], &mut cache, Logits::Last).unwrap();
            next = argmax(l.last());
            out.push(next);
        }
        out
    };
    assert_eq!(greedy(&g), greedy(&cpu));
}
