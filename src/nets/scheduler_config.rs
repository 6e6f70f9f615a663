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
//! Unknown keys are an error naming the key; keys starting with `_` are metadata. Stepping is
//! the samplers' job; this module only parses and builds the schedule.

use std::path::Path;

use serde_json::{Map, Value};

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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiffusersBetaSchedule {
    /// `linear`: `beta_t` linear from `beta_start` to `beta_end` (Ho et al. 2020).
    Linear,
    /// `scaled_linear`: linear in sqrt(beta) (latent diffusion).
    ScaledLinear,
    /// `squaredcos_cap_v2`: Nichol & Dhariwal's cosine, s = 0.008, beta capped at 0.999 (our `cosine`).
    SquaredcosCapV2,
    /// `sigmoid`: GeoDiff (Xu et al. 2022) `beta_t = sigmoid(linspace(-6, 6, T)_t) * (beta_end - beta_start) + beta_start`.
    Sigmoid,
}

/// diffusers' `variance_type` (the reverse-process variance of `DDPMScheduler.step`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

/// Keys of the fast solvers' schedulers (diffusers 0.42) beyond DDPM's and DDIM's. The flow
/// matching keys (`flow_shift`, `time_shift_type`, `shift_terminal`) are accepted and matter only
/// with `use_flow_sigmas` / `use_dynamic_shifting`, which the samplers reject.
const SOLVER_KEYS: [&str; 23] = [
    "solver_order",
    "algorithm_type",
    "solver_type",
    "lower_order_final",
    "euler_at_final",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "use_lu_lambdas",
    "use_flow_sigmas",
    "flow_shift",
    "final_sigmas_type",
    "lambda_min_clipped",
    "predict_x0",
    "disable_corrector",
    "solver_p",
    "sigma_min",
    "sigma_max",
    "interpolation_type",
    "timestep_type",
    "use_dynamic_shifting",
    "time_shift_type",
    "shift_terminal",
];

/// Keys of `DDPMScheduler` and `DDIMScheduler` (diffusers 0.42). `tensor_format` is a
/// long-deprecated key of old configs with no effect on the math.
const KNOWN_KEYS: [&str; 17] = [
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "variance_type",
    "clip_sample",
    "prediction_type",
    "thresholding",
    "dynamic_thresholding_ratio",
    "clip_sample_range",
    "sample_max_value",
    "timestep_spacing",
    "steps_offset",
    "rescale_betas_zero_snr",
    "set_alpha_to_one",
    "tensor_format",
];

impl SchedulerConfig {
    /// Reads and parses `path` (a `scheduler_config.json`); errors name the file and the key.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::io::read_text(path)?;
        // Python's json writes float('-inf') (DPM-Solver's default lambda_min_clipped) as the
        // bare token -Infinity, which is not JSON; read it as the string "-Infinity".
        let text = text.replace("-Infinity", "\"-Infinity\"");
        let v: Value =
            serde_json::from_str(&text).map_err(|e| Error::bad_input(path, format!("invalid JSON: {e}")))?;
        Self::from_json(&v).map_err(|e| match e {
            Error::InvalidParameter { message, .. } => Error::bad_input(path, message),
            other => other,
        })
    }

    /// Parses a scheduler config object (missing keys take diffusers' defaults).
    pub fn from_json(v: &Value) -> Result<Self> {
        parse(v).map_err(|m| Error::param("scheduler config", m))
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

type Parse<T> = std::result::Result<T, String>;

fn parse(v: &Value) -> Parse<SchedulerConfig> {
    let obj: &Map<String, Value> = v.as_object().ok_or("expected a JSON object")?;
    for key in obj.keys() {
        if !key.starts_with('_')
            && !KNOWN_KEYS.contains(&key.as_str())
            && !SOLVER_KEYS.contains(&key.as_str())
        {
            return Err(format!(
                "unknown key '{key}': not a DDPMScheduler/DDIMScheduler (or DPM-Solver, UniPC, DEIS, Euler, Heun) field this loader understands"
            ));
        }
    }
    let class = match obj.get("_class_name").and_then(Value::as_str) {
        None => SchedulerClass::Ddpm,
        Some(name) => SchedulerClass::from_name(name).ok_or_else(|| {
            format!(
                "_class_name: '{name}' is not supported; expected DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler, UniPCMultistepScheduler, DEISMultistepScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler or HeunDiscreteScheduler"
            )
        })?,
    };
    // the defaults of the class's own __init__ where they differ from DDPMScheduler's
    let d = match class {
        SchedulerClass::Ddpm | SchedulerClass::Ddim => SchedulerConfig::default(),
        SchedulerClass::HeunDiscrete => SchedulerConfig {
            beta_start: 0.00085,
            beta_end: 0.012,
            clip_sample: false,
            timestep_spacing: TimestepSpacing::Linspace,
            ..SchedulerConfig::default()
        },
        _ => SchedulerConfig {
            clip_sample: false,
            timestep_spacing: TimestepSpacing::Linspace,
            ..SchedulerConfig::default()
        },
    };
    let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
    let f64_of = |k: &str, dflt: f64| -> Parse<f64> {
        match get(k) {
            None => Ok(dflt),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| format!("{k}: expected a number, got {v}")),
        }
    };
    let bool_of = |k: &str, dflt: bool| -> Parse<bool> {
        match get(k) {
            None => Ok(dflt),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| format!("{k}: expected true or false, got {v}")),
        }
    };
    let usize_of = |k: &str, dflt: usize| -> Parse<usize> {
        match get(k) {
            None => Ok(dflt),
            Some(v) => v
                .as_u64()
                .map(|u| u as usize)
                .ok_or_else(|| format!("{k}: expected a non-negative integer, got {v}")),
        }
    };
    let str_of = |k: &str| -> Parse<Option<&str>> {
        match get(k) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| format!("{k}: expected a string, got {v}")),
        }
    };
    let beta_schedule = match str_of("beta_schedule")? {
        None | Some("linear") => DiffusersBetaSchedule::Linear,
        Some("scaled_linear") => DiffusersBetaSchedule::ScaledLinear,
        Some("squaredcos_cap_v2") => DiffusersBetaSchedule::SquaredcosCapV2,
        Some("sigmoid") => DiffusersBetaSchedule::Sigmoid,
        Some(other) => {
            return Err(format!(
                "beta_schedule: '{other}' is not supported (supported: linear, scaled_linear, squaredcos_cap_v2, sigmoid)"
            ))
        }
    };
    let prediction_type = match str_of("prediction_type")? {
        None | Some("epsilon") => Prediction::Eps,
        Some("sample") => Prediction::X0,
        Some("v_prediction") => Prediction::V,
        Some(other) => {
            return Err(format!(
                "prediction_type: '{other}' is not supported (supported: epsilon, sample, v_prediction)"
            ))
        }
    };
    let variance_type = match str_of("variance_type")? {
        None | Some("fixed_small") => VarianceType::FixedSmall,
        Some("fixed_small_log") => VarianceType::FixedSmallLog,
        Some("fixed_large") => VarianceType::FixedLarge,
        Some("fixed_large_log") => VarianceType::FixedLargeLog,
        Some("learned") => VarianceType::Learned,
        Some("learned_range") => VarianceType::LearnedRange,
        Some(other) => {
            return Err(format!(
                "variance_type: '{other}' is not supported (supported: fixed_small, fixed_small_log, fixed_large, fixed_large_log, learned, learned_range)"
            ))
        }
    };
    let timestep_spacing = match str_of("timestep_spacing")? {
        None => d.timestep_spacing,
        Some("leading") => TimestepSpacing::Leading,
        Some("trailing") => TimestepSpacing::Trailing,
        Some("linspace") => TimestepSpacing::Linspace,
        Some(other) => {
            return Err(format!(
                "timestep_spacing: '{other}' is not supported (supported: leading, trailing, linspace)"
            ))
        }
    };
    let trained_betas = match get("trained_betas") {
        None => None,
        Some(v) => Some(
            v.as_array()
                .ok_or_else(|| format!("trained_betas: expected a list of numbers, got {v}"))?
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    b.as_f64()
                        .ok_or_else(|| format!("trained_betas[{i}]: expected a number, got {b}"))
                })
                .collect::<Parse<Vec<f64>>>()?,
        ),
    };
    let cfg = SchedulerConfig {
        class,
        num_train_timesteps: usize_of("num_train_timesteps", d.num_train_timesteps)?,
        beta_start: f64_of("beta_start", d.beta_start)?,
        beta_end: f64_of("beta_end", d.beta_end)?,
        beta_schedule,
        trained_betas,
        prediction_type,
        variance_type,
        clip_sample: bool_of("clip_sample", d.clip_sample)?,
        clip_sample_range: f64_of("clip_sample_range", d.clip_sample_range)?,
        thresholding: bool_of("thresholding", d.thresholding)?,
        dynamic_thresholding_ratio: f64_of("dynamic_thresholding_ratio", d.dynamic_thresholding_ratio)?,
        sample_max_value: f64_of("sample_max_value", d.sample_max_value)?,
        timestep_spacing,
        steps_offset: usize_of("steps_offset", d.steps_offset)?,
        set_alpha_to_one: bool_of("set_alpha_to_one", d.set_alpha_to_one)?,
        rescale_betas_zero_snr: bool_of("rescale_betas_zero_snr", d.rescale_betas_zero_snr)?,
        solver: parse_solver_fields(obj)?,
    };
    if !(2..=crate::schedule::MAX_TIMESTEPS).contains(&cfg.num_train_timesteps) {
        return Err(format!(
            "num_train_timesteps: got {}, expected 2..={}",
            cfg.num_train_timesteps,
            crate::schedule::MAX_TIMESTEPS
        ));
    }
    if !(cfg.clip_sample_range.is_finite() && cfg.clip_sample_range > 0.0) {
        return Err(format!(
            "clip_sample_range: got {}, expected a positive number",
            cfg.clip_sample_range
        ));
    }
    Ok(cfg)
}

/// The fast solvers' keys (see [`SolverFields`]); strings are checked against diffusers' names.
fn parse_solver_fields(obj: &Map<String, Value>) -> Parse<SolverFields> {
    let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
    let bool_of = |k: &str| -> Parse<Option<bool>> {
        get(k)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| format!("{k}: expected true or false, got {v}"))
            })
            .transpose()
    };
    let f64_of = |k: &str| -> Parse<Option<f64>> {
        match get(k) {
            None => Ok(None),
            // diffusers writes -inf as the JSON string "-Infinity" only via Python's json (as a bare token)
            Some(Value::String(s)) if s == "-Infinity" || s == "-inf" => Ok(Some(f64::NEG_INFINITY)),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| format!("{k}: expected a number, got {v}")),
        }
    };
    let str_in = |k: &str, allowed: &[&str]| -> Parse<Option<String>> {
        match get(k) {
            None => Ok(None),
            Some(v) => {
                let s = v
                    .as_str()
                    .ok_or_else(|| format!("{k}: expected a string, got {v}"))?;
                if allowed.contains(&s) {
                    Ok(Some(s.to_string()))
                } else {
                    Err(format!(
                        "{k}: '{s}' is not supported (supported: {})",
                        allowed.join(", ")
                    ))
                }
            }
        }
    };
    let solver_order = match get("solver_order") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|&o| o >= 1)
                .ok_or_else(|| format!("solver_order: expected a positive integer, got {v}"))?
                as usize,
        ),
    };
    let disable_corrector = match get("disable_corrector") {
        None => Vec::new(),
        Some(v) => v
            .as_array()
            .ok_or_else(|| format!("disable_corrector: expected a list of step indices, got {v}"))?
            .iter()
            .map(|i| {
                i.as_u64()
                    .map(|u| u as usize)
                    .ok_or_else(|| format!("disable_corrector: expected non-negative integers, got {i}"))
            })
            .collect::<Parse<Vec<usize>>>()?,
    };
    Ok(SolverFields {
        solver_order,
        algorithm_type: str_in(
            "algorithm_type",
            &[
                "dpmsolver",
                "dpmsolver++",
                "sde-dpmsolver",
                "sde-dpmsolver++",
                "deis",
            ],
        )?,
        solver_type: str_in("solver_type", &["midpoint", "heun", "bh1", "bh2", "logrho"])?,
        lower_order_final: bool_of("lower_order_final")?,
        euler_at_final: bool_of("euler_at_final")?,
        use_karras_sigmas: bool_of("use_karras_sigmas")?.unwrap_or(false),
        use_exponential_sigmas: bool_of("use_exponential_sigmas")?.unwrap_or(false),
        use_beta_sigmas: bool_of("use_beta_sigmas")?.unwrap_or(false),
        use_lu_lambdas: bool_of("use_lu_lambdas")?.unwrap_or(false),
        use_flow_sigmas: bool_of("use_flow_sigmas")?.unwrap_or(false),
        final_sigmas_type: str_in("final_sigmas_type", &["zero", "sigma_min"])?,
        lambda_min_clipped: f64_of("lambda_min_clipped")?,
        predict_x0: bool_of("predict_x0")?,
        disable_corrector,
        solver_p: get("solver_p").is_some(),
        sigma_min: f64_of("sigma_min")?,
        sigma_max: f64_of("sigma_max")?,
        interpolation_type: str_in("interpolation_type", &["linear", "log_linear"])?,
        timestep_type: str_in("timestep_type", &["discrete", "continuous"])?,
        use_dynamic_shifting: bool_of("use_dynamic_shifting")?.unwrap_or(false),
    })
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
            (r#"{"beta_schedule": "laplace"}"#, "beta_schedule: 'laplace'"),
            (r#"{"prediction_type": "noise"}"#, "prediction_type"),
            (r#"{"variance_type": "huge"}"#, "variance_type"),
            (r#"{"timestep_spacing": "quadratic"}"#, "timestep_spacing"),
            (r#"{"_class_name": "PNDMScheduler"}"#, "PNDMScheduler"),
            (r#"{"skip_prk_steps": true}"#, "unknown key 'skip_prk_steps'"),
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
