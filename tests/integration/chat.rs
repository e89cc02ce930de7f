//! Chat templates (issue 19, requirement 5): `generate --chat`, `tandem chat` (KV cache kept
//! between turns), `bench spec --chat`, and the error for a model without a template.

use crate::common::*;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// ChatML, as SmolLM2-Instruct's template without its default system prompt.
const CHATML: &str = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

#[test]
fn a_model_without_a_template_names_the_option() {
    let out = tandem(&[
        "generate",
        "--model",
        s(&stories()),
        "--prompt",
        "Hi",
        "--chat",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("has no chat template") && err.contains("--chat-template FILE"),
        "{err}"
    );
}

#[test]
fn chat_keeps_the_cache_between_turns_and_generate_chat_renders_the_template() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().join("chatml.jinja");
    std::fs::write(&t, CHATML).unwrap();
    // generate --chat: the prompt as the template renders it.
    let out = tandem(&[
        "generate",
        "--model",
        s(&stories()),
        "--chat",
        "--chat-template",
        s(&t),
        "--system",
        "Be kind.",
        "--prompt",
        "Tell me a story",
        "--max-tokens",
        "8",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nTell me a story<|im_end|>\n<|im_start|>assistant\n"),
        "{text}"
    );
    // chat: two turns on stdin; the second reuses the first turn's cache.
    let mut child = Command::new(bin())
        .args([
            "chat",
            "--model",
            s(&stories()),
            "--chat-template",
            s(&t),
            "--max-tokens",
            "12",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Once upon a time\nWhat happened next?\n/exit\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let answers = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .count();
    assert!(answers >= 2, "{answers} answers");
    let reused = |turn: usize| -> usize {
        let line = err
            .lines()
            .find(|l| l.starts_with(&format!("[turn {turn}:")))
            .unwrap_or_else(|| panic!("no turn {turn} in {err}"));
        let (_, after) = line.split_once('(').unwrap();
        after.split_whitespace().next().unwrap().parse().unwrap()
    };
    assert_eq!(reused(1), 0);
    assert!(
        reused(2) > 10,
        "the second turn recomputed the first: {err}"
    );
}

#[test]
fn smollm2_answers_in_its_own_template() {
    let m = smollm2_f16();
    let out = tandem(&[
        "generate",
        "--model",
        s(&m),
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--max-tokens",
        "12",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"),
        "{text}"
    );
    assert!(text.contains("Paris"), "{text}");
    // bench spec --chat applies it to every prompt, and says where the time went.
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("p.jsonl");
    let json = tmp.path().join("bench.json");
    std::fs::write(&prompts, "{\"prompt\": \"Name three colors.\"}\n").unwrap();
    let out = tandem(&[
        "bench",
        "spec",
        "--model",
        s(&m),
        "--draft",
        "ngram",
        "--prompts",
        s(&prompts),
        "--chat",
        "--max-tokens",
        "16",
        "--json",
        s(&json),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("where the time went: plain"), "{text}");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let t = &doc["total"]["time"];
    let f = |k: &str| t[k].as_f64().unwrap_or_else(|| panic!("no {k} in {t}"));
    // The parts add up to the whole, and a plain step was timed.
    let parts = f("draft_s") + f("verify_s") + f("spec_other_s");
    assert!((parts - f("spec_s")).abs() < 1e-6, "{t}");
    assert!(
        f("plain_step_ms") > 0.0 && f("verify_ms_per_pass") > 0.0,
        "{t}"
    );
    assert!(
        f("plain_prefill_s") > 0.0 && f("plain_decode_s") > 0.0,
        "{t}"
    );
    let steps = f("verify_ms_per_pass") / f("plain_step_ms");
    assert!(
        (steps - f("verifier_pass_in_plain_steps")).abs() < 1e-9,
        "{t}"
    );
    // The speculative run's prefill is timed on its own, inside the rest, and decoding alone
    // is the whole run's rate with each prefill left out.
    assert!(
        f("spec_prefill_s") > 0.0 && f("spec_prefill_s") <= f("spec_other_s"),
        "{t}"
    );
    let tokens = doc["prompts"][0]["generated_tokens"].as_f64().unwrap();
    let decode_rate = tokens / (f("spec_s") - f("spec_prefill_s"));
    assert!(
        (decode_rate - f("spec_decode_tok_s")).abs() < 1e-6 * decode_rate,
        "{t}"
    );
    assert!(
        (f("decode_speedup") - f("spec_decode_tok_s") / f("plain_decode_tok_s")).abs() < 1e-9,
        "{t}"
    );
    assert!(text.contains("decoding alone (prefill left out)"), "{text}");
}

/// `tandem chat --draft`: the same answers as plain chat, turn after turn, with the cache kept
/// between turns and the draft's statistics on each turn's line.
#[test]
fn chat_with_a_draft_answers_as_plain_chat_and_keeps_the_cache() {
    let m = smollm2_f16();
    let turns = b"What is the capital of France?\nAnd of Italy?\n/exit\n";
    let run = |extra: &[&str]| {
        let mut child = Command::new(bin())
            .args(["--threads", "2", "chat", "--model", s(&m)])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(turns).unwrap();
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{err}");
        (String::from_utf8_lossy(&out.stdout).to_string(), err)
    };
    let (plain, plain_err) = run(&["--max-tokens", "24"]);
    let (spec, err) = run(&["--max-tokens", "24", "--draft", "suffix+self:q8_0@all"]);
    assert!(plain.contains("Paris"), "{plain}");
    assert_eq!(spec, plain, "{err}");
    // The second turn's line: its tokens reused from the cache.
    let second = |err: &str| {
        let line = err
            .lines()
            .find(|l| l.starts_with("[turn 2:"))
            .unwrap_or_else(|| panic!("no second turn in {err}"))
            .to_string();
        let reused: usize = line
            .split_once('(')
            .and_then(|(_, r)| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{line}"));
        (line, reused)
    };
    let (line, reused) = second(&err);
    assert!(line.contains("drafted accepted"), "{line}");
    assert!(reused > 30, "the second turn recomputed the first: {line}");
    // A speculative turn leaves the cache where plain chat's ends, so the next turn's
    // prompt pass runs the same positions either way (`tandem_model::Logits`).
    assert_eq!(reused, second(&plain_err).1, "{line}\n{plain_err}");
    // Turns cut off by --max-tokens, whose last token may be an accepted draft the verifier
    // ran, where plain chat runs it in the next turn's prompt.
    let (plain, plain_err) = run(&["--max-tokens", "5"]);
    let (spec, err) = run(&["--max-tokens", "5", "--draft", "suffix+self:q8_0@all"]);
    assert_eq!(spec, plain, "{err}");
    assert_eq!(second(&err).1, second(&plain_err).1, "{err}\n{plain_err}");
}

/// `bench spec --chat --prompts`: conversations (`messages`, ShareGPT's `conversations`, a
/// `system` beside the prompt) are rendered whole by the template, a dataset's last answer is
/// cut off, and a conversation without `--chat` is a one-line error naming the file.
#[test]
fn bench_spec_renders_conversations_from_the_prompts_file() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().join("chatml.jinja");
    std::fs::write(&t, CHATML).unwrap();
    let prompts = tmp.path().join("p.jsonl");
    std::fs::write(
        &prompts,
        concat!(
            "{\"messages\": [{\"role\": \"user\", \"content\": \"Tell me a story\"}, {\"role\": \"assistant\", \"content\": \"Once upon a time\"}, {\"role\": \"user\", \"content\": \"Go on\"}]}\n",
            "{\"conversations\": [{\"from\": \"human\", \"value\": \"Hi\"}, {\"from\": \"gpt\", \"value\": \"Hello\"}]}\n",
            "{\"system\": \"Be kind.\", \"prompt\": \"Lily\"}\n",
        ),
    )
    .unwrap();
    let json = tmp.path().join("out.json");
    let model = stories();
    let args = |chat: bool| {
        let mut v = vec![
            "bench",
            "spec",
            "--model",
            s(&model),
            "--draft",
            "ngram",
            "--prompts",
            s(&prompts),
            "--max-tokens",
            "4",
            "--json",
            s(&json),
        ];
        if chat {
            v.extend(["--chat", "--chat-template", s(&t)]);
        }
        v.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |chat| tandem(&args(chat).iter().map(String::as_str).collect::<Vec<_>>());
    let out = run(true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let got: Vec<&str> = doc["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["prompt"].as_str().unwrap())
        .collect();
    let turn = |r: &str, c: &str| format!("<|im_start|>{r}\n{c}<|im_end|>\n");
    let open = "<|im_start|>assistant\n";
    assert_eq!(
        got,
        vec![
            format!(
                "{}{}{}{open}",
                turn("user", "Tell me a story"),
                turn("assistant", "Once upon a time"),
                turn("user", "Go on")
            ),
            format!("{}{open}", turn("user", "Hi")),
            format!(
                "{}{}{open}",
                turn("system", "Be kind."),
                turn("user", "Lily")
            ),
        ]
    );
    std::fs::remove_file(&json).unwrap();
    let out = run(false);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("p.jsonl") && err.contains("prompt 1") && err.contains("needs --chat"),
        "{err}"
    );
    assert!(!json.exists(), "no output on an error");
}
