//! `bench spec --prompts FILE`: JSON lines, each a text to continue or a conversation to answer.
//!
//! A line is one of
//! - `"text"` or `{"prompt": "text"}`: a user message with `--chat`, else raw text;
//! - `{"system": "…", "prompt": "…"}`: a system message before it (`--chat` only);
//! - `{"messages": [{"role": "system"|"user"|"assistant", "content": "…"}, …]}` (the Hugging
//!   Face / OpenAI chat shape) or `{"conversations": [{"from": "system"|"human"|"gpt",
//!   "value": "…"}, …]}` (ShareGPT's, as vLLM's serving benchmark reads it): a conversation
//!   whose next assistant turn is generated (`--chat` only). A conversation that ends in
//!   assistant turns, as chat datasets store them, is cut before them: those are the answers
//!   the model is asked to write.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tandem_model::chat::{ChatTemplate, Message};

/// One line of a prompts file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptLine {
    /// Text: continued as is, or sent as one user message with `--chat`.
    Text(String),
    /// Messages ending in a user turn, for the chat template to render.
    Conversation(Vec<Message>),
}

/// The lines of a prompts file (blank lines skipped); errors name the line.
pub fn parse(text: &str) -> Result<Vec<PromptLine>> {
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let what = || format!("prompts line {}", i + 1);
        let v: Value =
            serde_json::from_str(line).with_context(|| format!("{}: not JSON", what()))?;
        prompts.push(parse_value(&v).with_context(what)?);
    }
    if prompts.is_empty() {
        bail!("no prompts");
    }
    Ok(prompts)
}

/// The prompts as the model reads them: conversations (and, with `chat`, texts as user
/// messages) rendered by `template`. A conversation without `chat` is an error, since there
/// is no template to render it with.
pub fn render(prompts: &[PromptLine], template: Option<&ChatTemplate>) -> Result<Vec<String>> {
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| match (p, template) {
            (PromptLine::Text(t), None) => Ok(t.clone()),
            (PromptLine::Text(t), Some(tpl)) => Ok(tpl.render(&[Message::new("user", t)], true)?),
            (PromptLine::Conversation(m), Some(tpl)) => Ok(tpl.render(m, true)?),
            (PromptLine::Conversation(_), None) => bail!(
                "prompt {}: a conversation (\"messages\", \"conversations\" or \"system\") needs --chat",
                i + 1
            ),
        })
        .collect()
}

fn parse_value(v: &Value) -> Result<PromptLine> {
    if let Some(s) = v.as_str() {
        return Ok(PromptLine::Text(s.to_string()));
    }
    let Some(obj) = v.as_object() else {
        bail!("expected a string or an object with \"prompt\", \"messages\" or \"conversations\"");
    };
    let field = |name: &str| -> Result<Option<&str>> {
        match obj.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => bail!("\"{name}\" must be a string"),
        }
    };
    if let Some(list) = obj.get("messages") {
        return conversation(list, "role", "content", |r| match r {
            "system" => Some("system"),
            "user" => Some("user"),
            "assistant" => Some("assistant"),
            _ => None,
        });
    }
    if let Some(list) = obj.get("conversations") {
        return conversation(list, "from", "value", |r| match r {
            "system" => Some("system"),
            "human" | "user" => Some("user"),
            "gpt" | "assistant" => Some("assistant"),
            _ => None,
        });
    }
    let Some(prompt) = field("prompt")? else {
        bail!("expected {{\"prompt\": \"...\"}}, {{\"messages\": [...]}} or {{\"conversations\": [...]}}");
    };
    Ok(match field("system")? {
        Some(system) => PromptLine::Conversation(vec![
            Message::new("system", system),
            Message::new("user", prompt),
        ]),
        None => PromptLine::Text(prompt.to_string()),
    })
}

/// A list of turns, each `{role_key: …, content_key: …}`, roles mapped by `role`; trailing
/// assistant turns dropped, and it must then end in a user turn.
fn conversation(
    list: &Value,
    role_key: &str,
    content_key: &str,
    role: impl Fn(&str) -> Option<&'static str>,
) -> Result<PromptLine> {
    let Some(turns) = list.as_array() else {
        bail!("the conversation must be a list of turns");
    };
    let mut messages = Vec::with_capacity(turns.len());
    for (j, t) in turns.iter().enumerate() {
        let r = t
            .get(role_key)
            .and_then(Value::as_str)
            .with_context(|| format!("turn {}: expected a string \"{role_key}\"", j + 1))?;
        let r = role(r).with_context(|| format!("turn {}: unknown {role_key} {r:?}", j + 1))?;
        let c = t
            .get(content_key)
            .and_then(Value::as_str)
            .with_context(|| format!("turn {}: expected a string \"{content_key}\"", j + 1))?;
        messages.push(Message::new(r, c));
    }
    while messages.last().is_some_and(|m| m.role == "assistant") {
        messages.pop();
    }
    match messages.last() {
        Some(m) if m.role == "user" => Ok(PromptLine::Conversation(messages)),
        _ => bail!("the conversation has no user turn to answer"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(role: &str, content: &str) -> Message {
        Message::new(role, content)
    }

    #[test]
    fn every_shape_of_line_parses() {
        let text = r#""plain text"
{"prompt": "Name a color."}

{"system": "Be brief.", "prompt": "Name a color."}
{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a color."}]}
{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "More?"}, {"from": "gpt", "value": "Blue."}]}
"#;
        let got = parse(text).unwrap();
        assert_eq!(
            got,
            vec![
                PromptLine::Text("plain text".into()),
                PromptLine::Text("Name a color.".into()),
                PromptLine::Conversation(vec![
                    m("system", "Be brief."),
                    m("user", "Name a color.")
                ]),
                PromptLine::Conversation(vec![
                    m("user", "Hi"),
                    m("assistant", "Hello!"),
                    m("user", "Name a color.")
                ]),
                // The dataset's last answer is cut: it is what the model writes.
                PromptLine::Conversation(vec![
                    m("user", "Hi"),
                    m("assistant", "Hello!"),
                    m("user", "More?")
                ]),
            ]
        );
    }

    #[test]
    fn bad_lines_say_which_line_and_what() {
        let cases = [
            ("{\"prompt\": \"a\"}\nnot json", "prompts line 2: not JSON"),
            ("{\"text\": \"a\"}", "expected {\"prompt\""),
            ("{\"prompt\": 3}", "\"prompt\" must be a string"),
            ("[1]", "expected a string or an object"),
            ("{\"messages\": {}}", "list of turns"),
            (
                "{\"messages\": [{\"role\": \"tool\", \"content\": \"x\"}]}",
                "turn 1: unknown role \"tool\"",
            ),
            (
                "{\"messages\": [{\"role\": \"user\"}]}",
                "turn 1: expected a string \"content\"",
            ),
            (
                "{\"messages\": [{\"role\": \"assistant\", \"content\": \"x\"}]}",
                "no user turn",
            ),
            ("{\"messages\": []}", "no user turn"),
            ("\n  \n", "no prompts"),
        ];
        for (text, want) in cases {
            let e = format!("{:#}", parse(text).unwrap_err());
            assert!(e.contains(want), "{text:?}: {e}");
            if text.trim().starts_with('{') && !text.contains('\n') {
                assert!(e.starts_with("prompts line 1: "), "{e}");
            }
        }
    }

    #[test]
    fn conversations_render_with_a_template_and_need_one() {
        let tpl = ChatTemplate::new(
            std::path::Path::new("test"),
            "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
            "",
            "",
        )
        .unwrap();
        let p = parse("\"Hi\"\n{\"system\": \"S\", \"prompt\": \"Q\"}").unwrap();
        assert_eq!(
            render(&p, Some(&tpl)).unwrap(),
            vec!["<user>Hi<assistant>", "<system>S<user>Q<assistant>"]
        );
        assert_eq!(render(&p[..1], None).unwrap(), vec!["Hi"]);
        let e = render(&p, None).unwrap_err().to_string();
        assert!(e.contains("prompt 2") && e.contains("needs --chat"), "{e}");
    }
}
