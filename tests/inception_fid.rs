//! FID conformance with pytorch-fid, no weights downloaded: `tests/fixtures/inception/
//! make_fixture.py` builds pytorch-fid's own InceptionV3 with weights from a counter-based
//! generator (splitmix64) that this test reproduces bit for bit, calibrates its BatchNorm
//! statistics (committed as `bn_stats.pth`, a PyTorch state dict in pytorch-fid's key layout,
//! read here by the `.pth` reader), and records features at every `--dims`, an FID, a KID and
//! precision/recall. No Python at test time.

#[path = "support/inception.rs"]
mod support;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use diffuse::eval::fid::{fid, FeatureNet, Statistics};
use diffuse::eval::inception::{FidInception, WeightFile, DIMS};
use diffuse::eval::kid::kid;
use diffuse::eval::precision_recall::precision_recall;
use support::{fixture, weights};

fn load_npy(name: &str) -> (Vec<f32>, Vec<usize>) {
    let a = diffuse::io::read_npy(&fixture(name)).unwrap();
    (a.data.iter().map(|&v| v as f32).collect(), a.shape)
}

fn fixture_tensors(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name), &Device::Cpu).unwrap()
}

#[test]
fn features_match_pytorch_fid_at_every_dims() {
    let w = weights();
    let want = fixture_tensors("features.safetensors");
    let (digits, ds) = load_npy("images_digits.npy");
    let (colour, cs) = load_npy("images_colour.npy");
    // one network up to the last block; the smaller ones are prefixes of it
    for &dims in &DIMS {
        let net = FidInception::load(&w, dims).unwrap();
        for (set, values, shape) in [("digits", &digits, &ds), ("colour", &colour, &cs)] {
            let x = Tensor::from_slice(values, shape.as_slice(), &Device::Cpu).unwrap();
            let got = net
                .features(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let want = want[&format!("{set}_{dims}")]
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(got.len(), want.len(), "{set} {dims}");
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            eprintln!("{set} dims {dims}: worst |diff| {worst:.3e} of max feature {scale:.3}");
            assert!(
                worst <= 2e-3 * scale,
                "{set} dims {dims}: worst {worst:e} vs scale {scale}"
            );
        }
    }
}

#[test]
fn fid_kid_and_precision_recall_match_pytorch_fid_and_torch_fidelity() {
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("fid.json")).unwrap()).unwrap();
    let sets = fixture_tensors("fid_sets.safetensors");
    let f64s = |k: &str| sets[k].flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let (fx, fy) = (f64s("fx"), f64s("fy"));
    // on pytorch-fid's own features: the statistics and distances alone
    let (sx, sy) = (
        Statistics::of_features(&fx, 64, "x").unwrap(),
        Statistics::of_features(&fy, 64, "y").unwrap(),
    );
    let f = fid(&sx, &sy).unwrap();
    let want_fid = want["fid_64"].as_f64().unwrap();
    assert!(!f.offset);
    assert!(
        (f.value - want_fid).abs() <= 1e-6 * want_fid,
        "fid {} vs pytorch-fid {want_fid}",
        f.value
    );
    let k = kid(&fx, &fy, 64, 1, 70, 0).unwrap();
    let want_kid = want["kid"].as_f64().unwrap();
    assert!(
        (k.mean - want_kid).abs() <= 1e-9 * want_kid.abs(),
        "kid {} vs {want_kid}",
        k.mean
    );
    let pr = precision_recall(&fy, &fx, 64, 3).unwrap();
    assert!((pr.precision - want["precision"].as_f64().unwrap()).abs() < 1e-6);
    assert!((pr.recall - want["recall"].as_f64().unwrap()).abs() < 1e-6);

    // end to end: our network's features of the same images, then FID to 1e-3
    let net = FeatureNet::Inception(Box::new(FidInception::load(&weights(), 64).unwrap()));
    let img = |k: &str| sets[k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let gx = net.features(&img("x"), [1, 28, 28], 35, &mut |_| {}).unwrap();
    let gy = net.features(&img("y"), [1, 28, 28], 35, &mut |_| {}).unwrap();
    let g = fid(
        &Statistics::of_features(&gx, 64, "x").unwrap(),
        &Statistics::of_features(&gy, 64, "y").unwrap(),
    )
    .unwrap();
    eprintln!("end-to-end FID {} vs pytorch-fid {want_fid}", g.value);
    assert!(
        (g.value - want_fid).abs() <= 1e-3 * want_fid,
        "{} vs {want_fid}",
        g.value
    );
}

#[test]
fn statistics_round_trip_through_npz_and_bad_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let feats: Vec<f64> = (0..300).map(|i| ((i * 7919) % 101) as f64 / 50.0).collect();
    let s = Statistics::of_features(&feats, 3, "x").unwrap();
    let p = dir.path().join("stats.npz");
    s.write_npz(&p).unwrap();
    assert_eq!(Statistics::read_npz(&p).unwrap(), s);
    // too few rows for the width: the error says how many are needed
    let e = Statistics::of_features(&feats[..9], 3, "x")
        .unwrap_err()
        .to_string();
    assert!(e.contains("at least 4 images"), "{e}");
    // a stats file with other keys
    let other = dir.path().join("other.npz");
    let t = Tensor::zeros(3, DType::F64, &Device::Cpu).unwrap();
    Tensor::write_npz(&[("mean", &t)], &other).unwrap();
    let e = Statistics::read_npz(&other).unwrap_err().to_string();
    assert!(e.contains("no array `mu`"), "{e}");
    // truncated
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&other, &bytes[..bytes.len() / 2]).unwrap();
    assert!(Statistics::read_npz(&other).is_err());
}

#[test]
fn weight_files_of_another_architecture_or_truncated_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    // the BatchNorm statistics alone: no conv weights
    let e = FidInception::load(&WeightFile::open(&fixture("bn_stats.pth")).unwrap(), 64)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no tensor `Conv2d_1a_3x3.conv.weight`"), "{e}");
    // a tensor of the wrong shape
    let mut map = HashMap::new();
    map.insert(
        "Conv2d_1a_3x3.conv.weight".to_string(),
        Tensor::zeros((32, 3, 5, 5), DType::F32, &Device::Cpu).unwrap(),
    );
    let p = dir.path().join("w.safetensors");
    candle_core::safetensors::save(&map, &p).unwrap();
    let e = FidInception::load(&WeightFile::open(&p).unwrap(), 64)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("[32, 3, 5, 5]") && e.contains("[32, 3, 3, 3]"), "{e}");
    // truncated files
    for name in ["bn_stats.pth", "tiny.pth"] {
        let bytes = std::fs::read(fixture(name)).unwrap();
        let t = dir.path().join("t.pth");
        std::fs::write(&t, &bytes[..bytes.len() / 3]).unwrap();
        assert!(WeightFile::open(&t).is_err());
    }
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    assert!(WeightFile::open(&p).is_err());
}
