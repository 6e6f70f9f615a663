//! A trained image model ready to sample from or to measure: a `diffuse` training run's
//! checkpoint or a diffusers model folder, both behind [`UNetDenoiser`] (one U-Net code path).

use std::path::Path;

use candle_core::Device;

use crate::data::DataSpec;
use crate::error::{Error, Result};
use crate::nets::diffusers;
use crate::nets::scheduler_config::SchedulerConfig;
use crate::nets::UNetDenoiser;
use crate::schedule::Schedule;
use crate::train::image::load_trained;

/// An image model with everything sampling and evaluation need.
pub struct ImageModel {
    /// The network behind the `Denoiser` trait, with its training schedule and parameterisation.
    pub denoiser: UNetDenoiser,
    /// `[C, H, W]` of the images it makes.
    pub shape: [usize; 3],
    /// Where it came from (for reports).
    pub source: String,
    /// The scheduler config of a diffusers folder (its `clip_sample`, spacing, ... are the
    /// pipeline's defaults); `None` for our checkpoints.
    pub scheduler: Option<SchedulerConfig>,
    /// The data a `diffuse train` run was trained on (`None` for diffusers folders).
    pub data: Option<DataSpec>,
}

impl ImageModel {
    /// The schedule the model was trained with.
    pub fn schedule(&self) -> &Schedule {
        &self.denoiser.schedule
    }

    /// The x_0 clip the model's own pipeline applies in DDPM/DDIM steps: diffusers' `clip_sample`
    /// (`clip_sample_range`), none for our models (off unless asked, docs/STYLE.md).
    pub fn default_clip_x0(&self) -> Option<f64> {
        self.scheduler
            .as_ref()
            .and_then(|s| s.clip_sample.then_some(s.clip_sample_range))
    }
}

/// Loads a `diffuse train` run (or its `checkpoint/` directory): EMA weights when `use_ema`.
pub fn load_checkpoint(dir: &Path, use_ema: bool, device: &Device) -> Result<ImageModel> {
    let m = load_trained(dir, use_ema, device)?;
    let c = m.unet.config().in_channels;
    let [h, w] = m.unet.config().sample_size.ok_or_else(|| {
        Error::bad_input(
            m.checkpoint.join(crate::train::checkpoint::STATE_FILE),
            "config.task.unet has no sample_size (image size)",
        )
    })?;
    let schedule = m.config.schedule()?;
    Ok(ImageModel {
        source: format!(
            "{} (step {}, {} weights)",
            dir.display(),
            m.step,
            if use_ema { "EMA" } else { "raw" }
        ),
        denoiser: UNetDenoiser::new(m.unet, schedule, m.config.prediction),
        shape: [c, h, w],
        scheduler: None,
        data: Some(m.config.data.clone()),
    })
}

/// Loads a diffusers model folder (`unet/` + `scheduler/`, or a bare model folder). The
/// scheduler config comes from `scheduler_config` when given, else from the folder, else
/// diffusers' `DDPMScheduler` defaults (linear betas 1e-4..0.02, T = 1000, epsilon).
pub fn load_diffusers(dir: &Path, scheduler_config: Option<&Path>, device: &Device) -> Result<ImageModel> {
    let files = diffusers::locate(dir)?;
    let (config, unet) = diffusers::load_network(&files, device)?;
    // A given scheduler config replaces the folder's (which is then not read at all).
    let scheduler = match (scheduler_config, files.scheduler_config.as_deref()) {
        (Some(p), _) | (None, Some(p)) => SchedulerConfig::from_file(p)?,
        (None, None) => SchedulerConfig::default(),
    };
    let c = config.in_channels;
    let [h, w] = config
        .sample_size
        .ok_or_else(|| Error::bad_input(&files.config, "has no sample_size: the image size is unknown"))?;
    let schedule = scheduler.schedule()?;
    Ok(ImageModel {
        source: format!("{} (diffusers)", dir.display()),
        denoiser: UNetDenoiser::new(unet, schedule, scheduler.prediction_type),
        shape: [c, h, w],
        scheduler: Some(scheduler),
        data: None,
    })
}

/// What [`export_checkpoint`] wrote.
#[derive(Clone, Debug)]
pub struct ExportSummary {
    /// The checkpoint directory read.
    pub checkpoint: std::path::PathBuf,
    /// Its training step.
    pub step: u64,
    /// `EMA` or `raw` weights.
    pub weights: &'static str,
    /// Number of network parameters.
    pub parameters: usize,
    /// The scheduler config written (`scheduler/scheduler_config.json`).
    pub scheduler: SchedulerConfig,
}

/// Writes the model of a `diffuse train` run (`dir`: the run or its `checkpoint/`; EMA weights
/// when `use_ema`) as a diffusers pipeline folder `out`: `unet/` (`config.json` +
/// `diffusion_pytorch_model.safetensors`), `scheduler/scheduler_config.json` (a
/// `DDPMScheduler` describing the run's schedule, [`SchedulerConfig::for_training`]) and
/// `model_index.json`, which `UNet2DModel.from_pretrained(out, subfolder="unet")` and
/// `DDPMPipeline.from_pretrained(out)` load. Every file is written atomically.
pub fn export_checkpoint(dir: &Path, use_ema: bool, out: &Path) -> Result<ExportSummary> {
    let m = load_trained(dir, use_ema, &Device::Cpu)?;
    let file = if use_ema {
        crate::train::checkpoint::EMA_FILE
    } else {
        crate::train::checkpoint::MODEL_FILE
    };
    let tensors = crate::train::checkpoint::read_f32_tensors(&m.checkpoint, file, &Device::Cpu)?;
    let unet_config = m.config.unet_config()?;
    let scheduler =
        SchedulerConfig::for_training(&m.config.schedule, m.config.timesteps, m.config.prediction)?;
    diffusers::export_pipeline(out, &unet_config, &tensors, &scheduler)?;
    Ok(ExportSummary {
        checkpoint: m.checkpoint,
        step: m.step,
        weights: if use_ema { "EMA" } else { "raw" },
        parameters: tensors.values().map(|t| t.elem_count()).sum(),
        scheduler,
    })
}
