//! `diffuse eval`: measure a trained image model.
//!
//! `diffuse eval nll` computes the full variational bound (Ho et al. 2020, eq. 5) with the
//! discretized decoder (eq. 13), all T terms, on test images, in bits per dimension.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use diffuse::data::{self, Split};
use diffuse::likelihood::{variational_bound, BoundConfig, Decoder};
use diffuse::posterior::{ClipX0, ReverseVariance};

use super::common::{DataArgs, ModelSource};

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(subcommand)]
    command: EvalCommand,
}

#[derive(Subcommand, Debug)]
enum EvalCommand {
    /// Negative log-likelihood bound in bits/dim: L_T + sum L_{t-1} + L_0 over all T steps.
    Nll(NllArgs),
    /// Distances between generated images (a samples.npy) and real images: the Fréchet
    /// distance of pixel moments and the energy distance, with the same figures for real
    /// training images as the floor.
    Samples(SamplesArgs),
    /// FID (pytorch-fid's InceptionV3, `--inception FILE`), KID and precision/recall between
    /// two image sets or statistics files; the FD of the bundled digit features for greyscale
    /// digits without a weights file.
    Fid(super::fid::FidArgs),
}

#[derive(Args, Debug)]
struct SamplesArgs {
    /// The generated images: a float32 .npy of shape [N, C, H, W] in [0, 1] (what
    /// `diffuse sample` writes as samples.npy; without --data, the reference is the data the
    /// model was trained on, read from the info.json beside it).
    #[arg(long, value_name = "FILE.npy")]
    samples: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// Reference split: test (default) or train.
    #[arg(long, default_value = "test")]
    split: Split,
    /// Number of reference images (the first M of the split; default: as many as samples).
    #[arg(long)]
    n_images: Option<usize>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Features the Fréchet distance is computed on: `digits` (the bundled digit classifier's
    /// 128 features, the default for greyscale images; also reports the classifier's class
    /// histogram, its entropy and, for class-conditional samples, the agreement with the
    /// requested classes recorded in info.json) or `pixels` (raw pixel moments).
    #[arg(long, value_name = "digits|pixels")]
    features: Option<String>,
    /// Write the result as JSON here.
    #[arg(long, value_name = "FILE.json")]
    out: Option<PathBuf>,
    /// Print the result as one JSON object instead of the summary line.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct NllArgs {
    #[command(flatten)]
    model: ModelSource,
    /// A scheduler_config.json for a --diffusers model (default: the folder's own).
    #[arg(long, value_name = "FILE")]
    scheduler_config: Option<PathBuf>,
    /// List on stderr the fields of a --diffusers model's config.json and scheduler_config.json
    /// that were ignored (diffusers keys this loader does not read; `_` metadata not listed).
    #[arg(long)]
    verbose: bool,
    #[command(flatten)]
    data: DataArgs,
    /// Which split to measure on: test (default) or train.
    #[arg(long, default_value = "test")]
    split: Split,
    /// Number of images (the first M of the split).
    #[arg(long, default_value_t = 100)]
    n_images: usize,
    /// Images per batch (does not change the result).
    #[arg(long, default_value_t = 50)]
    batch: usize,
    /// Reverse-process variance sigma_t^2: large (beta_t) or small (beta~_t) (DDPM paper sec. 3.2).
    #[arg(long, default_value = "large")]
    variance: String,
    /// Clip the predicted x_0 to [-1, 1] in the reverse-step mean (as improved-diffusion's bits/dim).
    #[arg(long)]
    clip_x0: bool,
    /// Use the raw weights instead of the EMA weights (--checkpoint models).
    #[arg(long)]
    no_ema: bool,
    /// Class-conditional models: labels (the bound of p(x | c) given each image's true label,
    /// the default) or none (the unconditional model's bound, the null class).
    #[arg(long)]
    condition: Option<String>,
    /// Seed of the forward-process noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Write the result as JSON here (keys bits_per_dim, stderr, l_t, l_sum, l_0, n_images, ...).
    #[arg(long, value_name = "FILE.json")]
    out: Option<PathBuf>,
    /// Print the result as one JSON object instead of the summary line.
    #[arg(long)]
    json: bool,
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    match args.command {
        EvalCommand::Nll(a) => nll(a),
        EvalCommand::Samples(a) => samples(a),
        EvalCommand::Fid(a) => super::fid::run(a),
    }
}

/// `diffuse eval samples`: pixel-space Fréchet distance and energy distance to real images.
fn samples(a: SamplesArgs) -> anyhow::Result<()> {
    use diffuse::eval::{distance::energy_distance, frechet::frechet_distance};
    super::set_threads(a.threads)?;
    // the samples are the user's input: a file that is not there, not an array of [N, C, H, W]
    // images or holds a non-finite value is bad input naming it (exit 2), found as it is read
    let npy = diffuse::io::read_npy_finite(&a.samples)?;
    if npy.shape.len() != 4 || npy.shape[0] < 2 {
        return Err(diffuse::Error::bad_input(
            &a.samples,
            format!("expected shape [N, C, H, W] with N >= 2, got {:?}", npy.shape),
        )
        .into());
    }
    let n = npy.shape[0];
    let shape = [npy.shape[1], npy.shape[2], npy.shape[3]];
    let d = shape.iter().product::<usize>();
    // without --data: the training data recorded in the info.json `diffuse sample` wrote beside
    // the samples, if any (a damaged info.json is an error naming it, never silently other data)
    let run_data: Option<data::DataSpec> = match a.samples.parent() {
        Some(dir) if a.data.data.is_none() && a.data.format.is_none() => {
            data::training_data_from_info(&dir.join("info.json"))?
        }
        _ => None,
    };
    let mut spec = a.data.spec_or(a.split, run_data.as_ref());
    if spec.image_size.is_none() && shape[1] == shape[2] {
        spec.image_size = Some(shape[1]);
    }
    if spec.channels.is_none() {
        spec.channels = Some(shape[0]);
    }
    let ds = data::load(&spec)?;
    if ds.shape() != shape {
        return super::usage(format!(
            "the samples are {:?} but the reference images are {:?}",
            shape,
            ds.shape()
        ));
    }
    let m = a.n_images.unwrap_or(n).min(ds.len());
    if m < 2 {
        return super::usage("need at least 2 reference images");
    }
    // reference images in [0, 1], like the samples
    let unit = |ds: &data::ImageDataset, m: usize| -> Vec<f64> {
        ds.pixels()[..m * d]
            .iter()
            .map(|&v| (v as f64 + 1.0) / 2.0)
            .collect()
    };
    let digits = match a.features.as_deref() {
        None => shape[0] == 1,
        Some("digits") if shape[0] == 1 => true,
        Some("digits") => {
            return super::usage(format!(
            "--features digits needs greyscale images; the samples have {} channels (use --features pixels)",
            shape[0]
        ))
        }
        Some("pixels") => false,
        Some(other) => {
            return super::usage(format!(
                "--features: unknown '{other}', expected digits or pixels"
            ))
        }
    };
    let reference = unit(&ds, m);
    let energy = energy_distance(&npy.data, &reference, d)?;
    // the floor: real images of the other split against the same reference images
    let other = if a.split == Split::Test {
        Split::Train
    } else {
        Split::Test
    };
    // (a folder without a split of that name has no floor)
    let ods = data::load(&spec.with_split(other)).ok();
    let k = ods.as_ref().map_or(0, |o| n.min(o.len()));
    let real = match (&ods, k >= 2) {
        (Some(ods), true) => Some(unit(ods, k)),
        _ => None,
    };
    let energy_floor = real
        .as_ref()
        .map(|r| energy_distance(r, &reference, d))
        .transpose()?;
    let device = candle_core::Device::Cpu;
    let mut extra = serde_json::Map::new();
    let (fd_name, fd, fd_floor) = if digits {
        use diffuse::eval::digits::{agreement, class_histogram, DigitClassifier, FEATURES, NAME};
        let net = DigitClassifier::bundled(&device)?;
        let (f_s, c_s) = net.describe(&npy.data, shape, &device)?;
        let (f_r, _) = net.describe(&reference, shape, &device)?;
        let fd = frechet_distance(&f_s, &f_r, FEATURES)?;
        let floor = match &real {
            Some(r) => Some(frechet_distance(
                &net.describe(r, shape, &device)?.0,
                &f_r,
                FEATURES,
            )?),
            None => None,
        };
        let (hist, entropy) = class_histogram(&c_s);
        extra.insert("feature_network".into(), json!(NAME));
        extra.insert("class_histogram".into(), json!(hist));
        extra.insert("class_entropy".into(), json!(entropy));
        // the classes the images were asked for, from the info.json `diffuse sample` wrote
        let requested = requested_classes(&a.samples, n)?;
        if let Some(req) = requested {
            let (all, per) = agreement(&c_s, &req);
            extra.insert("agreement".into(), json!(all));
            let per: serde_json::Map<String, serde_json::Value> = per
                .iter()
                .enumerate()
                .filter(|(_, (_, asked))| *asked > 0)
                .map(|(c, (hit, asked))| (c.to_string(), json!(*hit as f64 / *asked as f64)))
                .collect();
            extra.insert("per_class_agreement".into(), serde_json::Value::Object(per));
        }
        ("fd_digit_features", fd, floor)
    } else {
        let fd = frechet_distance(&npy.data, &reference, d)?;
        let floor = real
            .as_ref()
            .map(|r| frechet_distance(r, &reference, d))
            .transpose()?;
        ("fd_pixels", fd, floor)
    };
    let mut result = json!({
        fd_name: fd,
        format!("{fd_name}_real"): fd_floor,
        "energy_distance": energy,
        "energy_distance_real": energy_floor,
        "n_samples": n,
        "n_images": m,
        "n_real": k,
        "split": a.split.to_string(),
        "data": ds.source(),
        "samples": a.samples.display().to_string(),
    });
    if let Some(obj) = result.as_object_mut() {
        obj.extend(extra);
    }
    if let Some(path) = &a.out {
        diffuse::io::write_json(path, &result)?;
    }
    if a.json {
        println!("{result}");
    } else {
        let fmt = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.4}"));
        let what = if digits {
            "FD of the bundled digit features"
        } else {
            "Fréchet distance of pixels"
        };
        println!(
            "{n} samples vs {m} {} images: {what} {fd:.4} (real {other} images: {}), energy distance {energy:.4} (real: {})",
            a.split,
            fmt(fd_floor),
            fmt(energy_floor)
        );
        if let (Some(h), Some(e)) = (result.get("class_histogram"), result.get("class_entropy")) {
            println!(
                "digit classifier: classes {h}, entropy {:.3} nats (uniform: 2.303)",
                e.as_f64().unwrap_or(f64::NAN)
            );
        }
        if let Some(g) = result.get("agreement").and_then(|g| g.as_f64()) {
            println!(
                "agreement with the requested class: {:.1} % (per class: {})",
                100.0 * g,
                result["per_class_agreement"]
            );
        }
        if let Some(path) = &a.out {
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}

/// The class each image was asked for (`None`: unconditional), from the `classes` of the
/// info.json that `diffuse sample` writes beside samples.npy; `None` when there is no info.json
/// or it records no classes. A malformed one is an error naming it.
fn requested_classes(samples: &std::path::Path, n: usize) -> anyhow::Result<Option<Vec<Option<usize>>>> {
    let Some(dir) = samples.parent() else {
        return Ok(None);
    };
    let path = dir.join("info.json");
    let Some(info) = diffuse::config::samples_info::SamplesInfo::read(&path)? else {
        return Ok(None);
    };
    let Some(req) = info.classes_for(n, &path)? else {
        return Ok(None);
    };
    let req = req.to_vec();
    Ok(req.iter().any(Option::is_some).then_some(req))
}

fn nll(a: NllArgs) -> anyhow::Result<()> {
    super::set_threads(a.threads)?;
    if a.n_images == 0 || a.batch == 0 {
        return super::usage("--n-images and --batch must be at least 1");
    }
    let model = a
        .model
        .load(!a.no_ema, a.scheduler_config.as_deref(), a.verbose)?;
    let mut spec = a.data.spec_or(a.split, model.data.as_ref());
    // Make the data the model's shape unless the user chose otherwise.
    let [c, h, w] = model.shape;
    if spec.image_size.is_none() && h == w {
        spec.image_size = Some(h);
    }
    if spec.channels.is_none() {
        spec.channels = Some(c);
    }
    let ds = data::load(&spec)?;
    if ds.shape() != model.shape {
        return super::usage(format!(
            "the images are {:?} but the model makes {:?} (use --image-size / --channels)",
            ds.shape(),
            model.shape
        ));
    }
    let n = a.n_images.min(ds.len());
    let conditional = match (model.denoiser.num_classes(), a.condition.as_deref()) {
        (None, None) => false,
        (None, Some(_)) => {
            return super::usage("--condition applies to class-conditional models; this one is unconditional")
        }
        (Some(_), None | Some("labels")) => {
            if ds.labels().is_none() {
                return super::usage(format!(
                    "{} has no labels for the conditional bound; use --condition none",
                    ds.source()
                ));
            }
            true
        }
        (Some(_), Some("none")) => false,
        (Some(_), Some(other)) => {
            return super::usage(format!("--condition {other}: expected labels or none"))
        }
    };
    let variance = ReverseVariance::from_name(&a.variance)?;
    let schedule = model.schedule().clone();
    let device = super::device()?;
    let t_max = schedule.timesteps();
    let bar = if a.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new((n * t_max) as u64)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} denoiser steps [{elapsed_precise} < {eta_precise}] {msg}",
        )
        .map_err(|e| anyhow::anyhow!("progress bar template: {e}"))?,
    );
    let mut images = Vec::with_capacity(n);
    let mut start = 0;
    while start < n {
        let b = a.batch.min(n - start);
        let idx: Vec<usize> = (start..start + b).collect();
        // 8-bit grid: resized images are rounded back to the 256 levels the decoder models.
        let x0 = ds.batch(&idx, None)?;
        let x0 =
            ((x0.affine(127.5, 127.5)?.round()?.clamp(0.0, 255.0)? / 127.5)? - 1.0)?.to_device(&device)?;
        let config = BoundConfig {
            variance,
            clip_x0: if a.clip_x0 { ClipX0::DataRange } else { ClipX0::Off },
            decoder: Decoder::Discretized,
            seed: a.seed,
            first_index: start as u64,
        };
        bar.set_message(format!("images {}..{}", start, start + b));
        let guided = if conditional {
            let labels = ds
                .batch_labels(&idx)
                .ok_or_else(|| anyhow::anyhow!("the images have no labels"))?;
            Some(diffuse::guidance::Guided::new(
                &model.denoiser,
                labels.iter().map(|&l| Some(l as usize)).collect(),
                1.0,
            )?)
        } else {
            None
        };
        let den: &dyn diffuse::denoiser::Denoiser = match &guided {
            Some(g) => g,
            None => &model.denoiser,
        };
        let bound = variational_bound(den, &schedule, &x0, &config, &mut |_| bar.inc(b as u64))?;
        images.extend(bound.images);
        start += b;
    }
    bar.finish_and_clear();
    let bpd: Vec<f64> = images.iter().map(|i| i.bits_per_dim.total).collect();
    let mean =
        |f: &dyn Fn(&diffuse::likelihood::ImageBound) -> f64| images.iter().map(f).sum::<f64>() / n as f64;
    let total = mean(&|i| i.bits_per_dim.total);
    let var = bpd.iter().map(|v| (v - total).powi(2)).sum::<f64>() / (n.max(2) - 1) as f64;
    let stderr = (var / n as f64).sqrt();
    let result = json!({
        "bits_per_dim": total,
        "stderr": stderr,
        "l_t": mean(&|i| i.bits_per_dim.l_t),
        "l_sum": mean(&|i| i.bits_per_dim.l_sum),
        "l_0": mean(&|i| i.bits_per_dim.l_0),
        "n_images": n,
        "nats_per_image": mean(&|i| i.nats.total),
        "units": "bits per dimension (l_t, l_sum, l_0 too)",
        "timesteps": t_max,
        "variance": variance.name(),
        "clip_x0": a.clip_x0,
        "split": a.split.to_string(),
        "model": model.source,
        "data": ds.source(),
        "seed": a.seed,
        "condition": model.denoiser.num_classes().map(|_| if conditional { "labels" } else { "none" }),
    });
    if let Some(path) = &a.out {
        diffuse::io::write_json(path, &result)?;
    }
    if a.json {
        println!("{result}");
    } else {
        println!(
            "NLL bound: {total:.4} +- {stderr:.4} bits/dim (L_T {:.5} + sum L_t-1 {:.4} + L_0 {:.4}) on {n} {} images, T = {t_max}, variance {}{}",
            result["l_t"].as_f64().unwrap_or(f64::NAN),
            result["l_sum"].as_f64().unwrap_or(f64::NAN),
            result["l_0"].as_f64().unwrap_or(f64::NAN),
            a.split,
            variance.name(),
            match (model.denoiser.num_classes(), conditional) {
                (Some(_), true) => ", conditional on the true labels",
                (Some(_), false) => ", unconditional (null class)",
                _ => "",
            }
        );
        if let Some(path) = &a.out {
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}
