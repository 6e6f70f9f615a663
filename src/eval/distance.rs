//! Distances between two sample sets X (n x D) and Y (m x D), row-major f64.
//!
//! **Energy distance** (Székely & Rizzo 2013, eq. 3), unbiased (U-statistics within each set):
//!
//! ```text
//! E(X, Y) = 2 mean_{i,j} |x_i - y_j| - mean_{i != i'} |x_i - x_i'| - mean_{j != j'} |y_j - y_j'|
//! ```
//!
//! It estimates `2 E|X - Y| - E|X - X'| - E|Y - Y'|`, which is >= 0 and 0 only when the
//! distributions are equal (so the estimate can be slightly negative).
//!
//! **MMD^2** (Gretton et al. 2012, eq. 3, unbiased) with the Gaussian kernel
//! `k(x, y) = exp(-|x - y|^2 / (2 l^2))`; by default `l` is the median pairwise distance of the
//! pooled sample (the median heuristic, over at most 1000 points of each set).
//!
//! **Null band**: the distances between two independent sets of true samples of the same size,
//! over several seeds; a sampler whose distance to fresh true samples lies within the band's
//! 95th percentile is indistinguishable from the truth at that sample size.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::gmm::Gmm;

fn check(x: &[f64], y: &[f64], d: usize) -> Result<(usize, usize)> {
    if d == 0 || x.len() % d != 0 || y.len() % d != 0 {
        return Err(Error::param(
            "samples",
            format!(
                "{} and {} values do not form rows of dimension {d}",
                x.len(),
                y.len()
            ),
        ));
    }
    let (n, m) = (x.len() / d, y.len() / d);
    if n < 2 || m < 2 {
        return Err(Error::param(
            "samples",
            format!("need at least 2 rows in each set, got {n} and {m}"),
        ));
    }
    if let Some(i) = x.iter().chain(y).position(|v| !v.is_finite()) {
        return Err(Error::Numerical(format!("sample value {i} is not finite")));
    }
    Ok((n, m))
}

/// `sum_{i, j} k(a_i, b_j)` (all pairs) in parallel over rows of `a`.
fn pair_sum(a: &[f64], b: &[f64], d: usize, k: &(dyn Fn(f64) -> f64 + Sync)) -> f64 {
    a.par_chunks(d)
        .map(|ai| {
            b.chunks(d)
                .map(|bj| k(ai.iter().zip(bj).map(|(p, q)| (p - q) * (p - q)).sum::<f64>()))
                .sum::<f64>()
        })
        .sum()
}

/// The unbiased energy distance between X and Y (see the module docs).
pub fn energy_distance(x: &[f64], y: &[f64], d: usize) -> Result<f64> {
    let (n, m) = check(x, y, d)?;
    let dist = |sq: f64| sq.sqrt();
    let xy = pair_sum(x, y, d, &dist) / (n * m) as f64;
    // self-pairs contribute |x_i - x_i| = 0, so the U-statistic is the full sum over n(n-1)
    let xx = pair_sum(x, x, d, &dist) / (n * (n - 1)) as f64;
    let yy = pair_sum(y, y, d, &dist) / (m * (m - 1)) as f64;
    Ok(2.0 * xy - xx - yy)
}

/// The median pairwise distance of the pooled sample (at most 1000 rows of each set).
pub fn median_heuristic(x: &[f64], y: &[f64], d: usize) -> Result<f64> {
    check(x, y, d)?;
    let take = |s: &[f64]| s.chunks(d).take(1000).map(|r| r.to_vec()).collect::<Vec<_>>();
    let pooled: Vec<Vec<f64>> = take(x).into_iter().chain(take(y)).collect();
    let mut dists = Vec::with_capacity(pooled.len() * (pooled.len() - 1) / 2);
    for i in 0..pooled.len() {
        for j in i + 1..pooled.len() {
            dists.push(
                pooled[i]
                    .iter()
                    .zip(&pooled[j])
                    .map(|(p, q)| (p - q) * (p - q))
                    .sum::<f64>()
                    .sqrt(),
            );
        }
    }
    dists.sort_by(f64::total_cmp);
    Ok(dists[dists.len() / 2].max(1e-12))
}

/// Unbiased MMD^2 with the Gaussian kernel of bandwidth `bandwidth` (None: median heuristic).
pub fn mmd2(x: &[f64], y: &[f64], d: usize, bandwidth: Option<f64>) -> Result<f64> {
    let (n, m) = check(x, y, d)?;
    let l = match bandwidth {
        Some(l) => crate::error::check_range("bandwidth", l, (0.0, false), (f64::INFINITY, false))?,
        None => median_heuristic(x, y, d)?,
    };
    let inv = 1.0 / (2.0 * l * l);
    let k = move |sq: f64| (-sq * inv).exp();
    // remove the diagonal k(x_i, x_i) = 1 from the within-set sums
    let xx = (pair_sum(x, x, d, &k) - n as f64) / (n * (n - 1)) as f64;
    let yy = (pair_sum(y, y, d, &k) - m as f64) / (m * (m - 1)) as f64;
    let xy = pair_sum(x, y, d, &k) / (n * m) as f64;
    Ok(xx + yy - 2.0 * xy)
}

/// The `q`-quantile of `values` by linear interpolation between order statistics (numpy's default).
pub fn quantile(values: &[f64], q: f64) -> Result<f64> {
    if values.is_empty() || !(0.0..=1.0).contains(&q) {
        return Err(Error::param(
            "quantile",
            format!("q = {q} of {} values", values.len()),
        ));
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let pos = q * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    Ok(v[lo] + (pos - lo as f64) * (v[hi] - v[lo]))
}

/// The energy distances between pairs of independent true sample sets.
#[derive(Clone, Debug, PartialEq)]
pub struct NullBand {
    /// Sample size of each set.
    pub n: usize,
    /// One distance per seed.
    pub values: Vec<f64>,
    /// The 95th percentile of `values`.
    pub p95: f64,
}

impl NullBand {
    /// `repeats` energy distances between two independent sets of `n` draws from `gmm`;
    /// repeat r uses seeds `seed + 2r` and `seed + 2r + 1`.
    pub fn energy(gmm: &Gmm, n: usize, repeats: usize, seed: u64) -> Result<Self> {
        if repeats == 0 {
            return Err(Error::param("repeats", "got 0, expected at least 1"));
        }
        let d = gmm.dim();
        let values = (0..repeats as u64)
            .map(|r| energy_distance(&gmm.sample(n, seed + 2 * r), &gmm.sample(n, seed + 2 * r + 1), d))
            .collect::<Result<Vec<f64>>>()?;
        Ok(NullBand {
            n,
            p95: quantile(&values, 0.95)?,
            values,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gmm::Covariance;

    #[test]
    fn energy_distance_by_hand() {
        // X = {0, 1}, Y = {3, 5} in 1-D:
        // cross mean = (3 + 5 + 2 + 4) / 4 = 3.5; within X: |0-1| = 1; within Y: 2
        // E = 2 * 3.5 - 1 - 2 = 4
        let e = energy_distance(&[0.0, 1.0], &[3.0, 5.0], 1).unwrap();
        assert!((e - 4.0).abs() < 1e-15);
        // symmetric, and invariant to swapping sets
        let e2 = energy_distance(&[3.0, 5.0], &[0.0, 1.0], 1).unwrap();
        assert!((e - e2).abs() < 1e-15);
        assert!(energy_distance(&[0.0], &[1.0, 2.0], 1).is_err());
        assert!(energy_distance(&[0.0, f64::NAN], &[1.0, 2.0], 1).is_err());
    }

    #[test]
    fn energy_distance_of_shifted_gaussians_matches_the_closed_form() {
        // For X ~ N(0, 1), Y ~ N(mu, 1) in 1-D: E|X - Y| = E|N(mu, 2)|,
        // E|X - X'| = E|Y - Y'| = 2 / sqrt(pi). With mu = 1:
        // E|N(1, 2)| = sqrt(2) sqrt(2/pi) exp(-1/4) + 1 (1 - 2 Phi(-1/sqrt(2))) = 1.3993, so
        // E = 2 * 1.3993 - 2 * 1.1284 = 0.5418.
        let g0 = Gmm::new(vec![1.0], vec![vec![0.0]], vec![Covariance::Isotropic(1.0)]).unwrap();
        let g1 = Gmm::new(vec![1.0], vec![vec![1.0]], vec![Covariance::Isotropic(1.0)]).unwrap();
        let (x, y) = (g0.sample(3000, 1), g1.sample(3000, 2));
        let e = energy_distance(&x, &y, 1).unwrap();
        let phi = 0.239_750_061_093_477_1; // Phi(-1/sqrt(2))
        let e_abs = 2f64.sqrt() * (2.0 / std::f64::consts::PI).sqrt() * (-0.25f64).exp() + (1.0 - 2.0 * phi);
        let want = 2.0 * e_abs - 2.0 * 2.0 / std::f64::consts::PI.sqrt();
        // the estimator's standard deviation at n = 3000 is 0.029 here (measured with numpy over
        // 40 seeds: mean 0.540, sd 0.029); 4 sd are allowed. Dropping the factor 2 on the cross
        // term would give 1.40 - 2.26 = -0.86.
        assert!((e - want).abs() < 0.12, "{e} vs {want}");
    }

    #[test]
    fn mmd_and_null_band() {
        let g = Gmm::new(vec![1.0], vec![vec![0.0, 0.0]], vec![Covariance::Isotropic(1.0)]).unwrap();
        let shifted = Gmm::new(vec![1.0], vec![vec![0.5, 0.0]], vec![Covariance::Isotropic(1.0)]).unwrap();
        let band = NullBand::energy(&g, 500, 10, 100).unwrap();
        assert_eq!(band.values.len(), 10);
        assert!(band.p95 >= quantile(&band.values, 0.5).unwrap());
        let e = energy_distance(&g.sample(500, 7), &shifted.sample(500, 8), 2).unwrap();
        assert!(
            e > 3.0 * band.p95,
            "a 0.5 sd shift is far outside the null band: {e} vs {}",
            band.p95
        );
        let same = mmd2(&g.sample(500, 1), &g.sample(500, 2), 2, None).unwrap();
        let diff = mmd2(&g.sample(500, 3), &shifted.sample(500, 4), 2, None).unwrap();
        assert!(diff > 10.0 * same.abs(), "{diff} vs {same}");
        assert!((quantile(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.95).unwrap() - 4.8).abs() < 1e-12);
    }
}
