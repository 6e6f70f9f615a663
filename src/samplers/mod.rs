//! Samplers: every reverse process of the DDPM / DDIM / Score-SDE / EDM papers, behind one
//! [`Sampler`] trait. A sampler sees only a [`Denoiser`] and its forward process (never a
//! network), is batched over the first tensor dimension, takes every random draw from
//! [`NoiseStreams`] (row i of the batch from stream i, so a sample does not depend on the batch
//! it was drawn in; field notes, bug 9), reports its number of function evaluations (NFE: one
//! batched denoiser call counts once) and reports each step to an [`Observer`].
//!
//! | file | sampler | processes |
//! | --- | --- | --- |
//! | `ddpm.rs` | ancestral sampling (Ho et al. 2020, Alg. 2), respaced (Nichol & Dhariwal 2021) | `ddpm`, `seed-ve` |
//! | `ddim.rs` | DDIM with eta (Song, Meng & Ermon 2021, eq. 12) | `ddpm`, `seed-ve` |
//! | `euler_maruyama.rs` | reverse-time SDE, Euler–Maruyama (Song et al. 2021) | continuous |
//! | `pc.rs` | predictor–corrector with Langevin corrector (Song et al. 2021, Alg. 1–5) | continuous |
//! | `ode.rs` | probability-flow ODE, Euler and Heun | continuous |
//! | `rk45.rs` | probability-flow ODE, adaptive Dormand–Prince 5(4) | continuous |
//! | `edm.rs` | Karras et al. 2022, Alg. 2 (Heun, rho = 7, optional churn) | continuous |
//!
//! Shared pieces: `timesteps.rs` (DDIM timestep subsequences), `chain.rs` (the reverse Markov
//! chain and the Gaussian posterior of one step), `registry.rs` (names -> samplers),
//! `diffusers.rs` (DDPM / DDIM with the choices of a diffusers scheduler config, to reproduce
//! `DDPMPipeline` / `DDIMPipeline`).
//!
//! The continuous samplers stop at t_eps and finish with one denoising step `x <- E[x_0 | x_t]`
//! (Score-SDE's `denoise=True`, here as Tweedie's posterior mean); it counts in the NFE.

pub mod chain;
pub mod ddim;
pub mod ddpm;
pub mod deis;
pub mod diffusers;
pub mod dpm_solver;
pub mod edm;
pub mod euler_maruyama;
pub mod exp_integrator;
pub mod grids;
pub mod ode;
pub mod pc;
pub mod registry;
pub mod rk45;
pub mod sigma_euler;
pub mod timesteps;
pub mod unipc;

use candle_core::{DType, Device, Tensor};

use crate::denoiser::{per_sample, Denoiser, NoiseLevel};
use crate::error::{Error, Result};
use crate::rng::NoiseStreams;

pub use registry::{build_sampler, SamplerKind, SamplerOptions};

/// What a sampler returns.
#[derive(Debug)]
pub struct SampleOutput {
    /// The samples, shape of `x_T`.
    pub x: Tensor,
    /// Number of batched denoiser evaluations.
    pub nfe: usize,
}

/// One step's report.
pub struct StepEvent<'a> {
    /// Step number, 1-based (step 0 is the prior draw, reported before the first step).
    pub step: usize,
    /// The process time of `x` after the step (the largest over rows for per-row solvers).
    pub t: f64,
    /// The noise level of `x` after the step (per-row solvers: that of row 0).
    pub level: NoiseLevel,
    /// The state after the step.
    pub x: &'a Tensor,
    /// The denoiser's `x_0` prediction made during the step, when the step made one.
    pub x0_pred: Option<&'a Tensor>,
}

/// Receives every step of a sampler (trajectory recording, progress bars).
pub trait Observer {
    /// Called after every step (and once for the prior, with step 0).
    fn observe(&mut self, event: &StepEvent) -> Result<()>;
}

/// An observer that does nothing.
pub struct NoObserver;

impl Observer for NoObserver {
    fn observe(&mut self, _event: &StepEvent) -> Result<()> {
        Ok(())
    }
}

/// One recorded step of a [`Trajectory`].
#[derive(Clone, Debug)]
pub struct TrajectoryPoint {
    /// Step number (0 = prior).
    pub step: usize,
    /// Process time.
    pub t: f64,
    /// Noise level of `x`.
    pub level: NoiseLevel,
    /// The first `rows` rows of the state, flattened (rows x D).
    pub x: Vec<f64>,
    /// The first `rows` rows of the x_0 prediction, when the step made one.
    pub x0_pred: Option<Vec<f64>>,
}

/// Records the first `rows` samples' states (and x_0 predictions) at every `every`-th step and
/// at the last step.
#[derive(Clone, Debug)]
pub struct Trajectory {
    rows: usize,
    every: usize,
    /// The recorded points, in step order.
    pub points: Vec<TrajectoryPoint>,
}

impl Trajectory {
    /// Records `rows` samples every `every` steps (`every >= 1`).
    pub fn new(rows: usize, every: usize) -> Self {
        Trajectory {
            rows,
            every: every.max(1),
            points: Vec::new(),
        }
    }

    fn head(&self, t: &Tensor) -> Result<Vec<f64>> {
        let n = self.rows.min(t.dim(0)?);
        Ok(t.narrow(0, 0, n)?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1()?)
    }
}

impl Observer for Trajectory {
    fn observe(&mut self, e: &StepEvent) -> Result<()> {
        // Keep every `every`-th step; the last step is kept too by replacing a trailing
        // off-grid point (so the final state is always the last record).
        if let Some(last) = self.points.last() {
            if last.step % self.every != 0 {
                self.points.pop();
            }
        }
        let x0_pred = match e.x0_pred {
            Some(t) => Some(self.head(t)?),
            None => None,
        };
        self.points.push(TrajectoryPoint {
            step: e.step,
            t: e.t,
            level: e.level,
            x: self.head(e.x)?,
            x0_pred,
        });
        Ok(())
    }
}

/// A sampler: maps a draw from the prior to a draw from (an approximation of) the data
/// distribution, calling only the denoiser.
pub trait Sampler {
    /// The registry name (`ddpm`, `ddim`, ...).
    fn name(&self) -> &'static str;

    /// The std of the prior `x_T ~ N(0, prior_std^2 I)` this sampler starts from.
    fn prior_std(&self) -> f64;

    /// Runs the sampler from `x_t` (a batch drawn from the prior, see [`draw_prior`]); `noise`
    /// must hold one stream per row.
    fn sample(
        &self,
        den: &dyn Denoiser,
        x_t: Tensor,
        noise: &mut NoiseStreams,
        observer: &mut dyn Observer,
    ) -> Result<SampleOutput>;
}

/// Standard normal noise shaped like `x` (row i from stream i), in x's dtype.
pub fn noise_like(noise: &mut NoiseStreams, x: &Tensor) -> Result<Tensor> {
    let b = x.dim(0)?;
    if noise.batch() != b {
        return Err(Error::param(
            "noise streams",
            format!("{} streams for a batch of {b}", noise.batch()),
        ));
    }
    let per = x.elem_count() / b.max(1);
    let data = noise.normal_rows(per);
    Ok(Tensor::from_vec(data, x.shape(), x.device())?.to_dtype(x.dtype())?)
}

/// `x_T = prior_std * z` with z from the streams: shape `[batch, sample_shape...]`.
pub fn draw_prior(
    sampler: &dyn Sampler,
    sample_shape: &[usize],
    noise: &mut NoiseStreams,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    draw_prior_from(sampler, sample_shape, noise, None, dtype, device)
}

/// Standard-normal draws z given by the user (`--init-noise FILE.npy`), one row per sample, to
/// start a sampler from instead of drawing them: `x_T = prior_std * z`, the sampler's own prior
/// scale, as diffusers' pipelines scale their `latents` by `init_noise_sigma` (1 for the
/// variance-preserving samplers, sigma_max for the variance-exploding ones). The same file thus
/// gives the same trajectory in another framework.
#[derive(Clone, Debug)]
pub struct InitNoise {
    source: std::path::PathBuf,
    rows: usize,
    per: usize,
    z: Vec<f64>,
}

impl InitNoise {
    /// Reads z from a float32 or float64 `.npy` of shape `[N, D]` (D = the product of
    /// `sample_shape`) or `[N, sample_shape...]`. A wrong shape or dtype, or a non-finite value
    /// (named by its index), is an input error naming the file.
    pub fn from_npy(path: &std::path::Path, sample_shape: &[usize]) -> Result<Self> {
        let a = crate::io::read_npy(path)?;
        Self::from_values(path, &a.shape, a.data, sample_shape)
    }

    /// [`InitNoise::from_npy`] on values already read (`source` names them in errors).
    pub fn from_values(
        source: &std::path::Path,
        shape: &[usize],
        z: Vec<f64>,
        sample_shape: &[usize],
    ) -> Result<Self> {
        let per: usize = sample_shape.iter().product();
        let flat_ok = shape.len() == 2 && shape[1] == per;
        let full_ok = shape.len() == sample_shape.len() + 1 && shape[1..] == *sample_shape;
        let want = if sample_shape.len() == 1 {
            format!("[N, {per}]")
        } else {
            format!(
                "[N, {}] or [N, {per}]",
                sample_shape
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        if !(flat_ok || full_ok) || shape[0] == 0 {
            return Err(Error::bad_input(
                source,
                format!("--init-noise has shape {shape:?}, expected {want} (N >= 1) for this model"),
            ));
        }
        if let Some(i) = z.iter().position(|v| !v.is_finite()) {
            return Err(Error::bad_input(
                source,
                format!(
                    "--init-noise value {} at flat index {i} (row {}) is not finite",
                    z[i],
                    i / per.max(1)
                ),
            ));
        }
        Ok(InitNoise {
            source: source.to_path_buf(),
            rows: shape[0],
            per,
            z,
        })
    }

    /// The number of rows N (samples).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The values per row.
    pub fn per_row(&self) -> usize {
        self.per
    }

    /// The file the draws came from.
    pub fn source(&self) -> &std::path::Path {
        &self.source
    }

    /// Checks the file holds exactly `n` rows (one per sample asked for).
    pub fn check_rows(&self, n: usize) -> Result<()> {
        if self.rows != n {
            return Err(Error::bad_input(
                &self.source,
                format!(
                    "--init-noise holds {} rows, but {n} samples were asked for",
                    self.rows
                ),
            ));
        }
        Ok(())
    }

    /// Rows `first .. first + count`, flattened.
    pub fn rows_slice(&self, first: usize, count: usize) -> Result<&[f64]> {
        let end = first + count;
        if end > self.rows {
            return Err(Error::bad_input(
                &self.source,
                format!(
                    "--init-noise holds {} rows, needed rows {first}..{end}",
                    self.rows
                ),
            ));
        }
        Ok(&self.z[first * self.per..end * self.per])
    }
}

/// `x_T = prior_std * z`, shape `[batch, sample_shape...]`: z from the streams, or, with
/// `init = Some((noise, first))`, rows `first ..` of the user's draws. The streams advance by the
/// same number of draws either way, so later draws (stochastic samplers) are the same, and a file
/// holding the streams' own z reproduces the seeded run exactly.
pub fn draw_prior_from(
    sampler: &dyn Sampler,
    sample_shape: &[usize],
    noise: &mut NoiseStreams,
    init: Option<(&InitNoise, usize)>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let mut shape = vec![noise.batch()];
    shape.extend_from_slice(sample_shape);
    let per: usize = sample_shape.iter().product();
    let drawn = noise.normal_rows(per);
    let data = match init {
        None => drawn,
        Some((z, first)) => {
            if z.per_row() != per {
                return Err(Error::bad_input(
                    z.source(),
                    format!("--init-noise rows hold {} values, the samples {per}", z.per_row()),
                ));
            }
            z.rows_slice(first, noise.batch())?.to_vec()
        }
    };
    let z = Tensor::from_vec(data, shape, device)?.to_dtype(dtype)?;
    Ok(z.affine(sampler.prior_std(), 0.0)?)
}

/// Draws `n` samples in batches of at most `batch`: sample i uses stream i of `seed` for its
/// prior draw and every later draw, so the result does not depend on `batch`. The observer
/// sees the first batch only. Returns all samples (shape `[n, sample_shape...]`) and the NFE of
/// one batch (every batch makes the same number of calls, except per-row adaptive solvers,
/// where the largest count is returned).
#[allow(clippy::too_many_arguments)]
pub fn sample_batched(
    sampler: &dyn Sampler,
    den: &dyn Denoiser,
    n: usize,
    sample_shape: &[usize],
    seed: u64,
    batch: usize,
    dtype: DType,
    device: &Device,
    observer: &mut dyn Observer,
) -> Result<SampleOutput> {
    sample_batched_from(
        sampler,
        den,
        n,
        sample_shape,
        seed,
        batch,
        None,
        dtype,
        device,
        observer,
    )
}

/// [`sample_batched`], starting from the user's draws `init` (`--init-noise`) when given: it
/// must hold exactly `n` rows.
#[allow(clippy::too_many_arguments)]
pub fn sample_batched_from(
    sampler: &dyn Sampler,
    den: &dyn Denoiser,
    n: usize,
    sample_shape: &[usize],
    seed: u64,
    batch: usize,
    init: Option<&InitNoise>,
    dtype: DType,
    device: &Device,
    observer: &mut dyn Observer,
) -> Result<SampleOutput> {
    let batches = Batches {
        n,
        sample_shape,
        seed,
        batch,
        init,
        dtype,
        device,
    };
    batches.run(sampler, observer, |_, _, x_t, noise, obs| {
        sampler.sample(den, x_t, noise, obs)
    })
}

/// [`sample_batched_from`] with classifier-free guidance: sample `i` is drawn towards class
/// `classes[i]` (`None`: unconditional) at guidance scale `scale`, each batch through one
/// [`crate::guidance::Guided`] denoiser (both halves in one forward of the doubled batch).
#[allow(clippy::too_many_arguments)]
pub fn sample_batched_guided(
    sampler: &dyn Sampler,
    model: &dyn crate::guidance::ClassConditional,
    classes: &[Option<usize>],
    scale: f64,
    sample_shape: &[usize],
    seed: u64,
    batch: usize,
    init: Option<&InitNoise>,
    dtype: DType,
    device: &Device,
    observer: &mut dyn Observer,
) -> Result<SampleOutput> {
    crate::guidance::check_request(model, classes, scale)?;
    let batches = Batches {
        n: classes.len(),
        sample_shape,
        seed,
        batch,
        init,
        dtype,
        device,
    };
    batches.run(sampler, observer, |start, b, x_t, noise, obs| {
        let den = crate::guidance::Guided::new(model, classes[start..start + b].to_vec(), scale)?;
        sampler.sample(&den, x_t, noise, obs)
    })
}

/// How `n` samples are split into batches and started (see [`sample_batched`]).
struct Batches<'a> {
    n: usize,
    sample_shape: &'a [usize],
    seed: u64,
    batch: usize,
    init: Option<&'a InitNoise>,
    dtype: DType,
    device: &'a Device,
}

impl Batches<'_> {
    /// Runs `step(first_row, rows, x_T, noise, observer)` on every batch and concatenates.
    fn run(
        &self,
        sampler: &dyn Sampler,
        observer: &mut dyn Observer,
        mut step: impl FnMut(usize, usize, Tensor, &mut NoiseStreams, &mut dyn Observer) -> Result<SampleOutput>,
    ) -> Result<SampleOutput> {
        let n = self.n;
        if let Some(z) = self.init {
            z.check_rows(n)?;
        }
        if n == 0 {
            return Err(Error::param("n", "got 0, expected at least 1 sample"));
        }
        let batch = self.batch.max(1);
        let mut parts = Vec::new();
        let mut nfe = 0;
        let mut start = 0;
        let mut none = NoObserver;
        while start < n {
            let b = batch.min(n - start);
            let mut noise = NoiseStreams::new(self.seed, start as u64, b);
            let x_t = draw_prior_from(
                sampler,
                self.sample_shape,
                &mut noise,
                self.init.map(|z| (z, start)),
                self.dtype,
                self.device,
            )?;
            let obs: &mut dyn Observer = if start == 0 { &mut *observer } else { &mut none };
            let out = step(start, b, x_t, &mut noise, obs)?;
            crate::denoiser::check_finite(&out.x, "the samples")?;
            nfe = nfe.max(out.nfe);
            parts.push(out.x);
            start += b;
        }
        Ok(SampleOutput {
            x: Tensor::cat(&parts, 0)?,
            nfe,
        })
    }
}

/// The same level for every row.
pub(crate) fn same_level(level: NoiseLevel, x: &Tensor) -> Result<Vec<NoiseLevel>> {
    Ok(vec![level; x.dim(0)?])
}

/// `a * x + b * y` for scalars a, b.
pub(crate) fn lin(a: f64, x: &Tensor, b: f64, y: &Tensor) -> Result<Tensor> {
    Ok((x.affine(a, 0.0)? + y.affine(b, 0.0)?)?)
}

/// `x * c_i` row-wise for per-row scalars `c`.
pub(crate) fn scale_rows(x: &Tensor, c: &[f64]) -> Result<Tensor> {
    Ok(x.broadcast_mul(&per_sample(c, x)?)?)
}

/// Clips `x0` to `[-c, c]` when asked (DDPM's `clip_denoised`, an option: off by default).
pub(crate) fn maybe_clip(x0: Tensor, clip: Option<f64>) -> Result<Tensor> {
    match clip {
        Some(c) => Ok(x0.clamp(-c, c)?),
        None => Ok(x0),
    }
}

/// Checks a sampler option is finite and in range; the error names the flag.
pub(crate) fn check_option(name: &str, v: f64, lo: f64, hi: f64) -> Result<f64> {
    crate::error::check_range(name, v, (lo, true), (hi, true))
}

/// The denoiser's `(x_0, eps)` at time `t` of a continuous process (one NFE).
pub(crate) fn predict_at(
    den: &dyn Denoiser,
    sde: &crate::process::Sde,
    x: &Tensor,
    t: f64,
) -> Result<(Tensor, Tensor)> {
    den.predict_x0_eps(x, &same_level(sde.level(t), x)?)
}

/// The drift of the reverse-time SDE (`lambda = 1`, Song et al. 2021 eq. 6) or of the
/// probability-flow ODE (`lambda = 1/2`, eq. 13), from the denoiser's eps:
/// `f(t) x - lambda g(t)^2 score = f(t) x + lambda g(t)^2 eps / sigma(t)`.
pub(crate) fn reverse_drift(
    sde: &crate::process::Sde,
    t: f64,
    x: &Tensor,
    eps: &Tensor,
    lambda: f64,
) -> Result<Tensor> {
    let g = sde.diffusion(t);
    lin(sde.drift_coef(t), x, lambda * g * g / sde.level(t).sigma, eps)
}

/// The final denoising step of the continuous samplers: `E[x_0 | x_t]` at `t` (one NFE).
pub(crate) fn final_denoise(
    den: &dyn Denoiser,
    sde: &crate::process::Sde,
    x: &Tensor,
    t: f64,
) -> Result<Tensor> {
    den.predict_x0(x, &same_level(sde.level(t), x)?)
}
