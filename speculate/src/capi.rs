//! The C ABI: an engine written in any language plugs its own model in as callbacks
//! (forward k tokens, roll the context back) and gets speculative decoding from tandem's core:
//! drafts from prompt lookup or from a second engine model, greedy acceptance (the output is
//! exactly the engine's own greedy decoding) or rejection sampling (the engine's own sampling
//! distribution), adaptive draft length, and the accepted tokens streamed back. The run is
//! built from a [`SpecConfig`], as tandem's own CLI and Python runs are. See
//! `include/tandem.h` for the contract; `tests/c/engine.c` drives it.

use crate::{Error, ModelDrafter, NgramDrafter, Result, SpecConfig, Verifier};
use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CString};
use tandem_kernels::sampling::SamplingParams;

/// An engine's model: forward and rollback over one sequence's context (`TandemModel` in C).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TandemModel {
    pub user: *mut c_void,
    /// Runs `n` tokens after the current context and writes `n * vocab_size` logits (row i
    /// predicts the token after `tokens[i]`). Returns 0 on success.
    pub forward: Option<
        unsafe extern "C" fn(
            user: *mut c_void,
            tokens: *const u32,
            n: usize,
            logits: *mut f32,
        ) -> c_int,
    >,
    /// Keeps the first `len` positions of the context.
    pub rollback: Option<unsafe extern "C" fn(user: *mut c_void, len: usize)>,
    pub vocab_size: usize,
    pub context_limit: usize,
}

/// How to speculate (`TandemConfig` in C): what [`SpecConfig`] holds that an engine sets.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TandemConfig {
    /// Most tokens drafted per verifier pass.
    pub draft_max: usize,
    /// Non-zero: tandem picks the draft length (down to 0 when drafts do not pay).
    pub adaptive: c_int,
    /// 0: greedy (the engine's own greedy decoding). Above 0: sampled; rejection sampling
    /// keeps the verifier's distribution, reproducibly by `seed`.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Nucleus threshold (1 = off).
    pub top_p: f32,
    pub seed: u64,
    /// A draft model stops drafting below this top probability (0 = never).
    pub draft_p_min: f32,
    /// A draft step's time over a verifier step's (e.g. their weight bytes' ratio; 0 for
    /// prompt lookup): a sampled adaptive run adapts on it instead of the clock, so a seed
    /// reproduces its output.
    pub draft_cost: f64,
}

impl TandemConfig {
    fn spec_config(&self) -> SpecConfig {
        SpecConfig {
            params: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                seed: self.seed,
            },
            draft_max: self.draft_max,
            adapt: self.adaptive != 0,
            draft_p_min: self.draft_p_min,
            ..SpecConfig::default()
        }
    }
}

/// What a generation did (`TandemStats` in C).
#[repr(C)]
#[derive(Default)]
pub struct TandemStats {
    pub generated: usize,
    pub drafted: usize,
    pub accepted: usize,
    pub verifier_passes: usize,
    pub draft_seconds: f64,
    pub verify_seconds: f64,
    pub total_seconds: f64,
}

/// A [`Verifier`] over an engine's callbacks.
struct Engine {
    m: TandemModel,
    len: usize,
}

/// Largest vocabulary an engine may declare (2^24 ids; the largest real ones are ~256k): a
/// garbage `vocab_size` must not size the logits buffer.
pub const MAX_VOCAB: usize = 1 << 24;
/// Most logits one forward call may ask for (4 GiB of f32).
const MAX_LOGITS: usize = 1 << 30;

/// Checks an engine's model description before anything is called or allocated.
fn check_model(m: &TandemModel, role: &str) -> std::result::Result<(), String> {
    if m.forward.is_none() {
        return Err(format!("{role}: the forward callback is NULL"));
    }
    if m.rollback.is_none() {
        return Err(format!(
            "{role}: the rollback callback is NULL (rejected drafts must be removed from the engine's context)"
        ));
    }
    if m.vocab_size == 0 || m.vocab_size > MAX_VOCAB {
        return Err(format!(
            "{role}: vocab_size {} is outside 1..={MAX_VOCAB}",
            m.vocab_size
        ));
    }
    if m.context_limit == 0 {
        return Err(format!("{role}: context_limit is 0"));
    }
    Ok(())
}

impl Verifier for Engine {
    fn verify(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        let v = self.m.vocab_size;
        let n = tokens
            .len()
            .checked_mul(v)
            .filter(|&n| n <= MAX_LOGITS)
            .ok_or_else(|| {
                Error::Mismatch(format!(
                    "{} tokens x vocab_size {v} logits is more than one call may return",
                    tokens.len()
                ))
            })?;
        let mut out = vec![0f32; n];
        let f = self
            .m
            .forward
            .ok_or_else(|| Error::Mismatch("forward callback is NULL".into()))?;
        // SAFETY: the engine promised (tandem.h) that `forward` reads `n` tokens and writes
        // `n * vocab_size` floats; both buffers are exactly that long.
        let rc = unsafe { f(self.m.user, tokens.as_ptr(), tokens.len(), out.as_mut_ptr()) };
        if rc != 0 {
            return Err(Error::Mismatch(format!(
                "the engine's forward returned {rc}"
            )));
        }
        self.len += tokens.len();
        Ok(out.chunks_exact(v).map(<[f32]>::to_vec).collect())
    }
    fn rollback(&mut self, len: usize) {
        // Never NULL: `check_model` refused that before the engine was wrapped.
        if let Some(r) = self.m.rollback {
            // SAFETY: plain call into the engine with its own user pointer.
            unsafe { r(self.m.user, len) };
        }
        self.len = len.min(self.len);
    }
    fn len(&self) -> usize {
        self.len
    }
    fn limit(&self) -> usize {
        self.m.context_limit
    }
    fn vocab_size(&self) -> usize {
        self.m.vocab_size
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// The message of the last failed call on this thread ("" if none). Valid until the next call.
#[no_mangle]
pub extern "C" fn tandem_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Greedy speculative generation; see tandem.h. Returns the number of tokens generated, or -1
/// with `tandem_last_error()` set.
///
/// # Safety
/// Pointers must be valid for the lengths given (or NULL where tandem.h allows it), and the
/// callbacks must honour the contract in tandem.h.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn tandem_generate(
    verifier: *const TandemModel,
    draft: *const TandemModel,
    prompt: *const u32,
    n_prompt: usize,
    max_tokens: usize,
    eos: *const u32,
    n_eos: usize,
    draft_max: usize,
    adaptive: c_int,
    on_token: Option<unsafe extern "C" fn(user: *mut c_void, token: u32) -> c_int>,
    on_token_user: *mut c_void,
    stats: *mut TandemStats,
) -> i64 {
    let config = TandemConfig {
        draft_max,
        adaptive,
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
        draft_p_min: 0.0,
        draft_cost: 0.0,
    };
    // SAFETY: the caller's pointers, passed on unchanged under the same contract.
    unsafe {
        tandem_generate_with(
            verifier,
            draft,
            prompt,
            n_prompt,
            max_tokens,
            eos,
            n_eos,
            &config,
            on_token,
            on_token_user,
            stats,
        )
    }
}

/// Speculative generation as `config` says (greedy or sampled); see tandem.h. Returns the
/// number of tokens generated, or -1 with `tandem_last_error()` set.
///
/// # Safety
/// Pointers must be valid for the lengths given (or NULL where tandem.h allows it), and the
/// callbacks must honour the contract in tandem.h.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn tandem_generate_with(
    verifier: *const TandemModel,
    draft: *const TandemModel,
    prompt: *const u32,
    n_prompt: usize,
    max_tokens: usize,
    eos: *const u32,
    n_eos: usize,
    config: *const TandemConfig,
    on_token: Option<unsafe extern "C" fn(user: *mut c_void, token: u32) -> c_int>,
    on_token_user: *mut c_void,
    stats: *mut TandemStats,
) -> i64 {
    let run = || -> std::result::Result<(usize, TandemStats), String> {
        let v = verifier.as_ref().ok_or("verifier is NULL")?;
        let c = config.as_ref().ok_or("config is NULL")?;
        check_model(v, "verifier")?;
        if let Some(d) = draft.as_ref() {
            check_model(d, "draft")?;
            if d.vocab_size != v.vocab_size {
                return Err(format!(
                    "draft: vocab_size {} differs from the verifier's {}",
                    d.vocab_size, v.vocab_size
                ));
            }
        }
        if !c.draft_cost.is_finite() || c.draft_cost < 0.0 {
            return Err(format!("config: draft_cost {} is not >= 0", c.draft_cost));
        }
        if eos.is_null() && n_eos > 0 {
            return Err(format!("eos is NULL but n_eos is {n_eos}"));
        }
        if prompt.is_null() || n_prompt == 0 {
            return Err("the prompt is empty".into());
        }
        let prompt = std::slice::from_raw_parts(prompt, n_prompt);
        let eos = if eos.is_null() {
            &[][..]
        } else {
            std::slice::from_raw_parts(eos, n_eos)
        };
        let spec = c.spec_config();
        let mut ver = Engine { m: *v, len: 0 };
        let mut ngram = NgramDrafter::default();
        let mut model_draft;
        let drafter: &mut dyn crate::Drafter = match draft.as_ref() {
            None => &mut ngram,
            Some(d) => {
                let chain = spec.draft_chain().map_err(|e| format!("config: {e}"))?;
                model_draft = ModelDrafter::over(Engine { m: *d, len: 0 }, chain);
                &mut model_draft
            }
        };
        let mut delivered = 0usize;
        let mut stopped = false;
        let res = spec.decode(
            drafter,
            &mut ver,
            c.draft_cost,
            prompt,
            max_tokens,
            eos,
            |t| {
                delivered += 1;
                if let Some(cb) = on_token {
                    // SAFETY: the engine's callback with its own user pointer.
                    if cb(on_token_user, t) != 0 {
                        stopped = true;
                        return Err(Error::Mismatch("stopped by the engine".into()));
                    }
                }
                Ok(())
            },
        );
        match res {
            Ok((out, st)) => Ok((
                out.len(),
                TandemStats {
                    generated: out.len(),
                    drafted: st.drafted,
                    accepted: st.accepted,
                    verifier_passes: st.verifier_passes,
                    draft_seconds: st.draft_secs,
                    verify_seconds: st.verify_secs,
                    total_seconds: st.total_secs,
                },
            )),
            Err(_) if stopped => Ok((
                delivered,
                TandemStats {
                    generated: delivered,
                    ..Default::default()
                },
            )),
            Err(e) => Err(e.to_string()),
        }
    };
    // Never unwind into C.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(Ok((n, st))) => {
            if let Some(s) = stats.as_mut() {
                *s = st;
            }
            set_error("");
            n as i64
        }
        Ok(Err(msg)) => {
            set_error(&msg);
            -1
        }
        Err(_) => {
            set_error("internal error (panic) in tandem_generate");
            -1
        }
    }
}
