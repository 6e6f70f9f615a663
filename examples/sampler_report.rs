//! The sampler report: `cargo run --release --example sampler_report [MIXTURE.json]`.
//! Without an argument it uses the 2-D anisotropic 3-component mixture of the oracle tests.

use diffuse::eval::report::{report_markdown, sampler_report, ReportConfig};
use diffuse::gmm::{Covariance, Gmm};

fn main() -> anyhow::Result<()> {
    let gmm = match std::env::args().nth(1) {
        Some(path) => Gmm::from_json_file(std::path::Path::new(&path))?,
        None => Gmm::new(
            vec![0.5, 0.3, 0.2],
            vec![vec![-2.0, 0.0], vec![1.5, 1.0], vec![1.0, -1.5]],
            vec![
                Covariance::Full(vec![0.6, 0.25, 0.25, 0.2]),
                Covariance::Full(vec![0.1, -0.05, -0.05, 0.4]),
                Covariance::Isotropic(0.04),
            ],
        )?,
    };
    let report = sampler_report(&gmm, &ReportConfig::default(), &mut |label| eprintln!("{label}"))?;
    println!("{}", report_markdown(&report));
    Ok(())
}
