//! A long run of the reader fuzzer (the test `tests/fuzz_readers.rs` runs a short one):
//!
//! ```text
//! cargo run --release --example fuzz_readers -- --iterations 100000 [--seed 1] [--target npy]
//! ```
//!
//! Every target gets every truncation of its valid file plus `--iterations` seeded mutations
//! (see `tests/fuzz/harness.rs`); the report lists each kind of failure once with the input that
//! showed it. Exits 1 when anything failed.

#[path = "../tests/fuzz/harness.rs"]
mod harness;
#[path = "../tests/fuzz/targets.rs"]
mod targets;

#[global_allocator]
static ALLOC: harness::CountingAlloc = harness::CountingAlloc;

fn main() -> std::process::ExitCode {
    let mut iterations = 20_000usize;
    let mut seed = 1u64;
    let mut only: Option<String> = None;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--iterations" => iterations = value.parse().unwrap_or(iterations),
            "--seed" => seed = value.parse().unwrap_or(seed),
            "--target" => only = Some(value),
            "--help" | "-h" => {
                println!("fuzz_readers [--iterations N] [--seed S] [--target NAME-PART]");
                return std::process::ExitCode::SUCCESS;
            }
            other => {
                eprintln!("unknown argument {other} (try --help)");
                return std::process::ExitCode::from(2);
            }
        }
        i += 2;
    }
    let mut failed = false;
    let mut total = 0;
    let start = std::time::Instant::now();
    let _one_at_a_time = harness::lock();
    for target in targets::all() {
        if only.as_ref().is_some_and(|o| !target.name.contains(o.as_str())) {
            continue;
        }
        let r = harness::run(&target, iterations, seed);
        total += r.cases;
        println!(
            "{:26} {:8} inputs {:7} accepted  largest allocation {:9} B (input {} B)  {:6.1} s  {}",
            target.name,
            r.cases,
            r.accepted,
            r.largest.0,
            r.largest.1,
            r.seconds,
            if r.failure_count == 0 {
                "ok".to_string()
            } else {
                format!("{} FAILED", r.failure_count)
            }
        );
        for f in &r.failures {
            println!("    {f}");
        }
        failed |= r.failure_count > 0;
    }
    println!(
        "{total} inputs in {:.1} s, seed {seed}: {}",
        start.elapsed().as_secs_f64(),
        if failed { "FAILURES" } else { "no failures" }
    );
    if failed {
        std::process::ExitCode::from(1)
    } else {
        std::process::ExitCode::SUCCESS
    }
}
