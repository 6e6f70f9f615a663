//! The fuzz harness shared by `tests/fuzz_readers.rs` (a short run inside `cargo test`) and
//! `examples/fuzz_readers.rs` (a long run: `--iterations N`).
//!
//! A [`Target`] is one reader of user files: a small valid file (or a directory holding one),
//! the file's name and a function that reads it through the library's public API. [`run`] feeds
//! it mutated versions of the valid file, all drawn from one seeded generator
//! (`diffuse::rng::Rng`):
//!
//! - every truncation, length 0 up to the whole file;
//! - bit flips, bytes set to 0x00 / 0xff / 0x7f / 0x80 / random;
//! - runs of ASCII digits (sizes in text headers and JSON) replaced by huge, negative or
//!   non-finite numbers (`4294967296`, `18446744073709551615`, `1e999`, `-1`, `NaN`, ...);
//! - binary size fields (the target names their offsets) set to huge values;
//! - float payloads set to NaN, +-Inf, huge and subnormal values;
//! - spans deleted, duplicated, or replaced by random bytes, and wholly random files.
//!
//! For every input it checks: no panic; no single allocation larger than the target's bound
//! `factor * input length + SLACK` (what the file's real size justifies; the largest allocation
//! is tracked by [`CountingAlloc`], which the test binary installs as its global allocator); and
//! an error, when there is one, names the file and is a user error (exit code 2).

#![allow(dead_code)] // each binary that includes this file uses a different part of it

use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use diffuse::rng::Rng;

// ---------- the counting allocator ----------

/// The system allocator, recording the largest single allocation (or reallocation) requested
/// while a measurement is armed. A request above [`HARD_CAP`] prints the current case and
/// fails (the process then aborts), so an unbounded allocation cannot take the machine down.
pub struct CountingAlloc;

static ARMED: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);
static CASE_TARGET: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
static CASE_TARGET_LEN: AtomicUsize = AtomicUsize::new(0);
static CASE_INDEX: AtomicUsize = AtomicUsize::new(0);

/// No input of these small files can justify more than this.
pub const HARD_CAP: usize = 1 << 30;

/// Serialises measurements: the largest allocation is process-wide (readers may allocate on
/// rayon's threads), so only one target may be built or run at a time; see [`lock`].
static LOCK: Mutex<()> = Mutex::new(());

/// Holds the harness for one target: take it before building the target (building allocates
/// too) and keep it until [`run`] returns.
pub fn lock() -> std::sync::MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn note(size: usize) -> bool {
    if !ARMED.load(Ordering::Relaxed) {
        return true;
    }
    LARGEST.fetch_max(size, Ordering::Relaxed);
    if size > HARD_CAP {
        report_over_cap(size);
        return false;
    }
    true
}

/// Writes "fuzz: TARGET case K asked for N bytes" to stderr without allocating.
fn report_over_cap(size: usize) {
    fn digits(mut v: usize, buf: &mut [u8; 24]) -> &[u8] {
        let mut i = buf.len();
        loop {
            i -= 1;
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        &buf[i..]
    }
    let target = CASE_TARGET.load(Ordering::Relaxed);
    let len = CASE_TARGET_LEN.load(Ordering::Relaxed);
    let mut b1 = [0u8; 24];
    let mut b2 = [0u8; 24];
    let write = |bytes: &[u8]| {
        // SAFETY: writes a valid buffer to the stderr descriptor.
        unsafe { libc::write(2, bytes.as_ptr().cast(), bytes.len()) };
    };
    write(b"\nfuzz: target ");
    if !target.is_null() {
        // SAFETY: CASE_TARGET always holds a &'static str's pointer and length.
        write(unsafe { std::slice::from_raw_parts(target, len) });
    }
    write(b" case ");
    write(digits(CASE_INDEX.load(Ordering::Relaxed), &mut b1));
    write(b" asked for ");
    write(digits(size, &mut b2));
    write(b" bytes in one allocation (over the cap)\n");
}

// SAFETY: every call is forwarded to the system allocator unchanged (or refused with null).
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !note(layout.size()) {
            return std::ptr::null_mut();
        }
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !note(layout.size()) {
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !note(new_size) {
            return std::ptr::null_mut();
        }
        System.realloc(ptr, layout, new_size)
    }
}

/// Runs `f`, returning its result and the largest single allocation made meanwhile.
fn measure<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.store(0, Ordering::SeqCst);
    ARMED.store(true, Ordering::SeqCst);
    let r = f();
    ARMED.store(false, Ordering::SeqCst);
    (r, LARGEST.load(Ordering::SeqCst))
}

// ---------- targets ----------

/// Fixed allowance for a reader's own buffers (I/O buffers, a deflate window, decoder tables,
/// serde's scratch space), whatever the input.
pub const SLACK: usize = 1 << 20;

/// How a target's file is laid out, for the structure-aware mutations.
#[derive(Clone, Debug, Default)]
pub struct Hints {
    /// Binary size fields: (offset, width in bytes, big-endian).
    pub size_fields: Vec<(usize, usize, bool)>,
    /// Float payloads: (offset, count, width 4 or 8), little-endian.
    pub floats: Option<(usize, usize, usize)>,
    /// The file is text (JSON, CSV): mutations keep to printable tokens more often.
    pub text: bool,
}

/// What a reader returned: `Ok` or the error with its exit-code class.
pub struct Failure {
    /// The error's one-line message.
    pub message: String,
    /// `diffuse::Error::is_user_error`.
    pub user_error: bool,
}

impl From<diffuse::Error> for Failure {
    fn from(e: diffuse::Error) -> Self {
        Failure {
            message: e.to_string(),
            user_error: e.is_user_error(),
        }
    }
}

type Reader = Box<dyn Fn(&Path) -> Result<(), Failure>>;

/// One reader of user files.
pub struct Target {
    /// A short name for reports.
    pub name: &'static str,
    /// The valid file.
    pub seed: Vec<u8>,
    /// Where each mutated input is written (inside a directory the target prepared).
    pub file: PathBuf,
    /// What the reader is given: the file itself or the directory that holds it.
    pub input: PathBuf,
    /// Bytes of allocation each input byte may justify (see each target).
    pub factor: usize,
    /// Layout hints.
    pub hints: Hints,
    /// Reads `input` through the library.
    pub read: Reader,
    /// Keeps the target's temporary directory alive.
    pub _dir: Option<tempfile::TempDir>,
}

/// What [`run`] found.
#[derive(Debug, Default)]
pub struct Report {
    /// Inputs fed.
    pub cases: usize,
    /// Inputs the reader accepted.
    pub accepted: usize,
    /// The largest allocation of any input, and that input's length.
    pub largest: (usize, usize),
    /// Problems, one line each: the first of each kind (the message without its numbers).
    pub failures: Vec<String>,
    kinds: std::collections::HashMap<String, usize>,
    /// Problems in all.
    pub failure_count: usize,
    /// Wall-clock seconds.
    pub seconds: f64,
}

impl Report {
    fn fail(&mut self, line: String) {
        self.failure_count += 1;
        // the kind: the part after the case's description, digits dropped
        let tail = line.split_once("): ").map_or(line.as_str(), |(_, t)| t);
        let kind: String = tail.chars().filter(|c| !c.is_ascii_digit()).take(100).collect();
        let seen = self.kinds.entry(kind).or_insert(0);
        *seen += 1;
        if *seen == 1 && self.failures.len() < 50 {
            self.failures.push(line);
        }
    }
}

/// Feeds `target` every truncation of its valid file plus `iterations` random mutations drawn
/// from `seed`, and checks each result (see the module docs). Call it holding [`lock`].
pub fn run(target: &Target, iterations: usize, seed: u64) -> Report {
    CASE_TARGET_LEN.store(target.name.len(), Ordering::SeqCst);
    CASE_TARGET.store(target.name.as_ptr() as *mut u8, Ordering::SeqCst);
    let start = Instant::now();
    let mut report = Report::default();
    let file_name = target
        .file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut rng = Rng::new(seed);
    let n = target.seed.len();
    for case in 0..=n + iterations {
        let (input, what) = if case <= n {
            (target.seed[..case].to_vec(), format!("truncated to {case} bytes"))
        } else {
            mutate(&target.seed, &target.hints, &mut rng)
        };
        CASE_INDEX.store(case, Ordering::SeqCst);
        if let Err(e) = std::fs::write(&target.file, &input) {
            report.fail(format!("cannot write {}: {e}", target.file.display()));
            break;
        }
        let (result, largest) = measure(|| catch_unwind(AssertUnwindSafe(|| (target.read)(&target.input))));
        report.cases += 1;
        if largest > report.largest.0 {
            report.largest = (largest, input.len());
        }
        let bound = target.factor.saturating_mul(input.len()).saturating_add(SLACK);
        if largest > bound {
            report.fail(format!(
                "case {case} ({what}, {} bytes): an allocation of {largest} bytes, over the bound {bound}",
                input.len()
            ));
        }
        match result {
            Err(_) => report.fail(format!("case {case} ({what}, {} bytes): panicked", input.len())),
            Ok(Ok(())) => report.accepted += 1,
            Ok(Err(f)) => {
                if !f.message.contains(&file_name) {
                    report.fail(format!(
                        "case {case} ({what}): the error does not name {file_name}: {}",
                        f.message
                    ));
                } else if !f.user_error {
                    report.fail(format!(
                        "case {case} ({what}): not a user error (exit code 1): {}",
                        f.message
                    ));
                } else if f.message.contains('\n') {
                    report.fail(format!(
                        "case {case} ({what}): a multi-line error: {:?}",
                        f.message
                    ));
                }
            }
        }
    }
    report.seconds = start.elapsed().as_secs_f64();
    report
}

/// Runs `target` and panics with the report when anything failed.
pub fn check(target: &Target, iterations: usize, seed: u64) -> Report {
    let r = run(target, iterations, seed);
    println!(
        "{}: {} inputs ({} accepted) in {:.2} s; largest allocation {} bytes (input of {} bytes)",
        target.name, r.cases, r.accepted, r.seconds, r.largest.0, r.largest.1
    );
    assert!(
        r.failure_count == 0,
        "{}: {} of {} inputs failed:\n{}",
        target.name,
        r.failure_count,
        r.cases,
        r.failures.join("\n")
    );
    r
}

// ---------- mutations ----------

const SPECIAL_BYTES: [u8; 6] = [0x00, 0xff, 0x7f, 0x80, b'9', b'-'];
const HUGE_TOKENS: [&str; 14] = [
    "4294967295",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "9223372036854775807",
    "1000000000000",
    "65536",
    "-1",
    "0",
    "1e999",
    "-1e999",
    "NaN",
    "Infinity",
    "1e308",
];
const JSON_TOKENS: [&str; 14] = [
    "{", "}", "[", "]", ",", ":", "\"", "null", "true", "\"x\"", "[[", "]]", "-", "\u{e9}",
];

fn pick<'a, T>(items: &'a [T], rng: &mut Rng) -> &'a T {
    &items[rng.below(items.len() as u64) as usize]
}

fn index(len: usize, rng: &mut Rng) -> usize {
    if len == 0 {
        0
    } else {
        rng.below(len as u64) as usize
    }
}

/// Runs of ASCII digits in `bytes` (start, end).
fn digit_runs(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_digit() {
            let s = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            runs.push((s, i));
        } else {
            i += 1;
        }
    }
    runs
}

/// One random mutation of `seed` and its description.
pub fn mutate(seed: &[u8], hints: &Hints, rng: &mut Rng) -> (Vec<u8>, String) {
    let mut b = seed.to_vec();
    let kind = rng.below(8);
    let what = match kind {
        0 => {
            let flips = 1 + rng.below(8);
            for _ in 0..flips {
                let i = index(b.len(), rng);
                if let Some(v) = b.get_mut(i) {
                    *v ^= 1 << rng.below(8);
                }
            }
            format!("{flips} bit flips")
        }
        1 => {
            let k = 1 + rng.below(4);
            for _ in 0..k {
                let i = index(b.len(), rng);
                let v = if rng.below(2) == 0 {
                    *pick(&SPECIAL_BYTES, rng)
                } else {
                    rng.below(256) as u8
                };
                if let Some(x) = b.get_mut(i) {
                    *x = v;
                }
            }
            format!("{k} bytes set")
        }
        2 => {
            let runs = digit_runs(&b);
            if runs.is_empty() {
                return mutate(seed, &Hints::default(), rng);
            }
            let (s, e) = *pick(&runs, rng);
            let token = *pick(&HUGE_TOKENS, rng);
            b.splice(s..e, token.bytes());
            format!("number at byte {s} replaced by {token}")
        }
        3 if !hints.size_fields.is_empty() => {
            let (off, width, be) = *pick(&hints.size_fields, rng);
            let value: u64 = *pick(
                &[
                    u64::MAX,
                    u32::MAX as u64,
                    1 << 31,
                    1 << 32,
                    (seed.len() as u64) * 1000,
                    0,
                    1,
                ],
                rng,
            );
            let bytes = if be {
                value.to_be_bytes()
            } else {
                value.to_le_bytes()
            };
            let field: Vec<u8> = if be {
                bytes[8 - width..].to_vec()
            } else {
                bytes[..width].to_vec()
            };
            if off + width <= b.len() {
                b[off..off + width].copy_from_slice(&field);
            }
            format!("size field at {off} set to {value}")
        }
        4 if hints.floats.is_some() => {
            let (off, count, width) = hints.floats.unwrap_or((0, 0, 4));
            let k = index(count, rng);
            let v = *pick(
                &[f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1e300, 1e-310, -0.0],
                rng,
            );
            let at = off + k * width;
            if width == 4 && at + 4 <= b.len() {
                b[at..at + 4].copy_from_slice(&(v as f32).to_le_bytes());
            } else if width == 8 && at + 8 <= b.len() {
                b[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            format!("float {k} set to {v}")
        }
        5 => {
            // delete or duplicate a span
            let s = index(b.len(), rng);
            let e = (s + 1 + index(64, rng)).min(b.len());
            if rng.below(2) == 0 {
                b.drain(s..e);
                format!("bytes {s}..{e} deleted")
            } else {
                let span = b[s..e].to_vec();
                b.splice(s..s, span);
                format!("bytes {s}..{e} duplicated")
            }
        }
        6 if hints.text => {
            let at = index(b.len() + 1, rng).min(b.len());
            let token = *pick(&JSON_TOKENS, rng);
            b.splice(at..at, token.bytes());
            format!("'{token}' inserted at {at}")
        }
        _ => {
            if rng.below(3) == 0 {
                let len = index(2 * seed.len() + 2, rng);
                b = (0..len).map(|_| rng.below(256) as u8).collect();
                // sometimes keep the magic bytes so the parser gets further
                let keep = index(seed.len().min(16) + 1, rng).min(b.len());
                b[..keep].copy_from_slice(&seed[..keep]);
                format!("{len} random bytes (first {keep} kept)")
            } else {
                let s = index(b.len(), rng);
                let e = (s + 1 + index(16, rng)).min(b.len());
                for v in &mut b[s..e] {
                    *v = rng.below(256) as u8;
                }
                format!("bytes {s}..{e} randomised")
            }
        }
    };
    (b, what)
}
