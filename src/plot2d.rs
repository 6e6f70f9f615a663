//! 2-D pictures for toy data: scatter plots (data vs samples), sample paths, and score fields
//! drawn as arrows. Each figure is a row of [`Panel2d`]s rendered with `plotters` (bundled font,
//! see [`crate::plot`]) and written atomically as PNG.

use std::path::Path;

use plotters::prelude::*;

use crate::error::Result;
use crate::plot::{ensure_font, plot_err, save_rgb_png, PALETTE};

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
