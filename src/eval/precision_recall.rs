//! Improved precision and recall (Kynkaanniemi et al. 2019, sec. 3): each set's manifold is the
//! union of balls around its points with radius the distance to the k-th nearest neighbour in
//! the same set (k = 3);
//!
//! ```text
//! precision = fraction of generated points inside the real manifold
//! recall    = fraction of real points inside the generated manifold
//! ```
//!
//! As torch-fidelity's `prc_features_to_metric`: Euclidean distances, the radius is the
//! (k + 1)-th smallest distance from a point to its own set (the point itself is the first, at
//! 0), and "inside" is `distance <= radius`.

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// The paper's and torch-fidelity's neighbourhood size.
pub const DEFAULT_K: usize = 3;

/// Precision and recall of generated features against real ones.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrecisionRecall {
    pub precision: f64,
    pub recall: f64,
    pub k: usize,
}

/// Squared Euclidean distances `[na][nb]` between the rows of `a` and `b`, one GEMM.
fn squared_distances(a: &[f64], b: &[f64], d: usize) -> Result<Vec<f64>> {
    let (na, nb) = (a.len() / d, b.len() / d);
    let ta = Tensor::from_slice(a, (na, d), &Device::Cpu)?;
    let tb = Tensor::from_slice(b, (nb, d), &Device::Cpu)?;
    let dots = ta.matmul(&tb.t()?)?.flatten_all()?.to_vec1::<f64>()?;
    let norm = |v: &[f64], n: usize| -> Vec<f64> {
        (0..n)
            .map(|i| v[i * d..(i + 1) * d].iter().map(|x| x * x).sum())
            .collect()
    };
    let (sa, sb) = (norm(a, na), norm(b, nb));
    let mut out = dots;
    for i in 0..na {
        for j in 0..nb {
            let v = sa[i] + sb[j] - 2.0 * out[i * nb + j];
            out[i * nb + j] = v.max(0.0);
        }
    }
    Ok(out)
}

/// The squared k-NN radius of each row within its own set (the (k + 1)-th smallest squared
/// distance, the row itself included).
fn radii(v: &[f64], d: usize, k: usize) -> Result<Vec<f64>> {
    let n = v.len() / d;
    let dist = squared_distances(v, v, d)?;
    Ok((0..n)
        .map(|i| {
            let mut row: Vec<f64> = dist[i * n..(i + 1) * n].to_vec();
            row[i] = 0.0;
            let (_, kth, _) = row.select_nth_unstable_by(k, f64::total_cmp);
            *kth
        })
        .collect())
}

/// The fraction of rows of `q` within the radius of some row of `p`.
fn coverage(q: &[f64], p: &[f64], p_radii: &[f64], d: usize) -> Result<f64> {
    let (nq, np) = (q.len() / d, p.len() / d);
    let dist = squared_distances(q, p, d)?;
    let inside = (0..nq)
        .filter(|&i| (0..np).any(|j| dist[i * np + j] <= p_radii[j]))
        .count();
    Ok(inside as f64 / nq as f64)
}

/// Precision and recall of `generated` against `real` (rows of width d) with k neighbours.
pub fn precision_recall(generated: &[f64], real: &[f64], d: usize, k: usize) -> Result<PrecisionRecall> {
    for (name, v) in [("generated", generated), ("real", real)] {
        if d == 0 || v.len() % d != 0 || v.len() / d <= k {
            return Err(Error::param(
                "features",
                format!(
                    "{name}: {} values are not more than k = {k} rows of dimension {d}",
                    v.len()
                ),
            ));
        }
    }
    let real_radii = radii(real, d, k)?;
    let gen_radii = radii(generated, d, k)?;
    Ok(PrecisionRecall {
        precision: coverage(generated, real, &real_radii, d)?,
        recall: coverage(real, generated, &gen_radii, d)?,
        k,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_on_a_line() {
        // real 0..=9 on a line: 3-NN radius 3 at the ends' neighbours, 2 inside; generated 0.5,
        // 20: precision 1/2; recall: the generated set's radii (2 points, k = 1 here) is 19.5
        let real: Vec<f64> = (0..10).map(|i| i as f64).collect();
        let gen = [0.5, 20.0];
        let pr = precision_recall(&gen, &real, 1, 1).unwrap();
        assert_eq!(pr.precision, 0.5);
        // every real point is within 19.5 of 0.5 or of 20
        assert_eq!(pr.recall, 1.0);
        let far = [100.0, 101.0];
        let pr = precision_recall(&far, &real, 1, 1).unwrap();
        assert_eq!((pr.precision, pr.recall), (0.0, 0.0));
        assert!(precision_recall(&gen, &real, 1, 3).is_err());
    }
}
