//! Ancestral sampling (Ho et al. 2020, Algorithm 2; seed 003, Q15), on any reverse chain: the
//! full DDPM chain, a respaced one (Nichol & Dhariwal 2021), or the seed-000 chain (Nakkiran et
//! al. 2024, Algorithm 2 "DDPM sampler").
//!
//! ```text
//! x_0_hat = E[x_0 | x_t]                              (the denoiser, optionally clipped)
//! mean    = coef_x0 * x_0_hat + coef_xt * x_t         (posterior mean, Ho et al. eq. 7)
//! x_s     = mean + sqrt(var) * z,   z ~ N(0, I)       (no noise at the last step: x_0 = mean)
//! ```
//!
//! with `var` the fixed-small variance `beta~` (`posterior_variance`) or the fixed-large
//! variance `beta` (Ho et al. 2020, section 3.2: "sigma_t^2 = beta_t and sigma_t^2 = beta~_t
//! had similar results"). For seed-ve, fixed-large is Nakkiran et al.'s `sigma_q^2 dt` and
//! fixed-small is the exact Brownian-bridge variance.

use super::chain::chain_for;
use super::registry::{check_clip, Opt, SamplerSpec, DISCRETE};
use crate::process::Process;
use candle_core::Tensor;

use crate::denoiser::Denoiser;
use crate::error::{Error, Result};
use crate::rng::NoiseStreams;

use super::chain::{ChainStep, ReverseChain};
use super::{lin, maybe_clip, noise_like, same_level, Observer, SampleOutput, Sampler, StepEvent};

/// The variance of each ancestral step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variance {
    /// `beta~_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t` (the default).
    FixedSmall,
    /// `beta_t`.
    FixedLarge,
}

impl Variance {
    /// Parses `small`/`fixed-small` or `large`/`fixed-large`.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "small" | "fixed-small" | "fixed_small" => Ok(Variance::FixedSmall),
            "large" | "fixed-large" | "fixed_large" => Ok(Variance::FixedLarge),
            other => Err(Error::param(
                "variance",
                format!("unknown variance '{other}', expected small or large"),
            )),
        }
    }
}

/// Whether the last step of the chain (to x_0) adds noise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LastStepNoise {
    /// Never: the last step returns the posterior mean (Ho et al. 2020, Alg. 2: z = 0 at
    /// t = 1). The default.
    Never,
    /// When the step starts above the first training step (index > 0): diffusers'
    /// `DDPMScheduler.step` rule "noise if t > 0", which with `trailing` spacing (last
    /// timestep > 0) adds `sqrt(var) z` to the final sample.
    IfIndexPositive,
}

/// `mean = coef_x0 * x0 + coef_xt * x_t`: the posterior mean of one chain step.
pub fn posterior_mean(step: &ChainStep, x_t: &Tensor, x0: &Tensor) -> Result<Tensor> {
    lin(step.coef_x0, x0, step.coef_xt, x_t)
}

/// DDPM ancestral sampling on a reverse chain.
#[derive(Clone, Debug)]
pub struct Ddpm {
    /// The chain walked.
    pub chain: ReverseChain,
    /// Fixed-small or fixed-large variance.
    pub variance: Variance,
    /// Clip x_0 predictions to [-c, c] (Ho et al.'s images in [-1, 1]; off by default).
    pub clip_x0: Option<f64>,
    /// Whether the last step adds noise.
    pub last_step_noise: LastStepNoise,
    /// The prior std (1 for DDPM, sigma_q for seed-ve).
    pub prior_std: f64,
    /// Test knob: multiplies every step's noise std (1 = correct). Exists so that the oracle
    /// tests can show that a wrong variance is detected.
    pub noise_scale: f64,
}

impl Ddpm {
    /// Ancestral sampling on `chain` with the given variance.
    pub fn new(chain: ReverseChain, variance: Variance, prior_std: f64) -> Self {
        Ddpm {
            chain,
            variance,
            clip_x0: None,
            last_step_noise: LastStepNoise::Never,
            prior_std,
            noise_scale: 1.0,
        }
    }
}

impl Sampler for Ddpm {
    fn name(&self) -> &'static str {
        "ddpm"
    }

    fn prior_std(&self) -> f64 {
        self.prior_std
    }

    fn sample(
        &self,
        den: &dyn Denoiser,
        mut x: Tensor,
        noise: &mut NoiseStreams,
        observer: &mut dyn Observer,
    ) -> Result<SampleOutput> {
        let n = self.chain.len();
        if let Some(first) = self.chain.steps.first() {
            observer.observe(&StepEvent {
                step: 0,
                t: first.t,
                level: first.level,
                x: &x,
                x0_pred: None,
            })?;
        }
        for (k, step) in self.chain.steps.iter().enumerate() {
            let x0 = maybe_clip(den.predict_x0(&x, &same_level(step.level, &x)?)?, self.clip_x0)?;
            let mean = posterior_mean(step, &x, &x0)?;
            let var = match self.variance {
                Variance::FixedSmall => step.posterior_variance,
                Variance::FixedLarge => step.beta,
            };
            let noisy = k + 1 < n
                || (self.last_step_noise == LastStepNoise::IfIndexPositive
                    && step.index.is_some_and(|i| i > 0));
            x = if noisy && var > 0.0 {
                let z = noise_like(noise, &mean)?;
                lin(1.0, &mean, self.noise_scale * var.sqrt(), &z)?
            } else {
                mean
            };
            observer.observe(&StepEvent {
                step: k + 1,
                t: step.t_prev,
                level: step.prev,
                x: &x,
                x0_pred: Some(&x0),
            })?;
        }
        Ok(SampleOutput { x, nfe: n })
    }
}

/// The registry's declaration of `ddpm`.
pub const SPEC: SamplerSpec = SamplerSpec {
    name: "ddpm",
    about: "ancestral sampling (Ho et al. 2020, Alg. 2), respaced for K < T (Nichol & Dhariwal 2021)",
    processes: DISCRETE,
    default_steps: |p| match p {
        Process::Ddpm(s) => s.timesteps(),
        Process::Continuous(_) => 1000,
    },
    adaptive: false,
    default_steps_doc: "T (ddpm; 100 in `diffuse sample`), 1000 (seed-ve)",
    options: &[Opt::Spacing, Opt::Variance, Opt::ClipX0],
    stochastic: true,
    build: |process, steps, o| {
        let chain = chain_for(process, steps.unwrap_or(1), &o.spacing)?;
        let mut s = Ddpm::new(
            chain,
            o.variance.unwrap_or(Variance::FixedSmall),
            process.prior_std(),
        );
        s.clip_x0 = check_clip(o.clip_x0)?;
        Ok(Box::new(s))
    },
};
