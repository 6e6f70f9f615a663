//! DPM-Solver (Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model
//! Sampling in Around 10 Steps") and DPM-Solver++ (Lu et al. 2022b, "DPM-Solver++: Fast Solver
//! for Guided Sampling of Diffusion Probabilistic Models"), multistep and singlestep, with the
//! SDE variant of DPM-Solver++ (Lu et al. 2022b, appendix; diffusers' `sde-dpmsolver++`), as
//! diffusers' `DPMSolverMultistepScheduler` / `DPMSolverSinglestepScheduler` compute them.
//!
//! Notation: levels `(alpha, sigma)` of the [`LevelGrid`], `lambda = ln(alpha / sigma)`,
//! `h = lambda_t - lambda_s0`, `h_0 = lambda_s0 - lambda_s1`, `r0 = h_0 / h`; `m0, m1, m2` the
//! newest model outputs (x_0 for `++`, eps for DPM-Solver), `phi_k` of [`phi`].
//!
//! ```text
//! DPM-Solver++ (data prediction), multistep (Lu et al. 2022b, Alg. 2; eq. 9 for order 1):
//!   order 1:  x_t = (sigma_t/sigma_s) x_s - alpha_t (e^{-h} - 1) m0                          (= DDIM)
//!   order 2:  D0 = m0, D1 = (m0 - m1) / r0
//!     midpoint: x_t = (sigma_t/sigma_s0) x - alpha_t (e^{-h} - 1) (D0 + D1/2)                 (Alg. 2)
//!     heun:     x_t = (sigma_t/sigma_s0) x - alpha_t (e^{-h} - 1) D0 + alpha_t h phi_2(-h) D1
//!   order 3:  D1_0 = (m0 - m1)/r0, D1_1 = (m1 - m2)/r1, D1 = D1_0 + r0/(r0 + r1) (D1_0 - D1_1),
//!             D2 = (D1_0 - D1_1)/(r0 + r1)
//!             x_t = (sigma_t/sigma_s0) x - alpha_t (e^{-h} - 1) D0 + alpha_t h phi_2(-h) D1 + alpha_t h phi_3(-h) D2
//! DPM-Solver (noise prediction): the same with (alpha, sigma, -h) -> (sigma, alpha, h) and the
//!   signs of Lu et al. 2022, eq. 3.7 / Alg. 1 (order 1 is DDIM again):
//!   x_t = (alpha_t/alpha_s) x - sigma_t (e^h - 1) D0 [- sigma_t (e^h - 1) D1/2 | - sigma_t h phi_2(h) D1] [- sigma_t h phi_3(h) D2]
//! SDE-DPM-Solver++ (noise z ~ N(0, I) per step):
//!   x_t = (sigma_t/sigma_s) e^{-h} x + alpha_t (1 - e^{-2h}) (D0 + D1/2) + sigma_t sqrt(1 - e^{-2h}) z   (midpoint)
//! ```
//!
//! Singlestep (Lu et al. 2022, Alg. 1 with the intermediate points on the grid, as diffusers):
//! the steps are grouped by diffusers' order list (`[1, 2, 1, 2, ...]`); a group of order k
//! starts from the state at its first level and uses the model outputs at each level of the
//! group, so a second-order step from `s1` to `t` uses `m1` at `s1` and `m0` at the intermediate
//! `s0` (`h = lambda_t - lambda_s1`, `r0 = (lambda_s0 - lambda_s1)/h`).
//!
//! diffusers' choices, reproduced: the first steps use lower orders (warm-up); with
//! `lower_order_final` and fewer than 15 steps the last step is first order and the one before
//! it at most second order; a last step to sigma = 0 is always first order (it returns the
//! denoised mean `x_0`). DPM-Solver (noise prediction) cannot step to sigma = 0 (`sigma_t (e^h -
//! 1)` is 0 times infinity): it ends at sigma_min and **leaves noise of that std in the
//! output** (0.01 on the linear schedule; diffusers raises for `final_sigmas_type="zero"`, so do
//! we). A zero-length step (`h = 0`: karras and `sigma-min` end on the same sigma) leaves x
//! unchanged, where diffusers' heun-type formulas divide 0 by 0.
//!
//! Every step's arithmetic is a handful of scalar-times-tensor sums on the state (coefficients
//! in f64 on the host, the tensors never leave the device).

use super::registry::{grid_options, thresholding, Opt, SamplerOptions, SamplerSpec, ALL_PROCESSES};
use candle_core::Tensor;

use crate::denoiser::Denoiser;
use crate::error::{Error, Result};
use crate::nets::scheduler_config::{SchedulerClass, SchedulerConfig};
use crate::process::Process;
use crate::rng::NoiseStreams;
use crate::schedule::Schedule;

use super::exp_integrator::{check_order_reached, min_steps_for, model_x0_eps, phi, Thresholding};
use super::grids::{
    build_grid, lambda, FinalSigma, GridOptions, GridRules, GridStyle, LevelGrid, SigmaMinRule,
};
use super::{noise_like, Observer, SampleOutput, Sampler, StepEvent};

/// What the solver integrates (diffusers' `algorithm_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// DPM-Solver: the noise prediction eps (Lu et al. 2022).
    DpmSolver,
    /// DPM-Solver++: the data prediction x_0 (Lu et al. 2022b; diffusers' default).
    DpmSolverPlusPlus,
    /// SDE-DPM-Solver++: the data prediction along the reverse SDE (stochastic).
    SdeDpmSolverPlusPlus,
}

impl Algorithm {
    /// Parses diffusers' names `dpmsolver`, `dpmsolver++`, `sde-dpmsolver++`.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "dpmsolver" => Ok(Algorithm::DpmSolver),
            "dpmsolver++" => Ok(Algorithm::DpmSolverPlusPlus),
            "sde-dpmsolver++" => Ok(Algorithm::SdeDpmSolverPlusPlus),
            other => Err(Error::param(
                "algorithm_type",
                format!("'{other}' is not supported (supported: dpmsolver, dpmsolver++, sde-dpmsolver++; diffusers' deprecated sde-dpmsolver is not)"),
            )),
        }
    }
}

/// The second-order update's form (diffusers' `solver_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SolverType {
    /// `D1` weighted by `(e^{-h} - 1)/2` (Lu et al. 2022b, Alg. 2; diffusers' default).
    Midpoint,
    /// `D1` weighted by `h phi_2` (the exact integral of the linear term).
    Heun,
}

impl SolverType {
    /// Parses `midpoint` or `heun`.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "midpoint" => Ok(SolverType::Midpoint),
            "heun" => Ok(SolverType::Heun),
            other => Err(Error::param(
                "solver-type",
                format!("'{other}' is not a DPM-Solver type, expected midpoint or heun"),
            )),
        }
    }
}

/// Multistep (one model call per step, reusing earlier outputs) or singlestep (the steps of a
/// group of order k share one starting point).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// `DPMSolverMultistepScheduler`.
    Multistep,
    /// `DPMSolverSinglestepScheduler`.
    Singlestep,
}

/// DPM-Solver's options; `Default` is diffusers' `DPMSolverMultistepScheduler()` (= `dpmpp-2m`).
#[derive(Clone, Debug, PartialEq)]
pub struct DpmSolverOptions {
    /// `algorithm_type` (dpmsolver++).
    pub algorithm: Algorithm,
    /// Multistep or singlestep (multistep).
    pub method: Method,
    /// `solver_order`: 1, 2 or 3 (2).
    pub order: usize,
    /// `solver_type` (midpoint).
    pub solver_type: SolverType,
    /// `lower_order_final` (true; the singlestep scheduler's default is false).
    pub lower_order_final: bool,
    /// `euler_at_final`: the last step first order whatever the step count (false).
    pub euler_at_final: bool,
    /// The grid (spacing linspace, the spacing's sigmas, final zero; sigma-min for DPM-Solver).
    pub grid: GridOptions,
    /// `lambda_min_clipped` (-inf): drop the training steps with lambda below it from the spacing.
    pub lambda_min_clipped: f64,
    /// `thresholding` with its ratio and maximum (off).
    pub thresholding: Option<Thresholding>,
}

impl Default for DpmSolverOptions {
    fn default() -> Self {
        DpmSolverOptions {
            algorithm: Algorithm::DpmSolverPlusPlus,
            method: Method::Multistep,
            order: 2,
            solver_type: SolverType::Midpoint,
            lower_order_final: true,
            euler_at_final: false,
            grid: GridOptions::default(),
            lambda_min_clipped: f64::NEG_INFINITY,
            thresholding: None,
        }
    }
}

impl DpmSolverOptions {
    /// `dpm-solver`: the original noise-prediction DPM-Solver, multistep, order 2, ending at
    /// sigma_min (`DPMSolverMultistepScheduler(algorithm_type="dpmsolver", final_sigmas_type="sigma_min")`).
    pub fn dpm_solver() -> Self {
        DpmSolverOptions {
            algorithm: Algorithm::DpmSolver,
            ..Default::default()
        }
    }

    /// `dpmpp-2m`: DPM-Solver++(2M) (diffusers' default).
    pub fn dpmpp_2m() -> Self {
        Self::default()
    }

    /// `dpmpp-3m`: DPM-Solver++(3M).
    pub fn dpmpp_3m() -> Self {
        DpmSolverOptions {
            order: 3,
            ..Default::default()
        }
    }

    /// `dpmpp-2s`: DPM-Solver++(2S), singlestep (`DPMSolverSinglestepScheduler()`).
    pub fn dpmpp_2s() -> Self {
        DpmSolverOptions {
            method: Method::Singlestep,
            lower_order_final: false,
            ..Default::default()
        }
    }

    /// `dpmpp-2m-sde`: SDE-DPM-Solver++(2M) (`algorithm_type="sde-dpmsolver++"`).
    pub fn dpmpp_2m_sde() -> Self {
        DpmSolverOptions {
            algorithm: Algorithm::SdeDpmSolverPlusPlus,
            ..Default::default()
        }
    }

    /// The registry name these options amount to.
    pub fn name(&self) -> &'static str {
        use Algorithm::*;
        use Method::*;
        match (self.algorithm, self.method, self.order) {
            (DpmSolverPlusPlus, Multistep, 2) => "dpmpp-2m",
            (DpmSolverPlusPlus, Multistep, 3) => "dpmpp-3m",
            (DpmSolverPlusPlus, Singlestep, 2) => "dpmpp-2s",
            (SdeDpmSolverPlusPlus, Multistep, 2) => "dpmpp-2m-sde",
            _ => "dpm-solver",
        }
    }
}

/// The order diffusers' `DPMSolverMultistepScheduler.step` uses at each of `k` steps.
pub fn multistep_orders(
    k: usize,
    order: usize,
    lower_order_final: bool,
    euler_at_final: bool,
    final_zero: bool,
) -> Vec<usize> {
    (0..k)
        .map(|i| {
            let warm = i.min(order); // lower_order_nums
            let lof = i == k - 1 && (euler_at_final || (lower_order_final && k < 15) || final_zero);
            let los = i + 2 == k && lower_order_final && k < 15;
            if order == 1 || warm < 1 || lof {
                1
            } else if order == 2 || warm < 2 || los {
                2
            } else {
                3
            }
        })
        .collect()
}

/// diffusers' `DPMSolverSinglestepScheduler.get_order_list` (with `lower_order_final` forced on
/// when `k` is not a multiple of the order or the last step goes to sigma = 0, as diffusers does),
/// each order capped by the outputs available so far.
pub fn singlestep_orders(k: usize, order: usize, lower_order_final: bool, final_zero: bool) -> Vec<usize> {
    let lof = lower_order_final || k % order != 0 || final_zero;
    let rep = |pat: &[usize], n: usize| {
        pat.iter()
            .copied()
            .cycle()
            .take(pat.len() * n)
            .collect::<Vec<_>>()
    };
    let mut o: Vec<usize> = match (order, lof) {
        (1, _) => vec![1; k],
        (2, false) => rep(&[1, 2], k / 2),
        (3, false) => rep(&[1, 2, 3], k / 3),
        (2, true) if k % 2 == 0 => [rep(&[1, 2], k / 2 - 1), vec![1, 1]].concat(),
        (2, true) => [rep(&[1, 2], k / 2), vec![1]].concat(),
        (_, true) if k % 3 == 0 => [rep(&[1, 2, 3], k / 3 - 1), vec![1, 2, 1]].concat(),
        (_, true) if k % 3 == 1 => [rep(&[1, 2, 3], k / 3), vec![1]].concat(),
        _ => [rep(&[1, 2, 3], k / 3), vec![1, 2]].concat(),
    };
    if final_zero {
        if let Some(last) = o.last_mut() {
            *last = 1;
        }
    }
    o.iter().enumerate().map(|(i, &x)| x.min(i + 1)).collect()
}

/// DPM-Solver / DPM-Solver++ (see the module docs).
#[derive(Clone, Debug)]
pub struct DpmSolver {
    /// The options it was built with.
    pub options: DpmSolverOptions,
    /// The noise levels (K + 1).
    pub grid: LevelGrid,
    /// The order of each step.
    pub orders: Vec<usize>,
    prior_std: f64,
}

/// The solver's memory between steps (diffusers' `model_outputs` and singlestep `sample`).
#[derive(Clone, Debug, Default)]
pub struct DpmSolverState {
    /// The converted model outputs of the last steps, oldest first (at most the order).
    pub outputs: Vec<Tensor>,
    /// Singlestep: the state at the start of the current group.
    pub group_start: Option<Tensor>,
}

/// `sum_i c_i T_i` for scalar coefficients (the solvers' linear combinations).
pub(crate) fn combo(terms: &[(f64, &Tensor)]) -> Result<Tensor> {
    let mut acc = terms[0].1.affine(terms[0].0, 0.0)?;
    for (c, t) in &terms[1..] {
        if *c != 0.0 {
            acc = (acc + t.affine(*c, 0.0)?)?;
        }
    }
    Ok(acc)
}

impl DpmSolver {
    /// The solver for `steps` steps on `process` (the ddpm process or any continuous family).
    /// An order that `steps` never reaches (warm-up and `lower_order_final` lower the first
    /// and last orders) is an error saying how many steps it needs.
    pub fn new(process: &Process, steps: usize, options: &DpmSolverOptions) -> Result<Self> {
        Self::build(process, steps, options, true)
    }

    /// As [`DpmSolver::new`], but a step count too small for the order runs at the lower orders
    /// without complaint, as diffusers does (`from_scheduler_config` uses this).
    pub fn new_as_diffusers(process: &Process, steps: usize, options: &DpmSolverOptions) -> Result<Self> {
        Self::build(process, steps, options, false)
    }

    fn build(process: &Process, steps: usize, options: &DpmSolverOptions, strict: bool) -> Result<Self> {
        let o = options;
        if !(1..=3).contains(&o.order) {
            return Err(Error::param(
                "order",
                format!("got {}, DPM-Solver has orders 1, 2 and 3", o.order),
            ));
        }
        if o.method == Method::Singlestep && o.euler_at_final {
            return Err(Error::param(
                "euler_at_final",
                "applies to the multistep solver only (DPMSolverSinglestepScheduler has no such option)",
            ));
        }
        if let Some(th) = &o.thresholding {
            th.validate()?;
        }
        let default_final = match o.algorithm {
            Algorithm::DpmSolver => FinalSigma::SigmaMin,
            _ => FinalSigma::Zero,
        };
        if o.algorithm == Algorithm::DpmSolver && o.grid.final_sigma == Some(FinalSigma::Zero) {
            return Err(Error::param(
                "final-sigma",
                "DPM-Solver (noise prediction) cannot step to sigma = 0 (its update is sigma_t (e^h - 1) eps, 0 times infinity); use sigma-min, or DPM-Solver++ (dpmpp-2m) to end at the data",
            ));
        }
        let rules = GridRules {
            style: GridStyle::Multistep,
            default_final,
            sigma_min_rule: SigmaMinRule::FirstTrainingStep,
            lambda_min_clipped: o.lambda_min_clipped,
        };
        let grid = build_grid(process, steps, &o.grid, &rules)?;
        let final_zero = grid.sigmas[steps] == 0.0;
        let schedule = |k: usize| match o.method {
            Method::Multistep => {
                multistep_orders(k, o.order, o.lower_order_final, o.euler_at_final, final_zero)
            }
            Method::Singlestep => singlestep_orders(k, o.order, o.lower_order_final, final_zero),
        };
        let orders = schedule(steps);
        if strict {
            check_order_reached(
                o.name(),
                o.order,
                steps,
                &orders,
                min_steps_for(o.order, schedule),
            )?;
        }
        Ok(DpmSolver {
            options: o.clone(),
            grid,
            orders,
            prior_std: process.prior_std(),
        })
    }

    /// A fresh [`DpmSolverState`].
    pub fn start(&self) -> DpmSolverState {
        DpmSolverState::default()
    }

    /// Step `k` (0-based) from `x` at level k to level k + 1: one model call (diffusers'
    /// `step`), returning the new state and the step's x_0 prediction.
    pub fn step(
        &self,
        st: &mut DpmSolverState,
        k: usize,
        x: &Tensor,
        den: &dyn Denoiser,
        noise: &mut NoiseStreams,
    ) -> Result<(Tensor, Tensor)> {
        let o = &self.options;
        let (x0, eps) = model_x0_eps(den, x, self.grid.levels[k], o.thresholding.as_ref())?;
        let m = match o.algorithm {
            Algorithm::DpmSolver => eps,
            _ => x0.clone(),
        };
        st.outputs.push(m);
        if st.outputs.len() > o.order {
            st.outputs.remove(0);
        }
        let order = self.orders[k];
        let x_next = match o.method {
            Method::Multistep => self.update(k, order, x, &st.outputs, noise)?,
            Method::Singlestep => {
                if order == 1 {
                    st.group_start = Some(x.clone());
                }
                let start = st.group_start.as_ref().ok_or_else(|| {
                    Error::Numerical(
                        "singlestep DPM-Solver: a group did not start with a first-order step".into(),
                    )
                })?;
                self.update(k, order, start, &st.outputs, noise)?
            }
        };
        Ok((x_next, x0))
    }

    /// The update of order `order` to level `k + 1` from `x` (multistep: at level k;
    /// singlestep: at level `k + 1 - order`, the group's start).
    fn update(
        &self,
        k: usize,
        order: usize,
        x: &Tensor,
        outs: &[Tensor],
        noise: &mut NoiseStreams,
    ) -> Result<Tensor> {
        let g = &self.grid;
        let t = g.levels[k + 1];
        let single = self.options.method == Method::Singlestep;
        // the level the update starts from, and the lambdas of the outputs used
        let start = if single { k + 1 - order } else { k };
        let s = g.levels[start];
        let h = lambda(t) - lambda(s);
        if h == 0.0 {
            return Ok(x.clone());
        }
        let n = outs.len();
        let m0 = &outs[n - 1];
        let (a_t, s_t) = (t.alpha, t.sigma);
        let ratio_x = match self.options.algorithm {
            Algorithm::DpmSolver => a_t / s.alpha,
            _ => {
                if s_t == 0.0 {
                    0.0
                } else {
                    s_t / s.sigma
                }
            }
        };
        // D terms as (coefficient-ready) tensors
        let (d0, d1, d2): (Tensor, Option<Tensor>, Option<Tensor>) = match (order, single) {
            (1, _) => (m0.clone(), None, None),
            (2, false) => {
                let m1 = &outs[n - 2];
                let r0 = (g.lambda(k) - g.lambda(k - 1)) / h;
                (m0.clone(), Some(combo(&[(1.0 / r0, m0), (-1.0 / r0, m1)])?), None)
            }
            (2, true) => {
                // D0 = m1 (at s1 = start), D1 = (m0 - m1) / r0, r0 = (lambda_s0 - lambda_s1) / h
                let m1 = &outs[n - 2];
                let r0 = (g.lambda(k) - g.lambda(k - 1)) / h;
                (m1.clone(), Some(combo(&[(1.0 / r0, m0), (-1.0 / r0, m1)])?), None)
            }
            (_, false) => {
                let (m1, m2) = (&outs[n - 2], &outs[n - 3]);
                let (h0, h1) = (g.lambda(k) - g.lambda(k - 1), g.lambda(k - 1) - g.lambda(k - 2));
                let (r0, r1) = (h0 / h, h1 / h);
                let d1_0 = combo(&[(1.0 / r0, m0), (-1.0 / r0, m1)])?;
                let d1_1 = combo(&[(1.0 / r1, m1), (-1.0 / r1, m2)])?;
                let diff = (&d1_0 - &d1_1)?;
                let d1 = combo(&[(1.0, &d1_0), (r0 / (r0 + r1), &diff)])?;
                let d2 = diff.affine(1.0 / (r0 + r1), 0.0)?;
                (m0.clone(), Some(d1), Some(d2))
            }
            (_, true) => {
                // D0 = m2 (at s2 = start), D1_0 = (m1 - m2)/r1, D1_1 = (m0 - m2)/r0
                let (m1, m2) = (&outs[n - 2], &outs[n - 3]);
                let lam_s2 = g.lambda(k - 2);
                let (r0, r1) = ((g.lambda(k) - lam_s2) / h, (g.lambda(k - 1) - lam_s2) / h);
                let d1_0 = combo(&[(1.0 / r1, m1), (-1.0 / r1, m2)])?;
                let d1_1 = combo(&[(1.0 / r0, m0), (-1.0 / r0, m2)])?;
                if self.options.solver_type == SolverType::Midpoint {
                    (m2.clone(), Some(d1_1), None)
                } else {
                    let d1 = combo(&[(r0 / (r0 - r1), &d1_0), (-r1 / (r0 - r1), &d1_1)])?;
                    let d2 = combo(&[(2.0 / (r0 - r1), &d1_1), (-2.0 / (r0 - r1), &d1_0)])?;
                    (m2.clone(), Some(d1), Some(d2))
                }
            }
        };
        let midpoint2 = order == 2 && self.options.solver_type == SolverType::Midpoint;
        // coefficients of D0, D1, D2 and of the noise
        let (c0, c1, c2, cz) = match self.options.algorithm {
            Algorithm::DpmSolverPlusPlus => {
                let a1 = a_t * (-h).exp_m1(); // alpha_t (e^{-h} - 1)
                let c1 = if midpoint2 {
                    -0.5 * a1
                } else {
                    a_t * h * phi(2, -h)
                };
                (-a1, c1, a_t * h * phi(3, -h), 0.0)
            }
            Algorithm::DpmSolver => {
                let s1 = s_t * h.exp_m1(); // sigma_t (e^h - 1)
                let c1 = if midpoint2 {
                    -0.5 * s1
                } else {
                    -s_t * h * phi(2, h)
                };
                (-s1, c1, -s_t * h * phi(3, h), 0.0)
            }
            Algorithm::SdeDpmSolverPlusPlus => {
                let one_m = -(-2.0 * h).exp_m1(); // 1 - e^{-2h}
                let c1 = if midpoint2 {
                    0.5 * a_t * one_m
                } else {
                    a_t * 2.0 * h * phi(2, -2.0 * h)
                };
                // diffusers' third-order term: alpha_t ((1 - e^{-2h} - 2h) / (2h)^2 - 1/2)
                let c2 = a_t * (-phi(2, -2.0 * h) - 0.5);
                (a_t * one_m, c1, c2, s_t * one_m.sqrt())
            }
        };
        let ratio_x = if self.options.algorithm == Algorithm::SdeDpmSolverPlusPlus {
            ratio_x * (-h).exp()
        } else {
            ratio_x
        };
        let mut terms: Vec<(f64, &Tensor)> = vec![(ratio_x, x), (c0, &d0)];
        if let Some(d1) = &d1 {
            terms.push((c1, d1));
        }
        if let Some(d2) = &d2 {
            terms.push((c2, d2));
        }
        let z;
        if cz > 0.0 {
            z = noise_like(noise, x)?;
            terms.push((cz, &z));
        }
        combo(&terms)
    }

    /// The solver diffusers' `scheduler_config.json` describes (`DPMSolverMultistepScheduler` or
    /// `DPMSolverSinglestepScheduler`: `solver_order`, `algorithm_type`, `solver_type`,
    /// `lower_order_final`, `euler_at_final`, `use_karras_sigmas` / `use_exponential_sigmas` /
    /// `use_beta_sigmas`, `final_sigmas_type`, `lambda_min_clipped`, `timestep_spacing`,
    /// `steps_offset`, `thresholding`) for `steps` steps on `schedule` (normally
    /// `cfg.schedule()`). The denoiser's prediction type is the caller's (`cfg.prediction_type`).
    pub fn from_scheduler_config(cfg: &SchedulerConfig, schedule: &Schedule, steps: usize) -> Result<Self> {
        let f = &cfg.solver;
        let method = match cfg.class {
            SchedulerClass::DpmSolverSinglestep => Method::Singlestep,
            _ => Method::Multistep,
        };
        let mut o = DpmSolverOptions {
            method,
            algorithm: Algorithm::from_name(f.algorithm_type.as_deref().unwrap_or("dpmsolver++"))?,
            order: f.solver_order.unwrap_or(2),
            solver_type: match f.solver_type.as_deref() {
                None | Some("midpoint") | Some("logrho") | Some("bh1") | Some("bh2") => SolverType::Midpoint,
                Some(other) => SolverType::from_name(other)?,
            },
            lower_order_final: f.lower_order_final.unwrap_or(method == Method::Multistep),
            euler_at_final: f.euler_at_final.unwrap_or(false),
            grid: GridOptions::from_scheduler_config(cfg)?,
            lambda_min_clipped: f.lambda_min_clipped.unwrap_or(f64::NEG_INFINITY),
            thresholding: Thresholding::from_scheduler_config(cfg),
        };
        if o.grid.final_sigma.is_none() {
            o.grid.final_sigma = Some(FinalSigma::Zero);
        }
        if method == Method::Singlestep && o.grid.spacing != super::timesteps::Spacing::Linspace {
            // DPMSolverSinglestepScheduler has no timestep_spacing: it is always linspace
            o.grid.spacing = super::timesteps::Spacing::Linspace;
        }
        if o.algorithm == Algorithm::DpmSolver && o.grid.final_sigma == Some(FinalSigma::Zero) {
            return Err(Error::param(
                "final_sigmas_type",
                "\"zero\" is not supported for algorithm_type dpmsolver (diffusers raises too); choose \"sigma_min\"",
            ));
        }
        cfg.check_schedule_matches(schedule)?;
        DpmSolver::new_as_diffusers(&Process::Ddpm(schedule.clone()), steps, &o)
    }
}

impl Sampler for DpmSolver {
    fn name(&self) -> &'static str {
        self.options.name()
    }

    /// diffusers' `init_noise_sigma` (1 on the ddpm process); the process's prior std otherwise.
    fn prior_std(&self) -> f64 {
        self.prior_std
    }

    fn sample(
        &self,
        den: &dyn Denoiser,
        mut x: Tensor,
        noise: &mut NoiseStreams,
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
            let (x_next, x0) = self.step(&mut st, k, &x, den, noise)?;
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

/// A DPM-Solver of `base`'s kind with the user's options applied.
fn build_dpm(
    base: DpmSolverOptions,
    process: &Process,
    steps: Option<usize>,
    o: &SamplerOptions,
) -> Result<Box<dyn Sampler>> {
    let mut opts = base;
    if let Some(k) = o.order {
        opts.order = k;
    }
    if let Some(t) = &o.solver_type {
        opts.solver_type = SolverType::from_name(t)?;
    }
    if let Some(m) = o.multistep {
        opts.method = if m { Method::Multistep } else { Method::Singlestep };
    }
    if let Some(l) = o.lower_order_final {
        opts.lower_order_final = l;
    }
    let grid = grid_options(o)?;
    opts.grid = GridOptions {
        final_sigma: grid.final_sigma.or(opts.grid.final_sigma),
        ..grid
    };
    opts.thresholding = thresholding(o);
    Ok(Box::new(DpmSolver::new(process, steps.unwrap_or(1), &opts)?))
}

/// The options every DPM-Solver++ variant takes.
const DPMPP_OPTIONS: &[Opt] = &[
    Opt::Spacing,
    Opt::Sigmas,
    Opt::FinalSigma,
    Opt::SolverType,
    Opt::LowerOrderFinal,
    Opt::Thresholding,
];

/// The registry's declaration of `dpm-solver`.
pub const DPM_SOLVER_SPEC: SamplerSpec = SamplerSpec {
    name: "dpm-solver",
    about:
        "DPM-Solver (Lu et al. 2022), noise prediction, orders 1-3, multi- or singlestep; ends at sigma-min",
    processes: ALL_PROCESSES,
    default_steps: |_| 20,
    adaptive: false,
    default_steps_doc: "20",
    options: &[
        Opt::Order,
        Opt::SolverType,
        Opt::Multistep,
        Opt::Spacing,
        Opt::Sigmas,
        Opt::FinalSigma,
        Opt::LowerOrderFinal,
        Opt::Thresholding,
    ],
    stochastic: false,
    build: |p, steps, o| build_dpm(DpmSolverOptions::dpm_solver(), p, steps, o),
};

/// The registry's declaration of `dpmpp-2m`.
pub const DPMPP_2M_SPEC: SamplerSpec = SamplerSpec {
    name: "dpmpp-2m",
    about: "DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2), diffusers' default scheduler",
    processes: ALL_PROCESSES,
    default_steps: |_| 20,
    adaptive: false,
    default_steps_doc: "20",
    options: DPMPP_OPTIONS,
    stochastic: false,
    build: |p, steps, o| build_dpm(DpmSolverOptions::dpmpp_2m(), p, steps, o),
};

/// The registry's declaration of `dpmpp-3m`.
pub const DPMPP_3M_SPEC: SamplerSpec = SamplerSpec {
    name: "dpmpp-3m",
    about: "DPM-Solver++(3M), third-order multistep",
    processes: ALL_PROCESSES,
    default_steps: |_| 20,
    adaptive: false,
    default_steps_doc: "20",
    options: DPMPP_OPTIONS,
    stochastic: false,
    build: |p, steps, o| build_dpm(DpmSolverOptions::dpmpp_3m(), p, steps, o),
};

/// The registry's declaration of `dpmpp-2s`.
pub const DPMPP_2S_SPEC: SamplerSpec = SamplerSpec {
    name: "dpmpp-2s",
    about: "DPM-Solver++(2S) (Lu et al. 2022b, Alg. 1), singlestep",
    processes: ALL_PROCESSES,
    default_steps: |_| 20,
    adaptive: false,
    default_steps_doc: "20",
    options: DPMPP_OPTIONS,
    stochastic: false,
    build: |p, steps, o| build_dpm(DpmSolverOptions::dpmpp_2s(), p, steps, o),
};

/// The registry's declaration of `dpmpp-2m-sde`.
pub const DPMPP_2M_SDE_SPEC: SamplerSpec = SamplerSpec {
    name: "dpmpp-2m-sde",
    about: "SDE-DPM-Solver++(2M), the data prediction along the reverse SDE",
    processes: ALL_PROCESSES,
    default_steps: |_| 20,
    adaptive: false,
    default_steps_doc: "20",
    options: DPMPP_OPTIONS,
    stochastic: true,
    build: |p, steps, o| build_dpm(DpmSolverOptions::dpmpp_2m_sde(), p, steps, o),
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_lists_are_diffusers() {
        // 10 steps, order 3, lower_order_final, sigma_min final: 1, 2, 3, ..., 3, 2 (second to last), 1
        assert_eq!(
            multistep_orders(10, 3, true, false, false),
            vec![1, 2, 3, 3, 3, 3, 3, 3, 2, 1]
        );
        // 20 steps: K >= 15, only a zero final forces the last step to order 1
        let o = multistep_orders(20, 3, true, false, true);
        assert_eq!((o[18], o[19]), (3, 1));
        assert_eq!(multistep_orders(20, 3, true, false, false)[19], 3);
        // singlestep order 2, 6 steps, no lower_order_final, sigma_min: [1, 2] * 3
        assert_eq!(singlestep_orders(6, 2, false, false), vec![1, 2, 1, 2, 1, 2]);
        // 7 steps forces lower_order_final: [1, 2] * 3 + [1]
        assert_eq!(singlestep_orders(7, 2, false, false), vec![1, 2, 1, 2, 1, 2, 1]);
        // order 3, 9 steps, zero final: [1, 2, 3] * 2 + [1, 2] + [1]
        assert_eq!(
            singlestep_orders(9, 3, false, true),
            vec![1, 2, 3, 1, 2, 3, 1, 2, 1]
        );
    }
}
