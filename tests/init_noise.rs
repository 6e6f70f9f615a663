//! `--init-noise`: a sampler started from the user's standard-normal draws z begins at
//! `x_T = prior_std * z` (diffusers' `latents * init_noise_sigma`), a file holding the seeded
//! streams' own z reproduces the seeded run bit for bit (stochastic samplers included, whatever
//! the batch size), and a bad file is an input error naming it.

use candle_core::{DType, Device, Tensor};

use diffuse::gmm::{Covariance, Gmm};
use diffuse::oracle::Oracle;
use diffuse::process::Process;
use diffuse::rng::NoiseStreams;
use diffuse::samplers::{
    build_sampler, sample_batched, sample_batched_from, InitNoise, Observer, SamplerKind, SamplerOptions,
    StepEvent,
};
use diffuse::schedule::Schedule;

fn oracle() -> Oracle {
    Oracle::new(
        Gmm::new(
            vec![0.6, 0.4],
            vec![vec![-1.0, 0.5, 0.0], vec![1.0, -0.5, 0.5]],
            vec![Covariance::Isotropic(0.05), Covariance::Isotropic(0.2)],
        )
        .unwrap(),
    )
}

fn process(name: &str) -> Process {
    Process::from_name(name, || Schedule::named("linear", 1000)).unwrap()
}

/// The z the seeded streams draw for samples 0..n (what `draw_prior` scales).
fn streams_z(seed: u64, n: usize, d: usize) -> Vec<f64> {
    NoiseStreams::new(seed, 0, n).normal_rows(d)
}

struct First(Option<Vec<f64>>);

impl Observer for First {
    fn observe(&mut self, e: &StepEvent) -> diffuse::Result<()> {
        if e.step == 0 {
            self.0 = Some(e.x.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?);
        }
        Ok(())
    }
}

fn to_vec(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn the_streams_own_z_reproduce_the_seeded_run() {
    let (n, d, seed) = (10, 3, 7);
    let z = streams_z(seed, n, d);
    let init = InitNoise::from_values(std::path::Path::new("z.npy"), &[n, d], z, &[d]).unwrap();
    // ddpm and euler-maruyama draw fresh noise every step; batch 4 splits 10 rows unevenly
    for (name, p) in [("ddpm", "ddpm"), ("euler-maruyama", "ve"), ("ddim", "ddpm")] {
        let k = SamplerKind::from_name(name).unwrap();
        let s = build_sampler(
            k,
            &process(p),
            &SamplerOptions {
                steps: Some(20),
                ..Default::default()
            },
        )
        .unwrap();
        let o = oracle();
        let mut none = diffuse::samplers::NoObserver;
        let a = sample_batched(
            s.as_ref(),
            &o,
            n,
            &[d],
            seed,
            4,
            DType::F64,
            &Device::Cpu,
            &mut none,
        )
        .unwrap();
        let b = sample_batched_from(
            s.as_ref(),
            &o,
            n,
            &[d],
            seed,
            3,
            Some(&init),
            DType::F64,
            &Device::Cpu,
            &mut none,
        )
        .unwrap();
        assert_eq!(to_vec(&a.x), to_vec(&b.x), "{name}");
    }
}

#[test]
fn each_sampler_starts_at_its_prior_std_times_z() {
    let (n, d) = (4, 3);
    let z: Vec<f64> = (0..n * d).map(|i| (i as f64 * 0.37).sin()).collect();
    let init = InitNoise::from_values(std::path::Path::new("z.npy"), &[n, d], z.clone(), &[d]).unwrap();
    for (name, p, prior) in [
        ("ddim", "ddpm", 1.0),
        ("ode-heun", "ve", 50.0),
        ("ddpm", "seed-ve", 100.0),
    ] {
        let s = build_sampler(
            SamplerKind::from_name(name).unwrap(),
            &process(p),
            &SamplerOptions {
                steps: Some(5),
                ..Default::default()
            },
        )
        .unwrap();
        let prior_std = s.prior_std();
        assert!(
            (prior_std - prior).abs() < 1e-6 * prior,
            "{name} on {p}: {prior_std}"
        );
        let mut first = First(None);
        sample_batched_from(
            s.as_ref(),
            &oracle(),
            n,
            &[d],
            0,
            n,
            Some(&init),
            DType::F64,
            &Device::Cpu,
            &mut first,
        )
        .unwrap();
        let x_t = first.0.unwrap();
        for (a, b) in x_t.iter().zip(&z) {
            assert_eq!(*a, prior_std * b, "{name} on {p}");
        }
    }
}

#[test]
fn bad_init_noise_is_an_input_error_naming_the_file() {
    let p = std::path::Path::new("noise.npy");
    let e = |shape: &[usize], z: Vec<f64>, sample: &[usize]| {
        InitNoise::from_values(p, shape, z, sample)
            .err()
            .map(|e| (e.to_string(), e.is_user_error()))
    };
    let (msg, user) = e(&[2, 3], vec![0.0; 6], &[4]).unwrap();
    assert!(
        user && msg.contains("noise.npy") && msg.contains("[N, 4]"),
        "{msg}"
    );
    let (msg, _) = e(&[2, 1, 2, 2], vec![0.0; 8], &[1, 2, 3]).unwrap();
    assert!(msg.contains("[N, 1, 2, 3] or [N, 6]"), "{msg}");
    let mut z = vec![0.0; 6];
    z[4] = f64::NAN;
    let (msg, user) = e(&[2, 3], z, &[3]).unwrap();
    assert!(user && msg.contains("flat index 4 (row 1)"), "{msg}");
    assert!(e(&[0, 3], vec![], &[3]).is_some());
    // both layouts of an image-shaped file are accepted
    assert!(e(&[2, 1, 2, 3], vec![0.0; 12], &[1, 2, 3]).is_none());
    assert!(e(&[2, 6], vec![0.0; 12], &[1, 2, 3]).is_none());
    let ok = InitNoise::from_values(p, &[2, 3], vec![0.0; 6], &[3]).unwrap();
    let msg = ok.check_rows(5).unwrap_err().to_string();
    assert!(msg.contains("holds 2 rows, but 5 samples"), "{msg}");
}
