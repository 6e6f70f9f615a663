//! The sampling loop of diffusers' `DDPMScheduler` / `DDIMScheduler` (diffusers 0.42:
//! `set_timesteps(K)`, then `step` at every timestep), built from a parsed scheduler config so
//! that `diffuse` reproduces `DDPMPipeline` / `DDIMPipeline` exactly (the pipelines' own
//! loop: `x_T ~ N(0, I)`, then `x <- step(unet(x, t), t, x)`; `DDIMPipeline` turns any
//! scheduler config into a `DDIMScheduler` first, so [`SamplerKind::from_name("ddim").unwrap()`] uses the DDIM
//! fields of whatever config the folder has).
//!
//! The formulas are ours ([`super::ddim`], [`super::ddpm`], [`super::chain`]); diffusers makes
//! different *choices*, which this module reproduces:
//!
//! | | ours ([`super::build_sampler`]) | diffusers |
//! | --- | --- | --- |
//! | timesteps | [`super::timesteps`]; no offset; linspace with K = 1 is `[T-1]` | `set_timesteps`: `steps_offset` added to `leading`; linspace K = 1 is `[0]`; `trailing` through a float `arange`, which for some K yields K + 1 entries ending at -1 (rejected here; field notes bug 1) |
//! | DDIM previous timestep | the next entry of the list, looked up | `t - T div K` (field notes bug 2), see [`ddim_previous_timesteps`] |
//! | DDIM last step | to alpha_bar = 1 (x_0 itself) | to `final_alpha_cumprod`: 1 when `set_alpha_to_one`, else alpha_bar at t = 0 (index 0) |
//! | DDIM eps after clipping x_0 | recomputed from the clipped x_0 | the network's, unclipped (`use_clipped_model_output=False`) |
//! | DDPM last step | no noise | noise whenever its timestep is > 0 (`trailing` spacing) |
//!
//! The look-up and the formula agree for `leading` spacing whenever `steps_offset < T div K`
//! (always in practice), for `trailing` when K divides T, and for `linspace` essentially never
//! (T = 1000, K = 50: timesteps 999, 979, 958, ...; the step from 979 lands on 959 by the formula,
//! but the next step evaluates the network at 958);
//! with `trailing` and K not dividing T the formula can also end at t = 0 instead of alpha_bar = 1
//! (T = 1000, K = 7: 142 -> 0).
//!
//! Not reproduced, by design: `fixed_small` adds `sqrt(max(var, 1e-20)) z = 1e-10 z` at a
//! last step with t > 0 (ours adds nothing: var = 0); diffusers computes its tables in float32,
//! ours in f64 (alpha_bar differs by float32 rounding, about 1e-6 relative). Unsupported, each an
//! error naming the key: `thresholding`, `variance_type` `learned`/`learned_range` (the network
//! would output the variance) and `fixed_large_log` (diffusers takes `sqrt(log beta_t)`, NaN).
//!
//! This module reads only the parsed config ([`crate::nets::scheduler_config`], no network).

use candle_core::Tensor;

use crate::denoiser::{Denoiser, NoiseLevel};
use crate::error::{Error, Result};
use crate::nets::scheduler_config::{SchedulerConfig, TimestepSpacing, VarianceType};
use crate::process::ddpm_level;
use crate::rng::NoiseStreams;
use crate::schedule::Schedule;

use super::chain::{ChainStep, ReverseChain};
use super::ddim::{Ddim, EpsAfterClip};
use super::ddpm::{Ddpm, LastStepNoise, Variance};
use super::{Observer, SampleOutput, Sampler, SamplerKind};

/// diffusers' `set_timesteps(steps)` for `cfg`: the training-step indices (diffusers' timesteps)
/// visited, in sampling (descending) order.
///
/// - `linspace`: `round(linspace(0, T - 1, K))` (numpy: `i (T-1)/(K-1)`, last point exactly
///   T - 1, ties to even), reversed;
/// - `leading`: `i * (T div K) + steps_offset`, i = 0..K, reversed;
/// - `trailing`: `round(arange(T, 0, -T/K)) - 1`, with numpy's float `arange` (length
///   `ceil(T / (T/K))`, values `T + i * delta`, `delta = (T - T/K) - T`).
///
/// Errors: K = 0 or K > T (diffusers raises too), a `steps_offset` that pushes a timestep past
/// T - 1, and a `trailing` list that is not K distinct timesteps in `0..T` (numpy's float
/// `arange` gives K + 1 entries ending at -1 for T = 1000 and K = 61, 103, 121, ...).
pub fn set_timesteps(cfg: &SchedulerConfig, steps: usize) -> Result<Vec<usize>> {
    let (t, k) = (cfg.num_train_timesteps, steps);
    if k == 0 || k > t {
        return Err(Error::param(
            "steps",
            format!("got {k}, expected 1 <= steps <= num_train_timesteps = {t}"),
        ));
    }
    let asc: Vec<i64> = match cfg.timestep_spacing {
        TimestepSpacing::Linspace => {
            if k == 1 {
                vec![0]
            } else {
                let step = (t - 1) as f64 / (k - 1) as f64;
                (0..k)
                    .map(|i| {
                        if i == k - 1 {
                            (t - 1) as i64
                        } else {
                            (i as f64 * step).round_ties_even() as i64
                        }
                    })
                    .collect()
            }
        }
        TimestepSpacing::Leading => {
            let ratio = t / k;
            (0..k).map(|i| (i * ratio + cfg.steps_offset) as i64).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = t as f64 / k as f64;
            let start = t as f64;
            let len = (start / ratio).ceil() as usize;
            let delta = (start - ratio) - start;
            let mut desc: Vec<i64> = (0..len)
                .map(|i| {
                    let v = match i {
                        0 => start,
                        1 => start - ratio,
                        _ => start + i as f64 * delta,
                    };
                    v.round_ties_even() as i64 - 1
                })
                .collect();
            desc.reverse();
            desc
        }
    };
    let spacing = match cfg.timestep_spacing {
        TimestepSpacing::Linspace => "linspace",
        TimestepSpacing::Leading => "leading",
        TimestepSpacing::Trailing => "trailing",
    };
    let distinct = asc.windows(2).all(|w| w[0] < w[1]);
    if asc.len() != k || !distinct || asc.iter().any(|&i| i < 0 || i >= t as i64) {
        let shown: Vec<i64> = asc.iter().rev().copied().collect();
        let hint = if cfg.timestep_spacing == TimestepSpacing::Leading && cfg.steps_offset > 0 {
            format!(
                " (steps_offset = {} pushes it past T - 1 = {})",
                cfg.steps_offset,
                t - 1
            )
        } else {
            String::new()
        };
        return Err(Error::param(
            "steps",
            format!(
                "diffusers' {spacing} spacing with {k} of {t} steps gives timesteps {} ({} entries), not {k} distinct timesteps in 0..{t}{hint}; choose another step count (field notes, bug 1)",
                abbreviate(&shown),
                shown.len()
            ),
        ));
    }
    Ok(asc.into_iter().rev().map(|i| i as usize).collect())
}

fn abbreviate(v: &[i64]) -> String {
    if v.len() <= 8 {
        format!("{v:?}")
    } else {
        format!(
            "[{}, {}, {}, ..., {}, {}]",
            v[0],
            v[1],
            v[2],
            v[v.len() - 2],
            v[v.len() - 1]
        )
    }
}

/// The previous timestep `DDIMScheduler.step` uses after each of `timesteps` (set for K =
/// `timesteps.len()` steps): `t - T div K`, `None` when negative (then diffusers uses
/// `final_alpha_cumprod`). Compare with the look-up (the next entry of `timesteps`) to see
/// where diffusers' DDIM steps to a level other than the one it next evaluates the network at.
pub fn ddim_previous_timesteps(cfg: &SchedulerConfig, timesteps: &[usize]) -> Vec<Option<usize>> {
    let ratio = cfg.num_train_timesteps / timesteps.len().max(1);
    timesteps.iter().map(|&t| t.checked_sub(ratio)).collect()
}

/// A chain step from index `i` to the level with cumulative product `alpha_bar_s` (at index
/// `prev`, or 1 for the data level): the posterior of Ho et al. 2020, eqs. 6-7, for the pair
/// (alpha_bar_t, alpha_bar_s), with `beta = 1 - alpha_bar_t / alpha_bar_s` (the respaced beta,
/// 0 when both levels coincide, as diffusers' no-op last step with `set_alpha_to_one=false`).
fn step_between(schedule: &Schedule, i: usize, prev: Option<usize>) -> ChainStep {
    let n = schedule.timesteps() as f64;
    let ab = schedule.alpha_bar[i];
    let ab_prev = prev.map_or(1.0, |p| schedule.alpha_bar[p]);
    let beta = 1.0 - ab / ab_prev;
    ChainStep {
        index: Some(i),
        t: (i + 1) as f64 / n,
        t_prev: prev.map_or(0.0, |p| (p + 1) as f64 / n),
        level: ddpm_level(schedule, i),
        prev: prev.map_or(NoiseLevel::new(1.0, 0.0), |p| ddpm_level(schedule, p)),
        beta,
        posterior_variance: beta * (1.0 - ab_prev) / (1.0 - ab),
        coef_x0: beta * ab_prev.sqrt() / (1.0 - ab),
        coef_xt: (1.0 - ab_prev) * (1.0 - beta).sqrt() / (1.0 - ab),
    }
}

/// The chain `DDIMScheduler` walks for `steps` steps: the network is evaluated at each of
/// [`set_timesteps`], and each step lands on the level of [`ddim_previous_timesteps`] (or on
/// `final_alpha_cumprod`: alpha_bar = 1 when `set_alpha_to_one`, else alpha_bar at index 0).
/// Steps where this agrees with the look-up are those of [`ReverseChain::discrete`].
pub fn ddim_chain(cfg: &SchedulerConfig, schedule: &Schedule, steps: usize) -> Result<ReverseChain> {
    check_schedule(cfg, schedule)?;
    let ts = set_timesteps(cfg, steps)?;
    let mut chain = ReverseChain::discrete(schedule, &ts)?;
    let final_index = if cfg.set_alpha_to_one { None } else { Some(0) };
    for (k, prev) in ddim_previous_timesteps(cfg, &ts).into_iter().enumerate() {
        let target = prev.or(final_index);
        let looked_up = ts.get(k + 1).copied();
        if target != looked_up {
            chain.steps[k] = step_between(schedule, ts[k], target);
        }
    }
    Ok(chain)
}

/// The chain `DDPMScheduler` walks for `steps` steps: [`set_timesteps`] with the previous
/// timestep looked up (diffusers PR #9384), ending at alpha_bar = 1.
pub fn ddpm_chain(cfg: &SchedulerConfig, schedule: &Schedule, steps: usize) -> Result<ReverseChain> {
    check_schedule(cfg, schedule)?;
    ReverseChain::discrete(schedule, &set_timesteps(cfg, steps)?)
}

fn check_schedule(cfg: &SchedulerConfig, schedule: &Schedule) -> Result<()> {
    if schedule.timesteps() != cfg.num_train_timesteps {
        return Err(Error::param(
            "schedule",
            format!(
                "has {} steps but the scheduler config's num_train_timesteps is {}",
                schedule.timesteps(),
                cfg.num_train_timesteps
            ),
        ));
    }
    Ok(())
}

/// A sampler built by [`from_scheduler_config`]: our DDPM or DDIM sampler with diffusers'
/// choices.
#[derive(Clone, Debug)]
pub enum SchedulerSampler {
    /// `DDPMScheduler`'s loop.
    Ddpm(Ddpm),
    /// `DDIMScheduler`'s loop.
    Ddim(Ddim),
}

impl SchedulerSampler {
    /// The chain it walks.
    pub fn chain(&self) -> &ReverseChain {
        match self {
            SchedulerSampler::Ddpm(s) => &s.chain,
            SchedulerSampler::Ddim(s) => &s.chain,
        }
    }

    /// The same sampler on another chain (e.g. one step of this one, to compare single steps).
    pub fn with_chain(&self, chain: ReverseChain) -> Self {
        let mut s = self.clone();
        match &mut s {
            SchedulerSampler::Ddpm(d) => d.chain = chain,
            SchedulerSampler::Ddim(d) => d.chain = chain,
        }
        s
    }

    fn inner(&self) -> &dyn Sampler {
        match self {
            SchedulerSampler::Ddpm(s) => s,
            SchedulerSampler::Ddim(s) => s,
        }
    }
}

impl Sampler for SchedulerSampler {
    fn name(&self) -> &'static str {
        self.inner().name()
    }

    fn prior_std(&self) -> f64 {
        self.inner().prior_std()
    }

    fn sample(
        &self,
        den: &dyn Denoiser,
        x_t: Tensor,
        noise: &mut NoiseStreams,
        observer: &mut dyn Observer,
    ) -> Result<SampleOutput> {
        self.inner().sample(den, x_t, noise, observer)
    }
}

/// The sampler that reproduces diffusers' `kind` loop (`ddpm`: `DDPMScheduler`, `ddim`:
/// `DDIMScheduler` with `eta`, default 0) for `steps` steps of `cfg` on `schedule` (normally
/// `cfg.schedule()`, the table the denoiser was built with). Its prior is N(0, I), as the
/// pipelines' `randn * init_noise_sigma`.
pub fn from_scheduler_config(
    cfg: &SchedulerConfig,
    schedule: &Schedule,
    kind: SamplerKind,
    steps: usize,
    eta: Option<f64>,
) -> Result<SchedulerSampler> {
    if cfg.thresholding {
        return Err(Error::param(
            "thresholding",
            "the scheduler config asks for dynamic thresholding (Saharia et al. 2022), which diffuse does not implement; set \"thresholding\": false",
        ));
    }
    let clip_x0 = cfg.clip_sample.then_some(cfg.clip_sample_range);
    match kind.name() {
        "ddim" => {
            let mut s = Ddim::new(ddim_chain(cfg, schedule, steps)?, eta.unwrap_or(0.0), 1.0)?;
            s.clip_x0 = clip_x0;
            s.eps_after_clip = EpsAfterClip::Unclipped;
            Ok(SchedulerSampler::Ddim(s))
        }
        "ddpm" => {
            if eta.is_some() {
                return Err(Error::param(
                    "eta",
                    "--eta applies only to ddim, not to --sampler ddpm",
                ));
            }
            let variance = match cfg.variance_type {
                // fixed_small_log: exp(0.5 log var) = sqrt(var), the same std
                VarianceType::FixedSmall | VarianceType::FixedSmallLog => Variance::FixedSmall,
                VarianceType::FixedLarge => Variance::FixedLarge,
                VarianceType::FixedLargeLog => {
                    return Err(Error::param(
                        "variance_type",
                        "fixed_large_log is not supported: diffusers' DDPMScheduler.step uses sqrt(log beta_t) as the std (NaN); use fixed_large",
                    ))
                }
                VarianceType::Learned | VarianceType::LearnedRange => {
                    return Err(Error::param(
                        "variance_type",
                        "learned variances are not supported: the network's extra variance channels have no sampler here; use fixed_small or fixed_large",
                    ))
                }
            };
            let mut s = Ddpm::new(ddpm_chain(cfg, schedule, steps)?, variance, 1.0);
            s.clip_x0 = clip_x0;
            s.last_step_noise = LastStepNoise::IfIndexPositive;
            Ok(SchedulerSampler::Ddpm(s))
        }
        other => Err(Error::param(
            "sampler",
            format!("a diffusers scheduler config describes ddpm or ddim sampling, not --sampler {other}"),
        )),
    }
}

/// The sampler `name` as the diffusers scheduler of that kind, built from a folder's
/// `scheduler_config.json` the way diffusers' `XScheduler.from_config(pipe.scheduler.config)`
/// does: the schedule, prediction type, spacing, sigma grid and solver keys that apply are taken
/// from `cfg`; the keys that make the sampler what it is (class, `algorithm_type`,
/// `solver_order` for the named DPM-Solver++ variants) are set by the name. `None` for the
/// samplers without a diffusers scheduler (ddpm and ddim have [`from_scheduler_config`]).
pub fn scheduler_sampler(
    cfg: &SchedulerConfig,
    schedule: &Schedule,
    name: &str,
    steps: usize,
) -> Result<Option<Box<dyn Sampler>>> {
    use super::deis::Deis;
    use super::dpm_solver::DpmSolver;
    use super::sigma_euler::{Euler, EulerAncestral, Heun};
    use super::unipc::UniPc;
    use crate::nets::scheduler_config::SchedulerClass as C;
    let mut c = cfg.clone();
    let same_family = |a: C| cfg.class == a;
    let mut dpm = |class: C, algorithm: &str, order: Option<usize>| {
        if !same_family(class) {
            c.class = class;
        }
        c.solver.algorithm_type = Some(algorithm.into());
        if let Some(k) = order {
            c.solver.solver_order = Some(k);
        }
    };
    match name {
        "dpmpp-2m" => dpm(C::DpmSolverMultistep, "dpmsolver++", Some(2)),
        "dpmpp-3m" => dpm(C::DpmSolverMultistep, "dpmsolver++", Some(3)),
        "dpmpp-2m-sde" => dpm(C::DpmSolverMultistep, "sde-dpmsolver++", Some(2)),
        "dpmpp-2s" => dpm(C::DpmSolverSinglestep, "dpmsolver++", Some(2)),
        "dpm-solver" => {
            let class = if cfg.class == C::DpmSolverSinglestep {
                C::DpmSolverSinglestep
            } else {
                C::DpmSolverMultistep
            };
            dpm(class, "dpmsolver", None);
            // noise-prediction DPM-Solver cannot step to sigma = 0
            if c.solver.final_sigmas_type.as_deref() != Some("sigma_min") {
                c.solver.final_sigmas_type = Some("sigma_min".into());
            }
        }
        "unipc" => c.class = C::UniPcMultistep,
        "deis" => c.class = C::DeisMultistep,
        "euler" => c.class = C::EulerDiscrete,
        "euler-ancestral" => c.class = C::EulerAncestralDiscrete,
        "heun" => c.class = C::HeunDiscrete,
        _ => return Ok(None),
    }
    Ok(Some(match name {
        "unipc" => Box::new(UniPc::from_scheduler_config(&c, schedule, steps)?),
        "deis" => Box::new(Deis::from_scheduler_config(&c, schedule, steps)?),
        "euler" => Box::new(Euler::from_scheduler_config(&c, schedule, steps)?),
        "euler-ancestral" => Box::new(EulerAncestral::from_scheduler_config(&c, schedule, steps)?),
        "heun" => Box::new(Heun::from_scheduler_config(&c, schedule, steps)?),
        _ => Box::new(DpmSolver::from_scheduler_config(&c, schedule, steps)?),
    }))
}

/// The `--sampler` a diffusers scheduler config describes (what its pipeline would run).
pub fn sampler_of_config(cfg: &SchedulerConfig) -> &'static str {
    use crate::nets::scheduler_config::SchedulerClass as C;
    let f = &cfg.solver;
    match cfg.class {
        C::Ddpm => "ddpm",
        C::Ddim => "ddim",
        C::DpmSolverMultistep => match (
            f.algorithm_type.as_deref().unwrap_or("dpmsolver++"),
            f.solver_order.unwrap_or(2),
        ) {
            ("dpmsolver", _) => "dpm-solver",
            ("sde-dpmsolver++", _) => "dpmpp-2m-sde",
            (_, 3) => "dpmpp-3m",
            _ => "dpmpp-2m",
        },
        C::DpmSolverSinglestep => match f.algorithm_type.as_deref().unwrap_or("dpmsolver++") {
            "dpmsolver" => "dpm-solver",
            _ => "dpmpp-2s",
        },
        C::UniPcMultistep => "unipc",
        C::DeisMultistep => "deis",
        C::EulerDiscrete => "euler",
        C::EulerAncestralDiscrete => "euler-ancestral",
        C::HeunDiscrete => "heun",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nets::scheduler_config::SchedulerClass;

    fn cfg(spacing: TimestepSpacing, offset: usize) -> SchedulerConfig {
        SchedulerConfig {
            timestep_spacing: spacing,
            steps_offset: offset,
            ..SchedulerConfig::default()
        }
    }

    #[test]
    fn set_timesteps_by_hand() {
        // leading: 10 * (1000 div 10) = 100-strided from 0, + offset 1
        let c = cfg(TimestepSpacing::Leading, 1);
        assert_eq!(
            set_timesteps(&c, 10).unwrap(),
            vec![901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
        );
        // trailing, T = 1000, K = 7: round(1000 - i 142.857) - 1 = 999, 856, 713, 570, 428, 285, 142
        let c = cfg(TimestepSpacing::Trailing, 0);
        assert_eq!(
            set_timesteps(&c, 7).unwrap(),
            vec![999, 856, 713, 570, 428, 285, 142]
        );
        // linspace K = 1 is [0] in numpy (ours: [T-1])
        let c = cfg(TimestepSpacing::Linspace, 0);
        assert_eq!(set_timesteps(&c, 1).unwrap(), vec![0]);
        // linspace T = 1000, K = 4: round(0, 333, 666, 999)
        assert_eq!(set_timesteps(&c, 4).unwrap(), vec![999, 666, 333, 0]);
    }

    #[test]
    fn broken_diffusers_timesteps_are_errors() {
        // numpy's float arange gives 62 entries for K = 61, the last -1
        let e = set_timesteps(&cfg(TimestepSpacing::Trailing, 0), 61)
            .unwrap_err()
            .to_string();
        assert!(e.contains("62 entries") && e.contains("-1"), "{e}");
        // leading with an offset past T - 1: K = T = 1000, offset 1 -> 1000
        let e = set_timesteps(&cfg(TimestepSpacing::Leading, 1), 1000)
            .unwrap_err()
            .to_string();
        assert!(e.contains("steps_offset"), "{e}");
        assert!(set_timesteps(&cfg(TimestepSpacing::Leading, 0), 0).is_err());
        assert!(set_timesteps(&cfg(TimestepSpacing::Leading, 0), 1001).is_err());
    }

    #[test]
    fn ddim_previous_is_the_formula() {
        // linspace T = 1000, K = 50: round(i 999/49) = ..., 958.18, 978.57, 999 -> 999, 979, 958;
        // T div K = 20: 999 - 20 = 979 agrees, 979 - 20 = 959 is not 958
        let c = cfg(TimestepSpacing::Linspace, 0);
        let ts = set_timesteps(&c, 50).unwrap();
        assert_eq!(&ts[..3], &[999, 979, 958]);
        let prev = ddim_previous_timesteps(&c, &ts);
        assert_eq!(prev[0], Some(979));
        assert_eq!(prev[1], Some(959));
        assert_eq!(prev[49], None); // 0 - 20 < 0 -> final_alpha_cumprod
                                    // trailing, K = 7: the last step goes 142 -> 0, not to alpha_bar = 1
        let c = cfg(TimestepSpacing::Trailing, 0);
        let ts = set_timesteps(&c, 7).unwrap();
        assert_eq!(ddim_previous_timesteps(&c, &ts)[6], Some(0));
    }

    #[test]
    fn ddim_chain_agrees_with_ours_where_diffusers_does() {
        let s = Schedule::named("linear", 1000).unwrap();
        // leading, offset 0, set_alpha_to_one: the formula is the look-up; the chain is ours
        let c = SchedulerConfig {
            class: SchedulerClass::Ddim,
            ..cfg(TimestepSpacing::Leading, 0)
        };
        let ts = set_timesteps(&c, 50).unwrap();
        assert_eq!(
            ddim_chain(&c, &s, 50).unwrap(),
            ReverseChain::discrete(&s, &ts).unwrap()
        );
        // set_alpha_to_one = false: only the last step differs, landing on alpha_bar_0
        let c2 = SchedulerConfig {
            set_alpha_to_one: false,
            ..c.clone()
        };
        let ours = ReverseChain::discrete(&s, &ts).unwrap();
        let theirs = ddim_chain(&c2, &s, 50).unwrap();
        assert_eq!(&ours.steps[..49], &theirs.steps[..49]);
        let last = &theirs.steps[49];
        // from index 0 to index 0: a no-op step (beta = 0, x_s = x_t for eta = 0)
        assert_eq!(last.index, Some(0));
        assert_eq!(last.prev, ddpm_level(&s, 0));
        assert_eq!(last.beta, 0.0);
        assert_eq!(last.posterior_variance, 0.0);
        // linspace: step k lands at t_k - 20, not at t_{k+1}
        let c3 = cfg(TimestepSpacing::Linspace, 0);
        let ch = ddim_chain(&c3, &s, 50).unwrap();
        assert_eq!(ch.steps[1].prev, ddpm_level(&s, 959));
        assert_eq!(ch.steps[2].level, ddpm_level(&s, 958));
        // its respaced beta: 1 - alpha_bar_979 / alpha_bar_959
        let want = 1.0 - s.alpha_bar[979] / s.alpha_bar[959];
        assert!((ch.steps[1].beta - want).abs() < 1e-15);
    }

    #[test]
    fn unsupported_options_are_errors() {
        let s = Schedule::named("linear", 1000).unwrap();
        let mk = |f: fn(&mut SchedulerConfig)| {
            let mut c = SchedulerConfig::default();
            f(&mut c);
            c
        };
        let e = |c: &SchedulerConfig, k, eta| {
            from_scheduler_config(c, &s, k, 10, eta)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(e(
            &mk(|c| c.thresholding = true),
            SamplerKind::from_name("ddim").unwrap(),
            None
        )
        .contains("thresholding"));
        assert!(e(
            &mk(|c| c.variance_type = VarianceType::LearnedRange),
            SamplerKind::from_name("ddpm").unwrap(),
            None
        )
        .contains("variance_type"));
        assert!(e(
            &mk(|c| c.variance_type = VarianceType::FixedLargeLog),
            SamplerKind::from_name("ddpm").unwrap(),
            None
        )
        .contains("fixed_large_log"));
        assert!(e(
            &SchedulerConfig::default(),
            SamplerKind::from_name("ddpm").unwrap(),
            Some(0.5)
        )
        .contains("eta"));
        assert!(e(
            &SchedulerConfig::default(),
            SamplerKind::from_name("ode-heun").unwrap(),
            None
        )
        .contains("ddpm or ddim"));
        let short = Schedule::named("linear", 100).unwrap();
        assert!(from_scheduler_config(
            &SchedulerConfig::default(),
            &short,
            SamplerKind::from_name("ddim").unwrap(),
            10,
            None
        )
        .is_err());
        assert!(from_scheduler_config(
            &SchedulerConfig::default(),
            &s,
            SamplerKind::from_name("ddim").unwrap(),
            50,
            None
        )
        .is_ok());
    }
}
