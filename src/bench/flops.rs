//! The U-Net's floating-point operations, counted analytically from its config.
//!
//! Counting convention (the usual one for networks, and the one that makes "achieved GFLOP/s"
//! comparable with a GEMM's `2 m n k`):
//!
//! ```text
//! conv k x k, c_in -> c_out, output h x w:  2 * c_in * k * k * c_out * h * w    (one multiply-add = 2)
//! linear in -> out, on r rows:              2 * r * in * out
//! attention, heads of width d over L = h*w positions:
//!                                           2 * heads * L * L * d   (q k^T)
//!                                         + 2 * heads * L * L * d   (softmax(..) v)
//! ```
//!
//! Biases, GroupNorm, SiLU, softmax, dropout, residual adds, pooling, upsampling and
//! concatenation are not counted: they are O(elements), not O(elements x channels), and add
//! about 1% for these networks. The q/k/v/out projections of attention are counted as linears.
//!
//! A training step is counted as 3 forward passes: the backward pass of every matrix product
//! `Y = X W` costs two products of the same size (`dX = dY W^T` and `dW = X^T dY`). This slightly
//! over-counts (nobody needs the gradient of the input image), as everyone's convention does.
//!
//! The walk mirrors [`crate::nets::unet::UNet::new`] block for block; the test
//! `walk_visits_every_parameter` checks that it visits exactly the network's parameters, so a
//! change in the network that the count misses fails there.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::nets::config::{ResampleType, TimeScaleShift, UNetConfig};

/// Forward-pass FLOPs of the U-Net for **one** image, split by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlopCount {
    /// Convolutions (including 1x1 shortcuts and the resampling convolutions).
    pub conv: u64,
    /// Linear layers (time embedding MLP, time projections, attention q/k/v/out).
    pub linear: u64,
    /// The two matrix products inside attention, `q k^T` and `softmax(..) v`.
    pub attention: u64,
}

impl FlopCount {
    /// `conv + linear + attention`.
    pub fn total(&self) -> u64 {
        self.conv + self.linear + self.attention
    }
}

/// The multiplier from forward FLOPs to a training step's FLOPs (forward + backward).
pub const TRAIN_STEP_FORWARDS: u64 = 3;

/// Forward-pass FLOPs of one `h` x `w` image through the network `cfg` describes (see the
/// module docs for what is counted). The size must suit the network
/// ([`UNetConfig::check_input_size`]).
pub fn unet_forward_flops(cfg: &UNetConfig, h: usize, w: usize) -> Result<FlopCount> {
    Ok(walk(cfg, h, w)?.flops)
}

/// What the walk accumulates: FLOPs and, as a cross-check on the walk itself, parameters.
#[derive(Default)]
pub(crate) struct Counter {
    pub flops: FlopCount,
    pub params: u64,
}

fn u(x: usize) -> u64 {
    x as u64
}

impl Counter {
    /// A `k` x `k` convolution `c_in -> c_out` with bias, producing `h_out` x `w_out`.
    pub fn conv(&mut self, c_in: usize, c_out: usize, k: usize, h_out: usize, w_out: usize) {
        self.flops.conv += 2 * u(c_in) * u(k * k) * u(c_out) * u(h_out) * u(w_out);
        self.params += u(c_out) * u(c_in) * u(k * k) + u(c_out);
    }

    /// A linear layer `d_in -> d_out` with bias applied to `rows` rows.
    pub fn linear(&mut self, rows: usize, d_in: usize, d_out: usize) {
        self.flops.linear += 2 * u(rows) * u(d_in) * u(d_out);
        self.params += u(d_in) * u(d_out) + u(d_out);
    }

    /// GroupNorm over `c` channels: parameters only (gamma, beta).
    pub fn group_norm(&mut self, c: usize) {
        self.params += 2 * u(c);
    }

    /// `softmax(q k^T) v` for `heads` heads of width `d` over `l` positions.
    pub fn attention_products(&mut self, heads: usize, l: usize, d: usize) {
        self.flops.attention += 2 * 2 * u(heads) * u(l) * u(l) * u(d);
    }

    /// `ResnetBlock2D` `c_in -> c_out` on an `h` x `w` input; `resample` pools (`Some(false)`)
    /// or upsamples (`Some(true)`) after `norm1`.
    #[allow(clippy::too_many_arguments)]
    fn resnet(&mut self, cfg: &UNetConfig, c_in: usize, c_out: usize, h: usize, w: usize, up: Option<bool>) {
        let (h2, w2) = match up {
            None => (h, w),
            Some(true) => (2 * h, 2 * w),
            Some(false) => (h / 2, w / 2),
        };
        self.group_norm(c_in);
        self.conv(c_in, c_out, 3, h2, w2);
        let proj = match cfg.resnet_time_scale_shift {
            TimeScaleShift::Default => c_out,
            TimeScaleShift::ScaleShift => 2 * c_out,
        };
        self.linear(1, cfg.time_embed_dim(), proj);
        self.group_norm(c_out);
        self.conv(c_out, c_out, 3, h2, w2);
        if c_in != c_out {
            self.conv(c_in, c_out, 1, h2, w2);
        }
    }

    /// The attention block on `c` channels at `h` x `w`, with or without its GroupNorm.
    fn attention(&mut self, cfg: &UNetConfig, c: usize, h: usize, w: usize, norm: bool) {
        let d = cfg.attention_head_dim.unwrap_or(c);
        let heads = c / d.max(1);
        let inner = heads * d;
        let l = h * w;
        if norm {
            self.group_norm(c);
        }
        for _ in 0..3 {
            self.linear(l, c, inner); // to_q, to_k, to_v
        }
        self.attention_products(heads, l, d);
        self.linear(l, inner, c); // to_out.0
    }
}

/// Walks the network of `cfg` on an `h` x `w` input, counting FLOPs and parameters.
pub(crate) fn walk(cfg: &UNetConfig, h: usize, w: usize) -> Result<Counter> {
    cfg.validate_fields()?;
    cfg.check_input_size(h, w)
        .map_err(|e| Error::param("image size", e))?;
    let ch = &cfg.block_out_channels;
    let n = ch.len();
    let temb = cfg.time_embed_dim();
    let mut k = Counter::default();

    // Time embedding MLP on one row per image.
    k.linear(1, ch[0], temb);
    k.linear(1, temb, temb);
    k.conv(cfg.in_channels, ch[0], 3, h, w);

    let (mut hh, mut ww) = (h, w);
    let mut c_out = ch[0];
    for (i, kind) in cfg.down_block_types.iter().enumerate() {
        let c_in = c_out;
        c_out = ch[i];
        for j in 0..cfg.layers_per_block {
            k.resnet(cfg, if j == 0 { c_in } else { c_out }, c_out, hh, ww, None);
            if kind.has_attention() {
                k.attention(cfg, c_out, hh, ww, true);
            }
        }
        if i + 1 < n {
            match (kind.has_attention(), cfg.downsample_type) {
                (true, ResampleType::Resnet) => k.resnet(cfg, c_out, c_out, hh, ww, Some(false)),
                // Stride-2 3x3 conv: (h + 2p - 3) / 2 + 1 = h / 2 for even h with p = 1, and
                // with diffusers' p = 0 (one extra row and column at the bottom right).
                _ => k.conv(c_out, c_out, 3, hh / 2, ww / 2),
            }
            hh /= 2;
            ww /= 2;
        }
    }

    if cfg.mid_block {
        let c = ch[n - 1];
        k.resnet(cfg, c, c, hh, ww, None);
        if cfg.add_attention {
            let norm =
                cfg.attn_norm_num_groups.is_some() || cfg.resnet_time_scale_shift == TimeScaleShift::Default;
            k.attention(cfg, c, hh, ww, norm);
        }
        k.resnet(cfg, c, c, hh, ww, None);
    }

    let rev: Vec<usize> = ch.iter().rev().copied().collect();
    let mut c_out = rev[0];
    let layers = cfg.layers_per_block + 1;
    for (i, kind) in cfg.up_block_types.iter().enumerate() {
        let prev_out = c_out;
        c_out = rev[i];
        let c_in = rev[(i + 1).min(n - 1)];
        for j in 0..layers {
            let skip = if j == layers - 1 { c_in } else { c_out };
            let h_in = if j == 0 { prev_out } else { c_out };
            k.resnet(cfg, h_in + skip, c_out, hh, ww, None);
            if kind.has_attention() {
                k.attention(cfg, c_out, hh, ww, true);
            }
        }
        if i + 1 < n {
            match (kind.has_attention(), cfg.upsample_type) {
                (true, ResampleType::Resnet) => k.resnet(cfg, c_out, c_out, hh, ww, Some(true)),
                _ => k.conv(c_out, c_out, 3, 2 * hh, 2 * ww),
            }
            hh *= 2;
            ww *= 2;
        }
    }

    k.group_norm(ch[0]);
    k.conv(ch[0], cfg.out_channels, 3, h, w);
    Ok(k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nets::config::{DownBlockType, UpBlockType, PRESETS};
    use crate::nets::unet::num_parameters;

    #[test]
    fn layer_counts_by_hand() {
        let mut k = Counter::default();
        // 3x3 conv 2 -> 5 at 4x6: 2 * (2 * 9) * 5 * 24 = 4320 FLOPs; 5*2*9 + 5 = 95 params.
        k.conv(2, 5, 3, 4, 6);
        assert_eq!((k.flops.conv, k.params), (4320, 95));
        // linear 3 -> 7 on 10 rows: 2 * 10 * 3 * 7 = 420; 21 + 7 = 28 params.
        k.linear(10, 3, 7);
        assert_eq!((k.flops.linear, k.params), (420, 95 + 28));
        // 2 heads of width 4 over 9 positions: q k^T 2*2*9*9*4 = 1296, times 2 with v: 2592.
        k.attention_products(2, 9, 4);
        assert_eq!(k.flops.attention, 2592);
        assert_eq!(k.flops.total(), 4320 + 420 + 2592);
    }

    /// One level with a mid-block attention, 1x2x2 images: every layer written out.
    #[test]
    fn tiny_net_with_attention_by_hand() {
        let cfg = UNetConfig {
            in_channels: 1,
            out_channels: 1,
            block_out_channels: vec![4],
            down_block_types: vec![DownBlockType::DownBlock2D],
            up_block_types: vec![UpBlockType::UpBlock2D],
            layers_per_block: 1,
            norm_num_groups: 2,
            attention_head_dim: None,
            sample_size: None,
            ..UNetConfig::default()
        };
        let f = unet_forward_flops(&cfg, 2, 2).unwrap();
        // L = 4 pixels, temb = 16.
        // conv_in 1->4: 2*1*9*4*4 = 288
        // down resnet 4->4: conv1, conv2 2*4*9*4*4 = 1152 each            -> 2304
        // mid: two resnets as above                                        -> 4608
        // up: 2 resnets 8->4: conv1 2*8*9*4*4 = 2304, conv2 1152,
        //     1x1 shortcut 2*8*4*4 = 256: 3712 each                         -> 7424
        // conv_out 4->1: 2*4*9*1*4 = 288
        assert_eq!(f.conv, 288 + 2304 + 4608 + 7424 + 288);
        // time MLP 4->16 (128) and 16->16 (512); a 16->4 projection per resnet (128) x 5;
        // mid attention q, k, v, out: 4 x 2*4*4*4 = 512.
        assert_eq!(f.linear, 128 + 512 + 5 * 128 + 512);
        // one head of width 4 over L = 4: 2 * (2*4*4*4) = 256.
        assert_eq!(f.attention, 256);
    }

    /// Two levels (down- and upsampling), no mid block, 1x4x4 images.
    #[test]
    fn tiny_two_level_net_by_hand() {
        let cfg = UNetConfig {
            in_channels: 1,
            out_channels: 1,
            block_out_channels: vec![2, 2],
            down_block_types: vec![DownBlockType::DownBlock2D; 2],
            up_block_types: vec![UpBlockType::UpBlock2D; 2],
            layers_per_block: 1,
            norm_num_groups: 1,
            mid_block: false,
            sample_size: None,
            ..UNetConfig::default()
        };
        let f = unet_forward_flops(&cfg, 4, 4).unwrap();
        // conv_in 1->2 @4x4: 2*1*9*2*16 = 576
        // down 0 @4x4: resnet 2->2, two convs 2*2*9*2*16 = 1152 each: 2304;
        //   downsampler 2->2 stride 2 -> 2x2: 2*2*9*2*4 = 288
        // down 1 @2x2: resnet, two convs 2*2*9*2*4 = 288 each: 576
        // up 0 @2x2: 2 resnets 4->2: 2*4*9*2*4 = 576, 288, 1x1 2*4*2*4 = 64: 928 each;
        //   upsampler conv @4x4: 1152
        // up 1 @4x4: 2 resnets 4->2: 2*4*9*2*16 = 2304, 1152, 1x1 2*4*2*16 = 256: 3712 each
        // conv_out 2->1 @4x4: 2*2*9*1*16 = 576
        assert_eq!(f.conv, 576 + 2304 + 288 + 576 + 2 * 928 + 1152 + 2 * 3712 + 576);
        // time MLP 2->8 (32) + 8->8 (128); six resnets with an 8->2 projection (32 each).
        assert_eq!(f.linear, 32 + 128 + 6 * 32);
        assert_eq!(f.attention, 0);
    }

    /// The walk visits exactly the network's layers: its parameter count equals the network's
    /// for every preset and for the config variants that change the structure.
    #[test]
    fn walk_visits_every_parameter() {
        let mut cfgs: Vec<(String, UNetConfig, usize)> = PRESETS
            .iter()
            .map(|p| {
                let (c, s) = if *p == "cifar10" { (3, 32) } else { (1, 28) };
                (p.to_string(), UNetConfig::preset(p, c, s).unwrap(), s)
            })
            .collect();
        let mnist = UNetConfig::preset("mnist", 1, 28).unwrap();
        cfgs.push((
            "scale_shift, resnet resampling, 2 heads, attn norm".into(),
            UNetConfig {
                resnet_time_scale_shift: TimeScaleShift::ScaleShift,
                downsample_type: ResampleType::Resnet,
                upsample_type: ResampleType::Resnet,
                down_block_types: vec![DownBlockType::AttnDownBlock2D; 3],
                up_block_types: vec![UpBlockType::AttnUpBlock2D; 3],
                attention_head_dim: Some(32),
                time_embedding_dim: Some(100),
                ..mnist.clone()
            },
            28,
        ));
        cfgs.push((
            "scale_shift, mid attention without norm".into(),
            UNetConfig {
                resnet_time_scale_shift: TimeScaleShift::ScaleShift,
                ..mnist.clone()
            },
            28,
        ));
        cfgs.push((
            "no mid block".into(),
            UNetConfig {
                mid_block: false,
                ..mnist
            },
            28,
        ));
        for (name, cfg, s) in cfgs {
            let walked = walk(&cfg, s, s).unwrap().params;
            assert_eq!(walked, num_parameters(&cfg).unwrap() as u64, "{name}");
        }
    }

    #[test]
    fn bad_image_size_is_an_error() {
        let cfg = UNetConfig::preset("bench", 1, 28).unwrap();
        let e = unet_forward_flops(&cfg, 30, 30).unwrap_err().to_string();
        assert!(e.contains("divisible by"), "{e}");
    }
}
