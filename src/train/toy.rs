//! Training the MLP denoiser ([`crate::nets::mlp`]) on low-dimensional data with the simple loss.
//!
//! One step (Ho et al. 2020, Algorithm 1, with log-SNR in place of the timestep):
//!
//! ```text
//! x_0     a batch from the data, in a seeded epoch order
//! lambda  ~ p(lambda) per example           (see LogSnrSampling)
//! alpha   = sqrt(sigmoid(lambda)),  sigma = sqrt(sigmoid(-lambda))     (alpha^2 + sigma^2 = 1)
//! x_vp    = alpha * x_0 + sigma * eps,   eps ~ N(0, I)
//! loss    = mean || eps - net(x_vp, lambda) ||^2          (L_simple, eq. 14, as a mean)
//! ```
//!
//! Training on a distribution of log-SNR rather than on one process's timesteps is what lets
//! one network serve every process (see the MLP's docs): the DDPM linear schedule (T = 1000)
//! spans log-SNR from +9.2 to -10.1, the continuous VP process (beta 0.1..20) from about +13.8
//! at t = 1e-5 to -10, a VE process with sigma in [0.01, 50] from +9.2 to -7.8.
//!
//! The default p(lambda) is the cosine schedule's (Nichol & Dhariwal 2021):
//! `lambda = -2 ln tan(pi t / 2)`, t uniform, truncated to [-12, 12]; its density is
//! proportional to sech(lambda / 2) (Kingma & Gao 2023), most mass in |lambda| < 5 where
//! the data's shape is decided, with exponential tails still reaching the ends. Uniform
//! log-SNR on [-12, 12] is the alternative. Measured on moons with `examples/toy_moons.rs`
//! (width 128, 3 blocks, 3000 steps, 1000 samples, seeds 0 and 1): the mean distance of the
//! samples to the moon curves (data: 0.089) was 0.096 / 0.096 (cosine) against 0.102 / 0.101
//! (uniform) under DDPM ancestral sampling (linear schedule, T = 1000), and 0.099 / 0.090
//! against 0.103 / 0.091 under a VE probability-flow ODE (100 Euler steps); the energy distance
//! to fresh data was inside the null band for both. Hence cosine by default.

use std::path::Path;

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::data::toy2d::{DataSpec, Points};
use crate::data::{EpochSampler, SamplerState};
use crate::error::{check_range, Error, Result};
use crate::nets::mlp::{Mlp, MlpConfig};
use crate::rng::Rng;
use crate::train::init::seeded_var_builder;
use crate::train::{Budget, Interrupt, LoopOptions, TrainOutcome, TrainTask, Trainer, TrainerConfig};

/// How training draws the log-SNR of each example.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LogSnrSampling {
    /// lambda uniform on [min, max].
    Uniform {
        /// Lower end.
        min: f64,
        /// Upper end.
        max: f64,
    },
    /// lambda = -2 ln tan(pi t / 2) with t uniform on the interval that maps to [min, max]:
    /// the cosine schedule's log-SNR, density proportional to sech(lambda / 2).
    Cosine {
        /// Lower end.
        min: f64,
        /// Upper end.
        max: f64,
    },
}

impl Default for LogSnrSampling {
    /// Cosine on [-12, 12].
    fn default() -> Self {
        LogSnrSampling::Cosine {
            min: crate::config::defaults::toy::LOG_SNR_MIN,
            max: crate::config::defaults::toy::LOG_SNR_MAX,
        }
    }
}

impl LogSnrSampling {
    /// Parses `cosine` or `uniform` with the given range.
    pub fn from_name(name: &str, min: f64, max: f64) -> Result<Self> {
        let s = match name {
            "cosine" => LogSnrSampling::Cosine { min, max },
            "uniform" => LogSnrSampling::Uniform { min, max },
            other => {
                return Err(Error::param(
                    "log-snr-sampling",
                    format!("unknown distribution '{other}', expected cosine or uniform"),
                ))
            }
        };
        s.validate()?;
        Ok(s)
    }

    fn range(&self) -> (f64, f64) {
        match *self {
            LogSnrSampling::Uniform { min, max } | LogSnrSampling::Cosine { min, max } => (min, max),
        }
    }

    /// Checks `min < max`, both finite.
    pub fn validate(&self) -> Result<()> {
        let (min, max) = self.range();
        check_range(
            "log-snr-min",
            min,
            (f64::NEG_INFINITY, false),
            (f64::INFINITY, false),
        )?;
        check_range("log-snr-max", max, (min, false), (f64::INFINITY, false))?;
        Ok(())
    }

    /// One draw.
    pub fn sample(&self, rng: &mut Rng) -> f64 {
        let u = rng.uniform();
        match *self {
            LogSnrSampling::Uniform { min, max } => min + (max - min) * u,
            LogSnrSampling::Cosine { min, max } => {
                // t(lambda) = (2 / pi) atan(exp(-lambda / 2)) inverts lambda = -2 ln tan(pi t / 2)
                let t_of = |lam: f64| std::f64::consts::FRAC_2_PI * (-lam / 2.0).exp().atan();
                let (t_lo, t_hi) = (t_of(max), t_of(min));
                let t = t_lo + (t_hi - t_lo) * u;
                let lam = -2.0 * (std::f64::consts::FRAC_PI_2 * t).tan().ln();
                lam.clamp(min, max) // rounding at the ends only
            }
        }
    }
}

/// Everything that defines a toy training run besides the trainer's own settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToyTrainConfig {
    /// The `--data` spec.
    pub data: String,
    /// The number of training points (drawn for synthetic sets; the file's count otherwise).
    pub n_data: usize,
    /// FNV-1a 64 hash of the points' f64 bytes, so a resume notices changed data.
    pub data_checksum: String,
    /// The network.
    pub model: MlpConfig,
    /// Batch size.
    pub batch: usize,
    /// The training distribution of log-SNR.
    pub log_snr: LogSnrSampling,
    /// Class-conditional runs: the probability that a training example's label is replaced by
    /// the null class (classifier-free guidance's label dropout; Ho & Salimans 2022 use 0.1-0.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cond_drop: Option<f64>,
    /// Class-conditional runs: FNV-1a 64 of the labels, so a resume notices changed labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels_checksum: Option<String>,
}

/// FNV-1a (64-bit) of class labels (as little-endian u64), as 16 hex digits.
pub fn labels_checksum(labels: &[usize]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in labels {
        for b in (*v as u64).to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// FNV-1a (64-bit) of the points' little-endian f64 bytes, as 16 hex digits.
pub fn points_checksum(points: &Points) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in points.as_slice() {
        for b in v.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// The most training points a toy run may have (`--n-data`; 160 MB of 2-D points): a count
/// read back from a checkpoint is checked against it before the points are regenerated.
pub const MAX_POINTS: usize = 10_000_000;

/// Seeds of the run's independent streams, all derived from the one `--seed`.
#[derive(Clone, Copy, Debug)]
pub struct ToySeeds {
    /// Synthetic data points.
    pub data: u64,
    /// Epoch permutations.
    pub order: u64,
    /// Initial weights.
    pub init: u64,
}

impl ToySeeds {
    /// Streams 1, 2, 3 of `seed` (stream 0 is not used; the trainer's generator is `Rng::new(seed)`).
    pub fn from_seed(seed: u64) -> Self {
        ToySeeds {
            data: Rng::stream(seed, 1).next_u64(),
            order: Rng::stream(seed, 2).next_u64(),
            init: Rng::stream(seed, 3).next_u64(),
        }
    }
}

/// Loads the data of `spec` (`n_data` points for synthetic sets) with the run's data seed.
pub fn load_data(spec: &DataSpec, n_data: usize, seed: u64) -> Result<Points> {
    spec.load(n_data, ToySeeds::from_seed(seed).data)
}

/// The [`TrainTask`] of the toy trainer.
pub struct ToyTask {
    points: Tensor,
    /// Class ids (u32) per point, and the label-dropout probability (conditional runs).
    labels: Option<(Tensor, f64)>,
    order: EpochSampler,
    mlp: Mlp,
    batch: usize,
    log_snr: LogSnrSampling,
    device: Device,
}

impl ToyTask {
    /// A task over `points` for `mlp` (with one class id per point for a class-conditional model).
    pub fn new(
        points: &Points,
        labels: Option<&[usize]>,
        mlp: Mlp,
        config: &ToyTrainConfig,
        order_seed: u64,
        device: &Device,
    ) -> Result<Self> {
        if config.batch == 0 {
            return Err(Error::param("batch", "got 0, expected at least 1"));
        }
        config.log_snr.validate()?;
        if points.dim() != mlp.config().dim {
            return Err(Error::param(
                "data",
                format!(
                    "points have dimension {}, the model {}",
                    points.dim(),
                    mlp.config().dim
                ),
            ));
        }
        let labels = match (labels, mlp.config().num_classes) {
            (Some(l), Some(k)) => {
                if l.len() != points.len() {
                    return Err(Error::param(
                        "labels",
                        format!("{} labels for {} points", l.len(), points.len()),
                    ));
                }
                if let Some(c) = l.iter().find(|&&c| c >= k) {
                    return Err(Error::param("labels", format!("label {c} is outside 0..{k}")));
                }
                let p = config.cond_drop.unwrap_or(DEFAULT_COND_DROP);
                check_range("cond-drop", p, (0.0, true), (1.0, false))?;
                let ids: Vec<u32> = l.iter().map(|&c| c as u32).collect();
                Some((Tensor::from_vec(ids, l.len(), device)?, p))
            }
            (None, None) => None,
            (Some(_), None) => return Err(Error::param("labels", "labels given for an unconditional model")),
            (None, Some(_)) => return Err(Error::param("labels", "a class-conditional model needs labels")),
        };
        Ok(ToyTask {
            labels,
            points: points.to_tensor(device)?,
            order: EpochSampler::new(order_seed, points.len())?,
            mlp,
            batch: config.batch,
            log_snr: config.log_snr,
            device: device.clone(),
        })
    }

    /// The network.
    pub fn mlp(&self) -> &Mlp {
        &self.mlp
    }
}

impl TrainTask for ToyTask {
    fn loss(&mut self, _step: u64, rng: &mut Rng) -> Result<Tensor> {
        let b = self.batch;
        let d = self.mlp.config().dim;
        let idx: Vec<u32> = self.order.next_batch(b).into_iter().map(|i| i as u32).collect();
        let idx = Tensor::from_vec(idx, b, &self.device)?;
        let x0 = self.points.index_select(&idx, 0)?;
        let lam: Vec<f64> = (0..b).map(|_| self.log_snr.sample(rng)).collect();
        let eps = rng.randn(&[b, d], &self.device)?;
        let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
        let alpha: Vec<f32> = lam.iter().map(|&l| sigmoid(l).sqrt() as f32).collect();
        let sigma: Vec<f32> = lam.iter().map(|&l| sigmoid(-l).sqrt() as f32).collect();
        let alpha = Tensor::from_vec(alpha, (b, 1), &self.device)?;
        let sigma = Tensor::from_vec(sigma, (b, 1), &self.device)?;
        let x_vp = (x0.broadcast_mul(&alpha)? + eps.broadcast_mul(&sigma)?)?;
        let lam32: Vec<f32> = lam.iter().map(|&l| l as f32).collect();
        // label dropout: each label becomes the null class (row K) with probability p, drawn
        // after the noise so unconditional runs keep their random stream
        let classes = match &self.labels {
            Some((labels, p)) => {
                let k = self.mlp.config().num_classes.unwrap_or(0) as u32;
                let mut c: Vec<u32> = labels.index_select(&idx, 0)?.to_vec1()?;
                for ci in c.iter_mut() {
                    if rng.uniform() < *p {
                        *ci = k;
                    }
                }
                Some(Tensor::from_vec(c, b, &self.device)?)
            }
            None => None,
        };
        let eps_hat = self.mlp.forward_class(
            &x_vp,
            &Tensor::from_vec(lam32, b, &self.device)?,
            classes.as_ref(),
        )?;
        Ok((eps_hat - eps)?.sqr()?.mean_all()?)
    }

    fn data_state(&self) -> Value {
        serde_json::to_value(self.order.state()).unwrap_or(Value::Null)
    }

    fn restore_data_state(&mut self, state: &Value) -> Result<()> {
        let s: SamplerState = serde_json::from_value(state.clone())
            .map_err(|e| Error::param("data order", format!("cannot read the saved data order: {e}")))?;
        self.order = EpochSampler::restore(s, self.order.len())?;
        Ok(())
    }
}

/// A toy run, ready to train: the trainer and the task share the model's variables.
pub struct ToyRun {
    /// The loop driver.
    pub trainer: Trainer,
    /// The model and its data.
    pub task: ToyTask,
    /// The model's variables.
    pub varmap: VarMap,
}

impl ToyRun {
    /// Builds the model (weights seeded from `trainer.seed`) and starts a fresh run in `run_dir`,
    /// or resumes the run there when `resume` (then the configs must match).
    pub fn setup(
        run_dir: &Path,
        points: &Points,
        labels: Option<&[usize]>,
        config: &ToyTrainConfig,
        trainer_config: &TrainerConfig,
        resume: bool,
        device: &Device,
    ) -> Result<Self> {
        let seeds = ToySeeds::from_seed(trainer_config.seed);
        let varmap = VarMap::new();
        let mlp = Mlp::new(&config.model, seeded_var_builder(&varmap, seeds.init, device))?;
        let mut task = ToyTask::new(points, labels, mlp, config, seeds.order, device)?;
        let task_config = serde_json::to_value(config)
            .map_err(|e| Error::Numerical(format!("cannot encode the toy config: {e}")))?;
        let trainer = if resume {
            Trainer::resume(run_dir, &varmap, trainer_config, &task_config, &mut task)?
        } else {
            Trainer::new(run_dir, &varmap, trainer_config, &task_config)?
        };
        Ok(ToyRun {
            trainer,
            task,
            varmap,
        })
    }

    /// Trains within `budget`.
    pub fn run(
        &mut self,
        budget: &Budget,
        options: &LoopOptions,
        interrupt: &Interrupt,
    ) -> Result<TrainOutcome> {
        self.trainer.run(&mut self.task, budget, options, interrupt)
    }
}

/// The resolved config of a toy run over `points`.
pub fn toy_config(
    spec: &DataSpec,
    points: &Points,
    model: MlpConfig,
    batch: usize,
    log_snr: LogSnrSampling,
) -> ToyTrainConfig {
    ToyTrainConfig {
        data: spec.to_string(),
        n_data: points.len(),
        data_checksum: points_checksum(points),
        model,
        batch,
        log_snr,
        cond_drop: None,
        labels_checksum: None,
    }
}

/// Label dropout when `--cond-drop` is not given: 0.1 (Ho & Salimans 2022 found 0.1-0.2 best).
pub const DEFAULT_COND_DROP: f64 = crate::config::defaults::toy::COND_DROP;

/// The training points of a toy run (regenerated from the run's saved data spec and seed, or
/// re-read from its file), e.g. to draw them beside samples.
pub fn training_points(dir: &Path) -> Result<Points> {
    use crate::train::checkpoint;
    let ckpt = checkpoint::locate(dir)?;
    let state = checkpoint::read_state(&ckpt)?;
    let bad = |m: String| Error::bad_input(ckpt.join(checkpoint::STATE_FILE), m);
    let task: ToyTrainConfig = serde_json::from_value(state.config["task"].clone())
        .map_err(|e| bad(format!("not a toy run ({e})")))?;
    let seed = state.config["trainer"]["seed"]
        .as_u64()
        .ok_or_else(|| bad("config.trainer.seed is missing".into()))?;
    if task.n_data > MAX_POINTS {
        return Err(bad(format!(
            "config.task.n_data is {}, more than the {MAX_POINTS} points a toy run may have",
            task.n_data
        )));
    }
    let points = load_data(&DataSpec::parse(&task.data)?, task.n_data, seed)?;
    if points_checksum(&points) != task.data_checksum {
        return Err(bad(format!("the data {} changed since training", task.data)));
    }
    Ok(points)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The truncated cosine distribution: P(lambda <= x) = (t(min) - t(x)) / (t(min) - t(max)),
    /// t(l) = (2/pi) atan(exp(-l/2)); for [-12, 12], P(lambda <= 0) = 1/2 by symmetry and
    /// P(|lambda| <= 2) = (t(-2) - t(2)) / (t(-12) - t(12)) = 0.5512 / 0.99684 = 0.5529.
    #[test]
    fn cosine_log_snr_matches_its_cdf() {
        let s = LogSnrSampling::default();
        let mut rng = Rng::new(3);
        let n = 100_000;
        let draws: Vec<f64> = (0..n).map(|_| s.sample(&mut rng)).collect();
        assert!(draws.iter().all(|&l| (-12.0..=12.0).contains(&l)));
        let frac = |f: &dyn Fn(f64) -> bool| draws.iter().filter(|&&l| f(l)).count() as f64 / n as f64;
        let t = |l: f64| std::f64::consts::FRAC_2_PI * (-l / 2.0f64).exp().atan();
        let p2 = (t(-2.0) - t(2.0)) / (t(-12.0) - t(12.0));
        // binomial standard error sqrt(p(1-p)/n) <= 0.0016; allow 4 of them
        assert!((frac(&|l| l <= 0.0) - 0.5).abs() < 0.0064);
        assert!(
            (frac(&|l| l.abs() <= 2.0) - p2).abs() < 0.0064,
            "{} vs {p2}",
            frac(&|l| l.abs() <= 2.0)
        );
        let u = LogSnrSampling::from_name("uniform", -4.0, 4.0).unwrap();
        let m = (0..n).map(|_| u.sample(&mut rng)).sum::<f64>() / n as f64;
        assert!(m.abs() < 0.04); // sd 4.62 / sqrt(n) = 0.015
        assert!(LogSnrSampling::from_name("cosine", 3.0, 1.0).is_err());
        assert!(LogSnrSampling::from_name("beta", -1.0, 1.0).is_err());
    }

    #[test]
    fn checksum_changes_with_the_points() {
        let a = Points::new(2, vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let b = Points::new(2, vec![1.0, 2.0, 3.0, 4.5]).unwrap();
        assert_ne!(points_checksum(&a), points_checksum(&b));
        assert_eq!(points_checksum(&a), points_checksum(&a.clone()));
        assert_eq!(points_checksum(&a).len(), 16);
    }
}
