//! `out[m×n] = x[m×k] · w[n×k]ᵀ` with f32 activations and f16 weights, accumulating in f32.
//!
//! This is the shape of every linear layer in decode (m = 1) and speculative verification
//! (m = 2…9). Decode is bound by reading the weights, so each weight row is read from memory
//! once and dotted with all m activation rows while it sits in L1: verifying k+1 tokens then
//! costs little more than decoding one. candle's f16 matmul would convert the activations to
//! f16 (losing precision) and is not tuned for small m, hence this kernel.

use half::f16;

/// Plain reference: the definition the fast path is tested against.
pub fn matmul_f16_reference(x: &[f32], w: &[f16], m: usize, k: usize, n: usize, out: &mut [f32]) {
    assert_eq!(x.len(), m * k);
    assert_eq!(w.len(), n * k);
    assert_eq!(out.len(), m * n);
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f64;
            for p in 0..k {
                acc += x[i * k + p] as f64 * w[j * k + p].to_f64();
            }
            out[i * n + j] = acc as f32;
        }
    }
}

/// Weight rows handed to one pool task: enough work to amortize scheduling, few enough to
/// balance across cores.
const ROWS_PER_TASK: usize = 64;
/// One-row decode streams each weight once, nothing is reread from L2, and longer runs of
/// consecutive rows per task measured faster: SmolLM2 F16 tg128 85.5 against 82.9 tok/s (six
/// alternations, 2 threads; it changes only the 49k-row output head, the other matrices
/// already split into four tasks per thread, see `rows::par_row_tasks`).
const ROWS_PER_TASK_DECODE: usize = 1024;
/// Most activation rows per pass over a block of weight rows: the AVX2 kernel's register
/// budget (see `block_f16_avx2`).
const ROW_GROUP: usize = 6;
/// The AVX-512 kernel's: 32 registers take up to ten rows against two weight rows (see
/// `task_avx512`).
#[cfg(target_arch = "x86_64")]
const ROW_GROUP_AVX512: usize = 10;
/// The AVX-512 kernel's where a group's activations exceed [`L1_ACTIVATION_BYTES`]: its
/// groups of up to seven take three or four weight rows per block (see
/// [`TaskKernel::group_for`]).
#[cfg(target_arch = "x86_64")]
const ROW_GROUP_AVX512_L2: usize = 7;
/// Bytes of activation rows a group of the AVX-512 kernel's two-weight-row blocks may hold.
const L1_ACTIVATION_BYTES: usize = 32 * 1024;

/// Where the tasks write `out[i * n + j]`: each task owns a range of weight rows j, so the
/// writes of different tasks never meet, though they interleave in memory (writing in place
/// saves the [n × m] staging buffer and its transposition, ~1 M floats per verification pass
/// of SmolLM2).
#[derive(Clone, Copy)]
struct Out {
    ptr: crate::rows::SendPtr<f32>,
    n: usize,
}

impl Out {
    /// SAFETY: `i * n + j` lies inside `out`, and only the task owning row `j` writes it.
    #[inline(always)]
    unsafe fn set(self, i: usize, j: usize, v: f32) {
        *self.ptr.get().add(i * self.n + j) = v;
    }
}

/// Fast path: SIMD where the CPU has it, parallel over weight rows.
///
/// Panics if the slice lengths do not match `m`, `k`, `n` (a caller bug, never input data).
pub fn matmul_f16(x: &[f32], w: &[f16], m: usize, k: usize, n: usize, out: &mut [f32]) {
    assert_eq!(x.len(), m * k);
    assert_eq!(w.len(), n * k);
    assert_eq!(out.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    matmul_with(select_kernel(), x, w, m, k, n, out)
}

/// Activation rows from which [`matmul_f16_bulk`] takes AMX: fewer rows do not pay for
/// splitting every weight into its bf16 parts. SmolLM2 F16 prefill of N tokens (N − 1 such
/// rows), 2 threads, against `TANDEM_NO_AMX=1`: session 53's kernel 33 rows 0.70-0.84x the FMA
/// kernel's speed, 48 rows 0.92-0.97x, 64 rows 1.03-1.10x; session 54's (two weight tiles per
/// load, prefetched splits), three alternations: 17 tokens 0.84-0.95x, 20 tokens 0.85-0.94x,
/// 24 tokens 0.96-1.06x, 28 tokens 1.00-1.11x, 33 tokens 1.25-1.32x, 48 tokens 1.33-1.51x.
const BULK_MIN_ROWS: usize = 32;

/// Whether a pass of `m` bulk rows is long enough for [`matmul_f16_bulk`] to take AMX (where
/// the CPU and the shape allow it): the row count alone, which a caller batching several
/// prompts checks per prompt, so that each prompt's rows take the kernel they take alone.
pub fn bulk_rows_suffice(m: usize) -> bool {
    m >= BULK_MIN_ROWS
}

/// [`matmul_f16`] for activation rows whose results may differ from its in the last bits: a
/// prompt's rows before its last, which only fill the KV cache (the model decides which, see
/// `tandem_model`'s forward pass). Where the CPU has AMX, a pass of at least 32 such rows
/// runs on the tile unit, to f32 rounding of `matmul_f16` (see `amx.rs`); elsewhere, and for
/// shapes that do not tile, it is `matmul_f16`.
///
/// Panics if the slice lengths do not match `m`, `k`, `n` (a caller bug, never input data).
pub fn matmul_f16_bulk(x: &[f32], w: &[f16], m: usize, k: usize, n: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if f16_bulk_applies(m, k, n) {
        return crate::amx::matmul_f16(x, w, m, k, n, out);
    }
    matmul_f16(x, w, m, k, n, out)
}

/// [`matmul_f16_bulk`] of weights that several layers fed by one input lie in one after
/// another (q/k/v, gate/up): `outs[i]` [m × widths[i]] gets the columns of the weight rows
/// after those of the parts before it. One matmul (the activations split into bf16 parts once
/// for all of them), each output's value the same as the part's own `matmul_f16_bulk`'s.
///
/// Panics if the slice lengths do not match (a caller bug, never input data).
pub fn matmul_f16_bulk_parts(
    x: &[f32],
    w: &[f16],
    m: usize,
    k: usize,
    widths: &[usize],
    outs: &mut [&mut [f32]],
) {
    #[cfg(target_arch = "x86_64")]
    if widths.iter().all(|&d| f16_bulk_applies(m, k, d)) {
        return crate::amx::matmul_f16_parts(x, w, m, k, widths, outs);
    }
    assert_eq!(widths.len(), outs.len());
    let mut row = 0;
    for (&d, out) in widths.iter().zip(outs.iter_mut()) {
        matmul_f16_bulk(x, &w[row * k..(row + d) * k], m, k, d, out);
        row += d;
    }
}

/// Whether [`matmul_f16_bulk`] of `m` rows of this shape differs from [`matmul_f16`] (runs on
/// AMX): a caller whose rows are only partly bulk splits them only then.
pub fn f16_bulk_applies(m: usize, k: usize, n: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        bulk_rows_suffice(m) && crate::amx::fits(k, n) && crate::amx::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (m, k, n, BULK_MIN_ROWS);
        false
    }
}

/// [`matmul_f16`] with a given task kernel (the tests run every one the CPU has).
fn matmul_with(
    kernel: TaskKernel,
    x: &[f32],
    w: &[f16],
    m: usize,
    k: usize,
    n: usize,
    out: &mut [f32],
) {
    let dst = Out {
        ptr: crate::rows::SendPtr(out.as_mut_ptr()),
        n,
    };
    // A pass that takes all its activation rows in one group (decode, and a verification of
    // up to 9 drafted tokens with AVX-512, 6 at rows as long as SmolLM2's down projection: see
    // `TaskKernel::group_for`) reads each weight once, and streams: long runs of
    // rows, one run per thread even for the small projections (SmolLM2's 192-row k/v were
    // 24-row tasks), so each thread reads one contiguous stretch of every matrix, which its
    // prefetches and the hardware's follow. SmolLM2 F16, 2 threads: `bench --verify 4` (four
    // alternations) 79.1 against 68.6 passes/s with 1024-row runs (1.17x the 1-row pass
    // instead of 1.37x), verify2 96-97 against 87-88; tg128 with one run per thread 96.6
    // against 91.9 tok/s on average over six alternations (the int8 tiles do the same, see
    // `Int8Tiles::run`). Passes of 5-10 rows streamed too since session 19 (they had
    // 64-row tasks, four per thread): `bench --verify 5`, three alternations, 72-84 against
    // 59-64 passes/s (1.23-1.56x the 1-row pass instead of 1.64-1.83x), verify8 53-55 against
    // 46-53; the `stream` example, two alternations, m = 5 12.0-12.2 against 14.3-14.4 ms
    // and m = 8 17.4-18.4 against 20.0-20.4 (an earlier measurement had long runs slower at 8
    // rows, 42-50 against 49-53 passes/s, with the pool's tasks spread four per thread). More rows
    // reread a task's weights once per group, so 64-row tasks keep them in L2. While another
    // process takes the cores (the pool saw a stall lately) streaming passes keep four tasks
    // per thread, so the caller can take over a descheduled worker's share: beside a busy
    // neighbour, one run per thread measured 64.6 against 67.9 tok/s, and with this switch
    // 68.7 (one thread: 66.6).
    let max_group = kernel.group_for(k);
    let streaming = m <= max_group;
    let rows_per_task = if streaming {
        ROWS_PER_TASK_DECODE
    } else {
        ROWS_PER_TASK
    };
    let per_thread = crate::rows::tasks_per_thread(streaming);
    crate::rows::par_row_tasks(n, rows_per_task, per_thread, |j0, j1| {
        // Activation groups outside, weight rows inside: a group's rows stay in L1 while the
        // task's weight rows (tens of KB) pass through L2 (see `rows::par_weight_rows`).
        for (i0, g) in crate::rows::row_groups(m, max_group) {
            let job = Job {
                w: &w[j0 * k..j1 * k],
                x: &x[i0 * k..(i0 + g) * k],
                k,
                g,
            };
            // SAFETY: rows i0..i0+g and j0..j1 are inside `out`, and j0..j1 is this task's.
            unsafe { (kernel.run)(&job, i0, j0, dst) }
        }
    });
}

/// One task's share: `w` holds its weight rows, `x` one group of `g` activation rows.
struct Job<'a> {
    w: &'a [f16],
    x: &'a [f32],
    k: usize,
    g: usize,
}

/// A task kernel and the most activation rows it takes in one pass (`job.g`).
#[derive(Clone, Copy)]
struct TaskKernel {
    /// Writes `out[(i0 + r) * n + j0 + jj]` for every activation row r and weight row jj of
    /// `job`.
    run: unsafe fn(&Job, usize, usize, Out),
    max_group: usize,
    /// The most rows whose activations may go past L1 (see [`TaskKernel::group_for`]).
    max_group_l2: usize,
}

impl TaskKernel {
    /// The most activation rows per group at row length `k`: `max_group_l2` where a full
    /// group of `max_group` rows this long would overflow L1 (decided on the largest group,
    /// not on a pass's own row count). The AVX-512 kernel's groups of 8-10 rows take two
    /// weight rows per block, so each activation load feeds two FMAs: it needs those rows in
    /// L1 (32 KB on the CPUs measured). SmolLM2's down projection (k =
    /// 1536) has 48 KB in 8 rows, and a 1-row decode's 1.0-1.2 ms of down projections took
    /// 3.2-3.6 ms at 8 rows against 2.1-2.3 at 7 (three weight rows per block); as two groups
    /// of four, 2.6-3.0 (the `stream` example, `ONLY_K=1536`, 2 threads, four alternations
    /// each). SmolLM2 F16, 2 threads, three alternations: `bench --verify 8 --context 128`
    /// 54.5-58.6 -> 59.9-65.2 passes/s, pp512 659-666 -> 692-701 tok/s (and once 605 ± 61).
    fn group_for(&self, k: usize) -> usize {
        if self.max_group * k * 4 > L1_ACTIVATION_BYTES {
            self.max_group_l2
        } else {
            self.max_group
        }
    }
}

const SCALAR: TaskKernel = TaskKernel {
    run: task_scalar,
    max_group: ROW_GROUP,
    max_group_l2: ROW_GROUP,
};
#[cfg(target_arch = "x86_64")]
const AVX2: TaskKernel = TaskKernel {
    run: task_avx2_entry,
    max_group: ROW_GROUP,
    max_group_l2: ROW_GROUP,
};
#[cfg(target_arch = "x86_64")]
const AVX512: TaskKernel = TaskKernel {
    run: task_avx512_entry,
    max_group: ROW_GROUP_AVX512,
    max_group_l2: ROW_GROUP_AVX512_L2,
};

fn select_kernel() -> TaskKernel {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::has_avx512() {
            return AVX512;
        }
        if crate::has_avx2_fma() {
            return AVX2;
        }
    }
    SCALAR
}

/// Each dot product sums its k products in order (as the AVX2 path's lanes do per lane), so a
/// row's result does not depend on the rows computed with it.
unsafe fn task_scalar(job: &Job, i0: usize, j0: usize, out: Out) {
    let k = job.k;
    for (jj, wr) in job.w.chunks_exact(k).enumerate() {
        for r in 0..job.g {
            let xr = &job.x[r * k..(r + 1) * k];
            out.set(
                i0 + r,
                j0 + jj,
                wr.iter().zip(xr).map(|(a, b)| a.to_f32() * b).sum(),
            );
        }
    }
}

#[cfg(target_arch = "x86_64")]
unsafe fn task_avx2_entry(job: &Job, i0: usize, j0: usize, out: Out) {
    // SAFETY: only selected after runtime detection of avx2, fma and f16c.
    unsafe { task_avx2(job, i0, j0, out) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn task_avx2(job: &Job, i0: usize, j0: usize, out: Out) {
    // Weight rows per block for each group size: R·G accumulators + R weight vectors + one
    // activation vector fit the 16 vector registers, and each activation load feeds R FMAs.
    // (Single-thread, L2-resident 128×576: G = 5 went from 48% to 54-62% of peak FMA rate with
    // R = 2 over one row at a time; G = 1 with R = 4 from 25% to 32%.)
    match job.g {
        1 => blocks_f16_avx2::<4, 1>(job, i0, j0, out),
        2 => blocks_f16_avx2::<4, 2>(job, i0, j0, out),
        3 => blocks_f16_avx2::<3, 3>(job, i0, j0, out),
        4 => blocks_f16_avx2::<3, 4>(job, i0, j0, out),
        5 => blocks_f16_avx2::<2, 5>(job, i0, j0, out),
        _ => blocks_f16_avx2::<2, 6>(job, i0, j0, out),
    }
}

/// A task's weight rows in blocks of `R` (the remainder one at a time) against `G` activation
/// rows, through a block kernel: written once for every instruction set, each expansion
/// compiled with its set's target features so the block kernel inlines into it (calling it
/// through a function pointer instead lost the AVX-512 path's gain, measured).
macro_rules! blocks_fn {
    ($name:ident, $features:literal, $block:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name<const R: usize, const G: usize>(job: &Job, i0: usize, j0: usize, out: Out) {
            let k = job.k;
            let rows = job.w.len() / k;
            let mut jj = 0;
            while jj + R <= rows {
                $block::<R, G>(job, jj, i0, j0, out);
                jj += R;
            }
            while jj < rows {
                $block::<1, G>(job, jj, i0, j0, out);
                jj += 1;
            }
        }
    };
}

blocks_fn!(blocks_f16_avx2, "avx2,fma,f16c", block_f16_avx2);
blocks_fn!(blocks_f16_avx512, "avx512f,avx2,fma,f16c", block_f16_avx512);
blocks_fn!(
    blocks_f16_lanes16_avx2,
    "avx2,fma,f16c",
    block_f16_lanes16_avx2
);

/// How far ahead [`prefetch_rows_ahead`] asks, in blocks of rows.
#[cfg(target_arch = "x86_64")]
const PREFETCH_BLOCKS_AHEAD: usize = 2;

/// Asks for the weights a block kernel reads `PREFETCH_BLOCKS_AHEAD` blocks of `R` rows from now, at column
/// `p` of its current block: R lines per 32 columns, so the blocks ahead arrive as one
/// sequential stream (one prefetch stream per row, R streams ~1 KB ahead each, measured
/// slower at R = 4). Decode streams its weights from DRAM, and prefetching measured 15-20%
/// faster than leaving it to the hardware.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch_rows_ahead<const R: usize>(wp: *const u16, k: usize, p: usize) {
    use std::arch::x86_64::*;
    // Prefetching never faults, so addresses past the matrix are harmless.
    let next = wp.wrapping_add(PREFETCH_BLOCKS_AHEAD * R * k + p * R);
    for q in 0..R {
        _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(q * 32) as *const i8);
    }
}

/// Weight rows `jj..jj + R` of the task against its `G` activation rows: one 8-lane
/// accumulator per (weight row, activation row), fed 8 columns at a time in order, then
/// summed across lanes by `hsum256` and the tail added last. Every (R, G) sums each dot
/// product in exactly this order, so a row's result never depends on how many rows came with
/// it: prefill, decode, verification and batching give identical logits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn block_f16_avx2<const R: usize, const G: usize>(
    job: &Job,
    jj: usize,
    i0: usize,
    j0: usize,
    out: Out,
) {
    use std::arch::x86_64::*;
    let k = job.k;
    let (k8, k32) = (k / 8 * 8, k / 32 * 32);
    let wp = job.w.as_ptr().add(jj * k) as *const u16;
    let xp = job.x.as_ptr();
    let mut acc = [[_mm256_setzero_ps(); G]; R];
    let step = |p: usize, acc: &mut [[__m256; G]; R]| {
        let mut wv = [_mm256_setzero_ps(); R];
        for (q, v) in wv.iter_mut().enumerate() {
            *v = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(q * k + p) as *const __m128i));
        }
        for r in 0..G {
            let xv = _mm256_loadu_ps(xp.add(r * k + p));
            for (a, w) in acc.iter_mut().zip(&wv) {
                a[r] = _mm256_fmadd_ps(*w, xv, a[r]);
            }
        }
    };
    let mut p = 0;
    while p < k32 {
        prefetch_rows_ahead::<R>(wp, k, p);
        for s in 0..4 {
            step(p + 8 * s, &mut acc);
        }
        p += 32;
    }
    while p < k8 {
        step(p, &mut acc);
        p += 8;
    }
    for (q, accq) in acc.iter().enumerate() {
        let wr = &job.w[(jj + q) * k..(jj + q + 1) * k];
        for (r, a) in accq.iter().enumerate() {
            let mut v = crate::hsum256(*a);
            for (w, x) in wr[k8..].iter().zip(&job.x[r * k + k8..(r + 1) * k]) {
                v += w.to_f32() * x;
            }
            out.set(i0 + r, j0 + jj + q, v);
        }
    }
}

#[cfg(target_arch = "x86_64")]
unsafe fn task_avx512_entry(job: &Job, i0: usize, j0: usize, out: Out) {
    // SAFETY: only selected after runtime detection of avx512f (and avx2, fma, f16c).
    unsafe { task_avx512(job, i0, j0, out) }
}

/// The AVX-512 path: 16 lanes and 32 registers, so three or four weight rows per block
/// against up to seven activation rows and two against eight to ten (the AVX2 blocks take two
/// for five or six). Verification passes of 7-10 rows go in one pass over the weights instead
/// of two: SmolLM2's gate/up shapes (30 layers, 2 threads, best of 15 alternations) m = 8
/// 10.2 -> 8.3 ms (1.7x -> 1.4x the 1-row pass), m = 10 11.2 -> 9.8 ms; G = 12 with R = 2
/// (24 accumulators) spilled (m = 12: 17.8 ms against 12.2 as two sixes). Measured on
/// a 2-core Zen 4 (which runs 512-bit operations as two 256-bit halves): SmolLM2 F16 pp512
/// 475-520 -> 580-590 tok/s with R = 3 at G = 5-6; R = 4 there (24 accumulators) ran at 300,
/// its registers spilled. One-row decode (bandwidth-bound) measured 4-10% slower than AVX2 in
/// 512-bit registers (tg128 76.5 vs 79.4 and 69 vs 78 tok/s in two sets of alternations; R = 2
/// or 8 at G = 1 no better), so G = 1 runs the same 16-lane arithmetic in 256-bit registers
/// ([`block_f16_lanes16_avx2`]: 85.4 vs 82.3 tok/s over eight alternations, on a machine whose
/// runs vary ±5%; copying the weights onto transparent huge pages was also tried and made no
/// difference over eight more: 82.4 vs 82.4). The sums must be
/// the same for every shape, so that decode, verification and prefill sum each dot product in
/// one order (greedy speculation stays identical to plain decoding).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn task_avx512(job: &Job, i0: usize, j0: usize, out: Out) {
    match job.g {
        // One-row decode: the same arithmetic in 256-bit registers (bit-identical).
        1 => blocks_f16_lanes16_avx2::<4, 1>(job, i0, j0, out),
        2 => blocks_f16_avx512::<4, 2>(job, i0, j0, out),
        3 => blocks_f16_avx512::<4, 3>(job, i0, j0, out),
        4 => blocks_f16_avx512::<4, 4>(job, i0, j0, out),
        5 => blocks_f16_avx512::<3, 5>(job, i0, j0, out),
        6 => blocks_f16_avx512::<3, 6>(job, i0, j0, out),
        7 => blocks_f16_avx512::<3, 7>(job, i0, j0, out),
        8 => blocks_f16_avx512::<2, 8>(job, i0, j0, out),
        9 => blocks_f16_avx512::<2, 9>(job, i0, j0, out),
        _ => blocks_f16_avx512::<2, 10>(job, i0, j0, out),
    }
}

/// As [`block_f16_avx2`] with 16-lane accumulators: columns 16 at a time in order, the lanes
/// summed by a fixed tree (upper 256 bits onto the lower, then `hsum256`), the tail last.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[inline]
unsafe fn block_f16_avx512<const R: usize, const G: usize>(
    job: &Job,
    jj: usize,
    i0: usize,
    j0: usize,
    out: Out,
) {
    use std::arch::x86_64::*;
    let k = job.k;
    let (k16, k32) = (k / 16 * 16, k / 32 * 32);
    let wp = job.w.as_ptr().add(jj * k) as *const u16;
    let xp = job.x.as_ptr();
    let mut acc = [[_mm512_setzero_ps(); G]; R];
    let step = |p: usize, acc: &mut [[__m512; G]; R]| {
        let mut wv = [_mm512_setzero_ps(); R];
        for (q, v) in wv.iter_mut().enumerate() {
            *v = _mm512_cvtph_ps(_mm256_loadu_si256(wp.add(q * k + p) as *const __m256i));
        }
        for r in 0..G {
            let xv = _mm512_loadu_ps(xp.add(r * k + p));
            for (a, w) in acc.iter_mut().zip(&wv) {
                a[r] = _mm512_fmadd_ps(*w, xv, a[r]);
            }
        }
    };
    let mut p = 0;
    while p < k32 {
        prefetch_rows_ahead::<R>(wp, k, p);
        step(p, &mut acc);
        step(p + 16, &mut acc);
        p += 32;
    }
    while p < k16 {
        step(p, &mut acc);
        p += 16;
    }
    for (q, accq) in acc.iter().enumerate() {
        let wr = &job.w[(jj + q) * k..(jj + q + 1) * k];
        for (r, a) in accq.iter().enumerate() {
            let half = _mm256_add_ps(
                _mm512_castps512_ps256(*a),
                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(*a))),
            );
            let mut v = crate::hsum256(half);
            for (w, x) in wr[k16..].iter().zip(&job.x[r * k + k16..(r + 1) * k]) {
                v += w.to_f32() * x;
            }
            out.set(i0 + r, j0 + jj + q, v);
        }
    }
}

/// [`block_f16_avx512`]'s arithmetic in 256-bit registers: each 16-lane accumulator held as two
/// 8-lane halves (lanes 0–7 and 8–15), fed the same products in the same order, then summed by
/// the same tree (the upper half onto the lower, then `hsum256`), so every result is bit for
/// bit the AVX-512 kernel's (tested) and decode, verification and prefill still agree. Used for
/// one-row decode, which is bandwidth-bound and ran 4-10% slower in 512-bit registers on the
/// 2-core Zen 4 these kernels were measured on.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn block_f16_lanes16_avx2<const R: usize, const G: usize>(
    job: &Job,
    jj: usize,
    i0: usize,
    j0: usize,
    out: Out,
) {
    use std::arch::x86_64::*;
    let k = job.k;
    let (k16, k32) = (k / 16 * 16, k / 32 * 32);
    let wp = job.w.as_ptr().add(jj * k) as *const u16;
    let xp = job.x.as_ptr();
    let mut lo = [[_mm256_setzero_ps(); G]; R];
    let mut hi = [[_mm256_setzero_ps(); G]; R];
    let step = |p: usize, lo: &mut [[__m256; G]; R], hi: &mut [[__m256; G]; R]| {
        let mut wl = [_mm256_setzero_ps(); R];
        let mut wh = [_mm256_setzero_ps(); R];
        for q in 0..R {
            wl[q] = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(q * k + p) as *const __m128i));
            wh[q] = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(q * k + p + 8) as *const __m128i));
        }
        for r in 0..G {
            let xl = _mm256_loadu_ps(xp.add(r * k + p));
            let xh = _mm256_loadu_ps(xp.add(r * k + p + 8));
            for q in 0..R {
                lo[q][r] = _mm256_fmadd_ps(wl[q], xl, lo[q][r]);
                hi[q][r] = _mm256_fmadd_ps(wh[q], xh, hi[q][r]);
            }
        }
    };
    let mut p = 0;
    while p < k32 {
        prefetch_rows_ahead::<R>(wp, k, p);
        step(p, &mut lo, &mut hi);
        step(p + 16, &mut lo, &mut hi);
        p += 32;
    }
    while p < k16 {
        step(p, &mut lo, &mut hi);
        p += 16;
    }
    for q in 0..R {
        let wr = &job.w[(jj + q) * k..(jj + q + 1) * k];
        for r in 0..G {
            let mut v = crate::hsum256(_mm256_add_ps(lo[q][r], hi[q][r]));
            for (w, x) in wr[k16..].iter().zip(&job.x[r * k + k16..(r + 1) * k]) {
                v += w.to_f32() * x;
            }
            out.set(i0 + r, j0 + jj + q, v);
        }
    }
}

/// Random test operands: `m × k` activations uniform in ±`x_bound`, then `n × k` f16 weights
/// uniform in ±`w_bound` (drawn in that order from `rng`).
#[cfg(test)]
pub(crate) fn random_operands(
    rng: &mut impl rand::Rng,
    (m, k, n): (usize, usize, usize),
    x_bound: f32,
    w_bound: f32,
) -> (Vec<f32>, Vec<f16>) {
    let x = (0..m * k)
        .map(|_| rng.random_range(-x_bound..x_bound))
        .collect();
    let w = (0..n * k)
        .map(|_| f16::from_f32(rng.random_range(-w_bound..w_bound)))
        .collect();
    (x, w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// One-row decode through 256-bit registers gives the AVX-512 kernel's bits exactly.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn sixteen_lanes_on_avx2_equal_the_avx512_kernel_bit_for_bit() {
        if !crate::has_avx512() {
            return;
        }
        unsafe fn lanes16(job: &Job, i0: usize, j0: usize, out: Out) {
            // SAFETY: the test runs only where AVX-512 (and so AVX2/FMA/F16C) is present.
            unsafe { blocks_f16_lanes16_avx2::<4, 1>(job, i0, j0, out) }
        }
        unsafe fn wide(job: &Job, i0: usize, j0: usize, out: Out) {
            // SAFETY: as above.
            unsafe { blocks_f16_avx512::<4, 1>(job, i0, j0, out) }
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for (k, n) in [(576, 64), (1536, 37), (50, 9), (16, 5), (7, 3)] {
            let (x, w) = super::random_operands(&mut rng, (1, k, n), 1.0, 1.0);
            let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
            let kernel = |run| TaskKernel {
                run,
                max_group: 1,
                max_group_l2: 1,
            };
            matmul_with(kernel(lanes16), &x, &w, 1, k, n, &mut a);
            matmul_with(kernel(wide), &x, &w, 1, k, n, &mut b);
            assert_eq!(
                a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "k={k} n={n}"
            );
        }
    }

    /// Every task kernel this CPU can run.
    fn kernels() -> Vec<TaskKernel> {
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut v: Vec<TaskKernel> = vec![SCALAR];
        #[cfg(target_arch = "x86_64")]
        {
            if crate::has_avx2_fma() {
                v.push(AVX2);
            }
            if crate::has_avx512() {
                v.push(AVX512);
            }
        }
        v
    }

    fn check(m: usize, k: usize, n: usize, seed: u64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (x, w) = super::random_operands(&mut rng, (m, k, n), 1.0, 1.0);
        let mut a = vec![0f32; m * n];
        matmul_f16_reference(&x, &w, m, k, n, &mut a);
        for (ki, kernel) in kernels().into_iter().enumerate() {
            let mut b = vec![0f32; m * n];
            matmul_with(kernel, &x, &w, m, k, n, &mut b);
            for (i, (p, q)) in a.iter().zip(&b).enumerate() {
                let tol = 1e-4 * (k as f32).sqrt().max(1.0);
                assert!(
                    (p - q).abs() <= tol,
                    "kernel {ki} m={m} k={k} n={n} idx {i}: {p} vs {q}"
                );
            }
        }
    }

    #[test]
    fn fast_matches_reference_on_odd_shapes() {
        let mut seed = 0;
        for m in [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13, 16] {
            for k in [1, 7, 8, 16, 17, 40, 64, 172, 576] {
                for n in [1, 3, 65, 130] {
                    seed += 1;
                    check(m, k, n, seed);
                }
            }
        }
    }

    /// A row's result is bit-identical whatever rows come with it (see `block_f16_avx2`), on
    /// every kernel.
    #[test]
    fn rows_do_not_depend_on_the_batch() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(99);
        // More rows than one group, cut into groups of 5-10 rows; one group of 8 and of 3
        // (a verification pass); k with and without a tail past the last 16 columns; rows too
        // long for groups of 8-10 in L1 (`TaskKernel::group_for`: 8 and 10 rows as two groups).
        for (m, k, n) in [
            (20, 584, 67),
            (11, 576, 19),
            (23, 40, 9),
            (8, 584, 67),
            (3, 576, 19),
            (8, 1544, 37),
            (10, 1536, 19),
        ] {
            let (x, w) = super::random_operands(&mut rng, (m, k, n), 1.0, 1.0);
            for (ki, kernel) in kernels().into_iter().enumerate() {
                let mut all = vec![0f32; m * n];
                matmul_with(kernel, &x, &w, m, k, n, &mut all);
                for i in 0..m {
                    let mut one = vec![0f32; n];
                    matmul_with(kernel, &x[i * k..(i + 1) * k], &w, 1, k, n, &mut one);
                    assert_eq!(one, all[i * n..(i + 1) * n], "kernel {ki} m={m} row {i}");
                }
            }
        }
    }

    #[test]
    fn empty_is_a_no_op() {
        let mut out = vec![];
        matmul_f16(&[], &[], 0, 4, 0, &mut out);
        assert!(out.is_empty());
    }
}
