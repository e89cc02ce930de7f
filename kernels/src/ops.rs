//! The small per-token operations of a Llama layer on plain f32 slices: RMSNorm, rotate-half
//! RoPE, SiLU·up, residual add.
//!
//! Why not candle's: each candle op allocates its output tensor and may hand its loop to
//! rayon, which wakes a parked thread (~10 µs) and then competes with the kernel pool's
//! spinning workers. On a decode step these ops touch a few KB each, so a plain loop on the
//! calling thread, writing into a reused buffer, is the fast way. Plain loops vectorize well
//! enough here; the f64 definitions in the tests are the references.

/// Runs `$body` compiled for AVX2/FMA when the CPU has them (the plain loops then vectorize
/// 8 wide), else as is. Rust never contracts a multiply and an add into an FMA on its own,
/// so both versions compute the same values.
macro_rules! avx2_or_plain {
    ($name:ident ( $($arg:ident : $ty:ty),* ) $body:block) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn $name($($arg: $ty),*) $body
            if crate::has_avx2_fma() {
                // SAFETY: the CPU has AVX2 and FMA (checked above).
                return unsafe { $name($($arg),*) };
            }
        }
        #[allow(unreachable_code)]
        $body
    }};
}

/// `out[r] = x[r] / sqrt(mean(x[r]²) + eps) · w` for each row r of length `w.len()`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    avx2_or_plain!(rms_norm_avx2(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        rms_norm_body(x, w, eps, out)
    })
}

#[inline(always)]
fn rms_norm_body(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    assert_eq!(x.len(), out.len());
    assert!(d > 0 && x.len().is_multiple_of(d));
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ss: f32 = xr.iter().map(|v| v * v).sum();
        let inv = 1.0 / (ss / d as f32 + eps).sqrt();
        for ((o, v), g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * inv * g;
        }
    }
}

/// Rotate-half RoPE in place on `x` = [rows, heads, head_dim], where row r uses
/// `cos[r]`/`sin[r]` (each `head_dim / 2` long, concatenated per row):
/// `(a, b) → (a·cos − b·sin, b·cos + a·sin)` for a = x[i], b = x[i + head_dim/2].
pub fn rope_rotate_half(x: &mut [f32], heads: usize, head_dim: usize, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    assert!(head_dim.is_multiple_of(2));
    let rows = x.len() / (heads * head_dim);
    assert_eq!(x.len(), rows * heads * head_dim);
    assert!(cos.len() == rows * half && sin.len() == rows * half);
    for (r, xr) in x.chunks_exact_mut(heads * head_dim).enumerate() {
        let (c, s) = (&cos[r * half..][..half], &sin[r * half..][..half]);
        for xh in xr.chunks_exact_mut(head_dim) {
            let (a, b) = xh.split_at_mut(half);
            for i in 0..half {
                let (av, bv) = (a[i], b[i]);
                a[i] = av * c[i] - bv * s[i];
                b[i] = bv * c[i] + av * s[i];
            }
        }
    }
}

/// `gate[i] = silu(gate[i]) · up[i]`, in place (the SwiGLU activation).
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    avx2_or_plain!(silu_mul_avx2(gate: &mut [f32], up: &[f32]) {
        silu_mul_body(gate, up)
    })
}

#[inline(always)]
fn silu_mul_body(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// `acc[i] += x[i]` (the residual connection).
pub fn add_assign(acc: &mut [f32], x: &[f32]) {
    assert_eq!(acc.len(), x.len());
    for (a, v) in acc.iter_mut().zip(x) {
        *a += v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn close(a: &[f32], b: &[f64]) {
        for (i, (p, q)) in a.iter().zip(b).enumerate() {
            assert!(
                (*p as f64 - q).abs() <= 1e-5 * (1.0 + q.abs()),
                "elem {i}: {p} vs {q}"
            );
        }
    }

    #[test]
    fn rms_norm_matches_definition() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for d in [1, 7, 64, 576] {
            let rows = 3;
            let x: Vec<f32> = (0..rows * d).map(|_| rng.random_range(-3.0..3.0)).collect();
            let w: Vec<f32> = (0..d).map(|_| rng.random_range(0.5..1.5)).collect();
            let mut out = vec![0f32; rows * d];
            rms_norm(&x, &w, 1e-5, &mut out);
            let want: Vec<f64> = x
                .chunks(d)
                .flat_map(|r| {
                    let ms = r.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / d as f64;
                    let inv = 1.0 / (ms + 1e-5).sqrt();
                    r.iter()
                        .zip(&w)
                        .map(move |(v, g)| *v as f64 * inv * *g as f64)
                        .collect::<Vec<_>>()
                })
                .collect();
            close(&out, &want);
        }
    }

    #[test]
    fn rope_rotates_each_pair_by_its_angle() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let (rows, heads, hd) = (3, 2, 8);
        let x: Vec<f32> = (0..rows * heads * hd)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let ang: Vec<f64> = (0..rows * hd / 2)
            .map(|_| rng.random_range(-3.0..3.0))
            .collect();
        let cos: Vec<f32> = ang.iter().map(|a| a.cos() as f32).collect();
        let sin: Vec<f32> = ang.iter().map(|a| a.sin() as f32).collect();
        let mut y = x.clone();
        rope_rotate_half(&mut y, heads, hd, &cos, &sin);
        let mut want = vec![0f64; x.len()];
        for r in 0..rows {
            for h in 0..heads {
                for i in 0..hd / 2 {
                    let base = (r * heads + h) * hd;
                    let (a, b) = (x[base + i] as f64, x[base + i + hd / 2] as f64);
                    let t = ang[r * hd / 2 + i];
                    want[base + i] = a * t.cos() - b * t.sin();
                    want[base + i + hd / 2] = b * t.cos() + a * t.sin();
                }
            }
        }
        close(&y, &want);
    }

    #[test]
    fn silu_mul_and_add() {
        let mut g = vec![-2.0f32, 0.0, 1.5];
        silu_mul(&mut g, &[2.0, 3.0, -1.0]);
        let want: Vec<f64> = [(-2.0f64, 2.0), (0.0, 3.0), (1.5, -1.0)]
            .iter()
            .map(|(a, u)| a / (1.0 + (-a).exp()) * u)
            .collect();
        close(&g, &want);
        let mut acc = vec![1.0f32, 2.0];
        add_assign(&mut acc, &[0.5, -2.0]);
        assert_eq!(acc, vec![1.5, 0.0]);
    }
}
