//! Runs a diffusers model folder the way diffusers' pipelines do, for the speed comparison with
//! `bench/diffusers_ddim.py` / `bench/diffusers_unet_forward.py` and the conformance check
//! `tests/fixtures/diffusers/check_diffuse_export.py` (until `diffuse sample --diffusers` lands).
//!
//! ```text
//! # U-Net forward at batch 16: median seconds per call
//! cargo run --release --example diffusers_sample -- forward --dir /tmp/cifar10 --batch 16 --threads 2
//! # DDIM as DDIMPipeline (the folder's scheduler config, eta 0, 50 steps), 16 samples
//! cargo run --release --example diffusers_sample -- ddim --dir /tmp/cifar10 --steps 50 --n 16 --threads 2
//! # the same from a given x_T (safetensors tensor "x_t"), writing the result ("sample")
//! cargo run --release --example diffusers_sample -- ddim --dir D --x-t xt.safetensors --out ours.safetensors
//! ```
//!
//! Each prints one JSON object (`seconds`, `steps`, `n`, `threads`, ...) on stdout.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use clap::{Parser, Subcommand};
use diffuse::pipeline::load_diffusers;
use diffuse::rng::{NoiseStreams, Rng};
use diffuse::samplers::diffusers::from_scheduler_config;
use diffuse::samplers::{draw_prior, NoObserver, Sampler, SamplerKind};
use serde_json::json;

#[derive(Parser)]
#[command(about = "Time and run a diffusers folder as diffusers' pipelines do")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
    /// Worker threads (rayon's pool; default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Time the U-Net forward pass on a seeded batch.
    Forward {
        /// The model or pipeline folder.
        #[arg(long)]
        dir: PathBuf,
        /// Batch size.
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Timed calls (after one warm-up call).
        #[arg(long, default_value_t = 5)]
        reps: usize,
    },
    /// DDIM sampling as `DDIMPipeline`: the folder's scheduler config, `from_scheduler_config`.
    Ddim {
        /// The model or pipeline folder.
        #[arg(long)]
        dir: PathBuf,
        /// Inference steps.
        #[arg(long, default_value_t = 50)]
        steps: usize,
        /// Number of samples (one batch).
        #[arg(long, default_value_t = 16)]
        n: usize,
        /// DDIM eta.
        #[arg(long, default_value_t = 0.0)]
        eta: f64,
        /// Seed of x_T and of the noise (ignored for x_T when --x-t is given).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Start from this x_T (a safetensors file with a tensor "x_t" [n, C, H, W]).
        #[arg(long)]
        x_t: Option<PathBuf>,
        /// Write the samples here (safetensors, tensor "sample", before any [0, 1] mapping).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(n) = args.threads {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
    }
    let threads = rayon::current_num_threads();
    let dev = Device::Cpu;
    match args.cmd {
        Cmd::Forward { dir, batch, reps } => {
            let m = load_diffusers(&dir, None, &dev).with_context(|| format!("loading {}", dir.display()))?;
            let [c, h, w] = m.shape;
            let x = Rng::new(1).randn(&[batch, c, h, w], &dev)?;
            let t = Tensor::from_vec(vec![500f32; batch], batch, &dev)?;
            let unet = &m.denoiser.unet;
            unet.forward(&x, &t)?; // warm-up
            let mut times = Vec::with_capacity(reps);
            for _ in 0..reps {
                let start = Instant::now();
                let y = unet.forward(&x, &t)?;
                y.sum_all()?.to_scalar::<f32>()?;
                times.push(start.elapsed().as_secs_f64());
            }
            let mut sorted = times.clone();
            sorted.sort_by(f64::total_cmp);
            let median = sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN);
            let params = diffuse::nets::unet::num_parameters(m.denoiser.unet.config())?;
            println!(
                "{}",
                json!({"impl": "diffuse", "what": "unet_forward", "seconds": median, "all_seconds": times,
                       "batch": batch, "threads": threads, "parameters": params, "shape": [c, h, w]})
            );
        }
        Cmd::Ddim {
            dir,
            steps,
            n,
            eta,
            seed,
            x_t,
            out,
        } => {
            let m = load_diffusers(&dir, None, &dev).with_context(|| format!("loading {}", dir.display()))?;
            let cfg = m.scheduler.clone().unwrap_or_default();
            let sampler = from_scheduler_config(
                &cfg,
                m.schedule(),
                SamplerKind::from_name("ddim").unwrap(),
                steps,
                Some(eta),
            )?;
            let [c, h, w] = m.shape;
            let mut noise = NoiseStreams::new(seed, 0, n);
            let x_t = match x_t {
                Some(p) => {
                    let t = candle_core::safetensors::load(&p, &dev)?;
                    let x = t
                        .get("x_t")
                        .with_context(|| format!("{}: no tensor x_t", p.display()))?
                        .to_dtype(DType::F32)?;
                    anyhow::ensure!(
                        x.dims() == [n, c, h, w],
                        "x_t has shape {:?}, expected {:?}",
                        x.dims(),
                        [n, c, h, w]
                    );
                    x
                }
                None => draw_prior(&sampler, &[c, h, w], &mut noise, DType::F32, &dev)?,
            };
            let start = Instant::now();
            let res = sampler.sample(&m.denoiser, x_t, &mut noise, &mut NoObserver)?;
            res.x.sum_all()?.to_scalar::<f32>()?;
            let seconds = start.elapsed().as_secs_f64();
            if let Some(p) = &out {
                let sample = res.x.to_dtype(DType::F32)?.contiguous()?;
                candle_core::safetensors::save(
                    &std::collections::HashMap::from([("sample".to_string(), sample)]),
                    p,
                )?;
            }
            println!(
                "{}",
                json!({"impl": "diffuse", "what": "ddim", "seconds": seconds, "steps": steps, "n": n, "eta": eta,
                       "threads": threads, "nfe": res.nfe, "timesteps": sampler.chain().steps.iter().filter_map(|s| s.index).collect::<Vec<_>>()})
            );
        }
    }
    Ok(())
}
