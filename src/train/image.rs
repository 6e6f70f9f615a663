//! Training the U-Net ([`crate::nets::unet`]) on images with the simple loss.
//!
//! One step (Ho et al. 2020, Algorithm 1):
//!
//! ```text
//! x_0  a batch of images in [-1, 1] (seeded epoch order, optional random horizontal flip)
//! t    ~ Uniform{1, ..., T} per image
//! eps  ~ N(0, I)
//! x_t  = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps                      (eq. 4)
//! loss = mean || target - net(x_t, t) ||^2                      (L_simple, eq. 14, as a mean)
//! ```
//!
//! A class-conditional network (`num_class_embeds` set) also sees each image's label `c`, replaced
//! by the null class with probability `cond_drop` (label dropout, Ho & Salimans 2022, Alg. 1), so
//! one network learns both `eps(x_t, c)` and `eps(x_t)` for classifier-free guidance.
//!
//! where `target` is `eps` (the DDPM paper), `x_0`, or `v = sqrt(alpha_bar_t) eps -
//! sqrt(1 - alpha_bar_t) x_0` (Salimans & Ho 2022), as configured. The network sees the
//! diffusers timestep `t - 1` (index convention of [`crate::schedule`]), so a trained model is
//! a diffusers `UNet2DModel` + `DDPMScheduler` pair.
//!
//! Random draws, per step: the batch's indices from the epoch order, then one draw of the
//! trainer's generator seeds the step; sample `i` of the global batch takes its flip, `t`, `eps`
//! and label dropout from its own stream `Rng::stream(step seed, i)`, and the dropout masks come
//! from one step stream, row `i` of each mask being row `i` of the whole batch's mask. So what a
//! sample sees depends on (seed, step, i) only, and K data-parallel ranks, rank `r` computing
//! samples `[r B / K, (r + 1) B / K)`, reproduce the single process ([`crate::train::distributed`]).

use std::path::{Path, PathBuf};
use std::rc::Rc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::data::{EpochSampler, ImageDataset, SamplerState};
use crate::denoiser::{per_sample, Prediction};
use crate::error::{Error, Result};
use crate::eval::digits::{DigitClassifier, FEATURES};
use crate::eval::fid::{fid, Statistics};
use crate::forward::q_sample;
use crate::nets::{unet, UNet, UNetConfig, UNetDenoiser};
use crate::rng::Rng;
use crate::schedule::{BetaSchedule, Schedule};
use crate::train::checkpoint;
use crate::train::{Collective, EvalRecord, HookContext, Shard, TrainTask, Trainer, TrainerConfig};

/// Everything that defines an image-training run's model and data (saved in checkpoints,
/// compared on resume).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageTrainConfig {
    /// Where the images come from (`mnist5k` or a directory) and how they are shaped.
    pub data: crate::data::DataSpec,
    /// Number of training images, and FNV-1a of their pixels: a resume on other data is refused.
    pub n_images: usize,
    /// Checksum of the training images.
    pub data_checksum: String,
    /// The preset the network was built from (informational).
    pub preset: String,
    /// The network, as a diffusers `UNet2DModel` config.
    pub unet: Value,
    /// The noise schedule.
    pub schedule: BetaSchedule,
    /// T.
    pub timesteps: usize,
    /// The network's output: eps, x0 or v.
    pub prediction: Prediction,
    /// Images per step.
    pub batch: usize,
    /// Random horizontal flips.
    pub flip: bool,
    /// Class-conditional runs: the probability that a label is replaced by the null class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cond_drop: Option<f64>,
}

/// Label dropout of `diffuse train` when `--cond-drop` is not given: 0.1 (Ho & Salimans 2022
/// report 0.1 and 0.2 best).
pub const DEFAULT_COND_DROP: f64 = crate::config::defaults::image::COND_DROP;

impl ImageTrainConfig {
    /// The U-Net config.
    pub fn unet_config(&self) -> Result<UNetConfig> {
        UNetConfig::from_json(&self.unet)
    }

    /// The schedule.
    pub fn schedule(&self) -> Result<Schedule> {
        Schedule::new(&self.schedule, self.timesteps)
    }
}

/// FNV-1a (64-bit) of f32 values' little-endian bytes, as 16 hex digits.
pub fn checksum_f32(values: &[f32]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in values {
        for b in v.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// How the training hook draws its sample grid.
#[derive(Clone, Debug)]
pub struct GridSampling {
    /// Images in the grid (0: no grid).
    pub n: usize,
    /// Ancestral (DDPM) sampling steps, respaced from T.
    pub steps: usize,
    /// Seed of the grid's noise (the same every time, so grids are comparable across steps).
    pub seed: u64,
    /// Guidance scale of a class-conditional model's grid (one row per class).
    pub guidance_scale: f64,
}

/// The [`TrainTask`] of the image trainer.
pub struct ImageTask {
    data: ImageDataset,
    order: EpochSampler,
    unet: UNet,
    unet_config: UNetConfig,
    schedule: Schedule,
    prediction: Prediction,
    batch: usize,
    flip: bool,
    device: Device,
    grid: GridSampling,
    /// Class-conditional runs: the label dropout probability and the null class.
    cond: Option<(f64, u32)>,
    /// The part of each global batch this process computes.
    shard: Shard,
    /// `train --fid-every`: how samples are measured while training.
    quality: Option<QualityEval>,
}

/// `train --fid-every` (issue 15, item 5): every so many steps, `n` samples of the EMA weights
/// (class `i mod K` each for a class-conditional model, at the guidance scale) drawn with a fast
/// sampler, their FD of the bundled digit features against the reference images (the test
/// split), beside the floor: as many real training images against the same reference.
#[derive(Clone, Debug)]
pub struct QualityEval {
    /// Samples per evaluation.
    pub n: usize,
    /// Sampler name (the registry's) and its steps.
    pub sampler: String,
    pub steps: usize,
    /// Seed of the samples' noise (the same every time, so evaluations are comparable).
    pub seed: u64,
    /// Guidance scale of a class-conditional model's samples.
    pub guidance_scale: f64,
    /// The reference images' feature statistics.
    pub reference: Statistics,
    /// `n` real training images against the reference.
    pub floor: Option<f64>,
}

impl QualityEval {
    /// The digit-feature evaluation of `n` samples against `reference` images (usually the test
    /// split), with `train`'s first `n` images as the floor. Needs 1-channel 28x28 or 16x16 images
    /// and more than 128 samples (a full-rank covariance of the 128 features).
    pub fn digits(
        train: &ImageDataset,
        reference: &ImageDataset,
        n: usize,
        sampler: &str,
        steps: usize,
        seed: u64,
        guidance_scale: f64,
    ) -> Result<Self> {
        let shape = train.shape();
        if !digit_shaped(shape) {
            return Err(Error::param(
                "fid-every",
                format!(
                    "the bundled digit features need 1-channel 28x28 or 16x16 images, these are {}x{}x{}",
                    shape[0], shape[1], shape[2]
                ),
            ));
        }
        crate::samplers::SamplerKind::from_name(sampler)?;
        let net = DigitClassifier::bundled(&Device::Cpu)?;
        let unit = |ds: &ImageDataset, m: usize| -> Vec<f64> {
            ds.pixels()[..m * ds.image_len()]
                .iter()
                .map(|&v| (v as f64 + 1.0) / 2.0)
                .collect()
        };
        let (f_ref, _) = net.describe(&unit(reference, reference.len()), reference.shape(), &Device::Cpu)?;
        let reference_stats = Statistics::of_features(&f_ref, FEATURES, "the reference images")?;
        // n samples need n > 128 for their own statistics; checked here, before training
        Statistics::of_features(&vec![0.0; n * FEATURES], FEATURES, "--fid-samples")?;
        let floor = if train.len() >= n {
            let (f, _) = net.describe(&unit(train, n), shape, &Device::Cpu)?;
            Some(
                fid(
                    &Statistics::of_features(&f, FEATURES, "training images")?,
                    &reference_stats,
                )?
                .value,
            )
        } else {
            None
        };
        Ok(QualityEval {
            n,
            sampler: sampler.to_string(),
            steps,
            seed,
            guidance_scale,
            reference: reference_stats,
            floor,
        })
    }
}

/// Whether the bundled digit classifier reads images of this shape.
pub fn digit_shaped(shape: [usize; 3]) -> bool {
    shape[0] == 1 && shape[1] == shape[2] && (shape[1] == 28 || shape[1] == 16)
}

/// The stream of a step's seed that the dropout masks come from (streams `0 .. B` are the
/// samples').
const DROPOUT_STREAM: u64 = u64::MAX;

impl ImageTask {
    /// A task training `unet` on `data`.
    pub fn new(
        data: ImageDataset,
        unet: UNet,
        config: &ImageTrainConfig,
        order_seed: u64,
        grid: GridSampling,
        device: &Device,
    ) -> Result<Self> {
        if config.batch == 0 {
            return Err(Error::param("batch", "got 0, expected at least 1"));
        }
        let unet_config = config.unet_config()?;
        let [c, h, w] = data.shape();
        if unet_config.in_channels != c {
            return Err(Error::param(
                "channels",
                format!(
                    "the images have {c} channels, the network expects {}",
                    unet_config.in_channels
                ),
            ));
        }
        unet_config
            .check_input_size(h, w)
            .map_err(|m| Error::param("image-size", m))?;
        let cond = match (unet_config.num_class_embeds, unet_config.null_class) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(Error::param(
                    "num_class_embeds",
                    "a class-conditional training run needs a null class (_diffuse_null_class)",
                ))
            }
            (Some(_), Some(null)) => {
                let labels = data.labels().ok_or_else(|| {
                    Error::param(
                        "data",
                        format!(
                            "{} has no labels to train a class-conditional model on",
                            data.source()
                        ),
                    )
                })?;
                if let Some(c) = labels.iter().find(|&&c| c as usize >= null) {
                    return Err(Error::param(
                        "labels",
                        format!("label {c} is outside the model's {null} classes"),
                    ));
                }
                let p = config.cond_drop.unwrap_or(DEFAULT_COND_DROP);
                crate::error::check_range("cond-drop", p, (0.0, true), (1.0, false))?;
                Some((p, null as u32))
            }
        };
        Ok(ImageTask {
            cond,
            order: EpochSampler::new(order_seed, data.len())?,
            data,
            unet,
            unet_config,
            schedule: config.schedule()?,
            prediction: config.prediction,
            batch: config.batch,
            flip: config.flip,
            device: device.clone(),
            grid,
            shard: Shard::WHOLE,
            quality: None,
        })
    }

    /// The training images.
    pub fn data(&self) -> &ImageDataset {
        &self.data
    }

    /// Measure samples while training (`train --fid-every`). The sampler and its steps are
    /// checked here, so that a setting it refuses fails before training, not at the first
    /// measurement.
    pub fn set_quality(&mut self, quality: Option<QualityEval>) -> Result<()> {
        if let Some(q) = &quality {
            use crate::samplers::registry::Opt;
            let kind = crate::samplers::SamplerKind::from_name(&q.sampler)?;
            let takes = |o: Opt| kind.spec().options.contains(&o);
            let options = crate::samplers::SamplerOptions {
                steps: Some(q.steps.min(self.schedule.timesteps())),
                clip_x0: takes(Opt::ClipX0).then_some(1.0),
                spacing: takes(Opt::Spacing).then(|| "trailing".into()),
                ..Default::default()
            };
            crate::samplers::build_sampler(
                kind,
                &crate::process::Process::Ddpm(self.schedule.clone()),
                &options,
            )
            .map_err(|e| {
                Error::param(
                    "fid-sampler",
                    format!("{} with --fid-steps {}: {e}", q.sampler, q.steps),
                )
            })?;
        }
        self.quality = quality;
        Ok(())
    }

    /// The figure of [`QualityEval`] for the current EMA weights.
    fn measure(&self, ctx: &HookContext<'_>) -> Result<Option<EvalRecord>> {
        let Some(q) = &self.quality else {
            return Ok(None);
        };
        let start = std::time::Instant::now();
        let ema = unet::from_tensors(&self.unet_config, ctx.ema.tensor_map(), &self.device)?;
        let den = UNetDenoiser::new(ema, self.schedule.clone(), self.prediction);
        let classes: Option<Vec<Option<usize>>> =
            den.num_classes().map(|k| (0..q.n).map(|i| Some(i % k)).collect());
        let shape = self.data.shape();
        let images = sample_images(
            &den,
            &self.schedule,
            shape,
            q.n,
            &q.sampler,
            q.steps,
            q.seed,
            classes.as_deref().map(|c| (c, q.guidance_scale)),
            &self.device,
        )?;
        let values: Vec<f64> = images
            .flatten_all()?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?
            .into_iter()
            .map(|v| ((v + 1.0) / 2.0).clamp(0.0, 1.0))
            .collect();
        let net = DigitClassifier::bundled(&Device::Cpu)?;
        let (f, _) = net.describe(&values, shape, &Device::Cpu)?;
        let value = fid(&Statistics::of_features(&f, FEATURES, "samples")?, &q.reference)?.value;
        Ok(Some(EvalRecord {
            metric: "fd_digit_features".into(),
            value,
            real: q.floor,
            n_samples: q.n,
            sampler: format!("{} {}", q.sampler, q.steps),
            seconds: start.elapsed().as_secs_f64(),
        }))
    }

    /// The simple loss of one batch: of this process's share of it, as its contribution to the
    /// global batch's mean (see the module docs for the draws).
    fn batch_loss(&mut self, rng: &mut Rng) -> Result<Tensor> {
        // every rank walks the same global order and keeps its share
        let global = self.order.next_batch(self.batch);
        let (first, b) = self.shard.range(self.batch);
        let idx = &global[first..first + b];
        let step_seed = rng.next_u64();
        let mut streams: Vec<Rng> = (first..first + b)
            .map(|i| Rng::stream(step_seed, i as u64))
            .collect();
        // the U-Net's dropout masks: rows first.. of the whole batch's masks
        let mut masks = Rng::stream(step_seed, DROPOUT_STREAM).for_rows(first as u64);
        // per sample, in this order: flip, t, eps, label dropout
        let x0 = if self.flip {
            let rows = idx
                .iter()
                .zip(streams.iter_mut())
                .map(|(&i, r)| self.data.batch(&[i], Some(r)))
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&rows, 0)?
        } else {
            self.data.batch(idx, None)?
        }
        .to_device(&self.device)?;
        let t_max = self.schedule.timesteps() as u64;
        let t_index: Vec<usize> = streams.iter_mut().map(|r| r.below(t_max) as usize).collect();
        let [c, h, w] = self.data.shape();
        let eps: Vec<f32> = streams
            .iter_mut()
            .flat_map(|r| r.normal_vec_f32(c * h * w))
            .collect();
        let eps = Tensor::from_vec(eps, (b, c, h, w), &self.device)?;
        let x_t = q_sample(&self.schedule, &x0, &t_index, &eps)?;
        let timesteps: Vec<f32> = t_index.iter().map(|&i| i as f32).collect();
        let timesteps = Tensor::from_vec(timesteps, b, &self.device)?;
        let out = match self.cond {
            None => self.unet.forward_train(&x_t, &timesteps, &mut masks)?,
            Some((p, null)) => {
                // labels, each dropped to the null class with probability p (drawn from the
                // sample's stream after its noise)
                let mut labels = self
                    .data
                    .batch_labels(idx)
                    .ok_or_else(|| Error::param("data", "the images have no labels"))?;
                for (l, r) in labels.iter_mut().zip(streams.iter_mut()) {
                    if r.uniform() < p {
                        *l = null;
                    }
                }
                let labels = Tensor::from_vec(labels, b, &self.device)?;
                self.unet
                    .forward_t(&x_t, &timesteps, Some(&labels), Some(&mut masks))?
            }
        };
        let target = match self.prediction {
            Prediction::Eps => eps,
            Prediction::X0 => x0,
            Prediction::V => {
                let a: Vec<f64> = t_index.iter().map(|&i| self.schedule.sqrt_alpha_bar[i]).collect();
                let s: Vec<f64> = t_index
                    .iter()
                    .map(|&i| self.schedule.sqrt_one_minus_alpha_bar[i])
                    .collect();
                (eps.broadcast_mul(&per_sample(&a, &x0)?)? - x0.broadcast_mul(&per_sample(&s, &x0)?)?)?
            }
        };
        let loss = (out - target)?.sqr()?.mean_all()?;
        if self.shard.size == 1 {
            return Ok(loss);
        }
        // this share's part of the global mean: (B / K) / B of its own mean
        Ok((loss * (1.0 / self.shard.size as f64))?)
    }

    /// Draws the hook's sample grid with the EMA weights into `run_dir/samples/`.
    fn draw_grid(&self, ctx: &HookContext<'_>) -> Result<()> {
        if self.grid.n == 0 {
            return Ok(());
        }
        let ema = unet::from_tensors(&self.unet_config, ctx.ema.tensor_map(), &self.device)?;
        let den = UNetDenoiser::new(ema, self.schedule.clone(), self.prediction);
        let dir = ctx.run_dir.join("samples");
        let step_file = dir.join(format!("step_{:07}.png", ctx.step));
        match den.num_classes() {
            None => {
                let images = sample_images(
                    &den,
                    &self.schedule,
                    self.data.shape(),
                    self.grid.n,
                    "ddpm",
                    self.grid.steps,
                    self.grid.seed,
                    None,
                    &self.device,
                )?;
                let cols = (self.grid.n as f64).sqrt().ceil() as usize;
                crate::image_out::save_grid(&step_file, &images, cols)?;
                crate::image_out::save_grid(&ctx.run_dir.join("samples.png"), &images, cols)?;
            }
            Some(k) => {
                // one row per class
                let per = self.grid.n.div_ceil(k).max(4);
                let classes: Vec<Option<usize>> = (0..k * per).map(|i| Some(i / per)).collect();
                let images = sample_images(
                    &den,
                    &self.schedule,
                    self.data.shape(),
                    classes.len(),
                    "ddpm",
                    self.grid.steps,
                    self.grid.seed,
                    Some((&classes, self.grid.guidance_scale)),
                    &self.device,
                )?;
                let names = self.data.class_names();
                let labels: Vec<String> = (0..k)
                    .map(|c| {
                        names
                            .and_then(|n| n.get(c).cloned())
                            .unwrap_or_else(|| c.to_string())
                    })
                    .collect();
                let title = format!("step {}, guidance scale {}", ctx.step, self.grid.guidance_scale);
                crate::image_out::save_labelled_grid(&step_file, &images, per, &labels, &title)?;
                crate::image_out::save_labelled_grid(
                    &ctx.run_dir.join("samples.png"),
                    &images,
                    per,
                    &labels,
                    &title,
                )?;
            }
        }
        Ok(())
    }
}

/// `n` images from `den` by ancestral DDPM sampling respaced to `steps` steps (trailing
/// spacing, fixed-small variance, x_0 clipped to [-1, 1]), seeded: the `diffuse sample` default
/// (README, "Sampling defaults"). `guided = Some((classes, w))`: one class per image (`n` of
/// them) at guidance scale `w`.
#[allow(clippy::too_many_arguments)]
pub fn sample_images(
    den: &UNetDenoiser,
    schedule: &Schedule,
    shape: [usize; 3],
    n: usize,
    sampler: &str,
    steps: usize,
    seed: u64,
    guided: Option<(&[Option<usize>], f64)>,
    device: &Device,
) -> Result<Tensor> {
    use crate::process::Process;
    use crate::samplers::registry::Opt;
    use crate::samplers::{build_sampler, sample_batched, NoObserver, SamplerKind, SamplerOptions};
    let process = Process::Ddpm(schedule.clone());
    let kind = SamplerKind::from_name(sampler)?;
    let takes = |o: Opt| kind.spec().options.contains(&o);
    let options = SamplerOptions {
        steps: Some(steps.min(schedule.timesteps())),
        // the data range, as `diffuse sample` does by default (where the sampler clips)
        clip_x0: takes(Opt::ClipX0).then_some(1.0),
        spacing: takes(Opt::Spacing).then(|| "trailing".into()),
        ..Default::default()
    };
    let sampler = build_sampler(kind, &process, &options)?;
    let out = match guided {
        None => sample_batched(
            sampler.as_ref(),
            den,
            n,
            &shape,
            seed,
            n,
            DType::F32,
            device,
            &mut NoObserver,
        )?,
        Some((classes, w)) => crate::samplers::sample_batched_guided(
            sampler.as_ref(),
            den,
            classes,
            w,
            &shape,
            seed,
            n,
            None,
            DType::F32,
            device,
            &mut NoObserver,
        )?,
    };
    Ok(out.x)
}

impl TrainTask for ImageTask {
    fn loss(&mut self, _step: u64, rng: &mut Rng) -> Result<Tensor> {
        self.batch_loss(rng)
    }

    fn data_state(&self) -> Value {
        serde_json::to_value(self.order.state()).unwrap_or(Value::Null)
    }

    fn set_shard(&mut self, shard: Shard) -> Result<()> {
        shard.check(self.batch)?;
        self.shard = shard;
        Ok(())
    }

    fn restore_data_state(&mut self, state: &Value) -> Result<()> {
        let s: SamplerState = serde_json::from_value(state.clone())
            .map_err(|e| Error::param("data order", format!("cannot read the saved data order: {e}")))?;
        self.order = EpochSampler::restore(s, self.data.len())?;
        Ok(())
    }

    fn hook(&mut self, ctx: &HookContext<'_>) -> Result<()> {
        self.draw_grid(ctx)
    }

    fn evaluate(&mut self, ctx: &HookContext<'_>) -> Result<Option<EvalRecord>> {
        self.measure(ctx)
    }
}

/// Seeds of an image run's independent streams, all derived from the one `--seed`.
#[derive(Clone, Copy, Debug)]
pub struct ImageSeeds {
    /// Weight initialisation.
    pub init: u64,
    /// Data order.
    pub order: u64,
    /// Sample grids.
    pub grid: u64,
}

impl ImageSeeds {
    /// Streams 1, 2, 3 of `seed` (the trainer's own generator uses `seed` itself).
    pub fn from_seed(seed: u64) -> Self {
        let mut r = Rng::stream(seed, 0x1_1A6E);
        ImageSeeds {
            init: r.next_u64(),
            order: r.next_u64(),
            grid: r.next_u64(),
        }
    }
}

/// An image run, ready to train.
pub struct ImageRun {
    /// The loop driver.
    pub trainer: Trainer,
    /// The model and its data.
    pub task: ImageTask,
    /// The model's variables.
    pub varmap: VarMap,
}

impl ImageRun {
    /// Builds the U-Net (weights seeded from the trainer's seed) and starts a fresh run in
    /// `run_dir`, or resumes the run there when `resume` (then the configs must match).
    pub fn setup(
        run_dir: &Path,
        data: ImageDataset,
        config: &ImageTrainConfig,
        trainer_config: &TrainerConfig,
        grid: GridSampling,
        resume: bool,
        device: &Device,
    ) -> Result<Self> {
        let comm = crate::train::distributed::single_process();
        Self::setup_on(run_dir, data, config, trainer_config, grid, resume, device, comm)
    }

    /// [`ImageRun::setup`] as one rank of a data-parallel run over `comm`.
    #[allow(clippy::too_many_arguments)]
    pub fn setup_on(
        run_dir: &Path,
        data: ImageDataset,
        config: &ImageTrainConfig,
        trainer_config: &TrainerConfig,
        grid: GridSampling,
        resume: bool,
        device: &Device,
        comm: Rc<dyn Collective>,
    ) -> Result<Self> {
        let seeds = ImageSeeds::from_seed(trainer_config.seed);
        let (net, varmap) = unet::init_params(&config.unet_config()?, seeds.init, device)?;
        let mut task = ImageTask::new(data, net, config, seeds.order, grid, device)?;
        // a batch the ranks cannot share is refused before anything is written
        task.set_shard(Shard {
            rank: comm.rank(),
            size: comm.size(),
        })?;
        let task_config = serde_json::to_value(config)
            .map_err(|e| Error::Numerical(format!("cannot encode the image config: {e}")))?;
        let trainer = if resume {
            Trainer::resume_on(run_dir, &varmap, trainer_config, &task_config, &mut task, comm)?
        } else {
            Trainer::new_on(run_dir, &varmap, trainer_config, &task_config, comm)?
        };
        Ok(ImageRun {
            trainer,
            task,
            varmap,
        })
    }
}

/// A trained image model read back from a run directory (or its checkpoint directory).
pub struct TrainedImageModel {
    /// The run's model config.
    pub config: ImageTrainConfig,
    /// The network with the chosen weights.
    pub unet: UNet,
    /// The step of the checkpoint.
    pub step: u64,
    /// The checkpoint directory read.
    pub checkpoint: PathBuf,
}

/// Loads the model of an image run: the EMA weights when `use_ema`, else the raw weights.
pub fn load_trained(dir: &Path, use_ema: bool, device: &Device) -> Result<TrainedImageModel> {
    let ckpt = checkpoint::locate(dir)?;
    let state = checkpoint::read_state(&ckpt)?;
    let task = state
        .config
        .get("task")
        .cloned()
        .ok_or_else(|| Error::bad_input(ckpt.join(checkpoint::STATE_FILE), "has no 'task' config"))?;
    let config: ImageTrainConfig = serde_json::from_value(task).map_err(|e| {
        Error::bad_input(
            ckpt.join(checkpoint::STATE_FILE),
            format!("is not an image-model checkpoint (its task config does not parse: {e}); a 2-D toy model is sampled with `diffuse toy sample`"),
        )
    })?;
    let file = if use_ema {
        checkpoint::EMA_FILE
    } else {
        checkpoint::MODEL_FILE
    };
    // a bad field of the saved run config is an error about state.json; a mismatch between
    // that config and the weights, about the weights file
    let state_file = ckpt.join(checkpoint::STATE_FILE);
    let in_file = |path: &Path, prefix: &str, e: Error| match e {
        Error::InvalidParameter { name, message } => {
            Error::bad_input(path, format!("{prefix}{name}: {message}"))
        }
        other => other,
    };
    let unet_config = config
        .unet_config()
        .map_err(|e| in_file(&state_file, "config.task.", e))?;
    config
        .schedule()
        .map_err(|e| in_file(&state_file, "config.task.", e))?;
    let tensors = checkpoint::read_f32_tensors(&ckpt, file, device)?;
    let unet = unet::from_tensors(&unet_config, tensors, device).map_err(|e| {
        in_file(
            &ckpt.join(file),
            &format!("does not match the U-Net of {}: ", checkpoint::STATE_FILE),
            e,
        )
    })?;
    Ok(TrainedImageModel {
        config,
        unet,
        step: state.step,
        checkpoint: ckpt,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_detects_changes() {
        let a = checksum_f32(&[0.0, 1.0, -1.0]);
        assert_eq!(a, checksum_f32(&[0.0, 1.0, -1.0]));
        assert_ne!(a, checksum_f32(&[0.0, 1.0, -0.99]));
        assert_eq!(a.len(), 16);
    }

    #[test]
    fn seeds_are_distinct_and_reproducible() {
        let a = ImageSeeds::from_seed(5);
        let b = ImageSeeds::from_seed(5);
        assert_eq!((a.init, a.order, a.grid), (b.init, b.order, b.grid));
        assert_ne!(a.init, a.order);
        assert_ne!(a.init, ImageSeeds::from_seed(6).init);
    }
}
