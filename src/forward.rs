//! The forward (noising) process of a discrete-time DDPM on batched tensors.
//!
//! ```text
//! q(x_t | x_{t-1}) = N(x_t; sqrt(1 - beta_t) x_{t-1}, beta_t I)            (Ho et al. 2020, eq. 2)
//! q(x_t | x_0)     = N(x_t; sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)    (Ho et al. 2020, eq. 4)
//! ```
//!
//! Tensors are batches `[B, ...]` (any dtype candle supports for arithmetic; f32 and f64 are
//! tested). Each row has its own step: `t_index[b]` is the schedule index of row `b`, and, as
//! everywhere in `diffuse`, **index `i` is step `t = i + 1`** (see [`crate::schedule`]). Per-row
//! scalars are broadcast over the other dimensions with [`per_sample`] (seed 003 Q14: a `[B]`
//! vector reshaped to `[B, 1, 1, ...]`). Noise is passed in, so every draw comes from the
//! caller's seeded [`crate::rng::NoiseStreams`].

use candle_core::Tensor;

use crate::denoiser::{per_sample, NoiseLevel};
use crate::error::{Error, Result};
use crate::schedule::Schedule;

/// Checks that `t_index` has one entry per row of a batch of `batch` and that every entry is a
/// valid index `0..T` of `schedule` (index `i` is step `t = i + 1`).
pub fn validate_t_index(schedule: &Schedule, t_index: &[usize], batch: usize) -> Result<()> {
    if t_index.len() != batch {
        return Err(Error::param(
            "t_index",
            format!(
                "got {} timestep indices for a batch of {batch} (one per row expected)",
                t_index.len()
            ),
        ));
    }
    let t_max = schedule.timesteps();
    if let Some((row, &i)) = t_index.iter().enumerate().find(|(_, &i)| i >= t_max) {
        return Err(Error::param(
            "t_index",
            format!(
                "index {i} at row {row} is out of range for a schedule of T = {t_max} steps \
                 (expected 0..={}, index i is step t = i + 1)",
                t_max - 1
            ),
        ));
    }
    Ok(())
}

/// `table[t_index[b]]` for every row `b` (indices already validated by [`validate_t_index`]).
pub(crate) fn gather(table: &[f64], t_index: &[usize]) -> Vec<f64> {
    t_index.iter().map(|&i| table[i]).collect()
}

/// Checks that `other` has the same shape and dtype as `x` (the error names both).
pub(crate) fn check_same_shape(what: &str, other: &Tensor, x: &Tensor) -> Result<()> {
    if other.dims() != x.dims() {
        return Err(Error::param(
            what,
            format!(
                "shape {:?} does not match the data's shape {:?}",
                other.dims(),
                x.dims()
            ),
        ));
    }
    if other.dtype() != x.dtype() {
        return Err(Error::param(
            what,
            format!(
                "dtype {:?} does not match the data's dtype {:?}",
                other.dtype(),
                x.dtype()
            ),
        ));
    }
    Ok(())
}

/// The noise level `(alpha, sigma) = (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t))` of each row:
/// what a [`crate::denoiser::Denoiser`] is told about `x_t`.
pub fn noise_levels(schedule: &Schedule, t_index: &[usize]) -> Result<Vec<NoiseLevel>> {
    validate_t_index(schedule, t_index, t_index.len())?;
    Ok(t_index
        .iter()
        .map(|&i| NoiseLevel::new(schedule.sqrt_alpha_bar[i], schedule.sqrt_one_minus_alpha_bar[i]))
        .collect())
}

/// A draw from `q(x_t | x_0)` in closed form (Ho et al. 2020, eq. 4):
///
/// ```text
/// x_t = sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * eps,   eps = noise ~ N(0, I)
/// ```
///
/// `x0` and `noise` are `[B, ...]` of the same shape; `t_index` has one index per row.
pub fn q_sample(schedule: &Schedule, x0: &Tensor, t_index: &[usize], noise: &Tensor) -> Result<Tensor> {
    validate_t_index(schedule, t_index, x0.dim(0)?)?;
    check_same_shape("noise", noise, x0)?;
    let signal = per_sample(&gather(&schedule.sqrt_alpha_bar, t_index), x0)?;
    let std = per_sample(&gather(&schedule.sqrt_one_minus_alpha_bar, t_index), x0)?;
    Ok((x0.broadcast_mul(&signal)? + noise.broadcast_mul(&std)?)?)
}

/// One step of the Markov chain, a draw from `q(x_t | x_{t-1})` (Ho et al. 2020, eq. 2):
///
/// ```text
/// x_t = sqrt(1 - beta_t) * x_{t-1} + sqrt(beta_t) * eps,   eps = noise ~ N(0, I)
/// ```
///
/// `t_index[b]` is the index of the step being taken (index `i` takes `x_i` to `x_{i+1}`).
pub fn q_step(schedule: &Schedule, x_prev: &Tensor, t_index: &[usize], noise: &Tensor) -> Result<Tensor> {
    validate_t_index(schedule, t_index, x_prev.dim(0)?)?;
    check_same_shape("noise", noise, x_prev)?;
    let alpha = gather(&schedule.alpha, t_index);
    let beta = gather(&schedule.beta, t_index);
    let signal = per_sample(&alpha.iter().map(|a| a.sqrt()).collect::<Vec<_>>(), x_prev)?;
    let std = per_sample(&beta.iter().map(|b| b.sqrt()).collect::<Vec<_>>(), x_prev)?;
    Ok((x_prev.broadcast_mul(&signal)? + noise.broadcast_mul(&std)?)?)
}

/// The mean, variance and log-variance of `q(x_t | x_0)` (Ho et al. 2020, eq. 4):
///
/// ```text
/// mean = sqrt(alpha_bar_t) * x_0,   variance = 1 - alpha_bar_t,   log_variance = ln(1 - alpha_bar_t)
/// ```
///
/// The mean is a tensor shaped like `x0`; variance and log-variance are one number per row
/// (the covariance is isotropic). The log is taken as `ln_1p(-alpha_bar_t)`, exact also where
/// `alpha_bar_t` is close to 1.
pub fn q_mean_variance(
    schedule: &Schedule,
    x0: &Tensor,
    t_index: &[usize],
) -> Result<(Tensor, Vec<f64>, Vec<f64>)> {
    validate_t_index(schedule, t_index, x0.dim(0)?)?;
    let signal = per_sample(&gather(&schedule.sqrt_alpha_bar, t_index), x0)?;
    let alpha_bar = gather(&schedule.alpha_bar, t_index);
    let variance = alpha_bar.iter().map(|a| 1.0 - a).collect();
    let log_variance = alpha_bar.iter().map(|a| (-a).ln_1p()).collect();
    Ok((x0.broadcast_mul(&signal)?, variance, log_variance))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f64], shape: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn q_sample_and_q_step_by_hand() {
        // A two-step schedule beta = (0.36, 0.19): alpha = (0.64, 0.81), alpha_bar = (0.64, 0.5184).
        let s = Schedule::from_betas(vec![0.36, 0.19]).unwrap();
        let x0 = t(&[1.0, -2.0, 0.5, 3.0], &[2, 2]);
        let eps = t(&[0.5, 1.0, -1.0, 2.0], &[2, 2]);
        // row 0 at t = 1: 0.8 * x0 + 0.6 * eps; row 1 at t = 2: 0.72 * x0 + sqrt(0.4816) * eps.
        let x_t = q_sample(&s, &x0, &[0, 1], &eps)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        let c = 0.4816f64.sqrt();
        let want = [[0.8 + 0.3, -1.6 + 0.6], [0.36 - c, 2.16 + 2.0 * c]];
        for (g, w) in x_t.iter().flatten().zip(want.iter().flatten()) {
            assert!((g - w).abs() < 1e-14, "{g} vs {w}");
        }
        // q_step at t = 2 (index 1): 0.9 * x_prev + sqrt(0.19) * eps.
        let x_next = q_step(&s, &x0, &[1, 1], &eps).unwrap().to_vec2::<f64>().unwrap();
        assert!((x_next[0][0] - (0.9 + 0.19f64.sqrt() * 0.5)).abs() < 1e-14);
        let (mean, var, logvar) = q_mean_variance(&s, &x0, &[1, 0]).unwrap();
        assert!((mean.to_vec2::<f64>().unwrap()[1][1] - 0.8 * 3.0).abs() < 1e-14);
        assert!((var[0] - 0.4816).abs() < 1e-15 && (var[1] - 0.36).abs() < 1e-15);
        assert!((logvar[0] - 0.4816f64.ln()).abs() < 1e-15);
    }

    #[test]
    fn works_in_f32() {
        let s = Schedule::named("linear", 1000).unwrap();
        let x0 = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        let eps = Tensor::new(&[[0f32, 0.0], [1.0, 1.0]], &Device::Cpu).unwrap();
        let x_t = q_sample(&s, &x0, &[0, 999], &eps)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        // alpha_bar_1 = 1 - 1e-4: sqrt = 0.99995
        assert!((x_t[0][0] - 0.99995).abs() < 1e-6);
        let ab = s.alpha_bar[999];
        assert!((x_t[1][0] as f64 - (3.0 * ab.sqrt() + (1.0 - ab).sqrt())).abs() < 1e-6);
    }

    #[test]
    fn bad_t_index_and_shapes_are_clear_errors() {
        let s = Schedule::named("linear", 10).unwrap();
        let x0 = t(&[0.0; 6], &[3, 2]);
        let e = q_sample(&s, &x0, &[0, 10, 1], &x0).unwrap_err().to_string();
        assert!(e.contains("index 10 at row 1") && e.contains("T = 10"), "{e}");
        let e = q_step(&s, &x0, &[0, 1], &x0).unwrap_err().to_string();
        assert!(e.contains("2 timestep indices for a batch of 3"), "{e}");
        let e = q_sample(&s, &x0, &[0, 1, 2], &t(&[0.0; 3], &[3, 1]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("noise") && e.contains("[3, 1]"), "{e}");
        let e = q_sample(
            &s,
            &x0,
            &[0, 1, 2],
            &x0.to_dtype(candle_core::DType::F32).unwrap(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("noise") && e.contains("dtype F32"), "{e}");
        assert!(noise_levels(&s, &[10]).is_err());
        let l = noise_levels(&s, &[3]).unwrap();
        assert_eq!(l[0].alpha, s.sqrt_alpha_bar[3]);
        assert_eq!(l[0].sigma, s.sqrt_one_minus_alpha_bar[3]);
    }
}
