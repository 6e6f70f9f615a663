//! Peak memory of a workload: the process's resident-set high-water mark.
//!
//! Linux keeps `VmHWM` ("high water mark", the largest `VmRSS` so far) in `/proc/self/status`.
//! Writing `5` to `/proc/self/clear_refs` resets it to the current resident set size (Linux
//! 4.0+, `Documentation/admin-guide/mm/soft-dirty.rst` / `proc.rst`). A workload's peak is then
//!
//! ```text
//! reset (clear_refs <- "5");  base = VmRSS;  run the workload;  peak = VmHWM
//! ```
//!
//! exactly as `bench/torch_reference.py` measures PyTorch: after the model, its inputs and the
//! optimizer are built, before the first warm-up step. (One difference: our AdamW allocates its
//! zero moments when it is built, PyTorch's at its first step, so `peak - base` counts the two
//! moments, 8 bytes per parameter, on PyTorch's side only.) `peak` therefore includes what was
//! resident before the workload (the weights, the inputs, and the runtime itself: for PyTorch
//! the Python interpreter and libtorch's pages); `peak - base` is what the workload added.
//! Because memory a workload freed may stay in the allocator (and so resident), one workload per
//! process gives the cleanest figure; `diffuse bench` runs each in a child process.
//!
//! Elsewhere than Linux (or where `/proc` is not readable) the figures are `None`.

use std::fs;

/// Resets the resident-set high-water mark to the current resident set size. Returns whether
/// the kernel accepted the reset (false: no `/proc/self/clear_refs`, or no permission).
pub fn reset_peak_rss() -> bool {
    fs::write("/proc/self/clear_refs", b"5").is_ok()
}

/// The resident-set high-water mark (`VmHWM`) in MiB, since process start or the last
/// [`reset_peak_rss`].
pub fn peak_rss_mib() -> Option<f64> {
    status_field_mib("VmHWM")
}

/// The current resident set size (`VmRSS`) in MiB.
pub fn rss_mib() -> Option<f64> {
    status_field_mib("VmRSS")
}

fn status_field_mib(key: &str) -> Option<f64> {
    let text = fs::read_to_string("/proc/self/status").ok()?;
    parse_status_kib(&text, key).map(|kib| kib as f64 / 1024.0)
}

/// The value in kB of `key` in `/proc/<pid>/status` text (lines like `VmHWM:   123456 kB`).
pub fn parse_status_kib(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        let mut parts = rest.split_whitespace();
        let value = parts.next()?.parse().ok()?;
        (parts.next() == Some("kB")).then_some(value)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_lines() {
        let text = "Name:\tdiffuse\nVmPeak:\t  900 kB\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(parse_status_kib(text, "VmHWM"), Some(20480));
        assert_eq!(parse_status_kib(text, "VmRSS"), Some(10240));
        assert_eq!(parse_status_kib(text, "VmSwap"), None);
        // A key that is only a prefix of another does not match it.
        assert_eq!(parse_status_kib("VmHWMx:\t1 kB\n", "VmHWM"), None);
        assert_eq!(parse_status_kib("VmHWM:\tlots kB\n", "VmHWM"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn high_water_mark_is_at_least_the_resident_set() {
        let (rss, hwm) = (rss_mib(), peak_rss_mib());
        if let (Some(rss), Some(hwm)) = (rss, hwm) {
            // VmHWM, read second, is the maximum of every VmRSS so far, including the first read.
            assert!(hwm >= rss, "hwm {hwm} rss {rss}");
        }
    }
}
