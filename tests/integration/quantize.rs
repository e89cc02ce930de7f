//! `tandem quantize` and `tandem calibrate` end to end, on the real models: bit-exact with
//! llama-quantize, reproducible, loadable, policy as documented, importance-weighted mode that
//! helps, and safe on bad input and interruption.

use crate::common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use tandem_model::weights::WeightStore;
use tandem_model::Checkpoint;

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures/llama-quantize").join(name)
}

fn ok(args: &[&str]) -> String {
    let out = tandem(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One-line error, non-zero exit, no panic; returns the message.
fn fails(args: &[&str]) -> String {
    let out = tandem(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    assert_eq!(
        err.trim().lines().count(),
        1,
        "{args:?}: not one line: {err}"
    );
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every tensor of `a` equals `b`'s: same names, types and bytes.
fn assert_same_tensors(a: &Path, b: &Path) {
    let (x, y) = (
        WeightStore::open_gguf(a).unwrap(),
        WeightStore::open_gguf(b).unwrap(),
    );
    assert_eq!(x.names(), y.names());
    for n in x.names() {
        let (p, q) = (x.get(&n).unwrap(), y.get(&n).unwrap());
        assert_eq!(p.dtype, q.dtype, "{n}: type");
        assert_eq!(p.shape, q.shape, "{n}: shape");
        assert!(p.data == q.data, "{n}: bytes differ from llama-quantize's");
    }
}

/// No file other than `keep` is left in `dir` (no temporaries, no partial output).
fn assert_only(dir: &Path, keep: &[&str]) {
    let mut left: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    let mut want: Vec<String> = keep.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(left, want, "unexpected files in {}", dir.display());
}

/// `tandem [global] quantize MODEL --out OUT` with every matrix at type `t` (llama-quantize
/// --pure's choice).
fn quantize_everything(model: &Path, out: &Path, t: &str, global: &[&str]) {
    let args = [
        "quantize",
        s(model),
        "--out",
        s(out),
        "--scheme",
        t,
        "--attention",
        t,
        "--embeddings",
        t,
        "--quiet",
    ];
    ok(&[global, &args[..]].concat());
}

#[test]
fn stories260k_matches_llama_quantize_bit_for_bit_at_any_thread_count() {
    let tmp = tempfile::tempdir().unwrap();
    let m = stories();
    for (t, fx) in [
        ("q8_0", "stories260K-Q8_0.gguf"),
        ("q4_0", "stories260K-Q4_0.gguf"),
    ] {
        let mut files = Vec::new();
        for threads in ["1", "2"] {
            let out = tmp.path().join(format!("{t}-{threads}.gguf"));
            quantize_everything(&m, &out, t, &["--threads", threads]);
            files.push(out);
        }
        assert!(
            std::fs::read(&files[0]).unwrap() == std::fs::read(&files[1]).unwrap(),
            "{t}: output depends on the thread count"
        );
        // llama-quantize --pure on the same F16 weights (see tests/fixtures/llama-quantize).
        assert_same_tensors(&files[0], &fixture(fx));
    }
}

#[test]
fn importance_weighted_legacy_types_match_llama_quantize_bit_for_bit() {
    // llama-quantize --pure --imatrix on the same F16 weights with the same imatrix: the
    // weighted scale searches of q4_0/q5_0 and scale/min searches of q4_1/q5_1.
    let tmp = tempfile::tempdir().unwrap();
    let imatrix = fixture("stories260K-imatrix.gguf");
    for t in ["q4_0", "q4_1", "q5_0", "q5_1"] {
        let out = tmp.path().join(format!("{t}.gguf"));
        let said = ok(&[
            "quantize",
            s(&stories()),
            "--out",
            s(&out),
            "--scheme",
            t,
            "--attention",
            t,
            "--embeddings",
            t,
            "--imatrix",
            s(&imatrix),
            "--quiet",
        ]);
        assert!(said.contains("importance-weighted"), "{t}: {said}");
        let fx = format!("stories260K-{}-imatrix.gguf", t.to_uppercase());
        assert_same_tensors(&out, &fixture(&fx));
    }
}

#[test]
fn smollm2_matches_llama_quantize_q8_0_q4_0_q4_k() {
    let tmp = tempfile::tempdir().unwrap();
    let m = smollm2_f16();
    let rows = WeightStore::open_gguf(&fixture("smollm2-rows.gguf")).unwrap();
    for t in ["q8_0", "q4_0", "q4_k"] {
        let out = tmp.path().join(format!("{t}.gguf"));
        quantize_everything(&m, &out, t, &[]);
        let ours = WeightStore::open_gguf(&out).unwrap();
        let mut checked = 0;
        for name in rows.names() {
            // Fixture tensors are named "<llama-quantize --pure type>/<gguf name>"; the type
            // actually stored can be a fallback (q4_k -> q5_0 for 576-wide rows).
            let (pure, gname) = name.split_once('/').unwrap();
            if pure.to_lowercase() != t {
                continue;
            }
            let want = rows.get(&name).unwrap();
            let hf = tandem_model::gguf_names::gguf_to_hf(gname).unwrap();
            let got = ours.get(&hf).unwrap();
            assert_eq!(got.dtype, want.dtype, "{t} {gname}: type");
            assert!(
                got.data[..want.data.len()] == *want.data,
                "{t} {gname}: bytes differ from llama-quantize's"
            );
            checked += 1;
        }
        assert!(checked >= 1, "{t}: no fixture rows");
    }
}

#[test]
fn default_policy_keeps_attention_16bit_and_the_output_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let m = smollm2_f16();
    let out = tmp.path().join("m.gguf");
    // Dry run: the plan, and nothing written.
    let plan = ok(&[
        "quantize",
        s(&m),
        "--out",
        s(&out),
        "--scheme",
        "q4_0",
        "--dry-run",
    ]);
    assert!(
        plan.contains("attention") && plan.contains("f16 x120"),
        "{plan}"
    );
    assert!(
        plan.contains("total:") && plan.contains("bits/weight"),
        "{plan}"
    );
    assert!(!out.exists());
    let summary = ok(&[
        "quantize",
        s(&m),
        "--out",
        s(&out),
        "--scheme",
        "q4_0",
        "--quiet",
    ]);
    assert!(summary.contains("MB/s"), "{summary}");
    let st = WeightStore::open_gguf(&out).unwrap();
    for n in st.names() {
        let t = st.get(&n).unwrap().dtype.name();
        let want = if n.contains("self_attn") {
            "F16"
        } else if n.contains(".mlp.") {
            "Q4_0"
        } else if n == "model.embed_tokens.weight" {
            "Q8_0"
        } else {
            "F32"
        };
        assert_eq!(t, want, "{n}");
    }
    // tandem runs its own output; at q8_0 the teacher-forced argmax along the F16 model's
    // greedy continuation agrees almost everywhere (q4_0 weights are also run, but SmolLM2's
    // weights sit on a Q4_1 grid, so 4-bit re-quantization moves many argmaxes).
    agreement(&out, 0.5);
    ok(&[
        "quantize",
        s(&m),
        "--out",
        s(&out),
        "--scheme",
        "q8_0",
        "--quiet",
        "--force",
    ]);
    agreement(&out, 0.9);
}

/// Share of the reference greedy continuation that `model` also ranks first, teacher-forced.
fn agreement(model: &Path, at_least: f64) {
    let r = reference(&shared().join("models/smollm2-135m-instruct"));
    let case = &r["cases"][0];
    let prompt = ids(&case["prompt_ids"]);
    let greedy = ids(&case["greedy_ids"]);
    let ck = Checkpoint::open(model, None).unwrap();
    let model = ck
        .load_model(&tandem_model::LoadOptions::default())
        .unwrap();
    let mut cache = model.new_cache().unwrap();
    let mut seq = prompt.clone();
    seq.extend(&greedy);
    let logits = model
        .forward(&seq, &mut cache, tandem_model::Logits::All)
        .unwrap();
    let rows: Vec<Vec<f32>> = logits.to_vecs();
    let agree = (0..greedy.len())
        .filter(|&i| tandem_model::argmax(&rows[prompt.len() - 1 + i]) == greedy[i])
        .count();
    let share = agree as f64 / greedy.len() as f64;
    assert!(
        share >= at_least,
        "{agree}/{} greedy tokens agree",
        greedy.len()
    );
}

#[test]
fn gguf_written_by_tandem_round_trips_model_and_tokenizer() {
    // stories260K has a SentencePiece vocabulary: written as tokenizer.ggml.model = "llama"
    // with scores, and read back into the same tokenizer and the same greedy text.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("s.gguf");
    ok(&[
        "quantize",
        s(&stories()),
        "--out",
        s(&out),
        "--scheme",
        "f16",
        "--embeddings",
        "keep",
        "--quiet",
    ]);
    let a = Checkpoint::open(&stories(), None).unwrap();
    let b = Checkpoint::open(&out, None).unwrap();
    let text = std::fs::read_to_string(shared().join("data/austen/persuasion.txt")).unwrap();
    let text = &text[..20_000];
    assert_eq!(
        a.tokenizer.encode(text, true).unwrap(),
        b.tokenizer.encode(text, true).unwrap()
    );
    assert_eq!(
        (b.tokenizer.bos_id, b.tokenizer.add_bos),
        (a.tokenizer.bos_id, a.tokenizer.add_bos)
    );
    let r = reference(&stories());
    let case = &r["cases"][0];
    let mut args = vec!["generate", "--model", s(&out), "--prompt"];
    let prompt = case["prompt"].as_str().unwrap();
    args.push(prompt);
    let n = ids(&case["greedy_ids"]).len().to_string();
    args.extend(["--max-tokens", &n, "--no-bos"]);
    let text = ok(&args);
    let want = case["greedy_text"].as_str().unwrap();
    assert!(text.contains(want.trim()), "got {text:?}, want {want:?}");
}

#[test]
fn calibrate_matches_llama_imatrix_and_reads_both_formats() {
    let tmp = tempfile::tempdir().unwrap();
    // The text llama-imatrix ran on: the first 20000 bytes of the bundled calibration text.
    let cal = tmp.path().join("cal.txt");
    std::fs::write(
        &cal,
        &tandem_quantize::CALIBRATION_TEXT.as_bytes()[..20_000],
    )
    .unwrap();
    let out = tmp.path().join("imatrix.gguf");
    ok(&[
        "calibrate",
        s(&stories()),
        "--text",
        s(&cal),
        "--ctx",
        "128",
        "--chunks",
        "4",
        "--out",
        s(&out),
        "--quiet",
    ]);
    use tandem_quantize::ImportanceMatrix;
    let ours = ImportanceMatrix::read(&out).unwrap();
    let theirs = ImportanceMatrix::read(&fixture("stories260K-imatrix.gguf")).unwrap();
    let legacy = ImportanceMatrix::read(&fixture("stories260K-imatrix.dat")).unwrap();
    assert_eq!((ours.chunk_count, ours.chunk_size), (4, 128));
    assert_eq!(
        ours.entries.keys().collect::<Vec<_>>(),
        theirs.entries.keys().collect::<Vec<_>>()
    );
    for name in theirs.entries.keys() {
        let (a, b, c) = (
            ours.importance(name).unwrap(),
            theirs.importance(name).unwrap(),
            legacy.importance(name).unwrap(),
        );
        for ((x, y), z) in a.iter().zip(&b).zip(&c) {
            assert!(
                (x - y).abs() <= 0.01 * y.abs() + 1e-4,
                "{name}: {x} vs llama-imatrix {y}"
            );
            assert!(
                (z - y).abs() <= 1e-5 * y.abs() + 1e-6,
                "{name}: .dat {z} vs .gguf {y}"
            );
        }
    }
    // Quantizing with either file works (stories260K has no K-quant-wide rows, so the note).
    let q = tmp.path().join("q.gguf");
    let o = tandem(&[
        "quantize",
        s(&stories()),
        "--out",
        s(&q),
        "--scheme",
        "q4_k",
        "--imatrix",
        s(&fixture("stories260K-imatrix.dat")),
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// The F16 reference's log-probabilities of every chunk, computed once for all candidates.
fn reference_logprobs(reference: &Path, chunks: &tandem_eval::Chunks) -> Vec<Vec<Vec<f32>>> {
    let ck = Checkpoint::open(reference, None).unwrap();
    let model = ck
        .load_model(&tandem_model::LoadOptions::default())
        .unwrap();
    (0..chunks.chunks.len())
        .map(|c| tandem_eval::scoring::chunk_logprobs(&model, chunks, c).unwrap())
        .collect()
}

/// Mean KL divergence (F16 reference vs candidate) over a few wikitext chunks.
fn mean_kl(reference: &[Vec<Vec<f32>>], candidate: &Path, chunks: &tandem_eval::Chunks) -> f64 {
    let ck = Checkpoint::open(candidate, None).unwrap();
    let cand = ck
        .load_model(&tandem_model::LoadOptions::default())
        .unwrap();
    let mut d = tandem_eval::Divergence::default();
    for (c, r) in reference.iter().enumerate() {
        let q = tandem_eval::scoring::chunk_logprobs(&cand, chunks, c).unwrap();
        d.add(r, &q, chunks.scored_targets(c), None);
    }
    tandem_eval::Summary::of(&d.kl).mean
}

#[test]
fn imatrix_lowers_kl_divergence_at_q4_k() {
    let tmp = tempfile::tempdir().unwrap();
    let m = smollm2_f16();
    let imatrix = tmp.path().join("imatrix.gguf");
    // Calibrated on the bundled Austen text; evaluated on wikitext (never the same text).
    ok(&[
        "calibrate",
        s(&m),
        "--chunks",
        "4",
        "--out",
        s(&imatrix),
        "--quiet",
    ]);
    let plain = tmp.path().join("plain.gguf");
    let weighted = tmp.path().join("weighted.gguf");
    let base = ["quantize", s(&m), "--scheme", "q4_k", "--quiet", "--out"];
    ok(&[&base[..], &[s(&plain)]].concat());
    let w = ok(&[&base[..], &[s(&weighted), "--imatrix", s(&imatrix)]].concat());
    assert!(w.contains("importance-weighted"), "{w}");
    let ck = Checkpoint::open(&m, None).unwrap();
    let text = std::fs::read_to_string(shared().join("data/wikitext-2-raw/wiki.test.raw")).unwrap();
    let chunks = tandem_eval::Chunks::new(&ck.tokenizer, &text[..200_000], 256, Some(3)).unwrap();
    let reference = reference_logprobs(&m, &chunks);
    let (kl_plain, kl_weighted) = (
        mean_kl(&reference, &plain, &chunks),
        mean_kl(&reference, &weighted, &chunks),
    );
    eprintln!("q4_k mean KL vs F16: {kl_plain:.5} plain, {kl_weighted:.5} with imatrix");
    assert!(
        kl_weighted < kl_plain,
        "imatrix did not help: {kl_weighted} vs {kl_plain}"
    );
}

#[test]
fn calibrated_methods_lower_kl_divergence_at_q4_0_and_say_so_in_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let m = smollm2_f16();
    // Calibrated on 2 chunks of the bundled Austen text (CI-sized; the full runs are in
    // BENCHMARKS.md), evaluated on wikitext: never the same text.
    let base = ["quantize", s(&m), "--scheme", "q4_0", "--quiet", "--out"];
    let calib = ["--calib-chunks", "2"];
    // The second takes GPTQ's columns in file order (act-order is the default); the last also
    // calibrates on 512 tokens of the model's own answers (two more chunks of 256), and
    // writes their text out.
    let answers = tmp.path().join("answers.txt");
    let variants: [&[&str]; 4] = [
        &["rtn"],
        &["gptq", "--act-order=false"],
        &["awq+gptq"],
        &[
            "gptq",
            "--calib-self",
            "512",
            "--calib-ctx",
            "256",
            "--calib-self-save",
            s(&answers),
        ],
    ];
    let files: Vec<PathBuf> = variants
        .iter()
        .enumerate()
        .map(|(i, method)| {
            let out = tmp
                .path()
                .join(format!("{i}-{}.gguf", method[0].replace('+', "-")));
            ok(&[&base[..], &[s(&out), "--method"], method, &calib[..]].concat());
            out
        })
        .collect();
    let info = ok(&["info", s(&files[1])]);
    assert!(info.contains("quantized with: method=gptq"), "{info}");
    assert!(info.contains("act_order=false"), "{info}");
    let info = ok(&["info", s(&files[2])]);
    assert!(info.contains("act_order=true"), "{info}");
    let hash = tandem_quantize::sha256_hex(tandem_quantize::DEFAULT_CALIBRATION_TEXT.as_bytes());
    assert!(info.contains(&format!("sha256={hash}")), "{info}");
    assert!(info.contains("chunks=2"), "{info}");
    assert!(!info.contains("self_tokens"), "{info}");
    let info = ok(&["info", s(&files[3])]);
    // 2 chunks of the text at 256 tokens, then the 512 generated tokens' 2.
    assert!(info.contains("calibration.chunks=4"), "{info}");
    assert!(info.contains("calibration.self_tokens="), "{info}");
    assert!(info.contains("calibration.self_sha256="), "{info}");
    // The saved answers are the generated tokens' text: the model's tokenizer reads about
    // as many tokens back (a BPE round trip may merge a few at the joins between answers).
    let saved = std::fs::read_to_string(&answers).unwrap();
    let ck = Checkpoint::open(&m, None).unwrap();
    let back = ck.tokenizer.encode(&saved, false).unwrap().len();
    assert!((450..=550).contains(&back), "{back} tokens in {saved:?}");
    // Saving needs something generated to save.
    let e = fails(
        &[
            &base[..],
            &[s(&tmp.path().join("x.gguf")), "--method", "gptq"],
            &calib[..],
            &["--calib-self-save", s(&tmp.path().join("y.txt"))],
        ]
        .concat(),
    );
    assert!(
        e.contains("--calib-self-save") && e.contains("--calib-self N"),
        "{e}"
    );
    let text = std::fs::read_to_string(shared().join("data/wikitext-2-raw/wiki.test.raw")).unwrap();
    let chunks = tandem_eval::Chunks::new(&ck.tokenizer, &text[..200_000], 256, Some(3)).unwrap();
    let reference = reference_logprobs(&m, &chunks);
    let kl: Vec<f64> = files
        .iter()
        .map(|f| mean_kl(&reference, f, &chunks))
        .collect();
    eprintln!(
        "q4_0 mean KL vs F16: rtn {:.5}, gptq in file order {:.5}, awq+gptq {:.5}, gptq with its own answers {:.5}",
        kl[0], kl[1], kl[2], kl[3]
    );
    assert!(kl[1] < 0.8 * kl[0], "gptq did not help enough: {kl:?}");
    assert!(kl[2] < 0.8 * kl[0], "awq+gptq did not help enough: {kl:?}");
    assert!(
        kl[3] < 0.8 * kl[0],
        "gptq with self-calibration did not help enough: {kl:?}"
    );
}

#[test]
fn calibrated_methods_refuse_bad_calibration_text() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m.gguf");
    let short = tmp.path().join("short.txt");
    std::fs::write(&short, "Too short to calibrate on.").unwrap();
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    for text in [&short, &empty] {
        let e = fails(&[
            "quantize",
            s(&stories()),
            "--out",
            s(&out),
            "--scheme",
            "q4_0",
            "--method",
            "gptq",
            "--calib-text",
            s(text),
        ]);
        assert!(e.contains("fewer than one chunk"), "{e}");
    }
    let e = fails(&[
        "quantize",
        s(&stories()),
        "--out",
        s(&out),
        "--method",
        "gptqq",
    ]);
    assert!(e.contains("unknown method 'gptqq'"), "{e}");
    assert!(!out.exists());
    // The model's own answers are calibration too: rounding to nearest has no use for them.
    let e = fails(&[
        "quantize",
        s(&stories()),
        "--out",
        s(&out),
        "--calib-self",
        "1024",
    ]);
    assert!(
        e.contains("--calib-self") && e.contains("method gptq"),
        "{e}"
    );
    assert!(!out.exists());
}

#[test]
fn policy_errors_and_recipes() {
    let m = stories();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.gguf");
    let base = ["quantize", s(&m), "--out", s(&out), "--dry-run"];
    let e = fails(&[&base[..], &["--scheme", "q4_x"]].concat());
    assert!(e.contains("unknown type 'q4_x'"), "{e}");
    let e = fails(&[&base[..], &["--rule", r"mlp\.dwn_proj=q8_0"]].concat());
    assert!(e.contains("matches no tensor"), "{e}");
    let e = fails(&[&base[..], &["--rule", "(=q8_0"]].concat());
    assert!(e.contains("invalid regex"), "{e}");
    // Later rules win; the fallback for 172-wide rows is reported.
    let plan = ok(&[
        &base[..],
        &[
            "-v",
            "--scheme",
            "q4_0",
            "--rule",
            r"mlp\.up_proj=q8_0",
            "--rule",
            r"layers\.0\.mlp\.up_proj=q4_1",
        ],
    ]
    .concat());
    assert!(
        plan.contains("blk.0.ffn_up.weight") && plan.contains("-> q4_1"),
        "{plan}"
    );
    assert!(plan.contains("blk.1.ffn_up.weight"), "{plan}");
    assert!(plan.contains("row is 172: f16"), "{plan}");
    // A recipe holds the same choices; flags win over it.
    let recipe = tmp.path().join("r.toml");
    std::fs::write(&recipe, "scheme = \"q8_0\"\nattention = \"q8_0\"\n[[rules]]\npattern = 'mlp\\.gate_proj'\ntype = \"q4_0\"\n").unwrap();
    let plan = ok(&[&base[..], &["-v", "--recipe", s(&recipe)]].concat());
    assert!(
        plan.contains("attention") && plan.contains("q8_0 x20"),
        "{plan}"
    );
    assert!(
        plan.contains("ffn_gate.weight") && plan.contains("-> q4_0"),
        "{plan}"
    );
    std::fs::write(&recipe, "sheme = \"q8_0\"\n").unwrap();
    let e = fails(&[&base[..], &["--recipe", s(&recipe)]].concat());
    assert!(e.contains("r.toml") && e.contains("invalid recipe"), "{e}");
    assert_only(tmp.path(), &["r.toml"]);
}

#[test]
fn refuses_overwrite_and_nan_and_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m.gguf");
    std::fs::write(&out, b"precious").unwrap();
    let st = stories();
    let args = [
        "quantize",
        s(&st),
        "--out",
        s(&out),
        "--scheme",
        "q8_0",
        "--quiet",
    ];
    let e = fails(&args);
    assert!(e.contains("already exists") && e.contains("--force"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    ok(&[&args[..], &["--force"]].concat());
    assert!(std::fs::read(&out).unwrap().starts_with(b"GGUF"));
    assert_only(tmp.path(), &["m.gguf"]);

    // A NaN in a source tensor: an error naming the tensor, and no output at all.
    let model = stories_copy_in(tmp.path());
    let name = "model.layers.2.mlp.up_proj.weight";
    poison_f16(&model, name, 70);
    let out2 = tmp.path().join("nan.gguf");
    let e = fails(&[
        "quantize",
        s(&model),
        "--out",
        s(&out2),
        "--scheme",
        "q8_0",
        "--quiet",
    ]);
    assert!(e.contains(name) && e.contains("non-finite"), "{e}");
    assert!(!out2.exists());
    assert_only(tmp.path(), &["m.gguf", "model"]);
    ok(&[
        "quantize",
        s(&model),
        "--out",
        s(&out2),
        "--scheme",
        "q8_0",
        "--quiet",
        "--allow-nonfinite",
    ]);
    assert!(out2.exists());
}

#[test]
fn ctrl_c_leaves_no_partial_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("big.gguf");
    let m = smollm2_f16();
    let child = Command::new(bin())
        .args([
            "--threads",
            "1",
            "quantize",
            s(&m),
            "--out",
            s(&out),
            "--scheme",
            "q4_k",
            "--attention",
            "q4_k",
            "--embeddings",
            "q4_k",
            "--quiet",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the temporary output exists (the handler is installed before it is made).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let started = std::fs::read_dir(tmp.path()).unwrap().next().is_some();
        if started || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let res = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        !res.status.success(),
        "finished before the interrupt; stderr: {err}"
    );
    assert!(err.contains("interrupted"), "{err}");
    assert_only(tmp.path(), &[]);
}
