//! `diffuse train`: train the U-Net on images with the simple loss; never loses work.

use std::path::PathBuf;
use std::rc::Rc;

use clap::Args;
use serde_json::json;

use diffuse::data::{self, Split};
use diffuse::denoiser::Prediction;
use diffuse::guidance::DEFAULT_GUIDANCE_SCALE;
use diffuse::nets::{unet, UNetConfig};
use diffuse::schedule::BetaSchedule;
use diffuse::train::image::{checksum_f32, GridSampling, ImageRun, ImageTrainConfig};
use diffuse::train::{
    checkpoint, AdamWConfig, Budget, Collective, EmaConfig, LoopOptions, StopReason, TrainerConfig,
    LOSS_CURVE_FILE, METRICS_FILE,
};

use super::common::DataArgs;

use diffuse::config::defaults::image as defaults;

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Output (run) directory: checkpoint/ (weights, EMA, optimizer, state.json), metrics.jsonl,
    /// loss.png, samples.png and samples/step_*.png, config.json. Must not hold a checkpoint.
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "resume",
        conflicts_with = "resume"
    )]
    out: Option<PathBuf>,
    /// Continue the run in DIR from its last checkpoint with its saved settings. Flags that
    /// define the run (data, model, schedule, optimizer, seed) may be repeated but must match;
    /// --steps (the run's total), --minutes, --checkpoint-every, --sample-every may change.
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
    #[command(flatten)]
    data: DataArgs,
    /// Random horizontal flips of the training images (off by default: digits are not symmetric).
    #[arg(long)]
    flip: bool,
    /// Network preset: demo (about 1 M parameters, minutes on a CPU), mnist (6.5 M), cifar10
    /// (the DDPM paper's 35.7 M), bench (issue 6's benchmark network).
    #[arg(long)]
    preset: Option<String>,
    /// Noise schedule: linear, scaled_linear, quadratic, cosine, sigmoid.
    #[arg(long)]
    schedule: Option<String>,
    /// Diffusion steps T.
    #[arg(long)]
    timesteps: Option<usize>,
    /// What the network predicts: eps, x0 or v.
    #[arg(long)]
    prediction: Option<String>,
    /// Images per step.
    #[arg(long)]
    batch: Option<usize>,
    /// Peak learning rate of AdamW (default 1e-3, measured for short CPU runs; the DDPM paper used 2e-4).
    #[arg(long)]
    lr: Option<f64>,
    /// Linear learning-rate warm-up in steps (default 100).
    #[arg(long)]
    warmup: Option<u64>,
    /// Decoupled weight decay (default 0).
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Clip the gradient to this global L2 norm (default 1; 0: no clipping).
    #[arg(long)]
    grad_clip: Option<f64>,
    /// Decay of the EMA of the weights (default 0.995, with the warm-up min(decay, (1+k)/(10+k))).
    #[arg(long)]
    ema_decay: Option<f64>,
    /// Seed of everything random: weights, data order, flips, t, noise, dropout (default 0).
    #[arg(long)]
    seed: Option<u64>,
    /// Total steps of the run (a resumed run counts the steps before the checkpoint). Default
    /// 2400 when --minutes is not given either.
    #[arg(long)]
    steps: Option<u64>,
    /// Stop after this many minutes of this session (default: no time limit; with --steps,
    /// whichever comes first).
    #[arg(long)]
    minutes: Option<f64>,
    /// Write a checkpoint every this many steps (also at the end and on Ctrl-C / SIGTERM).
    #[arg(long, default_value_t = defaults::CHECKPOINT_EVERY)]
    checkpoint_every: u64,
    /// Draw a sample grid (EMA weights, ancestral DDPM sampling) every this many steps (0: only at the end).
    #[arg(long, default_value_t = defaults::SAMPLE_EVERY)]
    sample_every: u64,
    /// Measure samples every this many steps (0: never): --fid-samples images of the EMA weights
    /// from --fid-sampler, their FD of the bundled digit features against the test split beside
    /// real training images' (the floor), into metrics.jsonl, the loss plot and the summary.
    /// Default: 800 (a third of the default run, about 5 % of its time) for 1-channel 28x28 /
    /// 16x16 data; other data has no bundled feature network and is not measured. Also measured
    /// at the last step of a --steps budget of at least this many steps.
    #[arg(long)]
    fid_every: Option<u64>,
    /// Samples per measurement (more than 128: the features' covariance must be full rank).
    #[arg(long, default_value_t = defaults::FID_SAMPLES)]
    fid_samples: usize,
    /// Sampler of the measured samples (any of `diffuse samplers`).
    #[arg(long, default_value = defaults::FID_SAMPLER)]
    fid_sampler: String,
    /// Steps of --fid-sampler.
    #[arg(long, default_value_t = defaults::FID_STEPS)]
    fid_steps: usize,
    /// Images in the sample grid (0: none).
    #[arg(long, default_value_t = defaults::GRID_SIZE)]
    grid_size: usize,
    /// Sampling steps of the sample grid (DDPM respaced from T).
    #[arg(long, default_value_t = defaults::GRID_STEPS)]
    grid_steps: usize,
    /// Class-conditional runs (labelled data: the bundled mnist5k, IDX with labels, class
    /// subfolders): probability that a training label is replaced by the null class, so the one
    /// network is also the unconditional model classifier-free guidance needs (default 0.1).
    #[arg(long)]
    cond_drop: Option<f64>,
    /// Train an unconditional model even on labelled data (unlabelled data always trains
    /// unconditional).
    #[arg(long)]
    unconditional: bool,
    /// Guidance scale of a class-conditional run's sample grids (default: the sampling default).
    #[arg(long)]
    grid_guidance_scale: Option<f64>,
    /// Arithmetic of the convolutions: f32, or bf16 (bf16 operands with f32 accumulation in
    /// the direct convolution kernels and their input gradients; weights, weight gradients,
    /// norms, attention, linear layers and optimizer state stay f32). bf16 needs a CPU with
    /// AVX512_BF16.
    #[arg(long, default_value = "f32", value_name = "f32|bf16")]
    precision: String,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

/// `Some(flag)` when given, else the saved value on resume, else the default.
fn pick<T: Clone>(flag: &Option<T>, saved: Option<T>, default: T) -> T {
    flag.clone().or(saved).unwrap_or(default)
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    super::set_threads(args.threads)?;
    super::set_precision(&args.precision)?;
    // one process, or one of K ranks under mpirun (`--features mpi`)
    let comm = super::launch::launch(&super::device()?)?;
    let result = run_rank(args, &comm);
    super::launch::finish(comm.as_ref(), result)
}

fn run_rank(args: TrainArgs, comm: &Rc<dyn Collective>) -> anyhow::Result<()> {
    let run_dir = args.resume.clone().or(args.out.clone()).unwrap_or_default();
    let resume = args.resume.is_some();
    // On resume, the saved config supplies every setting not given on the command line.
    let (saved_task, saved_trainer): (Option<ImageTrainConfig>, Option<TrainerConfig>) = if resume {
        let ckpt = checkpoint::locate(&run_dir)?;
        let state = checkpoint::read_state(&ckpt)?;
        let state_file = ckpt.join(checkpoint::STATE_FILE);
        let task = serde_json::from_value(state.config["task"].clone()).map_err(|e| {
            diffuse::Error::bad_input(&state_file, format!("is not an image training run ({e})"))
        })?;
        let trainer = serde_json::from_value(state.config["trainer"].clone()).map_err(|e| {
            diffuse::Error::bad_input(&state_file, format!("unreadable trainer settings ({e})"))
        })?;
        (Some(task), Some(trainer))
    } else {
        (None, None)
    };
    let st = saved_task.as_ref();
    // data flags not given on --resume: the saved selection
    let data_spec = args.data.spec_or(Split::Train, st.map(|s| &s.data));
    let ds = data::load(&data_spec)?;
    let [c, h, w] = ds.shape();
    if h != w {
        return super::usage(format!(
            "images are {h}x{w}; the U-Net presets need square images (use --image-size)"
        ));
    }
    let preset = pick(&args.preset, st.map(|s| s.preset.clone()), "demo".into());
    // class-conditional when the data has labels, unless --unconditional (or a resumed
    // unconditional run)
    let saved_conditional = st.map(|s| s.cond_drop.is_some());
    let num_classes = match (ds.labels(), args.unconditional, saved_conditional) {
        (_, true, _) | (_, _, Some(false)) | (None, _, _) => None,
        (Some(l), false, _) => Some(
            ds.class_names()
                .map(|n| n.len())
                .unwrap_or(0)
                .max(l.iter().max().map_or(0, |m| *m as usize + 1)),
        ),
    };
    if args.unconditional && saved_conditional == Some(true) {
        return super::usage("--unconditional: the run being resumed is class-conditional");
    }
    if num_classes.is_none() && args.cond_drop.is_some() {
        return super::usage(if ds.labels().is_none() {
            "--cond-drop: the data has no labels, so the run is unconditional"
        } else {
            "--cond-drop applies to class-conditional runs, not with --unconditional"
        });
    }
    let unet_json = match st {
        Some(s) if args.preset.is_none() || args.preset.as_deref() == Some(s.preset.as_str()) => {
            s.unet.clone()
        }
        _ => {
            let mut cfg = UNetConfig::preset(&preset, c, h)?;
            if let Some(k) = num_classes {
                // K classes and one null row
                cfg.num_class_embeds = Some(k + 1);
                cfg.null_class = Some(k);
            }
            cfg.to_json()
        }
    };
    let cond_drop =
        num_classes.map(|_| pick(&args.cond_drop, st.and_then(|s| s.cond_drop), defaults::COND_DROP));
    let schedule_name = pick(
        &args.schedule,
        st.map(|s| s.schedule.name().to_string()),
        defaults::SCHEDULE.into(),
    );
    let schedule = match st {
        Some(s) if s.schedule.name() == schedule_name => s.schedule.clone(),
        _ => BetaSchedule::from_name(&schedule_name)?,
    };
    let prediction = match &args.prediction {
        Some(p) => Prediction::from_name(p)?,
        None => st.map(|s| s.prediction).unwrap_or(Prediction::Eps),
    };
    let config = ImageTrainConfig {
        n_images: ds.len(),
        data_checksum: checksum_f32(ds.pixels()),
        data: data_spec.clone(),
        preset: preset.clone(),
        unet: unet_json,
        schedule,
        timesteps: pick(&args.timesteps, st.map(|s| s.timesteps), defaults::TIMESTEPS),
        prediction,
        batch: pick(&args.batch, st.map(|s| s.batch), defaults::BATCH),
        flip: args.flip || st.is_some_and(|s| s.flip),
        cond_drop,
    };
    let so = saved_trainer.as_ref();
    let default_opt = AdamWConfig::default();
    let saved_opt = so.map(|t| t.optimizer.clone());
    let grad_clip = match args.grad_clip {
        Some(g) => (g > 0.0).then_some(g),
        None => saved_opt.as_ref().map_or(default_opt.grad_clip, |o| o.grad_clip),
    };
    let trainer_config = TrainerConfig {
        seed: pick(&args.seed, so.map(|t| t.seed), defaults::SEED),
        optimizer: AdamWConfig {
            lr: pick(&args.lr, saved_opt.as_ref().map(|o| o.lr), defaults::LR),
            warmup_steps: pick(
                &args.warmup,
                saved_opt.as_ref().map(|o| o.warmup_steps),
                defaults::WARMUP,
            ),
            weight_decay: pick(
                &args.weight_decay,
                saved_opt.as_ref().map(|o| o.weight_decay),
                defaults::WEIGHT_DECAY,
            ),
            grad_clip,
            ..saved_opt.clone().unwrap_or_default()
        },
        ema: EmaConfig {
            decay: pick(&args.ema_decay, so.map(|t| t.ema.decay), defaults::EMA_DECAY),
            warmup: so.is_none_or(|t| t.ema.warmup),
        },
    };
    let budget = Budget {
        steps: args.steps.or(if args.minutes.is_none() {
            Some(defaults::STEPS)
        } else {
            None
        }),
        minutes: args.minutes,
    };
    let device = super::device()?;
    let unet_config = config.unet_config()?;
    let params = unet::num_parameters(&unet_config)?;
    if !args.json {
        println!("data: {} ({} images, {c}x{h}x{w})", ds.source(), ds.len());
        println!(
            "model: U-Net preset '{preset}', {params} parameters; {} schedule, T = {}, predicts {}",
            config.schedule.name(),
            config.timesteps,
            config.prediction.name()
        );
        if let (Some(k), Some(p)) = (num_classes, cond_drop) {
            println!(
                "class-conditional: {k} classes, label dropout {p} (--unconditional to train without labels)"
            );
        }
    }
    let interrupt = super::interrupt_on_signals()?;
    let grid = GridSampling {
        n: args.grid_size,
        steps: args.grid_steps,
        seed: trainer_config.seed,
        guidance_scale: args.grid_guidance_scale.unwrap_or(DEFAULT_GUIDANCE_SCALE),
    };
    let mut run = ImageRun::setup_on(
        &run_dir,
        ds,
        &config,
        &trainer_config,
        grid,
        resume,
        &device,
        comm.clone(),
    )?;
    if resume && !args.json {
        println!("resuming {} at step {}", run_dir.display(), run.trainer.step());
    }
    // the sample-quality figure: digit-shaped data only, one process only
    let digits = diffuse::train::image::digit_shaped([c, h, w]);
    let fid_every = match args.fid_every {
        Some(k) if k > 0 && !digits => {
            return super::usage(format!(
                "--fid-every: the bundled digit features need 1-channel 28x28 or 16x16 images, these are {c}x{h}x{w} (use --fid-every 0)"
            ))
        }
        Some(k) => k,
        None if digits => defaults::FID_EVERY,
        None => 0,
    };
    let fid_every = if comm.size() > 1 { 0 } else { fid_every };
    if fid_every > 0 {
        let reference = data::load(&data_spec.with_split(Split::Test));
        match reference {
            Ok(reference) => {
                let q = diffuse::train::image::QualityEval::digits(
                    run.task.data(),
                    &reference,
                    args.fid_samples,
                    &args.fid_sampler,
                    args.fid_steps,
                    trainer_config.seed,
                    args.grid_guidance_scale.unwrap_or(DEFAULT_GUIDANCE_SCALE),
                )?;
                if !args.json {
                    println!(
                        "sample quality every {fid_every} steps: FD of the bundled digit features of {} samples ({} {} steps) against {} test images; real training images: {}",
                        args.fid_samples,
                        args.fid_sampler,
                        args.fid_steps,
                        reference.len(),
                        q.floor.map_or("n/a".into(), |f| format!("{f:.3}"))
                    );
                }
                run.task.set_quality(Some(q))?;
            }
            Err(e) if args.fid_every.is_some() => return Err(e.into()),
            Err(_) => {
                if !args.json {
                    println!(
                        "sample quality: not measured ({} has no test split to compare against)",
                        data_spec.data
                    );
                }
            }
        }
    }
    let options = LoopOptions {
        checkpoint_every: args.checkpoint_every,
        hook_every: args.sample_every,
        eval_every: fid_every,
        progress: !args.json,
    };
    let outcome = run.trainer.run(&mut run.task, &budget, &options, &interrupt)?;
    let losses: Vec<f64> = run.trainer.metrics().iter().map(|r| r.loss).collect();
    let tail = &losses[losses.len().saturating_sub(100)..];
    let final_mean = tail.iter().sum::<f64>() / tail.len().max(1) as f64;
    let rate = outcome.session_steps as f64 / outcome.session_seconds.max(1e-9);
    let last_eval = run
        .trainer
        .metrics()
        .iter()
        .rev()
        .find_map(|r| r.eval.clone().map(|e| (r.step, e)));
    let stopped = match outcome.stop {
        StopReason::Steps => "steps",
        StopReason::Time => "time",
        StopReason::Interrupted => "interrupted",
    };
    if args.json {
        let mut summary = json!({
                "step": outcome.step,
                "session_steps": outcome.session_steps,
                "seconds": outcome.session_seconds,
                "steps_per_second": rate,
                "final_loss_mean_last_100": final_mean,
                "stopped": stopped,
                "parameters": params,
                "checkpoint": outcome.checkpoint,
                "metrics": run_dir.join(METRICS_FILE),
                "loss_curve": run_dir.join(LOSS_CURVE_FILE),
                "samples": run_dir.join("samples.png"),
        });
        if let Some(x) = &outcome.exchange {
            summary["data_parallel"] = json!(x);
        }
        if let Some((step, e)) = &last_eval {
            summary["eval"] = json!({ "step": step, "metric": e.metric, "value": e.value, "real": e.real,
                                      "n_samples": e.n_samples, "sampler": e.sampler, "seconds": e.seconds });
        }
        println!("{summary}");
    } else {
        if outcome.stop == StopReason::Interrupted {
            println!(
                "interrupted at step {}; checkpoint written; continue with: diffuse train --resume {}",
                outcome.step,
                run_dir.display()
            );
        }
        println!(
            "trained {} steps in {:.0} s ({rate:.2} steps/s), now at step {}; loss {final_mean:.4} (mean of the last {})",
            outcome.session_steps,
            outcome.session_seconds,
            outcome.step,
            tail.len()
        );
        if let Some((step, e)) = &last_eval {
            println!(
                "FD of the bundled digit features at step {step}: {:.3} ({} samples, {}; real training images: {}; {:.0} s)",
                e.value,
                e.n_samples,
                e.sampler,
                e.real.map_or("n/a".into(), |r| format!("{r:.3}")),
                e.seconds
            );
        }
        println!(
            "wrote {}, {}, {}, {}",
            outcome.checkpoint.display(),
            run_dir.join(METRICS_FILE).display(),
            run_dir.join(LOSS_CURVE_FILE).display(),
            run_dir.join("samples.png").display()
        );
        println!(
            "sample with: diffuse sample --checkpoint {} --n 64 --out DIR",
            run_dir.display()
        );
        if let Some(x) = &outcome.exchange {
            println!("{}", x.summary());
        }
    }
    Ok(())
}
