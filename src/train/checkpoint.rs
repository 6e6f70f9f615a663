//! Checkpoints that survive a kill at any moment, and exact resume.
//!
//! A run directory holds its latest complete checkpoint in `checkpoint/`:
//!
//! ```text
//! RUN/checkpoint/model.safetensors      the weights, named as in the VarMap
//! RUN/checkpoint/ema.safetensors        the EMA weights, same names
//! RUN/checkpoint/optimizer.safetensors  AdamW moments `m.<name>`, `v.<name>`
//! RUN/checkpoint/state.json             step, RNG state, data-order state, full config, ...
//! ```
//!
//! Writing never touches the previous checkpoint until the new one is complete: the files go
//! into `RUN/.checkpoint.tmp/` (each fsync'd), then `checkpoint/` is renamed to
//! `checkpoint.old/`, the temporary directory is renamed to `checkpoint/`, and `checkpoint.old/`
//! is removed. Whenever the process dies, either `checkpoint/` or (between the two renames)
//! `checkpoint.old/` is complete, and [`locate`] finds it.
//!
//! Resuming compares the saved config with the current one; [`config_differences`] names
//! every field that differs (field notes, bug 10: a resume that silently changes the run).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::train::metrics::MetricRecord;

/// The directory of the latest complete checkpoint inside a run directory.
pub const CHECKPOINT_DIR: &str = "checkpoint";
/// The previous checkpoint, present only while a new one is being swapped in.
pub const PREVIOUS_DIR: &str = "checkpoint.old";
/// Where a checkpoint is assembled before it is renamed into place.
pub const TEMP_DIR: &str = ".checkpoint.tmp";
/// The weights.
pub const MODEL_FILE: &str = "model.safetensors";
/// The EMA weights.
pub const EMA_FILE: &str = "ema.safetensors";
/// The optimizer moments.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Everything else, as JSON.
pub const STATE_FILE: &str = "state.json";
/// `state.json`'s `format` value.
pub const FORMAT: &str = "diffuse-checkpoint";
/// `state.json`'s `version` value.
pub const VERSION: u32 = 1;

/// The contents of `state.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Always [`FORMAT`].
    pub format: String,
    /// Always [`VERSION`].
    pub version: u32,
    /// Updates done.
    pub step: u64,
    /// Training seconds so far, over all sessions.
    pub elapsed_s: f64,
    /// The training loop's generator (noise, times), positioned after `step` updates.
    pub rng: Rng,
    /// The data order's state, opaque here (owned by the task).
    pub data_state: Value,
    /// The run's full configuration.
    pub config: Value,
    /// EMA updates done (equals `step` for runs trained by [`crate::train::Trainer`]).
    pub ema_updates: u64,
    /// The metrics record of the last step, for a quick look.
    pub last_metrics: Option<MetricRecord>,
}

/// The named tensors of one checkpoint.
pub struct CheckpointTensors<'a> {
    /// The weights.
    pub model: &'a [(String, Tensor)],
    /// The EMA weights.
    pub ema: &'a [(String, Tensor)],
    /// The optimizer moments.
    pub optimizer: &'a [(String, Tensor)],
}

/// Serialises named tensors to safetensors bytes (moved to the CPU, dtypes kept).
pub fn safetensors_bytes(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    safetensors::tensor::serialize(cpu.iter().map(|(n, t)| (n.as_str(), t)), None)
        .map_err(|e| Error::Numerical(format!("cannot encode safetensors: {e}")))
}

/// Reads a safetensors file into named tensors on `device`; a file that is not valid
/// safetensors is an error naming it.
pub fn read_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| Error::bad_input(path, format!("not a readable safetensors file: {e}")))
}

/// Sets every variable of `varmap` from `tensors` (converted to the variable's dtype). The
/// names and shapes must match exactly: a missing, extra or mis-shaped tensor is an error that
/// names it (a checkpoint of another architecture), and nothing is changed in that case.
pub fn load_vars(varmap: &VarMap, tensors: &HashMap<String, Tensor>, source: &Path) -> Result<()> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| Error::Numerical("the VarMap's lock is poisoned".into()))?;
    let mut missing: Vec<&String> = data.keys().filter(|k| !tensors.contains_key(*k)).collect();
    let mut extra: Vec<&String> = tensors.keys().filter(|k| !data.contains_key(*k)).collect();
    if !missing.is_empty() || !extra.is_empty() {
        missing.sort();
        extra.sort();
        let mut msg = String::from("does not match the model:");
        if !missing.is_empty() {
            msg.push_str(&format!(" missing {}", super::optim::join_first(&missing, 5)));
        }
        if !extra.is_empty() {
            msg.push_str(&format!(
                "{} unexpected {}",
                if missing.is_empty() { "" } else { ";" },
                super::optim::join_first(&extra, 5)
            ));
        }
        return Err(Error::bad_input(source, msg));
    }
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut converted = Vec::with_capacity(names.len());
    for name in names {
        let var = &data[name];
        let t = &tensors[name];
        if t.dims() != var.as_tensor().dims() {
            return Err(Error::bad_input(
                source,
                format!(
                    "tensor '{name}' has shape {:?}, the model expects {:?}",
                    t.dims(),
                    var.as_tensor().dims()
                ),
            ));
        }
        let t = t
            .to_dtype(var.as_tensor().dtype())?
            .to_device(var.as_tensor().device())?;
        converted.push((var, t));
    }
    for (var, t) in converted {
        var.set(&t)?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    // Makes the renames durable; directories can be opened and fsync'd on Unix only.
    #[cfg(unix)]
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

fn remove_dir_if_present(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(dir, e)),
    }
}

/// Writes a complete checkpoint into `run_dir/checkpoint/`, replacing the previous one only
/// once the new one is complete on disk. Returns the checkpoint directory.
pub fn save(run_dir: &Path, state: &CheckpointState, tensors: &CheckpointTensors<'_>) -> Result<PathBuf> {
    fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
    let tmp = run_dir.join(TEMP_DIR);
    remove_dir_if_present(&tmp)?; // a leftover from a run killed while saving
    fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    crate::io::atomic_write(&tmp.join(MODEL_FILE), &safetensors_bytes(tensors.model)?)?;
    crate::io::atomic_write(&tmp.join(EMA_FILE), &safetensors_bytes(tensors.ema)?)?;
    crate::io::atomic_write(&tmp.join(OPTIMIZER_FILE), &safetensors_bytes(tensors.optimizer)?)?;
    crate::io::write_json(&tmp.join(STATE_FILE), state)?;
    sync_dir(&tmp)?;

    let current = run_dir.join(CHECKPOINT_DIR);
    let previous = run_dir.join(PREVIOUS_DIR);
    if current.exists() {
        // `previous` can only be a stale copy here (a kill after the swap, before its removal)
        remove_dir_if_present(&previous)?;
        fs::rename(&current, &previous).map_err(|e| Error::io(&current, e))?;
    }
    // If `current` did not exist but `previous` does, a kill fell between the two renames of the
    // last save: `previous` is the newest complete checkpoint and stays until this rename.
    fs::rename(&tmp, &current).map_err(|e| Error::io(&tmp, e))?;
    sync_dir(run_dir)?;
    remove_dir_if_present(&previous)?;
    Ok(current)
}

/// The newest complete checkpoint for `dir`: `dir` itself if it holds `state.json`, else
/// `dir/checkpoint/`, else `dir/checkpoint.old/` (a save interrupted between its renames).
pub fn locate(dir: &Path) -> Result<PathBuf> {
    if dir.join(STATE_FILE).is_file() {
        return Ok(dir.to_path_buf());
    }
    for sub in [CHECKPOINT_DIR, PREVIOUS_DIR] {
        let d = dir.join(sub);
        if d.join(STATE_FILE).is_file() {
            return Ok(d);
        }
    }
    if !dir.exists() {
        return Err(Error::bad_input(
            dir,
            "no such directory (expected a training run)",
        ));
    }
    Err(Error::bad_input(
        dir,
        format!("no checkpoint here (expected {CHECKPOINT_DIR}/{STATE_FILE} or {STATE_FILE})"),
    ))
}

/// Whether `run_dir` holds a checkpoint.
pub fn exists(run_dir: &Path) -> bool {
    locate(run_dir).is_ok()
}

/// Reads and checks `state.json` of the checkpoint directory `ckpt_dir`.
pub fn read_state(ckpt_dir: &Path) -> Result<CheckpointState> {
    let path = ckpt_dir.join(STATE_FILE);
    let state: CheckpointState = crate::io::read_json(&path)?;
    if state.format != FORMAT || state.version != VERSION {
        return Err(Error::bad_input(
            &path,
            format!(
                "format '{}' version {}, expected '{FORMAT}' version {VERSION}",
                state.format, state.version
            ),
        ));
    }
    Ok(state)
}

/// Reads one of a checkpoint's tensor files as f32 on `device`.
pub fn read_f32_tensors(ckpt_dir: &Path, file: &str, device: &Device) -> Result<HashMap<String, Tensor>> {
    let path = ckpt_dir.join(file);
    read_tensors(&path, device)?
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
        .collect()
}

fn short(v: Option<&Value>) -> String {
    match v {
        None => "absent".into(),
        Some(v) => {
            let s = v.to_string();
            if s.chars().count() > 60 {
                format!("{}...", s.chars().take(57).collect::<String>())
            } else {
                s
            }
        }
    }
}

/// The fields of two JSON configs that differ, as `path: checkpoint A, now B` (dotted paths,
/// `[i]` for array entries), sorted by path. Empty when the configs are equal.
pub fn config_differences(saved: &Value, current: &Value) -> Vec<String> {
    fn walk(path: &str, a: Option<&Value>, b: Option<&Value>, out: &mut Vec<String>) {
        match (a, b) {
            (Some(Value::Object(x)), Some(Value::Object(y))) => {
                let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
                keys.sort();
                keys.dedup();
                for k in keys {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    walk(&p, x.get(k), y.get(k), out);
                }
            }
            (Some(Value::Array(x)), Some(Value::Array(y))) if x.len() == y.len() => {
                for (i, (u, v)) in x.iter().zip(y).enumerate() {
                    walk(&format!("{path}[{i}]"), Some(u), Some(v), out);
                }
            }
            (a, b) if a == b => {}
            (a, b) => out.push(format!("{path}: checkpoint {}, now {}", short(a), short(b))),
        }
    }
    let mut out = Vec::new();
    walk("", Some(saved), Some(current), &mut out);
    out
}

/// An error unless the configs are equal; the message lists every differing field.
pub fn check_config(saved: &Value, current: &Value, ckpt_dir: &Path) -> Result<()> {
    let diffs = config_differences(saved, current);
    if diffs.is_empty() {
        return Ok(());
    }
    Err(Error::bad_input(
        ckpt_dir,
        format!(
            "the run's configuration differs from the checkpoint's, so it cannot be resumed \
             exactly ({}); use the checkpoint's settings or start a new run in another directory",
            diffs.join("; ")
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn state(step: u64) -> CheckpointState {
        CheckpointState {
            format: FORMAT.into(),
            version: VERSION,
            step,
            elapsed_s: 1.5,
            rng: Rng::new(3),
            data_state: json!({"epoch": 2}),
            config: json!({"lr": 0.001}),
            ema_updates: step,
            last_metrics: None,
        }
    }

    fn named(v: f32) -> Vec<(String, Tensor)> {
        vec![(
            "a.weight".into(),
            Tensor::new(&[v, v + 1.0], &Device::Cpu).unwrap(),
        )]
    }

    fn save_step(dir: &Path, step: u64) -> PathBuf {
        let (m, e, o) = (named(step as f32), named(0.5), named(-1.0));
        save(
            dir,
            &state(step),
            &CheckpointTensors {
                model: &m,
                ema: &e,
                optimizer: &o,
            },
        )
        .unwrap()
    }

    #[test]
    fn save_then_locate_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!exists(dir.path()));
        let c = save_step(dir.path(), 10);
        assert_eq!(c, dir.path().join(CHECKPOINT_DIR));
        let c2 = save_step(dir.path(), 20);
        assert_eq!(locate(dir.path()).unwrap(), c2);
        assert_eq!(locate(&c2).unwrap(), c2); // the checkpoint directory itself works too
        assert_eq!(read_state(&c2).unwrap(), state(20));
        let t = read_f32_tensors(&c2, MODEL_FILE, &Device::Cpu).unwrap();
        assert_eq!(t["a.weight"].to_vec1::<f32>().unwrap(), vec![20.0, 21.0]);
        // nothing but the checkpoint is left in the run directory
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![CHECKPOINT_DIR.to_string()]);
    }

    /// A kill at each point of a save leaves a complete checkpoint that `locate` finds.
    #[test]
    fn every_crash_point_leaves_a_complete_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path();
        save_step(run, 10);
        // (1) killed while writing the temporary directory: a half-written temp dir
        fs::create_dir_all(run.join(TEMP_DIR)).unwrap();
        fs::write(run.join(TEMP_DIR).join(MODEL_FILE), b"half").unwrap();
        assert_eq!(read_state(&locate(run).unwrap()).unwrap().step, 10);
        // (2) killed between the two renames: only checkpoint.old exists
        fs::rename(run.join(CHECKPOINT_DIR), run.join(PREVIOUS_DIR)).unwrap();
        assert_eq!(locate(run).unwrap(), run.join(PREVIOUS_DIR));
        assert_eq!(read_state(&locate(run).unwrap()).unwrap().step, 10);
        // the next save recovers: the new checkpoint replaces both leftovers
        save_step(run, 30);
        assert_eq!(read_state(&locate(run).unwrap()).unwrap().step, 30);
        assert!(!run.join(PREVIOUS_DIR).exists() && !run.join(TEMP_DIR).exists());
        // (3) killed after the swap, before removing checkpoint.old: the new one wins
        fs::create_dir_all(run.join(PREVIOUS_DIR)).unwrap();
        fs::write(run.join(PREVIOUS_DIR).join(STATE_FILE), b"stale").unwrap();
        assert_eq!(read_state(&locate(run).unwrap()).unwrap().step, 30);
        save_step(run, 40);
        assert_eq!(read_state(&locate(run).unwrap()).unwrap().step, 40);
        assert!(!run.join(PREVIOUS_DIR).exists());
    }

    #[test]
    fn config_differences_name_each_field() {
        let a = json!({"trainer": {"seed": 1, "optimizer": {"lr": 0.001, "betas": [0.9, 0.999]}},
                       "task": {"hidden": 128}});
        let b = json!({"trainer": {"seed": 1, "optimizer": {"lr": 0.002, "betas": [0.9, 0.99]}},
                       "task": {"hidden": 128, "extra": true}});
        let d = config_differences(&a, &b);
        assert_eq!(
            d,
            vec![
                "task.extra: checkpoint absent, now true",
                "trainer.optimizer.betas[1]: checkpoint 0.999, now 0.99",
                "trainer.optimizer.lr: checkpoint 0.001, now 0.002",
            ]
        );
        assert!(config_differences(&a, &a).is_empty());
        let e = check_config(&a, &b, Path::new("run/checkpoint")).unwrap_err();
        assert!(e.is_user_error());
        assert!(
            e.to_string()
                .contains("trainer.optimizer.lr: checkpoint 0.001, now 0.002"),
            "{e}"
        );
    }

    #[test]
    fn load_vars_is_strict_and_all_or_nothing() {
        let varmap = VarMap::new();
        let w = candle_core::Var::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
        let b = candle_core::Var::zeros(2, DType::F32, &Device::Cpu).unwrap();
        varmap.data().lock().unwrap().insert("w".into(), w.clone());
        varmap.data().lock().unwrap().insert("b".into(), b.clone());
        let src = Path::new("model.safetensors");
        let mut t = HashMap::new();
        t.insert(
            "w".to_string(),
            Tensor::ones((2, 2), DType::F64, &Device::Cpu).unwrap(),
        );
        let e = load_vars(&varmap, &t, src).unwrap_err().to_string();
        assert!(e.contains("missing b"), "{e}");
        t.insert(
            "b".to_string(),
            Tensor::ones(3, DType::F32, &Device::Cpu).unwrap(),
        );
        let e = load_vars(&varmap, &t, src).unwrap_err().to_string();
        assert!(e.contains("'b' has shape [3], the model expects [2]"), "{e}");
        // nothing was written by the failed loads
        assert_eq!(w.as_tensor().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        t.insert(
            "b".to_string(),
            Tensor::ones(2, DType::F32, &Device::Cpu).unwrap(),
        );
        t.insert(
            "c".to_string(),
            Tensor::ones(2, DType::F32, &Device::Cpu).unwrap(),
        );
        let e = load_vars(&varmap, &t, src).unwrap_err().to_string();
        assert!(e.contains("unexpected c"), "{e}");
        t.remove("c");
        load_vars(&varmap, &t, src).unwrap();
        assert_eq!(w.as_tensor().sum_all().unwrap().to_scalar::<f32>().unwrap(), 4.0);
    }

    #[test]
    fn unreadable_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.safetensors");
        fs::write(&p, b"garbage").unwrap();
        let e = read_tensors(&p, &Device::Cpu).unwrap_err().to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("safetensors"),
            "{e}"
        );
        let e = locate(dir.path()).unwrap_err().to_string();
        assert!(e.contains("no checkpoint here"), "{e}");
        fs::write(dir.path().join(STATE_FILE), b"{\"format\": \"other\"}").unwrap();
        assert!(read_state(dir.path()).is_err());
    }
}
