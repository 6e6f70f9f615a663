//! The training log: one JSON object per step in `metrics.jsonl`, appended as training goes
//! and fsync'd at every checkpoint, and the loss-curve picture drawn from it.
//!
//! A line looks like `{"step":12,"loss":0.53,"lr":0.00012,"grad_norm":1.7,"elapsed_s":0.41}`
//! (plus `"eval":{...}` ([`EvalRecord`]) on the steps where `train --fid-every` measured samples):
//! `loss` is the batch loss computed before update `step` (1-based), `lr` the learning rate that
//! update used, `grad_norm` the global gradient norm before clipping, `elapsed_s` the training
//! time of the whole run so far (across resumes). On resume the file is cut back to the
//! checkpoint's step, so a run interrupted and resumed leaves the same file as one that was not.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use plotters::prelude::*;

use crate::plot::{ensure_font, plot_err, save_rgb_png};

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricRecord {
    /// The update number (1-based).
    pub step: u64,
    /// The batch loss before the update.
    pub loss: f64,
    /// The learning rate of the update.
    pub lr: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// Seconds of training so far, over all sessions of the run.
    pub elapsed_s: f64,
    /// The sample-quality figure measured after this update (`train --fid-every`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalRecord>,
}

/// A sample-quality figure measured during training: `metric` of `n_samples` samples of the EMA
/// weights against the reference images, and the same figure for as many real training images
/// (the floor a perfect model would reach with that many samples).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalRecord {
    /// What the value is, e.g. `fd_digit_features`.
    pub metric: String,
    /// The samples' figure.
    pub value: f64,
    /// Real training images against the same reference.
    pub real: Option<f64>,
    /// Samples drawn.
    pub n_samples: usize,
    /// Sampler and steps they were drawn with, e.g. `dpmpp-2m 20`.
    pub sampler: String,
    /// Seconds the evaluation took (sampling and features).
    pub seconds: f64,
}

/// An open `metrics.jsonl`, with its records kept in memory for the loss curve.
pub struct MetricsLog {
    path: PathBuf,
    /// `None`: records kept in memory only (ranks other than 0 of a data-parallel run).
    file: Option<fs::File>,
    records: Vec<MetricRecord>,
}

impl MetricsLog {
    /// Starts an empty log at `path` (an existing file is replaced).
    pub fn create(path: &Path) -> Result<Self> {
        crate::io::atomic_write(path, b"")?;
        Self::open_append(path, Vec::new())
    }

    /// Reopens the log of a run resumed from a checkpoint at `through_step`: keeps the records
    /// with `step <= through_step` (the file may run past the checkpoint if the run was killed
    /// between checkpoints) and drops the rest. A malformed line before that point is an error
    /// naming the line; a malformed last line (a write cut short by a kill) is dropped.
    pub fn resume(path: &Path, through_step: u64) -> Result<Self> {
        let records = Self::read_records(path, through_step)?;
        let mut kept = String::new();
        for r in &records {
            kept.push_str(&record_line(r)?);
        }
        crate::io::atomic_write(path, kept.as_bytes())?;
        Self::open_append(path, records)
    }

    /// A log that keeps its records in memory and writes nothing (`path` is only a name).
    pub fn in_memory(path: &Path, records: Vec<MetricRecord>) -> Self {
        MetricsLog {
            path: path.to_path_buf(),
            file: None,
            records,
        }
    }

    /// The records of `path` through `through_step` (as [`MetricsLog::resume`] keeps them),
    /// in memory, without touching the file.
    pub fn read(path: &Path, through_step: u64) -> Result<Self> {
        Ok(Self::in_memory(path, Self::read_records(path, through_step)?))
    }

    fn read_records(path: &Path, through_step: u64) -> Result<Vec<MetricRecord>> {
        let text = match crate::io::read_text(path) {
            Ok(t) => t,
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let lines: Vec<&str> = text.lines().collect();
        let mut records = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let rec: MetricRecord = match serde_json::from_str(line) {
                Ok(r) => r,
                Err(_) if i + 1 == lines.len() => break,
                Err(e) => {
                    return Err(Error::bad_input(
                        path,
                        format!("line {}: not a metrics record: {e}", i + 1),
                    ));
                }
            };
            if rec.step > through_step {
                break;
            }
            records.push(rec);
        }
        Ok(records)
    }

    fn open_append(path: &Path, records: Vec<MetricRecord>) -> Result<Self> {
        let file = fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(MetricsLog {
            path: path.to_path_buf(),
            file: Some(file),
            records,
        })
    }

    /// Appends one record (written through to the OS; durable after [`MetricsLog::sync`]).
    pub fn append(&mut self, record: MetricRecord) -> Result<()> {
        if let Some(file) = &mut self.file {
            let line = record_line(&record)?;
            file.write_all(line.as_bytes())
                .map_err(|e| Error::io(&self.path, e))?;
        }
        self.records.push(record);
        Ok(())
    }

    /// Flushes the file to disk.
    pub fn sync(&mut self) -> Result<()> {
        match &self.file {
            Some(file) => file.sync_all().map_err(|e| Error::io(&self.path, e)),
            None => Ok(()),
        }
    }

    /// The records so far.
    pub fn records(&self) -> &[MetricRecord] {
        &self.records
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn record_line(r: &MetricRecord) -> Result<String> {
    let mut s = serde_json::to_string(r)
        .map_err(|e| Error::Numerical(format!("cannot encode a metrics record: {e}")))?;
    s.push('\n');
    Ok(s)
}

/// Debiased exponential smoothing (TensorBoard's): `s_i = w * s_{i-1} + (1 - w) * y_i`,
/// `s_0 = 0`, reported as `s_i / (1 - w^(i+1))` so early values are not pulled towards 0.
/// Non-finite values are skipped (they keep the previous smoothed value).
pub fn smooth(values: &[f64], weight: f64) -> Vec<f64> {
    let mut s = 0.0;
    let mut norm = 1.0;
    let mut last = f64::NAN;
    values
        .iter()
        .map(|&y| {
            if y.is_finite() {
                s = weight * s + (1.0 - weight) * y;
                norm *= weight;
                last = s / (1.0 - norm);
            }
            last
        })
        .collect()
}

/// The smoothing weight for a curve of `n` points: about n / 50 points per averaging window,
/// `w = 1 - 1 / max(1, n / 50)`, at most 0.999.
pub fn smoothing_weight(n: usize) -> f64 {
    let window = (n as f64 / 50.0).max(1.0);
    (1.0 - 1.0 / window).min(0.999)
}

/// Colour of the per-step loss (light, drawn first).
const RAW_COLOUR: RGBColor = RGBColor(158, 202, 225);
/// Colour of the smoothed loss.
const SMOOTH_COLOUR: RGBColor = RGBColor(217, 95, 2);

/// Draws the loss against the step into a PNG: the per-step loss in light blue, the smoothed
/// loss ([`smooth`], [`smoothing_weight`]) in orange. The y axis spans the 0.5th to 99.5th
/// percentile of the losses and the whole smoothed curve (single spikes do not flatten the
/// picture), on a log scale when that span covers more than a factor of 10. Curves longer
/// than 4000 points are thinned for drawing (the smoothing uses every point).
pub fn loss_curve_png(path: &Path, records: &[MetricRecord]) -> Result<()> {
    let losses: Vec<f64> = records.iter().map(|r| r.loss).collect();
    let smoothed = smooth(&losses, smoothing_weight(records.len()));
    let stride = records.len().div_ceil(4000).max(1);
    let raw: Vec<(f64, f64)> = records
        .iter()
        .step_by(stride)
        .map(|r| (r.step as f64, r.loss))
        .filter(|p| p.1.is_finite())
        .collect();
    let sm: Vec<(f64, f64)> = records
        .iter()
        .zip(&smoothed)
        .step_by(stride)
        .map(|(r, &s)| (r.step as f64, s))
        .filter(|p| p.1.is_finite())
        .collect();

    let mut sorted: Vec<f64> = losses.iter().copied().filter(|v| v.is_finite()).collect();
    sorted.sort_by(f64::total_cmp);
    let pct = |q: f64| {
        sorted
            .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
            .copied()
    };
    let (mut lo, mut hi) = match (pct(0.005), pct(0.995)) {
        (Some(a), Some(b)) => (a, b),
        _ => (0.0, 1.0),
    };
    for &(_, v) in &sm {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if hi - lo < 1e-12 {
        (lo, hi) = (lo - 0.5, hi + 0.5);
    }
    let log_y = lo > 0.0 && hi / lo > 10.0;
    let (x0, x1) = match (records.first(), records.last()) {
        (Some(a), Some(b)) if b.step > a.step => (a.step as f64, b.step as f64),
        (Some(a), _) => (a.step as f64 - 0.5, a.step as f64 + 0.5),
        _ => (0.0, 1.0),
    };

    ensure_font();
    let (w, h) = (900u32, 560u32);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let full = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        full.fill(&WHITE).map_err(plot_err)?;
        let evals: Vec<(u64, &EvalRecord)> = records
            .iter()
            .filter_map(|r| r.eval.as_ref().map(|e| (r.step, e)))
            .collect();
        // with sample-quality figures: the loss on top, the figure against the step below
        let (root, lower) = if evals.is_empty() {
            (full, None)
        } else {
            let (a, b) = full.split_vertically((h as f64 * 0.62) as u32);
            (a, Some(b))
        };
        if let Some(lower) = &lower {
            draw_eval(lower, &evals, (x0, x1))?;
        }
        let title = match records.last() {
            Some(r) => format!(
                "training loss (step {}, smoothed {:.4})",
                r.step,
                sm.last().map_or(f64::NAN, |p| p.1)
            ),
            None => "training loss (no steps yet)".to_string(),
        };
        // clip to the y range so spikes do not draw outside the plot
        let clip = |v: f64| v.clamp(lo, hi);
        let raw_c: Vec<(f64, f64)> = raw.iter().map(|&(x, y)| (x, clip(y))).collect();
        macro_rules! draw {
            ($chart:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .x_desc("step")
                    .y_desc("loss")
                    .y_labels(8)
                    .x_label_formatter(&|v| format!("{v:.0}"))
                    .y_label_formatter(&|v| tick_label(*v))
                    .label_style(("sans-serif", 14))
                    .draw()
                    .map_err(plot_err)?;
                chart
                    .draw_series(LineSeries::new(raw_c.clone(), RAW_COLOUR.stroke_width(1)))
                    .map_err(plot_err)?
                    .label("per step")
                    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RAW_COLOUR.stroke_width(2)));
                chart
                    .draw_series(LineSeries::new(sm.clone(), SMOOTH_COLOUR.stroke_width(2)))
                    .map_err(plot_err)?
                    .label("smoothed")
                    .legend(|(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], SMOOTH_COLOUR.stroke_width(2))
                    });
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK)
                    .label_font(("sans-serif", 14))
                    .draw()
                    .map_err(plot_err)?;
            }};
        }
        if log_y {
            draw!(ChartBuilder::on(&root)
                .caption(title.clone(), ("sans-serif", 22))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d(x0..x1, (lo..hi).log_scale())
                .map_err(plot_err)?);
        } else {
            let pad = 0.03 * (hi - lo);
            draw!(ChartBuilder::on(&root)
                .caption(title.clone(), ("sans-serif", 22))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d(x0..x1, (lo - pad)..(hi + pad))
                .map_err(plot_err)?);
        }
    }
    save_rgb_png(path, w, h, buf)
}

/// Colour of the samples' quality figure and of the real-image floor.
const EVAL_COLOUR: RGBColor = RGBColor(117, 112, 179);
const FLOOR_COLOUR: RGBColor = RGBColor(27, 158, 119);

/// The lower panel of the loss picture: the samples' figure at each evaluated step, and the
/// real-image floor.
fn draw_eval<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    evals: &[(u64, &EvalRecord)],
    (x0, x1): (f64, f64),
) -> Result<()> {
    let pts: Vec<(f64, f64)> = evals
        .iter()
        .map(|(s, e)| (*s as f64, e.value))
        .filter(|p| p.1.is_finite())
        .collect();
    let floor: Vec<(f64, f64)> = evals
        .iter()
        .filter_map(|(s, e)| e.real.map(|r| (*s as f64, r)))
        .filter(|p| p.1.is_finite())
        .collect();
    let all: Vec<f64> = pts.iter().chain(&floor).map(|p| p.1).collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min).min(0.0);
    let mut hi = all.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !hi.is_finite() || hi <= lo {
        hi = lo + 1.0;
    }
    let (name, last) = evals
        .last()
        .map_or(("", f64::NAN), |(_, e)| (e.metric.as_str(), e.value));
    let long_name = if name == "fd_digit_features" {
        "FD of the bundled digit features"
    } else {
        name
    };
    let title = format!(
        "{long_name} of {} samples ({}): {last:.3}",
        evals.last().map_or(0, |e| e.1.n_samples),
        evals.last().map_or("", |e| e.1.sampler.as_str())
    );
    let min_pos = all
        .iter()
        .copied()
        .filter(|v| *v > 0.0)
        .fold(f64::INFINITY, f64::min);
    let builder = |area| {
        let mut b = ChartBuilder::on(area);
        b.caption(title.clone(), ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(70);
        b
    };
    // figures falling over decades (early samples are far off) read better on a log axis
    if min_pos.is_finite() && all.iter().all(|v| *v > 0.0) && hi / min_pos > 20.0 {
        let chart = builder(area)
            .build_cartesian_2d(x0..x1, (min_pos * 0.8..hi * 1.25).log_scale())
            .map_err(plot_err)?;
        draw_eval_series(chart, &pts, &floor)
    } else {
        let chart = builder(area)
            .build_cartesian_2d(x0..x1, lo..hi * 1.08)
            .map_err(plot_err)?;
        draw_eval_series(chart, &pts, &floor)
    }
}

fn draw_eval_series<'a, DB: DrawingBackend + 'a, Y>(
    mut chart: ChartContext<'a, DB, Cartesian2d<plotters::coord::types::RangedCoordf64, Y>>,
    pts: &[(f64, f64)],
    floor: &[(f64, f64)],
) -> Result<()>
where
    Y: Ranged<ValueType = f64> + plotters::coord::ranged1d::ValueFormatter<f64>,
{
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("FD")
        .y_labels(5)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| tick_label(*v))
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(plot_err)?;
    chart
        .draw_series(LineSeries::new(pts.to_vec(), EVAL_COLOUR.stroke_width(2)))
        .map_err(plot_err)?
        .label("samples")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], EVAL_COLOUR.stroke_width(2)));
    chart
        .draw_series(pts.iter().map(|&p| Circle::new(p, 4, EVAL_COLOUR.filled())))
        .map_err(plot_err)?;
    if !floor.is_empty() {
        chart
            .draw_series(LineSeries::new(floor.to_vec(), FLOOR_COLOUR.stroke_width(2)))
            .map_err(plot_err)?
            .label("real training images (floor)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], FLOOR_COLOUR.stroke_width(2)));
    }
    // upper left: the first measurement is at --fid-every (a third of the default run), so
    // that corner is empty
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(plot_err)?;
    Ok(())
}

/// A short axis label: 4 significant digits, no trailing zeros (`0.7000000000000001` -> `0.7`).
fn tick_label(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let digits = (3 - v.abs().log10().floor() as i32).max(0) as usize;
    let s = format!("{v:.digits$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_labels_are_short() {
        assert_eq!(tick_label(0.7000000000000001), "0.7");
        assert_eq!(tick_label(0.030000000000000002), "0.03");
        assert_eq!(tick_label(2500.0), "2500");
        assert_eq!(tick_label(0.12345), "0.1235");
        assert_eq!(tick_label(1.0), "1");
    }

    fn rec(step: u64, loss: f64) -> MetricRecord {
        MetricRecord {
            step,
            loss,
            lr: 1e-3,
            grad_norm: 0.5,
            elapsed_s: step as f64 * 0.1,
            eval: None,
        }
    }

    #[test]
    fn smoothing_is_debiased() {
        // a constant series smooths to itself from the first point on
        assert!(smooth(&[2.0; 5], 0.9).iter().all(|&s| (s - 2.0).abs() < 1e-12));
        // y = [1, 3], w = 0.5: s_1 = 0.5, /0.5 = 1; s_2 = 0.25 + 1.5 = 1.75, /0.75 = 7/3
        let s = smooth(&[1.0, 3.0], 0.5);
        assert!(
            (s[0] - 1.0).abs() < 1e-12 && (s[1] - 7.0 / 3.0).abs() < 1e-12,
            "{s:?}"
        );
        // a NaN holds the previous value
        assert_eq!(smooth(&[1.0, f64::NAN], 0.5)[1], 1.0);
    }

    #[test]
    fn resume_cuts_back_to_the_checkpoint_and_drops_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::create(&p).unwrap();
        for s in 1..=5 {
            log.append(rec(s, 1.0 / s as f64)).unwrap();
        }
        log.sync().unwrap();
        drop(log);
        // a kill in the middle of a write leaves half a line
        let mut f = fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"step\":6,\"lo").unwrap();
        drop(f);
        let mut log = MetricsLog::resume(&p, 3).unwrap();
        assert_eq!(log.records().len(), 3);
        log.append(rec(4, 9.0)).unwrap();
        drop(log);
        let text = fs::read_to_string(&p).unwrap();
        let steps: Vec<u64> = text
            .lines()
            .map(|l| serde_json::from_str::<MetricRecord>(l).unwrap().step)
            .collect();
        assert_eq!(steps, vec![1, 2, 3, 4]);
        assert!(text.contains("\"loss\":9.0"));

        // a bad line in the middle is an error with its line number
        fs::write(
            &p,
            "{\"step\":1,\"loss\":1,\"lr\":1,\"grad_norm\":1,\"elapsed_s\":1}\nnonsense\n{}\n",
        )
        .unwrap();
        let e = MetricsLog::resume(&p, 5).err().unwrap().to_string();
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn loss_curve_draws_both_series() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("loss.png");
        let recs: Vec<MetricRecord> = (1..=300)
            .map(|s| rec(s, 1.0 / (s as f64).sqrt() + 0.1 * ((s % 7) as f64)))
            .collect();
        loss_curve_png(&p, &recs).unwrap();
        let img = image::open(&p).unwrap().to_rgb8();
        let blue = img.pixels().filter(|p| p.0 == [158, 202, 225]).count();
        let orange = img.pixels().filter(|p| p.0 == [217, 95, 2]).count();
        assert!(blue > 200 && orange > 200, "blue {blue}, orange {orange}");
        // an empty log still gives a picture rather than an error
        loss_curve_png(&p, &[]).unwrap();
    }

    #[test]
    fn loss_curve_draws_the_sample_quality_panel() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("loss.png");
        let mut recs: Vec<MetricRecord> = (1..=300).map(|s| rec(s, 1.0 / (s as f64).sqrt())).collect();
        let count = |p: &Path, c: RGBColor| {
            image::open(p)
                .unwrap()
                .to_rgb8()
                .pixels()
                .filter(|q| q.0 == [c.0, c.1, c.2])
                .count()
        };
        loss_curve_png(&p, &recs).unwrap();
        assert_eq!(count(&p, EVAL_COLOUR), 0);
        for (s, v) in [(100, 900.0), (200, 60.0), (300, 20.0)] {
            recs[s - 1].eval = Some(EvalRecord {
                metric: "fd_digit_features".into(),
                value: v,
                real: Some(5.0),
                n_samples: 200,
                sampler: "dpmpp-2m 20".into(),
                seconds: 1.0,
            });
        }
        loss_curve_png(&p, &recs).unwrap();
        let (eval, floor) = (count(&p, EVAL_COLOUR), count(&p, FLOOR_COLOUR));
        assert!(eval > 200 && floor > 200, "eval {eval}, floor {floor}");
        // the eval field round-trips through a metrics line; lines without it still parse
        let line = record_line(&recs[99]).unwrap();
        let back: MetricRecord = serde_json::from_str(&line).unwrap();
        assert_eq!(back, recs[99]);
        let plain: MetricRecord = serde_json::from_str(&record_line(&recs[0]).unwrap()).unwrap();
        assert_eq!(plain.eval, None);
    }
}
