//! Bad input gets a one-line error naming the file (and tensor) and a non-zero exit, never a
//! panic; nothing half-written is left behind.
//!
//! Every bad-input case the project checks, and where:
//!
//! | case | test |
//! |---|---|
//! | missing config.json / tokenizer.json / model path | `missing_config`, `missing_tokenizer`, `missing_model_path` |
//! | safetensors truncated, header length past the end, offsets out of range or overlapping | `truncated_safetensors`, `header_length_past_end_of_file`, `tensor_offsets_out_of_range_or_overlapping` |
//! | shard index pointing outside the model folder | `shard_index_outside_model_folder_is_refused` |
//! | shape disagreeing with config.json, unsupported dtype, NaN weight | `shape_disagrees_with_config`, `unsupported_dtype`, `nan_weight` |
//! | unknown architecture, mismatched tokenizer, not a model | `unknown_architecture`, `mismatched_tokenizer`, `not_a_model_file` |
//! | GGUF bad magic, counts past the file, truncated data | `gguf_bad_magic`, `gguf_bad_counts`, `gguf_truncated_data` |
//! | convert over an existing folder, failing convert leaves nothing | `convert_refuses_to_overwrite_and_leaves_nothing_on_failure` |
//! | issue 15's probing: alignment 0, 2^31 context, 2^31 layers, NaN or infinite RMS epsilon, RoPE base and scaling factor, 10^6-token vocabulary, misaligned offset, escape sequences and 2 KB names, duplicate keys, bad sweep variant, a draft with other tokens, `--max-tokens 0`, `--draft-p-min 2`/`NaN`, `--ctx 0`, `--draft-max 10⁹`, `--threads 100000`, `bench --pp 10⁹`, `quantize --calib-self 10¹²`; chat templates in the file that build a 2⁴⁰-element list or string, loop 10¹⁰ times, print 200 MB, nest a list 90,000 deep or compare for minutes; a config.json linked to /dev/zero, `--chat-template /dev/zero`; a named pipe as `quantize --out … --force` or `eval --cache` | `hostile_input_matrix` (one row each, below) |
//! | quantize: existing output without --force, NaN source tensor, policy and recipe errors | quantize.rs `refuses_overwrite_and_nan_and_leaves_nothing_behind`, `policy_errors_and_recipes` |
//! | SIGINT / SIGTERM / SIGHUP during quantize, convert, calibrate, eval, sweeps | signals.rs |
//! | C ABI: NULL verifier, NULL forward/rollback, vocab_size 0 or 2^64−1, context_limit 0, draft vocabulary differing, an engine error | tests/c/engine.c (run by c_abi.rs) |
//! | a draft whose vocabulary size differs (library) | speculate.rs `mismatched_vocabularies_are_refused` |
//! | quantized checkpoints (issue 17): integer tensors without a quantization_config, unsupported quant_method / type / strategy / bits, group size or bits contradicting the tensors, asymmetric without zero points, an implausible weight_shape, g_idx out of range, a missing scale, stray integer tensors | interop.rs `bad_quantized_checkpoints_are_one_line_errors_naming_the_field_or_tensor`; GPTQ/AWQ layouts' short tensors and g_idx in `model::packed` unit tests |
//! | random and field-wise mutations of every reader | `scripts/fuzz.sh` (fuzz/, a short run in CI) |

use crate::common::*;
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

// ---------------------------------------------------------------------------------------------
// The hostile-input matrix: each row is one case found by probing (issue 15), what is done to
// a real file or to the command line, and what the one-line error must say. Rows whose
// `needles` are empty must *succeed* (hostile but valid: bounded time and memory).
// ---------------------------------------------------------------------------------------------

use candle_core::quantized::gguf_file::Value;
use tandem_quantize::gguf_writer::{GgufLayout, TensorEntry};

/// stories260K written as a GGUF by tandem itself, the base every GGUF row edits.
fn stories_gguf(dir: &Path) -> PathBuf {
    stories_gguf_in(dir, "base.gguf")
}

/// Rewrites a GGUF: its metadata and tensor table go through `edit`, then the header is laid
/// out again and each tensor's bytes copied to its (possibly edited) offset.
fn edit_gguf(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(&mut Vec<(String, Value)>, &mut Vec<TensorEntry>),
) {
    let bytes = std::fs::read(src).unwrap();
    let c = tandem_model::gguf_reader::read_header(src, &bytes).unwrap();
    let mut meta: Vec<(String, Value)> = c.metadata.into_iter().collect();
    meta.sort_by(|a, b| a.0.cmp(&b.0));
    let mut infos: Vec<_> = c.tensor_infos.into_iter().collect();
    infos.sort_by_key(|(_, i)| i.offset);
    let base = c.tensor_data_offset as usize;
    let mut tensors = Vec::new();
    let mut data = Vec::new();
    for (name, info) in &infos {
        let elems = info.shape.elem_count();
        let size = elems / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
        let start = base + info.offset as usize;
        data.push(bytes[start..start + size].to_vec());
        tensors.push(TensorEntry {
            name: name.clone(),
            dims: info.shape.dims().iter().rev().map(|&d| d as u64).collect(),
            ggml_type: tandem_model::gguf_reader::ggml_type_id(info.ggml_dtype),
            size: size as u64,
            offset: info.offset,
        });
    }
    edit(&mut meta, &mut tensors);
    let layout = GgufLayout {
        metadata: meta,
        tensors: tensors.clone(),
    };
    let mut out = layout.header();
    let start = out.len();
    for (t, d) in tensors.iter().zip(&data) {
        let at = start + t.offset as usize;
        if out.len() < at + d.len() {
            out.resize((at + d.len()).next_multiple_of(32), 0);
        }
        out[at..at + d.len().min(t.size as usize)]
            .copy_from_slice(&d[..d.len().min(t.size as usize)]);
    }
    std::fs::write(dst, out).unwrap();
}

fn set_meta(meta: &mut Vec<(String, Value)>, key: &str, v: Value) {
    meta.retain(|(k, _)| k != key);
    meta.push((key.to_string(), v));
}

/// A stories260K folder whose config.json has `key` set to the JSON `value`.
fn hf_with_config(dir: &Path, key: &str, value: serde_json::Value) -> PathBuf {
    let d = stories_copy_in(dir);
    let p = d.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg[key] = value;
    std::fs::write(&p, cfg.to_string()).unwrap();
    d
}

/// A name no terminal should see raw: an escape sequence, a carriage return, then 2 KB.
fn evil_name() -> String {
    format!("\u{1b}[31mred\u{7}\r{}", "A".repeat(2000))
}

struct Case {
    /// What the row tests (issue 15's numbering where it has one).
    name: &'static str,
    /// Makes the input in the given folder; returns the arguments to run (`{}` = the input).
    setup: fn(&Path) -> (PathBuf, Vec<&'static str>),
    /// Every string the one-line error must contain; empty: the command must succeed.
    needles: &'static [&'static str],
}

const GEN: &[&str] = &[
    "generate",
    "--model",
    "{}",
    "--prompt",
    "Once",
    "--max-tokens",
    "2",
];
const INFO: &[&str] = &["info", "{}"];

const CASES: &[Case] = &[
    Case {
        name: "1. GGUF general.alignment = 0",
        setup: |d| {
            let p = d.join("align0.gguf");
            edit_gguf(&stories_gguf(d), &p, |m, _| {
                set_meta(m, "general.alignment", Value::U32(0))
            });
            (p, GEN.to_vec())
        },
        needles: &[
            "align0.gguf",
            "general.alignment must be a u32 power of two",
        ],
    },
    Case {
        name: "1b. GGUF general.alignment = 0 reaches convert and quantize cleanly too",
        setup: |d| {
            let p = d.join("align0.gguf");
            edit_gguf(&stories_gguf(d), &p, |m, _| {
                set_meta(m, "general.alignment", Value::U32(0))
            });
            (
                p,
                vec!["quantize", "{}", "--out", "/nonexistent-dir/x.gguf"],
            )
        },
        needles: &["align0.gguf", "general.alignment"],
    },
    Case {
        name: "2. GGUF llama.context_length = 2^31 loads in bounded memory and generates",
        setup: |d| {
            let p = d.join("ctx.gguf");
            edit_gguf(&stories_gguf(d), &p, |m, _| {
                set_meta(m, "llama.context_length", Value::U32(1 << 31))
            });
            (p, GEN.to_vec())
        },
        needles: &[],
    },
    Case {
        name: "2b. config.json max_position_embeddings = 2^62 generates",
        setup: |d| {
            (
                hf_with_config(d, "max_position_embeddings", (1u64 << 62).into()),
                GEN.to_vec(),
            )
        },
        needles: &[],
    },
    Case {
        name: "3. GGUF block_count = 2^31 - 1",
        setup: |d| {
            let p = d.join("layers.gguf");
            edit_gguf(&stories_gguf(d), &p, |m, _| {
                set_meta(m, "llama.block_count", Value::U32(i32::MAX as u32))
            });
            (p, INFO.to_vec())
        },
        needles: &["layers.gguf", "declares 2147483647 layers", "tensors"],
    },
    Case {
        name: "3b. config.json num_hidden_layers = 1e8",
        setup: |d| {
            (
                hf_with_config(d, "num_hidden_layers", 100_000_000.into()),
                INFO.to_vec(),
            )
        },
        needles: &["declares 100000000 layers"],
    },
    Case {
        name: "3c. GGUF with 10^6 tokens in its vocabulary (the model has 512) is refused",
        setup: |d| {
            let p = d.join("vocab.gguf");
            edit_gguf(&stories_gguf(d), &p, |m, _| {
                let n = 1_000_000;
                let tokens = (0..n).map(|i| Value::String(format!("t{i}"))).collect();
                set_meta(m, "tokenizer.ggml.tokens", Value::Array(tokens));
                set_meta(
                    m,
                    "tokenizer.ggml.scores",
                    Value::Array(vec![Value::F32(0.0); n]),
                );
                set_meta(
                    m,
                    "tokenizer.ggml.token_type",
                    Value::Array(vec![Value::I32(1); n]),
                );
            });
            (p, INFO.to_vec())
        },
        needles: &["vocab.gguf", "1000000 tokens", "mismatched tokenizer"],
    },
    Case {
        name: "5. GGUF tensor offset not a multiple of the alignment",
        setup: |d| {
            let p = d.join("misaligned.gguf");
            // The last tensor moved 8 bytes on: still inside the file, overlapping nothing.
            edit_gguf(&stories_gguf(d), &p, |_, t| {
                if let Some(last) = t.last_mut() {
                    last.offset += 8;
                }
            });
            (p, GEN.to_vec())
        },
        needles: &["misaligned.gguf", "not a multiple of the alignment 32"],
    },
    Case {
        name: "6. escape sequences and a 2 KB tensor name are escaped and cut",
        setup: |d| {
            let p = d.join("evil.gguf");
            edit_gguf(&stories_gguf(d), &p, |_, t| {
                t[0].name = evil_name();
                t[0].dims = vec![0];
            });
            (p, INFO.to_vec())
        },
        needles: &[
            "evil.gguf",
            "\\u{1b}[31mred",
            "more characters)",
            "has dimension 0",
        ],
    },
    Case {
        name: "6b. GGUF metadata key appearing twice",
        setup: |d| {
            let p = d.join("dupkey.gguf");
            edit_gguf(&stories_gguf(d), &p, |m, _| {
                m.push(("general.name".into(), Value::String("a".into())));
                m.push(("general.name".into(), Value::String("b".into())));
            });
            (p, INFO.to_vec())
        },
        needles: &["dupkey.gguf", "'general.name' appears twice"],
    },
    Case {
        name: "7. quantize --sweep with a bad variant creates no folder",
        setup: |d| {
            let out = d.join("sweep-out");
            let st = stories();
            let text = st.join("reference.json");
            let args: Vec<&'static str> = vec![
                "quantize",
                leak(st),
                "--sweep",
                "q8_0,bogus",
                "--eval-text",
                leak(text),
                "--out-dir",
                leak(out.clone()),
            ];
            (out, args)
        },
        needles: &["sweep variant 'bogus'"],
    },
    Case {
        name: "8. a draft with the same vocabulary size but other tokens",
        setup: |d| {
            let draft = stories_copy_in(d);
            let p = draft.join("tokenizer.json");
            let mut tok: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
            // Swap the ids of two tokens: same size, same strings, other numbering.
            let (a, b) = ("▁the", "▁a");
            let (ia, ib) = (vocab[a].clone(), vocab[b].clone());
            vocab.insert(a.into(), ib);
            vocab.insert(b.into(), ia);
            std::fs::write(&p, tok.to_string()).unwrap();
            let args = vec![
                "generate",
                "--model",
                leak(stories()),
                "--draft",
                "{}",
                "--prompt",
                "Once",
                "--max-tokens",
                "2",
            ];
            (draft, args)
        },
        needles: &["vocabulary differs from the verifier's", "here and"],
    },
    Case {
        name: "9a. generate --max-tokens 0",
        setup: |_| generate_with(&["--max-tokens", "0"]),
        needles: &["--max-tokens must be at least 1"],
    },
    Case {
        name: "9b. --draft-p-min 2",
        setup: |_| generate_with(&["--draft", "ngram", "--draft-p-min", "2"]),
        needles: &["--draft-p-min 2 is not a probability"],
    },
    Case {
        name: "9c. --draft-p-min NaN",
        setup: |_| generate_with(&["--draft", "ngram", "--draft-p-min", "NaN"]),
        needles: &["--draft-p-min NaN is not a probability"],
    },
    Case {
        name: "9d. --ctx 0",
        setup: |_| generate_with(&["--ctx", "0"]),
        needles: &["--ctx must be at least 1"],
    },
    Case {
        name: "9e. --draft-max 10^9 (the controller weighed every length at each step)",
        setup: |_| generate_with(&["--draft", "ngram", "--draft-max", "1000000000"]),
        needles: &["--draft-max 1000000000 is outside 1..=256"],
    },
    Case {
        name: "9f. --threads 100000 (spawned before any check)",
        setup: |_| generate_with(&["--threads", "100000"]),
        needles: &["--threads 100000 is more than 512"],
    },
    Case {
        name: "9g. bench --pp 10^9 is refused before 4 GB of token ids",
        setup: |_| {
            let args = vec!["bench", "--model", "{}", "--pp", "1000000000", "--tg", "0"];
            (stories(), args)
        },
        needles: &["context length exceeded: 1000000000 positions needed"],
    },
    Case {
        name: "9h. quantize --calib-self 10^12 (reserved 4 TB of token ids and aborted)",
        setup: |d| {
            let out = leak(d.join("q.gguf"));
            let args = vec![
                "quantize",
                "{}",
                "--out",
                out,
                "--scheme",
                "q4_0",
                "--method",
                "gptq",
                "--calib-self",
                "1000000000000",
            ];
            (stories(), args)
        },
        needles: &["1000000000000 tokens is more than 1048576"],
    },
    Case {
        name: "3d. GGUF layer_norm_rms_epsilon NaN",
        setup: |d| {
            let p = d.join("eps.gguf");
            edit_gguf(&stories_gguf(d), &p, |m, _| {
                set_meta(
                    m,
                    "llama.attention.layer_norm_rms_epsilon",
                    Value::F32(f32::NAN),
                )
            });
            (p, GEN.to_vec())
        },
        needles: &["eps.gguf", "rms_norm_eps NaN"],
    },
    Case {
        name: "3e. GGUF rope.freq_base infinite",
        setup: |d| {
            let p = d.join("rope.gguf");
            edit_gguf(&stories_gguf(d), &p, |m, _| {
                set_meta(m, "llama.rope.freq_base", Value::F32(f32::INFINITY))
            });
            (p, GEN.to_vec())
        },
        needles: &["rope.gguf", "rope_theta inf"],
    },
    Case {
        name: "3f. GGUF rope.scaling.factor NaN",
        setup: |d| {
            let p = d.join("scale.gguf");
            edit_gguf(&stories_gguf(d), &p, |m, _| {
                set_meta(m, "llama.rope.scaling.type", Value::String("linear".into()));
                set_meta(m, "llama.rope.scaling.factor", Value::F32(f32::NAN))
            });
            (p, GEN.to_vec())
        },
        needles: &["scale.gguf", "factor"],
    },
    #[cfg(unix)]
    Case {
        name: "11a. config.json a symlink to /dev/zero (read until memory ran out; then up to the cap)",
        setup: |d| {
            let dir = stories_copy_in(d);
            std::fs::remove_file(dir.join("config.json")).unwrap();
            std::os::unix::fs::symlink("/dev/zero", dir.join("config.json")).unwrap();
            (dir, INFO.to_vec())
        },
        needles: &["config.json", "is a device"],
    },
    #[cfg(unix)]
    Case {
        name: "11b. --chat-template /dev/zero",
        setup: |_| generate_with(&["--chat", "--chat-template", "/dev/zero"]),
        needles: &["/dev/zero", "is a device"],
    },
    #[cfg(unix)]
    Case {
        name: "12a. quantize --out a named pipe --force (renamed a file over it: /dev/null too)",
        setup: |d| {
            let out = leak(fifo_in(d));
            let args = vec![
                "quantize", "{}", "--out", out, "--scheme", "q8_0", "--force",
            ];
            (stories(), args)
        },
        needles: &["pipe", "is not a regular file or folder"],
    },
    #[cfg(unix)]
    Case {
        name: "12b. eval --cache a named pipe (waited for a writer)",
        setup: |d| {
            let cache = leak(fifo_in(d));
            let out = leak(d.join("report"));
            let text = leak(shared().join("data/austen/emma.txt"));
            let args = vec![
                "eval",
                "--reference",
                "{}",
                "--model",
                "{}",
                "--text",
                text,
                "--ctx",
                "64",
                "--chunks",
                "2",
                "--speed-pp",
                "0",
                "--cache",
                cache,
                "--out",
                out,
            ];
            (stories(), args)
        },
        needles: &["pipe", "is not a regular file or folder"],
    },
    Case {
        name: "10a. GGUF chat template doubling a list 40 times (a 2^40-element allocation)",
        setup: |d| {
            chat_template_gguf(
                d,
                "{% set ns = namespace(s=[1]) %}{% for i in range(40) %}\
                 {% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}",
            )
        },
        needles: &["hostile.gguf", "chat template", "MiB of memory"],
    },
    Case {
        name: "10b. GGUF chat template doubling a string 40 times",
        setup: |d| {
            chat_template_gguf(
                d,
                "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(40) %}\
                 {% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
            )
        },
        needles: &["hostile.gguf", "chat template", "MiB of memory"],
    },
    Case {
        name: "10c. GGUF chat template looping 10^10 times",
        setup: |d| {
            chat_template_gguf(
                d,
                "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
            )
        },
        needles: &["hostile.gguf", "chat template", "out of fuel"],
    },
    Case {
        name: "10e. GGUF chat template nesting a list 90,000 deep (overflowed the stack: abort)",
        setup: |d| {
            chat_template_gguf(
                d,
                "{% set ns = namespace(x=[]) %}{% for i in range(300) %}{% for j in range(300) %}\
                 {% set ns.x = [ns.x] %}{% endfor %}{% endfor %}{{ raise_exception('deep') }}",
            )
        },
        needles: &["hostile.gguf", "chat template", "deep"],
    },
    Case {
        name: "10f. GGUF chat template testing membership in 2^21 items 90,000 times",
        setup: |d| {
            chat_template_gguf(
                d,
                "{% set ns = namespace(b=[1]) %}{% for i in range(21) %}{% set ns.b = ns.b + ns.b %}\
                 {% endfor %}{% set big = ns.b|list %}{% for i in range(300) %}\
                 {% for j in range(300) %}{% if 5 in big %}{% endif %}{% endfor %}{% endfor %}",
            )
        },
        needles: &["hostile.gguf", "chat template", "took more than 5 s"],
    },
    Case {
        name: "10d. GGUF chat template printing 200 MB (19 GB and a minute in the tokenizer)",
        setup: |d| {
            chat_template_gguf(
                d,
                "{% for i in range(99999) %}{{ 'hello world ' * 170 }}{% endfor %}",
            )
        },
        needles: &["hostile.gguf", "chat template", "bytes of text from"],
    },
];

/// `generate --chat` on stories260K as a GGUF whose `tokenizer.chat_template` is `template`
/// (the Jinja of a model file is code from the file, see `model::chat`).
fn chat_template_gguf(dir: &Path, template: &str) -> (PathBuf, Vec<&'static str>) {
    let p = dir.join("hostile.gguf");
    edit_gguf(&stories_gguf(dir), &p, |m, _| {
        set_meta(
            m,
            tandem_model::gguf_keys::tokenizer::CHAT_TEMPLATE,
            Value::String(template.to_string()),
        )
    });
    let args = vec![
        "generate",
        "--model",
        "{}",
        "--chat",
        "--prompt",
        "hi",
        "--max-tokens",
        "2",
    ];
    (p, args)
}

/// A named pipe called `pipe` in `dir`.
#[cfg(unix)]
fn fifo_in(dir: &Path) -> PathBuf {
    let p = dir.join("pipe");
    let made = std::process::Command::new("mkfifo")
        .arg(&p)
        .status()
        .unwrap();
    assert!(made.success());
    p
}

/// `generate` on the bundled model with `extra` flags.
fn generate_with(extra: &[&'static str]) -> (PathBuf, Vec<&'static str>) {
    let mut args = vec!["generate", "--model", "{}", "--prompt", "a"];
    args.extend_from_slice(extra);
    (stories(), args)
}

fn leak(p: PathBuf) -> &'static str {
    Box::leak(p.to_string_lossy().into_owned().into_boxed_str())
}

#[test]
fn hostile_input_matrix() {
    let mut failures = Vec::new();
    for case in CASES {
        let tmp = tempfile::tempdir().unwrap();
        let (input, args) = (case.setup)(tmp.path());
        let input = input.to_string_lossy().into_owned();
        let args: Vec<&str> = args
            .iter()
            .map(|a| if *a == "{}" { input.as_str() } else { *a })
            .collect();
        let out = tandem(&args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        let problem = if case.needles.is_empty() {
            (!out.status.success()).then(|| format!("failed: {err}"))
        } else if out.status.success() {
            Some("succeeded on bad input".into())
        } else if err.contains("panicked") || err.trim().lines().count() != 1 {
            Some(format!("not one clean line: {err}"))
        } else if err.contains('\u{1b}') || err.len() > 1200 {
            Some(format!("raw control characters or {} bytes", err.len()))
        } else {
            case.needles
                .iter()
                .find(|n| !err.contains(**n))
                .map(|n| format!("'{n}' not in: {err}"))
        };
        // Nothing may be left where an output was asked for (the sweep row's folder).
        if case.name.starts_with("7.") && Path::new(&input).exists() {
            failures.push(format!("{}: left {input} behind", case.name));
        }
        if let Some(p) = problem {
            failures.push(format!("{}: {p}", case.name));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
