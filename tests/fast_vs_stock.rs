//! A few steps of real image training (`diffuse::train::image`) with the fast CPU kernels follow
//! the same run on candle's stock ops (`ops::set_fast_kernels(false)`) to float rounding.
//!
//! The network is a tiny U-Net that uses every fused path of training: the whole-ResNet-block op
//! with a concatenated skip input, a shortcut convolution, scale-shift time conditioning and a
//! dropout mask; the attention-block op with two heads; the sub-pixel upsampling convolution;
//! the in-place AdamW and EMA updates. (The full-size check, 100 steps of the `demo` preset, is
//! `cargo run --release --example fast_vs_stock`.)
//!
//! Tolerance: both runs do the same arithmetic in a different order, so each loss agrees to a few
//! f32 ulps (1e-7 relative; 100 steps of `demo` stay within 6e-7). 1e-5 relative leaves that
//! margin; a formula error (a dropped term, a wrong mask scale) moves the loss by far more than
//! 1e-3 (checked: scaling the dropout mask by 0.9 inside the fused block fails this test).
//!
//! This binary holds one test, so the process-wide kernel switch cannot disturb other tests.

use candle_core::Device;
use diffuse::data::{self, DataSpec, Split};
use diffuse::denoiser::Prediction;
use diffuse::nets::config::{DownBlockType, ResampleType, TimeScaleShift, UNetConfig, UpBlockType};
use diffuse::ops;
use diffuse::schedule::BetaSchedule;
use diffuse::train::image::{checksum_f32, GridSampling, ImageRun, ImageTrainConfig};
use diffuse::train::{AdamWConfig, Budget, EmaConfig, Interrupt, LoopOptions, TrainerConfig};

const STEPS: u64 = 6;

fn losses(fast: bool, dir: &std::path::Path) -> Vec<f64> {
    ops::set_fast_kernels(fast);
    let spec = DataSpec {
        data: "mnist5k".into(),
        format: None,
        split: Split::Test,
        image_size: Some(8),
        channels: None,
    };
    let ds = data::load(&spec).unwrap();
    let unet = UNetConfig {
        block_out_channels: vec![8, 16],
        down_block_types: vec![DownBlockType::DownBlock2D, DownBlockType::AttnDownBlock2D],
        up_block_types: vec![UpBlockType::AttnUpBlock2D, UpBlockType::UpBlock2D],
        layers_per_block: 1,
        norm_num_groups: 4,
        attention_head_dim: Some(8),
        resnet_time_scale_shift: TimeScaleShift::ScaleShift,
        downsample_type: ResampleType::Conv,
        upsample_type: ResampleType::Conv,
        dropout: 0.1,
        in_channels: 1,
        out_channels: 1,
        sample_size: Some([8, 8]),
        ..UNetConfig::default()
    };
    let config = ImageTrainConfig {
        n_images: ds.len(),
        data_checksum: checksum_f32(ds.pixels()),
        data: spec,
        preset: "tiny".into(),
        unet: unet.to_json(),
        schedule: BetaSchedule::from_name("linear").unwrap(),
        timesteps: 1000,
        prediction: Prediction::Eps,
        batch: 12,
        flip: false,
        cond_drop: None,
    };
    let trainer = TrainerConfig {
        seed: 3,
        optimizer: AdamWConfig {
            warmup_steps: 2,
            ..AdamWConfig::default()
        },
        ema: EmaConfig {
            decay: 0.9,
            warmup: true,
        },
    };
    let grid = GridSampling {
        n: 0,
        steps: 0,
        seed: 0,
        guidance_scale: 1.0,
    };
    let mut run = ImageRun::setup(dir, ds, &config, &trainer, grid, false, &Device::Cpu).unwrap();
    let options = LoopOptions {
        checkpoint_every: 0,
        hook_every: 0,
        eval_every: 0,
        progress: false,
    };
    let budget = Budget {
        steps: Some(STEPS),
        minutes: None,
    };
    run.trainer
        .run(&mut run.task, &budget, &options, &Interrupt::new())
        .unwrap();
    run.trainer.metrics().iter().map(|r| r.loss).collect()
}

#[test]
fn training_with_fast_kernels_follows_the_stock_ops() {
    let tmp = tempfile::tempdir().unwrap();
    let fast = losses(true, &tmp.path().join("fast"));
    let stock = losses(false, &tmp.path().join("stock"));
    ops::set_fast_kernels(true);
    assert_eq!(fast.len(), STEPS as usize);
    assert_eq!(stock.len(), STEPS as usize);
    for (i, (f, s)) in fast.iter().zip(&stock).enumerate() {
        let rel = (f - s).abs() / s.abs();
        assert!(
            rel < 1e-5,
            "step {}: fast loss {f}, stock loss {s}, relative difference {rel:e}",
            i + 1
        );
    }
    // the runs trained: the loss moved
    assert!((fast[0] - fast[STEPS as usize - 1]).abs() > 1e-3, "{fast:?}");
}
