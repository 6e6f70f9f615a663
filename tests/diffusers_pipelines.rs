//! Whole pipelines against diffusers on a *trained* network: `DDIMPipeline` (eta 0) and
//! `DDPMPipeline`, run by diffusers 0.42.1 from a recorded x_T on a small trained
//! `UNet2DModel` (attention at 8x8, `resnet_time_scale_shift = scale_shift`,
//! `squaredcos_cap_v2` betas), for every combination of `timestep_spacing` (leading, trailing,
//! linspace) x `clip_sample` x `set_alpha_to_one` (DDIM). Our model loader + the sampler built
//! from the case's scheduler config, started from the same x_T (and, for DDPM, fed diffusers'
//! recorded variance noise through `NoiseStreams::replay`), must end where the pipeline ended,
//! before its `x / 2 + 0.5` clamp, to 1e-4 of the sample's largest value. Fixture:
//! `tests/fixtures/pipelines/make_fixture.py` (trains the network, runs the pipelines).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use diffuse::pipeline::load_diffusers;
use diffuse::rng::NoiseStreams;
use diffuse::samplers::diffusers::from_scheduler_config;
use diffuse::samplers::{NoObserver, Sampler, SamplerKind};
use serde_json::Value;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pipelines")
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Runs one recorded case through our sampler; returns (max |ours - diffusers|, max |diffusers|).
fn run_case(case: &Value, tensors: &HashMap<String, Tensor>, z: &Tensor, scratch: &Path) -> (f64, f64) {
    let name = case["name"].as_str().unwrap();
    let mut config = case["config"].clone();
    config["_class_name"] = case["scheduler_class"].clone();
    let cfg_path = scratch.join(format!("{name}.json"));
    std::fs::write(&cfg_path, serde_json::to_string(&config).unwrap()).unwrap();
    let model = load_diffusers(&fixture().join("model"), Some(&cfg_path), &Device::Cpu).unwrap();
    let sampler_name = if case["pipeline"] == "DDIMPipeline" {
        "ddim"
    } else {
        "ddpm"
    };
    let steps = case["steps"].as_u64().unwrap() as usize;
    let eta = (sampler_name == "ddim").then_some(0.0);
    let cfg = model.scheduler.clone().unwrap();
    let sampler = from_scheduler_config(
        &cfg,
        model.schedule(),
        SamplerKind::from_name(sampler_name).unwrap(),
        steps,
        eta,
    )
    .unwrap();
    // the timesteps diffusers visited
    let ours: Vec<usize> = sampler.chain().steps.iter().filter_map(|s| s.index).collect();
    let theirs: Vec<usize> = case["timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(ours, theirs, "{name}: timesteps");
    let n = z.dims()[0];
    let mut noise = match tensors.get(&format!("{name}/noise")) {
        // [steps - 1, n, ...] -> per sample, the deviates of every step in order
        Some(e) => {
            let per_step = e.dims()[1..].iter().product::<usize>() / n;
            let all = values(e);
            let rows = (0..n)
                .map(|i| {
                    all.chunks(per_step * n)
                        .flat_map(|step| step[i * per_step..(i + 1) * per_step].iter().map(|&v| v as f64))
                        .collect()
                })
                .collect();
            NoiseStreams::replay(rows)
        }
        None => NoiseStreams::new(0, 0, n),
    };
    let res = sampler
        .sample(&model.denoiser, z.clone(), &mut noise, &mut NoObserver)
        .unwrap();
    let ours = values(&res.x);
    let theirs = values(&tensors[&format!("{name}/final")]);
    assert_eq!(ours.len(), theirs.len(), "{name}");
    let diff = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs() as f64)
        .fold(0.0, f64::max);
    let scale = theirs.iter().map(|v| v.abs() as f64).fold(0.0, f64::max);
    (diff, scale)
}

#[test]
fn ddim_and_ddpm_pipelines_on_a_trained_network_match_diffusers_from_the_same_noise() {
    let dir = fixture();
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let tensors = candle_core::safetensors::load(dir.join("cases.safetensors"), &Device::Cpu).unwrap();
    let z = diffuse::io::read_npy(&dir.join("z.npy")).unwrap();
    let z = Tensor::from_vec(
        z.data.iter().map(|&v| v as f32).collect::<Vec<_>>(),
        z.shape.clone(),
        &Device::Cpu,
    )
    .unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let cases = index["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 18, "3 spacings x (4 DDIM + 2 DDPM) cases");
    let mut worst = (String::new(), 0.0);
    for case in cases {
        let (diff, scale) = run_case(case, &tensors, &z, scratch.path());
        let rel = diff / scale;
        let name = case["name"].as_str().unwrap().to_string();
        eprintln!("{name}: max |ours - diffusers| = {diff:.2e} ({rel:.2e} of max |x| = {scale:.3})");
        if rel > worst.1 {
            worst = (name, rel);
        }
    }
    eprintln!("worst: {} {:.2e}", worst.0, worst.1);
    assert!(
        worst.1 < 1e-4,
        "{} differs from diffusers' pipeline by {:.2e} relative",
        worst.0,
        worst.1
    );
}
