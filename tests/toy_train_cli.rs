//! The `toy train` command end to end: outputs, exit codes, a real SIGTERM mid-run followed by
//! `--resume`, which must reproduce the uninterrupted run's losses exactly.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_diffuse");

/// A tiny model so a step takes about a millisecond.
const SMALL: [&str; 10] = [
    "--hidden",
    "16",
    "--layers",
    "1",
    "--batch",
    "32",
    "--n-data",
    "300",
    "--embed-dim",
    "8",
];

fn train(out: &Path, extra: &[&str]) -> Output {
    Command::new(BIN)
        .args(["toy", "train"])
        .args(["--data", "moons", "--out"])
        .arg(out)
        .args(SMALL)
        .args(extra)
        .output()
        .unwrap()
}

fn losses(out: &Path) -> Vec<String> {
    // the loss field of each line, as written (shortest round-trip decimal of the f64)
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["loss"].to_string()
        })
        .collect()
}

#[test]
fn trains_writes_outputs_and_reports_json() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = train(&out, &["--steps", "40", "--json", "--checkpoint-every", "15"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["step"], 40);
    assert_eq!(v["stopped"], "steps");
    // parameters of a 1-block width-16 MLP on 2-D data with an 8-dim embedding:
    // time 8*16+16 + 16*16+16, input 2*16+16, block 3 * (16*16+16), output 16*2+2
    assert_eq!(v["parameters"], 144 + 272 + 48 + 3 * 272 + 34);
    for f in [
        "config.json",
        "metrics.jsonl",
        "loss.png",
        "checkpoint/state.json",
        "checkpoint/model.safetensors",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert_eq!(losses(&out).len(), 40);
    // the trained model loads as a denoiser
    diffuse::nets::mlp::MlpDenoiser::load(&out, true).unwrap();
}

#[test]
fn bad_input_exits_2_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = Command::new(BIN)
        .args(["toy", "train", "--data", "spiral", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("unknown dataset 'spiral'") && err.lines().count() == 1,
        "{err}"
    );

    let csv = tmp.path().join("p.csv");
    std::fs::write(&csv, "x,y\n1,2\n3,oops\n").unwrap();
    let o = Command::new(BIN)
        .args(["toy", "train", "--data"])
        .arg(format!("csv:{}", csv.display()))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("line 3, column 2"));

    let o = Command::new(BIN)
        .args(["toy", "train", "--n-data", "10", "--data"])
        .arg(format!("csv:{}", csv.display()))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
}

#[cfg(unix)]
#[test]
fn sigterm_checkpoints_and_resume_matches_the_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("killed");
    let child = Command::new(BIN)
        .args(["toy", "train"])
        .args(["--data", "moons", "--out"])
        .arg(&out)
        .args(SMALL)
        .args(["--steps", "1000000", "--checkpoint-every", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // wait until it has logged some steps
    let start = Instant::now();
    loop {
        let n = std::fs::read_to_string(out.join("metrics.jsonl"))
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if n >= 20 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no progress after 60 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let o = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout.contains("interrupted at step"), "{stdout}");

    // the checkpoint holds exactly the logged steps: nothing lost
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint/state.json")).unwrap()).unwrap();
    let stopped = state["step"].as_u64().unwrap();
    assert_eq!(losses(&out).len() as u64, stopped);

    // resume to stopped + 25 steps, and compare with a run that never stopped
    let target = (stopped + 25).to_string();
    let o = train(&out, &["--steps", &target, "--resume", "--checkpoint-every", "0"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let reference = tmp.path().join("reference");
    let o = train(&reference, &["--steps", &target]);
    assert!(o.status.success());
    assert_eq!(losses(&out), losses(&reference));

    // a resume with a different setting is refused, naming it, exit 2
    let o = train(&out, &["--steps", &target, "--resume", "--lr", "0.01"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("trainer.optimizer.lr: checkpoint 0.001, now 0.01"),
        "{err}"
    );
    // and a fresh run into the same directory too
    let o = train(&out, &["--steps", "5"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("already holds a checkpoint"));
}
