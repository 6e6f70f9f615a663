//! `diffuse train --fid-every`: the sample-quality figure goes into metrics.jsonl (on the
//! measured steps only), the summary and the loss picture, survives a resume, and bad settings
//! are input errors before any training.

use std::path::Path;
use std::process::Command;

fn diffuse(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn lines(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

const FAST: &[&str] = &[
    "--preset",
    "bench",
    "--batch",
    "8",
    "--grid-size",
    "0",
    "--fid-samples",
    "130",
    "--fid-steps",
    "3",
    "--json",
];

#[test]
fn measured_steps_carry_the_figure_and_a_resume_keeps_them() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let r = run.to_str().unwrap();
    let mut args = vec!["train", "--out", r, "--steps", "4", "--fid-every", "2"];
    args.extend_from_slice(FAST);
    let (code, out, err) = diffuse(&args);
    assert_eq!(code, 0, "{err}");
    let summary: serde_json::Value = serde_json::from_str(out.trim().lines().last().unwrap()).unwrap();
    assert_eq!(summary["eval"]["step"], 4);
    assert_eq!(summary["eval"]["metric"], "fd_digit_features");
    let l = lines(&run);
    assert_eq!(l.len(), 4);
    for (i, line) in l.iter().enumerate() {
        let step = i + 1;
        if step % 2 == 0 {
            let e = &line["eval"];
            let (v, real) = (e["value"].as_f64().unwrap(), e["real"].as_f64().unwrap());
            // an untrained model's samples are far from the digits; real digits are close
            assert!(
                v.is_finite() && real.is_finite() && v > real && real > 0.0,
                "step {step}: {e}"
            );
            assert_eq!(e["n_samples"], 130);
            assert_eq!(e["sampler"], "dpmpp-2m 3");
        } else {
            assert!(line.get("eval").is_none(), "step {step}: {line}");
        }
    }
    // the same seed gives the same figure: the samples' noise is fixed
    let first = l[1]["eval"]["value"].as_f64().unwrap();
    let mut again = vec!["train", "--resume", r, "--steps", "6", "--fid-every", "2"];
    again.extend_from_slice(FAST);
    let (code, _, err) = diffuse(&again);
    assert_eq!(code, 0, "{err}");
    let l = lines(&run);
    assert_eq!(l.len(), 6);
    assert_eq!(l[1]["eval"]["value"].as_f64().unwrap(), first);
    assert!(l[5]["eval"]["value"].as_f64().is_some());
    let img = image::open(run.join("loss.png")).unwrap().to_rgb8();
    assert!(
        img.pixels().filter(|p| p.0 == [117, 112, 179]).count() > 50,
        "no quality panel in loss.png"
    );

    // off: no figure
    let off = dir.path().join("off");
    let mut args = vec![
        "train",
        "--out",
        off.to_str().unwrap(),
        "--steps",
        "2",
        "--fid-every",
        "0",
    ];
    args.extend_from_slice(FAST);
    let (code, out, err) = diffuse(&args);
    assert_eq!(code, 0, "{err}");
    assert!(lines(&off).iter().all(|l| l.get("eval").is_none()));
    assert!(!out.contains("\"eval\""));
}

#[test]
fn bad_settings_are_input_errors_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let r = run.to_str().unwrap();
    let (code, _, err) = diffuse(&[
        "train",
        "--out",
        r,
        "--steps",
        "2",
        "--fid-every",
        "1",
        "--fid-samples",
        "50",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("at least 129 images"), "{err}");
    let (code, _, err) = diffuse(&[
        "train",
        "--out",
        r,
        "--steps",
        "2",
        "--fid-every",
        "1",
        "--fid-sampler",
        "nope",
    ]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = diffuse(&[
        "train",
        "--out",
        r,
        "--steps",
        "2",
        "--fid-every",
        "1",
        "--fid-steps",
        "2",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("fid-sampler") && err.contains("at least 3 steps"),
        "{err}"
    );
    assert!(
        !run.join("metrics.jsonl").exists()
            || std::fs::read_to_string(run.join("metrics.jsonl"))
                .unwrap()
                .is_empty()
    );
}
