//! The network building-block operations the U-Net and the MLP call.
//!
//! Every function here has one contract (shapes, formula) and two implementations:
//! - [`reference`](mod@reference): candle's stock ops composed (runs on every device, differentiable through
//!   candle's autodiff) — the ground truth the fast kernels are tested against;
//! - fast fused CPU kernels (candle custom ops with their own backward) used when the tensor
//!   is on the CPU and fast kernels are enabled ([`set_fast_kernels`]).
//!
//! CUDA (and any non-CPU device) always uses candle's own ops. The fast path is taken when fast
//! kernels are on and every tensor of the call is an f32 CPU tensor; anything else (another
//! dtype, another device) silently takes the reference path.
//!
//! Shapes: images are `[N, C, H, W]`, f32; non-contiguous inputs are made contiguous first.
//!
//! Fast kernels, one module per family:
//! - [`conv`]: im2col + `gemm` per image, bias fused; backward `dW` and `dx` as GEMMs (+ col2im);
//! - [`norm`]: group norm fused with the per-channel / per-sample affine map and SiLU;
//! - [`block`]: a whole ResBlock stage, `conv(silu(gn(x))) + b + channel_bias + residual`, as
//!   one op ([`group_norm_silu_conv2d`], [`conv2d_add`]): fewer candle graph nodes (each costs a
//!   zeroed gradient buffer and an add in the backward pass) and no stored activation;
//! - [`elementwise`]: SiLU, per-sample channel bias; [`resample`]: nearest 2x up, 2x2 average
//!   down; [`attention`](mod@attention): `softmax(q k^T * scale) v`. `linear` stays on candle's matmul (the
//!   `gemm` crate already, and small in a U-Net).
//!
//! Threads: the kernels run on rayon's global pool (`RAYON_NUM_THREADS`, else one per CPU), the
//! pool candle's matmul and the `gemm` crate use too; a GEMM inside a parallel loop is
//! single-threaded, so nothing nests or oversubscribes. (candle 0.11's element-wise ops use a
//! separate "barrier pool" of `CANDLE_NUM_THREADS - 1` threads that spin briefly after each op;
//! that is candle's, not ours.) Call [`tune_allocator`] once at start-up on Linux/glibc.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{Result, Tensor};

pub use direct::with_portable_kernels;
pub use dropout::DropoutMask;

pub mod attention;
pub mod attn_block;
pub mod block;
pub mod conv;
pub(crate) mod cpu;
pub(crate) mod direct;
pub mod dropout;
pub mod elementwise;
pub mod norm;
pub(crate) mod packed;
pub mod profile;
pub mod reference;
pub mod resample;
pub mod resnet;
pub(crate) mod strided;
pub mod upconv;

static FAST_KERNELS: AtomicBool = AtomicBool::new(true);
static BF16: AtomicBool = AtomicBool::new(false);

/// The arithmetic of the fast convolution kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 everywhere (the default).
    #[default]
    F32,
    /// bf16 operands with f32 accumulation in the direct convolutions (the convolutions of the
    /// ResNet blocks, the stride-2 and upsampling convolutions, and their input gradients) on
    /// CPUs with AVX512_BF16. Weights stay f32 (rounded to bf16 as they are packed for each
    /// call), as do weight gradients, norms, activations, softmax, the linear layers, the
    /// attention products and the optimizer state.
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = crate::error::Error;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "f32" | "fp32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(crate::error::Error::param(
                "precision",
                format!("unknown precision '{other}', expected f32 or bf16"),
            )),
        }
    }
}

/// Sets the arithmetic of the fast convolution kernels for the whole process. `Bf16` needs a
/// CPU with AVX-512 and AVX512_BF16: an error (and no change) otherwise.
pub fn set_precision(p: Precision) -> crate::error::Result<()> {
    if p == Precision::Bf16 && !direct::has_bf16() {
        return Err(crate::error::Error::param(
            "precision",
            "bf16 needs a CPU with the AVX512_BF16 instructions (and AVX-512); this one has none: use f32",
        ));
    }
    BF16.store(p == Precision::Bf16, Ordering::Relaxed);
    Ok(())
}

/// The arithmetic of the fast convolution kernels ([`set_precision`]).
pub fn precision() -> Precision {
    if BF16.load(Ordering::Relaxed) {
        Precision::Bf16
    } else {
        Precision::F32
    }
}

/// Turns the fast CPU kernels on or off for the whole process (on by default). Off means
/// every op runs as candle's stock composition ([`reference`](mod@reference)).
pub fn set_fast_kernels(on: bool) {
    FAST_KERNELS.store(on, Ordering::Relaxed);
}

/// Whether this CPU runs the AVX-512 direct convolution kernels that the fused ResNet block,
/// the fused conv block and the stride-2 and upsampling convolutions are built on (and they are
/// not switched off with `DIFFUSE_DIRECT_CONV=0`). Without them those ops take their staged or
/// im2col + GEMM paths; [`with_portable_kernels`] runs the fused ops anyway, in portable Rust.
pub fn avx512_kernels() -> bool {
    direct::available()
}

/// Whether the fast CPU kernels are used for tensors on the CPU.
pub fn fast_kernels() -> bool {
    FAST_KERNELS.load(Ordering::Relaxed)
}

/// Makes glibc's allocator keep freed tensor buffers for reuse instead of handing them back to
/// the kernel and faulting in fresh zeroed pages for the next tensor: sets `M_MMAP_THRESHOLD`
/// to its maximum (32 MiB; larger buffers are still mapped and unmapped) and `M_TRIM_THRESHOLD`
/// to 1 GiB. candle allocates a new buffer for every op output and, in the backward pass, a
/// zeroed gradient buffer per graph edge; with glibc's defaults page faults (the kernel zeroing
/// pages) then cost as much as the kernels themselves (measured: SiLU forward + backward on
/// `[64, 64, 28, 28]` 23 ms with the defaults, 9.5 ms with this). Peak memory is unchanged (the
/// kept buffers are reused, not added to). Call once at program start; returns whether glibc
/// accepted both settings (false, and no effect, on other C libraries).
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; it is safe to call at any time.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Whether an op on these tensors takes the fast path: fast kernels on, every tensor an f32
/// tensor on the CPU.
fn use_fast(tensors: &[&Tensor]) -> bool {
    fast_kernels() && tensors.iter().all(|t| cpu::is_cpu_f32(t))
}

/// 2-D convolution, `y = conv(x, w) + b`: x `[N, C_in, H, W]`, w `[C_out, C_in, K, K]`,
/// b `[C_out]`, zero padding `padding` on every side, stride `stride`.
pub fn conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
    if use_fast(&[x, w]) && b.is_none_or(cpu::is_cpu_f32) {
        conv::conv2d(x, w, b, stride, padding)
    } else {
        reference::conv2d(x, w, b, stride, padding)
    }
}

/// The normalisation + activation in front of a fused convolution
/// ([`group_norm_silu_conv2d`]): `silu(group_norm(x) * (1 + scale) + shift)`, or
/// `silu(group_norm(x))` without `scale_shift`.
#[derive(Clone, Copy, Debug)]
pub struct GroupNormSilu<'a> {
    /// Number of groups; must divide the channel count.
    pub groups: usize,
    /// Per-channel scale `[C]`.
    pub gamma: &'a Tensor,
    /// Per-channel shift `[C]`.
    pub beta: &'a Tensor,
    /// Added to the variance.
    pub eps: f64,
    /// Per-sample, per-channel `(scale, shift)`, each `[N, C]` (Improved DDPM's time conditioning).
    pub scale_shift: Option<(&'a Tensor, &'a Tensor)>,
}

/// What a fused convolution adds to its output ([`conv2d_add`], [`group_norm_silu_conv2d`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct ConvAdd<'a> {
    /// A per-sample, per-channel vector `[N, C_out]` broadcast over the pixels (the time embedding).
    pub channel_bias: Option<&'a Tensor>,
    /// A tensor of the output's shape (the ResBlock's skip connection).
    pub residual: Option<&'a Tensor>,
}

/// `conv(x, w) + b + channel_bias[:, :, None, None] + residual`, one fused op on the CPU
/// (see [`conv2d`] for the convolution's shapes; the adds are optional).
pub fn conv2d_add(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    padding: usize,
    add: &ConvAdd<'_>,
) -> Result<Tensor> {
    let mut all = vec![x, w];
    all.extend(b);
    all.extend(add.channel_bias);
    all.extend(add.residual);
    if use_fast(&all) {
        block::conv_block(x, None, w, b, stride, padding, add)
    } else {
        reference::conv2d_add(x, w, b, stride, padding, add)
    }
}

/// `conv(silu(group_norm(x) [* (1 + scale) + shift]), w) + b + channel_bias + residual`: a
/// ResBlock stage as one op. On the CPU the normalised activation is never stored (it is
/// recomputed per image in the backward pass), which saves memory and candle graph nodes.
///
/// A DDPM ResBlock (Ho et al. 2020, appendix B) in two calls,
/// `h = conv1(silu(gn1(x))) + temb`, `out = x + conv2(silu(gn2(h)))`:
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use diffuse::ops::{group_norm_silu_conv2d, ConvAdd, GroupNormSilu};
///
/// let dev = Device::Cpu;
/// let (n, c) = (2, 8);
/// let x = Tensor::randn(0f32, 1., (n, c, 6, 6), &dev)?;
/// let temb = Tensor::randn(0f32, 1., (n, c), &dev)?;
/// let w = Tensor::randn(0f32, 0.1, (c, c, 3, 3), &dev)?;
/// let (ones, zeros) = (Tensor::ones(c, DType::F32, &dev)?, Tensor::zeros(c, DType::F32, &dev)?);
/// let gn = GroupNormSilu { groups: 4, gamma: &ones, beta: &zeros, eps: 1e-5, scale_shift: None };
/// let with_temb = ConvAdd { channel_bias: Some(&temb), residual: None };
/// let h = group_norm_silu_conv2d(&x, &gn, &w, Some(&zeros), 1, 1, &with_temb)?;
/// let with_skip = ConvAdd { channel_bias: None, residual: Some(&x) };
/// let out = group_norm_silu_conv2d(&h, &gn, &w, Some(&zeros), 1, 1, &with_skip)?;
/// assert_eq!(out.dims(), &[n, c, 6, 6]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn group_norm_silu_conv2d(
    x: &Tensor,
    norm: &GroupNormSilu<'_>,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    padding: usize,
    add: &ConvAdd<'_>,
) -> Result<Tensor> {
    let mut all = vec![x, w, norm.gamma, norm.beta];
    all.extend(b);
    if let Some((scale, shift)) = norm.scale_shift {
        all.extend([scale, shift]);
    }
    all.extend(add.channel_bias);
    all.extend(add.residual);
    if use_fast(&all) {
        block::conv_block(x, Some(norm), w, b, stride, padding, add)
    } else {
        reference::group_norm_silu_conv2d(x, norm, w, b, stride, padding, add)
    }
}

/// How the time embedding enters a ResNet block ([`resnet_block`]).
#[derive(Clone, Copy, Debug)]
pub enum TimeCondition<'a> {
    /// Added as a per-sample, per-channel bias `[N, C_out]` to the first convolution's output.
    Bias(&'a Tensor),
    /// `(scale, shift)`, each `[N, C_out]`: `silu(norm2(h) * (1 + scale) + shift)`.
    ScaleShift(&'a Tensor, &'a Tensor),
}

/// The parameters of a ResNet block ([`resnet_block`]); weights `[C_out, C_in, 3, 3]` for
/// `conv1`, `[C_out, C_out, 3, 3]` for `conv2`, `[C_out, C_in, 1, 1]` for the shortcut,
/// biases `[C_out]`, norm scales and shifts `[C_in]` (norm1) and `[C_out]` (norm2).
#[derive(Clone, Copy, Debug)]
pub struct ResnetBlockParams<'a> {
    /// GroupNorm groups (dividing `C_in` and `C_out`) and epsilon of both norms.
    pub groups: usize,
    /// Added to the variance.
    pub eps: f64,
    /// `(gamma, beta)` of the first norm.
    pub norm1: (&'a Tensor, &'a Tensor),
    /// `(weight, bias)` of the first 3x3 convolution.
    pub conv1: (&'a Tensor, &'a Tensor),
    /// The time embedding's projection.
    pub time: TimeCondition<'a>,
    /// `(gamma, beta)` of the second norm.
    pub norm2: (&'a Tensor, &'a Tensor),
    /// `(weight, bias)` of the second 3x3 convolution.
    pub conv2: (&'a Tensor, &'a Tensor),
    /// `(weight, bias)` of the 1x1 shortcut convolution (`None`: identity, `C_in = C_out`).
    pub shortcut: Option<(&'a Tensor, &'a Tensor)>,
    /// The dropout mask between the second activation and `conv2` (over `[N, C_out, H, W]`),
    /// or `None`.
    pub dropout_mask: Option<&'a DropoutMask>,
    /// The divisor of the residual sum.
    pub output_scale_factor: f64,
}

/// A whole ResNet block (diffusers' `ResnetBlock2D` without resampling; Ho et al. 2020,
/// appendix B; Nichol & Dhariwal 2021 for scale-shift) on `x_in = cat([x, skip], channels)`
/// (or `x` alone):
///
/// ```text
/// h   = conv1(silu(norm1(x_in))) + b1 [+ t]                  (TimeCondition::Bias(t))
/// g   = silu(norm2(h))  or  silu(norm2(h) * (1 + scale) + shift)
/// out = (conv2(g * mask) + b2 + shortcut(x_in)) / output_scale_factor
/// ```
///
/// On the CPU with AVX-512 this is one op with its own backward (the concatenation, both
/// stages and the shortcut inside, `h` kept for the backward pass), so candle's autodiff sees
/// one node per block; elsewhere the stages run as separate ops.
pub fn resnet_block(x: &Tensor, skip: Option<&Tensor>, p: &ResnetBlockParams<'_>) -> Result<Tensor> {
    let mut all = vec![
        x, p.norm1.0, p.norm1.1, p.conv1.0, p.conv1.1, p.norm2.0, p.norm2.1, p.conv2.0, p.conv2.1,
    ];
    all.extend(skip);
    match p.time {
        TimeCondition::Bias(t) => all.push(t),
        TimeCondition::ScaleShift(a, b) => all.extend([a, b]),
    }
    if let Some((w, b)) = p.shortcut {
        all.extend([w, b]);
    }
    if use_fast(&all) && resnet::applies(x, p) {
        return resnet::resnet_block(x, skip, p);
    }
    let _prof = profile::scope("resnet.staged");
    let x_in = match skip {
        Some(s) => Tensor::cat(&[x, s], 1)?,
        None => x.clone(),
    };
    let norm1 = GroupNormSilu {
        groups: p.groups,
        gamma: p.norm1.0,
        beta: p.norm1.1,
        eps: p.eps,
        scale_shift: None,
    };
    let (cb, ss) = match p.time {
        TimeCondition::Bias(t) => (Some(t), None),
        TimeCondition::ScaleShift(a, b) => (None, Some((a, b))),
    };
    let add1 = ConvAdd {
        channel_bias: cb,
        residual: None,
    };
    let h = group_norm_silu_conv2d(&x_in, &norm1, p.conv1.0, Some(p.conv1.1), 1, 1, &add1)?;
    let residual = match p.shortcut {
        Some((w, b)) => conv2d(&x_in, w, Some(b), 1, 0)?,
        None => x_in,
    };
    let add2 = ConvAdd {
        channel_bias: None,
        residual: Some(&residual),
    };
    let out = match p.dropout_mask {
        None => {
            let norm2 = GroupNormSilu {
                groups: p.groups,
                gamma: p.norm2.0,
                beta: p.norm2.1,
                eps: p.eps,
                scale_shift: ss,
            };
            group_norm_silu_conv2d(&h, &norm2, p.conv2.0, Some(p.conv2.1), 1, 1, &add2)?
        }
        Some(mask) => {
            let g = match ss {
                None => group_norm_silu(&h, p.groups, p.norm2.0, p.norm2.1, p.eps)?,
                Some((a, b)) => group_norm_scale_shift_silu(&h, p.groups, p.norm2.0, p.norm2.1, a, b, p.eps)?,
            };
            let mask = mask.to_tensor(g.dims(), g.device())?.to_dtype(g.dtype())?;
            conv2d_add(&(g * mask)?, p.conv2.0, Some(p.conv2.1), 1, 1, &add2)?
        }
    };
    if p.output_scale_factor == 1.0 {
        Ok(out)
    } else {
        out / p.output_scale_factor
    }
}

/// The parameters of a self-attention block ([`attention_block`]): linear weights `[I, C]`
/// (`[C, I]` for `out`) and biases, `I = heads * head_dim`.
#[derive(Clone, Copy, Debug)]
pub struct AttentionBlockParams<'a> {
    /// `(groups, eps, gamma, beta)` of the group norm in front, if any.
    pub norm: Option<(usize, f64, &'a Tensor, &'a Tensor)>,
    /// `(weight, bias)` of the query, key, value and output projections.
    pub q: (&'a Tensor, &'a Tensor),
    /// See `q`.
    pub k: (&'a Tensor, &'a Tensor),
    /// See `q`.
    pub v: (&'a Tensor, &'a Tensor),
    /// See `q`.
    pub out: (&'a Tensor, &'a Tensor),
    /// Attention heads (dividing `I`).
    pub heads: usize,
    /// The divisor of the residual sum.
    pub rescale_output_factor: f64,
}

/// Self-attention over the `H W` positions of `x` `[N, C, H, W]` with a residual connection
/// (diffusers' `Attention` as the UNet2D blocks use it; Vaswani et al. 2017, eq. 1):
///
/// ```text
/// h       = group_norm(x)  (when there is a norm)
/// q, k, v = h W_q^T + b_q, ...   per position, split into heads of d = I / heads channels
/// o       = softmax(q k^T / sqrt(d)) v
/// out     = (o W_out^T + b_out + x) / rescale_output_factor
/// ```
///
/// On the CPU one op with its own backward ([`attn_block`]); elsewhere candle's ops.
pub fn attention_block(x: &Tensor, p: &AttentionBlockParams<'_>) -> Result<Tensor> {
    let mut all = vec![x, p.q.0, p.q.1, p.k.0, p.k.1, p.v.0, p.v.1, p.out.0, p.out.1];
    if let Some((_, _, g, b)) = p.norm {
        all.extend([g, b]);
    }
    if use_fast(&all) {
        attn_block::attention_block(x, p)
    } else {
        reference::attention_block(x, p)
    }
}

/// Group normalisation (Wu & He 2018) with per-channel affine `gamma`, `beta` (`[C]`):
/// `y = (x - mean_g) / sqrt(var_g + eps) * gamma + beta`, statistics over each group of
/// `C / groups` channels and all pixels. `C % groups != 0` is an error.
pub fn group_norm(x: &Tensor, groups: usize, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    if use_fast(&[x, gamma, beta]) {
        norm::group_norm(x, groups, gamma, beta, eps)
    } else {
        reference::group_norm(x, groups, gamma, beta, eps)
    }
}

/// `silu(group_norm(x))`, the ResBlock's first stage, fused.
pub fn group_norm_silu(x: &Tensor, groups: usize, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    if use_fast(&[x, gamma, beta]) {
        norm::group_norm_silu(x, groups, gamma, beta, eps)
    } else {
        reference::group_norm_silu(x, groups, gamma, beta, eps)
    }
}

/// `silu(group_norm(x) * (1 + scale) + shift)` with per-sample, per-channel `scale`, `shift`
/// (`[N, C]`): the ResBlock's second stage with scale-shift time conditioning (Improved DDPM).
pub fn group_norm_scale_shift_silu(
    x: &Tensor,
    groups: usize,
    gamma: &Tensor,
    beta: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    if use_fast(&[x, gamma, beta, scale, shift]) {
        norm::group_norm_scale_shift_silu(x, groups, gamma, beta, scale, shift, eps)
    } else {
        reference::group_norm_scale_shift_silu(x, groups, gamma, beta, scale, shift, eps)
    }
}

/// `silu(x) = x * sigmoid(x)`.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    if use_fast(&[x]) {
        elementwise::silu(x)
    } else {
        reference::silu(x)
    }
}

/// `x + bias[:, :, None, None]`: adds a per-sample, per-channel vector (`[N, C]`) to a feature map.
pub fn add_channel_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if use_fast(&[x, bias]) {
        elementwise::add_channel_bias(x, bias)
    } else {
        reference::add_channel_bias(x, bias)
    }
}

/// Nearest-neighbour 2x upsampling of `[N, C, H, W]` to `[N, C, 2H, 2W]`.
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    if use_fast(&[x]) {
        resample::upsample_nearest2x(x)
    } else {
        reference::upsample_nearest2x(x)
    }
}

/// `conv3x3(upsample_nearest2x(x), w) + b` (padding 1): x `[N, C_in, H, W]`, w
/// `[C_out, C_in, 3, 3]`, b `[C_out]` -> `[N, C_out, 2H, 2W]`. On the CPU with AVX-512 one op
/// that convolves the small image by sub-pixel phases ([`upconv`]: 2.25x fewer multiply-adds).
pub fn upsample_conv2d(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    if use_fast(&[x, w, b]) && upconv::applies(x) {
        upconv::upsample_conv2d(x, w, b)
    } else {
        conv2d(&upsample_nearest2x(x)?, w, Some(b), 1, 1)
    }
}

/// 2x2 average pooling, stride 2; `H` and `W` must be even (an error otherwise).
pub fn avg_pool2x(x: &Tensor) -> Result<Tensor> {
    if use_fast(&[x]) {
        resample::avg_pool2x(x)
    } else {
        reference::avg_pool2x(x)
    }
}

/// Scaled dot-product attention `softmax(q k^T * scale) v` over `[B, L, D]` tensors.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    if use_fast(&[q, k, v]) {
        attention::attention(q, k, v, scale)
    } else {
        reference::attention(q, k, v, scale)
    }
}

/// `y = x w^T + b` for x `[N, I]`, w `[O, I]`, b `[O]`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let _prof = profile::scope("linear.fwd");
    if let (Ok((n, i)), Ok(o)) = (x.dims2(), w.dim(0)) {
        profile::add_flops("linear.fwd", 2.0 * (n * i * o) as f64);
    }
    reference::linear(x, w, b)
}
