//! Mutation fuzzing of every reader of untrusted bytes, on stable Rust.
//!
//!     tandem-fuzz [TARGET|all] [--seconds N] [--seed S]        (scripts/fuzz.sh wraps it)
//!
//! Why a hand-made harness: cargo-fuzz needs a nightly toolchain, which this project's machines
//! cannot install; a coverage-blind mutator over seeds cut from the real files (with GGUF-aware
//! field overwrites) still reaches every check of the readers. Each target first replays its
//! regression inputs (`fuzz/corpus/<target>/`, one per finding ever fixed), then its seeds,
//! then mutated seeds until the time is up.
//!
//! A finding is any of: a panic; an error that is not one clean line (newlines, control
//! characters); a single allocation above [`MAX_ALLOC`] (the allocator writes the input out and
//! exits 3 — an allocation sized by an unchecked header aborts the process otherwise); one
//! input running longer than [`MAX_EXEC`] (exit 4). The offending input is written to
//! `fuzz/findings/<target>/`; copy it into the corpus once fixed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ffi::{c_char, c_int, c_void, CString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use tandem_model::{Checkpoint, Config, Logits, Tokenizer};

/// Largest single allocation an input may cause (the seeds need a few MB).
const MAX_ALLOC: usize = 256 << 20;
/// Longest one input may run.
const MAX_EXEC: Duration = Duration::from_secs(20);

// ----- the guard: oversize allocations and hangs end the run with the input saved -----------

/// The input being run (pointer and length) and where to save it; read by the allocator and
/// the watchdog, which must not allocate.
static CURRENT: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
static CURRENT_LEN: AtomicUsize = AtomicUsize::new(0);
static DUMP_PATH: AtomicPtr<c_char> = AtomicPtr::new(std::ptr::null_mut());
static EXEC_STARTED_MS: AtomicU64 = AtomicU64::new(0);

struct Guarded;

// SAFETY: every call is forwarded to the system allocator unchanged; the only addition is a
// size check that ends the process (no allocation, no unwinding) instead of allocating.
unsafe impl GlobalAlloc for Guarded {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        check_size(l.size());
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        check_size(l.size());
        System.alloc_zeroed(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        check_size(new);
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static ALLOC: Guarded = Guarded;

fn check_size(size: usize) {
    if size > MAX_ALLOC && !CURRENT.load(SeqCst).is_null() {
        die(
            3,
            b"finding: an allocation above the limit (sized by the input?)\n",
        );
    }
}

/// Saves the current input to the dump path and exits, using only system calls.
fn die(code: c_int, msg: &[u8]) -> ! {
    let (p, n, path) = (
        CURRENT.load(SeqCst),
        CURRENT_LEN.load(SeqCst),
        DUMP_PATH.load(SeqCst),
    );
    // SAFETY: `p`/`n` describe the input slice, alive for the whole run of one input (the
    // loop clears them before dropping it); `path` is a leaked NUL-terminated string.
    unsafe {
        if !p.is_null() && !path.is_null() {
            let fd = libc::open(path, libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC, 0o644);
            if fd >= 0 {
                libc::write(fd, p as *const c_void, n);
                libc::close(fd);
            }
        }
        libc::write(2, msg.as_ptr() as *const c_void, msg.len());
        libc::_exit(code)
    }
}

fn now_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

fn start_watchdog() {
    now_ms();
    std::thread::spawn(|| loop {
        std::thread::sleep(Duration::from_millis(250));
        let s = EXEC_STARTED_MS.load(SeqCst);
        if s != 0 && now_ms() - s > MAX_EXEC.as_millis() as u64 {
            die(4, b"finding: one input ran past the time limit\n");
        }
    });
}

// ----- targets ------------------------------------------------------------------------------

type Outcome = Result<(), String>;

struct Target {
    name: &'static str,
    seeds: fn(&Env) -> Vec<Vec<u8>>,
    run: fn(&Env, &[u8]) -> Outcome,
    /// Where GGUF-aware mutations apply (header bytes), if anywhere.
    gguf: bool,
}

/// What the targets share: the project root, the bundled model as a checkpoint.
struct Env {
    root: PathBuf,
    stories: Checkpoint,
    stories_tokenizer: String,
}

fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

fn read(p: &Path) -> Option<Vec<u8>> {
    std::fs::read(p).ok()
}

/// Loads the checkpoint's model and runs a few of its tokens: the readers' output must carry
/// a real forward pass, not only parse.
fn exercise(ck: &Checkpoint) -> Outcome {
    let m = ck
        .load_model(&tandem_model::LoadOptions::default())
        .map_err(err)?;
    let mut ids = ck
        .tokenizer
        .encode("Once upon a time", false)
        .map_err(err)?;
    ids.truncate(4);
    if ids.is_empty() {
        ids.push(0);
    }
    let mut cache = m.new_cache_with_limit(8).map_err(err)?;
    m.forward(&ids, &mut cache, Logits::Last).map_err(err)?;
    Ok(())
}

fn gguf_seeds(env: &Env) -> Vec<Vec<u8>> {
    let fx = env.root.join("tests/fixtures/llama-quantize");
    let mut v: Vec<Vec<u8>> = ["stories260K-Q8_0.gguf", "stories260K-Q4_0.gguf"]
        .iter()
        .filter_map(|f| read(&fx.join(f)))
        .collect();
    // tandem's own writer (F16 attention, Q8_0 MLP).
    let policy = tandem_quantize::Policy::new(tandem_quantize::QuantType::Q8_0);
    if let Ok(plan) = tandem_quantize::make_plan(&env.stories, &policy) {
        let opts = tandem_quantize::Options::default();
        if let Ok(b) = tandem_quantize::quantize_to_bytes(&env.stories, &plan, &opts) {
            v.push(b);
        }
    }
    v
}

fn gguf_run(_: &Env, data: &[u8]) -> Outcome {
    let ck = Checkpoint::from_gguf_bytes(Path::new("fuzz.gguf"), data.to_vec()).map_err(err)?;
    exercise(&ck)
}

/// `[u32 LE length of config.json][config.json][model.safetensors]`.
fn safetensors_seeds(env: &Env) -> Vec<Vec<u8>> {
    let d = env.root.join("models/stories260K");
    let (Some(cfg), Some(st)) = (
        read(&d.join("config.json")),
        read(&d.join("model.safetensors")),
    ) else {
        return Vec::new();
    };
    let mut v = (cfg.len() as u32).to_le_bytes().to_vec();
    v.extend(cfg);
    v.extend(st);
    vec![v]
}

fn safetensors_run(env: &Env, data: &[u8]) -> Outcome {
    let n = data
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or("too short")?;
    let cfg = data
        .get(4..4usize.saturating_add(n))
        .ok_or("config runs past the end")?;
    let st = &data[4 + n..];
    let p = Path::new("fuzz-model");
    let cfg = std::str::from_utf8(cfg).map_err(err)?;
    let config = Config::from_json(p, cfg).map_err(err)?;
    let store =
        tandem_model::weights::WeightStore::from_safetensors_bytes(p, st.to_vec()).map_err(err)?;
    let tok = Tokenizer::from_json(p, env.stories_tokenizer.clone(), None).map_err(err)?;
    let ck = Checkpoint::from_parts(p, config, store, tok).map_err(err)?;
    exercise(&ck)
}

/// GGUF headers only (metadata and tensor table): the tokenizer lives in the metadata.
fn tokenizer_seeds(env: &Env) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = vec![env
        .root
        .join("tests/fixtures/llama-quantize/stories260K-Q8_0.gguf")];
    // SmolLM2's byte-level BPE vocabulary, when scripts/fetch-models.sh has run.
    let cache = std::env::var_os("TANDEM_MODELS")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/tandem/models"))
        });
    if let Some(c) = cache {
        files.push(c.join("SmolLM2-135M-Instruct.Q4_1.gguf"));
    }
    files
        .iter()
        .filter_map(|f| {
            let b = read(f)?;
            let c = tandem_model::gguf_reader::read_header(f, &b).ok()?;
            Some(b[..c.tensor_data_offset as usize].to_vec())
        })
        .collect()
}

fn tokenizer_run(_: &Env, data: &[u8]) -> Outcome {
    let p = Path::new("fuzz.gguf");
    let c = tandem_model::gguf_reader::read_header(p, data).map_err(err)?;
    let tok = Tokenizer::from_gguf(p, &c.metadata).map_err(err)?;
    let ids = tok.encode("Hello, world! 123 héllo", true).map_err(err)?;
    tok.decode(&ids).map_err(err)?;
    Ok(())
}

fn imatrix_seeds(env: &Env) -> Vec<Vec<u8>> {
    let fx = env.root.join("tests/fixtures/llama-quantize");
    ["stories260K-imatrix.gguf", "stories260K-imatrix.dat"]
        .iter()
        .filter_map(|f| read(&fx.join(f)))
        .collect()
}

fn imatrix_run(_: &Env, data: &[u8]) -> Outcome {
    let m = tandem_quantize::ImportanceMatrix::from_bytes(Path::new("fuzz.imatrix"), data.to_vec())
        .map_err(err)?;
    for name in m.entries.keys() {
        m.importance(name);
    }
    Ok(())
}

fn recipe_seeds(_: &Env) -> Vec<Vec<u8>> {
    [
        "scheme = \"q4_k\"\nattention = \"keep\"\nembeddings = \"q8_0\"\n[[rules]]\npattern = 'mlp\\.down_proj'\ntype = \"q6_k\"\n",
        "scheme = \"q4_0\"\nattention = \"q8_0\"\noutput = \"f16\"\n[[rules]]\npattern = 'layers\\.0\\..*'\ntype = \"q8_0\"\n[[rules]]\npattern = '.*norm.*'\ntype = \"f32\"\n",
        "scheme = \"q2_k\"\n",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

fn recipe_run(env: &Env, data: &[u8]) -> Outcome {
    let text = String::from_utf8_lossy(data);
    let r = tandem_quantize::Recipe::parse(Path::new("fuzz.toml"), &text).map_err(err)?;
    let policy = r.to_policy().map_err(err)?;
    tandem_quantize::make_plan(&env.stories, &policy).map_err(err)?;
    Ok(())
}

// The C ABI: a toy engine (next token from the last token and its position) whose description
// and arguments come from the input.

struct Toy {
    ctx: Vec<u32>,
    vocab: usize,
    limit: usize,
}

unsafe extern "C" fn toy_forward(
    user: *mut c_void,
    tokens: *const u32,
    n: usize,
    logits: *mut f32,
) -> c_int {
    // SAFETY: `user` is the `Toy` this scenario made; tandem passes `n` tokens and a buffer of
    // n * vocab_size floats (tandem.h), vocab_size being this toy's `vocab`.
    let t = &mut *(user as *mut Toy);
    if t.ctx.len() + n > t.limit {
        return 1;
    }
    let toks = std::slice::from_raw_parts(tokens, n);
    let out = std::slice::from_raw_parts_mut(logits, n * t.vocab);
    for (i, &tok) in toks.iter().enumerate() {
        let pos = t.ctx.len();
        t.ctx.push(tok);
        let best = ((tok as usize * 5 + 1 + pos / 100) % 13) % t.vocab;
        let row = &mut out[i * t.vocab..][..t.vocab];
        row.fill(0.0);
        row[best] = 1.0;
    }
    0
}

unsafe extern "C" fn toy_rollback(user: *mut c_void, len: usize) {
    // SAFETY: as in `toy_forward`.
    let t = &mut *(user as *mut Toy);
    t.ctx.truncate(len);
}

fn capi_seeds(_: &Env) -> Vec<Vec<u8>> {
    vec![
        vec![0b10, 4, 4, 4, 5, 3, 9, 27, 17, 22, 60, 6, 1, 1, 12],
        vec![0, 4, 2, 4, 3, 1, 2, 3, 200, 3, 0, 0],
        vec![0b1000, 7, 7, 7, 2, 0, 1, 10, 4, 1, 1, 5],
    ]
}

fn capi_run(_: &Env, data: &[u8]) -> Outcome {
    use tandem_speculate::capi::{tandem_generate, tandem_last_error, TandemModel};
    let mut b = data.iter().copied();
    let mut next = || b.next().unwrap_or(0);
    let flags = next();
    const VOCABS: [usize; 8] = [0, 1, 2, 7, 64, 13, (1 << 24) + 1, usize::MAX];
    const LIMITS: [usize; 6] = [0, 1, 2, 5, 64, 512];
    let vocab = VOCABS[next() as usize % 8];
    let dvocab = VOCABS[next() as usize % 8];
    let limit = LIMITS[next() as usize % 6];
    let n_prompt = next() as usize % 40;
    let prompt: Vec<u32> = (0..n_prompt).map(|_| next() as u32 % 80).collect();
    let max_tokens = next() as usize;
    let draft_max = next() as usize % 20;
    let adaptive = next() as c_int & 1;
    let n_eos = next() as usize % 3;
    let eos: Vec<u32> = (0..n_eos).map(|_| next() as u32 % 80).collect();
    // The toy honours the declared vocabulary only where it is a real one.
    let small = |v: usize| (1..=64).contains(&v);
    let mut v_toy = Toy {
        ctx: Vec::new(),
        vocab: if small(vocab) { vocab } else { 1 },
        limit,
    };
    let mut d_toy = Toy {
        ctx: Vec::new(),
        vocab: if small(dvocab) { dvocab } else { 1 },
        limit,
    };
    let model = |t: &mut Toy, declared: usize, f_null: bool, r_null: bool| TandemModel {
        user: t as *mut Toy as *mut c_void,
        forward: if f_null { None } else { Some(toy_forward) },
        rollback: if r_null { None } else { Some(toy_rollback) },
        vocab_size: declared,
        context_limit: t.limit,
    };
    // A declared vocabulary the toy cannot back is refused before any call, or the toy would
    // be asked to write more than it has: only pass real ones unless tandem must refuse them.
    let vdecl = if small(vocab) || vocab == 0 || vocab > 1 << 24 {
        vocab
    } else {
        v_toy.vocab
    };
    let ddecl = if small(dvocab) || dvocab == 0 || dvocab > 1 << 24 {
        dvocab
    } else {
        d_toy.vocab
    };
    let vm = model(&mut v_toy, vdecl, flags & 4 != 0, flags & 8 != 0);
    let dm = model(&mut d_toy, ddecl, flags & 16 != 0, flags & 32 != 0);
    let mut got = 0usize;
    unsafe extern "C" fn count(user: *mut c_void, _tok: u32) -> c_int {
        // SAFETY: `user` is the `got` counter below, alive for the call.
        *(user as *mut usize) += 1;
        0
    }
    // SAFETY: every pointer is valid for the length given (or NULL where tandem.h allows it);
    // the callbacks honour tandem.h for the toys above.
    let n = unsafe {
        tandem_generate(
            if flags & 1 != 0 {
                std::ptr::null()
            } else {
                &vm
            },
            if flags & 2 != 0 {
                &dm
            } else {
                std::ptr::null()
            },
            if prompt.is_empty() {
                std::ptr::null()
            } else {
                prompt.as_ptr()
            },
            prompt.len(),
            max_tokens,
            if flags & 64 != 0 {
                std::ptr::null()
            } else {
                eos.as_ptr()
            },
            eos.len(),
            draft_max,
            adaptive,
            Some(count),
            &mut got as *mut usize as *mut c_void,
            std::ptr::null_mut(),
        )
    };
    if n < 0 {
        // SAFETY: tandem_last_error returns a NUL-terminated string valid until the next call.
        let msg = unsafe { std::ffi::CStr::from_ptr(tandem_last_error()) };
        return Err(msg.to_string_lossy().into_owned());
    }
    if n as usize != got || n as usize > max_tokens {
        return Err(format!(
            "\nreturned {n} but delivered {got} (max {max_tokens})"
        ));
    }
    Ok(())
}

const TARGETS: &[Target] = &[
    Target {
        name: "gguf",
        seeds: gguf_seeds,
        run: gguf_run,
        gguf: true,
    },
    Target {
        name: "safetensors",
        seeds: safetensors_seeds,
        run: safetensors_run,
        gguf: false,
    },
    Target {
        name: "tokenizer",
        seeds: tokenizer_seeds,
        run: tokenizer_run,
        gguf: true,
    },
    Target {
        name: "imatrix",
        seeds: imatrix_seeds,
        run: imatrix_run,
        gguf: true,
    },
    Target {
        name: "recipe",
        seeds: recipe_seeds,
        run: recipe_run,
        gguf: false,
    },
    Target {
        name: "capi",
        seeds: capi_seeds,
        run: capi_run,
        gguf: false,
    },
];

// ----- mutation ---------------------------------------------------------------------------

const INTERESTING: [u64; 14] = [
    0,
    1,
    2,
    3,
    7,
    8,
    31,
    32,
    255,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 40,
    u64::MAX,
];

/// One to eight random edits: bit flips, byte and integer overwrites with boundary values,
/// truncation, deletion, duplication and insertion. GGUF inputs get most edits inside their
/// header (where counts, lengths, types and offsets live), as 4- and 8-byte field writes.
/// `header` is where the seed's GGUF header ends (its length for other inputs).
fn mutate(rng: &mut rand::rngs::StdRng, seed: &[u8], header: usize) -> Vec<u8> {
    let mut d = seed.to_vec();
    for _ in 0..rng.random_range(1..=8) {
        if d.is_empty() {
            d.push(rng.random());
            continue;
        }
        let span = if rng.random_bool(0.8) {
            header.min(d.len())
        } else {
            d.len()
        };
        let at = rng.random_range(0..span.max(1)).min(d.len() - 1);
        match rng.random_range(0..9) {
            0 => d[at] ^= 1 << rng.random_range(0..8),
            1 => d[at] = rng.random(),
            2 | 3 => {
                let v = INTERESTING[rng.random_range(0..INTERESTING.len())];
                let v = if rng.random_bool(0.3) {
                    v.wrapping_add(rng.random_range(0..4))
                } else {
                    v
                };
                let w = if rng.random_bool(0.5) { 8 } else { 4 };
                let bytes = v.to_le_bytes();
                for (i, b) in bytes[..w].iter().enumerate() {
                    if let Some(x) = d.get_mut(at + i) {
                        *x = *b;
                    }
                }
            }
            4 => d.truncate(at),
            5 => {
                let n = rng.random_range(1..=64).min(d.len() - at);
                d.drain(at..at + n);
            }
            6 => {
                let n = rng.random_range(1..=64).min(d.len() - at);
                let chunk = d[at..at + n].to_vec();
                let to = rng.random_range(0..=d.len());
                d.splice(to..to, chunk);
            }
            7 => {
                let n = rng.random_range(1..=16);
                let ins: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                d.splice(at..at, ins);
            }
            _ => d[at] = [0u8, 0xff, 0x7f, 0x80, b'"', b'\\', b'\n', b'['][rng.random_range(0..8)],
        }
    }
    d
}

// ----- the loop ---------------------------------------------------------------------------

#[derive(Default)]
struct Tally {
    execs: u64,
    accepted: u64,
    refused: u64,
    findings: Vec<String>,
}

fn hash(d: &[u8]) -> u64 {
    d.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

fn run_one(env: &Env, t: &Target, input: &[u8], findings_dir: &Path, tally: &mut Tally) {
    CURRENT_LEN.store(input.len(), SeqCst);
    CURRENT.store(input.as_ptr() as *mut u8, SeqCst);
    EXEC_STARTED_MS.store(now_ms(), SeqCst);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (t.run)(env, input)));
    EXEC_STARTED_MS.store(0, SeqCst);
    CURRENT.store(std::ptr::null_mut(), SeqCst);
    tally.execs += 1;
    let problem = match r {
        Ok(Ok(())) => {
            tally.accepted += 1;
            None
        }
        Ok(Err(msg)) => {
            tally.refused += 1;
            let bad = msg.contains('\n') || msg.chars().any(|c| c.is_control()) || msg.len() > 2000;
            bad.then(|| format!("error is not one clean line: {msg:?}"))
        }
        Err(p) => {
            let m = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Some(format!("panic: {m}"))
        }
    };
    if let Some(p) = problem {
        let _ = std::fs::create_dir_all(findings_dir);
        let f = findings_dir.join(format!("{:016x}.bin", hash(input)));
        let _ = std::fs::write(&f, input);
        tally.findings.push(format!("{}: {p}", f.display()));
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut which, mut seconds, mut seed) = ("all".to_string(), 10.0f64, None::<u64>);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seconds" => seconds = args.next().and_then(|v| v.parse().ok()).unwrap_or(seconds),
            "--seed" => seed = args.next().and_then(|v| v.parse().ok()),
            "-h" | "--help" => {
                let names: Vec<_> = TARGETS.iter().map(|t| t.name).collect();
                println!(
                    "tandem-fuzz [all|{}] [--seconds N per target] [--seed S]",
                    names.join("|")
                );
                return;
            }
            t => which = t.to_string(),
        }
    }
    match fuzz(&which, seconds, seed) {
        Ok(0) => {}
        Ok(_) => std::process::exit(1),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}

/// Runs `which` (a target's name or "all") for `seconds` of mutations each, printing one line
/// per target; returns the number of findings.
fn fuzz(which: &str, seconds: f64, seed: Option<u64>) -> Result<usize, String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let stories = Checkpoint::open(&root.join("models/stories260K"), None).map_err(err)?;
    let stories_tokenizer =
        std::fs::read_to_string(root.join("models/stories260K/tokenizer.json")).unwrap_or_default();
    let env = Env {
        root: root.clone(),
        stories,
        stories_tokenizer,
    };
    // Quiet panics: they are counted and reported, not printed as they happen.
    std::panic::set_hook(Box::new(|_| {}));
    start_watchdog();
    let seed = seed.unwrap_or_else(|| now_ms() ^ std::process::id() as u64);
    println!("seed {seed} ({seconds} s per target; rerun with --seed {seed})");
    let mut total_findings = 0;
    for t in TARGETS.iter().filter(|t| which == "all" || which == t.name) {
        let findings_dir = root.join("fuzz/findings").join(t.name);
        let dump = CString::new(
            findings_dir
                .join("crash-or-hang.bin")
                .to_string_lossy()
                .into_owned(),
        )
        .unwrap_or_default();
        let _ = std::fs::create_dir_all(&findings_dir);
        DUMP_PATH.store(dump.into_raw(), SeqCst);
        let mut tally = Tally::default();
        // Regression inputs first: every past finding must now end well.
        let corpus_dir = root.join("fuzz/corpus").join(t.name);
        let mut regressions: Vec<Vec<u8>> = std::fs::read_dir(&corpus_dir)
            .into_iter()
            .flatten()
            .filter_map(|e| read(&e.ok()?.path()))
            .collect();
        let n_reg = regressions.len();
        let seeds = (t.seeds)(&env);
        for input in regressions.drain(..).chain(seeds.iter().cloned()) {
            run_one(&env, t, &input, &findings_dir, &mut tally);
        }
        // Where each seed's header ends, found once (not per mutation: SmolLM2's is 3 MB).
        let headers: Vec<usize> = seeds
            .iter()
            .map(|s| {
                t.gguf
                    .then(|| tandem_model::gguf_reader::read_header(Path::new("seed"), s).ok())
                    .flatten()
                    .map_or(s.len(), |c| c.tensor_data_offset as usize)
            })
            .collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ hash(t.name.as_bytes()));
        let start = Instant::now();
        if !seeds.is_empty() {
            while start.elapsed().as_secs_f64() < seconds {
                let i = rng.random_range(0..seeds.len());
                let input = mutate(&mut rng, &seeds[i], headers[i]);
                run_one(&env, t, &input, &findings_dir, &mut tally);
            }
        }
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        println!(
            "{:<12} {:>7} execs ({:>6.0}/s)  {:>3} regression + {} seed inputs  {:>6} accepted  {:>7} refused  {} findings",
            t.name,
            tally.execs,
            tally.execs as f64 / secs,
            n_reg,
            seeds.len(),
            tally.accepted,
            tally.refused,
            tally.findings.len()
        );
        for f in &tally.findings {
            println!("  finding: {f}");
        }
        total_findings += tally.findings.len();
        let _ = std::fs::remove_dir(&findings_dir); // only if nothing was found
    }
    let _ = std::fs::remove_dir(root.join("fuzz/findings")); // only if empty
    EXEC_STARTED_MS.store(0, SeqCst);
    // Back to the default hook: a caller's own panics (a failing test) print again.
    let _ = std::panic::take_hook();
    Ok(total_findings)
}

#[cfg(test)]
mod tests {
    /// CI's short fuzzing run, inside `cargo test` (built with the tests' own features: a
    /// separate `cargo build -p tandem-fuzz` rebuilt the dependencies, ~100 s of CI): every
    /// target's regression inputs and seeds, then `TANDEM_FUZZ_SECONDS` (default 3) of
    /// mutations each. Any finding fails. Longer runs: scripts/fuzz.sh.
    #[test]
    fn every_target_survives_a_short_run() {
        let seconds = std::env::var("TANDEM_FUZZ_SECONDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3.0);
        assert_eq!(
            super::fuzz("all", seconds, None),
            Ok(0),
            "findings in fuzz/findings/"
        );
    }
}
