//! Command-line interface: one subcommand per file. `main` maps errors to exit codes in one
//! place: 0 success, 2 bad usage or bad input, 1 anything else. Errors print as one line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod common;
mod eval;
mod export;
mod fid;
mod forward;
mod launch;
mod sample;
mod samplers;
mod schedule;
mod toy;
mod toy_train;
mod train;

/// Denoising diffusion models: schedules, samplers, training, likelihoods.
#[derive(Parser, Debug)]
#[command(name = "diffuse", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print or plot noise schedules (beta_t, alpha_bar_t, posterior variance, SNR).
    Schedule(schedule::ScheduleArgs),
    /// Draw the forward process: images noised at evenly spaced t, one block per schedule.
    Forward(forward::ForwardArgs),
    /// Low-dimensional diffusion with the exact Gaussian-mixture oracle: sample, nll, score-field, report.
    Toy(toy::ToyArgs),
    /// Train the U-Net on images (bundled MNIST by default) with the simple loss.
    Train(train::TrainArgs),
    /// List every sampler: the processes it runs on, its default steps and options (the README's table).
    Samplers(samplers::SamplersArgs),
    /// Draw images from a trained model (a `diffuse train` run or a diffusers folder).
    Sample(sample::SampleArgs),
    /// Measure a trained image model (`eval nll`: the variational bound in bits/dim).
    Eval(eval::EvalArgs),
    /// Write a trained model in another layout (`--format diffusers`: a DDPMPipeline folder).
    Export(export::ExportArgs),
    /// Time a U-Net training step and sampling step (ms, images/s, GFLOP/s, peak memory), optionally against PyTorch.
    Bench(bench::BenchArgs),
}

/// An error in how the tool was called (a flag combination that makes no sense): exit code 2.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Shorthand for returning a [`UsageError`].
pub fn usage<T>(msg: impl Into<String>) -> anyhow::Result<T> {
    Err(UsageError(msg.into()).into())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Schedule(args) => schedule::run(args),
        Command::Forward(args) => forward::run(args),
        Command::Toy(args) => toy::run(args),
        Command::Train(args) => train::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Sample(args) => sample::run(args),
        Command::Samplers(args) => samplers::run(args),
        Command::Export(args) => export::run(args),
        Command::Bench(args) => bench::run(args),
    }
}

/// Sets the number of worker threads (rayon's global pool, which candle's CPU ops and the
/// fast kernels use). `None` keeps the default: all cores, or `RAYON_NUM_THREADS`.
pub fn set_threads(threads: Option<usize>) -> anyhow::Result<()> {
    if let Some(n) = threads {
        if n == 0 {
            return usage("--threads: got 0, expected at least 1");
        }
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        // Fails only if the pool was already built (then the env var above was in effect).
        let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
    }
    Ok(())
}

/// `--precision`: the arithmetic of the fast convolution kernels (`f32`, or `bf16` on CPUs with
/// AVX512_BF16: bf16 operands, f32 accumulation, f32 weights, norms and optimizer state).
pub fn set_precision(precision: &str) -> anyhow::Result<()> {
    let p: diffuse::ops::Precision = precision.parse()?;
    diffuse::ops::set_precision(p)?;
    Ok(())
}

/// Exit status after a second interrupt: 128 + SIGINT, the shell convention.
const EXIT_ON_SECOND_SIGNAL: i32 = 130;

/// The training loop's stop flag, connected to Ctrl-C, SIGTERM and SIGHUP (the `ctrlc` crate's
/// "termination" feature; one handler per process, installed on the first call). The first
/// signal asks the loop to finish the step and write a checkpoint; a second one quits at once
/// (the last complete checkpoint is kept: checkpoints become visible only when whole).
/// Set when the command has failed and is about to exit: a signal then arriving (mpirun's
/// SIGTERM to the other ranks once one exits) is ignored, and the error line stays the only one.
static ENDING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Silences the interrupt handler's messages for the rest of the process (see [`ENDING`]).
pub fn ending() {
    ENDING.store(true, std::sync::atomic::Ordering::SeqCst);
}

pub fn interrupt_on_signals() -> anyhow::Result<diffuse::train::Interrupt> {
    use std::sync::Mutex;
    static INSTALLED: Mutex<Option<diffuse::train::Interrupt>> = Mutex::new(None);
    let mut slot = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(existing) = slot.as_ref() {
        return Ok(existing.clone());
    }
    let interrupt = diffuse::train::Interrupt::new();
    let flag = interrupt.clone();
    // under mpirun every rank gets the signal: only rank 0 says so (it alone checkpoints)
    let quiet = diffuse::train::distributed::launcher_world().is_some_and(|(rank, _)| rank != 0);
    ctrlc::set_handler(move || {
        if ENDING.load(std::sync::atomic::Ordering::SeqCst) {
            return; // already on the way out with an error: nothing to finish or say
        }
        if flag.trigger() {
            if !quiet {
                eprintln!("\nsecond interrupt: quitting now (the last complete checkpoint is kept)");
            }
            std::process::exit(EXIT_ON_SECOND_SIGNAL);
        }
        if !quiet {
            eprintln!(
                "\ninterrupt: finishing the current step and writing a checkpoint \
                 (interrupt again to quit at once)"
            );
        }
    })
    .map_err(|e| anyhow::anyhow!("cannot install the Ctrl-C/SIGTERM handler: {e}"))?;
    *slot = Some(interrupt.clone());
    Ok(interrupt)
}

/// The device to compute on: the first CUDA GPU when built with `--features cuda` and one is
/// present (a data-parallel rank: GPU number local rank), else the CPU. The same device on
/// every call.
pub fn device() -> anyhow::Result<candle_core::Device> {
    #[cfg(feature = "cuda")]
    {
        static DEVICE: std::sync::OnceLock<Option<candle_core::Device>> = std::sync::OnceLock::new();
        let gpu = DEVICE
            .get_or_init(|| candle_core::Device::new_cuda(diffuse::train::distributed::local_rank()).ok());
        if let Some(d) = gpu {
            return Ok(d.clone());
        }
    }
    Ok(candle_core::Device::Cpu)
}

/// Exit code for an error: 2 when the user's input is at fault, else 1.
pub(crate) fn exit_code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if cause.downcast_ref::<UsageError>().is_some() {
            return 2;
        }
        if let Some(e) = cause.downcast_ref::<diffuse::Error>() {
            return if e.is_user_error() { 2 } else { 1 };
        }
    }
    1
}

pub fn main() -> ExitCode {
    // Keep freed tensor buffers for reuse instead of returning them to the kernel (candle
    // allocates every op's output afresh): about 2x on element-wise work, same peak memory.
    diffuse::ops::tune_allocator();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap prints help/version to stdout (exit 0) and usage errors to stderr (exit 2).
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // another rank of a data-parallel run reports this error: stop with its status
            let peer = err.chain().any(|c| {
                matches!(
                    c.downcast_ref::<diffuse::Error>(),
                    Some(diffuse::Error::PeerFailed { .. })
                )
            });
            if peer {
                return ExitCode::from(exit_code(&err));
            }
            eprintln!("error: {}", one_line(&err));
            ExitCode::from(exit_code(&err))
        }
    }
}

/// The error and its causes on one line, `outer: inner: ...`, each said once: a cause whose
/// text its outer message already contains (`diffuse::Error::Io` shows its I/O error) is not
/// repeated.
fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.replace('\n', " ")
}
