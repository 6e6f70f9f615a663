//! diffusers' `UNet2DModel` `config.json` as a serde-derived [`UNetFile`], resolved into a
//! [`UNetConfig`] with `UNet2DModel.__init__`'s defaults (diffusers 0.42; field meanings: see
//! [`UNetConfig`]).
//!
//! Unknown fields are accepted and listed ([`Parsed::ignored`]; diffusers adds keys with every
//! release). A field of the wrong type, or a value this crate does not implement and that would
//! change the network's output (Fourier time embeddings, class-embedding types,
//! `SkipDownBlock2D`, ...), is an error naming the field. `_class_name`, when present, must be
//! `UNet2DModel`. Counts may be written as integral floats (`2.0`, as Python computes them).
//! Sizes and consistency are checked afterwards by [`UNetConfig::validate`].

use serde::Deserialize;
use serde_json::Value;

use super::{found_value, present, Count, FieldError, Parsed};
use crate::nets::config::{
    DownBlockType, ResampleType, TimeEmbeddingType, TimeScaleShift, UNetConfig, UpBlockType,
};

/// A `config.json` as written. Absent fields take diffusers' defaults; `null` means "absent"
/// for the string-valued fields, "none" for the optional counts, and is an error for the
/// plain counts, numbers and booleans.
#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct UNetFile {
    /// `_class_name`: must be `UNet2DModel` when present.
    #[serde(rename = "_class_name", deserialize_with = "present")]
    pub class_name: Option<Option<Value>>,
    /// `_diffuse_null_class`: the class id of the unconditional embedding row (ours).
    #[serde(rename = "_diffuse_null_class")]
    pub null_class: Option<Count>,
    /// Image size: an integer or `[height, width]`.
    pub sample_size: Option<Value>,
    /// Input channels.
    pub in_channels: Count,
    /// Output channels.
    pub out_channels: Count,
    /// `2 x - 1` on the input.
    pub center_input_sample: bool,
    /// `positional` only.
    pub time_embedding_type: Option<TimeEmbeddingType>,
    /// Width of the time embedding.
    pub time_embedding_dim: Option<Count>,
    /// The sinusoidal embedding's frequency shift.
    pub freq_shift: f64,
    /// Cosines first.
    pub flip_sin_to_cos: bool,
    /// One per level: `DownBlock2D`, `AttnDownBlock2D`.
    pub down_block_types: Option<Vec<DownBlockType>>,
    /// `UNetMidBlock2D`, or null for none.
    #[serde(deserialize_with = "present")]
    pub mid_block_type: Option<Option<MidBlockType>>,
    /// One per level: `UpBlock2D`, `AttnUpBlock2D`.
    pub up_block_types: Option<Vec<UpBlockType>>,
    /// Channels per level.
    pub block_out_channels: Option<Vec<usize>>,
    /// ResNet blocks per level.
    pub layers_per_block: Count,
    /// The mid block's output scale.
    pub mid_block_scale_factor: f64,
    /// Padding of the downsampling convolution.
    pub downsample_padding: Count,
    /// `conv` or `resnet`.
    pub downsample_type: Option<ResampleType>,
    /// `conv` or `resnet`.
    pub upsample_type: Option<ResampleType>,
    /// Dropout.
    pub dropout: f64,
    /// `silu` (= `swish`) only.
    pub act_fn: Option<ActFn>,
    /// Attention head width (null: one head).
    #[serde(deserialize_with = "present")]
    pub attention_head_dim: Option<Option<Count>>,
    /// GroupNorm groups.
    pub norm_num_groups: Count,
    /// The attention blocks' GroupNorm groups.
    pub attn_norm_num_groups: Option<Count>,
    /// GroupNorm epsilon.
    pub norm_eps: f64,
    /// `default` or `scale_shift`.
    pub resnet_time_scale_shift: Option<TimeScaleShift>,
    /// Attention in the mid block.
    pub add_attention: bool,
    /// Must be null (a table of `num_class_embeds` rows is the one class embedding implemented).
    pub class_embed_type: Option<Value>,
    /// Rows of the class-embedding table.
    pub num_class_embeds: Option<Count>,
    /// T of the training schedule (informational).
    pub num_train_timesteps: Option<Count>,
}

/// `mid_block_type` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum MidBlockType {
    /// ResNet, attention, ResNet.
    UNetMidBlock2D,
}

/// `act_fn` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum ActFn {
    /// x * sigmoid(x).
    #[serde(rename = "silu", alias = "swish")]
    Silu,
}

impl Default for UNetFile {
    fn default() -> Self {
        let d = UNetConfig::default();
        UNetFile {
            class_name: None,
            null_class: None,
            sample_size: None,
            in_channels: Count(d.in_channels),
            out_channels: Count(d.out_channels),
            center_input_sample: d.center_input_sample,
            time_embedding_type: None,
            time_embedding_dim: d.time_embedding_dim.map(Count),
            freq_shift: d.freq_shift,
            flip_sin_to_cos: d.flip_sin_to_cos,
            down_block_types: None,
            mid_block_type: None,
            up_block_types: None,
            block_out_channels: None,
            layers_per_block: Count(d.layers_per_block),
            mid_block_scale_factor: d.mid_block_scale_factor,
            downsample_padding: Count(d.downsample_padding),
            downsample_type: None,
            upsample_type: None,
            dropout: d.dropout,
            act_fn: None,
            attention_head_dim: None,
            norm_num_groups: Count(d.norm_num_groups),
            attn_norm_num_groups: d.attn_norm_num_groups.map(Count),
            norm_eps: d.norm_eps,
            resnet_time_scale_shift: None,
            add_attention: d.add_attention,
            class_embed_type: None,
            num_class_embeds: None,
            num_train_timesteps: d.num_train_timesteps.map(Count),
        }
    }
}

/// Parses a `config.json` object into a [`UNetConfig`] (not yet validated: see
/// [`UNetConfig::from_json`]).
pub fn parse(v: &Value) -> Result<Parsed<UNetConfig>, FieldError> {
    let Parsed { value: f, ignored } = super::from_value::<UNetFile>(v)?;
    let d = UNetConfig::default();
    if let Some(c) = &f.class_name {
        let c = c.as_ref().unwrap_or(&Value::Null);
        if c.as_str() != Some("UNet2DModel") {
            return Err(FieldError::at(
                "_class_name",
                format!(
                    "expected \"UNet2DModel\" (only diffusers' UNet2DModel is supported), found {}",
                    found_value(c)
                ),
            ));
        }
    }
    if let Some(v) = &f.class_embed_type {
        return Err(FieldError::at(
            "class_embed_type",
            format!(
                "expected null (only an embedding table of num_class_embeds rows is implemented), found {}",
                found_value(v)
            ),
        ));
    }
    let sample_size = match &f.sample_size {
        None => None,
        Some(v) => {
            let n = |x: &Value| x.as_u64().and_then(|s| usize::try_from(s).ok());
            let size = match v {
                Value::Array(a) if a.len() == 2 => n(&a[0]).zip(n(&a[1])).map(|(h, w)| [h, w]),
                other => n(other).map(|s| [s, s]),
            };
            Some(size.ok_or_else(|| {
                FieldError::at(
                    "sample_size",
                    format!("expected an integer or [height, width], found {}", found_value(v)),
                )
            })?)
        }
    };
    let mid_block = match f.mid_block_type {
        None => d.mid_block,
        Some(None) => false,
        Some(Some(MidBlockType::UNetMidBlock2D)) => true,
    };
    let _: Option<ActFn> = f.act_fn;
    Ok(Parsed {
        value: UNetConfig {
            sample_size,
            in_channels: f.in_channels.0,
            out_channels: f.out_channels.0,
            center_input_sample: f.center_input_sample,
            time_embedding_type: f.time_embedding_type.unwrap_or(TimeEmbeddingType::Positional),
            time_embedding_dim: f.time_embedding_dim.map(|c| c.0),
            freq_shift: f.freq_shift,
            flip_sin_to_cos: f.flip_sin_to_cos,
            down_block_types: f.down_block_types.unwrap_or(d.down_block_types),
            mid_block,
            up_block_types: f.up_block_types.unwrap_or(d.up_block_types),
            block_out_channels: f.block_out_channels.unwrap_or(d.block_out_channels),
            layers_per_block: f.layers_per_block.0,
            mid_block_scale_factor: f.mid_block_scale_factor,
            downsample_padding: f.downsample_padding.0,
            downsample_type: f.downsample_type.unwrap_or(d.downsample_type),
            upsample_type: f.upsample_type.unwrap_or(d.upsample_type),
            dropout: f.dropout,
            attention_head_dim: match f.attention_head_dim {
                None => d.attention_head_dim,
                Some(c) => c.map(|c| c.0),
            },
            norm_num_groups: f.norm_num_groups.0,
            attn_norm_num_groups: f.attn_norm_num_groups.map(|c| c.0),
            norm_eps: f.norm_eps,
            resnet_time_scale_shift: f.resnet_time_scale_shift.unwrap_or(d.resnet_time_scale_shift),
            add_attention: f.add_attention,
            num_train_timesteps: f.num_train_timesteps.map(|c| c.0),
            num_class_embeds: f.num_class_embeds.map(|c| c.0),
            null_class: f.null_class.map(|c| c.0),
        },
        ignored,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Parsed<UNetConfig>, FieldError> {
        parse(&serde_json::from_str(text).unwrap())
    }

    fn err(text: &str) -> String {
        parse_str(text).unwrap_err().to_string()
    }

    #[test]
    fn wrong_types_name_the_field() {
        assert_eq!(
            err(r#"{"layers_per_block": -1}"#),
            "field `layers_per_block`: expected a non-negative integer, found -1"
        );
        assert_eq!(
            err(r#"{"norm_num_groups": null}"#),
            "field `norm_num_groups`: expected a non-negative integer, found null"
        );
        assert_eq!(
            err(r#"{"flip_sin_to_cos": 1}"#),
            "field `flip_sin_to_cos`: expected a boolean, found 1"
        );
        assert_eq!(
            err(r#"{"block_out_channels": [32, "64"]}"#),
            "field `block_out_channels[1]`: expected a non-negative integer, found \"64\""
        );
        assert!(err(r#"{"down_block_types": ["DownBlock2D", "SkipDownBlock2D"]}"#)
            .starts_with("field `down_block_types[1]`: expected one of"));
        assert!(err(r#"{"time_embedding_type": "fourier"}"#)
            .starts_with("field `time_embedding_type`: expected one of positional, found \"fourier\""));
        assert!(err(r#"{"act_fn": "gelu"}"#).starts_with("field `act_fn`"));
        assert!(err(r#"{"class_embed_type": "timestep"}"#).starts_with("field `class_embed_type`"));
        assert!(err(r#"{"_class_name": null}"#).starts_with("field `_class_name`"));
        assert!(err(r#"{"sample_size": [32]}"#).starts_with("field `sample_size`"));
        assert!(err(r#"{"mid_block_type": "UNetMidBlock2DCrossAttn"}"#).starts_with("field `mid_block_type`"));
    }

    #[test]
    fn unknown_fields_are_accepted_and_listed() {
        let p = parse_str(
            r#"{"_diffusers_version": "0.1", "_name_or_path": "x", "cross_attention_dim": 768, "act_fn": "swish", "layers_per_block": 1.0}"#,
        )
        .unwrap();
        assert_eq!(p.ignored, vec!["cross_attention_dim".to_string()]);
        assert_eq!(p.value.layers_per_block, 1);
        // null mid block: none; absent: diffusers' default (one)
        assert!(!parse_str(r#"{"mid_block_type": null}"#).unwrap().value.mid_block);
        assert!(parse_str("{}").unwrap().value.mid_block);
        // null head width: one head; absent: 8
        assert_eq!(
            parse_str(r#"{"attention_head_dim": null}"#)
                .unwrap()
                .value
                .attention_head_dim,
            None
        );
        assert_eq!(parse_str("{}").unwrap().value.attention_head_dim, Some(8));
        // diffusers' old `UNetRes` block names
        assert_eq!(
            parse_str(r#"{"down_block_types": ["UNetResDownBlock2D"]}"#)
                .unwrap()
                .value
                .down_block_types,
            vec![DownBlockType::DownBlock2D]
        );
    }

    #[test]
    fn committed_fixtures_round_trip() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/diffusers");
        for case in [
            "no_mid_block_1ch16/config.json",
            "attn_multihead_1ch16/unet/config.json",
            "class_cond_1ch16/config.json",
            "ddpm_like_deprecated_fp16_3ch32/config.json",
        ] {
            let text = std::fs::read_to_string(root.join(case)).unwrap();
            let v: Value = serde_json::from_str(&text).unwrap();
            let p = parse(&v).unwrap_or_else(|e| panic!("{case}: {e}"));
            p.value.validate().unwrap();
            // what we write back parses to the same config, and carries every field we read
            let back = parse(&p.value.to_json()).unwrap();
            assert_eq!(back.value, p.value, "{case}");
            assert!(back.ignored.is_empty(), "{case}: {:?}", back.ignored);
            // the fixture's own values were read
            let obj = v.as_object().unwrap();
            if let Some(b) = obj.get("block_out_channels") {
                let want: Vec<usize> = serde_json::from_value(b.clone()).unwrap();
                assert_eq!(p.value.block_out_channels, want, "{case}");
            }
            if let Some(n) = obj.get("layers_per_block").and_then(Value::as_u64) {
                assert_eq!(p.value.layers_per_block as u64, n, "{case}");
            }
        }
    }
}
