//! Crash-safe training (issue 17, item 3), on the real binary: training processes are killed
//! with SIGKILL at random moments and at every stage of writing a checkpoint, then resumed,
//! until the run is done. Checked each time:
//!
//! (a) the run resumes from the last complete checkpoint on disk, found independently here (a
//!     checkpoint directory whose files all match its manifest's sizes and FNV-1a checksums),
//!     and a kill loses less than two checkpoint intervals;
//! (b) the finished run's loss / learning-rate / gradient-norm sequence and its final weights,
//!     EMA and optimizer state equal the uninterrupted run's, bit for bit;
//! (c) nothing partial is read back: half-written temporary checkpoints and half-written files
//!     are ignored (resume finds the complete checkpoint; the result is exact), and a damaged
//!     checkpoint is refused with an error naming the file.
//!
//! Also: a full disk (simulated with RLIMIT_FSIZE, which stops root too) and a read-only run
//! directory give a clear error and leave the previous checkpoint intact; a non-finite loss
//! stops the run naming the step.
//!
//! Both trainers: `diffuse toy train` (tiny MLP) and `diffuse train` (the demo U-Net on 8x8
//! images, batch 2). Kill moments come from a seeded generator; the stages come from the hidden
//! test hook `DIFFUSE_TEST_PAUSE_IN_CHECKPOINT` (see `diffuse::train::checkpoint::test_pause`),
//! which makes the process stop at a stage and say so, so that it is killed exactly there.

#![cfg(unix)]

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use diffuse::rng::Rng;

const BIN: &str = env!("CARGO_BIN_EXE_diffuse");

/// How a session ends.
#[derive(Clone, Debug)]
enum Kill {
    /// SIGKILL after this long (if still running).
    After(Duration),
    /// SIGKILL when the process reports it is paused at this stage (`STAGE` or `STAGE:K`).
    AtStage(String),
    /// Let it finish.
    Never,
}

#[derive(Debug)]
struct Session {
    /// The exit code, `None` when killed.
    code: Option<i32>,
    stdout: String,
    stderr: String,
    /// The step the process said it resumed at.
    resumed_at: Option<u64>,
}

/// Runs `cmd` until it exits or is killed as `kill` says.
fn session(mut cmd: Command, kill: &Kill) -> Session {
    if let Kill::AtStage(stage) = kill {
        cmd.env(diffuse::train::checkpoint::PAUSE_ENV, stage);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start diffuse");
    let mut out = child.stdout.take().unwrap();
    let err = child.stderr.take().unwrap();
    let stdout_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let (tx, rx) = mpsc::channel::<String>();
    let stderr_thread = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let killed = match kill {
        Kill::Never => false,
        Kill::After(d) => {
            let start = Instant::now();
            loop {
                if child.try_wait().unwrap().is_some() {
                    break false;
                }
                if start.elapsed() >= *d {
                    child.kill().unwrap();
                    break true;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Kill::AtStage(stage) => loop {
            match rx.recv_timeout(Duration::from_secs(120)) {
                Ok(line) if line.starts_with("DIFFUSE_TEST_PAUSED") => {
                    child.kill().unwrap();
                    break true;
                }
                Ok(_) => {}
                // the stream ended: the process exited without reaching the stage
                Err(mpsc::RecvTimeoutError::Disconnected) => break false,
                Err(mpsc::RecvTimeoutError::Timeout) => panic!("never reached stage {stage}"),
            }
        },
    };
    let status = child.wait().unwrap();
    let stdout = stdout_thread.join().unwrap();
    let stderr = stderr_thread.join().unwrap();
    let resumed_at = stdout
        .lines()
        .find(|l| l.starts_with("resuming "))
        .and_then(|l| l.rsplit("at step ").next())
        .and_then(|n| n.trim().parse().ok());
    Session {
        code: if killed { None } else { status.code() },
        stdout,
        stderr,
        resumed_at,
    }
}

// ---------- the independent view of the run directory ----------

fn fnv1a64(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The step of the checkpoint in `dir` if it is complete: a manifest listing the four files,
/// each present with the recorded size and checksum, and a state.json that parses.
fn complete_step(dir: &Path) -> Option<u64> {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).ok()?).ok()?;
    let files = manifest.get("files")?.as_object()?;
    for name in [
        "model.safetensors",
        "ema.safetensors",
        "optimizer.safetensors",
        "state.json",
    ] {
        let want = files.get(name)?;
        let bytes = std::fs::read(dir.join(name)).ok()?;
        if want.get("bytes")?.as_u64()? != bytes.len() as u64
            || want.get("fnv1a64")?.as_str()? != fnv1a64(&bytes)
        {
            return None;
        }
    }
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("state.json")).ok()?).ok()?;
    state.get("step")?.as_u64()
}

/// The newest complete checkpoint of a run directory (`checkpoint/` or `checkpoint.old/`).
fn last_complete(run: &Path) -> Option<u64> {
    let a = complete_step(&run.join("checkpoint"));
    let b = complete_step(&run.join("checkpoint.old"));
    if let (Some(a), Some(b)) = (a, b) {
        assert!(a >= b, "checkpoint.old ({b}) newer than checkpoint ({a})");
    }
    a.max(b)
}

/// The last complete line of metrics.jsonl (its step).
fn last_logged(run: &Path) -> u64 {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("step")?.as_u64())
        .next_back()
        .unwrap_or(0)
}

/// (step, loss bits, lr bits, grad-norm bits) of every line of metrics.jsonl.
fn records(run: &Path) -> Vec<(u64, u64, u64, u64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let r: diffuse::train::MetricRecord = serde_json::from_str(l).unwrap();
            (r.step, r.loss.to_bits(), r.lr.to_bits(), r.grad_norm.to_bits())
        })
        .collect()
}

fn assert_same_run(reference: &Path, run: &Path, total: u64) {
    let (a, b) = (records(reference), records(run));
    assert_eq!(a.len(), total as usize);
    assert_eq!(a, b, "the loss / lr / grad-norm sequences differ");
    for f in ["model.safetensors", "ema.safetensors", "optimizer.safetensors"] {
        let x = std::fs::read(reference.join("checkpoint").join(f)).unwrap();
        let y = std::fs::read(run.join("checkpoint").join(f)).unwrap();
        assert!(x == y, "{f} differs from the uninterrupted run's");
    }
}

// ---------- the two trainers ----------

/// Builds the command of a session: (run directory, total steps).
type MakeCommand = Box<dyn Fn(&Path, u64) -> Command>;

struct Trainer {
    name: &'static str,
    total: u64,
    every: u64,
    /// The stages of [`stages`] to kill at.
    stages: Vec<(&'static str, u64)>,
    fresh: MakeCommand,
    resume: MakeCommand,
}

fn toy() -> Trainer {
    let flags = |dir: &Path, steps: u64| {
        let mut c = Command::new(BIN);
        c.args([
            "toy",
            "train",
            "--data",
            "8gaussians",
            "--n-data",
            "200",
            "--hidden",
            "16",
        ])
        .args([
            "--layers",
            "2",
            "--embed-dim",
            "8",
            "--batch",
            "32",
            "--seed",
            "7",
        ])
        .args(["--checkpoint-every", "5", "--steps", &steps.to_string(), "--out"])
        .arg(dir);
        c
    };
    Trainer {
        name: "toy train",
        total: 150,
        every: 5,
        stages: stages(),
        fresh: Box::new(flags),
        resume: Box::new(move |dir, steps| {
            let mut c = flags(dir, steps);
            c.arg("--resume");
            c
        }),
    }
}

fn image(data: &Path) -> Trainer {
    let data = data.to_path_buf();
    let common = [
        "--checkpoint-every",
        "2",
        "--grid-size",
        "0",
        "--sample-every",
        "0",
        "--threads",
        "1",
    ];
    Trainer {
        name: "train",
        total: 20,
        every: 2,
        // a few stages (the toy trainer goes through all of them): each costs two saves of
        // the 1 M-parameter network
        stages: stages()
            .into_iter()
            .filter(|(s, _)| ["partial model.safetensors:1", "manifest:2", "swap:2", "done:2"].contains(s))
            .collect(),
        fresh: Box::new(move |dir, steps| {
            let mut c = Command::new(BIN);
            c.args(["train", "--batch", "2", "--seed", "3", "--data"])
                .arg(&data)
                .args(common)
                .args(["--steps", &steps.to_string(), "--out"])
                .arg(dir);
            c
        }),
        resume: Box::new(move |dir, steps| {
            let mut c = Command::new(BIN);
            c.arg("train")
                .args(common)
                .args(["--steps", &steps.to_string(), "--resume"])
                .arg(dir);
            c
        }),
    }
}

/// Eight 8x8 greyscale PNGs.
fn image_folder(dir: &Path) -> PathBuf {
    let d = dir.join("images");
    std::fs::create_dir_all(&d).unwrap();
    for i in 0..8u32 {
        let img = image::GrayImage::from_fn(8, 8, |x, y| {
            image::Luma([((x * 31 + y * 17 + i * 53) % 256) as u8])
        });
        img.save(d.join(format!("{i}.png"))).unwrap();
    }
    d
}

fn uninterrupted(t: &Trainer, dir: &Path) {
    let s = session((t.fresh)(dir, t.total), &Kill::Never);
    assert_eq!(s.code, Some(0), "{}: {}", t.name, s.stderr);
}

/// One session of the killed run: fresh when there is no complete checkpoint, else a resume
/// whose starting step must be the last complete checkpoint's. Returns the session and the
/// step it started from.
fn next_session(t: &Trainer, run: &Path, kill: &Kill) -> (Session, u64) {
    let expected = last_complete(run);
    let cmd = match expected {
        Some(_) => (t.resume)(run, t.total),
        None => (t.fresh)(run, t.total),
    };
    let s = session(cmd, kill);
    if let Some(step) = expected {
        // (a) a resume starts at the last complete checkpoint (unless killed before it said so)
        match s.resumed_at {
            Some(r) => assert_eq!(
                r, step,
                "{}: resumed at {r}, the last complete checkpoint is {step}",
                t.name
            ),
            None => assert!(
                s.code.is_none(),
                "{}: no resume line: {} {}",
                t.name,
                s.stdout,
                s.stderr
            ),
        }
    }
    (s, expected.unwrap_or(0))
}

/// Kills at seeded random moments until `kills` kills happened, then lets the run finish;
/// returns (kills, kills that left a half-written checkpoint behind).
fn random_kills(t: &Trainer, run: &Path, kills: usize, max_ms: f64, seed: u64) -> (usize, usize) {
    let mut rng = Rng::new(seed);
    let (mut done, mut mid_checkpoint) = (0, 0);
    for _ in 0..10 * kills {
        let kill = if done < kills {
            Kill::After(Duration::from_secs_f64(max_ms * rng.uniform() / 1000.0))
        } else {
            Kill::Never
        };
        let (s, _) = next_session(t, run, &kill);
        match s.code {
            Some(0) => return (done, mid_checkpoint),
            Some(c) => panic!("{}: exit {c}: {}", t.name, s.stderr),
            None => {
                done += 1;
                if run.join(".checkpoint.tmp").exists() || run.join("checkpoint.old").exists() {
                    mid_checkpoint += 1;
                }
                // what a kill loses: less than two checkpoint intervals of logged steps
                if let Some(c) = last_complete(run) {
                    let logged = last_logged(run);
                    assert!(
                        c % t.every == 0 && c <= logged,
                        "{}: checkpoint {c}, logged {logged}",
                        t.name
                    );
                    assert!(
                        logged - c.min(logged) < 2 * t.every,
                        "{}: logged {logged}, checkpoint {c}",
                        t.name
                    );
                }
            }
        }
    }
    panic!("{}: the run did not finish", t.name)
}

/// Every stage of a save, and the checkpoint a kill there leaves as the last complete one,
/// relative to the session's start s0 (the K-th save of a session is at s0 + K * every).
/// `partial NAME` stops with half of file NAME written.
fn stages() -> Vec<(&'static str, u64)> {
    vec![
        ("tmp-dir:2", 1),
        ("partial model.safetensors:1", 0),
        ("model:2", 1),
        ("ema:2", 1),
        ("partial optimizer.safetensors:2", 1),
        ("optimizer:2", 1),
        ("partial state.json:2", 1),
        ("state:2", 1),
        ("partial manifest.json:2", 1),
        ("manifest:2", 1),
        ("swap:2", 1),
        ("done:2", 2),
        // the loss curve is redrawn after each checkpoint; metrics.jsonl is rewritten on resume
        ("partial loss.png:2", 2),
        ("partial metrics.jsonl:1", 0),
    ]
}

fn staged_kills(t: &Trainer, run: &Path) {
    // a first checkpoint, so that every stage below is reached in a resumed session
    let (s, _) = next_session(t, run, &Kill::AtStage("done:1".into()));
    assert!(s.code.is_none(), "{}: {}", t.name, s.stderr);
    for &(stage, saves) in &t.stages {
        let (s, start) = next_session(t, run, &Kill::AtStage(stage.into()));
        assert!(
            s.code.is_none(),
            "{}: stage {stage} was not reached: {}",
            t.name,
            s.stderr
        );
        let expected = start + saves * t.every;
        assert_eq!(
            last_complete(run),
            Some(expected),
            "{}: killed at {stage} (session from step {start})",
            t.name
        );
    }
    let (s, _) = next_session(t, run, &Kill::Never);
    assert_eq!(s.code, Some(0), "{}: {}", t.name, s.stderr);
}

fn kill_and_resume(t: &Trainer, tmp: &Path, kills: usize, max_ms: f64) {
    let reference = tmp.join(format!("{}-reference", t.name.replace(' ', "-")));
    uninterrupted(t, &reference);

    // runs killed at random moments until `kills` kills happened (a run that finishes before
    // counts its kills and the next run starts)
    let (mut n, mut mid, mut runs) = (0, 0, 0);
    while n < kills {
        assert!(runs < 5, "{}: {n} kills in {runs} runs", t.name);
        let random = tmp.join(format!("{}-random-{runs}", t.name.replace(' ', "-")));
        let (k, m) = random_kills(t, &random, kills - n, max_ms, 17 + runs as u64);
        assert_same_run(&reference, &random, t.total);
        (n, mid, runs) = (n + k, mid + m, runs + 1);
    }
    println!(
        "{}: {n} random kills in {runs} runs ({mid} left a checkpoint half-written), each run finished exactly",
        t.name
    );

    let staged = tmp.join(format!("{}-staged", t.name.replace(' ', "-")));
    staged_kills(t, &staged);
    println!("{}: {} staged kills, then finished", t.name, t.stages.len() + 1);
    assert_same_run(&reference, &staged, t.total);

    // (c) a damaged checkpoint (what a file system that broke the rename promise could leave)
    // is refused, naming the file, and nothing is changed
    let damaged = tmp.join(format!("{}-damaged", t.name.replace(' ', "-")));
    copy_dir(&staged, &damaged);
    let f = damaged.join("checkpoint").join("optimizer.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let metrics_before = std::fs::read(damaged.join("metrics.jsonl")).unwrap();
    let s = session((t.resume)(&damaged, t.total + 4), &Kill::Never);
    assert_eq!(s.code, Some(2), "{}: {}", t.name, s.stderr);
    assert!(
        s.stderr.contains("optimizer.safetensors") && s.stderr.contains("partial or damaged"),
        "{}: {}",
        t.name,
        s.stderr
    );
    assert_eq!(
        std::fs::read(damaged.join("metrics.jsonl")).unwrap(),
        metrics_before
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn toy_training_survives_kills_at_any_moment() {
    let tmp = tempfile::tempdir().unwrap();
    kill_and_resume(&toy(), tmp.path(), 20, 150.0);
}

#[test]
fn image_training_survives_kills_at_any_moment() {
    let tmp = tempfile::tempdir().unwrap();
    let data = image_folder(tmp.path());
    kill_and_resume(&image(&data), tmp.path(), 5, 600.0);
}

/// A full disk: writes fail once a file passes a size (RLIMIT_FSIZE, with SIGXFSZ ignored so
/// the write returns EFBIG; it binds root too). The save of step 15 fails on its 20 KB
/// optimizer file; the checkpoint of step 10 stays, nothing half-written is left, and the run
/// resumes from it to the uninterrupted run's exact result.
#[test]
fn a_full_disk_gives_a_clear_error_and_keeps_the_previous_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let t = toy();
    let (reference, run) = (tmp.path().join("reference"), tmp.path().join("run"));
    let s = session((t.fresh)(&reference, 20), &Kill::Never);
    assert_eq!(s.code, Some(0), "{}", s.stderr);
    let s = session((t.fresh)(&run, 10), &Kill::Never);
    assert_eq!(s.code, Some(0), "{}", s.stderr);

    let mut cmd = (t.resume)(&run, 20);
    // SAFETY: only async-signal-safe calls (setrlimit, signal) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 15_000,
                rlim_max: 15_000,
            };
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let s = session(cmd, &Kill::Never);
    assert_eq!(s.code, Some(1), "not the user's fault: {}", s.stderr);
    let line = s
        .stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_default();
    assert_eq!(
        s.stderr.lines().filter(|l| l.starts_with("error")).count(),
        1,
        "{}",
        s.stderr
    );
    assert!(
        line.contains("optimizer.safetensors")
            && line.contains("the checkpoint of step 15 was not written")
            && line.contains("the checkpoint of step 10 in"),
        "{line}"
    );
    assert_eq!(last_complete(&run), Some(10));
    assert!(
        !run.join(".checkpoint.tmp").exists(),
        "a half-written checkpoint was left"
    );

    let s = session((t.resume)(&run, 20), &Kill::Never);
    assert_eq!((s.code, s.resumed_at), (Some(0), Some(10)), "{}", s.stderr);
    assert_same_run(&reference, &run, 20);
}

/// A run directory that cannot be written: a clear error (exit 2, naming the path) and the
/// checkpoint untouched. Permission bits do not stop root, so as root this case is skipped,
/// saying so; `tests/exit_codes.rs` covers an output path that runs through a file, which
/// stops root too.
#[test]
fn a_read_only_run_directory_gives_a_clear_error_and_keeps_the_checkpoint() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        println!("SKIPPED (running as root, which permission bits do not stop): read-only run directory");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let t = toy();
    let run = tmp.path().join("run");
    let s = session((t.fresh)(&run, 10), &Kill::Never);
    assert_eq!(s.code, Some(0), "{}", s.stderr);
    let before = std::fs::read(run.join("checkpoint").join("state.json")).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o555)).unwrap();
    let s = session((t.resume)(&run, 20), &Kill::Never);
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(s.code, Some(2), "{}", s.stderr);
    assert!(
        s.stderr.contains("Permission denied") && s.stderr.contains(&run.display().to_string()),
        "{}",
        s.stderr
    );
    assert_eq!(
        std::fs::read(run.join("checkpoint").join("state.json")).unwrap(),
        before
    );
    assert_eq!(last_complete(&run), Some(10));
}

/// A non-finite loss (an absurd learning rate) stops the run with a message naming the step;
/// the last checkpoint is kept and complete.
#[test]
fn a_non_finite_loss_stops_the_run_naming_the_step() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("nan");
    let mut cmd = Command::new(BIN);
    cmd.args([
        "toy",
        "train",
        "--data",
        "8gaussians",
        "--n-data",
        "200",
        "--hidden",
        "16",
    ])
    .args([
        "--layers",
        "2",
        "--embed-dim",
        "8",
        "--batch",
        "32",
        "--seed",
        "7",
    ])
    .args([
        "--lr",
        "1e30",
        "--warmup",
        "0",
        "--grad-clip",
        "0",
        "--steps",
        "50",
    ])
    .args(["--checkpoint-every", "1", "--out"])
    .arg(&run);
    let s = session(cmd, &Kill::Never);
    assert_eq!(s.code, Some(1), "{}", s.stderr);
    let line = s.stderr.lines().find(|l| l.starts_with("error: ")).unwrap();
    // "the loss is inf at step 2; the checkpoint of step 1 in DIR is intact" (or NaN, or the
    // gradient norm: whichever is first non-finite)
    let step: u64 = line
        .split("at step ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no step in {line}"));
    assert!(line.contains("inf") || line.contains("NaN"), "{line}");
    let kept = last_complete(&run).expect("a complete checkpoint");
    assert_eq!(kept, step - 1, "{line}");
    assert!(line.contains(&format!("checkpoint of step {kept}")), "{line}");
}
