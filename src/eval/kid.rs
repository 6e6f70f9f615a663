//! Kernel Inception Distance (Binkowski et al. 2018, "Demystifying MMD GANs", sec. 4): the
//! unbiased estimate of the squared MMD between two feature sets with the cubic polynomial
//! kernel, averaged over random subsets, as torch-fidelity computes it (`kid_features_to_metric`,
//! defaults: 100 subsets of 1,000 rows, drawn without replacement).
//!
//! ```text
//! k(x, y) = (x . y / d + 1)^3
//! MMD^2_u = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1))
//!           - 2 sum_{i, j} k(x_i, y_j) / m^2
//! ```
//!
//! In f64. The subsets come from this crate's seeded generator (torch-fidelity uses NumPy's
//! `RandomState`, so the subsets, not the estimator, differ); with one subset of all the rows
//! the figure is torch-fidelity's exactly (the estimator does not depend on the order).

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::rng::Rng;

/// torch-fidelity's default number of subsets.
pub const DEFAULT_SUBSETS: usize = 100;

/// torch-fidelity's default subset size.
pub const DEFAULT_SUBSET_SIZE: usize = 1000;

/// KID's mean and standard deviation over the subsets (torch-fidelity's `np.std`, ddof 0).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Kid {
    pub mean: f64,
    pub std: f64,
    /// Rows per subset (the default, or all rows of the smaller set when it has fewer).
    pub subset_size: usize,
    pub subsets: usize,
}

fn check(x: &[f64], y: &[f64], d: usize) -> Result<(usize, usize)> {
    if d == 0 || x.len() % d != 0 || y.len() % d != 0 || x.len() / d < 2 || y.len() / d < 2 {
        return Err(Error::param(
            "features",
            format!(
                "{} and {} values do not form at least 2 rows of dimension {d} each",
                x.len(),
                y.len()
            ),
        ));
    }
    Ok((x.len() / d, y.len() / d))
}

/// The cubic-kernel matrix `K[i][j] = (a_i . b_j / d + 1)^3` (a: na x d, b: nb x d), one GEMM.
fn kernel_matrix(a: &[f64], b: &[f64], d: usize) -> Result<Vec<f64>> {
    let (na, nb) = (a.len() / d, b.len() / d);
    let ta = Tensor::from_slice(a, (na, d), &Device::Cpu)?;
    let tb = Tensor::from_slice(b, (nb, d), &Device::Cpu)?;
    let dots = ta.matmul(&tb.t()?)?.flatten_all()?.to_vec1::<f64>()?;
    Ok(dots.into_iter().map(|v| (v / d as f64 + 1.0).powi(3)).collect())
}

/// The unbiased MMD^2 from the kernel matrices restricted to the rows `ix` of x and `iy` of y
/// (`kxx` is nx x nx, `kyy` ny x ny, `kxy` nx x ny).
fn mmd2_from_kernels(
    kxx: &[f64],
    kyy: &[f64],
    kxy: &[f64],
    nx: usize,
    ny: usize,
    ix: &[usize],
    iy: &[usize],
) -> f64 {
    let m = ix.len() as f64;
    let (mut xx, mut yy, mut xy) = (0.0, 0.0, 0.0);
    for &i in ix {
        for &j in ix {
            if i != j {
                xx += kxx[i * nx + j];
            }
        }
        for &j in iy {
            xy += kxy[i * ny + j];
        }
    }
    for &i in iy {
        for &j in iy {
            if i != j {
                yy += kyy[i * ny + j];
            }
        }
    }
    (xx + yy) / (m * (m - 1.0)) - 2.0 * xy / (m * m)
}

/// The unbiased MMD^2 of rows `x` and `y` (each m x d, the same m) with the cubic kernel.
pub fn mmd2_unbiased_poly(x: &[f64], y: &[f64], d: usize) -> Result<f64> {
    let (m, my) = check(x, y, d)?;
    if m != my {
        return Err(Error::param(
            "features",
            format!("{m} and {my} rows: the estimator needs equal sizes"),
        ));
    }
    let idx: Vec<usize> = (0..m).collect();
    let (kxx, kyy, kxy) = (
        kernel_matrix(x, x, d)?,
        kernel_matrix(y, y, d)?,
        kernel_matrix(x, y, d)?,
    );
    Ok(mmd2_from_kernels(&kxx, &kyy, &kxy, m, m, &idx, &idx))
}

/// Above this many rows in either set the kernel matrices are built per subset instead of once.
const FULL_KERNEL_ROWS: usize = 3000;

/// KID over `subsets` random subsets of `subset_size` rows of each set (capped at the smaller
/// set's size), drawn without replacement from a generator seeded with `seed`.
pub fn kid(x: &[f64], y: &[f64], d: usize, subsets: usize, subset_size: usize, seed: u64) -> Result<Kid> {
    let (nx, ny) = check(x, y, d)?;
    if subsets == 0 || subset_size < 2 {
        return Err(Error::param(
            "kid",
            format!("{subsets} subsets of {subset_size} rows: need >= 1 of >= 2"),
        ));
    }
    let m = subset_size.min(nx).min(ny);
    let mut rng = Rng::new(seed);
    // partial Fisher-Yates: the first m of a uniform random permutation of 0..n
    let mut pick = |n: usize| -> Vec<usize> {
        let mut idx: Vec<usize> = (0..n).collect();
        if m < n {
            for i in 0..m {
                let j = i + rng.below((n - i) as u64) as usize;
                idx.swap(i, j);
            }
        }
        idx.truncate(m);
        idx
    };
    let full = nx.max(ny) <= FULL_KERNEL_ROWS;
    let kernels = if full {
        Some((
            kernel_matrix(x, x, d)?,
            kernel_matrix(y, y, d)?,
            kernel_matrix(x, y, d)?,
        ))
    } else {
        None
    };
    let rows = |v: &[f64], idx: &[usize]| -> Vec<f64> {
        idx.iter()
            .flat_map(|&i| v[i * d..(i + 1) * d].iter().copied())
            .collect()
    };
    let mut values = Vec::with_capacity(subsets);
    for _ in 0..subsets {
        let ix = pick(nx);
        let iy = pick(ny);
        let v = match &kernels {
            Some((kxx, kyy, kxy)) => mmd2_from_kernels(kxx, kyy, kxy, nx, ny, &ix, &iy),
            None => mmd2_unbiased_poly(&rows(x, &ix), &rows(y, &iy), d)?,
        };
        values.push(v);
    }
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64;
    Ok(Kid {
        mean,
        std: var.sqrt(),
        subset_size: m,
        subsets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmd_of_a_hand_computed_pair() {
        // d = 1, m = 2: x = (0, 1), y = (1, 2); k(a, b) = (a b + 1)^3
        let x = [0.0, 1.0];
        let y = [1.0, 2.0];
        let k = |a: f64, b: f64| (a * b + 1.0).powi(3);
        let xx = 2.0 * k(0.0, 1.0);
        let yy = 2.0 * k(1.0, 2.0);
        let xy = k(0.0, 1.0) + k(0.0, 2.0) + k(1.0, 1.0) + k(1.0, 2.0);
        let want = (xx + yy) / 2.0 - 2.0 * xy / 4.0;
        let got = mmd2_unbiased_poly(&x, &y, 1).unwrap();
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    }

    #[test]
    fn one_subset_of_all_rows_is_the_full_estimate_and_seeded_subsets_repeat() {
        let x: Vec<f64> = (0..40).map(|i| (i as f64 * 0.37).sin()).collect();
        let y: Vec<f64> = (0..40).map(|i| (i as f64 * 0.11).cos()).collect();
        let full = mmd2_unbiased_poly(&x, &y, 2).unwrap();
        let k = kid(&x, &y, 2, 1, 1000, 0).unwrap();
        assert_eq!(k.subset_size, 20);
        assert!((k.mean - full).abs() < 1e-15 && k.std == 0.0);
        let a = kid(&x, &y, 2, 10, 8, 5).unwrap();
        let b = kid(&x, &y, 2, 10, 8, 5).unwrap();
        assert_eq!(a, b);
        assert!(a.std > 0.0);
    }
}
