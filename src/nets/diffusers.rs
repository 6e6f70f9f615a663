//! diffusers model folders: load a `UNet2DModel` (+ its scheduler config) and export ours in
//! the same layout.
//!
//! A folder is either a pipeline (`DIR/unet/config.json`, `DIR/unet/diffusion_pytorch_model.safetensors`,
//! `DIR/scheduler/scheduler_config.json`, `DIR/model_index.json`) or a bare model
//! (`DIR/config.json`, `DIR/diffusion_pytorch_model.safetensors`). Weights must be safetensors:
//! a `diffusion_pytorch_model.bin` is a Python pickle, which we do not execute; the error says
//! how to convert it. Weights stored as float16/bfloat16 are converted to float32.
//!
//! Old checkpoints (the original `google/ddpm-*` uploads) name attention projections
//! `query`/`key`/`value`/`proj_attn`; they are renamed to `to_q`/`to_k`/`to_v`/`to_out.0` on
//! load, as diffusers does (`_convert_deprecated_attention_blocks`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde_json::json;

use crate::config::Parsed;
use crate::error::{Error, Result};
use crate::io::{atomic_write, write_json};
use crate::nets::config::{UNetConfig, DIFFUSERS_VERSION};
use crate::nets::scheduler_config::{SchedulerClass, SchedulerConfig};
use crate::nets::unet::{self, UNet};

/// The weights file name diffusers writes.
pub const WEIGHTS_FILE: &str = "diffusion_pytorch_model.safetensors";
/// The half-precision variant diffusers writes with `variant="fp16"`.
pub const WEIGHTS_FILE_FP16: &str = "diffusion_pytorch_model.fp16.safetensors";
/// The pickle weights file we refuse to read.
pub const PICKLE_FILE: &str = "diffusion_pytorch_model.bin";

/// Where the pieces of a diffusers folder are.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelFolder {
    /// The UNet's `config.json`.
    pub config: PathBuf,
    /// Its safetensors weights.
    pub weights: PathBuf,
    /// `scheduler/scheduler_config.json` (or `scheduler_config.json` beside the model), if present.
    pub scheduler_config: Option<PathBuf>,
}

/// Finds the files of the diffusers folder `dir` (see the module docs).
pub fn locate(dir: &Path) -> Result<ModelFolder> {
    if !dir.is_dir() {
        return Err(Error::bad_input(
            dir,
            "not a directory (expected a diffusers model folder)",
        ));
    }
    let model_dir = if dir.join("unet").join("config.json").is_file() {
        dir.join("unet")
    } else if dir.join("config.json").is_file() {
        dir.to_path_buf()
    } else {
        return Err(Error::bad_input(
            dir,
            "no UNet config: expected unet/config.json (a pipeline folder) or config.json (a model folder)",
        ));
    };
    let weights = if model_dir.join(WEIGHTS_FILE).is_file() {
        model_dir.join(WEIGHTS_FILE)
    } else if model_dir.join(WEIGHTS_FILE_FP16).is_file() {
        model_dir.join(WEIGHTS_FILE_FP16)
    } else if model_dir.join(PICKLE_FILE).is_file() {
        return Err(Error::bad_input(
            model_dir.join(PICKLE_FILE),
            format!(
                "PyTorch pickle weights are not loaded (unpickling can run arbitrary code); convert them to \
                 safetensors with Python: `UNet2DModel.from_pretrained(\"{}\").save_pretrained(OUT_DIR, \
                 safe_serialization=True)`",
                model_dir.display()
            ),
        ));
    } else if model_dir.join(format!("{WEIGHTS_FILE}.index.json")).is_file() {
        return Err(Error::bad_input(
            model_dir.join(format!("{WEIGHTS_FILE}.index.json")),
            "sharded checkpoints are not supported; save the model as one safetensors file",
        ));
    } else {
        return Err(Error::bad_input(
            &model_dir,
            format!("no weights: expected {WEIGHTS_FILE} next to config.json"),
        ));
    };
    let scheduler_config = [
        dir.join("scheduler").join("scheduler_config.json"),
        model_dir.join("scheduler_config.json"),
    ]
    .into_iter()
    .find(|p| p.is_file());
    Ok(ModelFolder {
        config: model_dir.join("config.json"),
        weights,
        scheduler_config,
    })
}

/// Reads and parses a `UNet2DModel` `config.json`; errors name the file and the field.
pub fn read_unet_config(path: &Path) -> Result<UNetConfig> {
    read_unet_config_reporting(path).map(|p| p.value)
}

/// [`read_unet_config`], with the fields of the file that were ignored (see
/// [`crate::config::unet`]; listed by `--verbose`).
pub fn read_unet_config_reporting(path: &Path) -> Result<Parsed<UNetConfig>> {
    let text = crate::io::read_text(path)?;
    UNetConfig::from_json_str_reporting(&text).map_err(|e| match e {
        Error::InvalidParameter { name, message } => Error::bad_input(
            path,
            if name == "unet config" {
                message
            } else {
                format!("{name}: {message}")
            },
        ),
        other => other,
    })
}

/// The fields of a diffusers folder's files that the loader ignored: `(file, fields)` for
/// `config.json` and the scheduler config (`scheduler_config` when given, else the folder's),
/// files with none left out. For `--verbose`; the files are read again.
pub fn ignored_fields(dir: &Path, scheduler_config: Option<&Path>) -> Result<Vec<(PathBuf, Vec<String>)>> {
    let files = locate(dir)?;
    let mut out = Vec::new();
    let unet = read_unet_config_reporting(&files.config)?;
    if !unet.ignored.is_empty() {
        out.push((files.config.clone(), unet.ignored));
    }
    if let Some(p) = scheduler_config.or(files.scheduler_config.as_deref()) {
        let s = SchedulerConfig::from_file_reporting(p)?;
        if !s.ignored.is_empty() {
            out.push((p.to_path_buf(), s.ignored));
        }
    }
    Ok(out)
}

/// Reads a safetensors file into f32 tensors on the CPU, renaming deprecated attention names.
pub fn read_weights(path: &Path) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let raw = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| Error::bad_input(path, format!("not a readable safetensors file: {e}")))?;
    let mut out = HashMap::with_capacity(raw.len());
    for (name, t) in raw {
        let t = match t.dtype() {
            DType::F32 => t,
            DType::F16 | DType::BF16 | DType::F64 => t.to_dtype(DType::F32)?,
            other => {
                return Err(Error::bad_input(
                    path,
                    format!("tensor {name} has dtype {other:?}, expected a float type"),
                ))
            }
        };
        out.insert(rename_deprecated(&name), t);
    }
    Ok(out)
}

/// `...attentions.N.query.weight` -> `...attentions.N.to_q.weight` (and `key` -> `to_k`,
/// `value` -> `to_v`, `proj_attn` -> `to_out.0`); other names are returned unchanged.
pub fn rename_deprecated(name: &str) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    let n = parts.len();
    if n >= 4 && parts[n - 4] == "attentions" && matches!(parts[n - 1], "weight" | "bias") {
        let new = match parts[n - 2] {
            "query" => "to_q",
            "key" => "to_k",
            "value" => "to_v",
            "proj_attn" => "to_out.0",
            _ => return name.to_string(),
        };
        return format!("{}.{new}.{}", parts[..n - 2].join("."), parts[n - 1]);
    }
    name.to_string()
}

/// A loaded diffusers model: its config, network and (when the folder has one) scheduler config.
#[derive(Clone, Debug)]
pub struct DiffusersModel {
    /// The UNet config.
    pub config: UNetConfig,
    /// The network, weights loaded.
    pub unet: UNet,
    /// The scheduler config, if the folder has one.
    pub scheduler: Option<SchedulerConfig>,
    /// Where the files were.
    pub files: ModelFolder,
}

/// Loads the `UNet2DModel` of the diffusers folder `dir` (and its scheduler config when there
/// is one) onto `device`. Missing, unexpected and mis-shaped tensors are reported by name.
pub fn load(dir: &Path, device: &Device) -> Result<DiffusersModel> {
    let files = locate(dir)?;
    let (config, unet) = load_network(&files, device)?;
    let scheduler = match &files.scheduler_config {
        Some(p) => Some(SchedulerConfig::from_file(p)?),
        None => None,
    };
    Ok(DiffusersModel {
        config,
        unet,
        scheduler,
        files,
    })
}

/// The config and network of a located folder (not its scheduler config), on `device`.
pub fn load_network(files: &ModelFolder, device: &Device) -> Result<(UNetConfig, UNet)> {
    let (config, tensors) = load_tensors(files)?;
    let tensors = tensors
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_device(device)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    let unet = unet::from_tensors(&config, tensors, device)?;
    Ok((config, unet))
}

/// The config and the checked f32 CPU tensors of a located folder (for training from a
/// diffusers checkpoint, or for inspecting it).
pub fn load_tensors(files: &ModelFolder) -> Result<(UNetConfig, HashMap<String, Tensor>)> {
    let config = read_unet_config(&files.config)?;
    let tensors = read_weights(&files.weights)?;
    unet::check_tensors(&config, &tensors).map_err(|m| Error::bad_input(&files.weights, m))?;
    Ok((config, tensors))
}

/// Writes `tensors` (diffusers names) and `config` as a diffusers model folder `dir`
/// (`config.json` + `diffusion_pytorch_model.safetensors`) that
/// `UNet2DModel.from_pretrained(dir)` loads. The tensors are checked against the config first.
pub fn export_unet(dir: &Path, config: &UNetConfig, tensors: &HashMap<String, Tensor>) -> Result<()> {
    config.validate()?;
    unet::check_tensors(config, tensors).map_err(|m| Error::param("export", m))?;
    let mut cpu: Vec<(String, Tensor)> = Vec::with_capacity(tensors.len());
    for (k, v) in tensors {
        cpu.push((
            k.clone(),
            v.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.contiguous()?,
        ));
    }
    cpu.sort_by(|a, b| a.0.cmp(&b.0));
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::tensor::serialize(cpu.iter().map(|(k, v)| (k.as_str(), v)), Some(meta))
        .map_err(|e| Error::Numerical(format!("cannot serialise safetensors: {e}")))?;
    atomic_write(&dir.join(WEIGHTS_FILE), &bytes)?;
    write_json(&dir.join("config.json"), &config.to_json())
}

/// [`export_unet`] from a training `VarMap` (as made by [`unet::init_params`]).
pub fn export_unet_varmap(dir: &Path, config: &UNetConfig, varmap: &VarMap) -> Result<()> {
    let tensors: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .map_err(|_| Error::Numerical("VarMap lock poisoned".into()))?
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    export_unet(dir, config, &tensors)
}

/// Writes a whole pipeline folder: `unet/` (as [`export_unet`]), `scheduler/scheduler_config.json`
/// and `model_index.json`, so `DDPMPipeline.from_pretrained(dir)` (or `DDIMPipeline`, per the
/// scheduler class) loads it.
pub fn export_pipeline(
    dir: &Path,
    config: &UNetConfig,
    tensors: &HashMap<String, Tensor>,
    scheduler: &SchedulerConfig,
) -> Result<()> {
    export_unet(&dir.join("unet"), config, tensors)?;
    write_json(
        &dir.join("scheduler").join("scheduler_config.json"),
        &scheduler_json(scheduler),
    )?;
    let pipeline = match scheduler.class {
        SchedulerClass::Ddim => "DDIMPipeline",
        _ => "DDPMPipeline",
    };
    let class = scheduler.class.name();
    write_json(
        &dir.join("model_index.json"),
        &json!({
            "_class_name": pipeline,
            "_diffusers_version": DIFFUSERS_VERSION,
            "scheduler": ["diffusers", class],
            "unet": ["diffusers", "UNet2DModel"],
        }),
    )
}

/// A scheduler config as diffusers' JSON.
pub fn scheduler_json(s: &SchedulerConfig) -> serde_json::Value {
    use crate::denoiser::Prediction;
    use crate::nets::scheduler_config::{
        DiffusersBetaSchedule as B, TimestepSpacing as T, VarianceType as V,
    };
    let mut v = json!({
        "_class_name": s.class.name(),
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": s.num_train_timesteps,
        "beta_start": s.beta_start,
        "beta_end": s.beta_end,
        "beta_schedule": match s.beta_schedule {
            B::Linear => "linear", B::ScaledLinear => "scaled_linear",
            B::SquaredcosCapV2 => "squaredcos_cap_v2", B::Sigmoid => "sigmoid",
        },
        "trained_betas": s.trained_betas,
        "prediction_type": match s.prediction_type {
            Prediction::Eps => "epsilon", Prediction::X0 => "sample", Prediction::V => "v_prediction",
        },
        "clip_sample": s.clip_sample,
        "clip_sample_range": s.clip_sample_range,
        "thresholding": s.thresholding,
        "dynamic_thresholding_ratio": s.dynamic_thresholding_ratio,
        "sample_max_value": s.sample_max_value,
        "timestep_spacing": match s.timestep_spacing { T::Leading => "leading", T::Trailing => "trailing", T::Linspace => "linspace" },
        "steps_offset": s.steps_offset,
        "rescale_betas_zero_snr": s.rescale_betas_zero_snr,
    });
    if let Some(obj) = v.as_object_mut() {
        match s.class {
            SchedulerClass::Ddpm => {
                obj.insert(
                    "variance_type".into(),
                    json!(match s.variance_type {
                        V::FixedSmall => "fixed_small",
                        V::FixedSmallLog => "fixed_small_log",
                        V::FixedLarge => "fixed_large",
                        V::FixedLargeLog => "fixed_large_log",
                        V::Learned => "learned",
                        V::LearnedRange => "learned_range",
                    }),
                );
            }
            SchedulerClass::Ddim => {
                obj.insert("set_alpha_to_one".into(), json!(s.set_alpha_to_one));
            }
            // the fast solvers' own keys are not exported (diffuse exports DDPM / DDIM configs)
            _ => {}
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deprecated_attention_names_are_renamed() {
        assert_eq!(
            rename_deprecated("down_blocks.1.attentions.0.query.weight"),
            "down_blocks.1.attentions.0.to_q.weight"
        );
        assert_eq!(
            rename_deprecated("mid_block.attentions.0.proj_attn.bias"),
            "mid_block.attentions.0.to_out.0.bias"
        );
        assert_eq!(
            rename_deprecated("mid_block.attentions.0.group_norm.bias"),
            "mid_block.attentions.0.group_norm.bias"
        );
        assert_eq!(
            rename_deprecated("down_blocks.0.resnets.0.key.weight"),
            "down_blocks.0.resnets.0.key.weight"
        );
    }

    #[test]
    fn export_then_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = UNetConfig::preset("demo", 3, 8).unwrap();
        let (net, vm) = unet::init_params(&cfg, 9, &Device::Cpu).unwrap();
        export_unet_varmap(dir.path(), &cfg, &vm).unwrap();
        let loaded = load(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(loaded.config, cfg);
        assert!(loaded.scheduler.is_none());
        let x = crate::rng::Rng::new(1)
            .randn(&[2, 3, 8, 8], &Device::Cpu)
            .unwrap();
        let t = Tensor::new(&[3f32, 700.5], &Device::Cpu).unwrap();
        let a = net.forward(&x, &t).unwrap();
        let b = loaded.unet.forward(&x, &t).unwrap();
        // Same weights, same code: bit-identical.
        assert_eq!(
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );

        // A pipeline folder with a scheduler config.
        let p = tempfile::tempdir().unwrap();
        let tensors = crate::nets::diffusers::load_tensors(&locate(dir.path()).unwrap())
            .unwrap()
            .1;
        let sched = SchedulerConfig {
            class: SchedulerClass::Ddim,
            ..SchedulerConfig::default()
        };
        export_pipeline(p.path(), &cfg, &tensors, &sched).unwrap();
        let lp = load(p.path(), &Device::Cpu).unwrap();
        assert_eq!(lp.scheduler, Some(sched));
        assert!(p.path().join("model_index.json").is_file());
    }
}
