//! Times the parts of one toy training step (forward, backward, AdamW, EMA) of the MLP on
//! moons, averaged over 300 steps. Not a test.
//!
//! ```text
//! cargo run --release --example toy_step_bench -- [HIDDEN=128] [BATCH=256]
//! ```

use std::time::Instant;

use candle_core::Device;
use diffuse::data::toy2d::DataSpec;
use diffuse::nets::mlp::MlpConfig;
use diffuse::rng::Rng;
use diffuse::train::toy::{load_data, toy_config, LogSnrSampling};
use diffuse::train::{AdamW, AdamWConfig, Ema, EmaConfig, TrainTask};

fn main() -> diffuse::Result<()> {
    let dev = Device::Cpu;
    let spec = DataSpec::parse("moons")?;
    let points = load_data(&spec, 10_000, 0)?;
    let hidden: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(128);
    let batch: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let model = MlpConfig {
        hidden,
        ..MlpConfig::new(2)
    };
    let cfg = toy_config(&spec, &points, model, batch, LogSnrSampling::default());
    let varmap = candle_nn::VarMap::new();
    let mlp = diffuse::nets::mlp::Mlp::new(
        &cfg.model,
        diffuse::train::init::seeded_var_builder(&varmap, 1, &dev),
    )?;
    let mut task = diffuse::train::toy::ToyTask::new(&points, None, mlp, &cfg, 2, &dev)?;
    let mut opt = AdamW::new(&varmap, AdamWConfig::default())?;
    let mut ema = Ema::new(&varmap, EmaConfig::default())?;
    let mut rng = Rng::new(0);
    let (mut t_loss, mut t_back, mut t_opt, mut t_ema) = (0.0, 0.0, 0.0, 0.0);
    let n = 300;
    for _ in 0..n {
        let t0 = Instant::now();
        let loss = task.loss(0, &mut rng)?;
        let _ = loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        opt.apply(&grads)?;
        let t3 = Instant::now();
        ema.update()?;
        let t4 = Instant::now();
        t_loss += (t1 - t0).as_secs_f64();
        t_back += (t2 - t1).as_secs_f64();
        t_opt += (t3 - t2).as_secs_f64();
        t_ema += (t4 - t3).as_secs_f64();
    }
    let ms = |t: f64| 1000.0 * t / n as f64;
    println!(
        "hidden {hidden} batch {batch}: forward {:.2} ms, backward {:.2} ms, adamw {:.2} ms, ema {:.2} ms per step",
        ms(t_loss), ms(t_back), ms(t_opt), ms(t_ema)
    );
    Ok(())
}
