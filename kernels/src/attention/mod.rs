//! Causal grouped-query attention over a KV cache, one query row at a time.
//!
//! Each (query position, head) is computed by the same code in the same summation order
//! whatever the chunk it arrives in, so prefill, one-token decode and k-token verification
//! give identical results (candle's batched matmuls block differently per shape, which moved
//! SmolLM2's logits by ~6e-4 between chunkings). It also needs no mask tensor and no copy of
//! the keys per query head.

mod f16_grouped;
mod f32_rows;

use f16_grouped::*;
use f32_rows::*;

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    /// New query positions in this call.
    pub t: usize,
    /// Positions already in the cache before this call (the new keys are at n..n+t).
    pub n: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    /// Positions the cache buffers are laid out for: k/v are [n_kv_head, capacity, head_dim].
    pub capacity: usize,
}

impl AttentionShape {
    fn check<E>(&self, q: &[f32], k: &[E], v: &[E], out: &[f32]) {
        let s = self;
        assert!(s.n_kv_head > 0 && s.n_head.is_multiple_of(s.n_kv_head));
        assert!(s.n + s.t <= s.capacity);
        assert_eq!(q.len(), s.t * s.n_head * s.head_dim);
        assert_eq!(out.len(), q.len());
        assert!(k.len() >= s.n_kv_head * s.capacity * s.head_dim);
        assert!(v.len() >= s.n_kv_head * s.capacity * s.head_dim);
    }
}

/// What a KV cache holds per element: f32, or f16 (llama.cpp's default cache type: half the
/// bytes a decoding step reads from a long context, which is what a one-token step's attention
/// is bound by). The kernels compute in f32 either way: a unit widens each block of an f16
/// cache once for all its queries, so a query's result is bit for bit what the f32 kernel
/// gives on the widened cache.
pub trait KvElement: Copy + Default + Send + Sync + 'static {
    /// `src` rounded into `dst` (the same length): how new keys and values enter a cache.
    fn store(src: &[f32], dst: &mut [Self]);
    /// `src` widened into `dst` (the same length).
    fn load(src: &[Self], dst: &mut [f32]);
    /// `src` as f32: itself where it already is, else widened into `scratch`. `simd`: the
    /// x86 AVX2/F16C path may run (the caller checked [`simd_available`]).
    #[inline(always)]
    fn widen<'a>(_simd: bool, src: &'a [Self], scratch: &'a mut Vec<f32>) -> &'a [f32] {
        let dst = grown(scratch, src.len());
        Self::load(src, dst);
        dst
    }
    /// `src` as f16 values when that is what it holds (an f16 cache, which the grouped
    /// kernels read without widening it first).
    #[inline(always)]
    fn as_f16(_src: &[Self]) -> Option<&[half::f16]> {
        None
    }
}

impl KvElement for f32 {
    fn store(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn load(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    #[inline(always)]
    fn widen<'a>(_simd: bool, src: &'a [f32], _scratch: &'a mut Vec<f32>) -> &'a [f32] {
        src
    }
}

impl KvElement for half::f16 {
    fn store(src: &[f32], dst: &mut [half::f16]) {
        use half::slice::HalfFloatSliceExt;
        // Round to nearest even, as F16C's conversion and llama.cpp's cache writes do.
        dst.convert_from_f32_slice(src);
    }
    fn load(src: &[half::f16], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f32_slice(dst);
    }
    #[inline(always)]
    fn widen<'a>(simd: bool, src: &'a [half::f16], scratch: &'a mut Vec<f32>) -> &'a [f32] {
        let dst = grown(scratch, src.len());
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: the CPU has AVX2 and F16C (what `simd` says); both slices hold
            // `src.len()` elements.
            unsafe { widen_f16_f16c(src, dst) };
            return dst;
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = simd;
        Self::load(src, dst);
        dst
    }
    #[inline(always)]
    fn as_f16(src: &[half::f16]) -> Option<&[half::f16]> {
        Some(src)
    }
}

/// The first `len` elements of a scratch buffer kept from call to call, grown (zeroed) only
/// when it is shorter: every caller overwrites them before reading. Zeroing each block before
/// widening it into the buffer was an eighth of a short-context verification pass's attention
/// time (a memset per 32 keys).
#[inline(always)]
fn grown(scratch: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if scratch.len() < len {
        scratch.resize(len, 0.0);
    }
    &mut scratch[..len]
}

/// f16 to f32, eight at a time with F16C (exact: every f16 is an f32). Written here rather
/// than taken from `half`, whose slice conversion calls a non-inlined function per eight
/// values: a unit widens two blocks of 2,048 values per 32 keys, in the hottest loop of a
/// long-context decoding step.
///
/// # Safety
/// The CPU has AVX2 and F16C; `dst.len() == src.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn widen_f16_f16c(src: &[half::f16], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    debug_assert_eq!(src.len(), dst.len());
    let n = src.len();
    let (sp, dp) = (src.as_ptr() as *const u16, dst.as_mut_ptr());
    let mut i = 0;
    while i + 8 <= n {
        if i % 32 == 0 {
            // The next block of this KV head's keys or values sits right after this one: ask
            // for it now, one cache line per 32 values (a prefetch never faults past the end).
            _mm_prefetch::<_MM_HINT_T0>(sp.wrapping_add(i + n) as *const i8);
        }
        let h = _mm_loadu_si128(sp.add(i) as *const __m128i);
        _mm256_storeu_ps(dp.add(i), _mm256_cvtph_ps(h));
        i += 8;
    }
    for j in i..n {
        dst[j] = src[j].to_f32();
    }
}

/// Plain reference: softmax(q·kᵀ/√d + causal mask)·v in f64.
/// `q` and `out` are [t, n_head, head_dim]; query i sits at position n+i and sees keys 0..=n+i.
pub fn attention_reference(s: AttentionShape, q: &[f32], k: &[f32], v: &[f32], out: &mut [f32]) {
    let causal: Vec<Vec<u32>> = (0..s.t as u32).map(|i| (0..=i).collect()).collect();
    attention_tree_reference(s, q, k, v, out, &causal)
}

/// Plain reference for a token tree: query i sees the cached keys 0..n and the new rows
/// `paths[i]` (its ancestors in the tree and itself, as indices into the t new rows at
/// n..n+t), in that order; f64.
pub fn attention_tree_reference(
    s: AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    paths: &[Vec<u32>],
) {
    s.check(q, k, v, out);
    check_paths(s, paths);
    let d = s.head_dim;
    let group = s.n_head / s.n_kv_head;
    let scale = 1.0 / (d as f64).sqrt();
    for i in 0..s.t {
        for h in 0..s.n_head {
            let kv = h / group;
            let qr = &q[(i * s.n_head + h) * d..][..d];
            let rows: Vec<usize> = (0..s.n)
                .chain(paths[i].iter().map(|&m| s.n + m as usize))
                .collect();
            let scores: Vec<f64> = rows
                .iter()
                .map(|&j| {
                    let kr = &k[(kv * s.capacity + j) * d..][..d];
                    qr.iter()
                        .zip(kr)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::MIN, f64::max);
            let w: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
            let z: f64 = w.iter().sum();
            let o = &mut out[(i * s.n_head + h) * d..][..d];
            for (c, oc) in o.iter_mut().enumerate() {
                *oc = (rows
                    .iter()
                    .zip(&w)
                    .map(|(&j, w)| w * v[(kv * s.capacity + j) * d + c] as f64)
                    .sum::<f64>()
                    / z) as f32;
            }
        }
    }
}

/// Panics unless every `paths[i]` lists rows before i, ascending, and ends at i itself.
fn check_paths(s: AttentionShape, paths: &[Vec<u32>]) {
    assert_eq!(paths.len(), s.t, "one path per new row");
    for (i, p) in paths.iter().enumerate() {
        assert_eq!(
            p.last().copied(),
            Some(i as u32),
            "row {i}'s path ends at itself"
        );
        assert!(p.windows(2).all(|w| w[0] < w[1]), "row {i}'s path ascends");
    }
}

/// Most queries (a pass's rows × the query heads of one KV head) one task unit takes through
/// the keys and values together: their vectors (6 KB at head_dim 64) and one key block stay
/// in L1 beside each other.
const QUERIES_PER_UNIT: usize = 24;

/// Fast path: f32 with fixed-lane accumulation, parallel over units of queries that share a
/// KV head (rows of the pass × the query heads of its group). A unit reads each key and value
/// row once for all its queries, block by block, instead of once per row and head (a
/// verification pass's rows all see the cache's long prefix). Each query's arithmetic, and so
/// its result, is the same whichever unit it is in.
pub fn attention<E: KvElement>(s: AttentionShape, q: &[f32], k: &[E], v: &[E], out: &mut [f32]) {
    s.check(q, k, v, out);
    let per_unit = queries_per_unit(s);
    attention_units(s, q, k, v, out, per_unit, segment_split(s, per_unit), None)
}

/// [`attention`] where the pass's first `bulk` rows are a prompt's rows whose results only
/// fill the KV cache (see [`crate::matmul_f16_bulk`]): with an f16 cache, on a CPU with AMX,
/// for 64 or more such rows that see 128 or more keys, they run on the tile unit
/// (`amx/attention.rs`: f32 rounding of this kernel's arithmetic, not its bits; a row's
/// result does not depend on the others). The rows after them are [`attention`]'s bit for
/// bit, whichever way the first ran.
pub fn attention_bulk<E: KvElement>(
    s: AttentionShape,
    bulk: usize,
    q: &[f32],
    k: &[E],
    v: &[E],
    out: &mut [f32],
) {
    s.check(q, k, v, out);
    // Off x86 there is no tile unit: every row takes the FMA kernels.
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bulk;
    #[cfg(target_arch = "x86_64")]
    let bulk = bulk.min(s.t);
    #[cfg(target_arch = "x86_64")]
    if bulk >= BULK_MIN_ROWS && s.n + bulk >= BULK_MIN_KEYS && crate::amx::attention::fits(&s, bulk)
    {
        if let (Some(kh), Some(vh)) = (E::as_f16(k), E::as_f16(v)) {
            crate::amx::attention::attention_f16(s, bulk, q, kh, vh, out);
            if bulk < s.t {
                // The later rows as a pass of their own after the first's keys: each query's
                // arithmetic is the same whatever pass it is in.
                let rest = AttentionShape {
                    t: s.t - bulk,
                    n: s.n + bulk,
                    ..s
                };
                let at = bulk * s.n_head * s.head_dim;
                attention(rest, &q[at..], k, v, &mut out[at..]);
            }
            return;
        }
    }
    attention(s, q, k, v, out)
}

/// Prompt rows from which [`attention_bulk`] takes AMX (as `matmul_f16_bulk` does), and the
/// keys the last of them must see: less work does not pay for splitting the keys, values and
/// probabilities into bf16 parts (SmolLM2 prefill, 2 threads, two alternations against the
/// FMA kernel: 65 and 100 tokens 0.97-1.01x, 200 tokens 1.02-1.04x, 512 1.05-1.09x, 2,048
/// 1.40-1.43x).
#[cfg(target_arch = "x86_64")]
const BULK_MIN_ROWS: usize = 64;
#[cfg(target_arch = "x86_64")]
const BULK_MIN_KEYS: usize = 128;

/// Attention over a token tree (a speculative draft with several candidates per position):
/// query i sees the cached keys 0..n, then the new rows `paths[i]` (its ancestors and itself,
/// ascending indices into the t new rows). Row i's keys are visited in that order, so its
/// result is bit for bit what [`attention`] gives when the same path sits contiguously after
/// the cache (a tree's accepted path equals plain decoding's). The masked-out rows are never
/// read, not multiplied by zero.
pub fn attention_tree<E: KvElement>(
    s: AttentionShape,
    q: &[f32],
    k: &[E],
    v: &[E],
    out: &mut [f32],
    paths: &[Vec<u32>],
) {
    s.check(q, k, v, out);
    check_paths(s, paths);
    let per_unit = queries_per_unit(s);
    attention_units(
        s,
        q,
        k,
        v,
        out,
        per_unit,
        segment_split(s, per_unit),
        Some(paths),
    )
}

/// How many queries a unit takes: a KV head's t·group queries split into enough equal runs
/// that there are about four units per thread (so the pool evens them out), rounded up to
/// whole groups while that keeps it within [`grouped_unit_most`] (the grouped f16 kernels take
/// a row's group together: a verification pass of 4 rows has units of 6 queries instead of
/// 4), at most [`QUERIES_PER_UNIT`], and never fewer than a group's heads: a one-token step
/// at a long context is bound by reading the cache, and a group's heads read their KV head
/// once (SmolLM2 at 1,024 tokens, 2 threads: 3.1-3.2 ms of attention per step against
/// 3.5-3.9 with a unit per head). Three such runs cannot be split evenly over 2 threads:
/// their key segments are ([`segment_split`]).
fn queries_per_unit(s: AttentionShape) -> usize {
    let group = s.n_head / s.n_kv_head;
    let per_kv_head = s.t * group;
    let threads = crate::pool::current().threads_now().max(1);
    let runs = if threads == 1 {
        1
    } else {
        (4 * threads).div_ceil(s.n_kv_head)
    };
    let per = per_kv_head.div_ceil(runs).max(group);
    // Whole groups where the unit stays small enough for the grouped f16 kernels (which take
    // a row's group together); a larger unit keeps its even split (`attn_hot` with AVX2,
    // 8 rows: 9, 9 and 6 queries ran 5-12% slower than three units of 8).
    let whole = per.next_multiple_of(group.max(1));
    let per = if whole <= grouped_unit_most() {
        whole
    } else {
        per
    };
    per.clamp(1, QUERIES_PER_UNIT)
}

/// One query of a unit: where its vector and output sit (the row of `q`/`out`), how many of
/// the cache's key rows from 0 it sees, and (a token tree's) where its path's gathered keys
/// and values sit in the unit's scratch.
#[derive(Clone, Copy, Default)]
struct Query {
    row: usize,
    cached: usize,
    path_at: usize,
    path_len: usize,
}

impl Query {
    /// How many of a block's `rows` cache rows, the first at position `j0`, this query sees.
    #[inline(always)]
    fn rows_in(&self, j0: usize, rows: usize) -> usize {
        self.cached.saturating_sub(j0).min(rows)
    }
}

/// Keys a query's softmax takes in one piece, from position 0 on (a multiple of
/// [`KEYS_PER_BLOCK`] and of 8). A query's keys are cut at these fixed positions whatever the
/// pass, each segment gets its own maximum, exponentials and unnormalized weighted sum, and
/// [`combine_parts`] merges them in order: so a query's result depends only on its keys, and
/// a pass with few queries (a one-token step: one run of queries per KV head, 3 on SmolLM2)
/// can still split each run's keys over several threads (split-K, as flash-decoding does).
const KEYS_PER_SEGMENT: usize = 256;

/// Into how many pieces each run of queries' segments is cut: enough that the pass has about
/// four units per thread (a one-token step at 1,024 keys on 2 threads: 3 runs, 2 pieces each,
/// instead of 3 units for 2 threads), never more than the segments, one with one thread.
fn segment_split(s: AttentionShape, per_unit: usize) -> usize {
    let threads = crate::pool::current().threads_now().max(1);
    if threads == 1 {
        return 1;
    }
    let runs = s.n_kv_head * (s.t * (s.n_head / s.n_kv_head)).div_ceil(per_unit.max(1));
    (4 * threads).div_ceil(runs.max(1))
}

/// Attention in task units of `per_unit` queries of one KV head (its group's heads of
/// consecutive rows, row-major) and a run of their key segments (each run's segments cut into
/// `split` pieces). `paths`: a token tree's visible new rows per query (see
/// [`attention_tree`]); `None` is causal.
#[allow(clippy::too_many_arguments)]
fn attention_units<E: KvElement>(
    s: AttentionShape,
    q: &[f32],
    k: &[E],
    v: &[E],
    out: &mut [f32],
    per_unit: usize,
    split: usize,
    paths: Option<&[Vec<u32>]>,
) {
    let d = s.head_dim;
    let group = s.n_head / s.n_kv_head;
    let scale = 1.0 / (d as f32).sqrt();
    let per_unit = per_unit.clamp(1, QUERIES_PER_UNIT);
    let per_kv_head = s.t * group;
    let runs_per_kv_head = per_kv_head.div_ceil(per_unit);
    let runs = s.n_kv_head * runs_per_kv_head;
    // Keys row i's queries see.
    let seen = |i: usize| s.n + paths.map_or(i + 1, |p| p[i].len());
    let segments = (0..s.t)
        .map(seen)
        .max()
        .unwrap_or(0)
        .div_ceil(KEYS_PER_SEGMENT)
        .max(1);
    let per_piece = segments.div_ceil(split.clamp(1, segments));
    let pieces = segments.div_ceil(per_piece);
    let units = runs * pieces;
    let part_len = d + 2;
    // With a run's segments cut into pieces, each (query, segment) part lands here and the
    // queries are combined once every unit has run: the calling thread's buffer, kept from
    // call to call (a one-token step splits in every layer).
    let mut shared = SHARED_PARTS
        .with(|c| c.try_borrow_mut().map(|mut b| std::mem::take(&mut *b)))
        .unwrap_or_default();
    shared.clear();
    if pieces > 1 {
        shared.resize(s.t * s.n_head * segments * part_len, 0.0);
    }
    let shared_at = crate::rows::SendPtr(shared.as_mut_ptr());
    // Tasks of a few consecutive units: a unit at short context is a few microseconds of
    // arithmetic, near what handing it out as a task costs. Eight tasks per thread or more,
    // so the pool still evens out a prefill's units (later rows attend over more keys).
    let threads = crate::pool::current().threads_now().max(1);
    let per_task = units.div_ceil(8 * threads).max(1);
    let base = crate::rows::SendPtr(out.as_mut_ptr());
    crate::pool::current().run(units.div_ceil(per_task), |c| {
        crate::rows::with_scratch(&SCORES, |scores| {
            crate::rows::with_scratch(&WIDE_BLOCK, |wide| {
                crate::rows::with_scratch(&PATH_ROWS, |path_rows| {
                    crate::rows::with_scratch(&PARTS, |parts| {
                        for unit in c * per_task..((c + 1) * per_task).min(units) {
                            let (run, piece) = (unit / pieces, unit % pieces);
                            let kv = run / runs_per_kv_head;
                            let first = run % runs_per_kv_head * per_unit;
                            let last = (first + per_unit).min(per_kv_head);
                            let seg0 = piece * per_piece;
                            let segs = seg0..(seg0 + per_piece).min(segments);
                            let (kh, vh) = (&k[kv * s.capacity * d..], &v[kv * s.capacity * d..]);
                            let mut queries = [Query::default(); QUERIES_PER_UNIT];
                            path_rows.clear();
                            let mut gathered_row = usize::MAX;
                            for (x, qi) in (first..last).enumerate() {
                                let (i, g) = (qi / group, qi % group);
                                let row = i * s.n_head + kv * group + g;
                                queries[x] = match paths {
                                    // Causal: the rows 0..=n+i.
                                    None => Query {
                                        row,
                                        cached: s.n + i + 1,
                                        ..Query::default()
                                    },
                                    // A tree: 0..n, then the path's rows, gathered (at most a
                                    // few dozen) once per row of the unit, keys then values.
                                    Some(p) => {
                                        let len = p[i].len() * d;
                                        if gathered_row != i {
                                            gathered_row = i;
                                            for src in [kh, vh] {
                                                for &m in &p[i] {
                                                    let r = (s.n + m as usize) * d;
                                                    let at = path_rows.len();
                                                    path_rows.resize(at + d, 0.0);
                                                    E::load(&src[r..r + d], &mut path_rows[at..]);
                                                }
                                            }
                                        }
                                        Query {
                                            row,
                                            cached: s.n,
                                            path_at: path_rows.len() - 2 * len,
                                            path_len: p[i].len(),
                                        }
                                    }
                                };
                            }
                            let queries = &queries[..last - first];
                            let unit_parts = queries.len() * segs.len() * part_len;
                            // Every part is written in full by the unit (no clearing here).
                            parts.resize(unit_parts, 0.0);
                            let work = Unit {
                                queries,
                                q,
                                d,
                                keys: kh,
                                vals: vh,
                                path_rows,
                                scale,
                                segments: segs.clone(),
                            };
                            attend_queries(&work, scores, wide, parts);
                            let per_query = segs.len() * part_len;
                            for (x, qy) in queries.iter().enumerate() {
                                let mine = &parts[x * per_query..][..per_query];
                                if pieces == 1 {
                                    // SAFETY: a query's output row is (row i, head h): a unit's
                                    // queries are distinct (i, h) of its KV head and units
                                    // split the queries without overlap (one piece each), so
                                    // no two tasks write the same row; `run` waits for them.
                                    let o = unsafe {
                                        std::slice::from_raw_parts_mut(
                                            base.get().add(qy.row * d),
                                            d,
                                        )
                                    };
                                    combine_parts(mine, qy.cached + qy.path_len, d, o);
                                } else {
                                    // SAFETY: `shared` holds a part per (query row, segment);
                                    // units split (rows × segments) without overlap, so no
                                    // two tasks write the same part; `run` waits for them.
                                    let dst = unsafe {
                                        std::slice::from_raw_parts_mut(
                                            shared_at
                                                .get()
                                                .add((qy.row * segments + seg0) * part_len),
                                            per_query,
                                        )
                                    };
                                    dst.copy_from_slice(mine);
                                }
                            }
                        }
                    })
                })
            })
        })
    });
    if pieces > 1 {
        for i in 0..s.t {
            for h in 0..s.n_head {
                let row = i * s.n_head + h;
                let mine = &shared[row * segments * part_len..][..segments * part_len];
                combine_parts(mine, seen(i), d, &mut out[row * d..][..d]);
            }
        }
    }
    SHARED_PARTS.with(|c| {
        if let Ok(mut b) = c.try_borrow_mut() {
            *b = shared;
        }
    });
}

/// A query's output from its segments' parts (each `[max, z, Σ e^(s−max)·v …]`, segment 0
/// first) over `seen` keys: rescaled to the largest maximum and added in segment order, then
/// divided by the total. One segment: its sum divided by its z (e^0 is exactly 1).
fn combine_parts(parts: &[f32], seen: usize, d: usize, out: &mut [f32]) {
    let n = seen.div_ceil(KEYS_PER_SEGMENT);
    if n == 1 {
        // The loop below with c = e^0 = 1: the same bits (`0.0 + x` as its first add keeps a
        // -0.0 sum +0.0) in one pass instead of three over the output (a short context's
        // queries all have one segment).
        let z = parts[1];
        for (o, x) in out.iter_mut().zip(&parts[2..d + 2]) {
            *o = (0.0 + x) / z;
        }
        return;
    }
    let parts = parts.chunks_exact(d + 2).take(n);
    let max = parts
        .clone()
        .map(|p| p[0])
        .fold(f32::NEG_INFINITY, f32::max);
    let mut z = 0f32;
    out.fill(0.0);
    for p in parts {
        let c = crate::ops::exp_approx(p[0] - max);
        z += p[1] * c;
        for (o, x) in out.iter_mut().zip(&p[2..]) {
            *o += c * x;
        }
    }
    out.iter_mut().for_each(|o| *o /= z);
}

/// What one unit computes: its queries, their KV head's cache rows, (a tree's) the paths'
/// rows gathered, and which of their key segments.
struct Unit<'a, E> {
    queries: &'a [Query],
    /// All query vectors, [t, n_head, head_dim] (a query's at `row · d`).
    q: &'a [f32],
    d: usize,
    keys: &'a [E],
    vals: &'a [E],
    path_rows: &'a [f32],
    scale: f32,
    segments: std::ops::Range<usize>,
}

/// For each of the unit's queries and segments, the segment's part into `parts`
/// ([query][segment][max, z, d sums]). `wide`: scratch for a block of an f16 cache widened.
fn attend_queries<E: KvElement>(
    unit: &Unit<'_, E>,
    scores: &mut Vec<f32>,
    wide: &mut Vec<f32>,
    parts: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if crate::has_avx2_fma() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked above).
        return unsafe { attend_queries_avx2(unit, scores, wide, parts) };
    }
    attend_queries_body(unit, scores, wide, parts)
}

/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_queries_avx2<E: KvElement>(
    unit: &Unit<'_, E>,
    scores: &mut Vec<f32>,
    wide: &mut Vec<f32>,
    parts: &mut [f32],
) {
    attend_queries_body(unit, scores, wide, parts)
}

/// Per segment: the cache's rows in it are visited in blocks of [`KEYS_PER_BLOCK`], each
/// block by every query that sees (part of) it before the next block is read, then each
/// query's gathered path rows in it (a tree's). Per query: the same operations in the same
/// order whatever the unit, the same bits (each key's score is one function of q and k, a
/// maximum does not depend on order, the exponentials' eight-lane sums depend on the
/// segment's length only, and each output element adds its rows in order, through memory
/// between blocks). The plain loops vectorize 8 wide in the AVX2 build; their products and
/// sums are fused (`mul_add`) as the SIMD kernels' are, so both builds round identically.
#[inline(always)]
fn attend_queries_body<E: KvElement>(
    unit: &Unit<'_, E>,
    scores: &mut Vec<f32>,
    wide: &mut Vec<f32>,
    parts: &mut [f32],
) {
    let Unit {
        queries,
        q,
        d,
        keys,
        vals,
        path_rows,
        scale,
        ref segments,
    } = *unit;
    let seen = |x: &Query| x.cached + x.path_len;
    // Of a query's path rows, those at positions lo..hi (a range of indices into them).
    let path_span = |x: &Query, lo: usize, hi: usize| {
        let (a, b) = (lo.max(x.cached), hi.min(seen(x)));
        (a - x.cached)..b.max(a) - x.cached
    };
    const S: usize = KEYS_PER_SEGMENT;
    let cached = queries.iter().map(|x| x.cached).max().unwrap_or(0);
    let (nseg, part_len) = (segments.len(), d + 2);
    // Each score is written before it is read (the exponentials and weighted sums read a
    // query's first `len` scores of the segment, all written by its blocks above them).
    let scores = grown(scores, queries.len() * S);
    // The kernels' choice, made once per unit rather than per block and query.
    let simd = d.is_multiple_of(8) && simd_available();
    // An f16 cache's blocks widened in registers per group of queries, where the unit has few
    // (decoding and short verification passes); with AVX2 only, a unit of many (prefill, long
    // drafts) widens each block into memory once for all of them, which costs less than once
    // per group there ([`grouped_unit_most`]).
    #[cfg(target_arch = "x86_64")]
    let grouped = simd && queries.len() <= grouped_unit_most();
    // Every kernel's 512-bit version, where the CPU has AVX-512F (the same bits).
    let avx512 = simd && avx512_available();
    let query = |x: &Query| &q[x.row * d..][..d];
    for (si, seg) in segments.clone().enumerate() {
        let (lo, hi) = (seg * S, (seg + 1) * S);
        let cache_rows = lo..hi.min(cached).max(lo);
        let mut max = [f32::NEG_INFINITY; QUERIES_PER_UNIT];
        let blocks = keys[cache_rows.start * d..cache_rows.end * d].chunks(KEYS_PER_BLOCK * d);
        for (b, block) in blocks.enumerate() {
            let j0 = lo + b * KEYS_PER_BLOCK;
            #[cfg(target_arch = "x86_64")]
            if let Some(half) = E::as_f16(block).filter(|_| grouped) {
                let rows = |qy: &Query| qy.rows_in(j0, half.len() / d);
                for (x0, x1, n) in same_row_runs(queries, rows) {
                    let (lo_s, qs) = (x0 * S + j0 - lo, &queries[x0..x1]);
                    // SAFETY: `simd` says the CPU has AVX2, FMA and F16C and d is a multiple
                    // of 8; the run's queries see `n` rows of `half`, and their score rows
                    // (S apart, from `lo_s`) hold the block's j0 - lo + n scores.
                    let m = unsafe {
                        score_rows_f16_grouped(
                            avx512, qs, q, d, half, n, scale, scores, lo_s, S, wide,
                        )
                    };
                    for (mx, m) in max[x0..x1].iter_mut().zip(m) {
                        *mx = mx.max(m);
                    }
                }
                continue;
            }
            let block = E::widen(simd, block, wide);
            for (x, qy) in queries.iter().enumerate() {
                let rows = qy.rows_in(j0, block.len() / d);
                if rows > 0 {
                    let s = &mut scores[x * S + j0 - lo..][..rows];
                    max[x] = max[x].max(score_block(
                        simd,
                        avx512,
                        query(qy),
                        &block[..rows * d],
                        scale,
                        s,
                    ));
                }
            }
        }
        for (x, qy) in queries.iter().enumerate() {
            let span = path_span(qy, lo, hi);
            if span.is_empty() {
                continue;
            }
            let at = qy.cached + span.start - lo;
            let path_keys = &path_rows[qy.path_at + span.start * d..][..span.len() * d];
            for (b, block) in path_keys.chunks(KEYS_PER_BLOCK * d).enumerate() {
                let s = &mut scores[x * S + at + b * KEYS_PER_BLOCK..][..block.len() / d];
                max[x] = max[x].max(score_block(simd, avx512, query(qy), block, scale, s));
            }
        }
        for (x, qy) in queries.iter().enumerate() {
            let part = &mut parts[(x * nseg + si) * part_len..][..part_len];
            part.fill(0.0);
            let len = seen(qy).min(hi).saturating_sub(lo);
            part[0] = max[x];
            if len > 0 {
                part[1] = crate::ops::exp_shifted_sum(&mut scores[x * S..][..len], max[x]);
            }
        }
        let blocks = vals[cache_rows.start * d..cache_rows.end * d].chunks(KEYS_PER_BLOCK * d);
        for (b, block) in blocks.enumerate() {
            let j0 = lo + b * KEYS_PER_BLOCK;
            #[cfg(target_arch = "x86_64")]
            if let Some(half) = E::as_f16(block).filter(|_| grouped) {
                let rows = |qy: &Query| qy.rows_in(j0, half.len() / d);
                for (x0, x1, n) in same_row_runs(queries, rows) {
                    let stride = nseg * part_len;
                    let o_at = (x0 * nseg + si) * part_len + 2;
                    // SAFETY: as for the keys; query x's output sums sit at
                    // `o_at + (x - x0) * stride`, d of them each, inside `parts`, and its
                    // weights at `(x - x0) * S` past the block's first score.
                    unsafe {
                        accumulate_rows_f16_grouped(
                            avx512,
                            half,
                            d,
                            n,
                            x1 - x0,
                            &scores[x0 * S + j0 - lo..],
                            S,
                            &mut parts[o_at..],
                            stride,
                        )
                    };
                }
                continue;
            }
            let block = E::widen(simd, block, wide);
            for (x, qy) in queries.iter().enumerate() {
                let rows = qy.rows_in(j0, block.len() / d);
                if rows > 0 {
                    let w = &scores[x * S + j0 - lo..][..rows];
                    let o = &mut parts[(x * nseg + si) * part_len + 2..][..d];
                    accumulate_block(simd, avx512, &block[..rows * d], w, o);
                }
            }
        }
        for (x, qy) in queries.iter().enumerate() {
            let span = path_span(qy, lo, hi);
            if span.is_empty() {
                continue;
            }
            let at = qy.cached + span.start - lo;
            let path_vals =
                &path_rows[qy.path_at + (qy.path_len + span.start) * d..][..span.len() * d];
            for (b, block) in path_vals.chunks(KEYS_PER_BLOCK * d).enumerate() {
                let w = &scores[x * S + at + b * KEYS_PER_BLOCK..][..block.len() / d];
                let o = &mut parts[(x * nseg + si) * part_len + 2..][..d];
                accumulate_block(simd, avx512, block, w, o);
            }
        }
    }
}

/// Key (and value) rows per block that a group's heads work through together (32 rows of 64
/// floats: 8 KB, a quarter of L1).
const KEYS_PER_BLOCK: usize = 32;

thread_local! {
    /// A unit's attention scores (a row per query), reused across calls.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// A block of an f16 cache's keys or values, widened to f32 for a unit's queries.
    static WIDE_BLOCK: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The calling thread's parts of a pass whose segments are split over units.
    static SHARED_PARTS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// A unit's parts: per query and segment, its maximum, sum and weighted values.
    static PARTS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// A unit's token-tree paths' keys and values, gathered (per row of the tree).
    static PATH_ROWS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Dot product with 8 independent lanes (vectorizes, and its order never depends on callers).
/// Each product is fused with its add (`mul_add`), as in every attention kernel here: one FMA
/// instead of a multiply and an add. Measured with the `attn_hot` example (SmolLM2's heads, f16
/// cache, 2 threads, µs per call, five alternations on a 2-core Emerald Rapids): 4 rows at 1,024
/// keys 142-157 -> 116-140, 4 rows at 256 keys 47-61 -> 46-52, 1 row at 256 keys 14-19 -> 12-14.
/// The scalar build without FMA hardware computes the same bits through libm's `fmaf`.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s = x.mul_add(*y, s);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// A single segment's output is what the general merge gives with its one part: the
    /// rescale e^0 is exactly 1, so the shortcut keeps every bit (signed zeros included).
    #[test]
    fn one_segment_combines_as_the_general_merge() {
        assert_eq!(crate::ops::exp_approx(0.0), 1.0);
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for d in [8usize, 64, 72] {
            let mut part: Vec<f32> = (0..d + 2).map(|_| rng.random_range(-3.0f32..3.0)).collect();
            part[1] = rng.random_range(0.5f32..40.0);
            part[2] = -0.0;
            let mut fast = vec![f32::NAN; d];
            combine_parts(&part, KEYS_PER_SEGMENT, d, &mut fast);
            // The general merge over one part, written out.
            let c = crate::ops::exp_approx(part[0] - part[0]);
            let z = 0.0 + part[1] * c;
            let general: Vec<f32> = part[2..].iter().map(|x| (0.0 + c * x) / z).collect();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast), bits(&general), "head_dim {d}");
        }
    }

    /// A shape and random q, k, v for it.
    fn random_case(
        rng: &mut impl Rng,
        t: usize,
        n: usize,
        nh: usize,
        nkv: usize,
        d: usize,
        cap: usize,
    ) -> (AttentionShape, Vec<f32>, Vec<f32>, Vec<f32>) {
        let s = AttentionShape {
            t,
            n,
            n_head: nh,
            n_kv_head: nkv,
            head_dim: d,
            capacity: cap,
        };
        let mut r = |len| {
            (0..len)
                .map(|_| rng.random_range(-2.0f32..2.0))
                .collect::<Vec<_>>()
        };
        let (q, k, v) = (r(t * nh * d), r(nkv * cap * d), r(nkv * cap * d));
        (s, q, k, v)
    }

    #[test]
    fn fast_matches_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for (t, n, nh, nkv, d, cap) in [
            (1, 0, 1, 1, 8, 4),
            (1, 7, 8, 4, 8, 16),
            (5, 3, 9, 3, 64, 10),
            (4, 0, 8, 8, 12, 4),
            (3, 20, 6, 2, 17, 40),
            (1, 700, 9, 3, 64, 701),
            (5, 509, 6, 2, 32, 520),
        ] {
            let (s, q, k, v) = random_case(&mut rng, t, n, nh, nkv, d, cap);
            let mut a = vec![0f32; q.len()];
            let mut b = vec![0f32; q.len()];
            attention_reference(s, &q, &k, &v, &mut a);
            attention(s, &q, &k, &v, &mut b);
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 1e-5, "{s:?}: {x} vs {y}");
            }
        }
    }

    /// However the queries are split into units (one per unit, a KV head's group, several
    /// rows of it, the most a unit takes), each gets the same bits: causal and tree.
    #[test]
    fn every_unit_size_gives_each_query_the_same_bits() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(10);
        for (t, n, nh, nkv, d) in [
            (7, 5, 9, 3, 64),
            (3, 0, 8, 2, 16),
            (5, 2, 12, 2, 32),
            (6, 70, 9, 3, 64),
            (16, 40, 9, 3, 64),
            (6, 33, 4, 1, 12),
            (1, 900, 9, 3, 64),
            (7, 250, 9, 3, 64),
            (4, 520, 6, 2, 16),
        ] {
            let (s, q, k, v) = random_case(&mut rng, t, n, nh, nkv, d, n + t);
            let chain: Vec<Vec<u32>> = (0..t as u32).map(|i| (0..=i).collect()).collect();
            let tree: Vec<Vec<u32>> = (0..t as u32)
                .map(|i| (0..=i).filter(|m| m % 2 == 0 || *m == i).collect())
                .collect();
            for paths in [None, Some(&chain[..]), Some(&tree[..])] {
                let mut one = vec![0f32; q.len()];
                attention_units(s, &q, &k, &v, &mut one, 1, 1, paths);
                for per_unit in [1, 2, nh / nkv, 5, QUERIES_PER_UNIT] {
                    for split in [1, 2, 3, 64] {
                        let mut b = vec![0f32; q.len()];
                        attention_units(s, &q, &k, &v, &mut b, per_unit, split, paths);
                        assert_eq!(
                            one,
                            b,
                            "{s:?} {per_unit} per unit, {split} pieces, tree {:?}",
                            paths.is_some()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_does_not_depend_on_its_chunk() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let (nh, nkv, d, cap) = (4, 2, 16, 12);
        let q: Vec<f32> = (0..6 * nh * d)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let k: Vec<f32> = (0..nkv * cap * d)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let v = k.iter().map(|x| x * 0.5 + 0.1).collect::<Vec<_>>();
        let mut whole = vec![0f32; q.len()];
        attention(
            AttentionShape {
                t: 6,
                n: 0,
                n_head: nh,
                n_kv_head: nkv,
                head_dim: d,
                capacity: cap,
            },
            &q,
            &k,
            &v,
            &mut whole,
        );
        let row = nh * d;
        for i in 0..6 {
            let mut one = vec![0f32; row];
            attention(
                AttentionShape {
                    t: 1,
                    n: i,
                    n_head: nh,
                    n_kv_head: nkv,
                    head_dim: d,
                    capacity: cap,
                },
                &q[i * row..][..row],
                &k,
                &v,
                &mut one,
            );
            assert_eq!(&whole[i * row..][..row], &one[..], "position {i}");
        }
    }

    /// A tree: root 0; 1 and 2 its children; 3 under 1; 4 under 2; 5 under 3.
    fn tree_paths() -> Vec<Vec<u32>> {
        vec![
            vec![0],
            vec![0, 1],
            vec![0, 2],
            vec![0, 1, 3],
            vec![0, 2, 4],
            vec![0, 1, 3, 5],
        ]
    }

    #[test]
    fn tree_matches_its_reference_and_a_chain_is_causal() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        for (n, nh, nkv, d) in [
            (0, 4, 2, 16),
            (9, 9, 3, 64),
            (30, 8, 8, 12),
            (253, 9, 3, 64),
        ] {
            let (s, q, k, v) = random_case(&mut rng, 6, n, nh, nkv, d, n + 6);
            let (mut a, mut b) = (vec![0f32; q.len()], vec![0f32; q.len()]);
            attention_tree_reference(s, &q, &k, &v, &mut a, &tree_paths());
            attention_tree(s, &q, &k, &v, &mut b, &tree_paths());
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 1e-5, "{s:?}: {x} vs {y}");
            }
            let chain: Vec<Vec<u32>> = (0..6).map(|i| (0..=i).collect()).collect();
            let (mut c, mut e) = (vec![0f32; q.len()], vec![0f32; q.len()]);
            attention_tree(s, &q, &k, &v, &mut c, &chain);
            attention(s, &q, &k, &v, &mut e);
            assert_eq!(c, e, "a chain-shaped tree is causal attention, bit for bit");
        }
    }

    /// A tree row gives the bits causal attention gives when its path is laid out after the
    /// cache contiguously: what plain decoding of the accepted path computes.
    #[test]
    fn a_tree_row_equals_its_path_decoded_plainly() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(22);
        // Paths inside a key segment and across one (253 + 4 > 256).
        for n in [13, 253, 510] {
            let (nh, nkv, d) = (6, 2, 32);
            let (s, q, k, v) = random_case(&mut rng, 6, n, nh, nkv, d, n + 6);
            let mut tree = vec![0f32; q.len()];
            attention_tree(s, &q, &k, &v, &mut tree, &tree_paths());
            let row = nh * d;
            for (i, path) in tree_paths().iter().enumerate() {
                // The path's keys and values moved to n, n+1, ... (as the cache keeps them).
                let (mut kp, mut vp) = (k.clone(), v.clone());
                for h in 0..nkv {
                    for (depth, &m) in path.iter().enumerate() {
                        let (src, dst) = (
                            (h * s.capacity + n + m as usize) * d,
                            (h * s.capacity + n + depth) * d,
                        );
                        kp.copy_within(src..src + d, dst);
                        vp.copy_within(src..src + d, dst);
                    }
                }
                let one = AttentionShape {
                    t: 1,
                    n: n + path.len() - 1,
                    ..s
                };
                let mut plain = vec![0f32; row];
                attention(one, &q[i * row..][..row], &kp, &vp, &mut plain);
                assert_eq!(&tree[i * row..][..row], &plain[..], "row {i}");
            }
        }
    }

    /// An f16 cache gives each query the bits the f32 kernel gives on the same cache widened
    /// (the unit widens blocks, the tree gathers its paths widened), causal and tree, at
    /// every unit size; and it stays within f16's rounding of the f64 reference on the
    /// original f32 keys and values.
    #[test]
    fn an_f16_cache_is_the_f32_kernel_on_its_widened_values() {
        use half::f16;
        let mut rng = rand::rngs::StdRng::seed_from_u64(77);
        for (t, n, nh, nkv, d) in [
            (1, 0, 9, 3, 64),
            (1, 100, 9, 3, 64),
            (1, 600, 9, 3, 64),
            (6, 70, 9, 3, 64),
            (5, 33, 4, 1, 12),
            (16, 40, 8, 2, 16),
        ] {
            let (s, q, k, v) = random_case(&mut rng, t, n, nh, nkv, d, n + t + 3);
            let to_half = |x: &[f32]| x.iter().map(|&y| f16::from_f32(y)).collect::<Vec<_>>();
            let (kh, vh) = (to_half(&k), to_half(&v));
            let widen = |x: &[f16]| x.iter().map(|y| y.to_f32()).collect::<Vec<_>>();
            let (kw, vw) = (widen(&kh), widen(&vh));
            let tree: Vec<Vec<u32>> = (0..t as u32)
                .map(|i| (0..=i).filter(|m| m % 2 == 0 || *m == i).collect())
                .collect();
            for paths in [None, Some(&tree[..])] {
                for per_unit in [1, nh / nkv, QUERIES_PER_UNIT] {
                    let (mut a, mut b) = (vec![0f32; q.len()], vec![0f32; q.len()]);
                    attention_units(s, &q, &kh, &vh, &mut a, per_unit, 2, paths);
                    attention_units(s, &q, &kw, &vw, &mut b, per_unit, 2, paths);
                    assert_eq!(a, b, "{s:?} {per_unit} per unit, tree {}", paths.is_some());
                }
            }
            let (mut fast, mut exact) = (vec![0f32; q.len()], vec![0f32; q.len()]);
            attention(s, &q, &kh, &vh, &mut fast);
            attention_reference(s, &q, &k, &v, &mut exact);
            for (x, y) in fast.iter().zip(&exact) {
                // Keys and values within 2^-11 relative of the f32 ones (|x| < 2 here).
                assert!((x - y).abs() < 2e-2, "{s:?}: {x} vs {y}");
            }
        }
    }

    /// A prompt's rows on AMX agree with the FMA kernel to f32 rounding, a row's bits do not
    /// depend on the pass's other rows, and the rows after the bulk ones are the FMA kernel's
    /// bit for bit. Shapes: key counts off tile boundaries, several key segments, a cache
    /// whose capacity ends inside the last key tile, one query head per KV head.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn bulk_rows_match_the_fma_kernel_to_rounding() {
        use half::f16;
        if !crate::amx::available() {
            eprintln!("skipped: no AMX here");
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(78);
        for (t, bulk, n, nh, nkv, d, cap) in [
            (130, 130, 0, 9, 3, 64, 140),
            (100, 99, 37, 9, 3, 64, 140),
            (80, 64, 300, 4, 1, 32, 400),
            (129, 129, 0, 8, 8, 64, 129),
        ] {
            let (s, q, k, v) = random_case(&mut rng, t, n, nh, nkv, d, cap);
            let to_half = |x: &[f32]| x.iter().map(|&y| f16::from_f32(y)).collect::<Vec<_>>();
            let (kh, vh) = (to_half(&k), to_half(&v));
            let (mut fma, mut tiles) = (vec![0f32; q.len()], vec![0f32; q.len()]);
            attention(s, &q, &kh, &vh, &mut fma);
            attention_bulk(s, bulk, &q, &kh, &vh, &mut tiles);
            let row = nh * d;
            for (i, (a, b)) in fma.chunks(row).zip(tiles.chunks(row)).enumerate() {
                for (x, y) in a.iter().zip(b) {
                    if i < bulk {
                        assert!((x - y).abs() < 1e-5, "{s:?} row {i}: {x} vs {y}");
                    } else {
                        assert_eq!(x.to_bits(), y.to_bits(), "{s:?} row {i} (not bulk)");
                    }
                }
            }
            // The first 64 rows as a pass of their own (on the tile unit whatever their keys).
            let first = AttentionShape { t: 64, ..s };
            let mut alone = vec![0f32; 64 * row];
            crate::amx::attention::attention_f16(first, 64, &q[..64 * row], &kh, &vh, &mut alone);
            let bits = |x: &[f32]| x.iter().map(|y| y.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&alone),
                bits(&tiles[..64 * row]),
                "{s:?}: first 64 rows alone"
            );
        }
    }

    #[test]
    fn f16_stores_round_to_nearest_and_loads_are_exact() {
        use half::f16;
        let src = [0.1f32, -3.3, 65504.0, 1e-8, 0.0, 2.0f32.powi(-14)];
        let mut h = [f16::ZERO; 6];
        KvElement::store(&src, &mut h);
        for (x, y) in src.iter().zip(&h) {
            assert_eq!(f16::from_f32(*x), *y);
        }
        let mut back = [0f32; 6];
        KvElement::load(&h, &mut back);
        for (y, b) in h.iter().zip(&back) {
            assert_eq!(y.to_f32(), *b);
        }
        let long: Vec<f16> = (0..37)
            .map(|i| f16::from_f32(i as f32 * 0.37 - 5.0))
            .collect();
        let mut scratch = Vec::new();
        let simd = simd_available();
        let wide = f16::widen(simd, &long, &mut scratch).to_vec();
        assert_eq!(wide, long.iter().map(|x| x.to_f32()).collect::<Vec<_>>());
    }

    /// The grouped f16 kernels give each query the bits the one-query kernels give on the
    /// widened block: one to three queries, odd and even rows, several head sizes.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn grouped_f16_kernels_equal_the_widened_ones() {
        use half::f16;
        if !crate::has_avx2_fma() {
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(43);
        let shapes = [
            (64, 32),
            (64, 7),
            (8, 1),
            (128, 5),
            (16, 30),
            (64, 19),
            (128, 24),
            (24, 13),
        ];
        let widths = if crate::has_avx512() {
            &[false, true][..]
        } else {
            &[false]
        };
        for (avx512, (d, rows)) in widths.iter().flat_map(|&w| shapes.map(|s| (w, s))) {
            let block: Vec<f16> = (0..rows * d)
                .map(|_| f16::from_f32(rng.random_range(-3.0..3.0)))
                .collect();
            let wide: Vec<f32> = block.iter().map(|x| x.to_f32()).collect();
            for g in 1..=GROUP_MOST {
                let q: Vec<f32> = (0..g * d).map(|_| rng.random_range(-3.0..3.0)).collect();
                let qs: Vec<Query> = (0..g)
                    .map(|row| Query {
                        row,
                        ..Query::default()
                    })
                    .collect();
                let (stride, at) = (rows + 3, 2);
                let mut scores = vec![0f32; at + g * stride];
                let mut scratch = Vec::new();
                // SAFETY: AVX2, FMA and F16C checked above; d is a multiple of 8.
                let max = unsafe {
                    score_rows_f16_grouped(
                        avx512,
                        &qs,
                        &q,
                        d,
                        &block,
                        rows,
                        0.125,
                        &mut scores,
                        at,
                        stride,
                        &mut scratch,
                    )
                };
                let weights: Vec<f32> = (0..g * stride)
                    .map(|_| rng.random_range(0.0..1.0))
                    .collect();
                let start: Vec<f32> = (0..g * (d + 5))
                    .map(|_| rng.random_range(-1.0..1.0))
                    .collect();
                let mut sums = start.clone();
                // SAFETY: as above.
                unsafe {
                    accumulate_rows_f16_grouped(
                        avx512,
                        &block,
                        d,
                        rows,
                        g,
                        &weights,
                        stride,
                        &mut sums,
                        d + 5,
                    )
                };
                for x in 0..g {
                    let mut want = vec![0f32; rows];
                    // SAFETY: as above.
                    let m = unsafe { score_rows_avx2(&q[x * d..][..d], &wide, 0.125, &mut want) };
                    let got = &scores[at + x * stride..][..rows];
                    let case = format!("d {d} rows {rows} query {x} of {g}, avx512 {avx512}");
                    assert_eq!(got, &want[..], "scores {case}");
                    assert_eq!(max[x], m, "maximum {case}");
                    let mut o = start[x * (d + 5)..][..d].to_vec();
                    // SAFETY: as above.
                    unsafe { accumulate_rows_avx2(&wide, &weights[x * stride..][..rows], &mut o) };
                    assert_eq!(&sums[x * (d + 5)..][..d], &o[..], "sums {case}");
                }
            }
        }
    }

    /// The eight-keys-at-once scores are bit for bit the one-key `dot`'s.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn blocked_scores_equal_one_key_dots() {
        if !crate::has_avx2_fma() {
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(41);
        for (d, rows) in [(64, 37), (8, 8), (128, 5), (16, 100)] {
            let q: Vec<f32> = (0..d).map(|_| rng.random_range(-3.0..3.0)).collect();
            let keys: Vec<f32> = (0..rows * d).map(|_| rng.random_range(-3.0..3.0)).collect();
            let mut out = vec![0f32; rows];
            // SAFETY: AVX2 and FMA checked above.
            let max = unsafe { score_rows_avx2(&q, &keys, 0.125, &mut out) };
            for (j, &s) in out.iter().enumerate() {
                let want = dot(&q, &keys[j * d..][..d]) * 0.125;
                assert_eq!(s.to_bits(), want.to_bits(), "d {d} key {j}");
            }
            assert_eq!(max, out.iter().copied().fold(f32::NEG_INFINITY, f32::max));
            if crate::has_avx512() {
                let mut wide = vec![0f32; rows];
                // SAFETY: AVX-512F checked above.
                let m = unsafe { score_rows_avx512(&q, &keys, 0.125, &mut wide) };
                assert_eq!(wide, out, "512-bit scores d {d}");
                assert_eq!(m, max, "512-bit maximum d {d}");
            }
        }
    }

    /// The 512-bit weighted sums of an f32 block are bit for bit the 256-bit ones.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn wide_weighted_sums_equal_the_avx2_ones() {
        if !crate::has_avx512() {
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(47);
        for (d, rows) in [(64, 32), (8, 3), (24, 7), (128, 5), (256, 9)] {
            let vals: Vec<f32> = (0..rows * d).map(|_| rng.random_range(-3.0..3.0)).collect();
            let w: Vec<f32> = (0..rows).map(|_| rng.random_range(0.0..1.0)).collect();
            let start: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
            let (mut a, mut b) = (start.clone(), start);
            // SAFETY: AVX-512F (and so AVX2 and FMA) checked above; d is a multiple of 8.
            unsafe {
                accumulate_rows_avx2(&vals, &w, &mut a);
                accumulate_rows_avx512(&vals, &w, &mut b);
            }
            assert_eq!(a, b, "d {d} rows {rows}");
        }
    }
}
