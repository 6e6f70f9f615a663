//! A sampler's own arithmetic, apart from the network: `diffuse bench --solvers`.
//!
//! Each sampler runs its default step count on the `ddpm` process (linear schedule,
//! T = 1000) from a batch of the sample workload's shape, driven by a denoiser that costs
//! nothing (it hands back one fixed tensor, a reference-counted clone): the time of the run
//! divided by its NFE is what the sampler itself adds to each network evaluation (the
//! x_0 / eps conversions, the multistep combinations, the noise draws, the finiteness
//! checks). Compared with one U-Net forward at the same batch, it says how much of a sampling
//! step the solver is (issue 14's bar: under 2 % at batch 256).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::denoiser::{Denoiser, NoiseLevel, Prediction};
use crate::error::Result;
use crate::process::Process;
use crate::rng::{NoiseStreams, Rng};
use crate::samplers::{build_sampler, draw_prior, NoObserver, SamplerKind, SamplerOptions};
use crate::schedule::Schedule;

/// A denoiser whose output is one fixed tensor: costs a reference count, not a computation.
struct FixedDenoiser {
    out: Tensor,
}

impl Denoiser for FixedDenoiser {
    fn prediction(&self) -> Prediction {
        Prediction::Eps
    }

    fn output(&self, _x_t: &Tensor, _levels: &[NoiseLevel]) -> Result<Tensor> {
        Ok(self.out.clone())
    }
}

/// One sampler's own cost.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SolverCost {
    /// The registry name.
    pub sampler: String,
    /// Steps run (the sampler's default on `ddpm`).
    pub steps: usize,
    /// Denoiser evaluations.
    pub nfe: usize,
    /// Median over the repetitions of the run's time per NFE (ms).
    pub ms_per_nfe: f64,
}

/// The own cost of every non-adaptive sampler that runs on `ddpm`, at `batch` images of
/// `shape` (median of `reps` runs each).
pub fn solver_costs(
    batch: usize,
    shape: [usize; 3],
    reps: usize,
    seed: u64,
    device: &Device,
) -> Result<Vec<SolverCost>> {
    let schedule = Schedule::named("linear", 1000)?;
    let process = Process::Ddpm(schedule);
    let [c, h, w] = shape;
    let out = Rng::new(seed).randn(&[batch, c, h, w], device)?;
    let den = FixedDenoiser { out };
    let mut costs = Vec::new();
    for kind in SamplerKind::all() {
        if kind.adaptive() || !kind.supports(&process) {
            continue;
        }
        let sampler = build_sampler(kind, &process, &SamplerOptions::default())?;
        let mut per_nfe = Vec::with_capacity(reps);
        let mut nfe = 0;
        for r in 0..reps.max(1) {
            let mut noise = NoiseStreams::new(seed, (r * batch) as u64, batch);
            let x_t = draw_prior(sampler.as_ref(), &[c, h, w], &mut noise, DType::F32, device)?;
            let t0 = Instant::now();
            let res = sampler.sample(&den, x_t, &mut noise, &mut NoObserver)?;
            res.x.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            nfe = res.nfe;
            per_nfe.push(t0.elapsed().as_secs_f64() * 1e3 / res.nfe.max(1) as f64);
        }
        per_nfe.sort_by(f64::total_cmp);
        costs.push(SolverCost {
            sampler: kind.name().to_string(),
            steps: kind.default_steps(&process).unwrap_or(0),
            nfe,
            ms_per_nfe: per_nfe[per_nfe.len() / 2],
        });
    }
    Ok(costs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fixed_step_sampler_on_ddpm_is_timed_with_its_nfe() {
        let costs = solver_costs(2, [1, 4, 4], 1, 0, &Device::Cpu).unwrap();
        let names: Vec<&str> = costs.iter().map(|c| c.sampler.as_str()).collect();
        for expected in ["ddpm", "ddim", "dpmpp-2m", "unipc", "heun"] {
            assert!(names.contains(&expected), "{expected} missing from {names:?}");
        }
        for c in &costs {
            assert!(
                c.nfe >= 1 && c.ms_per_nfe.is_finite() && c.ms_per_nfe >= 0.0,
                "{c:?}"
            );
        }
        // the registry's default steps, e.g. dpmpp-2m: 20 steps, one NFE each
        let d = costs.iter().find(|c| c.sampler == "dpmpp-2m").unwrap();
        assert_eq!((d.steps, d.nfe), (20, 20));
    }
}
