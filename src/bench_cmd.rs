//! `tandem bench`: prefill / decode / verification speed llama-bench style, the per-op
//! profile, and `bench spec` (in `spec_cmd`).

use anyhow::{Context, Result};
use std::path::PathBuf;
use tandem_model::Checkpoint;

/// `tandem bench --model M` (prefill/decode), or `tandem bench spec ...`.
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct BenchCmd {
    #[command(subcommand)]
    pub sub: Option<BenchSub>,
    #[command(flatten)]
    pub args: BenchArgs,
}

#[derive(clap::Subcommand)]
pub enum BenchSub {
    /// Speculative vs plain decoding over a set of prompts: tok/s, speedup, acceptance.
    Spec(crate::spec_cmd::BenchSpecArgs),
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// A Hugging Face folder or a GGUF file.
    #[arg(long, required = true)]
    model: Option<PathBuf>,
    /// Prompt tokens to prefill (0 = skip).
    #[arg(long, default_value_t = 512)]
    pp: usize,
    /// Tokens to decode one at a time (0 = skip).
    #[arg(long, default_value_t = 128)]
    tg: usize,
    /// Repetitions of each test (after one warm-up run).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Also time verification passes of 1 and of K tokens after a `--context`-token context
    /// (the speculative-decoding shape), e.g. `--verify 5`.
    #[arg(long)]
    verify: Option<usize>,
    /// The context (tokens already in the cache) that `--verify` and `--profile` passes run
    /// after: a chat's later turns run at hundreds to thousands.
    #[arg(long, default_value_t = 64)]
    context: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Instead of the speed table: where the time of a 1-token decode step and of a K-token
    /// verification pass (after `--context` tokens) goes, per operation, beside the
    /// memory-bandwidth limit.
    #[arg(long, value_name = "K")]
    profile: Option<usize>,
}

/// `tandem bench --profile K`: per-operation time of decode and of a K-token verification
/// pass after a `context`-token context, and the bandwidth limit (weight bytes ÷ measured read
/// bandwidth of this machine with the same threads).
fn bench_profile(
    model: &tandem_model::Llama,
    k: usize,
    context: usize,
    passes: usize,
    json: bool,
) -> Result<()> {
    use tandem_model::bench::time_verify;
    use tandem_model::Logits;
    let context = context.max(1);
    let bw = tandem_kernels::membw::read_bandwidth(1 << 30, 5);
    let bytes = model.weight_bytes() as f64;
    let mut tables = Vec::new();
    for kk in [1, k.max(1)] {
        time_verify(model, kk, context, 4)?; // warm-up
                                             // Token ids wrap within the vocabulary (a long context ran past it).
        let vocab = model.config.vocab_size as u64;
        let toks: Vec<u32> = (0..(context + kk) as u64)
            .map(|i| ((100 + 37 * i) % vocab) as u32)
            .collect();
        let mut cache = model.new_cache_with_limit(context + kk)?;
        model.forward(&toks[..context], &mut cache, Logits::Last)?;
        model.start_profile();
        let t = std::time::Instant::now();
        for _ in 0..passes {
            model.forward(&toks[context..], &mut cache, Logits::All)?;
            cache.truncate(context);
        }
        let secs = t.elapsed().as_secs_f64();
        let prof = model.take_profile().context("profile was not recorded")?;
        tables.push((kk, secs / passes as f64, prof));
    }
    let limit = bytes / bw;
    if json {
        let t: Vec<_> = tables
            .iter()
            .map(|(kk, per, p)| {
                let ops: Vec<_> = p
                    .ops
                    .iter()
                    .map(|(o, s)| {
                        serde_json::json!({"op": o,
                    "ms_per_pass": 1e3 * s / p.calls.max(1) as f64})
                    })
                    .collect();
                serde_json::json!({"tokens": kk, "ms_per_pass": per * 1e3, "ops": ops})
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"weight_bytes_per_pass": bytes,
            "read_bandwidth_gb_s": bw / 1e9, "bandwidth_limit_ms": limit * 1e3, "passes": t})
        );
        return Ok(());
    }
    println!(
        "weights read per pass: {:.1} MB; measured read bandwidth: {:.1} GB/s ({} threads); \
         bandwidth limit: {:.2} ms per pass ({:.0} tok/s decode)",
        bytes / 1e6,
        bw / 1e9,
        tandem_kernels::pool::global().threads(),
        limit * 1e3,
        1.0 / limit
    );
    let (k1, kn) = (&tables[0], &tables[1]);
    println!("| op | 1 token ms | share | {} tokens ms | share |", kn.0);
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (op, s1) in &k1.2.ops {
        let sn = kn.2.ops.iter().find(|(o, _)| o == op).map_or(0.0, |x| x.1);
        let (a, b) = (s1 / k1.2.calls as f64, sn / kn.2.calls as f64);
        println!(
            "| {op} | {:.3} | {:.1}% | {:.3} | {:.1}% |",
            a * 1e3,
            100.0 * a / k1.1,
            b * 1e3,
            100.0 * b / kn.1
        );
    }
    println!(
        "| total (wall) | {:.3} | {:.0}% of limit | {:.3} | {:.2}x the 1-token pass |",
        k1.1 * 1e3,
        100.0 * limit / k1.1,
        kn.1 * 1e3,
        kn.1 / k1.1
    );
    Ok(())
}

pub fn bench(b: BenchCmd, load: &tandem_model::LoadOptions) -> Result<()> {
    let a = match b.sub {
        Some(BenchSub::Spec(s)) => return crate::spec_cmd::bench_spec(s, load),
        None => b.args,
    };
    use tandem_model::bench::{bench_cache, rate_stats, time_decode, time_prefill, time_verify};
    let model_path = a.model.clone().context("--model is required")?;
    let ck = Checkpoint::open(&model_path, None)?;
    let model = ck.load_model(load)?;
    if let Some(k) = a.profile {
        return bench_profile(&model, k, a.context, 64, a.json);
    }
    let reps = a.reps.max(1);
    let threads = rayon::current_num_threads();
    let mut rows = Vec::new();
    for (test, n) in [("pp", a.pp), ("tg", a.tg)] {
        if n == 0 {
            continue;
        }
        let mut cache = bench_cache(&model, n)?;
        let mut run = |n| {
            if test == "pp" {
                time_prefill(&model, &mut cache, n)
            } else {
                time_decode(&model, &mut cache, n)
            }
        };
        run(n)?; // warm-up: page in the weights and the cache, size the buffers
        let secs: Vec<f64> = (0..reps)
            .map(|_| run(n))
            .collect::<tandem_model::Result<_>>()?;
        let (mean, sd) = rate_stats(n, &secs);
        rows.push((format!("{test}{n}"), mean, sd));
    }
    if let Some(k) = a.verify {
        let context = a.context.max(1);
        const PASSES: usize = 32;
        for kk in [1, k.max(1)] {
            time_verify(&model, kk, context, 4)?;
            let secs: Vec<f64> = (0..reps)
                .map(|_| time_verify(&model, kk, context, PASSES))
                .collect::<tandem_model::Result<_>>()?;
            // Reported as passes per second; the ratio of the two rows is the verify cost.
            let (mean, sd) = rate_stats(PASSES, &secs);
            rows.push((format!("verify{kk}@{context} (passes/s)"), mean, sd));
        }
    }
    let size = ck.store.data_bytes();
    // What ran, as llama-bench's backend column: a number means little without it.
    let backend = match load.device {
        tandem_model::ComputeDevice::Cpu => format!("CPU ({})", tandem_kernels::cpu_kernels()),
        _ => "CUDA".to_string(),
    };
    if a.json {
        let tests: Vec<_> = rows
            .iter()
            .map(|(t, m, s)| serde_json::json!({"test": t, "tok_s": m, "stddev": s}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"model": model_path, "size_bytes": size, "backend": backend,
            "threads": threads, "weight_bytes_per_token": model.weight_bytes(), "results": tests})
        );
    } else {
        println!("| model | size | backend | threads | test | t/s |");
        println!("| --- | ---: | --- | ---: | ---: | ---: |");
        for (t, m, s) in rows {
            println!(
                "| {} | {:.2} MiB | {backend} | {threads} | {t} | {m:.2} ± {s:.2} |",
                model_path.display(),
                size as f64 / 1048576.0
            );
        }
    }
    Ok(())
}
