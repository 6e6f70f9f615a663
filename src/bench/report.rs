//! The benchmark's figures, derived from the measurements: one [`BenchReport`] per run, as a
//! JSON object ([`BenchReport::to_json`]) and as a readable table ([`BenchReport::table`]).
//!
//! ```text
//! images/s      = batch / (median_ms / 1000)
//! GFLOP/s       = forwards_per_step * forward_flops_per_image * batch / (median_ms / 1000) / 1e9
//! sgemm share   = GFLOP/s / sgemm GFLOP/s
//! time ratio    = ours median_ms / PyTorch median_ms         (< 1: we are faster)
//! min ratio     = ours min_ms / PyTorch min_ms               (robust to other load: noise only adds)
//! memory ratio  = ours peak_rss_mib / PyTorch peak_rss_mib   (< 1: we use less)
//! ```

use serde::Serialize;
use serde_json::Value;

use crate::bench::flops::FlopCount;
use crate::bench::torch::TorchRun;
use crate::bench::{SgemmRun, WorkloadRun};

/// The counting convention, stated in the JSON.
pub const FLOP_CONVENTION: &str =
    "2 FLOPs per multiply-add in convolutions, linear layers and the two attention \
matrix products; biases, norms, activations, resampling not counted; train step = 3 x forward";

/// Speed and memory figures of one side (ours or PyTorch) for one workload.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Figures {
    /// Median step time (ms).
    pub median_ms: f64,
    /// Fastest timed step (ms): on a shared machine other load only ever adds time.
    pub min_ms: f64,
    /// Every timed step (ms).
    pub times_ms: Vec<f64>,
    /// `batch / median`.
    pub images_per_s: f64,
    /// Achieved GFLOP/s.
    pub gflops: f64,
    /// Achieved GFLOP/s as a fraction of the measured sgemm GFLOP/s.
    pub sgemm_fraction: f64,
    /// Resident-set high-water mark during the workload (MiB).
    pub peak_rss_mib: Option<f64>,
    /// Resident set just before the workload (MiB).
    pub base_rss_mib: Option<f64>,
}

impl Figures {
    /// What the workload added to the resident set: `peak_rss_mib - base_rss_mib`.
    pub fn added_rss_mib(&self) -> Option<f64> {
        Some(self.peak_rss_mib? - self.base_rss_mib?)
    }

    fn new(
        median_ms: f64,
        times_ms: &[f64],
        batch: usize,
        gflop_per_step: f64,
        sgemm_gflops: f64,
        peak_rss_mib: Option<f64>,
        base_rss_mib: Option<f64>,
    ) -> Self {
        let secs = median_ms * 1e-3;
        let gflops = gflop_per_step / secs;
        Figures {
            median_ms,
            min_ms: times_ms.iter().copied().fold(f64::INFINITY, f64::min),
            times_ms: times_ms.to_vec(),
            images_per_s: batch as f64 / secs,
            gflops,
            sgemm_fraction: gflops / sgemm_gflops,
            peak_rss_mib,
            base_rss_mib,
        }
    }
}

/// Ours / PyTorch.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Ratios {
    /// Median time ratio (< 1: faster than PyTorch).
    pub time: f64,
    /// Fastest-step time ratio.
    pub time_min: f64,
    /// Peak resident set ratio.
    pub peak_rss: Option<f64>,
    /// Ratio of what each workload added to its process's resident set (`peak - base`).
    pub added_rss: Option<f64>,
}

/// One workload of one preset.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WorkloadReport {
    /// `train` or `sample`.
    pub workload: &'static str,
    /// Images per step.
    pub batch: usize,
    /// FLOPs of one step (GFLOP).
    pub gflop_per_step: f64,
    /// Ours.
    pub ours: Figures,
    /// rayon / candle thread counts the workload ran with.
    pub threads: [usize; 2],
    /// PyTorch's figures (with `--compare-torch`).
    pub torch: Option<Figures>,
    /// Ours / PyTorch (with `--compare-torch`).
    pub ratio: Option<Ratios>,
    /// `f32` or `bf16` (the convolutions' arithmetic; PyTorch under bf16 autocast with bf16).
    pub precision: &'static str,
    /// With bf16 and `--compare-torch`: PyTorch's f32 median step (ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub torch_f32_ms: Option<f64>,
    /// With `--profile`: our per-op profile, per step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<Vec<crate::bench::ProfileRow>>,
    /// With `--profile --compare-torch`: PyTorch's per-op profile, per step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub torch_profile: Option<Vec<crate::bench::torch::TorchProfileRow>>,
}

impl WorkloadReport {
    /// Derives the figures of `run` (and of `torch`, if given) for a network of `flops` per
    /// image forward, against a machine of `sgemm_gflops`.
    pub fn new(run: &WorkloadRun, flops: &FlopCount, sgemm_gflops: f64, torch: Option<&TorchRun>) -> Self {
        let gflop_per_step =
            (run.workload.forwards_per_step() * flops.total()) as f64 * run.batch as f64 / 1e9;
        let torch_profile = torch.and_then(|t| t.profile.clone());
        let ours = Figures::new(
            run.median_ms,
            &run.times_ms,
            run.batch,
            gflop_per_step,
            sgemm_gflops,
            run.peak_rss_mib,
            run.base_rss_mib,
        );
        let torch = torch.map(|t| {
            Figures::new(
                t.median_ms,
                &t.times_ms,
                run.batch,
                gflop_per_step,
                sgemm_gflops,
                t.peak_rss_mib,
                t.base_rss_mib,
            )
        });
        let ratio = torch.as_ref().map(|t| {
            let div = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) if b > 0.0 => Some(a / b),
                _ => None,
            };
            Ratios {
                time: ours.median_ms / t.median_ms,
                time_min: ours.min_ms / t.min_ms,
                peak_rss: div(ours.peak_rss_mib, t.peak_rss_mib),
                added_rss: div(ours.added_rss_mib(), t.added_rss_mib()),
            }
        });
        WorkloadReport {
            workload: run.workload.name(),
            batch: run.batch,
            gflop_per_step,
            ours,
            threads: [run.rayon_threads, run.candle_threads],
            torch,
            ratio,
            precision: "f32",
            torch_f32_ms: None,
            profile: run.profile.clone(),
            torch_profile,
        }
    }

    /// The two per-op profiles side by side (`rows` largest entries of each), or None without
    /// a profile. Ours: our scopes, wall time on the thread that entered them (inclusive: a
    /// block's time contains its ops'; the per-image stages `resnet.fwd/...`, `resnet.bwd/...`
    /// run on every worker thread, so they add up to the threads' time, about the thread count
    /// times the wall time); PyTorch's: each aten op's self time (`torch.profiler`'s
    /// `self_cpu_time_total`: the op's own span on the calling thread, its intra-op threads
    /// working inside it).
    pub fn profile_table(&self, rows: usize) -> Option<String> {
        let ours = self.profile.as_ref()?;
        let step_ms = self.ours.median_ms;
        let mut out = format!(
            "{:<32} {:>6} {:>9} {:>6}   ",
            format!("{} {} (ours, wall)", self.workload, self.batch),
            "calls",
            "ms/step",
            "%step"
        );
        let torch = self.torch_profile.as_deref();
        if torch.is_some() {
            out += &format!(
                "{:<36} {:>6} {:>9} {:>6}",
                "PyTorch (self CPU)", "calls", "ms/step", "%step"
            );
        }
        out += "\n";
        let torch_step = self.torch.as_ref().map(|t| t.median_ms);
        for i in 0..rows {
            let left = ours.get(i).map_or(format!("{:<57}", ""), |r| {
                format!(
                    "{:<32} {:>6.0} {:>9.1} {:>5.1}%",
                    truncate(&r.name, 32),
                    r.calls,
                    r.ms,
                    100.0 * r.ms / step_ms
                )
            });
            let right = torch.and_then(|t| t.get(i)).map_or(String::new(), |r| {
                format!(
                    "{:<36} {:>6.0} {:>9.1} {:>5.1}%",
                    truncate(&r.name, 36),
                    r.calls,
                    r.self_ms,
                    torch_step.map_or(f64::NAN, |s| 100.0 * r.self_ms / s)
                )
            });
            if left.trim().is_empty() && right.is_empty() {
                break;
            }
            out += format!("{left}   {right}").trim_end();
            out += "\n";
        }
        Some(out)
    }
}

/// `s` cut to `n` characters.
fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// One network.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PresetReport {
    /// Preset name.
    pub preset: String,
    /// Parameters.
    pub params: usize,
    /// `[channels, height, width]` of the images.
    pub image: [usize; 3],
    /// Forward FLOPs of one image, by kind.
    pub forward_flops_per_image: FlopCount,
    /// The same in GFLOP (total).
    pub forward_gflop_per_image: f64,
    /// The diffusers config the network (and PyTorch's) was built from.
    pub config: Value,
    /// One entry per workload.
    pub workloads: Vec<WorkloadReport>,
}

/// A whole `diffuse bench` run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BenchReport {
    /// The thread count every workload (ours and PyTorch's) was asked to use.
    pub threads: usize,
    /// Whether the fast CPU kernels were on (off with `--stock-ops`).
    pub fast_kernels: bool,
    /// Untimed steps before the timed ones.
    pub warmup: usize,
    /// Timed steps per workload.
    pub iters: usize,
    /// Seed of weights and inputs.
    pub seed: u64,
    /// The machine's sgemm speed.
    pub sgemm: SgemmRun,
    /// How FLOPs are counted.
    pub flop_convention: &'static str,
    /// `torch.__version__` when compared.
    pub torch_version: Option<String>,
    /// One entry per preset.
    pub presets: Vec<PresetReport>,
}

fn opt(x: Option<f64>, digits: usize) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{v:.digits$}"),
        _ => "-".into(),
    }
}

impl BenchReport {
    /// Every figure as one JSON object.
    pub fn to_json(&self) -> Value {
        // Serialising plain structs of numbers and strings cannot fail.
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// A readable table: one row per preset and workload.
    pub fn table(&self) -> String {
        let mut out = format!(
            "threads {} (rayon, candle/gemm{}); fast kernels {}; sgemm {n}x{n} f32: {:.1} GFLOP/s\n\
             warm-up {}, median of {} steps; train = fwd + MSE + bwd + AdamW; sample = one no-grad forward\n\n",
            self.threads,
            if self.torch_version.is_some() { ", torch" } else { "" },
            if self.fast_kernels { "on" } else { "off (stock candle ops)" },
            self.sgemm.gflops,
            self.warmup,
            self.iters,
            n = self.sgemm.n,
        );
        let compare = self.torch_version.is_some();
        let mut rows = vec![{
            let mut h = vec![
                "preset",
                "params",
                "workload",
                "batch",
                "GFLOP/step",
                "ms",
                "img/s",
                "GFLOP/s",
                "%sgemm",
                "peak MiB",
                "+MiB",
            ];
            if compare {
                h.extend([
                    "torch ms",
                    "torch peak",
                    "torch +MiB",
                    "ms ratio",
                    "min ratio",
                    "peak ratio",
                    "+MiB ratio",
                ]);
            }
            h.into_iter().map(String::from).collect::<Vec<_>>()
        }];
        for p in &self.presets {
            for w in &p.workloads {
                let mut r = vec![
                    p.preset.clone(),
                    p.params.to_string(),
                    w.workload.to_string(),
                    w.batch.to_string(),
                    format!("{:.2}", w.gflop_per_step),
                    format!("{:.1}", w.ours.median_ms),
                    format!("{:.1}", w.ours.images_per_s),
                    format!("{:.1}", w.ours.gflops),
                    format!("{:.0}%", 100.0 * w.ours.sgemm_fraction),
                    opt(w.ours.peak_rss_mib, 0),
                    opt(w.ours.added_rss_mib(), 0),
                ];
                if compare {
                    let t = w.torch.as_ref();
                    r.push(opt(t.map(|t| t.median_ms), 1));
                    r.push(opt(t.and_then(|t| t.peak_rss_mib), 0));
                    r.push(opt(t.and_then(Figures::added_rss_mib), 0));
                    r.push(opt(w.ratio.as_ref().map(|q| q.time), 2));
                    r.push(opt(w.ratio.as_ref().map(|q| q.time_min), 2));
                    r.push(opt(w.ratio.as_ref().and_then(|q| q.peak_rss), 2));
                    r.push(opt(w.ratio.as_ref().and_then(|q| q.added_rss), 2));
                }
                rows.push(r);
            }
        }
        let cols = rows[0].len();
        let widths: Vec<usize> = (0..cols)
            .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
            .collect();
        for r in &rows {
            let cells: Vec<String> = r
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(i, (s, w))| {
                    if i < 3 {
                        format!("{s:<w$}")
                    } else {
                        format!("{s:>w$}")
                    }
                })
                .collect();
            out.push_str(cells.join("  ").trim_end());
            out.push('\n');
        }
        if compare {
            out.push_str(
                "\nratios are ours / PyTorch (below 1: faster, or less memory); ms = median step, min ratio = \
             fastest step / fastest step; peak = resident-set high-water \
                 mark during the workload, +MiB = peak minus the resident set before it (each side's runtime, \
                 weights and inputs excluded)\n",
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::Workload;

    fn run(workload: Workload, batch: usize, median_ms: f64) -> WorkloadRun {
        WorkloadRun {
            workload,
            batch,
            median_ms,
            times_ms: vec![median_ms],
            params: 1000,
            base_rss_mib: Some(100.0),
            peak_rss_mib: Some(300.0),
            peak_reset: true,
            rayon_threads: 2,
            candle_threads: 2,
            fast_kernels: true,
            profile: None,
        }
    }

    #[test]
    fn profile_tables_sit_side_by_side_with_shares_of_each_step() {
        let flops = FlopCount {
            conv: 1_000_000,
            linear: 0,
            attention: 0,
        };
        let mut r = run(Workload::Train, 64, 200.0);
        r.profile = Some(vec![
            crate::bench::ProfileRow {
                name: "step".into(),
                calls: 1.0,
                ms: 200.0,
                cpu_ms: 390.0,
                gflops: None,
            },
            crate::bench::ProfileRow {
                name: "resnet.bwd".into(),
                calls: 12.0,
                ms: 50.0,
                cpu_ms: 99.0,
                gflops: Some(100.0),
            },
        ]);
        let t = TorchRun {
            median_ms: 400.0,
            times_ms: vec![400.0],
            params: 1000,
            peak_rss_mib: None,
            base_rss_mib: None,
            threads: 2,
            torch_version: "2".into(),
            profile: Some(vec![crate::bench::torch::TorchProfileRow {
                name: "aten::convolution_backward".into(),
                calls: 30.0,
                self_ms: 100.0,
                total_ms: 120.0,
            }]),
        };
        let w = WorkloadReport::new(&r, &flops, 100.0, Some(&t));
        let table = w.profile_table(10).unwrap();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(lines[0].starts_with("train 64 (ours, wall)") && lines[0].contains("PyTorch (self CPU)"));
        assert!(
            lines[1].starts_with("step") && lines[1].contains("100.0%"),
            "{}",
            lines[1]
        );
        assert!(
            lines[1].contains("aten::convolution_backward") && lines[1].ends_with("25.0%"),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].starts_with("resnet.bwd") && lines[2].ends_with("25.0%"),
            "{}",
            lines[2]
        );
        // without a profile there is no table
        let plain = WorkloadReport::new(&run(Workload::Sample, 8, 1.0), &flops, 100.0, None);
        assert!(plain.profile_table(10).is_none());
    }

    #[test]
    fn derived_figures_by_hand() {
        let flops = FlopCount {
            conv: 900_000_000,
            linear: 90_000_000,
            attention: 10_000_000,
        }; // 1 GFLOP per image forward
        let torch = TorchRun {
            median_ms: 1000.0,
            times_ms: vec![1200.0, 1000.0, 800.0],
            params: 1000,
            peak_rss_mib: Some(600.0),
            base_rss_mib: Some(400.0),
            threads: 2,
            torch_version: "2".into(),
            profile: None,
        };
        let w = WorkloadReport::new(&run(Workload::Train, 64, 500.0), &flops, 768.0, Some(&torch));
        // 3 forwards x 1 GFLOP x 64 images = 192 GFLOP per step, in 0.5 s: 384 GFLOP/s, half of
        // a 768 GFLOP/s sgemm; 64 images / 0.5 s = 128 images/s.
        assert_eq!(w.gflop_per_step, 192.0);
        assert_eq!(w.ours.gflops, 384.0);
        assert_eq!(w.ours.sgemm_fraction, 0.5);
        assert_eq!(w.ours.images_per_s, 128.0);
        // PyTorch: 1 s per step, 192 GFLOP/s.
        let t = w.torch.as_ref().unwrap();
        assert_eq!((t.gflops, t.images_per_s), (192.0, 64.0));
        let r = w.ratio.as_ref().unwrap();
        // 500 / 1000; 300 / 600 MiB; added (300 - 100) / (600 - 400).
        assert_eq!((r.time, r.peak_rss, r.added_rss), (0.5, Some(0.5), Some(1.0)));
        // fastest steps: 500 / 800.
        assert_eq!((t.min_ms, r.time_min), (800.0, 0.625));

        let s = WorkloadReport::new(&run(Workload::Sample, 256, 1000.0), &flops, 768.0, None);
        assert_eq!((s.gflop_per_step, s.ours.gflops), (256.0, 256.0));
        assert!(s.torch.is_none() && s.ratio.is_none());
    }

    #[test]
    fn json_has_every_key_and_table_every_row() {
        let flops = FlopCount {
            conv: 10,
            linear: 5,
            attention: 1,
        };
        let report = BenchReport {
            threads: 2,
            fast_kernels: true,
            warmup: 1,
            iters: 1,
            seed: 0,
            sgemm: SgemmRun {
                n: 2048,
                median_ms: 80.0,
                gflops: 214.7,
                rayon_threads: 2,
                candle_threads: 2,
            },
            flop_convention: FLOP_CONVENTION,
            torch_version: None,
            presets: vec![PresetReport {
                preset: "bench".into(),
                params: 1000,
                image: [1, 28, 28],
                forward_flops_per_image: flops,
                forward_gflop_per_image: 16e-9,
                config: serde_json::json!({}),
                workloads: Workload::ALL
                    .iter()
                    .map(|&w| WorkloadReport::new(&run(w, 4, 10.0), &flops, 214.7, None))
                    .collect(),
            }],
        };
        let j = report.to_json();
        for key in [
            "threads",
            "fast_kernels",
            "warmup",
            "iters",
            "seed",
            "sgemm",
            "flop_convention",
            "torch_version",
            "presets",
        ] {
            assert!(j.get(key).is_some(), "{key}");
        }
        for key in ["n", "median_ms", "gflops"] {
            assert!(j["sgemm"].get(key).is_some(), "sgemm.{key}");
        }
        let p = &j["presets"][0];
        for key in [
            "preset",
            "params",
            "image",
            "forward_flops_per_image",
            "forward_gflop_per_image",
            "config",
            "workloads",
        ] {
            assert!(p.get(key).is_some(), "preset.{key}");
        }
        let w = &p["workloads"][0];
        for key in [
            "workload",
            "batch",
            "gflop_per_step",
            "ours",
            "threads",
            "torch",
            "ratio",
        ] {
            assert!(w.get(key).is_some(), "workload.{key}");
        }
        for key in [
            "median_ms",
            "min_ms",
            "times_ms",
            "images_per_s",
            "gflops",
            "sgemm_fraction",
            "peak_rss_mib",
            "base_rss_mib",
        ] {
            assert!(w["ours"].get(key).is_some(), "ours.{key}");
        }
        assert_eq!(w["workload"], "train");
        assert_eq!(p["workloads"][1]["workload"], "sample");
        let table = report.table();
        assert_eq!(
            table.lines().filter(|l| l.starts_with("bench ")).count(),
            Workload::ALL.len(),
            "{table}"
        );
        assert!(table.contains("214.7 GFLOP/s"), "{table}");
    }
}
