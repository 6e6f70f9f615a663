//! Predictor–corrector sampling (Song et al. 2021, section 4.2 and Algorithms 1–5): at each
//! time `t_i` of the grid, `corrector_steps` Langevin steps at `t_i`, then one predictor step
//! to `t_{i+1}`; finally one denoising step `x <- E[x_0 | x_{t_eps}]`.
//!
//! Corrector (Langevin MCMC, Alg. 4/5), `s = score(x, t_i)`, `z ~ N(0, I)`:
//!
//! ```text
//! eps_i = 2 alpha_i (snr * ||z|| / ||s||)^2,        x <- x + eps_i s + sqrt(2 eps_i) z
//! ```
//!
//! with `alpha_i = (alpha(t_i) / alpha(t_{i+1}))^2`, the discrete chain's `alpha_i = 1 - beta_i`
//! between grid times (Score-SDE's `sde.alphas[timestep]` for VP and sub-VP, computed exactly
//! so that it stays in (0, 1] on coarse grids, where their `1 - beta(t)/N` goes negative), and
//! 1 for the VE types. Score-SDE averages both norms over the **batch**, which makes every
//! sample depend on the batch it is drawn with (field notes, bug 9): [`SnrRule::BatchMean`]
//! keeps that rule. The default, [`SnrRule::NoiseLevel`], uses the values the norms take when
//! the data are concentrated at a point, `||z||^2 = D` and `||s||^2 = D / sigma(t_i)^2`, so
//! `eps_i = 2 alpha_i (snr sigma(t_i))^2`: the same step in high dimension, independent of the
//! batch, and stable in 2-D, where a per-sample `1/||s||^2` has a heavy tail (a sample near a
//! mode gets an enormous step).
//!
//! Predictors: reverse diffusion (Score-SDE's `ReverseDiffusionPredictor`, with the exact
//! transition `x_t = a x_s + sqrt(b) z` of the process between grid times, `a = alpha_t/alpha_s`,
//! `b = sigma_t^2 - a^2 sigma_s^2`: `x <- (2 - a) x + b s + sqrt(b) z`; for VE this is
//! `x + (sigma_t^2 - sigma_s^2) s + sqrt(sigma_t^2 - sigma_s^2) z`) or Euler–Maruyama.
//! NFE = N (corrector_steps + 1) + 1.

use super::registry::{continuous, time_grid, Opt, SamplerSpec, CONTINUOUS};
use candle_core::{DType, Tensor};

use crate::denoiser::{score_from_eps, Denoiser, NoiseLevel};
use crate::error::{Error, Result};
use crate::process::Sde;
use crate::rng::NoiseStreams;

use super::{
    final_denoise, lin, noise_like, predict_at, reverse_drift, same_level, Observer, SampleOutput, Sampler,
    StepEvent,
};

/// The predictor of a PC sampler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Predictor {
    /// Score-SDE's reverse-diffusion predictor (the default).
    ReverseDiffusion,
    /// Euler–Maruyama on the reverse SDE.
    EulerMaruyama,
}

impl Predictor {
    /// Parses `reverse-diffusion` or `euler-maruyama`.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "reverse-diffusion" | "reverse_diffusion" => Ok(Predictor::ReverseDiffusion),
            "euler-maruyama" | "euler" | "euler_maruyama" => Ok(Predictor::EulerMaruyama),
            other => Err(Error::param(
                "predictor",
                format!("unknown predictor '{other}', expected reverse-diffusion or euler-maruyama"),
            )),
        }
    }
}

/// How the Langevin step size is set from `snr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnrRule {
    /// `eps = 2 alpha (snr sigma(t))^2`: norms at their point-mass values (the default).
    NoiseLevel,
    /// Score-SDE's literal rule: norms averaged over the batch (batch-dependent samples).
    BatchMean,
}

/// A predictor–corrector sampler.
#[derive(Clone, Debug)]
pub struct Pc {
    /// The process.
    pub sde: Sde,
    /// The time grid, decreasing from t_max to t_eps.
    pub times: Vec<f64>,
    /// The predictor.
    pub predictor: Predictor,
    /// The signal-to-noise ratio `r` of the Langevin steps (Score-SDE: 0.16 for VE on CIFAR-10).
    pub snr: f64,
    /// Langevin steps per time (>= 1).
    pub corrector_steps: usize,
    /// The step-size rule.
    pub rule: SnrRule,
    /// Multiplies every noise term (1 = correct; exists for the tests' broken variants).
    pub noise_scale: f64,
}

impl Pc {
    /// A PC sampler; errors unless `snr > 0` and `corrector_steps >= 1`.
    pub fn new(
        sde: Sde,
        times: Vec<f64>,
        predictor: Predictor,
        snr: f64,
        corrector_steps: usize,
    ) -> Result<Self> {
        crate::error::check_range("snr", snr, (0.0, false), (f64::INFINITY, false))?;
        if corrector_steps == 0 {
            return Err(Error::param(
                "corrector-steps",
                "got 0, expected at least 1 (a PC sampler without corrector is the predictor alone)",
            ));
        }
        Ok(Pc {
            sde,
            times,
            predictor,
            snr,
            corrector_steps,
            rule: SnrRule::NoiseLevel,
            noise_scale: 1.0,
        })
    }

    /// Per-row L2 norms of `x`.
    fn row_norms(x: &Tensor) -> Result<Vec<f64>> {
        let b = x.dim(0)?;
        Ok(x.to_dtype(DType::F64)?
            .reshape((b, ()))?
            .sqr()?
            .sum(1)?
            .sqrt()?
            .to_vec1::<f64>()?)
    }

    fn langevin_step(
        &self,
        den: &dyn Denoiser,
        x: &Tensor,
        t: f64,
        s: f64,
        noise: &mut NoiseStreams,
    ) -> Result<Tensor> {
        let level = self.sde.level(t);
        let levels = same_level(level, x)?;
        let eps = den.predict_eps(x, &levels)?;
        let score = score_from_eps(&eps, &levels)?;
        let z = noise_like(noise, x)?;
        let alpha_i = (level.alpha / self.sde.level(s).alpha).powi(2);
        let step = match self.rule {
            SnrRule::NoiseLevel => 2.0 * alpha_i * (self.snr * level.sigma).powi(2),
            SnrRule::BatchMean => {
                let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len().max(1) as f64;
                let (zn, gn) = (mean(Self::row_norms(&z)?), mean(Self::row_norms(&score)?));
                2.0 * alpha_i * (self.snr * zn / gn).powi(2)
            }
        };
        let x_mean = lin(1.0, x, step, &score)?;
        lin(1.0, &x_mean, self.noise_scale * (2.0 * step).sqrt(), &z)
    }

    fn predictor_step(
        &self,
        den: &dyn Denoiser,
        x: &Tensor,
        t: f64,
        s: f64,
        noise: &mut NoiseStreams,
    ) -> Result<(Tensor, Tensor)> {
        let (x0, eps) = predict_at(den, &self.sde, x, t)?;
        let z = noise_like(noise, x)?;
        let x_next = match self.predictor {
            Predictor::EulerMaruyama => {
                let dt = s - t;
                let drift = reverse_drift(&self.sde, t, x, &eps, 1.0)?;
                let x_mean = lin(1.0, x, dt, &drift)?;
                lin(
                    1.0,
                    &x_mean,
                    self.noise_scale * self.sde.diffusion(t) * (-dt).sqrt(),
                    &z,
                )?
            }
            Predictor::ReverseDiffusion => {
                let (lt, ls) = (self.sde.level(t), self.sde.level(s));
                let a = lt.alpha / ls.alpha;
                let b = (lt.sigma * lt.sigma - a * a * ls.sigma * ls.sigma).max(0.0);
                // b * score = -b eps / sigma_t
                let x_mean = lin(2.0 - a, x, -b / lt.sigma, &eps)?;
                lin(1.0, &x_mean, self.noise_scale * b.sqrt(), &z)?
            }
        };
        Ok((x_next, x0))
    }
}

impl Sampler for Pc {
    fn name(&self) -> &'static str {
        "pc"
    }

    fn prior_std(&self) -> f64 {
        self.sde.prior_std()
    }

    fn sample(
        &self,
        den: &dyn Denoiser,
        mut x: Tensor,
        noise: &mut NoiseStreams,
        observer: &mut dyn Observer,
    ) -> Result<SampleOutput> {
        let sde = &self.sde;
        observer.observe(&StepEvent {
            step: 0,
            t: self.times[0],
            level: sde.level(self.times[0]),
            x: &x,
            x0_pred: None,
        })?;
        let mut nfe = 0;
        for (i, w) in self.times.windows(2).enumerate() {
            let (t, s) = (w[0], w[1]);
            for _ in 0..self.corrector_steps {
                x = self.langevin_step(den, &x, t, s, noise)?;
                nfe += 1;
            }
            let (x_next, x0) = self.predictor_step(den, &x, t, s, noise)?;
            nfe += 1;
            x = x_next;
            observer.observe(&StepEvent {
                step: i + 1,
                t: s,
                level: sde.level(s),
                x: &x,
                x0_pred: Some(&x0),
            })?;
        }
        let t_end = *self.times.last().unwrap_or(&sde.t_eps());
        let x0 = final_denoise(den, sde, &x, t_end)?;
        nfe += 1;
        observer.observe(&StepEvent {
            step: self.times.len(),
            t: 0.0,
            level: NoiseLevel::new(1.0, 0.0),
            x: &x0,
            x0_pred: Some(&x0),
        })?;
        Ok(SampleOutput { x: x0, nfe })
    }
}

/// The registry's declaration of `pc`.
pub const SPEC: SamplerSpec = SamplerSpec {
    name: "pc",
    about: "predictor–corrector with a Langevin corrector (Song et al. 2021, Alg. 1–5)",
    processes: CONTINUOUS,
    default_steps: |_| 1000,
    adaptive: false,
    default_steps_doc: "1000",
    options: &[Opt::Spacing, Opt::Snr, Opt::CorrectorSteps, Opt::Predictor],
    stochastic: true,
    build: |process, steps, o| {
        let sde = continuous(process)?;
        let times = sde.time_grid(steps.unwrap_or(1), time_grid(&sde, &o.spacing)?)?;
        Ok(Box::new(Pc::new(
            sde,
            times,
            o.predictor.unwrap_or(Predictor::ReverseDiffusion),
            o.snr.unwrap_or(DEFAULT_SNR),
            o.corrector_steps.unwrap_or(1),
        )?))
    },
};

/// Score-SDE's snr for VE on CIFAR-10, our default for every process.
pub const DEFAULT_SNR: f64 = 0.16;
