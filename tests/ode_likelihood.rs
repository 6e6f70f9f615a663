//! The probability-flow ODE likelihood under the exact oracle against the mixture's exact
//! log-density (Song et al. 2021, appendix D.2).
//!
//! What the ODE transports is p_{t_start}: the clean data when the integration starts at t = 0,
//! which the oracle allows (its score is defined at sigma = 0) and every family reaches (noise 0
//! at t = 0). The reference is the exact mixture log-density at that time
//! (`Oracle::log_density_rows`).

use candle_core::{Device, Tensor};

use diffuse::gmm::{Covariance, Gmm};
use diffuse::ode_likelihood::{log_likelihood, Divergence, LikelihoodOptions, Probe, ScoreJacobian};
use diffuse::oracle::Oracle;
use diffuse::process::Sde;
use diffuse::samplers::rk45::Rk45Options;

fn mixture() -> Gmm {
    Gmm::new(
        vec![0.5, 0.3, 0.2],
        vec![vec![-2.0, 0.0], vec![1.5, 1.0], vec![1.0, -1.5]],
        vec![
            Covariance::Full(vec![0.6, 0.25, 0.25, 0.2]),
            Covariance::Full(vec![0.1, -0.05, -0.05, 0.4]),
            Covariance::Isotropic(0.04),
        ],
    )
    .unwrap()
}

/// Points on the data and far from it (up to ~40 standard deviations of the nearest component).
fn points(g: &Gmm) -> Vec<f64> {
    let mut p = g.sample(8, 17);
    p.extend_from_slice(&[0.0, 0.0, 6.0, -5.0, -9.0, 7.0, 0.5, 12.0, 1.0, -1.5]);
    p
}

fn tight() -> Rk45Options {
    Rk45Options {
        rtol: 1e-8,
        atol: 1e-8,
        max_steps: 100_000,
    }
}

#[test]
fn exact_divergence_matches_the_exact_log_density() {
    let g = mixture();
    let oracle = Oracle::new(g.clone());
    let pts = points(&g);
    let n = pts.len() / 2;
    let x = Tensor::from_vec(pts.clone(), (n, 2), &Device::Cpu).unwrap();
    for sde in [
        Sde::vp(),
        Sde::subvp(),
        Sde::vp_cosine(),
        Sde::ve(),
        Sde::seed_ve(),
    ] {
        // start at t = 0 (no noise: the clean data density) where the process allows it, else
        // at t_eps; the reference is the exact mixture log-density at that time
        let t0 = if sde.level(0.0).sigma == 0.0 {
            0.0
        } else {
            sde.t_eps()
        };
        let opts = LikelihoodOptions {
            divergence: Divergence::Exact,
            rk45: tight(),
            t_start: Some(t0),
        };
        let ll = log_likelihood(&oracle, Some(&oracle as &dyn ScoreJacobian), &sde, &x, &opts).unwrap();
        let exact = oracle.log_density_rows(&pts, sde.level(t0)).unwrap();
        let err = |l: &[f64]| {
            l.iter()
                .zip(&exact)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max)
        };
        // (1) with the exact prior at t_max only the integration error remains: rtol = atol =
        // 1e-8 leaves < 1e-5 nats here (measured 1e-7 .. 3e-6); 1e-4 allowed.
        let l1 = sde.level(sde.t_max());
        let p1 = g.noisy(l1.alpha, l1.sigma).unwrap();
        let with_exact = ll.clone().with_prior(|z| p1.log_density(z));
        let e_exact = err(&with_exact.log_likelihood);
        // (2) with the process's Gaussian prior the prior mismatch adds up to 0.05-0.4 nats at
        // the far points. On the data points it stays below 1e-2 for the VP types (the prior's
        // mean is off by alpha(1) |mu| ~ 0.01) and below 5e-2 for VE (off by |mu| / sigma_max in
        // units of the std, with latents ~70 long: 70 * 2 / 2500 = 0.056 at most).
        let bound = if sde.level(1.0).alpha == 1.0 { 5e-2 } else { 1e-2 };
        let e_gauss_data = ll.log_likelihood[..8]
            .iter()
            .zip(&exact)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        println!(
            "{} (t_start {t0}): exact prior {e_exact:.2e}, gaussian prior {:.2e} (on-data {e_gauss_data:.2e}), NFE {}",
            sde.name(),
            err(&ll.log_likelihood),
            ll.nfe
        );
        assert!(
            e_exact < 1e-4,
            "{}: {:?} vs {exact:?}",
            sde.name(),
            with_exact.log_likelihood
        );
        assert!(e_gauss_data < bound, "{}: {e_gauss_data}", sde.name());
        // bits/dim = -ln p / (D ln 2)
        let bpd0 = -with_exact.log_likelihood[0] / (2.0 * std::f64::consts::LN_2);
        assert!((with_exact.bits_per_dim[0] - bpd0).abs() < 1e-12);
    }
}

#[test]
fn finite_difference_divergence_without_a_jacobian() {
    // a denoiser without exact derivatives: the trace by central differences of the score
    let g = mixture();
    let oracle = Oracle::new(g.clone());
    let pts = points(&g);
    let n = pts.len() / 2;
    let x = Tensor::from_vec(pts.clone(), (n, 2), &Device::Cpu).unwrap();
    let sde = Sde::vp();
    let opts = LikelihoodOptions {
        divergence: Divergence::Exact,
        rk45: tight(),
        t_start: None,
    };
    let exact_jac = log_likelihood(&oracle, Some(&oracle as &dyn ScoreJacobian), &sde, &x, &opts).unwrap();
    let fd = log_likelihood(&oracle, None, &sde, &x, &opts).unwrap();
    // the same transport with the trace by finite differences: relative truncation ~1e-6 of
    // the integrated divergence (up to ~500 nats at the far points)
    let worst = fd
        .log_likelihood
        .iter()
        .zip(&exact_jac.log_likelihood)
        .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
        .fold(0.0, f64::max);
    println!("finite differences vs exact trace: largest relative difference {worst:.2e}");
    assert!(worst < 1e-5, "{worst}");
}

#[test]
fn hutchinson_is_unbiased_within_its_standard_error() {
    // 3 points x 400 probes each (one probe per row, rows = replicated points). For each point
    // the mean of the 400 estimates must be within 4 standard errors of the exact value
    // (the exact-divergence ODE, itself within 1e-4 of the truth), and the spread must be real
    // (the estimator is not secretly exact). Gaussian probes have a larger variance than
    // Rademacher ones (2 ||A||_F^2 versus 2 sum_{i != j} A_ij^2).
    let g = mixture();
    let oracle = Oracle::new(g.clone());
    let base = [-2.0, 0.1, 1.0, -1.4, 3.0, 3.0];
    let reps = 400;
    let mut rows = Vec::new();
    for p in base.chunks(2) {
        for _ in 0..reps {
            rows.extend_from_slice(p);
        }
    }
    let x = Tensor::from_vec(rows, (3 * reps, 2), &Device::Cpu).unwrap();
    let sde = Sde::vp();
    let loose = Rk45Options {
        rtol: 1e-6,
        atol: 1e-6,
        max_steps: 100_000,
    };
    let opts_exact = LikelihoodOptions {
        divergence: Divergence::Exact,
        rk45: tight(),
        t_start: None,
    };
    let exact_x = Tensor::from_vec(base.to_vec(), (3, 2), &Device::Cpu).unwrap();
    let exact = log_likelihood(
        &oracle,
        Some(&oracle as &dyn ScoreJacobian),
        &sde,
        &exact_x,
        &opts_exact,
    )
    .unwrap()
    .log_likelihood;
    let mut sds = Vec::new();
    for probe in [Probe::Rademacher, Probe::Gaussian] {
        let opts = LikelihoodOptions {
            divergence: Divergence::Hutchinson { probe, seed: 11 },
            rk45: loose,
            t_start: None,
        };
        let ll = log_likelihood(&oracle, Some(&oracle as &dyn ScoreJacobian), &sde, &x, &opts).unwrap();
        for (k, est) in ll.log_likelihood.chunks(reps).enumerate() {
            let mean = est.iter().sum::<f64>() / reps as f64;
            let sd = (est.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (reps - 1) as f64).sqrt();
            let se = sd / (reps as f64).sqrt();
            println!(
                "{probe:?} point {k}: mean {mean:.4} exact {:.4} sd {sd:.4} se {se:.4}",
                exact[k]
            );
            assert!(
                (mean - exact[k]).abs() < 4.0 * se + 1e-4,
                "{probe:?} point {k}: {mean} vs {}",
                exact[k]
            );
            assert!(sd > 1e-3, "the estimator should not be exact: sd {sd}");
            sds.push(sd);
        }
    }
    for k in 0..3 {
        assert!(
            sds[3 + k] > sds[k],
            "Gaussian sd {} should exceed Rademacher sd {}",
            sds[3 + k],
            sds[k]
        );
    }
}

#[test]
fn likelihood_inputs_are_checked() {
    let oracle = Oracle::new(mixture());
    let x = Tensor::zeros((2, 3), candle_core::DType::F64, &Device::Cpu).unwrap();
    let e = log_likelihood(&oracle, None, &Sde::vp(), &x, &LikelihoodOptions::default()).unwrap_err();
    assert!(e.to_string().contains("dimension 2"), "{e}");
}

/// Points at 0, 1, 2 and 3 standard deviations (Mahalanobis radius) from each component's mean
/// in 8 directions, the point between the components, and the far point of `tests/cli_toy.rs`
/// (30 standard deviations from the nearest component).
fn points_out_to_3_std(g: &Gmm) -> Vec<f64> {
    let mut p = Vec::new();
    for (mu, cov) in g.means().iter().zip(g.covariances()) {
        // the Cholesky factor of the 2x2 covariance
        let (a, b, c) = (cov.get(2, 0, 0), cov.get(2, 1, 0), cov.get(2, 1, 1));
        let l00 = a.sqrt();
        let (l10, l11) = (b / l00, (c - b * b / a).sqrt());
        p.extend_from_slice(mu);
        for r in [1.0, 2.0, 3.0] {
            for k in 0..8 {
                let th = k as f64 * std::f64::consts::FRAC_PI_4;
                let (z0, z1) = (r * th.cos(), r * th.sin());
                p.extend_from_slice(&[mu[0] + l00 * z0, mu[1] + l10 * z0 + l11 * z1]);
            }
        }
    }
    p.extend_from_slice(&[0.0, 0.0, 6.0, -5.0]);
    p
}

/// Issue 17, item 4: at the default tolerances (`LikelihoodOptions::default()`, what `toy nll`
/// uses) the ODE likelihood of the exact mixture denoiser is within 1e-3 nats of the mixture's
/// log-density at every point out to 3 standard deviations, for every process, with the
/// settings `toy nll --oracle` defaults to (start at t = 0 where the process has no noise
/// there, exact prior). Measured: worst 3.7e-5 (3 std) and 5.2e-4 (the far point, seed-ve);
/// the old defaults (1e-5) gave 6e-3 at the far point. And the a-posteriori estimate that
/// `toy nll` reports for models without an exact density does not under-estimate: at least
/// half the true error at every point where that error is above 1e-6 (ten times the check
/// solve's tolerance).
#[test]
fn default_tolerances_reach_a_thousandth_of_a_nat_out_to_3_std() {
    let g = mixture();
    let oracle = Oracle::new(g.clone());
    let pts = points_out_to_3_std(&g);
    let n = pts.len() / 2;
    let x = Tensor::from_vec(pts.clone(), (n, 2), &Device::Cpu).unwrap();
    let defaults = LikelihoodOptions::default();
    assert_eq!(
        (defaults.rk45.rtol, defaults.rk45.atol),
        (
            diffuse::ode_likelihood::DEFAULT_TOLERANCE,
            diffuse::ode_likelihood::DEFAULT_TOLERANCE
        )
    );
    for sde in [
        Sde::vp(),
        Sde::subvp(),
        Sde::vp_cosine(),
        Sde::ve(),
        Sde::seed_ve(),
    ] {
        let t0 = if sde.level(0.0).sigma == 0.0 {
            0.0
        } else {
            sde.t_eps()
        };
        let opts = LikelihoodOptions {
            t_start: Some(t0),
            ..defaults
        };
        let l1 = sde.level(sde.t_max());
        let p1 = g.noisy(l1.alpha, l1.sigma).unwrap();
        let prior = |z: &[f64]| p1.log_density(z);
        let (ll, estimate) = diffuse::ode_likelihood::log_likelihood_checked(
            &oracle,
            Some(&oracle as &dyn ScoreJacobian),
            &sde,
            &x,
            &opts,
            Some(&prior),
        )
        .unwrap();
        let exact = oracle.log_density_rows(&pts, sde.level(t0)).unwrap();
        let err: Vec<f64> = ll
            .log_likelihood
            .iter()
            .zip(&exact)
            .map(|(a, b)| (a - b).abs())
            .collect();
        let worst_3_std = err[..n - 2].iter().copied().fold(0.0, f64::max);
        let worst = err.iter().copied().fold(0.0, f64::max);
        println!(
            "{} (t_start {t0}): worst error {worst_3_std:.2e} nats out to 3 std, {worst:.2e} with the far points, NFE {}",
            sde.name(),
            ll.nfe
        );
        assert!(worst < 1e-3, "{}: {worst}", sde.name());
        // the check solve runs at a tenth of the tolerance, 1e-7, and errs by about that much
        // itself: below ten times that, the estimate is not meant to resolve the error
        let floor = defaults.rk45.atol; // ten times atol / 10
        for (i, (e, est)) in err.iter().zip(&estimate).enumerate() {
            assert!(
                *e < floor || *est >= 0.5 * e,
                "{} point {i}: estimate {est:.2e}, true error {e:.2e}",
                sde.name()
            );
        }
    }
}
