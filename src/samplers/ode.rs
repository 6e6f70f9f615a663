//! The probability-flow ODE (Song et al. 2021, eq. 13)
//!
//! ```text
//! dx/dt = f(t) x - 1/2 g(t)^2 score(x, t)
//! ```
//!
//! integrated from t_max to t_eps on a fixed grid, then one denoising step `x <- E[x_0 | x]`.
//!
//! - Euler: `x <- x + dt d(x, t_i)`; NFE = N + 1.
//! - Heun (explicit trapezoidal rule, 2nd order; Karras et al. 2022, Alg. 1 without the
//!   final-step special case since t_eps > 0): `x~ = x + dt d(x, t_i)`,
//!   `x <- x + dt (d(x, t_i) + d(x~, t_{i+1})) / 2`; NFE = 2N + 1.

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

/// A fixed-step probability-flow ODE sampler.
#[derive(Clone, Debug)]
pub struct OdeSampler {
    /// The process.
    pub sde: Sde,
    /// The time grid, decreasing from t_max to t_eps.
    pub times: Vec<f64>,
    /// Euler or Heun.
    pub method: OdeMethod,
    /// Multiplies the score term of the drift (1 = correct; exists so tests can show that a
    /// wrong drift, e.g. the reverse SDE's factor 1 without its noise, is detected).
    pub score_scale: f64,
}

impl OdeSampler {
    /// The sampler for `method` on `sde` over `times`.
    pub fn new(sde: Sde, times: Vec<f64>, method: OdeMethod) -> Self {
        OdeSampler { sde, times, method, score_scale: 1.0 }
    }

    fn drift(&self, den: &dyn Denoiser, x: &Tensor, t: f64) -> Result<(Tensor, Tensor)> {
        let (x0, eps) = predict_at(den, &self.sde, x, t)?;
        Ok((reverse_drift(&self.sde, t, x, &eps, 0.5 * self.score_scale)?, x0))
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
        observer.observe(&StepEvent { step: 0, t: self.times[0], level: sde.level(self.times[0]), x: &x, x0_pred: None })?;
        let mut nfe = 0;
        for (i, w) in self.times.windows(2).enumerate() {
            let (t, s) = (w[0], w[1]);
            let dt = s - t;
            let (d1, x0) = self.drift(den, &x, t)?;
            nfe += 1;
            x = match self.method {
                OdeMethod::Euler => lin(1.0, &x, dt, &d1)?,
                OdeMethod::Heun => {
                    let x_euler = lin(1.0, &x, dt, &d1)?;
                    let (d2, _) = self.drift(den, &x_euler, s)?;
                    nfe += 1;
                    lin(1.0, &x, 0.5 * dt, &(d1 + d2)?)?
                }
            };
            observer.observe(&StepEvent { step: i + 1, t: s, level: sde.level(s), x: &x, x0_pred: Some(&x0) })?;
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
