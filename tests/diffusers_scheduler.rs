//! Scheduler conformance with diffusers: our DDPM and DDIM samplers, built from a diffusers
//! scheduler config by `samplers::diffusers::from_scheduler_config`, reproduce every trajectory
//! of `tests/fixtures/diffusers/scheduler_trajectories.json` (DDPMScheduler / DDIMScheduler runs
//! of diffusers 0.42.1 for a fixed model output and recorded noise), and
//! `samplers::diffusers::set_timesteps` reproduces `set_timesteps.json` (every step count of a
//! few T). Both files are made by `make_fixtures.py`; these tests need no Python.

use std::cell::RefCell;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use diffuse::denoiser::{Denoiser, NoiseLevel, Prediction};
use diffuse::nets::scheduler_config::{SchedulerClass, SchedulerConfig};
use diffuse::process::{ddpm_level, Process};
use diffuse::rng::NoiseStreams;
use diffuse::samplers::chain::ReverseChain;
use diffuse::samplers::diffusers::{from_scheduler_config, set_timesteps};
use diffuse::samplers::{build_sampler, Sampler, SamplerKind, SamplerOptions, Trajectory};
use diffuse::schedule::Schedule;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/diffusers")
}

fn json(name: &str) -> Value {
    serde_json::from_str(&fs::read_to_string(fixtures().join(name)).unwrap()).unwrap()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// A denoiser that returns the same output at every call (the fixture's `model_output`) and
/// records the noise levels it was called at.
struct FixedOutput {
    out: Tensor,
    prediction: Prediction,
    calls: RefCell<Vec<NoiseLevel>>,
}

impl Denoiser for FixedOutput {
    fn prediction(&self) -> Prediction {
        self.prediction
    }

    fn output(&self, x_t: &Tensor, levels: &[NoiseLevel]) -> diffuse::Result<Tensor> {
        assert_eq!(x_t.dims(), self.out.dims());
        assert!(levels.iter().all(|l| *l == levels[0]));
        self.calls.borrow_mut().push(levels[0]);
        Ok(self.out.clone())
    }
}

/// The schedule of diffusers' float32 `alphas_cumprod` table: betas `1 - ab_t / ab_{t-1}` in
/// f64, whose f64 cumulative product gives the table back to ~1e-15 relative. Driving our
/// samplers with it leaves only the stepping arithmetic to compare.
fn schedule_from_alphas_cumprod(ab: &[f64]) -> Schedule {
    let mut betas = Vec::with_capacity(ab.len());
    let mut prev = 1.0;
    for &a in ab {
        betas.push(1.0 - a / prev);
        prev = a;
    }
    Schedule::from_betas(betas).unwrap()
}

struct Case {
    name: String,
    cfg: SchedulerConfig,
    kind: SamplerKind,
    steps: usize,
    eta: Option<f64>,
    timesteps: Vec<usize>,
    alphas_cumprod: Vec<f64>,
    shape: Vec<usize>,
    model_output: Vec<f64>,
    /// diffusers' steps
    steps_rec: Vec<StepRec>,
}

/// One recorded `step` call.
struct StepRec {
    timestep: usize,
    /// x before the step
    sample: Vec<f64>,
    variance_noise: Vec<f64>,
    prev_sample: Vec<f64>,
    pred_original_sample: Vec<f64>,
}

fn cases() -> Vec<Case> {
    let v = json("scheduler_trajectories.json");
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let cfg = SchedulerConfig::from_json(&c["scheduler_config"]).unwrap();
            let kind = match cfg.class {
                SchedulerClass::Ddpm => SamplerKind::from_name("ddpm").unwrap(),
                SchedulerClass::Ddim => SamplerKind::from_name("ddim").unwrap(),
                other => panic!("not a DDPM/DDIM fixture: {other:?}"),
            };
            Case {
                name: c["name"].as_str().unwrap().to_string(),
                kind,
                steps: c["num_inference_steps"].as_u64().unwrap() as usize,
                eta: c["eta"].as_f64(),
                timesteps: c["timesteps"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t.as_u64().unwrap() as usize)
                    .collect(),
                alphas_cumprod: f64s(&c["alphas_cumprod_f32"]),
                shape: c["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect(),
                model_output: f64s(&c["model_output"]),
                steps_rec: c["steps"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| StepRec {
                        timestep: s["timestep"].as_u64().unwrap() as usize,
                        sample: f64s(&s["sample"]),
                        variance_noise: f64s(&s["variance_noise"]),
                        prev_sample: f64s(&s["prev_sample"]),
                        pred_original_sample: f64s(&s["pred_original_sample"]),
                    })
                    .collect(),
                cfg,
            }
        })
        .collect()
}

/// What one run of a sampler on a case produced.
struct Run {
    /// per step: (x after the step, x_0 prediction)
    steps: Vec<(Vec<f64>, Vec<f64>)>,
    /// the levels the denoiser was called at
    calls: Vec<NoiseLevel>,
}

/// Runs `sampler` from the case's x_T with the fixed model output and the recorded noise.
fn run(case: &Case, sampler: &dyn Sampler) -> Run {
    run_steps(case, sampler, 0..case.steps_rec.len())
}

/// Runs `sampler` from diffusers' state before step `steps.start`, with the recorded noise of
/// `steps`.
fn run_steps(case: &Case, sampler: &dyn Sampler, steps: std::ops::Range<usize>) -> Run {
    let dev = Device::Cpu;
    let den = FixedOutput {
        out: Tensor::from_vec(case.model_output.clone(), case.shape.as_slice(), &dev).unwrap(),
        prediction: case.cfg.prediction_type,
        calls: RefCell::new(Vec::new()),
    };
    let x_t = Tensor::from_vec(
        case.steps_rec[steps.start].sample.clone(),
        case.shape.as_slice(),
        &dev,
    )
    .unwrap();
    assert_eq!(x_t.dtype(), DType::F64);
    // row i of the noise: the recorded variance noise of every step, in order
    let rows = case.shape[0];
    let per = case.model_output.len() / rows;
    let mut rec = vec![Vec::new(); rows];
    for s in &case.steps_rec[steps] {
        for (i, r) in rec.iter_mut().enumerate() {
            r.extend_from_slice(&s.variance_noise[i * per..(i + 1) * per]);
        }
    }
    let mut noise = NoiseStreams::replay(rec);
    let mut traj = Trajectory::new(rows, 1);
    sampler.sample(&den, x_t, &mut noise, &mut traj).unwrap();
    let steps = traj.points[1..]
        .iter()
        .map(|p| (p.x.clone(), p.x0_pred.clone().unwrap()))
        .collect();
    Run {
        steps,
        calls: den.calls.into_inner(),
    }
}

/// `max_i |a_i - b_i| / max(1, max_i |b_i|)`: relative for the large x_0 predictions of noisy
/// steps (|x_0| up to ~100 for eps prediction at t ~ 900), absolute below 1.
fn err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn abs_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
}

fn max_abs(a: &[f64]) -> f64 {
    a.iter().fold(0.0f64, |m, v| m.max(v.abs()))
}

/// The size of the terms diffusers' float32 arithmetic combines in one step, at least 1:
/// `x_0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab)` (eps prediction) subtracts terms of size
/// `(|x_t| + |eps|) / sqrt(ab)` (at t = 701 of the linear schedule, 2.9 / 0.082 = 35, while
/// |x_0| <= 1 after clipping), `x_0 = sqrt(ab) x_t - sqrt(1 - ab) v` terms of `|x_t| + |v|`;
/// the update `x_s = a x_0 + b eps (+ c z)` has terms no larger. A float32 rounding of those
/// terms is what diffusers' output carries.
fn float32_terms(pred: Prediction, x_t: &[f64], out: &[f64], alpha_bar: f64) -> f64 {
    let s = match pred {
        Prediction::Eps => (max_abs(x_t) + max_abs(out)) / alpha_bar.sqrt(),
        Prediction::V => max_abs(x_t) + max_abs(out),
        Prediction::X0 => max_abs(out),
    };
    s.max(1.0).max(max_abs(x_t))
}

/// The largest error of `run` against the case's recorded trajectory (prev_sample and
/// pred_original_sample of every step).
fn trajectory_err(case: &Case, r: &Run) -> f64 {
    assert_eq!(r.steps.len(), case.steps_rec.len(), "{}", case.name);
    let mut worst = 0.0f64;
    for ((x, x0), rec) in r.steps.iter().zip(&case.steps_rec) {
        worst = worst
            .max(err(x, &rec.prev_sample))
            .max(err(x0, &rec.pred_original_sample));
    }
    worst
}

#[test]
fn set_timesteps_matches_diffusers_for_every_step_count() {
    let v = json("set_timesteps.json");
    let mut checked = 0;
    let mut rejected = 0;
    for c in v["configs"].as_array().unwrap() {
        let cfg = SchedulerConfig::from_json(&serde_json::json!({
            "num_train_timesteps": c["num_train_timesteps"],
            "timestep_spacing": c["timestep_spacing"],
            "steps_offset": c["steps_offset"],
        }))
        .unwrap();
        let label = format!(
            "T = {}, {} offset {}",
            cfg.num_train_timesteps, c["timestep_spacing"], cfg.steps_offset
        );
        for (k, full) in c["full"].as_object().unwrap() {
            let k: usize = k.parse().unwrap();
            let want: Vec<i64> = full
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_i64().unwrap())
                .collect();
            match set_timesteps(&cfg, k) {
                Ok(ts) => assert_eq!(
                    ts.iter().map(|&t| t as i64).collect::<Vec<_>>(),
                    want,
                    "{label}, K = {k}"
                ),
                Err(e) => assert!(
                    c["digests"][k - 1].is_null(),
                    "{label}, K = {k}: we reject {want:?}: {e}"
                ),
            }
        }
        for (i, d) in c["digests"].as_array().unwrap().iter().enumerate() {
            let k = i + 1;
            match (set_timesteps(&cfg, k), d.is_null()) {
                (Ok(ts), false) => {
                    let sum: i64 = ts.iter().map(|&t| t as i64).sum();
                    let wsum: i64 = ts
                        .iter()
                        .enumerate()
                        .map(|(j, &t)| (j as i64 + 1) * t as i64)
                        .sum();
                    assert_eq!(ts.len(), k);
                    assert_eq!(
                        [sum, wsum],
                        [d[0].as_i64().unwrap(), d[1].as_i64().unwrap()],
                        "{label}, K = {k}"
                    );
                    checked += 1;
                }
                (Err(e), true) => {
                    assert!(e.is_user_error(), "{e}");
                    rejected += 1;
                }
                (Ok(ts), true) => panic!("{label}, K = {k}: diffusers' list is invalid, we gave {ts:?}"),
                (Err(e), false) => panic!("{label}, K = {k}: diffusers gives a valid list, we: {e}"),
            }
        }
    }
    println!("set_timesteps: {checked} step counts match, {rejected} invalid diffusers lists rejected");
    // T = 1000 trailing alone has 122 step counts where numpy's float arange adds a -1.
    assert!(checked > 7000 && rejected > 100, "{checked} {rejected}");
}

#[test]
fn samplers_reproduce_every_diffusers_scheduler_step() {
    // Each step of each trajectory from diffusers' own state x_k (a one-step chain of the
    // sampler, which keeps the sampler's rules: a DDPM step above index 0 adds noise).
    for case in cases() {
        let schedule = schedule_from_alphas_cumprod(&case.alphas_cumprod);
        assert_eq!(
            set_timesteps(&case.cfg, case.steps).unwrap(),
            case.timesteps,
            "{}",
            case.name
        );
        let sampler = from_scheduler_config(&case.cfg, &schedule, case.kind, case.steps, case.eta)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        assert_eq!(sampler.chain().len(), case.steps);
        let mut worst = 0.0f64;
        for (k, rec) in case.steps_rec.iter().enumerate() {
            let one = sampler.with_chain(ReverseChain {
                steps: vec![sampler.chain().steps[k].clone()],
            });
            let r = run_steps(&case, &one, k..k + 1);
            // the network is evaluated at exactly diffusers' timestep
            assert_eq!(
                r.calls,
                vec![ddpm_level(&schedule, rec.timestep)],
                "{} step {k}",
                case.name
            );
            let (x, x0) = &r.steps[0];
            let scale = float32_terms(
                case.cfg.prediction_type,
                &rec.sample,
                &case.model_output,
                case.alphas_cumprod[rec.timestep],
            );
            let e = abs_err(x, &rec.prev_sample).max(abs_err(x0, &rec.pred_original_sample)) / scale;
            worst = worst.max(e);
        }
        println!(
            "{}: one step from diffusers' state, max |ours - diffusers| / (size of diffusers' float32 terms) = {worst:.1e}",
            case.name
        );
        // diffusers steps in float32: each output is a few float32 roundings (6e-8 relative
        // each) of terms no larger than `float32_terms`; observed <= 1.2e-7. Our arithmetic is
        // f64 on the same float32 alpha_bar table.
        assert!(worst < 1e-6, "{}: {worst:.2e}", case.name);
    }
}

#[test]
fn samplers_reproduce_diffusers_scheduler_trajectories() {
    for case in cases() {
        let schedule = schedule_from_alphas_cumprod(&case.alphas_cumprod);
        let sampler = from_scheduler_config(&case.cfg, &schedule, case.kind, case.steps, case.eta).unwrap();
        let r = run(&case, &sampler);
        // the network is evaluated at exactly diffusers' timesteps (DDIM linspace: not where
        // the previous step landed)
        let want: Vec<NoiseLevel> = case.timesteps.iter().map(|&t| ddpm_level(&schedule, t)).collect();
        assert_eq!(r.calls, want, "{}", case.name);
        let e = trajectory_err(&case, &r);
        println!(
            "{}: whole trajectory, max |ours - diffusers| / max(1, |diffusers|) over {} steps = {e:.1e}",
            case.name, case.steps
        );
        // Chained, diffusers' float32 rounding of x_k (~1e-7) re-enters every later step, and
        // x_0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab) multiplies it by 1/sqrt(ab) (7 at t = 600
        // of the linear schedule): observed <= 1.4e-6 (DDIM, eps, linear, steps 3-9). 1e-5
        // bounds that; the choices diffusers makes differently move trajectories by > 1e-3
        // (`our_default_samplers_differ_...` below).
        assert!(e < 1e-5, "{}: {e:.2e}", case.name);
    }
}

#[test]
fn our_f64_tables_reproduce_the_trajectories_to_float32_rounding() {
    // The same runs on `cfg.schedule()` (our f64 betas and alpha_bar) instead of diffusers'
    // float32 table: alpha_bar differs by float32 rounding (<= 2e-5 relative, see
    // tests/unet_diffusers.rs), and x_0 = (x - sqrt(1 - ab) eps) / sqrt(ab) inherits half of
    // it times |x_t| / |x_0| ~ a few; observed <= 5e-6, 1e-4 bounds it.
    for case in cases() {
        let schedule = case.cfg.schedule().unwrap();
        let sampler = from_scheduler_config(&case.cfg, &schedule, case.kind, case.steps, case.eta).unwrap();
        let e = trajectory_err(&case, &run(&case, &sampler));
        println!("{} (f64 tables): {e:.1e}", case.name);
        assert!(e < 1e-4, "{}: {e:.2e}", case.name);
    }
}

/// Where diffusers' choices differ from ours, our default samplers (`build_sampler`) do not
/// reproduce the fixture: each difference that `from_scheduler_config` copies is needed.
#[test]
fn our_default_samplers_differ_exactly_where_diffusers_chooses_differently() {
    for case in cases() {
        let schedule = schedule_from_alphas_cumprod(&case.alphas_cumprod);
        let spacing = match case.cfg.timestep_spacing {
            diffuse::nets::scheduler_config::TimestepSpacing::Leading => "leading",
            diffuse::nets::scheduler_config::TimestepSpacing::Trailing => "trailing",
            diffuse::nets::scheduler_config::TimestepSpacing::Linspace => "linspace",
        };
        let opts = SamplerOptions {
            steps: Some(case.steps),
            eta: case.eta,
            spacing: Some(spacing.into()),
            clip_x0: case.cfg.clip_sample.then_some(case.cfg.clip_sample_range),
            variance: match case.kind.name() {
                "ddpm" => Some(
                    if case.cfg.variance_type == diffuse::nets::scheduler_config::VarianceType::FixedLarge {
                        diffuse::samplers::ddpm::Variance::FixedLarge
                    } else {
                        diffuse::samplers::ddpm::Variance::FixedSmall
                    },
                ),
                _ => None,
            },
            ..Default::default()
        };
        let ours = build_sampler(case.kind, &Process::Ddpm(schedule.clone()), &opts).unwrap();
        let e = trajectory_err(&case, &run(&case, ours.as_ref()));
        println!("{} with our own choices: {e:.1e}", case.name);
        let why = match case.name.as_str() {
            // the same timesteps, the same chain: ours is diffusers'
            "ddpm_linear_eps_leading" | "ddpm_sigmoid_sample_small_log_linspace" => None,
            // diffusers adds sqrt(beta) z at the last step (its timestep 142 > 0)
            "ddpm_cosine_v_fixed_large_trailing" => Some("last-step noise"),
            // steps_offset = 1 (ours starts at 900), set_alpha_to_one = false, and unclipped eps
            "ddim_linear_eps_eta0_offset" => Some("offset, final alpha_bar, clipped eps"),
            // T div K = 125 divides: the formula is the look-up; no clipping
            "ddim_zero_snr_v_trailing_eta0" => None,
            // previous timestep t - 55 instead of the next entry of the list
            "ddim_scaled_linear_eta05_linspace" => Some("previous timestep formula"),
            other => panic!("unknown case {other}"),
        };
        match why {
            None => assert!(e < 1e-5, "{}: {e:.2e}", case.name),
            Some(w) => assert!(
                e > 1e-3,
                "{}: {w} should change the trajectory, {e:.2e}",
                case.name
            ),
        }
    }
}

#[test]
fn recomputing_eps_after_clipping_departs_from_ddim_pipeline() {
    // DDIMScheduler.step's default keeps the network's eps after clipping x_0; GLIDE's
    // recomputation gives another trajectory as soon as a clip is active (t = 901: |x_0| ~ 60).
    let case = cases()
        .into_iter()
        .find(|c| c.name == "ddim_linear_eps_eta0_offset")
        .unwrap();
    let schedule = schedule_from_alphas_cumprod(&case.alphas_cumprod);
    let mut s = diffuse::samplers::ddim::Ddim::new(
        diffuse::samplers::diffusers::ddim_chain(&case.cfg, &schedule, case.steps).unwrap(),
        0.0,
        1.0,
    )
    .unwrap();
    s.clip_x0 = Some(1.0);
    s.eps_after_clip = diffuse::samplers::ddim::EpsAfterClip::Unclipped;
    // the whole-trajectory bound of `samplers_reproduce_diffusers_scheduler_trajectories`
    assert!(trajectory_err(&case, &run(&case, &s)) < 1e-5);
    s.eps_after_clip = diffuse::samplers::ddim::EpsAfterClip::Recompute;
    let e = trajectory_err(&case, &run(&case, &s));
    assert!(e > 1e-2, "{e:.2e}");
}
