//! The probability-flow ODE (Song et al. 2021, eq. 13)
//!
//! ```text
//! dx/dt = f(t) x - 1/2 g(t)^2 score(x, t)
//! ```
//!
//! integrated from t_max to t_eps on a fixed time grid, then one denoising step `x <- E[x_0 | x]`.
//! The steps can be taken in one of two variables ([`OdeVariable`]):
//!
//! - `Time`: the ODE as written, in t: `x <- x + dt d(x, t_i)` (Euler);
//! - `EdmSigma`: the same ODE for `x~ = x / alpha` against `sigma~ = sigma / alpha`, where it reads
//!   `dx~/dsigma~ = (x~ - D(x~; sigma~)) / sigma~` with `D = E[x_0 | x]` (Karras et al. 2022, eq. 4
//!   with s(t) = alpha(t)): `x~ <- x~ + (sigma~_{i+1} - sigma~_i) (x~ - D) / sigma~_i`.
//!   For the VE types (alpha = 1) only the independent variable changes (t -> sigma). In t, an
//!   Euler step of the VE ODE shrinks `x - D` by `1 - |d ln sigma|` where the exact flow
//!   shrinks it by `sigma_{i+1}/sigma_i`, an error that compounds over the decades of noise
//!   above the data (with 100 uniform steps the latent arrives at the data scale about 15%
//!   too small); in sigma that linear part is exact.
//!
//! Default: `EdmSigma` for ve and seed-ve, `Time` for the VP types (Score-SDE's form, accurate
//! on its uniform grid). Euler: NFE = N + 1. Heun (explicit trapezoidal rule, 2nd order;
//! Karras et al. 2022, Alg. 1 without the final-step special case since t_eps > 0): a second
//! evaluation at the Euler prediction, the step uses the mean of the two slopes; NFE = 2N + 1.

use super::registry::{continuous, time_grid, Opt, SamplerOptions, SamplerSpec, CONTINUOUS};
use crate::process::Process;
use candle_core::Tensor;

use crate::denoiser::{Denoiser, NoiseLevel};
use crate::error::Result;
use crate::process::Sde;
use crate::rng::NoiseStreams;

use super::{final_denoise, lin, predict_at, reverse_drift, Observer, SampleOutput, Sampler, StepEvent};

/// The fixed-step method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OdeMethod {
    /// Forward Euler (1st order).
    Euler,
    /// Heun's method (2nd order).
    Heun,
}

/// The independent variable of the fixed steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OdeVariable {
    /// The process time t.
    Time,
    /// The EDM noise sigma/alpha, with the state x/alpha.
    EdmSigma,
}

impl OdeVariable {
    /// Parses `t`/`time` or `sigma`/`edm-sigma`.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "t" | "time" => Ok(OdeVariable::Time),
            "sigma" | "edm-sigma" | "edm_sigma" => Ok(OdeVariable::EdmSigma),
            other => Err(crate::error::Error::param(
                "ode-variable",
                format!("unknown ODE variable '{other}', expected t or sigma"),
            )),
        }
    }

    /// The default for `sde`: `EdmSigma` for the VE types (alpha = 1), `Time` otherwise.
    pub fn default_for(sde: &Sde) -> Self {
        match sde {
            Sde::Ve { .. } | Sde::SeedVe { .. } => OdeVariable::EdmSigma,
            _ => OdeVariable::Time,
        }
    }
}

/// A fixed-step probability-flow ODE sampler.
#[derive(Clone, Debug)]
pub struct OdeSampler {
    /// The process.
    pub sde: Sde,
    /// The time grid, decreasing from t_max to t_eps.
    pub times: Vec<f64>,
    /// Euler or Heun.
    pub method: OdeMethod,
    /// The variable the steps are taken in.
    pub variable: OdeVariable,
    /// Multiplies the score term of the drift (1 = correct; exists so tests can show that a
    /// wrong drift, e.g. the reverse SDE's factor 1 without its noise, is detected).
    pub score_scale: f64,
}

impl OdeSampler {
    /// The sampler for `method` on `sde` over `times`.
    pub fn new(sde: Sde, times: Vec<f64>, method: OdeMethod) -> Self {
        let variable = OdeVariable::default_for(&sde);
        OdeSampler {
            sde,
            times,
            method,
            variable,
            score_scale: 1.0,
        }
    }

    /// The slope at `(x, t)` in the sampler's variable, and the x_0 prediction:
    /// `Time`: `dx/dt`; `EdmSigma`: `dx~/dsigma~ = (x~ - D) / sigma~` with `x~ = x / alpha`.
    fn slope(&self, den: &dyn Denoiser, x: &Tensor, t: f64) -> Result<(Tensor, Tensor)> {
        let (x0, eps) = predict_at(den, &self.sde, x, t)?;
        let d = match self.variable {
            OdeVariable::Time => reverse_drift(&self.sde, t, x, &eps, 0.5 * self.score_scale)?,
            // (x~ - D) / sigma~ = eps (exactly, for x = alpha D + sigma eps): the EDM slope is the
            // predicted noise; score_scale scales it like the score term in t.
            OdeVariable::EdmSigma => eps.affine(self.score_scale, 0.0)?,
        };
        Ok((d, x0))
    }

    /// One step of size `h` in the sampler's variable, from `x` at `t` to time `s`.
    fn advance(&self, x: &Tensor, t: f64, s: f64, slope: &Tensor, weight: f64) -> Result<Tensor> {
        match self.variable {
            OdeVariable::Time => lin(1.0, x, weight * (s - t), slope),
            OdeVariable::EdmSigma => {
                let (lt, ls) = (self.sde.level(t), self.sde.level(s));
                // x_s = alpha_s (x_t / alpha_t + (sigma~_s - sigma~_t) slope)
                lin(
                    ls.alpha / lt.alpha,
                    x,
                    ls.alpha * weight * (ls.edm_sigma() - lt.edm_sigma()),
                    slope,
                )
            }
        }
    }
}

impl Sampler for OdeSampler {
    fn name(&self) -> &'static str {
        match self.method {
            OdeMethod::Euler => "ode-euler",
            OdeMethod::Heun => "ode-heun",
        }
    }

    fn prior_std(&self) -> f64 {
        self.sde.prior_std()
    }

    fn sample(
        &self,
        den: &dyn Denoiser,
        mut x: Tensor,
        _noise: &mut NoiseStreams,
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
            let (d1, x0) = self.slope(den, &x, t)?;
            nfe += 1;
            let x_euler = self.advance(&x, t, s, &d1, 1.0)?;
            x = match self.method {
                OdeMethod::Euler => x_euler,
                OdeMethod::Heun => {
                    let (d2, _) = self.slope(den, &x_euler, s)?;
                    nfe += 1;
                    self.advance(&x, t, s, &(d1 + d2)?, 0.5)?
                }
            };
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

/// The probability-flow ODE sampler with `method` on `process`'s time grid.
fn build_ode(
    process: &Process,
    steps: Option<usize>,
    o: &SamplerOptions,
    method: OdeMethod,
) -> Result<Box<dyn Sampler>> {
    let sde = continuous(process)?;
    let times = sde.time_grid(steps.unwrap_or(1), time_grid(&sde, &o.spacing)?)?;
    let mut s = OdeSampler::new(sde, times, method);
    if let Some(v) = o.ode_variable {
        s.variable = v;
    }
    Ok(Box::new(s))
}

/// The registry's declaration of `ode-euler`.
pub const EULER_SPEC: SamplerSpec = SamplerSpec {
    name: "ode-euler",
    about: "the probability-flow ODE (Song et al. 2021, eq. 13) by Euler steps",
    processes: CONTINUOUS,
    default_steps: |_| 1000,
    adaptive: false,
    default_steps_doc: "1000",
    options: &[Opt::Spacing, Opt::OdeVariable],
    stochastic: false,
    build: |p, steps, o| build_ode(p, steps, o, OdeMethod::Euler),
};

/// The registry's declaration of `ode-heun`.
pub const HEUN_SPEC: SamplerSpec = SamplerSpec {
    name: "ode-heun",
    about: "the probability-flow ODE by Heun's method (2nd order)",
    processes: CONTINUOUS,
    default_steps: |_| 200,
    adaptive: false,
    default_steps_doc: "200",
    options: &[Opt::Spacing, Opt::OdeVariable],
    stochastic: false,
    build: |p, steps, o| build_ode(p, steps, o, OdeMethod::Heun),
};
