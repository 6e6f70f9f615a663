//! `diffuse toy`: low-dimensional diffusion with the exact Gaussian-mixture oracle (or, once
//! wired, a learned toy model): sampling with any sampler, likelihoods by the probability-flow
//! ODE, score fields, and the sampler report.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use diffuse::denoiser::{Denoiser, NoiseLevel};
use diffuse::eval::distance::energy_distance;
use diffuse::eval::report::{report_markdown, sampler_report_models, ReportConfig};
use diffuse::gmm::{Covariance, Gmm};
use diffuse::guidance::{parse_classes, ClassConditional};
use diffuse::nets::mlp::MlpDenoiser;
use diffuse::ode_likelihood::{log_likelihood_checked, Divergence, LikelihoodOptions, Probe, ScoreJacobian};
use diffuse::oracle::{ConditionalOracle, Oracle};
use diffuse::plot2d::{project, robust_range, samples_figure, score_field_figure, trajectory_figure};
use diffuse::process::{ddpm_level, Process};
use diffuse::samplers::rk45::Rk45Options;
use diffuse::samplers::{
    build_sampler, sample_batched_from, sample_batched_guided, InitNoise, Observer, SamplerKind, StepEvent,
    Trajectory,
};
use diffuse::schedule::Schedule;

use super::usage;

#[derive(Args, Debug)]
pub struct ToyArgs {
    // boxed: the subcommands' flags are large and the top-level Command enum holds this inline
    #[command(subcommand)]
    command: Box<ToyCommand>,
}

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // parsed once per run
enum ToyCommand {
    /// Train the MLP denoiser on 2-D toy data, points from a file, or a Gaussian mixture.
    Train(super::toy_train::ToyTrainArgs),
    /// Draw samples with any sampler/process pair; writes float32 .npy [N, D].
    Sample(SampleArgs),
    /// Log-likelihood of points by the probability-flow ODE (nats and bits/dim).
    Nll(NllArgs),
    /// Draw the score of the noisy marginal as arrows at several times (2-D models).
    ScoreField(ScoreFieldArgs),
    /// The sampler report: energy distance to true samples for every sampler at 10..1000 steps.
    Report(ReportArgs),
}

/// Where the denoiser comes from.
#[derive(Args, Debug)]
struct ModelArgs {
    /// A trained toy model directory (from `diffuse toy train`).
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with = "oracle",
        required_unless_present = "oracle"
    )]
    checkpoint: Option<PathBuf>,
    /// The exact denoiser of a Gaussian mixture, given as gmm:FILE.json with
    /// {"weights": [..], "means": [[..]], "covariances": [[[..]]]} or "stds": [..] instead of covariances.
    #[arg(long, value_name = "gmm:FILE.json")]
    oracle: Option<String>,
}

/// The forward process.
#[derive(Args, Debug)]
struct ProcessArgs {
    /// Forward process: ddpm (discrete), vp, vp-cosine, subvp, ve (Score-SDE), seed-ve (seed 000,
    /// sigma_q = 100).
    #[arg(long)]
    process: String,
    /// Beta schedule of the ddpm process: linear, scaled_linear, quadratic, cosine, sigmoid (default linear).
    #[arg(long)]
    schedule: Option<String>,
    /// Number of steps T of the ddpm process (default 1000).
    #[arg(long)]
    timesteps: Option<usize>,
}

impl ProcessArgs {
    fn build(&self) -> anyhow::Result<Process> {
        if self.process != "ddpm" && (self.schedule.is_some() || self.timesteps.is_some()) {
            return usage(format!(
                "--schedule and --timesteps apply to --process ddpm, not to --process {}",
                self.process
            ));
        }
        let schedule = || {
            Schedule::named(
                self.schedule.as_deref().unwrap_or("linear"),
                self.timesteps.unwrap_or(1000),
            )
        };
        Ok(Process::from_name(&self.process, schedule)?)
    }
}

#[derive(Args, Debug)]
struct SampleArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    process: ProcessArgs,
    #[arg(long, help = diffuse::samplers::registry::sampler_help())]
    sampler: String,
    #[command(flatten)]
    opts: super::common::SamplerFlags,
    /// Number of samples (default with --init-noise: the file's rows).
    #[arg(long, required_unless_present = "init_noise")]
    n: Option<usize>,
    /// Seed: sample i uses stream i of this seed, whatever the batch size.
    #[arg(long)]
    seed: u64,
    /// Start from these standard-normal draws z instead of drawing them: a float32/float64 .npy
    /// of shape [N, D]; each sampler scales z to its own prior (x_T = prior std * z, as diffusers'
    /// `init_noise_sigma`). Later draws of stochastic samplers still come from --seed.
    #[arg(long, value_name = "FILE.npy")]
    init_noise: Option<PathBuf>,
    /// Class-conditional sampling: a class id (7), a list cycled over the samples (0,3,9), all
    /// (the classes in turn) or none (unconditional). An --oracle mixture's classes are its
    /// "labels" (default: one per component); a --checkpoint model must be class-conditional.
    #[arg(long)]
    class: Option<String>,
    /// Classifier-free guidance scale w: eps = eps_uncond + w (eps_cond - eps_uncond) (1: the
    /// conditional model, the default; 0: unconditional; > 1 guides past it). Needs --class.
    #[arg(long, allow_hyphen_values = true)]
    guidance_scale: Option<f64>,
    /// Samples per batch (does not change the samples).
    #[arg(long, default_value_t = 8192)]
    batch: usize,
    /// Output: float32 .npy of shape [N, D].
    #[arg(long, value_name = "FILE.npy")]
    out: PathBuf,
    /// Scatter plot of data (oracle) vs samples, first two coordinates.
    #[arg(long, value_name = "FILE.png")]
    plot: Option<PathBuf>,
    /// A few sample paths over time (first two coordinates, scaled by 1/sqrt(alpha^2 + sigma^2)).
    #[arg(long, value_name = "FILE.png")]
    trajectory: Option<PathBuf>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct NllArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    process: ProcessArgs,
    /// Points: float32 or float64 .npy of shape [N, D].
    #[arg(long, value_name = "FILE.npy")]
    points: PathBuf,
    /// Output JSON: {"log_likelihood": [...], "mean", "bits_per_dim", "nfe", "tolerance", ...}.
    /// `tolerance` is the worst error of log_likelihood over the points, in nats: the true error
    /// against the mixture's exact log-density with --oracle, otherwise the a-posteriori
    /// estimate of the integration error (a second solve at a tenth of --rtol and --atol;
    /// per point in `error_estimate`), which leaves out the model's own error and, with the
    /// Gaussian prior, the prior's mismatch.
    #[arg(long, value_name = "FILE.json")]
    out: PathBuf,
    /// Divergence: exact (closed form for the oracle; finite differences otherwise) or hutchinson.
    #[arg(long, default_value = "exact")]
    divergence: String,
    /// Hutchinson probes: rademacher or gaussian.
    #[arg(long, default_value = "rademacher")]
    probe: String,
    /// Seed of the Hutchinson probes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The time the points live at (default: 0 with --oracle, i.e. the clean data density;
    /// the process's t_eps for learned models).
    #[arg(long)]
    t_start: Option<f64>,
    /// Prior at t = 1: exact (the oracle's own marginal; default with --oracle) or gaussian
    /// (the process's N(0, prior_std^2 I); default and only choice for learned models).
    #[arg(long)]
    prior: Option<String>,
    /// RK45 relative tolerance (the default reaches 1e-3 nats on the exact denoiser of a
    /// mixture at points out to 3 standard deviations; see `tolerance` in the output).
    #[arg(long, default_value_t = diffuse::ode_likelihood::DEFAULT_TOLERANCE)]
    rtol: f64,
    /// RK45 absolute tolerance.
    #[arg(long, default_value_t = diffuse::ode_likelihood::DEFAULT_TOLERANCE)]
    atol: f64,
    /// Print a one-line JSON summary instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct ScoreFieldArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    process: ProcessArgs,
    /// Times in (0, 1], comma-separated (ddpm process: t/T).
    #[arg(long, default_value = "0.1,0.5,0.9", value_delimiter = ',')]
    t: Vec<f64>,
    /// Arrows per side of the grid.
    #[arg(long, default_value_t = 21)]
    grid: usize,
    /// Plot range xmin,xmax,ymin,ymax (default: around the data).
    #[arg(long, value_delimiter = ',', num_args = 4)]
    range: Option<Vec<f64>>,
    /// Output PNG.
    #[arg(long, value_name = "FILE.png")]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct ReportArgs {
    /// Mixture (gmm:FILE.json); default: the 2-D anisotropic 3-component mixture of the tests.
    #[arg(long, value_name = "gmm:FILE.json")]
    oracle: Option<String>,
    /// Also report a learned model (a `diffuse toy train` run trained on data from the same
    /// mixture, e.g. `--data gmm:FILE.json`), compared with the same fresh true samples.
    #[arg(long, value_name = "DIR")]
    checkpoint: Option<PathBuf>,
    /// Step counts of the fixed-step samplers (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = vec![10, 20, 50, 100, 1000])]
    steps: Vec<usize>,
    /// Samples per run.
    #[arg(long, default_value_t = 4000)]
    n: usize,
    /// Seed of the samplers.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the table (Markdown) to this file.
    #[arg(long, value_name = "FILE.md")]
    out: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: ToyArgs) -> anyhow::Result<()> {
    match *args.command {
        ToyCommand::Train(a) => super::toy_train::run(a),
        ToyCommand::Sample(a) => sample(a),
        ToyCommand::Nll(a) => nll(a),
        ToyCommand::ScoreField(a) => score_field(a),
        ToyCommand::Report(a) => report(a),
    }
}

/// A learned toy model from `dir` (a `diffuse toy train` run): the MLP with its EMA weights,
/// and the data dimension.
pub fn resolve_checkpoint(dir: &Path) -> anyhow::Result<(MlpDenoiser, usize)> {
    let net = MlpDenoiser::load(dir, true)?;
    let dim = net.mlp().config().dim;
    Ok((net, dim))
}

/// The denoiser a command runs on.
struct Model {
    oracle: Option<Oracle>,
    net: Option<MlpDenoiser>,
    dim: usize,
    /// A learned model's training points (row-major, n x dim), when they can be regenerated.
    data: Option<Vec<f64>>,
}

impl Model {
    fn denoiser(&self) -> &dyn Denoiser {
        match (&self.oracle, &self.net) {
            (Some(o), _) => o,
            (None, Some(n)) => n,
            // Model::load sets one of the two
            (None, None) => unreachable!("a model has an oracle or a network"),
        }
    }

    fn jacobian(&self) -> Option<&dyn ScoreJacobian> {
        self.oracle.as_ref().map(|o| o as &dyn ScoreJacobian)
    }

    fn gmm(&self) -> Option<&Gmm> {
        self.oracle.as_ref().map(|o| o.gmm())
    }

    /// f64 for the oracle (exact arithmetic end to end), f32 for networks.
    fn dtype(&self) -> DType {
        if self.oracle.is_some() {
            DType::F64
        } else {
            DType::F32
        }
    }

    fn load(m: &ModelArgs) -> anyhow::Result<Self> {
        if let Some(spec) = &m.oracle {
            let gmm = parse_oracle(spec)?;
            return Ok(Model {
                dim: gmm.dim(),
                oracle: Some(Oracle::new(gmm)),
                net: None,
                data: None,
            });
        }
        match &m.checkpoint {
            Some(dir) => {
                let (net, dim) = resolve_checkpoint(dir)?;
                let data = diffuse::train::toy::training_points(dir)
                    .ok()
                    .map(|p| p.as_slice().to_vec());
                Ok(Model {
                    oracle: None,
                    net: Some(net),
                    dim,
                    data,
                })
            }
            None => usage("give --checkpoint DIR or --oracle gmm:FILE.json"),
        }
    }
}

fn parse_oracle(spec: &str) -> anyhow::Result<Gmm> {
    match spec.strip_prefix("gmm:") {
        Some(file) if !file.is_empty() => Ok(Gmm::from_json_file(Path::new(file))?),
        _ => usage(format!("--oracle {spec}: expected gmm:FILE.json")),
    }
}

/// The default mixture of the sampler report and the oracle tests: 2-D, anisotropic, three components.
fn default_mixture() -> anyhow::Result<Gmm> {
    Ok(Gmm::new(
        vec![0.5, 0.3, 0.2],
        vec![vec![-2.0, 0.0], vec![1.5, 1.0], vec![1.0, -1.5]],
        vec![
            Covariance::Full(vec![0.6, 0.25, 0.25, 0.2]),
            Covariance::Full(vec![0.1, -0.05, -0.05, 0.4]),
            Covariance::Isotropic(0.04),
        ],
    )?)
}

/// Progress on stderr (hidden when stderr is not a terminal).
struct Progress {
    bar: ProgressBar,
}

impl Observer for Progress {
    fn observe(&mut self, e: &StepEvent) -> diffuse::Result<()> {
        self.bar.set_position(e.step as u64);
        Ok(())
    }
}

/// Sends each event to two observers.
struct Both<'a>(&'a mut dyn Observer, &'a mut dyn Observer);

impl Observer for Both<'_> {
    fn observe(&mut self, e: &StepEvent) -> diffuse::Result<()> {
        self.0.observe(e)?;
        self.1.observe(e)
    }
}

fn sample(a: SampleArgs) -> anyhow::Result<()> {
    let model = Model::load(&a.model)?;
    let process = a.process.build()?;
    let kind = SamplerKind::from_name(&a.sampler)?;
    let d = model.dim;
    let init = match &a.init_noise {
        Some(p) => Some(InitNoise::from_npy(p, &[d])?),
        None => None,
    };
    let n = match (a.n, &init) {
        (Some(n), _) => n,
        (None, Some(z)) => z.rows(),
        (None, None) => return usage("--n is required"),
    };
    if n == 0 {
        return usage("--n must be at least 1");
    }
    let options = a.opts.options(kind)?;
    let sampler = build_sampler(kind, &process, &options)?;
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} step {pos} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_message(format!("{} on {}", kind.name(), process.name()));
    let mut progress = Progress { bar };
    let mut traj = Trajectory::new(12, 1);
    if a.guidance_scale.is_some() && a.class.is_none() {
        return usage("--guidance-scale needs --class (the class to guide towards)");
    }
    let cond_oracle = match (&a.class, model.gmm()) {
        (Some(_), Some(g)) => Some(ConditionalOracle::new(g.clone())?),
        _ => None,
    };
    let cond: Option<&dyn ClassConditional> = match (&a.class, &cond_oracle, &model.net) {
        (None, _, _) => None,
        (Some(_), Some(o), _) => Some(o),
        (Some(_), None, Some(net)) => {
            if net.mlp().config().num_classes.is_none() {
                return usage(
                    "--class: the model is unconditional (trained without labels); --class and --guidance-scale need a class-conditional --checkpoint or an --oracle",
                );
            }
            Some(net)
        }
        (Some(_), None, None) => None,
    };
    let classes = match (&a.class, cond) {
        (Some(spec), Some(m)) => Some(parse_classes(spec, n, m.num_classes())?),
        _ => None,
    };
    let scale = a.guidance_scale.unwrap_or(1.0);
    let start = Instant::now();
    let out = {
        let mut both = Both(&mut progress, &mut traj);
        match (cond, &classes) {
            (Some(m), Some(classes)) => sample_batched_guided(
                sampler.as_ref(),
                m,
                classes,
                scale,
                &[d],
                a.seed,
                a.batch,
                init.as_ref(),
                model.dtype(),
                &Device::Cpu,
                &mut both,
            )?,
            _ => sample_batched_from(
                sampler.as_ref(),
                model.denoiser(),
                n,
                &[d],
                a.seed,
                a.batch,
                init.as_ref(),
                model.dtype(),
                &Device::Cpu,
                &mut both,
            )?,
        }
    };
    progress.bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    let x = out.x.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let x32: Vec<f32> = x.iter().map(|v| *v as f32).collect();
    diffuse::io::write_npy_f32(&a.out, &[n, d], &x32)?;

    // fresh true samples for an oracle (of the requested class when one class was asked for);
    // a learned model's training points otherwise
    let one_class = classes.as_ref().and_then(|c| {
        c.first()
            .copied()
            .flatten()
            .filter(|&c0| c.iter().all(|&x| x == Some(c0)))
    });
    let target = match (model.gmm(), one_class) {
        (Some(g), Some(c)) => Some(g.class_mixture(c)?),
        (Some(g), None) => Some(g.clone()),
        _ => None,
    };
    let truth = target
        .as_ref()
        .map(|g| g.sample(n, a.seed ^ 0x7275_7468))
        .or_else(|| model.data.as_ref().map(|p| p[..p.len().min(n * d)].to_vec()));
    let energy = match &truth {
        Some(t) if (2..=20_000).contains(&n) && t.len() >= 2 * d => Some(energy_distance(&x, t, d)?),
        _ => None,
    };
    let reference = if model.gmm().is_some() {
        "fresh data samples"
    } else {
        "training points"
    };
    let title = match (&a.class, classes.is_some()) {
        (Some(c), true) => format!("{} on {}, class {c}, w = {scale}", kind.name(), process.name()),
        _ => format!("{} on {}", kind.name(), process.name()),
    };
    if let Some(path) = &a.plot {
        samples_figure(path, &x, truth.as_deref(), d, &title)?;
    }
    if let Some(path) = &a.trajectory {
        trajectory_figure(path, &traj, truth.as_deref(), d, &title)?;
    }
    let summary = json!({
        "out": a.out,
        "n": n,
        "dim": d,
        "sampler": kind.name(),
        "process": process.name(),
        "nfe": out.nfe,
        "seconds": seconds,
        "init_noise": a.init_noise,
        "class": a.class,
        "guidance_scale": classes.as_ref().map(|_| scale),
        "energy_distance_to_fresh_data": if model.gmm().is_some() { energy } else { None },
        "energy_distance_to_training_data": if model.gmm().is_none() { energy } else { None },
    });
    if a.json {
        println!("{summary}");
    } else {
        println!(
            "wrote {} ({} samples, D = {d}); {} on {}: NFE {}, {:.2} s",
            a.out.display(),
            n,
            kind.name(),
            process.name(),
            out.nfe,
            seconds
        );
        if let Some(e) = energy {
            let m = truth.as_ref().map_or(0, |t| t.len() / d);
            println!("energy distance to {m} {reference}: {e:.6}");
        }
    }
    Ok(())
}

fn nll(a: NllArgs) -> anyhow::Result<()> {
    let model = Model::load(&a.model)?;
    let process = a.process.build()?;
    let Process::Continuous(sde) = &process else {
        return usage(
            "toy nll integrates the probability-flow ODE and needs a continuous process (vp, vp-cosine, subvp, ve, seed-ve)",
        );
    };
    // [N, D], N >= 1, every value finite: checked as the file is read (bad input, exit 2)
    let pts = diffuse::data::toy2d::read_npy_points(&a.points)?;
    let d = model.dim;
    if pts.dim() != d {
        return Err(diffuse::Error::bad_input(
            &a.points,
            format!(
                "expected an array of shape [N, {d}] (the model's dimension), got [{}, {}]",
                pts.len(),
                pts.dim()
            ),
        )
        .into());
    }
    let n = pts.len();
    let divergence = match a.divergence.as_str() {
        "exact" => Divergence::Exact,
        "hutchinson" => Divergence::Hutchinson {
            probe: match a.probe.as_str() {
                "rademacher" => Probe::Rademacher,
                "gaussian" => Probe::Gaussian,
                other => return usage(format!("--probe {other}: expected rademacher or gaussian")),
            },
            seed: a.seed,
        },
        other => return usage(format!("--divergence {other}: expected exact or hutchinson")),
    };
    let exact_prior = match a.prior.as_deref() {
        None => model.oracle.is_some(),
        Some("exact") if model.oracle.is_some() => true,
        Some("exact") => {
            return usage("--prior exact needs --oracle (a learned model has no exact marginal)")
        }
        Some("gaussian") => false,
        Some(other) => return usage(format!("--prior {other}: expected exact or gaussian")),
    };
    let t_start = match a.t_start {
        Some(t) => t,
        None if model.oracle.is_some() && sde.level(0.0).sigma == 0.0 => 0.0,
        None => sde.t_eps(),
    };
    let options = LikelihoodOptions {
        divergence,
        rk45: Rk45Options {
            rtol: a.rtol,
            atol: a.atol,
            ..Default::default()
        },
        t_start: Some(t_start),
    };
    let x = candle_core::Tensor::from_vec(pts.as_slice().to_vec(), (n, d), &Device::Cpu)?;
    let start = Instant::now();
    let p1 = match (exact_prior, model.oracle.as_ref()) {
        (true, Some(o)) => {
            let l = sde.level(sde.t_max());
            Some(o.gmm().noisy(l.alpha, l.sigma)?)
        }
        _ => None,
    };
    let prior = p1.as_ref().map(|g| move |z: &[f64]| g.log_density(z));
    let (ll, estimate) = log_likelihood_checked(
        model.denoiser(),
        model.jacobian(),
        sde,
        &x,
        &options,
        prior.as_ref().map(|p| p as &dyn Fn(&[f64]) -> f64),
    )
    .with_context(|| format!("likelihood of {}", a.points.display()))?;
    let seconds = start.elapsed().as_secs_f64();
    let mean = ll.log_likelihood.iter().sum::<f64>() / n as f64;
    let bpd = -mean / (d as f64 * std::f64::consts::LN_2);
    let exact = match model.oracle.as_ref() {
        Some(o) => Some(o.log_density_rows(pts.as_slice(), sde.level(t_start))?),
        None => None,
    };
    let worst = |v: &mut dyn Iterator<Item = f64>| v.fold(0.0, f64::max);
    let (tolerance, tolerance_method) = match &exact {
        Some(e) => (
            worst(&mut ll.log_likelihood.iter().zip(e).map(|(a, b)| (a - b).abs())),
            "exact: the largest |log_likelihood - exact_log_likelihood| (the mixture's log-density)",
        ),
        None => (
            worst(&mut estimate.iter().copied()),
            "a posteriori: the largest |log_likelihood - a second solve at rtol/10, atol/10| (integration error only)",
        ),
    };
    let obj = json!({
        "log_likelihood": ll.log_likelihood,
        "mean": mean,
        "bits_per_dim": bpd,
        "nfe": ll.nfe,
        "process": sde.name(),
        "t_start": t_start,
        "prior": if exact_prior { "exact" } else { "gaussian" },
        "divergence": a.divergence,
        "exact_log_likelihood": exact,
        "tolerance": tolerance,
        "tolerance_method": tolerance_method,
        "error_estimate": estimate,
        "rtol": a.rtol,
        "atol": a.atol,
        "seconds": seconds,
    });
    diffuse::io::write_json(&a.out, &obj)?;
    if a.json {
        println!(
            "{}",
            json!({"out": a.out, "mean": mean, "bits_per_dim": bpd, "nfe": ll.nfe, "tolerance": tolerance})
        );
    } else {
        println!(
            "wrote {}: mean log-likelihood {mean:.6} nats ({bpd:.6} bits/dim) over {n} points, NFE {}, {seconds:.2} s",
            a.out.display(),
            ll.nfe
        );
        if exact.is_some() {
            println!("exact mixture log-density at t = {t_start}: largest difference {tolerance:.2e} nats");
        } else {
            println!("estimated integration error: at most {tolerance:.2e} nats (a second solve at a tenth of the tolerances)");
        }
    }
    Ok(())
}

fn score_field(a: ScoreFieldArgs) -> anyhow::Result<()> {
    let model = Model::load(&a.model)?;
    let process = a.process.build()?;
    let d = model.dim;
    if d != 2 {
        return usage(format!("score-field draws 2-D models; this one has D = {d}"));
    }
    if a.t.is_empty() || a.t.iter().any(|t| !(*t > 0.0 && *t <= 1.0)) {
        return usage(format!("--t {:?}: expected comma-separated times in (0, 1]", a.t));
    }
    if !(2..=200).contains(&a.grid) {
        return usage(format!("--grid {}: expected 2..=200 arrows per side", a.grid));
    }
    let truth = model.gmm().map(|g| g.sample(3000, 1)).or_else(|| {
        model
            .data
            .as_ref()
            .map(|p| p[..p.len().min(3000 * model.dim)].to_vec())
    });
    let range = match &a.range {
        Some(r) if r.len() == 4 && r[0] < r[1] && r[2] < r[3] && r.iter().all(|v| v.is_finite()) => {
            ((r[0], r[1]), (r[2], r[3]))
        }
        Some(r) => {
            return usage(format!(
                "--range {r:?}: expected xmin,xmax,ymin,ymax with min < max"
            ))
        }
        None => match &truth {
            Some(t) => robust_range(&project(t, 2, 0, 1)),
            None => ((-4.0, 4.0), (-4.0, 4.0)),
        },
    };
    let levels: Vec<(String, NoiseLevel)> =
        a.t.iter()
            .map(|&t| {
                let level = match &process {
                    Process::Ddpm(s) => {
                        let n = s.timesteps();
                        ddpm_level(s, ((t * n as f64).round() as usize).clamp(1, n) - 1)
                    }
                    Process::Continuous(sde) => sde.level(t),
                };
                (format!("t = {t}"), level)
            })
            .collect();
    score_field_figure(&a.out, model.denoiser(), &levels, range, a.grid, truth.as_deref())?;
    println!(
        "wrote {} ({} panels, {} process)",
        a.out.display(),
        levels.len(),
        process.name()
    );
    Ok(())
}

fn report(a: ReportArgs) -> anyhow::Result<()> {
    let gmm = match &a.oracle {
        Some(spec) => parse_oracle(spec)?,
        None => default_mixture()?,
    };
    if a.n < 2 {
        return usage("--n must be at least 2");
    }
    let config = ReportConfig {
        n: a.n,
        seed: a.seed,
        steps: a.steps.clone(),
        ..Default::default()
    };
    let learned = match &a.checkpoint {
        Some(dir) => {
            let (net, dim) = resolve_checkpoint(dir)?;
            if dim != gmm.dim() {
                return usage(format!(
                    "--checkpoint {} models {dim}-D data, the mixture is {}-D",
                    dir.display(),
                    gmm.dim()
                ));
            }
            Some(net)
        }
        None => None,
    };
    let learned: Vec<(String, &dyn Denoiser)> = learned
        .as_ref()
        .map(|n| vec![("learned MLP".to_string(), n as &dyn Denoiser)])
        .unwrap_or_default();
    let report = sampler_report_models(&gmm, &config, &learned, &mut |label| eprintln!("{label}"))?;
    let md = report_markdown(&report);
    if let Some(path) = &a.out {
        diffuse::io::atomic_write(path, md.as_bytes())?;
    }
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{md}");
    }
    Ok(())
}
