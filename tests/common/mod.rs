//! Shared helpers for the end-to-end tests: model paths, the reference oracle, the binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The project's root: where it was built, or `TANDEM_ROOT` when the test binaries were
/// built elsewhere (scripts/gpu-bundle.sh carries them to a GPU machine).
pub fn root() -> PathBuf {
    std::env::var_os("TANDEM_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

pub fn stories() -> PathBuf {
    root().join("models/stories260K")
}

/// `../shared` beside the project (present for developers and CI); `TANDEM_SHARED` for a
/// checkout that lies elsewhere; else, for a clone of a local checkout (`git clone . $(mktemp
/// -d)`), the `shared` beside the checkout it was cloned from.
pub fn shared() -> PathBuf {
    if let Some(dir) = std::env::var_os("TANDEM_SHARED") {
        return PathBuf::from(dir);
    }
    let beside = root().join("../shared");
    if beside.is_dir() {
        return beside;
    }
    Command::new("git")
        .arg("-C")
        .arg(root())
        .args(["config", "--get", "remote.origin.url"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .map(|origin| origin.join("../shared"))
        .filter(|p| p.is_dir())
        .unwrap_or(beside)
}

/// The tandem binary built with the tests, or `TANDEM_BIN` (see [`root`]).
pub fn bin() -> PathBuf {
    std::env::var_os("TANDEM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_tandem")))
}

pub fn tandem(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("failed to run tandem")
}

/// The SmolLM2 cache folder, fetched and converted by scripts/fetch-models.sh on first use.
pub fn smollm2_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = Command::new("bash")
            .arg(root().join("scripts/fetch-models.sh"))
            .env("TANDEM_BIN", bin())
            .output()
            .expect("failed to run scripts/fetch-models.sh");
        assert!(
            out.status.success(),
            "fetch-models.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let s = String::from_utf8_lossy(&out.stdout);
        PathBuf::from(
            s.lines()
                .last()
                .expect("fetch-models.sh printed nothing")
                .trim(),
        )
    })
}

pub fn smollm2_gguf() -> PathBuf {
    smollm2_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

pub fn smollm2_f16() -> PathBuf {
    smollm2_dir().join("smollm2-135m-f16")
}

pub fn reference(model_dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(model_dir.join("reference.json")).expect("reference.json");
    serde_json::from_str(&text).expect("reference.json parses")
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array of ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// A writable copy of the bundled model's files in `parent/model`.
pub fn stories_copy_in(parent: &Path) -> PathBuf {
    let dir = parent.join("model");
    std::fs::create_dir(&dir).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(stories().join(f), dir.join(f)).unwrap();
    }
    dir
}

/// Overwrites element `elem` of the F16 tensor `tensor` in `model/model.safetensors` with NaN.
pub fn poison_f16(model: &Path, tensor: &str, elem: usize) {
    let p = model.join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let start = header[tensor]["data_offsets"][0].as_u64().unwrap() as usize;
    let at = 8 + n + start + 2 * elem;
    bytes[at..at + 2].copy_from_slice(&half::f16::NAN.to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
}

/// A loaded model against an independent float32 implementation (`reference_dir`'s
/// reference.json): top-5 logits at every prompt position within `logit_tol`, and the greedy
/// continuation token for token.
pub fn check_llama_against_reference(
    ck: &tandem_model::Checkpoint,
    llama: &tandem_model::Llama,
    reference_dir: &Path,
    logit_tol: f32,
) {
    use tandem_model::{argmax, Logits};
    let r = reference(reference_dir);
    for case in r["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let prompt_ids = ids(&case["prompt_ids"]);
        // Our tokenizer must agree with the reference's (encoded without special tokens).
        assert_eq!(
            ck.tokenizer.encode(prompt, false).unwrap(),
            prompt_ids,
            "{prompt}"
        );
        let mut cache = llama.new_cache().unwrap();
        let logits = llama.forward(&prompt_ids, &mut cache, Logits::All).unwrap();
        let logits: Vec<Vec<f32>> = logits.to_vecs();
        let top5 = case["top5_logits_per_position"].as_array().unwrap();
        assert_eq!(top5.len(), prompt_ids.len());
        let mut worst = 0f32;
        for (pos, entries) in top5.iter().enumerate() {
            for e in entries.as_array().unwrap() {
                let id = e[0].as_u64().unwrap() as usize;
                let want = e[1].as_f64().unwrap() as f32;
                worst = worst.max((logits[pos][id] - want).abs());
            }
        }
        assert!(
            worst <= logit_tol,
            "{}: '{prompt}': worst top-5 logit error {worst}",
            ck.path.display()
        );
        // Greedy continuation, no BOS, as many tokens as the reference gives.
        let want = ids(&case["greedy_ids"]);
        let mut got = Vec::new();
        let mut next = argmax(&logits[prompt_ids.len() - 1]);
        for _ in 0..want.len() {
            got.push(next);
            let l = llama.forward(&[next], &mut cache, Logits::Last).unwrap();
            next = argmax(l.last());
        }
        assert_eq!(
            got,
            want,
            "{}: greedy ids for '{prompt}'",
            ck.path.display()
        );
        assert_eq!(
            ck.tokenizer.decode(&got).unwrap(),
            case["greedy_text"].as_str().unwrap()
        );
    }
}

/// Logits of `toks` fed to a fresh cache in `chunks` (prefill, decode, verification shapes).
pub fn logits_in_chunks(m: &tandem_model::Llama, toks: &[u32], chunks: &[usize]) -> Vec<Vec<f32>> {
    let mut cache = m.new_cache().unwrap();
    let mut out = Vec::new();
    let mut at = 0;
    for &c in chunks {
        let l = m
            .forward(&toks[at..at + c], &mut cache, tandem_model::Logits::All)
            .unwrap();
        out.extend(l.to_vecs());
        at += c;
    }
    assert_eq!(cache.len(), toks.len());
    out
}

/// stories260K quantized by tandem itself (default policy) into `dir/name`, once.
pub fn stories_gguf_in(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    if !p.exists() {
        let st = stories();
        let out = tandem(&[
            "quantize",
            st.to_str().unwrap(),
            "--out",
            p.to_str().unwrap(),
            "--quiet",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    p
}
