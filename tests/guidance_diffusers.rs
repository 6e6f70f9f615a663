//! Classifier-free guidance against diffusers: deterministic DDIM (eta 0, 50 steps) with the exact
//! guided denoiser of a labelled mixture at w in {0, 1, 3, 7.5}, started from the fixture's z via
//! `InitNoise`, equals diffusers' `DDIMScheduler` driven by the same guided denoiser from the same
//! x_T (`tests/fixtures/guidance/ddim_guided.json`, made by `make_fixture.py` beside it) to 1e-5
//! relative. diffusers keeps alpha_bar in float32, we in float64: the difference is a few 1e-6.

use candle_core::{DType, Device};
use serde_json::Value;

use diffuse::gmm::Gmm;
use diffuse::nets::scheduler_config::SchedulerConfig;
use diffuse::oracle::ConditionalOracle;
use diffuse::samplers::diffusers::from_scheduler_config;
use diffuse::samplers::{sample_batched_guided, InitNoise, NoObserver, SamplerKind};

fn fixture() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/guidance/ddim_guided.json"
    ))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn rows(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()))
        .collect()
}

/// Runs our DDIM with guidance `w` from the fixture's z; returns the samples (row-major).
fn ours(f: &Value, w: f64) -> Vec<f64> {
    let gmm = Gmm::from_json(&f["mixture"].to_string(), std::path::Path::new("fixture mixture")).unwrap();
    let oracle = ConditionalOracle::new(gmm).unwrap();
    let cfg = SchedulerConfig::from_json(&f["scheduler_config"]).unwrap();
    let schedule = cfg.schedule().unwrap();
    let steps = f["steps"].as_u64().unwrap() as usize;
    let ddim = SamplerKind::from_name("ddim").unwrap();
    let sampler = from_scheduler_config(&cfg, &schedule, ddim, steps, Some(0.0)).unwrap();
    let z = rows(&f["z"]);
    let n = z.len() / 2;
    let init = InitNoise::from_values(std::path::Path::new("z"), &[n, 2], z, &[2]).unwrap();
    let classes: Vec<Option<usize>> = f["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Some(c.as_u64().unwrap() as usize))
        .collect();
    let out = sample_batched_guided(
        &sampler,
        &oracle,
        &classes,
        w,
        &[2],
        0,
        5, // batches of 5 rows: the guided denoiser follows each batch's classes
        Some(&init),
        DType::F64,
        &Device::Cpu,
        &mut NoObserver,
    )
    .unwrap();
    out.x.flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

fn rel(a: &[f64], b: &[f64]) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn guided_ddim_equals_diffusers_ddim_scheduler() {
    let f = fixture();
    let mut results = Vec::new();
    for run in f["runs"].as_array().unwrap() {
        let w = run["guidance_scale"].as_f64().unwrap();
        let want = rows(&run["x0"]);
        let got = ours(&f, w);
        let r = rel(&got, &want);
        println!("w = {w}: max |ours - diffusers| / max |diffusers| = {r:.2e}");
        assert!(r < 1e-5, "w = {w}: {r}");
        results.push((w, got));
    }
    // teeth: the scales give different samples (a guidance that ignored w would match only one)
    for pair in results.windows(2) {
        assert!(
            rel(&pair[0].1, &pair[1].1) > 1e-2,
            "w = {} and {} agree",
            pair[0].0,
            pair[1].0
        );
    }
}
