//! `diffuse bench`: U-Net training-step and sampling-step speed and peak memory on this
//! machine, optionally side by side with the PyTorch reference (`bench/torch_reference.py`).
//!
//! Each measurement (sgemm, and every preset x workload) runs in a child process of `diffuse`
//! itself (`diffuse bench --worker ...`, hidden) with `RAYON_NUM_THREADS` set, so that the
//! thread count is fixed before any pool starts and each workload's peak memory is its own
//! (memory freed by an earlier workload can stay resident in the allocator). The PyTorch
//! reference likewise runs one process per workload.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use clap::Args;

use diffuse::bench::torch::{TorchReference, TorchRun};
use diffuse::bench::{
    self, report::FLOP_CONVENTION, BenchReport, PresetReport, SgemmRun, Workload, WorkloadReport,
    WorkloadRun, WorkloadSpec,
};
use diffuse::nets::{unet, UNetConfig};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// U-Net presets to time, comma-separated: bench (issue 6's 64/128/128 net, no attention),
    /// demo, mnist, cifar10.
    #[arg(long, default_value = "bench,demo,mnist")]
    presets: String,
    /// Workloads, comma-separated: train (forward + MSE + backward + AdamW), sample (one no-grad
    /// forward), guided (one classifier-free-guided step at half the sample batch: one forward of
    /// the doubled batch of a class-conditional copy of the net; no PyTorch counterpart).
    #[arg(long, default_value = "train,sample,guided")]
    workloads: String,
    /// Image channels.
    #[arg(long, default_value_t = 1)]
    channels: usize,
    /// Image height and width.
    #[arg(long, default_value_t = 28)]
    image_size: usize,
    /// Batch size of the training step.
    #[arg(long, default_value_t = 64)]
    train_batch: usize,
    /// Batch size of the sampling step.
    #[arg(long, default_value_t = 256)]
    sample_batch: usize,
    /// Untimed steps before timing.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Timed steps per workload (the median is reported).
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Threads for candle, rayon and gemm (via RAYON_NUM_THREADS) and for PyTorch
    /// (torch.set_num_threads); default: every CPU this process may run on.
    #[arg(long)]
    threads: Option<usize>,
    /// Seed of the weights, inputs and dropout masks.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Size n of the n x n f32 matrix product that measures the machine's sgemm GFLOP/s.
    #[arg(long, default_value_t = 2048)]
    sgemm_size: usize,
    /// Also run the PyTorch reference (bench/torch_reference.py; needs python3 with torch) on
    /// every preset and workload, and print the ratios ours / PyTorch.
    #[arg(long)]
    compare_torch: bool,
    /// Python interpreter for --compare-torch.
    #[arg(long, default_value = "python3")]
    python: String,
    /// The reference script (default: bench/torch_reference.py in the current directory, else
    /// in the source tree diffuse was built from).
    #[arg(long, value_name = "FILE.py")]
    torch_script: Option<PathBuf>,
    /// Arithmetic of the convolutions: f32, or bf16 (bf16 operands with f32 accumulation in
    /// the direct convolution kernels and their input gradients; weights, weight gradients,
    /// norms, attention, linear layers and optimizer state stay f32). bf16 needs a CPU with
    /// AVX512_BF16. With --compare-torch, PyTorch runs under
    /// torch.autocast("cpu", dtype=torch.bfloat16) and, for the ratio to fp32, once more in f32.
    #[arg(long, default_value = "f32", value_name = "f32|bf16")]
    precision: String,
    /// Use candle's stock ops instead of the fast CPU kernels (to see the kernels' effect).
    #[arg(long)]
    stock_ops: bool,
    /// Also time every fixed-step sampler's own arithmetic per NFE at the sample batch (its
    /// default steps on the ddpm process, driven by a denoiser that costs nothing), as a share of
    /// the first preset's sampling forward.
    #[arg(long)]
    solvers: bool,
    /// After the timed steps, run --iters more with the per-op profile on and print where a
    /// step's time goes: our scopes (blocks and kernels, inclusive) beside PyTorch's per-op
    /// self CPU time from torch.profiler (with --compare-torch). The timed figures are not
    /// affected.
    #[arg(long)]
    profile: bool,
    /// Rows of each profile table.
    #[arg(long, default_value_t = 25)]
    profile_rows: usize,
    /// Print every figure as one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Internal: run one measurement (sgemm, train, sample) in this process and print its JSON.
    #[arg(long, hide = true)]
    worker: Option<String>,
}

fn parse_list<T>(
    flag: &str,
    text: &str,
    parse: impl Fn(&str) -> diffuse::Result<T>,
) -> anyhow::Result<Vec<T>> {
    let items: Vec<&str> = text.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    if items.is_empty() {
        return super::usage(format!("--{flag}: empty list"));
    }
    Ok(items
        .into_iter()
        .map(parse)
        .collect::<diffuse::Result<Vec<T>>>()?)
}

impl BenchArgs {
    fn configs(&self) -> anyhow::Result<Vec<(String, UNetConfig)>> {
        parse_list("presets", &self.presets, |name| {
            Ok((
                name.to_string(),
                UNetConfig::preset(name, self.channels, self.image_size)?,
            ))
        })
    }

    fn batch(&self, w: Workload) -> usize {
        match w {
            Workload::Train => self.train_batch,
            Workload::Sample => self.sample_batch,
            // one forward of 2B rows: compared with `sample` at the same rows
            Workload::Guided => (self.sample_batch / 2).max(1),
        }
    }

    fn spec(&self, workload: Workload) -> WorkloadSpec {
        WorkloadSpec {
            workload,
            batch: self.batch(workload),
            warmup: self.warmup,
            iters: self.iters,
            seed: self.seed,
            profile: self.profile,
            precision: diffuse::ops::precision(),
        }
    }

    /// The arguments a worker needs to rebuild the same measurement.
    fn worker_command(&self, what: &str, preset: &str, threads: usize) -> anyhow::Result<Command> {
        let exe = std::env::current_exe().context("cannot find the diffuse executable to run workers")?;
        let mut cmd = Command::new(exe);
        cmd.arg("bench")
            .args(["--worker", what, "--presets", preset])
            .args(["--channels", &self.channels.to_string()])
            .args(["--image-size", &self.image_size.to_string()])
            .args(["--train-batch", &self.train_batch.to_string()])
            .args(["--sample-batch", &self.sample_batch.to_string()])
            .args(["--warmup", &self.warmup.to_string()])
            .args(["--iters", &self.iters.to_string()])
            .args(["--seed", &self.seed.to_string()])
            .args(["--sgemm-size", &self.sgemm_size.to_string()])
            .args(["--threads", &threads.to_string()])
            .env("RAYON_NUM_THREADS", threads.to_string());
        cmd.args(["--precision", &self.precision]);
        if self.profile {
            cmd.arg("--profile");
        }
        if self.stock_ops {
            cmd.arg("--stock-ops");
        }
        Ok(cmd)
    }
}

/// Runs a worker and parses the JSON it prints.
fn run_worker<T: serde::de::DeserializeOwned>(mut cmd: Command, what: &str) -> anyhow::Result<T> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start the {what} worker"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!(
            "{what} worker failed ({}): {}",
            out.status,
            stderr.lines().last().unwrap_or("").trim()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).with_context(|| format!("{what} worker printed {:?}", stdout.trim()))
}

/// `diffuse bench --worker ...`: one measurement in this process, JSON on stdout.
fn worker(args: &BenchArgs, what: &str) -> anyhow::Result<()> {
    diffuse::ops::set_fast_kernels(!args.stock_ops);
    super::set_precision(&args.precision)?;
    let device = candle_core::Device::Cpu;
    let json = if what == "sgemm" {
        serde_json::to_string(&bench::sgemm(args.sgemm_size, 2, 5, args.seed, &device)?)?
    } else if what == "solvers" {
        let shape = [args.channels, args.image_size, args.image_size];
        serde_json::to_string(&bench::solver::solver_costs(
            args.sample_batch,
            shape,
            args.iters,
            args.seed,
            &device,
        )?)?
    } else {
        let workload: Workload = what.parse()?;
        let configs = args.configs()?;
        let [(_, cfg)] = configs.as_slice() else {
            bail!("a worker runs one preset, got {}", configs.len());
        };
        serde_json::to_string(&bench::run_workload(cfg, &args.spec(workload), &device)?)?
    };
    println!("{json}");
    Ok(())
}

fn check_threads(what: &str, want: usize, rayon: usize, candle: usize) -> anyhow::Result<()> {
    if rayon != want || candle != want {
        bail!("{what} ran on {rayon} rayon / {candle} candle threads instead of {want}");
    }
    Ok(())
}

fn write_config(dir: &Path, preset: &str, cfg: &UNetConfig) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("diffuse-bench-{}-{preset}.json", std::process::id()));
    diffuse::io::write_json(&path, &cfg.to_json())?;
    Ok(path)
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(what) = &args.worker {
        return worker(&args, what);
    }
    super::set_precision(&args.precision)?; // an unsupported precision fails here, before any run
    let bf16 = diffuse::ops::precision() == diffuse::ops::Precision::Bf16;
    for (flag, v) in [
        ("train-batch", args.train_batch),
        ("sample-batch", args.sample_batch),
        ("iters", args.iters),
        ("sgemm-size", args.sgemm_size),
    ] {
        if v == 0 {
            return super::usage(format!("--{flag}: got 0, expected at least 1"));
        }
    }
    let threads = match args.threads {
        Some(0) => return super::usage("--threads: got 0, expected at least 1"),
        Some(n) => n,
        None => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    };
    let configs = args.configs()?;
    let workloads = parse_list("workloads", &args.workloads, str::parse::<Workload>)?;
    let torch = if args.compare_torch {
        let t = TorchReference::check(&args.python, args.torch_script.as_deref())?;
        eprintln!(
            "bench: PyTorch {} via {} {}",
            t.torch_version,
            t.python,
            t.script.display()
        );
        Some(t)
    } else {
        None
    };
    eprintln!(
        "bench: {threads} threads, fast kernels {}, {} convolutions, {}x{}x{} images, warm-up {}, {} timed steps",
        if args.stock_ops { "off" } else { "on" },
        if bf16 { "bf16" } else { "f32" },
        args.channels,
        args.image_size,
        args.image_size,
        args.warmup,
        args.iters
    );

    let sgemm: SgemmRun = run_worker(args.worker_command("sgemm", "bench", threads)?, "sgemm")?;
    check_threads("sgemm", threads, sgemm.rayon_threads, sgemm.candle_threads)?;
    eprintln!(
        "bench: sgemm {n}x{n}: {:.1} ms, {:.1} GFLOP/s",
        sgemm.median_ms,
        sgemm.gflops,
        n = sgemm.n
    );

    let tmp = std::env::temp_dir();
    let mut presets = Vec::with_capacity(configs.len());
    for (name, cfg) in &configs {
        let flops = bench::unet_forward_flops(cfg, args.image_size, args.image_size)?;
        let params = unet::num_parameters(cfg)?;
        let config_path = match &torch {
            Some(_) => Some(write_config(&tmp, name, cfg)?),
            None => None,
        };
        let mut reports = Vec::with_capacity(workloads.len());
        for &w in &workloads {
            let batch = args.batch(w);
            eprint!("bench: {name} {} batch {batch}: diffuse ", w.name());
            let ours: WorkloadRun = run_worker(
                args.worker_command(w.name(), name, threads)?,
                &format!("{name} {}", w.name()),
            )?;
            check_threads(
                &format!("{name} {}", w.name()),
                threads,
                ours.rayon_threads,
                ours.candle_threads,
            )?;
            eprint!("{:.1} ms", ours.median_ms);
            let theirs: Option<TorchRun> = match (&torch, &config_path) {
                // the reference script has no guided workload: ours is compared with our own
                // unguided step at twice the batch (printed below the table)
                _ if w == Workload::Guided => None,
                (Some(t), Some(path)) => {
                    let r = t
                        .run(path, &args.spec(w), threads)
                        .with_context(|| format!("PyTorch reference, {name} {}", w.name()))?;
                    eprint!(
                        ", PyTorch{} {:.1} ms",
                        if bf16 { " (bf16 autocast)" } else { "" },
                        r.median_ms
                    );
                    if r.params != params {
                        bail!(
                            "the PyTorch reference built a different network for {name}: {} parameters, ours {params}",
                            r.params
                        );
                    }
                    Some(r)
                }
                _ => None,
            };
            // with bf16: PyTorch in f32 too, for the ratio to plain f32
            let theirs_f32: Option<TorchRun> = match (&torch, &config_path) {
                (Some(t), Some(path)) if bf16 && w != Workload::Guided => {
                    let spec = WorkloadSpec {
                        precision: diffuse::ops::Precision::F32,
                        ..args.spec(w)
                    };
                    let r = t
                        .run(path, &spec, threads)
                        .with_context(|| format!("PyTorch reference (f32), {name} {}", w.name()))?;
                    eprint!(", PyTorch f32 {:.1} ms", r.median_ms);
                    Some(r)
                }
                _ => None,
            };
            eprintln!();
            let mut report = WorkloadReport::new(&ours, &flops, sgemm.gflops, theirs.as_ref());
            report.torch_f32_ms = theirs_f32.map(|t| t.median_ms);
            report.precision = if bf16 { "bf16" } else { "f32" };
            reports.push(report);
        }
        if let Some(p) = config_path {
            let _ = std::fs::remove_file(p); // a leftover temp file is harmless
        }
        presets.push(PresetReport {
            preset: name.clone(),
            params,
            image: [args.channels, args.image_size, args.image_size],
            forward_flops_per_image: flops,
            forward_gflop_per_image: flops.total() as f64 / 1e9,
            config: cfg.to_json(),
            workloads: reports,
        });
    }

    let solvers: Option<Vec<bench::solver::SolverCost>> = if args.solvers {
        eprintln!("bench: solvers' own cost at batch {}", args.sample_batch);
        let (first, _) = &configs[0];
        Some(run_worker(
            args.worker_command("solvers", first, threads)?,
            "solvers",
        )?)
    } else {
        None
    };
    // the sampling forward they are compared with
    let forward_ms = presets.first().and_then(|p| {
        p.workloads
            .iter()
            .find(|r| r.workload == Workload::Sample.name())
            .map(|r| r.ours.median_ms)
    });

    let report = BenchReport {
        threads,
        fast_kernels: !args.stock_ops,
        warmup: args.warmup,
        iters: args.iters,
        seed: args.seed,
        sgemm,
        flop_convention: FLOP_CONVENTION,
        torch_version: torch.map(|t| t.torch_version),
        presets,
    };
    if args.json {
        let mut json = report.to_json();
        if let (Some(costs), Some(obj)) = (&solvers, json.as_object_mut()) {
            let rows: Vec<serde_json::Value> = costs
                .iter()
                .map(|c| {
                    serde_json::json!({
                        "sampler": c.sampler, "steps": c.steps, "nfe": c.nfe,
                        "ms_per_nfe": c.ms_per_nfe,
                        "share_of_forward": forward_ms.map(|f| c.ms_per_nfe / f),
                    })
                })
                .collect();
            obj.insert("solvers".into(), serde_json::Value::Array(rows));
        }
        println!("{json}");
    } else {
        print!("{}", report.table());
        for p in &report.presets {
            for w in &p.workloads {
                if let Some(f32_ms) = w.torch_f32_ms {
                    println!(
                        "{} {} {}: ours bf16 / PyTorch bf16 autocast {}; ours bf16 / PyTorch f32 {:.2} ({f32_ms:.1} ms)",
                        p.preset,
                        w.workload,
                        w.batch,
                        w.ratio.as_ref().map_or("-".into(), |r| format!("{:.2}", r.time)),
                        w.ours.median_ms / f32_ms
                    );
                }
            }
        }
        if args.profile {
            for p in &report.presets {
                for w in &p.workloads {
                    if let Some(t) = w.profile_table(args.profile_rows) {
                        println!("\nprofile: {}", p.preset);
                        print!("{t}");
                    }
                }
            }
        }
        if let Some(costs) = &solvers {
            println!(
                "solver's own cost per NFE at batch {} ({}):",
                args.sample_batch,
                match (forward_ms, report.presets.first()) {
                    (Some(f), Some(p)) => format!("share of one {} sampling forward, {f:.1} ms", p.preset),
                    _ => "add the sample workload for its share of a forward".into(),
                }
            );
            for c in costs {
                let share = forward_ms.map_or("-".into(), |f| format!("{:.2} %", 100.0 * c.ms_per_nfe / f));
                println!(
                    "  {:<16} {:>4} steps {:>4} NFE {:>8.3} ms/NFE  {share}",
                    c.sampler, c.steps, c.nfe, c.ms_per_nfe
                );
            }
        }
        for p in &report.presets {
            let find = |w: Workload| p.workloads.iter().find(|r| r.workload == w.name());
            if let (Some(g), Some(s)) = (find(Workload::Guided), find(Workload::Sample)) {
                println!(
                    "{}: guided step at batch {} (one forward of {} rows) / unguided step at batch {}: {:.3}",
                    p.preset,
                    g.batch,
                    2 * g.batch,
                    s.batch,
                    g.ours.median_ms / s.ours.median_ms
                );
            }
        }
    }
    Ok(())
}
