//! Parsing a diffusers `UNet2DModel` config object into [`UNetConfig`], strictly: every error
//! names the key (see [`crate::nets::config`] for what is accepted).

use serde_json::{Map, Value};

use crate::nets::config::{
    DownBlockType, ResampleType, TimeEmbeddingType, TimeScaleShift, UNetConfig, UpBlockType,
};

/// Keys of `UNet2DModel.__init__` (diffusers 0.42), all understood by [`parse_object`].
const KNOWN_KEYS: [&str; 28] = [
    "sample_size",
    "in_channels",
    "out_channels",
    "center_input_sample",
    "time_embedding_type",
    "time_embedding_dim",
    "freq_shift",
    "flip_sin_to_cos",
    "down_block_types",
    "mid_block_type",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "mid_block_scale_factor",
    "downsample_padding",
    "downsample_type",
    "upsample_type",
    "dropout",
    "act_fn",
    "attention_head_dim",
    "norm_num_groups",
    "attn_norm_num_groups",
    "norm_eps",
    "resnet_time_scale_shift",
    "add_attention",
    "class_embed_type",
    "num_class_embeds",
    "num_train_timesteps",
];

type Parse<T> = std::result::Result<T, String>;

pub(crate) fn parse_object(value: &Value) -> Parse<UNetConfig> {
    let obj = value
        .as_object()
        .ok_or_else(|| format!("expected a JSON object, got {}", type_name(value)))?;
    for key in obj.keys() {
        if !key.starts_with('_') && !KNOWN_KEYS.contains(&key.as_str()) {
            return Err(format!(
                "unknown key '{key}': not a UNet2DModel field this loader understands (a config of another model class?)"
            ));
        }
    }
    if let Some(c) = obj.get("_class_name") {
        if c.as_str() != Some("UNet2DModel") {
            return Err(format!(
                "_class_name is {c}, expected \"UNet2DModel\" (only diffusers' UNet2DModel is supported)"
            ));
        }
    }
    let d = UNetConfig::default();
    let f = Fields(obj);

    if let Some(v) = f.get("time_embedding_type") {
        match v.as_str() {
            Some("positional") => {}
            Some(other) => {
                return Err(format!(
                    "time_embedding_type: '{other}' is not supported; only 'positional' (the DDPM sinusoidal embedding) is implemented"
                ))
            }
            None => return Err(format!("time_embedding_type: expected a string, got {}", type_name(v))),
        }
    }
    if let Some(v) = f.get("act_fn") {
        match v.as_str() {
            Some("silu") | Some("swish") => {}
            _ => {
                return Err(format!(
                    "act_fn: {v} is not supported; only \"silu\" (= \"swish\") is implemented"
                ))
            }
        }
    }
    if let Some(v) = f.get("class_embed_type") {
        return Err(format!(
            "class_embed_type: {v} is not supported; only null (an embedding table of num_class_embeds rows) is implemented"
        ));
    }
    let mid_block = match f.get("mid_block_type") {
        None => obj.get("mid_block_type").is_none() && d.mid_block,
        Some(v) => match v.as_str() {
            Some("UNetMidBlock2D") => true,
            _ => {
                return Err(format!(
                    "mid_block_type: {v} is not supported; expected \"UNetMidBlock2D\" or null"
                ))
            }
        },
    };

    let down_block_types = match f.get("down_block_types") {
        None => d.down_block_types.clone(),
        Some(v) => string_list(v, "down_block_types")?
            .iter()
            .enumerate()
            .map(|(i, s)| match s.strip_prefix("UNetRes").unwrap_or(s) {
                "DownBlock2D" => Ok(DownBlockType::DownBlock2D),
                "AttnDownBlock2D" => Ok(DownBlockType::AttnDownBlock2D),
                other => Err(format!(
                    "down_block_types[{i}]: '{other}' is not supported (supported: DownBlock2D, AttnDownBlock2D)"
                )),
            })
            .collect::<Parse<Vec<_>>>()?,
    };
    let up_block_types = match f.get("up_block_types") {
        None => d.up_block_types.clone(),
        Some(v) => string_list(v, "up_block_types")?
            .iter()
            .enumerate()
            .map(|(i, s)| match s.strip_prefix("UNetRes").unwrap_or(s) {
                "UpBlock2D" => Ok(UpBlockType::UpBlock2D),
                "AttnUpBlock2D" => Ok(UpBlockType::AttnUpBlock2D),
                other => Err(format!(
                    "up_block_types[{i}]: '{other}' is not supported (supported: UpBlock2D, AttnUpBlock2D)"
                )),
            })
            .collect::<Parse<Vec<_>>>()?,
    };
    let resample = |key: &str, default: ResampleType| -> Parse<ResampleType> {
        match f.get(key) {
            None => Ok(default),
            Some(v) => match v.as_str() {
                Some("conv") => Ok(ResampleType::Conv),
                Some("resnet") => Ok(ResampleType::Resnet),
                _ => Err(format!(
                    "{key}: {v} is not supported; expected \"conv\" or \"resnet\""
                )),
            },
        }
    };
    let resnet_time_scale_shift = match f.get("resnet_time_scale_shift") {
        None => d.resnet_time_scale_shift,
        Some(v) => match v.as_str() {
            Some("default") => TimeScaleShift::Default,
            Some("scale_shift") => TimeScaleShift::ScaleShift,
            _ => {
                return Err(format!(
                    "resnet_time_scale_shift: {v} is not supported; expected \"default\" or \"scale_shift\""
                ))
            }
        },
    };
    let sample_size = match f.get("sample_size") {
        None => None,
        Some(v) => {
            if let Some(s) = v.as_u64() {
                Some([s as usize, s as usize])
            } else {
                let l = v
                    .as_array()
                    .filter(|a| a.len() == 2)
                    .and_then(|a| Some([a[0].as_u64()? as usize, a[1].as_u64()? as usize]))
                    .ok_or_else(|| format!("sample_size: expected an integer or [height, width], got {v}"))?;
                Some(l)
            }
        }
    };

    Ok(UNetConfig {
        sample_size,
        in_channels: f.usize("in_channels", d.in_channels)?,
        out_channels: f.usize("out_channels", d.out_channels)?,
        center_input_sample: f.bool("center_input_sample", d.center_input_sample)?,
        time_embedding_type: TimeEmbeddingType::Positional,
        time_embedding_dim: f.opt_usize("time_embedding_dim", d.time_embedding_dim)?,
        freq_shift: f.f64("freq_shift", d.freq_shift)?,
        flip_sin_to_cos: f.bool("flip_sin_to_cos", d.flip_sin_to_cos)?,
        down_block_types,
        mid_block,
        up_block_types,
        block_out_channels: match f.get("block_out_channels") {
            None => d.block_out_channels.clone(),
            Some(v) => v
                .as_array()
                .ok_or_else(|| format!("block_out_channels: expected a list of integers, got {v}"))?
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    c.as_u64()
                        .map(|c| c as usize)
                        .ok_or_else(|| format!("block_out_channels[{i}]: expected an integer, got {c}"))
                })
                .collect::<Parse<Vec<_>>>()?,
        },
        layers_per_block: f.usize("layers_per_block", d.layers_per_block)?,
        mid_block_scale_factor: f.f64("mid_block_scale_factor", d.mid_block_scale_factor)?,
        downsample_padding: f.usize("downsample_padding", d.downsample_padding)?,
        downsample_type: resample("downsample_type", d.downsample_type)?,
        upsample_type: resample("upsample_type", d.upsample_type)?,
        dropout: f.f64("dropout", d.dropout)?,
        attention_head_dim: match obj.get("attention_head_dim") {
            None => d.attention_head_dim,
            Some(_) => f.opt_usize("attention_head_dim", None)?,
        },
        norm_num_groups: f.usize("norm_num_groups", d.norm_num_groups)?,
        attn_norm_num_groups: f.opt_usize("attn_norm_num_groups", d.attn_norm_num_groups)?,
        norm_eps: f.f64("norm_eps", d.norm_eps)?,
        resnet_time_scale_shift,
        add_attention: f.bool("add_attention", d.add_attention)?,
        num_train_timesteps: f.opt_usize("num_train_timesteps", d.num_train_timesteps)?,
        num_class_embeds: f.opt_usize("num_class_embeds", None)?,
        null_class: f.opt_usize("_diffuse_null_class", None)?,
    })
}

/// Typed access to the fields of a config object; every error names the key.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    /// The value of `key`, `None` when absent or null.
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn usize(&self, key: &str, default: usize) -> Parse<usize> {
        match self.0.get(key) {
            None => Ok(default),
            Some(v) => as_usize(v).ok_or_else(|| format!("{key}: expected a non-negative integer, got {v}")),
        }
    }

    fn opt_usize(&self, key: &str, default: Option<usize>) -> Parse<Option<usize>> {
        match self.0.get(key) {
            None => Ok(default),
            Some(Value::Null) => Ok(None),
            Some(v) => as_usize(v)
                .map(Some)
                .ok_or_else(|| format!("{key}: expected a non-negative integer or null, got {v}")),
        }
    }

    fn f64(&self, key: &str, default: f64) -> Parse<f64> {
        match self.0.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| format!("{key}: expected a number, got {v}")),
        }
    }

    fn bool(&self, key: &str, default: bool) -> Parse<bool> {
        match self.0.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| format!("{key}: expected true or false, got {v}")),
        }
    }
}

fn as_usize(v: &Value) -> Option<usize> {
    if let Some(u) = v.as_u64() {
        return usize::try_from(u).ok();
    }
    // 2.0 written by Python as a float is still the integer 2.
    v.as_f64()
        .filter(|x| x.fract() == 0.0 && *x >= 0.0 && *x < 1e15)
        .map(|x| x as usize)
}

fn string_list(v: &Value, key: &str) -> Parse<Vec<String>> {
    v.as_array()
        .ok_or_else(|| format!("{key}: expected a list of block names, got {v}"))?
        .iter()
        .enumerate()
        .map(|(i, s)| {
            s.as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("{key}[{i}]: expected a string, got {s}"))
        })
        .collect()
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}
