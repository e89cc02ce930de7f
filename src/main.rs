//! The `tandem` command line: arguments in, library calls out. No model logic lives here.

mod args;
mod bench_cmd;
mod chat_cmd;
mod eval_cmd;
mod generate_cmd;
mod info_cmd;
mod output;
mod perplexity_cmd;
mod prompt_file;
mod quantize_cmd;
mod spec_cmd;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// The system allocator with per-thread budgets, so that a model file's chat template renders
/// within a memory limit instead of taking the machine or aborting (see
/// `tandem_model::memory_budget`).
#[global_allocator]
static ALLOCATOR: tandem_model::memory_budget::BudgetAllocator =
    tandem_model::memory_budget::BudgetAllocator;

#[derive(Parser)]
#[command(
    name = "tandem",
    version,
    about = "Quantize, evaluate and speculatively decode open LLMs on your own hardware"
)]
struct Cli {
    #[command(flatten)]
    runtime: args::RuntimeArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Architecture, parameter count, tensor types and size of a model.
    Info {
        /// A Hugging Face folder or a GGUF file.
        model: PathBuf,
        /// Use this tokenizer.json instead of the model's own.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// List every tensor.
        #[arg(short, long)]
        verbose: bool,
    },
    /// Generate text from a prompt, streaming it to stdout (timing on stderr).
    Generate(generate_cmd::GenerateArgs),
    /// Chat with a model in its own chat template (one line per turn; the KV cache is kept
    /// between turns).
    Chat(chat_cmd::ChatArgs),
    /// Convert a GGUF file to a Hugging Face folder with F16 safetensors.
    Convert {
        /// The GGUF file to convert.
        input: PathBuf,
        /// Output folder (config.json, model.safetensors, tokenizer.json).
        #[arg(long)]
        out: PathBuf,
        /// Replace the output folder if it exists.
        #[arg(long)]
        force: bool,
        /// Use this tokenizer.json instead of the GGUF's own vocabulary.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// No progress bar.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Quantize a 16-bit checkpoint to GGUF (attention stays 16-bit by default).
    Quantize(Box<quantize_cmd::QuantizeArgs>),
    /// Compute an importance matrix (imatrix) from calibration text.
    Calibrate(quantize_cmd::CalibrateArgs),
    /// Compare models against a reference: perplexity, KL divergence, top-1, weight error,
    /// size and speed, as report.json / report.md / report.html.
    Eval(eval_cmd::EvalArgs),
    /// Perplexity on a text, computed as llama-perplexity does.
    Perplexity(perplexity_cmd::PerplexityArgs),
    /// Prefill and decode speed (tokens/s), measured like llama-bench's pp/tg tests.
    Bench(bench_cmd::BenchCmd),
    /// Tell a short story with the bundled stories260K model.
    Demo {
        #[arg(long, default_value_t = 200)]
        max_tokens: usize,
        #[arg(long, default_value = "Once upon a time")]
        prompt: String,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
}

/// On SIGINT, SIGTERM or SIGHUP: remove every temporary and unfinished output the command
/// registered (`tandem_model::pending`), say so on one line and exit with 128 + the signal.
/// The handler runs on signal-hook's own thread, so it may lock and touch the file system.
fn install_signal_cleanup() {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) else {
        return;
    };
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            let name = match sig {
                SIGINT => "SIGINT",
                SIGTERM => "SIGTERM",
                _ => "SIGHUP",
            };
            // Held until exit: no rename into place starts after the cleanup.
            let _held = tandem_model::pending::remove_all();
            eprintln!("error: interrupted by {name}; unfinished output removed");
            std::process::exit(128 + sig);
        }
    });
}

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, so `tandem info M | head` panicked in println! when head left.
    // A command-line tool ends quietly there instead, as cat and grep do.
    // SAFETY: setting a signal's disposition to the default before any thread is started.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    install_signal_cleanup();
    // The command runs inside the worker pool, so the thread that runs the serial parts of a
    // forward pass is itself a worker: n threads on n cores, none spinning against it.
    // The flags are checked before the pool is built (`--threads 100000` spawned threads for
    // minutes before any check ran).
    let result = cli
        .runtime
        .load_options()
        .and_then(|load| args::thread_pool(load.threads).install(|| run(cli.command, &load)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, whatever the error chain holds; text from files cannot drive the
            // terminal (control characters escaped) or flood it (length capped).
            let msg = format!("{e:#}").replace('\n', "; ");
            let msg = tandem_model::error::clean(&msg, 1000);
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command, load: &tandem_model::LoadOptions) -> anyhow::Result<()> {
    match command {
        Command::Info {
            model,
            tokenizer,
            verbose,
        } => info_cmd::info(&model, tokenizer.as_deref(), verbose),
        Command::Generate(args) => generate_cmd::generate(args, load),
        Command::Chat(args) => chat_cmd::chat(args, load),
        Command::Convert {
            input,
            out,
            force,
            tokenizer,
            quiet,
        } => info_cmd::convert(&input, &out, force, tokenizer.as_deref(), quiet),
        Command::Bench(args) => bench_cmd::bench(args, load),
        Command::Perplexity(args) => perplexity_cmd::perplexity(args, load),
        Command::Eval(args) => eval_cmd::eval(args, load),
        Command::Quantize(args) => quantize_cmd::quantize(*args, load),
        Command::Calibrate(args) => quantize_cmd::calibrate(args, load),
        Command::Demo {
            max_tokens,
            prompt,
            seed,
        } => generate_cmd::demo(max_tokens, &prompt, seed, load),
    }
}
