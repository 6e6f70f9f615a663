//! The sampler report: every sampler driven by the exact oracle at several step counts, scored
//! by the energy distance of its samples to fresh true samples, beside the null band.

use std::time::Instant;

use candle_core::{DType, Device};

use crate::denoiser::Denoiser;
use crate::error::Result;
use crate::gmm::Gmm;
use crate::oracle::Oracle;
use crate::process::Process;
use crate::samplers::{build_sampler, sample_batched, NoObserver, SamplerKind, SamplerOptions};
use crate::schedule::Schedule;

use super::distance::{energy_distance, NullBand};

/// One row of the report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ReportRow {
    /// Which denoiser drove the sampler: `oracle` or a learned model's label.
    pub model: String,
    /// Sampler name.
    pub sampler: String,
    /// Process name.
    pub process: String,
    /// Requested steps (None for adaptive RK45).
    pub steps: Option<usize>,
    /// RK45 tolerance (rtol = atol), if any.
    pub tolerance: Option<f64>,
    /// Function evaluations.
    pub nfe: usize,
    /// Energy distance to fresh true samples.
    pub energy_distance: f64,
    /// Wall time of the sampling, seconds.
    pub seconds: f64,
}

/// The report's settings.
#[derive(Clone, Debug)]
pub struct ReportConfig {
    /// Samples per run (and per true set).
    pub n: usize,
    /// Seed of the samplers; true sets use other seeds.
    pub seed: u64,
    /// Step counts for the fixed-step samplers.
    pub steps: Vec<usize>,
    /// Tolerances (rtol = atol) for ode-rk45.
    pub tolerances: Vec<f64>,
    /// (sampler, process) pairs.
    pub pairs: Vec<(SamplerKind, String)>,
    /// Null-band repeats.
    pub null_repeats: usize,
}

impl Default for ReportConfig {
    fn default() -> Self {
        let pairs = [
            ("ddpm", "ddpm"),
            ("ddim", "ddpm"),
            ("ddpm", "seed-ve"),
            ("ddim", "seed-ve"),
            ("euler-maruyama", "vp"),
            ("euler-maruyama", "ve"),
            ("pc", "vp"),
            ("pc", "ve"),
            ("ode-euler", "vp"),
            ("ode-euler", "ve"),
            ("ode-heun", "vp"),
            ("ode-heun", "ve"),
            ("ode-rk45", "vp"),
            ("edm-heun", "ve"),
        ];
        ReportConfig {
            n: 4000,
            seed: 0,
            steps: vec![10, 20, 50, 100, 1000],
            tolerances: vec![1e-3, 1e-5],
            pairs: pairs
                .iter()
                .filter_map(|(k, p)| Some((SamplerKind::from_name(k).ok()?, p.to_string())))
                .collect(),
            null_repeats: 20,
        }
    }
}

/// The report: the null band and one row per (pair, steps).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    /// Samples per set.
    pub n: usize,
    /// The null band's values.
    pub null_values: Vec<f64>,
    /// Its 95th percentile.
    pub null_p95: f64,
    /// The rows.
    pub rows: Vec<ReportRow>,
}

/// Runs the report for data from `gmm` with its exact oracle; `progress` is called before each
/// run with its label.
pub fn sampler_report(gmm: &Gmm, config: &ReportConfig, progress: &mut dyn FnMut(&str)) -> Result<Report> {
    sampler_report_models(gmm, config, &[], progress)
}

/// [`sampler_report`] for the oracle and then each `(label, denoiser)` of `learned` (models trained
/// on data from `gmm`), all against the same fresh true samples.
pub fn sampler_report_models(
    gmm: &Gmm,
    config: &ReportConfig,
    learned: &[(String, &dyn Denoiser)],
    progress: &mut dyn FnMut(&str),
) -> Result<Report> {
    let d = gmm.dim();
    let null = NullBand::energy(gmm, config.n, config.null_repeats, 1_000_000)?;
    let truth = gmm.sample(config.n, 999_999);
    let oracle = Oracle::new(gmm.clone());
    let mut models: Vec<(String, &dyn Denoiser, DType)> = vec![("oracle".into(), &oracle, DType::F64)];
    models.extend(learned.iter().map(|(l, m)| (l.clone(), *m, DType::F32)));
    let mut rows = Vec::new();
    for (label, den, dtype) in &models {
        for (kind, pname) in &config.pairs {
            let process = Process::from_name(pname, || Schedule::named("linear", 1000))?;
            let settings: Vec<(Option<usize>, Option<f64>)> = if kind.adaptive() {
                config.tolerances.iter().map(|t| (None, Some(*t))).collect()
            } else {
                config.steps.iter().map(|s| (Some(*s), None)).collect()
            };
            for (steps, tol) in settings {
                let options = SamplerOptions {
                    steps,
                    rtol: tol,
                    atol: tol,
                    ..Default::default()
                };
                progress(&format!(
                    "{label}: {} on {} ({})",
                    kind.name(),
                    pname,
                    steps.map_or(format!("tol {:e}", tol.unwrap_or(0.0)), |s| format!("{s} steps"))
                ));
                let sampler = build_sampler(*kind, &process, &options)?;
                let start = Instant::now();
                let out = sample_batched(
                    sampler.as_ref(),
                    *den,
                    config.n,
                    &[d],
                    config.seed,
                    config.n,
                    *dtype,
                    &Device::Cpu,
                    &mut NoObserver,
                )?;
                let seconds = start.elapsed().as_secs_f64();
                let x = out.x.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
                rows.push(ReportRow {
                    model: label.clone(),
                    sampler: kind.name().into(),
                    process: pname.clone(),
                    steps,
                    tolerance: tol,
                    nfe: out.nfe,
                    energy_distance: energy_distance(&x, &truth, d)?,
                    seconds,
                });
            }
        }
    }
    Ok(Report {
        n: config.n,
        null_p95: null.p95,
        null_values: null.values,
        rows,
    })
}

/// The report as a Markdown table.
pub fn report_markdown(report: &Report) -> String {
    let mut s = format!(
        "energy distance to {n} fresh true samples (n = {n}); null band 95th percentile: {:.5}\n\n\
         | model | sampler | process | steps | NFE | energy distance | / null p95 | seconds |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n",
        report.null_p95,
        n = report.n
    );
    for r in &report.rows {
        let steps = match (r.steps, r.tolerance) {
            (Some(k), _) => k.to_string(),
            (None, Some(t)) => format!("tol {t:e}"),
            _ => "-".into(),
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.5} | {:.2} | {:.2} |\n",
            r.model,
            r.sampler,
            r.process,
            steps,
            r.nfe,
            r.energy_distance,
            r.energy_distance / report.null_p95,
            r.seconds
        ));
    }
    s
}
