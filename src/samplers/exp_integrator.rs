//! Pieces shared by the exponential-integrator solvers (DPM-Solver, DPM-Solver++, UniPC, DEIS):
//! the phi functions, the model output each solver integrates (data or noise prediction, with
//! optional dynamic thresholding), and the check that a step count reaches the asked order.
//!
//! All of them solve the probability-flow ODE of `x_t = alpha_t x_0 + sigma_t eps` in
//! `lambda = ln(alpha / sigma)` (Lu et al. 2022, eq. 3.4 / Lu et al. 2022b, eq. 8):
//!
//! ```text
//! x_t = (alpha_t / alpha_s) x_s - alpha_t int_{lambda_s}^{lambda_t} e^{-lambda} eps(lambda) dlambda    (noise prediction)
//! x_t = (sigma_t / sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^{lambda} x_0(lambda) dlambda      (data prediction)
//! ```
//!
//! whose Taylor terms integrate to `phi_k(h) = sum_j h^j / (j + k)!` (`phi_1(h) = (e^h - 1)/h`,
//! `phi_{k+1}(h) = (phi_k(h) - 1/k!) / h`; Hochbruck & Ostermann 2010; UniPC eq. 5).

use candle_core::Tensor;

use crate::denoiser::{eps_from_x0, Denoiser, NoiseLevel};
use crate::error::{Error, Result};

use super::same_level;

/// `phi_n(x) = sum_{j >= 0} x^j / (j + n)!`, n >= 1: the series for |x| < 1 (no cancellation),
/// else the recursion `phi_{k+1} = (phi_k - 1/k!) / x` from `phi_0 = e^x` (relative error below
/// 1e-13 for n <= 4). `phi_n(-inf) = 0`.
pub fn phi(n: usize, x: f64) -> f64 {
    if x.abs() < 1.0 {
        // x^j / (j + n)!
        let mut term = 1.0;
        for k in 1..=n {
            term /= k as f64;
        }
        let mut sum = 0.0;
        for j in 0..40 {
            sum += term;
            term *= x / (j + n + 1) as f64;
            if term.abs() < 1e-18 * sum.abs() {
                break;
            }
        }
        sum
    } else {
        let mut p = x.exp_m1() / x; // phi_1
        let mut fact = 1.0; // 1/k! for k = 1
        for k in 1..n {
            p = (p - fact) / x;
            fact /= (k + 1) as f64;
        }
        if x == f64::NEG_INFINITY {
            0.0
        } else {
            p
        }
    }
}

/// Imagen's dynamic thresholding (Saharia et al. 2022, section 2.3; diffusers'
/// `_threshold_sample`): per sample, `s = clamp(quantile(|x_0|, ratio), 1, max)`, then
/// `x_0 <- clamp(x_0, -s, s) / s`. The quantile interpolates linearly between order statistics
/// (`torch.quantile`'s default), computed by one sort of each row.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Thresholding {
    /// `dynamic_thresholding_ratio` (0.995).
    pub ratio: f64,
    /// `sample_max_value` (1.0; with 1, thresholding is clipping to [-1, 1]).
    pub max: f64,
}

impl Default for Thresholding {
    fn default() -> Self {
        Thresholding {
            ratio: 0.995,
            max: 1.0,
        }
    }
}

impl Thresholding {
    /// Checks the ratio is in [0, 1] and the maximum positive.
    pub fn validate(&self) -> Result<()> {
        crate::error::check_range("dynamic_thresholding_ratio", self.ratio, (0.0, true), (1.0, true))?;
        crate::error::check_range("sample_max_value", self.max, (0.0, false), (f64::INFINITY, false))?;
        Ok(())
    }

    /// diffusers' `thresholding`, `dynamic_thresholding_ratio`, `sample_max_value` (None when off).
    pub fn from_scheduler_config(cfg: &crate::nets::scheduler_config::SchedulerConfig) -> Option<Self> {
        cfg.thresholding.then_some(Thresholding {
            ratio: cfg.dynamic_thresholding_ratio,
            max: cfg.sample_max_value,
        })
    }

    /// Thresholds a batch of x_0 predictions (shape `[B, ...]`).
    pub fn apply(&self, x0: &Tensor) -> Result<Tensor> {
        let b = x0.dim(0)?;
        let n = x0.elem_count() / b.max(1);
        let flat = x0.reshape((b, n))?.contiguous()?;
        let (sorted, _) = flat.abs()?.sort_last_dim(true)?;
        let pos = self.ratio * (n - 1) as f64;
        let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
        let frac = pos - lo as f64;
        let q = super::lin(
            1.0 - frac,
            &sorted.narrow(1, lo, 1)?,
            frac,
            &sorted.narrow(1, hi, 1)?,
        )?;
        // torch.clamp(s, min=1, max=max): the maximum wins when max < 1
        let s = q.maximum(1.0)?.minimum(self.max)?;
        let out = flat
            .broadcast_minimum(&s)?
            .broadcast_maximum(&s.neg()?)?
            .broadcast_div(&s)?;
        Ok(out.reshape(x0.shape())?)
    }
}

/// The denoiser's `(x_0, eps)` at `level` (one NFE), with x_0 thresholded when asked and eps
/// then recomputed from it, `eps = (x - alpha x_0) / sigma` (as diffusers' `convert_model_output`
/// does for its noise-prediction solvers).
pub fn model_x0_eps(
    den: &dyn Denoiser,
    x: &Tensor,
    level: NoiseLevel,
    thresholding: Option<&Thresholding>,
) -> Result<(Tensor, Tensor)> {
    let levels = same_level(level, x)?;
    let (x0, eps) = den.predict_x0_eps(x, &levels)?;
    match thresholding {
        None => Ok((x0, eps)),
        Some(th) => {
            let x0 = th.apply(&x0)?;
            let eps = if level.sigma > 0.0 {
                eps_from_x0(x, &x0, &levels)?
            } else {
                eps
            };
            Ok((x0, eps))
        }
    }
}

/// The error for an order that a step count never reaches: `orders` is the order each step
/// uses; `needs` the smallest step count that reaches `order` (None: none does).
pub fn check_order_reached(
    sampler: &str,
    order: usize,
    steps: usize,
    orders: &[usize],
    needs: Option<usize>,
) -> Result<()> {
    if orders.iter().copied().max().unwrap_or(0) >= order {
        return Ok(());
    }
    let shown: Vec<String> = orders.iter().map(|o| o.to_string()).collect();
    let need = match needs {
        Some(n) => format!("it needs at least {n} steps"),
        None => "no step count reaches it with these options".to_string(),
    };
    Err(Error::param(
        "steps",
        format!(
            "{sampler} of order {order} with {steps} steps never takes an order-{order} step (orders per step: {}; warm-up and lower_order_final lower them): {need}, or ask for a lower order",
            shown.join(", ")
        ),
    ))
}

/// The smallest step count (up to 64) whose order schedule reaches `order`.
pub fn min_steps_for(order: usize, schedule: impl Fn(usize) -> Vec<usize>) -> Option<usize> {
    (1..=64).find(|&k| schedule(k).into_iter().max().unwrap_or(0) >= order)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn phi_functions_by_hand() {
        // phi_1(1) = e - 1, phi_2(1) = e - 2, phi_3(1) = e - 5/2, at the series/recursion seam
        let e = std::f64::consts::E;
        for x in [1.0, 1.0 - 1e-12] {
            assert!((phi(1, x) - (e - 1.0)).abs() < 1e-11);
            assert!((phi(2, x) - (e - 2.0)).abs() < 1e-11);
            assert!((phi(3, x) - (e - 2.5)).abs() < 1e-11);
        }
        // small x: phi_3(x) = 1/6 + x/24 + O(x^2)
        assert!((phi(3, 1e-9) - (1.0 / 6.0 + 1e-9 / 24.0)).abs() < 1e-16);
        // x = -2 by the closed forms
        let x: f64 = -2.0;
        assert!((phi(1, x) - x.exp_m1() / x).abs() < 1e-15);
        assert!((phi(2, x) - (x.exp_m1() - x) / (x * x)).abs() < 1e-15);
        assert!((phi(3, x) - (x.exp_m1() - x - x * x / 2.0) / x.powi(3)).abs() < 1e-15);
        assert_eq!(phi(2, f64::NEG_INFINITY), 0.0);
    }

    #[test]
    fn thresholding_by_hand() {
        // row 0: |x| = 0, 1, 2, 3, 4; the 0.5-quantile is 2 -> clip to [-2, 2] and divide by 2
        // row 1: all |x| <= 1: s = 1 (clamped below), unchanged
        let x = Tensor::from_vec(
            vec![0.0, -1.0, 2.0, 3.0, -4.0, 0.5, -0.5, 0.25, 0.0, 1.0],
            (2, 5),
            &Device::Cpu,
        )
        .unwrap();
        let th = Thresholding {
            ratio: 0.5,
            max: 10.0,
        };
        let y = th.apply(&x).unwrap().to_vec2::<f64>().unwrap();
        assert_eq!(y[0], vec![0.0, -0.5, 1.0, 1.0, -1.0]);
        assert_eq!(y[1], vec![0.5, -0.5, 0.25, 0.0, 1.0]);
        // interpolated quantile: ratio 0.6 -> position 2.4 -> 2.4; max 2 caps it
        let th = Thresholding { ratio: 0.6, max: 2.0 };
        let y = th.apply(&x).unwrap().to_vec2::<f64>().unwrap();
        assert_eq!(y[0], vec![0.0, -0.5, 1.0, 1.0, -1.0]);
    }
}
