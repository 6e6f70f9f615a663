//! The weights of the FID conformance fixture (tests/fixtures/inception/make_fixture.py):
//! conv and BatchNorm affine parameters from splitmix64, bit for bit as the script draws them,
//! and the committed calibrated BatchNorm statistics.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use diffuse::eval::inception::{WeightFile, WeightSource};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/inception")
        .join(name)
}
fn fnv1a64(name: &str) -> u64 {
    let mut h = 0xCBF29CE484222325u64;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001B3);
    }
    h
}

/// u_i = (splitmix64(seed, i) >> 11) * 2^-53, as the fixture script draws them.
fn uniforms(name: &str, n: usize) -> Vec<f64> {
    let seed = fnv1a64(name);
    (0..n as u64)
        .map(|i| {
            let mut z = seed.wrapping_add((i + 1).wrapping_mul(0x9E3779B97F4A7C15));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
            z ^= z >> 31;
            (z >> 11) as f64 * 2f64.powi(-53)
        })
        .collect()
}

/// The fixture's weights: generated conv / BatchNorm affine parameters, the committed running
/// statistics.
pub struct Generated {
    pub stats: WeightFile,
}

impl WeightSource for Generated {
    fn get(&self, name: &str, shape: &[usize]) -> diffuse::Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = if name.ends_with("conv.weight") {
            let bound = (6.0 / (shape[1] * shape[2] * shape[3]) as f64).sqrt();
            uniforms(name, n)
                .into_iter()
                .map(|u| (2.0 * u - 1.0) * bound)
                .collect()
        } else if name.ends_with("bn.weight") {
            uniforms(name, n).into_iter().map(|u| 0.5 + u).collect()
        } else if name.ends_with("bn.bias") {
            uniforms(name, n)
                .into_iter()
                .map(|u| (2.0 * u - 1.0) * 0.2)
                .collect()
        } else {
            return self.stats.get(name, shape);
        };
        let v: Vec<f32> = v.into_iter().map(|x| x as f32).collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }
}

pub fn weights() -> Generated {
    Generated {
        stats: WeightFile::open(&fixture("bn_stats.pth")).expect("bn_stats.pth"),
    }
}
