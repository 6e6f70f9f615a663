//! Conformance of the fast samplers with diffusers' own scheduler classes: every case of
//! `tests/fixtures/fast_samplers/conformance.json` (DPMSolverMultistepScheduler,
//! DPMSolverSinglestepScheduler, UniPCMultistepScheduler, DEISMultistepScheduler,
//! EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler runs of
//! diffusers 0.42.1, made by `make_fixtures.py` there) is rebuilt from its scheduler config by the
//! samplers' `from_scheduler_config`, and must reproduce diffusers' grid (timesteps exactly,
//! sigmas to float32 rounding), `init_noise_sigma`, every step from diffusers' own state, and the
//! whole trajectory from the recorded initial noise. The dummy model is a function of the model
//! input and the solver's sigma (see the fixture README), so the comparison is exact up to
//! diffusers' float32 arithmetic.

use std::cell::RefCell;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use diffuse::denoiser::{Denoiser, NoiseLevel, Prediction};
use diffuse::nets::scheduler_config::{SchedulerClass, SchedulerConfig};
use diffuse::process::Process;
use diffuse::rng::NoiseStreams;
use diffuse::samplers::deis::Deis;
use diffuse::samplers::dpm_solver::{DpmSolver, DpmSolverOptions};
use diffuse::samplers::grids::LevelGrid;
use diffuse::samplers::sigma_euler::{Euler, EulerAncestral, Heun};
use diffuse::samplers::unipc::UniPc;
use diffuse::samplers::{Sampler, Trajectory};
use diffuse::schedule::Schedule;
use serde_json::Value;

fn fixture() -> &'static Value {
    static V: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    V.get_or_init(|| {
        let p: PathBuf =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fast_samplers/conformance.json");
        serde_json::from_str(&fs::read_to_string(p).unwrap()).unwrap()
    })
}

/// Numbers; null is diffusers' NaN.
fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| {
            if x.is_null() {
                f64::NAN
            } else {
                x.as_f64().unwrap()
            }
        })
        .collect()
}

fn shape() -> Vec<usize> {
    fixture()["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect()
}

fn tensor(v: &[f64]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape().as_slice(), &Device::Cpu).unwrap()
}

fn vec_of(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// The fixture's dummy model, `tanh(x_in) (0.6 + 0.3 / (1 + s)) + 0.05 x_in ln(1 + s)` with
/// `x_in = x_t / sqrt(alpha^2 + sigma^2)` and `s = sigma / alpha` (the U-Net adapter's VP
/// input; v is scaled back by r as the adapter does). Records the levels it was called at.
struct Dummy {
    prediction: Prediction,
    calls: RefCell<Vec<NoiseLevel>>,
}

impl Denoiser for Dummy {
    fn prediction(&self) -> Prediction {
        self.prediction
    }

    fn output(&self, x_t: &Tensor, levels: &[NoiseLevel]) -> diffuse::Result<Tensor> {
        let l = levels[0];
        assert!(levels.iter().all(|m| *m == l));
        self.calls.borrow_mut().push(l);
        let r = (l.alpha * l.alpha + l.sigma * l.sigma).sqrt();
        let s = l.sigma / l.alpha;
        let x_in = x_t.affine(1.0 / r, 0.0)?;
        let out = (x_in.tanh()?.affine(0.6 + 0.3 / (1.0 + s), 0.0)? + x_in.affine(0.05 * s.ln_1p(), 0.0)?)?;
        Ok(match self.prediction {
            Prediction::V => out.affine(r, 0.0)?,
            _ => out,
        })
    }
}

/// diffusers' float32 `alphas_cumprod` as a schedule (betas `1 - ab_t / ab_{t-1}` in f64). The
/// fixture's 9 significant digits identify each float32 value; it is recovered exactly (`as
/// f32`), since `1 - ab` at ab = 0.9999 would otherwise carry the decimal's 5e-10 as 5e-6.
fn schedule_from_alphas_cumprod(ab: &[f64]) -> Schedule {
    let mut betas = Vec::with_capacity(ab.len());
    let mut prev = 1.0;
    for &a in ab {
        let a = a as f32 as f64;
        betas.push(1.0 - a / prev);
        prev = a;
    }
    Schedule::from_betas(betas).unwrap()
}

enum Ours {
    Dpm(DpmSolver),
    Uni(UniPc),
    Deis(Deis),
    Euler(Euler),
    Ancestral(EulerAncestral),
    Heun(Heun),
}

impl Ours {
    fn build(cfg: &SchedulerConfig, schedule: &Schedule, steps: usize) -> diffuse::Result<Ours> {
        Ok(match cfg.class {
            SchedulerClass::DpmSolverMultistep | SchedulerClass::DpmSolverSinglestep => {
                Ours::Dpm(DpmSolver::from_scheduler_config(cfg, schedule, steps)?)
            }
            SchedulerClass::UniPcMultistep => Ours::Uni(UniPc::from_scheduler_config(cfg, schedule, steps)?),
            SchedulerClass::DeisMultistep => Ours::Deis(Deis::from_scheduler_config(cfg, schedule, steps)?),
            SchedulerClass::EulerDiscrete => Ours::Euler(Euler::from_scheduler_config(cfg, schedule, steps)?),
            SchedulerClass::EulerAncestralDiscrete => {
                Ours::Ancestral(EulerAncestral::from_scheduler_config(cfg, schedule, steps)?)
            }
            SchedulerClass::HeunDiscrete => Ours::Heun(Heun::from_scheduler_config(cfg, schedule, steps)?),
            other => panic!("not a fast-sampler class: {other:?}"),
        })
    }

    fn sampler(&self) -> &dyn Sampler {
        match self {
            Ours::Dpm(s) => s,
            Ours::Uni(s) => s,
            Ours::Deis(s) => s,
            Ours::Euler(s) => s,
            Ours::Ancestral(s) => s,
            Ours::Heun(s) => s,
        }
    }

    fn grid(&self) -> &LevelGrid {
        match self {
            Ours::Dpm(s) => &s.grid,
            Ours::Uni(s) => &s.grid,
            Ours::Deis(s) => &s.grid,
            Ours::Euler(s) => s.grid(),
            Ours::Ancestral(s) => s.grid(),
            Ours::Heun(s) => s.grid(),
        }
    }
}

struct Case {
    name: String,
    cfg: SchedulerConfig,
    steps: usize,
    schedule: Schedule,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    final_has_nan: bool,
    /// diffusers' own float32 error: its step from each recorded state, and its whole run, in
    /// float64 against the recorded float32 ones (max relative difference)
    step_gap: f64,
    trajectory_gap: f64,
    /// x_0 .. x_calls (diffusers' states around each step call)
    samples: Vec<Vec<f64>>,
    model_output_0: Vec<f64>,
    noise: Option<Vec<Vec<f64>>>,
    x0: Option<Vec<Vec<f64>>>,
}

fn cases() -> Vec<Case> {
    let v = fixture();
    let tables = v["alphas_cumprod"].as_object().unwrap();
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let name = c["name"].as_str().unwrap().to_string();
            let cfg =
                SchedulerConfig::from_json(&c["scheduler_config"]).unwrap_or_else(|e| panic!("{name}: {e}"));
            let rows = |k: &str| {
                c.get(k)
                    .map(|a| a.as_array().unwrap().iter().map(f64s).collect::<Vec<_>>())
            };
            Case {
                steps: c["num_inference_steps"].as_u64().unwrap() as usize,
                schedule: schedule_from_alphas_cumprod(&f64s(&tables[c["alphas_cumprod"].as_str().unwrap()])),
                timesteps: f64s(&c["timesteps"]),
                sigmas: f64s(&c["sigmas"]),
                init_noise_sigma: c["init_noise_sigma"].as_f64().unwrap(),
                final_has_nan: c["final_has_nan"].as_bool().unwrap(),
                step_gap: c["step_gap_f64"].as_f64().unwrap(),
                trajectory_gap: c["trajectory_gap_f64"].as_f64().unwrap(),
                samples: rows("samples").unwrap(),
                model_output_0: f64s(&c["model_output_0"]),
                noise: rows("noise"),
                x0: rows("x0"),
                cfg,
                name,
            }
        })
        .collect()
}

/// `max_i |a_i - b_i| / max(1, max_i |b_i|)`.
fn err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn dummy(case: &Case) -> Dummy {
    Dummy {
        prediction: case.cfg.prediction_type,
        calls: RefCell::new(Vec::new()),
    }
}

/// Replay streams holding `noise` (one tensor per entry) row by row.
fn replay(noise: &[&Vec<f64>]) -> NoiseStreams {
    let sh = shape();
    let per = sh[1..].iter().product::<usize>();
    let rows = (0..sh[0])
        .map(|i| {
            noise
                .iter()
                .flat_map(|n| n[i * per..(i + 1) * per].to_vec())
                .collect()
        })
        .collect();
    NoiseStreams::replay(rows)
}

/// diffusers' per-model-call grid as ours: Heun repeats every inner sigma and timestep.
fn diffusers_grid(case: &Case) -> (Vec<f64>, Vec<f64>) {
    if case.cfg.class == SchedulerClass::HeunDiscrete {
        let s = &case.sigmas;
        let mut sig = vec![s[0]];
        sig.extend(s[1..s.len() - 1].iter().step_by(2));
        sig.push(*s.last().unwrap());
        let t = &case.timesteps;
        let mut ts = vec![t[0]];
        ts.extend(t[1..].iter().step_by(2));
        (sig, ts)
    } else {
        (case.sigmas.clone(), case.timesteps.clone())
    }
}

#[test]
fn grids_and_priors_are_diffusers() {
    let mut worst = 0.0f64;
    for case in cases() {
        let ours = Ours::build(&case.cfg, &case.schedule, case.steps)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let g = ours.grid();
        let (sig, ts) = diffusers_grid(&case);
        assert_eq!(g.sigmas.len(), sig.len(), "{}", case.name);
        for (k, (a, b)) in g.sigmas.iter().zip(&sig).enumerate() {
            // diffusers casts its sigmas to float32 (6e-8) after float32 arithmetic on a float32
            // table (a few 1e-7)
            let e = (a - b).abs() / b.max(1e-30);
            worst = worst.max(if *b == 0.0 { a.abs() } else { e });
            assert!(
                if *b == 0.0 { *a == 0.0 } else { e < 1e-6 },
                "{} sigma {k}: ours {a} diffusers {b}",
                case.name
            );
        }
        // the model timesteps: integers exactly; the Euler family's fractional ones to float32
        assert_eq!(g.timesteps.len(), ts.len(), "{}", case.name);
        for (k, (a, b)) in g.timesteps.iter().zip(&ts).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * b.max(1.0),
                "{} timestep {k}: ours {a} diffusers {b}",
                case.name
            );
        }
        let p = ours.sampler().prior_std();
        assert!(
            (p - case.init_noise_sigma).abs() <= 1e-6 * case.init_noise_sigma,
            "{}: prior std {p} vs init_noise_sigma {}",
            case.name,
            case.init_noise_sigma
        );
    }
    println!("grids: largest relative sigma difference {worst:.1e}");
}

/// One step of ours from diffusers' state `x` (call index `call` of diffusers' loop).
struct Stepper<'a> {
    ours: &'a Ours,
    dpm: Option<diffuse::samplers::dpm_solver::DpmSolverState>,
    uni: Option<diffuse::samplers::unipc::UniPcState>,
    deis: Option<diffuse::samplers::deis::DeisState>,
}

impl<'a> Stepper<'a> {
    fn new(ours: &'a Ours) -> Self {
        Stepper {
            ours,
            dpm: match ours {
                Ours::Dpm(s) => Some(s.start()),
                _ => None,
            },
            uni: match ours {
                Ours::Uni(s) => Some(s.start()),
                _ => None,
            },
            deis: match ours {
                Ours::Deis(s) => Some(s.start()),
                _ => None,
            },
        }
    }

    fn step(
        &mut self,
        k: usize,
        x: &Tensor,
        den: &dyn Denoiser,
        noise: &mut NoiseStreams,
    ) -> (Tensor, Tensor) {
        match self.ours {
            Ours::Dpm(s) => s.step(self.dpm.as_mut().unwrap(), k, x, den, noise).unwrap(),
            Ours::Uni(s) => s.step(self.uni.as_mut().unwrap(), k, x, den).unwrap(),
            Ours::Deis(s) => s.step(self.deis.as_mut().unwrap(), k, x, den).unwrap(),
            Ours::Euler(s) => s.step(k, x, den).unwrap(),
            Ours::Ancestral(s) => s.step(k, x, den, noise).unwrap(),
            Ours::Heun(s) => {
                let (x, x0, _) = s.step(k, x, den).unwrap();
                (x, x0)
            }
        }
    }
}

/// diffusers' call index at the start of our step k, and at its end.
fn calls_of(case: &Case, k: usize) -> (usize, usize) {
    if case.cfg.class == SchedulerClass::HeunDiscrete {
        (2 * k, if k + 1 == case.steps { 2 * k + 1 } else { 2 * k + 2 })
    } else {
        (k, k + 1)
    }
}

#[test]
fn every_step_from_diffusers_state() {
    let mut worst = (0.0f64, String::new());
    for case in cases() {
        let ours = Ours::build(&case.cfg, &case.schedule, case.steps).unwrap();
        let den = dummy(&case);
        // the dummy model is the fixture's: same output at diffusers' first state
        let l0 = ours.grid().levels[0];
        // sigma-space samplers call the denoiser on alpha x~ (diffusers' scale_model_input)
        let scale = match ours {
            Ours::Euler(_) | Ours::Ancestral(_) | Ours::Heun(_) => l0.alpha,
            _ => 1.0,
        };
        let x_in = tensor(&case.samples[0]).affine(scale, 0.0).unwrap();
        let m0 = vec_of(&den.output(&x_in, &[l0; 2]).unwrap());
        assert!(
            err(&m0, &case.model_output_0) < 1e-6,
            "{}: dummy model {m0:?} vs {:?}",
            case.name,
            case.model_output_0
        );
        den.calls.borrow_mut().clear();
        let mut st = Stepper::new(&ours);
        let mut case_worst = 0.0f64;
        for k in 0..case.steps {
            let (c0, c1) = calls_of(&case, k);
            let want = &case.samples[c1];
            let noise_k: Vec<&Vec<f64>> = case.noise.iter().map(|n| &n[k]).collect();
            let mut noise = replay(&noise_k);
            let (x, x0) = st.step(k, &tensor(&case.samples[c0]), &den, &mut noise);
            if want.iter().any(|v| v.is_nan()) {
                // diffusers' NaN (UniPC bh1 to sigma = 0): ours is the data-prediction DDIM limit x_0
                assert!(
                    case.final_has_nan && k + 1 == case.steps,
                    "{} step {k}",
                    case.name
                );
                assert!(
                    err(&vec_of(&x), &vec_of(&x0)) < 1e-12,
                    "{}: the last step returns x_0",
                    case.name
                );
                continue;
            }
            let e = err(&vec_of(&x), want);
            if let Some(x0s) = &case.x0 {
                case_worst = case_worst.max(err(&vec_of(&x0), &x0s[c0]));
            }
            case_worst = case_worst.max(e);
        }
        println!(
            "{}: one step from diffusers' state, max relative error {case_worst:.1e}",
            case.name
        );
        // diffusers' float32 steps: a few roundings (6e-8 each) of terms of the size of the state
        // (its own float64 step differs by <= 1e-6 in every case but two), plus twice that
        // measured gap where float32 cancels worse: DEIS's third-order coefficients (5.4e-6) and
        // Heun's two steps from s = 157 to 0.01, whose correction divides by 0.01 (3.5e-4).
        let bound = 1e-6 + 2.0 * case.step_gap;
        assert!(case_worst < bound, "{}: {case_worst:.2e}", case.name);
        if case_worst > worst.0 {
            worst = (case_worst, case.name.clone());
        }
    }
    println!("worst single step: {:.1e} ({})", worst.0, worst.1);
}

#[test]
fn whole_trajectories_from_the_recorded_noise() {
    let mut worst = (0.0f64, String::new());
    for case in cases() {
        let ours = Ours::build(&case.cfg, &case.schedule, case.steps).unwrap();
        let den = dummy(&case);
        let g = ours.grid();
        let z = f64s(&fixture()["z"]);
        let x_t = tensor(&z).affine(ours.sampler().prior_std(), 0.0).unwrap();
        assert!(err(&vec_of(&x_t), &case.samples[0]) < 1e-6, "{}: x_T", case.name);
        // the noise of the steps that draw (those not ending at sigma = 0)
        let drawn: Vec<&Vec<f64>> = case
            .noise
            .iter()
            .flat_map(|n| {
                n.iter()
                    .enumerate()
                    .filter(|(k, _)| g.sigmas[k + 1] > 0.0)
                    .map(|(_, v)| v)
            })
            .collect();
        let mut noise = replay(&drawn);
        let mut traj = Trajectory::new(shape()[0], 1);
        let out = ours.sampler().sample(&den, x_t, &mut noise, &mut traj).unwrap();
        let calls = den.calls.borrow().len();
        assert_eq!(out.nfe, calls, "{}: NFE counts denoiser calls", case.name);
        let diffusers_calls = case.samples.len() - 1;
        assert_eq!(
            calls, diffusers_calls,
            "{}: as many model calls as diffusers",
            case.name
        );
        let mut e = 0.0f64;
        for k in 0..case.steps {
            let (_, c1) = calls_of(&case, k);
            let want = &case.samples[c1];
            if want.iter().any(|v| v.is_nan()) {
                assert!(case.final_has_nan);
                assert!(traj.points[k + 1].x.iter().all(|v| v.is_finite()));
                continue;
            }
            e = e.max(err(&traj.points[k + 1].x, want));
        }
        println!(
            "{}: whole trajectory ({} steps), max relative error {e:.1e}",
            case.name, case.steps
        );
        // diffusers' float32 rounding of each state (~1e-7) re-enters every later step; plus
        // twice diffusers' own float32-vs-float64 gap where that is larger (see the step bound)
        let bound = 1e-5 + 2.0 * case.trajectory_gap;
        assert!(e < bound, "{}: {e:.2e}", case.name);
        if e > worst.0 {
            worst = (e, case.name.clone());
        }
    }
    println!("worst trajectory: {:.1e} ({})", worst.0, worst.1);
}

#[test]
fn our_f64_tables_reproduce_the_trajectories_to_float32_rounding() {
    // cfg.schedule() (f64 betas) instead of diffusers' float32 alphas_cumprod: alpha_bar differs
    // by float32 rounding (<= 2e-5 relative), which moves every sigma of the grid by half that.
    let mut worst = 0.0f64;
    for case in cases().into_iter().filter(|c| !c.final_has_nan) {
        let schedule = case.cfg.schedule().unwrap();
        let ours = Ours::build(&case.cfg, &schedule, case.steps).unwrap();
        let den = dummy(&case);
        let z = f64s(&fixture()["z"]);
        let x_t = tensor(&z).affine(ours.sampler().prior_std(), 0.0).unwrap();
        let g = ours.grid();
        let drawn: Vec<&Vec<f64>> = case
            .noise
            .iter()
            .flat_map(|n| {
                n.iter()
                    .enumerate()
                    .filter(|(k, _)| g.sigmas[k + 1] > 0.0)
                    .map(|(_, v)| v)
            })
            .collect();
        let out = ours
            .sampler()
            .sample(&den, x_t, &mut replay(&drawn), &mut diffuse::samplers::NoObserver)
            .unwrap();
        let e = err(&vec_of(&out.x), case.samples.last().unwrap());
        worst = worst.max(e);
        println!("{} (f64 tables): {e:.1e}", case.name);
        // observed <= 2.4e-5 (DEIS order 3), plus diffusers' own float32 gap (Heun's two steps)
        let bound = 1e-4 + 2.0 * case.trajectory_gap;
        assert!(e < bound, "{}: {e:.2e}", case.name);
    }
    println!("f64 tables: worst final-state error {worst:.1e}");
}

#[test]
fn diffusers_pitfalls_are_fixed() {
    let v = fixture();
    // T = 1000 steps: diffusers' round(linspace(0, 999, 1001)) repeats 500 and its next
    // second-order step divides 0 by 0
    let t = &v["thousand_steps"];
    assert_eq!(t["repeated"].as_array().unwrap().len(), 1);
    assert!(t["first_nan_step"].as_u64().is_some());
    let cfg = SchedulerConfig::from_json(&t["scheduler_config"]).unwrap();
    let schedule = cfg.schedule().unwrap();
    let s = DpmSolver::from_scheduler_config(&cfg, &schedule, 1000).unwrap();
    let ts: Vec<f64> = (0..1000).rev().map(|i| i as f64).collect();
    assert_eq!(s.grid.timesteps, ts, "every training step once");
    let den = Dummy {
        prediction: Prediction::Eps,
        calls: RefCell::new(Vec::new()),
    };
    let z = f64s(&v["z"]);
    let out = s
        .sample(
            &den,
            tensor(&z),
            &mut NoiseStreams::new(0, 0, 2),
            &mut diffuse::samplers::NoObserver,
        )
        .unwrap();
    assert!(vec_of(&out.x).iter().all(|x| x.is_finite()), "1000 steps: finite");
    // ... and on the exact same grid but rounded with Rust's round() (half away from zero)
    // the 6-step grid would differ: numpy gives 166, 500, 832
    let s6 = DpmSolver::new(&Process::Ddpm(schedule.clone()), 6, &DpmSolverOptions::default()).unwrap();
    assert_eq!(s6.grid.timesteps, vec![999.0, 832.0, 666.0, 500.0, 333.0, 166.0]);
    let c6 = cases().into_iter().find(|c| c.name == "dpmpp2m_6").unwrap();
    assert_eq!(c6.timesteps, s6.grid.timesteps);
    // UniPC bh1 with the default final sigma zero: NaN in diffusers, finite here
    let c = cases()
        .into_iter()
        .find(|c| c.name == "unipc_bh1_zero_10")
        .unwrap();
    assert!(c.final_has_nan);
}
