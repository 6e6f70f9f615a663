//! The fast samplers driven by the exact Gaussian-mixture denoiser, against diffusers' own
//! scheduler classes driven by the same exact denoiser from the same draws
//! (`tests/fixtures/fast_samplers/gmm_runs.json`, made by `make_fixtures.py --gmm` from the draws
//! of `examples/fast_sampler_inputs.rs`), and against the null band of the energy distance
//! (`tests/samplers_oracle.rs`'s check: n = 4000 samples vs 4000 fresh exact draws, the band's
//! 95th percentile over 20 pairs of exact sets).

use std::sync::OnceLock;

use candle_core::{DType, Device};
use serde_json::Value;

use diffuse::eval::distance::{energy_distance, NullBand};
use diffuse::gmm::Gmm;
use diffuse::oracle::Oracle;
use diffuse::process::Process;
use diffuse::rng::NoiseStreams;
use diffuse::samplers::deis::{Deis, DeisOptions};
use diffuse::samplers::dpm_solver::{DpmSolver, DpmSolverOptions};
use diffuse::samplers::grids::{FinalSigma, GridOptions, SigmaGrid};
use diffuse::samplers::sigma_euler::{Euler, EulerAncestral, Heun, SigmaSamplerOptions};
use diffuse::samplers::unipc::{UniPc, UniPcOptions};
use diffuse::samplers::{sample_batched, NoObserver, Sampler};
use diffuse::schedule::Schedule;

/// Keep in sync with examples/fast_sampler_inputs.rs.
const N: usize = 4000;
const SEED: u64 = 0;
const TRUTH_SEED: u64 = 999_999;
const MIXTURES: [&str; 2] = ["anisotropic3", "narrow3d"];

struct Truth {
    gmm: Gmm,
    oracle: Oracle,
    fresh: Vec<f64>,
    band: NullBand,
}

fn mixture_path(name: &str) -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    match name {
        "anisotropic3" => root.join("examples/mixtures/anisotropic3.json"),
        _ => root.join(format!("tests/fixtures/fast_samplers/{name}.json")),
    }
}

fn truth(name: &str) -> &'static Truth {
    static T: OnceLock<Vec<Truth>> = OnceLock::new();
    let all = T.get_or_init(|| {
        MIXTURES
            .iter()
            .map(|m| {
                let g = Gmm::from_json_file(&mixture_path(m)).unwrap();
                Truth {
                    fresh: g.sample(N, TRUTH_SEED),
                    band: NullBand::energy(&g, N, 20, 1_000_000).unwrap(),
                    oracle: Oracle::new(g.clone()),
                    gmm: g,
                }
            })
            .collect()
    });
    &all[MIXTURES.iter().position(|m| *m == name).unwrap()]
}

fn runs() -> &'static Value {
    static V: OnceLock<Value> = OnceLock::new();
    V.get_or_init(|| {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/fast_samplers/gmm_runs.json");
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    })
}

/// diffusers' energy distance for (mixture, sampler, steps) and its first output rows.
fn diffusers_run(mixture: &str, sampler: &str, steps: usize) -> (Option<f64>, Vec<Vec<f64>>) {
    let r = runs()["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["mixture"] == mixture && r["sampler"] == sampler && r["steps"] == steps as u64)
        .unwrap_or_else(|| panic!("no diffusers run for {mixture} {sampler} {steps}"));
    let rows = r["first_rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect()
        })
        .collect();
    (r["energy_distance"].as_f64(), rows)
}

fn linear() -> Process {
    Process::Ddpm(Schedule::named("linear", 1000).unwrap())
}

/// Our sampler of registry name `name` with its default (diffusers') options.
fn ours(name: &str, steps: usize) -> Box<dyn Sampler> {
    let p = linear();
    let s = SigmaSamplerOptions::default();
    match name {
        "dpm-solver" => Box::new(DpmSolver::new(&p, steps, &DpmSolverOptions::dpm_solver()).unwrap()),
        "dpmpp-2m" => Box::new(DpmSolver::new(&p, steps, &DpmSolverOptions::dpmpp_2m()).unwrap()),
        "dpmpp-3m" => Box::new(DpmSolver::new(&p, steps, &DpmSolverOptions::dpmpp_3m()).unwrap()),
        "dpmpp-2s" => Box::new(DpmSolver::new(&p, steps, &DpmSolverOptions::dpmpp_2s()).unwrap()),
        "dpmpp-2m-sde" => Box::new(DpmSolver::new(&p, steps, &DpmSolverOptions::dpmpp_2m_sde()).unwrap()),
        "unipc" => Box::new(UniPc::new(&p, steps, &UniPcOptions::default()).unwrap()),
        "deis" => Box::new(Deis::new(&p, steps, &DeisOptions::default()).unwrap()),
        "euler" => Box::new(Euler::new(&p, steps, &s).unwrap()),
        "euler-ancestral" => Box::new(EulerAncestral::new(&p, steps, &s).unwrap()),
        "heun" => Box::new(Heun::new(&p, steps, &s).unwrap()),
        other => panic!("{other}"),
    }
}

const SAMPLERS: [&str; 10] = [
    "dpm-solver",
    "dpmpp-2m",
    "dpmpp-3m",
    "dpmpp-2s",
    "dpmpp-2m-sde",
    "unipc",
    "deis",
    "euler",
    "euler-ancestral",
    "heun",
];

/// Samples of `s` from the oracle test's draws (row i: stream i of seed 0).
fn samples(s: &dyn Sampler, t: &Truth) -> (Vec<f64>, usize) {
    let out = sample_batched(
        s,
        &t.oracle,
        N,
        &[t.gmm.dim()],
        SEED,
        N,
        DType::F64,
        &Device::Cpu,
        &mut NoObserver,
    )
    .unwrap();
    (out.x.flatten_all().unwrap().to_vec1::<f64>().unwrap(), out.nfe)
}

#[test]
fn the_draws_are_the_fixtures() {
    for r in runs()["runs"].as_array().unwrap() {
        let Some(check) = r.get("inputs_check") else {
            continue;
        };
        let t = truth(r["mixture"].as_str().unwrap());
        let d = t.gmm.dim();
        let z = NoiseStreams::new(SEED, 0, N).normal_rows(d);
        let z_sum: f64 = z.iter().sum();
        assert!((z_sum - check["z_sum"].as_f64().unwrap()).abs() < 1e-9);
        assert_eq!(z[0], check["z_first"][0].as_f64().unwrap());
        let truth_sum: f64 = t.fresh.iter().sum();
        assert!((truth_sum - check["truth_sum"].as_f64().unwrap()).abs() < 1e-9);
    }
}

#[test]
fn at_least_as_close_as_diffusers_with_the_same_exact_denoiser() {
    for m in MIXTURES {
        let t = truth(m);
        for name in SAMPLERS {
            for steps in [10, 20] {
                let s = ours(name, steps);
                let (x, nfe) = samples(s.as_ref(), t);
                let e = energy_distance(&x, &t.fresh, t.gmm.dim()).unwrap();
                let (theirs, rows) = diffusers_run(m, name, steps);
                let theirs = theirs.unwrap();
                // the same algorithm from the same draws: the samples agree to diffusers'
                // float32 rounding (their first rows to 1e-4 of the data scale)
                let d = t.gmm.dim();
                for (i, row) in rows.iter().enumerate() {
                    for (j, v) in row.iter().enumerate() {
                        assert!(
                            (x[i * d + j] - v).abs() < 1e-4 * (1.0 + v.abs()),
                            "{m} {name} {steps}: row {i} {x:?}",
                            x = &x[i * d..(i + 1) * d]
                        );
                    }
                }
                println!(
                    "{m} {name} {steps} steps (NFE {nfe}): ours {e:.6}, diffusers {theirs:.6}, null p95 {:.6}",
                    t.band.p95
                );
                assert!(
                    e <= theirs + 1e-5,
                    "{m} {name} {steps}: {e} vs diffusers' {theirs}"
                );
                if theirs <= t.band.p95 {
                    assert!(
                        e <= t.band.p95,
                        "{m} {name} {steps}: diffusers inside the band, ours {e}"
                    );
                }
            }
        }
    }
}

/// dpmpp-2m on `grid` ending at sigma_min (DPM-Solver's own setting: K steps from t_T = 1 to
/// t_0 = 1/T, no final denoising).
fn dpmpp_2m_on(grid: SigmaGrid, steps: usize) -> DpmSolver {
    let grid = GridOptions {
        sigmas: grid,
        final_sigma: Some(FinalSigma::SigmaMin),
        ..Default::default()
    };
    DpmSolver::new(
        &linear(),
        steps,
        &DpmSolverOptions {
            grid,
            ..DpmSolverOptions::dpmpp_2m()
        },
    )
    .unwrap()
}

/// Our 10-step recommendation: DPM-Solver's time grid with t_order 4 (uniform in t^(1/4)).
const QUARTIC: SigmaGrid = SigmaGrid::TimePower(4);

fn ed(s: &dyn Sampler, t: &Truth) -> f64 {
    let (x, _) = samples(s, t);
    energy_distance(&x, &t.fresh, t.gmm.dim()).unwrap()
}

#[test]
fn dpmpp_2m_at_10_steps_inside_the_band_past_diffusers() {
    for m in MIXTURES {
        let t = truth(m);
        let theirs = diffusers_run(m, "dpmpp-2m", 10).0.unwrap();
        let s = dpmpp_2m_on(QUARTIC, 10);
        let (x, nfe) = samples(&s, t);
        assert_eq!(nfe, 10);
        let e = energy_distance(&x, &t.fresh, t.gmm.dim()).unwrap();
        // for comparison: uniform log-SNR steps over the whole table (DPM-Solver's logSNR, ours
        // `logsnr`) and DPM-Solver's time_quadratic
        let r = |v: f64| v / t.band.p95;
        println!(
            "{m} dpmpp-2m, 10 steps, energy distance / null p95 ({:.6}): diffusers' default {:.2}, logsnr {:.2}, time-quadratic {:.2}, time-quartic {:.2}",
            t.band.p95,
            r(theirs),
            r(ed(&dpmpp_2m_on(SigmaGrid::LogSnr, 10), t)),
            r(ed(&dpmpp_2m_on(SigmaGrid::TimePower(2), 10), t)),
            r(e),
        );
        assert!(
            theirs > t.band.p95,
            "{m}: diffusers' dpmpp-2m at 10 steps is expected outside the band"
        );
        assert!(
            e <= t.band.p95,
            "{m}: dpmpp-2m time-quartic at 10 steps: {e} > p95 {}",
            t.band.p95
        );
    }
}

/// Per component of the data mixture (each point assigned to its most responsible component):
/// the fraction of points and the spread `sqrt(tr Cov / D)`.
fn per_component(g: &Gmm, x: &[f64]) -> Vec<(f64, f64)> {
    let d = g.dim();
    let k = g.num_components();
    let singles: Vec<Gmm> = (0..k)
        .map(|c| {
            Gmm::new(
                vec![1.0],
                vec![g.means()[c].clone()],
                vec![g.covariances()[c].clone()],
            )
            .unwrap()
        })
        .collect();
    let mut groups: Vec<Vec<&[f64]>> = vec![Vec::new(); k];
    for p in x.chunks(d) {
        let score = |c: usize| g.weights()[c].ln() + singles[c].log_density(p);
        let best = (0..k).max_by(|&a, &b| score(a).total_cmp(&score(b))).unwrap();
        groups[best].push(p);
    }
    groups
        .iter()
        .map(|pts| {
            let n = pts.len() as f64;
            let mut var = 0.0;
            for j in 0..d {
                let mean = pts.iter().map(|p| p[j]).sum::<f64>() / n;
                var += pts.iter().map(|p| (p[j] - mean).powi(2)).sum::<f64>() / (n - 1.0);
            }
            (n / (x.len() / d) as f64, (var / d as f64).sqrt())
        })
        .collect()
}

#[test]
fn narrow_components_keep_their_spread() {
    for m in MIXTURES {
        let t = truth(m);
        let truth_c = per_component(&t.gmm, &t.fresh);
        // the converged flow from the same prior draws (200 steps): it differs from the fresh
        // truth only by the two sets' sampling noise (a component's spread has a relative
        // standard error of 1/sqrt(2 n D): 1.1% to 2.5% here)
        let reference = per_component(&t.gmm, &samples(&dpmpp_2m_on(QUARTIC, 200), t).0);
        let ten = per_component(&t.gmm, &samples(&dpmpp_2m_on(QUARTIC, 10), t).0);
        let twenty = per_component(&t.gmm, &samples(&dpmpp_2m_on(QUARTIC, 20), t).0);
        let default = per_component(&t.gmm, &samples(ours("dpmpp-2m", 10).as_ref(), t).0);
        for c in 0..truth_c.len() {
            let rel = |v: &[(f64, f64)]| v[c].1 / reference[c].1;
            println!(
                "{m} component {c}: truth weight {:.3} spread {:.4}; converged {:.3} {:.4}; time-quartic 10 steps {:.3} x{:.3}, 20 steps {:.3} x{:.3}; diffusers' default grid 10 steps {:.3} x{:.3}",
                truth_c[c].0, truth_c[c].1, reference[c].0, reference[c].1, ten[c].0, rel(&ten), twenty[c].0, rel(&twenty), default[c].0, rel(&default)
            );
        }
        for c in 0..truth_c.len() {
            let rel = |v: &[(f64, f64)]| v[c].1 / reference[c].1;
            assert!((reference[c].0 - truth_c[c].0).abs() < 0.02, "{m} {c}: weights");
            assert!(
                (reference[c].1 / truth_c[c].1 - 1.0).abs() < 0.05,
                "{m} {c}: converged spread"
            );
            // 10 steps move up to 3% of the mass between modes (0.468 vs 0.436 on narrow3d)
            assert!(
                (ten[c].0 - reference[c].0).abs() < 0.04,
                "{m} {c}: 10-step weight"
            );
            assert!(
                (twenty[c].0 - reference[c].0).abs() < 0.015,
                "{m} {c}: 20-step weight"
            );
            assert!(
                (rel(&ten) - 1.0).abs() < 0.10,
                "{m} {c}: 10-step spread x{}",
                rel(&ten)
            );
            assert!(
                (rel(&twenty) - 1.0).abs() < 0.04,
                "{m} {c}: 20-step spread x{}",
                rel(&twenty)
            );
        }
        // diffusers' default grid: the last step returns the denoised mean at sigma = 0.33
        // (t = 99), which alone would shrink a component of std s by s^2 / (s^2 + 0.33^2) (the
        // std-0.05 one of narrow3d to a fifth); measured x0.36 and x0.43 for its two narrow ones
        if m == "narrow3d" {
            assert!(default[1].1 < 0.5 * reference[1].1, "{:?}", default[1]);
            assert!(default[2].1 < 0.6 * reference[2].1, "{:?}", default[2]);
        }
    }
}

#[test]
fn noise_prediction_solvers_end_at_sigma_min_and_zero_final_shrinks() {
    // A component of std 0.001, far narrower than the table's sigma_min = 0.01: DPM-Solver (noise
    // prediction) and DEIS stop at sigma_min and leave its noise (std ~0.01, ten times the data);
    // diffusers' default grid ending at zero returns the denoised mean from sigma 0.33, a point.
    let g = Gmm::new(
        vec![1.0],
        vec![vec![0.5]],
        vec![diffuse::gmm::Covariance::Isotropic(1e-6)],
    )
    .unwrap();
    let o = Oracle::new(g);
    let std_of = |s: &dyn Sampler| {
        let out = sample_batched(
            s,
            &o,
            500,
            &[1],
            3,
            500,
            DType::F64,
            &Device::Cpu,
            &mut NoObserver,
        )
        .unwrap();
        let x = out.x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let m = x.iter().sum::<f64>() / x.len() as f64;
        (x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (x.len() - 1) as f64).sqrt()
    };
    let sigma_min = 0.01; // sqrt((1 - alpha_bar_1) / alpha_bar_1) for beta_1 = 1e-4
    for name in ["dpm-solver", "deis"] {
        let s = std_of(ours(name, 10).as_ref());
        println!("{name}: output std {s:.5} (data 0.001, sigma_min {sigma_min})");
        // std of x at sigma_min: sqrt(0.001^2 + 0.01^2) = 0.01005, less the 500-draw noise (3%)
        assert!(
            (s / (sigma_min * sigma_min + 1e-6f64).sqrt() - 1.0).abs() < 0.15,
            "{name}: {s}"
        );
    }
    let s = std_of(ours("dpmpp-2m", 10).as_ref());
    println!("dpmpp-2m (final zero): output std {s:.2e}");
    assert!(s < 1e-4, "dpmpp-2m: {s}");
}

/// Our sampler of registry name `name` on `process` with `grid`.
fn on_process(name: &str, process: &Process, steps: usize, grid: &GridOptions) -> Box<dyn Sampler> {
    let dpm = |o: DpmSolverOptions| -> Box<dyn Sampler> {
        Box::new(
            DpmSolver::new(
                process,
                steps,
                &DpmSolverOptions {
                    grid: grid.clone(),
                    ..o
                },
            )
            .unwrap(),
        )
    };
    let s = SigmaSamplerOptions {
        grid: grid.clone(),
        ..Default::default()
    };
    match name {
        "dpm-solver" => dpm(DpmSolverOptions::dpm_solver()),
        "dpmpp-2m" => dpm(DpmSolverOptions::dpmpp_2m()),
        "dpmpp-3m" => dpm(DpmSolverOptions::dpmpp_3m()),
        "dpmpp-2s" => dpm(DpmSolverOptions::dpmpp_2s()),
        "dpmpp-2m-sde" => dpm(DpmSolverOptions::dpmpp_2m_sde()),
        "unipc" => Box::new(
            UniPc::new(
                process,
                steps,
                &UniPcOptions {
                    grid: grid.clone(),
                    ..Default::default()
                },
            )
            .unwrap(),
        ),
        "deis" => Box::new(
            Deis::new(
                process,
                steps,
                &DeisOptions {
                    grid: grid.clone(),
                    ..Default::default()
                },
            )
            .unwrap(),
        ),
        "euler" => Box::new(Euler::new(process, steps, &s).unwrap()),
        "euler-ancestral" => Box::new(EulerAncestral::new(process, steps, &s).unwrap()),
        "heun" => Box::new(Heun::new(process, steps, &s).unwrap()),
        other => panic!("{other}"),
    }
}

/// A denoiser whose noise prediction is off by a factor (the broken variant).
struct ScaledEps<'a> {
    inner: &'a dyn diffuse::denoiser::Denoiser,
    factor: f64,
}

impl diffuse::denoiser::Denoiser for ScaledEps<'_> {
    fn prediction(&self) -> diffuse::denoiser::Prediction {
        diffuse::denoiser::Prediction::Eps
    }
    fn output(
        &self,
        x_t: &candle_core::Tensor,
        levels: &[diffuse::denoiser::NoiseLevel],
    ) -> diffuse::Result<candle_core::Tensor> {
        Ok(self.inner.predict_eps(x_t, levels)?.affine(self.factor, 0.0)?)
    }
}

fn ed_with(s: &dyn Sampler, den: &dyn diffuse::denoiser::Denoiser, t: &Truth) -> f64 {
    let out = sample_batched(
        s,
        den,
        N,
        &[t.gmm.dim()],
        SEED,
        N,
        DType::F64,
        &Device::Cpu,
        &mut NoObserver,
    )
    .unwrap();
    energy_distance(
        &out.x.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
        &t.fresh,
        t.gmm.dim(),
    )
    .unwrap()
}

/// The energy distance of a stochastic sampler run with its step noise replaced by zeros.
fn ed_without_noise(s: &dyn Sampler, t: &Truth, steps: usize) -> f64 {
    let d = t.gmm.dim();
    let x_t = diffuse::samplers::draw_prior(
        s,
        &[d],
        &mut NoiseStreams::new(SEED, 0, N),
        DType::F64,
        &Device::Cpu,
    )
    .unwrap();
    let mut zeros = NoiseStreams::replay(vec![vec![0.0; steps * d]; N]);
    let out = s.sample(&t.oracle, x_t, &mut zeros, &mut NoObserver).unwrap();
    energy_distance(
        &out.x.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
        &t.fresh,
        d,
    )
    .unwrap()
}

#[test]
fn every_sampler_on_the_continuous_processes() {
    // The solvers in lambda (DPM-Solver, UniPC, DEIS) on the logsnr grid, 40 steps; the
    // sigma-space ones on Karras's grid (their design), with the steps a first-order or
    // stochastic method needs. A 10% error in the denoiser's eps must leave the band.
    let t = truth("anisotropic3");
    let logsnr = GridOptions {
        sigmas: SigmaGrid::LogSnr,
        ..Default::default()
    };
    let karras = GridOptions {
        sigmas: SigmaGrid::Karras,
        ..Default::default()
    };
    for pname in ["vp", "ve", "subvp", "seed-ve"] {
        let p = Process::from_name(pname, || Schedule::named("linear", 10)).unwrap();
        // every sampler on vp and ve; one of each family on sub-VP and seed-ve
        let names: &[&str] = match pname {
            "vp" | "ve" => &SAMPLERS,
            _ => &["dpmpp-2m", "unipc", "deis", "heun"],
        };
        for &name in names {
            let (steps, grid) = match name {
                "euler" => (100, &karras),
                "euler-ancestral" => (150, &karras),
                "heun" => (40, &karras),
                _ => (40, &logsnr),
            };
            let s = on_process(name, &p, steps, grid);
            let e = ed_with(s.as_ref(), &t.oracle, t);
            let stochastic = name == "dpmpp-2m-sde" || name == "euler-ancestral";
            let broken = match (pname, stochastic) {
                ("vp", false) => ed_with(
                    s.as_ref(),
                    &ScaledEps {
                        inner: &t.oracle,
                        factor: 1.1,
                    },
                    t,
                ),
                ("vp", true) => ed_without_noise(s.as_ref(), t, steps),
                _ => f64::NAN,
            };
            println!(
                "{name} on {pname}, {steps} steps ({}): energy distance {:.2} x p95; broken ({}): {:.1} x p95",
                grid.sigmas.name(),
                e / t.band.p95,
                if stochastic { "noise dropped" } else { "eps x1.1" },
                broken / t.band.p95
            );
            assert!(e <= t.band.p95, "{name} on {pname}: {e} > {}", t.band.p95);
            if pname == "vp" {
                assert!(
                    broken > t.band.p95,
                    "{name} on {pname}: the broken denoiser was not detected"
                );
            }
        }
    }
    // the default grid of the continuous processes: vp-cosine with dpmpp-2m, 40 steps
    let p = Process::from_name("vp-cosine", || Schedule::named("linear", 10)).unwrap();
    let e = ed_with(
        on_process("dpmpp-2m", &p, 40, &GridOptions::default()).as_ref(),
        &t.oracle,
        t,
    );
    assert!(e <= t.band.p95, "dpmpp-2m on vp-cosine: {e}");
}

/// Field notes, bug 9: sample i with seed s is the same whatever the batch size.
#[test]
fn samples_do_not_depend_on_the_batch_size() {
    let t = truth("anisotropic3");
    for name in ["dpmpp-2m-sde", "euler-ancestral", "unipc", "dpmpp-2s"] {
        let s = ours(name, 10);
        let one = |batch| {
            sample_batched(
                s.as_ref(),
                &t.oracle,
                20,
                &[2],
                3,
                batch,
                DType::F64,
                &Device::Cpu,
                &mut NoObserver,
            )
            .unwrap()
            .x
            .to_vec2::<f64>()
            .unwrap()
        };
        assert_eq!(one(20), one(3), "{name}: batch 20 vs batch 3");
    }
}
