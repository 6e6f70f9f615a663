//! diffusers' `scheduler/scheduler_config.json` (`DDPMScheduler`, `DDIMScheduler`) as a typed
//! struct, and the [`Schedule`] it describes.
//!
//! | diffusers key | here | meaning |
//! | --- | --- | --- |
//! | `num_train_timesteps` | `num_train_timesteps` | T (1000) |
//! | `beta_schedule` + `beta_start`/`beta_end` | [`DiffusersBetaSchedule`] | `linear`, `scaled_linear`, `squaredcos_cap_v2` (= our `cosine`), `sigmoid` (= GeoDiff's, *not* our Jabri `sigmoid`) |
//! | `trained_betas` | `trained_betas` | explicit betas (override `beta_schedule`) |
//! | `rescale_betas_zero_snr` | same | Lin et al. 2024's zero-terminal-SNR rescaling |
//! | `prediction_type` | [`Prediction`] | `epsilon` -> eps, `sample` -> x0, `v_prediction` -> v |
//! | `variance_type` | [`VarianceType`] | DDPM's reverse variance |
//! | `clip_sample`, `clip_sample_range` | same | clamp the predicted x_0 to +-range |
//! | `thresholding`, `dynamic_thresholding_ratio`, `sample_max_value` | same | Imagen's dynamic thresholding |
//! | `timestep_spacing`, `steps_offset` | [`TimestepSpacing`], same | how `set_timesteps` picks K of T steps |
//! | `set_alpha_to_one` | same | DDIM's last step lands on alpha_bar = 1 (else alpha_bar_1) |
//!
//! The file is read by [`crate::config::scheduler`]: unknown keys are accepted (and listed with
//! `--verbose`), keys starting with `_` are metadata, a field of the wrong type or out of range
//! is an error naming it. Stepping is the samplers' job; this module only holds the config and
//! builds the schedule.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::config::Parsed;

use crate::denoiser::Prediction;
use crate::error::{Error, Result};
use crate::schedule::{geodiff_sigmoid_betas, rescale_zero_terminal_snr, BetaSchedule, Schedule};

/// Which diffusers scheduler class the config was written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchedulerClass {
    /// `DDPMScheduler` (also assumed when `_class_name` is absent).
    Ddpm,
    /// `DDIMScheduler`.
    Ddim,
    /// `DPMSolverMultistepScheduler` ([`crate::samplers::dpm_solver`]).
    DpmSolverMultistep,
    /// `DPMSolverSinglestepScheduler` ([`crate::samplers::dpm_solver`]).
    DpmSolverSinglestep,
    /// `UniPCMultistepScheduler` ([`crate::samplers::unipc`]).
    UniPcMultistep,
    /// `DEISMultistepScheduler` ([`crate::samplers::deis`]).
    DeisMultistep,
    /// `EulerDiscreteScheduler` ([`crate::samplers::sigma_euler`]).
    EulerDiscrete,
    /// `EulerAncestralDiscreteScheduler` ([`crate::samplers::sigma_euler`]).
    EulerAncestralDiscrete,
    /// `HeunDiscreteScheduler` ([`crate::samplers::sigma_euler`]).
    HeunDiscrete,
}

impl SchedulerClass {
    /// diffusers' class name (`_class_name`).
    pub fn name(&self) -> &'static str {
        match self {
            SchedulerClass::Ddpm => "DDPMScheduler",
            SchedulerClass::Ddim => "DDIMScheduler",
            SchedulerClass::DpmSolverMultistep => "DPMSolverMultistepScheduler",
            SchedulerClass::DpmSolverSinglestep => "DPMSolverSinglestepScheduler",
            SchedulerClass::UniPcMultistep => "UniPCMultistepScheduler",
            SchedulerClass::DeisMultistep => "DEISMultistepScheduler",
            SchedulerClass::EulerDiscrete => "EulerDiscreteScheduler",
            SchedulerClass::EulerAncestralDiscrete => "EulerAncestralDiscreteScheduler",
            SchedulerClass::HeunDiscrete => "HeunDiscreteScheduler",
        }
    }

    /// The class named `name`, if this loader knows it.
    pub fn from_name(name: &str) -> Option<Self> {
        [
            SchedulerClass::Ddpm,
            SchedulerClass::Ddim,
            SchedulerClass::DpmSolverMultistep,
            SchedulerClass::DpmSolverSinglestep,
            SchedulerClass::UniPcMultistep,
            SchedulerClass::DeisMultistep,
            SchedulerClass::EulerDiscrete,
            SchedulerClass::EulerAncestralDiscrete,
            SchedulerClass::HeunDiscrete,
        ]
        .into_iter()
        .find(|c| c.name() == name)
    }

    /// One of the fast solvers' classes (not DDPM / DDIM): their timestep spacing defaults to
    /// linspace, not leading.
    pub fn is_fast_solver(&self) -> bool {
        !matches!(self, SchedulerClass::Ddpm | SchedulerClass::Ddim)
    }
}

/// diffusers' `beta_schedule` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum DiffusersBetaSchedule {
    /// `linear`: `beta_t` linear from `beta_start` to `beta_end` (Ho et al. 2020).
    #[serde(rename = "linear")]
    Linear,
    /// `scaled_linear`: linear in sqrt(beta) (latent diffusion).
    #[serde(rename = "scaled_linear")]
    ScaledLinear,
    /// `squaredcos_cap_v2`: Nichol & Dhariwal's cosine, s = 0.008, beta capped at 0.999 (our `cosine`).
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
    /// `sigmoid`: GeoDiff (Xu et al. 2022) `beta_t = sigmoid(linspace(-6, 6, T)_t) * (beta_end - beta_start) + beta_start`.
    #[serde(rename = "sigmoid")]
    Sigmoid,
}

/// diffusers' `variance_type` (the reverse-process variance of `DDPMScheduler.step`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VarianceType {
    /// `fixed_small`: the posterior variance beta~_t (Ho et al. 2020, sigma_t^2 = beta~_t).
    FixedSmall,
    /// `fixed_small_log`: the same, computed through its log.
    FixedSmallLog,
    /// `fixed_large`: sigma_t^2 = beta_t.
    FixedLarge,
    /// `fixed_large_log`: log beta_t.
    FixedLargeLog,
    /// `learned`: the network outputs the variance.
    Learned,
    /// `learned_range`: the network interpolates between the two logs (Nichol & Dhariwal 2021, eq. 15).
    LearnedRange,
}

/// diffusers' `timestep_spacing` (how K inference steps are chosen among T).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// `leading`: `arange(0, K) * (T // K) + steps_offset` (never reaches T - 1).
    Leading,
    /// `trailing`: `round(arange(T, 0, -T / K)) - 1` (starts at T - 1).
    Trailing,
    /// `linspace`: `round(linspace(0, T - 1, K))`.
    Linspace,
}

/// A parsed `DDPMScheduler` / `DDIMScheduler` config with diffusers' defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct SchedulerConfig {
    /// The scheduler class (`_class_name`).
    pub class: SchedulerClass,
    /// T (1000).
    pub num_train_timesteps: usize,
    /// beta_1 of `linear`/`scaled_linear`/`sigmoid` (0.0001).
    pub beta_start: f64,
    /// beta_T of `linear`/`scaled_linear`/`sigmoid` (0.02).
    pub beta_end: f64,
    /// The beta schedule (linear).
    pub beta_schedule: DiffusersBetaSchedule,
    /// Explicit betas, which override `beta_schedule` (None).
    pub trained_betas: Option<Vec<f64>>,
    /// What the network predicts (epsilon).
    pub prediction_type: Prediction,
    /// DDPM's reverse variance (fixed_small).
    pub variance_type: VarianceType,
    /// Clamp the predicted x_0 to [-clip_sample_range, clip_sample_range] (true).
    pub clip_sample: bool,
    /// (1.0).
    pub clip_sample_range: f64,
    /// Dynamic thresholding (Saharia et al. 2022) (false).
    pub thresholding: bool,
    /// Its percentile (0.995).
    pub dynamic_thresholding_ratio: f64,
    /// Its maximum (1.0).
    pub sample_max_value: f64,
    /// Inference timestep spacing (leading).
    pub timestep_spacing: TimestepSpacing,
    /// Added to leading timesteps (0).
    pub steps_offset: usize,
    /// DDIM: alpha_bar before the first step is 1 (true) or alpha_bar_1 (false).
    pub set_alpha_to_one: bool,
    /// Rescale the betas to zero terminal SNR (false).
    pub rescale_betas_zero_snr: bool,
    /// The fast solvers' keys (DPM-Solver, UniPC, DEIS, Euler, Heun); all unset for DDPM / DDIM.
    pub solver: SolverFields,
}

/// The keys of diffusers' fast schedulers (`DPMSolverMultistepScheduler`, ...), as written in
/// the config (None / false / empty: absent, the scheduler class's default applies). The string
/// values are checked against diffusers' names when parsed; the samplers'
/// `from_scheduler_config` builders turn them into their option types.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SolverFields {
    /// `solver_order`.
    pub solver_order: Option<usize>,
    /// `algorithm_type` (`dpmsolver`, `dpmsolver++`, `sde-dpmsolver++`, `sde-dpmsolver`, `deis`).
    pub algorithm_type: Option<String>,
    /// `solver_type` (`midpoint`, `heun`, `bh1`, `bh2`, `logrho`).
    pub solver_type: Option<String>,
    /// `lower_order_final`.
    pub lower_order_final: Option<bool>,
    /// `euler_at_final`.
    pub euler_at_final: Option<bool>,
    /// `use_karras_sigmas`.
    pub use_karras_sigmas: bool,
    /// `use_exponential_sigmas`.
    pub use_exponential_sigmas: bool,
    /// `use_beta_sigmas`.
    pub use_beta_sigmas: bool,
    /// `use_lu_lambdas` (uniform in lambda over the whole table: the exponential grid).
    pub use_lu_lambdas: bool,
    /// `use_flow_sigmas` (flow matching; not supported by the samplers).
    pub use_flow_sigmas: bool,
    /// `final_sigmas_type` (`zero`, `sigma_min`).
    pub final_sigmas_type: Option<String>,
    /// `lambda_min_clipped`.
    pub lambda_min_clipped: Option<f64>,
    /// UniPC's `predict_x0`.
    pub predict_x0: Option<bool>,
    /// UniPC's `disable_corrector` (step indices).
    pub disable_corrector: Vec<usize>,
    /// UniPC's `solver_p` is set (another scheduler as predictor: not supported).
    pub solver_p: bool,
    /// `sigma_min` (Euler, UniPC: the lower end of the karras / exponential / beta range).
    pub sigma_min: Option<f64>,
    /// `sigma_max`.
    pub sigma_max: Option<f64>,
    /// Euler's `interpolation_type` (`linear`, `log_linear`).
    pub interpolation_type: Option<String>,
    /// Euler's `timestep_type` (`discrete`, `continuous`).
    pub timestep_type: Option<String>,
    /// `use_dynamic_shifting` (flow matching; not supported).
    pub use_dynamic_shifting: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            class: SchedulerClass::Ddpm,
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: DiffusersBetaSchedule::Linear,
            trained_betas: None,
            prediction_type: Prediction::Eps,
            variance_type: VarianceType::FixedSmall,
            clip_sample: true,
            clip_sample_range: 1.0,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 0,
            set_alpha_to_one: true,
            rescale_betas_zero_snr: false,
            solver: SolverFields::default(),
        }
    }
}

impl SchedulerConfig {
    /// Reads and parses `path` (a `scheduler_config.json`); errors name the file and the field
    /// (see [`crate::config::scheduler`]).
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_file_reporting(path).map(|p| p.value)
    }

    /// [`SchedulerConfig::from_file`], with the fields of the file that were ignored (listed by
    /// `--verbose`).
    pub fn from_file_reporting(path: &Path) -> Result<Parsed<Self>> {
        let text = crate::io::read_text(path)?;
        crate::config::scheduler::read(&text).map_err(|e| Error::bad_input(path, e.to_string()))
    }

    /// Parses a scheduler config object (missing keys take diffusers' defaults; unknown keys
    /// are ignored).
    pub fn from_json(v: &Value) -> Result<Self> {
        crate::config::scheduler::parse(v)
            .map(|p| p.value)
            .map_err(|e| Error::param("scheduler config", e.to_string()))
    }

    /// The betas this config describes (T values, index 0 is t = 1, f64). diffusers computes
    /// them in float32; ours are exact to f64 rounding, so diffusers' `alphas_cumprod` differ
    /// from [`Schedule::alpha_bar`] by float32 rounding (about 1e-6 relative, growing with t).
    pub fn betas(&self) -> Result<Vec<f64>> {
        let t = self.num_train_timesteps;
        let betas = match &self.trained_betas {
            Some(b) => {
                if b.len() != t {
                    return Err(Error::param(
                        "trained_betas",
                        format!("has {} values but num_train_timesteps is {t}", b.len()),
                    ));
                }
                b.clone()
            }
            None => match self.beta_schedule {
                DiffusersBetaSchedule::Linear => BetaSchedule::Linear {
                    beta_start: self.beta_start,
                    beta_end: self.beta_end,
                }
                .betas(t)?,
                DiffusersBetaSchedule::ScaledLinear => BetaSchedule::ScaledLinear {
                    beta_start: self.beta_start,
                    beta_end: self.beta_end,
                }
                .betas(t)?,
                DiffusersBetaSchedule::SquaredcosCapV2 => BetaSchedule::from_name("cosine")?.betas(t)?,
                DiffusersBetaSchedule::Sigmoid => geodiff_sigmoid_betas(t, self.beta_start, self.beta_end)?,
            },
        };
        if self.rescale_betas_zero_snr {
            rescale_zero_terminal_snr(&betas)
        } else {
            Ok(betas)
        }
    }

    /// The discrete schedule (all derived tables) this config describes.
    pub fn schedule(&self) -> Result<Schedule> {
        Schedule::from_betas(self.betas()?)
    }

    /// The `DDPMScheduler` config of a `diffuse` training schedule (for exporting a run):
    ///
    /// | ours | diffusers |
    /// | --- | --- |
    /// | `linear`, `scaled_linear` | the same name with `beta_start`, `beta_end` |
    /// | `cosine` with s = 0.008, max_beta = 0.999 | `squaredcos_cap_v2` (Nichol & Dhariwal, the same formula) |
    /// | `quadratic`, Jabri `sigmoid`, cosine with other parameters | `trained_betas` (our f64 betas; diffusers has no name for them, and its `sigmoid` is GeoDiff's) |
    ///
    /// Sampling choices follow `diffuse`'s defaults rather than diffusers': `clip_sample`
    /// false (clipping is off unless asked), `timestep_spacing` `trailing` (starts at T - 1, and
    /// `DDIMScheduler`'s previous-timestep formula agrees with the look-up whenever K divides
    /// T), `variance_type` `fixed_small`.
    pub fn for_training(schedule: &BetaSchedule, timesteps: usize, prediction: Prediction) -> Result<Self> {
        let base = SchedulerConfig {
            num_train_timesteps: timesteps,
            prediction_type: prediction,
            clip_sample: false,
            timestep_spacing: TimestepSpacing::Trailing,
            ..SchedulerConfig::default()
        };
        let cosine_default = BetaSchedule::from_name("cosine")?;
        let cfg = match schedule {
            BetaSchedule::Linear { beta_start, beta_end } => SchedulerConfig {
                beta_schedule: DiffusersBetaSchedule::Linear,
                beta_start: *beta_start,
                beta_end: *beta_end,
                ..base
            },
            BetaSchedule::ScaledLinear { beta_start, beta_end } => SchedulerConfig {
                beta_schedule: DiffusersBetaSchedule::ScaledLinear,
                beta_start: *beta_start,
                beta_end: *beta_end,
                ..base
            },
            s if *s == cosine_default => SchedulerConfig {
                beta_schedule: DiffusersBetaSchedule::SquaredcosCapV2,
                ..base
            },
            other => SchedulerConfig {
                trained_betas: Some(other.betas(timesteps)?),
                ..base
            },
        };
        // the config must describe the very same betas
        let ours = schedule.betas(timesteps)?;
        if cfg.betas()? != ours {
            return Err(Error::Numerical(format!(
                "the diffusers scheduler config for the {} schedule does not reproduce its betas",
                schedule.name()
            )));
        }
        Ok(cfg)
    }
}

impl SchedulerConfig {
    /// An error unless `schedule` has this config's `num_train_timesteps` (the table the
    /// denoiser was built with must be the config's).
    pub fn check_schedule_matches(&self, schedule: &Schedule) -> Result<()> {
        if schedule.timesteps() != self.num_train_timesteps {
            return Err(Error::param(
                "schedule",
                format!(
                    "has {} steps but the scheduler config's num_train_timesteps is {}",
                    schedule.timesteps(),
                    self.num_train_timesteps
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ddpm_cifar10_scheduler_parses() {
        // google/ddpm-cifar10-32's scheduler_config.json.
        let v: Value = serde_json::from_str(
            r#"{"_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1", "beta_end": 0.02,
                "beta_schedule": "linear", "beta_start": 0.0001, "clip_sample": true,
                "num_train_timesteps": 1000, "trained_betas": null, "variance_type": "fixed_small"}"#,
        )
        .unwrap();
        let c = SchedulerConfig::from_json(&v).unwrap();
        assert_eq!(c, SchedulerConfig::default());
        let s = c.schedule().unwrap();
        assert_eq!(
            s,
            Schedule::from_betas(BetaSchedule::from_name("linear").unwrap().betas(1000).unwrap()).unwrap()
        );
    }

    #[test]
    fn names_map_to_our_schedules() {
        let parse = |t: &str| SchedulerConfig::from_json(&serde_json::from_str(t).unwrap()).unwrap();
        let c = parse(
            r#"{"_class_name": "DDIMScheduler", "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction", "timestep_spacing": "trailing", "set_alpha_to_one": false}"#,
        );
        assert_eq!(c.class, SchedulerClass::Ddim);
        assert_eq!(c.prediction_type, Prediction::V);
        assert_eq!(c.timestep_spacing, TimestepSpacing::Trailing);
        assert!(!c.set_alpha_to_one);
        assert_eq!(
            c.schedule().unwrap().beta,
            Schedule::named("cosine", 1000).unwrap().beta
        );
        // trained_betas override the named schedule.
        let c = parse(
            r#"{"num_train_timesteps": 3, "trained_betas": [0.1, 0.2, 0.3], "beta_schedule": "sigmoid"}"#,
        );
        assert_eq!(c.betas().unwrap(), vec![0.1, 0.2, 0.3]);
        let c = parse(
            r#"{"num_train_timesteps": 3, "trained_betas": [0.1, 0.2, 0.3], "rescale_betas_zero_snr": true}"#,
        );
        assert_eq!(*c.betas().unwrap().last().unwrap(), 1.0);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (
                r#"{"beta_schedule": "laplace"}"#,
                "field `beta_schedule`: expected one of",
            ),
            (r#"{"prediction_type": "noise"}"#, "prediction_type"),
            (r#"{"variance_type": "huge"}"#, "variance_type"),
            (r#"{"timestep_spacing": "quadratic"}"#, "timestep_spacing"),
            (r#"{"_class_name": "PNDMScheduler"}"#, "PNDMScheduler"),
            (r#"{"num_train_timesteps": 1}"#, "num_train_timesteps"),
            (r#"{"clip_sample": "yes"}"#, "clip_sample"),
        ];
        for (t, want) in cases {
            let e = SchedulerConfig::from_json(&serde_json::from_str(t).unwrap())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{t}: {e}");
        }
        let c = SchedulerConfig::from_json(
            &serde_json::from_str(r#"{"num_train_timesteps": 4, "trained_betas": [0.1]}"#).unwrap(),
        )
        .unwrap();
        assert!(c.schedule().unwrap_err().to_string().contains("trained_betas"));
    }
}
