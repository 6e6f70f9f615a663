//! Names -> samplers. The CLI (and later image sampling) builds every sampler here, so the
//! table of which sampler runs on which process lives in one place:
//!
//! | `--sampler` | `--process` | `--steps` default | sampler-specific options |
//! | --- | --- | --- | --- |
//! | `ddpm` | `ddpm`, `seed-ve` | T (ddpm), 1000 (seed-ve) | `variance`, `spacing`, `clip_x0` |
//! | `ddim` | `ddpm`, `seed-ve` | 100 | `eta` (0), `spacing`, `clip_x0` |
//! | `euler-maruyama` | `vp`, `vp-cosine`, `subvp`, `ve`, `seed-ve` | 1000 | `spacing` |
//! | `pc` | same | 1000 | `snr` (0.16), `corrector_steps` (1), `predictor`, `spacing` |
//! | `ode-euler` | same | 1000 | `spacing`, `ode_variable` |
//! | `ode-heun` | same | 200 | `spacing`, `ode_variable` |
//! | `ode-rk45` | same | adaptive | `rtol`, `atol` (1e-5 each, as Score-SDE) |
//! | `edm-heun` | same | 18 | `churn` (0) |
//!
//! `spacing` is a DDIM timestep spacing on the `ddpm` process (`linspace` default, `leading`,
//! `trailing`, `quadratic`; with `--steps K < T` the chain is respaced) and a time grid on the
//! continuous ones (`uniform`, `log-snr` [the default for seed-ve], `karras`).
//! An unsupported pair or an option the sampler does not use is an error, not a guess.

use crate::error::{Error, Result};
use crate::process::{Process, Sde, TimeGrid};

use super::chain::ReverseChain;
use super::ddim::Ddim;
use super::ddpm::{Ddpm, Variance};
use super::edm::{Churn, EdmHeun};
use super::euler_maruyama::EulerMaruyama;
use super::ode::{OdeMethod, OdeSampler, OdeVariable};
use super::pc::{Pc, Predictor};
use super::rk45::{OdeRk45, Rk45Options};
use super::timesteps::{timesteps, Spacing};
use super::Sampler;

/// The sampler families.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SamplerKind {
    /// Ancestral sampling.
    Ddpm,
    /// DDIM.
    Ddim,
    /// Reverse SDE, Euler–Maruyama.
    EulerMaruyama,
    /// Predictor–corrector.
    Pc,
    /// Probability-flow ODE, Euler.
    OdeEuler,
    /// Probability-flow ODE, Heun.
    OdeHeun,
    /// Probability-flow ODE, adaptive RK45.
    OdeRk45,
    /// Karras et al. (EDM) Heun.
    EdmHeun,
}

const DISCRETE: &[&str] = &["ddpm", "seed-ve"];
const CONTINUOUS: &[&str] = &["vp", "vp-cosine", "subvp", "ve", "seed-ve"];

impl SamplerKind {
    /// Every sampler.
    pub const ALL: [SamplerKind; 8] = [
        SamplerKind::Ddpm,
        SamplerKind::Ddim,
        SamplerKind::EulerMaruyama,
        SamplerKind::Pc,
        SamplerKind::OdeEuler,
        SamplerKind::OdeHeun,
        SamplerKind::OdeRk45,
        SamplerKind::EdmHeun,
    ];

    /// Parses a `--sampler` name.
    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name).ok_or_else(|| {
            Error::param(
                "sampler",
                format!(
                    "unknown sampler '{name}', expected one of: {}",
                    Self::ALL.map(|k| k.name()).join(", ")
                ),
            )
        })
    }

    /// The `--sampler` name.
    pub fn name(&self) -> &'static str {
        match self {
            SamplerKind::Ddpm => "ddpm",
            SamplerKind::Ddim => "ddim",
            SamplerKind::EulerMaruyama => "euler-maruyama",
            SamplerKind::Pc => "pc",
            SamplerKind::OdeEuler => "ode-euler",
            SamplerKind::OdeHeun => "ode-heun",
            SamplerKind::OdeRk45 => "ode-rk45",
            SamplerKind::EdmHeun => "edm-heun",
        }
    }

    /// The `--process` names this sampler runs on.
    pub fn processes(&self) -> &'static [&'static str] {
        match self {
            SamplerKind::Ddpm | SamplerKind::Ddim => DISCRETE,
            _ => CONTINUOUS,
        }
    }

    /// Whether the sampler runs on `process`.
    pub fn supports(&self, process: &Process) -> bool {
        self.processes().contains(&process.name())
    }

    /// The default number of steps on `process` (None: adaptive).
    pub fn default_steps(&self, process: &Process) -> Option<usize> {
        match (self, process) {
            (SamplerKind::Ddpm, Process::Ddpm(s)) => Some(s.timesteps()),
            (SamplerKind::Ddim, Process::Ddpm(s)) => Some(s.timesteps().min(100)),
            (SamplerKind::Ddpm, _) => Some(1000),
            (SamplerKind::Ddim, _) => Some(100),
            (SamplerKind::EulerMaruyama | SamplerKind::Pc | SamplerKind::OdeEuler, _) => Some(1000),
            (SamplerKind::OdeHeun, _) => Some(200),
            (SamplerKind::OdeRk45, _) => None,
            (SamplerKind::EdmHeun, _) => Some(18),
        }
    }
}

/// Options of [`build_sampler`]; `None` means the sampler's default. Setting an option the
/// sampler does not use is an error.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SamplerOptions {
    /// Number of steps K (ddpm process: 1 <= K <= T; K < T respaces).
    pub steps: Option<usize>,
    /// DDIM's eta in [0, 1] (default 0).
    pub eta: Option<f64>,
    /// Timestep spacing (ddpm process) or time grid (continuous processes).
    pub spacing: Option<String>,
    /// DDPM variance (default fixed-small).
    pub variance: Option<Variance>,
    /// Clip x_0 predictions to [-c, c] (ddpm, ddim; default off).
    pub clip_x0: Option<f64>,
    /// PC: the Langevin snr (default 0.16).
    pub snr: Option<f64>,
    /// PC: Langevin steps per time (default 1).
    pub corrector_steps: Option<usize>,
    /// PC: the predictor (default reverse diffusion).
    pub predictor: Option<Predictor>,
    /// RK45 relative tolerance (default 1e-5).
    pub rtol: Option<f64>,
    /// RK45 absolute tolerance (default 1e-5).
    pub atol: Option<f64>,
    /// EDM S_churn (default 0).
    pub churn: Option<f64>,
    /// ode-euler/ode-heun: step in t or in the EDM sigma (default: sigma for ve and seed-ve, t otherwise).
    pub ode_variable: Option<OdeVariable>,
}

/// Score-SDE's snr for VE on CIFAR-10, our default for every process.
pub const DEFAULT_SNR: f64 = 0.16;

fn reject_unused(kind: SamplerKind, o: &SamplerOptions) -> Result<()> {
    use SamplerKind::*;
    let checks: [(&str, bool, &[SamplerKind]); 10] = [
        ("eta", o.eta.is_some(), &[Ddim]),
        ("variance", o.variance.is_some(), &[Ddpm]),
        ("clip-x0", o.clip_x0.is_some(), &[Ddpm, Ddim]),
        ("snr", o.snr.is_some(), &[Pc]),
        ("corrector-steps", o.corrector_steps.is_some(), &[Pc]),
        ("predictor", o.predictor.is_some(), &[Pc]),
        ("rtol", o.rtol.is_some(), &[OdeRk45]),
        ("atol", o.atol.is_some(), &[OdeRk45]),
        ("churn", o.churn.is_some(), &[EdmHeun]),
        ("ode-variable", o.ode_variable.is_some(), &[OdeEuler, OdeHeun]),
    ];
    for (flag, set, users) in checks {
        if set && !users.contains(&kind) {
            return Err(Error::param(
                flag,
                format!(
                    "--{flag} applies only to {}, not to --sampler {}",
                    users.iter().map(|k| k.name()).collect::<Vec<_>>().join(" and "),
                    kind.name()
                ),
            ));
        }
    }
    if o.spacing.is_some() && matches!(kind, EdmHeun | OdeRk45) {
        return Err(Error::param(
            "spacing",
            format!(
                "--sampler {} chooses its own noise levels; --spacing does not apply",
                kind.name()
            ),
        ));
    }
    Ok(())
}

fn time_grid(sde: &Sde, spacing: &Option<String>) -> Result<TimeGrid> {
    match spacing {
        None => Ok(sde.default_grid()),
        Some(s) => TimeGrid::from_name(s),
    }
}

/// Builds the sampler `kind` for `process`.
pub fn build_sampler(kind: SamplerKind, process: &Process, o: &SamplerOptions) -> Result<Box<dyn Sampler>> {
    if !kind.supports(process) {
        return Err(Error::param(
            "process",
            format!(
                "--sampler {} does not run on --process {} (it runs on: {})",
                kind.name(),
                process.name(),
                kind.processes().join(", ")
            ),
        ));
    }
    reject_unused(kind, o)?;
    let steps = o.steps.or(kind.default_steps(process));
    if steps == Some(0) {
        return Err(Error::param("steps", "got 0, expected at least 1"));
    }
    let steps = steps.unwrap_or(0);
    let prior_std = process.prior_std();
    match kind {
        SamplerKind::Ddpm | SamplerKind::Ddim => {
            let chain = match process {
                Process::Ddpm(schedule) => {
                    let spacing = match &o.spacing {
                        None => Spacing::Linspace,
                        Some(s) => Spacing::from_name(s)?,
                    };
                    ReverseChain::discrete(schedule, &timesteps(schedule.timesteps(), steps, spacing)?)?
                }
                Process::Continuous(sde) => ReverseChain::seed_ve(sde, steps, time_grid(sde, &o.spacing)?)?,
            };
            if let Some(c) = o.clip_x0 {
                crate::error::check_range("clip-x0", c, (0.0, false), (f64::INFINITY, false))?;
            }
            if kind == SamplerKind::Ddpm {
                let mut s = Ddpm::new(chain, o.variance.unwrap_or(Variance::FixedSmall), prior_std);
                s.clip_x0 = o.clip_x0;
                Ok(Box::new(s))
            } else {
                let mut s = Ddim::new(chain, o.eta.unwrap_or(0.0), prior_std)?;
                s.clip_x0 = o.clip_x0;
                Ok(Box::new(s))
            }
        }
        _ => {
            let Process::Continuous(sde) = process else {
                // supports() admits only continuous processes for the remaining samplers
                return Err(Error::param("process", "a continuous process is required"));
            };
            sde.validate()?;
            let sde = sde.clone();
            match kind {
                SamplerKind::OdeRk45 => {
                    let options = Rk45Options {
                        rtol: o.rtol.unwrap_or(1e-5),
                        atol: o.atol.unwrap_or(1e-5),
                        ..Default::default()
                    };
                    options.validate()?;
                    Ok(Box::new(OdeRk45 { sde, options }))
                }
                SamplerKind::EdmHeun => {
                    let churn = Churn {
                        s_churn: o.churn.unwrap_or(0.0),
                        ..Default::default()
                    };
                    Ok(Box::new(EdmHeun::new(sde, steps, churn)?))
                }
                _ => {
                    let times = sde.time_grid(steps, time_grid(&sde, &o.spacing)?)?;
                    Ok(match kind {
                        SamplerKind::EulerMaruyama => Box::new(EulerMaruyama::new(sde, times)),
                        SamplerKind::OdeEuler | SamplerKind::OdeHeun => {
                            let method = if kind == SamplerKind::OdeEuler {
                                OdeMethod::Euler
                            } else {
                                OdeMethod::Heun
                            };
                            let mut s = OdeSampler::new(sde, times, method);
                            if let Some(v) = o.ode_variable {
                                s.variable = v;
                            }
                            Box::new(s)
                        }
                        _ => Box::new(Pc::new(
                            sde,
                            times,
                            o.predictor.unwrap_or(Predictor::ReverseDiffusion),
                            o.snr.unwrap_or(DEFAULT_SNR),
                            o.corrector_steps.unwrap_or(1),
                        )?),
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::Schedule;

    fn process(name: &str) -> Process {
        Process::from_name(name, || Schedule::named("linear", 1000)).unwrap()
    }

    #[test]
    fn support_matrix() {
        for kind in SamplerKind::ALL {
            for p in Process::NAMES {
                let r = build_sampler(kind, &process(p), &SamplerOptions::default());
                let expected = match kind {
                    SamplerKind::Ddpm | SamplerKind::Ddim => p == "ddpm" || p == "seed-ve",
                    _ => p != "ddpm",
                };
                assert_eq!(
                    r.is_ok(),
                    expected,
                    "{} on {p}: {:?}",
                    kind.name(),
                    r.err().map(|e| e.to_string())
                );
                if let Err(e) = r {
                    assert!(e.is_user_error());
                    assert!(e.to_string().contains("does not run on --process"), "{e}");
                }
            }
        }
    }

    #[test]
    fn every_sampler_runs_on_image_shaped_f32_batches() {
        // [B, C, H, W] = [3, 1, 2, 2] in f32, the shape and dtype a U-Net will use; the oracle
        // is a 4-D isotropic Gaussian mixture seen through the flattened rows.
        use crate::gmm::{Covariance, Gmm};
        use crate::oracle::Oracle;
        use candle_core::{DType, Device};
        let g = Gmm::new(
            vec![0.5, 0.5],
            vec![vec![1.0, 0.0, -1.0, 0.5], vec![-1.0, 0.5, 0.0, 0.0]],
            vec![Covariance::Isotropic(0.1), Covariance::Isotropic(0.2)],
        )
        .unwrap();
        let o = Oracle::new(g);
        for kind in SamplerKind::ALL {
            let p = process(kind.processes()[0]);
            let steps = if kind == SamplerKind::OdeRk45 {
                None
            } else {
                Some(8)
            };
            let s = build_sampler(
                kind,
                &p,
                &SamplerOptions {
                    steps,
                    ..Default::default()
                },
            )
            .unwrap();
            let out = crate::samplers::sample_batched(
                s.as_ref(),
                &o,
                3,
                &[1, 2, 2],
                0,
                3,
                DType::F32,
                &Device::Cpu,
                &mut crate::samplers::NoObserver,
            )
            .unwrap();
            assert_eq!(out.x.dims(), &[3, 1, 2, 2], "{}", kind.name());
            assert_eq!(out.x.dtype(), DType::F32, "{}", kind.name());
        }
    }

    #[test]
    fn bad_options_are_errors() {
        let ddpm = process("ddpm");
        let opts = |f: fn(&mut SamplerOptions)| {
            let mut o = SamplerOptions::default();
            f(&mut o);
            o
        };
        let e = |k, p: &Process, o: SamplerOptions| build_sampler(k, p, &o).err().map(|e| e.to_string());
        assert!(e(SamplerKind::Ddpm, &ddpm, opts(|o| o.steps = Some(0)))
            .unwrap()
            .contains("steps"));
        assert!(e(SamplerKind::Ddpm, &ddpm, opts(|o| o.steps = Some(1001)))
            .unwrap()
            .contains("1001"));
        assert!(e(SamplerKind::Ddpm, &ddpm, opts(|o| o.eta = Some(0.5)))
            .unwrap()
            .contains("--eta applies only to ddim"));
        assert!(e(SamplerKind::Ddim, &ddpm, opts(|o| o.eta = Some(1.5)))
            .unwrap()
            .contains("eta"));
        assert!(e(
            SamplerKind::Ddim,
            &ddpm,
            opts(|o| o.spacing = Some("log-snr".into()))
        )
        .is_some());
        assert!(e(
            SamplerKind::Pc,
            &process("vp"),
            opts(|o| o.corrector_steps = Some(0))
        )
        .is_some());
        assert!(e(SamplerKind::Pc, &process("vp"), opts(|o| o.snr = Some(-1.0))).is_some());
        assert!(e(SamplerKind::OdeRk45, &process("vp"), opts(|o| o.rtol = Some(0.0))).is_some());
        assert!(e(
            SamplerKind::EulerMaruyama,
            &process("ve"),
            opts(|o| o.spacing = Some("leading".into()))
        )
        .is_some());
        assert!(SamplerKind::from_name("ddpm2").is_err());
        // K < T respaces to exactly K steps
        let s = build_sampler(SamplerKind::Ddpm, &ddpm, &opts(|o| o.steps = Some(37))).unwrap();
        assert_eq!(s.name(), "ddpm");
    }
}
