//! `diffuse eval fid` end to end: the bundled digit features, statistics files, InceptionV3 from
//! a weights file (the conformance fixture's, block 0) against pytorch-fid's recorded FID, and
//! every bad input as one line on stderr with exit code 2.

#[path = "support/inception.rs"]
mod support;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use candle_core::{Device, Tensor};
use diffuse::eval::inception::WeightSource;
use support::{fixture, weights};

fn diffuse(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(args: &[&str]) -> serde_json::Value {
    let (code, out, err) = diffuse(args);
    assert_eq!(code, 0, "{args:?}: {err}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

fn bad(args: &[&str], needle: &str) {
    let (code, _, err) = diffuse(args);
    assert_eq!(code, 2, "{args:?}: exit {code}: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{args:?}: not one line: {err}");
    assert!(err.contains(needle), "{args:?}: {err} lacks {needle:?}");
}

/// Block 0 of the fixture's network (what `--dims 64` reads) as a safetensors file.
fn block0_weights(path: &Path) {
    let w = weights();
    let mut map = HashMap::new();
    for (name, c_in, c_out) in [
        ("Conv2d_1a_3x3", 3, 32),
        ("Conv2d_2a_3x3", 32, 32),
        ("Conv2d_2b_3x3", 32, 64),
    ] {
        let key = format!("{name}.conv.weight");
        map.insert(key.clone(), w.get(&key, &[c_out, c_in, 3, 3]).unwrap());
        for p in ["weight", "bias", "running_mean", "running_var"] {
            let key = format!("{name}.bn.{p}");
            map.insert(key.clone(), w.get(&key, &[c_out]).unwrap());
        }
    }
    candle_core::safetensors::save(&map, path).unwrap();
}

fn write_images(path: &Path, t: &Tensor) {
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    diffuse::io::write_npy_f32(path, t.dims(), &v).unwrap();
}

#[test]
fn digit_features_and_statistics_files() {
    let dir = tempfile::tempdir().unwrap();
    let r = json(&[
        "eval",
        "fid",
        "--samples",
        "mnist5k",
        "--reference",
        "mnist5k",
        "--json",
    ]);
    assert_eq!(r["metric"], "FD of the bundled digit features");
    assert!(r["feature_network"]
        .as_str()
        .unwrap()
        .contains("digit classifier"));
    assert_eq!(
        (r["n_samples"].as_u64(), r["n_reference"].as_u64()),
        (Some(4000), Some(1000))
    );
    let fd = r["fd_digit_features"].as_f64().unwrap();
    assert!(fd > 0.5 && fd < 20.0, "train vs test digits: {fd}");
    let (p, rc) = (r["precision"].as_f64().unwrap(), r["recall"].as_f64().unwrap());
    assert!(p > 0.5 && p <= 1.0 && rc > 0.5 && rc <= 1.0, "{p} {rc}");
    // the training split's statistics, saved and read back, give the same distance
    let stats = dir.path().join("train.npz");
    let s = stats.to_str().unwrap();
    let (code, _, err) = diffuse(&["eval", "fid", "--samples", "mnist5k", "--save-stats", s]);
    assert_eq!(code, 0, "{err}");
    let r2 = json(&["eval", "fid", "--samples", s, "--reference", "mnist5k", "--json"]);
    let fd2 = r2["fd_digit_features"].as_f64().unwrap();
    assert!((fd2 - fd).abs() <= 1e-9 * fd, "{fd2} vs {fd}");
    assert!(r2["kid_mean"].is_null(), "no KID from statistics");
}

#[test]
fn inception_fid_through_the_cli_equals_pytorch_fid() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().join("block0.safetensors");
    block0_weights(&w);
    let sets = candle_core::safetensors::load(fixture("fid_sets.safetensors"), &Device::Cpu).unwrap();
    let (x, y) = (dir.path().join("x.npy"), dir.path().join("y.npy"));
    write_images(&x, &sets["x"]);
    write_images(&y, &sets["y"]);
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("fid.json")).unwrap()).unwrap();
    let want = want["fid_64"].as_f64().unwrap();
    let (ws, xs, ys) = (w.to_str().unwrap(), x.to_str().unwrap(), y.to_str().unwrap());
    let r = json(&[
        "eval",
        "fid",
        "--inception",
        ws,
        "--dims",
        "64",
        "--samples",
        xs,
        "--reference",
        ys,
        "--json",
    ]);
    let got = r["fid"].as_f64().unwrap();
    assert_eq!(r["metric"], "FID");
    assert!((got - want).abs() <= 1e-3 * want, "{got} vs pytorch-fid {want}");
    assert_eq!(r["singular_offset"], false);

    // bad input, one line each, exit 2
    let few = dir.path().join("few.npy");
    write_images(&few, &sets["x"].narrow(0, 0, 10).unwrap());
    bad(
        &[
            "eval",
            "fid",
            "--inception",
            ws,
            "--dims",
            "64",
            "--samples",
            few.to_str().unwrap(),
            "--reference",
            ys,
        ],
        "at least 65 images",
    );
    let pth = fixture("bn_stats.pth");
    bad(
        &[
            "eval",
            "fid",
            "--inception",
            pth.to_str().unwrap(),
            "--dims",
            "64",
            "--samples",
            xs,
            "--reference",
            ys,
        ],
        "no tensor `Conv2d_1a_3x3.conv.weight`",
    );
    let cut = dir.path().join("cut.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    bad(
        &[
            "eval",
            "fid",
            "--inception",
            cut.to_str().unwrap(),
            "--dims",
            "64",
            "--samples",
            xs,
            "--reference",
            ys,
        ],
        "not a readable safetensors",
    );
    let rgb = dir.path().join("rgb.npy");
    write_images(&rgb, &sets["x"].repeat((1, 3, 1, 1)).unwrap());
    bad(
        &[
            "eval",
            "fid",
            "--inception",
            ws,
            "--dims",
            "64",
            "--samples",
            rgb.to_str().unwrap(),
            "--reference",
            ys,
        ],
        "channels",
    );
    bad(
        &[
            "eval",
            "fid",
            "--samples",
            rgb.to_str().unwrap(),
            "--reference",
            rgb.to_str().unwrap(),
        ],
        "no bundled feature network",
    );
    let scaled = dir.path().join("scaled.npy");
    write_images(&scaled, &((&sets["x"] * 2.0).unwrap() - 1.0).unwrap());
    bad(
        &[
            "eval",
            "fid",
            "--samples",
            scaled.to_str().unwrap(),
            "--reference",
            ys,
        ],
        "expected images in [0, 1]",
    );
    bad(
        &[
            "eval",
            "fid",
            "--inception",
            ws,
            "--dims",
            "100",
            "--samples",
            xs,
            "--reference",
            ys,
        ],
        "not one of 64, 192, 768, 2048",
    );
    let other = dir.path().join("other.npz");
    let t = Tensor::zeros(64, candle_core::DType::F64, &Device::Cpu).unwrap();
    Tensor::write_npz(&[("m", &t), ("s", &t)], &other).unwrap();
    bad(
        &[
            "eval",
            "fid",
            "--inception",
            ws,
            "--dims",
            "64",
            "--samples",
            xs,
            "--reference",
            other.to_str().unwrap(),
        ],
        "no array `mu`",
    );
    bad(
        &["eval", "fid", "--samples", "no/such/dir", "--reference", ys],
        "no such file or directory",
    );
    bad(&["eval", "fid", "--samples", xs], "needs --reference");
}
