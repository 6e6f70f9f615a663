//! diffusers interop through the command line: `diffuse export --format diffusers` writes a
//! pipeline folder that our own loader reads back to the same network and schedule, and bad
//! diffusers folders given to a command (`diffuse eval nll --diffusers`, whose loader `diffuse
//! sample --diffusers` shares) fail with a one-line error and exit code 2.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use diffuse::denoiser::{Denoiser, NoiseLevel, Prediction};
use diffuse::nets::diffusers::{scheduler_json, WEIGHTS_FILE};
use diffuse::nets::scheduler_config::{DiffusersBetaSchedule, SchedulerConfig};
use diffuse::pipeline::{load_checkpoint, load_diffusers};
use diffuse::schedule::{BetaSchedule, Schedule};

fn diffuse(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = diffuse(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Asserts exit code 2 and a one-line error containing every needle.
fn bad(args: &[&str], needles: &[&str]) {
    let out = diffuse(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: {err:?} lacks {n:?}");
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A tiny `diffuse train` run: demo preset on 16x16 MNIST, 3 steps, the Jabri sigmoid schedule
/// (exported as `trained_betas`) and v prediction.
fn tiny_run(dir: &Path) {
    ok(&[
        "train",
        "--out",
        s(dir),
        "--preset",
        "demo",
        "--image-size",
        "16",
        "--steps",
        "3",
        "--batch",
        "4",
        "--grid-size",
        "0",
        "--schedule",
        "sigmoid",
        "--prediction",
        "v",
        "--threads",
        "1",
    ]);
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn export_round_trips_through_our_loader() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    tiny_run(&run);
    for (flag, ema) in [(None, true), (Some("--no-ema"), false)] {
        let out = tmp.path().join(format!("export_{ema}"));
        let mut args = vec![
            "export",
            "--checkpoint",
            s(&run),
            "--format",
            "diffusers",
            "--out",
            s(&out),
            "--json",
        ];
        args.extend(flag);
        let summary: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
        assert_eq!(summary["beta_schedule"], "trained_betas");
        assert_eq!(summary["prediction_type"], "v");
        assert_eq!(summary["weights"], if ema { "EMA" } else { "raw" });
        // the demo U-Net (1,062,497) and the class table of the labelled mnist5k (11 x 128)
        assert_eq!(summary["parameters"], 1_062_497 + 11 * 128);
        for f in [
            "model_index.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "scheduler/scheduler_config.json",
        ] {
            assert!(out.join(f).is_file(), "{f}");
        }
        let index: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(out.join("model_index.json")).unwrap()).unwrap();
        assert_eq!(index["_class_name"], "DDPMPipeline");
        assert_eq!(index["unet"][1], "UNet2DModel");
        assert_eq!(index["scheduler"][1], "DDPMScheduler");

        let ours = load_checkpoint(&run, ema, &Device::Cpu).unwrap();
        let back = load_diffusers(&out, None, &Device::Cpu).unwrap();
        assert_eq!(back.shape, ours.shape);
        assert_eq!(back.denoiser.prediction, Prediction::V);
        // The same schedule: trained_betas are our f64 betas printed by serde_json (shortest
        // round-trip form) and parsed back, exact up to serde_json's default parser, which is
        // correctly rounded except in rare cases off by one ulp (2.2e-16 relative).
        for (a, b) in back.schedule().beta.iter().zip(&ours.schedule().beta) {
            assert!((a - b).abs() <= 4e-16 * b, "{a} vs {b}");
        }
        assert_eq!(back.schedule().timesteps(), 1000);
        // The same network and weights: bit-identical outputs at a few levels.
        let x = diffuse::rng::Rng::new(3)
            .randn(&[2, 1, 16, 16], &Device::Cpu)
            .unwrap();
        for i in [0usize, 417, 999] {
            let levels = vec![NoiseLevel::from_alpha_bar(ours.schedule().alpha_bar[i]); 2];
            let a = ours.denoiser.output(&x, &levels).unwrap();
            let b = back.denoiser.output(&x, &levels).unwrap();
            assert_eq!(to_vec(&a), to_vec(&b), "level {i}");
        }
    }
    // EMA and raw weights differ after 3 steps, so each export carries the weights asked for.
    let a = fs::read(tmp.path().join("export_true/unet").join(WEIGHTS_FILE)).unwrap();
    let b = fs::read(tmp.path().join("export_false/unet").join(WEIGHTS_FILE)).unwrap();
    assert_ne!(a, b);

    // A non-empty --out is refused unless --force.
    let out = tmp.path().join("export_true");
    bad(
        &["export", "--checkpoint", s(&run), "--out", s(&out)],
        &["not empty", "--force"],
    );
    ok(&["export", "--checkpoint", s(&run), "--out", s(&out), "--force"]);
    // Not a run.
    bad(
        &[
            "export",
            "--checkpoint",
            s(tmp.path()),
            "--out",
            s(&tmp.path().join("x")),
        ],
        &[],
    );
}

/// Every named schedule (and non-default parameters) written as a diffusers scheduler config
/// and parsed back gives the same betas; the named ones map to diffusers' names.
#[test]
fn exported_scheduler_configs_parse_back_to_the_same_schedule() {
    let mut schedules: Vec<BetaSchedule> = BetaSchedule::NAMES
        .iter()
        .map(|n| BetaSchedule::from_name(n).unwrap())
        .collect();
    schedules.push(BetaSchedule::Linear {
        beta_start: 3e-4,
        beta_end: 0.035,
    });
    schedules.push(BetaSchedule::Cosine {
        s: 0.004,
        max_beta: 0.999,
    });
    for bs in &schedules {
        for t in [1000usize, 37] {
            for pred in [Prediction::Eps, Prediction::X0, Prediction::V] {
                let cfg = SchedulerConfig::for_training(bs, t, pred).unwrap();
                let text = serde_json::to_string_pretty(&scheduler_json(&cfg)).unwrap();
                let back = SchedulerConfig::from_json(&serde_json::from_str(&text).unwrap()).unwrap();
                assert_eq!(back.prediction_type, pred);
                assert_eq!(back.num_train_timesteps, t);
                let want = Schedule::new(bs, t).unwrap();
                let got = back.schedule().unwrap();
                // same betas up to serde_json's float parsing (see above)
                for (i, (a, b)) in got.beta.iter().zip(&want.beta).enumerate() {
                    assert!((a - b).abs() <= 4e-16 * b, "{bs:?} T={t} beta[{i}]: {a} vs {b}");
                }
                let named = match bs {
                    BetaSchedule::Linear { .. } => Some(DiffusersBetaSchedule::Linear),
                    BetaSchedule::ScaledLinear { .. } => Some(DiffusersBetaSchedule::ScaledLinear),
                    BetaSchedule::Cosine { s, .. } if *s == 0.008 => {
                        Some(DiffusersBetaSchedule::SquaredcosCapV2)
                    }
                    _ => None,
                };
                match named {
                    Some(n) => {
                        assert_eq!(back.beta_schedule, n, "{bs:?}");
                        assert!(back.trained_betas.is_none());
                    }
                    None => assert!(back.trained_betas.is_some(), "{bs:?}"),
                }
                // sampling choices: diffuse's defaults
                assert!(!back.clip_sample);
            }
        }
    }
}

// ---- bad folders -------------------------------------------------------------------------

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/diffusers")
        .join(name)
}

/// Copies a fixture model folder (files only) into a temp dir so a test can break it.
fn scratch(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(fixture(name)).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    tmp
}

/// A copy of the `attn_multihead_1ch16` pipeline folder (unet + scheduler) under `root/pipe`:
/// the folder and its scheduler_config.json.
fn pipeline_copy(root: &Path) -> (PathBuf, PathBuf) {
    let pipe = root.join("pipe");
    fs::create_dir_all(pipe.join("unet")).unwrap();
    fs::create_dir_all(pipe.join("scheduler")).unwrap();
    for f in ["config.json", WEIGHTS_FILE] {
        fs::copy(
            fixture("attn_multihead_1ch16/unet").join(f),
            pipe.join("unet").join(f),
        )
        .unwrap();
    }
    let sc = pipe.join("scheduler/scheduler_config.json");
    fs::copy(
        fixture("attn_multihead_1ch16/scheduler/scheduler_config.json"),
        &sc,
    )
    .unwrap();
    (pipe, sc)
}

fn edit_json(p: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_str(&fs::read_to_string(p).unwrap()).unwrap();
    f(&mut v);
    fs::write(p, serde_json::to_string(&v).unwrap()).unwrap();
}

fn nll(dir: &Path, needles: &[&str]) {
    bad(
        &["eval", "nll", "--diffusers", s(dir), "--n-images", "1"],
        needles,
    );
}

#[test]
fn bad_diffusers_folders_exit_2_with_one_line() {
    let case = "plain_scaleshift_3ch32";

    // Missing weights file.
    let d = scratch(case);
    fs::remove_file(d.path().join(WEIGHTS_FILE)).unwrap();
    nll(d.path(), &["no weights", WEIGHTS_FILE]);

    // Pickle weights.
    fs::write(d.path().join("diffusion_pytorch_model.bin"), b"\x80\x02}q\x00.").unwrap();
    nll(
        d.path(),
        &["diffusion_pytorch_model.bin", "pickle", "safetensors"],
    );

    // Missing config.
    let d = scratch(case);
    fs::remove_file(d.path().join("config.json")).unwrap();
    nll(d.path(), &["config.json"]);

    // No such folder.
    nll(&d.path().join("nope"), &["nope"]);

    // Weights of other shapes than the config says.
    let d = scratch(case);
    edit_json(&d.path().join("config.json"), |v| {
        v["block_out_channels"][0] = 16.into()
    });
    nll(d.path(), &["wrong shape", "conv_in.weight"]);

    // Unsupported block type.
    let d = scratch(case);
    edit_json(&d.path().join("config.json"), |v| {
        v["up_block_types"][0] = "CrossAttnUpBlock2D".into()
    });
    nll(d.path(), &["up_block_types[0]", "CrossAttnUpBlock2D"]);

    // A missing tensor, by name.
    let d = scratch(case);
    let w = d.path().join(WEIGHTS_FILE);
    let mut t: HashMap<String, Tensor> = candle_core::safetensors::load(&w, &Device::Cpu).unwrap();
    t.remove("conv_norm_out.weight").unwrap();
    candle_core::safetensors::save(&t, &w).unwrap();
    nll(d.path(), &["missing tensor(s): conv_norm_out.weight"]);

    // A scheduler config diffuse cannot honour: its own folder's, and one given by flag.
    let p = tempfile::tempdir().unwrap();
    let (pipe, sc) = pipeline_copy(p.path());
    edit_json(&sc, |v| v["beta_schedule"] = "laplace".into());
    nll(&pipe, &["scheduler_config.json", "beta_schedule", "laplace"]);
    bad(
        &[
            "eval",
            "nll",
            "--diffusers",
            s(&pipe),
            "--scheduler-config",
            s(&p.path().join("missing.json")),
        ],
        &["missing.json"],
    );
    // A good --scheduler-config replaces the broken one (which is then not read).
    let good = p.path().join("good.json");
    fs::copy(
        fixture("attn_multihead_1ch16/scheduler/scheduler_config.json"),
        &good,
    )
    .unwrap();
    let m = load_diffusers(&pipe, Some(&good), &Device::Cpu).unwrap();
    assert_eq!(m.scheduler, Some(SchedulerConfig::default()));
}

/// diffusers files may carry keys this loader does not read: they are accepted, and
/// `--verbose` lists them on stderr, one line per file (`_` metadata not listed).
#[test]
fn verbose_lists_the_ignored_diffusers_fields() {
    let p = tempfile::tempdir().unwrap();
    let (pipe, sc) = pipeline_copy(p.path());
    edit_json(&pipe.join("unet/config.json"), |v| {
        v["cross_attention_dim"] = 768.into();
        v["encoder_hid_dim"] = serde_json::Value::Null;
    });
    edit_json(&sc, |v| v["skip_prk_steps"] = true.into());
    let run = |verbose: bool| {
        let out_dir = p.path().join(if verbose { "gen-v" } else { "gen" });
        let mut args = vec![
            "sample",
            "--diffusers",
            s(&pipe),
            "--sampler",
            "ddim",
            "--steps",
            "2",
            "--n",
            "1",
            "--out",
            s(&out_dir),
        ];
        if verbose {
            args.push("--verbose");
        }
        let out = diffuse(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stderr).unwrap()
    };
    let quiet = run(false);
    assert!(!quiet.contains("ignored fields"), "{quiet}");
    let loud = run(true);
    let unet = format!(
        "{}: ignored fields: cross_attention_dim, encoder_hid_dim",
        pipe.join("unet/config.json").display()
    );
    let sched = format!("{}: ignored fields: skip_prk_steps", sc.display());
    assert!(loud.lines().any(|l| l == unet), "{loud}");
    assert!(loud.lines().any(|l| l == sched), "{loud}");
}
