//! The U-Net's blocks, built as diffusers builds them (`diffusers/models/resnet.py`,
//! `attention_processor.py`, `downsampling.py`, `upsampling.py`, `unets/unet_2d_blocks.py`),
//! with the same parameter names, so a diffusers state dict maps onto them one to one.
//!
//! Notation (diffusers name -> meaning): `temb` -> the time embedding after the MLP;
//! `time_emb_proj` -> the per-block linear map of `silu(temb)`; `output_scale_factor` /
//! `rescale_output_factor` -> the divisor of a block's residual sum (the mid block's
//! `mid_block_scale_factor`, else 1).

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::error::{Error, Result};
use crate::nets::config::{ResampleType, TimeScaleShift};
use crate::nets::layers::{Conv2d, Dropout, GroupNorm, Linear};
use crate::ops;
use crate::rng::Rng;

/// What every ResNet block of one network shares.
#[derive(Clone, Copy, Debug)]
pub struct ResnetParams {
    /// GroupNorm groups (`norm_num_groups`).
    pub groups: usize,
    /// GroupNorm epsilon (`norm_eps`).
    pub eps: f64,
    /// Dropout probability.
    pub dropout: f64,
    /// Time conditioning by addition or by scale and shift.
    pub time_scale_shift: TimeScaleShift,
    /// Width of the time embedding.
    pub temb_channels: usize,
    /// Divisor of the residual sum.
    pub output_scale_factor: f64,
}

/// Resampling inside a ResNet block (diffusers' `up=True` / `down=True`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resample {
    /// Nearest-neighbour 2x upsampling of both paths after `norm1`.
    Up,
    /// 2x2 average pooling of both paths after `norm1`.
    Down,
}

/// diffusers' `ResnetBlock2D` (Ho et al. 2020, appendix B; Nichol & Dhariwal 2021 for scale-shift):
///
/// ```text
/// h   = conv1(silu(norm1(x)))
/// t   = time_emb_proj(silu(temb))
/// h   = silu(norm2(h + t))                          default
/// h   = silu(norm2(h) * (1 + scale) + shift)       scale_shift, (scale, shift) = chunk(t, 2)
/// out = (shortcut(x) + conv2(dropout(h))) / output_scale_factor
/// ```
///
/// `shortcut` is a 1x1 convolution when the channel count changes, else the identity.
#[derive(Clone, Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    dropout: Dropout,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    out_channels: usize,
    time_scale_shift: TimeScaleShift,
    output_scale_factor: f64,
    resample: Option<Resample>,
}

impl ResnetBlock2D {
    /// A block `c_in -> c_out` with parameters `norm1`, `conv1`, `time_emb_proj`, `norm2`,
    /// `conv2` and (when `c_in != c_out`) `conv_shortcut`.
    pub fn new(
        vb: VarBuilder,
        c_in: usize,
        c_out: usize,
        p: &ResnetParams,
        resample: Option<Resample>,
    ) -> Result<Self> {
        let proj_out = match p.time_scale_shift {
            TimeScaleShift::Default => c_out,
            TimeScaleShift::ScaleShift => 2 * c_out,
        };
        Ok(ResnetBlock2D {
            norm1: GroupNorm::new(vb.pp("norm1"), p.groups, c_in, p.eps)?,
            conv1: Conv2d::new(vb.pp("conv1"), c_in, c_out, 3, 1, 1)?,
            time_emb_proj: Linear::new(vb.pp("time_emb_proj"), p.temb_channels, proj_out)?,
            norm2: GroupNorm::new(vb.pp("norm2"), p.groups, c_out, p.eps)?,
            dropout: Dropout::new(p.dropout),
            conv2: Conv2d::new(vb.pp("conv2"), c_out, c_out, 3, 1, 1)?,
            conv_shortcut: if c_in != c_out {
                Some(Conv2d::new(vb.pp("conv_shortcut"), c_in, c_out, 1, 1, 0)?)
            } else {
                None
            },
            out_channels: c_out,
            time_scale_shift: p.time_scale_shift,
            output_scale_factor: p.output_scale_factor,
            resample,
        })
    }

    /// `x` `[N, c_in, H, W]`, `temb_act = silu(temb)` `[N, temb_channels]` -> `[N, c_out, H', W']`.
    /// `rng` is given in training (dropout on) and `None` in evaluation.
    ///
    /// Computed as two fused ops ([`ops::group_norm_silu_conv2d`]), with the shortcut's 1x1
    /// convolution (when there is one) in between:
    /// `h = conv1(silu(norm1(x))) + t` (the time projection as a per-channel bias; with
    /// scale-shift, `t` goes into the second norm instead) and
    /// `out = conv2(silu(norm2(h))) + shortcut(x)`. With dropout active (training, `p > 0`) the
    /// second stage is split in three: `silu(norm2(h))`, the dropout mask, `conv2(..) + shortcut`.
    /// With resampling, `norm1` + SiLU, the resampling of both paths, then `conv1` + `t`.
    pub fn forward(&self, x: &Tensor, temb_act: &Tensor, rng: Option<&mut Rng>) -> Result<Tensor> {
        self.forward_cat(x, None, temb_act, rng)
    }

    /// [`ResnetBlock2D::forward`] on `cat([x, skip], channels)` (an up block's input), without
    /// materialising the concatenation where the whole block runs as one op
    /// ([`ops::resnet_block`]: no resampling).
    pub fn forward_cat(
        &self,
        x: &Tensor,
        skip: Option<&Tensor>,
        temb_act: &Tensor,
        rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let _prof = ops::profile::scope("unet.resnet");
        let t = self.time_emb_proj.forward(temb_act)?;
        let c = self.out_channels;
        if self.resample.is_none() {
            let (n, _, h, w) = x.dims4()?;
            let mask = self.dropout.mask(&[n, c, h, w], rng);
            let (scale, shift);
            let time = match self.time_scale_shift {
                TimeScaleShift::Default => ops::TimeCondition::Bias(&t),
                TimeScaleShift::ScaleShift => {
                    scale = t.narrow(1, 0, c)?.contiguous()?;
                    shift = t.narrow(1, c, c)?.contiguous()?;
                    ops::TimeCondition::ScaleShift(&scale, &shift)
                }
            };
            let (groups, eps) = self.norm1.groups_eps();
            let p = ops::ResnetBlockParams {
                groups,
                eps,
                norm1: self.norm1.params(),
                conv1: self.conv1.params(),
                time,
                norm2: self.norm2.params(),
                conv2: self.conv2.params(),
                shortcut: self.conv_shortcut.as_ref().map(|c| c.params()),
                dropout_mask: mask.as_ref(),
                output_scale_factor: self.output_scale_factor,
            };
            return Ok(ops::resnet_block(x, skip, &p)?);
        }
        let x = &match skip {
            Some(s) => Tensor::cat(&[x, s], 1)?,
            None => x.clone(),
        };
        let (bias, scale_shift) = match self.time_scale_shift {
            TimeScaleShift::Default => (Some(&t), None),
            TimeScaleShift::ScaleShift => (
                None,
                Some((t.narrow(1, 0, c)?.contiguous()?, t.narrow(1, c, c)?.contiguous()?)),
            ),
        };
        let with_bias = ops::ConvAdd {
            channel_bias: bias,
            residual: None,
        };
        let (h, skip) = match self.resample {
            None => (
                self.conv1.forward_norm_add(x, &self.norm1, None, &with_bias)?,
                x.clone(),
            ),
            Some(r) => {
                let resample = |v: &Tensor| -> Result<Tensor> {
                    Ok(match r {
                        Resample::Up => ops::upsample_nearest2x(v)?,
                        Resample::Down => ops::avg_pool2x(v)?,
                    })
                };
                let h = resample(&self.norm1.forward_silu(x)?)?;
                (self.conv1.forward_add(&h, &with_bias)?, resample(x)?)
            }
        };
        let residual = match &self.conv_shortcut {
            Some(sc) => sc.forward(&skip)?,
            None => skip,
        };
        let scale_shift = scale_shift.as_ref().map(|(a, b)| (a, b));
        let with_residual = ops::ConvAdd {
            channel_bias: None,
            residual: Some(&residual),
        };
        let out = if self.dropout.active(rng.is_some()) {
            let h = match scale_shift {
                None => self.norm2.forward_silu(&h)?,
                Some((scale, shift)) => self.norm2.forward_scale_shift_silu(&h, scale, shift)?,
            };
            self.conv2
                .forward_add(&self.dropout.forward(&h, rng)?, &with_residual)?
        } else {
            self.conv2
                .forward_norm_add(&h, &self.norm2, scale_shift, &with_residual)?
        };
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            Ok((out / self.output_scale_factor)?)
        }
    }
}

/// diffusers' `Attention` as the UNet2D blocks use it (`_from_deprecated_attn_block`):
/// multi-head self-attention over the H*W positions with a residual connection,
///
/// ```text
/// h   = group_norm(x)                     (when the block has one)
/// q, k, v = to_q(h), to_k(h), to_v(h)     per position, split into heads of head_dim
/// o   = softmax(q k^T / sqrt(head_dim)) v (Vaswani et al. 2017, eq. 1)
/// out = (to_out.0(o) + x) / rescale_output_factor
/// ```
///
/// `heads = channels / head_dim` (integer division, as diffusers); `head_dim = None` is one head.
#[derive(Clone, Debug)]
pub struct AttentionBlock {
    group_norm: Option<GroupNorm>,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    rescale_output_factor: f64,
}

impl AttentionBlock {
    /// Parameters `group_norm` (when `groups` is given), `to_q`, `to_k`, `to_v`, `to_out.0`.
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        head_dim: Option<usize>,
        groups: Option<usize>,
        eps: f64,
        rescale_output_factor: f64,
    ) -> Result<Self> {
        let head_dim = head_dim.unwrap_or(channels);
        let heads = channels / head_dim.max(1);
        if heads == 0 {
            return Err(Error::param(
                "attention_head_dim",
                format!(
                    "attention '{}' has {channels} channels, fewer than one head of {head_dim}",
                    vb.prefix()
                ),
            ));
        }
        let inner = heads * head_dim;
        Ok(AttentionBlock {
            group_norm: match groups {
                Some(g) => Some(GroupNorm::new(vb.pp("group_norm"), g, channels, eps)?),
                None => None,
            },
            to_q: Linear::new(vb.pp("to_q"), channels, inner)?,
            to_k: Linear::new(vb.pp("to_k"), channels, inner)?,
            to_v: Linear::new(vb.pp("to_v"), channels, inner)?,
            to_out: Linear::new(vb.pp("to_out").pp("0"), inner, channels)?,
            heads,
            rescale_output_factor,
        })
    }

    /// `[N, C, H, W] -> [N, C, H, W]` ([`ops::attention_block`]).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _prof = ops::profile::scope("unet.attention");
        let norm = self.group_norm.as_ref().map(|g| {
            let (groups, eps) = g.groups_eps();
            let (gamma, beta) = g.params();
            (groups, eps, gamma, beta)
        });
        let p = ops::AttentionBlockParams {
            norm,
            q: self.to_q.params(),
            k: self.to_k.params(),
            v: self.to_v.params(),
            out: self.to_out.params(),
            heads: self.heads,
            rescale_output_factor: self.rescale_output_factor,
        };
        Ok(ops::attention_block(x, &p)?)
    }
}

/// diffusers' `Downsample2D(use_conv=True)`: a 3x3 stride-2 convolution, parameters `conv.*`.
/// Padding 1 on every side, or with `padding = 0` one zero row and column at the bottom and
/// right only (diffusers' convention, used by the DDPM checkpoints).
#[derive(Clone, Debug)]
pub struct Downsample2D {
    conv: Conv2d,
    pad_bottom_right: bool,
}

impl Downsample2D {
    /// `channels -> channels`, halving H and W.
    pub fn new(vb: VarBuilder, channels: usize, padding: usize) -> Result<Self> {
        Ok(Downsample2D {
            conv: Conv2d::new(vb.pp("conv"), channels, channels, 3, 2, padding)?,
            pad_bottom_right: padding == 0,
        })
    }

    /// `[N, C, H, W] -> [N, C, H/2, W/2]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.pad_bottom_right {
            let x = x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(x)
        }
    }
}

/// diffusers' `Upsample2D(use_conv=True)`: nearest 2x, then a 3x3 convolution (`conv.*`).
#[derive(Clone, Debug)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    /// `channels -> channels`, doubling H and W.
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Upsample2D {
            conv: Conv2d::new(vb.pp("conv"), channels, channels, 3, 1, 1)?,
        })
    }

    /// `[N, C, H, W] -> [N, C, 2H, 2W]` ([`ops::upsample_conv2d`]).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (w, b) = self.conv.params();
        Ok(ops::upsample_conv2d(x, w, b)?)
    }
}

/// The resampler at the end of a down or up block (`downsamplers.0` / `upsamplers.0`).
#[derive(Clone, Debug)]
pub enum Resampler {
    /// A stride-2 convolution down.
    ConvDown(Downsample2D),
    /// Nearest 2x then a convolution up.
    ConvUp(Upsample2D),
    /// A ResNet block that pools or upsamples inside (`downsample_type/upsample_type = resnet`).
    Resnet(ResnetBlock2D),
}

impl Resampler {
    fn forward(&self, x: &Tensor, temb_act: &Tensor, rng: Option<&mut Rng>) -> Result<Tensor> {
        match self {
            Resampler::ConvDown(d) => d.forward(x),
            Resampler::ConvUp(u) => u.forward(x),
            Resampler::Resnet(r) => r.forward(x, temb_act, rng),
        }
    }
}

/// Attention settings shared by the blocks of one network.
#[derive(Clone, Copy, Debug)]
pub struct AttentionParams {
    /// `attention_head_dim` (None: one head).
    pub head_dim: Option<usize>,
    /// GroupNorm groups of the attention's own norm (None: no norm).
    pub groups: Option<usize>,
    /// GroupNorm epsilon.
    pub eps: f64,
}

/// `DownBlock2D` / `AttnDownBlock2D`: `resnets.i` (each followed by `attentions.i` in the
/// attention variant), then `downsamplers.0` unless this is the last level. Every resnet (or
/// attention) output and the downsampler output are pushed as skips.
#[derive(Clone, Debug)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<AttentionBlock>,
    downsampler: Option<Resampler>,
}

impl DownBlock {
    /// `layers` ResNet blocks `c_in -> c_out -> ... -> c_out`. `downsample` is `None` on the last
    /// level; `padding` is `downsample_padding`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: VarBuilder,
        c_in: usize,
        c_out: usize,
        layers: usize,
        p: &ResnetParams,
        attention: Option<&AttentionParams>,
        downsample: Option<ResampleType>,
        padding: usize,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(layers);
        let mut attentions = Vec::new();
        for i in 0..layers {
            let cin = if i == 0 { c_in } else { c_out };
            resnets.push(ResnetBlock2D::new(vb.pp("resnets").pp(i), cin, c_out, p, None)?);
            if let Some(a) = attention {
                attentions.push(AttentionBlock::new(
                    vb.pp("attentions").pp(i),
                    c_out,
                    a.head_dim,
                    a.groups,
                    a.eps,
                    p.output_scale_factor,
                )?);
            }
        }
        let vd = vb.pp("downsamplers").pp(0);
        let downsampler = match downsample {
            None => None,
            Some(ResampleType::Conv) => Some(Resampler::ConvDown(Downsample2D::new(vd, c_out, padding)?)),
            Some(ResampleType::Resnet) => Some(Resampler::Resnet(ResnetBlock2D::new(
                vd,
                c_out,
                c_out,
                p,
                Some(Resample::Down),
            )?)),
        };
        Ok(DownBlock {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// Runs the block, pushing its skip tensors onto `skips`.
    pub fn forward(
        &self,
        x: &Tensor,
        temb_act: &Tensor,
        mut rng: Option<&mut Rng>,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, r) in self.resnets.iter().enumerate() {
            h = r.forward(&h, temb_act, rng.as_deref_mut())?;
            if let Some(a) = self.attentions.get(i) {
                h = a.forward(&h)?;
            }
            skips.push(h.clone());
        }
        if let Some(d) = &self.downsampler {
            h = d.forward(&h, temb_act, rng)?;
            skips.push(h.clone());
        }
        Ok(h)
    }
}

/// `UpBlock2D` / `AttnUpBlock2D`: `layers_per_block + 1` ResNet blocks, each on the
/// concatenation `[h, skip]` (channels first `h`, then the skip, as `torch.cat(dim=1)`), each
/// followed by attention in the attention variant, then `upsamplers.0` unless last.
#[derive(Clone, Debug)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<AttentionBlock>,
    upsampler: Option<Resampler>,
}

impl UpBlock {
    /// diffusers' channel bookkeeping: resnet `j` takes `(j == 0 ? prev_out : c_out)` channels
    /// of `h` plus `(j == last ? c_in : c_out)` skip channels.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: VarBuilder,
        c_in: usize,
        c_out: usize,
        prev_out: usize,
        layers: usize,
        p: &ResnetParams,
        attention: Option<&AttentionParams>,
        upsample: Option<ResampleType>,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(layers);
        let mut attentions = Vec::new();
        for j in 0..layers {
            let skip = if j == layers - 1 { c_in } else { c_out };
            let h_in = if j == 0 { prev_out } else { c_out };
            resnets.push(ResnetBlock2D::new(
                vb.pp("resnets").pp(j),
                h_in + skip,
                c_out,
                p,
                None,
            )?);
            if let Some(a) = attention {
                attentions.push(AttentionBlock::new(
                    vb.pp("attentions").pp(j),
                    c_out,
                    a.head_dim,
                    a.groups,
                    a.eps,
                    p.output_scale_factor,
                )?);
            }
        }
        let vu = vb.pp("upsamplers").pp(0);
        let upsampler = match upsample {
            None => None,
            Some(ResampleType::Conv) => Some(Resampler::ConvUp(Upsample2D::new(vu, c_out)?)),
            Some(ResampleType::Resnet) => Some(Resampler::Resnet(ResnetBlock2D::new(
                vu,
                c_out,
                c_out,
                p,
                Some(Resample::Up),
            )?)),
        };
        Ok(UpBlock {
            resnets,
            attentions,
            upsampler,
        })
    }

    /// Runs the block, popping one skip per ResNet block from the end of `skips`.
    pub fn forward(
        &self,
        x: &Tensor,
        temb_act: &Tensor,
        mut rng: Option<&mut Rng>,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (j, r) in self.resnets.iter().enumerate() {
            // The U-Net pushes exactly as many skips as its up blocks pop (an invariant of
            // the construction), so this only fails on a bug.
            let s = skips
                .pop()
                .ok_or_else(|| Error::Numerical("U-Net skip stack exhausted".into()))?;
            h = r.forward_cat(&h, Some(&s), temb_act, rng.as_deref_mut())?;
            if let Some(a) = self.attentions.get(j) {
                h = a.forward(&h)?;
            }
        }
        if let Some(u) = &self.upsampler {
            h = u.forward(&h, temb_act, rng)?;
        }
        Ok(h)
    }
}

/// `UNetMidBlock2D`: `resnets.0`, then (`attentions.0`, `resnets.1`); the attention is
/// optional (`add_attention`). Its blocks divide by `mid_block_scale_factor`.
#[derive(Clone, Debug)]
pub struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attention: Option<AttentionBlock>,
}

impl MidBlock {
    /// A mid block on `channels` channels (`p.output_scale_factor` = `mid_block_scale_factor`).
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        p: &ResnetParams,
        attention: Option<&AttentionParams>,
    ) -> Result<Self> {
        let r0 = ResnetBlock2D::new(vb.pp("resnets").pp(0), channels, channels, p, None)?;
        let attention = match attention {
            Some(a) => Some(AttentionBlock::new(
                vb.pp("attentions").pp(0),
                channels,
                a.head_dim,
                a.groups,
                a.eps,
                p.output_scale_factor,
            )?),
            None => None,
        };
        let r1 = ResnetBlock2D::new(vb.pp("resnets").pp(1), channels, channels, p, None)?;
        Ok(MidBlock {
            resnets: vec![r0, r1],
            attention,
        })
    }

    /// `[N, C, H, W] -> [N, C, H, W]`.
    pub fn forward(&self, x: &Tensor, temb_act: &Tensor, mut rng: Option<&mut Rng>) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, r) in self.resnets.iter().enumerate() {
            if i == 1 {
                if let Some(a) = &self.attention {
                    h = a.forward(&h)?;
                }
            }
            h = r.forward(&h, temb_act, rng.as_deref_mut())?;
        }
        Ok(h)
    }
}
