//! DEIS (Zhang & Chen 2022, "Fast Sampling of Diffusion Models with Exponential Integrator"):
//! the multistep exponential integrator of the noise prediction with polynomial extrapolation,
//! in diffusers' `DEISMultistepScheduler` form (`algorithm_type="deis"`, `solver_type="logrho"`):
//! the ODE in `rho = sigma / alpha` (the EDM noise; Zhang & Chen's `rho`, section 4) is
//! `d(x/alpha) = eps d rho`, and eps is extrapolated by the Lagrange polynomial in `ln rho`
//! through the last outputs (the "rho AB-DEIS" of section 4.2, with log-rho interpolation):
//!
//! ```text
//! order 1:  x_t = (alpha_t/alpha_s) x - sigma_t (e^h - 1) m0                      (DDIM; h = lambda_t - lambda_s)
//! order 2:  x_t = alpha_t (x/alpha_s0 + c0 m0 + c1 m1),
//!           c_j = int_{rho_s0}^{rho_t} l_j(ln rho) d rho,  l_j the Lagrange basis on (ln rho_s0, ln rho_s1)
//!           int (ln r - ln c)/(ln b - ln c) dr = r (ln r - ln c - 1)/(ln b - ln c)
//! order 3:  the same with three outputs and the quadratic basis on (ln rho_s0, ln rho_s1, ln rho_s2)
//! ```
//!
//! diffusers' choices, reproduced: warm-up from order 1; `lower_order_final` with fewer than
//! 15 steps lowers the last two steps. DEIS integrates the noise prediction, which is undefined
//! at sigma = 0, so it **ends at sigma_min and leaves noise of that std in the output**
//! (diffusers has no `final_sigmas_type` here; asking for zero is an error). On the karras,
//! exponential and beta grids diffusers repeats the last sigma, so its last step has length 0
//! (one model call that changes nothing); reproduced, as the conformance fixture shows.

use super::registry::{grid_options, thresholding, Opt, SamplerSpec, ALL_PROCESSES};
use candle_core::Tensor;

use crate::denoiser::Denoiser;
use crate::error::{Error, Result};
use crate::nets::scheduler_config::SchedulerConfig;
use crate::process::Process;
use crate::rng::NoiseStreams;
use crate::schedule::Schedule;

use super::dpm_solver::{combo, multistep_orders};
use super::exp_integrator::{check_order_reached, min_steps_for, model_x0_eps, Thresholding};
use super::grids::{
    build_grid, lambda, FinalSigma, GridOptions, GridRules, GridStyle, LevelGrid, SigmaMinRule,
};
use super::{Observer, SampleOutput, Sampler, StepEvent};

/// DEIS's options; `Default` is diffusers' `DEISMultistepScheduler()`.
#[derive(Clone, Debug, PartialEq)]
pub struct DeisOptions {
    /// `solver_order`: 1, 2 or 3 (2).
    pub order: usize,
    /// `lower_order_final` (true).
    pub lower_order_final: bool,
    /// The grid (linspace, the spacing's sigmas; the final level is always sigma-min).
    pub grid: GridOptions,
    /// `thresholding` (off).
    pub thresholding: Option<Thresholding>,
}

impl Default for DeisOptions {
    fn default() -> Self {
        DeisOptions {
            order: 2,
            lower_order_final: true,
            grid: GridOptions::default(),
            thresholding: None,
        }
    }
}

/// DEIS (see the module docs).
#[derive(Clone, Debug)]
pub struct Deis {
    /// The options it was built with.
    pub options: DeisOptions,
    /// The noise levels (K + 1; the last at sigma_min).
    pub grid: LevelGrid,
    /// The order of each step.
    pub orders: Vec<usize>,
    prior_std: f64,
}

/// DEIS's memory between steps: the noise predictions of the last steps, oldest first.
#[derive(Clone, Debug, Default)]
pub struct DeisState {
    /// The outputs.
    pub outputs: Vec<Tensor>,
}

/// `int (ln r - ln c)/(ln b - ln c) dr` at r = t (diffusers' second-order `ind_fn`).
fn ind2(t: f64, b: f64, c: f64) -> f64 {
    t * (-c.ln() + t.ln() - 1.0) / (b.ln() - c.ln())
}

/// `int (ln r - ln c)(ln r - ln d) / ((ln b - ln c)(ln b - ln d)) dr` at r = t.
fn ind3(t: f64, b: f64, c: f64, d: f64) -> f64 {
    let (lt, lb, lc, ld) = (t.ln(), b.ln(), c.ln(), d.ln());
    let num = t * (lc * (ld - lt + 1.0) - ld * lt + ld + lt * lt - 2.0 * lt + 2.0);
    num / ((lb - lc) * (lb - ld))
}

impl Deis {
    /// DEIS for `steps` steps on `process`.
    /// An order that `steps` never reaches (warm-up and `lower_order_final` lower the first
    /// and last orders) is an error saying how many steps it needs.
    pub fn new(process: &Process, steps: usize, options: &DeisOptions) -> Result<Self> {
        Self::build(process, steps, options, true)
    }

    /// As [`Deis::new`], but a step count too small for the order runs at the lower orders
    /// without complaint, as diffusers does (`from_scheduler_config` uses this).
    pub fn new_as_diffusers(process: &Process, steps: usize, options: &DeisOptions) -> Result<Self> {
        Self::build(process, steps, options, false)
    }

    fn build(process: &Process, steps: usize, options: &DeisOptions, strict: bool) -> Result<Self> {
        let o = options;
        if !(1..=3).contains(&o.order) {
            return Err(Error::param(
                "order",
                format!("got {}, DEIS has orders 1, 2 and 3", o.order),
            ));
        }
        if o.grid.final_sigma == Some(FinalSigma::Zero) {
            return Err(Error::param(
                "final-sigma",
                "DEIS integrates the noise prediction, undefined at sigma = 0: it always ends at sigma-min",
            ));
        }
        if let Some(th) = &o.thresholding {
            th.validate()?;
        }
        let rules = GridRules {
            style: GridStyle::Multistep,
            default_final: FinalSigma::SigmaMin,
            sigma_min_rule: SigmaMinRule::LastGridSigma,
            lambda_min_clipped: f64::NEG_INFINITY,
        };
        let grid = build_grid(process, steps, &o.grid, &rules)?;
        let schedule = |k: usize| multistep_orders(k, o.order, o.lower_order_final, false, false);
        let orders = schedule(steps);
        if strict {
            check_order_reached("deis", o.order, steps, &orders, min_steps_for(o.order, schedule))?;
        }
        Ok(Deis {
            options: o.clone(),
            grid,
            orders,
            prior_std: process.prior_std(),
        })
    }

    /// A fresh [`DeisState`].
    pub fn start(&self) -> DeisState {
        DeisState::default()
    }

    /// Step `k` from `x` at level k to level k + 1 (one model call; diffusers' `step`).
    pub fn step(
        &self,
        st: &mut DeisState,
        k: usize,
        x: &Tensor,
        den: &dyn Denoiser,
    ) -> Result<(Tensor, Tensor)> {
        let o = &self.options;
        let g = &self.grid;
        let (x0, eps) = model_x0_eps(den, x, g.levels[k], o.thresholding.as_ref())?;
        st.outputs.push(eps);
        if st.outputs.len() > o.order {
            st.outputs.remove(0);
        }
        let outs = &st.outputs;
        let n = outs.len();
        let (s0, t) = (g.levels[k], g.levels[k + 1]);
        let rho = |i: usize| g.sigmas[i];
        let x_next = match self.orders[k] {
            _ if lambda(t) == lambda(s0) => x.clone(),
            1 => {
                let h = lambda(t) - lambda(s0);
                combo(&[(t.alpha / s0.alpha, x), (-t.sigma * h.exp_m1(), &outs[n - 1])])?
            }
            2 => {
                let (rt, r0, r1) = (rho(k + 1), rho(k), rho(k - 1));
                let c1 = ind2(rt, r0, r1) - ind2(r0, r0, r1);
                let c2 = ind2(rt, r1, r0) - ind2(r0, r1, r0);
                combo(&[
                    (t.alpha / s0.alpha, x),
                    (t.alpha * c1, &outs[n - 1]),
                    (t.alpha * c2, &outs[n - 2]),
                ])?
            }
            _ => {
                let (rt, r0, r1, r2) = (rho(k + 1), rho(k), rho(k - 1), rho(k - 2));
                let c1 = ind3(rt, r0, r1, r2) - ind3(r0, r0, r1, r2);
                let c2 = ind3(rt, r1, r2, r0) - ind3(r0, r1, r2, r0);
                let c3 = ind3(rt, r2, r0, r1) - ind3(r0, r2, r0, r1);
                combo(&[
                    (t.alpha / s0.alpha, x),
                    (t.alpha * c1, &outs[n - 1]),
                    (t.alpha * c2, &outs[n - 2]),
                    (t.alpha * c3, &outs[n - 3]),
                ])?
            }
        };
        Ok((x_next, x0))
    }

    /// The solver a diffusers `DEISMultistepScheduler` config describes (`solver_order`,
    /// `lower_order_final`, the grid keys, `thresholding`) for `steps` steps on `schedule`.
    pub fn from_scheduler_config(cfg: &SchedulerConfig, schedule: &Schedule, steps: usize) -> Result<Self> {
        let f = &cfg.solver;
        if let Some(a) = f.algorithm_type.as_deref().filter(|a| *a != "deis") {
            return Err(Error::param(
                "algorithm_type",
                format!("'{a}': DEISMultistepScheduler supports only deis"),
            ));
        }
        let mut grid = GridOptions::from_scheduler_config(cfg)?;
        grid.final_sigma = None;
        let o = DeisOptions {
            order: f.solver_order.unwrap_or(2),
            lower_order_final: f.lower_order_final.unwrap_or(true),
            grid,
            thresholding: Thresholding::from_scheduler_config(cfg),
        };
        cfg.check_schedule_matches(schedule)?;
        Deis::new_as_diffusers(&Process::Ddpm(schedule.clone()), steps, &o)
    }
}

impl Sampler for Deis {
    fn name(&self) -> &'static str {
        "deis"
    }

    /// diffusers' `init_noise_sigma` (1 on the ddpm process); the process's prior std otherwise.
    fn prior_std(&self) -> f64 {
        self.prior_std
    }

    fn sample(
        &self,
        den: &dyn Denoiser,
        mut x: Tensor,
        _noise: &mut NoiseStreams,
        observer: &mut dyn Observer,
    ) -> Result<SampleOutput> {
        let g = &self.grid;
        observer.observe(&StepEvent {
            step: 0,
            t: g.times[0],
            level: g.levels[0],
            x: &x,
            x0_pred: None,
        })?;
        let mut st = self.start();
        for k in 0..g.steps() {
            let (x_next, x0) = self.step(&mut st, k, &x, den)?;
            x = x_next;
            observer.observe(&StepEvent {
                step: k + 1,
                t: g.times[k + 1],
                level: g.levels[k + 1],
                x: &x,
                x0_pred: Some(&x0),
            })?;
        }
        Ok(SampleOutput { x, nfe: g.steps() })
    }
}

/// The registry's declaration of `deis`.
pub const SPEC: SamplerSpec = SamplerSpec {
    name: "deis",
    about:
        "DEIS (Zhang & Chen 2023), exponential integrator with polynomial extrapolation; ends at sigma-min",
    processes: ALL_PROCESSES,
    default_steps: |_| 20,
    adaptive: false,
    default_steps_doc: "20",
    options: &[
        Opt::Order,
        Opt::Spacing,
        Opt::Sigmas,
        Opt::FinalSigma,
        Opt::LowerOrderFinal,
        Opt::Thresholding,
    ],
    stochastic: false,
    build: |process, steps, o| {
        let mut opts = DeisOptions::default();
        if let Some(k) = o.order {
            opts.order = k;
        }
        if let Some(l) = o.lower_order_final {
            opts.lower_order_final = l;
        }
        opts.grid = grid_options(o)?;
        opts.thresholding = thresholding(o);
        Ok(Box::new(Deis::new(process, steps.unwrap_or(1), &opts)?))
    },
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lagrange_integrals_integrate_to_the_step_length() {
        // the basis polynomials sum to 1, so their integrals sum to rho_t - rho_s0
        let (rt, r0, r1, r2) = (0.5, 1.0, 2.0, 4.0);
        let c = (ind2(rt, r0, r1) - ind2(r0, r0, r1)) + (ind2(rt, r1, r0) - ind2(r0, r1, r0));
        assert!((c - (rt - r0)).abs() < 1e-14);
        let c = (ind3(rt, r0, r1, r2) - ind3(r0, r0, r1, r2))
            + (ind3(rt, r1, r2, r0) - ind3(r0, r1, r2, r0))
            + (ind3(rt, r2, r0, r1) - ind3(r0, r2, r0, r1));
        assert!((c - (rt - r0)).abs() < 1e-14);
    }
}
