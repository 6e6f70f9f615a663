//! Likelihood terms of a DDPM and the full variational bound, in nats and bits per dimension.
//!
//! The negative log-likelihood is bounded by (Ho et al. 2020, eq. 5)
//!
//! ```text
//! -log p(x_0) <= L = L_T + sum_{t=2..T} L_{t-1} + L_0
//! L_T     = KL(q(x_T | x_0) || N(0, I))
//! L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)),   x_t ~ q(x_t | x_0)
//! L_0     = -log p(x_0 | x_1),                                x_1 ~ q(x_1 | x_0)
//! ```
//!
//! Each `L_{t-1}` is estimated with one draw of `x_t` per image, as improved-diffusion's
//! `calc_bpd_loop` does; bits per dimension are nats divided by `D ln 2` (`D` = values per image).
//! The helpers follow improved-diffusion's `losses.py` (a port of Ho et al.'s `diffusion_tf`),
//! except that the normal CDF is the exact one (see [`standard_normal_cdf`]).

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::denoiser::{per_sample, Denoiser};
use crate::error::{Error, Result};
use crate::forward::{check_same_shape, noise_levels, q_mean_variance, q_sample};
use crate::posterior::{posterior_mean_variance, reverse_mean_variance, ClipX0, ReverseVariance};
use crate::rng::NoiseStreams;
use crate::schedule::Schedule;

/// Half the width of one of the 256 bins that 8-bit data scaled to `[-1, 1]` falls in: the
/// levels are `x = 2k/255 - 1`, so a bin is `[x - 1/255, x + 1/255]` (Ho et al. 2020, eq. 13).
pub const BIN_HALF_WIDTH: f64 = 1.0 / 255.0;

/// Probabilities and densities below this are clamped to it before the log
/// (improved-diffusion's `clamp(min=1e-12)`): a bin more than ~7 standard deviations from the
/// mean costs at most `-ln(1e-12) = 27.6` nats instead of infinity.
pub const LOG_PROB_FLOOR: f64 = 1e-12;

/// KL divergence between diagonal Gaussians, elementwise, in nats
/// (Ho et al. 2020, sec. 3.3; improved-diffusion `normal_kl`):
///
/// ```text
/// KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)))
///   = 0.5 * (-1 + logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 * exp(-logvar2))
/// ```
///
/// The four tensors broadcast against each other (a `[B, 1, 1, 1]` per-sample log-variance, a
/// `[]` scalar for the standard normal); they must share a dtype.
pub fn normal_kl(mean1: &Tensor, logvar1: &Tensor, mean2: &Tensor, logvar2: &Tensor) -> Result<Tensor> {
    let d2 = mean1.broadcast_sub(mean2)?.sqr()?;
    let lv_diff = logvar1.broadcast_sub(logvar2)?;
    // exp(lv1 - lv2) - (lv1 - lv2) - 1 >= 0: the variance part.
    let var_part = (lv_diff.exp()? - lv_diff)?.affine(1.0, -1.0)?;
    let mean_part = d2.broadcast_mul(&logvar2.neg()?.exp()?)?;
    Ok(mean_part.broadcast_add(&var_part)?.affine(0.5, 0.0)?)
}

/// The standard normal CDF, exactly: `Phi(x) = 0.5 * (1 + erf(x / sqrt(2)))`.
///
/// The discretized likelihood uses this rather than improved-diffusion's tanh approximation
/// ([`approx_standard_normal_cdf`]): candle has an exact `erf` (libm's in f64), it costs no more
/// than `tanh`, and the approximation's error (up to 1.8e-4 absolute, near `|x| = 2.6`) would
/// be a modelling error of our own. Differences from numbers published with the approximation
/// are far below the bound's Monte Carlo noise.
pub fn standard_normal_cdf(x: &Tensor) -> Result<Tensor> {
    Ok(x.affine(std::f64::consts::FRAC_1_SQRT_2, 0.0)?
        .erf()?
        .affine(0.5, 0.5)?)
}

/// improved-diffusion's fast approximation of the standard normal CDF (the GELU-style tanh form):
/// `0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))`. Its largest absolute error against
/// [`standard_normal_cdf`] is 1.79e-4, at `|x| = 2.59`. Kept for comparison with that code base.
pub fn approx_standard_normal_cdf(x: &Tensor) -> Result<Tensor> {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let inner = (x + x.powf(3.0)?.affine(0.044715, 0.0)?)?;
    Ok(inner.affine(c, 0.0)?.tanh()?.affine(0.5, 0.5)?)
}

/// Elementwise log-probability, in nats, of 8-bit data under a Gaussian discretized to its 256
/// bins (Ho et al. 2020, eq. 13; improved-diffusion `discretized_gaussian_log_likelihood`):
///
/// ```text
/// p(x) = Phi((x + 1/255 - mean) / scale) - Phi((x - 1/255 - mean) / scale)   interior bins
///      = Phi((x + 1/255 - mean) / scale)                                     x < -0.999 (x = -1)
///      = 1 - Phi((x - 1/255 - mean) / scale)                                 x > 0.999  (x = 1)
/// ```
///
/// so the edge bins are open-ended and the 256 probabilities sum to one for any mean and scale.
/// `x` must be the levels `2k/255 - 1` (uint8 data scaled to `[-1, 1]`) and `means` shaped like
/// it; `log_scales` (`ln` of the standard deviation) broadcasts against it. Each probability is
/// clamped to [`LOG_PROB_FLOOR`] before the log, as improved-diffusion does.
pub fn discretized_gaussian_log_likelihood(
    x: &Tensor,
    means: &Tensor,
    log_scales: &Tensor,
) -> Result<Tensor> {
    check_same_shape("means", means, x)?;
    let centered = (x - means)?;
    let inv_stdv = log_scales.neg()?.exp()?;
    let plus_in = centered.affine(1.0, BIN_HALF_WIDTH)?.broadcast_mul(&inv_stdv)?;
    let min_in = centered.affine(1.0, -BIN_HALF_WIDTH)?.broadcast_mul(&inv_stdv)?;
    let cdf_plus = standard_normal_cdf(&plus_in)?;
    let cdf_min = standard_normal_cdf(&min_in)?;
    let log_cdf_plus = cdf_plus.maximum(LOG_PROB_FLOOR)?.log()?;
    let log_one_minus_cdf_min = cdf_min.affine(-1.0, 1.0)?.maximum(LOG_PROB_FLOOR)?.log()?;
    let log_cdf_delta = (cdf_plus - cdf_min)?.maximum(LOG_PROB_FLOOR)?.log()?;
    let upper = x.gt(0.999)?.where_cond(&log_one_minus_cdf_min, &log_cdf_delta)?;
    Ok(x.lt(-0.999)?.where_cond(&log_cdf_plus, &upper)?)
}

/// Elementwise log-density, in nats, of continuous data under a Gaussian:
/// `ln N(x; mean, exp(log_scale)^2) = -0.5 ln(2 pi) - log_scale - 0.5 ((x - mean) / exp(log_scale))^2`.
/// `log_scales` broadcasts against `x`.
pub fn gaussian_log_likelihood(x: &Tensor, means: &Tensor, log_scales: &Tensor) -> Result<Tensor> {
    check_same_shape("means", means, x)?;
    let z2 = (x - means)?.broadcast_mul(&log_scales.neg()?.exp()?)?.sqr()?;
    let half_ln_2pi = 0.5 * (2.0 * std::f64::consts::PI).ln();
    Ok(z2.affine(-0.5, -half_ln_2pi)?.broadcast_sub(log_scales)?)
}

/// How `L_0 = -log p(x_0 | x_1)` is computed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decoder {
    /// 8-bit data scaled to `[-1, 1]`: the probability of the data's bin under
    /// `N(mu_theta(x_1, 1), sigma_1^2 I)` with `sigma_1^2` from the [`ReverseVariance`]
    /// (Ho et al. 2020, eq. 13; [`discretized_gaussian_log_likelihood`]). The bound is then on
    /// the discrete negative log-likelihood, the number papers report in bits/dim.
    #[default]
    Discretized,
    /// Continuous data (e.g. 2-D toy sets): the density `N(x_0; mu_theta(x_1, 1), beta_1 I)`.
    /// The variance is `beta_1`, the reverse variance of a smooth density to first order
    /// (Ho et al. 2020, sec. 3.2, `sigma_t^2 = beta_t` at `t = 1`), not the `beta~_2` that
    /// improved-diffusion picked for the discretized decoder: `beta~_2` is about `beta_1 / 2`
    /// when many steps are used, and the decoder alone then keeps the bound above the true
    /// value by up to `0.5 (2 - 1 - ln 2) = 0.15` nats per dimension however large T is (0.13
    /// for N(0.3, 0.5^2) data, cosine schedule, T = 1000, against 0.0006 with `beta_1`: see
    /// `tests/gaussian_bound.rs`). The bound is then on the differential entropy.
    Gaussian,
}

impl Decoder {
    /// The canonical name: `discretized` or `gaussian`.
    pub fn name(&self) -> &'static str {
        match self {
            Decoder::Discretized => "discretized",
            Decoder::Gaussian => "gaussian",
        }
    }

    /// Parses `discretized` or `gaussian` (also `continuous`).
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "discretized" | "discrete" => Ok(Decoder::Discretized),
            "gaussian" | "continuous" => Ok(Decoder::Gaussian),
            other => Err(Error::param(
                "decoder",
                format!("unknown decoder '{other}', expected discretized or gaussian"),
            )),
        }
    }
}

/// Settings of [`variational_bound`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BoundConfig {
    /// The fixed reverse-process variance `sigma_t^2`.
    pub variance: ReverseVariance,
    /// Clip of the predicted `x_0` (off by default; improved-diffusion's bits/dim uses `DataRange`).
    pub clip_x0: ClipX0,
    /// The decoder of `L_0`.
    pub decoder: Decoder,
    /// Seed of the noise that draws every `x_t`.
    pub seed: u64,
    /// Index of the batch's first image in the data set: image `j` of the batch draws its noise
    /// from stream `first_index + j` of `seed`, so its bound does not depend on the batch.
    pub first_index: u64,
}

impl Default for BoundConfig {
    fn default() -> Self {
        BoundConfig {
            variance: ReverseVariance::Small,
            clip_x0: ClipX0::Off,
            decoder: Decoder::Discretized,
            seed: 0,
            first_index: 0,
        }
    }
}

/// The terms of the bound for one image (or their mean over images), all in one unit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BoundTerms {
    /// `L_T`, the prior term `KL(q(x_T | x_0) || N(0, I))` (capital T: the last step).
    pub l_t: f64,
    /// `sum_{t=2..T} L_{t-1}`, the denoising KL terms.
    pub l_sum: f64,
    /// `L_0`, the decoder's negative log-likelihood.
    pub l_0: f64,
    /// `l_t + l_sum + l_0`.
    pub total: f64,
}

impl BoundTerms {
    fn new(l_t: f64, l_sum: f64, l_0: f64) -> Self {
        BoundTerms {
            l_t,
            l_sum,
            l_0,
            total: l_t + l_sum + l_0,
        }
    }

    fn scaled(&self, c: f64) -> Self {
        BoundTerms::new(self.l_t * c, self.l_sum * c, self.l_0 * c)
    }

    /// The termwise mean of `terms` (all zero for an empty slice).
    pub fn mean(terms: &[BoundTerms]) -> BoundTerms {
        let n = terms.len().max(1) as f64;
        let sum = |f: fn(&BoundTerms) -> f64| terms.iter().map(f).sum::<f64>() / n;
        BoundTerms::new(sum(|b| b.l_t), sum(|b| b.l_sum), sum(|b| b.l_0))
    }
}

/// The bound of one image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageBound {
    /// The terms in nats (for the whole image).
    pub nats: BoundTerms,
    /// The terms in bits per dimension (nats / (D ln 2)).
    pub bits_per_dim: BoundTerms,
    /// The per-step terms in nats, index `i` for step `t = i + 1`: `L_0` at index 0 and
    /// `L_{t-1}` at index `t - 1 >= 1` (length T).
    pub per_step_nats: Vec<f64>,
}

/// The variational bound of a batch of images.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VariationalBound {
    /// `D`, the number of values per image.
    pub dims: usize,
    /// One entry per image, in batch order.
    pub images: Vec<ImageBound>,
}

impl VariationalBound {
    /// The mean over images of the terms in nats.
    pub fn mean_nats(&self) -> BoundTerms {
        BoundTerms::mean(&self.images.iter().map(|b| b.nats).collect::<Vec<_>>())
    }

    /// The mean over images of the terms in bits per dimension.
    pub fn mean_bits_per_dim(&self) -> BoundTerms {
        BoundTerms::mean(&self.images.iter().map(|b| b.bits_per_dim).collect::<Vec<_>>())
    }
}

/// Sum over every dimension but the first: `[B, ...] -> B` values (also for `[B]`).
fn sum_per_image(t: &Tensor) -> Result<Vec<f64>> {
    let b = t.dim(0)?;
    let per = t.elem_count() / b.max(1);
    Ok(t.reshape((b, per))?
        .sum(1)?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?)
}

/// Checks that `x0` holds 8-bit levels `2k/255 - 1`, as the discretized decoder assumes.
fn check_8bit_levels(x0: &Tensor) -> Result<()> {
    let k = x0.to_dtype(DType::F64)?.affine(127.5, 127.5)?;
    let flat = k.flatten_all()?;
    let (lo, hi) = (flat.min(0)?.to_scalar::<f64>()?, flat.max(0)?.to_scalar::<f64>()?);
    // f32 data: k is off an integer by at most 255 * 6e-8; 1e-3 is far from any other value.
    let off = (&flat - flat.round()?)?.abs()?.max(0)?.to_scalar::<f64>()?;
    if !(lo >= -1e-3 && hi <= 255.0 + 1e-3 && off <= 1e-3) {
        return Err(Error::param(
            "x0",
            format!(
                "the discretized decoder needs 8-bit data scaled to [-1, 1] (x = 2k/255 - 1, \
                 k = 0..255); found values in [{:.6}, {:.6}] up to {off:.3} levels off the grid \
                 (use the gaussian decoder for continuous data)",
                lo / 127.5 - 1.0,
                hi / 127.5 - 1.0
            ),
        ));
    }
    Ok(())
}

/// The full variational bound `L_T + sum_{t=2..T} L_{t-1} + L_0` (Ho et al. 2020, eq. 5 and 13)
/// of a batch `x0` (`[B, ...]`) under the reverse process of `denoiser` on `schedule`.
///
/// For each `t = T, ..., 1` every image draws `x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps`
/// with `eps` from its own noise stream (`config.seed`, stream `config.first_index + j`); the
/// model's step is `p(x_{t-1} | x_t) = N(mu~_t(x_t, clip(x0_pred)), sigma_t^2 I)` with `x0_pred`
/// from the denoiser (one call per `t`, `T` calls in all) and `sigma_t^2` from
/// `config.variance`; then `L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))` for
/// `t >= 2` and `L_0 = -log p(x_0 | x_1)` by `config.decoder`. `L_T` is exact:
/// `KL(N(sqrt(alpha_bar_T) x_0, (1 - alpha_bar_T) I) || N(0, I))`.
///
/// The denoiser sees `x_t` in `x0`'s dtype; the terms are computed and summed in f64.
/// `progress(t)` is called after each step, `T` times, with `t = T, T-1, ..., 1`.
pub fn variational_bound(
    denoiser: &dyn Denoiser,
    schedule: &Schedule,
    x0: &Tensor,
    config: &BoundConfig,
    progress: &mut dyn FnMut(usize),
) -> Result<VariationalBound> {
    let batch = x0.dim(0)?;
    let dims = x0.elem_count() / batch.max(1);
    if batch == 0 || dims == 0 {
        return Err(Error::param(
            "x0",
            format!("expected a non-empty batch [B, ...], got shape {:?}", x0.dims()),
        ));
    }
    if config.decoder == Decoder::Discretized {
        check_8bit_levels(x0)?;
    }
    let t_max = schedule.timesteps();
    let x0_64 = x0.to_dtype(DType::F64)?;
    let sample_shape = x0.dims().to_vec();
    let mut streams = NoiseStreams::new(config.seed, config.first_index, batch);
    let mut per_step = vec![vec![0.0; t_max]; batch];

    for i in (0..t_max).rev() {
        let t_index = vec![i; batch];
        let noise = Tensor::from_vec(streams.normal_rows(dims), sample_shape.as_slice(), x0.device())?;
        let x_t = q_sample(schedule, &x0_64, &t_index, &noise)?;
        let x0_pred = denoiser.predict_x0(&x_t.to_dtype(x0.dtype())?, &noise_levels(schedule, &t_index)?)?;
        check_same_shape("denoiser output", &x0_pred, x0)?;
        let x0_pred = x0_pred.to_dtype(DType::F64)?;
        let (model_mean, model_logvar) = reverse_mean_variance(
            schedule,
            &x0_pred,
            &x_t,
            &t_index,
            config.variance,
            config.clip_x0,
        )?;
        let terms = if i == 0 {
            let ll = match config.decoder {
                Decoder::Discretized => {
                    let log_scale: Vec<f64> = model_logvar.iter().map(|lv| 0.5 * lv).collect();
                    discretized_gaussian_log_likelihood(
                        &x0_64,
                        &model_mean,
                        &per_sample(&log_scale, &x0_64)?,
                    )?
                }
                Decoder::Gaussian => {
                    let log_scale = vec![0.5 * schedule.beta[0].ln(); batch];
                    gaussian_log_likelihood(&x0_64, &model_mean, &per_sample(&log_scale, &x0_64)?)?
                }
            };
            sum_per_image(&ll.neg()?)?
        } else {
            let (true_mean, _, true_logvar) = posterior_mean_variance(schedule, &x0_64, &x_t, &t_index)?;
            let kl = normal_kl(
                &true_mean,
                &per_sample(&true_logvar, &x0_64)?,
                &model_mean,
                &per_sample(&model_logvar, &x0_64)?,
            )?;
            sum_per_image(&kl)?
        };
        if let Some(j) = terms.iter().position(|v| !v.is_finite()) {
            return Err(Error::Numerical(format!(
                "the variational bound term at t = {} of image {} is {}: the denoiser's output \
                 or the data holds NaN or infinity",
                i + 1,
                config.first_index + j as u64,
                terms[j]
            )));
        }
        for (row, v) in per_step.iter_mut().zip(terms) {
            row[i] = v;
        }
        progress(i + 1);
    }

    let (prior_mean, _, prior_logvar) = q_mean_variance(schedule, &x0_64, &vec![t_max - 1; batch])?;
    let zero = Tensor::zeros((), DType::F64, x0.device())?;
    let l_t = sum_per_image(&normal_kl(
        &prior_mean,
        &per_sample(&prior_logvar, &x0_64)?,
        &zero,
        &zero,
    )?)?;

    let to_bpd = 1.0 / (dims as f64 * std::f64::consts::LN_2);
    let mut images = Vec::with_capacity(batch);
    for (j, (steps, l_t)) in per_step.into_iter().zip(l_t).enumerate() {
        let nats = BoundTerms::new(l_t, steps[1..].iter().sum(), steps[0]);
        if !nats.total.is_finite() {
            return Err(Error::Numerical(format!(
                "the variational bound of image {} is not finite (L_T {}, sum L_t-1 {}, L_0 {})",
                config.first_index + j as u64,
                nats.l_t,
                nats.l_sum,
                nats.l_0
            )));
        }
        images.push(ImageBound {
            nats,
            bits_per_dim: nats.scaled(to_bpd),
            per_step_nats: steps,
        });
    }
    Ok(VariationalBound { dims, images })
}
