//! Forward processes: the discrete DDPM chain and the continuous-time families of Score-SDE.
//!
//! Every process has Gaussian marginals `x_t = alpha(t) * x_0 + sigma(t) * eps` (a
//! [`NoiseLevel`]); the continuous ones are the linear SDEs
//!
//! ```text
//! dx = f(t) x dt + g(t) dw,        t in [t_eps, t_max]          (Song et al. 2021, eq. 5)
//! ```
//!
//! whose mean scale and variance obey `d alpha/dt = f alpha` and
//! `d sigma^2/dt = 2 f sigma^2 + g^2` (Särkkä & Solin 2019, eq. 5.51; Score-SDE appendix B).
//! The reverse-time SDE and the probability-flow ODE are
//!
//! ```text
//! dx = [f(t) x - g(t)^2 score(x, t)] dt + g(t) dw_bar                  (Song et al. 2021, eq. 6)
//! dx/dt = f(t) x - 1/2 g(t)^2 score(x, t)                              (Song et al. 2021, eq. 13)
//! ```
//!
//! | name | family | alpha(t), sigma(t) | f(t), g(t) |
//! | --- | --- | --- | --- |
//! | `ddpm` | discrete, [`Schedule`] | `sqrt(alpha_bar_t)`, `sqrt(1 - alpha_bar_t)` | — |
//! | `vp` | VP, linear beta | `exp(-1/4 t^2 (b1 - b0) - 1/2 t b0)`, `sqrt(1 - alpha^2)` | `-beta(t)/2`, `sqrt(beta(t))` |
//! | `vp-cosine` | VP, cosine | `cos(u(t)) / cos(u(0))`, `u = (t + s)/(1 + s) pi/2`, `sqrt(1 - alpha^2)` | `-beta(t)/2`, `sqrt(beta(t))`, `beta = pi/(1+s) tan u(t)` |
//! | `subvp` | sub-VP | as VP, `1 - alpha^2` | `-beta(t)/2`, `sqrt(beta(t) (1 - alpha^4))` |
//! | `ve` | VE, geometric | `1`, `sqrt(s(t)^2 - sigma_min^2)`, `s(t) = sigma_min (sigma_max/sigma_min)^t` | `0`, `s(t) sqrt(2 ln(sigma_max/sigma_min))` |
//! | `seed-ve` | seed 000 | `1`, `sigma_q sqrt(t)` | `0`, `sigma_q` |
//!
//! VP and sub-VP: Song et al. 2021, eqs. 11 and 29 (beta_min 0.1, beta_max 20, t_eps 1e-3).
//! VE: eq. 9 and 30 (sigma_min 0.01, sigma_max 50, t_eps 1e-5), with the exact marginal of the
//! SDE started from the data at t = 0, variance `s(t)^2 - s(0)^2` (Song et al. 2021, eq. 29).
//! Score-SDE's code takes the std to be `s(t)` itself, which blurs the data by sigma_min = 0.01
//! even at t = 0 (0.5 nats of log-density at a point far from a 2-D mixture); with the exact
//! kernel the VE family reaches the clean data at t = 0 and agrees with `s(t)` to 1e-4 relative
//! for t > 0.5. Cosine: Nichol & Dhariwal 2021,
//! eq. 17 in continuous time, as in DPM-Solver's `NoiseScheduleVP('cosine')`, stopped at
//! t_max = 0.9946 where beta(t) is still finite (beta(1) is infinite). Seed 000 (Nakkiran et al.
//! 2024, "Step-by-Step Diffusion", section 2): `x_{t+dt} = x_t + N(0, sigma_q^2 dt)`, marginal
//! `N(x_0, sigma_q^2 t)`, t in [0, 1].

use crate::denoiser::NoiseLevel;
use crate::error::{check_range, Error, Result};
use crate::schedule::Schedule;

/// Default sigma_q of the seed-000 process: 100. The prior at t = 1 is taken to be
/// N(0, sigma_q^2 I), while the true x_1 is the data blurred by N(0, sigma_q^2 I): a data mean m
/// off the origin shifts it by |m| / sigma_q standard deviations. Stochastic samplers correct
/// that on the way; deterministic ones (DDIM, the ODEs) carry it to the end, where it moves
/// mass between far-apart modes. Measured with the oracle (n = 4000, a mixture with mean
/// 2.1 from the origin and modes 10 apart): sigma_q = 50 (VE's sigma_max) leaves an energy
/// distance 2.4 times the null band's 95th percentile for every ODE sampler; the effect
/// falls as 1/sigma_q^2, and doubling sigma_q costs ~8% more steps on the log-SNR grid.
pub const SEED_VE_SIGMA_Q: f64 = 100.0;

/// The noise std at which seed-ve stops (t_eps): 0.01, as VP at its t_eps.
const VE_SIGMA_EPS: f64 = 0.01;

/// DPM-Solver's end time for the continuous cosine schedule (beta(t) is infinite at t = 1).
pub const VP_COSINE_T_MAX: f64 = 0.9946;

/// A continuous-time forward process (a linear SDE `dx = f(t) x dt + g(t) dw`).
#[derive(Clone, Debug, PartialEq)]
pub enum Sde {
    /// Variance preserving, `beta(t) = beta_min + t (beta_max - beta_min)` (Song et al. 2021, eq. 11).
    Vp {
        /// beta(0) (0.1).
        beta_min: f64,
        /// beta(1) (20).
        beta_max: f64,
    },
    /// Variance preserving with the cosine alpha_bar of Nichol & Dhariwal (2021) in continuous time.
    VpCosine {
        /// Offset s (0.008).
        s: f64,
    },
    /// Sub-VP: VP's mean, variance `(1 - alpha^2)^2` (Song et al. 2021, eq. 29).
    SubVp {
        /// beta(0) (0.1).
        beta_min: f64,
        /// beta(1) (20).
        beta_max: f64,
    },
    /// Variance exploding, `sigma(t) = sigma_min (sigma_max / sigma_min)^t` (Song et al. 2021, eq. 9).
    Ve {
        /// sigma(0) (0.01).
        sigma_min: f64,
        /// sigma(1) (50).
        sigma_max: f64,
    },
    /// Seed 000 / Nakkiran et al. (2024): `x_{t+dt} = x_t + N(0, sigma_q^2 dt)`, `sigma(t) = sigma_q sqrt(t)`.
    SeedVe {
        /// The noise scale sigma_q ([`SEED_VE_SIGMA_Q`] by default).
        sigma_q: f64,
    },
}

/// Where the time points of a continuous sampler lie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeGrid {
    /// Uniform in t from t_max to t_eps (Score-SDE's samplers).
    Uniform,
    /// Uniform in log-SNR = 2 ln(alpha / sigma). For the VE family this equals `Uniform`; for
    /// seed-ve it is geometric in t, where a uniform grid would spend almost every step at high
    /// noise (sigma^2 grows linearly in t).
    UniformLogSnr,
    /// Karras et al. (2022, eq. 5): the EDM noise `sigma/alpha` spaced uniformly in
    /// `sigma^(1/rho)` with rho = 7, mapped back to times: more steps at low noise.
    Karras,
}

impl TimeGrid {
    /// Parses `uniform` or `log-snr`.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "uniform" => Ok(TimeGrid::Uniform),
            "log-snr" | "log_snr" => Ok(TimeGrid::UniformLogSnr),
            "karras" => Ok(TimeGrid::Karras),
            other => Err(Error::param(
                "spacing",
                format!(
                    "unknown time grid '{other}' for a continuous process, expected uniform, log-snr or karras"
                ),
            )),
        }
    }
}

impl Sde {
    /// Score-SDE's VP SDE (beta_min 0.1, beta_max 20).
    pub fn vp() -> Self {
        Sde::Vp {
            beta_min: 0.1,
            beta_max: 20.0,
        }
    }

    /// Score-SDE's sub-VP SDE (beta_min 0.1, beta_max 20).
    pub fn subvp() -> Self {
        Sde::SubVp {
            beta_min: 0.1,
            beta_max: 20.0,
        }
    }

    /// Score-SDE's VE SDE (sigma_min 0.01, sigma_max 50).
    pub fn ve() -> Self {
        Sde::Ve {
            sigma_min: 0.01,
            sigma_max: 50.0,
        }
    }

    /// The continuous cosine VP SDE (s = 0.008).
    pub fn vp_cosine() -> Self {
        Sde::VpCosine { s: 0.008 }
    }

    /// The seed-000 process with sigma_q = [`SEED_VE_SIGMA_Q`].
    pub fn seed_ve() -> Self {
        Sde::SeedVe {
            sigma_q: SEED_VE_SIGMA_Q,
        }
    }

    /// Checks the parameters (positive, finite, ordered).
    pub fn validate(&self) -> Result<()> {
        let pos = (0.0, false);
        let inf = (f64::INFINITY, false);
        match *self {
            Sde::Vp { beta_min, beta_max } | Sde::SubVp { beta_min, beta_max } => {
                check_range("beta_min", beta_min, pos, inf)?;
                check_range("beta_max", beta_max, (beta_min, true), inf)?;
            }
            Sde::VpCosine { s } => {
                check_range("s", s, (0.0, true), (1.0, false))?;
            }
            Sde::Ve { sigma_min, sigma_max } => {
                check_range("sigma_min", sigma_min, pos, inf)?;
                check_range("sigma_max", sigma_max, (sigma_min, false), inf)?;
            }
            Sde::SeedVe { sigma_q } => {
                check_range("sigma_q", sigma_q, pos, inf)?;
            }
        }
        Ok(())
    }

    /// The CLI name: `vp`, `vp-cosine`, `subvp`, `ve`, `seed-ve`.
    pub fn name(&self) -> &'static str {
        match self {
            Sde::Vp { .. } => "vp",
            Sde::VpCosine { .. } => "vp-cosine",
            Sde::SubVp { .. } => "subvp",
            Sde::Ve { .. } => "ve",
            Sde::SeedVe { .. } => "seed-ve",
        }
    }

    /// ln alpha(t) for the VP-type families (0 for the VE types).
    fn log_alpha(&self, t: f64) -> f64 {
        match *self {
            Sde::Vp { beta_min, beta_max } | Sde::SubVp { beta_min, beta_max } => {
                -0.25 * t * t * (beta_max - beta_min) - 0.5 * t * beta_min
            }
            Sde::VpCosine { s } => {
                let u = |t: f64| (t + s) / (1.0 + s) * std::f64::consts::FRAC_PI_2;
                u(t).cos().ln() - u(0.0).cos().ln()
            }
            Sde::Ve { .. } | Sde::SeedVe { .. } => 0.0,
        }
    }

    /// The marginal `q(x_t | x_0) = N(alpha(t) x_0, sigma(t)^2 I)`.
    pub fn level(&self, t: f64) -> NoiseLevel {
        let la = self.log_alpha(t);
        match *self {
            // sigma^2 = 1 - alpha^2 = -expm1(2 ln alpha): accurate at small t.
            Sde::Vp { .. } | Sde::VpCosine { .. } => NoiseLevel::new(la.exp(), (-(2.0 * la).exp_m1()).sqrt()),
            Sde::SubVp { .. } => NoiseLevel::new(la.exp(), -(2.0 * la).exp_m1()),
            // sigma_min^2 ((sigma_max/sigma_min)^(2t) - 1), by expm1 for small t
            Sde::Ve { sigma_min, sigma_max } => NoiseLevel::new(
                1.0,
                sigma_min * (2.0 * t.max(0.0) * (sigma_max / sigma_min).ln()).exp_m1().sqrt(),
            ),
            Sde::SeedVe { sigma_q } => NoiseLevel::new(1.0, sigma_q * t.max(0.0).sqrt()),
        }
    }

    /// beta(t) = -2 d ln alpha / dt of the VP-type families (0 for VE types).
    pub fn beta(&self, t: f64) -> f64 {
        match *self {
            Sde::Vp { beta_min, beta_max } | Sde::SubVp { beta_min, beta_max } => {
                beta_min + t * (beta_max - beta_min)
            }
            Sde::VpCosine { s } => {
                std::f64::consts::PI / (1.0 + s) * ((t + s) / (1.0 + s) * std::f64::consts::FRAC_PI_2).tan()
            }
            Sde::Ve { .. } | Sde::SeedVe { .. } => 0.0,
        }
    }

    /// The drift coefficient f(t) of `f(x, t) = f(t) x`.
    pub fn drift_coef(&self, t: f64) -> f64 {
        -0.5 * self.beta(t)
    }

    /// The diffusion coefficient g(t).
    pub fn diffusion(&self, t: f64) -> f64 {
        match *self {
            Sde::Vp { .. } | Sde::VpCosine { .. } => self.beta(t).sqrt(),
            Sde::SubVp { .. } => {
                // g^2 = beta(t) (1 - exp(-2 int_0^t beta)) = beta(t) (1 - alpha^4)
                (self.beta(t) * -(4.0 * self.log_alpha(t)).exp_m1()).sqrt()
            }
            Sde::Ve { sigma_min, sigma_max } => {
                let r = sigma_max / sigma_min;
                sigma_min * r.powf(t) * (2.0 * r.ln()).sqrt()
            }
            Sde::SeedVe { sigma_q } => sigma_q,
        }
    }

    /// The smallest time samplers integrate to (Score-SDE: 1e-3 for VP and sub-VP, where
    /// sigma is 0.01 and 1e-4; 1e-5 for VE, where sigma is 1.3e-4; seed-ve: where sigma = 0.01).
    pub fn t_eps(&self) -> f64 {
        match *self {
            Sde::Vp { .. } | Sde::SubVp { .. } | Sde::VpCosine { .. } => 1e-3,
            Sde::Ve { .. } => 1e-5,
            Sde::SeedVe { sigma_q } => (VE_SIGMA_EPS / sigma_q).powi(2).min(1e-3),
        }
    }

    /// The time samplers start from: 1, except [`VP_COSINE_T_MAX`] for the cosine family.
    pub fn t_max(&self) -> f64 {
        match self {
            Sde::VpCosine { .. } => VP_COSINE_T_MAX,
            _ => 1.0,
        }
    }

    /// The std of the prior x_{t_max} ~ N(0, prior_std^2 I): 1 for the VP types (Score-SDE's
    /// `prior_sampling`), sigma(1) for VE (sqrt(sigma_max^2 - sigma_min^2)) and seed-ve (sigma_q).
    pub fn prior_std(&self) -> f64 {
        match *self {
            Sde::Vp { .. } | Sde::VpCosine { .. } | Sde::SubVp { .. } => 1.0,
            Sde::Ve { sigma_min, sigma_max } => (sigma_max * sigma_max - sigma_min * sigma_min).sqrt(),
            Sde::SeedVe { sigma_q } => sigma_q,
        }
    }

    /// ln N(x; 0, prior_std^2 I) for one point.
    pub fn prior_log_density(&self, x: &[f64]) -> f64 {
        let s2 = self.prior_std().powi(2);
        let d = x.len() as f64;
        let sq: f64 = x.iter().map(|v| v * v).sum();
        -0.5 * (d * (2.0 * std::f64::consts::PI * s2).ln() + sq / s2)
    }

    /// log-SNR(t) = 2 ln(alpha(t) / sigma(t)), decreasing in t.
    pub fn log_snr(&self, t: f64) -> f64 {
        self.level(t).log_snr()
    }

    /// The time in [t_eps, t_max] whose log-SNR is `log_snr` (bisection; clamped to the ends).
    pub fn t_for_log_snr(&self, log_snr: f64) -> f64 {
        let (mut lo, mut hi) = (self.t_eps(), self.t_max());
        if log_snr >= self.log_snr(lo) {
            return lo;
        }
        if log_snr <= self.log_snr(hi) {
            return hi;
        }
        for _ in 0..200 {
            let mid = 0.5 * (lo + hi);
            if mid <= lo || mid >= hi {
                break;
            }
            if self.log_snr(mid) > log_snr {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        0.5 * (lo + hi)
    }

    /// `steps + 1` times from t_max down to t_eps (both included), strictly decreasing.
    pub fn time_grid(&self, steps: usize, grid: TimeGrid) -> Result<Vec<f64>> {
        if steps == 0 {
            return Err(Error::param("steps", "got 0, expected at least 1"));
        }
        let (t0, t1) = (self.t_max(), self.t_eps());
        let n = steps as f64;
        let times: Vec<f64> = match grid {
            TimeGrid::Uniform => (0..=steps)
                .map(|i| {
                    if i == steps {
                        t1
                    } else {
                        t0 + (t1 - t0) * i as f64 / n
                    }
                })
                .collect(),
            TimeGrid::UniformLogSnr => {
                let (l0, l1) = (self.log_snr(t0), self.log_snr(t1));
                (0..=steps)
                    .map(|i| match i {
                        0 => t0,
                        i if i == steps => t1,
                        i => self.t_for_log_snr(l0 + (l1 - l0) * i as f64 / n),
                    })
                    .collect()
            }
            TimeGrid::Karras => {
                let rho = 7.0;
                let (a, b) = (
                    self.level(t0).edm_sigma().powf(1.0 / rho),
                    self.level(t1).edm_sigma().powf(1.0 / rho),
                );
                (0..=steps)
                    .map(|i| match i {
                        0 => t0,
                        i if i == steps => t1,
                        // log-SNR = -2 ln(sigma / alpha)
                        i => self.t_for_log_snr(-2.0 * rho * (a + (b - a) * i as f64 / n).ln()),
                    })
                    .collect()
            }
        };
        if times.windows(2).any(|w| w[1] >= w[0]) {
            return Err(Error::param(
                "steps",
                format!("{steps} steps are too many to give distinct times in [{t1}, {t0}]"),
            ));
        }
        Ok(times)
    }

    /// The default time grid: [`TimeGrid::UniformLogSnr`] for seed-ve (uniform in t would put the
    /// last step from sigma_q/sqrt(K) straight to 0), [`TimeGrid::Uniform`] otherwise (Score-SDE).
    pub fn default_grid(&self) -> TimeGrid {
        match self {
            Sde::SeedVe { .. } => TimeGrid::UniformLogSnr,
            _ => TimeGrid::Uniform,
        }
    }

    /// The process's noise level whose EDM noise `sigma / alpha` equals `edm_sigma` (Karras et
    /// al. 2022, section 4: a state `x` at this level is `alpha` times an EDM state).
    /// VP: `alpha = 1/sqrt(1 + s^2)`; sub-VP: `sigma = 1 - alpha^2`, so `alpha = (sqrt(s^2 + 4) - s)/2`;
    /// VE types: `alpha = 1`.
    pub fn level_for_edm_sigma(&self, edm_sigma: f64) -> NoiseLevel {
        let s = edm_sigma;
        match self {
            Sde::Vp { .. } | Sde::VpCosine { .. } => {
                let a = 1.0 / (1.0 + s * s).sqrt();
                NoiseLevel::new(a, s * a)
            }
            Sde::SubVp { .. } => {
                let a = 0.5 * ((s * s + 4.0).sqrt() - s);
                NoiseLevel::new(a, s * a)
            }
            Sde::Ve { .. } | Sde::SeedVe { .. } => NoiseLevel::new(1.0, s),
        }
    }
}

/// A forward process: the discrete DDPM chain or a continuous SDE.
// A Process is built once per run and matched everywhere; boxing the schedule would only
// complicate the matching.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Process {
    /// The discrete chain `q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)`, t = 1..T
    /// (Ho et al. 2020).
    Ddpm(Schedule),
    /// A continuous-time family.
    Continuous(Sde),
}

impl Process {
    /// The names `--process` accepts.
    pub const NAMES: [&'static str; 6] = ["ddpm", "vp", "vp-cosine", "subvp", "ve", "seed-ve"];

    /// The named process with its defaults; `schedule` is used only by `ddpm`.
    pub fn from_name(name: &str, schedule: impl FnOnce() -> Result<Schedule>) -> Result<Self> {
        Ok(match name {
            "ddpm" => Process::Ddpm(schedule()?),
            "vp" => Process::Continuous(Sde::vp()),
            "vp-cosine" | "vp_cosine" => Process::Continuous(Sde::vp_cosine()),
            "subvp" | "sub-vp" | "sub_vp" => Process::Continuous(Sde::subvp()),
            "ve" => Process::Continuous(Sde::ve()),
            "seed-ve" | "seed_ve" => Process::Continuous(Sde::seed_ve()),
            other => {
                return Err(Error::param(
                    "process",
                    format!(
                        "unknown process '{other}', expected one of: {}",
                        Self::NAMES.join(", ")
                    ),
                ))
            }
        })
    }

    /// The CLI name.
    pub fn name(&self) -> &'static str {
        match self {
            Process::Ddpm(_) => "ddpm",
            Process::Continuous(sde) => sde.name(),
        }
    }

    /// The std of the prior x_T: 1 for DDPM, see [`Sde::prior_std`] otherwise.
    pub fn prior_std(&self) -> f64 {
        match self {
            Process::Ddpm(_) => 1.0,
            Process::Continuous(sde) => sde.prior_std(),
        }
    }
}

/// The DDPM level at index `i` (t = i + 1): `(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t))`.
pub fn ddpm_level(schedule: &Schedule, i: usize) -> NoiseLevel {
    NoiseLevel::new(schedule.sqrt_alpha_bar[i], schedule.sqrt_one_minus_alpha_bar[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Sde> {
        vec![
            Sde::vp(),
            Sde::vp_cosine(),
            Sde::subvp(),
            Sde::ve(),
            Sde::seed_ve(),
        ]
    }

    #[test]
    fn marginals_match_closed_forms() {
        // VP at t = 0.5: int_0^t beta = 0.1 * 0.5 + 0.5 * 0.25 * 19.9 = 2.5375,
        // alpha = exp(-2.5375 / 2).
        let l = Sde::vp().level(0.5);
        let a = (-2.5375f64 / 2.0).exp();
        assert!((l.alpha - a).abs() < 1e-15);
        assert!((l.sigma - (1.0 - a * a).sqrt()).abs() < 1e-15);
        // sub-VP: same alpha, sigma = 1 - alpha^2.
        let l = Sde::subvp().level(0.5);
        assert!((l.alpha - a).abs() < 1e-15 && (l.sigma - (1.0 - a * a)).abs() < 1e-15);
        // VE at t = 0.5: 0.01 * sqrt(5000^(2 * 0.5) - 1) = 0.7070...; 0 at t = 0; g(t) = s(t) sqrt(2 ln 5000)
        let l = Sde::ve().level(0.5);
        assert!((l.sigma - 0.01 * 4999f64.sqrt()).abs() < 1e-13 && l.alpha == 1.0);
        assert_eq!(Sde::ve().level(0.0).sigma, 0.0);
        let g = Sde::ve().diffusion(0.5);
        assert!((g - 0.01 * 5000f64.sqrt() * (2.0 * 5000f64.ln()).sqrt()).abs() < 1e-12);
        // seed-ve: sigma_q sqrt(t) = 100 * 0.5.
        let l = Sde::seed_ve().level(0.25);
        assert!((l.sigma - 50.0).abs() < 1e-13);
        // cosine: alpha^2 = cos^2(u(t)) / cos^2(u(0)), at t = 0.5 by hand.
        let u = |t: f64| (t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2;
        let l = Sde::vp_cosine().level(0.5);
        assert!((l.alpha - u(0.5).cos() / u(0.0).cos()).abs() < 1e-15);
        // every VP-type level has alpha^2 + sigma^2 = 1 at every t.
        for t in [1e-3, 0.3, 0.9] {
            for s in [Sde::vp(), Sde::vp_cosine()] {
                let l = s.level(t);
                assert!((l.alpha.powi(2) + l.sigma.powi(2) - 1.0).abs() < 1e-14);
            }
        }
    }

    /// d alpha/dt = f alpha and d sigma^2/dt = 2 f sigma^2 + g^2 (the moment equations of a
    /// linear SDE), checked by central differences (h = 1e-5: truncation error ~ h^2 * third
    /// derivative, far below the 1e-6 relative tolerance).
    #[test]
    fn drift_and_diffusion_are_consistent_with_the_marginal() {
        for sde in all() {
            for t in [0.01, 0.2, 0.5, 0.8, 0.95] {
                let h = 1e-5;
                let (lp, lm, l) = (sde.level(t + h), sde.level(t - h), sde.level(t));
                let dalpha = (lp.alpha - lm.alpha) / (2.0 * h);
                let dvar = (lp.sigma.powi(2) - lm.sigma.powi(2)) / (2.0 * h);
                let f = sde.drift_coef(t);
                let g2 = sde.diffusion(t).powi(2);
                let want_dvar = 2.0 * f * l.sigma.powi(2) + g2;
                assert!(
                    (dalpha - f * l.alpha).abs() <= 1e-6 * (f * l.alpha).abs().max(1e-9),
                    "{} t={t}: dalpha {dalpha} vs {}",
                    sde.name(),
                    f * l.alpha
                );
                assert!(
                    (dvar - want_dvar).abs() <= 1e-6 * want_dvar.abs(),
                    "{} t={t}: dvar {dvar} vs {want_dvar}",
                    sde.name()
                );
            }
        }
    }

    #[test]
    fn time_grids_are_decreasing_and_hit_the_ends() {
        for sde in all() {
            for grid in [TimeGrid::Uniform, TimeGrid::UniformLogSnr, TimeGrid::Karras] {
                let ts = sde.time_grid(50, grid).unwrap();
                assert_eq!(ts.len(), 51);
                assert_eq!(ts[0], sde.t_max());
                assert_eq!(ts[50], sde.t_eps());
                assert!(ts.windows(2).all(|w| w[1] < w[0]));
            }
            // log-SNR grid: equal log-SNR increments.
            let ts = sde.time_grid(10, TimeGrid::UniformLogSnr).unwrap();
            let l: Vec<f64> = ts.iter().map(|&t| sde.log_snr(t)).collect();
            let d0 = l[1] - l[0];
            for w in l.windows(2) {
                assert!(((w[1] - w[0]) - d0).abs() < 1e-8 * d0.abs(), "{}", sde.name());
            }
        }
        assert!(Sde::vp().time_grid(0, TimeGrid::Uniform).is_err());
    }

    #[test]
    fn edm_levels_have_the_requested_edm_sigma_and_lie_on_the_process_curve() {
        for sde in all() {
            for t in [0.01, 0.3, 0.9] {
                let l = sde.level(t);
                let m = sde.level_for_edm_sigma(l.edm_sigma());
                assert!(
                    (m.alpha - l.alpha).abs() < 1e-12 * l.alpha.max(1.0),
                    "{}",
                    sde.name()
                );
                assert!(
                    (m.sigma - l.sigma).abs() < 1e-12 * l.sigma.max(1.0),
                    "{}",
                    sde.name()
                );
            }
        }
    }

    #[test]
    fn names_and_validation() {
        for name in Process::NAMES {
            let p = Process::from_name(name, || Schedule::named("linear", 10)).unwrap();
            assert_eq!(p.name(), name);
        }
        assert!(Process::from_name("vpp", || Schedule::named("linear", 10)).is_err());
        assert!(Sde::Ve {
            sigma_min: 1.0,
            sigma_max: 0.5
        }
        .validate()
        .is_err());
        assert!(Sde::SeedVe { sigma_q: f64::NAN }.validate().is_err());
        for sde in all() {
            sde.validate().unwrap();
        }
        // the seed-ve prior std is sigma(1) and t_eps is where sigma = 0.01.
        let s = Sde::seed_ve();
        assert!((s.level(1.0).sigma - s.prior_std()).abs() < 1e-12);
        assert!((s.level(s.t_eps()).sigma - 0.01).abs() < 1e-12);
    }
}
