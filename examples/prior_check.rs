use candle_core::{Device, Tensor};
use diffuse::eval::distance::energy_distance;
use diffuse::gmm::Gmm;
use diffuse::oracle::Oracle;
use diffuse::process::Process;
use diffuse::rng::NoiseStreams;
use diffuse::samplers::{build_sampler, NoObserver, SamplerKind, SamplerOptions};
use diffuse::schedule::Schedule;

fn main() -> anyhow::Result<()> {
    let gmm = Gmm::from_json_file(std::path::Path::new("/tmp/sw/degen.json"))?;
    let oracle = Oracle::new(gmm.clone());
    let n = 4000;
    let truth = gmm.sample(n, 999_999);
    for pname in ["ve", "vp", "seed-ve"] {
        let process = Process::from_name(pname, || Schedule::named("linear", 1000))?;
        let Process::Continuous(sde) = &process else { unreachable!() };
        let lvl = sde.level(sde.t_max());
        let s = build_sampler(SamplerKind::OdeHeun, &process, &SamplerOptions { steps: Some(200), ..Default::default() })?;
        // exact marginal prior
        let xt = gmm.noisy(lvl.alpha, lvl.sigma)?.sample(n, 5);
        let x = Tensor::from_vec(xt, (n, 2), &Device::Cpu)?;
        let out = s.sample(&oracle, x, &mut NoiseStreams::new(0, 0, n), &mut NoObserver)?;
        let v = out.x.flatten_all()?.to_vec1::<f64>()?;
        // gaussian prior
        let z = Tensor::randn(0f64, s.prior_std(), (n, 2), &Device::Cpu)?;
        let _ = z;
        let mut rng = diffuse::rng::Rng::new(5);
        let g: Vec<f64> = (0..2 * n).map(|_| rng.normal() * s.prior_std()).collect();
        let out2 = s.sample(&oracle, Tensor::from_vec(g, (n, 2), &Device::Cpu)?, &mut NoiseStreams::new(0, 0, n), &mut NoObserver)?;
        let v2 = out2.x.flatten_all()?.to_vec1::<f64>()?;
        println!("{pname}: exact prior {:.5}  gaussian prior {:.5}", energy_distance(&v, &truth, 2)?, energy_distance(&v2, &truth, 2)?);
    }
    Ok(())
}
