//! Measuring the U-Net's speed on this machine: the library half of `diffuse bench`.
//!
//! Two workloads per network ([`Workload`]), each timed after warm-up steps, median of the
//! timed steps:
//!
//! - `train`: one training step at batch 64: forward in training mode (dropout on), MSE loss
//!   against a fixed noise target, backward, and an update of every parameter by the training
//!   loop's [`crate::train::AdamW`] (lr 1e-4, no weight decay, no warm-up, no clipping: the
//!   reference script's `torch.optim.AdamW(lr=1e-4, weight_decay=0)`);
//! - `sample`: one sampling step at batch 256: an evaluation-mode forward pass with no
//!   autodiff graph (the weights are detached copies, so nothing is recorded for backward).
//!
//! Figures: median ms, images/s (`batch / median`), achieved GFLOP/s (FLOPs counted from the
//! config, [`flops`]; a training step is 3 forwards), the fraction of this machine's sgemm
//! GFLOP/s ([`sgemm`], 2048 x 2048 f32 through candle's matmul, the same `gemm` kernel the
//! convolutions use), and peak memory ([`memory`]: the resident-set high-water mark from
//! just before the first warm-up step).
//!
//! Threads: candle's CPU backend runs its parallel loops and its `gemm` calls on rayon's global
//! pool, and sizes the `gemm` split with `candle_core::utils::get_num_threads()`, which reads
//! `RAYON_NUM_THREADS` (else the number of physical cores); rayon's pool reads the same
//! variable (else the number of logical CPUs), and so do our kernels (`rayon::current_num_threads`).
//! Setting `RAYON_NUM_THREADS=N` before the process starts therefore sets every one of them to
//! N; `diffuse bench --threads N` runs each workload in a child process with that variable, and
//! the reference with `torch.set_num_threads(N)`. [`WorkloadRun`] records both counts so a
//! mismatch shows.
//!
//! The reference ([`torch`]) is `bench/torch_reference.py`, the same network built in PyTorch
//! from the same diffusers config.

pub mod flops;
pub mod memory;
pub mod report;
pub mod solver;
pub mod torch;

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::nets::unet;
use crate::nets::UNetConfig;
use crate::rng::Rng;
use crate::train::{AdamW, AdamWConfig};

pub use flops::{unet_forward_flops, FlopCount};
pub use report::{BenchReport, PresetReport, WorkloadReport};

/// The learning rate of the benchmark's AdamW step (as `bench/torch_reference.py`).
pub const LEARNING_RATE: f64 = 1e-4;

/// The benchmark's optimizer settings: PyTorch's `AdamW(lr=1e-4, weight_decay=0)` with its
/// default betas and eps, no warm-up and no gradient clipping (the reference script has neither).
pub fn bench_adamw() -> AdamWConfig {
    AdamWConfig {
        lr: LEARNING_RATE,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        warmup_steps: 0,
        grad_clip: None,
    }
}

/// The number of diffusion steps the random timesteps are drawn from (`t` in `[0, 1000)`).
pub const TIMESTEPS: usize = 1000;

/// What is timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Forward (training mode) + MSE + backward + AdamW update.
    Train,
    /// One evaluation-mode forward pass without an autodiff graph.
    Sample,
    /// One classifier-free-guided denoiser call at batch B of a class-conditional copy of the
    /// network (10 classes + null): both halves in one forward of 2B rows, then the combination.
    /// Compare with `sample` at batch 2B (the bar: at most 1.1x).
    Guided,
}

impl Workload {
    /// Both workloads, in report order.
    pub const ALL: [Workload; 3] = [Workload::Train, Workload::Sample, Workload::Guided];

    /// `train` or `sample` (also the reference script's `--workload`).
    pub fn name(&self) -> &'static str {
        match self {
            Workload::Train => "train",
            Workload::Sample => "sample",
            Workload::Guided => "guided",
        }
    }

    /// Forward passes' worth of FLOPs in one step (3 for training, see [`flops`]).
    pub fn forwards_per_step(&self) -> u64 {
        match self {
            Workload::Train => flops::TRAIN_STEP_FORWARDS,
            Workload::Sample => 1,
            Workload::Guided => 2,
        }
    }
}

impl FromStr for Workload {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "train" => Ok(Workload::Train),
            "sample" => Ok(Workload::Sample),
            "guided" => Ok(Workload::Guided),
            other => Err(Error::param(
                "workload",
                format!("unknown workload '{other}', expected train, sample or guided"),
            )),
        }
    }
}

/// One workload to time.
#[derive(Clone, Debug)]
pub struct WorkloadSpec {
    /// Train or sample.
    pub workload: Workload,
    /// Images per step.
    pub batch: usize,
    /// Untimed steps first.
    pub warmup: usize,
    /// Timed steps (at least 1); the median is reported.
    pub iters: usize,
    /// Seed of the weights, inputs, timesteps, target and dropout masks.
    pub seed: u64,
    /// After the timed steps, `iters` more steps with the per-op profile on
    /// ([`crate::ops::profile`]); the timed figures are not affected.
    pub profile: bool,
    /// The convolutions' arithmetic ([`crate::ops::set_precision`] sets it for our side, which
    /// runs in this process; the PyTorch reference runs under bf16 autocast with `Bf16`).
    pub precision: crate::ops::Precision,
}

/// One entry of our per-op profile, per step: a scope of [`crate::ops::profile`] (scopes nest,
/// so a block's time includes its ops').
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProfileRow {
    /// The scope (`resnet.bwd`, `unet.attention`, ...).
    pub name: String,
    /// Entries per step.
    pub calls: f64,
    /// Wall time per step (ms), all threads at work inside.
    pub ms: f64,
    /// Process CPU time per step (ms, all threads).
    pub cpu_ms: f64,
    /// Achieved GFLOP/s where the scope counts its FLOPs.
    pub gflops: Option<f64>,
}

/// The measurements of one workload in this process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkloadRun {
    /// Train or sample.
    pub workload: Workload,
    /// Images per step.
    pub batch: usize,
    /// Median of `times_ms`.
    pub median_ms: f64,
    /// Every timed step (ms).
    pub times_ms: Vec<f64>,
    /// Parameters of the network.
    pub params: usize,
    /// Resident set just before the first warm-up step (MiB).
    pub base_rss_mib: Option<f64>,
    /// Resident-set high-water mark from then to the end (MiB).
    pub peak_rss_mib: Option<f64>,
    /// Whether the high-water mark could be reset before the workload (else `peak_rss_mib` is
    /// the process's peak since it started).
    pub peak_reset: bool,
    /// rayon's global pool size (our kernels and candle's parallel loops).
    pub rayon_threads: usize,
    /// candle's `get_num_threads()` (its `gemm` split).
    pub candle_threads: usize,
    /// Whether the fast CPU kernels were on.
    pub fast_kernels: bool,
    /// With [`WorkloadSpec::profile`]: every scope's figures per step, largest time first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<Vec<ProfileRow>>,
}

/// The median of `xs` (mean of the middle two for an even count); NaN for an empty slice.
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

fn randn(rng: &mut Rng, shape: &[usize], device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

/// The timed durations (ms) of a workload and the memory figures around all its steps.
struct Timed {
    times: Vec<f64>,
    profile: Option<Vec<ProfileRow>>,
    base: Option<f64>,
    peak: Option<f64>,
    peak_reset: bool,
}

/// Runs `step` `warmup + iters` times, timing the last `iters` (see [`memory`] for the
/// memory figures).
fn time_steps(spec: &WorkloadSpec, mut step: impl FnMut() -> Result<()>) -> Result<Timed> {
    let peak_reset = memory::reset_peak_rss();
    let base = memory::rss_mib();
    for _ in 0..spec.warmup {
        step()?;
    }
    let mut times = Vec::with_capacity(spec.iters);
    for _ in 0..spec.iters {
        let t0 = Instant::now();
        step()?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let peak = memory::peak_rss_mib();
    let profile = if spec.profile {
        Some(profile_steps(spec.iters, step)?)
    } else {
        None
    };
    Ok(Timed {
        times,
        profile,
        base,
        peak,
        peak_reset,
    })
}

/// Runs `step` `iters` times with the per-op profile on; the table per step, largest first.
fn profile_steps(iters: usize, mut step: impl FnMut() -> Result<()>) -> Result<Vec<ProfileRow>> {
    use crate::ops::profile;
    let was = profile::enabled();
    profile::set_enabled(true);
    profile::take();
    let steps = (|| {
        for _ in 0..iters {
            let _s = profile::scope("step");
            step()?;
        }
        Ok::<_, Error>(())
    })();
    let entries = profile::take();
    profile::set_enabled(was);
    steps?;
    let per = iters.max(1) as f64;
    let mut rows: Vec<ProfileRow> = entries
        .into_iter()
        .filter(|e| e.calls > 0)
        .map(|e| ProfileRow {
            name: e.name.to_string(),
            calls: e.calls as f64 / per,
            ms: e.seconds * 1e3 / per,
            cpu_ms: e.cpu_seconds * 1e3 / per,
            gflops: (e.flops > 0.0 && e.seconds > 0.0).then(|| e.flops / e.seconds / 1e9),
        })
        .collect();
    rows.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    Ok(rows)
}

/// Builds the network of `cfg` (its `sample_size` gives the image size) with fresh weights and
/// times one workload on `device`.
pub fn run_workload(cfg: &UNetConfig, spec: &WorkloadSpec, device: &Device) -> Result<WorkloadRun> {
    if spec.batch == 0 {
        return Err(Error::param("batch", "got 0, expected at least 1"));
    }
    if spec.iters == 0 {
        return Err(Error::param("iters", "got 0, expected at least 1"));
    }
    let [h, w] = cfg
        .sample_size
        .ok_or_else(|| Error::param("sample_size", "the benchmark needs the config's image size"))?;
    let b = spec.batch;
    let (net, varmap) = unet::init_params(cfg, spec.seed, device)?;
    let params = unet::num_parameters(cfg)?;
    let mut rng = Rng::stream(spec.seed, 1);
    let x = randn(&mut rng, &[b, cfg.in_channels, h, w], device)?;
    let t: Vec<f32> = (0..b)
        .map(|_| {
            (rng.uniform() * TIMESTEPS as f64)
                .floor()
                .min(TIMESTEPS as f64 - 1.0) as f32
        })
        .collect();
    let t = Tensor::from_vec(t, b, device)?;

    let timed = match spec.workload {
        Workload::Train => {
            let target = randn(&mut rng, &[b, cfg.out_channels, h, w], device)?;
            let mut dropout_rng = Rng::stream(spec.seed, 2);
            let mut opt = AdamW::new(&varmap, bench_adamw())?;
            time_steps(spec, || {
                let eps_hat = net.forward_train(&x, &t, &mut dropout_rng)?;
                let loss = (eps_hat - &target)?.sqr()?.mean_all()?;
                opt.backward_step(&loss)?;
                let l = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                if !l.is_finite() {
                    return Err(Error::Numerical(format!("benchmark training loss is {l}")));
                }
                Ok(())
            })?
        }
        Workload::Sample => {
            // Detached copies of the weights: the forward pass records no graph.
            let tensors: HashMap<String, Tensor> = varmap
                .data()
                .lock()
                .map_err(|_| Error::Numerical("VarMap lock poisoned".into()))?
                .iter()
                .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
                .collect();
            drop(net);
            let net = unet::from_tensors(cfg, tensors, device)?;
            time_steps(spec, || {
                net.forward(&x, &t)?;
                Ok(())
            })?
        }
        Workload::Guided => {
            drop(net);
            let cond_cfg = UNetConfig {
                num_class_embeds: Some(11),
                null_class: Some(10),
                ..cfg.clone()
            };
            let (_, cond_vars) = unet::init_params(&cond_cfg, spec.seed, device)?;
            // detached weights, as the sample workload: the forward records no graph
            let tensors: HashMap<String, Tensor> = cond_vars
                .data()
                .lock()
                .map_err(|_| Error::Numerical("VarMap lock poisoned".into()))?
                .iter()
                .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
                .collect();
            let net = unet::from_tensors(&cond_cfg, tensors, device)?;
            let schedule = crate::schedule::Schedule::named("linear", TIMESTEPS)?;
            let levels: Vec<crate::denoiser::NoiseLevel> = t
                .to_vec1::<f32>()?
                .iter()
                .map(|&ti| crate::process::ddpm_level(&schedule, ti as usize))
                .collect();
            let den = crate::nets::UNetDenoiser::new(net, schedule, crate::denoiser::Prediction::Eps);
            let classes: Vec<Option<usize>> = (0..b).map(|i| Some(i % 10)).collect();
            let guided = crate::guidance::Guided::new(&den, classes, 2.0)?;
            time_steps(spec, || {
                use crate::denoiser::Denoiser;
                guided.output(&x, &levels)?;
                Ok(())
            })?
        }
    };
    Ok(WorkloadRun {
        workload: spec.workload,
        batch: b,
        median_ms: median(&timed.times),
        times_ms: timed.times,
        params,
        base_rss_mib: timed.base,
        peak_rss_mib: timed.peak,
        peak_reset: timed.peak_reset,
        rayon_threads: rayon::current_num_threads(),
        candle_threads: candle_core::utils::get_num_threads(),
        fast_kernels: crate::ops::fast_kernels(),
        profile: timed.profile,
    })
}

/// The machine's matrix-multiply speed: `n` x `n` times `n` x `n` in f32 through candle's
/// matmul, `2 n^3` FLOPs per product.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SgemmRun {
    /// Matrix size.
    pub n: usize,
    /// Median time of one product (ms).
    pub median_ms: f64,
    /// `2 n^3 / median`, in GFLOP/s.
    pub gflops: f64,
    /// rayon's global pool size.
    pub rayon_threads: usize,
    /// candle's `get_num_threads()`.
    pub candle_threads: usize,
}

/// Times an `n` x `n` f32 matrix product on `device` (`warmup` untimed, median of `iters`).
pub fn sgemm(n: usize, warmup: usize, iters: usize, seed: u64, device: &Device) -> Result<SgemmRun> {
    if n == 0 || iters == 0 {
        return Err(Error::param("sgemm", "size and iterations must be at least 1"));
    }
    let mut rng = Rng::new(seed);
    let a = randn(&mut rng, &[n, n], device)?;
    let b = randn(&mut rng, &[n, n], device)?;
    let mut times = Vec::with_capacity(iters);
    for i in 0..warmup + iters {
        let t0 = Instant::now();
        let c = a.matmul(&b)?;
        device.synchronize()?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        drop(c);
        if i >= warmup {
            times.push(ms);
        }
    }
    let median_ms = median(&times);
    Ok(SgemmRun {
        n,
        median_ms,
        gflops: 2.0 * (n as f64).powi(3) / (median_ms * 1e-3) / 1e9,
        rayon_threads: rayon::current_num_threads(),
        candle_threads: candle_core::utils::get_num_threads(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nets::config::{DownBlockType, UpBlockType};

    #[test]
    fn median_odd_even_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn workload_names_round_trip() {
        for w in Workload::ALL {
            assert_eq!(w.name().parse::<Workload>().unwrap(), w);
        }
        let e = "infer".parse::<Workload>().unwrap_err().to_string();
        assert!(e.contains("sample or guided"), "{e}");
    }

    /// A tiny network with attention and dropout, one step of each workload (no timing
    /// assertions: timings are never tested).
    #[test]
    fn smoke_runs_both_workloads() {
        let cfg = UNetConfig {
            in_channels: 1,
            out_channels: 1,
            block_out_channels: vec![8, 8],
            down_block_types: vec![DownBlockType::DownBlock2D, DownBlockType::AttnDownBlock2D],
            up_block_types: vec![UpBlockType::AttnUpBlock2D, UpBlockType::UpBlock2D],
            layers_per_block: 1,
            norm_num_groups: 2,
            attention_head_dim: Some(4),
            dropout: 0.1,
            sample_size: Some([8, 8]),
            ..UNetConfig::default()
        };
        for workload in Workload::ALL {
            let spec = WorkloadSpec {
                workload,
                batch: 2,
                warmup: 0,
                iters: 1,
                seed: 0,
                profile: false,
                precision: crate::ops::Precision::F32,
            };
            let r = run_workload(&cfg, &spec, &Device::Cpu).unwrap();
            assert_eq!(r.times_ms.len(), 1);
            assert_eq!(r.median_ms, r.times_ms[0]);
            assert_eq!(r.params, unet::num_parameters(&cfg).unwrap());
            assert!(r.rayon_threads >= 1 && r.candle_threads >= 1);
            // (the profile is process-wide, shared with the tests running beside this one:
            // `tests/bench_cli.rs` checks `--profile` in a process of its own)
            assert!(r.profile.is_none());
        }
        let spec = WorkloadSpec {
            workload: Workload::Sample,
            batch: 0,
            warmup: 0,
            iters: 1,
            seed: 0,
            profile: false,
            precision: crate::ops::Precision::F32,
        };
        assert!(run_workload(&cfg, &spec, &Device::Cpu).is_err());
    }

    /// The bench's optimizer reaches the network's weights through the VarMap.
    #[test]
    fn train_step_moves_the_weights_by_lr() {
        let cfg = UNetConfig::preset("demo", 1, 8).unwrap();
        let (net, varmap) = unet::init_params(&cfg, 0, &Device::Cpu).unwrap();
        let weight = |vm: &candle_nn::VarMap| {
            vm.data().lock().unwrap()["conv_in.weight"]
                .as_tensor()
                .copy()
                .unwrap()
        };
        let before = weight(&varmap);
        let x = Tensor::ones((1, 1, 8, 8), DType::F32, &Device::Cpu).unwrap();
        let t = Tensor::new(&[5f32], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(&varmap, bench_adamw()).unwrap();
        let loss = net.forward(&x, &t).unwrap().sqr().unwrap().mean_all().unwrap();
        opt.backward_step(&loss).unwrap();
        let diff = (weight(&varmap) - before)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // A first AdamW step moves each weight by lr * g / (|g| + eps) = lr (for |g| >> eps).
        assert!((diff - 1e-4).abs() < 1e-6, "{diff}");
    }

    /// The optimizer's moments hold values, not graphs: candle's gradient of `w` in
    /// `L = sum(x w w)` is computed from the intermediate `x w` and tracks ops; kept in a moment,
    /// such a graph keeps the forward pass alive (measured: +640 MiB per step at batch 16).
    #[test]
    fn optimizer_moments_carry_no_backprop_graph() {
        let varmap = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let w = vb
            .get_with_hints((2, 2), "w", candle_nn::Init::Const(0.5))
            .unwrap();
        let x = Tensor::new(&[[0.5f32, -1.0]], &Device::Cpu).unwrap();
        let loss = x.matmul(&w).unwrap().matmul(&w).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        assert!(
            grads.get(&w).unwrap().track_op(),
            "premise: this gradient tracks ops"
        );
        let mut opt = AdamW::new(&varmap, bench_adamw()).unwrap();
        opt.apply(&grads).unwrap();
        for (name, m) in opt.state_tensors() {
            assert!(!m.track_op(), "{name} carries a backprop graph");
        }
    }

    #[test]
    fn sgemm_counts_two_n_cubed() {
        let r = sgemm(64, 0, 1, 0, &Device::Cpu).unwrap();
        let want = 2.0 * 64f64.powi(3) / (r.median_ms * 1e-3) / 1e9;
        assert!((r.gflops - want).abs() <= 1e-9 * want);
    }
}
