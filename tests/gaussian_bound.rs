//! The variational bound on Gaussian data, where the optimal reverse process is known.
//!
//! Data `x_0 ~ N(m, s^2 I)`. Under `q`, `x_t = a x_0 + sigma eps` with `a = sqrt(alpha_bar_t)`,
//! `sigma = sqrt(1 - alpha_bar_t)`, so `(x_0, x_t)` is jointly Gaussian and the optimal denoiser
//! is linear in `x_t`:
//!
//! ```text
//! E[x_0 | x_t]   = m + k (x_t - a m),   k = a s^2 / (a^2 s^2 + sigma^2)
//! Var[x_0 | x_t] = V_t = s^2 sigma^2 / (a^2 s^2 + sigma^2)
//! ```
//!
//! With that denoiser the model mean `mu~_t(x_t, E[x_0 | x_t])` is the exact mean of
//! `q(x_{t-1} | x_t)` (mu~ is linear in x_0), and every term's expectation over data and noise
//! has a closed form, per dimension:
//!
//! ```text
//! E[L_T]     = 0.5 (-1 - ln sigma_T^2 + sigma_T^2 + alpha_bar_T (m^2 + s^2))
//! E[L_{t-1}] = 0.5 (-1 + ln v_t - ln beta~_t + beta~_t / v_t + coef1_t^2 V_t / v_t)
//!              (coef1_t (x_0 - E[x_0 | x_t]) is mu~ minus the model mean; v_t the model variance)
//! E[L_0]     = 0.5 ln(2 pi v_1) + V_1 / (2 v_1)     (continuous Gaussian decoder, mean E[x_0 | x_1])
//! ```
//!
//! The bound is rigorous in expectation: `E_data[L] >= E_data[-ln p_model(x_0)] >= E_data[-ln p_data(x_0)]`
//! (the ELBO, then cross-entropy >= entropy), and `E_data[-ln p_data] = H = 0.5 ln(2 pi e s^2)` per
//! dimension. The gap `E[L] / D - H` must be positive and shrink as T grows.

use candle_core::{Device, Tensor};
use diffuse::denoiser::{per_sample, Denoiser, NoiseLevel, Prediction};
use diffuse::likelihood::{variational_bound, BoundConfig, Decoder};
use diffuse::posterior::ReverseVariance;
use diffuse::rng::Rng;
use diffuse::schedule::Schedule;

const M: f64 = 0.3;
const S: f64 = 0.5;

/// The exact posterior-mean denoiser for `x_0 ~ N(m, s^2 I)`, at any noise level (alpha, sigma).
struct GaussianOracle {
    m: f64,
    s: f64,
}

impl Denoiser for GaussianOracle {
    fn prediction(&self) -> Prediction {
        Prediction::X0
    }
    fn output(&self, x_t: &Tensor, levels: &[NoiseLevel]) -> diffuse::Result<Tensor> {
        let s2 = self.s * self.s;
        let k: Vec<f64> = levels
            .iter()
            .map(|l| l.alpha * s2 / (l.alpha * l.alpha * s2 + l.sigma * l.sigma))
            .collect();
        let c: Vec<f64> = levels
            .iter()
            .zip(&k)
            .map(|(l, k)| self.m * (1.0 - k * l.alpha))
            .collect();
        Ok(x_t
            .broadcast_mul(&per_sample(&k, x_t)?)?
            .broadcast_add(&per_sample(&c, x_t)?)?)
    }
}

/// Entropy of N(m, s^2) per dimension, nats.
fn entropy() -> f64 {
    0.5 * (2.0 * std::f64::consts::PI * std::f64::consts::E * S * S).ln()
}

/// Closed-form expected bound per dimension: (E[L_T], E[sum L_{t-1}], E[L_0]), with the reverse
/// variance `variance` for t >= 2 and decoder variance `v_1`.
fn expected_terms(s: &Schedule, variance: ReverseVariance, v_1: f64) -> (f64, f64, f64) {
    let t_max = s.timesteps();
    let s2 = S * S;
    let v_post = |i: usize| s2 * (1.0 - s.alpha_bar[i]) / (s.alpha_bar[i] * s2 + 1.0 - s.alpha_bar[i]);
    let sig2_t = 1.0 - s.alpha_bar[t_max - 1];
    let l_t = 0.5 * (-1.0 - sig2_t.ln() + sig2_t + s.alpha_bar[t_max - 1] * (M * M + s2));
    let l_sum = (1..t_max)
        .map(|i| {
            let lv = variance.log_variance(s, i).unwrap();
            let v = lv.exp();
            let bt = s.posterior_variance[i];
            0.5 * (-1.0 + lv - bt.ln() + bt / v + s.posterior_mean_coef1[i].powi(2) * v_post(i) / v)
        })
        .sum();
    let l_0 = 0.5 * (2.0 * std::f64::consts::PI * v_1).ln() + v_post(0) / (2.0 * v_1);
    (l_t, l_sum, l_0)
}

/// The expected gap E[L]/D - H for the cosine schedule, fixed-large variance and the Gaussian
/// decoder (variance beta_1), by closed form (f64, exact up to rounding ~1e-15):
///
/// | T    | E[L]/D - H (nats/dim) |
/// | ---- | --------------------- |
/// | 10   | 0.0568822             |
/// | 100  | 0.0060837             |
/// | 1000 | 0.0006120             |
///
/// (an independent numpy computation of the same expectations gives 0.056882154, 0.006083693,
/// 0.000611977)
///
/// positive and shrinking like 1/T (the per-step variance mismatch of sigma_t^2 = beta_t costs
/// O(beta_t^2)). The same closed form shows why the Gaussian decoder uses beta_1 rather than the
/// beta~_2 of improved-diffusion: with beta~_2 the gap stays at 0.128 nats/dim at T = 1000 (it
/// tends to 0.5 (1 - ln 2) = 0.153); and why fixed-small is not the choice for continuous data:
/// its gap is 0.40 nats/dim at T = 1000.
#[test]
fn expected_bound_exceeds_entropy_and_the_gap_shrinks_with_t() {
    let h = entropy();
    let mut gaps = Vec::new();
    for (t_max, want) in [
        (10usize, 0.056_882_154),
        (100, 0.006_083_693),
        (1000, 0.000_611_977),
    ] {
        let s = Schedule::named("cosine", t_max).unwrap();
        let (l_t, l_sum, l_0) = expected_terms(&s, ReverseVariance::Large, s.beta[0]);
        let gap = l_t + l_sum + l_0 - h;
        eprintln!("T = {t_max}: E[L_T] {l_t:.7} E[sum] {l_sum:.7} E[L_0] {l_0:.7} gap {gap:.7}");
        // the numpy values above, to their printed precision
        assert!((gap - want).abs() < 1e-9, "T = {t_max}: gap {gap}");
        gaps.push(gap);
        if t_max == 1000 {
            let clipped = expected_terms(&s, ReverseVariance::Large, s.posterior_variance[1]);
            let gap_clipped = clipped.0 + clipped.1 + clipped.2 - h;
            let small = expected_terms(&s, ReverseVariance::Small, s.beta[0]);
            let gap_small = small.0 + small.1 + small.2 - h;
            eprintln!("T = 1000: decoder beta~_2 gap {gap_clipped:.4}, fixed small gap {gap_small:.4}");
            assert!((gap_clipped - 0.128).abs() < 1e-3 && (gap_small - 0.402).abs() < 1e-3);
        }
    }
    assert!(gaps.iter().all(|&g| g > 0.0));
    // 1/T: each tenfold increase of T divides the gap by 9.35 and 9.94.
    assert!(gaps[0] / gaps[1] > 9.0 && gaps[1] / gaps[2] > 9.0, "{gaps:?}");
}

/// The library's bound (`variational_bound` with the exact denoiser above, fixed-large variance,
/// the Gaussian decoder) agrees with the closed form, and is above the exact negative
/// log-likelihood of the data.
///
/// B = 64 images of D = 512 values from N(0.3, 0.5^2), one seeded draw of x_t per image and t.
/// The statistic is g_j = L(x_0^j) - (-ln p_data(x_0^j)) per image: its mean over images, over D,
/// estimates the gap E[L]/D - H, and subtracting the data's own log-density removes the
/// data-to-data variance. The standard error is the sample standard deviation of g_j over
/// sqrt(B) over D. Measured (seeds fixed):
///
/// | T    | closed-form gap | Monte Carlo gap | standard error |
/// | ---- | --------------- | --------------- | -------------- |
/// | 10   | 0.05688         | 0.05967         | 0.00372        |
/// | 100  | 0.00608         | 0.01476         | 0.00534        |
/// | 1000 | 0.00061         | 0.00509         | 0.00595        |
///
/// Most of the standard error is L_0's: (x_0 - E[x_0 | x_1])^2 / (2 beta_1) is about half a
/// chi-square with one degree of freedom per value (sd 0.71), / sqrt(B D) = 0.0039; the
/// KL terms add the rest. (With B D four times larger the test takes four times longer and
/// the standard errors halve: 128 x 1024 gave 0.05476, 0.00361, -0.00005 +- 0.0022 to 0.0027.)
/// So Monte Carlo resolves the T = 10 gap but not the smaller ones; their values and the 1/T
/// decrease rest on the closed form, which this test ties to the library.
///
/// Asserted: the Monte Carlo gap within 4 standard errors of the closed form (the three checks together
/// raise a false alarm with probability ~2e-4; the seeds are fixed), and above -4 standard
/// errors (the bound holds); at T = 10 it is also more than 10 standard errors above 0.
#[test]
fn library_bound_on_gaussian_data_matches_closed_form() {
    let (b, d) = (64usize, 512usize);
    let mut rng = Rng::new(2024);
    let x0_v: Vec<f64> = (0..b * d).map(|_| M + S * rng.normal()).collect();
    let x0 = Tensor::from_vec(x0_v.clone(), (b, d), &Device::Cpu).unwrap();
    let nll_data: Vec<f64> = (0..b)
        .map(|j| {
            x0_v[j * d..(j + 1) * d]
                .iter()
                .map(|x| 0.5 * (2.0 * std::f64::consts::PI * S * S).ln() + (x - M).powi(2) / (2.0 * S * S))
                .sum()
        })
        .collect();
    let oracle = GaussianOracle { m: M, s: S };
    let h = entropy();
    for t_max in [10usize, 100, 1000] {
        let s = Schedule::named("cosine", t_max).unwrap();
        let config = BoundConfig {
            variance: ReverseVariance::Large,
            decoder: Decoder::Gaussian,
            seed: 77,
            ..BoundConfig::default()
        };
        let vb = variational_bound(&oracle, &s, &x0, &config, &mut |_| {}).unwrap();
        let g: Vec<f64> = vb
            .images
            .iter()
            .zip(&nll_data)
            .map(|(im, nll)| im.nats.total - nll)
            .collect();
        let mean = g.iter().sum::<f64>() / b as f64;
        let sd = (g.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (b - 1) as f64).sqrt();
        let (gap_mc, se) = (mean / d as f64, sd / (b as f64).sqrt() / d as f64);
        let (l_t, l_sum, l_0) = expected_terms(&s, ReverseVariance::Large, s.beta[0]);
        let gap = l_t + l_sum + l_0 - h;
        let n = vb.mean_nats();
        eprintln!(
            "T = {t_max}: gap closed {gap:.5} MC {gap_mc:.5} se {se:.5} | per dim L_T {:.5} ({l_t:.5}) sum {:.5} ({l_sum:.5}) L_0 {:.5} ({l_0:.5})",
            n.l_t / d as f64,
            n.l_sum / d as f64,
            n.l_0 / d as f64
        );
        assert!(
            (gap_mc - gap).abs() < 4.0 * se,
            "T = {t_max}: MC gap {gap_mc} vs {gap} (se {se})"
        );
        assert!(gap_mc > -4.0 * se, "T = {t_max}: bound below the entropy");
        if t_max == 10 {
            assert!(gap_mc > 10.0 * se, "T = 10: gap {gap_mc} not resolved (se {se})");
        }
    }
}
