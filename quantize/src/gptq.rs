//! GPTQ (Frantar et al., 2022) onto standard GGML blocks.
//!
//! For one linear layer `W` [rows, cols] and the Hessian `H = 2 XᵀX` of its calibration
//! inputs, columns are quantized in order and each column's rounding error is spread over the
//! columns not yet quantized, weighted by the inverse Hessian, so that ‖(W − Ŵ)X‖ rather than
//! ‖W − Ŵ‖ is what the rounding minimises. What makes the output a plain GGML file: when the
//! columns reach a block (32 values, or a K-quant's 256), that block's scales (and mins) are
//! chosen by the type's own encoder from the weights as they stand then — already moved by the
//! error of earlier blocks — and every element of the block is then rounded onto that fixed
//! grid as its column comes up ([`crate::grid`]). The levels are written back into the block,
//! so every block decodes through any GGML decoder.
//!
//! Layout: each row's work depends only on the shared inverse-Hessian factor, so rows are cut
//! into panels run in parallel; inside a panel, columns go in lazy blocks (the error of a block
//! of columns reaches the columns after it in one update, as the paper's lazy batching does),
//! which keeps a panel's rows in cache.

use crate::encode::encode_rows_into;
use crate::error::{Error, Result};
use crate::grid::{self, Grid};
use crate::types::QuantType;
use faer::linalg::solvers::DenseSolveCore;
use faer::{Mat, Side};
use rayon::prelude::*;

/// GPTQ's settings.
#[derive(Debug, Clone, Copy)]
pub struct GptqOptions {
    /// Dampening: this fraction of the mean diagonal of H is added to the diagonal (GPTQ's
    /// `percdamp`; 0.3 here, not the paper's 0.01: with a few thousand calibration tokens per
    /// 1536 input channels, stronger dampening scored better on SmolLM2, see BENCHMARKS.md).
    pub damp: f64,
    /// Columns per lazy update block (a multiple of the type's block size is used).
    pub lazy_block: usize,
    /// Quantize columns in order of decreasing Hessian diagonal ([`act_order`]). On by
    /// default: on SmolLM2 with attention quantized too it took wikitext-2 mean KLD from 0.190
    /// to 0.146, and it is neutral on the MLP-only policy, at the same time and peak memory.
    pub act_order: bool,
}

impl Default for GptqOptions {
    fn default() -> Self {
        GptqOptions {
            damp: 0.3,
            lazy_block: 128,
            act_order: true,
        }
    }
}

/// Rows per parallel panel: enough to reuse each inverse-Hessian row several times.
const PANEL_ROWS: usize = 16;

/// The upper Cholesky factor `U` of `H⁻¹` (H⁻¹ = UᵀU), row-major [cols, cols] in f32, after
/// dampening; `dead` columns (no activation ever reached them: H_ii = 0) get H_ii = 1. If H
/// is not positive definite after dampening, the dampening is raised tenfold, up to 1.0 of the
/// mean diagonal, before giving up.
pub fn inverse_hessian_factor(h: &[f64], cols: usize, damp: f64) -> Result<(Vec<f32>, Vec<bool>)> {
    inverse_hessian_factor_in_order(h, cols, None, damp)
}

/// [`inverse_hessian_factor`] of `h` with its rows and columns taken in `order` (act-order,
/// [`act_order`]); `dead` is then in that order too. The order is read through, not applied
/// to a copy: a permuted f64 copy of an 8192-wide Hessian is 0.5 GB, which took act-order's
/// peak memory over the streaming bound (2.95 GB against 2.42-2.49 GB on the 6.24 GB
/// synthetic checkpoint).
pub fn inverse_hessian_factor_in_order(
    h: &[f64],
    cols: usize,
    order: Option<&[usize]>,
    damp: f64,
) -> Result<(Vec<f32>, Vec<bool>)> {
    if let Some(o) = order {
        check_permutation(o, cols)?;
    }
    let src = |i: usize| order.map_or(i, |o| o[i]);
    if h.len() != cols * cols || cols == 0 {
        return Err(Error::Plan(format!(
            "Hessian of {} values for {cols} columns (internal error)",
            h.len()
        )));
    }
    if let Some(i) = h.iter().position(|v| !v.is_finite()) {
        return Err(Error::Plan(format!(
            "the calibration activations hold a non-finite value (Hessian entry {}, {})",
            i / cols,
            i % cols
        )));
    }
    let dead: Vec<bool> = (0..cols)
        .map(|i| h[src(i) * cols + src(i)] <= 0.0)
        .collect();
    let diag_mean = (0..cols)
        .filter(|&i| !dead[i])
        .map(|i| h[src(i) * cols + src(i)])
        .sum::<f64>()
        / (dead.iter().filter(|d| !**d).count().max(1)) as f64;
    let diag_mean = if diag_mean > 0.0 { diag_mean } else { 1.0 };
    let mut damp = damp.max(0.0);
    loop {
        // The factorizations in f32, as GPTQ's reference does: dampened, H is well
        // conditioned, and f32 halves the time of the two Cholesky factorizations and the
        // inverse (SmolLM2: 3.5 s -> 1.8 s of a 52 s run).
        let m = Mat::<f32>::from_fn(cols, cols, |i, j| {
            let mut v = h[src(i) * cols + src(j)];
            if i == j {
                if dead[i] {
                    v = 1.0;
                }
                v += damp * diag_mean;
            }
            v as f32
        });
        // Each temporary is dropped as soon as the next exists (two [cols, cols] f32
        // matrices at a time, not four: 0.5 GB less for an 8192-wide down_proj).
        let factor = m.llt(Side::Lower).ok().and_then(|llt| {
            drop(m);
            let inv = llt.inverse();
            drop(llt);
            inv.llt(Side::Lower).ok()
        });
        if let Some(f) = factor {
            // U = Lᵀ where H⁻¹ = L Lᵀ.
            let l = f.L();
            let mut u = vec![0f32; cols * cols];
            for i in 0..cols {
                for j in i..cols {
                    u[i * cols + j] = l[(j, i)];
                }
            }
            if u.iter().all(|v| v.is_finite()) && (0..cols).all(|i| u[i * cols + i] > 0.0) {
                return Ok((u, dead));
            }
        }
        if damp >= 1.0 {
            return Err(Error::Plan(
                "the calibration Hessian is not positive definite even with dampening 1.0 \
                 (too little or degenerate calibration text?)"
                    .into(),
            ));
        }
        damp = if damp <= 0.0 { 0.01 } else { damp * 10.0 };
    }
}

/// The order "act-order" quantizes columns in: largest Hessian diagonal (most activated
/// input channel) first, ties by index.
pub fn act_order(h: &[f64], cols: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..cols).collect();
    order.sort_by(|&a, &b| h[b * cols + b].total_cmp(&h[a * cols + a]).then(a.cmp(&b)));
    order
}

/// Whether act-order is used for a tensor of type `t`: only where a block is at most 32
/// columns. A K-quant super-block spans 256 columns and all of its sub-block scales are fixed
/// when its first column comes up, so in act-order most of its columns are scaled before any
/// error reaches them (SmolLM2's q4_k policy, wikitext-2 mean KLD 0.0143 with its q5_0
/// gate/up in act-order and its K-quant down_proj in file order, against 0.0147 with all in
/// act-order; Persuasion 0.0083 against 0.0088; see BENCHMARKS.md). A group of tensors
/// sharing one Hessian takes act-order only if every one of them suits it.
pub fn act_order_suits(t: QuantType) -> bool {
    t.block_size() <= 32
}

/// An error unless `order` is a permutation of `0..cols`.
fn check_permutation(order: &[usize], cols: usize) -> Result<()> {
    let mut seen = vec![false; cols];
    if order.len() != cols
        || order
            .iter()
            .any(|&c| c >= cols || std::mem::replace(&mut seen[c], true))
    {
        return Err(Error::Plan(format!(
            "GPTQ column order of {} entries is not a permutation of {cols} (internal error)",
            order.len()
        )));
    }
    Ok(())
}

/// Quantizes `w` ([rows, cols] row-major, modified in place: dead columns zeroed, error fed
/// forward) as type `t` with GPTQ, given the inverse-Hessian factor from
/// [`inverse_hessian_factor`]. `importance` (one weight per column) is handed to the block
/// encoder when it chooses each block's scales. Returns the GGML bytes.
pub fn gptq_quantize(
    t: QuantType,
    w: &mut [f32],
    cols: usize,
    u: &[f32],
    dead: &[bool],
    importance: Option<&[f32]>,
    opts: &GptqOptions,
) -> Result<Vec<u8>> {
    gptq_quantize_in_order(t, w, cols, u, dead, None, importance, opts)
}

/// [`gptq_quantize`] taking the columns in `order` (act-order, [`act_order`]): `u` and `dead`
/// are then those of the Hessian taken in that order ([`inverse_hessian_factor_in_order`]).
/// A GGML block's scales are fixed when the first of its columns comes up, from its weights
/// as they stand then, so the output is the same standard block layout whatever the order.
#[allow(clippy::too_many_arguments)]
pub fn gptq_quantize_in_order(
    t: QuantType,
    w: &mut [f32],
    cols: usize,
    u: &[f32],
    dead: &[bool],
    order: Option<&[usize]>,
    importance: Option<&[f32]>,
    opts: &GptqOptions,
) -> Result<Vec<u8>> {
    if let Some(o) = order {
        check_permutation(o, cols)?;
    }
    let bs = t.block_size();
    if !grid::has_grid(t) || cols == 0 || !cols.is_multiple_of(bs) || !w.len().is_multiple_of(cols)
    {
        return Err(Error::Plan(format!(
            "GPTQ to {t} needs rows of whole {bs}-value blocks (a row of {cols})"
        )));
    }
    let rows = w.len() / cols;
    let row_bytes = cols / bs * t.type_size();
    let mut out = vec![0u8; rows * row_bytes];
    let lazy = opts.lazy_block.max(bs).div_ceil(bs) * bs;
    let source = Order { order };
    for (r, row) in w.chunks_exact_mut(cols).enumerate() {
        for (i, &d) in dead.iter().enumerate() {
            if d {
                row[source.col(i)] = 0.0;
            }
        }
        for (j, v) in row.iter_mut().enumerate() {
            if !v.is_finite() {
                return Err(Error::Plan(format!(
                    "non-finite weight at row {r}, column {j}"
                )));
            }
        }
    }
    // In act-order the weights are worked on permuted (column i = source column order[i]),
    // so the lazy updates stay contiguous; they go back in place at the end.
    let mut permuted = order.map(|o| {
        let mut p = vec![0f32; w.len()];
        for (pr, row) in p.chunks_exact_mut(cols).zip(w.chunks_exact(cols)) {
            for (v, &c) in pr.iter_mut().zip(o) {
                *v = row[c];
            }
        }
        p
    });
    let work: &mut [f32] = permuted.as_deref_mut().unwrap_or(w);
    work.par_chunks_mut(PANEL_ROWS * cols)
        .zip(out.par_chunks_mut(PANEL_ROWS * row_bytes))
        .try_for_each(|(p, o)| panel_dispatch(t, p, cols, u, source, importance, lazy, o))?;
    if let (Some(p), Some(o)) = (&permuted, order) {
        for (row, pr) in w.chunks_exact_mut(cols).zip(p.chunks_exact(cols)) {
            for (v, &c) in pr.iter().zip(o) {
                row[c] = *v;
            }
        }
    }
    Ok(out)
}

/// [`panel`] compiled for AVX2 where the CPU has it: the same operations 8 wide (Rust never
/// fuses a multiply and an add on its own, so the results are the same as the baseline's).
#[allow(clippy::too_many_arguments)]
fn panel_dispatch(
    t: QuantType,
    w: &mut [f32],
    cols: usize,
    u: &[f32],
    order: Order<'_>,
    importance: Option<&[f32]>,
    lazy: usize,
    out: &mut [u8],
) -> Result<()> {
    #[cfg(target_arch = "x86_64")]
    {
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = "avx2")]
        unsafe fn wide(
            t: QuantType,
            w: &mut [f32],
            cols: usize,
            u: &[f32],
            order: Order<'_>,
            importance: Option<&[f32]>,
            lazy: usize,
            out: &mut [u8],
        ) -> Result<()> {
            panel(t, w, cols, u, order, importance, lazy, out)
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { wide(t, w, cols, u, order, importance, lazy, out) };
        }
    }
    panel(t, w, cols, u, order, importance, lazy, out)
}

/// Which source column each worked-on column is (`None`: the source order).
#[derive(Clone, Copy)]
struct Order<'a> {
    order: Option<&'a [usize]>,
}

impl Order<'_> {
    #[inline]
    fn col(&self, i: usize) -> usize {
        self.order.map_or(i, |o| o[i])
    }

    /// Where source column `c` is worked on.
    fn positions(&self, cols: usize) -> Vec<usize> {
        let mut pos: Vec<usize> = (0..cols).collect();
        if let Some(o) = self.order {
            for (i, &c) in o.iter().enumerate() {
                pos[c] = i;
            }
        }
        pos
    }
}

/// One panel of rows: columns in lazy blocks, each GGML block's grid fixed when its first
/// column comes up.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn panel(
    t: QuantType,
    w: &mut [f32],
    cols: usize,
    u: &[f32],
    order: Order<'_>,
    importance: Option<&[f32]>,
    lazy: usize,
    out: &mut [u8],
) -> Result<()> {
    let (bs, tb, sub, nlev) = (
        t.block_size(),
        t.type_size(),
        grid::sub_block(t),
        grid::levels(t),
    );
    let rows = w.len() / cols;
    let row_bytes = cols / bs * tb;
    let nb = cols / bs;
    let pos = order.positions(cols);
    // Each row's error for the columns of the current lazy block.
    let mut err = vec![0f32; rows * lazy];
    // Every (row, block)'s grids, fixed when the block's first column comes up.
    let mut grids: Vec<Vec<Grid>> = vec![Vec::new(); rows * nb];
    let mut fixed = vec![false; nb];
    let mut values = vec![0f32; bs];
    for b0 in (0..cols).step_by(lazy) {
        let b1 = (b0 + lazy).min(cols);
        for i in b0..b1 {
            let c = order.col(i);
            let (blk, e, d) = (c / bs, c % bs, u[i * cols + i]);
            if !fixed[blk] {
                // Fix this block's scales from the weights as they stand now (in act-order,
                // columns of the block beyond this lazy block have not yet received its
                // errors: a near enough picture to choose a scale from).
                fixed[blk] = true;
                for r in 0..rows {
                    for (k, v) in values.iter_mut().enumerate() {
                        *v = w[r * cols + pos[blk * bs + k]];
                    }
                    let block = &mut out[r * row_bytes + blk * tb..][..tb];
                    let imp = importance.map(|m| &m[blk * bs..(blk + 1) * bs]);
                    encode_rows_into(t, &values, bs, imp, block)?;
                    grid::grids(t, block, &mut grids[r * nb + blk]);
                }
            }
            let urow = &u[i * cols + i + 1..i * cols + b1];
            for r in 0..rows {
                let block = &mut out[r * row_bytes + blk * tb..][..tb];
                let g = grids[r * nb + blk][e / sub];
                let x = w[r * cols + i];
                // An all-zero block's grid has one value: keep the encoder's level.
                let keep = if g.scale == 0.0 {
                    grid::level(t, block, e)
                } else {
                    0
                };
                let level = g.nearest(x, nlev, keep);
                grid::set_level(t, block, e, level);
                let q = g.value(level);
                let er = (x - q) / d;
                err[r * lazy + (i - b0)] = er;
                for (v, &h) in w[r * cols + i + 1..r * cols + b1].iter_mut().zip(urow) {
                    *v -= er * h;
                }
            }
        }
        // The block's errors reach every later column at once: W[:, b1..] -= E · U[b0..b1, b1..]
        // (a small matrix product, faer's kernels).
        if b1 < cols {
            let e = faer::MatRef::from_row_major_slice(&err[..rows * lazy], rows, lazy)
                .subcols(0, b1 - b0);
            let uu = faer::MatRef::from_row_major_slice(u, cols, cols).submatrix(
                b0,
                b1,
                b1 - b0,
                cols - b1,
            );
            let wm =
                faer::MatMut::from_row_major_slice_mut(w, rows, cols).subcols_mut(b1, cols - b1);
            faer::linalg::matmul::matmul(wm, faer::Accum::Add, e, uu, -1.0f32, faer::Par::Seq);
        }
    }
    Ok(())
}

/// Accumulates `2 XᵀX` over batches of inputs: the lower triangle only (H is symmetric), in
/// f32 products summed per batch into an f64 total.
pub struct HessianSum {
    cols: usize,
    batch: Mat<f32>,
    total: Vec<f64>,
    /// Input rows seen.
    pub rows: usize,
}

impl HessianSum {
    pub fn new(cols: usize) -> Self {
        HessianSum {
            cols,
            batch: Mat::zeros(cols, cols),
            total: vec![0.0; cols * cols],
            rows: 0,
        }
    }

    /// Adds inputs `x` [n, cols] (row-major).
    pub fn add(&mut self, x: &[f32]) {
        let cols = self.cols;
        let n = x.len() / cols.max(1);
        if n == 0 {
            return;
        }
        // A column-major copy first: faer's triangular product is about twice as fast on it
        // as on the row-major rows (measured: 11 vs 23 ms for 512 x 1536 on 2 cores).
        let xm = Mat::<f32>::from_fn(n, cols, |i, j| x[i * cols + j]);
        use faer::linalg::matmul::triangular::{matmul, BlockStructure};
        matmul(
            self.batch.as_mut(),
            BlockStructure::TriangularLower,
            faer::Accum::Replace,
            xm.transpose(),
            BlockStructure::Rectangular,
            xm.as_ref(),
            BlockStructure::Rectangular,
            2.0f32,
            faer::Par::rayon(0),
        );
        // `total` holds the lower triangle column by column, like `batch`: both walked in
        // memory order (a row-major walk here cost as much as the product itself).
        for j in 0..cols {
            let col = &mut self.total[j * cols..(j + 1) * cols];
            for (i, t) in col.iter_mut().enumerate().skip(j) {
                *t += self.batch[(i, j)] as f64;
            }
        }
        self.rows += n;
    }

    /// The full symmetric matrix, row-major [cols, cols].
    pub fn finish(mut self) -> Vec<f64> {
        // Column j of the lower triangle is row j of the upper one: mirror it.
        let cols = self.cols;
        for j in 0..cols {
            for i in j + 1..cols {
                self.total[i * cols + j] = self.total[j * cols + i];
            }
        }
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode::{dequantized, encode};

    fn rng(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed;
        move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        }
    }

    /// A layer and inputs with correlated, unevenly scaled channels, as real activations are.
    fn layer(rows: usize, cols: usize, n: usize) -> (Vec<f32>, Vec<f32>) {
        let mut r = rng(42);
        let w: Vec<f32> = (0..rows * cols).map(|_| r() * 0.1).collect();
        let scale: Vec<f32> = (0..cols).map(|j| 0.2 + (j % 7) as f32).collect();
        let mut x = vec![0f32; n * cols];
        for t in 0..n {
            let common = r();
            for j in 0..cols {
                x[t * cols + j] = (r() + 0.7 * common) * scale[j];
            }
        }
        (w, x)
    }

    /// ‖(W − Ŵ)Xᵀ‖² over the inputs.
    fn output_error(w: &[f32], q: &[f32], x: &[f32], cols: usize) -> f64 {
        let rows = w.len() / cols;
        let n = x.len() / cols;
        let mut s = 0f64;
        for r in 0..rows {
            for t in 0..n {
                let mut d = 0f64;
                for j in 0..cols {
                    d += ((w[r * cols + j] - q[r * cols + j]) * x[t * cols + j]) as f64;
                }
                s += d * d;
            }
        }
        s
    }

    fn hessian(x: &[f32], cols: usize) -> Vec<f64> {
        let mut s = HessianSum::new(cols);
        s.add(x);
        s.finish()
    }

    /// GPTQ written as plainly as the paper's algorithm 1 (no lazy blocks, no panels, f64,
    /// the inverse Hessian updated by elimination instead of a Cholesky factor), with the same
    /// per-block grid rule: the reference the fast version must agree with.
    fn plain_gptq(t: QuantType, w: &[f32], cols: usize, h: &[f64]) -> Vec<u8> {
        let rows = w.len() / cols;
        let bs = t.block_size();
        let mean = (0..cols).map(|i| h[i * cols + i]).sum::<f64>() / cols as f64;
        // H⁻¹ by Gauss-Jordan.
        let mut a: Vec<Vec<f64>> = (0..cols)
            .map(|i| {
                let mut row: Vec<f64> = (0..cols)
                    .map(|j| h[i * cols + j] + if i == j { 0.01 * mean } else { 0.0 })
                    .collect();
                row.extend((0..cols).map(|j| if i == j { 1.0 } else { 0.0 }));
                row
            })
            .collect();
        for c in 0..cols {
            let p = a[c][c];
            for v in a[c].iter_mut() {
                *v /= p;
            }
            let pivot = a[c].clone();
            for (r, row) in a.iter_mut().enumerate() {
                if r != c {
                    let f = row[c];
                    for (v, pv) in row.iter_mut().zip(&pivot) {
                        *v -= f * pv;
                    }
                }
            }
        }
        let mut hinv: Vec<Vec<f64>> = a.into_iter().map(|r| r[cols..].to_vec()).collect();
        let mut w: Vec<f64> = w.iter().map(|&v| v as f64).collect();
        let mut out = vec![0u8; rows * cols / bs * t.type_size()];
        let row_bytes = cols / bs * t.type_size();
        let mut gs = Vec::new();
        let mut grids = vec![Vec::new(); rows];
        for i in 0..cols {
            for r in 0..rows {
                let block = &mut out[r * row_bytes + i / bs * t.type_size()..][..t.type_size()];
                if i % bs == 0 {
                    let vals: Vec<f32> = w[r * cols + i..r * cols + i + bs]
                        .iter()
                        .map(|&v| v as f32)
                        .collect();
                    block.copy_from_slice(&encode(t, &vals, bs, None).unwrap());
                    grid::grids(t, block, &mut gs);
                    grids[r] = gs.clone();
                }
                let g = grids[r][(i % bs) / grid::sub_block(t)];
                let x = w[r * cols + i] as f32;
                let l = g.nearest(x, grid::levels(t), grid::level(t, block, i % bs));
                grid::set_level(t, block, i % bs, l);
                let e = (w[r * cols + i] - g.value(l) as f64) / hinv[i][i];
                for j in i + 1..cols {
                    w[r * cols + j] -= e * hinv[i][j];
                }
            }
            // Remove column i from the inverse (the paper's update of H⁻¹).
            let (d, row_i) = (hinv[i][i], hinv[i].clone());
            for (r, row) in hinv.iter_mut().enumerate().skip(i + 1) {
                let f = row[i] / d;
                for j in i + 1..cols {
                    row[j] -= f * row_i[j];
                }
                let _ = r;
            }
        }
        out
    }

    #[test]
    fn gptq_beats_round_to_nearest_on_the_output_and_matches_a_plain_reference() {
        let (rows, cols, n) = (24, 256, 512);
        let (w, x) = layer(rows, cols, n);
        let h = hessian(&x, cols);
        // Every block type tandem writes.
        for t in [
            QuantType::Q4_0,
            QuantType::Q4_1,
            QuantType::Q5_0,
            QuantType::Q5_1,
            QuantType::Q8_0,
            QuantType::Q2K,
            QuantType::Q3K,
            QuantType::Q4K,
            QuantType::Q5K,
            QuantType::Q6K,
        ] {
            let rtn = dequantized(t.ggml(), &encode(t, &w, cols, None).unwrap(), rows, cols);
            let (u, dead) = inverse_hessian_factor(&h, cols, 0.01).unwrap();
            let mut wq = w.clone();
            let bytes =
                gptq_quantize(t, &mut wq, cols, &u, &dead, None, &GptqOptions::default()).unwrap();
            // Every block decodes through candle's reference dequantizer.
            let ours = dequantized(t.ggml(), &bytes, rows, cols);
            let (e_rtn, e_gptq) = (
                output_error(&w, &rtn, &x, cols),
                output_error(&w, &ours, &x, cols),
            );
            assert!(e_gptq < 0.8 * e_rtn, "{t}: gptq {e_gptq} vs rtn {e_rtn}");
            let plain = dequantized(t.ggml(), &plain_gptq(t, &w, cols, &h), rows, cols);
            let e_plain = output_error(&w, &plain, &x, cols);
            assert!(
                (e_gptq - e_plain).abs() <= 0.02 * e_plain,
                "{t}: fast {e_gptq} vs plain {e_plain}"
            );
            let same = ours.iter().zip(&plain).filter(|(a, b)| a == b).count();
            assert!(
                same as f64 >= 0.97 * ours.len() as f64,
                "{t}: {same} of {} values equal the plain reference",
                ours.len()
            );
        }
    }

    #[test]
    fn act_order_beats_rounding_and_the_source_order_as_an_order_is_the_same_bytes() {
        let (rows, cols, n) = (24, 256, 512);
        let (w, x) = layer(rows, cols, n);
        let h = hessian(&x, cols);
        let order = act_order(&h, cols);
        assert!(act_order_suits(QuantType::Q4_0) && act_order_suits(QuantType::Q5_1));
        assert!(!act_order_suits(QuantType::Q4K) && !act_order_suits(QuantType::Q6K));
        assert!((1..cols).all(|i| h[order[i - 1] * (cols + 1)] >= h[order[i] * (cols + 1)]));
        // The factor read through the order is the factor of a plainly permuted copy.
        let mut hp = vec![0f64; cols * cols];
        for (i, &oi) in order.iter().enumerate() {
            for (j, &oj) in order.iter().enumerate() {
                hp[i * cols + j] = h[oi * cols + oj];
            }
        }
        assert_eq!(
            inverse_hessian_factor_in_order(&h, cols, Some(&order), 0.01).unwrap(),
            inverse_hessian_factor(&hp, cols, 0.01).unwrap()
        );
        assert!(inverse_hessian_factor_in_order(&h, cols, Some(&order[1..]), 0.01).is_err());
        for t in [
            QuantType::Q4_0,
            QuantType::Q4_1,
            QuantType::Q4K,
            QuantType::Q6K,
        ] {
            let rtn = dequantized(t.ggml(), &encode(t, &w, cols, None).unwrap(), rows, cols);
            let (u, dead) = inverse_hessian_factor(&h, cols, 0.01).unwrap();
            let opts = GptqOptions::default();
            let mut w1 = w.clone();
            let plain = gptq_quantize(t, &mut w1, cols, &u, &dead, None, &opts).unwrap();
            let identity: Vec<usize> = (0..cols).collect();
            let mut w2 = w.clone();
            let same =
                gptq_quantize_in_order(t, &mut w2, cols, &u, &dead, Some(&identity), None, &opts)
                    .unwrap();
            assert_eq!(plain, same, "{t}");
            assert_eq!(w1, w2, "{t}");
            let (up, deadp) =
                inverse_hessian_factor_in_order(&h, cols, Some(&order), 0.01).unwrap();
            let mut w3 = w.clone();
            let act =
                gptq_quantize_in_order(t, &mut w3, cols, &up, &deadp, Some(&order), None, &opts)
                    .unwrap();
            let act = dequantized(t.ggml(), &act, rows, cols);
            let (e_rtn, e_act) = (
                output_error(&w, &rtn, &x, cols),
                output_error(&w, &act, &x, cols),
            );
            assert!(e_act < 0.8 * e_rtn, "{t}: act-order {e_act} vs rtn {e_rtn}");
        }
        let mut w4 = w.clone();
        let (u, dead) = inverse_hessian_factor(&h, cols, 0.01).unwrap();
        let bad = vec![0usize; cols];
        assert!(gptq_quantize_in_order(
            QuantType::Q4_0,
            &mut w4,
            cols,
            &u,
            &dead,
            Some(&bad),
            None,
            &GptqOptions::default()
        )
        .is_err());
    }

    #[test]
    fn dead_channels_and_bad_inputs() {
        let (rows, cols, n) = (8, 64, 100);
        let (w, mut x) = layer(rows, cols, n);
        for t in 0..n {
            x[t * cols + 5] = 0.0; // a channel no input ever reaches
        }
        let h = hessian(&x, cols);
        let (u, dead) = inverse_hessian_factor(&h, cols, 0.01).unwrap();
        assert!(dead[5] && dead.iter().filter(|d| **d).count() == 1);
        let mut wq = w.clone();
        let bytes = gptq_quantize(
            QuantType::Q4_0,
            &mut wq,
            cols,
            &u,
            &dead,
            None,
            &GptqOptions::default(),
        )
        .unwrap();
        let back = dequantized(QuantType::Q4_0.ggml(), &bytes, rows, cols);
        assert!(back.iter().all(|v| v.is_finite()));
        // All inputs zero: every channel dead, still a valid (identity) factor.
        let zero = vec![0f64; cols * cols];
        assert!(inverse_hessian_factor(&zero, cols, 0.01).is_ok());
        // A NaN in the activations is a clear error.
        let mut bad = h.clone();
        bad[3] = f64::NAN;
        let e = inverse_hessian_factor(&bad, cols, 0.01)
            .unwrap_err()
            .to_string();
        assert!(e.contains("non-finite"), "{e}");
        // Rows that do not fill whole blocks are refused.
        let mut short = vec![0f32; 48];
        assert!(gptq_quantize(
            QuantType::Q4_0,
            &mut short,
            48,
            &u,
            &dead,
            None,
            &GptqOptions::default()
        )
        .is_err());
    }
}
