//! The sinusoidal timestep embedding and the MLP that follows it.
//!
//! ```text
//! half      = dim / 2
//! freq_i    = exp(-ln(max_period) * i / (half - downscale_freq_shift)),  i = 0 .. half-1
//! emb(t)    = [sin(t * freq_0 .. t * freq_{half-1}), cos(t * freq_0 .. t * freq_{half-1})]
//! ```
//!
//! (Vaswani et al. 2017, section 3.5; Ho et al. 2020, appendix B), with diffusers'
//! `get_timestep_embedding` options: `flip_sin_to_cos` puts the cosines first, an odd `dim`
//! gets one zero column at the end, and `downscale_freq_shift` is the `s` in `half - s`.
//! Sources differ here (see docs/STYLE.md): the DDPM code and diffusers' DDPM checkpoints divide by
//! `half - 1` (shift 1), diffusers' default is `half` (shift 0); we follow the config.
//!
//! Precision follows PyTorch: frequencies and `t * freq` are f32, so a fractional or integer
//! timestep gives the same embedding as diffusers to float rounding.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use crate::error::{Error, Result};
use crate::nets::layers::Linear;
use crate::ops;

/// `max_period` of the embedding (10000, as in the Transformer and DDPM).
pub const MAX_PERIOD: f64 = 10000.0;

/// The frequencies `freq_i = exp(-ln(max_period) * i / (half - shift))`, computed in f32
/// operation by operation as PyTorch does (so they agree with diffusers bit for bit where
/// `exp` does).
pub fn frequencies(dim: usize, downscale_freq_shift: f64) -> Vec<f32> {
    let half = dim / 2;
    let neg_log_period = -(MAX_PERIOD.ln()) as f32;
    let denom = (half as f64 - downscale_freq_shift) as f32;
    (0..half)
        .map(|i| ((neg_log_period * i as f32) / denom).exp())
        .collect()
}

/// Sinusoidal embedding of `timesteps` (`[B]`, any float dtype, fractional allowed) ->
/// `[B, dim]` f32 (see the module docs for the formula).
pub fn timestep_embedding(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
) -> Result<Tensor> {
    let b = timesteps.dims1().map_err(|_| {
        Error::param(
            "timesteps",
            format!("expected shape [B], got {:?}", timesteps.dims()),
        )
    })?;
    let half = dim / 2;
    if half == 0 {
        return Err(Error::param(
            "embedding dim",
            format!("got {dim}, expected at least 2"),
        ));
    }
    let freqs = Tensor::from_vec(
        frequencies(dim, downscale_freq_shift),
        (1, half),
        timesteps.device(),
    )?;
    let args = timesteps
        .to_dtype(DType::F32)?
        .reshape((b, 1))?
        .broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let mut parts = if flip_sin_to_cos {
        vec![cos, sin]
    } else {
        vec![sin, cos]
    };
    if dim % 2 == 1 {
        parts.push(Tensor::zeros((b, 1), DType::F32, timesteps.device())?);
    }
    Ok(Tensor::cat(&parts, 1)?)
}

/// diffusers' `TimestepEmbedding`: `linear_2(silu(linear_1(emb)))`.
#[derive(Clone, Debug)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    /// `in_dim -> time_embed_dim -> time_embed_dim`; parameters `linear_1.*`, `linear_2.*`.
    pub fn new(vb: VarBuilder, in_dim: usize, time_embed_dim: usize) -> Result<Self> {
        Ok(TimestepEmbedding {
            linear_1: Linear::new(vb.pp("linear_1"), in_dim, time_embed_dim)?,
            linear_2: Linear::new(vb.pp("linear_2"), time_embed_dim, time_embed_dim)?,
        })
    }

    /// `[B, in_dim] -> [B, time_embed_dim]`.
    pub fn forward(&self, emb: &Tensor) -> Result<Tensor> {
        let h = ops::silu(&self.linear_1.forward(emb)?)?;
        self.linear_2.forward(&h)
    }
}

/// A class-embedding table, diffusers' `class_embedding = nn.Embedding(num_class_embeds,
/// time_embed_dim)` of `UNet2DModel` (`class_embed_type = None`): row `c` is added to the time
/// embedding of every sample of class `c`, `emb = time_embedding(t) + class_embedding[c]`
/// (Ho & Salimans 2022 condition on the class this way; one extra row is the null class of
/// classifier-free guidance). Initialised as PyTorch's `nn.Embedding`, N(0, 1).
#[derive(Clone, Debug)]
pub struct ClassEmbedding {
    weight: Tensor,
}

impl ClassEmbedding {
    /// Parameter `weight` `[num_class_embeds, dim]`.
    pub fn new(vb: VarBuilder, num_class_embeds: usize, dim: usize) -> Result<Self> {
        Ok(ClassEmbedding {
            weight: vb.get_with_hints(
                (num_class_embeds, dim),
                "weight",
                candle_nn::Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            )?,
        })
    }

    /// The number of rows (classes, the null class included).
    pub fn rows(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Rows `labels` (`[B]`, u32 class ids) -> `[B, dim]`; an id past the table is an error.
    pub fn forward(&self, labels: &Tensor) -> Result<Tensor> {
        let ids: Vec<u32> = labels.to_dtype(DType::U32)?.to_vec1()?;
        if let Some(bad) = ids.iter().find(|&&c| c as usize >= self.rows()) {
            return Err(Error::param(
                "class label",
                format!(
                    "got class {bad}, the model has {} class embeddings (0..{})",
                    self.rows(),
                    self.rows() - 1
                ),
            ));
        }
        Ok(self.weight.embedding(&labels.to_dtype(DType::U32)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn embedding_exact_values() {
        // dim 4, shift 1: half = 2, freqs = exp(-ln(1e4) * [0, 1] / (2 - 1)) = [1, 1e-4].
        let t = Tensor::new(&[0.0f32, 1.0, 2.5], &Device::Cpu).unwrap();
        let e = timestep_embedding(&t, 4, false, 1.0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let want = |t: f64| [t.sin(), (t * 1e-4).sin(), t.cos(), (t * 1e-4).cos()];
        for (row, &tv) in e.iter().zip(&[0.0, 1.0, 2.5]) {
            for (g, w) in row.iter().zip(want(tv)) {
                // f32 arithmetic: |error| of sin/cos at arguments <= 2.5 is a few 1e-8.
                assert!(
                    (*g as f64 - w).abs() < 1e-6,
                    "t = {tv}: {row:?} vs {:?}",
                    want(tv)
                );
            }
        }
        // flip_sin_to_cos swaps the halves; an odd dim adds a zero column; shift 0 divides by half.
        let f = timestep_embedding(&t, 5, true, 0.0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        // half = 2, freqs = [1, exp(-ln(1e4)/2)] = [1, 0.01]; t = 1: [cos 1, cos .01, sin 1, sin .01, 0]
        let w = [1f64.cos(), 0.01f64.cos(), 1f64.sin(), 0.01f64.sin(), 0.0];
        for (g, w) in f[1].iter().zip(w) {
            assert!((*g as f64 - w).abs() < 1e-6, "{:?}", f[1]);
        }
    }

    #[test]
    fn frequencies_follow_the_shift() {
        // dim 8, shift 0: freq_i = 10000^(-i/4) = 1, 0.1, 0.01, 0.001.
        let f = frequencies(8, 0.0);
        for (g, w) in f.iter().zip([1.0, 0.1, 0.01, 0.001]) {
            assert!(((*g as f64) - w).abs() / w < 1e-6, "{f:?}");
        }
    }
}
