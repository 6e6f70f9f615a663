//! `diffuse export`: write a trained model in another library's layout.
//!
//! `diffuse export --checkpoint RUN --format diffusers --out DIR` writes a diffusers pipeline
//! folder (`unet/`, `scheduler/`, `model_index.json`) that `DDPMPipeline.from_pretrained(DIR)`
//! and `UNet2DModel.from_pretrained(DIR, subfolder="unet")` load, and that
//! `diffuse sample --diffusers DIR` / `diffuse eval nll --diffusers DIR` read back.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use serde_json::json;

use diffuse::nets::scheduler_config::DiffusersBetaSchedule;
use diffuse::pipeline;

/// Output layouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// Hugging Face diffusers: a `DDPMPipeline` folder with a `UNet2DModel` and a `DDPMScheduler`.
    Diffusers,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// A `diffuse train` run directory (or its checkpoint/ directory).
    #[arg(long, value_name = "DIR")]
    checkpoint: PathBuf,
    /// Output layout.
    #[arg(long, value_enum, default_value = "diffusers")]
    format: ExportFormat,
    /// Output folder; must not exist or be empty (unless --force).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Export the raw weights instead of the EMA weights.
    #[arg(long)]
    no_ema: bool,
    /// Write into a non-empty --out folder (files of the same name are replaced).
    #[arg(long)]
    force: bool,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(a: ExportArgs) -> anyhow::Result<()> {
    match a.format {
        ExportFormat::Diffusers => {}
    }
    if a.out.exists() {
        if !a.out.is_dir() {
            return super::usage(format!(
                "--out {}: exists and is not a directory",
                a.out.display()
            ));
        }
        let non_empty = std::fs::read_dir(&a.out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true);
        if non_empty && !a.force {
            return super::usage(format!(
                "--out {}: the folder is not empty (choose a new folder, or pass --force)",
                a.out.display()
            ));
        }
    }
    let s = pipeline::export_checkpoint(&a.checkpoint, !a.no_ema, &a.out)?;
    let beta_schedule = match (&s.scheduler.trained_betas, s.scheduler.beta_schedule) {
        (Some(_), _) => "trained_betas",
        (None, DiffusersBetaSchedule::Linear) => "linear",
        (None, DiffusersBetaSchedule::ScaledLinear) => "scaled_linear",
        (None, DiffusersBetaSchedule::SquaredcosCapV2) => "squaredcos_cap_v2",
        (None, DiffusersBetaSchedule::Sigmoid) => "sigmoid",
    };
    if a.json {
        println!(
            "{}",
            json!({
                "out": a.out.display().to_string(),
                "format": "diffusers",
                "checkpoint": s.checkpoint.display().to_string(),
                "step": s.step,
                "weights": s.weights,
                "parameters": s.parameters,
                "beta_schedule": beta_schedule,
                "num_train_timesteps": s.scheduler.num_train_timesteps,
                "prediction_type": s.scheduler.prediction_type.name(),
            })
        );
    } else {
        println!(
            "wrote {} (diffusers DDPMPipeline): {} parameters, {} weights of step {}, scheduler {} (T = {}, predicts {})",
            a.out.display(),
            s.parameters,
            s.weights,
            s.step,
            beta_schedule,
            s.scheduler.num_train_timesteps,
            s.scheduler.prediction_type.name()
        );
    }
    Ok(())
}
