//! The forward process and the posterior against exact answers: moments of many draws (with
//! tolerances from their standard errors), Gaussian conditioning done independently, the eps
//! form of the posterior mean (Ho et al. 2020, eq. 11), and golden one-step values
//! (`tests/golden/steps.json`, float64, cross-checked against diffusers) to relative 1e-9.

use candle_core::{DType, Device, Tensor};
use diffuse::forward::{q_sample, q_step};
use diffuse::posterior::{
    posterior_mean_from_eps, posterior_mean_variance, predict_eps_from_x0, predict_x0_from_eps, ClipX0,
};
use diffuse::rng::NoiseStreams;
use diffuse::schedule::Schedule;
use serde_json::Value;

const DEV: Device = Device::Cpu;

/// Column means and (population) variances of an `[N, D]` tensor.
fn column_moments(x: &Tensor) -> (Vec<f64>, Vec<f64>) {
    let rows = x.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
    let n = rows.len() as f64;
    let d = rows[0].len();
    let mean: Vec<f64> = (0..d)
        .map(|j| rows.iter().map(|r| r[j]).sum::<f64>() / n)
        .collect();
    let var = (0..d)
        .map(|j| rows.iter().map(|r| (r[j] - mean[j]).powi(2)).sum::<f64>() / n)
        .collect();
    (mean, var)
}

/// Iterating the one-step kernel q(x_t | x_{t-1}) t times (eq. 2) gives the closed form
/// q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) (eq. 4).
///
/// N = 10,000 chains per x_0 value, D = 4 values of x_0. For a Gaussian the standard error of
/// the sample mean is sqrt(var / N) and of the sample variance var * sqrt(2 / N) (1.4 % of var).
/// Each empirical moment (chain and closed form) must lie within 5 standard errors of the exact
/// moment, and the two empirical moments within 5 * sqrt(2) standard errors of each other
/// (128 comparisons at 5 sigma: a false alarm has probability ~1e-4; the seeds are fixed).
/// Breaking q_step (beta_t instead of sqrt(beta_t) as the noise scale) fails at t = 1 by 70
/// standard errors.
#[test]
fn iterated_one_step_kernel_equals_closed_form() {
    let n = 10_000;
    let x0_values = [-1.0f64, -0.3, 0.5, 1.0];
    let d = x0_values.len();
    let x0 = Tensor::from_vec(x0_values.repeat(n), (n, d), &DEV).unwrap();
    let checkpoints = [1usize, 10, 100, 1000];
    for kind in ["linear", "cosine"] {
        let s = Schedule::named(kind, 1000).unwrap();
        let mut chain_noise = NoiseStreams::new(1, 0, n);
        let mut closed_noise = NoiseStreams::new(2, 0, n);
        let mut x = x0.clone();
        for i in 0..1000 {
            let eps = chain_noise
                .randn(&[d], &DEV)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap();
            x = q_step(&s, &x, &vec![i; n], &eps).unwrap();
            let t = i + 1;
            if !checkpoints.contains(&t) {
                continue;
            }
            let eps = closed_noise
                .randn(&[d], &DEV)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap();
            let x_closed = q_sample(&s, &x0, &vec![i; n], &eps).unwrap();
            let (m_chain, v_chain) = column_moments(&x);
            let (m_closed, v_closed) = column_moments(&x_closed);
            let var = 1.0 - s.alpha_bar[i];
            let se_mean = (var / n as f64).sqrt();
            let se_var = var * (2.0 / n as f64).sqrt();
            for j in 0..d {
                let mean = s.sqrt_alpha_bar[i] * x0_values[j];
                let ctx = format!("{kind} t = {t} x0 = {}", x0_values[j]);
                for (what, m, v) in [
                    ("chain", m_chain[j], v_chain[j]),
                    ("closed", m_closed[j], v_closed[j]),
                ] {
                    assert!(
                        (m - mean).abs() < 5.0 * se_mean,
                        "{ctx} {what}: mean {m} vs {mean}"
                    );
                    assert!((v - var).abs() < 5.0 * se_var, "{ctx} {what}: var {v} vs {var}");
                }
                let k = 5.0 * 2f64.sqrt();
                assert!(
                    (m_chain[j] - m_closed[j]).abs() < k * se_mean,
                    "{ctx}: means differ"
                );
                assert!(
                    (v_chain[j] - v_closed[j]).abs() < k * se_var,
                    "{ctx}: variances differ"
                );
            }
        }
    }
}

/// x_T is close to N(0, I) for the default schedules: alpha_bar_T is tiny (4.0e-5 for linear,
/// below 1e-8 for cosine, whose last beta is capped at 0.999), so the mean sqrt(alpha_bar_T) x_0
/// is below 0.0064 |x_0| and the variance 1 - alpha_bar_T is 1 to 4e-5.
///
/// N = 20,000 rows with x_0 = +1 or -1 (alternating) in each of 4 columns: the sample mean of
/// each column is within 5 standard errors (5 / sqrt(N) = 0.035) of 0, the variance within
/// 5 * sqrt(2 / N) = 0.05 of 1, and the correlation between x_0 and x_T (exactly
/// sqrt(alpha_bar_T) <= 0.0064) within 5 / sqrt(N) of 0: x_T no longer depends on x_0.
#[test]
fn x_t_at_t_is_standard_normal_for_default_schedules() {
    let n = 20_000;
    let d = 4;
    let x0_rows: Vec<f64> = (0..n)
        .flat_map(|r| vec![if r % 2 == 0 { 1.0 } else { -1.0 }; d])
        .collect();
    let x0 = Tensor::from_vec(x0_rows.clone(), (n, d), &DEV).unwrap();
    for (kind, max_alpha_bar) in [("linear", 4.1e-5), ("cosine", 1e-8)] {
        let s = Schedule::named(kind, 1000).unwrap();
        let ab = s.alpha_bar[999];
        assert!(ab < max_alpha_bar, "{kind}: alpha_bar_T = {ab}");
        let eps = NoiseStreams::new(3, 0, n)
            .randn(&[d], &DEV)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let x_t = q_sample(&s, &x0, &vec![999; n], &eps).unwrap();
        let (mean, var) = column_moments(&x_t);
        let xs = x_t.to_vec2::<f64>().unwrap();
        let se = 1.0 / (n as f64).sqrt();
        for j in 0..d {
            assert!(mean[j].abs() < 5.0 * se, "{kind}: mean {}", mean[j]);
            assert!(
                (var[j] - 1.0).abs() < 5.0 * (2.0 / n as f64).sqrt(),
                "{kind}: var {}",
                var[j]
            );
            // x_0 has mean 0 and variance 1 here, so the correlation is E[x_0 x_T] / sd(x_T).
            let cov: f64 = (0..n).map(|r| x0_rows[r * d + j] * xs[r][j]).sum::<f64>() / n as f64;
            let corr = cov / var[j].sqrt();
            assert!(corr.abs() < 5.0 * se, "{kind}: corr(x_0, x_T) = {corr}");
        }
    }
}

fn rel_err(got: f64, want: f64) -> f64 {
    (got - want).abs() / want.abs().max(1e-300)
}

/// The posterior mean and variance of eq. 6-7 equal Gaussian conditioning of the joint
/// (x_{t-1}, x_t) given x_0, derived here independently:
/// x_{t-1} ~ N(sqrt(alpha_bar_{t-1}) x_0, 1 - alpha_bar_{t-1}), x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) eps,
/// so Cov(x_{t-1}, x_t) = sqrt(alpha_t) (1 - alpha_bar_{t-1}), Var(x_t) = 1 - alpha_bar_t, and
/// E[x_{t-1} | x_t] = sqrt(alpha_bar_{t-1}) x_0 + Cov / Var * (x_t - sqrt(alpha_bar_t) x_0),
/// Var[x_{t-1} | x_t] = (1 - alpha_bar_{t-1}) - Cov^2 / Var.
/// f64 rounding of these few operations is ~1e-15 relative; 1e-10 leaves room for the
/// cancellation in Var[x_{t-1} | x_t] at t = 2 (1e-4 - 0.5e-4) and still fails on any wrong term.
#[test]
fn posterior_equals_gaussian_conditioning() {
    for kind in ["linear", "cosine", "sigmoid"] {
        let s = Schedule::named(kind, 1000).unwrap();
        let t_index = [0usize, 1, 2, 49, 500, 998, 999];
        let b = t_index.len();
        let x0 = Tensor::from_vec(
            (0..b).map(|r| 0.9 - 0.3 * r as f64).collect::<Vec<_>>(),
            (b, 1),
            &DEV,
        )
        .unwrap();
        let x_t = Tensor::from_vec(
            (0..b).map(|r| -0.7 + 0.25 * r as f64).collect::<Vec<_>>(),
            (b, 1),
            &DEV,
        )
        .unwrap();
        let (mean, var, logvar) = posterior_mean_variance(&s, &x0, &x_t, &t_index).unwrap();
        let mean = mean.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let (x0v, xt_v) = (xtv(&x0), xtv(&x_t));
        for (r, &i) in t_index.iter().enumerate() {
            let ab_prev = if i == 0 { 1.0 } else { s.alpha_bar[i - 1] };
            let cov = s.alpha[i].sqrt() * (1.0 - ab_prev);
            let var_t = 1.0 - s.alpha_bar[i];
            let want_mean =
                ab_prev.sqrt() * x0v[r] + cov / var_t * (xt_v[r] - s.alpha_bar[i].sqrt() * x0v[r]);
            let want_var = (1.0 - ab_prev) - cov * cov / var_t;
            assert!(
                rel_err(mean[r], want_mean) < 1e-10,
                "{kind} t = {}: mean {} vs {want_mean}",
                i + 1,
                mean[r]
            );
            if i == 0 {
                // t = 1: the posterior is a point mass at x_0; the log-variance is clipped to ln beta~_2.
                assert_eq!(var[r], 0.0);
                assert!(want_var.abs() < 1e-18);
                assert_eq!(logvar[r], s.posterior_variance[1].ln());
            } else {
                assert!(
                    rel_err(var[r], want_var) < 1e-10,
                    "{kind} t = {}: var {} vs {want_var}",
                    i + 1,
                    var[r]
                );
                assert!((logvar[r] - want_var.ln()).abs() < 1e-10);
            }
        }
    }
}

fn xtv(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// The two forms of the posterior mean agree (seed 002): via x_0 (eq. 7) and via eps (eq. 11),
/// for x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, at every t of T = 1000 (one row
/// per t), in f64 and f32. The x_0 <-> eps conversions round-trip on the same data.
///
/// Tolerances: f64 rounding, amplified by 1/sqrt(alpha_bar_T) ~ 1e4 (cosine) in the x_0
/// round-trip, stays below 1e-10 for |values| < 6; in f32 (epsilon 1.2e-7) the eps form's
/// 1/sqrt(alpha_t) <= 32 times |x_t| + |eps| < 12 gives ~5e-5, so 2e-4; the f32 round-trip is
/// checked only for t <= 900, where 1/sqrt(alpha_bar_t) < 100.
#[test]
fn posterior_mean_two_forms_agree_and_conversions_round_trip() {
    let t_max = 1000;
    for kind in ["linear", "cosine"] {
        let s = Schedule::named(kind, t_max).unwrap();
        let t_index: Vec<usize> = (0..t_max).collect();
        let mut streams = NoiseStreams::new(7, 0, t_max);
        let x0 = streams
            .randn(&[3, 2], &DEV)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let eps = streams
            .randn(&[3, 2], &DEV)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        for dtype in [DType::F64, DType::F32] {
            let (x0, eps) = (x0.to_dtype(dtype).unwrap(), eps.to_dtype(dtype).unwrap());
            let x_t = q_sample(&s, &x0, &t_index, &eps).unwrap();
            let (mean_x0, _, _) = posterior_mean_variance(&s, &x0, &x_t, &t_index).unwrap();
            let mean_eps = posterior_mean_from_eps(&s, &x_t, &eps, &t_index).unwrap();
            let tol = if dtype == DType::F64 { 1e-10 } else { 2e-4 };
            let err = max_abs(&mean_x0, &mean_eps);
            assert!(err < tol, "{kind} {dtype:?}: forms differ by {err}");

            let rows = if dtype == DType::F64 { t_max } else { 900 };
            let idx = &t_index[..rows];
            let (x_t, x0, eps) = (
                x_t.narrow(0, 0, rows).unwrap(),
                x0.narrow(0, 0, rows).unwrap(),
                eps.narrow(0, 0, rows).unwrap(),
            );
            let x0_back = predict_x0_from_eps(&s, &x_t, &eps, idx, ClipX0::Off).unwrap();
            let eps_back = predict_eps_from_x0(&s, &x_t, &x0, idx).unwrap();
            let tol = if dtype == DType::F64 { 1e-10 } else { 2e-4 };
            assert!(max_abs(&x0_back, &x0) < tol, "{kind} {dtype:?}: x0 round trip");
            assert!(max_abs(&eps_back, &eps) < tol, "{kind} {dtype:?}: eps round trip");
            let clipped = predict_x0_from_eps(&s, &x_t, &eps, idx, ClipX0::DataRange).unwrap();
            let m = clipped.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            assert!(m.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap() <= 1.0);
        }
    }
}

fn as_vec(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn assert_close(what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        assert!(
            err <= 1e-9 * w.abs() || err <= 1e-15,
            "{what}[{k}]: got {g:e}, want {w:e}"
        );
    }
}

/// One DDPM reverse step against `tests/golden/steps.json` (linear schedule, T = 1000, float64
/// numpy cross-checked against diffusers): predicted x_0, posterior mean with and without the
/// [-1, 1] clip of x_0, and posterior variance, at the golden's four timesteps (0-based diffusers
/// t = our index). Relative 1e-9, as for the schedule tables.
#[test]
fn one_step_matches_golden() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/steps.json")).unwrap();
    let g: Value = serde_json::from_str(&text).unwrap();
    let s = Schedule::named("linear", 1000).unwrap();
    let x_t_v = as_vec(&g["x_t"]);
    let eps_v = as_vec(&g["eps"]);
    let n = x_t_v.len();
    let x_t = Tensor::from_vec(x_t_v, (1, n), &DEV).unwrap();
    let eps = Tensor::from_vec(eps_v, (1, n), &DEV).unwrap();
    let cases = g["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for case in cases {
        let i = case["t"].as_u64().unwrap() as usize;
        let idx = [i];
        let x0_pred = predict_x0_from_eps(&s, &x_t, &eps, &idx, ClipX0::Off).unwrap();
        assert_close(
            &format!("t={i} x0_pred"),
            &xtv(&x0_pred),
            &as_vec(&case["x0_pred"]),
        );
        let (mean, var, _) = posterior_mean_variance(&s, &x0_pred, &x_t, &idx).unwrap();
        assert_close(
            &format!("t={i} ddpm_mean"),
            &xtv(&mean),
            &as_vec(&case["ddpm_mean"]),
        );
        // the eps form (eq. 11) gives the same mean
        let mean_eps = posterior_mean_from_eps(&s, &x_t, &eps, &idx).unwrap();
        assert_close(
            &format!("t={i} ddpm_mean (eps form)"),
            &xtv(&mean_eps),
            &as_vec(&case["ddpm_mean"]),
        );
        assert_close(
            &format!("t={i} ddpm_posterior_variance"),
            &var,
            &[case["ddpm_posterior_variance"].as_f64().unwrap()],
        );
        let x0_clipped = predict_x0_from_eps(&s, &x_t, &eps, &idx, ClipX0::DataRange).unwrap();
        let (mean_c, _, _) = posterior_mean_variance(&s, &x0_clipped, &x_t, &idx).unwrap();
        assert_close(
            &format!("t={i} ddpm_mean_clipped"),
            &xtv(&mean_c),
            &as_vec(&case["ddpm_mean_clipped"]),
        );
    }
}
