//! Energy distance against NFE for every sampler, old and new, driven by the exact denoiser of
//! one Gaussian mixture (n = 4000 samples vs 4000 fresh exact draws, in units of the null band's
//! 95th percentile: <= 1 is indistinguishable from the data at this n):
//!
//! `cargo run --release --example fast_sampler_table -- [MIXTURE.json] > examples/fast_sampler_table.md`
//!
//! (default mixture: `examples/mixtures/anisotropic3.json`). For each target NFE a sampler runs
//! the largest step count whose NFE does not exceed it (Heun-type samplers take two evaluations
//! per step; the continuous samplers' final denoising counts); the NFE actually used is shown when
//! it differs. `ode-rk45` is adaptive: one run at its default tolerances, in its own row.

use std::path::Path;

use candle_core::{DType, Device};

use diffuse::eval::distance::{energy_distance, NullBand};
use diffuse::gmm::Gmm;
use diffuse::oracle::Oracle;
use diffuse::process::Process;
use diffuse::samplers::deis::{Deis, DeisOptions};
use diffuse::samplers::dpm_solver::{DpmSolver, DpmSolverOptions};
use diffuse::samplers::grids::{FinalSigma, GridOptions, SigmaGrid};
use diffuse::samplers::sigma_euler::{Euler, EulerAncestral, Heun, SigmaSamplerOptions};
use diffuse::samplers::unipc::{UniPc, UniPcOptions};
use diffuse::samplers::{build_sampler, sample_batched, NoObserver, Sampler, SamplerKind, SamplerOptions};
use diffuse::schedule::Schedule;

const N: usize = 4000;
const NFES: [usize; 4] = [5, 10, 20, 50];

type Build = Box<dyn Fn(usize) -> diffuse::Result<Box<dyn Sampler>>>;

fn main() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = std::env::args()
        .nth(1)
        .map(Into::into)
        .unwrap_or_else(|| root.join("examples/mixtures/anisotropic3.json"));
    let gmm = Gmm::from_json_file(&path)?;
    let d = gmm.dim();
    let oracle = Oracle::new(gmm.clone());
    let fresh = gmm.sample(N, 999_999);
    let band = NullBand::energy(&gmm, N, 20, 1_000_000)?;
    let ddpm = Process::Ddpm(Schedule::named("linear", 1000)?);
    let vp = Process::from_name("vp", || Schedule::named("linear", 1000))?;

    let mut rows: Vec<(String, Build)> = Vec::new();
    for (kind, process) in [
        (SamplerKind::from_name("ddpm")?, "ddpm"),
        (SamplerKind::from_name("ddim")?, "ddpm"),
        (SamplerKind::from_name("euler-maruyama")?, "vp"),
        (SamplerKind::from_name("pc")?, "vp"),
        (SamplerKind::from_name("ode-euler")?, "vp"),
        (SamplerKind::from_name("ode-heun")?, "vp"),
        (SamplerKind::from_name("edm-heun")?, "vp"),
    ] {
        let p = if process == "ddpm" {
            ddpm.clone()
        } else {
            vp.clone()
        };
        rows.push((
            format!("`{}` on {process} (existing)", kind.name()),
            Box::new(move |k| {
                build_sampler(
                    kind,
                    &p,
                    &SamplerOptions {
                        steps: Some(k),
                        ..Default::default()
                    },
                )
            }),
        ));
    }
    let quartic = GridOptions {
        sigmas: SigmaGrid::TimePower(4),
        final_sigma: Some(FinalSigma::SigmaMin),
        ..Default::default()
    };
    let karras = GridOptions {
        sigmas: SigmaGrid::Karras,
        ..Default::default()
    };
    for (label, grid) in [
        ("diffusers' default grid", GridOptions::default()),
        ("time-quartic, sigma-min", quartic),
    ] {
        for (name, o) in [
            ("dpm-solver", DpmSolverOptions::dpm_solver()),
            ("dpmpp-2m", DpmSolverOptions::dpmpp_2m()),
            ("dpmpp-3m", DpmSolverOptions::dpmpp_3m()),
            ("dpmpp-2s", DpmSolverOptions::dpmpp_2s()),
            ("dpmpp-2m-sde", DpmSolverOptions::dpmpp_2m_sde()),
        ] {
            let (p, grid) = (ddpm.clone(), grid.clone());
            rows.push((
                format!("`{name}`, {label}"),
                Box::new(move |k| {
                    Ok(Box::new(DpmSolver::new_as_diffusers(
                        &p,
                        k,
                        &DpmSolverOptions {
                            grid: grid.clone(),
                            ..o.clone()
                        },
                    )?) as Box<dyn Sampler>)
                }),
            ));
        }
        let (p, g) = (ddpm.clone(), grid.clone());
        rows.push((
            format!("`unipc`, {label}"),
            Box::new(move |k| {
                Ok(Box::new(UniPc::new_as_diffusers(
                    &p,
                    k,
                    &UniPcOptions {
                        grid: g.clone(),
                        ..Default::default()
                    },
                )?) as Box<dyn Sampler>)
            }),
        ));
        let (p, g) = (ddpm.clone(), grid.clone());
        rows.push((
            format!("`deis`, {label}"),
            Box::new(move |k| {
                Ok(Box::new(Deis::new_as_diffusers(
                    &p,
                    k,
                    &DeisOptions {
                        grid: g.clone(),
                        ..Default::default()
                    },
                )?) as Box<dyn Sampler>)
            }),
        ));
    }
    for (label, grid) in [
        ("diffusers' default grid", GridOptions::default()),
        ("karras", karras),
    ] {
        let o = SigmaSamplerOptions {
            grid,
            ..Default::default()
        };
        let (p, o1) = (ddpm.clone(), o.clone());
        rows.push((
            format!("`euler`, {label}"),
            Box::new(move |k| Ok(Box::new(Euler::new(&p, k, &o1)?) as Box<dyn Sampler>)),
        ));
        let (p, o2) = (ddpm.clone(), o.clone());
        rows.push((
            format!("`euler-ancestral`, {label}"),
            Box::new(move |k| Ok(Box::new(EulerAncestral::new(&p, k, &o2)?) as Box<dyn Sampler>)),
        ));
        let (p, o3) = (ddpm.clone(), o.clone());
        rows.push((
            format!("`heun`, {label}"),
            Box::new(move |k| Ok(Box::new(Heun::new(&p, k, &o3)?) as Box<dyn Sampler>)),
        ));
    }

    let run = |s: &dyn Sampler, n: usize| -> diffuse::Result<(Vec<f64>, usize)> {
        let out = sample_batched(
            s,
            &oracle,
            n,
            &[d],
            0,
            n,
            DType::F64,
            &Device::Cpu,
            &mut NoObserver,
        )?;
        Ok((out.x.flatten_all()?.to_vec1::<f64>()?, out.nfe))
    };
    println!(
        "Energy distance / null-band p95 ({:.5}) of {N} samples against {N} fresh draws of `{}` (exact denoiser; <= 1: inside the band, marked **bold**), by NFE. Made by `cargo run --release --example fast_sampler_table`.\n",
        band.p95,
        path.strip_prefix(root).unwrap_or(&path).display()
    );
    println!("| sampler | NFE 5 | NFE 10 | NFE 20 | NFE 50 |");
    println!("| --- | --- | --- | --- | --- |");
    for (label, build) in &rows {
        let mut cells = Vec::new();
        for &target in &NFES {
            // the largest step count whose NFE fits (probed on a 2-sample batch)
            let mut best = None;
            for k in 1..=target {
                match build(k) {
                    Ok(s) => {
                        let (_, nfe) = run(s.as_ref(), 2)?;
                        if nfe <= target {
                            best = Some((s, nfe));
                        }
                    }
                    Err(_) => continue,
                }
            }
            cells.push(match best {
                None => "—".to_string(),
                Some((s, nfe)) => {
                    let (x, _) = run(s.as_ref(), N)?;
                    let r = energy_distance(&x, &fresh, d)? / band.p95;
                    let v = if r <= 1.0 {
                        format!("**{r:.2}**")
                    } else {
                        format!("{r:.2}")
                    };
                    if nfe == target {
                        v
                    } else {
                        format!("{v} ({nfe})")
                    }
                }
            });
        }
        println!("| {label} | {} |", cells.join(" | "));
    }
    let rk45 = build_sampler(
        SamplerKind::from_name("ode-rk45")?,
        &vp,
        &SamplerOptions::default(),
    )?;
    let (x, nfe) = run(rk45.as_ref(), N)?;
    println!(
        "\n`ode-rk45` on vp (existing, adaptive, rtol = atol = 1e-5): {:.2} at NFE {nfe}.",
        energy_distance(&x, &fresh, d)? / band.p95
    );
    Ok(())
}
