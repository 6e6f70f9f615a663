//! `UNetConfig`: the U-Net's architecture, in diffusers' `UNet2DModel` config format.
//!
//! Field names and defaults are those of `diffusers.UNet2DModel.__init__` (diffusers 0.42), so a
//! diffusers `config.json` parses into this struct and [`UNetConfig::to_json`] writes one that
//! `UNet2DModel.from_pretrained` reads back. Our own presets ([`UNetConfig::preset`]) are values of
//! the same type: one U-Net code path serves both.
//!
//! The file is read by [`crate::config::unet`]: a value this crate does not implement and that
//! would change the network's output (Fourier time embeddings, class-embedding types,
//! `SkipDownBlock2D`, ...), or one of the wrong type, is an error naming the field. Unknown keys
//! are accepted (diffusers adds keys with every release) and listed with `--verbose`; keys
//! starting with `_` (`_class_name`, `_diffusers_version`, `_name_or_path`) are metadata;
//! `_class_name`, when present, must be `UNet2DModel`.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{Error, Result};

/// The diffusers version written into exported configs (the version the fixtures were made with).
pub const DIFFUSERS_VERSION: &str = "0.42.1";

/// A down-sampling stage of the U-Net (diffusers' `down_block_types` entries).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum DownBlockType {
    /// `DownBlock2D`: `layers_per_block` ResNet blocks, then a downsampler (not on the last level).
    #[serde(alias = "UNetResDownBlock2D")]
    DownBlock2D,
    /// `AttnDownBlock2D`: each ResNet block is followed by a self-attention block.
    #[serde(alias = "UNetResAttnDownBlock2D")]
    AttnDownBlock2D,
}

/// An up-sampling stage of the U-Net (diffusers' `up_block_types` entries).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum UpBlockType {
    /// `UpBlock2D`: `layers_per_block + 1` ResNet blocks on concatenated skips, then an upsampler.
    #[serde(alias = "UNetResUpBlock2D")]
    UpBlock2D,
    /// `AttnUpBlock2D`: each ResNet block is followed by a self-attention block.
    #[serde(alias = "UNetResAttnUpBlock2D")]
    AttnUpBlock2D,
}

impl DownBlockType {
    /// The diffusers class name.
    pub fn name(&self) -> &'static str {
        match self {
            DownBlockType::DownBlock2D => "DownBlock2D",
            DownBlockType::AttnDownBlock2D => "AttnDownBlock2D",
        }
    }

    /// Whether the block has self-attention after each ResNet block.
    pub fn has_attention(&self) -> bool {
        matches!(self, DownBlockType::AttnDownBlock2D)
    }
}

impl UpBlockType {
    /// The diffusers class name.
    pub fn name(&self) -> &'static str {
        match self {
            UpBlockType::UpBlock2D => "UpBlock2D",
            UpBlockType::AttnUpBlock2D => "AttnUpBlock2D",
        }
    }

    /// Whether the block has self-attention after each ResNet block.
    pub fn has_attention(&self) -> bool {
        matches!(self, UpBlockType::AttnUpBlock2D)
    }
}

/// How the time embedding enters a ResNet block (`resnet_time_scale_shift`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeScaleShift {
    /// `default`: `h = conv1(...) + proj(t)`, then `norm2` (Ho et al. 2020).
    Default,
    /// `scale_shift`: `h = norm2(conv1(...)) * (1 + scale) + shift`, `(scale, shift) = proj(t)`
    /// (Nichol & Dhariwal 2021, section 3.4 / Dhariwal & Nichol 2021 "AdaGN").
    ScaleShift,
}

/// How a resampling layer is built (`downsample_type` / `upsample_type`). As in diffusers, only
/// the attention blocks (`AttnDownBlock2D`, `AttnUpBlock2D`) read these; the plain blocks always
/// use a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResampleType {
    /// `conv`: a stride-2 3x3 convolution down; nearest 2x then a 3x3 convolution up.
    Conv,
    /// `resnet`: a ResNet block that average-pools (down) or nearest-upsamples (up) between its
    /// first norm and its first convolution.
    Resnet,
}

/// The position of the sinusoidal time embedding (`time_embedding_type`). Only `positional`
/// is implemented; diffusers' `fourier` (Gaussian Fourier features, Score-SDE NCSN++) and
/// `learned` are rejected when parsing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum TimeEmbeddingType {
    /// `positional`: the DDPM sinusoidal embedding (see [`crate::nets::embedding`]).
    #[serde(rename = "positional")]
    Positional,
}

/// The most resolution levels a [`UNetConfig`] may have.
pub const MAX_LEVELS: usize = 16;
/// The most ResNet layers per block.
pub const MAX_LAYERS_PER_BLOCK: usize = 64;
/// The widest channel count (and group count, head width, time-embedding width).
pub const MAX_CHANNELS: usize = 65_536;

/// A U-Net architecture with diffusers' `UNet2DModel` field names and defaults.
///
/// `Default` is `UNet2DModel()`'s default configuration (a 4-level 224..896-channel network).
#[derive(Clone, Debug, PartialEq)]
pub struct UNetConfig {
    /// Image height and width the model was made for (`sample_size`: an int or `[h, w]`);
    /// informational: the network runs on any size divisible by [`UNetConfig::size_multiple`].
    pub sample_size: Option<[usize; 2]>,
    /// Input channels (3).
    pub in_channels: usize,
    /// Output channels (3).
    pub out_channels: usize,
    /// Map the input from [0, 1] to [-1, 1] first: `x <- 2 x - 1` (false).
    pub center_input_sample: bool,
    /// Time embedding kind (positional).
    pub time_embedding_type: TimeEmbeddingType,
    /// Width of the time-embedding MLP; `None` is `4 * block_out_channels[0]`.
    pub time_embedding_dim: Option<usize>,
    /// `downscale_freq_shift` of the sinusoidal embedding (0; the DDPM checkpoints use 1).
    pub freq_shift: f64,
    /// Put the cosines before the sines in the embedding (true; the DDPM checkpoints use false).
    pub flip_sin_to_cos: bool,
    /// One entry per resolution level, highest resolution first.
    pub down_block_types: Vec<DownBlockType>,
    /// Whether there is a `UNetMidBlock2D` (`mid_block_type`: "UNetMidBlock2D" or null).
    pub mid_block: bool,
    /// One entry per level, lowest resolution first.
    pub up_block_types: Vec<UpBlockType>,
    /// Channels of each level, highest resolution first ([224, 448, 672, 896]).
    pub block_out_channels: Vec<usize>,
    /// ResNet blocks per down level (2); up levels have one more.
    pub layers_per_block: usize,
    /// Output divisor of the mid block's ResNet and attention blocks (1).
    pub mid_block_scale_factor: f64,
    /// Padding of the stride-2 downsampling convolution: 1, or 0 meaning "pad right and bottom
    /// by one" (diffusers' convention; the DDPM checkpoints use 0).
    pub downsample_padding: usize,
    /// Downsampler of `AttnDownBlock2D` (conv).
    pub downsample_type: ResampleType,
    /// Upsampler of `AttnUpBlock2D` (conv).
    pub upsample_type: ResampleType,
    /// Dropout probability inside the ResNet blocks, between the second activation and the
    /// second convolution (0; the DDPM CIFAR-10 model trained with 0.1).
    pub dropout: f64,
    /// Width of one attention head; `None` means one head spanning all channels (8).
    pub attention_head_dim: Option<usize>,
    /// GroupNorm groups everywhere (32).
    pub norm_num_groups: usize,
    /// GroupNorm groups of the mid block's attention; `None`: `norm_num_groups` with
    /// `resnet_time_scale_shift = default`, and *no* norm there with `scale_shift` (diffusers).
    pub attn_norm_num_groups: Option<usize>,
    /// GroupNorm epsilon (1e-5; the DDPM checkpoints use 1e-6).
    pub norm_eps: f64,
    /// Time conditioning of the ResNet blocks (default).
    pub resnet_time_scale_shift: TimeScaleShift,
    /// Self-attention in the mid block (true).
    pub add_attention: bool,
    /// Only used by diffusers' `learned` time embedding; kept so configs round-trip.
    pub num_train_timesteps: Option<usize>,
    /// Rows of the class-embedding table (`num_class_embeds`, with `class_embed_type = null`):
    /// `None` for an unconditional network.
    pub num_class_embeds: Option<usize>,
    /// The row of the class-embedding table that means "no class" (the unconditional half of
    /// classifier-free guidance), stored as `_diffuse_null_class` (diffusers ignores keys that
    /// start with `_`). `diffuse train` makes it the last row, `num_class_embeds - 1`; a
    /// class-conditional diffusers model without it has no null class and cannot be guided.
    pub null_class: Option<usize>,
}

impl Default for UNetConfig {
    fn default() -> Self {
        use DownBlockType::*;
        use UpBlockType::*;
        UNetConfig {
            sample_size: None,
            in_channels: 3,
            out_channels: 3,
            center_input_sample: false,
            time_embedding_type: TimeEmbeddingType::Positional,
            time_embedding_dim: None,
            freq_shift: 0.0,
            flip_sin_to_cos: true,
            down_block_types: vec![DownBlock2D, AttnDownBlock2D, AttnDownBlock2D, AttnDownBlock2D],
            mid_block: true,
            up_block_types: vec![AttnUpBlock2D, AttnUpBlock2D, AttnUpBlock2D, UpBlock2D],
            block_out_channels: vec![224, 448, 672, 896],
            layers_per_block: 2,
            mid_block_scale_factor: 1.0,
            downsample_padding: 1,
            downsample_type: ResampleType::Conv,
            upsample_type: ResampleType::Conv,
            dropout: 0.0,
            attention_head_dim: Some(8),
            norm_num_groups: 32,
            attn_norm_num_groups: None,
            norm_eps: 1e-5,
            resnet_time_scale_shift: TimeScaleShift::Default,
            add_attention: true,
            num_train_timesteps: None,
            num_class_embeds: None,
            null_class: None,
        }
    }
}

/// The preset names [`UNetConfig::preset`] accepts.
pub const PRESETS: [&str; 4] = ["demo", "mnist", "cifar10", "bench"];

impl UNetConfig {
    /// A named preset, for `channels`-channel images of `image_size` x `image_size` pixels.
    ///
    /// | preset | levels (channels) | blocks/level | attention | params (1x28x28 / 3x32x32) |
    /// | --- | --- | --- | --- | --- |
    /// | `demo` | 32, 64, 64 | 1 | mid block (lowest resolution) | 1,062,497 (1 channel) |
    /// | `mnist` | 64, 128, 128 | 2 | level 3 + mid block, dropout 0.1 | 6,469,889 (1 channel) |
    /// | `cifar10` | 128, 256, 256, 256 | 2 | 16x16 level + mid, dropout 0.1 | 35,746,307 (3 channels) |
    /// | `bench` | 64, 128, 128 | 1 | none | 4,170,177 (1 channel) |
    ///
    /// `cifar10` is the DDPM paper's CIFAR-10 network (Ho et al. 2020, appendix B: 35.7 M
    /// parameters) exactly as diffusers' `google/ddpm-cifar10-32` config writes it (freq_shift 1,
    /// sin before cos, norm_eps 1e-6, downsample_padding 0, one attention head), with the
    /// paper's dropout 0.1. `bench` is issue 6's architecture (64/128/128, GroupNorm(8), no
    /// attention); in diffusers' layout no `layers_per_block` gives issue 6's 2.77 M parameters
    /// (1 gives 4.17 M, the smallest), so it uses 1.
    ///
    /// The image size must be divisible by `2^(levels - 1)` (each level but the last halves it:
    /// 28 -> 14 -> 7 for the 3-level presets, 32 -> 16 -> 8 -> 4 for `cifar10`); otherwise an
    /// error says which sizes work.
    pub fn preset(name: &str, channels: usize, image_size: usize) -> Result<Self> {
        use DownBlockType::*;
        use UpBlockType::*;
        let base = match name {
            "demo" => UNetConfig {
                block_out_channels: vec![32, 64, 64],
                down_block_types: vec![DownBlock2D; 3],
                up_block_types: vec![UpBlock2D; 3],
                layers_per_block: 1,
                norm_num_groups: 8,
                attention_head_dim: None,
                add_attention: true,
                ..UNetConfig::default()
            },
            "mnist" => UNetConfig {
                block_out_channels: vec![64, 128, 128],
                down_block_types: vec![DownBlock2D, DownBlock2D, AttnDownBlock2D],
                up_block_types: vec![AttnUpBlock2D, UpBlock2D, UpBlock2D],
                layers_per_block: 2,
                norm_num_groups: 32,
                attention_head_dim: None,
                dropout: 0.1,
                ..UNetConfig::default()
            },
            "cifar10" => UNetConfig {
                block_out_channels: vec![128, 256, 256, 256],
                down_block_types: vec![DownBlock2D, AttnDownBlock2D, DownBlock2D, DownBlock2D],
                up_block_types: vec![UpBlock2D, UpBlock2D, AttnUpBlock2D, UpBlock2D],
                layers_per_block: 2,
                attention_head_dim: None,
                downsample_padding: 0,
                flip_sin_to_cos: false,
                freq_shift: 1.0,
                norm_eps: 1e-6,
                dropout: 0.1,
                ..UNetConfig::default()
            },
            "bench" => UNetConfig {
                block_out_channels: vec![64, 128, 128],
                down_block_types: vec![DownBlock2D; 3],
                up_block_types: vec![UpBlock2D; 3],
                layers_per_block: 1,
                norm_num_groups: 8,
                add_attention: false,
                ..UNetConfig::default()
            },
            other => {
                return Err(Error::param(
                    "preset",
                    format!(
                        "unknown U-Net preset '{other}', expected one of: {}",
                        PRESETS.join(", ")
                    ),
                ))
            }
        };
        let cfg = UNetConfig {
            in_channels: channels,
            out_channels: channels,
            sample_size: Some([image_size, image_size]),
            ..base
        };
        cfg.check_input_size(image_size, image_size)
            .map_err(|e| Error::param("image_size", format!("preset {name}: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Number of resolution levels (`len(block_out_channels)`).
    pub fn levels(&self) -> usize {
        self.block_out_channels.len()
    }

    /// Height and width must be multiples of this: `2^(levels - 1)`.
    pub fn size_multiple(&self) -> usize {
        1usize << self.levels().saturating_sub(1).min(30)
    }

    /// Width of the time embedding MLP: `time_embedding_dim` or `4 * block_out_channels[0]`.
    pub fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim
            .unwrap_or(4 * self.block_out_channels.first().copied().unwrap_or(0))
    }

    /// Checks that an `h` x `w` input can go down and back up the U-Net (each downsampling
    /// halves the size, each upsampling doubles it, and the skips must line up).
    pub fn check_input_size(&self, h: usize, w: usize) -> std::result::Result<(), String> {
        let m = self.size_multiple();
        if h == 0 || w == 0 || h % m != 0 || w % m != 0 {
            let chain = |mut s: usize| {
                let mut v = vec![s.to_string()];
                for _ in 1..self.levels() {
                    s /= 2;
                    v.push(s.to_string());
                }
                v.join(" -> ")
            };
            return Err(format!(
                "a {}-level U-Net needs height and width divisible by 2^{} = {m} (e.g. {}), got {h}x{w}",
                self.levels(),
                self.levels().saturating_sub(1),
                chain(m * (h / m).max(1)),
            ));
        }
        Ok(())
    }

    /// Checks every field and the structure: the scalar checks of `validate_fields`, then a
    /// dry build of the network ([`crate::nets::unet::param_specs`], no weights allocated), which
    /// finds GroupNorm groups that do not divide a channel count and attention heads wider than
    /// their channels, naming the layer.
    pub fn validate(&self) -> Result<()> {
        self.validate_fields()?;
        crate::nets::unet::param_specs(self)?;
        Ok(())
    }

    /// The checks of single fields and of the block lists' lengths.
    pub(crate) fn validate_fields(&self) -> Result<()> {
        let bad = |name: &str, msg: String| Err(Error::param(name, msg));
        let n = self.block_out_channels.len();
        if n == 0 {
            return bad("block_out_channels", "must list at least one level".into());
        }
        // Bounds on what a config may declare, far above any published UNet2DModel (at most 6
        // levels, 3 layers per block, 2048 channels), so that a config read from a file cannot
        // make the dry build below (one record per parameter tensor) grow without limit.
        if n > MAX_LEVELS {
            return bad(
                "block_out_channels",
                format!("{n} levels, expected at most {MAX_LEVELS}"),
            );
        }
        if self.layers_per_block > MAX_LAYERS_PER_BLOCK {
            return bad(
                "layers_per_block",
                format!(
                    "got {}, expected at most {MAX_LAYERS_PER_BLOCK}",
                    self.layers_per_block
                ),
            );
        }
        let widths = self
            .block_out_channels
            .iter()
            .map(|&c| ("block_out_channels", c))
            .chain([
                ("in_channels", self.in_channels),
                ("out_channels", self.out_channels),
                ("norm_num_groups", self.norm_num_groups),
                ("time_embedding_dim", self.time_embedding_dim.unwrap_or(0)),
                ("attention_head_dim", self.attention_head_dim.unwrap_or(0)),
                ("attn_norm_num_groups", self.attn_norm_num_groups.unwrap_or(0)),
            ]);
        for (name, c) in widths {
            if c > MAX_CHANNELS {
                return bad(name, format!("got {c}, expected at most {MAX_CHANNELS}"));
            }
        }
        if let Some(i) = self.block_out_channels.iter().position(|&c| c == 0) {
            return bad("block_out_channels", format!("entry {i} is 0"));
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return bad(
                "down_block_types/up_block_types",
                format!(
                    "{} down and {} up block types for {n} block_out_channels; all three must have the same length",
                    self.down_block_types.len(),
                    self.up_block_types.len()
                ),
            );
        }
        if self.in_channels == 0 || self.out_channels == 0 {
            return bad("in_channels/out_channels", "must be at least 1".into());
        }
        if self.layers_per_block == 0 {
            return bad("layers_per_block", "must be at least 1".into());
        }
        if self.downsample_padding > 1 {
            return bad(
                "downsample_padding",
                format!(
                    "got {}, expected 0 or 1 (other paddings change the feature-map sizes so the skips no longer line up)",
                    self.downsample_padding
                ),
            );
        }
        if !(self.dropout >= 0.0 && self.dropout < 1.0) {
            return bad(
                "dropout",
                format!("got {}, expected a number in [0, 1)", self.dropout),
            );
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return bad(
                "norm_eps",
                format!("got {}, expected a positive number", self.norm_eps),
            );
        }
        if !(self.mid_block_scale_factor.is_finite() && self.mid_block_scale_factor != 0.0) {
            return bad(
                "mid_block_scale_factor",
                format!(
                    "got {}, expected a finite non-zero number",
                    self.mid_block_scale_factor
                ),
            );
        }
        if !self.freq_shift.is_finite() {
            return bad("freq_shift", format!("got {}", self.freq_shift));
        }
        let half = self.block_out_channels[0] / 2;
        if half == 0 || (half as f64 - self.freq_shift) == 0.0 {
            return bad(
                "freq_shift",
                format!(
                    "the sinusoidal embedding divides by half_dim - freq_shift = {} - {}, which must be non-zero",
                    half, self.freq_shift
                ),
            );
        }
        if self.norm_num_groups == 0 {
            return bad("norm_num_groups", "must be at least 1".into());
        }
        if self.attention_head_dim == Some(0) {
            return bad("attention_head_dim", "must be at least 1 (or null)".into());
        }
        if self.attn_norm_num_groups == Some(0) {
            return bad("attn_norm_num_groups", "must be at least 1 (or null)".into());
        }
        if self.num_class_embeds == Some(0) {
            return bad("num_class_embeds", "must be at least 1 (or null)".into());
        }
        match (self.null_class, self.num_class_embeds) {
            (Some(c), None) => {
                return bad(
                    "_diffuse_null_class",
                    format!("null class {c} given for a network without num_class_embeds"),
                )
            }
            (Some(c), Some(k)) if c + 1 != k => {
                return bad(
                    "_diffuse_null_class",
                    format!(
                        "null class {c}: expected the last of the {k} class embeddings ({})",
                        k - 1
                    ),
                )
            }
            _ => {}
        }
        if self.time_embedding_dim == Some(0) {
            return bad("time_embedding_dim", "must be at least 1 (or null)".into());
        }
        if let Some([h, w]) = self.sample_size {
            self.check_input_size(h, w)
                .map_err(|e| Error::param("sample_size", e))?;
        }
        Ok(())
    }

    /// The config as diffusers' `config.json` object (with `_class_name` and
    /// `_diffusers_version`), which `UNet2DModel.from_pretrained` reads.
    pub fn to_json(&self) -> Value {
        let num = |x: f64| {
            if x.fract() == 0.0 && x.abs() < 1e15 {
                json!(x as i64)
            } else {
                json!(x)
            }
        };
        let resample = |r: ResampleType| match r {
            ResampleType::Conv => "conv",
            ResampleType::Resnet => "resnet",
        };
        json!({
            "_class_name": "UNet2DModel",
            "_diffusers_version": DIFFUSERS_VERSION,
            "sample_size": match self.sample_size {
                None => Value::Null,
                Some([h, w]) if h == w => json!(h),
                Some([h, w]) => json!([h, w]),
            },
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "center_input_sample": self.center_input_sample,
            "time_embedding_type": "positional",
            "time_embedding_dim": self.time_embedding_dim,
            "freq_shift": num(self.freq_shift),
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "down_block_types": self.down_block_types.iter().map(|b| b.name()).collect::<Vec<_>>(),
            "mid_block_type": if self.mid_block { json!("UNetMidBlock2D") } else { Value::Null },
            "up_block_types": self.up_block_types.iter().map(|b| b.name()).collect::<Vec<_>>(),
            "block_out_channels": self.block_out_channels,
            "layers_per_block": self.layers_per_block,
            "mid_block_scale_factor": num(self.mid_block_scale_factor),
            "downsample_padding": self.downsample_padding,
            "downsample_type": resample(self.downsample_type),
            "upsample_type": resample(self.upsample_type),
            "dropout": self.dropout,
            "act_fn": "silu",
            "attention_head_dim": self.attention_head_dim,
            "norm_num_groups": self.norm_num_groups,
            "attn_norm_num_groups": self.attn_norm_num_groups,
            "norm_eps": self.norm_eps,
            "resnet_time_scale_shift": match self.resnet_time_scale_shift {
                TimeScaleShift::Default => "default",
                TimeScaleShift::ScaleShift => "scale_shift",
            },
            "add_attention": self.add_attention,
            "class_embed_type": Value::Null,
            "num_class_embeds": self.num_class_embeds,
            "num_train_timesteps": self.num_train_timesteps,
            "_diffuse_null_class": self.null_class,
        })
    }

    /// Parses a diffusers `UNet2DModel` config object. Missing keys take diffusers' defaults;
    /// errors name the key (`down_block_types[2]: 'SkipDownBlock2D' is not supported ...`).
    /// The result is validated ([`UNetConfig::validate`]).
    pub fn from_json(value: &Value) -> Result<Self> {
        Self::from_json_reporting(value).map(|p| p.value)
    }

    /// [`UNetConfig::from_json`], with the fields of the object that were ignored.
    pub fn from_json_reporting(value: &Value) -> Result<crate::config::Parsed<Self>> {
        let parsed =
            crate::config::unet::parse(value).map_err(|e| Error::param("unet config", e.to_string()))?;
        parsed.value.validate()?;
        Ok(parsed)
    }

    /// Parses a config from JSON text (see [`UNetConfig::from_json`]).
    pub fn from_json_str(text: &str) -> Result<Self> {
        Self::from_json_str_reporting(text).map(|p| p.value)
    }

    /// [`UNetConfig::from_json_str`], with the fields of the text that were ignored.
    pub fn from_json_str_reporting(text: &str) -> Result<crate::config::Parsed<Self>> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| Error::param("unet config", format!("invalid JSON: {e}")))?;
        Self::from_json_reporting(&v)
    }
}

impl Serialize for UNetConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl<'de> Deserialize<'de> for UNetConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        UNetConfig::from_json(&v).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_diffusers_defaults_and_round_trip() {
        let c = UNetConfig::from_json_str("{}").unwrap();
        assert_eq!(c, UNetConfig::default());
        for name in PRESETS {
            let p = UNetConfig::preset(name, 1, 16).unwrap();
            let back = UNetConfig::from_json(&p.to_json()).unwrap();
            assert_eq!(back, p, "{name}");
        }
    }

    #[test]
    fn ddpm_cifar10_config_parses() {
        // google/ddpm-cifar10-32's config.json, as published.
        let text = r#"{
          "_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", "act_fn": "silu",
          "attention_head_dim": null, "block_out_channels": [128, 256, 256, 256],
          "center_input_sample": false,
          "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
          "downsample_padding": 0, "flip_sin_to_cos": false, "freq_shift": 1, "in_channels": 3,
          "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06,
          "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
          "time_embedding_type": "positional",
          "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]
        }"#;
        let c = UNetConfig::from_json_str(text).unwrap();
        let p = UNetConfig::preset("cifar10", 3, 32).unwrap();
        // The preset is this config plus the paper's training dropout.
        assert_eq!(UNetConfig { dropout: 0.1, ..c }, p);
    }

    /// Found by the fuzzer: a huge `layers_per_block` made the dry build allocate without
    /// limit (300 MB for 65536) or panic (capacity overflow for 2^63 - 1).
    #[test]
    fn sizes_a_config_declares_are_bounded() {
        for (key, value) in [
            ("layers_per_block", "9223372036854775807"),
            ("layers_per_block", "65536"),
            ("block_out_channels", "[8, 1000000]"),
            ("norm_num_groups", "4294967296"),
            ("in_channels", "70000"),
        ] {
            let text =
                format!(r#"{{"block_out_channels": [8, 16], "norm_num_groups": 4, "{key}": {value}}}"#);
            let e = UNetConfig::from_json_str(&text).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains("at most"), "{key} = {value}: {e}");
        }
        let levels = format!(
            r#"{{"block_out_channels": [{}], "down_block_types": [{}], "up_block_types": [{}]}}"#,
            vec!["8"; 17].join(","),
            vec!["\"DownBlock2D\""; 17].join(","),
            vec!["\"UpBlock2D\""; 17].join(",")
        );
        let e = UNetConfig::from_json_str(&levels).unwrap_err().to_string();
        assert!(e.contains("17 levels, expected at most 16"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (
                r#"{"time_embedding_type": "fourier"}"#,
                "field `time_embedding_type`: expected one of positional, found \"fourier\"",
            ),
            (r#"{"act_fn": "gelu"}"#, "act_fn"),
            (r#"{"class_embed_type": "timestep"}"#, "class_embed_type"),
            (r#"{"num_class_embeds": 0}"#, "num_class_embeds"),
            (
                r#"{"num_class_embeds": 10, "_diffuse_null_class": 10}"#,
                "_diffuse_null_class",
            ),
            (r#"{"_diffuse_null_class": 3}"#, "_diffuse_null_class"),
            (
                r#"{"down_block_types": ["DownBlock2D", "SkipDownBlock2D"]}"#,
                "field `down_block_types[1]`: expected one of DownBlock2D",
            ),
            (
                r#"{"up_block_types": ["CrossAttnUpBlock2D"]}"#,
                "up_block_types[0]",
            ),
            (
                r#"{"resnet_time_scale_shift": "spatial"}"#,
                "resnet_time_scale_shift",
            ),
            (r#"{"downsample_type": "fir"}"#, "downsample_type"),
            (
                r#"{"mid_block_type": "UNetMidBlock2DCrossAttn"}"#,
                "mid_block_type",
            ),
            (r#"{"layers_per_block": -1}"#, "layers_per_block"),
            (r#"{"norm_num_groups": null}"#, "norm_num_groups"),
            (r#"{"_class_name": "UNet2DConditionModel"}"#, "_class_name"),
            (r#"{"downsample_padding": 2}"#, "downsample_padding"),
            (r#"{"block_out_channels": [32, 64]}"#, "same length"),
            (
                r#"{"block_out_channels": [30, 60, 60, 60], "norm_num_groups": 32}"#,
                "norm_num_groups",
            ),
            (r#"{"sample_size": 28}"#, "divisible by 2^3 = 8"),
        ];
        for (text, want) in cases {
            let e = UNetConfig::from_json_str(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
        // Keys that carry no math are accepted, unknown keys too (diffusers adds them), and
        // 'swish' is silu.
        let ok = r#"{"_diffusers_version": "0.1", "_name_or_path": "x", "foo": 1, "act_fn": "swish", "dropout": 0.0}"#;
        assert!(UNetConfig::from_json_str(ok).is_ok());
    }

    #[test]
    fn presets_state_their_sizes() {
        assert!(UNetConfig::preset("demo", 1, 28).is_ok());
        assert!(UNetConfig::preset("demo", 3, 32).is_ok());
        assert!(UNetConfig::preset("demo", 3, 16).is_ok());
        assert!(UNetConfig::preset("cifar10", 3, 16).is_ok());
        let e = UNetConfig::preset("cifar10", 1, 28).unwrap_err().to_string();
        assert!(
            e.contains("image_size") && e.contains("divisible by 2^3 = 8") && e.contains("28x28"),
            "{e}"
        );
        let e = UNetConfig::preset("demo", 1, 30).unwrap_err().to_string();
        assert!(e.contains("(e.g. 28 -> 14 -> 7)"), "{e}");
        let e = UNetConfig::preset("huge", 1, 28).unwrap_err().to_string();
        assert!(e.contains("demo, mnist, cifar10, bench"), "{e}");
    }
}
