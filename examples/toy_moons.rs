//! Trains the MLP denoiser on two moons, samples it with a plain DDPM ancestral loop
//! (Ho et al. 2020, Algorithm 2) and checks the samples against the moons' curves.
//!
//! ```text
//! cargo run --release --example toy_moons -- [--steps 5000] [--hidden 128] [--layers 3]
//!     [--batch 256] [--lr 1e-3] [--ema 0.999] [--sampling cosine|uniform] [--seed 0]
//!     [--schedule linear|cosine] [--timesteps 1000] [--n 2000] [--out target/toy_moons]
//! ```
//!
//! Also samples the same network through a variance-exploding probability-flow ODE (100 Euler
//! steps on the Karras rho = 7 grid), to show one network serving two processes. Prints, for
//! fresh data and for both sample sets: the mean distance to the nearest moon curve, the
//! fraction within 0.3 of a curve (in make_moons units, noise sd 0.1), the share of the upper
//! moon, the spread along each arc, and the energy distance to fresh data next to the null
//! value (two fresh sets); writes `scatter.png` (data grey, DDPM samples blue) and `samples.npy`.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use plotters::prelude::*;

use diffuse::data::toy2d::{DataSpec, Points, Toy2d};
use diffuse::denoiser::{Denoiser, NoiseLevel};
use diffuse::nets::mlp::{MlpConfig, MlpDenoiser};
use diffuse::rng::Rng;
use diffuse::schedule::Schedule;
use diffuse::train::toy::{load_data, toy_config, LogSnrSampling, ToyRun};
use diffuse::train::{AdamWConfig, Budget, EmaConfig, Interrupt, LoopOptions, TrainerConfig};

fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Ancestral sampling x_{t-1} = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t)
/// + sqrt(beta~_t) z, no noise at the last step (Ho et al. 2020, Algorithm 2).
fn ddpm_ancestral(
    den: &dyn Denoiser,
    s: &Schedule,
    n: usize,
    dim: usize,
    seed: u64,
) -> diffuse::Result<Vec<f64>> {
    let dev = Device::Cpu;
    let mut rng = Rng::new(seed);
    let mut x = rng.randn(&[n, dim], &dev)?;
    for i in (0..s.timesteps()).rev() {
        let levels = vec![NoiseLevel::from_alpha_bar(s.alpha_bar[i]); n];
        let eps = den.predict_eps(&x, &levels)?;
        let mean = ((&x - (eps * (s.beta[i] / s.sqrt_one_minus_alpha_bar[i]))?)? / s.alpha[i].sqrt())?;
        x = if i > 0 {
            (mean + (rng.randn(&[n, dim], &dev)? * s.posterior_variance[i].sqrt())?)?
        } else {
            mean
        };
    }
    Ok(x.flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|v| v as f64)
        .collect())
}

/// The variance-exploding probability-flow ODE dx/dsigma = eps(x, sigma), Euler steps on the
/// Karras et al. (2022, eq. 5) rho = 7 grid from sigma = 20 to 0.01, then a last step to 0.
fn ve_ode_euler(den: &dyn Denoiser, steps: usize, n: usize, seed: u64) -> diffuse::Result<Vec<f64>> {
    let (s_max, s_min, rho) = (20.0f64, 0.01f64, 7.0);
    let mut sigmas: Vec<f64> = (0..steps)
        .map(|i| {
            let f = i as f64 / (steps - 1) as f64;
            (s_max.powf(1.0 / rho) + f * (s_min.powf(1.0 / rho) - s_max.powf(1.0 / rho))).powf(rho)
        })
        .collect();
    sigmas.push(0.0);
    let mut x = (Rng::new(seed).randn(&[n, 2], &Device::Cpu)? * s_max)?;
    for w in sigmas.windows(2) {
        let eps = den.predict_eps(&x, &vec![NoiseLevel::new(1.0, w[0]); n])?;
        x = (x + (eps * (w[1] - w[0]))?)?;
    }
    Ok(x.flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|v| v as f64)
        .collect())
}

/// Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| between two 2-D samples (Szekely &
/// Rizzo 2013), V-statistic form.
fn energy_distance(a: &[f64], b: &[f64]) -> f64 {
    let mean_dist = |u: &[f64], v: &[f64]| {
        let mut s = 0.0;
        for p in u.chunks_exact(2) {
            for q in v.chunks_exact(2) {
                s += (p[0] - q[0]).hypot(p[1] - q[1]);
            }
        }
        s / ((u.len() / 2) * (v.len() / 2)) as f64
    };
    2.0 * mean_dist(a, b) - mean_dist(a, a) - mean_dist(b, b)
}

/// Distance of a point (in the dataset's coordinates) to the nearest moon curve, in make_moons
/// units, the moon it is nearest to (true = upper), and its angle along that arc in [0, pi].
fn moon_distance(p: &[f64]) -> (f64, bool, f64) {
    use std::f64::consts::PI;
    let (x, y) = ((p[0] + 1.0) / 2.0, (p[1] + 0.2) / 2.0);
    // upper arc: (cos th, sin th), th in [0, pi]
    let th_u = y.atan2(x).clamp(0.0, PI);
    let d_u = (x - th_u.cos()).hypot(y - th_u.sin());
    // lower arc: (1 - cos th, 0.5 - sin th)
    let th_l = (0.5 - y).atan2(1.0 - x).clamp(0.0, PI);
    let d_l = (x - (1.0 - th_l.cos())).hypot(y - (0.5 - th_l.sin()));
    if d_u <= d_l {
        (d_u, true, th_u)
    } else {
        (d_l, false, th_l)
    }
}

struct MoonStats {
    mean_distance: f64,
    within_03: f64,
    upper_share: f64,
    /// Fraction of each moon's points in each third of its arc (upper 0..3, lower 3..6).
    arc_thirds: [f64; 6],
}

fn moon_stats(xs: &[f64]) -> MoonStats {
    let n = xs.len() / 2;
    let (mut sum_d, mut within, mut upper) = (0.0, 0usize, 0usize);
    let mut thirds = [0usize; 6];
    for p in xs.chunks_exact(2) {
        let (d, up, th) = moon_distance(p);
        sum_d += d;
        within += (d < 0.3) as usize;
        upper += up as usize;
        let k = ((th / std::f64::consts::PI * 3.0) as usize).min(2) + if up { 0 } else { 3 };
        thirds[k] += 1;
    }
    let mut arc_thirds = [0.0; 6];
    for k in 0..6 {
        let moon_n = if k < 3 { upper } else { n - upper };
        arc_thirds[k] = thirds[k] as f64 / moon_n.max(1) as f64;
    }
    MoonStats {
        mean_distance: sum_d / n as f64,
        within_03: within as f64 / n as f64,
        upper_share: upper as f64 / n as f64,
        arc_thirds,
    }
}

fn scatter(path: &std::path::Path, data: &[f64], samples: &[f64], title: &str) -> diffuse::Result<()> {
    diffuse::plot::ensure_font();
    let (w, h) = (700u32, 700u32);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(diffuse::plot::plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(40)
            .build_cartesian_2d(-3.5f64..3.5, -3.0f64..4.0)
            .map_err(diffuse::plot::plot_err)?;
        chart.configure_mesh().draw().map_err(diffuse::plot::plot_err)?;
        let grey = RGBColor(170, 170, 170);
        chart
            .draw_series(
                data.chunks_exact(2)
                    .map(|p| Circle::new((p[0], p[1]), 1, grey.filled())),
            )
            .map_err(diffuse::plot::plot_err)?;
        chart
            .draw_series(
                samples
                    .chunks_exact(2)
                    .map(|p| Circle::new((p[0], p[1]), 1, diffuse::plot::PALETTE[0].filled())),
            )
            .map_err(diffuse::plot::plot_err)?;
    }
    diffuse::plot::save_rgb_png(path, w, h, buf)
}

fn main() -> diffuse::Result<()> {
    let steps: u64 = arg("--steps", 5000);
    let hidden: usize = arg("--hidden", 128);
    let layers: usize = arg("--layers", 3);
    let batch: usize = arg("--batch", 256);
    let lr: f64 = arg("--lr", 1e-3);
    let ema: f64 = arg("--ema", 0.999);
    let sampling: String = arg("--sampling", "cosine".to_string());
    let schedule: String = arg("--schedule", "linear".to_string());
    let n_samples: usize = arg("--n", 2000);
    let out: PathBuf = arg("--out", PathBuf::from("target/toy_moons"));
    let seed: u64 = arg("--seed", 0);

    let dev = Device::Cpu;
    let spec = DataSpec::Synthetic(Toy2d::Moons);
    let points = load_data(&spec, 10_000, seed)?;
    let model = MlpConfig {
        hidden,
        layers,
        ..MlpConfig::new(2)
    };
    let cfg = toy_config(
        &spec,
        &points,
        model,
        batch,
        LogSnrSampling::from_name(&sampling, -12.0, 12.0)?,
    );
    let tcfg = TrainerConfig {
        seed,
        optimizer: AdamWConfig {
            lr,
            ..AdamWConfig::default()
        },
        ema: EmaConfig {
            decay: ema,
            warmup: true,
        },
    };
    if out.exists() {
        std::fs::remove_dir_all(&out).map_err(|e| diffuse::Error::io(&out, e))?;
    }
    let t0 = std::time::Instant::now();
    let mut run = ToyRun::setup(&out, &points, None, &cfg, &tcfg, false, &dev)?;
    let outcome = run.run(
        &Budget {
            steps: Some(steps),
            minutes: None,
        },
        &LoopOptions {
            checkpoint_every: 0,
            hook_every: 0,
            eval_every: 0,
            progress: true,
        },
        &Interrupt::new(),
    )?;
    let train_s = t0.elapsed().as_secs_f64();

    let den = MlpDenoiser::load(&out, true)?;
    let timesteps: usize = arg("--timesteps", 1000);
    let sched = Schedule::named(&schedule, timesteps)?;
    let t1 = std::time::Instant::now();
    let samples = ddpm_ancestral(&den, &sched, n_samples, 2, seed + 1)?;
    let sample_s = t1.elapsed().as_secs_f64();
    let fresh: Points = Toy2d::Moons.sample(n_samples, &mut Rng::new(seed + 12345));

    let ve = ve_ode_euler(&den, 100, n_samples, seed + 2)?;
    let fresh2: Points = Toy2d::Moons.sample(n_samples, &mut Rng::new(seed + 54321));
    let d = moon_stats(fresh.as_slice());
    let s = moon_stats(&samples);
    let v = moon_stats(&ve);
    println!(
        "trained {} steps in {train_s:.1} s (hidden {hidden}, layers {layers}, batch {batch}, lr {lr}, ema {ema}, \
         log-SNR {sampling}); DDPM ancestral, {schedule} schedule, T = {timesteps}, {n_samples} samples in {sample_s:.1} s",
        outcome.step
    );
    let fmt = |m: &MoonStats| {
        format!(
            "mean distance {:.4}, within 0.3: {:.4}, upper share {:.3}, arc thirds {:?}",
            m.mean_distance,
            m.within_03,
            m.upper_share,
            m.arc_thirds.map(|v| (v * 1000.0).round() / 1000.0)
        )
    };
    println!("data:          {}", fmt(&d));
    println!("DDPM samples:  {}", fmt(&s));
    println!("VE ODE (100):  {}", fmt(&v));
    println!(
        "energy distance to fresh data: DDPM {:.5}, VE ODE {:.5}, null (fresh vs fresh) {:.5}",
        energy_distance(&samples, fresh.as_slice()),
        energy_distance(&ve, fresh.as_slice()),
        energy_distance(fresh2.as_slice(), fresh.as_slice())
    );
    let x = Tensor::from_vec(
        samples.iter().map(|&v| v as f32).collect::<Vec<_>>(),
        (n_samples, 2),
        &dev,
    )?;
    diffuse::io::write_npy_f32(
        &out.join("samples.npy"),
        &[n_samples, 2],
        &x.flatten_all()?.to_vec1::<f32>()?,
    )?;
    scatter(
        &out.join("scatter.png"),
        fresh.as_slice(),
        &samples,
        &format!(
            "moons: data (grey) vs {n_samples} samples (blue), {} steps",
            outcome.step
        ),
    )?;
    println!("wrote {}", out.join("scatter.png").display());
    Ok(())
}
