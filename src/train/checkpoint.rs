//! Checkpoints that survive a kill at any moment, and exact resume.
//!
//! A run directory holds its latest complete checkpoint in `checkpoint/`:
//!
//! ```text
//! RUN/checkpoint/model.safetensors      the weights, named as in the VarMap
//! RUN/checkpoint/ema.safetensors        the EMA weights, same names
//! RUN/checkpoint/optimizer.safetensors  AdamW moments `m.<name>`, `v.<name>`
//! RUN/checkpoint/state.json             step, RNG state, data-order state, full config, ...
//! RUN/checkpoint/manifest.json          size and FNV-1a checksum of each file above, written last
//! ```
//!
//! Writing never touches the previous checkpoint until the new one is complete: the files go
//! into `RUN/.checkpoint.tmp/` (each fsync'd), the manifest last, then `checkpoint/` is renamed
//! to `checkpoint.old/`, the temporary directory is renamed to `checkpoint/`, and
//! `checkpoint.old/` is removed. Whenever the process dies, either `checkpoint/` or (between
//! the two renames) `checkpoint.old/` is complete, and [`locate`] finds it. Reading checks every
//! file against the manifest ([`locate`]: every size; [`read_file`]: size and checksum), so a
//! partial or damaged file is never read back even on a file system that does not keep the
//! rename promise. A failed save (full disk, read-only directory) leaves the previous
//! checkpoint as it was.
//!
//! Resuming compares the saved config with the current one; [`config_differences`] names
//! every field that differs (field notes, bug 10: a resume that silently changes the run).

use std::collections::{BTreeMap, HashMap};
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
/// Sizes and checksums of the other files, written last.
pub const MANIFEST_FILE: &str = "manifest.json";
/// `state.json`'s `format` value.
pub const FORMAT: &str = "diffuse-checkpoint";
/// `state.json`'s `version` value.
pub const VERSION: u32 = 1;

/// The contents of `state.json` (our own file: an unknown field is an error naming it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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

/// The contents of `manifest.json`: every other file of the checkpoint with its size and
/// FNV-1a 64 checksum. It is written last, so a checkpoint directory whose files all match
/// its manifest is complete; one that does not is never read back.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    /// Each file's size and checksum, by name.
    pub files: BTreeMap<String, FileDigest>,
}

/// `manifest.json`'s `format` value.
pub const MANIFEST_FORMAT: &str = "diffuse-checkpoint-manifest-1";

/// A file's size and checksum.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDigest {
    /// Length in bytes.
    pub bytes: u64,
    /// FNV-1a (64-bit) of the bytes, 16 hex digits.
    pub fnv1a64: String,
}

impl FileDigest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        FileDigest {
            bytes: bytes.len() as u64,
            fnv1a64: format!("{h:016x}"),
        }
    }
}

/// The files every checkpoint holds besides the manifest.
pub const FILES: [&str; 4] = [MODEL_FILE, EMA_FILE, OPTIMIZER_FILE, STATE_FILE];

/// Reads `ckpt_dir/manifest.json`: `Ok(None)` for a checkpoint written before manifests
/// existed, an error naming the file when it is unreadable or does not list exactly [`FILES`].
pub fn read_manifest(ckpt_dir: &Path) -> Result<Option<Manifest>> {
    let path = ckpt_dir.join(MANIFEST_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let m: Manifest = crate::io::read_json(&path)?;
    if m.format != MANIFEST_FORMAT {
        return Err(Error::bad_input(
            &path,
            format!("format '{}', expected '{MANIFEST_FORMAT}'", m.format),
        ));
    }
    if let Some((name, d)) = m
        .files
        .iter()
        .find(|(_, d)| d.fnv1a64.len() != 16 || !d.fnv1a64.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(Error::bad_input(
            &path,
            format!(
                "the checksum of {name} is '{}', expected 16 hex digits",
                d.fnv1a64
            ),
        ));
    }
    let names: Vec<&str> = m.files.keys().map(String::as_str).collect();
    let mut want = FILES.to_vec();
    want.sort_unstable();
    if names != want {
        return Err(Error::bad_input(
            &path,
            format!("lists {names:?}, expected exactly {want:?}"),
        ));
    }
    Ok(Some(m))
}

fn damaged(path: &Path, what: String) -> Error {
    Error::bad_input(
        path,
        format!("{what}: a partial or damaged file, so this checkpoint is not read (resume from another checkpoint or start a new run)"),
    )
}

/// Checks that every file of the checkpoint `ckpt_dir` exists with the size its manifest
/// records (cheap: no file is read but the manifest). A checkpoint without a manifest passes
/// when its four files exist.
pub fn check_complete(ckpt_dir: &Path) -> Result<()> {
    let manifest = read_manifest(ckpt_dir)?;
    for name in FILES {
        let path = ckpt_dir.join(name);
        let len = match fs::metadata(&path) {
            Ok(m) if m.is_file() => m.len(),
            Ok(_) => return Err(damaged(&path, "not a file".into())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(damaged(&path, "missing".into()))
            }
            Err(e) => return Err(Error::io(&path, e)),
        };
        if let Some(d) = manifest.as_ref().and_then(|m| m.files.get(name)) {
            if d.bytes != len {
                return Err(damaged(
                    &path,
                    format!("{len} bytes, {MANIFEST_FILE} records {}", d.bytes),
                ));
            }
        }
    }
    Ok(())
}

/// The bytes of one file of a checkpoint, checked against its manifest (size and checksum)
/// when there is one: nothing partial or damaged is ever returned.
pub fn read_file(ckpt_dir: &Path, name: &str) -> Result<Vec<u8>> {
    let path = ckpt_dir.join(name);
    let bytes = fs::read(&path).map_err(|e| Error::io(&path, e))?;
    if let Some(m) = read_manifest(ckpt_dir)? {
        let want = m
            .files
            .get(name)
            .ok_or_else(|| damaged(&path, format!("not listed in {MANIFEST_FILE}")))?;
        let got = FileDigest::of(&bytes);
        if &got != want {
            return Err(damaged(
                &path,
                format!(
                    "{} bytes with checksum {}, {MANIFEST_FILE} records {} bytes with checksum {}",
                    got.bytes, got.fnv1a64, want.bytes, want.fnv1a64
                ),
            ));
        }
    }
    Ok(bytes)
}

/// The named tensors of one of a checkpoint's safetensors files, checked against the manifest
/// ([`read_file`]), dtypes kept.
pub fn read_checkpoint_tensors(
    ckpt_dir: &Path,
    name: &str,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let path = ckpt_dir.join(name);
    let bytes = read_file(ckpt_dir, name)?;
    candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| Error::bad_input(&path, format!("not a readable safetensors file: {e}")))
}

/// Where a save may be paused for tests (see [`test_pause`]).
pub const PAUSE_ENV: &str = "DIFFUSE_TEST_PAUSE_IN_CHECKPOINT";

/// A test hook: when the environment variable [`PAUSE_ENV`] is `STAGE` or `STAGE:K`, the K-th
/// (default first) time this process reaches `stage` it prints `DIFFUSE_TEST_PAUSED STAGE` on
/// stderr and sleeps for a minute, so that a test can kill it exactly there. Stages of
/// [`save`]: `tmp-dir`, `model`, `ema`, `optimizer`, `state`, `manifest`, `swap`, `done`; of
/// [`crate::io::atomic_write`]: `partial NAME` (half of file NAME written).
pub fn test_pause(stage: &str) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::OnceLock;
    static WANT: OnceLock<Option<(String, usize)>> = OnceLock::new();
    static HITS: AtomicUsize = AtomicUsize::new(0);
    let want = WANT.get_or_init(|| {
        let v = std::env::var(PAUSE_ENV).ok()?;
        match v.rsplit_once(':') {
            Some((s, k)) if k.parse::<usize>().is_ok() => Some((s.to_string(), k.parse().ok()?)),
            _ => Some((v, 1)),
        }
    });
    if let Some((s, k)) = want {
        if s == stage && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *k {
            eprintln!("DIFFUSE_TEST_PAUSED {stage}");
            std::thread::sleep(std::time::Duration::from_secs(60));
        }
    }
}

/// Adds what a failed save leaves behind to an I/O error's message (the kind is kept, so the
/// exit code still says whose fault it was).
fn failed_save(e: Error, run_dir: &Path, step: u64) -> Error {
    let kept = match locate(run_dir) {
        Ok(d) => match read_state(&d) {
            Ok(s) => format!("the checkpoint of step {} in {} is intact", s.step, d.display()),
            Err(_) => format!("the previous checkpoint in {} is intact", d.display()),
        },
        Err(_) => "no earlier checkpoint exists".into(),
    };
    match e {
        Error::Io { path, source } => Error::Io {
            path,
            source: std::io::Error::new(
                source.kind(),
                format!("{source}; the checkpoint of step {step} was not written, {kept}"),
            ),
        },
        other => other,
    }
}

/// Writes a complete checkpoint into `run_dir/checkpoint/`, replacing the previous one only
/// once the new one is complete on disk. Returns the checkpoint directory. On failure (a full
/// disk, a read-only directory) the previous checkpoint is left as it was, the temporary
/// directory is removed, and the error says so.
pub fn save(run_dir: &Path, state: &CheckpointState, tensors: &CheckpointTensors<'_>) -> Result<PathBuf> {
    let tmp = run_dir.join(TEMP_DIR);
    let result = save_inner(run_dir, &tmp, state, tensors);
    if result.is_err() {
        // best effort: a leftover is removed by the next save anyway
        let _ = fs::remove_dir_all(&tmp);
    }
    result.map_err(|e| failed_save(e, run_dir, state.step))
}

fn save_inner(
    run_dir: &Path,
    tmp: &Path,
    state: &CheckpointState,
    tensors: &CheckpointTensors<'_>,
) -> Result<PathBuf> {
    fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
    remove_dir_if_present(tmp)?; // a leftover from a run killed while saving
    fs::create_dir_all(tmp).map_err(|e| Error::io(tmp, e))?;
    test_pause("tmp-dir");
    let mut state_json = serde_json::to_string_pretty(state)
        .map_err(|e| Error::Numerical(format!("cannot encode the checkpoint state: {e}")))?;
    state_json.push('\n');
    let files: [(&str, Vec<u8>); 4] = [
        (MODEL_FILE, safetensors_bytes(tensors.model)?),
        (EMA_FILE, safetensors_bytes(tensors.ema)?),
        (OPTIMIZER_FILE, safetensors_bytes(tensors.optimizer)?),
        (STATE_FILE, state_json.into_bytes()),
    ];
    let mut digests = BTreeMap::new();
    for (name, bytes) in &files {
        crate::io::atomic_write(&tmp.join(name), bytes)?;
        digests.insert(name.to_string(), FileDigest::of(bytes));
        test_pause(name.split('.').next().unwrap_or(name));
    }
    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        files: digests,
    };
    crate::io::write_json(&tmp.join(MANIFEST_FILE), &manifest)?;
    sync_dir(tmp)?;
    test_pause("manifest");

    let current = run_dir.join(CHECKPOINT_DIR);
    let previous = run_dir.join(PREVIOUS_DIR);
    if current.exists() {
        // `previous` can only be a stale copy here (a kill after the swap, before its removal)
        remove_dir_if_present(&previous)?;
        fs::rename(&current, &previous).map_err(|e| Error::io(&current, e))?;
        test_pause("swap");
    }
    // If `current` did not exist but `previous` does, a kill fell between the two renames of the
    // last save: `previous` is the newest complete checkpoint and stays until this rename.
    fs::rename(tmp, &current).map_err(|e| Error::io(tmp, e))?;
    sync_dir(run_dir)?;
    test_pause("done");
    remove_dir_if_present(&previous)?;
    Ok(current)
}

/// The candidates for a checkpoint directory in `dir`, newest first: `dir` itself, then
/// `dir/checkpoint/`, then `dir/checkpoint.old/` (a save interrupted between its renames).
fn candidates(dir: &Path) -> [PathBuf; 3] {
    [
        dir.to_path_buf(),
        dir.join(CHECKPOINT_DIR),
        dir.join(PREVIOUS_DIR),
    ]
}

/// The first checkpoint directory in `dir` that holds a `state.json` or a manifest, complete
/// or not (for refusing to start a fresh run over it).
pub fn present(dir: &Path) -> Option<PathBuf> {
    candidates(dir)
        .into_iter()
        .find(|d| d.join(STATE_FILE).exists() || d.join(MANIFEST_FILE).exists())
}

/// The newest complete checkpoint for `dir` ([`check_complete`]): `dir` itself if it is one,
/// else `dir/checkpoint/`, else `dir/checkpoint.old/`. When none is complete, the error names
/// the first damaged file found.
pub fn locate(dir: &Path) -> Result<PathBuf> {
    let mut first_error = None;
    for d in candidates(dir) {
        if !(d.join(STATE_FILE).exists() || d.join(MANIFEST_FILE).exists()) {
            continue;
        }
        match check_complete(&d) {
            Ok(()) => return Ok(d),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
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

/// Whether `run_dir` holds a complete checkpoint.
pub fn exists(run_dir: &Path) -> bool {
    locate(run_dir).is_ok()
}

/// Reads and checks `state.json` of the checkpoint directory `ckpt_dir` (against the manifest
/// when there is one).
pub fn read_state(ckpt_dir: &Path) -> Result<CheckpointState> {
    let path = ckpt_dir.join(STATE_FILE);
    let bytes = read_file(ckpt_dir, STATE_FILE)?;
    let text = String::from_utf8(bytes).map_err(|e| {
        Error::bad_input(
            &path,
            format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })?;
    // through the config layer: errors name the field (`field \`step\`: expected ...`)
    let state: CheckpointState = crate::config::from_str(&text)
        .map(|p| p.value)
        .map_err(|e| Error::bad_input(&path, e.to_string()))?;
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

/// Reads one of a checkpoint's tensor files as f32 on `device` (checked against the manifest).
pub fn read_f32_tensors(ckpt_dir: &Path, file: &str, device: &Device) -> Result<HashMap<String, Tensor>> {
    read_checkpoint_tensors(ckpt_dir, file, device)?
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
        ckpt_dir.join(STATE_FILE),
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

    /// state.json and the run configs inside it are our own files: a field we do not know
    /// (a typo, a file of another version) is an error naming it, at any depth.
    #[test]
    fn our_json_files_reject_unknown_fields() {
        let reject = |v: Value, what: &str| {
            let e = match what {
                "state" => serde_json::from_value::<CheckpointState>(v).map(|_| ()),
                "trainer" => serde_json::from_value::<crate::train::TrainerConfig>(v).map(|_| ()),
                "image" => serde_json::from_value::<crate::train::image::ImageTrainConfig>(v).map(|_| ()),
                _ => serde_json::from_value::<crate::train::toy::ToyTrainConfig>(v).map(|_| ()),
            }
            .unwrap_err()
            .to_string();
            assert!(e.contains("unknown field `extra`"), "{what}: {e}");
        };
        let m = crate::train::MetricRecord {
            step: 1,
            loss: 0.5,
            lr: 1e-3,
            grad_norm: 1.0,
            elapsed_s: 0.1,
            eval: None,
        };
        let mut st = state(2);
        st.last_metrics = Some(m.clone());
        let v = serde_json::to_value(&st).unwrap();
        assert_eq!(serde_json::from_value::<CheckpointState>(v.clone()).unwrap(), st);
        let mut top = v.clone();
        top["extra"] = json!(1);
        reject(top, "state");
        let mut nested = v.clone();
        nested["last_metrics"]["extra"] = json!(1);
        reject(nested, "state");
        let mut rng = v;
        rng["rng"]["extra"] = json!(1);
        reject(rng, "state");
        let trainer = crate::train::TrainerConfig {
            seed: 0,
            optimizer: crate::train::AdamWConfig::default(),
            ema: crate::train::EmaConfig::default(),
        };
        let t = serde_json::to_value(&trainer).unwrap();
        for path in [&[][..], &["optimizer"][..], &["ema"][..]] {
            let mut t = t.clone();
            let mut at = &mut t;
            for k in path {
                at = &mut at[*k];
            }
            at["extra"] = json!(1);
            reject(t, "trainer");
        }
        let image = crate::train::image::ImageTrainConfig {
            data: crate::data::DataSpec::default(),
            n_images: 4,
            data_checksum: "0".into(),
            preset: "demo".into(),
            unet: json!({}),
            schedule: crate::schedule::BetaSchedule::from_name("linear").unwrap(),
            timesteps: 10,
            prediction: crate::denoiser::Prediction::Eps,
            batch: 2,
            flip: false,
            cond_drop: None,
        };
        let mut i = serde_json::to_value(&image).unwrap();
        i["extra"] = json!(1);
        reject(i.clone(), "image");
        let mut i = serde_json::to_value(&image).unwrap();
        i["data"]["extra"] = json!(1);
        reject(i, "image");
        let toy = crate::train::toy::ToyTrainConfig {
            data: "moons".into(),
            n_data: 10,
            data_checksum: "0".into(),
            model: crate::nets::mlp::MlpConfig::new(2),
            batch: 2,
            log_snr: Default::default(),
            cond_drop: None,
            labels_checksum: None,
        };
        let mut y = serde_json::to_value(&toy).unwrap();
        y["extra"] = json!(1);
        reject(y.clone(), "toy");
        let mut y = serde_json::to_value(&toy).unwrap();
        y["model"]["extra"] = json!(1);
        reject(y, "toy");
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

    /// A checkpoint whose files do not match its manifest is never read back: `locate` falls
    /// back to the older complete one, or names the damaged file.
    #[test]
    fn partial_or_damaged_files_are_never_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path();
        save_step(run, 10);
        let ckpt = run.join(CHECKPOINT_DIR);
        let manifest = read_manifest(&ckpt).unwrap().unwrap();
        assert_eq!(manifest.files.len(), 4);
        // a truncated file (a file system that broke the rename promise)
        let model = fs::read(ckpt.join(MODEL_FILE)).unwrap();
        fs::write(ckpt.join(MODEL_FILE), &model[..model.len() / 2]).unwrap();
        let e = locate(run).unwrap_err();
        assert!(e.is_user_error());
        let msg = e.to_string();
        assert!(
            msg.contains("model.safetensors") && msg.contains("a partial or damaged file"),
            "{msg}"
        );
        // ... unless the previous checkpoint is still there: then that one is used
        save_step(&run.join("other"), 5);
        fs::rename(run.join("other").join(CHECKPOINT_DIR), run.join(PREVIOUS_DIR)).unwrap();
        assert_eq!(locate(run).unwrap(), run.join(PREVIOUS_DIR));
        assert_eq!(read_state(&locate(run).unwrap()).unwrap().step, 5);
        fs::remove_dir_all(run.join(PREVIOUS_DIR)).unwrap();
        // a same-size change is caught by the checksum when the file is read
        let mut flipped = model.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        fs::write(ckpt.join(MODEL_FILE), &flipped).unwrap();
        assert_eq!(locate(run).unwrap(), ckpt);
        let e = read_f32_tensors(&ckpt, MODEL_FILE, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("checksum") && e.contains("manifest.json records"),
            "{e}"
        );
        fs::write(ckpt.join(MODEL_FILE), &model).unwrap();
        assert!(read_f32_tensors(&ckpt, MODEL_FILE, &Device::Cpu).is_ok());
        // a missing file
        fs::remove_file(ckpt.join(EMA_FILE)).unwrap();
        assert!(locate(run)
            .unwrap_err()
            .to_string()
            .contains("ema.safetensors: missing"));
        // a damaged checkpoint still blocks a fresh run in the directory
        assert_eq!(present(run), Some(ckpt.clone()));
        // a checkpoint written before manifests existed is read as before
        fs::write(ckpt.join(EMA_FILE), &model).unwrap();
        fs::remove_file(ckpt.join(MANIFEST_FILE)).unwrap();
        assert_eq!(read_state(&locate(run).unwrap()).unwrap().step, 10);
    }

    /// A save that cannot write (here: the run directory's path runs through a file, which
    /// stops root too) fails with an error naming the path and leaves the previous checkpoint.
    #[test]
    fn a_failed_save_keeps_the_previous_checkpoint_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        save_step(&run, 10);
        // the temporary directory's place is taken by a file that cannot be removed as a dir
        fs::write(run.join(TEMP_DIR), b"not a directory").unwrap();
        let (m, e, o) = (named(1.0), named(0.5), named(-1.0));
        let t = CheckpointTensors {
            model: &m,
            ema: &e,
            optimizer: &o,
        };
        let err = save(&run, &state(20), &t).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(".checkpoint.tmp")
                && msg.contains("the checkpoint of step 20 was not written")
                && msg.contains("the checkpoint of step 10"),
            "{msg}"
        );
        assert_eq!(read_state(&locate(&run).unwrap()).unwrap().step, 10);
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
        // a field we do not know, and one of the wrong type, by name
        let mut v = serde_json::to_value(state(1)).unwrap();
        v["extra"] = json!(1);
        fs::write(dir.path().join(STATE_FILE), v.to_string()).unwrap();
        let e = read_state(dir.path()).unwrap_err().to_string();
        assert!(e.contains("state.json: field `extra`: unknown field"), "{e}");
        let mut v = serde_json::to_value(state(1)).unwrap();
        v["step"] = json!(-1);
        fs::write(dir.path().join(STATE_FILE), v.to_string()).unwrap();
        let e = read_state(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("state.json: field `step`: expected a non-negative integer, found -1"),
            "{e}"
        );
    }
}
