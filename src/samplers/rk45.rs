//! An adaptive Dormand–Prince 5(4) integrator (Dormand & Prince 1980; Hairer, Nørsett & Wanner,
//! "Solving ODEs I", II.5, table 5.2), and the probability-flow ODE sampler built on it
//! (Score-SDE's `ode_sampler`, which calls scipy's `RK45` with rtol = atol = 1e-5).
//!
//! Every row of the batch is integrated with **its own** step size and error control (the
//! denoiser accepts one time per row), so a sample does not depend on the batch it is drawn with
//! (field notes, bug 9); scipy on the flattened batch would couple them. Error control as in
//! scipy: per-row RMS norm of `err / (atol + rtol max(|y|, |y_new|))` <= 1, step factor
//! `0.9 norm^(-1/5)` clipped to [0.2, 10] (no growth right after a rejection), initial step by
//! Hairer's heuristic (one extra evaluation). The NFE counts batched evaluations:
//! 2 + 6 per iteration (FSAL: the 7th stage is the next step's first).

use super::registry::{continuous, Opt, SamplerSpec, CONTINUOUS};
use candle_core::{DType, Tensor};

use crate::denoiser::{Denoiser, NoiseLevel};
use crate::error::{Error, Result};
use crate::process::Sde;
use crate::rng::NoiseStreams;

use super::{final_denoise, scale_rows, Observer, SampleOutput, Sampler, StepEvent};

// Dormand–Prince 5(4) tableau.
const C: [f64; 7] = [0.0, 1.0 / 5.0, 3.0 / 10.0, 4.0 / 5.0, 8.0 / 9.0, 1.0, 1.0];
const A: [&[f64]; 7] = [
    &[],
    &[1.0 / 5.0],
    &[3.0 / 40.0, 9.0 / 40.0],
    &[44.0 / 45.0, -56.0 / 15.0, 32.0 / 9.0],
    &[
        19372.0 / 6561.0,
        -25360.0 / 2187.0,
        64448.0 / 6561.0,
        -212.0 / 729.0,
    ],
    &[
        9017.0 / 3168.0,
        -355.0 / 33.0,
        46732.0 / 5247.0,
        49.0 / 176.0,
        -5103.0 / 18656.0,
    ],
    // the 5th-order solution's weights (FSAL: stage 7 is evaluated at it)
    &[
        35.0 / 384.0,
        0.0,
        500.0 / 1113.0,
        125.0 / 192.0,
        -2187.0 / 6784.0,
        11.0 / 84.0,
    ],
];
/// Error weights: 5th-order minus 4th-order weights (b - b*).
const E: [f64; 7] = [
    71.0 / 57600.0,
    0.0,
    -71.0 / 16695.0,
    71.0 / 1920.0,
    -17253.0 / 339200.0,
    22.0 / 525.0,
    -1.0 / 40.0,
];
const SAFETY: f64 = 0.9;
const MIN_FACTOR: f64 = 0.2;
const MAX_FACTOR: f64 = 10.0;

/// Tolerances and limits of [`integrate`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rk45Options {
    /// Relative tolerance (Score-SDE: 1e-5).
    pub rtol: f64,
    /// Absolute tolerance (Score-SDE: 1e-5).
    pub atol: f64,
    /// Steps (accepted + rejected) allowed per row before giving up.
    pub max_steps: usize,
}

impl Default for Rk45Options {
    fn default() -> Self {
        Rk45Options {
            rtol: 1e-5,
            atol: 1e-5,
            max_steps: 100_000,
        }
    }
}

impl Rk45Options {
    /// Checks that both tolerances are positive and finite.
    pub fn validate(&self) -> Result<()> {
        crate::error::check_range("rtol", self.rtol, (0.0, false), (1.0, true))?;
        crate::error::check_range("atol", self.atol, (0.0, false), (f64::INFINITY, false))?;
        Ok(())
    }
}

/// What [`integrate`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rk45Stats {
    /// Batched evaluations of the right-hand side.
    pub nfe: usize,
    /// Accepted steps per row.
    pub accepted: Vec<usize>,
    /// Rejected steps per row.
    pub rejected: Vec<usize>,
}

/// Per-row RMS of `v` (shape [B, n]).
fn row_rms(v: &Tensor) -> Result<Vec<f64>> {
    Ok(v.to_dtype(DType::F64)?.sqr()?.mean(1)?.sqrt()?.to_vec1::<f64>()?)
}

/// `sum_j coef_j * k_j` (skipping zero coefficients).
fn combo(coefs: &[f64], ks: &[Tensor]) -> Result<Tensor> {
    let mut acc: Option<Tensor> = None;
    for (c, k) in coefs.iter().zip(ks) {
        if *c == 0.0 {
            continue;
        }
        let term = k.affine(*c, 0.0)?;
        acc = Some(match acc {
            None => term,
            Some(a) => (a + term)?,
        });
    }
    match acc {
        Some(a) => Ok(a),
        None => Ok(ks[0].zeros_like()?),
    }
}

/// Called after every iteration of [`integrate`] with the iteration number, the rows' times
/// and the state.
pub type OnStep<'a> = &'a mut dyn FnMut(usize, &[f64], &Tensor) -> Result<()>;

/// Integrates `dy/dt = f(t, y)` for every row of `y0` (shape [B, n]) from `t0` to `t1`
/// (either direction). `f` receives one time per row. `on_step` is called after every
/// iteration with the iteration number, the rows' times and the state.
pub fn integrate(
    f: &mut dyn FnMut(&[f64], &Tensor) -> Result<Tensor>,
    y0: &Tensor,
    t0: f64,
    t1: f64,
    opts: &Rk45Options,
    on_step: OnStep,
) -> Result<(Tensor, Rk45Stats)> {
    opts.validate()?;
    let (b, _n) = y0.dims2()?;
    let span = (t1 - t0).abs();
    let dir = if t1 >= t0 { 1.0 } else { -1.0 };
    let mut stats = Rk45Stats {
        nfe: 0,
        accepted: vec![0; b],
        rejected: vec![0; b],
    };
    let mut t = vec![t0; b];
    let mut y = y0.clone();
    if span == 0.0 {
        return Ok((y, stats));
    }
    let mut k1 = f(&t, &y)?;
    stats.nfe += 1;

    // Initial step (Hairer et al. II.4; scipy's select_initial_step), per row.
    let sc0 = y.abs()?.affine(opts.rtol, opts.atol)?;
    let d0 = row_rms(&(&y / &sc0)?)?;
    let d1 = row_rms(&(&k1 / &sc0)?)?;
    let h0: Vec<f64> = d0
        .iter()
        .zip(&d1)
        .map(|(&a, &b)| if a < 1e-5 || b < 1e-5 { 1e-6 } else { 0.01 * a / b }.min(span))
        .collect();
    let y_probe = (&y + scale_rows(&k1, &h0.iter().map(|h| dir * h).collect::<Vec<_>>())?)?;
    let t_probe: Vec<f64> = h0.iter().map(|h| t0 + dir * h).collect();
    let k_probe = f(&t_probe, &y_probe)?;
    stats.nfe += 1;
    let d2 = row_rms(&((&k_probe - &k1)? / &sc0)?)?;
    let mut h: Vec<f64> = (0..b)
        .map(|i| {
            let d = d1[i].max(d2[i] / h0[i]);
            let h1 = if d <= 1e-15 {
                (h0[i] * 1e-3).max(1e-6)
            } else {
                (0.01 / d).powf(0.2)
            };
            (100.0 * h0[i]).min(h1).min(span)
        })
        .collect();
    let mut done = vec![false; b];
    let mut last_rejected = vec![false; b];
    let mut iter = 0;
    while done.iter().any(|d| !d) {
        iter += 1;
        // signed step per row; rows that are done stand still
        let step: Vec<f64> = (0..b)
            .map(|i| {
                if done[i] {
                    0.0
                } else if (t[i] + dir * h[i] - t1) * dir >= 0.0 {
                    t1 - t[i]
                } else {
                    dir * h[i]
                }
            })
            .collect();
        let mut ks = vec![k1.clone()];
        for s in 1..7 {
            let ys = (&y + scale_rows(&combo(A[s], &ks)?, &step)?)?;
            let ts: Vec<f64> = (0..b).map(|i| t[i] + C[s] * step[i]).collect();
            ks.push(f(&ts, &ys)?);
            stats.nfe += 1;
        }
        let y5 = (&y + scale_rows(&combo(A[6], &ks)?, &step)?)?;
        let err = scale_rows(&combo(&E, &ks)?, &step)?;
        let sc = y.abs()?.maximum(&y5.abs()?)?.affine(opts.rtol, opts.atol)?;
        let norm = row_rms(&(err / sc)?)?;
        let mut accept = vec![0.0; b];
        for i in 0..b {
            if done[i] {
                continue;
            }
            if !norm[i].is_finite() {
                return Err(Error::Numerical(format!(
                    "RK45: the error estimate of row {i} at t = {} is not finite",
                    t[i]
                )));
            }
            let factor = if norm[i] == 0.0 {
                MAX_FACTOR
            } else {
                (SAFETY * norm[i].powf(-0.2)).clamp(MIN_FACTOR, MAX_FACTOR)
            };
            if norm[i] <= 1.0 {
                accept[i] = 1.0;
                stats.accepted[i] += 1;
                let landed = (t[i] + step[i] - t1) * dir >= 0.0 || step[i] == t1 - t[i];
                t[i] = if landed { t1 } else { t[i] + step[i] };
                done[i] = t[i] == t1;
                h[i] *= if last_rejected[i] { factor.min(1.0) } else { factor };
                last_rejected[i] = false;
            } else {
                stats.rejected[i] += 1;
                h[i] = step[i].abs() * factor.min(1.0);
                last_rejected[i] = true;
            }
            if stats.accepted[i] + stats.rejected[i] > opts.max_steps {
                return Err(Error::Numerical(format!(
                    "RK45: row {i} needed more than {} steps (stuck at t = {}, step {:e}); loosen rtol/atol",
                    opts.max_steps, t[i], h[i]
                )));
            }
        }
        let mask = Tensor::from_vec(accept, (b, 1), y.device())?.to_dtype(y.dtype())?;
        y = (&y + (&y5 - &y)?.broadcast_mul(&mask)?)?;
        let k7 = ks.pop().unwrap_or_else(|| k1.clone());
        k1 = (&k1 + (k7 - &k1)?.broadcast_mul(&mask)?)?;
        on_step(iter, &t, &y)?;
    }
    Ok((y, stats))
}

/// The probability-flow ODE integrated by adaptive RK45 from t_max to t_eps, then one
/// denoising step. NFE = the integrator's + 1.
#[derive(Clone, Debug)]
pub struct OdeRk45 {
    /// The process.
    pub sde: Sde,
    /// Tolerances.
    pub options: Rk45Options,
}

impl Sampler for OdeRk45 {
    fn name(&self) -> &'static str {
        "ode-rk45"
    }

    fn prior_std(&self) -> f64 {
        self.sde.prior_std()
    }

    fn sample(
        &self,
        den: &dyn Denoiser,
        x: Tensor,
        _noise: &mut NoiseStreams,
        observer: &mut dyn Observer,
    ) -> Result<SampleOutput> {
        let sde = &self.sde;
        let shape = x.shape().clone();
        let b = x.dim(0)?;
        let (t0, t1) = (sde.t_max(), sde.t_eps());
        observer.observe(&StepEvent {
            step: 0,
            t: t0,
            level: sde.level(t0),
            x: &x,
            x0_pred: None,
        })?;
        let mut f = |ts: &[f64], y: &Tensor| -> Result<Tensor> {
            let xs = y.reshape(&shape)?;
            let levels: Vec<NoiseLevel> = ts.iter().map(|&t| sde.level(t)).collect();
            let eps = den.predict_eps(&xs, &levels)?;
            // f(t) x + 1/2 g(t)^2 eps / sigma(t), row by row
            let fx: Vec<f64> = ts.iter().map(|&t| sde.drift_coef(t)).collect();
            let ge: Vec<f64> = ts
                .iter()
                .map(|&t| 0.5 * sde.diffusion(t).powi(2) / sde.level(t).sigma)
                .collect();
            let d = (scale_rows(&xs, &fx)? + scale_rows(&eps, &ge)?)?;
            Ok(d.reshape((b, ()))?)
        };
        let mut on_step = |iter: usize, ts: &[f64], y: &Tensor| -> Result<()> {
            let t = ts.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let xs = y.reshape(&shape)?;
            observer.observe(&StepEvent {
                step: iter,
                t,
                level: sde.level(ts[0]),
                x: &xs,
                x0_pred: None,
            })
        };
        let (y, stats) = integrate(&mut f, &x.reshape((b, ()))?, t0, t1, &self.options, &mut on_step)?;
        let x_end = y.reshape(&shape)?;
        let x0 = final_denoise(den, sde, &x_end, t1)?;
        observer.observe(&StepEvent {
            step: stats.accepted.iter().copied().max().unwrap_or(0) + 1,
            t: 0.0,
            level: NoiseLevel::new(1.0, 0.0),
            x: &x0,
            x0_pred: Some(&x0),
        })?;
        Ok(SampleOutput {
            x: x0,
            nfe: stats.nfe + 1,
        })
    }
}

/// The registry's declaration of `ode-rk45`.
pub const SPEC: SamplerSpec = SamplerSpec {
    name: "ode-rk45",
    about: "the probability-flow ODE by adaptive Dormand–Prince 5(4), per row",
    processes: CONTINUOUS,
    default_steps: |_| 0,
    adaptive: true,
    default_steps_doc: "adaptive",
    options: &[Opt::Rtol, Opt::Atol],
    stochastic: false,
    build: |process, _steps, o| {
        let sde = continuous(process)?;
        let options = Rk45Options {
            rtol: o.rtol.unwrap_or(1e-5),
            atol: o.atol.unwrap_or(1e-5),
            ..Default::default()
        };
        options.validate()?;
        Ok(Box::new(OdeRk45 { sde, options }))
    },
};

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn exponential_decay_to_tolerance_per_row() {
        // dy/dt = -k_i y, y(0) = 1 -> y(2) = exp(-2 k_i); rows with different k take different steps
        let ks = [0.5, 3.0, -1.0];
        let y0 = Tensor::from_vec(vec![1.0f64, 1.0, 1.0], (3, 1), &Device::Cpu).unwrap();
        let mut f = |_t: &[f64], y: &Tensor| -> Result<Tensor> { scale_rows(y, &ks.map(|k| -k)) };
        let opts = Rk45Options {
            rtol: 1e-8,
            atol: 1e-10,
            max_steps: 10_000,
        };
        let (y, stats) = integrate(&mut f, &y0, 0.0, 2.0, &opts, &mut |_, _, _| Ok(())).unwrap();
        let y = y.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for (i, k) in ks.iter().enumerate() {
            let want = (-2.0 * k).exp();
            // global error ~ a few times rtol * |y| for a 5th-order method with tolerance 1e-8
            assert!((y[i] - want).abs() < 1e-6 * want, "row {i}: {} vs {want}", y[i]);
        }
        assert!(stats.accepted[1] > stats.accepted[0], "{stats:?}");
        assert_eq!(
            stats.nfe,
            2 + 6
                * (stats
                    .accepted
                    .iter()
                    .zip(&stats.rejected)
                    .map(|(a, r)| a + r)
                    .max()
                    .unwrap())
        );
    }

    #[test]
    fn backwards_in_time_and_fifth_order() {
        // dy/dt = t^4 from t = 1 to 0: y(0) = y(1) - 1/5. A 5th-order method integrates
        // polynomials of degree 4 exactly: one step, error ~ rounding.
        let y0 = Tensor::from_vec(vec![1.0f64], (1, 1), &Device::Cpu).unwrap();
        let mut f = |t: &[f64], y: &Tensor| -> Result<Tensor> {
            Ok(Tensor::from_vec(vec![t[0].powi(4)], (1, 1), y.device())?)
        };
        let (y, _) = integrate(&mut f, &y0, 1.0, 0.0, &Rk45Options::default(), &mut |_, _, _| {
            Ok(())
        })
        .unwrap();
        let v = y.flatten_all().unwrap().to_vec1::<f64>().unwrap()[0];
        assert!((v - 0.8).abs() < 1e-13, "{v}");
        let bad = Rk45Options {
            rtol: 0.0,
            ..Default::default()
        };
        assert!(integrate(&mut f, &y0, 1.0, 0.0, &bad, &mut |_, _, _| Ok(())).is_err());
    }
}
