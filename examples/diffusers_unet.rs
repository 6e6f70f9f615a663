//! Moves U-Nets between `diffuse` and diffusers, for `tests/fixtures/diffusers/check_export.py`.
//!
//! ```text
//! # export a freshly initialised preset in diffusers' layout, with a reference input/output
//! cargo run --release --example diffusers_unet -- export --preset demo --channels 1 --size 28 --out /tmp/demo
//! python3 tests/fixtures/diffusers/check_export.py /tmp/demo
//!
//! # load a diffusers folder (e.g. made by make_fixtures.py --cifar10 DIR) and run it
//! cargo run --release --example diffusers_unet -- run --dir /tmp/cifar10
//! python3 tests/fixtures/diffusers/check_export.py /tmp/cifar10 --subfolder unet
//! ```
//!
//! Both write `io.safetensors` into the folder: `sample` [2, C, H, W] (seeded normal draws),
//! `timesteps` [2] = [3, 517.25] and our `output`, which check_export.py compares with
//! diffusers' `UNet2DModel` on the same weights.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::{Device, Tensor};
use clap::{Parser, Subcommand};
use diffuse::nets::{diffusers, unet, UNet, UNetConfig};
use diffuse::rng::Rng;

#[derive(Parser)]
#[command(about = "Export a diffuse U-Net to diffusers' layout, or run a diffusers U-Net")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Initialise a preset (seeded) and write it as a diffusers model folder plus io.safetensors.
    Export {
        /// demo, mnist, cifar10 or bench.
        #[arg(long, default_value = "demo")]
        preset: String,
        /// Image channels.
        #[arg(long, default_value_t = 1)]
        channels: usize,
        /// Image height and width.
        #[arg(long, default_value_t = 28)]
        size: usize,
        /// Seed of the weights and of the input.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
    },
    /// Load a diffusers folder, run it on a seeded input and write io.safetensors into it.
    Run {
        /// The model or pipeline folder.
        #[arg(long)]
        dir: PathBuf,
        /// Seed of the input.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

fn reference_io(
    net: &UNet,
    cfg: &UNetConfig,
    size: usize,
    seed: u64,
) -> anyhow::Result<HashMap<String, Tensor>> {
    let dev = Device::Cpu;
    let x = Rng::new(seed ^ 0xA11CE).randn(&[2, cfg.in_channels, size, size], &dev)?;
    let t = Tensor::new(&[3f32, 517.25], &dev)?;
    let start = Instant::now();
    let y = net.forward(&x, &t)?;
    eprintln!("forward, batch 2: {:.1} ms", start.elapsed().as_secs_f64() * 1e3);
    Ok(HashMap::from([
        ("sample".to_string(), x),
        ("timesteps".to_string(), t),
        ("output".to_string(), y),
    ]))
}

fn main() -> anyhow::Result<()> {
    match Args::parse().cmd {
        Cmd::Export {
            preset,
            channels,
            size,
            seed,
            out,
        } => {
            let cfg = UNetConfig::preset(&preset, channels, size)?;
            eprintln!("{}", unet::summary(&cfg, Some(size))?);
            let (net, varmap) = unet::init_params(&cfg, seed, &Device::Cpu)?;
            diffusers::export_unet_varmap(&out, &cfg, &varmap)?;
            let io = reference_io(&net, &cfg, size, seed)?;
            candle_core::safetensors::save(&io, out.join("io.safetensors"))?;
            eprintln!("wrote {}", out.display());
        }
        Cmd::Run { dir, seed } => {
            let start = Instant::now();
            let m =
                diffusers::load(&dir, &Device::Cpu).with_context(|| format!("loading {}", dir.display()))?;
            eprintln!("loaded in {:.2} s", start.elapsed().as_secs_f64());
            let size = m.config.sample_size.map(|s| s[0]).unwrap_or(32);
            eprintln!("{}", unet::summary(&m.config, Some(size))?);
            let io = reference_io(&m.unet, &m.config, size, seed)?;
            let model_dir = m.files.config.parent().map(PathBuf::from).unwrap_or(dir);
            candle_core::safetensors::save(&io, model_dir.join("io.safetensors"))?;
            eprintln!("wrote {}", model_dir.join("io.safetensors").display());
        }
    }
    Ok(())
}
