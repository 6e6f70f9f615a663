//! The fast samplers' constructors and scheduler-config builders: errors name the flag and say
//! what is needed, T steps work, the observer sees every step, NFE counts denoiser calls.

use candle_core::{DType, Device, Tensor};
use diffuse::denoiser::{Denoiser, NoiseLevel, Prediction};
use diffuse::error::Error;
use diffuse::nets::scheduler_config::SchedulerConfig;
use diffuse::process::Process;
use diffuse::rng::NoiseStreams;
use diffuse::samplers::deis::{Deis, DeisOptions};
use diffuse::samplers::dpm_solver::{DpmSolver, DpmSolverOptions};
use diffuse::samplers::exp_integrator::Thresholding;
use diffuse::samplers::grids::{FinalSigma, GridOptions, SigmaGrid};
use diffuse::samplers::sigma_euler::{Euler, Heun, SigmaSamplerOptions};
use diffuse::samplers::timesteps::Spacing;
use diffuse::samplers::unipc::{UniPc, UniPcOptions};
use diffuse::samplers::{Sampler, Trajectory};
use diffuse::schedule::Schedule;

fn ddpm() -> Process {
    Process::Ddpm(Schedule::named("linear", 1000).unwrap())
}

/// The flag an error names, and its text.
fn flag(e: Error) -> (String, String) {
    let text = e.to_string();
    match e {
        Error::InvalidParameter { name, .. } => (name, text),
        other => panic!("expected a parameter error, got {other}"),
    }
}

fn dpm_err(steps: usize, o: DpmSolverOptions) -> (String, String) {
    flag(DpmSolver::new(&ddpm(), steps, &o).unwrap_err())
}

#[test]
fn errors_name_the_flag() {
    let (f, t) = dpm_err(
        10,
        DpmSolverOptions {
            order: 4,
            ..Default::default()
        },
    );
    assert_eq!(f, "order", "{t}");
    assert!(t.contains("1, 2 and 3"), "{t}");
    // dpmpp-3m with 4 steps: warm-up (1, 2) and lower_order_final (2, 1) never reach order 3
    let (f, t) = dpm_err(4, DpmSolverOptions::dpmpp_3m());
    assert_eq!(f, "steps", "{t}");
    assert!(t.contains("at least 5 steps"), "{t}");
    // the same through the diffusers-config path runs at the lower orders, as diffusers does
    assert!(DpmSolver::new_as_diffusers(&ddpm(), 4, &DpmSolverOptions::dpmpp_3m()).is_ok());
    let (f, t) = flag(
        UniPc::new(
            &ddpm(),
            2,
            &UniPcOptions {
                order: 3,
                ..Default::default()
            },
        )
        .unwrap_err(),
    );
    assert!(f == "steps" && t.contains("at least 5"), "{t}");
    let (f, t) = flag(Deis::new(&ddpm(), 1, &DeisOptions::default()).unwrap_err());
    assert!(f == "steps" && t.contains("at least 3"), "{t}");
    // a sigma option on a grid that has none
    let g = GridOptions {
        sigma_min: Some(0.1),
        ..Default::default()
    };
    let (f, t) = dpm_err(
        10,
        DpmSolverOptions {
            grid: g,
            ..Default::default()
        },
    );
    assert!(f == "sigma-min" && t.contains("karras"), "{t}");
    // noise-prediction solvers cannot step to sigma = 0
    let zero = GridOptions {
        final_sigma: Some(FinalSigma::Zero),
        ..Default::default()
    };
    let (f, t) = dpm_err(
        10,
        DpmSolverOptions {
            grid: zero.clone(),
            ..DpmSolverOptions::dpm_solver()
        },
    );
    assert!(f == "final-sigma" && t.contains("sigma-min"), "{t}");
    let (f, _) = flag(
        Deis::new(
            &ddpm(),
            10,
            &DeisOptions {
                grid: zero.clone(),
                ..Default::default()
            },
        )
        .unwrap_err(),
    );
    assert_eq!(f, "final-sigma");
    let (f, _) = flag(
        UniPc::new(
            &ddpm(),
            10,
            &UniPcOptions {
                predict_x0: false,
                ..Default::default()
            },
        )
        .unwrap_err(),
    );
    assert_eq!(f, "final-sigma");
    let (f, _) = flag(
        UniPc::new(
            &ddpm(),
            10,
            &UniPcOptions {
                lower_order_final: false,
                ..Default::default()
            },
        )
        .unwrap_err(),
    );
    assert_eq!(f, "lower_order_final");
    // spacings apply to the ddpm process only; quadratic is DDIM's; leading cannot give T steps
    let vp = Process::from_name("vp", || Schedule::named("linear", 10)).unwrap();
    let tr = GridOptions {
        spacing: Spacing::Trailing,
        ..Default::default()
    };
    let (f, t) = flag(
        DpmSolver::new(
            &vp,
            10,
            &DpmSolverOptions {
                grid: tr,
                ..Default::default()
            },
        )
        .unwrap_err(),
    );
    assert!(f == "spacing" && t.contains("ddpm"), "{t}");
    let q = GridOptions {
        spacing: Spacing::Quadratic,
        ..Default::default()
    };
    assert_eq!(
        dpm_err(
            10,
            DpmSolverOptions {
                grid: q,
                ..Default::default()
            }
        )
        .0,
        "spacing"
    );
    let lead = GridOptions {
        spacing: Spacing::Leading,
        ..Default::default()
    };
    let (f, t) = dpm_err(
        1000,
        DpmSolverOptions {
            grid: lead,
            ..Default::default()
        },
    );
    assert!(f == "steps" && t.contains("stride"), "{t}");
    let th = Thresholding { ratio: 1.5, max: 1.0 };
    assert_eq!(
        dpm_err(
            10,
            DpmSolverOptions {
                thresholding: Some(th),
                ..Default::default()
            }
        )
        .0,
        "dynamic_thresholding_ratio"
    );
    assert_eq!(
        flag(Euler::new(&ddpm(), 0, &SigmaSamplerOptions::default()).unwrap_err()).0,
        "steps"
    );
    assert!(SigmaGrid::from_name("karas")
        .unwrap_err()
        .to_string()
        .contains("karras"));
    assert!(FinalSigma::from_name("none").is_err());
}

#[test]
fn scheduler_configs_map_and_reject_with_the_key() {
    let parse = |t: &str| SchedulerConfig::from_json(&serde_json::from_str(t).unwrap());
    let s = Schedule::named("linear", 1000).unwrap();
    // a DPMSolverMultistepScheduler config: timestep_spacing defaults to linspace for this class
    let c = parse(r#"{"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3, "use_karras_sigmas": true, "lambda_min_clipped": "-Infinity"}"#).unwrap();
    let d = DpmSolver::from_scheduler_config(&c, &s, 10).unwrap();
    assert_eq!(d.name(), "dpmpp-3m");
    assert_eq!(d.options.grid.sigmas, SigmaGrid::Karras);
    assert_eq!(d.options.grid.spacing, Spacing::Linspace);
    let c = parse(r#"{"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}"#)
        .unwrap();
    assert_eq!(
        DpmSolver::from_scheduler_config(&c, &s, 10).unwrap().name(),
        "dpmpp-2m-sde"
    );
    let c = parse(r#"{"_class_name": "DPMSolverSinglestepScheduler"}"#).unwrap();
    assert_eq!(
        DpmSolver::from_scheduler_config(&c, &s, 10).unwrap().name(),
        "dpmpp-2s"
    );
    let c = parse(r#"{"_class_name": "HeunDiscreteScheduler"}"#).unwrap();
    assert_eq!(
        (c.beta_start, c.beta_end),
        (0.00085, 0.012),
        "Heun's own default betas"
    );
    let errs = [
        (
            r#"{"_class_name": "DPMSolverMultistepScheduler", "use_flow_sigmas": true}"#,
            "use_flow_sigmas",
        ),
        (
            r#"{"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": true, "use_beta_sigmas": true}"#,
            "use_beta_sigmas",
        ),
        (
            r#"{"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver"}"#,
            "algorithm_type",
        ),
        (
            r#"{"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver"}"#,
            "final_sigmas_type",
        ),
        (
            r#"{"_class_name": "DPMSolverMultistepScheduler", "variance_type": "learned_range"}"#,
            "variance_type",
        ),
        (
            r#"{"_class_name": "UniPCMultistepScheduler", "solver_p": {"a": 1}}"#,
            "solver_p",
        ),
        (
            r#"{"_class_name": "EulerDiscreteScheduler", "interpolation_type": "log_linear"}"#,
            "interpolation_type",
        ),
    ];
    for (t, key) in errs {
        let c = parse(t).unwrap();
        let e = match c.class {
            diffuse::nets::scheduler_config::SchedulerClass::UniPcMultistep => {
                UniPc::from_scheduler_config(&c, &s, 10).err()
            }
            diffuse::nets::scheduler_config::SchedulerClass::EulerDiscrete => {
                Euler::from_scheduler_config(&c, &s, 10).err()
            }
            _ => DpmSolver::from_scheduler_config(&c, &s, 10).err(),
        };
        let e = e.unwrap_or_else(|| panic!("{t}: accepted"));
        assert!(e.to_string().contains(key), "{t}: {e}");
    }
    assert!(parse(r#"{"final_sigmas_type": "sigma_max"}"#)
        .unwrap_err()
        .to_string()
        .contains("final_sigmas_type"));
    assert!(parse(r#"{"_class_name": "LMSDiscreteScheduler"}"#).is_err());
    // diffusers writes lambda_min_clipped = -inf as the bare token -Infinity
    let dir = std::env::temp_dir().join(format!("diffuse-fast-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("scheduler_config.json");
    std::fs::write(&p, r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity, "solver_order": 2}"#).unwrap();
    let c = SchedulerConfig::from_file(&p).unwrap();
    assert_eq!(c.solver.lambda_min_clipped, Some(f64::NEG_INFINITY));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// eps = tanh(x): a cheap deterministic model that counts its calls.
struct Tanh(std::cell::Cell<usize>);

impl Denoiser for Tanh {
    fn prediction(&self) -> Prediction {
        Prediction::Eps
    }
    fn output(&self, x_t: &Tensor, _levels: &[NoiseLevel]) -> diffuse::Result<Tensor> {
        self.0.set(self.0.get() + 1);
        Ok(x_t.tanh()?)
    }
}

#[test]
fn t_steps_work_and_observers_see_every_step() {
    let x = Tensor::ones((3, 2), DType::F64, &Device::Cpu).unwrap();
    // K = T = 1000 for each multistep family (diffusers' linspace repeats timestep 500 here)
    let samplers: Vec<Box<dyn Sampler>> = vec![
        Box::new(DpmSolver::new(&ddpm(), 1000, &DpmSolverOptions::dpmpp_3m()).unwrap()),
        Box::new(UniPc::new(&ddpm(), 1000, &UniPcOptions::default()).unwrap()),
        Box::new(Deis::new(&ddpm(), 1000, &DeisOptions::default()).unwrap()),
        Box::new(DpmSolver::new(&ddpm(), 1000, &DpmSolverOptions::dpmpp_2s()).unwrap()),
    ];
    for s in &samplers {
        let den = Tanh(0.into());
        let mut traj = Trajectory::new(3, 1);
        let out = s
            .sample(&den, x.clone(), &mut NoiseStreams::new(0, 0, 3), &mut traj)
            .unwrap();
        assert!(
            out.x
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
                .iter()
                .all(|v| v.is_finite()),
            "{}",
            s.name()
        );
        assert_eq!((out.nfe, den.0.get()), (1000, 1000), "{}", s.name());
        assert_eq!(traj.points.len(), 1001, "{}: the prior and every step", s.name());
        assert_eq!(traj.points[0].step, 0);
        assert!(traj.points[1..].iter().all(|p| p.x0_pred.is_some()));
        // times decrease to the final level
        assert!(traj.points.windows(2).all(|w| w[1].t <= w[0].t), "{}", s.name());
    }
    // Heun: 2K - 1 evaluations, one observer event per step; the last level is sigma = 0
    let h = Heun::new(&ddpm(), 10, &SigmaSamplerOptions::default()).unwrap();
    let den = Tanh(0.into());
    let mut traj = Trajectory::new(3, 1);
    let out = h
        .sample(&den, x, &mut NoiseStreams::new(0, 0, 3), &mut traj)
        .unwrap();
    assert_eq!((out.nfe, den.0.get()), (19, 19));
    assert_eq!(traj.points.len(), 11);
    assert_eq!(traj.points[10].level.sigma, 0.0);
}
