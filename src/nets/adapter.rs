//! [`UNetDenoiser`]: a U-Net trained on a discrete variance-preserving schedule, behind the
//! samplers' [`Denoiser`] trait, usable at any noise level of any process.
//!
//! For a state `x = alpha * x_0 + sigma * eps` (VP, VE or the seed-000 process) with
//! `r = sqrt(alpha^2 + sigma^2)`:
//!
//! ```text
//! x_vp = x / r  = (alpha / r) x_0 + (sigma / r) eps       a VP state, alpha_bar = alpha^2 / r^2
//! t    = Schedule::index_for_log_snr(ln(alpha^2 / sigma^2))   (log-SNR is unchanged by the scaling;
//!                                                          fractional, clamped to [0, T-1])
//! out  = unet(x_vp, t)
//! ```
//!
//! - eps prediction: the eps of `x_vp` is the eps of `x`, so `out` is returned as is;
//! - x_0 prediction: likewise;
//! - v prediction: the network predicts `v_vp = (alpha/r) eps - (sigma/r) x_0 = v / r` (Salimans
//!   & Ho 2022's v at the VP level), so the adapter returns `r * out`, the v of the caller's
//!   level `(alpha, sigma)`. For VP levels `r = 1` and nothing changes.
//!
//! The network's timestep index follows [`crate::schedule`] (index 0 is t = 1), which is
//! diffusers' timestep, so diffusers checkpoints need no offset.

use candle_core::{DType, Tensor};

use crate::denoiser::{per_sample, Denoiser, NoiseLevel, Prediction};
use crate::error::{Error, Result};
use crate::nets::unet::UNet;
use crate::schedule::Schedule;

/// A U-Net with the schedule it was trained on and the parameterisation of its output.
#[derive(Clone, Debug)]
pub struct UNetDenoiser {
    /// The network.
    pub unet: UNet,
    /// The discrete schedule whose timestep index the network was trained with.
    pub schedule: Schedule,
    /// What the network predicts.
    pub prediction: Prediction,
}

impl UNetDenoiser {
    /// The adapter (see the module docs).
    pub fn new(unet: UNet, schedule: Schedule, prediction: Prediction) -> Self {
        UNetDenoiser {
            unet,
            schedule,
            prediction,
        }
    }

    /// Per-sample network timesteps and input scales `r = sqrt(alpha^2 + sigma^2)` for `levels`.
    pub fn timesteps_and_scales(&self, levels: &[NoiseLevel]) -> Result<(Vec<f32>, Vec<f64>)> {
        let mut ts = Vec::with_capacity(levels.len());
        let mut rs = Vec::with_capacity(levels.len());
        for (i, l) in levels.iter().enumerate() {
            let r = (l.alpha * l.alpha + l.sigma * l.sigma).sqrt();
            if !(l.alpha >= 0.0 && l.sigma >= 0.0 && r.is_finite() && r > 0.0) {
                return Err(Error::param(
                    "noise level",
                    format!(
                        "sample {i}: alpha = {}, sigma = {}; expected finite, non-negative, not both 0",
                        l.alpha, l.sigma
                    ),
                ));
            }
            ts.push(self.schedule.index_for_log_snr(l.log_snr()) as f32);
            rs.push(r);
        }
        Ok((ts, rs))
    }
}

impl UNetDenoiser {
    /// The network's output at the caller's levels (see the module docs), with one class per
    /// row for a class-conditional network (`None` rows: its null class).
    fn output_classes(
        &self,
        x_t: &Tensor,
        levels: &[NoiseLevel],
        classes: Option<&[Option<usize>]>,
    ) -> Result<Tensor> {
        let (ts, rs) = self.timesteps_and_scales(levels)?;
        let inv_r: Vec<f64> = rs.iter().map(|r| 1.0 / r).collect();
        let x_vp = x_t
            .broadcast_mul(&per_sample(&inv_r, x_t)?)?
            .to_dtype(DType::F32)?;
        let t = Tensor::from_vec(ts, levels.len(), x_t.device())?;
        let out = match (self.unet.num_class_embeds(), classes) {
            (None, None) => self.unet.forward(&x_vp, &t)?,
            (None, Some(_)) => return Err(Error::param(
                "class",
                "the model is unconditional (no class embedding): --class and --guidance-scale do not apply",
            )),
            (Some(_), c) => {
                // no classes asked: the unconditional model (the null class)
                let b = levels.len();
                let all_null = vec![None; b];
                let labels = crate::guidance::label_tensor(
                    c.unwrap_or(&all_null),
                    self.unet.config().null_class,
                    x_t.device(),
                )?;
                self.unet.forward_class(&x_vp, &t, &labels)?
            }
        }
        .to_dtype(x_t.dtype())?;
        match self.prediction {
            Prediction::Eps | Prediction::X0 => Ok(out),
            Prediction::V => Ok(out.broadcast_mul(&per_sample(&rs, x_t)?)?),
        }
    }

    /// The number of real classes of a class-conditional network: the class-embedding rows
    /// less the null row (`None`: unconditional).
    pub fn num_classes(&self) -> Option<usize> {
        let k = self.unet.num_class_embeds()?;
        Some(if self.unet.config().null_class.is_some() {
            k - 1
        } else {
            k
        })
    }
}

impl Denoiser for UNetDenoiser {
    fn prediction(&self) -> Prediction {
        self.prediction
    }

    /// The output; a class-conditional network runs unconditionally (its null class).
    fn output(&self, x_t: &Tensor, levels: &[NoiseLevel]) -> Result<Tensor> {
        self.output_classes(x_t, levels, None)
    }
}

impl crate::guidance::ClassConditional for UNetDenoiser {
    fn prediction(&self) -> Prediction {
        self.prediction
    }

    fn num_classes(&self) -> usize {
        UNetDenoiser::num_classes(self).unwrap_or(0)
    }

    fn has_null_class(&self) -> bool {
        self.unet.config().null_class.is_some()
    }

    fn output_with_classes(
        &self,
        x_t: &Tensor,
        levels: &[NoiseLevel],
        classes: &[Option<usize>],
    ) -> Result<Tensor> {
        self.output_classes(x_t, levels, Some(classes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::denoiser::x0_from_v;
    use crate::nets::{unet, UNetConfig};
    use candle_core::Device;

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn setup(prediction: Prediction) -> (UNetDenoiser, Tensor) {
        let cfg = UNetConfig::preset("demo", 1, 8).unwrap();
        let (net, _) = unet::init_params(&cfg, 1, &Device::Cpu).unwrap();
        let schedule = Schedule::named("linear", 1000).unwrap();
        let x = crate::rng::Rng::new(5)
            .randn(&[1, 1, 8, 8], &Device::Cpu)
            .unwrap();
        (UNetDenoiser::new(net, schedule, prediction), x)
    }

    #[test]
    fn vp_level_on_the_grid_is_the_plain_network() {
        let (d, x) = setup(Prediction::Eps);
        let level = NoiseLevel::from_alpha_bar(d.schedule.alpha_bar[137]);
        let (ts, rs) = d.timesteps_and_scales(&[level]).unwrap();
        assert!(
            (ts[0] - 137.0).abs() < 1e-4 && (rs[0] - 1.0).abs() < 1e-12,
            "{ts:?} {rs:?}"
        );
        let direct = d
            .unet
            .forward(&x, &Tensor::new(&[137f32], &Device::Cpu).unwrap())
            .unwrap();
        // The only difference is the f32 timestep 137 vs 137 +- 1e-6 from the log-SNR inversion.
        assert!(max_abs(&d.output(&x, &[level]).unwrap(), &direct) < 1e-4);
    }

    #[test]
    fn ve_levels_are_rescaled_and_v_is_scaled_back() {
        // A VE state at (alpha, sigma) = (1, 1.5) and the VP state x / r at the same log-SNR
        // describe the same x_0 and eps: eps/x0 outputs must agree, v outputs differ by r,
        // and the x_0 recovered from v must be the same from both.
        let ve = NoiseLevel::new(1.0, 1.5);
        let r = (1.0f64 + 2.25).sqrt();
        let vp = NoiseLevel::new(1.0 / r, 1.5 / r);
        for p in [Prediction::Eps, Prediction::X0, Prediction::V] {
            let (d, x) = setup(p);
            let x_vp = (&x / r).unwrap();
            let out_ve = d.output(&x, &[ve]).unwrap();
            let out_vp = d.output(&x_vp, &[vp]).unwrap();
            let scale = if p == Prediction::V { r } else { 1.0 };
            // f32 network, outputs of order 1: 1e-5 absolute.
            assert!(max_abs(&out_ve, &(&out_vp * scale).unwrap()) < 1e-5, "{p:?}");
            if p == Prediction::V {
                let a = x0_from_v(&x, &out_ve, &[ve]).unwrap();
                let b = x0_from_v(&x_vp, &out_vp, &[vp]).unwrap();
                assert!(max_abs(&a, &b) < 1e-5);
            }
        }
    }

    /// Sampling calls the network on plain tensors: with weights that are plain tensors too
    /// (as loaded for sampling), no autodiff graph is recorded, so the fused ops keep nothing
    /// for a backward pass.
    #[test]
    fn sampling_records_no_graph() {
        let cfg = UNetConfig::preset("demo", 1, 8).unwrap();
        let (_, vm) = unet::init_params(&cfg, 1, &Device::Cpu).unwrap();
        let tensors = vm
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect();
        let net = unet::from_tensors(&cfg, tensors, &Device::Cpu).unwrap();
        let d = UNetDenoiser::new(net, Schedule::named("linear", 1000).unwrap(), Prediction::Eps);
        let x = crate::rng::Rng::new(5)
            .randn(&[2, 1, 8, 8], &Device::Cpu)
            .unwrap();
        let level = NoiseLevel::from_alpha_bar(0.5);
        let out = d.output(&x, &[level, level]).unwrap();
        assert!(!out.track_op());
        // the same network on Vars does record one (the check above has teeth)
        let (trainable, _) = unet::init_params(&cfg, 1, &Device::Cpu).unwrap();
        let t = Tensor::new(&[3f32, 3.0], &Device::Cpu).unwrap();
        assert!(trainable.forward(&x, &t).unwrap().track_op());
    }

    #[test]
    fn bad_levels_are_errors() {
        let (d, x) = setup(Prediction::Eps);
        assert!(d.output(&x, &[NoiseLevel::new(0.0, 0.0)]).is_err());
        assert!(d.output(&x, &[NoiseLevel::new(f64::NAN, 1.0)]).is_err());
        assert!(d
            .output(&x, &[NoiseLevel::new(1.0, 1.0), NoiseLevel::new(1.0, 1.0)])
            .is_err());
    }
}
