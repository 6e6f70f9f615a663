//! `diffuse forward`: a picture of the forward process — a few images noised at evenly spaced
//! t, one block of rows per schedule (seed 003 Q10's schedule comparison).

use std::path::PathBuf;

use clap::Args;

use diffuse::data::{self, Split};
use diffuse::forward::q_sample;
use diffuse::rng::NoiseStreams;
use diffuse::schedule::Schedule;

use super::common::DataArgs;

#[derive(Args, Debug)]
pub struct ForwardArgs {
    #[command(flatten)]
    data: DataArgs,
    /// Which split the images come from: train or test.
    #[arg(long, default_value = "train")]
    split: Split,
    /// Schedules to compare, comma-separated (linear, scaled_linear, quadratic, cosine, sigmoid), or `all`.
    #[arg(long, default_value = "linear,cosine")]
    schedule: String,
    /// Number of diffusion steps T.
    #[arg(long, default_value_t = 1000)]
    timesteps: usize,
    /// Images per schedule (rows).
    #[arg(long, default_value_t = 3)]
    n_images: usize,
    /// Number of evenly spaced t values shown, from t = 0 (clean) to t = T (columns, >= 2).
    #[arg(long, default_value_t = 9)]
    columns: usize,
    /// Seed for the choice of images and the noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output PNG file.
    #[arg(long, value_name = "FILE.png")]
    out: PathBuf,
}

pub fn run(args: ForwardArgs) -> anyhow::Result<()> {
    if args.columns < 2 {
        return super::usage(format!("--columns: got {}, expected at least 2", args.columns));
    }
    if args.n_images == 0 {
        return super::usage("--n-images: got 0, expected at least 1");
    }
    let names: Vec<String> = if args.schedule == "all" {
        diffuse::schedule::BetaSchedule::NAMES
            .iter()
            .map(|s| s.to_string())
            .collect()
    } else {
        args.schedule.split(',').map(|s| s.trim().to_string()).collect()
    };
    let schedules = names
        .iter()
        .map(|n| Schedule::named(n, args.timesteps))
        .collect::<diffuse::Result<Vec<_>>>()?;
    let ds = data::load(&args.data.spec(args.split))?;
    let mut rng = diffuse::rng::Rng::new(args.seed);
    let mut idx: Vec<usize> = (0..ds.len()).collect();
    rng.shuffle(&mut idx);
    idx.truncate(args.n_images.min(ds.len()));
    let x0 = ds.batch(&idx, None)?;
    let [c, h, w] = ds.shape();
    let n = idx.len();

    // t values: 0 (clean), then evenly spaced up to T.
    let t_values: Vec<usize> = (0..args.columns)
        .map(|k| (k * args.timesteps + (args.columns - 1) / 2) / (args.columns - 1))
        .collect();
    let mut frames = Vec::with_capacity(args.columns);
    for &t in &t_values {
        let mut rows = Vec::with_capacity(schedules.len());
        for s in &schedules {
            // The same noise for every schedule and t, so only the schedule differs.
            let noise = NoiseStreams::new(args.seed, 0, n).randn(&[c, h, w], x0.device())?;
            rows.push(if t == 0 {
                x0.clone()
            } else {
                q_sample(s, &x0, &vec![t - 1; n], &noise)?
            });
        }
        frames.push(candle_core::Tensor::cat(&rows, 0)?);
    }
    let strip = diffuse::image_out::strip_image(&frames, &Default::default())?.to_rgb8();
    let scale = diffuse::image_out::auto_scale(h, w);
    let cell = (h * scale + 2) as i32;
    let row_labels: Vec<(i32, String)> = names
        .iter()
        .enumerate()
        .map(|(k, name)| (2 + (k * n) as i32 * cell + (n as i32 * cell) / 2, name.clone()))
        .collect();
    let col_cell = (w * scale + 2) as i32;
    let col_labels: Vec<(i32, String)> = t_values
        .iter()
        .enumerate()
        .map(|(k, t)| (2 + k as i32 * col_cell + col_cell / 2, format!("t={t}")))
        .collect();
    diffuse::plot::save_annotated(
        &args.out,
        &strip,
        &row_labels,
        &col_labels,
        "forward process q(x_t | x_0)",
    )?;
    println!(
        "wrote {} ({} images x {} t values x {} schedules)",
        args.out.display(),
        n,
        t_values.len(),
        names.len()
    );
    Ok(())
}
