//! Bad input gets a one-line error naming the file (and tensor) and a non-zero exit, never a
//! panic; nothing half-written is left behind.

mod common;
use common::*;
use std::path::{Path, PathBuf};

/// A writable copy of the bundled model.
fn stories_copy() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = stories_copy_in(tmp.path());
    (tmp, dir)
}

/// Runs `tandem info` and `tandem generate` on `model`; both must fail cleanly with a message
/// containing every string in `needles`.
fn assert_clean_failure(model: &Path, needles: &[&str]) {
    let m = model.to_str().unwrap();
    assert_fails(
        &[
            vec!["info", m],
            vec![
                "generate",
                "--model",
                m,
                "--prompt",
                "hi",
                "--max-tokens",
                "2",
            ],
        ],
        needles,
    );
}

fn assert_fails(commands: &[Vec<&str>], needles: &[&str]) {
    for args in commands {
        let out = tandem(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded on bad input");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{args:?}: not one line: {err}"
        );
        assert!(err.starts_with("error: "), "{err}");
        for n in needles {
            assert!(err.contains(n), "{args:?}: '{n}' not in: {err}");
        }
    }
}

/// Builds a safetensors file from a header JSON value and raw data.
fn safetensors_bytes(header: &serde_json::Value, data: &[u8]) -> Vec<u8> {
    let mut h = serde_json::to_vec(header).unwrap();
    h.resize(h.len().next_multiple_of(8), b' ');
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    out
}

#[test]
fn missing_config() {
    let (_t, d) = stories_copy();
    std::fs::remove_file(d.join("config.json")).unwrap();
    assert_clean_failure(&d, &["missing config.json"]);
}

#[test]
fn missing_tokenizer() {
    let (_t, d) = stories_copy();
    std::fs::remove_file(d.join("tokenizer.json")).unwrap();
    assert_clean_failure(&d, &["tokenizer.json", "missing"]);
}

#[test]
fn missing_model_path() {
    assert_clean_failure(
        Path::new("/nonexistent/model"),
        &["/nonexistent/model", "no such file"],
    );
}

#[test]
fn truncated_safetensors() {
    let (_t, d) = stories_copy();
    let p = d.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    assert_clean_failure(&d, &["model.safetensors", "truncated"]);
}

#[test]
fn header_length_past_end_of_file() {
    let (_t, d) = stories_copy();
    let p = d.join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[..8].copy_from_slice(&(10_000_000u64).to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    assert_clean_failure(&d, &["model.safetensors", "header length 10000000"]);
}

#[test]
fn tensor_offsets_out_of_range_or_overlapping() {
    let (_t, d) = stories_copy();
    let p = d.join("model.safetensors");
    let out_of_range =
        serde_json::json!({"a": {"dtype": "F16", "shape": [4], "data_offsets": [0, 800]}});
    std::fs::write(&p, safetensors_bytes(&out_of_range, &[0u8; 8])).unwrap();
    assert_clean_failure(&d, &["model.safetensors", "invalid safetensors"]);
    let overlapping = serde_json::json!({
        "a": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]},
        "b": {"dtype": "F16", "shape": [4], "data_offsets": [4, 12]}});
    std::fs::write(&p, safetensors_bytes(&overlapping, &[0u8; 12])).unwrap();
    assert_clean_failure(&d, &["model.safetensors", "overlapping"]);
}

#[test]
fn shard_index_outside_model_folder_is_refused() {
    let (t, d) = stories_copy();
    std::fs::rename(
        d.join("model.safetensors"),
        t.path().join("outside.safetensors"),
    )
    .unwrap();
    let index =
        serde_json::json!({"weight_map": {"model.embed_tokens.weight": "../outside.safetensors"}});
    std::fs::write(d.join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert_clean_failure(
        &d,
        &[
            "model.safetensors.index.json",
            "../outside.safetensors",
            "refusing",
        ],
    );
}

#[test]
fn shape_disagrees_with_config() {
    let (_t, d) = stories_copy();
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
    std::fs::write(
        d.join("config.json"),
        cfg.replace("\"intermediate_size\": 172", "\"intermediate_size\": 176"),
    )
    .unwrap();
    assert_clean_failure(
        &d,
        &[
            "model.safetensors",
            "model.layers.0.mlp.gate_proj.weight",
            "[172, 64]",
            "[176, 64]",
        ],
    );
}

#[test]
fn unsupported_dtype() {
    let (_t, d) = stories_copy();
    let h = serde_json::json!({"model.norm.weight": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}});
    std::fs::write(
        d.join("model.safetensors"),
        safetensors_bytes(&h, &[0u8; 8]),
    )
    .unwrap();
    assert_clean_failure(
        &d,
        &[
            "model.safetensors",
            "model.norm.weight",
            "unsupported dtype I64",
        ],
    );
}

#[test]
fn nan_weight() {
    let (_t, d) = stories_copy();
    poison_f16(&d, "model.norm.weight", 3);
    // `info` reads metadata only; loading the weights finds the NaN.
    let m = d.to_str().unwrap();
    assert_fails(
        &[vec!["generate", "--model", m, "--prompt", "hi"]],
        &["model.safetensors", "model.norm.weight", "non-finite"],
    );
}

#[test]
fn unknown_architecture() {
    let (_t, d) = stories_copy();
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
    std::fs::write(
        d.join("config.json"),
        cfg.replace("\"model_type\": \"llama\"", "\"model_type\": \"gpt_neox\""),
    )
    .unwrap();
    assert_clean_failure(&d, &["config.json", "gpt_neox", "llama, mistral, qwen2"]);
}

#[test]
fn mismatched_tokenizer() {
    let (_t, d) = stories_copy();
    std::fs::copy(
        shared().join("models/smollm2-135m-instruct/tokenizer.json"),
        d.join("tokenizer.json"),
    )
    .unwrap();
    assert_clean_failure(&d, &["tokenizer.json", "mismatched tokenizer"]);
}

#[test]
fn not_a_model_file() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("notes.txt");
    std::fs::write(&p, "hello").unwrap();
    assert_clean_failure(&p, &["notes.txt", "not a model"]);
}

fn gguf_copy(edit: impl FnOnce(&mut Vec<u8>)) -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("model.gguf");
    let mut bytes = std::fs::read(smollm2_gguf()).unwrap();
    edit(&mut bytes);
    std::fs::write(&p, &bytes).unwrap();
    (t, p)
}

#[test]
fn gguf_bad_magic() {
    let (_t, p) = gguf_copy(|b| b[..4].copy_from_slice(b"GGUX"));
    assert_clean_failure(&p, &["model.gguf", "invalid GGUF"]);
}

#[test]
fn gguf_bad_counts() {
    // Version 3: magic, u32 version, u64 tensor count, u64 metadata count.
    let (_t, p) = gguf_copy(|b| b[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes()));
    assert_clean_failure(&p, &["model.gguf", "invalid GGUF"]);
    let (_t, p) = gguf_copy(|b| b[16..24].copy_from_slice(&(1u64 << 33).to_le_bytes()));
    assert_clean_failure(&p, &["model.gguf", "invalid GGUF"]);
}

#[test]
fn gguf_truncated_data() {
    let (_t, p) = gguf_copy(|b| b.truncate(b.len() - 1000));
    assert_clean_failure(&p, &["model.gguf", "truncated"]);
}

#[test]
fn convert_refuses_to_overwrite_and_leaves_nothing_on_failure() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("mine.txt"), "keep me").unwrap();
    let g = smollm2_gguf();
    let r = tandem(&[
        "convert",
        g.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("--force"));
    assert_eq!(
        std::fs::read_to_string(out.join("mine.txt")).unwrap(),
        "keep me"
    );
    // A failing conversion (truncated input) leaves no output and no temporary behind.
    let (_g, bad) = gguf_copy(|b| b.truncate(b.len() - 1000));
    let out2 = t.path().join("out2");
    let r = tandem(&[
        "convert",
        bad.to_str().unwrap(),
        "--out",
        out2.to_str().unwrap(),
    ]);
    assert!(!r.status.success());
    let left: Vec<_> = std::fs::read_dir(t.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("out")],
        "left behind: {left:?}"
    );
}
