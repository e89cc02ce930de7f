//! `tandem eval` and `tandem quantize --sweep` end to end on stories260K (reports validated
//! against the schema, cache reuse and invalidation, bad input), and the HTML report rendered
//! by headless Chromium.

use crate::common::*;
use std::path::Path;
use tandem_eval::Report;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn run(args: &[&str]) -> (bool, String, String) {
    let o = tandem(args);
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn wiki() -> std::path::PathBuf {
    shared().join("data/wikitext-2-raw/wiki.test.raw")
}

fn read_report(dir: &Path) -> Report {
    let text = std::fs::read_to_string(dir.join("report.json")).unwrap();
    let r: Report = serde_json::from_str(&text).expect("report.json follows the schema");
    assert_eq!(r.schema_version, tandem_eval::report::SCHEMA_VERSION);
    r
}

/// Two quantized copies of stories260K (every matrix at q8_0 / q4_0).
fn variants(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let mut out = Vec::new();
    for t in ["q8_0", "q4_0"] {
        let f = dir.join(format!("stories-{t}.gguf"));
        let (ok, _, err) = run(&[
            "quantize",
            s(&stories()),
            "--out",
            s(&f),
            "--scheme",
            t,
            "--attention",
            t,
            "--embeddings",
            t,
            "--quiet",
        ]);
        assert!(ok, "{err}");
        out.push(f);
    }
    (out[0].clone(), out[1].clone())
}

#[test]
fn eval_report_is_consistent_cached_and_rendered() {
    let tmp = tempfile::tempdir().unwrap();
    let (q8, q4) = variants(tmp.path());
    let rep = tmp.path().join("report");
    let (st, wk) = (stories(), wiki());
    let args = [
        "eval",
        "--reference",
        s(&st),
        "--model",
        s(&q8),
        "--model",
        s(&q4),
        "--text",
        s(&wk),
        "--ctx",
        "128",
        "--chunks",
        "6",
        "--out",
        s(&rep),
        "--quiet",
    ];
    let (ok, _, err) = run(&args);
    assert!(ok, "{err}");
    let r = read_report(&rep);
    assert_eq!(r.text.scored_tokens, 6 * (128 - 1 - 64));
    assert_eq!(r.models.len(), 2);
    let (a, b) = (&r.models[0], &r.models[1]);
    let (qa, qb) = (a.quality.as_ref().unwrap(), b.quality.as_ref().unwrap());
    // More bits, closer to the reference, on every measure.
    assert!(
        qa.kl.mean < qb.kl.mean && qa.top1_agreement > qb.top1_agreement,
        "{qa:?} {qb:?}"
    );
    assert!(a.size.bytes > b.size.bytes && a.size.bits_per_weight > b.size.bits_per_weight);
    assert!(qa.kl.mean >= 0.0 && qa.kl.median <= qa.kl.p99 && qa.kl.p99 <= qa.kl.max);
    assert!((qa.ppl_ratio - a.ppl / r.reference.ppl).abs() < 1e-6);
    // The candidate's PPL is the one `tandem perplexity` computes on the same chunks.
    let (ok, out, err) = run(&[
        "perplexity",
        "--model",
        s(&q4),
        "--text",
        s(&wiki()),
        "--ctx",
        "128",
        "--chunks",
        "6",
        "--quiet",
    ]);
    assert!(ok, "{err}");
    let ppl: f64 = out.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!((ppl - b.ppl).abs() < 1e-3 * ppl, "{ppl} vs {}", b.ppl);
    // Weight error: every 2-D weight, grouped per kind and per layer; q4 worse than q8.
    let (wa, wb) = (a.weights.as_ref().unwrap(), b.weights.as_ref().unwrap());
    assert_eq!(wa.per_layer.len(), 5);
    assert!(wa
        .per_kind
        .iter()
        .any(|g| g.group == "attention" && g.types == "Q8_0"));
    assert!(wa.per_kind[0].rel_rms_error < wb.per_kind[0].rel_rms_error);
    assert_eq!(r.pareto_front().len(), 2);
    assert!(a.speed.as_ref().unwrap().decode_tok_s > 0.0);
    let md = std::fs::read_to_string(rep.join("report.md")).unwrap();
    assert!(
        md.contains("| model | size MiB") && md.contains("stories-q4_0"),
        "{md}"
    );
    let html = std::fs::read_to_string(rep.join("report.html")).unwrap();
    assert_eq!(html.matches("<svg").count(), 3, "three inline charts");
    assert!(!html.contains("<script"), "the page needs no scripts");

    // A second run reuses the reference pass; an existing report needs --force.
    let (ok, _, err) = run(&args);
    assert!(!ok && err.contains("--force"), "{err}");
    let (ok, _, err) = run(&[&args[..], &["--force"]].concat());
    assert!(ok && err.contains("reusing"), "{err}");
    let r2 = read_report(&rep);
    assert_eq!(r2.models[1].quality, r.models[1].quality);
    // A damaged cache (one byte in its data flipped) fails its chunk's checksum: the pass is
    // recomputed, and the numbers are the first run's, not the damaged bytes'.
    let cache = rep.join("reference-cache.bin");
    let mut bytes = std::fs::read(&cache).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&cache, bytes).unwrap();
    let (ok, _, err) = run(&[&args[..], &["--force"]].concat());
    assert!(ok && !err.contains("reusing"), "{err}");
    assert_eq!(read_report(&rep).models[1].quality, r.models[1].quality);
    // Another text invalidates the cache.
    let other = tmp.path().join("other.txt");
    std::fs::write(
        &other,
        std::fs::read_to_string(shared().join("data/austen/emma.txt")).unwrap(),
    )
    .unwrap();
    let (ok, _, err) = run(&[
        "eval",
        "--reference",
        s(&stories()),
        "--model",
        s(&q8),
        "--text",
        s(&other),
        "--ctx",
        "128",
        "--chunks",
        "2",
        "--out",
        s(&rep),
        "--cache",
        s(&rep.join("reference-cache.bin")),
        "--force",
    ]);
    assert!(ok && !err.contains("reusing"), "{err}");

    // The HTML renders in headless Chromium to a page that is not blank.
    let png = tmp.path().join("shot.png");
    let r = std::process::Command::new("bash")
        .arg(root().join("scripts/render-report.sh"))
        .args([rep.join("report.html"), png.clone()])
        .output()
        .unwrap();
    if r.status.code() == Some(3) {
        eprintln!("skipped: chromium is not installed (apt-get install chromium)");
        return;
    }
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let px = info.color_type.samples();
    let pixels: Vec<&[u8]> = buf[..info.buffer_size()].chunks_exact(px).collect();
    let non_white = pixels
        .iter()
        .filter(|p| p.iter().take(3).any(|&c| c < 200))
        .count();
    let mut colors: Vec<&[u8]> = pixels.iter().step_by(7).copied().collect();
    colors.sort();
    colors.dedup();
    assert!(
        non_white * 100 > pixels.len(),
        "screenshot is blank ({non_white} dark pixels)"
    );
    assert!(
        colors.len() > 20,
        "screenshot has only {} colours",
        colors.len()
    );
}

#[test]
fn sweep_quantizes_reuses_and_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sweep");
    let (st, wk) = (stories(), wiki());
    let args = [
        "quantize",
        s(&st),
        "--sweep",
        "q8_0,q4_0@all",
        "--eval-text",
        s(&wk),
        "--out-dir",
        s(&dir),
        "--ctx",
        "128",
        "--chunks",
        "3",
        "--speed-pp",
        "0",
        "--quiet",
    ];
    let (ok, _, err) = run(&args);
    assert!(ok, "{err}");
    assert!(dir.join("q8_0.gguf").exists() && dir.join("q4_0-all.gguf").exists());
    let r = read_report(&dir);
    assert_eq!(
        r.models.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
        ["q8_0", "q4_0-all"]
    );
    // Attention is 16-bit in the default-policy variant, quantized in the @all one.
    let kinds = |i: usize| r.models[i].weights.as_ref().unwrap().per_kind.clone();
    assert!(kinds(0)
        .iter()
        .any(|g| g.group == "attention" && g.types == "F16"));
    assert!(kinds(1)
        .iter()
        .any(|g| g.group == "attention" && g.types == "Q4_0"));
    assert!(r.models[0].speed.is_none());
    let (ok, _, err) = run(&args);
    assert!(
        ok && err.contains("kept from an earlier run") && err.contains("reusing"),
        "{err}"
    );
    let (ok, _, err) = run(&[
        "quantize",
        s(&st),
        "--sweep",
        "q4_k+imatrix",
        "--eval-text",
        s(&wk),
        "--out-dir",
        s(&dir),
    ]);
    assert!(!ok && err.contains("needs --imatrix"), "{err}");
}

#[test]
fn eval_bad_input_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (q8, _) = variants(tmp.path());
    let short = tmp.path().join("short.txt");
    std::fs::write(&short, "Once upon a time.").unwrap();
    let out = tmp.path().join("r");
    let (st, wk) = (stories(), wiki());
    let base = [
        "eval",
        "--reference",
        s(&st),
        "--out",
        s(&out),
        "--ctx",
        "128",
    ];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--model", s(&q8), "--text", s(&short)],
            "fewer than one chunk",
        ),
        (
            vec!["--model", "/nonexistent.gguf", "--text", s(&wk)],
            "/nonexistent.gguf",
        ),
        (
            vec!["--model", s(&q8), "--text", "/nonexistent.txt"],
            "/nonexistent.txt",
        ),
    ];
    for (extra, needle) in cases {
        let (ok, _, err) = run(&[&base[..], &extra[..]].concat());
        assert!(!ok && !err.contains("panicked"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(needle), "'{needle}' not in {err}");
    }
    // A candidate with another vocabulary.
    let (ok, _, err) = run(&[
        &base[..],
        &["--model", s(&smollm2_gguf()), "--text", s(&wk)],
    ]
    .concat());
    assert!(!ok && err.contains("tokenizer differs"), "{err}");
}
