//! Argument groups several commands share (flattened into each), the checks on them, and
//! the process-wide settings (thread pool, activation precision, progress bars).

use anyhow::Result;
use tandem_model::SamplingParams;
use tandem_speculate::SpecConfig;

pub use tandem_speculate::session::DEFAULT_DRAFT_P_MIN;

/// The worker pool for tandem's kernels, `threads` wide (default: every core). candle's own
/// CPU matmul reads RAYON_NUM_THREADS, so it is sized the same way.
pub fn thread_pool(threads: Option<usize>) -> rayon::ThreadPool {
    let n = threads
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
        .max(1);
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .or_else(|_| rayon::ThreadPoolBuilder::new().num_threads(1).build())
        .expect("a one-thread pool can always be built")
}

/// How tokens are picked: greedy, or sampled reproducibly.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct SamplingArgs {
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling threshold (1.0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    pub fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
        }
    }
}

/// How a speculative run drafts (the drafter itself is each command's `--draft`).
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct DraftArgs {
    /// Most tokens drafted per verifier pass.
    #[arg(long, default_value_t = 8)]
    pub draft_max: usize,
    /// Always draft --draft-max tokens instead of adapting to acceptance and cost.
    #[arg(long)]
    pub no_adapt: bool,
    /// A draft model stops drafting when its most likely next token has less than this
    /// probability (0 = draft --draft-max tokens whenever speculating).
    #[arg(long, default_value_t = DEFAULT_DRAFT_P_MIN)]
    pub draft_p_min: f32,
    /// Give a draft model its own KV cache (it reads the prompt and every verified token
    /// itself) even when it has the verifier's shape and could draft over the verifier's.
    #[arg(long)]
    pub own_draft_cache: bool,
    /// A draft model computes logits only for the tokens below this id and the prompt's (its
    /// output head is ~20% of a draft step on SmolLM2; a token left out is only never
    /// proposed, the output stays the model's own). 0 = the whole vocabulary.
    #[arg(long, default_value_t = tandem_speculate::DEFAULT_DRAFT_VOCAB)]
    pub draft_vocab: usize,
    /// Token trees: where a draft model's top probability is below this, its runner-up is
    /// verified beside it in the same pass (0 = chains only). Leaves that the verifier rarely
    /// takes switch branching off.
    #[arg(long, default_value_t = tandem_speculate::config::DEFAULT_TREE_BELOW)]
    pub draft_tree: f32,
    /// Token trees from the suffix lookup: up to this many distinct earlier continuations
    /// verified at once (1 = the best match only).
    #[arg(long, default_value_t = 1)]
    pub lookup_paths: usize,
    /// When sampling, judge drafts by rejection sampling (the draft samples on a stream of its
    /// own; draft lengths follow acceptance alone) instead of the default coupled sampling
    /// (draft and verifier share each position's noise: the output is plain sampling's with
    /// the same seed, and draft lengths follow the clock).
    #[arg(long)]
    pub rejection_sampling: bool,
    /// Let the adaptive controller pick one draft length per step instead of stopping each
    /// draft token by token (by the draft's confidence and each verifier row's measured price).
    #[arg(long)]
    pub no_draft_gate: bool,
}

impl DraftArgs {
    /// The speculative session's configuration.
    pub fn config(&self, params: SamplingParams, ctx: Option<usize>) -> SpecConfig {
        SpecConfig {
            params,
            draft_max: self.draft_max,
            adapt: !self.no_adapt,
            ctx,
            draft_p_min: self.draft_p_min,
            own_draft_cache: self.own_draft_cache,
            draft_vocab: self.draft_vocab,
            tree_below: self.draft_tree,
            lookup_paths: self.lookup_paths,
            coupled: !self.rejection_sampling,
            gate: !self.no_draft_gate,
            ..SpecConfig::default()
        }
    }
}

/// The generation flags every command shares, checked before any model is opened.
pub fn check_generation_flags(
    max_tokens: usize,
    ctx: Option<usize>,
    drafting: Option<&DraftArgs>,
) -> Result<()> {
    if max_tokens == 0 {
        anyhow::bail!("--max-tokens must be at least 1");
    }
    if ctx == Some(0) {
        anyhow::bail!("--ctx must be at least 1 position (the prompt and what is generated)");
    }
    // The library's check, said with the flag's name.
    if let Some(d) = drafting.filter(|d| tandem_speculate::check_draft_max(d.draft_max).is_err()) {
        let most = tandem_speculate::MAX_DRAFT_TOKENS;
        anyhow::bail!("--draft-max {} is outside 1..={most}", d.draft_max);
    }
    // NaN fails the range check too.
    let probabilities = drafting.map(|d| {
        [
            ("--draft-p-min", d.draft_p_min),
            ("--draft-tree", d.draft_tree),
        ]
    });
    for (flag, p) in probabilities.into_iter().flatten() {
        if !(0.0..=1.0).contains(&p) {
            anyhow::bail!("{flag} {p} is not a probability (0 to 1)");
        }
    }
    Ok(())
}

/// A byte-progress bar on stderr; hidden when stderr is not a terminal or with --quiet.
pub fn progress_bar(quiet: bool) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if quiet || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} {eta} {wide_msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// How models are run, for every command (global flags): threads, activation precision,
/// device. Parsed into the [`tandem_model::LoadOptions`] every model is loaded with.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct RuntimeArgs {
    /// Worker threads for the CPU kernels (default: all cores).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    /// How activations meet Q8_0/Q4_0 weights: int8 (rounded to 8 bits per 32-block, as
    /// llama.cpp does; fast) or f32 (what the dequantized 16-bit weights compute exactly).
    #[arg(long, global = true, value_enum, default_value_t = Activations::Int8)]
    pub activations: Activations,
    /// Run on GPU 0 (builds with `--features cuda`): the whole forward pass and KV cache when
    /// every linear layer is Q8_0/Q4_0/F16, else just those layers.
    #[arg(long, global = true)]
    pub gpu: bool,
    /// What the KV cache holds keys and values as on the CPU: f16 (llama.cpp's default: half
    /// the memory and the bytes a long context's decoding step reads) or f32 (exact). A GPU
    /// cache is f32.
    #[arg(long, global = true, value_enum, default_value_t = KvCache::F16)]
    pub kv_cache: KvCache,
}

impl RuntimeArgs {
    /// The load options these flags ask for; with `--gpu`, checks a GPU is usable first (and
    /// names it on stderr).
    pub fn load_options(&self) -> Result<tandem_model::LoadOptions> {
        if self.threads == Some(0) {
            anyhow::bail!("--threads must be at least 1");
        }
        let most = tandem_kernels::pool::MAX_THREADS;
        if let Some(n) = self.threads.filter(|&n| n > most) {
            anyhow::bail!("--threads {n} is more than {most}");
        }
        let device = if self.gpu {
            let name = tandem_model::linear::gpu_name()?;
            eprintln!("GPU 0: {name}");
            tandem_model::ComputeDevice::Gpu
        } else {
            tandem_model::ComputeDevice::Cpu
        };
        Ok(tandem_model::LoadOptions {
            threads: self.threads,
            activations: self.activations.into(),
            device,
            kv_cache: self.kv_cache.into(),
        })
    }
}

/// `--kv-cache` for every command that runs a model.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvCache {
    F16,
    F32,
}

impl From<KvCache> for tandem_model::KvCacheType {
    fn from(k: KvCache) -> Self {
        match k {
            KvCache::F16 => Self::F16,
            KvCache::F32 => Self::F32,
        }
    }
}

/// `--activations` for every command that runs a model.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activations {
    Int8,
    F32,
}

impl From<Activations> for tandem_model::linear::ActivationPrecision {
    fn from(a: Activations) -> Self {
        match a {
            Activations::Int8 => Self::Int8,
            Activations::F32 => Self::F32,
        }
    }
}
