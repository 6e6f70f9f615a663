//! FID (Heusel et al. 2017, eq. 6) as pytorch-fid computes it: features of two image sets from
//! a feature network, the Gaussian fitted to each (mean `mu`, unbiased covariance `sigma`, in
//! f64), and the Fréchet distance between the two Gaussians ([`super::frechet`]).
//!
//! The feature network is pytorch-fid's InceptionV3 ([`super::inception`], from a weights file)
//! or, for the bundled digits, the bundled digit classifier ([`super::digits`]) - whose figure is
//! "the FD of the bundled digit features", not FID. Statistics files are pytorch-fid's `.npz`
//! layout: arrays `mu` [d] and `sigma` [d, d], float64 (`np.savez(path, mu=mu, sigma=sigma)`).

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::digits::DigitClassifier;
use super::frechet::{frechet_gaussian_detailed, mean_cov, Frechet};
use super::inception::FidInception;
use crate::error::{Error, Result};

/// The Gaussian fitted to a feature set.
#[derive(Debug, Clone, PartialEq)]
pub struct Statistics {
    /// Mean, length `dims`.
    pub mu: Vec<f64>,
    /// Unbiased covariance, `dims x dims` row-major.
    pub sigma: Vec<f64>,
    pub dims: usize,
}

impl Statistics {
    /// The statistics of `features` (rows of width `dims`); a set of fewer than `dims + 1` rows
    /// has a rank-deficient covariance, which FID cannot use: an error saying how many it needs.
    pub fn of_features(features: &[f64], dims: usize, what: &str) -> Result<Self> {
        let n = features.len().checked_div(dims).unwrap_or(0);
        if n < dims + 1 {
            return Err(Error::param(
                what,
                format!(
                    "{n} images give a covariance of rank at most {} for {dims} features: a full-rank \
                     covariance needs at least {} images",
                    n.saturating_sub(1),
                    dims + 1
                ),
            ));
        }
        let (mu, sigma) = mean_cov(features, dims)?;
        Ok(Statistics { mu, sigma, dims })
    }

    /// Reads a pytorch-fid `.npz` (arrays `mu` and `sigma`).
    pub fn read_npz(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::bad_input(path, "no such statistics file"));
        }
        let arrays = Tensor::read_npz(path).map_err(|e| {
            Error::bad_input(
                path,
                format!(
                    "not a readable .npz file ({})",
                    crate::error::escape_controls(&e.to_string())
                ),
            )
        })?;
        let find = |key: &str| -> Result<Tensor> {
            arrays.iter().find(|(k, _)| k == key).map(|(_, t)| t.clone()).ok_or_else(|| {
                let keys: Vec<&str> = arrays.iter().map(|(k, _)| k.as_str()).collect();
                Error::bad_input(path, format!("no array `{key}` (it has {keys:?}; pytorch-fid's statistics are `mu` and `sigma`)"))
            })
        };
        let (mu, sigma) = (find("mu")?, find("sigma")?);
        let dims = match mu.dims() {
            [d] if *d > 0 => *d,
            s => {
                return Err(Error::bad_input(
                    path,
                    format!("`mu` has shape {s:?}, expected [d]"),
                ))
            }
        };
        if sigma.dims() != [dims, dims] {
            return Err(Error::bad_input(
                path,
                format!(
                    "`sigma` has shape {:?}, expected [{dims}, {dims}] for `mu` of length {dims}",
                    sigma.dims()
                ),
            ));
        }
        let to =
            |t: &Tensor| -> Result<Vec<f64>> { Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?) };
        let (mu, sigma) = (to(&mu)?, to(&sigma)?);
        for (name, v) in [("mu", &mu), ("sigma", &sigma)] {
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(Error::bad_input(
                    path,
                    format!("`{name}` value {i} is not finite"),
                ));
            }
        }
        Ok(Statistics { mu, sigma, dims })
    }

    /// Writes pytorch-fid's `.npz` (float64 `mu`, `sigma`), atomically (temp file + rename).
    pub fn write_npz(&self, path: &Path) -> Result<()> {
        let d = self.dims;
        let mu = Tensor::from_slice(&self.mu, d, &Device::Cpu)?;
        let sigma = Tensor::from_slice(&self.sigma, (d, d), &Device::Cpu)?;
        let tmp = crate::io::temp_path(path);
        Tensor::write_npz(&[("mu", &mu), ("sigma", &sigma)], &tmp).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::bad_input(path, format!("cannot write ({e})"))
        })?;
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(path, e)
        })
    }
}

/// The Fréchet distance between two fitted Gaussians of the same width.
pub fn fid(a: &Statistics, b: &Statistics) -> Result<Frechet> {
    if a.dims != b.dims {
        return Err(Error::param(
            "statistics",
            format!(
                "{} features against {}: both sets need the same network and --dims",
                a.dims, b.dims
            ),
        ));
    }
    frechet_gaussian_detailed(&a.mu, &a.sigma, &b.mu, &b.sigma)
}

/// A feature network over images in [0, 1].
pub enum FeatureNet {
    Inception(Box<FidInception>),
    Digits(DigitClassifier),
}

impl FeatureNet {
    /// The feature width.
    pub fn dims(&self) -> usize {
        match self {
            FeatureNet::Inception(n) => n.dims(),
            FeatureNet::Digits(_) => super::digits::FEATURES,
        }
    }

    /// What outputs call the network.
    pub fn name(&self) -> &'static str {
        match self {
            FeatureNet::Inception(_) => super::inception::NAME,
            FeatureNet::Digits(_) => super::digits::NAME,
        }
    }

    /// What outputs call the distance: FID only with the Inception network.
    pub fn metric_name(&self) -> &'static str {
        match self {
            FeatureNet::Inception(_) => "FID",
            FeatureNet::Digits(_) => "FD of the bundled digit features",
        }
    }

    /// Features (rows of [`Self::dims`]) of `n` images `values` (`[n, c, h, w]` row-major, in
    /// [0, 1]), `batch` images at a time; `progress(done)` after each batch. Greyscale images
    /// become RGB for InceptionV3 (as pytorch-fid's `convert('RGB')`).
    pub fn features(
        &self,
        values: &[f32],
        shape: [usize; 3],
        batch: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Vec<f64>> {
        let [c, h, w] = shape;
        let per = c * h * w;
        if per == 0 || values.len() % per != 0 {
            return Err(Error::param("images", "the values do not form whole images"));
        }
        let n = values.len() / per;
        let device = Device::Cpu;
        match self {
            FeatureNet::Digits(net) => {
                let v: Vec<f64> = values.iter().map(|&x| x as f64).collect();
                let (f, _) = net.describe(&v, shape, &device)?;
                progress(n);
                Ok(f)
            }
            FeatureNet::Inception(net) => {
                if c != 1 && c != 3 {
                    return Err(Error::param(
                        "images",
                        format!("InceptionV3 reads 1- or 3-channel images, these have {c}"),
                    ));
                }
                let mut out = Vec::with_capacity(n * net.dims());
                for first in (0..n).step_by(batch.max(1)) {
                    let count = batch.max(1).min(n - first);
                    let x = Tensor::from_slice(
                        &values[first * per..(first + count) * per],
                        (count, c, h, w),
                        &device,
                    )?;
                    let x = if c == 1 { x.repeat((1, 3, 1, 1))? } else { x };
                    let f = net.features(&x)?;
                    out.extend(f.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?);
                    progress(first + count);
                }
                Ok(out)
            }
        }
    }
}
