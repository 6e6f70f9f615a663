//! Micro-benchmark of the network ops: fast CPU kernels vs candle's stock composition, at the
//! shapes of the issue-6 U-Net (batch 64, 64/128 channels, 28x28 / 14x14 / 7x7), optionally
//! against PyTorch (`bench/torch_ops.py`) run from here with the same thread count.
//!
//! ```text
//! cargo run --release --example ops_bench -- [--threads 2] [--reps 10] [--batch 64]
//!     [--only conv3x3] [--compare-torch] [--fast-only] [--min] [--cpu] [--default-alloc] [--python python3] [--json]
//! ```
//!
//! `--min` reports the fastest run instead of the median (steadier on a busy machine).
//! `--cpu` times the process's CPU time (user + system, all threads) instead of wall time, in
//! both programs (PyTorch's OpenMP threads are then made to wait passively, since spinning
//! counts as CPU time): the work done, steadier than wall time when other jobs share the cores.
//! The allocator is tuned with `diffuse::ops::tune_allocator` unless `--default-alloc`.
//!
//! Each workload is timed `reps` times after one warm-up; the median is printed (ms).
//! "fwd+bwd" is `y = op(inputs)` and the backward pass to every input (inputs are `Var`s) with
//! a fixed random output gradient `r`: candle starts the backward pass from a scalar, so the
//! loss is `WeightedSum` (`sum(y * r)`, a custom op whose backward hands back `r` itself, so
//! that the loss costs one parallel pass, not candle's strided broadcast products); PyTorch runs
//! `y.backward(r)`. The machine may be shared: compare ratios from one run, and repeat runs.

use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor, Var};
use diffuse::ops::{self, reference};
use diffuse::rng::Rng;

struct Args {
    threads: usize,
    reps: usize,
    batch: usize,
    only: Option<String>,
    compare_torch: bool,
    fast_only: bool,
    min: bool,
    cpu: bool,
    default_alloc: bool,
    python: String,
    json: bool,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        threads: 2,
        reps: 10,
        batch: 64,
        only: None,
        compare_torch: false,
        fast_only: false,
        min: false,
        cpu: false,
        default_alloc: false,
        python: "python3".into(),
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--threads" => a.threads = value()?.parse().context("--threads")?,
            "--reps" => a.reps = value()?.parse().context("--reps")?,
            "--batch" => a.batch = value()?.parse().context("--batch")?,
            "--only" => a.only = Some(value()?),
            "--python" => a.python = value()?,
            "--compare-torch" => a.compare_torch = true,
            "--fast-only" => a.fast_only = true,
            "--min" => a.min = true,
            "--cpu" => a.cpu = true,
            "--default-alloc" => a.default_alloc = true,
            "--json" => a.json = true,
            "-h" | "--help" => {
                println!(
                    "ops_bench [--threads N] [--reps N] [--batch N] [--only SUBSTRING] [--compare-torch] [--fast-only] [--min] [--cpu] [--default-alloc] [--python PATH] [--json]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown flag {other} (try --help)"),
        }
    }
    if a.threads == 0 || a.reps == 0 || a.batch == 0 {
        bail!("--threads, --reps and --batch must be at least 1");
    }
    Ok(a)
}

/// Which implementation a workload runs.
#[derive(Clone, Copy)]
enum Imp {
    Fast,
    Reference,
}

type OpFn = Box<dyn Fn(Imp, &[Tensor]) -> candle_core::Result<Tensor>>;

struct Workload {
    name: String,
    /// Input shapes; every input is a `Var` (gradients are taken with respect to all).
    shapes: Vec<Vec<usize>>,
    op: OpFn,
}

fn workloads(n: usize) -> Vec<Workload> {
    let mut w: Vec<Workload> = Vec::new();
    let mut add = |name: String, shapes: Vec<Vec<usize>>, op: OpFn| w.push(Workload { name, shapes, op });
    for (c_in, c_out, hw, k, s, p) in [
        (64, 64, 28, 3, 1, 1),
        (128, 128, 14, 3, 1, 1),
        (128, 128, 7, 3, 1, 1),
        (64, 64, 28, 3, 2, 1),
        (128, 64, 28, 1, 1, 0),
    ] {
        add(
            format!(
                "conv{k}x{k}{} {c_in}->{c_out} @{hw}",
                if s == 2 { " s2" } else { "" }
            ),
            vec![vec![n, c_in, hw, hw], vec![c_out, c_in, k, k], vec![c_out]],
            Box::new(move |imp, t| match imp {
                Imp::Fast => ops::conv::conv2d(&t[0], &t[1], Some(&t[2]), s, p),
                Imp::Reference => reference::conv2d(&t[0], &t[1], Some(&t[2]), s, p),
            }),
        );
    }
    for (c, hw) in [(64, 28), (128, 14)] {
        let x = vec![n, c, hw, hw];
        add(
            format!("group_norm(8) {c} @{hw}"),
            vec![x.clone(), vec![c], vec![c]],
            Box::new(|imp, t| match imp {
                Imp::Fast => ops::norm::group_norm(&t[0], 8, &t[1], &t[2], 1e-5),
                Imp::Reference => reference::group_norm(&t[0], 8, &t[1], &t[2], 1e-5),
            }),
        );
        add(
            format!("group_norm_silu(8) {c} @{hw}"),
            vec![x.clone(), vec![c], vec![c]],
            Box::new(|imp, t| match imp {
                Imp::Fast => ops::norm::group_norm_silu(&t[0], 8, &t[1], &t[2], 1e-5),
                Imp::Reference => reference::group_norm_silu(&t[0], 8, &t[1], &t[2], 1e-5),
            }),
        );
        add(
            format!("gn_scale_shift_silu(8) {c} @{hw}"),
            vec![x.clone(), vec![c], vec![c], vec![n, c], vec![n, c]],
            Box::new(|imp, t| match imp {
                Imp::Fast => {
                    ops::norm::group_norm_scale_shift_silu(&t[0], 8, &t[1], &t[2], &t[3], &t[4], 1e-5)
                }
                Imp::Reference => {
                    reference::group_norm_scale_shift_silu(&t[0], 8, &t[1], &t[2], &t[3], &t[4], 1e-5)
                }
            }),
        );
    }
    add(
        "silu 64 @28".into(),
        vec![vec![n, 64, 28, 28]],
        Box::new(|imp, t| match imp {
            Imp::Fast => ops::elementwise::silu(&t[0]),
            Imp::Reference => reference::silu(&t[0]),
        }),
    );
    add(
        "add_channel_bias 64 @28".into(),
        vec![vec![n, 64, 28, 28], vec![n, 64]],
        Box::new(|imp, t| match imp {
            Imp::Fast => ops::elementwise::add_channel_bias(&t[0], &t[1]),
            Imp::Reference => reference::add_channel_bias(&t[0], &t[1]),
        }),
    );
    add(
        "upsample_nearest2x 64 @14".into(),
        vec![vec![n, 64, 14, 14]],
        Box::new(|imp, t| match imp {
            Imp::Fast => ops::resample::upsample_nearest2x(&t[0]),
            Imp::Reference => reference::upsample_nearest2x(&t[0]),
        }),
    );
    add(
        "avg_pool2x 64 @28".into(),
        vec![vec![n, 64, 28, 28]],
        Box::new(|imp, t| match imp {
            Imp::Fast => ops::resample::avg_pool2x(&t[0]),
            Imp::Reference => reference::avg_pool2x(&t[0]),
        }),
    );
    // A DDPM ResBlock (Ho et al. 2020, appendix B; the issue's U-Net):
    // h = conv1(silu(gn1(x))) + temb[n, c]; out = x + conv2(silu(gn2(h))).
    for (c, hw) in [(64, 28), (128, 14)] {
        add(
            format!("resblock {c} @{hw}"),
            vec![
                vec![n, c, hw, hw],
                vec![c],
                vec![c],
                vec![c, c, 3, 3],
                vec![c],
                vec![n, c],
                vec![c],
                vec![c],
                vec![c, c, 3, 3],
                vec![c],
            ],
            Box::new(|imp, t| {
                let fast = matches!(imp, Imp::Fast);
                let gn_silu = |x: &Tensor, g: &Tensor, b: &Tensor| {
                    if fast {
                        ops::norm::group_norm_silu(x, 8, g, b, 1e-5)
                    } else {
                        reference::group_norm_silu(x, 8, g, b, 1e-5)
                    }
                };
                let conv = |x: &Tensor, w: &Tensor, b: &Tensor| {
                    if fast {
                        ops::conv::conv2d(x, w, Some(b), 1, 1)
                    } else {
                        reference::conv2d(x, w, Some(b), 1, 1)
                    }
                };
                let h = conv(&gn_silu(&t[0], &t[1], &t[2])?, &t[3], &t[4])?;
                let h = if fast {
                    ops::elementwise::add_channel_bias(&h, &t[5])?
                } else {
                    reference::add_channel_bias(&h, &t[5])?
                };
                let h = conv(&gn_silu(&h, &t[6], &t[7])?, &t[8], &t[9])?;
                &t[0] + h
            }),
        );
    }
    // The same ResBlock as two fused ops (ops::group_norm_silu_conv2d).
    for (c, hw) in [(64, 28), (128, 14)] {
        add(
            format!("resblock fused {c} @{hw}"),
            vec![
                vec![n, c, hw, hw],
                vec![c],
                vec![c],
                vec![c, c, 3, 3],
                vec![c],
                vec![n, c],
                vec![c],
                vec![c],
                vec![c, c, 3, 3],
                vec![c],
            ],
            Box::new(|imp, t| {
                let stage =
                    |x: &Tensor, g: &Tensor, b: &Tensor, w: &Tensor, wb: &Tensor, add: ops::ConvAdd| {
                        let norm = ops::GroupNormSilu {
                            groups: 8,
                            gamma: g,
                            beta: b,
                            eps: 1e-5,
                            scale_shift: None,
                        };
                        match imp {
                            Imp::Fast => ops::block::conv_block(x, Some(&norm), w, Some(wb), 1, 1, &add),
                            Imp::Reference => {
                                reference::group_norm_silu_conv2d(x, &norm, w, Some(wb), 1, 1, &add)
                            }
                        }
                    };
                let h = stage(
                    &t[0],
                    &t[1],
                    &t[2],
                    &t[3],
                    &t[4],
                    ops::ConvAdd {
                        channel_bias: Some(&t[5]),
                        residual: None,
                    },
                )?;
                stage(
                    &h,
                    &t[6],
                    &t[7],
                    &t[8],
                    &t[9],
                    ops::ConvAdd {
                        channel_bias: None,
                        residual: Some(&t[0]),
                    },
                )
            }),
        );
    }
    for (l, d) in [(49, 128), (196, 128)] {
        let scale = 1.0 / (d as f64).sqrt();
        add(
            format!("attention L{l} D{d}"),
            vec![vec![n, l, d], vec![n, l, d], vec![n, l, d]],
            Box::new(move |imp, t| match imp {
                Imp::Fast => ops::attention::attention(&t[0], &t[1], &t[2], scale),
                Imp::Reference => reference::attention(&t[0], &t[1], &t[2], scale),
            }),
        );
    }
    w
}

static USE_CPU: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Milliseconds on the chosen clock: wall time, or the process's CPU time with `--cpu`.
fn now_ms() -> f64 {
    if USE_CPU.load(std::sync::atomic::Ordering::Relaxed) {
        // SAFETY: getrusage writes into the zeroed struct we pass.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
        let tv = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 * 1e-3;
        tv(ru.ru_utime) + tv(ru.ru_stime)
    } else {
        use std::sync::OnceLock;
        static START: OnceLock<Instant> = OnceLock::new();
        START.get_or_init(Instant::now).elapsed().as_secs_f64() * 1e3
    }
}

static USE_MIN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `loss = sum(y * r)`; backward: `dy = r * dloss` (dloss is 1 when the loss starts the pass).
struct WeightedSum {
    r: Tensor,
    r_data: std::sync::Arc<Vec<f32>>,
}

impl CustomOp1 for WeightedSum {
    fn name(&self) -> &'static str {
        "weighted-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("weighted-sum: contiguous input expected".into()))?;
        let y = &s.as_slice::<f32>()?[a..b];
        let r = &self.r_data;
        let total: f64 = y
            .par_chunks(1 << 14)
            .zip(r.par_chunks(1 << 14))
            .map(|(y, r)| {
                let mut acc = [0f32; 16];
                for (yc, rc) in y.chunks(16).zip(r.chunks(16)) {
                    for (i, (a, b)) in yc.iter().zip(rc).enumerate() {
                        acc[i] += a * b;
                    }
                }
                acc.iter().map(|&a| a as f64).sum::<f64>()
            })
            .sum();
        Ok((CpuStorage::F32(vec![total as f32]), Shape::from(())))
    }

    fn bwd(&self, _y: &Tensor, _loss: &Tensor, dloss: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = dloss.to_scalar::<f32>()?;
        if g == 1.0 {
            Ok(Some(self.r.clone()))
        } else {
            Ok(Some((&self.r * g as f64)?))
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if USE_MIN.load(std::sync::atomic::Ordering::Relaxed) {
        return v.iter().copied().fold(f64::INFINITY, f64::min);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// Median ms of the forward pass and of forward + loss + backward.
fn time(w: &Workload, imp: Imp, reps: usize, rng: &mut Rng) -> Result<(f64, f64)> {
    let vars: Vec<Var> = w
        .shapes
        .iter()
        .map(|s| Ok(Var::from_tensor(&rng.randn(s, &Device::Cpu)?)?))
        .collect::<Result<_>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = (w.op)(imp, &ts)?;
    let r = rng.randn(y.dims(), &Device::Cpu)?;
    let r_data = std::sync::Arc::new(r.flatten_all()?.to_vec1::<f32>()?);
    drop(y);
    let (mut fwd, mut both) = (Vec::new(), Vec::new());
    for i in 0..=reps {
        let t0 = now_ms();
        let y = (w.op)(imp, &ts)?;
        let t1 = now_ms() - t0;
        drop(y);
        let t0 = now_ms();
        let y = (w.op)(imp, &ts)?;
        let loss = WeightedSum {
            r: r.clone(),
            r_data: r_data.clone(),
        };
        let grads = y.contiguous()?.apply_op1(loss)?.backward()?;
        let t2 = now_ms() - t0;
        drop(grads);
        if i > 0 {
            fwd.push(t1);
            both.push(t2);
        }
    }
    Ok((median(fwd), median(both)))
}

/// PyTorch's medians per workload name, from `bench/torch_ops.py --json`.
fn torch_times(a: &Args) -> Result<serde_json::Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/torch_ops.py");
    let mut cmd = Command::new(&a.python);
    cmd.arg(script)
        .args(["--threads", &a.threads.to_string()])
        .args(["--reps", &a.reps.to_string()])
        .args(["--batch", &a.batch.to_string()])
        .arg("--json");
    if a.min {
        cmd.arg("--min");
    }
    if a.cpu {
        cmd.arg("--cpu");
    }
    if let Some(o) = &a.only {
        cmd.args(["--only", o]);
    }
    let out = cmd
        .output()
        .with_context(|| format!("running {} {script}", a.python))?;
    if !out.status.success() {
        bail!("{script} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_slice(&out.stdout).context("parsing the PyTorch script's JSON")
}

fn main() -> Result<()> {
    let a = parse_args()?;
    // candle's matmul reads RAYON_NUM_THREADS; the kernels use rayon's global pool. Both are set
    // before any thread starts.
    std::env::set_var("RAYON_NUM_THREADS", a.threads.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(a.threads)
        .build_global()
        .context("building the thread pool")?;
    if !a.default_alloc && !ops::tune_allocator() {
        eprintln!("ops_bench: could not tune the allocator (not glibc?); timing with its defaults");
    }
    USE_CPU.store(a.cpu, std::sync::atomic::Ordering::Relaxed);
    USE_MIN.store(a.min, std::sync::atomic::Ordering::Relaxed);
    let mut rng = Rng::new(0);
    let workloads: Vec<Workload> = workloads(a.batch)
        .into_iter()
        .filter(|w| a.only.as_ref().is_none_or(|o| w.name.contains(o.as_str())))
        .collect();
    let mut rows = Vec::new();
    for w in &workloads {
        let (ff, fb) = time(w, Imp::Fast, a.reps, &mut rng)?;
        let (rf, rb) = if a.fast_only {
            (f64::NAN, f64::NAN)
        } else {
            time(w, Imp::Reference, a.reps, &mut rng)?
        };
        rows.push((w.name.clone(), ff, fb, rf, rb));
    }
    let torch = if a.compare_torch {
        Some(torch_times(&a)?)
    } else {
        None
    };
    let tget = |name: &str, key: &str| -> Option<f64> { torch.as_ref()?.get(name)?.get(key)?.as_f64() };
    if a.json {
        let obj: serde_json::Map<String, serde_json::Value> = rows
            .iter()
            .map(|(name, ff, fb, rf, rb)| {
                (
                    name.clone(),
                    serde_json::json!({
                        "fast_fwd_ms": ff, "fast_fwd_bwd_ms": fb,
                        "reference_fwd_ms": rf, "reference_fwd_bwd_ms": rb,
                        "torch_fwd_ms": tget(name, "fwd_ms"), "torch_fwd_bwd_ms": tget(name, "fwd_bwd_ms"),
                    }),
                )
            })
            .collect();
        println!("{}", serde_json::Value::Object(obj));
        return Ok(());
    }
    println!(
        "ops_bench: batch {}, {} threads, {} of {} runs (ms); ratio = fast / other",
        a.batch,
        a.threads,
        if a.min { "fastest" } else { "median" },
        a.reps
    );
    print!("{:<32} {:>9} {:>9} {:>9}", "workload", "fast", "candle", "ratio");
    if torch.is_some() {
        print!(" {:>9} {:>9}", "torch", "ratio");
    }
    println!();
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    for (name, ff, fb, rf, rb) in &rows {
        for (label, fast, refr, key) in [("fwd", ff, rf, "fwd_ms"), ("fwd+bwd", fb, rb, "fwd_bwd_ms")] {
            print!(
                "{:<32} {:>9.2} {:>9.2} {:>9.3}",
                format!("{name} {label}"),
                fast,
                refr,
                fast / refr
            );
            if torch.is_some() {
                let t = tget(name, key);
                print!(" {:>9} {:>9}", fmt(t), fmt(t.map(|t| fast / t)));
            }
            println!();
        }
    }
    Ok(())
}
