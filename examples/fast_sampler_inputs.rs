//! Writes the inputs `tests/fixtures/fast_samplers/make_fixtures.py --gmm DIR` drives diffusers'
//! schedulers with, so that diffusers and `tests/fast_samplers_oracle.rs` start from the very
//! same draws: for each mixture of the oracle test, the N x (1 + 20) D standard normal deviates
//! of `NoiseStreams::new(SEED, 0, N)` (row i: the prior draw z_i, then the noise of each
//! stochastic step, in the order the samplers draw them) and the N fresh exact draws the energy
//! distance is measured against, as raw little-endian f64 (`numpy.fromfile`).
//!
//! `cargo run --release --example fast_sampler_inputs -- DIR`

use std::path::Path;

use diffuse::gmm::Gmm;
use diffuse::rng::NoiseStreams;

/// The oracle test's sample size, seeds and mixtures (keep in sync with the test).
const N: usize = 4000;
const SEED: u64 = 0;
const TRUTH_SEED: u64 = 999_999;
const MAX_STEPS: usize = 20;

fn main() -> anyhow::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: fast_sampler_inputs DIR"))?;
    let dir = Path::new(&dir);
    std::fs::create_dir_all(dir)?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (name, path) in [
        ("anisotropic3", "examples/mixtures/anisotropic3.json"),
        ("narrow3d", "tests/fixtures/fast_samplers/narrow3d.json"),
    ] {
        let g = Gmm::from_json_file(&root.join(path))?;
        let d = g.dim();
        let noise = NoiseStreams::new(SEED, 0, N).normal_rows((1 + MAX_STEPS) * d);
        let truth = g.sample(N, TRUTH_SEED);
        for (what, data) in [("noise", noise), ("truth", truth)] {
            let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
            diffuse::io::atomic_write(&dir.join(format!("{name}_{what}.f64")), &bytes)?;
        }
        println!("{name}: D = {d}, N = {N}, {} noise columns", (1 + MAX_STEPS) * d);
    }
    Ok(())
}
