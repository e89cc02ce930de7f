//! Weights on 2 MiB pages: after a model is loaded, the memory its weights sit in is
//! collapsed into transparent huge pages (`madvise(MADV_COLLAPSE)`, Linux 6.1 and later).
//!
//! Why: decoding streams every weight once per token, and on 4 KiB pages a 270 MB F16 model
//! is 66,000 pages, each a TLB miss and a page walk while the kernels read it. Most
//! distributions leave transparent huge pages to `madvise` (this machine's
//! `/sys/kernel/mm/transparent_hugepage/enabled` reads `[madvise]`), so a process that does
//! not ask gets 4 KiB pages. The `stream` example (SmolLM2's F16 matmuls from DRAM, 2 threads,
//! three alternations on a Zen 4) read 7.0–8.6 ms per 1-row pass on huge pages against
//! 8.7–9.0 on 4 KiB ones (BENCHMARKS.md, session 59). No crate does this; it is one system
//! call per 2 MiB.
//!
//! Collapsing copies each 2 MiB range into a huge page with the same contents: nothing the
//! program sees changes, and where the kernel cannot (the range crosses the edge of a
//! mapping, no huge page is free, an older kernel, THP turned off) the call fails and the
//! range stays on small pages. `TANDEM_NO_HUGE_PAGES` set skips it (for comparisons).

/// The huge page size on x86-64 and most arm64 kernels.
pub const HUGE_PAGE: usize = 2 << 20;

/// Asks the kernel to back the 2 MiB-aligned ranges that overlap `ranges` (start address,
/// length in bytes) with huge pages. Returns the bytes now on huge pages by these calls (0
/// where the system does not support it). Ranges less than a huge page apart are taken as one
/// span (a model's matrices, allocated one after another, mostly lie side by side, and most
/// are under 2 MiB each: SmolLM2's q/k/v is 1.1 MB at F16); a span under one huge page is left
/// out, since collapsing the pages around a small buffer would mostly move other memory.
pub fn back_with_huge_pages(ranges: &[(usize, usize)]) -> usize {
    if std::env::var_os("TANDEM_NO_HUGE_PAGES").is_some() {
        return 0;
    }
    let mut sorted: Vec<(usize, usize)> = ranges
        .iter()
        .filter(|r| r.1 > 0)
        .map(|&(a, len)| (a, a.saturating_add(len)))
        .collect();
    sorted.sort_unstable();
    let mut spans: Vec<(usize, usize)> = Vec::new();
    for (a, b) in sorted {
        match spans.last_mut() {
            Some(last) if a <= last.1.saturating_add(HUGE_PAGE) => last.1 = last.1.max(b),
            _ => spans.push((a, b)),
        }
    }
    spans
        .into_iter()
        .filter(|&(a, b)| b - a >= HUGE_PAGE)
        .flat_map(|(a, b)| a / HUGE_PAGE..b.div_ceil(HUGE_PAGE))
        .filter(|&c| collapse(c * HUGE_PAGE))
        .count()
        * HUGE_PAGE
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn collapse(addr: usize) -> bool {
    // SAFETY: MADV_COLLAPSE changes only how the range is backed, never its contents or
    // mapping: on success the same bytes sit in a huge page, on any failure (unmapped or
    // not anonymous memory, a range across two mappings, no free huge page) nothing changes
    // and the call returns −1. The address is 2 MiB-aligned, as madvise requires.
    unsafe { libc::madvise(addr as *mut libc::c_void, HUGE_PAGE, libc::MADV_COLLAPSE) == 0 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn collapse(_addr: usize) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contents_survive_and_small_buffers_are_left_alone() {
        let big: Vec<u32> = (0..(3 * HUGE_PAGE / 4) as u32).collect();
        let small = vec![7u8; 4096];
        let ranges = [
            (big.as_ptr() as usize, big.len() * 4),
            (small.as_ptr() as usize, small.len()),
        ];
        // Whether the kernel collapses depends on the system; what must hold is that the
        // data is untouched and only whole huge pages are counted.
        let backed = back_with_huge_pages(&ranges);
        assert_eq!(backed % HUGE_PAGE, 0);
        assert!(backed <= 8 * HUGE_PAGE);
        assert!(big.iter().enumerate().all(|(i, &v)| v == i as u32));
        assert!(small.iter().all(|&v| v == 7));
        assert_eq!(back_with_huge_pages(&ranges[1..]), 0);
    }
}
