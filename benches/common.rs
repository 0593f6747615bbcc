//! What the benchmark binaries share: the allocator settings of the `smelt` binary and a
//! peak-memory reading.

pub use smelt_tasks::allocator::keep_freed_memory;

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
