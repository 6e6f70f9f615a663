//! Exit codes and messages of every error path of the CLI (issue 17, item 6): one table row per
//! path, with the expected exit code and the start of the one-line message. The rule: exit 2
//! when the user's input is at fault (a flag, a file, a directory, the data in a file; a library
//! error about the user's input stays a library error and is never re-wrapped as a usage
//! error), exit 1 for failures of the run or the machine (a non-finite loss, a full disk).
//!
//! `{d}` in a row stands for the fixtures' directory. Rows fail fast (before any training), so
//! the table runs in a few seconds.

#![cfg(unix)]

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_diffuse");

const MIX: &str = r#"{"weights": [0.5, 0.5], "means": [[-1, 0], [1, 0]], "stds": [0.5, 0.5]}"#;

/// How a row's process is run.
#[derive(Clone, Copy, PartialEq)]
enum Env {
    Plain,
    /// Files may not grow past 4 KB (RLIMIT_FSIZE; SIGXFSZ ignored): a full disk.
    FullDisk,
}

struct Row {
    args: &'static str,
    code: i32,
    /// The start of stderr's first line (after `{d}` is replaced).
    prefix: &'static str,
    env: Env,
}

const fn row(args: &'static str, code: i32, prefix: &'static str) -> Row {
    Row {
        args,
        code,
        prefix,
        env: Env::Plain,
    }
}

/// Every error path, grouped by command.
const TABLE: &[Row] = &[
    // clap: usage errors (2), help and version (0)
    row("", 2, "Denoising diffusion models in Rust"),
    row("frobnicate", 2, "error: unrecognized subcommand 'frobnicate'"),
    row("toy sample --n 10", 2, "error: the following required arguments were not provided"),
    row("schedule --timesteps many", 2, "error: invalid value 'many' for '--timesteps"),
    row("train --out {d}/a --resume {d}/b", 2, "error: the argument '--out <DIR>' cannot be used with '--resume <DIR>'"),
    row("--help", 0, ""),
    row("--version", 0, ""),
    // schedule
    row("schedule --kind nope", 2, "error: invalid"),
    row("schedule --timesteps 1", 2, "error: invalid timesteps: got 1, expected an integer in 2..=100000"),
    row("schedule --timesteps 100001", 2, "error: invalid timesteps: got 100001"),
    row("schedule --beta-start 0.5 --beta-end 0.1", 2, "error: invalid beta_start"),
    row("schedule --plot {d}/file/plot.png", 2, "error: {d}/file: exists and is not a directory"),
    // forward
    row("forward --columns 1 --out {d}/f.png", 2, "error: --columns: got 1, expected at least 2"),
    row("forward --n-images 0 --out {d}/f.png", 2, "error: --n-images: got 0"),
    row("forward --schedule bogus --out {d}/f.png", 2, "error: invalid"),
    row("forward --data {d}/missing --out {d}/f.png", 2, "error: {d}/missing: no such file or directory"),
    // toy train: the data
    row("toy train --data spiral --out {d}/t", 2, "error: invalid data: unknown dataset 'spiral'"),
    row("toy train --data npy: --out {d}/t", 2, "error: invalid data: 'npy:' names no file"),
    row("toy train --data npy:{d}/missing.npy --out {d}/t", 2, "error: {d}/missing.npy: No such file"),
    row("toy train --data npy:{d}/nan.npy --out {d}/t", 2, "error: {d}/nan.npy: row 1, column 0 is NaN"),
    row("toy train --data npy:{d}/garbage.npy --out {d}/t", 2, "error: {d}/garbage.npy: not a .npy file"),
    row("toy train --data npy:{d}/points3.npy --n-data 5 --out {d}/t", 2, "error: --n-data applies to synthetic datasets"),
    row("toy train --data csv:{d}/bad.csv --out {d}/t", 2, "error: {d}/bad.csv: line 2, column 2: 'abc' is not a number"),
    row("toy train --data csv:{d}/inf.csv --out {d}/t", 2, "error: {d}/inf.csv: line 1, column 1: inf is not a finite number"),
    row("toy train --data gmm:{d}/badmix.json --out {d}/t", 2, "error: {d}/badmix.json: weights sum to 0.9"),
    row("toy train --data gmm:{d}/latin1.json --out {d}/t", 2, "error: {d}/latin1.json: not UTF-8 text"),
    row("toy train --data gmm:{d}/hugestd.json --out {d}/t", 2, "error: {d}/hugestd.json: field `stds[0]`: 1e200: its square"),
    row("toy train --data gmm:{d}/typomix.json --out {d}/t", 2, "error: {d}/typomix.json: field `std`: unknown field"),
    row("toy train --data gmm:{d}/strmix.json --out {d}/t", 2, "error: {d}/strmix.json: field `means[1][0]`: expected a number, found \"1\""),
    row("toy train --data moons --n-data 10000001 --out {d}/t", 2, "error: --n-data 10000001: at most 10000000 points"),
    // toy train: the settings and the run directory
    row("toy train --data moons --batch 0 --out {d}/t", 2, "error: invalid batch: got 0"),
    row("toy train --data moons --log-snr-sampling beta --out {d}/t", 2, "error: invalid log-snr-sampling"),
    row("toy train --data moons --log-snr-min 3 --log-snr-max 1 --out {d}/t", 2, "error: invalid log-snr-max"),
    row("toy train --data moons --embed-dim 3 --out {d}/t", 2, "error: invalid embed_dim"),
    row("toy train --data moons --minutes=-1 --out {d}/t", 2, "error: invalid minutes"),
    row("toy train --data moons --out {d}/file/run", 2, "error: {d}/file"),
    row("toy train --data 8gaussians --n-data 64 --hidden 8 --layers 1 --embed-dim 4 --batch 8 --steps 4 --out {d}/toyrun", 2, "error: {d}/toyrun: already holds a checkpoint (step 2)"),
    row("toy train --data moons --resume --out {d}/empty", 2, "error: {d}/empty: no checkpoint here"),
    row("toy train --data moons --resume --out {d}/missing", 2, "error: {d}/missing: no such directory"),
    row("toy train --data 8gaussians --n-data 64 --hidden 16 --layers 1 --embed-dim 4 --batch 8 --steps 4 --resume --out {d}/toyrun", 2, "error: {d}/toyrun/checkpoint/state.json: the run's configuration differs"),
    row("toy train --data 8gaussians --n-data 64 --hidden 8 --layers 1 --embed-dim 4 --batch 8 --steps 4 --resume --out {d}/damaged", 2, "error: {d}/damaged/checkpoint/model.safetensors: 100 bytes, manifest.json records"),
    // toy train: failures of the run (1)
    row("toy train --data 8gaussians --n-data 64 --hidden 8 --layers 1 --embed-dim 4 --batch 8 --lr 1e30 --warmup 0 --grad-clip 0 --steps 20 --checkpoint-every 1 --out {d}/nan-run", 1, "error: numerical error: the loss is inf at step 2; the checkpoint of step 1 in {d}/nan-run is intact"),
    // toy sample
    row("toy sample --oracle {d}/mix.json --process vp --sampler ode-heun --n 4 --seed 0 --out {d}/s.npy", 2, "error: --oracle {d}/mix.json: expected gmm:FILE.json"),
    row("toy sample --oracle gmm:{d}/missing.json --process vp --sampler ode-heun --n 4 --seed 0 --out {d}/s.npy", 2, "error: {d}/missing.json: No such file"),
    row("toy sample --oracle gmm:{d}/mix.json --process vp --sampler bogus --n 4 --seed 0 --out {d}/s.npy", 2, "error: invalid sampler"),
    row("toy sample --oracle gmm:{d}/mix.json --process bogus --sampler ode-heun --n 4 --seed 0 --out {d}/s.npy", 2, "error: invalid process"),
    row("toy sample --oracle gmm:{d}/mix.json --process vp --sampler ddim --n 4 --seed 0 --out {d}/s.npy", 2, "error: invalid process: --sampler ddim does not run on --process vp"),
    row("toy sample --oracle gmm:{d}/mix.json --process vp --schedule cosine --sampler ode-heun --n 4 --seed 0 --out {d}/s.npy", 2, "error: --schedule and --timesteps apply to --process ddpm"),
    row("toy sample --oracle gmm:{d}/mix.json --process vp --sampler ode-heun --n 0 --seed 0 --out {d}/s.npy", 2, "error: --n must be at least 1"),
    row("toy sample --checkpoint {d}/empty --process vp --sampler ode-heun --n 4 --seed 0 --out {d}/s.npy", 2, "error: {d}/empty: no checkpoint here"),
    row("toy sample --checkpoint {d}/damaged --process vp --sampler ode-heun --n 4 --seed 0 --out {d}/s.npy", 2, "error: {d}/damaged/checkpoint/model.safetensors"),
    row("toy sample --oracle gmm:{d}/mix.json --process vp --sampler ode-heun --n 4 --seed 0 --out {d}/file/s.npy", 2, "error: {d}/file: exists and is not a directory"),
    Row {
        args: "toy sample --oracle gmm:{d}/mix.json --process vp --sampler ode-euler --steps 5 --n 2000 --seed 0 --out {d}/full.npy",
        code: 1,
        prefix: "error: {d}/full.npy: File too large",
        env: Env::FullDisk,
    },
    // toy nll
    row("toy nll --oracle gmm:{d}/mix.json --process vp --points {d}/missing.npy --out {d}/n.json", 2, "error: {d}/missing.npy: No such file"),
    row("toy nll --oracle gmm:{d}/mix.json --process vp --points {d}/nan.npy --out {d}/n.json", 2, "error: {d}/nan.npy: row 1, column 0 is NaN"),
    row("toy nll --oracle gmm:{d}/mix.json --process vp --points {d}/points3.npy --out {d}/n.json", 2, "error: {d}/points3.npy: expected an array of shape [N, 2]"),
    row("toy nll --oracle gmm:{d}/mix.json --process vp --points {d}/flat.npy --out {d}/n.json", 2, "error: {d}/flat.npy: expected a 2-D array"),
    row("toy nll --oracle gmm:{d}/mix.json --process ddpm --points {d}/points.npy --out {d}/n.json", 2, "error: toy nll integrates the probability-flow ODE"),
    row("toy nll --oracle gmm:{d}/mix.json --process vp --divergence foo --points {d}/points.npy --out {d}/n.json", 2, "error: --divergence foo"),
    row("toy nll --oracle gmm:{d}/mix.json --process vp --divergence hutchinson --probe foo --points {d}/points.npy --out {d}/n.json", 2, "error: --probe foo"),
    row("toy nll --checkpoint {d}/toyrun --process vp --prior exact --points {d}/points.npy --out {d}/n.json", 2, "error: --prior exact needs --oracle"),
    row("toy nll --oracle gmm:{d}/mix.json --process vp --prior foo --points {d}/points.npy --out {d}/n.json", 2, "error: --prior foo"),
    row("toy nll --oracle gmm:{d}/mix.json --process vp --rtol 0 --points {d}/points.npy --out {d}/n.json", 2, "error: likelihood of {d}/points.npy: invalid rtol"),
    row("toy nll --oracle gmm:{d}/mix.json --process vp --t-start 2 --points {d}/points.npy --out {d}/n.json", 2, "error: likelihood of {d}/points.npy: invalid t_start"),
    // toy score-field, toy report
    row("toy score-field --oracle gmm:{d}/mix.json --process vp --t 2 --out {d}/sf.png", 2, "error: --t [2.0]: expected comma-separated times in (0, 1]"),
    row("toy score-field --oracle gmm:{d}/mix.json --process vp --grid 1 --out {d}/sf.png", 2, "error: --grid 1"),
    row("toy score-field --oracle gmm:{d}/mix3.json --process vp --out {d}/sf.png", 2, "error: score-field draws 2-D models; this one has D = 3"),
    row("toy report --n 1", 2, "error: --n must be at least 2"),
    row("toy report --oracle gmm:{d}/mix3.json --checkpoint {d}/toyrun", 2, "error: --checkpoint {d}/toyrun models 2-D data, the mixture is 3-D"),
    // train
    row("train --out {d}/i --data {d}/missing", 2, "error: {d}/missing: no such file or directory"),
    row("train --out {d}/i --data {d}/points.npy", 2, "error: {d}/points.npy: not a directory"),
    row("train --out {d}/i --data {d}/empty", 2, "error: {d}/empty: no images found"),
    row("train --out {d}/i --data {d}/badimages", 2, "error: {d}/badimages/a.png: cannot decode the image"),
    row("train --out {d}/i --data {d}/wide", 2, "error: images are 8x12; the U-Net presets need square images"),
    row("train --out {d}/i --data {d}/images --preset bogus", 2, "error: invalid preset"),
    row("train --out {d}/i --data {d}/images --schedule bogus", 2, "error: invalid"),
    row("train --out {d}/i --data {d}/images --prediction bogus", 2, "error: invalid prediction"),
    row("train --out {d}/i --data {d}/images --image-size 0", 2, "error: invalid image_size"),
    row("train --out {d}/i --data {d}/images --image-size 6", 2, "error: invalid image_size: preset demo: a 3-level U-Net needs height and width divisible by 2^2 = 4"),
    row("train --out {d}/i --data {d}/images --channels 2", 2, "error: invalid channels"),
    row("train --out {d}/i --data {d}/images --threads 0", 2, "error: --threads: got 0"),
    row("train --out {d}/i --data {d}/images --timesteps 1", 2, "error: invalid timesteps"),
    row("train --out {d}/i --data {d}/images --precision fp16", 2, "error: invalid precision: unknown precision 'fp16', expected f32 or bf16"),
    row("forward --data {d}/images --split test --out {d}/f.png", 2, "error: {d}/images: has no train/ and test/ subfolders"),
    row("train --resume {d}/empty", 2, "error: {d}/empty: no checkpoint here"),
    row("train --resume {d}/toyrun", 2, "error: {d}/toyrun/checkpoint/state.json: is not an image training run"),
    row("train --out {d}/toyrun --data {d}/images", 2, "error: {d}/toyrun: already holds a checkpoint"),
    // sample (image models)
    row("sample --checkpoint {d}/missing --out {d}/gen", 2, "error: {d}/missing: no such directory"),
    row("sample --checkpoint {d}/toyrun --out {d}/gen", 2, "error: {d}/toyrun/checkpoint/state.json: is not an image-model checkpoint"),
    row("sample --checkpoint {d}/damaged --out {d}/gen", 2, "error: {d}/damaged/checkpoint/model.safetensors"),
    row("sample --diffusers {d}/empty --out {d}/gen", 2, "error: {d}/empty: no UNet config"),
    row("sample --checkpoint {d}/toyrun --diffusers {d}/empty --out {d}/gen", 2, "error: the argument"),
    row("sample --checkpoint {d}/toyrun --scheduler-config {d}/mix.json --out {d}/gen", 2, "error: --scheduler-config applies to --diffusers models only"),
    row("sample --checkpoint {d}/toyrun --n 0 --out {d}/gen", 2, "error: --n and --batch must be at least 1"),
    row("sample --checkpoint {d}/imgrun --sampler bogus --out {d}/gen", 2, "error: invalid sampler"),
    row("sample --checkpoint {d}/imgrun --precision half --out {d}/gen", 2, "error: invalid precision: unknown precision 'half'"),
    row("sample --checkpoint {d}/imgrun --sampler ddpm --steps 0 --out {d}/gen", 2, "error: invalid"),
    row("sample --checkpoint {d}/imgrun --n 4 --out {d}/file/gen", 2, "error: {d}/file/gen: "),
    row("sample --diffusers {d}/diffusers-nomodel --out {d}/gen", 2, "error: {d}/diffusers-nomodel/config.json: invalid JSON"),
    row("sample --diffusers {d}/diffusers-badtype --out {d}/gen", 2, "error: {d}/diffusers-badtype/config.json: field `layers_per_block`: expected a non-negative integer, found \"two\""),
    row("sample --diffusers {d}/diffusers-tiny --scheduler-config {d}/badsched.json --out {d}/gen", 2, "error: {d}/badsched.json: field `clip_sample`: expected a boolean, found \"yes\""),
    row("eval nll --diffusers {d}/diffusers-tiny --scheduler-config {d}/badsched.json --verbose", 2, "error: {d}/badsched.json: field `clip_sample`: expected a boolean, found \"yes\""),
    // eval
    row("eval nll --checkpoint {d}/missing", 2, "error: {d}/missing: no such directory"),
    row("eval nll --checkpoint {d}/toyrun --n-images 0", 2, "error: --n-images and --batch must be at least 1"),
    row("eval samples --samples {d}/missing.npy", 2, "error: {d}/missing.npy: No such file"),
    row("eval samples --samples {d}/garbage.npy", 2, "error: {d}/garbage.npy: not a .npy file"),
    row("eval samples --samples {d}/points.npy", 2, "error: {d}/points.npy: expected shape [N, C, H, W]"),
    row("eval samples --samples {d}/gen-nan/samples.npy --data {d}/images", 2, "error: {d}/gen-nan/samples.npy: the value at index [1, 0, 2, 3] (element 83 in C order) is inf"),
    row("eval samples --samples {d}/gen-badinfo/samples.npy", 2, "error: {d}/gen-badinfo/info.json: invalid JSON"),
    row("eval samples --samples {d}/gen-typoinfo/samples.npy", 2, "error: {d}/gen-typoinfo/info.json: field `training_dat`: unknown field"),
    row("eval samples --samples {d}/gen-wronginfo/samples.npy", 2, "error: {d}/gen-wronginfo/info.json: field `training_data.data`: expected a string, found 3"),
    row("eval samples --samples {d}/gen-badinfo/samples.npy --data {d}/wide --split train --image-size 12", 2, "error: the samples are [1, 8, 8] but the reference images are [1, 12, 12]"),
    row("eval nll --checkpoint {d}/imgrun --data {d}/wide --split train --image-size 12", 2, "error: the images are [1, 12, 12] but the model makes [1, 8, 8]"),
    row("eval nll --checkpoint {d}/imgrun --split test", 2, "error: {d}/images: has no train/ and test/ subfolders"),
    // export
    row("export --checkpoint {d}/missing --out {d}/exp", 2, "error: {d}/missing: no such directory"),
    row("export --checkpoint {d}/toyrun --out {d}/file", 2, "error: --out {d}/file: exists and is not a directory"),
    row("export --checkpoint {d}/toyrun --out {d}/toyrun", 2, "error: --out {d}/toyrun: the folder is not empty"),
    row("export --checkpoint {d}/toyrun --out {d}/exp", 2, "error: {d}/toyrun/checkpoint/state.json: is not an image-model checkpoint"),
    // bench
    row("bench --threads 0", 2, "error: --threads: got 0, expected at least 1"),
    row("bench --presets ,", 2, "error: --presets: empty list"),
];

fn npy_f32(path: &Path, shape: &[usize], data: &[f32]) {
    diffuse::io::write_npy_f32(path, shape, data).unwrap();
}

fn png(path: &Path, w: u32, h: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::GrayImage::from_fn(w, h, |x, y| image::Luma([(x * 20 + y * 7) as u8]))
        .save(path)
        .unwrap();
}

fn fixtures(d: &Path) {
    let w = |name: &str, bytes: &[u8]| std::fs::write(d.join(name), bytes).unwrap();
    w("mix.json", MIX.as_bytes());
    w(
        "mix3.json",
        br#"{"weights": [1], "means": [[0, 0, 0]], "stds": [1]}"#,
    );
    w(
        "badmix.json",
        br#"{"weights": [0.5, 0.4], "means": [[0], [1]], "stds": [1, 1]}"#,
    );
    w(
        "latin1.json",
        b"{\"weights\": [1], \"means\": [[0]], \"stds\": [1], \"note\": \"caf\xe9\"}",
    );
    w(
        "hugestd.json",
        br#"{"weights": [1], "means": [[0, 0]], "stds": [1e200]}"#,
    );
    w(
        "typomix.json",
        br#"{"weights": [1], "means": [[0, 0]], "std": [1]}"#,
    );
    w(
        "strmix.json",
        br#"{"weights": [0.5, 0.5], "means": [[0], ["1"]], "stds": [1, 1]}"#,
    );
    w(
        "badsched.json",
        br#"{"_class_name": "DDPMScheduler", "clip_sample": "yes"}"#,
    );
    w("bad.csv", b"1,2\n3,abc\n");
    w("inf.csv", b"inf,2\n3,4\n");
    w("garbage.npy", b"definitely not numpy");
    w("file", b"a file where a directory is expected");
    npy_f32(&d.join("points.npy"), &[3, 2], &[0.0, 0.0, 1.0, 1.0, -1.0, 0.5]);
    npy_f32(&d.join("points3.npy"), &[2, 3], &[0.0; 6]);
    npy_f32(&d.join("flat.npy"), &[4], &[0.0; 4]);
    npy_f32(&d.join("nan.npy"), &[2, 2], &[1.0, 2.0, f32::NAN, 4.0]);
    std::fs::create_dir_all(d.join("empty")).unwrap();
    for i in 0..4 {
        png(&d.join("images").join(format!("{i}.png")), 8, 8);
        png(&d.join("wide").join(format!("{i}.png")), 12, 8);
    }
    std::fs::create_dir_all(d.join("badimages")).unwrap();
    w("badimages/a.png", b"\x89PNG\r\n\x1a\nnot really");
    // generated samples: one with an infinite pixel, one beside a damaged info.json
    let mut pixels = vec![0.5f32; 2 * 64];
    pixels[64 + 2 * 8 + 3] = f32::INFINITY;
    std::fs::create_dir_all(d.join("gen-nan")).unwrap();
    npy_f32(&d.join("gen-nan/samples.npy"), &[2, 1, 8, 8], &pixels);
    std::fs::create_dir_all(d.join("gen-badinfo")).unwrap();
    npy_f32(&d.join("gen-badinfo/samples.npy"), &[2, 1, 8, 8], &[0.5; 128]);
    w("gen-badinfo/info.json", b"{\"training_data\": ");
    // info.json with a misspelt field, and with a field of the wrong type
    for (dir, info) in [
        ("gen-typoinfo", &br#"{"n": 2, "training_dat": null}"#[..]),
        (
            "gen-wronginfo",
            &br#"{"n": 2, "training_data": {"data": 3, "split": "train"}}"#[..],
        ),
    ] {
        std::fs::create_dir_all(d.join(dir)).unwrap();
        npy_f32(&d.join(dir).join("samples.npy"), &[2, 1, 8, 8], &[0.5; 128]);
        w(&format!("{dir}/info.json"), info);
    }
    // a toy run (2 steps) and a damaged copy of it (model.safetensors cut to 100 bytes)
    let run = d.join("toyrun");
    let out = Command::new(BIN)
        .args([
            "toy",
            "train",
            "--data",
            "8gaussians",
            "--n-data",
            "64",
            "--hidden",
            "8",
        ])
        .args([
            "--layers",
            "1",
            "--embed-dim",
            "4",
            "--batch",
            "8",
            "--steps",
            "2",
            "--json",
            "--out",
        ])
        .arg(&run)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let damaged = d.join("damaged").join("checkpoint");
    std::fs::create_dir_all(&damaged).unwrap();
    for e in std::fs::read_dir(run.join("checkpoint")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), damaged.join(e.file_name())).unwrap();
    }
    let model = std::fs::read(damaged.join("model.safetensors")).unwrap();
    std::fs::write(damaged.join("model.safetensors"), &model[..100]).unwrap();
    std::fs::copy(run.join("metrics.jsonl"), d.join("damaged").join("metrics.jsonl")).unwrap();
    // an image run (the demo U-Net on the 8x8 images, 1 step, no sample grid)
    let out = Command::new(BIN)
        .args([
            "train",
            "--batch",
            "2",
            "--steps",
            "1",
            "--grid-size",
            "0",
            "--threads",
            "1",
            "--json",
        ])
        .arg("--data")
        .arg(d.join("images"))
        .arg("--out")
        .arg(d.join("imgrun"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // a diffusers folder whose config is cut short
    std::fs::create_dir_all(d.join("diffusers-nomodel")).unwrap();
    w("diffusers-nomodel/config.json", b"{\"_class_name\": \"UNet2D");
    w("diffusers-nomodel/diffusion_pytorch_model.safetensors", b"");
    // a diffusers folder whose config has a field of the wrong type
    std::fs::create_dir_all(d.join("diffusers-badtype")).unwrap();
    w(
        "diffusers-badtype/config.json",
        br#"{"_class_name": "UNet2DModel", "layers_per_block": "two"}"#,
    );
    w("diffusers-badtype/diffusion_pytorch_model.safetensors", b"");
    // a small working diffusers model (the committed fixture)
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/diffusers/no_mid_block_1ch16");
    std::fs::create_dir_all(d.join("diffusers-tiny")).unwrap();
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(tiny.join(f), d.join("diffusers-tiny").join(f)).unwrap();
    }
}

#[test]
fn every_error_path_has_its_exit_code_and_message() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    fixtures(d);
    let dir = d.display().to_string();
    let mut failures = Vec::new();
    for r in TABLE {
        let args: Vec<String> = r
            .args
            .split_whitespace()
            .map(|a| a.replace("{d}", &dir))
            .collect();
        let mut cmd = Command::new(BIN);
        cmd.args(&args).env("RAYON_NUM_THREADS", "1");
        if r.env == Env::FullDisk {
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    let limit = libc::rlimit {
                        rlim_cur: 4096,
                        rlim_max: 4096,
                    };
                    libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                    if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let first = stderr.lines().next().unwrap_or_default().to_string();
        let prefix = r.prefix.replace("{d}", &dir);
        let code = out.status.code();
        let mut problems = Vec::new();
        if code != Some(r.code) {
            problems.push(format!("exit {code:?}, expected {}", r.code));
        }
        if !first.starts_with(&prefix) {
            problems.push(format!("message does not start with {prefix:?}"));
        }
        // library and CLI errors are exactly one line; clap prints its own usage block
        let ours = r.code == 1 || (r.code == 2 && first.starts_with("error: ") && !is_clap(&stderr));
        if ours && stderr.trim_end().lines().count() != 1 {
            problems.push("not a one-line error".into());
        }
        if stderr.contains("panicked") {
            problems.push("panicked".into());
        }
        // each cause is said once ("No such file or directory (os error 2)" not twice)
        if stderr.matches("(os error").count() > 1 {
            problems.push("a cause repeated".into());
        }
        if std::env::var_os("EXIT_CODES_SHOW").is_some() {
            println!("{:?} {}\n    {first}", code, r.args);
        }
        if !problems.is_empty() {
            failures.push(format!(
                "diffuse {}: {}\n    stderr: {}",
                r.args,
                problems.join("; "),
                stderr.trim_end()
            ));
        }
    }
    println!("{} error paths checked", TABLE.len());
    assert!(
        failures.is_empty(),
        "{} of {} rows:\n{}",
        failures.len(),
        TABLE.len(),
        failures.join("\n")
    );
}

/// clap's own errors end with a usage block and a `--help` hint.
fn is_clap(stderr: &str) -> bool {
    stderr.contains("For more information, try '--help'.")
}
