//! `diffuse toy train`: train the MLP denoiser on 2-D (or any low-dimensional) data.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use diffuse::data::toy2d::{load_labels, DataSpec};
use diffuse::nets::mlp::MlpConfig;
use diffuse::train::metrics::smooth;
use diffuse::train::toy::{labels_checksum, load_data, toy_config, LogSnrSampling, ToyRun, ToySeeds};
use diffuse::train::{
    parameter_count, AdamWConfig, Budget, EmaConfig, LoopOptions, StopReason, TrainerConfig, LOSS_CURVE_FILE,
    METRICS_FILE,
};

use diffuse::config::defaults::toy as defaults;

#[derive(Args, Debug)]
pub struct ToyTrainArgs {
    /// Training data: moons, 8gaussians, swissroll, checkerboard, rings (synthetic, seeded by
    /// --seed), npy:FILE (float32/float64 array [N, D]), csv:FILE (one point per line), or
    /// gmm:FILE.json (a Gaussian mixture).
    #[arg(long)]
    data: String,
    /// Output directory: checkpoint/ (weights, EMA, optimizer, state.json), metrics.jsonl,
    /// loss.png, config.json. Must not hold a checkpoint unless --resume is given.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Total training steps of the run (3000 if neither --steps nor --minutes is given).
    #[arg(long)]
    steps: Option<u64>,
    /// Stop after this many minutes of this session (with --steps: whichever comes first).
    #[arg(long)]
    minutes: Option<f64>,
    /// Batch size.
    #[arg(long, default_value_t = defaults::BATCH)]
    batch: usize,
    /// Peak learning rate of AdamW (reached after --warmup steps).
    #[arg(long, default_value_t = defaults::LR)]
    lr: f64,
    /// Linear learning-rate warm-up, in steps (0: none).
    #[arg(long, default_value_t = defaults::WARMUP)]
    warmup: u64,
    /// Decoupled weight decay of AdamW (applied to weight matrices only).
    #[arg(long, default_value_t = defaults::WEIGHT_DECAY)]
    weight_decay: f64,
    /// Clip the gradient to this global L2 norm (0: no clipping).
    #[arg(long, default_value_t = defaults::GRAD_CLIP)]
    grad_clip: f64,
    /// Seed of everything random: the synthetic data, the weights, the data order, the noise.
    #[arg(long, default_value_t = defaults::SEED)]
    seed: u64,
    /// Decay of the EMA of the weights (sampling uses the EMA weights by default).
    #[arg(long, default_value_t = defaults::EMA_DECAY)]
    ema_decay: f64,
    /// Use the EMA decay from the first step instead of ramping it up as min(decay, (1+k)/(10+k)).
    #[arg(long)]
    no_ema_warmup: bool,
    /// Number of points drawn from a synthetic dataset (default 10000); files use all their points.
    #[arg(long)]
    n_data: Option<usize>,
    /// Hidden width of the MLP.
    #[arg(long, default_value_t = defaults::HIDDEN)]
    hidden: usize,
    /// Number of residual blocks of the MLP.
    #[arg(long, default_value_t = defaults::LAYERS)]
    layers: usize,
    /// Size of the sinusoidal log-SNR embedding (even).
    #[arg(long, default_value_t = defaults::EMBED_DIM)]
    embed_dim: usize,
    /// Training distribution of the log-SNR: cosine (density ~ sech(lambda/2), the cosine
    /// schedule's) or uniform, on [--log-snr-min, --log-snr-max].
    #[arg(long, default_value = defaults::LOG_SNR_SAMPLING)]
    log_snr_sampling: String,
    /// Lower end of the training log-SNR range.
    #[arg(long, default_value_t = defaults::LOG_SNR_MIN, allow_hyphen_values = true)]
    log_snr_min: f64,
    /// Upper end of the training log-SNR range.
    #[arg(long, default_value_t = defaults::LOG_SNR_MAX, allow_hyphen_values = true)]
    log_snr_max: f64,
    /// Class labels of npy:/csv: points, one integer per point (a text file, one per line, or a
    /// .npy vector): trains a class-conditional model (a mixture with "labels" does so by itself).
    #[arg(long, value_name = "FILE")]
    labels: Option<PathBuf>,
    /// Class-conditional runs: probability that a label is replaced by the null class during
    /// training (classifier-free guidance's label dropout; default 0.1).
    #[arg(long)]
    cond_drop: Option<f64>,
    /// Train unconditionally even on labelled data.
    #[arg(long)]
    unconditional: bool,
    /// Write a checkpoint every this many steps (0: only at the end and on Ctrl-C/SIGTERM).
    #[arg(long, default_value_t = defaults::CHECKPOINT_EVERY)]
    checkpoint_every: u64,
    /// Continue the run in --out from its last checkpoint. The run's settings (every flag but
    /// --steps, --minutes, --checkpoint-every and --json) must be given as in the original run;
    /// a mismatch is an error naming the differing settings. --steps counts the total.
    #[arg(long)]
    resume: bool,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(args: ToyTrainArgs) -> anyhow::Result<()> {
    let spec = DataSpec::parse(&args.data)?;
    if spec.is_file() && args.n_data.is_some() {
        return super::usage(format!(
            "--n-data applies to synthetic datasets; {spec} trains on all the points of its file"
        ));
    }
    if let Some(n) = args.n_data {
        if n > diffuse::train::toy::MAX_POINTS {
            return super::usage(format!(
                "--n-data {n}: at most {} points",
                diffuse::train::toy::MAX_POINTS
            ));
        }
    }
    let budget = Budget {
        steps: args.steps.or(if args.minutes.is_none() {
            Some(defaults::STEPS)
        } else {
            None
        }),
        minutes: args.minutes,
    };
    let n_data = args.n_data.unwrap_or(defaults::N_DATA);
    let points = load_data(&spec, n_data, args.seed)?;
    let labels = if args.unconditional {
        if args.labels.is_some() {
            return super::usage("--labels and --unconditional contradict each other");
        }
        None
    } else {
        load_labels(
            &spec,
            n_data,
            ToySeeds::from_seed(args.seed).data,
            args.labels.as_deref(),
            points.len(),
        )?
    };
    if labels.is_none() && args.cond_drop.is_some() {
        return super::usage("--cond-drop applies to class-conditional training (labelled data)");
    }
    let num_classes = labels.as_ref().map(|l| l.iter().max().map_or(1, |m| m + 1));
    let model = MlpConfig {
        dim: points.dim(),
        hidden: args.hidden,
        layers: args.layers,
        embed_dim: args.embed_dim,
        num_classes,
    };
    let log_snr = LogSnrSampling::from_name(&args.log_snr_sampling, args.log_snr_min, args.log_snr_max)?;
    let mut config = toy_config(&spec, &points, model, args.batch, log_snr);
    if let Some(l) = &labels {
        config.cond_drop = Some(args.cond_drop.unwrap_or(defaults::COND_DROP));
        config.labels_checksum = Some(labels_checksum(l));
    }
    let trainer_config = TrainerConfig {
        seed: args.seed,
        optimizer: AdamWConfig {
            lr: args.lr,
            warmup_steps: args.warmup,
            weight_decay: args.weight_decay,
            grad_clip: (args.grad_clip > 0.0).then_some(args.grad_clip),
            ..AdamWConfig::default()
        },
        ema: EmaConfig {
            decay: args.ema_decay,
            warmup: !args.no_ema_warmup,
        },
    };
    let device = candle_core::Device::Cpu;
    let interrupt = super::interrupt_on_signals()?;
    let mut run = ToyRun::setup(
        &args.out,
        &points,
        labels.as_deref(),
        &config,
        &trainer_config,
        args.resume,
        &device,
    )?;
    let params = parameter_count(&run.varmap);

    let (mean, std) = points.mean_std();
    if !args.json {
        println!(
            "data: {spec}, {} points of dimension {}, mean {:?}, std {:?}",
            points.len(),
            points.dim(),
            round3(&mean),
            round3(&std)
        );
        println!(
            "model: MLP, {} residual blocks of width {}, {params} parameters{}",
            args.layers,
            args.hidden,
            match (num_classes, config.cond_drop) {
                (Some(k), Some(p)) => format!("; class-conditional, {k} classes, label dropout {p}"),
                _ => String::new(),
            }
        );
        if args.resume {
            println!("resuming at step {}", run.trainer.step());
        }
    }
    if std.iter().any(|&s| !(0.05..=20.0).contains(&s)) {
        eprintln!(
            "warning: the data's per-coordinate std {:?} is far from 1; the noise processes assume \
             data of roughly unit scale (standardise the points first)",
            round3(&std)
        );
    }

    let options = LoopOptions {
        checkpoint_every: args.checkpoint_every,
        hook_every: 0,
        progress: !args.json,
        eval_every: 0,
    };
    let outcome = run.run(&budget, &options, &interrupt)?;
    let losses: Vec<f64> = run.trainer.metrics().iter().map(|r| r.loss).collect();
    let tail = &losses[losses.len().saturating_sub(100)..];
    let final_mean = tail.iter().sum::<f64>() / tail.len().max(1) as f64;
    let final_smoothed = smooth(&losses, 0.99).last().copied().unwrap_or(f64::NAN);
    let rate = outcome.session_steps as f64 / outcome.session_seconds.max(1e-9);
    let stopped = match outcome.stop {
        StopReason::Steps => "steps",
        StopReason::Time => "time",
        StopReason::Interrupted => "interrupted",
    };
    if args.json {
        let obj = json!({
            "step": outcome.step,
            "session_steps": outcome.session_steps,
            "seconds": outcome.session_seconds,
            "steps_per_second": rate,
            "final_loss_mean_last_100": final_mean,
            "final_loss_smoothed": final_smoothed,
            "stopped": stopped,
            "parameters": params,
            "checkpoint": outcome.checkpoint,
            "metrics": args.out.join(METRICS_FILE),
            "loss_curve": args.out.join(LOSS_CURVE_FILE),
        });
        println!("{obj}");
    } else {
        if outcome.stop == StopReason::Interrupted {
            println!(
                "interrupted at step {}; checkpoint written, continue with the same flags plus --resume",
                outcome.step
            );
        }
        println!(
            "trained {} steps in {:.1} s ({rate:.0} steps/s), now at step {}; loss {final_mean:.4} \
             (mean of the last {})",
            outcome.session_steps,
            outcome.session_seconds,
            outcome.step,
            tail.len()
        );
        println!(
            "wrote {}, {}, {}",
            outcome.checkpoint.display(),
            args.out.join(METRICS_FILE).display(),
            args.out.join(LOSS_CURVE_FILE).display()
        );
    }
    Ok(())
}

fn round3(v: &[f64]) -> Vec<f64> {
    v.iter().map(|x| (x * 1000.0).round() / 1000.0).collect()
}
