//! `tandem chat` and the `--chat` flags: the model's own chat template applied to what the
//! user types, the KV cache kept from turn to turn.

use anyhow::{Context, Result};
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use tandem_model::chat::{ChatTemplate, Message};
use tandem_model::{Checkpoint, HeadRows, Sampler};

/// The chat template to use: `--chat-template FILE`, else the model's own.
pub fn template_for(ck: &Checkpoint, file: Option<&Path>) -> Result<ChatTemplate> {
    Ok(ChatTemplate::for_checkpoint(ck, file)?)
}

/// One user message (after an optional system message) rendered for the model to answer.
pub fn render_prompt(
    ck: &Checkpoint,
    file: Option<&Path>,
    system: Option<&str>,
    user: &str,
) -> Result<String> {
    let t = template_for(ck, file)?;
    let mut messages = Vec::new();
    if let Some(s) = system {
        messages.push(Message::new("system", s));
    }
    messages.push(Message::new("user", user));
    Ok(t.render(&messages, true)?)
}

#[derive(clap::Args)]
pub struct ChatArgs {
    /// A Hugging Face folder or a GGUF file.
    #[arg(long)]
    model: PathBuf,
    /// A Jinja chat template to use instead of the model's own.
    #[arg(long)]
    chat_template: Option<PathBuf>,
    /// A system message opening the conversation.
    #[arg(long)]
    system: Option<String>,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    #[command(flatten)]
    sampling: crate::args::SamplingArgs,
    /// Context length limit (default: the model's).
    #[arg(long)]
    ctx: Option<usize>,
    /// Use this tokenizer.json instead of the model's own.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Answer speculatively, as `generate --draft` (e.g. `suffix+self:q8_0@all`): the draft is
    /// made once for the session, a suffix lookup remembers every turn, and the KV cache is
    /// kept between turns as in plain chat. Answers are exactly the model's own.
    #[arg(long)]
    draft: Option<String>,
    #[command(flatten)]
    drafting: crate::args::DraftArgs,
}

/// Interactive chat on stdin/stdout: one line per user turn (`/reset` forgets the
/// conversation, `/exit` or end of input ends it). Each turn renders the whole conversation
/// with the template and runs only the tokens after the longest prefix the KV cache already
/// holds, so earlier turns are not recomputed.
pub fn chat(a: ChatArgs, load: &tandem_model::LoadOptions) -> Result<()> {
    crate::args::check_generation_flags(a.max_tokens, a.ctx, Some(&a.drafting))?;
    let ck = Checkpoint::open(&a.model, a.tokenizer.as_deref())?;
    let template = template_for(&ck, a.chat_template.as_deref())?;
    let model = ck.load_model(load)?;
    let tok = &ck.tokenizer;
    let mut cache = model.new_cache_limited(a.ctx)?;
    let params = a.sampling.params();
    let mut sampler = Sampler::new(params)?;
    let mut draft = match &a.draft {
        Some(d) => Some(tandem_speculate::session::DraftSource::open(&ck, d, load)?),
        None => None,
    };
    let settings = a.drafting.config(params, a.ctx);
    // Greedy and sampled answers use the screened head; its screen is built with the model.
    model.prepare_head_for(HeadRows::for_draws(&sampler.params))?;
    let opening: Vec<Message> = a.system.iter().map(|s| Message::new("system", s)).collect();
    let mut messages = opening.clone();
    // The tokens whose keys and values the cache holds, in order.
    let mut cached: Vec<u32> = Vec::new();
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    if interactive {
        eprintln!(
            "tandem chat: {} — one line per turn, /reset to start over, /exit or Ctrl-D to leave",
            ck.path.display()
        );
    }
    let mut turn = 0;
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            eprint!("> ");
            std::io::stderr().flush()?;
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("reading stdin")?;
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages = opening.clone();
                cached.clear();
                cache.truncate(0);
                continue;
            }
            _ => {}
        }
        turn += 1;
        messages.push(Message::new("user", line));
        let text = template.render(&messages, true)?;
        // Templates print their own special tokens (BOS included), as transformers'
        // apply_chat_template tokenizes them.
        let ids = tok.encode(&text, false)?;
        let reuse = cached
            .iter()
            .zip(&ids)
            .take_while(|(a, b)| a == b)
            .count()
            .min(ids.len().saturating_sub(1));
        cache.truncate(reuse);
        cached.truncate(reuse);
        let mut stream =
            tandem_model::TextStream::with_context(tok, reuse.checked_sub(1).map(|i| ids[i]));
        let mut out = std::io::stdout().lock();
        let mut show = |id: u32| -> tandem_model::Result<()> {
            if let Some(piece) = stream.push(id)? {
                let _ = out.write_all(piece.as_bytes()).and_then(|_| out.flush());
            }
            Ok(())
        };
        let (answer, generated, tok_s, spec) = match draft.as_mut() {
            None => {
                let (answer, stats) = tandem_model::generate::generate(
                    &model,
                    &mut cache,
                    &ids[reuse..],
                    a.max_tokens,
                    &mut sampler,
                    &tok.eos_ids,
                    &mut show,
                )?;
                let secs = (stats.prefill + stats.decode).as_secs_f64();
                let rate = stats.generated_tokens as f64 / secs.max(1e-9);
                (answer, stats.generated_tokens, rate, None)
            }
            Some(src) => {
                // Each turn samples on a stream of its own (the same seed every turn would
                // reuse one stream's draws).
                let mut turn_settings = settings;
                turn_settings.params.seed = settings.params.seed.wrapping_add(turn as u64 - 1);
                let ran = tandem_speculate::session::run_over(
                    &model,
                    &mut cache,
                    src,
                    &turn_settings,
                    &ids,
                    a.max_tokens,
                    &tok.eos_ids,
                    |id| Ok(show(id)?),
                );
                let (answer, st) = ran?;
                let rate = st.generated_tokens as f64 / st.total_secs.max(1e-9);
                (answer, st.generated_tokens, rate, Some(st))
            }
        };
        if let Some(rest) = stream.finish()? {
            write!(out, "{rest}")?;
        }
        writeln!(out)?;
        out.flush()?;
        cached = ids.clone();
        cached.extend(&answer);
        cached.truncate(cache.len());
        let spec = spec.map_or(String::new(), |st| {
            format!(
                ", {:.0}% of {} drafted accepted, {:.2} tokens/verifier pass",
                100.0 * st.acceptance_rate(),
                st.drafted,
                st.tokens_per_pass()
            )
        });
        eprintln!(
            "[turn {turn}: {} prompt tokens ({reuse} reused from the cache), {generated} generated, {tok_s:.1} tok/s over the turn{spec}]",
            ids.len(),
        );
        messages.push(Message::new("assistant", &tok.decode(&answer)?));
    }
    Ok(())
}
