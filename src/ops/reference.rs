//! The stock-candle composition of every op in [`crate::ops`]: the reference the fast kernels
//! are tested against, and the path used on non-CPU devices.

use candle_core::{DType, Result, Tensor, D};

use super::{AttentionBlockParams, ConvAdd, GroupNormSilu, ResnetBlockParams, TimeCondition};

/// See [`crate::ops::conv2d`].
pub fn conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
    let y = x.conv2d(w, padding, stride, 1, 1)?;
    match b {
        Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
        None => Ok(y),
    }
}

/// See [`crate::ops::conv2d_add`].
pub fn conv2d_add(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    padding: usize,
    add: &ConvAdd<'_>,
) -> Result<Tensor> {
    let y = conv2d(x, w, b, stride, padding)?;
    let y = match add.channel_bias {
        Some(cb) => add_channel_bias(&y, cb)?,
        None => y,
    };
    match add.residual {
        Some(r) => y.add(r),
        None => Ok(y),
    }
}

/// See [`crate::ops::group_norm_silu_conv2d`].
pub fn group_norm_silu_conv2d(
    x: &Tensor,
    norm: &GroupNormSilu<'_>,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    padding: usize,
    add: &ConvAdd<'_>,
) -> Result<Tensor> {
    let h = match norm.scale_shift {
        None => group_norm_silu(x, norm.groups, norm.gamma, norm.beta, norm.eps)?,
        Some((scale, shift)) => {
            group_norm_scale_shift_silu(x, norm.groups, norm.gamma, norm.beta, scale, shift, norm.eps)?
        }
    };
    conv2d_add(&h, w, b, stride, padding, add)
}

/// See [`crate::ops::group_norm`].
pub fn group_norm(x: &Tensor, groups: usize, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if groups == 0 || c % groups != 0 {
        candle_core::bail!("group_norm: {c} channels cannot be split into {groups} groups evenly");
    }
    let xs = x.reshape((n, groups, (c / groups) * h * w))?;
    let x_dtype = xs.dtype();
    let xs = xs.to_dtype(DType::F32)?;
    let mean = xs.mean_keepdim(D::Minus1)?;
    let xc = xs.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(x_dtype)?;
    let xn = xn.reshape((n, c, h, w))?;
    xn.broadcast_mul(&gamma.reshape((1, c, 1, 1))?)?
        .broadcast_add(&beta.reshape((1, c, 1, 1))?)
}

/// See [`crate::ops::group_norm_silu`].
pub fn group_norm_silu(x: &Tensor, groups: usize, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    silu(&group_norm(x, groups, gamma, beta, eps)?)
}

/// See [`crate::ops::group_norm_scale_shift_silu`].
pub fn group_norm_scale_shift_silu(
    x: &Tensor,
    groups: usize,
    gamma: &Tensor,
    beta: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let (n, c, _, _) = x.dims4()?;
    let h = group_norm(x, groups, gamma, beta, eps)?;
    let scale = (scale.reshape((n, c, 1, 1))? + 1.0)?;
    let h = h
        .broadcast_mul(&scale)?
        .broadcast_add(&shift.reshape((n, c, 1, 1))?)?;
    silu(&h)
}

/// See [`crate::ops::silu`].
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.silu()
}

/// See [`crate::ops::add_channel_bias`].
pub fn add_channel_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (n, c) = bias.dims2()?;
    x.broadcast_add(&bias.reshape((n, c, 1, 1))?)
}

/// See [`crate::ops::upsample_nearest2x`].
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    x.upsample_nearest2d(2 * h, 2 * w)
}

/// See [`crate::ops::avg_pool2x`].
pub fn avg_pool2x(x: &Tensor) -> Result<Tensor> {
    // candle's avg_pool2d floors odd sizes but its backward then upsamples the gradient to the
    // odd size, sending it to the wrong pixels: odd sizes are rejected instead.
    super::resample::check_even(x.dims(), "avg_pool2x")?;
    x.avg_pool2d(2)
}

/// See [`crate::ops::attention()`].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let att = (q.matmul(&k.t()?)? * scale)?;
    // Not `candle_nn::ops::softmax_last_dim`: that op has no backward, so q and k would get
    // no gradient. Subtracting the (detached) row maximum leaves softmax unchanged.
    let max = att.max_keepdim(D::Minus1)?.detach();
    let num = att.broadcast_sub(&max)?.exp()?;
    let att = num.broadcast_div(&num.sum_keepdim(D::Minus1)?)?;
    att.matmul(v)
}

/// See [`crate::ops::linear`].
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.matmul(&w.t()?)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// See [`crate::ops::resnet_block`].
pub fn resnet_block(x: &Tensor, skip: Option<&Tensor>, p: &ResnetBlockParams<'_>) -> Result<Tensor> {
    let x_in = match skip {
        Some(s) => Tensor::cat(&[x, s], 1)?,
        None => x.clone(),
    };
    let h = group_norm_silu(&x_in, p.groups, p.norm1.0, p.norm1.1, p.eps)?;
    let h = conv2d(&h, p.conv1.0, Some(p.conv1.1), 1, 1)?;
    let g = match p.time {
        TimeCondition::Bias(t) => {
            group_norm_silu(&add_channel_bias(&h, t)?, p.groups, p.norm2.0, p.norm2.1, p.eps)?
        }
        TimeCondition::ScaleShift(scale, shift) => {
            group_norm_scale_shift_silu(&h, p.groups, p.norm2.0, p.norm2.1, scale, shift, p.eps)?
        }
    };
    let g = match p.dropout_mask {
        Some(m) => (&g * m.to_tensor(g.dims(), g.device())?.to_dtype(g.dtype())?)?,
        None => g,
    };
    let h = conv2d(&g, p.conv2.0, Some(p.conv2.1), 1, 1)?;
    let residual = match p.shortcut {
        Some((w, b)) => conv2d(&x_in, w, Some(b), 1, 0)?,
        None => x_in,
    };
    (residual + h)? / p.output_scale_factor
}

/// See [`crate::ops::upsample_conv2d`].
pub fn upsample_conv2d(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    conv2d(&upsample_nearest2x(x)?, w, Some(b), 1, 1)
}

/// See [`crate::ops::attention_block`].
pub fn attention_block(x: &Tensor, p: &AttentionBlockParams<'_>) -> Result<Tensor> {
    let (n, c, hh, ww) = x.dims4()?;
    let l = hh * ww;
    let inner = p.q.0.dim(0)?;
    if p.heads == 0 || inner % p.heads != 0 {
        candle_core::bail!(
            "attention block: {inner} inner channels cannot be split into {} heads",
            p.heads
        );
    }
    let (heads, d) = (p.heads, inner / p.heads);
    let h = match p.norm {
        Some((groups, eps, gamma, beta)) => group_norm(x, groups, gamma, beta, eps)?,
        None => x.clone(),
    };
    let h = h
        .reshape((n, c, l))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((n * l, c))?; // [N L, C]
    let split = |t: Tensor| -> Result<Tensor> {
        t.reshape((n, l, heads, d))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((n * heads, l, d))
    };
    let q = split(linear(&h, p.q.0, Some(p.q.1))?)?;
    let k = split(linear(&h, p.k.0, Some(p.k.1))?)?;
    let v = split(linear(&h, p.v.0, Some(p.v.1))?)?;
    let o = attention(&q, &k, &v, 1.0 / (d as f64).sqrt())?; // [N heads, L, d]
    let o = o
        .reshape((n, heads, l, d))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((n * l, heads * d))?;
    let o = linear(&o, p.out.0, Some(p.out.1))?; // [N L, C]
    let o = o
        .reshape((n, l, c))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((n, c, hh, ww))?;
    (o + x)? / p.rescale_output_factor
}
