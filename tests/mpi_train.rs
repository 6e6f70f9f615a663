//! `mpirun -n 2 diffuse train` over the system's Open MPI (built with `--features mpi`; CI runs
//! `cargo test --release --features mpi --test mpi_train` after installing `openmpi-bin`):
//!
//! - 2 ranks x 1 thread reproduce 1 process x 2 threads: same seed, same global batch (8),
//!   30 steps of the `demo` U-Net at 16x16. The losses agree to the reduction order of the
//!   gradient sum (measured 8.6e-7 relative, asserted 1e-5) and so do the final weights and EMA
//!   (measured 1.3e-6 relative L2 and 2.6e-5 at most, asserted 1e-5 and 1e-4: see
//!   `tests/data_parallel.rs` for why single weights differ more);
//! - a run stopped at step 15 and resumed at the same K is bitwise the uninterrupted run; resumed
//!   in one process it continues within the same tolerance (the checkpoint does not depend on K);
//! - `kill -9` of rank 1: mpirun names the rank and the signal, stops the job with a non-zero
//!   status, the last checkpoint is intact and `--resume` finishes the exact run;
//! - SIGTERM to `mpirun`: every rank stops after the same step, rank 0 writes one checkpoint
//!   and says so once; `--resume` finishes the exact run;
//! - bad input (a batch 3 ranks cannot share, ranks started with different flags): one line
//!   from `diffuse`, exit status 2, nothing written.
//!
//! Under 1 minute on 2 cores (mpirun `--oversubscribe`, one thread per rank).

#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use diffuse::train::checkpoint::{self, read_f32_tensors, read_state};
use diffuse::train::MetricRecord;

const BIN: &str = env!("CARGO_BIN_EXE_diffuse");

/// 30 steps of the demo U-Net at 16x16, global batch 8, T = 20.
const TINY: [&str; 18] = [
    "--image-size",
    "16",
    "--batch",
    "8",
    "--timesteps",
    "20",
    "--grid-size",
    "4",
    "--grid-steps",
    "3",
    "--sample-every",
    "0",
    "--checkpoint-every",
    "10",
    "--seed",
    "7",
    "--warmup",
    "5",
];

/// `mpirun -q` (quiet: none of mpirun's own banners, so what is printed is diffuse's).
fn mpirun(n: usize) -> Command {
    mpirun_with(n, &["-q"])
}

/// `mpirun` with options of its own (`-q`, `--mca NAME VALUE`).
fn mpirun_with(n: usize, options: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--allow-run-as-root", "--oversubscribe"])
        .args(options)
        .arg("-n")
        .arg(n.to_string())
        .args(["-x", "RAYON_NUM_THREADS=1", BIN]);
    c
}

fn train_args(out: &Path, resume: bool, steps: u64) -> Vec<String> {
    let mut a = vec![
        "train".to_string(),
        if resume { "--resume" } else { "--out" }.to_string(),
        out.to_str().unwrap().to_string(),
        "--steps".to_string(),
        steps.to_string(),
    ];
    a.extend(TINY.iter().map(|s| s.to_string()));
    a
}

fn ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {stdout}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn two_ranks(out: &Path, resume: bool, steps: u64) -> String {
    ok(&mpirun(2)
        .args(train_args(out, resume, steps))
        .output()
        .expect("mpirun runs (apt-get install openmpi-bin)"))
}

fn one_process(out: &Path, resume: bool, steps: u64) -> String {
    ok(&Command::new(BIN)
        .args(train_args(out, resume, steps))
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .unwrap())
}

/// The uninterrupted references, made once (under the target's tmp directory): 30 steps in
/// one process, 30 steps on 2 ranks, and rank 0's `--json` summary of the latter.
fn references() -> &'static (PathBuf, PathBuf, String) {
    static REFS: OnceLock<(PathBuf, PathBuf, String)> = OnceLock::new();
    REFS.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("mpi_train");
        let _ = std::fs::remove_dir_all(&dir);
        let (one, two) = (dir.join("one"), dir.join("two"));
        one_process(&one, false, 30);
        let mut args = train_args(&two, false, 30);
        args.push("--json".into());
        let json = ok(&mpirun(2).args(args).output().expect("mpirun runs"));
        (one, two, json)
    })
}

fn records(dir: &Path) -> Vec<MetricRecord> {
    std::fs::read_to_string(dir.join(diffuse::train::METRICS_FILE))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn tensors(dir: &Path, file: &str) -> Vec<(String, Vec<f32>)> {
    let ckpt = checkpoint::locate(dir).unwrap();
    let mut t: Vec<(String, Tensor)> = read_f32_tensors(&ckpt, file, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t.into_iter()
        .map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

fn checkpoint_step(dir: &Path) -> u64 {
    read_state(&checkpoint::locate(dir).unwrap()).unwrap().step
}

/// Bitwise the same run: every logged loss and gradient norm, and every checkpointed tensor.
fn assert_same_run(a: &Path, b: &Path) {
    let bits = |d: &Path| -> Vec<(u64, u64, u64)> {
        records(d)
            .iter()
            .map(|r| (r.step, r.loss.to_bits(), r.grad_norm.to_bits()))
            .collect()
    };
    assert_eq!(bits(a), bits(b), "loss / grad-norm sequences differ");
    for f in [
        checkpoint::MODEL_FILE,
        checkpoint::EMA_FILE,
        checkpoint::OPTIMIZER_FILE,
    ] {
        assert!(tensors(a, f) == tensors(b, f), "{f} differs");
    }
    assert_eq!(checkpoint_step(a), checkpoint_step(b));
}

/// Losses within 1e-5 relative; weights and EMA within 1e-5 relative L2 and 1e-4 anywhere.
fn assert_close(what: &str, a: &Path, b: &Path) {
    let (ra, rb) = (records(a), records(b));
    assert_eq!(ra.len(), rb.len(), "{what}");
    let loss = ra
        .iter()
        .zip(&rb)
        .map(|(x, y)| (x.loss - y.loss).abs() / x.loss.abs())
        .fold(0.0, f64::max);
    eprintln!("{what}: losses {loss:e} relative");
    assert!(loss < 1e-5, "{what}: losses differ by {loss:e} relative");
    for f in [checkpoint::MODEL_FILE, checkpoint::EMA_FILE] {
        let (ta, tb) = (tensors(a, f), tensors(b, f));
        let (mut d2, mut n2, mut max_abs) = (0f64, 0f64, 0f64);
        for ((na, va), (nb, vb)) in ta.iter().zip(&tb) {
            assert_eq!(na, nb);
            for (x, y) in va.iter().zip(vb) {
                let d = (x - y).abs() as f64;
                d2 += d * d;
                n2 += (*x as f64).powi(2);
                max_abs = max_abs.max(d);
            }
        }
        let rel = (d2 / n2).sqrt();
        eprintln!("{what}: {f} {rel:e} relative L2, {max_abs:e} at most");
        assert!(
            rel < 1e-5 && max_abs < 1e-4,
            "{what}: {f}: {rel:e} relative L2, {max_abs:e} at most"
        );
    }
}

/// Waits until `dir`'s metrics log has at least `n` lines (or the child exits).
fn wait_for_steps(child: &mut Child, dir: &Path, n: usize) {
    let t0 = Instant::now();
    loop {
        let lines = std::fs::read_to_string(dir.join(diffuse::train::METRICS_FILE))
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if lines >= n {
            return;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before step {n}"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no step {n} after 2 minutes"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The rank processes `mpirun` started (its children), by rank.
fn rank_pid(mpirun: u32, rank: usize) -> i32 {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // the parent pid is the 4th field, after the parenthesised command name
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid != Some(mpirun) {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if env.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
            return pid;
        }
    }
    panic!("no rank {rank} under mpirun {mpirun}");
}

#[test]
fn two_ranks_reproduce_one_process_and_resume_exactly() {
    let (one, two, json) = references();
    // rank 0 alone printed: one JSON object, with the exchange's figures
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    let x = &v["data_parallel"];
    assert_eq!(
        (x["ranks"].as_u64(), x["steps"].as_u64()),
        (Some(2), Some(30)),
        "{v}"
    );
    // the demo U-Net's 1,063,905 gradients and 3 + 2 K control slots, f32
    assert_eq!(x["bytes_per_step"].as_u64(), Some(4 * (1_063_905 + 3 + 4)));
    assert_close("2 ranks vs 1 process, 30 steps", one, two);

    // stopped at 15, resumed at the same K: bitwise the uninterrupted run
    let tmp = tempfile::tempdir().unwrap();
    let split = tmp.path().join("split");
    two_ranks(&split, false, 15);
    assert_eq!(checkpoint_step(&split), 15);
    let other_k = tmp.path().join("other_k");
    copy_dir(&split, &other_k);
    let out = two_ranks(&split, true, 30);
    assert!(out.contains("resuming"), "{out}");
    assert_same_run(two, &split);
    // resumed in one process: the same run to rounding
    one_process(&other_k, true, 30);
    assert_close("2 ranks to 15, then 1 process", one, &other_k);
}

#[test]
fn a_killed_rank_stops_the_job_and_the_run_resumes_exactly() {
    let (_, two, _) = references();
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("killed");
    // not quiet: mpirun's report of the dead rank is the message
    let mut child = mpirun_with(2, &[])
        .args(train_args(&run, false, 30))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_steps(&mut child, &run, 14);
    let victim = rank_pid(child.id(), 1);
    unsafe {
        libc::kill(victim, libc::SIGKILL);
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    // "mpirun noticed that process rank 1 with PID ... exited on signal 9 (Killed)."
    assert!(
        err.contains("process rank 1") && err.contains("signal 9"),
        "{err}"
    );
    let step = checkpoint_step(&run);
    assert!(step == 10 || step == 20, "checkpoint of step {step}");
    two_ranks(&run, true, 30);
    assert_same_run(two, &run);
}

/// `mpirun` turns SIGTERM (and Ctrl-C) into SIGTERM to every rank `odls_base_sigkill_timeout`
/// seconds later (default 1) and SIGKILL as long after that; 8 s leave a loaded machine time
/// to finish the step and write the checkpoint (3 s did not, on a machine loaded by two other
/// jobs), and 200 steps keep the run going until the forwarded SIGTERM arrives.
#[test]
fn sigterm_to_mpirun_checkpoints_once_from_rank_0_and_the_run_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let (reference, run) = (tmp.path().join("reference"), tmp.path().join("stopped"));
    std::thread::scope(|s| {
        s.spawn(|| two_ranks(&reference, false, 200));
        let mut child = mpirun_with(2, &["-q", "--mca", "odls_base_sigkill_timeout", "8"])
            .args(train_args(&run, false, 200))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for_steps(&mut child, &run, 12);
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let out = child.wait_with_output().unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        let said: Vec<&str> = stdout
            .lines()
            .filter(|l| l.starts_with("interrupted at step"))
            .collect();
        assert_eq!(said.len(), 1, "stdout: {stdout}\nstderr: {stderr}");
        assert_eq!(
            stderr.matches("interrupt: finishing the current step").count(),
            1,
            "{stderr}"
        );
        let step: u64 = said[0]["interrupted at step ".len()..]
            .split(';')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!((12..200).contains(&step), "{step}");
        assert_eq!(checkpoint_step(&run), step);
        assert_eq!(records(&run).len() as u64, step);
    });
    two_ranks(&run, true, 200);
    assert_same_run(&reference, &run);
}

#[test]
fn bad_input_is_one_line_and_exit_status_2() {
    let tmp = tempfile::tempdir().unwrap();
    // a global batch 3 ranks cannot share
    let run = tmp.path().join("three");
    let mut args = train_args(&run, false, 5);
    let b = args.iter().position(|a| a == "--batch").unwrap();
    args[b + 1] = "4".into();
    let out = mpirun(3).args(&args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("the global batch 4 does not split evenly over 3 ranks"),
        "{err}"
    );
    assert!(!run.exists());

    // ranks started with different flags (an MPMD launch)
    let run = tmp.path().join("mixed");
    let a = train_args(&run, false, 5);
    let mut b = a.clone();
    let s = b.iter().position(|x| x == "--seed").unwrap();
    b[s + 1] = "8".into();
    let out = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-q", "-n", "1", BIN])
        .args(&a)
        .args([":", "-n", "1", BIN])
        .args(&b)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains(
            "rank 1 was started with other flags than rank 0 (`--seed 8` where rank 0 has `--seed 7`)"
        ),
        "{err}"
    );
    assert!(!run.exists());
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        let target = to.join(e.file_name());
        if p.is_dir() {
            copy_dir(&p, &target);
        } else {
            std::fs::copy(&p, &target).unwrap();
        }
    }
}
