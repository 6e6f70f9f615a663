//! Degraded copies of the bundled test digits, for checking that a sample-quality figure grows
//! with the damage (Heusel et al. 2017, fig. 3 does this for FID): Gaussian blur of standard
//! deviation 0.5, 1 and 2 pixels (separable kernel of radius ceil(3 sigma), edges clamped) and
//! additive Gaussian noise of standard deviation 0.05, 0.1 and 0.2 (clamped to [0, 1], seeded).
//!
//!     cargo run --release --example degraded_digits -- OUT_DIR [--seed 0]
//!     diffuse eval fid --samples OUT_DIR/blur_1.npy --reference mnist5k
//!
//! Writes `clean.npy`, `blur_0.5.npy`, `blur_1.npy`, `blur_2.npy`, `noise_0.05.npy`,
//! `noise_0.1.npy`, `noise_0.2.npy`: float32 [1000, 1, 28, 28] in [0, 1], the layout of
//! `diffuse sample`'s samples.npy.

use std::path::PathBuf;

use diffuse::data::{load_bundled, Split};
use diffuse::rng::Rng;

fn blur(img: &[f32], h: usize, w: usize, sigma: f64) -> Vec<f32> {
    let r = (3.0 * sigma).ceil() as isize;
    let k: Vec<f64> = (-r..=r)
        .map(|i| (-(i * i) as f64 / (2.0 * sigma * sigma)).exp())
        .collect();
    let sum: f64 = k.iter().sum();
    let k: Vec<f64> = k.iter().map(|v| v / sum).collect();
    let pass = |src: &[f32], along_rows: bool| -> Vec<f32> {
        let mut out = vec![0f32; h * w];
        for y in 0..h {
            for x in 0..w {
                let mut acc = 0.0;
                for (j, kv) in k.iter().enumerate() {
                    let o = j as isize - r;
                    let (yy, xx) = if along_rows {
                        (y as isize, (x as isize + o).clamp(0, w as isize - 1))
                    } else {
                        ((y as isize + o).clamp(0, h as isize - 1), x as isize)
                    };
                    acc += kv * src[yy as usize * w + xx as usize] as f64;
                }
                out[y * w + x] = acc as f32;
            }
        }
        out
    };
    pass(&pass(img, true), false)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = PathBuf::from(
        args.first()
            .ok_or_else(|| anyhow::anyhow!("usage: degraded_digits OUT_DIR [--seed S]"))?,
    );
    let seed = match args.iter().position(|a| a == "--seed") {
        Some(i) => args
            .get(i + 1)
            .ok_or_else(|| anyhow::anyhow!("--seed needs a value"))?
            .parse()?,
        None => 0u64,
    };
    std::fs::create_dir_all(&out)?;
    let ds = load_bundled(Split::Test)?;
    let [c, h, w] = ds.shape();
    let n = ds.len();
    let clean: Vec<f32> = ds.pixels().iter().map(|&v| (v + 1.0) / 2.0).collect();
    let shape = [n, c, h, w];
    let write = |name: &str, v: &[f32]| -> anyhow::Result<()> {
        let p = out.join(format!("{name}.npy"));
        diffuse::io::write_npy_f32(&p, &shape, v)?;
        println!("wrote {}", p.display());
        Ok(())
    };
    write("clean", &clean)?;
    for sigma in [0.5, 1.0, 2.0] {
        let v: Vec<f32> = clean
            .chunks(h * w)
            .flat_map(|img| blur(img, h, w, sigma))
            .collect();
        write(&format!("blur_{sigma}"), &v)?;
    }
    for s in [0.05, 0.1, 0.2] {
        let mut rng = Rng::new(seed);
        let v: Vec<f32> = clean
            .iter()
            .map(|&p| (p as f64 + s * rng.normal()).clamp(0.0, 1.0) as f32)
            .collect();
        write(&format!("noise_{s}"), &v)?;
    }
    Ok(())
}
