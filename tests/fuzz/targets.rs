//! Every reader of user files as a fuzz [`Target`]: a small valid file built with the library's
//! own writers, the reader called through the public API, and the allocation each input byte
//! may justify (`factor`, derived beside each target).

#![allow(dead_code)] // each binary that includes this file uses a different part of it

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::harness::{Failure, Hints, Target};

/// A temporary directory, in memory (`/dev/shm`) where there is one: thousands of small
/// rewrites cost far less there than on a disk (ext4 with `discard` frees blocks at every
/// truncation), and the readers, not the disk, are under test.
fn tmp() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new().prefix("diffuse-fuzz").tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().expect("a temporary directory")
}

fn ok<T>(r: diffuse::Result<T>) -> Result<(), Failure> {
    r.map(|_| ()).map_err(Failure::from)
}

/// A target whose input is the file itself.
fn file_target(
    name: &'static str,
    file_name: &str,
    seed: Vec<u8>,
    factor: usize,
    hints: Hints,
    read: impl Fn(&Path) -> Result<(), Failure> + 'static,
) -> Target {
    let dir = tmp();
    let file = dir.path().join(file_name);
    Target {
        name,
        seed,
        input: file.clone(),
        file,
        factor,
        hints,
        read: Box::new(read),
        _dir: Some(dir),
    }
}

/// A target whose input is a directory (prepared by `setup`) holding the mutated file.
fn dir_target(
    name: &'static str,
    dir: tempfile::TempDir,
    input: PathBuf,
    file: PathBuf,
    factor: usize,
    hints: Hints,
    read: impl Fn(&Path) -> Result<(), Failure> + 'static,
) -> Target {
    let seed = std::fs::read(&file).expect("the valid file");
    Target {
        name,
        seed,
        input,
        file,
        factor,
        hints,
        read: Box::new(read),
        _dir: Some(dir),
    }
}

fn text() -> Hints {
    Hints {
        text: true,
        ..Hints::default()
    }
}

// ---------- .npy (points, samples, --init-noise) ----------

/// The float payload of a `.npy` version 1 file: (offset, count, width).
fn npy_floats(bytes: &[u8], width: usize) -> (usize, usize, usize) {
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let off = 10 + header_len;
    (off, (bytes.len() - off) / width, width)
}

fn npy_hints(bytes: &[u8], width: usize) -> Hints {
    Hints {
        size_fields: vec![(8, 2, false)],
        floats: Some(npy_floats(bytes, width)),
        text: false,
    }
}

/// A version 2.0 `.npy` of float64 (4-byte header length), written by hand.
fn npy_v2_f64(shape: &str, data: &[f64]) -> Vec<u8> {
    let mut header = format!("{{'descr': '<f8', 'fortran_order': False, 'shape': {shape}, }}");
    let unpadded = 12 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = b"\x93NUMPY\x02\x00".to_vec();
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// `read_npy` keeps every value as f64: 2 bytes per byte of float32 payload, 1 per byte of
/// float64 (plus the shape); factor 2.
pub fn npy_f32() -> Target {
    let seed = diffuse::io::npy_bytes_f32(&[3, 2], &[1.0, -2.5, 3.25, 0.0, 7.0, 1e-3]);
    let hints = npy_hints(&seed, 4);
    file_target("npy-f32", "fuzz.npy", seed, 2, hints, |p| {
        ok(diffuse::io::read_npy(p))
    })
}

/// A version 2 float64 file; factor 2 (see [`npy_f32`]).
pub fn npy_f64_v2() -> Target {
    let data: Vec<f64> = (0..8).map(|i| i as f64 * 0.5 - 1.0).collect();
    let seed = npy_v2_f64("(2, 2, 2)", &data);
    let hints = Hints {
        size_fields: vec![(8, 4, false)],
        floats: Some((seed.len() - 64, 8, 8)),
        text: false,
    };
    file_target("npy-f64-v2", "fuzz.npy", seed, 2, hints, |p| {
        ok(diffuse::io::read_npy(p))
    })
}

/// `--init-noise` arrays: the finite-checked reader; factor 2 (see [`npy_f32`]).
pub fn init_noise() -> Target {
    let data: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) / 8.0).collect();
    let seed = diffuse::io::npy_bytes_f32(&[2, 1, 4, 4], &data);
    let hints = npy_hints(&seed, 4);
    file_target("init-noise", "noise.npy", seed, 2, hints, |p| {
        ok(diffuse::io::read_npy_finite(p))
    })
}

/// `npy:` points for `toy train` / `toy nll`; factor 2 (see [`npy_f32`]).
pub fn npy_points() -> Target {
    let seed = diffuse::io::npy_bytes_f32(&[4, 2], &[0.5, 1.0, -1.0, 2.0, 0.0, 0.0, 3.0, -3.0]);
    let hints = npy_hints(&seed, 4);
    file_target("npy-points", "points.npy", seed, 2, hints, |p| {
        ok(diffuse::data::toy2d::read_npy_points(p))
    })
}

/// `csv:` points. Each value costs at least 2 input bytes ("1,") and becomes an 8-byte f64 in
/// a vector that may double while growing: factor 8; the text itself is read whole (1).
pub fn csv_points() -> Target {
    let seed = b"x,y\n# two columns\n1.5, -2\n3,4e-1\n0.25,1e3\n-7,8\n".to_vec();
    file_target("csv-points", "points.csv", seed, 8, text(), |p| {
        ok(diffuse::data::toy2d::read_csv_points(p))
    })
}

// ---------- image datasets ----------

fn idx_images(count: u32, rows: u32, cols: u32, pixels: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    for v in [2051u32, count, rows, cols] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b.extend_from_slice(pixels);
    b
}

fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    for v in [2049u32, labels.len() as u32] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b.extend_from_slice(labels);
    b
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).expect("gzip in memory");
    e.finish().expect("gzip in memory")
}

fn data_spec(dir: &Path) -> diffuse::data::DataSpec {
    diffuse::data::DataSpec {
        data: dir.to_string_lossy().into_owned(),
        ..Default::default()
    }
}

fn load_images(dir: &Path) -> Result<(), Failure> {
    ok(diffuse::data::load(&data_spec(dir)))
}

fn idx_dir(gz_images: bool) -> tempfile::TempDir {
    let dir = tmp();
    let pixels: Vec<u8> = (0..48u8).map(|v| v * 5).collect();
    let images = idx_images(3, 4, 4, &pixels);
    if gz_images {
        std::fs::write(dir.path().join("train-images-idx3-ubyte.gz"), gzip(&images)).unwrap();
    } else {
        std::fs::write(dir.path().join("train-images-idx3-ubyte"), images).unwrap();
    }
    std::fs::write(dir.path().join("train-labels-idx1-ubyte"), idx_labels(&[7, 1, 9])).unwrap();
    dir
}

/// IDX images: every byte becomes an f32 pixel (factor 4).
pub fn idx_images_file() -> Target {
    let dir = idx_dir(false);
    let input = dir.path().to_path_buf();
    let file = input.join("train-images-idx3-ubyte");
    let hints = Hints {
        size_fields: vec![(0, 4, true), (4, 4, true), (8, 4, true), (12, 4, true)],
        ..Hints::default()
    };
    dir_target("idx-images", dir, input, file, 4, hints, load_images)
}

/// IDX labels: every byte becomes a u32 label (factor 4).
pub fn idx_labels_file() -> Target {
    let dir = idx_dir(false);
    let input = dir.path().to_path_buf();
    let file = input.join("train-labels-idx1-ubyte");
    let hints = Hints {
        size_fields: vec![(0, 4, true), (4, 4, true)],
        ..Hints::default()
    };
    dir_target("idx-labels", dir, input, file, 4, hints, load_images)
}

/// A gzipped IDX file, the compressed bytes mutated. Deflate expands at most 1032:1 and each
/// decompressed byte becomes an f32 pixel: factor 4 * 1032.
pub fn idx_gzip_bytes() -> Target {
    let dir = idx_dir(true);
    let input = dir.path().to_path_buf();
    let file = input.join("train-images-idx3-ubyte.gz");
    dir_target(
        "idx-gzip",
        dir,
        input,
        file,
        4 * 1032,
        Hints::default(),
        load_images,
    )
}

/// A gzipped IDX file whose decompressed content is mutated (the mutated bytes are written to
/// `content.bin` and gzipped into place before each read): the header's declared sizes reach
/// the parser through the decompressor. Factor 4 of the decompressed length (see
/// [`idx_images_file`]).
pub fn idx_gzip_content() -> Target {
    let dir = idx_dir(true);
    let input = dir.path().to_path_buf();
    let file = input.join("content.bin");
    let pixels: Vec<u8> = (0..48u8).map(|v| v * 5).collect();
    std::fs::write(&file, idx_images(3, 4, 4, &pixels)).unwrap();
    let gz = input.join("train-images-idx3-ubyte.gz");
    let hints = Hints {
        size_fields: vec![(4, 4, true), (8, 4, true), (12, 4, true)],
        ..Hints::default()
    };
    dir_target("idx-gzip-content", dir, input, file.clone(), 4, hints, move |d| {
        let raw = std::fs::read(&file).map_err(|e| Failure {
            message: e.to_string(),
            user_error: false,
        })?;
        std::fs::write(&gz, gzip(&raw)).map_err(|e| Failure {
            message: e.to_string(),
            user_error: false,
        })?;
        // errors name the .gz file; the harness looks for content.bin's name, so rename it
        load_images(d).map_err(|f| Failure {
            message: f.message.replace("train-images-idx3-ubyte.gz", "content.bin"),
            ..f
        })
    })
}

/// CIFAR-10 batches: every byte becomes an f32 pixel (factor 4). Two records.
pub fn cifar_batch() -> Target {
    let dir = tmp();
    let mut batch = Vec::new();
    for (label, shade) in [(3u8, 10u8), (8, 200)] {
        batch.push(label);
        batch.extend((0..3072).map(|i| shade.wrapping_add((i % 251) as u8)));
    }
    std::fs::write(dir.path().join("data_batch_1.bin"), batch).unwrap();
    let input = dir.path().to_path_buf();
    let file = input.join("data_batch_1.bin");
    dir_target("cifar10", dir, input, file, 4, Hints::default(), load_images)
}

/// CIFAR-10's `batches.meta.txt` (class names): read as text and split into lines (factor 8).
pub fn cifar_meta() -> Target {
    let dir = tmp();
    let mut batch = vec![1u8];
    batch.extend(std::iter::repeat_n(7u8, 3072));
    std::fs::write(dir.path().join("data_batch_1.bin"), batch).unwrap();
    let names = "airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n";
    std::fs::write(dir.path().join("batches.meta.txt"), names).unwrap();
    let input = dir.path().to_path_buf();
    let file = input.join("batches.meta.txt");
    dir_target("cifar10-meta", dir, input, file, 8, text(), load_images)
}

/// A PNG or JPEG in an image folder. A compressed image can hold many pixels per byte (PNG:
/// 1-bit pixels deflated 1032:1, `diffuse::data::folder::MAX_PIXELS_PER_BYTE`; JPEG: a bit per
/// 8x8 block, `MAX_JPEG_PIXELS_PER_BYTE`), and each pixel becomes 3 f32 values (12 bytes):
/// factor 12 times the format's pixels per byte.
fn image_target(name: &'static str, file_name: &str, img: image::DynamicImage) -> Target {
    let dir = tmp();
    let file = dir.path().join(file_name);
    img.save(&file).unwrap();
    let input = dir.path().to_path_buf();
    let per_byte = if file_name.ends_with(".jpg") {
        diffuse::data::folder::MAX_JPEG_PIXELS_PER_BYTE
    } else {
        diffuse::data::folder::MAX_PIXELS_PER_BYTE
    };
    let factor = 12 * per_byte;
    dir_target(name, dir, input, file, factor, Hints::default(), load_images)
}

fn pattern(w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 40) as u8, (y * 30) as u8, ((x + y) * 20) as u8])
    })
}

/// An 5x4 RGB PNG.
pub fn png() -> Target {
    image_target("png", "a.png", image::DynamicImage::ImageRgb8(pattern(5, 4)))
}

/// A 4x4 greyscale PNG.
pub fn png_grey() -> Target {
    let img = image::GrayImage::from_fn(4, 4, |x, y| image::Luma([(x * 60 + y) as u8]));
    image_target("png-grey", "g.png", image::DynamicImage::ImageLuma8(img))
}

/// An 8x8 RGB JPEG.
pub fn jpeg() -> Target {
    image_target("jpeg", "a.jpg", image::DynamicImage::ImageRgb8(pattern(8, 8)))
}

// ---------- safetensors ----------

fn small_tensors() -> Vec<(String, Tensor)> {
    let a = Tensor::new(&[[1f32, 2.0, 3.0], [4.0, 5.0, 6.0]], &Device::Cpu).unwrap();
    let b = Tensor::new(&[0.5f32, -0.5], &Device::Cpu).unwrap();
    let c = Tensor::new(&[1.0f64, 2.0], &Device::Cpu).unwrap();
    vec![
        ("layer.weight".into(), a),
        ("layer.bias".into(), b),
        ("other".into(), c),
    ]
}

fn safetensors_hints(bytes: &[u8]) -> Hints {
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let data = 8 + header;
    Hints {
        size_fields: vec![(0, 8, false)],
        floats: Some((data, (bytes.len() - data) / 4, 4)),
        text: false,
    }
}

/// Checkpoint tensors (`checkpoint::read_tensors`): the tensors are copies of the file's data
/// (1), converted at most from f16/bf16 to f32 (2): factor 4.
pub fn safetensors_checkpoint() -> Target {
    let seed = diffuse::train::checkpoint::safetensors_bytes(&small_tensors()).unwrap();
    let hints = safetensors_hints(&seed);
    file_target("safetensors", "model.safetensors", seed, 4, hints, |p| {
        ok(diffuse::train::checkpoint::read_tensors(p, &Device::Cpu))
    })
}

/// diffusers weights (`diffusers::read_weights`, f16 -> f32): factor 4 (see above).
pub fn safetensors_diffusers() -> Target {
    let mut t = small_tensors();
    t.push((
        "half".into(),
        Tensor::new(&[1f32, 2.0, 3.0, 4.0], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap(),
    ));
    let seed = diffuse::train::checkpoint::safetensors_bytes(&t).unwrap();
    let hints = safetensors_hints(&seed);
    file_target(
        "safetensors-diffusers",
        "diffusion_pytorch_model.safetensors",
        seed,
        4,
        hints,
        |p| ok(diffuse::nets::diffusers::read_weights(p)),
    )
}

// ---------- JSON ----------

/// A JSON document becomes a `serde_json::Value`: a 2-byte element ("1,") costs a 32-byte
/// `Value` in an array that may double while growing, about 32 bytes per input byte; factor 64.
const JSON_FACTOR: usize = 64;

/// diffusers `UNet2DModel` `config.json`.
pub fn unet_config() -> Target {
    let seed = std::fs::read(fixture("no_mid_block_1ch16/config.json")).unwrap();
    file_target("unet-config", "config.json", seed, JSON_FACTOR, text(), |p| {
        ok(diffuse::nets::diffusers::read_unet_config(p))
    })
}

/// `scheduler_config.json`, parsed and turned into a schedule (T betas are computed: the
/// declared `num_train_timesteps` must not drive an allocation the file cannot justify).
pub fn scheduler_config() -> Target {
    let seed = std::fs::read(fixture("attn_multihead_1ch16/scheduler/scheduler_config.json")).unwrap();
    file_target(
        "scheduler-config",
        "scheduler_config.json",
        seed,
        JSON_FACTOR,
        text(),
        |p| {
            let c = diffuse::nets::scheduler_config::SchedulerConfig::from_file(p).map_err(Failure::from)?;
            // errors of a parsed config are about the file's fields: name the file
            c.schedule()
                .map(|_| ())
                .map_err(|e| Failure::from(diffuse::Error::bad_input(p, e.to_string())))
        },
    )
}

/// A mixture spec `gmm:FILE.json`, parsed and sampled (4 draws of dimension D: 32 D bytes,
/// for D numbers of at least 2 bytes each; full covariances hold D^2 numbers for D^2 values).
pub fn mixture_spec() -> Target {
    let seed = br#"{"weights": [0.5, 0.3, 0.2], "means": [[-2.0, 0.0], [1.5, 1.0], [1.0, -1.5]],
 "covariances": [[[0.6, 0.25], [0.25, 0.2]], [[0.1, -0.05], [-0.05, 0.4]], [[0.04, 0], [0, 0.04]]]}"#
        .to_vec();
    file_target("mixture", "mix.json", seed, JSON_FACTOR, text(), |p| {
        ok(diffuse::data::toy2d::DataSpec::Gmm(p.to_path_buf()).load(4, 0))
    })
}

/// An isotropic mixture spec (`stds`).
pub fn mixture_stds() -> Target {
    let seed = br#"{"weights": [0.25, 0.75], "means": [[0, 1, 2], [3, 4, 5]], "stds": [0.5, 2]}"#.to_vec();
    file_target("mixture-stds", "iso.json", seed, JSON_FACTOR, text(), |p| {
        ok(diffuse::gmm::Gmm::from_json_file(p))
    })
}

/// `info.json` beside generated samples (what `eval samples` reads the training data from).
pub fn info_json() -> Target {
    let info = serde_json::json!({
        "n": 64, "shape": [1, 28, 28], "sampler": "ddpm", "process": "ddpm", "steps": 100,
        "clip_x0": 1.0, "nfe": 100, "seconds": 3.5, "images_per_second": 18.2, "seed": 0,
        "model": "runs/demo (step 2588, EMA weights)",
        "training_data": {"data": "mnist5k", "format": null, "split": "train", "image_size": null, "channels": null},
        "out": "runs/demo/generated",
    });
    let seed = serde_json::to_string_pretty(&info).unwrap().into_bytes();
    file_target("info-json", "info.json", seed, JSON_FACTOR, text(), |p| {
        ok(diffuse::data::training_data_from_info(p))
    })
}

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/diffusers")
        .join(rel)
}

// ---------- checkpoints ----------

use diffuse::data::toy2d::{DataSpec as ToySpec, Points};
use diffuse::nets::mlp::MlpConfig;
use diffuse::train::toy::{load_data, toy_config, LogSnrSampling, ToyRun, ToyTrainConfig};
use diffuse::train::{AdamWConfig, Budget, EmaConfig, Interrupt, LoopOptions, TrainerConfig};

fn toy_configs() -> (Points, ToyTrainConfig, TrainerConfig) {
    let spec = ToySpec::parse("8gaussians").unwrap();
    let points = load_data(&spec, 40, 3).unwrap();
    let model = MlpConfig {
        dim: 2,
        hidden: 4,
        layers: 1,
        embed_dim: 4,
        num_classes: None,
    };
    let task = toy_config(&spec, &points, model, 8, LogSnrSampling::default());
    let trainer = TrainerConfig {
        seed: 3,
        optimizer: AdamWConfig::default(),
        ema: EmaConfig::default(),
    };
    (points, task, trainer)
}

/// A toy run of 3 steps (checkpoint every 2 steps, so metrics.jsonl holds 3 lines).
fn toy_run_dir() -> tempfile::TempDir {
    let dir = tmp();
    let (points, task, trainer) = toy_configs();
    let mut run = ToyRun::setup(dir.path(), &points, None, &task, &trainer, false, &Device::Cpu).unwrap();
    let options = LoopOptions {
        checkpoint_every: 2,
        hook_every: 0,
        eval_every: 0,
        progress: false,
    };
    let budget = Budget {
        steps: Some(3),
        minutes: None,
    };
    run.run(&budget, &options, &Interrupt::new()).unwrap();
    dir
}

/// Everything that reads a toy checkpoint: locating and verifying it, the model (EMA and raw
/// weights) and resuming the run (which also reads `metrics.jsonl`). Not
/// `train::toy::training_points`, which regenerates the recorded number of points (up to
/// `train::toy::MAX_POINTS`, a cost set by the run, not by the file's size).
fn read_toy_checkpoint(run_dir: &Path) -> Result<(), Failure> {
    ok(diffuse::nets::mlp::MlpDenoiser::load(run_dir, true))?;
    ok(diffuse::nets::mlp::MlpDenoiser::load(run_dir, false))?;
    let (points, task, trainer) = toy_configs();
    ok(ToyRun::setup(
        run_dir,
        &points,
        None,
        &task,
        &trainer,
        true,
        &Device::Cpu,
    ))
}

/// One file of a toy checkpoint directory mutated. Each model tensor is read into memory once
/// or twice (f32 copies): factor 8 of the file (the other files are small and fixed).
fn toy_checkpoint_file(name: &'static str, rel: &str, with_manifest: bool) -> Target {
    let dir = toy_run_dir();
    let input = dir.path().to_path_buf();
    if !with_manifest {
        let _ = std::fs::remove_file(
            input
                .join("checkpoint")
                .join(diffuse::train::checkpoint::MANIFEST_FILE),
        );
    }
    let file = input.join(rel);
    let hints = if rel.ends_with(".safetensors") {
        safetensors_hints(&std::fs::read(&file).unwrap())
    } else {
        text()
    };
    // resuming cuts metrics.jsonl back to the checkpoint's step: restore it before each read
    // so that every input meets the same directory
    let metrics = input.join(diffuse::train::METRICS_FILE);
    let metrics_seed = std::fs::read(&metrics).unwrap();
    let restore = file != metrics;
    dir_target(name, dir, input, file, 8, hints, move |d| {
        if restore {
            std::fs::write(&metrics, &metrics_seed).map_err(|e| Failure {
                message: e.to_string(),
                user_error: false,
            })?;
        }
        read_toy_checkpoint(d)
    })
}

/// `state.json` (training state and run config) of a checkpoint without a manifest (a
/// checkpoint written before manifests existed), so every mutation reaches the JSON readers.
pub fn checkpoint_state() -> Target {
    toy_checkpoint_file("checkpoint-state", "checkpoint/state.json", false)
}

/// `model.safetensors` of a checkpoint without a manifest.
pub fn checkpoint_model() -> Target {
    toy_checkpoint_file("checkpoint-model", "checkpoint/model.safetensors", false)
}

/// `optimizer.safetensors` of a checkpoint without a manifest (read on resume).
pub fn checkpoint_optimizer() -> Target {
    toy_checkpoint_file("checkpoint-optimizer", "checkpoint/optimizer.safetensors", false)
}

/// `ema.safetensors` of a checkpoint with its manifest: every change is caught by the
/// manifest's sizes and checksums before the tensors are parsed.
pub fn checkpoint_ema_verified() -> Target {
    toy_checkpoint_file("checkpoint-ema-verified", "checkpoint/ema.safetensors", true)
}

/// `state.json` of a checkpoint with its manifest.
pub fn checkpoint_state_verified() -> Target {
    toy_checkpoint_file("checkpoint-state-verified", "checkpoint/state.json", true)
}

/// The manifest itself.
pub fn checkpoint_manifest() -> Target {
    toy_checkpoint_file("checkpoint-manifest", "checkpoint/manifest.json", true)
}

/// `metrics.jsonl`, read back on resume.
pub fn checkpoint_metrics() -> Target {
    toy_checkpoint_file("metrics-jsonl", "metrics.jsonl", true)
}

/// `state.json` of an image (U-Net) run: the run config holds the U-Net config, the schedule
/// and T, none of which may drive an allocation beyond the file's weights.
pub fn image_checkpoint_state() -> Target {
    use diffuse::train::image::{checksum_f32, GridSampling, ImageRun, ImageTrainConfig};
    let dir = tmp();
    let unet = serde_json::json!({
        "sample_size": 8, "in_channels": 1, "out_channels": 1,
        "block_out_channels": [4, 8], "down_block_types": ["DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D"], "layers_per_block": 1,
        "norm_num_groups": 2, "mid_block_type": null, "attention_head_dim": null,
    });
    let unet = diffuse::nets::UNetConfig::from_json(&unet).unwrap().to_json();
    let pixels: Vec<f32> = (0..128).map(|i| (i % 7) as f32 / 3.5 - 1.0).collect();
    let data = diffuse::data::ImageDataset::new(pixels, [1, 8, 8], None, None, "fuzz".into()).unwrap();
    let config = ImageTrainConfig {
        data: diffuse::data::DataSpec::default(),
        n_images: data.len(),
        data_checksum: checksum_f32(data.pixels()),
        preset: "fuzz".into(),
        unet,
        schedule: diffuse::schedule::BetaSchedule::from_name("linear").unwrap(),
        timesteps: 50,
        prediction: diffuse::denoiser::Prediction::Eps,
        batch: 2,
        flip: false,
        cond_drop: None,
    };
    let trainer = TrainerConfig {
        seed: 1,
        optimizer: AdamWConfig::default(),
        ema: EmaConfig::default(),
    };
    let grid = GridSampling {
        n: 0,
        steps: 10,
        seed: 0,
        guidance_scale: 1.0,
    };
    let mut run = ImageRun::setup(dir.path(), data, &config, &trainer, grid, false, &Device::Cpu).unwrap();
    let options = LoopOptions {
        checkpoint_every: 0,
        hook_every: 0,
        eval_every: 0,
        progress: false,
    };
    let budget = Budget {
        steps: Some(1),
        minutes: None,
    };
    run.trainer
        .run(&mut run.task, &budget, &options, &Interrupt::new())
        .unwrap();
    let input = dir.path().to_path_buf();
    let _ = std::fs::remove_file(
        input
            .join("checkpoint")
            .join(diffuse::train::checkpoint::MANIFEST_FILE),
    );
    let file = input.join("checkpoint/state.json");
    dir_target("image-checkpoint-state", dir, input, file, 8, text(), |d| {
        ok(diffuse::pipeline::load_checkpoint(d, true, &Device::Cpu))
    })
}

// ---------- FID: statistics files and InceptionV3 weights ----------

/// pytorch-fid's statistics `.npz` (`Statistics::read_npz`): a zip of two float64 `.npy`
/// arrays, stored; the arrays are read into tensors and copied once to f64 vectors, about 3
/// bytes per byte; factor 8.
pub fn fid_stats_npz() -> Target {
    let dir = tmp();
    let p = dir.path().join("seed.npz");
    let feats: Vec<f64> = (0..30).map(|i| ((i * 37) % 11) as f64 / 7.0).collect();
    diffuse::eval::fid::Statistics::of_features(&feats, 3, "x")
        .unwrap()
        .write_npz(&p)
        .unwrap();
    let seed = std::fs::read(&p).unwrap();
    file_target("fid-stats-npz", "stats.npz", seed, 8, Hints::default(), |p| {
        ok(diffuse::eval::fid::Statistics::read_npz(p))
    })
}

/// InceptionV3 weights as a PyTorch state dict (`WeightFile::open` on a zip-format `.pth`,
/// tests/fixtures/inception/tiny.pth): the tensors' storage, once; factor 8.
pub fn inception_pth() -> Target {
    let seed = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/inception/tiny.pth"))
        .unwrap();
    file_target("inception-pth", "weights.pth", seed, 8, Hints::default(), |p| {
        ok(diffuse::eval::inception::WeightFile::open(p))
    })
}

/// InceptionV3 weights as safetensors (`WeightFile::open`); factor 4 as the other safetensors.
pub fn inception_safetensors() -> Target {
    let seed = diffuse::train::checkpoint::safetensors_bytes(&small_tensors()).unwrap();
    let hints = safetensors_hints(&seed);
    file_target(
        "inception-safetensors",
        "weights.safetensors",
        seed,
        4,
        hints,
        |p| ok(diffuse::eval::inception::WeightFile::open(p)),
    )
}

/// Every target, in a fixed order.
pub fn all() -> Vec<Target> {
    vec![
        npy_f32(),
        npy_f64_v2(),
        init_noise(),
        npy_points(),
        csv_points(),
        idx_images_file(),
        idx_labels_file(),
        idx_gzip_bytes(),
        idx_gzip_content(),
        cifar_batch(),
        cifar_meta(),
        png(),
        png_grey(),
        jpeg(),
        safetensors_checkpoint(),
        safetensors_diffusers(),
        unet_config(),
        scheduler_config(),
        mixture_spec(),
        mixture_stds(),
        info_json(),
        checkpoint_state(),
        checkpoint_model(),
        checkpoint_optimizer(),
        checkpoint_ema_verified(),
        checkpoint_state_verified(),
        checkpoint_manifest(),
        checkpoint_metrics(),
        image_checkpoint_state(),
        fid_stats_npz(),
        inception_pth(),
        inception_safetensors(),
    ]
}
