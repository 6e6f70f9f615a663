//! `diffuse sample`: draw images from a trained model (a `diffuse train` run or a diffusers
//! folder) with any sampler; writes a grid, one PNG per image and `samples.npy`.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Tensor};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use diffuse::denoiser::NoiseLevel;
use diffuse::guidance::{Guided, DEFAULT_GUIDANCE_SCALE};
use diffuse::process::Process;
use diffuse::rng::NoiseStreams;
use diffuse::samplers::{draw_prior_from, InitNoise, Observer, SamplerKind, StepEvent};

use super::common::{ModelSource, SamplerFlags};

/// The default sampler and step count: ancestral DDPM sampling respaced to 100 steps gave the
/// best quality per second on the demo model, well ahead of DDIM, the probability-flow ODE and
/// EDM at equal or lower cost (README, "Sampling defaults"). Applies to ddpm and ddim runs
/// without --steps.
pub const DEFAULT_SAMPLER: &str = "ddpm";
/// See [`DEFAULT_SAMPLER`].
pub const DEFAULT_STEPS: usize = 100;
/// The x_0 clip of ddpm/ddim runs on our image models: the data range [-1, 1] (see `--no-clip-x0`).
pub const IMAGE_CLIP_X0: f64 = 1.0;

#[derive(Args, Debug)]
pub struct SampleArgs {
    #[command(flatten)]
    model: ModelSource,
    /// A scheduler_config.json for a --diffusers model (default: the folder's own).
    #[arg(long, value_name = "FILE")]
    scheduler_config: Option<PathBuf>,
    /// List on stderr the fields of a --diffusers model's config.json and scheduler_config.json
    /// that were ignored (diffusers keys this loader does not read; `_` metadata not listed).
    #[arg(long)]
    verbose: bool,
    #[arg(long, help = sampler_help())]
    sampler: Option<String>,
    /// Process the sampler runs: ddpm (the model's own discrete schedule), or a continuous family
    /// (vp, vp-cosine, subvp, ve) mapped onto the model by matching log-SNR.
    #[arg(long, default_value = "ddpm")]
    process: String,
    #[command(flatten)]
    opts: SamplerFlags,
    /// Number of images (default 64; with --init-noise, the file's rows).
    #[arg(long)]
    n: Option<usize>,
    /// Start from these standard-normal draws z instead of drawing them: a float32/float64 .npy
    /// of shape [N, C, H, W] (or [N, C*H*W]); each sampler scales z to its own prior
    /// (x_T = prior std * z, as diffusers' pipelines scale `latents` by `init_noise_sigma`), so the
    /// same file reproduces a diffusers run. Later draws of stochastic samplers still come from --seed.
    #[arg(long, value_name = "FILE.npy")]
    init_noise: Option<PathBuf>,
    /// Seed: image i uses stream i of this seed, whatever the batch size.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory: grid.png, images/NNNNNN.png, samples.npy (float32 [N, C, H, W] in [0, 1]), info.json.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Images per batch (does not change the images).
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Use the EMA weights (the default for --checkpoint models).
    #[arg(long, overrides_with = "no_ema")]
    ema: bool,
    /// Use the raw (non-EMA) weights of a --checkpoint model.
    #[arg(long)]
    no_ema: bool,
    /// Do not clip x_0 predictions of ddpm/ddim on a --checkpoint model. By default they are
    /// clipped to the data range [-1, 1] (what improved-diffusion's and diffusers' pipelines do):
    /// the exact denoiser E[x_0 | x_t] of images in [-1, 1] lies in that box, so clipping the
    /// estimate onto it never moves it further from the exact value, and it keeps schedules
    /// whose last beta is capped at 0.999 (cosine) from amplifying the first steps' error.
    #[arg(long)]
    no_clip_x0: bool,
    /// Class-conditional models: a class id (7), a list cycled over the images (0,3,9), all
    /// (every class in turn, the grid one labelled row per class; the default for a conditional
    /// model) or none (unconditional).
    #[arg(long)]
    class: Option<String>,
    /// Classifier-free guidance scale w: eps = eps_uncond + w (eps_cond - eps_uncond) (1: the
    /// plain conditional model, 0: unconditional; default for a conditional model: 2, measured
    /// best on the default run, see the README).
    #[arg(long, allow_hyphen_values = true)]
    guidance_scale: Option<f64>,
    /// Also write trajectory.png (x_t and the predicted x_0 of the first images through the
    /// reverse process) and trajectory.gif.
    #[arg(long)]
    trajectory: bool,
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

/// `--sampler`'s help: the registry's list and this command's defaults.
fn sampler_help() -> String {
    format!(
        "{} Default: a --diffusers folder's own scheduler (its scheduler_config.json's _class_name), \
         else ddpm (ancestral) respaced to 100 steps; ddpm and ddim without --steps take 100 steps \
         here (--steps 1000 for the full chain). The continuous processes are mapped onto the model \
         by matching log-SNR.",
        diffuse::samplers::registry::sampler_help()
    )
}

/// Records the first `rows` images' state (scaled to variance-preserving form) and x_0 prediction
/// at every step, and moves the progress bar.
struct Recorder {
    rows: usize,
    frames: Vec<(Tensor, Tensor)>,
    bar: ProgressBar,
    record: bool,
}

impl Observer for Recorder {
    fn observe(&mut self, e: &StepEvent) -> diffuse::Result<()> {
        self.bar.set_message(format!("step {}", e.step));
        if !self.record {
            return Ok(());
        }
        let k = self.rows.min(e.x.dim(0)?);
        let r = vp_scale(&e.level);
        let x = e.x.narrow(0, 0, k)?.affine(r, 0.0)?.clamp(-1.0, 1.0)?;
        let x0 = match e.x0_pred {
            Some(p) => p.narrow(0, 0, k)?.clamp(-1.0, 1.0)?,
            None => match self.frames.last() {
                Some((_, prev)) => prev.clone(),
                None => x.zeros_like()?,
            },
        };
        self.frames
            .push((x.to_dtype(DType::F32)?, x0.to_dtype(DType::F32)?));
        Ok(())
    }
}

/// `1 / sqrt(alpha^2 + sigma^2)`: shows a VE state at the scale of the data.
fn vp_scale(l: &NoiseLevel) -> f64 {
    let r = (l.alpha * l.alpha + l.sigma * l.sigma).sqrt();
    if r.is_finite() && r > 0.0 {
        1.0 / r
    } else {
        1.0
    }
}

pub fn run(a: SampleArgs) -> anyhow::Result<()> {
    super::set_threads(a.threads)?;
    super::set_precision(&a.precision)?;
    if a.n == Some(0) || a.batch == 0 {
        return super::usage("--n and --batch must be at least 1");
    }
    if a.ema && a.no_ema {
        return super::usage("--ema and --no-ema contradict each other");
    }
    let model = a
        .model
        .load(!a.no_ema, a.scheduler_config.as_deref(), a.verbose)?;
    if model.denoiser.num_classes().is_none() && (a.class.is_some() || a.guidance_scale.is_some()) {
        return super::usage(format!(
            "--class and --guidance-scale need a class-conditional model; {} is unconditional",
            model.source
        ));
    }
    let sampler_name = match (&a.sampler, &model.scheduler) {
        (Some(s), _) => s.clone(),
        (None, Some(cfg)) => diffuse::samplers::diffusers::sampler_of_config(cfg).to_string(),
        (None, None) => DEFAULT_SAMPLER.to_string(),
    };
    let kind = SamplerKind::from_name(&sampler_name)?;
    let schedule = model.schedule().clone();
    let process = Process::from_name(&a.process, || Ok(schedule.clone()))?;
    let mut opts = a.opts.clone();
    let chain_sampler = matches!(kind.name(), "ddpm" | "ddim");
    if chain_sampler && opts.steps.is_none() {
        opts.steps = Some(DEFAULT_STEPS.min(schedule.timesteps()));
    }
    let discrete = chain_sampler && a.process == "ddpm";
    // A diffusers model's DDPM/DDIM run follows its scheduler config exactly (spacing,
    // steps_offset, set_alpha_to_one, clip_sample, variance_type), as its pipeline would,
    // unless the user overrides one of those choices.
    let follow_scheduler = discrete
        && opts.spacing.is_none()
        && opts.clip_x0.is_none()
        && opts.variance.is_none()
        && model.scheduler.is_some();
    // A fast solver on a diffusers folder follows its scheduler config (as diffusers'
    // `XScheduler.from_config`) unless the user chose a grid or solver option.
    let follow_fast = !chain_sampler
        && a.process == "ddpm"
        && model.scheduler.is_some()
        && diffuse::samplers::registry::SamplerOptions {
            steps: None,
            ..opts.options(kind)?
        } == Default::default();
    let fast_from_config = match (&model.scheduler, follow_fast) {
        (Some(cfg), true) => {
            let steps = opts.steps.or(kind.default_steps(&process)).unwrap_or(1);
            diffuse::samplers::diffusers::scheduler_sampler(cfg, &schedule, kind.name(), steps)?
                .map(|s| (s, steps))
        }
        _ => None,
    };
    let follow_scheduler = follow_scheduler || fast_from_config.is_some();
    let (sampler, steps): (Box<dyn diffuse::samplers::Sampler>, Option<usize>) = if let Some((s, k)) =
        fast_from_config
    {
        (s, Some(k))
    } else if follow_scheduler {
        let cfg = model.scheduler.clone().unwrap_or_default();
        let steps = opts.steps.unwrap_or(cfg.num_train_timesteps);
        let s = diffuse::samplers::diffusers::from_scheduler_config(&cfg, &schedule, kind, steps, opts.eta)?;
        (Box::new(s), Some(steps))
    } else {
        if discrete && opts.spacing.is_none() {
            // trailing reaches t = T (field notes, bug 1)
            opts.spacing = Some("trailing".into());
        }
        if discrete && model.scheduler.is_none() && opts.clip_x0.is_none() && !a.no_clip_x0 {
            opts.clip_x0 = Some(IMAGE_CLIP_X0);
        }
        let options = opts.options(kind)?;
        (
            diffuse::samplers::build_sampler(kind, &process, &options)?,
            options.steps,
        )
    };
    let clip_x0 = if follow_scheduler {
        model.default_clip_x0()
    } else {
        opts.clip_x0
    };
    let device = super::device()?;
    let [c, h, w] = model.shape;
    let num_classes = model.denoiser.num_classes();
    let init = match &a.init_noise {
        Some(p) => Some(InitNoise::from_npy(p, &[c, h, w])?),
        None => None,
    };
    let n = match (a.n, &init) {
        (Some(n), Some(z)) => {
            z.check_rows(n)?;
            n
        }
        (Some(n), None) => n,
        (None, Some(z)) => z.rows(),
        (None, None) => 64,
    };
    let (classes, scale): (Option<Vec<Option<usize>>>, f64) = match num_classes {
        None => {
            if a.class.is_some() || a.guidance_scale.is_some() {
                return super::usage(format!(
                    "--class and --guidance-scale need a class-conditional model; {} is unconditional",
                    model.source
                ));
            }
            (None, 1.0)
        }
        Some(k) => {
            let spec = a.class.as_deref().unwrap_or("all");
            let classes = diffuse::guidance::parse_classes(spec, n, k)?;
            // a conditional model without a null class (a foreign diffusers model) cannot be guided
            let default_scale = if diffuse::guidance::ClassConditional::has_null_class(&model.denoiser) {
                DEFAULT_GUIDANCE_SCALE
            } else {
                1.0
            };
            let scale = a.guidance_scale.unwrap_or(default_scale);
            diffuse::guidance::check_request(&model.denoiser, &classes, scale)?;
            (Some(classes), scale)
        }
    };

    let bar = if a.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(n as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} images [{elapsed_precise} < {eta_precise}] {msg}")
            .map_err(|e| anyhow::anyhow!("progress bar template: {e}"))?,
    );
    let mut recorder = Recorder {
        rows: 8,
        frames: Vec::new(),
        bar: bar.clone(),
        record: a.trajectory,
    };
    let start = Instant::now();
    let mut parts = Vec::new();
    let mut nfe = 0;
    let mut first = 0;
    while first < n {
        let b = a.batch.min(n - first);
        let mut noise = NoiseStreams::new(a.seed, first as u64, b);
        let x_t = draw_prior_from(
            sampler.as_ref(),
            &[c, h, w],
            &mut noise,
            init.as_ref().map(|z| (z, first)),
            DType::F32,
            &device,
        )?;
        let out = match &classes {
            None => sampler.sample(&model.denoiser, x_t, &mut noise, &mut recorder)?,
            Some(cl) => {
                let den = Guided::new(&model.denoiser, cl[first..first + b].to_vec(), scale)?;
                sampler.sample(&den, x_t, &mut noise, &mut recorder)?
            }
        };
        diffuse::denoiser::check_finite(&out.x, "the samples")?;
        nfe = nfe.max(out.nfe);
        parts.push(out.x.to_device(&candle_core::Device::Cpu)?);
        recorder.record = false; // the trajectory shows the first batch
        first += b;
        bar.inc(b as u64);
    }
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    let x = Tensor::cat(&parts, 0)?.clamp(-1.0, 1.0)?;

    // outputs
    std::fs::create_dir_all(&a.out).map_err(|e| diffuse::Error::io(&a.out, e))?;
    let unit: Vec<f32> = ((&x + 1.0)? * 0.5)?.flatten_all()?.to_vec1()?;
    diffuse::io::write_npy_f32(&a.out.join("samples.npy"), &[n, c, h, w], &unit)?;
    let shown = n.min(1024);
    let cols = (shown as f64).sqrt().ceil() as usize;
    match (&classes, a.class.as_deref().unwrap_or("all"), num_classes) {
        (Some(_), "all", Some(k)) if n >= k => {
            // one labelled row per class
            let per = n.div_ceil(k).min(64);
            let idx: Vec<u32> = (0..k)
                .flat_map(|cl| (cl * n.div_ceil(k)..((cl * n.div_ceil(k)) + per).min(n)).map(|i| i as u32))
                .collect();
            let full_rows = idx.len() == k * per;
            if full_rows {
                let pick = Tensor::from_vec(idx, k * per, x.device())?;
                let labels: Vec<String> = (0..k).map(|c| format!("class {c}")).collect();
                diffuse::image_out::save_labelled_grid(
                    &a.out.join("grid.png"),
                    &x.index_select(&pick, 0)?,
                    per,
                    &labels,
                    &format!("guidance scale {scale}"),
                )?;
            } else {
                diffuse::image_out::save_grid(&a.out.join("grid.png"), &x.narrow(0, 0, shown)?, cols)?;
            }
        }
        _ => diffuse::image_out::save_grid(&a.out.join("grid.png"), &x.narrow(0, 0, shown)?, cols)?,
    }
    diffuse::image_out::save_images(&a.out.join("images"), &x, "")?;
    if a.trajectory && !recorder.frames.is_empty() {
        let frames = &recorder.frames;
        let picks: Vec<usize> = {
            let m = frames.len();
            let k = 10.min(m);
            let mut v: Vec<usize> = (0..k).map(|j| j * (m - 1) / (k - 1).max(1)).collect();
            v.dedup();
            v
        };
        // Each column one time; each image's x_t directly above its predicted x_0.
        let pair = |i: usize| -> candle_core::Result<Tensor> {
            let (x, x0) = &frames[i];
            let mut dims = x.dims().to_vec();
            dims[0] *= 2;
            Tensor::stack(&[x, x0], 1)?.reshape(dims)
        };
        let strip: Vec<Tensor> = picks
            .iter()
            .map(|&i| pair(i))
            .collect::<candle_core::Result<_>>()?;
        diffuse::image_out::save_strip(&a.out.join("trajectory.png"), &strip)?;
        let gif_picks: Vec<usize> = {
            let m = frames.len();
            let k = 40.min(m);
            let mut v: Vec<usize> = (0..k).map(|j| j * (m - 1) / (k - 1).max(1)).collect();
            v.dedup();
            v
        };
        let gif: Vec<Tensor> = gif_picks
            .iter()
            .map(|&i| pair(i))
            .collect::<candle_core::Result<_>>()?;
        diffuse::image_out::save_gif(&a.out.join("trajectory.gif"), &gif, 120)?;
    }
    let info = diffuse::config::samples_info::SamplesInfo {
        n,
        shape: [c, h, w],
        sampler: kind.name().to_string(),
        process: process.name().to_string(),
        steps,
        clip_x0,
        nfe,
        seconds,
        images_per_second: n as f64 / seconds.max(1e-9),
        seed: a.seed,
        init_noise: a.init_noise.clone(),
        classes: classes.clone(),
        guidance_scale: classes.as_ref().map(|_| scale),
        model: model.source.clone(),
        training_data: model.data.clone(),
        out: a.out.clone(),
    };
    diffuse::io::write_json(&a.out.join("info.json"), &info)?;
    if a.json {
        println!("{}", serde_json::to_string(&info)?);
    } else {
        println!(
            "{} images from {} by {} on {} (NFE {nfe}) in {seconds:.1} s ({:.2} images/s)",
            n,
            model.source,
            kind.name(),
            process.name(),
            n as f64 / seconds.max(1e-9)
        );
        println!(
            "wrote {}/grid.png, {}/images/, {}/samples.npy{}",
            a.out.display(),
            a.out.display(),
            a.out.display(),
            if a.trajectory {
                ", trajectory.png, trajectory.gif"
            } else {
                ""
            }
        );
    }
    Ok(())
}
