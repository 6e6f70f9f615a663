//! The forward-process posterior `q(x_{t-1} | x_t, x_0)` and the reverse step built from it.
//!
//! ```text
//! q(x_{t-1} | x_t, x_0) = N(x_{t-1}; mu~_t(x_t, x_0), beta~_t I)                     (Ho et al. 2020, eq. 6)
//! mu~_t(x_t, x_0) = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) * x_0
//!                 + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * x_t     (eq. 7)
//!                 = posterior_mean_coef1_t * x_0 + posterior_mean_coef2_t * x_t
//! beta~_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t                      (eq. 7)
//! ```
//!
//! Substituting `x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)` gives the eps form
//!
//! ```text
//! mu~_t = 1 / sqrt(alpha_t) * (x_t - beta_t / sqrt(1 - alpha_bar_t) * eps)           (eq. 11)
//! ```
//!
//! The reverse step `p(x_{t-1} | x_t) = N(mu~_t(x_t, x0_pred), sigma_t^2 I)` takes its mean
//! from a predicted `x_0` ([`reverse_mean_variance`]) and its variance from a
//! [`ReverseVariance`] (Ho et al. 2020, section 3.2). Indices follow [`crate::schedule`]:
//! `t_index[b] = i` is step `t = i + 1` for row `b`.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::denoiser::{eps_from_x0, per_sample, x0_from_eps};
use crate::error::{Error, Result};
use crate::forward::{check_same_shape, gather, noise_levels, validate_t_index};
use crate::schedule::Schedule;

/// An optional clip of a predicted `x_0` before it is used (off unless asked).
///
/// `DataRange` clips to `[-1, 1]`, the range of image data: the released samplers of Ho et al.
/// 2020 (`diffusion_tf`, `clip_denoised=True`) and of Nichol & Dhariwal 2021 (improved-diffusion,
/// `clip_denoised=True` for sampling and bits/dim evaluation) do this. It changes the model, so
/// a bound computed with it is the bound of the clipped model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClipX0 {
    /// Use the prediction as it is.
    #[default]
    Off,
    /// Clamp every element to `[-1, 1]`.
    DataRange,
}

impl ClipX0 {
    /// Applies the clip.
    pub fn apply(&self, x0: &Tensor) -> Result<Tensor> {
        Ok(match self {
            ClipX0::Off => x0.clone(),
            ClipX0::DataRange => x0.clamp(-1.0, 1.0)?,
        })
    }
}

/// The variance `sigma_t^2` of the reverse step `p(x_{t-1} | x_t)` when it is fixed rather than
/// learned (Ho et al. 2020, section 3.2: "sigma_t^2 = beta_t and sigma_t^2 = beta~_t had similar
/// results"; the first is optimal for `x_0 ~ N(0, I)`, the second for `x_0` a point mass).
///
/// At `t = 1` the reverse step is the decoder `p(x_0 | x_1)` and `beta~_1 = 0`; both choices
/// then use `beta~_2`, as improved-diffusion does (`posterior_log_variance_clipped` for "fixed
/// small", `np.append(posterior_variance[1], betas[1:])` for "fixed large", there commented "to
/// get a better decoder log likelihood"). Ancestral samplers add no noise at `t = 1`
/// (Ho et al. 2020, Algorithm 2), so the choice there only matters for the decoder term `L_0`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReverseVariance {
    /// "Fixed small": `sigma_t^2 = beta~_t` (the posterior variance), `beta~_2` at `t = 1`.
    #[default]
    Small,
    /// "Fixed large": `sigma_t^2 = beta_t`, `beta~_2` at `t = 1`.
    Large,
}

impl ReverseVariance {
    /// The accepted names.
    pub const NAMES: [&'static str; 2] = ["small", "large"];

    /// Parses `small`/`fixed_small`/`fixed-small` and `large`/`fixed_large`/`fixed-large`.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "small" | "fixed_small" | "fixed-small" | "fixedsmall" => Ok(ReverseVariance::Small),
            "large" | "fixed_large" | "fixed-large" | "fixedlarge" => Ok(ReverseVariance::Large),
            other => Err(Error::param(
                "variance",
                format!(
                    "unknown reverse-process variance '{other}', expected one of: {}",
                    Self::NAMES.join(", ")
                ),
            )),
        }
    }

    /// The canonical name: `small` or `large`.
    pub fn name(&self) -> &'static str {
        match self {
            ReverseVariance::Small => "small",
            ReverseVariance::Large => "large",
        }
    }

    /// `ln sigma_t^2` for index `t_index` (step `t = t_index + 1`).
    pub fn log_variance(&self, schedule: &Schedule, t_index: usize) -> Result<f64> {
        validate_t_index(schedule, &[t_index], 1)?;
        Ok(match self {
            ReverseVariance::Small => schedule.posterior_log_variance_clipped[t_index],
            ReverseVariance::Large if t_index == 0 => schedule.posterior_variance[1].ln(),
            ReverseVariance::Large => schedule.beta[t_index].ln(),
        })
    }

    /// `sigma_t^2 = exp(ln sigma_t^2)` for index `t_index` (so `beta~_2` at `t = 1`).
    pub fn variance(&self, schedule: &Schedule, t_index: usize) -> Result<f64> {
        Ok(self.log_variance(schedule, t_index)?.exp())
    }

    /// `ln sigma_t^2` for each row's index.
    pub fn log_variances(&self, schedule: &Schedule, t_index: &[usize]) -> Result<Vec<f64>> {
        t_index.iter().map(|&i| self.log_variance(schedule, i)).collect()
    }
}

/// Mean, variance and clipped log-variance of `q(x_{t-1} | x_t, x_0)` (Ho et al. 2020, eq. 6-7):
///
/// ```text
/// mean = posterior_mean_coef1_t * x_0 + posterior_mean_coef2_t * x_t
/// variance = beta~_t,   log_variance = ln beta~_t  (ln beta~_2 at t = 1, where beta~_1 = 0)
/// ```
///
/// The mean is shaped like `x0`; variance and log-variance are one number per row. At `t = 1`
/// the mean is `x_0` itself (`coef1 = 1`, `coef2 = 0`) and the variance is 0.
pub fn posterior_mean_variance(
    schedule: &Schedule,
    x0: &Tensor,
    x_t: &Tensor,
    t_index: &[usize],
) -> Result<(Tensor, Vec<f64>, Vec<f64>)> {
    validate_t_index(schedule, t_index, x_t.dim(0)?)?;
    check_same_shape("x0", x0, x_t)?;
    let c1 = per_sample(&gather(&schedule.posterior_mean_coef1, t_index), x_t)?;
    let c2 = per_sample(&gather(&schedule.posterior_mean_coef2, t_index), x_t)?;
    let mean = (x0.broadcast_mul(&c1)? + x_t.broadcast_mul(&c2)?)?;
    Ok((
        mean,
        gather(&schedule.posterior_variance, t_index),
        gather(&schedule.posterior_log_variance_clipped, t_index),
    ))
}

/// The posterior mean in terms of the noise (Ho et al. 2020, eq. 11):
///
/// ```text
/// mu~_t = 1 / sqrt(alpha_t) * (x_t - beta_t / sqrt(1 - alpha_bar_t) * eps)
/// ```
///
/// Equal to [`posterior_mean_variance`]'s mean when `x_t = sqrt(alpha_bar_t) x_0 +
/// sqrt(1 - alpha_bar_t) eps`.
pub fn posterior_mean_from_eps(
    schedule: &Schedule,
    x_t: &Tensor,
    eps: &Tensor,
    t_index: &[usize],
) -> Result<Tensor> {
    validate_t_index(schedule, t_index, x_t.dim(0)?)?;
    check_same_shape("eps", eps, x_t)?;
    let inv_sqrt_alpha: Vec<f64> = gather(&schedule.alpha, t_index)
        .iter()
        .map(|a| 1.0 / a.sqrt())
        .collect();
    let eps_coef: Vec<f64> = t_index
        .iter()
        .zip(&inv_sqrt_alpha)
        .map(|(&i, r)| r * schedule.beta[i] / schedule.sqrt_one_minus_alpha_bar[i])
        .collect();
    let a = per_sample(&inv_sqrt_alpha, x_t)?;
    let b = per_sample(&eps_coef, x_t)?;
    Ok((x_t.broadcast_mul(&a)? - eps.broadcast_mul(&b)?)?)
}

/// The `x_0` implied by a noise prediction, optionally clipped (Ho et al. 2020, eq. 4 inverted):
///
/// ```text
/// x0_pred = (x_t - sqrt(1 - alpha_bar_t) * eps) / sqrt(alpha_bar_t)
/// ```
///
/// Computed by [`crate::denoiser::x0_from_eps`] at the schedule's noise levels.
pub fn predict_x0_from_eps(
    schedule: &Schedule,
    x_t: &Tensor,
    eps: &Tensor,
    t_index: &[usize],
    clip: ClipX0,
) -> Result<Tensor> {
    validate_t_index(schedule, t_index, x_t.dim(0)?)?;
    check_same_shape("eps", eps, x_t)?;
    clip.apply(&x0_from_eps(x_t, eps, &noise_levels(schedule, t_index)?)?)
}

/// The noise implied by a prediction of `x_0`:
/// `eps = (x_t - sqrt(alpha_bar_t) * x_0) / sqrt(1 - alpha_bar_t)`
/// (by [`crate::denoiser::eps_from_x0`]).
pub fn predict_eps_from_x0(
    schedule: &Schedule,
    x_t: &Tensor,
    x0: &Tensor,
    t_index: &[usize],
) -> Result<Tensor> {
    validate_t_index(schedule, t_index, x_t.dim(0)?)?;
    check_same_shape("x0", x0, x_t)?;
    eps_from_x0(x_t, x0, &noise_levels(schedule, t_index)?)
}

/// The reverse step `p(x_{t-1} | x_t) = N(mean, exp(log_variance) I)` built from a predicted
/// `x_0` (Ho et al. 2020, section 3.2; improved-diffusion's `p_mean_variance`):
///
/// ```text
/// mean = mu~_t(x_t, clip(x0_pred)),   log_variance = ln sigma_t^2 from `variance`
/// ```
///
/// Returns the mean (shaped like `x_t`) and one log-variance per row.
pub fn reverse_mean_variance(
    schedule: &Schedule,
    x0_pred: &Tensor,
    x_t: &Tensor,
    t_index: &[usize],
    variance: ReverseVariance,
    clip: ClipX0,
) -> Result<(Tensor, Vec<f64>)> {
    let x0 = clip.apply(x0_pred)?;
    let (mean, _, _) = posterior_mean_variance(schedule, &x0, x_t, t_index)?;
    Ok((mean, variance.log_variances(schedule, t_index)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn reverse_variance_choices() {
        let s = Schedule::named("linear", 1000).unwrap();
        let small = ReverseVariance::Small;
        let large = ReverseVariance::Large;
        // t = 1: both use beta~_2 = beta_2 (1 - alpha_bar_1) / (1 - alpha_bar_2).
        let bt2 = s.beta[1] * s.beta[0] / (1.0 - s.alpha_bar[1]);
        for v in [small, large] {
            assert!((v.variance(&s, 0).unwrap() / bt2 - 1.0).abs() < 1e-12);
        }
        // t = 500: beta_t for large, beta~_t for small.
        assert!((large.log_variance(&s, 499).unwrap() - s.beta[499].ln()).abs() < 1e-15);
        assert!((small.log_variance(&s, 499).unwrap() - s.posterior_variance[499].ln()).abs() < 1e-15);
        assert!(large.log_variance(&s, 1000).is_err());
        assert_eq!(ReverseVariance::from_name("fixed_large").unwrap(), large);
        let e = ReverseVariance::from_name("learned").unwrap_err().to_string();
        assert!(e.contains("learned") && e.contains("small, large"), "{e}");
    }

    #[test]
    fn clip_is_off_unless_asked() {
        let x = Tensor::new(&[[-3.0f64, 0.5, 2.0]], &Device::Cpu).unwrap();
        assert_eq!(
            ClipX0::default().apply(&x).unwrap().to_vec2::<f64>().unwrap(),
            [[-3.0, 0.5, 2.0]]
        );
        assert_eq!(
            ClipX0::DataRange.apply(&x).unwrap().to_vec2::<f64>().unwrap(),
            [[-1.0, 0.5, 1.0]]
        );
    }
}
