//! The image pipeline end to end through the CLI, on a tiny configuration (16x16 MNIST, batch 4,
//! T = 20): train, resume (the loss sequence equals an uninterrupted run's), sample, eval nll,
//! export-free checks of the outputs, and bad input.

use std::path::Path;
use std::process::{Command, Output};

fn diffuse(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .expect("the binary runs")
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

const TINY: [&str; 14] = [
    "--image-size",
    "16",
    "--batch",
    "4",
    "--timesteps",
    "20",
    "--grid-size",
    "4",
    "--grid-steps",
    "3",
    "--sample-every",
    "0",
    "--seed",
    "7",
];

fn losses(run: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

#[test]
fn train_resume_sample_eval() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    let split = dir.path().join("split");

    let mut args = vec![
        "train",
        "--out",
        straight.to_str().unwrap(),
        "--steps",
        "6",
        "--json",
    ];
    args.extend(TINY);
    ok(&diffuse(&args));
    let a = losses(&straight);
    assert_eq!(a.len(), 6);

    let mut args = vec![
        "train",
        "--out",
        split.to_str().unwrap(),
        "--steps",
        "3",
        "--json",
    ];
    args.extend(TINY);
    ok(&diffuse(&args));
    // resume with only the budget given: the saved settings are used
    ok(&diffuse(&[
        "train",
        "--resume",
        split.to_str().unwrap(),
        "--steps",
        "6",
        "--json",
    ]));
    let b = losses(&split);
    assert_eq!(
        a, b,
        "a resumed run's losses equal the uninterrupted run's, bit for bit"
    );

    // a setting that differs from the checkpoint's is refused, naming it
    let out = diffuse(&[
        "train",
        "--resume",
        split.to_str().unwrap(),
        "--steps",
        "8",
        "--lr",
        "0.5",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lr"), "{err}");
    // a fresh run into a directory holding a checkpoint is refused
    let mut args = vec!["train", "--out", split.to_str().unwrap(), "--steps", "1"];
    args.extend(TINY);
    assert_eq!(diffuse(&args).status.code(), Some(2));

    // sampling: grid, one PNG per image, samples.npy [N, 1, 16, 16] in [0, 1]
    let samples = dir.path().join("samples");
    let out = diffuse(&[
        "sample",
        "--checkpoint",
        straight.to_str().unwrap(),
        "--n",
        "5",
        "--batch",
        "2",
        "--steps",
        "4",
        "--out",
        samples.to_str().unwrap(),
        "--trajectory",
        "--json",
    ]);
    ok(&out);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["nfe"], 4);
    // our image models' ddpm/ddim runs clip x_0 to the data range by default
    assert_eq!(info["clip_x0"], 1.0, "{info}");
    assert_eq!(info["sampler"], "ddpm", "{info}");
    for f in [
        "grid.png",
        "samples.npy",
        "info.json",
        "trajectory.png",
        "trajectory.gif",
    ] {
        assert!(samples.join(f).exists(), "{f}");
    }
    assert_eq!(std::fs::read_dir(samples.join("images")).unwrap().count(), 5);
    let npy = diffuse::io::read_npy(&samples.join("samples.npy")).unwrap();
    assert_eq!(npy.shape, vec![5, 1, 16, 16]);
    assert!(npy.data.iter().all(|v| (0.0..=1.0).contains(v)));

    // the same seed gives the same images whatever the batch size
    let again = dir.path().join("again");
    ok(&diffuse(&[
        "sample",
        "--checkpoint",
        straight.to_str().unwrap(),
        "--n",
        "5",
        "--batch",
        "5",
        "--steps",
        "4",
        "--out",
        again.to_str().unwrap(),
    ]));
    let npy2 = diffuse::io::read_npy(&again.join("samples.npy")).unwrap();
    let max_diff = npy
        .data
        .iter()
        .zip(&npy2.data)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(max_diff < 1e-5, "batch size changed the samples by {max_diff}");

    // eval nll: the JSON contract
    let nll = dir.path().join("nll.json");
    ok(&diffuse(&[
        "eval",
        "nll",
        "--checkpoint",
        straight.to_str().unwrap(),
        "--n-images",
        "3",
        "--batch",
        "2",
        "--out",
        nll.to_str().unwrap(),
    ]));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&nll).unwrap()).unwrap();
    for k in ["bits_per_dim", "stderr", "l_t", "l_sum", "l_0", "n_images"] {
        assert!(v.get(k).is_some(), "{k} missing in {v}");
    }
    let total = v["l_t"].as_f64().unwrap() + v["l_sum"].as_f64().unwrap() + v["l_0"].as_f64().unwrap();
    assert!((total - v["bits_per_dim"].as_f64().unwrap()).abs() < 1e-9);
    assert_eq!(v["n_images"], 3);
}

#[test]
fn bad_input_is_a_one_line_error_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("x");
    let out = out_dir.to_str().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (
            &["train", "--out", out, "--data", "/nonexistent/dir"],
            "/nonexistent/dir",
        ),
        (&["train", "--out", out, "--preset", "huge"], "huge"),
        (&["train", "--out", out, "--schedule", "cosinus"], "cosinus"),
        (&["train", "--out", out, "--image-size", "30"], "30"),
        (
            &["sample", "--checkpoint", "/nonexistent/run", "--out", out],
            "/nonexistent/run",
        ),
    ];
    for (args, needle) in cases {
        let o = diffuse(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn eval_samples_ranks_real_images_above_noise() {
    use diffuse::data::{load_bundled, Split};
    let dir = tempfile::tempdir().unwrap();
    // 200 real training images (the reference is the test split) and 200 uniform-noise images;
    // with 200 images in 784 dimensions the real set sits at FD ~13 (sampling noise), noise at ~210
    let train = load_bundled(Split::Train).unwrap();
    let d = train.image_len();
    let real: Vec<f32> = train.pixels()[..200 * d]
        .iter()
        .map(|v| (v + 1.0) / 2.0)
        .collect();
    let mut state = 1u64;
    let noise: Vec<f32> = (0..200 * d)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            (state >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect();
    let real_path = dir.path().join("real.npy");
    let noise_path = dir.path().join("noise.npy");
    diffuse::io::write_npy_f32(&real_path, &[200, 1, 28, 28], &real).unwrap();
    diffuse::io::write_npy_f32(&noise_path, &[200, 1, 28, 28], &noise).unwrap();
    let score_with = |p: &Path, features: &str| -> serde_json::Value {
        let o = diffuse(&[
            "eval",
            "samples",
            "--samples",
            p.to_str().unwrap(),
            "--features",
            features,
            "--json",
        ]);
        ok(&o);
        serde_json::from_slice(&o.stdout).unwrap()
    };
    // the default on greyscale: the bundled digit classifier's features and classes
    let (r, n) = (
        score_with(&real_path, "digits"),
        score_with(&noise_path, "digits"),
    );
    let (fr, fnoise) = (
        r["fd_digit_features"].as_f64().unwrap(),
        n["fd_digit_features"].as_f64().unwrap(),
    );
    assert!(fr >= 0.0 && fr * 10.0 < fnoise, "real {fr} vs noise {fnoise}");
    let floor = r["fd_digit_features_real"].as_f64().unwrap();
    assert!((floor - fr).abs() < 1e-4 * fr.max(1.0), "{floor} vs {fr}");
    assert!(r["feature_network"]
        .as_str()
        .unwrap()
        .contains("digit classifier"));
    let hist: Vec<u64> = serde_json::from_value(r["class_histogram"].clone()).unwrap();
    assert_eq!(hist.iter().sum::<u64>(), 200);
    assert!(r["class_entropy"].as_f64().unwrap() > 2.0, "{r}");
    assert!(n["class_entropy"].as_f64().unwrap() < r["class_entropy"].as_f64().unwrap());
    // --features pixels keeps the pixel figures
    let r = score_with(&real_path, "pixels");
    let n = score_with(&noise_path, "pixels");
    for k in [
        "fd_pixels",
        "energy_distance",
        "fd_pixels_real",
        "n_samples",
        "n_images",
    ] {
        assert!(r.get(k).is_some(), "{k} missing in {r}");
    }
    let (fr, fnoise) = (r["fd_pixels"].as_f64().unwrap(), n["fd_pixels"].as_f64().unwrap());
    assert!(fr >= 0.0 && fr * 10.0 < fnoise, "real {fr} vs noise {fnoise}");
    let (er, en) = (
        r["energy_distance"].as_f64().unwrap(),
        n["energy_distance"].as_f64().unwrap(),
    );
    assert!(er * 20.0 < en, "real {er} vs noise {en}");
    // the real training images against the test split are exactly the floor's computation
    let floor = r["fd_pixels_real"].as_f64().unwrap();
    assert!((floor - fr).abs() < 1e-4 * fr.max(1.0), "{floor} vs {fr}");

    // wrong shape: exit 2 naming the file
    let small = dir.path().join("small.npy");
    diffuse::io::write_npy_f32(&small, &[4, 1, 8, 7], &[0.5; 4 * 56]).unwrap();
    let o = diffuse(&["eval", "samples", "--samples", small.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("small.npy") || err.contains("[1, 8, 7]"), "{err}");
}

/// A model trained on a folder is evaluated on that folder when `--data` is not given (never
/// silently on the bundled MNIST), by `eval nll` and by `eval samples` on its samples.
#[test]
fn evaluation_defaults_to_the_runs_own_data() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("tiles");
    std::fs::create_dir_all(&folder).unwrap();
    for i in 0..8u8 {
        let img = image::RgbImage::from_fn(8, 8, |x, y| image::Rgb([i * 30, (x * 30) as u8, (y * 30) as u8]));
        img.save(folder.join(format!("{i}.png"))).unwrap();
    }
    let run = dir.path().join("run");
    ok(&diffuse(&[
        "train",
        "--data",
        folder.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--steps",
        "2",
        "--batch",
        "4",
        "--timesteps",
        "20",
        "--grid-size",
        "0",
        "--sample-every",
        "0",
    ]));
    let o = diffuse(&[
        "eval",
        "nll",
        "--checkpoint",
        run.to_str().unwrap(),
        "--split",
        "train",
        "--n-images",
        "2",
        "--json",
    ]);
    ok(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["data"].as_str().unwrap().contains("tiles"), "{v}");

    let samples = dir.path().join("samples");
    ok(&diffuse(&[
        "sample",
        "--checkpoint",
        run.to_str().unwrap(),
        "--n",
        "3",
        "--steps",
        "2",
        "--out",
        samples.to_str().unwrap(),
    ]));
    let o = diffuse(&[
        "eval",
        "samples",
        "--samples",
        samples.join("samples.npy").to_str().unwrap(),
        "--split",
        "train",
        "--json",
    ]);
    ok(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["data"].as_str().unwrap().contains("tiles"), "{v}");
    // the folder has no test split: a one-line error that says what to do
    let o = diffuse(&[
        "eval",
        "nll",
        "--checkpoint",
        run.to_str().unwrap(),
        "--n-images",
        "2",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--split train"));
}
