//! Karras et al. (2022), "Elucidating the Design Space of Diffusion-Based Generative Models",
//! Algorithm 2: Heun's method on the probability-flow ODE in the EDM frame
//! `x~ = x / alpha`, noise `sigma~ = sigma / alpha`, with optional stochastic churn.
//!
//! ```text
//! sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,  i < N;  sigma_N = 0   (eq. 5, rho = 7)
//! gamma   = min(S_churn / N, sqrt(2) - 1) if sigma_i in [S_tmin, S_tmax] else 0
//! sigma^  = sigma_i (1 + gamma);   x^ = x + sqrt(sigma^^2 - sigma_i^2) S_noise z
//! d       = (x^ - D(x^; sigma^)) / sigma^;   x' = x^ + (sigma_{i+1} - sigma^) d
//! if sigma_{i+1} > 0:  d' = (x' - D(x'; sigma_{i+1})) / sigma_{i+1};  x' = x^ + (sigma_{i+1} - sigma^) (d + d') / 2
//! ```
//!
//! The last step, to sigma = 0, is a plain Euler step, which lands on the denoised value
//! `D(x^; sigma^)` (field notes, bug 8); the grid has no repeated sigma. NFE = 2N - 1.
//! sigma_max and sigma_min are the process's EDM noise at t_max and t_eps (VE: 50 and 0.01;
//! sigma_min at least [`EDM_SIGMA_MIN`]); the
//! denoiser is called at the process's own level with that EDM noise
//! ([`Sde::level_for_edm_sigma`]) on `alpha * x~`, so any continuous process works.

use super::registry::{continuous, Opt, SamplerSpec, CONTINUOUS};
use candle_core::Tensor;

use crate::denoiser::{Denoiser, NoiseLevel};
use crate::error::{Error, Result};
use crate::process::Sde;
use crate::rng::NoiseStreams;

use super::{lin, noise_like, same_level, Observer, SampleOutput, Sampler, StepEvent};

/// Karras et al.'s rho (eq. 5).
pub const KARRAS_RHO: f64 = 7.0;

/// Karras et al.'s sigma_min (0.002): the grid stops at the larger of this and the process's
/// noise at t_eps (sub-VP reaches 1e-4 there, which would spread 18 steps over two more decades).
pub const EDM_SIGMA_MIN: f64 = 0.002;

/// The Karras sigma grid: `steps` values from `sigma_max` to `sigma_min`, then 0.
pub fn karras_sigmas(steps: usize, sigma_min: f64, sigma_max: f64, rho: f64) -> Result<Vec<f64>> {
    if steps == 0 {
        return Err(Error::param("steps", "got 0, expected at least 1"));
    }
    if !(sigma_min > 0.0 && sigma_max > sigma_min && rho > 0.0) {
        return Err(Error::param(
            "sigma range",
            format!("need 0 < sigma_min < sigma_max and rho > 0, got {sigma_min}, {sigma_max}, {rho}"),
        ));
    }
    let (a, b) = (sigma_max.powf(1.0 / rho), sigma_min.powf(1.0 / rho));
    let mut s: Vec<f64> = (0..steps)
        .map(|i| {
            let frac = if steps == 1 {
                0.0
            } else {
                i as f64 / (steps - 1) as f64
            };
            (a + frac * (b - a)).powf(rho)
        })
        .collect();
    s.push(0.0);
    Ok(s)
}

/// EDM stochastic-sampling parameters (Karras et al. 2022, table 5; all zero churn = deterministic).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Churn {
    /// S_churn (0 = deterministic Heun, Alg. 1).
    pub s_churn: f64,
    /// Churn only for sigma >= S_tmin.
    pub s_tmin: f64,
    /// Churn only for sigma <= S_tmax.
    pub s_tmax: f64,
    /// S_noise: multiplies the added noise (1 = exact; Karras et al. use 1.003–1.007 for images).
    pub s_noise: f64,
}

impl Default for Churn {
    fn default() -> Self {
        Churn {
            s_churn: 0.0,
            s_tmin: 0.0,
            s_tmax: f64::INFINITY,
            s_noise: 1.0,
        }
    }
}

/// The EDM Heun sampler.
#[derive(Clone, Debug)]
pub struct EdmHeun {
    /// The process (defines the sigma range, the prior and the levels the denoiser sees).
    pub sde: Sde,
    /// The sigma grid, decreasing, ending at 0.
    pub sigmas: Vec<f64>,
    /// Stochastic churn.
    pub churn: Churn,
}

impl EdmHeun {
    /// EDM Heun with `steps` noise levels (rho = 7) on `sde`.
    pub fn new(sde: Sde, steps: usize, churn: Churn) -> Result<Self> {
        crate::error::check_range("churn", churn.s_churn, (0.0, true), (f64::INFINITY, false))?;
        let sigma_max = sde.level(sde.t_max()).edm_sigma();
        let sigma_min = sde.level(sde.t_eps()).edm_sigma().max(EDM_SIGMA_MIN);
        Ok(EdmHeun {
            sigmas: karras_sigmas(steps, sigma_min, sigma_max, KARRAS_RHO)?,
            sde,
            churn,
        })
    }

    /// D(x~; sigma~) = E[x_0 | x~], calling the denoiser at the process level with that EDM noise.
    fn denoise(&self, den: &dyn Denoiser, x: &Tensor, edm_sigma: f64) -> Result<Tensor> {
        let level = self.sde.level_for_edm_sigma(edm_sigma);
        den.predict_x0(&x.affine(level.alpha, 0.0)?, &same_level(level, x)?)
    }
}

impl Sampler for EdmHeun {
    fn name(&self) -> &'static str {
        "edm-heun"
    }

    fn prior_std(&self) -> f64 {
        self.sde.prior_std()
    }

    fn sample(
        &self,
        den: &dyn Denoiser,
        x_t: Tensor,
        noise: &mut NoiseStreams,
        observer: &mut dyn Observer,
    ) -> Result<SampleOutput> {
        let n = self.sigmas.len() - 1;
        // the prior is drawn in the process frame: x~ = x_T / alpha(t_max)
        let mut x = x_t.affine(1.0 / self.sde.level(self.sde.t_max()).alpha, 0.0)?;
        let edm_level = |s: f64| NoiseLevel::new(1.0, s);
        observer.observe(&StepEvent {
            step: 0,
            t: self.sigmas[0],
            level: edm_level(self.sigmas[0]),
            x: &x,
            x0_pred: None,
        })?;
        let mut nfe = 0;
        for i in 0..n {
            let (s_cur, s_next) = (self.sigmas[i], self.sigmas[i + 1]);
            let c = &self.churn;
            let gamma = if c.s_churn > 0.0 && s_cur >= c.s_tmin && s_cur <= c.s_tmax {
                (c.s_churn / n as f64).min(2f64.sqrt() - 1.0)
            } else {
                0.0
            };
            let s_hat = s_cur * (1.0 + gamma);
            let x_hat = if gamma > 0.0 {
                let z = noise_like(noise, &x)?;
                lin(1.0, &x, (s_hat * s_hat - s_cur * s_cur).sqrt() * c.s_noise, &z)?
            } else {
                x.clone()
            };
            let den_hat = self.denoise(den, &x_hat, s_hat)?;
            nfe += 1;
            // d = (x^ - D) / sigma^
            let d = lin(1.0 / s_hat, &x_hat, -1.0 / s_hat, &den_hat)?;
            let x_next = lin(1.0, &x_hat, s_next - s_hat, &d)?;
            x = if s_next > 0.0 {
                let den_next = self.denoise(den, &x_next, s_next)?;
                nfe += 1;
                let d2 = lin(1.0 / s_next, &x_next, -1.0 / s_next, &den_next)?;
                lin(1.0, &x_hat, 0.5 * (s_next - s_hat), &(d + d2)?)?
            } else {
                x_next
            };
            observer.observe(&StepEvent {
                step: i + 1,
                t: s_next,
                level: edm_level(s_next),
                x: &x,
                x0_pred: Some(&den_hat),
            })?;
        }
        Ok(SampleOutput { x, nfe })
    }
}

/// The registry's declaration of `edm-heun`.
pub const SPEC: SamplerSpec = SamplerSpec {
    name: "edm-heun",
    about: "Karras et al. 2022, Alg. 2 (Heun on the sigma grid with rho = 7, optional churn)",
    processes: CONTINUOUS,
    default_steps: |_| 18,
    adaptive: false,
    default_steps_doc: "18",
    options: &[Opt::Churn],
    stochastic: false,
    build: |process, steps, o| {
        let sde = continuous(process)?;
        let churn = Churn {
            s_churn: o.churn.unwrap_or(0.0),
            ..Default::default()
        };
        Ok(Box::new(EdmHeun::new(sde, steps.unwrap_or(1), churn)?))
    },
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn karras_grid_ends_and_no_duplicates() {
        let s = karras_sigmas(18, 0.002, 80.0, 7.0).unwrap();
        assert_eq!(s.len(), 19);
        assert!((s[0] - 80.0).abs() < 1e-12 && (s[17] - 0.002).abs() < 1e-15 && s[18] == 0.0);
        assert!(
            s.windows(2).all(|w| w[1] < w[0]),
            "strictly decreasing, no repeated sigma"
        );
        // midpoint by hand: ((80^(1/7) + 0.002^(1/7)) / 2)^7 at i = 8.5 is not on the grid;
        // check i = 1: (80^(1/7) + (0.002^(1/7) - 80^(1/7)) / 17)^7
        let (a, b) = (80f64.powf(1.0 / 7.0), 0.002f64.powf(1.0 / 7.0));
        assert!((s[1] - (a + (b - a) / 17.0).powi(7)).abs() < 1e-12);
        assert!(karras_sigmas(0, 0.002, 80.0, 7.0).is_err());
        assert!(karras_sigmas(5, 1.0, 0.5, 7.0).is_err());
    }
}
