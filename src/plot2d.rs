//! 2-D pictures for toy data: scatter plots (data vs samples), sample paths, and score fields
//! drawn as arrows. Each figure is a row of [`Panel2d`]s rendered with `plotters` (bundled font,
//! see [`crate::plot`]) and written atomically as PNG.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use plotters::prelude::*;

use crate::denoiser::{Denoiser, NoiseLevel};
use crate::error::{Error, Result};
use crate::plot::{ensure_font, plot_err, save_rgb_png, PALETTE};
use crate::samplers::{Trajectory, TrajectoryPoint};

/// A set of points drawn as dots.
#[derive(Clone, Debug)]
pub struct Dots {
    /// Legend label.
    pub label: String,
    /// The points.
    pub points: Vec<(f64, f64)>,
    /// Colour index into [`PALETTE`] (None: light grey).
    pub color: Option<usize>,
    /// Dot radius in pixels.
    pub radius: u32,
}

/// One panel: dots, polylines and arrows over shared axes.
#[derive(Clone, Debug, Default)]
pub struct Panel2d {
    /// Title.
    pub title: String,
    /// Axis labels.
    pub x_label: String,
    /// Axis labels.
    pub y_label: String,
    /// Point sets, drawn first to last.
    pub dots: Vec<Dots>,
    /// Polylines (e.g. sample paths); colour by index.
    pub lines: Vec<Vec<(f64, f64)>>,
    /// Arrows (start, end).
    pub arrows: Vec<((f64, f64), (f64, f64))>,
    /// Axis ranges; None: fit the content.
    pub range: Option<((f64, f64), (f64, f64))>,
}

fn fit(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (-1.0, 1.0);
    }
    let pad = 0.05 * (hi - lo).max(1e-9);
    (lo - pad, hi + pad)
}

impl Panel2d {
    fn ranges(&self) -> ((f64, f64), (f64, f64)) {
        if let Some(r) = self.range {
            return r;
        }
        let pts = || {
            self.dots
                .iter()
                .flat_map(|d| d.points.iter().copied())
                .chain(self.lines.iter().flat_map(|l| l.iter().copied()))
                .chain(self.arrows.iter().flat_map(|(a, b)| [*a, *b]))
        };
        (fit(pts().map(|p| p.0)), fit(pts().map(|p| p.1)))
    }
}

/// Draws `panels` side by side into a PNG of `width` x `height` pixels.
pub fn draw_panels(path: &Path, panels: &[Panel2d], width: u32, height: u32) -> Result<()> {
    ensure_font();
    let mut buf = vec![255u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let areas = root.split_evenly((1, panels.len().max(1)));
        for (panel, area) in panels.iter().zip(areas.iter()) {
            let ((x0, x1), (y0, y1)) = panel.ranges();
            let mut chart = ChartBuilder::on(area)
                .caption(&panel.title, ("sans-serif", 20))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(50)
                .build_cartesian_2d(x0..x1, y0..y1)
                .map_err(plot_err)?;
            chart
                .configure_mesh()
                .x_desc(&panel.x_label)
                .y_desc(&panel.y_label)
                .label_style(("sans-serif", 13))
                .light_line_style(WHITE.mix(0.0))
                .draw()
                .map_err(plot_err)?;
            let inside = |p: &(f64, f64)| p.0 >= x0 && p.0 <= x1 && p.1 >= y0 && p.1 <= y1;
            let mut legend = false;
            for d in &panel.dots {
                let color = match d.color {
                    Some(i) => PALETTE[i % PALETTE.len()].mix(0.55),
                    None => RGBColor(150, 150, 150).mix(0.45),
                };
                let r = d.radius;
                let series = chart
                    .draw_series(
                        d.points
                            .iter()
                            .filter(|p| inside(p))
                            .map(|p| Circle::new(*p, r, color.filled())),
                    )
                    .map_err(plot_err)?;
                if !d.label.is_empty() {
                    legend = true;
                    series
                        .label(d.label.clone())
                        .legend(move |(x, y)| Circle::new((x + 8, y), 4, color.filled()));
                }
            }
            for (k, line) in panel.lines.iter().enumerate() {
                let c = PALETTE[k % PALETTE.len()];
                let pts: Vec<(f64, f64)> = line
                    .iter()
                    .copied()
                    .filter(|p| p.0.is_finite() && p.1.is_finite())
                    .collect();
                chart
                    .draw_series(LineSeries::new(pts.clone(), c.stroke_width(1)))
                    .map_err(plot_err)?;
                if let Some(last) = pts.last().filter(|p| inside(p)) {
                    chart
                        .draw_series(std::iter::once(Circle::new(*last, 4, c.filled())))
                        .map_err(plot_err)?;
                }
            }
            let arrow_color = RGBColor(31, 119, 180);
            for (a, b) in &panel.arrows {
                if !(inside(a) && b.0.is_finite() && b.1.is_finite()) {
                    continue;
                }
                // shaft plus a two-stroke head at 25% of the length
                let (dx, dy) = (b.0 - a.0, b.1 - a.1);
                let head = |angle: f64| {
                    let (c, s) = (angle.cos(), angle.sin());
                    (b.0 - 0.3 * (c * dx - s * dy), b.1 - 0.3 * (s * dx + c * dy))
                };
                let style = arrow_color.stroke_width(1);
                chart
                    .draw_series([
                        PathElement::new(vec![*a, *b], style),
                        PathElement::new(vec![head(0.45), *b, head(-0.45)], style),
                    ])
                    .map_err(plot_err)?;
            }
            if legend {
                chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::UpperRight)
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK)
                    .label_font(("sans-serif", 13))
                    .draw()
                    .map_err(plot_err)?;
            }
        }
        root.present().map_err(plot_err)?;
    }
    save_rgb_png(path, width, height, buf)
}

/// Pairs `(row[i], row[j])` of row-major `d`-dimensional points.
pub fn project(points: &[f64], d: usize, i: usize, j: usize) -> Vec<(f64, f64)> {
    points.chunks(d).map(|r| (r[i], r[j])).collect()
}

/// A quantile-based range of the points (0.1% .. 99.9%, padded by 8%), so that a few stray
/// samples do not squash the picture.
pub fn robust_range(points: &[(f64, f64)]) -> ((f64, f64), (f64, f64)) {
    let lim = |mut v: Vec<f64>| {
        v.retain(|x| x.is_finite());
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return (-1.0, 1.0);
        }
        let q = |f: f64| v[((v.len() - 1) as f64 * f).round() as usize];
        let (lo, hi) = (q(0.001), q(0.999));
        let pad = 0.08 * (hi - lo).max(1e-6);
        (lo - pad, hi + pad)
    };
    (
        lim(points.iter().map(|p| p.0).collect()),
        lim(points.iter().map(|p| p.1).collect()),
    )
}

fn need_two_dims(d: usize, what: &str) -> Result<()> {
    if d < 2 {
        return Err(Error::param(
            what,
            format!("draws the first two coordinates and needs D >= 2, got D = {d}"),
        ));
    }
    Ok(())
}

/// Data (when given) and samples side by side on the same axes (first two coordinates of
/// row-major `d`-dimensional points).
pub fn samples_figure(
    path: &Path,
    samples: &[f64],
    data: Option<&[f64]>,
    d: usize,
    title: &str,
) -> Result<()> {
    need_two_dims(d, "plot")?;
    let dots = |label: &str, pts: &[f64], color| Dots {
        label: label.into(),
        points: project(pts, d, 0, 1),
        color,
        radius: 1,
    };
    let mut all = project(samples, d, 0, 1);
    if let Some(t) = data {
        all.extend(project(t, d, 0, 1));
    }
    let range = robust_range(&all);
    let mut panels = Vec::new();
    if let Some(t) = data {
        panels.push(Panel2d {
            title: format!("data ({} points)", t.len() / d),
            x_label: "x1".into(),
            y_label: "x2".into(),
            dots: vec![dots("data", t, Some(1))],
            range: Some(range),
            ..Default::default()
        });
    }
    panels.push(Panel2d {
        title: format!("samples: {title}"),
        x_label: "x1".into(),
        y_label: "x2".into(),
        dots: vec![dots("samples", samples, Some(0))],
        range: Some(range),
        ..Default::default()
    });
    draw_panels(path, &panels, 560 * panels.len() as u32, 560)
}

/// Up to six recorded sample paths: in the plane (over the data, when given) and each of the
/// first two coordinates against the sampling progress. States are divided by
/// `sqrt(alpha^2 + sigma^2)` (the variance-preserving frame) so that every process fits one picture.
pub fn trajectory_figure(
    path: &Path,
    traj: &Trajectory,
    data: Option<&[f64]>,
    d: usize,
    title: &str,
) -> Result<()> {
    need_two_dims(d, "trajectory")?;
    let Some(last) = traj.points.last() else {
        return Err(Error::param("trajectory", "the sampler recorded no steps"));
    };
    let rows = (last.x.len() / d).min(6);
    let total = last.step.max(1) as f64;
    // at most ~300 points per path, always keeping the first and the last
    let stride = traj.points.len().div_ceil(300).max(1);
    let kept: Vec<&TrajectoryPoint> = traj
        .points
        .iter()
        .enumerate()
        .filter(|(i, _)| i % stride == 0 || *i + 1 == traj.points.len())
        .map(|(_, p)| p)
        .collect();
    let scaled = |p: &TrajectoryPoint, r: usize, j: usize| {
        let l = p.level;
        p.x[r * d + j] / (l.alpha * l.alpha + l.sigma * l.sigma).sqrt()
    };
    let mut paths = Vec::new();
    let mut coord = [Vec::new(), Vec::new()];
    for r in 0..rows {
        paths.push(
            kept.iter()
                .map(|p| (scaled(p, r, 0), scaled(p, r, 1)))
                .collect::<Vec<_>>(),
        );
        for (j, c) in coord.iter_mut().enumerate() {
            c.push(
                kept.iter()
                    .map(|p| (p.step as f64 / total, scaled(p, r, j)))
                    .collect::<Vec<_>>(),
            );
        }
    }
    let dots = data
        .map(|t| {
            vec![Dots {
                label: "data".into(),
                points: project(t, d, 0, 1),
                color: None,
                radius: 1,
            }]
        })
        .unwrap_or_default();
    let [c0, c1] = coord;
    let panels = vec![
        Panel2d {
            title: format!("paths: {title}"),
            x_label: "x1 / sqrt(alpha^2 + sigma^2)".into(),
            y_label: "x2 / sqrt(alpha^2 + sigma^2)".into(),
            dots,
            lines: paths,
            ..Default::default()
        },
        Panel2d {
            title: "x1 over the sampling".into(),
            x_label: "step / steps".into(),
            y_label: "x1 (scaled)".into(),
            lines: c0,
            ..Default::default()
        },
        Panel2d {
            title: "x2 over the sampling".into(),
            x_label: "step / steps".into(),
            y_label: "x2 (scaled)".into(),
            lines: c1,
            ..Default::default()
        },
    ];
    draw_panels(path, &panels, 1650, 550)
}

/// A number for a title: fixed-point in [0.01, 1e4), scientific otherwise.
fn short(v: f64) -> String {
    if (0.01..1e4).contains(&v.abs()) {
        format!("{v:.3}")
    } else {
        format!("{v:.2e}")
    }
}

/// The score of a 2-D denoiser as arrows on a `grid x grid` lattice over `range`, one panel per
/// `(label, level)`; arrows are scaled so that the longest in a panel spans 0.9 cells, and the
/// data (when given) are drawn underneath.
pub fn score_field_figure(
    path: &Path,
    den: &dyn Denoiser,
    levels: &[(String, NoiseLevel)],
    range: ((f64, f64), (f64, f64)),
    grid: usize,
    data: Option<&[f64]>,
) -> Result<()> {
    let ((x0, x1), (y0, y1)) = range;
    let g = grid.max(2);
    let mut pts = Vec::with_capacity(g * g * 2);
    for i in 0..g {
        for j in 0..g {
            pts.push(x0 + (x1 - x0) * (i as f64 + 0.5) / g as f64);
            pts.push(y0 + (y1 - y0) * (j as f64 + 0.5) / g as f64);
        }
    }
    let xt = Tensor::from_vec(pts.clone(), (g * g, 2), &Device::Cpu)?;
    let cell = ((x1 - x0) / g as f64).min((y1 - y0) / g as f64);
    let mut panels = Vec::new();
    for (label, level) in levels {
        let score = den
            .score(&xt, &vec![*level; g * g])?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        let max = score
            .chunks(2)
            .map(|s| s[0].hypot(s[1]))
            .fold(0.0, f64::max)
            .max(1e-300);
        let k = 0.9 * cell / max;
        let arrows = pts
            .chunks(2)
            .zip(score.chunks(2))
            .map(|(p, s)| ((p[0], p[1]), (p[0] + k * s[0], p[1] + k * s[1])))
            .collect();
        panels.push(Panel2d {
            title: format!(
                "score at {label} (alpha {}, sigma {}), max |s| {}",
                short(level.alpha),
                short(level.sigma),
                short(max)
            ),
            x_label: "x1".into(),
            y_label: "x2".into(),
            dots: data
                .map(|t| {
                    vec![Dots {
                        label: String::new(),
                        points: project(t, 2, 0, 1),
                        color: None,
                        radius: 1,
                    }]
                })
                .unwrap_or_default(),
            arrows,
            range: Some(range),
            ..Default::default()
        });
    }
    draw_panels(path, &panels, 560 * panels.len() as u32, 580)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_dots_lines_and_arrows() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.png");
        let panel = Panel2d {
            title: "t".into(),
            dots: vec![Dots {
                label: "pts".into(),
                points: vec![(0.0, 0.0), (1.0, 1.0)],
                color: Some(0),
                radius: 3,
            }],
            lines: vec![vec![(0.0, 1.0), (1.0, 0.0)]],
            arrows: vec![((0.5, 0.5), (0.7, 0.6))],
            ..Default::default()
        };
        draw_panels(&p, &[panel.clone(), panel], 800, 400).unwrap();
        let img = image::open(&p).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (800, 400));
        // the line is drawn in the first palette colour at full opacity
        let c = PALETTE[0];
        assert!(img.pixels().filter(|px| px.0 == [c.0, c.1, c.2]).count() > 50);
    }
}
