//! diffusers' `scheduler_config.json` (`DDPMScheduler`, `DDIMScheduler` and the fast solvers'
//! classes), as a serde-derived [`SchedulerFile`], resolved into a
//! [`crate::nets::scheduler_config::SchedulerConfig`] with the class's own defaults.
//!
//! Unknown fields are accepted and listed ([`Parsed::ignored`]): diffusers adds keys with
//! every release, and the flow-matching keys (`flow_shift`, `time_shift_type`,
//! `shift_terminal`) and the deprecated `tensor_format` do not change the math we run. A field
//! of the wrong type, a name outside diffusers' list, or a value out of range is an error
//! naming the field. `null` is the same as absent (diffusers writes `"trained_betas": null`).

use serde::Deserialize;
use serde_json::Value;

use super::{found_value, FieldError, Parsed};
use crate::denoiser::Prediction;
use crate::nets::scheduler_config::{
    DiffusersBetaSchedule, SchedulerClass, SchedulerConfig, SolverFields, TimestepSpacing, VarianceType,
};

/// A `scheduler_config.json` as written (every field optional: absent or null takes the
/// class's default). Field meanings: see [`SchedulerConfig`] and [`SolverFields`].
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct SchedulerFile {
    /// `_class_name`: the scheduler class (absent: `DDPMScheduler`).
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    /// T, in 2..=[`crate::schedule::MAX_TIMESTEPS`].
    pub num_train_timesteps: Option<usize>,
    /// beta_1 of `linear` / `scaled_linear` / `sigmoid`.
    pub beta_start: Option<f64>,
    /// beta_T of the same.
    pub beta_end: Option<f64>,
    /// `linear`, `scaled_linear`, `squaredcos_cap_v2`, `sigmoid`.
    pub beta_schedule: Option<DiffusersBetaSchedule>,
    /// Explicit betas (override `beta_schedule`; as many as `num_train_timesteps`).
    pub trained_betas: Option<Vec<f64>>,
    /// `fixed_small`, `fixed_small_log`, `fixed_large`, `fixed_large_log`, `learned`, `learned_range`.
    pub variance_type: Option<VarianceType>,
    /// Clamp the predicted x_0.
    pub clip_sample: Option<bool>,
    /// `epsilon`, `sample`, `v_prediction`.
    pub prediction_type: Option<PredictionName>,
    /// Dynamic thresholding.
    pub thresholding: Option<bool>,
    /// Its percentile.
    pub dynamic_thresholding_ratio: Option<f64>,
    /// The clamp's range (a positive number).
    pub clip_sample_range: Option<f64>,
    /// Dynamic thresholding's maximum.
    pub sample_max_value: Option<f64>,
    /// `leading`, `trailing`, `linspace`.
    pub timestep_spacing: Option<TimestepSpacing>,
    /// Added to leading timesteps.
    pub steps_offset: Option<usize>,
    /// Rescale to zero terminal SNR.
    pub rescale_betas_zero_snr: Option<bool>,
    /// DDIM's final alpha_bar is 1.
    pub set_alpha_to_one: Option<bool>,
    /// The fast solvers' order (at least 1).
    pub solver_order: Option<usize>,
    /// `dpmsolver`, `dpmsolver++`, `sde-dpmsolver`, `sde-dpmsolver++`, `deis`.
    pub algorithm_type: Option<String>,
    /// `midpoint`, `heun`, `bh1`, `bh2`, `logrho`.
    pub solver_type: Option<String>,
    /// Lower-order steps at the end.
    pub lower_order_final: Option<bool>,
    /// An Euler final step.
    pub euler_at_final: Option<bool>,
    /// Karras sigmas.
    pub use_karras_sigmas: Option<bool>,
    /// Exponential sigmas.
    pub use_exponential_sigmas: Option<bool>,
    /// Beta sigmas.
    pub use_beta_sigmas: Option<bool>,
    /// Uniform in lambda.
    pub use_lu_lambdas: Option<bool>,
    /// Flow matching sigmas (the samplers reject them).
    pub use_flow_sigmas: Option<bool>,
    /// `zero`, `sigma_min`.
    pub final_sigmas_type: Option<String>,
    /// A number or `-Infinity` (Python's `float('-inf')`).
    pub lambda_min_clipped: Option<Number>,
    /// UniPC's data prediction.
    pub predict_x0: Option<bool>,
    /// UniPC's steps without corrector.
    pub disable_corrector: Option<Vec<usize>>,
    /// UniPC's predictor scheduler (any value: set, which the samplers reject).
    pub solver_p: Option<Value>,
    /// Lower end of the karras / exponential / beta range.
    pub sigma_min: Option<Number>,
    /// Upper end.
    pub sigma_max: Option<Number>,
    /// `linear`, `log_linear`.
    pub interpolation_type: Option<String>,
    /// `discrete`, `continuous`.
    pub timestep_type: Option<String>,
    /// Flow matching (the samplers reject it).
    pub use_dynamic_shifting: Option<bool>,
}

/// diffusers' `prediction_type` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum PredictionName {
    /// eps.
    #[serde(rename = "epsilon")]
    Epsilon,
    /// x_0.
    #[serde(rename = "sample")]
    Sample,
    /// v.
    #[serde(rename = "v_prediction")]
    VPrediction,
}

/// A JSON number, or the string `"-Infinity"` / `"-inf"` (how Python's json writes
/// `float('-inf')`, read as a string by [`read`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Number(pub f64);

impl<'de> Deserialize<'de> for Number {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // a Value first, so the error can say what was found
        match Value::deserialize(d)? {
            Value::Number(n) => Ok(Number(n.as_f64().unwrap_or(f64::NAN))),
            Value::String(s) if s == "-Infinity" || s == "-inf" => Ok(Number(f64::NEG_INFINITY)),
            other => Err(serde::de::Error::custom(format!(
                "expected a number, found {}",
                found_value(&other)
            ))),
        }
    }
}

/// Reads `scheduler_config.json` text: Python's bare `-Infinity` token (DPM-Solver's default
/// `lambda_min_clipped`) is read as the string `"-Infinity"`, then [`parse`].
pub fn read(text: &str) -> Result<Parsed<SchedulerConfig>, FieldError> {
    let text = text.replace("-Infinity", "\"-Infinity\"");
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| <FieldError as serde::de::Error>::custom(format!("invalid JSON: {e}")))?;
    parse(&v)
}

/// Parses a scheduler config object: missing keys take the class's defaults; the result is
/// checked (`num_train_timesteps` in range, `clip_sample_range` positive, names in diffusers'
/// lists).
pub fn parse(v: &Value) -> Result<Parsed<SchedulerConfig>, FieldError> {
    let Parsed { value: f, ignored } = super::from_value::<SchedulerFile>(v)?;
    let class = match f.class_name.as_deref() {
        None => SchedulerClass::Ddpm,
        Some(name) => SchedulerClass::from_name(name).ok_or_else(|| {
            FieldError::at(
                "_class_name",
                format!(
                    "expected DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler, UniPCMultistepScheduler, DEISMultistepScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler or HeunDiscreteScheduler, found \"{}\"",
                    super::short(name)
                ),
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
    let solver = solver_fields(&f)?;
    let cfg = SchedulerConfig {
        class,
        num_train_timesteps: f.num_train_timesteps.unwrap_or(d.num_train_timesteps),
        beta_start: f.beta_start.unwrap_or(d.beta_start),
        beta_end: f.beta_end.unwrap_or(d.beta_end),
        beta_schedule: f.beta_schedule.unwrap_or(d.beta_schedule),
        trained_betas: f.trained_betas,
        prediction_type: match f.prediction_type {
            None => d.prediction_type,
            Some(PredictionName::Epsilon) => Prediction::Eps,
            Some(PredictionName::Sample) => Prediction::X0,
            Some(PredictionName::VPrediction) => Prediction::V,
        },
        variance_type: f.variance_type.unwrap_or(d.variance_type),
        clip_sample: f.clip_sample.unwrap_or(d.clip_sample),
        clip_sample_range: f.clip_sample_range.unwrap_or(d.clip_sample_range),
        thresholding: f.thresholding.unwrap_or(d.thresholding),
        dynamic_thresholding_ratio: f
            .dynamic_thresholding_ratio
            .unwrap_or(d.dynamic_thresholding_ratio),
        sample_max_value: f.sample_max_value.unwrap_or(d.sample_max_value),
        timestep_spacing: f.timestep_spacing.unwrap_or(d.timestep_spacing),
        steps_offset: f.steps_offset.unwrap_or(d.steps_offset),
        set_alpha_to_one: f.set_alpha_to_one.unwrap_or(d.set_alpha_to_one),
        rescale_betas_zero_snr: f.rescale_betas_zero_snr.unwrap_or(d.rescale_betas_zero_snr),
        solver,
    };
    if !(2..=crate::schedule::MAX_TIMESTEPS).contains(&cfg.num_train_timesteps) {
        return Err(FieldError::at(
            "num_train_timesteps",
            format!(
                "expected 2..={}, found {}",
                crate::schedule::MAX_TIMESTEPS,
                cfg.num_train_timesteps
            ),
        ));
    }
    if !(cfg.clip_sample_range.is_finite() && cfg.clip_sample_range > 0.0) {
        return Err(FieldError::at(
            "clip_sample_range",
            format!("expected a positive number, found {}", cfg.clip_sample_range),
        ));
    }
    Ok(Parsed { value: cfg, ignored })
}

/// `s` must be one of diffusers' names `allowed` for the field `key`.
fn one_of(key: &str, s: Option<String>, allowed: &[&str]) -> Result<Option<String>, FieldError> {
    match s {
        Some(s) if !allowed.contains(&s.as_str()) => Err(FieldError::at(
            key,
            format!(
                "expected one of {}, found \"{}\"",
                allowed.join(", "),
                super::short(&s)
            ),
        )),
        s => Ok(s),
    }
}

/// The fast solvers' keys (see [`SolverFields`]); strings are checked against diffusers' names.
fn solver_fields(f: &SchedulerFile) -> Result<SolverFields, FieldError> {
    if f.solver_order == Some(0) {
        return Err(FieldError::at(
            "solver_order",
            "expected a positive integer, found 0",
        ));
    }
    Ok(SolverFields {
        solver_order: f.solver_order,
        algorithm_type: one_of(
            "algorithm_type",
            f.algorithm_type.clone(),
            &[
                "dpmsolver",
                "dpmsolver++",
                "sde-dpmsolver",
                "sde-dpmsolver++",
                "deis",
            ],
        )?,
        solver_type: one_of(
            "solver_type",
            f.solver_type.clone(),
            &["midpoint", "heun", "bh1", "bh2", "logrho"],
        )?,
        lower_order_final: f.lower_order_final,
        euler_at_final: f.euler_at_final,
        use_karras_sigmas: f.use_karras_sigmas.unwrap_or(false),
        use_exponential_sigmas: f.use_exponential_sigmas.unwrap_or(false),
        use_beta_sigmas: f.use_beta_sigmas.unwrap_or(false),
        use_lu_lambdas: f.use_lu_lambdas.unwrap_or(false),
        use_flow_sigmas: f.use_flow_sigmas.unwrap_or(false),
        final_sigmas_type: one_of(
            "final_sigmas_type",
            f.final_sigmas_type.clone(),
            &["zero", "sigma_min"],
        )?,
        lambda_min_clipped: f.lambda_min_clipped.map(|n| n.0),
        predict_x0: f.predict_x0,
        disable_corrector: f.disable_corrector.clone().unwrap_or_default(),
        solver_p: f.solver_p.is_some(),
        sigma_min: f.sigma_min.map(|n| n.0),
        sigma_max: f.sigma_max.map(|n| n.0),
        interpolation_type: one_of(
            "interpolation_type",
            f.interpolation_type.clone(),
            &["linear", "log_linear"],
        )?,
        timestep_type: one_of(
            "timestep_type",
            f.timestep_type.clone(),
            &["discrete", "continuous"],
        )?,
        use_dynamic_shifting: f.use_dynamic_shifting.unwrap_or(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        read(text).unwrap_err().to_string()
    }

    #[test]
    fn wrong_types_name_the_field() {
        assert_eq!(
            err(r#"{"clip_sample": "yes"}"#),
            "field `clip_sample`: expected a boolean, found \"yes\""
        );
        assert_eq!(
            err(r#"{"num_train_timesteps": 2.5}"#),
            "field `num_train_timesteps`: expected a non-negative integer, found 2.5"
        );
        assert_eq!(
            err(r#"{"trained_betas": [0.1, "x"]}"#),
            "field `trained_betas[1]`: expected a number, found \"x\""
        );
        assert_eq!(
            err(r#"{"lambda_min_clipped": "inf"}"#),
            "field `lambda_min_clipped`: expected a number, found \"inf\""
        );
        assert!(err(r#"{"beta_schedule": "laplace"}"#)
            .starts_with("field `beta_schedule`: expected one of linear, scaled_linear"));
        assert_eq!(
            err(r#"{"num_train_timesteps": 1}"#),
            format!(
                "field `num_train_timesteps`: expected 2..={}, found 1",
                crate::schedule::MAX_TIMESTEPS
            )
        );
        assert!(err(r#"{"algorithm_type": "dpm"}"#).starts_with("field `algorithm_type`: expected one of"));
        assert!(err(r#"{"solver_order": 0}"#).starts_with("field `solver_order`"));
        assert!(err(r#"{"clip_sample_range": 0}"#).starts_with("field `clip_sample_range`"));
        assert!(err(r#"{"_class_name": 3}"#).starts_with("field `_class_name`: expected a string, found 3"));
    }

    #[test]
    fn unknown_fields_are_accepted_and_listed() {
        let p = read(r#"{"_class_name": "PNDMScheduler"}"#);
        assert!(p.unwrap_err().to_string().contains("PNDMScheduler"));
        let p = read(
            r#"{"_class_name": "DDIMScheduler", "_diffusers_version": "0.30", "skip_prk_steps": true, "clip_sample": false, "flow_shift": 1.0}"#,
        )
        .unwrap();
        assert_eq!(p.value.class, SchedulerClass::Ddim);
        assert!(!p.value.clip_sample);
        assert_eq!(
            p.ignored,
            vec!["flow_shift".to_string(), "skip_prk_steps".to_string()]
        );
    }

    #[test]
    fn committed_fixture_round_trips() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(
            root.join("tests/fixtures/diffusers/attn_multihead_1ch16/scheduler/scheduler_config.json"),
        )
        .unwrap();
        let p = read(&text).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        // every field of the fixture was read into the config, with its value
        assert!(p.ignored.is_empty(), "{:?}", p.ignored);
        let c = &p.value;
        assert_eq!(
            c.num_train_timesteps as u64,
            v["num_train_timesteps"].as_u64().unwrap()
        );
        if let Some(b) = v["beta_start"].as_f64() {
            assert_eq!(c.beta_start, b);
        }
        if let Some(b) = v["beta_end"].as_f64() {
            assert_eq!(c.beta_end, b);
        }
        // the schedule the config describes builds
        assert_eq!(c.schedule().unwrap().timesteps(), c.num_train_timesteps);
        // parsing the parsed-from object again gives the same config
        assert_eq!(parse(&v).unwrap().value, *c);
    }
}
