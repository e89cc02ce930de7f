//! How each format lays out a layer's bits: the readers that unpack compressed-tensors,
//! GPTQ and AWQ tensors into an [`IntLinear`].

use super::{IntLinear, IntScheme, Stored, StoredDType};
use crate::error::{tensor_err, Result};
use half::{bf16, f16};
use std::path::Path;

/// Little-endian words of an I32 tensor, checked to hold `n` of them.
fn words(name: &str, t: &Stored, n: usize) -> Result<Vec<u32>> {
    if t.dtype != StoredDType::I32 {
        return Err(tensor_err(
            t.path,
            name,
            format!("dtype {:?}, expected I32 (packed integers)", t.dtype),
        ));
    }
    if t.data.len() != n.saturating_mul(4) {
        return Err(tensor_err(
            t.path,
            name,
            format!(
                "shape {:?} does not hold the {n} packed words the layer needs",
                t.shape
            ),
        ));
    }
    Ok(t.data
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// A float tensor (scales) as f32, checked to hold `n` values.
fn floats(name: &str, t: &Stored, n: usize) -> Result<Vec<f32>> {
    let size = t.dtype.size();
    if t.data.len() != n.saturating_mul(size) {
        return Err(tensor_err(
            t.path,
            name,
            format!(
                "shape {:?} does not hold the {n} values the layer needs",
                t.shape
            ),
        ));
    }
    let v: Vec<f32> = match t.dtype {
        StoredDType::F32 => t
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        StoredDType::F16 => t
            .data
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        StoredDType::BF16 => t
            .data
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        d => {
            return Err(tensor_err(
                t.path,
                name,
                format!("dtype {d:?}, expected a float type"),
            ))
        }
    };
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(tensor_err(t.path, name, format!("value {i} is not finite")));
    }
    Ok(v)
}

/// Integers of an I8/I32/I64 tensor, checked to hold `n`.
fn ints(name: &str, t: &Stored, n: usize) -> Result<Vec<i64>> {
    let size = t.dtype.size();
    if t.data.len() != n.saturating_mul(size) {
        return Err(tensor_err(
            t.path,
            name,
            format!(
                "shape {:?} does not hold the {n} values the layer needs",
                t.shape
            ),
        ));
    }
    Ok(match t.dtype {
        StoredDType::I8 => t.data.iter().map(|&b| i64::from(b as i8)).collect(),
        StoredDType::I32 => t
            .data
            .chunks_exact(4)
            .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        StoredDType::I64 => t
            .data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect(),
        d => {
            return Err(tensor_err(
                t.path,
                name,
                format!("dtype {d:?}, expected an integer type"),
            ))
        }
    })
}

pub(super) fn read_shape(name: &str, t: &Stored) -> Result<[usize; 2]> {
    let v = ints(name, t, 2)?;
    let ok = |x: i64| usize::try_from(x).ok().filter(|&x| x > 0 && x <= 1 << 24);
    match (ok(v[0]), ok(v[1])) {
        (Some(r), Some(c)) => Ok([r, c]),
        _ => Err(tensor_err(
            t.path,
            name,
            format!("{v:?} is not a plausible [out, in] shape"),
        )),
    }
}

/// Element i of a row packed densely at bit i·bits (compressed-tensors' `pack_to_int32`).
fn dense_level(row: &[u32], i: usize, bits: u32) -> u8 {
    let p = i * bits as usize;
    let (w, off) = (p / 32, (p % 32) as u32);
    let mut v = u64::from(row[w]) >> off;
    if off + bits > 32 {
        v |= u64::from(row.get(w + 1).copied().unwrap_or(0)) << (32 - off);
    }
    (v & ((1u64 << bits) - 1)) as u8
}

/// Columns per group and the group of each column, from a scheme (no act-order).
fn groups_for(
    path: &Path,
    name: &str,
    scheme: &IntScheme,
    cols: usize,
) -> Result<(usize, Vec<u32>)> {
    match scheme.group_size {
        None => Ok((1, vec![0; cols])),
        Some(g) => {
            if !cols.is_multiple_of(g) {
                return Err(tensor_err(
                    path,
                    name,
                    format!("{cols} columns are not a multiple of group_size {g}"),
                ));
            }
            Ok((cols / g, (0..cols).map(|c| (c / g) as u32).collect()))
        }
    }
}

/// Reads a `g_idx` tensor: the group of each column, each below `groups`.
fn read_g_idx(name: &str, t: &Stored, cols: usize, groups: usize) -> Result<Vec<u32>> {
    let v = ints(name, t, cols)?;
    v.iter()
        .enumerate()
        .map(|(c, &g)| {
            u32::try_from(g)
                .ok()
                .filter(|&g| (g as usize) < groups)
                .ok_or_else(|| {
                    tensor_err(
                        t.path,
                        name,
                        format!("column {c} names group {g}, outside 0..{groups}"),
                    )
                })
        })
        .collect()
}

fn check_scale_shape(name: &str, t: &Stored, want: &[usize]) -> Result<()> {
    let numel: usize = t.shape.iter().product();
    let want_n: usize = want.iter().product();
    if numel != want_n {
        return Err(tensor_err(
            t.path,
            name,
            format!(
                "shape {:?} does not match the layer (expected {want:?})",
                t.shape
            ),
        ));
    }
    Ok(())
}

/// Signed `bits`-bit integers (compressed-tensors' levels and zero points) → unsigned levels
/// (+2^(bits−1)), refusing any outside the range.
fn unsigned_levels(
    t: &Stored,
    name: &str,
    what: &str,
    signed: &[i64],
    bits: u32,
) -> Result<Vec<u8>> {
    let mid = 1i64 << (bits - 1);
    signed
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            if x < -mid || x >= mid {
                Err(tensor_err(
                    t.path,
                    name,
                    format!("{what} {i} = {x} is outside the {bits}-bit range"),
                ))
            } else {
                Ok((x + mid) as u8)
            }
        })
        .collect()
}

/// Unsigned levels of `rows` rows of `cols` → compressed-tensors' dense packing, as
/// little-endian bytes: level i of a row at bit i·bits (`pack_to_int32`; the inverse of
/// [`dense_level`]). The exporter writes with it.
pub fn pack_levels(levels: &[u8], rows: usize, cols: usize, bits: usize) -> Vec<u8> {
    let per_row = (cols * bits).div_ceil(32);
    let mut out = Vec::with_capacity(rows * per_row * 4);
    for row in levels.chunks_exact(cols).take(rows) {
        let mut words = vec![0u32; per_row];
        for (i, &v) in row.iter().enumerate() {
            let p = i * bits;
            words[p / 32] |= u32::from(v) << (p % 32);
            if p % 32 + bits > 32 {
                words[p / 32 + 1] |= u32::from(v) >> (32 - p % 32);
            }
        }
        out.extend(words.iter().flat_map(|w| w.to_le_bytes()));
    }
    out
}

/// A compressed-tensors layer (pack-quantized or int-quantized).
pub(super) fn ct_layer(
    scheme: &IntScheme,
    [rows, cols]: [usize; 2],
    (wn, w): (&str, &Stored),
    (sn, scale): (&str, &Stored),
    zp: Option<(&str, &Stored)>,
    gidx: Option<(&str, &Stored)>,
    packed: bool,
) -> Result<IntLinear> {
    let bits = scheme.bits;
    let mid = 1i64 << (bits - 1);
    // The levels, unsigned, row-major.
    let q: Vec<u8> = if packed {
        let per_row = (cols * bits as usize).div_ceil(32);
        let n = rows
            .checked_mul(per_row)
            .ok_or_else(|| tensor_err(w.path, wn, "shape overflows"))?;
        if w.shape != [rows, per_row] {
            return Err(tensor_err(
                w.path,
                wn,
                format!(
                    "shape {:?} does not hold [{rows}, {cols}] weights at {bits} bits (expected [{rows}, {per_row}])",
                    w.shape
                ),
            ));
        }
        let ws = words(wn, w, n)?;
        let mut q = Vec::with_capacity(rows * cols);
        for row in ws.chunks_exact(per_row) {
            q.extend((0..cols).map(|i| dense_level(row, i, bits)));
        }
        q
    } else {
        if w.shape != [rows, cols] {
            return Err(tensor_err(
                w.path,
                wn,
                format!("shape {:?} is not [{rows}, {cols}]", w.shape),
            ));
        }
        let v = ints(wn, w, rows * cols)?;
        unsigned_levels(w, wn, "element", &v, bits)?
    };
    let (groups, mut group_of_col) = match scheme.group_size {
        Some(g) if scheme.act_order || gidx.is_some() => {
            // Groups in activation order: the number of groups is still cols / g.
            let groups = cols.div_ceil(g);
            (groups, Vec::new())
        }
        _ => groups_for(w.path, wn, scheme, cols)?,
    };
    if let Some((gn, g)) = gidx {
        group_of_col = read_g_idx(gn, g, cols, groups)?;
    } else if group_of_col.is_empty() {
        return Err(tensor_err(
            w.path,
            wn,
            "act-order layer without weight_g_idx",
        ));
    }
    // Scales: [rows, groups]; a tensor strategy stores one.
    let scales = if scale.shape.iter().product::<usize>() == 1 && groups == 1 {
        vec![floats(sn, scale, 1)?[0]; rows]
    } else {
        check_scale_shape(sn, scale, &[rows, groups])?;
        floats(sn, scale, rows * groups)?
    };
    let zero: Vec<u8> = match (scheme.symmetric, zp) {
        (true, _) => vec![mid as u8; rows * groups],
        (false, None) => {
            return Err(tensor_err(
                scale.path,
                sn,
                "asymmetric scheme but no weight_zero_point",
            ))
        }
        (false, Some((zn, z))) => {
            let signed: Vec<i64> = if z.dtype == StoredDType::I32 && packed {
                // Packed along the output dimension: [ceil(rows·bits/32), groups].
                let per_col = (rows * bits as usize).div_ceil(32);
                if z.shape != [per_col, groups] {
                    return Err(tensor_err(
                        z.path,
                        zn,
                        format!(
                            "shape {:?} is not the packed [{per_col}, {groups}]",
                            z.shape
                        ),
                    ));
                }
                let ws = words(zn, z, per_col * groups)?;
                // Column g of the packed matrix holds the zeros of group g for every row.
                let mut out = vec![0i64; rows * groups];
                let mut col = vec![0u32; per_col];
                for g in 0..groups {
                    for (k, c) in col.iter_mut().enumerate() {
                        *c = ws[k * groups + g];
                    }
                    for r in 0..rows {
                        out[r * groups + g] = i64::from(dense_level(&col, r, bits)) - mid;
                    }
                }
                out
            } else if z.shape.iter().product::<usize>() == 1 && groups == 1 {
                vec![ints(zn, z, 1)?[0]; rows]
            } else {
                check_scale_shape(zn, z, &[rows, groups])?;
                ints(zn, z, rows * groups)?
            };
            unsigned_levels(z, zn, "zero point", &signed, bits)?
        }
    };
    Ok(IntLinear {
        rows,
        cols,
        bits,
        groups,
        q,
        scale: scales,
        zero,
        group_of_col,
    })
}

/// The two dimensions of a GPTQ/AWQ `qweight`, once it and its scales are known to be 2-D.
fn matrix_dims((qn, qw): (&str, &Stored), sc: &Stored) -> Result<[usize; 2]> {
    match (qw.shape, sc.shape.len()) {
        (&[a, b], 2) => Ok([a, b]),
        _ => Err(tensor_err(
            qw.path,
            qn,
            format!("shape {:?} (scales {:?}) is not 2-D", qw.shape, sc.shape),
        )),
    }
}

/// The parts GPTQ and AWQ layers share, checked against each other before anything is
/// sized by them: the packed weight words (`qweight`, `n` words), the packed zeros
/// (`qzeros` [groups, `zpacked`]), and the scales [groups, `rows`], the group count agreeing
/// with the scheme's group size over `cols` columns.
fn packed_parts(
    scheme: &IntScheme,
    (qn, qw, n): (&str, &Stored, usize),
    (zn, qz, zpacked): (&str, &Stored, usize),
    (sn, sc): (&str, &Stored),
    rows: usize,
    cols: usize,
) -> Result<PackedParts> {
    let groups = sc.shape[0];
    if sc.shape[1] != rows {
        return Err(tensor_err(
            sc.path,
            sn,
            format!(
                "shape {:?} does not match qweight {:?} ({rows} outputs)",
                sc.shape, qw.shape
            ),
        ));
    }
    let want = scheme.group_size.map_or(1, |g| cols.div_ceil(g));
    if groups != want {
        return Err(tensor_err(
            sc.path,
            sn,
            format!(
                "{groups} groups, but {cols} columns at {} make {want}",
                scheme
                    .group_size
                    .map_or("one scale per channel".to_string(), |g| format!(
                        "group_size {g}"
                    ))
            ),
        ));
    }
    if qz.shape != [groups, zpacked] {
        return Err(tensor_err(
            qz.path,
            zn,
            format!("shape {:?} is not [{groups}, {zpacked}]", qz.shape),
        ));
    }
    Ok(PackedParts {
        weights: words(qn, qw, n)?,
        zeros: words(zn, qz, groups * zpacked)?,
        scales: floats(sn, sc, groups * rows)?,
        groups,
    })
}

/// What [`packed_parts`] read: packed weight and zero words, scales [groups, rows].
struct PackedParts {
    weights: Vec<u32>,
    zeros: Vec<u32>,
    scales: Vec<f32>,
    groups: usize,
}

/// A GPTQ (AutoGPTQ / GPTQModel) layer: `qweight` [in·bits/32, out] packed along the input,
/// `qzeros` [groups, out·bits/32] packed along the output, `scales` [groups, out], `g_idx` [in].
pub(super) fn gptq_layer(
    scheme: &IntScheme,
    (qn, qw): (&str, &Stored),
    (zn, qz): (&str, &Stored),
    (sn, sc): (&str, &Stored),
    g_idx: Option<(&str, &Stored)>,
    zero_minus_one: bool,
) -> Result<IntLinear> {
    let bits = scheme.bits as usize;
    let per = 32 / bits;
    let [packed_in, rows] = matrix_dims((qn, qw), sc)?;
    let cols = packed_in * per;
    let zpacked = rows.div_ceil(per);
    let PackedParts {
        weights: ws,
        zeros: zs,
        scales: scales_t,
        groups,
    } = packed_parts(
        scheme,
        (qn, qw, packed_in * rows),
        (zn, qz, zpacked),
        (sn, sc),
        rows,
        cols,
    )?;
    let mask = (1u32 << bits) - 1;
    let mut q = vec![0u8; rows * cols];
    for pi in 0..packed_in {
        for r in 0..rows {
            let w = ws[pi * rows + r];
            for j in 0..per {
                q[r * cols + pi * per + j] = ((w >> (j * bits)) & mask) as u8;
            }
        }
    }
    let mut scale = vec![0f32; rows * groups];
    let mut zero = vec![0u8; rows * groups];
    for g in 0..groups {
        for r in 0..rows {
            scale[r * groups + g] = scales_t[g * rows + r];
            let z = (zs[g * zpacked + r / per] >> ((r % per) * bits)) & mask;
            // AutoGPTQ's v1 layout stores zero − 1 and its kernels add the 1 back, so a
            // stored 15 is a zero of 16 there; tandem computes what those kernels compute.
            let z = if zero_minus_one { z + 1 } else { z };
            zero[r * groups + g] = z as u8;
        }
    }
    let group_of_col = match g_idx {
        Some((gn, g)) => read_g_idx(gn, g, cols, groups)?,
        None => match scheme.group_size {
            Some(gs) => (0..cols).map(|c| (c / gs) as u32).collect(),
            None => vec![0; cols],
        },
    };
    Ok(IntLinear {
        rows,
        cols,
        bits: scheme.bits,
        groups,
        q,
        scale,
        zero,
        group_of_col,
    })
}

/// AutoAWQ's GEMM order of the eight 4-bit outputs inside a packed word: nibble i holds
/// output `AWQ_ORDER[i]` of its eight.
pub(super) const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// An AWQ GEMM layer: `qweight` [in, out/8], `qzeros` [groups, out/8] (both packed along the
/// output in AWQ's order), `scales` [groups, out].
pub(super) fn awq_layer(
    scheme: &IntScheme,
    (qn, qw): (&str, &Stored),
    (zn, qz): (&str, &Stored),
    (sn, sc): (&str, &Stored),
) -> Result<IntLinear> {
    let [cols, packed_out] = matrix_dims((qn, qw), sc)?;
    let rows = packed_out * 8;
    let gs = scheme.group_size.unwrap_or(cols);
    let PackedParts {
        weights: ws,
        zeros: zs,
        scales: scales_t,
        groups,
    } = packed_parts(
        scheme,
        (qn, qw, cols * packed_out),
        (zn, qz, packed_out),
        (sn, sc),
        rows,
        cols,
    )?;
    let mut q = vec![0u8; rows * cols];
    for c in 0..cols {
        for k in 0..packed_out {
            let w = ws[c * packed_out + k];
            for (i, &o) in AWQ_ORDER.iter().enumerate() {
                q[(k * 8 + o) * cols + c] = ((w >> (4 * i)) & 15) as u8;
            }
        }
    }
    let mut scale = vec![0f32; rows * groups];
    let mut zero = vec![8u8; rows * groups];
    for g in 0..groups {
        for k in 0..packed_out {
            let w = zs[g * packed_out + k];
            for (i, &o) in AWQ_ORDER.iter().enumerate() {
                let r = k * 8 + o;
                scale[r * groups + g] = scales_t[g * rows + r];
                if !scheme.symmetric {
                    zero[r * groups + g] = ((w >> (4 * i)) & 15) as u8;
                }
            }
        }
    }
    Ok(IntLinear {
        rows,
        cols,
        bits: 4,
        groups,
        q,
        scale,
        zero,
        group_of_col: (0..cols).map(|c| (c / gs) as u32).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_packing_round_trips_at_every_width() {
        for bits in 2..=8u32 {
            let levels: Vec<u8> = (0..100)
                .map(|i| ((i * 7 + 3) % (1 << bits)) as u8)
                .collect();
            let packed: Vec<u32> = pack_levels(&levels, 1, levels.len(), bits as usize)
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            // Widths that do not divide 32 split a level across two words.
            let back: Vec<u8> = (0..levels.len())
                .map(|i| dense_level(&packed, i, bits))
                .collect();
            assert_eq!(back, levels, "bits {bits}");
        }
    }

    #[test]
    fn g_idx_out_of_range_and_short_tensors_are_errors_naming_the_tensor() {
        let p = Path::new("m.safetensors");
        let g = [0i32, 1, 2, 9];
        let gb: Vec<u8> = g.iter().flat_map(|x| x.to_le_bytes()).collect();
        let t = Stored {
            dtype: StoredDType::I32,
            shape: &[4],
            data: &gb,
            path: p,
        };
        let e = read_g_idx("x.g_idx", &t, 4, 3).unwrap_err().to_string();
        assert!(
            e.contains("x.g_idx") && e.contains("column 3 names group 9"),
            "{e}"
        );
        let e = words("x.qweight", &t, 5).unwrap_err().to_string();
        assert!(e.contains("x.qweight") && e.contains("packed words"), "{e}");
    }
}
