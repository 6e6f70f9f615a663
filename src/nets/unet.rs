//! The time-conditioned U-Net (Ronneberger et al. 2015; as adapted by Ho et al. 2020,
//! appendix B), built block for block as diffusers' `UNet2DModel`:
//!
//! ```text
//! x        <- 2 x - 1                                   (center_input_sample only)
//! temb     = time_embedding(sinusoid(t))                [B, 4 * ch0]
//! temb     = temb + class_embedding[c]                  (class-conditional networks only)
//! h        = conv_in(x);  skips = [h]
//! for each level:  h = down_block(h, temb), pushing every resnet/attention output and the
//!                  downsampler output onto skips
//! h        = mid_block(h, temb)
//! for each level (lowest first): h = up_block(h, pop skips, temb)
//! out      = conv_out(silu(conv_norm_out(h)))           [B, out_channels, H, W]
//! ```
//!
//! Parameter names are diffusers' (`conv_in.weight`, `time_embedding.linear_1.weight`,
//! `down_blocks.0.resnets.0.conv1.weight`, `...attentions.0.to_q.weight`, `mid_block...`,
//! `up_blocks...`, `conv_norm_out.*`, `conv_out.*`), so a diffusers safetensors file loads
//! with no renaming (see [`crate::nets::diffusers`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::{Init, VarBuilder, VarMap};

use crate::error::{Error, Result};
use crate::nets::blocks::{AttentionParams, DownBlock, MidBlock, ResnetParams, UpBlock};
use crate::nets::config::{ResampleType, TimeScaleShift, UNetConfig};
use crate::nets::embedding::{timestep_embedding, ClassEmbedding, TimestepEmbedding};
use crate::nets::layers::{Conv2d, GroupNorm};
use crate::rng::Rng;

/// The U-Net. Build it with [`UNet::new`] from any `VarBuilder` (a diffusers checkpoint's
/// tensors, a training `VarMap` made by [`init_params`]).
#[derive(Clone, Debug)]
pub struct UNet {
    config: UNetConfig,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    class_embedding: Option<ClassEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet {
    /// Builds the network described by `config`, fetching every parameter from `vb` under its
    /// diffusers name. Structural problems (GroupNorm groups that do not divide a channel
    /// count, too few channels for one attention head) are errors naming the layer.
    pub fn new(config: &UNetConfig, vb: VarBuilder) -> Result<Self> {
        config.validate_fields()?;
        let ch = &config.block_out_channels;
        let n = ch.len();
        let temb_dim = config.time_embed_dim();
        let resnet = ResnetParams {
            groups: config.norm_num_groups,
            eps: config.norm_eps,
            dropout: config.dropout,
            time_scale_shift: config.resnet_time_scale_shift,
            temb_channels: temb_dim,
            output_scale_factor: 1.0,
        };
        let attn = AttentionParams {
            head_dim: config.attention_head_dim,
            groups: Some(config.norm_num_groups),
            eps: config.norm_eps,
        };

        let conv_in = Conv2d::new(vb.pp("conv_in"), config.in_channels, ch[0], 3, 1, 1)?;
        let time_embedding = TimestepEmbedding::new(vb.pp("time_embedding"), ch[0], temb_dim)?;
        let class_embedding = match config.num_class_embeds {
            Some(k) => Some(ClassEmbedding::new(vb.pp("class_embedding"), k, temb_dim)?),
            None => None,
        };

        let mut down_blocks = Vec::with_capacity(n);
        let mut c_out = ch[0];
        for (i, kind) in config.down_block_types.iter().enumerate() {
            let c_in = c_out;
            c_out = ch[i];
            let last = i == n - 1;
            // As diffusers: DownBlock2D always downsamples by convolution; only
            // AttnDownBlock2D reads `downsample_type`.
            let down = match (last, kind.has_attention()) {
                (true, _) => None,
                (false, true) => Some(config.downsample_type),
                (false, false) => Some(ResampleType::Conv),
            };
            down_blocks.push(DownBlock::new(
                vb.pp("down_blocks").pp(i),
                c_in,
                c_out,
                config.layers_per_block,
                &resnet,
                kind.has_attention().then_some(&attn),
                down,
                config.downsample_padding,
            )?);
        }

        let mid_block = if config.mid_block {
            let c = ch[n - 1];
            let mid_resnet = ResnetParams {
                output_scale_factor: config.mid_block_scale_factor,
                ..resnet
            };
            // diffusers: attn_groups = attn_norm_num_groups, else norm_num_groups with the
            // default time conditioning and no norm at all with scale_shift.
            let groups = config
                .attn_norm_num_groups
                .or(match config.resnet_time_scale_shift {
                    TimeScaleShift::Default => Some(config.norm_num_groups),
                    TimeScaleShift::ScaleShift => None,
                });
            let mid_attn = AttentionParams { groups, ..attn };
            Some(MidBlock::new(
                vb.pp("mid_block"),
                c,
                &mid_resnet,
                config.add_attention.then_some(&mid_attn),
            )?)
        } else {
            None
        };

        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(n);
        let mut c_out = rev[0];
        for (i, kind) in config.up_block_types.iter().enumerate() {
            let prev_out = c_out;
            c_out = rev[i];
            let c_in = rev[(i + 1).min(n - 1)];
            let last = i == n - 1;
            let up = match (last, kind.has_attention()) {
                (true, _) => None,
                (false, true) => Some(config.upsample_type),
                (false, false) => Some(ResampleType::Conv),
            };
            up_blocks.push(UpBlock::new(
                vb.pp("up_blocks").pp(i),
                c_in,
                c_out,
                prev_out,
                config.layers_per_block + 1,
                &resnet,
                kind.has_attention().then_some(&attn),
                up,
            )?);
        }

        Ok(UNet {
            config: config.clone(),
            conv_in,
            time_embedding,
            class_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(
                vb.pp("conv_norm_out"),
                config.norm_num_groups,
                ch[0],
                config.norm_eps,
            )?,
            conv_out: Conv2d::new(vb.pp("conv_out"), ch[0], config.out_channels, 3, 1, 1)?,
        })
    }

    /// The architecture.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Evaluation-mode forward pass (dropout off): `x` `[B, in_channels, H, W]`, `timesteps`
    /// `[B]` (or `[1]`, broadcast) as diffusers' timestep index (index 0 is t = 1; fractional
    /// values allowed) -> `[B, out_channels, H, W]`.
    pub fn forward(&self, x: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        self.forward_t(x, timesteps, None, None)
    }

    /// Evaluation-mode forward pass of a class-conditional network: `class_labels` `[B]` (u32
    /// rows of the class-embedding table; the null class for the unconditional half).
    pub fn forward_class(&self, x: &Tensor, timesteps: &Tensor, class_labels: &Tensor) -> Result<Tensor> {
        self.forward_t(x, timesteps, Some(class_labels), None)
    }

    /// Training-mode forward pass: dropout masks are drawn from `rng`.
    pub fn forward_train(&self, x: &Tensor, timesteps: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        self.forward_t(x, timesteps, None, Some(rng))
    }

    /// The number of class embeddings (`None`: unconditional network).
    pub fn num_class_embeds(&self) -> Option<usize> {
        self.class_embedding.as_ref().map(|e| e.rows())
    }

    /// Forward pass, training mode when `rng` is given (see [`UNet::forward`]). A
    /// class-conditional network needs `class_labels` (`[B]`), an unconditional one refuses them,
    /// as diffusers' `UNet2DModel.forward` does.
    pub fn forward_t(
        &self,
        x: &Tensor,
        timesteps: &Tensor,
        class_labels: Option<&Tensor>,
        mut rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (b, c, h, w) = x.dims4().map_err(|_| {
            Error::param(
                "U-Net input",
                format!("expected [B, C, H, W], got {:?}", x.dims()),
            )
        })?;
        if c != cfg.in_channels {
            return Err(Error::param(
                "U-Net input",
                format!(
                    "{c} channels, but the model takes {} (in_channels)",
                    cfg.in_channels
                ),
            ));
        }
        cfg.check_input_size(h, w)
            .map_err(|e| Error::param("U-Net input", e))?;
        let t = match timesteps.dims() {
            [n] if *n == b => timesteps.clone(),
            [1] => timesteps.broadcast_as(b)?.contiguous()?,
            [] => timesteps.reshape(1)?.broadcast_as(b)?.contiguous()?,
            d => {
                return Err(Error::param(
                    "timesteps",
                    format!("expected shape [{b}] (one per sample) or [1], got {d:?}"),
                ))
            }
        };
        let x = if cfg.center_input_sample {
            ((x * 2.0)? - 1.0)?
        } else {
            x.clone()
        };

        let t_emb = timestep_embedding(&t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)?
            .to_dtype(x.dtype())?;
        let mut temb = self.time_embedding.forward(&t_emb)?;
        match (&self.class_embedding, class_labels) {
            (Some(table), Some(labels)) => {
                if labels.dims() != [b] {
                    return Err(Error::param(
                        "class labels",
                        format!("expected shape [{b}] (one per sample), got {:?}", labels.dims()),
                    ));
                }
                temb = (temb + table.forward(labels)?.to_dtype(x.dtype())?)?;
            }
            (Some(_), None) => {
                return Err(Error::param(
                    "class labels",
                    "the network is class-conditional (num_class_embeds is set): class labels are required",
                ))
            }
            (None, Some(_)) => {
                return Err(Error::param(
                    "class labels",
                    "class labels were given to an unconditional network (no num_class_embeds)",
                ))
            }
            (None, None) => {}
        }
        // Every ResnetBlock2D applies silu to temb before its projection: compute it once.
        let temb_act = crate::ops::silu(&temb)?;

        let mut h = self.conv_in.forward(&x)?;
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            h = block.forward(&h, &temb_act, rng.as_deref_mut(), &mut skips)?;
        }
        if let Some(mid) = &self.mid_block {
            h = mid.forward(&h, &temb_act, rng.as_deref_mut())?;
        }
        for block in &self.up_blocks {
            h = block.forward(&h, &temb_act, rng.as_deref_mut(), &mut skips)?;
        }
        let h = self.conv_norm_out.forward_silu(&h)?;
        self.conv_out.forward(&h)
    }
}

/// One parameter of a U-Net: its diffusers name, shape and initialisation.
#[derive(Clone, Debug)]
pub struct ParamSpec {
    /// Full name, e.g. `down_blocks.0.resnets.0.conv1.weight`.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// How [`init_params`] draws it.
    pub init: Init,
}

/// A `VarBuilder` backend that records what is asked of it and hands out broadcast zeros
/// (no memory per parameter), so the network's parameter list can be had without weights.
struct Recorder(Arc<Mutex<Vec<ParamSpec>>>);

impl candle_nn::var_builder::SimpleBackend for Recorder {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if let Ok(mut v) = self.0.lock() {
            v.push(ParamSpec {
                name: name.to_string(),
                shape: s.dims().to_vec(),
                init: h,
            });
        }
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("the U-Net asks for every parameter with its shape; unexpected request for {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}

/// Every parameter of the network `config` describes, in construction order, with shapes and
/// initialisations; no weights are allocated. Errors are the structural ones of [`UNet::new`].
pub fn param_specs(config: &UNetConfig) -> Result<Vec<ParamSpec>> {
    let log = Arc::new(Mutex::new(Vec::new()));
    let vb = VarBuilder::from_backend(Box::new(Recorder(log.clone())), DType::F32, Device::Cpu);
    UNet::new(config, vb)?;
    let specs = log
        .lock()
        .map_err(|_| Error::Numerical("parameter recorder poisoned".into()))?
        .clone();
    Ok(specs)
}

/// The number of scalar parameters of the network `config` describes.
pub fn num_parameters(config: &UNetConfig) -> Result<usize> {
    Ok(param_specs(config)?
        .iter()
        .map(|p| p.shape.iter().product::<usize>())
        .sum())
}

/// Fresh parameters for `config` in a `VarMap` (for training), drawn from `Rng::new(seed)` in
/// [`param_specs`] order with PyTorch's default initialisation (see [`crate::nets::layers`]),
/// and the network built on them. The same seed gives the same weights on every machine.
pub fn init_params(config: &UNetConfig, seed: u64, device: &Device) -> Result<(UNet, VarMap)> {
    let mut rng = Rng::new(seed);
    let varmap = VarMap::new();
    {
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| Error::Numerical("VarMap lock poisoned".into()))?;
        for spec in param_specs(config)? {
            let n: usize = spec.shape.iter().product();
            let values: Vec<f32> = match spec.init {
                Init::Const(c) => vec![c as f32; n],
                Init::Uniform { lo, up } => (0..n).map(|_| (lo + (up - lo) * rng.uniform()) as f32).collect(),
                Init::Randn { mean, stdev } => (0..n).map(|_| (mean + stdev * rng.normal()) as f32).collect(),
                Init::Kaiming { .. } => {
                    return Err(Error::Numerical(format!(
                        "{}: Kaiming init hint is not used by the U-Net",
                        spec.name
                    )))
                }
            };
            let t = Tensor::from_vec(values, spec.shape.clone(), device)?;
            data.insert(spec.name.clone(), Var::from_tensor(&t)?);
        }
    }
    let unet = UNet::new(config, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
    Ok((unet, varmap))
}

/// The network built on `tensors` (name -> tensor, diffusers names), after checking that
/// exactly the expected tensors are there with the expected shapes
/// ([`check_tensors`]). Tensors are converted to f32 on `device`.
pub fn from_tensors(config: &UNetConfig, tensors: HashMap<String, Tensor>, device: &Device) -> Result<UNet> {
    check_tensors(config, &tensors).map_err(|m| Error::param("U-Net weights", m))?;
    let tensors = tensors
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?.to_device(device)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    UNet::new(config, VarBuilder::from_tensors(tensors, DType::F32, device))
}

/// Compares a set of named tensors with what `config` needs: every missing, unexpected and
/// mis-shaped tensor is listed by name (up to 8 of each kind, then a count).
pub fn check_tensors(
    config: &UNetConfig,
    tensors: &HashMap<String, Tensor>,
) -> std::result::Result<(), String> {
    let specs = param_specs(config).map_err(|e| e.to_string())?;
    let shapes: HashMap<&str, Vec<usize>> = tensors
        .iter()
        .map(|(k, v)| (k.as_str(), v.dims().to_vec()))
        .collect();
    check_shapes(&specs, &shapes)
}

/// [`check_tensors`] on names and shapes only.
pub fn check_shapes(
    specs: &[ParamSpec],
    found: &HashMap<&str, Vec<usize>>,
) -> std::result::Result<(), String> {
    let mut missing = Vec::new();
    let mut wrong = Vec::new();
    for s in specs {
        match found.get(s.name.as_str()) {
            None => missing.push(s.name.clone()),
            Some(d) if *d != s.shape => {
                wrong.push(format!("{} (file {:?}, config expects {:?})", s.name, d, s.shape))
            }
            Some(_) => {}
        }
    }
    let expected: std::collections::HashSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    let mut extra: Vec<String> = found
        .keys()
        .filter(|k| !expected.contains(*k))
        .map(|k| k.to_string())
        .collect();
    extra.sort();
    if missing.is_empty() && wrong.is_empty() && extra.is_empty() {
        return Ok(());
    }
    let list = |what: &str, v: &[String]| -> Option<String> {
        if v.is_empty() {
            return None;
        }
        let shown: Vec<&str> = v.iter().take(8).map(String::as_str).collect();
        let more = if v.len() > 8 {
            format!(", and {} more", v.len() - 8)
        } else {
            String::new()
        };
        Some(format!("{} {what}: {}{more}", v.len(), shown.join(", ")))
    };
    let parts: Vec<String> = [
        list("missing tensor(s)", &missing),
        list("unexpected tensor(s)", &extra),
        list("tensor(s) with the wrong shape", &wrong),
    ]
    .into_iter()
    .flatten()
    .collect();
    Err(format!(
        "the weights do not match the config: {}",
        parts.join("; ")
    ))
}

/// A few lines describing the network: levels, channels, attention, time embedding,
/// parameter count and the feature-map sizes for `image_size` (or the config's sample size).
pub fn summary(config: &UNetConfig, image_size: Option<usize>) -> Result<String> {
    let params = num_parameters(config)?;
    let size = image_size.or(config.sample_size.map(|s| s[0]));
    let mut lines = vec![format!(
        "U-Net (diffusers UNet2DModel layout): {} parameters",
        group_thousands(params)
    )];
    let mut s = size;
    let mut levels = Vec::new();
    for (i, (&c, kind)) in config
        .block_out_channels
        .iter()
        .zip(&config.down_block_types)
        .enumerate()
    {
        let at = s.map(|v| format!(" @ {v}x{v}")).unwrap_or_default();
        levels.push(format!(
            "level {i}: {c} ch{at}, {} resnet(s) down / {} up{}",
            config.layers_per_block,
            config.layers_per_block + 1,
            if kind.has_attention() { ", attention" } else { "" }
        ));
        s = s.map(|v| v / 2);
    }
    lines.extend(levels);
    lines.push(format!(
        "mid block: {}",
        if !config.mid_block {
            "none".to_string()
        } else if config.add_attention {
            "resnet, attention, resnet".to_string()
        } else {
            "resnet, resnet".to_string()
        }
    ));
    lines.push(format!(
        "in/out channels {}/{}; time embedding {} -> {} ({}, freq_shift {}, {}); GroupNorm({}), eps {}; dropout {}",
        config.in_channels,
        config.out_channels,
        config.block_out_channels[0],
        config.time_embed_dim(),
        if config.flip_sin_to_cos { "cos|sin" } else { "sin|cos" },
        config.freq_shift,
        match config.resnet_time_scale_shift {
            TimeScaleShift::Default => "added",
            TimeScaleShift::ScaleShift => "scale-shift",
        },
        config.norm_num_groups,
        config.norm_eps,
        config.dropout
    ));
    Ok(lines.join("\n"))
}

fn group_thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nets::config::PRESETS;

    #[test]
    fn preset_parameter_counts_match_diffusers() {
        // Counts printed by `sum(p.numel() for p in UNet2DModel(**config).parameters())`
        // (diffusers 0.42.1) for the same configs; cifar10 is the DDPM paper's 35.7 M.
        let want = [
            ("demo", 1, 28, 1_062_497),
            ("mnist", 1, 28, 6_469_889),
            ("cifar10", 3, 32, 35_746_307),
            ("bench", 1, 28, 4_170_177),
        ];
        for (name, c, s, n) in want {
            let cfg = UNetConfig::preset(name, c, s).unwrap();
            assert_eq!(num_parameters(&cfg).unwrap(), n, "{name}");
        }
        assert_eq!(PRESETS.len(), want.len());
    }

    #[test]
    fn init_is_seeded_and_torch_like() {
        let cfg = UNetConfig::preset("demo", 1, 16).unwrap();
        let (_, a) = init_params(&cfg, 3, &Device::Cpu).unwrap();
        let (_, b) = init_params(&cfg, 3, &Device::Cpu).unwrap();
        let get = |m: &VarMap, k: &str| {
            m.data().lock().unwrap()[k]
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let w = get(&a, "conv_in.weight");
        assert_eq!(w, get(&b, "conv_in.weight"));
        // fan_in = 1 * 3 * 3 = 9: U(-1/3, 1/3).
        assert!(w.iter().all(|v| v.abs() <= 1.0 / 3.0));
        assert!(w.iter().any(|v| v.abs() > 0.25));
        assert!(get(&a, "conv_norm_out.weight").iter().all(|&v| v == 1.0));
        assert!(get(&a, "conv_norm_out.bias").iter().all(|&v| v == 0.0));
        let (_, c) = init_params(&cfg, 4, &Device::Cpu).unwrap();
        assert_ne!(w, get(&c, "conv_in.weight"));
    }

    #[test]
    fn forward_shapes_and_input_errors() {
        let cfg = UNetConfig::preset("demo", 1, 28).unwrap();
        let (unet, _) = init_params(&cfg, 0, &Device::Cpu).unwrap();
        let x = Tensor::zeros((2, 1, 28, 28), DType::F32, &Device::Cpu).unwrap();
        let t = Tensor::new(&[10f32, 500.0], &Device::Cpu).unwrap();
        assert_eq!(unet.forward(&x, &t).unwrap().dims(), &[2, 1, 28, 28]);
        let x16 = Tensor::zeros((1, 1, 16, 16), DType::F32, &Device::Cpu).unwrap();
        let t1 = Tensor::new(&[3f32], &Device::Cpu).unwrap();
        assert_eq!(unet.forward(&x16, &t1).unwrap().dims(), &[1, 1, 16, 16]);
        let e = unet
            .forward(
                &Tensor::zeros((1, 1, 30, 30), DType::F32, &Device::Cpu).unwrap(),
                &t1,
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("divisible by 2^2 = 4") && e.contains("30x30"), "{e}");
        let e = unet
            .forward(
                &Tensor::zeros((1, 3, 28, 28), DType::F32, &Device::Cpu).unwrap(),
                &t1,
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("3 channels") && e.contains("in_channels"), "{e}");
        let e = unet.forward(&x, &Tensor::new(&[1f32, 2., 3.], &Device::Cpu).unwrap());
        assert!(e.unwrap_err().to_string().contains("timesteps"));
    }

    #[test]
    fn every_parameter_gets_a_gradient_and_dropout_follows_the_mode() {
        // scale_shift + attention everywhere + resnet resampling: every code path is used.
        let cfg = UNetConfig {
            block_out_channels: vec![8, 16],
            down_block_types: vec![crate::nets::config::DownBlockType::AttnDownBlock2D; 2],
            up_block_types: vec![crate::nets::config::UpBlockType::AttnUpBlock2D; 2],
            layers_per_block: 1,
            norm_num_groups: 4,
            attention_head_dim: Some(4),
            resnet_time_scale_shift: TimeScaleShift::ScaleShift,
            downsample_type: ResampleType::Resnet,
            upsample_type: ResampleType::Resnet,
            dropout: 0.5,
            in_channels: 1,
            out_channels: 1,
            ..UNetConfig::default()
        };
        let (net, vm) = init_params(&cfg, 2, &Device::Cpu).unwrap();
        let x = Rng::new(1).randn(&[2, 1, 8, 8], &Device::Cpu).unwrap();
        let t = Tensor::new(&[5f32, 900.0], &Device::Cpu).unwrap();
        let loss = net
            .forward_train(&x, &t, &mut Rng::new(3))
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let data = vm.data().lock().unwrap();
        assert_eq!(data.len(), param_specs(&cfg).unwrap().len());
        for (name, var) in data.iter() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            let n = g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(n.is_finite() && n > 0.0, "{name}: |grad| = {n}");
        }
        // Dropout: eval is deterministic, training depends on the seed.
        let e1 = net.forward(&x, &t).unwrap();
        let e2 = net.forward(&x, &t).unwrap();
        assert_eq!(
            e1.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            e2.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let a = net.forward_train(&x, &t, &mut Rng::new(3)).unwrap();
        let b = net.forward_train(&x, &t, &mut Rng::new(3)).unwrap();
        let c = net.forward_train(&x, &t, &mut Rng::new(4)).unwrap();
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v(&a), v(&b));
        assert_ne!(v(&a), v(&c));
        assert_ne!(v(&a), v(&e1));
    }

    #[test]
    fn shape_check_lists_problems_by_name() {
        let cfg = UNetConfig::preset("demo", 1, 16).unwrap();
        let specs = param_specs(&cfg).unwrap();
        let mut found: HashMap<&str, Vec<usize>> =
            specs.iter().map(|s| (s.name.as_str(), s.shape.clone())).collect();
        assert!(check_shapes(&specs, &found).is_ok());
        found.remove("mid_block.attentions.0.to_q.weight");
        found.insert("conv_in.weight", vec![32, 3, 3, 3]);
        found.insert("extra.weight", vec![1]);
        let e = check_shapes(&specs, &found).unwrap_err();
        assert!(
            e.contains("1 missing tensor(s): mid_block.attentions.0.to_q.weight"),
            "{e}"
        );
        assert!(e.contains("1 unexpected tensor(s): extra.weight"), "{e}");
        assert!(
            e.contains("conv_in.weight (file [32, 3, 3, 3], config expects [32, 1, 3, 3])"),
            "{e}"
        );
    }

    #[test]
    fn summary_mentions_levels_and_count() {
        let cfg = UNetConfig::preset("demo", 1, 28).unwrap();
        let s = summary(&cfg, None).unwrap();
        assert!(s.contains("1,062,497 parameters"), "{s}");
        assert!(s.contains("level 2: 64 ch @ 7x7"), "{s}");
    }
}
