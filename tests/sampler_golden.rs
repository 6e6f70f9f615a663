//! Conformance of the discrete samplers' pieces with `tests/golden/` (float64 references
//! cross-checked against Python diffusers): DDIM timestep subsequences for every spacing, and
//! single reverse steps (x_0 prediction, DDIM eta = 0 update, DDPM posterior mean with and
//! without clipping, posterior variance) to relative 1e-9. Plus the chain's end point and the
//! DDIM(eta = 1) = DDPM identity. Field notes, bugs 1, 2, 4.

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use diffuse::denoiser::{x0_from_eps, Denoiser, NoiseLevel, Prediction};
use diffuse::process::{ddpm_level, Process};
use diffuse::samplers::chain::ReverseChain;
use diffuse::samplers::ddim::{ddim_step, Ddim};
use diffuse::samplers::ddpm::{posterior_mean, Ddpm, Variance};
use diffuse::samplers::timesteps::{timesteps, Spacing};
use diffuse::samplers::{build_sampler, sample_batched, NoObserver, SamplerKind, SamplerOptions};
use diffuse::schedule::Schedule;

fn golden(name: &str) -> Value {
    let path = format!("{}/tests/golden/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).expect("golden file is committed")).unwrap()
}

fn vecf(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn close(what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        assert!(
            err <= 1e-9 * w.abs() || err <= 1e-15,
            "{what}[{i}]: got {g:e}, want {w:e}"
        );
    }
}

#[test]
fn timestep_subsequences_match_diffusers() {
    let g = golden("timesteps.json");
    assert_eq!(g["T"].as_u64(), Some(1000));
    let mut seen = 0;
    for (key, want) in g["timesteps"].as_object().unwrap() {
        let (spacing, k) = key.rsplit_once('_').unwrap();
        let k: usize = k.parse().unwrap();
        let got = timesteps(1000, k, Spacing::from_name(spacing).unwrap()).unwrap();
        let want: Vec<usize> = want
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(got, want, "{key}");
        seen += 1;
    }
    assert_eq!(seen, 6, "leading, trailing, linspace at K = 50 and 10");
    // bug 1: leading never reaches T - 1, trailing starts there
    assert_eq!(timesteps(1000, 50, Spacing::Leading).unwrap()[0], 980);
    assert_eq!(timesteps(1000, 50, Spacing::Trailing).unwrap()[0], 999);
}

#[test]
fn single_steps_match_golden() {
    let g = golden("steps.json");
    let s = Schedule::named("linear", 1000).unwrap();
    let dev = Device::Cpu;
    let x_t = vecf(&g["x_t"]);
    let eps = vecf(&g["eps"]);
    let n = x_t.len();
    let xt = Tensor::from_vec(x_t.clone(), (1, n), &dev).unwrap();
    let et = Tensor::from_vec(eps.clone(), (1, n), &dev).unwrap();
    let row = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    for case in g["cases"].as_array().unwrap() {
        let (t, t_prev) = (
            case["t"].as_u64().unwrap() as usize,
            case["t_prev"].as_u64().unwrap() as usize,
        );
        let x0 = x0_from_eps(&xt, &et, &[ddpm_level(&s, t)]).unwrap();
        close(&format!("x0_pred t={t}"), &row(&x0), &vecf(&case["x0_pred"]));
        // DDIM from t to the looked-up t_prev (a two-entry subsequence)
        let chain = ReverseChain::discrete(&s, &[t, t_prev]).unwrap();
        let ddim = ddim_step(&chain.steps[0], &x0, &et, 0.0, None).unwrap();
        close(
            &format!("ddim_prev t={t}"),
            &row(&ddim),
            &vecf(&case["ddim_prev"]),
        );
        // DDPM posterior q(x_{t-1} | x_t, x_0) of the full chain at t
        let full = ReverseChain::discrete(&s, &[t, t - 1]).unwrap();
        let mean = posterior_mean(&full.steps[0], &xt, &x0).unwrap();
        close(
            &format!("ddpm_mean t={t}"),
            &row(&mean),
            &vecf(&case["ddpm_mean"]),
        );
        let mean_c = posterior_mean(&full.steps[0], &xt, &x0.clamp(-1.0, 1.0).unwrap()).unwrap();
        close(
            &format!("ddpm_mean_clipped t={t}"),
            &row(&mean_c),
            &vecf(&case["ddpm_mean_clipped"]),
        );
        close(
            &format!("posterior variance t={t}"),
            &[full.steps[0].posterior_variance],
            &[case["ddpm_posterior_variance"].as_f64().unwrap()],
        );
    }
}

/// A denoiser that predicts a fixed eps for every input (to follow a chain by hand).
struct FixedEps(Tensor);

impl Denoiser for FixedEps {
    fn prediction(&self) -> Prediction {
        Prediction::Eps
    }
    fn output(&self, _x_t: &Tensor, _levels: &[NoiseLevel]) -> diffuse::Result<Tensor> {
        Ok(self.0.clone())
    }
}

#[test]
fn the_last_ddim_step_lands_on_alpha_bar_one() {
    // bug 4: with any spacing, the final step goes to alpha_bar = 1 (x_0 itself), so the
    // output is the x_0 prediction at the last kept timestep.
    let s = Schedule::named("linear", 1000).unwrap();
    for spacing in [
        Spacing::Linspace,
        Spacing::Leading,
        Spacing::Trailing,
        Spacing::Quadratic,
    ] {
        let kept = timesteps(1000, 10, spacing).unwrap();
        let chain = ReverseChain::discrete(&s, &kept).unwrap();
        let last = chain.steps.last().unwrap();
        assert_eq!(last.prev, NoiseLevel::new(1.0, 0.0));
        assert_eq!(last.index, Some(*kept.last().unwrap()));
        let x = Tensor::from_vec(vec![0.3f64, -0.7], (1, 2), &Device::Cpu).unwrap();
        let eps = Tensor::from_vec(vec![1.1f64, 0.4], (1, 2), &Device::Cpu).unwrap();
        let x0 = x0_from_eps(&x, &eps, &[last.level]).unwrap();
        let out = ddim_step(last, &x0, &eps, 0.0, None).unwrap();
        assert_eq!(out.to_vec2::<f64>().unwrap(), x0.to_vec2::<f64>().unwrap());
        // the previous level of every other step is the next kept index, looked up (bug 2)
        for (st, next) in chain.steps.iter().zip(&kept[1..]) {
            assert_eq!(st.prev, ddpm_level(&s, *next));
        }
    }
}

#[test]
fn ddim_with_eta_one_is_ddpm_draw_for_draw() {
    // DDIM eq. 16 with eta = 1 is the DDPM posterior with beta~ (Song et al. 2021, section 4.1);
    // noise is drawn at the same steps, so the samples agree to rounding.
    let s = Schedule::named("cosine", 100).unwrap();
    let chain = ReverseChain::discrete(&s, &(0..100).rev().collect::<Vec<_>>()).unwrap();
    let ddpm = Ddpm::new(chain.clone(), Variance::FixedSmall, 1.0);
    let ddim = Ddim::new(chain, 1.0, 1.0).unwrap();
    let den =
        FixedEps(Tensor::from_vec(vec![0.2f64, -0.1, 0.05, 0.3, 0.0, -0.4], (3, 2), &Device::Cpu).unwrap());
    let run = |sm: &dyn diffuse::samplers::Sampler| {
        sample_batched(sm, &den, 3, &[2], 5, 3, DType::F64, &Device::Cpu, &mut NoObserver)
            .unwrap()
            .x
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    let (a, b) = (run(&ddpm), run(&ddim));
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-10, "{a:?} vs {b:?}");
    }
}

#[test]
fn respaced_ddpm_takes_exactly_k_steps() {
    // bug 3: K that does not divide T, K = T, K = 0 and K > T
    let p = Process::Ddpm(Schedule::named("linear", 1000).unwrap());
    let den = FixedEps(Tensor::zeros((1, 2), DType::F64, &Device::Cpu).unwrap());
    for k in [1usize, 7, 37, 333, 1000] {
        let s = build_sampler(
            SamplerKind::from_name("ddpm").unwrap(),
            &p,
            &SamplerOptions {
                steps: Some(k),
                ..Default::default()
            },
        )
        .unwrap();
        let out = sample_batched(
            s.as_ref(),
            &den,
            1,
            &[2],
            0,
            1,
            DType::F64,
            &Device::Cpu,
            &mut NoObserver,
        )
        .unwrap();
        assert_eq!(out.nfe, k);
    }
    for k in [0usize, 1001] {
        let e = build_sampler(
            SamplerKind::from_name("ddpm").unwrap(),
            &p,
            &SamplerOptions {
                steps: Some(k),
                ..Default::default()
            },
        );
        assert!(e.is_err(), "K = {k}");
    }
}
