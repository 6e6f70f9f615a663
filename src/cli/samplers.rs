//! `diffuse samplers`: the sampler registry as a table (markdown, the README's sampler table) or JSON.

use clap::Args;
use serde_json::json;

use diffuse::samplers::registry::{markdown_table, SAMPLERS};

#[derive(Args, Debug)]
pub struct SamplersArgs {
    /// Print every sampler as one JSON object (name, processes, default steps, options).
    #[arg(long)]
    json: bool,
}

pub fn run(a: SamplersArgs) -> anyhow::Result<()> {
    if a.json {
        let rows: Vec<_> = SAMPLERS
            .iter()
            .map(|s| {
                json!({
                    "name": s.name,
                    "about": s.about,
                    "processes": s.processes,
                    "default_steps": s.default_steps_doc,
                    "adaptive": s.adaptive,
                    "stochastic": s.stochastic,
                    "options": s.options.iter().map(|o| o.flag()).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", json!({ "samplers": rows }));
    } else {
        print!("{}", markdown_table());
    }
    Ok(())
}
