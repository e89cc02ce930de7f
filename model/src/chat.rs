//! Chat templates: the model's own Jinja template (tokenizer_config.json `chat_template`, a
//! `chat_template.jinja` beside it, or GGUF `tokenizer.chat_template`) rendered with minijinja,
//! as transformers' `apply_chat_template` renders it: `messages`, `add_generation_prompt`,
//! `bos_token`, `eos_token`, `raise_exception`, and Python's string methods (`.strip()`,
//! `.startswith()`, …) that templates call.

use crate::error::{format_err, io_err, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Instructions a template may run per rendering (minijinja's fuel): SmolLM2's template ran
/// 2,315 for 100 messages, so this is a conversation of tens of thousands of turns, and a loop
/// that a hostile template runs for ever stops within a tenth of a second. It also bounds how
/// deep a template can nest a value (a list inside a list …): ~1.15 instructions a level with
/// 40 literal brackets per statement, so under 900,000 levels (see [`RENDER_STACK`]).
const RENDER_FUEL: u64 = 1_000_000;

/// Stack of the thread a rendering runs on. Dropping, printing, comparing or sorting a nested
/// value recurses once per level: printing measured 262-335 bytes a level (8 and 64 MiB
/// stacks), dropping under 84, so the deepest value the fuel allows needs about 300 MB to
/// print. A template that nested 90,000 levels overflowed the 2 MiB default and aborted the
/// process. The stack is reserved address space; only what a rendering touches is memory.
const RENDER_STACK: usize = 1 << 30;

/// Longest a rendering may take. Fuel counts instructions, not the work inside a builtin: a
/// template can build a list of millions of items and test membership in it in every one of
/// its instructions, or pretty-print a value nested 400,000 deep (quadratic in the depth; it
/// ran past a minute). A real template renders in well under a millisecond.
const RENDER_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// Longest template source compiled: real ones run to tens of KB (tool-calling templates
/// included), and compiling a 52 MB one took 0.9 GB and 2.4 s, outside any rendering's budget.
const MAX_TEMPLATE_BYTES: usize = 1 << 20;

/// Heap a rendering may hold at once (see [`crate::memory_budget`]): this much, plus
/// [`RENDER_MEMORY_PER_INPUT_BYTE`] for each byte of the messages.
const RENDER_MEMORY_BASE: usize = 256 << 20;
const RENDER_MEMORY_PER_INPUT_BYTE: usize = 16;

/// Longest text a rendering may make: this much plus [`RENDER_OUTPUT_PER_INPUT_BYTE`] for
/// each byte of the messages. A real template adds a system prompt and a few tags per
/// message; a hostile one printed 200 MB inside its memory budget, and tokenizing that took
/// 19 GB and a minute before the context check refused it.
const RENDER_OUTPUT_BASE: usize = 1 << 20;
const RENDER_OUTPUT_PER_INPUT_BYTE: usize = 16;

/// The rendered text, refusing to grow past `cap` bytes.
struct CappedText {
    text: Vec<u8>,
    cap: usize,
    overflowed: bool,
}

impl std::io::Write for CappedText {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.text.len() + buf.len() > self.cap {
            self.overflowed = true;
            return Err(std::io::Error::other("rendered text too long"));
        }
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One turn of a conversation.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template and the special tokens it may print.
pub struct ChatTemplate {
    /// Shared with the thread a rendering runs on (see [`ChatTemplate::render`]).
    env: Arc<minijinja::Environment<'static>>,
    /// Where the template came from (the model or the template file), for errors.
    label: PathBuf,
    bos_token: String,
    eos_token: String,
}

/// What the CLI says when a model has no template.
pub const NO_TEMPLATE_HINT: &str =
    "has no chat template (tokenizer_config.json chat_template, chat_template.jinja or GGUF tokenizer.chat_template): pass one with --chat-template FILE";

impl ChatTemplate {
    /// The template to use for `ck`: `file` when given (`--chat-template`), else the model's
    /// own; a model without one is an error naming the option.
    pub fn for_checkpoint(ck: &crate::Checkpoint, file: Option<&Path>) -> Result<Self> {
        let tok = &ck.tokenizer;
        let bos = tok.special_text(tok.bos_id);
        let eos = tok.special_text(tok.eos_ids.first().copied());
        match (file, &tok.chat_template) {
            (Some(f), _) => ChatTemplate::from_file(f, &bos, &eos),
            (None, Some(t)) => ChatTemplate::new(&ck.path, t, &bos, &eos),
            (None, None) => Err(format_err(&ck.path, NO_TEMPLATE_HINT)),
        }
    }

    /// Compiles `source`; `label` names it in errors.
    pub fn new(label: &Path, source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        if source.len() > MAX_TEMPLATE_BYTES {
            return Err(format_err(
                label,
                format!(
                    "chat template of {} bytes is longer than {MAX_TEMPLATE_BYTES} (real ones are tens of KB)",
                    source.len()
                ),
            ));
        }
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        // Templates that print a date (Llama 3.1) get a fixed one: output must not depend
        // on the day it is run.
        env.add_function("strftime_now", |_fmt: String| "26 Jul 2024".to_string());
        env.set_fuel(Some(RENDER_FUEL));
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| {
                format_err(
                    label,
                    format!("invalid chat template: {}", e.display_debug_info_oneline()),
                )
            })?;
        Ok(ChatTemplate {
            env: Arc::new(env),
            label: label.to_path_buf(),
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// The template file given with `--chat-template`.
    pub fn from_file(path: &Path, bos_token: &str, eos_token: &str) -> Result<Self> {
        let text = crate::files::read_text_capped(path, crate::files::CONFIG_CAP)
            .map_err(|e| io_err(path, e))?;
        Self::new(path, &text, bos_token, eos_token)
    }

    /// The conversation as the model reads it; with `add_generation_prompt`, ending where the
    /// assistant's answer starts.
    ///
    /// The template is the model file's, so it is run as untrusted code: at most
    /// [`RENDER_FUEL`] instructions, a text at most [`RENDER_OUTPUT_BASE`] plus 16 bytes per
    /// byte of the messages, on a thread with a [`RENDER_STACK`] stack that the caller waits
    /// [`RENDER_DEADLINE`] for, and (where the binary installs
    /// [`crate::memory_budget::BudgetAllocator`]) with a bounded heap. Each limit ends in an
    /// error naming the template's source, never a hang or an abort.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let input: usize = messages
            .iter()
            .map(|m| m.role.len() + m.content.len())
            .sum::<usize>()
            + self.bos_token.len()
            + self.eos_token.len();
        let limit = input
            .saturating_mul(RENDER_MEMORY_PER_INPUT_BYTE)
            .saturating_add(RENDER_MEMORY_BASE);
        let env = Arc::clone(&self.env);
        let (messages, bos, eos) = (
            messages.to_vec(),
            self.bos_token.clone(),
            self.eos_token.clone(),
        );
        let cap = input
            .saturating_mul(RENDER_OUTPUT_PER_INPUT_BYTE)
            .saturating_add(RENDER_OUTPUT_BASE);
        let rendered =
            crate::memory_budget::run_within(limit, RENDER_STACK, RENDER_DEADLINE, move || {
                let t = env.get_template("chat").map_err(|e| e.to_string())?;
                let mut out = CappedText {
                    text: Vec::new(),
                    cap,
                    overflowed: false,
                };
                let result = t.render_captured_to(
                    minijinja::context! {
                        messages => messages,
                        add_generation_prompt => add_generation_prompt,
                        bos_token => bos,
                        eos_token => eos,
                    },
                    &mut out,
                );
                match result {
                    _ if out.overflowed => Err(format!(
                    "rendering made more than {cap} bytes of text from {input} bytes of messages"
                )),
                    Err(e) => Err(e.display_debug_info_oneline()),
                    // Every piece written is a &str, so the whole is UTF-8.
                    Ok(_) => String::from_utf8(out.text).map_err(|e| e.to_string()),
                }
            });
        match rendered {
            Ok(Ok(text)) => Ok(text),
            Ok(Err(msg)) => Err(format_err(&self.label, format!("chat template: {msg}"))),
            Err(budget) => Err(format_err(
                &self.label,
                format!("chat template: rendering {budget}"),
            )),
        }
    }
}

/// minijinja's error with its detail on one line.
trait OneLine {
    fn display_debug_info_oneline(&self) -> String;
}

impl OneLine for minijinja::Error {
    fn display_debug_info_oneline(&self) -> String {
        let mut s = self.to_string();
        let mut src = std::error::Error::source(self);
        while let Some(e) = src {
            s.push_str(": ");
            s.push_str(&e.to_string());
            src = e.source();
        }
        crate::error::one_line(&s)
    }
}

/// The template text from a tokenizer_config.json value: a string, or transformers' list of
/// named templates (the one named "default", else the first).
pub fn template_from_config(cfg: &serde_json::Value) -> Option<String> {
    match cfg.get("chat_template")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => {
            let pick = list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or_else(|| list.first())?;
            pick.get("template")
                .and_then(|t| t.as_str())
                .map(str::to_string)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without the budgeted allocator (this test binary, a library user's own) a rendering
    /// still runs on its own deep stack: a value nested 90,000 levels is dropped and printed
    /// where the 2 MiB of a default thread overflowed.
    #[test]
    fn deep_values_render_without_the_budgeted_allocator() {
        assert!(!crate::memory_budget::is_enforced());
        let deep = "{% set ns = namespace(x=[]) %}{% for i in range(300) %}\
                    {% for j in range(300) %}{% set ns.x = [ns.x] %}{% endfor %}{% endfor %}";
        let t =
            ChatTemplate::new(Path::new("m"), &format!("{deep}{{{{ ns.x }}}}"), "", "").unwrap();
        assert_eq!(t.render(&[], false).unwrap().len(), 180_002);
    }

    /// SmolLM2-Instruct's template, as its GGUF carries it.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_as_transformers_does() {
        let t = ChatTemplate::new(Path::new("t"), SMOLLM2, "<|im_start|>", "<|im_end|>").unwrap();
        let s = t.render(&[Message::new("user", "Hi")], true).unwrap();
        assert_eq!(
            s,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let s = t
            .render(
                &[
                    Message::new("system", "Be brief."),
                    Message::new("user", "Hi"),
                    Message::new("assistant", "Hello!"),
                ],
                false,
            )
            .unwrap();
        assert_eq!(
            s,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        );
    }

    #[test]
    fn python_methods_tokens_and_raise_exception() {
        let src = "{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('roles must be user/assistant') }}{% endif %}[{{ m['content'].strip() }}]{% endfor %}{{ eos_token }}";
        let t = ChatTemplate::new(Path::new("t"), src, "<s>", "</s>").unwrap();
        assert_eq!(
            t.render(&[Message::new("user", "  hi  ")], false).unwrap(),
            "<s>[hi]</s>"
        );
        let e = t
            .render(&[Message::new("system", "x")], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("roles must be user/assistant"), "{e}");
        let e = ChatTemplate::new(Path::new("bad.jinja"), "{% for %}", "", "")
            .err()
            .unwrap()
            .to_string();
        assert!(e.starts_with("bad.jinja: invalid chat template"), "{e}");
    }

    #[test]
    fn config_forms() {
        let v = serde_json::json!({"chat_template": "A"});
        assert_eq!(template_from_config(&v).as_deref(), Some("A"));
        let v = serde_json::json!({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]});
        assert_eq!(template_from_config(&v).as_deref(), Some("D"));
        assert_eq!(template_from_config(&serde_json::json!({})), None);
    }
}
