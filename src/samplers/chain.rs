//! The reverse Markov chain a discrete sampler walks, `x_{tau_K} -> ... -> x_{tau_1} -> x_0`,
//! and the Gaussian posterior `q(x_s | x_t, x_0)` of each step.
//!
//! For two levels s < t of any Gaussian process with `x_t | x_s ~ N(a x_s, b I)`, where
//! `a = alpha_t / alpha_s` and `b = sigma_t^2 - a^2 sigma_s^2` (the transition; `b` is the step's
//! "beta"), the posterior is (Ho et al. 2020, eqs. 6–7, written for general levels)
//!
//! ```text
//! q(x_s | x_t, x_0) = N(coef_x0 x_0 + coef_xt x_t, posterior_variance I)
//! coef_x0 = alpha_s b / sigma_t^2,   coef_xt = a sigma_s^2 / sigma_t^2,   posterior_variance = b sigma_s^2 / sigma_t^2.
//! ```
//!
//! For the DDPM process this is `posterior_mean_coef1`, `posterior_mean_coef2` and
//! `posterior_variance` of [`Schedule`]. A **respaced** chain (Nichol & Dhariwal 2021, section
//! 4, improved-diffusion's `space_timesteps`/`SpacedDiffusion`) keeps the steps tau_1 < ... <
//! tau_K and is the DDPM chain of the betas
//!
//! ```text
//! beta_k = 1 - alpha_bar_{tau_k} / alpha_bar_{tau_{k-1}},   alpha_bar_{tau_0} = 1,
//! ```
//!
//! with its own posterior tables computed from them (field notes, bugs 3 and 7). For the
//! seed-000 process (alpha = 1, sigma^2 = sigma_q^2 t) the same formulas give the Brownian
//! bridge: `coef_x0 = (t - s)/t`, `coef_xt = s/t`, `posterior_variance = sigma_q^2 (t - s) s / t`,
//! `beta = sigma_q^2 (t - s)`.
//!
//! Every chain ends at the data level `(alpha, sigma) = (1, 0)` (alpha_bar = 1): the last step
//! lands on `x_0` itself (field notes, bug 4), and its posterior mean is `x_0`'s prediction.

use crate::denoiser::NoiseLevel;
use crate::error::{Error, Result};
use crate::process::{ddpm_level, Sde, TimeGrid};
use crate::schedule::Schedule;

/// One step `x_t -> x_s` of a reverse chain.
#[derive(Clone, Debug, PartialEq)]
pub struct ChainStep {
    /// The training-step index of `x_t` (DDPM process; index i is t = i + 1), if any.
    pub index: Option<usize>,
    /// The process time of `x_t` (DDPM: (index + 1) / T).
    pub t: f64,
    /// The process time of `x_s` (0 at the end of the chain).
    pub t_prev: f64,
    /// The noise level of `x_t`.
    pub level: NoiseLevel,
    /// The noise level of `x_s`.
    pub prev: NoiseLevel,
    /// The step's transition variance `b` ("beta"; DDPM's fixed-large variance).
    pub beta: f64,
    /// `posterior_variance = beta sigma_s^2 / sigma_t^2` (beta~, the fixed-small variance).
    pub posterior_variance: f64,
    /// The x_0 coefficient of the posterior mean.
    pub coef_x0: f64,
    /// The x_t coefficient of the posterior mean.
    pub coef_xt: f64,
}

/// A reverse chain: its steps from the noisiest to the data level.
#[derive(Clone, Debug, PartialEq)]
pub struct ReverseChain {
    /// The steps, in sampling order.
    pub steps: Vec<ChainStep>,
}

impl ReverseChain {
    /// The (possibly respaced) DDPM chain through the kept indices `kept` (strictly
    /// decreasing, each < T), ending at alpha_bar = 1. With every index kept it is the
    /// schedule's own chain, with the schedule's tables.
    pub fn discrete(schedule: &Schedule, kept: &[usize]) -> Result<Self> {
        let n = schedule.timesteps();
        if kept.is_empty() {
            return Err(Error::param(
                "steps",
                "the chain needs at least one kept timestep",
            ));
        }
        if kept.windows(2).any(|w| w[1] >= w[0]) || kept[0] >= n {
            return Err(Error::param(
                "timesteps",
                format!("kept indices must be strictly decreasing and below T = {n}, got {kept:?}"),
            ));
        }
        let mut steps = Vec::with_capacity(kept.len());
        for (j, &i) in kept.iter().enumerate() {
            let prev_index = kept.get(j + 1).copied();
            let ab = schedule.alpha_bar[i];
            let ab_prev = prev_index.map_or(1.0, |p| schedule.alpha_bar[p]);
            // Consecutive steps use the schedule's beta itself (the formula below equals it
            // algebraically); respaced steps use improved-diffusion's respaced beta.
            let consecutive = match prev_index {
                Some(p) => p + 1 == i,
                None => i == 0,
            };
            let beta = if consecutive {
                schedule.beta[i]
            } else {
                1.0 - ab / ab_prev
            };
            let alpha = 1.0 - beta;
            steps.push(ChainStep {
                index: Some(i),
                t: (i + 1) as f64 / n as f64,
                t_prev: prev_index.map_or(0.0, |p| (p + 1) as f64 / n as f64),
                level: ddpm_level(schedule, i),
                prev: prev_index.map_or(NoiseLevel::new(1.0, 0.0), |p| ddpm_level(schedule, p)),
                beta,
                // the same expressions, in the same order, as `Schedule::from_betas`
                posterior_variance: beta * (1.0 - ab_prev) / (1.0 - ab),
                coef_x0: beta * ab_prev.sqrt() / (1.0 - ab),
                coef_xt: (1.0 - ab_prev) * alpha.sqrt() / (1.0 - ab),
            });
        }
        Ok(ReverseChain { steps })
    }

    /// The chain through general levels `(t, level)`, in decreasing noise; the last entry is
    /// the target (normally `(0, (1, 0))`, the data). Errors unless every transition adds noise.
    pub fn from_levels(levels: &[(f64, NoiseLevel)]) -> Result<Self> {
        if levels.len() < 2 {
            return Err(Error::param("steps", "the chain needs at least one step"));
        }
        let mut steps = Vec::with_capacity(levels.len() - 1);
        for w in levels.windows(2) {
            let ((t, l), (s, p)) = (w[0], w[1]);
            let a = l.alpha / p.alpha;
            let b = l.sigma * l.sigma - a * a * p.sigma * p.sigma;
            if !(b > 0.0 && a.is_finite()) {
                return Err(Error::param(
                    "levels",
                    format!(
                        "the step from t = {t} to t = {s} does not add noise (alpha {} -> {}, sigma {} -> {})",
                        p.alpha, l.alpha, p.sigma, l.sigma
                    ),
                ));
            }
            let s2_over = p.sigma * p.sigma / (l.sigma * l.sigma);
            steps.push(ChainStep {
                index: None,
                t,
                t_prev: s,
                level: l,
                prev: p,
                beta: b,
                posterior_variance: b * s2_over,
                coef_x0: p.alpha * b / (l.sigma * l.sigma),
                coef_xt: a * s2_over,
            });
        }
        Ok(ReverseChain { steps })
    }

    /// The seed-000 chain with `steps` steps: times from `grid` (Nakkiran et al.'s uniform
    /// `t = k/K`, k = K..1, or uniform in log-SNR from 1 down to t_eps), then t = 0.
    pub fn seed_ve(sde: &Sde, steps: usize, grid: TimeGrid) -> Result<Self> {
        if !matches!(sde, Sde::SeedVe { .. }) {
            return Err(Error::param(
                "process",
                format!("the seed-000 chain needs the seed-ve process, got {}", sde.name()),
            ));
        }
        if steps == 0 {
            return Err(Error::param("steps", "got 0, expected at least 1"));
        }
        let times: Vec<f64> = match grid {
            TimeGrid::Uniform => (1..=steps).rev().map(|k| k as f64 / steps as f64).collect(),
            _ if steps == 1 => vec![sde.t_max()],
            _ => sde.time_grid(steps - 1, grid)?,
        };
        let mut levels: Vec<(f64, NoiseLevel)> = times.iter().map(|&t| (t, sde.level(t))).collect();
        levels.push((0.0, NoiseLevel::new(1.0, 0.0)));
        Self::from_levels(&levels)
    }

    /// Number of steps.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// True when the chain has no steps (never, for a constructed chain).
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
}

/// The chain a discrete sampler (ddpm, ddim) walks on `process` with `steps` steps: the DDPM
/// timestep subsequence of `spacing` (linspace by default; K < T respaces), or the seed-000
/// chain on the time grid `spacing` (the process's default grid when `None`).
pub fn chain_for(
    process: &crate::process::Process,
    steps: usize,
    spacing: &Option<String>,
) -> Result<ReverseChain> {
    use super::timesteps::{timesteps, Spacing};
    match process {
        crate::process::Process::Ddpm(schedule) => {
            let spacing = match spacing {
                None => Spacing::Linspace,
                Some(s) => Spacing::from_name(s)?,
            };
            ReverseChain::discrete(schedule, &timesteps(schedule.timesteps(), steps, spacing)?)
        }
        crate::process::Process::Continuous(sde) => {
            ReverseChain::seed_ve(sde, steps, super::registry::time_grid(sde, spacing)?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::samplers::timesteps::{timesteps, Spacing};

    fn rel(a: f64, b: f64) -> f64 {
        (a - b).abs() / b.abs().max(1e-300)
    }

    #[test]
    fn full_chain_reproduces_the_schedule_tables_bitwise() {
        let s = Schedule::named("linear", 100).unwrap();
        let kept: Vec<usize> = (0..100).rev().collect();
        let c = ReverseChain::discrete(&s, &kept).unwrap();
        for st in &c.steps {
            let i = st.index.unwrap();
            assert_eq!(st.posterior_variance, s.posterior_variance[i]);
            assert_eq!(st.coef_x0, s.posterior_mean_coef1[i]);
            assert_eq!(st.coef_xt, s.posterior_mean_coef2[i]);
            assert_eq!(st.beta, s.beta[i]);
        }
        // last step: alpha_bar_prev = 1 -> posterior mean is x_0 (coef_x0 = 1, coef_xt = 0)
        let last = c.steps.last().unwrap();
        assert!(rel(last.coef_x0, 1.0) < 1e-12 && last.coef_xt == 0.0 && last.posterior_variance == 0.0);
        assert_eq!(last.prev, NoiseLevel::new(1.0, 0.0));
    }

    #[test]
    fn general_level_formulas_agree_with_the_ddpm_tables() {
        // from_levels on the DDPM levels must give the schedule's posterior tables (to
        // rounding: sigma_t^2 - a^2 sigma_s^2 cancels to beta ~ 1e-4, losing ~4 digits of 16).
        let s = Schedule::named("cosine", 200).unwrap();
        let mut levels: Vec<(f64, NoiseLevel)> =
            (0..200).rev().map(|i| (i as f64, ddpm_level(&s, i))).collect();
        levels.push((-1.0, NoiseLevel::new(1.0, 0.0)));
        let c = ReverseChain::from_levels(&levels).unwrap();
        for (k, st) in c.steps.iter().enumerate() {
            let i = 199 - k;
            assert!(rel(st.beta, s.beta[i]) < 1e-9, "beta at {i}");
            if i > 0 {
                assert!(rel(st.posterior_variance, s.posterior_variance[i]) < 1e-9);
                assert!(rel(st.coef_xt, s.posterior_mean_coef2[i]) < 1e-9);
            }
            assert!(rel(st.coef_x0, s.posterior_mean_coef1[i]) < 1e-9);
        }
    }

    #[test]
    fn respaced_chain_has_k_steps_and_the_kept_alpha_bars() {
        // K = 37 does not divide T = 1000 (field notes, bug 3): exactly 37 steps.
        let s = Schedule::named("linear", 1000).unwrap();
        let kept = timesteps(1000, 37, Spacing::Linspace).unwrap();
        let c = ReverseChain::discrete(&s, &kept).unwrap();
        assert_eq!(c.len(), 37);
        // the respaced betas telescope: prod_k (1 - beta_k) over steps up to tau_k = alpha_bar_{tau_k}
        let mut ab = 1.0;
        for st in c.steps.iter().rev() {
            let ab_prev = ab;
            ab *= 1.0 - st.beta;
            let i = st.index.unwrap();
            assert!(rel(ab, s.alpha_bar[i]) < 1e-12, "alpha_bar at {i}");
            // posterior variance from the chain's own betas (field notes, bug 7), which is
            // not the original chain's beta~_t at the same index
            let want = st.beta * (1.0 - ab_prev) / (1.0 - ab);
            assert!(
                rel(st.posterior_variance, want) < 1e-9,
                "posterior variance at {i}"
            );
            if i > 0 {
                assert!(
                    rel(st.posterior_variance, s.posterior_variance[i]) > 0.1,
                    "at {i}"
                );
            }
        }
        // respaced beta of the first kept step after index 0: 1 - ab[tau]/ab[0]
        let st = &c.steps[35];
        let want = 1.0 - s.alpha_bar[st.index.unwrap()] / s.alpha_bar[0];
        assert!(rel(st.beta, want) < 1e-15);
        assert!(ReverseChain::discrete(&s, &[]).is_err());
        assert!(ReverseChain::discrete(&s, &[5, 5]).is_err());
        assert!(ReverseChain::discrete(&s, &[1000]).is_err());
    }

    #[test]
    fn seed_ve_chain_is_the_brownian_bridge() {
        let sde = Sde::SeedVe { sigma_q: 2.0 };
        let c = ReverseChain::seed_ve(&sde, 4, TimeGrid::Uniform).unwrap();
        // Nakkiran et al.: t = 1, 0.75, 0.5, 0.25, then 0
        let ts: Vec<f64> = c.steps.iter().map(|s| s.t).collect();
        assert_eq!(ts, vec![1.0, 0.75, 0.5, 0.25]);
        let st = &c.steps[1]; // t = 0.75 -> s = 0.5
                              // beta = sigma_q^2 (t - s) = 4 * 0.25; bridge mean (s/t) x_t + ((t-s)/t) x_0; variance 4 (t-s) s / t
        assert!(rel(st.beta, 1.0) < 1e-14);
        assert!(rel(st.coef_xt, 0.5 / 0.75) < 1e-14 && rel(st.coef_x0, 0.25 / 0.75) < 1e-14);
        assert!(rel(st.posterior_variance, 4.0 * 0.25 * 0.5 / 0.75) < 1e-14);
        let last = c.steps.last().unwrap();
        assert!(last.coef_x0 == 1.0 && last.coef_xt == 0.0 && last.posterior_variance == 0.0);
        // the log-SNR grid ends at t_eps before the final step to 0
        let c = ReverseChain::seed_ve(&Sde::seed_ve(), 10, TimeGrid::UniformLogSnr).unwrap();
        assert_eq!(c.len(), 10);
        assert_eq!(c.steps[9].t, Sde::seed_ve().t_eps());
        assert!(ReverseChain::seed_ve(&Sde::vp(), 10, TimeGrid::Uniform).is_err());
    }
}
