//! Noise schedules of the discrete-time forward process and every table derived from them.
//!
//! Index convention (used everywhere in `diffuse`, and in `shared/golden/`): arrays have length
//! `T`, and **index `i` holds step `t = i + 1`** (so index 0 is `t = 1`, diffusers' timestep 0).
//! All tables are computed once, in f64, and cast to f32 only at the tensor boundary.
//!
//! | symbol (paper) | field | definition |
//! | --- | --- | --- |
//! | beta_t | `beta` | the schedule itself |
//! | alpha_t | `alpha` | `1 - beta_t` |
//! | alpha_bar_t | `alpha_bar` | `prod_{s<=t} alpha_s` (Ho et al. 2020, eq. 4) |
//! | alpha_bar_{t-1} | `alpha_bar_prev` | `alpha_bar_0 = 1` |
//! | beta~_t | `posterior_variance` | `(1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t` (eq. 7) |
//! | mu~_t coefficients | `posterior_mean_coef1/2` | `mu~_t = coef1 * x_0 + coef2 * x_t` (eq. 7) |
//! | SNR(t) | `snr` | `alpha_bar_t / (1 - alpha_bar_t)` (Kingma et al. 2021) |

use serde::{Deserialize, Serialize};

use crate::error::{check_range, Error, Result};

/// Nichol & Dhariwal's cap on the cosine (and sigmoid) schedule's betas: "we clip beta_t to be
/// no larger than 0.999 to prevent singularities at the end of the diffusion process near t = T"
/// (Improved DDPM, section 3.2).
pub const NICHOL_DHARIWAL_MAX_BETA: f64 = 0.999;

/// How `beta_1 .. beta_T` are chosen.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BetaSchedule {
    /// `beta_t = beta_start + (beta_end - beta_start) * (t-1)/(T-1)` (Ho et al. 2020; seed 001).
    Linear {
        /// beta_1 (default 1e-4).
        beta_start: f64,
        /// beta_T (default 0.02).
        beta_end: f64,
    },
    /// Linear in sqrt(beta): `beta_t = (sqrt(beta_start) + (sqrt(beta_end) - sqrt(beta_start)) * (t-1)/(T-1))^2`
    /// (diffusers' `scaled_linear`, used by latent diffusion).
    ScaledLinear {
        /// beta_1.
        beta_start: f64,
        /// beta_T.
        beta_end: f64,
    },
    /// `beta_t = beta_start + (beta_end - beta_start) * ((t-1)/(T-1))^2` (seed 001).
    Quadratic {
        /// beta_1.
        beta_start: f64,
        /// beta_T.
        beta_end: f64,
    },
    /// Nichol & Dhariwal (2021, eq. 17):
    /// `alpha_bar(t) = f(t) / f(0)`, `f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2)`,
    /// `beta_t = min(1 - alpha_bar(t) / alpha_bar(t-1), max_beta)`.
    ///
    /// Seed 001 prints `f(t) = cos^2((t/T + s) * pi/2)`, without the `1/(1 + s)` factor. That
    /// literal form is not a valid schedule: its alpha_bar reaches 0 at `t/T = 1 - s = 0.992` and
    /// rises again after it (see [`seed001_literal_cosine_alpha_bar`] and its test). We follow
    /// the paper.
    Cosine {
        /// Offset that keeps beta_1 from being too small (0.008 in the paper).
        s: f64,
        /// Cap on beta_t (0.999 in the paper, [`NICHOL_DHARIWAL_MAX_BETA`]).
        max_beta: f64,
    },
    /// Jabri et al. (2022) sigmoid schedule, as in lucidrains' denoising-diffusion-pytorch:
    /// `alpha_bar(t) = (sigmoid(end/tau) - sigmoid(((t/T) * (end - start) + start) / tau))
    ///  / (sigmoid(end/tau) - sigmoid(start/tau))`, normalised by its value at 0,
    /// `beta_t = min(1 - alpha_bar(t) / alpha_bar(t-1), max_beta)`.
    ///
    /// This is *not* diffusers' `beta_schedule="sigmoid"` (GeoDiff's sigmoid on the betas).
    Sigmoid {
        /// Left end of the sigmoid's input range (-3).
        start: f64,
        /// Right end (3).
        end: f64,
        /// Temperature (1).
        tau: f64,
        /// Cap on beta_t (0.999).
        max_beta: f64,
    },
}

impl BetaSchedule {
    /// The schedule names the CLI accepts.
    pub const NAMES: [&'static str; 5] = ["linear", "scaled_linear", "quadratic", "cosine", "sigmoid"];

    /// The named schedule with its paper defaults. `scaled-linear` is accepted for `scaled_linear`.
    pub fn from_name(name: &str) -> Result<Self> {
        let (b0, b1) = (1e-4, 0.02);
        Ok(match name {
            "linear" => BetaSchedule::Linear {
                beta_start: b0,
                beta_end: b1,
            },
            "scaled_linear" | "scaled-linear" => BetaSchedule::ScaledLinear {
                beta_start: b0,
                beta_end: b1,
            },
            "quadratic" => BetaSchedule::Quadratic {
                beta_start: b0,
                beta_end: b1,
            },
            "cosine" => BetaSchedule::Cosine {
                s: 0.008,
                max_beta: NICHOL_DHARIWAL_MAX_BETA,
            },
            "sigmoid" => BetaSchedule::Sigmoid {
                start: -3.0,
                end: 3.0,
                tau: 1.0,
                max_beta: NICHOL_DHARIWAL_MAX_BETA,
            },
            other => {
                return Err(Error::param(
                    "kind",
                    format!(
                        "unknown schedule '{other}', expected one of: {}",
                        Self::NAMES.join(", ")
                    ),
                ))
            }
        })
    }

    /// The canonical name (`linear`, `scaled_linear`, `quadratic`, `cosine`, `sigmoid`).
    pub fn name(&self) -> &'static str {
        match self {
            BetaSchedule::Linear { .. } => "linear",
            BetaSchedule::ScaledLinear { .. } => "scaled_linear",
            BetaSchedule::Quadratic { .. } => "quadratic",
            BetaSchedule::Cosine { .. } => "cosine",
            BetaSchedule::Sigmoid { .. } => "sigmoid",
        }
    }

    /// Replaces `beta_start`/`beta_end` of the beta-interpolating schedules; an error for the
    /// others, which are not parameterised by them.
    pub fn with_beta_range(self, beta_start: f64, beta_end: f64) -> Result<Self> {
        Ok(match self {
            BetaSchedule::Linear { .. } => BetaSchedule::Linear { beta_start, beta_end },
            BetaSchedule::ScaledLinear { .. } => BetaSchedule::ScaledLinear { beta_start, beta_end },
            BetaSchedule::Quadratic { .. } => BetaSchedule::Quadratic { beta_start, beta_end },
            other => {
                return Err(Error::param(
                    "beta_start/beta_end",
                    format!(
                        "the {} schedule is defined by alpha_bar, not by a beta range; \
                         --beta-start/--beta-end apply to linear, scaled_linear and quadratic",
                        other.name()
                    ),
                ))
            }
        })
    }

    /// `beta_1 .. beta_T` (index 0 is t = 1), validated.
    pub fn betas(&self, timesteps: usize) -> Result<Vec<f64>> {
        check_timesteps(timesteps)?;
        let t_max = timesteps as f64;
        let frac = |i: usize| i as f64 / (t_max - 1.0); // (t-1)/(T-1) for index i = t-1
        let betas: Vec<f64> = match *self {
            BetaSchedule::Linear { beta_start, beta_end } => {
                check_beta_range(beta_start, beta_end)?;
                (0..timesteps)
                    .map(|i| beta_start + (beta_end - beta_start) * frac(i))
                    .collect()
            }
            BetaSchedule::ScaledLinear { beta_start, beta_end } => {
                check_beta_range(beta_start, beta_end)?;
                let (a, b) = (beta_start.sqrt(), beta_end.sqrt());
                (0..timesteps).map(|i| (a + (b - a) * frac(i)).powi(2)).collect()
            }
            BetaSchedule::Quadratic { beta_start, beta_end } => {
                check_beta_range(beta_start, beta_end)?;
                (0..timesteps)
                    .map(|i| beta_start + (beta_end - beta_start) * frac(i).powi(2))
                    .collect()
            }
            BetaSchedule::Cosine { s, max_beta } => {
                check_range("s", s, (0.0, true), (1.0, false))?;
                check_range("max_beta", max_beta, (0.0, false), (1.0, true))?;
                let f = |t: f64| {
                    (((t / t_max + s) / (1.0 + s)) * std::f64::consts::FRAC_PI_2)
                        .cos()
                        .powi(2)
                };
                betas_from_alpha_bar_fn(timesteps, |t| f(t) / f(0.0), max_beta)
            }
            BetaSchedule::Sigmoid {
                start,
                end,
                tau,
                max_beta,
            } => {
                if !(start.is_finite() && end.is_finite() && start < end) {
                    return Err(Error::param(
                        "start/end",
                        format!("got start {start}, end {end}; expected finite start < end"),
                    ));
                }
                check_range("tau", tau, (0.0, false), (f64::INFINITY, false))?;
                check_range("max_beta", max_beta, (0.0, false), (1.0, true))?;
                let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
                let (v_start, v_end) = (sig(start / tau), sig(end / tau));
                let g =
                    |t: f64| (v_end - sig(((t / t_max) * (end - start) + start) / tau)) / (v_end - v_start);
                betas_from_alpha_bar_fn(timesteps, |t| g(t) / g(0.0), max_beta)
            }
        };
        validate_betas(&betas)?;
        Ok(betas)
    }
}

/// The largest T a schedule may have: 100 times the DDPM paper's 1000 (Improved DDPM used
/// 4000). A T read from a config file is an allocation of T values per table, so it is bounded
/// before anything is computed.
pub const MAX_TIMESTEPS: usize = 100_000;

/// An error unless `2 <= timesteps <= MAX_TIMESTEPS`.
pub fn check_timesteps(timesteps: usize) -> Result<()> {
    if (2..=MAX_TIMESTEPS).contains(&timesteps) {
        Ok(())
    } else {
        Err(Error::param(
            "timesteps",
            format!("got {timesteps}, expected an integer in 2..={MAX_TIMESTEPS}"),
        ))
    }
}

fn check_beta_range(beta_start: f64, beta_end: f64) -> Result<()> {
    check_range("beta_start", beta_start, (0.0, false), (1.0, false))?;
    check_range("beta_end", beta_end, (0.0, false), (1.0, false))?;
    if beta_start > beta_end {
        return Err(Error::param(
            "beta_start",
            format!("got {beta_start} > beta_end {beta_end}; the schedule must be non-decreasing"),
        ));
    }
    Ok(())
}

/// `beta_t = min(1 - alpha_bar(t) / alpha_bar(t - 1), max_beta)` for t = 1..T, with
/// `alpha_bar` a continuous function of t in [0, T] (Nichol & Dhariwal 2021, eq. 17 and
/// `betas_for_alpha_bar` in improved-diffusion). Real-valued division: see docs/STYLE.md on the
/// integer-division version of this loop.
fn betas_from_alpha_bar_fn(timesteps: usize, alpha_bar: impl Fn(f64) -> f64, max_beta: f64) -> Vec<f64> {
    (1..=timesteps)
        .map(|t| {
            let (t1, t0) = (t as f64, (t - 1) as f64);
            (1.0 - alpha_bar(t1) / alpha_bar(t0)).min(max_beta)
        })
        .collect()
}

/// Seed 001's literal cosine form `cos^2((t/T + s) * pi/2) / cos^2(s * pi/2)` (without the
/// `1/(1+s)` factor). Kept only to document why it is not used: it is 0 at `t/T = 1 - s`
/// and grows again for larger t, so `alpha_bar` is not monotone and `beta` leaves [0, 1].
pub fn seed001_literal_cosine_alpha_bar(t: f64, timesteps: usize, s: f64) -> f64 {
    let f = |u: f64| ((u + s) * std::f64::consts::FRAC_PI_2).cos().powi(2);
    f(t / timesteps as f64) / f(0.0)
}

/// diffusers' `beta_schedule="sigmoid"` (from GeoDiff, Xu et al. 2022): a sigmoid *on the
/// betas*, `beta_t = sigmoid(-6 + 12 (t-1)/(T-1)) * (beta_end - beta_start) + beta_start`
/// (`torch.sigmoid(torch.linspace(-6, 6, T))` in `scheduling_ddpm.py`). Not to be confused with
/// [`BetaSchedule::Sigmoid`] (Jabri et al.'s sigmoid on alpha_bar, our `sigmoid`).
pub fn geodiff_sigmoid_betas(timesteps: usize, beta_start: f64, beta_end: f64) -> Result<Vec<f64>> {
    check_timesteps(timesteps)?;
    check_beta_range(beta_start, beta_end)?;
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    let betas: Vec<f64> = (0..timesteps)
        .map(|i| {
            let x = -6.0 + 12.0 * i as f64 / (timesteps - 1) as f64;
            sig(x) * (beta_end - beta_start) + beta_start
        })
        .collect();
    validate_betas(&betas)?;
    Ok(betas)
}

/// Rescales betas to zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules
/// and Sample Steps are Flawed", Algorithm 1; diffusers' `rescale_zero_terminal_snr`):
///
/// ```text
/// s_t   = sqrt(alpha_bar_t)
/// s'_t  = (s_t - s_T) * s_1 / (s_1 - s_T)      (s'_1 = s_1, s'_T = 0)
/// alpha'_1 = s'_1^2,  alpha'_t = s'_t^2 / s'_{t-1}^2,  beta'_t = 1 - alpha'_t
/// ```
///
/// so `alpha_bar_1` is unchanged, `alpha_bar_T = 0` and `beta_T = 1` exactly (SNR_T = 0).
pub fn rescale_zero_terminal_snr(betas: &[f64]) -> Result<Vec<f64>> {
    validate_betas(betas)?;
    let mut acc = 1.0;
    let sqrt_ab: Vec<f64> = betas
        .iter()
        .map(|b| {
            acc *= 1.0 - b;
            acc.sqrt()
        })
        .collect();
    let (s1, st) = (sqrt_ab[0], sqrt_ab[sqrt_ab.len() - 1]);
    if s1 - st <= 0.0 {
        return Err(Error::param(
            "rescale_betas_zero_snr",
            "alpha_bar_1 equals alpha_bar_T; the schedule cannot be rescaled",
        ));
    }
    let ab: Vec<f64> = sqrt_ab
        .iter()
        .map(|s| ((s - st) * s1 / (s1 - st)).powi(2))
        .collect();
    let mut out = Vec::with_capacity(ab.len());
    out.push(1.0 - ab[0]);
    for w in ab.windows(2) {
        out.push(1.0 - w[1] / w[0]);
    }
    validate_betas(&out)?;
    Ok(out)
}

fn validate_betas(betas: &[f64]) -> Result<()> {
    if betas.len() < 2 {
        return Err(Error::param(
            "timesteps",
            format!("got {}, expected an integer >= 2", betas.len()),
        ));
    }
    for (i, &b) in betas.iter().enumerate() {
        if !(b.is_finite() && b > 0.0 && b <= 1.0) {
            return Err(Error::param(
                "beta",
                format!("beta at t = {} is {b}, expected a number in (0, 1]", i + 1),
            ));
        }
    }
    Ok(())
}

/// A discrete-time DDPM noise schedule with all its derived tables (f64, index 0 is t = 1).
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    /// beta_t.
    pub beta: Vec<f64>,
    /// alpha_t = 1 - beta_t.
    pub alpha: Vec<f64>,
    /// alpha_bar_t = prod_{s=1..t} alpha_s (Ho et al. 2020, eq. 4).
    pub alpha_bar: Vec<f64>,
    /// alpha_bar_{t-1}, with alpha_bar_0 = 1.
    pub alpha_bar_prev: Vec<f64>,
    /// sqrt(alpha_bar_t): the signal scale of q(x_t | x_0).
    pub sqrt_alpha_bar: Vec<f64>,
    /// sqrt(1 - alpha_bar_t): the noise std of q(x_t | x_0).
    pub sqrt_one_minus_alpha_bar: Vec<f64>,
    /// sqrt(1 / alpha_bar_t).
    pub sqrt_recip_alpha_bar: Vec<f64>,
    /// sqrt(1 / alpha_bar_t - 1).
    pub sqrt_recipm1_alpha_bar: Vec<f64>,
    /// beta~_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t (Ho et al. 2020, eq. 7);
    /// 0 at t = 1.
    pub posterior_variance: Vec<f64>,
    /// log(beta~_t) with the t = 1 entry replaced by log(beta~_2), since beta~_1 = 0
    /// (improved-diffusion's `posterior_log_variance_clipped`).
    pub posterior_log_variance_clipped: Vec<f64>,
    /// beta_t * sqrt(alpha_bar_{t-1}) / (1 - alpha_bar_t): the x_0 coefficient of mu~_t (eq. 7).
    pub posterior_mean_coef1: Vec<f64>,
    /// (1 - alpha_bar_{t-1}) * sqrt(alpha_t) / (1 - alpha_bar_t): the x_t coefficient of mu~_t (eq. 7).
    pub posterior_mean_coef2: Vec<f64>,
    /// snr_t = alpha_bar_t / (1 - alpha_bar_t).
    pub snr: Vec<f64>,
    kind: Option<BetaSchedule>,
}

impl Schedule {
    /// The schedule `kind` with `timesteps` steps.
    pub fn new(kind: &BetaSchedule, timesteps: usize) -> Result<Self> {
        let mut s = Self::from_betas(kind.betas(timesteps)?)?;
        s.kind = Some(kind.clone());
        Ok(s)
    }

    /// The named schedule (see [`BetaSchedule::from_name`]) with its defaults.
    pub fn named(name: &str, timesteps: usize) -> Result<Self> {
        Self::new(&BetaSchedule::from_name(name)?, timesteps)
    }

    /// A schedule from explicit betas (each in (0, 1], at least two). `beta_T = 1` is allowed
    /// (zero terminal SNR); then `alpha_bar_T = 0`, `snr_T = 0` and `sqrt_recip_alpha_bar_T = inf`.
    pub fn from_betas(beta: Vec<f64>) -> Result<Self> {
        validate_betas(&beta)?;
        let n = beta.len();
        let alpha: Vec<f64> = beta.iter().map(|b| 1.0 - b).collect();
        let mut alpha_bar = Vec::with_capacity(n);
        let mut acc = 1.0;
        for a in &alpha {
            acc *= a;
            alpha_bar.push(acc);
        }
        let mut alpha_bar_prev = Vec::with_capacity(n);
        alpha_bar_prev.push(1.0);
        alpha_bar_prev.extend_from_slice(&alpha_bar[..n - 1]);

        let map = |f: &dyn Fn(usize) -> f64| (0..n).map(f).collect::<Vec<f64>>();
        let posterior_variance = map(&|i| beta[i] * (1.0 - alpha_bar_prev[i]) / (1.0 - alpha_bar[i]));
        let posterior_log_variance_clipped = map(&|i| posterior_variance[if i == 0 { 1 } else { i }].ln());
        Ok(Schedule {
            sqrt_alpha_bar: map(&|i| alpha_bar[i].sqrt()),
            sqrt_one_minus_alpha_bar: map(&|i| (1.0 - alpha_bar[i]).sqrt()),
            sqrt_recip_alpha_bar: map(&|i| (1.0 / alpha_bar[i]).sqrt()),
            sqrt_recipm1_alpha_bar: map(&|i| (1.0 / alpha_bar[i] - 1.0).sqrt()),
            posterior_mean_coef1: map(&|i| beta[i] * alpha_bar_prev[i].sqrt() / (1.0 - alpha_bar[i])),
            posterior_mean_coef2: map(&|i| {
                (1.0 - alpha_bar_prev[i]) * alpha[i].sqrt() / (1.0 - alpha_bar[i])
            }),
            snr: map(&|i| alpha_bar[i] / (1.0 - alpha_bar[i])),
            posterior_variance,
            posterior_log_variance_clipped,
            beta,
            alpha,
            alpha_bar,
            alpha_bar_prev,
            kind: None,
        })
    }

    /// T, the number of steps.
    pub fn timesteps(&self) -> usize {
        self.beta.len()
    }

    /// The schedule this was built from, if it was built from a named kind.
    pub fn kind(&self) -> Option<&BetaSchedule> {
        self.kind.as_ref()
    }

    /// log SNR_t = ln(alpha_bar_t) - ln(1 - alpha_bar_t), for index `i` (t = i + 1).
    pub fn log_snr(&self, i: usize) -> f64 {
        self.alpha_bar[i].ln() - (-self.alpha_bar[i]).ln_1p()
    }

    /// The (fractional) index `i` in `[0, T-1]` at which the schedule's log-SNR equals `log_snr`,
    /// by linear interpolation of log-SNR between neighbouring steps; clamped to the ends.
    /// Lets a network trained on this discrete schedule be evaluated at any noise level
    /// (continuous-time samplers, other processes).
    pub fn index_for_log_snr(&self, log_snr: f64) -> f64 {
        let n = self.timesteps();
        // log-SNR decreases with t for every valid schedule (alpha_bar is decreasing).
        if log_snr >= self.log_snr(0) {
            return 0.0;
        }
        if log_snr <= self.log_snr(n - 1) {
            return (n - 1) as f64;
        }
        // binary search for the bracketing pair lam[i] >= log_snr > lam[i+1].
        let (mut lo, mut hi) = (0usize, n - 1);
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if self.log_snr(mid) >= log_snr {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let (l0, l1) = (self.log_snr(lo), self.log_snr(hi));
        lo as f64 + (l0 - log_snr) / (l0 - l1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(a: f64, b: f64) -> f64 {
        (a - b).abs() / b.abs().max(1e-300)
    }

    #[test]
    fn alpha_bar_is_product_of_alpha() {
        let s = Schedule::named("linear", 50).unwrap();
        let mut p = 1.0;
        for i in 0..50 {
            p *= 1.0 - s.beta[i];
            assert!(rel(s.alpha_bar[i], p) < 1e-14);
        }
        // beta_1 = beta_start, beta_T = beta_end for the linear schedule.
        assert!(rel(s.beta[0], 1e-4) < 1e-14 && rel(s.beta[49], 0.02) < 1e-14);
    }

    #[test]
    fn posterior_variance_closed_form_and_clipped_log() {
        let s = Schedule::named("cosine", 20).unwrap();
        assert_eq!(s.posterior_variance[0], 0.0);
        assert_eq!(s.posterior_log_variance_clipped[0], s.posterior_variance[1].ln());
        for i in 1..20 {
            let expect = (1.0 - s.alpha_bar[i - 1]) / (1.0 - s.alpha_bar[i]) * s.beta[i];
            assert!(rel(s.posterior_variance[i], expect) < 1e-14);
            // beta~_t <= beta_t always (the posterior is narrower than the forward step).
            assert!(s.posterior_variance[i] <= s.beta[i]);
        }
    }

    #[test]
    fn posterior_mean_coefficients_reproduce_the_mean_of_an_exact_pair() {
        // mu~_t(x_0, x_t) with x_t = sqrt(alpha_bar_t) x_0 (no noise) must equal
        // sqrt(alpha_bar_{t-1}) x_0 (the deterministic path): coef1 + coef2 sqrt(alpha_bar_t)
        // = sqrt(alpha_bar_{t-1}).
        let s = Schedule::named("linear", 100).unwrap();
        for i in 0..100 {
            let lhs = s.posterior_mean_coef1[i] + s.posterior_mean_coef2[i] * s.sqrt_alpha_bar[i];
            assert!(rel(lhs, s.alpha_bar_prev[i].sqrt()) < 1e-12, "t = {}", i + 1);
        }
    }

    #[test]
    fn invalid_parameters_are_errors_naming_the_parameter() {
        let e = Schedule::named("linear", 1).unwrap_err().to_string();
        assert!(e.contains("timesteps") && e.contains("2..=100000"), "{e}");
        // a T read from a file cannot ask for tables of any size
        let e = Schedule::named("linear", MAX_TIMESTEPS + 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("got 100001"), "{e}");
        assert!(Schedule::named("cosine", MAX_TIMESTEPS).is_ok());
        let lin = BetaSchedule::from_name("linear").unwrap();
        let e = Schedule::new(&lin.clone().with_beta_range(2.0, 0.02).unwrap(), 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("beta_start") && e.contains("(0, 1)"), "{e}");
        let e = Schedule::new(&lin.clone().with_beta_range(0.02, 0.01).unwrap(), 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("beta_start"), "{e}");
        assert!(Schedule::new(&lin.with_beta_range(f64::NAN, 0.01).unwrap(), 10).is_err());
        let e = BetaSchedule::from_name("cosinus").unwrap_err().to_string();
        assert!(
            e.contains("cosinus") && e.contains("linear, scaled_linear"),
            "{e}"
        );
        assert!(Schedule::from_betas(vec![0.1, 0.0]).is_err());
        assert!(Schedule::from_betas(vec![0.1, 1.5]).is_err());
        assert!(BetaSchedule::from_name("cosine")
            .unwrap()
            .with_beta_range(1e-4, 0.02)
            .is_err());
    }

    #[test]
    fn zero_terminal_snr_is_allowed_and_finite_where_it_can_be() {
        let s = Schedule::from_betas(vec![0.1, 0.5, 1.0]).unwrap();
        assert_eq!(s.alpha_bar[2], 0.0);
        assert_eq!(s.snr[2], 0.0);
        assert!(s.posterior_variance.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn seed001_literal_cosine_is_not_a_schedule() {
        // The literal form reaches 0 at t/T = 1 - s = 0.992 and rises again: alpha_bar would
        // not be monotone, and beta_t = 1 - alpha_bar_t/alpha_bar_{t-1} would be negative.
        let t_len = 1000;
        let s = 0.008;
        let at = |t: f64| seed001_literal_cosine_alpha_bar(t, t_len, s);
        assert!(at(992.0) < 1e-12, "zero at t = 992: {}", at(992.0));
        assert!(at(1000.0) > at(993.0), "rises after the zero");
        let beta_last = 1.0 - at(1000.0) / at(999.0);
        assert!(beta_last < 0.0, "negative beta {beta_last}");
        // The paper's form is monotone and stays a valid schedule.
        let good = Schedule::named("cosine", t_len).unwrap();
        assert!(good.alpha_bar.windows(2).all(|w| w[1] < w[0]));
    }

    #[test]
    fn geodiff_sigmoid_exact_values() {
        // T = 3: linspace(-6, 6, 3) = [-6, 0, 6]; the middle beta is 0.5 * (end - start) + start.
        let b = geodiff_sigmoid_betas(3, 1e-4, 0.02).unwrap();
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        assert!(rel(b[1], 0.5 * (0.02 - 1e-4) + 1e-4) < 1e-15);
        assert!(rel(b[0], sig(-6.0) * (0.02 - 1e-4) + 1e-4) < 1e-15);
        assert!(rel(b[2], sig(6.0) * (0.02 - 1e-4) + 1e-4) < 1e-15);
        // symmetric about the middle: beta_1 + beta_T = 2 * beta_mid (sigmoid(-x) = 1 - sigmoid(x))
        assert!(rel(b[0] + b[2], 2.0 * b[1]) < 1e-14);
        assert!(geodiff_sigmoid_betas(1, 1e-4, 0.02).is_err());
        assert!(geodiff_sigmoid_betas(10, 0.02, 1e-4).is_err());
    }

    #[test]
    fn zero_terminal_snr_rescale() {
        let betas = Schedule::named("linear", 1000).unwrap().beta;
        let r = rescale_zero_terminal_snr(&betas).unwrap();
        let s = Schedule::from_betas(r.clone()).unwrap();
        let orig = Schedule::from_betas(betas).unwrap();
        assert_eq!(r[999], 1.0);
        assert_eq!(s.alpha_bar[999], 0.0);
        assert!(rel(s.alpha_bar[0], orig.alpha_bar[0]) < 1e-14);
        // Interior: sqrt(alpha_bar'_t) = (s_t - s_T) s_1 / (s_1 - s_T), checked at t = 500.
        let (s1, st, sm) = (
            orig.sqrt_alpha_bar[0],
            orig.sqrt_alpha_bar[999],
            orig.sqrt_alpha_bar[499],
        );
        assert!(rel(s.sqrt_alpha_bar[499], (sm - st) * s1 / (s1 - st)) < 1e-12);
        assert!(rescale_zero_terminal_snr(&[0.5]).is_err());
    }

    #[test]
    fn index_for_log_snr_inverts_the_table() {
        let s = Schedule::named("cosine", 1000).unwrap();
        for &i in &[0usize, 1, 17, 500, 998, 999] {
            let got = s.index_for_log_snr(s.log_snr(i));
            assert!((got - i as f64).abs() < 1e-9, "i = {i}: {got}");
        }
        let mid = 0.5 * (s.log_snr(10) + s.log_snr(11));
        let got = s.index_for_log_snr(mid);
        assert!((got - 10.5).abs() < 1e-9, "{got}");
        assert_eq!(s.index_for_log_snr(100.0), 0.0);
        assert_eq!(s.index_for_log_snr(-100.0), 999.0);
    }
}
