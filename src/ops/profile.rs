//! A per-op wall-clock profile of the network ops and the U-Net's pieces, off by default.
//!
//! Turned on by the environment variable `DIFFUSE_PROFILE` (any value but `0`) or by
//! [`set_enabled`]. Each instrumented piece opens a [`scope`] named after it (`"conv_block.fwd"`,
//! `"conv_block.bwd"`, `"unet.time_embedding"`, ...); when the scope ends its wall time is added to
//! a process-wide table, together with the floating-point operations the piece reported
//! ([`add_flops`]). Scopes may nest (a block's scope contains its ops' scopes): each entry is
//! inclusive. Off, a scope costs one relaxed atomic load.
//!
//! Timing is on the calling thread: the kernels parallelise inside, so an op's entry is its wall
//! time with all threads at work. Candle's own ops (an `add`, a `cat`, the zero-filled gradient
//! buffers of its backward pass) are not instrumented; they show up as the difference between a
//! whole-step time and the sum of the entries.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// 0: not yet read from the environment; 1: off; 2: on.
static STATE: AtomicU8 = AtomicU8::new(0);

/// One line of the profile.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// The scope's name.
    pub name: &'static str,
    /// How many times the scope was entered.
    pub calls: u64,
    /// Total wall time in seconds.
    pub seconds: f64,
    /// Total process CPU time (all threads, user + system) in seconds: the work done, steadier
    /// than wall time when other jobs share the cores.
    pub cpu_seconds: f64,
    /// Floating-point operations reported inside the scope's name (multiply and add count 2).
    pub flops: f64,
}

static TABLE: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

/// Turns the profile on or off for the whole process (overrides `DIFFUSE_PROFILE`).
pub fn set_enabled(on: bool) {
    STATE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
}

/// Whether scopes are being timed.
#[inline]
pub fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var("DIFFUSE_PROFILE").is_ok_and(|v| !v.is_empty() && v != "0");
            set_enabled(on);
            on
        }
        s => s == 2,
    }
}

fn record(name: &'static str, seconds: f64, cpu_seconds: f64, flops: f64, calls: u64) {
    let Ok(mut t) = TABLE.lock() else { return };
    match t.iter_mut().find(|e| e.name == name) {
        Some(e) => {
            e.calls += calls;
            e.seconds += seconds;
            e.cpu_seconds += cpu_seconds;
            e.flops += flops;
        }
        None => t.push(Entry {
            name,
            calls,
            seconds,
            cpu_seconds,
            flops,
        }),
    }
}

/// The process's CPU time (all threads) in seconds.
pub fn process_cpu_seconds() -> f64 {
    #[cfg(unix)]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into the timespec we pass.
        if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } == 0 {
            return ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9;
        }
    }
    0.0
}

/// A timed scope: its wall time goes to the entry `name` when it is dropped.
#[must_use = "the scope is timed until it is dropped"]
pub struct Scope {
    name: &'static str,
    start: Option<(Instant, f64)>,
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some((wall, cpu)) = self.start {
            let cpu = process_cpu_seconds() - cpu;
            record(self.name, wall.elapsed().as_secs_f64(), cpu, 0.0, 1);
        }
    }
}

/// Starts timing `name` (nothing when the profile is off).
#[inline]
pub fn scope(name: &'static str) -> Scope {
    Scope {
        name,
        start: enabled().then(|| (Instant::now(), process_cpu_seconds())),
    }
}

/// Adds `flops` floating-point operations to the entry `name` (nothing when off).
#[inline]
pub fn add_flops(name: &'static str, flops: f64) {
    if enabled() {
        record(name, 0.0, 0.0, flops, 0);
    }
}

/// The entries so far, in first-use order, and clears the table.
pub fn take() -> Vec<Entry> {
    match TABLE.lock() {
        Ok(mut t) => std::mem::take(&mut *t),
        Err(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_accumulate_calls_time_and_flops() {
        set_enabled(true);
        take();
        for _ in 0..3 {
            let _s = scope("test.scope");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        add_flops("test.scope", 10.0);
        add_flops("test.scope", 5.0);
        let e = take();
        set_enabled(false);
        let e = e.iter().find(|e| e.name == "test.scope").unwrap();
        assert_eq!(e.calls, 3);
        assert_eq!(e.flops, 15.0);
        // three sleeps of 2 ms: at least 6 ms
        assert!(e.seconds >= 0.006, "{}", e.seconds);
        {
            let _off = scope("test.off");
        }
        assert!(take().iter().all(|e| e.name != "test.off"));
    }
}
