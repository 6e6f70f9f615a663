//! The reverse-time SDE (Song et al. 2021, eq. 6) by Euler–Maruyama (their
//! `EulerMaruyamaPredictor`), on a time grid `t_0 = t_max > ... > t_N = t_eps`:
//!
//! ```text
//! dt  = t_{i+1} - t_i  (< 0)
//! x  <- x + [f(t_i) x - g(t_i)^2 score(x, t_i)] dt + g(t_i) sqrt(-dt) z
//! ```
//!
//! then one denoising step `x <- E[x_0 | x_{t_eps}]`. NFE = N + 1.

use super::registry::{continuous, time_grid, Opt, SamplerSpec, CONTINUOUS};
use candle_core::Tensor;

use crate::denoiser::Denoiser;
use crate::error::Result;
use crate::process::Sde;
use crate::rng::NoiseStreams;

use super::{
    final_denoise, lin, noise_like, predict_at, reverse_drift, Observer, SampleOutput, Sampler, StepEvent,
};

/// Euler–Maruyama on the reverse-time SDE.
#[derive(Clone, Debug)]
pub struct EulerMaruyama {
    /// The process.
    pub sde: Sde,
    /// The time grid, decreasing from t_max to t_eps.
    pub times: Vec<f64>,
    /// Multiplies the noise term (1 = correct; 0 drops it — exists so tests can show the
    /// oracle check detects a dropped noise term).
    pub noise_scale: f64,
}

impl EulerMaruyama {
    /// Euler–Maruyama on `sde` over `times` (decreasing).
    pub fn new(sde: Sde, times: Vec<f64>) -> Self {
        EulerMaruyama {
            sde,
            times,
            noise_scale: 1.0,
        }
    }
}

impl Sampler for EulerMaruyama {
    fn name(&self) -> &'static str {
        "euler-maruyama"
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
            let dt = s - t;
            let (x0, eps) = predict_at(den, sde, &x, t)?;
            nfe += 1;
            let drift = reverse_drift(sde, t, &x, &eps, 1.0)?;
            let z = noise_like(noise, &x)?;
            let x_mean = lin(1.0, &x, dt, &drift)?;
            x = lin(
                1.0,
                &x_mean,
                self.noise_scale * sde.diffusion(t) * (-dt).sqrt(),
                &z,
            )?;
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
            level: crate::denoiser::NoiseLevel::new(1.0, 0.0),
            x: &x0,
            x0_pred: Some(&x0),
        })?;
        Ok(SampleOutput { x: x0, nfe })
    }
}

/// The registry's declaration of `euler-maruyama`.
pub const SPEC: SamplerSpec = SamplerSpec {
    name: "euler-maruyama",
    about: "the reverse-time SDE by Euler–Maruyama (Song et al. 2021, eq. 6)",
    processes: CONTINUOUS,
    default_steps: |_| 1000,
    adaptive: false,
    default_steps_doc: "1000",
    options: &[Opt::Spacing],
    stochastic: true,
    build: |process, steps, o| {
        let sde = continuous(process)?;
        let times = sde.time_grid(steps.unwrap_or(1), time_grid(&sde, &o.spacing)?)?;
        Ok(Box::new(EulerMaruyama::new(sde, times)))
    },
};
