//! Speculative decoding from the command line: `generate --draft` and `bench spec`.

use crate::args::{check_generation_flags, DraftArgs, SamplingArgs};
use crate::generate_cmd::GenerateArgs;
use crate::output::{write_json, Printer, SpecJson};
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::PathBuf;
use tandem_model::{Checkpoint, HeadRows, Llama, Sampler, SamplingParams};
use tandem_speculate::session::{run, shortlist_draft_head, verifier_reads, Lookup};
use tandem_speculate::{
    AcceptanceRule, Controller, DraftSource, Drafter, ModelDrafter, NgramDrafter, SpecConfig,
    SpecStats,
};

/// `tandem generate --draft ...`: streams the text, metrics to stderr.
pub fn generate(
    ck: &Checkpoint,
    draft: &str,
    a: &GenerateArgs,
    params: SamplingParams,
    bos: bool,
    load: &tandem_model::LoadOptions,
) -> Result<()> {
    let model = ck.load_model(load)?;
    let tok = &ck.tokenizer;
    let ids = tok.encode(&a.prompt, bos)?;
    let mut src = DraftSource::open(ck, draft, load)?;
    report_skips(&src);
    model.prepare_head_for(HeadRows::for_draws(&params))?;
    let settings = a.drafting.config(params, a.ctx);
    let mut printer = Printer::start(tok, &a.prompt, ids.last().copied())?;
    let (_, st) = run(
        &model,
        &mut src,
        &settings,
        &ids,
        a.max_tokens,
        &tok.eos_ids,
        |id| Ok(printer.push(id)?),
    )?;
    printer.finish()?;
    if a.json {
        eprintln!("{}", serde_json::to_string(&SpecJson::of(&st))?);
    } else {
        eprintln!(
            "speculative: {} tokens, {} drafted, {} accepted ({:.0}%), {:.2} tokens/verifier pass, draft {:.2} s, verify {:.2} s, {:.1} tok/s (stop: {})",
            st.generated_tokens, st.drafted, st.accepted, 100.0 * st.acceptance_rate(), st.tokens_per_pass(),
            st.draft_secs, st.verify_secs, st.generated_tokens as f64 / st.total_secs.max(1e-9), st.stop
        );
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct BenchSpecArgs {
    /// The verifier: a Hugging Face folder or a GGUF file.
    #[arg(long)]
    model: PathBuf,
    /// ngram, suffix (lookup over this and the earlier prompts and answers), self:<type>
    /// (e.g. self:q4_0; `self:q8_0@all,skip=auto|N|a3.m5` also skips sublayers chosen on
    /// calibration text; `self:q4_0@all,edges=2` keeps the MLP of the first and last two
    /// layers at q8_0), a draft model path, or lookup+model (suffix+self:q8_0@all).
    #[arg(long)]
    draft: String,
    /// JSON lines, each {"prompt": "..."}, or with --chat {"system": "...", "prompt": "..."},
    /// {"messages": [{"role", "content"}...]} or ShareGPT's {"conversations": [{"from",
    /// "value"}...]} (a conversation's trailing assistant turns are cut: the model writes them)
    /// (default: scripts/spec-prompts.jsonl's 18 prompts, compiled in: wikitext openings,
    /// Austen, code).
    #[arg(long)]
    prompts: Option<PathBuf>,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    drafting: DraftArgs,
    /// Write per-prompt and total results here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Wrap every prompt as a user message in the model's chat template (instruct use).
    #[arg(long)]
    chat: bool,
    /// With --chat: a Jinja chat template to use instead of the model's own.
    #[arg(long, requires = "chat")]
    chat_template: Option<PathBuf>,
    /// Decode the prompts in batches of this many sequences, plainly and speculatively, with
    /// one batched verifier pass per step (greedy, or sampled with --temperature).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// With --batch: draft only while at most this many sequences are active (above it the
    /// batch decodes plainly).
    #[arg(long, default_value_t = DEFAULT_MAX_SPEC_BATCH)]
    spec_max_batch: usize,
}

/// Above this many sequences speculation stops paying on the CPU (BENCHMARKS.md, bench spec
/// --batch): verifying k extra rows per sequence makes the batched matmuls compute-bound.
pub const DEFAULT_MAX_SPEC_BATCH: usize = 2;

const DEFAULT_PROMPTS: &str = include_str!("../scripts/spec-prompts.jsonl");

/// `tandem bench spec`: each prompt decoded plainly and speculatively (same sampling), tok/s
/// of both and the speedup, with the speculative metrics.
pub fn bench_spec(a: BenchSpecArgs, load: &tandem_model::LoadOptions) -> Result<()> {
    check_generation_flags(a.max_tokens, None, Some(&a.drafting))?;
    let ck = Checkpoint::open(&a.model, None)?;
    let prompts = bench_prompts(&a, &ck)?;
    let model = ck.load_model(load)?;
    let mut src = DraftSource::open(&ck, &a.draft, load)?;
    report_skips(&src);
    // Built before the clock starts (it is built on the first screened call otherwise).
    model.prepare_head_for(HeadRows::for_draws(&a.sampling.params()))?;
    if a.batch > 1 {
        return bench_batch(&a, &ck, &model, &mut src, &prompts);
    }
    let params = a.sampling.params();
    let settings = a.drafting.config(params, None);
    // Greedy and coupled sampled speculation must reproduce plain decoding (with the same
    // seed) token for token; rejection sampling only matches it in distribution.
    let exact = params.is_greedy() || settings.coupled;
    let tok = &ck.tokenizer;
    let mut tally = SpecTally::default();
    eprintln!(
        "{:>3} {:>10} {:>10} {:>8} {:>8} {:>8}",
        "#", "plain t/s", "spec t/s", "speedup", "accept", "tok/pass"
    );
    for (i, p) in prompts.iter().enumerate() {
        let ids = tok.encode(p, tok.add_bos && !a.chat)?;
        let mut cache = model.new_cache()?;
        let mut sampler = Sampler::new(params)?;
        let (plain_out, ps) = tandem_model::generate::generate(
            &model,
            &mut cache,
            &ids,
            a.max_tokens,
            &mut sampler,
            &tok.eos_ids,
            |_| Ok(()),
        )?;
        let (spec_out, st) = run(
            &model,
            &mut src,
            &settings,
            &ids,
            a.max_tokens,
            &tok.eos_ids,
            |_| Ok(()),
        )?;
        let same = exact.then_some(spec_out == plain_out);
        let (pr, sr) = tally.add(p, &ps, &st, same);
        eprintln!(
            "{i:>3} {pr:>10.1} {sr:>10.1} {:>7.2}x {:>7.0}% {:>8.2}",
            sr / pr,
            100.0 * st.acceptance_rate(),
            st.tokens_per_pass()
        );
    }
    let total = tally.print(&a, prompts.len(), &settings);
    if let Some(g) = model.greedy_head_stats() {
        println!(
            "screened head (both runs): {} rows, {:.1} candidates rescored per screened row, {} rows on the full head",
            g.rows,
            g.candidates as f64 / g.rows.saturating_sub(g.fallbacks).max(1) as f64,
            g.fallbacks
        );
    }
    if let Some(path) = &a.json {
        write_json(
            path,
            &BenchSpecDoc {
                total,
                prompts: tally.rows,
            },
        )?;
    }
    Ok(())
}

/// `bench spec`'s prompts: the file's (or the compiled-in default set), each wrapped in the
/// chat template with `--chat`.
fn bench_prompts(a: &BenchSpecArgs, ck: &Checkpoint) -> Result<Vec<String>> {
    let text = match &a.prompts {
        Some(p) => tandem_model::files::read_text_capped(p, tandem_model::files::TEXT_CAP)
            .with_context(|| format!("{}: cannot read", p.display()))?,
        None => DEFAULT_PROMPTS.to_string(),
    };
    let source = || match &a.prompts {
        Some(p) => p.display().to_string(),
        None => "the default prompts".to_string(),
    };
    let lines = crate::prompt_file::parse(&text).with_context(source)?;
    let template = match a.chat {
        true => Some(crate::chat_cmd::template_for(
            ck,
            a.chat_template.as_deref(),
        )?),
        false => None,
    };
    crate::prompt_file::render(&lines, template.as_ref()).with_context(source)
}

/// What `bench spec` sums over its prompts, one sequence at a time.
#[derive(Default)]
struct SpecTally {
    plain_tokens: usize,
    accepted: usize,
    /// Prompts whose speculative output differs from plain decoding where it must not.
    differing: usize,
    tree_passes: usize,
    tree_nodes: usize,
    tree_wins: usize,
    /// Seconds, drafted tokens and verifier passes.
    time: TimeSplit,
    rows: Vec<SpecJson>,
}

impl SpecTally {
    /// Adds one prompt's plain and speculative runs; `same`: whether their outputs matched,
    /// where they must. Returns the (plain, speculative) tok/s of the prompt.
    fn add(
        &mut self,
        prompt: &str,
        ps: &tandem_model::generate::GenerationStats,
        st: &SpecStats,
        same: Option<bool>,
    ) -> (f64, f64) {
        self.differing += usize::from(same == Some(false));
        self.tree_passes += st.tree_passes;
        self.tree_nodes += st.tree_nodes;
        self.tree_wins += st.tree_branch_wins;
        // Whole generation on both sides (prompt prefill included), as a user would time it.
        let plain_t = (ps.prefill + ps.decode).as_secs_f64();
        let (pr, sr) = (
            ps.generated_tokens as f64 / plain_t.max(1e-9),
            st.generated_tokens as f64 / st.total_secs.max(1e-9),
        );
        self.time.add(ps, st);
        self.plain_tokens += ps.generated_tokens;
        self.accepted += st.accepted;
        self.rows.push(SpecJson {
            prompt: Some(prompt.to_string()),
            plain_tok_s: Some(pr),
            speedup: Some(sr / pr),
            same_as_plain: same,
            ..SpecJson::of(st)
        });
        (pr, sr)
    }

    /// Prints the totals and returns them for `--json`.
    fn print(&self, a: &BenchSpecArgs, prompts: usize, settings: &SpecConfig) -> BenchSpecTotal {
        let time = &self.time;
        let params = settings.params;
        let (drafted, passes, spec_tokens) = (time.drafted, time.passes, time.spec_tokens);
        let (pr, sr) = (
            self.plain_tokens as f64 / (time.plain_prefill + time.plain_decode).max(1e-9),
            spec_tokens as f64 / time.spec_total.max(1e-9),
        );
        let per_pass = spec_tokens as f64 / passes.max(1) as f64;
        println!(
            "{prompts} prompts, draft {}, temperature {}: plain {pr:.1} tok/s, speculative {sr:.1} tok/s, speedup {:.2}x, acceptance {:.0}%, {per_pass:.2} tokens/verifier pass",
            a.draft, a.sampling.temperature, sr / pr, 100.0 * self.accepted as f64 / drafted.max(1) as f64,
        );
        println!("{}", time.line());
        println!("{}", time.passes_line());
        if self.tree_passes > 0 {
            println!(
                "token trees: {} of {passes} verifier passes, {:.1} draft tokens per tree, {} accepted a branch off the main chain",
                self.tree_passes,
                self.tree_nodes as f64 / self.tree_passes as f64,
                self.tree_wins
            );
        }
        let identical = prompts - self.differing;
        if !params.is_greedy() && settings.coupled {
            println!(
                "sampled output (coupled) identical to plain sampling with seed {} on {identical} of {prompts} prompts",
                params.seed,
            );
        }
        if params.is_greedy() {
            println!(
                "greedy output identical to plain decoding on {identical} of {prompts} prompts"
            );
        }
        BenchSpecTotal {
            tokens_per_verifier_pass: Some(per_pass),
            time: Some(time.json()),
            ..BenchSpecTotal::of(a, prompts, (pr, sr), (self.accepted, drafted))
        }
    }
}

/// `bench spec --json`: the totals, and each prompt's metrics.
#[derive(Serialize)]
struct BenchSpecDoc {
    total: BenchSpecTotal,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    prompts: Vec<SpecJson>,
}

#[derive(Serialize)]
struct BenchSpecTotal {
    model: String,
    draft: String,
    temperature: f32,
    prompts: usize,
    max_tokens: usize,
    threads: usize,
    plain_tok_s: f64,
    spec_tok_s: f64,
    speedup: f64,
    acceptance_rate: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    tokens_per_verifier_pass: Option<f64>,
    /// Where the time went (one sequence at a time only).
    #[serde(skip_serializing_if = "Option::is_none")]
    time: Option<TimeSplitJson>,
    #[serde(skip_serializing_if = "Option::is_none")]
    batch: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spec_max_batch: Option<usize>,
}

impl BenchSpecTotal {
    /// The totals of `prompts` runs: (plain, speculative) tok/s and (accepted, drafted).
    fn of(a: &BenchSpecArgs, prompts: usize, rates: (f64, f64), acc: (usize, usize)) -> Self {
        let (pr, sr) = rates;
        BenchSpecTotal {
            model: a.model.display().to_string(),
            draft: a.draft.clone(),
            temperature: a.sampling.temperature,
            prompts,
            max_tokens: a.max_tokens,
            threads: rayon::current_num_threads(),
            plain_tok_s: pr,
            spec_tok_s: sr,
            speedup: sr / pr,
            acceptance_rate: acc.0 as f64 / acc.1.max(1) as f64,
            tokens_per_verifier_pass: None,
            time: None,
            batch: None,
            spec_max_batch: None,
        }
    }
}

/// `bench spec --batch B`: prompts in batches of B, each batch decoded plainly (the same loop,
/// no drafts) and speculatively; total tok/s of both.
fn bench_batch(
    a: &BenchSpecArgs,
    ck: &Checkpoint,
    model: &Llama,
    src: &mut DraftSource,
    prompts: &[String],
) -> Result<()> {
    use tandem_speculate::{BatchDecoder, ModelBatchVerifier};
    let tok = &ck.tokenizer;
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| tok.encode(p, tok.add_bos && !a.chat))
        .collect::<tandem_model::Result<_>>()?;
    let all: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    shortlist_draft_head(src, &all, a.drafting.draft_vocab)?;
    let model_draft = match (&src.lookup, &src.model) {
        (Lookup::Ngram, None) => None,
        (Lookup::None, Some(m)) => Some(&**m),
        _ => anyhow::bail!("--batch drafts with ngram or one draft model"),
    };
    let params = a.sampling.params();
    let cost = model_draft.map_or(0.0, |m| m.decode_cost() / model.decode_cost().max(1.0));
    // Every sequence gets the run's rule, controller and (for a model) draft sampler from one
    // config, as a single-sequence run does.
    let run = |batch: &[Vec<u32>], max_spec: usize| -> Result<SpecStats> {
        let config = SpecConfig {
            max_spec_batch: max_spec,
            ..a.drafting.config(params, None)
        };
        let mut ngrams: Vec<NgramDrafter> = batch.iter().map(|_| NgramDrafter::default()).collect();
        let mut models = Vec::new();
        if let Some(m) = model_draft {
            for _ in batch {
                models.push(ModelDrafter::new(m, config.draft_chain()?)?);
            }
        }
        let drafters: Vec<&mut dyn Drafter> = match model_draft {
            None => ngrams.iter_mut().map(|d| d as &mut dyn Drafter).collect(),
            Some(_) => models.iter_mut().map(|d| d as &mut dyn Drafter).collect(),
        };
        let mut rules = batch
            .iter()
            .map(|_| config.rule())
            .collect::<tandem_speculate::Result<Vec<_>>>()?;
        let mut controllers: Vec<_> = batch.iter().map(|_| config.controller(cost)).collect();
        let mut v =
            ModelBatchVerifier::new(model, batch.len(), None)?.reads(verifier_reads(&config));
        let mut dec = BatchDecoder {
            drafters,
            rules: rules
                .iter_mut()
                .map(|r| &mut **r as &mut dyn AcceptanceRule)
                .collect(),
            controllers: controllers
                .iter_mut()
                .map(|c| &mut **c as &mut dyn Controller)
                .collect(),
            verifier: &mut v,
            max_spec_batch: config.max_spec_batch,
        };
        Ok(dec.generate(batch, a.max_tokens, &tok.eos_ids)?.1)
    };
    let (mut pt, mut ps, mut st_, mut ss, mut dr, mut ac) =
        (0usize, 0f64, 0usize, 0f64, 0usize, 0usize);
    for batch in ids.chunks(a.batch) {
        let p = run(batch, 0)?;
        let s = run(batch, a.spec_max_batch)?;
        pt += p.generated_tokens;
        ps += p.total_secs;
        st_ += s.generated_tokens;
        ss += s.total_secs;
        dr += s.drafted;
        ac += s.accepted;
    }
    let (pr, sr) = (pt as f64 / ps.max(1e-9), st_ as f64 / ss.max(1e-9));
    println!(
        "{} prompts in batches of {}, draft {}, speculation while <= {} active: plain {pr:.1} tok/s, speculative {sr:.1} tok/s, speedup {:.2}x, acceptance {:.0}%",
        ids.len(), a.batch, a.draft, a.spec_max_batch, sr / pr, 100.0 * ac as f64 / dr.max(1) as f64
    );
    if let Some(path) = &a.json {
        let total = BenchSpecTotal {
            batch: Some(a.batch),
            spec_max_batch: Some(a.spec_max_batch),
            ..BenchSpecTotal::of(a, ids.len(), (pr, sr), (ac, dr))
        };
        write_json(
            path,
            &BenchSpecDoc {
                total,
                prompts: Vec::new(),
            },
        )?;
    }
    Ok(())
}

/// A layer-skipping draft's choice, on stderr: what each candidate measured, and what is
/// skipped.
fn report_skips(src: &DraftSource) {
    let Some(r) = &src.skip_report else {
        return;
    };
    for (n, agree, cost, speedup) in &r.candidates {
        eprintln!(
            "skip {n:>2} sublayers: agreement {:.1}% on the calibration text, draft step {cost:.2} of the verifier's, expected {speedup:.2}x",
            100.0 * agree
        );
    }
    let names: Vec<String> = r.skipped.iter().map(ToString::to_string).collect();
    eprintln!(
        "layer-skipping draft: {} sublayers skipped ({})",
        r.skipped.len(),
        if names.is_empty() {
            "none".into()
        } else {
            names.join(".")
        }
    );
}

/// Where `bench spec`'s time went, summed over its prompts: plain decoding's prefill and
/// steps, and the speculative run's drafting, verification and the rest (its prefill, the
/// acceptance rule, the controller). A drafted token and a verifier pass are priced in plain
/// steps: with the acceptance, those two numbers decide what speculation can gain (a pass
/// that makes t tokens after d drafted ones pays when d·draft + pass < t plain steps).
#[derive(Default)]
struct TimeSplit {
    plain_prefill: f64,
    plain_decode: f64,
    /// Plain steps after each first token (the prefill makes the first).
    plain_steps: usize,
    spec_total: f64,
    spec_prefill: f64,
    /// Tokens the speculative runs generated.
    spec_tokens: usize,
    draft: f64,
    verify: f64,
    drafted: usize,
    passes: usize,
    /// (passes, seconds) by drafted tokens.
    by_drafted: Vec<(usize, f64)>,
}

/// [`TimeSplit`] in `bench spec --json`'s totals.
#[derive(Serialize)]
struct TimeSplitJson {
    plain_prefill_s: f64,
    plain_decode_s: f64,
    plain_step_ms: f64,
    spec_s: f64,
    /// The speculative run's prefill (each prompt but its last token, which the first
    /// verifier pass reads).
    spec_prefill_s: f64,
    draft_s: f64,
    verify_s: f64,
    /// The speculative run's prefill and everything not drafting or verifying.
    spec_other_s: f64,
    /// Decoding alone, each run's prefill left out: plain tokens after the first per second
    /// of plain steps, and speculative tokens per second after the prefill. A long prompt's
    /// prefill costs both runs the same and dilutes `speedup`; this is what speculation
    /// changed.
    plain_decode_tok_s: f64,
    spec_decode_tok_s: f64,
    decode_speedup: f64,
    draft_share: f64,
    draft_ms_per_drafted_token: f64,
    verify_ms_per_pass: f64,
    /// A drafted token's and a verifier pass's time, in plain decoding steps.
    drafted_token_in_plain_steps: f64,
    verifier_pass_in_plain_steps: f64,
    /// Verifier passes by the tokens drafted into them (index).
    passes_by_drafted: Vec<crate::output::PassesJson>,
}

impl TimeSplit {
    fn add(&mut self, plain: &tandem_model::generate::GenerationStats, spec: &SpecStats) {
        self.plain_prefill += plain.prefill.as_secs_f64();
        self.plain_decode += plain.decode.as_secs_f64();
        self.plain_steps += plain.generated_tokens.saturating_sub(1);
        self.spec_total += spec.total_secs;
        self.spec_prefill += spec.prefill_secs;
        self.spec_tokens += spec.generated_tokens;
        self.draft += spec.draft_secs;
        self.verify += spec.verify_secs;
        self.drafted += spec.drafted;
        self.passes += spec.verifier_passes;
        if self.by_drafted.len() < spec.passes_by_drafted.len() {
            self.by_drafted
                .resize(spec.passes_by_drafted.len(), (0, 0.0));
        }
        for (total, &(n, secs)) in self.by_drafted.iter_mut().zip(&spec.passes_by_drafted) {
            total.0 += n;
            total.1 += secs;
        }
    }

    fn json(&self) -> TimeSplitJson {
        let per = |secs: f64, n: usize| if n == 0 { 0.0 } else { secs / n as f64 };
        let step = per(self.plain_decode, self.plain_steps);
        let in_steps = |secs: f64| if step > 0.0 { secs / step } else { 0.0 };
        let (draft_each, verify_each) =
            (per(self.draft, self.drafted), per(self.verify, self.passes));
        let rate = |n: usize, secs: f64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        let plain_decode_tok_s = rate(self.plain_steps, self.plain_decode);
        let spec_decode_tok_s = rate(self.spec_tokens, self.spec_total - self.spec_prefill);
        TimeSplitJson {
            plain_prefill_s: self.plain_prefill,
            plain_decode_s: self.plain_decode,
            plain_step_ms: 1e3 * step,
            spec_s: self.spec_total,
            spec_prefill_s: self.spec_prefill,
            draft_s: self.draft,
            verify_s: self.verify,
            spec_other_s: (self.spec_total - self.draft - self.verify).max(0.0),
            draft_share: self.draft / self.spec_total.max(1e-9),
            draft_ms_per_drafted_token: 1e3 * draft_each,
            verify_ms_per_pass: 1e3 * verify_each,
            drafted_token_in_plain_steps: in_steps(draft_each),
            verifier_pass_in_plain_steps: in_steps(verify_each),
            passes_by_drafted: crate::output::PassesJson::of(&self.by_drafted),
            plain_decode_tok_s,
            spec_decode_tok_s,
            decode_speedup: spec_decode_tok_s / plain_decode_tok_s.max(1e-9),
        }
    }

    /// Verifier passes by drafted tokens, each with its mean in plain steps.
    fn passes_line(&self) -> String {
        let step = self.plain_decode / self.plain_steps.max(1) as f64;
        let parts: Vec<String> = self
            .by_drafted
            .iter()
            .enumerate()
            .filter(|(_, &(n, _))| n > 0)
            .map(|(d, &(n, secs))| format!("{d}: {n} × {:.2}", secs / n as f64 / step.max(1e-12)))
            .collect();
        format!(
            "verifier passes by drafted tokens (count × plain steps): {}",
            parts.join(", ")
        )
    }

    fn line(&self) -> String {
        let j = self.json();
        format!(
            "where the time went: plain {:.2} s = prefill {:.2} s + {} steps of {:.2} ms; \
             speculative {:.2} s = draft {:.2} s ({:.0}%; {:.2} ms, {:.2} plain steps, per drafted token) \
             + verify {:.2} s ({} passes of {:.2} ms, {:.2} plain steps) + prefill {:.2} s + the rest {:.2} s; \
             decoding alone (prefill left out): plain {:.1} tok/s, speculative {:.1} tok/s, {:.2}x",
            j.plain_prefill_s + j.plain_decode_s,
            j.plain_prefill_s,
            self.plain_steps,
            j.plain_step_ms,
            j.spec_s,
            j.draft_s,
            100.0 * j.draft_share,
            j.draft_ms_per_drafted_token,
            j.drafted_token_in_plain_steps,
            j.verify_s,
            self.passes,
            j.verify_ms_per_pass,
            j.verifier_pass_in_plain_steps,
            j.spec_prefill_s,
            (j.spec_other_s - j.spec_prefill_s).max(0.0),
            j.plain_decode_tok_s,
            j.spec_decode_tok_s,
            j.decode_speedup,
        )
    }
}
