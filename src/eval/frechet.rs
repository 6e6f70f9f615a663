//! The Fréchet distance between the Gaussians fitted to two sample sets (Dowson & Landau 1982;
//! the formula behind FID, Heusel et al. 2017, eq. 6):
//!
//! ```text
//! d^2 = |mu_x - mu_y|^2 + tr(S_x + S_y - 2 (S_x S_y)^{1/2})
//! ```
//!
//! `tr (S_x S_y)^{1/2}` is the sum of the square roots of the eigenvalues of `S_x S_y`, which are
//! those of the symmetric `L^T S_y L` with `S_x = L L^T` (Cholesky), computed in f64. As
//! pytorch-fid's `calculate_frechet_distance`: no ridge while the product is regular; when it is
//! singular (here: `S_x` has no Cholesky factor, e.g. constant features such as an always-black
//! border, or fewer samples than dimensions) `eps * I` (eps = 1e-6) is added to *both*
//! covariances and the product recomputed; a square root with an imaginary part above 1e-3 (an
//! eigenvalue below -1e-6) is an error, smaller ones are rounding and count as 0 (pytorch-fid
//! keeps `covmean.real`). The eigenvalues come from a Householder reduction to tridiagonal form
//! and the implicit QL iteration (Golub & Van Loan, sec. 8.3).
//!
//! In pixel space this is not FID (no Inception features): it compares first and second moments
//! of the raw pixels, enough to rank samplers of one model against the same reference images.

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// pytorch-fid's offset: added to the diagonal of both covariances when their product is
/// singular (never otherwise).
pub const SINGULAR_OFFSET: f64 = 1e-6;

/// pytorch-fid's bound on the imaginary part of the product's square root (`atol = 1e-3`).
pub const IMAGINARY_ATOL: f64 = 1e-3;

/// A Fréchet distance and how it was computed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Frechet {
    /// `d^2` (FID's value).
    pub value: f64,
    /// Whether the product was singular, so [`SINGULAR_OFFSET`] was added (pytorch-fid prints
    /// "fid calculation produces singular product" then).
    pub offset: bool,
}

/// Mean (length d) and unbiased covariance (d x d, row-major) of the rows of `x` (n x d).
pub fn mean_cov(x: &[f64], d: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    if d == 0 || x.len() % d != 0 || x.len() / d < 2 {
        return Err(Error::param(
            "samples",
            format!("{} values do not form at least 2 rows of dimension {d}", x.len()),
        ));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::Numerical(format!("sample value {i} is not finite")));
    }
    let n = x.len() / d;
    let mut mu = vec![0.0; d];
    for row in x.chunks(d) {
        for (m, v) in mu.iter_mut().zip(row) {
            *m += v;
        }
    }
    mu.iter_mut().for_each(|m| *m /= n as f64);
    let centred: Vec<f64> = x
        .chunks(d)
        .flat_map(|row| row.iter().zip(&mu).map(|(v, m)| v - m))
        .collect();
    let c = Tensor::from_vec(centred, (n, d), &Device::Cpu)?;
    let cov = (c.t()?.matmul(&c)? / (n - 1) as f64)?;
    Ok((mu, cov.flatten_all()?.to_vec1::<f64>()?))
}

/// The squared Fréchet distance between N(mu_x, S_x) and N(mu_y, S_y) (see the module docs).
pub fn frechet_gaussian(mu_x: &[f64], s_x: &[f64], mu_y: &[f64], s_y: &[f64]) -> Result<f64> {
    Ok(frechet_gaussian_detailed(mu_x, s_x, mu_y, s_y)?.value)
}

/// [`frechet_gaussian`], saying whether pytorch-fid's singular-product offset was needed.
pub fn frechet_gaussian_detailed(mu_x: &[f64], s_x: &[f64], mu_y: &[f64], s_y: &[f64]) -> Result<Frechet> {
    let d = mu_x.len();
    if mu_y.len() != d || s_x.len() != d * d || s_y.len() != d * d || d == 0 {
        return Err(Error::param(
            "covariance",
            format!(
                "means of length {} and {}, covariances of {} and {} values",
                d,
                mu_y.len(),
                s_x.len(),
                s_y.len()
            ),
        ));
    }
    if let Some(i) = mu_x
        .iter()
        .chain(mu_y)
        .chain(s_x)
        .chain(s_y)
        .position(|v| !v.is_finite())
    {
        return Err(Error::param(
            "statistics",
            format!("value {i} of the means and covariances is not finite"),
        ));
    }
    let mean_term: f64 = mu_x.iter().zip(mu_y).map(|(a, b)| (a - b) * (a - b)).sum();
    let trace = |s: &[f64]| (0..d).map(|i| s[i * d + i]).sum::<f64>();
    let (tr_sqrt, offset) = match trace_sqrt_product(s_x, s_y, d)? {
        Some(t) => (t, false),
        None => {
            let ridged = |s: &[f64]| {
                let mut r = s.to_vec();
                for i in 0..d {
                    r[i * d + i] += SINGULAR_OFFSET;
                }
                r
            };
            let t = trace_sqrt_product(&ridged(s_x), &ridged(s_y), d)?.ok_or_else(|| {
                Error::Numerical(format!(
                    "the covariance product stays singular after adding {SINGULAR_OFFSET} to the diagonal"
                ))
            })?;
            (t, true)
        }
    };
    Ok(Frechet {
        value: mean_term + trace(s_x) + trace(s_y) - 2.0 * tr_sqrt,
        offset,
    })
}

/// `tr (S_x S_y)^{1/2}`, or `None` when `S_x` is singular (no Cholesky factor).
fn trace_sqrt_product(s_x: &[f64], s_y: &[f64], d: usize) -> Result<Option<f64>> {
    let l = match cholesky(s_x, d) {
        Ok(l) => l,
        Err(Error::Numerical(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    let lt = Tensor::from_vec(l, (d, d), &Device::Cpu)?;
    let sy = Tensor::from_vec(s_y.to_vec(), (d, d), &Device::Cpu)?;
    let m = lt.t()?.matmul(&sy)?.matmul(&lt)?;
    let mut m = m.flatten_all()?.to_vec1::<f64>()?;
    // symmetrise away the rounding of the two products
    for i in 0..d {
        for j in 0..i {
            let v = 0.5 * (m[i * d + j] + m[j * d + i]);
            m[i * d + j] = v;
            m[j * d + i] = v;
        }
    }
    let eig = symmetric_eigenvalues(&m, d)?;
    // eigenvalues of a PSD product: negatives are rounding while their square roots' imaginary
    // parts stay under pytorch-fid's 1e-3
    if let Some(&worst) = eig.first().filter(|&&e| e < -IMAGINARY_ATOL * IMAGINARY_ATOL) {
        return Err(Error::Numerical(format!(
            "the covariance product's square root has an imaginary component {:.3e} (eigenvalue {worst:.3e})",
            (-worst).sqrt()
        )));
    }
    Ok(Some(eig.iter().map(|&e| e.max(0.0).sqrt()).sum()))
}

/// The squared Fréchet distance between the Gaussians fitted to the rows of `x` and of `y`.
pub fn frechet_distance(x: &[f64], y: &[f64], d: usize) -> Result<f64> {
    let (mu_x, s_x) = mean_cov(x, d)?;
    let (mu_y, s_y) = mean_cov(y, d)?;
    frechet_gaussian(&mu_x, &s_x, &mu_y, &s_y)
}

/// Lower-triangular `L` with `L L^T = a` (a: d x d symmetric positive definite, row-major).
pub fn cholesky(a: &[f64], d: usize) -> Result<Vec<f64>> {
    let mut l = vec![0.0; d * d];
    for i in 0..d {
        for j in 0..=i {
            let s: f64 = (0..j).map(|k| l[i * d + k] * l[j * d + k]).sum();
            if i == j {
                let v = a[i * d + i] - s;
                if v.is_nan() || v <= 0.0 {
                    return Err(Error::Numerical(format!(
                        "covariance is not positive definite (pivot {i} is {v:e})"
                    )));
                }
                l[i * d + i] = v.sqrt();
            } else {
                l[i * d + j] = (a[i * d + j] - s) / l[j * d + j];
            }
        }
    }
    Ok(l)
}

/// The eigenvalues (ascending) of the symmetric d x d matrix `a` (row-major): Householder
/// tridiagonalisation, then the implicit-shift QL iteration.
pub fn symmetric_eigenvalues(a: &[f64], d: usize) -> Result<Vec<f64>> {
    if a.len() != d * d {
        return Err(Error::param(
            "matrix",
            format!("{} values for {d} x {d}", a.len()),
        ));
    }
    let (mut diag, mut off) = tridiagonalize(a.to_vec(), d);
    tridiagonal_ql(&mut diag, &mut off)?;
    diag.sort_by(f64::total_cmp);
    Ok(diag)
}

/// Householder reduction `Q^T A Q = T`; returns T's diagonal and its off-diagonal
/// (`off[k]` couples k and k + 1; the last entry is 0).
fn tridiagonalize(mut a: Vec<f64>, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut diag = vec![0.0; n];
    let mut off = vec![0.0; n];
    let mut v = vec![0.0; n];
    let mut w = vec![0.0; n];
    for k in 0..n.saturating_sub(2) {
        let lo = k + 1;
        let norm = (lo..n).map(|i| a[i * n + k].powi(2)).sum::<f64>().sqrt();
        diag[k] = a[k * n + k];
        if norm == 0.0 {
            off[k] = 0.0;
            continue;
        }
        let x0 = a[lo * n + k];
        let alpha = if x0 >= 0.0 { -norm } else { norm };
        // v = (x - alpha e_1) / |x - alpha e_1|; H = I - 2 v v^T maps x to alpha e_1
        for i in lo..n {
            v[i] = a[i * n + k];
        }
        v[lo] -= alpha;
        let vn = (lo..n).map(|i| v[i] * v[i]).sum::<f64>().sqrt();
        for x in &mut v[lo..n] {
            *x /= vn;
        }
        // p = A v, K = v^T p, w = p - K v;  H A H = A - 2 (v w^T + w v^T)
        for i in lo..n {
            w[i] = (lo..n).map(|j| a[i * n + j] * v[j]).sum();
        }
        let kk: f64 = (lo..n).map(|i| v[i] * w[i]).sum();
        for i in lo..n {
            w[i] -= kk * v[i];
        }
        for i in lo..n {
            for j in lo..n {
                a[i * n + j] -= 2.0 * (v[i] * w[j] + w[i] * v[j]);
            }
        }
        off[k] = alpha;
    }
    if n >= 2 {
        diag[n - 2] = a[(n - 2) * n + n - 2];
        off[n - 2] = a[(n - 1) * n + n - 2];
    }
    if n >= 1 {
        diag[n - 1] = a[(n - 1) * n + n - 1];
        off[n - 1] = 0.0;
    }
    (diag, off)
}

/// Eigenvalues of the symmetric tridiagonal matrix (d, e) in place in `d` (implicit QL with
/// Wilkinson-like shifts, as EISPACK's tql1).
fn tridiagonal_ql(d: &mut [f64], e: &mut [f64]) -> Result<()> {
    let n = d.len();
    // deflate against the matrix's scale (as JAMA's tql2): a local test |e_m| <= eps (|d_m| +
    // |d_m+1|) never passes inside a cluster of zero eigenvalues
    let scale = d
        .iter()
        .zip(e.iter())
        .map(|(a, b)| a.abs() + b.abs())
        .fold(0.0, f64::max);
    for l in 0..n {
        let mut iter = 0;
        loop {
            let mut m = l;
            while m + 1 < n {
                let dd = d[m].abs() + d[m + 1].abs();
                if e[m].abs() <= f64::EPSILON * dd.max(scale) {
                    break;
                }
                m += 1;
            }
            if m == l {
                break;
            }
            iter += 1;
            if iter > 100 {
                return Err(Error::Numerical(
                    "tridiagonal QL iteration did not converge".into(),
                ));
            }
            let mut g = (d[l + 1] - d[l]) / (2.0 * e[l]);
            let mut r = g.hypot(1.0);
            g = d[m] - d[l] + e[l] / (g + r.copysign(g));
            let (mut s, mut c, mut p) = (1.0, 1.0, 0.0);
            let mut i = m;
            let mut deflated = false;
            while i > l {
                i -= 1;
                let f = s * e[i];
                let b = c * e[i];
                r = f.hypot(g);
                e[i + 1] = r;
                if r == 0.0 {
                    d[i + 1] -= p;
                    e[m] = 0.0;
                    deflated = true;
                    break;
                }
                s = f / r;
                c = g / r;
                g = d[i + 1] - p;
                r = (d[i] - g) * s + 2.0 * c * b;
                p = s * r;
                d[i + 1] = g + p;
                g = c * r - b;
            }
            if deflated {
                continue;
            }
            d[l] -= p;
            e[l] = g;
            e[m] = 0.0;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 11) as f64 / (1u64 << 53) as f64) - 0.5
    }

    #[test]
    fn eigenvalues_of_the_second_difference_matrix() {
        // tridiag(-1, 2, -1) of size n: 2 - 2 cos(k pi / (n + 1)), k = 1..n
        let n = 37;
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            a[i * n + i] = 2.0;
            if i + 1 < n {
                a[i * n + i + 1] = -1.0;
                a[(i + 1) * n + i] = -1.0;
            }
        }
        let got = symmetric_eigenvalues(&a, n).unwrap();
        for (k, g) in got.iter().enumerate() {
            let want = 2.0 - 2.0 * ((k + 1) as f64 * std::f64::consts::PI / (n + 1) as f64).cos();
            assert!((g - want).abs() < 1e-12, "k {k}: {g} vs {want}");
        }
    }

    #[test]
    fn eigenvalues_of_a_rotated_diagonal_matrix() {
        // Q diag(lambda) Q^T with Q a product of Householder reflections: dense, known spectrum
        let n = 60;
        let mut seed = 7;
        let lambda: Vec<f64> = (0..n).map(|i| (i as f64 - 20.0) * 0.37).collect();
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            a[i * n + i] = lambda[i];
        }
        for _ in 0..3 {
            let mut v: Vec<f64> = (0..n).map(|_| lcg(&mut seed)).collect();
            let vn = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            v.iter_mut().for_each(|x| *x /= vn);
            // A <- H A H, H = I - 2 v v^T
            let av: Vec<f64> = (0..n)
                .map(|i| (0..n).map(|j| a[i * n + j] * v[j]).sum())
                .collect();
            let k: f64 = v.iter().zip(&av).map(|(p, q)| p * q).sum();
            let w: Vec<f64> = av.iter().zip(&v).map(|(p, q)| p - k * q).collect();
            for i in 0..n {
                for j in 0..n {
                    a[i * n + j] -= 2.0 * (v[i] * w[j] + w[i] * v[j]);
                }
            }
        }
        let got = symmetric_eigenvalues(&a, n).unwrap();
        let mut want = lambda.clone();
        want.sort_by(f64::total_cmp);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-10, "{g} vs {w}");
        }
    }

    #[test]
    fn frechet_of_2x2_gaussians_matches_the_closed_form() {
        // for 2 x 2: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)), M = S_x S_y
        let sx: [f64; 4] = [2.0, 0.6, 0.6, 1.0];
        let sy: [f64; 4] = [0.5, -0.2, -0.2, 1.5];
        let m = [
            sx[0] * sy[0] + sx[1] * sy[2],
            sx[0] * sy[1] + sx[1] * sy[3],
            sx[2] * sy[0] + sx[3] * sy[2],
            sx[2] * sy[1] + sx[3] * sy[3],
        ];
        let tr_m = m[0] + m[3];
        let det_m = m[0] * m[3] - m[1] * m[2];
        let tr_sqrt = (tr_m + 2.0 * det_m.sqrt()).sqrt();
        let mean = 0.3f64.powi(2) + 1.1f64.powi(2);
        let want = mean + (sx[0] + sx[3]) + (sy[0] + sy[3]) - 2.0 * tr_sqrt;
        let got = frechet_gaussian(&[0.0, 1.0], &sx, &[0.3, -0.1], &sy).unwrap();
        // no ridge on a regular product: the closed form to rounding
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        // identical Gaussians are at distance 0
        let zero = frechet_gaussian(&[0.0, 1.0], &sx, &[0.0, 1.0], &sx).unwrap();
        assert!(zero.abs() < 1e-12, "{zero}");
    }

    #[test]
    fn frechet_of_sample_sets_is_near_the_population_value() {
        // x ~ N(0, I_3), y ~ N(1, 4 I_3): d^2 = 3 * 1 + 3 * (1 - 2)^2 = 6
        let mut seed = 11;
        let normal = |seed: &mut u64| -> f64 {
            let u1 = lcg(seed) + 0.5;
            let u2 = lcg(seed) + 0.5;
            (-2.0 * u1.max(1e-300).ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        };
        let n = 20000;
        let x: Vec<f64> = (0..n * 3).map(|_| normal(&mut seed)).collect();
        let y: Vec<f64> = (0..n * 3).map(|_| 1.0 + 2.0 * normal(&mut seed)).collect();
        let got = frechet_distance(&x, &y, 3).unwrap();
        assert!((got - 6.0).abs() < 0.15, "{got}");
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(frechet_distance(&[1.0, 2.0, 3.0], &[1.0, 2.0], 2).is_err());
        assert!(frechet_distance(&[1.0, f64::NAN, 3.0, 4.0], &[1.0, 2.0, 3.0, 4.0], 2).is_err());
        assert!(cholesky(&[1.0, 2.0, 2.0, 1.0], 2).is_err());
    }
}
#[cfg(test)]
mod low_rank_tests {
    use super::*;
    /// B B^T with B 300 x 50 and 40 zero rows: 250 zero eigenvalues (what pixel covariances
    /// with constant border pixels look like); the spectrum's sum is the trace.
    #[test]
    fn eigenvalues_of_a_low_rank_matrix() {
        let n = 300;
        let r = 50;
        let mut seed = 3u64;
        let mut b = vec![0.0; n * r];
        for v in b.iter_mut() {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *v = ((seed >> 11) as f64 / (1u64 << 53) as f64) - 0.5;
        }
        // zero some rows entirely
        for i in 0..40 {
            for k in 0..r {
                b[i * r + k] = 0.0;
            }
        }
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] = (0..r).map(|k| b[i * r + k] * b[j * r + k]).sum();
            }
        }
        let e = symmetric_eigenvalues(&a, n).unwrap();
        let tr: f64 = (0..n).map(|i| a[i * n + i]).sum();
        let s: f64 = e.iter().sum();
        assert!((tr - s).abs() < 1e-9 * tr, "{tr} {s}");
        let fro: f64 = a.iter().map(|v| v * v).sum();
        let sq: f64 = e.iter().map(|v| v * v).sum();
        assert!((fro - sq).abs() < 1e-9 * fro, "{fro} {sq}");
        let zeros = e.iter().filter(|v| v.abs() < 1e-9 * tr).count();
        assert_eq!(zeros, n - r);
    }
}
