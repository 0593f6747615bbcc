//! What the benchmark binaries share: the allocator settings of the `smelt` binary and a
//! peak-memory reading.

/// mimalloc (v3, as libmimalloc-sys builds it) options by their position in `mi_option_e`,
/// set as the `smelt` binary sets them: no large OS pages, no transparent huge pages, freed
/// memory kept mapped.
pub fn keep_freed_memory() {
    // SAFETY: setting allocator options is a plain store inside mimalloc, done at start-up.
    unsafe {
        libmimalloc_sys::mi_option_set(6, 0); // mi_option_allow_large_os_pages
        libmimalloc_sys::mi_option_set(43, 0); // mi_option_allow_thp
        libmimalloc_sys::mi_option_set(15, -1); // mi_option_purge_delay
    }
}

/// Peak resident memory of this process in MB (`VmHWM`), 0 where /proc is not available.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
