//! `diffuse bench` end to end on a tiny case: child-process workers, thread count, JSON keys.
//! No timing assertions (timings are never tested); no Python (no --compare-torch).

use std::process::Command;

use serde_json::Value;

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .arg("bench")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn json_has_every_figure_for_every_preset_and_workload() {
    let out = bench(&[
        "--presets",
        "demo,bench",
        "--image-size",
        "8",
        "--train-batch",
        "2",
        "--sample-batch",
        "3",
        "--warmup",
        "0",
        "--iters",
        "1",
        "--sgemm-size",
        "64",
        "--threads",
        "1",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["threads"], 1);
    assert_eq!(j["sgemm"]["n"], 64);
    // The workers really ran on one thread (RAYON_NUM_THREADS reached rayon and candle).
    assert_eq!(j["sgemm"]["rayon_threads"], 1);
    assert_eq!(j["sgemm"]["candle_threads"], 1);
    let presets = j["presets"].as_array().unwrap();
    assert_eq!(presets.len(), 2);
    for (p, name) in presets.iter().zip(["demo", "bench"]) {
        assert_eq!(p["preset"], name);
        assert_eq!(p["image"], serde_json::json!([1, 8, 8]));
        assert!(p["forward_flops_per_image"]["conv"].as_u64().unwrap() > 0);
        let ws = p["workloads"].as_array().unwrap();
        assert_eq!(ws.len(), 3);
        // guided: half the sample batch (3 / 2 = 1), one forward of the doubled batch
        for (w, (kind, batch)) in ws.iter().zip([("train", 2), ("sample", 3), ("guided", 1)]) {
            assert_eq!(w["workload"], kind);
            assert_eq!(w["batch"], batch);
            assert_eq!(w["threads"], serde_json::json!([1, 1]));
            for key in ["median_ms", "images_per_s", "gflops", "sgemm_fraction"] {
                assert!(w["ours"][key].as_f64().unwrap() > 0.0, "{name} {kind} {key}");
            }
            assert_eq!(w["ours"]["times_ms"].as_array().unwrap().len(), 1);
            assert!(w["torch"].is_null() && w["ratio"].is_null());
        }
    }
    // Progress goes to stderr, never into the JSON on stdout.
    assert!(String::from_utf8_lossy(&out.stderr).contains("bench: demo train batch 2"));
}

#[test]
fn bad_flags_exit_2_with_one_line() {
    let cases: [(&[&str], &str); 5] = [
        (
            &["--precision", "fp8"],
            "unknown precision 'fp8', expected f32 or bf16",
        ),
        (&["--presets", "huge"], "unknown U-Net preset 'huge'"),
        (&["--image-size", "30"], "divisible by"),
        (&["--workloads", "infer"], "expected train, sample or guided"),
        (&["--threads", "0"], "--threads"),
    ];
    for (args, want) in cases {
        let out = bench(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn profile_prints_a_per_op_table_for_every_workload() {
    let out = bench(&[
        "--presets",
        "demo",
        "--image-size",
        "8",
        "--train-batch",
        "2",
        "--sample-batch",
        "2",
        "--workloads",
        "train,sample",
        "--warmup",
        "0",
        "--iters",
        "1",
        "--sgemm-size",
        "64",
        "--threads",
        "1",
        "--profile",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    for header in ["train 2 (ours, wall)", "sample 2 (ours, wall)"] {
        assert!(text.contains(header), "{text}");
    }
    // the whole step, the backward pass and the optimizer, and the fused ResNet blocks
    for row in ["step ", "backward ", "adamw ", "unet.resnet "] {
        assert!(text.lines().any(|l| l.starts_with(row)), "no {row}row in {text}");
    }
}

/// bf16 where the CPU has AVX512_BF16, else a one-line error with exit 2.
#[test]
fn bf16_runs_or_says_why_not() {
    let out = bench(&[
        "--presets",
        "demo",
        "--image-size",
        "8",
        "--train-batch",
        "2",
        "--sample-batch",
        "2",
        "--workloads",
        "train",
        "--warmup",
        "0",
        "--iters",
        "1",
        "--sgemm-size",
        "64",
        "--threads",
        "1",
        "--precision",
        "bf16",
        "--json",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    if diffuse::ops::set_precision(diffuse::ops::Precision::Bf16).is_ok() {
        assert!(out.status.success(), "{err}");
        let j: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(j["presets"][0]["workloads"][0]["precision"], "bf16");
    } else {
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("bf16 needs a CPU with the AVX512_BF16"), "{err}");
    }
}
