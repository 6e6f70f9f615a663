//! Every supported sampler/process pair at ordinary step counts on one mixture, scored by the
//! energy distance to fresh true samples against twice the null band's 95th percentile:
//! `cargo run --release --example oracle_sweep -- MIXTURE.json [N]`.

use diffuse::eval::report::{report_markdown, sampler_report, ReportConfig};
use diffuse::gmm::Gmm;
use diffuse::samplers::SamplerKind;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: oracle_sweep MIXTURE.json [N]"))?;
    let n: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(4000);
    let gmm = Gmm::from_json_file(std::path::Path::new(&path))?;
    let mut worst = 0.0f64;
    let mut all = Vec::new();
    for kind in SamplerKind::all() {
        let steps = match kind.name() {
            "ddpm" | "euler-maruyama" => vec![1000],
            "edm-heun" => vec![18],
            _ => vec![100, 500],
        };
        for p in kind.processes() {
            let config = ReportConfig {
                n,
                steps: steps.clone(),
                tolerances: vec![1e-5],
                pairs: vec![(kind, p.to_string())],
                ..Default::default()
            };
            let r = sampler_report(&gmm, &config, &mut |_| {})?;
            for row in &r.rows {
                worst = worst.max(row.energy_distance / r.null_p95);
            }
            all.push(r);
        }
    }
    for r in &all {
        let md = report_markdown(r);
        for line in md.lines().skip(4) {
            println!("{line}");
        }
    }
    println!(
        "null p95 {:.5}; worst ratio {worst:.2} (acceptance: <= 2)",
        all[0].null_p95
    );
    Ok(())
}
