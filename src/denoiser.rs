//! The denoiser interface every sampler calls, and the conversions between parameterisations.
//!
//! Every forward process in `diffuse` has Gaussian marginals of the form
//!
//! ```text
//! x_t = alpha * x_0 + sigma * eps,   eps ~ N(0, I)
//! ```
//!
//! with a [`NoiseLevel`] `(alpha, sigma)` per time: `alpha = sqrt(alpha_bar_t)`,
//! `sigma = sqrt(1 - alpha_bar_t)` for the discrete DDPM process (Ho et al. 2020, eq. 4);
//! `alpha = 1`, `sigma = sigma(t)` for variance-exploding processes. A [`Denoiser`] takes a
//! batch `x_t` and one noise level per sample and returns its output in one declared
//! [`Prediction`] (eps, x_0 or v). The conversions below turn any of them into the others and
//! into the score:
//!
//! ```text
//! x_0   = (x_t - sigma * eps) / alpha
//! eps   = (x_t - alpha * x_0) / sigma
//! v     = alpha * eps - sigma * x_0                    (Salimans & Ho 2022)
//! x_0   = (alpha * x_t - sigma * v) / (alpha^2 + sigma^2)
//! eps   = (sigma * x_t + alpha * v) / (alpha^2 + sigma^2)
//! score = grad log p_t(x_t) = -eps / sigma            (seed 003 Q12; Song et al. 2021)
//! ```
//!
//! Samplers know only this trait; networks reach them through adapters, and the exact
//! Gaussian-mixture oracle implements it directly.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What a denoiser's output means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    /// The noise `eps` that was added (Ho et al. 2020).
    Eps,
    /// The clean data `x_0`.
    X0,
    /// The velocity `v = alpha * eps - sigma * x_0` (Salimans & Ho 2022).
    V,
}

impl Prediction {
    /// Parses `eps`/`epsilon`, `x0`/`sample`, `v`/`v_prediction` (diffusers' names included).
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "eps" | "epsilon" => Ok(Prediction::Eps),
            "x0" | "x_0" | "sample" => Ok(Prediction::X0),
            "v" | "v_prediction" => Ok(Prediction::V),
            other => Err(Error::param(
                "prediction",
                format!("unknown parameterisation '{other}', expected eps, x0 or v"),
            )),
        }
    }

    /// The canonical name: `eps`, `x0` or `v`.
    pub fn name(&self) -> &'static str {
        match self {
            Prediction::Eps => "eps",
            Prediction::X0 => "x0",
            Prediction::V => "v",
        }
    }
}

/// The marginal `q(x_t | x_0) = N(alpha * x_0, sigma^2 I)` at one time.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct NoiseLevel {
    /// Signal scale (sqrt(alpha_bar_t) for the VP process, 1 for VE).
    pub alpha: f64,
    /// Noise standard deviation (sqrt(1 - alpha_bar_t) for VP, sigma(t) for VE).
    pub sigma: f64,
}

impl NoiseLevel {
    /// A noise level; both numbers must be finite and non-negative, not both zero.
    pub fn new(alpha: f64, sigma: f64) -> Self {
        NoiseLevel { alpha, sigma }
    }

    /// The discrete VP level of a schedule alpha_bar: `(sqrt(alpha_bar), sqrt(1 - alpha_bar))`.
    pub fn from_alpha_bar(alpha_bar: f64) -> Self {
        NoiseLevel {
            alpha: alpha_bar.sqrt(),
            sigma: (1.0 - alpha_bar).sqrt(),
        }
    }

    /// SNR = alpha^2 / sigma^2 (infinite at sigma = 0).
    pub fn snr(&self) -> f64 {
        (self.alpha * self.alpha) / (self.sigma * self.sigma)
    }

    /// ln SNR = 2 ln(alpha / sigma).
    pub fn log_snr(&self) -> f64 {
        2.0 * (self.alpha.ln() - self.sigma.ln())
    }

    /// The equivalent variance-preserving alpha_bar: `alpha^2 / (alpha^2 + sigma^2)`. A VE or
    /// seed-000 state `x` at this level equals `sqrt(alpha^2 + sigma^2)` times a VP state.
    pub fn vp_alpha_bar(&self) -> f64 {
        let a2 = self.alpha * self.alpha;
        a2 / (a2 + self.sigma * self.sigma)
    }

    /// The EDM noise level `sigma / alpha` (the std of the noise in units of the data).
    pub fn edm_sigma(&self) -> f64 {
        self.sigma / self.alpha
    }
}

/// A tensor of shape `[B, 1, 1, ...]` (matching `like`'s rank and dtype) holding one value per sample.
pub fn per_sample(values: &[f64], like: &Tensor) -> Result<Tensor> {
    let b = like.dim(0)?;
    if values.len() != b {
        return Err(Error::param(
            "noise levels",
            format!("got {} levels for a batch of {b}", values.len()),
        ));
    }
    let mut shape = vec![b];
    shape.resize(like.rank(), 1);
    let t = Tensor::from_vec(values.to_vec(), shape, like.device())?;
    Ok(t.to_dtype(like.dtype())?)
}

fn map_levels(levels: &[NoiseLevel], f: impl Fn(&NoiseLevel) -> f64) -> Vec<f64> {
    levels.iter().map(f).collect()
}

/// `x_0 = (x_t - sigma * eps) / alpha`.
pub fn x0_from_eps(x_t: &Tensor, eps: &Tensor, levels: &[NoiseLevel]) -> Result<Tensor> {
    let inv_a = per_sample(&map_levels(levels, |l| 1.0 / l.alpha), x_t)?;
    let s_over_a = per_sample(&map_levels(levels, |l| l.sigma / l.alpha), x_t)?;
    Ok((x_t.broadcast_mul(&inv_a)? - eps.broadcast_mul(&s_over_a)?)?)
}

/// `eps = (x_t - alpha * x_0) / sigma`.
pub fn eps_from_x0(x_t: &Tensor, x0: &Tensor, levels: &[NoiseLevel]) -> Result<Tensor> {
    let inv_s = per_sample(&map_levels(levels, |l| 1.0 / l.sigma), x_t)?;
    let a_over_s = per_sample(&map_levels(levels, |l| l.alpha / l.sigma), x_t)?;
    Ok((x_t.broadcast_mul(&inv_s)? - x0.broadcast_mul(&a_over_s)?)?)
}

/// `v = alpha * eps - sigma * x_0`.
pub fn v_from_eps_x0(eps: &Tensor, x0: &Tensor, levels: &[NoiseLevel]) -> Result<Tensor> {
    let a = per_sample(&map_levels(levels, |l| l.alpha), eps)?;
    let s = per_sample(&map_levels(levels, |l| l.sigma), eps)?;
    Ok((eps.broadcast_mul(&a)? - x0.broadcast_mul(&s)?)?)
}

/// `x_0 = (alpha * x_t - sigma * v) / (alpha^2 + sigma^2)`.
pub fn x0_from_v(x_t: &Tensor, v: &Tensor, levels: &[NoiseLevel]) -> Result<Tensor> {
    let r2 = |l: &NoiseLevel| l.alpha * l.alpha + l.sigma * l.sigma;
    let a = per_sample(&map_levels(levels, |l| l.alpha / r2(l)), x_t)?;
    let s = per_sample(&map_levels(levels, |l| l.sigma / r2(l)), x_t)?;
    Ok((x_t.broadcast_mul(&a)? - v.broadcast_mul(&s)?)?)
}

/// `eps = (sigma * x_t + alpha * v) / (alpha^2 + sigma^2)`.
pub fn eps_from_v(x_t: &Tensor, v: &Tensor, levels: &[NoiseLevel]) -> Result<Tensor> {
    let r2 = |l: &NoiseLevel| l.alpha * l.alpha + l.sigma * l.sigma;
    let s = per_sample(&map_levels(levels, |l| l.sigma / r2(l)), x_t)?;
    let a = per_sample(&map_levels(levels, |l| l.alpha / r2(l)), x_t)?;
    Ok((x_t.broadcast_mul(&s)? + v.broadcast_mul(&a)?)?)
}

/// `score = -eps / sigma` (the score of the marginal p_t at x_t).
pub fn score_from_eps(eps: &Tensor, levels: &[NoiseLevel]) -> Result<Tensor> {
    let c = per_sample(&map_levels(levels, |l| -1.0 / l.sigma), eps)?;
    Ok(eps.broadcast_mul(&c)?)
}

/// `eps = -sigma * score`.
pub fn eps_from_score(score: &Tensor, levels: &[NoiseLevel]) -> Result<Tensor> {
    let c = per_sample(&map_levels(levels, |l| -l.sigma), score)?;
    Ok(score.broadcast_mul(&c)?)
}

/// A model of the reverse process: given `x_t` (shape `[B, ...]`) and one noise level per
/// sample, returns its output (same shape as `x_t`) in the parameterisation [`Denoiser::prediction`].
pub trait Denoiser {
    /// The parameterisation of [`Denoiser::output`].
    fn prediction(&self) -> Prediction;

    /// The raw output for a batch.
    fn output(&self, x_t: &Tensor, levels: &[NoiseLevel]) -> Result<Tensor>;

    /// The predicted clean data `x_0`.
    fn predict_x0(&self, x_t: &Tensor, levels: &[NoiseLevel]) -> Result<Tensor> {
        let out = self.output(x_t, levels)?;
        match self.prediction() {
            Prediction::X0 => Ok(out),
            Prediction::Eps => x0_from_eps(x_t, &out, levels),
            Prediction::V => x0_from_v(x_t, &out, levels),
        }
    }

    /// The predicted noise `eps`.
    fn predict_eps(&self, x_t: &Tensor, levels: &[NoiseLevel]) -> Result<Tensor> {
        let out = self.output(x_t, levels)?;
        match self.prediction() {
            Prediction::Eps => Ok(out),
            Prediction::X0 => eps_from_x0(x_t, &out, levels),
            Prediction::V => eps_from_v(x_t, &out, levels),
        }
    }

    /// Both `x_0` and `eps` from one evaluation.
    fn predict_x0_eps(&self, x_t: &Tensor, levels: &[NoiseLevel]) -> Result<(Tensor, Tensor)> {
        let out = self.output(x_t, levels)?;
        Ok(match self.prediction() {
            Prediction::Eps => (x0_from_eps(x_t, &out, levels)?, out),
            Prediction::X0 => (out.clone(), eps_from_x0(x_t, &out, levels)?),
            Prediction::V => (x0_from_v(x_t, &out, levels)?, eps_from_v(x_t, &out, levels)?),
        })
    }

    /// The score `grad_x log p_t(x_t) = -eps / sigma`.
    fn score(&self, x_t: &Tensor, levels: &[NoiseLevel]) -> Result<Tensor> {
        score_from_eps(&self.predict_eps(x_t, levels)?, levels)
    }
}

/// Returns an error if `t` holds a NaN or an infinity (a sampler or training step diverged).
pub fn check_finite(t: &Tensor, what: &str) -> Result<()> {
    let s = t
        .to_dtype(DType::F64)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?;
    if s.is_finite() {
        Ok(())
    } else {
        Err(Error::Numerical(format!(
            "{what} is not finite (NaN or infinity)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f64], shape: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn conversions_round_trip_vp_and_ve() {
        let x0 = t(&[0.3, -1.2, 0.7, 2.0, -0.1, 0.0], &[2, 3]);
        let eps = t(&[1.1, 0.4, -0.9, -0.3, 0.8, 1.7], &[2, 3]);
        // one VP level (alpha^2 + sigma^2 = 1) and one VE level (alpha = 1, sigma = 3)
        let levels = [NoiseLevel::from_alpha_bar(0.64), NoiseLevel::new(1.0, 3.0)];
        let a = per_sample(&[0.8, 1.0], &x0).unwrap();
        let s = per_sample(&[0.6, 3.0], &x0).unwrap();
        let x_t = (x0.broadcast_mul(&a).unwrap() + eps.broadcast_mul(&s).unwrap()).unwrap();

        assert!(max_abs_diff(&x0_from_eps(&x_t, &eps, &levels).unwrap(), &x0) < 1e-12);
        assert!(max_abs_diff(&eps_from_x0(&x_t, &x0, &levels).unwrap(), &eps) < 1e-12);
        let v = v_from_eps_x0(&eps, &x0, &levels).unwrap();
        // v by hand for the first entry: 0.8 * 1.1 - 0.6 * 0.3 = 0.70
        assert!((v.to_vec2::<f64>().unwrap()[0][0] - 0.70).abs() < 1e-12);
        assert!(max_abs_diff(&x0_from_v(&x_t, &v, &levels).unwrap(), &x0) < 1e-12);
        assert!(max_abs_diff(&eps_from_v(&x_t, &v, &levels).unwrap(), &eps) < 1e-12);
        let score = score_from_eps(&eps, &levels).unwrap();
        // score = -eps / sigma: -1.1 / 0.6
        assert!((score.to_vec2::<f64>().unwrap()[0][0] + 1.1 / 0.6).abs() < 1e-12);
        assert!(max_abs_diff(&eps_from_score(&score, &levels).unwrap(), &eps) < 1e-12);
    }

    #[test]
    fn noise_level_quantities() {
        let l = NoiseLevel::from_alpha_bar(0.2);
        assert!((l.snr() - 0.25).abs() < 1e-12); // 0.2 / 0.8
        assert!((l.log_snr() - 0.25f64.ln()).abs() < 1e-12);
        let ve = NoiseLevel::new(1.0, 2.0);
        assert!((ve.vp_alpha_bar() - 0.2).abs() < 1e-12); // 1 / (1 + 4)
        assert!((ve.edm_sigma() - 2.0).abs() < 1e-12);
        assert!(Prediction::from_name("v_prediction").unwrap() == Prediction::V);
        assert!(Prediction::from_name("noise").is_err());
    }

    #[test]
    fn per_sample_checks_batch_size() {
        let x = t(&[0.0; 6], &[3, 2]);
        assert!(per_sample(&[1.0, 2.0], &x).is_err());
        let p = per_sample(&[1.0, 2.0, 3.0], &x).unwrap();
        assert_eq!(p.dims(), &[3, 1]);
    }
}
