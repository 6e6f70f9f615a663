//! Flags shared by several commands.

use std::path::PathBuf;

use clap::Args;

use diffuse::data::{DataSpec, Format, Split};
use diffuse::pipeline::{self, ImageModel};
use diffuse::samplers::ddpm::Variance;
use diffuse::samplers::ode::OdeVariable;
use diffuse::samplers::pc::Predictor;
use diffuse::samplers::{SamplerKind, SamplerOptions};

/// Which images to use: `--data`, `--format`, `--split`, `--image-size`, `--channels`.
#[derive(Args, Debug, Clone)]
pub struct DataArgs {
    /// `mnist5k` (the bundled 5,000-image MNIST subset) or a directory: IDX files
    /// (MNIST/Fashion-MNIST), CIFAR-10 `.bin` batches, or a folder of PNG/JPEG images (detected).
    /// Default: mnist5k; for a trained run (`--checkpoint`, `--resume`, a run's samples) the
    /// data it was trained on.
    #[arg(long)]
    pub data: Option<String>,
    /// Override format detection: idx, cifar10 or folder.
    #[arg(long)]
    pub format: Option<Format>,
    /// Resize (shorter side) and centre-crop every image to this size (e.g. 16 for 16x16).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Convert images to 1 (grey) or 3 (RGB) channels (default: the source's own).
    #[arg(long)]
    pub channels: Option<usize>,
}

impl DataArgs {
    /// The dataset selection for `split`.
    pub fn spec(&self, split: Split) -> DataSpec {
        DataSpec {
            data: self.data.clone().unwrap_or_else(|| diffuse::data::BUNDLED.into()),
            format: self.format,
            split,
            image_size: self.image_size,
            channels: self.channels,
        }
    }

    /// The selection for `split`, taking `run` (the data a model was trained on) when neither
    /// `--data` nor `--format` is given; `--image-size` and `--channels` still override.
    pub fn spec_or(&self, split: Split, run: Option<&DataSpec>) -> DataSpec {
        match run {
            Some(r) if self.data.is_none() && self.format.is_none() => DataSpec {
                split,
                image_size: self.image_size.or(r.image_size),
                channels: self.channels.or(r.channels),
                ..r.clone()
            },
            _ => self.spec(split),
        }
    }
}

/// The samplers' options: `--steps`, `--eta`, `--spacing`, `--variance`, `--clip-x0`, `--snr`,
/// `--corrector-steps`, `--predictor`, `--rtol`, `--atol`, `--churn`, `--ode-variable`.
#[derive(Args, Debug, Clone, Default)]
pub struct SamplerFlags {
    /// Number of sampler steps (ddpm: K < T respaces the chain, default T, 100 in `diffuse sample`; ddim 100; SDE/PC/ode-euler 1000;
    /// ode-heun 200; edm-heun 18). ode-rk45 chooses its own steps and ignores this.
    #[arg(long)]
    pub steps: Option<usize>,
    /// DDIM's eta in [0, 1] (default 0: deterministic).
    #[arg(long)]
    pub eta: Option<f64>,
    /// Timestep spacing on the ddpm process (linspace [default], leading, trailing, quadratic)
    /// or time grid on continuous processes (uniform [default], log-snr [default for seed-ve], karras).
    #[arg(long)]
    pub spacing: Option<String>,
    /// DDPM variance: small (beta~, default) or large (beta).
    #[arg(long)]
    pub variance: Option<String>,
    /// Clip x_0 predictions to [-C, C] (ddpm, ddim; default off, except `diffuse sample` on a
    /// --checkpoint image model: 1, the data range, unless --no-clip-x0).
    #[arg(long, value_name = "C")]
    pub clip_x0: Option<f64>,
    /// PC: signal-to-noise ratio of the Langevin corrector (default 0.16).
    #[arg(long)]
    pub snr: Option<f64>,
    /// PC: Langevin corrector steps per time (default 1).
    #[arg(long)]
    pub corrector_steps: Option<usize>,
    /// PC: predictor, reverse-diffusion (default) or euler-maruyama.
    #[arg(long)]
    pub predictor: Option<String>,
    /// ode-rk45: relative tolerance (default 1e-5).
    #[arg(long)]
    pub rtol: Option<f64>,
    /// ode-rk45: absolute tolerance (default 1e-5).
    #[arg(long)]
    pub atol: Option<f64>,
    /// edm-heun: stochastic churn S_churn (default 0).
    #[arg(long)]
    pub churn: Option<f64>,
    /// ode-euler/ode-heun: take the steps in t or in sigma = (noise std)/alpha (default: sigma for
    /// ve and seed-ve, t otherwise).
    #[arg(long, value_name = "t|sigma")]
    pub ode_variable: Option<String>,
}

impl SamplerFlags {
    /// The library's options for sampler `kind` (flags that do not apply to it are an error there).
    pub fn options(&self, kind: SamplerKind) -> anyhow::Result<SamplerOptions> {
        if kind == SamplerKind::OdeRk45 && self.steps.is_some() {
            eprintln!("note: ode-rk45 chooses its own steps from --rtol/--atol; --steps is ignored");
        }
        Ok(SamplerOptions {
            steps: if kind == SamplerKind::OdeRk45 {
                None
            } else {
                self.steps
            },
            eta: self.eta,
            spacing: self.spacing.clone(),
            variance: self.variance.as_deref().map(Variance::from_name).transpose()?,
            clip_x0: self.clip_x0,
            snr: self.snr,
            corrector_steps: self.corrector_steps,
            predictor: self.predictor.as_deref().map(Predictor::from_name).transpose()?,
            rtol: self.rtol,
            atol: self.atol,
            churn: self.churn,
            ode_variable: self
                .ode_variable
                .as_deref()
                .map(OdeVariable::from_name)
                .transpose()?,
        })
    }
}

/// Which trained model: `--checkpoint DIR` (a `diffuse train` run) or `--diffusers DIR`.
#[derive(Args, Debug, Clone)]
#[group(required = true, multiple = false)]
pub struct ModelSource {
    /// A `diffuse train` run directory (or its checkpoint/ directory).
    #[arg(long, value_name = "DIR")]
    pub checkpoint: Option<PathBuf>,
    /// A diffusers model folder (`unet/config.json` + `diffusion_pytorch_model.safetensors`,
    /// and `scheduler/scheduler_config.json`; or a bare model folder).
    #[arg(long, value_name = "DIR")]
    pub diffusers: Option<PathBuf>,
}

impl ModelSource {
    /// Loads the model (`use_ema` applies to `--checkpoint`).
    pub fn load(
        &self,
        use_ema: bool,
        scheduler_config: Option<&std::path::Path>,
    ) -> anyhow::Result<ImageModel> {
        let device = super::device()?;
        Ok(match (&self.checkpoint, &self.diffusers) {
            (Some(dir), _) => {
                if scheduler_config.is_some() {
                    return super::usage("--scheduler-config applies to --diffusers models only");
                }
                pipeline::load_checkpoint(dir, use_ema, &device)?
            }
            (None, Some(dir)) => pipeline::load_diffusers(dir, scheduler_config, &device)?,
            (None, None) => return super::usage("give --checkpoint DIR or --diffusers DIR"),
        })
    }
}
