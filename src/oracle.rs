//! The exact denoiser for Gaussian-mixture data.
//!
//! If `x_0 ~ sum_k w_k N(mu_k, Sigma_k)` and `x_t = alpha x_0 + sigma eps`, then
//!
//! ```text
//! p_t(x)        = sum_k w_k N(x; m_k, C_k),    m_k = alpha mu_k,  C_k = alpha^2 Sigma_k + sigma^2 I
//! r_k(x)        = w_k N(x; m_k, C_k) / p_t(x)                       (responsibilities, log-sum-exp)
//! u_k(x)        = C_k^{-1} (x - m_k)                                 (Cholesky solves)
//! E[x_0 | x, k] = mu_k + alpha Sigma_k u_k                           (Gaussian conditioning)
//! E[x_0 | x]    = sum_k r_k E[x_0 | x, k]
//! score(x)      = grad ln p_t(x) = -sum_k r_k u_k
//! E[eps | x]    = (x - alpha E[x_0 | x]) / sigma = sigma sum_k r_k u_k
//! ```
//!
//! and the Jacobian of the score (for the exact probability-flow likelihood) is
//!
//! ```text
//! J(x) = grad score = sum_k r_k (u_k u_k^T - C_k^{-1}) - u_bar u_bar^T,   u_bar = sum_k r_k u_k
//! tr J = sum_k r_k (|u_k|^2 - tr C_k^{-1}) - |u_bar|^2.
//! ```
//!
//! Everything is computed in f64 (whatever the dtype of the tensors passed in), eps and the
//! score directly from `u_k` (no cancellation at small sigma). The factorisations of `C_k` are
//! computed once per noise level and cached.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Tensor};

use crate::denoiser::{Denoiser, NoiseLevel, Prediction};
use crate::error::{Error, Result};
use crate::gmm::{log_sum_exp, Factor, Gmm};
use crate::ode_likelihood::ScoreJacobian;

/// Cached levels before the cache is cleared (a sampler uses one level per step; adaptive
/// per-sample solvers use many).
const CACHE_LIMIT: usize = 8192;

/// The factorisations of one noise level.
struct LevelFactors {
    /// `ln w_k - 1/2 (D ln 2 pi + ln det C_k)`.
    log_norm: Vec<f64>,
    /// `C_k = alpha^2 Sigma_k + sigma^2 I`, factorised.
    factors: Vec<Factor>,
    /// `tr C_k^{-1}`.
    trace_inv: Vec<f64>,
}

/// Per-row working memory: responsibilities `r` (K) and `u_k = C_k^{-1}(x - m_k)` (K x D).
struct Scratch {
    logits: Vec<f64>,
    r: Vec<f64>,
    u: Vec<f64>,
    tmp: Vec<f64>,
}

impl Scratch {
    fn new(k: usize, d: usize) -> Self {
        Scratch {
            logits: vec![0.0; k],
            r: vec![0.0; k],
            u: vec![0.0; k * d],
            tmp: vec![0.0; d],
        }
    }
}

/// Which outputs `Oracle::outputs` computes.
#[derive(Clone, Copy)]
struct Want {
    x0: bool,
    eps: bool,
    score: bool,
}

/// The exact denoiser of a Gaussian mixture ([`Denoiser`] with `Prediction::X0`).
pub struct Oracle {
    gmm: Gmm,
    cache: Mutex<HashMap<(u64, u64), Arc<LevelFactors>>>,
}

impl Oracle {
    /// The oracle for data from `gmm`.
    pub fn new(gmm: Gmm) -> Self {
        Oracle {
            gmm,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The data distribution.
    pub fn gmm(&self) -> &Gmm {
        &self.gmm
    }

    fn level_factors(&self, level: NoiseLevel) -> Result<Arc<LevelFactors>> {
        let key = (level.alpha.to_bits(), level.sigma.to_bits());
        // A poisoned lock only means another thread panicked mid-insert; the map is still valid.
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = cache.get(&key) {
            return Ok(f.clone());
        }
        if !(level.alpha.is_finite() && level.sigma.is_finite() && level.alpha >= 0.0 && level.sigma >= 0.0)
            || (level.alpha == 0.0 && level.sigma == 0.0)
        {
            return Err(Error::param(
                "noise level",
                format!(
                    "alpha = {}, sigma = {}: expected finite, non-negative, not both 0",
                    level.alpha, level.sigma
                ),
            ));
        }
        let d = self.gmm.dim();
        let (a2, s2) = (level.alpha * level.alpha, level.sigma * level.sigma);
        let mut log_norm = Vec::new();
        let mut factors = Vec::new();
        let mut trace_inv = Vec::new();
        for (k, cov) in self.gmm.covariances().iter().enumerate() {
            let c = cov.scaled_plus_identity(d, a2, s2);
            let f = Factor::new(&c, d).map_err(|e| {
                Error::Numerical(format!(
                    "component {k} at alpha = {}, sigma = {}: {e}",
                    level.alpha, level.sigma
                ))
            })?;
            log_norm.push(
                self.gmm.weights()[k].ln()
                    - 0.5 * (d as f64 * (2.0 * std::f64::consts::PI).ln() + f.logdet(d)),
            );
            trace_inv.push(f.trace_inverse(d));
            factors.push(f);
        }
        let lf = Arc::new(LevelFactors {
            log_norm,
            factors,
            trace_inv,
        });
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(key, lf.clone());
        Ok(lf)
    }

    /// Fills `s.r` and `s.u` for one row `x` at a level with factors `lf`.
    fn row_posterior(&self, lf: &LevelFactors, alpha: f64, x: &[f64], s: &mut Scratch) {
        let d = self.gmm.dim();
        for (c, mean) in self.gmm.means().iter().enumerate() {
            let v = &mut s.u[c * d..(c + 1) * d];
            for j in 0..d {
                v[j] = x[j] - alpha * mean[j];
            }
            lf.factors[c].whiten(d, v);
            let maha: f64 = v.iter().map(|z| z * z).sum();
            s.logits[c] = lf.log_norm[c] - 0.5 * maha;
            lf.factors[c].unwhiten_t(d, v);
        }
        let lse = log_sum_exp(&s.logits);
        for (r, l) in s.r.iter_mut().zip(&s.logits) {
            *r = (l - lse).exp();
        }
    }

    /// The factors of `level`, reusing `current` when the level repeats (the common case).
    fn factors_for(
        &self,
        level: NoiseLevel,
        current: &mut Option<(NoiseLevel, Arc<LevelFactors>)>,
    ) -> Result<Arc<LevelFactors>> {
        if let Some((l, lf)) = current {
            if *l == level {
                return Ok(lf.clone());
            }
        }
        let lf = self.level_factors(level)?;
        *current = Some((level, lf.clone()));
        Ok(lf)
    }

    /// The requested outputs for a batch (each shaped like `x`, in x's dtype):
    /// `x0 = sum_k r_k (mu_k + alpha Sigma_k u_k)`, `eps = sigma sum_k r_k u_k`, `score = -sum_k r_k u_k`.
    fn outputs(&self, x: &Tensor, levels: &[NoiseLevel], want: Want) -> Result<[Option<Tensor>; 3]> {
        let (data, d) = self.rows(x, levels)?;
        let k = self.gmm.num_components();
        let mut s = Scratch::new(k, d);
        let mut x0 = if want.x0 {
            vec![0.0; data.len()]
        } else {
            Vec::new()
        };
        let mut ubar = vec![0.0; data.len()];
        let mut current = None;
        for (i, row) in data.chunks(d).enumerate() {
            let level = levels[i];
            let lf = self.factors_for(level, &mut current)?;
            self.row_posterior(&lf, level.alpha, row, &mut s);
            let ub = &mut ubar[i * d..(i + 1) * d];
            for c in 0..k {
                let rc = s.r[c];
                let uc = &s.u[c * d..(c + 1) * d];
                for j in 0..d {
                    ub[j] += rc * uc[j];
                }
                if want.x0 {
                    self.gmm.covariances()[c].matvec(d, uc, &mut s.tmp);
                    let mean = &self.gmm.means()[c];
                    let o = &mut x0[i * d..(i + 1) * d];
                    for j in 0..d {
                        o[j] += rc * (mean[j] + level.alpha * s.tmp[j]);
                    }
                }
            }
        }
        let to_tensor = |v: Vec<f64>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, x.shape(), x.device())?.to_dtype(x.dtype())?)
        };
        let eps = if want.eps {
            let e: Vec<f64> = ubar
                .chunks(d)
                .zip(levels)
                .flat_map(|(u, l)| u.iter().map(move |v| l.sigma * v))
                .collect();
            Some(to_tensor(e)?)
        } else {
            None
        };
        let score = if want.score {
            Some(to_tensor(ubar.iter().map(|v| -v).collect())?)
        } else {
            None
        };
        let x0 = if want.x0 { Some(to_tensor(x0)?) } else { None };
        Ok([x0, eps, score])
    }

    /// The one output `want` asks for.
    fn one(&self, x: &Tensor, levels: &[NoiseLevel], want: Want) -> Result<Tensor> {
        self.outputs(x, levels, want)?
            .into_iter()
            .flatten()
            .next()
            .ok_or_else(|| Error::Numerical("internal error: no oracle output requested".into()))
    }

    /// x as f64 rows of length D, after checking the batch and the dimension.
    fn rows(&self, x: &Tensor, levels: &[NoiseLevel]) -> Result<(Vec<f64>, usize)> {
        let d = self.gmm.dim();
        let b = x.dim(0)?;
        if levels.len() != b {
            return Err(Error::param(
                "noise levels",
                format!("got {} levels for a batch of {b}", levels.len()),
            ));
        }
        if x.elem_count() != b * d {
            return Err(Error::param(
                "x_t",
                format!(
                    "shape {:?} does not hold rows of the mixture's dimension {d}",
                    x.dims()
                ),
            ));
        }
        let data = x.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        Ok((data, d))
    }

    /// E[x_0 | x_t = x] for f64 rows (n x D) at one level.
    pub fn posterior_mean_rows(&self, x: &[f64], level: NoiseLevel) -> Result<Vec<f64>> {
        let t = Tensor::from_vec(
            x.to_vec(),
            (x.len() / self.gmm.dim(), self.gmm.dim()),
            &candle_core::Device::Cpu,
        )?;
        let n = t.dim(0)?;
        Ok(self.predict_x0(&t, &vec![level; n])?.flatten_all()?.to_vec1()?)
    }

    /// ln p_t(x) of the noisy marginal at `level` for f64 rows (n x D).
    pub fn log_density_rows(&self, x: &[f64], level: NoiseLevel) -> Result<Vec<f64>> {
        self.gmm.noisy(level.alpha, level.sigma)?.log_density_rows(x)
    }
}

impl Denoiser for Oracle {
    fn prediction(&self) -> Prediction {
        Prediction::X0
    }

    fn output(&self, x_t: &Tensor, levels: &[NoiseLevel]) -> Result<Tensor> {
        self.predict_x0(x_t, levels)
    }

    /// E[x_0 | x_t] = sum_k r_k (mu_k + alpha Sigma_k u_k).
    fn predict_x0(&self, x_t: &Tensor, levels: &[NoiseLevel]) -> Result<Tensor> {
        self.one(
            x_t,
            levels,
            Want {
                x0: true,
                eps: false,
                score: false,
            },
        )
    }

    /// E[eps | x_t] = sigma sum_k r_k u_k.
    fn predict_eps(&self, x_t: &Tensor, levels: &[NoiseLevel]) -> Result<Tensor> {
        self.one(
            x_t,
            levels,
            Want {
                x0: false,
                eps: true,
                score: false,
            },
        )
    }

    /// Both, from one pass over the components.
    fn predict_x0_eps(&self, x_t: &Tensor, levels: &[NoiseLevel]) -> Result<(Tensor, Tensor)> {
        match self.outputs(
            x_t,
            levels,
            Want {
                x0: true,
                eps: true,
                score: false,
            },
        )? {
            [Some(x0), Some(eps), _] => Ok((x0, eps)),
            _ => Err(Error::Numerical("internal error: oracle outputs missing".into())),
        }
    }

    /// score = -sum_k r_k u_k.
    fn score(&self, x_t: &Tensor, levels: &[NoiseLevel]) -> Result<Tensor> {
        self.one(
            x_t,
            levels,
            Want {
                x0: false,
                eps: false,
                score: true,
            },
        )
    }
}

impl ScoreJacobian for Oracle {
    /// tr J = sum_k r_k (|u_k|^2 - tr C_k^{-1}) - |u_bar|^2.
    fn score_divergence(&self, x_t: &Tensor, levels: &[NoiseLevel]) -> Result<Vec<f64>> {
        let (data, d) = self.rows(x_t, levels)?;
        let k = self.gmm.num_components();
        let mut s = Scratch::new(k, d);
        let mut current = None;
        let mut out = Vec::with_capacity(levels.len());
        for (row, level) in data.chunks(d).zip(levels) {
            let lf = self.factors_for(*level, &mut current)?;
            self.row_posterior(&lf, level.alpha, row, &mut s);
            let mut ubar = vec![0.0; d];
            let mut tr = 0.0;
            for c in 0..k {
                let uc = &s.u[c * d..(c + 1) * d];
                tr += s.r[c] * (uc.iter().map(|v| v * v).sum::<f64>() - lf.trace_inv[c]);
                ubar.iter_mut().zip(uc).for_each(|(a, b)| *a += s.r[c] * b);
            }
            out.push(tr - ubar.iter().map(|v| v * v).sum::<f64>());
        }
        Ok(out)
    }

    /// J v = sum_k r_k (u_k (u_k . v) - C_k^{-1} v) - u_bar (u_bar . v).
    fn score_jvp(&self, x_t: &Tensor, levels: &[NoiseLevel], v: &Tensor) -> Result<Tensor> {
        let (vs, d) = self.rows(v, levels)?;
        let (data, _) = self.rows(x_t, levels)?;
        let k = self.gmm.num_components();
        let mut s = Scratch::new(k, d);
        let mut current = None;
        let mut out = vec![0.0; data.len()];
        for (i, ((row, vrow), o)) in data
            .chunks(d)
            .zip(vs.chunks(d))
            .zip(out.chunks_mut(d))
            .enumerate()
        {
            let level = levels[i];
            let lf = self.factors_for(level, &mut current)?;
            self.row_posterior(&lf, level.alpha, row, &mut s);
            let mut ubar = vec![0.0; d];
            for c in 0..k {
                let uc = &s.u[c * d..(c + 1) * d];
                let uv: f64 = uc.iter().zip(vrow).map(|(a, b)| a * b).sum();
                s.tmp.copy_from_slice(vrow);
                lf.factors[c].solve(d, &mut s.tmp);
                for j in 0..d {
                    o[j] += s.r[c] * (uc[j] * uv - s.tmp[j]);
                }
                ubar.iter_mut().zip(uc).for_each(|(a, b)| *a += s.r[c] * b);
            }
            let ubv: f64 = ubar.iter().zip(vrow).map(|(a, b)| a * b).sum();
            o.iter_mut().zip(&ubar).for_each(|(a, b)| *a -= b * ubv);
        }
        Ok(Tensor::from_vec(out, x_t.shape(), x_t.device())?.to_dtype(x_t.dtype())?)
    }
}

/// The exact class-conditional denoiser of a labelled mixture: class `c` is the oracle of the
/// sub-mixture of the components labelled `c` (weights renormalised, [`Gmm::class_mixture`]), the
/// null class (`None`) the oracle of the whole mixture. Guided by [`crate::guidance::Guided`] it
/// is the exact guided denoiser of Ho & Salimans (2022).
pub struct ConditionalOracle {
    all: Oracle,
    classes: Vec<Oracle>,
}

impl ConditionalOracle {
    /// The conditional oracle of `gmm` (its `labels`, by default one class per component).
    pub fn new(gmm: Gmm) -> Result<Self> {
        let classes = (0..gmm.num_classes())
            .map(|c| Ok(Oracle::new(gmm.class_mixture(c)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(ConditionalOracle {
            all: Oracle::new(gmm),
            classes,
        })
    }

    /// The whole mixture.
    pub fn gmm(&self) -> &Gmm {
        self.all.gmm()
    }

    /// The oracle of `class` (`None`: the whole mixture).
    pub fn oracle(&self, class: Option<usize>) -> Result<&Oracle> {
        match class {
            None => Ok(&self.all),
            Some(c) => self.classes.get(c).ok_or_else(|| {
                Error::param(
                    "class",
                    format!(
                        "class {c} is out of range: the mixture has {} classes",
                        self.classes.len()
                    ),
                )
            }),
        }
    }
}

impl crate::guidance::ClassConditional for ConditionalOracle {
    fn prediction(&self) -> Prediction {
        Prediction::X0
    }

    fn num_classes(&self) -> usize {
        self.classes.len()
    }

    fn has_null_class(&self) -> bool {
        true
    }

    fn output_with_classes(
        &self,
        x_t: &Tensor,
        levels: &[NoiseLevel],
        classes: &[Option<usize>],
    ) -> Result<Tensor> {
        let mut out = crate::guidance::by_class(x_t, levels, classes, 1, |c, x, l| {
            Ok(vec![self.oracle(c)?.predict_x0(x, l)?])
        })?;
        Ok(out.remove(0))
    }

    fn x0_eps_with_classes(
        &self,
        x_t: &Tensor,
        levels: &[NoiseLevel],
        classes: &[Option<usize>],
    ) -> Result<(Tensor, Tensor)> {
        let mut out = crate::guidance::by_class(x_t, levels, classes, 2, |c, x, l| {
            let (x0, eps) = self.oracle(c)?.predict_x0_eps(x, l)?;
            Ok(vec![x0, eps])
        })?;
        let eps = out.remove(1);
        Ok((out.remove(0), eps))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gmm::Covariance;
    use candle_core::Device;

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

    fn t2(rows: &[f64]) -> Tensor {
        Tensor::from_vec(rows.to_vec(), (rows.len() / 2, 2), &Device::Cpu).unwrap()
    }

    fn v(t: &Tensor) -> Vec<f64> {
        t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
    }

    #[test]
    fn single_gaussian_posterior_mean_by_hand() {
        // 1-D N(1, 4), alpha = 0.6, sigma = 0.8, x = 2: C = 0.36 * 4 + 0.64 = 2.08,
        // E[x_0 | x] = 1 + 0.6 * 4 / 2.08 * (2 - 0.6) = 2.615384...
        let g = Gmm::new(vec![1.0], vec![vec![1.0]], vec![Covariance::Full(vec![4.0])]).unwrap();
        let o = Oracle::new(g);
        let x = Tensor::from_vec(vec![2.0f64], (1, 1), &Device::Cpu).unwrap();
        let l = [NoiseLevel::new(0.6, 0.8)];
        let want = 1.0 + 0.6 * 4.0 / 2.08 * 1.4;
        assert!((v(&o.predict_x0(&x, &l).unwrap())[0] - want).abs() < 1e-14);
        // score = -(x - alpha mu) / C
        assert!((v(&o.score(&x, &l).unwrap())[0] + 1.4 / 2.08).abs() < 1e-14);
    }

    #[test]
    fn score_is_the_gradient_of_the_exact_noisy_log_density() {
        // central differences of ln p_t with h = 1e-5: truncation ~h^2 * third derivative
        // (< 1e-8 here), rounding ~1e-16 / 1e-5; tolerance 1e-6.
        let o = Oracle::new(mixture());
        let level = NoiseLevel::new(0.8, 0.6);
        let noisy = o.gmm().noisy(level.alpha, level.sigma).unwrap();
        let pts = [0.3, -0.2, -1.7, 0.4, 1.2, 0.9, 4.0, -3.0];
        let s = v(&o.score(&t2(&pts), &[level; 4]).unwrap());
        let h = 1e-5;
        for (i, p) in pts.chunks(2).enumerate() {
            for j in 0..2 {
                let (mut a, mut b) = (p.to_vec(), p.to_vec());
                a[j] += h;
                b[j] -= h;
                let fd = (noisy.log_density(&a) - noisy.log_density(&b)) / (2.0 * h);
                assert!(
                    (s[2 * i + j] - fd).abs() < 1e-6 * fd.abs().max(1.0),
                    "{i},{j}: {} vs {fd}",
                    s[2 * i + j]
                );
            }
        }
    }

    #[test]
    fn tweedie_and_parameterisations_agree() {
        // E[x_0|x] = (x + sigma^2 score) / alpha and eps = -sigma score, at several levels
        let o = Oracle::new(mixture());
        let x = t2(&[0.3, -0.2, -1.7, 0.4, 1.2, 0.9]);
        for level in [
            NoiseLevel::new(0.99, 0.14),
            NoiseLevel::new(0.3, 0.95),
            NoiseLevel::new(1.0, 5.0),
        ] {
            let l = [level; 3];
            let x0 = v(&o.predict_x0(&x, &l).unwrap());
            let eps = v(&o.predict_eps(&x, &l).unwrap());
            let s = v(&o.score(&x, &l).unwrap());
            let xs = v(&x);
            for i in 0..6 {
                let tw = (xs[i] + level.sigma * level.sigma * s[i]) / level.alpha;
                assert!((x0[i] - tw).abs() < 1e-12 * tw.abs().max(1.0));
                assert!((eps[i] + level.sigma * s[i]).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn posterior_mean_is_orthogonal_to_functions_of_x_t() {
        // Monte Carlo check of E[x_0 | x_t] independent of the formulas: for x_0 from the
        // mixture and x_t = alpha x_0 + sigma eps, the residual x_0 - E[x_0 | x_t] has mean 0 and
        // is uncorrelated with x_t. n = 100k; the residual's std is < 0.8 per coordinate, so its
        // mean has standard error < 0.0025 and its correlation with x_t (std < 2.2) < 0.0056;
        // we allow 5 standard errors. A wrong formula (e.g. dropping the alpha in
        // alpha Sigma_k u_k) gives biases of order 0.1.
        let g = mixture();
        let o = Oracle::new(g.clone());
        let n = 100_000;
        let x0 = g.sample(n, 5);
        let mut rng = crate::rng::Rng::new(6);
        let level = NoiseLevel::new(0.8, 0.6);
        let xt: Vec<f64> = x0
            .iter()
            .map(|v| level.alpha * v + level.sigma * rng.normal())
            .collect();
        let pred = o.posterior_mean_rows(&xt, level).unwrap();
        for j in 0..2 {
            let mut mean = 0.0;
            let mut corr = [0.0; 2];
            for i in 0..n {
                let r = x0[2 * i + j] - pred[2 * i + j];
                mean += r / n as f64;
                corr[0] += r * xt[2 * i] / n as f64;
                corr[1] += r * xt[2 * i + 1] / n as f64;
            }
            assert!(mean.abs() < 0.0125, "coordinate {j}: residual mean {mean}");
            assert!(
                corr[0].abs() < 0.028 && corr[1].abs() < 0.028,
                "coordinate {j}: {corr:?}"
            );
        }
    }

    #[test]
    fn jacobian_trace_and_product_match_finite_differences() {
        // central differences of the exact score, h = 1e-5 (truncation ~1e-9): tolerance 1e-6
        let o = Oracle::new(mixture());
        let pts = [0.3, -0.2, -1.7, 0.4, 1.2, 0.9, 30.0, -20.0];
        for level in [
            NoiseLevel::new(0.9, 0.3),
            NoiseLevel::new(1.0, 0.05),
            NoiseLevel::new(0.1, 0.99),
        ] {
            let l = [level; 4];
            let tr = o.score_divergence(&t2(&pts), &l).unwrap();
            let dir = t2(&[1.0, 0.5, -0.3, 2.0, 0.0, 1.0, 1.0, 1.0]);
            let jv = v(&o.score_jvp(&t2(&pts), &l, &dir).unwrap());
            let dv = v(&dir);
            let h = 1e-5;
            let score = |p: &[f64]| v(&o.score(&t2(p), &[level]).unwrap());
            for (i, p) in pts.chunks(2).enumerate() {
                let mut fd_tr = 0.0;
                let mut fd_jv = [0.0; 2];
                for j in 0..2 {
                    let (mut a, mut b) = (p.to_vec(), p.to_vec());
                    a[j] += h;
                    b[j] -= h;
                    let (sa, sb) = (score(&a), score(&b));
                    fd_tr += (sa[j] - sb[j]) / (2.0 * h);
                    for k in 0..2 {
                        fd_jv[k] += (sa[k] - sb[k]) / (2.0 * h) * dv[2 * i + j];
                    }
                }
                let scale = fd_tr.abs().max(1.0);
                assert!(
                    (tr[i] - fd_tr).abs() < 1e-6 * scale,
                    "trace {i}: {} vs {fd_tr}",
                    tr[i]
                );
                for k in 0..2 {
                    assert!((jv[2 * i + k] - fd_jv[k]).abs() < 1e-6 * scale, "jvp {i}");
                }
            }
        }
    }

    #[test]
    fn per_row_levels_and_errors() {
        let o = Oracle::new(mixture());
        let x = t2(&[0.3, -0.2, -1.7, 0.4]);
        let (a, b) = (NoiseLevel::new(0.9, 0.4), NoiseLevel::new(1.0, 2.0));
        let mixed = v(&o.predict_x0(&x, &[a, b]).unwrap());
        let only_a = v(&o.predict_x0(&x, &[a, a]).unwrap());
        let only_b = v(&o.predict_x0(&x, &[b, b]).unwrap());
        assert_eq!(&mixed[..2], &only_a[..2]);
        assert_eq!(&mixed[2..], &only_b[2..]);
        // f32 input gives f32 output of the same values (to f32 rounding)
        let x32 = x.to_dtype(DType::F32).unwrap();
        let out = o.predict_x0(&x32, &[a, b]).unwrap();
        assert_eq!(out.dtype(), DType::F32);
        // wrong dimension, wrong number of levels, bad level
        let x3 = Tensor::zeros((2, 3), DType::F64, &Device::Cpu).unwrap();
        assert!(o
            .predict_x0(&x3, &[a, a])
            .unwrap_err()
            .to_string()
            .contains("dimension 2"));
        assert!(o.predict_x0(&x, &[a]).is_err());
        assert!(o.predict_x0(&x, &[NoiseLevel::new(0.0, 0.0); 2]).is_err());
        // at sigma = 0 the posterior mean is x / alpha (no noise to remove)
        let x0 = v(&o.predict_x0(&x, &[NoiseLevel::new(0.5, 0.0); 2]).unwrap());
        assert!((x0[0] - 0.6).abs() < 1e-12 && (x0[3] - 0.8).abs() < 1e-12);
    }
}
