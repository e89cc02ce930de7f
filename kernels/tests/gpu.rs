//! GPU kernels against the CPU reference (feature `cuda`). Without a usable GPU every test
//! prints why it is skipped and passes: the workspace must test clean on CPU-only machines.
#![cfg(feature = "cuda")]

use half::f16;
use rand::{Rng, SeedableRng};
use tandem_kernels::cuda::{compile_ptx, gpu, Gpu, GpuError, GpuFormat, KvTable};
use tandem_kernels::{matmul_f16_reference, matmul_quant_reference, BlockFormat};

fn gpu_or_skip(test: &str) -> Option<&'static Gpu> {
    match gpu() {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!("{test}: skipped ({e})");
            None
        }
    }
}

fn random_blocks(f: BlockFormat, n_blocks: usize, rng: &mut impl Rng) -> Vec<u8> {
    let mut w: Vec<u8> = (0..n_blocks * f.block_bytes())
        .map(|_| rng.random())
        .collect();
    for b in w.chunks_exact_mut(f.block_bytes()) {
        let d = f16::from_f32(rng.random_range(0.001..0.05));
        b[..2].copy_from_slice(&d.to_le_bytes());
    }
    w
}

fn close(a: &[f32], b: &[f32], what: &str) {
    for (i, (p, q)) in a.iter().zip(b).enumerate() {
        assert!(
            (p - q).abs() <= 1e-3 * (1.0 + p.abs()),
            "{what} elem {i}: {p} vs {q}"
        );
    }
}

#[test]
fn quantized_matmul_matches_cpu_reference() {
    let Some(g) = gpu_or_skip("quantized_matmul_matches_cpu_reference") else {
        return;
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    for (f, gf) in [
        (BlockFormat::Q8_0, GpuFormat::Q8_0),
        (BlockFormat::Q4_0, GpuFormat::Q4_0),
    ] {
        for m in [1, 2, 5, 8, 9, 17] {
            for (k, n) in [(32, 1), (576, 70), (1536, 33), (2048, 300)] {
                let w = random_blocks(f, n * k / 32, &mut rng);
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
                let (mut want, mut got) = (vec![0f32; m * n], vec![0f32; m * n]);
                matmul_quant_reference(f, &x, &w, m, k, n, &mut want);
                let gm = g.upload(gf, &w, n, k).unwrap();
                g.matmul(&gm, &x, m, &mut got).unwrap();
                close(&want, &got, &format!("{f:?} m={m} k={k} n={n}"));
            }
        }
    }
}

#[test]
fn f16_matmul_matches_cpu_reference() {
    let Some(g) = gpu_or_skip("f16_matmul_matches_cpu_reference") else {
        return;
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(22);
    for m in [1, 3, 8, 9] {
        for (k, n) in [(1, 1), (17, 5), (576, 64), (1536, 129)] {
            let w: Vec<f16> = (0..n * k)
                .map(|_| f16::from_f32(rng.random_range(-0.5..0.5)))
                .collect();
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let (mut want, mut got) = (vec![0f32; m * n], vec![0f32; m * n]);
            matmul_f16_reference(&x, &w, m, k, n, &mut want);
            let bytes: Vec<u8> = w.iter().flat_map(|h| h.to_le_bytes()).collect();
            let gm = g.upload(GpuFormat::F16, &bytes, n, k).unwrap();
            g.matmul(&gm, &x, m, &mut got).unwrap();
            close(&want, &got, &format!("F16 m={m} k={k} n={n}"));
        }
    }
}

/// A row's result does not depend on how many rows share its launch (verification equals
/// decoding bit for bit), and activations that start off a 16-byte boundary (a view into a
/// larger buffer) take the kernels' scalar loads and give the same bits.
#[test]
fn matmul_rows_are_independent_of_m_and_alignment() {
    let Some(g) = gpu_or_skip("matmul_rows_are_independent_of_m_and_alignment") else {
        return;
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(23);
    let (k, n, m) = (1536, 77, 8);
    let halves: Vec<u8> = (0..n * k)
        .flat_map(|_| f16::from_f32(rng.random_range(-0.5..0.5)).to_le_bytes())
        .collect();
    for (gf, bytes) in [
        (
            GpuFormat::Q8_0,
            random_blocks(BlockFormat::Q8_0, n * k / 32, &mut rng),
        ),
        (
            GpuFormat::Q4_0,
            random_blocks(BlockFormat::Q4_0, n * k / 32, &mut rng),
        ),
        (GpuFormat::F16, halves),
    ] {
        let w = g.upload(gf, &bytes, n, k).unwrap();
        let x = random(m * k, &mut rng);
        let mut all = vec![0f32; m * n];
        g.matmul(&w, &x, m, &mut all).unwrap();
        for r in 0..m {
            let mut one = vec![0f32; n];
            g.matmul(&w, &x[r * k..(r + 1) * k], 1, &mut one).unwrap();
            assert_eq!(one, all[r * n..(r + 1) * n], "{gf:?} row {r}");
        }
        // The same rows one float into a buffer.
        let mut shifted = vec![0f32];
        shifted.extend(&x);
        let xd = g.to_device(&shifted).unwrap();
        let mut od = g.zeros(m * n).unwrap();
        g.matmul_on_device(&w, &xd.slice(1..), m, &mut od.slice_mut(..))
            .unwrap();
        let mut got = vec![0f32; m * n];
        g.read(&od.slice(..), &mut got).unwrap();
        assert_eq!(got, all, "{gf:?} unaligned activations");
    }
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let Some(g) = gpu_or_skip("bad_shapes_are_errors_not_panics") else {
        return;
    };
    assert!(g.upload(GpuFormat::Q8_0, &[0u8; 33], 1, 32).is_err());
    assert!(g.upload(GpuFormat::Q4_0, &[0u8; 18], 1, 31).is_err());
    let gm = g.upload(GpuFormat::Q8_0, &[0u8; 34], 1, 32).unwrap();
    let mut out = [0f32; 1];
    assert!(g.matmul(&gm, &[0.0; 31], 1, &mut out).is_err());
}

fn random(n: usize, rng: &mut impl Rng) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// RMSNorm, RoPE, SiLU·up and the adds on the GPU against the CPU functions (odd sizes).
#[test]
fn elementwise_ops_match_cpu() {
    let Some(g) = gpu_or_skip("elementwise_ops_match_cpu") else {
        return;
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(23);
    for (rows, d) in [(1, 576), (5, 576), (3, 17), (9, 1536)] {
        let (x, w) = (random(rows * d, &mut rng), random(d, &mut rng));
        let mut want = vec![0f32; rows * d];
        tandem_kernels::ops::rms_norm(&x, &w, 1e-5, &mut want);
        let (xd, wd) = (g.to_device(&x).unwrap(), g.to_device(&w).unwrap());
        let mut od = g.zeros(rows * d).unwrap();
        g.rms_norm(&xd.slice(..), &wd, 1e-5, &mut od.slice_mut(..), rows)
            .unwrap();
        let mut got = vec![0f32; rows * d];
        g.read(&od.slice(..), &mut got).unwrap();
        close(&want, &got, &format!("rms_norm {rows}x{d}"));

        // silu·up and add, over the same buffers
        let up = random(rows * d, &mut rng);
        let mut want = x.clone();
        tandem_kernels::ops::silu_mul(&mut want, &up);
        tandem_kernels::ops::add_assign(&mut want, &up);
        for row in want.chunks_exact_mut(d) {
            tandem_kernels::ops::add_assign(row, &w);
        }
        let mut xd = g.to_device(&x).unwrap();
        let upd = g.to_device(&up).unwrap();
        g.silu_mul(&mut xd.slice_mut(..), &upd.slice(..), rows * d)
            .unwrap();
        g.add_assign(&mut xd.slice_mut(..), &upd.slice(..), rows * d, rows * d)
            .unwrap();
        g.add_assign(&mut xd.slice_mut(..), &wd.slice(..), rows * d, d)
            .unwrap();
        g.read(&xd.slice(..), &mut got).unwrap();
        close(&want, &got, &format!("silu_mul/add {rows}x{d}"));

        // The residual add and the norm after it in one launch: the bits of the two launches.
        let res = random(rows * d, &mut rng);
        let resd = g.to_device(&res).unwrap();
        let (mut xa, mut xb) = (g.to_device(&x).unwrap(), g.to_device(&x).unwrap());
        let (mut oa, mut ob) = (g.zeros(rows * d).unwrap(), g.zeros(rows * d).unwrap());
        g.add_assign(&mut xa.slice_mut(..), &resd.slice(..), rows * d, rows * d)
            .unwrap();
        g.rms_norm(&xa.slice(..), &wd, 1e-5, &mut oa.slice_mut(..), rows)
            .unwrap();
        g.add_rms_norm(
            &mut xb.slice_mut(..),
            &resd.slice(..),
            &wd,
            1e-5,
            &mut ob.slice_mut(..),
            rows,
        )
        .unwrap();
        let read = |b: &tandem_kernels::cuda::CudaSlice<f32>| {
            let mut v = vec![0f32; rows * d];
            g.read(&b.slice(..), &mut v).unwrap();
            v
        };
        assert_eq!(read(&xa), read(&xb), "add_rms_norm's sum {rows}x{d}");
        assert_eq!(read(&oa), read(&ob), "add_rms_norm's norm {rows}x{d}");
    }
    // RoPE at scattered positions
    let (heads, hd, ctx) = (3, 64, 100);
    let half = hd / 2;
    let cos_t = random(ctx * half, &mut rng);
    let sin_t = random(ctx * half, &mut rng);
    let pos: Vec<i32> = vec![0, 7, 99, 42, 43];
    let x = random(pos.len() * heads * hd, &mut rng);
    let (mut c, mut s) = (Vec::new(), Vec::new());
    for &p in &pos {
        c.extend_from_slice(&cos_t[p as usize * half..][..half]);
        s.extend_from_slice(&sin_t[p as usize * half..][..half]);
    }
    let mut want = x.clone();
    tandem_kernels::ops::rope_rotate_half(&mut want, heads, hd, &c, &s);
    let mut xd = g.to_device(&x).unwrap();
    let (pd, cd, sd) = (
        g.to_device(&pos).unwrap(),
        g.to_device(&cos_t).unwrap(),
        g.to_device(&sin_t).unwrap(),
    );
    g.rope_rotate_half(
        &mut xd.slice_mut(..),
        &pd.slice(..),
        &cd,
        &sd,
        pos.len(),
        heads,
        hd,
    )
    .unwrap();
    let mut got = vec![0f32; x.len()];
    g.read(&xd.slice(..), &mut got).unwrap();
    close(&want, &got, "rope");
    // Queries and keys (other head counts) in one launch: the bits of one launch each.
    let kx = random(pos.len() * 2 * hd, &mut rng);
    let (mut qa, mut ka) = (g.to_device(&x).unwrap(), g.to_device(&kx).unwrap());
    g.rope_rotate_half_pair(
        &mut qa.slice_mut(..),
        &mut ka.slice_mut(..),
        &pd.slice(..),
        &cd,
        &sd,
        pos.len(),
        (heads, 2),
        hd,
    )
    .unwrap();
    g.read(&qa.slice(..), &mut got).unwrap();
    let mut single = vec![0f32; x.len()];
    g.read(&xd.slice(..), &mut single).unwrap();
    assert_eq!(got, single, "rope pair: queries");
    let mut kd = g.to_device(&kx).unwrap();
    g.rope_rotate_half(
        &mut kd.slice_mut(..),
        &pd.slice(..),
        &cd,
        &sd,
        pos.len(),
        2,
        hd,
    )
    .unwrap();
    let (mut k_pair, mut k_single) = (vec![0f32; kx.len()], vec![0f32; kx.len()]);
    g.read(&ka.slice(..), &mut k_pair).unwrap();
    g.read(&kd.slice(..), &mut k_single).unwrap();
    assert_eq!(k_pair, k_single, "rope pair: keys");
}

/// Appending to the cache and attending over it, against the CPU reference: decode (t = 1),
/// verification (t = 5) and prefill shapes, grouped-query heads, head sizes 8..128.
#[test]
fn attention_matches_cpu_reference() {
    let Some(g) = gpu_or_skip("attention_matches_cpu_reference") else {
        return;
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(24);
    for (t, n, nh, nkv, hd) in [
        (1, 0, 8, 4, 8),
        (1, 37, 9, 3, 64),
        (5, 100, 9, 3, 64),
        (17, 0, 4, 4, 128),
        (3, 250, 32, 8, 96),
        // Several tiles of 32 positions per warp, and a head size that is not a multiple of 4.
        (2, 1000, 9, 3, 64),
        (3, 700, 4, 2, 6),
    ] {
        let cap = n + t + 3;
        let s = tandem_kernels::AttentionShape {
            t,
            n,
            n_head: nh,
            n_kv_head: nkv,
            head_dim: hd,
            capacity: cap,
        };
        let q = random(t * nh * hd, &mut rng);
        let (new_k, new_v) = (
            random(t * nkv * hd, &mut rng),
            random(t * nkv * hd, &mut rng),
        );
        let (mut kc, mut vc) = (
            random(nkv * cap * hd, &mut rng),
            random(nkv * cap * hd, &mut rng),
        );
        let (mut kd, mut vd) = (g.to_device(&kc).unwrap(), g.to_device(&vc).unwrap());
        for i in 0..t {
            for h in 0..nkv {
                let (src, dst) = (((i * nkv) + h) * hd, (h * cap + n + i) * hd);
                kc[dst..dst + hd].copy_from_slice(&new_k[src..src + hd]);
                vc[dst..dst + hd].copy_from_slice(&new_v[src..src + hd]);
            }
        }
        let mut want = vec![0f32; t * nh * hd];
        tandem_kernels::attention_reference(s, &q, &kc, &vc, &mut want);
        let (nk, nv) = (g.to_device(&new_k).unwrap(), g.to_device(&new_v).unwrap());
        // The kernels find the caches, their length and capacity in a table on the GPU (here
        // the second sequence's, in slots 2 and 3).
        let ptrs = [0, 0, g.address(&kd), g.address(&vd)];
        let (ptrs, info) = (
            g.to_device(&ptrs).unwrap(),
            g.to_device(&[-1i32, -1, n as i32, cap as i32]).unwrap(),
        );
        let at = KvTable {
            ptrs: ptrs.slice(..),
            info: info.slice(..),
            seq: 1,
        };
        // SAFETY: the table holds kd's and vd's addresses in slots 2 and 3, and n and cap
        // for sequence 1 (written above, on the same stream).
        unsafe {
            g.kv_append(
                s,
                &at,
                (2, 3),
                &nk.slice(..),
                &nv.slice(..),
                &mut kd,
                &mut vd,
            )
        }
        .unwrap();
        let mut cached_v = vec![0f32; vc.len()];
        g.read(&vd.slice(..), &mut cached_v).unwrap();
        assert_eq!(cached_v, vc, "kv_append (values) t={t} n={n}");
        let mut cached = vec![0f32; kc.len()];
        g.read(&kd.slice(..), &mut cached).unwrap();
        assert_eq!(cached, kc, "kv_append t={t} n={n}");
        let qd = g.to_device(&q).unwrap();
        let mut od = g.zeros(want.len()).unwrap();
        // SAFETY: as for kv_append above.
        unsafe { g.attention(s, &at, 2, 3, &qd.slice(..), &kd, &vd, &mut od.slice_mut(..)) }
            .unwrap();
        let mut got = vec![0f32; want.len()];
        g.read(&od.slice(..), &mut got).unwrap();
        close(
            &want,
            &got,
            &format!("attention t={t} n={n} heads={nh}/{nkv} hd={hd}"),
        );
    }
}

/// The CUDA source compiles (needs libnvrtc only, no GPU; says so and passes when it is absent).
#[test]
fn kernels_compile_with_nvrtc() {
    match compile_ptx() {
        Ok(ptx) => {
            let src = ptx.to_src();
            for name in [
                "matmul_q8_0_1",
                "matmul_q8_0_8",
                "matmul_q4_0_1",
                "matmul_q4_0_8",
                "matmul_f16_1",
                "matmul_f16_8",
                "rms_norm",
                "add_rms_norm",
                "rope_rotate_half",
                "kv_append",
                "attention",
                "silu_mul",
                "add_assign",
            ] {
                assert!(src.contains(&format!(".entry {name}(")), "{name} missing");
            }
        }
        Err(GpuError::Unavailable(why)) => eprintln!("skipped: {why}"),
        Err(e) => panic!("{e}"),
    }
}
