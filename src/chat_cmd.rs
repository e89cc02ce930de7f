//! `tandem chat` and the `--chat` flags: the model's own chat template applied to what the
//! user types, the KV cache kept from turn to turn.

use anyhow::{Context, Result};
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use tandem_model::chat::{ChatTemplate, Message};
use tandem_model::llama::KvCache;
use tandem_model::{Checkpoint, HeadRows, Llama, Sampler, Tokenizer};
use tandem_speculate::session::DraftSource;
use tandem_speculate::{SpecConfig, SpecStats};

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
    let params = a.sampling.params();
    let mut conversation = Conversation {
        model: &model,
        cache: model.new_cache_limited(a.ctx)?,
        cached: Vec::new(),
        sampler: Sampler::new(params)?,
        draft: match &a.draft {
            Some(d) => Some(DraftSource::open(&ck, d, load)?),
            None => None,
        },
        settings: a.drafting.config(params, a.ctx),
        max_tokens: a.max_tokens,
    };
    // Greedy and sampled answers use the screened head; its screen is built with the model.
    model.prepare_head_for(HeadRows::for_draws(&params))?;
    let opening: Vec<Message> = a.system.iter().map(|s| Message::new("system", s)).collect();
    let mut messages = opening.clone();
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
                conversation.reset();
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
        let answer = conversation.answer(tok, &ids, turn)?;
        let spec = answer.spec.map_or(String::new(), |st| {
            format!(
                ", {:.0}% of {} drafted accepted, {:.2} tokens/verifier pass",
                100.0 * st.acceptance_rate(),
                st.drafted,
                st.tokens_per_pass()
            )
        });
        eprintln!(
            "[turn {turn}: {} prompt tokens ({} reused from the cache), {} generated, {:.1} tok/s over the turn{spec}]",
            ids.len(),
            answer.reused,
            answer.tokens.len(),
            answer.tok_s,
        );
        messages.push(Message::new("assistant", &tok.decode(&answer.tokens)?));
    }
    Ok(())
}

/// A chat's decoding state across turns: the KV cache of the conversation so far, and the
/// tokens it holds, so that a turn prefills only what follows the part it shares.
struct Conversation<'m> {
    model: &'m Llama,
    cache: KvCache,
    /// The tokens whose keys and values `cache` holds, in order.
    cached: Vec<u32>,
    sampler: Sampler,
    draft: Option<DraftSource>,
    settings: SpecConfig,
    max_tokens: usize,
}

/// One turn's answer.
struct Answer {
    tokens: Vec<u32>,
    /// Prompt tokens whose cache entries came from earlier turns.
    reused: usize,
    tok_s: f64,
    /// The speculative metrics, with a draft.
    spec: Option<SpecStats>,
}

impl Conversation<'_> {
    fn reset(&mut self) {
        self.cached.clear();
        self.cache.truncate(0);
    }

    /// Answers the rendered conversation `ids` (turn `turn`, from 1), streaming the text to
    /// stdout; the cache keeps its longest prefix shared with the earlier turns.
    fn answer(&mut self, tok: &Tokenizer, ids: &[u32], turn: usize) -> Result<Answer> {
        let reused = self
            .cached
            .iter()
            .zip(ids)
            .take_while(|(a, b)| a == b)
            .count()
            .min(ids.len().saturating_sub(1));
        self.cache.truncate(reused);
        self.cached.truncate(reused);
        let mut stream =
            tandem_model::TextStream::with_context(tok, reused.checked_sub(1).map(|i| ids[i]));
        let mut out = std::io::stdout().lock();
        let mut show = |id: u32| -> tandem_model::Result<()> {
            if let Some(piece) = stream.push(id)? {
                let _ = out.write_all(piece.as_bytes()).and_then(|_| out.flush());
            }
            Ok(())
        };
        let (tokens, tok_s, spec) = match self.draft.as_mut() {
            None => {
                let (tokens, stats) = tandem_model::generate::generate(
                    self.model,
                    &mut self.cache,
                    &ids[reused..],
                    self.max_tokens,
                    &mut self.sampler,
                    &tok.eos_ids,
                    &mut show,
                )?;
                let secs = (stats.prefill + stats.decode).as_secs_f64();
                (tokens, stats.generated_tokens as f64 / secs.max(1e-9), None)
            }
            Some(src) => {
                // Each turn samples on a stream of its own (the same seed every turn would
                // reuse one stream's draws).
                let mut turn_settings = self.settings;
                turn_settings.params.seed = self.settings.params.seed.wrapping_add(turn as u64 - 1);
                let (tokens, st) = tandem_speculate::session::run_over(
                    self.model,
                    &mut self.cache,
                    src,
                    &turn_settings,
                    ids,
                    self.max_tokens,
                    &tok.eos_ids,
                    |id| Ok(show(id)?),
                )?;
                let rate = st.generated_tokens as f64 / st.total_secs.max(1e-9);
                (tokens, rate, Some(st))
            }
        };
        if let Some(rest) = stream.finish()? {
            write!(out, "{rest}")?;
        }
        writeln!(out)?;
        out.flush()?;
        self.cached = ids.to_vec();
        self.cached.extend(&tokens);
        self.cached.truncate(self.cache.len());
        Ok(Answer {
            tokens,
            reused,
            tok_s,
            spec,
        })
    }
}
