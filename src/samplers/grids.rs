//! The noise-level grids of diffusers' fast schedulers (DPM-Solver, DPM-Solver++, UniPC, DEIS,
//! Euler, Euler ancestral, Heun), reproduced array for array, plus `logsnr`, on every process.
//!
//! A grid is K + 1 noise levels `(alpha_k, sigma_k)`: the solver evaluates the denoiser at the
//! first K and its last step lands on the last one (the *final* level). Levels are also given
//! as the EDM noise `s = sigma / alpha` (Karras et al. 2022, section 4; diffusers' `sigmas`)
//! and the log-SNR half `lambda = ln(alpha / sigma) = -ln s` (Lu et al. 2022, section 3.1). On the
//! discrete `ddpm` process the level of s is `alpha = 1 / sqrt(1 + s^2)`, `sigma = s alpha`
//! (diffusers' `_sigma_to_alpha_sigma_t`); on a continuous process it is the process's own
//! level with that EDM noise ([`Sde::level_for_edm_sigma`]).
//!
//! **The ddpm process** (T training steps, `s_i = sqrt((1 - alpha_bar_i) / alpha_bar_i)`, index
//! i is diffusers' timestep i):
//!
//! | [`SigmaGrid`] | the K evaluation sigmas | diffusers |
//! | --- | --- | --- |
//! | `spacing` (default) | `s` at the [`spacing_timesteps`] (`numpy.interp` between table entries) | every scheduler's default |
//! | `karras` | `(s_max^(1/7) + i/(K-1) (s_min^(1/7) - s_max^(1/7)))^7` (Karras et al. 2022, eq. 5, rho = 7) | `use_karras_sigmas` |
//! | `exponential` | `exp(linspace(ln s_max, ln s_min, K))` | `use_exponential_sigmas` |
//! | `beta` | `s_min + F^-1(1 - i/(K-1)) (s_max - s_min)`, F the Beta(0.6, 0.6) CDF (Lee et al. 2024) | `use_beta_sigmas` |
//! | `logsnr` | K + 1 levels uniform in lambda from lambda(s_max) to lambda(s_min) (DPM-Solver's `skip_type='logSNR'`, Lu et al. 2022, section 3.3) | none: ours |
//! | `time-quadratic`, `-cubic`, `-quartic` | K + 1 times uniform in `t^(1/p)`, p = 2, 3, 4, from t = 1 to t = 1/T (`t = (i + 1)/T`; DPM-Solver's `skip_type='time_quadratic'` for p = 2, its `t_order` generalised), s by interpolation | none: ours |
//!
//! Measured with the exact denoiser (`tests/fast_samplers_oracle.rs`, `examples/fast_sampler_table.md`):
//! at 10 steps every diffusers default grid leaves `dpmpp-2m` 2 to 7 times outside the energy
//! distance's null band on small mixtures, and `logsnr` over the whole table is no better (3.4 to
//! 3.8 times): both spend too few steps near the data. `time-quartic` ending at sigma-min puts
//! `dpmpp-2m` inside the band at 10 steps, with every component's spread within 10% of the
//! converged flow's (diffusers' default: the std-0.05 component at 0.36 of its spread).
//! The range is the whole table (`s_min = s_0`, `s_max = s_{T-1}`) for the multistep and
//! singlestep solvers, and the spacing's own sigmas (first and last) for Euler and Heun, as in
//! diffusers; `sigma_min`/`sigma_max` override it (diffusers' config keys of the same name).
//! The final level ([`FinalSigma`], diffusers' `final_sigmas_type`) is 0 (`zero`: the last step
//! returns the denoised mean) or `sigma-min` (`s_0`; UniPC and DEIS on the karras, exponential
//! and beta grids: the grid's own last sigma, so diffusers' last step there has length 0).
//! `logsnr` and the time-power grids with `sigma-min` have K steps ending at `s_min` (no
//! zero-length step); with `zero` their K evaluation levels are the first K of the K + 1 and the
//! last step goes to 0 (`logsnr` is then diffusers' `exponential`).
//!
//! **Timestep spacings** ([`spacing_timesteps`], diffusers' `set_timesteps`):
//!
//! | spacing | multistep / singlestep (DPM, UniPC, DEIS) | Euler family |
//! | --- | --- | --- |
//! | `linspace` | `round(linspace(0, T' - 1, K + 1))`, reversed, the last (0) dropped | `linspace(0, T - 1, K)` (not rounded), reversed |
//! | `leading` | `i (T' div (K + 1)) + steps_offset`, i = K..1 | `i (T div K) + steps_offset`, i = K-1..0 |
//! | `trailing` | `round(T' - i T/K) - 1`, i = 0..K | the same |
//!
//! with `T' = T - (number of training steps whose lambda is below lambda_min_clipped)` (DPM-Solver
//! only; `lambda_min_clipped = -inf` by default). Rounding is numpy's: ties to even (`linspace(0,
//! 999, 7)` holds 166.5, which numpy rounds to 166 and Rust's `round` to 167; field notes bug 1).
//!
//! Fixed here, each a documented difference from diffusers:
//! - K = T with `linspace` rounds two timesteps to the same value (T = 1000: 499.5 and 500.5
//!   both give 500), a zero-length step after which diffusers' second-order multistep update
//!   divides 0 by 0 (NaN). We move each repeat down to the next free timestep, so K = T gives
//!   every timestep once. (`leading` with K >= T has stride 0: an error.)
//! - `trailing` through numpy's float `arange` gives K + 1 timesteps, the last -1, for some K
//!   (T = 1000: K = 61, 103, ...); diffusers then runs K + 1 steps. We take exactly K.
//!
//! Model timesteps: diffusers feeds its network the [`LevelGrid::timesteps`] (rounded for the
//! multistep karras grid, truncated to integers for exponential and beta, fractional for the
//! Euler family), while its solver uses the unrounded sigma. `diffuse` samplers call the
//! denoiser at the solver's own level (a U-Net adapter maps it to the fractional timestep of the
//! same log-SNR), so with a real network the two differ by that rounding.
//!
//! **Continuous processes** (t in [t_eps, t_max]): `spacing` is the process's default time
//! grid ([`Sde::default_grid`]): DPM-Solver's `time_uniform` (K + 1 times uniform in t from t_max
//! to t_eps for the multistep solvers, the last one being the `sigma-min` final level; K times
//! from t_max to t_eps for the Euler family), and `logsnr` for seed-ve, where uniform t spends
//! every step at high noise; the sigma grids use `s_min = s(t_eps)`, `s_max = s(t_max)`; the
//! time-power grids are uniform in `t^(1/p)` on [t_eps, t_max]. `--spacing` other than
//! `linspace` applies to the ddpm process only.

use crate::denoiser::NoiseLevel;
use crate::error::{Error, Result};
use crate::nets::scheduler_config::{SchedulerConfig, TimestepSpacing, VarianceType};
use crate::process::{Process, Sde};
use crate::schedule::Schedule;

use super::timesteps::Spacing;

/// Karras et al.'s rho (eq. 5).
pub const KARRAS_RHO: f64 = 7.0;

/// diffusers' `_convert_to_beta` shape parameters (alpha = beta = 0.6).
pub const BETA_SIGMAS_AB: f64 = 0.6;

/// Where the K evaluation sigmas lie (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SigmaGrid {
    /// The sigmas of the timestep spacing (every scheduler's default).
    Spacing,
    /// Karras et al. (2022, eq. 5), rho = 7.
    Karras,
    /// Uniform in ln sigma.
    Exponential,
    /// Beta(0.6, 0.6) quantiles.
    Beta,
    /// K + 1 levels uniform in log-SNR (DPM-Solver's `logSNR` skip type).
    LogSnr,
    /// K + 1 times uniform in `t^(1/p)` (DPM-Solver's `time_quadratic` skip type for p = 2,
    /// its `t_order` generalised): finer steps at low noise the larger p.
    TimePower(u32),
}

impl SigmaGrid {
    /// The names the options accept.
    pub const NAMES: [&'static str; 8] = [
        "spacing",
        "karras",
        "exponential",
        "beta",
        "logsnr",
        "time-quadratic",
        "time-cubic",
        "time-quartic",
    ];

    /// Parses a grid name (`default` is `spacing`; `log-snr` is `logsnr`).
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "spacing" | "default" | "timesteps" => Ok(SigmaGrid::Spacing),
            "karras" => Ok(SigmaGrid::Karras),
            "exponential" => Ok(SigmaGrid::Exponential),
            "beta" => Ok(SigmaGrid::Beta),
            "logsnr" | "log-snr" | "log_snr" => Ok(SigmaGrid::LogSnr),
            "time-quadratic" | "time_quadratic" => Ok(SigmaGrid::TimePower(2)),
            "time-cubic" => Ok(SigmaGrid::TimePower(3)),
            "time-quartic" => Ok(SigmaGrid::TimePower(4)),
            other => Err(Error::param(
                "sigmas",
                format!(
                    "unknown sigma grid '{other}', expected one of: {}",
                    Self::NAMES.join(", ")
                ),
            )),
        }
    }

    /// The canonical name.
    pub fn name(&self) -> &'static str {
        match self {
            SigmaGrid::Spacing => "spacing",
            SigmaGrid::Karras => "karras",
            SigmaGrid::Exponential => "exponential",
            SigmaGrid::Beta => "beta",
            SigmaGrid::LogSnr => "logsnr",
            SigmaGrid::TimePower(2) => "time-quadratic",
            SigmaGrid::TimePower(3) => "time-cubic",
            SigmaGrid::TimePower(4) => "time-quartic",
            SigmaGrid::TimePower(_) => "time-power",
        }
    }
}

/// The level the last step lands on (diffusers' `final_sigmas_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinalSigma {
    /// sigma = 0: the last step returns the denoiser's x_0 (which, taken at a sigma larger than
    /// a mixture component's width, shrinks that component towards its mean).
    Zero,
    /// The smallest sigma of the training table (or of the grid; see the module docs): the
    /// output keeps noise of that std.
    SigmaMin,
}

impl FinalSigma {
    /// Parses `zero` or `sigma-min` (`sigma_min`).
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "zero" => Ok(FinalSigma::Zero),
            "sigma-min" | "sigma_min" => Ok(FinalSigma::SigmaMin),
            other => Err(Error::param(
                "final-sigma",
                format!("unknown final sigma '{other}', expected zero or sigma-min"),
            )),
        }
    }

    /// The canonical name.
    pub fn name(&self) -> &'static str {
        match self {
            FinalSigma::Zero => "zero",
            FinalSigma::SigmaMin => "sigma-min",
        }
    }
}

/// Which diffusers scheduler's conventions a grid follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GridStyle {
    /// `DPMSolverMultistepScheduler`, `UniPCMultistepScheduler`, `DEISMultistepScheduler` and
    /// `DPMSolverSinglestepScheduler`: K + 1 rounded timesteps, the last dropped; karras over the
    /// whole table, its timesteps rounded.
    Multistep,
    /// `EulerDiscreteScheduler`, `EulerAncestralDiscreteScheduler`, `HeunDiscreteScheduler`:
    /// K timesteps, fractional for linspace; karras over the spacing's own range.
    Sigma,
}

/// What `sigma-min` means for the karras, exponential and beta grids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SigmaMinRule {
    /// The table's first sigma `s_0` (DPM-Solver, Euler).
    FirstTrainingStep,
    /// The grid's own last sigma (UniPC, DEIS: a zero-length last step).
    LastGridSigma,
}

/// The grid choices a user makes (diffusers' config keys in brackets).
#[derive(Clone, Debug, PartialEq)]
pub struct GridOptions {
    /// The sigma grid (`use_karras_sigmas`, `use_exponential_sigmas`, `use_beta_sigmas`; default
    /// the spacing's own).
    pub sigmas: SigmaGrid,
    /// The timestep spacing (`timestep_spacing`, default linspace); ddpm process only.
    pub spacing: Spacing,
    /// Added to leading timesteps (`steps_offset`, 0).
    pub steps_offset: usize,
    /// The final level (`final_sigmas_type`; None: the sampler's default).
    pub final_sigma: Option<FinalSigma>,
    /// Overrides the lower end of the karras / exponential / beta / logsnr range (`sigma_min`).
    pub sigma_min: Option<f64>,
    /// Overrides the upper end of that range (`sigma_max`).
    pub sigma_max: Option<f64>,
}

impl Default for GridOptions {
    fn default() -> Self {
        GridOptions {
            sigmas: SigmaGrid::Spacing,
            spacing: Spacing::Linspace,
            steps_offset: 0,
            final_sigma: None,
            sigma_min: None,
            sigma_max: None,
        }
    }
}

impl GridOptions {
    /// The grid keys of a diffusers scheduler config: `use_karras_sigmas`,
    /// `use_exponential_sigmas` (and `use_lu_lambdas`, uniform in lambda over the table: the same
    /// sigmas), `use_beta_sigmas`, `timestep_spacing`, `steps_offset`, `final_sigmas_type`,
    /// `sigma_min` / `sigma_max`. Flow-matching keys and Euler's `log_linear` interpolation are
    /// errors naming the key.
    pub fn from_scheduler_config(cfg: &SchedulerConfig) -> Result<Self> {
        let f = &cfg.solver;
        let set: Vec<&str> = [
            ("use_karras_sigmas", f.use_karras_sigmas),
            ("use_exponential_sigmas", f.use_exponential_sigmas),
            ("use_beta_sigmas", f.use_beta_sigmas),
            ("use_lu_lambdas", f.use_lu_lambdas),
        ]
        .iter()
        .filter(|(_, on)| *on)
        .map(|(k, _)| *k)
        .collect();
        if set.len() > 1 {
            return Err(Error::param(
                set[1],
                format!(
                    "only one of {} can be used (diffusers raises too)",
                    set.join(", ")
                ),
            ));
        }
        for (key, on) in [
            ("use_flow_sigmas", f.use_flow_sigmas),
            ("use_dynamic_shifting", f.use_dynamic_shifting),
        ] {
            if on {
                return Err(Error::param(
                    key,
                    "flow-matching sigmas are not supported: diffuse's samplers solve the diffusion ODE of a DDPM schedule",
                ));
            }
        }
        if f.interpolation_type.as_deref() == Some("log_linear") {
            return Err(Error::param(
                "interpolation_type",
                "log_linear is not supported (only linear interpolation of the sigma table)",
            ));
        }
        if f.timestep_type.as_deref() == Some("continuous") {
            return Err(Error::param(
                "timestep_type",
                "continuous (EDM-style 0.25 ln sigma model timesteps) is not supported; use discrete",
            ));
        }
        if matches!(
            cfg.variance_type,
            VarianceType::Learned | VarianceType::LearnedRange
        ) && cfg.class.is_fast_solver()
        {
            return Err(Error::param(
                "variance_type",
                "learned variances are not supported: the solvers use only the mean output",
            ));
        }
        let sigmas = if f.use_karras_sigmas {
            SigmaGrid::Karras
        } else if f.use_exponential_sigmas || f.use_lu_lambdas {
            SigmaGrid::Exponential
        } else if f.use_beta_sigmas {
            SigmaGrid::Beta
        } else {
            SigmaGrid::Spacing
        };
        let range = |v: Option<f64>| if sigmas == SigmaGrid::Spacing { None } else { v };
        Ok(GridOptions {
            sigmas,
            spacing: match cfg.timestep_spacing {
                TimestepSpacing::Linspace => Spacing::Linspace,
                TimestepSpacing::Leading => Spacing::Leading,
                TimestepSpacing::Trailing => Spacing::Trailing,
            },
            steps_offset: cfg.steps_offset,
            final_sigma: f
                .final_sigmas_type
                .as_deref()
                .map(FinalSigma::from_name)
                .transpose()?,
            sigma_min: range(f.sigma_min),
            sigma_max: range(f.sigma_max),
        })
    }
}

/// The scheduler-specific rules a sampler applies to [`GridOptions`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GridRules {
    /// Timestep and range conventions.
    pub style: GridStyle,
    /// The final level when the options do not say.
    pub default_final: FinalSigma,
    /// What `sigma-min` is on the karras / exponential / beta grids.
    pub sigma_min_rule: SigmaMinRule,
    /// DPM-Solver's `lambda_min_clipped` (-inf: no clipping).
    pub lambda_min_clipped: f64,
}

/// K + 1 noise levels: the denoiser is evaluated at the first K, the last is the final level.
#[derive(Clone, Debug, PartialEq)]
pub struct LevelGrid {
    /// `(alpha_k, sigma_k)` in the process's own frame.
    pub levels: Vec<NoiseLevel>,
    /// The EDM noise `sigma_k / alpha_k` (diffusers' `sigmas`), non-increasing.
    pub sigmas: Vec<f64>,
    /// The process time of each level (ddpm: `(timestep + 1) / T`, fractional; 0 at sigma = 0).
    pub times: Vec<f64>,
    /// diffusers' model timestep of each of the K evaluation levels (ddpm only, else empty).
    pub timesteps: Vec<f64>,
}

impl LevelGrid {
    /// K, the number of steps.
    pub fn steps(&self) -> usize {
        self.levels.len() - 1
    }

    /// `lambda_k = ln(alpha_k / sigma_k)` (+inf at sigma = 0).
    pub fn lambda(&self, k: usize) -> f64 {
        lambda(self.levels[k])
    }
}

/// `lambda = ln(alpha) - ln(sigma)` (+inf at sigma = 0), as diffusers computes it.
pub fn lambda(l: NoiseLevel) -> f64 {
    l.alpha.ln() - l.sigma.ln()
}

/// The training table `s_i = sqrt((1 - alpha_bar_i) / alpha_bar_i)`, i = 0..T.
pub fn sigma_table(schedule: &Schedule) -> Vec<f64> {
    schedule
        .alpha_bar
        .iter()
        .map(|&ab| ((1.0 - ab) / ab).sqrt())
        .collect()
}

/// `numpy.interp(x, arange(n), table)`: linear interpolation, clamped to the ends.
pub fn interp(x: f64, table: &[f64]) -> f64 {
    let n = table.len();
    if x <= 0.0 {
        return table[0];
    }
    if x >= (n - 1) as f64 {
        return table[n - 1];
    }
    let j = x.floor() as usize;
    let slope = table[j + 1] - table[j];
    slope * (x - j as f64) + table[j]
}

/// diffusers' `_sigma_to_t`: the fractional training index whose sigma is `sigma`, by linear
/// interpolation in ln sigma between the bracketing table entries (clamped to [0, T - 1]).
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let n = log_sigmas.len();
    let log_sigma = sigma.max(1e-10).ln();
    // numpy: cumsum(dists >= 0).argmax() - the last index with log_sigmas[i] <= log_sigma (0 if none)
    let count = log_sigmas.iter().filter(|&&l| log_sigma - l >= 0.0).count();
    let low = count.saturating_sub(1).min(n - 2);
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// `numpy.linspace(a, b, n)`: `a + i (b - a)/(n - 1)`, the last point exactly b (n = 1: [a]).
pub fn linspace(a: f64, b: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![a];
    }
    let step = (b - a) / (n - 1) as f64;
    (0..n)
        .map(|i| if i == n - 1 { b } else { a + i as f64 * step })
        .collect()
}

/// numpy's float `arange(start, 0, -ratio)`, its first `k` values (`start + i * delta` with
/// `delta = (start - ratio) - start`, as numpy computes them).
fn arange_down(start: f64, ratio: f64, k: usize) -> Vec<f64> {
    let delta = (start - ratio) - start;
    (0..k)
        .map(|i| match i {
            0 => start,
            1 => start - ratio,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// The number of training steps whose lambda lies below `lambda_min_clipped` (diffusers'
/// `searchsorted(flip(lambda_t), lambda_min_clipped)`).
pub fn clipped_steps(schedule: &Schedule, lambda_min_clipped: f64) -> usize {
    (0..schedule.timesteps())
        .filter(|&i| 0.5 * schedule.log_snr(i) < lambda_min_clipped)
        .count()
}

/// diffusers' `set_timesteps(K)` of `style` for T = `train_steps` training steps, in sampling
/// (descending) order; exactly K distinct values in [0, T - 1] (see the module docs for the two
/// repairs). `clipped` is [`clipped_steps`] (0 unless DPM-Solver's `lambda_min_clipped`).
pub fn spacing_timesteps(
    style: GridStyle,
    train_steps: usize,
    steps: usize,
    spacing: Spacing,
    steps_offset: usize,
    clipped: usize,
) -> Result<Vec<f64>> {
    let (t, k) = (train_steps, steps);
    if k == 0 || k > t {
        return Err(Error::param(
            "steps",
            format!("got {k}, expected 1 <= steps <= {t} (the training steps) for a timestep spacing grid; the karras, exponential, beta and logsnr grids take any number"),
        ));
    }
    let last = t.saturating_sub(clipped).max(1);
    let round = |v: f64| v.round_ties_even();
    let mut ts: Vec<f64> = match (style, spacing) {
        (_, Spacing::Quadratic) => {
            return Err(Error::param(
                "spacing",
                "quadratic is DDIM's spacing; these schedulers offer linspace, leading and trailing",
            ))
        }
        (GridStyle::Multistep, Spacing::Linspace) => {
            let mut v: Vec<f64> = linspace(0.0, (last - 1) as f64, k + 1)
                .into_iter()
                .map(round)
                .collect();
            v.reverse();
            v.pop();
            v
        }
        (GridStyle::Multistep, Spacing::Leading) => {
            let ratio = last / (k + 1);
            (1..=k).rev().map(|i| (i * ratio + steps_offset) as f64).collect()
        }
        (GridStyle::Sigma, Spacing::Linspace) => {
            let mut v = linspace(0.0, (t - 1) as f64, k);
            v.reverse();
            v
        }
        (GridStyle::Sigma, Spacing::Leading) => {
            let ratio = t / k;
            (0..k).rev().map(|i| (i * ratio + steps_offset) as f64).collect()
        }
        (_, Spacing::Trailing) => {
            let start = match style {
                GridStyle::Multistep => last as f64,
                GridStyle::Sigma => t as f64,
            };
            arange_down(start, t as f64 / k as f64, k)
                .into_iter()
                .map(|v| round(v) - 1.0)
                .collect()
        }
    };
    // Repeats (K = T with linspace) move down to the next free timestep.
    for i in 1..ts.len() {
        if ts[i] >= ts[i - 1] {
            ts[i] = ts[i - 1] - 1.0;
        }
    }
    if ts.iter().any(|&v| v < 0.0 || v > (t - 1) as f64) {
        let hint = match spacing {
            Spacing::Leading if steps_offset > 0 => format!(
                " (steps_offset = {steps_offset} pushes a timestep past T - 1 = {})",
                t - 1
            ),
            Spacing::Leading => format!(
                " (leading spacing strides by T div (K + 1) = {}; use linspace or trailing)",
                last / (k + 1)
            ),
            _ => String::new(),
        };
        return Err(Error::param(
            "steps",
            format!(
                "{} spacing with {k} of {t} steps gives no {k} distinct timesteps in 0..{t}{hint}",
                spacing.name()
            ),
        ));
    }
    Ok(ts)
}

/// Karras et al. (2022, eq. 5) with rho = 7: `n` sigmas from `max` down to `min`
/// (`ramp = linspace(0, 1, n)`; n = 1 gives [max]).
pub fn karras_sigmas(n: usize, min: f64, max: f64) -> Vec<f64> {
    let (a, b) = (max.powf(1.0 / KARRAS_RHO), min.powf(1.0 / KARRAS_RHO));
    linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (a + r * (b - a)).powf(KARRAS_RHO))
        .collect()
}

/// `exp(linspace(ln max, ln min, n))`: uniform in ln sigma, hence in log-SNR.
pub fn exponential_sigmas(n: usize, min: f64, max: f64) -> Vec<f64> {
    linspace(max.ln(), min.ln(), n)
        .into_iter()
        .map(f64::exp)
        .collect()
}

/// diffusers' `_convert_to_beta` (Lee et al. 2024, "Beta sampling is all you need"):
/// `min + F^-1(1 - r) (max - min)`, r = linspace(0, 1, n), F the Beta(0.6, 0.6) CDF.
pub fn beta_sigmas(n: usize, min: f64, max: f64) -> Vec<f64> {
    linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| min + beta_ppf(1.0 - r, BETA_SIGMAS_AB, BETA_SIGMAS_AB) * (max - min))
        .collect()
}

/// ln Gamma(x) for x > 0 (Lanczos, g = 7, n = 9; relative error about 1e-15).
fn ln_gamma(x: f64) -> f64 {
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // reflection: Gamma(x) Gamma(1 - x) = pi / sin(pi x)
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + 7.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// The continued fraction of the incomplete beta function (modified Lentz; Press et al.,
/// Numerical Recipes, section 6.4).
fn beta_cf(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 - qab * x / qap;
    if d.abs() < TINY {
        d = TINY;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..=300 {
        let m = m as f64;
        let m2 = 2.0 * m;
        let aa = m * (b - m) * x / ((qam + m2) * (a + m2));
        d = 1.0 + aa * d;
        d = if d.abs() < TINY { TINY } else { d };
        c = 1.0 + aa / c;
        c = if c.abs() < TINY { TINY } else { c };
        d = 1.0 / d;
        h *= d * c;
        let aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
        d = 1.0 + aa * d;
        d = if d.abs() < TINY { TINY } else { d };
        c = 1.0 + aa / c;
        c = if c.abs() < TINY { TINY } else { c };
        d = 1.0 / d;
        let del = d * c;
        h *= del;
        if (del - 1.0).abs() < 1e-16 {
            break;
        }
    }
    h
}

/// The regularized incomplete beta function `I_x(a, b)` (the Beta(a, b) CDF at x).
pub fn beta_cdf(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_bt = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    if x < (a + 1.0) / (a + b + 2.0) {
        ln_bt.exp() * beta_cf(a, b, x) / a
    } else {
        1.0 - ln_bt.exp() * beta_cf(b, a, 1.0 - x) / b
    }
}

/// The Beta(a, b) quantile `F^-1(p)` by bisection on [`beta_cdf`] (to f64 resolution;
/// scipy's `beta.ppf` to about 1e-15).
pub fn beta_ppf(p: f64, a: f64, b: f64) -> f64 {
    if p <= 0.0 {
        return 0.0;
    }
    if p >= 1.0 {
        return 1.0;
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi {
            break;
        }
        if beta_cdf(mid, a, b) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// The level of EDM noise `s` on `process`: ddpm `(1/sqrt(1 + s^2), s/sqrt(1 + s^2))`
/// (diffusers' `_sigma_to_alpha_sigma_t`), continuous [`Sde::level_for_edm_sigma`].
pub fn edm_level(process: &Process, s: f64) -> NoiseLevel {
    match process {
        Process::Ddpm(_) => {
            let alpha = 1.0 / (s * s + 1.0).sqrt();
            NoiseLevel::new(alpha, s * alpha)
        }
        Process::Continuous(sde) => sde.level_for_edm_sigma(s),
    }
}

/// The grid of `steps` steps on `process` (see the module docs).
pub fn build_grid(
    process: &Process,
    steps: usize,
    opts: &GridOptions,
    rules: &GridRules,
) -> Result<LevelGrid> {
    if steps == 0 {
        return Err(Error::param("steps", "got 0, expected at least 1"));
    }
    if opts.sigmas == SigmaGrid::Spacing && (opts.sigma_min.is_some() || opts.sigma_max.is_some()) {
        return Err(Error::param(
            if opts.sigma_min.is_some() { "sigma-min" } else { "sigma-max" },
            "sets the range of the karras, exponential, beta and logsnr grids; the timestep spacing's own sigmas have no range to set",
        ));
    }
    for (name, v) in [("sigma-min", opts.sigma_min), ("sigma-max", opts.sigma_max)] {
        if let Some(v) = v {
            crate::error::check_range(name, v, (0.0, false), (f64::INFINITY, false))?;
        }
    }
    if opts.sigmas == SigmaGrid::TimePower(0) {
        return Err(Error::param("sigmas", "a time-power grid needs an order >= 1"));
    }
    let final_sigma = opts.final_sigma.unwrap_or(rules.default_final);
    let grid = match process {
        Process::Ddpm(schedule) => ddpm_grid(process, schedule, steps, opts, rules, final_sigma)?,
        Process::Continuous(sde) => continuous_grid(process, sde, steps, opts, rules, final_sigma)?,
    };
    let mut grid = grid;
    let k = grid.steps();
    // a sigma-min final level equal to the grid's last sigma up to rounding is the same level
    // (diffusers' zero-length last step)
    if grid.sigmas[k] > grid.sigmas[k - 1] && grid.sigmas[k] <= grid.sigmas[k - 1] * (1.0 + 1e-12) {
        grid.sigmas[k] = grid.sigmas[k - 1];
        grid.levels[k] = grid.levels[k - 1];
        grid.times[k] = grid.times[k - 1];
    }
    let s = &grid.sigmas;
    if s.iter().any(|v| !v.is_finite() || *v < 0.0)
        || s[..k].windows(2).any(|w| w[1] >= w[0])
        || s[k] > s[k - 1]
        || s[k - 1] <= 0.0
    {
        return Err(Error::param(
            "steps",
            format!(
                "the {} grid with {steps} steps is not strictly decreasing in sigma (sigma range too narrow for that many steps?)",
                opts.sigmas.name()
            ),
        ));
    }
    Ok(grid)
}

/// The range `(s_min, s_max)` with the options' overrides.
fn range(opts: &GridOptions, min: f64, max: f64) -> Result<(f64, f64)> {
    let (lo, hi) = (opts.sigma_min.unwrap_or(min), opts.sigma_max.unwrap_or(max));
    if !(lo > 0.0 && hi >= lo) {
        return Err(Error::param(
            "sigma-min",
            format!("the sigma range must satisfy 0 < sigma_min <= sigma_max, got [{lo}, {hi}]"),
        ));
    }
    Ok((lo, hi))
}

/// `n` times uniform in `t^(1/p)` from `t_hi` down to `t_lo` (DPM-Solver's `time_quadratic`
/// for p = 2: `linspace(t_T^(1/p), t_0^(1/p), n)^p`).
pub fn power_times(n: usize, t_lo: f64, t_hi: f64, p: u32) -> Vec<f64> {
    let e = 1.0 / p as f64;
    linspace(t_hi.powf(e), t_lo.powf(e), n)
        .into_iter()
        .map(|r| r.powi(p as i32))
        .collect()
}

/// The K evaluation sigmas of a sigma grid and its final sigma-min value (before the rule);
/// `time_quadratic` maps the range (in sigma) to the process's sigma at quadratically spaced
/// times: `(t_of_sigma, sigma_of_t)`.
fn sigma_grid(
    grid: SigmaGrid,
    k: usize,
    lo: f64,
    hi: f64,
    final_sigma: FinalSigma,
    time_map: (&dyn Fn(f64) -> f64, &dyn Fn(f64) -> f64),
) -> (Vec<f64>, Option<f64>) {
    let with_final = |n: usize, f: &dyn Fn(usize) -> Vec<f64>| match final_sigma {
        FinalSigma::SigmaMin => {
            let mut s = f(n + 1);
            let last = s.pop();
            (s, last)
        }
        FinalSigma::Zero => (f(n), None),
    };
    match grid {
        SigmaGrid::TimePower(p) => {
            let (t_of, s_of) = time_map;
            let (t_lo, t_hi) = (t_of(lo), t_of(hi));
            with_final(k, &|n| {
                power_times(n, t_lo, t_hi, p).into_iter().map(s_of).collect()
            })
        }
        SigmaGrid::Karras => (karras_sigmas(k, lo, hi), None),
        SigmaGrid::Exponential => (exponential_sigmas(k, lo, hi), None),
        SigmaGrid::Beta => (beta_sigmas(k, lo, hi), None),
        SigmaGrid::LogSnr => with_final(k, &|n| exponential_sigmas(n, lo, hi)),
        SigmaGrid::Spacing => unreachable!("handled by the callers"),
    }
}

fn ddpm_grid(
    process: &Process,
    schedule: &Schedule,
    k: usize,
    opts: &GridOptions,
    rules: &GridRules,
    final_sigma: FinalSigma,
) -> Result<LevelGrid> {
    let n = schedule.timesteps();
    let table = sigma_table(schedule);
    let log_sigmas: Vec<f64> = table.iter().map(|s| s.ln()).collect();
    let clipped = clipped_steps(schedule, rules.lambda_min_clipped);
    let spaced =
        |opts: &GridOptions| spacing_timesteps(rules.style, n, k, opts.spacing, opts.steps_offset, clipped);
    let (sigmas, timesteps, grid_min) = match opts.sigmas {
        SigmaGrid::Spacing => {
            let ts = spaced(opts)?;
            (
                ts.iter().map(|&t| interp(t, &table)).collect::<Vec<f64>>(),
                ts,
                None,
            )
        }
        grid => {
            let (min, max) = match (grid, rules.style) {
                (SigmaGrid::LogSnr | SigmaGrid::TimePower(_), _) | (_, GridStyle::Multistep) => {
                    (table[0], table[n - 1])
                }
                (_, GridStyle::Sigma) => {
                    let ts = spaced(opts)?;
                    (interp(ts[k - 1], &table), interp(ts[0], &table))
                }
            };
            let (lo, hi) = range(opts, min, max)?;
            // ddpm time t = (index + 1) / T
            let t_of = |v: f64| (sigma_to_t(v, &log_sigmas) + 1.0) / n as f64;
            let s_of = |t: f64| interp(t * n as f64 - 1.0, &table);
            let (s, grid_min) = sigma_grid(grid, k, lo, hi, final_sigma, (&t_of, &s_of));
            let ts = s
                .iter()
                .map(|&v| {
                    let t = sigma_to_t(v, &log_sigmas);
                    match (grid, rules.style) {
                        (SigmaGrid::Karras, GridStyle::Multistep) => t.round_ties_even(),
                        // exponential / beta timesteps are cast to int64 (truncated)
                        (SigmaGrid::Exponential | SigmaGrid::Beta, GridStyle::Multistep) => t.trunc(),
                        _ => t,
                    }
                })
                .collect();
            let last = match (grid, rules.sigma_min_rule) {
                (SigmaGrid::LogSnr | SigmaGrid::TimePower(_), _) => grid_min,
                (_, SigmaMinRule::LastGridSigma) => s.last().copied(),
                (_, SigmaMinRule::FirstTrainingStep) => None,
            };
            (s, ts, last)
        }
    };
    let final_s = match final_sigma {
        FinalSigma::Zero => 0.0,
        FinalSigma::SigmaMin => grid_min.unwrap_or(table[0]),
    };
    let mut all = sigmas;
    all.push(final_s);
    let levels: Vec<NoiseLevel> = all.iter().map(|&s| edm_level(process, s)).collect();
    let times = levels
        .iter()
        .map(|l| {
            if l.sigma == 0.0 {
                0.0
            } else {
                (schedule.index_for_log_snr(l.log_snr()) + 1.0) / n as f64
            }
        })
        .collect();
    Ok(LevelGrid {
        levels,
        sigmas: all,
        times,
        timesteps,
    })
}

fn continuous_grid(
    process: &Process,
    sde: &Sde,
    k: usize,
    opts: &GridOptions,
    rules: &GridRules,
    final_sigma: FinalSigma,
) -> Result<LevelGrid> {
    if opts.spacing != Spacing::Linspace || opts.steps_offset != 0 {
        return Err(Error::param(
            "spacing",
            format!(
                "timestep spacings and steps_offset apply to the ddpm process; on {} the spacing grid is uniform in t",
                sde.name()
            ),
        ));
    }
    let (t_max, t_eps) = (sde.t_max(), sde.t_eps());
    let edm = |t: f64| sde.level(t).edm_sigma();
    let zero = NoiseLevel::new(1.0, 0.0);
    // the spacing grid is the process's default time grid: uniform in t, log-SNR for seed-ve
    let sigmas = match (opts.sigmas, sde.default_grid()) {
        (SigmaGrid::Spacing, crate::process::TimeGrid::UniformLogSnr) => SigmaGrid::LogSnr,
        (g, _) => g,
    };
    let (mut levels, mut times) = match sigmas {
        SigmaGrid::Spacing => {
            let times: Vec<f64> = match rules.style {
                GridStyle::Multistep => {
                    let mut t = linspace(t_max, t_eps, k + 1);
                    t.pop();
                    t
                }
                GridStyle::Sigma => linspace(t_max, t_eps, k),
            };
            (times.iter().map(|&t| sde.level(t)).collect::<Vec<_>>(), times)
        }
        grid => {
            let (lo, hi) = range(opts, edm(t_eps), edm(t_max))?;
            let t_of = |v: f64| sde.t_for_log_snr(-2.0 * v.ln());
            let s_of = |t: f64| sde.level(t).edm_sigma();
            let (s, grid_min) = sigma_grid(grid, k, lo, hi, final_sigma, (&t_of, &s_of));
            let last = match (grid, rules.sigma_min_rule) {
                (SigmaGrid::LogSnr | SigmaGrid::TimePower(_), _) => grid_min,
                (_, SigmaMinRule::LastGridSigma) => s.last().copied(),
                (_, SigmaMinRule::FirstTrainingStep) => None,
            };
            let mut levels: Vec<NoiseLevel> = s.iter().map(|&v| edm_level(process, v)).collect();
            let mut times: Vec<f64> = s.iter().map(|&v| sde.t_for_log_snr(-2.0 * v.ln())).collect();
            if final_sigma == FinalSigma::SigmaMin {
                if let Some(m) = last {
                    levels.push(edm_level(process, m));
                    times.push(sde.t_for_log_snr(-2.0 * m.ln()));
                }
            }
            (levels, times)
        }
    };
    if levels.len() == k {
        match final_sigma {
            FinalSigma::Zero => {
                levels.push(zero);
                times.push(0.0);
            }
            FinalSigma::SigmaMin => {
                levels.push(sde.level(t_eps));
                times.push(t_eps);
            }
        }
    }
    let sigmas = levels.iter().map(|l| l.sigma / l.alpha).collect();
    Ok(LevelGrid {
        levels,
        sigmas,
        times,
        timesteps: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linear() -> Process {
        Process::Ddpm(Schedule::named("linear", 1000).unwrap())
    }

    const MULTI: GridRules = GridRules {
        style: GridStyle::Multistep,
        default_final: FinalSigma::Zero,
        sigma_min_rule: SigmaMinRule::FirstTrainingStep,
        lambda_min_clipped: f64::NEG_INFINITY,
    };

    #[test]
    fn rounding_is_numpys_half_to_even() {
        // linspace(0, 999, 7) = 0, 166.5, 333, 499.5, 666, 832.5, 999: numpy rounds 166.5 to 166,
        // 499.5 to 500 and 832.5 to 832 (Rust's round would give 167, 500, 833)
        let ts = spacing_timesteps(GridStyle::Multistep, 1000, 6, Spacing::Linspace, 0, 0).unwrap();
        assert_eq!(ts, vec![999.0, 832.0, 666.0, 500.0, 333.0, 166.0]);
        // leading: 1000 div 11 = 90 -> 900, 810, ..., 90 (+ offset 1)
        let ts = spacing_timesteps(GridStyle::Multistep, 1000, 10, Spacing::Leading, 1, 0).unwrap();
        assert_eq!(ts[0], 901.0);
        assert_eq!(ts[9], 91.0);
        // Euler linspace is not rounded: linspace(0, 999, 7) reversed
        let ts = spacing_timesteps(GridStyle::Sigma, 1000, 7, Spacing::Linspace, 0, 0).unwrap();
        assert_eq!(ts[5], 166.5);
        // trailing: round(1000 - i 1000/7) - 1 = 999, 856, 713, 570, 428, 285, 142
        let ts = spacing_timesteps(GridStyle::Sigma, 1000, 7, Spacing::Trailing, 0, 0).unwrap();
        assert_eq!(ts, vec![999.0, 856.0, 713.0, 570.0, 428.0, 285.0, 142.0]);
    }

    #[test]
    fn all_t_steps_are_distinct() {
        // diffusers: round(linspace(0, 999, 1001)) repeats 500 (499.5 and 500.5); we give 999..0
        let ts = spacing_timesteps(GridStyle::Multistep, 1000, 1000, Spacing::Linspace, 0, 0).unwrap();
        assert_eq!(ts, (0..1000).rev().map(|t| t as f64).collect::<Vec<_>>());
        let ts = spacing_timesteps(GridStyle::Multistep, 1000, 1000, Spacing::Trailing, 0, 0).unwrap();
        assert_eq!(ts[999], 0.0);
        let e = spacing_timesteps(GridStyle::Multistep, 1000, 1000, Spacing::Leading, 0, 0).unwrap_err();
        assert!(e.to_string().contains("stride"), "{e}");
        assert!(spacing_timesteps(GridStyle::Multistep, 1000, 1001, Spacing::Linspace, 0, 0).is_err());
        // numpy's arange would give 62 entries for K = 61; we give 61
        let ts = spacing_timesteps(GridStyle::Multistep, 1000, 61, Spacing::Trailing, 0, 0).unwrap();
        assert_eq!(ts.len(), 61);
        assert!(*ts.last().unwrap() >= 0.0);
    }

    #[test]
    fn karras_exponential_and_beta_by_hand() {
        let s = karras_sigmas(3, 0.01, 100.0);
        let (a, b) = (100f64.powf(1.0 / 7.0), 0.01f64.powf(1.0 / 7.0));
        assert!((s[0] - 100.0).abs() < 1e-12 && (s[2] - 0.01).abs() < 1e-15);
        assert!((s[1] - ((a + b) / 2.0).powi(7)).abs() < 1e-12);
        // exponential: geometric, 100 -> 1 -> 0.01
        let e = exponential_sigmas(3, 0.01, 100.0);
        assert!((e[1] - 1.0).abs() < 1e-14);
        // Beta(0.6, 0.6) quantiles from scipy.stats.beta.ppf
        assert!((beta_ppf(0.5, 0.6, 0.6) - 0.5).abs() < 1e-14);
        assert!((beta_ppf(0.25, 0.6, 0.6) - 0.175_680_378_652_694_98).abs() < 1e-13);
        assert!((beta_ppf(0.9, 0.6, 0.6) - 0.960_415_594_411_219_2).abs() < 1e-13);
        assert!((beta_ppf(1e-6, 0.6, 0.6) - 1.855_882_462_405_304_3e-10).abs() < 1e-20);
        assert!((beta_cdf(0.3, 0.6, 0.6) - 0.352_526_511_772_143_67).abs() < 1e-14);
        // one step: [max] (karras through (max^(1/7))^7, as numpy: 99.99999999999997)
        assert!((karras_sigmas(1, 0.01, 100.0)[0] - 100.0).abs() < 1e-12);
        assert_eq!(beta_sigmas(1, 0.01, 100.0), vec![100.0]);
    }

    #[test]
    fn sigma_to_t_inverts_the_table() {
        let Process::Ddpm(s) = linear() else {
            unreachable!()
        };
        let table = sigma_table(&s);
        let logs: Vec<f64> = table.iter().map(|v| v.ln()).collect();
        for i in [0usize, 1, 17, 500, 998, 999] {
            assert!((sigma_to_t(table[i], &logs) - i as f64).abs() < 1e-9);
        }
        // halfway in ln sigma between 10 and 11
        let mid = (0.5 * (logs[10] + logs[11])).exp();
        assert!((sigma_to_t(mid, &logs) - 10.5).abs() < 1e-9);
        assert_eq!(sigma_to_t(1e-6, &logs), 0.0);
        assert_eq!(sigma_to_t(1e6, &logs), 999.0);
    }

    #[test]
    fn grids_end_where_asked() {
        let p = linear();
        let Process::Ddpm(s) = &p else { unreachable!() };
        let table = sigma_table(s);
        let g = build_grid(&p, 10, &GridOptions::default(), &MULTI).unwrap();
        assert_eq!(g.steps(), 10);
        assert_eq!(g.timesteps[0], 999.0);
        assert_eq!(g.sigmas[10], 0.0);
        assert_eq!(g.levels[10], NoiseLevel::new(1.0, 0.0));
        // logsnr with sigma-min: equal lambda steps ending at s_0
        let opts = GridOptions {
            sigmas: SigmaGrid::LogSnr,
            final_sigma: Some(FinalSigma::SigmaMin),
            ..Default::default()
        };
        let g = build_grid(&p, 10, &opts, &MULTI).unwrap();
        assert!((g.sigmas[10] - table[0]).abs() < 1e-15 && (g.sigmas[0] - table[999]).abs() < 1e-9);
        let h0 = g.lambda(1) - g.lambda(0);
        for k in 0..10 {
            assert!((g.lambda(k + 1) - g.lambda(k) - h0).abs() < 1e-12);
        }
        // continuous: logsnr on VP reaches t_eps; zero final is the data level
        let vp = Process::Continuous(Sde::vp());
        let g = build_grid(&vp, 5, &opts, &MULTI).unwrap();
        assert!((g.times[5] - 1e-3).abs() < 1e-9 && (g.times[0] - 1.0).abs() < 1e-9);
        let e = build_grid(
            &vp,
            5,
            &GridOptions {
                spacing: Spacing::Trailing,
                ..Default::default()
            },
            &MULTI,
        )
        .unwrap_err();
        assert!(e.to_string().contains("ddpm"), "{e}");
        let e = build_grid(
            &p,
            5,
            &GridOptions {
                sigma_min: Some(0.1),
                ..Default::default()
            },
            &MULTI,
        )
        .unwrap_err();
        assert!(e.to_string().contains("sigma-min"), "{e}");
    }
}
