//! `diffuse schedule`: print a schedule's tables as JSON or plot all schedules.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use diffuse::schedule::{BetaSchedule, Schedule};

#[derive(Args, Debug)]
pub struct ScheduleArgs {
    /// Schedule kind: linear, scaled_linear (or scaled-linear), quadratic, cosine, sigmoid.
    #[arg(long, default_value = "linear")]
    kind: String,
    /// Number of diffusion steps T (an integer >= 2).
    #[arg(long, default_value_t = 1000)]
    timesteps: usize,
    /// beta_1 for linear, scaled_linear and quadratic (default 1e-4; must lie in (0, 1)).
    #[arg(long)]
    beta_start: Option<f64>,
    /// beta_T for linear, scaled_linear and quadratic (default 0.02; must lie in (0, 1), >= beta_start).
    #[arg(long)]
    beta_end: Option<f64>,
    /// Print one JSON object with keys kind, timesteps, beta, alpha_bar, posterior_variance, snr
    /// (arrays of length T, index 0 is t = 1, full f64 precision).
    #[arg(long)]
    json: bool,
    /// Draw alpha_bar_t and log-SNR against t/T for all schedules into this PNG file.
    #[arg(long, value_name = "FILE.png")]
    plot: Option<PathBuf>,
}

pub fn run(args: ScheduleArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.plot {
        if args.timesteps < 2 {
            return Err(diffuse::Error::param(
                "timesteps",
                format!("got {}, expected an integer >= 2", args.timesteps),
            )
            .into());
        }
        diffuse::plot::schedule_figure(path, args.timesteps)?;
        if !args.json {
            println!("wrote {}", path.display());
        }
        if !args.json {
            return Ok(());
        }
    }
    let mut kind = BetaSchedule::from_name(&args.kind)?;
    if args.beta_start.is_some() || args.beta_end.is_some() {
        let (default_start, default_end) = (1e-4, 0.02);
        kind = kind.with_beta_range(
            args.beta_start.unwrap_or(default_start),
            args.beta_end.unwrap_or(default_end),
        )?;
    }
    let s = Schedule::new(&kind, args.timesteps)?;
    if args.json {
        let obj = json!({
            "kind": kind.name(),
            "timesteps": s.timesteps(),
            "beta": s.beta,
            "alpha_bar": s.alpha_bar,
            "posterior_variance": s.posterior_variance,
            "snr": s.snr,
        });
        println!("{obj}");
    } else {
        println!("{} schedule, T = {}", kind.name(), s.timesteps());
        println!(
            "{:>6} {:>14} {:>14} {:>14} {:>14}",
            "t", "beta", "alpha_bar", "beta_tilde", "snr"
        );
        let n = s.timesteps();
        let mut rows: Vec<usize> = (0..10).map(|k| k * (n - 1) / 9).collect();
        rows.dedup();
        for i in rows {
            println!(
                "{:>6} {:>14.6e} {:>14.6e} {:>14.6e} {:>14.6e}",
                i + 1,
                s.beta[i],
                s.alpha_bar[i],
                s.posterior_variance[i],
                s.snr[i]
            );
        }
    }
    Ok(())
}
