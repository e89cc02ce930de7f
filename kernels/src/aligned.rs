//! A growable f32 buffer whose first element sits on a 64-byte boundary.

/// Sixteen floats on a 64-byte boundary: the unit an [`AlignedBuf`] allocates in.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// The activation rows the matmul kernels read, starting on a cache line.
///
/// Why: the AVX-512 F16 kernel loads 16 activation floats (64 bytes) per row and step, and a
/// load that starts off a 64-byte boundary touches two cache lines. `Vec<f32>`'s allocations
/// come from the system allocator, 16-byte aligned (a large one sits 16 bytes past a page),
/// so every such load split. One core, m = 512, k = 576, n = 1536 (the `f16_hot` timing
/// in BENCHMARKS.md, session 21): 61.9 GMAC/s with the rows on a line against 51.2 with
/// them 16 bytes off; m = 8: 69.4 against 58.3. No crate in the workspace's dependencies
/// offers an aligned growable buffer of f32 (`aligned-vec` would be one more dependency for
/// these few lines).
#[derive(Default, Clone)]
pub struct AlignedBuf {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedBuf {
    /// As `Vec::resize`: new elements are `value`, a shorter length drops the rest.
    pub fn resize(&mut self, len: usize, value: f32) {
        let old = self.len;
        self.lines.resize(len.div_ceil(16), Line([value; 16]));
        self.len = len;
        if len > old {
            self[old..].fill(value);
        }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        // SAFETY: `Line` is `repr(C)` over `[f32; 16]` (64 bytes, no padding), so `lines`
        // holds `lines.len() * 16 >= len` initialized, contiguous floats; an empty `Vec`'s
        // pointer is dangling but aligned and non-null, valid for a slice of length 0.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<f32>(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in `deref`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<f32>(), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::AlignedBuf;

    #[test]
    fn resizes_like_a_vec_and_starts_on_a_line() {
        let mut a = AlignedBuf::default();
        let mut v: Vec<f32> = Vec::new();
        assert!(a.is_empty());
        for (len, value) in [
            (5, 1.0),
            (37, 2.0),
            (16, 3.0),
            (0, 4.0),
            (100, 5.0),
            (3, 6.0),
            (64, 7.0),
        ] {
            a.resize(len, value);
            v.resize(len, value);
            assert_eq!(&a[..], &v[..], "len {len}");
            if len > 0 {
                assert_eq!(a.as_ptr() as usize % 64, 0);
            }
            // Writes go where reads find them.
            for (i, x) in a.iter_mut().enumerate() {
                *x = i as f32;
            }
            v.iter_mut().enumerate().for_each(|(i, x)| *x = i as f32);
        }
    }
}
