//! Gaussian mixtures `p(x) = sum_k w_k N(x; mu_k, Sigma_k)` in any dimension, with full or
//! isotropic covariances: validated construction, the JSON file format, exact seeded sampling
//! and the exact log-density. All arithmetic is f64.
//!
//! File format:
//!
//! ```json
//! {"weights": [0.5, 0.5], "means": [[0, 0], [3, 1]], "covariances": [[[1, 0.3], [0.3, 0.5]], [[0.2, 0], [0, 0.2]]]}
//! {"weights": [0.5, 0.5], "means": [[0, 0], [3, 1]], "stds": [1.0, 0.1]}
//! {"weights": [0.4, 0.4, 0.2], "means": [[0, 0], [3, 1], [0, 3]], "stds": [1, 0.1, 0.5], "labels": [0, 1, 0]}
//! ```
//!
//! `labels` (optional) gives each component's class id (default: component k is class k); the
//! class-c data distribution is the sub-mixture of the components labelled c, weights
//! renormalised ([`Gmm::class_mixture`]), whose exact denoiser is the conditional oracle of
//! class-conditional sampling.
//!
//! `stds` gives isotropic components `Sigma_k = std_k^2 I`. The weights must be positive and sum
//! to 1 within [`WEIGHT_SUM_TOLERANCE`] (they are then renormalised exactly); covariances must
//! be symmetric (to relative 1e-9) and positive definite (Cholesky succeeds); no NaN or infinity.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::rng::Rng;

/// How far the weights' sum may be from 1 (absolute): 1e-6, enough for weights written with
/// six decimals (1/3 as 0.333333 three times sums to 0.999999).
pub const WEIGHT_SUM_TOLERANCE: f64 = 1e-6;

/// Relative asymmetry allowed in a covariance matrix before it is rejected (then symmetrised).
const SYMMETRY_TOLERANCE: f64 = 1e-9;

/// Dense f64 linear algebra for small symmetric positive definite matrices (row-major).
pub(crate) mod linalg {
    /// The lower Cholesky factor L of `a` (d x d, `a = L L^T`), or the failing row and pivot.
    pub fn cholesky(a: &[f64], d: usize) -> std::result::Result<Vec<f64>, (usize, f64)> {
        let mut l = vec![0.0; d * d];
        for i in 0..d {
            for j in 0..=i {
                let mut s = a[i * d + j];
                for k in 0..j {
                    s -= l[i * d + k] * l[j * d + k];
                }
                if i == j {
                    if !(s > 0.0 && s.is_finite()) {
                        return Err((i, s));
                    }
                    l[i * d + i] = s.sqrt();
                } else {
                    l[i * d + j] = s / l[j * d + j];
                }
            }
        }
        Ok(l)
    }

    /// Solves `L y = b` in place (forward substitution).
    pub fn solve_lower(l: &[f64], d: usize, b: &mut [f64]) {
        for i in 0..d {
            let mut s = b[i];
            for k in 0..i {
                s -= l[i * d + k] * b[k];
            }
            b[i] = s / l[i * d + i];
        }
    }

    /// Solves `L^T y = b` in place (back substitution).
    pub fn solve_upper_t(l: &[f64], d: usize, b: &mut [f64]) {
        for i in (0..d).rev() {
            let mut s = b[i];
            for k in i + 1..d {
                s -= l[k * d + i] * b[k];
            }
            b[i] = s / l[i * d + i];
        }
    }

    /// `y = L x` for lower-triangular L.
    pub fn mul_lower(l: &[f64], d: usize, x: &[f64], y: &mut [f64]) {
        for i in 0..d {
            y[i] = (0..=i).map(|k| l[i * d + k] * x[k]).sum();
        }
    }

    /// `y = A x` for a dense d x d matrix.
    pub fn matvec(a: &[f64], d: usize, x: &[f64], y: &mut [f64]) {
        for i in 0..d {
            y[i] = (0..d).map(|k| a[i * d + k] * x[k]).sum();
        }
    }

    /// ln det(L L^T) = 2 sum ln L_ii.
    pub fn logdet_from_cholesky(l: &[f64], d: usize) -> f64 {
        2.0 * (0..d).map(|i| l[i * d + i].ln()).sum::<f64>()
    }
}

/// A component's covariance.
#[derive(Clone, Debug, PartialEq)]
pub enum Covariance {
    /// `Sigma = variance * I`.
    Isotropic(f64),
    /// A dense symmetric positive definite matrix, row-major d x d.
    Full(Vec<f64>),
}

impl Covariance {
    /// Entry (i, j).
    pub fn get(&self, d: usize, i: usize, j: usize) -> f64 {
        match self {
            Covariance::Isotropic(v) => {
                if i == j {
                    *v
                } else {
                    0.0
                }
            }
            Covariance::Full(m) => m[i * d + j],
        }
    }

    /// `y = Sigma x`.
    pub fn matvec(&self, d: usize, x: &[f64], y: &mut [f64]) {
        match self {
            Covariance::Isotropic(v) => {
                for (yi, xi) in y.iter_mut().zip(x) {
                    *yi = v * xi;
                }
            }
            Covariance::Full(m) => linalg::matvec(m, d, x, y),
        }
    }

    /// `a^2 Sigma + s2 I`.
    pub fn scaled_plus_identity(&self, d: usize, a2: f64, s2: f64) -> Covariance {
        match self {
            Covariance::Isotropic(v) => Covariance::Isotropic(a2 * v + s2),
            Covariance::Full(m) => {
                let mut c: Vec<f64> = m.iter().map(|v| a2 * v).collect();
                for i in 0..d {
                    c[i * d + i] += s2;
                }
                Covariance::Full(c)
            }
        }
    }
}

/// A covariance with its factorisation: the Cholesky factor (full) or the std (isotropic).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Factor {
    /// `Sigma = v I`: std `sqrt(v)`.
    Isotropic { variance: f64 },
    /// `Sigma = L L^T`.
    Full { l: Vec<f64> },
}

impl Factor {
    /// Factorises `cov` (d x d); the error names the failing row.
    pub(crate) fn new(cov: &Covariance, d: usize) -> std::result::Result<Self, String> {
        match cov {
            Covariance::Isotropic(v) => {
                if v.is_finite() && *v > 0.0 {
                    Ok(Factor::Isotropic { variance: *v })
                } else {
                    Err(format!("variance {v} is not positive"))
                }
            }
            Covariance::Full(m) => {
                linalg::cholesky(m, d)
                    .map(|l| Factor::Full { l })
                    .map_err(|(row, pivot)| {
                        format!("not positive definite (Cholesky pivot {pivot:e} at row {row})")
                    })
            }
        }
    }

    /// ln det Sigma.
    pub(crate) fn logdet(&self, d: usize) -> f64 {
        match self {
            Factor::Isotropic { variance } => d as f64 * variance.ln(),
            Factor::Full { l } => linalg::logdet_from_cholesky(l, d),
        }
    }

    /// Overwrites `v` (holding x - mean) with `L^{-1} v`; returns nothing. For isotropic: v / std.
    pub(crate) fn whiten(&self, d: usize, v: &mut [f64]) {
        match self {
            Factor::Isotropic { variance } => {
                let inv = 1.0 / variance.sqrt();
                v.iter_mut().for_each(|x| *x *= inv);
            }
            Factor::Full { l } => linalg::solve_lower(l, d, v),
        }
    }

    /// Overwrites `y` (a whitened vector `L^{-1} v`) with `Sigma^{-1} v = L^{-T} y`.
    pub(crate) fn unwhiten_t(&self, d: usize, y: &mut [f64]) {
        match self {
            Factor::Isotropic { variance } => {
                let inv = 1.0 / variance.sqrt();
                y.iter_mut().for_each(|x| *x *= inv);
            }
            Factor::Full { l } => linalg::solve_upper_t(l, d, y),
        }
    }

    /// `Sigma^{-1} v` in place.
    pub(crate) fn solve(&self, d: usize, v: &mut [f64]) {
        self.whiten(d, v);
        self.unwhiten_t(d, v);
    }

    /// `L z` (a draw from N(0, Sigma) given z ~ N(0, I)).
    pub(crate) fn color(&self, d: usize, z: &[f64], out: &mut [f64]) {
        match self {
            Factor::Isotropic { variance } => {
                let s = variance.sqrt();
                for (o, zi) in out.iter_mut().zip(z) {
                    *o = s * zi;
                }
            }
            Factor::Full { l } => linalg::mul_lower(l, d, z, out),
        }
    }

    /// tr Sigma^{-1} = ||L^{-1}||_F^2.
    pub(crate) fn trace_inverse(&self, d: usize) -> f64 {
        match self {
            Factor::Isotropic { variance } => d as f64 / variance,
            Factor::Full { l } => {
                let mut total = 0.0;
                let mut e = vec![0.0; d];
                for j in 0..d {
                    e.iter_mut().for_each(|x| *x = 0.0);
                    e[j] = 1.0;
                    linalg::solve_lower(l, d, &mut e);
                    total += e.iter().map(|x| x * x).sum::<f64>();
                }
                total
            }
        }
    }
}

/// A Gaussian mixture `sum_k w_k N(mu_k, Sigma_k)` in dimension `dim`.
#[derive(Clone, Debug)]
pub struct Gmm {
    dim: usize,
    weights: Vec<f64>,
    means: Vec<Vec<f64>>,
    covariances: Vec<Covariance>,
    factors: Vec<Factor>,
    /// Class id per component (component k is class k unless given).
    labels: Vec<usize>,
    /// Whether the labels were given (then written back by `to_json`).
    labels_given: bool,
}

/// ln(sum_k exp(a_k)), stable (shifted by the maximum).
pub fn log_sum_exp(a: &[f64]) -> f64 {
    let m = a.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !m.is_finite() {
        return m;
    }
    m + a.iter().map(|v| (v - m).exp()).sum::<f64>().ln()
}

impl Gmm {
    /// A validated mixture. Errors (as [`Error::InvalidParameter`] named `gmm`) for: no
    /// components, mismatched counts or dimensions, a non-finite number, a weight <= 0, weights
    /// not summing to 1 within [`WEIGHT_SUM_TOLERANCE`], an asymmetric or non-SPD covariance.
    pub fn new(weights: Vec<f64>, means: Vec<Vec<f64>>, covariances: Vec<Covariance>) -> Result<Self> {
        Self::build(weights, means, covariances).map_err(|m| Error::param("gmm", m))
    }

    fn build(
        mut weights: Vec<f64>,
        means: Vec<Vec<f64>>,
        covariances: Vec<Covariance>,
    ) -> std::result::Result<Self, String> {
        let k = weights.len();
        if k == 0 {
            return Err("\"weights\" is empty: a mixture needs at least one component".into());
        }
        if means.len() != k {
            return Err(format!("{k} weights but {} means", means.len()));
        }
        if covariances.len() != k {
            return Err(format!("{k} weights but {} covariances/stds", covariances.len()));
        }
        for (i, w) in weights.iter().enumerate() {
            if !(w.is_finite() && *w > 0.0) {
                return Err(format!("weights[{i}] = {w}, expected a finite number > 0"));
            }
        }
        let sum: f64 = weights.iter().sum();
        if (sum - 1.0).abs() > WEIGHT_SUM_TOLERANCE {
            return Err(format!(
                "weights sum to {sum}, expected 1 (within {WEIGHT_SUM_TOLERANCE:e})"
            ));
        }
        weights.iter_mut().for_each(|w| *w /= sum);
        let dim = means[0].len();
        if dim == 0 {
            return Err("means[0] is empty: the dimension must be at least 1".into());
        }
        for (i, m) in means.iter().enumerate() {
            if m.len() != dim {
                return Err(format!(
                    "means[{i}] has length {}, expected {dim} (the length of means[0])",
                    m.len()
                ));
            }
            if let Some(j) = m.iter().position(|v| !v.is_finite()) {
                return Err(format!("means[{i}][{j}] = {}, expected a finite number", m[j]));
            }
        }
        let mut covs = Vec::with_capacity(k);
        let mut factors = Vec::with_capacity(k);
        for (i, c) in covariances.into_iter().enumerate() {
            let c = match c {
                Covariance::Isotropic(v) => Covariance::Isotropic(v),
                Covariance::Full(mut m) => {
                    if m.len() != dim * dim {
                        return Err(format!(
                            "covariances[{i}] has {} entries, expected a {dim} x {dim} matrix",
                            m.len()
                        ));
                    }
                    if let Some(j) = m.iter().position(|v| !v.is_finite()) {
                        return Err(format!(
                            "covariances[{i}][{}][{}] = {}, expected a finite number",
                            j / dim,
                            j % dim,
                            m[j]
                        ));
                    }
                    let scale = m.iter().fold(0.0f64, |a, v| a.max(v.abs()));
                    for r in 0..dim {
                        for s in r + 1..dim {
                            let (a, b) = (m[r * dim + s], m[s * dim + r]);
                            if (a - b).abs() > SYMMETRY_TOLERANCE * scale {
                                return Err(format!(
                                    "covariances[{i}] is not symmetric: [{r}][{s}] = {a} but [{s}][{r}] = {b}"
                                ));
                            }
                            let avg = 0.5 * (a + b);
                            m[r * dim + s] = avg;
                            m[s * dim + r] = avg;
                        }
                    }
                    Covariance::Full(m)
                }
            };
            let f = Factor::new(&c, dim).map_err(|e| {
                let what = if matches!(c, Covariance::Isotropic(_)) {
                    "stds"
                } else {
                    "covariances"
                };
                format!("{what}[{i}]: {e}")
            })?;
            covs.push(c);
            factors.push(f);
        }
        Ok(Gmm {
            dim,
            labels: (0..weights.len()).collect(),
            labels_given: false,
            weights,
            means,
            covariances: covs,
            factors,
        })
    }

    /// Parses the JSON format (see the module docs and [`crate::config::mixture`]); errors name
    /// `source` and the field.
    pub fn from_json(text: &str, source: &Path) -> Result<Self> {
        let bad = |m: String| Error::bad_input(source, m);
        let spec = crate::config::mixture::parse(text).map_err(|e| bad(e.to_string()))?;
        let g = Self::build(spec.weights, spec.means, spec.covariances).map_err(bad)?;
        match spec.labels {
            None => Ok(g),
            Some(labels) => g.with_labels(labels).map_err(|e| bad(e.to_string())),
        }
    }

    /// The same mixture with class ids per component. Errors: a length other than the number of
    /// components, or a class in `0..max` with no component (every class must have data).
    pub fn with_labels(mut self, labels: Vec<usize>) -> Result<Self> {
        let k = self.num_components();
        if labels.len() != k {
            return Err(Error::param(
                "labels",
                format!(
                    "\"labels\" has {} entries, expected one per component ({k})",
                    labels.len()
                ),
            ));
        }
        let classes = labels.iter().max().map_or(0, |m| m + 1);
        if let Some(c) = (0..classes).find(|c| !labels.contains(c)) {
            return Err(Error::param(
                "labels",
                format!(
                    "class {c} has no component (labels must cover 0..{}, each class at least once)",
                    classes - 1
                ),
            ));
        }
        self.labels = labels;
        self.labels_given = true;
        Ok(self)
    }

    /// Whether the spec gave `labels` (a labelled mixture trains class-conditional models).
    pub fn has_labels(&self) -> bool {
        self.labels_given
    }

    /// The class id of each component.
    pub fn labels(&self) -> &[usize] {
        &self.labels
    }

    /// The number of classes (the largest label + 1).
    pub fn num_classes(&self) -> usize {
        self.labels.iter().max().map_or(0, |m| m + 1)
    }

    /// The class-`c` data distribution: the components labelled `c`, weights renormalised.
    pub fn class_mixture(&self, c: usize) -> Result<Gmm> {
        let idx: Vec<usize> = (0..self.num_components())
            .filter(|&k| self.labels[k] == c)
            .collect();
        if idx.is_empty() {
            return Err(Error::param(
                "class",
                format!(
                    "class {c} is out of range: the mixture has {} classes",
                    self.num_classes()
                ),
            ));
        }
        let total: f64 = idx.iter().map(|&k| self.weights[k]).sum();
        let mut g = Gmm::new(
            idx.iter().map(|&k| self.weights[k] / total).collect(),
            idx.iter().map(|&k| self.means[k].clone()).collect(),
            idx.iter().map(|&k| self.covariances[k].clone()).collect(),
        )?;
        // every component is class c (so the sub-mixture keeps its class id)
        g.labels = vec![c; idx.len()];
        g.labels_given = true;
        Ok(g)
    }

    /// `n` exact draws with their class labels: draw `i` is draw `i` of [`Gmm::sample`] (the
    /// same stream), its label the class of the component it came from.
    pub fn sample_labelled(&self, n: usize, seed: u64) -> (Vec<f64>, Vec<usize>) {
        let mut out = vec![0.0; n * self.dim];
        let mut labels = Vec::with_capacity(n);
        for (i, row) in out.chunks_mut(self.dim).enumerate() {
            let mut rng = Rng::stream(seed, i as u64);
            let k = self.sample_component(&mut rng, row);
            labels.push(self.labels[k]);
        }
        (out, labels)
    }

    /// Reads a mixture from a JSON file.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = crate::io::read_text(path)?;
        Self::from_json(&text, path)
    }

    /// The mixture as JSON (the file format; full covariances as `covariances`, all-isotropic as `stds`).
    pub fn to_json(&self) -> Value {
        let d = self.dim;
        if self
            .covariances
            .iter()
            .all(|c| matches!(c, Covariance::Isotropic(_)))
        {
            let stds: Vec<f64> = self.covariances.iter().map(|c| c.get(d, 0, 0).sqrt()).collect();
            let mut v = serde_json::json!({"weights": self.weights, "means": self.means, "stds": stds});
            if self.labels_given {
                v["labels"] = serde_json::json!(self.labels);
            }
            v
        } else {
            let covs: Vec<Vec<Vec<f64>>> = self
                .covariances
                .iter()
                .map(|c| (0..d).map(|i| (0..d).map(|j| c.get(d, i, j)).collect()).collect())
                .collect();
            let mut v =
                serde_json::json!({"weights": self.weights, "means": self.means, "covariances": covs});
            if self.labels_given {
                v["labels"] = serde_json::json!(self.labels);
            }
            v
        }
    }

    /// The dimension D.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The number of components K.
    pub fn num_components(&self) -> usize {
        self.weights.len()
    }

    /// The weights (summing to 1).
    pub fn weights(&self) -> &[f64] {
        &self.weights
    }

    /// The means.
    pub fn means(&self) -> &[Vec<f64>] {
        &self.means
    }

    /// The covariances.
    pub fn covariances(&self) -> &[Covariance] {
        &self.covariances
    }

    /// The marginal of `x_t = alpha x_0 + sigma eps` for `x_0` from this mixture:
    /// `sum_k w_k N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I)`.
    pub fn noisy(&self, alpha: f64, sigma: f64) -> Result<Gmm> {
        let d = self.dim;
        let mut g = Gmm::new(
            self.weights.clone(),
            self.means
                .iter()
                .map(|m| m.iter().map(|v| alpha * v).collect())
                .collect(),
            self.covariances
                .iter()
                .map(|c| c.scaled_plus_identity(d, alpha * alpha, sigma * sigma))
                .collect(),
        )?;
        g.labels = self.labels.clone();
        g.labels_given = self.labels_given;
        Ok(g)
    }

    /// The mixture's mean `sum_k w_k mu_k`.
    pub fn mean(&self) -> Vec<f64> {
        let mut m = vec![0.0; self.dim];
        for (w, mu) in self.weights.iter().zip(&self.means) {
            m.iter_mut().zip(mu).for_each(|(a, b)| *a += w * b);
        }
        m
    }

    /// The mixture's covariance `sum_k w_k (Sigma_k + mu_k mu_k^T) - m m^T` (row-major).
    pub fn covariance(&self) -> Vec<f64> {
        let d = self.dim;
        let m = self.mean();
        let mut c = vec![0.0; d * d];
        for k in 0..self.num_components() {
            for i in 0..d {
                for j in 0..d {
                    c[i * d + j] += self.weights[k]
                        * (self.covariances[k].get(d, i, j) + self.means[k][i] * self.means[k][j]);
                }
            }
        }
        for i in 0..d {
            for j in 0..d {
                c[i * d + j] -= m[i] * m[j];
            }
        }
        c
    }

    /// ln p(x) for one point (length D), by log-sum-exp over components.
    pub fn log_density(&self, x: &[f64]) -> f64 {
        let d = self.dim;
        let mut terms = Vec::with_capacity(self.num_components());
        let mut v = vec![0.0; d];
        for k in 0..self.num_components() {
            v.iter_mut()
                .zip(x.iter().zip(&self.means[k]))
                .for_each(|(o, (a, b))| *o = a - b);
            self.factors[k].whiten(d, &mut v);
            let maha: f64 = v.iter().map(|z| z * z).sum();
            let log_n =
                -0.5 * (d as f64 * (2.0 * std::f64::consts::PI).ln() + self.factors[k].logdet(d) + maha);
            terms.push(self.weights[k].ln() + log_n);
        }
        log_sum_exp(&terms)
    }

    /// ln p(x) for each row of `points` (row-major, n x D).
    pub fn log_density_rows(&self, points: &[f64]) -> Result<Vec<f64>> {
        if points.len() % self.dim != 0 {
            return Err(Error::param(
                "points",
                format!(
                    "{} values do not form rows of dimension {}",
                    points.len(),
                    self.dim
                ),
            ));
        }
        Ok(points.chunks(self.dim).map(|x| self.log_density(x)).collect())
    }

    /// One exact draw: a component k with probability w_k, then `mu_k + L_k z`.
    pub fn sample_one(&self, rng: &mut Rng, out: &mut [f64]) {
        self.sample_component(rng, out);
    }

    /// [`Gmm::sample_one`], returning the component drawn.
    fn sample_component(&self, rng: &mut Rng, out: &mut [f64]) -> usize {
        let u = rng.uniform();
        let mut acc = 0.0;
        let mut k = self.num_components() - 1;
        for (i, w) in self.weights.iter().enumerate() {
            acc += w;
            if u < acc {
                k = i;
                break;
            }
        }
        let z = rng.normal_vec(self.dim);
        self.factors[k].color(self.dim, &z, out);
        out.iter_mut().zip(&self.means[k]).for_each(|(o, m)| *o += m);
        k
    }

    /// `n` exact draws (row-major, n x D); draw `i` comes from stream `i` of `seed`, so the
    /// first m of n draws equal the m draws of a smaller call.
    pub fn sample(&self, n: usize, seed: u64) -> Vec<f64> {
        let mut out = vec![0.0; n * self.dim];
        for (i, row) in out.chunks_mut(self.dim).enumerate() {
            let mut rng = Rng::stream(seed, i as u64);
            self.sample_one(&mut rng, row);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path() -> &'static Path {
        Path::new("mix.json")
    }

    fn two_d() -> Gmm {
        Gmm::new(
            vec![0.3, 0.7],
            vec![vec![-1.0, 0.5], vec![2.0, 0.0]],
            vec![
                Covariance::Full(vec![1.0, 0.6, 0.6, 0.5]),
                Covariance::Isotropic(0.25),
            ],
        )
        .unwrap()
    }

    #[test]
    fn cholesky_solves() {
        // [[4, 2], [2, 3]] = L L^T with L = [[2, 0], [1, sqrt(2)]].
        let l = linalg::cholesky(&[4.0, 2.0, 2.0, 3.0], 2).unwrap();
        assert!((l[0] - 2.0).abs() < 1e-15 && (l[2] - 1.0).abs() < 1e-15);
        assert!((l[3] - 2f64.sqrt()).abs() < 1e-15 && l[1] == 0.0);
        // det = 12 - 4 = 8.
        assert!((linalg::logdet_from_cholesky(&l, 2) - 8f64.ln()).abs() < 1e-14);
        let f = Factor::Full { l };
        let mut v = vec![1.0, 1.0];
        f.solve(2, &mut v);
        // [[4,2],[2,3]]^{-1} [1,1] = [3-2, 4-2]/8 = [1/8, 2/8].
        assert!((v[0] - 0.125).abs() < 1e-15 && (v[1] - 0.25).abs() < 1e-15);
        // tr A^{-1} = (3 + 4) / 8.
        assert!((f.trace_inverse(2) - 7.0 / 8.0).abs() < 1e-15);
    }

    #[test]
    fn log_density_of_a_single_gaussian_is_the_closed_form() {
        let g = Gmm::new(
            vec![1.0],
            vec![vec![1.0, -1.0]],
            vec![Covariance::Full(vec![2.0, 0.0, 0.0, 0.5])],
        )
        .unwrap();
        // ln N([2, 0]; [1, -1], diag(2, 0.5)) = -ln(2 pi) - 1/2 ln(1) - 1/2 (1/2 + 1/0.5)
        let want = -(2.0 * std::f64::consts::PI).ln() - 0.5 * (0.5 + 2.0);
        assert!((g.log_density(&[2.0, 0.0]) - want).abs() < 1e-14);
    }

    #[test]
    fn log_density_far_away_is_finite() {
        // log-sum-exp keeps 1e3 standard deviations away finite (a naive sum underflows to -inf).
        let g = two_d();
        let l = g.log_density(&[1000.0, -800.0]);
        assert!(l.is_finite() && l < -1e5, "{l}");
    }

    #[test]
    fn sample_moments_match_the_mixture() {
        // n = 200k: the standard error of each mean coordinate is sqrt(var/n) < 0.004 and of
        // each covariance entry about sqrt(2/n) * var < 0.01; 5 standard errors are allowed.
        let g = two_d();
        let n = 200_000;
        let xs = g.sample(n, 11);
        let m = g.mean();
        let c = g.covariance();
        let mut em = [0.0; 2];
        for r in xs.chunks(2) {
            em[0] += r[0] / n as f64;
            em[1] += r[1] / n as f64;
        }
        let mut ec = [0.0; 4];
        for r in xs.chunks(2) {
            for i in 0..2 {
                for j in 0..2 {
                    ec[i * 2 + j] += (r[i] - em[i]) * (r[j] - em[j]) / n as f64;
                }
            }
        }
        for i in 0..2 {
            assert!((em[i] - m[i]).abs() < 0.02, "mean {em:?} vs {m:?}");
        }
        for i in 0..4 {
            assert!((ec[i] - c[i]).abs() < 0.05, "cov {ec:?} vs {c:?}");
        }
        // batch independence: the first 10 of n draws are the 10 draws of a smaller call.
        assert_eq!(&xs[..20], &g.sample(10, 11)[..]);
    }

    #[test]
    fn noisy_marginal_parameters() {
        let g = two_d().noisy(0.5, 2.0).unwrap();
        assert_eq!(g.means()[1], vec![1.0, 0.0]);
        // 0.25 * [[1, .6], [.6, .5]] + 4 I
        assert_eq!(
            g.covariances()[0],
            Covariance::Full(vec![4.25, 0.15, 0.15, 4.125])
        );
        assert_eq!(g.covariances()[1], Covariance::Isotropic(0.25 * 0.25 + 4.0));
    }

    #[test]
    fn json_round_trip_and_stds() {
        let g = two_d();
        let text = g.to_json().to_string();
        let h = Gmm::from_json(&text, path()).unwrap();
        assert_eq!(h.means(), g.means());
        let iso = Gmm::from_json(r#"{"weights": [1], "means": [[0, 0, 0]], "stds": [2]}"#, path()).unwrap();
        assert_eq!(iso.dim(), 3);
        assert_eq!(iso.covariances()[0], Covariance::Isotropic(4.0));
    }

    #[test]
    fn json_errors_say_what_is_wrong() {
        let err = |s: &str| Gmm::from_json(s, path()).unwrap_err().to_string();
        let e = err(r#"{"weights": [0.5, 0.4], "means": [[0], [1]], "stds": [1, 1]}"#);
        assert!(
            e.contains("weights sum to 0.9") && e.starts_with("mix.json"),
            "{e}"
        );
        let e = err(r#"{"weights": [0.5, 0.5], "means": [[0, 1], [1]], "stds": [1, 1]}"#);
        assert!(e.contains("means[1] has length 1, expected 2"), "{e}");
        let e = err(r#"{"weights": [1], "means": [[0, 0]], "covariances": [[[1, 2], [2, 1]]]}"#);
        assert!(e.contains("covariances[0]: not positive definite"), "{e}");
        let e = err(r#"{"weights": [1], "means": [[0, 0]], "covariances": [[[1, 0.5], [0.1, 1]]]}"#);
        assert!(e.contains("not symmetric"), "{e}");
        let e =
            err(r#"{"weights": [1], "means": [[0, 0]], "covariances": [[[1, 0, 0], [0, 1, 0], [0, 0, 1]]]}"#);
        assert!(e.contains("expected a 2 x 2 matrix"), "{e}");
        let e = err(r#"{"weights": [1], "means": [[0, 0]], "covariances": [[[1, 0], [0]]]}"#);
        assert!(e.contains("not square"), "{e}");
        let e = err(r#"{"weights": [1], "means": [[0, 0]], "stds": [0]}"#);
        assert!(
            e.contains("field `stds[0]`: expected a finite number > 0, found 0"),
            "{e}"
        );
        let e = err(r#"{"weights": [1], "means": [[0, "a"]], "stds": [1]}"#);
        assert!(e.contains("field `means[0][1]`: expected a number"), "{e}");
        let e = err(r#"{"weights": [1], "means": [[0, 0]], "stds": [1], "covariances": []}"#);
        assert!(e.contains("not both"), "{e}");
        let e = err(r#"{"weights": [1], "means": [[0, 0]], "std": [1]}"#);
        assert!(e.contains("field `std`: unknown field"), "{e}");
        let e = err(r#"{"weights": [1], "means": [[0, 1e999]], "stds": [1]}"#);
        assert!(e.contains("invalid JSON"), "{e}");
        let e = err(r#"{"weights": [-0.5, 1.5], "means": [[0], [1]], "stds": [1, 1]}"#);
        assert!(e.contains("weights[0] = -0.5"), "{e}");
        // a user error (exit code 2 in the CLI)
        assert!(Gmm::from_json("[]", path()).unwrap_err().is_user_error());
    }
}
