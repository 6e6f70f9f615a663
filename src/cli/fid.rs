//! `diffuse eval fid`: FID (pytorch-fid's InceptionV3 from `--inception FILE`), KID and
//! precision/recall between two image sets, or the FD of the bundled digit features for
//! greyscale digits without a weights file.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use diffuse::data::{self, DataSpec, Split};
use diffuse::eval::digits::DigitClassifier;
use diffuse::eval::fid::{fid, FeatureNet, Statistics};
use diffuse::eval::inception::{FidInception, WeightFile};
use diffuse::eval::kid::{kid, DEFAULT_SUBSETS, DEFAULT_SUBSET_SIZE};
use diffuse::eval::precision_recall::{precision_recall, DEFAULT_K};
use diffuse::Error;

#[derive(Args, Debug)]
pub struct FidArgs {
    /// The generated images: a samples.npy ([N, C, H, W] float32 in [0, 1]), a `diffuse sample`
    /// output directory, a folder of PNG/JPEG images, a dataset as `train --data` takes it
    /// (`mnist5k`, an IDX or CIFAR-10 directory), or a statistics file (.npz, pytorch-fid's `mu`
    /// and `sigma`).
    #[arg(long, value_name = "S")]
    samples: String,
    /// The real images, in any of the forms --samples takes (default: none, with --save-stats:
    /// only the statistics of --samples are written).
    #[arg(long, value_name = "R")]
    reference: Option<String>,
    /// pytorch-fid's InceptionV3 weights: a .safetensors file or a PyTorch state dict (.pth,
    /// current zip format) with pytorch-fid's key names. The published
    /// pt_inception-2015-12-05-6726825d.pth is in the legacy format: convert it once with
    /// `python3 tools/convert_fid_inception.py` (README, "FID"). Never downloaded.
    #[arg(long, value_name = "FILE")]
    inception: Option<PathBuf>,
    /// Feature network: `inception` (needs --inception) or `digits` (the bundled digit
    /// classifier, 128 features; its figure is the "FD of the bundled digit features", not FID).
    /// Default: inception when --inception is given, else digits for 1-channel 28x28 or 16x16
    /// images.
    #[arg(long, value_name = "inception|digits")]
    features: Option<String>,
    /// InceptionV3 block whose features are compared: 2048 (pool3, FID's standard), 768, 192, 64.
    #[arg(long, default_value_t = 2048)]
    dims: usize,
    /// Split of a dataset given as --reference.
    #[arg(long, default_value = "test")]
    split: Split,
    /// Split of a dataset given as --samples (`--samples mnist5k` is its training split: the
    /// real-vs-real floor against the default test reference).
    #[arg(long, default_value = "train")]
    samples_split: Split,
    /// Use at most this many images of each set (the first ones).
    #[arg(long)]
    max_images: Option<usize>,
    /// Write the statistics of --samples here, in pytorch-fid's .npz layout (`mu`, `sigma`,
    /// float64; `python -m pytorch_fid` reads it).
    #[arg(long, value_name = "FILE.npz")]
    save_stats: Option<PathBuf>,
    /// KID: number of random subsets (torch-fidelity's default).
    #[arg(long, default_value_t = DEFAULT_SUBSETS)]
    kid_subsets: usize,
    /// KID: rows per subset (capped at the smaller set's size).
    #[arg(long, default_value_t = DEFAULT_SUBSET_SIZE)]
    kid_subset_size: usize,
    /// Seed of KID's subset draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Images per InceptionV3 batch (does not change the result).
    #[arg(long, default_value_t = 25)]
    batch: usize,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Also run pytorch-fid's InceptionV3 with the same weights on the --samples images, the same
    /// threads and batch (bench/fid_reference.py; needs python3 with torch and pytorch-fid), and
    /// report its time, the ratio ours / PyTorch and the largest feature difference.
    #[arg(long)]
    compare_torch: bool,
    /// Python interpreter for --compare-torch.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Print the result as one JSON object instead of the summary.
    #[arg(long)]
    json: bool,
}

/// One side of the comparison, as read.
enum Set {
    Images {
        values: Vec<f32>,
        shape: [usize; 3],
        label: String,
    },
    Stats {
        stats: Statistics,
        label: String,
    },
}

impl Set {
    fn label(&self) -> &str {
        match self {
            Set::Images { label, .. } | Set::Stats { label, .. } => label,
        }
    }
}

/// Reads `arg` as --samples / --reference take it (`flag` names it in errors).
/// One side's statistics (when asked for), its features (image sets only), how many images
/// were featurised, and the seconds that took.
type Featurised = (Option<Statistics>, Option<Vec<f64>>, usize, f64);

fn read_set(arg: &str, split: Split, max: Option<usize>, flag: &str) -> anyhow::Result<Set> {
    let path = Path::new(arg);
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if ext == "npz" {
        return Ok(Set::Stats {
            stats: Statistics::read_npz(path)?,
            label: arg.to_string(),
        });
    }
    let npy = if ext == "npy" {
        Some(path.to_path_buf())
    } else if path.is_dir() && path.join("samples.npy").is_file() {
        Some(path.join("samples.npy"))
    } else {
        None
    };
    let (mut values, shape, label) = match npy {
        Some(file) => {
            let a = diffuse::io::read_npy_finite(&file)?;
            if a.shape.len() != 4 || a.shape[0] == 0 {
                return Err(Error::bad_input(
                    &file,
                    format!("expected images [N, C, H, W], got shape {:?}", a.shape),
                )
                .into());
            }
            if let Some(i) = a.data.iter().position(|v| !(-1e-6..=1.0 + 1e-6).contains(v)) {
                return Err(Error::bad_input(
                    &file,
                    format!(
                        "value {i} is {}: expected images in [0, 1] (what `diffuse sample` writes)",
                        a.data[i]
                    ),
                )
                .into());
            }
            let shape = [a.shape[1], a.shape[2], a.shape[3]];
            let values: Vec<f32> = a.data.iter().map(|&v| v.clamp(0.0, 1.0) as f32).collect();
            (values, shape, file.display().to_string())
        }
        None => {
            if !path.exists() && arg != data::BUNDLED {
                return super::usage(format!(
                    "{flag} {arg}: no such file or directory (expected a .npy, .npz, a sample directory, an image folder or a dataset)"
                ));
            }
            // a plain image folder (no train/ and test/ inside) is one set, whatever the split
            let split = if path.is_dir()
                && data::detect(path) == data::Format::Folder
                && !path.join("train").is_dir()
                && !path.join("test").is_dir()
            {
                Split::Train
            } else {
                split
            };
            let ds = data::load(&DataSpec {
                data: arg.to_string(),
                format: None,
                split,
                image_size: None,
                channels: None,
            })?;
            let values: Vec<f32> = ds.pixels().iter().map(|&v| (v + 1.0) / 2.0).collect();
            (values, ds.shape(), ds.source().to_string())
        }
    };
    if let Some(m) = max {
        let per: usize = shape.iter().product();
        values.truncate(m * per);
    }
    Ok(Set::Images { values, shape, label })
}

fn n_images(values: &[f32], shape: [usize; 3]) -> usize {
    values.len() / shape.iter().product::<usize>().max(1)
}

pub fn run(a: FidArgs) -> anyhow::Result<()> {
    super::set_threads(a.threads)?;
    if a.reference.is_none() && a.save_stats.is_none() && !a.compare_torch {
        return super::usage("eval fid needs --reference R (or --save-stats FILE.npz to only write the statistics of --samples)");
    }
    // statistics of --samples are needed unless this only times the network (--compare-torch alone)
    let need_stats = a.reference.is_some() || a.save_stats.is_some();
    if a.batch == 0 {
        return super::usage("--batch: got 0, expected at least 1");
    }
    let samples = read_set(&a.samples, a.samples_split, a.max_images, "--samples")?;
    let reference = a
        .reference
        .as_deref()
        .map(|r| read_set(r, a.split, a.max_images, "--reference"))
        .transpose()?;
    if matches!(samples, Set::Stats { .. }) && a.save_stats.is_some() {
        return super::usage(
            "--save-stats writes the statistics of --samples images; --samples is already a statistics file",
        );
    }
    // the images' shapes decide the default network; mismatched channels are an input error
    let shapes: Vec<(&str, [usize; 3])> = [Some(&samples), reference.as_ref()]
        .into_iter()
        .flatten()
        .filter_map(|s| match s {
            Set::Images { shape, label, .. } => Some((label.as_str(), *shape)),
            Set::Stats { .. } => None,
        })
        .collect();
    if let [(la, sa), (lb, sb)] = shapes.as_slice() {
        if sa[0] != sb[0] {
            return Err(Error::param(
                "images",
                format!(
                    "{la} has {} channels but {lb} has {}: compare images of the same kind",
                    sa[0], sb[0]
                ),
            )
            .into());
        }
    }
    let kind = match (a.features.as_deref(), &a.inception) {
        (Some("inception"), None) => {
            return super::usage("--features inception needs --inception FILE (pytorch-fid's weights; README, \"FID\")")
        }
        (Some("inception"), Some(_)) | (None, Some(_)) => "inception",
        (Some("digits"), _) => "digits",
        (Some(other), _) => return super::usage(format!("--features: unknown '{other}', expected inception or digits")),
        (None, None) => match shapes.first() {
            Some((_, [1, h, w])) if h == w && (*h == 28 || *h == 16) => "digits",
            Some((label, s)) => {
                return super::usage(format!(
                    "{label}: {}x{}x{} images have no bundled feature network (it reads 1-channel 28x28 or 16x16 digits): \
                     pass --inception FILE, pytorch-fid's InceptionV3 weights (README, \"FID\")",
                    s[0], s[1], s[2]
                ))
            }
            None => "stats",
        },
    };
    if kind == "digits" {
        if let Some((label, s)) = shapes.iter().find(|(_, s)| s[0] != 1) {
            return Err(Error::param(
                "images",
                format!(
                    "{label}: the digit classifier reads greyscale images, these have {} channels",
                    s[0]
                ),
            )
            .into());
        }
        if a.dims != 2048 && a.dims != diffuse::eval::digits::FEATURES {
            return super::usage(format!(
                "--dims {} applies to InceptionV3; the digit classifier has 128 features",
                a.dims
            ));
        }
    }
    let net = match kind {
        "inception" => {
            let path = a.inception.as_ref().expect("checked above");
            let weights = WeightFile::open(path)?;
            Some(FeatureNet::Inception(Box::new(FidInception::load(
                &weights, a.dims,
            )?)))
        }
        "digits" => Some(FeatureNet::Digits(DigitClassifier::bundled(
            &candle_core::Device::Cpu,
        )?)),
        _ => None,
    };
    let dims = net.as_ref().map_or(a.dims, |n| n.dims());
    let start = Instant::now();
    let mut n_featurised = 0usize;
    let mut featurise = |set: &Set, need_stats: bool| -> anyhow::Result<Featurised> {
        match set {
            Set::Stats { stats, label } => {
                if stats.dims != dims {
                    return Err(Error::param(
                        "statistics",
                        format!("{label} holds {}-dimensional statistics, the features here are {dims}-dimensional", stats.dims),
                    )
                    .into());
                }
                Ok((Some(stats.clone()), None, 0, 0.0))
            }
            Set::Images { values, shape, label } => {
                let net = net.as_ref().expect("images have a network");
                let n = n_images(values, *shape);
                if need_stats && n < dims + 1 {
                    // before the expensive forward passes
                    Statistics::of_features(&vec![0.0; n * dims], dims, label)?;
                }
                let bar = ProgressBar::new(n as u64);
                bar.set_style(
                    ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} images, {per_sec}, eta {eta}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                bar.set_message(format!("features of {label}"));
                let t = Instant::now();
                let f = net.features(values, *shape, a.batch, &mut |done| bar.set_position(done as u64))?;
                let seconds = t.elapsed().as_secs_f64();
                bar.finish_and_clear();
                n_featurised += n;
                let stats = if need_stats {
                    Some(Statistics::of_features(&f, dims, label)?)
                } else {
                    None
                };
                Ok((stats, Some(f), n, seconds))
            }
        }
    };
    let (s_stats, s_feats, n_s, s_seconds) = featurise(&samples, need_stats)?;
    let torch = if a.compare_torch {
        match (&samples, &s_feats, &a.inception) {
            (Set::Images { values, shape, .. }, Some(f), Some(w)) if kind == "inception" => Some(
                compare_torch(&a.python, w, values, *shape, f, dims, a.batch, s_seconds)?,
            ),
            _ => return super::usage("--compare-torch needs --inception and --samples images"),
        }
    } else {
        None
    };
    if let (Some(path), Some(s_stats)) = (&a.save_stats, &s_stats) {
        s_stats.write_npz(path)?;
        if !a.json {
            println!(
                "wrote {} ({dims} features of {n_s} images, {})",
                path.display(),
                net.as_ref().map_or("", |n| n.name())
            );
        }
    }
    let Some(reference) = reference else {
        if a.json {
            println!(
                "{}",
                json!({ "stats": a.save_stats.as_ref().map(|p| p.display().to_string()), "dims": dims, "n_samples": n_s,
                        "samples_feature_seconds": s_seconds, "torch": torch })
            );
        } else if let Some(t) = &torch {
            print_torch(t, n_s, s_seconds);
        }
        return Ok(());
    };
    let (r_stats, r_feats, n_r, _) = featurise(&reference, true)?;
    let (Some(s_stats), Some(r_stats)) = (s_stats, r_stats) else {
        anyhow::bail!("internal: no statistics for the comparison")
    };
    let seconds = start.elapsed().as_secs_f64();
    let d = fid(&s_stats, &r_stats)?;
    let (kid_v, pr) = match (&s_feats, &r_feats) {
        (Some(s), Some(r)) => (
            Some(kid(s, r, dims, a.kid_subsets, a.kid_subset_size, a.seed)?),
            if n_s > DEFAULT_K && n_r > DEFAULT_K {
                Some(precision_recall(s, r, dims, DEFAULT_K)?)
            } else {
                None
            },
        ),
        _ => (None, None),
    };
    let metric = net.as_ref().map_or("FID", |n| n.metric_name());
    let key = if metric == "FID" {
        "fid"
    } else {
        "fd_digit_features"
    };
    let result = json!({
        key: d.value,
        "metric": metric,
        "feature_network": net.as_ref().map_or("(statistics files)", |n| n.name()),
        "dims": dims,
        "singular_offset": d.offset,
        "kid_mean": kid_v.map(|k| k.mean),
        "kid_std": kid_v.map(|k| k.std),
        "kid_subsets": kid_v.map(|k| k.subsets),
        "kid_subset_size": kid_v.map(|k| k.subset_size),
        "precision": pr.map(|p| p.precision),
        "recall": pr.map(|p| p.recall),
        "prc_k": pr.map(|p| p.k),
        "n_samples": n_s,
        "n_reference": n_r,
        "samples": samples.label(),
        "reference": reference.label(),
        "feature_seconds": seconds,
        "images_per_second": if seconds > 0.0 { n_featurised as f64 / seconds } else { 0.0 },
        "samples_feature_seconds": s_seconds,
        "torch": torch,
    });
    if a.json {
        println!("{result}");
    } else {
        println!(
            "{metric} {:.4} ({}, {dims} features): {} vs {}",
            d.value,
            result["feature_network"].as_str().unwrap_or(""),
            samples.label(),
            reference.label()
        );
        if d.offset {
            println!("the covariance product was singular: 1e-6 added to both diagonals (as pytorch-fid)");
        }
        if let Some(k) = kid_v {
            println!(
                "KID {:.6} +- {:.6} ({} subsets of {})",
                k.mean, k.std, k.subsets, k.subset_size
            );
        }
        if let Some(p) = pr {
            println!(
                "precision {:.4}, recall {:.4} (k = {})",
                p.precision, p.recall, p.k
            );
        }
        println!("{n_s} + {n_r} images, features in {seconds:.1} s");
        if let Some(t) = &torch {
            print_torch(t, n_s, s_seconds);
        }
    }
    Ok(())
}

/// Runs bench/fid_reference.py on the same images and weights: its seconds, the ratio, and the
/// largest feature difference relative to the largest feature.
#[allow(clippy::too_many_arguments)]
fn compare_torch(
    python: &str,
    weights: &Path,
    values: &[f32],
    shape: [usize; 3],
    ours: &[f64],
    dims: usize,
    batch: usize,
    our_seconds: f64,
) -> anyhow::Result<serde_json::Value> {
    const SCRIPT: &str = "bench/fid_reference.py";
    let script = [
        PathBuf::from(SCRIPT),
        Path::new(env!("CARGO_MANIFEST_DIR")).join(SCRIPT),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .ok_or_else(|| anyhow::anyhow!("--compare-torch: {SCRIPT} not found (run from the repository root)"))?;
    let dir = tempfile_dir()?;
    let images = dir.join("images.npy");
    let out = dir.join("features.npy");
    let n = n_images(values, shape);
    diffuse::io::write_npy_f32(&images, &[n, shape[0], shape[1], shape[2]], values)?;
    let threads = rayon::current_num_threads();
    let result = std::process::Command::new(python)
        .arg(&script)
        .args([
            "--weights",
            &weights.display().to_string(),
            "--images",
            &images.display().to_string(),
        ])
        .args([
            "--dims",
            &dims.to_string(),
            "--batch",
            &batch.to_string(),
            "--threads",
            &threads.to_string(),
        ])
        .args(["--out", &out.display().to_string()])
        .env("OMP_NUM_THREADS", threads.to_string())
        .env("MKL_NUM_THREADS", threads.to_string())
        .output();
    let cleanup = || {
        let _ = std::fs::remove_dir_all(&dir);
    };
    let output = match result {
        Ok(o) => o,
        Err(e) => {
            cleanup();
            anyhow::bail!("--compare-torch: cannot run {python}: {e}");
        }
    };
    if !output.status.success() {
        cleanup();
        let err = String::from_utf8_lossy(&output.stderr);
        anyhow::bail!(
            "--compare-torch: {SCRIPT} failed: {}",
            err.lines().last().unwrap_or("")
        );
    }
    let report: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&output.stdout).trim())?;
    let theirs = diffuse::io::read_npy(&out)?;
    cleanup();
    if theirs.data.len() != ours.len() {
        anyhow::bail!(
            "--compare-torch: PyTorch returned {} features, ours {}",
            theirs.data.len(),
            ours.len()
        );
    }
    let scale = theirs.data.iter().fold(0f64, |m, v| m.max(v.abs()));
    let worst = theirs
        .data
        .iter()
        .zip(ours)
        .map(|(a, b)| (a - b).abs())
        .fold(0f64, f64::max);
    let seconds = report["seconds"].as_f64().unwrap_or(f64::NAN);
    Ok(json!({
        "seconds": seconds,
        "ratio": our_seconds / seconds,
        "threads": report["threads"],
        "torch_version": report["torch_version"],
        "max_feature_diff_rel": worst / scale.max(f64::MIN_POSITIVE),
    }))
}

/// A fresh private directory for the comparison's files.
fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("diffuse-fid-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    Ok(dir)
}

fn print_torch(t: &serde_json::Value, n: usize, ours: f64) {
    println!(
        "pytorch-fid on the {n} --samples images: {:.2} s, ours {ours:.2} s: ratio ours / PyTorch {:.3} ({} threads); largest feature difference {:.2e} of the largest feature",
        t["seconds"].as_f64().unwrap_or(f64::NAN),
        t["ratio"].as_f64().unwrap_or(f64::NAN),
        t["threads"],
        t["max_feature_diff_rel"].as_f64().unwrap_or(f64::NAN)
    );
}
