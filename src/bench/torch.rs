//! Running the PyTorch reference, `bench/torch_reference.py`, for one workload.
//!
//! The script builds the same U-Net from the same diffusers config JSON, times the same
//! workload at the same batch on the same number of threads (`torch.set_num_threads`, plus
//! `OMP_NUM_THREADS` / `MKL_NUM_THREADS` in its environment), measures peak memory the same way
//! ([`crate::bench::memory`]), and prints one JSON object, parsed into [`TorchRun`].

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::bench::WorkloadSpec;
use crate::error::{Error, Result};

/// Where the script lives relative to the repository root.
pub const SCRIPT: &str = "bench/torch_reference.py";

/// What the reference script reports for one workload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TorchRun {
    /// Median step time (ms).
    pub median_ms: f64,
    /// Every timed step (ms).
    pub times_ms: Vec<f64>,
    /// Parameters of the network PyTorch built (must equal ours).
    pub params: usize,
    /// Resident-set high-water mark during the workload (MiB), NaN if unavailable.
    pub peak_rss_mib: Option<f64>,
    /// Resident set just before the workload (MiB); absent from older versions of the script.
    #[serde(default)]
    pub base_rss_mib: Option<f64>,
    /// Threads PyTorch ran on.
    pub threads: usize,
    /// `torch.__version__`.
    pub torch_version: String,
    /// With `--profile`: every op's figures per step (`torch.profiler`), largest self time first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<Vec<TorchProfileRow>>,
}

/// One op of PyTorch's profile (`torch.profiler`'s `key_averages`), per step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TorchProfileRow {
    /// The op (`aten::convolution_backward`, ...).
    pub name: String,
    /// Calls per step.
    pub calls: f64,
    /// Time in the op itself, without the ops it calls (ms per step; `self_cpu_time_total`:
    /// the op's span on the calling thread).
    pub self_ms: f64,
    /// CPU time including the ops it calls (ms per step).
    pub total_ms: f64,
}

/// How to run the reference: the interpreter and the script.
#[derive(Clone, Debug)]
pub struct TorchReference {
    /// The Python interpreter (`python3`).
    pub python: String,
    /// `bench/torch_reference.py`.
    pub script: PathBuf,
    /// `torch.__version__`, found by [`TorchReference::check`].
    pub torch_version: String,
}

impl TorchReference {
    /// Finds the script (`script`, or [`SCRIPT`] under the current directory, then under the
    /// crate's source directory) and checks that `python` runs and imports torch. Errors say
    /// which of the three is missing and how to fix it.
    pub fn check(python: &str, script: Option<&Path>) -> Result<Self> {
        let script = match script {
            Some(p) => {
                if !p.is_file() {
                    return Err(Error::param(
                        "torch-script",
                        format!("{} is not a file", p.display()),
                    ));
                }
                p.to_path_buf()
            }
            None => {
                let here = PathBuf::from(SCRIPT);
                let source = Path::new(env!("CARGO_MANIFEST_DIR")).join(SCRIPT);
                if here.is_file() {
                    here
                } else if source.is_file() {
                    source
                } else {
                    return Err(Error::param(
                        "compare-torch",
                        format!(
                            "the PyTorch reference script was not found at ./{SCRIPT} or {}; run from the repository root or pass --torch-script",
                            source.display()
                        ),
                    ));
                }
            }
        };
        let out = Command::new(python)
            .args(["-c", "import torch; print(torch.__version__)"])
            .output()
            .map_err(|e| {
                Error::param(
                    "compare-torch",
                    format!("cannot run '{python}' ({e}); install Python 3 or pass --python"),
                )
            })?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let last = stderr.lines().last().unwrap_or("").trim();
            return Err(Error::param(
                "compare-torch",
                format!("'{python}' cannot import torch ({last}); install it with `{python} -m pip install torch`"),
            ));
        }
        Ok(TorchReference {
            python: python.to_string(),
            script,
            torch_version: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        })
    }

    /// Runs `spec` (workload, batch, warm-up, timed steps, seed) on `threads` threads for the
    /// network whose diffusers config is in `config_json`.
    pub fn run(&self, config_json: &Path, spec: &WorkloadSpec, threads: usize) -> Result<TorchRun> {
        let n = threads.to_string();
        let out = Command::new(&self.python)
            .arg(&self.script)
            .arg("--config")
            .arg(config_json)
            .args(["--workload", spec.workload.name()])
            .args(["--batch", &spec.batch.to_string()])
            .args(["--threads", &n])
            .args(["--warmup", &spec.warmup.to_string()])
            .args(["--iters", &spec.iters.to_string()])
            .args(["--seed", &spec.seed.to_string()])
            .args(spec.profile.then_some("--profile"))
            .args([
                "--precision",
                match spec.precision {
                    crate::ops::Precision::F32 => "f32",
                    crate::ops::Precision::Bf16 => "bf16",
                },
            ])
            .env("OMP_NUM_THREADS", &n)
            .env("MKL_NUM_THREADS", &n)
            .output()
            .map_err(|e| Error::io(&self.script, e))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
            return Err(Error::bad_input(
                &self.script,
                format!(
                    "run by {} failed ({}): {}",
                    self.python,
                    out.status,
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                ),
            ));
        }
        parse_run(&stdout).map_err(|m| Error::bad_input(&self.script, m))
    }
}

/// Parses the script's output: the last line that is a JSON object. The script writes NaN for
/// an unavailable memory figure, which JSON parsers reject, so it is read as null.
pub fn parse_run(stdout: &str) -> std::result::Result<TorchRun, String> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .ok_or_else(|| format!("no JSON object in the output: {:?}", stdout.trim()))?;
    let line = line.replace("NaN", "null");
    serde_json::from_str(&line).map_err(|e| format!("unexpected output ({e}): {line}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_script_output() {
        let out = "some warning\n{\"workload\": \"train\", \"batch\": 64, \"threads\": 2, \"median_ms\": 780.5, \"times_ms\": [781.0, 780.5], \"params\": 4170177, \"peak_rss_mib\": NaN, \"base_rss_mib\": 301.5, \"torch_version\": \"2.15.0\"}\n";
        let r = parse_run(out).unwrap();
        assert_eq!(r.median_ms, 780.5);
        assert_eq!(r.params, 4170177);
        assert_eq!(r.peak_rss_mib, None);
        assert_eq!(r.base_rss_mib, Some(301.5));
        assert!(parse_run("Traceback ...").unwrap_err().contains("no JSON"));
    }

    #[test]
    fn missing_python_is_a_clear_error() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(SCRIPT);
        let e = TorchReference::check("/nonexistent/python3", Some(&script))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot run '/nonexistent/python3'"), "{e}");
        let e = TorchReference::check("python3", Some(Path::new("/nonexistent.py")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent.py is not a file"), "{e}");
    }
}
