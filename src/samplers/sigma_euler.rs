//! diffusers' sigma-space samplers: `euler` (`EulerDiscreteScheduler`), `euler-ancestral`
//! (`EulerAncestralDiscreteScheduler`) and `heun` (`HeunDiscreteScheduler`), the k-diffusion
//! samplers on the probability-flow ODE of Karras et al. (2022) in the EDM frame
//! `x~ = x / alpha`, noise `s = sigma / alpha`:
//!
//! ```text
//! d      = (x~ - D(x~; s_i)) / s_i                                   (the ODE derivative dx~/ds; Karras et al. 2022, eq. 3)
//! euler:  x~ <- x~ + (s_{i+1} - s_i) d                                (Alg. 1 without the correction)
//! heun:   x' = x~ + (s_{i+1} - s_i) d;  if s_{i+1} > 0:
//!         x~ <- x~ + (s_{i+1} - s_i) (d + (x' - D(x'; s_{i+1})) / s_{i+1}) / 2   (Alg. 1)
//! euler-ancestral: s_up = sqrt(s_{i+1}^2 (s_i^2 - s_{i+1}^2) / s_i^2), s_down = sqrt(s_{i+1}^2 - s_up^2),
//!         x~ <- x~ + (s_down - s_i) d + s_up z                      (k-diffusion's get_ancestral_step)
//! ```
//!
//! **State and denoiser calls (our choice):** the state is the EDM-frame `x~ = x_0 + s eps`
//! (VE form; on the ddpm process this is diffusers' `sample`), and the denoiser is called at the
//! process's own level `(alpha, sigma)` of that s with the state scaled back, `alpha x~`: on the
//! ddpm process `alpha = 1/sqrt(1 + s^2)`, which is diffusers' `scale_model_input`, and the eps /
//! v / x_0 conversions are then the Denoiser's own (the same as diffusers' for every prediction
//! type). On a continuous process it is EDM's frame for that process (as `edm-heun`).
//!
//! The prior: diffusers' `init_noise_sigma` on the ddpm process, `s_0` for linspace and
//! trailing, `sqrt(s_0^2 + 1)` for leading (its first timestep is below T - 1, so `s_0` is
//! smaller; diffusers still uses the VP-sized prior); the process's prior over `alpha(t_max)`
//! on a continuous process. Observers see `x~` and the level `(1, s)`.
//!
//! diffusers' choices, reproduced: linspace timesteps are not rounded (fractional, sigma
//! interpolated linearly between table entries); karras / exponential / beta grids span the
//! spacing's own sigmas; with one linspace step the only timestep is 0 (s = 0.01 on the linear
//! schedule, so the prior is N(0, 0.01^2): one step of `euler` from noise is not a sample, in
//! diffusers as here); Heun's last step to s = 0 is an Euler step (NFE 2K - 1).

use super::registry::{check_clip, grid_options, Opt, SamplerOptions, SamplerSpec, ALL_PROCESSES};
use candle_core::Tensor;

use crate::denoiser::{Denoiser, NoiseLevel};
use crate::error::Result;
use crate::nets::scheduler_config::{SchedulerClass, SchedulerConfig};
use crate::process::Process;
use crate::rng::NoiseStreams;
use crate::schedule::Schedule;

use super::dpm_solver::combo;
use super::grids::{build_grid, FinalSigma, GridOptions, GridRules, GridStyle, LevelGrid, SigmaMinRule};
use super::timesteps::Spacing;
use super::{maybe_clip, noise_like, same_level, Observer, SampleOutput, Sampler, StepEvent};

/// Options of the sigma-space samplers; `Default` is diffusers' defaults (linspace, the
/// spacing's sigmas, final zero, no clipping).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SigmaSamplerOptions {
    /// The grid.
    pub grid: GridOptions,
    /// Clamp every x_0 prediction to [-c, c] (Heun's `clip_sample` / `clip_sample_range`; off).
    pub clip_x0: Option<f64>,
}

/// What the three samplers share: the grid, the prior, the denoiser in the EDM frame.
#[derive(Clone, Debug)]
pub struct SigmaGridSampler {
    /// The options it was built with.
    pub options: SigmaSamplerOptions,
    /// The noise levels (K + 1); `grid.sigmas` are the EDM sigmas s_i.
    pub grid: LevelGrid,
    prior_std: f64,
}

impl SigmaGridSampler {
    fn new(process: &Process, steps: usize, options: &SigmaSamplerOptions) -> Result<Self> {
        if let Some(c) = options.clip_x0 {
            crate::error::check_range("clip-x0", c, (0.0, false), (f64::INFINITY, false))?;
        }
        let rules = GridRules {
            style: GridStyle::Sigma,
            default_final: FinalSigma::Zero,
            sigma_min_rule: SigmaMinRule::FirstTrainingStep,
            lambda_min_clipped: f64::NEG_INFINITY,
        };
        let grid = build_grid(process, steps, &options.grid, &rules)?;
        let s0 = grid.sigmas[0];
        let prior_std = match process {
            Process::Ddpm(_) if options.grid.spacing == Spacing::Leading => (s0 * s0 + 1.0).sqrt(),
            Process::Ddpm(_) => s0,
            Process::Continuous(sde) => sde.prior_std() / sde.level(sde.t_max()).alpha,
        };
        Ok(SigmaGridSampler {
            options: options.clone(),
            grid,
            prior_std,
        })
    }

    /// `D(x~; s_k) = E[x_0 | x~]`: the denoiser at level k on `alpha_k x~` (one NFE).
    pub fn denoise(&self, den: &dyn Denoiser, x: &Tensor, k: usize) -> Result<Tensor> {
        let level = self.grid.levels[k];
        let x0 = den.predict_x0(&x.affine(level.alpha, 0.0)?, &same_level(level, x)?)?;
        maybe_clip(x0, self.options.clip_x0)
    }

    /// `d = (x~ - D) / s`.
    fn derivative(x: &Tensor, d: &Tensor, s: f64) -> Result<Tensor> {
        combo(&[(1.0 / s, x), (-1.0 / s, d)])
    }

    fn observe(
        &self,
        observer: &mut dyn Observer,
        step: usize,
        x: &Tensor,
        x0: Option<&Tensor>,
    ) -> Result<()> {
        observer.observe(&StepEvent {
            step,
            t: self.grid.times[step],
            level: NoiseLevel::new(1.0, self.grid.sigmas[step]),
            x,
            x0_pred: x0,
        })
    }

    /// Runs `step` at every k (each returns the new state, its x_0 prediction and its NFE).
    fn run(
        &self,
        mut x: Tensor,
        observer: &mut dyn Observer,
        mut step: impl FnMut(usize, &Tensor) -> Result<(Tensor, Tensor, usize)>,
    ) -> Result<SampleOutput> {
        self.observe(observer, 0, &x, None)?;
        let mut nfe = 0;
        for k in 0..self.grid.steps() {
            let (x_next, x0, n) = step(k, &x)?;
            nfe += n;
            x = x_next;
            self.observe(observer, k + 1, &x, Some(&x0))?;
        }
        Ok(SampleOutput { x, nfe })
    }

    fn from_config(
        cfg: &SchedulerConfig,
        schedule: &Schedule,
        steps: usize,
        class: SchedulerClass,
    ) -> Result<Self> {
        let mut grid = GridOptions::from_scheduler_config(cfg)?;
        if class != SchedulerClass::EulerDiscrete {
            // Euler ancestral and Heun always end at sigma = 0
            grid.final_sigma = Some(FinalSigma::Zero);
        }
        let clip_x0 =
            (class == SchedulerClass::HeunDiscrete && cfg.clip_sample).then_some(cfg.clip_sample_range);
        cfg.check_schedule_matches(schedule)?;
        SigmaGridSampler::new(
            &Process::Ddpm(schedule.clone()),
            steps,
            &SigmaSamplerOptions { grid, clip_x0 },
        )
    }
}

macro_rules! sigma_sampler {
    ($(#[$doc:meta])* $name:ident, $class:expr) => {
        $(#[$doc])*
        #[derive(Clone, Debug)]
        pub struct $name {
            /// The grid, prior and options.
            pub inner: SigmaGridSampler,
        }

        impl $name {
            /// The sampler for `steps` steps on `process` (the ddpm process or any continuous family).
            pub fn new(process: &Process, steps: usize, options: &SigmaSamplerOptions) -> Result<Self> {
                Ok($name {
                    inner: SigmaGridSampler::new(process, steps, options)?,
                })
            }

            /// The sampler a diffusers scheduler config describes (the grid keys:
            /// `timestep_spacing`, `steps_offset`, `use_karras_sigmas` / `use_exponential_sigmas`
            /// / `use_beta_sigmas`, `sigma_min` / `sigma_max`, `final_sigmas_type` (Euler only),
            /// `clip_sample` (Heun only)) for `steps` steps on `schedule`.
            pub fn from_scheduler_config(cfg: &SchedulerConfig, schedule: &Schedule, steps: usize) -> Result<Self> {
                Ok($name {
                    inner: SigmaGridSampler::from_config(cfg, schedule, steps, $class)?,
                })
            }

            /// The noise levels.
            pub fn grid(&self) -> &LevelGrid {
                &self.inner.grid
            }
        }
    };
}

sigma_sampler!(
    /// `euler`: Euler steps on the probability-flow ODE in sigma (one NFE per step).
    Euler,
    SchedulerClass::EulerDiscrete
);
sigma_sampler!(
    /// `euler-ancestral`: Euler steps to `s_down` plus fresh noise of std `s_up` (stochastic).
    EulerAncestral,
    SchedulerClass::EulerAncestralDiscrete
);
sigma_sampler!(
    /// `heun`: Heun's second-order steps (Karras et al. 2022, Alg. 1; NFE 2K - 1).
    Heun,
    SchedulerClass::HeunDiscrete
);

impl Euler {
    /// Step k from `x~` at `s_k` to `s_{k+1}`: returns the new state and the x_0 prediction.
    pub fn step(&self, k: usize, x: &Tensor, den: &dyn Denoiser) -> Result<(Tensor, Tensor)> {
        let s = &self.inner.grid.sigmas;
        let d0 = self.inner.denoise(den, x, k)?;
        let d = SigmaGridSampler::derivative(x, &d0, s[k])?;
        Ok((combo(&[(1.0, x), (s[k + 1] - s[k], &d)])?, d0))
    }
}

impl EulerAncestral {
    /// Step k (draws noise only when `s_up > 0`, i.e. not on a last step to sigma = 0).
    pub fn step(
        &self,
        k: usize,
        x: &Tensor,
        den: &dyn Denoiser,
        noise: &mut NoiseStreams,
    ) -> Result<(Tensor, Tensor)> {
        let s = &self.inner.grid.sigmas;
        let (from, to) = (s[k], s[k + 1]);
        let s_up = (to * to * (from * from - to * to) / (from * from))
            .max(0.0)
            .sqrt();
        let s_down = (to * to - s_up * s_up).max(0.0).sqrt();
        let d0 = self.inner.denoise(den, x, k)?;
        let d = SigmaGridSampler::derivative(x, &d0, from)?;
        let x_next = combo(&[(1.0, x), (s_down - from, &d)])?;
        if s_up > 0.0 {
            let z = noise_like(noise, x)?;
            Ok((combo(&[(1.0, &x_next), (s_up, &z)])?, d0))
        } else {
            Ok((x_next, d0))
        }
    }
}

impl Heun {
    /// Step k: Heun's step (two NFE) or, to s = 0, Euler's (one). Returns the new state, the
    /// first x_0 prediction and the NFE.
    pub fn step(&self, k: usize, x: &Tensor, den: &dyn Denoiser) -> Result<(Tensor, Tensor, usize)> {
        let s = &self.inner.grid.sigmas;
        let (from, to) = (s[k], s[k + 1]);
        let d0 = self.inner.denoise(den, x, k)?;
        let d = SigmaGridSampler::derivative(x, &d0, from)?;
        let x_euler = combo(&[(1.0, x), (to - from, &d)])?;
        if to == 0.0 {
            return Ok((x_euler, d0, 1));
        }
        let d1 = self.inner.denoise(den, &x_euler, k + 1)?;
        let d_next = SigmaGridSampler::derivative(&x_euler, &d1, to)?;
        Ok((
            combo(&[(1.0, x), (0.5 * (to - from), &d), (0.5 * (to - from), &d_next)])?,
            d0,
            2,
        ))
    }
}

impl Sampler for Euler {
    fn name(&self) -> &'static str {
        "euler"
    }
    /// diffusers' `init_noise_sigma` (see the module docs).
    fn prior_std(&self) -> f64 {
        self.inner.prior_std
    }
    fn sample(
        &self,
        den: &dyn Denoiser,
        x_t: Tensor,
        _noise: &mut NoiseStreams,
        observer: &mut dyn Observer,
    ) -> Result<SampleOutput> {
        self.inner.run(x_t, observer, |k, x| {
            let (x, x0) = self.step(k, x, den)?;
            Ok((x, x0, 1))
        })
    }
}

impl Sampler for EulerAncestral {
    fn name(&self) -> &'static str {
        "euler-ancestral"
    }
    /// diffusers' `init_noise_sigma` (see the module docs).
    fn prior_std(&self) -> f64 {
        self.inner.prior_std
    }
    fn sample(
        &self,
        den: &dyn Denoiser,
        x_t: Tensor,
        noise: &mut NoiseStreams,
        observer: &mut dyn Observer,
    ) -> Result<SampleOutput> {
        self.inner.run(x_t, observer, |k, x| {
            let (x, x0) = self.step(k, x, den, noise)?;
            Ok((x, x0, 1))
        })
    }
}

impl Sampler for Heun {
    fn name(&self) -> &'static str {
        "heun"
    }
    /// diffusers' `init_noise_sigma` (see the module docs).
    fn prior_std(&self) -> f64 {
        self.inner.prior_std
    }
    fn sample(
        &self,
        den: &dyn Denoiser,
        x_t: Tensor,
        _noise: &mut NoiseStreams,
        observer: &mut dyn Observer,
    ) -> Result<SampleOutput> {
        self.inner.run(x_t, observer, |k, x| self.step(k, x, den))
    }
}

/// The options of a sigma-space sampler from the user's.
fn sigma_options(o: &SamplerOptions) -> Result<SigmaSamplerOptions> {
    Ok(SigmaSamplerOptions {
        grid: grid_options(o)?,
        clip_x0: check_clip(o.clip_x0)?,
    })
}

/// The options the sigma-space samplers take.
const SIGMA_OPTIONS: &[Opt] = &[Opt::Spacing, Opt::Sigmas, Opt::FinalSigma, Opt::ClipX0];

/// The registry's declaration of `euler`.
pub const EULER_SPEC: SamplerSpec = SamplerSpec {
    name: "euler",
    about: "diffusers' EulerDiscreteScheduler: Euler steps on the probability-flow ODE in sigma",
    processes: ALL_PROCESSES,
    default_steps: |_| 50,
    adaptive: false,
    default_steps_doc: "50",
    options: SIGMA_OPTIONS,
    stochastic: false,
    build: |p, steps, o| Ok(Box::new(Euler::new(p, steps.unwrap_or(1), &sigma_options(o)?)?)),
};

/// The registry's declaration of `euler-ancestral`.
pub const EULER_ANCESTRAL_SPEC: SamplerSpec = SamplerSpec {
    name: "euler-ancestral",
    about: "diffusers' EulerAncestralDiscreteScheduler: Euler steps with fresh noise (k-diffusion's sample_euler_ancestral)",
    processes: ALL_PROCESSES,
    default_steps: |_| 50,
    adaptive: false,
    default_steps_doc: "50",
    options: SIGMA_OPTIONS,
    stochastic: true,
    build: |p, steps, o| Ok(Box::new(EulerAncestral::new(p, steps.unwrap_or(1), &sigma_options(o)?)?)),
};

/// The registry's declaration of `heun`.
pub const HEUN_SPEC: SamplerSpec = SamplerSpec {
    name: "heun",
    about: "diffusers' HeunDiscreteScheduler: Heun's 2nd-order steps in sigma (2 NFE per step but the last)",
    processes: ALL_PROCESSES,
    default_steps: |_| 25,
    adaptive: false,
    default_steps_doc: "25",
    options: SIGMA_OPTIONS,
    stochastic: false,
    build: |p, steps, o| Ok(Box::new(Heun::new(p, steps.unwrap_or(1), &sigma_options(o)?)?)),
};
