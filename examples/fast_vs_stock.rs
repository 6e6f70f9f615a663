//! The same image training run twice, with the fast CPU kernels and with candle's stock ops
//! (`diffuse::ops::set_fast_kernels(false)`): same seed, same data, same network
//! (`diffuse::train::image`, the trainer `diffuse train` uses). Prints both loss sequences, their
//! relative differences and the time per step of each.
//!
//! ```text
//! cargo run --release --example fast_vs_stock -- [--preset demo] [--steps 100] [--batch 16]
//!     [--seed 0] [--threads 2] [--size 28] [--json]
//! ```
//!
//! The two runs do the same arithmetic in different orders (GEMM blocking, fused kernels,
//! 16-lane sums, a polynomial `exp`), so single steps agree to about 1e-6 relative and the
//! difference grows as training amplifies it; what matters is that the curves stay together.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use diffuse::data::{self, DataSpec, Split};
use diffuse::denoiser::Prediction;
use diffuse::nets::UNetConfig;
use diffuse::ops;
use diffuse::schedule::BetaSchedule;
use diffuse::train::image::{checksum_f32, GridSampling, ImageRun, ImageTrainConfig};
use diffuse::train::{AdamWConfig, Budget, EmaConfig, Interrupt, LoopOptions, TrainerConfig};
use serde_json::json;

struct Args {
    preset: String,
    steps: u64,
    batch: usize,
    seed: u64,
    threads: usize,
    size: usize,
    json: bool,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        preset: "demo".into(),
        steps: 100,
        batch: 16,
        seed: 0,
        threads: 2,
        size: 28,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--preset" => a.preset = value()?,
            "--steps" => a.steps = value()?.parse().context("--steps")?,
            "--batch" => a.batch = value()?.parse().context("--batch")?,
            "--seed" => a.seed = value()?.parse().context("--seed")?,
            "--threads" => a.threads = value()?.parse().context("--threads")?,
            "--size" => a.size = value()?.parse().context("--size")?,
            "--json" => a.json = true,
            "-h" | "--help" => {
                println!("fast_vs_stock [--preset demo] [--steps 100] [--batch 16] [--seed 0] [--threads 2] [--size 28] [--json]");
                std::process::exit(0);
            }
            other => bail!("unknown flag {other} (try --help)"),
        }
    }
    Ok(a)
}

/// The losses of `steps` training steps and the seconds they took.
fn train(a: &Args, fast: bool) -> Result<(Vec<f64>, f64)> {
    ops::set_fast_kernels(fast);
    let spec = DataSpec {
        data: "mnist5k".into(),
        format: None,
        split: Split::Train,
        image_size: (a.size != 28).then_some(a.size),
        channels: None,
    };
    let ds = data::load(&spec)?;
    let [c, h, _] = ds.shape();
    let config = ImageTrainConfig {
        n_images: ds.len(),
        data_checksum: checksum_f32(ds.pixels()),
        data: spec,
        preset: a.preset.clone(),
        unet: UNetConfig::preset(&a.preset, c, h)?.to_json(),
        schedule: BetaSchedule::from_name("linear")?,
        timesteps: 1000,
        prediction: Prediction::Eps,
        batch: a.batch,
        flip: false,
        cond_drop: None,
    };
    let trainer = TrainerConfig {
        seed: a.seed,
        optimizer: AdamWConfig::default(),
        ema: EmaConfig {
            decay: 0.995,
            warmup: true,
        },
    };
    let dir = std::env::temp_dir().join(format!(
        "fast_vs_stock_{}_{}",
        std::process::id(),
        if fast { "fast" } else { "stock" }
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let grid = GridSampling {
        n: 0,
        steps: 0,
        seed: 0,
        guidance_scale: 1.0,
    };
    let mut run = ImageRun::setup(&dir, ds, &config, &trainer, grid, false, &Device::Cpu)?;
    let options = LoopOptions {
        checkpoint_every: 0,
        hook_every: 0,
        eval_every: 0,
        progress: false,
    };
    let budget = Budget {
        steps: Some(a.steps),
        minutes: None,
    };
    let t0 = Instant::now();
    run.trainer
        .run(&mut run.task, &budget, &options, &Interrupt::new())?;
    let seconds = t0.elapsed().as_secs_f64();
    let losses = run.trainer.metrics().iter().map(|r| r.loss).collect();
    let _ = std::fs::remove_dir_all(&dir);
    Ok((losses, seconds))
}

fn main() -> Result<()> {
    let a = parse_args()?;
    ops::tune_allocator();
    std::env::set_var("RAYON_NUM_THREADS", a.threads.to_string());
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(a.threads)
        .build_global();
    let (fast, t_fast) = train(&a, true)?;
    let (stock, t_stock) = train(&a, false)?;
    let rel: Vec<f64> = fast
        .iter()
        .zip(&stock)
        .map(|(f, s)| (f - s).abs() / s.abs().max(1e-12))
        .collect();
    let max_rel = rel.iter().copied().fold(0.0, f64::max);
    let first_10 = rel.iter().take(10).copied().fold(0.0, f64::max);
    if !a.json {
        println!("step  fast loss     stock loss    rel. diff");
        for (i, ((f, s), r)) in fast.iter().zip(&stock).zip(&rel).enumerate() {
            println!("{:>4}  {f:.8}  {s:.8}  {r:.2e}", i + 1);
        }
        println!(
            "max relative difference: {max_rel:.3e} (first 10 steps: {first_10:.3e}); {:.1} ms/step fast, {:.1} ms/step stock",
            1e3 * t_fast / a.steps as f64,
            1e3 * t_stock / a.steps as f64
        );
    }
    println!(
        "{}",
        json!({
            "preset": a.preset, "steps": a.steps, "batch": a.batch, "seed": a.seed, "threads": a.threads,
            "fast": fast, "stock": stock, "max_rel_diff": max_rel, "max_rel_diff_first_10": first_10,
            "ms_per_step_fast": 1e3 * t_fast / a.steps as f64,
            "ms_per_step_stock": 1e3 * t_stock / a.steps as f64,
        })
    );
    Ok(())
}
