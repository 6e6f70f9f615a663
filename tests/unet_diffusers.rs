//! Conformance with diffusers: the U-Net reproduces `UNet2DModel` outputs made by
//! `tests/fixtures/diffusers/make_fixtures.py` (diffusers 0.42.1, torch 2.15, CPU, float32),
//! scheduler configs give diffusers' alphas_cumprod, and bad model folders give clear errors.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use diffuse::denoiser::Prediction;
use diffuse::nets::diffusers::{self, WEIGHTS_FILE};
use diffuse::nets::scheduler_config::{SchedulerClass, SchedulerConfig};
use diffuse::Error;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/diffusers")
}

const CASES: [&str; 6] = [
    "attn_multihead_1ch16",
    "plain_scaleshift_3ch32",
    "attn_scaleshift_center_3ch16",
    "resnet_resample_oddembed_1ch32",
    "ddpm_like_deprecated_fp16_3ch32",
    "no_mid_block_1ch16",
];

/// max |a - b| / max |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap();
    let m = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    d.to_scalar::<f32>().unwrap() as f64 / m.to_scalar::<f32>().unwrap() as f64
}

#[test]
fn fixtures_reproduce_diffusers_outputs() {
    for name in CASES {
        let dir = fixtures().join(name);
        let model = diffusers::load(&dir, &Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"));
        let io = candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu).unwrap();
        for (x, t, y) in [
            ("sample", "timesteps", "output"),
            ("sample2", "timesteps2", "output2"),
        ] {
            let out = model.unet.forward(&io[x], &io[t]).unwrap();
            assert_eq!(out.dims(), io[y].dims(), "{name}");
            let e = rel_err(&out, &io[y]);
            // float32 on both sides, different summation orders (candle's gemm vs oneDNN) and
            // sin/cos/exp implementations: observed errors are ~1e-6; 1e-4 is the bar.
            assert!(e < 1e-4, "{name} {y}: relative error {e:.2e}");
            println!("{name} {y}: max |ours - diffusers| / max |diffusers| = {e:.2e}");
        }
    }
}

#[test]
fn fixture_folders_have_the_expected_extras() {
    // The pipeline-layout fixture carries diffusers' default DDPMScheduler config.
    let m = diffusers::load(&fixtures().join("attn_multihead_1ch16"), &Device::Cpu).unwrap();
    let s = m.scheduler.expect("scheduler config");
    assert_eq!(s.class, SchedulerClass::Ddpm);
    assert_eq!(s, SchedulerConfig::default());
    assert_eq!(m.config.attention_head_dim, Some(8));
    // The old-names fp16 fixture loads with renamed, upcast tensors.
    let files = diffusers::locate(&fixtures().join("ddpm_like_deprecated_fp16_3ch32")).unwrap();
    let (_, t) = diffusers::load_tensors(&files).unwrap();
    assert!(t.contains_key("down_blocks.1.attentions.0.to_out.0.weight"));
    assert!(t.values().all(|v| v.dtype() == DType::F32));
}

/// Copies a fixture into a temp dir so a test can break it.
fn scratch(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(fixtures().join(name)).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    tmp
}

fn load_err(dir: &Path) -> Error {
    diffusers::load(dir, &Device::Cpu).expect_err("loading a broken folder must fail")
}

fn check_message(e: &Error, wants: &[&str]) {
    let s = e.to_string();
    for w in wants {
        assert!(s.contains(w), "message {s:?} lacks {w:?}");
    }
    assert!(!s.contains('\n'), "one line: {s:?}");
    assert!(
        e.is_user_error(),
        "bad input should be a user error (exit 2): {s}"
    );
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
}

#[test]
fn bad_folders_give_clear_errors() {
    let case = "plain_scaleshift_3ch32";

    // Missing weights file.
    let d = scratch(case);
    fs::remove_file(d.path().join(WEIGHTS_FILE)).unwrap();
    check_message(&load_err(d.path()), &["no weights", WEIGHTS_FILE]);

    // Pickle weights instead of safetensors.
    fs::write(d.path().join("diffusion_pytorch_model.bin"), b"\x80\x02}q\x00.").unwrap();
    check_message(
        &load_err(d.path()),
        &["diffusion_pytorch_model.bin", "pickle", "safetensors"],
    );

    // Missing config.
    let d = scratch(case);
    fs::remove_file(d.path().join("config.json")).unwrap();
    check_message(&load_err(d.path()), &["no UNet config", "config.json"]);

    // Not a directory at all.
    check_message(&load_err(&d.path().join("nope")), &["not a directory"]);

    // Weights of another shape than the config says.
    let d = scratch(case);
    edit_config(d.path(), |v| v["in_channels"] = 1.into());
    check_message(
        &load_err(d.path()),
        &[
            "wrong shape",
            "conv_in.weight (file [8, 3, 3, 3], config expects [8, 1, 3, 3])",
        ],
    );

    // Unsupported block type.
    let d = scratch(case);
    edit_config(d.path(), |v| {
        v["down_block_types"][1] = "CrossAttnDownBlock2D".into()
    });
    check_message(
        &load_err(d.path()),
        &["config.json", "down_block_types[1]", "CrossAttnDownBlock2D"],
    );

    // Unsupported value that changes the math; a wrong type.
    let d = scratch(case);
    edit_config(d.path(), |v| v["time_embedding_type"] = "fourier".into());
    check_message(&load_err(d.path()), &["time_embedding_type", "fourier"]);
    let d = scratch(case);
    edit_config(d.path(), |v| v["layers_per_block"] = "two".into());
    check_message(
        &load_err(d.path()),
        &["config.json: field `layers_per_block`: expected a non-negative integer, found \"two\""],
    );
    // An unknown key is accepted (diffusers adds keys with every release) and listed for
    // --verbose.
    let d = scratch(case);
    edit_config(d.path(), |v| v["cross_attention_dim"] = 768.into());
    diffuse::nets::diffusers::load(d.path(), &Device::Cpu).unwrap();
    let ignored = diffuse::nets::diffusers::ignored_fields(d.path(), None).unwrap();
    let unet: Vec<_> = ignored
        .iter()
        .filter(|(f, _)| f.ends_with("config.json"))
        .collect();
    assert_eq!(unet.len(), 1, "{ignored:?}");
    assert_eq!(unet[0].1, vec!["cross_attention_dim".to_string()]);

    // A missing and an unexpected tensor, by name.
    let d = scratch(case);
    let w = d.path().join(WEIGHTS_FILE);
    let mut t: HashMap<String, Tensor> = candle_core::safetensors::load(&w, &Device::Cpu).unwrap();
    t.remove("mid_block.resnets.1.conv2.bias").unwrap();
    t.insert(
        "mid_block.extra.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, &w).unwrap();
    check_message(
        &load_err(d.path()),
        &[
            "missing tensor(s): mid_block.resnets.1.conv2.bias",
            "unexpected tensor(s): mid_block.extra.weight",
        ],
    );

    // A truncated weights file.
    let bytes = fs::read(&w).unwrap();
    fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    check_message(&load_err(d.path()), &["not a readable safetensors file"]);
}

#[test]
fn scheduler_configs_give_diffusers_alphas_cumprod() {
    let text = fs::read_to_string(fixtures().join("scheduler_trajectories.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = v["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 6);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let cfg =
            SchedulerConfig::from_json(&c["scheduler_config"]).unwrap_or_else(|e| panic!("{name}: {e}"));
        let want_class = if name.starts_with("ddim") {
            SchedulerClass::Ddim
        } else {
            SchedulerClass::Ddpm
        };
        assert_eq!(cfg.class, want_class, "{name}");
        let pred = c["scheduler_config"]["prediction_type"].as_str().unwrap();
        assert_eq!(
            cfg.prediction_type,
            Prediction::from_name(pred).unwrap(),
            "{name}"
        );
        let s = cfg.schedule().unwrap();
        let theirs: Vec<f64> = c["alphas_cumprod_f32"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(theirs.len(), s.timesteps(), "{name}");
        let mut worst = 0.0f64;
        for (i, (&a, &b)) in s.alpha_bar.iter().zip(&theirs).enumerate() {
            // diffusers builds betas and their cumulative product in float32: one rounding
            // (6e-8 relative) per factor, so after t factors the error is a random walk of
            // about sqrt(t) * 6e-8 ~ 2e-6 at t = 1000. 2e-5 relative (+1e-9 absolute where
            // alpha_bar -> 0 under zero-terminal-SNR) bounds it; a wrong schedule is off by
            // orders of magnitude more (e.g. our Jabri sigmoid vs GeoDiff: ~1e-1).
            let tol = 2e-5 * b.abs() + 1e-9;
            assert!(
                (a - b).abs() <= tol,
                "{name}: alpha_bar[{i}] = {a}, diffusers {b}"
            );
            if b > 1e-3 {
                worst = worst.max((a - b).abs() / b);
            }
        }
        println!("{name}: max relative alpha_bar difference {worst:.1e}");
    }
}

#[test]
fn export_is_loadable_and_reproduces_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let src = diffusers::load(&fixtures().join("attn_scaleshift_center_3ch16"), &Device::Cpu).unwrap();
    let (_, tensors) = diffusers::load_tensors(&src.files).unwrap();
    diffusers::export_unet(dir.path(), &src.config, &tensors).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["_class_name"], "UNet2DModel");
    assert_eq!(cfg["resnet_time_scale_shift"], "scale_shift");
    let back = diffusers::load(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(back.config, src.config);
    let io = candle_core::safetensors::load(
        fixtures().join("attn_scaleshift_center_3ch16/io.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let out = back.unet.forward(&io["sample"], &io["timesteps"]).unwrap();
    assert!(rel_err(&out, &io["output"]) < 1e-4);
}

#[test]
fn class_conditional_unet_reproduces_diffusers() {
    // UNet2DModel(num_class_embeds = 11) made by make_class_fixture.py; labels include row 10
    let dir = fixtures().join("class_cond_1ch16");
    let model = diffusers::load(&dir, &Device::Cpu).unwrap();
    assert_eq!(model.config.num_class_embeds, Some(11));
    // a foreign diffusers model: no null-class marker, so all 11 rows are classes
    assert_eq!(model.config.null_class, None);
    let io = candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu).unwrap();
    let labels = io["class_labels"].to_dtype(DType::U32).unwrap();
    let out = model
        .unet
        .forward_class(&io["sample"], &io["timesteps"], &labels)
        .unwrap();
    let e = rel_err(&out, &io["output"]);
    println!("class_cond_1ch16: max |ours - diffusers| / max |diffusers| = {e:.2e}");
    assert!(e < 1e-4, "relative error {e:.2e}");
    // teeth: other labels give another output; no labels is an error on a conditional net
    let shifted = Tensor::new(&[6u32, 1, 9, 4], &Device::Cpu).unwrap();
    let other = model
        .unet
        .forward_class(&io["sample"], &io["timesteps"], &shifted)
        .unwrap();
    assert!(rel_err(&other, &io["output"]) > 1e-2);
    let e = model.unet.forward(&io["sample"], &io["timesteps"]).unwrap_err();
    assert!(e.to_string().contains("class labels are required"), "{e}");
    // a label past the table
    let bad = Tensor::new(&[11u32, 0, 0, 0], &Device::Cpu).unwrap();
    let e = model
        .unet
        .forward_class(&io["sample"], &io["timesteps"], &bad)
        .unwrap_err();
    assert!(e.to_string().contains("class 11"), "{e}");
}

#[test]
fn class_conditional_export_round_trips_with_its_null_class() {
    let src = diffusers::load(&fixtures().join("class_cond_1ch16"), &Device::Cpu).unwrap();
    let (_, tensors) = diffusers::load_tensors(&src.files).unwrap();
    let mut config = src.config.clone();
    config.null_class = Some(10);
    let dir = tempfile::tempdir().unwrap();
    diffusers::export_unet(dir.path(), &config, &tensors).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["num_class_embeds"], 11);
    assert_eq!(cfg["class_embed_type"], serde_json::Value::Null);
    assert_eq!(cfg["_diffuse_null_class"], 10);
    let back = diffusers::load(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(back.config, config);
    let io = candle_core::safetensors::load(fixtures().join("class_cond_1ch16/io.safetensors"), &Device::Cpu)
        .unwrap();
    let labels = io["class_labels"].to_dtype(DType::U32).unwrap();
    let out = back
        .unet
        .forward_class(&io["sample"], &io["timesteps"], &labels)
        .unwrap();
    assert!(rel_err(&out, &io["output"]) < 1e-4);
}
