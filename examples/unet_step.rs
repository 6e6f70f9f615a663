//! Times one U-Net training step and one sampling step, optionally beside PyTorch.
//!
//! ```text
//! cargo run --release --example unet_step -- [--preset demo] [--channels 1] [--size 28]
//!     [--workload train|sample|both] [--batch N] [--threads 2] [--iters 5] [--warmup 2]
//!     [--stock] [--profile] [--torch] [--rounds 1] [--python python3] [--json]
//! ```
//!
//! - train: `forward_train` + MSE against a fixed random target + backward + AdamW update
//!   (`diffuse::train::optim`, lr 1e-4, no weight decay, no clipping or warm-up, as the PyTorch
//!   reference), batch 64 by default;
//! - sample: one no-grad forward pass (plain tensors, eval mode) at batch 256 by default.
//!
//! For each workload it prints the median wall time and the median process CPU time (user +
//! system, all threads) per iteration, the FLOPs of one iteration (counted by the kernels: the
//! GEMMs of convolutions, linear layers and attention) and the achieved GFLOP/s, the machine's
//! sgemm GFLOP/s (2048^3 on the same threads) and the peak resident memory (VmHWM, reset through
//! `/proc/self/clear_refs` before the first warm-up iteration).
//!
//! `--torch` runs `bench/torch_step.py` (the same network from the same config in PyTorch, same
//! threads and batch) after ours, `--rounds` times alternately (ours, torch, ours, torch, ...),
//! since the machine is shared and its load varies; the ratios are of medians over all rounds.
//! `--stock` turns the fast kernels off (candle's own ops); `--profile` prints the per-op table
//! of [`diffuse::ops::profile`] for the timed iterations.

use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use diffuse::nets::{unet, UNetConfig};
use diffuse::ops::{self, profile};
use diffuse::rng::Rng;
use diffuse::train::{AdamW, AdamWConfig};
use serde_json::{json, Value};

#[derive(Clone)]
struct Args {
    preset: String,
    channels: usize,
    size: usize,
    workloads: Vec<String>,
    batch: Option<usize>,
    threads: usize,
    iters: usize,
    warmup: usize,
    stock: bool,
    profile: bool,
    torch: bool,
    rounds: usize,
    python: String,
    json: bool,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        preset: "demo".into(),
        channels: 1,
        size: 28,
        workloads: vec!["train".into(), "sample".into()],
        batch: None,
        threads: 2,
        iters: 5,
        warmup: 2,
        stock: false,
        profile: false,
        torch: false,
        rounds: 1,
        python: "python3".into(),
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--preset" => a.preset = value()?,
            "--channels" => a.channels = value()?.parse().context("--channels")?,
            "--size" => a.size = value()?.parse().context("--size")?,
            "--workload" => {
                a.workloads = match value()?.as_str() {
                    "both" => vec!["train".into(), "sample".into()],
                    w @ ("train" | "sample") => vec![w.to_string()],
                    w => bail!("--workload: '{w}', expected train, sample or both"),
                }
            }
            "--batch" => a.batch = Some(value()?.parse().context("--batch")?),
            "--threads" => a.threads = value()?.parse().context("--threads")?,
            "--iters" => a.iters = value()?.parse().context("--iters")?,
            "--warmup" => a.warmup = value()?.parse().context("--warmup")?,
            "--rounds" => a.rounds = value()?.parse().context("--rounds")?,
            "--python" => a.python = value()?,
            "--stock" => a.stock = true,
            "--profile" => a.profile = true,
            "--torch" => a.torch = true,
            "--json" => a.json = true,
            "-h" | "--help" => {
                println!("{}", HELP);
                std::process::exit(0);
            }
            other => bail!("unknown flag {other} (try --help)"),
        }
    }
    if a.iters == 0 || a.rounds == 0 || a.threads == 0 {
        bail!("--iters, --rounds and --threads must be at least 1");
    }
    Ok(a)
}

const HELP: &str = "unet_step [--preset demo|mnist|bench|cifar10] [--channels 1] [--size 28] \
[--workload train|sample|both] [--batch N] [--threads 2] [--iters 5] [--warmup 2] [--stock] \
[--profile] [--torch] [--rounds 1] [--python python3] [--json]";

/// Process CPU time (user + system, all threads) in ms.
fn cpu_ms() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 * 1e-3;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.is_empty() {
        f64::NAN
    } else if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_rss_mib() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/status") else {
        return f64::NAN;
    };
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// GFLOP/s of a 2048^3 sgemm (candle's matmul, the `gemm` crate), best of 3.
fn sgemm_gflops() -> Result<f64> {
    let n = 2048;
    let mut rng = Rng::new(1);
    let a = rng.randn(&[n, n], &Device::Cpu)?;
    let b = rng.randn(&[n, n], &Device::Cpu)?;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t0 = Instant::now();
        let c = a.matmul(&b)?;
        drop(c);
        best = best.min(t0.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n as f64).powi(3) / best / 1e9)
}

struct Timing {
    wall_ms: Vec<f64>,
    cpu_ms: Vec<f64>,
    flops: f64,
    peak_rss_mib: f64,
    profile: Vec<profile::Entry>,
}

fn run_ours(a: &Args, cfg: &UNetConfig, workload: &str, batch: usize) -> Result<Timing> {
    let dev = Device::Cpu;
    let (net, varmap) = unet::init_params(cfg, 0, &dev)?;
    let mut rng = Rng::new(1);
    let x = rng.randn(&[batch, cfg.in_channels, a.size, a.size], &dev)?;
    let t: Vec<f32> = (0..batch).map(|_| rng.below(1000) as f32).collect();
    let t = Tensor::from_vec(t, batch, &dev)?;
    let target = rng.randn(&[batch, cfg.out_channels, a.size, a.size], &dev)?;
    let mut opt = AdamW::new(
        &varmap,
        AdamWConfig {
            lr: 1e-4,
            weight_decay: 0.0,
            warmup_steps: 0,
            grad_clip: None,
            ..AdamWConfig::default()
        },
    )?;
    let mut drop_rng = Rng::new(2);
    let mut step = || -> Result<()> {
        if workload == "train" {
            let out = {
                let _p = profile::scope("forward");
                net.forward_train(&x, &t, &mut drop_rng)?
            };
            let loss = {
                let _p = profile::scope("loss");
                (out - &target)?.sqr()?.mean_all()?
            };
            opt.backward_step(&loss)?;
        } else {
            let _p = profile::scope("forward");
            let out = net.forward(&x, &t)?;
            drop(out);
        }
        Ok(())
    };
    reset_peak_rss();
    for _ in 0..a.warmup {
        step()?;
    }
    profile::set_enabled(true);
    profile::take();
    // one counted iteration for the FLOPs (not timed)
    step()?;
    let flops: f64 = profile::take().iter().map(|e| e.flops).sum();
    profile::set_enabled(a.profile);
    let (mut wall, mut cpu) = (Vec::new(), Vec::new());
    for _ in 0..a.iters {
        let (w0, c0) = (Instant::now(), cpu_ms());
        step()?;
        wall.push(w0.elapsed().as_secs_f64() * 1e3);
        cpu.push(cpu_ms() - c0);
    }
    let prof = profile::take();
    profile::set_enabled(false);
    Ok(Timing {
        wall_ms: wall,
        cpu_ms: cpu,
        flops,
        peak_rss_mib: peak_rss_mib(),
        profile: prof,
    })
}

/// Runs this example again as a child (one workload, fresh process, so that peak memory and
/// allocator state are its own).
fn run_child(a: &Args, workload: &str, batch: usize) -> Result<Value> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args([
        "--preset",
        &a.preset,
        "--channels",
        &a.channels.to_string(),
        "--size",
        &a.size.to_string(),
        "--workload",
        workload,
        "--batch",
        &batch.to_string(),
        "--threads",
        &a.threads.to_string(),
        "--iters",
        &a.iters.to_string(),
        "--warmup",
        &a.warmup.to_string(),
        "--json",
    ]);
    if a.stock {
        cmd.arg("--stock");
    }
    cmd.env("RAYON_NUM_THREADS", a.threads.to_string());
    cmd.env("DIFFUSE_UNET_STEP_CHILD", "1");
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("child failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or("");
    serde_json::from_str(line).with_context(|| format!("child printed {text}"))
}

fn run_torch(a: &Args, cfg: &UNetConfig, workload: &str, batch: usize) -> Result<Value> {
    let dir = std::env::temp_dir().join(format!("unet_step_{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("config.json");
    diffuse::io::write_json(&config, &cfg.to_json())?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/torch_step.py");
    let out = Command::new(&a.python)
        .arg(script)
        .args(["--config", &config.to_string_lossy()])
        .args(["--workload", workload])
        .args(["--batch", &batch.to_string()])
        .args(["--threads", &a.threads.to_string()])
        .args(["--iters", &a.iters.to_string()])
        .args(["--warmup", &a.warmup.to_string()])
        .output()
        .context("running bench/torch_step.py");
    let _ = std::fs::remove_dir_all(&dir);
    let out = out?;
    if !out.status.success() {
        bail!("torch_step.py failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or("");
    serde_json::from_str(line).with_context(|| format!("torch_step.py printed {text}"))
}

fn as_f64s(v: &Value, key: &str) -> Vec<f64> {
    v[key]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
        .unwrap_or_default()
}

fn main() -> Result<()> {
    let a = parse_args()?;
    ops::tune_allocator();
    std::env::set_var("RAYON_NUM_THREADS", a.threads.to_string());
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(a.threads)
        .build_global();
    ops::set_fast_kernels(!a.stock);
    let cfg = UNetConfig::preset(&a.preset, a.channels, a.size)?;
    let default_batch = |w: &str| if w == "train" { 64 } else { 256 };

    // A child (or a direct single run): time our workload and print one JSON line.
    let is_child = std::env::var("DIFFUSE_UNET_STEP_CHILD").is_ok();
    if is_child || (!a.torch && a.rounds == 1 && a.workloads.len() == 1) {
        let w = &a.workloads[0];
        let batch = a.batch.unwrap_or(default_batch(w));
        let t = run_ours(&a, &cfg, w, batch)?;
        let med = median(t.wall_ms.clone());
        let out = json!({
            "workload": w, "preset": a.preset, "batch": batch, "threads": a.threads,
            "stock": a.stock,
            "median_ms": med, "times_ms": t.wall_ms,
            "median_cpu_ms": median(t.cpu_ms.clone()), "cpu_ms": t.cpu_ms,
            "gflop": t.flops / 1e9, "gflops": t.flops / 1e9 / (med / 1e3),
            "peak_rss_mib": t.peak_rss_mib,
        });
        if !t.profile.is_empty() {
            let iters = a.iters as f64;
            let mut rows = t.profile.clone();
            rows.sort_by(|x, y| y.cpu_seconds.total_cmp(&x.cpu_seconds));
            let med_cpu = median(t.cpu_ms.clone());
            eprintln!(
                "{:<28} {:>8} {:>9} {:>9} {:>7} {:>12}",
                "scope", "calls/it", "wall ms", "cpu ms", "% cpu", "GFLOP/cpu-s"
            );
            for e in rows {
                let ms = e.seconds * 1e3 / iters;
                let cms = e.cpu_seconds * 1e3 / iters;
                eprintln!(
                    "{:<28} {:>8.1} {:>9.2} {:>9.2} {:>7.1} {:>12.1}",
                    e.name,
                    e.calls as f64 / iters,
                    ms,
                    cms,
                    100.0 * cms / med_cpu,
                    if e.cpu_seconds > 0.0 {
                        e.flops / e.cpu_seconds / 1e9
                    } else {
                        0.0
                    }
                );
            }
            eprintln!("step: wall {med:.1} ms, cpu {med_cpu:.1} ms");
        }
        println!("{out}");
        return Ok(());
    }

    let sgemm = sgemm_gflops()?;
    let mut report = Vec::new();
    for w in &a.workloads {
        let batch = a.batch.unwrap_or(default_batch(w));
        let (mut ours, mut torch) = (Vec::new(), Vec::new());
        for _ in 0..a.rounds {
            ours.push(run_child(&a, w, batch)?);
            if a.torch {
                torch.push(run_torch(&a, &cfg, w, batch)?);
            }
        }
        let all = |v: &[Value], k: &str| median(v.iter().flat_map(|r| as_f64s(r, k)).collect());
        let max = |v: &[Value], k: &str| v.iter().filter_map(|r| r[k].as_f64()).fold(f64::NAN, f64::max);
        let ours_ms = all(&ours, "times_ms");
        let ours_cpu = all(&ours, "cpu_ms");
        let gflop = ours.first().and_then(|r| r["gflop"].as_f64()).unwrap_or(f64::NAN);
        let mut row = json!({
            "workload": w, "preset": a.preset, "batch": batch, "threads": a.threads, "stock": a.stock,
            "rounds": a.rounds, "iters": a.iters,
            "ours_ms": ours_ms, "ours_cpu_ms": ours_cpu, "ours_peak_rss_mib": max(&ours, "peak_rss_mib"),
            "gflop": gflop, "gflops": gflop / (ours_ms / 1e3), "sgemm_gflops": sgemm,
            "fraction_of_sgemm": gflop / (ours_ms / 1e3) / sgemm,
            "ours_round_medians_ms": ours.iter().map(|r| r["median_ms"].clone()).collect::<Vec<_>>(),
        });
        if a.torch {
            let torch_ms = all(&torch, "times_ms");
            let torch_cpu = all(&torch, "cpu_ms");
            row["torch_ms"] = json!(torch_ms);
            row["torch_cpu_ms"] = json!(torch_cpu);
            row["torch_peak_rss_mib"] = json!(max(&torch, "peak_rss_mib"));
            row["ratio_wall"] = json!(ours_ms / torch_ms);
            row["ratio_cpu"] = json!(ours_cpu / torch_cpu);
            row["torch_round_medians_ms"] =
                json!(torch.iter().map(|r| r["median_ms"].clone()).collect::<Vec<_>>());
        }
        if !a.json {
            eprintln!("{}", serde_json::to_string_pretty(&row)?);
        }
        report.push(row);
    }
    println!("{}", json!(report));
    Ok(())
}
