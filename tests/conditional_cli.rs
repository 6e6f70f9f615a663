//! Class-conditional models through the CLI: `diffuse train` on labelled data (the bundled
//! mnist5k) trains class-conditional with label dropout, resumes exactly, samples the asked
//! classes (info.json records them), exports to diffusers and back, measures the conditional and
//! unconditional bounds; `toy train` on labelled points and mixtures; bad input is one line, exit 2.

use std::path::Path;
use std::process::{Command, Output};

fn diffuse(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .expect("the binary runs")
}

fn ok(args: &[&str]) -> String {
    let out = diffuse(args);
    assert!(
        out.status.success(),
        "{args:?}: exit {:?}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn bad(args: &[&str], needle: &str) {
    let out = diffuse(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains(needle), "{args:?}: {err}");
}

const TINY: [&str; 12] = [
    "--image-size",
    "8",
    "--batch",
    "4",
    "--timesteps",
    "20",
    "--grid-size",
    "10",
    "--grid-steps",
    "2",
    "--seed",
    "3",
];

fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn conditional_image_run_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let (straight, split) = (dir.path().join("straight"), dir.path().join("split"));
    let mut a = vec![
        "train",
        "--out",
        s(&straight),
        "--steps",
        "4",
        "--sample-every",
        "4",
    ];
    a.extend(TINY);
    let out = ok(&a);
    assert!(
        out.contains("class-conditional: 10 classes, label dropout 0.1"),
        "{out}"
    );
    let cfg = std::fs::read_to_string(straight.join("checkpoint/state.json")).unwrap();
    assert!(
        cfg.contains("\"cond_drop\":0.1") || cfg.contains("\"cond_drop\": 0.1"),
        "{cfg}"
    );
    assert!(straight.join("samples.png").exists());
    // the per-class grid: 10 labelled rows
    let grid = image::open(straight.join("samples.png")).unwrap();
    assert!(
        grid.height() > grid.width(),
        "one row per class: {}x{}",
        grid.width(),
        grid.height()
    );

    // resume: the label-dropout draws come from the checkpointed generator
    let mut a = vec!["train", "--out", s(&split), "--steps", "2", "--sample-every", "0"];
    a.extend(TINY);
    ok(&a);
    ok(&["train", "--resume", s(&split), "--steps", "4"]);
    assert_eq!(losses(&straight), losses(&split));

    // sampling: one class, a list, all; info.json records the classes and the scale
    let samples = dir.path().join("s");
    let json = ok(&[
        "sample",
        "--checkpoint",
        s(&straight),
        "--class",
        "3,5",
        "--n",
        "4",
        "--steps",
        "3",
        "--out",
        s(&samples),
        "--json",
    ]);
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(samples.join("info.json")).unwrap()).unwrap();
    assert_eq!(info["classes"], serde_json::json!([3, 5, 3, 5]), "{json}");
    assert_eq!(info["guidance_scale"], 2.0);
    let all = dir.path().join("all");
    ok(&[
        "sample",
        "--checkpoint",
        s(&straight),
        "--class",
        "all",
        "--n",
        "20",
        "--steps",
        "2",
        "--out",
        s(&all),
    ]);
    let g = image::open(all.join("grid.png")).unwrap();
    assert!(g.height() > g.width(), "a labelled row per class");
    let none = dir.path().join("none");
    ok(&[
        "sample",
        "--checkpoint",
        s(&straight),
        "--class",
        "none",
        "--n",
        "2",
        "--steps",
        "2",
        "--out",
        s(&none),
    ]);
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(none.join("info.json")).unwrap()).unwrap();
    assert_eq!(info["classes"], serde_json::json!([null, null]));

    // bad requests: nothing written
    let nowhere = dir.path().join("nowhere");
    let base = [
        "sample",
        "--checkpoint",
        s(&straight),
        "--n",
        "2",
        "--steps",
        "2",
        "--out",
        s(&nowhere),
    ];
    fn with<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        base.iter().chain(extra).copied().collect()
    }
    bad(&with(&base, &["--class", "12"]), "class 12 is out of range");
    bad(
        &with(&base, &["--class", "3", "--guidance-scale", "-1"]),
        "guidance-scale",
    );
    bad(
        &with(&base, &["--class", "3", "--guidance-scale", "nan"]),
        "guidance-scale",
    );
    assert!(!nowhere.exists());

    // the conditional and the unconditional bound
    let nll = ok(&[
        "eval",
        "nll",
        "--checkpoint",
        s(&straight),
        "--n-images",
        "2",
        "--json",
    ]);
    assert!(nll.contains("\"condition\":\"labels\""), "{nll}");
    let nll0 = ok(&[
        "eval",
        "nll",
        "--checkpoint",
        s(&straight),
        "--n-images",
        "2",
        "--condition",
        "none",
        "--json",
    ]);
    assert!(nll0.contains("\"condition\":\"none\""), "{nll0}");
    let v = |t: &str| {
        serde_json::from_str::<serde_json::Value>(t).unwrap()["bits_per_dim"]
            .as_f64()
            .unwrap()
    };
    assert_ne!(v(&nll), v(&nll0));

    // export to diffusers and sample the folder with the same classes and sampler settings
    // (explicit, so the folder's scheduler config is not followed): the same images
    let exported = dir.path().join("exported");
    ok(&[
        "export",
        "--checkpoint",
        s(&straight),
        "--format",
        "diffusers",
        "--out",
        s(&exported),
    ]);
    let cfg = std::fs::read_to_string(exported.join("unet/config.json")).unwrap();
    assert!(
        cfg.contains("\"num_class_embeds\": 11") || cfg.contains("\"num_class_embeds\":11"),
        "{cfg}"
    );
    let from_folder = dir.path().join("ff");
    ok(&[
        "sample",
        "--diffusers",
        s(&exported),
        "--class",
        "3,5",
        "--n",
        "4",
        "--steps",
        "3",
        "--sampler",
        "ddim",
        "--spacing",
        "trailing",
        "--clip-x0",
        "1",
        "--out",
        s(&from_folder),
    ]);
    let from_ckpt = dir.path().join("fc");
    ok(&[
        "sample",
        "--checkpoint",
        s(&straight),
        "--class",
        "3,5",
        "--n",
        "4",
        "--steps",
        "3",
        "--sampler",
        "ddim",
        "--spacing",
        "trailing",
        "--clip-x0",
        "1",
        "--out",
        s(&from_ckpt),
    ]);
    let a = diffuse::io::read_npy(&from_folder.join("samples.npy")).unwrap();
    let b = diffuse::io::read_npy(&from_ckpt.join("samples.npy")).unwrap();
    let diff = a
        .data
        .iter()
        .zip(&b.data)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
    assert!(diff < 1e-4, "exported model samples differ by {diff}");

    // an unconditional run on the same labelled data refuses --class
    let unc = dir.path().join("unc");
    let mut a = vec![
        "train",
        "--out",
        s(&unc),
        "--steps",
        "1",
        "--unconditional",
        "--sample-every",
        "0",
    ];
    a.extend(TINY);
    ok(&a);
    bad(
        &[
            "sample",
            "--checkpoint",
            s(&unc),
            "--class",
            "3",
            "--n",
            "2",
            "--out",
            s(&nowhere),
        ],
        "need a class-conditional model",
    );
    bad(
        &[
            "sample",
            "--checkpoint",
            s(&unc),
            "--guidance-scale",
            "3",
            "--n",
            "2",
            "--out",
            s(&nowhere),
        ],
        "need a class-conditional model",
    );
    let x = dir.path().join("x");
    let mut a = vec![
        "train",
        "--out",
        s(&x),
        "--steps",
        "1",
        "--unconditional",
        "--cond-drop",
        "0.2",
    ];
    a.extend(TINY);
    bad(&a, "--cond-drop");
}

#[test]
fn toy_conditional_training_and_bad_labels() {
    let dir = tempfile::tempdir().unwrap();
    // points in two clusters, labelled by cluster
    let n = 200;
    let mut csv = String::new();
    let mut labels = String::new();
    for i in 0..n {
        let c = i % 2;
        let x = if c == 0 { -1.0 } else { 1.0 } + 0.01 * ((i * 37 % 11) as f64 - 5.0);
        csv.push_str(&format!("{x},{}\n", 0.02 * ((i * 13 % 7) as f64 - 3.0)));
        labels.push_str(&format!("{c}\n"));
    }
    let pts = dir.path().join("p.csv");
    let lab = dir.path().join("l.txt");
    std::fs::write(&pts, csv).unwrap();
    std::fs::write(&lab, labels).unwrap();
    let data = format!("csv:{}", s(&pts));
    let run = dir.path().join("run");
    let out = ok(&[
        "toy",
        "train",
        "--data",
        &data,
        "--labels",
        s(&lab),
        "--out",
        s(&run),
        "--steps",
        "30",
        "--hidden",
        "16",
    ]);
    assert!(out.contains("class-conditional, 2 classes"), "{out}");
    let samples = dir.path().join("s.npy");
    ok(&[
        "toy",
        "sample",
        "--checkpoint",
        s(&run),
        "--process",
        "ddpm",
        "--sampler",
        "ddim",
        "--steps",
        "10",
        "--n",
        "8",
        "--seed",
        "0",
        "--class",
        "1",
        "--guidance-scale",
        "3",
        "--out",
        s(&samples),
    ]);
    bad(
        &[
            "toy",
            "sample",
            "--checkpoint",
            s(&run),
            "--process",
            "ddpm",
            "--sampler",
            "ddim",
            "--n",
            "8",
            "--seed",
            "0",
            "--class",
            "2",
            "--out",
            s(&samples),
        ],
        "class 2 is out of range",
    );
    // a labels file of the wrong length, a bad id
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "0\n1\n").unwrap();
    bad(
        &[
            "toy",
            "train",
            "--data",
            &data,
            "--labels",
            s(&short),
            "--out",
            s(&dir.path().join("r2")),
            "--steps",
            "1",
        ],
        "holds 2 labels",
    );
    let neg = dir.path().join("neg.txt");
    std::fs::write(&neg, "0\n-1\n".repeat(n / 2)).unwrap();
    bad(
        &[
            "toy",
            "train",
            "--data",
            &data,
            "--labels",
            s(&neg),
            "--out",
            s(&dir.path().join("r3")),
            "--steps",
            "1",
        ],
        "label 1 is -1",
    );
    // an unconditional toy model refuses --class
    let plain = dir.path().join("plain");
    ok(&[
        "toy",
        "train",
        "--data",
        &data,
        "--out",
        s(&plain),
        "--steps",
        "5",
        "--hidden",
        "16",
    ]);
    bad(
        &[
            "toy",
            "sample",
            "--checkpoint",
            s(&plain),
            "--process",
            "ddpm",
            "--sampler",
            "ddim",
            "--n",
            "8",
            "--seed",
            "0",
            "--class",
            "0",
            "--out",
            s(&samples),
        ],
        "unconditional",
    );
    // a mixture spec whose labels have the wrong length
    let mix = dir.path().join("m.json");
    std::fs::write(
        &mix,
        r#"{"weights": [0.5, 0.5], "means": [[0, 0], [2, 2]], "stds": [1, 1], "labels": [0, 1, 1]}"#,
    )
    .unwrap();
    bad(
        &[
            "toy",
            "sample",
            "--oracle",
            &format!("gmm:{}", s(&mix)),
            "--process",
            "ddpm",
            "--sampler",
            "ddim",
            "--n",
            "8",
            "--seed",
            "0",
            "--class",
            "0",
            "--out",
            s(&samples),
        ],
        "one per component",
    );
}
