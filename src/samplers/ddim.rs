//! DDIM (Song, Meng & Ermon 2021, eqs. 12 and 16) on any reverse chain; for seed-ve with
//! eta = 0 it is Nakkiran et al. (2024)'s DDIM sampler, `x_s = x_t + lambda (E[x_s | x_t] - x_t)`,
//! `lambda = sigma_t / (sigma_s + sigma_t)`, which is the same update.
//!
//! ```text
//! (x_0_hat, eps_hat) = the denoiser at x_t
//! c   = eta * sqrt(posterior_variance)     = eta * sqrt((1 - ab_s)/(1 - ab_t)) sqrt(1 - ab_t/ab_s)   (eq. 16)
//! x_s = alpha_s x_0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z                                           (eq. 12)
//! ```
//!
//! written for general levels `(alpha, sigma)`; for the DDPM process `alpha_s = sqrt(ab_s)`,
//! `sigma_s^2 = 1 - ab_s`. The previous level is the next entry of the chain (looked up, field
//! notes bug 2); the last step goes to alpha_bar = 1, where `c = 0` and `x_s = x_0_hat`
//! (bug 4). eta = 0 is deterministic; eta = 1 on the full chain is DDPM with fixed-small
//! variance, draw for draw (noise is drawn only when `c > 0`).

use super::chain::chain_for;
use super::registry::{check_clip, Opt, SamplerSpec, DISCRETE};
use crate::process::Process;
use candle_core::Tensor;

use crate::denoiser::{eps_from_x0, Denoiser};
use crate::error::Result;
use crate::rng::NoiseStreams;

use super::chain::{ChainStep, ReverseChain};
use super::{lin, maybe_clip, noise_like, same_level, Observer, SampleOutput, Sampler, StepEvent};

/// One DDIM update from `x_t` given the predictions; `z` is used only when `c > 0`.
pub fn ddim_step(
    step: &ChainStep,
    x0: &Tensor,
    eps: &Tensor,
    eta: f64,
    z: Option<&Tensor>,
) -> Result<Tensor> {
    let c = eta * step.posterior_variance.max(0.0).sqrt();
    let dir = (step.prev.sigma * step.prev.sigma - c * c).max(0.0).sqrt();
    let x = lin(step.prev.alpha, x0, dir, eps)?;
    match z {
        Some(z) if c > 0.0 => Ok(lin(1.0, &x, c, z)?),
        _ => Ok(x),
    }
}

/// Which eps the DDIM update uses once the x_0 prediction has been clipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EpsAfterClip {
    /// `eps = (x_t - alpha_t clip(x_0)) / sigma_t`, consistent with the clipped x_0 (GLIDE;
    /// diffusers' `use_clipped_model_output=True`). The default.
    Recompute,
    /// The network's own eps, as if nothing had been clipped: diffusers' `DDIMScheduler.step`
    /// default (`use_clipped_model_output=False`), which `DDIMPipeline` uses.
    Unclipped,
}

/// DDIM sampling on a chain (normally a timestep subsequence of the DDPM chain).
#[derive(Clone, Debug)]
pub struct Ddim {
    /// The chain (its levels; DDIM uses only the levels and the posterior variance). Each step
    /// is taken on its own `level -> prev`, so a chain whose `prev` is not the next step's
    /// `level` (diffusers' DDIM, [`super::diffusers`]) is walked as written.
    pub chain: ReverseChain,
    /// eta in [0, 1].
    pub eta: f64,
    /// Clip x_0 predictions to [-c, c] (off by default).
    pub clip_x0: Option<f64>,
    /// The eps used after clipping (only matters with `clip_x0`).
    pub eps_after_clip: EpsAfterClip,
    /// The prior std.
    pub prior_std: f64,
    /// Multiplies the noise std c (1 = correct; see [`super::ddpm::Ddpm::noise_scale`]).
    pub noise_scale: f64,
}

impl Ddim {
    /// DDIM with `eta` on `chain`.
    pub fn new(chain: ReverseChain, eta: f64, prior_std: f64) -> Result<Self> {
        super::check_option("eta", eta, 0.0, 1.0)?;
        Ok(Ddim {
            chain,
            eta,
            clip_x0: None,
            eps_after_clip: EpsAfterClip::Recompute,
            prior_std,
            noise_scale: 1.0,
        })
    }
}

impl Sampler for Ddim {
    fn name(&self) -> &'static str {
        "ddim"
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
            let levels = same_level(step.level, &x)?;
            let (x0, eps) = match (self.clip_x0, self.eps_after_clip) {
                (None, _) => den.predict_x0_eps(&x, &levels)?,
                (Some(_), EpsAfterClip::Recompute) => {
                    let x0 = maybe_clip(den.predict_x0(&x, &levels)?, self.clip_x0)?;
                    let eps = eps_from_x0(&x, &x0, &levels)?;
                    (x0, eps)
                }
                (Some(_), EpsAfterClip::Unclipped) => {
                    let (x0, eps) = den.predict_x0_eps(&x, &levels)?;
                    (maybe_clip(x0, self.clip_x0)?, eps)
                }
            };
            let c = self.eta * step.posterior_variance.max(0.0).sqrt();
            let z = if c > 0.0 {
                Some(noise_like(noise, &x)?.affine(self.noise_scale, 0.0)?)
            } else {
                None
            };
            x = ddim_step(step, &x0, &eps, self.eta, z.as_ref())?;
            observer.observe(&StepEvent {
                step: k + 1,
                t: step.t_prev,
                level: step.prev,
                x: &x,
                x0_pred: Some(&x0),
            })?;
        }
        Ok(SampleOutput {
            x,
            nfe: self.chain.len(),
        })
    }
}

/// The registry's declaration of `ddim`.
pub const SPEC: SamplerSpec = SamplerSpec {
    name: "ddim",
    about: "DDIM (Song, Meng & Ermon 2021, eq. 12), deterministic at eta = 0",
    processes: DISCRETE,
    default_steps: |p| match p {
        Process::Ddpm(s) => s.timesteps().min(100),
        Process::Continuous(_) => 100,
    },
    adaptive: false,
    default_steps_doc: "100",
    options: &[Opt::Eta, Opt::Spacing, Opt::ClipX0],
    stochastic: false,
    build: |process, steps, o| {
        let chain = chain_for(process, steps.unwrap_or(1), &o.spacing)?;
        let mut s = Ddim::new(chain, o.eta.unwrap_or(0.0), process.prior_std())?;
        s.clip_x0 = check_clip(o.clip_x0)?;
        Ok(Box::new(s))
    },
};
