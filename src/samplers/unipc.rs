//! UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
//! Diffusion Models"): the multistep predictor UniP-p (Alg. 2) and the corrector UniC-p (Alg. 1),
//! which reuses the model output at the new point, so correcting costs no extra evaluation; as
//! diffusers' `UniPCMultistepScheduler` computes them.
//!
//! With `lambda = ln(alpha / sigma)`, `h = lambda_t - lambda_s0`, `hh = -h` (data prediction,
//! `predict_x0`, the default) or `h` (noise prediction), `r_k = (lambda_{s_k} - lambda_s0)/h`
//! for the k-th previous level, `D1_k = (m_k - m0)/r_k`, and `B(h) = hh` (`bh1`) or
//! `e^hh - 1` (`bh2`, the default; Zhao et al. 2023, section 3.2):
//!
//! ```text
//! b_i   = hh phi_{i+1}(hh) i! / B(h),  R_ij = r_j^(i-1),  r = (r_1, ..., r_{p-1}, 1)      (Alg. 1-2; phi of exp_integrator)
//! UniP: rho = R[:-1, :-1]^-1 b[:-1] (order 2: rho = 1/2)
//!       x_t = (sigma_t/sigma_s0) x - alpha_t (e^hh - 1) m0 - alpha_t B(h) sum_k rho_k D1_k     (data prediction)
//! UniC: rho = R^-1 b (order 1: rho = 1/2), with m_t the output at the new point:
//!       x_t^c = (sigma_t/sigma_s0) x_s0 - alpha_t (e^hh - 1) m0 - alpha_t B(h) (sum_k rho_k D1_k + rho_p (m_t - m0))
//! ```
//!
//! (noise prediction: `(alpha_t/alpha_s0) x` and `sigma_t` in place of `alpha_t`). The corrected
//! state replaces the predicted one before the next step; the model was evaluated at the
//! predicted one (UniPC's free corrector). diffusers' choices, reproduced: the predictor order
//! warms up from 1 and, with `lower_order_final`, is capped by the steps left (`min(p, K - i)`,
//! whatever K); the corrector at step i uses the previous step's order; `disable_corrector`
//! lists steps whose state is not corrected; the last state is never corrected.
//!
//! Differences from diffusers (each an error or a repair, never silently different numbers):
//! - `bh1` with the default `final_sigmas_type="zero"` returns NaN in diffusers (its last step
//!   multiplies `B(h) = -inf` by a zero correction); here that zero term is skipped, so the
//!   last step is the data-prediction DDIM step to `x_0`.
//! - the noise-prediction variant (`predict_x0` false) cannot step to sigma = 0 (NaN in
//!   diffusers): an error; so is a higher-order last step to sigma = 0 (`lower_order_final`
//!   off), whose `r_k = 0` divides by zero.

use super::registry::{grid_options, thresholding, Opt, SamplerSpec, ALL_PROCESSES};
use candle_core::Tensor;

use crate::denoiser::Denoiser;
use crate::error::{Error, Result};
use crate::nets::scheduler_config::SchedulerConfig;
use crate::process::Process;
use crate::rng::NoiseStreams;
use crate::schedule::Schedule;

use super::dpm_solver::combo;
use super::exp_integrator::{check_order_reached, min_steps_for, model_x0_eps, phi, Thresholding};
use super::grids::{
    build_grid, lambda, FinalSigma, GridOptions, GridRules, GridStyle, LevelGrid, SigmaMinRule,
};
use super::{Observer, SampleOutput, Sampler, StepEvent};

/// UniPC's `B(h)` (diffusers' `solver_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BhType {
    /// `B(h) = h` (Zhao et al.'s B1).
    Bh1,
    /// `B(h) = e^h - 1` (B2; diffusers' default).
    Bh2,
}

impl BhType {
    /// Parses `bh1` or `bh2`.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "bh1" => Ok(BhType::Bh1),
            "bh2" => Ok(BhType::Bh2),
            other => Err(Error::param(
                "solver-type",
                format!("'{other}' is not a UniPC type, expected bh1 or bh2"),
            )),
        }
    }
}

/// UniPC's options; `Default` is diffusers' `UniPCMultistepScheduler()`.
#[derive(Clone, Debug, PartialEq)]
pub struct UniPcOptions {
    /// `solver_order`: 1, 2 or 3 (2).
    pub order: usize,
    /// `solver_type` (bh2).
    pub bh: BhType,
    /// `predict_x0`: integrate the data prediction (true) or the noise prediction.
    pub predict_x0: bool,
    /// The UniC corrector (true; false is UniP alone).
    pub corrector: bool,
    /// `disable_corrector`: steps whose state is not corrected (empty).
    pub disable_corrector: Vec<usize>,
    /// `lower_order_final` (true).
    pub lower_order_final: bool,
    /// The grid (linspace, the spacing's sigmas, final zero).
    pub grid: GridOptions,
    /// `thresholding` (off; applies to the data prediction only, as in diffusers).
    pub thresholding: Option<Thresholding>,
}

impl Default for UniPcOptions {
    fn default() -> Self {
        UniPcOptions {
            order: 2,
            bh: BhType::Bh2,
            predict_x0: true,
            corrector: true,
            disable_corrector: Vec::new(),
            lower_order_final: true,
            grid: GridOptions::default(),
            thresholding: None,
        }
    }
}

/// The predictor order diffusers' `UniPCMultistepScheduler.step` uses at each of `k` steps.
pub fn unipc_orders(k: usize, order: usize, lower_order_final: bool) -> Vec<usize> {
    (0..k)
        .map(|i| {
            let o = if lower_order_final {
                order.min(k - i)
            } else {
                order
            };
            o.min(i.min(order) + 1)
        })
        .collect()
}

/// UniPC (see the module docs).
#[derive(Clone, Debug)]
pub struct UniPc {
    /// The options it was built with.
    pub options: UniPcOptions,
    /// The noise levels (K + 1).
    pub grid: LevelGrid,
    /// The predictor order of each step.
    pub orders: Vec<usize>,
    prior_std: f64,
}

/// UniPC's memory between steps.
#[derive(Clone, Debug, Default)]
pub struct UniPcState {
    /// The converted model outputs of the last steps, oldest first.
    pub outputs: Vec<Tensor>,
    /// The (corrected) state the last predictor step started from (diffusers' `last_sample`).
    pub last_sample: Option<Tensor>,
}

/// Solves the small system `a x = b` (Gaussian elimination with partial pivoting).
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Result<Vec<f64>> {
    let n = b.len();
    for c in 0..n {
        let p = (c..n)
            .max_by(|&i, &j| a[i][c].abs().total_cmp(&a[j][c].abs()))
            .unwrap_or(c);
        if a[p][c] == 0.0 || !a[p][c].is_finite() {
            return Err(Error::Numerical(format!(
                "UniPC: singular coefficient system {a:?} (repeated noise levels?)"
            )));
        }
        a.swap(c, p);
        b.swap(c, p);
        let pivot = a[c].clone();
        for r in c + 1..n {
            let f = a[r][c] / pivot[c];
            for (v, p) in a[r].iter_mut().zip(&pivot).skip(c) {
                *v -= f * p;
            }
            b[r] -= f * b[c];
        }
    }
    let mut x = vec![0.0; n];
    for r in (0..n).rev() {
        let s: f64 = (r + 1..n).map(|k| a[r][k] * x[k]).sum();
        x[r] = (b[r] - s) / a[r][r];
    }
    Ok(x)
}

impl UniPc {
    /// UniPC for `steps` steps on `process`.
    /// An order that `steps` never reaches (warm-up and `lower_order_final` lower the first
    /// and last orders) is an error saying how many steps it needs.
    pub fn new(process: &Process, steps: usize, options: &UniPcOptions) -> Result<Self> {
        Self::build(process, steps, options, true)
    }

    /// As [`UniPc::new`], but a step count too small for the order runs at the lower orders
    /// without complaint, as diffusers does (`from_scheduler_config` uses this).
    pub fn new_as_diffusers(process: &Process, steps: usize, options: &UniPcOptions) -> Result<Self> {
        Self::build(process, steps, options, false)
    }

    fn build(process: &Process, steps: usize, options: &UniPcOptions, strict: bool) -> Result<Self> {
        let o = options;
        if !(1..=3).contains(&o.order) {
            return Err(Error::param(
                "order",
                format!("got {}, UniPC here has orders 1, 2 and 3", o.order),
            ));
        }
        if let Some(th) = &o.thresholding {
            th.validate()?;
        }
        let rules = GridRules {
            style: GridStyle::Multistep,
            default_final: FinalSigma::Zero,
            sigma_min_rule: SigmaMinRule::LastGridSigma,
            lambda_min_clipped: f64::NEG_INFINITY,
        };
        let grid = build_grid(process, steps, &o.grid, &rules)?;
        let orders = unipc_orders(steps, o.order, o.lower_order_final);
        let schedule = |k: usize| unipc_orders(k, o.order, o.lower_order_final);
        if strict {
            check_order_reached("unipc", o.order, steps, &orders, min_steps_for(o.order, schedule))?;
        }
        if grid.sigmas[steps] == 0.0 {
            if !o.predict_x0 {
                return Err(Error::param(
                    "final-sigma",
                    "UniPC's noise-prediction variant (predict_x0 false) cannot step to sigma = 0 (sigma_t (e^h - 1) is 0 times infinity; diffusers returns NaN); use sigma-min or predict_x0",
                ));
            }
            if orders[steps - 1] > 1 {
                return Err(Error::param(
                    "lower_order_final",
                    "a higher-order UniPC step to sigma = 0 divides by r = 0 (NaN in diffusers); keep lower_order_final or use final sigma-min",
                ));
            }
        }
        Ok(UniPc {
            options: o.clone(),
            grid,
            orders,
            prior_std: process.prior_std(),
        })
    }

    /// A fresh [`UniPcState`].
    pub fn start(&self) -> UniPcState {
        UniPcState::default()
    }

    /// `(hh, e^hh - 1, B(h), b_1..b_p)` for the step from level `s` to level `t`.
    fn coefficients(&self, h: f64, p: usize) -> (f64, f64, f64, Vec<f64>) {
        let hh = if self.options.predict_x0 { -h } else { h };
        let h_phi_1 = hh.exp_m1();
        let b_h = match self.options.bh {
            BhType::Bh1 => hh,
            BhType::Bh2 => h_phi_1,
        };
        let mut fact = 1.0;
        let b = (1..=p)
            .map(|i| {
                fact *= i as f64;
                hh * phi(i + 1, hh) * fact / b_h
            })
            .collect();
        (hh, h_phi_1, b_h, b)
    }

    /// The `(sigma or alpha ratio, alpha_t or sigma_t)` of the data / noise prediction forms.
    fn frame(&self, s: crate::denoiser::NoiseLevel, t: crate::denoiser::NoiseLevel) -> (f64, f64) {
        if self.options.predict_x0 {
            (if t.sigma == 0.0 { 0.0 } else { t.sigma / s.sigma }, t.alpha)
        } else {
            (t.alpha / s.alpha, t.sigma)
        }
    }

    /// UniP-p from `x` at level k to level k + 1; `outs` ends with the output at level k.
    fn predictor(&self, k: usize, p: usize, x: &Tensor, outs: &[Tensor]) -> Result<Tensor> {
        let g = &self.grid;
        let (s0, t) = (g.levels[k], g.levels[k + 1]);
        let h = lambda(t) - lambda(s0);
        if h == 0.0 {
            return Ok(x.clone());
        }
        let n = outs.len();
        let m0 = &outs[n - 1];
        let mut rks = Vec::new();
        let mut d1s = Vec::new();
        for i in 1..p {
            let rk = (g.lambda(k - i) - g.lambda(k)) / h;
            rks.push(rk);
            d1s.push(combo(&[(1.0 / rk, &outs[n - 1 - i]), (-1.0 / rk, m0)])?);
        }
        let (_, h_phi_1, b_h, b) = self.coefficients(h, p);
        let (ratio, scale) = self.frame(s0, t);
        let mut terms: Vec<(f64, &Tensor)> = vec![(ratio, x), (-scale * h_phi_1, m0)];
        let rhos = match p {
            1 => Vec::new(),
            2 => vec![0.5],
            _ => {
                rks.push(1.0);
                let r: Vec<Vec<f64>> = (0..p - 1)
                    .map(|i| (0..p - 1).map(|j| rks[j].powi(i as i32)).collect())
                    .collect();
                solve(r, b[..p - 1].to_vec())?
            }
        };
        for (rho, d) in rhos.iter().zip(&d1s) {
            terms.push((-scale * b_h * rho, d));
        }
        combo(&terms)
    }

    /// UniC-p: the corrected state at level k from the last state `x` at level k - 1, the
    /// outputs up to level k - 1 (`outs`) and the new output `m_t` at level k.
    fn corrector(&self, k: usize, p: usize, x: &Tensor, outs: &[Tensor], m_t: &Tensor) -> Result<Tensor> {
        let g = &self.grid;
        let (s0, t) = (g.levels[k - 1], g.levels[k]);
        let h = lambda(t) - lambda(s0);
        if h == 0.0 {
            return Ok(x.clone());
        }
        let n = outs.len();
        let m0 = &outs[n - 1];
        let mut rks = Vec::new();
        let mut d1s = Vec::new();
        for i in 1..p {
            let rk = (g.lambda(k - 1 - i) - g.lambda(k - 1)) / h;
            rks.push(rk);
            d1s.push(combo(&[(1.0 / rk, &outs[n - 1 - i]), (-1.0 / rk, m0)])?);
        }
        rks.push(1.0);
        let (_, h_phi_1, b_h, b) = self.coefficients(h, p);
        let rhos = if p == 1 {
            vec![0.5]
        } else {
            let r: Vec<Vec<f64>> = (0..p)
                .map(|i| (0..p).map(|j| rks[j].powi(i as i32)).collect())
                .collect();
            solve(r, b)?
        };
        let (ratio, scale) = self.frame(s0, t);
        let d1_t = (m_t - m0)?;
        let mut terms: Vec<(f64, &Tensor)> = vec![(ratio, x), (-scale * h_phi_1, m0)];
        for (rho, d) in rhos.iter().zip(&d1s) {
            terms.push((-scale * b_h * rho, d));
        }
        terms.push((-scale * b_h * rhos[p - 1], &d1_t));
        combo(&terms)
    }

    /// Step `k`: the model at `x` (level k), the corrector on `x` (unless disabled or k = 0),
    /// then the predictor to level k + 1 (diffusers' `step`). Returns the predicted state and
    /// the step's x_0 prediction.
    pub fn step(
        &self,
        st: &mut UniPcState,
        k: usize,
        x: &Tensor,
        den: &dyn Denoiser,
    ) -> Result<(Tensor, Tensor)> {
        let o = &self.options;
        let th = if o.predict_x0 {
            o.thresholding.as_ref()
        } else {
            None
        };
        let (x0, eps) = model_x0_eps(den, x, self.grid.levels[k], th)?;
        let m = if o.predict_x0 { x0.clone() } else { eps };
        let corrected = match &st.last_sample {
            Some(last) if k > 0 && o.corrector && !o.disable_corrector.contains(&(k - 1)) => {
                self.corrector(k, self.orders[k - 1], last, &st.outputs, &m)?
            }
            _ => x.clone(),
        };
        st.outputs.push(m);
        if st.outputs.len() > o.order {
            st.outputs.remove(0);
        }
        let x_next = self.predictor(k, self.orders[k], &corrected, &st.outputs)?;
        st.last_sample = Some(corrected);
        Ok((x_next, x0))
    }

    /// The solver a diffusers `UniPCMultistepScheduler` config describes (`solver_order`,
    /// `solver_type`, `predict_x0`, `disable_corrector`, `lower_order_final`, the grid keys,
    /// `thresholding`) for `steps` steps on `schedule`.
    pub fn from_scheduler_config(cfg: &SchedulerConfig, schedule: &Schedule, steps: usize) -> Result<Self> {
        let f = &cfg.solver;
        if f.solver_p {
            return Err(Error::param(
                "solver_p",
                "another scheduler as UniPC's predictor is not supported; remove solver_p",
            ));
        }
        let o = UniPcOptions {
            order: f.solver_order.unwrap_or(2),
            bh: match f.solver_type.as_deref() {
                // diffusers maps the other solvers' names to bh2
                None | Some("bh2") | Some("midpoint") | Some("heun") | Some("logrho") => BhType::Bh2,
                Some(other) => BhType::from_name(other)?,
            },
            predict_x0: f.predict_x0.unwrap_or(true),
            corrector: true,
            disable_corrector: f.disable_corrector.clone(),
            lower_order_final: f.lower_order_final.unwrap_or(true),
            grid: GridOptions::from_scheduler_config(cfg)?,
            thresholding: Thresholding::from_scheduler_config(cfg),
        };
        cfg.check_schedule_matches(schedule)?;
        UniPc::new_as_diffusers(&Process::Ddpm(schedule.clone()), steps, &o)
    }
}

impl Sampler for UniPc {
    fn name(&self) -> &'static str {
        "unipc"
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

/// The registry's declaration of `unipc`.
pub const SPEC: SamplerSpec = SamplerSpec {
    name: "unipc",
    about: "UniPC (Zhao et al. 2023): UniP predictor with the UniC corrector, orders 1-3",
    processes: ALL_PROCESSES,
    default_steps: |_| 20,
    adaptive: false,
    default_steps_doc: "20",
    options: &[
        Opt::Order,
        Opt::SolverType,
        Opt::Corrector,
        Opt::Spacing,
        Opt::Sigmas,
        Opt::FinalSigma,
        Opt::LowerOrderFinal,
        Opt::Thresholding,
    ],
    stochastic: false,
    build: |process, steps, o| {
        let mut opts = UniPcOptions::default();
        if let Some(k) = o.order {
            opts.order = k;
        }
        if let Some(t) = &o.solver_type {
            opts.bh = BhType::from_name(t)?;
        }
        if let Some(c) = o.corrector {
            opts.corrector = c;
        }
        if let Some(l) = o.lower_order_final {
            opts.lower_order_final = l;
        }
        opts.grid = grid_options(o)?;
        opts.thresholding = thresholding(o);
        Ok(Box::new(UniPc::new(process, steps.unwrap_or(1), &opts)?))
    },
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_and_solve() {
        // lower_order_final caps by the steps left whatever K: 10 steps, order 3
        assert_eq!(unipc_orders(10, 3, true), vec![1, 2, 3, 3, 3, 3, 3, 3, 2, 1]);
        assert_eq!(unipc_orders(4, 3, false), vec![1, 2, 3, 3]);
        // [[1, 1], [0.5, 1]] x = [2, 1.5] -> x = [1, 1]
        let x = solve(vec![vec![1.0, 1.0], vec![0.5, 1.0]], vec![2.0, 1.5]).unwrap();
        assert!((x[0] - 1.0).abs() < 1e-15 && (x[1] - 1.0).abs() < 1e-15);
        assert!(solve(vec![vec![1.0, 1.0], vec![1.0, 1.0]], vec![1.0, 1.0]).is_err());
    }
}
