//! A small residual MLP denoiser for low-dimensional data, usable by every forward process.
//!
//! One network serves the discrete DDPM process (any schedule), the VP, sub-VP and VE
//! continuous processes and the seed-000 variance-exploding process, because it sees the noise
//! level only through quantities every process shares. For `x_t = alpha * x_0 + sigma * eps`:
//!
//! ```text
//! r      = sqrt(alpha^2 + sigma^2)
//! x_vp   = x_t / r = (alpha / r) * x_0 + (sigma / r) * eps     a variance-preserving state
//!                                                             with alpha_bar = alpha^2 / r^2
//! lambda = ln(alpha^2 / sigma^2)                              log-SNR (Kingma et al. 2021)
//! eps_hat = net(x_vp, lambda)
//! ```
//!
//! `eps` is the same quantity in `x_t` and in `x_vp`, so the eps prediction needs no conversion:
//! a VE state at sigma and a DDPM state with the same log-SNR give the same output (tested).
//!
//! The network (names are the `VarMap` / safetensors names):
//!
//! ```text
//! emb     = [sin(f_k * lambda'), cos(f_k * lambda')]_k,  lambda' = clamp(lambda, -20, 20),
//!           f_k = f_min * (f_max / f_min)^(k / (K - 1)), K = embed_dim / 2,
//!           f_min = 1/64, f_max = 4
//! temb    = time_embed.linear_2(silu(time_embed.linear_1(emb)))                  [B, H]
//! temb    = temb + class_embed[c]        (class-conditional: K + 1 rows, row K the null class)
//! h       = input(x_vp)                                                          [B, H]
//! h       = h + blocks.i.linear_2(silu(blocks.i.linear_1(silu(h)) + blocks.i.time_proj(silu(temb))))
//! eps_hat = output(silu(h))                   (output weights start at zero)       [B, D]
//! ```
//!
//! The frequencies: log-SNR spans about 24 units in use ([-12, 12]); the slowest feature has a
//! period 2 pi * 64 = 402, so sin(lambda / 64) is monotone (nearly linear) over the whole range
//! and tells noise levels apart globally; the fastest (period 1.6) resolves changes of ~0.1. The
//! DDPM timestep embedding (Ho et al. 2020, after Vaswani et al. 2017) uses the same sin/cos form
//! on t in [0, 1000) with f_k from 1 down to 1/10000; the clamp at +-20 (SNR from 2e-9 to 5e8) only
//! keeps the embedding finite at sigma = 0 or alpha = 0, far outside the trained range.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::init::Init;
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::denoiser::{Denoiser, NoiseLevel, Prediction};
use crate::error::{Error, Result};
use crate::ops;

/// The log-SNR range the embedding accepts; values outside are clamped (see the module docs).
pub const LOG_SNR_CLAMP: f64 = 20.0;
/// The slowest embedding frequency.
pub const F_MIN: f64 = 1.0 / 64.0;
/// The fastest embedding frequency.
pub const F_MAX: f64 = 4.0;

/// The MLP's shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpConfig {
    /// Data dimension D.
    pub dim: usize,
    /// Hidden width H.
    pub hidden: usize,
    /// Number of residual blocks.
    pub layers: usize,
    /// Size of the sinusoidal log-SNR embedding (even, >= 4).
    pub embed_dim: usize,
    /// Number of classes K of a class-conditional model (`None`: unconditional). The class
    /// table has K + 1 rows; row K is the null class (classifier-free guidance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_classes: Option<usize>,
}

impl MlpConfig {
    /// Width 128, 3 residual blocks, a 32-dimensional embedding, for `dim`-dimensional data.
    pub fn new(dim: usize) -> Self {
        MlpConfig {
            dim,
            hidden: crate::config::defaults::toy::HIDDEN,
            layers: crate::config::defaults::toy::LAYERS,
            embed_dim: crate::config::defaults::toy::EMBED_DIM,
            num_classes: None,
        }
    }

    /// The number of scalar parameters of the network (`None` if it overflows): the time
    /// embedding's two layers, the input layer, 3 layers per block, the output layer and the
    /// class table (K + 1 rows of width H) of a class-conditional model.
    pub fn parameter_count(&self) -> Option<usize> {
        let linear = |i: usize, o: usize| i.checked_mul(o)?.checked_add(o);
        let h = self.hidden;
        let block = linear(h, h)?.checked_mul(3)?;
        let classes = match self.num_classes {
            Some(k) => k.checked_add(1)?.checked_mul(h)?,
            None => 0,
        };
        [
            classes,
            linear(self.embed_dim, h)?,
            linear(h, h)?,
            linear(self.dim, h)?,
            block.checked_mul(self.layers)?,
            linear(h, self.dim)?,
        ]
        .iter()
        .try_fold(0usize, |a, &b| a.checked_add(b))
    }

    /// Checks the sizes.
    pub fn validate(&self) -> Result<()> {
        if self.dim == 0 {
            return Err(Error::param("dim", "got 0, expected the data dimension (>= 1)"));
        }
        if self.hidden == 0 {
            return Err(Error::param("hidden", "got 0, expected a width >= 1"));
        }
        if self.num_classes == Some(0) {
            return Err(Error::param(
                "num_classes",
                "got 0, expected at least 1 class (or unconditional)",
            ));
        }
        if self.embed_dim < 4 || self.embed_dim % 2 != 0 {
            return Err(Error::param(
                "embed_dim",
                format!("got {}, expected an even number >= 4", self.embed_dim),
            ));
        }
        Ok(())
    }
}

/// `y = x w^T + b` with weights from a `VarBuilder`.
struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    /// candle-nn's default initialisation (Kaiming normal weights, uniform bias), or zeros.
    fn new(inputs: usize, outputs: usize, zero: bool, vb: VarBuilder) -> Result<Self> {
        let (w_init, b_init) = if zero {
            (Init::Const(0.0), Init::Const(0.0))
        } else {
            let bound = 1.0 / (inputs as f64).sqrt();
            (
                candle_nn::init::DEFAULT_KAIMING_NORMAL,
                Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            )
        };
        Ok(Linear {
            weight: vb.get_with_hints((outputs, inputs), "weight", w_init)?,
            bias: vb.get_with_hints(outputs, "bias", b_init)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(ops::linear(x, &self.weight, Some(&self.bias))?)
    }

    fn detach(&self) -> Self {
        Linear {
            weight: self.weight.detach(),
            bias: self.bias.detach(),
        }
    }
}

struct Block {
    linear_1: Linear,
    time_proj: Linear,
    linear_2: Linear,
}

/// The network: `eps_hat = net(x_vp, lambda)`.
pub struct Mlp {
    config: MlpConfig,
    frequencies: Tensor,
    time_1: Linear,
    time_2: Linear,
    input: Linear,
    blocks: Vec<Block>,
    output: Linear,
    /// `[K + 1, H]` class embeddings (class-conditional models).
    class_embed: Option<Tensor>,
}

impl Mlp {
    /// Builds the network from `vb` (new variables are created with their initialisation;
    /// existing ones, e.g. loaded from a checkpoint, are used as they are).
    pub fn new(config: &MlpConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let h = config.hidden;
        let k = config.embed_dim / 2;
        let freqs: Vec<f32> = (0..k)
            .map(|i| (F_MIN * (F_MAX / F_MIN).powf(i as f64 / (k - 1) as f64)) as f32)
            .collect();
        let blocks = (0..config.layers)
            .map(|i| {
                let b = vb.pp(format!("blocks.{i}"));
                Ok(Block {
                    linear_1: Linear::new(h, h, false, b.pp("linear_1"))?,
                    time_proj: Linear::new(h, h, false, b.pp("time_proj"))?,
                    linear_2: Linear::new(h, h, false, b.pp("linear_2"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Mlp {
            frequencies: Tensor::from_vec(freqs, (1, k), vb.device())?,
            time_1: Linear::new(config.embed_dim, h, false, vb.pp("time_embed.linear_1"))?,
            time_2: Linear::new(h, h, false, vb.pp("time_embed.linear_2"))?,
            input: Linear::new(config.dim, h, false, vb.pp("input"))?,
            blocks,
            output: Linear::new(h, config.dim, true, vb.pp("output"))?,
            class_embed: match config.num_classes {
                Some(k) => Some(vb.pp("class_embed").get_with_hints(
                    (k + 1, h),
                    "weight",
                    Init::Randn {
                        mean: 0.0,
                        stdev: 1.0,
                    },
                )?),
                None => None,
            },
            config: config.clone(),
        })
    }

    /// The shape.
    pub fn config(&self) -> &MlpConfig {
        &self.config
    }

    /// The same network with its weights detached from autodiff (sharing their storage, so
    /// later optimizer updates still show): for inference, where tracking gradients through a
    /// sampler's hundreds of steps would keep the whole graph in memory.
    pub fn detach(&self) -> Self {
        Mlp {
            config: self.config.clone(),
            frequencies: self.frequencies.clone(),
            time_1: self.time_1.detach(),
            time_2: self.time_2.detach(),
            input: self.input.detach(),
            blocks: self
                .blocks
                .iter()
                .map(|b| Block {
                    linear_1: b.linear_1.detach(),
                    time_proj: b.time_proj.detach(),
                    linear_2: b.linear_2.detach(),
                })
                .collect(),
            output: self.output.detach(),
            class_embed: self.class_embed.as_ref().map(|t| t.detach()),
        }
    }

    /// The sinusoidal embedding `[sin(f_k lambda'), cos(f_k lambda')]` of log-SNR values
    /// `lambda` (shape [B], f32), lambda' clamped to +-[`LOG_SNR_CLAMP`].
    pub fn embed(&self, log_snr: &Tensor) -> Result<Tensor> {
        let lam = log_snr
            .clamp(-LOG_SNR_CLAMP as f32, LOG_SNR_CLAMP as f32)?
            .unsqueeze(1)?;
        let args = lam.broadcast_mul(&self.frequencies)?;
        Ok(Tensor::cat(&[args.sin()?, args.cos()?], 1)?)
    }

    /// `eps_hat` for variance-preserving inputs `x_vp` [B, D] at log-SNR `log_snr` [B] (f32);
    /// a class-conditional model takes `classes` [B] (u32, `K` the null class), and without them
    /// runs unconditionally (the null class).
    pub fn forward(&self, x_vp: &Tensor, log_snr: &Tensor) -> Result<Tensor> {
        self.forward_class(x_vp, log_snr, None)
    }

    /// [`Mlp::forward`] with class labels (see there).
    pub fn forward_class(&self, x_vp: &Tensor, log_snr: &Tensor, classes: Option<&Tensor>) -> Result<Tensor> {
        let mut temb = self
            .time_2
            .forward(&ops::silu(&self.time_1.forward(&self.embed(log_snr)?)?)?)?;
        match (&self.class_embed, classes) {
            (Some(table), labels) => {
                let k = table.dim(0)? - 1;
                let b = x_vp.dim(0)?;
                let labels = match labels {
                    Some(l) => l.to_dtype(DType::U32)?,
                    None => Tensor::from_vec(vec![k as u32; b], b, x_vp.device())?,
                };
                let ids: Vec<u32> = labels.to_vec1()?;
                if let Some(bad) = ids.iter().find(|&&c| c as usize > k) {
                    return Err(Error::param(
                        "class",
                        format!(
                            "class {bad} is out of range: the model has {k} classes (0..{})",
                            k - 1
                        ),
                    ));
                }
                temb = (temb + table.embedding(&labels)?)?;
            }
            (None, Some(_)) => {
                return Err(Error::param(
                    "class",
                    "class labels given to an unconditional model",
                ));
            }
            (None, None) => {}
        }
        let temb_act = ops::silu(&temb)?;
        let mut h = self.input.forward(x_vp)?;
        for b in &self.blocks {
            let r = b.linear_1.forward(&ops::silu(&h)?)?;
            let r = (r + b.time_proj.forward(&temb_act)?)?;
            let r = b.linear_2.forward(&ops::silu(&r)?)?;
            h = (h + r)?;
        }
        self.output.forward(&ops::silu(&h)?)
    }
}

/// The variance-preserving view of a noise level: `(1 / r, log-SNR)`, `r = sqrt(alpha^2 + sigma^2)`.
fn vp_view(level: &NoiseLevel) -> Result<(f64, f64)> {
    let (a, s) = (level.alpha, level.sigma);
    if !(a.is_finite() && s.is_finite() && a >= 0.0 && s >= 0.0 && (a > 0.0 || s > 0.0)) {
        return Err(Error::param(
            "noise level",
            format!("alpha = {a}, sigma = {s}; expected finite, non-negative and not both zero"),
        ));
    }
    let r = a.hypot(s);
    // 2 ln(a / s) without overflow; +-inf at sigma = 0 or alpha = 0 (clamped in the embedding)
    let log_snr = if s == 0.0 {
        f64::INFINITY
    } else if a == 0.0 {
        f64::NEG_INFINITY
    } else {
        2.0 * (a.ln() - s.ln())
    };
    Ok((1.0 / r, log_snr))
}

/// The MLP as a [`Denoiser`] (eps parameterisation) for any process.
pub struct MlpDenoiser {
    mlp: Mlp,
    device: Device,
}

impl MlpDenoiser {
    /// Wraps a network for inference (its weights are detached from autodiff, see [`Mlp::detach`]).
    pub fn new(mlp: &Mlp, device: &Device) -> Self {
        MlpDenoiser {
            mlp: mlp.detach(),
            device: device.clone(),
        }
    }

    /// The network.
    pub fn mlp(&self) -> &Mlp {
        &self.mlp
    }

    /// Loads a trained model from a run directory (or a checkpoint directory): the architecture
    /// from `state.json` (`config.task.model`), the EMA weights when `use_ema`, else the raw ones.
    pub fn load(dir: &Path, use_ema: bool) -> Result<Self> {
        Self::load_on(dir, use_ema, &Device::Cpu)
    }

    /// [`MlpDenoiser::load`] onto `device`.
    pub fn load_on(dir: &Path, use_ema: bool, device: &Device) -> Result<Self> {
        use crate::train::checkpoint;
        let ckpt = checkpoint::locate(dir)?;
        let state = checkpoint::read_state(&ckpt)?;
        let model_json = state.config.pointer("/task/model").cloned().ok_or_else(|| {
            Error::bad_input(
                ckpt.join(checkpoint::STATE_FILE),
                "config.task.model is missing: not a checkpoint of the MLP denoiser",
            )
        })?;
        let state_file = ckpt.join(checkpoint::STATE_FILE);
        let config: MlpConfig = serde_json::from_value(model_json)
            .map_err(|e| Error::bad_input(&state_file, format!("config.task.model: {e}")))?;
        config
            .validate()
            .map_err(|e| Error::bad_input(&state_file, format!("config.task.model: {e}")))?;
        let file = if use_ema {
            checkpoint::EMA_FILE
        } else {
            checkpoint::MODEL_FILE
        };
        let tensors = checkpoint::read_f32_tensors(&ckpt, file, device)?;
        // The network is built (and its variables allocated) only once the file is known to
        // hold exactly the parameters the config describes.
        let in_file: usize = tensors.values().map(|t| t.elem_count()).sum();
        if config.parameter_count() != Some(in_file) {
            return Err(Error::bad_input(
                ckpt.join(file),
                format!(
                    "holds {in_file} values, but the MLP of config.task.model in {} ({config:?}) has {} parameters",
                    checkpoint::STATE_FILE,
                    config
                        .parameter_count()
                        .map_or("more than 2^64".to_string(), |n| n.to_string())
                ),
            ));
        }
        let varmap = VarMap::new();
        // Build the variables (their initial values are discarded) and load the file into them,
        // which checks that every name and shape matches.
        let mlp = Mlp::new(&config, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
        checkpoint::load_vars(&varmap, &tensors, &ckpt.join(file))?;
        Ok(MlpDenoiser::new(&mlp, device))
    }
}

impl MlpDenoiser {
    /// `eps_hat(x_t) = net(x_t / r, lambda, classes)` for `x_t` of shape [B, D] (any float dtype;
    /// the output has the input's dtype). `classes`: one per row, `None` the null class.
    fn eps(&self, x_t: &Tensor, levels: &[NoiseLevel], classes: Option<&[Option<usize>]>) -> Result<Tensor> {
        let (b, d) = x_t.dims2()?;
        if d != self.mlp.config.dim {
            return Err(Error::param(
                "x_t",
                format!(
                    "has dimension {d}, the model was trained on dimension {}",
                    self.mlp.config.dim
                ),
            ));
        }
        if levels.len() != b {
            return Err(Error::param(
                "noise levels",
                format!("got {} levels for a batch of {b}", levels.len()),
            ));
        }
        let views = levels.iter().map(vp_view).collect::<Result<Vec<_>>>()?;
        let inv_r: Vec<f32> = views.iter().map(|v| v.0 as f32).collect();
        let lam: Vec<f32> = views.iter().map(|v| v.1 as f32).collect();
        let x = x_t.to_device(&self.device)?.to_dtype(DType::F32)?;
        let x_vp = x.broadcast_mul(&Tensor::from_vec(inv_r, (b, 1), &self.device)?)?;
        let labels = match classes {
            Some(c) => Some(crate::guidance::label_tensor(
                c,
                self.mlp.config.num_classes,
                &self.device,
            )?),
            None => None,
        };
        let eps = self
            .mlp
            .forward_class(&x_vp, &Tensor::from_vec(lam, b, &self.device)?, labels.as_ref())?;
        Ok(eps.to_dtype(x_t.dtype())?.to_device(x_t.device())?)
    }
}

impl Denoiser for MlpDenoiser {
    fn prediction(&self) -> Prediction {
        Prediction::Eps
    }

    /// `eps_hat(x_t) = net(x_t / r, lambda)` (a class-conditional model: its null class).
    fn output(&self, x_t: &Tensor, levels: &[NoiseLevel]) -> Result<Tensor> {
        self.eps(x_t, levels, None)
    }
}

impl crate::guidance::ClassConditional for MlpDenoiser {
    fn prediction(&self) -> Prediction {
        Prediction::Eps
    }

    fn num_classes(&self) -> usize {
        self.mlp.config.num_classes.unwrap_or(0)
    }

    fn has_null_class(&self) -> bool {
        self.mlp.config.num_classes.is_some()
    }

    fn output_with_classes(
        &self,
        x_t: &Tensor,
        levels: &[NoiseLevel],
        classes: &[Option<usize>],
    ) -> Result<Tensor> {
        if self.mlp.config.num_classes.is_none() {
            return Err(Error::param(
                "class",
                "the model is unconditional (trained without labels): --class and --guidance-scale do not apply",
            ));
        }
        self.eps(x_t, levels, Some(classes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::init::seeded_var_builder;

    fn net(seed: u64) -> (VarMap, Mlp) {
        let varmap = VarMap::new();
        let cfg = MlpConfig {
            dim: 2,
            hidden: 16,
            layers: 2,
            embed_dim: 8,
            num_classes: None,
        };
        let mlp = Mlp::new(&cfg, seeded_var_builder(&varmap, seed, &Device::Cpu)).unwrap();
        (varmap, mlp)
    }

    /// Sets the (zero-initialised) output layer to non-zero values so tests see the network.
    fn nonzero_output(varmap: &VarMap) {
        for (name, var) in varmap.data().lock().unwrap().iter() {
            if name.starts_with("output") {
                let n = var.as_tensor().elem_count();
                let v: Vec<f32> = (0..n).map(|i| 0.1 * (i as f32 + 1.0)).collect();
                var.set(&Tensor::from_vec(v, var.as_tensor().shape(), &Device::Cpu).unwrap())
                    .unwrap();
            }
        }
    }

    #[test]
    fn embedding_by_hand() {
        let (_, mlp) = net(0);
        // K = 4 frequencies 1/64 * 256^(k/3): 1/64, 1/10.079, 0.63, 4 (f_max / f_min = 256)
        let lam = Tensor::new(&[0.0f32, 2.0, 100.0], &Device::Cpu).unwrap();
        let e = mlp.embed(&lam).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(e[0], vec![0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]);
        let f = [
            1.0 / 64.0,
            256f64.powf(1.0 / 3.0) / 64.0,
            256f64.powf(2.0 / 3.0) / 64.0,
            4.0,
        ];
        for k in 0..4 {
            // f32 sin/cos of arguments up to 8 (2 * 4): 1e-6 is a few ulps
            assert!((e[1][k] as f64 - (2.0 * f[k]).sin()).abs() < 1e-6);
            assert!((e[1][k + 4] as f64 - (2.0 * f[k]).cos()).abs() < 1e-6);
            // lambda = 100 is clamped to 20; arguments up to 80 lose ~1e-5 to f32 rounding
            assert!((e[2][k] as f64 - (20.0 * f[k]).sin()).abs() < 2e-5);
        }
    }

    /// The same log-SNR and the same VP-scaled input give the same eps whatever the process:
    /// a VE level (1, 3) at x and a DDPM level with alpha_bar = 1/10 at x / sqrt(10).
    #[test]
    fn every_process_with_the_same_log_snr_gives_the_same_eps() {
        let (varmap, mlp) = net(1);
        nonzero_output(&varmap);
        let den = MlpDenoiser::new(&mlp, &Device::Cpu);
        let x = Tensor::new(&[[0.9f64, -2.1], [3.0, 0.3]], &Device::Cpu).unwrap();
        let ve = [NoiseLevel::new(1.0, 3.0), NoiseLevel::new(1.0, 0.5)];
        let r: [f64; 2] = [10f64.sqrt(), 1.25f64.sqrt()];
        let vp = [NoiseLevel::from_alpha_bar(0.1), NoiseLevel::from_alpha_bar(0.8)];
        let x_vp = x
            .broadcast_div(&Tensor::new(&[[r[0]], [r[1]]], &Device::Cpu).unwrap())
            .unwrap();
        let a = den.output(&x, &ve).unwrap();
        let b = den.output(&x_vp, &vp).unwrap();
        assert_eq!(a.dtype(), DType::F64);
        let diff = (a - &b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        // identical up to f32 rounding of the scaled input and of log-SNR (~1e-7 relative per
        // op, accumulated over a few hundred multiply-adds per output: ~1e-5 relative)
        assert!(diff < 1e-5 * scale.max(1.0), "{diff} (outputs up to {scale})");
        assert!(scale > 0.1, "the outputs are not trivially zero: {scale}");
        // a different log-SNR changes the output (the conditioning reaches the network)
        let c = den
            .output(&x_vp, &[NoiseLevel::from_alpha_bar(0.5), vp[1]])
            .unwrap();
        let d = (c - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(d > 1e-3, "{d}");
        // sigma = 0 and alpha = 0 stay finite (clamped embedding); bad levels are errors
        let e = den
            .output(&x, &[NoiseLevel::new(1.0, 0.0), NoiseLevel::new(0.0, 1.0)])
            .unwrap();
        crate::denoiser::check_finite(&e, "eps").unwrap();
        assert!(den.output(&x, &[NoiseLevel::new(0.0, 0.0), ve[1]]).is_err());
        assert!(den.output(&x, &ve[..1]).is_err());
    }

    /// The denoiser's weights are detached (a sampler's steps do not build a graph), but a
    /// gradient with respect to the input still flows (autodiff divergence for likelihoods).
    #[test]
    fn inference_does_not_track_weights_but_input_gradients_flow() {
        let (varmap, mlp) = net(3);
        nonzero_output(&varmap);
        let den = MlpDenoiser::new(&mlp, &Device::Cpu);
        let x = Tensor::new(&[[0.5f32, -0.5]], &Device::Cpu).unwrap();
        let level = [NoiseLevel::from_alpha_bar(0.5)];
        let out = den.output(&x, &level).unwrap();
        assert!(!out.track_op(), "inference output keeps a graph");
        // d(sum eps)/dx by autodiff against central differences (h = 1e-2 in f32: the quotient's
        // error is O(h^2 f''') plus f32 rounding ~6e-8 * |f| / h; relative 1e-3 covers both,
        // while a wrong input scaling or a lost path would be off by O(1))
        let xv = candle_core::Var::from_tensor(&x).unwrap();
        let g = den
            .output(xv.as_tensor(), &level)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g = g.get(xv.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        let f = |dx: f32, dy: f32| {
            let p = Tensor::new(&[[0.5f32 + dx, -0.5 + dy]], &Device::Cpu).unwrap();
            den.output(&p, &level)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let h = 1e-2f32;
        let fd = [
            (f(h, 0.0) - f(-h, 0.0)) / (2.0 * h),
            (f(0.0, h) - f(0.0, -h)) / (2.0 * h),
        ];
        assert!(
            fd[0].abs() + fd[1].abs() > 1e-2,
            "the network's output depends on x: {fd:?}"
        );
        for k in 0..2 {
            let scale = fd[0].abs().max(fd[1].abs());
            assert!((g[0][k] - fd[k]).abs() < 1e-3 * scale, "{:?} vs {fd:?}", g[0]);
        }
    }

    #[test]
    fn parameter_names_and_zero_output() {
        let (varmap, mlp) = net(2);
        let mut names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
        names.sort();
        assert!(names.contains(&"blocks.1.time_proj.weight".to_string()));
        assert!(names.contains(&"time_embed.linear_1.weight".to_string()));
        assert_eq!(names.len(), 2 * (3 * 2 + 2 + 1 + 1)); // (blocks * 3 + time 2 + in + out) * (w, b)
                                                          // the output layer starts at zero, so the untrained eps is 0
        let x = Tensor::new(&[[1f32, 2.0]], &Device::Cpu).unwrap();
        let out = mlp
            .forward(&x, &Tensor::new(&[0f32], &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(out.to_vec2::<f32>().unwrap(), vec![vec![0.0, 0.0]]);
        assert!(MlpConfig {
            embed_dim: 5,
            ..MlpConfig::new(2)
        }
        .validate()
        .is_err());
    }
}
