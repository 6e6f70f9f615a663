//! Class-conditional sampling, proven on the exact conditional denoiser of a labelled Gaussian
//! mixture (several components per class, one of them narrow): for every sampler x process pair,
//! `class c` samples land in the null band of class c's sub-mixture (the same energy-distance
//! test the unconditional samplers pass), guidance scale 0 reproduces the unconditional band,
//! and samples asked for the wrong class (or the whole mixture) are far outside it — so the
//! check has teeth. Run with --nocapture to see every figure.

use std::sync::OnceLock;

use candle_core::{DType, Device};

use diffuse::eval::distance::{energy_distance, NullBand};
use diffuse::gmm::{Covariance, Gmm};
use diffuse::oracle::ConditionalOracle;
use diffuse::process::Process;
use diffuse::samplers::{
    build_sampler, sample_batched_guided, NoObserver, Sampler, SamplerKind, SamplerOptions,
};
use diffuse::schedule::Schedule;

const N: usize = 2000;

/// 2-D, five components in two classes: class 0 = {0, 1} (one narrow), class 1 = {2, 3, 4}.
fn mixture() -> Gmm {
    Gmm::new(
        vec![0.25, 0.15, 0.2, 0.2, 0.2],
        vec![
            vec![-2.0, 1.0],
            vec![-1.0, -1.5],
            vec![1.5, 1.5],
            vec![2.0, -1.0],
            vec![0.0, 2.5],
        ],
        vec![
            Covariance::Full(vec![0.3, 0.1, 0.1, 0.2]),
            Covariance::Isotropic(0.01),
            Covariance::Isotropic(0.1),
            Covariance::Full(vec![0.2, -0.05, -0.05, 0.15]),
            Covariance::Isotropic(0.05),
        ],
    )
    .unwrap()
    .with_labels(vec![0, 0, 1, 1, 1])
    .unwrap()
}

struct Class {
    fresh: Vec<f64>,
    band: NullBand,
}

struct Truth {
    oracle: ConditionalOracle,
    classes: Vec<Class>,
    all: Class,
}

fn truth() -> &'static Truth {
    static T: OnceLock<Truth> = OnceLock::new();
    T.get_or_init(|| {
        let g = mixture();
        let class = |g: &Gmm, seed: u64| Class {
            fresh: g.sample(N, seed),
            band: NullBand::energy(g, N, 20, seed + 1).unwrap(),
        };
        Truth {
            classes: (0..2)
                .map(|c| class(&g.class_mixture(c).unwrap(), 1000 + 100 * c as u64))
                .collect(),
            all: class(&g, 5000),
            oracle: ConditionalOracle::new(g).unwrap(),
        }
    })
}

fn build(name: &str, process: &str, steps: Option<usize>) -> Box<dyn Sampler> {
    let p = Process::from_name(process, || Schedule::named("linear", 1000)).unwrap();
    build_sampler(
        SamplerKind::from_name(name).unwrap(),
        &p,
        &SamplerOptions {
            steps,
            ..Default::default()
        },
    )
    .unwrap()
}

/// Energy distance of `n` samples of `classes` at `scale` to `truth`'s fresh draws.
fn run(sampler: &dyn Sampler, class: Option<usize>, scale: f64, against: &Class) -> f64 {
    let classes = vec![class; N];
    let out = sample_batched_guided(
        sampler,
        &truth().oracle,
        &classes,
        scale,
        &[2],
        3,
        N,
        None,
        DType::F64,
        &Device::Cpu,
        &mut NoObserver,
    )
    .unwrap();
    let x = out.x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    energy_distance(&x, &against.fresh, 2).unwrap()
}

/// Generous steps per sampler, as the unconditional oracle tests use.
fn steps(name: &str) -> Option<usize> {
    match name {
        "ddpm" => Some(500),
        "ddim" => Some(200),
        "euler-maruyama" => Some(1000),
        "pc" => Some(1000),
        "ode-euler" => Some(1000),
        "ode-heun" => Some(100),
        "edm-heun" => Some(40),
        "ode-rk45" => None,
        "euler-ancestral" => Some(200),
        // the fast solvers (DPM-Solver, UniPC, DEIS, the sigma-space samplers) at 50 steps
        _ => Some(50),
    }
}

#[test]
fn every_pair_samples_the_requested_class() {
    let t = truth();
    let mut k = 0;
    for kind in SamplerKind::all() {
        for &process in kind.processes() {
            let s = build(kind.name(), process, steps(kind.name()));
            // alternate the class over the pairs; both classes are covered by every sampler family
            let c = k % 2;
            k += 1;
            let e = run(s.as_ref(), Some(c), 1.0, &t.classes[c]);
            println!(
                "{} on {process}, class {c}: energy distance {e:.5} (null p95 {:.5})",
                kind.name(),
                t.classes[c].band.p95
            );
            assert!(
                e <= t.classes[c].band.p95,
                "{} on {process}, class {c}: {e} outside the null band (p95 {})",
                kind.name(),
                t.classes[c].band.p95
            );
            if process == kind.processes()[0] {
                // teeth: the other class's samples are far outside this class's band
                let other = run(s.as_ref(), Some(1 - c), 1.0, &t.classes[c]);
                println!("  the other class: {other:.4}");
                assert!(other > 20.0 * t.classes[c].band.p95, "{other}");
            }
        }
    }
}

#[test]
fn scale_zero_is_the_unconditional_model() {
    let t = truth();
    for (name, process) in [
        ("ddim", "ddpm"),
        ("ddpm", "ddpm"),
        ("ode-heun", "vp"),
        ("edm-heun", "ve"),
    ] {
        let s = build(name, process, steps(name));
        let e0 = run(s.as_ref(), Some(1), 0.0, &t.all);
        let none = run(s.as_ref(), None, 3.0, &t.all);
        let cond = run(s.as_ref(), Some(1), 1.0, &t.all);
        println!(
            "{name} on {process}: w = 0 {e0:.5}, class none {none:.5} (null p95 {:.5}); w = 1 vs the whole mixture {cond:.4}",
            t.all.band.p95
        );
        assert!(e0 <= t.all.band.p95, "{name}: w = 0 gave {e0}");
        assert!(none <= t.all.band.p95, "{name}: class none gave {none}");
        assert!(cond > 10.0 * t.all.band.p95, "{name}: {cond}");
    }
}

#[test]
fn guidance_sharpens_towards_the_class() {
    // At w > 1 the samples move away from the other class: the share of class-0 samples nearest
    // a class-1 component shrinks, and w = 1 lies between w = 0 and w = 3.
    let t = truth();
    let s = build("ddim", "ddpm", Some(100));
    let g = t.oracle.gmm();
    let near_other = |scale: f64| {
        let out = sample_batched_guided(
            s.as_ref(),
            &t.oracle,
            &vec![Some(0); N],
            scale,
            &[2],
            4,
            N,
            None,
            DType::F64,
            &Device::Cpu,
            &mut NoObserver,
        )
        .unwrap();
        let x = out.x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        x.chunks(2)
            .filter(|p| {
                let nearest = (0..g.num_components())
                    .min_by(|&a, &b| {
                        let d =
                            |k: usize| (p[0] - g.means()[k][0]).powi(2) + (p[1] - g.means()[k][1]).powi(2);
                        d(a).total_cmp(&d(b))
                    })
                    .unwrap();
                g.labels()[nearest] == 1
            })
            .count() as f64
            / N as f64
    };
    let (w0, w1, w3) = (near_other(0.0), near_other(1.0), near_other(3.0));
    println!("share of class-0 samples nearest a class-1 component: w = 0 {w0:.3}, 1 {w1:.3}, 3 {w3:.3}");
    assert!(w0 > 0.4, "{w0}");
    assert!(w1 < 0.05 && w3 <= w1, "{w1} {w3}");
}

#[test]
fn labels_in_a_mixture_spec() {
    let p = std::path::Path::new("m.json");
    let g = Gmm::from_json(
        r#"{"weights": [0.5, 0.3, 0.2], "means": [[0], [3], [6]], "stds": [1, 1, 1], "labels": [1, 0, 1]}"#,
        p,
    )
    .unwrap();
    assert_eq!(g.num_classes(), 2);
    let c1 = g.class_mixture(1).unwrap();
    assert_eq!(c1.weights(), &[0.5 / 0.7, 0.2 / 0.7]);
    assert_eq!(c1.means(), &[vec![0.0], vec![6.0]]);
    // the labels round-trip through to_json
    let back = Gmm::from_json(&g.to_json().to_string(), p).unwrap();
    assert_eq!(back.labels(), &[1, 0, 1]);
    // default: component k is class k
    let d = Gmm::from_json(
        r#"{"weights": [0.5, 0.5], "means": [[0], [3]], "stds": [1, 1]}"#,
        p,
    )
    .unwrap();
    assert_eq!(d.labels(), &[0, 1]);
    for (text, want) in [
        (
            r#"{"weights": [0.5, 0.5], "means": [[0], [3]], "stds": [1, 1], "labels": [0]}"#,
            "one per component (2)",
        ),
        (
            r#"{"weights": [0.5, 0.5], "means": [[0], [3]], "stds": [1, 1], "labels": [0, 2]}"#,
            "class 1 has no component",
        ),
        (
            r#"{"weights": [0.5, 0.5], "means": [[0], [3]], "stds": [1, 1], "labels": [0, -1]}"#,
            "labels[1]",
        ),
    ] {
        let e = Gmm::from_json(text, p).unwrap_err();
        assert!(
            e.is_user_error() && e.to_string().contains(want) && e.to_string().contains("m.json"),
            "{e}"
        );
    }
}
