//! Flags shared by several commands.

use std::path::PathBuf;

use clap::Args;

use diffuse::data::{DataSpec, Format, Split};
use diffuse::pipeline::{self, ImageModel};
use diffuse::samplers::ddpm::Variance;
use diffuse::samplers::ode::OdeVariable;
use diffuse::samplers::pc::Predictor;
use diffuse::samplers::registry::Opt;
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
    #[arg(long, help = steps_help())]
    pub steps: Option<usize>,
    #[arg(long, help = Opt::Eta.help())]
    pub eta: Option<f64>,
    #[arg(long, visible_alias = "timestep-spacing", help = Opt::Spacing.help())]
    pub spacing: Option<String>,
    #[arg(long, help = Opt::Variance.help())]
    pub variance: Option<String>,
    #[arg(long, value_name = "C", help = Opt::ClipX0.help())]
    pub clip_x0: Option<f64>,
    #[arg(long, help = Opt::Snr.help())]
    pub snr: Option<f64>,
    #[arg(long, help = Opt::CorrectorSteps.help())]
    pub corrector_steps: Option<usize>,
    #[arg(long, help = Opt::Predictor.help())]
    pub predictor: Option<String>,
    #[arg(long, help = Opt::Rtol.help())]
    pub rtol: Option<f64>,
    #[arg(long, help = Opt::Atol.help())]
    pub atol: Option<f64>,
    #[arg(long, help = Opt::Churn.help())]
    pub churn: Option<f64>,
    #[arg(long, value_name = "t|sigma", help = Opt::OdeVariable.help())]
    pub ode_variable: Option<String>,
    #[arg(long, help = Opt::Order.help())]
    pub order: Option<usize>,
    #[arg(long, help = Opt::SolverType.help())]
    pub solver_type: Option<String>,
    #[arg(long, value_name = "true|false", help = Opt::Multistep.help())]
    pub multistep: Option<bool>,
    #[arg(long, help = Opt::Sigmas.help())]
    pub sigmas: Option<String>,
    #[arg(long, value_name = "zero|sigma-min", help = Opt::FinalSigma.help())]
    pub final_sigma: Option<String>,
    #[arg(long, value_name = "true|false", help = Opt::LowerOrderFinal.help())]
    pub lower_order_final: Option<bool>,
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "true|false", help = Opt::Thresholding.help())]
    pub thresholding: Option<bool>,
    #[arg(long, value_name = "true|false", help = Opt::Corrector.help())]
    pub corrector: Option<bool>,
}

/// `--steps`' help: every sampler's default from the registry.
fn steps_help() -> String {
    let defaults: Vec<String> = SamplerKind::all()
        .map(|k| format!("{} {}", k.name(), k.spec().default_steps_doc))
        .collect();
    format!(
        "Number of sampler steps (ddpm: K < T respaces the chain). Defaults: {}; an adaptive sampler chooses its own and ignores this.",
        defaults.join("; ")
    )
}

impl SamplerFlags {
    /// The library's options for sampler `kind` (flags that do not apply to it are an error there).
    pub fn options(&self, kind: SamplerKind) -> anyhow::Result<SamplerOptions> {
        if kind.adaptive() && self.steps.is_some() {
            eprintln!("note: ode-rk45 chooses its own steps from --rtol/--atol; --steps is ignored");
        }
        Ok(SamplerOptions {
            steps: if kind.adaptive() { None } else { self.steps },
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
            order: self.order,
            solver_type: self.solver_type.clone(),
            multistep: self.multistep,
            sigmas: self.sigmas.clone(),
            final_sigma: self.final_sigma.clone(),
            lower_order_final: self.lower_order_final,
            thresholding: self.thresholding,
            corrector: self.corrector,
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
    /// Loads the model (`use_ema` applies to `--checkpoint`). With `verbose`, the fields of a
    /// diffusers folder's config files that the loader ignored are listed on stderr
    /// (`config.json: ignored fields: a, b`).
    pub fn load(
        &self,
        use_ema: bool,
        scheduler_config: Option<&std::path::Path>,
        verbose: bool,
    ) -> anyhow::Result<ImageModel> {
        let device = super::device()?;
        if let (true, Some(dir)) = (verbose, &self.diffusers) {
            for (file, fields) in diffuse::nets::diffusers::ignored_fields(dir, scheduler_config)? {
                eprintln!("{}: ignored fields: {}", file.display(), fields.join(", "));
            }
        }
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
