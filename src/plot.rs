//! Pictures: line charts (schedules, loss curves), encoded as PNG and written atomically.
//!
//! Plots render into an in-memory RGB buffer with `plotters`, using the bundled DejaVu Sans
//! font (`assets/DejaVuSans.ttf`, no system font libraries needed), then go to disk through
//! [`crate::io::atomic_write`].

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

use crate::error::{Error, Result};

static FONT: Once = Once::new();
static FONT_BYTES: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Registers the bundled font as `sans-serif` (once per process).
pub fn ensure_font() {
    FONT.call_once(|| {
        // The bytes are a valid TTF compiled into the binary; registration cannot fail for it.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT_BYTES);
    });
}

/// A palette of distinguishable colours for series.
pub const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Converts a plotters error into the library's error.
pub fn plot_err<E: std::fmt::Display>(e: E) -> Error {
    Error::Numerical(format!("plotting failed: {e}"))
}

/// Encodes an RGB8 buffer as PNG and writes it atomically.
pub fn save_rgb_png(path: &Path, width: u32, height: u32, rgb: Vec<u8>) -> Result<()> {
    let img = image::RgbImage::from_raw(width, height, rgb)
        .ok_or_else(|| Error::Numerical("image buffer has the wrong size".into()))?;
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .map_err(|e| Error::Numerical(format!("PNG encoding failed: {e}")))?;
    crate::io::atomic_write(path, &bytes)
}

/// One named series of (x, y) points.
#[derive(Clone, Debug)]
pub struct Series {
    /// Legend label.
    pub label: String,
    /// The points.
    pub points: Vec<(f64, f64)>,
}

/// One panel of a line chart.
#[derive(Clone, Debug)]
pub struct Panel {
    /// Panel title.
    pub title: String,
    /// x axis label.
    pub x_label: String,
    /// y axis label.
    pub y_label: String,
    /// Series drawn in the panel (non-finite points are skipped).
    pub series: Vec<Series>,
}

fn finite_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        return (lo - 0.5, hi + 0.5);
    }
    let pad = 0.03 * (hi - lo);
    (lo - pad, hi + pad)
}

/// Draws `panels` side by side (one row) into a PNG of `width` x `height` pixels.
pub fn line_chart(path: &Path, panels: &[Panel], width: u32, height: u32) -> Result<()> {
    ensure_font();
    let mut buf = vec![255u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let areas = root.split_evenly((1, panels.len().max(1)));
        for (panel, area) in panels.iter().zip(areas.iter()) {
            let xs = panel.series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
            let (x0, x1) = finite_range(xs);
            let ys = panel.series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
            let (y0, y1) = finite_range(ys);
            let mut chart = ChartBuilder::on(area)
                .caption(&panel.title, ("sans-serif", 22))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(60)
                .build_cartesian_2d(x0..x1, y0..y1)
                .map_err(plot_err)?;
            chart
                .configure_mesh()
                .x_desc(&panel.x_label)
                .y_desc(&panel.y_label)
                .label_style(("sans-serif", 14))
                .draw()
                .map_err(plot_err)?;
            for (k, s) in panel.series.iter().enumerate() {
                let c = PALETTE[k % PALETTE.len()];
                let pts: Vec<(f64, f64)> = s
                    .points
                    .iter()
                    .copied()
                    .filter(|p| p.0.is_finite() && p.1.is_finite())
                    .collect();
                chart
                    .draw_series(LineSeries::new(pts, c.stroke_width(2)))
                    .map_err(plot_err)?
                    .label(s.label.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font(("sans-serif", 14))
                .draw()
                .map_err(plot_err)?;
        }
        root.present().map_err(plot_err)?;
    }
    save_rgb_png(path, width, height, buf)
}

/// The schedule comparison figure: alpha_bar_t and log-SNR against t/T for every named schedule.
pub fn schedule_figure(path: &Path, timesteps: usize) -> Result<()> {
    use crate::schedule::{BetaSchedule, Schedule};
    let mut ab = Vec::new();
    let mut lsnr = Vec::new();
    for name in BetaSchedule::NAMES {
        let s = Schedule::named(name, timesteps)?;
        let t_max = timesteps as f64;
        ab.push(Series {
            label: name.to_string(),
            points: (0..timesteps)
                .map(|i| ((i + 1) as f64 / t_max, s.alpha_bar[i]))
                .collect(),
        });
        lsnr.push(Series {
            label: name.to_string(),
            points: (0..timesteps)
                .map(|i| ((i + 1) as f64 / t_max, s.log_snr(i)))
                .collect(),
        });
    }
    line_chart(
        path,
        &[
            Panel {
                title: format!("alpha_bar_t (T = {timesteps})"),
                x_label: "t / T".into(),
                y_label: "alpha_bar_t".into(),
                series: ab,
            },
            Panel {
                title: format!("log SNR(t) (T = {timesteps})"),
                x_label: "t / T".into(),
                y_label: "ln(alpha_bar / (1 - alpha_bar))".into(),
                series: lsnr,
            },
        ],
        1400,
        560,
    )
}

/// Writes `picture` with a left margin of row labels (`(y centre, text)`), a top margin of column
/// labels (`(x centre, text)`) and a title, as PNG.
pub fn save_annotated(
    path: &Path,
    picture: &image::RgbImage,
    row_labels: &[(i32, String)],
    col_labels: &[(i32, String)],
    title: &str,
) -> Result<()> {
    ensure_font();
    let left = 10 + 9 * row_labels.iter().map(|l| l.1.len()).max().unwrap_or(0) as u32;
    let top = 56u32;
    let (pw, ph) = picture.dimensions();
    let (width, height) = (pw + left + 10, ph + top + 10);
    let mut buf = vec![255u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
        let style = ("sans-serif", 15).into_font().color(&BLACK);
        root.draw(&Text::new(
            title.to_string(),
            (left as i32, 6),
            ("sans-serif", 18).into_font(),
        ))
        .map_err(plot_err)?;
        for (y, text) in row_labels {
            root.draw(&Text::new(text.clone(), (6, top as i32 + y - 8), style.clone()))
                .map_err(plot_err)?;
        }
        for (x, text) in col_labels {
            let x0 = left as i32 + x - 4 * text.len() as i32;
            root.draw(&Text::new(text.clone(), (x0, top as i32 - 22), style.clone()))
                .map_err(plot_err)?;
        }
        root.present().map_err(plot_err)?;
    }
    for (x, y, p) in picture.enumerate_pixels() {
        let o = (((y + top) * width + x + left) * 3) as usize;
        buf[o..o + 3].copy_from_slice(&p.0);
    }
    save_rgb_png(path, width, height, buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_figure_writes_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.png");
        schedule_figure(&p, 100).unwrap();
        let img = image::open(&p).unwrap();
        assert_eq!((img.width(), img.height()), (1400, 560));
        // Not blank: the curves put coloured pixels on the white canvas.
        let rgb = img.to_rgb8();
        let coloured = rgb.pixels().filter(|p| p.0 == [31, 119, 180]).count();
        assert!(coloured > 200, "{coloured} pixels of the first series' colour");
    }
}
