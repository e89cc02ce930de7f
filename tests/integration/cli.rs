//! The commands a user runs, end to end through the binary.

use crate::common::*;

fn stdout_of(args: &[&str]) -> (String, String) {
    let out = tandem(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{args:?} failed: {err}");
    (
        String::from_utf8(out.stdout).expect("stdout is valid UTF-8"),
        err,
    )
}

#[test]
fn demo_streams_a_story_with_timing() {
    let (out, err) = stdout_of(&["demo", "--max-tokens", "60"]);
    assert!(out.starts_with("Once upon a time"), "{out}");
    assert!(out.split_whitespace().count() > 20, "too short: {out}");
    for k in [
        "prompt tokens:",
        "time to first token:",
        "prefill:",
        "decode:",
    ] {
        assert!(err.contains(k), "missing '{k}' in {err}");
    }
}

#[test]
fn greedy_generate_reproduces_the_reference_text() {
    let r = reference(&stories());
    let case = &r["cases"][0];
    let prompt = case["prompt"].as_str().unwrap();
    let m = stories();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--prompt",
            prompt,
            "--no-bos",
            "--max-tokens",
            "48",
        ];
        args.extend_from_slice(extra);
        stdout_of(&args).0
    };
    let out = run(&[]);
    let want = case["greedy_text"].as_str().unwrap();
    assert_eq!(out.trim_end(), format!("{prompt} {want}"));
    // Speculatively, with a draft whose head keeps only 40 ids and the context's tokens: the
    // same text.
    let spec = run(&["--draft", "self:q8_0@all", "--draft-vocab", "40"]);
    assert_eq!(spec, out, "--draft-vocab 40");
}

#[test]
fn sampling_is_seeded_and_reproducible() {
    let m = stories();
    let m = m.to_str().unwrap();
    let run = |seed: &str| {
        stdout_of(&[
            "generate",
            "--model",
            m,
            "--prompt",
            "Lily saw a",
            "--temperature",
            "0.9",
            "--top-k",
            "40",
            "--top-p",
            "0.95",
            "--seed",
            seed,
            "--max-tokens",
            "40",
        ])
        .0
    };
    assert_eq!(run("7"), run("7"));
    assert_ne!(run("7"), run("8"));
    // Speculative sampling is seeded too (draft and verifier streams both derive from --seed),
    // for a model draft and for prompt lookup.
    for draft in ["self:q4_0", "ngram"] {
        let spec = |seed: &str| {
            stdout_of(&[
                "generate",
                "--model",
                m,
                "--prompt",
                "Lily saw a",
                "--temperature",
                "0.9",
                "--seed",
                seed,
                "--max-tokens",
                "40",
                "--draft",
                draft,
            ])
            .0
        };
        assert_eq!(spec("7"), spec("7"), "{draft}");
        assert_ne!(spec("7"), spec("8"), "{draft}");
    }
}

#[test]
fn bos_policy_follows_tokenizer_config_and_can_be_overridden() {
    let m = stories();
    let m = m.to_str().unwrap();
    let tokens = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            m,
            "--prompt",
            "Tom ran",
            "--max-tokens",
            "1",
            "--json",
        ];
        args.extend_from_slice(extra);
        let (_, err) = stdout_of(&args);
        let v: serde_json::Value =
            serde_json::from_str(err.trim().lines().last().unwrap()).unwrap();
        v["prompt_tokens"].as_u64().unwrap()
    };
    // stories260K's tokenizer_config says add_bos_token: true.
    let with = tokens(&[]);
    assert_eq!(tokens(&["--no-bos"]), with - 1);
    assert_eq!(tokens(&["--bos"]), with);
}

#[test]
fn info_describes_the_model() {
    let m = stories();
    let (out, _) = stdout_of(&["info", m.to_str().unwrap()]);
    for k in [
        "architecture:  llama",
        "parameters:    260032",
        "layers:        5",
        "8 query / 4 key-value, head_dim 8",
        "F16",
    ] {
        assert!(out.contains(k), "missing '{k}' in {out}");
    }
    let g = smollm2_gguf();
    let (out, _) = stdout_of(&["info", g.to_str().unwrap()]);
    for k in [
        "GGUF",
        "Q4_1",
        "Q8_0",
        "layers:        30",
        "vocabulary:    49152",
    ] {
        assert!(out.contains(k), "missing '{k}' in {out}");
    }
}

/// The PyPI GGUF (Q4_1, Q8_0 output) and its F16 conversion give the same greedy text when
/// activations stay f32 (`--activations f32`; the int8 default rounds them as llama.cpp does).
#[test]
fn gguf_and_its_f16_conversion_generate_the_same_text() {
    let r = reference(&shared().join("models/smollm2-135m-instruct"));
    let (g, f) = (smollm2_gguf(), smollm2_f16());
    for case in r["cases"].as_array().unwrap() {
        let p = case["prompt"].as_str().unwrap();
        let run = |m: &std::path::Path| {
            stdout_of(&[
                "--activations",
                "f32",
                "generate",
                "--model",
                m.to_str().unwrap(),
                "--prompt",
                p,
                "--max-tokens",
                "24",
            ])
            .0
        };
        let a = run(&g);
        assert_eq!(a, run(&f), "prompt {p}");
        assert_eq!(
            a.trim_end(),
            format!("{p}{}", case["greedy_text"].as_str().unwrap()).trim_end()
        );
    }
}

#[test]
fn multibyte_text_streams_as_valid_utf8() {
    let g = smollm2_gguf();
    // Sampling at high temperature wanders through byte-level tokens that split characters.
    let (out, _) = stdout_of(&[
        "generate",
        "--model",
        g.to_str().unwrap(),
        "--prompt",
        "日本語の文章: 東京は",
        "--temperature",
        "1.2",
        "--seed",
        "3",
        "--max-tokens",
        "40",
    ]);
    assert!(out.starts_with("日本語の文章: 東京は"));
}

#[test]
fn stops_at_context_limit_without_error() {
    let m = stories();
    let (out, err) = stdout_of(&[
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        "Once upon a time",
        "--ctx",
        "16",
        "--max-tokens",
        "100",
        "--json",
    ]);
    assert!(!out.is_empty());
    let v: serde_json::Value = serde_json::from_str(err.trim().lines().last().unwrap()).unwrap();
    assert_eq!(v["stop"], "context-full");
}

/// `--gpu` without a usable GPU (or without the `cuda` feature) is a one-line error, not a
/// panic and not a silent fall-back to the CPU.
#[test]
fn gpu_without_a_gpu_is_a_clear_error() {
    let s = stories();
    let out = tandem(&[
        "--gpu",
        "generate",
        "--model",
        s.to_str().unwrap(),
        "--prompt",
        "Hi",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("GPU"), "{err}");
}

/// `--activations f32` and the int8 default both decode SmolLM2's Q8_0 copy to text, and
/// `bench --profile` prints the per-op table with the bandwidth limit.
#[test]
fn activations_flag_and_profile_table() {
    let g = smollm2_gguf();
    for a in ["int8", "f32"] {
        let (out, _) = stdout_of(&[
            "--activations",
            a,
            "generate",
            "--model",
            g.to_str().unwrap(),
            "--prompt",
            "The capital of France is",
            "--max-tokens",
            "4",
        ]);
        assert!(
            out.starts_with("The capital of France is") && out.len() > 26,
            "{a}: {out}"
        );
    }
    let (out, _) = stdout_of(&[
        "--threads",
        "2",
        "bench",
        "--model",
        g.to_str().unwrap(),
        "--profile",
        "3",
    ]);
    for k in [
        "bandwidth limit",
        "| q/k/v matmul |",
        "| attention |",
        "| total (wall) |",
    ] {
        assert!(out.contains(k), "missing '{k}' in {out}");
    }
    // Verification passes after a longer context (a chat's later turns), and a context past
    // the model's limit refused with the limit named.
    let verify_after = |context: &str| {
        tandem(&[
            "--threads",
            "2",
            "bench",
            "--model",
            g.to_str().unwrap(),
            "--pp",
            "0",
            "--tg",
            "0",
            "--reps",
            "1",
            "--verify",
            "2",
            "--context",
            context,
        ])
    };
    let out = String::from_utf8_lossy(&verify_after("300").stdout).to_string();
    assert!(out.contains("verify2@300 (passes/s)"), "{out}");
    // The backend column names the CPU kernels that ran, as llama-bench's names its backend.
    assert!(
        out.contains("| backend |") && out.contains(" | CPU ("),
        "{out}"
    );
    let bad = verify_after("1000000");
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && err.contains("context length exceeded"),
        "{err}"
    );
}
