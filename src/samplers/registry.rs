//! The sampler registry: one table, [`SAMPLERS`], of every sampler's declaration
//! ([`SamplerSpec`]: its name, the processes it runs on, its default steps, the options it takes
//! and its builder). Each sampler declares its spec in its own file (`ddpm.rs`, `ddim.rs`, ...);
//! `--help`, the README's sampler table (`diffuse samplers --markdown`), the "unsupported pair"
//! and "unused option" errors are all generated from this table, so adding a sampler is one new
//! file plus one line here.
//!
//! `spacing` is a DDIM timestep spacing on the `ddpm` process (`linspace` default, `leading`,
//! `trailing`, `quadratic`; with `--steps K < T` the chain is respaced) and a time grid on the
//! continuous ones (`uniform`, `log-snr` [the default for seed-ve], `karras`).
//! An unsupported pair or an option the sampler does not use is an error, not a guess.

use crate::error::{Error, Result};
use crate::process::Process;

use super::ddpm::Variance;
use super::ode::OdeVariable;
use super::pc::Predictor;
use super::Sampler;

/// Every process: the fast solvers run on the discrete chain and on every continuous family.
pub const ALL_PROCESSES: &[&str] = &["ddpm", "vp", "vp-cosine", "subvp", "ve", "seed-ve"];
/// The processes with a discrete reverse chain.
pub const DISCRETE: &[&str] = &["ddpm", "seed-ve"];
/// The continuous-time SDE families.
pub const CONTINUOUS: &[&str] = &["vp", "vp-cosine", "subvp", "ve", "seed-ve"];

/// A sampler option: one `--flag` of `toy sample` / `sample`, one field of [`SamplerOptions`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opt {
    /// `--eta`.
    Eta,
    /// `--spacing`.
    Spacing,
    /// `--variance`.
    Variance,
    /// `--clip-x0`.
    ClipX0,
    /// `--snr`.
    Snr,
    /// `--corrector-steps`.
    CorrectorSteps,
    /// `--predictor`.
    Predictor,
    /// `--rtol`.
    Rtol,
    /// `--atol`.
    Atol,
    /// `--churn`.
    Churn,
    /// `--ode-variable`.
    OdeVariable,
    /// `--order`.
    Order,
    /// `--solver-type`.
    SolverType,
    /// `--multistep`.
    Multistep,
    /// `--sigmas`.
    Sigmas,
    /// `--final-sigma`.
    FinalSigma,
    /// `--lower-order-final`.
    LowerOrderFinal,
    /// `--thresholding`.
    Thresholding,
    /// `--corrector`.
    Corrector,
}

impl Opt {
    /// Every option, in `--help` order.
    pub const ALL: [Opt; 19] = [
        Opt::Eta,
        Opt::Spacing,
        Opt::Variance,
        Opt::ClipX0,
        Opt::Snr,
        Opt::CorrectorSteps,
        Opt::Predictor,
        Opt::Rtol,
        Opt::Atol,
        Opt::Churn,
        Opt::OdeVariable,
        Opt::Order,
        Opt::SolverType,
        Opt::Multistep,
        Opt::Sigmas,
        Opt::FinalSigma,
        Opt::LowerOrderFinal,
        Opt::Thresholding,
        Opt::Corrector,
    ];

    /// The flag name, without `--`.
    pub fn flag(&self) -> &'static str {
        match self {
            Opt::Eta => "eta",
            Opt::Spacing => "spacing",
            Opt::Variance => "variance",
            Opt::ClipX0 => "clip-x0",
            Opt::Snr => "snr",
            Opt::CorrectorSteps => "corrector-steps",
            Opt::Predictor => "predictor",
            Opt::Rtol => "rtol",
            Opt::Atol => "atol",
            Opt::Churn => "churn",
            Opt::OdeVariable => "ode-variable",
            Opt::Order => "order",
            Opt::SolverType => "solver-type",
            Opt::Multistep => "multistep",
            Opt::Sigmas => "sigmas",
            Opt::FinalSigma => "final-sigma",
            Opt::LowerOrderFinal => "lower-order-final",
            Opt::Thresholding => "thresholding",
            Opt::Corrector => "corrector",
        }
    }

    /// What the option means (the `--help` text, before the list of samplers that take it).
    pub fn about(&self) -> &'static str {
        match self {
            Opt::Eta => "DDIM's eta in [0, 1] (default 0: deterministic).",
            Opt::Spacing => {
                "Timestep spacing on the ddpm process (linspace [default], leading, trailing, \
                 quadratic) or time grid on continuous processes (uniform [default], log-snr \
                 [default for seed-ve], karras)."
            }
            Opt::Variance => "Ancestral variance: small (beta~, default) or large (beta).",
            Opt::ClipX0 => "Clip x_0 predictions to [-C, C] (default off; `diffuse sample` on a --checkpoint image model: 1, the data range, unless --no-clip-x0).",
            Opt::Snr => "Signal-to-noise ratio of the Langevin corrector (default 0.16).",
            Opt::CorrectorSteps => "Langevin corrector steps per time (default 1).",
            Opt::Predictor => "Predictor: reverse-diffusion (default) or euler-maruyama.",
            Opt::Rtol => "Relative tolerance of the adaptive solver (default 1e-5).",
            Opt::Atol => "Absolute tolerance of the adaptive solver (default 1e-5).",
            Opt::Churn => "Stochastic churn S_churn (default 0).",
            Opt::OdeVariable => {
                "Take the steps in t or in sigma = (noise std)/alpha (default: sigma for ve and \
                 seed-ve, t otherwise)."
            }
            Opt::Order => "Solver order 1, 2 or 3 (default 2; dpm-solver's singlestep order 3 is DPM-Solver-3).",
            Opt::SolverType => {
                "Second-order form: midpoint (default) or heun for the DPM-Solvers, bh1 or bh2 \
                 (default) for unipc."
            }
            Opt::Multistep => "true (default): multistep, one NFE per step; false: singlestep (DPM-Solver's original).",
            Opt::Sigmas => {
                "Noise-level grid: spacing (the --spacing timesteps, diffusers' default), karras, \
                 exponential, beta, logsnr (uniform in log-SNR), time-quadratic, time-cubic, \
                 time-quartic (uniform in t^(1/p): finer near the data)."
            }
            Opt::FinalSigma => {
                "Where the last step lands: zero (the denoised x_0; default for most) or sigma-min \
                 (keeps noise of the smallest training sigma; default and only choice for \
                 dpm-solver and deis)."
            }
            Opt::LowerOrderFinal => "true (default): lower the order of the last steps for fewer than 15 steps (diffusers' lower_order_final).",
            Opt::Thresholding => "Imagen's dynamic thresholding of x_0 (ratio 0.995, max 1), for high guidance scales.",
            Opt::Corrector => "true (default): UniPC's UniC corrector after each step; false: the predictor UniP alone.",
        }
    }

    /// `--help` text: [`Opt::about`] and the samplers that take the option (from the table).
    pub fn help(&self) -> String {
        let users: Vec<&str> = SAMPLERS
            .iter()
            .filter(|s| s.options.contains(self))
            .map(|s| s.name)
            .collect();
        format!("{} Applies to: {}.", self.about(), users.join(", "))
    }
}

/// Options of [`build_sampler`]; `None` means the sampler's default. Setting an option the
/// sampler does not declare is an error.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SamplerOptions {
    /// Number of steps K (ddpm process: 1 <= K <= T; K < T respaces).
    pub steps: Option<usize>,
    /// DDIM's eta in [0, 1] (default 0).
    pub eta: Option<f64>,
    /// Timestep spacing (ddpm process) or time grid (continuous processes).
    pub spacing: Option<String>,
    /// DDPM variance (default fixed-small).
    pub variance: Option<Variance>,
    /// Clip x_0 predictions to [-c, c] (ddpm, ddim; default off).
    pub clip_x0: Option<f64>,
    /// PC: the Langevin snr (default 0.16).
    pub snr: Option<f64>,
    /// PC: Langevin steps per time (default 1).
    pub corrector_steps: Option<usize>,
    /// PC: the predictor (default reverse diffusion).
    pub predictor: Option<Predictor>,
    /// RK45 relative tolerance (default 1e-5).
    pub rtol: Option<f64>,
    /// RK45 absolute tolerance (default 1e-5).
    pub atol: Option<f64>,
    /// EDM S_churn (default 0).
    pub churn: Option<f64>,
    /// ode-euler/ode-heun: step in t or in the EDM sigma (default: sigma for ve and seed-ve, t otherwise).
    pub ode_variable: Option<OdeVariable>,
    /// Fast solvers: the order.
    pub order: Option<usize>,
    /// Fast solvers: `midpoint`/`heun` (DPM-Solver) or `bh1`/`bh2` (UniPC).
    pub solver_type: Option<String>,
    /// dpm-solver: multistep (true) or singlestep (false).
    pub multistep: Option<bool>,
    /// Fast solvers: the sigma grid name.
    pub sigmas: Option<String>,
    /// Fast solvers: `zero` or `sigma-min`.
    pub final_sigma: Option<String>,
    /// Fast solvers: diffusers' `lower_order_final`.
    pub lower_order_final: Option<bool>,
    /// Fast solvers: dynamic thresholding on.
    pub thresholding: Option<bool>,
    /// unipc: the UniC corrector.
    pub corrector: Option<bool>,
}

impl SamplerOptions {
    /// Which options are set. The destructuring names every field, so a new field does not
    /// compile until it is listed here (no option escapes the unused-option check).
    pub fn set(&self) -> Vec<Opt> {
        let SamplerOptions {
            steps: _,
            eta,
            spacing,
            variance,
            clip_x0,
            snr,
            corrector_steps,
            predictor,
            rtol,
            atol,
            churn,
            ode_variable,
            order,
            solver_type,
            multistep,
            sigmas,
            final_sigma,
            lower_order_final,
            thresholding,
            corrector,
        } = self;
        let flags = [
            (Opt::Eta, eta.is_some()),
            (Opt::Spacing, spacing.is_some()),
            (Opt::Variance, variance.is_some()),
            (Opt::ClipX0, clip_x0.is_some()),
            (Opt::Snr, snr.is_some()),
            (Opt::CorrectorSteps, corrector_steps.is_some()),
            (Opt::Predictor, predictor.is_some()),
            (Opt::Rtol, rtol.is_some()),
            (Opt::Atol, atol.is_some()),
            (Opt::Churn, churn.is_some()),
            (Opt::OdeVariable, ode_variable.is_some()),
            (Opt::Order, order.is_some()),
            (Opt::SolverType, solver_type.is_some()),
            (Opt::Multistep, multistep.is_some()),
            (Opt::Sigmas, sigmas.is_some()),
            (Opt::FinalSigma, final_sigma.is_some()),
            (Opt::LowerOrderFinal, lower_order_final.is_some()),
            (Opt::Thresholding, thresholding.is_some()),
            (Opt::Corrector, corrector.is_some()),
        ];
        flags.into_iter().filter(|(_, s)| *s).map(|(o, _)| o).collect()
    }
}

/// How a sampler builds itself for a process: `steps` is the resolved step count (at least 1;
/// `None` only for adaptive samplers); the registry has already checked the process and the options.
pub type BuildFn =
    fn(process: &Process, steps: Option<usize>, options: &SamplerOptions) -> Result<Box<dyn Sampler>>;

/// A sampler's declaration: everything the registry, the CLI and the docs need to know about it.
pub struct SamplerSpec {
    /// The `--sampler` name.
    pub name: &'static str,
    /// One line: what it is and where it comes from.
    pub about: &'static str,
    /// The `--process` names it runs on.
    pub processes: &'static [&'static str],
    /// The default number of steps on a process (ignored for adaptive samplers).
    pub default_steps: fn(&Process) -> usize,
    /// Whether the sampler chooses its own steps (adaptive step size; `--steps` does not apply).
    pub adaptive: bool,
    /// The default-steps column of the README table.
    pub default_steps_doc: &'static str,
    /// The options it takes (besides `--steps`).
    pub options: &'static [Opt],
    /// Whether it draws fresh noise during sampling (seeded per row).
    pub stochastic: bool,
    /// The builder.
    pub build: BuildFn,
}

/// Every sampler, in `--help` order. One line per sampler; the spec lives in the sampler's file.
pub static SAMPLERS: &[&SamplerSpec] = &[
    &super::ddpm::SPEC,
    &super::ddim::SPEC,
    &super::euler_maruyama::SPEC,
    &super::pc::SPEC,
    &super::ode::EULER_SPEC,
    &super::ode::HEUN_SPEC,
    &super::rk45::SPEC,
    &super::edm::SPEC,
    &super::dpm_solver::DPM_SOLVER_SPEC,
    &super::dpm_solver::DPMPP_2M_SPEC,
    &super::dpm_solver::DPMPP_3M_SPEC,
    &super::dpm_solver::DPMPP_2S_SPEC,
    &super::dpm_solver::DPMPP_2M_SDE_SPEC,
    &super::unipc::SPEC,
    &super::deis::SPEC,
    &super::sigma_euler::EULER_SPEC,
    &super::sigma_euler::EULER_ANCESTRAL_SPEC,
    &super::sigma_euler::HEUN_SPEC,
];

/// A handle on one sampler of [`SAMPLERS`] (compared by name).
#[derive(Clone, Copy)]
pub struct SamplerKind(&'static SamplerSpec);

impl PartialEq for SamplerKind {
    fn eq(&self, other: &Self) -> bool {
        self.0.name == other.0.name
    }
}

impl Eq for SamplerKind {}

impl std::fmt::Debug for SamplerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SamplerKind({})", self.0.name)
    }
}

impl SamplerKind {
    /// Every sampler, in table order.
    pub fn all() -> impl Iterator<Item = SamplerKind> {
        SAMPLERS.iter().map(|s| SamplerKind(s))
    }

    /// Parses a `--sampler` name.
    pub fn from_name(name: &str) -> Result<Self> {
        Self::all().find(|k| k.name() == name).ok_or_else(|| {
            Error::param(
                "sampler",
                format!(
                    "unknown sampler '{name}', expected one of: {}",
                    Self::all().map(|k| k.name()).collect::<Vec<_>>().join(", ")
                ),
            )
        })
    }

    /// The declaration.
    pub fn spec(&self) -> &'static SamplerSpec {
        self.0
    }

    /// The `--sampler` name.
    pub fn name(&self) -> &'static str {
        self.0.name
    }

    /// The `--process` names this sampler runs on.
    pub fn processes(&self) -> &'static [&'static str] {
        self.0.processes
    }

    /// Whether the sampler runs on `process`.
    pub fn supports(&self, process: &Process) -> bool {
        self.processes().contains(&process.name())
    }

    /// Whether it chooses its own steps (`--steps` does not apply).
    pub fn adaptive(&self) -> bool {
        self.0.adaptive
    }

    /// The default number of steps on `process` (None: adaptive).
    pub fn default_steps(&self, process: &Process) -> Option<usize> {
        (!self.0.adaptive).then(|| (self.0.default_steps)(process))
    }

    /// Whether it takes option `opt`.
    pub fn takes(&self, opt: Opt) -> bool {
        self.0.options.contains(&opt)
    }
}

/// Rejects options `kind` does not declare, naming the samplers that do take them.
fn reject_unused(kind: SamplerKind, o: &SamplerOptions) -> Result<()> {
    for opt in o.set() {
        if !kind.takes(opt) {
            let users: Vec<&str> = SAMPLERS
                .iter()
                .filter(|s| s.options.contains(&opt))
                .map(|s| s.name)
                .collect();
            let flag = opt.flag();
            return Err(Error::param(
                flag,
                format!(
                    "--{flag} applies only to {}, not to --sampler {}",
                    users.join(", "),
                    kind.name()
                ),
            ));
        }
    }
    Ok(())
}

/// Builds the sampler `kind` for `process`: checks the pair and the options against the
/// sampler's declaration, resolves the step count, and calls its builder.
pub fn build_sampler(kind: SamplerKind, process: &Process, o: &SamplerOptions) -> Result<Box<dyn Sampler>> {
    if !kind.supports(process) {
        return Err(Error::param(
            "process",
            format!(
                "--sampler {} does not run on --process {} (it runs on: {})",
                kind.name(),
                process.name(),
                kind.processes().join(", ")
            ),
        ));
    }
    reject_unused(kind, o)?;
    let steps = if kind.adaptive() {
        if o.steps.is_some() {
            return Err(Error::param(
                "steps",
                format!(
                    "--sampler {} chooses its own steps; --steps does not apply",
                    kind.name()
                ),
            ));
        }
        None
    } else {
        let s = o.steps.or(kind.default_steps(process));
        if s == Some(0) {
            return Err(Error::param("steps", "got 0, expected at least 1"));
        }
        s
    };
    (kind.spec().build)(process, steps, o)
}

/// The `--sampler` help text: every sampler with the processes it runs on.
pub fn sampler_help() -> String {
    let rows: Vec<String> = SAMPLERS
        .iter()
        .map(|s| format!("{} (on {})", s.name, s.processes.join(", ")))
        .collect();
    format!("Sampler: {}.", rows.join("; "))
}

/// The README's sampler table (markdown), generated from [`SAMPLERS`].
pub fn markdown_table() -> String {
    let mut out = String::from(
        "| `--sampler` | what it is | `--process` | default `--steps` | options |\n| --- | --- | --- | --- | --- |\n",
    );
    for s in SAMPLERS {
        let opts: Vec<String> = s.options.iter().map(|o| format!("`--{}`", o.flag())).collect();
        out.push_str(&format!(
            "| `{}` | {}{} | {} | {} | {} |\n",
            s.name,
            s.about,
            if s.stochastic { " (stochastic)" } else { "" },
            s.processes
                .iter()
                .map(|p| format!("`{p}`"))
                .collect::<Vec<_>>()
                .join(", "),
            s.default_steps_doc,
            if opts.is_empty() {
                "-".to_string()
            } else {
                opts.join(", ")
            }
        ));
    }
    out
}

/// The time grid named by `spacing` on a continuous process (its default when `None`).
pub(crate) fn time_grid(
    sde: &crate::process::Sde,
    spacing: &Option<String>,
) -> Result<crate::process::TimeGrid> {
    match spacing {
        None => Ok(sde.default_grid()),
        Some(s) => crate::process::TimeGrid::from_name(s),
    }
}

/// The continuous SDE of `process` (for samplers declared on continuous processes only).
pub(crate) fn continuous(process: &Process) -> Result<crate::process::Sde> {
    match process {
        Process::Continuous(sde) => {
            sde.validate()?;
            Ok(sde.clone())
        }
        Process::Ddpm(_) => Err(Error::param(
            "process",
            "this sampler needs a continuous process (vp, vp-cosine, subvp, ve, seed-ve)",
        )),
    }
}

/// The grid a fast solver walks, from `--spacing`, `--sigmas` and `--final-sigma` (each left
/// at the solver's default when not given).
pub(crate) fn grid_options(o: &SamplerOptions) -> Result<super::grids::GridOptions> {
    use super::grids::{FinalSigma, GridOptions, SigmaGrid};
    let mut g = GridOptions::default();
    if let Some(s) = &o.spacing {
        g.spacing = super::timesteps::Spacing::from_name(s)?;
    }
    if let Some(s) = &o.sigmas {
        g.sigmas = SigmaGrid::from_name(s)?;
    }
    if let Some(f) = &o.final_sigma {
        g.final_sigma = Some(FinalSigma::from_name(f)?);
    }
    Ok(g)
}

/// `--thresholding`: Imagen's dynamic thresholding with diffusers' defaults, or off.
pub(crate) fn thresholding(o: &SamplerOptions) -> Option<super::exp_integrator::Thresholding> {
    o.thresholding
        .filter(|&on| on)
        .map(|_| super::exp_integrator::Thresholding::default())
}

/// Checks a `--clip-x0` value.
pub(crate) fn check_clip(clip: Option<f64>) -> Result<Option<f64>> {
    if let Some(c) = clip {
        crate::error::check_range("clip-x0", c, (0.0, false), (f64::INFINITY, false))?;
    }
    Ok(clip)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::Schedule;

    fn process(name: &str) -> Process {
        Process::from_name(name, || Schedule::named("linear", 1000)).unwrap()
    }

    fn kind(name: &str) -> SamplerKind {
        SamplerKind::from_name(name).unwrap()
    }

    #[test]
    fn names_are_unique_and_every_option_has_a_user() {
        let mut names: Vec<&str> = SAMPLERS.iter().map(|s| s.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), SAMPLERS.len());
        for opt in Opt::ALL {
            assert!(
                SAMPLERS.iter().any(|s| s.options.contains(&opt)),
                "--{} is taken by no sampler",
                opt.flag()
            );
        }
    }

    #[test]
    fn support_matrix_follows_the_table() {
        for k in SamplerKind::all() {
            for p in Process::NAMES {
                let r = build_sampler(k, &process(p), &SamplerOptions::default());
                let expected = k.processes().contains(&p);
                assert_eq!(
                    r.is_ok(),
                    expected,
                    "{} on {p}: {:?}",
                    k.name(),
                    r.err().map(|e| e.to_string())
                );
                if let Err(e) = r {
                    assert!(e.is_user_error());
                    assert!(e.to_string().contains("does not run on --process"), "{e}");
                }
            }
        }
        // the two families as they were before the table: chain samplers on the discrete
        // processes, the SDE/ODE samplers on the continuous ones
        assert_eq!(kind("ddpm").processes(), DISCRETE);
        assert_eq!(kind("ddim").processes(), DISCRETE);
        assert_eq!(kind("edm-heun").processes(), CONTINUOUS);
    }

    #[test]
    fn every_option_is_checked_against_every_sampler() {
        // Each option set on a sampler that does not declare it is an error naming the flag;
        // on one that does, it gets past the unused-option check.
        let example = |opt: Opt| {
            let mut o = SamplerOptions::default();
            match opt {
                Opt::Eta => o.eta = Some(0.5),
                Opt::Spacing => o.spacing = Some("trailing".into()),
                Opt::Variance => o.variance = Some(Variance::FixedLarge),
                Opt::ClipX0 => o.clip_x0 = Some(1.0),
                Opt::Snr => o.snr = Some(0.1),
                Opt::CorrectorSteps => o.corrector_steps = Some(2),
                Opt::Predictor => o.predictor = Some(Predictor::EulerMaruyama),
                Opt::Rtol => o.rtol = Some(1e-3),
                Opt::Atol => o.atol = Some(1e-3),
                Opt::Churn => o.churn = Some(1.0),
                Opt::OdeVariable => o.ode_variable = Some(OdeVariable::Time),
                Opt::Order => o.order = Some(2),
                Opt::SolverType => o.solver_type = Some("midpoint".into()),
                Opt::Multistep => o.multistep = Some(true),
                Opt::Sigmas => o.sigmas = Some("karras".into()),
                Opt::FinalSigma => o.final_sigma = Some("sigma-min".into()),
                Opt::LowerOrderFinal => o.lower_order_final = Some(true),
                Opt::Thresholding => o.thresholding = Some(true),
                Opt::Corrector => o.corrector = Some(true),
            }
            assert_eq!(o.set(), vec![opt]);
            o
        };
        for k in SamplerKind::all() {
            let p = process(k.processes()[0]);
            for opt in Opt::ALL {
                let r = build_sampler(k, &p, &example(opt));
                if k.takes(opt) {
                    if let Err(e) = &r {
                        assert!(!e.to_string().contains("applies only to"), "{}: {e}", k.name());
                    }
                } else {
                    let e = r
                        .err()
                        .unwrap_or_else(|| panic!("--{} accepted by {}", opt.flag(), k.name()));
                    assert!(
                        e.to_string()
                            .contains(&format!("--{} applies only to", opt.flag())),
                        "{e}"
                    );
                }
            }
        }
    }

    #[test]
    fn help_and_table_come_from_the_specs() {
        let table = markdown_table();
        for s in SAMPLERS {
            assert!(table.contains(&format!("| `{}` |", s.name)));
            assert!(sampler_help().contains(s.name));
        }
        assert!(
            Opt::Eta.help().ends_with("Applies to: ddim."),
            "{}",
            Opt::Eta.help()
        );
        assert!(Opt::ClipX0.help().contains("ddpm, ddim"));
    }

    #[test]
    fn every_sampler_runs_on_image_shaped_f32_batches() {
        // [B, C, H, W] = [3, 1, 2, 2] in f32, the shape and dtype a U-Net will use; the oracle
        // is a 4-D isotropic Gaussian mixture seen through the flattened rows.
        use crate::gmm::{Covariance, Gmm};
        use crate::oracle::Oracle;
        use candle_core::{DType, Device};
        let g = Gmm::new(
            vec![0.5, 0.5],
            vec![vec![1.0, 0.0, -1.0, 0.5], vec![-1.0, 0.5, 0.0, 0.0]],
            vec![Covariance::Isotropic(0.1), Covariance::Isotropic(0.2)],
        )
        .unwrap();
        let o = Oracle::new(g);
        for k in SamplerKind::all() {
            let p = process(k.processes()[0]);
            let steps = if k.adaptive() { None } else { Some(8) };
            let s = build_sampler(
                k,
                &p,
                &SamplerOptions {
                    steps,
                    ..Default::default()
                },
            )
            .unwrap();
            let out = crate::samplers::sample_batched(
                s.as_ref(),
                &o,
                3,
                &[1, 2, 2],
                0,
                3,
                DType::F32,
                &Device::Cpu,
                &mut crate::samplers::NoObserver,
            )
            .unwrap();
            assert_eq!(out.x.dims(), &[3, 1, 2, 2], "{}", k.name());
            assert_eq!(out.x.dtype(), DType::F32, "{}", k.name());
        }
    }

    #[test]
    fn bad_options_are_errors() {
        let ddpm = process("ddpm");
        let opts = |f: fn(&mut SamplerOptions)| {
            let mut o = SamplerOptions::default();
            f(&mut o);
            o
        };
        let e = |k: &str, p: &Process, o: SamplerOptions| {
            build_sampler(kind(k), p, &o).err().map(|e| e.to_string())
        };
        assert!(e("ddpm", &ddpm, opts(|o| o.steps = Some(0)))
            .unwrap()
            .contains("steps"));
        assert!(e("ddpm", &ddpm, opts(|o| o.steps = Some(1001)))
            .unwrap()
            .contains("1001"));
        assert!(e("ddpm", &ddpm, opts(|o| o.eta = Some(0.5)))
            .unwrap()
            .contains("--eta applies only to ddim"));
        assert!(e("ddim", &ddpm, opts(|o| o.eta = Some(1.5)))
            .unwrap()
            .contains("eta"));
        assert!(e("ddim", &ddpm, opts(|o| o.spacing = Some("log-snr".into()))).is_some());
        assert!(e("pc", &process("vp"), opts(|o| o.corrector_steps = Some(0))).is_some());
        assert!(e("pc", &process("vp"), opts(|o| o.snr = Some(-1.0))).is_some());
        assert!(e("ode-rk45", &process("vp"), opts(|o| o.rtol = Some(0.0))).is_some());
        assert!(e("ode-rk45", &process("vp"), opts(|o| o.steps = Some(10)))
            .unwrap()
            .contains("chooses its own steps"));
        assert!(e(
            "edm-heun",
            &process("vp"),
            opts(|o| o.spacing = Some("uniform".into()))
        )
        .unwrap()
        .contains("--spacing applies only to"));
        assert!(e(
            "euler-maruyama",
            &process("ve"),
            opts(|o| o.spacing = Some("leading".into()))
        )
        .is_some());
        assert!(SamplerKind::from_name("ddpm2").is_err());
        // K < T respaces to exactly K steps
        let s = build_sampler(kind("ddpm"), &ddpm, &opts(|o| o.steps = Some(37))).unwrap();
        assert_eq!(s.name(), "ddpm");
    }
}
