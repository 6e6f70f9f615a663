//! The U-Net's parameterised layers: plain structs holding their tensors, fetched from a
//! `VarBuilder` under PyTorch's names (`weight`, `bias`), whose forward passes call
//! [`crate::ops`] (so the fast CPU kernels run underneath).
//!
//! Initialisation hints are PyTorch's defaults, as in diffusers' `UNet2DModel`: convolution
//! and linear weights and biases `U(-1/sqrt(fan_in), 1/sqrt(fan_in))` (`kaiming_uniform_` with
//! `a = sqrt(5)`), GroupNorm `gamma = 1`, `beta = 0`. They are drawn by
//! [`crate::nets::unet::init_params`] from the seeded [`crate::rng::Rng`], never by candle.

use candle_core::Tensor;
use candle_nn::{Init, VarBuilder};

use crate::error::{Error, Result};
use crate::ops;
use crate::rng::Rng;

/// PyTorch's default bound `1/sqrt(fan_in)` for weights and biases of conv and linear layers.
fn torch_default(fan_in: usize) -> Init {
    let b = 1.0 / (fan_in.max(1) as f64).sqrt();
    Init::Uniform { lo: -b, up: b }
}

/// `y = x w^T + b`, weight `[out, in]`.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    /// Parameters `weight` `[out_dim, in_dim]`, `bias` `[out_dim]`.
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        let init = torch_default(in_dim);
        Ok(Linear {
            weight: vb.get_with_hints((out_dim, in_dim), "weight", init)?,
            bias: vb.get_with_hints(out_dim, "bias", init)?,
        })
    }

    /// `(weight, bias)`.
    pub fn params(&self) -> (&Tensor, &Tensor) {
        (&self.weight, &self.bias)
    }

    /// `[..., in] -> [..., out]` (any number of leading dimensions).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = *dims
            .last()
            .ok_or_else(|| Error::param("linear input", "a scalar"))?;
        let rows = x.elem_count() / in_dim.max(1);
        let y = ops::linear(&x.reshape((rows, in_dim))?, &self.weight, Some(&self.bias))?;
        let mut out = dims;
        if let Some(last) = out.last_mut() {
            *last = self.weight.dim(0)?;
        }
        Ok(y.reshape(out)?)
    }
}

/// 2-D convolution with bias, square kernel, zero padding on all sides.
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    /// Parameters `weight` `[c_out, c_in, k, k]`, `bias` `[c_out]`.
    pub fn new(
        vb: VarBuilder,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let init = torch_default(c_in * kernel * kernel);
        Ok(Conv2d {
            weight: vb.get_with_hints((c_out, c_in, kernel, kernel), "weight", init)?,
            bias: vb.get_with_hints(c_out, "bias", init)?,
            stride,
            padding,
        })
    }

    /// `[N, c_in, H, W] -> [N, c_out, H', W']`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(ops::conv2d(
            x,
            &self.weight,
            Some(&self.bias),
            self.stride,
            self.padding,
        )?)
    }

    /// `(weight, bias)`.
    pub fn params(&self) -> (&Tensor, &Tensor) {
        (&self.weight, &self.bias)
    }

    /// `conv(x) + channel_bias + residual` as one fused op (see [`ops::conv2d_add`]).
    pub fn forward_add(&self, x: &Tensor, add: &ops::ConvAdd<'_>) -> Result<Tensor> {
        Ok(ops::conv2d_add(
            x,
            &self.weight,
            Some(&self.bias),
            self.stride,
            self.padding,
            add,
        )?)
    }

    /// `conv(silu(norm(x) [* (1 + scale) + shift])) + channel_bias + residual` as one fused op
    /// (see [`ops::group_norm_silu_conv2d`]); `scale_shift` is `([N, C_in], [N, C_in])`.
    pub fn forward_norm_add(
        &self,
        x: &Tensor,
        norm: &GroupNorm,
        scale_shift: Option<(&Tensor, &Tensor)>,
        add: &ops::ConvAdd<'_>,
    ) -> Result<Tensor> {
        Ok(ops::group_norm_silu_conv2d(
            x,
            &norm.silu_spec(scale_shift),
            &self.weight,
            Some(&self.bias),
            self.stride,
            self.padding,
            add,
        )?)
    }
}

/// GroupNorm with affine parameters (Wu & He 2018), `groups` dividing the channel count.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// Parameters `weight` (gamma, init 1) and `bias` (beta, init 0), both `[channels]`.
    /// `channels % groups != 0` is an error naming the layer.
    pub fn new(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if groups == 0 || channels % groups != 0 {
            return Err(Error::param(
                "norm_num_groups",
                format!(
                    "GroupNorm '{}' has {channels} channels, which {groups} groups do not divide evenly",
                    vb.prefix()
                ),
            ));
        }
        Ok(GroupNorm {
            weight: vb.get_with_hints(channels, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(channels, "bias", Init::Const(0.0))?,
            groups,
            eps,
        })
    }

    /// `(gamma, beta)`.
    pub fn params(&self) -> (&Tensor, &Tensor) {
        (&self.weight, &self.bias)
    }

    /// The number of groups and epsilon.
    pub fn groups_eps(&self) -> (usize, f64) {
        (self.groups, self.eps)
    }

    /// The normalisation as the first stage of a fused convolution: `silu(norm(x))`, or
    /// `silu(norm(x) * (1 + scale) + shift)` with `scale_shift`.
    pub fn silu_spec<'a>(&'a self, scale_shift: Option<(&'a Tensor, &'a Tensor)>) -> ops::GroupNormSilu<'a> {
        ops::GroupNormSilu {
            groups: self.groups,
            gamma: &self.weight,
            beta: &self.bias,
            eps: self.eps,
            scale_shift,
        }
    }

    /// `group_norm(x)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(ops::group_norm(
            x,
            self.groups,
            &self.weight,
            &self.bias,
            self.eps,
        )?)
    }

    /// `silu(group_norm(x))`, fused.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        Ok(ops::group_norm_silu(
            x,
            self.groups,
            &self.weight,
            &self.bias,
            self.eps,
        )?)
    }

    /// `silu(group_norm(x) * (1 + scale) + shift)`, fused; `scale`, `shift` are `[N, C]`.
    pub fn forward_scale_shift_silu(&self, x: &Tensor, scale: &Tensor, shift: &Tensor) -> Result<Tensor> {
        Ok(ops::group_norm_scale_shift_silu(
            x,
            self.groups,
            &self.weight,
            &self.bias,
            scale,
            shift,
            self.eps,
        )?)
    }
}

/// Inverted dropout: in training each element is kept with probability `1 - p` and scaled by
/// `1 / (1 - p)` (so the expectation is unchanged); in evaluation it is the identity. The mask
/// is seeded by one draw of the caller's [`Rng`] ([`ops::DropoutMask`]).
#[derive(Clone, Copy, Debug)]
pub struct Dropout {
    p: f64,
}

impl Dropout {
    /// Dropout with probability `p` in [0, 1).
    pub fn new(p: f64) -> Self {
        Dropout { p }
    }

    /// Whether [`Dropout::forward`] changes anything: training mode (`rng` given) and `p > 0`.
    pub fn active(&self, training: bool) -> bool {
        training && self.p > 0.0
    }

    /// The mask [`Dropout::forward`] applies to a tensor of `shape`, drawn from `rng`
    /// ([`ops::DropoutMask::draw`]: one draw of `rng` seeds it); `None` when dropout is inactive
    /// (no `rng`, or `p = 0`). The tensor's rows (first dimension) are rows `rng.first_row() ..`
    /// of the batch the mask is drawn for ([`Rng::for_rows`]; 0 outside data-parallel training).
    pub fn mask(&self, shape: &[usize], rng: Option<&mut Rng>) -> Option<ops::DropoutMask> {
        let rng = rng?;
        if self.p <= 0.0 {
            return None;
        }
        let len: usize = shape.iter().product();
        let row: usize = shape.iter().skip(1).product();
        let offset = rng.first_row() as usize * row;
        Some(ops::DropoutMask::draw_at(offset, len, self.p, rng))
    }

    /// Applies dropout when `rng` is given (training) and `p > 0`; returns `x` otherwise.
    pub fn forward(&self, x: &Tensor, rng: Option<&mut Rng>) -> Result<Tensor> {
        match self.mask(x.dims(), rng) {
            Some(mask) => {
                let m = mask.to_tensor(x.dims(), x.device())?.to_dtype(x.dtype())?;
                Ok((x * m)?)
            }
            None => Ok(x.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn dropout_keeps_expectation_and_is_identity_in_eval() {
        let x = Tensor::ones((4, 1000), DType::F32, &Device::Cpu).unwrap();
        let d = Dropout::new(0.25);
        let eval = d.forward(&x, None).unwrap();
        assert_eq!(eval.sum_all().unwrap().to_scalar::<f32>().unwrap(), 4000.0);
        let mut rng = Rng::new(7);
        let y = d
            .forward(&x, Some(&mut rng))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // Every entry is 0 or 1/(1 - 0.25) = 4/3.
        assert!(y.iter().all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6));
        let dropped = y.iter().filter(|&&v| v == 0.0).count() as f64 / 4000.0;
        // Binomial(4000, 0.25): std of the fraction = sqrt(0.25 * 0.75 / 4000) = 0.0068; 5 sigma.
        assert!((dropped - 0.25).abs() < 0.035, "{dropped}");
        // The same seed gives the same mask.
        let y2 = d
            .forward(&x, Some(&mut Rng::new(7)))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(y, y2);
    }

    #[test]
    fn group_norm_rejects_uneven_groups_by_name() {
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        let e = GroupNorm::new(vb.pp("down_blocks.0.resnets.0.norm1"), 32, 48, 1e-5).unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("down_blocks.0.resnets.0.norm1") && e.contains("48"),
            "{e}"
        );
    }
}
